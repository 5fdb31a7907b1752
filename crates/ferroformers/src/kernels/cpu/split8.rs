//! A GGUF Q8_0 output projection split into two 4-bit planes, so that greedy decoding reads
//! about half of it per token and still picks the argmax of the full integer product.
//!
//! The int8 mode's Q8_0 dot takes `u = q + 128` (0..255) times the 8-bit activations and
//! subtracts `128 * sum(xq)`. Here every row keeps `u`'s high nibbles (`hi`) beside the block
//! scales, and its low nibbles (`lo`) in a second matrix; `u = 16 hi + lo` exactly, so the full
//! product reads both planes and gets the same block integers as the Q8_0 kernels.
//!
//! A greedy step (no sampling, no penalties that depend on the values, no log-probabilities)
//! needs only the largest logit. Per block `b` of 32 values, the estimate replaces `lo` by
//! 7.5: `E_b = 16 sum(hi xq) - 120.5 sum(xq)`, and by Cauchy-Schwarz
//! `|I_b - E_b| <= ||lo - 7.5||_2 ||xq||_2`; the first norm is stored per block (a byte, in
//! quarters, rounded up), the second computed per token. With the block scales `s_b`
//! (weight d times activation d), a row's estimate `a_r = sum s_b E_b` is within
//! `e_r = sum |s_b| (||lo - 7.5|| ||xq|| + 4e-3 |xq|_1)` of its exact value (the last term
//! covers both sums' f32 rounding, far above `k * 2^-24` of their terms). `T` = the largest
//! `a_r - e_r`; every row whose `a_r + e_r` reaches `T` is computed in full, by the same
//! function as the unscreened product (the same bits), and so are the tokens a logits
//! processor may suppress (`always`: they must not set `T`). The other rows keep their
//! estimate, below `T`, itself at most the exact value of the token that set it.
//!
//! On Qwen2.5-0.5B's 151936 x 896 output matrix (144 MB of Q8_0) the estimate reads 81 MB, and
//! on greedy continuations 0.2-2% of the rows (median; a few steps up to half) went on to the
//! full product. A small model's flatter logits (SmolLM2-135M) send most rows on; while
//! recent steps finished more than a third of the rows, steps take the full product instead
//! (one in 16 tries the screen again), which gives the same argmax and values.

use super::blocks::QuantizedRows;
use super::threads::{par_ranges, SendPtr};

/// Bytes per block in the first plane: f16 scale, norm byte, 16 bytes of high nibbles.
const A_BLOCK: usize = 19;

/// A `[n, k]` Q8_0 matrix in two planes (see the module).
pub struct SplitQ8 {
    n: usize,
    k: usize,
    /// Per row: `[d: f16 x nb][norm: u8 x nb][hi: 16 x nb]`.
    a: Vec<u8>,
    /// Per row: `[lo: 16 x nb]`.
    b: Vec<u8>,
    /// Recent screened steps' share of rows finished in full (x 10000, a running average),
    /// and the calls so far: see [`SplitQ8::worth_screening`].
    recent: std::sync::atomic::AtomicU32,
    calls: std::sync::atomic::AtomicU32,
}

/// Whether the kernels run here (AVX-512 VNNI) and screening is not switched off
/// (`FERROFORMERS_NO_SCREEN=1`).
pub fn available() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::vnni::available() && !*OFF.get_or_init(|| super::switch_on("FERROFORMERS_NO_SCREEN"))
}

/// A plane being written by several threads, each its own rows.
#[derive(Clone, Copy)]
struct BytePtr(*mut u8);
// SAFETY: only used for writes to disjoint rows of one buffer.
unsafe impl Send for BytePtr {}
unsafe impl Sync for BytePtr {}

/// The activations of one row as the kernels read them.
struct Act<'a> {
    q: &'a [i8],
    d: &'a [f32],
    lanes: &'a [i32],
    /// Per block: `-120.5 * sum(xq)`.
    sx: Vec<f32>,
    /// Per block: `||xq||_2 / 4` (rounded up).
    nx: Vec<f32>,
    /// Per block: the rounding margin `4e-3 * |xq|_1`.
    l1: Vec<f32>,
}

impl<'a> Act<'a> {
    fn new(xq: &'a QuantizedRows, i: usize) -> Self {
        let r = xq.row(i);
        let (mut sx, mut nx, mut l1) = (Vec::new(), Vec::new(), Vec::new());
        for blk in r.q.chunks_exact(32) {
            let s: i32 = blk.iter().map(|&v| v as i32).sum();
            let sq: i64 = blk.iter().map(|&v| (v as i64) * (v as i64)).sum();
            let a: i32 = blk.iter().map(|&v| (v as i32).abs()).sum();
            sx.push(-120.5 * s as f32);
            nx.push(((sq as f64).sqrt() * (1.0 + 1e-6) / 4.0) as f32);
            l1.push(4e-3 * a as f32);
        }
        Act {
            q: r.q,
            d: r.d,
            lanes: r.lanes,
            sx,
            nx,
            l1,
        }
    }
}

impl SplitQ8 {
    /// From GGUF Q8_0 blocks (`[n, k]`, `k` a multiple of 64): `fill(r, row)` writes row
    /// `r`'s raw blocks (`k / 32 * 34` bytes). Rows are converted across the threads.
    pub fn new(n: usize, k: usize, fill: impl Fn(usize, &mut [u8]) + Sync) -> Self {
        let nb = k / 32;
        assert!(k.is_multiple_of(64), "Q8_0 rows of {k} values");
        let mut a = vec![0u8; n * nb * A_BLOCK];
        let mut b = vec![0u8; n * nb * 16];
        const RUN: usize = 1024;
        let ptrs = (BytePtr(a.as_mut_ptr()), BytePtr(b.as_mut_ptr()));
        par_ranges(n.div_ceil(RUN), |range| {
            let (ap, bp) = ptrs;
            let mut row = vec![0u8; nb * 34];
            for r in range.flat_map(|t| t * RUN..((t + 1) * RUN).min(n)) {
                // SAFETY: row r's bytes of both planes are written by this task only.
                let (ar, br) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(ap.0.add(r * nb * A_BLOCK), nb * A_BLOCK),
                        std::slice::from_raw_parts_mut(bp.0.add(r * nb * 16), nb * 16),
                    )
                };
                fill(r, &mut row);
                for (j, blk) in row.chunks_exact(34).enumerate() {
                    ar[2 * j..2 * j + 2].copy_from_slice(&blk[..2]);
                    let u: [u8; 32] = std::array::from_fn(|i| blk[2 + i] ^ 0x80);
                    // ||lo - 7.5||^2 = sum (2 lo - 15)^2 / 4, exact in integers.
                    let ss: i32 = u.iter().map(|&v| (2 * (v & 15) as i32 - 15).pow(2)).sum();
                    ar[2 * nb + j] = (2.0 * (ss as f64).sqrt() * (1.0 + 1e-9)).ceil() as u8;
                    for i in 0..16 {
                        ar[3 * nb + 16 * j + i] = (u[i] >> 4) | (u[i + 16] & 0xF0);
                        br[16 * j + i] = (u[i] & 15) | (u[i + 16] << 4);
                    }
                }
            }
        });
        Self {
            n,
            k,
            a,
            b,
            recent: 0.into(),
            calls: 0.into(),
        }
    }

    /// Whether the next step should be screened: unless recent steps finished more than a
    /// third of the rows in full (a small model's flat logits, where the estimate pass only
    /// adds to the full product's bytes); then one step in 16 tries again. Either way the
    /// step's argmax and its exact values are the same.
    pub fn worth_screening(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let call = self.calls.fetch_add(1, Relaxed);
        self.recent.load(Relaxed) < 3333 || call.is_multiple_of(16)
    }

    fn record(&self, computed: usize, rows: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        let share = (computed as u64 * 10000 / rows.max(1) as u64).min(10000) as u32;
        let old = self.recent.load(Relaxed);
        self.recent.store((old * 3 + share) / 4, Relaxed);
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    fn nb(&self) -> usize {
        self.k / 32
    }

    /// Row `r` back in GGUF's Q8_0 blocks, into `out` (`k / 32 * 34` bytes).
    pub fn raw_row(&self, r: usize, out: &mut [u8]) {
        let (a, b) = self.planes(r);
        raw_into(a, b, self.k, out);
    }

    /// Row `r`'s two planes: scales, norms and high nibbles; low nibbles.
    pub fn planes(&self, r: usize) -> (&[u8], &[u8]) {
        let nb = self.nb();
        (
            &self.a[r * nb * A_BLOCK..(r + 1) * nb * A_BLOCK],
            &self.b[r * nb * 16..(r + 1) * nb * 16],
        )
    }

    /// `out [m, n]` = the exact int8-mode product of every row with each of the `m` rows of
    /// `xq` (Q8_0 activations with VNNI lanes).
    pub fn matmul(&self, xq: &QuantizedRows, m: usize, out: &mut [f32], par: bool) {
        let n = self.n;
        assert!(out.len() >= m * n);
        let acts: Vec<Act<'_>> = (0..m).map(|i| Act::new(xq, i)).collect();
        let optr = SendPtr(out.as_mut_ptr());
        // A run of weight rows (~20 KiB of planes at k = 576) stays in L1 while every group of
        // activation rows passes over it.
        const RUN: usize = 32;
        let task = |range: std::ops::Range<usize>| {
            let o = optr;
            for t in range {
                let (r0, r1) = (t * RUN, ((t + 1) * RUN).min(n));
                let mut i = 0;
                while i < m {
                    let g = (m - i).min(4);
                    // SAFETY: rows i..i + g, columns r0..r1 are written by this task only
                    // (the slice starts at row i's column r0 and ends at row i + g - 1's r1).
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(o.0.add(i * n + r0), (g - 1) * n + r1 - r0)
                    };
                    self.exact_rows(r0, r1, &acts[i..i + g], dst, n);
                    i += g;
                }
            }
        };
        if par {
            par_ranges(n.div_ceil(RUN), task);
        } else {
            task(0..n.div_ceil(RUN));
        }
    }

    /// Screened logits `out [m, n]` (see the module): exact for `always`, for every row that
    /// could hold the largest of the others, estimates below that for the rest. Returns how
    /// many logits were computed in full, over the `m` rows.
    pub fn screened(
        &self,
        xq: &QuantizedRows,
        m: usize,
        always: &[u32],
        out: &mut [f32],
        par: bool,
        panel_order: bool,
    ) -> usize {
        let n = self.n;
        assert!(out.len() >= m * n);
        let mut bounds = vec![0f32; n];
        let mut computed = 0;
        for i in 0..m {
            let act = Act::new(xq, i);
            let est = &mut out[i * n..(i + 1) * n];
            const RUN: usize = 512;
            let ptrs = (SendPtr(est.as_mut_ptr()), SendPtr(bounds.as_mut_ptr()));
            let task = |range: std::ops::Range<usize>| {
                let (ep, bp) = ptrs;
                for t in range {
                    let (r0, r1) = (t * RUN, ((t + 1) * RUN).min(n));
                    // SAFETY: entries r0..r1 are written by this task only.
                    let (e, b) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(ep.0.add(r0), r1 - r0),
                            std::slice::from_raw_parts_mut(bp.0.add(r0), r1 - r0),
                        )
                    };
                    self.estimate(r0, r1, &act, e, b);
                }
            };
            if par {
                par_ranges(n.div_ceil(RUN), task);
            } else {
                task(0..n.div_ceil(RUN));
            }
            for &t in always {
                if let Some(b) = bounds.get_mut(t as usize) {
                    // Never sets the threshold, always computed.
                    *b = f32::INFINITY;
                }
            }
            let all_finite = est.iter().all(|v| v.is_finite());
            let t = est
                .iter()
                .zip(&bounds)
                .map(|(a, e)| a - e)
                .fold(f32::NEG_INFINITY, f32::max);
            let ids: Vec<u32> = if all_finite && t.is_finite() {
                (0..n as u32)
                    .filter(|&r| est[r as usize] + bounds[r as usize] >= t)
                    .collect()
            } else {
                // Non-finite activations or estimates: every row in full.
                (0..n as u32).collect()
            };
            computed += ids.len();
            self.record(ids.len(), n);
            let eptr = SendPtr(est.as_mut_ptr());
            let exact = |range: std::ops::Range<usize>| {
                let ep = eptr;
                for &r in &ids[range] {
                    let r = r as usize;
                    // SAFETY: entry r (< n) is written by this call only.
                    let dst = unsafe { std::slice::from_raw_parts_mut(ep.0.add(r), 1) };
                    if panel_order {
                        dst[0] = self.exact_in_panel_order(r, &act);
                    } else {
                        self.exact_rows(r, r + 1, std::slice::from_ref(&act), dst, 1);
                    }
                }
            };
            if par && ids.len() >= 256 {
                par_ranges(ids.len(), exact);
            } else {
                exact(0..ids.len());
            }
        }
        computed
    }

    /// The exact product of rows `r0..r1` with one to four activation rows: row `i`'s values
    /// to `out[i * ld..]`.
    fn exact_rows(&self, r0: usize, r1: usize, acts: &[Act<'_>], out: &mut [f32], ld: usize) {
        let nb = self.nb();
        let a = &self.a[r0 * nb * A_BLOCK..r1 * nb * A_BLOCK];
        let b = &self.b[r0 * nb * 16..r1 * nb * 16];
        #[cfg(target_arch = "x86_64")]
        if super::vnni::available() && acts.iter().all(|a| a.lanes.len() >= 8 * nb) {
            // SAFETY: the CPU has the features; the kernel asserts the lengths.
            unsafe {
                match acts {
                    [a0, a1, a2, a3] => x86::exact(a, b, nb, [a0, a1, a2, a3], out, ld),
                    [a0, a1, a2] => x86::exact(a, b, nb, [a0, a1, a2], out, ld),
                    [a0, a1] => x86::exact(a, b, nb, [a0, a1], out, ld),
                    [a0] => x86::exact(a, b, nb, [a0], out, ld),
                    _ => unreachable!("groups of one to four rows"),
                }
            }
            return;
        }
        for (i, act) in acts.iter().enumerate() {
            portable_exact(a, b, nb, act, &mut out[i * ld..i * ld + r1 - r0]);
        }
    }

    /// Row `r`'s exact value in the f32 order of the int8 panels ([`super::qgemm`], the
    /// products of batch-invariant matrices): block after block, `f = fma(isum_b * d_b, dx_b,
    /// f)`, the block integers the Q8_0 kernels'. A screened step of a batch-invariant matrix
    /// computes its candidates so: their values are then the bits the same row gets in any
    /// batch.
    fn exact_in_panel_order(&self, r: usize, act: &Act<'_>) -> f32 {
        let nb = self.nb();
        let a = &self.a[r * nb * A_BLOCK..(r + 1) * nb * A_BLOCK];
        let b = &self.b[r * nb * 16..(r + 1) * nb * 16];
        #[cfg(target_arch = "x86_64")]
        if super::vnni::available() && act.lanes.len() >= 8 * nb {
            // SAFETY: the CPU has the features; the kernel asserts the lengths.
            return unsafe { x86::exact_in_panel_order(a, b, nb, act) };
        }
        let mut f = 0f32;
        for j in 0..nb {
            let (d, isum) = block_of(a, b, nb, j, act.q);
            f = (isum as f32 * d).mul_add(act.d[j], f);
        }
        f
    }

    fn estimate(&self, r0: usize, r1: usize, act: &Act<'_>, est: &mut [f32], bound: &mut [f32]) {
        let nb = self.nb();
        let a = &self.a[r0 * nb * A_BLOCK..r1 * nb * A_BLOCK];
        #[cfg(target_arch = "x86_64")]
        if super::vnni::available() {
            // SAFETY: the CPU has the features; the kernel asserts the lengths.
            unsafe { x86::estimate(a, nb, act, est, bound) };
            return;
        }
        // Without the kernels: every row exact, no row screened out.
        let b = &self.b[r0 * nb * 16..r1 * nb * 16];
        portable_exact(a, b, nb, act, est);
        bound.fill(0.0);
    }
}

/// A row's planes `ar`, `br` (`k` values) back in Q8_0 blocks, into `out`.
fn raw_into(ar: &[u8], br: &[u8], k: usize, out: &mut [u8]) {
    let nb = k / 32;
    for (j, blk) in out[..nb * 34].chunks_exact_mut(34).enumerate() {
        blk[..2].copy_from_slice(&ar[2 * j..2 * j + 2]);
        for i in 0..16 {
            let (h, l) = (ar[3 * nb + 16 * j + i], br[16 * j + i]);
            blk[2 + i] = ((h & 15) << 4 | (l & 15)) ^ 0x80;
            blk[18 + i] = ((h & 0xF0) | (l >> 4)) ^ 0x80;
        }
    }
}

/// [`raw_into`] into a new buffer.
pub fn raw_from_planes(ar: &[u8], br: &[u8], k: usize) -> Vec<u8> {
    let mut out = vec![0u8; k / 32 * 34];
    raw_into(ar, br, k, &mut out);
    out
}

/// Block `j` of one row's planes `ar`, `br` (`nb` blocks): its scale, and its integer sum
/// `sum(q * xq)` with the activation values `xq`.
fn block_of(ar: &[u8], br: &[u8], nb: usize, j: usize, xq: &[i8]) -> (f32, i32) {
    let d = half::f16::from_le_bytes([ar[2 * j], ar[2 * j + 1]]).to_f32();
    let mut isum = 0i32;
    for i in 0..32 {
        let (h, l) = (ar[3 * nb + 16 * j + i % 16], br[16 * j + i % 16]);
        let (h, l) = if i < 16 {
            (h & 15, l & 15)
        } else {
            (h >> 4, l >> 4)
        };
        isum += (16 * h as i32 + l as i32 - 128) * xq[32 * j + i] as i32;
    }
    (d, isum)
}

/// The exact product without SIMD (same integers; another f32 order).
fn portable_exact(a: &[u8], b: &[u8], nb: usize, act: &Act<'_>, out: &mut [f32]) {
    for ((ar, br), o) in a
        .chunks_exact(nb * A_BLOCK)
        .zip(b.chunks_exact(nb * 16))
        .zip(out.iter_mut())
    {
        let mut acc = 0f32;
        for j in 0..nb {
            let (d, isum) = block_of(ar, br, nb, j, act.q);
            acc += d * act.d[j] * isum as f32;
        }
        *o = acc;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Act, A_BLOCK};
    use crate::kernels::cpu::packed::x86::{nibbles2 as nibbles, pair_scales, scales16};
    use std::arch::x86_64::*;

    /// The full product of the rows in planes `a`, `b` with `R` activation rows: each pair of
    /// blocks' `u = 16 hi + lo` (`q + 128`) is put together once and multiplied by every
    /// row's values (`vpdpbusd` from `-128 * sum(xq)`), scaled per block; the block integers
    /// are the Q8_0 kernels'. A row's result does not depend on the others in the call. Row
    /// `i`'s result for weight row `r` goes to `out[i * ld + r]`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, F16C; `nb` even, `b` the same rows' second plane, each
    /// activation row `nb` blocks with lanes (asserted), `out` at least `(R - 1) * ld + rows`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn exact<const R: usize>(
        a: &[u8],
        b: &[u8],
        nb: usize,
        acts: [&Act<'_>; R],
        out: &mut [f32],
        ld: usize,
    ) {
        let rows = a.len() / (nb * A_BLOCK);
        assert!(nb.is_multiple_of(2) && b.len() == rows * nb * 16 && rows <= ld);
        assert!(out.len() >= (R - 1) * ld + rows);
        for act in acts {
            assert!(act.q.len() >= nb * 32 && act.d.len() >= nb && act.lanes.len() >= nb * 8);
        }
        let seven = _mm_cvtsi32_si128(7);
        for r in 0..rows {
            let ar = a.as_ptr().add(r * nb * A_BLOCK);
            let br = b.as_ptr().add(r * nb * 16);
            let mut acc = [_mm512_setzero_ps(); R];
            let mut c = 0;
            while c < nb {
                let cnt = (nb - c).min(16);
                let mask = ((1u32 << cnt) - 1) as u16;
                let sc: [__m512; R] = std::array::from_fn(|i| scales16(ar, acts[i].d, c, mask));
                for p in 0..cnt / 2 {
                    let j = c + 2 * p;
                    let next = ar.wrapping_add(nb * A_BLOCK + A_BLOCK * j);
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                    // Nibbles are below 16: the shift stays inside each byte.
                    let u = _mm512_or_si512(
                        _mm512_slli_epi16::<4>(nibbles(ar.add(3 * nb + 16 * j))),
                        nibbles(br.add(16 * j)),
                    );
                    for i in 0..R {
                        let xv = _mm512_loadu_si512(acts[i].q.as_ptr().add(32 * j) as *const _);
                        let init = _mm512_sll_epi32(
                            _mm512_loadu_si512(acts[i].lanes.as_ptr().add(8 * j) as *const _),
                            seven,
                        );
                        let isum = _mm512_dpbusd_epi32(init, u, xv);
                        acc[i] = _mm512_fmadd_ps(
                            pair_scales(sc[i], p),
                            _mm512_cvtepi32_ps(isum),
                            acc[i],
                        );
                    }
                }
                c += cnt;
            }
            for (i, acc) in acc.iter().enumerate() {
                out[i * ld + r] = _mm512_reduce_add_ps(*acc);
            }
        }
    }

    /// [`super::SplitQ8::exact_in_panel_order`] of one row (planes `a`, `b`): each pair of
    /// blocks' integers from one `vpdpbusd`, summed per block, then the f32 steps one block
    /// at a time.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/VNNI, F16C, FMA; `nb` even, one row's planes, the activation row with
    /// lanes (asserted).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn exact_in_panel_order(a: &[u8], b: &[u8], nb: usize, act: &Act<'_>) -> f32 {
        assert!(
            nb.is_multiple_of(2)
                && a.len() >= nb * A_BLOCK
                && b.len() >= nb * 16
                && act.q.len() >= nb * 32
                && act.d.len() >= nb
                && act.lanes.len() >= nb * 8
        );
        let seven = _mm_cvtsi32_si128(7);
        let (ar, br) = (a.as_ptr(), b.as_ptr());
        let mut f = 0f32;
        for j in (0..nb).step_by(2) {
            // As in `exact`: lanes 0..8 hold block j's sums, 8..16 block j + 1's.
            let u = _mm512_or_si512(
                _mm512_slli_epi16::<4>(nibbles(ar.add(3 * nb + 16 * j))),
                nibbles(br.add(16 * j)),
            );
            let xv = _mm512_loadu_si512(act.q.as_ptr().add(32 * j) as *const _);
            let init = _mm512_sll_epi32(
                _mm512_loadu_si512(act.lanes.as_ptr().add(8 * j) as *const _),
                seven,
            );
            let isum = _mm512_dpbusd_epi32(init, u, xv);
            let sums = [
                _mm512_mask_reduce_add_epi32(0x00FF, isum),
                _mm512_mask_reduce_add_epi32(0xFF00, isum),
            ];
            for (h, s) in sums.into_iter().enumerate() {
                let bits = (ar.add(2 * (j + h)) as *const u16).read_unaligned();
                let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)));
                f = (s as f32 * d).mul_add(act.d[j + h], f);
            }
        }
        f
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn estimate(a: &[u8], nb: usize, act: &Act<'_>, est: &mut [f32], bound: &mut [f32]) {
        let rows = a.len() / (nb * A_BLOCK);
        assert!(
            nb.is_multiple_of(2)
                && est.len() >= rows
                && bound.len() >= rows
                && act.q.len() >= nb * 32
                && act.d.len() >= nb
                && act.sx.len() >= nb
                && act.nx.len() >= nb
                && act.l1.len() >= nb
        );
        let xp = act.q.as_ptr();
        for r in 0..rows {
            let ar = a.as_ptr().add(r * nb * A_BLOCK);
            let mut acc = _mm512_setzero_ps();
            let mut acc2 = _mm512_setzero_ps();
            let mut bacc = _mm512_setzero_ps();
            let mut c = 0;
            while c < nb {
                let cnt = (nb - c).min(16);
                let mask = ((1u32 << cnt) - 1) as u16;
                let sc = scales16(ar, act.d, c, mask);
                // The 7.5 * 16 - 128 part of every block, and the bound.
                let sx = _mm512_maskz_loadu_ps(mask, act.sx.as_ptr().add(c));
                acc2 = _mm512_fmadd_ps(sc, sx, acc2);
                let norm = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(
                    mask,
                    ar.add(2 * nb + c) as *const i8,
                )));
                let nx = _mm512_maskz_loadu_ps(mask, act.nx.as_ptr().add(c));
                let l1 = _mm512_maskz_loadu_ps(mask, act.l1.as_ptr().add(c));
                bacc = _mm512_fmadd_ps(_mm512_abs_ps(sc), _mm512_fmadd_ps(norm, nx, l1), bacc);
                let sc16 = _mm512_mul_ps(sc, _mm512_set1_ps(16.0));
                for p in 0..cnt / 2 {
                    let j = c + 2 * p;
                    let next = ar.wrapping_add(nb * A_BLOCK + A_BLOCK * j);
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                    let xv = _mm512_loadu_si512(xp.add(32 * j) as *const __m512i);
                    let hi = _mm512_dpbusd_epi32(
                        _mm512_setzero_si512(),
                        nibbles(ar.add(3 * nb + 16 * j)),
                        xv,
                    );
                    let s = pair_scales(sc16, p);
                    acc = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(hi), acc);
                }
                c += cnt;
            }
            est[r] = _mm512_reduce_add_ps(acc) + _mm512_reduce_add_ps(acc2);
            bound[r] = _mm512_reduce_add_ps(bacc) * (1.0 + 1e-5);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::blocks::{dot_int, Unpacked};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{Device, Tensor};

    fn matrix(n: usize, k: usize, seed: u64) -> Vec<u8> {
        let w: Vec<f32> = crate::kernels::cpu::test_values(n * k, seed, 2.0)
            .into_iter()
            .enumerate()
            .map(|(i, v)| v * (1 + i % 7) as f32)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        QTensor::quantize(&w, GgmlDType::Q8_0)
            .unwrap()
            .data()
            .unwrap()
            .to_vec()
    }

    /// A random `[n, k]` Q8_0 matrix: its raw blocks, bytes per row, and its split planes.
    fn split_matrix(n: usize, k: usize, seed: u64) -> (Vec<u8>, usize, SplitQ8) {
        let raw = matrix(n, k, seed);
        let rb = k / 32 * 34;
        let s = SplitQ8::new(n, k, |r, out| {
            out.copy_from_slice(&raw[r * rb..(r + 1) * rb])
        });
        (raw, rb, s)
    }

    /// Several activation rows at once (groups of four, three, two and one) give each row's
    /// bits alone, with and without the thread pool.
    #[test]
    fn split_product_of_many_rows_equals_each_alone() {
        let (n, k) = (77, 64 * 3);
        let (_, _, s) = split_matrix(n, k, 21);
        for m in [1usize, 2, 3, 4, 7, 10] {
            let x = crate::kernels::cpu::test_values(m * k, 30 + m as u64, 2.0);
            let xq = QuantizedRows::quantize(&x, k, 32);
            for par in [false, true] {
                let mut all = vec![0f32; m * n];
                s.matmul(&xq, m, &mut all, par);
                for i in 0..m {
                    let one = QuantizedRows::quantize(&x[i * k..(i + 1) * k], k, 32);
                    let mut alone = vec![0f32; n];
                    s.matmul(&one, 1, &mut alone, false);
                    for r in 0..n {
                        assert_eq!(
                            all[i * n + r].to_bits(),
                            alone[r].to_bits(),
                            "m={m} row {i} weight row {r}"
                        );
                    }
                }
            }
        }
    }

    /// The planes give the blocks back; the full product equals the Q8_0 integer dot (the
    /// same integers, another f32 order); the estimates are within their bounds; screened
    /// logits keep the argmax (and its bits), the `always` tokens exact, and compute fewer
    /// rows than all when one row stands out.
    #[test]
    fn split_planes_screen_keeps_the_argmax() {
        let (n, k) = (300, 96 * 2);
        let (raw, rb, s) = split_matrix(n, k, 9);
        let mut back = vec![0u8; rb];
        for r in 0..n {
            s.raw_row(r, &mut back);
            assert_eq!(back, raw[r * rb..(r + 1) * rb], "row {r}");
        }
        let mut x = crate::kernels::cpu::test_values(k, 4, 2.0);
        // Make row 17 stand out: x along it.
        let mut u = Unpacked::default();
        u.unpack(GgmlDType::Q8_0, &raw[17 * rb..18 * rb], k);
        let mut w17 = vec![0f32; k];
        crate::kernels::cpu::blocks::dequantize(&u, &mut w17);
        for (x, w) in x.iter_mut().zip(&w17) {
            *x += 3.0 * w;
        }
        let xq = QuantizedRows::quantize(&x, k, 32);
        let mut full = vec![0f32; n];
        s.matmul(&xq, 1, &mut full, false);
        let mut scr = vec![0f32; n];
        let always = [3u32, 250];
        let computed = s.screened(&xq, 1, &always, &mut scr, false, false);
        let act = Act::new(&xq, 0);
        let (mut est, mut bound) = (vec![0f32; n], vec![0f32; n]);
        s.estimate(0, n, &act, &mut est, &mut bound);
        for r in 0..n {
            u.unpack(GgmlDType::Q8_0, &raw[r * rb..(r + 1) * rb], k);
            let want = dot_int(&u, xq.row(0));
            assert!(
                (full[r] - want).abs() <= 1e-4 * (1.0 + want.abs()),
                "row {r}"
            );
            assert!((est[r] - full[r]).abs() <= bound[r], "row {r}: estimate");
        }
        let best = (0..n).max_by(|&a, &b| full[a].total_cmp(&full[b])).unwrap();
        assert_eq!(best, 17);
        let got = (0..n).max_by(|&a, &b| scr[a].total_cmp(&scr[b])).unwrap();
        assert_eq!(got, best);
        assert_eq!(scr[best].to_bits(), full[best].to_bits());
        for &t in &always {
            assert_eq!(scr[t as usize].to_bits(), full[t as usize].to_bits());
        }
        if available() {
            assert!(computed < n, "screened {computed} of {n}");
        }
    }
}
