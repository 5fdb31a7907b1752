//! The blocking shared by the packed-weight products ([`super::int8`], [`super::bf16`]):
//! weights in panels of [`PANEL`] columns, microkernels of up to [`MR`] rows x one panel, and
//! the loops around them ([`drive`]).
//!
//! Jobs are (run of up to 480 rows, run of panels), enough of them to balance the threads,
//! each writing its own part of `out`. A job goes panel by panel, and builds each panel's f32
//! sums chunk by chunk of inputs: each chunk of the panel's weights (16 KiB) stays in L1 while
//! all the job's rows pass over it. The sums live in a per-thread tile (one panel wide)
//! between chunks; the last chunk's kernel call writes `out` itself (scaled, plus bias and
//! residual: [`Epi`]).

use super::threads::{par_tasks, SendPtr};

/// Columns per packed panel.
pub const PANEL: usize = 32;
/// Rows per kernel call.
pub const MR: usize = 6;
/// Row blocks per job (480 rows: a chunk of their activations, 480 x 512 bytes in int8, stays
/// in L2 while every panel of the job passes over it). Each job streams its panels' weights
/// once: with runs of 48 rows, one BERT-base input of 128 tokens read every weight three times
/// (int8: 22.9-24.6 -> 21.9-22.8 ms per request at 480 rows; MiniLM at batch 32, 448 rows,
/// level or a few percent faster).
const RUN_BLOCKS: usize = 80;

thread_local! {
    /// A job's f32 sums between chunks, reused from product to product (no page faults on
    /// fresh allocations). Taken out while in use, so a nested call just allocates its own.
    static TILE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// `by_rows!(mr, f(args..))` calls `f::<R>(args..)` with `R = mr` (1..=[`MR`]; the kernels
/// keep a call's sums in registers, so the row count is a constant).
macro_rules! by_rows {
    ($mr:expr, $($f:ident)::+, ($($arg:expr),* $(,)?)) => {
        match $mr {
            6 => $($f)::+::<6>($($arg),*),
            5 => $($f)::+::<5>($($arg),*),
            4 => $($f)::+::<4>($($arg),*),
            3 => $($f)::+::<3>($($arg),*),
            2 => $($f)::+::<2>($($arg),*),
            _ => $($f)::+::<1>($($arg),*),
        }
    };
}
pub(crate) use by_rows;
const _: () = assert!(MR == 6, "by_rows! lists the row counts up to MR");

/// Where a kernel call's last chunk writes: `out = sums * sw + bias (+ residual)` for
/// `sw.len()` columns of the call's rows (row stride `ld` in `out` and `res`).
#[derive(Clone, Copy)]
pub struct Epi<'a> {
    pub sw: &'a [f32],
    pub bias: &'a [f32],
    pub res: Option<&'a [f32]>,
    pub out: *mut f32,
    pub ld: usize,
}

impl Epi<'_> {
    /// The same columns from row `r` on (`check` for the rows before it must have passed).
    #[inline(always)]
    pub fn rows_from(&self, r: usize) -> Self {
        Self {
            res: self.res.map(|res| &res[r * self.ld..]),
            // SAFETY: the caller's rows include row r (`check`), so this stays in `out`.
            out: unsafe { self.out.add(r * self.ld) },
            ..*self
        }
    }

    /// Checks a kernel relies on for `mr` rows.
    pub fn check(&self, mr: usize) {
        let cols = self.sw.len();
        assert!(cols <= PANEL && self.bias.len() == cols && self.ld >= cols);
        if let Some(r) = self.res {
            assert!(r.len() >= (mr - 1) * self.ld + cols);
        }
    }
}

/// The checks every packed product starts with: `x` `[rows, k]`, `out` `[rows, n]`, `bias`
/// `n`, `residual` `[rows, n]`. Returns whether to split the work over rayon's threads
/// (asked for, and at least `min_work` products), or `None` when there is nothing to do.
#[allow(clippy::too_many_arguments)]
pub fn checked_par(
    x: &[f32],
    rows: usize,
    (k, n): (usize, usize),
    bias: &[f32],
    residual: Option<&[f32]>,
    out: &[f32],
    par: bool,
    min_work: usize,
) -> Option<bool> {
    assert!(x.len() >= rows * k && out.len() >= rows * n && bias.len() == n);
    if let Some(r) = residual {
        assert!(r.len() >= rows * n);
    }
    if rows == 0 || n == 0 {
        return None;
    }
    Some(par && rayon::current_num_threads() > 1 && rows * n * k >= min_work)
}

/// One kernel call: rows `ra..ra + mr` (a job's run of up to `RUN_BLOCKS * MR`, which the kernel walks
/// [`MR`] rows at a time), panel `p`, input chunk `chunk` (of `chunks`; the first starts the
/// sums, the last writes `epi`), sums in `tile` at row stride `ld`.
pub struct Call<'a> {
    pub ra: usize,
    pub mr: usize,
    pub p: usize,
    pub chunk: usize,
    pub tile: &'a mut [f32],
    pub ld: usize,
    pub epi: Option<Epi<'a>>,
}

/// Run `kernel` over every (rows, panel, chunk) of `out [rows, n] = x @ W * sw + bias (+
/// residual)`; `par` splits the jobs over rayon's threads. `kernel` is a type parameter, not
/// a `dyn`: a call per 6 x 32 tile is frequent enough that passing its arguments through
/// memory (a dynamic call) cost ~10% of MiniLM's int8 run.
///
/// # Safety
/// `kernel` must write through `epi.out` only the call's `mr` rows of `epi.sw.len()` columns
/// (row stride `epi.ld`); `out` holds `rows * n` values, `residual` too, `sw` and `bias` `n`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn drive<K: Fn(Call<'_>) + Sync>(
    rows: usize,
    n: usize,
    chunks: usize,
    (sw, bias, residual): (&[f32], &[f32], Option<&[f32]>),
    out: &mut [f32],
    par: bool,
    kernel: &K,
) {
    assert!(out.len() >= rows * n && sw.len() >= n && bias.len() >= n && chunks > 0);
    if let Some(r) = residual {
        assert!(r.len() >= rows * n);
    }
    let threads = rayon::current_num_threads();
    let panels = n.div_ceil(PANEL);
    let row_blocks = rows.div_ceil(MR);
    let row_runs = row_blocks.div_ceil(RUN_BLOCKS);
    let p_per = if par {
        panels.div_ceil((threads * 4).div_ceil(row_runs)).max(1)
    } else {
        panels
    };
    let p_runs = panels.div_ceil(p_per);
    let ptr = SendPtr(out.as_mut_ptr());
    let job = |i: usize| {
        let out_ptr = ptr;
        let (run, p_run) = (i / p_runs, i % p_runs);
        let (rb0, rb1) = (run * RUN_BLOCKS, ((run + 1) * RUN_BLOCKS).min(row_blocks));
        let (p0, p1) = (p_run * p_per, ((p_run + 1) * p_per).min(panels));
        let (r0, r1) = (rb0 * MR, (rb1 * MR).min(rows));
        let mut tile = TILE.take();
        if tile.len() < (r1 - r0) * PANEL {
            tile.resize((r1 - r0) * PANEL, 0.0);
        }
        // One call per (panel, chunk) for the job's whole run of rows: a call per 6 x 32 tile
        // spent ~15% of an int8 product in the calls themselves (arguments through memory,
        // the same checks again and again).
        for p in p0..p1 {
            let (j0, j1) = (p * PANEL, ((p + 1) * PANEL).min(n));
            for chunk in 0..chunks {
                let epi = (chunk + 1 == chunks).then(|| Epi {
                    sw: &sw[j0..j1],
                    bias: &bias[j0..j1],
                    res: residual.map(|r| &r[r0 * n + j0..(r1 - 1) * n + j1]),
                    // SAFETY: rows r0..r1 of out are in bounds (asserted above), and belong to
                    // this job for columns j0..j1.
                    out: unsafe { out_ptr.0.add(r0 * n + j0) },
                    ld: n,
                });
                kernel(Call {
                    ra: r0,
                    mr: r1 - r0,
                    p,
                    chunk,
                    tile: &mut tile[..],
                    ld: PANEL,
                    epi,
                });
            }
        }
        TILE.set(tile);
    };
    if par {
        par_tasks(row_runs * p_runs, job);
    } else {
        (0..row_runs * p_runs).for_each(job);
    }
}

/// The x86 kernels' shared ends: loading a call's running sums, and writing them (to the
/// tile, or through [`Epi`] to `out`).
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::Epi;
    use crate::kernels::cpu::simd::x86::lanes;
    use std::arch::x86_64::*;

    /// `R` rows x 32 columns of f32 sums: zero, or (`resume`) loaded from `c` (row stride
    /// `ld`).
    ///
    /// # Safety
    /// AVX-512F (the caller enables it); with `resume`, `c` holds `(R - 1) * ld + 32`.
    #[inline(always)]
    pub unsafe fn load_sums<const R: usize>(
        c: *const f32,
        ld: usize,
        resume: bool,
    ) -> [[__m512; 2]; R] {
        unsafe {
            let mut fa = [[_mm512_setzero_ps(); 2]; R];
            if resume {
                for (r, fa) in fa.iter_mut().enumerate() {
                    fa[0] = _mm512_loadu_ps(c.add(r * ld));
                    fa[1] = _mm512_loadu_ps(c.add(r * ld + 16));
                }
            }
            fa
        }
    }

    /// Lane masks of a panel's first and second 16 columns when only `cols` (of 32) exist.
    #[inline(always)]
    pub fn col_masks(cols: usize) -> (__mmask16, __mmask16) {
        (lanes(cols), lanes(cols.saturating_sub(16)))
    }

    /// Store the sums to `c` (row stride `ld`), or with `epi` write `sums (* sw when
    /// `scaled`) + bias (+ residual)` to its `out`, masked to its columns: a multiply, then
    /// adds, as the portable loops do.
    ///
    /// # Safety
    /// AVX-512F (the caller enables it); `c` holds `(R - 1) * ld + 32`; `epi` checked
    /// ([`Epi::check`]) and its `out` the call's own.
    #[inline(always)]
    pub unsafe fn finish<const R: usize>(
        fa: &[[__m512; 2]; R],
        c: *mut f32,
        ld: usize,
        epi: Option<&Epi<'_>>,
        scaled: bool,
    ) {
        unsafe {
            let Some(e) = epi else {
                for (r, fa) in fa.iter().enumerate() {
                    _mm512_storeu_ps(c.add(r * ld), fa[0]);
                    _mm512_storeu_ps(c.add(r * ld + 16), fa[1]);
                }
                return;
            };
            let (m0, m1) = col_masks(e.sw.len());
            let (sw, bias) = (e.sw.as_ptr(), e.bias.as_ptr());
            let (sw0, sw1) = (
                _mm512_maskz_loadu_ps(m0, sw),
                _mm512_maskz_loadu_ps(m1, sw.add(16)),
            );
            let bias0 = _mm512_maskz_loadu_ps(m0, bias);
            let bias1 = _mm512_maskz_loadu_ps(m1, bias.add(16));
            for (r, fa) in fa.iter().enumerate() {
                let (mut v0, mut v1) = if scaled {
                    (_mm512_mul_ps(fa[0], sw0), _mm512_mul_ps(fa[1], sw1))
                } else {
                    (fa[0], fa[1])
                };
                v0 = _mm512_add_ps(v0, bias0);
                v1 = _mm512_add_ps(v1, bias1);
                if let Some(res) = e.res {
                    let rp = res.as_ptr().add(r * e.ld);
                    v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, rp));
                    v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, rp.add(16)));
                }
                let o = e.out.add(r * e.ld);
                _mm512_mask_storeu_ps(o, m0, v0);
                _mm512_mask_storeu_ps(o.add(16), m1, v1);
            }
        }
    }
}
