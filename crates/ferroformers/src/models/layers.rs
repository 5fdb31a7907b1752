//! Blocks shared by two or more architectures: activations, masks, multi-head attention.
//!
//! These are candle ops; on CPU f32 some of them hand their loops to `kernels::cpu` (exact GELU,
//! `sdpa` for a few query rows, `Linear` in worker mode). The tests at the end check each
//! against the candle ops.

use candle_core::{DType, Module, Result, Tensor, D};

use crate::kernels::cpu::attention::attend_few_queries;
use crate::kernels::cpu::linear::{gemm_into, Layout};
use crate::kernels::cpu::rowops::fast_erf;
/// The activations' names and row loops are the kernels'; the candle ops are below.
pub use crate::kernels::cpu::rowops::Activation;
/// Worker mode lives with the kernels; re-exported for the models and pipelines that set it.
pub use crate::kernels::cpu::threads::{as_worker, in_worker};

impl Module for Activation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Activation::Gelu => gelu_erf(xs),
            Activation::GeluNew => xs.gelu(),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
            Activation::Tanh => xs.tanh(),
        }
    }
}

struct GeluErf;

impl candle_core::CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-fast"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(data) = storage else {
            candle_core::bail!("gelu-erf-fast: f32 only")
        };
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf-fast: contiguous input only")
        };
        let out: Vec<f32> = data[start..end]
            .iter()
            .map(|&x| 0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2)))
            .collect();
        Ok((candle_core::CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Exact-erf GELU (HF's `gelu`), vectorised on CPU f32.
pub fn gelu_erf(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && xs.is_contiguous() {
        xs.apply_op1_no_bwd(&GeluErf)
    } else {
        xs.gelu_erf()
    }
}

/// `[b, s]` 0/1 mask -> additive bias `[b, 1, 1, s]`: 0 where attended, dtype-min where padded.
pub fn attention_bias(mask: &Tensor, dtype: DType) -> Result<Tensor> {
    let (b, s) = mask.dims2()?;
    let mask = mask.to_dtype(dtype)?;
    let min = match dtype {
        DType::F16 => -65504.0,
        DType::BF16 => -3.389_531_4e38,
        _ => f32::MIN as f64,
    };
    ((mask.ones_like()? - mask)? * min)?.reshape((b, 1, 1, s))
}

/// `[b, s, h*d]` -> `[b, h, s, d]`.
pub fn split_heads(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, s, hd) = xs.dims3()?;
    xs.reshape((b, s, num_heads, hd / num_heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// `[b, s, h*d]` -> `[b, h, d, s]`, contiguous.
fn xs_t(xs: &Tensor, num_heads: usize) -> Result<Tensor> {
    let (b, s, hd) = xs.dims3()?;
    xs.reshape((b, s, num_heads, hd / num_heads))?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

/// Scaled dot-product attention over already projected `q`, `k`, `v` (`[b, s, h*d]`), with an
/// additive `bias` broadcastable to `[b, h, s, s]`. Returns `[b, s, h*d]`.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    num_heads: usize,
) -> Result<Tensor> {
    let (b, s, hd) = q.dims3()?;
    let scale = 1.0 / ((hd / num_heads) as f64).sqrt();
    let q = (split_heads(q, num_heads)? * scale)?;
    // K^T made contiguous: candle's matmul is much faster on a contiguous right-hand side.
    let k_t = xs_t(k, num_heads)?;
    let v = split_heads(v, num_heads)?;
    let scores = q.matmul(&k_t)?.broadcast_add(bias)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    probs
        .matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, hd))
}

/// Softmax attention of `q` `[b, h, s, d]` over `k`, `v` `[b, kv_h, t, d]` (grouped-query when
/// `kv_h < h`) with additive `bias` `[b, 1, s, t]`. Returns `[b, s, h*d]`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, _, s, _) = q.dims4()?;
    if s <= 4
        && q.device().is_cpu()
        && [q.dtype(), k.dtype(), v.dtype(), bias.dtype()]
            .iter()
            .all(|t| *t == DType::F32)
    {
        match bias.dims4() {
            Ok((bb, 1, bs, _)) if bb == b && bs == s => {
                return sdpa_few_queries(q, k, v, bias, scale)
            }
            // One causal bias for every row (beams): a few rows of it, copied.
            Ok((1, 1, bs, t)) if bs == s => {
                let bias = bias.broadcast_as((b, 1, s, t))?.contiguous()?;
                return sdpa_few_queries(q, k, v, &bias, scale);
            }
            _ => {}
        }
    }
    sdpa_candle(q, k, v, bias, scale)
}

/// [`sdpa`] in candle ops: GPU, other dtypes, and more than a few query rows.
fn sdpa_candle(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let kv_h = k.dim(1)?;
    let t = k.dim(2)?;
    let n_rep = h / kv_h;
    // Group the query heads that share a kv head into the row dimension: no copy of k/v.
    let q = q.reshape((b, kv_h, n_rep * s, d))?;
    let q = if scale == 1.0 { q } else { (q * scale)? };
    // cuBLAS reads K^T in place (a transposed operand); candle's CPU matmul wants it copied.
    let k_t = k.transpose(2, 3)?;
    let k_t = if k.device().is_cpu() {
        k_t.contiguous()?
    } else {
        k_t
    };
    let scores = q.matmul(&k_t)?.reshape((b, h, s, t))?;
    let scores = scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?;
    let probs = candle_nn::ops::softmax_last_dim(&scores)?;
    let out = probs.reshape((b, kv_h, n_rep * s, t))?.matmul(v)?;
    out.reshape((b, h, s, d))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b, s, h * d))
}

/// [`sdpa`] for a few query rows (decoding steps, beams) on CPU f32: plain loops over the
/// cached keys ([`attend_few_queries`]) instead of a dozen candle ops (reshape, K^T copy, two
/// matmuls, softmax) per layer, which cost more than the arithmetic here.
fn sdpa_few_queries(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (_, kv_h, t, _) = k.dims4()?;
    let (q, k, v, bias) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        bias.contiguous()?,
    );
    let (qv, kv, vv, bv) = (cpu_f32(&q)?, cpu_f32(&k)?, cpu_f32(&v)?, cpu_f32(&bias)?);
    let out = attend_few_queries(&qv, &kv, &vv, &bv, (b, h, s, d), (kv_h, t), scale as f32);
    Tensor::from_vec(out, (b, s, h * d), q.device())
}

/// The f32 data of a contiguous CPU tensor (a copy: cheap next to a dozen tensor ops).
fn cpu_f32(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all()?.to_vec1()
}

/// Row 0 of each sequence (`[b, s, h]` -> `[b, h]`): the `[CLS]`/`<s>` token.
pub fn first_token(xs: &Tensor) -> Result<Tensor> {
    xs.narrow(1, 0, 1)?.squeeze(1)
}

/// Mean over the last dim, kept (helper for pooling).
pub fn sum_keepdim_last(xs: &Tensor) -> Result<Tensor> {
    xs.sum_keepdim(D::Minus1)
}

/// `a [m, k] @ b [k, n]` (both contiguous f32 on CPU) on the calling thread; other cases go
/// through candle's matmul.
pub fn serial_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 {
        return a.matmul(b);
    }
    let out = with_cpu_f32(a, b, |av, bv| {
        let mut out = vec![0f32; m * n];
        gemm_into(av, m, k, bv, n, Layout::InOut, &mut out, false, false);
        out
    });
    match out {
        Some(out) => Tensor::from_vec(out, (m, n), a.device()),
        None => a.matmul(b),
    }
}

/// `f` over the f32 values of two contiguous CPU tensors (their storage borrowed meanwhile);
/// `None` for other devices, dtypes or layouts.
pub(crate) fn with_cpu_f32<R>(
    a: &Tensor,
    b: &Tensor,
    f: impl FnOnce(&[f32], &[f32]) -> R,
) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    if !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return None;
    }
    let (a0, a1) = a.layout().contiguous_offsets()?;
    let (b0, b1) = b.layout().contiguous_offsets()?;
    let (sa, _) = a.storage_and_layout();
    let (sb, _) = b.storage_and_layout();
    match (&*sa, &*sb) {
        (Storage::Cpu(CpuStorage::F32(av)), Storage::Cpu(CpuStorage::F32(bv))) => {
            Some(f(&av[a0..a1], &bv[b0..b1]))
        }
        _ => None,
    }
}

/// `f` over the values of a contiguous f32 CPU tensor; `None` for any other tensor.
pub(crate) fn with_cpu_f32_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Option<R> {
    use candle_core::{CpuStorage, Storage};
    if !t.device().is_cpu() || t.dtype() != DType::F32 {
        return None;
    }
    let (a0, a1) = t.layout().contiguous_offsets()?;
    let (st, _) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(CpuStorage::F32(v)) => Some(f(&v[a0..a1])),
        _ => None,
    }
}

/// `a + b` with `b` broadcast over `a`'s leading dimensions (`b`'s shape a suffix of `a`'s,
/// leading ones allowed), as candle's `broadcast_add`. Inside a data-parallel worker (one
/// batch per core) the sum runs on the calling thread: candle splits element-wise ops over
/// 64k values across its own thread pool, whose threads then spin against the other workers
/// (about a tenth of MiniLM's batch-32 run went to that). Same values as candle's add.
pub fn add_broadcast(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !crate::kernels::cpu::threads::in_worker() {
        return a.broadcast_add(b);
    }
    // b without its leading ones must be a's trailing dimensions: then b repeats along a.
    let bd = b.dims();
    let bd = &bd[bd.iter().position(|&d| d != 1).unwrap_or(bd.len())..];
    if bd.len() > a.rank() || a.dims()[a.rank() - bd.len()..] != *bd {
        return a.broadcast_add(b);
    }
    let sum = with_cpu_f32(a, b, |av, bv| {
        let mut out = Vec::with_capacity(av.len());
        for chunk in av.chunks_exact(bv.len().max(1)) {
            out.extend(chunk.iter().zip(bv).map(|(x, y)| x + y));
        }
        out
    });
    match sum {
        Some(out) if out.len() == a.elem_count() => Tensor::from_vec(out, a.shape(), a.device()),
        _ => a.broadcast_add(b),
    }
}

/// A linear layer `y = x W^T + b` that keeps `W^T` contiguous (`[in, out]`).
///
/// candle's CPU matmul is 4-7x slower on a transposed view than on a contiguous right-hand side
/// when few rows go in (one sentence, one decoding step), so the transpose is paid once at load.
#[derive(Debug, Clone)]
pub struct Linear {
    weight_t: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// `weight` in HF's `[out, in]` layout.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self {
            weight_t: weight.t()?.contiguous()?,
            bias,
        })
    }

    /// `W^T`, `[in, out]`.
    pub fn weight_t(&self) -> &Tensor {
        &self.weight_t
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let k = dims[dims.len() - 1];
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let xs2 = xs.reshape((rows, k))?;
        let ys = if in_worker() {
            serial_matmul(&xs2, &self.weight_t)?
        } else {
            xs2.matmul(&self.weight_t)?
        };
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.weight_t.dim(1)?;
        ys.reshape(out_dims)
    }
}

/// `nn.Linear(in_dim, out_dim)` from `vb` (`weight`, `bias`).
pub fn linear(in_dim: usize, out_dim: usize, vb: candle_nn::VarBuilder) -> Result<Linear> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = vb.get(out_dim, "bias")?;
    Linear::new(w, Some(b))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inside a worker, `add_broadcast` gives candle's `broadcast_add` bit for bit: a
    /// repeated suffix (positions), equal shapes (token types), a leading-one right side;
    /// shapes it does not take (a middle broadcast) fall back to candle.
    #[test]
    fn add_broadcast_matches_candle() {
        let dev = candle_core::Device::Cpu;
        let vals = |n: usize, seed: u64| crate::kernels::cpu::test_values(n, seed, 4.0);
        let a = Tensor::from_vec(vals(2 * 3 * 4, 1), (2, 3, 4), &dev).unwrap();
        let cases = [
            Tensor::from_vec(vals(12, 2), (1, 3, 4), &dev).unwrap(),
            Tensor::from_vec(vals(24, 3), (2, 3, 4), &dev).unwrap(),
            Tensor::from_vec(vals(4, 4), 4, &dev).unwrap(),
            Tensor::from_vec(vals(8, 5), (2, 1, 4), &dev).unwrap(),
        ];
        for b in &cases {
            let want: Vec<f32> = a
                .broadcast_add(b)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for worker in [false, true] {
                let run = || add_broadcast(&a, b).unwrap();
                let got = if worker {
                    crate::kernels::cpu::threads::as_worker(run)
                } else {
                    run()
                };
                assert_eq!(got.dims(), a.dims());
                let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
                let same = got
                    .iter()
                    .zip(&want)
                    .all(|(x, y)| x.to_bits() == y.to_bits());
                assert!(same, "{:?} (worker {worker})", b.dims());
            }
        }
    }

    /// `sdpa`'s loop for a few query rows against its candle ops: grouped-query heads, a
    /// masked key per row, and every query count the loop takes.
    #[test]
    fn few_queries_match_candle_ops() {
        let dev = candle_core::Device::Cpu;
        let mk = |seed: usize, shape: (usize, usize, usize, usize)| {
            let n = shape.0 * shape.1 * shape.2 * shape.3;
            let v: Vec<f32> = (0..n)
                .map(|j| ((j * 7919 + seed * 97) % 1000) as f32 / 500.0 - 1.0)
                .collect();
            Tensor::from_vec(v, shape, &dev).unwrap()
        };
        let (b, h, kv_h, t, d) = (2, 4, 2, 9, 8);
        for s in 1..=4 {
            let q = mk(1, (b, h, s, d));
            let k = mk(2, (b, kv_h, t, d));
            let v = mk(3, (b, kv_h, t, d));
            let bias: Vec<f32> = (0..b * s * t)
                .map(|i| if i % t == (i / t) % t { f32::MIN } else { 0.0 })
                .collect();
            let bias = Tensor::from_vec(bias, (b, 1, s, t), &dev).unwrap();
            let a = sdpa_few_queries(&q, &k, &v, &bias, 0.35).unwrap();
            let c = sdpa_candle(&q, &k, &v, &bias, 0.35).unwrap();
            assert_eq!(a.dims(), c.dims());
            let diff = crate::models::max_abs_diff(&a, &c);
            assert!(diff < 1e-5, "{s} queries: {diff}");
        }
    }

    #[test]
    fn gelu_matches_candle() {
        let xs = Tensor::arange(-500f32, 500f32, &candle_core::Device::Cpu)
            .unwrap()
            .affine(0.01, 0.0)
            .unwrap();
        let a: Vec<f32> = gelu_erf(&xs).unwrap().to_vec1().unwrap();
        let b: Vec<f32> = xs.gelu_erf().unwrap().to_vec1().unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-6, "{x} vs {y}");
        }
    }
}
