//! T5 (Raffel et al. 2019), as `modeling_t5.py`: a pre-norm encoder-decoder with RMS layer
//! norms (no bias, no mean), no attention scaling, and relative position buckets computed by the
//! first layer of each stack and shared by all its layers. v1.0 uses a ReLU feed-forward and ties
//! the LM head to the embeddings (the decoder output is then scaled by `d_model**-0.5`); v1.1 and
//! Flan use a gated-GELU feed-forward and a separate LM head.
//!
//! Which path runs where: f32 on CPU runs `t5/cpu.rs` (plain buffers through `kernels::cpu`);
//! GPU and other dtypes run the candle layers here. A test at the end checks that they agree.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{embedding, Embedding, VarBuilder};
use serde::Deserialize;

pub mod cpu;

use super::bart::DecoderCache;
use super::causal_lm::KvCache;
use super::layers::{Activation, Linear};
use super::seq2seq::{causal_bias, cross_bias, Seq2SeqCache, Seq2SeqLm};

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}
fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    #[serde(default)]
    pub num_decoder_layers: Option<usize>,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub n_positions: Option<usize>,
}

impl crate::config::CheckedConfig for T5Config {
    /// T5's heads need not split `d_model` (its projections are `num_heads * d_kv` wide), but
    /// neither may be 0.
    fn check(&self) -> std::result::Result<(), String> {
        for (name, v) in [("num_heads", self.num_heads), ("d_kv", self.d_kv)] {
            if v == 0 {
                return Err(format!("{name} is 0; it must be at least 1"));
            }
        }
        Ok(())
    }
}

impl T5Config {
    /// `(gated, activation)` from `feed_forward_proj` ("relu", "gated-gelu", "gated-silu", ...),
    /// as `T5Config.__init__` parses it ("gated-gelu" means the tanh GELU).
    fn feed_forward(&self) -> Result<(bool, Activation)> {
        let parts: Vec<&str> = self.feed_forward_proj.split('-').collect();
        let (gated, act) = match parts.as_slice() {
            [act] => (false, *act),
            ["gated", act] => (true, *act),
            _ => candle_core::bail!(
                "`feed_forward_proj` {:?} is not a valid activation (`gated-{{ACT}}` or `{{ACT}}`)",
                self.feed_forward_proj
            ),
        };
        let act = if self.feed_forward_proj == "gated-gelu" {
            "gelu_new"
        } else {
            act
        };
        let act: Activation = serde_json::from_value(serde_json::Value::String(act.into()))
            .map_err(|e| candle_core::Error::Msg(format!("feed_forward_proj: {e}")))?;
        Ok((gated, act))
    }
}

/// `T5LayerNorm`: scale only, no mean subtraction, variance in f32.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(d: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(d, "weight")?,
            eps,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

fn no_bias(i: usize, o: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((o, i), "weight")?, None)
}

/// `_relative_position_bucket` (integer arithmetic with torch's f32 log for large distances).
pub(crate) fn relative_bucket(
    rel: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut n = num_buckets as i64;
    let mut bucket = 0i64;
    let rel = if bidirectional {
        n /= 2;
        if rel > 0 {
            bucket += n;
        }
        rel.abs()
    } else {
        (-rel).max(0)
    };
    let max_exact = n / 2;
    if rel < max_exact {
        bucket += rel;
    } else {
        let ratio = (rel as f32 / max_exact as f32).ln()
            / (max_distance as f64 / max_exact as f64).ln() as f32
            * (n - max_exact) as f32;
        let large = (max_exact + ratio as i64).min(n - 1);
        bucket += large;
    }
    bucket as usize
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
    /// Only in the first layer of each stack.
    relative_bias: Option<Embedding>,
    num_buckets: usize,
    max_distance: usize,
}

impl Attention {
    fn load(cfg: &T5Config, has_bias: bool, vb: VarBuilder) -> Result<Self> {
        let inner = cfg.num_heads * cfg.d_kv;
        let d = cfg.d_model;
        Ok(Self {
            q: no_bias(d, inner, vb.pp("q"))?,
            k: no_bias(d, inner, vb.pp("k"))?,
            v: no_bias(d, inner, vb.pp("v"))?,
            o: no_bias(inner, d, vb.pp("o"))?,
            heads: cfg.num_heads,
            d_kv: cfg.d_kv,
            relative_bias: if has_bias {
                Some(embedding(
                    cfg.relative_attention_num_buckets,
                    cfg.num_heads,
                    vb.pp("relative_attention_bias"),
                )?)
            } else {
                None
            },
            num_buckets: cfg.relative_attention_num_buckets,
            max_distance: cfg.relative_attention_max_distance,
        })
    }

    fn split(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        xs.reshape((b, s, self.heads, self.d_kv))?
            .transpose(1, 2)?
            .contiguous()
    }

    fn kv(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.split(&self.k.forward(xs)?)?,
            self.split(&self.v.forward(xs)?)?,
        ))
    }

    /// `compute_bias`: `[1, heads, q_len, k_len]` for queries at positions `past..past+q_len`.
    fn position_bias(
        &self,
        q_len: usize,
        k_len: usize,
        past: usize,
        bidirectional: bool,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor> {
        let Some(emb) = &self.relative_bias else {
            candle_core::bail!("T5: the first layer has no relative_attention_bias")
        };
        let buckets: Vec<u32> = (0..q_len)
            .flat_map(|i| {
                (0..k_len).map(move |j| {
                    let rel = j as i64 - (past + i) as i64;
                    relative_bucket(rel, bidirectional, self.num_buckets, self.max_distance) as u32
                })
            })
            .collect();
        let idx = Tensor::from_vec(buckets, (q_len, k_len), device)?;
        emb.forward(&idx)? // [q, k, h]
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(dtype)?
            .contiguous()
    }

    /// Attention from `xs` over `k`, `v` (no scaling) with additive `bias` `[b|1, h|1, q, k]`.
    fn attend(&self, xs: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let q = self.split(&self.q.forward(xs)?)?;
        let scores = q
            .matmul(&k.transpose(2, 3)?.contiguous()?)?
            .broadcast_add(bias)?;
        let dtype = scores.dtype();
        let probs =
            candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(dtype)?;
        let ctx = probs.matmul(v)?.transpose(1, 2)?.contiguous()?.reshape((
            b,
            s,
            self.heads * self.d_kv,
        ))?;
        self.o.forward(&ctx)
    }
}

struct FeedForward {
    wi: Linear,
    /// Gated variants: `act(wi_0 x) * wi_1 x`.
    wi_1: Option<Linear>,
    wo: Linear,
    act: Activation,
}

impl FeedForward {
    fn load(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let (d, f) = (cfg.d_model, cfg.d_ff);
        Ok(if gated {
            Self {
                wi: no_bias(d, f, vb.pp("wi_0"))?,
                wi_1: Some(no_bias(d, f, vb.pp("wi_1"))?),
                wo: no_bias(f, d, vb.pp("wo"))?,
                act,
            }
        } else {
            Self {
                wi: no_bias(d, f, vb.pp("wi"))?,
                wi_1: None,
                wo: no_bias(f, d, vb.pp("wo"))?,
                act,
            }
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let mut h = self.act.forward(&self.wi.forward(xs)?)?;
        if let Some(w) = &self.wi_1 {
            h = (h * w.forward(xs)?)?;
        }
        self.wo.forward(&h)
    }
}

struct EncoderBlock {
    attn: Attention,
    attn_norm: RmsNorm,
    ff: FeedForward,
    ff_norm: RmsNorm,
}

struct DecoderBlock {
    self_attn: Attention,
    self_norm: RmsNorm,
    cross_attn: Attention,
    cross_norm: RmsNorm,
    ff: FeedForward,
    ff_norm: RmsNorm,
}

/// The candle layers (GPU, f16/bf16).
struct CandleT5 {
    shared: Embedding,
    encoder: Vec<EncoderBlock>,
    encoder_norm: RmsNorm,
    decoder: Vec<DecoderBlock>,
    decoder_norm: RmsNorm,
    lm_head: Linear,
    /// `d_model**-0.5` with tied embeddings, else 1.
    output_scale: f64,
}

enum Layers {
    Candle(Box<CandleT5>),
    /// f32 on CPU: plain buffers (`t5/cpu.rs`).
    Cpu(Box<cpu::T5Cpu>),
}

pub struct T5ForConditionalGeneration {
    layers: Layers,
    device: Device,
    pub config: T5Config,
}

impl T5ForConditionalGeneration {
    pub fn load(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let device = vb.device().clone();
        let layers = if device.is_cpu() && vb.dtype() == DType::F32 {
            Layers::Cpu(Box::new(cpu::T5Cpu::load(cfg, &vb)?))
        } else {
            Layers::Candle(Box::new(CandleT5::load(cfg, vb)?))
        };
        Ok(Self {
            layers,
            device,
            config: cfg.clone(),
        })
    }

    /// The candle layers even on CPU (to check the CPU path against them).
    #[cfg(test)]
    fn load_candle(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            device: vb.device().clone(),
            layers: Layers::Candle(Box::new(CandleT5::load(cfg, vb)?)),
            config: cfg.clone(),
        })
    }
}

impl CandleT5 {
    fn load(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let eps = cfg.layer_norm_epsilon;
        let shared = embedding(cfg.vocab_size, d, vb.pp("shared"))?;
        let enc = vb.pp("encoder");
        let dec = vb.pp("decoder");
        let encoder = (0..cfg.num_layers)
            .map(|i| -> Result<EncoderBlock> {
                let b = enc.pp("block").pp(i).pp("layer");
                Ok(EncoderBlock {
                    attn: Attention::load(cfg, i == 0, b.pp(0).pp("SelfAttention"))?,
                    attn_norm: RmsNorm::load(d, eps, b.pp(0).pp("layer_norm"))?,
                    ff: FeedForward::load(cfg, b.pp(1).pp("DenseReluDense"))?,
                    ff_norm: RmsNorm::load(d, eps, b.pp(1).pp("layer_norm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let decoder = (0..cfg.num_decoder_layers.unwrap_or(cfg.num_layers))
            .map(|i| -> Result<DecoderBlock> {
                let b = dec.pp("block").pp(i).pp("layer");
                Ok(DecoderBlock {
                    self_attn: Attention::load(cfg, i == 0, b.pp(0).pp("SelfAttention"))?,
                    self_norm: RmsNorm::load(d, eps, b.pp(0).pp("layer_norm"))?,
                    cross_attn: Attention::load(cfg, false, b.pp(1).pp("EncDecAttention"))?,
                    cross_norm: RmsNorm::load(d, eps, b.pp(1).pp("layer_norm"))?,
                    ff: FeedForward::load(cfg, b.pp(2).pp("DenseReluDense"))?,
                    ff_norm: RmsNorm::load(d, eps, b.pp(2).pp("layer_norm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(shared.embeddings().clone(), None)?
        } else {
            no_bias(d, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            encoder_norm: RmsNorm::load(d, eps, enc.pp("final_layer_norm"))?,
            decoder_norm: RmsNorm::load(d, eps, dec.pp("final_layer_norm"))?,
            shared,
            encoder,
            decoder,
            lm_head,
            output_scale: if cfg.tie_word_embeddings {
                (d as f64).powf(-0.5)
            } else {
                1.0
            },
        })
    }
}

impl CandleT5 {
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let s = ids.dim(1)?;
        let mut xs = self.shared.forward(ids)?;
        let dtype = xs.dtype();
        let Some(first) = self.encoder.first() else {
            return self.encoder_norm.forward(&xs);
        };
        let bias = first
            .attn
            .position_bias(s, s, 0, true, ids.device(), dtype)?
            .broadcast_add(&cross_bias(mask, dtype)?)?;
        for b in &self.encoder {
            let h = b.attn_norm.forward(&xs)?;
            let (k, v) = b.attn.kv(&h)?;
            xs = (xs + b.attn.attend(&h, &k, &v, &bias)?)?;
            xs = (&xs + b.ff.forward(&b.ff_norm.forward(&xs)?)?)?;
        }
        self.encoder_norm.forward(&xs)
    }

    fn new_cache(&self, encoder_hidden: &Tensor, mask: &Tensor) -> Result<Seq2SeqCache> {
        let cross_kv = self
            .decoder
            .iter()
            .map(|b| b.cross_attn.kv(encoder_hidden))
            .collect::<Result<_>>()?;
        Ok(Seq2SeqCache::tensors(
            DecoderCache::new(KvCache::new(self.decoder.len()), cross_kv),
            cross_bias(mask, encoder_hidden.dtype())?,
        ))
    }

    fn decode(&self, ids: &Tensor, cache: &mut Seq2SeqCache) -> Result<Tensor> {
        let s = ids.dim(1)?;
        let past = cache.seq_len();
        let (dec, cross) = cache.as_tensors()?;
        let mut xs = self.shared.forward(ids)?;
        let dtype = xs.dtype();
        if let Some(first) = self.decoder.first() {
            let bias = first
                .self_attn
                .position_bias(s, past + s, past, false, ids.device(), dtype)?
                .broadcast_add(&causal_bias(s, past, ids.device(), dtype)?)?;
            for (i, b) in self.decoder.iter().enumerate() {
                let h = b.self_norm.forward(&xs)?;
                let (k, v) = b.self_attn.kv(&h)?;
                let (k, v) = dec.self_kv.append(i, &k, &v)?;
                xs = (xs + b.self_attn.attend(&h, &k, &v, &bias)?)?;
                let h = b.cross_norm.forward(&xs)?;
                let (ck, cv) = &dec.cross_kv[i];
                xs = (&xs + b.cross_attn.attend(&h, ck, cv, cross)?)?;
                xs = (&xs + b.ff.forward(&b.ff_norm.forward(&xs)?)?)?;
            }
        }
        let xs = (self.decoder_norm.forward(&xs)? * self.output_scale)?;
        self.lm_head.forward(&xs)?.to_dtype(DType::F32)
    }
}

/// A 0/1 mask tensor `[b, s]` as f32 values.
fn mask_values(mask: &Tensor) -> Result<Vec<f32>> {
    mask.to_dtype(DType::F32)?.flatten_all()?.to_vec1()
}

impl Seq2SeqLm for T5ForConditionalGeneration {
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match &self.layers {
            Layers::Candle(m) => m.encode(ids, mask),
            Layers::Cpu(m) => {
                let (b, s) = ids.dims2()?;
                let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let x = m.encode(&ids_v, b, s, &mask_values(mask)?)?;
                Tensor::from_vec(x, (b, s, m.hidden()), &self.device)
            }
        }
    }

    fn new_cache(&self, encoder_hidden: &Tensor, mask: &Tensor) -> Result<Seq2SeqCache> {
        match &self.layers {
            Layers::Candle(m) => m.new_cache(encoder_hidden, mask),
            Layers::Cpu(m) => {
                let (b, src, _) = encoder_hidden.dims3()?;
                let enc: Vec<f32> = encoder_hidden
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let st = m.new_state(&enc, b, src, mask_values(mask)?);
                Ok(Seq2SeqCache::T5Cpu(Box::new(st)))
            }
        }
    }

    fn decode(&self, ids: &Tensor, cache: &mut Seq2SeqCache) -> Result<Tensor> {
        match (&self.layers, cache) {
            (Layers::Candle(m), cache) => m.decode(ids, cache),
            (Layers::Cpu(m), Seq2SeqCache::T5Cpu(st)) => {
                let (b, s) = ids.dims2()?;
                let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let logits = m.decode(&ids_v, s, st)?;
                Tensor::from_vec(logits, (b, s, m.vocab()), &self.device)
            }
            (Layers::Cpu(_), _) => candle_core::bail!("T5's CPU path needs its own decoder cache"),
        }
    }

    fn decoder_start_token_id(&self) -> u32 {
        self.config
            .decoder_start_token_id
            .or(self.config.pad_token_id)
            .unwrap_or(0)
    }

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
    use crate::weights::Weights;

    fn fixture(name: &str) -> (T5Config, std::path::PathBuf) {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/seq2seq/models")
            .join(name);
        let cfg: T5Config =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        (cfg, dir)
    }

    fn logits(model: &T5ForConditionalGeneration, ids: &[u32], cache: &mut Seq2SeqCache) -> Tensor {
        let ids = Tensor::from_vec(ids.to_vec(), (ids.len(), 1), &Device::Cpu).unwrap();
        model.decode(&ids, cache).unwrap()
    }

    /// The CPU path against the candle layers: a padded batch of two inputs, the decoder cache
    /// growing past its first capacity, and rows reordered and repeated (beams) in between.
    #[test]
    fn cpu_path_matches_candle_layers() {
        for name in ["t5", "t5-v1_1"] {
            let (cfg, dir) = fixture(name);
            let vb = || {
                Weights::from_dir(&dir)
                    .unwrap()
                    .into_var_builder(DType::F32, &Device::Cpu)
            };
            let cpu = T5ForConditionalGeneration::load(&cfg, vb()).unwrap();
            assert!(matches!(cpu.layers, Layers::Cpu(_)));
            let reference = T5ForConditionalGeneration::load_candle(&cfg, vb()).unwrap();
            let v = cfg.vocab_size as u32;
            let rows: Vec<u32> = (0..14).map(|i| (i * 37 + 5) % v).collect();
            let ids = Tensor::from_vec(rows, (2, 7), &Device::Cpu).unwrap();
            let mask = Tensor::from_vec(
                vec![1u32, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                (2, 7),
                &Device::Cpu,
            )
            .unwrap();
            let (ha, hb) = (
                cpu.encode(&ids, &mask).unwrap(),
                reference.encode(&ids, &mask).unwrap(),
            );
            let d = crate::models::max_abs_diff(&ha, &hb);
            assert!(d < 1e-5, "{name} encoder: {d}");
            let mut ca = cpu.new_cache(&hb, &mask).unwrap();
            let mut cb = reference.new_cache(&hb, &mask).unwrap();
            let mut tokens = vec![0u32, 0];
            for step in 0..20u32 {
                if step == 3 {
                    // Two inputs -> three rows: input 1 twice, then input 0.
                    ca.select_rows(&[1, 1, 0]).unwrap();
                    cb.select_rows(&[1, 1, 0]).unwrap();
                    tokens = vec![tokens[1], tokens[1], tokens[0]];
                }
                let (la, lb) = (
                    logits(&cpu, &tokens, &mut ca),
                    logits(&reference, &tokens, &mut cb),
                );
                let d = crate::models::max_abs_diff(&la, &lb);
                assert!(d < 1e-4, "{name} step {step}: {d}");
                tokens = tokens
                    .iter()
                    .enumerate()
                    .map(|(i, _)| (step * 13 + i as u32 * 7 + 2) % v)
                    .collect();
            }
            assert_eq!(ca.seq_len(), 20);
        }
    }

    #[test]
    fn buckets_match_hf() {
        // `_relative_position_bucket` by hand (32 buckets, distance 128).
        let bi: Vec<usize> = [-200i64, -100, -20, -8, -7, -1, 0, 1, 7, 8, 20, 100, 200]
            .iter()
            .map(|&r| relative_bucket(r, true, 32, 128))
            .collect();
        assert_eq!(bi, vec![15, 15, 10, 8, 7, 1, 0, 17, 23, 24, 26, 31, 31]);
        let uni: Vec<usize> = [0i64, -1, -15, -16, -40, -200, 3]
            .iter()
            .map(|&r| relative_bucket(r, false, 32, 128))
            .collect();
        assert_eq!(uni, vec![0, 1, 15, 16, 23, 31, 0]);
    }
}
