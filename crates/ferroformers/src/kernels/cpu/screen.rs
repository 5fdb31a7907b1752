//! Greedy decoding's output projection read in int8, with the f32 answer kept: logits whose
//! largest value (and every value that decides a greedy step) is the f32 product's, bit for
//! bit, for a quarter of the bytes.
//!
//! A greedy step needs the largest logit, not all of them, and the projection (`[vocab, d]`,
//! tiny.en's 80 MB of f32) is most of what a decoding step reads. So:
//! 1. every logit is estimated from an int8 copy of the weights ([`Int8Weights`]: per-row
//!    scales, activations per block of [`BLOCK`]), 20 MB;
//! 2. each estimate `a_r` gets a rigorous error bound `e_r` against the f32 product `f_r`:
//!    `|f_r - a_r| <= 0.501 sum_b sx_b |w_r|_b + 0.501 s_r |x^|_1 + 1e-4 |x^|_1 max|w_r|`
//!    (activation rounding of block `b` times the row's absolute sum over the block; weight
//!    rounding, half the row's scale, times the rounded activations' absolute sum; then a
//!    margin for both products' f32 rounding, which is below `k * 2^-24` relative);
//! 3. `T` = the largest lower bound `a_r - e_r` among the screened tokens; every screened
//!    token whose upper bound `a_r + e_r` reaches `T` is computed again in f32 (the same
//!    kernel, so the same bits as the full product); the others keep their estimate, which is
//!    below `T`, itself at most the exact value of the token that set it.
//!
//! Tokens outside the screen are always computed in f32: the special tokens (`exact_from`
//! on) and a list of others (those a logits processor may suppress: they must not set `T`,
//! and whatever value they get is overwritten). So whichever subset of screened tokens a
//! processor leaves alone wholly or masks wholly, its largest logit and its argmax are the
//! f32 product's. What is not exact: the screened tokens far below the top, whose estimates
//! enter a softmax's sum. Callers use this where only the argmax (and comparisons of exact
//! values) decide: greedy search without log-probabilities.

use super::int8::{Int8Weights, BLOCK};
use super::linear::matmul_into;
use super::threads::{par_tasks, SendPtr};

/// A `[n, k]` projection (`x @ W^T`) with its int8 copy and the per-row bound terms.
pub struct ScreenedProjection {
    n: usize,
    k: usize,
    q: Int8Weights,
    /// Per row: `max |w_r| * (0.501 / 127 + 1e-4)`, the factor of `|x^|_1` in the bound.
    row_term: Vec<f32>,
    /// Per block of [`BLOCK`] inputs, per row: `0.501 * sum |w|` (`[blocks, n]`).
    block_l1: Vec<f32>,
    zeros: Vec<f32>,
}

/// Which tokens a screened product always computes in f32.
#[derive(Debug, Clone)]
pub struct ScreenPlan {
    /// Tokens from here on (special tokens) are always exact.
    exact_from: usize,
    /// Tokens below `exact_from` that are always exact and never set the threshold.
    always: Vec<u32>,
    skip: Vec<bool>,
}

impl ScreenPlan {
    /// Tokens `exact_from..` and `always` computed in f32; the rest screened.
    pub fn new(exact_from: usize, always: &[u32]) -> Self {
        let mut skip = vec![false; exact_from];
        let mut list: Vec<u32> = always
            .iter()
            .copied()
            .filter(|&t| (t as usize) < exact_from)
            .collect();
        list.sort_unstable();
        list.dedup();
        for &t in &list {
            skip[t as usize] = true;
        }
        Self {
            exact_from,
            always: list,
            skip,
        }
    }
}

/// The error bound of one row's estimates: per block `0.501 * sx_b` and the rounded
/// activations' absolute sum (an upper bound of it).
fn activation_terms(x: &[f32], sx: &mut Vec<f32>) -> Option<f32> {
    sx.clear();
    let mut l1 = 0f32;
    for blk in x.chunks(BLOCK) {
        let (lo, hi) = blk
            .iter()
            .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let s = (hi - lo) / 255.0;
        if !s.is_finite() {
            return None;
        }
        sx.push(0.501 * s);
        l1 += blk.iter().map(|v| v.abs()).sum::<f32>() + 0.501 * s * blk.len() as f32;
    }
    // (`min`/`max` above pass over NaN; the sum does not.) The sum in f32 is within a few
    // ulps: a relative margin covers it.
    l1.is_finite().then_some(l1 * (1.0 + 1e-5))
}

impl ScreenedProjection {
    /// `w` `[n, k]` row-major (`[out, in]`).
    pub fn new(w: &[f32], n: usize, k: usize) -> Self {
        assert_eq!(w.len(), n * k, "weight is not {n} x {k}");
        let q = Int8Weights::from_out_in(w, n, k);
        let nb = k.div_ceil(BLOCK);
        let mut row_term = vec![0f32; n];
        let mut block_l1 = vec![0f32; nb * n];
        // Runs of rows per task; each row's terms are its task's.
        const RUN: usize = 2048;
        let (tp, lp) = (
            SendPtr(row_term.as_mut_ptr()),
            SendPtr(block_l1.as_mut_ptr()),
        );
        par_tasks(n.div_ceil(RUN), |t| {
            let (tp, lp) = (tp, lp);
            for r in t * RUN..((t + 1) * RUN).min(n) {
                let row = &w[r * k..(r + 1) * k];
                let amax = row.iter().fold(0f32, |m, v| m.max(v.abs()));
                // SAFETY: row r's entries (r < n) of row_term (n) and of each block's run
                // of block_l1 (nb * n) are written by this task only.
                unsafe {
                    *tp.0.add(r) = amax * (0.501 / 127.0 + 1e-4);
                    for (b, blk) in row.chunks(BLOCK).enumerate() {
                        *lp.0.add(b * n + r) = 0.501 * blk.iter().map(|v| v.abs()).sum::<f32>();
                    }
                }
            }
        });
        Self {
            n,
            k,
            q,
            row_term,
            block_l1,
            zeros: vec![0f32; n],
        }
    }

    /// Logits `out [rows, n]` of `x [rows, k]` as the module says: exact (the f32 product of
    /// `w`, the same `[n, k]` matrix this was made from) for the plan's tokens and every
    /// screened token that could be the largest screened one, estimates below that for the
    /// rest. Returns how many logits per row were computed in f32, summed over the rows.
    pub fn logits_into(
        &self,
        w: &[f32],
        x: &[f32],
        rows: usize,
        plan: &ScreenPlan,
        out: &mut [f32],
        par: bool,
    ) -> usize {
        let (n, k) = (self.n, self.k);
        assert!(w.len() == n * k && x.len() >= rows * k && out.len() >= rows * n);
        assert!(plan.exact_from <= n, "plan for a larger vocabulary");
        let out = &mut out[..rows * n];
        self.q
            .linear_into(&x[..rows * k], rows, &self.zeros, None, out, par);
        let from = plan.exact_from;
        // The special tokens, all rows at once.
        if from < n {
            let mut special = vec![0f32; rows * (n - from)];
            matmul_into(
                x,
                rows,
                k,
                &w[from * k..],
                n - from,
                &mut special,
                false,
                par,
            );
            for (o, s) in out.chunks_exact_mut(n).zip(special.chunks_exact(n - from)) {
                o[from..].copy_from_slice(s);
            }
        }
        let (mut sx, mut ids, mut bounds) = (Vec::new(), Vec::new(), Vec::new());
        let mut computed = 0;
        for (i, o) in out.chunks_exact_mut(n).enumerate() {
            let xi = &x[i * k..(i + 1) * k];
            ids.clear();
            ids.extend_from_slice(&plan.always);
            let estimates_ok = o[..from].iter().all(|v| v.is_finite());
            match activation_terms(xi, &mut sx).filter(|_| estimates_ok) {
                Some(xl1) => {
                    // e_r for every screened token, block by block (contiguous, vectorised).
                    bounds.clear();
                    bounds.extend(self.row_term[..from].iter().map(|t| t * xl1));
                    for (b, &s) in sx.iter().enumerate() {
                        let l1 = &self.block_l1[b * n..b * n + from];
                        for (e, l) in bounds.iter_mut().zip(l1) {
                            *e += s * l;
                        }
                    }
                    let est = &o[..from];
                    let t = est
                        .iter()
                        .zip(&bounds)
                        .zip(&plan.skip)
                        .map(|((a, e), &skip)| if skip { f32::NEG_INFINITY } else { a - e })
                        .fold(f32::NEG_INFINITY, f32::max);
                    for (r, ((&a, &e), &skip)) in
                        est.iter().zip(&bounds).zip(&plan.skip).enumerate()
                    {
                        if !skip && a + e >= t {
                            ids.push(r as u32);
                        }
                    }
                }
                // Non-finite activations or estimates: every token in f32.
                None => ids.extend(0..from as u32),
            }
            // In place, run by run of consecutive ids (`always` then the candidates, each
            // ascending): no copy of the rows.
            ids.sort_unstable();
            let mut at = 0;
            while at < ids.len() {
                let start = ids[at] as usize;
                let mut end = start + 1;
                while at + (end - start) < ids.len() && ids[at + (end - start)] as usize == end {
                    end += 1;
                }
                let len = end - start;
                let wide = par && len * k >= 1 << 18;
                matmul_into(
                    xi,
                    1,
                    k,
                    &w[start * k..end * k],
                    len,
                    &mut o[start..end],
                    false,
                    wide,
                );
                at += len;
            }
            computed += ids.len() + (n - from);
        }
        computed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::linear::matmul;
    use crate::kernels::cpu::test_values as values;

    fn argmax(xs: &[f32]) -> usize {
        let mut best = 0;
        for (i, &v) in xs.iter().enumerate() {
            if v > xs[best] {
                best = i;
            }
        }
        best
    }

    /// Weights shaped like an embedding matrix (a few large rows), activations with a few
    /// large dimensions (as decoder states have), near ties planted at the top.
    fn case(n: usize, k: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut w = values(n * k, seed, 2.0);
        for (r, row) in w.chunks_exact_mut(k).enumerate() {
            let scale = if r % 97 == 0 { 0.5 } else { 0.05 };
            row.iter_mut().for_each(|v| *v *= scale);
        }
        let mut x = values(3 * k, seed + 1, 2.0);
        for (i, v) in x.iter_mut().enumerate() {
            if i % 61 == 0 {
                *v *= 20.0;
            }
        }
        // Rows 10 and 11 nearly equal (a tie within int8 rounding); row 12 their copy with
        // one weight nudged by an ulp-sized step.
        let r10 = w[10 * k..11 * k].to_vec();
        w[11 * k..12 * k].copy_from_slice(&r10);
        w[11 * k] += 1e-6;
        w[12 * k..13 * k].copy_from_slice(&r10);
        w[12 * k + 1] -= 1e-6;
        (w, x)
    }

    #[test]
    fn screened_logits_keep_the_f32_argmax_and_its_bits() {
        for (n, k, seed) in [(300, 384, 1), (1000, 100, 2), (517, 129, 3), (64, 7, 4)] {
            let (w, x) = case(n, k, seed);
            let full = matmul(&x, 3, k, &w, n, false);
            let proj = ScreenedProjection::new(&w, n, k);
            let from = n - n / 10;
            for always in [vec![], vec![argmax(&full[..from]) as u32, 3, 5]] {
                let plan = ScreenPlan::new(from, &always);
                let mut out = vec![0f32; 3 * n];
                let computed = proj.logits_into(&w, &x, 3, &plan, &mut out, true);
                assert!(computed < 3 * n, "{n} x {k}: nothing was screened out");
                for i in 0..3 {
                    let (f, o) = (&full[i * n..(i + 1) * n], &out[i * n..(i + 1) * n]);
                    // Special and always-exact tokens: the f32 bits.
                    for r in (from..n).chain(always.iter().map(|&t| t as usize)) {
                        assert_eq!(
                            f[r].to_bits(),
                            o[r].to_bits(),
                            "{n} x {k} row {i} token {r}"
                        );
                    }
                    // The screened tokens' maximum, with every processor-style mask: the
                    // plan's tokens masked, and then also the specials masked.
                    let mut fm = f.to_vec();
                    let mut om = o.to_vec();
                    for &t in &always {
                        fm[t as usize] = f32::NEG_INFINITY;
                        om[t as usize] = f32::NEG_INFINITY;
                    }
                    let best = argmax(&fm);
                    assert_eq!(argmax(&om), best, "{n} x {k} row {i}");
                    assert_eq!(om[best].to_bits(), fm[best].to_bits());
                    fm[from..].fill(f32::NEG_INFINITY);
                    om[from..].fill(f32::NEG_INFINITY);
                    let best = argmax(&fm[..from]);
                    assert_eq!(argmax(&om[..from]), best, "{n} x {k} row {i} text only");
                    assert_eq!(om[best].to_bits(), fm[best].to_bits());
                    // Every estimate left in place is below that maximum.
                    assert!(om[..from].iter().all(|&v| v <= om[best]));
                }
            }
        }
    }

    #[test]
    fn non_finite_activations_compute_every_token() {
        let (w, mut x) = case(200, 64, 5);
        x[3] = f32::NAN;
        let proj = ScreenedProjection::new(&w, 200, 64);
        let plan = ScreenPlan::new(180, &[]);
        let mut out = vec![0f32; 3 * 200];
        proj.logits_into(&w, &x, 3, &plan, &mut out, false);
        // Row 0 holds the NaN: all of its logits went through f32 (NaN, as the full product).
        assert!(out[..200].iter().all(|v| v.is_nan()));
        let full = matmul(&x, 3, 64, &w, 200, false);
        assert_eq!(argmax(&out[200..380]), argmax(&full[200..380]));
    }
}
