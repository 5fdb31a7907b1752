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
//!
//! [`Weights`] keeps a matrix in f16 when every value is exactly an f16 (a checkpoint saved
//! in half precision and widened to f32, as Whisper's are): the streaming kernel widens each
//! weight as it reads it and runs the same f32 multiply-adds in the same order, so products
//! have the bits of the f32 matrix's while a step reads half the bytes.

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
    matmul_ref(x, rows, k, WeightsRef::F32(w), n, out, accumulate, par);
}

/// A weight matrix `[n, k]` (`[out, in]`) for [`Weights::matmul_into`]: f16 when every value
/// is exactly an f16 (half the bytes to stream, the same products), else f32.
#[derive(Debug, Clone)]
pub enum Weights {
    F32(Vec<f32>),
    F16(Vec<half::f16>),
}

/// A borrowed [`Weights`].
#[derive(Debug, Clone, Copy)]
pub enum WeightsRef<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl Weights {
    /// `w` as f16 when each value converts to an f16 and back to the same f32 bits, else as
    /// given.
    pub fn new(w: Vec<f32>) -> Self {
        match to_f16_exact(&w) {
            Some(h) => Weights::F16(h),
            None => Weights::F32(w),
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Weights::F32(w) => w.len(),
            Weights::F16(w) => w.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_f16(&self) -> bool {
        matches!(self, Weights::F16(_))
    }

    pub fn as_ref(&self) -> WeightsRef<'_> {
        match self {
            Weights::F32(w) => WeightsRef::F32(w),
            Weights::F16(w) => WeightsRef::F16(w),
        }
    }

    /// [`matmul_into`] with these weights (`[n, k]`): the same bits either way.
    #[allow(clippy::too_many_arguments)]
    pub fn matmul_into(
        &self,
        x: &[f32],
        rows: usize,
        k: usize,
        n: usize,
        out: &mut [f32],
        accumulate: bool,
        par: bool,
    ) {
        matmul_ref(x, rows, k, self.as_ref(), n, out, accumulate, par);
    }
}

/// `w`'s values as f16, or `None` when one of them is not exactly an f16 (or
/// `FERROFORMERS_NO_HALF=1` keeps weights in f32, for A/B runs).
pub fn to_f16_exact(w: &[f32]) -> Option<Vec<half::f16>> {
    use half::slice::HalfFloatSliceExt;
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if super::switch_once(&OFF, "FERROFORMERS_NO_HALF") {
        return None;
    }
    let mut h = vec![half::f16::ZERO; w.len()];
    h.as_mut_slice().convert_from_f32_slice(w);
    let mut back = vec![0f32; 4096.min(w.len())];
    for (hc, wc) in h.chunks(4096).zip(w.chunks(4096)) {
        let back = &mut back[..hc.len()];
        hc.convert_to_f32_slice(back);
        // Bit equality: -0.0 must stay -0.0.
        if back.iter().zip(wc).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return None;
        }
    }
    Some(h)
}

/// f16 values widened to f32 (exact).
pub fn f16_to_f32(h: &[half::f16]) -> Vec<f32> {
    use half::slice::HalfFloatSliceExt;
    let mut out = vec![0f32; h.len()];
    h.convert_to_f32_slice(&mut out);
    out
}

#[allow(clippy::too_many_arguments)]
fn matmul_ref(
    x: &[f32],
    rows: usize,
    k: usize,
    w: WeightsRef<'_>,
    n: usize,
    out: &mut [f32],
    accumulate: bool,
    par: bool,
) {
    let w_len = match w {
        WeightsRef::F32(w) => w.len(),
        WeightsRef::F16(w) => w.len(),
    };
    assert!(x.len() >= rows * k && w_len >= k * n && out.len() >= rows * n);
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
    match w {
        WeightsRef::F32(w) => gemm_into(x, rows, k, w, n, Layout::OutIn, out, accumulate, par),
        // Many rows are compute bound: widening the matrix once costs little beside them.
        WeightsRef::F16(h) => {
            let w = f16_to_f32(&h[..k * n]);
            gemm_into(x, rows, k, &w, n, Layout::OutIn, out, accumulate, par)
        }
    }
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
    w: WeightsRef<'_>,
    n: usize,
    out: *mut f32,
    j0: usize,
    j1: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        let x = x.as_ptr();
        return match w {
            WeightsRef::F32(w) => avx512::dots_rows(x, rows, k, w.as_ptr(), n, out, j0, j1),
            WeightsRef::F16(w) => avx512::dots_rows(x, rows, k, w.as_ptr(), n, out, j0, j1),
        };
    }
    match w {
        WeightsRef::F32(w) => few_rows_portable(x, rows, k, w, n, out, j0, j1),
        WeightsRef::F16(h) => few_rows_half_portable(x, rows, k, h, n, out, j0, j1),
    }
}

/// [`few_rows_portable`] for f16 weights: each weight row widened, then the f32 loop's dot
/// (the same bits).
///
/// # Safety
/// As [`few_rows`].
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows_half_portable(
    x: &[f32],
    rows: usize,
    k: usize,
    h: &[half::f16],
    n: usize,
    out: *mut f32,
    j0: usize,
    j1: usize,
) {
    use half::slice::HalfFloatSliceExt;
    let mut row = vec![0f32; k];
    for j in j0..j1 {
        h[j * k..(j + 1) * k].convert_to_f32_slice(&mut row);
        for r in 0..rows {
            *out.add(r * n + j) += dot16(&x[r * k..(r + 1) * k], &row);
        }
    }
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

    /// A weight element the streaming kernel reads 16 at a time as f32 lanes.
    pub trait Elem: Copy {
        /// 16 values at `p` as f32.
        ///
        /// # Safety
        /// AVX-512F present; 16 values readable at `p`.
        unsafe fn load16(p: *const Self) -> __m512;
        /// The first `tail` (< 16) values at `p` as f32, zeros after.
        ///
        /// # Safety
        /// AVX-512F present; `tail` values readable at `p`.
        unsafe fn load_tail(p: *const Self, tail: usize) -> __m512;
    }

    impl Elem for f32 {
        #[inline(always)]
        unsafe fn load16(p: *const f32) -> __m512 {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn load_tail(p: *const f32, tail: usize) -> __m512 {
            _mm512_maskz_loadu_ps(((1u32 << tail) - 1) as u16, p)
        }
    }

    /// f16, widened exactly.
    impl Elem for half::f16 {
        #[inline(always)]
        unsafe fn load16(p: *const half::f16) -> __m512 {
            _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
        }
        #[inline(always)]
        unsafe fn load_tail(p: *const half::f16, tail: usize) -> __m512 {
            let mut buf = [half::f16::ZERO; 16];
            std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), tail);
            _mm512_cvtph_ps(_mm256_loadu_si256(buf.as_ptr() as *const __m256i))
        }
    }

    /// [`dots`] for `rows` (1..=6) input rows.
    ///
    /// # Safety
    /// As [`dots`].
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn dots_rows<E: Elem>(
        x: *const f32,
        rows: usize,
        k: usize,
        w: *const E,
        n: usize,
        out: *mut f32,
        j0: usize,
        j1: usize,
    ) {
        match rows {
            1 => dots::<1, E>(x, k, w, n, out, j0, j1),
            2 => dots::<2, E>(x, k, w, n, out, j0, j1),
            3 => dots::<3, E>(x, k, w, n, out, j0, j1),
            4 => dots::<4, E>(x, k, w, n, out, j0, j1),
            // 24 accumulators + 4 weight vectors + 1 input: within the 32 registers.
            5 => dots::<5, E>(x, k, w, n, out, j0, j1),
            _ => dots::<6, E>(x, k, w, n, out, j0, j1),
        }
    }

    /// How many groups of four weight rows ahead [`dots`] fetches. Whisper tiny.en's f16
    /// projection (40 MB, read once per decoding step) made the kernel wait on memory: the
    /// 50.6 s clip with timestamps took 2.03 s at beam 5 without it and 1.45-1.68 s with 1, 2
    /// or 4 groups ahead; greedy 1.95-2.12 s against 1.61-1.74 s (AMD EPYC Zen 4, 2 threads,
    /// alternating).
    const PF_GROUPS: usize = 2;

    /// `M` input rows against `w`'s rows `j0..j1`, four at a time (`4 * M` accumulators over
    /// `k` in 16-lane steps, a zero-padded step for the rest), then one horizontal sum each.
    /// f16 weights are widened as they are read: the multiply-adds are the f32 matrix's.
    ///
    /// # Safety
    /// AVX-512F present; `x` holds `M * k`, `w` `n * k`, `out` `M * n` values; `j1 <= n`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn dots<const M: usize, E: Elem>(
        x: *const f32,
        k: usize,
        w: *const E,
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
            // The weights stream from memory: each 16-value step fetches its share of the
            // four rows PF_GROUPS groups ahead (a group's rows are contiguous).
            let line = std::mem::size_of::<E>();
            let ahead = (w.add(j * k) as *const i8).wrapping_add(PF_GROUPS * 4 * k * line);
            let mut kk = 0;
            while kk < full {
                for l in 0..line {
                    let at = ahead.wrapping_add((kk / 16 * line + l) * 64);
                    _mm_prefetch::<_MM_HINT_T0>(at);
                }
                let wv = [
                    E::load16(wp[0].add(kk)),
                    E::load16(wp[1].add(kk)),
                    E::load16(wp[2].add(kk)),
                    E::load16(wp[3].add(kk)),
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
                        let wv = E::load_tail(wp[c].add(full), tail);
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
                let wv = E::load16(wp.add(kk));
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(r * k + kk)), wv, *a);
                }
                kk += 16;
            }
            if tail > 0 {
                let wv = E::load_tail(wp.add(full), tail);
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

    /// f16 weights give the f32 matrix's bits on every path (streaming kernel with and without
    /// a ragged tail, split or not, the gemm path past six rows), on the AVX-512 kernel and on
    /// the portable loop.
    #[test]
    fn f16_weights_give_the_f32_bits() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for (k, n) in [(37, 203), (384, 1100)] {
            // Values that are f16 numbers: multiples of 1/64 below 4.
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 7919) % 500) as f32 / 64.0 - 3.90625)
                .collect();
            let half = Weights::new(w.clone());
            assert!(half.is_f16());
            let Weights::F16(h) = &half else {
                unreachable!()
            };
            for rows in 1..=8 {
                let x: Vec<f32> = (0..rows * k)
                    .map(|i| ((i * 31) % 17) as f32 / 7.0 - 1.1)
                    .collect();
                for par in [false, true] {
                    let mut want = vec![0.5f32; rows * n];
                    let mut got = want.clone();
                    pool.install(|| {
                        matmul_into(&x, rows, k, &w, n, &mut want, true, par);
                        half.matmul_into(&x, rows, k, n, &mut got, true, par);
                    });
                    assert!(
                        want.iter()
                            .zip(&got)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{rows}x{k}x{n} par {par}"
                    );
                    if rows <= FEW_ROWS && !par {
                        // The portable loops: f32 and f16 the same bits too.
                        let mut a = vec![0f32; rows * n];
                        let mut b = a.clone();
                        let wide = f16_to_f32(h);
                        assert_eq!(wide, w);
                        unsafe {
                            few_rows_portable(&x, rows, k, &w, n, a.as_mut_ptr(), 0, n);
                            few_rows_half_portable(&x, rows, k, h, n, b.as_mut_ptr(), 0, n);
                        }
                        assert_eq!(a, b);
                    }
                }
            }
        }
    }

    #[test]
    fn f16_only_when_every_value_is_one() {
        assert!(Weights::new(vec![0.5, -2.0, 65504.0, -0.0]).is_f16());
        assert!(!Weights::new(vec![0.5, 0.1]).is_f16());
        assert!(!Weights::new(vec![1e6]).is_f16());
        // A subnormal f16 is exact; half of the smallest one is not.
        assert!(Weights::new(vec![2f32.powi(-24)]).is_f16());
        assert!(!Weights::new(vec![2f32.powi(-25)]).is_f16());
    }
}
