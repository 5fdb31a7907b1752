//! BART (Lewis et al. 2019) and Marian (its translation sibling), as `modeling_bart.py` /
//! `modeling_marian.py`: a post-LN encoder-decoder with learned (BART, offset 2) or sinusoidal
//! (Marian) positions, optional `layernorm_embedding` and embedding scale, a tied LM head with
//! `final_logits_bias`, and BART's sequence-classification head on the last `</s>`.
//!
//! Which path runs where: candle ops everywhere; on CPU f32, decoder attention for a few query
//! rows (decoding steps, beams) is `layers::sdpa`'s plain loop (`kernels::cpu::attention`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::causal_lm::KvCache;
use super::layers::{attention_bias, linear, sdpa, Activation, Linear};
use super::seq2seq::causal_bias;
use super::EncoderModel;

fn default_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Deserialize)]
pub struct BartConfig {
    pub vocab_size: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    #[serde(default)]
    pub activation_function: Activation,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<u32>,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
    #[serde(default)]
    pub normalize_before: bool,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub model_type: String,
}

impl crate::config::CheckedConfig for BartConfig {
    fn check(&self) -> std::result::Result<(), String> {
        let d = self.d_model;
        crate::config::check_heads(
            "d_model",
            d,
            "encoder_attention_heads",
            self.encoder_attention_heads,
        )?;
        crate::config::check_heads(
            "d_model",
            d,
            "decoder_attention_heads",
            self.decoder_attention_heads,
        )
    }
}

impl BartConfig {
    fn is_marian(&self) -> bool {
        self.model_type == "marian"
    }
}

/// Positions: BART learns them (ids offset by 2); Marian uses fixed sinusoids.
enum Positions {
    Learned(Embedding),
    Sinusoidal(Tensor),
}

impl Positions {
    fn load(cfg: &BartConfig, vb: VarBuilder) -> Result<Self> {
        if cfg.is_marian() {
            Ok(Positions::Sinusoidal(sinusoidal(
                cfg.max_position_embeddings,
                cfg.d_model,
                vb.device(),
                vb.dtype(),
            )?))
        } else {
            Ok(Positions::Learned(embedding(
                cfg.max_position_embeddings + 2,
                cfg.d_model,
                vb,
            )?))
        }
    }

    /// `[seq, d]` embeddings of positions `start..start+len`.
    fn forward(&self, start: usize, len: usize, device: &Device) -> Result<Tensor> {
        match self {
            Positions::Learned(e) => {
                let ids = Tensor::arange(start as u32 + 2, (start + len) as u32 + 2, device)?;
                e.forward(&ids)
            }
            Positions::Sinusoidal(t) => t.narrow(0, start, len),
        }
    }
}

/// Marian's `MarianSinusoidalPositionalEmbedding`: sin in the first half of the features, cos
/// in the second.
fn sinusoidal(n_pos: usize, dim: usize, device: &Device, dtype: DType) -> Result<Tensor> {
    let half = dim / 2;
    let mut data = vec![0f32; n_pos * dim];
    for pos in 0..n_pos {
        for j in 0..dim {
            let i = j / 2 * 2; // 2 * (j // 2)
            let angle = pos as f64 / 10000f64.powf(i as f64 / dim as f64);
            let col = if j % 2 == 0 { j / 2 } else { half + j / 2 };
            data[pos * dim + col] = if j % 2 == 0 { angle.sin() } else { angle.cos() } as f32;
        }
    }
    Tensor::from_vec(data, (n_pos, dim), device)?.to_dtype(dtype)
}

/// BART's multi-head attention (`q_proj`, `k_proj`, `v_proj`, `out_proj`); Whisper's is the
/// same without `k_proj`'s bias.
pub(crate) struct Attention {
    pub(crate) q: Linear,
    k: Linear,
    v: Linear,
    pub(crate) out: Linear,
    pub(crate) heads: usize,
    pub(crate) scale: f64,
}

impl Attention {
    fn load(d: usize, heads: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_with(d, heads, vb, true)
    }

    /// With or without a bias on `k_proj`.
    pub(crate) fn load_with(d: usize, heads: usize, vb: VarBuilder, k_bias: bool) -> Result<Self> {
        let k = if k_bias {
            linear(d, d, vb.pp("k_proj"))?
        } else {
            Linear::new(vb.pp("k_proj").get((d, d), "weight")?, None)?
        };
        Ok(Self {
            q: linear(d, d, vb.pp("q_proj"))?,
            k,
            v: linear(d, d, vb.pp("v_proj"))?,
            out: linear(d, d, vb.pp("out_proj"))?,
            heads,
            scale: 1.0 / ((d / heads) as f64).sqrt(),
        })
    }

    pub(crate) fn heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, s, d) = xs.dims3()?;
        xs.reshape((b, s, self.heads, d / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    /// Keys and values of `xs` split into heads: `[b, h, s, d]`.
    pub(crate) fn kv(&self, xs: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            self.heads(&self.k.forward(xs)?)?,
            self.heads(&self.v.forward(xs)?)?,
        ))
    }

    /// Attend from `xs` over keys/values `k`, `v` with additive `bias` `[b, 1, s|1, t]`.
    pub(crate) fn attend(
        &self,
        xs: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
    ) -> Result<Tensor> {
        let q = self.heads(&self.q.forward(xs)?)?;
        self.out.forward(&sdpa(&q, k, v, bias, self.scale)?)
    }
}

/// `fc1`, the activation, `fc2` (BART, Marian, Whisper).
pub(crate) struct FeedForward {
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl FeedForward {
    pub(crate) fn load(d: usize, ffn: usize, act: Activation, vb: &VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(d, ffn, vb.pp("fc1"))?,
            fc2: linear(ffn, d, vb.pp("fc2"))?,
            act,
        })
    }

    pub(crate) fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&self.act.forward(&self.fc1.forward(xs)?)?)
    }
}

struct EncoderLayer {
    attn: Attention,
    attn_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
    pre_norm: bool,
}

impl EncoderLayer {
    fn load(cfg: &BartConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        Ok(Self {
            attn: Attention::load(d, cfg.encoder_attention_heads, vb.pp("self_attn"))?,
            attn_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("self_attn_layer_norm"))?,
            ff: FeedForward::load(d, cfg.encoder_ffn_dim, cfg.activation_function, &vb)?,
            ff_norm: layer_norm(d, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            pre_norm: cfg.normalize_before,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = if self.pre_norm {
            self.attn_norm.forward(xs)?
        } else {
            xs.clone()
        };
        let (k, v) = self.attn.kv(&h)?;
        let mut xs = (self.attn.attend(&h, &k, &v, bias)? + xs)?;
        if !self.pre_norm {
            xs = self.attn_norm.forward(&xs)?;
        }
        let h = if self.pre_norm {
            self.ff_norm.forward(&xs)?
        } else {
            xs.clone()
        };
        let mut xs = (self.ff.forward(&h)? + xs)?;
        if !self.pre_norm {
            xs = self.ff_norm.forward(&xs)?;
        }
        Ok(xs)
    }
}

struct DecoderLayer {
    self_attn: Attention,
    self_norm: LayerNorm,
    cross_attn: Attention,
    cross_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
}

impl DecoderLayer {
    fn load(cfg: &BartConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            self_attn: Attention::load(d, cfg.decoder_attention_heads, vb.pp("self_attn"))?,
            self_norm: layer_norm(d, eps, vb.pp("self_attn_layer_norm"))?,
            cross_attn: Attention::load(d, cfg.decoder_attention_heads, vb.pp("encoder_attn"))?,
            cross_norm: layer_norm(d, eps, vb.pp("encoder_attn_layer_norm"))?,
            ff: FeedForward::load(d, cfg.decoder_ffn_dim, cfg.activation_function, &vb)?,
            ff_norm: layer_norm(d, eps, vb.pp("final_layer_norm"))?,
        })
    }
}

/// What the decoder keeps between steps: self-attention keys/values, and the cross-attention
/// keys/values of the encoder output (computed once).
pub struct DecoderCache {
    pub self_kv: KvCache,
    pub cross_kv: Vec<(Tensor, Tensor)>,
    /// The encoder row each row's cross-attention keys/values come from: beams of one input
    /// share them, so reordering beams within an input copies nothing.
    cross_src: Vec<u32>,
}

impl DecoderCache {
    /// A cache over `cross_kv` (`[rows, heads, src, d]` per layer), one row per encoder row.
    pub fn new(self_kv: KvCache, cross_kv: Vec<(Tensor, Tensor)>) -> Self {
        let rows = cross_kv
            .first()
            .and_then(|(k, _)| k.dim(0).ok())
            .unwrap_or(0);
        Self {
            self_kv,
            cross_kv,
            cross_src: (0..rows as u32).collect(),
        }
    }

    /// Keep rows (beams): row `i` becomes old row `rows[i]`.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        self.self_kv.select_rows(rows)?;
        let src: Vec<u32> = rows
            .iter()
            .map(|&r| self.cross_src.get(r as usize).copied().unwrap_or(r))
            .collect();
        if src == self.cross_src {
            // Each row keeps keys/values of the same encoder row: nothing to move.
            return Ok(());
        }
        if let Some((k, _)) = self.cross_kv.first() {
            let idx = Tensor::new(rows, k.device())?;
            for (k, v) in self.cross_kv.iter_mut() {
                *k = k.index_select(&idx, 0)?;
                *v = v.index_select(&idx, 0)?;
            }
        }
        self.cross_src = src;
        Ok(())
    }
}

pub struct BartModel {
    shared: Embedding,
    embed_scale: f64,
    enc_pos: Positions,
    dec_pos: Positions,
    enc_ln_emb: Option<LayerNorm>,
    dec_ln_emb: Option<LayerNorm>,
    enc_layers: Vec<EncoderLayer>,
    dec_layers: Vec<DecoderLayer>,
    enc_final_norm: Option<LayerNorm>,
    dec_final_norm: Option<LayerNorm>,
    pub config: BartConfig,
}

fn optional_norm(vb: &VarBuilder, name: &str, d: usize, eps: f64) -> Result<Option<LayerNorm>> {
    if vb.contains_tensor(&format!("{name}.weight")) {
        Ok(Some(layer_norm(d, eps, vb.pp(name))?))
    } else {
        Ok(None)
    }
}

impl BartModel {
    /// `vb` at the `model.` prefix.
    pub fn load(cfg: &BartConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let eps = cfg.layer_norm_eps;
        let shared = if vb.contains_tensor("shared.weight") {
            embedding(cfg.vocab_size, d, vb.pp("shared"))?
        } else {
            embedding(cfg.vocab_size, d, vb.pp("encoder").pp("embed_tokens"))?
        };
        let enc = vb.pp("encoder");
        let dec = vb.pp("decoder");
        Ok(Self {
            embed_scale: if cfg.scale_embedding {
                (d as f64).sqrt()
            } else {
                1.0
            },
            enc_pos: Positions::load(cfg, enc.pp("embed_positions"))?,
            dec_pos: Positions::load(cfg, dec.pp("embed_positions"))?,
            enc_ln_emb: optional_norm(&enc, "layernorm_embedding", d, eps)?,
            dec_ln_emb: optional_norm(&dec, "layernorm_embedding", d, eps)?,
            enc_layers: (0..cfg.encoder_layers)
                .map(|i| EncoderLayer::load(cfg, enc.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            dec_layers: (0..cfg.decoder_layers)
                .map(|i| DecoderLayer::load(cfg, dec.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            enc_final_norm: optional_norm(&enc, "layer_norm", d, eps)?,
            dec_final_norm: optional_norm(&dec, "layer_norm", d, eps)?,
            shared,
            config: cfg.clone(),
        })
    }

    pub fn shared_embeddings(&self) -> &Tensor {
        self.shared.embeddings()
    }

    fn embed(&self, ids: &Tensor, start: usize, pos: &Positions) -> Result<Tensor> {
        let s = ids.dim(1)?;
        let xs = (self.shared.forward(ids)? * self.embed_scale)?;
        xs.broadcast_add(&pos.forward(start, s, ids.device())?)
    }

    /// Encoder hidden states `[b, s, d]`; `mask` is the 0/1 `[b, s]` padding mask.
    pub fn encode(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut xs = self.embed(ids, 0, &self.enc_pos)?;
        if let Some(n) = &self.enc_ln_emb {
            xs = n.forward(&xs)?;
        }
        let bias = attention_bias(mask, xs.dtype())?;
        for l in &self.enc_layers {
            xs = l.forward(&xs, &bias)?;
        }
        if let Some(n) = &self.enc_final_norm {
            xs = n.forward(&xs)?;
        }
        Ok(xs)
    }

    /// An empty decoder cache with the cross-attention keys/values of `encoder_hidden`.
    pub fn new_cache(&self, encoder_hidden: &Tensor) -> Result<DecoderCache> {
        let cross_kv = self
            .dec_layers
            .iter()
            .map(|l| l.cross_attn.kv(encoder_hidden))
            .collect::<Result<_>>()?;
        Ok(DecoderCache::new(
            KvCache::new(self.dec_layers.len()),
            cross_kv,
        ))
    }

    /// Decoder hidden states for `ids` `[b, s]` following the cached tokens. `self_bias`:
    /// `[b, 1, s, cached + s]`; `cross_bias`: `[b, 1, 1, src]` from the encoder mask.
    pub fn decode(
        &self,
        ids: &Tensor,
        cache: &mut DecoderCache,
        self_bias: &Tensor,
        cross_bias: &Tensor,
    ) -> Result<Tensor> {
        let start = cache.self_kv.seq_len();
        let mut xs = self.embed(ids, start, &self.dec_pos)?;
        if let Some(n) = &self.dec_ln_emb {
            xs = n.forward(&xs)?;
        }
        let pre = self.config.normalize_before;
        for (i, l) in self.dec_layers.iter().enumerate() {
            let h = if pre {
                l.self_norm.forward(&xs)?
            } else {
                xs.clone()
            };
            let (k, v) = l.self_attn.kv(&h)?;
            let (k, v) = cache.self_kv.append(i, &k, &v)?;
            xs = (l.self_attn.attend(&h, &k, &v, self_bias)? + xs)?;
            if !pre {
                xs = l.self_norm.forward(&xs)?;
            }
            let h = if pre {
                l.cross_norm.forward(&xs)?
            } else {
                xs.clone()
            };
            let (ck, cv) = &cache.cross_kv[i];
            xs = (l.cross_attn.attend(&h, ck, cv, cross_bias)? + xs)?;
            if !pre {
                xs = l.cross_norm.forward(&xs)?;
            }
            let h = if pre {
                l.ff_norm.forward(&xs)?
            } else {
                xs.clone()
            };
            xs = (l.ff.forward(&h)? + xs)?;
            if !pre {
                xs = l.ff_norm.forward(&xs)?;
            }
        }
        if let Some(n) = &self.dec_final_norm {
            xs = n.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// `BartForSequenceClassification`: the decoder's state at the last `</s>` of each row, through
/// `classification_head` (dense, tanh, out_proj).
pub struct BartForSequenceClassification {
    model: BartModel,
    dense: Linear,
    out_proj: Linear,
    eos: u32,
    start: u32,
}

impl BartForSequenceClassification {
    pub fn load(cfg: &BartConfig, vb: VarBuilder, num_labels: usize) -> Result<Self> {
        let model = BartModel::load(cfg, vb.pp("model"))?;
        let d = cfg.d_model;
        let h = vb.pp("classification_head");
        Ok(Self {
            model,
            dense: linear(d, d, h.pp("dense"))?,
            out_proj: linear(d, num_labels, h.pp("out_proj"))?,
            eos: cfg.eos_token_id.unwrap_or(2),
            start: cfg.decoder_start_token_id.unwrap_or(2),
        })
    }
}

impl EncoderModel for BartForSequenceClassification {
    fn forward(&self, input_ids: &Tensor, _types: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let enc = self.model.encode(input_ids, mask)?;
        let (b, s) = input_ids.dims2()?;
        let rows: Vec<Vec<u32>> = input_ids.to_vec2()?;
        // `shift_tokens_right`: the start token, then each row without its last token.
        let dec_ids: Vec<u32> = rows
            .iter()
            .flat_map(|r| {
                std::iter::once(self.start).chain(r.iter().take(s.saturating_sub(1)).copied())
            })
            .collect();
        let dec_ids = Tensor::from_vec(dec_ids, (b, s), input_ids.device())?;
        let mut cache = self.model.new_cache(&enc)?;
        let self_bias = causal_bias(s, 0, input_ids.device(), enc.dtype())?;
        let cross_bias = attention_bias(mask, enc.dtype())?;
        let hidden = self
            .model
            .decode(&dec_ids, &mut cache, &self_bias, &cross_bias)?;
        // The last eos of each row.
        let mut picked = Vec::with_capacity(b);
        for (i, r) in rows.iter().enumerate() {
            let pos = r.iter().rposition(|&t| t == self.eos).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "row {i} has no end-of-sequence token ({}), which BART classification needs",
                    self.eos
                ))
            })?;
            picked.push(hidden.get(i)?.get(pos)?);
        }
        let x = Tensor::stack(&picked, 0)?;
        let x = self.dense.forward(&x)?.tanh()?;
        self.out_proj.forward(&x)
    }
}

/// `BartForConditionalGeneration` / `MarianMTModel`: the model plus the tied LM head.
pub struct BartForConditionalGeneration {
    pub model: BartModel,
    lm_head: Linear,
    final_logits_bias: Option<Tensor>,
}

impl BartForConditionalGeneration {
    pub fn load(cfg: &BartConfig, vb: VarBuilder) -> Result<Self> {
        let model = BartModel::load(cfg, vb.pp("model"))?;
        let w = if vb.contains_tensor("lm_head.weight") {
            vb.get((cfg.vocab_size, cfg.d_model), "lm_head.weight")?
        } else {
            model.shared_embeddings().clone()
        };
        let final_logits_bias = if vb.contains_tensor("final_logits_bias") {
            Some(vb.get((1, cfg.vocab_size), "final_logits_bias")?)
        } else {
            None
        };
        Ok(Self {
            model,
            lm_head: Linear::new(w, None)?,
            final_logits_bias,
        })
    }

    /// Logits `[b, s, vocab]` of decoder states.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let l = self.lm_head.forward(hidden)?;
        match &self.final_logits_bias {
            Some(b) => l.broadcast_add(b),
            None => Ok(l),
        }
    }
}
