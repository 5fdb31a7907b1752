//! `ferroformers serve --model ID[=TASK] ...`: options into `ferroformers_server::Config`.

use ferroformers_server::{Config, ModelSpec};

use crate::train_cmd::num;

pub const USAGE: &str = "\
  ferroformers serve --model PATH|ID[=TASK] [--model ...] [--served-model-name NAME]
                     [--hostname 127.0.0.1] [--port 3000] [--api-key KEY]
                     [--payload-limit 2000000] [--max-client-batch-size 32]
                     [--max-batch-inputs 128] [--max-batch-wait-ms 0]
                     [--max-batch-total-tokens 32768 (0: no continuous batching)]
                     [--max-waiting-tokens 20] [--waiting-served-ratio 0 (TGI: 1.2)]
                     [--max-concurrent-requests 128] [--max-queue-size 256]
                     [--request-timeout SECONDS] [--cors-allow-origin ORIGIN|*]...
                     [--json-output] [--quiet] [--threads N]
  --payload-limit bounds every body, audio files included: 2 MB holds ~60 s of 16 kHz 16-bit
  WAV (11 s of 44.1 kHz stereo); OpenAI takes files up to 25 MB (--payload-limit 26214400).";

pub fn serve(args: &[String]) -> Result<(), String> {
    let mut cfg = Config::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("`{a}` needs a value"))
        };
        match a.as_str() {
            "--model" | "--model-id" => cfg.models.push(ModelSpec::parse(&value()?)),
            "--served-model-name" => cfg.served_model_name = Some(value()?),
            "--hostname" => cfg.hostname = value()?,
            "--port" => cfg.port = num(a, &value()?)?,
            "--api-key" => cfg.api_key = Some(value()?),
            "--payload-limit" => cfg.payload_limit = num(a, &value()?)?,
            "--max-client-batch-size" => cfg.max_client_batch_size = num(a, &value()?)?,
            "--max-batch-inputs" => cfg.max_batch_inputs = num(a, &value()?)?,
            "--max-batch-total-tokens" => cfg.max_batch_total_tokens = num(a, &value()?)?,
            "--max-waiting-tokens" => cfg.admission.max_waiting_tokens = num(a, &value()?)?,
            "--waiting-served-ratio" => {
                let r: f32 = num(a, &value()?)?;
                if !(r >= 0.0 && r.is_finite()) {
                    return Err(format!(
                        "`--waiting-served-ratio` takes a number >= 0, not {r}"
                    ));
                }
                cfg.admission.waiting_served_ratio = r
            }
            "--max-concurrent-requests" => cfg.max_concurrent_requests = num(a, &value()?)?,
            "--cors-allow-origin" => cfg.cors_allow_origin.push(value()?),
            "--max-queue-size" => cfg.max_queue_size = num(a, &value()?)?,
            "--request-timeout" => {
                let secs: f64 = num(a, &value()?)?;
                if !(secs > 0.0 && secs.is_finite()) {
                    return Err(format!("`--request-timeout` takes seconds > 0, not {secs}"));
                }
                cfg.request_timeout = Some(std::time::Duration::from_secs_f64(secs))
            }
            "--json-output" => cfg.json_output = true,
            "--quiet" => cfg.quiet = true,
            "--max-batch-wait-ms" => {
                cfg.max_batch_wait = std::time::Duration::from_millis(num(a, &value()?)?)
            }
            "--threads" => {
                let n: usize = num(a, &value()?)?;
                std::env::set_var("RAYON_NUM_THREADS", n.to_string());
            }
            "--help" | "-h" => {
                println!("usage:\n{USAGE}");
                return Ok(());
            }
            s => return Err(format!("unknown option `{s}` for `serve`\nusage:\n{USAGE}")),
        }
    }
    if cfg.models.is_empty() {
        return Err(format!("`serve` needs --model\nusage:\n{USAGE}"));
    }
    ferroformers_server::serve_blocking(cfg)
}
