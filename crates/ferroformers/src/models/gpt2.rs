//! GPT-2 (Radford et al. 2019), as `modeling_gpt2.py`: learned position embeddings, pre-LN
//! blocks, fused q/k/v, tanh-GELU MLP, LM head tied to the token embeddings. Also distilgpt2
//! and DialoGPT checkpoints. Its `Conv1D` layers store weights as `[in, out]`: exactly the
//! contiguous right-hand side our `Linear` keeps, so they are used as stored.
//!
//! Which path runs where: candle ops everywhere; on CPU f32, attention for a few query rows
//! (decoding steps) is `layers::sdpa`'s plain loop (`kernels::cpu::attention`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::causal_lm::{last_position, CausalLm, KvCache};
use super::layers::sdpa;
use super::layers::{Activation, Linear};

fn default_eps() -> f64 {
    1e-5
}
fn default_act() -> Activation {
    Activation::GeluNew
}

#[derive(Debug, Clone, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    #[serde(default)]
    pub n_inner: Option<usize>,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_act")]
    pub activation_function: Activation,
    #[serde(default = "yes")]
    pub scale_attn_weights: bool,
}

fn yes() -> bool {
    true
}

/// `Conv1D(out, in)`: weight `[in, out]`, bias `[out]`.
fn conv1d(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let w = vb.get((in_dim, out_dim), "weight")?;
    let b = vb.get(out_dim, "bias")?;
    // `Linear::new` takes `[out, in]` and keeps its transpose: hand it the transposed view of
    // the stored `[in, out]` matrix, which it turns back into that (already contiguous) matrix.
    Linear::new(w.t()?, Some(b))
}

struct Block {
    ln_1: LayerNorm,
    c_attn: Linear,
    attn_proj: Linear,
    ln_2: LayerNorm,
    c_fc: Linear,
    act: Activation,
    mlp_proj: Linear,
    n_head: usize,
    scale: f64,
}

impl Block {
    fn load(cfg: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.n_embd;
        let inner = cfg.n_inner.unwrap_or(4 * h);
        let head_dim = h / cfg.n_head;
        Ok(Self {
            ln_1: layer_norm(h, cfg.layer_norm_epsilon, vb.pp("ln_1"))?,
            c_attn: conv1d(h, 3 * h, vb.pp("attn").pp("c_attn"))?,
            attn_proj: conv1d(h, h, vb.pp("attn").pp("c_proj"))?,
            ln_2: layer_norm(h, cfg.layer_norm_epsilon, vb.pp("ln_2"))?,
            c_fc: conv1d(h, inner, vb.pp("mlp").pp("c_fc"))?,
            act: cfg.activation_function,
            mlp_proj: conv1d(inner, h, vb.pp("mlp").pp("c_proj"))?,
            n_head: cfg.n_head,
            scale: if cfg.scale_attn_weights {
                1.0 / (head_dim as f64).sqrt()
            } else {
                1.0
            },
        })
    }

    fn forward(
        &self,
        xs: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let d = h / self.n_head;
        let qkv = self.c_attn.forward(&self.ln_1.forward(xs)?)?;
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(2, i * h, h)?
                .reshape((b, s, self.n_head, d))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let (k, v) = cache.append(layer, &k, &v)?;
        let ctx = sdpa(&q, &k, &v, bias, self.scale)?;
        let xs = (xs + self.attn_proj.forward(&ctx)?)?;
        let ff = self.mlp_proj.forward(
            &self
                .act
                .forward(&self.c_fc.forward(&self.ln_2.forward(&xs)?)?)?,
        )?;
        xs + ff
    }
}

pub struct Gpt2 {
    wte: Embedding,
    wpe: Embedding,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    n_positions: usize,
    device: Device,
}

impl Gpt2 {
    /// `vb` at the base model (`transformer.` already applied when the checkpoint has it).
    pub fn load(cfg: &Gpt2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.n_embd;
        let wte = vb.pp("wte").get((cfg.vocab_size, h), "weight")?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::load(cfg, vb.pp("h").pp(i)))
            .collect::<Result<_>>()?;
        Ok(Self {
            wte: Embedding::new(wte.clone(), h),
            wpe: candle_nn::embedding(cfg.n_positions, h, vb.pp("wpe"))?,
            blocks,
            ln_f: layer_norm(h, cfg.layer_norm_epsilon, vb.pp("ln_f"))?,
            lm_head: Linear::new(wte, None)?,
            n_positions: cfg.n_positions,
            device: vb.device().clone(),
        })
    }
}

impl CausalLm for Gpt2 {
    fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        let mut xs = (self.wte.forward(input_ids)? + self.wpe.forward(position_ids)?)?;
        for (i, block) in self.blocks.iter().enumerate() {
            xs = block.forward(&xs, bias, cache, i)?;
        }
        if last_only {
            xs = last_position(&xs)?;
        }
        self.lm_head
            .forward(&self.ln_f.forward(&xs)?)?
            .to_dtype(DType::F32)
    }

    fn num_layers(&self) -> usize {
        self.blocks.len()
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.n_positions)
    }

    fn hard_position_limit(&self) -> bool {
        true
    }

    fn device(&self) -> &Device {
        &self.device
    }
}
