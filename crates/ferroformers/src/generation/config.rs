//! `GenerationConfig`: HF's names and global defaults, read from `generation_config.json` (or
//! `config.json`), merged with call parameters in HF's order of precedence.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// `early_stopping`: `true`, `false` or `"never"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EarlyStopping {
    True,
    #[default]
    False,
    Never,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_length: usize,
    pub max_new_tokens: Option<usize>,
    pub min_length: usize,
    pub min_new_tokens: Option<usize>,
    pub do_sample: bool,
    pub num_beams: usize,
    pub temperature: f32,
    pub top_k: Option<usize>,
    pub top_p: f32,
    pub min_p: Option<f32>,
    pub repetition_penalty: f32,
    pub no_repeat_ngram_size: usize,
    pub length_penalty: f32,
    pub early_stopping: EarlyStopping,
    pub num_return_sequences: usize,
    pub eos_token_id: Vec<u32>,
    pub pad_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub stop_strings: Vec<String>,
    /// Encoder-decoders: the first decoder token (HF falls back to `bos_token_id`, then the
    /// model's own).
    pub decoder_start_token_id: Option<u32>,
    /// Forced as the first generated token (when the row holds exactly one token).
    pub forced_bos_token_id: Option<u32>,
    /// Forced when the sequence reaches `max_length - 1` tokens.
    pub forced_eos_token_id: Vec<u32>,
    /// Token sequences that may never be generated (`NoBadWordsLogitsProcessor`).
    pub bad_words_ids: Vec<Vec<u32>>,
    /// Never generated (`SuppressTokensLogitsProcessor`; Whisper's non-speech symbols).
    pub suppress_tokens: Vec<u32>,
    /// Not generated as the first new token (`SuppressTokensAtBeginLogitsProcessor`; Whisper's
    /// blank and end of text).
    pub begin_suppress_tokens: Vec<u32>,
    /// Whisper's timestamp rules, set by the speech-recognition pipeline (not a parameter).
    pub timestamp_rules: Option<super::logits::TimestampRules>,
    /// Ours (not HF's): seed of the sampling RNG; `None` draws one from the clock.
    pub seed: Option<u64>,
    /// OpenAI's penalties (ours, not HF's; as vLLM applies them): each token's score less
    /// `frequency_penalty` times the number of times it was generated so far, and less
    /// `presence_penalty` once if it was generated at all (the prompt does not count).
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// TGI's `frequency_penalty` (ours, not HF's; TGI's `/generate` maps to it): each token's
    /// score less this times its count in the whole row so far (prompt included) divided by
    /// the row's length.
    pub tgi_frequency_penalty: f32,
    /// OpenAI's `logit_bias` (ours, not HF's): added to a token's score before anything else.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for GenerationConfig {
    /// `transformers.GenerationConfig()` defaults.
    fn default() -> Self {
        Self {
            max_length: 20,
            max_new_tokens: None,
            min_length: 0,
            min_new_tokens: None,
            do_sample: false,
            num_beams: 1,
            temperature: 1.0,
            top_k: Some(50),
            top_p: 1.0,
            min_p: None,
            repetition_penalty: 1.0,
            no_repeat_ngram_size: 0,
            length_penalty: 1.0,
            early_stopping: EarlyStopping::False,
            num_return_sequences: 1,
            eos_token_id: Vec::new(),
            pad_token_id: None,
            bos_token_id: None,
            stop_strings: Vec::new(),
            decoder_start_token_id: None,
            forced_bos_token_id: None,
            forced_eos_token_id: Vec::new(),
            bad_words_ids: Vec::new(),
            suppress_tokens: Vec::new(),
            begin_suppress_tokens: Vec::new(),
            timestamp_rules: None,
            seed: None,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            tgi_frequency_penalty: 0.0,
            logit_bias: Vec::new(),
        }
    }
}

/// The keys `apply` understands (generation parameters a pipeline accepts).
pub const GENERATION_PARAMS: &[&str] = &[
    "max_length",
    "max_new_tokens",
    "min_length",
    "min_new_tokens",
    "do_sample",
    "num_beams",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "length_penalty",
    "early_stopping",
    "num_return_sequences",
    "eos_token_id",
    "pad_token_id",
    "bos_token_id",
    "stop_strings",
    "seed",
    "decoder_start_token_id",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "frequency_penalty",
    "presence_penalty",
    "tgi_frequency_penalty",
    "logit_bias",
    "stop_token_ids",
];

fn bad(name: &str, v: &Value, want: &str) -> Error {
    Error::param(name, format!("expected {want}, got {v}"))
}

fn as_usize(name: &str, v: &Value) -> Result<usize> {
    v.as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| bad(name, v, "a non-negative integer"))
}

fn as_f32(name: &str, v: &Value) -> Result<f32> {
    v.as_f64()
        .map(|n| n as f32)
        .ok_or_else(|| bad(name, v, "a number"))
}

fn as_ids(name: &str, v: &Value) -> Result<Vec<u32>> {
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Number(_) => Ok(vec![as_usize(name, v)? as u32]),
        Value::Array(a) => a
            .iter()
            .map(|x| as_usize(name, x).map(|n| n as u32))
            .collect(),
        _ => Err(bad(name, v, "a token id or a list of token ids")),
    }
}

/// `logit_bias`: OpenAI's object of token ids (as strings) to biases, or a list of
/// `[id, bias]` pairs.
fn logit_bias(v: &Value) -> Result<Vec<(u32, f32)>> {
    const NAME: &str = "logit_bias";
    let want = "an object of token ids to numbers";
    let id_of = |k: &str| k.trim().parse::<u32>().map_err(|_| bad(NAME, v, want));
    match v {
        Value::Null => Ok(Vec::new()),
        Value::Object(m) => m
            .iter()
            .map(|(k, b)| Ok((id_of(k)?, as_f32(NAME, b)?)))
            .collect(),
        Value::Array(a) => a
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([id, b]) => Ok((as_usize(NAME, id)? as u32, as_f32(NAME, b)?)),
                _ => Err(bad(NAME, v, want)),
            })
            .collect(),
        _ => Err(bad(NAME, v, want)),
    }
}

impl GenerationConfig {
    /// Whether each step's token is the argmax of the scores after suppression and forcing
    /// alone: greedy, one sequence, no penalty or ban that depends on the scores or the
    /// tokens so far. Such calls may screen the output projection (the largest logit exact,
    /// the rest bounded estimates), when nothing else reads the logits.
    pub fn argmax_only(&self) -> bool {
        !self.do_sample
            && self.num_beams <= 1
            && self.num_return_sequences <= 1
            && self.repetition_penalty == 1.0
            && self.no_repeat_ngram_size == 0
            && self.bad_words_ids.is_empty()
            && self.frequency_penalty == 0.0
            && self.tgi_frequency_penalty == 0.0
            && self.presence_penalty == 0.0
            && self.logit_bias.is_empty()
    }

    /// The model's defaults: `generation_config.json` when present, else the generation keys of
    /// `config.json` (HF's `GenerationConfig.from_model_config`).
    pub fn from_model_dir(dir: &Path) -> Result<Self> {
        let mut cfg = Self::default();
        let gen = dir.join("generation_config.json");
        let path = if gen.is_file() {
            gen
        } else {
            dir.join("config.json")
        };
        if path.is_file() {
            let v = crate::config::read_json(&path)?;
            if let Value::Object(map) = v {
                cfg.apply_lenient(&map);
            }
        }
        Ok(cfg)
    }

    /// Apply the known keys of a saved config, skipping values of the wrong type (saved files
    /// carry many keys we do not use).
    pub fn apply_lenient(&mut self, map: &Map<String, Value>) {
        for (k, v) in map {
            if GENERATION_PARAMS.contains(&k.as_str()) {
                let mut one = Map::new();
                one.insert(k.clone(), v.clone());
                let _ = self.apply(&one);
            }
        }
    }

    /// Apply call parameters (HF's names); unknown keys are ignored here (the pipeline checks
    /// them), wrong types are errors.
    pub fn apply(&mut self, p: &Map<String, Value>) -> Result<()> {
        for (k, v) in p {
            let name = k.as_str();
            let opt_usize = |v: &Value| -> Result<Option<usize>> {
                if v.is_null() {
                    Ok(None)
                } else {
                    as_usize(name, v).map(Some)
                }
            };
            match name {
                "max_length" => self.max_length = as_usize(name, v)?,
                "max_new_tokens" => self.max_new_tokens = opt_usize(v)?,
                "min_length" => self.min_length = opt_usize(v)?.unwrap_or(0),
                "min_new_tokens" => self.min_new_tokens = opt_usize(v)?,
                "do_sample" => {
                    self.do_sample = v.as_bool().ok_or_else(|| bad(name, v, "true or false"))?
                }
                "num_beams" => self.num_beams = as_usize(name, v)?,
                "temperature" => self.temperature = as_f32(name, v)?,
                "top_k" => self.top_k = opt_usize(v)?,
                "top_p" => self.top_p = if v.is_null() { 1.0 } else { as_f32(name, v)? },
                "min_p" => {
                    self.min_p = if v.is_null() {
                        None
                    } else {
                        Some(as_f32(name, v)?)
                    }
                }
                "repetition_penalty" => {
                    self.repetition_penalty = if v.is_null() { 1.0 } else { as_f32(name, v)? }
                }
                "no_repeat_ngram_size" => self.no_repeat_ngram_size = opt_usize(v)?.unwrap_or(0),
                "length_penalty" => self.length_penalty = as_f32(name, v)?,
                "early_stopping" => {
                    self.early_stopping = match v {
                        Value::Bool(true) => EarlyStopping::True,
                        Value::Bool(false) | Value::Null => EarlyStopping::False,
                        Value::String(s) if s == "never" => EarlyStopping::Never,
                        _ => return Err(bad(name, v, "true, false or \"never\"")),
                    }
                }
                "num_return_sequences" => self.num_return_sequences = as_usize(name, v)?,
                "eos_token_id" => self.eos_token_id = as_ids(name, v)?,
                // vLLM's: more tokens that end the generation, besides the end tokens.
                "stop_token_ids" => {
                    for id in as_ids(name, v)? {
                        if !self.eos_token_id.contains(&id) {
                            self.eos_token_id.push(id);
                        }
                    }
                }
                "pad_token_id" => self.pad_token_id = opt_usize(v)?.map(|n| n as u32),
                "bos_token_id" => self.bos_token_id = opt_usize(v)?.map(|n| n as u32),
                "stop_strings" => {
                    self.stop_strings = match v {
                        Value::Null => Vec::new(),
                        Value::String(s) => vec![s.clone()],
                        Value::Array(a) => a
                            .iter()
                            .map(|x| {
                                x.as_str()
                                    .map(str::to_string)
                                    .ok_or_else(|| bad(name, v, "a string or a list of strings"))
                            })
                            .collect::<Result<_>>()?,
                        _ => return Err(bad(name, v, "a string or a list of strings")),
                    }
                }
                "seed" => self.seed = opt_usize(v)?.map(|n| n as u64),
                "decoder_start_token_id" => {
                    self.decoder_start_token_id = opt_usize(v)?.map(|n| n as u32)
                }
                "forced_bos_token_id" => self.forced_bos_token_id = opt_usize(v)?.map(|n| n as u32),
                "forced_eos_token_id" => self.forced_eos_token_id = as_ids(name, v)?,
                "suppress_tokens" => self.suppress_tokens = as_ids(name, v)?,
                "begin_suppress_tokens" => self.begin_suppress_tokens = as_ids(name, v)?,
                "bad_words_ids" => {
                    self.bad_words_ids = match v {
                        Value::Null => Vec::new(),
                        Value::Array(a) => {
                            a.iter().map(|w| as_ids(name, w)).collect::<Result<_>>()?
                        }
                        _ => return Err(bad(name, v, "a list of lists of token ids")),
                    }
                }
                "frequency_penalty" | "presence_penalty" | "tgi_frequency_penalty" => {
                    let x = if v.is_null() { 0.0 } else { as_f32(name, v)? };
                    match name {
                        "frequency_penalty" => self.frequency_penalty = x,
                        "presence_penalty" => self.presence_penalty = x,
                        _ => self.tgi_frequency_penalty = x,
                    }
                }
                "logit_bias" => self.logit_bias = logit_bias(v)?,
                _ => {}
            }
        }
        Ok(())
    }

    /// HF's `_prepare_generation_config` with a caller's base config (a pipeline's defaults):
    /// the base's non-default values win over the model's, the model's fill the rest.
    pub fn merge_over_model(base: &Self, model: &Self) -> Self {
        let d = Self::default();
        let mut out = model.clone();
        macro_rules! take {
            ($($f:ident),*) => {$(
                if base.$f != d.$f {
                    out.$f = base.$f.clone();
                }
            )*};
        }
        take!(
            max_length,
            max_new_tokens,
            min_length,
            min_new_tokens,
            do_sample,
            num_beams,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            no_repeat_ngram_size,
            length_penalty,
            early_stopping,
            num_return_sequences,
            eos_token_id,
            pad_token_id,
            bos_token_id,
            stop_strings,
            seed,
            decoder_start_token_id,
            forced_bos_token_id,
            forced_eos_token_id,
            bad_words_ids,
            suppress_tokens,
            begin_suppress_tokens,
            frequency_penalty,
            presence_penalty,
            tgi_frequency_penalty,
            logit_bias
        );
        out
    }

    /// The text-generation pipeline's config: its defaults (`max_new_tokens=256`, sampling at
    /// `temperature=0.7`) over the model's, then the model's `max_length` when it set one.
    pub fn for_text_generation_pipeline(model: &Self) -> Self {
        let base = Self {
            max_new_tokens: Some(256),
            do_sample: true,
            temperature: 0.7,
            ..Self::default()
        };
        let mut out = Self::merge_over_model(&base, model);
        if out.max_new_tokens == Some(256) && out.max_length != 20 {
            out.max_new_tokens = None;
        }
        out
    }

    /// The total length limit for prompts of `prompt_len` tokens.
    pub fn max_total_length(&self, prompt_len: usize) -> usize {
        match self.max_new_tokens {
            Some(n) => prompt_len.saturating_add(n),
            None => self.max_length,
        }
    }

    /// HF's "Unfeasible length constraints" warnings (`_validate_generated_length`), on stderr
    /// once per process each (Python shows a warning once per place): a `min_length` above
    /// the length generation stops at (`max_length`, the prompt's `prompt_len` tokens plus
    /// `max_new_tokens`), or `min_new_tokens` that, after the prompt, goes past it.
    pub fn warn_unfeasible_lengths(&self, prompt_len: usize) {
        use std::sync::atomic::{AtomicBool, Ordering};
        static MIN_LENGTH: AtomicBool = AtomicBool::new(false);
        static MIN_NEW_TOKENS: AtomicBool = AtomicBool::new(false);
        for (warned, message) in [
            (&MIN_LENGTH, self.min_length_warning(prompt_len)),
            (&MIN_NEW_TOKENS, self.min_new_tokens_warning(prompt_len)),
        ] {
            if let Some(m) = message {
                if !warned.swap(true, Ordering::Relaxed) {
                    eprintln!("warning: {m}");
                }
            }
        }
    }

    const UNFEASIBLE: &'static str = "generation stops at the maximum length; decrease the \
                                      minimum length or increase the maximum length";

    fn min_length_warning(&self, prompt_len: usize) -> Option<String> {
        let max = self.max_total_length(prompt_len);
        (self.min_length > max).then(|| {
            format!(
                "unfeasible length constraints: min_length ({}) is larger than the maximum \
                 possible length ({max}): {}",
                self.min_length,
                Self::UNFEASIBLE
            )
        })
    }

    fn min_new_tokens_warning(&self, prompt_len: usize) -> Option<String> {
        let min_new = self.min_new_tokens?;
        let max = self.max_total_length(prompt_len);
        (prompt_len.saturating_add(min_new) > max).then(|| {
            let limit = match self.max_new_tokens {
                Some(n) => format!("max_new_tokens ({n})"),
                None => format!(
                    "the maximum possible length ({max}) after the prompt's {prompt_len} tokens"
                ),
            };
            format!(
                "unfeasible length constraints: min_new_tokens ({min_new}) is larger than \
                 {limit}: {}",
                Self::UNFEASIBLE
            )
        })
    }

    /// The most beams, and sequences returned, one input may ask for. transformers sets no
    /// limit (and runs out of memory); each beam holds its own scores and key/value cache, so
    /// a number far beyond this one could only fail, and some overflowed a size.
    pub const MAX_SEQUENCES: usize = 1024;

    /// Checks HF makes before generating, as typed errors, and the size limit above.
    pub fn validate(&self) -> Result<()> {
        if self.max_new_tokens == Some(0) {
            return Err(Error::param(
                "max_new_tokens",
                "must be greater than 0, but is 0",
            ));
        }
        if self.num_beams == 0 {
            return Err(Error::param("num_beams", "must be at least 1"));
        }
        if self.num_return_sequences == 0 {
            return Err(Error::param("num_return_sequences", "must be at least 1"));
        }
        for (name, n) in [
            ("num_beams", self.num_beams),
            ("num_return_sequences", self.num_return_sequences),
        ] {
            if n > Self::MAX_SEQUENCES {
                return Err(Error::param(
                    name,
                    format!("must be at most {}, got {n}", Self::MAX_SEQUENCES),
                ));
            }
        }
        if self.num_return_sequences > self.num_beams.max(1) && !self.do_sample {
            return Err(Error::param(
                "num_return_sequences",
                format!(
                    "greedy search and beam search return at most num_beams sequences \
                     ({} > {}); set do_sample=true or raise num_beams",
                    self.num_return_sequences, self.num_beams
                ),
            ));
        }
        if self.do_sample {
            if !self.temperature.is_finite() || self.temperature <= 0.0 {
                return Err(Error::param(
                    "temperature",
                    format!(
                        "must be a strictly positive number when sampling, got {}",
                        self.temperature
                    ),
                ));
            }
            if !(self.top_p > 0.0 && self.top_p <= 1.0) {
                return Err(Error::param("top_p", "must be in (0, 1]"));
            }
            if let Some(m) = self.min_p {
                if !(0.0..=1.0).contains(&m) {
                    return Err(Error::param("min_p", "must be in [0, 1]"));
                }
            }
            if self.num_beams > 1 {
                return Err(Error::param(
                    "num_beams",
                    "beam sampling (do_sample with num_beams > 1) is not supported",
                ));
            }
        }
        for (name, x) in [
            ("frequency_penalty", self.frequency_penalty),
            ("presence_penalty", self.presence_penalty),
            ("tgi_frequency_penalty", self.tgi_frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&x) {
                return Err(Error::param(name, format!("must be in [-2, 2], got {x}")));
            }
        }
        if let Some((id, b)) = self
            .logit_bias
            .iter()
            .find(|(_, b)| !(-100.0..=100.0).contains(b))
        {
            return Err(Error::param(
                "logit_bias",
                format!("token {id}'s bias must be in [-100, 100], got {b}"),
            ));
        }
        if self.repetition_penalty <= 0.0 {
            return Err(Error::param(
                "repetition_penalty",
                "must be strictly positive",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unfeasible_lengths_are_named() {
        let c = GenerationConfig {
            min_new_tokens: Some(5),
            max_new_tokens: Some(2),
            ..GenerationConfig::default()
        };
        let w = c.min_new_tokens_warning(3).unwrap();
        assert!(
            w.contains("min_new_tokens (5)") && w.contains("max_new_tokens (2)"),
            "{w}"
        );
        assert!(c.min_length_warning(3).is_none());
        let c = GenerationConfig {
            min_length: 30,
            max_length: 20,
            max_new_tokens: None,
            ..GenerationConfig::default()
        };
        let w = c.min_length_warning(3).unwrap();
        assert!(w.contains("min_length (30)") && w.contains("(20)"), "{w}");
        let fine = GenerationConfig {
            min_new_tokens: Some(2),
            max_new_tokens: Some(2),
            min_length: 5,
            ..GenerationConfig::default()
        };
        assert!(fine.min_new_tokens_warning(3).is_none() && fine.min_length_warning(3).is_none());
    }

    use super::*;
    use serde_json::json;

    #[test]
    fn pipeline_defaults_win_over_model_but_not_over_call() {
        let mut model = GenerationConfig::default();
        model.apply_lenient(
            json!({"max_new_tokens": 7, "repetition_penalty": 1.3, "eos_token_id": 1})
                .as_object()
                .unwrap(),
        );
        let mut cfg = GenerationConfig::for_text_generation_pipeline(&model);
        assert_eq!(cfg.max_new_tokens, Some(256));
        assert!(cfg.do_sample);
        assert_eq!(cfg.repetition_penalty, 1.3);
        assert_eq!(cfg.eos_token_id, vec![1]);
        cfg.apply(json!({"do_sample": false}).as_object().unwrap())
            .unwrap();
        assert!(!cfg.do_sample);
    }

    #[test]
    fn openai_fields_parse_and_are_checked() {
        let mut c = GenerationConfig::default();
        c.apply(
            json!({"logit_bias": {"7": -100, " 12 ": 2.5}, "frequency_penalty": 1.0,
                   "presence_penalty": -0.5})
            .as_object()
            .unwrap(),
        )
        .unwrap();
        let mut bias = c.logit_bias.clone();
        bias.sort_by_key(|b| b.0);
        assert_eq!(bias, vec![(7, -100.0), (12, 2.5)]);
        assert_eq!((c.frequency_penalty, c.presence_penalty), (1.0, -0.5));
        c.validate().unwrap();
        c.apply(json!({"logit_bias": [[3, 1]]}).as_object().unwrap())
            .unwrap();
        assert_eq!(c.logit_bias, vec![(3, 1.0)]);
        for bad in [
            json!({"logit_bias": {"x": 1}}),
            json!({"logit_bias": {"3": "big"}}),
            json!({"logit_bias": 3}),
            json!({"presence_penalty": "high"}),
        ] {
            let e = GenerationConfig::default()
                .apply(bad.as_object().unwrap())
                .unwrap_err();
            let key = bad.as_object().unwrap().keys().next().unwrap().clone();
            assert!(e.to_string().contains(&key), "{e}");
        }
        for bad in [
            json!({"frequency_penalty": 2.5}),
            json!({"logit_bias": {"3": 101}}),
        ] {
            let mut c = GenerationConfig::default();
            c.apply(bad.as_object().unwrap()).unwrap();
            let key = bad.as_object().unwrap().keys().next().unwrap().clone();
            assert!(c.validate().unwrap_err().to_string().contains(&key));
        }
    }

    #[test]
    fn bad_values_are_errors() {
        let mut c = GenerationConfig::default();
        assert!(c
            .apply(json!({"num_beams": "x"}).as_object().unwrap())
            .is_err());
        c.num_beams = 0;
        assert!(c.validate().is_err());
        // Sizes past the limit are refused before anything is allocated (2^63 beams overflowed
        // a vector's capacity in beam search, a panic).
        for (n, r) in [(1 << 63, 1), (2048, 1), (1, 1 << 40)] {
            c.num_beams = n;
            c.num_return_sequences = r;
            c.do_sample = r > 1;
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("at most 1024"), "{e}");
        }
        c.num_beams = 1024;
        c.num_return_sequences = 1024;
        c.do_sample = false;
        c.validate().unwrap();
        let c = GenerationConfig {
            do_sample: true,
            temperature: 0.0,
            ..Default::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("temperature"));
    }
}
