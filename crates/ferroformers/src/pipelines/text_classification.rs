//! `text-classification` (alias `sentiment-analysis`), as HF's `TextClassificationPipeline`.

use serde::Serialize;

use super::{param, EncoderRunner, Input, Output, Params, PipelineOptions, Task};
use crate::error::{Error, Result};
use crate::models::Head;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LabelScore {
    pub label: String,
    pub score: f64,
}

/// `function_to_apply`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFunction {
    Softmax,
    Sigmoid,
    None,
}

impl ScoreFunction {
    pub fn parse(s: &str) -> Result<Option<Self>> {
        match s.to_ascii_lowercase().as_str() {
            "default" => Ok(None),
            "softmax" => Ok(Some(Self::Softmax)),
            "sigmoid" => Ok(Some(Self::Sigmoid)),
            "none" => Ok(Some(Self::None)),
            _ => Err(Error::param(
                "function_to_apply",
                format!("`{s}` is not one of default, softmax, sigmoid, none"),
            )),
        }
    }

    /// HF's default from `problem_type` and `num_labels`.
    pub fn default_for(problem_type: Option<&str>, num_labels: usize) -> Self {
        match problem_type {
            Some("regression") => Self::None,
            Some("multi_label_classification") => Self::Sigmoid,
            _ if num_labels == 1 => Self::Sigmoid,
            _ => Self::Softmax,
        }
    }

    /// Applied in f32, as HF does on numpy float32 logits.
    pub fn apply(self, logits: &[f32]) -> Vec<f32> {
        match self {
            Self::None => logits.to_vec(),
            Self::Sigmoid => logits.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect(),
            Self::Softmax => softmax(logits),
        }
    }
}

pub fn softmax(xs: &[f32]) -> Vec<f32> {
    let max = xs.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = xs.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

/// `top_k`: unset gives HF's legacy single `{label, score}`; `Some(None)` (null) all labels.
pub fn postprocess(scores: &[f32], labels: &[String], top_k: Option<Option<usize>>) -> Output {
    let label = |i: usize| {
        labels
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("LABEL_{i}"))
    };
    match top_k {
        None => {
            // argmax: first of equal maxima, as numpy.
            let mut best = 0;
            for (i, s) in scores.iter().enumerate() {
                if *s > scores[best] {
                    best = i;
                }
            }
            Output::Label(LabelScore {
                label: label(best),
                score: scores.get(best).copied().unwrap_or(f32::NAN) as f64,
            })
        }
        Some(k) => {
            let mut all: Vec<LabelScore> = scores
                .iter()
                .enumerate()
                .map(|(i, s)| LabelScore {
                    label: label(i),
                    score: *s as f64,
                })
                .collect();
            // Stable, like Python's sort(reverse=True).
            all.sort_by(|a, b| b.score.total_cmp(&a.score));
            if let Some(k) = k {
                all.truncate(k);
            }
            Output::Labels(all)
        }
    }
}

pub(crate) struct TextClassification {
    runner: EncoderRunner,
}

impl TextClassification {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        Ok(Self {
            runner: EncoderRunner::load(
                opts,
                model,
                Head::SequenceClassification,
                "text-classification",
            )?,
        })
    }
}

impl Task for TextClassification {
    fn accepted_params(&self) -> &'static [&'static str] {
        &["top_k", "function_to_apply", "truncation"]
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        param::check_truncation(params)?;
        let top_k = param::opt_usize(params, "top_k")?;
        let cfg = &self.runner.config;
        let function = match param::opt_str(params, "function_to_apply")? {
            Some(s) => ScoreFunction::parse(s)?,
            None => None,
        }
        .unwrap_or_else(|| {
            ScoreFunction::default_for(cfg.problem_type.as_deref(), cfg.num_labels())
        });
        let encs = self.runner.encode_all(inputs)?;
        let mut outs = Vec::with_capacity(inputs.len());
        self.runner.run(&encs, batch_size, |_, logits| {
            let logits: Vec<f32> = logits.to_vec1()?;
            outs.push(postprocess(&function.apply(&logits), &cfg.id2label, top_k));
            Ok(())
        })?;
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["A".into(), "B".into(), "C".into()]
    }

    #[test]
    fn legacy_returns_argmax() {
        let out = postprocess(&[0.1, 0.7, 0.2], &labels(), None);
        assert_eq!(
            out,
            Output::Label(LabelScore {
                label: "B".into(),
                score: 0.7f32 as f64
            })
        );
    }

    #[test]
    fn top_k_sorts_and_keeps_ties_in_order() {
        let Output::Labels(v) = postprocess(&[0.4, 0.2, 0.4], &labels(), Some(Some(2))) else {
            panic!()
        };
        assert_eq!(
            v.iter().map(|l| l.label.as_str()).collect::<Vec<_>>(),
            ["A", "C"]
        );
        let Output::Labels(v) = postprocess(&[0.1, 0.2, 0.7], &labels(), Some(None)) else {
            panic!()
        };
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].label, "C");
    }

    #[test]
    fn default_function_follows_problem_type() {
        assert_eq!(ScoreFunction::default_for(None, 1), ScoreFunction::Sigmoid);
        assert_eq!(ScoreFunction::default_for(None, 3), ScoreFunction::Softmax);
        assert_eq!(
            ScoreFunction::default_for(Some("multi_label_classification"), 3),
            ScoreFunction::Sigmoid
        );
        assert_eq!(
            ScoreFunction::default_for(Some("regression"), 1),
            ScoreFunction::None
        );
        let s = softmax(&[1.0, 2.0, 3.0]);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        assert!(ScoreFunction::parse("bogus").is_err());
    }
}
