//! Times the GGUF decoding products (one activation row, the int8 mode) on Qwen2.5-0.5B
//! Q4_K_M's shapes and block types: as many copies of each matrix as the model has layers, so
//! the weights stream from memory as in decoding, across the kernels' thread pool
//! (`RAYON_NUM_THREADS`/candle's thread count).
//!
//!   cargo run --release -p ferroformers --example gguf_gemv_bench [-- REPS]
//!   FERROFORMERS_NO_REPACK=1 ...   (the raw-block kernels, for comparison)
//!   ... -- REPS hot                 (one copy each: cache-resident, the arithmetic alone)
//!   ... -- REPS rows=16             (a batched decoding step of 16 rows: kept int8 panels)
//!   ... -- REPS ladder              (every block type on one shape, a gate/up matrix of
//!                                    scripts/make_quant_ladder.py's model: 2816 x 1024, 16 copies)
//!   ... -- REPS smol               (SmolLM2-135M Q4_1's shapes: q/k/v and gate/up stacked as
//!                                    the model stacks them, 30 copies; its Q8_0 output)
//!   ... -- REPS exact               (the exact mode: f32 activations; default int8)
//!   ... -- REPS only=Q4_1           (only the matrices of one block type)
//!   ... -- REPS invariant           (batch-invariant products: kept int8 panels at any rows)
//!
//! Prints microseconds per product, GB/s of GGUF weights and multiply-adds per second; the median of REPS passes
//! (default 15) over all copies.

use std::time::Instant;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use ferroformers::kernels::cpu::quantized::{QuantLinear, QuantMath};

mod common;
use common::{median, values};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(15);
    println!(
        "packed kernels: {}; threads: {}",
        ferroformers::kernels::cpu::packed::available(),
        candle_core::utils::get_num_threads()
    );
    println!("| matrix (n x k) | type | copies | MB each | us per product | GB/s | GMAC/s |");
    println!("|---|---|---|---|---|---|---|");
    let qwen = [
        ("q/k/v", 1152, 896, GgmlDType::Q5_0, 24),
        ("o", 896, 896, GgmlDType::Q5_0, 24),
        ("gate/up", 9728, 896, GgmlDType::Q5_0, 24),
        ("down", 896, 4864, GgmlDType::Q4K, 12),
        ("down", 896, 4864, GgmlDType::Q6K, 12),
        ("output", 151936, 896, GgmlDType::Q8_0, 1),
        ("gate/up", 9728, 896, GgmlDType::Q4_1, 24),
    ];
    let ladder =
        ferroformers::kernels::cpu::blocks::BLOCK_TYPES.map(|dt| ("gate/up", 2816, 1024, dt, 16));
    let smol = [
        ("q/k/v", 960, 576, GgmlDType::Q4_1, 30),
        ("o", 576, 576, GgmlDType::Q4_1, 30),
        ("gate/up", 3072, 576, GgmlDType::Q4_1, 30),
        ("down", 576, 1536, GgmlDType::Q4_1, 30),
        ("output", 49152, 576, GgmlDType::Q8_0, 1),
    ];
    let shapes = if std::env::args().any(|a| a == "ladder") {
        &ladder[..]
    } else if std::env::args().any(|a| a == "smol") {
        &smol[..]
    } else {
        &qwen[..]
    };
    let math = if std::env::args().any(|a| a == "exact") {
        QuantMath::Exact
    } else {
        QuantMath::Int8
    };
    // `hot`: one copy of each matrix (in cache after the first pass): the kernels' arithmetic.
    let hot = std::env::args().any(|a| a == "hot");
    let rows: usize = std::env::args()
        .find_map(|a| a.strip_prefix("rows=").and_then(|v| v.parse().ok()))
        .unwrap_or(1);
    let only = std::env::args().find_map(|a| a.strip_prefix("only=").map(str::to_string));
    for &(name, n, k, dt, copies) in shapes {
        if only.as_ref().is_some_and(|o| *o != format!("{dt:?}")) {
            continue;
        }
        let copies = if hot { 1 } else { copies };
        let w = Tensor::from_vec(values(n * k, n as u64), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let bytes = q.storage_size_in_bytes();
        let base = QuantLinear::new(&q).unwrap().unwrap();
        let mut mats: Vec<QuantLinear> = (0..copies)
            .map(|_| QuantLinear::stack(&[&base]).unwrap().with_math(math))
            .collect();
        if std::env::args().any(|a| a == "invariant") {
            for m in &mut mats {
                m.make_batch_invariant().unwrap();
            }
        }
        let x = values(rows * k, 7);
        let mut sink = 0f32;
        let mut times = Vec::new();
        for rep in 0..reps + 2 {
            let t = Instant::now();
            for m in &mats {
                sink += if rows > 1 {
                    m.matmul_step(&x, rows)[0]
                } else {
                    m.matmul(&x, 1)[0]
                };
            }
            if rep >= 2 {
                times.push(t.elapsed().as_secs_f64() / copies as f64);
            }
        }
        let s = median(times);
        println!(
            "| {name} ({n} x {k}) | {dt:?} | {copies} | {:.2} | {:.1} | {:.1} | {:.1} |{}",
            bytes as f64 / 1e6,
            s * 1e6,
            bytes as f64 / s / 1e9,
            (rows * n * k) as f64 / s / 1e9,
            if sink.is_nan() { " NaN" } else { "" }
        );
    }
}
