//! Fine-tuning (`ferroformers train`): a BERT-family encoder plus a head for text
//! classification, token classification or question answering, trained on a JSONL/CSV/SQuAD
//! file, saved so that Python `from_pretrained` and our pipelines load it. HF `Trainer`'s behaviour and defaults: AdamW (no decay on biases and LayerNorm
//! weights), linear/cosine/constant schedules with warm-up, clipping by global norm, dropout
//! while training, evaluation per epoch (loss plus accuracy and macro-F1; seqeval's entity
//! precision/recall/F1; SQuAD's exact match and F1), `trainer_state.json`.
//!
//! - [`data`]: reading examples and labels (every problem names the file and line);
//! - [`metrics`]: seqeval and SQuAD metrics, `run_qa`'s answer post-processing;
//! - [`model`]: the trainable model over candle `Var`s (every op records its backward);
//! - [`ops`]: fused LayerNorm, softmax and GELU with their backward passes (CPU f32);
//! - [`optim`]: seeded generator, AdamW, schedules, clipping;
//! - [`save`]: `save_pretrained`'s files.
//!
//! Checkpoints (`output_dir/checkpoint-N`: weights, AdamW's moments, the place in the epoch,
//! the generators) resume to the bit. Token labels go on each word's first sub-token
//! (`run_ner`); question-answering contexts are cut into `doc_stride` windows labelled as
//! `run_qa` labels them.

pub mod data;
pub mod metrics;
pub mod model;
pub mod ops;
pub mod optim;
pub mod save;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::tokenizer::{Encoded, Tokenizer};
pub use data::Task;
use data::{Columns, Example, LabelSet, Problem, QaExample, Target, TokenExample};
use model::{Batch, Dropout, EncoderConfig, Model, Params};
use optim::{clip_coef, global_norm, AdamW, Rng, Schedule};

/// When to evaluate (HF's `eval_strategy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalStrategy {
    No,
    Epoch,
    Steps,
}

impl EvalStrategy {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "no" => EvalStrategy::No,
            "epoch" => EvalStrategy::Epoch,
            "steps" => EvalStrategy::Steps,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            EvalStrategy::No => "no",
            EvalStrategy::Epoch => "epoch",
            EvalStrategy::Steps => "steps",
        }
    }
}

/// When to write a checkpoint (HF's `save_strategy`).
pub type SaveStrategy = EvalStrategy;

/// Where a run stands inside its epochs, and its generators: what resuming needs besides the
/// weights and the optimizer.
#[derive(Debug, Clone, Default)]
struct Progress {
    epoch: usize,
    /// Optimizer steps done in this epoch.
    groups_done: usize,
    /// The shuffling generator as it was when this epoch's order was drawn.
    epoch_rng: u64,
    seen: usize,
    log_loss: f64,
    log_n: usize,
    sum_loss: f64,
}

/// A checkpoint's progress, optimizer step and moments (`exp_avg`, `exp_avg_sq`), waiting
/// for [`Trainer::train`].
type Resume = (Progress, u64, Vec<Vec<f32>>, Vec<Vec<f32>>);

/// HF `TrainingArguments` (the ones this trainer implements), with HF's defaults.
#[derive(Debug, Clone)]
pub struct TrainingArguments {
    pub output_dir: PathBuf,
    pub learning_rate: f64,
    pub num_train_epochs: f64,
    /// When set and above 0, the number of optimizer steps (overrides the epochs); `Some(0)`
    /// trains `num_train_epochs`, as HF's `max_steps <= 0` does.
    pub max_steps: Option<usize>,
    pub per_device_train_batch_size: usize,
    pub per_device_eval_batch_size: usize,
    /// Batches whose gradients add up before each optimizer step (each loss divided by the
    /// number of batches in its group, as HF's `Trainer` divides).
    pub gradient_accumulation_steps: usize,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub warmup_ratio: f64,
    pub warmup_steps: usize,
    pub lr_scheduler_type: Schedule,
    pub max_grad_norm: f64,
    pub seed: u64,
    /// Tokens per input, special tokens included (`max_seq_length`). Default: 128 for text
    /// classification, 384 for question answering (`run_classification`'s and `run_qa`'s),
    /// the model's limit for token classification (`run_ner`'s); never above the model's
    /// limit.
    pub max_length: Option<usize>,
    /// Question answering: tokens shared by consecutive windows of a long context.
    pub doc_stride: usize,
    /// Token classification: also label a word's later sub-tokens (`B-` becomes `I-`), as
    /// `run_ner`'s `label_all_tokens`; by default they get no loss.
    pub label_all_tokens: bool,
    /// Question answering evaluation: starts and ends considered per window, longest answer
    /// in tokens (`run_qa`'s `n_best_size`, `max_answer_length`).
    pub n_best_size: usize,
    pub max_answer_length: usize,
    /// `None`: `epoch` when there is an evaluation file, else `no`.
    pub eval_strategy: Option<EvalStrategy>,
    pub eval_steps: usize,
    pub logging_steps: usize,
    /// Checkpoints `output_dir/checkpoint-N` (HF's default: every 500 steps).
    pub save_strategy: SaveStrategy,
    pub save_steps: usize,
    /// Keep at most this many checkpoints (the oldest go first; never the best one).
    pub save_total_limit: Option<usize>,
    /// Reload the best checkpoint's weights when training ends (needs evaluation and
    /// checkpoints on the same schedule, as HF requires).
    pub load_best_model_at_end: bool,
    /// The evaluation metric that decides "best" (`loss`, `accuracy`, `f1`, `mse`; an `eval_`
    /// prefix is fine). Default `loss`.
    pub metric_for_best_model: Option<String>,
    /// Default: false for loss and mse, true otherwise.
    pub greater_is_better: Option<bool>,
    /// Shuffle the training examples each epoch (HF always does; the parity tests turn it
    /// off to follow a sequential sampler).
    pub shuffle: bool,
    /// Start a fresh head when the base's has another shape.
    pub ignore_mismatched_sizes: bool,
    /// Where the model trains: `cpu` (the fused CPU ops), `cuda` or `cuda:N` (candle's ops;
    /// needs a build with the `cuda` feature).
    pub device: String,
    pub columns: Columns,
}

impl Default for TrainingArguments {
    fn default() -> Self {
        TrainingArguments {
            output_dir: PathBuf::from("trainer_output"),
            learning_rate: 5e-5,
            num_train_epochs: 3.0,
            max_steps: None,
            per_device_train_batch_size: 8,
            per_device_eval_batch_size: 8,
            gradient_accumulation_steps: 1,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            warmup_ratio: 0.0,
            warmup_steps: 0,
            lr_scheduler_type: Schedule::Linear,
            max_grad_norm: 1.0,
            seed: 42,
            max_length: None,
            doc_stride: 128,
            label_all_tokens: false,
            n_best_size: 20,
            max_answer_length: 30,
            eval_strategy: None,
            eval_steps: 500,
            logging_steps: 500,
            save_strategy: SaveStrategy::Steps,
            save_steps: 500,
            save_total_limit: None,
            load_best_model_at_end: false,
            metric_for_best_model: None,
            greater_is_better: None,
            shuffle: true,
            ignore_mismatched_sizes: false,
            device: "cpu".into(),
            columns: Columns::default(),
        }
    }
}

impl TrainingArguments {
    fn check(&self) -> Result<()> {
        let bad = |name: &str, detail: String| {
            Err(Error::InvalidParameter {
                name: name.into(),
                detail,
            })
        };
        if !(self.learning_rate > 0.0 && self.learning_rate.is_finite()) {
            return bad(
                "learning_rate",
                format!("{} is not a positive number", self.learning_rate),
            );
        }
        if self.gradient_accumulation_steps == 0 {
            return bad("gradient_accumulation_steps", "must be at least 1".into());
        }
        for (name, size) in [
            (
                "per_device_train_batch_size",
                self.per_device_train_batch_size,
            ),
            (
                "per_device_eval_batch_size",
                self.per_device_eval_batch_size,
            ),
        ] {
            if size == 0 {
                return bad(name, "must be at least 1, not 0".into());
            }
        }
        if self.max_steps.unwrap_or(0) == 0
            && self.num_train_epochs.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater)
        {
            return bad(
                "num_train_epochs",
                format!("{} is not positive", self.num_train_epochs),
            );
        }
        if !(0.0..1.0).contains(&self.warmup_ratio) {
            return bad(
                "warmup_ratio",
                format!("{} is not in [0, 1)", self.warmup_ratio),
            );
        }
        for (name, v) in [
            ("weight_decay", self.weight_decay),
            ("max_grad_norm", self.max_grad_norm),
        ] {
            if v < 0.0 || v.is_nan() {
                return bad(name, format!("{v} is not 0 or more"));
            }
        }
        if self.load_best_model_at_end {
            let eval = self.eval_strategy.unwrap_or(EvalStrategy::Epoch);
            if eval == EvalStrategy::No || eval != self.save_strategy {
                return bad(
                    "load_best_model_at_end",
                    format!(
                        "needs evaluations and checkpoints on the same schedule (eval_strategy \
                         {}, save_strategy {})",
                        eval.name(),
                        self.save_strategy.name()
                    ),
                );
            }
            if eval == EvalStrategy::Steps
                && (self.eval_steps == 0 || !self.save_steps.is_multiple_of(self.eval_steps))
            {
                return bad(
                    "load_best_model_at_end",
                    format!(
                        "save_steps {} must be a multiple of eval_steps {}",
                        self.save_steps, self.eval_steps
                    ),
                );
            }
        }
        if let Some(m) = self.max_length.filter(|&m| m < 2) {
            return bad("max_length", format!("{m} leaves no room for the text"));
        }
        if self.n_best_size == 0 || self.max_answer_length == 0 {
            return bad(
                "n_best_size",
                "n_best_size and max_answer_length must be at least 1".into(),
            );
        }
        Ok(())
    }

    /// The metric's key in an evaluation log entry (`eval_loss`, ...).
    fn best_metric_name(&self) -> String {
        let m = self.metric_for_best_model.as_deref().unwrap_or("loss");
        if m.starts_with("eval_") {
            m.to_string()
        } else {
            format!("eval_{m}")
        }
    }

    fn greater_is_better(&self) -> bool {
        self.greater_is_better.unwrap_or_else(|| {
            !matches!(self.best_metric_name().as_str(), "eval_loss" | "eval_mse")
        })
    }

    fn to_json(&self) -> Value {
        json!({
            "output_dir": self.output_dir,
            "learning_rate": self.learning_rate,
            "num_train_epochs": self.num_train_epochs,
            "max_steps": self.max_steps.map_or(-1, |m| m as i64),
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "per_device_eval_batch_size": self.per_device_eval_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "weight_decay": self.weight_decay,
            "adam_beta1": self.adam_beta1,
            "adam_beta2": self.adam_beta2,
            "adam_epsilon": self.adam_epsilon,
            "warmup_ratio": self.warmup_ratio,
            "warmup_steps": self.warmup_steps,
            "lr_scheduler_type": self.lr_scheduler_type.name(),
            "max_grad_norm": self.max_grad_norm,
            "seed": self.seed,
            "max_length": self.max_length,
            "doc_stride": self.doc_stride,
            "label_all_tokens": self.label_all_tokens,
            "eval_strategy": self.eval_strategy.map(EvalStrategy::name),
            "eval_steps": self.eval_steps,
            "logging_steps": self.logging_steps,
            "save_strategy": self.save_strategy.name(),
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
            "load_best_model_at_end": self.load_best_model_at_end,
            "metric_for_best_model": self.best_metric_name(),
            "greater_is_better": self.greater_is_better(),
            "optim": "adamw_torch",
            "ignore_mismatched_sizes": self.ignore_mismatched_sizes,
            "device": self.device,
            "text_column": self.columns.text,
            "text_pair_column": self.columns.text_pair,
            "label_column": self.columns.label,
        })
    }
}

/// What the trainer reports as it goes.
#[derive(Debug, Clone)]
pub enum Event {
    /// Training starts: examples, optimizer steps in all, parameters, fresh head names.
    Start {
        examples: usize,
        total_steps: usize,
        parameters: usize,
        fresh: Vec<String>,
    },
    /// After each optimizer step.
    Step {
        step: usize,
        total_steps: usize,
        epoch: f64,
        loss: f64,
        learning_rate: f64,
        samples_per_second: f64,
    },
    /// A `log_history` entry (logging and evaluation), as HF logs it.
    Log(Value),
}

/// Evaluation results (HF's `eval_*` names).
#[derive(Debug, Clone)]
pub struct Metrics {
    pub loss: f64,
    /// Single-label: accuracy; multi-label: exact-match accuracy.
    pub accuracy: Option<f64>,
    /// Single-label: macro-F1; multi-label: micro-F1; token classification: seqeval's entity
    /// F1; question answering: SQuAD's F1 (percent).
    pub f1: Option<f64>,
    /// Token classification: seqeval's entity precision and recall.
    pub precision: Option<f64>,
    pub recall: Option<f64>,
    /// Question answering: SQuAD's exact match (percent).
    pub exact_match: Option<f64>,
    /// Regression: mean squared error.
    pub mse: Option<f64>,
    pub samples: usize,
}

impl Metrics {
    /// The loss over `samples`, no other metric yet.
    fn new(loss: f64, samples: usize) -> Self {
        Metrics {
            loss,
            accuracy: None,
            f1: None,
            mse: None,
            precision: None,
            recall: None,
            exact_match: None,
            samples,
        }
    }

    fn to_json(&self, prefix: &str) -> serde_json::Map<String, Value> {
        let mut m = serde_json::Map::new();
        m.insert(format!("{prefix}_loss"), json!(self.loss));
        if let Some(a) = self.accuracy {
            m.insert(format!("{prefix}_accuracy"), json!(a));
        }
        if let Some(f) = self.f1 {
            m.insert(format!("{prefix}_f1"), json!(f));
        }
        if let Some(e) = self.mse {
            m.insert(format!("{prefix}_mse"), json!(e));
        }
        for (name, v) in [
            ("precision", self.precision),
            ("recall", self.recall),
            ("exact_match", self.exact_match),
        ] {
            if let Some(v) = v {
                m.insert(format!("{prefix}_{name}"), json!(v));
            }
        }
        m
    }
}

/// One tokenized example (question answering: one window of one).
struct Item {
    enc: Encoded,
    target: Target,
    /// Which example of its file it came from.
    example: usize,
}

/// The targets of one batch, as the loss takes them.
enum Targets {
    /// Classes `[b]` (u32), values `[b]` or multi-hot rows `[b, labels]`.
    Dense(Tensor),
    /// Flattened positions `b * s + i` that carry a tag, and their classes.
    Tokens { rows: Tensor, classes: Tensor },
    /// Answer start and end tokens `[b]`.
    Spans { start: Tensor, end: Tensor },
}

/// A fine-tuning run: the model's parameters, the data, the optimizer state.
pub struct Trainer {
    pub task: Task,
    pub args: TrainingArguments,
    pub cfg: EncoderConfig,
    pub params: Params,
    pub labels: LabelSet,
    model_dir: PathBuf,
    tokenizer: Tokenizer,
    train: Vec<Item>,
    eval: Vec<Item>,
    /// Question answering: the evaluation examples (contexts and gold answers).
    qa_eval: Vec<QaExample>,
    rng: Rng,
    dropout: Dropout,
    device: Device,
    pub log_history: Vec<Value>,
    pub global_step: usize,
    /// Set by [`Trainer::resume_from_checkpoint`], taken by [`Trainer::train`].
    resume: Option<Resume>,
    /// The best evaluation so far: metric value, step, and its checkpoint once written.
    pub best: Option<(f64, usize, Option<PathBuf>)>,
    /// What HF warns about when setting up the same run (the base model's labels are not the
    /// data's); the CLI prints them on stderr.
    pub warnings: Vec<String>,
}

fn tokenize(tok: &Tokenizer, path: &Path, ex: &[Example], labels: &LabelSet) -> Result<Vec<Item>> {
    ex.iter()
        .enumerate()
        .map(|(k, e)| {
            let target = labels.target(path, e)?;
            let enc = tok.encode(&e.text, e.pair.as_deref())?;
            Ok(Item {
                enc,
                target,
                example: k,
            })
        })
        .collect()
}

/// `run_ner`'s `tokenize_and_align_labels`: each word's tag on its first sub-token, -100 on
/// special tokens and (unless `label_all_tokens`, which puts `I-` for `B-` there) on the
/// word's later sub-tokens.
fn tokenize_words(
    tok: &Tokenizer,
    path: &Path,
    ex: &[TokenExample],
    labels: &LabelSet,
    label_all_tokens: bool,
) -> Result<Vec<Item>> {
    let names = &labels.names;
    let b_to_i: Vec<i64> = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            n.strip_prefix("B-")
                .and_then(|r| names.iter().position(|x| *x == format!("I-{r}")))
                .unwrap_or(i) as i64
        })
        .collect();
    ex.iter()
        .enumerate()
        .map(|(k, e)| {
            let ids = e
                .tags
                .iter()
                .map(|t| Ok(labels.tag_id(path, e.line, t)? as i64))
                .collect::<Result<Vec<i64>>>()?;
            let enc = tok
                .encode_words(&e.words)
                .map_err(|err| Error::invalid_file(path, format!("line {}: {err}", e.line)))?;
            let mut prev = None;
            let tags = enc
                .word_ids
                .iter()
                .map(|&w| {
                    let tag = match w {
                        None => -100,
                        Some(w) if Some(w) != prev => ids[w as usize],
                        Some(w) if label_all_tokens => b_to_i[ids[w as usize] as usize],
                        Some(_) => -100,
                    };
                    prev = w;
                    tag
                })
                .collect();
            Ok(Item {
                enc,
                target: Target::Tags(tags),
                example: k,
            })
        })
        .collect()
}

/// `run_qa`'s `prepare_train_features`: the question (left spaces stripped) and windows of
/// the context of at most `max_length` tokens overlapping by `stride`; each window labelled
/// with the first answer's first and last token, or the CLS token when the window does not
/// hold all of it.
fn tokenize_qa(
    tok: &Tokenizer,
    path: &Path,
    ex: &[QaExample],
    max_length: usize,
    stride: usize,
) -> Result<Vec<Item>> {
    let mut out = Vec::new();
    for (k, e) in ex.iter().enumerate() {
        let windows = tok
            .encode_windows(
                e.question.trim_start(),
                Some(&e.context),
                max_length,
                stride,
                true,
            )
            .map_err(|err| Error::invalid_file(path, format!("line {}: {err}", e.line)))?;
        for enc in windows {
            let cls = enc
                .ids
                .iter()
                .position(|&i| Some(i) == tok.cls_id)
                .unwrap_or(0) as u32;
            let ctx: Vec<usize> = (0..enc.len())
                .filter(|&i| enc.sequence_ids[i] == Some(1))
                .collect();
            let target = match (e.answers.first(), ctx.first(), ctx.last()) {
                (Some((text, start)), Some(&first), Some(&last)) => {
                    let (start_char, end_char) = (*start, start + text.chars().count());
                    let o = &enc.offsets;
                    if !(o[first].0 <= start_char && o[last].1 >= end_char) {
                        Target::Span(cls, cls)
                    } else {
                        // As `run_qa` walks: past the context too (special tokens are
                        // (0, 0)), so an answer in the last context token starts at the end.
                        let mut s = first;
                        while s < o.len() && o[s].0 <= start_char {
                            s += 1;
                        }
                        let mut t = last;
                        while t > 0 && o[t].1 >= end_char {
                            t -= 1;
                        }
                        Target::Span((s - 1) as u32, (t + 1) as u32)
                    }
                }
                _ => Target::Span(cls, cls),
            };
            out.push(Item {
                enc,
                target,
                example: k,
            });
        }
    }
    Ok(out)
}

impl Trainer {
    /// A text-classification run (see [`Trainer::for_task`]).
    pub fn new(
        model: &str,
        train_file: &Path,
        eval_file: Option<&Path>,
        args: TrainingArguments,
    ) -> Result<Self> {
        Self::for_task(Task::TextClassification, model, train_file, eval_file, args)
    }

    /// Load the base model (a folder or hub id), read and check both files, and set up the
    /// run. Nothing trains yet; every data problem is reported here. Columns left at their
    /// text-classification defaults take `task`'s ([`Columns::for_task`]).
    pub fn for_task(
        task: Task,
        model: &str,
        train_file: &Path,
        eval_file: Option<&Path>,
        mut args: TrainingArguments,
    ) -> Result<Self> {
        args.check()?;
        if args.columns == Columns::default() {
            args.columns = Columns::for_task(task);
        }
        let model_dir = crate::hub::resolve_or_download(model, None)?;
        let cfg = EncoderConfig::from_dir(&model_dir)?;
        let base_names: Vec<String> = match cfg.raw.get("id2label").and_then(Value::as_object) {
            Some(m) => {
                let mut v: Vec<(usize, String)> = m
                    .iter()
                    .filter_map(|(k, n)| Some((k.parse().ok()?, n.as_str()?.to_string())))
                    .collect();
                v.sort();
                v.into_iter().map(|(_, n)| n).collect()
            }
            None => Vec::new(),
        };
        let common = crate::config::ModelConfig::from_dir(&model_dir)?;
        let mut tokenizer = Tokenizer::from_dir(
            &model_dir,
            &common.model_type,
            crate::models::max_positions(&common),
        )?;
        let max_length = match (args.max_length, task) {
            (Some(m), _) => m,
            (None, Task::TextClassification) => 128,
            (None, Task::TokenClassification) => tokenizer.max_length,
            (None, Task::QuestionAnswering) => 384,
        }
        .min(tokenizer.max_length);
        if max_length < tokenizer.max_length {
            tokenizer.set_max_length(max_length)?;
        }
        let cols = &args.columns;
        // The training labels with their lines, for the error when they do not fit the base
        // model's head.
        let mut label_lines: Vec<(usize, data::RawLabel)> = Vec::new();
        let (labels, train, eval, qa_eval) = match task {
            Task::TextClassification => {
                let train_ex = data::read_examples(train_file, cols)?;
                label_lines = train_ex.iter().map(|e| (e.line, e.label.clone())).collect();
                let eval_ex = match eval_file {
                    Some(p) => Some((p, data::read_examples(p, cols)?)),
                    None => None,
                };
                let labels = LabelSet::from_examples(train_file, &train_ex, &base_names)?;
                let train = tokenize(&tokenizer, train_file, &train_ex, &labels)?;
                let eval = match &eval_ex {
                    Some((p, ex)) => tokenize(&tokenizer, p, ex, &labels)?,
                    None => Vec::new(),
                };
                (labels, train, eval, Vec::new())
            }
            Task::TokenClassification => {
                let train_ex = data::read_token_examples(train_file, cols)?;
                label_lines = train_ex
                    .iter()
                    .flat_map(|e| e.tags.iter().map(|t| (e.line, t.clone())))
                    .collect();
                let eval_ex = match eval_file {
                    Some(p) => Some((p, data::read_token_examples(p, cols)?)),
                    None => None,
                };
                let labels = LabelSet::from_tags(train_file, &train_ex, &base_names)?;
                let all = args.label_all_tokens;
                let train = tokenize_words(&tokenizer, train_file, &train_ex, &labels, all)?;
                let eval = match &eval_ex {
                    Some((p, ex)) => tokenize_words(&tokenizer, p, ex, &labels, all)?,
                    None => Vec::new(),
                };
                (labels, train, eval, Vec::new())
            }
            Task::QuestionAnswering => {
                let train_ex = data::read_qa_examples(train_file, cols)?;
                let eval_ex = match eval_file {
                    Some(p) => data::read_qa_examples(p, cols)?,
                    None => Vec::new(),
                };
                let (m, stride) = (max_length, args.doc_stride);
                let train = tokenize_qa(&tokenizer, train_file, &train_ex, m, stride)?;
                let eval = match eval_file {
                    Some(p) => tokenize_qa(&tokenizer, p, &eval_ex, m, stride)?,
                    None => Vec::new(),
                };
                let labels = LabelSet {
                    problem: Problem::SingleLabel,
                    names: vec!["start".into(), "end".into()],
                };
                (labels, train, eval, eval_ex)
            }
        };
        let mut rng = Rng::new(args.seed);
        let device = training_device(&args.device)?;
        let params = match Params::load(
            &model_dir,
            &cfg,
            task,
            labels.names.len(),
            args.ignore_mismatched_sizes,
            &mut rng,
            &device,
        ) {
            Ok(p) => p,
            Err(e) => {
                // A head for another number of labels: say which labels do not fit.
                return Err(match cfg.stored_head_labels(&model_dir, task) {
                    Some(rows) if rows != labels.names.len() && !label_lines.is_empty() => {
                        let lines: Vec<(usize, &data::RawLabel)> =
                            label_lines.iter().map(|(l, x)| (*l, x)).collect();
                        data::head_mismatch_error(train_file, &lines, &labels, &base_names, rows)
                    }
                    _ => e,
                });
            }
        };
        let mut warnings = Vec::new();
        if task != Task::QuestionAnswering {
            let fresh_head = cfg
                .label_head(task)
                .is_some_and(|h| params.fresh.contains(&h));
            warnings.extend(labels.base_mismatch_warning(&base_names, fresh_head));
        }
        let dropout = Dropout::new(rng.fork());
        Ok(Trainer {
            task,
            args,
            cfg,
            params,
            labels,
            model_dir,
            tokenizer,
            train,
            eval,
            qa_eval,
            rng,
            dropout,
            device,
            log_history: Vec::new(),
            global_step: 0,
            resume: None,
            best: None,
            warnings,
        })
    }

    fn batch(&self, items: &[&Item]) -> Result<(Batch, Targets)> {
        let s = items.iter().map(|i| i.enc.ids.len()).max().unwrap_or(1);
        let b = items.len();
        let pad = self.tokenizer.pad_id;
        let (mut ids, mut types, mut mask) =
            (vec![pad; b * s], vec![0u32; b * s], vec![0f32; b * s]);
        for (r, it) in items.iter().enumerate() {
            let n = it.enc.ids.len();
            ids[r * s..r * s + n].copy_from_slice(&it.enc.ids);
            types[r * s..r * s + n].copy_from_slice(&it.enc.type_ids);
            mask[r * s..r * s + n].fill(1.0);
        }
        let dev = &self.device;
        let batch = Batch {
            ids: Tensor::from_vec(ids, (b, s), dev)?,
            type_ids: Tensor::from_vec(types, (b, s), dev)?,
            mask: Tensor::from_vec(mask, (b, s), dev)?,
        };
        let targets = match (self.task, self.labels.problem) {
            (Task::TokenClassification, _) => {
                let (mut rows, mut classes) = (Vec::new(), Vec::new());
                for (r, it) in items.iter().enumerate() {
                    if let Target::Tags(t) = &it.target {
                        for (i, &c) in t.iter().enumerate() {
                            if c >= 0 {
                                rows.push((r * s + i) as u32);
                                classes.push(c as u32);
                            }
                        }
                    }
                }
                let n = rows.len();
                return Ok((
                    batch,
                    Targets::Tokens {
                        rows: Tensor::from_vec(rows, n, dev)?,
                        classes: Tensor::from_vec(classes, n, dev)?,
                    },
                ));
            }
            (Task::QuestionAnswering, _) => {
                let (start, end): (Vec<u32>, Vec<u32>) = items
                    .iter()
                    .map(|i| match i.target {
                        Target::Span(a, b) => (a, b),
                        _ => (0, 0),
                    })
                    .unzip();
                return Ok((
                    batch,
                    Targets::Spans {
                        start: Tensor::from_vec(start, b, dev)?,
                        end: Tensor::from_vec(end, b, dev)?,
                    },
                ));
            }
            (_, Problem::SingleLabel) => {
                let t: Vec<u32> = items
                    .iter()
                    .map(|i| match i.target {
                        Target::Class(c) => c,
                        _ => 0,
                    })
                    .collect();
                Tensor::from_vec(t, b, dev)?
            }
            (_, Problem::Regression) => {
                let t: Vec<f32> = items
                    .iter()
                    .map(|i| match i.target {
                        Target::Value(v) => v,
                        _ => 0.0,
                    })
                    .collect();
                Tensor::from_vec(t, b, dev)?
            }
            (_, Problem::MultiLabel) => {
                let n = self.labels.names.len();
                let mut t = Vec::with_capacity(b * n);
                for i in items {
                    match &i.target {
                        Target::Multi(v) => t.extend_from_slice(v),
                        _ => t.extend(std::iter::repeat_n(0.0, n)),
                    }
                }
                Tensor::from_vec(t, (b, n), dev)?
            }
        };
        Ok((batch, Targets::Dense(targets)))
    }

    /// The loss HF's head models compute: for `*ForSequenceClassification` as its
    /// `problem_type` says; cross-entropy over the tagged tokens (`*ForTokenClassification`,
    /// -100 ignored); the mean of the start and end cross-entropies (`*ForQuestionAnswering`).
    fn loss(&self, logits: &Tensor, targets: &Targets) -> Result<Tensor> {
        let targets = match targets {
            Targets::Dense(t) => t,
            Targets::Tokens { rows, classes } => {
                let (b, s, k) = logits.dims3()?;
                if rows.dims1()? == 0 {
                    // No tagged token in the batch (torch would give NaN): no gradient.
                    return Ok((logits.sum_all()? * 0.0)?);
                }
                let picked = logits.reshape((b * s, k))?.index_select(rows, 0)?;
                return Ok(candle_nn::loss::cross_entropy(&picked, classes)?);
            }
            Targets::Spans { start, end } => {
                let part = |i: usize, t: &Tensor| -> Result<Tensor> {
                    let l = logits.narrow(2, i, 1)?.squeeze(2)?.contiguous()?;
                    Ok(candle_nn::loss::cross_entropy(&l, t)?)
                };
                return Ok(((part(0, start)? + part(1, end)?)? * 0.5)?);
            }
        };
        Ok(match self.labels.problem {
            Problem::SingleLabel => candle_nn::loss::cross_entropy(logits, targets)?,
            Problem::Regression => candle_nn::loss::mse(&logits.squeeze(1)?, targets)?,
            Problem::MultiLabel => {
                // Stable BCE with logits: max(x, 0) - x y + log(1 + exp(-|x|)).
                let abs = (logits.relu()? + logits.neg()?.relu()?)?;
                let soft = (abs.neg()?.exp()? + 1.0)?.log()?;
                (logits.relu()? - (logits * targets)?)?
                    .add(&soft)?
                    .mean_all()?
            }
        })
    }

    /// The loss on training examples `idx` (dropout when `train`), its gradients added into
    /// the parameters' slots ([`Params::grads`]). The loss is divided by `accumulate` before
    /// the backward pass (gradient accumulation over that many batches); the returned loss is
    /// not.
    fn forward_backward(&self, idx: &[usize], train: bool, accumulate: usize) -> Result<f64> {
        let items: Vec<&Item> = idx.iter().map(|&i| &self.train[i]).collect();
        let (batch, targets) = self.batch(&items)?;
        let model = Model {
            cfg: &self.cfg,
            p: &self.params,
            task: self.task,
        };
        let logits = model.forward(&batch, train.then_some(&self.dropout))?;
        let loss = self.loss(&logits, &targets)?;
        let grads = if accumulate > 1 {
            (&loss / accumulate as f64)?.backward()?
        } else {
            loss.backward()?
        };
        // Ops without slots (other devices) leave their gradients in candle's store.
        for (v, slot) in self.params.vars.iter().zip(&self.params.grads) {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.flatten_all()?.to_vec1::<f32>()?;
                let mut s = slot.lock().map_err(|_| poisoned())?;
                s.iter_mut().zip(&g).for_each(|(a, b)| *a += b);
            }
        }
        Ok(loss.to_scalar::<f32>()? as f64)
    }

    /// Set every gradient slot to 0 (after an optimizer step).
    fn zero_grads(&self) -> Result<()> {
        use rayon::prelude::*;
        self.params.grads.par_iter().try_for_each(|slot| {
            let mut s = slot.lock().map_err(|_| poisoned())?;
            s.par_chunks_mut(1 << 15).for_each(|c| c.fill(0.0));
            Ok(())
        })
    }

    /// The tokenized training features: token ids, target and the example each came from
    /// (question answering: one per window).
    pub fn train_features(&self) -> Vec<(&[u32], &Target, usize)> {
        self.train
            .iter()
            .map(|i| (i.enc.ids.as_slice(), &i.target, i.example))
            .collect()
    }

    /// Loss and every parameter's gradient (flat, in [`Params`] order) on training examples
    /// `idx`, with dropout when `train`.
    pub fn loss_and_gradients(&self, idx: &[usize], train: bool) -> Result<(f64, Vec<Vec<f32>>)> {
        self.zero_grads()?;
        let loss = self.forward_backward(idx, train, 1)?;
        let flat = self
            .params
            .grads
            .iter()
            .map(|g| Ok(g.lock().map_err(|_| poisoned())?.clone()))
            .collect::<Result<Vec<_>>>()?;
        self.zero_grads()?;
        Ok((loss, flat))
    }

    /// Optimizer steps per epoch: batches, in groups of `gradient_accumulation_steps` (a
    /// shorter last group still steps).
    fn steps_per_epoch(&self) -> usize {
        self.train
            .len()
            .div_ceil(self.args.per_device_train_batch_size)
            .div_ceil(self.args.gradient_accumulation_steps)
    }

    /// Optimizer steps in all (HF: `ceil(steps per epoch * epochs)`, or `max_steps`).
    pub fn total_steps(&self) -> usize {
        match self.args.max_steps {
            Some(m) if m > 0 => m,
            _ => (self.steps_per_epoch() as f64 * self.args.num_train_epochs).ceil() as usize,
        }
    }

    fn eval_strategy(&self) -> EvalStrategy {
        self.args.eval_strategy.unwrap_or(if self.eval.is_empty() {
            EvalStrategy::No
        } else {
            EvalStrategy::Epoch
        })
    }

    /// Train to the end, reporting through `on_event`; the model stays in `self` (see
    /// [`Trainer::save`]).
    pub fn train(&mut self, on_event: &mut dyn FnMut(Event)) -> Result<()> {
        let total = self.total_steps();
        let warmup = if self.args.warmup_steps > 0 {
            self.args.warmup_steps
        } else {
            (self.args.warmup_ratio * total as f64).ceil() as usize
        };
        let sizes: Vec<usize> = self.params.vars.iter().map(|v| v.elem_count()).collect();
        let decay: Vec<bool> = self
            .params
            .names
            .iter()
            .map(|n| {
                let l = n.to_ascii_lowercase();
                !(l.contains("bias") || l.contains("layernorm") || l.contains("layer_norm"))
            })
            .collect();
        let mut opt = AdamW::new(&sizes, decay, self.args.weight_decay);
        opt.beta1 = self.args.adam_beta1;
        opt.beta2 = self.args.adam_beta2;
        opt.eps = self.args.adam_epsilon;
        on_event(Event::Start {
            examples: self.train.len(),
            total_steps: total,
            parameters: sizes.iter().sum(),
            fresh: self.params.fresh.clone(),
        });
        let bs = self.args.per_device_train_batch_size;
        let per_epoch = self.steps_per_epoch();
        let started = Instant::now();
        let mut pr = Progress::default();
        if let Some((saved, t, m, v)) = self.resume.take() {
            opt.restore(t, m, v)
                .map_err(|e| Error::invalid_file(&self.args.output_dir, e))?;
            pr = saved;
            self.rng = Rng::from_state(pr.epoch_rng);
        }
        let strategy = self.eval_strategy();
        'outer: while self.global_step < total {
            pr.epoch_rng = self.rng.state();
            let mut order: Vec<usize> = (0..self.train.len()).collect();
            if self.args.shuffle {
                self.rng.shuffle(&mut order);
            }
            let batches: Vec<&[usize]> = order.chunks(bs).collect();
            for (bi, group) in batches
                .chunks(self.args.gradient_accumulation_steps)
                .enumerate()
                .skip(pr.groups_done)
            {
                let (mut loss, mut samples) = (0f64, 0usize);
                for chunk in group {
                    let l = self.forward_backward(chunk, true, group.len())?;
                    if !l.is_finite() {
                        return Err(Error::Tensor(candle_core::Error::Msg(format!(
                            "the loss is {l} at step {}: lower the learning rate",
                            self.global_step + 1
                        ))));
                    }
                    loss += l / group.len() as f64;
                    samples += chunk.len();
                }
                let guards = self
                    .params
                    .grads
                    .iter()
                    .map(|g| g.lock().map_err(|_| poisoned()))
                    .collect::<Result<Vec<_>>>()?;
                let grads: Vec<&[f32]> = guards.iter().map(|g| g.as_slice()).collect();
                let grad_norm = global_norm(&grads);
                let coef = clip_coef(grad_norm, self.args.max_grad_norm);
                let lr = self.args.learning_rate
                    * self
                        .args
                        .lr_scheduler_type
                        .factor(self.global_step, warmup, total);
                opt.step_vars(lr, &self.params.vars, &grads, coef)?;
                drop(guards);
                self.zero_grads()?;
                self.global_step += 1;
                pr.groups_done = bi + 1;
                pr.seen += samples;
                pr.log_loss += loss;
                pr.log_n += 1;
                pr.sum_loss += loss;
                let ep = pr.epoch as f64 + (bi + 1) as f64 / per_epoch as f64;
                on_event(Event::Step {
                    step: self.global_step,
                    total_steps: total,
                    epoch: ep,
                    loss,
                    learning_rate: lr,
                    samples_per_second: pr.seen as f64 / started.elapsed().as_secs_f64(),
                });
                if self.args.logging_steps > 0
                    && self.global_step.is_multiple_of(self.args.logging_steps)
                {
                    let entry = json!({
                        "loss": pr.log_loss / pr.log_n as f64,
                        "grad_norm": grad_norm,
                        "learning_rate": lr,
                        "epoch": ep,
                        "step": self.global_step,
                    });
                    (pr.log_loss, pr.log_n) = (0.0, 0);
                    self.log_history.push(entry.clone());
                    on_event(Event::Log(entry));
                }
                let end_of_epoch = bi + 1 == per_epoch;
                let eval_now = match strategy {
                    EvalStrategy::No => false,
                    EvalStrategy::Epoch => end_of_epoch,
                    EvalStrategy::Steps => {
                        self.args.eval_steps > 0
                            && self.global_step.is_multiple_of(self.args.eval_steps)
                    }
                };
                if eval_now && !self.eval.is_empty() {
                    let t = Instant::now();
                    let m = self.evaluate()?;
                    let mut entry = m.to_json("eval");
                    let secs = t.elapsed().as_secs_f64();
                    entry.insert("eval_runtime".into(), json!(secs));
                    entry.insert(
                        "eval_samples_per_second".into(),
                        json!(m.samples as f64 / secs),
                    );
                    entry.insert("epoch".into(), json!(ep));
                    entry.insert("step".into(), json!(self.global_step));
                    if let Some(v) = entry
                        .get(&self.args.best_metric_name())
                        .and_then(Value::as_f64)
                    {
                        let better = match &self.best {
                            None => true,
                            Some((b, ..)) if self.args.greater_is_better() => v > *b,
                            Some((b, ..)) => v < *b,
                        };
                        if better {
                            self.best = Some((v, self.global_step, None));
                        }
                    }
                    self.log_history.push(Value::Object(entry.clone()));
                    on_event(Event::Log(Value::Object(entry)));
                }
                let save_now = match self.args.save_strategy {
                    SaveStrategy::No => false,
                    SaveStrategy::Epoch => end_of_epoch,
                    SaveStrategy::Steps => {
                        self.args.save_steps > 0
                            && self.global_step.is_multiple_of(self.args.save_steps)
                    }
                };
                if save_now {
                    let mut at = pr.clone();
                    if end_of_epoch {
                        // The next epoch starts from the generator as it is now.
                        (at.epoch, at.groups_done, at.epoch_rng) =
                            (pr.epoch + 1, 0, self.rng.state());
                    }
                    self.checkpoint(&opt, &at)?;
                }
                if self.global_step >= total {
                    break 'outer;
                }
            }
            pr.epoch += 1;
            pr.groups_done = 0;
        }
        if self.args.load_best_model_at_end {
            if let Some((v, step, Some(dir))) = self.best.clone() {
                self.load_weights(&dir)?;
                let mut entry = serde_json::Map::new();
                entry.insert("loaded_best_model".into(), json!(dir));
                entry.insert("step".into(), json!(step));
                entry.insert(self.args.best_metric_name(), json!(v));
                on_event(Event::Log(Value::Object(entry)));
            }
        }
        let secs = started.elapsed().as_secs_f64();
        let entry = json!({
            "train_runtime": secs,
            "train_samples_per_second": pr.seen as f64 / secs,
            "train_steps_per_second": self.global_step as f64 / secs,
            "train_loss": pr.sum_loss / self.global_step.max(1) as f64,
            "epoch": self.global_step as f64 / per_epoch as f64,
            "step": self.global_step,
        });
        self.log_history.push(entry.clone());
        on_event(Event::Log(entry));
        Ok(())
    }

    /// Write `output_dir/checkpoint-N`: the model as [`Trainer::save`] writes it, the
    /// optimizer's moments (`optimizer.safetensors`) and where the run stands
    /// (`trainer_resume.json`); then drop the oldest checkpoints beyond `save_total_limit`.
    fn checkpoint(&mut self, opt: &AdamW, pr: &Progress) -> Result<()> {
        let dir = self
            .args
            .output_dir
            .join(format!("checkpoint-{}", self.global_step));
        if let Some((_, step, path)) = &mut self.best {
            if *step == self.global_step {
                *path = Some(dir.clone());
            }
        }
        self.save(&dir)?;
        let mut tensors = Vec::new();
        for (i, (n, v)) in self.params.names.iter().zip(&self.params.vars).enumerate() {
            let (m, s) = opt.moments(i);
            let shape = v.as_tensor().dims().to_vec();
            tensors.push((format!("exp_avg.{n}"), shape.clone(), m.to_vec()));
            tensors.push((format!("exp_avg_sq.{n}"), shape, s.to_vec()));
        }
        save::write_safetensors(&dir.join("optimizer.safetensors"), &tensors)?;
        save::write_json(
            &dir.join("trainer_resume.json"),
            &json!({
                "global_step": self.global_step,
                "optimizer_step": opt.t,
                "epoch": pr.epoch,
                "groups_done": pr.groups_done,
                "epoch_rng": pr.epoch_rng.to_string(),
                "dropout_rng": self.dropout.state().to_string(),
                "seen": pr.seen,
                "log_loss": pr.log_loss,
                "log_n": pr.log_n,
                "sum_loss": pr.sum_loss,
            }),
        )?;
        if let Some(limit) = self.args.save_total_limit {
            let mut found = checkpoints(&self.args.output_dir)?;
            // The best checkpoint is kept whatever its age, and the newest too (with a limit
            // of 1 that makes 2, as HF keeps them, so that the run can still be resumed).
            let best = self.best.as_ref().and_then(|(_, _, p)| p.clone());
            found.retain(|(_, p)| Some(p) != best.as_ref());
            let keep = limit.max(1).saturating_sub(best.is_some() as usize).max(1);
            let excess = found.len().saturating_sub(keep);
            for (_, p) in found.into_iter().take(excess) {
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
            }
        }
        Ok(())
    }

    /// Set every parameter from the weights in `dir` (a checkpoint or saved model).
    fn load_weights(&self, dir: &Path) -> Result<()> {
        let weights = crate::weights::Weights::from_dir(dir)?;
        for (n, v) in self.params.names.iter().zip(&self.params.vars) {
            let t = weights.tensor(n, &self.device)?;
            if t.dims() != v.as_tensor().dims() {
                return Err(Error::Weights {
                    path: weights.path().to_path_buf(),
                    detail: format!("`{n}` has shape {:?}, the model {:?}", t.dims(), v.dims()),
                });
            }
            v.set(&t)?;
        }
        Ok(())
    }

    /// Continue from a checkpoint of a run with the same data and arguments: its weights, its
    /// optimizer moments and step, its place in its epoch and its generators, so that the
    /// rest of the run is the one the uninterrupted run would have done.
    pub fn resume_from_checkpoint(&mut self, dir: &Path) -> Result<()> {
        let state_path = dir.join("trainer_resume.json");
        let st = crate::config::read_json(&state_path)?;
        let bad = |what: &str| Error::invalid_file(&state_path, format!("no valid `{what}`"));
        let int = |k: &str| st.get(k).and_then(Value::as_u64).ok_or_else(|| bad(k));
        let float = |k: &str| st.get(k).and_then(Value::as_f64).ok_or_else(|| bad(k));
        let big = |k: &str| {
            st.get(k)
                .and_then(Value::as_str)
                .and_then(|s| s.parse::<u64>().ok())
                .ok_or_else(|| bad(k))
        };
        self.load_weights(dir)?;
        let opt_path = dir.join("optimizer.safetensors");
        let moments = candle_core::safetensors::load(&opt_path, &self.device)
            .map_err(|e| Error::invalid_file(&opt_path, e))?;
        let get = |k: String| -> Result<Vec<f32>> {
            let t = moments
                .get(&k)
                .ok_or_else(|| Error::invalid_file(&opt_path, format!("no `{k}`")))?;
            Ok(t.flatten_all()?.to_vec1::<f32>()?)
        };
        let (mut m, mut v) = (Vec::new(), Vec::new());
        for n in &self.params.names {
            m.push(get(format!("exp_avg.{n}"))?);
            v.push(get(format!("exp_avg_sq.{n}"))?);
        }
        let pr = Progress {
            epoch: int("epoch")? as usize,
            groups_done: int("groups_done")? as usize,
            epoch_rng: big("epoch_rng")?,
            seen: int("seen")? as usize,
            log_loss: float("log_loss")?,
            log_n: int("log_n")? as usize,
            sum_loss: float("sum_loss")?,
        };
        self.dropout.set_state(big("dropout_rng")?);
        self.global_step = int("global_step")? as usize;
        let history = crate::config::read_json(&dir.join("trainer_state.json"))?;
        self.log_history = history
            .get("log_history")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let best_dir = history
            .get("best_model_checkpoint")
            .and_then(Value::as_str)
            .map(PathBuf::from);
        self.best = history.get("best_metric").and_then(Value::as_f64).map(|v| {
            let step = best_dir
                .as_ref()
                .and_then(|d| {
                    d.file_name()?
                        .to_str()?
                        .strip_prefix("checkpoint-")?
                        .parse()
                        .ok()
                })
                .unwrap_or(0);
            (v, step, best_dir.clone())
        });
        self.resume = Some((pr, int("optimizer_step")?, m, v));
        Ok(())
    }

    /// Logits of `items` without dropout, and (`with_loss`) their mean loss. Per item: the
    /// classes' logits; token classification and question answering: each token's logits
    /// (labels or start/end), token after token, padding left out.
    fn predict(&self, items: &[Item], with_loss: bool) -> Result<(Vec<Vec<f32>>, f64)> {
        let model = Model {
            cfg: &self.cfg,
            p: &self.params,
            task: self.task,
        };
        let (mut rows, mut loss_sum) = (Vec::new(), 0f64);
        for chunk in items.chunks(self.args.per_device_eval_batch_size) {
            let refs: Vec<&Item> = chunk.iter().collect();
            let (batch, targets) = self.batch(&refs)?;
            let logits = model.forward(&batch, None)?.detach();
            if with_loss {
                loss_sum +=
                    self.loss(&logits, &targets)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
            }
            if self.task == Task::TextClassification {
                rows.extend(logits.to_vec2::<f32>()?);
            } else {
                for (it, per_token) in chunk.iter().zip(logits.to_vec3::<f32>()?) {
                    rows.push(per_token[..it.enc.len()].concat());
                }
            }
        }
        Ok((rows, loss_sum / items.len().max(1) as f64))
    }

    /// Evaluate on the evaluation file.
    pub fn evaluate(&self) -> Result<Metrics> {
        let (logits, loss) = self.predict(&self.eval, true)?;
        let mut m = Metrics::new(loss, self.eval.len());
        match self.task {
            Task::TextClassification => {
                let targets: Vec<&Target> = self.eval.iter().map(|i| &i.target).collect();
                return Ok(classification_metrics(
                    self.labels.problem,
                    &logits,
                    &targets,
                    loss,
                ));
            }
            Task::TokenClassification => {
                let names = &self.labels.names;
                let k = names.len();
                let (mut truth, mut pred) = (Vec::new(), Vec::new());
                for (it, row) in self.eval.iter().zip(&logits) {
                    let Target::Tags(tags) = &it.target else {
                        continue;
                    };
                    let (mut t, mut p) = (Vec::new(), Vec::new());
                    for (i, &tag) in tags.iter().enumerate() {
                        if tag >= 0 {
                            t.push(names[tag as usize].clone());
                            p.push(names[argmax(&row[i * k..(i + 1) * k])].clone());
                        }
                    }
                    truth.push(t);
                    pred.push(p);
                }
                let (precision, recall, f1, accuracy) = metrics::seqeval(&truth, &pred);
                (m.precision, m.recall, m.f1, m.accuracy) =
                    (Some(precision), Some(recall), Some(f1), Some(accuracy));
            }
            Task::QuestionAnswering => {
                let mut windows: Vec<Vec<metrics::Window>> = vec![Vec::new(); self.qa_eval.len()];
                for (it, row) in self.eval.iter().zip(&logits) {
                    let start = row.iter().step_by(2).copied().collect();
                    let end = row.iter().skip(1).step_by(2).copied().collect();
                    windows[it.example].push((&it.enc, start, end));
                }
                let predictions: Vec<String> = self
                    .qa_eval
                    .iter()
                    .zip(&windows)
                    .map(|(e, w)| {
                        metrics::best_answer(
                            &e.context,
                            w,
                            self.args.n_best_size,
                            self.args.max_answer_length,
                        )
                    })
                    .collect();
                let golds: Vec<Vec<String>> = self
                    .qa_eval
                    .iter()
                    .map(|e| e.answers.iter().map(|(t, _)| t.clone()).collect())
                    .collect();
                let (em, f1) = metrics::squad(&predictions, &golds);
                (m.exact_match, m.f1) = (Some(em), Some(f1));
                m.samples = self.qa_eval.len();
            }
        }
        Ok(m)
    }

    /// Logits for texts (evaluation mode): what the saved model gives in our pipelines and in
    /// Python.
    pub fn logits(&self, texts: &[(&str, Option<&str>)]) -> Result<Vec<Vec<f32>>> {
        if self.task != Task::TextClassification {
            return Err(Error::param(
                "task",
                "Trainer::logits is for text classification",
            ));
        }
        let items: Vec<Item> = texts
            .iter()
            .map(|(t, p)| {
                Ok(Item {
                    enc: self.tokenizer.encode(t, *p)?,
                    target: Target::Class(0),
                    example: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(self.predict(&items, false)?.0)
    }

    /// Write the model as `save_pretrained` does, plus `training_args.json` and
    /// `trainer_state.json`, into `dir`.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::write(dir, e))?;
        let tensors = self
            .params
            .names
            .iter()
            .zip(&self.params.vars)
            .map(|(n, v)| {
                let t = v.as_tensor();
                Ok((
                    n.clone(),
                    t.dims().to_vec(),
                    t.flatten_all()?.to_vec1::<f32>()?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        save::write_safetensors(&dir.join("model.safetensors"), &tensors)?;
        save::write_json(
            &dir.join("config.json"),
            &save::config_json(&self.cfg, &self.labels, self.task),
        )?;
        save::copy_tokenizer(&self.model_dir, dir)?;
        save::write_json(&dir.join("training_args.json"), &self.args.to_json())?;
        let per_epoch = self.steps_per_epoch();
        let state = json!({
            "best_metric": self.best.as_ref().map(|(v, ..)| *v),
            "best_model_checkpoint": self.best.as_ref().and_then(|(_, _, p)| p.clone()),
            "epoch": self.global_step as f64 / per_epoch.max(1) as f64,
            "eval_steps": self.args.eval_steps,
            "global_step": self.global_step,
            "is_hyper_param_search": false,
            "is_local_process_zero": true,
            "is_world_process_zero": true,
            "log_history": self.log_history,
            "logging_steps": self.args.logging_steps,
            "max_steps": self.total_steps(),
            "num_input_tokens_seen": 0,
            "num_train_epochs": self.args.num_train_epochs.ceil() as usize,
            "save_steps": 500,
            "total_flos": 0,
            "train_batch_size": self.args.per_device_train_batch_size,
            "trial_name": null,
            "trial_params": null,
        });
        save::write_json(&dir.join("trainer_state.json"), &state)
    }
}

/// The `checkpoint-N` folders of an output folder, by step (oldest first).
pub fn checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut found: Vec<(usize, PathBuf)> = std::fs::read_dir(output_dir)
        .map_err(|e| Error::io(output_dir, e))?
        .filter_map(|e| {
            let p = e.ok()?.path();
            let n = p
                .file_name()?
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()?;
            Some((n, p))
        })
        .collect();
    found.sort();
    Ok(found)
}

/// `cpu`, `cuda` or `cuda:N`.
fn training_device(name: &str) -> Result<Device> {
    crate::device(name)
}

fn poisoned() -> Error {
    Error::Tensor(candle_core::Error::Msg(
        "a gradient slot was poisoned by a panic".into(),
    ))
}

fn argmax(r: &[f32]) -> usize {
    r.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
        .0
}

/// Accuracy and macro-F1 (single-label; sklearn's: over the classes that occur in the labels
/// or the predictions, 0 where undefined), exact match and micro-F1 at sigmoid 0.5
/// (multi-label), mean squared error (regression).
pub fn classification_metrics(
    problem: Problem,
    logits: &[Vec<f32>],
    targets: &[&Target],
    loss: f64,
) -> Metrics {
    let n = targets.len();
    let mut m = Metrics::new(loss, n);
    match problem {
        Problem::SingleLabel => {
            let pred: Vec<usize> = logits.iter().map(|r| argmax(r)).collect();
            let gold: Vec<usize> = targets
                .iter()
                .map(|t| match t {
                    Target::Class(c) => *c as usize,
                    _ => usize::MAX,
                })
                .collect();
            let correct = pred.iter().zip(&gold).filter(|(p, g)| p == g).count();
            m.accuracy = Some(correct as f64 / n.max(1) as f64);
            let classes: std::collections::BTreeSet<usize> =
                pred.iter().chain(&gold).copied().collect();
            let mut f1_sum = 0.0;
            for &c in &classes {
                let tp = pred
                    .iter()
                    .zip(&gold)
                    .filter(|(p, g)| **p == c && **g == c)
                    .count() as f64;
                let fp = pred
                    .iter()
                    .zip(&gold)
                    .filter(|(p, g)| **p == c && **g != c)
                    .count() as f64;
                let fneg = pred
                    .iter()
                    .zip(&gold)
                    .filter(|(p, g)| **p != c && **g == c)
                    .count() as f64;
                let denom = 2.0 * tp + fp + fneg;
                f1_sum += if denom > 0.0 { 2.0 * tp / denom } else { 0.0 };
            }
            m.f1 = Some(f1_sum / classes.len().max(1) as f64);
        }
        Problem::MultiLabel => {
            let (mut exact, mut tp, mut fp, mut fneg) = (0usize, 0f64, 0f64, 0f64);
            for (r, t) in logits.iter().zip(targets) {
                let Target::Multi(gold) = t else { continue };
                let mut all = true;
                for (&x, &g) in r.iter().zip(gold) {
                    let p = x > 0.0;
                    let g = g > 0.5;
                    all &= p == g;
                    tp += (p && g) as u8 as f64;
                    fp += (p && !g) as u8 as f64;
                    fneg += (!p && g) as u8 as f64;
                }
                exact += all as usize;
            }
            m.accuracy = Some(exact as f64 / n.max(1) as f64);
            let denom = 2.0 * tp + fp + fneg;
            m.f1 = Some(if denom > 0.0 { 2.0 * tp / denom } else { 0.0 });
        }
        Problem::Regression => {
            let se: f64 = logits
                .iter()
                .zip(targets)
                .map(|(r, t)| match t {
                    Target::Value(v) => (r[0] as f64 - *v as f64).powi(2),
                    _ => 0.0,
                })
                .sum();
            m.mse = Some(se / n.max(1) as f64);
        }
    }
    m
}
