//! The post-LN transformer encoder stack shared by BERT, RoBERTa/XLM-RoBERTa and DistilBERT
//! (self-attention, residual + LayerNorm, feed-forward, residual + LayerNorm).
//!
//! Two implementations of the same maths:
//! - [`PostLnStack::Candle`]: candle ops, for GPU and non-f32 dtypes;
//! - [`PostLnStack::Cpu`]: f32 on CPU over plain buffers, through the kernels in
//!   [`crate::kernels::cpu`]. One fused Q/K/V product, bias and residual folded into the
//!   matmul's destination, LayerNorm/softmax/activation in place, and attention per (sequence,
//!   head) without the copies candle's head split costs. Its products run on the calling thread
//!   when the pipeline already runs one batch per core
//!   ([`crate::kernels::cpu::threads::in_worker`]), else they fan out over rayon's pool.
//!
//! [`PostLnStack::new`] picks the CPU path for f32 on CPU, candle's otherwise; the test at the
//! end checks that the two agree. On the CPU path its `reduce` runs the four products in int8
//! (`--quantize int8`, [`crate::kernels::cpu::int8`]) or bf16 (`--dtype bf16` on CPU,
//! [`crate::kernels::cpu::bf16`]); LayerNorm and activations stay f32, and so does attention
//! on short inputs; from 96 tokens, where the CPU has AVX512-BF16, its two products run in
//! bf16 too (`FERROFORMERS_F32_ATTENTION=1` keeps them f32).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::LayerNorm;

use super::layers::{attention, attention_bias, Activation, Linear};
use crate::kernels::cpu::attention::{attend_sequences_bf16_into, attend_sequences_into};
use crate::kernels::cpu::bf16::{self, Bf16Weights};
use crate::kernels::cpu::int8::Int8Weights;
use crate::kernels::cpu::linear::linear_into;
use crate::kernels::cpu::rowops::{activate_par, layer_norm_rows};
use crate::kernels::cpu::threads::in_worker;

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
    /// the CPU path each layer is copied (and with `reduce`, converted to int8 or bf16) and
    /// dropped before the next loads, so neither the candle copy of the whole stack nor its
    /// f32 copy exists next to the one kept.
    pub fn new(
        layers: impl IntoIterator<Item = Result<PostLnLayer>>,
        device: &Device,
        dtype: DType,
        reduce: Option<Products>,
    ) -> Result<Self> {
        let layers = layers.into_iter();
        if device.is_cpu() && dtype == DType::F32 {
            Ok(Self::Cpu(
                layers
                    .map(|l| {
                        let mut layer = CpuLayer::from_layer(&l?)?;
                        if let Some(to) = reduce {
                            layer.reduce(to);
                        }
                        Ok(layer)
                    })
                    .collect::<Result<_>>()?,
            ))
        } else if reduce.is_some() {
            candle_core::bail!(
                "int8 / bf16 products run on the CPU from f32 weights (--device cpu --dtype f32)"
            )
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
                // This thread's buffers from the last batch: no fresh pages to fault in and
                // zero for every batch and layer.
                let mut scratch = SCRATCH.take();
                for layer in layers {
                    layer.forward(&mut x, b, s, &mask, &mut scratch);
                }
                // Kept for the next batch unless large (long inputs in big batches): then
                // freed, as before.
                if scratch.bytes() <= 64 << 20 {
                    SCRATCH.set(scratch);
                }
                Tensor::from_vec(x, (b, s, h), xs.device())
            }
        }
    }
}

fn vec_of(t: &Tensor) -> Result<Vec<f32>> {
    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

/// Reduced-precision products for the CPU path (`reduce` in [`PostLnStack::new`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Products {
    /// `kernels::cpu::int8`: int8 weights and activations, exact integer sums.
    Int8,
    /// `kernels::cpu::bf16`: bf16 weights and activations, f32 sums (needs AVX512-BF16).
    Bf16,
}

/// A linear layer's weight on the CPU path: f32 `[in, out]` row-major, int8 or bf16.
enum Weight {
    F32(Vec<f32>),
    Int8(Int8Weights),
    Bf16(Bf16Weights),
}

impl Weight {
    /// `out = x [rows, k] @ W + bias (+ residual)`.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        x: &[f32],
        rows: usize,
        k: usize,
        bias: &[f32],
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
        par: bool,
    ) {
        out.resize(rows * bias.len(), 0.0);
        match self {
            Weight::F32(w) => linear_into(x, rows, k, (w, bias), residual, out, par),
            Weight::Int8(w) => w.linear_into(x, rows, bias, residual, out, par),
            Weight::Bf16(w) => w.linear_into(x, rows, bias, residual, out, par),
        }
    }

    fn reduce(&mut self, to: Products, k: usize, n: usize) {
        if let Weight::F32(w) = self {
            *self = match to {
                Products::Int8 => Weight::Int8(Int8Weights::from_in_out(w, k, n)),
                Products::Bf16 => Weight::Bf16(Bf16Weights::from_in_out(w, k, n)),
            };
        }
    }
}

/// A post-LN layer's weights in plain buffers; matrices stored `[in, out]` row-major.
pub struct CpuLayer {
    hidden: usize,
    inter: usize,
    heads: usize,
    /// `[h, 3h]`: query, key and value projections side by side.
    qkv_w: Weight,
    qkv_b: Vec<f32>,
    out_w: Weight,
    out_b: Vec<f32>,
    ln1: (Vec<f32>, Vec<f32>, f32),
    ff_in_w: Weight,
    ff_in_b: Vec<f32>,
    act: Activation,
    ff_out_w: Weight,
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
            qkv_w: Weight::F32(vec_of(&qkv_w)?),
            qkv_b,
            out_w: Weight::F32(vec_of(l.attn_out.weight_t())?),
            out_b: bias_of(&l.attn_out, hidden)?,
            ln1: norm_parts(&l.attn_norm)?,
            ff_in_w: Weight::F32(vec_of(l.ff_in.weight_t())?),
            ff_in_b: bias_of(&l.ff_in, inter)?,
            act: l.act,
            ff_out_w: Weight::F32(vec_of(l.ff_out.weight_t())?),
            ff_out_b: bias_of(&l.ff_out, hidden)?,
            ln2: norm_parts(&l.out_norm)?,
        })
    }

    fn reduce(&mut self, to: Products) {
        let (h, i) = (self.hidden, self.inter);
        self.qkv_w.reduce(to, h, 3 * h);
        self.out_w.reduce(to, h, h);
        self.ff_in_w.reduce(to, h, i);
        self.ff_out_w.reduce(to, i, h);
    }

    /// One layer over `x` (`[b * s, h]`, updated in place); `mask` is `[b, s]` 0/1.
    fn forward(&self, x: &mut Vec<f32>, b: usize, s: usize, mask: &[f32], scratch: &mut Scratch) {
        let (h, rows) = (self.hidden, b * s);
        let par = !in_worker() && rayon::current_num_threads() > 1;
        let Scratch { qkv, ctx, y, ff, z } = scratch;
        self.qkv_w.linear(x, rows, h, &self.qkv_b, None, qkv, par);
        self.attend(qkv, b, s, mask, par, ctx);
        // attn_out(ctx) + x, then LayerNorm: x is the matmul's starting value.
        self.out_w
            .linear(ctx, rows, h, &self.out_b, Some(x), y, par);
        layer_norm_rows(y, h, &self.ln1, par);
        self.ff_in_w
            .linear(y, rows, h, &self.ff_in_b, None, ff, par);
        activate_par(ff, self.act, par);
        // ff_out(ff) + y, then LayerNorm, back into x.
        self.ff_out_w
            .linear(ff, rows, self.inter, &self.ff_out_b, Some(y), z, par);
        std::mem::swap(x, z);
        layer_norm_rows(x, h, &self.ln2, par);
    }

    /// Softmax attention per (sequence, head) over `qkv` `[b * s, 3h]` into `ctx` `[b * s, h]`.
    #[allow(clippy::too_many_arguments)]
    fn attend(&self, qkv: &[f32], b: usize, s: usize, mask: &[f32], par: bool, ctx: &mut Vec<f32>) {
        let d = self.hidden / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        if !matches!(self.qkv_w, Weight::F32(_)) && bf16_attention(s) {
            attend_sequences_bf16_into(qkv, b, s, self.heads, d, scale, mask, par, ctx)
        } else {
            attend_sequences_into(qkv, b, s, self.heads, d, scale, None, mask, par, ctx)
        }
    }
}

/// Whether the reduced-precision layers (int8 or bf16 products) run attention over `s` tokens
/// in bf16 too ([`attend_sequences_bf16_into`]): where the CPU has AVX512-BF16, from 96 tokens
/// (`examples/attn_bench`, Zen 5: 1.3-1.5x the f32 kernel at 96 tokens, 1.8-2x from 256; at 64
/// tokens 0.8-1.2x, where packing each head's keys and values costs as much as it saves),
/// unless `FERROFORMERS_F32_ATTENTION=1`.
fn bf16_attention(s: usize) -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    s >= 96
        && bf16::available()
        && !*OFF.get_or_init(|| std::env::var("FERROFORMERS_F32_ATTENTION").is_ok_and(|v| v == "1"))
}

/// Buffers reused from layer to layer (and, per thread, from batch to batch): the fused
/// Q/K/V output, the attention's output, the attention block's output, the feed-forward's
/// inner activations and its output (swapped with the layer's input).
#[derive(Default)]
struct Scratch {
    qkv: Vec<f32>,
    ctx: Vec<f32>,
    y: Vec<f32>,
    ff: Vec<f32>,
    z: Vec<f32>,
}

impl Scratch {
    fn bytes(&self) -> usize {
        let v = [&self.qkv, &self.ctx, &self.y, &self.ff, &self.z];
        v.iter().map(|b| b.capacity() * 4).sum()
    }
}

thread_local! {
    /// Taken out while a forward runs, so a nested one just starts with empty buffers.
    static SCRATCH: std::cell::Cell<Scratch> = const {
        std::cell::Cell::new(Scratch {
            qkv: Vec::new(),
            ctx: Vec::new(),
            y: Vec::new(),
            ff: Vec::new(),
            z: Vec::new(),
        })
    };
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let b = PostLnStack::new(layers(act).into_iter().map(Ok), &dev, DType::F32, None)
                .unwrap()
                .forward(&xs, &mask)
                .unwrap();
            let diff = crate::models::max_abs_diff(&a, &b);
            assert!(diff < 1e-5, "{act:?}: {diff}");
            // int8 and bf16: close to f32 (LayerNorm outputs of size ~1), not equal.
            let mut to = vec![Products::Int8];
            if crate::kernels::cpu::bf16::available() {
                to.push(Products::Bf16);
            }
            for to in to {
                let q =
                    PostLnStack::new(layers(act).into_iter().map(Ok), &dev, DType::F32, Some(to))
                        .unwrap();
                let c = q.forward(&xs, &mask).unwrap();
                let diff = crate::models::max_abs_diff(&a, &c);
                assert!(diff < 0.1 && diff > 0.0, "{act:?} {to:?}: {diff}");
            }
        }
        // candle's path has no int8 kernels: a clear error.
        let candle = layers(Activation::Gelu).into_iter().map(Ok);
        let err = PostLnStack::new(candle, &dev, DType::F16, Some(Products::Int8));
        let err = err.err().expect("an error").to_string();
        assert!(err.contains("f32"), "{err}");
    }
}
