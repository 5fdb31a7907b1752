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
        let kp = k.next_multiple_of(2);
        let np = n.next_multiple_of(PANEL);
        let mut packed = vec![0u16; kp * np];
        for (t, row) in w.chunks_exact(n).enumerate() {
            let (g, r) = (t / 2, t % 2);
            for (j, &v) in row.iter().enumerate() {
                let (p, c) = (j / PANEL, j % PANEL);
                packed[p * kp * PANEL + g * 2 * PANEL + c * 2 + r] = to_bf16(v);
            }
        }
        Self {
            k,
            n,
            kp,
            packed,
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
        // asserted above.
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
        XB.set(xb);
    }
}

thread_local! {
    /// Per thread, reused from product to product: the activations rounded to bf16. Taken
    /// out while in use, so a nested call just allocates its own.
    static XB: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
}

/// One row to bfloat16, as `vcvtneps2bf16` rounds (to nearest even).
fn round_row(x: &[f32], out: &mut [u16]) {
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
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F/BW/VL/BF16; `out.len() >= x.len()`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn round_row(x: &[f32], out: &mut [u16]) {
        let n = x.len();
        assert!(out.len() >= n);
        unsafe {
            for i in (0..n).step_by(16) {
                let m: __mmask16 = if n - i >= 16 {
                    0xffff
                } else {
                    (1 << (n - i)) - 1
                };
                let v = _mm512_maskz_loadu_ps(m, x.as_ptr().add(i));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(out.as_mut_ptr().add(i) as *mut i16, m, h);
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
