//! Text generation: the search loop over any [`StepModel`] ([`search`]), logits processors and
//! sampling ([`logits`]), `generation_config.json` merging ([`config`]), decoder-only sessions
//! with KV cache and left padding ([`decoder`]), streaming ([`stream`]), chat templates
//! ([`chat`]), and [`TextGenerator`], a causal LM with its tokenizer.

pub mod chat;
pub mod config;
pub mod continuous;
pub mod decoder;
pub mod logits;
pub mod search;
pub mod stream;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

pub use chat::{ChatTemplate, Message};
pub use config::{EarlyStopping, GenerationConfig};
pub(crate) use continuous::take_arriving;
pub use continuous::{arriving, Admission, Arrival, BatchStats, Batcher, Scored};
pub use decoder::{left_pad, DecoderSession};
pub use search::{abandoned_when, generate, Cancel, Generated, Hooks, StepModel, TokenScore};
pub use stream::TextStreamer;

use crate::config::{ModelConfig, TokenizerConfig};
use crate::error::{Error, Result};
use crate::kernels::cpu::quantized::QuantMath;
use crate::models::causal_lm::{load_causal_lm, CausalLm};
use crate::tokenizer::Tokenizer;

/// A causal language model with its tokenizer, generation defaults and chat template.
pub struct TextGenerator {
    pub model: Box<dyn CausalLm>,
    pub tokenizer: Tokenizer,
    /// The same tokenizer without truncation (prompts are checked against the context window
    /// instead of being cut silently).
    encoder: tokenizers::Tokenizer,
    /// The model's defaults (`generation_config.json`, else `config.json`).
    pub generation_config: GenerationConfig,
    pub chat_template: Option<ChatTemplate>,
    pub pad_token_id: u32,
    pub path: PathBuf,
    /// Continuous batching of single-sequence requests (a server), when set.
    pub batcher: Option<Batcher>,
    /// Keep requests within the model's context window, as a server does (TGI's
    /// `--max-total-tokens`, vLLM's context check), instead of generating until the window ends
    /// as transformers does (with a warning): see [`TextGenerator::fit_to_context`].
    pub refuse_past_context: bool,
}

/// The `.gguf` file a path names: the file itself, or the only one in a folder without
/// config.json.
pub fn gguf_file(path: &Path) -> Option<PathBuf> {
    if path.is_file() {
        return (path.extension()? == "gguf").then(|| path.to_path_buf());
    }
    if path.join("config.json").is_file() {
        return None;
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(path)
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "gguf"))
        .collect();
    found.sort();
    found.into_iter().next()
}

/// `chat_template` from tokenizer_config.json (a string, or a list of named templates with a
/// `default`), else a `chat_template.jinja` file.
fn read_chat_template(dir: &Path) -> Result<Option<String>> {
    let cfg = dir.join("tokenizer_config.json");
    if cfg.is_file() {
        let v = crate::config::read_json(&cfg)?;
        match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => return Ok(Some(s.clone())),
            Some(serde_json::Value::Array(list)) => {
                let default = list
                    .iter()
                    .find(|t| t["name"] == "default")
                    .or(list.first());
                if let Some(s) = default.and_then(|t| t["template"].as_str()) {
                    return Ok(Some(s.to_string()));
                }
            }
            _ => {}
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::Io {
                path: jinja,
                source: e,
            });
    }
    Ok(None)
}

/// Positions per pass of [`TextGenerator::prompt_logprobs`]: a chunk's logits are
/// `SCORE_CHUNK x vocab` floats (39 MB for Qwen2.5's 152k tokens).
pub const SCORE_CHUNK: usize = 64;

/// `--gguf-math` given for a model that is not GGUF: it sets nothing there.
pub(crate) fn warn_gguf_math_unused(gguf_math: Option<QuantMath>) {
    if gguf_math.is_some() {
        eprintln!("warning: --gguf-math is ignored: the model is not a GGUF file");
    }
}

impl TextGenerator {
    /// Load from a model folder (config.json, weights, tokenizer) or a GGUF file.
    pub fn load(
        model: &str,
        tokenizer: Option<&str>,
        revision: Option<&str>,
        device: &Device,
        dtype: DType,
        gguf_math: Option<QuantMath>,
    ) -> Result<Self> {
        let path = crate::hub::resolve(model, revision)?;
        if let Some(file) = gguf_file(&path) {
            if let Some(t) = tokenizer {
                eprintln!(
                    "warning: --tokenizer `{t}` is ignored: a GGUF model uses the tokenizer \
                     stored in its file"
                );
            }
            return Self::from_gguf(&file, device, dtype, QuantMath::resolve(gguf_math));
        }
        warn_gguf_math_unused(gguf_math);
        let config = ModelConfig::from_dir(&path)?;
        let lm = load_causal_lm(&path, Some(&config), device, dtype, "text-generation")?;
        let tok_dir = match tokenizer {
            Some(t) => crate::hub::resolve(t, revision)?,
            None => path.clone(),
        };
        let tok = Tokenizer::from_dir(&tok_dir, &config.model_type, lm.max_positions())?;
        let tcfg = TokenizerConfig::from_dir(&tok_dir)?;
        let mut chat_template = match read_chat_template(&tok_dir)? {
            Some(src) => Some(ChatTemplate::new(src)?),
            None => None,
        };
        if let Some(t) = chat_template.as_mut() {
            t.bos_token = tcfg.bos_token.clone();
            t.eos_token = tcfg.eos_token.clone();
            t.unk_token = tcfg.unk_token.clone();
            t.pad_token = tcfg.pad_token.clone();
        }
        let generation_config = GenerationConfig::from_model_dir(&path)?;
        let tok_pad = tcfg.pad_token.as_deref().and_then(|t| tok.token_to_id(t));
        Self::assemble(lm, tok, generation_config, chat_template, tok_pad, path)
    }

    /// Load from one GGUF file: its model, embedded tokenizer, chat template and special ids
    /// (`models::gguf` reads them; the generation defaults come from the ids). On a GPU the
    /// weights are dequantized to `dtype` (f16/bf16 as one asks; the CPU runs the blocks).
    pub fn from_gguf(path: &Path, device: &Device, dtype: DType, math: QuantMath) -> Result<Self> {
        let parts = crate::models::gguf::load_text_parts(path, device, dtype, math)?;
        let tcfg = parts.tokenizer_config;
        let chat_template = match parts.chat_template {
            Some(src) => {
                let mut t = ChatTemplate::new(src)?;
                t.bos_token = tcfg.bos_token.clone();
                t.eos_token = tcfg.eos_token.clone();
                t.unk_token = tcfg.unk_token.clone();
                t.pad_token = tcfg.pad_token.clone();
                Some(t)
            }
            None => None,
        };
        let gen = GenerationConfig {
            bos_token_id: parts.bos_token_id,
            eos_token_id: parts.eos_token_id.map(|x| vec![x]).unwrap_or_default(),
            pad_token_id: parts.pad_token_id,
            ..Default::default()
        };
        let pad = gen.pad_token_id;
        Self::assemble(
            Box::new(parts.model),
            parts.tokenizer,
            gen,
            chat_template,
            pad,
            path.to_path_buf(),
        )
    }

    fn assemble(
        model: Box<dyn CausalLm>,
        tokenizer: Tokenizer,
        generation_config: GenerationConfig,
        chat_template: Option<ChatTemplate>,
        tokenizer_pad: Option<u32>,
        path: PathBuf,
    ) -> Result<Self> {
        let mut encoder = tokenizer.inner().clone();
        encoder
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let pad_token_id = generation_config
            .pad_token_id
            .or(tokenizer_pad)
            .or(generation_config.eos_token_id.first().copied())
            .unwrap_or(0);
        Ok(Self {
            model,
            tokenizer,
            encoder,
            generation_config,
            chat_template,
            pad_token_id,
            path,
            batcher: None,
            refuse_past_context: false,
        })
    }

    /// Token ids of `text` (untruncated).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        Ok(self
            .encoder
            .encode(text, add_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// `tokenizer.decode(ids, skip_special_tokens, clean_up_tokenization_spaces)`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool, clean_up: bool) -> Result<String> {
        let text = self
            .encoder
            .decode(ids, skip_special_tokens)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(if clean_up {
            crate::tokenizer::clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// Render a chat with the model's template (`add_generation_prompt` unless continuing the
    /// final message) and tokenize it without adding special tokens, as HF does.
    pub fn encode_chat(
        &self,
        messages: &[Message],
        continue_final_message: bool,
    ) -> Result<Vec<u32>> {
        let tmpl = self.chat_template.as_ref().ok_or_else(|| {
            Error::input(
                0,
                "this model has no chat template (tokenizer_config.json `chat_template`); pass \
                 plain text instead",
            )
        })?;
        let text = tmpl.render(messages, !continue_final_message, continue_final_message)?;
        self.encode(&text, false)
    }

    /// Refuse prompts the model's positions cannot hold.
    pub fn check_prompt_length(&self, len: usize) -> Result<()> {
        if let Some(max) = self.model.max_positions() {
            if len > max {
                return Err(Error::InvalidInput {
                    index: 0,
                    detail: format!(
                        "the prompt is {len} tokens, longer than the model's context window of \
                         {max} tokens"
                    ),
                });
            }
        }
        Ok(())
    }

    /// With [`TextGenerator::refuse_past_context`]: for prompts of at most `len` tokens, a
    /// length limit the request set itself (`explicit`) that runs past the model's context
    /// window is an error naming both numbers and the window; the default one is cut to the
    /// window (TGI's and vLLM's default `max_new_tokens`: what the window has left).
    pub fn fit_to_context(
        &self,
        len: usize,
        cfg: &mut GenerationConfig,
        explicit: bool,
    ) -> Result<()> {
        let Some(max) = self
            .model
            .max_positions()
            .filter(|_| self.refuse_past_context)
        else {
            return Ok(());
        };
        let total = cfg.max_total_length(len);
        if total <= max {
            return Ok(());
        }
        if len >= max {
            return Err(Error::input(
                0,
                format!(
                    "the prompt is {len} tokens: it fills the model's context window of {max} \
                     tokens, with no room for a new one"
                ),
            ));
        }
        if !explicit {
            cfg.max_new_tokens = Some(max - len);
            return Ok(());
        }
        Err(match cfg.max_new_tokens {
            Some(n) => Error::param(
                "max_new_tokens",
                format!(
                    "the prompt is {len} tokens and max_new_tokens is {n}: {} tokens in all, \
                     past the model's context window of {max} tokens (max_new_tokens at most {})",
                    len.saturating_add(n),
                    max.saturating_sub(len)
                ),
            ),
            None => Error::param(
                "max_length",
                format!("max_length is {total}, past the model's context window of {max} tokens"),
            ),
        })
    }

    /// Generate from already tokenized prompts (left-padded together as one batch).
    pub fn generate_ids(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        hooks: &mut Hooks,
    ) -> Result<Generated> {
        for p in prompts {
            self.check_prompt_length(p.len())?;
        }
        let pad = cfg.pad_token_id.unwrap_or(self.pad_token_id);
        let (rows, mask) = left_pad(prompts, pad);
        self.generate_padded(rows, mask, cfg, hooks)
    }

    /// Generate from rows padded by the caller, with their 0/1 attention mask.
    pub fn generate_padded(
        &self,
        rows: Vec<Vec<u32>>,
        mask: Vec<Vec<u8>>,
        cfg: &GenerationConfig,
        hooks: &mut Hooks,
    ) -> Result<Generated> {
        // An announced request that runs outside the shared batch (beam search, several
        // prompts in one batch of their own) is no longer on its way to it.
        continuous::arrived_here();
        let mut session = DecoderSession::new(self.model.as_ref(), rows.clone(), mask)?;
        session.screen_if_greedy(cfg, hooks);
        generate(&mut session, &rows, cfg, hooks)
    }

    /// Generate one sequence (greedy search or sampling) from one prompt: through the shared
    /// batch when continuous batching is on, else alone.
    pub fn generate_one(
        &self,
        prompt: &[u32],
        cfg: &GenerationConfig,
        hooks: &mut Hooks,
    ) -> Result<Generated> {
        let batcher = match &self.batcher {
            Some(b) if cfg.num_beams == 1 && cfg.num_return_sequences == 1 => b,
            _ => return self.generate_ids(&[prompt.to_vec()], cfg, hooks),
        };
        self.check_prompt_length(prompt.len())?;
        let reserve = cfg.max_total_length(prompt.len());
        let cancel = hooks.cancel.clone();
        let mut session = batcher.session(self.model.as_ref(), prompt.to_vec(), reserve, cancel);
        generate(&mut session, &[prompt.to_vec()], cfg, hooks)
    }

    /// How each token of `ids` scores after the tokens before it: its log-probability and the
    /// `top` most likely tokens at its position (best first), `None` for the first token, which
    /// follows nothing. OpenAI's `echo` with `logprobs` and TGI's `decoder_input_details` read
    /// this (lm-evaluation-harness' log-likelihoods). The prompt runs in chunks of
    /// [`SCORE_CHUNK`] positions over its KV cache, so only one chunk's logits are ever held
    /// (not `[seq][vocab]`); `cancel` stops it between chunks with an error. With continuous
    /// batching on, the prompt's keys and values are kept as a prefix of the batch (see
    /// [`Batcher::keep_prefix`]).
    pub fn prompt_logprobs(
        &self,
        ids: &[u32],
        top: usize,
        cancel: Option<&Cancel>,
    ) -> Result<Vec<Option<TokenScore>>> {
        self.prompt_logprobs_chunked(ids, top, cancel, SCORE_CHUNK)
    }

    /// [`TextGenerator::prompt_logprobs`] in passes of `chunk` positions.
    pub fn prompt_logprobs_chunked(
        &self,
        ids: &[u32],
        top: usize,
        cancel: Option<&Cancel>,
        chunk: usize,
    ) -> Result<Vec<Option<TokenScore>>> {
        if ids.is_empty() {
            return Err(Error::param("inputs", "the prompt is empty"));
        }
        self.check_prompt_length(ids.len())?;
        // Scoring runs outside the shared batch: an announced request doing so has arrived.
        continuous::arrived_here();
        let model = self.model.as_ref();
        // Position i's logits score token i + 1: the last position's are not needed.
        let need = ids.len() - 1;
        // A kept scored prompt that starts the same way (a server: lm-evaluation-harness'
        // choices after one context) gives its first positions' keys, values and scores.
        let start = self.batcher.as_ref().and_then(|b| b.scored_start(ids, top));
        let (mut out, mut cache, mut done) = match start {
            Some((n, kv, scores)) => (scores, kv, n),
            None => (
                vec![None],
                crate::models::causal_lm::KvCache::new(model.num_layers()),
                0,
            ),
        };
        out.reserve(ids.len() - out.len());
        let mut mask = vec![1u8; done];
        while done < need {
            if cancel.is_some_and(Cancel::is_cancelled) {
                return Err(Error::param("inputs", "the request was cancelled"));
            }
            let end = (done + chunk.max(1)).min(need);
            mask.extend(std::iter::repeat_n(1u8, end - done));
            let masks = [mask];
            let logits = decoder::forward_masked(
                model,
                &mut cache,
                &masks,
                ids[done..end].to_vec(),
                end - done,
                false,
            )?;
            [mask] = masks;
            let rows = logits.squeeze(0)?.to_vec2::<f32>()?;
            // Each row's normaliser and best tokens, the rows spread over the threads.
            use rayon::prelude::*;
            let scored: Vec<TokenScore> = rows
                .par_iter()
                .enumerate()
                .map(|(k, row)| search::score_row(row, ids[done + k + 1], top))
                .collect();
            out.extend(scored.into_iter().map(Some));
            done = end;
        }
        // A server generating from the prompt next (`echo` with `max_tokens`) continues from
        // these keys and values instead of running the prompt again.
        if let Some(b) = &self.batcher {
            let scored = continuous::Scored {
                ids: ids.to_vec(),
                top,
                scores: out.clone(),
            };
            b.keep_prefix(ids[..need].to_vec(), cache, Some(scored));
        }
        Ok(out)
    }

    /// Full logits `[seq][vocab]` of one prompt.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let (rows, mask) = left_pad(&[ids.to_vec()], self.pad_token_id);
        let mut session = DecoderSession::new(self.model.as_ref(), rows, mask)?;
        Ok(session.prompt_logits()?.remove(0))
    }
}
