//! Blocks shared by two or more architectures: activations, masks, multi-head attention.

use candle_core::{DType, Module, Result, Tensor, D};
use serde::Deserialize;

/// `config.hidden_act` / `activation`, with HF's names.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum Activation {
    /// Exact (erf) GELU, HF's `gelu`.
    #[default]
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    #[serde(rename = "relu")]
    Relu,
    #[serde(alias = "silu", alias = "swish")]
    Silu,
    #[serde(rename = "tanh")]
    Tanh,
}

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => xs.gelu_erf(),
            Activation::GeluNew => xs.gelu(),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
            Activation::Tanh => xs.tanh(),
        }
    }
}

/// `[b, s]` 0/1 mask -> additive bias `[b, 1, 1, s]`: 0 where attended, dtype-min where padded.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let mask = mask.to_dtype(dtype)?;
    let min = match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN as f64,
    };
    ((mask.ones_like()? - mask)? * min)?.reshape((b, 1, 1, s))
}

/// `[b, s, h*d]` -> `[b, h, s, d]`.
pub fn split_heads(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, s, hd) = xs.dims3()?;
    xs.reshape((b, s, num_heads, hd / num_heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Scaled dot-product attention over already projected `q`, `k`, `v` (`[b, s, h*d]`), with an
/// additive `bias` broadcastable to `[b, h, s, s]`. Returns `[b, s, h*d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    num_heads: usize,
) -> Result<Tensor> {
    let (b, s, hd) = q.dims3()?;
    let scale = 1.0 / ((hd / num_heads) as f64).sqrt();
    let q = (split_heads(q, num_heads)? * scale)?;
    let k = split_heads(k, num_heads)?;
    let v = split_heads(v, num_heads)?;
    let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, hd))
}

/// Row 0 of each sequence (`[b, s, h]` -> `[b, h]`): the `[CLS]`/`<s>` token.
pub fn first_token(xs: &Tensor) -> Result<Tensor> {
    xs.narrow(1, 0, 1)?.squeeze(1)
}

/// Mean over the last dim, kept (helper for pooling).
pub fn sum_keepdim_last(xs: &Tensor) -> Result<Tensor> {
    xs.sum_keepdim(D::Minus1)
}
