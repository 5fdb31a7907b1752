//! `automatic-speech-recognition` with a CTC model (`Wav2Vec2ForCTC`, HF's default
//! facebook/wav2vec2-base-960h), as transformers 4.57's pipeline runs its "ctc" type:
//!
//! - `preprocess`: each input (a file, bytes, or a waveform resampled to the extractor's rate)
//!   goes through `Wav2Vec2FeatureExtractor` on its own (normalized over its whole length); with
//!   `chunk_length_s`, `chunk_iter` cuts it into overlapping chunks first (chunk and strides
//!   rounded to multiples of `inputs_to_logits_ratio`), each normalized on its own.
//! - `_forward`: batches of `batch_size` pieces (chunks of every input in order) padded to the
//!   longest with `padding_value`, with the attention mask (the pipeline always asks for one);
//!   the frame-wise argmax of the logits. A chunk's stride is rescaled to frames
//!   (`rescale_stride`) and its frames outside the stride are kept.
//! - `postprocess`: the pieces' frames concatenated per input and decoded by the CTC tokenizer
//!   (`skip_special_tokens=False`); `return_timestamps="char"` or `"word"` adds `chunks` with
//!   `timestamp` `[start, end]` in seconds: frame offsets times `inputs_to_logits_ratio` over
//!   the sampling rate.
//!
//! As in HF, an unchunked input batched with longer ones is decoded over the whole padded row
//! (its padding frames too), and a "group"-norm model sees the padding in its GroupNorm.

use candle_core::{Device, Tensor};
use serde_json::{Map, Value};

use super::automatic_speech_recognition::{chunk_sizes, chunk_spans, waveform};
use super::{Input, Output, Params, PipelineOptions, Task};
use crate::audio::Wav2Vec2FeatureExtractor;
use crate::config::ModelConfig;
use crate::ctc::{argmax_rows, CtcTokenizer};
use crate::error::{Error, Result};
use crate::models::wav2vec2::{Wav2Vec2Config, Wav2Vec2ForCtc};
use crate::weights::Weights;

/// `config.model_type` values this pipeline runs.
pub const CTC_TYPES: &[&str] = &["wav2vec2"];

const PARAMS: &[&str] = &[
    "return_timestamps",
    "chunk_length_s",
    "stride_length_s",
    "ignore_warning",
    "return_language",
];

/// HF's message for `return_timestamps` other than "char" or "word" on a CTC model.
const TIMESTAMPS_ERROR: &str = "CTC can either predict character level timestamps, or word level \
     timestamps. Set `return_timestamps='char'` or `return_timestamps='word'` as required.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timestamps {
    Char,
    Word,
}

/// One piece of audio the model sees: a whole input, or a chunk of one.
struct Piece {
    input: usize,
    samples: Vec<f32>,
    /// `(chunk samples, left stride, right stride)` of a chunk.
    stride: Option<(usize, usize, usize)>,
}

pub struct CtcSpeechRecognition {
    pub model: Wav2Vec2ForCtc,
    pub tokenizer: CtcTokenizer,
    pub extractor: Wav2Vec2FeatureExtractor,
    device: Device,
}

impl CtcSpeechRecognition {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        let dir = super::automatic_speech_recognition::model_folder(opts, model)?;
        if let Some(q) = opts.quantize {
            return Err(q.unsupported("wav2vec2 runs in f32 or the --dtype given"));
        }
        let config = ModelConfig::from_dir(&dir)?;
        if !CTC_TYPES.contains(&config.model_type.as_str()) {
            return Err(Error::UnsupportedModel {
                model_type: config.model_type.clone(),
                task: "automatic-speech-recognition (CTC)".into(),
                supported: CTC_TYPES.join(", "),
            });
        }
        if !config.architectures.is_empty()
            && !config.architectures.iter().any(|a| a.ends_with("ForCTC"))
        {
            return Err(Error::invalid_file(
                &config.path,
                format!(
                    "architectures {:?} has no CTC head (Wav2Vec2ForCTC): speech recognition \
                     needs a fine-tuned checkpoint",
                    config.architectures
                ),
            ));
        }
        let cfg: Wav2Vec2Config = config.parse()?;
        cfg.validate()
            .map_err(|e| Error::invalid_file(&config.path, e))?;
        let tok_dir = match &opts.tokenizer {
            Some(t) => crate::hub::resolve_or_download(t, opts.revision.as_deref())?,
            None => dir.clone(),
        };
        let tokenizer = CtcTokenizer::from_dir(&tok_dir)?;
        let pre = dir.join("preprocessor_config.json");
        let extractor = if pre.is_file() {
            Wav2Vec2FeatureExtractor::from_preprocessor_config(&pre)?
        } else {
            Wav2Vec2FeatureExtractor::default()
        };
        let weights = Weights::from_dir(&dir)?;
        let path = weights.path().to_path_buf();
        let vb = weights.into_var_builder(opts.dtype, &opts.device);
        let model = Wav2Vec2ForCtc::load(&cfg, vb).map_err(|e| Error::Weights {
            path,
            detail: e.to_string(),
        })?;
        Ok(Self {
            model,
            tokenizer,
            extractor,
            device: opts.device.clone(),
        })
    }

    /// Logits `[b, frames, vocab]` of 16 kHz (the extractor's rate) waveforms as one batch,
    /// the way the pipeline feeds them: each normalized on its own, padded to the longest, with
    /// the attention mask.
    pub fn logits(&self, waves: &[&[f32]]) -> Result<Tensor> {
        let b = waves.len();
        let longest = waves.iter().map(|w| w.len()).max().unwrap_or(0);
        let mut values = Vec::with_capacity(b * longest);
        for w in waves {
            let mut row = self.extractor.extract(w);
            row.resize(longest, self.extractor.padding_value);
            values.extend(row);
        }
        let input = Tensor::from_vec(values, (b, longest), &self.device)?;
        let lengths: Vec<usize> = waves.iter().map(|w| w.len()).collect();
        Ok(self
            .model
            .forward(&input, Some(&lengths))?
            .to_dtype(candle_core::DType::F32)?)
    }

    fn timestamps(params: &Params) -> Result<Option<Timestamps>> {
        match params.get("return_timestamps") {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s == "char" => Ok(Some(Timestamps::Char)),
            Some(Value::String(s)) if s == "word" => Ok(Some(Timestamps::Word)),
            Some(_) => Err(Error::param("return_timestamps", TIMESTAMPS_ERROR)),
        }
    }

    /// Cut the waveforms into the pieces the model sees.
    fn pieces(&self, waves: Vec<Vec<f32>>, params: &Params) -> Result<Vec<Piece>> {
        let rate = f64::from(self.extractor.sampling_rate);
        let ratio = self.model.config.inputs_to_logits_ratio();
        let sizes = chunk_sizes(params, rate, ratio)?;
        let field = self.model.config.receptive_field();
        let mut out = Vec::new();
        for (input, samples) in waves.into_iter().enumerate() {
            if samples.is_empty() {
                return Err(Error::input(input, "the audio has no samples"));
            }
            let pieces: Vec<Piece> = match sizes {
                None => vec![Piece {
                    input,
                    samples,
                    stride: None,
                }],
                Some((chunk_len, left, right)) => {
                    chunk_spans(samples.len(), chunk_len, left, right)
                        .into_iter()
                        .map(|(start, end, l, r)| Piece {
                            input,
                            samples: samples[start..end].to_vec(),
                            stride: Some((end - start, l, r)),
                        })
                        .collect()
                }
            };
            if let Some(p) = pieces.iter().find(|p| p.samples.len() < field) {
                return Err(Error::input(
                    input,
                    format!(
                        "{} {} samples are fewer than the {field} the model's convolutions need \
                         for one frame ({:.1} ms at {} Hz)",
                        if p.stride.is_some() {
                            "a chunk of"
                        } else {
                            "the audio's"
                        },
                        p.samples.len(),
                        field as f64 * 1000.0 / rate,
                        self.extractor.sampling_rate
                    ),
                ));
            }
            out.extend(pieces);
        }
        Ok(out)
    }

    /// The frame-wise argmax of each piece of a batch, each cut to what the pipeline keeps: a
    /// chunk's frames between its strides, an unchunked input's whole (padded) row.
    fn tokens(&self, batch: &[&Piece]) -> Result<Vec<Vec<u32>>> {
        let waves: Vec<&[f32]> = batch.iter().map(|p| p.samples.as_slice()).collect();
        let logits = self.logits(&waves)?;
        let (b, t, vocab) = logits.dims3()?;
        let flat: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let ratio = self.model.config.inputs_to_logits_ratio();
        let mut out = Vec::with_capacity(b);
        for (row, piece) in flat.chunks_exact((t * vocab).max(1)).zip(batch) {
            let ids = argmax_rows(row, vocab);
            let ids = match piece.stride {
                None => ids,
                Some(stride) => {
                    let (total, left, right) = rescale_stride(stride, ratio);
                    // `items[:, left:total - right]` with Python's clamping.
                    let end = total.saturating_sub(right).min(ids.len());
                    ids[left.min(end)..end].to_vec()
                }
            };
            out.push(ids);
        }
        Ok(out)
    }
}

/// `rescale_stride`: a chunk's `(samples, left, right)` in frames, rounded as Python's
/// `int(round(...))` with the ratio `1 / inputs_to_logits_ratio`.
fn rescale_stride(
    stride: (usize, usize, usize),
    inputs_to_logits_ratio: usize,
) -> (usize, usize, usize) {
    let (n, left, right) = stride;
    let ratio = 1.0 / inputs_to_logits_ratio as f64;
    let token_n = (n as f64 * ratio).round_ties_even();
    let scale = |s: usize| (s as f64 / n as f64 * token_n).round_ties_even() as usize;
    (token_n as usize, scale(left), scale(right))
}

impl Task for CtcSpeechRecognition {
    fn accepted_params(&self) -> &'static [&'static str] {
        PARAMS
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        if !matches!(params.get("return_language"), None | Some(Value::Null)) {
            return Err(Error::param(
                "return_language",
                "Only Whisper can return language for now.",
            ));
        }
        let timestamps = Self::timestamps(params)?;
        let rate = self.extractor.sampling_rate;
        let waves = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| waveform(inp, i, rate))
            .collect::<Result<Vec<_>>>()?;
        let pieces = self.pieces(waves, params)?;
        let refs: Vec<&Piece> = pieces.iter().collect();
        let mut ids: Vec<Vec<u32>> = vec![Vec::new(); inputs.len()];
        for batch in refs.chunks(batch_size.max(1)) {
            for (piece, tokens) in batch.iter().zip(self.tokens(batch)?) {
                ids[piece.input].extend(tokens);
            }
        }
        let seconds = self.model.config.inputs_to_logits_ratio() as f64;
        let rate = f64::from(rate);
        let span = |start: usize, end: usize| {
            Value::Array(vec![
                Value::from(start as f64 * seconds / rate),
                Value::from(end as f64 * seconds / rate),
            ])
        };
        let chunk = |text: String, start: usize, end: usize| {
            let mut m = Map::new();
            m.insert("text".into(), Value::String(text));
            m.insert("timestamp".into(), span(start, end));
            Value::Object(m)
        };
        Ok(ids
            .iter()
            .map(|ids| {
                let (text, chars) = self.tokenizer.decode_with_offsets(ids);
                let mut m = Map::new();
                m.insert("text".into(), Value::String(text));
                if let Some(kind) = timestamps {
                    let chunks: Vec<Value> = match kind {
                        Timestamps::Char => chars
                            .into_iter()
                            .map(|c| chunk(c.char, c.start_offset, c.end_offset))
                            .collect(),
                        Timestamps::Word => self
                            .tokenizer
                            .word_offsets(&chars)
                            .into_iter()
                            .map(|w| chunk(w.word, w.start_offset, w.end_offset))
                            .collect(),
                    };
                    m.insert("chunks".into(), Value::Array(chunks));
                }
                Output::Speech(m)
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strides_rescale_as_python_rounds() {
        // (160_000, 16_000, 16_000) -> (500, 50, 50) at 320 samples a frame.
        assert_eq!(
            rescale_stride((160_000, 16_000, 16_000), 320),
            (500, 50, 50)
        );
        // 50 / 20 = 2.5 frames rounds to even (2); 70 / 20 = 3.5 to 4.
        assert_eq!(rescale_stride((200, 50, 70), 20), (10, 2, 4));
        // Chunks of 45-sample frames: the ratio 1/45 is inexact, as in Python.
        let n = 1000usize;
        let token_n = (n as f64 * (1.0 / 45.0)).round_ties_even() as usize;
        assert_eq!(rescale_stride((n, 0, 0), 45), (token_n, 0, 0));
    }

    #[test]
    fn chunk_sizes_align_to_the_frame_ratio() {
        let mut p = Params::new();
        p.insert("chunk_length_s".into(), Value::from(1.0));
        p.insert("stride_length_s".into(), Value::from(vec![0.25, 0.1]));
        // 16000 / 80 = 200 frames; 4000 / 80 = 50; 1600 / 80 = 20.
        assert_eq!(
            chunk_sizes(&p, 16000.0, 80).unwrap(),
            Some((16000, 4000, 1600))
        );
        // 0.1 s at 45 samples a frame: 1600 / 45 = 35.6 -> 36 frames.
        assert_eq!(
            chunk_sizes(&p, 16000.0, 45).unwrap(),
            Some((16020, 4005, 1620))
        );
        p.insert("chunk_length_s".into(), Value::from(0.0));
        assert_eq!(chunk_sizes(&p, 16000.0, 80).unwrap(), None);
    }
}
