//! `automatic-speech-recognition` with Whisper, as HF's `AutomaticSpeechRecognitionPipeline`
//! and `WhisperGenerationMixin.generate` (4.57) do it for audio of up to 30 s, or longer audio
//! cut into overlapping chunks (`chunk_length_s`, `stride_length_s`).
//!
//! - Inputs: a path to an audio file (WAV, FLAC, MP3, OGG/Vorbis), the file's bytes, or a
//!   waveform `{"raw" | "array": [...], "sampling_rate": N}` (resampled to 16 kHz as
//!   torchaudio does).
//! - The decoder starts from Whisper's special tokens: `<|startoftranscript|>`, the language
//!   (given, or detected from the first step's most likely language token), the task
//!   (`transcribe` or `translate`), and `<|notimestamps|>` unless timestamps are asked for.
//! - `suppress_tokens` and `begin_suppress_tokens` from the generation config; with
//!   `return_timestamps=True`, the timestamp rules (`WhisperTimeStampLogitsProcessor`).
//! - Output `{"text"}`, with `chunks: [{"timestamp": [start, end], "text"}]` for timestamps,
//!   merged across chunks by `_decode_asr`'s rules (ported below).
//!
//! Weights: HF's `WhisperForConditionalGeneration` folders, or faster-whisper (CTranslate2)
//! folders read directly; their generation settings come from the CTranslate2 `config.json`
//! and the tokenizer's special tokens.
//!
//! CTC models (wav2vec2) run in `automatic_speech_recognition_ctc.rs`; [`load_task`] picks the
//! one a model folder needs. Both share the audio inputs ([`waveform`]) and the chunking
//! ([`chunk_sizes`], [`chunk_spans`]).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use super::whisper_languages::{code_of, name_of};
use super::whisper_words;
use super::{param, Input, Output, Params, PipelineOptions, Task};
use crate::audio::{decode_bytes, decode_file, resample, Audio, WhisperFeatureExtractor};
use crate::config::{read_json, ModelConfig};
use crate::error::{Error, Result};
use crate::generation::config::GENERATION_PARAMS;
use crate::generation::logits::TimestampRules;
use crate::generation::search::{generate, Hooks};
use crate::generation::GenerationConfig;
use crate::kernels::cpu::screen::ScreenPlan;
use crate::models::seq2seq::{Seq2SeqCache, Seq2SeqLm, Seq2SeqSession};
use crate::models::whisper::{
    is_ct2_dir, load_ct2, WhisperConfig, WhisperForConditionalGeneration,
};
use crate::tokenizer::Tokenizer;
use crate::weights::Weights;

const OWN_PARAMS: &[&str] = &[
    "return_timestamps",
    "return_language",
    "chunk_length_s",
    "stride_length_s",
    "generate_kwargs",
    "ignore_warning",
    "language",
    "task",
    "return_window_stats",
];

fn accepted_params() -> &'static [&'static str] {
    static LIST: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        let mut v: Vec<&'static str> = OWN_PARAMS.to_vec();
        v.extend_from_slice(GENERATION_PARAMS);
        v
    })
}

/// What Whisper's generation config says beyond HF's generic fields.
#[derive(Debug, Clone)]
struct Protocol {
    decoder_start: u32,
    eos: u32,
    no_timestamps: u32,
    /// `(code, token id)`: `("en", 50259)`.
    lang_to_id: Vec<(String, u32)>,
    transcribe: Option<u32>,
    translate: Option<u32>,
    is_multilingual: bool,
    /// `forced_decoder_ids` from position 1 on (`None`: to be detected).
    forced: Vec<Option<u32>>,
    max_initial_timestamp_index: Option<usize>,
    return_timestamps: bool,
    /// `tokenizer.all_special_ids`: dropped from the text.
    special_ids: HashSet<u32>,
    /// `alignment_heads` `(layer, head)` for word timestamps (`None`: the config has none).
    alignment_heads: Option<Vec<(usize, usize)>>,
    /// `<|startofprev|>`: starts the previous text a window is conditioned on.
    prev_sot: Option<u32>,
    /// The long-form settings a generation config may carry (`generate`'s defaults for
    /// `condition_on_prev_tokens` and the fallback thresholds).
    condition_on_prev_tokens: bool,
    compression_ratio_threshold: Option<f64>,
    logprob_threshold: Option<f64>,
    no_speech_threshold: Option<f64>,
}

/// `alignment_heads` of a generation config (HF) or CTranslate2 config: `[[layer, head], ...]`.
fn alignment_heads(g: &Value) -> Option<Vec<(usize, usize)>> {
    g.get("alignment_heads")?
        .as_array()?
        .iter()
        .map(|p| {
            let p = p.as_array()?;
            Some((p.first()?.as_u64()? as usize, p.get(1)?.as_u64()? as usize))
        })
        .collect()
}

impl Protocol {
    /// From an HF `generation_config.json`.
    fn from_hf(g: &Value, tokenizer: &Tokenizer, gen: &GenerationConfig) -> Self {
        let id = |k: &str| g.get(k).and_then(Value::as_u64).map(|v| v as u32);
        let lang_to_id = g
            .get("lang_to_id")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(tok, v)| {
                        let code = tok.trim_start_matches("<|").trim_end_matches("|>");
                        Some((code.to_string(), v.as_u64()? as u32))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let tasks = g.get("task_to_id");
        let task = |t: &str| {
            tasks
                .and_then(|m| m.get(t))
                .and_then(Value::as_u64)
                .map(|v| v as u32)
        };
        let forced = g
            .get("forced_decoder_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|p| {
                        let p = p.as_array()?;
                        Some((p.first()?.as_u64()?, p.get(1)?.as_u64().map(|v| v as u32)))
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        // Only a run of positions 1, 2, ... is Whisper's prompt pattern.
        let forced = forced
            .iter()
            .enumerate()
            .take_while(|(i, (pos, _))| *pos == *i as u64 + 1)
            .map(|(_, (_, t))| *t)
            .collect();
        let eos = gen.eos_token_id.first().copied().unwrap_or(50257);
        Self {
            decoder_start: gen.decoder_start_token_id.unwrap_or(50258),
            eos,
            no_timestamps: id("no_timestamps_token_id")
                .or_else(|| tokenizer.token_to_id("<|notimestamps|>"))
                .unwrap_or(50363),
            lang_to_id,
            transcribe: task("transcribe"),
            translate: task("translate"),
            is_multilingual: g
                .get("is_multilingual")
                .and_then(Value::as_bool)
                .unwrap_or(true),
            forced,
            max_initial_timestamp_index: g
                .get("max_initial_timestamp_index")
                .and_then(Value::as_u64)
                .map(|v| v as usize),
            return_timestamps: g
                .get("return_timestamps")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            special_ids: special_ids(tokenizer),
            alignment_heads: alignment_heads(g),
            prev_sot: id("prev_sot_token_id").or_else(|| tokenizer.token_to_id("<|startofprev|>")),
            condition_on_prev_tokens: g
                .get("condition_on_prev_tokens")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            compression_ratio_threshold: g
                .get("compression_ratio_threshold")
                .and_then(Value::as_f64),
            logprob_threshold: g.get("logprob_threshold").and_then(Value::as_f64),
            no_speech_threshold: g.get("no_speech_threshold").and_then(Value::as_f64),
        }
    }

    /// For a faster-whisper folder: the settings openai/whisper-* generation configs hold, from
    /// the tokenizer's special tokens and the CTranslate2 `config.json` (languages, suppressed
    /// tokens).
    fn from_ct2(
        ct2: &Value,
        tokenizer: &Tokenizer,
        vocab_size: usize,
        path: &Path,
    ) -> Result<(Self, GenerationConfig)> {
        let tok = |t: &str| {
            tokenizer.token_to_id(t).ok_or_else(|| {
                Error::invalid_file(
                    path,
                    format!("the tokenizer has no `{t}` token: not a Whisper tokenizer"),
                )
            })
        };
        let ids = |k: &str| -> Vec<u32> {
            ct2.get(k)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64().map(|v| v as u32))
                        .collect()
                })
                .unwrap_or_default()
        };
        let is_multilingual = vocab_size >= 51865;
        let sot = tok("<|startoftranscript|>")?;
        let eos = tok("<|endoftext|>")?;
        let no_timestamps = tok("<|notimestamps|>")?;
        let lang_to_id = if is_multilingual {
            ids("lang_ids")
                .into_iter()
                .filter_map(|id| {
                    let t = tokenizer.id_to_token(id)?;
                    let code = t.strip_prefix("<|")?.strip_suffix("|>")?.to_string();
                    Some((code, id))
                })
                .collect()
        } else {
            Vec::new()
        };
        let transcribe = tokenizer.token_to_id("<|transcribe|>");
        let forced = if is_multilingual {
            vec![None, transcribe]
        } else {
            vec![Some(no_timestamps)]
        };
        let protocol = Self {
            decoder_start: sot,
            eos,
            no_timestamps,
            lang_to_id,
            transcribe,
            translate: tokenizer.token_to_id("<|translate|>"),
            is_multilingual,
            forced,
            max_initial_timestamp_index: Some(50),
            return_timestamps: false,
            special_ids: special_ids(tokenizer),
            alignment_heads: alignment_heads(ct2),
            prev_sot: tokenizer.token_to_id("<|startofprev|>"),
            condition_on_prev_tokens: false,
            compression_ratio_threshold: None,
            logprob_threshold: None,
            no_speech_threshold: None,
        };
        let gen = GenerationConfig {
            max_length: 448,
            eos_token_id: vec![eos],
            pad_token_id: Some(eos),
            bos_token_id: Some(eos),
            decoder_start_token_id: Some(sot),
            suppress_tokens: ids("suppress_ids"),
            begin_suppress_tokens: ids("suppress_ids_begin"),
            ..GenerationConfig::default()
        };
        Ok((protocol, gen))
    }

    fn language_id(&self, language: &str) -> Result<u32> {
        let code = code_of(language).ok_or_else(|| {
            Error::param(
                "language",
                format!(
                    "unsupported language `{language}`: give a code (`en`) or a name (`english`)"
                ),
            )
        })?;
        self.lang_to_id
            .iter()
            .find(|(c, _)| c == code)
            .map(|(_, id)| *id)
            .ok_or_else(|| {
                Error::param(
                    "language",
                    format!("<|{code}|> is not a language this model knows"),
                )
            })
    }
}

/// Every special token of the tokenizer (added tokens marked special).
fn special_ids(tokenizer: &Tokenizer) -> HashSet<u32> {
    tokenizer
        .inner()
        .get_added_tokens_decoder()
        .iter()
        .filter(|(_, t)| t.special)
        .map(|(id, _)| *id)
        .collect()
}

/// What one call asks of generation.
#[derive(Debug, Clone)]
struct CallOptions {
    language: Option<String>,
    task: Option<String>,
    timestamps: bool,
    /// `return_timestamps="word"` (implies `timestamps`).
    words: bool,
    return_language: bool,
    generation: GenerationConfig,
    /// `temperature`: one value, or the fallback list (`(0.0, 0.2, ...)`): each window is
    /// decoded at the first, and again at the next while a threshold says it failed. A
    /// temperature above 0 samples (one beam), 0 or none decodes greedily or by beams, as
    /// Whisper's fallback loop sets `do_sample` from it.
    temperatures: Vec<Option<f32>>,
    /// `prompt_ids` (`<|startofprev|>` and the prompt's tokens, as `get_prompt_ids` makes them).
    prompt_ids: Option<Vec<u32>>,
    /// `prompt_condition_type="all-segments"` (else `first-segment`).
    prompt_all_segments: bool,
    condition_on_prev_tokens: bool,
    compression_ratio_threshold: Option<f64>,
    logprob_threshold: Option<f64>,
    no_speech_threshold: Option<f64>,
    /// `return_window_stats` (ours, not HF's): what OpenAI's `verbose_json` segments carry.
    window_stats: bool,
}

/// A piece's tokens, with word timestamps each token's time in seconds, and with
/// `return_window_stats` one object per 30 s window decoded.
type PieceTokens = (Vec<u32>, Option<Vec<f32>>, Vec<Value>);

/// One piece of audio the model sees: a whole input, or a chunk of one.
struct Piece {
    input: usize,
    samples: Vec<f32>,
    /// `(chunk samples, left stride, right stride)` of a chunk.
    stride: Option<(usize, usize, usize)>,
}

pub struct SpeechRecognition {
    pub model: WhisperForConditionalGeneration,
    pub tokenizer: Tokenizer,
    pub extractor: WhisperFeatureExtractor,
    /// The model's generation config (`model.generate`'s defaults).
    pub model_generation_config: GenerationConfig,
    /// The pipeline's: its defaults (`num_beams=5`, as OpenAI's Whisper decodes) where the
    /// model keeps the global ones.
    pub generation_config: GenerationConfig,
    protocol: Protocol,
    /// `config.median_filter_width` (word timestamps), 7 when absent.
    median_filter_width: usize,
    device: Device,
}

/// The model's folder (local, cached or downloaded); a single file is refused.
pub(crate) fn model_folder(opts: &PipelineOptions, model: &str) -> Result<std::path::PathBuf> {
    let dir = crate::hub::resolve_or_download(model, opts.revision.as_deref())?;
    if !dir.is_dir() {
        return Err(Error::InvalidFile {
            path: dir,
            detail: "expected a model folder".into(),
        });
    }
    Ok(dir)
}

impl SpeechRecognition {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        let dir = model_folder(opts, model)?;
        if opts.quantize.is_some() {
            return Err(Error::param(
                "quantize",
                "int8 quantization is for encoder models; Whisper runs in f32 or the --dtype given",
            ));
        }
        let tok_dir = match &opts.tokenizer {
            Some(t) => crate::hub::resolve_or_download(t, opts.revision.as_deref())?,
            None => dir.clone(),
        };
        let tokenizer = Tokenizer::from_dir(&tok_dir, "whisper", Some(448))?;
        let (config, weights, protocol, generation_config) = if is_ct2_dir(&dir) {
            let bin = dir.join("model.bin");
            let (raw, weights) = load_ct2(&bin)?;
            let config = ModelConfig::from_value(raw, dir.join("config.json"))?;
            let cfg: WhisperConfig = config.parse()?;
            let ct2_path = dir.join("config.json");
            let ct2 = if ct2_path.is_file() {
                read_json(&ct2_path)?
            } else {
                Value::Object(Map::new())
            };
            let (protocol, gen) = Protocol::from_ct2(&ct2, &tokenizer, cfg.vocab_size, &ct2_path)?;
            (cfg, weights, protocol, gen)
        } else {
            let config = ModelConfig::from_dir(&dir)?;
            if config.model_type != "whisper" {
                return Err(Error::UnsupportedModel {
                    model_type: config.model_type.clone(),
                    task: "automatic-speech-recognition".into(),
                    supported: "whisper (HF or faster-whisper folders); wav2vec2 runs through \
                                CtcSpeechRecognition"
                        .into(),
                });
            }
            let cfg: WhisperConfig = config.parse()?;
            let gen = GenerationConfig::from_model_dir(&dir)?;
            let gpath = dir.join("generation_config.json");
            let graw = if gpath.is_file() {
                read_json(&gpath)?
            } else {
                config.raw.clone()
            };
            let protocol = Protocol::from_hf(&graw, &tokenizer, &gen);
            (cfg, Weights::from_dir(&dir)?, protocol, gen)
        };
        let path: PathBuf = weights.path().to_path_buf();
        let vb = weights.into_var_builder(opts.dtype, &opts.device);
        let model =
            WhisperForConditionalGeneration::load(&config, vb).map_err(|e| Error::Weights {
                path,
                detail: e.to_string(),
            })?;
        let pre = dir.join("preprocessor_config.json");
        let extractor = if pre.is_file() {
            WhisperFeatureExtractor::from_preprocessor_config(&pre)?
        } else {
            WhisperFeatureExtractor::new(config.num_mel_bins)
        };
        if extractor.feature_size != config.num_mel_bins {
            return Err(Error::invalid_file(
                &pre,
                format!(
                    "feature_size {} but the model takes {} mel bins",
                    extractor.feature_size, config.num_mel_bins
                ),
            ));
        }
        let median_filter_width = read_json(&dir.join("config.json"))
            .ok()
            .and_then(|c| c.get("median_filter_width")?.as_u64())
            .unwrap_or(7) as usize;
        Ok(Self {
            model,
            tokenizer,
            extractor,
            median_filter_width,
            generation_config: pipeline_generation_config(&generation_config),
            model_generation_config: generation_config,
            protocol,
            device: opts.device.clone(),
        })
    }

    /// The 16 kHz mono waveform of an input.
    fn waveform(&self, input: &Input, index: usize) -> Result<Vec<f32>> {
        waveform(input, index, self.extractor.sampling_rate)
    }

    /// What `model.generate(input_features, **kwargs)` returns for 16 kHz waveforms of up to
    /// 30 s: the new tokens of each (no start tokens, no end of text), with the model's own
    /// generation config (greedy unless it says otherwise). `kwargs` are generate's
    /// (`language`, `task`, `return_timestamps`, `num_beams`, ...).
    pub fn generate_tokens(&self, waves: &[Vec<f32>], kwargs: &Params) -> Result<Vec<Vec<u32>>> {
        let mut params = Params::new();
        params.insert("generate_kwargs".into(), Value::Object(kwargs.clone()));
        if let Some(t) = kwargs.get("return_timestamps") {
            params.insert("return_timestamps".into(), t.clone());
            if let Some(Value::Object(g)) = params.get_mut("generate_kwargs") {
                g.remove("return_timestamps");
            }
        }
        let opts = self.options(&params, &self.model_generation_config)?;
        let pieces = self.pieces(waves.to_vec(), &Params::new(), opts.timestamps)?;
        let refs: Vec<&Piece> = pieces.iter().collect();
        Ok(self
            .transcribe_batch(&refs, &opts)?
            .into_iter()
            .map(|(t, _, _)| t)
            .collect())
    }

    /// The language `detect_language` picks for each 16 kHz waveform (`en`, `fr`, ...).
    pub fn detect_languages(&self, waves: &[Vec<f32>]) -> Result<Vec<u32>> {
        let pieces = self.pieces(waves.to_vec(), &Params::new(), true)?;
        let cache = self.encode(&pieces.iter().collect::<Vec<_>>())?;
        self.detect_language(&cache, pieces.len())
    }

    fn call_options(&self, params: &Params) -> Result<CallOptions> {
        self.options(params, &self.generation_config)
    }

    fn options(&self, params: &Params, base: &GenerationConfig) -> Result<CallOptions> {
        let mut generate_kwargs = Map::new();
        for (k, v) in params {
            if GENERATION_PARAMS.contains(&k.as_str()) || k == "language" || k == "task" {
                generate_kwargs.insert(k.clone(), v.clone());
            }
        }
        match params.get("generate_kwargs") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    generate_kwargs.insert(k.clone(), v.clone());
                }
            }
            Some(v) => {
                return Err(Error::param(
                    "generate_kwargs",
                    format!("expected an object, got {v}"),
                ))
            }
        }
        let language = match generate_kwargs.remove("language") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s),
            Some(v) => {
                return Err(Error::param(
                    "language",
                    format!("expected a string, got {v}"),
                ))
            }
        };
        let task = match generate_kwargs.remove("task") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "transcribe" || s == "translate" => Some(s),
            Some(v) => {
                return Err(Error::param(
                    "task",
                    format!("expected \"transcribe\" or \"translate\", got {v}"),
                ))
            }
        };
        if !self.protocol.is_multilingual && (language.is_some() || task.is_some()) {
            return Err(Error::param(
                if language.is_some() {
                    "language"
                } else {
                    "task"
                },
                "cannot specify `task` or `language` for an English-only model",
            ));
        }
        let temperature_of = |v: &Value| -> Result<f32> {
            v.as_f64()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .map(|t| t as f32)
                .ok_or_else(|| {
                    Error::param(
                        "temperature",
                        format!("expected a number >= 0 or a list of them, got {v}"),
                    )
                })
        };
        let temperatures = match generate_kwargs.remove("temperature") {
            None | Some(Value::Null) => vec![None],
            Some(Value::Array(a)) if !a.is_empty() => a
                .iter()
                .map(|t| temperature_of(t).map(Some))
                .collect::<Result<_>>()?,
            Some(v) => vec![Some(temperature_of(&v)?)],
        };
        let prompt_ids = match generate_kwargs.remove("prompt_ids") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) => {
                let vocab = self.model.config.vocab_size as u64;
                let ids = a
                    .iter()
                    .map(|v| v.as_u64().filter(|&t| t < vocab).map(|t| t as u32))
                    .collect::<Option<Vec<u32>>>()
                    .ok_or_else(|| {
                        Error::param(
                            "prompt_ids",
                            format!("expected token ids below the vocabulary size {vocab}"),
                        )
                    })?;
                Some(ids)
            }
            Some(v) => {
                return Err(Error::param(
                    "prompt_ids",
                    format!("expected a list of token ids, got {v}"),
                ))
            }
        };
        let prompt_all_segments = match generate_kwargs.remove("prompt_condition_type") {
            None | Some(Value::Null) => false,
            Some(Value::String(s)) if s == "first-segment" => false,
            Some(Value::String(s)) if s == "all-segments" => true,
            Some(v) => {
                return Err(Error::param(
                    "prompt_condition_type",
                    format!("`{v}` does not exist: expected \"first-segment\" or \"all-segments\""),
                ))
            }
        };
        let condition_on_prev_tokens = match generate_kwargs.remove("condition_on_prev_tokens") {
            None | Some(Value::Null) => self.protocol.condition_on_prev_tokens,
            Some(Value::Bool(b)) => b,
            Some(v) => {
                return Err(Error::param(
                    "condition_on_prev_tokens",
                    format!("expected true or false, got {v}"),
                ))
            }
        };
        if prompt_all_segments && !condition_on_prev_tokens {
            return Err(Error::param(
                "prompt_condition_type",
                "set `condition_on_prev_tokens=True` when setting \
                 `prompt_condition_type='all-segments'`",
            ));
        }
        let mut threshold = |name: &str, default: Option<f64>| -> Result<Option<f64>> {
            match generate_kwargs.remove(name) {
                None => Ok(default),
                Some(Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|x| x.is_finite())
                    .map(Some)
                    .ok_or_else(|| Error::param(name, format!("expected a number, got {v}"))),
            }
        };
        let compression_ratio_threshold = threshold(
            "compression_ratio_threshold",
            self.protocol.compression_ratio_threshold,
        )?;
        let logprob_threshold = threshold("logprob_threshold", self.protocol.logprob_threshold)?;
        let no_speech_threshold =
            threshold("no_speech_threshold", self.protocol.no_speech_threshold)?;
        if no_speech_threshold.is_some() && logprob_threshold.is_none() {
            return Err(Error::param(
                "no_speech_threshold",
                "needs `logprob_threshold` too: a window is skipped as silence when its \
                 no-speech probability is above the one and its average log-probability below \
                 the other",
            ));
        }
        // Whisper decides sampling from the temperature alone.
        generate_kwargs.remove("do_sample");
        for k in generate_kwargs.keys() {
            if !GENERATION_PARAMS.contains(&k.as_str()) {
                return Err(Error::param(
                    "generate_kwargs",
                    format!("unknown generation parameter `{k}`"),
                ));
            }
        }
        let mut generation = base.clone();
        generation.apply(&generate_kwargs)?;
        let (timestamps, words) = match params.get("return_timestamps") {
            None | Some(Value::Null) => (self.protocol.return_timestamps, false),
            Some(Value::Bool(b)) => (*b, false),
            Some(Value::String(s)) if s == "word" => {
                if self.protocol.alignment_heads.is_none() {
                    return Err(Error::param(
                        "return_timestamps",
                        "Model generation config has no `alignment_heads`, token-level \
                         timestamps not available (add them to generation_config.json, as \
                         the openai/whisper-* configs have)",
                    ));
                }
                (true, true)
            }
            Some(Value::String(s)) if s == "char" => {
                return Err(Error::param(
                    "return_timestamps",
                    "Whisper cannot return `char` timestamps, only word level or segment \
                     level timestamps. Use `return_timestamps='word'` or \
                     `return_timestamps=True` respectively.",
                ))
            }
            Some(v) => {
                return Err(Error::param(
                    "return_timestamps",
                    format!("expected true, false or \"word\", got {v}"),
                ))
            }
        };
        Ok(CallOptions {
            language,
            task,
            timestamps,
            words,
            return_language: param::opt_bool(params, "return_language")?.unwrap_or(false),
            generation,
            temperatures,
            prompt_ids,
            prompt_all_segments,
            condition_on_prev_tokens,
            compression_ratio_threshold,
            logprob_threshold,
            no_speech_threshold,
            window_stats: param::opt_bool(params, "return_window_stats")?.unwrap_or(false),
        })
    }

    /// Cut the waveforms into the pieces the model sees (`chunk_iter` for `chunk_length_s`).
    fn pieces(
        &self,
        waves: Vec<Vec<f32>>,
        params: &Params,
        timestamps: bool,
    ) -> Result<Vec<Piece>> {
        let rate = self.extractor.sampling_rate as f64;
        let sizes = chunk_sizes(params, rate, 1)?;
        let mut out = Vec::new();
        for (input, samples) in waves.into_iter().enumerate() {
            if samples.is_empty() {
                return Err(Error::input(input, "the audio has no samples"));
            }
            let Some((chunk_len, left, right)) = sizes else {
                // Longer than one window: Whisper's sequential long-form decoding, which
                // moves from window to window by the predicted timestamps.
                if samples.len() > self.extractor.n_samples && !timestamps {
                    return Err(Error::input(
                        input,
                        format!(
                            "the audio is {:.1} s, longer than Whisper's 30 s window: long-form \
                             transcription needs return_timestamps=true (as transformers), or \
                             pass chunk_length_s=30 to transcribe it in overlapping chunks",
                            samples.len() as f64 / rate
                        ),
                    ));
                }
                out.push(Piece {
                    input,
                    samples,
                    stride: None,
                });
                continue;
            };
            for (start, end, l, r) in chunk_spans(samples.len(), chunk_len, left, right) {
                out.push(Piece {
                    input,
                    samples: samples[start..end].to_vec(),
                    stride: Some((end - start, l, r)),
                });
            }
        }
        Ok(out)
    }

    /// The decoder's start tokens for each row of a batch (`_retrieve_init_tokens`), detecting
    /// the language from `cache`'s encoder states where it is needed.
    fn init_tokens(
        &self,
        opts: &CallOptions,
        cache: &Seq2SeqCache,
        rows: usize,
    ) -> Result<Vec<Vec<u32>>> {
        let p = &self.protocol;
        let mut init: Vec<Option<u32>> = vec![Some(p.decoder_start)];
        if opts.task.is_none() && opts.language.is_none() {
            init.extend(p.forced.iter().copied());
        }
        let lang_undefined = init.len() <= 1 || init[1].is_none();
        let lang_ids: Option<Vec<u32>> = match &opts.language {
            Some(l) => Some(vec![p.language_id(l)?; rows]),
            None if !p.lang_to_id.is_empty() && lang_undefined => {
                Some(self.detect_language(cache, rows)?)
            }
            None => None,
        };
        let mut out = Vec::with_capacity(rows);
        for r in 0..rows {
            let mut toks = init.clone();
            if let Some(ids) = &lang_ids {
                if toks.len() > 1 {
                    toks[1] = Some(ids[r]);
                } else {
                    toks.push(Some(ids[r]));
                }
            }
            let task_ids = [p.transcribe, p.translate];
            if let Some(task) = &opts.task {
                let id = if task == "translate" {
                    p.translate
                } else {
                    p.transcribe
                };
                let id = id.ok_or_else(|| {
                    Error::param("task", "this model's generation config has no task tokens")
                })?;
                toks.push(Some(id));
            } else if opts.language.is_some()
                && !toks.iter().any(|t| t.is_some() && task_ids.contains(t))
            {
                toks.push(p.transcribe);
            }
            let last = toks.iter().rev().flatten().next().copied();
            if !opts.timestamps && last != Some(p.no_timestamps) {
                toks.push(Some(p.no_timestamps));
            } else if opts.timestamps && last == Some(p.no_timestamps) {
                let at = toks.iter().rposition(|t| *t == Some(p.no_timestamps));
                if let Some(at) = at {
                    toks.remove(at);
                }
            }
            out.push(toks.into_iter().flatten().collect());
        }
        Ok(out)
    }

    /// `detect_language`: the most likely language token after `<|startoftranscript|>`.
    fn detect_language(&self, encoded: &Seq2SeqCache, rows: usize) -> Result<Vec<u32>> {
        let mut cache = self.model.restart_cache(encoded)?;
        let ids = Tensor::from_vec(
            vec![self.protocol.decoder_start; rows],
            (rows, 1),
            &self.device,
        )?;
        let logits: Vec<Vec<f32>> = self.model.decode(&ids, &mut cache)?.squeeze(1)?.to_vec2()?;
        // torch's argmax: the first of equal maxima, in vocabulary order.
        let mut lang_ids: Vec<u32> = self.protocol.lang_to_id.iter().map(|(_, id)| *id).collect();
        lang_ids.sort_unstable();
        Ok(logits
            .iter()
            .map(|row| {
                let mut best = (f32::NEG_INFINITY, self.protocol.lang_to_id[0].1);
                for &id in &lang_ids {
                    let s = row.get(id as usize).copied().unwrap_or(f32::NEG_INFINITY);
                    if s > best.0 {
                        best = (s, id);
                    }
                }
                best.1
            })
            .collect())
    }

    /// The decoder cache over `rows` windows of log-mel features (`[mels][3000]` each,
    /// concatenated): their cross-attention keys and values, one row per window.
    fn encode_windows(&self, feats: Vec<f32>, rows: usize) -> Result<Seq2SeqCache> {
        let frames = self.model.config.input_frames();
        let mels = self.extractor.feature_size;
        let features = Tensor::from_vec(feats, (rows, mels, frames), &self.device)?;
        Ok(self.model.encode_to_cache(&features)?)
    }

    /// Each piece's log-mel features, and how many frames Whisper's seek loop walks through:
    /// 3000 for audio of up to 30 s (padded), the audio's own frames beyond that (long-form).
    fn features(&self, pieces: &[&Piece]) -> Result<Vec<(Vec<f32>, usize)>> {
        let frames = self.model.config.input_frames();
        if self.extractor.nb_max_frames != frames {
            return Err(Error::param(
                "feature_extractor",
                format!(
                    "the feature extractor makes {} frames, the model takes {frames}",
                    self.extractor.nb_max_frames
                ),
            ));
        }
        pieces
            .iter()
            .map(|p| {
                if p.samples.len() > self.extractor.n_samples {
                    self.extractor.extract_longest(&p.samples)
                } else {
                    Ok((self.extractor.extract(&p.samples)?, frames))
                }
            })
            .collect()
    }

    /// The encoder caches of pieces' first windows (what language detection sees).
    fn encode(&self, pieces: &[&Piece]) -> Result<Seq2SeqCache> {
        let feats = self.features(pieces)?;
        self.encode_first_windows(&feats)
    }

    /// The encoder caches of the first 30 s window of each piece's features.
    fn encode_first_windows(&self, feats: &[(Vec<f32>, usize)]) -> Result<Seq2SeqCache> {
        let seg = self.model.config.input_frames();
        let mut first = Vec::new();
        for (f, n) in feats {
            first.extend(window(f, *n, 0, seg.min(*n), seg));
        }
        self.encode_windows(first, feats.len())
    }

    /// Generated tokens of a batch of pieces, through Whisper's seek loop
    /// (`WhisperGenerationMixin.generate`): each row's window starts at its seek position;
    /// without timestamps one window covers the piece; with timestamps the window ends at the
    /// last closed segment and the next window starts there, until the piece is covered.
    /// Each window's decoder input is its start tokens after the prompt (`prompt_ids`) or the
    /// text before it (`condition_on_prev_tokens`), and each window may be decoded again at
    /// the next temperature while a threshold says it failed (`generate_with_fallback`); a
    /// window found silent (`no_speech_threshold`) is skipped.
    /// With word timestamps, each token's time in seconds comes with the tokens (HF's
    /// `token_timestamps`, the window's offset added).
    fn transcribe_batch(&self, pieces: &[&Piece], opts: &CallOptions) -> Result<Vec<PieceTokens>> {
        let seg = self.model.config.input_frames();
        let feats = self.features(pieces)?;
        let b = pieces.len();
        let first = self.encode_first_windows(&feats)?;
        let init = self.init_tokens(opts, &first, b)?;
        let mut cached = Some(first);
        let mut seek = vec![0usize; b];
        let mut out: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut times: Vec<Vec<f32>> = vec![Vec::new(); b];
        let mut stats: Vec<Vec<Value>> = vec![Vec::new(); b];
        let timestamp_begin = self.protocol.no_timestamps + 1;
        // What a window may be conditioned on: the tokens of each row's segments so far (the
        // prompt first, for `first-segment`; HF's `current_segments`), and whether there are any.
        let mut history: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut has_segments = vec![false; b];
        if let (Some(p), false) = (&opts.prompt_ids, opts.prompt_all_segments) {
            let p = match p.first() {
                Some(&t) if Some(t) == self.protocol.prev_sot => &p[1..],
                _ => &p[..],
            };
            for i in 0..b {
                history[i] = p.to_vec();
                has_segments[i] = true;
            }
        }
        let mut condition = vec![opts.condition_on_prev_tokens; b];
        loop {
            let active: Vec<usize> = (0..b).filter(|&i| seek[i] < feats[i].1).collect();
            if active.is_empty() {
                break;
            }
            let num: Vec<usize> = active
                .iter()
                .map(|&i| (feats[i].1 - seek[i]).min(seg))
                .collect();
            let cache = match cached.take() {
                Some(c) if active.len() == b && seek.iter().all(|&s| s == 0) => c,
                _ => {
                    let mut w = Vec::new();
                    for (k, &i) in active.iter().enumerate() {
                        w.extend(window(&feats[i].0, feats[i].1, seek[i], num[k], seg));
                    }
                    self.encode_windows(w, active.len())?
                }
            };
            let inputs: Vec<Vec<u32>> = active
                .iter()
                .map(|&i| {
                    self.decoder_input(opts, &init[i], &history[i], condition[i] && has_segments[i])
                })
                .collect();
            let starts: Vec<usize> = active.iter().map(|&i| init[i].len()).collect();
            let decoded = self.generate_with_fallback(&cache, &inputs, &starts, opts)?;
            for (k, ((&i, window_out), n)) in active.iter().zip(decoded).zip(&num).enumerate() {
                let low_temperature = window_out.temperature.is_none_or(|t| t < 0.5);
                condition[i] = opts.condition_on_prev_tokens && low_temperature;
                let window_start = seek[i];
                let stat = opts.window_stats.then(|| {
                    let text_ids: Vec<u32> = window_out
                        .seq
                        .iter()
                        .copied()
                        .filter(|&t| t < self.protocol.no_timestamps)
                        .collect();
                    let text = self
                        .tokenizer
                        .decode_raw(&text_ids, true)
                        .unwrap_or_default();
                    serde_json::json!({
                        "seek": window_start,
                        "start": window_start as f64 * 0.01,
                        "temperature": window_out.temperature.unwrap_or(0.0),
                        "avg_logprob": window_out.avg_logprob,
                        "compression_ratio": text_compression_ratio(text.trim()),
                        "no_speech_prob": window_out.no_speech_prob.map(f64::from),
                        "skipped": window_out.skipped,
                    })
                });
                // With the seconds where the next window starts (10 ms frames).
                let record = |end: usize| {
                    if let Some(Value::Object(mut m)) = stat {
                        m.insert("end".into(), serde_json::json!(end as f64 * 0.01));
                        stats[i].push(Value::Object(m));
                    }
                };
                if window_out.skipped {
                    seek[i] += *n;
                    record(seek[i]);
                    continue;
                }
                let (seq, ended) = (window_out.seq, window_out.ended);
                if opts.words {
                    // Word timings decode the window again over the same encoder keys and
                    // values (`cache` itself is never decoded into).
                    let num_frames = self.mask_frames(pieces[i]) as i64 - seek[i] as i64;
                    let t = self.token_times(&inputs[k], &seq, ended, (&cache, k), num_frames)?;
                    // `time_offset`: float64 seconds, added to the float32 times as float32.
                    let offset = (seek[i] as f64 * 0.02 / 2.0) as f32;
                    times[i].extend(t.iter().take(seq.len()).map(|x| x + offset));
                }
                let (tokens, offset, double_ending) = if opts.timestamps {
                    retrieve_segment(&seq, timestamp_begin, *n)
                } else {
                    (seq, *n, false)
                };
                if opts.words {
                    // Keep the times of the tokens kept (a prefix of the window's).
                    times[i].truncate(out[i].len() + tokens.len());
                }
                if opts.condition_on_prev_tokens {
                    // The last segment's second ending timestamp is not conditioned on
                    // (`skip_ending_double_timestamps`).
                    let keep = tokens.len() - usize::from(double_ending);
                    history[i].extend_from_slice(&tokens[..keep]);
                }
                has_segments[i] = true;
                out[i].extend(tokens);
                // A window that ends at its own start would never move on.
                seek[i] += if offset == 0 { *n } else { offset };
                record(seek[i]);
            }
        }
        Ok(out
            .into_iter()
            .zip(times)
            .zip(stats)
            .map(|((t, x), w)| (t, opts.words.then_some(x), w))
            .collect())
    }

    /// `_prepare_decoder_input_ids` for one row: its start tokens `init` after the previous
    /// segments' last `max_target_positions / 2 - 1` tokens (`condition`: the row conditions
    /// on them and has some), led by `<|startofprev|>` or, for `all-segments`, the prompt;
    /// else after the prompt, if any.
    fn decoder_input(
        &self,
        opts: &CallOptions,
        init: &[u32],
        history: &[u32],
        condition: bool,
    ) -> Vec<u32> {
        let mut ids = Vec::new();
        if condition {
            match (&opts.prompt_ids, opts.prompt_all_segments) {
                (Some(p), true) => ids.extend_from_slice(p),
                _ => ids.extend(self.protocol.prev_sot),
            }
            let cut = (self.model.config.max_target_positions / 2).saturating_sub(1);
            ids.extend_from_slice(&history[history.len().saturating_sub(cut)..]);
        } else if let Some(p) = &opts.prompt_ids {
            ids.extend_from_slice(p);
        }
        ids.extend_from_slice(init);
        ids
    }

    /// `generate_with_fallback` over one window's rows (decoder inputs `inputs`, of which the
    /// last `starts[k]` tokens are the start tokens): decode at the first temperature; rows
    /// whose compression ratio is above `compression_ratio_threshold` or whose average
    /// log-probability is below `logprob_threshold` are decoded again at the next one; the
    /// last try stands. A row is skipped as silence when its no-speech probability is above
    /// `no_speech_threshold` and its average log-probability below `logprob_threshold`.
    fn generate_with_fallback(
        &self,
        encoded: &Seq2SeqCache,
        inputs: &[Vec<u32>],
        starts: &[usize],
        opts: &CallOptions,
    ) -> Result<Vec<WindowOut>> {
        let n = inputs.len();
        // Per row (HF's no-speech probability, for the threshold; OpenAI's, from the raw
        // logits, what `verbose_json` reports), from one decoder pass.
        let probs: Vec<(f32, f32)> = if opts.no_speech_threshold.is_some() || opts.window_stats {
            (0..n)
                .map(|k| self.no_speech_prob(encoded, n, k, &inputs[k], starts[k], opts))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let no_speech = opts
            .no_speech_threshold
            .map(|_| probs.iter().map(|p| p.0).collect::<Vec<f32>>());
        let no_speech_raw = opts
            .window_stats
            .then(|| probs.iter().map(|p| p.1).collect::<Vec<f32>>());
        let want_logprobs = opts.logprob_threshold.is_some() || opts.window_stats;
        let mut done: Vec<Option<WindowOut>> = (0..n).map(|_| None).collect();
        let mut todo: Vec<usize> = (0..n).collect();
        for (attempt, &temperature) in opts.temperatures.iter().enumerate() {
            let last = attempt + 1 == opts.temperatures.len();
            let mut again = Vec::new();
            // Rows whose inputs have one length decode together (no padding).
            let mut lengths: Vec<usize> = todo.iter().map(|&k| inputs[k].len()).collect();
            lengths.sort_unstable();
            lengths.dedup();
            for len in lengths {
                let group: Vec<usize> = todo
                    .iter()
                    .copied()
                    .filter(|&k| inputs[k].len() == len)
                    .collect();
                let cache = self.subset(encoded, n, &group)?;
                let rows: Vec<Vec<u32>> = group.iter().map(|&k| inputs[k].clone()).collect();
                let seqs = self.generate_window(cache, rows, opts, temperature, want_logprobs)?;
                for (&k, (seq, ended, logprob)) in group.iter().zip(seqs) {
                    let mut fallback = false;
                    let mut skipped = false;
                    if let Some(th) = opts.compression_ratio_threshold {
                        let mut all = seq.clone();
                        if ended {
                            all.push(self.protocol.eos);
                        }
                        if compression_ratio(&all, self.model.config.vocab_size) > th {
                            fallback = true;
                        }
                    }
                    if let (Some(th), Some(lp)) = (opts.logprob_threshold, logprob) {
                        if lp < th {
                            fallback = true;
                        }
                        if let (Some(nth), Some(ns)) = (opts.no_speech_threshold, &no_speech) {
                            if lp < th && ns[k] as f64 > nth {
                                fallback = false;
                                skipped = true;
                            }
                        }
                    }
                    if fallback && !last {
                        again.push(k);
                    }
                    done[k] = Some(WindowOut {
                        seq,
                        ended,
                        skipped,
                        temperature,
                        avg_logprob: logprob,
                        no_speech_prob: no_speech_raw.as_ref().map(|p| p[k]),
                    });
                }
            }
            todo = again;
            if todo.is_empty() {
                break;
            }
        }
        done.into_iter()
            .map(|w| w.ok_or_else(|| Error::param("temperature", "no temperature to decode at")))
            .collect()
    }

    /// A fresh decoder cache over some rows of a window's `total` encoded inputs (`encoded`,
    /// never decoded into): their cross-attention keys and values are shared, not recomputed.
    fn subset(&self, encoded: &Seq2SeqCache, total: usize, rows: &[usize]) -> Result<Seq2SeqCache> {
        let mut cache = self.model.restart_cache(encoded)?;
        let identity = rows.iter().enumerate().all(|(i, &r)| i == r);
        if !identity || total != rows.len() {
            let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
            cache.select_rows(&idx)?;
        }
        Ok(cache)
    }

    /// `WhisperNoSpeechDetection`: the probability of `<|nospeech|>` (the token before
    /// `<|notimestamps|>`) in the model's logits at the `<|startoftranscript|>` of row `k`'s
    /// decoder input (`start` start tokens at its end). With a single start token HF reads the
    /// first step's scores instead, after the suppressed tokens are masked. Returns HF's, and
    /// the probability from the same logits unmasked, as openai-whisper reads it (its
    /// `no_speech_prob`).
    fn no_speech_prob(
        &self,
        encoded: &Seq2SeqCache,
        total: usize,
        k: usize,
        input: &[u32],
        start: usize,
        opts: &CallOptions,
    ) -> Result<(f32, f32)> {
        let mut cache = self.subset(encoded, total, &[k])?;
        let at = if start > 1 {
            input.len() - start
        } else {
            input.len() - 1
        };
        // The decoder is causal: the logits at `at` need only the tokens up to it.
        let ids = Tensor::from_vec(input[..=at].to_vec(), (1, at + 1), &self.device)?;
        let mut logits: Vec<f32> = self
            .model
            .decode(&ids, &mut cache)?
            .narrow(1, at, 1)?
            .flatten_all()?
            .to_vec1()?;
        let token = self.protocol.no_timestamps.saturating_sub(1) as usize;
        let prob = |logits: &[f32]| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f32 = logits.iter().map(|&x| (x - max).exp()).sum();
            logits.get(token).map_or(0.0, |&x| (x - max).exp() / sum)
        };
        let raw = prob(&logits);
        if start > 1 {
            return Ok((raw, raw));
        }
        let g = &opts.generation;
        for &t in g.suppress_tokens.iter().chain(&g.begin_suppress_tokens) {
            if let Some(x) = logits.get_mut(t as usize) {
                *x = f32::NEG_INFINITY;
            }
        }
        Ok((prob(&logits), raw))
    }

    /// HF's `attention_mask.sum()` for a piece: the frames of its samples (`ceil(n / hop)`
    /// when padded to 30 s, `floor(n / hop)` for long-form features padded to the longest).
    fn mask_frames(&self, piece: &Piece) -> usize {
        let n = piece.samples.len();
        let hop = self.extractor.hop_length.max(1);
        if n > self.extractor.n_samples {
            n / hop
        } else {
            n.div_ceil(hop)
        }
    }

    /// `_extract_token_timestamps` for one generated window: `init` start tokens, `seq` the
    /// new tokens (end of text removed; `ended`: there was one), `encoded` a fresh cache over
    /// the windows and `input` this one's row in it. One teacher-forced decoder pass over the
    /// sequence gives the cross-attention `generate` saw for every token but the last. Times
    /// of `seq`'s tokens.
    fn token_times(
        &self,
        init: &[u32],
        seq: &[u32],
        ended: bool,
        (encoded, input): (&Seq2SeqCache, usize),
        num_frames: i64,
    ) -> Result<Vec<f32>> {
        let heads = self.protocol.alignment_heads.as_deref().unwrap_or(&[]);
        let mut full: Vec<u32> = init.to_vec();
        full.extend_from_slice(seq);
        if ended {
            full.push(self.protocol.eos);
        }
        let total = full.len();
        let time_precision =
            self.extractor.chunk_length as f64 / self.model.config.max_source_positions as f64;
        let weights = if total > init.len() + 1 {
            self.model
                .alignment_attention(&full[..total - 1], encoded, input, heads)?
        } else {
            Vec::new()
        };
        let t = whisper_words::token_timestamps(
            &weights,
            init.len(),
            total,
            num_frames,
            self.median_filter_width,
            time_precision,
        );
        Ok(t[init.len()..].to_vec())
    }

    /// The tokens a screened greedy step computes in f32 besides the candidates for the
    /// largest logit: the special and timestamp tokens (from the end of text on), and the
    /// suppressed ones (which must not set the screen's threshold).
    fn screen_plan(&self, cfg: &GenerationConfig) -> ScreenPlan {
        let first_special = self
            .protocol
            .special_ids
            .iter()
            .copied()
            .chain([self.protocol.eos, self.protocol.no_timestamps])
            .min()
            .unwrap_or(self.protocol.eos);
        let always: Vec<u32> = cfg
            .suppress_tokens
            .iter()
            .chain(&cfg.begin_suppress_tokens)
            .copied()
            .collect();
        ScreenPlan::new(
            (first_special as usize).min(self.model.config.vocab_size),
            &always,
        )
    }

    /// One `generate` call over encoded windows from the decoder inputs `init` (one length):
    /// each row's new tokens (padding and the end of text removed), whether an end of text was
    /// there, and with `logprobs` its average log-probability (`_retrieve_avg_logprobs`, the end
    /// of text counted; for beam search along the best beam's path).
    fn generate_window(
        &self,
        cache: Seq2SeqCache,
        init: Vec<Vec<u32>>,
        opts: &CallOptions,
        temperature: Option<f32>,
        logprobs: bool,
    ) -> Result<Vec<WindowSeq>> {
        let begin = init[0].len();
        let mut cfg = opts.generation.clone();
        match temperature {
            Some(t) if t > 0.0 => {
                cfg.do_sample = true;
                cfg.temperature = t;
                cfg.num_beams = 1;
            }
            _ => {
                cfg.do_sample = false;
                cfg.temperature = 1.0;
            }
        }
        let max_target = self.model.config.max_target_positions;
        if let Some(n) = cfg.max_new_tokens {
            if n + begin > max_target {
                return Err(Error::param(
                    "max_new_tokens",
                    format!(
                        "{begin} decoder input tokens (start tokens, prompt and previous text) \
                         and max_new_tokens {n} exceed the decoder's {max_target} positions: \
                         shorten the prompt or lower max_new_tokens"
                    ),
                ));
            }
        } else {
            let initial = (max_target / 2)
                .saturating_sub(1)
                .min(begin.saturating_sub(1));
            cfg.max_length = (cfg.max_length + initial).min(max_target);
        }
        if opts.timestamps {
            cfg.timestamp_rules = Some(TimestampRules {
                no_timestamps: self.protocol.no_timestamps,
                timestamp_begin: self.protocol.no_timestamps + 1,
                eos: self.protocol.eos,
                begin_index: begin,
                max_initial_timestamp_index: self.protocol.max_initial_timestamp_index,
            });
        }
        let rows = init.len();
        let mut cache = cache;
        if !logprobs && screen_safe(&cfg) {
            cache.set_screen(Some(Arc::new(self.screen_plan(&cfg))));
        }
        let mut session = Seq2SeqSession::with_cache(&self.model, cache, init.clone());
        let mut sums = vec![(0f64, 0usize); rows];
        let mut on_token = |r: usize, _tok: u32, lp: f32| {
            if let Some(s) = sums.get_mut(r) {
                s.0 += lp as f64;
                s.1 += 1;
            }
        };
        let mut beam_lps: Vec<Option<f64>> = vec![None; rows];
        let mut on_beam = |r: usize, lps: &[f32]| {
            if let Some(x) = beam_lps.get_mut(r) {
                let sum: f64 = lps.iter().map(|&v| v as f64).sum();
                *x = Some(sum / lps.len().max(1) as f64);
            }
        };
        let mut hooks = Hooks {
            on_token: if logprobs { Some(&mut on_token) } else { None },
            on_beam_logprobs: if logprobs { Some(&mut on_beam) } else { None },
            unscaled_logprobs: true,
            ..Hooks::default()
        };
        let generated = generate(&mut session, &init, &cfg, &mut hooks)?;
        let eos = &cfg.eos_token_id;
        Ok(generated
            .sequences
            .into_iter()
            .enumerate()
            .map(|(r, mut seqs)| {
                let mut s = if seqs.is_empty() {
                    Vec::new()
                } else {
                    seqs.swap_remove(0)
                };
                let n = s.len();
                while s.last().is_some_and(|t| eos.contains(t)) {
                    s.pop();
                }
                let ended = s.len() < n;
                // Beam search: the best beam's tokens along its path (HF reads `scores` by
                // `beam_indices`), not `sequences_scores`.
                let logprob = logprobs.then(|| {
                    beam_lps[r].unwrap_or_else(|| {
                        let (sum, count) = sums[r];
                        sum / count.max(1) as f64
                    })
                });
                (s, ended, logprob)
            })
            .collect())
    }
}

/// Whether a `generate` call reads nothing of a step's logits but the argmax after
/// suppression, forcing and Whisper's timestamp rule (which compares the timestamps' summed
/// probability with the best text token's: exact values on both sides): greedy, one
/// sequence, no penalties that rescale single tokens. Such calls screen the output
/// projection ([`crate::kernels::cpu::screen`]) unless `FERROFORMERS_NO_SCREEN=1`.
fn screen_safe(cfg: &GenerationConfig) -> bool {
    cfg.argmax_only() && !crate::kernels::cpu::switch_on("FERROFORMERS_NO_SCREEN")
}

/// One row of a `generate` call: new tokens, whether an end of text ended them, the average
/// log-probability when asked for.
type WindowSeq = (Vec<u32>, bool, Option<f64>);

/// One window's decoding after `generate_with_fallback`.
struct WindowOut {
    seq: Vec<u32>,
    ended: bool,
    /// Found silent (`no_speech_threshold`): the window adds nothing.
    skipped: bool,
    /// The temperature of the try that stands.
    temperature: Option<f32>,
    /// Its tokens' average log-probability (HF's `avg_logprobs`), when computed.
    avg_logprob: Option<f64>,
    /// The probability of `<|nospeech|>` at its start, when computed.
    no_speech_prob: Option<f32>,
}

/// openai-whisper's `compression_ratio` of a window's text (decoded without timestamps, then
/// trimmed): its UTF-8 length over its zlib-compressed length (a repetitive, hallucinated text
/// compresses well).
fn text_compression_ratio(text: &str) -> f64 {
    zlib_ratio(text.as_bytes())
}

/// `bytes`' length over its zlib-compressed length (level 6, as Python's `zlib.compress`).
fn zlib_ratio(bytes: &[u8]) -> f64 {
    use std::io::Write;
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::new(6));
    let compressed = z
        .write_all(bytes)
        .and_then(|_| z.finish())
        .map_or(1, |c| c.len().max(1));
    bytes.len() as f64 / compressed as f64
}

/// `_retrieve_compression_ratio`: the tokens as little-endian integers of
/// `log2(vocab) / 8 + 1` bytes, their length over the zlib-compressed length.
fn compression_ratio(tokens: &[u32], vocab_size: usize) -> f64 {
    let width = ((vocab_size.max(2) as f64).log2() / 8.0) as usize + 1;
    let bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|t| {
            t.to_le_bytes()
                .into_iter()
                .chain(std::iter::repeat(0))
                .take(width)
        })
        .collect();
    zlib_ratio(&bytes)
}

/// `chunk_length_s` and `stride_length_s` (left and right) in samples at `rate` Hz, each rounded
/// to a multiple of `align_to` as the pipeline's `preprocess` does (`inputs_to_logits_ratio` for
/// CTC models, 1 for Whisper); `None` without chunking (`chunk_length_s` absent or 0). The
/// stride defaults to a sixth of the chunk on each side.
pub(crate) fn chunk_sizes(
    params: &Params,
    rate: f64,
    align_to: usize,
) -> Result<Option<(usize, usize, usize)>> {
    let chunk_s = match params.get("chunk_length_s") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_f64().filter(|x| *x >= 0.0).ok_or_else(|| {
            Error::param(
                "chunk_length_s",
                format!("expected a number of seconds, got {v}"),
            )
        })?),
    }
    .filter(|c| *c > 0.0);
    let Some(chunk_s) = chunk_s else {
        return Ok(None);
    };
    let (left_s, right_s) = match params.get("stride_length_s") {
        None | Some(Value::Null) => (chunk_s / 6.0, chunk_s / 6.0),
        Some(Value::Array(a)) if a.len() == 2 => {
            let f = |v: &Value| {
                v.as_f64().ok_or_else(|| {
                    Error::param("stride_length_s", "expected a number or two numbers")
                })
            };
            (f(&a[0])?, f(&a[1])?)
        }
        Some(v) => {
            let x = v.as_f64().ok_or_else(|| {
                Error::param("stride_length_s", "expected a number or two numbers")
            })?;
            (x, x)
        }
    };
    // `int(round(s * rate / align_to) * align_to)`: Python's round() on x.5 rounds to even; so
    // does round_ties_even.
    let align = align_to.max(1) as f64;
    let n = |s: f64| ((s * rate / align).round_ties_even() * align).max(0.0) as usize;
    let (chunk_len, left, right) = (n(chunk_s), n(left_s), n(right_s));
    if chunk_len <= left + right {
        return Err(Error::param(
            "stride_length_s",
            "the chunk must be longer than its two strides together",
        ));
    }
    Ok(Some((chunk_len, left, right)))
}

/// `chunk_iter`: `(start, end, left stride, right stride)` of each chunk of a `total`-sample
/// waveform. Chunks start every `chunk_len - left - right` samples; the first has no left
/// stride, the last (the one reaching the end) no right stride, and a chunk no longer than its
/// left stride is skipped.
pub(crate) fn chunk_spans(
    total: usize,
    chunk_len: usize,
    left: usize,
    right: usize,
) -> Vec<(usize, usize, usize, usize)> {
    let step = chunk_len.saturating_sub(left + right).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < total {
        let end = (start + chunk_len).min(total);
        let is_last = start + chunk_len >= total;
        let l = if start == 0 { 0 } else { left };
        let r = if is_last { 0 } else { right };
        if end - start > l {
            out.push((start, end, l, r));
        }
        if is_last {
            break;
        }
        start += step;
    }
    out
}

/// The mono waveform of an input at `rate` Hz: a file path (not a URL), a file's bytes, or a
/// waveform at any rate (resampled as torchaudio does).
pub(crate) fn waveform(input: &Input, index: usize, rate: u32) -> Result<Vec<f32>> {
    let audio = match input {
        Input::Text(path) => {
            if path.starts_with("http://") || path.starts_with("https://") {
                return Err(Error::input(
                    index,
                    "audio URLs are not fetched: download the file and pass its path",
                ));
            }
            let p = Path::new(path);
            if !p.is_file() {
                return Err(Error::input(
                    index,
                    format!("`{path}` is not an audio file that exists"),
                ));
            }
            decode_file(p)?
        }
        Input::AudioBytes(bytes) => decode_bytes(bytes)?,
        Input::Audio {
            samples,
            sampling_rate,
        } => {
            if *sampling_rate == rate {
                return Ok(samples.clone());
            }
            return resample(samples, *sampling_rate, rate);
        }
        _ => {
            return Err(Error::input(
                index,
                "expected audio: a file path, bytes, or {\"raw\": [...], \"sampling_rate\": N}",
            ))
        }
    };
    if audio.sampling_rate == rate {
        Ok(audio.samples)
    } else {
        Ok(Audio::to_rate(&audio, rate)?.samples)
    }
}

/// Frames `[start, start + n)` of a `[mels][frames]` matrix, zero-padded to `seg` frames
/// (`_get_input_segment`).
fn window(feats: &[f32], frames: usize, start: usize, n: usize, seg: usize) -> Vec<f32> {
    let mels = feats.len() / frames.max(1);
    let mut out = vec![0f32; mels * seg];
    for m in 0..mels {
        let row = &feats[m * frames..(m + 1) * frames];
        let take = n.min(frames.saturating_sub(start)).min(seg);
        out[m * seg..m * seg + take].copy_from_slice(&row[start..start + take]);
    }
    out
}

/// The pipeline's generation config (`_default_generation_config`: `max_new_tokens=256`,
/// `num_beams=5`) over the model's, `max_new_tokens` dropped when the model sets `max_length`.
pub fn pipeline_generation_config(model: &GenerationConfig) -> GenerationConfig {
    let base = GenerationConfig {
        max_new_tokens: Some(256),
        num_beams: 5,
        ..GenerationConfig::default()
    };
    let mut cfg = GenerationConfig::merge_over_model(&base, model);
    if cfg.max_new_tokens == Some(256) && cfg.max_length != GenerationConfig::default().max_length {
        cfg.max_new_tokens = None;
    }
    cfg
}

/// `_retrieve_segment`: the tokens one window keeps and how many frames it moves the seek
/// position. With consecutive timestamp pairs, text after the last pair that no timestamp
/// closes is left for the next window, which starts at that pair's time; otherwise the whole
/// window is taken.
/// The flag: the kept tokens end with two timestamps (the last segment's end and the next
/// one's start; `_pad_to_max_length`'s `skip_ending_double_timestamps` drops the second when
/// the tokens are conditioned on).
fn retrieve_segment(
    seq: &[u32],
    timestamp_begin: u32,
    window_frames: usize,
) -> (Vec<u32>, usize, bool) {
    let ts: Vec<bool> = seq.iter().map(|&t| t >= timestamp_begin).collect();
    let n = ts.len();
    let single_ending = n >= 2 && !ts[n - 2] && ts[n - 1];
    let last_pair = (0..n.saturating_sub(1)).rev().find(|&i| ts[i] && ts[i + 1]);
    match last_pair {
        Some(i) if !single_ending => {
            // Two frames per timestamp step (0.02 s against 10 ms frames).
            let offset = (seq[i] - timestamp_begin) as usize * 2;
            // The last segment runs from the pair before (or the start) to this pair's second
            // timestamp; it ends with two timestamps unless it is just the pair.
            let seg_start = (0..i)
                .rev()
                .find(|&j| ts[j] && ts[j + 1])
                .map_or(0, |j| j + 1);
            (seq[..i + 2].to_vec(), offset, i + 2 - seg_start > 2)
        }
        _ => (seq.to_vec(), window_frames, false),
    }
}

/// `_decode_asr`'s result: the text, and the chunks when asked for.
type Decoded = (String, Option<Vec<Map<String, Value>>>);

/// One window's tokens and its stride in seconds `(chunk, left, right)`.
struct WindowTokens {
    tokens: Vec<u32>,
    stride: Option<(f64, f64, f64)>,
    /// Each token's time in seconds (word timestamps).
    times: Option<Vec<f32>>,
}

/// A token's `(start, end)` in seconds (word timestamps).
type Span = (f64, f64);

/// `_find_longest_common_sequence` (no token timestamps): merge overlapping windows' tokens.
fn longest_common_sequence(sequences: &[Vec<u32>]) -> Vec<u32> {
    longest_common_sequence_timed(sequences, &[]).0
}

/// `_find_longest_common_sequence` with the tokens' spans (`times` empty: without): a token
/// matches only where the left span is not after the right one; the spans are cut as the
/// tokens are.
fn longest_common_sequence_timed(
    sequences: &[Vec<u32>],
    times: &[Vec<Span>],
) -> (Vec<u32>, Vec<Span>) {
    let Some(first) = sequences.first() else {
        return (Vec::new(), Vec::new());
    };
    let timed = !times.is_empty();
    let mut left_seq = first.clone();
    let mut left_times: Vec<Span> = times.first().cloned().unwrap_or_default();
    let mut total = Vec::new();
    let mut total_times = Vec::new();
    for (k, right_seq) in sequences[1..].iter().enumerate() {
        let left_len = left_seq.len();
        let right_len = right_seq.len();
        let mut best = 0.0f64;
        let mut idx = (left_len, left_len, 0usize, 0usize);
        for i in 1..(left_len + right_len) {
            let eps = i as f64 / 10000.0;
            let ls = left_len.saturating_sub(i);
            let le = left_len.min(left_len + right_len - i);
            let rs = i.saturating_sub(left_len);
            let re = right_len.min(i);
            let matches = (0..le - ls)
                .filter(|&x| {
                    left_seq[ls + x] == right_seq[rs + x]
                        && (!timed || {
                            let (a, b) = (left_times[ls + x], times[k + 1][rs + x]);
                            a.0 < b.0 || (a.0 == b.0 && a.1 <= b.1)
                        })
                })
                .count();
            let matching = matches as f64 / i as f64 + eps;
            if matches > 1 && matching > best {
                best = matching;
                idx = (ls, le, rs, re);
            }
        }
        let (ls, le, rs, re) = idx;
        let left_mid = (le + ls) / 2;
        let right_mid = (re + rs) / 2;
        total.extend_from_slice(&left_seq[..left_mid]);
        left_seq = right_seq[right_mid.min(right_seq.len())..].to_vec();
        if timed {
            total_times.extend_from_slice(&left_times[..left_mid.min(left_times.len())]);
            let r = &times[k + 1];
            left_times = r[right_mid.min(r.len())..].to_vec();
        }
    }
    total.extend(left_seq);
    total_times.extend(left_times);
    (total, total_times)
}

/// `_decode_asr`: the text and, with `timestamps` or `language`, the chunks; with `words`
/// (`return_timestamps="word"`, the windows' token times given) one chunk per word.
fn decode_asr(
    tokenizer: &Tokenizer,
    special: &HashSet<u32>,
    windows: &[WindowTokens],
    timestamps: bool,
    words: bool,
    return_language: bool,
    time_precision: f64,
) -> Result<Decoded> {
    struct Chunk {
        language: Option<String>,
        start: Option<f64>,
        end: Option<f64>,
        text: String,
        words: Vec<(String, Span)>,
    }
    let new_chunk = |language: &Option<String>| Chunk {
        language: language.clone(),
        start: None,
        end: None,
        text: String::new(),
        words: Vec::new(),
    };
    let eos = tokenizer.token_to_id("<|endoftext|>").unwrap_or(50257);
    let collate = |tokens: &[u32], times: &[Span], language: &Option<String>| {
        whisper_words::collate_words(tokenizer, tokens, times, language.as_deref(), eos)
    };
    let timestamp_begin = tokenizer.token_to_id("<|notimestamps|>").unwrap_or(50363) + 1;
    let decode = |ids: &[u32]| tokenizer.decode(ids, false);
    let mut last_language: Option<String> = None;
    let mut chunks: Vec<Chunk> = Vec::new();
    let mut chunk = new_chunk(&None);
    let mut time_offset = 0.0f64;
    let mut previous: Vec<Vec<u32>> = Vec::new();
    let mut previous_times: Vec<Vec<Span>> = Vec::new();
    let mut skip = false;
    let round2 = |x: f64| (x * 100.0).round_ties_even() / 100.0;
    for w in windows {
        let ids = &w.tokens;
        let mut last_timestamp: Option<u32> = None;
        let mut first_timestamp = timestamp_begin as f64;
        let mut cur_max = 0.0f64;
        let mut prev_segments_len = 0.0f64;
        let mut penultimate = 0.0f64;
        if let Some((chunk_len, left, right)) = w.stride {
            time_offset -= left;
            let right_start = chunk_len - right;
            if left > 0.0 {
                first_timestamp = left / time_precision + timestamp_begin as f64;
            }
            if right > 0.0 {
                for &t in ids.iter().rev() {
                    if t >= timestamp_begin {
                        if last_timestamp.is_some()
                            && ((t - timestamp_begin) as f64) * time_precision < right_start
                        {
                            break;
                        }
                        last_timestamp = Some(t);
                    }
                }
            }
        }
        let mut current: Vec<u32> = Vec::new();
        let mut current_times: Vec<Span> = Vec::new();
        let token_times = w.times.as_deref().unwrap_or(&[]);
        let at = |i: usize| token_times.get(i).map_or(0.0, |&x| x as f64);
        for (i, &t) in ids.iter().enumerate() {
            if special.contains(&t) {
                let text = decode(&[t])?;
                let code = text.get(2..text.len().saturating_sub(2)).unwrap_or("");
                if let Some(language) = name_of(code) {
                    let language = language.to_string();
                    if last_language.as_ref().is_some_and(|l| *l != language) && !timestamps {
                        previous.push(std::mem::take(&mut current));
                        chunk.text = decode(&longest_common_sequence(&previous))?;
                        chunks.push(std::mem::replace(&mut chunk, new_chunk(&None)));
                        previous.clear();
                    }
                    chunk.language = Some(language.clone());
                    last_language = Some(language);
                }
            } else if t >= timestamp_begin {
                let ts = (t - timestamp_begin) as f64 * time_precision;
                if ts < cur_max {
                    let last_was_single_ending =
                        i >= 2 && !(ids[i - 1] >= timestamp_begin && ids[i - 2] >= timestamp_begin);
                    if last_was_single_ending {
                        prev_segments_len += time_precision * 1500.0;
                    } else {
                        cur_max = penultimate;
                        prev_segments_len += penultimate;
                    }
                }
                penultimate = cur_max;
                cur_max = ts;
                let time = round2(
                    (t - timestamp_begin) as f64 * time_precision + time_offset + prev_segments_len,
                );
                if last_timestamp.is_some_and(|l| t >= l) {
                    skip = true;
                } else if skip || (!previous.is_empty() && (t as f64) < first_timestamp) {
                    skip = false;
                } else if chunk.start.is_none() {
                    chunk.start = Some(time);
                } else if Some(time) != chunk.start {
                    chunk.end = Some(time);
                    previous.push(std::mem::take(&mut current));
                    if words {
                        previous_times.push(std::mem::take(&mut current_times));
                    }
                    let (tokens, times) = longest_common_sequence_timed(&previous, &previous_times);
                    chunk.text = decode(&tokens)?;
                    if words {
                        chunk.words = collate(&tokens, &times, &last_language)?;
                    }
                    chunks.push(std::mem::replace(&mut chunk, new_chunk(&None)));
                    previous.clear();
                    previous_times.clear();
                }
            } else {
                current.push(t);
                if words {
                    let start = if i == 0 {
                        whisper_words::round2(time_offset)
                    } else {
                        whisper_words::round2(at(i - 1) + time_offset)
                    };
                    current_times.push((start, whisper_words::round2(at(i) + time_offset)));
                }
            }
        }
        if let Some((chunk_len, _, right)) = w.stride {
            time_offset += chunk_len - right;
        }
        if !current.is_empty() {
            previous.push(current);
            if words {
                previous_times.push(current_times);
            }
        } else if !previous.iter().any(|p| !p.is_empty()) {
            chunk = new_chunk(&None);
            previous.clear();
            previous_times.clear();
        }
    }
    if !previous.is_empty() {
        let (tokens, times) = longest_common_sequence_timed(&previous, &previous_times);
        chunk.text = decode(&tokens)?;
        if words {
            chunk.words = collate(&tokens, &times, &last_language)?;
        }
        chunks.push(chunk);
    }
    let full: String = chunks.iter().map(|c| c.text.as_str()).collect();
    if !(timestamps || return_language) {
        return Ok((full, None));
    }
    if words {
        let out = chunks
            .into_iter()
            .flat_map(|c| {
                let language = c.language;
                c.words.into_iter().map(move |(text, (start, end))| {
                    let mut m = Map::new();
                    m.insert("text".into(), Value::String(text));
                    m.insert(
                        "timestamp".into(),
                        Value::Array(vec![Value::from(start), Value::from(end)]),
                    );
                    if return_language {
                        m.insert(
                            "language".into(),
                            language.clone().map_or(Value::Null, Value::String),
                        );
                    }
                    m
                })
            })
            .collect();
        return Ok((full, Some(out)));
    }
    let out = chunks
        .into_iter()
        .map(|c| {
            let mut m = Map::new();
            if return_language {
                m.insert(
                    "language".into(),
                    c.language.map_or(Value::Null, Value::String),
                );
            }
            if timestamps {
                let f = |x: Option<f64>| x.map_or(Value::Null, Value::from);
                m.insert("timestamp".into(), Value::Array(vec![f(c.start), f(c.end)]));
            }
            m.insert("text".into(), Value::String(c.text));
            m
        })
        .collect();
    Ok((full, Some(out)))
}

impl Task for SpeechRecognition {
    fn accepted_params(&self) -> &'static [&'static str] {
        accepted_params()
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        let opts = self.call_options(params)?;
        let waves = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| self.waveform(inp, i))
            .collect::<Result<Vec<_>>>()?;
        let pieces = self.pieces(waves, params, opts.timestamps)?;
        let mut tokens: Vec<PieceTokens> = Vec::with_capacity(pieces.len());
        let refs: Vec<&Piece> = pieces.iter().collect();
        for batch in refs.chunks(batch_size.max(1)) {
            tokens.extend(self.transcribe_batch(batch, &opts)?);
        }
        let rate = self.extractor.sampling_rate as f64;
        let time_precision =
            self.extractor.chunk_length as f64 / self.model.config.max_source_positions as f64;
        let mut outputs = Vec::with_capacity(inputs.len());
        for input in 0..inputs.len() {
            let windows: Vec<WindowTokens> = pieces
                .iter()
                .zip(&tokens)
                .filter(|(p, _)| p.input == input)
                .map(|(p, (t, times, _))| WindowTokens {
                    tokens: t.clone(),
                    times: times.clone(),
                    stride: p
                        .stride
                        .map(|(c, l, r)| (c as f64 / rate, l as f64 / rate, r as f64 / rate)),
                })
                .collect();
            let (text, chunks) = decode_asr(
                &self.tokenizer,
                &self.protocol.special_ids,
                &windows,
                opts.timestamps,
                opts.words,
                opts.return_language,
                time_precision,
            )?;
            let mut m = Map::new();
            m.insert("text".into(), Value::String(text));
            if let Some(c) = chunks {
                m.insert(
                    "chunks".into(),
                    Value::Array(c.into_iter().map(Value::Object).collect()),
                );
            }
            // Window statistics of an input decoded whole (sequential long-form): a chunked
            // input's windows overlap and are merged, so it has none.
            let mut own = pieces.iter().zip(&tokens).filter(|(p, _)| p.input == input);
            if let (true, Some((p, (_, _, w))), None) = (opts.window_stats, own.next(), own.next())
            {
                if p.stride.is_none() {
                    m.insert("windows".into(), Value::Array(w.clone()));
                }
            }
            outputs.push(Output::Speech(m));
        }
        Ok(outputs)
    }

    fn spoken_languages(&self, inputs: &[Input]) -> Result<Option<Vec<String>>> {
        if self.protocol.lang_to_id.is_empty() || !self.protocol.is_multilingual {
            return Ok(None);
        }
        let waves = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| self.waveform(inp, i))
            .collect::<Result<Vec<_>>>()?;
        let ids = self.detect_languages(&waves)?;
        Ok(Some(
            ids.iter()
                .map(|id| {
                    let code = self
                        .protocol
                        .lang_to_id
                        .iter()
                        .find(|(_, t)| t == id)
                        .map_or("", |(c, _)| c.as_str());
                    name_of(code).unwrap_or(code).to_string()
                })
                .collect(),
        ))
    }
}

pub fn load(opts: &PipelineOptions, model: &str) -> Result<SpeechRecognition> {
    SpeechRecognition::load(opts, model)
}

/// The pipeline for `model`: a CTC model (`model_type` wav2vec2) runs
/// [`CtcSpeechRecognition`](super::automatic_speech_recognition_ctc::CtcSpeechRecognition),
/// anything else (Whisper's HF and faster-whisper folders) [`SpeechRecognition`].
pub(crate) fn load_task(opts: &PipelineOptions, model: &str) -> Result<Box<dyn Task>> {
    let dir = crate::hub::resolve_or_download(model, opts.revision.as_deref())?;
    if dir.is_dir() && !is_ct2_dir(&dir) {
        if let Ok(config) = ModelConfig::from_dir(&dir) {
            if super::automatic_speech_recognition_ctc::CTC_TYPES
                .contains(&config.model_type.as_str())
            {
                return Ok(Box::new(
                    super::automatic_speech_recognition_ctc::CtcSpeechRecognition::load(
                        opts, model,
                    )?,
                ));
            }
        }
    }
    Ok(Box::new(SpeechRecognition::load(opts, model)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longest_common_sequence_merges_overlaps() {
        // The overlap "3 4 5" is kept once; each side keeps its half of it.
        let merged = longest_common_sequence(&[vec![1, 2, 3, 4, 5], vec![3, 4, 5, 6, 7]]);
        assert_eq!(merged, vec![1, 2, 3, 4, 5, 6, 7]);
        // No two tokens in common: the windows are concatenated.
        assert_eq!(
            longest_common_sequence(&[vec![1, 2], vec![3, 4]]),
            vec![1, 2, 3, 4]
        );
    }

    #[test]
    fn segments_drop_text_after_the_last_closed_pair() {
        let tb = 100;
        // <0> a b <10><11> c d: c d are left for the next window, which starts at <10>; the
        // kept tokens end with two timestamps.
        assert_eq!(
            retrieve_segment(&[100, 1, 2, 110, 111, 3, 4], tb, 3000),
            (vec![100, 1, 2, 110, 111], 20, true)
        );
        // A last segment that is just the pair does not count as a double ending.
        assert_eq!(
            retrieve_segment(&[100, 1, 110, 110, 111, 3], tb, 3000),
            (vec![100, 1, 110, 110, 111], 20, false)
        );
        // Ends on a single timestamp: everything is kept, the window is done.
        assert_eq!(
            retrieve_segment(&[100, 1, 2, 110], tb, 3000),
            (vec![100, 1, 2, 110], 3000, false)
        );
        // No pair: everything.
        assert_eq!(retrieve_segment(&[1, 2], tb, 500), (vec![1, 2], 500, false));
    }

    #[test]
    fn compression_ratio_is_whispers() {
        // Python: tokens as 2-byte little-endian integers for a 51,865-token vocabulary, over
        // zlib.compress's length. 200 repeats of one token: 400 bytes -> 15 compressed.
        let same = vec![50u32; 200];
        let r = compression_ratio(&same, 51865);
        assert!((r - 400.0 / 15.0).abs() < 1e-9, "{r}");
        // Distinct tokens do not compress: 400 / 411 in Python.
        let distinct: Vec<u32> = (0..200).map(|i| (i * 7919) % 51865).collect();
        let r = compression_ratio(&distinct, 51865);
        assert!((r - 400.0 / 411.0).abs() < 1e-9, "{r}");
    }
}
