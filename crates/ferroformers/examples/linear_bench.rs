//! Times the encoder's linear products: f32 (`gemm`) against int8 (`--quantize int8`) and
//! bf16 (`--dtype bf16`), on
//! MiniLM and BERT-base shapes, at one thread (a batch per core) and across rayon's pool.
//!
//!   cargo run --release -p ferroformers --example linear_bench [-- REPS]
//!
//! Prints GFLOP/s (2 * rows * k * n per product) per shape; the median of REPS (default 20).

use std::time::Instant;

use ferroformers::kernels::cpu::bf16::{self, Bf16Weights};
use ferroformers::kernels::cpu::int8::{Int8Weights, Kernel};
use ferroformers::kernels::cpu::linear::linear_into;

mod common;
use common::{median, values};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(20);
    println!(
        "int8 kernel: {:?}; rayon threads: {}",
        Kernel::best(),
        rayon::current_num_threads()
    );
    println!("bf16 kernels: {}", bf16::available());
    println!(
        "| shape (rows x k x n) | threads | f32 GFLOP/s | int8 GFLOP/s | int8 / f32 | bf16 GFLOP/s | bf16 / f32 |"
    );
    println!("|---|---|---|---|---|---|---|");
    for &(rows, k, n) in &[
        (14, 384, 1152),
        (448, 384, 1152),
        (448, 384, 1536),
        (448, 1536, 384),
        (384, 768, 2304),
        (384, 768, 3072),
        (384, 3072, 768),
    ] {
        let w = values(k * n, 1);
        let x = values(rows * k, 2);
        let bias = values(n, 3);
        let q = Int8Weights::from_in_out(&w, k, n);
        let h = Bf16Weights::from_in_out(&w, k, n);
        let mut out = vec![0f32; rows * n];
        for par in [false, true] {
            let mut time = |f: &mut dyn FnMut(&mut [f32])| {
                f(&mut out);
                median(
                    (0..reps)
                        .map(|_| {
                            let t = Instant::now();
                            f(&mut out);
                            t.elapsed().as_secs_f64()
                        })
                        .collect(),
                )
            };
            let f32_s = time(&mut |o| linear_into(&x, rows, k, (&w, &bias), None, o, par));
            let i8_s = time(&mut |o| q.linear_into(&x, rows, &bias, None, o, par));
            let bf_s = time(&mut |o| h.linear_into(&x, rows, &bias, None, o, par));
            let flop = 2.0 * (rows * k * n) as f64 / 1e9;
            let threads = if par { rayon::current_num_threads() } else { 1 };
            println!(
                "| {rows} x {k} x {n} | {threads} | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2}x |",
                flop / f32_s,
                flop / i8_s,
                f32_s / i8_s,
                flop / bf_s,
                f32_s / bf_s
            );
        }
    }
}
