//! BLOOM (BigScience 2022), as `modeling_bloom.py`: token embeddings followed by a LayerNorm,
//! no position embeddings but ALiBi (Press et al. 2021: a per-head linear bias on the key's
//! position added to the attention scores), pre-LN blocks with a fused q/k/v laid out per head
//! (`[n_head, 3, head_dim]`), tanh-GELU MLP, LM head tied to the token embeddings unless the
//! config unties it. `pretraining_tp` / `slow_but_exact` only split HF's products into slices
//! (the same sums in another order), so they are ignored.
//!
//! Which path runs where: candle ops everywhere. The ALiBi term differs per head, so the
//! attention bias is `[b, heads, s, t]` and `layers::sdpa` takes its candle path for every
//! query count (its few-query CPU loop takes one bias for all heads).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::causal_lm::{last_position, CausalLm, KvCache};
use super::layers::{linear, sdpa, Linear};

fn default_eps() -> f64 {
    1e-5
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
pub struct BloomConfig {
    pub vocab_size: usize,
    /// Older checkpoints (bigscience/bloom) spell it `n_embed`.
    #[serde(alias = "n_embed")]
    pub hidden_size: usize,
    #[serde(alias = "num_hidden_layers")]
    pub n_layer: usize,
    #[serde(alias = "num_attention_heads")]
    pub n_head: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default)]
    pub apply_residual_connection_post_layernorm: bool,
    #[serde(default = "yes")]
    pub tie_word_embeddings: bool,
}

impl BloomConfig {
    /// What HF's constructor would refuse: `None` when the config can be built.
    pub fn problem(&self) -> Option<String> {
        if self.n_head == 0 || !self.hidden_size.is_multiple_of(self.n_head) {
            return Some(format!(
                "`hidden_size` ({}) must be a multiple of `n_head` ({})",
                self.hidden_size, self.n_head
            ));
        }
        None
    }
}

/// ALiBi's slope per head, as `build_alibi_tensor`: a geometric sequence from
/// `2^(-8/n)` for the largest power of two `n <= heads`; the heads beyond it take every other
/// slope of the sequence for `2n`. Computed as HF does (the base in f32, its powers).
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    if heads == 0 {
        return Vec::new();
    }
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = |n: usize| (2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))))) as f32;
    let b = base(closest) as f64;
    let mut slopes: Vec<f32> = (1..=closest).map(|p| b.powi(p as i32) as f32).collect();
    if closest != heads {
        let extra = base(2 * closest) as f64;
        let remaining = closest.min(heads - closest);
        slopes.extend((0..remaining).map(|i| extra.powi(2 * i as i32 + 1) as f32));
    }
    slopes
}

/// bloom's `bloom_gelu_forward`: the tanh approximation with its own rounded constant.
fn bloom_gelu(xs: &Tensor) -> Result<Tensor> {
    let inner = ((xs.sqr()? * 0.044715)? + 1.0)?;
    let t = ((xs * 0.79788456)? * inner)?.tanh()?;
    (xs * 0.5)? * (t + 1.0)?
}

struct Block {
    input_layernorm: LayerNorm,
    query_key_value: Linear,
    dense: Linear,
    post_attention_layernorm: LayerNorm,
    dense_h_to_4h: Linear,
    dense_4h_to_h: Linear,
    n_head: usize,
    residual_post_ln: bool,
}

impl Block {
    fn load(cfg: &BloomConfig, vb: VarBuilder) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_epsilon);
        let att = vb.pp("self_attention");
        let mlp = vb.pp("mlp");
        Ok(Self {
            input_layernorm: layer_norm(h, eps, vb.pp("input_layernorm"))?,
            query_key_value: linear(h, 3 * h, att.pp("query_key_value"))?,
            dense: linear(h, h, att.pp("dense"))?,
            post_attention_layernorm: layer_norm(h, eps, vb.pp("post_attention_layernorm"))?,
            dense_h_to_4h: linear(h, 4 * h, mlp.pp("dense_h_to_4h"))?,
            dense_4h_to_h: linear(4 * h, h, mlp.pp("dense_4h_to_h"))?,
            n_head: cfg.n_head,
            residual_post_ln: cfg.apply_residual_connection_post_layernorm,
        })
    }

    /// `bias`: `[b, heads, s, t]`, the causal/padding bias plus ALiBi.
    fn forward(
        &self,
        xs: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s, h) = xs.dims3()?;
        let d = h / self.n_head;
        let ln = self.input_layernorm.forward(xs)?;
        let residual = if self.residual_post_ln { &ln } else { xs };
        // Per head: query, key, value side by side.
        let qkv = self
            .query_key_value
            .forward(&ln)?
            .reshape((b, s, self.n_head, 3, d))?;
        let part = |i: usize| -> Result<Tensor> {
            qkv.narrow(3, i, 1)?
                .squeeze(3)?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let (k, v) = cache.append(layer, &k, &v)?;
        let ctx = sdpa(&q, &k, &v, bias, 1.0 / (d as f64).sqrt())?;
        let attn = (self.dense.forward(&ctx)? + residual)?;
        let ln = self.post_attention_layernorm.forward(&attn)?;
        let residual = if self.residual_post_ln { &ln } else { &attn };
        let ff = self
            .dense_4h_to_h
            .forward(&bloom_gelu(&self.dense_h_to_4h.forward(&ln)?)?)?;
        ff + residual
    }
}

pub struct Bloom {
    word_embeddings: Embedding,
    word_embeddings_layernorm: LayerNorm,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: Linear,
    /// `[1, heads, 1, 1]`
    slopes: Tensor,
    device: Device,
}

impl Bloom {
    /// `vb` at the checkpoint's root: the base model sits under `transformer.` or at the root,
    /// an untied `lm_head.weight` at the root.
    pub fn load(cfg: &BloomConfig, vb: VarBuilder, transformer_prefix: bool) -> Result<Self> {
        if let Some(p) = cfg.problem() {
            candle_core::bail!("config: {p}");
        }
        let h = cfg.hidden_size;
        let base = if transformer_prefix {
            vb.pp("transformer")
        } else {
            vb.clone()
        };
        let wte = base
            .pp("word_embeddings")
            .get((cfg.vocab_size, h), "weight")?;
        let blocks = (0..cfg.n_layer)
            .map(|i| Block::load(cfg, base.pp("h").pp(i)))
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(wte.clone(), None)?
        } else {
            Linear::new(vb.pp("lm_head").get((cfg.vocab_size, h), "weight")?, None)?
        };
        let slopes = alibi_slopes(cfg.n_head);
        Ok(Self {
            word_embeddings: Embedding::new(wte, h),
            word_embeddings_layernorm: layer_norm(
                h,
                cfg.layer_norm_epsilon,
                base.pp("word_embeddings_layernorm"),
            )?,
            blocks,
            ln_f: layer_norm(h, cfg.layer_norm_epsilon, base.pp("ln_f"))?,
            lm_head,
            slopes: Tensor::from_vec(slopes, (1, cfg.n_head, 1, 1), vb.device())?,
            device: vb.device().clone(),
        })
    }

    /// The attention bias with ALiBi: `bias` `[b, 1, s, t]` plus `slope * position` of each
    /// key, `[b, heads, s, t]` (f32). A key's position is HF's `cumsum(attention_mask) - 1`
    /// (0 for padding, which the bias hides anyway). The mask is read off the bias's last
    /// query row, which sees every key that is not padding.
    fn alibi_bias(&self, bias: &Tensor) -> Result<Tensor> {
        let bias = bias.to_dtype(DType::F32)?;
        let (bb, _, s, t) = bias.dims4()?;
        if s == 0 {
            return Ok(bias);
        }
        let last: Vec<f32> = bias.narrow(2, s - 1, 1)?.flatten_all()?.to_vec1()?;
        let mut pos = Vec::with_capacity(bb * t);
        for row in last.chunks_exact(t) {
            let mut seen = 0u32;
            for &x in row {
                // Visible keys have bias 0, hidden ones a huge negative value.
                if x > -1.0 {
                    pos.push(seen as f32);
                    seen += 1;
                } else {
                    pos.push(0.0);
                }
            }
        }
        let pos = Tensor::from_vec(pos, (bb, 1, 1, t), bias.device())?;
        bias.broadcast_add(&pos.broadcast_mul(&self.slopes)?)
    }
}

impl CausalLm for Bloom {
    fn forward(
        &self,
        input_ids: &Tensor,
        _position_ids: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        let mut xs = self
            .word_embeddings_layernorm
            .forward(&self.word_embeddings.forward(input_ids)?)?;
        let bias = self.alibi_bias(bias)?;
        for (i, block) in self.blocks.iter().enumerate() {
            xs = block.forward(&xs, &bias, cache, i)?;
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

    /// ALiBi has no trained positions: longer inputs degrade, nothing fails.
    fn max_positions(&self) -> Option<usize> {
        None
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::causal_lm::causal_bias;

    /// transformers 4.57.1 `build_alibi_tensor(torch.ones(1, 2), n, torch.float32)[:, 0, 1]`.
    #[test]
    fn slopes_match_hf() {
        let cases: &[(usize, &[f32])] = &[
            (1, &[0.00390625]),
            (4, &[0.25, 0.0625, 0.015625, 0.00390625]),
            (6, &[0.25, 0.0625, 0.015625, 0.00390625, 0.5, 0.125]),
            (
                12,
                &[
                    0.5, 0.25, 0.125, 0.0625, 0.03125, 0.015625, 0.0078125, 0.00390625, 0.70710677,
                    0.35355338, 0.17677668, 0.08838834,
                ],
            ),
            (
                20,
                &[
                    0.70710677,
                    0.49999997,
                    0.35355338,
                    0.24999999,
                    0.17677668,
                    0.12499999,
                    0.08838834,
                    0.06249999,
                    0.044194166,
                    0.031249994,
                    0.022097083,
                    0.015624997,
                    0.011048541,
                    0.007812498,
                    0.0055242702,
                    0.003906249,
                    0.8408964,
                    0.5946036,
                    0.42044824,
                    0.2973018,
                ],
            ),
        ];
        for (n, want) in cases {
            let got = alibi_slopes(*n);
            assert_eq!(got.len(), want.len(), "{n} heads");
            for (g, w) in got.iter().zip(want.iter()) {
                assert!((g - w).abs() <= 1e-7 * w, "{n} heads: {got:?} vs {want:?}");
            }
        }
    }

    /// Left padding: positions count real tokens only, padding gets 0 (and stays hidden).
    #[test]
    fn alibi_positions_skip_padding() {
        let dev = Device::Cpu;
        let cfg = BloomConfig {
            vocab_size: 4,
            hidden_size: 4,
            n_layer: 0,
            n_head: 2,
            layer_norm_epsilon: 1e-5,
            apply_residual_connection_post_layernorm: false,
            tie_word_embeddings: true,
        };
        let vb = VarBuilder::zeros(DType::F32, &dev);
        let m = Bloom::load(&cfg, vb, false).unwrap();
        // One new token after 3 cached, the first of them padding.
        let bias = causal_bias(&[vec![0, 1, 1, 1]], 1, &dev).unwrap();
        let got: Vec<f32> = m
            .alibi_bias(&bias)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let slopes = alibi_slopes(2);
        assert_eq!(got[0], f32::MIN);
        assert_eq!(&got[1..4], &[0.0, slopes[0], 2.0 * slopes[0]]);
        assert_eq!(&got[5..8], &[0.0, slopes[1], 2.0 * slopes[1]]);
    }

    #[test]
    fn bad_head_count_is_an_error() {
        let cfg: BloomConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "n_embed": 10, "n_layer": 1, "n_head": 3
        }))
        .unwrap();
        assert!(cfg.problem().unwrap().contains("n_head"));
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        assert!(Bloom::load(&cfg, vb, false).is_err());
        // Missing weights: an error naming the tensor.
        let cfg = BloomConfig { n_head: 2, ..cfg };
        let empty = std::collections::HashMap::new();
        let vb = VarBuilder::from_tensors(empty, DType::F32, &Device::Cpu);
        let e = Bloom::load(&cfg, vb, true).err().unwrap().to_string();
        assert!(e.contains("word_embeddings"), "{e}");
    }

    /// Checkpoints saved from `BloomModel` (bigscience's) name the base model's tensors without
    /// `transformer.`: the same weights under those names give the same logits.
    #[test]
    fn weights_without_the_transformer_prefix_load() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/decoders/models/bloom-6h");
        let dev = Device::Cpu;
        let tensors = candle_core::safetensors::load(dir.join("model.safetensors"), &dev).unwrap();
        let cfg: BloomConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let stripped = tensors
            .iter()
            .map(|(k, v)| (k.trim_start_matches("transformer.").to_string(), v.clone()))
            .collect();
        let run = |tensors, prefix| {
            let w = crate::weights::Weights::from_tensors(tensors, dir.clone());
            let m = Bloom::load(&cfg, w.into_var_builder(DType::F32, &dev), prefix).unwrap();
            let ids = Tensor::new(&[[5u32, 17, 42]], &dev).unwrap();
            let bias = causal_bias(&[vec![1, 1, 1]], 3, &dev).unwrap();
            let mut cache = KvCache::new(m.num_layers());
            m.forward(&ids, &ids, &bias, &mut cache, false)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        };
        assert_eq!(run(tensors, true), run(stripped, false));
    }
}
