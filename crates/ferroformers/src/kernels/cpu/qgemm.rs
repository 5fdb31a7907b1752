//! Prompt products over GGUF blocks in the int8 mode: integer GEMM with AVX-512 VNNI.
//!
//! Decoding multiplies one activation row by each weight row ([`super::vnni`],
//! [`super::blocks::dot_int_blocks`]); a prompt has tens to thousands of rows, and the same
//! weights serve all of them. Here a tile of [`PANEL`] weight rows is unpacked once into a
//! panel (32 rows x 4 inputs per 128 bytes, the layout `vpdpbusd` wants), and every prompt row
//! passes over it, chunk by chunk of inputs so that the panel's chunk stays in L1.
//!
//! Arithmetic: llama.cpp's. Activations are rounded to 8 bits per block exactly as decoding
//! rounds them ([`QuantizedRows`]: Q8_0/Q8_1 for the 32-value types, Q8_K for K-quants). Each
//! weight's small integer `q` (GGUF's value is `(d * sc) * q - dmin * mn`) is stored as
//! `q + 128` (unsigned, as `vpdpbusd` takes it), and each scale group's sum starts from
//! `-128 * sum(xq)`, so every group's integer sum is `sum(q * xq)` exactly. Per group of `G`
//! inputs (32, or 16 for Q6_K/Q3_K/Q2_K, whose scales change every 16), the sum is scaled by
//! the weight row's `d * sc` and the activation block's scale, and the minimum's term
//! `dmin * mn * dx * sum(xq)` taken off. The integer sums are the decoding kernels'; only the
//! f32 order of the scaled groups differs.
//!
//! CPUs without AVX-512 VNNI (or with `FERROFORMERS_NO_VNNI=1`) keep the dequantized `gemm`
//! tiles ([`super::quantized`]).

use candle_core::quantized::GgmlDType;

use super::blocks::{block_shape, QuantizedRows, Unpacked, GROUP};

/// Weight rows per panel.
pub const PANEL: usize = 32;
/// Inputs per chunk: a panel's slice of 512 inputs is 16 KiB, in L1 while the rows pass.
const CHUNK: usize = 512;

/// Whether the VNNI GEMM runs on this CPU.
pub fn available() -> bool {
    super::vnni::available()
}

/// Inputs per scale group for `dtype`: 32 where the scales change every 32 values (the
/// 32-value types, Q4_K, Q5_K), 16 for the other K-quants.
pub fn group_of(dtype: GgmlDType) -> usize {
    use GgmlDType as D;
    match dtype {
        D::Q6K | D::Q3K | D::Q2K => 16,
        _ => 32,
    }
}

/// Activation rows rounded to 8 bits as the decoding kernels round them, with per-group
/// terms laid out for the kernel.
pub struct Acts {
    k: usize,
    g: usize,
    rows: QuantizedRows,
    /// Per row and group: the activation block's scale.
    d: Vec<f32>,
    /// Per row and group: `-128 * sum(xq)` (where the integer sums start).
    off: Vec<i32>,
    /// Per row and group: `dx * sum(xq)` (Q8_1's f16 `s` for the 32-value types), the
    /// minimum's factor.
    s: Vec<f32>,
}

impl Acts {
    /// Round `m` rows of `k` values (`x` is `[m, k]`) for weights of type `dtype`.
    pub fn new(x: &[f32], k: usize, dtype: GgmlDType) -> Self {
        let (sb, _) = block_shape(dtype).expect("a GGUF block type");
        let g = group_of(dtype);
        let rows = QuantizedRows::quantize(x, k, sb);
        let groups = x.len() / g;
        let (mut d, mut off, mut s) = (vec![0f32; groups], vec![0i32; groups], vec![0f32; groups]);
        for b in 0..groups {
            let sum: i32 = rows.gsum[b * g / GROUP..(b + 1) * g / GROUP].iter().sum();
            let blk = b * g / sb;
            d[b] = rows.d[blk];
            off[b] = -128 * sum;
            s[b] = if sb == 32 {
                rows.s[blk]
            } else {
                rows.d[blk] * sum as f32
            };
        }
        Acts {
            k,
            g,
            rows,
            d,
            off,
            s,
        }
    }
}

/// One tile of up to [`PANEL`] weight rows, unpacked for the kernel (buffers reused from tile
/// to tile).
#[derive(Default)]
pub struct Panel {
    k: usize,
    g: usize,
    has_min: bool,
    rows: usize,
    /// Per group of 4 inputs: 32 rows x 4 bytes `q + 128` (rows 0..16 in the first 64 bytes).
    u: Vec<u8>,
    /// Per scale group: 32 rows' `d * sc`.
    ws: Vec<f32>,
    /// Per scale group: 32 rows' `dmin * mn`.
    wm: Vec<f32>,
    unpacked: Unpacked,
}

impl Panel {
    /// Unpack `rows.len()` (at most [`PANEL`]) weight rows of `dtype`, `k` inputs each.
    pub fn pack(&mut self, dtype: GgmlDType, rows: &[&[u8]], k: usize) {
        assert!(rows.len() <= PANEL, "a panel holds {PANEL} rows");
        let g = group_of(dtype);
        let groups = k / g;
        self.k = k;
        self.g = g;
        self.rows = rows.len();
        // Rows past `rows.len()` keep whatever an earlier tile left: finite values whose sums
        // the kernel computes but never stores.
        self.u.resize(k / 4 * 4 * PANEL, 128);
        self.ws.resize(groups * PANEL, 0.0);
        self.wm.resize(groups * PANEL, 0.0);
        for (j, row) in rows.iter().enumerate() {
            let u = &mut self.unpacked;
            u.unpack(dtype, row, k);
            let at = (j / 16) * 64 + (j % 16) * 4;
            let quads = k / 4;
            assert!(u.q.len() >= k && self.u.len() >= quads * 4 * PANEL);
            let (src, dst) = (u.q.as_ptr() as *const u32, self.u.as_mut_ptr());
            // Four values at a time, each `q + 128` (the sign bit flipped).
            for t in 0..quads {
                // SAFETY: t < k / 4 quads of q (k values) and of the panel (asserted above);
                // at + 4 <= 4 * PANEL.
                unsafe {
                    let v = src.add(t).read_unaligned() ^ 0x8080_8080;
                    (dst.add(t * 4 * PANEL + at) as *mut u32).write_unaligned(v);
                }
            }
            for b in 0..groups {
                let (s, gr) = (b * g / u.sb, b * g / GROUP);
                self.ws[b * PANEL + j] = u.d[s] * u.sc[gr] as f32;
                if u.has_min {
                    self.wm[b * PANEL + j] = u.dmin[s] * u.mn[gr] as f32;
                }
            }
        }
        self.has_min = self.unpacked.has_min && !rows.is_empty();
    }

    /// `out[i * ldo + j] = x_i . row_j` for every activation row `i` of `acts` and the panel's
    /// rows `j`.
    ///
    /// # Safety
    /// `out` must be valid for writes at `i * ldo + j` for `i < m`, `j <` the panel's rows,
    /// and no one else may write there meanwhile.
    pub unsafe fn product(&self, acts: &Acts, out: *mut f32, ldo: usize) {
        assert!(available(), "qgemm: the CPU has no AVX-512 VNNI");
        assert!(acts.k == self.k && acts.g == self.g && self.rows <= ldo);
        #[cfg(target_arch = "x86_64")]
        {
            let m = acts.rows.q.len() / self.k;
            let per_chunk = CHUNK / self.g;
            let groups = self.k / self.g;
            for c0 in (0..groups).step_by(per_chunk) {
                let c1 = (c0 + per_chunk).min(groups);
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(x86::MR);
                    // SAFETY: the CPU has the features (asserted above); rows i..i + r of acts
                    // and out exist; groups c0..c1 lie in the panel and acts.
                    unsafe {
                        match (r, self.g, self.has_min) {
                            (4, 32, false) => {
                                x86::rows::<4, 32, false>(self, acts, i, c0, c1, out, ldo)
                            }
                            (4, 32, true) => {
                                x86::rows::<4, 32, true>(self, acts, i, c0, c1, out, ldo)
                            }
                            (4, _, false) => {
                                x86::rows::<4, 16, false>(self, acts, i, c0, c1, out, ldo)
                            }
                            (4, _, true) => {
                                x86::rows::<4, 16, true>(self, acts, i, c0, c1, out, ldo)
                            }
                            (_, 32, false) => {
                                x86::rows::<1, 32, false>(self, acts, i, c0, c1, out, ldo)
                            }
                            (_, 32, true) => {
                                x86::rows::<1, 32, true>(self, acts, i, c0, c1, out, ldo)
                            }
                            (_, _, false) => {
                                x86::rows::<1, 16, false>(self, acts, i, c0, c1, out, ldo)
                            }
                            (_, _, true) => {
                                x86::rows::<1, 16, true>(self, acts, i, c0, c1, out, ldo)
                            }
                        }
                    }
                    i += if r == x86::MR { r } else { 1 };
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (acts, out, ldo);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Acts, Panel, PANEL};
    use std::arch::x86_64::*;

    /// Activation rows per kernel call.
    pub const MR: usize = 4;

    /// Rows `i..i + R` of `acts` times the panel over scale groups `c0..c1`; the first chunk
    /// (`c0 == 0`) writes `out`, later ones add to it.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub unsafe fn rows<const R: usize, const G: usize, const MIN: bool>(
        p: &Panel,
        acts: &Acts,
        i: usize,
        c0: usize,
        c1: usize,
        out: *mut f32,
        ldo: usize,
    ) {
        let k = p.k;
        let groups = k / G;
        let (m0, m1) = crate::kernels::cpu::panels::x86::col_masks(p.rows);
        let up = p.u.as_ptr();
        let (wsp, wmp) = (p.ws.as_ptr(), p.wm.as_ptr());
        let xq: [*const i8; R] = std::array::from_fn(|r| acts.rows.q.as_ptr().add((i + r) * k));
        let xd: [*const f32; R] = std::array::from_fn(|r| acts.d.as_ptr().add((i + r) * groups));
        let xo: [*const i32; R] = std::array::from_fn(|r| acts.off.as_ptr().add((i + r) * groups));
        let xs: [*const f32; R] = std::array::from_fn(|r| acts.s.as_ptr().add((i + r) * groups));
        let op: [*mut f32; R] = std::array::from_fn(|r| out.add((i + r) * ldo));
        let mut f = [[_mm512_setzero_ps(); 2]; R];
        if c0 > 0 {
            for r in 0..R {
                f[r][0] = _mm512_maskz_loadu_ps(m0, op[r]);
                f[r][1] = _mm512_maskz_loadu_ps(m1, op[r].add(16));
            }
        }
        for b in c0..c1 {
            let mut acc = [[_mm512_setzero_si512(); 2]; R];
            for r in 0..R {
                let o = _mm512_set1_epi32(*xo[r].add(b));
                acc[r] = [o, o];
            }
            let ub = up.add(b * G / 4 * 4 * PANEL);
            for t in 0..G / 4 {
                let w0 = _mm512_loadu_si512(ub.add(t * 4 * PANEL) as *const __m512i);
                let w1 = _mm512_loadu_si512(ub.add(t * 4 * PANEL + 64) as *const __m512i);
                for r in 0..R {
                    let xv = _mm512_set1_epi32(
                        (xq[r].add(b * G + 4 * t) as *const i32).read_unaligned(),
                    );
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, xv);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, xv);
                }
            }
            let s0 = _mm512_loadu_ps(wsp.add(b * PANEL));
            let s1 = _mm512_loadu_ps(wsp.add(b * PANEL + 16));
            for r in 0..R {
                let dx = _mm512_set1_ps(*xd[r].add(b));
                f[r][0] = _mm512_fmadd_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][0]), s0),
                    dx,
                    f[r][0],
                );
                f[r][1] = _mm512_fmadd_ps(
                    _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), s1),
                    dx,
                    f[r][1],
                );
            }
            if MIN {
                let n0 = _mm512_loadu_ps(wmp.add(b * PANEL));
                let n1 = _mm512_loadu_ps(wmp.add(b * PANEL + 16));
                for r in 0..R {
                    let sx = _mm512_set1_ps(*xs[r].add(b));
                    f[r][0] = _mm512_fnmadd_ps(n0, sx, f[r][0]);
                    f[r][1] = _mm512_fnmadd_ps(n1, sx, f[r][1]);
                }
            }
        }
        for r in 0..R {
            _mm512_mask_storeu_ps(op[r], m0, f[r][0]);
            _mm512_mask_storeu_ps(op[r].add(16), m1, f[r][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::blocks::{dequantize, dot_int};
    use crate::kernels::cpu::test_values;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every block type, prompt lengths that leave 1-3 rows over, a partial panel, inputs
    /// over several chunks: the panel product equals the decoding kernels' integer dot
    /// (the same integer sums, in another f32 order) and the f64 product of the dequantized
    /// weights and rounded activations.
    #[test]
    fn panel_product_matches_integer_dots() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        use GgmlDType as D;
        let types = [
            D::Q4_0,
            D::Q4_1,
            D::Q5_0,
            D::Q5_1,
            D::Q8_0,
            D::Q2K,
            D::Q3K,
            D::Q4K,
            D::Q5K,
            D::Q6K,
        ];
        for (ti, dt) in types.into_iter().enumerate() {
            for (m, n, k) in [(7usize, 19usize, 256usize), (5, 32, 1280), (9, 3, 768)] {
                let w = test_values(n * k, 11 + ti as u64, 2.0);
                let x: Vec<f32> = test_values(m * k, 5 + ti as u64, 3.0)
                    .iter()
                    .map(|v| v + 0.2)
                    .collect();
                let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
                let bytes = QTensor::quantize(&wt, dt).unwrap().data().unwrap().to_vec();
                let rb = bytes.len() / n;
                let rows: Vec<&[u8]> = bytes.chunks_exact(rb).collect();
                let acts = Acts::new(&x, k, dt);
                let mut panel = Panel::default();
                let mut out = vec![f32::NAN; m * (n + 2)];
                for (p, tile) in rows.chunks(PANEL).enumerate() {
                    panel.pack(dt, tile, k);
                    // SAFETY: out is m x (n + 2); the tile's columns start at p * PANEL.
                    unsafe { panel.product(&acts, out.as_mut_ptr().add(p * PANEL), n + 2) };
                }
                let xr = acts.rows.dequantize();
                let mut u = Unpacked::default();
                let mut wrow = vec![0f32; k];
                for (j, row) in rows.iter().enumerate() {
                    u.unpack(dt, row, k);
                    dequantize(&u, &mut wrow);
                    for i in 0..m {
                        let got = out[i * (n + 2) + j];
                        let want = dot_int(&u, acts.rows.row(i));
                        let xi = &xr[i * k..(i + 1) * k];
                        let exact: f64 = wrow
                            .iter()
                            .zip(xi)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        let mag: f32 = wrow.iter().zip(xi).map(|(a, b)| (a * b).abs()).sum();
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + mag),
                            "{dt:?} m={m} k={k} ({i}, {j}): panel {got} vs row dot {want}"
                        );
                        // Q4_1/Q5_1 take the minimum's term from Q8_1's f16 `s`, as llama.cpp
                        // does: not the exact product of the rounded activations.
                        let tol = if matches!(dt, D::Q4_1 | D::Q5_1) {
                            1e-3
                        } else {
                            1e-5
                        };
                        assert!(
                            (got as f64 - exact).abs() <= tol * (1.0 + mag as f64),
                            "{dt:?} m={m} k={k} ({i}, {j}): panel {got} vs f64 {exact}"
                        );
                    }
                }
                for i in 0..m {
                    assert!(
                        out[i * (n + 2) + n].is_nan(),
                        "{dt:?}: wrote past the last row"
                    );
                }
            }
        }
    }
}
