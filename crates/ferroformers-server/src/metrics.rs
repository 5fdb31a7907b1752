//! `GET /metrics` in Prometheus' text format.

use super::*;

/// Prometheus text format: per model, requests waiting, batches run, requests, inputs and tokens in
/// them, the largest batch, requests dropped because their client had gone, histograms of time
/// in the queue and in pipeline calls; per route, answers by status, failures by error type
/// and durations; generation's continuous batch and token timing.
pub(crate) async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&batch::Stats) -> u64,
    );
    let series: [Series; 8] = [
        (
            "ferroformers_queue_size",
            "gauge",
            "requests waiting for a batch",
            |s| s.queued.load(Relaxed),
        ),
        (
            "ferroformers_batch_count",
            "counter",
            "pipeline calls run by the batcher",
            |s| s.batches.load(Relaxed),
        ),
        (
            "ferroformers_batch_requests_total",
            "counter",
            "requests in those calls",
            |s| s.batched_requests.load(Relaxed),
        ),
        (
            "ferroformers_batch_inputs_total",
            "counter",
            "inputs in those calls",
            |s| s.batched_inputs.load(Relaxed),
        ),
        (
            "ferroformers_batch_max_inputs",
            "gauge",
            "largest call so far, in inputs",
            |s| s.largest_batch.load(Relaxed),
        ),
        (
            "ferroformers_batch_tokens_total",
            "counter",
            "tokens in those calls",
            |s| s.batched_tokens.load(Relaxed),
        ),
        (
            "ferroformers_batch_max_tokens",
            "gauge",
            "largest call so far, in tokens",
            |s| s.largest_batch_tokens.load(Relaxed),
        ),
        (
            "ferroformers_dropped_requests_total",
            "counter",
            "requests whose client left before they ran",
            |s| s.dropped.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in series {
        let values = state
            .models
            .iter()
            .filter_map(|m| Some((m.id.as_str(), get(&m.batcher.as_ref()?.stats))));
        per_model(&mut out, (name, kind, help), values);
    }
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    for (name, help, which) in [
        (
            "ferroformers_queue_duration_seconds",
            "time requests waited in the batch queue",
            0,
        ),
        (
            "ferroformers_inference_duration_seconds",
            "time the batcher's pipeline calls took",
            1,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for m in &state.models {
            let Some(b) = &m.batcher else { continue };
            if let Ok(d) = b.stats.durations.lock() {
                let h = if which == 0 { &d.queue } else { &d.inference };
                h.write(&mut out, name, &format!("model=\"{}\",", esc(&m.id)));
            }
        }
    }
    type GenSeries = (
        &'static str,
        &'static str,
        &'static str,
        fn(&ferroformers::generation::BatchStats) -> u64,
    );
    let gen: [GenSeries; 13] = [
        (
            "ferroformers_generation_batch_current_size",
            "gauge",
            "sequences in the continuous batch now",
            |s| s.running as u64,
        ),
        (
            "ferroformers_generation_queue_size",
            "gauge",
            "sequences waiting to join the continuous batch",
            |s| s.waiting as u64,
        ),
        (
            "ferroformers_generation_steps_total",
            "counter",
            "batched decoding steps run",
            |s| s.steps,
        ),
        (
            "ferroformers_generation_step_rows_total",
            "counter",
            "sequences in those steps, summed (divide by the steps for the mean batch size)",
            |s| s.rows,
        ),
        (
            "ferroformers_generation_batch_max_size",
            "gauge",
            "most sequences one step has run",
            |s| s.max_rows as u64,
        ),
        (
            "ferroformers_generation_prefill_chunks_total",
            "counter",
            "chunks run of prompts longer than --max-batch-prefill-tokens",
            |s| s.prefill_chunks,
        ),
        (
            "ferroformers_generation_prefix_hits_total",
            "counter",
            "prompts that continued from kept keys and values (prefix caching)",
            |s| s.prefix_hits,
        ),
        (
            "ferroformers_generation_prefix_tokens_total",
            "counter",
            "prompt tokens taken from kept keys and values instead of being run",
            |s| s.prefix_tokens,
        ),
        (
            "ferroformers_generation_cancelled_prompts_total",
            "counter",
            "requests cancelled before their prompt had run whole (queued, or between chunks)",
            |s| s.cancelled_prompts,
        ),
        (
            "ferroformers_generation_mid_step_prompts_total",
            "counter",
            "prompts run between the layers of a decoding step (--prefill-priority)",
            |s| s.mid_step_joins,
        ),
        (
            "ferroformers_generation_restarted_prompt_passes_total",
            "counter",
            "prompt passes of an idle batch stopped early to run again with requests that \
             arrived during them",
            |s| s.restarted_passes,
        ),
        (
            "ferroformers_generation_arrival_waits_total",
            "counter",
            "times an idle batch's first prompt waited for requests the server was still \
             reading and tokenizing (--arrival-wait-ms)",
            |s| s.arrival_waits,
        ),
        (
            "ferroformers_generation_announced_requests_total",
            "counter",
            "generation requests announced to the continuous batch as they came in (each an \
             idle batch may wait for)",
            |s| s.announcements,
        ),
    ];
    for (name, kind, help, get) in gen {
        let values = state
            .models
            .iter()
            .filter_map(|m| Some((m.id.as_str(), get(&m.pipe.batch_stats()?))));
        per_model(&mut out, (name, kind, help), values);
    }
    if let Ok(st) = state.requests.lock() {
        let _ = writeln!(
            out,
            "# HELP ferroformers_request_count answers by route and status\n\
             # TYPE ferroformers_request_count counter"
        );
        for ((route, status), n) in &st.count {
            let _ = writeln!(
                out,
                "ferroformers_request_count{{route=\"{}\",status=\"{status}\"}} {n}",
                esc(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferroformers_request_failure_total error answers by route and error_type\n\
             # TYPE ferroformers_request_failure_total counter"
        );
        for ((route, kind), n) in &st.failures {
            let _ = writeln!(
                out,
                "ferroformers_request_failure_total{{route=\"{}\",error_type=\"{kind}\"}} {n}",
                esc(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferroformers_request_duration_seconds time to each answer's head, by \
             route\n# TYPE ferroformers_request_duration_seconds histogram"
        );
        for (route, h) in &st.duration {
            h.write(
                &mut out,
                "ferroformers_request_duration_seconds",
                &format!("route=\"{}\",", esc(route)),
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferroformers_time_to_first_token_seconds generation: request start to first \
             token\n# TYPE ferroformers_time_to_first_token_seconds histogram"
        );
        st.first_token
            .write(&mut out, "ferroformers_time_to_first_token_seconds", "");
        let _ = writeln!(
            out,
            "# HELP ferroformers_time_per_output_token_seconds generation: mean time per token \
             after the first\n# TYPE ferroformers_time_per_output_token_seconds histogram"
        );
        st.per_token
            .write(&mut out, "ferroformers_time_per_output_token_seconds", "");
    }
    let _ = writeln!(
        out,
        "# HELP ferroformers_generations_cancelled_total generations stopped because their \
         client had gone\n# TYPE ferroformers_generations_cancelled_total counter\n\
         ferroformers_generations_cancelled_total {}",
        state.cancelled.load(Relaxed)
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// One Prometheus series with a value per model (`{model="ID"}`), after its HELP and TYPE lines.
fn per_model<'a>(
    out: &mut String,
    (name, kind, help): (&str, &str, &str),
    values: impl Iterator<Item = (&'a str, u64)>,
) {
    use std::fmt::Write;
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (id, v) in values {
        let id = id.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(out, "{name}{{model=\"{id}\"}} {v}");
    }
}
