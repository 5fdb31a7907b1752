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
    /// Greedy steps: the output projection may be screened
    /// ([`crate::kernels::cpu::split8`]); these tokens (the ones a logits processor may
    /// suppress) are always computed in full.
    screen: Option<std::sync::Arc<Vec<u32>>>,
}

/// Positions copied (rows times kept positions, summed over the parts) from which
/// [`KvCache::join`] copies its layers on every core instead of one: a single new row's
/// prefix is not worth waking the pool for.
const PARALLEL_JOIN_POSITIONS: usize = 256;

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![None; num_layers],
            cpu: Vec::new(),
            screen: None,
        }
    }

    /// Let the last-position logits of the following steps be screened (greedy search that
    /// reads only the argmax), `always` computed in full; `None` turns it off.
    pub fn set_screen(&mut self, always: Option<std::sync::Arc<Vec<u32>>>) {
        self.screen = always;
    }

    /// The tokens always computed in full, when the logits may be screened.
    pub fn screen(&self) -> Option<&[u32]> {
        self.screen.as_deref().map(|v| v.as_slice())
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

    /// The plain buffers of a CPU fast path: made empty (`rows` x `heads` x `dim` per layer,
    /// values kept in f16 when `f16`: [`KvBuffer::new_f16`]) on first use, an error if tensors
    /// were cached already.
    pub fn buffers(
        &mut self,
        rows: usize,
        heads: usize,
        dim: usize,
        f16: bool,
    ) -> Result<&mut [KvBuffer]> {
        if self.cpu.is_empty() {
            if self.layers.iter().any(Option::is_some) {
                candle_core::bail!("this KV cache already holds tensors");
            }
            let b = if f16 {
                KvBuffer::new_f16(rows, heads, dim)
            } else {
                KvBuffer::new(rows, heads, dim)
            };
            self.cpu = vec![b; self.layers.len()];
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

    /// Whether [`Self::append_rows`] can apply (the CPU buffers of the Llama family's path).
    pub fn appends_in_place(&self) -> bool {
        !self.cpu.is_empty()
    }

    /// [`KvCache::join`] of this cache and `parts` into this one (CPU buffers, every part's
    /// `n` within this cache's length): only the new rows are copied, each with room for
    /// `room` more positions. `false` (nothing changed) where that does not apply; then `join`.
    pub fn append_rows(&mut self, parts: &[(&KvCache, usize)], room: usize) -> bool {
        let parts: Vec<(&KvCache, usize)> = parts
            .iter()
            .filter(|(c, _)| !c.is_empty())
            .copied()
            .collect();
        let len = self.seq_len();
        if self.cpu.is_empty()
            || parts
                .iter()
                .any(|&(c, n)| c.cpu.len() != self.cpu.len() || n.min(c.seq_len()) > len)
        {
            return false;
        }
        for (l, buf) in self.cpu.iter_mut().enumerate() {
            let layer: Vec<(&KvBuffer, usize)> =
                parts.iter().map(|&(c, n)| (&c.cpu[l], n)).collect();
            // Checked above for every layer (all layers hold the same positions).
            let done = buf.append_rows(&layer, room);
            debug_assert!(done);
        }
        true
    }

    /// The rows of several caches as one, in order: from part `(c, n)` every row's first `n`
    /// positions (at most its length), all right-aligned to the longest `n` (shorter rows
    /// left-padded with zeros, which their attention masks hide). Empty caches add nothing.
    /// Every value is copied once (continuous batching joins a whole group of new sequences,
    /// each from a kept prefix, and then the group to the running batch). CPU buffers get
    /// room for `room` more positions per row (as many as the rows may still grow: a row's
    /// vectors then never grow again).
    pub fn join(parts: &[(&KvCache, usize)], room: usize) -> Result<KvCache> {
        let num_layers = parts.first().map_or(0, |(c, _)| c.layers.len());
        let parts: Vec<(&KvCache, usize)> = parts
            .iter()
            .filter(|(c, _)| !c.is_empty())
            .map(|&(c, n)| (c, n.min(c.seq_len())))
            .collect();
        let Some(&(first, _)) = parts.first() else {
            return Ok(KvCache::new(num_layers));
        };
        let cpu = !first.cpu.is_empty();
        if parts
            .iter()
            .any(|(c, _)| c.cpu.is_empty() == cpu || c.layers.len() != first.layers.len())
        {
            candle_core::bail!("KV caches of different kinds cannot be joined");
        }
        let len = parts.iter().map(|&(_, n)| n).max().unwrap_or(0);
        if cpu {
            let join_layer = |l: usize| {
                let layer: Vec<(&KvBuffer, usize)> =
                    parts.iter().map(|&(c, n)| (&c.cpu[l], n)).collect();
                KvBuffer::join(&layer, room)
            };
            // A large join (a burst of new rows, each from a kept prefix) copies its layers on
            // every core: 16 SmolLM2 rows of 40 positions took 3.4 ms on one (Xeon, session
            // 45), a pass's first tokens waiting for it.
            let positions: usize = parts.iter().map(|&(c, n)| c.cpu[0].rows() * n).sum();
            let bufs = if positions >= PARALLEL_JOIN_POSITIONS {
                let done: Vec<std::sync::OnceLock<Result<KvBuffer>>> =
                    (0..first.cpu.len()).map(|_| Default::default()).collect();
                crate::kernels::cpu::threads::par_tasks(done.len(), |l| {
                    let _ = done[l].set(join_layer(l));
                });
                done.into_iter()
                    .map(|d| d.into_inner().expect("every layer joined"))
                    .collect::<Result<Vec<_>>>()?
            } else {
                (0..first.cpu.len())
                    .map(join_layer)
                    .collect::<Result<Vec<_>>>()?
            };
            return Ok(KvCache {
                screen: None,
                layers: vec![None; first.layers.len()],
                cpu: bufs,
            });
        }
        let mut layers = Vec::with_capacity(first.layers.len());
        for l in 0..first.layers.len() {
            let mut ks = Vec::with_capacity(parts.len());
            let mut vs = Vec::with_capacity(parts.len());
            for &(c, n) in &parts {
                let Some((k, v)) = &c.layers[l] else {
                    candle_core::bail!("KV caches with missing layers cannot be joined");
                };
                let pad = |t: &Tensor| -> Result<Tensor> {
                    let t = t.narrow(2, 0, n)?;
                    let (r, h, _, d) = t.dims4()?;
                    if n == len {
                        return Ok(t);
                    }
                    let z = Tensor::zeros((r, h, len - n, d), t.dtype(), t.device())?;
                    Tensor::cat(&[&z, &t], 2)
                };
                ks.push(pad(k)?);
                vs.push(pad(v)?);
            }
            layers.push(Some((
                Tensor::cat(&ks, 0)?.contiguous()?,
                Tensor::cat(&vs, 0)?.contiguous()?,
            )));
        }
        Ok(KvCache {
            screen: None,
            layers,
            cpu: Vec::new(),
        })
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
        Ok(KvCache {
            layers,
            cpu,
            screen: None,
        })
    }

    /// [`KvCache::extract_row`] for a row that is leaving the batch: on CPU its keys and
    /// values are moved out ([`KvBuffer::take_row`]), not copied, and the row is left empty.
    /// `positions` ascending.
    pub fn take_row(&mut self, r: usize, positions: &[usize]) -> Result<KvCache> {
        if self.cpu.is_empty() {
            return self.extract_row(r, positions);
        }
        Ok(KvCache {
            layers: vec![None; self.layers.len()],
            cpu: self
                .cpu
                .iter_mut()
                .map(|b| b.take_row(r, positions))
                .collect(),
            screen: None,
        })
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

thread_local! {
    /// [`with_layer_hook`]'s hook while its pass runs on this thread.
    static LAYER_HOOK: std::cell::Cell<Option<*mut (dyn FnMut() -> bool + 'static)>> =
        const { std::cell::Cell::new(None) };
}

/// Run `f` with `hook` called between the layers of every decoder forward pass `f` runs on
/// this thread (at [`layer_boundary`]; the CPU Llama-family pass calls it before each
/// layer). The hook may run forward passes of its own (on other caches): they do not call
/// it again. A continuous batch uses it to run a new request's prompt while a decoding step
/// is under way, so that its first token need not wait for the step's end. The hook answers
/// whether the pass should stop there (see [`layer_boundary`]).
pub fn with_layer_hook<R>(hook: &mut dyn FnMut() -> bool, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<*mut (dyn FnMut() -> bool + 'static)>);
    impl Drop for Restore {
        fn drop(&mut self) {
            LAYER_HOOK.with(|h| h.set(self.0.take()));
        }
    }
    let p: *mut (dyn FnMut() -> bool + '_) = hook;
    // SAFETY: only the lifetime bound is erased. The pointer lives in this thread's slot
    // only while `f` runs (`Restore` puts the previous one back when this function returns
    // or unwinds), `hook` is borrowed mutably for all that time (nothing else reaches it),
    // and `layer_boundary` calls it on this thread only.
    let p: *mut (dyn FnMut() -> bool + 'static) = unsafe { std::mem::transmute(p) };
    let _restore = Restore(LAYER_HOOK.with(|h| h.replace(Some(p))));
    f()
}

/// Between two layers of a forward pass: the hook [`with_layer_hook`] set on this thread,
/// if any (taken out of the slot while it runs, so the passes it runs do not call it).
/// True when the hook asks the pass to stop here: the pass then fails, leaving its cache
/// half-written (only a pass over a cache of its own may be stopped).
pub fn layer_boundary() -> bool {
    struct PutBack(*mut (dyn FnMut() -> bool + 'static));
    impl Drop for PutBack {
        fn drop(&mut self) {
            LAYER_HOOK.with(|h| h.set(Some(self.0)));
        }
    }
    match LAYER_HOOK.with(std::cell::Cell::take) {
        Some(p) => {
            let back = PutBack(p);
            // SAFETY: see `with_layer_hook`: the hook is alive and reached only from here,
            // and not re-entered (the slot is empty while it runs).
            unsafe { (*back.0)() }
        }
        None => false,
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

    /// Get ready for batched decoding steps (continuous batching): GGUF matrices make the
    /// int8 panels those steps keep now rather than at the first one.
    fn prepare_batched_steps(&self) {}

    /// Whether [`CausalLm::make_batch_invariant`] would succeed and cost no speed: every
    /// product decodes as fast through its kept panels on this CPU
    /// ([`crate::kernels::cpu::quantized::QuantLinear::batch_invariance_costs_nothing`]).
    fn batch_invariance_costs_nothing(&self) -> bool {
        false
    }

    /// Make every later forward pass batch-invariant: a sequence's logits the same bits
    /// whatever other sequences share its passes, however its prompt is cut into chunks and
    /// whatever its padding, so that a server's answers never depend on the load. An error
    /// says why a model cannot (then nothing changed).
    fn make_batch_invariant(&mut self) -> std::result::Result<(), String> {
        Err(
            "only GGUF models of the Llama family (Llama, Mistral, Qwen2, Gemma 3) in the \
             int8 mode have batch-invariant arithmetic"
                .into(),
        )
    }
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
        self.forward_rows(x, rows, false)
    }

    /// [`Self::forward_vec`]; `step`: the rows are one decoding step of a batch (one new
    /// token each), where GGUF blocks keep their int8 panels
    /// ([`QuantLinear::matmul_step`]).
    pub fn forward_rows(&self, x: &[f32], rows: usize, step: bool) -> Result<Vec<f32>> {
        let (mut y, bias) = match self {
            Proj::Blocks(q, b) if step => (q.matmul_step(x, rows), b.as_ref()),
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

    /// [`QuantLinear::keep_panels`] for GGUF blocks; nothing for the other kinds.
    pub fn keep_panels(&self) {
        if let Proj::Blocks(q, _) = self {
            q.keep_panels();
        }
    }

    /// [`QuantLinear::batch_invariance_problem`] for GGUF blocks; other kinds have no
    /// batch-invariant product.
    pub fn batch_invariance_problem(&self) -> Option<String> {
        match self {
            Proj::Blocks(q, _) => q.batch_invariance_problem(),
            Proj::Dense(_) => Some("dense weights have no batch-invariant product".into()),
            Proj::Quantized(..) => {
                Some("candle's quantized products have no batch-invariant order".into())
            }
        }
    }

    /// [`QuantLinear::batch_invariance_costs_nothing`] for GGUF blocks; false for the other
    /// kinds.
    pub fn batch_invariance_costs_nothing(&self) -> bool {
        matches!(self, Proj::Blocks(q, _) if q.batch_invariance_costs_nothing())
    }

    /// [`QuantLinear::make_batch_invariant`] for GGUF blocks; an error for the other kinds.
    pub fn make_batch_invariant(&mut self) -> std::result::Result<(), String> {
        match self {
            Proj::Blocks(q, _) => q.make_batch_invariant(),
            _ => Err(self.batch_invariance_problem().unwrap_or_default()),
        }
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

/// Greedy decoding's logits `[b, 1, vocab]` screened where they are computed (a GPU): each row
/// comes to the host as its largest value outside `always` (at its first index, as an argmax
/// on the host picks it) and the exact values of the `always` tokens (those a logits processor
/// may suppress); every other token is -inf. A greedy step then picks what it would pick from
/// the whole row, while a few numbers per row cross to the host instead of the whole
/// vocabulary (32 rows of 49k f32 are 6 MB per step).
pub fn screen_logits(logits: &Tensor, always: &[u32]) -> Result<Tensor> {
    let (b, one, v) = logits.dims3()?;
    let dev = logits.device();
    let rows = logits.reshape((b * one, v))?.to_dtype(DType::F32)?;
    let always: Vec<u32> = always
        .iter()
        .copied()
        .filter(|&t| (t as usize) < v)
        .collect();
    let rest = if always.is_empty() {
        rows.clone()
    } else {
        let mut hide = vec![0f32; v];
        for &t in &always {
            hide[t as usize] = f32::NEG_INFINITY;
        }
        rows.broadcast_add(&Tensor::from_vec(hide, v, dev)?)?
    };
    let best = rest.max_keepdim(1)?;
    // The first index holding the maximum: positions, or `v` where the row is below it.
    let index = Tensor::arange(0u32, v as u32, dev)?
        .to_dtype(DType::F32)?
        .broadcast_as((b * one, v))?;
    let none = Tensor::full(v as f32, (b * one, v), dev)?;
    let first = rest
        .broadcast_eq(&best)?
        .where_cond(&index, &none)?
        .min_keepdim(1)?;
    let mut parts = vec![best, first];
    if !always.is_empty() {
        parts.push(rows.index_select(&Tensor::new(always.as_slice(), dev)?, 1)?);
    }
    // One copy to the host: [max, index, always...] per row.
    let small: Vec<Vec<f32>> = Tensor::cat(&parts, 1)?.to_vec2()?;
    let mut out = vec![f32::NEG_INFINITY; b * one * v];
    for (row, vals) in out.chunks_exact_mut(v).zip(&small) {
        let at = vals[1] as usize;
        if at < v {
            row[at] = vals[0];
        }
        for (&t, &x) in always.iter().zip(&vals[2..]) {
            row[t as usize] = x;
        }
    }
    Tensor::from_vec(out, (b, one, v), &Device::Cpu)
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
    /// Ones in the weight's dtype, on a GPU: candle's fused RMS kernel scales the rows with
    /// them (one kernel instead of eight), and the weight multiplies after the cast.
    ones: Option<Tensor>,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        let ones = if weight.device().is_cpu() {
            None
        } else {
            weight.ones_like().ok()
        };
        Self { weight, eps, ones }
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
    /// HF's `LlamaRMSNorm`: the rows normalised in f32 (`x * rsqrt(mean(x^2) + eps)`), cast
    /// back to the input dtype, then multiplied by the weight in that dtype.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(ones) = self.ones.as_ref().filter(|o| o.dtype() == xs.dtype()) {
            // The kernel computes `scale * x * 1` in f32 and rounds once to the input dtype:
            // the same normalise-then-cast, fused (a decoding step is bound by kernel launches
            // on a GPU: this is 2 launches per norm instead of 9).
            let normed = candle_nn::ops::rms_norm(&xs.contiguous()?, ones, self.eps as f32)?;
            return normed.broadcast_mul(&self.weight);
        }
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
            let cfg: super::llama::LlamaConfig = config.parse_checked()?;
            Box::new(super::llama::Llama::load(&cfg, vb).map_err(wrap)?)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hook runs at each boundary inside `with_layer_hook` and nowhere else: not for
    /// boundaries its own work reaches (nested passes), not after the scope, also not after
    /// a panic inside it; an inner scope's hook holds only inside it; its answer is the
    /// boundary's.
    #[test]
    fn layer_hooks_are_scoped_and_not_reentered() {
        let calls = std::cell::Cell::new(0);
        let inner_calls = std::cell::Cell::new(0);
        assert!(!layer_boundary());
        let mut hook = || {
            calls.set(calls.get() + 1);
            // A pass the hook runs: its boundaries do not call the hook again.
            assert!(!layer_boundary());
            assert!(!layer_boundary());
            calls.get() == 2
        };
        let stops = with_layer_hook(&mut hook, || {
            let mut stops = vec![layer_boundary(), layer_boundary()];
            let mut inner = || {
                inner_calls.set(inner_calls.get() + 1);
                true
            };
            stops.push(with_layer_hook(&mut inner, layer_boundary));
            stops.push(layer_boundary());
            stops
        });
        assert_eq!(stops, [false, true, true, false]);
        assert_eq!((calls.get(), inner_calls.get()), (3, 1));
        assert!(!layer_boundary());
        assert_eq!(calls.get(), 3);
        let mut boom = || panic!("hook failed");
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            with_layer_hook(&mut boom, layer_boundary)
        }));
        assert!(r.is_err());
        assert!(!layer_boundary());
        assert_eq!(calls.get(), 3);
    }

    /// Screened rows pick what the whole rows pick, with or without `always` tokens, ties
    /// going to the first index; the `always` values are exact.
    #[test]
    fn screened_logits_keep_the_greedy_choice() {
        use crate::generation::logits::argmax;
        let dev = Device::Cpu;
        let v = 40;
        let mut data = crate::kernels::cpu::test_values(3 * v, 11, 5.0);
        // Row 1: a tie for the maximum at 7 and 30; row 2: its maximum is an `always` token.
        data[v + 7] = 9.0;
        data[v + 30] = 9.0;
        data[2 * v + 5] = 12.0;
        let logits = Tensor::from_vec(data.clone(), (3, 1, v), &dev).unwrap();
        for always in [vec![], vec![5u32, 30], vec![5, 99]] {
            let got: Vec<Vec<f32>> = screen_logits(&logits, &always)
                .unwrap()
                .squeeze(1)
                .unwrap()
                .to_vec2()
                .unwrap();
            for (r, row) in got.iter().enumerate() {
                let full = &data[r * v..(r + 1) * v];
                for &t in always.iter().filter(|&&t| (t as usize) < v) {
                    assert_eq!(row[t as usize], full[t as usize], "row {r} token {t}");
                }
                assert_eq!(argmax(row), argmax(full), "row {r} always {always:?}");
                // With the `always` tokens suppressed (as min_new_tokens does to eos), the
                // choice is the whole row's choice among the others.
                let (mut a, mut b) = (row.clone(), full.to_vec());
                for &t in always.iter().filter(|&&t| (t as usize) < v) {
                    a[t as usize] = f32::NEG_INFINITY;
                    b[t as usize] = f32::NEG_INFINITY;
                }
                assert_eq!(
                    argmax(&a),
                    argmax(&b),
                    "row {r} always {always:?}, suppressed"
                );
            }
        }
    }

    /// The fused norm a GPU runs (candle's RMS kernel over ones, then the weight) gives what
    /// the step-by-step norm gives: f32 within rounding, bf16 within one bf16 step.
    #[test]
    fn fused_rms_norm_equals_the_plain_one() {
        let dev = Device::Cpu;
        let (rows, h) = (5, 48);
        let x = crate::kernels::cpu::test_values(rows * h, 7, 3.0);
        let w = crate::kernels::cpu::test_values(h, 8, 1.5);
        for (dtype, tol) in [(DType::F32, 1e-5f32), (DType::BF16, 2e-2)] {
            let xs = Tensor::from_vec(x.clone(), (1, rows, h), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let wt = Tensor::from_vec(w.clone(), h, &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let plain = RmsNorm::new(wt.clone(), 1e-6);
            assert!(plain.ones.is_none(), "the CPU keeps the step-by-step norm");
            let fused = RmsNorm {
                ones: Some(wt.ones_like().unwrap()),
                ..plain.clone()
            };
            let values = |norm: &RmsNorm| -> Vec<f32> {
                let y = norm.forward(&xs).unwrap().to_dtype(DType::F32).unwrap();
                y.flatten_all().unwrap().to_vec1().unwrap()
            };
            let (a, b) = (values(&plain), values(&fused));
            for (i, (p, f)) in a.iter().zip(&b).enumerate() {
                assert!(
                    (p - f).abs() <= tol * p.abs().max(1.0),
                    "{dtype:?} value {i}: {p} vs {f}"
                );
            }
        }
    }

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

    /// A one-layer cache of `rows` rows and `len` positions (2 heads x 3 dims), each value
    /// naming its row (`tag + row`), head and position; as tensors or as CPU buffers.
    fn cache(rows: usize, len: usize, tag: f32, cpu: bool) -> KvCache {
        let val = |r: usize, h: usize, p: usize, d: usize| {
            tag + r as f32 + h as f32 / 10.0 + p as f32 / 100.0 + d as f32 / 1000.0
        };
        let mut c = KvCache::new(1);
        if cpu {
            let b = &mut c.buffers(rows, 2, 3, false).unwrap()[0];
            b.reserve(len);
            for (r, h, p) in
                (0..rows).flat_map(|r| (0..2).flat_map(move |h| (0..len).map(move |p| (r, h, p))))
            {
                let k: Vec<f32> = (0..3).map(|d| val(r, h, p, d)).collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                b.put(r, h, p, &k, &v);
            }
            b.set_len(len);
        } else {
            let k: Vec<f32> = (0..rows * 2 * len * 3)
                .map(|i| val(i / (2 * len * 3), i / (len * 3) % 2, i / 3 % len, i % 3))
                .collect();
            let k = Tensor::from_vec(k, (rows, 2, len, 3), &Device::Cpu).unwrap();
            c.layers[0] = Some((k.clone(), k.neg().unwrap()));
        }
        c
    }

    /// Keys of every row, head and position of a one-layer cache (either kind).
    fn keys(c: &KvCache) -> Vec<Vec<Vec<f32>>> {
        let len = c.seq_len();
        if let Some(b) = c.cpu.first() {
            return (0..b.rows())
                .map(|r| (0..2).map(|h| b.get(r, h, len).0.to_vec()).collect())
                .collect();
        }
        let (k, _) = c.layers[0].as_ref().unwrap();
        let (rows, heads, s, d) = k.dims4().unwrap();
        let flat: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        (0..rows)
            .map(|r| {
                (0..heads)
                    .map(|h| flat[(r * heads + h) * s * d..(r * heads + h + 1) * s * d].to_vec())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn join_takes_each_parts_first_positions_right_aligned() {
        for cpu in [false, true] {
            let (a, b, c) = (
                cache(1, 5, 10.0, cpu),
                cache(2, 7, 20.0, cpu),
                cache(1, 4, 30.0, cpu),
            );
            // a's first 5, b's first 3 (of 7), c's first 4: right-aligned to 5.
            let j = KvCache::join(&[(&a, 5), (&b, 3), (&c, 9)], 16).unwrap();
            assert_eq!(j.seq_len(), 5, "cpu={cpu}");
            let got = keys(&j);
            assert_eq!(got.len(), 4);
            let (ka, kb, kc) = (keys(&a), keys(&b), keys(&c));
            for h in 0..2 {
                assert_eq!(got[0][h], ka[0][h], "cpu={cpu}");
                for (row, src) in [(1, &kb[0]), (2, &kb[1])] {
                    assert_eq!(got[row][h][..6], [0.0; 6], "left padding, cpu={cpu}");
                    assert_eq!(got[row][h][6..], src[h][..9], "cpu={cpu}");
                }
                assert_eq!(got[3][h][..3], [0.0; 3], "cpu={cpu}");
                assert_eq!(got[3][h][3..], kc[0][h][..], "cpu={cpu}");
            }
            // Joining in two steps (b and c first, then a before them) gives the same.
            let bc = KvCache::join(&[(&b, 3), (&c, 9)], 16).unwrap();
            let two_steps = KvCache::join(&[(&a, 5), (&bc, 4)], 16).unwrap();
            assert_eq!(keys(&two_steps), got, "cpu={cpu}");
            // Empty caches add nothing; no parts give an empty cache.
            let e = KvCache::new(1);
            assert_eq!(keys(&KvCache::join(&[(&e, 0), (&c, 4)], 16).unwrap()), kc);
            assert!(KvCache::join(&[(&e, 0)], 16).unwrap().is_empty());
        }
        let err = KvCache::join(
            &[(&cache(1, 2, 0.0, true), 2), (&cache(1, 2, 0.0, false), 2)],
            16,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("different kinds"), "{err}");
    }

    /// A join large enough to copy its layers on every core gives each layer its own rows,
    /// as the one-core join does.
    #[test]
    fn a_large_join_keeps_every_layer_its_own() {
        let (rows, len, layers) = (20, 16, 5);
        assert!(rows * (len + len - 4) >= PARALLEL_JOIN_POSITIONS);
        let mut c = KvCache::new(layers);
        for (l, b) in c.buffers(rows, 2, 3, false).unwrap().iter_mut().enumerate() {
            b.reserve(len);
            for (r, h, p) in
                (0..rows).flat_map(|r| (0..2).flat_map(move |h| (0..len).map(move |p| (r, h, p))))
            {
                let k: Vec<f32> = (0..3)
                    .map(|d| (l * 1000 + r * 10 + h) as f32 + p as f32 / 100.0 + d as f32 / 1e4)
                    .collect();
                let v: Vec<f32> = k.iter().map(|x| -x).collect();
                b.put(r, h, p, &k, &v);
            }
            b.set_len(len);
        }
        let j = KvCache::join(&[(&c, len), (&c, len - 4)], 8).unwrap();
        assert_eq!(j.cpu.len(), layers);
        for (l, got) in j.cpu.iter().enumerate() {
            let one = KvBuffer::join(&[(&c.cpu[l], len), (&c.cpu[l], len - 4)], 8).unwrap();
            assert_eq!(got.rows(), 2 * rows);
            for (r, h) in (0..2 * rows).flat_map(|r| (0..2).map(move |h| (r, h))) {
                assert_eq!(
                    got.get(r, h, len),
                    one.get(r, h, len),
                    "layer {l} row {r} head {h}"
                );
            }
            // The first part's rows are the cache's own, this layer's values.
            assert_eq!(got.get(3, 1, len), c.cpu[l].get(3, 1, len), "layer {l}");
        }
    }
}
