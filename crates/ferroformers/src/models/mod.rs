//! AutoModel: `config.model_type` + the head a task needs -> a model.
//!
//! One file per architecture (`bert.rs`, `roberta.rs`, `distilbert.rs`, `bart.rs`, `t5.rs`,
//! `gpt2.rs`, `llama.rs` (Gemma 3 too), `bloom.rs`, `whisper.rs`, `wav2vec2.rs`), each saying
//! which path runs where: candle ops (GPU, any dtype), or for f32 on CPU our kernels
//! (`kernels::cpu`). What two or more share: `layers.rs` (blocks), `encoder_stack.rs` (the BERT family's post-LN layers, both
//! paths), `causal_lm.rs` and `seq2seq.rs` (decoder and encoder-decoder plumbing), `gguf.rs`
//! (reading GGUF files).

pub mod bart;
pub mod bert;
pub mod bloom;
pub mod causal_lm;
pub mod distilbert;
pub mod encoder_stack;
pub mod gguf;
pub mod gpt2;
pub mod layers;
pub mod llama;
pub mod roberta;
pub mod seq2seq;
pub mod t5;
pub mod wav2vec2;
pub mod whisper;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Which head to put on the base model; chosen by the task, as HF's `AutoModelForX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// The bare model: last hidden state `[b, s, h]`.
    Base,
    /// `[b, num_labels]`
    SequenceClassification,
    /// `[b, s, num_labels]`
    TokenClassification,
    /// `[b, s, 2]`: start and end logits.
    QuestionAnswering,
    /// `[b, s, vocab]`
    MaskedLm,
}

impl Head {
    /// The head a checkpoint was saved with, from `config.architectures` (`BertForMaskedLM` ...).
    pub fn from_architectures(architectures: &[String]) -> Head {
        let a = architectures.first().map(String::as_str).unwrap_or("");
        if a.ends_with("ForSequenceClassification") {
            Head::SequenceClassification
        } else if a.ends_with("ForTokenClassification") {
            Head::TokenClassification
        } else if a.ends_with("ForQuestionAnswering") {
            Head::QuestionAnswering
        } else if a.ends_with("ForMaskedLM") || a.ends_with("ForPreTraining") {
            Head::MaskedLm
        } else {
            Head::Base
        }
    }
}

/// An encoder with a head: padded batch in, head output out.
pub trait EncoderModel: Send + Sync {
    /// `input_ids`, `token_type_ids`: `[b, s]` u32; `attention_mask`: `[b, s]` 0/1 (any dtype).
    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> candle_core::Result<Tensor>;
}

pub const ENCODER_TYPES: &[&str] = &["bert", "distilbert", "roberta", "xlm-roberta"];

/// The longest input (in tokens, special tokens included) the model's positions allow.
pub fn max_positions(config: &ModelConfig) -> Option<usize> {
    let n = config.get_usize("max_position_embeddings")?;
    Some(match config.model_type.as_str() {
        // Positions start after the padding index.
        "roberta" | "xlm-roberta" | "camembert" => {
            n.saturating_sub(config.get_usize("pad_token_id").unwrap_or(1) + 1)
        }
        _ => n,
    })
}

/// The error for `--quantize int8` where there is no int8 path (`what` says why).
pub fn int8_unsupported(what: &str) -> Error {
    Error::InvalidParameter {
        name: "quantize".into(),
        detail: format!(
            "int8 quantization applies to encoder models (BERT, DistilBERT, RoBERTa, \
             XLM-RoBERTa) on the CPU; {what}"
        ),
    }
}

/// Load an encoder with its head. `int8`: the layers' products in int8 (CPU, f32); `dtype`
/// bf16 on CPU: in bf16 where the CPU has AVX512-BF16 (f32 with a warning elsewhere).
#[allow(clippy::too_many_arguments)]
pub fn load_encoder(
    dir: &Path,
    config: &ModelConfig,
    head: Head,
    device: &Device,
    dtype: DType,
    int8: bool,
    task: &str,
) -> Result<Box<dyn EncoderModel>> {
    let model_type = config.model_type.as_str();
    // BART's classification head runs its encoder-decoder like an encoder.
    let bart_cls = model_type == "bart" && head == Head::SequenceClassification;
    if !ENCODER_TYPES.contains(&model_type) && !bart_cls {
        return Err(Error::UnsupportedModel {
            model_type: model_type.to_string(),
            task: task.to_string(),
            supported: ENCODER_TYPES.join(", "),
        });
    }
    let weights = Weights::from_dir(dir)?;
    let path = weights.path().to_path_buf();
    // bf16 on CPU: the layers' products through the AVX512-BF16 kernels (f32 sums), loaded
    // in f32 (embeddings, attention, LayerNorm and heads stay f32); f32 where the CPU lacks
    // the instructions. BART keeps candle's path.
    let cpu_bf16 = device.is_cpu() && dtype == DType::BF16 && !bart_cls;
    let load_dtype = if cpu_bf16 { DType::F32 } else { dtype };
    if int8 && (bart_cls || !device.is_cpu() || dtype != DType::F32) {
        return Err(int8_unsupported("it runs with --dtype f32 only"));
    }
    let reduce = if int8 {
        if !crate::kernels::cpu::vnni::available() {
            eprintln!(
                "warning: this CPU has no AVX-512 VNNI instructions: --quantize int8 runs a \
                 portable integer loop, slower than f32"
            );
        }
        Some(encoder_stack::Products::Int8)
    } else if cpu_bf16 && crate::kernels::cpu::bf16::available() {
        Some(encoder_stack::Products::Bf16)
    } else {
        if cpu_bf16 {
            eprintln!(
                "warning: this CPU has no AVX512-BF16 instructions: --dtype bf16 runs the \
                 encoder in f32"
            );
        }
        None
    };
    let vb = weights.into_var_builder(load_dtype, device);
    let n = config.num_labels();
    let wrap = |e: candle_core::Error| Error::Weights {
        path: path.clone(),
        detail: e.to_string(),
    };
    let model: Box<dyn EncoderModel> = match model_type {
        "bert" => {
            Box::new(bert::Bert::load(&config.parse_checked()?, vb, head, n, reduce).map_err(wrap)?)
        }
        "roberta" | "xlm-roberta" => Box::new(
            roberta::Roberta::load(&config.parse_checked()?, vb, head, n, reduce).map_err(wrap)?,
        ),
        "distilbert" => Box::new(
            distilbert::DistilBert::load(&config.parse_checked()?, vb, head, n, reduce)
                .map_err(wrap)?,
        ),
        "bart" => Box::new(
            bart::BartForSequenceClassification::load(&config.parse_checked()?, vb, n)
                .map_err(wrap)?,
        ),
        _ => unreachable!("checked against ENCODER_TYPES"),
    };
    Ok(model)
}

#[cfg(test)]
pub(crate) use crate::kernels::cpu::max_abs_diff;
