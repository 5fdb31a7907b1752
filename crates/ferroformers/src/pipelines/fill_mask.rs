//! `fill-mask`, as HF's `FillMaskPipeline`.

use serde::Serialize;

use super::text_classification::softmax;
use super::{param, EncoderRunner, Input, Output, Params, PipelineOptions, Task};
use crate::error::{Error, Result};
use crate::models::Head;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FillMaskToken {
    pub score: f64,
    pub token: u32,
    pub token_str: String,
    pub sequence: String,
}

pub(crate) struct FillMask {
    runner: EncoderRunner,
    mask_id: u32,
    mask_token: String,
}

/// HF's `get_target_ids`: a vocabulary entry as is, else the first token of its tokenization.
pub fn target_ids(tokenizer: &Tokenizer, targets: &[String]) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for t in targets {
        let id = match tokenizer.token_to_id(t) {
            Some(id) => Some(id),
            None => tokenizer.encode_with(t, None, false)?.ids.first().copied(),
        };
        if let Some(id) = id {
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
    }
    if ids.is_empty() {
        return Err(Error::param(
            "targets",
            "none of the targets could be turned into a vocabulary token",
        ));
    }
    Ok(ids)
}

/// Indices of the `k` largest values, largest first; equal values keep index order.
pub fn top_k_indices(values: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..values.len()).collect();
    idx.sort_by(|&a, &b| values[b].total_cmp(&values[a]));
    idx.truncate(k);
    idx
}

impl FillMask {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        let runner = EncoderRunner::load(opts, model, Head::MaskedLm, "fill-mask")?;
        let mask_token = runner.tokenizer.mask_token.clone().ok_or_else(|| {
            Error::invalid_file(
                runner.config.path.with_file_name("tokenizer_config.json"),
                "the tokenizer defines no mask token, so it cannot do fill-mask",
            )
        })?;
        let mask_id = runner.tokenizer.mask_id.ok_or_else(|| {
            Error::Tokenizer(format!(
                "mask token `{mask_token}` is not in the vocabulary"
            ))
        })?;
        Ok(Self {
            runner,
            mask_id,
            mask_token,
        })
    }

    fn postprocess(
        &self,
        ids: &[u32],
        logits: &[Vec<f32>],
        top_k: usize,
        targets: Option<&[u32]>,
    ) -> Result<Output> {
        let tok = &self.runner.tokenizer;
        let masked: Vec<usize> = (0..ids.len()).filter(|&i| ids[i] == self.mask_id).collect();
        let single = masked.len() == 1;
        let mut rows = Vec::with_capacity(masked.len());
        for &pos in &masked {
            let probs = softmax(&logits[pos]);
            let (cands, values): (Vec<u32>, Vec<f32>) = match targets {
                Some(t) => (t.to_vec(), t.iter().map(|&id| probs[id as usize]).collect()),
                None => ((0..probs.len() as u32).collect(), probs),
            };
            let k = top_k.min(cands.len());
            let mut row = Vec::with_capacity(k);
            for i in top_k_indices(&values, k) {
                let token = cands[i];
                let mut seq: Vec<u32> = ids.to_vec();
                seq[pos] = token;
                seq.retain(|&t| t != tok.pad_id);
                row.push(FillMaskToken {
                    score: values[i] as f64,
                    token,
                    token_str: tok.decode(&[token], false)?,
                    sequence: tok.decode(&seq, single)?,
                });
            }
            rows.push(row);
        }
        Ok(if single {
            Output::FillMask(rows.pop().unwrap_or_default())
        } else {
            Output::FillMaskMulti(rows)
        })
    }
}

impl Task for FillMask {
    fn accepted_params(&self) -> &'static [&'static str] {
        &["top_k", "targets", "truncation"]
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        param::check_truncation(params)?;
        let top_k = match param::opt_usize(params, "top_k")? {
            None => 5,
            Some(Some(k)) if k >= 1 => k,
            _ => return Err(Error::param("top_k", "expected an integer >= 1")),
        };
        let targets = match param::opt_str_list(params, "targets")? {
            Some(t) if t.is_empty() => {
                return Err(Error::param("targets", "the list of targets is empty"))
            }
            Some(t) => Some(target_ids(&self.runner.tokenizer, &t)?),
            None => None,
        };
        let encs = self.runner.encode_all(inputs)?;
        for (i, e) in encs.iter().enumerate() {
            if !e.ids.contains(&self.mask_id) {
                return Err(Error::input(
                    i,
                    format!("no mask token ({}) found in the input", self.mask_token),
                ));
            }
        }
        let mut outs = Vec::with_capacity(inputs.len());
        self.runner.run(&encs, batch_size, |i, logits| {
            let logits: Vec<Vec<f32>> = logits.to_vec2()?;
            outs.push(self.postprocess(&encs[i].ids, &logits, top_k, targets.as_deref())?);
            Ok(())
        })?;
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_orders_by_value_then_index() {
        assert_eq!(top_k_indices(&[0.1, 0.5, 0.5, 0.2], 3), vec![1, 2, 3]);
        assert_eq!(top_k_indices(&[0.1], 5), vec![0]);
        assert!(top_k_indices(&[], 2).is_empty());
    }
}
