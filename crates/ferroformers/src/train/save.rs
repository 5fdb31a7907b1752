//! Writing a trained model as `save_pretrained` does: `model.safetensors` under HF's tensor
//! names with the metadata `{"format": "pt"}`, `config.json` with the architecture and
//! labels, the tokenizer files, plus `training_args.json` and `trainer_state.json`.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use super::data::{LabelSet, Problem, Task};
use super::model::EncoderConfig;
use crate::error::{Error, Result};

/// Tokenizer files `save_pretrained` writes (those the base folder has are copied).
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
];

/// `tensors` (name, shape, f32 values) as a safetensors file with `{"format": "pt"}`, names
/// sorted as torch's `save_file` orders them.
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let mut sorted: Vec<&(String, Vec<usize>, Vec<f32>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape, values) in &sorted {
        let bytes = values.len() * 4;
        header.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::invalid_file(path, e))?;
    // The data starts 8-byte aligned: pad the header with spaces.
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for (_, _, values) in sorted {
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }
    std::fs::write(path, out).map_err(|e| Error::write(path, e))
}

/// The base config with the trained head's class and labels: `architectures`, `id2label`,
/// `label2id`, `problem_type` (text classification, as `run_classification` sets them; token
/// classification as `run_ner`; question answering keeps the base's).
pub fn config_json(cfg: &EncoderConfig, labels: &LabelSet, task: Task) -> Value {
    let mut c = cfg.raw.clone();
    let id2label: BTreeMap<String, Value> = labels
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (i.to_string(), json!(n)))
        .collect();
    let label2id: BTreeMap<String, Value> = labels
        .names
        .iter()
        .enumerate()
        .map(|(i, n)| (n.clone(), json!(i)))
        .collect();
    if let Some(o) = c.as_object_mut() {
        o.insert(
            "architectures".into(),
            json!([cfg.arch.head_class(&cfg.model_type, task)]),
        );
        o.remove("_name_or_path");
        if task == Task::QuestionAnswering {
            return c;
        }
        o.insert("id2label".into(), json!(id2label));
        o.insert("label2id".into(), json!(label2id));
        if task == Task::TextClassification {
            o.insert("problem_type".into(), json!(labels.problem.name()));
        } else {
            o.remove("problem_type");
        }
        if labels.problem == Problem::Regression {
            o.insert("num_labels".into(), json!(1));
        }
        o.remove("_name_or_path");
    }
    c
}

/// Write a JSON file, pretty as HF writes them.
pub fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::invalid_file(path, e))?;
    s.push('\n');
    std::fs::write(path, s).map_err(|e| Error::write(path, e))
}

/// Copy the tokenizer files of `from` into `to`.
pub fn copy_tokenizer(from: &Path, to: &Path) -> Result<()> {
    for f in TOKENIZER_FILES {
        let src = from.join(f);
        if src.is_file() {
            let dst = to.join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::write(&dst, e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    /// A save that cannot write says so ("cannot read" it said, from the error for reads).
    #[test]
    fn a_failed_save_says_cannot_write() {
        let file = std::env::temp_dir().join(format!("ff-save-verb-{}", std::process::id()));
        std::fs::write(&file, "a file, not a folder").unwrap();
        let inside = file.join("config.json");
        let err = super::write_json(&inside, &serde_json::json!({}))
            .unwrap_err()
            .to_string();
        let _ = std::fs::remove_file(&file);
        assert!(
            err.starts_with("cannot write `") && err.contains("config.json"),
            "{err}"
        );
    }
}
