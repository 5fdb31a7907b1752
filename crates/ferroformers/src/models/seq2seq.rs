//! What encoder-decoder language models share: the [`Seq2SeqLm`] trait (BART, Marian, T5), the
//! decoder cache with the encoder's cross-attention keys/values and padding mask,
//! [`Seq2SeqSession`] (the [`StepModel`] the search loop drives), and `load_seq2seq`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::bart::{BartConfig, BartForConditionalGeneration, DecoderCache};
use super::layers::attention_bias;
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generation::search::{generate, Generated, Hooks, StepModel};
use crate::generation::GenerationConfig;
use crate::weights::Weights;

/// The decoder's state between steps.
pub enum Seq2SeqCache {
    /// candle tensors: self-attention keys/values, the cross-attention keys/values of the
    /// encoder output, and the encoder padding bias `[rows, 1, 1, src]`.
    Tensors {
        dec: DecoderCache,
        cross_bias: Tensor,
    },
    /// Plain buffers of T5's CPU path.
    T5Cpu(Box<super::t5::cpu::DecoderState>),
    /// Plain buffers of Whisper's CPU decoder.
    WhisperCpu(Box<super::whisper::cpu::DecoderState>),
}

impl Seq2SeqCache {
    pub fn tensors(dec: DecoderCache, cross_bias: Tensor) -> Self {
        Self::Tensors { dec, cross_bias }
    }

    /// Tokens the decoder has already seen.
    pub fn seq_len(&self) -> usize {
        match self {
            Self::Tensors { dec, .. } => dec.self_kv.seq_len(),
            Self::T5Cpu(st) => st.seq_len(),
            Self::WhisperCpu(st) => st.seq_len(),
        }
    }

    /// Keep rows (beams, samples): row `i` becomes old row `rows[i]`.
    pub fn select_rows(&mut self, rows: &[u32]) -> candle_core::Result<()> {
        match self {
            Self::Tensors { dec, cross_bias } => {
                dec.select_rows(rows)?;
                let idx = Tensor::new(rows, cross_bias.device())?;
                *cross_bias = cross_bias.index_select(&idx, 0)?;
                Ok(())
            }
            Self::T5Cpu(st) => {
                let rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
                st.select_rows(&rows)
            }
            Self::WhisperCpu(st) => {
                let rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
                st.select_rows(&rows)
            }
        }
    }

    /// Screen the output projection from here on ([`crate::kernels::cpu::screen`]): only
    /// the argmax-deciding logits exact. Whisper's CPU decoder takes it; other caches ignore
    /// it. Returns whether it was taken.
    pub fn set_screen(
        &mut self,
        plan: Option<std::sync::Arc<crate::kernels::cpu::screen::ScreenPlan>>,
    ) -> bool {
        match self {
            Self::WhisperCpu(st) => {
                st.screen = plan;
                true
            }
            _ => false,
        }
    }

    /// The tensor form, or an error for a cache made by another model's fast path.
    pub fn as_tensors(&mut self) -> candle_core::Result<(&mut DecoderCache, &Tensor)> {
        match self {
            Self::Tensors { dec, cross_bias } => Ok((dec, cross_bias)),
            Self::T5Cpu(_) => candle_core::bail!("this decoder cache belongs to T5's CPU path"),
            Self::WhisperCpu(_) => {
                candle_core::bail!("this decoder cache belongs to Whisper's CPU decoder")
            }
        }
    }
}

/// An encoder-decoder language model (`*ForConditionalGeneration`).
pub trait Seq2SeqLm: Send + Sync {
    /// Encoder states `[b, s, d]` of `ids` `[b, s]` (u32) with their 0/1 padding `mask` `[b, s]`.
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor>;

    /// An empty decoder cache over `encoder_hidden` and its padding `mask`.
    fn new_cache(
        &self,
        encoder_hidden: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Seq2SeqCache>;

    /// f32 logits `[b, s, vocab]` of decoder tokens `ids` `[b, s]` following the cached ones.
    fn decode(&self, ids: &Tensor, cache: &mut Seq2SeqCache) -> candle_core::Result<Tensor>;

    /// The model's own first decoder token (`config.decoder_start_token_id`).
    fn decoder_start_token_id(&self) -> u32;

    /// The longest encoder input the positions allow (`None`: relative positions, no limit).
    fn max_positions(&self) -> Option<usize>;

    /// The longest decoder sequence the positions allow.
    fn max_decoder_positions(&self) -> Option<usize> {
        self.max_positions()
    }

    fn device(&self) -> &Device;
}

/// Causal self-attention bias `[1, 1, s, past + s]` for `s` new decoder tokens after `past`.
pub fn causal_bias(
    s: usize,
    past: usize,
    device: &Device,
    dtype: DType,
) -> candle_core::Result<Tensor> {
    let t = past + s;
    let data: Vec<f32> = (0..s)
        .flat_map(|i| (0..t).map(move |j| if j <= past + i { 0.0 } else { f32::MIN }))
        .collect();
    Tensor::from_vec(data, (1, 1, s, t), device)?.to_dtype(dtype)
}

/// The cross-attention bias of a 0/1 encoder mask, in `dtype`.
pub fn cross_bias(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    attention_bias(mask, dtype)
}

impl Seq2SeqLm for BartForConditionalGeneration {
    fn encode(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.model.encode(ids, mask)
    }

    fn new_cache(
        &self,
        encoder_hidden: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Seq2SeqCache> {
        Ok(Seq2SeqCache::tensors(
            self.model.new_cache(encoder_hidden)?,
            cross_bias(mask, encoder_hidden.dtype())?,
        ))
    }

    fn decode(&self, ids: &Tensor, cache: &mut Seq2SeqCache) -> candle_core::Result<Tensor> {
        let s = ids.dim(1)?;
        let past = cache.seq_len();
        let (dec, cross_bias) = cache.as_tensors()?;
        let self_bias = causal_bias(s, past, ids.device(), cross_bias.dtype())?;
        let hidden = self.model.decode(ids, dec, &self_bias, cross_bias)?;
        self.logits(&hidden)?.to_dtype(DType::F32)
    }

    fn decoder_start_token_id(&self) -> u32 {
        let c = &self.model.config;
        c.decoder_start_token_id
            .or(if c.model_type == "marian" {
                c.pad_token_id
            } else {
                c.eos_token_id
            })
            .unwrap_or(2)
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.model.config.max_position_embeddings)
    }

    fn device(&self) -> &Device {
        self.model.shared_embeddings().device()
    }
}

pub const SEQ2SEQ_TYPES: &[&str] = &["bart", "marian", "t5"];

/// Load a `*ForConditionalGeneration` model from a folder.
pub fn load_seq2seq(
    dir: &Path,
    config: &ModelConfig,
    device: &Device,
    dtype: DType,
    task: &str,
) -> Result<Box<dyn Seq2SeqLm>> {
    let model_type = config.model_type.as_str();
    if !SEQ2SEQ_TYPES.contains(&model_type) {
        return Err(Error::UnsupportedModel {
            model_type: model_type.to_string(),
            task: task.to_string(),
            supported: SEQ2SEQ_TYPES.join(", "),
        });
    }
    let weights = Weights::from_dir(dir)?;
    let path = weights.path().to_path_buf();
    let vb = weights.into_var_builder(dtype, device);
    let wrap = |e: candle_core::Error| Error::Weights {
        path: path.clone(),
        detail: e.to_string(),
    };
    let model: Box<dyn Seq2SeqLm> = match model_type {
        "bart" | "marian" => {
            let cfg: BartConfig = config.parse_checked()?;
            Box::new(BartForConditionalGeneration::load(&cfg, vb).map_err(wrap)?)
        }
        "t5" => {
            let cfg: super::t5::T5Config = config.parse_checked()?;
            Box::new(super::t5::T5ForConditionalGeneration::load(&cfg, vb).map_err(wrap)?)
        }
        _ => unreachable!("checked against SEQ2SEQ_TYPES"),
    };
    Ok(model)
}

/// Right-pad encoder inputs with `pad_id` (as HF's tokenizers pad T5, BART and Marian).
pub fn right_pad(inputs: &[Vec<u32>], pad_id: u32) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let len = inputs.iter().map(Vec::len).max().unwrap_or(0);
    inputs
        .iter()
        .map(|p| {
            let pad = len - p.len();
            let mut row = p.clone();
            row.extend(std::iter::repeat_n(pad_id, pad));
            let mut m = vec![1u8; p.len()];
            m.extend(std::iter::repeat_n(0u8, pad));
            (row, m)
        })
        .unzip()
}

/// [`StepModel`] for an encoder-decoder: the encoder runs once when the session is made; the
/// first step runs the decoder on each row's start tokens (one token, or Whisper's prompt of
/// special tokens), later steps one token per row.
pub struct Seq2SeqSession<'m> {
    model: &'m dyn Seq2SeqLm,
    cache: Seq2SeqCache,
    /// Decoder start tokens (rows of one length), consumed by the first step.
    start: Option<Vec<Vec<u32>>>,
    rows: usize,
}

impl<'m> Seq2SeqSession<'m> {
    /// Encode padded `rows` with their 0/1 `mask`; the decoder starts from `start` on every row.
    pub fn new(
        model: &'m dyn Seq2SeqLm,
        rows: &[Vec<u32>],
        mask: &[Vec<u8>],
        start: u32,
    ) -> Result<Self> {
        let b = rows.len();
        let s = rows.first().map_or(0, Vec::len);
        if b == 0 || s == 0 {
            return Err(Error::param("inputs", "the input is empty"));
        }
        if let Some(max) = model.max_positions() {
            if s > max {
                return Err(Error::param(
                    "inputs",
                    format!("the input is {s} tokens, more than the model's {max} positions"),
                ));
            }
        }
        let dev = model.device();
        let ids = Tensor::from_vec(rows.concat(), (b, s), dev)?;
        let m: Vec<u32> = mask.iter().flatten().map(|&x| x as u32).collect();
        let m = Tensor::from_vec(m, (b, s), dev)?;
        let hidden = model.encode(&ids, &m)?;
        let cache = model.new_cache(&hidden, &m)?;
        Ok(Self::with_cache(model, cache, vec![vec![start]; b]))
    }

    /// A session over an already encoded input (`cache` holds one row per start row); the
    /// first step runs the `start` rows (all of one length).
    pub fn with_cache(model: &'m dyn Seq2SeqLm, cache: Seq2SeqCache, start: Vec<Vec<u32>>) -> Self {
        Self {
            model,
            cache,
            rows: start.len(),
            start: Some(start),
        }
    }

    /// Logits of the last position after `tokens` (`width` per row, rows concatenated).
    fn run(&mut self, tokens: &[u32], width: usize) -> Result<Vec<Vec<f32>>> {
        let b = tokens.len() / width.max(1);
        if b != self.rows || b * width != tokens.len() {
            return Err(Error::param("inputs", "one new token per row expected"));
        }
        if let Some(max) = self.model.max_decoder_positions() {
            if self.cache.seq_len() + width > max {
                return Err(Error::param(
                    "max_new_tokens",
                    format!(
                        "generation would run past the decoder's {max} positions; lower \
                         max_new_tokens or max_length"
                    ),
                ));
            }
        }
        let ids = Tensor::from_vec(tokens.to_vec(), (b, width), self.model.device())?;
        let logits = self.model.decode(&ids, &mut self.cache)?;
        Ok(logits.narrow(1, width - 1, 1)?.squeeze(1)?.to_vec2()?)
    }
}

impl StepModel for Seq2SeqSession<'_> {
    fn step(&mut self, new_tokens: Option<&[u32]>) -> Result<Vec<Vec<f32>>> {
        match new_tokens {
            None => {
                let start = self
                    .start
                    .take()
                    .ok_or_else(|| Error::param("inputs", "the decoder was already started"))?;
                let width = start.first().map_or(1, Vec::len);
                self.run(&start.concat(), width)
            }
            Some(t) => self.run(t, 1),
        }
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        self.cache.select_rows(&idx)?;
        if let Some(s) = &self.start {
            self.start = Some(rows.iter().map(|&r| s[r].clone()).collect());
        }
        self.rows = rows.len();
        Ok(())
    }
}

/// The decoder start token of a call: the config's, else its `bos_token_id` (HF's
/// `_get_decoder_start_token_id`), else the model's.
pub fn decoder_start(model: &dyn Seq2SeqLm, cfg: &GenerationConfig) -> u32 {
    cfg.decoder_start_token_id
        .or(cfg.bos_token_id)
        .unwrap_or_else(|| model.decoder_start_token_id())
}

/// Generate from tokenized encoder inputs (right-padded together with `pad_id`). Sequences
/// are the new tokens only (the decoder start token is not included).
pub fn generate_seq2seq(
    model: &dyn Seq2SeqLm,
    inputs: &[Vec<u32>],
    pad_id: u32,
    cfg: &GenerationConfig,
    hooks: &mut Hooks,
) -> Result<Generated> {
    if inputs.is_empty() {
        return Ok(Generated {
            sequences: Vec::new(),
            scores: None,
        });
    }
    if let Some(i) = inputs.iter().position(Vec::is_empty) {
        return Err(Error::input(i, "the input has no tokens"));
    }
    let (rows, mask) = right_pad(inputs, pad_id);
    let start = decoder_start(model, cfg);
    let mut session = Seq2SeqSession::new(model, &rows, &mask, start)?;
    let prompts = vec![vec![start]; inputs.len()];
    generate(&mut session, &prompts, cfg, hooks)
}
