//! The post-LN transformer encoder stack shared by BERT, RoBERTa/XLM-RoBERTa and DistilBERT
//! (self-attention, residual + LayerNorm, feed-forward, residual + LayerNorm).
//!
//! Two implementations of the same maths:
//! - [`PostLnStack::Candle`]: candle ops, for GPU and non-f32 dtypes;
//! - [`PostLnStack::Cpu`]: f32 on CPU over plain buffers. One fused Q/K/V product, bias and
//!   residual folded into the matmul's destination, LayerNorm/softmax/activation in place, and
//!   attention per (sequence, head) without the copies candle's head split costs. Its products
//!   run on the calling thread when the pipeline already runs one batch per core
//!   ([`super::layers::in_worker`]), else they fan out over rayon's pool.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::LayerNorm;
use rayon::prelude::*;

use super::cpu_attention::attend_sequences;
use super::cpu_linear::{gemm_into, Layout};
use super::layers::{attention, attention_bias, fast_erf, in_worker, Activation, Linear};

/// One post-LN layer's weights, as candle modules.
pub struct PostLnLayer {
    pub query: Linear,
    pub key: Linear,
    pub value: Linear,
    pub attn_out: Linear,
    pub attn_norm: LayerNorm,
    pub ff_in: Linear,
    pub act: Activation,
    pub ff_out: Linear,
    pub out_norm: LayerNorm,
    pub num_heads: usize,
}

impl PostLnLayer {
    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let ctx = attention(
            &self.query.forward(xs)?,
            &self.key.forward(xs)?,
            &self.value.forward(xs)?,
            bias,
            self.num_heads,
        )?;
        let xs = self
            .attn_norm
            .forward(&(self.attn_out.forward(&ctx)? + xs)?)?;
        let ff = self.act.forward(&self.ff_in.forward(&xs)?)?;
        self.out_norm.forward(&(self.ff_out.forward(&ff)? + xs)?)
    }
}

pub enum PostLnStack {
    Candle(Vec<PostLnLayer>),
    Cpu(Vec<CpuLayer>),
}

impl PostLnStack {
    /// The CPU path for f32 on CPU, candle's otherwise. `layers` loads them one by one: on
    /// the CPU path each layer is copied and dropped before the next loads, so the candle
    /// copy of the whole stack never exists next to the CPU one.
    pub fn new(
        layers: impl IntoIterator<Item = Result<PostLnLayer>>,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let layers = layers.into_iter();
        if device.is_cpu() && dtype == DType::F32 {
            Ok(Self::Cpu(
                layers
                    .map(|l| CpuLayer::from_layer(&l?))
                    .collect::<Result<_>>()?,
            ))
        } else {
            Ok(Self::Candle(layers.collect::<Result<_>>()?))
        }
    }

    /// `xs` `[b, s, h]`, `attention_mask` the 0/1 `[b, s]` mask.
    pub fn forward(&self, xs: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        match self {
            Self::Candle(layers) => {
                let bias = attention_bias(attention_mask, xs.dtype())?;
                let mut xs = xs.clone();
                for layer in layers {
                    xs = layer.forward(&xs, &bias)?;
                }
                Ok(xs)
            }
            Self::Cpu(layers) => {
                let (b, s, h) = xs.dims3()?;
                let mut x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
                let mask: Vec<f32> = attention_mask
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let mut scratch = Scratch::default();
                for layer in layers {
                    layer.forward(&mut x, b, s, &mask, &mut scratch);
                }
                Tensor::from_vec(x, (b, s, h), xs.device())
            }
        }
    }
}

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// A post-LN layer's weights in plain f32 buffers; matrices stored `[in, out]` row-major.
pub struct CpuLayer {
    hidden: usize,
    inter: usize,
    heads: usize,
    /// `[h, 3h]`: query, key and value projections side by side.
    qkv_w: Vec<f32>,
    qkv_b: Vec<f32>,
    out_w: Vec<f32>,
    out_b: Vec<f32>,
    ln1: (Vec<f32>, Vec<f32>, f32),
    ff_in_w: Vec<f32>,
    ff_in_b: Vec<f32>,
    act: Activation,
    ff_out_w: Vec<f32>,
    ff_out_b: Vec<f32>,
    ln2: (Vec<f32>, Vec<f32>, f32),
}

fn norm_parts(n: &LayerNorm) -> Result<(Vec<f32>, Vec<f32>, f32)> {
    let g = vec_of(n.weight())?;
    let b = match n.bias() {
        Some(b) => vec_of(b)?,
        None => vec![0.0; g.len()],
    };
    Ok((g, b, n.eps() as f32))
}

fn bias_of(l: &Linear, n: usize) -> Result<Vec<f32>> {
    match l.bias() {
        Some(b) => vec_of(b),
        None => Ok(vec![0.0; n]),
    }
}

impl CpuLayer {
    fn from_layer(l: &PostLnLayer) -> Result<Self> {
        let (hidden, inter) = l.ff_in.weight_t().dims2()?;
        let qkv_w = Tensor::cat(
            &[l.query.weight_t(), l.key.weight_t(), l.value.weight_t()],
            1,
        )?;
        let mut qkv_b = bias_of(&l.query, hidden)?;
        qkv_b.extend(bias_of(&l.key, hidden)?);
        qkv_b.extend(bias_of(&l.value, hidden)?);
        Ok(Self {
            hidden,
            inter,
            heads: l.num_heads,
            qkv_w: vec_of(&qkv_w)?,
            qkv_b,
            out_w: vec_of(l.attn_out.weight_t())?,
            out_b: bias_of(&l.attn_out, hidden)?,
            ln1: norm_parts(&l.attn_norm)?,
            ff_in_w: vec_of(l.ff_in.weight_t())?,
            ff_in_b: bias_of(&l.ff_in, inter)?,
            act: l.act,
            ff_out_w: vec_of(l.ff_out.weight_t())?,
            ff_out_b: bias_of(&l.ff_out, hidden)?,
            ln2: norm_parts(&l.out_norm)?,
        })
    }

    /// One layer over `x` (`[b * s, h]`, updated in place); `mask` is `[b, s]` 0/1.
    fn forward(&self, x: &mut [f32], b: usize, s: usize, mask: &[f32], scratch: &mut Scratch) {
        let (h, rows) = (self.hidden, b * s);
        let par = !in_worker() && rayon::current_num_threads() > 1;
        let Scratch { qkv, y, ff } = scratch;
        linear(x, rows, h, &self.qkv_w, &self.qkv_b, None, qkv, par);
        let ctx = self.attend(qkv, b, s, mask, par);
        // attn_out(ctx) + x, then LayerNorm: x is the matmul's starting value.
        linear(&ctx, rows, h, &self.out_w, &self.out_b, Some(x), y, par);
        layer_norm_rows(y, h, &self.ln1, par);
        linear(y, rows, h, &self.ff_in_w, &self.ff_in_b, None, ff, par);
        activate(ff, self.act, par);
        // ff_out(ff) + y, written over x.
        let ff_out = (&self.ff_out_w[..], &self.ff_out_b[..]);
        linear_into(ff, rows, self.inter, ff_out, Some(y), x, par);
        layer_norm_rows(x, h, &self.ln2, par);
    }

    /// Softmax attention per (sequence, head) over `qkv` `[b * s, 3h]`; returns `[b * s, h]`.
    fn attend(&self, qkv: &[f32], b: usize, s: usize, mask: &[f32], par: bool) -> Vec<f32> {
        let d = self.hidden / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        attend_sequences(qkv, b, s, self.heads, d, scale, None, mask, par)
    }
}

/// Buffers reused from layer to layer: the fused Q/K/V output, the attention block's output
/// and the feed-forward's inner activations.
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    y: Vec<f32>,
    ff: Vec<f32>,
}

/// `out = x [rows, k] @ w [k, n] + bias (+ residual)`, `out` resized to `[rows, n]`.
#[allow(clippy::too_many_arguments)]
fn linear(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    bias: &[f32],
    residual: Option<&[f32]>,
    out: &mut Vec<f32>,
    par: bool,
) {
    out.resize(rows * bias.len(), 0.0);
    linear_into(x, rows, k, (w, bias), residual, out, par);
}

/// `out [rows, n] = x [rows, k] @ w [k, n] + bias (+ residual)`; bias and residual are the
/// matmul's starting value.
fn linear_into(
    x: &[f32],
    rows: usize,
    k: usize,
    (w, bias): (&[f32], &[f32]),
    residual: Option<&[f32]>,
    out: &mut [f32],
    par: bool,
) {
    let n = bias.len();
    debug_assert_eq!(w.len(), k * n);
    debug_assert_eq!(x.len(), rows * k);
    let out = &mut out[..rows * n];
    match residual {
        Some(r) => {
            for (orow, rrow) in out.chunks_exact_mut(n).zip(r.chunks_exact(n)) {
                for ((o, a), b) in orow.iter_mut().zip(rrow).zip(bias) {
                    *o = a + b;
                }
            }
        }
        None => {
            for orow in out.chunks_exact_mut(n) {
                orow.copy_from_slice(bias);
            }
        }
    }
    gemm_into(x, rows, k, w, n, Layout::InOut, out, true, par);
}

/// Rows that are worth splitting across threads only when there is enough work.
fn rows_par<F: Fn(&mut [f32]) + Sync + Send>(x: &mut [f32], width: usize, par: bool, f: F) {
    if par && x.len() >= 1 << 16 {
        x.par_chunks_mut(width * 16)
            .for_each(|c| c.chunks_exact_mut(width).for_each(&f));
    } else {
        x.chunks_exact_mut(width).for_each(f);
    }
}

fn layer_norm_rows(x: &mut [f32], h: usize, (g, b, eps): &(Vec<f32>, Vec<f32>, f32), par: bool) {
    rows_par(x, h, par, |row| simd::layer_norm(row, g, b, *eps));
}

fn activate(x: &mut [f32], act: Activation, par: bool) {
    let chunk = 4096;
    let f = |c: &mut [f32]| simd::activate(c, act);
    if par && x.len() >= 1 << 16 {
        x.par_chunks_mut(chunk).for_each(f);
    } else {
        f(x);
    }
}

/// exp for f32 in plain arithmetic (Cephes' polynomial, ~1 ulp on the reduced range) so that
/// loops over it vectorise; `f32::exp` is a scalar libm call.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E;
    // Round to nearest through the float adder: n sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let z = t + MAGIC;
    let n = z - MAGIC;
    let ni = (z.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

#[inline(always)]
fn act_one(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Gelu => 0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluNew => {
            let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
            // tanh(u) = 1 - 2 / (exp(2u) + 1)
            0.5 * x * (2.0 - 2.0 / (fast_exp(2.0 * u) + 1.0))
        }
        Activation::Relu => x.max(0.0),
        Activation::Silu => x / (1.0 + fast_exp(-x)),
        Activation::Tanh => 1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0),
    }
}

/// Row kernels, compiled for the baseline target and again with AVX-512 and with AVX2+FMA
/// (`dispatch!` picks at run time).
pub(crate) mod simd {
    use super::{act_one, fast_exp, Activation};
    use crate::simd::{dispatch, dot16, sum16};

    #[inline(always)]
    fn layer_norm_g(row: &mut [f32], g: &[f32], b: &[f32], eps: f32) {
        let n = row.len() as f32;
        let mean = sum16(row) / n;
        for v in row.iter_mut() {
            *v -= mean;
        }
        let var = dot16(row, row);
        let inv = 1.0 / (var / n + eps).sqrt();
        for ((v, g), b) in row.iter_mut().zip(g).zip(b) {
            *v = *v * inv * g + b;
        }
    }
    dispatch!(pub fn layer_norm(row: &mut [f32], g: &[f32], b: &[f32], eps: f32); via layer_norm_g);

    #[inline(always)]
    fn activate_g(xs: &mut [f32], act: Activation) {
        match act {
            Activation::Gelu => xs
                .iter_mut()
                .for_each(|x| *x = act_one(*x, Activation::Gelu)),
            Activation::GeluNew => xs
                .iter_mut()
                .for_each(|x| *x = act_one(*x, Activation::GeluNew)),
            Activation::Relu => xs
                .iter_mut()
                .for_each(|x| *x = act_one(*x, Activation::Relu)),
            Activation::Silu => xs
                .iter_mut()
                .for_each(|x| *x = act_one(*x, Activation::Silu)),
            Activation::Tanh => xs
                .iter_mut()
                .for_each(|x| *x = act_one(*x, Activation::Tanh)),
        }
    }
    dispatch!(pub fn activate(xs: &mut [f32], act: Activation); via activate_g);

    /// Softmax over the entries whose `keep` is 1 (all of them when `keep` is empty); the
    /// others become 0 (HF adds the dtype's minimum to them, which underflows to exactly 0
    /// after the exponential).
    #[inline(always)]
    pub(crate) fn softmax_masked_g(row: &mut [f32], keep: &[f32]) {
        let all = keep.iter().all(|&k| k != 0.0);
        if !all {
            for (v, &k) in row.iter_mut().zip(keep) {
                if k == 0.0 {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        // Whole 16-lane chunks, the ragged end through a chunk padded with -inf (which
        // comes out as 0), so no step runs scalar.
        let full = row.len() / 16 * 16;
        let rest = row.len() - full;
        let mut tail = [f32::NEG_INFINITY; 16];
        tail[..rest].copy_from_slice(&row[full..]);
        let (body, _) = row.split_at_mut(full);
        let mut mx = tail;
        for c in body.chunks_exact(16) {
            for j in 0..16 {
                mx[j] = mx[j].max(c[j]);
            }
        }
        let m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
        let mut acc = [0f32; 16];
        let exp_chunk = |c: &mut [f32], acc: &mut [f32; 16]| {
            for j in 0..16 {
                let e = fast_exp(c[j] - m);
                let e = if c[j] == f32::NEG_INFINITY { 0.0 } else { e };
                c[j] = e;
                acc[j] += e;
            }
        };
        for c in body.chunks_exact_mut(16) {
            exp_chunk(c, &mut acc);
        }
        exp_chunk(&mut tail, &mut acc);
        let inv = 1.0 / acc.iter().sum::<f32>();
        for v in body.iter_mut() {
            *v *= inv;
        }
        for (v, t) in row[full..].iter_mut().zip(&tail[..rest]) {
            *v = t * inv;
        }
    }
    dispatch!(pub fn softmax_masked(row: &mut [f32], keep: &[f32]); via softmax_masked_g);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let e = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - e) / e).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(fast_exp(-1e4), fast_exp(-87.0));
    }

    #[test]
    fn softmax_masks_and_normalises() {
        let mut row = vec![1.0, 2.0, 3.0, 100.0];
        simd::softmax_masked(&mut row, &[1.0, 1.0, 1.0, 0.0]);
        assert_eq!(row[3], 0.0);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((row[i] as f64 - e[i] / s).abs() < 1e-6);
        }
    }

    /// Lengths around the 16-lane chunks (the ragged end goes through a padded chunk), with
    /// and without a mask, against f64.
    #[test]
    fn softmax_matches_f64_at_every_length() {
        for len in [1, 15, 16, 17, 37, 351] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 23) as f32 / 3.0 - 4.0)
                .collect();
            for masked in [false, true] {
                let keep: Vec<f32> = if masked {
                    (0..len)
                        .map(|i| if i % 3 == 1 { 0.0 } else { 1.0 })
                        .collect()
                } else {
                    Vec::new()
                };
                let kept = |i: usize| keep.is_empty() || keep[i] != 0.0;
                let m = (0..len).filter(|&i| kept(i)).map(|i| x[i] as f64);
                let m = m.fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..len)
                    .map(|i| {
                        if kept(i) {
                            (x[i] as f64 - m).exp()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let sum: f64 = e.iter().sum();
                let mut row = x.clone();
                simd::softmax_masked(&mut row, &keep);
                for i in 0..len {
                    let d = (row[i] as f64 - e[i] / sum).abs();
                    assert!(d < 1e-6, "len {len} masked {masked} at {i}: {d}");
                }
            }
        }
    }

    #[test]
    fn cpu_stack_matches_candle_stack() {
        let dev = Device::Cpu;
        let (h, i, heads) = (32usize, 64usize, 4usize);
        let mk = |seed: u64, shape: &[usize]| {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n)
                .map(|j| (((j as u64 * 2654435761 + seed * 97) % 1000) as f32 / 1000.0 - 0.5) * 0.3)
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let lin =
            |seed, o, inp| Linear::new(mk(seed, &[o, inp]), Some(mk(seed + 1, &[o]))).unwrap();
        let ln = |seed| LayerNorm::new((mk(seed, &[h]) + 1.0).unwrap(), mk(seed + 1, &[h]), 1e-12);
        let layers = |acts: Activation| {
            vec![PostLnLayer {
                query: lin(1, h, h),
                key: lin(3, h, h),
                value: lin(5, h, h),
                attn_out: lin(7, h, h),
                attn_norm: ln(9),
                ff_in: lin(11, i, h),
                act: acts,
                ff_out: lin(13, h, i),
                out_norm: ln(15),
                num_heads: heads,
            }]
        };
        let xs = mk(21, &[2, 5, h]);
        let mask =
            Tensor::from_vec(vec![1f32, 1., 1., 1., 1., 1., 1., 1., 0., 0.], (2, 5), &dev).unwrap();
        for act in [Activation::Gelu, Activation::GeluNew, Activation::Relu] {
            let a = PostLnStack::Candle(layers(act))
                .forward(&xs, &mask)
                .unwrap();
            let b = PostLnStack::new(layers(act).into_iter().map(Ok), &dev, DType::F32)
                .unwrap()
                .forward(&xs, &mask)
                .unwrap();
            let diff = crate::models::max_abs_diff(&a, &b);
            assert!(diff < 1e-5, "{act:?}: {diff}");
        }
    }
}
