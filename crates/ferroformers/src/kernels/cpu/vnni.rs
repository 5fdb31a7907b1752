//! AVX-512 VNNI integer dots over raw GGUF blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 times Q8_0/Q8_1
//! activations; Q4_K and Q6_K times Q8_K, [`QuantizedRows`](super::blocks::QuantizedRows)): the
//! decoding kernels of the int8 mode on CPUs with `avx512vnni` (Intel Ice Lake and later, AMD
//! Zen 4 and later).
//!
//! K-quants: 64 values per `vpdpbusd` (Q4_K's nibbles and Q6_K's 6-bit values are unsigned
//! already), each lane's sum times its group's integer scale (`vpmulld`), summed per superblock
//! in i32; Q4_K's minimums and Q6_K's offset of 32 come from Q8_K's per-16 sums, as in the AVX2
//! kernels.
//!
//! Two blocks per step, in one 512-bit register. `vpdpbusd` multiplies unsigned by signed
//! bytes and sums fours into i32 lanes, without the 16-bit saturation of AVX2's `maddubs`, so
//! the weights are made unsigned by an offset that is a power of two (Q8_0: `q + 128`, Q4_0:
//! the nibble, `q + 8`; Q5_0: `q + 16`) and the offset times the block's activation sum is
//! taken off in the integers: the sums start from [`QRow::lanes`] (`-sum(xq)` per block),
//! shifted by the offset's power. Every block's integer sum is then exactly the one AVX2's
//! kernels and the portable loop compute; only the f32 summation order of the scaled blocks
//! differs.
//!
//! `FERROFORMERS_NO_VNNI=1` (or `FERROFORMERS_NO_SIMD=1`) turns these kernels off, for tests and
//! for benchmarking the AVX2 copy on the same machine.

use candle_core::quantized::GgmlDType;

use super::blocks::QRow;

/// Whether the CPU has AVX-512 F/BW/VL with VNNI (and F16C), and neither environment switch
/// turns the kernels off.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            let off = super::switch_on;
            !off("FERROFORMERS_NO_SIMD")
                && !off("FERROFORMERS_NO_VNNI")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vl")
                && std::arch::is_x86_feature_detected!("avx512vnni")
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `sum(value(l) * xq(l))` for one row of blocks; `None` for other types, on CPUs without the
/// features, or (32-value types) when `x` has no [`QRow::lanes`].
pub fn dot_blocks(dtype: GgmlDType, row: &[u8], x: QRow<'_>) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if available() {
        use GgmlDType as D;
        // SAFETY: the CPU has the features the kernels enable; the kernels assert the lengths.
        let k = unsafe {
            match dtype {
                D::Q2K => Some(x86::dot_q2k(row, x)),
                D::Q3K => Some(x86::dot_q3k(row, x)),
                D::Q4K => Some(x86::dot_q45k::<false>(row, x)),
                D::Q5K => Some(x86::dot_q45k::<true>(row, x)),
                D::Q6K => Some(x86::dot_q6k(row, x)),
                _ => None,
            }
        };
        if k.is_some() {
            return k;
        }
    }
    #[cfg(target_arch = "x86_64")]
    if available() && x.lanes.len() >= 8 * x.d.len() {
        use GgmlDType as D;
        // SAFETY: the CPU has the features the kernels enable; the kernels assert the lengths.
        unsafe {
            return match dtype {
                D::Q8_0 => Some(x86::dot::<0>(row, x)),
                D::Q4_0 => Some(x86::dot::<1>(row, x)),
                D::Q4_1 => Some(x86::dot::<2>(row, x)),
                D::Q5_0 => Some(x86::dot::<3>(row, x)),
                D::Q5_1 => Some(x86::dot::<4>(row, x)),
                _ => None,
            };
        }
    }
    let _ = (dtype, row, x);
    None
}

/// [`dot_blocks`] of four rows against one activation row, for the 32-value types (Q4_0,
/// Q4_1, Q5_0, Q5_1, Q8_0): each pair of activation blocks is loaded once for the four rows,
/// four independent sums run side by side, and one call does the work of four. A row's
/// result does not depend on the other three (one accumulator per row, the same order), so
/// the same row may be passed several times to fill the four. `None` where [`dot_blocks`]
/// has no such kernel.
pub fn dot4_blocks(dtype: GgmlDType, rows: [&[u8]; 4], x: QRow<'_>) -> Option<[f32; 4]> {
    #[cfg(target_arch = "x86_64")]
    if available() && x.lanes.len() >= 8 * x.d.len() {
        use GgmlDType as D;
        // SAFETY: the CPU has the features the kernel enables; it asserts the lengths.
        unsafe {
            return match dtype {
                D::Q8_0 => Some(x86::dot4::<0>(rows, x)),
                D::Q4_0 => Some(x86::dot4::<1>(rows, x)),
                D::Q4_1 => Some(x86::dot4::<2>(rows, x)),
                D::Q5_0 => Some(x86::dot4::<3>(rows, x)),
                D::Q5_1 => Some(x86::dot4::<4>(rows, x)),
                _ => None,
            };
        }
    }
    let _ = (dtype, rows, x);
    None
}

/// Whether [`dot4_blocks`] has a kernel for `dtype` on this CPU.
pub fn has_dot4(dtype: GgmlDType) -> bool {
    use GgmlDType as D;
    available() && matches!(dtype, D::Q8_0 | D::Q4_0 | D::Q4_1 | D::Q5_0 | D::Q5_1)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::QRow;
    use crate::kernels::cpu::blocks::avx2::{half, hsum};
    use std::arch::x86_64::*;

    /// How far ahead (bytes) the loop prefetches the weights.
    const PREFETCH: usize = 2048;

    /// Bytes per block of type `T` (0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, 4 Q5_1).
    const BYTES: [usize; 5] = [34, 18, 20, 22, 24];

    /// log2 of the offset that makes type `T`'s values unsigned (0: none, Q4_1/Q5_1 are).
    const SHIFT: [u32; 5] = [7, 3, 0, 4, 0];

    /// 16 packed-nibble bytes of two blocks (at `a` and `b`) -> 64 bytes: block a's low
    /// nibbles, its high nibbles, then block b's.
    #[inline(always)]
    unsafe fn nibbles2(a: *const u8, b: *const u8) -> __m512i {
        let y = _mm256_set_m128i(
            _mm_loadu_si128(b as *const __m128i),
            _mm_loadu_si128(a as *const __m128i),
        );
        let z = _mm512_permutexvar_epi64(
            _mm512_set_epi64(3, 2, 3, 2, 1, 0, 1, 0),
            _mm512_castsi256_si512(y),
        );
        let z = _mm512_mask_blend_epi64(0b1100_1100, z, _mm512_srli_epi16::<4>(z));
        _mm512_and_si512(z, _mm512_set1_epi8(0x0F))
    }

    /// The fifth bits of two Q5 blocks (32 bits each, at `a` and `b`) as a 64-lane mask.
    #[inline(always)]
    unsafe fn high_bits2(a: *const u8, b: *const u8) -> __mmask64 {
        let lo = (a as *const u32).read_unaligned() as u64;
        let hi = (b as *const u32).read_unaligned() as u64;
        lo | (hi << 32)
    }

    /// Two blocks' values made unsigned (value + 2^SHIFT[T]).
    #[inline(always)]
    unsafe fn unsigned2<const T: u8>(a: *const u8, b: *const u8) -> __m512i {
        match T {
            0 => {
                let lo = _mm256_loadu_si256(a.add(2) as *const __m256i);
                let hi = _mm256_loadu_si256(b.add(2) as *const __m256i);
                let q = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                _mm512_xor_si512(q, _mm512_set1_epi8(-128))
            }
            1 => nibbles2(a.add(2), b.add(2)),
            2 => nibbles2(a.add(4), b.add(4)),
            3 => {
                let n = nibbles2(a.add(6), b.add(6));
                _mm512_mask_add_epi8(n, high_bits2(a.add(2), b.add(2)), n, _mm512_set1_epi8(16))
            }
            _ => {
                let n = nibbles2(a.add(8), b.add(8));
                _mm512_mask_add_epi8(n, high_bits2(a.add(4), b.add(4)), n, _mm512_set1_epi8(16))
            }
        }
    }

    /// One block's values made unsigned, in 256 bits (the odd block at the end of a row).
    #[inline(always)]
    unsafe fn unsigned1<const T: u8>(a: *const u8) -> __m256i {
        _mm512_castsi512_si256(unsigned2::<T>(a, a))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot<const T: u8>(row: &[u8], x: QRow<'_>) -> f32 {
        let bytes = BYTES[T as usize];
        let nb = x.d.len();
        assert!(
            row.len() >= nb * bytes
                && x.q.len() >= nb * 32
                && x.s.len() >= nb
                && x.lanes.len() >= nb * 8
        );
        let (rp, xp, lp) = (row.as_ptr(), x.q.as_ptr(), x.lanes.as_ptr());
        let shift = _mm_cvtsi32_si128(SHIFT[T as usize] as i32);
        let minimum = T == 2 || T == 4;
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut mins = 0f32;
        let pairs = nb / 2;
        for p in 0..pairs {
            let b = 2 * p;
            let (a, c) = (rp.add(b * bytes), rp.add((b + 1) * bytes));
            _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PREFETCH) as *const i8);
            let u = unsigned2::<T>(a, c);
            let xv = _mm512_loadu_si512(xp.add(32 * b) as *const __m512i);
            // -offset * sum(xq) in lanes 0 and 8 (zero when the values are unsigned already).
            let init = if minimum {
                _mm512_setzero_si512()
            } else {
                _mm512_sll_epi32(_mm512_loadu_si512(lp.add(8 * b) as *const __m512i), shift)
            };
            let isum = _mm512_dpbusd_epi32(init, u, xv);
            let (s0, s1) = (x.d[b] * half(a), x.d[b + 1] * half(c));
            let scale = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(s0), _mm512_set1_ps(s1));
            if p % 2 == 0 {
                acc0 = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), acc0);
            } else {
                acc1 = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), acc1);
            }
            if minimum {
                // value = d * q + m: the minimum times Q8_1's s.
                mins += half(a.add(2)) * x.s[b] + half(c.add(2)) * x.s[b + 1];
            }
        }
        let mut total = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        if nb % 2 == 1 {
            let b = nb - 1;
            let a = rp.add(b * bytes);
            let u = unsigned1::<T>(a);
            let xv = _mm256_loadu_si256(xp.add(32 * b) as *const __m256i);
            let init = if minimum {
                _mm256_setzero_si256()
            } else {
                _mm256_sll_epi32(_mm256_loadu_si256(lp.add(8 * b) as *const __m256i), shift)
            };
            let isum = _mm256_dpbusd_epi32(init, u, xv);
            total += x.d[b] * half(a) * hsum(_mm256_cvtepi32_ps(isum));
            if minimum {
                mins += half(a.add(2)) * x.s[b];
            }
        }
        total + mins
    }

    /// [`dot`] for four rows at once (see [`super::dot4_blocks`]).
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot4<const T: u8>(rows: [&[u8]; 4], x: QRow<'_>) -> [f32; 4] {
        let bytes = BYTES[T as usize];
        let nb = x.d.len();
        assert!(
            rows.iter().all(|r| r.len() >= nb * bytes)
                && x.q.len() >= nb * 32
                && x.s.len() >= nb
                && x.lanes.len() >= nb * 8
        );
        let rp = rows.map(|r| r.as_ptr());
        let (xp, lp) = (x.q.as_ptr(), x.lanes.as_ptr());
        let shift = _mm_cvtsi32_si128(SHIFT[T as usize] as i32);
        let minimum = T == 2 || T == 4;
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut mins = [0f32; 4];
        for p in 0..nb / 2 {
            let b = 2 * p;
            let xv = _mm512_loadu_si512(xp.add(32 * b) as *const __m512i);
            let init = if minimum {
                _mm512_setzero_si512()
            } else {
                _mm512_sll_epi32(_mm512_loadu_si512(lp.add(8 * b) as *const __m512i), shift)
            };
            let (d0, d1) = (x.d[b], x.d[b + 1]);
            for r in 0..4 {
                let (a, c) = (rp[r].add(b * bytes), rp[r].add((b + 1) * bytes));
                _mm_prefetch::<_MM_HINT_T0>(a.wrapping_add(PREFETCH) as *const i8);
                let isum = _mm512_dpbusd_epi32(init, unsigned2::<T>(a, c), xv);
                let scale = _mm512_mask_blend_ps(
                    0xFF00,
                    _mm512_set1_ps(d0 * half(a)),
                    _mm512_set1_ps(d1 * half(c)),
                );
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(isum), acc[r]);
                if minimum {
                    mins[r] += half(a.add(2)) * x.s[b] + half(c.add(2)) * x.s[b + 1];
                }
            }
        }
        let mut total = acc.map(|a| _mm512_reduce_add_ps(a));
        if nb % 2 == 1 {
            let b = nb - 1;
            let xv = _mm256_loadu_si256(xp.add(32 * b) as *const __m256i);
            let init = if minimum {
                _mm256_setzero_si256()
            } else {
                _mm256_sll_epi32(_mm256_loadu_si256(lp.add(8 * b) as *const __m256i), shift)
            };
            for r in 0..4 {
                let a = rp[r].add(b * bytes);
                let isum = _mm256_dpbusd_epi32(init, unsigned1::<T>(a), xv);
                total[r] += x.d[b] * half(a) * hsum(_mm256_cvtepi32_ps(isum));
                if minimum {
                    mins[r] += half(a.add(2)) * x.s[b];
                }
            }
        }
        [0, 1, 2, 3].map(|r| total[r] + mins[r])
    }

    /// Q4_K's eight 6-bit scales and eight 6-bit minimums from its 12 packed bytes, one per
    /// byte (scales, minimums), as ggml's `utmp` masks unpack them.
    #[inline(always)]
    pub(super) unsafe fn scales_mins_k4(p: *const u8) -> (u64, u64) {
        const K1: u32 = 0x3f3f_3f3f;
        const K2: u32 = 0x0f0f_0f0f;
        const K3: u32 = 0x0303_0303;
        let u0 = (p as *const u32).read_unaligned();
        let u1 = (p.add(4) as *const u32).read_unaligned();
        let u2 = (p.add(8) as *const u32).read_unaligned();
        let s_hi = (u2 & K2) | (((u0 >> 6) & K3) << 4);
        let m_hi = ((u2 >> 4) & K2) | (((u1 >> 6) & K3) << 4);
        (
            (u0 & K1) as u64 | (s_hi as u64) << 32,
            (u1 & K1) as u64 | (m_hi as u64) << 32,
        )
    }

    /// Q4_K (144-byte superblocks of 256: 8 groups of 32 with 6-bit scales and minimums) or,
    /// `Q5`, Q5_K (176 bytes: the same scales, a fifth bit per value in 32 bytes, then the
    /// nibbles) times Q8_K: the scales and minimums unpacked with integer masks, each group's
    /// scale picked per lane by a permute, the minimums times Q8_K's group sums in one vector.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q45k<const Q5: bool>(row: &[u8], x: QRow<'_>) -> f32 {
        let bytes = if Q5 { 176 } else { 144 };
        let nb = x.d.len();
        assert!(row.len() >= nb * bytes && x.q.len() >= nb * 256 && x.gsum.len() >= nb * 16);
        let (rp, xp, gp) = (row.as_ptr(), x.q.as_ptr(), x.gsum.as_ptr());
        let low = _mm512_set1_epi8(0x0F);
        // 16-bit lanes 0..16 of the j-th pair sums belong to group 2j, lanes 16..32 to 2j + 1.
        let pair = lanes16(&PAIR16);
        // Q8_K's sums per 16 values: lanes 2g, 2g + 1 take group g's minimum.
        let halves = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
        let mut acc = _mm512_setzero_ps();
        let mut macc = _mm512_setzero_ps();
        for b in 0..nb {
            let blk = rp.add(b * bytes);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let (sc, mn) = scales_mins_k4(blk.add(4));
            let sc = _mm512_castsi128_si512(_mm_cvtepu8_epi16(_mm_cvtsi64_si128(sc as i64)));
            let mn = _mm512_cvtepu8_epi32(_mm_cvtsi64_si128(mn as i64));
            let (qs, xb) = (blk.add(if Q5 { 48 } else { 16 }), xp.add(b * 256));
            // Q5_K's fifth bits: group 2j's in bit 2j of the lower 32 bytes, group 2j + 1's
            // in bit 2j of the upper ones (shifted down by one).
            let qh = if Q5 {
                let h = _mm256_loadu_si256(blk.add(16) as *const __m256i);
                _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h), _mm256_srli_epi16::<1>(h))
            } else {
                _mm512_setzero_si512()
            };
            let mut isum = _mm512_setzero_si512();
            for j in 0..4 {
                // 32 bytes of nibbles: the low ones are group 2j, the high ones group 2j + 1.
                let q = _mm256_loadu_si256(qs.add(32 * j) as *const __m256i);
                let z =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<4>(q));
                let mut u = _mm512_and_si512(z, low);
                if Q5 {
                    let set = _mm512_test_epi8_mask(qh, _mm512_set1_epi8(1 << (2 * j)));
                    u = _mm512_mask_add_epi8(u, set, u, _mm512_set1_epi8(16));
                }
                let xv = _mm512_loadu_si512(xb.add(64 * j) as *const __m512i);
                // Pair sums in 16 bits (at most 31 * 128 * 2), then times their group's
                // scale, summed in pairs into 32 bits.
                let p = _mm512_maddubs_epi16(u, xv);
                let s = _mm512_permutexvar_epi16(
                    _mm512_add_epi16(pair, _mm512_set1_epi16(2 * j as i16)),
                    sc,
                );
                isum = _mm512_dpwssd_epi32(isum, p, s);
            }
            let dx = x.d[b];
            acc = _mm512_fmadd_ps(
                _mm512_set1_ps(dx * half(blk)),
                _mm512_cvtepi32_ps(isum),
                acc,
            );
            let gs = _mm512_loadu_si512(gp.add(b * 16) as *const __m512i);
            let imin = _mm512_mullo_epi32(_mm512_permutexvar_epi32(halves, mn), gs);
            macc = _mm512_fmadd_ps(
                _mm512_set1_ps(dx * half(blk.add(2))),
                _mm512_cvtepi32_ps(imin),
                macc,
            );
        }
        _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(macc)
    }

    /// Q6_K (210-byte superblocks of 256: 16 groups of 16 with i8 scales; values 0..63 less 32)
    /// times Q8_K.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q6k(row: &[u8], x: QRow<'_>) -> f32 {
        let nb = x.d.len();
        assert!(row.len() >= nb * 210 && x.q.len() >= nb * 256 && x.gsum.len() >= nb * 16);
        let (rp, xp, gp) = (row.as_ptr(), x.q.as_ptr(), x.gsum.as_ptr());
        let (low, two) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x03));
        let mut acc = _mm512_setzero_ps();
        for b in 0..nb {
            let blk = rp.add(b * 210);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let xb = xp.add(b * 256);
            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(blk.add(192) as *const __m128i));
            let sc16 = scales16_i8(blk.add(192));
            // The offset of 32: 32 * sum(sc[g] * gsum[g]), taken off in i32.
            let gs = _mm512_loadu_si512(gp.add(b * 16) as *const __m512i);
            let mut isum = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_slli_epi32::<5>(_mm512_mullo_epi32(sc, gs)),
            );
            for n in 0..2 {
                let ql = _mm512_loadu_si512(blk.add(64 * n) as *const __m512i);
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                let qh2 =
                    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(qh), _mm256_srli_epi16::<2>(qh));
                // Values 128n..128n+64 (groups 8n..8n+4), then 128n+64..128n+128.
                let a = _mm512_or_si512(
                    _mm512_and_si512(ql, low),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(qh2, two)),
                );
                let c = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), low),
                    _mm512_slli_epi16::<4>(_mm512_and_si512(_mm512_srli_epi16::<4>(qh2), two)),
                );
                isum = _mm512_add_epi32(
                    isum,
                    scaled_pairs([a, c], xb.add(128 * n), sc16, 8 * n as i32),
                );
            }
            let d = x.d[b] * half(blk.add(208));
            acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum), acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// The 2-bit fields of 32 bytes, two per 64-value vector: `[c0 | c1]` (values 0..64 of
    /// the 128 the bytes hold) and `[c2 | c3]` (values 64..128).
    #[inline(always)]
    unsafe fn crumb_pairs(q: __m256i) -> [__m512i; 2] {
        let three = _mm512_set1_epi8(3);
        let q2 = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(q), _mm256_srli_epi16::<2>(q));
        [
            _mm512_and_si512(q2, three),
            _mm512_and_si512(_mm512_srli_epi16::<4>(q2), three),
        ]
    }

    /// `sum(sc[g] * v * x)` over the two 64-value halves of 128 values (unsigned, at most 63)
    /// whose 16-value groups start at `first`; `sc16` holds the 16 scales as 16-bit lanes.
    /// The pair sums stay in 16 bits (at most 63 * 128 * 2); 16-bit lane l of half h belongs
    /// to group `first + 4h + l / 8`, and its scale is applied by `vpdpwssd`.
    #[inline(always)]
    unsafe fn scaled_pairs(v: [__m512i; 2], xb: *const i8, sc16: __m512i, first: i32) -> __m512i {
        let quarter = lanes16(&QUARTER16);
        let mut isum = _mm512_setzero_si512();
        for (h, v) in v.into_iter().enumerate() {
            let xv = _mm512_loadu_si512(xb.add(64 * h) as *const __m512i);
            let p = _mm512_maddubs_epi16(v, xv);
            let idx = _mm512_add_epi16(quarter, _mm512_set1_epi16((first + 4 * h as i32) as i16));
            isum = _mm512_dpwssd_epi32(isum, p, _mm512_permutexvar_epi16(idx, sc16));
        }
        isum
    }

    /// 32 16-bit lanes from a table.
    #[inline(always)]
    unsafe fn lanes16(t: &[i16; 32]) -> __m512i {
        _mm512_loadu_si512(t.as_ptr() as *const __m512i)
    }

    /// Group index (less the first) of each 16-bit lane of 64 values in groups of 32 / of 16.
    static PAIR16: [i16; 32] = {
        let mut t = [0i16; 32];
        let mut i = 16;
        while i < 32 {
            t[i] = 1;
            i += 1;
        }
        t
    };
    static QUARTER16: [i16; 32] = {
        let mut t = [0i16; 32];
        let mut i = 0;
        while i < 32 {
            t[i] = (i / 8) as i16;
            i += 1;
        }
        t
    };

    /// 16 signed 8-bit scales as 16-bit lanes (the low half of a vector).
    #[inline(always)]
    unsafe fn scales16_i8(p: *const u8) -> __m512i {
        _mm512_castsi256_si512(_mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i)))
    }

    /// Q3_K (110-byte superblocks: high-bit mask, 2-bit values, 16 packed 6-bit scales, `d`)
    /// times Q8_K. Values are kept unsigned as `v + 4` (the low bits, plus 4 where the mask
    /// bit is set) and the offset taken off as `4 * sum(sc * gsum)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q3k(row: &[u8], x: QRow<'_>) -> f32 {
        let nb = x.d.len();
        assert!(row.len() >= nb * 110 && x.q.len() >= nb * 256 && x.gsum.len() >= nb * 16);
        let (rp, xp, gp) = (row.as_ptr(), x.q.as_ptr(), x.gsum.as_ptr());
        let four = _mm512_set1_epi8(4);
        let mut acc = _mm512_setzero_ps();
        for b in 0..nb {
            let blk = rp.add(b * 110);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let xb = xp.add(b * 256);
            let scales = crate::kernels::cpu::blocks::q3k_scales(std::slice::from_raw_parts(
                blk.add(96),
                12,
            ));
            let sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(scales.as_ptr() as *const __m128i));
            let sc16 = scales16_i8(scales.as_ptr() as *const u8);
            let gs = _mm512_loadu_si512(gp.add(b * 16) as *const __m512i);
            let mut isum = _mm512_sub_epi32(
                _mm512_setzero_si512(),
                _mm512_slli_epi32::<2>(_mm512_mullo_epi32(sc, gs)),
            );
            // Mask bit 4n + c marks values 128n + 32c..+32: bit m of the lower 32 bytes, bit
            // m + 1 in the upper ones (shifted down by one).
            let h = _mm256_loadu_si256(blk as *const __m256i);
            let hm = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h), _mm256_srli_epi16::<1>(h));
            for n in 0..2 {
                let q = _mm256_loadu_si256(blk.add(32 + 32 * n) as *const __m256i);
                let mut v = crumb_pairs(q);
                for (p, v) in v.iter_mut().enumerate() {
                    let bit = _mm512_set1_epi8(1 << (4 * n + 2 * p));
                    *v = _mm512_mask_add_epi8(*v, _mm512_test_epi8_mask(hm, bit), *v, four);
                }
                isum = _mm512_add_epi32(isum, scaled_pairs(v, xb.add(128 * n), sc16, 8 * n as i32));
            }
            let d = x.d[b] * half(blk.add(108));
            acc = _mm512_fmadd_ps(_mm512_set1_ps(d), _mm512_cvtepi32_ps(isum), acc);
        }
        _mm512_reduce_add_ps(acc)
    }

    /// Q2_K (84-byte superblocks: 16 bytes of 4-bit scale and minimum pairs, 2-bit values,
    /// `d`, `dmin`) times Q8_K: `dx * d * sum(sc * q * xq) - dx * dmin * sum(mn * gsum)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
    pub unsafe fn dot_q2k(row: &[u8], x: QRow<'_>) -> f32 {
        let nb = x.d.len();
        assert!(row.len() >= nb * 84 && x.q.len() >= nb * 256 && x.gsum.len() >= nb * 16);
        let (rp, xp, gp) = (row.as_ptr(), x.q.as_ptr(), x.gsum.as_ptr());
        let low = _mm_set1_epi8(0x0F);
        let (mut acc, mut macc) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for b in 0..nb {
            let blk = rp.add(b * 84);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let xb = xp.add(b * 256);
            let packed = _mm_loadu_si128(blk as *const __m128i);
            let sc16 = _mm512_castsi256_si512(_mm256_cvtepu8_epi16(_mm_and_si128(packed, low)));
            let mn = _mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16::<4>(packed), low));
            let gs = _mm512_loadu_si512(gp.add(b * 16) as *const __m512i);
            let mut isum = _mm512_setzero_si512();
            for n in 0..2 {
                let q = _mm256_loadu_si256(blk.add(16 + 32 * n) as *const __m256i);
                isum = _mm512_add_epi32(
                    isum,
                    scaled_pairs(crumb_pairs(q), xb.add(128 * n), sc16, 8 * n as i32),
                );
            }
            let dx = x.d[b];
            acc = _mm512_fmadd_ps(
                _mm512_set1_ps(dx * half(blk.add(80))),
                _mm512_cvtepi32_ps(isum),
                acc,
            );
            macc = _mm512_fmadd_ps(
                _mm512_set1_ps(dx * half(blk.add(82))),
                _mm512_cvtepi32_ps(_mm512_mullo_epi32(mn, gs)),
                macc,
            );
        }
        _mm512_reduce_add_ps(acc) - _mm512_reduce_add_ps(macc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask unpacking of Q4_K's scales and minimums equals ggml's per-group one.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q4k_scales_unpack_like_ggml() {
        use crate::kernels::cpu::blocks::scale_min_k4;
        let mut seed = 3u64;
        for _ in 0..200 {
            let q: [u8; 12] = std::array::from_fn(|_| {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                (seed >> 56) as u8
            });
            // SAFETY: 12 readable bytes.
            let (sc, mn) = unsafe { x86::scales_mins_k4(q.as_ptr()) };
            for j in 0..8 {
                let (s, m) = scale_min_k4(j, &q);
                assert_eq!(((sc >> (8 * j)) & 0xFF) as u8, s, "scale {j} of {q:?}");
                assert_eq!(((mn >> (8 * j)) & 0xFF) as u8, m, "minimum {j} of {q:?}");
            }
        }
    }
    use crate::kernels::cpu::blocks::{block_shape, dot_int, QuantizedRows, Unpacked};
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every type with a VNNI kernel, even and odd block counts, with values spread wide enough that
    /// the offsets matter: the VNNI dot equals the unpacked integer dot (the same integer sums,
    /// summed in another f32 order).
    #[test]
    fn vnni_dot_matches_unpacked_integer_dot() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        let types = crate::kernels::cpu::blocks::BLOCK_TYPES;
        let mut seed = 17u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for dt in types {
            let (sb, bb) = block_shape(dt).unwrap();
            for nb in [1usize, 2, 3, 7, 28] {
                let (n, k) = (3, nb * sb);
                let x: Vec<f32> = (0..k).map(|_| next() + 0.3).collect();
                let w: Vec<f32> = (0..n * k).map(|i| next() * (1 + i % 5) as f32).collect();
                // Summation-order slack grows with the terms' magnitudes, not the result's.
                let mag: Vec<f32> = w
                    .chunks(k)
                    .map(|r| r.iter().zip(&x).map(|(a, b)| (a * b).abs()).sum())
                    .collect();
                let w = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
                let bytes = QTensor::quantize(&w, dt).unwrap().data().unwrap().to_vec();
                let xq = QuantizedRows::quantize(&x, k, sb);
                let mut u = Unpacked::default();
                for r in 0..n {
                    let row = &bytes[r * nb * bb..(r + 1) * nb * bb];
                    u.unpack(dt, row, k);
                    let want = dot_int(&u, xq.row(0));
                    let got = dot_blocks(dt, row, xq.row(0)).expect("a VNNI kernel");
                    assert!(
                        (got - want).abs() <= 2e-6 * (1.0 + mag[r]),
                        "{dt:?} blocks={nb} row {r}: vnni {got} vs unpacked {want}"
                    );
                    if has_dot4(dt) {
                        // Four rows at once: the same value for row r wherever it sits among
                        // the four, and within the same slack of the unpacked dot.
                        let other = &bytes[((r + 1) % n) * nb * bb..((r + 1) % n + 1) * nb * bb];
                        let a = dot4_blocks(dt, [row, other, other, row], xq.row(0)).unwrap();
                        let b = dot4_blocks(dt, [other, row, other, other], xq.row(0)).unwrap();
                        assert_eq!(a[0].to_bits(), a[3].to_bits());
                        assert_eq!(a[0].to_bits(), b[1].to_bits());
                        assert!(
                            (a[0] - want).abs() <= 2e-6 * (1.0 + mag[r]),
                            "{dt:?} blocks={nb} row {r}: vnni x4 {} vs unpacked {want}",
                            a[0]
                        );
                    }
                }
            }
        }
    }
}
