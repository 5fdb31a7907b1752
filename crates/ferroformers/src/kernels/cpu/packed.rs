//! GGUF's 32-value block rows (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) rearranged for the AVX-512 VNNI
//! decoding kernels of the int8 mode: the same bytes, each row split into planes.
//!
//! A raw row is `nb` blocks of `[d: f16][m: f16]?[qh: u32]?[qs]`; a packed row is
//! `[d: nb x f16][m: nb x f16]?[qh: nb x u32]?[qs: nb x 16 or 32 bytes]`, the same length. The
//! raw kernels ([`super::vnni`]) spend most of their instructions between the blocks: two
//! scalar f16 loads and conversions, two broadcasts and a blend per pair of blocks, and a
//! permute to bring two 16-byte nibble runs separated by headers into one register. Packed,
//! sixteen blocks' scales are one masked load, one conversion and one product with the
//! activations' scales; a pair of blocks' scales is one `vpermps` of those; a pair's nibbles
//! are one 32-byte load; Q5's fifth bits one 64-bit mask load; the minimums of Q4_1/Q5_1 one
//! fused product per sixteen blocks. Qwen2.5 Q4_K_M's Q5_0 layers were compute-bound at ~19
//! GB/s with the raw kernels on Zen 4, where two cores read ~30 GB/s.
//!
//! Every block's integer sum is the one the raw kernels compute (the same offsets, the same
//! activation lanes); only the f32 order of the scaled blocks differs. Rows with an odd number
//! of blocks stay raw. Paths that want raw blocks (prompt panels, embedding lookups, exact
//! mode) get them back with [`unpack_row`]. `FERROFORMERS_NO_REPACK=1` keeps every matrix raw.

use candle_core::quantized::GgmlDType;

use super::blocks::QRow;

/// Type code shared with the kernels: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, 4 Q5_1.
fn code(dtype: GgmlDType) -> Option<u8> {
    use GgmlDType as D;
    match dtype {
        D::Q8_0 => Some(0),
        D::Q4_0 => Some(1),
        D::Q4_1 => Some(2),
        D::Q5_0 => Some(3),
        D::Q5_1 => Some(4),
        _ => None,
    }
}

/// Bytes per block of each type code.
const BYTES: [usize; 5] = [34, 18, 20, 22, 24];

/// Where each plane of a packed row of `nb` blocks starts.
#[derive(Clone, Copy)]
struct Layout {
    /// Minimums (f16), for Q4_1 and Q5_1.
    m: Option<usize>,
    /// Fifth bits (u32 per block), for Q5_0 and Q5_1.
    qh: Option<usize>,
    qs: usize,
    /// Value bytes per block: 16 (nibbles) or 32 (Q8_0).
    qbytes: usize,
}

const fn layout(t: u8, nb: usize) -> Layout {
    let mut off = 2 * nb;
    let m = if t == 2 || t == 4 {
        off += 2 * nb;
        Some(off - 2 * nb)
    } else {
        None
    };
    let qh = if t == 3 || t == 4 {
        off += 4 * nb;
        Some(off - 4 * nb)
    } else {
        None
    };
    Layout {
        m,
        qh,
        qs: off,
        qbytes: if t == 0 { 32 } else { 16 },
    }
}

/// Offsets of (m, qh, qs) inside a raw block of type `t`.
const fn raw_offsets(t: u8) -> (usize, usize, usize) {
    match t {
        0 => (0, 0, 2),
        1 => (0, 0, 2),
        2 => (2, 0, 4),
        3 => (0, 2, 6),
        _ => (2, 4, 8),
    }
}

/// Whether the kernels run here: AVX-512 VNNI, not switched off.
pub fn available() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::vnni::available() && !*OFF.get_or_init(|| super::switch_on("FERROFORMERS_NO_REPACK"))
}

/// Whether rows of `k` values of `dtype` are packed for the int8 mode on this CPU.
pub fn packable(dtype: GgmlDType, k: usize) -> bool {
    available() && code(dtype).is_some() && k.is_multiple_of(64) && k > 0
}

/// Every row of `bytes` (whole raw rows of `k` values) packed, in place.
pub fn pack_rows(dtype: GgmlDType, bytes: &mut [u8], k: usize) {
    let t = code(dtype).expect("a 32-value block type");
    let nb = k / 32;
    let row_bytes = nb * BYTES[t as usize];
    let l = layout(t, nb);
    let (rm, rqh, rqs) = raw_offsets(t);
    let mut raw = vec![0u8; row_bytes];
    for dst in bytes.chunks_exact_mut(row_bytes) {
        raw.copy_from_slice(dst);
        for (b, blk) in raw.chunks_exact(BYTES[t as usize]).enumerate() {
            dst[2 * b..2 * b + 2].copy_from_slice(&blk[..2]);
            if let Some(m) = l.m {
                dst[m + 2 * b..m + 2 * b + 2].copy_from_slice(&blk[rm..rm + 2]);
            }
            if let Some(qh) = l.qh {
                dst[qh + 4 * b..qh + 4 * b + 4].copy_from_slice(&blk[rqh..rqh + 4]);
            }
            let q = l.qs + l.qbytes * b;
            dst[q..q + l.qbytes].copy_from_slice(&blk[rqs..rqs + l.qbytes]);
        }
    }
}

/// Every row of `bytes` (packed rows of `k` values) back in raw blocks, in place.
pub fn unpack_rows(dtype: GgmlDType, bytes: &mut [u8], k: usize) {
    let t = code(dtype).expect("a 32-value block type");
    let row_bytes = k / 32 * BYTES[t as usize];
    let mut packed = vec![0u8; row_bytes];
    for row in bytes.chunks_exact_mut(row_bytes) {
        packed.copy_from_slice(row);
        unpack_row(dtype, &packed, k, row);
    }
}

/// One packed row (`k` values) back in GGUF's raw blocks, into `out` (the same length).
pub fn unpack_row(dtype: GgmlDType, row: &[u8], k: usize, out: &mut [u8]) {
    let t = code(dtype).expect("a 32-value block type");
    let nb = k / 32;
    let l = layout(t, nb);
    let (rm, rqh, rqs) = raw_offsets(t);
    for (b, blk) in out[..nb * BYTES[t as usize]]
        .chunks_exact_mut(BYTES[t as usize])
        .enumerate()
    {
        blk[..2].copy_from_slice(&row[2 * b..2 * b + 2]);
        if let Some(m) = l.m {
            blk[rm..rm + 2].copy_from_slice(&row[m + 2 * b..m + 2 * b + 2]);
        }
        if let Some(qh) = l.qh {
            blk[rqh..rqh + 4].copy_from_slice(&row[qh + 4 * b..qh + 4 * b + 4]);
        }
        let q = l.qs + l.qbytes * b;
        blk[rqs..rqs + l.qbytes].copy_from_slice(&row[q..q + l.qbytes]);
    }
}

/// `out[r] = sum(value(l) * xq(l))` for each packed row `r` of `rows` (whole rows of
/// `x.d.len()` blocks, back to back) against one activation row (the int8 mode's Q8_0/Q8_1
/// activations with their VNNI lanes). Rows are taken one after another, each over the whole
/// of `x` (one stream through memory; four rows side by side ran slower on Zen 4, from 14 to
/// 25 GB/s on Qwen2.5's 144 MB output matrix), and a row's value does not depend on its
/// neighbours. `false` (and `out` untouched) where the kernels don't run or `x` has no lanes.
pub fn dot_rows(dtype: GgmlDType, rows: &[u8], x: QRow<'_>, out: &mut [f32]) -> bool {
    #[cfg(target_arch = "x86_64")]
    if available() && x.lanes.len() >= 8 * x.d.len() && x.d.len().is_multiple_of(2) {
        let Some(t) = code(dtype) else {
            return false;
        };
        // SAFETY: the CPU has the features the kernels enable; they assert the lengths.
        unsafe {
            match t {
                0 => x86::dot_rows::<0>(rows, x, out),
                1 => x86::dot_rows::<1>(rows, x, out),
                2 => x86::dot_rows::<2>(rows, x, out),
                3 => x86::dot_rows::<3>(rows, x, out),
                _ => x86::dot_rows::<4>(rows, x, out),
            }
        }
        return true;
    }
    let _ = (dtype, rows, x, out);
    false
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    use super::{layout, QRow, BYTES};
    use std::arch::x86_64::*;

    /// log2 of the offset that makes type `T`'s values unsigned (as in [`super::super::vnni`]).
    const SHIFT: [u32; 5] = [7, 3, 0, 4, 0];

    /// 32 nibble bytes of two blocks (16 each: value j low, j + 16 high) -> their 64 values in
    /// order: a's low nibbles, a's high, b's low, b's high.
    #[inline(always)]
    pub(in crate::kernels::cpu) unsafe fn nibbles2(q: *const u8) -> __m512i {
        let y = _mm512_castsi256_si512(_mm256_loadu_si256(q as *const __m256i));
        // 128-bit lanes [a, a, b, b]; the second of each pair shifted down by a nibble.
        let z = _mm512_shuffle_i64x2::<0b01_01_00_00>(y, y);
        let z = _mm512_mask_srli_epi16::<4>(z, 0xFF00_FF00, z);
        _mm512_and_si512(z, _mm512_set1_epi8(0x0F))
    }

    /// Sixteen blocks' scales from block `c` on (`mask`: those that exist): the packed f16
    /// weight scales at `d` times the activations' scales.
    #[inline(always)]
    pub(in crate::kernels::cpu) unsafe fn scales16(
        d: *const u8,
        xd: &[f32],
        c: usize,
        mask: u16,
    ) -> __m512 {
        let w = _mm256_maskz_loadu_epi16(mask, d.add(2 * c) as *const i16);
        _mm512_mul_ps(
            _mm512_cvtph_ps(w),
            _mm512_maskz_loadu_ps(mask, xd.as_ptr().add(c)),
        )
    }

    /// The scales of pair `p` of a chunk's sixteen (`sc`, from [`scales16`]) in the lanes of
    /// its blocks' sums: 0..8 the first block's, 8..16 the second's.
    #[inline(always)]
    pub(in crate::kernels::cpu) unsafe fn pair_scales(sc: __m512, p: usize) -> __m512 {
        let pair = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
        _mm512_permutexvar_ps(_mm512_add_epi32(pair, _mm512_set1_epi32(2 * p as i32)), sc)
    }

    /// Two blocks' values made unsigned, in activation order: 32 nibble bytes at `q` (block a's
    /// 16 then block b's) -> a's low nibbles, a's high nibbles, b's low, b's high; Q5's fifth
    /// bits (64, a's then b's) at `qh`; Q8_0: 64 bytes at `q`.
    #[inline(always)]
    unsafe fn unsigned2<const T: u8>(q: *const u8, qh: *const u8) -> __m512i {
        if T == 0 {
            return _mm512_xor_si512(
                _mm512_loadu_si512(q as *const __m512i),
                _mm512_set1_epi8(-128),
            );
        }
        let n = nibbles2(q);
        if T == 3 || T == 4 {
            let bits = (qh as *const u64).read_unaligned();
            _mm512_mask_add_epi8(n, bits, n, _mm512_set1_epi8(16))
        } else {
            n
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_rows<const T: u8>(rows: &[u8], x: QRow<'_>, out: &mut [f32]) {
        let nb = x.d.len();
        let row_bytes = nb * BYTES[T as usize];
        assert!(
            nb.is_multiple_of(2)
                && nb > 0
                && rows.len().is_multiple_of(row_bytes)
                && out.len() >= rows.len() / row_bytes
                && x.q.len() >= nb * 32
                && x.s.len() >= nb
                && x.lanes.len() >= nb * 8
        );
        let l = layout(T, nb);
        let minimum = T == 2 || T == 4;
        let shift = _mm_cvtsi32_si128(SHIFT[T as usize] as i32);
        let (xp, lp) = (x.q.as_ptr(), x.lanes.as_ptr());
        for (rp, o) in rows.chunks_exact(row_bytes).zip(out.iter_mut()) {
            let rp = rp.as_ptr();
            let mut acc = _mm512_setzero_ps();
            let mut macc = _mm512_setzero_ps();
            let mut c = 0;
            while c < nb {
                let cnt = (nb - c).min(16);
                let mask = ((1u32 << cnt) - 1) as u16;
                // Sixteen blocks' scales: weight d times activation d.
                let sc = scales16(rp, x.d, c, mask);
                if let Some(m) = l.m {
                    // value = d * q + m: the minimums times Q8_1's s.
                    let xs = _mm512_maskz_loadu_ps(mask, x.s.as_ptr().add(c));
                    let wm = _mm256_maskz_loadu_epi16(mask, rp.add(m + 2 * c) as *const i16);
                    macc = _mm512_fmadd_ps(_mm512_cvtph_ps(wm), xs, macc);
                }
                for p in 0..cnt / 2 {
                    let b = c + 2 * p;
                    // The same share of the next row: all its planes arrive in time (the
                    // scale plane at a row's start is what stalls otherwise).
                    let next = rp.wrapping_add(row_bytes + BYTES[T as usize] * b);
                    _mm_prefetch::<_MM_HINT_T0>(next as *const i8);
                    let xv = _mm512_loadu_si512(xp.add(32 * b) as *const __m512i);
                    // -offset * sum(xq) in lanes 0 and 8 (zero when the values are unsigned).
                    let init = if minimum {
                        _mm512_setzero_si512()
                    } else {
                        _mm512_sll_epi32(_mm512_loadu_si512(lp.add(8 * b) as *const __m512i), shift)
                    };
                    let q = rp.add(l.qs + l.qbytes * b);
                    let qh = rp.wrapping_add(l.qh.unwrap_or(0) + 4 * b);
                    let isum = _mm512_dpbusd_epi32(init, unsigned2::<T>(q, qh), xv);
                    let s = pair_scales(sc, p);
                    acc = _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(isum), acc);
                }
                c += cnt;
            }
            *o = _mm512_reduce_add_ps(acc);
            if minimum {
                *o += _mm512_reduce_add_ps(macc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::blocks::{block_shape, dot_int, QuantizedRows, Unpacked};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Packing and unpacking give the raw rows back, and the packed kernels equal the unpacked
    /// integer dot (the same integer sums, another f32 order), a row alone or among others;
    /// 2-36 blocks (one and three chunks of sixteen, partial chunks).
    #[test]
    fn packed_dot_matches_unpacked_integer_dot() {
        let types = [
            GgmlDType::Q8_0,
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q5_0,
            GgmlDType::Q5_1,
        ];
        for (ti, dt) in types.into_iter().enumerate() {
            let (sb, bb) = block_shape(dt).unwrap();
            for nb in [2usize, 16, 28, 36] {
                let (n, k) = (3, nb * sb);
                let x: Vec<f32> = crate::kernels::cpu::test_values(k, 5 + nb as u64, 2.0)
                    .into_iter()
                    .map(|v| v + 0.3)
                    .collect();
                let w: Vec<f32> = crate::kernels::cpu::test_values(n * k, 11 + ti as u64, 2.0)
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| v * (1 + i % 5) as f32)
                    .collect();
                let mag: Vec<f32> = w
                    .chunks(k)
                    .map(|r| r.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum())
                    .collect();
                let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
                let bytes = QTensor::quantize(&w, dt).unwrap().data().unwrap().to_vec();
                let mut packed = bytes.clone();
                pack_rows(dt, &mut packed, k);
                let mut again = packed.clone();
                unpack_rows(dt, &mut again, k);
                assert_eq!(again, bytes, "{dt:?}");
                let rb = nb * bb;
                let mut back = vec![0u8; rb];
                for r in 0..n {
                    unpack_row(dt, &packed[r * rb..(r + 1) * rb], k, &mut back);
                    assert_eq!(back, bytes[r * rb..(r + 1) * rb], "{dt:?} row {r}");
                }
                if !available() {
                    continue;
                }
                let xq = QuantizedRows::quantize(&x, k, sb);
                let mut u = Unpacked::default();
                for r in 0..n {
                    u.unpack(dt, &bytes[r * rb..(r + 1) * rb], k);
                    let want = dot_int(&u, xq.row(0));
                    let mut one = [0f32];
                    assert!(dot_rows(
                        dt,
                        &packed[r * rb..(r + 1) * rb],
                        xq.row(0),
                        &mut one
                    ));
                    let one = one[0];
                    // All rows in one call: each the same as alone.
                    let mut all = vec![0f32; n];
                    assert!(dot_rows(dt, &packed, xq.row(0), &mut all));
                    assert_eq!(one.to_bits(), all[r].to_bits(), "{dt:?} blocks={nb}");
                    assert!(
                        (one - want).abs() <= 2e-6 * (1.0 + mag[r]),
                        "{dt:?} blocks={nb} row {r}: packed {one} vs unpacked {want}"
                    );
                }
            }
        }
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: only the packing was checked");
        }
    }
}
