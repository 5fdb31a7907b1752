//! The trainable encoder: BERT, DistilBERT and RoBERTa/XLM-RoBERTa with a sequence
//! classification head, built from candle ops that all record their backward pass, over
//! parameters held as candle `Var`s under Hugging Face's tensor names.
//!
//! Why not the inference models in `models/`: their CPU path runs hand-written kernels over
//! plain buffers (no autograd), and their candle path uses fused ops that record no backward
//! (candle's contiguous LayerNorm, `softmax_last_dim`, the fast GELU). Here every op is
//! differentiable: LayerNorm, softmax and GELU are [`super::ops`]' fused ops with their own
//! backward (candle's composite ones elsewhere than CPU f32), plus matmuls and `index_select`
//! embeddings. Dropout sits where HF's modeling code puts it, drawn from the
//! trainer's seeded generator, and is off at evaluation. The saved model is served by the
//! inference models (a test checks the two give the same logits).

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use serde_json::Value;

use super::data::Task;
use super::optim::Rng;
use crate::error::{Error, Result};
use crate::weights::Weights;

/// Architecture families the trainer builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    Bert,
    DistilBert,
    /// RoBERTa, XLM-RoBERTa, CamemBERT: BERT's layers, positions from the padding index.
    Roberta,
}

impl Arch {
    /// The base model's prefix in a head model's checkpoint.
    pub fn prefix(self) -> &'static str {
        match self {
            Arch::Bert => "bert",
            Arch::DistilBert => "distilbert",
            Arch::Roberta => "roberta",
        }
    }

    /// `architectures` entry of the saved config.
    pub fn head_class(self, model_type: &str, task: Task) -> String {
        let base = match self {
            Arch::Bert => "Bert",
            Arch::DistilBert => "DistilBert",
            Arch::Roberta => match model_type {
                "xlm-roberta" => "XLMRoberta",
                "camembert" => "Camembert",
                _ => "Roberta",
            },
        };
        let head = match task {
            Task::TextClassification => "SequenceClassification",
            Task::TokenClassification => "TokenClassification",
            Task::QuestionAnswering => "QuestionAnswering",
        };
        format!("{base}For{head}")
    }
}

/// Activation between the feed-forward products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Act {
    Gelu,
    GeluNew,
    Relu,
}

/// What the trainer needs from `config.json` (HF's names and defaults).
#[derive(Debug, Clone)]
pub struct EncoderConfig {
    pub arch: Arch,
    pub model_type: String,
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub inter: usize,
    pub max_pos: usize,
    pub type_vocab: usize,
    pub eps: f64,
    pub act: Act,
    pub pad_id: u32,
    pub hidden_dropout: f64,
    pub attn_dropout: f64,
    /// Dropout before the classifier (BERT/RoBERTa `classifier_dropout`, else the hidden one;
    /// DistilBERT `seq_classif_dropout`).
    pub head_dropout: f64,
    /// Dropout before the question-answering head (DistilBERT's `qa_dropout`; BERT and
    /// RoBERTa have none).
    pub qa_dropout: f64,
    pub init_range: f64,
    /// The whole `config.json`, written back (with the labels) when saving.
    pub raw: Value,
}

fn field<'a>(raw: &'a Value, name: &str) -> Option<&'a Value> {
    raw.get(name).filter(|v| !v.is_null())
}

impl EncoderConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let raw = crate::config::read_json(&path)?;
        let bad = |d: String| Error::invalid_file(&path, d);
        let model_type = field(&raw, "model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| bad("no `model_type`".into()))?
            .to_string();
        let arch = match model_type.as_str() {
            "bert" => Arch::Bert,
            "distilbert" => Arch::DistilBert,
            "roberta" | "xlm-roberta" | "camembert" => Arch::Roberta,
            other => {
                return Err(Error::UnsupportedModel {
                    model_type: other.into(),
                    task: "train".into(),
                    supported: "bert, distilbert, roberta, xlm-roberta, camembert".into(),
                })
            }
        };
        let usize_of = |name: &str, default: Option<usize>| -> Result<usize> {
            match field(&raw, name) {
                Some(v) => v
                    .as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| bad(format!("`{name}` is not a whole number"))),
                None => default.ok_or_else(|| bad(format!("no `{name}`"))),
            }
        };
        let f64_of = |name: &str, default: f64| -> Result<f64> {
            match field(&raw, name) {
                Some(v) => v
                    .as_f64()
                    .ok_or_else(|| bad(format!("`{name}` is not a number"))),
                None => Ok(default),
            }
        };
        let act_of = |name: &str| -> Result<Act> {
            match field(&raw, name).and_then(Value::as_str).unwrap_or("gelu") {
                "gelu" => Ok(Act::Gelu),
                "gelu_new" | "gelu_pytorch_tanh" => Ok(Act::GeluNew),
                "relu" => Ok(Act::Relu),
                other => Err(bad(format!(
                    "activation `{other}` is not supported for training"
                ))),
            }
        };
        if let Some(p) = field(&raw, "position_embedding_type").and_then(Value::as_str) {
            if p != "absolute" {
                return Err(bad(format!(
                    "position_embedding_type `{p}`: training supports absolute positions"
                )));
            }
        }
        let init_range = f64_of("initializer_range", 0.02)?;
        let cfg = if arch == Arch::DistilBert {
            let dropout = f64_of("dropout", 0.1)?;
            EncoderConfig {
                arch,
                model_type,
                vocab: usize_of("vocab_size", None)?,
                hidden: usize_of("dim", None)?,
                layers: usize_of("n_layers", None)?,
                heads: usize_of("n_heads", None)?,
                inter: usize_of("hidden_dim", None)?,
                max_pos: usize_of("max_position_embeddings", None)?,
                type_vocab: 0,
                eps: 1e-12,
                act: act_of("activation")?,
                pad_id: usize_of("pad_token_id", Some(0))? as u32,
                hidden_dropout: dropout,
                attn_dropout: f64_of("attention_dropout", 0.1)?,
                head_dropout: f64_of("seq_classif_dropout", 0.2)?,
                qa_dropout: f64_of("qa_dropout", 0.1)?,
                init_range,
                raw: raw.clone(),
            }
        } else {
            let hidden_dropout = f64_of("hidden_dropout_prob", 0.1)?;
            let pad_default = if arch == Arch::Roberta { 1 } else { 0 };
            EncoderConfig {
                arch,
                model_type,
                vocab: usize_of("vocab_size", None)?,
                hidden: usize_of("hidden_size", None)?,
                layers: usize_of("num_hidden_layers", None)?,
                heads: usize_of("num_attention_heads", None)?,
                inter: usize_of("intermediate_size", None)?,
                max_pos: usize_of("max_position_embeddings", None)?,
                type_vocab: usize_of("type_vocab_size", Some(2))?,
                eps: f64_of("layer_norm_eps", 1e-12)?,
                act: act_of("hidden_act")?,
                pad_id: usize_of("pad_token_id", Some(pad_default))? as u32,
                hidden_dropout,
                attn_dropout: f64_of("attention_probs_dropout_prob", 0.1)?,
                head_dropout: f64_of("classifier_dropout", hidden_dropout)?,
                qa_dropout: 0.0,
                init_range,
                raw: raw.clone(),
            }
        };
        if cfg.heads == 0 || cfg.hidden % cfg.heads != 0 {
            return Err(bad(format!(
                "hidden size {} is not a multiple of {} heads",
                cfg.hidden, cfg.heads
            )));
        }
        Ok(cfg)
    }

    /// Every parameter of the model with `task`'s head: HF name and shape, in the order HF's
    /// module tree lists them. Token classification and question answering have no pooler.
    pub fn parameters(&self, task: Task, num_labels: usize) -> Vec<(String, Vec<usize>)> {
        let (h, p) = (self.hidden, self.arch.prefix());
        let mut out: Vec<(String, Vec<usize>)> = Vec::new();
        let linear = |out: &mut Vec<(String, Vec<usize>)>, name: String, o: usize, i: usize| {
            out.push((format!("{name}.weight"), vec![o, i]));
            out.push((format!("{name}.bias"), vec![o]));
        };
        let norm = |out: &mut Vec<(String, Vec<usize>)>, name: String| {
            out.push((format!("{name}.weight"), vec![h]));
            out.push((format!("{name}.bias"), vec![h]));
        };
        let e = format!("{p}.embeddings");
        out.push((format!("{e}.word_embeddings.weight"), vec![self.vocab, h]));
        out.push((
            format!("{e}.position_embeddings.weight"),
            vec![self.max_pos, h],
        ));
        if self.type_vocab > 0 {
            out.push((
                format!("{e}.token_type_embeddings.weight"),
                vec![self.type_vocab, h],
            ));
        }
        norm(&mut out, format!("{e}.LayerNorm"));
        for l in 0..self.layers {
            if self.arch == Arch::DistilBert {
                let b = format!("{p}.transformer.layer.{l}");
                for n in ["q_lin", "k_lin", "v_lin", "out_lin"] {
                    linear(&mut out, format!("{b}.attention.{n}"), h, h);
                }
                norm(&mut out, format!("{b}.sa_layer_norm"));
                linear(&mut out, format!("{b}.ffn.lin1"), self.inter, h);
                linear(&mut out, format!("{b}.ffn.lin2"), h, self.inter);
                norm(&mut out, format!("{b}.output_layer_norm"));
            } else {
                let b = format!("{p}.encoder.layer.{l}");
                for n in ["query", "key", "value"] {
                    linear(&mut out, format!("{b}.attention.self.{n}"), h, h);
                }
                linear(&mut out, format!("{b}.attention.output.dense"), h, h);
                norm(&mut out, format!("{b}.attention.output.LayerNorm"));
                linear(&mut out, format!("{b}.intermediate.dense"), self.inter, h);
                linear(&mut out, format!("{b}.output.dense"), h, self.inter);
                norm(&mut out, format!("{b}.output.LayerNorm"));
            }
        }
        match (task, self.arch) {
            (Task::TokenClassification, _) => linear(&mut out, "classifier".into(), num_labels, h),
            (Task::QuestionAnswering, _) => linear(&mut out, "qa_outputs".into(), 2, h),
            (_, Arch::Bert) => {
                linear(&mut out, format!("{p}.pooler.dense"), h, h);
                linear(&mut out, "classifier".into(), num_labels, h);
            }
            (_, Arch::DistilBert) => {
                linear(&mut out, "pre_classifier".into(), h, h);
                linear(&mut out, "classifier".into(), num_labels, h);
            }
            (_, Arch::Roberta) => {
                linear(&mut out, "classifier.dense".into(), h, h);
                linear(&mut out, "classifier.out_proj".into(), num_labels, h);
            }
        }
        out
    }
}

impl EncoderConfig {
    /// The name of the head's output weight, one row per label (`classifier.weight`,
    /// `classifier.out_proj.weight`); none for question answering.
    pub fn label_head(&self, task: Task) -> Option<String> {
        self.parameters(task, 1)
            .into_iter()
            .rev()
            .find(|(n, s)| n.ends_with(".weight") && s.first() == Some(&1))
            .map(|(n, _)| n)
    }

    /// How many labels the head stored in `dir`'s weights has, when it has one for `task`.
    pub fn stored_head_labels(&self, dir: &Path, task: Task) -> Option<usize> {
        let name = self.label_head(task)?;
        let weights = Weights::from_dir(dir).ok()?;
        if !weights.contains(&name) {
            return None;
        }
        let t = weights.tensor(&name, &Device::Cpu).ok()?;
        t.dims().first().copied()
    }
}

/// The parameters, in [`EncoderConfig::parameters`] order.
pub struct Params {
    pub names: Vec<String>,
    pub vars: Vec<Var>,
    /// Each parameter's gradient, accumulated by the backward passes (zeroed by the trainer
    /// after each optimizer step).
    pub grads: Vec<super::ops::GradSlot>,
    index: HashMap<String, usize>,
    /// Names initialised fresh (not in the base checkpoint), as HF's warning lists them.
    pub fresh: Vec<String>,
}

/// Whether HF's `_init_weights` sets this parameter to ones (LayerNorm weights).
fn is_norm_weight(name: &str) -> bool {
    let l = name.to_ascii_lowercase();
    (l.contains("layernorm") || l.contains("layer_norm")) && l.ends_with(".weight")
}

impl Params {
    /// Load the parameters from `dir`'s weights (a head model's names or a bare base model's),
    /// initialising what is missing as HF does: normal(0, `initializer_range`) weights, zero
    /// biases, LayerNorm weights 1. A head whose shape differs (another label count) is an
    /// error unless `reinit_mismatched`, which initialises it fresh (HF's
    /// `ignore_mismatched_sizes`).
    pub fn load(
        dir: &Path,
        cfg: &EncoderConfig,
        task: Task,
        num_labels: usize,
        reinit_mismatched: bool,
        rng: &mut Rng,
        device: &Device,
    ) -> Result<Self> {
        let weights = Weights::from_dir(dir)?;
        let prefix = format!("{}.", cfg.arch.prefix());
        let mut p = Params {
            names: Vec::new(),
            vars: Vec::new(),
            grads: Vec::new(),
            index: HashMap::new(),
            fresh: Vec::new(),
        };
        for (name, shape) in cfg.parameters(task, num_labels) {
            let stored = if weights.contains(&name) {
                Some(name.clone())
            } else {
                name.strip_prefix(&prefix)
                    .filter(|bare| weights.contains(bare))
                    .map(str::to_string)
            };
            let loaded = match stored {
                Some(s) => {
                    let t = weights.tensor(&s, device)?.to_dtype(DType::F32)?;
                    if t.dims() == shape.as_slice() {
                        Some(t)
                    } else if reinit_mismatched {
                        None
                    } else {
                        return Err(Error::Weights {
                            path: weights.path().to_path_buf(),
                            detail: format!(
                                "`{s}` has shape {:?}, training needs {shape:?} (another number \
                                 of labels? --ignore-mismatched-sizes starts a fresh head)",
                                t.dims()
                            ),
                        });
                    }
                }
                None => None,
            };
            let t = match loaded {
                Some(t) => t,
                None => {
                    p.fresh.push(name.clone());
                    let n: usize = shape.iter().product();
                    let v: Vec<f32> = if is_norm_weight(&name) {
                        vec![1.0; n]
                    } else if name.ends_with(".bias") {
                        vec![0.0; n]
                    } else {
                        (0..n)
                            .map(|_| (rng.normal() * cfg.init_range) as f32)
                            .collect()
                    };
                    Tensor::from_vec(v, shape.as_slice(), device)?
                }
            };
            p.index.insert(name.clone(), p.vars.len());
            p.names.push(name);
            p.grads.push(std::sync::Arc::new(std::sync::Mutex::new(vec![
                0.0;
                t.elem_count()
            ])));
            p.vars.push(Var::from_tensor(&t)?);
        }
        Ok(p)
    }

    /// The gradient slot of a parameter.
    pub fn slot(&self, name: &str) -> Result<super::ops::GradSlot> {
        self.index
            .get(name)
            .map(|&i| self.grads[i].clone())
            .ok_or_else(|| Error::Tensor(candle_core::Error::Msg(format!("no parameter `{name}`"))))
    }

    pub fn get(&self, name: &str) -> Result<&Tensor> {
        self.index
            .get(name)
            .map(|&i| self.vars[i].as_tensor())
            .ok_or_else(|| Error::Tensor(candle_core::Error::Msg(format!("no parameter `{name}`"))))
    }
}

/// Dropout with the trainer's seeded generator: each element kept with probability `1 - p`
/// and scaled by `1 / (1 - p)` (as torch's), off when the model evaluates.
pub struct Dropout {
    rng: RefCell<Rng>,
}

impl Dropout {
    pub fn new(rng: Rng) -> Self {
        Self {
            rng: RefCell::new(rng),
        }
    }

    /// The generator's state (checkpoints).
    pub fn state(&self) -> u64 {
        self.rng.borrow().state()
    }

    pub fn set_state(&self, state: u64) {
        *self.rng.borrow_mut() = Rng::from_state(state);
    }

    /// `n` dropout factors: 0 with probability `p`, else `1 / (1 - p)`; `None` when `p` is 0.
    fn factors(&self, n: usize, p: f64) -> Option<Vec<f32>> {
        if p <= 0.0 {
            return None;
        }
        let scale = (1.0 / (1.0 - p)) as f32;
        let mut out = vec![0f32; n];
        self.rng
            .borrow_mut()
            .bernoulli_fill(&mut out, p, 0.0, scale);
        Some(out)
    }

    fn apply(&self, xs: &Tensor, p: f64) -> Result<Tensor> {
        let Some(mask) = self.factors(xs.elem_count(), p) else {
            return Ok(xs.clone());
        };
        Ok(super::ops::dropout(xs, mask)?)
    }
}

/// One padded batch: token ids, token types and the 0/1 attention mask, `[b, s]`.
pub struct Batch {
    pub ids: Tensor,
    pub type_ids: Tensor,
    pub mask: Tensor,
}

/// The model with a task's head over [`Params`].
pub struct Model<'a> {
    pub cfg: &'a EncoderConfig,
    pub p: &'a Params,
    pub task: Task,
}

impl Model<'_> {
    /// A weight and bias pair's gradient slots (where the ops add their gradients).
    fn slots(&self, name: &str) -> Result<Option<(super::ops::GradSlot, super::ops::GradSlot)>> {
        Ok(Some((
            self.p.slot(&format!("{name}.weight"))?,
            self.p.slot(&format!("{name}.bias"))?,
        )))
    }

    fn linear(&self, xs: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.p.get(&format!("{name}.weight"))?;
        let b = self.p.get(&format!("{name}.bias"))?;
        Ok(super::ops::linear_acc(xs, w, b, self.slots(name)?)?)
    }

    fn norm(&self, xs: &Tensor, name: &str) -> Result<Tensor> {
        let w = self.p.get(&format!("{name}.weight"))?;
        let b = self.p.get(&format!("{name}.bias"))?;
        Ok(super::ops::layer_norm_acc(
            xs,
            w,
            b,
            self.cfg.eps,
            self.slots(name)?,
        )?)
    }

    fn act(&self, xs: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.act {
            Act::Gelu => super::ops::gelu_erf(xs)?,
            Act::GeluNew => xs.gelu()?,
            Act::Relu => xs.relu()?,
        })
    }

    fn drop(&self, xs: &Tensor, p: f64, dropout: Option<&Dropout>) -> Result<Tensor> {
        match dropout {
            Some(d) => d.apply(xs, p),
            None => Ok(xs.clone()),
        }
    }

    fn embeddings(&self, batch: &Batch, dropout: Option<&Dropout>) -> Result<Tensor> {
        let (b, s) = batch.ids.dims2()?;
        if s > self.cfg.max_pos {
            return Err(Error::InvalidParameter {
                name: "max_length".into(),
                detail: format!(
                    "{s} tokens, the model takes at most {} positions",
                    self.cfg.max_pos
                ),
            });
        }
        let e = format!("{}.embeddings", self.cfg.arch.prefix());
        // torch's `padding_idx`: the padding token's row of the word embeddings (RoBERTa: of
        // the positions too, whose padding positions are `padding_idx`) gets no gradient. It
        // matters where padded positions reach the loss (question answering's softmax over
        // every position).
        let lookup = |table: &str, ids: &Tensor, no_grad_id: Option<u32>| -> Result<Tensor> {
            let name = format!("{e}.{table}.weight");
            let w = self.p.get(&name)?;
            Ok(super::ops::embedding(
                w,
                ids,
                no_grad_id,
                self.p.slot(&name)?,
            )?)
        };
        let pad = Some(self.cfg.pad_id);
        let mut x = lookup("word_embeddings", &batch.ids, pad)?;
        let positions = if self.cfg.arch == Arch::Roberta {
            crate::models::roberta::position_ids_from_input_ids(&batch.ids, self.cfg.pad_id)?
        } else {
            Tensor::arange(0u32, s as u32, batch.ids.device())?
                .unsqueeze(0)?
                .broadcast_as((b, s))?
                .contiguous()?
        };
        let pos_pad = pad.filter(|_| self.cfg.arch == Arch::Roberta);
        x = (x + lookup("position_embeddings", &positions, pos_pad)?)?;
        if self.cfg.type_vocab > 0 {
            x = (x + lookup("token_type_embeddings", &batch.type_ids, None)?)?;
        }
        let x = self.norm(&x, &format!("{e}.LayerNorm"))?;
        self.drop(&x, self.cfg.hidden_dropout, dropout)
    }

    fn attention(
        &self,
        x: &Tensor,
        (bias, key_bias): (&Tensor, &[f32]),
        names: [&str; 3],
        dropout: Option<&Dropout>,
    ) -> Result<Tensor> {
        let (b, s, h) = x.dims3()?;
        let nh = self.cfg.heads;
        let dh = h / nh;
        if super::ops::fused(x) {
            // One fused op per layer: no head split/merge copies, one job per sequence and head.
            let q = self.linear(x, names[0])?;
            let k = self.linear(x, names[1])?;
            let v = self.linear(x, names[2])?;
            let drop = dropout.and_then(|d| d.factors(b * nh * s * s, self.cfg.attn_dropout));
            return Ok(super::ops::attention(
                &q,
                &k,
                &v,
                nh,
                key_bias.to_vec(),
                drop,
            )?);
        }
        let split = |t: Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, s, nh, dh))?.transpose(1, 2)?.contiguous()?)
        };
        let q = split(self.linear(x, names[0])?)?;
        let k = split(self.linear(x, names[1])?)?;
        let v = split(self.linear(x, names[2])?)?;
        let scores = (q.matmul(&k.t()?.contiguous()?)? * (1.0 / (dh as f64).sqrt()))?;
        let probs = super::ops::softmax_last_dim(&scores.broadcast_add(bias)?)?;
        let probs = self.drop(&probs, self.cfg.attn_dropout, dropout)?;
        Ok(probs
            .matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, s, h))?)
    }

    /// The head's logits, `dropout` on while training: `[b, labels]` (text classification),
    /// `[b, s, labels]` (token classification), `[b, s, 2]` (start and end logits).
    pub fn forward(&self, batch: &Batch, dropout: Option<&Dropout>) -> Result<Tensor> {
        let cfg = self.cfg;
        let p = cfg.arch.prefix();
        let (b, s) = batch.ids.dims2()?;
        // Additive mask: 0 where attended, f32::MIN where padded (HF's), [b, 1, 1, s].
        let m = batch.mask.to_dtype(DType::F32)?;
        let bias = ((m.ones_like()? - &m)? * f32::MIN as f64)?.reshape((b, 1, 1, s))?;
        let key_bias: Vec<f32> = bias.flatten_all()?.to_vec1()?;
        let bias = (&bias, key_bias.as_slice());
        let mut x = self.embeddings(batch, dropout)?;
        for l in 0..cfg.layers {
            x = if cfg.arch == Arch::DistilBert {
                let n = format!("{p}.transformer.layer.{l}");
                let a = format!("{n}.attention");
                let ctx = self.attention(
                    &x,
                    bias,
                    [
                        &format!("{a}.q_lin"),
                        &format!("{a}.k_lin"),
                        &format!("{a}.v_lin"),
                    ],
                    dropout,
                )?;
                let sa = self.linear(&ctx, &format!("{a}.out_lin"))?;
                let x1 = self.norm(&(sa + &x)?, &format!("{n}.sa_layer_norm"))?;
                let ff = self.act(&self.linear(&x1, &format!("{n}.ffn.lin1"))?)?;
                let ff = self.linear(&ff, &format!("{n}.ffn.lin2"))?;
                let ff = self.drop(&ff, cfg.hidden_dropout, dropout)?;
                self.norm(&(ff + &x1)?, &format!("{n}.output_layer_norm"))?
            } else {
                let n = format!("{p}.encoder.layer.{l}");
                let a = format!("{n}.attention");
                let ctx = self.attention(
                    &x,
                    bias,
                    [
                        &format!("{a}.self.query"),
                        &format!("{a}.self.key"),
                        &format!("{a}.self.value"),
                    ],
                    dropout,
                )?;
                let ao = self.linear(&ctx, &format!("{a}.output.dense"))?;
                let ao = self.drop(&ao, cfg.hidden_dropout, dropout)?;
                let x1 = self.norm(&(ao + &x)?, &format!("{a}.output.LayerNorm"))?;
                let ff = self.act(&self.linear(&x1, &format!("{n}.intermediate.dense"))?)?;
                let ff = self.linear(&ff, &format!("{n}.output.dense"))?;
                let ff = self.drop(&ff, cfg.hidden_dropout, dropout)?;
                self.norm(&(ff + &x1)?, &format!("{n}.output.LayerNorm"))?
            };
        }
        match self.task {
            Task::TokenClassification => {
                // BERT/RoBERTa: `classifier_dropout` or the hidden one; DistilBERT: `dropout`.
                let p = match cfg.arch {
                    Arch::DistilBert => cfg.hidden_dropout,
                    _ => cfg.head_dropout,
                };
                let h = self.drop(&x, p, dropout)?;
                return self.linear(&h, "classifier");
            }
            Task::QuestionAnswering => {
                let h = self.drop(&x, cfg.qa_dropout, dropout)?;
                return self.linear(&h, "qa_outputs");
            }
            Task::TextClassification => {}
        }
        let cls = x.i((.., 0, ..))?;
        match cfg.arch {
            Arch::Bert => {
                let pooled = self.linear(&cls, &format!("{p}.pooler.dense"))?.tanh()?;
                let pooled = self.drop(&pooled, cfg.head_dropout, dropout)?;
                self.linear(&pooled, "classifier")
            }
            Arch::DistilBert => {
                let h = self.linear(&cls, "pre_classifier")?.relu()?;
                let h = self.drop(&h, cfg.head_dropout, dropout)?;
                self.linear(&h, "classifier")
            }
            Arch::Roberta => {
                let h = self.drop(&cls, cfg.head_dropout, dropout)?;
                let h = self.linear(&h, "classifier.dense")?.tanh()?;
                let h = self.drop(&h, cfg.head_dropout, dropout)?;
                self.linear(&h, "classifier.out_proj")
            }
        }
    }
}
