//! `text-generation`, as HF's `TextGenerationPipeline` (4.57): a prompt (with an optional
//! `prefix`) or a chat (`{"messages": [..]}` rendered with the model's chat template) is
//! continued by `generate`; outputs are `{"generated_text": ..}` per returned sequence, the
//! prompt included unless `return_full_text=false`, and for chats the message list with the new
//! assistant message appended.

use serde::Serialize;
use serde_json::{Map, Value};

use super::{param, Input, Output, Params, PipelineOptions, Task};
use crate::error::{Error, Result};
use crate::generation::config::GENERATION_PARAMS;
use crate::generation::{GenerationConfig, Hooks, Message, TextGenerator, TextStreamer};

/// One returned sequence: text, or the chat with the assistant's reply appended.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GeneratedText {
    pub generated_text: Generation,
}

/// `generated_text`: a string, or (chat input) the messages in HF's key order.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Generation {
    Text(String),
    Chat(Vec<Message>),
}

impl Generation {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            Generation::Text(t) => Some(t),
            Generation::Chat(_) => None,
        }
    }
}

/// One generated token as it is streamed: its id, its log-probability (see
/// [`crate::generation::Hooks::on_token`]), whether it is a special token, and the new text it
/// completes (empty while it holds part of a character, or for a special token skipped).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent<'a> {
    pub id: u32,
    pub logprob: f32,
    pub special: bool,
    pub text: &'a str,
    /// Not a new token: the text the last token held back, flushed at the end.
    pub tail: bool,
    /// The most likely tokens of the same step (asked for with `top_logprobs`), best first.
    pub top: &'a [TopToken],
}

/// One of a step's most likely tokens: its id, the token alone decoded, its log-probability,
/// and whether it is a special token.
#[derive(Debug, Clone, PartialEq)]
pub struct TopToken {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
}

/// One token of a prompt ([`crate::pipelines::Pipeline::prompt_tokens`]): its id, the token
/// alone decoded, the text it adds to the decoded prompt (`piece`: as a stream gives it, empty
/// while it holds part of a character; the pieces join to the prompt's text, special tokens
/// kept), whether it is special, and when scored its log-probability after the tokens before
/// it (`None` for the first) and the most likely tokens at its position, best first.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptToken {
    pub id: u32,
    pub text: String,
    pub piece: String,
    pub special: bool,
    pub logprob: Option<f32>,
    /// Its rank at its position when scored: 1 for the most likely token.
    pub rank: Option<usize>,
    pub top: Vec<TopToken>,
}

/// Token counts of one streamed generation (a server's `usage` and `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    /// Generation stopped at its token limit (OpenAI's `finish_reason: "length"`), not at an
    /// end token or stop string.
    pub hit_limit: bool,
    /// It stopped at one of the request's stop strings (TGI's `finish_reason:
    /// "stop_sequence"`), not at an end token or its limit.
    pub stop_string: bool,
}

/// Parse `{"messages": [{"role", "content"}, ..]}`.
pub fn chat_from_json(o: &Map<String, Value>, index: usize) -> Result<Input> {
    if let Some(k) = o.keys().find(|k| *k != "messages") {
        return Err(Error::input(
            index,
            format!("unexpected key `{k}` next to `messages`"),
        ));
    }
    let list = o["messages"]
        .as_array()
        .ok_or_else(|| Error::input(index, "`messages` must be a list"))?;
    chat_from_list(list, index)
}

/// Whether `items` reads as one chat: a non-empty list of objects that each have a `role`
/// (transformers' pipeline takes such a list as one conversation, a list of them as several).
pub fn is_chat(items: &[Value]) -> bool {
    !items.is_empty()
        && items
            .iter()
            .all(|m| m.as_object().is_some_and(|o| o.contains_key("role")))
}

/// A chat input from its `{"role", "content"}` messages.
pub fn chat_from_list(list: &[Value], index: usize) -> Result<Input> {
    let messages = list
        .iter()
        .map(|m| {
            let role = m.get("role").and_then(Value::as_str);
            let content = m.get("content").and_then(Value::as_str);
            match (role, content) {
                (Some(r), Some(c)) => Ok(Message::new(r, c)),
                _ => Err(Error::input(
                    index,
                    format!("each message needs string `role` and `content`, got {m}"),
                )),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if messages.is_empty() {
        return Err(Error::input(index, "`messages` is empty"));
    }
    Ok(Input::Chat(messages))
}

const OWN_PARAMS: &[&str] = &[
    "return_full_text",
    "return_text",
    "prefix",
    "clean_up_tokenization_spaces",
    "skip_special_tokens",
    "continue_final_message",
    "add_special_tokens",
    "stop_sequence",
];

/// Pipeline parameters that are not generation parameters, resolved.
#[derive(Debug, Clone)]
struct Options {
    return_full_text: bool,
    prefix: String,
    clean_up: bool,
    skip_special_tokens: bool,
    continue_final_message: Option<bool>,
    add_special_tokens: bool,
}

pub struct TextGeneration {
    pub generator: TextGenerator,
    accepted: &'static [&'static str],
}

/// Whether the request set its own length limit (else the pipeline's default applies).
fn limits_length(params: &Params) -> bool {
    ["max_new_tokens", "max_length"]
        .iter()
        .any(|k| params.get(*k).is_some_and(|v| !v.is_null()))
}

fn accepted_params() -> &'static [&'static str] {
    static LIST: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        let mut v: Vec<&'static str> = OWN_PARAMS.to_vec();
        v.extend_from_slice(GENERATION_PARAMS);
        v
    })
}

impl TextGeneration {
    /// [`crate::Pipeline::batch_invariance_costs_nothing`].
    pub fn batch_invariance_costs_nothing(&self) -> bool {
        self.generator.model.batch_invariance_costs_nothing()
    }

    /// [`crate::Pipeline::set_batch_invariance`].
    pub fn set_batch_invariance(&mut self, want: Option<bool>) -> Result<bool> {
        let free = TextGeneration::batch_invariance_costs_nothing(self);
        super::choose_batch_invariance(want, free, || TextGeneration::make_batch_invariant(self))
    }

    /// [`crate::Pipeline::make_batch_invariant`].
    pub fn make_batch_invariant(&mut self) -> Result<()> {
        self.generator
            .model
            .make_batch_invariant()
            .map_err(|detail| Error::InvalidParameter {
                name: "batch_invariant".into(),
                detail,
            })
    }

    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        if let Some(q) = opts.quantize {
            return Err(q.unsupported(
                "text generation models have none (GGUF files run quantized; --gguf-math int8 \
                 rounds their activations)",
            ));
        }
        let generator = TextGenerator::load(
            model,
            opts.tokenizer.as_deref(),
            opts.revision.as_deref(),
            &opts.device,
            opts.dtype,
            opts.gguf_math,
        )?;
        Ok(Self {
            generator,
            accepted: accepted_params(),
        })
    }

    /// The generation config of one call: the pipeline's defaults over the model's, then the
    /// call's parameters (HF's precedence), with the tokens of `o`'s `prefix` added to a length
    /// limit.
    fn config(&self, params: &Params, o: &Options) -> Result<GenerationConfig> {
        let prefix_len = if o.prefix.is_empty() {
            0
        } else {
            self.generator.encode(&o.prefix, false)?.len()
        };
        let mut cfg =
            GenerationConfig::for_text_generation_pipeline(&self.generator.generation_config);
        cfg.apply(params)?;
        if let Some(stop) = param::opt_str(params, "stop_sequence")? {
            cfg.eos_token_id = self.generator.encode(stop, false)?;
        }
        if prefix_len > 0 {
            if !params.contains_key("max_new_tokens") && cfg.max_new_tokens.is_none() {
                cfg.max_length += prefix_len;
            }
            if !params.contains_key("min_new_tokens") && params.contains_key("min_length") {
                cfg.min_length += prefix_len;
            }
        }
        Ok(cfg)
    }

    fn options(&self, params: &Params) -> Result<Options> {
        let return_text = param::opt_bool(params, "return_text")?;
        let full = param::opt_bool(params, "return_full_text")?;
        if return_text.is_some() && full.is_some() {
            return Err(Error::param(
                "return_text",
                "`return_text` is mutually exclusive with `return_full_text`",
            ));
        }
        Ok(Options {
            return_full_text: full.unwrap_or(true),
            prefix: param::opt_str(params, "prefix")?.unwrap_or("").to_string(),
            clean_up: param::opt_bool(params, "clean_up_tokenization_spaces")?.unwrap_or(true),
            skip_special_tokens: param::opt_bool(params, "skip_special_tokens")?.unwrap_or(true),
            continue_final_message: param::opt_bool(params, "continue_final_message")?,
            add_special_tokens: param::opt_bool(params, "add_special_tokens")?.unwrap_or(true),
        })
    }

    /// Prompt token ids of one input.
    fn encode(&self, input: &Input, o: &Options, index: usize) -> Result<Vec<u32>> {
        let ids = match input {
            Input::Text(t) => {
                let text = format!("{}{}", o.prefix, t);
                self.generator.encode(&text, o.add_special_tokens)?
            }
            Input::Chat(messages) => {
                let cont = o
                    .continue_final_message
                    .unwrap_or_else(|| messages.last().is_some_and(|m| m.role == "assistant"));
                self.generator.encode_chat(messages, cont)?
            }
            Input::Tokens(ids) => {
                self.generator.tokenizer.check_ids(ids, index)?;
                ids.clone()
            }
            _ => {
                return Err(Error::input(
                    index,
                    "text-generation takes a string or a `{messages}` chat",
                ))
            }
        };
        if ids.is_empty() {
            return Err(Error::input(index, "the prompt is empty"));
        }
        self.generator
            .check_prompt_length(ids.len())
            .map_err(|e| match e {
                Error::InvalidInput { detail, .. } => Error::InvalidInput { index, detail },
                e => e,
            })?;
        Ok(ids)
    }

    /// HF's `postprocess` for one returned sequence.
    fn postprocess(
        &self,
        input: &Input,
        prompt: &[u32],
        new: &[u32],
        o: &Options,
    ) -> Result<GeneratedText> {
        let mut all: Vec<u32> = prompt.to_vec();
        all.extend_from_slice(new);
        let text = self
            .generator
            .decode(&all, o.skip_special_tokens, o.clean_up)?;
        let prompt_chars = self
            .generator
            .decode(prompt, o.skip_special_tokens, o.clean_up)?
            .chars()
            .count();
        let new_text: String = text.chars().skip(prompt_chars).collect();
        let value = match (o.return_full_text, input) {
            (false, _) => Generation::Text(new_text),
            (true, Input::Chat(messages)) => {
                let cont = o
                    .continue_final_message
                    .unwrap_or_else(|| messages.last().is_some_and(|m| m.role == "assistant"));
                let mut msgs = messages.clone();
                if cont {
                    if let Some(last) = msgs.last_mut() {
                        last.content.push_str(&new_text);
                    }
                } else {
                    msgs.push(Message::new("assistant", new_text));
                }
                Generation::Chat(msgs)
            }
            (true, Input::Text(t)) => Generation::Text(format!("{t}{new_text}")),
            (true, _) => Generation::Text(new_text),
        };
        Ok(GeneratedText {
            generated_text: value,
        })
    }

    /// Generate for one input, calling `on_text` with each new piece of text as it is
    /// produced (greedy search or sampling with one sequence); the output and its token counts.
    /// `on_text` returning `false` ends the generation after that token (the reader has gone).
    pub fn stream(
        &self,
        input: &Input,
        params: &Params,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<(Output, Usage)> {
        self.stream_tokens(input, params, &mut |t| t.text.is_empty() || on_text(t.text))
    }

    /// [`TextGeneration::stream`] with every token reported, text or not (TGI's token
    /// events). Text held back at the end (an incomplete character) comes as a last event of
    /// the final token.
    pub fn stream_tokens(
        &self,
        input: &Input,
        params: &Params,
        on_token_event: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<(Output, Usage)> {
        self.stream_tokens_top(input, params, 0, None, on_token_event)
    }

    /// A streamed generation's options, config and prompt ids, every check made that can be
    /// made before the first token (parameters, the prompt, its length and `max_new_tokens`
    /// against the context window).
    fn prepare_stream(
        &self,
        input: &Input,
        params: &Params,
    ) -> Result<(Options, GenerationConfig, Vec<u32>)> {
        self.check_params(params)?;
        let o = self.options(params)?;
        let mut cfg = self.config(params, &o)?;
        if cfg.num_beams > 1 || cfg.num_return_sequences > 1 {
            return Err(Error::param(
                if cfg.num_beams > 1 {
                    "num_beams"
                } else {
                    "num_return_sequences"
                },
                "streaming supports one sequence (greedy search or sampling)",
            ));
        }
        cfg.validate()?;
        let prompt = self.encode(input, &o, 0)?;
        self.generator.check_prompt_length(prompt.len())?;
        self.generator
            .fit_to_context(prompt.len(), &mut cfg, limits_length(params))?;
        Ok((o, cfg, prompt))
    }

    /// Every parameter must be one the task knows.
    fn check_params(&self, params: &Params) -> Result<()> {
        match params.keys().find(|k| !self.accepted.contains(&k.as_str())) {
            Some(k) => Err(Error::UnknownParameter {
                task: "text-generation".into(),
                name: k.clone(),
                accepted: self.accepted.join(", "),
            }),
            None => Ok(()),
        }
    }

    /// Whether `id` is one of the tokenizer's special tokens.
    fn is_special(&self, id: u32) -> bool {
        let added = self.generator.tokenizer.inner().get_added_vocabulary();
        self.generator
            .tokenizer
            .id_to_token(id)
            .is_some_and(|t| added.is_special_token(&t))
    }

    /// Scored tokens as [`TopToken`]s: each decoded alone.
    fn top_tokens(&self, best: Vec<(u32, f32)>) -> Vec<TopToken> {
        best.into_iter()
            .map(|(id, logprob)| TopToken {
                id,
                text: self
                    .generator
                    .decode(&[id], false, false)
                    .unwrap_or_default(),
                logprob,
                special: self.is_special(id),
            })
            .collect()
    }

    /// [`TextGeneration::stream_tokens`] with each token's `top_logprobs` most likely
    /// alternatives in its event ([`TokenEvent::top`]); `cancel` set ends it after the next
    /// token, and in a shared batch also before its prompt runs or between its prompt's chunks
    /// (then with an error).
    pub fn stream_tokens_top(
        &self,
        input: &Input,
        params: &Params,
        top_logprobs: usize,
        cancel: Option<&crate::generation::Cancel>,
        on_token_event: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<(Output, Usage)> {
        let (o, cfg, prompt) = self.prepare_stream(input, params)?;
        let mut streamer = TextStreamer::new(&self.generator.tokenizer, o.skip_special_tokens);
        let mut err = None;
        let mut new_tokens = 0usize;
        let cancelled = std::cell::Cell::new(false);
        let mut last = (0u32, 0f32, false);
        let top = std::cell::RefCell::new(Vec::new());
        let mut on_top = |_: usize, best: Vec<(u32, f32)>| {
            *top.borrow_mut() = self.top_tokens(best);
        };
        let mut on_token = |_: usize, tok: u32, logprob: f32| {
            new_tokens += 1;
            let special = self.is_special(tok);
            last = (tok, logprob, special);
            let delta = match streamer.push(tok) {
                Ok(d) => d,
                Err(e) => {
                    err = Some(e);
                    None
                }
            };
            let alternatives = top.borrow();
            let event = TokenEvent {
                id: tok,
                logprob,
                special,
                text: delta.as_deref().unwrap_or(""),
                tail: false,
                top: &alternatives,
            };
            if !on_token_event(&event) {
                cancelled.set(true);
            }
        };
        let decode = |ids: &[u32]| self.generator.decode(ids, false, false).unwrap_or_default();
        let stop = || cancelled.get();
        let mut hooks = Hooks {
            stop: Some(&stop),
            on_token: Some(&mut on_token),
            decode: Some(&decode),
            top_logprobs,
            on_top: Some(&mut on_top),
            unscaled_logprobs: false,
            on_beam_logprobs: None,
            cancel: cancel.cloned(),
        };
        let out = self.generator.generate_one(&prompt, &cfg, &mut hooks)?;
        if let Some(e) = err {
            return Err(e);
        }
        if let Some(rest) = streamer.finish()? {
            if !cancelled.get() {
                let (id, logprob, special) = last;
                on_token_event(&TokenEvent {
                    id,
                    logprob,
                    special,
                    text: &rest,
                    tail: true,
                    top: &[],
                });
            }
        }
        let seqs = out.sequences.into_iter().next().unwrap_or_default();
        let completion = seqs.first().map_or(new_tokens, |s| s.len());
        let limit = cfg
            .max_new_tokens
            .unwrap_or(cfg.max_length.saturating_sub(prompt.len()));
        let texts = seqs
            .iter()
            .map(|s| self.postprocess(input, &prompt, s, &o))
            .collect::<Result<Vec<_>>>()?;
        Ok((
            Output::Generated(texts),
            Usage {
                prompt_tokens: prompt.len(),
                completion_tokens: completion,
                hit_limit: completion >= limit,
                // Not its limit and not an end token: a stop string (or the caller's stop).
                stop_string: completion < limit
                    && !cfg.stop_strings.is_empty()
                    && !cancelled.get()
                    && seqs
                        .first()
                        .and_then(|s| s.last())
                        .is_some_and(|t| !cfg.eos_token_id.contains(t)),
            },
        ))
    }
}

impl Task for TextGeneration {
    fn accepted_params(&self) -> &'static [&'static str] {
        self.accepted
    }

    fn continuous_batching(
        &mut self,
        max_total_tokens: usize,
        admission: crate::generation::Admission,
    ) -> bool {
        self.generator.batcher = Some(crate::generation::Batcher::with_admission(
            max_total_tokens,
            admission,
        ));
        self.generator.model.prepare_batched_steps();
        true
    }

    fn batch_stats(&self) -> Option<crate::generation::BatchStats> {
        self.generator.batcher.as_ref().map(|b| b.stats())
    }

    fn announce(&self) -> Option<crate::generation::Arrival> {
        self.generator.batcher.as_ref().map(|b| b.announce())
    }

    fn batch_invariance_costs_nothing(&self) -> bool {
        TextGeneration::batch_invariance_costs_nothing(self)
    }

    fn make_batch_invariant(&mut self) -> Result<()> {
        TextGeneration::make_batch_invariant(self)
    }

    fn refuse_past_context(&mut self) {
        self.generator.refuse_past_context = true;
    }

    fn tokenizer(&self) -> Option<&crate::tokenizer::Tokenizer> {
        Some(&self.generator.tokenizer)
    }

    fn chat_template(&self) -> Option<&crate::generation::ChatTemplate> {
        self.generator.chat_template.as_ref()
    }

    fn check_streaming(&self, input: &Input, params: &Params) -> Result<()> {
        self.prepare_stream(input, params).map(|_| ())
    }

    fn run_streaming(
        &self,
        input: &Input,
        params: &Params,
        top_logprobs: usize,
        cancel: Option<&crate::generation::Cancel>,
        on_token: &mut dyn FnMut(&TokenEvent) -> bool,
    ) -> Result<(Output, Usage)> {
        self.stream_tokens_top(input, params, top_logprobs, cancel, on_token)
    }

    fn prompt_tokens(
        &self,
        input: &Input,
        params: &Params,
        logprobs: Option<usize>,
        cancel: Option<&crate::generation::Cancel>,
    ) -> Result<Vec<PromptToken>> {
        self.check_params(params)?;
        let ids = self.encode(input, &self.options(params)?, 0)?;
        let scores = match logprobs {
            Some(top) => self.generator.prompt_logprobs(&ids, top, cancel)?,
            None => vec![None; ids.len()],
        };
        let mut streamer = TextStreamer::new(&self.generator.tokenizer, false);
        let mut tokens = Vec::with_capacity(ids.len());
        for (&id, score) in ids.iter().zip(scores) {
            let (logprob, rank, top) = match score {
                Some(sc) => (Some(sc.logprob), Some(sc.rank), self.top_tokens(sc.top)),
                None => (None, None, Vec::new()),
            };
            tokens.push(PromptToken {
                id,
                text: self.generator.decode(&[id], false, false)?,
                piece: streamer.push(id)?.unwrap_or_default(),
                special: self.is_special(id),
                logprob,
                rank,
                top,
            });
        }
        if let (Some(rest), Some(last)) = (streamer.finish()?, tokens.last_mut()) {
            last.piece.push_str(&rest);
        }
        Ok(tokens)
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        let o = self.options(params)?;
        let mut cfg = self.config(params, &o)?;
        cfg.validate()?;
        let prompts = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| self.encode(inp, &o, i))
            .collect::<Result<Vec<_>>>()?;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        self.generator.check_prompt_length(longest)?;
        self.generator
            .fit_to_context(longest, &mut cfg, limits_length(params))?;
        let decode = |ids: &[u32]| self.generator.decode(ids, false, false).unwrap_or_default();
        let mut outs = Vec::with_capacity(inputs.len());
        let mut start = 0;
        // A server's announcement of this call ([`crate::generation::arriving`]) goes with the
        // first batch of prompts to start, on whichever thread runs it.
        let arrival = std::sync::Mutex::new(crate::generation::take_arriving());
        let compute = |chunk: &[Vec<u32>]| {
            let mut hooks = Hooks {
                decode: Some(&decode),
                ..Hooks::default()
            };
            let mine = arrival.lock().ok().and_then(|mut a| a.take());
            crate::generation::arriving(mine, || match chunk {
                // One prompt joins the shared batch when continuous batching is on (other
                // threads' calls generating at the same time).
                [one] => self.generator.generate_one(one, &cfg, &mut hooks),
                _ => self.generator.generate_ids(chunk, &cfg, &mut hooks),
            })
        };
        let cpu = self.generator.model.device().is_cpu();
        super::for_each_batch(&prompts, batch_size, cpu, compute, |chunk, gen| {
            for (k, seqs) in gen.sequences.iter().enumerate() {
                let i = start + k;
                let texts = seqs
                    .iter()
                    .map(|s| self.postprocess(&inputs[i], &prompts[i], s, &o))
                    .collect::<Result<Vec<_>>>()?;
                outs.push(Output::Generated(texts));
            }
            start += chunk.len();
            Ok(())
        })?;
        Ok(outs)
    }
}
