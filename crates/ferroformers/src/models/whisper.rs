//! Whisper (Radford et al. 2022), as `modeling_whisper.py`: log-mel features through two
//! convolutions (the second halves the 3000 frames to 1500 positions) and a pre-LN transformer
//! encoder; a pre-LN decoder with learned positions, cross-attention over the encoder's states,
//! and the output projection tied to the token embeddings.
//!
//! Weights come from HF's `WhisperForConditionalGeneration` (safetensors) or from a
//! CTranslate2 `model.bin` as faster-whisper ships it ([`load_ct2`]: the fused projections are
//! split and the names mapped to HF's, so one model code serves both).
//!
//! Which path runs where: candle ops everywhere, except on CPU f32: encoder self-attention is
//! the tiled kernel (`kernels::cpu::attention::attend_sequences`, scores never written whole),
//! and the decoder is `whisper/cpu.rs` (plain buffers, fused products, a KV cache written in
//! place; `FERROFORMERS_WHISPER_CANDLE=1` keeps the candle decoder there, for comparisons).

pub mod cpu;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use candle_nn::{conv1d, embedding, layer_norm, Conv1d, Conv1dConfig, Embedding, LayerNorm};
use serde::Deserialize;
use serde_json::{json, Value};

use super::bart::{Attention, DecoderCache, FeedForward};
use super::causal_lm::KvCache;
use super::layers::{sdpa, Activation, Linear};
use super::layers::{with_cpu_f32, with_cpu_f32_slice};
use super::seq2seq::{causal_bias, cross_bias, Seq2SeqCache, Seq2SeqLm};
use crate::kernels::cpu::attention::attend_sequences;
use crate::kernels::cpu::linear as linear_kernels;
use crate::kernels::cpu::screen::{ScreenPlan, ScreenedProjection};
use crate::weights::{Ct2File, Weights};

const LAYER_NORM_EPS: f64 = 1e-5;

#[derive(Debug, Clone, Deserialize)]
pub struct WhisperConfig {
    pub vocab_size: usize,
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_attention_heads: usize,
    pub decoder_attention_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    #[serde(default)]
    pub activation_function: Activation,
    pub max_source_positions: usize,
    pub max_target_positions: usize,
    #[serde(default)]
    pub scale_embedding: bool,
    #[serde(default)]
    pub decoder_start_token_id: Option<u32>,
}

impl WhisperConfig {
    /// The number of mel frames the encoder takes: two per position (`conv2` has stride 2).
    pub fn input_frames(&self) -> usize {
        self.max_source_positions * 2
    }
}

struct EncoderLayer {
    attn: Attention,
    /// `[q; k; v]` as one product (k's bias zeros), for the CPU attention kernel.
    qkv: Linear,
    attn_norm: LayerNorm,
    ff: FeedForward,
    ff_norm: LayerNorm,
}

impl EncoderLayer {
    fn load(cfg: &WhisperConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let attn = Attention::load_with(d, cfg.encoder_attention_heads, vb.pp("self_attn"), false)?;
        let a = vb.pp("self_attn");
        let w = Tensor::cat(
            &[
                a.pp("q_proj").get((d, d), "weight")?,
                a.pp("k_proj").get((d, d), "weight")?,
                a.pp("v_proj").get((d, d), "weight")?,
            ],
            0,
        )?;
        let bq = a.pp("q_proj").get(d, "bias")?;
        let b = Tensor::cat(
            &[bq.clone(), bq.zeros_like()?, a.pp("v_proj").get(d, "bias")?],
            0,
        )?;
        Ok(Self {
            attn,
            qkv: Linear::new(w, Some(b))?,
            attn_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("self_attn_layer_norm"))?,
            ff: FeedForward::load(d, cfg.encoder_ffn_dim, cfg.activation_function, &vb)?,
            ff_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("final_layer_norm"))?,
        })
    }

    fn forward(&self, xs: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let h = self.attn_norm.forward(xs)?;
        let ctx = if xs.device().is_cpu() && xs.dtype() == DType::F32 {
            // Scores are never written whole: blocks of query rows, spread over the threads.
            let (b, s, d) = h.dims3()?;
            let heads = self.attn.heads;
            let qkv: Vec<f32> = self.qkv.forward(&h)?.flatten_all()?.to_vec1()?;
            let keep = vec![1f32; b * s];
            let par = !crate::models::layers::in_worker();
            let scale = self.attn.scale as f32;
            let ctx = attend_sequences(&qkv, b, s, heads, d / heads, scale, None, &keep, par);
            Tensor::from_vec(ctx, (b, s, d), xs.device())?
        } else {
            let (k, v) = self.attn.kv(&h)?;
            let q = self.attn.heads(&self.attn.q.forward(&h)?)?;
            sdpa(&q, &k, &v, bias, self.attn.scale)?
        };
        let xs = (self.attn.out.forward(&ctx)? + xs)?;
        let h = self.ff_norm.forward(&xs)?;
        self.ff.forward(&h)? + xs
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
    fn load(cfg: &WhisperConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.d_model;
        let h = cfg.decoder_attention_heads;
        Ok(Self {
            self_attn: Attention::load_with(d, h, vb.pp("self_attn"), false)?,
            self_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("self_attn_layer_norm"))?,
            cross_attn: Attention::load_with(d, h, vb.pp("encoder_attn"), false)?,
            cross_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("encoder_attn_layer_norm"))?,
            ff: FeedForward::load(d, cfg.decoder_ffn_dim, cfg.activation_function, &vb)?,
            ff_norm: layer_norm(d, LAYER_NORM_EPS, vb.pp("final_layer_norm"))?,
        })
    }
}

/// The encoder: candle's (GPU, f16/bf16), or plain buffers on CPU f32.
enum Encoder {
    Candle {
        conv1: Conv1d,
        conv2: Conv1d,
        layers: Vec<EncoderLayer>,
        norm: LayerNorm,
    },
    Cpu(Box<cpu::EncoderCpu>),
}

/// The decoder layers: candle's (GPU, f16/bf16), or plain buffers on CPU f32.
enum Decoder {
    Candle(Vec<DecoderLayer>),
    Cpu(Box<cpu::DecoderCpu>),
}

/// `FERROFORMERS_SCREEN_TRACE=1`: a line per screened step (how many logits went through
/// f32).
fn trace_screen() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| crate::kernels::cpu::switch_on("FERROFORMERS_SCREEN_TRACE"))
}

/// `WhisperForConditionalGeneration`.
pub struct WhisperForConditionalGeneration {
    encoder: Encoder,
    enc_pos: Tensor,
    embed_tokens: Embedding,
    dec_pos: Tensor,
    decoder: Decoder,
    dec_norm: LayerNorm,
    proj_out: Linear,
    /// The checkpoint has its own `proj_out.weight` (not tied to the embeddings).
    proj_is_separate: bool,
    /// The tied projection's int8 copy for screened greedy steps, made at the first one.
    screened: std::sync::OnceLock<ScreenedProjection>,
    /// The tied projection in f16 when its values are f16 numbers (checked once, at the first
    /// unscreened step of a few rows: beam search): half the bytes of the step's largest read,
    /// the same logits.
    half_proj: std::sync::OnceLock<Option<linear_kernels::Weights>>,
    embed_scale: f64,
    pub config: WhisperConfig,
}

impl WhisperForConditionalGeneration {
    /// `vb` at the root (`model.` and `proj_out.` below it). On CPU in f32 the encoder and
    /// the decoder run on plain buffers (`whisper/cpu.rs`) unless
    /// `FERROFORMERS_WHISPER_CANDLE=1`.
    pub fn load(cfg: &WhisperConfig, vb: VarBuilder) -> Result<Self> {
        let cpu = vb.device().is_cpu()
            && vb.dtype() == DType::F32
            && !crate::kernels::cpu::switch_on("FERROFORMERS_WHISPER_CANDLE");
        Self::load_with(cfg, vb, cpu)
    }

    /// With the CPU encoder and decoder (`cpu`; f32 weights on CPU only) or candle's.
    pub fn load_with(cfg: &WhisperConfig, vb: VarBuilder, cpu: bool) -> Result<Self> {
        if cpu && !(vb.device().is_cpu() && vb.dtype() == DType::F32) {
            candle_core::bail!("Whisper's CPU decoder takes f32 weights on the CPU");
        }
        let d = cfg.d_model;
        let m = vb.pp("model");
        let enc = m.pp("encoder");
        let dec = m.pp("decoder");
        let conv = |stride| Conv1dConfig {
            padding: 1,
            stride,
            ..Default::default()
        };
        let embed_tokens = embedding(cfg.vocab_size, d, dec.pp("embed_tokens"))?;
        let embed_scale = if cfg.scale_embedding {
            (d as f64).sqrt()
        } else {
            1.0
        };
        let decoder = if cpu {
            Decoder::Cpu(Box::new(cpu::DecoderCpu::load(cfg, &dec, embed_scale)?))
        } else {
            Decoder::Candle(
                (0..cfg.decoder_layers)
                    .map(|i| DecoderLayer::load(cfg, dec.pp("layers").pp(i)))
                    .collect::<Result<_>>()?,
            )
        };
        let proj_is_separate = vb.contains_tensor("proj_out.weight");
        let proj = if proj_is_separate {
            vb.get((cfg.vocab_size, d), "proj_out.weight")?
        } else {
            embed_tokens.embeddings().clone()
        };
        let encoder = if cpu {
            Encoder::Cpu(Box::new(cpu::EncoderCpu::load(cfg, &enc)?))
        } else {
            Encoder::Candle {
                conv1: conv1d(cfg.num_mel_bins, d, 3, conv(1), enc.pp("conv1"))?,
                conv2: conv1d(d, d, 3, conv(2), enc.pp("conv2"))?,
                layers: (0..cfg.encoder_layers)
                    .map(|i| EncoderLayer::load(cfg, enc.pp("layers").pp(i)))
                    .collect::<Result<_>>()?,
                norm: layer_norm(d, LAYER_NORM_EPS, enc.pp("layer_norm"))?,
            }
        };
        Ok(Self {
            encoder,
            enc_pos: enc
                .pp("embed_positions")
                .get((cfg.max_source_positions, d), "weight")?,
            dec_pos: dec
                .pp("embed_positions")
                .get((cfg.max_target_positions, d), "weight")?,
            decoder,
            dec_norm: layer_norm(d, LAYER_NORM_EPS, dec.pp("layer_norm"))?,
            proj_out: Linear::new(proj, None)?,
            proj_is_separate,
            screened: std::sync::OnceLock::new(),
            half_proj: std::sync::OnceLock::new(),
            embed_tokens,
            embed_scale,
            config: cfg.clone(),
        })
    }

    /// Encoder states `[b, 1500, d]` of log-mel `features` `[b, mels, 3000]`.
    pub fn encode_features(&self, features: &Tensor) -> Result<Tensor> {
        let (_, mels, frames) = features.dims3()?;
        let want = self.config.input_frames();
        if mels != self.config.num_mel_bins || frames != want {
            candle_core::bail!(
                "Whisper takes {} mel bins x {want} frames; got {mels} x {frames}",
                self.config.num_mel_bins
            );
        }
        let (conv1, conv2, layers, norm) = match &self.encoder {
            Encoder::Cpu(e) => {
                let b = features.dim(0)?;
                let f: Vec<f32> = features.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let x = e.forward(&f, b, frames)?;
                return Tensor::from_vec(
                    x,
                    (b, frames / 2, self.config.d_model),
                    features.device(),
                );
            }
            Encoder::Candle {
                conv1,
                conv2,
                layers,
                norm,
            } => (conv1, conv2, layers, norm),
        };
        let dtype = self.enc_pos.dtype();
        let xs = features.to_dtype(dtype)?;
        let xs = Activation::Gelu.forward(&conv1.forward(&xs)?)?;
        let xs = Activation::Gelu.forward(&conv2.forward(&xs)?)?;
        let mut xs = xs
            .transpose(1, 2)?
            .contiguous()?
            .broadcast_add(&self.enc_pos)?;
        let bias = Tensor::zeros((1, 1, 1, 1), dtype, xs.device())?;
        for l in layers {
            xs = l.forward(&xs, &bias)?;
        }
        norm.forward(&xs)
    }

    /// The candle decoder layers, or an error on the CPU path.
    fn candle_layers(&self) -> Result<&[DecoderLayer]> {
        match &self.decoder {
            Decoder::Candle(l) => Ok(l),
            Decoder::Cpu(_) => candle_core::bail!("this Whisper model decodes on its CPU path"),
        }
    }

    fn decoder_layers(&self) -> usize {
        match &self.decoder {
            Decoder::Candle(l) => l.len(),
            Decoder::Cpu(c) => c.layers(),
        }
    }

    /// An empty candle decoder cache with the cross-attention keys/values of `encoder_hidden`.
    fn new_decoder_cache(&self, encoder_hidden: &Tensor) -> Result<DecoderCache> {
        let layers = self.candle_layers()?;
        let cross_kv = layers
            .iter()
            .map(|l| l.cross_attn.kv(encoder_hidden))
            .collect::<Result<_>>()?;
        Ok(DecoderCache::new(KvCache::new(layers.len()), cross_kv))
    }

    /// A decoder cache over encoder states `[b, src, d]` (no padding: Whisper's windows are
    /// all 30 s), one row per input.
    pub fn cache_of_hidden(&self, hidden: &Tensor) -> Result<Seq2SeqCache> {
        let (b, src, _) = hidden.dims3()?;
        match &self.decoder {
            Decoder::Candle(_) => {
                let mask = Tensor::ones((b, src), DType::U32, hidden.device())?;
                Ok(Seq2SeqCache::tensors(
                    self.new_decoder_cache(hidden)?,
                    cross_bias(&mask, hidden.dtype())?,
                ))
            }
            Decoder::Cpu(c) => {
                let enc: Vec<f32> = hidden.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let cross = Arc::new(c.cross_kv(&enc, b, src)?);
                Ok(Seq2SeqCache::WhisperCpu(Box::new(c.new_state(cross))))
            }
        }
    }

    /// A cache over the same encoded inputs as `cache` (one row each, nothing decoded); their
    /// cross-attention keys and values are shared, not computed again. `cache` must not have
    /// had its rows reordered.
    pub fn restart_cache(&self, cache: &Seq2SeqCache) -> Result<Seq2SeqCache> {
        match (&self.decoder, cache) {
            (Decoder::Candle(l), Seq2SeqCache::Tensors { dec, cross_bias }) => {
                Ok(Seq2SeqCache::tensors(
                    DecoderCache::new(KvCache::new(l.len()), dec.cross_kv.clone()),
                    cross_bias.clone(),
                ))
            }
            (Decoder::Cpu(c), Seq2SeqCache::WhisperCpu(st)) => {
                Ok(Seq2SeqCache::WhisperCpu(Box::new(c.restart(st))))
            }
            _ => candle_core::bail!("this decoder cache belongs to another model's path"),
        }
    }

    /// Decoder hidden states for `ids` `[b, s]` following the cached tokens (candle path).
    pub fn decode_hidden(
        &self,
        ids: &Tensor,
        cache: &mut DecoderCache,
        self_bias: &Tensor,
        cross_bias: &Tensor,
    ) -> Result<Tensor> {
        let layers = self.candle_layers()?;
        let start = cache.self_kv.seq_len();
        let s = ids.dim(1)?;
        if start + s > self.config.max_target_positions {
            candle_core::bail!(
                "the decoder has {} positions; {} tokens do not fit",
                self.config.max_target_positions,
                start + s
            );
        }
        let mut xs = (self.embed_tokens.forward(ids)? * self.embed_scale)?
            .broadcast_add(&self.dec_pos.narrow(0, start, s)?)?;
        for (i, l) in layers.iter().enumerate() {
            let h = l.self_norm.forward(&xs)?;
            let (k, v) = l.self_attn.kv(&h)?;
            let (k, v) = cache.self_kv.append(i, &k, &v)?;
            xs = (l.self_attn.attend(&h, &k, &v, self_bias)? + xs)?;
            let h = l.cross_norm.forward(&xs)?;
            let (ck, cv) = &cache.cross_kv[i];
            xs = (l.cross_attn.attend(&h, ck, cv, cross_bias)? + xs)?;
            let h = l.ff_norm.forward(&xs)?;
            xs = (l.ff.forward(&h)? + xs)?;
        }
        self.dec_norm.forward(&xs)
    }

    /// The cross-attention probabilities (`softmax(q kᵀ scale)`) of the alignment `heads`
    /// (`(layer, head)`) for one teacher-forced decoder pass over `ids` from position 0,
    /// decoding encoded input `input` of `cache` (a fresh cache: [`Self::restart_cache`]):
    /// `[head][row][source position]`, rows in `ids` order. What HF's `generate` collects in
    /// `cross_attentions` for those tokens (the decoder is causal), for word timestamps.
    pub fn alignment_attention(
        &self,
        ids: &[u32],
        cache: &Seq2SeqCache,
        input: usize,
        heads: &[(usize, usize)],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let s = ids.len();
        if s == 0 || heads.is_empty() {
            return Ok(vec![Vec::new(); heads.len()]);
        }
        if s > self.config.max_target_positions {
            candle_core::bail!(
                "the decoder has {} positions; {s} tokens do not fit",
                self.config.max_target_positions
            );
        }
        let last = heads.iter().map(|&(l, _)| l).max().unwrap_or(0);
        if last >= self.decoder_layers() {
            candle_core::bail!(
                "alignment head layer {last} but the decoder has {} layers",
                self.decoder_layers()
            );
        }
        match (&self.decoder, cache) {
            (Decoder::Cpu(c), Seq2SeqCache::WhisperCpu(st)) => {
                let embed = self.embed_tokens.embeddings();
                with_cpu_f32_slice(embed, |e| c.alignment_attention(e, ids, st, input, heads))
                    .unwrap_or_else(|| {
                        candle_core::bail!("Whisper's CPU decoder needs f32 embeddings on the CPU")
                    })
            }
            (Decoder::Candle(layers), Seq2SeqCache::Tensors { dec, .. }) => {
                self.alignment_candle(layers, ids, &dec.cross_kv, input, heads)
            }
            _ => candle_core::bail!("this decoder cache belongs to another model's path"),
        }
    }

    fn alignment_candle(
        &self,
        layers: &[DecoderLayer],
        ids: &[u32],
        cross_kv: &[(Tensor, Tensor)],
        input: usize,
        heads: &[(usize, usize)],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        let s = ids.len();
        let mut out: Vec<Vec<Vec<f32>>> = vec![Vec::new(); heads.len()];
        let last = heads.iter().map(|&(l, _)| l).max().unwrap_or(0);
        let inputs = cross_kv.first().map_or(0, |(k, _)| k.dim(0).unwrap_or(0));
        if input >= inputs {
            candle_core::bail!("encoded input {input} of {inputs} for the alignment heads");
        }
        let device = self.enc_pos.device();
        let ids_t = Tensor::from_vec(ids.to_vec(), (1, s), device)?;
        let dtype = self.enc_pos.dtype();
        let self_bias = causal_bias(s, 0, device, dtype)?;
        let mut kv = KvCache::new(layers.len());
        let mut xs = (self.embed_tokens.forward(&ids_t)? * self.embed_scale)?
            .broadcast_add(&self.dec_pos.narrow(0, 0, s)?)?;
        let zero = Tensor::zeros((1, 1, 1, 1), dtype, device)?;
        for (i, l) in layers.iter().enumerate().take(last + 1) {
            let h = l.self_norm.forward(&xs)?;
            let (k, v) = l.self_attn.kv(&h)?;
            let (k, v) = kv.append(i, &k, &v)?;
            xs = (l.self_attn.attend(&h, &k, &v, &self_bias)? + xs)?;
            let h = l.cross_norm.forward(&xs)?;
            let (ck, cv) = &cross_kv[i];
            // This input's row of the cross keys.
            let ck = ck.narrow(0, input, 1)?;
            let wanted: Vec<(usize, usize)> = heads
                .iter()
                .enumerate()
                .filter(|(_, &(layer, _))| layer == i)
                .map(|(n, &(_, head))| (n, head))
                .collect();
            if !wanted.is_empty() {
                let q = l.cross_attn.heads(&l.cross_attn.q.forward(&h)?)?;
                let scores = (q.matmul(&ck.transpose(2, 3)?.contiguous()?)? * l.cross_attn.scale)?
                    .to_dtype(DType::F32)?;
                let probs = candle_nn::ops::softmax_last_dim(&scores)?.squeeze(0)?;
                for (n, head) in wanted {
                    if head >= l.cross_attn.heads {
                        candle_core::bail!(
                            "alignment head ({i}, {head}) but layer {i} has {} heads",
                            l.cross_attn.heads
                        );
                    }
                    out[n] = probs.get(head)?.to_vec2()?;
                }
            }
            if i == last {
                break;
            }
            let cv = cv.narrow(0, input, 1)?;
            xs = (l.cross_attn.attend(&h, &ck, &cv, &zero)? + xs)?;
            let h = l.ff_norm.forward(&xs)?;
            xs = (l.ff.forward(&h)? + xs)?;
        }
        Ok(out)
    }

    /// Logits of decoder states. On CPU f32, a few rows (a decoding step, beams) stream the
    /// `[vocab, d]` projection once per 6 rows (`kernels::cpu::linear`): it is the largest
    /// weight a step reads (tiny.en: 80 MB in f32), and reading it in memory order is what
    /// decoding speed comes down to. When its values are f16 numbers (Whisper's checkpoints
    /// are) it is read from an f16 copy: 40 MB, the same logits.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.logits_screened(hidden, None)
    }

    /// [`Self::logits`], with the projection screened by `plan` when given (CPU f32, tied
    /// projection, a few rows): the logits a greedy step's argmax and Whisper's timestamp rule
    /// read are the f32 product's, the others int8 estimates below them
    /// ([`crate::kernels::cpu::screen`]).
    pub fn logits_screened(&self, hidden: &Tensor, plan: Option<&ScreenPlan>) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let d = self.config.d_model;
        let rows = hidden.elem_count() / d;
        let w = self.embed_tokens.embeddings();
        if !self.proj_is_separate && rows <= 8 {
            let x = hidden.contiguous()?;
            let par = !crate::models::layers::in_worker();
            let vocab = self.config.vocab_size;
            let out = with_cpu_f32(&x, w, |x, w| {
                if let Some(plan) = plan {
                    let proj = self
                        .screened
                        .get_or_init(|| ScreenedProjection::new(w, vocab, d));
                    let mut out = vec![0f32; rows * vocab];
                    let exact = proj.logits_into(w, x, rows, plan, &mut out, par);
                    if trace_screen() {
                        eprintln!("[screen] rows {rows} exact {exact} of {}", rows * vocab);
                    }
                    return out;
                }
                let half = self.half_proj.get_or_init(|| {
                    linear_kernels::to_f16_exact(w).map(linear_kernels::Weights::F16)
                });
                let mut out = vec![0f32; rows * vocab];
                for (chunk, o) in x.chunks(6 * d).zip(out.chunks_mut(6 * vocab)) {
                    let r = chunk.len() / d;
                    match half {
                        Some(h) => h.matmul_into(chunk, r, d, vocab, o, false, par),
                        None => linear_kernels::matmul_into(chunk, r, d, w, vocab, o, false, par),
                    }
                }
                out
            });
            if let Some(out) = out {
                let mut shape = dims;
                if let Some(last) = shape.last_mut() {
                    *last = vocab;
                }
                return Tensor::from_vec(out, shape, hidden.device());
            }
        }
        self.proj_out.forward(hidden)
    }

    /// A decoder cache for the encoder states of features `[b, mels, 3000]`.
    pub fn encode_to_cache(&self, features: &Tensor) -> Result<Seq2SeqCache> {
        self.cache_of_hidden(&self.encode_features(features)?)
    }
}

impl Seq2SeqLm for WhisperForConditionalGeneration {
    fn encode(&self, _ids: &Tensor, _mask: &Tensor) -> Result<Tensor> {
        candle_core::bail!("Whisper's encoder takes log-mel features, not token ids")
    }

    fn new_cache(&self, encoder_hidden: &Tensor, mask: &Tensor) -> Result<Seq2SeqCache> {
        match &self.decoder {
            Decoder::Candle(_) => Ok(Seq2SeqCache::tensors(
                self.new_decoder_cache(encoder_hidden)?,
                cross_bias(mask, encoder_hidden.dtype())?,
            )),
            Decoder::Cpu(_) => {
                let padded = mask.to_dtype(DType::U32)?.flatten_all()?.min(0)?;
                if padded.to_scalar::<u32>()? == 0 {
                    candle_core::bail!("Whisper's encoder states have no padding to mask");
                }
                self.cache_of_hidden(encoder_hidden)
            }
        }
    }

    fn decode(&self, ids: &Tensor, cache: &mut Seq2SeqCache) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let hidden = match &self.decoder {
            Decoder::Cpu(c) => {
                let Seq2SeqCache::WhisperCpu(st) = cache else {
                    candle_core::bail!("Whisper's CPU decoder needs its own decoder cache")
                };
                let ids_v: Vec<u32> = ids.flatten_all()?.to_vec1()?;
                let embed = self.embed_tokens.embeddings();
                let h = with_cpu_f32_slice(embed, |e| c.decode(e, &ids_v, s, st)).unwrap_or_else(
                    || candle_core::bail!("Whisper's CPU decoder needs f32 embeddings on the CPU"),
                )?;
                let h = Tensor::from_vec(h, (b, s, self.config.d_model), ids.device())?;
                if let Some(plan) = st.screen.clone() {
                    return self.logits_screened(&h, Some(&plan))?.to_dtype(DType::F32);
                }
                h
            }
            Decoder::Candle(_) => {
                let past = cache.seq_len();
                let (dec, cross_bias) = cache.as_tensors()?;
                let self_bias = causal_bias(s, past, ids.device(), cross_bias.dtype())?;
                self.decode_hidden(ids, dec, &self_bias, cross_bias)?
            }
        };
        self.logits(&hidden)?.to_dtype(DType::F32)
    }

    fn decoder_start_token_id(&self) -> u32 {
        self.config.decoder_start_token_id.unwrap_or(50258)
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.config.max_source_positions)
    }

    fn max_decoder_positions(&self) -> Option<usize> {
        Some(self.config.max_target_positions)
    }

    fn device(&self) -> &Device {
        self.enc_pos.device()
    }
}

/// A faster-whisper (CTranslate2) folder: `model.bin` beside a CTranslate2 `config.json`.
pub fn is_ct2_dir(dir: &Path) -> bool {
    let has_model_type = crate::config::read_json(&dir.join("config.json"))
        .ok()
        .is_some_and(|c| c.get("model_type").is_some());
    dir.join("model.bin").is_file() && !has_model_type
}

fn ct2_err(path: &Path, detail: impl ToString) -> crate::error::Error {
    crate::error::Error::Weights {
        path: path.to_path_buf(),
        detail: detail.to_string(),
    }
}

/// A CTranslate2 Whisper `model.bin` as HF's config (a `config.json` value) and weights under
/// HF's names. The fused `[q; k; v]` and cross-attention `[k; v]` projections are split (their
/// stored key bias is zeros: HF's `k_proj` has none).
pub fn load_ct2(path: &Path) -> crate::error::Result<(Value, Weights)> {
    let file = Ct2File::read(path)?;
    if file.spec != "WhisperSpec" {
        return Err(ct2_err(
            path,
            format!("a CTranslate2 `{}` model, not Whisper", file.spec),
        ));
    }
    let get = |name: &str| {
        file.tensor(name)
            .ok_or_else(|| ct2_err(path, format!("variable `{name}` is missing")))
    };
    let dims = |name: &str| get(name).map(|t| t.dims().to_vec());
    let conv1 = dims("encoder/conv1/weight")?;
    let (d, mels) = (conv1[0], conv1[1]);
    let count = |side: &str| {
        (0..)
            .take_while(|i| {
                file.tensors
                    .contains_key(&format!("{side}/layer_{i}/ffn/linear_0/weight"))
            })
            .count()
    };
    let (enc_layers, dec_layers) = (count("encoder"), count("decoder"));
    let heads = |side: &str| {
        file.scalars
            .get(&format!("{side}/num_heads"))
            .map(|&h| h as usize)
            .ok_or_else(|| ct2_err(path, format!("`{side}/num_heads` is missing")))
    };
    let vocab = dims("decoder/embeddings/weight")?[0];
    let ffn = dims("encoder/layer_0/ffn/linear_0/weight")?[0];
    let config = json!({
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": vocab,
        "num_mel_bins": mels,
        "d_model": d,
        "encoder_layers": enc_layers,
        "decoder_layers": dec_layers,
        "encoder_attention_heads": heads("encoder")?,
        "decoder_attention_heads": heads("decoder")?,
        "encoder_ffn_dim": ffn,
        "decoder_ffn_dim": dims("decoder/layer_0/ffn/linear_0/weight")?[0],
        "activation_function": "gelu",
        "max_source_positions": dims("encoder/position_encodings/encodings")?[0],
        "max_target_positions": dims("decoder/position_encodings/encodings")?[0],
        "scale_embedding": file.scalars.get("decoder/scale_embeddings").is_some_and(|&v| v != 0),
    });
    let mut out: HashMap<String, Tensor> = HashMap::new();
    let mut put = |hf: String, t: Tensor| {
        out.insert(hf, t);
    };
    let wrap = |e: candle_core::Error| ct2_err(path, e);
    let norm = |put: &mut dyn FnMut(String, Tensor), ct: &str, hf: &str| {
        put(format!("{hf}.weight"), get(&format!("{ct}/gamma"))?.clone());
        put(format!("{hf}.bias"), get(&format!("{ct}/beta"))?.clone());
        Ok::<_, crate::error::Error>(())
    };
    let lin = |put: &mut dyn FnMut(String, Tensor), ct: &str, hf: &str| {
        put(
            format!("{hf}.weight"),
            get(&format!("{ct}/weight"))?.clone(),
        );
        put(format!("{hf}.bias"), get(&format!("{ct}/bias"))?.clone());
        Ok::<_, crate::error::Error>(())
    };
    // Rows `[i*d, (i+1)*d)` of a fused projection as HF's `name` (`k_proj` without its bias).
    let split = |put: &mut dyn FnMut(String, Tensor),
                 ct: &str,
                 names: &[&str]|
     -> crate::error::Result<()> {
        let w = get(&format!("{ct}/weight"))?;
        let b = get(&format!("{ct}/bias"))?;
        for (i, hf) in names.iter().enumerate() {
            put(
                format!("{hf}.weight"),
                w.narrow(0, i * d, d)
                    .and_then(|t| t.contiguous())
                    .map_err(wrap)?,
            );
            if !hf.ends_with("k_proj") {
                put(
                    format!("{hf}.bias"),
                    b.narrow(0, i * d, d)
                        .and_then(|t| t.contiguous())
                        .map_err(wrap)?,
                );
            }
        }
        Ok(())
    };
    let p = &mut put;
    lin(p, "encoder/conv1", "model.encoder.conv1")?;
    lin(p, "encoder/conv2", "model.encoder.conv2")?;
    p(
        "model.encoder.embed_positions.weight".into(),
        get("encoder/position_encodings/encodings")?.clone(),
    );
    p(
        "model.decoder.embed_positions.weight".into(),
        get("decoder/position_encodings/encodings")?.clone(),
    );
    p(
        "model.decoder.embed_tokens.weight".into(),
        get("decoder/embeddings/weight")?.clone(),
    );
    if file.tensors.contains_key("decoder/projection/weight") {
        p(
            "proj_out.weight".into(),
            get("decoder/projection/weight")?.clone(),
        );
    }
    norm(p, "encoder/layer_norm", "model.encoder.layer_norm")?;
    norm(p, "decoder/layer_norm", "model.decoder.layer_norm")?;
    for (side, n) in [("encoder", enc_layers), ("decoder", dec_layers)] {
        for i in 0..n {
            let ct = format!("{side}/layer_{i}");
            let hf = format!("model.{side}.layers.{i}");
            let sa = format!("{hf}.self_attn");
            split(
                p,
                &format!("{ct}/self_attention/linear_0"),
                &[
                    &format!("{sa}.q_proj"),
                    &format!("{sa}.k_proj"),
                    &format!("{sa}.v_proj"),
                ],
            )?;
            lin(
                p,
                &format!("{ct}/self_attention/linear_1"),
                &format!("{sa}.out_proj"),
            )?;
            norm(
                p,
                &format!("{ct}/self_attention/layer_norm"),
                &format!("{hf}.self_attn_layer_norm"),
            )?;
            if side == "decoder" {
                let ca = format!("{hf}.encoder_attn");
                lin(
                    p,
                    &format!("{ct}/attention/linear_0"),
                    &format!("{ca}.q_proj"),
                )?;
                split(
                    p,
                    &format!("{ct}/attention/linear_1"),
                    &[&format!("{ca}.k_proj"), &format!("{ca}.v_proj")],
                )?;
                lin(
                    p,
                    &format!("{ct}/attention/linear_2"),
                    &format!("{ca}.out_proj"),
                )?;
                norm(
                    p,
                    &format!("{ct}/attention/layer_norm"),
                    &format!("{hf}.encoder_attn_layer_norm"),
                )?;
            }
            norm(
                p,
                &format!("{ct}/ffn/layer_norm"),
                &format!("{hf}.final_layer_norm"),
            )?;
            lin(p, &format!("{ct}/ffn/linear_0"), &format!("{hf}.fc1"))?;
            lin(p, &format!("{ct}/ffn/linear_1"), &format!("{hf}.fc2"))?;
        }
    }
    Ok((config, Weights::from_tensors(out, path.to_path_buf())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, cpu: bool) -> WhisperForConditionalGeneration {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/whisper/models")
            .join(name);
        let (cfg, weights): (WhisperConfig, Weights) = if is_ct2_dir(&dir) {
            let (raw, w) = load_ct2(&dir.join("model.bin")).unwrap();
            let cfg = crate::config::ModelConfig::from_value(raw, dir.join("config.json"))
                .unwrap()
                .parse()
                .unwrap();
            (cfg, w)
        } else {
            let cfg = crate::config::ModelConfig::from_dir(&dir)
                .unwrap()
                .parse()
                .unwrap();
            (cfg, Weights::from_dir(&dir).unwrap())
        };
        let vb = weights.into_var_builder(DType::F32, &Device::Cpu);
        WhisperForConditionalGeneration::load_with(&cfg, vb, cpu).unwrap()
    }

    fn ids(tokens: &[u32], rows: usize) -> Tensor {
        Tensor::from_vec(tokens.to_vec(), (rows, tokens.len() / rows), &Device::Cpu).unwrap()
    }

    /// A cache with a screen plan: every step's logits keep the unscreened argmax (with the
    /// suppressed tokens masked) and its bits, and the plan's tokens (specials from 50257,
    /// the suppressed ones) are the unscreened bits; most of the rest are estimates.
    #[test]
    fn screened_decoding_keeps_the_argmax_and_the_special_tokens() {
        let m = load("whisper-random", true);
        let cfg = &m.config;
        let n = cfg.num_mel_bins * cfg.input_frames();
        let feats = crate::kernels::cpu::test_values(n, 11, 2.0);
        let feats = Tensor::from_vec(
            feats,
            (1, cfg.num_mel_bins, cfg.input_frames()),
            &Device::Cpu,
        )
        .unwrap();
        let mut plain = m.encode_to_cache(&feats).unwrap();
        let mut screened = m.restart_cache(&plain).unwrap();
        let suppressed = [1u32, 2, 7, 8, 9, 10, 14, 25, 220];
        let plan = Arc::new(ScreenPlan::new(50257, &suppressed));
        assert!(screened.set_screen(Some(plan)));
        let vocab = cfg.vocab_size;
        let mut tok = vec![50258u32, 50259, 50359];
        let mut estimated = 0;
        for step in 0..20 {
            let (a, b) = (
                m.decode(&ids(&tok, 1), &mut plain).unwrap(),
                m.decode(&ids(&tok, 1), &mut screened).unwrap(),
            );
            let last = |t: &Tensor| -> Vec<f32> {
                let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v[v.len() - vocab..].to_vec()
            };
            let (mut a, mut b) = (last(&a), last(&b));
            for r in (50257..vocab).chain(suppressed.iter().map(|&t| t as usize)) {
                assert_eq!(a[r].to_bits(), b[r].to_bits(), "step {step} token {r}");
            }
            estimated += a.iter().zip(&b).filter(|(x, y)| x != y).count();
            for &t in &suppressed {
                a[t as usize] = f32::NEG_INFINITY;
                b[t as usize] = f32::NEG_INFINITY;
            }
            let best = crate::generation::logits::argmax(&a);
            assert_eq!(crate::generation::logits::argmax(&b), best, "step {step}");
            assert_eq!(a[best as usize].to_bits(), b[best as usize].to_bits());
            tok = vec![best];
        }
        assert!(
            estimated > 20 * vocab / 2,
            "only {estimated} logits were estimates"
        );
    }

    /// The CPU encoder against the candle one on the tiny fixtures (an HF folder and a
    /// CTranslate2 one), two inputs in one batch: the same states within f32 rounding.
    #[test]
    fn cpu_encoder_matches_candle_encoder() {
        for name in ["whisper-random", "whisper-random-ct2"] {
            let (cpu, candle) = (load(name, true), load(name, false));
            assert!(matches!(cpu.encoder, Encoder::Cpu(_)));
            assert!(matches!(candle.encoder, Encoder::Candle { .. }));
            let cfg = &cpu.config;
            let n = 2 * cfg.num_mel_bins * cfg.input_frames();
            let feats = crate::kernels::cpu::test_values(n, 5, 2.0);
            let feats = Tensor::from_vec(
                feats,
                (2, cfg.num_mel_bins, cfg.input_frames()),
                &Device::Cpu,
            )
            .unwrap();
            let (a, b) = (
                cpu.encode_features(&feats).unwrap(),
                candle.encode_features(&feats).unwrap(),
            );
            assert_eq!(a.dims(), b.dims());
            let diff = crate::kernels::cpu::max_abs_diff(&a, &b);
            assert!(diff < 1e-4, "{name}: {diff}");
            // Each input its own: the second row alone gives the batch's second row.
            let one = cpu
                .encode_features(&feats.narrow(0, 1, 1).unwrap())
                .unwrap();
            let diff = crate::kernels::cpu::max_abs_diff(&one, &a.narrow(0, 1, 1).unwrap());
            assert!(diff < 1e-5, "{name}: row 1 alone: {diff}");
        }
    }

    /// The CPU decoder against the candle one on the tiny fixtures (an HF folder and a
    /// CTranslate2 one): two encoded inputs, a prompt of three start tokens, then beams (rows
    /// repeated, reordered, fewer of them) for more steps than the self-attention buffers
    /// first hold; a restarted cache (language detection) and the alignment heads' attention
    /// (word timestamps) too.
    #[test]
    fn cpu_decoder_matches_candle_decoder() {
        for name in ["whisper-random", "whisper-random-ct2"] {
            let (cpu, candle) = (load(name, true), load(name, false));
            assert!(matches!(cpu.decoder, Decoder::Cpu(_)));
            assert!(matches!(candle.decoder, Decoder::Candle(_)));
            let cfg = &cpu.config;
            let vocab = cfg.vocab_size as u32;
            let n = 2 * cfg.num_mel_bins * cfg.input_frames();
            let feats = crate::kernels::cpu::test_values(n, 7, 2.0);
            let feats = Tensor::from_vec(
                feats,
                (2, cfg.num_mel_bins, cfg.input_frames()),
                &Device::Cpu,
            )
            .unwrap();
            let mut a = cpu.encode_to_cache(&feats).unwrap();
            let mut b = candle.encode_to_cache(&feats).unwrap();
            assert!(matches!(a, Seq2SeqCache::WhisperCpu(_)));
            let (mut fresh_a, mut fresh_b) = (
                cpu.restart_cache(&a).unwrap(),
                candle.restart_cache(&b).unwrap(),
            );
            let prompt = [50258, 50259, 50359, 50258, 50260, 50359];
            let (la, lb) = (
                cpu.decode(&ids(&prompt, 2), &mut a).unwrap(),
                candle.decode(&ids(&prompt, 2), &mut b).unwrap(),
            );
            assert_eq!(la.dims(), &[2, 3, cfg.vocab_size]);
            let d = crate::models::max_abs_diff(&la, &lb);
            assert!(d < 1e-4, "{name} prompt: {d}");
            let mut rows = 2;
            for step in 0..70u32 {
                let order: Option<&[u32]> = match step {
                    0 => Some(&[0, 0, 0, 1, 1]),
                    5 => Some(&[1, 0, 0, 3, 4]),
                    9 => Some(&[2, 2, 1, 4, 3]),
                    20 => Some(&[4, 0, 3, 0, 1]),
                    40 => Some(&[3, 0, 1]),
                    _ => None,
                };
                if let Some(order) = order {
                    a.select_rows(order).unwrap();
                    b.select_rows(order).unwrap();
                    rows = order.len();
                }
                let toks: Vec<u32> = (0..rows as u32)
                    .map(|r| (step * 131 + r * 17 + 3) % vocab)
                    .collect();
                let (la, lb) = (
                    cpu.decode(&ids(&toks, rows), &mut a).unwrap(),
                    candle.decode(&ids(&toks, rows), &mut b).unwrap(),
                );
                let d = crate::models::max_abs_diff(&la, &lb);
                assert!(d < 1e-4, "{name} step {step}: {d}");
            }
            assert_eq!((a.seq_len(), b.seq_len()), (73, 73));
            // The restarted caches still decode from position 0 over both inputs.
            let start = [50258, 50258];
            let (la, lb) = (
                cpu.decode(&ids(&start, 2), &mut fresh_a).unwrap(),
                candle.decode(&ids(&start, 2), &mut fresh_b).unwrap(),
            );
            let d = crate::models::max_abs_diff(&la, &lb);
            assert!(d < 1e-4, "{name} restarted: {d}");
            // Alignment heads of the second input.
            let fresh_a = cpu.restart_cache(&fresh_a).unwrap();
            let fresh_b = candle.restart_cache(&fresh_b).unwrap();
            let seq: Vec<u32> = (0..9).map(|i| (50258 + i * 977) % vocab).collect();
            let heads = [(1, 0), (0, 2), (1, 3)];
            let pa = cpu.alignment_attention(&seq, &fresh_a, 1, &heads).unwrap();
            let pb = candle
                .alignment_attention(&seq, &fresh_b, 1, &heads)
                .unwrap();
            assert_eq!(pa.len(), 3);
            for (h, (x, y)) in pa.iter().zip(&pb).enumerate() {
                assert_eq!((x.len(), y.len()), (9, 9), "{name} head {h}");
                for (rx, ry) in x.iter().zip(y) {
                    assert_eq!(rx.len(), ry.len());
                    let d = rx
                        .iter()
                        .zip(ry)
                        .map(|(p, q)| (p - q).abs())
                        .fold(0f32, f32::max);
                    assert!(d < 1e-5, "{name} alignment head {h}: {d}");
                }
            }
            // Bad requests are errors, not panics.
            assert!(cpu.alignment_attention(&seq, &fresh_a, 2, &heads).is_err());
            assert!(cpu
                .alignment_attention(&seq, &fresh_a, 0, &[(9, 0)])
                .is_err());
            assert!(cpu
                .decode(
                    &ids(&[vocab, vocab], 2),
                    &mut cpu.restart_cache(&fresh_a).unwrap()
                )
                .is_err());
            assert!(cpu.decode(&ids(&[1, 2], 2), &mut a).is_err());
        }
    }
}
