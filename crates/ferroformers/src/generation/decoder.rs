//! [`StepModel`] for decoder-only models: left-padded prompts, the attention mask and position
//! ids HF derives from it (`cumsum(mask) - 1`, pads at 1), and the KV cache.

use candle_core::Tensor;

use super::search::StepModel;
use crate::error::{Error, Result};
use crate::models::causal_lm::{causal_bias, CausalLm, KvCache};

pub struct DecoderSession<'m> {
    model: &'m dyn CausalLm,
    cache: KvCache,
    /// Per row, 0/1 over every token seen (prompt padding is 0).
    mask: Vec<Vec<u8>>,
    /// Left-padded prompt rows, consumed by the first step.
    prompts: Option<Vec<Vec<u32>>>,
}

/// Left-pad `prompts` with `pad_id` to one length; returns the rows and their masks.
pub fn left_pad(prompts: &[Vec<u32>], pad_id: u32) -> (Vec<Vec<u32>>, Vec<Vec<u8>>) {
    let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
    prompts
        .iter()
        .map(|p| {
            let pad = len - p.len();
            let mut row = vec![pad_id; pad];
            row.extend_from_slice(p);
            let mut m = vec![0u8; pad];
            m.extend(std::iter::repeat_n(1u8, p.len()));
            (row, m)
        })
        .unzip()
}

impl<'m> DecoderSession<'m> {
    /// A session over left-padded `rows` with their 0/1 `mask`.
    pub fn new(model: &'m dyn CausalLm, rows: Vec<Vec<u32>>, mask: Vec<Vec<u8>>) -> Result<Self> {
        let len = rows.first().map_or(0, Vec::len);
        if len == 0 {
            return Err(Error::param("inputs", "the prompt is empty"));
        }
        Ok(Self {
            model,
            cache: KvCache::new(model.num_layers()),
            mask,
            prompts: Some(rows),
        })
    }

    /// Full logits `[rows][seq][vocab]` of the prompt (no generation): for tests and scoring.
    pub fn prompt_logits(&mut self) -> Result<Vec<Vec<Vec<f32>>>> {
        let out = self.forward_prompt(false)?;
        Ok(out.to_vec3()?)
    }

    /// The KV cache and the 0/1 masks of the rows, once the session is done with them.
    pub fn into_parts(self) -> (KvCache, Vec<Vec<u8>>) {
        (self.cache, self.mask)
    }

    fn forward_prompt(&mut self, last_only: bool) -> Result<Tensor> {
        let rows = self
            .prompts
            .take()
            .ok_or_else(|| Error::param("inputs", "the prompt was already run"))?;
        let (b, s) = (rows.len(), rows[0].len());
        let dev = self.model.device();
        let ids = Tensor::from_vec(rows.concat(), (b, s), dev)?;
        let mut pos = Vec::with_capacity(b * s);
        for m in &self.mask {
            let mut c = 0u32;
            for &x in m {
                c += x as u32;
                pos.push(if x == 0 { 1 } else { c - 1 });
            }
        }
        let pos = Tensor::from_vec(pos, (b, s), dev)?;
        let bias = causal_bias(&self.mask, s, dev)?;
        Ok(self
            .model
            .forward(&ids, &pos, &bias, &mut self.cache, last_only)?)
    }
}

impl StepModel for DecoderSession<'_> {
    fn step(&mut self, new_tokens: Option<&[u32]>) -> Result<Vec<Vec<f32>>> {
        let logits = match new_tokens {
            None => self.forward_prompt(true)?,
            Some(tokens) => {
                let b = tokens.len();
                if b != self.mask.len() {
                    return Err(Error::param("inputs", "one new token per row expected"));
                }
                let dev = self.model.device();
                let mut pos = Vec::with_capacity(b);
                for m in self.mask.iter_mut() {
                    m.push(1);
                    pos.push(m.iter().map(|&x| x as u32).sum::<u32>() - 1);
                }
                if self.model.hard_position_limit() {
                    let limit = self.model.max_positions().unwrap_or(usize::MAX);
                    if pos.iter().any(|&p| p as usize >= limit) {
                        return Err(Error::param(
                            "max_new_tokens",
                            format!(
                                "generation would run past the model's {limit} positions; \
                                 lower max_new_tokens or shorten the prompt"
                            ),
                        ));
                    }
                }
                let ids = Tensor::from_vec(tokens.to_vec(), (b, 1), dev)?;
                let pos = Tensor::from_vec(pos, (b, 1), dev)?;
                let bias = causal_bias(&self.mask, 1, dev)?;
                self.model
                    .forward(&ids, &pos, &bias, &mut self.cache, true)?
            }
        };
        Ok(logits.squeeze(1)?.to_vec2()?)
    }

    fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        self.cache.select_rows(&idx)?;
        self.mask = rows.iter().map(|&r| self.mask[r].clone()).collect();
        if let Some(p) = &self.prompts {
            self.prompts = Some(rows.iter().map(|&r| p[r].clone()).collect());
        }
        Ok(())
    }
}
