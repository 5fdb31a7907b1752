//! Probe: the f32 FMA peak of this CPU, per core, from a loop of independent AVX-512 (or
//! AVX2) FMAs on registers; one thread, then every core at once. The ceiling that any f32
//! matrix product, ours or PyTorch's, runs under (see BENCHMARKS.md, question answering).
//!
//!   cargo run --release -p ferroformers --example fma_peak
use std::hint::black_box;
use std::time::Instant;

/// GFLOP/s of `iters` rounds of independent FMAs on registers (0 without AVX2/FMA).
#[cfg(target_arch = "x86_64")]
fn rate(iters: usize) -> f64 {
    use std::arch::x86_64::*;
    /// 24 independent 16-lane accumulators: enough to cover the FMA latency on two ports.
    /// Returns the FLOPs done.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512(iters: usize) -> usize {
        let mut c = [_mm512_set1_ps(black_box(0.5)); 24];
        let a = _mm512_set1_ps(black_box(0.999));
        let b = _mm512_set1_ps(black_box(0.001));
        for _ in 0..iters {
            for v in c.iter_mut() {
                *v = _mm512_fmadd_ps(a, *v, b);
            }
        }
        let s = c
            .iter()
            .fold(_mm512_setzero_ps(), |s, v| _mm512_add_ps(s, *v));
        black_box(_mm512_reduce_add_ps(s));
        iters * 24 * 16 * 2
    }
    /// The same with 12 8-lane accumulators, twice the rounds.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(iters: usize) -> usize {
        let mut c = [_mm256_set1_ps(black_box(0.5)); 12];
        let a = _mm256_set1_ps(black_box(0.999));
        let b = _mm256_set1_ps(black_box(0.001));
        for _ in 0..iters * 2 {
            for v in c.iter_mut() {
                *v = _mm256_fmadd_ps(a, *v, b);
            }
        }
        black_box(c);
        iters * 2 * 12 * 8 * 2
    }
    let t = Instant::now();
    // SAFETY: each copy runs only on a CPU with its features.
    let flops = unsafe {
        if is_x86_feature_detected!("avx512f") {
            avx512(iters)
        } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            avx2(iters)
        } else {
            return 0.0;
        }
    };
    flops as f64 / t.elapsed().as_secs_f64() / 1e9
}

#[cfg(not(target_arch = "x86_64"))]
fn rate(_: usize) -> f64 {
    0.0
}

/// The same for the reduced-precision dot products the int8 and bf16 kernels use, on
/// registers, 24 independent accumulators: `vpdpbusd` (4 u8 x i8 products per i32 lane) and
/// `vdpbf16ps` (2 bf16 products per f32 lane). In multiply-adds counted as two operations, as
/// f32's; 0 where the CPU lacks the instruction.
#[cfg(target_arch = "x86_64")]
fn dot_rates(iters: usize) -> (f64, f64) {
    use std::arch::x86_64::*;
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn vnni(iters: usize) -> usize {
        let mut c = [_mm512_set1_epi32(black_box(1)); 24];
        let a = _mm512_set1_epi32(black_box(0x01020304));
        let b = _mm512_set1_epi32(black_box(0x01010101));
        for _ in 0..iters {
            for v in c.iter_mut() {
                *v = _mm512_dpbusd_epi32(*v, a, b);
            }
        }
        black_box(c);
        iters * 24 * 64 * 2
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn bf16(iters: usize) -> usize {
        let mut c = [_mm512_set1_ps(black_box(0.5)); 24];
        let a = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.999), _mm512_set1_ps(0.5));
        let b = _mm512_cvtne2ps_pbh(_mm512_set1_ps(0.001), _mm512_set1_ps(0.25));
        for _ in 0..iters {
            for v in c.iter_mut() {
                *v = _mm512_dpbf16_ps(*v, a, b);
            }
        }
        black_box(c);
        iters * 24 * 32 * 2
    }
    let time = |f: &dyn Fn() -> usize| {
        let t = Instant::now();
        let ops = f();
        ops as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    // SAFETY: each runs only on a CPU with its features.
    let i8 = if is_x86_feature_detected!("avx512vnni") {
        time(&|| unsafe { vnni(iters) })
    } else {
        0.0
    };
    let b16 = if is_x86_feature_detected!("avx512bf16") {
        time(&|| unsafe { bf16(iters) })
    } else {
        0.0
    };
    (i8, b16)
}

#[cfg(not(target_arch = "x86_64"))]
fn dot_rates(_: usize) -> (f64, f64) {
    (0.0, 0.0)
}

fn main() {
    let iters = 50_000_000;
    let one = (0..3).map(|_| rate(iters)).fold(0f64, f64::max);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let all: Vec<f64> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..cores).map(|_| s.spawn(|| rate(iters))).collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0.0)).collect()
    });
    println!(
        "f32 FMA peak: {one:.1} GFLOP/s on one core; with all {cores} cores busy: {}",
        all.iter()
            .map(|r| format!("{r:.1}"))
            .collect::<Vec<_>>()
            .join(" + ")
    );
    let (i8, b16) = (0..3)
        .map(|_| dot_rates(iters / 2))
        .fold((0f64, 0f64), |(a, b), (x, y)| (a.max(x), b.max(y)));
    println!(
        "int8 (vpdpbusd) peak: {i8:.1} GOP/s on one core; bf16 (vdpbf16ps) peak: {b16:.1} GFLOP/s \
         (0: not on this CPU)"
    );
}
