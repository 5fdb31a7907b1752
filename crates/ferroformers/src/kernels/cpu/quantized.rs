//! Matmuls over GGUF's quantized blocks on CPU.
//!
//! The weights stay in their blocks (decoding one token reads ~4x fewer bytes than f32
//! weights); each row is unpacked ([`super::blocks`]) right before use. Two kinds of
//! arithmetic, chosen per model ([`QuantMath`]):
//! - exact: f32 activations, the numbers transformers gives when it loads a GGUF file (it
//!   dequantizes every tensor to f32);
//! - int8: activations rounded to 8 bits per block and integer dot products, as llama.cpp
//!   computes (its numbers, at a fraction of the arithmetic).
//!
//! Prompts and batches in exact mode dequantize a tile of weight rows once and multiply it by
//! every activation row with `gemm`; in int8 mode they run the integer GEMM of
//! [`super::qgemm`] on CPUs with AVX-512 VNNI, and the same `gemm` tiles over the rounded
//! activations elsewhere.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Result, Tensor};

use super::simd::{dispatch, dot16};
use super::threads::{in_worker, SendPtr};

use super::blocks::{self, block_shape, f16_at, Unpacked};

/// How products over GGUF blocks treat the activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QuantMath {
    /// f32 activations: logits equal transformers' (which dequantizes GGUF weights to f32).
    Exact,
    /// Activations rounded to 8 bits per block (Q8_0/Q8_1/Q8_K) and integer dot products:
    /// llama.cpp's arithmetic and speed.
    #[default]
    Int8,
}

impl QuantMath {
    /// The spellings [`QuantMath::parse`] takes (what the CLI offers).
    pub const NAMES: &'static [&'static str] = &["int8", "exact", "q8", "f32"];

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "exact" | "f32" => Some(QuantMath::Exact),
            "int8" | "q8" => Some(QuantMath::Int8),
            _ => None,
        }
    }

    /// The explicit choice, else `FERROFORMERS_GGUF_MATH`, else the default.
    pub fn resolve(explicit: Option<Self>) -> Self {
        explicit.or_else(Self::from_env).unwrap_or_default()
    }

    /// `FERROFORMERS_GGUF_MATH=exact|int8`, when set to one of those.
    pub fn from_env() -> Option<Self> {
        std::env::var("FERROFORMERS_GGUF_MATH")
            .ok()
            .and_then(|v| Self::parse(&v))
    }
}

/// Largest matrix (bytes) whose int8 decoding rows go four at a time through
/// [`super::vnni::dot4_blocks`]. Small matrices are bound by the instructions per block (one
/// call, one activation load and four independent sums do better: SmolLM2 Q4_1 decoding
/// ~10% faster on Zen 4); large ones by reading the weights, where four interleaved row
/// streams ran 10-20% slower than one (Qwen2.5's 144 MB Q8_0 output matrix).
const QUAD_MAX_BYTES: usize = 8 << 20;

/// Up to this many activation rows take the row-by-row kernels; more go to `gemm` tiles.
const FEW_ROWS: usize = 4;
/// From this many rows, batched decoding steps multiply kept panels
/// ([`QuantLinear::matmul_step`]); fewer take the row-by-row kernels. SmolLM2 Q4_1 on Zen 4,
/// 64 greedy steps: 4 rows 0.71-0.91 s kept against 0.81-1.05 s row by row, 2 rows 0.78-0.86
/// against 0.51-0.56 (panel making included).
const KEPT_MIN_ROWS: usize = 4;
/// Weight rows per `gemm` tile: 16 rows of the widest input (4864) are 311 KB, in L2.
const TILE_ROWS: usize = 16;

/// Per-thread buffers: an unpacked row, a dequantized tile.
#[derive(Default)]
struct Scratch {
    unpacked: Unpacked,
    /// Packed or split rows back in raw blocks.
    raw: Vec<u8>,
    tile: Vec<f32>,
    panel: super::qgemm::Panel,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// A `[n, k]` weight matrix kept in its GGUF blocks.
#[derive(Clone)]
pub struct QuantLinear {
    dtype: GgmlDType,
    n: usize,
    k: usize,
    row_bytes: usize,
    /// The blocks, 8-byte aligned (block structs hold f16 fields): raw, or each row in
    /// planes ([`super::packed`]) when `packed`.
    data: std::sync::Arc<Vec<u64>>,
    math: QuantMath,
    /// Rows in [`super::packed`]'s layout (the int8 mode on AVX-512 VNNI, 32-value types).
    packed: bool,
    /// A Q8_0 output projection in [`super::split8`]'s planes (then `data` is empty).
    split: Option<std::sync::Arc<super::split8::SplitQ8>>,
    /// The int8 panels of every tile, made at the first batched decoding step
    /// ([`Self::matmul_step`]) and kept: later steps skip the unpacking.
    kept: std::sync::Arc<std::sync::OnceLock<Vec<super::qgemm::Panel>>>,
    /// Batch invariance ([`Self::make_batch_invariant`]): every product, whatever its number
    /// of rows, multiplies the kept panels, so that a row's result never depends on the rows
    /// beside it.
    invariant: bool,
}

impl std::fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QuantLinear({:?}, [{}, {}])", self.dtype, self.n, self.k)
    }
}

impl QuantLinear {
    /// `None` when the block type has no row expansion here (the caller keeps candle's
    /// `QMatMul` for it).
    pub fn new(w: &QTensor) -> Result<Option<Self>> {
        use GgmlDType as D;
        let dtype = w.dtype();
        if !matches!(
            dtype,
            D::F32
                | D::F16
                | D::Q4_0
                | D::Q4_1
                | D::Q5_0
                | D::Q5_1
                | D::Q8_0
                | D::Q2K
                | D::Q3K
                | D::Q4K
                | D::Q5K
                | D::Q6K
        ) {
            return Ok(None);
        }
        let (n, k) = w.shape().dims2()?;
        if k % dtype.block_size() != 0 {
            return Ok(None);
        }
        let row_bytes = k / dtype.block_size() * dtype.type_size();
        let bytes = w.data()?;
        if bytes.len() != n * row_bytes {
            candle_core::bail!("quantized tensor: {} bytes for [{n}, {k}]", bytes.len());
        }
        Ok(Some(Self {
            dtype,
            n,
            k,
            row_bytes,
            data: std::sync::Arc::new(aligned_words(&[&bytes])),
            math: QuantMath::Exact,
            packed: false,
            split: None,
            kept: Default::default(),
            invariant: false,
        }))
    }

    /// The same matrix computing with `math`. The int8 mode packs 32-value block rows for
    /// the VNNI kernels where they run ([`super::packed`]; the same bytes, rearranged).
    pub fn with_math(mut self, math: QuantMath) -> Self {
        self.kept = Default::default();
        self.invariant = false;
        if self.split.is_some() {
            // Split planes serve the int8 mode only: back to raw blocks first.
            let mut raw = vec![0u8; self.n * self.row_bytes];
            let mut buf = Vec::new();
            for (r, out) in raw.chunks_exact_mut(self.row_bytes).enumerate() {
                out.copy_from_slice(self.raw_row(r, &mut buf));
            }
            self.data = std::sync::Arc::new(aligned_words(&[&raw]));
            self.split = None;
            self.packed = false;
        }
        self.math = math;
        let pack = math == QuantMath::Int8 && super::packed::packable(self.dtype, self.k);
        if pack != self.packed {
            // In place (a copy only where another QuantLinear shares the blocks).
            let len = self.n * self.row_bytes;
            let words = std::sync::Arc::make_mut(&mut self.data);
            // SAFETY: the words hold n * row_bytes initialised bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) };
            if pack {
                super::packed::pack_rows(self.dtype, bytes, self.k);
            } else {
                super::packed::unpack_rows(self.dtype, bytes, self.k);
            }
            self.packed = pack;
        }
        self
    }

    pub fn math(&self) -> QuantMath {
        self.math
    }

    pub fn out_features(&self) -> usize {
        self.n
    }

    /// The rows of `parts` stacked into one matrix (same block type and input size), so that
    /// q/k/v or gate/up run as one product: one pass over the activations, one thread fan-out.
    pub fn stack(parts: &[&QuantLinear]) -> Option<QuantLinear> {
        let first = parts.first()?;
        if parts.iter().any(|p| {
            p.split.is_some()
                || p.dtype != first.dtype
                || p.k != first.k
                || p.math != first.math
                || p.packed != first.packed
        }) {
            return None;
        }
        let n: usize = parts.iter().map(|p| p.n).sum();
        let blocks: Vec<&[u8]> = parts.iter().map(|p| p.bytes()).collect();
        Some(QuantLinear {
            dtype: first.dtype,
            n,
            k: first.k,
            row_bytes: first.row_bytes,
            data: std::sync::Arc::new(aligned_words(&blocks)),
            math: first.math,
            packed: first.packed,
            split: None,
            kept: Default::default(),
            invariant: false,
        })
    }

    /// For a Q8_0 output projection in the int8 mode on CPUs with AVX-512 VNNI: the matrix
    /// kept as [`super::split8`]'s two planes instead (the same values; greedy steps then
    /// read about half of it through [`Self::matmul_screened`]). Unchanged otherwise.
    pub fn split_for_screening(mut self) -> Self {
        if self.split.is_some()
            || self.dtype != GgmlDType::Q8_0
            || self.math != QuantMath::Int8
            || !self.k.is_multiple_of(64)
            || !super::split8::available()
        {
            return self;
        }
        let split = super::split8::SplitQ8::new(self.n, self.k, |r, out| {
            let mut buf = Vec::new();
            out.copy_from_slice(self.raw_row(r, &mut buf))
        });
        self.data = std::sync::Arc::new(Vec::new());
        self.packed = false;
        self.split = Some(std::sync::Arc::new(split));
        self.kept = Default::default();
        self.invariant = false;
        self
    }

    /// Greedy decoding's logits `x [m, k] @ W^T` for a split matrix ([`super::split8`]):
    /// exact for `always` and for every token that could be the largest of the rest,
    /// estimates below those for the others. `None` where the matrix is not split, and for
    /// more than one row: each row's screen reads the high plane again (half the matrix),
    /// where the full product of a batch reads the whole matrix once (SmolLM2 Q4_1, 16 greedy
    /// rows x 64 tokens: 2.23-2.35 s screened against 1.93-2.16 s in full).
    pub fn matmul_screened(&self, x: &[f32], m: usize, always: &[u32]) -> Option<Vec<f32>> {
        let s = self.split.as_ref()?;
        if m != 1 || !s.worth_screening() {
            return None;
        }
        let xq = blocks::QuantizedRows::quantize(x, self.k, 32);
        let mut out = vec![0f32; m * self.n];
        // Batch invariance: the candidates' values in the panels' f32 order, the bits a batched
        // step gives them.
        let invariant = self.batch_invariant();
        let computed = s.screened(&xq, m, always, &mut out, !in_worker(), invariant);
        if super::switch_on("FERROFORMERS_SCREEN_TRACE") {
            eprintln!("[screen] rows {m} exact {computed} of {}", m * self.n);
        }
        Some(out)
    }

    /// All rows' blocks.
    fn bytes(&self) -> &[u8] {
        assert!(
            self.data.len() * 8 >= self.n * self.row_bytes,
            "the blocks of a batch-invariant matrix are dropped: its panels serve its products"
        );
        // SAFETY: data holds n * row_bytes initialised bytes (checked above).
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr() as *const u8, self.n * self.row_bytes)
        }
    }

    /// Row `r` as stored (packed or raw).
    fn row(&self, r: usize) -> &[u8] {
        &self.bytes()[r * self.row_bytes..(r + 1) * self.row_bytes]
    }

    /// Row `r` in GGUF's raw blocks: the stored row, or a packed or split one unpacked into
    /// `buf`.
    fn raw_row<'a>(&'a self, r: usize, buf: &'a mut Vec<u8>) -> &'a [u8] {
        if let Some(s) = &self.split {
            buf.resize(self.row_bytes, 0);
            s.raw_row(r, buf);
            return buf;
        }
        if !self.packed {
            return self.row(r);
        }
        buf.resize(self.row_bytes, 0);
        super::packed::unpack_row(self.dtype, self.row(r), self.k, buf);
        buf
    }

    /// Row `r` as f32 (`out.len() == k`), exactly as the GGUF dequantization defines it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        SCRATCH.with(|s| {
            let s = &mut *s.borrow_mut();
            self.dequantize_into(r, &mut s.unpacked, &mut s.raw, out);
        })
    }

    /// `x [m, k] @ W^T` -> `[m, n]`.
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (n, k) = (self.n, self.k);
        debug_assert_eq!(x.len(), m * k);
        let mut out = vec![0f32; m * n];
        if self.batch_invariant() {
            // SAFETY: out holds m * n values.
            unsafe { self.matmul_panels(x, m, out.as_mut_ptr(), true) };
            return out;
        }
        if let Some(s) = &self.split {
            if m > FEW_ROWS && super::qgemm::available() {
                // Batches and prompts: panels packed from the planes, as for the other
                // matrices (a batch's rows then equal each row alone up to the f32 order).
                // SAFETY: out holds m * n values.
                unsafe { self.matmul_panels(x, m, out.as_mut_ptr(), false) };
                return out;
            }
            // Decoding rows: the same kernel as the screened steps' exact rows.
            let xq = blocks::QuantizedRows::quantize(x, k, 32);
            s.matmul(&xq, m, &mut out, n * k * m >= 1 << 16 && !in_worker());
            return out;
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        let blocky = block_shape(self.dtype).is_some();
        if blocky && self.math == QuantMath::Int8 && m > FEW_ROWS && super::qgemm::available() {
            // SAFETY: out holds m * n values.
            unsafe { self.matmul_panels(x, m, out.as_mut_ptr(), false) };
            return out;
        }
        // Int8 dots for decoding rows; prompts and batches (without the VNNI panels above) take
        // the gemm tiles in both modes (the row-by-row integer dots ran at a third of gemm's
        // speed on 128-512 token prompts). In int8 mode the tiles multiply the activations
        // rounded to 8 bits, so prompts see the same rounding as decoding (and as llama.cpp's
        // prompt processing).
        let int8 = blocky && self.math == QuantMath::Int8 && m <= FEW_ROWS;
        let rounded;
        let x = if blocky && self.math == QuantMath::Int8 && m > FEW_ROWS {
            let (sb, _) = block_shape(self.dtype).unwrap_or((32, 0));
            rounded = blocks::QuantizedRows::quantize(x, k, sb).dequantize();
            &rounded[..]
        } else {
            x
        };
        // Few activation rows (decoding): each weight row is unpacked once and dotted with
        // every activation row. More rows (prompts, batches): a tile of weight rows is
        // dequantized once and multiplied by all activation rows with `gemm`.
        let tiled = !int8 && m > FEW_ROWS;
        let rows_per_task = if tiled { TILE_ROWS } else { 16 };
        let fused512 = !int8
            && !tiled
            && avx512()
            && matches!(
                self.dtype,
                GgmlDType::Q4_0
                    | GgmlDType::Q4_1
                    | GgmlDType::Q5_0
                    | GgmlDType::Q5_1
                    | GgmlDType::Q8_0
            );
        let xq = if int8 {
            let (sb, _) = block_shape(self.dtype).unwrap_or((32, 0));
            Some(blocks::QuantizedRows::quantize(x, k, sb))
        } else {
            None
        };
        // AVX2 kernels that read the raw blocks; other types unpack each row first.
        let raw = blocky && !tiled && !fused512 && blocks::raw_kernels(self.dtype, int8);
        let unpacked = blocky && !tiled && !fused512 && !raw;
        let mut xsum = Vec::new();
        if unpacked && !int8 {
            for i in 0..m {
                let mut s = Vec::new();
                blocks::group_sums(&x[i * k..(i + 1) * k], &mut s);
                xsum.extend(s);
            }
        }
        // Int8 decoding rows over 32-value blocks on AVX-512 VNNI: four weight rows per call,
        // for matrices up to QUAD_MAX_BYTES.
        let groups = k / blocks::GROUP;
        let xrows: Vec<blocks::QRow<'_>> = match &xq {
            Some(xq) => (0..m).map(|i| xq.row(i)).collect(),
            None => Vec::new(),
        };
        let quad = raw
            && int8
            && super::vnni::has_dot4(self.dtype)
            && !self.packed
            && n * self.row_bytes <= QUAD_MAX_BYTES
            && xrows.len() == m
            && xrows.iter().all(|q| q.lanes.len() >= 8 * q.d.len());
        let task = |t: usize| {
            let r0 = t * rows_per_task;
            let r1 = (r0 + rows_per_task).min(n);
            let o = out_ptr;
            SCRATCH.with(|s| {
                let s = &mut *s.borrow_mut();
                if tiled {
                    s.tile.resize((r1 - r0) * k, 0.0);
                    for r in r0..r1 {
                        let out = &mut s.tile[(r - r0) * k..][..k];
                        self.dequantize_into(r, &mut s.unpacked, &mut s.raw, out);
                    }
                    // SAFETY: columns r0..r1 of out are written by this task only.
                    unsafe { gemm_tile(x, m, k, &s.tile, r1 - r0, o.0.add(r0), n) };
                    return;
                }
                if quad {
                    // Four weight rows per call (the last group filled with repeats of its
                    // last row): every row's value is the same whichever group it falls in.
                    for g0 in (r0..r1).step_by(4) {
                        let idx = [0, 1, 2, 3].map(|c| (g0 + c).min(r1 - 1));
                        let rows4 = idx.map(|j| self.row(j));
                        for (i, &q) in xrows.iter().enumerate() {
                            let v =
                                super::vnni::dot4_blocks(self.dtype, rows4, q).unwrap_or_default();
                            for (c, &j) in idx.iter().enumerate().take(r1 - g0) {
                                // SAFETY: (i, j) is written by this task only; i < m, j < n.
                                unsafe { *o.0.add(i * n + j) = v[c] };
                            }
                        }
                    }
                    return;
                }
                if self.packed && xrows.len() == m {
                    // Packed rows: the task's rows in one call per activation row.
                    let rows = &self.bytes()[r0 * self.row_bytes..r1 * self.row_bytes];
                    let mut v = [0f32; 16];
                    for (i, &q) in xrows.iter().enumerate() {
                        let done = super::packed::dot_rows(self.dtype, rows, q, &mut v);
                        debug_assert!(done, "packed rows without their kernel");
                        for (r, &v) in (r0..r1).zip(&v) {
                            // SAFETY: (i, r) is written by this task only; i < m, r < n.
                            unsafe { *o.0.add(i * n + r) = v };
                        }
                    }
                    return;
                }
                for r in r0..r1 {
                    let row = self.raw_row(r, &mut s.raw);
                    if unpacked {
                        s.unpacked.unpack(self.dtype, row, k);
                    } else if !blocky {
                        s.tile.resize(k, 0.0);
                        expand_row(self.dtype, row, &mut s.tile);
                    }
                    for i in 0..m {
                        let xi = &x[i * k..(i + 1) * k];
                        let v = if fused512 {
                            dot_blocks(self.dtype, row, xi)
                        } else if !blocky {
                            dot(&s.tile, xi)
                        } else if raw {
                            match xrows.get(i) {
                                Some(&q) => blocks::dot_int_blocks(self.dtype, row, q),
                                None => blocks::dot_exact_blocks(self.dtype, row, xi),
                            }
                            .unwrap_or_default()
                        } else {
                            match xrows.get(i) {
                                Some(&q) => blocks::dot_int(&s.unpacked, q),
                                None => blocks::dot_exact(
                                    &s.unpacked,
                                    xi,
                                    &xsum[i * groups..(i + 1) * groups],
                                ),
                            }
                        };
                        // SAFETY: (i, r) is written by this task only; i < m, r < n.
                        unsafe { *o.0.add(i * n + r) = v };
                    }
                }
            })
        };
        let tasks = n.div_ceil(rows_per_task);
        if n * k * m >= 1 << 16 && !in_worker() {
            // The kernels' pool: its workers spin briefly between calls, so the ~120
            // products of one decoding step do not pay a sleep/wake each (rayon did: ~15%).
            crate::kernels::cpu::threads::par_ranges(tasks, |range| range.for_each(task));
        } else {
            (0..tasks).for_each(task);
        }
        out
    }

    /// [`Self::matmul`] for one decoding step of a batch (one new token in each of `m` rows).
    /// In the int8 mode with the VNNI panels, the first such step over [`KEPT_MIN_ROWS`] rows
    /// or more keeps every tile's panel, and later ones multiply those instead of unpacking the
    /// weights again (the unpacking was 30% of a 16-row SmolLM2 step). The kept panels hold
    /// a byte per weight (half a byte for the 4-bit types, [`super::qgemm::Panel::kept`]),
    /// plus an f32 scale (and a minimum) per 32 weights: SmolLM2-135M Q4_1 ~+110 MB. `FERROFORMERS_NO_KEPT_PANELS=1` turns them off. The results are the bits
    /// the unkept panels give.
    pub fn matmul_step(&self, x: &[f32], m: usize) -> Vec<f32> {
        if m >= KEPT_MIN_ROWS && self.keeps_panels() {
            // Not zeroed first (that was ~5% of a 16-row step): the panels write every value.
            let mut out: Vec<f32> = Vec::with_capacity(m * self.n);
            // SAFETY: out has room for m * n values.
            unsafe { self.matmul_panels(x, m, out.as_mut_ptr(), true) };
            // SAFETY: the panels' first chunk wrote all m * n values (each tile its columns
            // of every row).
            unsafe { out.set_len(m * self.n) };
            return out;
        }
        self.matmul(x, m)
    }

    /// Whether batched decoding steps keep this matrix's panels (the int8 mode on CPUs with
    /// the VNNI panels, unless `FERROFORMERS_NO_KEPT_PANELS=1`).
    fn keeps_panels(&self) -> bool {
        let int8 = self.split.is_some()
            || (block_shape(self.dtype).is_some() && self.math == QuantMath::Int8);
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        int8 && super::qgemm::available()
            && !super::switch_once(&OFF, "FERROFORMERS_NO_KEPT_PANELS")
    }

    /// Make and keep the panels batched decoding steps multiply now (a server that batches
    /// calls this at load, so that no request waits for them), where they would be kept.
    pub fn keep_panels(&self) {
        if self.keeps_panels() {
            self.kept.get_or_init(|| self.pack_all());
        }
    }

    /// Make every later product of this matrix (and of clones made from it later)
    /// batch-invariant: each activation row's result the same bits whatever other rows share
    /// the call, so that a request generates the same tokens alone and in any batch, at any
    /// prompt chunking. All products, decoding rows included, then multiply the kept panels
    /// ([`Self::keep_panels`], made now), whose sums run in one f32 order per output (scale
    /// group after scale group) for any number of rows; a greedy step's screened output product
    /// ([`Self::matmul_screened`]) computes its candidate tokens in that order too (their
    /// values, the argmax among them, are a batch's bits). Only the int8 mode with the VNNI
    /// panels has such an order: elsewhere an error says why.
    ///
    /// The blocks themselves are dropped then (no product reads them again; a clone that
    /// still does, as a tied embedding table, keeps its own reference): a batch-invariant
    /// model holds its panels instead of panels and blocks.
    pub fn make_batch_invariant(&mut self) -> std::result::Result<(), String> {
        if let Some(why) = self.batch_invariance_problem() {
            return Err(why);
        }
        self.keep_panels();
        self.data = std::sync::Arc::new(Vec::new());
        self.invariant = true;
        Ok(())
    }

    /// Why [`Self::make_batch_invariant`] would fail here; `None` where it works.
    pub fn batch_invariance_problem(&self) -> Option<String> {
        if self.keeps_panels() {
            return None;
        }
        let why = if block_shape(self.dtype).is_none() {
            format!("{:?} weights are not GGUF blocks", self.dtype)
        } else if self.math != QuantMath::Int8 && self.split.is_none() {
            "it runs in the exact mode (--gguf-math exact); the int8 mode has it".into()
        } else if !super::qgemm::available() {
            "the CPU has no AVX-512 VNNI (or FERROFORMERS_NO_VNNI/NO_SIMD is set)".into()
        } else {
            "FERROFORMERS_NO_KEPT_PANELS is set".into()
        };
        Some(format!(
            "a {:?} [{}, {}] matrix has no batch-invariant product: {why}",
            self.dtype, self.n, self.k
        ))
    }

    /// Whether batch-invariant products cost this matrix nothing: it has them
    /// ([`Self::batch_invariance_problem`]), and a decoding row through its kept int8 panels
    /// is as fast as through its blocks on this CPU ([`panels_cost_nothing`]).
    pub fn batch_invariance_costs_nothing(&self) -> bool {
        panels_cost_nothing(self.dtype, self.n * self.row_bytes, super::intel_cores())
            && self.batch_invariance_problem().is_none()
    }

    /// Whether [`Self::make_batch_invariant`] has been called on this matrix.
    pub fn batch_invariant(&self) -> bool {
        self.invariant
    }

    /// Whether this matrix keeps its panels now (tests).
    #[cfg(test)]
    fn panels_kept(&self) -> bool {
        self.kept.get().is_some()
    }

    /// Tile `t`'s panel (weight rows `t * PANEL ..`) packed into `panel`.
    fn pack_tile(&self, t: usize, panel: &mut super::qgemm::Panel) {
        use super::qgemm::PANEL;
        let (r0, r1) = (t * PANEL, ((t + 1) * PANEL).min(self.n));
        if let Some(split) = &self.split {
            let (first, second): (Vec<&[u8]>, Vec<&[u8]>) =
                (r0..r1).map(|r| split.planes(r)).unzip();
            panel.pack_split(&first, &second, self.k);
            return;
        }
        let rows: Vec<&[u8]> = (r0..r1).map(|r| self.row(r)).collect();
        if self.packed {
            // Straight from the planes (no raw copy of the tile first).
            panel.pack_planes(self.dtype, &rows, self.k);
        } else {
            panel.pack(self.dtype, &rows, self.k);
        }
    }

    /// Every tile's panel, packed across the pool.
    fn pack_all(&self) -> Vec<super::qgemm::Panel> {
        use super::qgemm::{Panel, PANEL};
        let tasks = self.n.div_ceil(PANEL);
        let slots: Vec<std::sync::Mutex<Panel>> = (0..tasks).map(|_| Default::default()).collect();
        let task = |t: usize| {
            let mut p = Panel::default();
            self.pack_tile(t, &mut p);
            *slots[t].lock().unwrap_or_else(|e| e.into_inner()) = p.kept();
        };
        if !in_worker() {
            crate::kernels::cpu::threads::par_ranges(tasks, |range| range.for_each(task));
        } else {
            (0..tasks).for_each(task);
        }
        slots
            .into_iter()
            .map(|s| s.into_inner().unwrap_or_else(|e| e.into_inner()))
            .collect()
    }

    /// `x [m, k] @ W^T` into `out [m, n]` for prompts in the int8 mode on CPUs with AVX-512
    /// VNNI: tiles of weight rows unpacked into panels, integer sums ([`super::qgemm`]). With
    /// `keep`, the panels are made once and kept ([`Self::matmul_step`]); kept panels serve
    /// every later call.
    ///
    /// # Safety
    /// `out` must be valid for `m * n` writes, by no one else meanwhile; every value is
    /// written.
    unsafe fn matmul_panels(&self, x: &[f32], m: usize, out: *mut f32, keep: bool) {
        use super::qgemm::{Acts, PANEL};
        let (n, k) = (self.n, self.k);
        assert_eq!(x.len(), m * k, "matmul_panels: input size");
        let kept = if keep {
            Some(self.kept.get_or_init(|| self.pack_all()))
        } else {
            self.kept.get()
        };
        let acts = Acts::new(x, k, self.dtype);
        let out_ptr = SendPtr(out);
        let task = |t: usize| {
            let o = out_ptr;
            let r0 = t * PANEL;
            if let Some(panels) = kept {
                // SAFETY: out is m x n; columns r0..r0 + the panel's rows are written by this
                // task only.
                unsafe { panels[t].product_then(&acts, o.0.add(r0), n, panels.get(t + 1)) };
                return;
            }
            SCRATCH.with(|s| {
                let s = &mut *s.borrow_mut();
                self.pack_tile(t, &mut s.panel);
                // SAFETY: out is m x n; columns r0..r0 + the panel's rows are written by this
                // task only.
                unsafe { s.panel.product(&acts, o.0.add(r0), n) };
            })
        };
        let tasks = n.div_ceil(PANEL);
        if !in_worker() {
            crate::kernels::cpu::threads::par_ranges(tasks, |range| range.for_each(task));
        } else {
            (0..tasks).for_each(task);
        }
    }

    /// Row `r` as f32 through a caller's unpacking buffers.
    fn dequantize_into(&self, r: usize, u: &mut Unpacked, raw: &mut Vec<u8>, out: &mut [f32]) {
        let row = self.raw_row(r, raw);
        if block_shape(self.dtype).is_some() {
            u.unpack(self.dtype, row, self.k);
            blocks::dequantize(u, out);
        } else {
            expand_row(self.dtype, row, out)
        }
    }

    /// `xs [.., k]` -> `[.., n]` (f32 tensors on CPU).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let k = dims[dims.len() - 1];
        if k != self.k {
            candle_core::bail!(
                "quantized matmul: input has {k} features, weight {}",
                self.k
            );
        }
        let m: usize = dims[..dims.len() - 1].iter().product();
        let x: Vec<f32> = xs
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let out = self.matmul(&x, m);
        let mut out_dims = dims;
        let last = out_dims.len() - 1;
        out_dims[last] = self.n;
        Tensor::from_vec(out, out_dims, xs.device())
    }

    /// Rows `ids` as an f32 `[ids.len(), k]` tensor: an embedding lookup without keeping a
    /// dequantized copy of the table.
    pub fn embed(&self, ids: &[u32], device: &candle_core::Device) -> Result<Tensor> {
        let mut out = vec![0f32; ids.len() * self.k];
        for (row, &id) in out.chunks_exact_mut(self.k).zip(ids) {
            let id = id as usize;
            if id >= self.n {
                candle_core::bail!("token id {id} outside the embedding table ({})", self.n);
            }
            self.dequantize_row(id, row);
        }
        Tensor::from_vec(out, (ids.len(), self.k), device)
    }
}

/// `parts` back to back in 8-byte aligned storage (block structs hold f16 fields).
fn aligned_words(parts: &[&[u8]]) -> Vec<u64> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut data = vec![0u64; len.div_ceil(8)];
    // SAFETY: data owns at least len bytes, and any byte pattern is a valid u64.
    let dst = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut u8, len) };
    let mut off = 0;
    for p in parts {
        dst[off..off + p.len()].copy_from_slice(p);
        off += p.len();
    }
    data
}

/// AVX-512F with F16C: the hand-written block dots.
fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

dispatch!(fn dot(a: &[f32], b: &[f32]) -> f32; via dot16);

/// The hand-written AVX-512 fused dots (the 32-value types with f32 activations: 16 lanes,
/// FMA, no unpacking buffer). Callers check [`avx512`] first.
fn dot_blocks(dtype: GgmlDType, row: &[u8], x: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: callers checked AVX-512F and F16C; row holds whole blocks matching x.
        unsafe {
            match dtype {
                GgmlDType::Q4_0 => avx512::dot_q45::<1>(row, x),
                GgmlDType::Q4_1 => avx512::dot_q45::<2>(row, x),
                GgmlDType::Q5_0 => avx512::dot_q45::<3>(row, x),
                GgmlDType::Q5_1 => avx512::dot_q45::<4>(row, x),
                _ => avx512::dot_q8_0(row, x),
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (dtype, row, x);
        unreachable!("the AVX-512 dots are only reached on x86_64")
    }
}

/// `out[i * ldo + j] = x[i] . tile[j]` for `m` activation rows and `rows` dequantized weight
/// rows (`tile` is `[rows, k]`), through `gemm` on this thread.
///
/// # Safety
/// `out` must be valid for writes at `i * ldo + j` for `i < m`, `j < rows`.
unsafe fn gemm_tile(
    x: &[f32],
    m: usize,
    k: usize,
    tile: &[f32],
    rows: usize,
    out: *mut f32,
    ldo: usize,
) {
    debug_assert!(x.len() >= m * k && tile.len() >= rows * k);
    // SAFETY: x is m x k and tile rows x k, row-major; tile read as its transpose (k x rows);
    // the caller vouches for out.
    unsafe {
        gemm::gemm(
            m,
            rows,
            k,
            out,
            1,
            ldo as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            tile.as_ptr(),
            k as isize,
            1,
            1.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// How far ahead (bytes) the block loops prefetch: ~5 rows of a 576-wide Q4_1 matrix
    /// (1024 and 4096 were slower on SmolLM2).
    const PREFETCH: usize = 2048;

    /// The block's leading f16 scale (and, for Q4_1, the minimum after it) as f32 lanes 0 and 1.
    #[inline(always)]
    unsafe fn scales(blk: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((blk as *const i32).read_unaligned()))
    }

    /// One Q4/Q5 block (`T`: 1 Q4_0, 2 Q4_1, 3 Q5_0, 4 Q5_1): `acc += d * sum(q * x)` and,
    /// for Q4_1/Q5_1, `accm += m * sum(x)`, all in vector registers (a scalar chain across
    /// blocks was the bottleneck). The 16 bytes of nibbles are widened first; Q5's fifth bits
    /// go in as lane masks straight from their 32-bit word.
    #[inline(always)]
    unsafe fn q45_block<const T: u8>(
        blk: *const u8,
        xp: *const f32,
        acc: __m512,
        accm: __m512,
    ) -> (__m512, __m512) {
        let dm = scales(blk);
        let q32 = _mm512_cvtepu8_epi32(_mm_loadu_si128(blk.add(QS[T as usize]) as *const __m128i));
        let mut lo = _mm512_and_si512(q32, _mm512_set1_epi32(0x0F));
        let mut hi = _mm512_srli_epi32::<4>(q32);
        if T >= 3 {
            let qh = (blk.add(if T == 3 { 2 } else { 4 }) as *const u32).read_unaligned();
            let sixteen = _mm512_set1_epi32(16);
            lo = _mm512_mask_or_epi32(lo, qh as u16, lo, sixteen);
            hi = _mm512_mask_or_epi32(hi, (qh >> 16) as u16, hi, sixteen);
        }
        if T == 1 || T == 3 {
            let offset = _mm512_set1_epi32(if T == 1 { 8 } else { 16 });
            lo = _mm512_sub_epi32(lo, offset);
            hi = _mm512_sub_epi32(hi, offset);
        }
        let x0 = _mm512_loadu_ps(xp);
        let x1 = _mm512_loadu_ps(xp.add(16));
        let t = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(hi),
            x1,
            _mm512_mul_ps(_mm512_cvtepi32_ps(lo), x0),
        );
        let acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), t, acc);
        let accm = if T == 1 || T == 3 {
            accm
        } else {
            let m = _mm512_broadcastss_ps(_mm_movehdup_ps(dm));
            _mm512_fmadd_ps(m, _mm512_add_ps(x0, x1), accm)
        };
        (acc, accm)
    }

    /// Bytes per block and where the nibbles start, by `T` (0 unused: Q8_0 has its own loop).
    const STRIDE: [usize; 5] = [34, 18, 20, 22, 24];
    const QS: [usize; 5] = [2, 2, 4, 6, 8];

    /// Q4_0, Q4_1, Q5_0 or Q5_1 blocks (`T` as in [`q45_block`]).
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dot_q45<const T: u8>(row: &[u8], x: &[f32]) -> f32 {
        let stride = STRIDE[T as usize];
        let nb = row.len() / stride;
        assert!(x.len() >= nb * 32);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        // Two block streams with their own accumulators: independent FMA chains.
        let z = _mm512_setzero_ps();
        let (mut a0, mut m0, mut a1, mut m1) = (z, z, z, z);
        let mut b = 0;
        while b + 1 < nb {
            // The weights stream from L3 or memory: ask for them ahead of use (the loads after
            // each block's fetch were where the time went). Prefetches never fault.
            _mm_prefetch::<_MM_HINT_T0>(rp.wrapping_add(b * stride + PREFETCH) as *const i8);
            (a0, m0) = q45_block::<T>(rp.add(b * stride), xp.add(b * 32), a0, m0);
            (a1, m1) = q45_block::<T>(rp.add((b + 1) * stride), xp.add((b + 1) * 32), a1, m1);
            b += 2;
        }
        if b < nb {
            (a0, m0) = q45_block::<T>(rp.add(b * stride), xp.add(b * 32), a0, m0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(m0, m1)))
    }

    #[inline(always)]
    unsafe fn q8_block(blk: *const u8, xp: *const f32, acc: __m512) -> __m512 {
        let d = _mm512_broadcastss_ps(scales(blk));
        let q0 = _mm_loadu_si128(blk.add(2) as *const __m128i);
        let q1 = _mm_loadu_si128(blk.add(18) as *const __m128i);
        let w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
        let w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
        let t = _mm512_fmadd_ps(
            w1,
            _mm512_loadu_ps(xp.add(16)),
            _mm512_mul_ps(w0, _mm512_loadu_ps(xp)),
        );
        _mm512_fmadd_ps(d, t, acc)
    }

    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dot_q8_0(row: &[u8], x: &[f32]) -> f32 {
        let nb = row.len() / 34;
        assert!(x.len() >= nb * 32);
        let (rp, xp) = (row.as_ptr(), x.as_ptr());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut b = 0;
        while b + 1 < nb {
            _mm_prefetch::<_MM_HINT_T0>(rp.wrapping_add(b * 34 + PREFETCH) as *const i8);
            acc0 = q8_block(rp.add(b * 34), xp.add(b * 32), acc0);
            acc1 = q8_block(rp.add((b + 1) * 34), xp.add((b + 1) * 32), acc1);
            b += 2;
        }
        if b < nb {
            acc0 = q8_block(rp.add(b * 34), xp.add(b * 32), acc0);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1))
    }
}

#[inline(always)]
fn expand_f16(row: &[u8], out: &mut [f32]) {
    for (b, o) in row.chunks_exact(2).zip(out.iter_mut()) {
        *o = f16_at(b, 0);
    }
}

/// F16 and F32 rows as f32 (the block types go through [`blocks`]).
#[inline(always)]
fn expand_g(dtype: GgmlDType, row: &[u8], out: &mut [f32]) {
    match dtype {
        GgmlDType::F16 => expand_f16(row, out),
        _ => {
            for (b, o) in row.chunks_exact(4).zip(out.iter_mut()) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
    }
}

dispatch!(fn expand_row(dtype: GgmlDType, row: &[u8], out: &mut [f32]); via expand_g);

/// Whether one decoding row runs as fast through kept int8 panels as through the raw blocks,
/// for a matrix of `bytes` bytes of `dtype` blocks, on Intel's cores (`intel`) or AMD's.
/// Measured with `gguf_gemv_bench` (one row, 5-8 alternations, medians):
/// - AMD Zen 5 (session 44): the 4-bit types' panels (4.5, 5 and 4.4 bits a weight, as their
///   blocks) as fast or faster up to ~2.5 MB of blocks (SmolLM2-135M's matrices, Qwen2.5-0.5B's
///   Q4_K down), 15-25% slower for a 5.5 MB Q4_1 one (9728 x 896), which its blocks stream
///   from memory faster; Q8_0 the same at any size (SmolLM2's 30 MB output); Q5_0, Q6_K,
///   Q5_1, Q5_K and Q2_K 10-100% slower.
/// - Intel Ice Lake (session 45): every type's panels faster at every size measured (Q4_0,
///   Q4_1, Q4_K 25-40%, Q5_0, Q5_1 15-25%, Q6_K and Q8_0 5-20%, the 5.5 MB Q4_1 17%) but
///   Q5_K (level) and Q2_K, Q3_K (40-60% slower: their panels hold a byte a weight); served
///   Qwen2.5-Coder Q4_K_M decoded 43.0 against 32.4 tokens/s through its panels.
fn panels_cost_nothing(dtype: GgmlDType, bytes: usize, intel: bool) -> bool {
    use GgmlDType as D;
    /// The largest 4-bit matrix (bytes of blocks) measured as fast through its panels on Zen.
    const FOUR_BIT_MAX: usize = 2 << 20;
    match dtype {
        D::Q8_0 => true,
        D::Q4_0 | D::Q4_1 | D::Q4K | D::Q5_0 | D::Q5_1 | D::Q5K | D::Q6K if intel => true,
        D::Q4_0 | D::Q4_1 | D::Q4K => bytes <= FOUR_BIT_MAX,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::super::max_abs_diff;
    use super::*;
    use candle_core::Device;

    /// Every spelling the CLI offers parses.
    #[test]
    fn offered_names_parse() {
        assert!(QuantMath::NAMES
            .iter()
            .all(|n| QuantMath::parse(n).is_some()));
        use crate::pipelines::Quantize;
        assert!(Quantize::NAMES.iter().all(|n| Quantize::parse(n).is_some()));
    }

    const ALL: [GgmlDType; 12] = [
        GgmlDType::Q4_0,
        GgmlDType::Q4_1,
        GgmlDType::Q5_0,
        GgmlDType::Q5_1,
        GgmlDType::Q8_0,
        GgmlDType::Q2K,
        GgmlDType::Q3K,
        GgmlDType::Q4K,
        GgmlDType::Q5K,
        GgmlDType::Q6K,
        GgmlDType::F16,
        GgmlDType::F32,
    ];

    /// A `[n, k]` weight tensor and `m` activation rows of deterministic test values.
    fn weights_and_inputs(n: usize, k: usize, m: usize) -> (Tensor, Vec<f32>) {
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.5)
            .collect();
        let x = (0..m * k)
            .map(|i| ((i * 31 % 97) as f32 / 97.0) - 0.5)
            .collect();
        (Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap(), x)
    }

    #[test]
    fn matches_candle_dequantize_then_matmul() {
        let dev = Device::Cpu;
        let (n, k, m) = (40usize, 256usize, 3usize);
        let (w, x) = weights_and_inputs(n, k, m);
        let xt = Tensor::from_vec(x, (m, k), &dev).unwrap();
        for dt in ALL {
            let q = QTensor::quantize(&w, dt).unwrap();
            let dense = q.dequantize(&dev).unwrap();
            let want = xt.matmul(&dense.t().unwrap()).unwrap();
            let ql = QuantLinear::new(&q).unwrap().unwrap();
            // 3 rows take the row-by-row path, 6 the gemm tiles.
            let x6 = Tensor::cat(&[&xt, &xt], 0).unwrap();
            let want = Tensor::cat(&[&want, &want], 0).unwrap();
            let got = ql.forward(&x6).unwrap();
            let got3 = ql.forward(&xt.narrow(0, 0, m).unwrap()).unwrap();
            let got = Tensor::cat(&[&got.narrow(0, 0, m).unwrap(), &got3], 0).unwrap();
            let diff = max_abs_diff(&want, &got);
            assert!(diff < 1e-4, "{dt:?}: {diff}");
            let emb = ql.embed(&[3, 0], &dev).unwrap();
            let want = dense.narrow(0, 3, 1).unwrap().squeeze(0).unwrap();
            let d2 = max_abs_diff(&emb.get(0).unwrap(), &want);
            assert_eq!(d2, 0.0, "{dt:?} embed");
        }
    }

    /// Int8 mode: every row's product equals the integer dot of the unpacked row with the
    /// activations rounded to 8 bits (llama.cpp's arithmetic), for one row and for 4 rows
    /// (decoding, beams), and stays within the rounding's reach of the exact product; more
    /// rows (prompts) take the gemm tiles over the rounded activations.
    #[test]
    fn int8_mode_rounds_activations_like_llama_cpp() {
        let (n, k, m) = (37usize, 512usize, 6usize);
        let (w, x) = weights_and_inputs(n, k, m);
        for dt in ALL.into_iter().filter(|d| block_shape(*d).is_some()) {
            let q = QTensor::quantize(&w, dt).unwrap();
            let exact = QuantLinear::new(&q).unwrap().unwrap();
            let int8 = exact.clone().with_math(QuantMath::Int8);
            let (sb, _) = block_shape(dt).unwrap();
            let xq = blocks::QuantizedRows::quantize(&x, k, sb);
            let batch = int8.matmul(&x[..4 * k], 4);
            let want_exact = exact.matmul(&x, m);
            // Prompts: the VNNI panels (integer sums, checked against dot_int below), else the
            // gemm tiles over the activations rounded to 8 bits.
            let prompt = int8.matmul(&x, m);
            let panels = super::super::qgemm::available();
            if !panels {
                println!("{dt:?}: prompts through the gemm tiles");
                let rounded = blocks::QuantizedRows::quantize(&x, k, sb).dequantize();
                assert_eq!(prompt, exact.matmul(&rounded, m), "{dt:?}: prompts");
            }
            let mut u = Unpacked::default();
            for i in 0..m {
                let one = int8.matmul(&x[i * k..(i + 1) * k], 1);
                for r in 0..n {
                    u.unpack(dt, exact.row(r), k);
                    let want = blocks::dot_int(&u, xq.row(i));
                    // Raw-block kernels sum in another order than the unpacked dot.
                    let close = |a: f32| (a - want).abs() <= 1e-5 * (1.0 + want.abs());
                    assert!(
                        close(one[r]),
                        "{dt:?} ({i}, {r}) one row: {} vs {want}",
                        one[r]
                    );
                    if i < 4 {
                        assert!(close(batch[i * n + r]), "{dt:?} ({i}, {r}) 4 rows");
                    }
                    if panels {
                        assert!(close(prompt[i * n + r]), "{dt:?} ({i}, {r}) prompt panels");
                    }
                    // 8-bit activations: within ~1% of the exact product's scale.
                    let e = want_exact[i * n + r];
                    assert!(
                        (want - e).abs() < 0.05 + 0.02 * e.abs(),
                        "{dt:?}: {want} vs {e}"
                    );
                }
            }
        }
    }

    /// Batched decoding steps keep the int8 panels (made at the first step, or by
    /// `keep_panels`) and give the bits of panels made per call, for every block type, for
    /// split Q8_0 matrices and for a row count that is not a multiple of the kernel's; a
    /// change of mode drops them.
    #[test]
    fn kept_panels_give_the_bits_of_fresh_ones() {
        if !super::super::qgemm::available() {
            println!("no VNNI panels on this CPU: nothing kept");
            return;
        }
        let (n, k) = (70usize, 512usize);
        let (w, x) = weights_and_inputs(n, k, 7);
        for dt in ALL.into_iter().filter(|d| block_shape(*d).is_some()) {
            let q = QTensor::quantize(&w, dt).unwrap();
            let int8 = QuantLinear::new(&q)
                .unwrap()
                .unwrap()
                .with_math(QuantMath::Int8);
            let mut mats = vec![int8.clone()];
            if dt == GgmlDType::Q8_0 {
                mats.push(int8.clone().split_for_screening());
            }
            for ql in mats {
                for m in [KEPT_MIN_ROWS, 5, 7] {
                    let fresh = ql.clone().with_math(QuantMath::Int8);
                    let mut want = vec![0f32; m * n];
                    // SAFETY: want holds m * n values.
                    unsafe { fresh.matmul_panels(&x[..m * k], m, want.as_mut_ptr(), false) };
                    assert!(!fresh.panels_kept());
                    let step = fresh.matmul_step(&x[..m * k], m);
                    assert!(fresh.panels_kept(), "{dt:?}: kept at the first step");
                    assert_eq!(step, want, "{dt:?} {m} rows: the first step");
                    assert_eq!(fresh.matmul_step(&x[..m * k], m), want, "{dt:?}: kept");
                    if m > FEW_ROWS {
                        // Prompts of a matrix that keeps panels multiply them too.
                        assert_eq!(fresh.matmul(&x[..m * k], m), want, "{dt:?}: prompt");
                    }
                }
                let ready = ql.clone().with_math(QuantMath::Int8);
                ready.keep_panels();
                assert!(ready.panels_kept());
                assert!(!ready.clone().with_math(QuantMath::Exact).panels_kept());
            }
            let exact = QuantLinear::new(&q).unwrap().unwrap();
            exact.keep_panels();
            assert!(!exact.panels_kept(), "{dt:?}: the exact mode keeps none");
        }
    }

    /// [`QuantLinear::batch_invariance_costs_nothing`] (with the VNNI panels, in the int8
    /// mode): on AMD's cores a Q4_0 matrix of up to 2 MiB of blocks and a Q8_0 one of any
    /// size, not a larger Q4_0 one or a Q5_0 one; on Intel's cores all four; never a Q2_K one
    /// or any matrix in the exact mode. The rule itself is checked for both vendors, whichever CPU
    /// runs the test.
    #[test]
    fn batch_invariance_costs_nothing_for_small_4_bit_and_any_8_bit_matrices() {
        use GgmlDType as D;
        let (mib, big) = (1 << 20, 64 << 20);
        for (dt, bytes, amd, intel) in [
            (D::Q4_0, 2 * mib, true, true),
            (D::Q4_0, 2 * mib + 1, false, true),
            (D::Q4_1, big, false, true),
            (D::Q4K, mib, true, true),
            (D::Q8_0, big, true, true),
            (D::Q5_0, mib, false, true),
            (D::Q5_1, mib, false, true),
            (D::Q5K, mib, false, true),
            (D::Q6K, big, false, true),
            (D::Q2K, mib, false, false),
            (D::Q3K, mib, false, false),
            (D::F16, mib, false, false),
        ] {
            assert_eq!(
                panels_cost_nothing(dt, bytes, false),
                amd,
                "{dt:?} {bytes} AMD"
            );
            assert_eq!(
                panels_cost_nothing(dt, bytes, true),
                intel,
                "{dt:?} {bytes} Intel"
            );
        }
        let vnni = super::super::qgemm::available();
        let intel = super::super::intel_cores();
        // Q4_0: 576 bytes a row of 1024; 3648 rows are 2.0 MiB, 3712 past it.
        for (dt, n, free) in [
            (GgmlDType::Q4_0, 1024, vnni),
            (GgmlDType::Q4_0, 3712, vnni && intel),
            (GgmlDType::Q8_0, 3712, vnni),
            (GgmlDType::Q5_0, 1024, vnni && intel),
            (GgmlDType::Q2K, 1024, false),
        ] {
            let (w, _) = weights_and_inputs(n, 1024, 5);
            let q = QTensor::quantize(&w, dt).unwrap();
            let exact = QuantLinear::new(&q).unwrap().unwrap();
            assert!(!exact.batch_invariance_costs_nothing(), "{dt:?} exact");
            let int8 = exact.with_math(QuantMath::Int8);
            assert_eq!(
                int8.batch_invariance_costs_nothing(),
                free,
                "{dt:?} [{n}, 1024]"
            );
        }
    }

    /// Batch-invariant matrices (every block type, and a split Q8_0 one): each activation row
    /// of a product of 1, 2, 3, 5 or 8 rows is the bits of that row alone, and a screened
    /// greedy step's computed values are those bits too (its argmax the full product's); the
    /// exact mode has no such product, and says so.
    #[test]
    fn batch_invariant_rows_are_the_bits_of_each_row_alone() {
        let (n, k) = (70usize, 512usize);
        let (w, x) = weights_and_inputs(n, k, 11);
        for dt in ALL.into_iter().filter(|d| block_shape(*d).is_some()) {
            let q = QTensor::quantize(&w, dt).unwrap();
            let mut exact = QuantLinear::new(&q).unwrap().unwrap();
            let err = exact.make_batch_invariant().unwrap_err();
            assert!(err.contains("exact mode"), "{dt:?}: {err}");
            if !super::super::qgemm::available() {
                assert!(
                    err.contains("AVX-512 VNNI") || err.contains("exact"),
                    "{err}"
                );
                continue;
            }
            let int8 = exact.with_math(QuantMath::Int8);
            let mut mats = vec![int8.clone()];
            if dt == GgmlDType::Q8_0 {
                mats.push(int8.clone().split_for_screening());
            }
            for mut ql in mats {
                ql.make_batch_invariant().unwrap();
                assert!(
                    ql.data.is_empty(),
                    "{dt:?}: the panels serve, the blocks are dropped"
                );
                let alone: Vec<Vec<f32>> = (0..8)
                    .map(|i| ql.matmul(&x[i * k..(i + 1) * k], 1))
                    .collect();
                for m in [1usize, 2, 3, 5, 8] {
                    let all = ql.matmul(&x[..m * k], m);
                    let step = ql.matmul_step(&x[..m * k], m);
                    for i in 0..m {
                        assert!(
                            all[i * n..(i + 1) * n] == alone[i][..],
                            "{dt:?} m={m} row {i}"
                        );
                        assert!(
                            step[i * n..(i + 1) * n] == alone[i][..],
                            "{dt:?} step m={m}"
                        );
                    }
                }
                if let Some(scr) = ql.matmul_screened(&x[..k], 1, &[]) {
                    let best = |v: &[f32]| (0..n).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap();
                    let top = best(&alone[0]);
                    assert_eq!(best(&scr), top, "{dt:?}: screened argmax");
                    assert_eq!(scr[top].to_bits(), alone[0][top].to_bits());
                }
            }
        }
    }

    /// `FERROFORMERS_NO_VNNI=1` sends int8 prompts back to the gemm tiles (the path of CPUs
    /// without VNNI), and they still match.
    #[test]
    fn no_vnni_variable_keeps_prompts_on_gemm_tiles() {
        crate::kernels::cpu::rerun_with(
            "kernels::cpu::quantized::tests::int8_mode_rounds_activations_like_llama_cpp",
            "FERROFORMERS_NO_VNNI",
            "prompts through the gemm tiles",
        );
    }
}
