//! Times the attention of one batched decoding step (`attend_causal` with one new token per
//! row) on SmolLM2-135M's shapes: 16 rows, 9 query heads over 3 kv heads of 64, f16 keys and
//! values, as many layers as the model (30), each its own cache, so the caches stream from
//! memory as in a step; across the kernels' thread pool.
//!
//!   cargo run --release -p ferroformers --example step_attn_bench [-- REPS [ROWS [PAST]]]
//!   ... -- REPS ROWS PAST hot     (one layer's cache over and over: cache-resident)
//!
//! Prints the median milliseconds per step (all layers) for a few past lengths.

use std::time::Instant;

use ferroformers::kernels::cpu::attention::{attend_causal, KvBuffer};

mod common;
use common::{median, values};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let reps: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(30);
    let rows: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(16);
    let pasts: Vec<usize> = match args.get(3).and_then(|a| a.parse().ok()) {
        Some(p) => vec![p],
        None => vec![50, 100, 200, 500],
    };
    let hot = args.iter().any(|a| a == "hot");
    let (nh, nkv, hd, layers) = (9, 3, 64, if hot { 1 } else { 30 });
    let width = (nh + 2 * nkv) * hd;
    println!("| rows | past | layers | ms per step | GB/s of keys and values |");
    println!("|---|---|---|---|---|");
    for &past in &pasts {
        let total = past + 1;
        let caches: Vec<KvBuffer> = (0..layers)
            .map(|l| {
                let mut kv = KvBuffer::new_f16(rows, nkv, hd);
                kv.reserve(total);
                for r in 0..rows {
                    for h in 0..nkv {
                        for p in 0..total {
                            let seed = ((l * rows + r) * nkv + h) * total + p;
                            let k = values(hd, seed as u64);
                            let v = values(hd, seed as u64 + 7);
                            kv.put(r, h, p, &k, &v);
                        }
                    }
                }
                kv.set_len(total);
                kv
            })
            .collect();
        let qkv = values(rows * width, 3);
        let bias = vec![0f32; rows * total];
        let scale = 1.0 / (hd as f32).sqrt();
        let mut times = Vec::new();
        let mut sink = 0f32;
        for _ in 0..reps {
            let t = Instant::now();
            for _ in 0..(30 / layers) {
                for kv in &caches {
                    let ctx = attend_causal(
                        &qkv,
                        (width, rows, 1, past),
                        (nh, nh / nkv, hd),
                        kv,
                        (&bias, total),
                        scale,
                        false,
                    );
                    sink += ctx[0];
                }
            }
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let ms = median(times);
        let bytes = (30 * rows * nkv * total * hd * 2 * 2) as f64;
        println!(
            "| {rows} | {past} | {layers} | {ms:.3} | {:.1} |",
            bytes / ms / 1e6
        );
        std::hint::black_box(sink);
    }
}
