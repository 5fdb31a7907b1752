//! Probe: CPU matmul speed of a linear layer for the two weight layouts.
use candle_core::{Device, Tensor};
use std::time::Instant;

fn main() -> candle_core::Result<()> {
    let dev = Device::Cpu;
    for &(m, k, n) in &[
        (12usize, 384usize, 384usize),
        (12, 384, 1536),
        (12, 1536, 384),
        (640, 384, 1536),
    ] {
        let x = Tensor::randn(0f32, 1., (m, k), &dev)?;
        let w = Tensor::randn(0f32, 1., (n, k), &dev)?; // HF layout [out, in]
        let wt = w.t()?.contiguous()?; // [in, out]
        let reps = if m > 100 { 20 } else { 2000 };
        for (name, rhs) in [("w.t() view", w.t()?), ("contiguous wt", wt.clone())] {
            let _ = x.matmul(&rhs)?;
            let t = Instant::now();
            for _ in 0..reps {
                let _ = x.matmul(&rhs)?;
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "m={m} k={k} n={n} {name}: {:.1} us, {:.1} GFLOP/s",
                s * 1e6,
                2.0 * (m * k * n) as f64 / s / 1e9
            );
        }
    }
    Ok(())
}
