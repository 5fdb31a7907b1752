//! DistilBERT (Sanh et al. 2019), as `modeling_distilbert.py`: BERT without token types and
//! pooler, six post-LN layers with `q_lin/k_lin/v_lin/out_lin`, and its heads.
//!
//! Which path runs where: the layers are `encoder_stack.rs`'s (f32 on CPU through
//! `kernels::cpu`, candle ops otherwise); embeddings and heads are candle ops.

use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, Embedding, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::bert::base_vb;
use super::encoder_stack::{PostLnLayer, PostLnStack, Products};
use super::layers::{add_broadcast, first_token, linear, Activation, Linear};
use super::{EncoderModel, Head};

#[derive(Debug, Clone, Deserialize)]
pub struct DistilBertConfig {
    pub vocab_size: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub hidden_dim: usize,
    #[serde(default)]
    pub activation: Activation,
    pub max_position_embeddings: usize,
}

impl crate::config::CheckedConfig for DistilBertConfig {
    fn check(&self) -> std::result::Result<(), String> {
        crate::config::check_heads("dim", self.dim, "n_heads", self.n_heads)
    }
}

const EPS: f64 = 1e-12;

fn load_layer(cfg: &DistilBertConfig, vb: VarBuilder) -> Result<PostLnLayer> {
    let (d, h) = (cfg.dim, cfg.hidden_dim);
    let a = vb.pp("attention");
    Ok(PostLnLayer {
        query: linear(d, d, a.pp("q_lin"))?,
        key: linear(d, d, a.pp("k_lin"))?,
        value: linear(d, d, a.pp("v_lin"))?,
        attn_out: linear(d, d, a.pp("out_lin"))?,
        attn_norm: layer_norm(d, EPS, vb.pp("sa_layer_norm"))?,
        ff_in: linear(d, h, vb.pp("ffn").pp("lin1"))?,
        act: cfg.activation,
        ff_out: linear(h, d, vb.pp("ffn").pp("lin2"))?,
        out_norm: layer_norm(d, EPS, vb.pp("output_layer_norm"))?,
        num_heads: cfg.n_heads,
    })
}

enum DistilBertHead {
    Base,
    SequenceClassification {
        pre_classifier: Linear,
        classifier: Linear,
    },
    TokenClassification(Linear),
    QuestionAnswering(Linear),
    MaskedLm {
        transform: Linear,
        act: Activation,
        norm: LayerNorm,
        projector: Linear,
    },
}

pub struct DistilBert {
    word: Embedding,
    position: Embedding,
    emb_norm: LayerNorm,
    layers: PostLnStack,
    head: DistilBertHead,
}

impl DistilBert {
    /// `reduce`: the layers' products in int8 or bf16 (CPU, f32 weights).
    pub fn load(
        cfg: &DistilBertConfig,
        vb: VarBuilder,
        head: Head,
        num_labels: usize,
        reduce: Option<Products>,
    ) -> Result<Self> {
        let base = base_vb(&vb, "distilbert", "embeddings.word_embeddings.weight");
        let e = base.pp("embeddings");
        let word = embedding(cfg.vocab_size, cfg.dim, e.pp("word_embeddings"))?;
        let position = embedding(
            cfg.max_position_embeddings,
            cfg.dim,
            e.pp("position_embeddings"),
        )?;
        let emb_norm = layer_norm(cfg.dim, EPS, e.pp("LayerNorm"))?;
        let layers = PostLnStack::new(
            (0..cfg.n_layers).map(|i| load_layer(cfg, base.pp("transformer").pp("layer").pp(i))),
            vb.device(),
            vb.dtype(),
            reduce,
        )?;
        let d = cfg.dim;
        let head = match head {
            Head::Base => DistilBertHead::Base,
            Head::SequenceClassification => DistilBertHead::SequenceClassification {
                pre_classifier: linear(d, d, vb.pp("pre_classifier"))?,
                classifier: linear(d, num_labels, vb.pp("classifier"))?,
            },
            Head::TokenClassification => {
                DistilBertHead::TokenClassification(linear(d, num_labels, vb.pp("classifier"))?)
            }
            Head::QuestionAnswering => {
                DistilBertHead::QuestionAnswering(linear(d, 2, vb.pp("qa_outputs"))?)
            }
            Head::MaskedLm => DistilBertHead::MaskedLm {
                transform: linear(d, d, vb.pp("vocab_transform"))?,
                act: cfg.activation,
                norm: layer_norm(d, EPS, vb.pp("vocab_layer_norm"))?,
                projector: {
                    // `vocab_projector` is tied to the word embeddings.
                    let w = if vb.contains_tensor("vocab_projector.weight") {
                        vb.get((cfg.vocab_size, d), "vocab_projector.weight")?
                    } else {
                        word.embeddings().clone()
                    };
                    Linear::new(w, Some(vb.get(cfg.vocab_size, "vocab_projector.bias")?))?
                },
            },
        };
        Ok(Self {
            word,
            position,
            emb_norm,
            layers,
            head,
        })
    }
}

impl EncoderModel for DistilBert {
    fn forward(
        &self,
        input_ids: &Tensor,
        _token_type_ids: &Tensor,
        attention_mask: &Tensor,
    ) -> Result<Tensor> {
        let seq_len = input_ids.dim(1)?;
        let pos = Tensor::arange(0u32, seq_len as u32, input_ids.device())?.unsqueeze(0)?;
        let xs = add_broadcast(
            &self.word.forward(input_ids)?,
            &self.position.forward(&pos)?,
        )?;
        let xs = self.emb_norm.forward(&xs)?;
        let xs = self.layers.forward(&xs, attention_mask)?;
        match &self.head {
            DistilBertHead::Base => Ok(xs),
            DistilBertHead::SequenceClassification {
                pre_classifier,
                classifier,
            } => {
                let x = pre_classifier.forward(&first_token(&xs)?)?.relu()?;
                classifier.forward(&x)
            }
            DistilBertHead::TokenClassification(c) | DistilBertHead::QuestionAnswering(c) => {
                c.forward(&xs)
            }
            DistilBertHead::MaskedLm {
                transform,
                act,
                norm,
                projector,
            } => {
                let x = norm.forward(&act.forward(&transform.forward(&xs)?)?)?;
                projector.forward(&x)
            }
        }
    }
}
