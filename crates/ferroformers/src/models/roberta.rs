//! RoBERTa and XLM-RoBERTa (Liu et al. 2019), as `modeling_roberta.py`: BERT's encoder with
//! positions counted from the padding index, no token types in practice, and its own heads.
//!
//! Which path runs where: the layers are `encoder_stack.rs`'s (f32 on CPU through
//! `kernels::cpu`, candle ops otherwise); embeddings and heads are candle ops.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{layer_norm, LayerNorm, VarBuilder};

use super::bert::{base_vb, tied_decoder, BertConfig, BertEmbeddings, BertEncoder};
use super::encoder_stack::Products;
use super::layers::{first_token, linear, Activation, Linear};
use super::{EncoderModel, Head};

/// `create_position_ids_from_input_ids`: real tokens get `padding_idx + 1, +2, ...`, padding
/// tokens keep `padding_idx`.
pub fn position_ids_from_input_ids(input_ids: &Tensor, padding_idx: u32) -> Result<Tensor> {
    let mask = input_ids.ne(padding_idx)?.to_dtype(DType::F32)?;
    let incremental = (mask.cumsum(1)? * &mask)?;
    (incremental + padding_idx as f64)?.to_dtype(DType::U32)
}

enum RobertaHead {
    Base,
    SequenceClassification {
        dense: Linear,
        out_proj: Linear,
    },
    TokenClassification(Linear),
    QuestionAnswering(Linear),
    MaskedLm {
        dense: Linear,
        norm: LayerNorm,
        decoder: Linear,
    },
}

pub struct Roberta {
    embeddings: BertEmbeddings,
    encoder: BertEncoder,
    padding_idx: u32,
    head: RobertaHead,
}

impl Roberta {
    /// `reduce`: the encoder layers' products in int8 or bf16 (CPU, f32 weights).
    pub fn load(
        cfg: &BertConfig,
        vb: VarBuilder,
        head: Head,
        num_labels: usize,
        reduce: Option<Products>,
    ) -> Result<Self> {
        let base = base_vb(&vb, "roberta", "embeddings.word_embeddings.weight");
        let embeddings = BertEmbeddings::load(cfg, base.pp("embeddings"))?;
        let encoder = BertEncoder::load(cfg, base.pp("encoder"), reduce)?;
        let h = cfg.hidden_size;
        let head = match head {
            Head::Base => RobertaHead::Base,
            Head::SequenceClassification => RobertaHead::SequenceClassification {
                dense: linear(h, h, vb.pp("classifier").pp("dense"))?,
                out_proj: linear(h, num_labels, vb.pp("classifier").pp("out_proj"))?,
            },
            Head::TokenClassification => {
                RobertaHead::TokenClassification(linear(h, num_labels, vb.pp("classifier"))?)
            }
            Head::QuestionAnswering => {
                RobertaHead::QuestionAnswering(linear(h, 2, vb.pp("qa_outputs"))?)
            }
            Head::MaskedLm => {
                let p = vb.pp("lm_head");
                RobertaHead::MaskedLm {
                    dense: linear(h, h, p.pp("dense"))?,
                    norm: layer_norm(h, cfg.layer_norm_eps, p.pp("layer_norm"))?,
                    decoder: tied_decoder(
                        &p,
                        embeddings.word_embeddings(),
                        &["bias", "decoder.bias"],
                    )?,
                }
            }
        };
        Ok(Self {
            embeddings,
            encoder,
            padding_idx: cfg.pad_token_id.unwrap_or(1),
            head,
        })
    }
}

impl EncoderModel for Roberta {
    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let position_ids = position_ids_from_input_ids(input_ids, self.padding_idx)?;
        let xs = self
            .embeddings
            .forward(input_ids, token_type_ids, &position_ids)?;
        let xs = self.encoder.forward(&xs, attention_mask)?;
        match &self.head {
            RobertaHead::Base => Ok(xs),
            RobertaHead::SequenceClassification { dense, out_proj } => {
                let x = dense.forward(&first_token(&xs)?)?.tanh()?;
                out_proj.forward(&x)
            }
            RobertaHead::TokenClassification(c) | RobertaHead::QuestionAnswering(c) => {
                c.forward(&xs)
            }
            RobertaHead::MaskedLm {
                dense,
                norm,
                decoder,
            } => {
                let x = norm.forward(&Activation::Gelu.forward(&dense.forward(&xs)?)?)?;
                decoder.forward(&x)
            }
        }
    }
}
