//! Blocks shared by two or more architectures: activations, masks, multi-head attention.

use candle_core::{DType, Module, Result, Tensor, D};
use serde::Deserialize;

/// `config.hidden_act` / `activation`, with HF's names.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, Default)]
pub enum Activation {
    /// Exact (erf) GELU, HF's `gelu`.
    #[default]
    #[serde(rename = "gelu")]
    Gelu,
    /// Tanh approximation.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluNew,
    #[serde(rename = "relu")]
    Relu,
    #[serde(alias = "silu", alias = "swish")]
    Silu,
    #[serde(rename = "tanh")]
    Tanh,
}

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

/// erf for f32 as a rational polynomial on [-4, 4] (the form Eigen uses): a few ulp from the
/// exact value, and plain arithmetic (no `mul_add`, which is a libm call without FMA enabled at
/// build time), so the loop below vectorises (libm's scalar `erff` was a
/// fifth of encoder time).
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = -2.726_142_3e-10_f32;
    p = p * x2 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.9546e-3;
    p = p * x2 + -1.609_603_3e-2;
    let mut q = -1.456_607_2e-5_f32;
    q = q * x2 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    x * p / q
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
    let (b, h, s, d) = q.dims4()?;
    if s <= 4
        && q.device().is_cpu()
        && [q.dtype(), k.dtype(), v.dtype(), bias.dtype()]
            .iter()
            .all(|t| *t == DType::F32)
        && bias
            .dims4()
            .is_ok_and(|(bb, one, bs, _)| bb == b && one == 1 && bs == s)
    {
        return sdpa_few_queries(q, k, v, bias, scale);
    }
    let kv_h = k.dim(1)?;
    let t = k.dim(2)?;
    let n_rep = h / kv_h;
    // Group the query heads that share a kv head into the row dimension: no copy of k/v.
    let q = (q.reshape((b, kv_h, n_rep * s, d))? * scale)?;
    let k_t = k.transpose(2, 3)?.contiguous()?;
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
/// cached keys instead of a dozen candle ops (reshape, K^T copy, two matmuls, softmax) per
/// layer, which cost more than the arithmetic here.
fn sdpa_few_queries(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    let (b, h, s, d) = q.dims4()?;
    let (_, kv_h, t, _) = k.dims4()?;
    let n_rep = h / kv_h;
    let (q, k, v, bias) = (
        q.contiguous()?,
        k.contiguous()?,
        v.contiguous()?,
        bias.contiguous()?,
    );
    let (qv, kv, vv, bv) = (cpu_f32(&q)?, cpu_f32(&k)?, cpu_f32(&v)?, cpu_f32(&bias)?);
    let scale = scale as f32;
    let mut out = vec![0f32; b * s * h * d];
    let mut scores = vec![0f32; t];
    for bi in 0..b {
        for hh in 0..h {
            let kh = hh / n_rep;
            let kbase = (bi * kv_h + kh) * t * d;
            for i in 0..s {
                let qrow = &qv[((bi * h + hh) * s + i) * d..][..d];
                let brow = &bv[(bi * s + i) * t..][..t];
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = crate::simd::dot16(qrow, &kv[kbase + j * d..][..d]) * scale + brow[j];
                }
                let m = crate::simd::max16(&scores);
                for sc in scores.iter_mut() {
                    *sc = super::encoder_stack::fast_exp(*sc - m);
                }
                let inv = 1.0 / crate::simd::sum16(&scores);
                let orow = &mut out[((bi * s + i) * h + hh) * d..][..d];
                for (j, &p) in scores.iter().enumerate() {
                    let p = p * inv;
                    for (o, &x) in orow.iter_mut().zip(&vv[kbase + j * d..][..d]) {
                        *o += p * x;
                    }
                }
            }
        }
    }
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

thread_local! {
    static IN_WORKER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True inside [`as_worker`]: kernels run on the calling thread only.
pub fn in_worker() -> bool {
    IN_WORKER.with(|w| w.get())
}

/// Run `f` as one of several data-parallel workers: its matmuls stay on this thread instead of
/// fanning out (the other cores are busy with the other workers' inputs).
pub fn as_worker<R>(f: impl FnOnce() -> R) -> R {
    let prev = IN_WORKER.with(|w| w.replace(true));
    let r = f();
    IN_WORKER.with(|w| w.set(prev));
    r
}

/// `a [m, k] @ b [k, n]` (both contiguous f32 on CPU) on the calling thread; other cases go
/// through candle's matmul.
pub fn serial_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    use candle_core::Storage;
    let (m, k) = a.dims2()?;
    let (k2, n) = b.dims2()?;
    if k != k2 || !a.device().is_cpu() || a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return a.matmul(b);
    }
    let (Some((a0, a1)), Some((b0, b1))) = (
        a.layout().contiguous_offsets(),
        b.layout().contiguous_offsets(),
    ) else {
        return a.matmul(b);
    };
    let (sa, _) = a.storage_and_layout();
    let (sb, _) = b.storage_and_layout();
    let (
        Storage::Cpu(candle_core::CpuStorage::F32(av)),
        Storage::Cpu(candle_core::CpuStorage::F32(bv)),
    ) = (&*sa, &*sb)
    else {
        return a.matmul(b);
    };
    let av = &av[a0..a1];
    let bv = &bv[b0..b1];
    let mut out = vec![0f32; m * n];
    super::cpu_linear::gemm_into(
        av,
        m,
        k,
        bv,
        n,
        super::cpu_linear::Layout::InOut,
        &mut out,
        false,
        false,
    );
    drop(sa);
    drop(sb);
    Tensor::from_vec(out, (m, n), a.device())
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

    #[test]
    fn fast_erf_is_accurate() {
        let mut worst = 0f64;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            let err = (fast_erf(x) as f64 - libm_erf(x as f64)).abs();
            worst = worst.max(err);
        }
        assert!(worst < 1e-6, "max |fast_erf - erf| = {worst}");
    }

    /// erf in f64 (Abramowitz-Stegun 7.1.28 is too coarse; use the series/continued fraction).
    fn libm_erf(x: f64) -> f64 {
        // Series for |x| < 3, asymptotic complement beyond.
        if x.abs() < 3.0 {
            let mut sum = x;
            let mut term = x;
            let x2 = x * x;
            for n in 1..200 {
                term *= -x2 / n as f64;
                sum += term / (2 * n + 1) as f64;
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            // erfc(x) ~ exp(-x^2)/(x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - ...)
            let a = x.abs();
            let t = 1.0 / (2.0 * a * a);
            let erfc = (-a * a).exp() / (a * std::f64::consts::PI.sqrt())
                * (1.0 - t + 3.0 * t * t - 15.0 * t * t * t);
            x.signum() * (1.0 - erfc)
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
