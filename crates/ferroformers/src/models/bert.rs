//! BERT (Devlin et al. 2018), as `modeling_bert.py`: embeddings, post-LN encoder layers, pooler,
//! and the task heads. RoBERTa reuses the encoder stack from here (see `roberta.rs`).
//!
//! Which path runs where: the layers are `encoder_stack.rs`'s (f32 on CPU through
//! `kernels::cpu`, candle ops otherwise); embeddings, pooler and heads are candle ops.

use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::encoder_stack::{PostLnLayer, PostLnStack, Products};
use super::layers::{add_broadcast, first_token, linear, Activation, Linear};
use super::{EncoderModel, Head};

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl crate::config::CheckedConfig for BertConfig {
    fn check(&self) -> std::result::Result<(), String> {
        crate::config::check_heads(
            "hidden_size",
            self.hidden_size,
            "num_attention_heads",
            self.num_attention_heads,
        )
    }
}

pub struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Option<Embedding>,
    norm: LayerNorm,
}

impl BertEmbeddings {
    pub fn load(cfg: &BertConfig, vb: VarBuilder) -> Result<Self> {
        let token_type = if cfg.type_vocab_size > 0 {
            Some(embedding(
                cfg.type_vocab_size,
                cfg.hidden_size,
                vb.pp("token_type_embeddings"),
            )?)
        } else {
            None
        };
        Ok(Self {
            word: embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("word_embeddings"))?,
            position: embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embeddings"),
            )?,
            token_type,
            norm: layer_norm(cfg.hidden_size, cfg.layer_norm_eps, vb.pp("LayerNorm"))?,
        })
    }

    pub fn word_embeddings(&self) -> &Tensor {
        self.word.embeddings()
    }

    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        let mut xs = self.word.forward(input_ids)?;
        if let Some(tt) = &self.token_type {
            xs = add_broadcast(&xs, &tt.forward(token_type_ids)?)?;
        }
        xs = add_broadcast(&xs, &self.position.forward(position_ids)?)?;
        self.norm.forward(&xs)
    }
}

fn load_layer(cfg: &BertConfig, vb: VarBuilder) -> Result<PostLnLayer> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let att = vb.pp("attention");
    Ok(PostLnLayer {
        query: linear(h, h, att.pp("self").pp("query"))?,
        key: linear(h, h, att.pp("self").pp("key"))?,
        value: linear(h, h, att.pp("self").pp("value"))?,
        attn_out: linear(h, h, att.pp("output").pp("dense"))?,
        attn_norm: layer_norm(h, cfg.layer_norm_eps, att.pp("output").pp("LayerNorm"))?,
        ff_in: linear(h, i, vb.pp("intermediate").pp("dense"))?,
        act: cfg.hidden_act,
        ff_out: linear(i, h, vb.pp("output").pp("dense"))?,
        out_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("output").pp("LayerNorm"))?,
        num_heads: cfg.num_attention_heads,
    })
}

/// The stack of post-LN transformer layers (`encoder.layer.N`).
pub struct BertEncoder {
    stack: PostLnStack,
}

impl BertEncoder {
    /// `reduce`: the layers' products in int8 or bf16 (CPU, f32 weights).
    pub fn load(cfg: &BertConfig, vb: VarBuilder, reduce: Option<Products>) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers).map(|i| load_layer(cfg, vb.pp("layer").pp(i)));
        Ok(Self {
            stack: PostLnStack::new(layers, vb.device(), vb.dtype(), reduce)?,
        })
    }

    /// `attention_mask` is the 0/1 `[b, s]` mask.
    pub fn forward(&self, xs: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
        self.stack.forward(xs, attention_mask)
    }
}

pub struct BertModel {
    pub embeddings: BertEmbeddings,
    pub encoder: BertEncoder,
}

impl BertModel {
    pub fn load(cfg: &BertConfig, vb: VarBuilder, reduce: Option<Products>) -> Result<Self> {
        Ok(Self {
            embeddings: BertEmbeddings::load(cfg, vb.pp("embeddings"))?,
            encoder: BertEncoder::load(cfg, vb.pp("encoder"), reduce)?,
        })
    }

    /// Last hidden state `[b, s, h]`.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let position_ids =
            Tensor::arange(0u32, seq_len as u32, input_ids.device())?.unsqueeze(0)?;
        let xs = self
            .embeddings
            .forward(input_ids, token_type_ids, &position_ids)?;
        self.encoder.forward(&xs, attention_mask)
    }
}

/// `cls.predictions`: transform (dense, act, LayerNorm) then the decoder tied to the word
/// embeddings.
struct BertLmHead {
    dense: Linear,
    act: Activation,
    norm: LayerNorm,
    decoder: Linear,
}

enum BertHead {
    Base,
    SequenceClassification { pooler: Linear, classifier: Linear },
    TokenClassification(Linear),
    QuestionAnswering(Linear),
    MaskedLm(BertLmHead),
}

pub struct Bert {
    model: BertModel,
    head: BertHead,
}

/// The base model's prefix inside a head checkpoint; bare checkpoints have none.
pub(crate) fn base_vb<'a>(vb: &VarBuilder<'a>, prefix: &str, probe: &str) -> VarBuilder<'a> {
    if vb.contains_tensor(&format!("{prefix}.{probe}")) {
        vb.pp(prefix)
    } else {
        vb.clone()
    }
}

/// A tied decoder: its own weight when the checkpoint has one, else the word embeddings.
pub(crate) fn tied_decoder(
    vb: &VarBuilder,
    word_embeddings: &Tensor,
    bias_names: &[&str],
) -> Result<Linear> {
    let (v, h) = word_embeddings.dims2()?;
    let weight = if vb.contains_tensor("decoder.weight") {
        vb.get((v, h), "decoder.weight")?
    } else {
        word_embeddings.clone()
    };
    let mut bias = None;
    for name in bias_names {
        if vb.contains_tensor(name) {
            bias = Some(vb.get(v, name)?);
            break;
        }
    }
    let bias = match bias {
        Some(b) => b,
        None => vb.get(v, bias_names[0])?, // errors naming the tensor
    };
    Linear::new(weight, Some(bias))
}

impl Bert {
    /// `reduce`: the encoder layers' products in int8 or bf16 (CPU, f32 weights).
    pub fn load(
        cfg: &BertConfig,
        vb: VarBuilder,
        head: Head,
        num_labels: usize,
        reduce: Option<Products>,
    ) -> Result<Self> {
        let base = base_vb(&vb, "bert", "embeddings.word_embeddings.weight");
        let model = BertModel::load(cfg, base.clone(), reduce)?;
        let h = cfg.hidden_size;
        let head = match head {
            Head::Base => BertHead::Base,
            Head::SequenceClassification => BertHead::SequenceClassification {
                pooler: linear(h, h, base.pp("pooler").pp("dense"))?,
                classifier: linear(h, num_labels, vb.pp("classifier"))?,
            },
            Head::TokenClassification => {
                BertHead::TokenClassification(linear(h, num_labels, vb.pp("classifier"))?)
            }
            Head::QuestionAnswering => {
                BertHead::QuestionAnswering(linear(h, 2, vb.pp("qa_outputs"))?)
            }
            Head::MaskedLm => {
                let p = vb.pp("cls").pp("predictions");
                BertHead::MaskedLm(BertLmHead {
                    dense: linear(h, h, p.pp("transform").pp("dense"))?,
                    act: cfg.hidden_act,
                    norm: layer_norm(h, cfg.layer_norm_eps, p.pp("transform").pp("LayerNorm"))?,
                    decoder: tied_decoder(
                        &p,
                        model.embeddings.word_embeddings(),
                        &["bias", "decoder.bias"],
                    )?,
                })
            }
        };
        Ok(Self { model, head })
    }
}

impl EncoderModel for Bert {
    fn forward(
        &self,
        input_ids: &Tensor,
        token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let xs = self
            .model
            .forward(input_ids, token_type_ids, attention_mask)?;
        match &self.head {
            BertHead::Base => Ok(xs),
            BertHead::SequenceClassification { pooler, classifier } => {
                let pooled = pooler.forward(&first_token(&xs)?)?.tanh()?;
                classifier.forward(&pooled)
            }
            BertHead::TokenClassification(c) | BertHead::QuestionAnswering(c) => c.forward(&xs),
            BertHead::MaskedLm(lm) => {
                let xs = lm.norm.forward(&lm.act.forward(&lm.dense.forward(&xs)?)?)?;
                lm.decoder.forward(&xs)
            }
        }
    }
}
