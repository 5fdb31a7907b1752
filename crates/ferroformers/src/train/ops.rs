//! Fused training ops for CPU f32, each with its backward pass: linear layers, LayerNorm,
//! softmax over the last dimension, and exact (erf) GELU. candle's composite versions (`layer_norm_slow`, `softmax`
//! from max/exp/sum/div, `gelu_erf` through libm) are correct but make 5-8 passes and
//! allocations per call, forward and backward; these make one, through the row kernels in
//! [`crate::kernels::cpu::rowops`], split over rayon's threads when large. Other devices and
//! dtypes use candle's ops ([`linear`], [`layer_norm`], [`softmax_last_dim`], [`gelu_erf`] pick).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor,
};
use rayon::prelude::*;

use crate::kernels::cpu::rowops::{
    activate, gelu_erf_grad, layer_norm_each, layer_norm_grad_rows, softmax_grad_rows,
    softmax_rows, Activation,
};

/// Below this many values a call stays on one thread.
const PAR_MIN: usize = 1 << 15;

/// A parameter's gradient, which the ops' backward passes add to in place (torch's `.grad`).
/// An op given slots returns no gradient for those inputs, so candle's backward pass skips
/// its own accumulation (a zero tensor plus an add per parameter, every step).
pub type GradSlot = std::sync::Arc<std::sync::Mutex<Vec<f32>>>;

/// `slot += v`, element by element.
fn add_into(slot: &GradSlot, v: &[f32]) -> Result<()> {
    let mut g = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg("gradient slot".into()))?;
    if g.len() != v.len() {
        candle_core::bail!("gradient slot of {} for {} values", g.len(), v.len());
    }
    g.par_chunks_mut(PAR_MIN)
        .zip(v.par_chunks(PAR_MIN))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(x, &y)| *x += y));
    Ok(())
}

/// Set by [`use_candle_ops`]: every op takes candle's path, as on a GPU.
static CANDLE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Make every training op take its candle path (what other devices and dtypes run) even on
/// CPU f32: the test of that path, on the machines CI has.
pub fn use_candle_ops(on: bool) {
    CANDLE_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether `t` goes through the fused CPU ops.
pub fn fused(t: &Tensor) -> bool {
    t.device().is_cpu()
        && t.dtype() == DType::F32
        && !CANDLE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

fn on_cpu_f32(t: &Tensor) -> bool {
    fused(t)
}

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(d) = s else {
        candle_core::bail!("{op}: f32 only")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: contiguous input only")
    };
    Ok(&d[a..b])
}

/// Run `f` on the values of `t` (made contiguous first).
fn with_values<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*st else {
        candle_core::bail!("training ops: CPU tensors only")
    };
    f(f32_slice(cs, l, "training op")?)
}

/// Rows of `width` in chunks of about [`PAR_MIN`] values, over rayon's threads when large.
fn rows_chunks(len: usize, width: usize) -> usize {
    let rows = (PAR_MIN / width.max(1)).max(1);
    if len >= 2 * PAR_MIN {
        rows * width
    } else {
        len.max(width)
    }
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "train-gelu-erf"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = f32_slice(s, l, self.name())?.to_vec();
        out.par_chunks_mut(PAR_MIN)
            .for_each(|c| activate(c, Activation::Gelu));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let out = with_values(arg, |x| {
            with_values(grad, |g| {
                let mut out = vec![0f32; x.len()];
                out.par_chunks_mut(PAR_MIN)
                    .zip(x.par_chunks(PAR_MIN).zip(g.par_chunks(PAR_MIN)))
                    .for_each(|(o, (x, g))| gelu_erf_grad(x, g, o));
                Ok(out)
            })
        })?;
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

struct SoftmaxLastDim;

impl CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "train-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let width = l.dims().last().copied().unwrap_or(1);
        let mut out = f32_slice(s, l, self.name())?.to_vec();
        let chunk = rows_chunks(out.len(), width);
        out.par_chunks_mut(chunk)
            .for_each(|c| softmax_rows(c, width, &[]));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let width = arg.dims().last().copied().unwrap_or(1);
        let out = with_values(res, |p| {
            with_values(grad, |g| {
                let mut out = vec![0f32; p.len()];
                let chunk = rows_chunks(p.len(), width);
                out.par_chunks_mut(chunk)
                    .zip(p.par_chunks(chunk).zip(g.par_chunks(chunk)))
                    .for_each(|(o, (p, g))| softmax_grad_rows(p, g, width, o));
                Ok(out)
            })
        })?;
        Ok(Some(Tensor::from_vec(out, arg.shape(), arg.device())?))
    }
}

struct LayerNorm {
    eps: f32,
    /// Where the gain and bias gradients go (else they are returned).
    acc: Option<(GradSlot, GradSlot)>,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "train-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let h = w.len();
        if l1.dims().last() != Some(&h) || b.len() != h {
            candle_core::bail!(
                "{}: gain/bias of {h} for rows of {:?}",
                self.name(),
                l1.dims()
            );
        }
        let mut out = f32_slice(s1, l1, self.name())?.to_vec();
        let chunk = rows_chunks(out.len(), h);
        out.par_chunks_mut(chunk)
            .for_each(|c| layer_norm_each(c, h, w, b, self.eps));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let h = w.elem_count();
        let (dx, dw, db) = with_values(x, |xv| {
            with_values(w, |wv| {
                with_values(grad, |gv| {
                    let mut dx = vec![0f32; xv.len()];
                    let chunk = rows_chunks(xv.len(), h);
                    let parts: Vec<(Vec<f32>, Vec<f32>)> = dx
                        .par_chunks_mut(chunk)
                        .zip(xv.par_chunks(chunk).zip(gv.par_chunks(chunk)))
                        .map(|(d, (x, g))| {
                            let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                            layer_norm_grad_rows(x, wv, g, self.eps, d, &mut dw, &mut db);
                            (dw, db)
                        })
                        .collect();
                    let (mut dw, mut db) = (vec![0f32; h], vec![0f32; h]);
                    for (pw, pb) in parts {
                        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
                        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
                    }
                    Ok((dx, dw, db))
                })
            })
        })?;
        let dev = x.device();
        if let Some((sw, sb)) = &self.acc {
            add_into(sw, &dw)?;
            add_into(sb, &db)?;
            return Ok((Some(Tensor::from_vec(dx, x.shape(), dev)?), None, None));
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), dev)?),
            Some(Tensor::from_vec(dw, w.shape(), dev)?),
            Some(Tensor::from_vec(db, w.shape(), dev)?),
        ))
    }
}

/// `dst [m, n] = lhs [m, k] @ rhs [k, n]` with explicit (column, row) strides, through the
/// `gemm` crate over rayon's threads when large.
///
/// # Safety
/// Every element addressed by the strides must lie in its buffer.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_strided(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k >= 1 << 18 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller vouches for the strides; dst is m x n row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
            accumulate,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

/// `dst [m, n] (row stride dst_rs) = lhs [m, k] @ rhs [k, n]` with explicit (column, row)
/// strides, on the calling thread (for many small products run side by side).
///
/// # Safety
/// Every element addressed by the strides must lie in its buffer.
unsafe fn gemm_1t(
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs): (*mut f32, usize),
    (lhs, lhs_cs, lhs_rs): (*const f32, usize, usize),
    (rhs, rhs_cs, rhs_rs): (*const f32, usize, usize),
) {
    // SAFETY: the caller vouches for the strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            false,
            lhs,
            lhs_cs as isize,
            lhs_rs as isize,
            rhs,
            rhs_cs as isize,
            rhs_rs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// A raw pointer that rayon jobs writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32);
// SAFETY: every job writes elements no other job touches (one head of one sequence).
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}

impl SharedMut {
    /// The pointer (a method, so that closures capture the whole wrapper, not its field).
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Multi-head self-attention over `[b, s, h]` queries, keys and values (the heads side by side
/// in the last dimension, as the projections give them): per sequence and head,
/// `softmax(q k^T * scale + key_bias) (dropped out) @ v`, written back to `[b, s, h]`; one job
/// per sequence and head over rayon's threads, no split or merge copies. The backward pass
/// reuses the saved probabilities: `dPd = g v^T`, `dv = Pd^T g`, `dS = softmax'(dPd * drop)
/// * scale`, `dq = dS k`, `dk = dS^T q`.
struct Attention {
    heads: usize,
    scale: f32,
    /// Added to every query's score of each key, `[b, s]` (0, or `f32::MIN` for padding).
    key_bias: Vec<f32>,
    /// Dropout factors for the probabilities, `[b, heads, s, s]` (0 or `1 / (1 - p)`).
    drop: Option<Vec<f32>>,
    /// The probabilities (before dropout), saved by the forward pass.
    probs: std::sync::Mutex<Vec<f32>>,
}

impl Attention {
    fn dims(&self, l: &Layout) -> Result<(usize, usize, usize, usize)> {
        let &[b, s, h] = l.dims() else {
            candle_core::bail!("train-attention: [b, s, h] inputs, not {:?}", l.dims())
        };
        if h % self.heads != 0 || self.key_bias.len() != b * s {
            candle_core::bail!("train-attention: {h} wide, {} heads", self.heads)
        }
        Ok((b, s, h, h / self.heads))
    }
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "train-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_slice(s1, l1, self.name())?,
            f32_slice(s2, l2, self.name())?,
            f32_slice(s3, l3, self.name())?,
        );
        let (b, s, h, dh) = self.dims(l1)?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            candle_core::bail!("train-attention: q, k, v shapes differ");
        }
        let nh = self.heads;
        let mut out = vec![0f32; b * s * h];
        let mut probs = vec![0f32; b * nh * s * s];
        let dst = SharedMut(out.as_mut_ptr());
        probs
            .par_chunks_mut(s * s)
            .enumerate()
            .for_each(|(job, p)| {
                let (bi, hd) = (job / nh, job % nh);
                let at = bi * s * h + hd * dh;
                // SAFETY: head `hd` of sequence `bi`: rows bi*s.. of q, k, v (stride h),
                // columns hd*dh..; p is s x s; the output block is this job's alone.
                unsafe {
                    gemm_1t(
                        (s, s, dh),
                        (p.as_mut_ptr(), s),
                        (q.as_ptr().add(at), 1, h),
                        (k.as_ptr().add(at), h, 1),
                    );
                }
                let bias = &self.key_bias[bi * s..(bi + 1) * s];
                for row in p.chunks_exact_mut(s) {
                    for (x, &m) in row.iter_mut().zip(bias) {
                        *x = *x * self.scale + m;
                    }
                }
                softmax_rows(p, s, &[]);
                let pd_owned;
                let pd: &[f32] = match &self.drop {
                    Some(d) => {
                        let d = &d[job * s * s..(job + 1) * s * s];
                        pd_owned = p.iter().zip(d).map(|(a, b)| a * b).collect::<Vec<_>>();
                        &pd_owned
                    }
                    None => p,
                };
                // SAFETY: as above.
                unsafe {
                    gemm_1t(
                        (s, dh, s),
                        (dst.get().add(at), h),
                        (pd.as_ptr(), 1, s),
                        (v.as_ptr().add(at), 1, h),
                    );
                }
            });
        *self.probs.lock().unwrap() = probs;
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, s, h, dh) = self.dims(q.layout())?;
        let nh = self.heads;
        let probs = std::mem::take(&mut *self.probs.lock().unwrap());
        if probs.len() != b * nh * s * s {
            candle_core::bail!("train-attention: backward without its forward pass");
        }
        let (mut dq, mut dk, mut dv) = (
            vec![0f32; b * s * h],
            vec![0f32; b * s * h],
            vec![0f32; b * s * h],
        );
        let (pq, pk, pv) = (
            SharedMut(dq.as_mut_ptr()),
            SharedMut(dk.as_mut_ptr()),
            SharedMut(dv.as_mut_ptr()),
        );
        with_values(q, |qv| {
            with_values(k, |kv| {
                with_values(v, |vv| {
                    with_values(grad, |gv| {
                        probs.par_chunks(s * s).enumerate().for_each(|(job, p)| {
                            let (bi, hd) = (job / nh, job % nh);
                            let at = bi * s * h + hd * dh;
                            let drop = self
                                .drop
                                .as_ref()
                                .map(|d| &d[job * s * s..(job + 1) * s * s]);
                            let pd_owned;
                            let pd: &[f32] = match drop {
                                Some(d) => {
                                    pd_owned =
                                        p.iter().zip(d).map(|(a, b)| a * b).collect::<Vec<_>>();
                                    &pd_owned
                                }
                                None => p,
                            };
                            let mut dp = vec![0f32; s * s];
                            // SAFETY: this job's head of this sequence, as in the forward pass.
                            unsafe {
                                // dPd = g v^T
                                gemm_1t(
                                    (s, s, dh),
                                    (dp.as_mut_ptr(), s),
                                    (gv.as_ptr().add(at), 1, h),
                                    (vv.as_ptr().add(at), h, 1),
                                );
                                // dv = Pd^T g
                                gemm_1t(
                                    (s, dh, s),
                                    (pv.get().add(at), h),
                                    (pd.as_ptr(), s, 1),
                                    (gv.as_ptr().add(at), 1, h),
                                );
                            }
                            if let Some(d) = drop {
                                dp.iter_mut().zip(d).for_each(|(x, &f)| *x *= f);
                            }
                            let mut ds = vec![0f32; s * s];
                            softmax_grad_rows(p, &dp, s, &mut ds);
                            ds.iter_mut().for_each(|x| *x *= self.scale);
                            // SAFETY: as above.
                            unsafe {
                                // dq = dS k
                                gemm_1t(
                                    (s, dh, s),
                                    (pq.get().add(at), h),
                                    (ds.as_ptr(), 1, s),
                                    (kv.as_ptr().add(at), 1, h),
                                );
                                // dk = dS^T q
                                gemm_1t(
                                    (s, dh, s),
                                    (pk.get().add(at), h),
                                    (ds.as_ptr(), s, 1),
                                    (qv.as_ptr().add(at), 1, h),
                                );
                            }
                        });
                        Ok(())
                    })
                })
            })
        })?;
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

/// Multi-head self-attention of `[b, s, h]` projections `q`, `k`, `v` with `heads` heads:
/// `softmax(q k^T / sqrt(dh) + key_bias) @ v` per head, heads merged back to `[b, s, h]`.
/// `key_bias` is `[b, s]` (0 or `f32::MIN`), `drop` the dropout factors `[b, heads, s, s]` of
/// the probabilities. CPU f32 only (the trainer's other devices go through candle's ops).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    key_bias: Vec<f32>,
    drop: Option<Vec<f32>>,
) -> Result<Tensor> {
    let dh = q.dim(2)? / heads;
    let op = Attention {
        heads,
        scale: (1.0 / (dh as f64).sqrt()) as f32,
        key_bias,
        drop,
        probs: std::sync::Mutex::new(Vec::new()),
    };
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// `y = x @ W^T + b` over rows of `x` (HF's `nn.Linear`, `W` `[out, in]`), and its backward:
/// `dx = g @ W`, `dW = g^T @ x`, `db = sum(g)`, each one `gemm` (or one pass) instead of
/// candle's transposes, broadcast and reduction. With slots, `dW` and `db` are added into them
/// (the weight gradient straight from `gemm`, no buffer of its own).
struct Linear {
    acc: Option<(GradSlot, GradSlot)>,
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "train-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, self.name())?;
        let w = f32_slice(s2, l2, self.name())?;
        let b = f32_slice(s3, l3, self.name())?;
        let (&[out, inp], Some(&k)) = (l2.dims(), l1.dims().last()) else {
            candle_core::bail!("{}: weight {:?}", self.name(), l2.dims())
        };
        if k != inp || b.len() != out {
            candle_core::bail!(
                "{}: x {:?}, weight {:?}, bias {}",
                self.name(),
                l1.dims(),
                l2.dims(),
                b.len()
            );
        }
        let rows = x.len() / inp;
        let mut y: Vec<f32> = Vec::with_capacity(rows * out);
        for _ in 0..rows {
            y.extend_from_slice(b);
        }
        // SAFETY: x is rows x inp, w out x inp (read as its transpose), y rows x out.
        unsafe {
            gemm_strided(
                (rows, out, inp),
                y.as_mut_ptr(),
                (x.as_ptr(), 1, inp),
                (w.as_ptr(), inp, 1),
                true,
            )
        };
        let mut dims = l1.dims().to_vec();
        *dims.last_mut().unwrap() = out;
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (out, inp) = w.dims2()?;
        let (dx, dw, db) = with_values(x, |xv| {
            with_values(w, |wv| {
                with_values(grad, |gv| {
                    let rows = xv.len() / inp;
                    let mut dx = vec![0f32; rows * inp];
                    // SAFETY: g is rows x out, w out x inp; dx rows x inp.
                    unsafe {
                        gemm_strided(
                            (rows, inp, out),
                            dx.as_mut_ptr(),
                            (gv.as_ptr(), 1, out),
                            (wv.as_ptr(), 1, inp),
                            false,
                        );
                    }
                    let mut db = vec![0f32; out];
                    for row in gv.chunks_exact(out) {
                        db.iter_mut().zip(row).for_each(|(a, &g)| *a += g);
                    }
                    let dw = match &self.acc {
                        Some((sw, sb)) => {
                            let mut slot = sw
                                .lock()
                                .map_err(|_| candle_core::Error::Msg("gradient slot".into()))?;
                            if slot.len() != out * inp {
                                candle_core::bail!("{}: gradient slot size", self.name());
                            }
                            // SAFETY: g is rows x out, x rows x inp, the slot out x inp.
                            unsafe {
                                gemm_strided(
                                    (out, inp, rows),
                                    slot.as_mut_ptr(),
                                    (gv.as_ptr(), out, 1),
                                    (xv.as_ptr(), 1, inp),
                                    true,
                                );
                            }
                            add_into(sb, &db)?;
                            None
                        }
                        None => {
                            let mut dw = vec![0f32; out * inp];
                            // SAFETY: as above, into dw.
                            unsafe {
                                gemm_strided(
                                    (out, inp, rows),
                                    dw.as_mut_ptr(),
                                    (gv.as_ptr(), out, 1),
                                    (xv.as_ptr(), 1, inp),
                                    false,
                                );
                            }
                            Some(dw)
                        }
                    };
                    Ok((dx, dw, db))
                })
            })
        })?;
        let dev = x.device();
        let dx = Some(Tensor::from_vec(dx, x.shape(), dev)?);
        Ok(match dw {
            None => (dx, None, None),
            Some(dw) => (
                dx,
                Some(Tensor::from_vec(dw, w.shape(), dev)?),
                Some(Tensor::from_vec(db, b.shape(), dev)?),
            ),
        })
    }
}

/// Dropout with given factors (0 or `1 / (1 - p)` per element): `x * f`, backward `g * f`. As
/// one op instead of candle's product with a constant tensor, whose backward pass also
/// computes (and accumulates) a gradient for the constant.
struct Scale {
    factors: Vec<f32>,
}

impl Scale {
    fn times(&self, x: &[f32]) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(PAR_MIN)
            .zip(x.par_chunks(PAR_MIN).zip(self.factors.par_chunks(PAR_MIN)))
            .for_each(|(o, (x, f))| {
                o.iter_mut()
                    .zip(x.iter().zip(f))
                    .for_each(|(o, (&x, &f))| *o = x * f)
            });
        out
    }
}

impl CustomOp1 for Scale {
    fn name(&self) -> &'static str {
        "train-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, self.name())?;
        if x.len() != self.factors.len() {
            candle_core::bail!(
                "{}: {} factors for {} values",
                self.name(),
                self.factors.len(),
                x.len()
            );
        }
        Ok((CpuStorage::F32(self.times(x)), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = with_values(grad, |g| Ok(self.times(g)))?;
        Ok(Some(Tensor::from_vec(g, arg.shape(), arg.device())?))
    }
}

/// `x * factors` element by element (dropout with drawn factors), its backward `g * factors`.
pub fn dropout(x: &Tensor, factors: Vec<f32>) -> Result<Tensor> {
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(Scale { factors })
    } else {
        let f = Tensor::from_vec(factors, x.shape(), x.device())?;
        x * f
    }
}

/// Embedding rows gathered by id (`nn.Embedding`); the backward pass adds each row's gradient
/// into the slot, skipping `no_grad_id` (torch's `padding_idx`).
struct Embed {
    ids: Vec<u32>,
    no_grad_id: Option<u32>,
    acc: GradSlot,
}

impl CustomOp1 for Embed {
    fn name(&self) -> &'static str {
        "train-embedding"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let w = f32_slice(s, l, self.name())?;
        let &[vocab, h] = l.dims() else {
            candle_core::bail!("{}: table {:?}", self.name(), l.dims())
        };
        let mut out = Vec::with_capacity(self.ids.len() * h);
        for &id in &self.ids {
            let id = id as usize;
            if id >= vocab {
                candle_core::bail!("{}: id {id} outside a table of {vocab}", self.name());
            }
            out.extend_from_slice(&w[id * h..(id + 1) * h]);
        }
        Ok((CpuStorage::F32(out), Shape::from((self.ids.len(), h))))
    }

    fn bwd(&self, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let h = w.dim(1)?;
        with_values(grad, |gv| {
            let mut slot = self
                .acc
                .lock()
                .map_err(|_| candle_core::Error::Msg("gradient slot".into()))?;
            if slot.len() != w.elem_count() {
                candle_core::bail!("{}: gradient slot size", self.name());
            }
            for (&id, g) in self.ids.iter().zip(gv.chunks_exact(h)) {
                if Some(id) == self.no_grad_id {
                    continue;
                }
                let row = &mut slot[id as usize * h..(id as usize + 1) * h];
                row.iter_mut().zip(g).for_each(|(a, &b)| *a += b);
            }
            Ok(())
        })?;
        Ok(None)
    }
}

/// Rows of the `[vocab, h]` table `w` for `ids` (any shape): `[ids.., h]`. The gradient goes
/// into `acc` (candle's path: into candle's gradients), none to the padding id `no_grad_id`.
pub fn embedding(
    w: &Tensor,
    ids: &Tensor,
    no_grad_id: Option<u32>,
    acc: GradSlot,
) -> Result<Tensor> {
    let mut dims = ids.dims().to_vec();
    dims.push(w.dim(1)?);
    if !on_cpu_f32(w) {
        let flat = ids.flatten_all()?;
        let rows = w.index_select(&flat, 0)?;
        let rows = match no_grad_id {
            // The padding rows' values pass through detached.
            Some(pad) => {
                let m = flat
                    .eq(pad)?
                    .unsqueeze(1)?
                    .broadcast_as(rows.shape())?
                    .contiguous()?;
                m.where_cond(&rows.detach(), &rows)?
            }
            None => rows,
        };
        return rows.reshape(dims);
    }
    let op = Embed {
        ids: ids.flatten_all()?.to_vec1::<u32>()?,
        no_grad_id,
        acc,
    };
    w.apply_op1(op)?.reshape(dims)
}

/// `x @ W^T + b` (`W` `[out, in]`, `b` `[out]`) over the last dimension of `x`.
pub fn linear(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    linear_acc(x, w, b, None)
}

/// [`linear`], adding the weight and bias gradients into `acc` when given (CPU f32).
pub fn linear_acc(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    acc: Option<(GradSlot, GradSlot)>,
) -> Result<Tensor> {
    if on_cpu_f32(x) && on_cpu_f32(w) && on_cpu_f32(b) {
        x.contiguous()?.apply_op3(w, b, Linear { acc })
    } else {
        let dims = x.dims().to_vec();
        let k = dims[dims.len() - 1];
        let y = x.reshape(((), k))?.matmul(&w.t()?)?.broadcast_add(b)?;
        let mut out = dims;
        *out.last_mut().unwrap() = w.dim(0)?;
        y.reshape(out)
    }
}

/// LayerNorm over the last dimension with gain `w` and bias `b` (HF's `nn.LayerNorm`).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    layer_norm_acc(x, w, b, eps, None)
}

/// [`layer_norm`], adding the gain and bias gradients into `acc` when given (CPU f32).
pub fn layer_norm_acc(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
    acc: Option<(GradSlot, GradSlot)>,
) -> Result<Tensor> {
    if on_cpu_f32(x) && on_cpu_f32(w) && on_cpu_f32(b) {
        x.contiguous()?.apply_op3(
            w,
            b,
            LayerNorm {
                eps: eps as f32,
                acc,
            },
        )
    } else {
        candle_nn::ops::layer_norm_slow(x, w, b, eps as f32)
    }
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(SoftmaxLastDim)
    } else {
        candle_nn::ops::softmax(x, candle_core::D::Minus1)
    }
}

/// Exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if on_cpu_f32(x) {
        x.contiguous()?.apply_op1(GeluErf)
    } else {
        x.gelu_erf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let v = crate::kernels::cpu::test_values(n, seed, 4.0);
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        crate::kernels::cpu::max_abs_diff(a, b)
    }

    /// Each fused op against candle's composite one: the same values, and the same gradients
    /// (of a random weighting of the outputs) for every input, masked rows included.
    #[test]
    fn fused_ops_match_candle_forward_and_backward() {
        let x = Var::from_tensor(&randn(&[3, 5, 40], 1)).unwrap();
        let w = Var::from_tensor(&randn(&[40], 2).affine(0.5, 1.0).unwrap()).unwrap();
        let b = Var::from_tensor(&randn(&[40], 3)).unwrap();
        let weights = randn(&[3, 5, 40], 4);
        let check = |ours: Tensor, theirs: Tensor, inputs: &[&Var], what: &str| {
            assert!(max_diff(&ours, &theirs) < 1e-5, "{what}: forward");
            let go = (ours * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gt = (theirs * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in inputs {
                let (a, b) = (
                    go.get(v.as_tensor()).unwrap(),
                    gt.get(v.as_tensor()).unwrap(),
                );
                let d = max_diff(a, b);
                assert!(d < 1e-4, "{what}: gradient differs by {d}");
            }
        };
        check(
            layer_norm(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12).unwrap(),
            candle_nn::ops::layer_norm_slow(x.as_tensor(), w.as_tensor(), b.as_tensor(), 1e-12)
                .unwrap(),
            &[&x, &w, &b],
            "layer norm",
        );
        // Softmax with a row of masked (f32::MIN) scores and a fully masked row.
        let mut m = vec![0f32; 3 * 5 * 40];
        m[..10].fill(f32::MIN);
        m[40..80].fill(f32::MIN);
        let mask = Tensor::from_vec(m, (3, 5, 40), &Device::Cpu).unwrap();
        let s = (x.as_tensor() + &mask).unwrap();
        check(
            softmax_last_dim(&s).unwrap(),
            candle_nn::ops::softmax(&s, candle_core::D::Minus1).unwrap(),
            &[&x],
            "softmax",
        );
        let lw = Var::from_tensor(&randn(&[40, 40], 5).affine(0.2, 0.0).unwrap()).unwrap();
        let lb = Var::from_tensor(&randn(&[40], 6)).unwrap();
        check(
            linear(x.as_tensor(), lw.as_tensor(), lb.as_tensor()).unwrap(),
            x.as_tensor()
                .reshape((15, 40))
                .unwrap()
                .matmul(&lw.as_tensor().t().unwrap())
                .unwrap()
                .broadcast_add(lb.as_tensor())
                .unwrap()
                .reshape((3, 5, 40))
                .unwrap(),
            &[&x, &lw, &lb],
            "linear",
        );
        check(
            gelu_erf(x.as_tensor()).unwrap(),
            x.as_tensor().gelu_erf().unwrap(),
            &[&x],
            "gelu",
        );
        let f: Vec<f32> = (0..3 * 5 * 40)
            .map(|i| if i % 5 == 1 { 0.0 } else { 1.1 })
            .collect();
        check(
            dropout(x.as_tensor(), f.clone()).unwrap(),
            (x.as_tensor() * Tensor::from_vec(f, (3, 5, 40), &Device::Cpu).unwrap()).unwrap(),
            &[&x],
            "dropout",
        );
        // Attention: 3 sequences of 5, 40 wide in 4 heads, padding keys in two sequences,
        // dropout factors on the probabilities; against candle's split / matmul / softmax /
        // merge.
        let (b, s, h, nh) = (3, 5, 40, 4);
        let dh = h / nh;
        let q = Var::from_tensor(&randn(&[b, s, h], 7)).unwrap();
        let k = Var::from_tensor(&randn(&[b, s, h], 8)).unwrap();
        let v = Var::from_tensor(&randn(&[b, s, h], 9)).unwrap();
        let mut key_bias = vec![0f32; b * s];
        key_bias[3..5].fill(f32::MIN);
        key_bias[14] = f32::MIN;
        let drop: Vec<f32> = (0..b * nh * s * s)
            .map(|i| if i % 7 == 3 { 0.0 } else { 1.25 })
            .collect();
        let split = |t: &Tensor| {
            t.reshape((b, s, nh, dh))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let bias = Tensor::from_vec(key_bias.clone(), (b, 1, 1, s), &Device::Cpu).unwrap();
        let dmask = Tensor::from_vec(drop.clone(), (b, nh, s, s), &Device::Cpu).unwrap();
        let scores = (split(q.as_tensor())
            .matmul(&split(k.as_tensor()).t().unwrap().contiguous().unwrap())
            .unwrap()
            * (1.0 / (dh as f64).sqrt()))
        .unwrap()
        .broadcast_add(&bias)
        .unwrap();
        let probs =
            (candle_nn::ops::softmax(&scores, candle_core::D::Minus1).unwrap() * dmask).unwrap();
        let theirs = probs
            .matmul(&split(v.as_tensor()))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape((b, s, h))
            .unwrap();
        let ours = attention(
            q.as_tensor(),
            k.as_tensor(),
            v.as_tensor(),
            nh,
            key_bias,
            Some(drop),
        )
        .unwrap();
        check(ours, theirs, &[&q, &k, &v], "attention");
    }
}
