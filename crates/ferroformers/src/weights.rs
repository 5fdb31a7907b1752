//! Model weights: `model.safetensors` (memory-mapped), sharded `model.safetensors.index.json`,
//! and `pytorch_model.bin` (single or sharded), exposed to model code as a `VarBuilder`.
//!
//! Names are served as HF model code spells them today; legacy LayerNorm names (`gamma`/`beta`,
//! from TF-converted checkpoints) are mapped to `weight`/`bias`.
//!
//! [`Ct2File`] reads CTranslate2's `model.bin` (the faster-whisper format); the model that
//! loads one renames its variables to HF's names and serves them through
//! [`Weights::from_tensors`].

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::{Load, MmapedSafetensors};
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

    /// Tensors already in memory (a converted format), under HF's names.
    pub fn from_tensors(tensors: HashMap<String, Tensor>, path: PathBuf) -> Self {
        let names = tensors.keys().map(|n| (n.clone(), n.clone())).collect();
        Self {
            source: Source::Loaded(tensors),
            path,
            names,
        }
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
            Source::Safetensors(st) => {
                let view = st.get(stored)?;
                let t = view.load(device)?;
                release_pages(view.data());
                Ok(t)
            }
            Source::Loaded(map) => map
                .get(stored)
                .ok_or_else(|| candle_core::Error::Msg(format!("tensor `{name}` vanished")))?
                .to_device(device),
        }
    }
}

/// Give back this process's pages of a memory-mapped tensor once it has been loaded (the
/// tensor is a copy). Without this every weight was resident twice while a model loaded: the
/// mapped file's pages count in the process's memory until the map goes, so a BERT-base
/// loaded and packed into int8 peaked at 673 MB. The map is read-only and backed by the file,
/// so a later read of those bytes just maps them again from the page cache. Only the pages
/// wholly inside the tensor's bytes.
fn release_pages(bytes: &[u8]) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        let page = if page > 0 { page as usize } else { 4096 };
        let start = (bytes.as_ptr() as usize).next_multiple_of(page);
        let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
        if end > start {
            // SAFETY: [start, end) lies inside `bytes`, a read-only file-backed mapping (the
            // safetensors file): MADV_DONTNEED drops the process's page table entries, and
            // the next access maps the file's same bytes again. The result is ignored: the
            // advice only saves memory.
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
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

/// A CTranslate2 `model.bin` (binary version 6): the spec's name and revision, its floating
/// point variables as f32 tensors (f16/bf16 widened, which is exact), its integer scalars
/// (`num_heads`, flags), and its aliases (`decoder/projection/weight` -> the embeddings).
pub struct Ct2File {
    pub spec: String,
    pub revision: u32,
    pub tensors: HashMap<String, Tensor>,
    pub scalars: HashMap<String, i64>,
    pub aliases: HashMap<String, String>,
}

/// A little-endian reader over `model.bin` that names the file in every error.
struct Ct2Reader<'a> {
    data: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Ct2Reader<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| {
            Error::invalid_file(
                self.path,
                format!("truncated CTranslate2 model: the file ends inside {what}"),
            )
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &str) -> Result<u8> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &str) -> Result<u16> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A u16-length string; CTranslate2 writes them with a trailing NUL.
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.u16(what)? as usize;
        let b = self.take(n, what)?;
        let b = b.strip_suffix(&[0]).unwrap_or(b);
        String::from_utf8(b.to_vec())
            .map_err(|_| Error::invalid_file(self.path, format!("{what} is not UTF-8")))
    }
}

impl Ct2File {
    pub fn read(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut r = Ct2Reader {
            data: &data,
            pos: 0,
            path,
        };
        let version = r.u32("the header")?;
        if version != 6 {
            return Err(Error::invalid_file(
                path,
                format!(
                    "CTranslate2 model binary version {version}; only version 6 (CTranslate2 3.x \
                     and 4.x) is supported"
                ),
            ));
        }
        let spec = r.string("the spec name")?;
        let revision = r.u32("the spec revision")?;
        let count = r.u32("the variable count")?;
        let mut tensors = HashMap::new();
        let mut scalars = HashMap::new();
        for _ in 0..count {
            let name = r.string("a variable name")?;
            let rank = r.u8(&name)? as usize;
            let dims = (0..rank)
                .map(|_| r.u32(&name).map(|d| d as usize))
                .collect::<Result<Vec<_>>>()?;
            let dtype = r.u8(&name)?;
            let bytes = r.u32(&name)? as usize;
            let raw = r.take(bytes, &name)?;
            let n: usize = dims.iter().product();
            let width = match dtype {
                0 | 3 => 4,
                1 => 1,
                2 | 4 | 5 => 2,
                _ => {
                    return Err(Error::invalid_file(
                        path,
                        format!("variable `{name}` has unknown data type {dtype}"),
                    ))
                }
            };
            if n * width != bytes {
                return Err(Error::invalid_file(
                    path,
                    format!("variable `{name}`: {bytes} bytes for shape {dims:?}"),
                ));
            }
            let floats: Option<Vec<f32>> = match dtype {
                0 => Some(
                    raw.chunks_exact(4)
                        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .collect(),
                ),
                4 => Some(
                    raw.chunks_exact(2)
                        .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                ),
                5 => Some(
                    raw.chunks_exact(2)
                        .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                        .collect(),
                ),
                _ => None,
            };
            match floats {
                Some(v) => {
                    let t = Tensor::from_vec(v, dims, &Device::Cpu).map_err(|e| {
                        Error::invalid_file(path, format!("variable `{name}`: {e}"))
                    })?;
                    tensors.insert(name, t);
                }
                None if rank == 0 => {
                    let v = match dtype {
                        1 => raw[0] as i8 as i64,
                        2 => i16::from_le_bytes([raw[0], raw[1]]) as i64,
                        _ => i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]) as i64,
                    };
                    scalars.insert(name, v);
                }
                None => {
                    return Err(Error::invalid_file(
                        path,
                        format!(
                            "variable `{name}` is stored as integers (an int8/int16-quantized \
                             CTranslate2 model); only float32/float16/bfloat16 models load: \
                             convert with --quantization float16"
                        ),
                    ))
                }
            }
        }
        let mut aliases = HashMap::new();
        // Files older than binary version 5 end here; version 6 always has the count.
        let n_alias = r.u32("the alias count")?;
        for _ in 0..n_alias {
            let alias = r.string("an alias")?;
            let target = r.string("an alias target")?;
            aliases.insert(alias, target);
        }
        Ok(Self {
            spec,
            revision,
            tensors,
            scalars,
            aliases,
        })
    }

    /// Variable `name`, following an alias.
    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        self.tensors.get(name).or_else(|| {
            self.aliases
                .get(name)
                .and_then(|target| self.tensors.get(target))
        })
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
