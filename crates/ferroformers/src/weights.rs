//! Model weights: `model.safetensors` (memory-mapped), sharded `model.safetensors.index.json`,
//! and `pytorch_model.bin` (single or sharded), exposed to model code as a `VarBuilder`.
//!
//! Names are served as HF model code spells them today; legacy LayerNorm names (`gamma`/`beta`,
//! from TF-converted checkpoints) are mapped to `weight`/`bias`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use crate::config::read_json;
use crate::error::{Error, Result};

enum Source {
    Safetensors(MmapedSafetensors),
    Loaded(HashMap<String, Tensor>),
}

pub struct Weights {
    source: Source,
    path: PathBuf,
    /// Canonical name -> stored name.
    names: HashMap<String, String>,
}

fn canonical_name(stored: &str) -> String {
    if let Some(base) = stored.strip_suffix(".gamma") {
        format!("{base}.weight")
    } else if let Some(base) = stored.strip_suffix(".beta") {
        format!("{base}.bias")
    } else {
        stored.to_string()
    }
}

fn shard_files(index: &Path) -> Result<Vec<PathBuf>> {
    let v = read_json(index)?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::invalid_file(index, "no `weight_map`"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    files.sort();
    files.dedup();
    let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
    for p in &paths {
        if !p.is_file() {
            return Err(Error::MissingFile {
                path: p.clone(),
                what: format!("shard listed in {}", index.display()),
            });
        }
    }
    Ok(paths)
}

impl Weights {
    /// Find and open the weights of a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let bin = dir.join("pytorch_model.bin");
        let bin_index = dir.join("pytorch_model.bin.index.json");
        if single.is_file() {
            Self::from_safetensors(std::slice::from_ref(&single), single.clone())
        } else if index.is_file() {
            let files = shard_files(&index)?;
            Self::from_safetensors(&files, index)
        } else if bin.is_file() {
            Self::from_pth(std::slice::from_ref(&bin), bin.clone())
        } else if bin_index.is_file() {
            let files = shard_files(&bin_index)?;
            Self::from_pth(&files, bin_index)
        } else {
            Err(Error::MissingFile {
                path: single,
                what: "no weights found: expected model.safetensors, \
                       model.safetensors.index.json or pytorch_model.bin"
                    .into(),
            })
        }
    }

    fn from_safetensors(files: &[PathBuf], path: PathBuf) -> Result<Self> {
        // SAFETY: the files are mapped read-only; like every mmap user we rely on nobody
        // truncating a model file while it is loaded.
        let st = unsafe { MmapedSafetensors::multi(files) }.map_err(|e| Error::Weights {
            path: path.clone(),
            detail: format!("not a valid safetensors file ({e})"),
        })?;
        let names = st
            .tensors()
            .into_iter()
            .map(|(n, _)| (canonical_name(&n), n))
            .collect();
        Ok(Self {
            source: Source::Safetensors(st),
            path,
            names,
        })
    }

    fn from_pth(files: &[PathBuf], path: PathBuf) -> Result<Self> {
        let mut tensors = HashMap::new();
        for f in files {
            let all = candle_core::pickle::read_all(f).map_err(|e| Error::Weights {
                path: f.clone(),
                detail: format!("not a readable PyTorch checkpoint ({e})"),
            })?;
            tensors.extend(all);
        }
        let names = tensors
            .keys()
            .map(|n| (canonical_name(n), n.clone()))
            .collect();
        Ok(Self {
            source: Source::Loaded(tensors),
            path,
            names,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether any tensor name starts with `prefix.` (checkpoints saved from a head model prefix
    /// the base model: `bert.`, `roberta.`, ...).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        let p = format!("{prefix}.");
        self.names.keys().any(|n| n.starts_with(&p))
    }

    pub fn contains(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    pub fn into_var_builder(self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self), dtype, device.clone())
    }

    /// Tensor `name` (canonical name) as stored, on `device`.
    pub(crate) fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        self.load(name, device).map_err(|e| Error::Weights {
            path: self.path.clone(),
            detail: e.to_string(),
        })
    }

    fn load(&self, name: &str, device: &Device) -> candle_core::Result<Tensor> {
        let stored = self.names.get(name).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "tensor `{name}` is missing from {}",
                self.path.display()
            ))
        })?;
        match &self.source {
            Source::Safetensors(st) => st.load(stored, device),
            Source::Loaded(map) => map
                .get(stored)
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` vanished")))?
                .to_device(device),
        }
    }
}

impl SimpleBackend for Weights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _h: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.load(name, dev)?;
        if t.shape() != &s {
            return Err(candle_core::Error::Msg(format!(
                "tensor `{name}` in {} has shape {:?}, the config implies {:?}",
                self.path.display(),
                t.dims(),
                s.dims()
            )));
        }
        t.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.load(name, dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.contains(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_layer_norm_names() {
        assert_eq!(canonical_name("a.LayerNorm.gamma"), "a.LayerNorm.weight");
        assert_eq!(canonical_name("a.LayerNorm.beta"), "a.LayerNorm.bias");
        assert_eq!(canonical_name("a.dense.weight"), "a.dense.weight");
    }
}
