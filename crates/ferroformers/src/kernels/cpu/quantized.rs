//! Matmuls over GGUF's quantized blocks on CPU, with f32 activations.
//!
//! Each weight row is expanded from its blocks into an f32 buffer (in L1) and dotted with the
//! f32 activations. This gives the numbers transformers gives when it loads a GGUF file (it
//! dequantizes every tensor to f32), unlike llama.cpp-style kernels that also round the
//! activations to 8 bits and drift from it. The weights stay quantized in memory: decoding
//! one token reads ~4x fewer bytes than f32 weights.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use super::simd::{dispatch, dot16};
use super::threads::{in_worker, SendPtr};

/// A `[n, k]` weight matrix kept in its GGUF blocks.
#[derive(Clone)]
pub struct QuantLinear {
    dtype: GgmlDType,
    n: usize,
    k: usize,
    row_bytes: usize,
    /// The raw blocks, 8-byte aligned (block structs hold f16 fields).
    data: std::sync::Arc<Vec<u64>>,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantLinear({:?}, [{}, {}])", self.dtype, self.n, self.k)
    }
}

impl QuantLinear {
    /// `None` when the block type has no row expansion here (the caller keeps candle's
    /// `QMatMul` for it).
    pub fn new(w: &QTensor) -> Result<Option<Self>> {
        use GgmlDType as D;
        let dtype = w.dtype();
        if !matches!(
            dtype,
            D::F32
                | D::F16
                | D::Q4_0
                | D::Q4_1
                | D::Q5_0
                | D::Q5_1
                | D::Q8_0
                | D::Q2K
                | D::Q3K
                | D::Q4K
                | D::Q5K
                | D::Q6K
        ) {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        if k % dtype.block_size() != 0 {
            return Ok(None);
        }
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let bytes = w.data()?;
        if bytes.len() != n * row_bytes {
            candle_core::bail!("quantized tensor: {} bytes for [{n}, {k}]", bytes.len());
        }
        Ok(Some(Self {
            dtype,
            n,
            k,
            row_bytes,
            data: std::sync::Arc::new(aligned_words(&[&bytes])),
        }))
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// The rows of `parts` stacked into one matrix (same block type and input size), so that
    /// q/k/v or gate/up run as one product: one pass over the activations, one thread fan-out.
    pub fn stack(parts: &[&QuantLinear]) -> Option<QuantLinear> {
        let first = parts.first()?;
        if parts
            .iter()
            .any(|p| p.dtype != first.dtype || p.k != first.k)
        {
            return None;
        }
        let n: usize = parts.iter().map(|p| p.n).sum();
        let blocks: Vec<&[u8]> = parts.iter().map(|p| p.bytes()).collect();
        Some(QuantLinear {
            dtype: first.dtype,
            n,
            k: first.k,
            row_bytes: first.row_bytes,
            data: std::sync::Arc::new(aligned_words(&blocks)),
        })
    }

    /// All rows' blocks.
    fn bytes(&self) -> &[u8] {
        // SAFETY: data holds n * row_bytes initialised bytes.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.n * self.row_bytes)
        }
    }

    fn row(&self, r: usize) -> &[u8] {
        &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` as f32 (`out.len() == k`), exactly as the GGUF dequantization defines it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        expand_row(self.dtype, self.row(r), out)
    }

    /// `x [m, k] @ W^T` -> `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        debug_assert_eq!(x.len(), m * k);
        let mut out = vec![0f32; m * n];
        let rows_per_task = 16usize;
        let out_ptr = SendPtr(out.as_mut_ptr());
        // Few activation rows (decoding): fused block dots. More rows (prompts, batches):
        // expand each weight row once and reuse it for every activation row.
        let fused = m <= 4
            && matches!(
                self.dtype,
                GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q8_0
            );
        // Per-block activation sums: only the portable Q4_1 dot reads them.
        let xsum: Vec<f32> = if fused && self.dtype == GgmlDType::Q4_1 && !avx512() {
            x.chunks_exact(32).map(|c| c.iter().sum()).collect()
        } else {
            Vec::new()
        };
        let nb = k / 32;
        let task = |t: usize| {
            let r0 = t * rows_per_task;
            let r1 = (r0 + rows_per_task).min(n);
            let o = out_ptr;
            if fused {
                for r in r0..r1 {
                    let row = self.row(r);
                    for i in 0..m {
                        let v = dot_blocks(
                            self.dtype,
                            row,
                            &x[i * k..(i + 1) * k],
                            xsum.get(i * nb..(i + 1) * nb).unwrap_or(&[]),
                        );
                        // SAFETY: (i, r) is written by this task only; i < m, r < n.
                        unsafe { *o.0.add(i * n + r) = v };
                    }
                }
                return;
            }
            let mut buf = vec![0f32; k];
            for r in r0..r1 {
                self.dequantize_row(r, &mut buf);
                for i in 0..m {
                    let v = dot(&buf, &x[i * k..(i + 1) * k]);
                    // SAFETY: (i, r) is written by this task only; i < m, r < n.
                    unsafe { *o.0.add(i * n + r) = v };
                }
            }
        };
        let tasks = n.div_ceil(rows_per_task);
        if n * k * m >= 1 << 16 && !in_worker() {
            // candle's barrier pool: its workers spin briefly between calls, so the ~120
            // products of one decoding step do not pay a sleep/wake each (rayon did: ~15%).
            candle_core::utils::barrier_pool().execute_chunked(tasks, |range| range.for_each(task));
        } else {
            (0..tasks).for_each(task);
        }
        out
    }

    /// `xs [.., k]` -> `[.., n]` (f32 tensors on CPU).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let k = dims[dims.len() - 1];
        if k != self.k {
            candle_core::bail!(
                "quantized matmul: input has {k} features, weight {}",
                self.k
            );
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let x: Vec<f32> = xs
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let out = self.matmul(&x, m);
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.n;
        Tensor::from_vec(out, out_dims, xs.device())
    }

    /// Rows `ids` as an f32 `[ids.len(), k]` tensor: an embedding lookup without keeping a
    /// dequantized copy of the table.
    pub fn embed(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.k];
        for (row, &id) in out.chunks_exact_mut(self.k).zip(ids) {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("token id {id} outside the embedding table ({})", self.n);
            }
            self.dequantize_row(id, row);
        }
        Tensor::from_vec(out, (ids.len(), self.k), device)
    }
}

/// `parts` back to back in 8-byte aligned storage (block structs hold f16 fields).
fn aligned_words(parts: &[&[u8]]) -> Vec<u64> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut data = vec![0u64; len.div_ceil(8)];
    // SAFETY: data owns at least len bytes, and any byte pattern is a valid u64.
    let dst = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, len) };
    let mut off = 0;
    for p in parts {
        dst[off..off + p.len()].copy_from_slice(p);
        off += p.len();
    }
    data
}

/// AVX-512F with F16C: the hand-written block dots.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

dispatch!(fn dot(a: &[f32], b: &[f32]) -> f32; via dot16);

/// IEEE half -> f32, exact for every value (inlined: `half`'s conversion is an out-of-line
/// call per block).
#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    let h = u16::from_le_bytes([b[i], b[i + 1]]) as u32;
    let sign = (h & 0x8000) << 16;
    let em = h & 0x7fff;
    let v = if em >= 0x7c00 {
        // inf / NaN
        f32::from_bits((em << 13) | 0x7f80_0000)
    } else {
        // Normal and subnormal halves: the bits shifted into f32 place, times 2^112 (exact).
        f32::from_bits(em << 13) * f32::from_bits(0x7780_0000)
    };
    f32::from_bits(v.to_bits() | sign)
}

/// Fused block dot products for one weight row and one activation row: no expansion buffer.
/// `xsum[b]` is the sum of activation block `b` (for Q4_1's per-block minimum).
#[inline(always)]
fn dot_blocks_g(dtype: GgmlDType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut extra = 0f32;
    match dtype {
        GgmlDType::Q4_1 => {
            for ((blk, xb), xs) in row.chunks_exact(20).zip(x.chunks_exact(32)).zip(xsum) {
                let d = f16_at(blk, 0);
                let m = f16_at(blk, 2);
                let qs = &blk[4..20];
                for j in 0..16 {
                    acc[j] +=
                        d * ((qs[j] & 0x0F) as f32 * xb[j] + (qs[j] >> 4) as f32 * xb[j + 16]);
                }
                extra += m * xs;
            }
        }
        GgmlDType::Q4_0 => {
            for (blk, xb) in row.chunks_exact(18).zip(x.chunks_exact(32)) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..18];
                for j in 0..16 {
                    let lo = ((qs[j] & 0x0F) as i32 - 8) as f32;
                    let hi = ((qs[j] >> 4) as i32 - 8) as f32;
                    acc[j] += d * (lo * xb[j] + hi * xb[j + 16]);
                }
            }
        }
        GgmlDType::Q8_0 => {
            for (blk, xb) in row.chunks_exact(34).zip(x.chunks_exact(32)) {
                let d = f16_at(blk, 0);
                let qs = &blk[2..34];
                for j in 0..16 {
                    acc[j] +=
                        d * ((qs[j] as i8) as f32 * xb[j] + (qs[j + 16] as i8) as f32 * xb[j + 16]);
                }
            }
        }
        _ => unreachable!("fused dots exist for Q4_0, Q4_1 and Q8_0"),
    }
    let mut s = extra;
    for a in acc {
        s += a;
    }
    s
}

dispatch!(fn dot_blocks_auto(dtype: GgmlDType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32; via dot_blocks_g);

/// The fused dot, with hand-written AVX-512 when the CPU has it (16 lanes, FMA: about a third
/// of the instructions LLVM's 8-lane version needs), else the auto-vectorised loop.
fn dot_blocks(dtype: GgmlDType, row: &[u8], x: &[f32], xsum: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: the CPU has AVX-512F and F16C; row holds whole blocks matching x.
        unsafe {
            return match dtype {
                GgmlDType::Q4_1 => avx512::dot_q4(row, x, 20, false),
                GgmlDType::Q4_0 => avx512::dot_q4(row, x, 18, true),
                _ => avx512::dot_q8_0(row, x),
            };
        }
    }
    dot_blocks_auto(dtype, row, x, xsum)
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// How far ahead (bytes) the block loops prefetch: ~5 rows of a 576-wide Q4_1 matrix
    /// (1024 and 4096 were slower on SmolLM2).
    const PREFETCH: usize = 2048;

    /// The block's leading f16 scale (and, for Q4_1, the minimum after it) as f32 lanes 0 and 1.
    #[inline(always)]
    unsafe fn scales(blk: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()))
    }

    /// One Q4 block: `acc += d * sum(q * x)` and, for Q4_1, `accm += m * sum(x)`, all in
    /// vector registers (a scalar chain across blocks was the bottleneck).
    #[inline(always)]
    unsafe fn q4_block(
        blk: *const u8,
        xp: *const f32,
        q4_0: bool,
        acc: __m512,
        accm: __m512,
    ) -> (__m512, __m512) {
        let dm = scales(blk);
        let q32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(
            blk.add(if q4_0 { 2 } else { 4 }) as *const __m128i
        ));
        let mut lo = _mm512_and_si512(q32, _mm512_set1_epi32(0x0F));
        let mut hi = _mm512_srli_epi32::<4>(q32);
        if q4_0 {
            lo = _mm512_sub_epi32(lo, _mm512_set1_epi32(8));
            hi = _mm512_sub_epi32(hi, _mm512_set1_epi32(8));
        }
        let x0 = _mm512_loadu_ps(xp);
        let x1 = _mm512_loadu_ps(xp.add(16));
        let t = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(hi),
            x1,
            _mm512_mul_ps(_mm512_cvtepi32_ps(lo), x0),
        );
        let acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), t, acc);
        let accm = if q4_0 {
            accm
        } else {
            let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
            _mm512_fmadd_ps(m, _mm512_add_ps(x0, x1), accm)
        };
        (acc, accm)
    }

    /// Q4_0 (`stride` 18, values q - 8) or Q4_1 (`stride` 20, values d * q + m) blocks.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dot_q4(row: &[u8], x: &[f32], stride: usize, q4_0: bool) -> f32 {
        let nb = row.len() / stride;
        assert!(x.len() >= nb * 32);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        // Two block streams with their own accumulators: independent FMA chains.
        let z = _mm512_setzero_ps();
        let (mut a0, mut m0, mut a1, mut m1) = (z, z, z, z);
        let mut b = 0;
        while b + 1 < nb {
            // The weights stream from L3 or memory: ask for them ahead of use (the loads after
            // each block's fetch were where the time went). Prefetches never fault.
            _mm_prefetch::<_MM_HINT_T0>(rp.wrapping_add(b * stride + PREFETCH) as *const i8);
            (a0, m0) = q4_block(rp.add(b * stride), xp.add(b * 32), q4_0, a0, m0);
            (a1, m1) = q4_block(rp.add((b + 1) * stride), xp.add((b + 1) * 32), q4_0, a1, m1);
            b += 2;
        }
        if b < nb {
            (a0, m0) = q4_block(rp.add(b * stride), xp.add(b * 32), q4_0, a0, m0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(m0, m1)))
    }

    #[inline(always)]
    unsafe fn q8_block(blk: *const u8, xp: *const f32, acc: __m512) -> __m512 {
        let d = _mm512_broadcastss_ps(scales(blk));
        let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
        let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
        let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
        let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
        let t = _mm512_fmadd_ps(
            w1,
            _mm512_loadu_ps(xp.add(16)),
            _mm512_mul_ps(w0, _mm512_loadu_ps(xp)),
        );
        _mm512_fmadd_ps(d, t, acc)
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let nb = row.len() / 34;
        assert!(x.len() >= nb * 32);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut b = 0;
        while b + 1 < nb {
            _mm_prefetch::<_MM_HINT_T0>(rp.wrapping_add(b * 34 + PREFETCH) as *const i8);
            acc0 = q8_block(rp.add(b * 34), xp.add(b * 32), acc0);
            acc1 = q8_block(rp.add((b + 1) * 34), xp.add((b + 1) * 32), acc1);
            b += 2;
        }
        if b < nb {
            acc0 = q8_block(rp.add(b * 34), xp.add(b * 32), acc0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }
}

#[inline(always)]
fn expand_q4_0(row: &[u8], out: &mut [f32]) {
    for (blk, o) in row.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let qs = &blk[2..18];
        for j in 0..16 {
            o[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
            o[j + 16] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

#[inline(always)]
fn expand_q4_1(row: &[u8], out: &mut [f32]) {
    for (blk, o) in row.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        let m = f16_at(blk, 2);
        let qs = &blk[4..20];
        for j in 0..16 {
            o[j] = (qs[j] & 0x0F) as f32 * d + m;
            o[j + 16] = (qs[j] >> 4) as f32 * d + m;
        }
    }
}

#[inline(always)]
fn expand_q8_0(row: &[u8], out: &mut [f32]) {
    for (blk, o) in row.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(blk, 0);
        for j in 0..32 {
            o[j] = (blk[2 + j] as i8) as f32 * d;
        }
    }
}

#[inline(always)]
fn expand_f16(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(2).zip(out.iter_mut()) {
        *o = f16_at(b, 0);
    }
}

fn expand_blocks<T: GgmlType>(row: &[u8], out: &mut [f32]) {
    let n = row.len() / std::mem::size_of::<T>();
    // SAFETY: row holds n whole blocks of T (a repr(C) struct of f16/u8 fields) and starts at
    // an offset that is a multiple of the block size inside 8-byte aligned storage.
    let blocks = unsafe { std::slice::from_raw_parts(row.as_ptr() as *const T, n) };
    T::to_float(blocks, out)
}

#[inline(always)]
fn expand_g(dtype: GgmlDType, row: &[u8], out: &mut [f32]) {
    use GgmlDType as D;
    match dtype {
        D::Q4_0 => expand_q4_0(row, out),
        D::Q4_1 => expand_q4_1(row, out),
        D::Q8_0 => expand_q8_0(row, out),
        D::F16 => expand_f16(row, out),
        D::F32 => {
            for (b, o) in row.chunks_exact(4).zip(out.iter_mut()) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        D::Q5_0 => expand_blocks::<BlockQ5_0>(row, out),
        D::Q5_1 => expand_blocks::<BlockQ5_1>(row, out),
        D::Q2K => expand_blocks::<BlockQ2K>(row, out),
        D::Q3K => expand_blocks::<BlockQ3K>(row, out),
        D::Q4K => expand_blocks::<BlockQ4K>(row, out),
        D::Q5K => expand_blocks::<BlockQ5K>(row, out),
        D::Q6K => expand_blocks::<BlockQ6K>(row, out),
        _ => unreachable!("QuantLinear::new admits only the types above"),
    }
}

dispatch!(fn expand_row(dtype: GgmlDType, row: &[u8], out: &mut [f32]); via expand_g);

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .and_then(|d| d.abs())
            .and_then(|d| d.flatten_all())
            .and_then(|d| d.max(0))
            .and_then(|d| d.to_scalar::<f32>())
            .expect("comparable f32 tensors")
    }

    #[test]
    fn matches_candle_dequantize_then_matmul() {
        let dev = Device::Cpu;
        let (n, k, m) = (40usize, 256usize, 3usize);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
            .collect();
        let w = Tensor::from_vec(w, (n, k), &dev).unwrap();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
            .collect();
        let xt = Tensor::from_vec(x, (m, k), &dev).unwrap();
        for dt in [
            GgmlDType::Q4_0,
            GgmlDType::Q4_1,
            GgmlDType::Q8_0,
            GgmlDType::Q5_0,
            GgmlDType::Q4K,
            GgmlDType::Q6K,
            GgmlDType::F16,
        ] {
            let q = QTensor::quantize(&w, dt).unwrap();
            let dense = q.dequantize(&dev).unwrap();
            let want = xt.matmul(&dense.t().unwrap()).unwrap();
            let ql = QuantLinear::new(&q).unwrap().unwrap();
            // 3 rows take the fused path, 6 the expanding one.
            let x6 = Tensor::cat(&[&xt, &xt], 0).unwrap();
            let want = Tensor::cat(&[&want, &want], 0).unwrap();
            let got = ql.forward(&x6).unwrap();
            let got3 = ql.forward(&xt.narrow(0, 0, m).unwrap()).unwrap();
            let got = Tensor::cat(&[&got.narrow(0, 0, m).unwrap(), &got3], 0).unwrap();
            let diff = max_abs_diff(&want, &got);
            assert!(diff < 1e-4, "{dt:?}: {diff}");
            let emb = ql.embed(&[3, 0], &dev).unwrap();
            let want = dense.narrow(0, 3, 1).unwrap().squeeze(0).unwrap();
            let d2 = max_abs_diff(&emb.get(0).unwrap(), &want);
            assert_eq!(d2, 0.0, "{dt:?} embed");
        }
    }
}
