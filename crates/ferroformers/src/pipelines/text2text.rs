//! `text2text-generation`, `summarization` and `translation` (`translation_XX_to_YY`), as HF's
//! `Text2TextGenerationPipeline` and its two subclasses (4.57): an encoder-decoder generates from
//! each input (with the task's `prefix` from `task_specific_params`); outputs are
//! `{"generated_text"|"summary_text"|"translation_text": ..}` (or `*_token_ids` with
//! `return_tensors`) per returned sequence.
//!
//! Generation settings follow HF's order: the pipeline defaults (`max_new_tokens=256`,
//! `num_beams=4`) where the model's generation config keeps the global default, `max_new_tokens`
//! dropped when the model sets `max_length`, then `task_specific_params[task]`; at call time the
//! model's non-default values fill what is still at the global default (as `generate` does with
//! a passed `generation_config`), then the call's parameters.

use serde_json::{Map, Value};

use super::{load_common, param, Input, Output, Params, PipelineOptions, Task};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generation::config::GENERATION_PARAMS;
use crate::generation::{GenerationConfig, Hooks};
use crate::models::seq2seq::{decoder_start, generate_seq2seq, load_seq2seq, Seq2SeqLm};
use crate::tokenizer::{clean_up_tokenization, Tokenizer};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Text2Text,
    Summarization,
    Translation,
}

impl Kind {
    /// The output key prefix (`return_name`).
    fn return_name(self) -> &'static str {
        match self {
            Kind::Text2Text => "generated",
            Kind::Summarization => "summary",
            Kind::Translation => "translation",
        }
    }
}

/// `translation_XX_to_YY` -> `(XX, YY)`.
pub fn translation_pair(task: &str) -> Option<(&str, &str)> {
    let parts: Vec<&str> = task.split('_').collect();
    match parts.as_slice() {
        ["translation", src, "to", tgt] if !src.is_empty() && !tgt.is_empty() => Some((src, tgt)),
        _ => None,
    }
}

const OWN_PARAMS: &[&str] = &[
    "return_tensors",
    "return_text",
    "clean_up_tokenization_spaces",
    "truncation",
    "src_lang",
    "tgt_lang",
    "stop_sequence",
];

fn accepted_params() -> &'static [&'static str] {
    static LIST: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    LIST.get_or_init(|| {
        let mut v: Vec<&'static str> = OWN_PARAMS.to_vec();
        v.extend_from_slice(GENERATION_PARAMS);
        v
    })
}

pub struct Text2Text {
    pub model: Box<dyn Seq2SeqLm>,
    pub tokenizer: Tokenizer,
    /// The tokenizer without truncation (HF's default `truncation=False`).
    encoder: tokenizers::Tokenizer,
    /// The model's own generation config.
    pub model_generation_config: GenerationConfig,
    /// The pipeline's (defaults, model, task_specific_params).
    pub generation_config: GenerationConfig,
    pub prefix: String,
    pub kind: Kind,
    /// The task after resolution (`translation` on T5 becomes `translation_en_to_de`).
    pub task: String,
}

/// The pipeline's generation config (HF's `Pipeline.__init__` for generating models).
pub fn pipeline_generation_config(model: &GenerationConfig) -> GenerationConfig {
    let base = GenerationConfig {
        max_new_tokens: Some(256),
        num_beams: 4,
        ..GenerationConfig::default()
    };
    let mut cfg = GenerationConfig::merge_over_model(&base, model);
    if cfg.max_new_tokens == Some(256) && cfg.max_length != GenerationConfig::default().max_length {
        cfg.max_new_tokens = None;
    }
    cfg
}

/// `pipeline("translation")` on a model with `translation_*` task_specific_params uses the
/// first of them; `translation_XX_to_YY` must name a pair the model knows.
fn resolve_task(task: &str, config: &ModelConfig) -> Result<String> {
    let tsp = config
        .raw
        .get("task_specific_params")
        .and_then(Value::as_object);
    if task == "translation" {
        if let Some(key) = tsp.and_then(|m| m.keys().find(|k| k.starts_with("translation"))) {
            return Ok(key.clone());
        }
        return Ok(task.to_string());
    }
    if let Some((src, tgt)) = translation_pair(task) {
        if tsp.is_some_and(|m| m.contains_key(task)) {
            return Ok(task.to_string());
        }
        let langs = |k: &str| {
            let dir = config.path.parent()?;
            let v = crate::config::read_json(&dir.join("tokenizer_config.json")).ok()?;
            v.get(k).and_then(Value::as_str).map(str::to_string)
        };
        let cannot = format!("this model does not translate {src} to {tgt}");
        if config.model_type == "marian" {
            let (s, t) = (langs("source_lang"), langs("target_lang"));
            let ok = s.as_deref().is_none_or(|s| s == src) && t.as_deref().is_none_or(|t| t == tgt);
            if ok {
                return Ok(task.to_string());
            }
            return Err(Error::UnknownTask {
                task: task.to_string(),
                note: cannot,
                known: format!(
                    "translation, translation_{}_to_{}",
                    s.as_deref().unwrap_or("XX"),
                    t.as_deref().unwrap_or("YY")
                ),
            });
        }
        let mut known: Vec<&str> = vec!["translation"];
        if let Some(m) = tsp {
            known.extend(
                m.keys()
                    .filter(|k| k.starts_with("translation_"))
                    .map(String::as_str),
            );
        }
        return Err(Error::UnknownTask {
            task: task.to_string(),
            note: cannot,
            known: known.join(", "),
        });
    }
    Ok(task.to_string())
}

impl Text2Text {
    /// Load for `task`: `text2text-generation`, `summarization`, `translation` or
    /// `translation_XX_to_YY`.
    pub fn load(opts: &PipelineOptions, model: &str, task: &str) -> Result<Self> {
        if let Some(q) = opts.quantize {
            return Err(q.unsupported("sequence-to-sequence models have none yet"));
        }
        let kind = match task {
            "text2text-generation" => Kind::Text2Text,
            "summarization" => Kind::Summarization,
            t if t == "translation" || translation_pair(t).is_some() => Kind::Translation,
            other => {
                return Err(Error::UnknownTask {
                    task: other.to_string(),
                    note: String::new(),
                    known: "text2text-generation, summarization, translation, \
                            translation_XX_to_YY"
                        .into(),
                })
            }
        };
        let loaded = load_common(opts, model, task)?;
        let resolved = resolve_task(task, &loaded.config)?;
        let lm = load_seq2seq(
            &loaded.model_dir,
            &loaded.config,
            &opts.device,
            opts.dtype,
            task,
        )?;
        let model_cfg = GenerationConfig::from_model_dir(&loaded.model_dir)?;
        let mut cfg = pipeline_generation_config(&model_cfg);
        let mut prefix = String::new();
        if let Some(Value::Object(tp)) = loaded
            .config
            .raw
            .get("task_specific_params")
            .and_then(|m| m.get(&resolved))
        {
            let mut tp = tp.clone();
            if let Some(p) = tp.remove("prefix") {
                prefix = p.as_str().unwrap_or_default().to_string();
            }
            cfg.apply_lenient(&tp);
        }
        let mut encoder = loaded.tokenizer.inner().clone();
        encoder
            .with_truncation(None)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(Self {
            model: lm,
            tokenizer: loaded.tokenizer,
            encoder,
            model_generation_config: model_cfg,
            generation_config: cfg,
            prefix,
            kind,
            task: resolved,
        })
    }

    /// The generation config of one call.
    pub fn config(&self, params: &Params) -> Result<GenerationConfig> {
        let mut cfg = GenerationConfig::merge_over_model(
            &self.generation_config,
            &self.model_generation_config,
        );
        let gen: Map<String, Value> = params
            .iter()
            .filter(|(k, _)| GENERATION_PARAMS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        cfg.apply(&gen)?;
        if let Some(stop) = param::opt_str(params, "stop_sequence")? {
            let ids = self.encode_raw(stop, false, false)?;
            let first = ids
                .first()
                .copied()
                .ok_or_else(|| Error::param("stop_sequence", "the stop sequence has no tokens"))?;
            cfg.eos_token_id = vec![first];
        }
        if cfg.pad_token_id.is_none() {
            cfg.pad_token_id = Some(self.tokenizer.pad_id);
        }
        Ok(cfg)
    }

    fn encode_raw(&self, text: &str, special: bool, truncate: bool) -> Result<Vec<u32>> {
        let enc = if truncate {
            self.tokenizer.inner().encode(text, special)
        } else {
            self.encoder.encode(text, special)
        };
        Ok(enc
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .get_ids()
            .to_vec())
    }

    /// Encoder input ids of one input (prefix prepended).
    pub fn encode(&self, input: &Input, index: usize, truncate: bool) -> Result<Vec<u32>> {
        let text = match input {
            Input::Text(t) => t,
            _ => return Err(Error::input(index, format!("{} takes a string", self.task))),
        };
        let ids = self.encode_raw(&format!("{}{}", self.prefix, text), true, truncate)?;
        if ids.is_empty() {
            return Err(Error::input(index, "the input has no tokens"));
        }
        if let Some(max) = self.model.max_positions() {
            if ids.len() > max {
                return Err(Error::input(
                    index,
                    format!(
                        "the input is {} tokens, more than the model's {max} positions; pass \
                         truncation=true to cut it",
                        ids.len()
                    ),
                ));
            }
        }
        Ok(ids)
    }

    fn decode(&self, ids: &[u32], clean_up: bool) -> Result<String> {
        let text = self
            .encoder
            .decode(ids, true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(if clean_up {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }
}

impl Task for Text2Text {
    fn accepted_params(&self) -> &'static [&'static str] {
        accepted_params()
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        if self.kind != Kind::Translation {
            for k in ["src_lang", "tgt_lang"] {
                if params.contains_key(k) {
                    return Err(Error::param(k, "only the translation task takes it"));
                }
            }
        } else {
            param::opt_str(params, "src_lang")?;
            param::opt_str(params, "tgt_lang")?;
        }
        let tensors = match (
            param::opt_bool(params, "return_tensors")?,
            param::opt_bool(params, "return_text")?,
        ) {
            (Some(t), _) => t,
            (None, Some(t)) => !t,
            (None, None) => false,
        };
        let clean_up = param::opt_bool(params, "clean_up_tokenization_spaces")?.unwrap_or(false);
        let truncate = param::opt_bool(params, "truncation")?.unwrap_or(false);
        let cfg = self.config(params)?;
        cfg.validate()?;
        let pad_out = cfg.pad_token_id.unwrap_or(self.tokenizer.pad_id);
        // Beam search fills with `pad_token_id or eos_token_id[0]` (0 is falsy in Python).
        let pad_out = if cfg.num_beams > 1 && pad_out == 0 {
            cfg.eos_token_id.first().copied().unwrap_or(0)
        } else {
            pad_out
        };
        let start = decoder_start(self.model.as_ref(), &cfg);
        let encoded = inputs
            .iter()
            .enumerate()
            .map(|(i, inp)| self.encode(inp, i, truncate))
            .collect::<Result<Vec<_>>>()?;
        let decode_hook = |ids: &[u32]| self.encoder.decode(ids, false).unwrap_or_default();
        let name = self.kind.return_name();
        let mut outs = Vec::with_capacity(inputs.len());
        let compute = |chunk: &[_]| {
            let mut hooks = Hooks {
                decode: Some(&decode_hook),
                ..Hooks::default()
            };
            generate_seq2seq(
                self.model.as_ref(),
                chunk,
                self.tokenizer.pad_id,
                &cfg,
                &mut hooks,
            )
        };
        let cpu = self.model.device().is_cpu();
        super::for_each_batch(&encoded, batch_size, cpu, compute, |_, gen| {
            // HF returns the chunk's sequences as one tensor: start token first, padded.
            let width = gen
                .sequences
                .iter()
                .flatten()
                .map(|s| s.len() + 1)
                .max()
                .unwrap_or(1);
            for seqs in &gen.sequences {
                let mut records = Vec::with_capacity(seqs.len());
                for s in seqs {
                    let mut full = Vec::with_capacity(width);
                    full.push(start);
                    full.extend_from_slice(s);
                    let mut rec = Map::new();
                    if tensors {
                        full.resize(width, pad_out);
                        rec.insert(format!("{name}_token_ids"), Value::from(full));
                    } else {
                        rec.insert(
                            format!("{name}_text"),
                            Value::String(self.decode(&full, clean_up)?),
                        );
                    }
                    records.push(rec);
                }
                outs.push(Output::Text2Text(records));
            }
            Ok(())
        })?;
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translation_names() {
        assert_eq!(translation_pair("translation_en_to_de"), Some(("en", "de")));
        assert_eq!(translation_pair("translation"), None);
        assert_eq!(translation_pair("translation_en_de"), None);
        assert_eq!(translation_pair("translation__to_de"), None);
    }

    #[test]
    fn pipeline_defaults_follow_hf() {
        let model = GenerationConfig::default();
        let c = pipeline_generation_config(&model);
        assert_eq!((c.max_new_tokens, c.num_beams), (Some(256), 4));
        let model = GenerationConfig {
            max_length: 32,
            ..GenerationConfig::default()
        };
        let c = pipeline_generation_config(&model);
        assert_eq!((c.max_new_tokens, c.max_length), (None, 32));
    }
}
