//! The blocking shared by the packed-weight products ([`super::int8`], [`super::bf16`]):
//! weights in panels of [`PANEL`] columns, microkernels of up to [`MR`] rows x one panel, and
//! the loops around them ([`drive`]).
//!
//! Jobs are (run of up to 48 rows, run of panels), enough of them to balance the threads, each
//! writing its own part of `out`. A job builds its f32 sums chunk by chunk of inputs: per
//! chunk, each panel's slice of weights (16 KiB) stays in L1 while the job's rows pass over it.
//! The sums live in a per-thread tile between chunks; the last chunk's kernel call writes
//! `out` itself (scaled, plus bias and residual: [`Epi`]).

use rayon::prelude::*;

use super::threads::SendPtr;

/// Columns per packed panel.
pub const PANEL: usize = 32;
/// Rows per kernel call.
pub const MR: usize = 6;
/// Row blocks per job (48 rows: the job's tile stays in L2).
const RUN_BLOCKS: usize = 8;

thread_local! {
    /// A job's f32 sums between chunks, reused from product to product (no page faults on
    /// fresh allocations). Taken out while in use, so a nested call just allocates its own.
    static TILE: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

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
    /// Checks a kernel relies on for `mr` rows.
    pub fn check(&self, mr: usize) {
        let cols = self.sw.len();
        assert!(cols <= PANEL && self.bias.len() == cols && self.ld >= cols);
        if let Some(r) = self.res {
            assert!(r.len() >= (mr - 1) * self.ld + cols);
        }
    }
}

/// One kernel call: rows `ra..ra + mr`, panel `p`, input chunk `chunk` (of `chunks`; the first
/// starts the sums, the last writes `epi`), sums in `tile` at row stride `ld`.
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
/// residual)`; `par` splits the jobs over rayon's threads.
///
/// # Safety
/// `kernel` must write through `epi.out` only the call's `mr` rows of `epi.sw.len()` columns
/// (row stride `epi.ld`); `out` holds `rows * n` values, `residual` too, `sw` and `bias` `n`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn drive(
    rows: usize,
    n: usize,
    chunks: usize,
    (sw, bias, residual): (&[f32], &[f32], Option<&[f32]>),
    out: &mut [f32],
    par: bool,
    kernel: &(dyn Fn(Call<'_>) + Sync),
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
        let width = (p1 - p0) * PANEL;
        let mut tile = TILE.take();
        if tile.len() < (r1 - r0) * width {
            tile.resize((r1 - r0) * width, 0.0);
        }
        for chunk in 0..chunks {
            for p in p0..p1 {
                let (j0, j1) = (p * PANEL, ((p + 1) * PANEL).min(n));
                for rb in rb0..rb1 {
                    let ra = rb * MR;
                    let mr = MR.min(rows - ra);
                    let at = (ra - r0) * width + (p - p0) * PANEL;
                    let epi = (chunk + 1 == chunks).then(|| Epi {
                        sw: &sw[j0..j1],
                        bias: &bias[j0..j1],
                        res: residual.map(|r| &r[ra * n + j0..(ra + mr - 1) * n + j1]),
                        // SAFETY: rows ra..ra + mr of out are in bounds (asserted above), and
                        // belong to this job for columns j0..j1.
                        out: unsafe { out_ptr.0.add(ra * n + j0) },
                        ld: n,
                    });
                    kernel(Call {
                        ra,
                        mr,
                        p,
                        chunk,
                        tile: &mut tile[at..],
                        ld: width,
                        epi,
                    });
                }
            }
        }
        TILE.set(tile);
    };
    if par {
        (0..row_runs * p_runs).into_par_iter().for_each(job);
    } else {
        (0..row_runs * p_runs).for_each(job);
    }
}
