//! Pipelines: `preprocess` (tokenize, pad) -> `forward` (batched) -> `postprocess` (pure
//! functions on the outputs). One file per task; [`registry`] knows the task names.

pub mod automatic_speech_recognition;
pub mod automatic_speech_recognition_ctc;
pub mod feature_extraction;
pub mod fill_mask;
pub mod question_answering;
pub mod registry;
pub mod text2text;
pub mod text_classification;
pub mod text_generation;
pub mod token_classification;
pub mod whisper_languages;
pub mod whisper_words;
pub mod zero_shot;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::{Map, Value};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::kernels::cpu::quantized::QuantMath;
use crate::models::{self, EncoderModel, Head};
use crate::tokenizer::{Encoded, Tokenizer};

pub use feature_extraction::Pooling;
pub use fill_mask::FillMaskToken;
pub use question_answering::Answer;
pub use text_classification::LabelScore;
pub use token_classification::TokenEntity;
pub use zero_shot::ZeroShotResult;

/// Call parameters, by HF's names (`top_k`, `function_to_apply`, ...).
pub type Params = Map<String, Value>;

/// One pipeline input.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Text(String),
    /// `{"text": .., "text_pair": ..}`
    TextPair {
        text: String,
        text_pair: String,
    },
    /// `{"question": .., "context": ..}` (question-answering).
    Question {
        question: String,
        context: String,
    },
    /// `{"messages": [{"role": .., "content": ..}, ..]}` (text-generation with a chat template).
    Chat(Vec<crate::generation::Message>),
    /// `{"source_sentence": .., "sentences": [..]}` (sentence-similarity).
    Similarity {
        source_sentence: String,
        sentences: Vec<String>,
    },
    /// `{"raw" | "array": [...], "sampling_rate": N}` (automatic-speech-recognition): a mono
    /// waveform.
    Audio {
        samples: Vec<f32>,
        sampling_rate: u32,
    },
    /// The bytes of an audio file (automatic-speech-recognition).
    AudioBytes(Vec<u8>),
    /// A text already in token ids, run as given (no prefix, no special tokens added):
    /// text-generation's prompt (a server's OpenAI `prompt` as ids), and feature-extraction's
    /// and sentence-embeddings' input (OpenAI's and TEI's embedding routes take ids).
    Tokens(Vec<u32>),
}

impl From<&str> for Input {
    fn from(s: &str) -> Self {
        Input::Text(s.to_string())
    }
}

impl From<String> for Input {
    fn from(s: String) -> Self {
        Input::Text(s)
    }
}

impl Input {
    /// A question-answering input.
    pub fn question(question: impl Into<String>, context: impl Into<String>) -> Self {
        Input::Question {
            question: question.into(),
            context: context.into(),
        }
    }

    /// Parse a JSON input line: a string, an object such as `{"text":..,"text_pair":..}` or
    /// `{"question":..,"context":..}`, or a chat: `{"messages": [..]}` or the list of messages
    /// itself (`[{"role": "user", "content": ".."}]`, as transformers' pipeline takes one).
    pub fn from_json(v: &Value, index: usize) -> Result<Self> {
        match v {
            Value::String(s) => Ok(Input::Text(s.clone())),
            Value::Object(o) if o.contains_key("raw") || o.contains_key("array") => {
                audio_from_json(o, index)
            }
            Value::Object(o) if o.contains_key("source_sentence") => {
                feature_extraction::similarity_from_json(o, index)
            }
            Value::Object(o) if o.contains_key("messages") => {
                text_generation::chat_from_json(o, index)
            }
            Value::Array(a) if text_generation::is_chat(a) => {
                text_generation::chat_from_list(a, index)
            }
            Value::Object(o) if o.contains_key("question") || o.contains_key("context") => {
                question_answering::input_from_json(o, index)
            }
            Value::Object(o) => {
                let text = o.get("text").and_then(Value::as_str);
                // A `text_pair` that is there must be a string (null: none); a number or a
                // list was dropped silently, running the text alone.
                let pair = match o.get("text_pair") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(p)) => Some(p.as_str()),
                    Some(other) => {
                        return Err(Error::input(
                            index,
                            format!("`text_pair` must be a string, got `{other}`"),
                        ))
                    }
                };
                for k in o.keys() {
                    if k != "text" && k != "text_pair" {
                        return Err(Error::input(
                            index,
                            format!("unexpected key `{k}` (expected `text` and `text_pair`)"),
                        ));
                    }
                }
                match (text, pair) {
                    (Some(t), Some(p)) => Ok(Input::TextPair {
                        text: t.to_string(),
                        text_pair: p.to_string(),
                    }),
                    (Some(t), None) => Ok(Input::Text(t.to_string())),
                    _ => Err(Error::input(index, "an object input needs a string `text`")),
                }
            }
            other => Err(Error::input(
                index,
                format!(
                    "expected a string, an object or a chat (a list of {{\"role\", \"content\"}} \
                     messages), got `{other}`"
                ),
            )),
        }
    }

    /// The text (and pair), refusing empty text with a clear error.
    pub(crate) fn text_and_pair(&self, index: usize) -> Result<(&str, Option<&str>)> {
        let (t, p) = match self {
            Input::Text(t) => (t.as_str(), None),
            Input::TextPair { text, text_pair } => (text.as_str(), Some(text_pair.as_str())),
            Input::Question { .. } => {
                return Err(Error::input(
                    index,
                    "a `{question, context}` input is for question-answering, not this task",
                ))
            }
            Input::Chat(_) => {
                return Err(Error::input(
                    index,
                    "a chat input (`{messages}` or a list of messages) is for text-generation, \
                     not this task",
                ))
            }
            Input::Similarity { .. } => return Err(Error::input(
                index,
                "a `{source_sentence, sentences}` input is for sentence-similarity, not this task",
            )),
            Input::Audio { .. } | Input::AudioBytes(_) => {
                return Err(Error::input(
                    index,
                    "audio is for automatic-speech-recognition, not this task",
                ))
            }
            Input::Tokens(_) => {
                return Err(Error::input(
                    index,
                    "token ids are for text-generation, feature-extraction and \
                     sentence-embeddings, not this task",
                ))
            }
        };
        if t.trim().is_empty() {
            return Err(Error::input(index, "the text is empty"));
        }
        if let Some(p) = p {
            if p.trim().is_empty() {
                return Err(Error::input(index, "`text_pair` is empty"));
            }
        }
        Ok((t, p))
    }
}

/// `{"raw" | "array": [...], "sampling_rate": N}`: the waveform of an audio input.
fn audio_from_json(o: &Map<String, Value>, index: usize) -> Result<Input> {
    for k in o.keys() {
        if !["raw", "array", "sampling_rate", "path"].contains(&k.as_str()) {
            return Err(Error::input(
                index,
                format!("unexpected key `{k}` (expected `raw` or `array`, and `sampling_rate`)"),
            ));
        }
    }
    let rate = o
        .get("sampling_rate")
        .and_then(Value::as_u64)
        .filter(|r| *r > 0 && *r <= u32::MAX as u64)
        .ok_or_else(|| {
            Error::input(
                index,
                "an audio input needs a positive integer `sampling_rate` beside `raw`",
            )
        })?;
    let raw = o.get("raw").or_else(|| o.get("array"));
    let samples = raw
        .and_then(Value::as_array)
        .ok_or_else(|| Error::input(index, "`raw` must be a list of numbers"))?
        .iter()
        .map(|v| v.as_f64().map(|x| x as f32))
        .collect::<Option<Vec<f32>>>()
        .ok_or_else(|| Error::input(index, "`raw` must be a list of numbers (mono audio)"))?;
    Ok(Input::Audio {
        samples,
        sampling_rate: rate as u32,
    })
}

/// A pipeline result for one input, serializing to HF's JSON shape.
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Output {
    /// text-classification without `top_k`: `{"label", "score"}`.
    Label(LabelScore),
    /// text-classification with `top_k`: a sorted list.
    Labels(Vec<LabelScore>),
    /// fill-mask with one mask.
    FillMask(Vec<FillMaskToken>),
    /// fill-mask with several masks: one list per mask.
    FillMaskMulti(Vec<Vec<FillMaskToken>>),
    /// feature-extraction: `[1, tokens, hidden]`, as HF returns it.
    Features(Vec<Vec<Vec<f32>>>),
    /// A pooled sentence embedding.
    Embedding(Vec<f32>),
    /// sentence-similarity: cosine similarity of the source sentence to each sentence.
    Scores(Vec<f64>),
    /// zero-shot-classification: `{sequence, labels, scores}`.
    ZeroShot(ZeroShotResult),
    /// token-classification: tokens (`aggregation_strategy` none) or grouped entities.
    Entities(Vec<TokenEntity>),
    /// question-answering with exactly one answer: `{score, start, end, answer}`.
    Answer(Answer),
    /// question-answering with several (or no) answers.
    Answers(Vec<Answer>),
    /// text-generation: one `{generated_text}` per returned sequence.
    Generated(Vec<text_generation::GeneratedText>),
    /// text2text-generation / summarization / translation: one `{generated_text}`,
    /// `{summary_text}` or `{translation_text}` (`*_token_ids` with `return_tensors`) per returned
    /// sequence.
    Text2Text(Vec<Map<String, Value>>),
    /// automatic-speech-recognition: `{"text"}`, with `"chunks"` for timestamps (Whisper's
    /// segments, or a CTC model's characters or words).
    Speech(Map<String, Value>),
}

/// Where the model comes from and how it runs.
#[derive(Debug, Clone)]
pub struct PipelineOptions {
    /// Local folder or hub id; the task's default model when `None`.
    pub model: Option<String>,
    /// Local folder or hub id of the tokenizer; the model's when `None`.
    pub tokenizer: Option<String>,
    pub revision: Option<String>,
    pub device: Device,
    pub dtype: DType,
    pub batch_size: usize,
    /// GGUF models on CPU: exact (f32 activations, transformers' numbers) or int8 (8-bit
    /// activations, llama.cpp's arithmetic). `None`: `FERROFORMERS_GGUF_MATH`, else int8.
    pub gguf_math: Option<QuantMath>,
    /// Encoder models on CPU: dynamic quantization of the encoder layers' linear products
    /// (`--quantize int8`); `None` keeps f32.
    pub quantize: Option<Quantize>,
}

/// Reduced-precision arithmetic for encoder models (dynamic quantization, as ONNX Runtime's
/// `quantize_dynamic` and `torch.ao.quantization.quantize_dynamic` do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantize {
    /// Weights signed 8-bit per output column, activations 8-bit per token at run time,
    /// exact i32 products.
    Int8,
}

impl Quantize {
    /// The spellings [`Quantize::parse`] takes (what the CLI offers).
    pub const NAMES: &'static [&'static str] = &["int8", "qint8"];

    /// `int8` (the CLI's and the server's spelling).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "int8" | "qint8" => Some(Quantize::Int8),
            _ => None,
        }
    }

    /// The error for a model family without a quantized path.
    pub(crate) fn unsupported(self, what: &str) -> Error {
        match self {
            Quantize::Int8 => models::int8_unsupported(what),
        }
    }
}

impl Default for PipelineOptions {
    fn default() -> Self {
        Self {
            model: None,
            tokenizer: None,
            revision: None,
            device: Device::Cpu,
            dtype: DType::F32,
            batch_size: 1,
            gguf_math: None,
            quantize: None,
        }
    }
}

/// What every task implements.
pub(crate) trait Task: Send + Sync {
    fn accepted_params(&self) -> &'static [&'static str];

    /// Turn on continuous batching (text generation only); `false` where it does not apply.
    fn continuous_batching(
        &mut self,
        _max_total_tokens: usize,
        _admission: crate::generation::Admission,
    ) -> bool {
        false
    }

    fn batch_stats(&self) -> Option<crate::generation::BatchStats> {
        None
    }

    /// A request for continuous batching on its way (text generation with a batch).
    fn announce(&self) -> Option<crate::generation::Arrival> {
        None
    }

    /// Whether batch-invariant arithmetic would cost this pipeline no speed.
    fn batch_invariance_costs_nothing(&self) -> bool {
        false
    }

    /// Batch-invariant arithmetic (text generation's models that have it).
    fn make_batch_invariant(&mut self) -> Result<()> {
        Err(Error::InvalidParameter {
            name: "batch_invariant".into(),
            detail: "only text generation has batch-invariant arithmetic".into(),
        })
    }

    fn refuse_past_context(&mut self) {}

    fn check_streaming(&self, _input: &Input, _params: &Params) -> Result<()> {
        Ok(())
    }

    /// The tokenizer the task reads its text with, where it is one the caller cannot load from
    /// the model folder (a GGUF file's own vocabulary); `None` otherwise.
    fn tokenizer(&self) -> Option<&crate::tokenizer::Tokenizer> {
        None
    }

    fn chat_template(&self) -> Option<&crate::generation::ChatTemplate> {
        None
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>>;

    /// Speech recognition: the language each input is spoken in, by name (see
    /// [`Pipeline::spoken_languages`]); `None` where the model cannot tell.
    fn spoken_languages(&self, _inputs: &[Input]) -> Result<Option<Vec<String>>> {
        Ok(None)
    }

    /// Generate for one input with each new token passed to `on_token` as it comes (text
    /// generation only); `on_token` returning `false` stops it.
    fn run_streaming(
        &self,
        _input: &Input,
        _params: &Params,
        _top_logprobs: usize,
        _cancel: Option<&crate::generation::Cancel>,
        _on_token: &mut dyn FnMut(&text_generation::TokenEvent) -> bool,
    ) -> Result<(Output, text_generation::Usage)> {
        Err(Error::param(
            "stream",
            "streaming is for the text-generation task",
        ))
    }

    /// The prompt's tokens as a generation would run them, each scored after the ones before
    /// it when `logprobs` is given (text generation only).
    fn prompt_tokens(
        &self,
        _input: &Input,
        _params: &Params,
        _logprobs: Option<usize>,
        _cancel: Option<&crate::generation::Cancel>,
    ) -> Result<Vec<text_generation::PromptToken>> {
        Err(Error::param(
            "echo",
            "prompt log-probabilities are for the text-generation task",
        ))
    }
}

/// A loaded pipeline: `run` it on inputs with HF's parameters.
pub struct Pipeline {
    task: String,
    batch_size: usize,
    inner: Box<dyn Task>,
}

impl std::fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipeline")
            .field("task", &self.task)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl Pipeline {
    pub(crate) fn new(task: &str, batch_size: usize, inner: Box<dyn Task>) -> Self {
        Self {
            task: task.to_string(),
            batch_size: batch_size.max(1),
            inner,
        }
    }

    /// Continuous batching for a server (text generation): requests that generate at the same
    /// time (through [`Pipeline::run_streaming`]) share one forward pass per token, and new
    /// ones join between steps, while their sequences together stay within
    /// `max_total_tokens` (prompt plus `max_new_tokens` each). Returns `false` for tasks
    /// without it.
    pub fn enable_continuous_batching(&mut self, max_total_tokens: usize) -> bool {
        self.enable_continuous_batching_with(max_total_tokens, Default::default())
    }

    /// [`Pipeline::enable_continuous_batching`] with TGI's rule for when waiting requests
    /// join a running batch (`--max-waiting-tokens`, `--waiting-served-ratio`).
    pub fn enable_continuous_batching_with(
        &mut self,
        max_total_tokens: usize,
        admission: crate::generation::Admission,
    ) -> bool {
        self.inner.continuous_batching(max_total_tokens, admission)
    }

    /// Text generation: refuse a request whose prompt plus `max_new_tokens` would run past
    /// the model's context window (an error naming the numbers, as a server answers 422),
    /// instead of generating until the window ends; other tasks are unchanged.
    pub fn refuse_past_context(&mut self) {
        self.inner.refuse_past_context()
    }

    /// Text generation: every check [`Pipeline::run_streaming`] would make before its first
    /// token (parameters, the prompt, its length), without generating, so that a server can
    /// answer a bad request with an error status before it starts an event stream. Other
    /// tasks: `Ok`.
    pub fn check_streaming(&self, input: &Input, params: &Params) -> Result<()> {
        self.inner.check_streaming(input, params)
    }

    /// Text generation: make every later forward pass batch-invariant, so that a request's
    /// tokens are the ones it gets alone whatever runs beside it (continuous batching's other
    /// rows, its prompt's chunking, a kept prefix), bit for bit. GGUF models of the Llama
    /// family in the int8 mode on CPUs with AVX-512 VNNI have it; an error says why others
    /// do not (nothing changed then). It costs speed where the int8 panels are larger than
    /// the weights (8-bit and 5/6-bit block types: Qwen2.5-Coder-0.5B Q4_K_M decodes ~25%
    /// slower alone) and memory for the kept panels; see BENCHMARKS.md.
    pub fn make_batch_invariant(&mut self) -> Result<()> {
        self.inner.make_batch_invariant()
    }

    /// Text generation: whether [`Pipeline::make_batch_invariant`] would succeed and cost no
    /// speed, because on this CPU a decoding row is as fast through every product's kept int8
    /// panels as through its GGUF blocks (on AMD's cores Q8_0, and Q4_0, Q4_1, Q4_K up to
    /// 2 MiB a matrix: SmolLM2-135M's Q4_1 file, not Qwen2.5's Q4_K_M; on Intel's every type
    /// but Q2_K and Q3_K; see
    /// [`crate::kernels::cpu::quantized::QuantLinear::batch_invariance_costs_nothing`]). A
    /// server turns it on then by default.
    pub fn batch_invariance_costs_nothing(&self) -> bool {
        self.inner.batch_invariance_costs_nothing()
    }

    /// `--batch-invariant`'s rule, the same for `serve` and `run`: `Some(true)` makes the
    /// arithmetic batch-invariant or fails saying why; `None` (auto) makes it so where it costs
    /// nothing ([`Pipeline::batch_invariance_costs_nothing`]); `Some(false)` never. Whether the
    /// arithmetic is batch-invariant now.
    pub fn set_batch_invariance(&mut self, want: Option<bool>) -> Result<bool> {
        let free = self.batch_invariance_costs_nothing();
        choose_batch_invariance(want, free, || self.make_batch_invariant())
    }

    /// What continuous batching has done so far (`None` when it is off).
    pub fn batch_stats(&self) -> Option<crate::generation::BatchStats> {
        self.inner.batch_stats()
    }

    /// Text generation with continuous batching: a request is on its way (a server has begun
    /// to read, check and tokenize it), so that an idle batch's first prompt waits a little for
    /// it ([`crate::generation::Admission::arrival_wait`]) instead of running alone while it
    /// comes. It has arrived when a generation run inside
    /// [`arriving`](crate::generation::arriving) with it puts its prompt in the queue, or when
    /// the `Arrival` is dropped. `None` for other tasks and without a batch.
    pub fn announce(&self) -> Option<crate::generation::Arrival> {
        self.inner.announce()
    }

    /// The tokenizer a text-generation pipeline reads and writes text with (a GGUF file's
    /// embedded one included); `None` for other tasks.
    pub fn tokenizer(&self) -> Option<&crate::tokenizer::Tokenizer> {
        self.inner.tokenizer()
    }

    /// A text-generation pipeline's chat template (the model's, or the one `chat_template`
    /// set); `None` for other tasks and for models without one.
    pub fn chat_template(&self) -> Option<&crate::generation::ChatTemplate> {
        self.inner.chat_template()
    }

    /// The canonical task name.
    pub fn task(&self) -> &str {
        &self.task
    }

    /// Run on `inputs`; one output per input, in input order. A `batch_size` key in `params`
    /// overrides the pipeline's.
    pub fn run(&self, inputs: &[Input], params: &Params) -> Result<Vec<Output>> {
        let mut params = params.clone();
        let batch_size = match params.remove("batch_size") {
            None => self.batch_size,
            Some(v) => v
                .as_u64()
                .filter(|n| *n >= 1)
                .ok_or_else(|| Error::param("batch_size", "expected an integer >= 1"))?
                as usize,
        };
        let accepted = self.inner.accepted_params();
        for k in params.keys() {
            if !accepted.contains(&k.as_str()) {
                return Err(Error::UnknownParameter {
                    task: self.task.clone(),
                    name: k.clone(),
                    accepted: accepted.join(", "),
                });
            }
        }
        self.inner.run(inputs, &params, batch_size)
    }

    /// Multilingual Whisper: the language of each input (`"english"`, `"french"`, ...) as
    /// `detect_language` picks it from its first 30 s, which is the language a transcription
    /// without `language` runs in. transformers' `return_language` cannot say it (its chunks'
    /// language is null: `generate` drops the start tokens that hold it); this runs the encoder
    /// once more. `None` for models that cannot tell (CTC, English-only Whisper, other tasks).
    pub fn spoken_languages(&self, inputs: &[Input]) -> Result<Option<Vec<String>>> {
        self.inner.spoken_languages(inputs)
    }

    /// Text generation for one input, `on_token` called with each new token (its id,
    /// log-probability and the text it completes) as it is produced; returning `false` ends
    /// the generation after that token (the reader has gone). The output and its token counts.
    /// Other tasks: an error.
    pub fn run_streaming(
        &self,
        input: &Input,
        params: &Params,
        on_token: &mut dyn FnMut(&text_generation::TokenEvent) -> bool,
    ) -> Result<(Output, text_generation::Usage)> {
        self.inner.run_streaming(input, params, 0, None, on_token)
    }

    /// [`Pipeline::run_streaming`] with each token's `top_logprobs` most likely alternatives
    /// (OpenAI's `top_logprobs`, TGI's `top_n_tokens`) in its event.
    pub fn run_streaming_top(
        &self,
        input: &Input,
        params: &Params,
        top_logprobs: usize,
        on_token: &mut dyn FnMut(&text_generation::TokenEvent) -> bool,
    ) -> Result<(Output, text_generation::Usage)> {
        self.inner
            .run_streaming(input, params, top_logprobs, None, on_token)
    }

    /// [`Pipeline::run_streaming_top`] that `cancel` stops: after the next token, and when the
    /// model runs a shared batch (a server), also before the prompt runs or between the chunks
    /// of a long one (then with an error): a server cancels it when its client has gone.
    pub fn run_streaming_until(
        &self,
        input: &Input,
        params: &Params,
        top_logprobs: usize,
        cancel: &crate::generation::Cancel,
        on_token: &mut dyn FnMut(&text_generation::TokenEvent) -> bool,
    ) -> Result<(Output, text_generation::Usage)> {
        self.inner
            .run_streaming(input, params, top_logprobs, Some(cancel), on_token)
    }

    /// Text generation: the tokens `input` becomes under `params` (the ids a generation of it
    /// starts from), each with its text decoded alone; with `logprobs: Some(n)`, also each
    /// token's log-probability after the tokens before it (none for the first) and the `n`
    /// most likely tokens at its position (OpenAI's `echo`, TGI's `decoder_input_details`).
    /// `cancel` stops the scoring between chunks of the prompt. Other tasks: an error.
    pub fn prompt_tokens(
        &self,
        input: &Input,
        params: &Params,
        logprobs: Option<usize>,
        cancel: Option<&crate::generation::Cancel>,
    ) -> Result<Vec<text_generation::PromptToken>> {
        self.inner.prompt_tokens(input, params, logprobs, cancel)
    }

    /// Run on one text with default parameters.
    pub fn run_one(&self, input: impl Into<Input>) -> Result<Output> {
        let out = self.run(&[input.into()], &Params::new())?;
        out.into_iter()
            .next()
            .ok_or_else(|| Error::Tokenizer("no output".into()))
    }
}

/// Typed readers for parameters: absent -> `None`; present -> checked value.
pub(crate) mod param {
    use super::*;

    /// `Some(None)` for an explicit `null`.
    pub fn opt_usize(p: &Params, name: &str) -> Result<Option<Option<usize>>> {
        match p.get(name) {
            None => Ok(None),
            Some(Value::Null) => Ok(Some(None)),
            Some(v) => v
                .as_u64()
                .map(|n| Some(Some(n as usize)))
                .ok_or_else(|| Error::param(name, format!("expected an integer or null, got {v}"))),
        }
    }

    pub fn opt_bool(p: &Params, name: &str) -> Result<Option<bool>> {
        match p.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::param(
                name,
                format!("expected true or false, got {v}"),
            )),
        }
    }

    pub fn opt_str<'a>(p: &'a Params, name: &str) -> Result<Option<&'a str>> {
        match p.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::param(name, format!("expected a string, got {v}"))),
        }
    }

    /// `truncation`: inputs are always truncated to the model's limit (HF's `truncation=True`);
    /// `false` would let a long input overflow the position embeddings, so it is refused.
    pub fn check_truncation(p: &Params) -> Result<()> {
        if opt_bool(p, "truncation")? == Some(false) {
            return Err(Error::param(
                "truncation",
                "inputs are always truncated to the model's maximum length; `false` is not supported",
            ));
        }
        Ok(())
    }

    /// A string or a list of strings.
    pub fn opt_str_list(p: &Params, name: &str) -> Result<Option<Vec<String>>> {
        match p.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        Error::param(name, format!("expected a list of strings, found {v}"))
                    })
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(Error::param(
                name,
                format!("expected a string or a list of strings, got {v}"),
            )),
        }
    }
}

/// Resolved model folder + tokenizer folder + config.
pub struct Loaded {
    pub model_dir: PathBuf,
    pub config: ModelConfig,
    pub tokenizer: Tokenizer,
}

pub fn load_common(opts: &PipelineOptions, model: &str, task: &str) -> Result<Loaded> {
    let model_dir = crate::hub::resolve_or_download(model, opts.revision.as_deref())?;
    if let Some(gguf) = crate::generation::gguf_file(&model_dir) {
        // A GGUF file (or a repo of them) is a text-generation model here; the other tasks
        // read transformers' folders (config.json was "missing" for a GGUF repo).
        return Err(Error::InvalidFile {
            path: gguf,
            detail: format!(
                "a GGUF model: {task} does not load GGUF files (only text-generation does); \
                 give a model folder with config.json and safetensors or PyTorch weights"
            ),
        });
    }
    if !model_dir.is_dir() {
        return Err(Error::InvalidFile {
            path: model_dir,
            detail: "expected a model folder (with config.json)".into(),
        });
    }
    crate::generation::warn_gguf_math_unused(opts.gguf_math);
    let config = ModelConfig::from_dir(&model_dir)?;
    let tok_dir = match &opts.tokenizer {
        Some(t) => crate::hub::resolve_or_download(t, opts.revision.as_deref())?,
        None => model_dir.clone(),
    };
    let tokenizer =
        Tokenizer::from_dir(&tok_dir, &config.model_type, models::max_positions(&config))?;
    Ok(Loaded {
        model_dir,
        config,
        tokenizer,
    })
}

/// How many batches `for_each_batch` keeps in flight on CPU: a few per thread, so that rayon can
/// balance batches of different cost while memory stays bounded.
pub fn batches_in_flight() -> usize {
    rayon::current_num_threads().max(1) * 4
}

/// Split `items` into batches of `batch_size`, `compute` each, and hand the results to
/// `consume` in order. On CPU (`parallel`), batches are independent work: they run at once,
/// one per rayon thread, each with serial kernels (`kernels::cpu::threads::as_worker`), which keeps
/// both cores busy without fanning tiny products out. A window of a few batches per thread
/// is in flight at a time (rayon balances them, so one long batch does not idle the other
/// threads), which keeps memory bounded. A batch that would be left to run alone at the end
/// of a window runs last with its products split over all threads.
/// `--batch-invariant`'s rule, the same for `serve` and `run`: `Some(true)` makes the
/// arithmetic batch-invariant (`make`) or fails saying why; `None` (auto) makes it so where it
/// costs nothing (`free`), and leaves it off where `make` fails; `Some(false)` never. Whether it
/// is on.
pub(crate) fn choose_batch_invariance(
    want: Option<bool>,
    free: bool,
    make: impl FnOnce() -> Result<()>,
) -> Result<bool> {
    match want {
        Some(false) => Ok(false),
        Some(true) => make().map(|()| true),
        None => Ok(free && make().is_ok()),
    }
}

pub(crate) fn for_each_batch<T, R, C, F>(
    items: &[T],
    batch_size: usize,
    parallel: bool,
    compute: C,
    mut consume: F,
) -> Result<()>
where
    T: Sync,
    R: Send,
    C: Fn(&[T]) -> Result<R> + Sync,
    F: FnMut(&[T], R) -> Result<()>,
{
    use rayon::prelude::*;
    let chunks: Vec<&[T]> = items.chunks(batch_size.max(1)).collect();
    let window = if parallel { batches_in_flight() } else { 1 };
    let threads = rayon::current_num_threads();
    for wave in chunks.chunks(window) {
        // A last batch that would run alone (3 windows of one question on 2 threads) instead
        // runs after the others with its products split over every thread, so no core idles.
        let lone = parallel && threads > 1 && wave.len() % threads == 1;
        let (side, last) = wave.split_at(wave.len() - usize::from(lone));
        let mut outs: Vec<Result<R>> = if side.len() > 1 {
            // Last batches first: encoder runs order each window by length, so the longest
            // batches start first and the short ones fill in at the end (less idling at the
            // window's end). Results go back in order.
            let mut outs: Vec<Result<R>> = side
                .par_iter()
                .rev()
                .with_max_len(1)
                .map(|chunk| crate::kernels::cpu::threads::as_worker(|| compute(chunk)))
                .collect();
            outs.reverse();
            outs
        } else {
            side.iter().map(|chunk| compute(chunk)).collect()
        };
        outs.extend(last.iter().map(|chunk| compute(chunk)));
        for (chunk, out) in wave.iter().zip(outs) {
            consume(chunk, out?)?;
        }
    }
    Ok(())
}

/// An encoder model with its tokenizer: pads batches and runs them. Public so tests and
/// tools can reach raw head outputs.
/// A batch output's reduction on its device (see [`EncoderRunner::run_reducing`]).
pub type BatchReduce = dyn Fn(&Tensor, &[&Encoded]) -> Result<Tensor> + Sync;

pub struct EncoderRunner {
    pub model: Box<dyn EncoderModel>,
    pub tokenizer: Tokenizer,
    pub config: ModelConfig,
    pub device: Device,
}

impl EncoderRunner {
    pub fn load(opts: &PipelineOptions, model: &str, head: Head, task: &str) -> Result<Self> {
        let loaded = load_common(opts, model, task)?;
        let int8 = opts.quantize == Some(Quantize::Int8);
        let enc = models::load_encoder(
            &loaded.model_dir,
            &loaded.config,
            head,
            &opts.device,
            opts.dtype,
            int8,
            task,
        )?;
        Ok(Self {
            model: enc,
            tokenizer: loaded.tokenizer,
            config: loaded.config,
            device: opts.device.clone(),
        })
    }

    /// An error naming the first token id the model has no embedding for (a tokenizer that
    /// is not the model's, with more tokens than its `vocab_size`), instead of the embedding
    /// lookup's index error.
    fn check_vocab(&self, ids: &[u32]) -> Result<()> {
        let Some(vocab) = self.config.raw.get("vocab_size").and_then(Value::as_u64) else {
            return Ok(());
        };
        match ids.iter().find(|&&id| u64::from(id) >= vocab) {
            Some(&id) => Err(Error::Tokenizer(format!(
                "token id {id} ({:?}) is outside the model's vocabulary of {vocab} embeddings \
                 (config.json `vocab_size`): the tokenizer has more tokens than the model, so \
                 it is not this model's tokenizer",
                self.tokenizer.id_to_token(id).unwrap_or_default()
            ))),
            None => Ok(()),
        }
    }

    /// Forward a padded batch; returns the head output `[b, ...]` as f32.
    pub fn forward_padded(&self, encs: &[&Encoded]) -> Result<Tensor> {
        let max_len = encs.iter().map(|e| e.len()).max().unwrap_or(0);
        let b = encs.len();
        let mut ids = Vec::with_capacity(b * max_len);
        let mut types = Vec::with_capacity(b * max_len);
        let mut mask = Vec::with_capacity(b * max_len);
        for e in encs {
            let pad = max_len - e.len();
            ids.extend_from_slice(&e.ids);
            ids.extend(std::iter::repeat_n(self.tokenizer.pad_id, pad));
            types.extend_from_slice(&e.type_ids);
            types.extend(std::iter::repeat_n(0u32, pad));
            mask.extend(std::iter::repeat_n(1f32, e.len()));
            mask.extend(std::iter::repeat_n(0f32, pad));
        }
        self.check_vocab(&ids)?;
        let ids = Tensor::from_vec(ids, (b, max_len), &self.device)?;
        let types = Tensor::from_vec(types, (b, max_len), &self.device)?;
        let mask = Tensor::from_vec(mask, (b, max_len), &self.device)?;
        Ok(self
            .model
            .forward(&ids, &types, &mask)?
            .to_dtype(DType::F32)?)
    }

    /// Run all encodings in batches of `batch_size` (padded to the longest in each batch) and
    /// hand each item's own output, with padding rows removed, to `f` in input order.
    ///
    /// Batches are made from inputs of similar length (as sentence-transformers' `encode`
    /// does): within each window of a few batches per thread, inputs are ordered by length
    /// before they are cut into batches, so less of each batch is padding. Every item's output
    /// is its own (padding is masked), so only the work changes, not the results.
    pub fn run<F>(&self, encs: &[Encoded], batch_size: usize, f: F) -> Result<()>
    where
        F: FnMut(usize, Tensor) -> Result<()>,
    {
        self.run_reducing(encs, batch_size, None, f)
    }

    /// [`EncoderRunner::run`], with `reduce` applied to each batch's output (`[b, s, ..]`, on
    /// the model's device, with the batch's encodings in row order) before it comes to the
    /// host: `f` then gets each row of the reduced `[b, ..]` output (e.g. a pooled vector).
    pub fn run_reducing<F>(
        &self,
        encs: &[Encoded],
        batch_size: usize,
        reduce: Option<&BatchReduce>,
        mut f: F,
    ) -> Result<()>
    where
        F: FnMut(usize, Tensor) -> Result<()>,
    {
        if encs.iter().any(|e| e.truncated) {
            crate::tokenizer::warn_truncated(self.tokenizer.max_length);
        }
        let batch_size = batch_size.max(1);
        let window = batch_size * batches_in_flight();
        for (w, part) in encs.chunks(window).enumerate() {
            let mut order: Vec<usize> = (0..part.len()).collect();
            if batch_size > 1 {
                order.sort_by_key(|&i| part[i].len());
            }
            let sorted: Vec<&Encoded> = order.iter().map(|&i| &part[i]).collect();
            let mut rows: Vec<Option<Tensor>> = vec![None; part.len()];
            let mut next = 0;
            for_each_batch(
                &sorted,
                batch_size,
                self.device.is_cpu(),
                |chunk| self.forward_padded(chunk),
                |chunk, out| {
                    let out = match reduce {
                        Some(r) => r(&out, chunk)?,
                        None => out,
                    };
                    // On a GPU, the batch's output comes to host memory in one copy: candle's
                    // `to_vec*` on a device tensor copies its whole storage, so reading each
                    // row from the device would copy the whole batch once per row (measured
                    // on an H200: MiniLM at batch 256 ran at 1/13 of torch's speed).
                    let out = if out.device().is_cpu() {
                        out
                    } else {
                        out.to_device(&candle_core::Device::Cpu)?
                    };
                    for (i, e) in chunk.iter().enumerate() {
                        let mut row = out.get(i)?;
                        if row.rank() >= 2 {
                            row = row.narrow(0, 0, e.len())?;
                        }
                        rows[order[next]] = Some(row);
                        next += 1;
                    }
                    Ok(())
                },
            )?;
            for (i, row) in rows.into_iter().enumerate() {
                let row = row.ok_or_else(|| Error::Tokenizer("a batch returned no row".into()))?;
                f(w * window + i, row)?;
            }
        }
        Ok(())
    }

    /// Tokenize every input, refusing empty ones.
    pub fn encode_all(&self, inputs: &[Input]) -> Result<Vec<Encoded>> {
        encode_each(inputs, |i, inp| {
            let (t, p) = inp.text_and_pair(i)?;
            self.tokenizer.encode(t, p)
        })
    }
}

/// `f(index, input)` for every input, in parallel for a list long enough to pay for it (as
/// `tokenizers`' `encode_batch`, which transformers' tokenizer call uses): tokenizing 1024
/// short texts takes ~30 ms on one core, half of a GPU's whole MiniLM pass at batch 256. The
/// results keep the input order, and the error is the first failing input's, as a serial
/// loop gives.
pub(crate) fn encode_each<T, F>(inputs: &[Input], f: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(usize, &Input) -> Result<T> + Sync,
{
    use rayon::prelude::*;
    if inputs.len() < 32 || rayon::current_num_threads() < 2 {
        return inputs.iter().enumerate().map(|(i, x)| f(i, x)).collect();
    }
    let all: Vec<Result<T>> = inputs
        .par_iter()
        .enumerate()
        .with_min_len(8)
        .map(|(i, x)| f(i, x))
        .collect();
    all.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::for_each_batch;
    use crate::kernels::cpu::threads::in_worker;

    /// Results come back in order whatever the wave shape; batches that share a wave run with
    /// serial kernels, and a lone last batch of a wave runs with parallel ones.
    #[test]
    fn batches_come_back_in_order_and_a_lone_last_batch_runs_wide() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        for n in [1usize, 2, 3, 5, 8, 9, 17] {
            let items: Vec<usize> = (0..n).collect();
            let mut seen = Vec::new();
            pool.install(|| {
                for_each_batch(
                    &items,
                    1,
                    true,
                    |c| Ok((c[0] * 10, in_worker())),
                    |c, (v, worker)| {
                        assert_eq!(v, c[0] * 10);
                        seen.push((c[0], worker));
                        Ok(())
                    },
                )
            })
            .unwrap();
            assert_eq!(seen.iter().map(|s| s.0).collect::<Vec<_>>(), items);
            // Waves of 8 on 2 threads: a wave of odd length leaves its last batch alone.
            for (i, worker) in seen {
                let wave = &items[i / 8 * 8..(i / 8 * 8 + 8).min(n)];
                let lone = wave.len() % 2 == 1 && i == *wave.last().unwrap();
                assert_eq!(worker, !lone, "n {n}, batch {i}");
            }
        }
    }
}
