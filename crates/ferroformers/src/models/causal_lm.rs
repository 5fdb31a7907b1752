//! What decoder-only language models share: the KV cache, the attention bias for left-padded
//! batches, projections that are dense or quantized, and `load_causal_lm` (config.json or GGUF
//! -> a model).

use std::path::Path;

use candle_core::quantized::QMatMul;
use candle_core::{DType, Device, Module, Result, Tensor, D};

use super::layers::Linear;
use crate::config::ModelConfig;
use crate::error::{Error, Result as FfResult};
use crate::kernels::cpu::attention::KvBuffer;
use crate::kernels::cpu::quantized::QuantLinear;
use crate::weights::Weights;

/// Keys and values of every layer for the tokens seen so far: `[rows, kv_heads, seq, head_dim]`
/// tensors, or plain buffers when a model's CPU path (`llama.rs`) fills it.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    cpu: Vec<KvBuffer>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            cpu: Vec::new(),
        }
    }

    /// Tokens already cached.
    pub fn seq_len(&self) -> usize {
        if let Some(b) = self.cpu.first() {
            return b.len();
        }
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// Append this step's keys and values to `layer` and return everything cached for it.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        if !self.cpu.is_empty() {
            candle_core::bail!("this KV cache holds a CPU fast path's buffers");
        }
        let kv = match self.layers[layer].take() {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (
                Tensor::cat(&[&pk, k], 2)?.contiguous()?,
                Tensor::cat(&[&pv, v], 2)?.contiguous()?,
            ),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }

    /// The plain buffers of a CPU fast path: made empty (`rows` x `heads` x `dim` per layer)
    /// on first use, an error if tensors were cached already.
    pub fn buffers(&mut self, rows: usize, heads: usize, dim: usize) -> Result<&mut [KvBuffer]> {
        if self.cpu.is_empty() {
            if self.layers.iter().any(Option::is_some) {
                candle_core::bail!("this KV cache already holds tensors");
            }
            self.cpu = vec![KvBuffer::new(rows, heads, dim); self.layers.len()];
        }
        Ok(&mut self.cpu)
    }

    /// Keep (reorder, repeat or drop) rows: row `i` of the new cache is row `rows[i]` of the old.
    pub fn select_rows(&mut self, rows: &[u32]) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            let idx = Tensor::new(rows, k.device())?;
            *k = k.index_select(&idx, 0)?;
            *v = v.index_select(&idx, 0)?;
        }
        let rows: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
        for b in &mut self.cpu {
            b.select_rows(&rows)?;
        }
        Ok(())
    }

    /// Bytes its keys and values take.
    pub fn bytes(&self) -> usize {
        let tensors: usize = self
            .layers
            .iter()
            .flatten()
            .map(|(k, v)| (k.elem_count() + v.elem_count()) * k.dtype().size_in_bytes())
            .sum();
        tensors + self.cpu.iter().map(KvBuffer::bytes).sum::<usize>()
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.cpu.is_empty() && self.layers.iter().all(Option::is_none)
    }

    /// Add `other`'s rows after these (continuous batching: a new sequence joins the running
    /// batch). Both are right-aligned to the longer length; the shorter rows are left-padded
    /// with zeros, which their attention masks hide. An empty cache becomes `other`.
    pub fn append_rows(&mut self, other: KvCache) -> Result<()> {
        if self.is_empty() {
            *self = other;
            return Ok(());
        }
        if other.is_empty() {
            return Ok(());
        }
        if self.cpu.is_empty() != other.cpu.is_empty() || self.layers.len() != other.layers.len() {
            candle_core::bail!("KV caches of different kinds cannot be joined");
        }
        for (a, b) in self.cpu.iter_mut().zip(&other.cpu) {
            a.append_rows(b)?;
        }
        for (a, b) in self.layers.iter_mut().zip(other.layers) {
            let (ak, av, bk, bv) = match (a.take(), b) {
                (None, None) => continue,
                (Some((ak, av)), Some((bk, bv))) => (ak, av, bk, bv),
                _ => candle_core::bail!("KV caches with missing layers cannot be joined"),
            };
            let len = ak.dim(2)?.max(bk.dim(2)?);
            let pad = |t: Tensor| -> Result<Tensor> {
                let (r, h, s, d) = t.dims4()?;
                if s == len {
                    return Ok(t);
                }
                let z = Tensor::zeros((r, h, len - s, d), t.dtype(), t.device())?;
                Tensor::cat(&[&z, &t], 2)
            };
            let k = Tensor::cat(&[&pad(ak)?, &pad(bk)?], 0)?.contiguous()?;
            let v = Tensor::cat(&[&pad(av)?, &pad(bv)?], 0)?.contiguous()?;
            *a = Some((k, v));
        }
        Ok(())
    }

    /// Row `r`'s `positions` as a cache of its own (one row): a finished sequence's keys and
    /// values (its real positions, padding left out), kept for a later prompt that starts the
    /// same way.
    pub fn extract_row(&self, r: usize, positions: &[usize]) -> Result<KvCache> {
        let cpu = self
            .cpu
            .iter()
            .map(|b| b.extract_row(r, positions))
            .collect();
        let mut layers = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            layers.push(match l {
                None => None,
                Some((k, v)) => {
                    let idx: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
                    let idx = Tensor::new(idx.as_slice(), k.device())?;
                    let take = |t: &Tensor| -> Result<Tensor> {
                        t.narrow(0, r, 1)?.index_select(&idx, 2)?.contiguous()
                    };
                    Some((take(k)?, take(v)?))
                }
            });
        }
        Ok(KvCache { layers, cpu })
    }

    /// Keep only the first `n` positions of every row.
    pub fn truncate(&mut self, n: usize) -> Result<()> {
        for b in &mut self.cpu {
            b.truncate(n);
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let s = k.dim(2)?;
            if n < s {
                *k = k.narrow(2, 0, n)?.contiguous()?;
                *v = v.narrow(2, 0, n)?.contiguous()?;
            }
        }
        Ok(())
    }

    /// Forget the first `n` positions of every row (padding no remaining row needs).
    pub fn drop_front(&mut self, n: usize) -> Result<()> {
        if n == 0 {
            return Ok(());
        }
        for b in &mut self.cpu {
            b.drop_front(n);
        }
        for (k, v) in self.layers.iter_mut().flatten() {
            let s = k.dim(2)?;
            let n = n.min(s);
            *k = k.narrow(2, n, s - n)?.contiguous()?;
            *v = v.narrow(2, n, s - n)?.contiguous()?;
        }
        Ok(())
    }
}

/// A decoder-only language model with a KV cache.
pub trait CausalLm: Send + Sync {
    /// `input_ids`, `position_ids`: `[b, s]` (u32); `bias`: `[b, 1, s, cached + s]` additive
    /// attention bias (0 or a large negative number). Returns f32 logits `[b, s, vocab]`, or
    /// `[b, 1, vocab]` for the last position only when `last_only`.
    fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor>;

    fn num_layers(&self) -> usize;

    /// The longest sequence the positions allow (`n_positions`, `max_position_embeddings`).
    fn max_positions(&self) -> Option<usize>;

    /// Whether positions past `max_positions` would fail (learned position embeddings) rather
    /// than merely degrade (RoPE).
    fn hard_position_limit(&self) -> bool {
        false
    }

    fn device(&self) -> &Device;
}

/// A projection `y = x W^T (+ b)`: dense (transposed, contiguous) or a quantized GGUF block
/// matrix used as is.
#[derive(Debug, Clone)]
pub enum Proj {
    Dense(Linear),
    Quantized(QMatMul, Option<Tensor>),
    /// GGUF blocks with f32 activations (CPU).
    Blocks(QuantLinear, Option<Tensor>),
}

impl Module for Proj {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Proj::Dense(l) => l.forward(xs),
            Proj::Quantized(q, b) => {
                let ys = q.forward(xs)?;
                match b {
                    Some(b) => ys.broadcast_add(b),
                    None => Ok(ys),
                }
            }
            Proj::Blocks(q, b) => {
                let ys = q.forward(xs)?;
                match b {
                    Some(b) => ys.broadcast_add(b),
                    None => Ok(ys),
                }
            }
        }
    }
}

impl Proj {
    /// `x [rows, in] -> [rows, out]` on plain buffers (CPU f32). GGUF blocks use their own
    /// kernels; other kinds go through a tensor.
    pub fn forward_vec(&self, x: &[f32], rows: usize) -> Result<Vec<f32>> {
        let (mut y, bias) = match self {
            Proj::Blocks(q, b) => (q.matmul(x, rows), b.as_ref()),
            _ => {
                let t = Tensor::from_slice(x, (rows, x.len() / rows.max(1)), &Device::Cpu)?;
                return self.forward(&t)?.flatten_all()?.to_vec1();
            }
        };
        if let Some(b) = bias {
            let b: Vec<f32> = b.to_dtype(DType::F32)?.to_vec1()?;
            for row in y.chunks_exact_mut(b.len()) {
                row.iter_mut().zip(&b).for_each(|(y, b)| *y += b);
            }
        }
        Ok(y)
    }

    /// Several projections of the same input as one (outputs side by side), when all are GGUF
    /// blocks of one type with biases on all or none.
    pub fn stack(parts: &[&Proj]) -> Result<Option<Proj>> {
        let mut blocks = Vec::with_capacity(parts.len());
        let mut biases = Vec::with_capacity(parts.len());
        for p in parts {
            match p {
                Proj::Blocks(q, b) => {
                    blocks.push(q);
                    biases.push(b.as_ref());
                }
                _ => return Ok(None),
            }
        }
        let bias = if biases.iter().all(|b| b.is_none()) {
            None
        } else if let Some(bs) = biases.iter().copied().collect::<Option<Vec<&Tensor>>>() {
            Some(Tensor::cat(&bs, 0)?)
        } else {
            return Ok(None);
        };
        Ok(QuantLinear::stack(&blocks).map(|q| Proj::Blocks(q, bias)))
    }
}

/// `[b, s]` logits rows -> the last one, `[b, 1, ...]`.
pub fn last_position(xs: &Tensor) -> Result<Tensor> {
    let s = xs.dim(1)?;
    xs.narrow(1, s - 1, 1)
}

/// Additive attention bias for `new` query tokens after `cached` ones: a query at absolute
/// position `cached + i` sees keys `j <= cached + i` whose `mask[j]` is 1. `mask`: per row, 0/1
/// over all `cached + new` tokens. Masked entries are one large negative value (never summed,
/// so fully masked rows of left padding stay finite).
pub fn causal_bias(mask: &[Vec<u8>], new: usize, device: &Device) -> Result<Tensor> {
    let b = mask.len();
    let total = mask.first().map_or(0, Vec::len);
    let cached = total - new;
    let mut data = Vec::with_capacity(b * new * total);
    for row in mask {
        for i in 0..new {
            for (j, &m) in row.iter().enumerate() {
                data.push(if j <= cached + i && m != 0 {
                    0f32
                } else {
                    f32::MIN
                });
            }
        }
    }
    Tensor::from_vec(data, (b, 1, new, total), device)
}

/// RMSNorm as HF computes it (in f32, then scaled).
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    /// The weight as f32 values and epsilon, for the CPU paths.
    pub fn parts(&self) -> Result<(Vec<f32>, f32)> {
        Ok((
            self.weight.to_dtype(DType::F32)?.to_vec1()?,
            self.eps as f32,
        ))
    }
}

impl Module for RmsNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dtype = xs.dtype();
        let x = xs.to_dtype(DType::F32)?;
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        let x = x.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        x.to_dtype(dtype)?.broadcast_mul(&self.weight)
    }
}

pub const CAUSAL_LM_TYPES: &[&str] = &["bloom", "gpt2", "llama", "mistral", "qwen2", "gemma3_text"];

/// Load a causal LM from a model folder (config.json + weights) or a `.gguf` file.
pub fn load_causal_lm(
    path: &Path,
    config: Option<&ModelConfig>,
    device: &Device,
    dtype: DType,
    task: &str,
) -> FfResult<Box<dyn CausalLm>> {
    let Some(config) = config else {
        return Err(Error::InvalidFile {
            path: path.to_path_buf(),
            detail: "expected a model folder with config.json or a .gguf file".into(),
        });
    };
    let model_type = config.model_type.as_str();
    if !CAUSAL_LM_TYPES.contains(&model_type) {
        return Err(Error::UnsupportedModel {
            model_type: model_type.to_string(),
            task: task.to_string(),
            supported: CAUSAL_LM_TYPES.join(", "),
        });
    }
    let weights = Weights::from_dir(path)?;
    let wpath = weights.path().to_path_buf();
    let wrap = |e: candle_core::Error| Error::Weights {
        path: wpath.clone(),
        detail: e.to_string(),
    };
    let has_transformer_prefix = weights.has_prefix("transformer");
    let vb = weights.into_var_builder(dtype, device);
    Ok(match model_type {
        "gpt2" => {
            let vb = if has_transformer_prefix {
                vb.pp("transformer")
            } else {
                vb
            };
            Box::new(super::gpt2::Gpt2::load(&config.parse()?, vb).map_err(wrap)?)
        }
        "bloom" => {
            let cfg: super::bloom::BloomConfig = config.parse()?;
            if let Some(p) = cfg.problem() {
                return Err(Error::invalid_file(&config.path, p));
            }
            Box::new(super::bloom::Bloom::load(&cfg, vb, has_transformer_prefix).map_err(wrap)?)
        }
        _ => {
            let cfg: super::llama::LlamaConfig = config.parse()?;
            Box::new(super::llama::Llama::load(&cfg, vb).map_err(wrap)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bias_is_causal_and_masks_padding() {
        let b = causal_bias(&[vec![0, 1, 1]], 3, &Device::Cpu).unwrap();
        let v: Vec<Vec<f32>> = b.squeeze(0).unwrap().squeeze(0).unwrap().to_vec2().unwrap();
        assert_eq!(v[0], [f32::MIN, f32::MIN, f32::MIN]);
        assert_eq!(v[1], [f32::MIN, 0.0, f32::MIN]);
        assert_eq!(v[2], [f32::MIN, 0.0, 0.0]);
        let b = causal_bias(&[vec![0, 1, 1]], 1, &Device::Cpu).unwrap();
        let v: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, [f32::MIN, 0.0, 0.0]);
    }
}
