//! bf16 linear layers (`--dtype bf16` on CPU): weights rounded to bfloat16 at load,
//! activations rounded to bfloat16 before each product, products summed in f32 by AVX512-BF16's
//! `vdpbf16ps` (two bf16 pairs per f32 lane), on 6 rows x 32 columns per step.
//!
//! [`available`] says whether the CPU has the instructions (`FERROFORMERS_NO_BF16=1` or
//! `FERROFORMERS_NO_SIMD=1` say it does not); where it does not, callers keep f32 (the models
//! warn). The portable loop here does the same maths (the products of two bf16 are exact in
//! f32) in its own order, for tests and odd callers.
//!
//! Packed weight layout: panels of 32 columns; in each, for every pair of inputs, 32
//! columns x 2 values (the first 64 bytes hold columns 0..16), so one 512-bit load is 16
//! columns x 2 inputs, as `vdpbf16ps` wants them. Inputs are padded to a multiple of 2 and
//! columns to a multiple of 32 with zeros.

use super::panels::{checked_par, drive, Call, Epi, MR, PANEL};

/// Inputs per pass over the weights (a panel's slice is 16 KiB).
const KC: usize = 256;

/// Whether the CPU has AVX-512 F/BW/VL with BF16, and neither environment switch turns the
/// kernels off.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            let off = super::switch_on;
            !off("FERROFORMERS_NO_SIMD")
                && !off("FERROFORMERS_NO_BF16")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `x` rounded to bfloat16 (to nearest, ties to even; NaN stays NaN).
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    if x.is_nan() {
        return ((b >> 16) | 0x40) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// A weight matrix `W` (`x @ W`, `k` inputs, `n` outputs) in bfloat16, packed for the
/// kernels.
#[derive(Debug, Clone)]
pub struct Bf16Weights {
    k: usize,
    n: usize,
    /// `k` rounded up to a multiple of 2.
    kp: usize,
    packed: Vec<u16>,
    /// Ones (the shared epilogue scales its sums per column).
    ones: Vec<f32>,
}

impl Bf16Weights {
    /// Round `w`, `[k, n]` row-major (`[in, out]`), to bfloat16.
    pub fn from_in_out(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
        Self::from_rows(|t| &w[t * n..(t + 1) * n], k, n)
    }

    /// `W [k, n]` from its rows: `row(t)` holds input `t`'s `n` values (attention's values,
    /// key by key, for the weighted sum).
    pub fn from_rows<'a>(row: impl Fn(usize) -> &'a [f32], k: usize, n: usize) -> Self {
        let mut w = Self::zeros(k, n);
        let kp = w.kp;
        #[cfg(target_arch = "x86_64")]
        if available() {
            let zeros = vec![0f32; n];
            for g in 0..kp / 2 {
                let r0 = row(2 * g);
                let r1 = if 2 * g + 1 < k {
                    row(2 * g + 1)
                } else {
                    &zeros
                };
                assert!(r0.len() >= n && r1.len() >= n);
                // SAFETY: the CPU has the features (checked); rows of n values (asserted);
                // pair g of every panel lies in `packed` (kp * np values).
                unsafe { x86::pack_pair(r0.as_ptr(), r1.as_ptr(), n, kp, g, &mut w.packed) };
            }
            return w;
        }
        for t in 0..k {
            let r = row(t);
            assert!(r.len() >= n, "row {t} has fewer than {n} values");
            let (g, rr) = (t / 2, t % 2);
            for (j, &v) in r[..n].iter().enumerate() {
                let (p, c) = (j / PANEL, j % PANEL);
                w.packed[p * kp * PANEL + g * 2 * PANEL + c * 2 + rr] = to_bf16(v);
            }
        }
        w
    }

    /// `W [k, n]` from its columns: `col(j)` holds output `j`'s `k` values (attention's keys,
    /// for the scores `q . k_j`).
    pub fn from_columns<'a>(col: impl Fn(usize) -> &'a [f32], k: usize, n: usize) -> Self {
        let mut w = Self::zeros(k, n);
        let kp = w.kp;
        #[cfg(target_arch = "x86_64")]
        if available() {
            for j0 in (0..n).step_by(16) {
                let cols: Vec<&[f32]> = (j0..(j0 + 16).min(n)).map(&col).collect();
                assert!(cols.iter().all(|c| c.len() >= k));
                // SAFETY: the CPU has the features (checked); columns of k values (asserted);
                // columns j0.. of every pair lie in `packed`.
                unsafe { x86::pack_columns16(&cols, k, kp, j0, &mut w.packed) };
            }
            return w;
        }
        for j in 0..n {
            let c = col(j);
            assert!(c.len() >= k, "column {j} has fewer than {k} values");
            let (p, cc) = (j / PANEL, j % PANEL);
            for (t, &v) in c[..k].iter().enumerate() {
                w.packed[p * kp * PANEL + (t / 2) * 2 * PANEL + cc * 2 + t % 2] = to_bf16(v);
            }
        }
        w
    }

    fn zeros(k: usize, n: usize) -> Self {
        let kp = k.next_multiple_of(2);
        let np = n.next_multiple_of(PANEL);
        Self {
            k,
            n,
            kp,
            packed: vec![0u16; kp * np],
            ones: vec![1.0; np],
        }
    }

    #[cfg(test)]
    fn weight(&self, t: usize, j: usize) -> f32 {
        let (p, c) = (j / PANEL, j % PANEL);
        from_bf16(self.packed[p * self.kp * PANEL + (t / 2) * 2 * PANEL + c * 2 + t % 2])
    }

    /// `out [rows, n] = x [rows, k] @ W + bias (+ residual)`, `x` rounded to bfloat16 on the
    /// way. Needs [`available`]; `par` splits the work over rayon's threads.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_into(
        &self,
        x: &[f32],
        rows: usize,
        bias: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        par: bool,
    ) {
        let (k, n, kp) = (self.k, self.n, self.kp);
        let Some(par) = checked_par(x, rows, (k, n), bias, residual, out, par, 1 << 23) else {
            return;
        };
        // This thread's buffer from the last product (no fresh pages to fault in and zero);
        // every value of the first rows * kp is written below.
        let mut xb = XB.take();
        if xb.len() < rows * kp {
            xb.resize(rows * kp, 0);
        }
        for (xr, br) in x.chunks_exact(k).zip(xb.chunks_exact_mut(kp)).take(rows) {
            round_row(xr, &mut br[..k]);
            br[k..].fill(0);
        }
        self.run(&xb, rows, bias, residual, out, par);
        XB.set(xb);
    }

    /// Inputs per row as packed: `k` rounded up to a multiple of 2.
    pub fn padded_inputs(&self) -> usize {
        self.kp
    }

    /// `out [rows, n] = xb @ W + bias` for activations already in bfloat16: `xb` is
    /// `[rows, kp]` ([`Self::padded_inputs`]), each row's padding zero. On the calling thread.
    pub fn product_rounded(&self, xb: &[u16], rows: usize, bias: &[f32], out: &mut [f32]) {
        assert!(xb.len() >= rows * self.kp && out.len() >= rows * self.n && bias.len() == self.n);
        if rows > 0 && self.n > 0 {
            self.run(xb, rows, bias, None, out, false);
        }
    }

    /// The product over rounded activations `xb` `[rows, kp]`; shapes checked by the caller.
    fn run(
        &self,
        xb: &[u16],
        rows: usize,
        bias: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        par: bool,
    ) {
        let (n, kp) = (self.n, self.kp);
        let use_simd = available();
        let call = |c: Call<'_>| {
            let (t0, t1) = (c.chunk * KC, ((c.chunk + 1) * KC).min(kp));
            let (ra, mr, p) = (c.ra, c.mr, c.p);
            let a = &xb[ra * kp..(ra + mr) * kp];
            let panel = &self.packed[p * kp * PANEL..(p + 1) * kp * PANEL];
            if let Some(e) = &c.epi {
                e.check(mr);
            }
            assert!(c.tile.len() >= (mr - 1) * c.ld + PANEL && c.ld >= PANEL);
            #[cfg(target_arch = "x86_64")]
            if use_simd {
                let (a, b, t) = (a.as_ptr(), panel.as_ptr(), c.tile.as_mut_ptr());
                let g = (t0 / 2, t1 / 2);
                // SAFETY: the CPU has the features (checked); lengths asserted above; `drive`
                // hands each call its own rows and columns of out.
                unsafe { x86::panel_rows(a, mr, kp, b, g, t, c.ld, c.epi.as_ref()) }
                return;
            }
            portable(a, mr, kp, panel, (t0, t1), c.tile, c.ld, c.epi.as_ref());
        };
        let chunks = kp.div_ceil(KC);
        // SAFETY: the kernels write through `epi` only their call's rows and columns; sizes
        // asserted by the callers.
        unsafe {
            drive(
                rows,
                n,
                chunks,
                (&self.ones, bias, residual),
                out,
                par,
                &call,
            )
        };
    }
}

thread_local! {
    /// Per thread, reused from product to product: the activations rounded to bf16. Taken
    /// out while in use, so a nested call just allocates its own.
    static XB: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One row to bfloat16, as `vcvtneps2bf16` rounds (to nearest even).
pub fn round_row(x: &[f32], out: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the features (checked).
        unsafe { x86::round_row(x, out) };
        return;
    }
    for (o, &v) in out.iter_mut().zip(x) {
        *o = to_bf16(v);
    }
}

/// The plain loop: `tile (+)= a @ panel` over inputs `t0..t1`, then the epilogue.
#[allow(clippy::too_many_arguments)]
fn portable(
    a: &[u16],
    mr: usize,
    kp: usize,
    panel: &[u16],
    (t0, t1): (usize, usize),
    tile: &mut [f32],
    ld: usize,
    epi: Option<&Epi<'_>>,
) {
    for r in 0..mr {
        let acc = &mut tile[r * ld..r * ld + PANEL];
        if t0 == 0 {
            acc.fill(0.0);
        }
        for t in (t0..t1).step_by(2) {
            let (x0, x1) = (from_bf16(a[r * kp + t]), from_bf16(a[r * kp + t + 1]));
            let w = &panel[(t / 2) * 2 * PANEL..(t / 2 + 1) * 2 * PANEL];
            for c in 0..PANEL {
                acc[c] += x1 * from_bf16(w[c * 2 + 1]);
                acc[c] += x0 * from_bf16(w[c * 2]);
            }
        }
        if let Some(e) = &epi {
            let cols = e.sw.len();
            // SAFETY: `drive` hands each call its own rows and columns of out.
            let o = unsafe { std::slice::from_raw_parts_mut(e.out.add(r * e.ld), cols) };
            for j in 0..cols {
                let v = acc[j] * e.sw[j] + e.bias[j];
                o[j] = match e.res {
                    Some(res) => v + res[r * e.ld + j],
                    None => v,
                };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::panels::by_rows;
    use super::super::panels::x86::{finish, load_sums};
    use super::{Epi, MR, PANEL};
    use crate::kernels::cpu::simd::x86::{lanes, transpose16};
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F/BW/VL/BF16; `out.len() >= x.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn round_row(x: &[f32], out: &mut [u16]) {
        let n = x.len();
        assert!(out.len() >= n);
        unsafe {
            for i in (0..n).step_by(16) {
                let m = lanes(n - i);
                let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(out.as_mut_ptr().add(i) as *mut i16, m, h);
            }
        }
    }

    /// Inputs `2g` and `2g + 1` (rows `r0`, `r1` of `n` values) of every panel, rounded to
    /// bfloat16: each column's pair as one 32-bit word (`r0`'s value in the low half).
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/BF16; `r0`, `r1` hold `n` values; `packed` is `kp * n` rounded up to
    /// panels, `2g < kp`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pack_pair(
        r0: *const f32,
        r1: *const f32,
        n: usize,
        kp: usize,
        g: usize,
        packed: &mut [u16],
    ) {
        let words = packed.as_mut_ptr() as *mut u32;
        assert!(packed.len() >= kp * n.next_multiple_of(PANEL) && 2 * g < kp);
        for j in (0..n).step_by(16) {
            let m = lanes(n - j);
            unsafe {
                let lo: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, r0.add(j))));
                let hi: __m256i =
                    std::mem::transmute(_mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, r1.add(j))));
                let pair = _mm512_or_si512(
                    _mm512_cvtepu16_epi32(lo),
                    _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(hi)),
                );
                let (p, c) = (j / PANEL, j % PANEL);
                let at = (p * kp * PANEL) / 2 + g * PANEL + c;
                _mm512_mask_storeu_epi32(words.add(at) as *mut i32, m, pair);
            }
        }
    }

    /// Columns `j0 .. j0 + cols.len()` (at most 16, `j0` a multiple of 16; column `c` holds
    /// `k` values) rounded to bfloat16 and packed: each pair of inputs as one 32-bit word,
    /// sixteen pairs of sixteen columns transposed at a time.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/BF16; every column holds `k` values; `packed` is `kp * n` rounded up
    /// to panels with `j0 + cols.len() <= n`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn pack_columns16(
        cols: &[&[f32]],
        k: usize,
        kp: usize,
        j0: usize,
        packed: &mut [u16],
    ) {
        assert!(cols.len() <= 16 && j0.is_multiple_of(16));
        assert!(packed.len() >= kp * (j0 + cols.len()).next_multiple_of(PANEL));
        let words = packed.as_mut_ptr() as *mut u32;
        let (p, c0) = (j0 / PANEL, j0 % PANEL);
        let pairs = kp / 2;
        for g0 in (0..pairs).step_by(16) {
            let t0 = 2 * g0;
            let (m0, m1) = (
                lanes(k.saturating_sub(t0)),
                lanes(k.saturating_sub(t0 + 16)),
            );
            let mut r = [_mm512_setzero_ps(); 16];
            for (c, col) in cols.iter().enumerate() {
                unsafe {
                    let lo = _mm512_maskz_loadu_ps(m0, col.as_ptr().add(t0));
                    let hi = _mm512_maskz_loadu_ps(m1, col.as_ptr().add((t0 + 16).min(k)));
                    // 32 values as bf16, the first 16 in the low half: word i is pair
                    // t0 + 2i, t0 + 2i + 1.
                    r[c] = std::mem::transmute::<__m512bh, __m512>(_mm512_cvtne2ps_pbh(hi, lo));
                }
            }
            // SAFETY: AVX-512F (this function's features).
            unsafe { transpose16(&mut r) };
            let cm = lanes(cols.len());
            for (i, v) in r.iter().enumerate().take(pairs - g0) {
                let at = (p * kp * PANEL) / 2 + (g0 + i) * PANEL + c0;
                unsafe { _mm512_mask_storeu_ps(words.add(at) as *mut f32, cm, *v) };
            }
        }
    }

    /// [`panel`] over `mr` rows, twice [`MR`] at a time, then [`MR`] at a time.
    ///
    /// # Safety
    /// As [`panel`], for `mr` rows; `epi` checked for `mr` rows.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn panel_rows(
        a: *const u16,
        mr: usize,
        kp: usize,
        b: *const u16,
        g: (usize, usize),
        c: *mut f32,
        ld: usize,
        epi: Option<&Epi<'_>>,
    ) {
        let mut r0 = 0;
        while r0 < mr {
            // Twelve rows per pass where there are that many: 24 sums in flight hide
            // `vdpbf16ps`'s latency, where 12 (six rows) left it at ~85% of its peak.
            let m = if mr - r0 >= 2 * MR {
                2 * MR
            } else {
                MR.min(mr - r0)
            };
            let e = epi.map(|e| e.rows_from(r0));
            // Only the first rows' pass asks for the next call's weights: the others would ask
            // again for lines already on their way, on the load ports the products need.
            let ahead = r0 == 0;
            // SAFETY: the caller's contract, for rows r0..r0 + m.
            unsafe {
                let (a, c) = (a.add(r0 * kp), c.add(r0 * ld));
                if m == 2 * MR {
                    panel::<{ 2 * MR }>(a, kp, b, g, c, ld, e.as_ref(), ahead)
                } else {
                    by_rows!(m, panel, (a, kp, b, g, c, ld, e.as_ref(), ahead))
                }
            };
            r0 += m;
        }
    }

    /// `c [R, 32] (row stride ld) += a [R, kp] @ panel` over input pairs `g0..g1` with
    /// `vdpbf16ps`; from pair 0 the sums start at zero; with `epi` the sums go to its `out`.
    ///
    /// # Safety
    /// AVX-512 F/BF16; `a` holds `R * kp` values, `b` `kp * 32`, `c` `(R - 1) * ld + 32`;
    /// `epi`'s `out` is the call's own. `ahead`: prefetch the next call's weights meanwhile.
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn panel<const R: usize>(
        a: *const u16,
        kp: usize,
        b: *const u16,
        (g0, g1): (usize, usize),
        c: *mut f32,
        ld: usize,
        epi: Option<&Epi<'_>>,
        ahead: bool,
    ) {
        debug_assert!(R <= 2 * MR);
        unsafe {
            let mut fa = load_sums::<R>(c, ld, g0 > 0);
            for g in g0..g1 {
                // Weights stream from memory, each chunk on its first rows' pass: while this
                // one runs, ask for the next call's lines. In `drive`'s order (a panel's
                // chunks, then the next panel's) they are the ones right after this chunk's.
                // Prefetches never fault.
                if ahead {
                    let next = b.wrapping_add((g + (g1 - g0)) * 2 * PANEL) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(next);
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(64));
                }
                let w0: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(g * 2 * PANEL) as *const _));
                let w1: __m512bh =
                    std::mem::transmute(_mm512_loadu_si512(b.add(g * 2 * PANEL + 32) as *const _));
                for (r, fa) in fa.iter_mut().enumerate() {
                    let xv = (a.add(r * kp + g * 2) as *const i32).read_unaligned();
                    let xv: __m512bh = std::mem::transmute(_mm512_set1_epi32(xv));
                    fa[0] = _mm512_dpbf16_ps(fa[0], xv, w0);
                    fa[1] = _mm512_dpbf16_ps(fa[1], xv, w1);
                }
            }
            finish(&fa, c, ld, epi, false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::test_values as values;

    #[test]
    fn rounding_to_bf16() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        assert_eq!(from_bf16(to_bf16(1.0)), 1.0);
        // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        let mut v = vec![0u16; 37];
        let x = values(37, 4, 10.0);
        round_row(&x, &mut v);
        for (h, &x) in v.iter().zip(&x) {
            assert_eq!(*h, to_bf16(x), "{x}");
        }
    }

    /// Packing from rows, from columns and from `[in, out]` puts every weight, rounded as
    /// [`to_bf16`] rounds, where [`Bf16Weights::weight`] reads it, with zeros in the padding,
    /// on odd shapes (the AVX-512 packers' ragged ends).
    #[test]
    fn packing_from_rows_and_columns() {
        for (k, n) in [
            (1, 1),
            (2, 32),
            (7, 5),
            (33, 70),
            (64, 512),
            (65, 17),
            (300, 96),
        ] {
            let wf = values(k * n, 3 + k as u64, 3.0);
            let t: Vec<f32> = (0..n * k).map(|i| wf[(i % k) * n + i / k]).collect();
            let packs = [
                Bf16Weights::from_in_out(&wf, k, n),
                Bf16Weights::from_rows(|r| &wf[r * n..(r + 1) * n], k, n),
                Bf16Weights::from_columns(|c| &t[c * k..(c + 1) * k], k, n),
            ];
            for w in &packs {
                let nonzero = w.packed.iter().filter(|&&h| h != 0).count();
                let mut want_nonzero = 0;
                for r in 0..k {
                    for j in 0..n {
                        let h = to_bf16(wf[r * n + j]);
                        assert_eq!(
                            w.weight(r, j).to_bits(),
                            from_bf16(h).to_bits(),
                            "{k}x{n} [{r},{j}]"
                        );
                        want_nonzero += (h != 0) as usize;
                    }
                }
                assert_eq!(nonzero, want_nonzero, "{k}x{n}: padding is not zero");
            }
        }
    }

    /// The kernels against the plain reference (bf16-rounded inputs and weights, products
    /// summed in f64), on odd shapes; every chunking and the residual path.
    #[test]
    fn kernels_match_the_reference_on_odd_shapes() {
        for (rows, k, n) in [
            (1, 2, 32),
            (3, 7, 5),
            (9, 33, 70),
            (13, 300, 96),
            (50, 600, 40),
            (500, 300, 70),
        ] {
            let wf = values(k * n, 1 + k as u64, 0.2);
            let w = Bf16Weights::from_in_out(&wf, k, n);
            let x = values(rows * k, 7 + rows as u64, 4.0);
            let bias = values(n, 3, 1.0);
            let res = values(rows * n, 5, 1.0);
            for par in [false, true] {
                let mut out = vec![f32::NAN; rows * n];
                w.linear_into(&x, rows, &bias, Some(&res), &mut out, par);
                for r in 0..rows {
                    for j in 0..n {
                        let mut want = 0f64;
                        let mut mag = 0f64;
                        for t in 0..k {
                            let p = from_bf16(to_bf16(x[r * k + t])) as f64 * w.weight(t, j) as f64;
                            want += p;
                            mag += p.abs();
                        }
                        let want = want + bias[j] as f64 + res[r * n + j] as f64;
                        let got = out[r * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (mag + 1.0),
                            "rows={rows} k={k} n={n} par={par} [{r},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// `FERROFORMERS_NO_BF16=1` turns the kernels off (the portable loop still computes the
    /// same products): the test runs itself again in a child process with the variable set.
    #[test]
    fn no_bf16_variable_turns_the_kernels_off() {
        if crate::kernels::cpu::switch_on("FERROFORMERS_NO_BF16") {
            assert!(!available());
            kernels_match_the_reference_on_odd_shapes();
            packing_from_rows_and_columns();
            println!("bf16 kernels off, portable loop checked");
            return;
        }
        crate::kernels::cpu::rerun_with(
            "kernels::cpu::bf16::tests::no_bf16_variable_turns_the_kernels_off",
            "FERROFORMERS_NO_BF16",
            "portable loop checked",
        );
    }

    #[test]
    fn bf16_product_is_close_to_f32() {
        let (rows, k, n) = (5, 256, 48);
        let wf = values(k * n, 11, 0.1);
        let x = values(rows * k, 12, 2.0);
        let w = Bf16Weights::from_in_out(&wf, k, n);
        let mut out = vec![0f32; rows * n];
        w.linear_into(&x, rows, &vec![0f32; n], None, &mut out, false);
        let (mut num, mut den) = (0f32, 0f32);
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|t| x[r * k + t] * wf[t * n + j]).sum();
                num += (exact - out[r * n + j]).powi(2);
                den += exact * exact;
            }
        }
        assert!(
            (num / den).sqrt() < 0.01,
            "relative error {}",
            (num / den).sqrt()
        );
    }
}
