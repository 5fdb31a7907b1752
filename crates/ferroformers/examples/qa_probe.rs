//! Probe: one question-answering pair (~3 windows of ~350 tokens) on the BERT-base-sized
//! random model that `scripts/bench_qa.py` generates, on one thread, timed several times in
//! one process; prints the best and the median. For A/B comparisons on a noisy machine, where
//! whole-run timings vary more than the changes being compared.
//!
//!   python3 scripts/bench_qa.py --reps 1 --batch-sizes 1   # once, to generate the model
//!   cargo run --release -p ferroformers --example qa_probe [model] [reps]
use std::time::Instant;

use ferroformers::{pipeline_with, Input, Params, PipelineOptions};

fn main() -> ferroformers::Result<()> {
    let mut args = std::env::args().skip(1);
    let model = args.next().unwrap_or("bench-out/bert-base-qa".into());
    let reps: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(7);
    rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build_global()
        .expect("thread pool");
    let words: Vec<&str> = include_str!("../../../scripts/corpus.txt")
        .split_whitespace()
        .collect();
    // ~300 words of context, as the benchmark's pairs.
    let context: Vec<&str> = (0..300).map(|i| words[(i * 7919) % words.len()]).collect();
    let input = Input::question(words[..8].join(" ") + "?", context.join(" "));
    let qa = pipeline_with(
        "question-answering",
        PipelineOptions {
            model: Some(model),
            ..Default::default()
        },
    )?;
    let params = Params::default();
    qa.run(std::slice::from_ref(&input), &params)?;
    let mut times: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            qa.run(std::slice::from_ref(&input), &params)
                .map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<ferroformers::Result<_>>()?;
    times.sort_by(f64::total_cmp);
    println!(
        "one pair: best {:.1} ms, median {:.1} ms ({reps} runs)",
        times[0] * 1e3,
        times[reps / 2] * 1e3
    );
    Ok(())
}
