//! A server's continuous batch without the server: N threads each generate from the same chat
//! through one pipeline's shared batch (greedy), round after round, in one process. With
//! `FERROFORMERS_BATCH_TRACE=1` the batch prints each pass's time on stderr, to set beside a
//! server's under the same load (what HTTP, streaming and the clients add).
//!
//!   cargo run --release -p ferroformers --example shared_batch -- [MODEL [N [TOKENS [ROUNDS]]]] [invariant]
//!
//! Defaults: SmolLM2-135M-Instruct's GGUF, 16 threads, 24 new tokens, 3 rounds; `invariant`:
//! batch-invariant arithmetic ([`ferroformers::Pipeline::make_batch_invariant`]). Prints each
//! round's wall time.

use ferroformers::{Input, Params, PipelineOptions};

fn main() -> ferroformers::Result<()> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let invariant = args.iter().any(|a| a == "invariant");
    args.retain(|a| a != "invariant");
    let model = args
        .first()
        .cloned()
        .unwrap_or_else(|| "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF".into());
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (n, tokens, rounds) = (arg(1, 16), arg(2, 24), arg(3, 3));
    let opts = PipelineOptions {
        model: Some(model),
        ..Default::default()
    };
    let mut pipe = ferroformers::pipeline_with("text-generation", opts)?;
    if invariant {
        pipe.make_batch_invariant()?;
    }
    if !pipe.enable_continuous_batching(16384) {
        eprintln!("this model does not batch continuously");
        std::process::exit(1);
    }
    let chat = serde_json::json!([{"role": "user",
                                   "content": "Write a short story about a lighthouse keeper."}]);
    let input = Input::from_json(&chat, 0)?;
    let mut params = Params::new();
    params.insert("max_new_tokens".into(), serde_json::json!(tokens));
    params.insert("do_sample".into(), serde_json::json!(false));
    for round in 0..rounds {
        let t = std::time::Instant::now();
        let outs: Vec<ferroformers::Result<_>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n)
                .map(|_| s.spawn(|| pipe.run(std::slice::from_ref(&input), &params)))
                .collect();
            hs.into_iter()
                .map(|h| h.join().expect("a generating thread panicked"))
                .collect()
        });
        for o in outs {
            o?;
        }
        println!(
            "round {round}: {n} x {tokens} tokens in {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
    Ok(())
}
