//! `config.json` and `tokenizer_config.json` (+ `special_tokens_map.json`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::invalid_file(path, e))
}

/// The architecture-independent part of `config.json`; each model parses its own sizes from
/// [`ModelConfig::raw`].
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub path: PathBuf,
    pub raw: Value,
    pub model_type: String,
    pub architectures: Vec<String>,
    /// Labels by class index, as `id2label`; HF's `LABEL_i` when absent.
    pub id2label: Vec<String>,
    pub problem_type: Option<String>,
}

impl ModelConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            return Err(Error::MissingFile {
                path,
                what: "every model folder needs a config.json".into(),
            });
        }
        Self::from_value(read_json(&path)?, path)
    }

    pub fn from_value(raw: Value, path: PathBuf) -> Result<Self> {
        let model_type = raw
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::invalid_file(&path, "no `model_type` key"))?
            .to_string();
        let architectures = raw
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        let mut labels: BTreeMap<usize, String> = BTreeMap::new();
        if let Some(map) = raw.get("id2label").and_then(Value::as_object) {
            for (k, v) in map {
                let idx: usize = k
                    .parse()
                    .map_err(|_| Error::invalid_file(&path, format!("id2label key `{k}`")))?;
                let label = v
                    .as_str()
                    .ok_or_else(|| Error::invalid_file(&path, format!("id2label[{k}]")))?;
                labels.insert(idx, label.to_string());
            }
        }
        let num_labels = raw
            .get("num_labels")
            .and_then(Value::as_u64)
            .map(|n| n as usize)
            .unwrap_or_else(|| labels.keys().next_back().map_or(2, |k| k + 1));
        let id2label = (0..num_labels.max(labels.len()))
            .map(|i| {
                labels
                    .get(&i)
                    .cloned()
                    .unwrap_or_else(|| format!("LABEL_{i}"))
            })
            .collect();
        let problem_type = raw
            .get("problem_type")
            .and_then(Value::as_str)
            .map(str::to_string);
        Ok(Self {
            path,
            raw,
            model_type,
            architectures,
            id2label,
            problem_type,
        })
    }

    pub fn num_labels(&self) -> usize {
        self.id2label.len()
    }

    /// Parse the architecture-specific part of the config.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_value(self.raw.clone()).map_err(|e| Error::invalid_file(&self.path, e))
    }

    /// [`ModelConfig::parse`], then the architecture's own checks ([`CheckedConfig`]): sizes
    /// the model code would divide by or reshape with are refused here, with an error naming
    /// `config.json`, the field and its value, instead of a panic while loading or running.
    pub fn parse_checked<T: serde::de::DeserializeOwned + CheckedConfig>(&self) -> Result<T> {
        let cfg: T = self.parse()?;
        cfg.check()
            .map_err(|e| Error::invalid_file(&self.path, e))?;
        Ok(cfg)
    }

    pub fn get_usize(&self, key: &str) -> Option<usize> {
        self.raw
            .get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
    }
}

/// An architecture's config whose sizes the model code relies on (heads that split the hidden
/// size, ...); `check` names the field that is wrong.
pub trait CheckedConfig {
    fn check(&self) -> std::result::Result<(), String>;
}

/// `heads` (the field `heads_name`) is at least 1 and splits `width` (the field `width_name`)
/// into heads of equal size, as every attention's reshape assumes.
pub(crate) fn check_heads(
    width_name: &str,
    width: usize,
    heads_name: &str,
    heads: usize,
) -> std::result::Result<(), String> {
    if heads == 0 {
        return Err(format!(
            "{heads_name} is 0; a model needs at least one head"
        ));
    }
    if !width.is_multiple_of(heads) {
        return Err(format!(
            "{width_name} {width} does not split into {heads_name} {heads} heads \
             ({width} is not a multiple of {heads})"
        ));
    }
    Ok(())
}

/// What the pipelines need from `tokenizer_config.json` and `special_tokens_map.json`.
#[derive(Debug, Clone, Default)]
pub struct TokenizerConfig {
    pub model_max_length: Option<usize>,
    pub do_lower_case: Option<bool>,
    pub strip_accents: Option<bool>,
    pub tokenize_chinese_chars: Option<bool>,
    pub add_prefix_space: Option<bool>,
    pub clean_up_tokenization_spaces: Option<bool>,
    pub tokenizer_class: Option<String>,
    pub unk_token: Option<String>,
    pub sep_token: Option<String>,
    pub pad_token: Option<String>,
    pub cls_token: Option<String>,
    pub mask_token: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
}

/// A special token is saved either as a string or as an AddedToken dict with `content`.
fn token_str(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

impl TokenizerConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut cfg = TokenizerConfig::default();
        let map_path = dir.join("special_tokens_map.json");
        if map_path.is_file() {
            cfg.apply(&read_json(&map_path)?);
        }
        let path = dir.join("tokenizer_config.json");
        if path.is_file() {
            let v = read_json(&path)?;
            cfg.apply(&v);
            // HF writes a huge sentinel (1e30) when the limit is unknown.
            cfg.model_max_length = v
                .get("model_max_length")
                .and_then(Value::as_f64)
                .filter(|n| *n > 0.0 && *n < 1e9)
                .map(|n| n as usize);
            let b = |k: &str| v.get(k).and_then(Value::as_bool);
            cfg.do_lower_case = b("do_lower_case");
            cfg.strip_accents = b("strip_accents");
            cfg.tokenize_chinese_chars = b("tokenize_chinese_chars");
            cfg.add_prefix_space = b("add_prefix_space");
            cfg.clean_up_tokenization_spaces = b("clean_up_tokenization_spaces");
            cfg.tokenizer_class = v
                .get("tokenizer_class")
                .and_then(Value::as_str)
                .map(str::to_string);
        }
        Ok(cfg)
    }

    fn apply(&mut self, v: &Value) {
        let set = |slot: &mut Option<String>, key: &str| {
            if let Some(t) = token_str(v.get(key)) {
                *slot = Some(t);
            }
        };
        set(&mut self.unk_token, "unk_token");
        set(&mut self.sep_token, "sep_token");
        set(&mut self.pad_token, "pad_token");
        set(&mut self.cls_token, "cls_token");
        set(&mut self.mask_token, "mask_token");
        set(&mut self.bos_token, "bos_token");
        set(&mut self.eos_token, "eos_token");
    }
}
