//! `out (+)= x @ W^T` over plain f32 buffers for the CPU fast paths, with `W` in Hugging Face's
//! `[out, in]` layout (so checkpoints load without a transpose, and q/k/v or gate/up stack by
//! appending rows).
//!
//! Up to 6 rows (a decoding step, a few beams) take a kernel that streams `W` once, row after
//! row, in memory order, dotting each row with every input: decoding is bound by reading the
//! weights, and a sequential stream is what the hardware prefetchers read fastest. More rows
//! go to the `gemm` crate, which packs `W` and is compute bound.
//!
//! [`gemm_into`] also takes `W^T` (`[in, out]`, [`Layout::InOut`]), and [`linear`] /
//! [`linear_into`] add a bias and a residual on top of it (the encoder stack's products).

use gemm::Parallelism;

use super::simd::{dispatch, dot16};
use super::threads::{par_tasks, SendPtr};

/// At most this many rows take the streaming kernel.
const FEW_ROWS: usize = 6;

/// `out [rows, n] += x [rows, k] @ w^T` with `w` `[n, k]`, or `=` when `accumulate` is false.
/// `par` splits the work over rayon's threads when it is large enough to pay for that.
#[allow(clippy::too_many_arguments)]
pub fn matmul_into(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    par: bool,
) {
    assert!(x.len() >= rows * k && w.len() >= k * n && out.len() >= rows * n);
    if rows == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    if rows <= FEW_ROWS {
        if !accumulate {
            out[..rows * n].fill(0.0);
        }
        if par && threads > 1 && k * n >= 1 << 18 {
            // Ranges of whole output columns; each job writes its own.
            let per = n.div_ceil(threads * 2).next_multiple_of(16);
            let ptr = SendPtr(out.as_mut_ptr());
            par_tasks(n.div_ceil(per), |c| {
                let (j0, j1) = (c * per, ((c + 1) * per).min(n));
                let p = ptr;
                // SAFETY: columns j0..j1 of out are written by this job only; bounds asserted.
                unsafe { few_rows(x, rows, k, w, n, p.0, j0, j1) };
            });
        } else {
            // SAFETY: bounds asserted above.
            unsafe { few_rows(x, rows, k, w, n, out.as_mut_ptr(), 0, n) };
        }
        return;
    }
    gemm_into(x, rows, k, w, n, Layout::OutIn, out, accumulate, par);
}

/// How a weight matrix is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[out, in]`, row-major (Hugging Face checkpoints).
    OutIn,
    /// `[in, out]`, row-major (`W^T`, as `layers::Linear` keeps it).
    InOut,
}

/// `out [rows, n] += x [rows, k] @ W` (`=` when `accumulate` is false) through the `gemm`
/// crate, `W` being `k x n` stored as `layout` says; split over rayon's threads when `par` and
/// the product is large enough.
#[allow(clippy::too_many_arguments)]
pub fn gemm_into(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    layout: Layout,
    out: &mut [f32],
    accumulate: bool,
    par: bool,
) {
    assert!(x.len() >= rows * k && w.len() >= k * n && out.len() >= rows * n);
    let threads = rayon::current_num_threads();
    let (w_cs, w_rs) = match layout {
        Layout::OutIn => (k as isize, 1),
        Layout::InOut => (1, n as isize),
    };
    // Read-only inputs travel as the same Send wrapper as the output.
    let xp = SendPtr(x.as_ptr() as *mut f32);
    let wp = SendPtr(w.as_ptr() as *mut f32);
    let op = SendPtr(out.as_mut_ptr());
    // Columns j0..j1 of `out (+)= x @ W`, a serial product.
    let cols = |j0: usize, j1: usize| {
        let (xp, wp, op) = (xp, wp, op);
        let woff = match layout {
            Layout::OutIn => j0 * k,
            Layout::InOut => j0,
        };
        // SAFETY: x is rows x k and out rows x n, row-major; w holds k * n values, read as the
        // k x n right-hand side with the layout's strides (bounds asserted above); columns
        // j0..j1 of W and out belong to this call only.
        unsafe {
            gemm::gemm(
                rows,
                j1 - j0,
                k,
                op.0.add(j0),
                1,
                n as isize,
                accumulate,
                xp.0,
                1,
                k as isize,
                wp.0.add(woff),
                w_cs,
                w_rs,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
    };
    if par && threads > 1 && rows * n * k >= 1 << 18 && n >= 32 * threads {
        // One range of output columns per thread ([`par_tasks`]).
        let per = n.div_ceil(threads).next_multiple_of(16);
        par_tasks(n.div_ceil(per), |c| cols(c * per, ((c + 1) * per).min(n)));
    } else {
        cols(0, n);
    }
}

/// `x [rows, k] @ w^T` (`w` `[n, k]`) as a new buffer.
pub fn matmul(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, par: bool) -> Vec<f32> {
    let mut out = vec![0f32; rows * n];
    matmul_into(x, rows, k, w, n, &mut out, false, par);
    out
}

/// `out = x [rows, k] @ w [k, n] + bias (+ residual)`, `out` resized to `[rows, n]`; `w` is
/// `[in, out]` (`W^T`, as the encoder stack keeps it).
#[allow(clippy::too_many_arguments)]
pub fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    out: &mut Vec<f32>,
    par: bool,
) {
    out.resize(rows * bias.len(), 0.0);
    linear_into(x, rows, k, (w, bias), residual, out, par);
}

/// `out [rows, n] = x [rows, k] @ w [k, n] + bias (+ residual)`; bias and residual are the
/// matmul's starting value.
pub fn linear_into(
    x: &[f32],
    rows: usize,
    k: usize,
    (w, bias): (&[f32], &[f32]),
    residual: Option<&[f32]>,
    out: &mut [f32],
    par: bool,
) {
    let n = bias.len();
    debug_assert_eq!(w.len(), k * n);
    debug_assert_eq!(x.len(), rows * k);
    let out = &mut out[..rows * n];
    match residual {
        Some(r) => {
            for (orow, rrow) in out.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                for ((o, a), b) in orow.iter_mut().zip(rrow).zip(bias) {
                    *o = a + b;
                }
            }
        }
        None => {
            for orow in out.chunks_exact_mut(n) {
                orow.copy_from_slice(bias);
            }
        }
    }
    gemm_into(x, rows, k, w, n, Layout::InOut, out, true, par);
}

/// Columns `j0..j1` of `out += x @ w^T` for `rows <= FEW_ROWS`.
///
/// # Safety
/// `x` holds `rows * k`, `w` `n * k` and `out` `rows * n` values; `j0 <= j1 <= n`.
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: *mut f32,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let (x, w) = (x.as_ptr(), w.as_ptr());
        return match rows {
            1 => avx512::dots::<1>(x, k, w, n, out, j0, j1),
            2 => avx512::dots::<2>(x, k, w, n, out, j0, j1),
            3 => avx512::dots::<3>(x, k, w, n, out, j0, j1),
            4 => avx512::dots::<4>(x, k, w, n, out, j0, j1),
            // 24 accumulators + 4 weight vectors + 1 input: within the 32 registers.
            5 => avx512::dots::<5>(x, k, w, n, out, j0, j1),
            _ => avx512::dots::<6>(x, k, w, n, out, j0, j1),
        };
    }
    few_rows_portable(x, rows, k, w, n, out, j0, j1)
}

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn few_rows_generic(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    out: *mut f32,
    j0: usize,
    j1: usize,
) {
    for j in j0..j1 {
        let wr = &w[j * k..(j + 1) * k];
        for r in 0..rows {
            *out.add(r * n + j) += dot16(&x[r * k..(r + 1) * k], wr);
        }
    }
}

// The loop above for CPUs without AVX-512 (AVX2+FMA copy, or the baseline one).
dispatch!(unsafe fn few_rows_portable(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, out: *mut f32, j0: usize, j1: usize); via few_rows_generic);

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `M` input rows against `w`'s rows `j0..j1`, four at a time (`4 * M` accumulators over
    /// `k` in 16-lane steps, a masked step for the rest), then one horizontal sum each.
    ///
    /// # Safety
    /// AVX-512F present; `x` holds `M * k`, `w` `n * k`, `out` `M * n` values; `j1 <= n`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots<const M: usize>(
        x: *const f32,
        k: usize,
        w: *const f32,
        n: usize,
        out: *mut f32,
        j0: usize,
        j1: usize,
    ) {
        let full = k / 16 * 16;
        let tail = k - full;
        let mask: __mmask16 = ((1u32 << tail) - 1) as u16;
        let mut j = j0;
        while j + 4 <= j1 {
            let wp = [
                w.add(j * k),
                w.add((j + 1) * k),
                w.add((j + 2) * k),
                w.add((j + 3) * k),
            ];
            let mut acc = [[_mm512_setzero_ps(); 4]; M];
            let mut kk = 0;
            while kk < full {
                let wv = [
                    _mm512_loadu_ps(wp[0].add(kk)),
                    _mm512_loadu_ps(wp[1].add(kk)),
                    _mm512_loadu_ps(wp[2].add(kk)),
                    _mm512_loadu_ps(wp[3].add(kk)),
                ];
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_loadu_ps(x.add(r * k + kk));
                    for c in 0..4 {
                        a[c] = _mm512_fmadd_ps(xv, wv[c], a[c]);
                    }
                }
                kk += 16;
            }
            if tail > 0 {
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + full));
                    for c in 0..4 {
                        let wv = _mm512_maskz_loadu_ps(mask, wp[c].add(full));
                        a[c] = _mm512_fmadd_ps(xv, wv, a[c]);
                    }
                }
            }
            for (r, a) in acc.iter().enumerate() {
                for (c, v) in a.iter().enumerate() {
                    *out.add(r * n + j + c) += _mm512_reduce_add_ps(*v);
                }
            }
            j += 4;
        }
        while j < j1 {
            let wp = w.add(j * k);
            let mut acc = [_mm512_setzero_ps(); M];
            let mut kk = 0;
            while kk < full {
                let wv = _mm512_loadu_ps(wp.add(kk));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(r * k + kk)), wv, *a);
                }
                kk += 16;
            }
            if tail > 0 {
                let wv = _mm512_maskz_loadu_ps(mask, wp.add(full));
                for (r, a) in acc.iter_mut().enumerate() {
                    let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + full));
                    *a = _mm512_fmadd_ps(xv, wv, *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                *out.add(r * n + j) += _mm512_reduce_add_ps(*a);
            }
            j += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accumulates_or_overwrites() {
        let (rows, k, n) = (3, 5, 7);
        let x: Vec<f32> = (0..rows * k).map(|i| i as f32 * 0.5 - 2.0).collect();
        let w: Vec<f32> = (0..k * n).map(|i| (i % 11) as f32 - 5.0).collect();
        let mut want = vec![1f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                want[r * n + j] += (0..k).map(|kk| x[r * k + kk] * w[j * k + kk]).sum::<f32>();
            }
        }
        let mut acc = vec![1f32; rows * n];
        matmul_into(&x, rows, k, &w, n, &mut acc, true, false);
        assert_eq!(acc, want);
        let fresh = matmul(&x, rows, k, &w, n, false);
        let plain: Vec<f32> = want.iter().map(|v| v - 1.0).collect();
        assert_eq!(fresh, plain);
    }

    fn reference(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
        for r in 0..rows {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|kk| x[r * k + kk] as f64 * w[j * k + kk] as f64)
                    .sum();
                out[r * n + j] += s as f32;
            }
        }
    }

    /// Every row count (few-rows kernel, gemv, gemm), ragged column counts (the masked tail),
    /// accumulate or not, one thread or split over three.
    #[test]
    fn all_paths_match_a_plain_loop() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (k, n) in [(37, 203), (64, 4101)] {
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 7919) % 113) as f32 / 50.0 - 1.1)
                .collect();
            for rows in 1..=8 {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
                    .collect();
                let start: Vec<f32> = (0..rows * n).map(|i| (i % 5) as f32).collect();
                for (accumulate, par) in [(true, false), (false, false), (true, true)] {
                    let mut want = if accumulate {
                        start.clone()
                    } else {
                        vec![0.0; rows * n]
                    };
                    reference(&x, rows, k, &w, n, &mut want);
                    let mut got = start.clone();
                    pool.install(|| matmul_into(&x, rows, k, &w, n, &mut got, accumulate, par));
                    let d = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        d < 1e-3,
                        "{rows}x{k}x{n} accumulate {accumulate} par {par}: {d}"
                    );
                }
            }
        }
    }
}
