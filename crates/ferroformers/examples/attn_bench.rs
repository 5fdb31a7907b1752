//! Times encoder self-attention (`attend_sequences`) on BERT-base shapes (12 heads of 64): one
//! input of 128 to 2048 tokens, and MiniLM's batch of 32 short ones, across rayon's pool.
//!
//!   cargo run --release -p ferroformers --example attn_bench [-- REPS]
//!
//! Prints GFLOP/s (4 * s * s * d per head: the two products) per shape, median of REPS.

use std::time::Instant;

use ferroformers::kernels::cpu::attention::{attend_sequences, attend_sequences_bf16_into};

mod common;
use common::{median, values};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    println!("| batch x tokens | heads x d | f32 ms | f32 GFLOP/s | bf16 ms | bf16 GFLOP/s | bf16 / f32 |");
    println!("|---|---|---|---|---|---|---|");
    for &(b, s, heads, d) in &[
        (32, 16, 12, 32),
        (8, 64, 12, 32),
        (32, 64, 12, 32),
        (8, 96, 12, 32),
        (8, 128, 12, 32),
        (32, 128, 12, 32),
        (4, 256, 12, 32),
        (1, 96, 12, 64),
        (1, 64, 12, 64),
        (1, 128, 12, 64),
        (1, 384, 12, 64),
        (1, 500, 12, 64),
        (1, 512, 12, 64),
        (1, 520, 12, 64),
        (1, 1024, 12, 64),
        (1, 2048, 12, 64),
        // Whisper's encoder (tiny: 6 heads; base: 8): one 30 s window.
        (1, 1500, 6, 64),
    ] {
        // `ATTN_ONLY=32x128` times that batch x tokens alone (for `perf`).
        if std::env::var("ATTN_ONLY").is_ok_and(|v| v != format!("{b}x{s}")) {
            continue;
        }
        let qkv = values(b * s * 3 * heads * d, 1);
        let keep = vec![1.0f32; b * s];
        let scale = 1.0 / (d as f32).sqrt();
        let f32_run = || {
            std::hint::black_box(attend_sequences(
                &qkv, b, s, heads, d, scale, None, &keep, true,
            ));
        };
        let mut ctx = Vec::new();
        let mut bf16_run = || {
            attend_sequences_bf16_into(&qkv, b, s, heads, d, scale, &keep, true, &mut ctx);
            std::hint::black_box(&ctx);
        };
        let flop = 4.0 * (b * heads * s * s * d) as f64;
        let time = |run: &mut dyn FnMut()| {
            run();
            let mut times = Vec::new();
            for _ in 0..reps {
                let t = Instant::now();
                run();
                times.push(t.elapsed().as_secs_f64());
            }
            median(times)
        };
        let only_bf16 = std::env::var("ATTN_BF16_ONLY").is_ok_and(|v| v == "1");
        let tf = if only_bf16 {
            f64::NAN
        } else {
            time(&mut { f32_run })
        };
        // The bf16 kernel needs AVX512-BF16: without it, that column is NaN.
        let tb = if ferroformers::kernels::cpu::bf16::available() {
            time(&mut bf16_run)
        } else {
            f64::NAN
        };
        println!(
            "| {b} x {s} | {heads} x {d} | {:.3} | {:.1} | {:.3} | {:.1} | {:.2}x |",
            tf * 1e3,
            flop / tf / 1e9,
            tb * 1e3,
            flop / tb / 1e9,
            tf / tb
        );
    }
}
