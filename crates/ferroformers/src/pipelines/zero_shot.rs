//! `zero-shot-classification` over any NLI sequence-classification model, as HF's
//! `ZeroShotClassificationPipeline`: each candidate label becomes a hypothesis paired with the
//! sequence; the entailment logits rank the labels.

use serde::Serialize;

use super::{param, EncoderRunner, Input, Output, Params, PipelineOptions, Task};
use crate::error::{Error, Result};
use crate::models::Head;
use crate::tokenizer::{Encoded, Tokenizer};

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ZeroShotResult {
    pub sequence: String,
    pub labels: Vec<String>,
    pub scores: Vec<f64>,
}

pub const DEFAULT_TEMPLATE: &str = "This example is {}.";

/// The first label whose name starts with "entail" (case-insensitive), as HF's
/// `entailment_id`.
pub fn entailment_id(id2label: &[String]) -> Option<usize> {
    id2label
        .iter()
        .position(|l| l.to_lowercase().starts_with("entail"))
}

/// `candidate_labels`: a list, or one comma-separated string.
pub fn candidate_labels(p: &Params) -> Result<Vec<String>> {
    let labels = match p.get("candidate_labels") {
        Some(serde_json::Value::String(s)) => s
            .split(',')
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        _ => param::opt_str_list(p, "candidate_labels")?.unwrap_or_default(),
    };
    if labels.is_empty() {
        return Err(Error::param(
            "candidate_labels",
            "give at least one candidate label (a list, or a comma-separated string)",
        ));
    }
    Ok(labels)
}

/// Scores per label from each (sequence, hypothesis) pair's logits, HF's postprocess: softmax
/// of the entailment logits across labels, or (multi-label, or a single label) softmax of
/// entailment vs contradiction per label. Returns labels and scores best first.
pub fn postprocess(
    logits: &[Vec<f32>],
    labels: &[String],
    entail: usize,
    multi_label: bool,
) -> (Vec<String>, Vec<f64>) {
    let scores: Vec<f32> = if !multi_label && labels.len() != 1 {
        let exps: Vec<f32> = logits.iter().map(|l| l[entail].exp()).collect();
        let sum: f32 = exps.iter().sum();
        exps.iter().map(|e| e / sum).collect()
    } else {
        let contra = if entail == 0 { logits[0].len() - 1 } else { 0 };
        logits
            .iter()
            .map(|l| {
                let (c, e) = (l[contra].exp(), l[entail].exp());
                e / (c + e)
            })
            .collect()
    };
    // numpy's argsort (stable for these sizes) reversed: ties keep reverse index order.
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    order.reverse();
    (
        order.iter().map(|&i| labels[i].clone()).collect(),
        order.iter().map(|&i| scores[i] as f64).collect(),
    )
}

pub(crate) struct ZeroShot {
    runner: EncoderRunner,
    tokenizer: Tokenizer,
    entail: usize,
}

impl ZeroShot {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        let runner = EncoderRunner::load(
            opts,
            model,
            Head::SequenceClassification,
            "zero-shot-classification",
        )?;
        let entail = entailment_id(&runner.config.id2label).ok_or_else(|| {
            Error::invalid_file(
                &runner.config.path,
                format!(
                    "zero-shot classification needs an NLI model with an `entailment` label in \
                     id2label/label2id; this model's labels are {:?}",
                    runner.config.id2label
                ),
            )
        })?;
        let mut tokenizer = runner.tokenizer.clone();
        tokenizer.set_truncation_only_first()?;
        Ok(Self {
            runner,
            tokenizer,
            entail,
        })
    }
}

impl Task for ZeroShot {
    fn accepted_params(&self) -> &'static [&'static str] {
        &[
            "candidate_labels",
            "hypothesis_template",
            "multi_label",
            "truncation",
        ]
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        param::check_truncation(params)?;
        let labels = candidate_labels(params)?;
        let template = param::opt_str(params, "hypothesis_template")?.unwrap_or(DEFAULT_TEMPLATE);
        if !template.contains("{}") {
            return Err(Error::param(
                "hypothesis_template",
                format!(
                    "`{template}` has no `{{}}` where the label should go (e.g. \"This example is {{}}.\")"
                ),
            ));
        }
        let multi_label = param::opt_bool(params, "multi_label")?.unwrap_or(false);
        let mut sequences = Vec::with_capacity(inputs.len());
        let mut encs: Vec<Encoded> = Vec::with_capacity(inputs.len() * labels.len());
        for (i, input) in inputs.iter().enumerate() {
            let (text, pair) = input.text_and_pair(i)?;
            if pair.is_some() {
                return Err(Error::input(
                    i,
                    "zero-shot classification takes a single text; the hypotheses come from \
                     candidate_labels",
                ));
            }
            sequences.push(text.to_string());
            for label in &labels {
                let hypothesis = template.replacen("{}", label, 1);
                encs.push(self.tokenizer.encode(text, Some(&hypothesis))?);
            }
        }
        let mut logits: Vec<Vec<f32>> = Vec::with_capacity(encs.len());
        self.runner.run(&encs, batch_size, |_, row| {
            logits.push(row.to_vec1()?);
            Ok(())
        })?;
        Ok(sequences
            .into_iter()
            .zip(logits.chunks(labels.len()))
            .map(|(sequence, rows)| {
                let (labels, scores) = postprocess(rows, &labels, self.entail, multi_label);
                Output::ZeroShot(ZeroShotResult {
                    sequence,
                    labels,
                    scores,
                })
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        vec!["a".into(), "b".into(), "c".into()]
    }

    #[test]
    fn single_label_softmax_over_entailment() {
        // [contradiction, neutral, entailment] per hypothesis
        let logits = vec![
            vec![0.0, 0.0, 1.0],
            vec![0.0, 0.0, 3.0],
            vec![0.0, 0.0, 2.0],
        ];
        let (l, s) = postprocess(&logits, &labels(), 2, false);
        assert_eq!(l, vec!["b", "c", "a"]);
        assert!((s.iter().sum::<f64>() - 1.0).abs() < 1e-6);
    }

    #[test]
    fn multi_label_is_per_label_entail_vs_contradiction() {
        let logits = vec![vec![0.0, 5.0, 0.0], vec![2.0, 0.0, 0.0]];
        let (l, s) = postprocess(&logits, &labels()[..2], 2, true);
        assert_eq!(l, vec!["a", "b"]);
        assert!((s[0] - 0.5).abs() < 1e-6, "neutral is ignored: {s:?}");
        // entailment at index 0: contradiction is the last label
        let (_, s) = postprocess(&[vec![1.0, 0.0, 1.0]], &labels()[..1], 0, false);
        assert!((s[0] - 0.5).abs() < 1e-6);
    }

    #[test]
    fn ties_in_reverse_index_order_and_label_parsing() {
        let logits = vec![vec![0.0, 0.0, 1.0], vec![0.0, 0.0, 1.0]];
        let (l, _) = postprocess(&logits, &labels()[..2], 2, false);
        assert_eq!(l, vec!["b", "a"]);
        let mut p = Params::new();
        p.insert("candidate_labels".into(), " sports, politics ,,".into());
        assert_eq!(candidate_labels(&p).unwrap(), vec!["sports", "politics"]);
        p.insert("candidate_labels".into(), serde_json::json!([]));
        assert!(candidate_labels(&p).is_err());
        assert_eq!(
            entailment_id(&["CONTRADICTION".into(), "ENTAILMENT".into()]),
            Some(1)
        );
        assert_eq!(entailment_id(&["LABEL_0".into()]), None);
    }
}
