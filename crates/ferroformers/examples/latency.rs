//! Latency of one request in a warm process: the pipeline is loaded once, warmed up, then run
//! on the same single input REPS times in a row (one request at a time, so a request's products
//! and attention heads are split over all of rayon's threads).
//!
//!   cargo run --release -p ferroformers --example latency -- TASK MODEL INPUT_JSON \
//!       [--reps N] [--quantize int8] [--dtype bf16] [--param KEY=VALUE]...
//!
//! Prints one JSON line: {"median_ms", "p10_ms", "p90_ms", "reps", "threads", "text"} (`text`: the
//! first answer's `text`, speech recognition's transcript; null for other outputs).
//! `scripts/bench_latency.py` runs it beside ONNX Runtime and torch.

use std::time::Instant;

use ferroformers::{DType, Input, Params, PipelineOptions, Quantize};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: latency TASK MODEL INPUT_JSON [--reps N] [--quantize int8] [--dtype bf16] [--param K=V]...");
        std::process::exit(2);
    }
    let (task, model, input) = (&args[0], &args[1], &args[2]);
    let mut opts = PipelineOptions {
        model: Some(model.clone()),
        ..Default::default()
    };
    let mut reps = 50usize;
    let mut params = Params::new();
    let mut rest = args[3..].iter();
    while let Some(a) = rest.next() {
        let mut value = || rest.next().cloned().unwrap_or_default();
        match a.as_str() {
            "--reps" => reps = value().parse().expect("--reps N"),
            "--quantize" => opts.quantize = Some(Quantize::parse(&value()).expect("int8")),
            "--dtype" => {
                opts.dtype = match value().as_str() {
                    "bf16" => DType::BF16,
                    _ => DType::F32,
                }
            }
            "--param" => {
                let v = value();
                let (k, raw) = v.split_once('=').expect("--param KEY=VALUE");
                let parsed =
                    serde_json::from_str(raw).unwrap_or(serde_json::Value::String(raw.to_string()));
                params.insert(k.to_string(), parsed);
            }
            other => panic!("unknown argument {other}"),
        }
    }
    let pipe = ferroformers::pipeline_with(task, opts).unwrap_or_else(|e| panic!("{e}"));
    let value: serde_json::Value =
        serde_json::from_str(input).unwrap_or(serde_json::Value::String(input.clone()));
    let inputs = [Input::from_json(&value, 0).unwrap_or_else(|e| panic!("{e}"))];
    // The answer's `text` (speech recognition's transcript) goes out with the timings, so that
    // a benchmark can show what was computed.
    let first = pipe.run(&inputs, &params).unwrap();
    let text = serde_json::to_value(&first).unwrap_or_default()[0]["text"].clone();
    for _ in 0..4 {
        pipe.run(&inputs, &params).unwrap();
    }
    let mut ms: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(pipe.run(&inputs, &params).unwrap());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "{}",
        serde_json::json!({
            "median_ms": at(0.5),
            "p10_ms": at(0.1),
            "p90_ms": at(0.9),
            "reps": ms.len(),
            "threads": rayon::current_num_threads(),
            "text": text,
        })
    );
}
