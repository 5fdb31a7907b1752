//! [`StepModel`] for decoder-only models: left-padded prompts, the attention mask and position
//! ids HF derives from it (`cumsum(mask) - 1`, pads at 1), and the KV cache.

use candle_core::Tensor;

use super::search::{Hooks, StepModel};
use super::GenerationConfig;
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
        let s = rows[0].len();
        forward_masked(
            self.model,
            &mut self.cache,
            &self.mask,
            rows.concat(),
            s,
            last_only,
        )
    }
}

/// Run `ids` (row-major, `new` per row: the last `new` columns of each row of `mask`) over
/// `cache`: positions count each row's real tokens (`cumsum(mask) - 1`, padding at 1, as HF
/// derives them), and the bias hides padding (left padding, or gaps) and the future.
pub(crate) fn forward_masked(
    model: &dyn CausalLm,
    cache: &mut KvCache,
    mask: &[Vec<u8>],
    ids: Vec<u32>,
    new: usize,
    last_only: bool,
) -> Result<Tensor> {
    let (b, dev) = (mask.len(), model.device());
    let mut pos = Vec::with_capacity(b * new);
    for m in mask {
        let first = m.len() - new;
        let mut c = 0u32;
        for (j, &x) in m.iter().enumerate() {
            c += x as u32;
            if j >= first {
                pos.push(if x == 0 { 1 } else { c - 1 });
            }
        }
    }
    let ids = Tensor::from_vec(ids, (b, new), dev)?;
    let pos = Tensor::from_vec(pos, (b, new), dev)?;
    let bias = causal_bias(mask, new, dev)?;
    Ok(model.forward(&ids, &pos, &bias, cache, last_only)?)
}

/// An error when a token at `pos` would run past a model whose positions are a hard limit
/// (learned position embeddings).
pub(crate) fn check_position(model: &dyn CausalLm, pos: usize) -> Result<()> {
    if model.hard_position_limit() {
        let limit = model.max_positions().unwrap_or(usize::MAX);
        if pos >= limit {
            return Err(Error::param(
                "max_new_tokens",
                format!(
                    "generation would run past the model's {limit} positions; lower \
                     max_new_tokens or shorten the prompt"
                ),
            ));
        }
    }
    Ok(())
}

impl DecoderSession<'_> {
    /// Screen the output projection of the following steps when `cfg` and `hooks` read only
    /// each step's argmax (greedy search, one sequence, no value-dependent processors, no
    /// log-probabilities): see [`crate::kernels::cpu::split8`]. The tokens a processor may
    /// suppress (eos before the minimum length, `suppress_tokens`, `begin_suppress_tokens`)
    /// are always computed in full. Models without a split projection ignore it.
    pub fn screen_if_greedy(&mut self, cfg: &GenerationConfig, hooks: &Hooks) {
        let greedy = cfg.argmax_only()
            && cfg.timestamp_rules.is_none()
            && hooks.on_token.is_none()
            && hooks.on_top.is_none()
            && hooks.top_logprobs == 0
            && hooks.on_beam_logprobs.is_none();
        if !greedy {
            return;
        }
        let mut always: Vec<u32> = cfg
            .eos_token_id
            .iter()
            .chain(&cfg.suppress_tokens)
            .chain(&cfg.begin_suppress_tokens)
            .copied()
            .collect();
        always.sort_unstable();
        always.dedup();
        self.cache.set_screen(Some(std::sync::Arc::new(always)));
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
                for m in self.mask.iter_mut() {
                    m.push(1);
                    let pos = m.iter().filter(|&&x| x != 0).count() - 1;
                    check_position(self.model, pos)?;
                }
                forward_masked(
                    self.model,
                    &mut self.cache,
                    &self.mask,
                    tokens.to_vec(),
                    1,
                    true,
                )?
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
