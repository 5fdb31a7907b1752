//! Row loops over plain f32 buffers: LayerNorm, activations, masked softmax and gated products,
//! compiled for the baseline target and again with AVX-512 and with AVX2+FMA (`dispatch!`
//! picks at run time), and the `exp`/`erf` in plain arithmetic that lets them vectorise.

use serde::Deserialize;

use super::simd::{dispatch, dot16, sum16};
use super::threads::{par_tasks, SendPtr};

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

/// exp for f32 in plain arithmetic (Cephes' polynomial, ~1 ulp on the reduced range) so that
/// loops over it vectorise; `f32::exp` is a scalar libm call.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E;
    // Round to nearest through the float adder: n sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let z = t + MAGIC;
    let n = z - MAGIC;
    let ni = (z.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((ni + 127) << 23) as u32)
}

/// erf for f32 as a rational polynomial on [-4, 4] (the form Eigen uses): a few ulp from the
/// exact value, and plain arithmetic (no `mul_add`, which is a libm call without FMA enabled at
/// build time), so the loops over it vectorise (libm's scalar `erff` was a
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

#[inline(always)]
fn act_one(x: f32, act: Activation) -> f32 {
    match act {
        Activation::Gelu => 0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluNew => {
            let u = 0.797_884_6 * (x + 0.044_715 * x * x * x);
            // tanh(u) = 1 - 2 / (exp(2u) + 1)
            0.5 * x * (2.0 - 2.0 / (fast_exp(2.0 * u) + 1.0))
        }
        Activation::Relu => x.max(0.0),
        Activation::Silu => x / (1.0 + fast_exp(-x)),
        Activation::Tanh => 1.0 - 2.0 / (fast_exp(2.0 * x) + 1.0),
    }
}

#[inline(always)]
fn layer_norm_g(row: &mut [f32], g: &[f32], b: &[f32], eps: f32) {
    let n = row.len() as f32;
    let mean = sum16(row) / n;
    for v in row.iter_mut() {
        *v -= mean;
    }
    let var = dot16(row, row);
    let inv = 1.0 / (var / n + eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(g).zip(b) {
        *v = *v * inv * g + b;
    }
}
dispatch!(pub fn layer_norm(row: &mut [f32], g: &[f32], b: &[f32], eps: f32); via layer_norm_g);

/// [`layer_norm`] on every `h`-wide row of `rows`, in one dispatched call.
#[inline(always)]
fn layer_norm_each_g(rows: &mut [f32], h: usize, g: &[f32], b: &[f32], eps: f32) {
    for row in rows.chunks_exact_mut(h) {
        layer_norm_g(row, g, b, eps);
    }
}
dispatch!(pub(crate) fn layer_norm_each(rows: &mut [f32], h: usize, g: &[f32], b: &[f32], eps: f32); via layer_norm_each_g);

#[inline(always)]
fn activate_g(xs: &mut [f32], act: Activation) {
    match act {
        Activation::Gelu => xs
            .iter_mut()
            .for_each(|x| *x = act_one(*x, Activation::Gelu)),
        Activation::GeluNew => xs
            .iter_mut()
            .for_each(|x| *x = act_one(*x, Activation::GeluNew)),
        Activation::Relu => xs
            .iter_mut()
            .for_each(|x| *x = act_one(*x, Activation::Relu)),
        Activation::Silu => xs
            .iter_mut()
            .for_each(|x| *x = act_one(*x, Activation::Silu)),
        Activation::Tanh => xs
            .iter_mut()
            .for_each(|x| *x = act_one(*x, Activation::Tanh)),
    }
}
dispatch!(pub fn activate(xs: &mut [f32], act: Activation); via activate_g);

/// Softmax over the entries whose `keep` is 1 (all of them when `keep` is empty); the
/// others become 0 (HF adds the dtype's minimum to them, which underflows to exactly 0
/// after the exponential).
#[inline(always)]
pub(crate) fn softmax_masked_g(row: &mut [f32], keep: &[f32]) {
    let all = keep.iter().all(|&k| k != 0.0);
    if !all {
        for (v, &k) in row.iter_mut().zip(keep) {
            if k == 0.0 {
                *v = f32::NEG_INFINITY;
            }
        }
    }
    // Whole 16-lane chunks, the ragged end through a chunk padded with -inf (which
    // comes out as 0), so no step runs scalar.
    let full = row.len() / 16 * 16;
    let rest = row.len() - full;
    let mut tail = [f32::NEG_INFINITY; 16];
    tail[..rest].copy_from_slice(&row[full..]);
    let (body, _) = row.split_at_mut(full);
    let mut mx = tail;
    for c in body.chunks_exact(16) {
        for j in 0..16 {
            mx[j] = mx[j].max(c[j]);
        }
    }
    let m = mx.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let mut acc = [0f32; 16];
    let exp_chunk = |c: &mut [f32], acc: &mut [f32; 16]| {
        for j in 0..16 {
            let e = fast_exp(c[j] - m);
            let e = if c[j] == f32::NEG_INFINITY { 0.0 } else { e };
            c[j] = e;
            acc[j] += e;
        }
    };
    for c in body.chunks_exact_mut(16) {
        exp_chunk(c, &mut acc);
    }
    exp_chunk(&mut tail, &mut acc);
    let inv = 1.0 / acc.iter().sum::<f32>();
    for v in body.iter_mut() {
        *v *= inv;
    }
    for (v, t) in row[full..].iter_mut().zip(&tail[..rest]) {
        *v = t * inv;
    }
}
dispatch!(pub fn softmax_masked(row: &mut [f32], keep: &[f32]); via softmax_masked_g);

/// [`softmax_masked`] on every `width`-wide row of `rows`, in one dispatched call (a short
/// input's attention has many rows of a dozen scores: the per-call cost would dominate).
#[inline(always)]
fn softmax_rows_g(rows: &mut [f32], width: usize, keep: &[f32]) {
    for row in rows.chunks_exact_mut(width) {
        softmax_masked_g(row, keep);
    }
}
dispatch!(pub fn softmax_rows(rows: &mut [f32], width: usize, keep: &[f32]); via softmax_rows_g);

/// The largest value of `row`, NaN ignored (`-inf` when empty or all NaN): what
/// `fold(f32::NEG_INFINITY, f32::max)` gives, in sixteen independent lanes instead of one
/// chain of dependent comparisons (a vocabulary of 49152 logits: ~50 us -> a few).
#[inline(always)]
fn max_value_g(row: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut it = row.chunks_exact(16);
    for c in &mut it {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l = if x > *l { x } else { *l };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &x in lanes.iter().chain(it.remainder()) {
        m = if x > m { x } else { m };
    }
    m
}
dispatch!(pub fn max_value(row: &[f32]) -> f32; via max_value_g);

/// The position of the first of the largest values of `row` (0 when it is empty, or when its
/// first value is NaN and so never beaten): a serial scan's answer, from [`max_value`] and a
/// search for its first position sixteen values at a time.
#[inline(always)]
fn argmax_g(row: &[f32]) -> usize {
    if row.first().is_none_or(|x| x.is_nan()) {
        return 0;
    }
    let m = max_value_g(row);
    for (i, c) in row.chunks(16).enumerate() {
        if c.iter().fold(false, |hit, &x| hit | (x == m)) {
            return 16 * i + c.iter().position(|&x| x == m).unwrap_or(0);
        }
    }
    0
}
dispatch!(pub fn argmax(row: &[f32]) -> usize; via argmax_g);

/// `gate = silu(gate) * up`, in place.
#[inline(always)]
fn silu_mul_g(gate: &mut [f32], up: &[f32]) {
    for (g, &u) in gate.iter_mut().zip(up) {
        *g = *g / (1.0 + fast_exp(-*g)) * u;
    }
}
dispatch!(pub fn exp_sum(row: &[f32], max: f32) -> f64; via exp_sum_g);

/// `sum(exp(row - max))` (a log-softmax's denominator over a vocabulary): [`fast_exp`] in
/// sixteen f32 lanes per run of 1024 values, the runs summed in f64 (within ~1e-6 relative of
/// an f64 sum of libm's `exp`, at a small fraction of its time).
#[inline(always)]
fn exp_sum_g(row: &[f32], max: f32) -> f64 {
    let mut total = 0f64;
    for run in row.chunks(1024) {
        let mut lanes = [0f32; 16];
        let mut it = run.chunks_exact(16);
        for c in &mut it {
            for (l, &v) in lanes.iter_mut().zip(c) {
                *l += fast_exp(v - max);
            }
        }
        for &v in it.remainder() {
            lanes[0] += fast_exp(v - max);
        }
        total += lanes.iter().map(|&l| l as f64).sum::<f64>();
    }
    total
}

dispatch!(pub fn silu_mul(gate: &mut [f32], up: &[f32]); via silu_mul_g);

/// `a *= b`, element by element.
#[inline(always)]
fn mul_in_place_g(a: &mut [f32], b: &[f32]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x *= y;
    }
}
dispatch!(pub fn mul_in_place(a: &mut [f32], b: &[f32]); via mul_in_place_g);

/// Rows that are worth splitting across threads only when there is enough work: `f` gets runs
/// of whole rows.
fn rows_par<F: Fn(&mut [f32]) + Sync + Send>(x: &mut [f32], width: usize, par: bool, f: F) {
    if par && x.len() >= 1 << 16 {
        chunks_par(x, width * 16, &f);
    } else {
        f(x);
    }
}

/// `f` over chunks of `chunk` values of `x` (the last may be shorter), spread over the threads
/// by [`par_tasks`].
fn chunks_par<F: Fn(&mut [f32]) + Sync>(x: &mut [f32], chunk: usize, f: &F) {
    let len = x.len();
    let ptr = SendPtr(x.as_mut_ptr());
    par_tasks(len.div_ceil(chunk), |c| {
        let p = ptr;
        let (a, b) = (c * chunk, ((c + 1) * chunk).min(len));
        // SAFETY: chunk c (a..b, within x) is this task's only.
        f(unsafe { std::slice::from_raw_parts_mut(p.0.add(a), b - a) });
    });
}

/// [`layer_norm`] of every `h`-wide row of `x` with gain, bias and epsilon; `par` splits the
/// rows over rayon's threads when there are enough of them.
pub fn layer_norm_rows(
    x: &mut [f32],
    h: usize,
    (g, b, eps): &(Vec<f32>, Vec<f32>, f32),
    par: bool,
) {
    rows_par(x, h, par, |rows| layer_norm_each(rows, h, g, b, *eps));
}

/// [`activate`] over all of `x`, in chunks over rayon's threads when `par` and large enough.
pub fn activate_par(x: &mut [f32], act: Activation, par: bool) {
    let chunk = 4096;
    let f = |c: &mut [f32]| activate(c, act);
    if par && x.len() >= 1 << 16 {
        chunks_par(x, chunk, &f);
    } else {
        f(x);
    }
}

/// One AdamW step on a run of values, torch's single-tensor order: decay (`wd`, 1 for none),
/// gradient times `coef` (clipping), moments, then `p -= step * m / (sqrt(v) / bc2_sqrt + eps)`.
/// `k = [b1, b2, step, bc2_sqrt, eps, wd, coef]`.
#[inline(always)]
fn adamw_update_g(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &[f32; 7]) {
    let [b1, b2, step, bc2s, eps, wd, coef] = *k;
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        let p0 = *p * wd;
        let gj = g * coef;
        *m += (gj - *m) * (1.0 - b1);
        *v = *v * b2 + gj * gj * (1.0 - b2);
        let denom = v.sqrt() / bc2s + eps;
        *p = p0 - step * (*m / denom);
    }
}
dispatch!(pub fn adamw_update(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: &[f32; 7]); via adamw_update_g);

/// GELU (erf)'s backward: `g * (Phi(x) + x * phi(x))` into `out`, as training needs it.
#[inline(always)]
fn gelu_erf_grad_g(x: &[f32], g: &[f32], out: &mut [f32]) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    for ((o, &x), &g) in out.iter_mut().zip(x).zip(g) {
        let cdf = 0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2));
        *o = g * (cdf + x * INV_SQRT_2PI * fast_exp(-0.5 * x * x));
    }
}
dispatch!(pub fn gelu_erf_grad(x: &[f32], g: &[f32], out: &mut [f32]); via gelu_erf_grad_g);

/// Softmax's backward over `width`-wide rows: `out = p * (g - sum(p * g))` per row.
#[inline(always)]
fn softmax_grad_rows_g(p: &[f32], g: &[f32], width: usize, out: &mut [f32]) {
    for ((pr, gr), or) in p
        .chunks_exact(width)
        .zip(g.chunks_exact(width))
        .zip(out.chunks_exact_mut(width))
    {
        let dot = dot16(pr, gr);
        for ((o, &p), &g) in or.iter_mut().zip(pr).zip(gr) {
            *o = p * (g - dot);
        }
    }
}
dispatch!(pub fn softmax_grad_rows(p: &[f32], g: &[f32], width: usize, out: &mut [f32]); via softmax_grad_rows_g);

/// LayerNorm's backward over `h`-wide rows of `x` (gain `w`, epsilon `eps`) for the output
/// gradient `g`: the input gradient into `dx`, and the gain and bias gradients added to `dw`
/// and `db` (`h` each). Recomputes each row's mean and deviation as [`layer_norm`] does.
#[inline(always)]
fn layer_norm_grad_rows_g(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    eps: f32,
    dx: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
) {
    let h = w.len();
    let n = h as f32;
    let mut xhat = vec![0f32; h];
    let mut gw = vec![0f32; h];
    for ((xr, gr), dr) in x
        .chunks_exact(h)
        .zip(g.chunks_exact(h))
        .zip(dx.chunks_exact_mut(h))
    {
        let mean = sum16(xr) / n;
        for (t, &v) in xhat.iter_mut().zip(xr) {
            *t = v - mean;
        }
        let inv = 1.0 / (dot16(&xhat, &xhat) / n + eps).sqrt();
        for t in xhat.iter_mut() {
            *t *= inv;
        }
        for ((((gw, &gv), &wv), &t), (dwv, dbv)) in gw
            .iter_mut()
            .zip(gr)
            .zip(w)
            .zip(&xhat)
            .zip(dw.iter_mut().zip(db.iter_mut()))
        {
            *gw = gv * wv;
            *dwv += gv * t;
            *dbv += gv;
        }
        let m1 = sum16(&gw) / n;
        let m2 = dot16(&gw, &xhat) / n;
        for ((d, &a), &t) in dr.iter_mut().zip(&gw).zip(&xhat) {
            *d = (a - m1 - t * m2) * inv;
        }
    }
}
dispatch!(pub fn layer_norm_grad_rows(x: &[f32], w: &[f32], g: &[f32], eps: f32, dx: &mut [f32], dw: &mut [f32], db: &mut [f32]); via layer_norm_grad_rows_g);

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorized maximum and first argmax give a serial scan's answers, NaNs, ties and
    /// signed zeros included.
    #[test]
    fn max_and_argmax_match_a_serial_scan() {
        let serial_max = |r: &[f32]| r.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let serial_argmax = |r: &[f32]| {
            let mut best = 0;
            for (i, s) in r.iter().enumerate() {
                if *s > r[best] {
                    best = i;
                }
            }
            best
        };
        let mut rows: Vec<Vec<f32>> = vec![
            vec![],
            vec![f32::NAN, 1.0, 2.0],
            vec![1.0, f32::NAN, 3.0, f32::NAN],
            vec![f32::NEG_INFINITY; 40],
            vec![0.0, -0.0, 0.0],
            vec![f32::NAN; 5],
        ];
        // Ties at the top in different lanes and runs, and lengths around the lane width.
        for len in [1usize, 15, 16, 17, 33, 1000, 49152] {
            let r: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1009) as f32 * 0.5 - 200.0)
                .collect();
            rows.push(r);
        }
        let mut tie = vec![0f32; 100];
        tie[37] = 5.0;
        tie[70] = 5.0;
        tie[99] = 5.0;
        rows.push(tie);
        for r in &rows {
            assert_eq!(argmax(r), serial_argmax(r), "{:?}", &r[..r.len().min(8)]);
            let (a, b) = (max_value(r), serial_max(r));
            assert!(a == b || (a.is_nan() && b.is_nan()), "{a} {b}");
        }
    }

    /// A vocabulary-sized row (odd length, masked tokens): the f64 sum of libm's exp.
    #[test]
    fn exp_sum_matches_f64_sum() {
        let mut row = crate::kernels::cpu::test_values(49_157, 3, 12.0);
        row[5] = f32::NEG_INFINITY;
        row[40_000] = f32::NEG_INFINITY;
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let want: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
        let got = exp_sum(&row, max);
        assert!(((got - want) / want).abs() < 2e-6, "{got} vs {want}");
        assert_eq!(exp_sum(&[], 0.0), 0.0);
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in -8700..=8800 {
            let x = i as f32 / 100.0;
            let e = (x as f64).exp();
            let rel = ((fast_exp(x) as f64 - e) / e).abs();
            worst = worst.max(rel);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(fast_exp(-1e4), fast_exp(-87.0));
    }

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
    fn softmax_masks_and_normalises() {
        let mut row = vec![1.0, 2.0, 3.0, 100.0];
        softmax_masked(&mut row, &[1.0, 1.0, 1.0, 0.0]);
        assert_eq!(row[3], 0.0);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let s: f64 = e.iter().sum();
        for i in 0..3 {
            assert!((row[i] as f64 - e[i] / s).abs() < 1e-6);
        }
    }

    /// Lengths around the 16-lane chunks (the ragged end goes through a padded chunk), with
    /// and without a mask, against f64.
    #[test]
    fn softmax_matches_f64_at_every_length() {
        for len in [1, 15, 16, 17, 37, 351] {
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 23) as f32 / 3.0 - 4.0)
                .collect();
            for masked in [false, true] {
                let keep: Vec<f32> = if masked {
                    (0..len)
                        .map(|i| if i % 3 == 1 { 0.0 } else { 1.0 })
                        .collect()
                } else {
                    Vec::new()
                };
                let kept = |i: usize| keep.is_empty() || keep[i] != 0.0;
                let m = (0..len).filter(|&i| kept(i)).map(|i| x[i] as f64);
                let m = m.fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = (0..len)
                    .map(|i| {
                        if kept(i) {
                            (x[i] as f64 - m).exp()
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let sum: f64 = e.iter().sum();
                let mut row = x.clone();
                softmax_masked(&mut row, &keep);
                for i in 0..len {
                    let d = (row[i] as f64 - e[i] / sum).abs();
                    assert!(d < 1e-6, "len {len} masked {masked} at {i}: {d}");
                }
            }
        }
    }
}
