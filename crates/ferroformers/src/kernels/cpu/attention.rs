//! Attention over plain f32 buffers, shared by the CPU fast paths: whole sequences at once
//! (BERT-family and T5 encoders), and for decoders (T5, Llama) a key/value buffer per layer
//! that grows by doubling, with one query row attending over it; and a few query rows over
//! cached keys for the candle decoders' `sdpa` on CPU (GPT-2, BART).

use rayon::prelude::*;

use super::rowops::{fast_exp, softmax_masked_g, softmax_rows};
use super::simd::{dispatch, dot16, max16, sum16};
use super::threads::{in_worker, SendPtr};

/// One attention layer's cached keys and values, `[rows, heads, cap, dim]` each.
#[derive(Debug, Clone)]
pub struct KvBuffer {
    rows: usize,
    heads: usize,
    dim: usize,
    cap: usize,
    len: usize,
    k: Vec<f32>,
    v: Vec<f32>,
}

impl KvBuffer {
    pub fn new(rows: usize, heads: usize, dim: usize) -> Self {
        Self {
            rows,
            heads,
            dim,
            cap: 0,
            len: 0,
            k: Vec::new(),
            v: Vec::new(),
        }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Room for `extra` more positions.
    pub fn reserve(&mut self, extra: usize) {
        if self.len + extra <= self.cap {
            return;
        }
        let cap = (self.len + extra).max(self.cap * 2).max(16);
        let (old, d, used) = (self.cap, self.dim, self.len * self.dim);
        for buf in [&mut self.k, &mut self.v] {
            let mut out = vec![0f32; self.rows * self.heads * cap * d];
            for rh in 0..self.rows * self.heads {
                out[rh * cap * d..rh * cap * d + used]
                    .copy_from_slice(&buf[rh * old * d..rh * old * d + used]);
            }
            *buf = out;
        }
        self.cap = cap;
    }

    /// Store the key and value of `row`, `head` at position `pos` (`< len + reserved`).
    pub fn put(&mut self, row: usize, head: usize, pos: usize, k: &[f32], v: &[f32]) {
        assert!(
            pos < self.cap,
            "position {pos} beyond the reserved {}",
            self.cap
        );
        let at = ((row * self.heads + head) * self.cap + pos) * self.dim;
        self.k[at..at + self.dim].copy_from_slice(k);
        self.v[at..at + self.dim].copy_from_slice(v);
    }

    /// Positions `0..len` now hold data.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap);
        self.len = len;
    }

    /// Keys and values of `row`, `head` at positions `0..n`.
    pub fn get(&self, row: usize, head: usize, n: usize) -> (&[f32], &[f32]) {
        let at = (row * self.heads + head) * self.cap * self.dim;
        let n = n * self.dim;
        (&self.k[at..at + n], &self.v[at..at + n])
    }

    /// Keep rows: row `i` afterwards is row `rows[i]` before.
    pub fn select_rows(&mut self, rows: &[usize]) -> candle_core::Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            candle_core::bail!("row {bad} is out of range ({} rows)", self.rows);
        }
        let per_row = self.heads * self.cap * self.dim;
        let per_head = self.cap * self.dim;
        let used = self.len * self.dim;
        for buf in [&mut self.k, &mut self.v] {
            let mut out = vec![0f32; rows.len() * per_row];
            for (i, &r) in rows.iter().enumerate() {
                for h in 0..self.heads {
                    let (from, to) = (r * per_row + h * per_head, i * per_row + h * per_head);
                    out[to..to + used].copy_from_slice(&buf[from..from + used]);
                }
            }
            *buf = out;
        }
        self.rows = rows.len();
        Ok(())
    }
}

/// Bidirectional attention per (sequence, head) over `qkv` `[b * s, 3 * heads * d]` (queries,
/// keys and values side by side): scores `scale * q . k`, plus the head's `bias` `[heads, s, s]`
/// when given (T5's position bias), keys whose `keep` `[b, s]` is 0 dropped, softmax, then the
/// weighted values. Returns `[b * s, heads * d]`; `par` spreads the (sequence, head) pairs over
/// rayon's threads (when the work is large enough to pay for it).
#[allow(clippy::too_many_arguments)]
pub fn attend_sequences(
    qkv: &[f32],
    b: usize,
    s: usize,
    heads: usize,
    d: usize,
    scale: f32,
    bias: Option<&[f32]>,
    keep: &[f32],
    par: bool,
) -> Vec<f32> {
    let inner = heads * d;
    let stride = 3 * inner;
    assert!(qkv.len() >= b * s * stride && keep.len() >= b * s);
    assert!(bias.is_none_or(|t| t.len() >= heads * s * s));
    let mut ctx = vec![0f32; b * s * inner];
    // Each (sequence, head) writes its own columns of its own rows: disjoint.
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let job = |(bi, hd): (usize, usize)| {
        let keep = &keep[bi * s..(bi + 1) * s];
        // No mask to apply when every key is kept (checked once, not per row).
        let keep = if keep.iter().all(|&k| k != 0.0) {
            &[][..]
        } else {
            keep
        };
        let base = bi * s * stride;
        let q = &qkv[base + hd * d..];
        let k = &qkv[base + inner + hd * d..];
        let v = &qkv[base + 2 * inner + hd * d..];
        let mut scores = match bias {
            Some(t) => t[hd * s * s..(hd + 1) * s * s].to_vec(),
            None => vec![0f32; s * s],
        };
        // SAFETY: q, k, v stay within qkv (rows bi*s.., the head's d columns, row stride
        // `stride`); scores is s x s and, with a bias, starts as it (read_dst).
        unsafe {
            gemm::gemm(
                s,
                s,
                d,
                scores.as_mut_ptr(),
                1,
                s as isize,
                bias.is_some(),
                q.as_ptr(),
                1,
                stride as isize,
                k.as_ptr(),
                stride as isize,
                1,
                1.0,
                scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(&mut scores, s, keep);
        let out = ctx_ptr;
        // SAFETY: rows bi*s.., columns hd*d..(hd+1)*d of ctx (row stride inner) belong to this
        // job only.
        unsafe {
            gemm::gemm(
                s,
                d,
                s,
                out.0.add(bi * s * inner + hd * d),
                1,
                inner as isize,
                false,
                scores.as_ptr(),
                1,
                s as isize,
                v.as_ptr(),
                1,
                stride as isize,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    };
    let jobs = (0..b).flat_map(|bi| (0..heads).map(move |hd| (bi, hd)));
    // A short input's attention (one sentence: ~100k products) is over before rayon's threads
    // wake up: split only when there is real work.
    if par && b * heads * s * s * d >= 1 << 20 {
        jobs.collect::<Vec<_>>().into_par_iter().for_each(job);
    } else {
        jobs.for_each(job);
    }
    ctx
}

/// One query row over `k`, `v` (`[keys, d]`, `keys = scores.len()`): scores `scale * q . k_j`
/// plus `bias` (when not empty), keys whose `keep` is 0 dropped (when not empty), softmax, and
/// `out = sum_j p_j v_j`. Additive masks of `f32::MIN` (as HF's) come out as exactly 0 too.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_one_g(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    bias: &[f32],
    keep: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dk = q.len();
    for (j, sc) in scores.iter_mut().enumerate() {
        *sc = dot16(q, &k[j * dk..(j + 1) * dk]) * scale;
    }
    if !bias.is_empty() {
        for (sc, &b) in scores.iter_mut().zip(bias) {
            *sc += b;
        }
    }
    softmax_masked_g(scores, keep);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        for (o, &vv) in out.iter_mut().zip(&v[j * dk..(j + 1) * dk]) {
            *o += p * vv;
        }
    }
}
dispatch!(pub fn attend_one(q: &[f32], k: &[f32], v: &[f32], scale: f32, bias: &[f32], keep: &[f32], scores: &mut [f32], out: &mut [f32]); via attend_one_g);

/// Causal self-attention of `n` query rows over the keys cached in `kv` (decoder prompts and
/// steps): row `t` of `qkv` (row stride `width`, the `nh` query heads of `hd` values first) is
/// position `past + t % s` of batch row `t / s`; it sees the keys up to its own position, of kv
/// head `head / group`, with `bias[t * total..]` added (padding masks). Returns `[n, nh * hd]`.
/// Rows spread over the threads, longest first, when the work is large (a prompt); each row
/// is computed as [`attend_one`] computes it, so the result doesn't depend on the split.
pub fn attend_causal(
    qkv: &[f32],
    (width, n, s, past): (usize, usize, usize, usize),
    (nh, group, hd): (usize, usize, usize),
    kv: &KvBuffer,
    (bias, total): (&[f32], usize),
    scale: f32,
) -> Vec<f32> {
    let q_w = nh * hd;
    assert!(qkv.len() >= n * width && width >= q_w && bias.len() >= n * total);
    assert!(n == 0 || past + (n - 1) % s < total);
    let mut ctx = vec![0f32; n * q_w];
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let rows = |items: std::ops::Range<usize>| {
        let out = ctx_ptr;
        let mut scores = vec![0f32; total];
        for item in items {
            // Longest rows (latest positions) first.
            let t = n - 1 - item;
            let (r, i) = (t / s, t % s);
            // Keys after this query's position are masked: skip them.
            let keys = past + i + 1;
            let brow = &bias[t * total..t * total + keys];
            // SAFETY: row t of ctx belongs to this item only.
            let crow = unsafe { std::slice::from_raw_parts_mut(out.0.add(t * q_w), q_w) };
            for head in 0..nh {
                let (ks, vs) = kv.get(r, head / group, keys);
                attend_one(
                    &qkv[t * width + head * hd..t * width + (head + 1) * hd],
                    ks,
                    vs,
                    scale,
                    brow,
                    &[],
                    &mut scores[..keys],
                    &mut crow[head * hd..(head + 1) * hd],
                );
            }
        }
    };
    // One decoding step (a few rows, short cache) is over before the workers wake.
    if n * nh * total * hd >= 1 << 20 && !in_worker() {
        candle_core::utils::barrier_pool().execute_chunked(n, rows);
    } else {
        rows(0..n);
    }
    ctx
}

/// Softmax attention of a few query rows (decoding steps, beams): `q` `[b, h, s, d]` over `k`,
/// `v` `[b, kv_h, t, d]` (grouped-query when `kv_h < h`: query head `hh` reads kv head
/// `hh / (h / kv_h)`), scores `scale * q . k` plus the additive `bias` `[b, s, t]`. Plain loops
/// over the cached keys; returns `[b, s, h * d]`.
pub fn attend_few_queries(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    (b, h, s, d): (usize, usize, usize, usize),
    (kv_h, t): (usize, usize),
    scale: f32,
) -> Vec<f32> {
    let n_rep = h / kv_h;
    let mut out = vec![0f32; b * s * h * d];
    let mut scores = vec![0f32; t];
    for bi in 0..b {
        for hh in 0..h {
            let kh = hh / n_rep;
            let kbase = (bi * kv_h + kh) * t * d;
            for i in 0..s {
                let qrow = &q[((bi * h + hh) * s + i) * d..][..d];
                let brow = &bias[(bi * s + i) * t..][..t];
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = dot16(qrow, &k[kbase + j * d..][..d]) * scale + brow[j];
                }
                let m = max16(&scores);
                for sc in scores.iter_mut() {
                    *sc = fast_exp(*sc - m);
                }
                let inv = 1.0 / sum16(&scores);
                let orow = &mut out[((bi * s + i) * h + hh) * d..][..d];
                for (j, &p) in scores.iter().enumerate() {
                    let p = p * inv;
                    for (o, &x) in orow.iter_mut().zip(&v[kbase + j * d..][..d]) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    out
}

/// `RMSNorm` of one row as HF's Llama and T5 compute it: `w * (x / sqrt(mean(x^2) + eps))`.
#[inline(always)]
fn rms_norm_g(row: &mut [f32], w: &[f32], eps: f32) {
    let ss = dot16(row, row);
    let inv = 1.0 / (ss / row.len() as f32 + eps).sqrt();
    for (v, &g) in row.iter_mut().zip(w) {
        *v = g * (*v * inv);
    }
}
dispatch!(pub fn rms_norm(row: &mut [f32], w: &[f32], eps: f32); via rms_norm_g);

/// `rms_norm` of every `w.len()`-wide row of `x`, as a new buffer.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(w.len()) {
        rms_norm(row, w, eps);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_grows_and_reorders_rows() {
        let mut b = KvBuffer::new(2, 1, 2);
        for pos in 0..20 {
            b.reserve(1);
            for row in 0..2 {
                let x = (row * 100 + pos) as f32;
                b.put(row, 0, pos, &[x, x], &[-x, -x]);
            }
            b.set_len(pos + 1);
        }
        b.select_rows(&[1, 1, 0]).unwrap();
        assert_eq!(b.rows(), 3);
        let (k, v) = b.get(1, 0, 20);
        assert_eq!(k[38], 119.0);
        assert_eq!(v[0], -100.0);
        let (k, _) = b.get(2, 0, 3);
        assert_eq!(k, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        assert!(b.select_rows(&[3]).is_err());
    }

    #[test]
    fn one_row_attention_masks_and_normalises() {
        let q = [1.0, 0.0];
        let k = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0];
        let v = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0];
        let mut scores = [0f32; 3];
        let mut out = [0f32; 2];
        // Third key dropped by bias f32::MIN, the rest: scores 1*0.5, 0 -> softmax.
        attend_one(
            &q,
            &k,
            &v,
            0.5,
            &[0.0, 0.0, f32::MIN],
            &[],
            &mut scores,
            &mut out,
        );
        let p0 = 0.5f32.exp() / (0.5f32.exp() + 1.0);
        assert!((out[0] - p0).abs() < 1e-6 && (out[1] - (1.0 - p0)).abs() < 1e-6);
        attend_one(
            &q,
            &k,
            &v,
            1.0,
            &[],
            &[0.0, 1.0, 0.0],
            &mut scores,
            &mut out,
        );
        assert_eq!(out, [0.0, 1.0]);
    }
}
