//! GGUF weight blocks unpacked to small integers, and the dot products over them.
//!
//! Every block type we load (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K) has the same shape once
//! unpacked: superblocks of `sb` values (32, or 256 for K-quants), each with a scale `d` and a
//! minimum scale `dmin`, split into groups of 16 with small integer scales `sc[g]` and minimums
//! `mn[g]`, and one small integer `q[l]` per value:
//!
//! ```text
//! value(l) = (d * sc[g]) * q[l] - (dmin * mn[g])      (f32, in that order)
//! ```
//!
//! which is GGUF's dequantization to the bit (Q4_1's `d * q + m` is `d * q - (-m)`). One
//! unpacking per type then serves three consumers:
//! - [`dequantize`]: rows as f32 (embeddings, prompt batches);
//! - [`dot_exact`]: f32 activations, the numbers transformers gets from a dequantized model;
//! - [`dot_int`]: activations rounded to 8 bits per block as llama.cpp does ([`QuantizedRows`]:
//!   Q8_0/Q8_1 for the 32-value types, Q8_K for K-quants) and integer products, with AVX2 and a
//!   portable copy chosen at run time.

use candle_core::quantized::GgmlDType;

use super::simd::dispatch;

/// Values per scale group.
pub const GROUP: usize = 16;

/// Every GGUF block type the CPU kernels take (the ones [`block_shape`] knows).
pub const BLOCK_TYPES: [GgmlDType; 10] = {
    use GgmlDType as D;
    [
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
    ]
};

/// Block types this module unpacks, with (values per block, bytes per block).
pub fn block_shape(dtype: GgmlDType) -> Option<(usize, usize)> {
    use GgmlDType as D;
    Some(match dtype {
        D::Q4_0 => (32, 18),
        D::Q4_1 => (32, 20),
        D::Q5_0 => (32, 22),
        D::Q5_1 => (32, 24),
        D::Q8_0 => (32, 34),
        D::Q2K => (256, 84),
        D::Q3K => (256, 110),
        D::Q4K => (256, 144),
        D::Q5K => (256, 176),
        D::Q6K => (256, 210),
        _ => return None,
    })
}

/// One weight row unpacked (buffers reused from row to row).
#[derive(Default, Clone)]
pub struct Unpacked {
    /// Values per superblock: 32 or 256.
    pub sb: usize,
    /// Whether `mn` is used (types with a minimum: Q4_1, Q5_1, Q2_K, Q4_K, Q5_K).
    pub has_min: bool,
    pub q: Vec<i8>,
    pub sc: Vec<i8>,
    pub mn: Vec<i8>,
    pub d: Vec<f32>,
    pub dmin: Vec<f32>,
}

/// IEEE half -> f32, exact for every value.
#[inline(always)]
pub fn f16_at(b: &[u8], i: usize) -> f32 {
    let h = u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let v = if em >= 0x7c00 {
        f32::from_bits((em << 13) | 0x7f80_0000)
    } else {
        // Normal and subnormal halves: the bits shifted into f32 place, times 2^112 (exact).
        f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(v.to_bits() | sign)
}

/// ggml's `nearest_int`: round to nearest, ties to even (for |x| < 2^22).
#[inline(always)]
fn round_even(x: f32) -> i32 {
    let v = x + 12_582_912.0;
    (v.to_bits() & 0x007f_ffff) as i32 - 0x0040_0000
}

/// ggml's K-quant 6-bit scale and minimum `j` (of 8) from the 12 packed bytes.
#[inline(always)]
pub(super) fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// Q3_K's 16 signed 6-bit scales (less 32) from the 12 packed bytes, as ggml unpacks them.
#[inline(always)]
pub(super) fn q3k_scales(packed: &[u8]) -> [i8; 16] {
    let mut aux = [0u32; 4];
    for (i, a) in aux.iter_mut().take(3).enumerate() {
        *a = u32::from_le_bytes([
            packed[4 * i],
            packed[4 * i + 1],
            packed[4 * i + 2],
            packed[4 * i + 3],
        ]);
    }
    const KMASK1: u32 = 0x0303_0303;
    const KMASK2: u32 = 0x0f0f_0f0f;
    let tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & KMASK2) | (((tmp >> 4) & KMASK1) << 4);
    aux[3] = ((aux[1] >> 4) & KMASK2) | (((tmp >> 6) & KMASK1) << 4);
    aux[0] = (aux[0] & KMASK2) | ((tmp & KMASK1) << 4);
    aux[1] = (aux[1] & KMASK2) | (((tmp >> 2) & KMASK1) << 4);
    std::array::from_fn(|g| ((aux[g / 4] >> (8 * (g % 4))) as u8 as i8) - 32)
}

impl Unpacked {
    /// Unpack one row (`row` holds whole blocks of `dtype`; `k` values).
    pub fn unpack(&mut self, dtype: GgmlDType, row: &[u8], k: usize) {
        let (sb, _) = block_shape(dtype).expect("unpack: a block type from block_shape");
        self.sb = sb;
        self.q.resize(k, 0);
        self.sc.resize(k / GROUP, 0);
        self.mn.resize(k / GROUP, 0);
        self.d.resize(k / sb, 0.0);
        self.dmin.resize(k / sb, 0.0);
        self.has_min = matches!(
            dtype,
            GgmlDType::Q4_1 | GgmlDType::Q5_1 | GgmlDType::Q2K | GgmlDType::Q4K | GgmlDType::Q5K
        );
        unpack_row(
            dtype,
            row,
            &mut self.q,
            &mut self.sc,
            &mut self.mn,
            &mut self.d,
            &mut self.dmin,
        );
    }
}

#[inline(always)]
fn unpack_g(
    dtype: GgmlDType,
    row: &[u8],
    q: &mut [i8],
    sc: &mut [i8],
    mn: &mut [i8],
    d: &mut [f32],
    dmin: &mut [f32],
) {
    use GgmlDType as D;
    match dtype {
        D::Q4_0 | D::Q4_1 | D::Q5_0 | D::Q5_1 | D::Q8_0 => {
            let (_, bytes) = block_shape(dtype).unwrap_or((32, 18));
            sc.fill(1);
            let with_min = matches!(dtype, D::Q4_1 | D::Q5_1);
            mn.fill(with_min as i8);
            for (b, blk) in row.chunks_exact(bytes).enumerate() {
                let o = &mut q[b * 32..b * 32 + 32];
                d[b] = f16_at(blk, 0);
                dmin[b] = if with_min { -f16_at(blk, 2) } else { 0.0 };
                match dtype {
                    D::Q4_0 => {
                        let qs = &blk[2..18];
                        for j in 0..16 {
                            o[j] = (qs[j] & 0x0F) as i8 - 8;
                            o[j + 16] = (qs[j] >> 4) as i8 - 8;
                        }
                    }
                    D::Q4_1 => {
                        let qs = &blk[4..20];
                        for j in 0..16 {
                            o[j] = (qs[j] & 0x0F) as i8;
                            o[j + 16] = (qs[j] >> 4) as i8;
                        }
                    }
                    D::Q5_0 | D::Q5_1 => {
                        let off = if dtype == D::Q5_0 { 2 } else { 4 };
                        let qh = u32::from_le_bytes([
                            blk[off],
                            blk[off + 1],
                            blk[off + 2],
                            blk[off + 3],
                        ]);
                        let qs = &blk[off + 4..off + 20];
                        let bias = if dtype == D::Q5_0 { 16 } else { 0 };
                        for j in 0..16 {
                            let h0 = (((qh >> j) << 4) & 0x10) as u8;
                            let h1 = ((qh >> (j + 12)) & 0x10) as u8;
                            o[j] = ((qs[j] & 0x0F) | h0) as i8 - bias;
                            o[j + 16] = ((qs[j] >> 4) | h1) as i8 - bias;
                        }
                    }
                    _ => {
                        for j in 0..32 {
                            o[j] = blk[2 + j] as i8;
                        }
                    }
                }
            }
        }
        D::Q4K | D::Q5K => {
            let bytes = if dtype == D::Q4K { 144 } else { 176 };
            for (b, blk) in row.chunks_exact(bytes).enumerate() {
                d[b] = f16_at(blk, 0);
                dmin[b] = f16_at(blk, 2);
                let scales = &blk[4..16];
                let (qh, qs) = if dtype == D::Q4K {
                    (&blk[0..0], &blk[16..144])
                } else {
                    (&blk[16..48], &blk[48..176])
                };
                let o = &mut q[b * 256..b * 256 + 256];
                for j in 0..4 {
                    let (s1, m1) = scale_min_k4(2 * j, scales);
                    let (s2, m2) = scale_min_k4(2 * j + 1, scales);
                    let g = b * 16 + 4 * j;
                    sc[g] = s1 as i8;
                    sc[g + 1] = s1 as i8;
                    sc[g + 2] = s2 as i8;
                    sc[g + 3] = s2 as i8;
                    mn[g] = m1 as i8;
                    mn[g + 1] = m1 as i8;
                    mn[g + 2] = m2 as i8;
                    mn[g + 3] = m2 as i8;
                    let src = &qs[32 * j..32 * j + 32];
                    let (lo, hi) = o[64 * j..64 * j + 64].split_at_mut(32);
                    if dtype == D::Q4K {
                        for l in 0..32 {
                            lo[l] = (src[l] & 0x0F) as i8;
                            hi[l] = (src[l] >> 4) as i8;
                        }
                    } else {
                        let (u1, u2) = (1u8 << (2 * j), 2u8 << (2 * j));
                        for l in 0..32 {
                            let h1 = if qh[l] & u1 != 0 { 16 } else { 0 };
                            let h2 = if qh[l] & u2 != 0 { 16 } else { 0 };
                            lo[l] = ((src[l] & 0x0F) + h1) as i8;
                            hi[l] = ((src[l] >> 4) + h2) as i8;
                        }
                    }
                }
            }
        }
        D::Q6K => {
            for (b, blk) in row.chunks_exact(210).enumerate() {
                let (ql, qh) = (&blk[0..128], &blk[128..192]);
                for g in 0..16 {
                    sc[b * 16 + g] = blk[192 + g] as i8;
                    mn[b * 16 + g] = 0;
                }
                d[b] = f16_at(blk, 208);
                dmin[b] = 0.0;
                for n in 0..2 {
                    let (ql, qh) = (&ql[64 * n..64 * n + 64], &qh[32 * n..32 * n + 32]);
                    let o = &mut q[b * 256 + 128 * n..b * 256 + 128 * n + 128];
                    for l in 0..32 {
                        o[l] = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                        o[l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                        o[l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                        o[l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    }
                }
            }
        }
        D::Q2K => {
            for (b, blk) in row.chunks_exact(84).enumerate() {
                let (scales, qs) = (&blk[0..16], &blk[16..80]);
                d[b] = f16_at(blk, 80);
                dmin[b] = f16_at(blk, 82);
                for g in 0..16 {
                    sc[b * 16 + g] = (scales[g] & 0xF) as i8;
                    mn[b * 16 + g] = (scales[g] >> 4) as i8;
                }
                for n in 0..2 {
                    let qs = &qs[32 * n..32 * n + 32];
                    for gl in 0..8 {
                        let shift = 2 * (gl / 2);
                        let src = &qs[16 * (gl % 2)..16 * (gl % 2) + 16];
                        let o = &mut q[b * 256 + 128 * n + 16 * gl..][..16];
                        for l in 0..16 {
                            o[l] = ((src[l] >> shift) & 3) as i8;
                        }
                    }
                }
            }
        }
        D::Q3K => {
            for (b, blk) in row.chunks_exact(110).enumerate() {
                let (hmask, qs, packed) = (&blk[0..32], &blk[32..96], &blk[96..108]);
                d[b] = f16_at(blk, 108);
                dmin[b] = 0.0;
                sc[b * 16..b * 16 + 16].copy_from_slice(&q3k_scales(packed));
                mn[b * 16..b * 16 + 16].fill(0);
                let mut m = 1u8;
                for n in 0..2 {
                    let qs = &qs[32 * n..32 * n + 32];
                    for c in 0..4 {
                        let shift = 2 * c;
                        for half in 0..2 {
                            let o = &mut q[b * 256 + 128 * n + 32 * c + 16 * half..][..16];
                            let (qs, hm) = (&qs[16 * half..16 * half + 16], &hmask[16 * half..]);
                            for ((o, &q), &h) in o.iter_mut().zip(qs).zip(hm) {
                                let low = ((q >> shift) & 3) as i8;
                                *o = low - if h & m == 0 { 4 } else { 0 };
                            }
                        }
                        m <<= 1;
                    }
                }
            }
        }
        _ => unreachable!("unpack: {dtype:?} has no block layout here"),
    }
}

dispatch!(fn unpack_row(dtype: GgmlDType, row: &[u8], q: &mut [i8], sc: &mut [i8], mn: &mut [i8], d: &mut [f32], dmin: &mut [f32]); via unpack_g);

#[inline(always)]
fn dequantize_g(u: &Unpacked, out: &mut [f32]) {
    for (g, (o, q)) in out
        .chunks_exact_mut(GROUP)
        .zip(u.q.chunks_exact(GROUP))
        .enumerate()
    {
        let s = g * GROUP / u.sb;
        let a = u.d[s] * u.sc[g] as f32;
        let b = u.dmin[s] * u.mn[g] as f32;
        for l in 0..GROUP {
            o[l] = a * q[l] as f32 - b;
        }
    }
}

dispatch!(fn dequantize_auto(u: &Unpacked, out: &mut [f32]); via dequantize_g);

/// The unpacked row as f32: GGUF's dequantization, bit for bit.
pub fn dequantize(u: &Unpacked, out: &mut [f32]) {
    dequantize_auto(u, out)
}

/// Per-16 sums of an activation row (the minimum terms of [`dot_exact`]).
pub fn group_sums(x: &[f32], out: &mut Vec<f32>) {
    out.clear();
    out.extend(x.chunks_exact(GROUP).map(|c| {
        let mut s = 0f32;
        for v in c {
            s += v;
        }
        s
    }));
}

#[inline(always)]
fn dot_exact_g(u: &Unpacked, x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = [0f32; GROUP];
    let mut mins = 0f32;
    for (g, (q, xg)) in
        u.q.chunks_exact(GROUP)
            .zip(x.chunks_exact(GROUP))
            .enumerate()
    {
        let s = g * GROUP / u.sb;
        let a = u.d[s] * u.sc[g] as f32;
        for l in 0..GROUP {
            acc[l] += a * (q[l] as f32 * xg[l]);
        }
        if u.has_min {
            mins += u.dmin[s] * u.mn[g] as f32 * xsum[g];
        }
    }
    let mut s = 0f32;
    for v in acc {
        s += v;
    }
    s - mins
}

dispatch!(fn dot_exact_auto(u: &Unpacked, x: &[f32], xsum: &[f32]) -> f32; via dot_exact_g);

/// `sum(value(l) * x[l])` with f32 activations; `xsum` from [`group_sums`] of `x`.
pub fn dot_exact(u: &Unpacked, x: &[f32], xsum: &[f32]) -> f32 {
    dot_exact_auto(u, x, xsum)
}

/// Activation rows rounded to 8 bits per block, as llama.cpp rounds them for its integer dots:
/// blocks of 32 with an f16 scale (Q8_0; Q8_1 adds `s = d * sum(q)`) for the 32-value weight
/// types, blocks of 256 with an f32 scale and per-16 sums (Q8_K) for K-quants.
#[derive(Default, Clone)]
pub struct QuantizedRows {
    /// Values per block: 32 (Q8_0/Q8_1) or 256 (Q8_K).
    pub block: usize,
    pub k: usize,
    pub q: Vec<i8>,
    /// Scale per block.
    pub d: Vec<f32>,
    /// Q8_1's `d * sum(q)` (f16-rounded) per block; Q8_K: unused.
    pub s: Vec<f32>,
    /// Sum of q per 16 values (Q8_K's bsums).
    pub gsum: Vec<i32>,
    /// 32-value blocks: 8 i32 per block, `-sum(q)` then seven zeros, the per-block offset
    /// terms the VNNI kernels ([`super::vnni`]) start their sums from; empty for Q8_K and
    /// where those kernels don't run.
    pub lanes: Vec<i32>,
}

impl QuantizedRows {
    /// Quantize `m` rows of `k` values for weights whose superblock is `sb` values.
    pub fn quantize(x: &[f32], k: usize, sb: usize) -> Self {
        let mut r = Self::empty(x.len(), k, sb);
        #[cfg(target_arch = "x86_64")]
        if quantize512() {
            // SAFETY: the CPU has AVX-512F and F16C; the buffers are sized for x's blocks.
            unsafe {
                if sb == 256 {
                    quant512::q8k(x, &mut r.q, &mut r.d, &mut r.gsum);
                } else {
                    quant512::q8_1(x, &mut r.q, &mut r.d, &mut r.s, &mut r.gsum, &mut r.lanes);
                }
            }
            return r;
        }
        r.fill_portable(x);
        r
    }

    /// [`QuantizedRows::quantize`] one value at a time (the reference for the AVX-512 copy).
    pub fn quantize_portable(x: &[f32], k: usize, sb: usize) -> Self {
        let mut r = Self::empty(x.len(), k, sb);
        r.fill_portable(x);
        r
    }

    fn empty(len: usize, k: usize, sb: usize) -> Self {
        assert!(
            k.is_multiple_of(sb) && len.is_multiple_of(k),
            "quantize: rows of {k} values in blocks of {sb}"
        );
        let m = len / k;
        QuantizedRows {
            block: sb,
            k,
            q: vec![0; m * k],
            d: vec![0.0; m * k / sb],
            s: vec![0.0; m * k / sb],
            gsum: vec![0; m * k / GROUP],
            // Only the VNNI kernels read them.
            lanes: if sb == 32 && super::vnni::available() {
                vec![0; m * k / 4]
            } else {
                Vec::new()
            },
        }
    }

    fn fill_portable(&mut self, x: &[f32]) {
        let sb = self.block;
        for (b, xb) in x.chunks_exact(sb).enumerate() {
            let qb = &mut self.q[b * sb..(b + 1) * sb];
            if sb == 256 {
                self.d[b] = quantize_q8k(xb, qb);
            } else {
                let (d, s) = quantize_q8_1(xb, qb);
                self.d[b] = d;
                self.s[b] = s;
            }
            for (g, c) in qb.chunks_exact(GROUP).enumerate() {
                self.gsum[b * sb / GROUP + g] = c.iter().map(|&v| v as i32).sum();
            }
            if !self.lanes.is_empty() {
                self.lanes[8 * b] = -(self.gsum[2 * b] + self.gsum[2 * b + 1]);
            }
        }
    }

    /// The rounded rows back as f32 (`d * q` per block): 8-bit activations for products that
    /// run in f32 (`gemm` tiles for prompts).
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .iter()
            .enumerate()
            .map(|(i, &q)| self.d[i / self.block] * q as f32)
            .collect()
    }

    pub fn row(&self, i: usize) -> QRow<'_> {
        let k = self.k;
        QRow {
            q: &self.q[i * k..(i + 1) * k],
            d: &self.d[i * k / self.block..(i + 1) * k / self.block],
            s: &self.s[i * k / self.block..(i + 1) * k / self.block],
            gsum: &self.gsum[i * k / GROUP..(i + 1) * k / GROUP],
            lanes: if self.lanes.is_empty() {
                &[]
            } else {
                &self.lanes[i * k / 4..(i + 1) * k / 4]
            },
        }
    }
}

/// One quantized activation row.
#[derive(Clone, Copy)]
pub struct QRow<'a> {
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub gsum: &'a [i32],
    /// [`QuantizedRows::lanes`] of this row.
    pub lanes: &'a [i32],
}

/// ggml's `quantize_row_q8_K`: the largest-magnitude value maps to -127.
fn quantize_q8k(x: &[f32], q: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax == 0.0 {
        q.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (o, &v) in q.iter_mut().zip(x) {
        *o = round_even(iscale * v).min(127) as i8;
    }
    1.0 / iscale
}

/// ggml's x86 `quantize_row_q8_1` (and Q8_0, which is the same without `s`): scale
/// `amax / 127` stored as f16, values `round(x * 127 / amax)` (ties to even).
fn quantize_q8_1(x: &[f32], q: &mut [i8]) -> (f32, f32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if amax != 0.0 { 127.0 / amax } else { 0.0 };
    let mut sum = 0i32;
    for (o, &v) in q.iter_mut().zip(x) {
        let r = round_even(v * id) as i8;
        *o = r;
        sum += r as i32;
    }
    // Both stored as f16 (round to nearest even), as ggml stores them.
    let dh = half::f16::from_f32(d).to_f32();
    let s = half::f16::from_f32(d * sum as f32).to_f32();
    (dh, s)
}

/// Integer dot of one unpacked weight row with one quantized activation row, portable.
fn dot_int_portable(u: &Unpacked, x: QRow<'_>) -> f32 {
    let mut total = 0f32;
    let gps = u.sb / GROUP;
    for s in 0..u.d.len() {
        let (mut isum, mut imin) = (0i32, 0i32);
        for g in s * gps..(s + 1) * gps {
            let q = &u.q[g * GROUP..(g + 1) * GROUP];
            let xq = &x.q[g * GROUP..(g + 1) * GROUP];
            let p: i32 = q.iter().zip(xq).map(|(&a, &b)| a as i32 * b as i32).sum();
            isum += u.sc[g] as i32 * p;
            imin += u.mn[g] as i32 * x.gsum[g];
        }
        total += combine(u, x, s, isum, imin);
    }
    total
}

/// One superblock's share: `dx * d * isum - min term`. Q4_1/Q5_1 take their minimum term from
/// Q8_1's `s` (as llama.cpp does); K-quants from the per-16 sums.
#[inline(always)]
fn combine(u: &Unpacked, x: QRow<'_>, s: usize, isum: i32, imin: i32) -> f32 {
    let dx = x.d[s];
    let mut v = (dx * u.d[s]) * isum as f32;
    if u.has_min {
        v -= if u.sb == 32 {
            u.dmin[s] * x.s[s]
        } else {
            (dx * u.dmin[s]) * imin as f32
        };
    }
    v
}

/// `sum(value(l) * xq(l))` with 8-bit activations (quantized for this row's superblock size).
pub fn dot_int(u: &Unpacked, x: QRow<'_>) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU has AVX2 and FMA; u and x hold k values with matching blocks.
        return unsafe { avx2::dot_int(u, x) };
    }
    dot_int_portable(u, x)
}

/// The integer dot straight from a row's raw blocks, without unpacking, for the 32-value types
/// (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the K-quants (Q2_K..Q6_K) on AVX2; `None` elsewhere (unpack and use [`dot_int`]).
/// The same arithmetic as [`dot_int`] over the unpacked row. The 32-value types take the
/// AVX-512 VNNI kernels ([`super::vnni`]) where the CPU has them: the same integer sums.
pub fn dot_int_blocks(dtype: GgmlDType, row: &[u8], x: QRow<'_>) -> Option<f32> {
    if let Some(v) = super::vnni::dot_blocks(dtype, row, x) {
        return Some(v);
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() && f16c() {
        use GgmlDType as D;
        // SAFETY: the CPU has AVX2, FMA and F16C; row holds whole blocks matching x.
        unsafe {
            return match dtype {
                D::Q8_0 => Some(avx2::dot_blocks::<0>(row, x)),
                D::Q4_0 => Some(avx2::dot_blocks::<1>(row, x)),
                D::Q4_1 => Some(avx2::dot_blocks::<2>(row, x)),
                D::Q5_0 => Some(avx2::dot_blocks::<3>(row, x)),
                D::Q5_1 => Some(avx2::dot_blocks::<4>(row, x)),
                D::Q4K => Some(avx2::dot_q45k::<false>(row, x)),
                D::Q5K => Some(avx2::dot_q45k::<true>(row, x)),
                D::Q6K => Some(avx2::dot_q6k(row, x)),
                D::Q3K => Some(avx2::dot_q3k(row, x)),
                D::Q2K => Some(avx2::dot_q2k(row, x)),
                _ => None,
            };
        }
    }
    let _ = (dtype, row, x);
    None
}

/// Whether [`dot_int_blocks`] (`int8`) or [`dot_exact_blocks`] has a raw-block kernel for
/// `dtype` on this CPU.
pub fn raw_kernels(dtype: GgmlDType, int8: bool) -> bool {
    use GgmlDType as D;
    avx2()
        && f16c()
        && match dtype {
            D::Q8_0 | D::Q4_0 | D::Q4_1 | D::Q5_0 | D::Q5_1 => true,
            D::Q2K | D::Q3K | D::Q4K | D::Q5K | D::Q6K => int8 || !no_k_exact(),
            _ => false,
        }
}

/// `FERROFORMERS_NO_K_EXACT=1`: exact-mode K-quant rows (Q2_K..Q6_K) are unpacked and dotted
/// as before the raw-block kernels (to compare).
fn no_k_exact() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    super::switch_once(&OFF, "FERROFORMERS_NO_K_EXACT")
}

/// The exact (f32 activations) dot straight from a row's raw blocks for every block type on
/// AVX2, 16 lanes wide where the CPU has AVX-512F (the K-quants not with
/// `FERROFORMERS_NO_K_EXACT=1`); `None` elsewhere (unpack and use [`dot_exact`]).
pub fn dot_exact_blocks(dtype: GgmlDType, row: &[u8], x: &[f32]) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    if avx2() && f16c() {
        // SAFETY: the CPU has AVX2, FMA and F16C (and AVX-512F for the wide copy); row holds
        // whole blocks matching x.
        unsafe {
            return if std::arch::is_x86_feature_detected!("avx512f") {
                avx2::dot_exact_512(dtype, row, x)
            } else {
                avx2::dot_exact_256(dtype, row, x)
            };
        }
    }
    let _ = (dtype, row, x);
    None
}

/// Whether activations are rounded by [`quant512`] (AVX-512F and F16C; not with
/// `FERROFORMERS_NO_SIMD=1`).
fn quantize512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx2() && f16c() && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`QuantizedRows::quantize`] 16 values per instruction: the same bits as the portable
/// copy. The largest magnitude is exact in any order; `cvtps_epi32` rounds to nearest even
/// as ggml's `nearest_int` does; Q8_K's signed maximum is the first value of that magnitude,
/// as in ggml's scan; f16 scales round to nearest even as `half` does.
#[cfg(target_arch = "x86_64")]
mod quant512 {
    use std::arch::x86_64::*;

    const NEAREST: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    #[inline(always)]
    unsafe fn abs(v: __m512) -> __m512 {
        _mm512_castsi512_ps(_mm512_and_si512(
            _mm512_castps_si512(v),
            _mm512_set1_epi32(0x7fff_ffff),
        ))
    }

    #[inline(always)]
    unsafe fn f16_round(v: f32) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(
            _mm_set_ss(v),
        )))
    }

    /// Blocks of 32 (Q8_0/Q8_1): `q`, `d` and `s` (f16-rounded), per-16 sums, and the VNNI
    /// kernels' per-block offsets in `lanes` (when not empty; its other lanes stay zero).
    ///
    /// # Safety
    /// AVX-512F and F16C; `q` holds `x.len()` values, `d` and `s` `x.len() / 32`, `gsum`
    /// `x.len() / 16`, `lanes` none or `x.len() / 4`.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q8_1(
        x: &[f32],
        q: &mut [i8],
        d: &mut [f32],
        s: &mut [f32],
        gsum: &mut [i32],
        lanes: &mut [i32],
    ) {
        let nb = x.len() / 32;
        assert!(q.len() >= 32 * nb && d.len() >= nb && s.len() >= nb && gsum.len() >= 2 * nb);
        assert!(lanes.is_empty() || lanes.len() >= 8 * nb);
        let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
        unsafe {
            for b in 0..nb {
                let v0 = _mm512_loadu_ps(xp.add(32 * b));
                let v1 = _mm512_loadu_ps(xp.add(32 * b + 16));
                let amax = _mm512_reduce_max_ps(_mm512_max_ps(abs(v0), abs(v1)));
                let db = amax / 127.0;
                let id = _mm512_set1_ps(if amax != 0.0 { 127.0 / amax } else { 0.0 });
                let i0 = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v0, id));
                let i1 = _mm512_cvt_roundps_epi32::<NEAREST>(_mm512_mul_ps(v1, id));
                _mm_storeu_si128(qp.add(32 * b) as *mut __m128i, _mm512_cvtepi32_epi8(i0));
                _mm_storeu_si128(
                    qp.add(32 * b + 16) as *mut __m128i,
                    _mm512_cvtepi32_epi8(i1),
                );
                let (g0, g1) = (_mm512_reduce_add_epi32(i0), _mm512_reduce_add_epi32(i1));
                gsum[2 * b] = g0;
                gsum[2 * b + 1] = g1;
                d[b] = f16_round(db);
                s[b] = f16_round(db * (g0 + g1) as f32);
                if !lanes.is_empty() {
                    lanes[8 * b] = -(g0 + g1);
                }
            }
        }
    }

    /// Blocks of 256 (Q8_K): `q`, `d = 1 / iscale` and the per-16 sums.
    ///
    /// # Safety
    /// AVX-512F; `q` holds `x.len()` values, `d` `x.len() / 256`, `gsum` `x.len() / 16`.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn q8k(x: &[f32], q: &mut [i8], d: &mut [f32], gsum: &mut [i32]) {
        let nb = x.len() / 256;
        assert!(q.len() >= 256 * nb && d.len() >= nb && gsum.len() >= 16 * nb);
        let (xp, qp) = (x.as_ptr(), q.as_mut_ptr());
        unsafe {
            for b in 0..nb {
                let p = xp.add(256 * b);
                let mut m = _mm512_setzero_ps();
                for j in 0..16 {
                    m = _mm512_max_ps(m, abs(_mm512_loadu_ps(p.add(16 * j))));
                }
                let amax = _mm512_reduce_max_ps(m);
                if amax == 0.0 {
                    std::ptr::write_bytes(qp.add(256 * b), 0, 256);
                    gsum[16 * b..16 * (b + 1)].fill(0);
                    d[b] = 0.0;
                    continue;
                }
                let am = _mm512_set1_ps(amax);
                let mut max = amax;
                for j in 0..16 {
                    let v = _mm512_loadu_ps(p.add(16 * j));
                    let hit = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(abs(v), am);
                    if hit != 0 {
                        max = *p.add(16 * j + hit.trailing_zeros() as usize);
                        break;
                    }
                }
                let iscale = -127.0 / max;
                let is = _mm512_set1_ps(iscale);
                let top = _mm512_set1_epi32(127);
                for j in 0..16 {
                    let v = _mm512_mul_ps(_mm512_loadu_ps(p.add(16 * j)), is);
                    let i = _mm512_min_epi32(_mm512_cvt_roundps_epi32::<NEAREST>(v), top);
                    _mm_storeu_si128(
                        qp.add(256 * b + 16 * j) as *mut __m128i,
                        _mm512_cvtepi32_epi8(i),
                    );
                    gsum[16 * b + j] = _mm512_reduce_add_epi32(i);
                }
                d[b] = 1.0 / iscale;
            }
        }
    }
}

fn f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the integer dots run the AVX2 copy (false also when `FERROFORMERS_NO_SIMD=1`, so
/// tests can force the portable copy).
pub fn avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static HAS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *HAS.get_or_init(|| {
            !super::switch_on("FERROFORMERS_NO_SIMD")
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use super::{combine, GgmlDType, QRow, Unpacked};
    use std::arch::x86_64::*;

    /// 32 weights times 32 activations: `maddubs` takes unsigned times signed bytes, so the
    /// weights' signs move onto the activations (|q| <= 127 and xq >= -127: no i16 overflow).
    #[inline(always)]
    unsafe fn pairs(q: *const i8, x: *const i8) -> __m256i {
        let qv = _mm256_loadu_si256(q as *const __m256i);
        let xv = _mm256_loadu_si256(x as *const __m256i);
        _mm256_maddubs_epi16(_mm256_sign_epi8(qv, qv), _mm256_sign_epi8(xv, qv))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_int(u: &Unpacked, x: QRow<'_>) -> f32 {
        let (qp, xp) = (u.q.as_ptr(), x.q.as_ptr());
        let mut total = 0f32;
        if u.sb == 32 {
            // One scale per 32 values: i16 pairs -> i32 lanes -> f32, scaled per block.
            let ones = _mm256_set1_epi16(1);
            let mut acc = _mm256_setzero_ps();
            let mut mins = 0f32;
            for b in 0..u.d.len() {
                let p = _mm256_madd_epi16(pairs(qp.add(32 * b), xp.add(32 * b)), ones);
                let scale = _mm256_set1_ps(x.d[b] * u.d[b]);
                acc = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(p), acc);
                if u.has_min {
                    mins += u.dmin[b] * x.s[b];
                }
            }
            return hsum(acc) - mins;
        }
        // K-quants: per-16 integer scales applied in i32 (madd with the scale pair), summed over
        // the superblock, one float multiply per superblock.
        for s in 0..u.d.len() {
            let mut isum = _mm256_setzero_si256();
            for c in 0..8 {
                let g = s * 16 + 2 * c;
                let sv = scale_pair(u.sc[g] as i16, u.sc[g + 1] as i16);
                let off = (s * 8 + c) * 32;
                let p = _mm256_madd_epi16(pairs(qp.add(off), xp.add(off)), sv);
                isum = _mm256_add_epi32(isum, p);
            }
            let mut imin = 0i32;
            if u.has_min {
                for g in s * 16..s * 16 + 16 {
                    imin += u.mn[g] as i32 * x.gsum[g];
                }
            }
            total += combine(u, x, s, hsum_i32(isum), imin);
        }
        total
    }

    /// How far ahead (bytes) the raw-block loops prefetch.
    const PREFETCH: usize = 2048;

    /// f16 at `p` as f32 (F16C).
    #[inline(always)]
    pub(crate) unsafe fn half(p: *const u8) -> f32 {
        let h = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h as i32)))
    }

    /// 0xFF in byte `i` where bit `i` of the 32 bits at `p` is set.
    #[inline(always)]
    unsafe fn bytes_from_bits(p: *const u8) -> __m256i {
        let bits = (p as *const i32).read_unaligned();
        let spread = _mm256_shuffle_epi8(
            _mm256_set1_epi32(bits),
            _mm256_set_epi64x(
                0x0303_0303_0303_0303,
                0x0202_0202_0202_0202,
                0x0101_0101_0101_0101,
                0,
            ),
        );
        let probe = _mm256_or_si256(spread, _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe));
        _mm256_cmpeq_epi8(probe, _mm256_set1_epi64x(-1))
    }

    /// 16 bytes of packed nibbles -> 32 bytes: low nibbles first, then high nibbles.
    #[inline(always)]
    unsafe fn nibbles(p: *const u8) -> __m256i {
        let b = _mm_loadu_si128(p as *const __m128i);
        let both = _mm256_set_m128i(_mm_srli_epi16::<4>(b), b);
        _mm256_and_si256(both, _mm256_set1_epi8(0x0F))
    }

    /// A raw 32-value block's values as 32 bytes (signed; Q4_1/Q5_1 unsigned, their minimum
    /// apart). `T`: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, 4 Q5_1.
    #[inline(always)]
    unsafe fn block_values<const T: u8>(blk: *const u8) -> __m256i {
        match T {
            0 => _mm256_loadu_si256(blk.add(2) as *const __m256i),
            1 => _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8)),
            2 => nibbles(blk.add(4)),
            3 => {
                // q = nibble | 0xF0 where the high bit is clear: nibble - 16 as i8.
                let hi = _mm256_andnot_si256(bytes_from_bits(blk.add(2)), _mm256_set1_epi8(-16));
                _mm256_or_si256(nibbles(blk.add(6)), hi)
            }
            _ => {
                let hi = _mm256_and_si256(bytes_from_bits(blk.add(4)), _mm256_set1_epi8(16));
                _mm256_or_si256(nibbles(blk.add(8)), hi)
            }
        }
    }

    /// The f32 side of the exact kernels, 8 lanes (AVX2, `__m256`) or 16 (AVX-512F,
    /// `__m512`): each block kernel is written once over it and compiled for both.
    pub(super) trait Lanes: Copy {
        unsafe fn zero() -> Self;
        /// `acc + s * t`.
        unsafe fn scaled(acc: Self, s: f32, t: Self) -> Self;
        unsafe fn add(a: Self, b: Self) -> Self;
        unsafe fn sub(a: Self, b: Self) -> Self;
        unsafe fn total(self) -> f32;
        /// 32 unsigned or signed byte values (`SIGNED`) times 32 activations: the products'
        /// lane sums and the activations' lane sums.
        unsafe fn dot32<const SIGNED: bool>(v: __m256i, x: *const f32) -> (Self, Self);
        /// 32 signed byte values times 32 activations as two groups of 16 (two scales), and
        /// the two groups' activation sums (for the types with minimums; unused ones cost
        /// nothing).
        unsafe fn dot16x2(v: __m256i, x: *const f32) -> [Self; 4];
    }

    impl Lanes for __m256 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn scaled(acc: Self, s: f32, t: Self) -> Self {
            _mm256_fmadd_ps(_mm256_set1_ps(s), t, acc)
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            _mm256_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            _mm256_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn total(self) -> f32 {
            hsum(self)
        }
        #[inline(always)]
        unsafe fn dot32<const SIGNED: bool>(v: __m256i, x: *const f32) -> (Self, Self) {
            let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let wide = |v: __m128i| -> __m256 {
                if SIGNED {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
                } else {
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
                }
            };
            let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
            let (x2, x3) = (_mm256_loadu_ps(x.add(16)), _mm256_loadu_ps(x.add(24)));
            let mut t = _mm256_mul_ps(wide(lo), x0);
            t = _mm256_fmadd_ps(wide(_mm_srli_si128::<8>(lo)), x1, t);
            t = _mm256_fmadd_ps(wide(hi), x2, t);
            t = _mm256_fmadd_ps(wide(_mm_srli_si128::<8>(hi)), x3, t);
            (
                t,
                _mm256_add_ps(_mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)),
            )
        }
        #[inline(always)]
        unsafe fn dot16x2(v: __m256i, x: *const f32) -> [Self; 4] {
            let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let wide = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            let (x0, x1) = (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8)));
            let (x2, x3) = (_mm256_loadu_ps(x.add(16)), _mm256_loadu_ps(x.add(24)));
            let t0 = _mm256_fmadd_ps(
                wide(_mm_srli_si128::<8>(lo)),
                x1,
                _mm256_mul_ps(wide(lo), x0),
            );
            let t1 = _mm256_fmadd_ps(
                wide(_mm_srli_si128::<8>(hi)),
                x3,
                _mm256_mul_ps(wide(hi), x2),
            );
            [t0, t1, _mm256_add_ps(x0, x1), _mm256_add_ps(x2, x3)]
        }
    }

    impl Lanes for __m512 {
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn scaled(acc: Self, s: f32, t: Self) -> Self {
            _mm512_fmadd_ps(_mm512_set1_ps(s), t, acc)
        }
        #[inline(always)]
        unsafe fn add(a: Self, b: Self) -> Self {
            _mm512_add_ps(a, b)
        }
        #[inline(always)]
        unsafe fn sub(a: Self, b: Self) -> Self {
            _mm512_sub_ps(a, b)
        }
        #[inline(always)]
        unsafe fn total(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
        #[inline(always)]
        unsafe fn dot32<const SIGNED: bool>(v: __m256i, x: *const f32) -> (Self, Self) {
            let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let wide = |v: __m128i| -> __m512 {
                if SIGNED {
                    _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v))
                } else {
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v))
                }
            };
            let (x0, x1) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
            let t = _mm512_fmadd_ps(wide(hi), x1, _mm512_mul_ps(wide(lo), x0));
            (t, _mm512_add_ps(x0, x1))
        }
        #[inline(always)]
        unsafe fn dot16x2(v: __m256i, x: *const f32) -> [Self; 4] {
            let (lo, hi) = (_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
            let wide = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v));
            let (x0, x1) = (_mm512_loadu_ps(x), _mm512_loadu_ps(x.add(16)));
            [
                _mm512_mul_ps(wide(lo), x0),
                _mm512_mul_ps(wide(hi), x1),
                x0,
                x1,
            ]
        }
    }

    /// The exact dot of `dtype`'s raw row with f32 activations, 8 lanes wide (AVX2); `None`
    /// for types without a kernel here.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_exact_256(dtype: GgmlDType, row: &[u8], x: &[f32]) -> Option<f32> {
        dot_exact_g::<__m256>(dtype, row, x)
    }

    /// [`dot_exact_256`] 16 lanes wide (AVX-512F).
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub unsafe fn dot_exact_512(dtype: GgmlDType, row: &[u8], x: &[f32]) -> Option<f32> {
        dot_exact_g::<__m512>(dtype, row, x)
    }

    #[inline(always)]
    unsafe fn dot_exact_g<L: Lanes>(dtype: GgmlDType, row: &[u8], x: &[f32]) -> Option<f32> {
        use GgmlDType as D;
        let k = !super::no_k_exact();
        Some(match dtype {
            D::Q8_0 => dot_blocks_f32::<L, 0>(row, x),
            D::Q4_0 => dot_blocks_f32::<L, 1>(row, x),
            D::Q4_1 => dot_blocks_f32::<L, 2>(row, x),
            D::Q5_0 => dot_blocks_f32::<L, 3>(row, x),
            D::Q5_1 => dot_blocks_f32::<L, 4>(row, x),
            D::Q4K if k => dot_q45k_f32::<L, false>(row, x),
            D::Q5K if k => dot_q45k_f32::<L, true>(row, x),
            D::Q6K if k => dot_q6k_f32::<L>(row, x),
            D::Q3K if k => dot_q3k_f32::<L>(row, x),
            D::Q2K if k => dot_q2k_f32::<L>(row, x),
            _ => return None,
        })
    }

    /// Exact dots over raw 32-value blocks: `d * sum(q * x)` per block in f32 (+ `m * sum(x)`
    /// for Q4_1/Q5_1).
    #[inline(always)]
    unsafe fn dot_blocks_f32<L: Lanes, const T: u8>(row: &[u8], x: &[f32]) -> f32 {
        let bytes = [34usize, 18, 20, 22, 24][T as usize];
        let nb = row.len() / bytes;
        assert!(x.len() >= nb * 32);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc, mut accm) = (L::zero(), L::zero());
        for b in 0..nb {
            let blk = rp.add(b * bytes);
            if b % 2 == 0 {
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            }
            let q = block_values::<T>(blk);
            let xb = xp.add(32 * b);
            let (t, xs) = if T == 2 || T == 4 {
                L::dot32::<false>(q, xb)
            } else {
                L::dot32::<true>(q, xb)
            };
            acc = L::scaled(acc, half(blk), t);
            if T == 2 || T == 4 {
                accm = L::scaled(accm, half(blk.add(2)), xs);
            }
        }
        L::add(acc, accm).total()
    }

    /// Exact dot of a raw Q4_K row (144-byte superblocks of 256: 8 groups of 32 with 6-bit
    /// scales and minimums) or, `Q5`, Q5_K row (176 bytes: the same scales, then a fifth bit
    /// per value in 32 bytes before the low nibbles) with f32 activations: per group
    /// `(d * sc) * sum(q * x) - (dmin * mn) * sum(x)`, without unpacking the row first.
    #[inline(always)]
    unsafe fn dot_q45k_f32<L: Lanes, const Q5: bool>(row: &[u8], x: &[f32]) -> f32 {
        let bytes = if Q5 { 176 } else { 144 };
        let nb = row.len() / bytes;
        assert!(x.len() >= nb * 256);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc, mut accm) = (L::zero(), L::zero());
        for b in 0..nb {
            let blk = rp.add(b * bytes);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let (d, dmin) = (half(blk), half(blk.add(2)));
            let scales = std::slice::from_raw_parts(blk.add(4), 12);
            let xb = xp.add(256 * b);
            for j in 0..4 {
                for (h, v) in k45_values::<Q5>(blk, j).into_iter().enumerate() {
                    let g = 2 * j + h;
                    let (t, xs) = L::dot32::<false>(v, xb.add(32 * g));
                    let (sc, mn) = super::scale_min_k4(g, scales);
                    acc = L::scaled(acc, d * sc as f32, t);
                    accm = L::scaled(accm, dmin * mn as f32, xs);
                }
            }
        }
        L::sub(acc, accm).total()
    }

    /// Groups `2j` and `2j + 1` of a Q4_K (or, `Q5`, Q5_K) superblock at `blk` as unsigned bytes.
    #[inline(always)]
    unsafe fn k45_values<const Q5: bool>(blk: *const u8, j: usize) -> [__m256i; 2] {
        let low = _mm256_set1_epi8(0x0F);
        let q = _mm256_loadu_si256(blk.add(if Q5 { 48 } else { 16 } + 32 * j) as *const __m256i);
        let lo = _mm256_and_si256(q, low);
        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), low);
        if !Q5 {
            return [lo, hi];
        }
        let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
        let fifth = |bit| _mm256_and_si256(bit_set(qh, bit), _mm256_set1_epi8(16));
        [
            _mm256_or_si256(lo, fifth(2 * j)),
            _mm256_or_si256(hi, fifth(2 * j + 1)),
        ]
    }

    /// Exact dot of a raw Q6_K row (210-byte superblocks of 256: 16 groups of 16 with i8
    /// scales; values 0..63 less 32) with f32 activations, without unpacking the row first.
    #[inline(always)]
    unsafe fn dot_q6k_f32<L: Lanes>(row: &[u8], x: &[f32]) -> f32 {
        let nb = row.len() / 210;
        assert!(x.len() >= nb * 256);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (low, two, off) = (
            _mm256_set1_epi8(0x0F),
            _mm256_set1_epi8(0x03),
            _mm256_set1_epi8(32),
        );
        let mut acc = L::zero();
        for b in 0..nb {
            let blk = rp.add(b * 210);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let d = half(blk.add(208));
            let sc = blk.add(192) as *const i8;
            let xb = xp.add(256 * b);
            for n in 0..2 {
                let ql0 = _mm256_loadu_si256(blk.add(64 * n) as *const __m256i);
                let ql1 = _mm256_loadu_si256(blk.add(64 * n + 32) as *const __m256i);
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                let high = |s: i32| -> __m256i {
                    let h = match s {
                        0 => qh,
                        2 => _mm256_srli_epi16::<2>(qh),
                        4 => _mm256_srli_epi16::<4>(qh),
                        _ => _mm256_srli_epi16::<6>(qh),
                    };
                    _mm256_slli_epi16::<4>(_mm256_and_si256(h, two))
                };
                // Values 128n + 32i .. + 32, as GGUF's Q6_K dequantization orders them.
                let quarters = [
                    _mm256_or_si256(_mm256_and_si256(ql0, low), high(0)),
                    _mm256_or_si256(_mm256_and_si256(ql1, low), high(2)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low), high(4)),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low), high(6)),
                ];
                for (i, v) in quarters.into_iter().enumerate() {
                    let v = _mm256_sub_epi8(v, off);
                    let first = 128 * n + 32 * i;
                    let [t0, t1, _, _] = L::dot16x2(v, xb.add(first));
                    let g = first / 16;
                    acc = L::scaled(acc, d * *sc.add(g) as f32, t0);
                    acc = L::scaled(acc, d * *sc.add(g + 1) as f32, t1);
                }
            }
        }
        acc.total()
    }

    /// The 2-bit field at bit `2c` of every byte (`c` in 0..4).
    #[inline(always)]
    unsafe fn crumbs(q: __m256i, c: usize) -> __m256i {
        let v = match c {
            0 => q,
            1 => _mm256_srli_epi16::<2>(q),
            2 => _mm256_srli_epi16::<4>(q),
            _ => _mm256_srli_epi16::<6>(q),
        };
        _mm256_and_si256(v, _mm256_set1_epi8(0x03))
    }

    /// 0xFF in bytes whose bit `bit` is set, else 0.
    #[inline(always)]
    unsafe fn bit_set(h: __m256i, bit: usize) -> __m256i {
        let m = _mm256_set1_epi8((1u8 << bit) as i8);
        _mm256_cmpeq_epi8(_mm256_and_si256(h, m), m)
    }

    /// Exact dot of a raw Q3_K row (110-byte superblocks: a high-bit mask of 32 bytes, 2-bit
    /// values in 64, 16 packed 6-bit scales, `d`; value = low 2 bits - 4 where the mask bit is
    /// clear) with f32 activations, without unpacking the row first.
    #[inline(always)]
    unsafe fn dot_q3k_f32<L: Lanes>(row: &[u8], x: &[f32]) -> f32 {
        let nb = row.len() / 110;
        assert!(x.len() >= nb * 256);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let mut acc = L::zero();
        for b in 0..nb {
            let blk = rp.add(b * 110);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let d = half(blk.add(108));
            let sc = super::q3k_scales(std::slice::from_raw_parts(blk.add(96), 12));
            let hm = _mm256_loadu_si256(blk as *const __m256i);
            let xb = xp.add(256 * b);
            for n in 0..2 {
                let q = _mm256_loadu_si256(blk.add(32 + 32 * n) as *const __m256i);
                for c in 0..4 {
                    let four = _mm256_andnot_si256(bit_set(hm, 4 * n + c), _mm256_set1_epi8(4));
                    let v = _mm256_sub_epi8(crumbs(q, c), four);
                    let [t0, t1, _, _] = L::dot16x2(v, xb.add(128 * n + 32 * c));
                    let g = 8 * n + 2 * c;
                    acc = L::scaled(acc, d * sc[g] as f32, t0);
                    acc = L::scaled(acc, d * sc[g + 1] as f32, t1);
                }
            }
        }
        acc.total()
    }

    /// Exact dot of a raw Q2_K row (84-byte superblocks: 16 bytes of 4-bit scale and minimum
    /// pairs, 2-bit values in 64, `d`, `dmin`) with f32 activations, without unpacking the row
    /// first: per group of 16 `(d * sc) * sum(q * x) - (dmin * mn) * sum(x)`.
    #[inline(always)]
    unsafe fn dot_q2k_f32<L: Lanes>(row: &[u8], x: &[f32]) -> f32 {
        let nb = row.len() / 84;
        assert!(x.len() >= nb * 256);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc, mut accm) = (L::zero(), L::zero());
        for b in 0..nb {
            let blk = rp.add(b * 84);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let (d, dmin) = (half(blk.add(80)), half(blk.add(82)));
            let xb = xp.add(256 * b);
            for n in 0..2 {
                let q = _mm256_loadu_si256(blk.add(16 + 32 * n) as *const __m256i);
                for c in 0..4 {
                    let [t0, t1, s0, s1] = L::dot16x2(crumbs(q, c), xb.add(128 * n + 32 * c));
                    let g = 8 * n + 2 * c;
                    let (p0, p1) = (*blk.add(g), *blk.add(g + 1));
                    acc = L::scaled(acc, d * (p0 & 0xF) as f32, t0);
                    acc = L::scaled(acc, d * (p1 & 0xF) as f32, t1);
                    accm = L::scaled(accm, dmin * (p0 >> 4) as f32, s0);
                    accm = L::scaled(accm, dmin * (p1 >> 4) as f32, s1);
                }
            }
        }
        L::sub(acc, accm).total()
    }

    /// Integer dots over raw 32-value blocks. `T`: 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 Q5_0, 4 Q5_1.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_blocks<const T: u8>(row: &[u8], x: QRow<'_>) -> f32 {
        let bytes = [34usize, 18, 20, 22, 24][T as usize];
        let nb = x.d.len();
        assert!(row.len() >= nb * bytes && x.q.len() >= nb * 32 && x.s.len() >= nb);
        let (rp, xp) = (row.as_ptr(), x.q.as_ptr());
        let ones = _mm256_set1_epi16(1);
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut mins = 0f32;
        for b in 0..nb {
            let blk = rp.add(b * bytes);
            if b % 2 == 0 {
                // The weights stream from memory: ask for them ahead of use. Prefetches
                // never fault.
                _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            }
            let xv = _mm256_loadu_si256(xp.add(32 * b) as *const __m256i);
            let d = half(blk);
            // Signed weights go through the sign trick; unsigned ones (Q4_1, Q5_1) multiply
            // the activations directly.
            let p16 = match T {
                0 => {
                    let q = _mm256_loadu_si256(blk.add(2) as *const __m256i);
                    _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q))
                }
                1 => {
                    let q = _mm256_sub_epi8(nibbles(blk.add(2)), _mm256_set1_epi8(8));
                    _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q))
                }
                2 => _mm256_maddubs_epi16(nibbles(blk.add(4)), xv),
                3 => {
                    // q = nibble | 0xF0 where the high bit is clear: nibble - 16 as i8.
                    let hi =
                        _mm256_andnot_si256(bytes_from_bits(blk.add(2)), _mm256_set1_epi8(-16));
                    let q = _mm256_or_si256(nibbles(blk.add(6)), hi);
                    _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q))
                }
                _ => {
                    let hi = _mm256_and_si256(bytes_from_bits(blk.add(4)), _mm256_set1_epi8(16));
                    _mm256_maddubs_epi16(_mm256_or_si256(nibbles(blk.add(8)), hi), xv)
                }
            };
            let p = _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, ones));
            let scale = _mm256_set1_ps(x.d[b] * d);
            if b % 2 == 0 {
                acc0 = _mm256_fmadd_ps(scale, p, acc0);
            } else {
                acc1 = _mm256_fmadd_ps(scale, p, acc1);
            }
            if T == 2 || T == 4 {
                // value = d * q + m: the minimum times Q8_1's s.
                mins += half(blk.add(2)) * x.s[b];
            }
        }
        hsum(_mm256_add_ps(acc0, acc1)) + mins
    }

    /// i16 lanes 0..8 = `a`, 8..16 = `b`: the scales of two 16-value groups.
    #[inline(always)]
    unsafe fn scale_pair(a: i16, b: i16) -> __m256i {
        _mm256_set_m128i(_mm_set1_epi16(b), _mm_set1_epi16(a))
    }

    /// Q4_K (144-byte superblocks of 256) or, `Q5`, Q5_K (176) times Q8_K activations.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q45k<const Q5: bool>(row: &[u8], x: QRow<'_>) -> f32 {
        let bytes = if Q5 { 176 } else { 144 };
        let nb = x.d.len();
        assert!(row.len() >= nb * bytes && x.q.len() >= nb * 256 && x.gsum.len() >= nb * 16);
        let (rp, xp) = (row.as_ptr(), x.q.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for b in 0..nb {
            let blk = rp.add(b * bytes);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let scales = std::slice::from_raw_parts(blk.add(4), 12);
            let xb = xp.add(b * 256);
            let mut isum = _mm256_setzero_si256();
            let mut imin = 0i32;
            for j in 0..4 {
                let (s1, m1) = super::scale_min_k4(2 * j, scales);
                let (s2, m2) = super::scale_min_k4(2 * j + 1, scales);
                let [lo, hi] = k45_values::<Q5>(blk, j);
                let x0 = _mm256_loadu_si256(xb.add(64 * j) as *const __m256i);
                let x1 = _mm256_loadu_si256(xb.add(64 * j + 32) as *const __m256i);
                let p0 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(lo, x0), _mm256_set1_epi16(s1 as i16));
                let p1 =
                    _mm256_madd_epi16(_mm256_maddubs_epi16(hi, x1), _mm256_set1_epi16(s2 as i16));
                isum = _mm256_add_epi32(isum, _mm256_add_epi32(p0, p1));
                let g = &x.gsum[b * 16 + 4 * j..];
                imin += m1 as i32 * (g[0] + g[1]) + m2 as i32 * (g[2] + g[3]);
            }
            let dx = x.d[b];
            let d = dx * half(blk);
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc);
            mins += (dx * half(blk.add(2))) * imin as f32;
        }
        hsum(acc) - mins
    }

    /// Q3_K (110-byte superblocks) times Q8_K activations. Values are kept unsigned as
    /// `v + 4` (0..7: the low bits, plus 4 where the mask bit is set) through `maddubs`, and
    /// the offset taken off as `4 * xq`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q3k(row: &[u8], x: QRow<'_>) -> f32 {
        let nb = x.d.len();
        assert!(row.len() >= nb * 110 && x.q.len() >= nb * 256);
        let (rp, xp) = (row.as_ptr(), x.q.as_ptr());
        let four = _mm256_set1_epi8(4);
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let blk = rp.add(b * 110);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let sc = super::q3k_scales(std::slice::from_raw_parts(blk.add(96), 12));
            let hm = _mm256_loadu_si256(blk as *const __m256i);
            let xb = xp.add(b * 256);
            let mut isum = _mm256_setzero_si256();
            for n in 0..2 {
                let q = _mm256_loadu_si256(blk.add(32 + 32 * n) as *const __m256i);
                for c in 0..4 {
                    let u = _mm256_or_si256(
                        crumbs(q, c),
                        _mm256_and_si256(bit_set(hm, 4 * n + c), four),
                    );
                    let xv = _mm256_loadu_si256(xb.add(128 * n + 32 * c) as *const __m256i);
                    let p16 = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(u, xv),
                        _mm256_maddubs_epi16(four, xv),
                    );
                    let g = 8 * n + 2 * c;
                    let sv = scale_pair(sc[g] as i16, sc[g + 1] as i16);
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, sv));
                }
            }
            let d = x.d[b] * half(blk.add(108));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc);
        }
        hsum(acc)
    }

    /// Q2_K (84-byte superblocks) times Q8_K activations: `dx * d * sum(sc * q * xq) - dx *
    /// dmin * sum(mn * gsum)`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q2k(row: &[u8], x: QRow<'_>) -> f32 {
        let nb = x.d.len();
        assert!(row.len() >= nb * 84 && x.q.len() >= nb * 256 && x.gsum.len() >= nb * 16);
        let (rp, xp) = (row.as_ptr(), x.q.as_ptr());
        let mut acc = _mm256_setzero_ps();
        let mut mins = 0f32;
        for b in 0..nb {
            let blk = rp.add(b * 84);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let xb = xp.add(b * 256);
            let mut isum = _mm256_setzero_si256();
            let mut imin = 0i32;
            for n in 0..2 {
                let q = _mm256_loadu_si256(blk.add(16 + 32 * n) as *const __m256i);
                for c in 0..4 {
                    let xv = _mm256_loadu_si256(xb.add(128 * n + 32 * c) as *const __m256i);
                    let p16 = _mm256_maddubs_epi16(crumbs(q, c), xv);
                    let g = 8 * n + 2 * c;
                    let (p0, p1) = (*blk.add(g), *blk.add(g + 1));
                    let sv = scale_pair((p0 & 0xF) as i16, (p1 & 0xF) as i16);
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, sv));
                    imin += (p0 >> 4) as i32 * x.gsum[b * 16 + g]
                        + (p1 >> 4) as i32 * x.gsum[b * 16 + g + 1];
                }
            }
            let dx = x.d[b];
            acc = _mm256_fmadd_ps(
                _mm256_set1_ps(dx * half(blk.add(80))),
                _mm256_cvtepi32_ps(isum),
                acc,
            );
            mins += (dx * half(blk.add(82))) * imin as f32;
        }
        hsum(acc) - mins
    }

    /// Q6_K (210-byte superblocks of 256) times Q8_K activations. The 6-bit values are kept
    /// unsigned (0..63) through `maddubs` and the offset of 32 taken off as `32 * xq`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k(row: &[u8], x: QRow<'_>) -> f32 {
        let nb = x.d.len();
        assert!(row.len() >= nb * 210 && x.q.len() >= nb * 256);
        let (rp, xp) = (row.as_ptr(), x.q.as_ptr());
        let low = _mm256_set1_epi8(0x0F);
        let m32 = _mm256_set1_epi8(32);
        let mut acc = _mm256_setzero_ps();
        for b in 0..nb {
            let blk = rp.add(b * 210);
            _mm_prefetch::<_MM_HINT_T0>(blk.wrapping_add(PREFETCH) as *const i8);
            let sc = blk.add(192) as *const i8;
            let xb = xp.add(b * 256);
            let mut isum = _mm256_setzero_si256();
            for n in 0..2 {
                let ql = blk.add(64 * n);
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * n) as *const __m256i);
                let ql0 = _mm256_loadu_si256(ql as *const __m256i);
                let ql1 = _mm256_loadu_si256(ql.add(32) as *const __m256i);
                let h = |m: i8| _mm256_and_si256(qh, _mm256_set1_epi8(m));
                let qv = [
                    _mm256_or_si256(_mm256_and_si256(ql0, low), _mm256_slli_epi16::<4>(h(0x03))),
                    _mm256_or_si256(_mm256_and_si256(ql1, low), _mm256_slli_epi16::<2>(h(0x0C))),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), low), h(0x30)),
                    _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), low),
                        _mm256_srli_epi16::<2>(h(-0x40)),
                    ),
                ];
                for (c, q) in qv.into_iter().enumerate() {
                    let xv = _mm256_loadu_si256(xb.add(128 * n + 32 * c) as *const __m256i);
                    let p16 = _mm256_sub_epi16(
                        _mm256_maddubs_epi16(q, xv),
                        _mm256_maddubs_epi16(m32, xv),
                    );
                    let g = 8 * n + 2 * c;
                    let sv = scale_pair(*sc.add(g) as i16, *sc.add(g + 1) as i16);
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(p16, sv));
                }
            }
            let d = x.d[b] * half(blk.add(208));
            acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(isum), acc);
        }
        hsum(acc)
    }

    #[inline(always)]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_movehdup_ps(s));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn hsum_i32(v: __m256i) -> i32 {
        let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        _mm_cvtsi128_si32(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    const TYPES: [GgmlDType; 10] = BLOCK_TYPES;

    fn lcg(seed: u64, n: usize) -> Vec<f32> {
        crate::kernels::cpu::test_values(n, seed, 2.0)
    }

    /// The AVX-512 rounding of activations gives the portable copy's bits: random rows, a
    /// zero block, a block whose largest magnitude comes twice with both signs, values on
    /// rounding ties (x.5 after scaling) and tiny and huge magnitudes.
    #[test]
    fn vector_quantize_gives_the_portable_bits() {
        for sb in [32, 256] {
            let k = 1024;
            let mut x = lcg(17 + sb as u64, 3 * k);
            x[..sb].fill(0.0);
            // Block 1: -4 then 4 (the first is the signed maximum), the rest smaller.
            for v in &mut x[sb..2 * sb] {
                *v *= 0.5;
            }
            x[sb + 3] = -4.0;
            x[sb + 9] = 4.0;
            // Block 2: values that land on halves when scaled by 127 / 127.
            for (i, v) in x[2 * sb..3 * sb].iter_mut().enumerate() {
                *v = (i as f32 - 40.0) + 0.5;
            }
            x[2 * sb] = 127.0;
            for v in &mut x[3 * sb..4 * sb] {
                *v *= 1e-30;
            }
            for v in &mut x[4 * sb..5 * sb] {
                *v *= 1e30;
            }
            let a = QuantizedRows::quantize(&x, k, sb);
            let b = QuantizedRows::quantize_portable(&x, k, sb);
            assert_eq!(a.q, b.q, "values, blocks of {sb}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&a.d), bits(&b.d), "scales, blocks of {sb}");
            assert_eq!(bits(&a.s), bits(&b.s), "sums, blocks of {sb}");
            assert_eq!(a.gsum, b.gsum, "group sums, blocks of {sb}");
            assert_eq!(a.lanes, b.lanes, "offsets, blocks of {sb}");
        }
    }

    fn quantized(dt: GgmlDType, n: usize, k: usize, seed: u64) -> (Vec<u8>, Vec<f32>) {
        let w = Tensor::from_vec(lcg(seed, n * k), (n, k), &Device::Cpu).unwrap();
        let q = QTensor::quantize(&w, dt).unwrap();
        let dense: Vec<f32> = q
            .dequantize(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        (q.data().unwrap().to_vec(), dense)
    }

    #[test]
    fn unpacking_dequantizes_bit_for_bit() {
        for dt in TYPES {
            let (n, k) = (3, 512);
            let (bytes, dense) = quantized(dt, n, k, 7);
            let (_, bb) = block_shape(dt).unwrap();
            let (sb, _) = block_shape(dt).unwrap();
            let row_bytes = k / sb * bb;
            let mut u = Unpacked::default();
            let mut out = vec![0f32; k];
            for r in 0..n {
                u.unpack(dt, &bytes[r * row_bytes..(r + 1) * row_bytes], k);
                dequantize(&u, &mut out);
                for (i, (a, b)) in out.iter().zip(&dense[r * k..(r + 1) * k]).enumerate() {
                    assert_eq!(a.to_bits(), b.to_bits(), "{dt:?} row {r} value {i}");
                }
            }
        }
    }

    #[test]
    fn exact_dot_matches_dequantized_dot() {
        for dt in TYPES {
            let (n, k) = (4, 768);
            let (bytes, dense) = quantized(dt, n, k, 11);
            let (sb, bb) = block_shape(dt).unwrap();
            let row_bytes = k / sb * bb;
            let x = lcg(3, k);
            let mut xs = Vec::new();
            group_sums(&x, &mut xs);
            let mut u = Unpacked::default();
            for r in 0..n {
                u.unpack(dt, &bytes[r * row_bytes..(r + 1) * row_bytes], k);
                let got = dot_exact(&u, &x, &xs);
                let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                let want: f64 = dense[r * k..(r + 1) * k]
                    .iter()
                    .zip(&x)
                    .map(|(a, b)| *a as f64 * *b as f64)
                    .sum();
                let direct = dot_exact_blocks(dt, row, &x);
                assert_eq!(direct.is_some(), raw_kernels(dt, false), "{dt:?}");
                // Both widths where the CPU has them, whichever the dispatch picks.
                #[cfg(target_arch = "x86_64")]
                let widths = if !avx2() || !f16c() {
                    vec![]
                } else if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: AVX2, FMA, F16C and AVX-512F; row holds whole blocks matching x.
                    unsafe {
                        vec![
                            avx2::dot_exact_256(dt, row, &x),
                            avx2::dot_exact_512(dt, row, &x),
                        ]
                    }
                } else {
                    // SAFETY: AVX2, FMA and F16C; row holds whole blocks matching x.
                    unsafe { vec![avx2::dot_exact_256(dt, row, &x)] }
                };
                #[cfg(not(target_arch = "x86_64"))]
                let widths: Vec<Option<f32>> = vec![];
                for v in widths.into_iter().chain([direct]).flatten() {
                    assert!((v as f64 - want).abs() < 1e-4, "{dt:?} raw: {v} vs {want}");
                }
                assert!((got as f64 - want).abs() < 1e-4, "{dt:?}: {got} vs {want}");
            }
        }
    }

    /// The integer dot against a plain reference: dequantized weights times dequantized 8-bit
    /// activations, in f64. Odd block counts, both copies (AVX2 where the CPU has it).
    #[test]
    fn integer_dot_matches_reference() {
        for dt in TYPES {
            let (sb, bb) = block_shape(dt).unwrap();
            for blocks in [1usize, 3] {
                let k = sb * blocks * if sb == 32 { 5 } else { 1 };
                let (bytes, dense) = quantized(dt, 2, k, 5);
                let row_bytes = k / sb * bb;
                let x = lcg(9, k);
                let xq = QuantizedRows::quantize(&x, k, sb);
                let row = xq.row(0);
                // Dequantized activations: d * q per block (Q8_1's s is d * sum q, rounded).
                let xd: Vec<f64> = (0..k)
                    .map(|i| row.d[i / sb] as f64 * row.q[i] as f64)
                    .collect();
                let mut u = Unpacked::default();
                for r in 0..2 {
                    u.unpack(dt, &bytes[r * row_bytes..(r + 1) * row_bytes], k);
                    let want: f64 = dense[r * k..(r + 1) * k]
                        .iter()
                        .zip(&xd)
                        .map(|(a, b)| *a as f64 * b)
                        .sum();
                    let direct =
                        dot_int_blocks(dt, &bytes[r * row_bytes..(r + 1) * row_bytes], row);
                    assert_eq!(direct.is_some(), raw_kernels(dt, true), "{dt:?}");
                    if let Some(direct) = direct {
                        let want = dot_int(&u, row);
                        assert!(
                            (direct - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "{dt:?} k={k}: raw blocks {direct} vs unpacked {want}"
                        );
                    }
                    let fast = dot_int(&u, row);
                    let portable = dot_int_portable(&u, row);
                    // Q8_1's s is f16-rounded: the minimum term may move by ~1e-3 relative.
                    let tol = 2e-3 * (1.0 + want.abs());
                    assert!(
                        (fast as f64 - want).abs() < tol,
                        "{dt:?} k={k}: {fast} vs {want}"
                    );
                    assert!(
                        (fast - portable).abs() <= 1e-4 * (1.0 + portable.abs()),
                        "{dt:?} k={k}: simd {fast} vs portable {portable}"
                    );
                }
                // The rounding itself: within half a step of x, plus the f16 rounding of the
                // Q8_0/Q8_1 scale (2^-11 relative, times |q| <= 127).
                for i in 0..k {
                    let step = row.d[i / sb].abs().max(1e-12) as f64;
                    let slack = if sb == 32 { 127.0 / 2048.0 } else { 1e-3 };
                    assert!((xd[i] - x[i] as f64).abs() <= (0.5 + slack) * step);
                }
            }
        }
    }
}
