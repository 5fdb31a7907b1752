//! Dynamic int8 quantization of linear layers (`--quantize int8`), as ONNX Runtime's
//! `quantize_dynamic` and torch's dynamic quantization do, with finer scales:
//!
//! - weights: signed 8-bit, one scale per output column (`max |w| / 127`), made once at load
//!   ([`Int8Weights`]);
//! - activations: unsigned 8-bit with a zero point, one scale per row (token) and per block of
//!   [`BLOCK`] inputs, from the block's own range (`[min(x, 0), max(x, 0)]` over 255 steps),
//!   made at run time before each product. Per block rather than per row because a few hidden
//!   dimensions of BERT-family models carry values ten times the others: per row they take
//!   most of the 255 steps (mean cosine of MiniLM's embeddings against f32: 0.9988 per row,
//!   0.9993 per block of 128);
//! - the products: each block's sum exactly in i32 (`sum(xq * wq) - zp * sum(wq)`), scaled
//!   by the block's activation scale into an f32 sum, times the column's weight scale, plus
//!   bias (and residual).
//!
//! Kernels, picked at run time: AVX-512 VNNI (`vpdpbusd`: unsigned times signed bytes, fours
//! summed into i32 lanes, no saturation) on 6 rows x 32 columns per step, and a portable loop
//! over the same packed layout (compiled again for AVX2 / AVX-512F by `dispatch!`). Both do the
//! same integer sums and the same f32 operations in the same order (the block step is one fused
//! multiply-add), so they give identical results; `FERROFORMERS_NO_VNNI=1` forces the portable
//! one.
//!
//! Packed weight layout: panels of 32 columns; in each, for every group of 4 inputs,
//! 32 columns x 4 bytes (the first 64 bytes hold columns 0..16, the next 64 columns 16..32), so
//! one 512-bit load is 16 columns x 4 inputs, as `vpdpbusd` wants them. Inputs are padded to a
//! multiple of 4 and columns to a multiple of 32 with zero weights.

use super::panels::{checked_par, drive, Call, Epi, MR, PANEL};
use super::simd::dispatch;
use super::threads::par_tasks;

/// Inputs per activation scale.
pub const BLOCK: usize = 128;
// A block's column sums fit in 16 bits (the VNNI kernel's zero-point correction needs it).
const _: () = assert!(127 * BLOCK < i16::MAX as usize);
/// Blocks of inputs per pass over the weights (512 inputs: a panel's slice is 16 KiB).
const KC_BLOCKS: usize = 4;

/// A weight matrix `W` (`x @ W`, `k` inputs, `n` outputs) quantized to signed 8 bits per
/// output column and packed for the kernels.
#[derive(Debug, Clone)]
pub struct Int8Weights {
    k: usize,
    n: usize,
    /// `k` rounded up to a multiple of 4.
    kp: usize,
    packed: Vec<i8>,
    /// Per column (padded to a multiple of [`PANEL`]): the dequantization scale.
    scale: Vec<f32>,
    /// Per panel, per block of inputs, per column of the panel: the sum of the block's
    /// quantized weights (the zero points' correction).
    colsum: Vec<i32>,
}

dispatch!(fn round_weights(row: &[f32], inv: &[f32], q: &mut [i8]); via round_weights_generic);

/// `q = round(row * inv)`, clamped to ±127.
#[inline(always)]
fn round_weights_generic(row: &[f32], inv: &[f32], q: &mut [i8]) {
    for ((q, &v), &s) in q.iter_mut().zip(row).zip(inv) {
        *q = (v * s).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
}

/// Blocks of [`BLOCK`] inputs in `kp` (the last one may be shorter).
fn blocks_of(kp: usize) -> usize {
    kp.div_ceil(BLOCK)
}

impl Int8Weights {
    /// Quantize `w`, `[k, n]` row-major (`[in, out]`, `W^T` of a Hugging Face checkpoint).
    pub fn from_in_out(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
        let kp = k.next_multiple_of(4);
        let np = n.next_multiple_of(PANEL);
        let nb = blocks_of(kp);
        let mut amax = vec![0f32; n];
        for row in w.chunks_exact(n) {
            for (m, v) in amax.iter_mut().zip(row) {
                *m = m.max(v.abs());
            }
        }
        let mut scale = vec![0f32; np];
        let mut inv = vec![0f32; n];
        for j in 0..n {
            if amax[j] > 0.0 && amax[j].is_finite() {
                scale[j] = amax[j] / 127.0;
                inv[j] = 127.0 / amax[j];
            }
        }
        let mut packed = vec![0i8; kp * np];
        let mut colsum = vec![0i32; np * nb];
        let mut qrow = vec![0i8; n];
        for (t, row) in w.chunks_exact(n).enumerate() {
            let (g, r, b) = (t / 4, t % 4, t / BLOCK);
            round_weights(row, &inv, &mut qrow);
            for (j, &q) in qrow.iter().enumerate() {
                let (p, c) = (j / PANEL, j % PANEL);
                packed[p * kp * PANEL + g * 4 * PANEL + c * 4 + r] = q;
                colsum[(p * nb + b) * PANEL + c] += q as i32;
            }
        }
        Self {
            k,
            n,
            kp,
            packed,
            scale,
            colsum,
        }
    }

    /// [`Self::from_in_out`] of `w` given `[n, k]` row-major (`[out, in]`, a Hugging Face
    /// checkpoint's own layout, e.g. a tied embedding used as the output projection): the same
    /// bytes and scales, without a transposed copy; panels are filled in parallel.
    pub fn from_out_in(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {n} x {k}");
        let kp = k.next_multiple_of(4);
        let np = n.next_multiple_of(PANEL);
        let nb = blocks_of(kp);
        let mut scale = vec![0f32; np];
        let mut packed = vec![0i8; kp * np];
        let mut colsum = vec![0i32; np * nb];
        let panels = np / PANEL;
        let (pp, sp, cp) = (
            packed.as_mut_ptr() as usize,
            scale.as_mut_ptr() as usize,
            colsum.as_mut_ptr() as usize,
        );
        par_tasks(panels, |p| {
            // SAFETY: panel p's packed bytes, scales and column sums belong to this task.
            let (packed, scale, colsum) = unsafe {
                (
                    std::slice::from_raw_parts_mut((pp as *mut i8).add(p * kp * PANEL), kp * PANEL),
                    std::slice::from_raw_parts_mut((sp as *mut f32).add(p * PANEL), PANEL),
                    std::slice::from_raw_parts_mut(
                        (cp as *mut i32).add(p * nb * PANEL),
                        nb * PANEL,
                    ),
                )
            };
            let (mut q, mut invs) = (vec![0i8; k], vec![0f32; k]);
            for c in 0..PANEL {
                let j = p * PANEL + c;
                if j >= n {
                    break;
                }
                let row = &w[j * k..(j + 1) * k];
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                let inv = if amax > 0.0 && amax.is_finite() {
                    scale[c] = amax / 127.0;
                    127.0 / amax
                } else {
                    0.0
                };
                invs.fill(inv);
                round_weights(row, &invs, &mut q);
                for (g, quad) in q.chunks(4).enumerate() {
                    let at = g * 4 * PANEL + c * 4;
                    packed[at..at + quad.len()].copy_from_slice(quad);
                }
                for (b, blk) in q.chunks(BLOCK).enumerate() {
                    colsum[b * PANEL + c] = blk.iter().map(|&v| v as i32).sum();
                }
            }
        });
        Self {
            k,
            n,
            kp,
            packed,
            scale,
            colsum,
        }
    }

    /// Per output column, the dequantization scale (`max |w| / 127`); `n` values.
    pub fn scales(&self) -> &[f32] {
        &self.scale[..self.n]
    }

    /// The weights as f32 again (`[k, n]`), what the products multiply by.
    #[cfg(test)]
    fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.k * self.n];
        for t in 0..self.k {
            for j in 0..self.n {
                w[t * self.n + j] = self.weight(t, j) as f32 * self.scale[j];
            }
        }
        w
    }

    #[cfg(test)]
    fn weight(&self, t: usize, j: usize) -> i8 {
        let (p, c) = (j / PANEL, j % PANEL);
        self.packed[p * self.kp * PANEL + (t / 4) * 4 * PANEL + c * 4 + t % 4]
    }

    /// `out [rows, n] = x [rows, k] @ W + bias (+ residual)`, `x` quantized per row and block
    /// on the way. `par` splits the work over rayon's threads when it is large enough.
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
        self.linear_with(x, rows, bias, residual, out, par, Kernel::best());
    }

    #[allow(clippy::too_many_arguments)]
    fn linear_with(
        &self,
        x: &[f32],
        rows: usize,
        bias: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        par: bool,
        kernel: Kernel,
    ) {
        let (k, n, kp) = (self.k, self.n, self.kp);
        // Below ~8M products a split costs more than it saves (the kernels do ~30 per ns).
        let Some(par) = checked_par(x, rows, (k, n), bias, residual, out, par, 1 << 23) else {
            return;
        };
        let mut owned = ACTS.take();
        owned.fill(x, rows, k, kp, par && rows >= 64);
        let nb = blocks_of(kp);
        let acts = &owned;
        let call = |c: Call<'_>| {
            let (b0, b1) = (c.chunk * KC_BLOCKS, ((c.chunk + 1) * KC_BLOCKS).min(nb));
            let (ra, mr, p) = (c.ra, c.mr, c.p);
            // SAFETY: `drive` hands each call its own rows and columns of out.
            unsafe {
                kernel.run(
                    Rows {
                        q: &acts.q[ra * kp..(ra + mr) * kp],
                        scale: &acts.scale[ra * nb..(ra + mr) * nb],
                        zero: &acts.zero[ra * nb..(ra + mr) * nb],
                        mr,
                        kp,
                    },
                    (b0, b1),
                    &self.packed[p * kp * PANEL..(p + 1) * kp * PANEL],
                    &self.colsum[p * nb * PANEL..(p + 1) * nb * PANEL],
                    c.tile,
                    c.ld,
                    c.epi.as_ref(),
                )
            };
        };
        let chunks = nb.div_ceil(KC_BLOCKS);
        // SAFETY: the kernels write through `epi` only their call's rows and columns; sizes
        // asserted above.
        unsafe {
            drive(
                rows,
                n,
                chunks,
                (&self.scale, bias, residual),
                out,
                par,
                &call,
            )
        };
        ACTS.set(owned);
    }
}

thread_local! {
    /// Per thread, reused from product to product (no page faults on fresh allocations): the
    /// quantized activations of the products this thread calls. Taken out while in use, so a
    /// nested call just allocates its own.
    static ACTS: std::cell::Cell<QuantizedActs> = const {
        std::cell::Cell::new(QuantizedActs { q: Vec::new(), scale: Vec::new(), zero: Vec::new() })
    };
}

/// Activations quantized per row and block: `x ~ scale * (q - zero)`.
#[derive(Default)]
struct QuantizedActs {
    /// `[rows, kp]`, padding zero.
    q: Vec<u8>,
    /// `[rows, blocks]`.
    scale: Vec<f32>,
    zero: Vec<i32>,
}

impl QuantizedActs {
    /// Quantize `x` (`[rows, k]`) into `[rows, kp]` bytes, per row and block.
    fn fill(&mut self, x: &[f32], rows: usize, k: usize, kp: usize, par: bool) {
        let nb = blocks_of(kp);
        // Every byte of the first rows * kp is written below: no zeroing of reused space.
        if self.q.len() < rows * kp {
            self.q.resize(rows * kp, 0);
        }
        self.scale.resize(rows * nb, 0.0);
        self.zero.resize(rows * nb, 0);
        type RowParts<'a> = ((&'a [f32], &'a mut [u8]), (&'a mut [f32], &'a mut [i32]));
        #[cfg(target_arch = "x86_64")]
        let avx512 = super::vnni::available();
        let one = |((xr, qr), (sr, zr)): RowParts<'_>| {
            qr[k..].fill(0);
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: the CPU has AVX-512 F/BW/VL (checked); a row's k values, k bytes and
                // one scale and zero per block of BLOCK.
                unsafe { x86::quantize_row(xr, &mut qr[..k], sr, zr) };
                return;
            }
            for (b, (s, z)) in sr.iter_mut().zip(zr.iter_mut()).enumerate() {
                let (t0, t1) = (b * BLOCK, ((b + 1) * BLOCK).min(k));
                (*s, *z) = if t0 < t1 {
                    quantize_block(&xr[t0..t1], &mut qr[t0..t1])
                } else {
                    (0.0, 0)
                };
            }
        };
        let x = &x[..rows * k];
        let q = &mut self.q[..rows * kp];
        if par {
            // Runs of 16 rows per task; each row's bytes, scales and zeros are its task's.
            const RUN: usize = 16;
            let (qp, sp, zp) = (
                q.as_mut_ptr() as usize,
                self.scale.as_mut_ptr() as usize,
                self.zero.as_mut_ptr() as usize,
            );
            par_tasks(rows.div_ceil(RUN), |t| {
                for r in t * RUN..((t + 1) * RUN).min(rows) {
                    // SAFETY: row r (< rows) of q (rows * kp bytes), scale and zero (rows * nb
                    // each) belongs to this task only.
                    let parts = unsafe {
                        (
                            std::slice::from_raw_parts_mut((qp as *mut u8).add(r * kp), kp),
                            std::slice::from_raw_parts_mut((sp as *mut f32).add(r * nb), nb),
                            std::slice::from_raw_parts_mut((zp as *mut i32).add(r * nb), nb),
                        )
                    };
                    one(((&x[r * k..(r + 1) * k], parts.0), (parts.1, parts.2)));
                }
            });
        } else {
            x.chunks_exact(k)
                .zip(q.chunks_exact_mut(kp))
                .zip(
                    self.scale
                        .chunks_exact_mut(nb)
                        .zip(self.zero.chunks_exact_mut(nb)),
                )
                .for_each(one);
        }
    }
}

// One block of a row to `u8` with a zero point: returns `(scale, zero)`. Where the VNNI
// kernel runs, `x86::quantize_row` does the same operations 16 lanes at a time, a row at once.
dispatch!(fn quantize_block(x: &[f32], q: &mut [u8]) -> (f32, i32); via quantize_block_generic);

/// Returns `(scale, zero)` for a block's `[min(x, 0), max(x, 0)]`, or `None` when the block
/// is all zero (scale 0) or not finite (NaN scale).
#[inline(always)]
fn block_params(min: f32, max: f32) -> Result<(f32, f32, f32), f32> {
    let range = max - min;
    if !(range > 0.0 && range.is_finite()) {
        // All zero: any scale works. NaN or infinite values: NaN results, as in f32.
        return Err(if range == 0.0 { 0.0 } else { f32::NAN });
    }
    let inv = 255.0 / range;
    let zero = (-min * inv).round_ties_even().clamp(0.0, 255.0);
    Ok((range / 255.0, inv, zero))
}

#[inline(always)]
fn quantize_block_generic(x: &[f32], q: &mut [u8]) -> (f32, i32) {
    let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for j in 0..16 {
            lo[j] = lo[j].min(c[j]);
            hi[j] = hi[j].max(c[j]);
        }
    }
    let (mut min, mut max) = (0f32, 0f32);
    for &v in chunks.remainder() {
        min = min.min(v);
        max = max.max(v);
    }
    for j in 0..16 {
        min = min.min(lo[j]);
        max = max.max(hi[j]);
    }
    let (scale, inv, zero) = match block_params(min, max) {
        Ok(p) => p,
        Err(scale) => {
            q[..x.len()].fill(0);
            return (scale, 0);
        }
    };
    for (o, &v) in q.iter_mut().zip(x) {
        *o = (v * inv + zero).round_ties_even().clamp(0.0, 255.0) as u8;
    }
    (scale, zero as i32)
}

/// A kernel call's quantized activation rows.
#[derive(Clone, Copy)]
struct Rows<'a> {
    /// `[mr, kp]`.
    q: &'a [u8],
    /// `[mr, blocks]`.
    scale: &'a [f32],
    zero: &'a [i32],
    mr: usize,
    kp: usize,
}

impl Rows<'_> {
    /// Rows `r0..r0 + m` of these.
    #[inline(always)]
    fn rows(&self, r0: usize, m: usize) -> Self {
        let nb = blocks_of(self.kp);
        Self {
            q: &self.q[r0 * self.kp..(r0 + m) * self.kp],
            scale: &self.scale[r0 * nb..(r0 + m) * nb],
            zero: &self.zero[r0 * nb..(r0 + m) * nb],
            mr: m,
            kp: self.kp,
        }
    }
}

/// The integer kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AVX-512 VNNI, 6 rows x 32 columns per step.
    Vnni,
    /// The plain loop (vectorised by the compiler for AVX2 / AVX-512F where the CPU has them).
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs (`FERROFORMERS_NO_VNNI=1` or `FERROFORMERS_NO_SIMD=1`
    /// force the portable one).
    pub fn best() -> Self {
        if super::vnni::available() {
            Kernel::Vnni
        } else {
            Kernel::Portable
        }
    }

    /// `acc [mr, PANEL] (row stride ld) += sum over blocks b0..b1 of scale * (xq @ wq -
    /// zero * colsum)`; from block 0 the sums start at zero (`acc`'s values are ignored).
    /// With `epi`, the sums go to its `out` instead of `acc`.
    ///
    /// # Safety
    /// With `epi`: `out` is valid for writes of `mr` rows of `sw.len()` values at stride
    /// `ld`, which no one else touches meanwhile.
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        self,
        x: Rows<'_>,
        (b0, b1): (usize, usize),
        panel: &[i8],
        colsum: &[i32],
        acc: &mut [f32],
        ld: usize,
        epi: Option<&Epi<'_>>,
    ) {
        let (mr, kp) = (x.mr, x.kp);
        let nb = blocks_of(kp);
        assert!(mr > 0 && x.q.len() >= mr * kp && kp % 4 == 0);
        assert!(x.scale.len() >= mr * nb && x.zero.len() >= mr * nb);
        assert!(panel.len() >= kp * PANEL && colsum.len() >= nb * PANEL);
        assert!(b0 <= b1 && b1 <= nb && ld >= PANEL && acc.len() >= (mr - 1) * ld + PANEL);
        if let Some(e) = &epi {
            e.check(mr);
        }
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Vnni if super::vnni::available() => {
                // SAFETY: the CPU has the features (checked); lengths asserted above.
                unsafe {
                    x86::panel_rows(x, (b0, b1), panel.as_ptr(), colsum.as_ptr(), acc, ld, epi)
                }
            }
            _ => {
                for r0 in (0..mr).step_by(MR) {
                    let m = MR.min(mr - r0);
                    let acc = &mut acc[r0 * ld..];
                    portable_panel(x.rows(r0, m), b0, b1, panel, colsum, acc, ld);
                    if let Some(e) = epi {
                        let e = e.rows_from(r0);
                        for r in 0..m {
                            let cols = e.sw.len();
                            // SAFETY: the caller's contract.
                            let o = unsafe {
                                std::slice::from_raw_parts_mut(e.out.add(r * e.ld), cols)
                            };
                            let res = e.res.map(|res| &res[r * e.ld..r * e.ld + cols]);
                            epilogue(&acc[r * ld..r * ld + cols], e.sw, e.bias, res, o);
                        }
                    }
                }
            }
        }
    }
}

dispatch!(fn epilogue(acc: &[f32], sw: &[f32], bias: &[f32], res: Option<&[f32]>, o: &mut [f32]); via epilogue_generic);

/// `o = acc * sw + bias (+ residual)` for one row's columns (a multiply, then adds: the
/// vector kernel does the same).
#[inline(always)]
fn epilogue_generic(acc: &[f32], sw: &[f32], bias: &[f32], res: Option<&[f32]>, o: &mut [f32]) {
    for j in 0..o.len() {
        let v = acc[j] * sw[j] + bias[j];
        o[j] = match res {
            Some(r) => v + r[j],
            None => v,
        };
    }
}

dispatch!(fn portable_panel(x: Rows<'_>, b0: usize, b1: usize, panel: &[i8], colsum: &[i32], acc: &mut [f32], ld: usize); via portable_panel_generic);

#[inline(always)]
fn portable_panel_generic(
    x: Rows<'_>,
    b0: usize,
    b1: usize,
    panel: &[i8],
    colsum: &[i32],
    acc: &mut [f32],
    ld: usize,
) {
    let (mr, kp) = (x.mr, x.kp);
    let nb = blocks_of(kp);
    if b0 == 0 {
        for r in 0..mr {
            acc[r * ld..r * ld + PANEL].fill(0.0);
        }
    }
    for b in b0..b1 {
        let (g0, g1) = (b * BLOCK / 4, ((b + 1) * BLOCK).min(kp) / 4);
        let cs = &colsum[b * PANEL..(b + 1) * PANEL];
        for r in 0..mr {
            let mut sums = [0i32; PANEL];
            for g in g0..g1 {
                let xr = &x.q[r * kp + g * 4..r * kp + g * 4 + 4];
                let (x0, x1, x2, x3) = (xr[0] as i32, xr[1] as i32, xr[2] as i32, xr[3] as i32);
                let w = &panel[g * 4 * PANEL..(g + 1) * 4 * PANEL];
                for c in 0..PANEL {
                    let wc = &w[c * 4..c * 4 + 4];
                    sums[c] += x0 * wc[0] as i32
                        + x1 * wc[1] as i32
                        + x2 * wc[2] as i32
                        + x3 * wc[3] as i32;
                }
            }
            let (s, z) = (x.scale[r * nb + b], x.zero[r * nb + b]);
            let out = &mut acc[r * ld..r * ld + PANEL];
            for c in 0..PANEL {
                out[c] = s.mul_add((sums[c] - z * cs[c]) as f32, out[c]);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::panels::by_rows;
    use super::super::panels::x86::{finish, load_sums};
    use super::{block_params, blocks_of, Epi, Rows, BLOCK, MR, PANEL};
    use crate::kernels::cpu::simd::x86::lanes;
    use std::arch::x86_64::*;

    /// A whole row, block by block, as [`super::quantize_block_generic`] (the same bits, 16
    /// lanes at a time: the same min/max, the same `v * inv + zero`, a multiply then an add,
    /// rounded to nearest even and clamped): every block's minimum and maximum first, then
    /// every block's bytes, in one function, so the blocks' reductions and scalar steps
    /// overlap instead of each block waiting on its own. Blocks past `x` get scale 0.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL; `q.len() == x.len()`, `scale.len() == zero.len() >=
    /// x.len().div_ceil(BLOCK)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_row(x: &[f32], q: &mut [u8], scale: &mut [f32], zero: &mut [i32]) {
        const V: usize = BLOCK / 16;
        let n = x.len();
        assert!(q.len() == n && scale.len() == zero.len() && scale.len() >= n.div_ceil(BLOCK));
        let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
        let tail = |i: usize| lanes(n - i);
        // Per block: (inv, zero) for the second pass; NaN inv marks a block written as zeros.
        let mut params = [(0f32, 0f32); 64];
        let nb = n.div_ceil(BLOCK);
        assert!(nb <= params.len(), "rows of at most {} inputs", 64 * BLOCK);
        unsafe {
            for b in 0..nb {
                let (t0, t1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
                let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
                if t1 - t0 == BLOCK {
                    for j in 0..V {
                        let v = _mm512_loadu_ps(xp.add(t0 + 16 * j));
                        lo = _mm512_min_ps(lo, v);
                        hi = _mm512_max_ps(hi, v);
                    }
                } else {
                    for i in (t0..t1).step_by(16) {
                        let v = _mm512_maskz_loadu_ps(tail(i), xp.add(i));
                        lo = _mm512_min_ps(lo, v);
                        hi = _mm512_max_ps(hi, v);
                    }
                }
                let (min, max) = (_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
                (scale[b], zero[b], params[b]) = match block_params(min, max) {
                    Ok((s, inv, z)) => (s, z as i32, (inv, z)),
                    Err(s) => (s, 0, (f32::NAN, 0.0)),
                };
            }
            scale[nb..].fill(0.0);
            zero[nb..].fill(0);
            let (lo, hi) = (_mm512_setzero_ps(), _mm512_set1_ps(255.0));
            for (b, &(inv, z)) in params[..nb].iter().enumerate() {
                let (t0, t1) = (b * BLOCK, ((b + 1) * BLOCK).min(n));
                if inv.is_nan() {
                    q[t0..t1].fill(0);
                    continue;
                }
                let (vinv, vzero) = (_mm512_set1_ps(inv), _mm512_set1_ps(z));
                for i in (t0..t1).step_by(16) {
                    let m = tail(i);
                    let v = _mm512_maskz_loadu_ps(m, xp.add(i));
                    // v * inv + zero (a multiply, then an add), clamped, rounded to nearest
                    // even: clamping first gives the same integers (0 and 255 are integers).
                    let t = _mm512_add_ps(_mm512_mul_ps(v, vinv), vzero);
                    let t = _mm512_min_ps(_mm512_max_ps(t, lo), hi);
                    let t = _mm512_cvt_roundps_epi32::<
                        { _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC },
                    >(t);
                    _mm_mask_storeu_epi8(qp.add(i) as *mut i8, m, _mm512_cvtepi32_epi8(t));
                }
            }
        }
    }

    /// [`panel`] over all of `x`'s rows, [`MR`] at a time.
    ///
    /// # Safety
    /// AVX-512 F/VNNI; `b` holds `kp * 32` bytes, `cs` `blocks * 32` i32, `acc` `(mr - 1) *
    /// ld + 32` f32; `kp % 4 == 0`, `b1 <= blocks`; `epi` checked for `x.mr` rows.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub unsafe fn panel_rows(
        x: Rows<'_>,
        bl: (usize, usize),
        b: *const i8,
        cs: *const i32,
        acc: &mut [f32],
        ld: usize,
        epi: Option<&Epi<'_>>,
    ) {
        let mut r0 = 0;
        while r0 < x.mr {
            let m = MR.min(x.mr - r0);
            let e = epi.map(|e| e.rows_from(r0));
            let c = acc[r0 * ld..].as_mut_ptr();
            // SAFETY: the caller's contract, for rows r0..r0 + m.
            unsafe { by_rows!(m, panel, (x.rows(r0, m), bl, b, cs, c, ld, e.as_ref())) };
            r0 += m;
        }
    }

    /// `c [R, 32] (row stride ld) += sum over blocks b0..b1 of scale * (a @ panel - zero *
    /// colsum)` with `vpdpbusd`.
    ///
    /// # Safety
    /// AVX-512 F/VNNI; `x` holds `R` rows, `b` `kp * 32` bytes, `cs` `blocks * 32` i32, `c`
    /// `(R - 1) * ld + 32` f32; `kp % 4 == 0`, `b1 <= blocks`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub unsafe fn panel<const R: usize>(
        x: Rows<'_>,
        (b0, b1): (usize, usize),
        b: *const i8,
        cs: *const i32,
        c: *mut f32,
        ld: usize,
        epi: Option<&Epi<'_>>,
    ) {
        debug_assert!(R <= MR && x.mr == R);
        let kp = x.kp;
        let nb = blocks_of(kp);
        let a = x.q.as_ptr();
        unsafe {
            let mut fa = load_sums::<R>(c, ld, b0 > 0);
            for blk in b0..b1 {
                let (g0, g1) = (blk * BLOCK / 4, ((blk + 1) * BLOCK).min(kp) / 4);
                let mut acc = [[_mm512_setzero_si512(); 2]; R];
                for g in g0..g1 {
                    let w0 = _mm512_loadu_si512(b.add(g * 4 * PANEL) as *const _);
                    let w1 = _mm512_loadu_si512(b.add(g * 4 * PANEL + 64) as *const _);
                    for (r, acc) in acc.iter_mut().enumerate() {
                        let xv = (a.add(r * kp + g * 4) as *const i32).read_unaligned();
                        let xv = _mm512_set1_epi32(xv);
                        acc[0] = _mm512_dpbusd_epi32(acc[0], xv, w0);
                        acc[1] = _mm512_dpbusd_epi32(acc[1], xv, w1);
                    }
                }
                let cs0 = _mm512_loadu_si512(cs.add(blk * PANEL) as *const _);
                let cs1 = _mm512_loadu_si512(cs.add(blk * PANEL + 16) as *const _);
                for r in 0..R {
                    // acc - zero * colsum in one `vpdpwssd`: a block's column sums fit in 16
                    // bits (|sum| <= 127 * BLOCK), so each i32 lane's low half times
                    // (-zero, 0) is the product and its high half counts nothing.
                    let z = (-x.zero[r * nb + blk]) as i16 as u16 as i32;
                    let z = _mm512_set1_epi32(z);
                    let s = _mm512_set1_ps(x.scale[r * nb + blk]);
                    let t0 = _mm512_dpwssd_epi32(acc[r][0], cs0, z);
                    let t1 = _mm512_dpwssd_epi32(acc[r][1], cs1, z);
                    fa[r][0] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(t0), fa[r][0]);
                    fa[r][1] = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(t1), fa[r][1]);
                }
            }
            finish(&fa, c, ld, epi, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::test_values as values;

    /// The plain reference: quantize per block, multiply in i64, scale per block (one fused
    /// multiply-add per block, as the kernels), then by the column's scale.
    fn reference(w: &Int8Weights, x: &[f32], rows: usize, bias: &[f32], res: &[f32]) -> Vec<f32> {
        let (k, n) = (w.k, w.n);
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                let mut f = 0f32;
                for t0 in (0..k).step_by(BLOCK) {
                    let t1 = (t0 + BLOCK).min(k);
                    let mut q = vec![0u8; t1 - t0];
                    let (sx, zp) = quantize_block_generic(&x[r * k + t0..r * k + t1], &mut q);
                    let mut acc = 0i64;
                    for (t, &qt) in q.iter().enumerate() {
                        acc += (qt as i64 - zp as i64) * w.weight(t0 + t, j) as i64;
                    }
                    f = sx.mul_add(acc as f32, f);
                }
                out[r * n + j] = f * w.scale[j] + bias[j] + res[r * n + j];
            }
        }
        out
    }

    #[test]
    fn out_in_packing_equals_the_transposed_in_out_packing() {
        for (k, n) in [(1, 1), (7, 33), (130, 65), (384, 96), (260, 31)] {
            let w = values(k * n, 3, 2.0);
            let mut wt = vec![0f32; k * n];
            for j in 0..n {
                for t in 0..k {
                    wt[t * n + j] = w[j * k + t];
                }
            }
            let (a, b) = (
                Int8Weights::from_out_in(&w, n, k),
                Int8Weights::from_in_out(&wt, k, n),
            );
            assert_eq!((a.k, a.n, a.kp), (b.k, b.n, b.kp));
            assert_eq!(a.packed, b.packed, "{k} x {n}");
            assert_eq!(a.scale, b.scale, "{k} x {n}");
            assert_eq!(a.colsum, b.colsum, "{k} x {n}");
            assert_eq!(a.scales().len(), n);
        }
    }

    #[test]
    fn kernels_match_the_scalar_reference_on_odd_shapes() {
        for (rows, k, n) in [
            (1, 4, 32),
            (3, 7, 5),
            (9, 33, 70),
            (17, 384, 64),
            (13, 130, 96),
            (7, 1536, 40),
            (100, 384, 256),
            (50, 1100, 200),
            (500, 136, 70),
        ] {
            let wf = values(k * n, 1 + k as u64, 0.2);
            let w = Int8Weights::from_in_out(&wf, k, n);
            let x = values(rows * k, 7 + rows as u64, 4.0);
            let bias = values(n, 3, 1.0);
            let res = values(rows * n, 5, 1.0);
            let want = reference(&w, &x, rows, &bias, &res);
            for kernel in [Kernel::Portable, Kernel::best()] {
                for par in [false, true] {
                    let mut out = vec![f32::NAN; rows * n];
                    w.linear_with(&x, rows, &bias, Some(&res), &mut out, par, kernel);
                    assert_eq!(out, want, "{kernel:?} par={par} rows={rows} k={k} n={n}");
                }
            }
        }
    }

    #[test]
    fn int8_product_is_close_to_f32() {
        let (rows, k, n) = (5, 256, 48);
        let wf = values(k * n, 11, 0.1);
        let x = values(rows * k, 12, 2.0);
        let w = Int8Weights::from_in_out(&wf, k, n);
        let bias = vec![0f32; n];
        let mut out = vec![0f32; rows * n];
        w.linear_into(&x, rows, &bias, None, &mut out, false);
        let mut num = 0f32;
        let mut den = 0f32;
        for r in 0..rows {
            for j in 0..n {
                let exact: f32 = (0..k).map(|t| x[r * k + t] * wf[t * n + j]).sum();
                num += (exact - out[r * n + j]).powi(2);
                den += exact * exact;
            }
        }
        assert!(
            (num / den).sqrt() < 0.02,
            "relative error {}",
            (num / den).sqrt()
        );
        // Dequantized weights are within half a step of the originals.
        for (a, b) in w.dequantize().iter().zip(&wf) {
            assert!((a - b).abs() <= 0.1 / 2.0 / 127.0 * 1.0001 + 1e-7);
        }
    }

    #[test]
    fn zero_and_constant_rows() {
        let (k, n) = (8, 32);
        let w = Int8Weights::from_in_out(&values(k * n, 2, 1.0), k, n);
        let x = [vec![0f32; k], vec![0.5f32; k]].concat();
        let bias = vec![1f32; n];
        let mut out = vec![0f32; 2 * n];
        w.linear_into(&x, 2, &bias, None, &mut out, false);
        assert!(out[..n].iter().all(|&v| v == 1.0));
        let wf = w.dequantize();
        for j in 0..n {
            let exact: f32 = 1.0 + (0..k).map(|t| 0.5 * wf[t * n + j]).sum::<f32>();
            assert!(
                (out[n + j] - exact).abs() < 1e-2,
                "{} vs {exact}",
                out[n + j]
            );
        }
    }

    /// With `FERROFORMERS_NO_VNNI=1` the dispatch picks the portable kernel: the test runs
    /// itself again in a child process with the variable set.
    #[test]
    fn no_vnni_variable_picks_the_portable_kernel() {
        if crate::kernels::cpu::switch_on("FERROFORMERS_NO_VNNI") {
            assert_eq!(Kernel::best(), Kernel::Portable);
            println!("picked the portable kernel");
            return;
        }
        crate::kernels::cpu::rerun_with(
            "kernels::cpu::int8::tests::no_vnni_variable_picks_the_portable_kernel",
            "FERROFORMERS_NO_VNNI",
            "picked the portable kernel",
        );
    }
}
