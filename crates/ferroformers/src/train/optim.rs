//! The optimiser side of training: a seeded generator, AdamW as torch computes it, HF's
//! learning-rate schedules, and gradient clipping by global norm.

use rayon::prelude::*;

use crate::kernels::cpu::rowops::adamw_update;

/// SplitMix64: a small seeded generator (initialisation, dropout masks, shuffling), so a seed
/// gives the same run every time.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(Self::GAMMA);
        Self::mix(self.0)
    }

    const GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// The next `out.len()` draws of [`Rng::uniform`] compared with `p`: `drop` where below,
    /// `keep` elsewhere, the generator advanced past them. SplitMix64's `i`-th draw depends on
    /// `i` alone, so the values are computed over rayon's threads and equal the sequential
    /// ones.
    pub fn bernoulli_fill(&mut self, out: &mut [f32], p: f64, drop: f32, keep: f32) {
        const CHUNK: usize = 1 << 14;
        let start = self.0;
        // `(z >> 11) / 2^53 >= p` in integers (both sides exact).
        let threshold = (p * (1u64 << 53) as f64).ceil() as u64;
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                let base = start.wrapping_add(((c * CHUNK) as u64).wrapping_mul(Self::GAMMA));
                let mut state = base;
                for x in chunk.iter_mut() {
                    state = state.wrapping_add(Self::GAMMA);
                    *x = if Self::mix(state) >> 11 >= threshold {
                        keep
                    } else {
                        drop
                    };
                }
            });
        self.0 = start.wrapping_add((out.len() as u64).wrapping_mul(Self::GAMMA));
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform();
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// The generator's whole state (checkpoints).
    pub fn state(&self) -> u64 {
        self.0
    }

    /// A generator at a saved [`Rng::state`].
    pub fn from_state(state: u64) -> Self {
        Rng(state)
    }

    /// A generator for another purpose, derived from this one.
    pub fn fork(&mut self) -> Rng {
        Rng(self.next_u64())
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// HF's `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    Linear,
    Constant,
    ConstantWithWarmup,
    Cosine,
}

impl Schedule {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "linear" => Schedule::Linear,
            "constant" => Schedule::Constant,
            "constant_with_warmup" => Schedule::ConstantWithWarmup,
            "cosine" => Schedule::Cosine,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Schedule::Linear => "linear",
            Schedule::Constant => "constant",
            Schedule::ConstantWithWarmup => "constant_with_warmup",
            Schedule::Cosine => "cosine",
        }
    }

    /// The factor on the base learning rate for optimizer step `step` (0-based, as torch's
    /// `LambdaLR` counts: the first update uses step 0), `warmup` steps of warm-up, `total`
    /// steps in all (`transformers.optimization`'s lambdas).
    pub fn factor(self, step: usize, warmup: usize, total: usize) -> f64 {
        let (s, w, t) = (step as f64, warmup as f64, total as f64);
        if self != Schedule::Constant && step < warmup {
            return s / w.max(1.0);
        }
        match self {
            Schedule::Constant | Schedule::ConstantWithWarmup => 1.0,
            Schedule::Linear => ((t - s) / (t - w).max(1.0)).max(0.0),
            Schedule::Cosine => {
                let progress = (s - w) / (t - w).max(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// AdamW with decoupled weight decay, in torch's order of operations (`torch.optim.AdamW`,
/// single-tensor path), with per-parameter decay on or off (HF: none for biases and
/// LayerNorm weights).
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Updates done.
    pub t: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    decay: Vec<bool>,
}

impl AdamW {
    pub fn new(sizes: &[usize], decay: Vec<bool>, weight_decay: f64) -> Self {
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            decay,
        }
    }

    /// The moments of parameter `i` (checkpoints).
    pub fn moments(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.m[i], &self.v[i])
    }

    /// Restore a checkpoint's step count and moments.
    pub fn restore(&mut self, t: u64, m: Vec<Vec<f32>>, v: Vec<Vec<f32>>) -> Result<(), String> {
        let same = |a: &[Vec<f32>], b: &[Vec<f32>]| {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.len() == y.len())
        };
        if !same(&m, &self.m) || !same(&v, &self.v) {
            return Err("the optimizer state does not match the model's parameters".into());
        }
        (self.t, self.m, self.v) = (t, m, v);
        Ok(())
    }

    /// The step's constants (advances the step count).
    fn next(&mut self, lr: f64) -> Consts {
        self.t += 1;
        let bc1 = 1.0 - self.beta1.powi(self.t as i32);
        let bc2 = 1.0 - self.beta2.powi(self.t as i32);
        Consts {
            b1: self.beta1 as f32,
            b2: self.beta2 as f32,
            step_size: (lr / bc1) as f32,
            bc2_sqrt: bc2.sqrt() as f32,
            eps: self.eps as f32,
            decay: (1.0 - lr * self.weight_decay) as f32,
        }
    }

    /// One update of every parameter, in the `Var`s' storage (no copies of the parameters):
    /// `grads[i]` scaled by `coef` (clipping) first, as torch scales the gradients in place
    /// before its step.
    pub fn step_vars(
        &mut self,
        lr: f64,
        vars: &[candle_core::Var],
        grads: &[&[f32]],
        coef: f32,
    ) -> candle_core::Result<()> {
        let c = self.next(lr);
        vars.par_iter()
            .zip(grads.par_iter())
            .zip(self.m.par_iter_mut().zip(self.v.par_iter_mut()))
            .zip(self.decay.par_iter())
            .try_for_each(|(((var, g), (m, v)), &decay)| {
                if !var.device().is_cpu() {
                    // Parameters elsewhere (a GPU): the same update on a copy, written back.
                    let t = var.as_tensor();
                    let mut p = t.flatten_all()?.to_vec1::<f32>()?;
                    c.apply(&mut p, g, coef, m, v, decay);
                    return var.set(&candle_core::Tensor::from_vec(p, t.shape(), t.device())?);
                }
                let op = InPlace {
                    c: &c,
                    g,
                    coef,
                    m: std::cell::RefCell::new(m),
                    v: std::cell::RefCell::new(v),
                    decay,
                };
                var.as_tensor().inplace_op1(&op)
            })
    }
}

/// One step's constants, torch's (`bias_correction1/2`, `step_size`).
struct Consts {
    b1: f32,
    b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    /// `1 - lr * weight_decay`.
    decay: f32,
}

impl Consts {
    /// torch's single-tensor AdamW on one parameter, in chunks over rayon's threads (element
    /// by element, so any split gives the same numbers).
    fn apply(
        &self,
        p: &mut [f32],
        g: &[f32],
        coef: f32,
        m: &mut [f32],
        v: &mut [f32],
        decay: bool,
    ) {
        const CHUNK: usize = 1 << 14;
        let wd = if decay { self.decay } else { 1.0 };
        let k = [
            self.b1,
            self.b2,
            self.step_size,
            self.bc2_sqrt,
            self.eps,
            wd,
            coef,
        ];
        p.par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| adamw_update(p, g, m, v, &k));
    }
}

/// [`Consts::apply`] on a `Var`'s own storage.
struct InPlace<'a> {
    c: &'a Consts,
    g: &'a [f32],
    coef: f32,
    m: std::cell::RefCell<&'a mut Vec<f32>>,
    v: std::cell::RefCell<&'a mut Vec<f32>>,
    decay: bool,
}

impl candle_core::InplaceOp1 for InPlace<'_> {
    fn name(&self) -> &'static str {
        "adamw"
    }

    fn cpu_fwd(
        &self,
        storage: &mut candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let candle_core::CpuStorage::F32(p) = storage else {
            candle_core::bail!("AdamW: f32 parameters only")
        };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("AdamW: contiguous parameters only")
        };
        let p = &mut p[a..b];
        if p.len() != self.g.len() {
            candle_core::bail!("AdamW: {} values, gradient of {}", p.len(), self.g.len());
        }
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        self.c
            .apply(p, self.g, self.coef, &mut m[..], &mut v[..], self.decay);
        Ok(())
    }
}

/// The global L2 norm of all gradients (f64 sums).
pub fn global_norm(grads: &[&[f32]]) -> f64 {
    let sums: Vec<f64> = grads
        .par_iter()
        .map(|g| g.iter().map(|&x| x as f64 * x as f64).sum::<f64>())
        .collect();
    sums.iter().sum::<f64>().sqrt()
}

/// torch's clipping coefficient: `max_norm / (norm + 1e-6)` when below 1, else 1.
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    if max_norm > 0.0 {
        let c = max_norm / (norm + 1e-6);
        if c < 1.0 {
            return c as f32;
        }
    }
    1.0
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel fill gives the sequential draws and leaves the generator where they would.
    #[test]
    fn bernoulli_fill_equals_sequential_draws() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let mut out = vec![0f32; 40_000];
        a.bernoulli_fill(&mut out, 0.1, 0.0, 1.25);
        let want: Vec<f32> = (0..40_000)
            .map(|_| if b.uniform() >= 0.1 { 1.25 } else { 0.0 })
            .collect();
        assert_eq!(out, want);
        assert_eq!(a.state(), b.state());
    }

    #[test]
    fn schedules_follow_transformers_lambdas() {
        // get_linear_schedule_with_warmup(warmup 2, total 10)
        let l: Vec<f64> = (0..11).map(|s| Schedule::Linear.factor(s, 2, 10)).collect();
        assert_eq!(l[0], 0.0);
        assert_eq!(l[1], 0.5);
        assert_eq!(l[2], 1.0);
        assert!((l[6] - 0.5).abs() < 1e-12 && l[10] == 0.0);
        let c = Schedule::Cosine.factor(6, 2, 10);
        assert!((c - 0.5).abs() < 1e-12);
        assert_eq!(Schedule::Constant.factor(0, 5, 10), 1.0);
        assert_eq!(Schedule::ConstantWithWarmup.factor(1, 4, 10), 0.25);
    }

    fn vars(values: &[&[f32]]) -> Vec<candle_core::Var> {
        values
            .iter()
            .map(|v| {
                let t = candle_core::Tensor::new(*v, &candle_core::Device::Cpu).unwrap();
                candle_core::Var::from_tensor(&t).unwrap()
            })
            .collect()
    }

    fn flat(v: &candle_core::Var) -> Vec<f32> {
        v.as_tensor().to_vec1::<f32>().unwrap()
    }

    /// One AdamW step from zero moments moves each weight by about `lr` against the
    /// gradient's sign, after decay; no decay where it is off.
    #[test]
    fn adamw_first_step() {
        let mut opt = AdamW::new(&[2, 1], vec![true, false], 0.1);
        let p = vars(&[&[1.0, -1.0], &[2.0]]);
        let g: [&[f32]; 2] = [&[0.5, -2.0], &[1.0]];
        opt.step_vars(0.01, &p, &g, 1.0).unwrap();
        let (p0, p1) = (flat(&p[0]), flat(&p[1]));
        let want0 = 1.0 * (1.0 - 0.01 * 0.1) - 0.01;
        assert!((p0[0] - want0 as f32).abs() < 1e-6, "{p0:?}");
        assert!((p0[1] - (-0.999f32 + 0.01)).abs() < 1e-6, "{p0:?}");
        assert!((p1[0] - 1.99).abs() < 1e-6, "{p1:?}");
    }

    /// torch's clipping: the global norm of all gradients, and the factor that brings it to
    /// the max norm (applied by AdamW to each gradient).
    #[test]
    fn clipping_scales_to_the_max_norm() {
        let g: [&[f32]; 2] = [&[3.0], &[4.0]];
        let n = global_norm(&g);
        assert!((n - 5.0).abs() < 1e-9);
        let c = clip_coef(n, 1.0);
        assert!((3.0 * c - 0.6).abs() < 1e-6 && (4.0 * c - 0.8).abs() < 1e-6);
        assert_eq!(clip_coef(n, 10.0), 1.0);
    }
}
