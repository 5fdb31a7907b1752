//! Prompt products over GGUF blocks in the int8 mode: integer GEMM with AVX-512 VNNI.
//!
//! Decoding multiplies one activation row by each weight row ([`super::vnni`],
//! [`super::blocks::dot_int_blocks`]); a prompt has tens to thousands of rows, and the same
//! weights serve all of them. Here a tile of [`PANEL`] weight rows is unpacked once into a
//! panel (32 rows x 4 inputs per 128 bytes, the layout `vpdpbusd` wants), and every prompt row
//! passes over it, chunk by chunk of inputs so that the panel's chunk stays in L1.
//!
//! Arithmetic: llama.cpp's. Activations are rounded to 8 bits per block exactly as decoding
//! rounds them ([`QuantizedRows`]: Q8_0/Q8_1 for the 32-value types, Q8_K for K-quants). Each
//! weight's small integer `q` (GGUF's value is `(d * sc) * q - dmin * mn`) is stored as
//! `q + 128` (unsigned, as `vpdpbusd` takes it), and each scale group's sum starts from
//! `-128 * sum(xq)`, so every group's integer sum is `sum(q * xq)` exactly. Per group of `G`
//! inputs (32, or 16 for Q6_K/Q3_K/Q2_K, whose scales change every 16), the sum is scaled by
//! the weight row's `d * sc` and the activation block's scale, and the minimum's term
//! `dmin * mn * dx * sum(xq)` taken off. K-quants multiply each group's sum by its integer
//! `sc` and add in integers over the superblock, then scale by `d * dx` once (Q8_K has one
//! activation scale per 256 inputs), as llama.cpp's K-quant dots do. The integer sums are the
//! decoding kernels'; only the f32 order of the scaled groups differs.
//!
//! CPUs without AVX-512 VNNI (or with `FERROFORMERS_NO_VNNI=1`) keep the dequantized `gemm`
//! tiles ([`super::quantized`]).

use candle_core::quantized::GgmlDType;

use super::blocks::{block_shape, QuantizedRows, Unpacked, GROUP};

/// Weight rows per panel.
pub const PANEL: usize = 32;
/// Inputs per chunk: a panel's slice of 512 inputs is 16 KiB, in L1 while the rows pass.
const CHUNK: usize = 512;

/// Whether the VNNI GEMM runs on this CPU.
pub fn available() -> bool {
    super::vnni::available()
}

/// Inputs per scale group for `dtype`: 32 where the scales change every 32 values (the
/// 32-value types, Q4_K, Q5_K), 16 for the other K-quants.
pub fn group_of(dtype: GgmlDType) -> usize {
    use GgmlDType as D;
    match dtype {
        D::Q6K | D::Q3K | D::Q2K => 16,
        _ => 32,
    }
}

/// Activation rows rounded to 8 bits as the decoding kernels round them, with per-group
/// terms laid out for the kernel.
pub struct Acts {
    k: usize,
    g: usize,
    rows: QuantizedRows,
    /// Per row and group: the activation block's scale.
    d: Vec<f32>,
    /// Per row and group: `-128 * sum(xq)` (where the integer sums start).
    off: Vec<i32>,
    /// Per row and group: `dx * sum(xq)` (Q8_1's f16 `s` for the 32-value types), the
    /// minimum's factor.
    s: Vec<f32>,
}

impl Acts {
    /// Round `m` rows of `k` values (`x` is `[m, k]`) for weights of type `dtype`.
    pub fn new(x: &[f32], k: usize, dtype: GgmlDType) -> Self {
        let (sb, _) = block_shape(dtype).expect("a GGUF block type");
        let g = group_of(dtype);
        let rows = QuantizedRows::quantize(x, k, sb);
        let groups = x.len() / g;
        let (mut d, mut off, mut s) = (vec![0f32; groups], vec![0i32; groups], vec![0f32; groups]);
        for b in 0..groups {
            let sum: i32 = rows.gsum[b * g / GROUP..(b + 1) * g / GROUP].iter().sum();
            let blk = b * g / sb;
            d[b] = rows.d[blk];
            off[b] = -128 * sum;
            s[b] = if sb == 32 {
                rows.s[blk]
            } else {
                rows.d[blk] * sum as f32
            };
        }
        Acts {
            k,
            g,
            rows,
            d,
            off,
            s,
        }
    }
}

/// One tile of up to [`PANEL`] weight rows, unpacked for the kernel (buffers reused from tile
/// to tile).
#[derive(Default)]
pub struct Panel {
    k: usize,
    g: usize,
    has_min: bool,
    rows: usize,
    /// Per group of 4 inputs: 32 rows x 4 bytes `q + 128` (rows 0..16 in the first 64 bytes).
    u: Vec<u8>,
    /// Per scale group: 32 rows' `d * sc`.
    ws: Vec<f32>,
    /// Per scale group: 32 rows' `dmin * mn`.
    wm: Vec<f32>,
    /// K-quants: per scale group, 32 rows' integer `sc` (`ws` is `wd * isc` exactly), and
    /// per superblock of 256 inputs the rows' `d`. The kernel sums each group's integer sum
    /// times `sc` in integers over the superblock and scales once per superblock, as
    /// llama.cpp's K-quant dots do: one multiply-add in the FMA pipes per group where the
    /// float scaling took two. Empty for the 32-value types.
    isc: Vec<i8>,
    wd: Vec<f32>,
    unpacked: Unpacked,
    /// Q2_K/Q3_K tiles: the rows unpacked to i8 values, `[rows, k]`.
    tq: Vec<i8>,
    /// 4-bit types (Q4_0, Q4_1, Q4_K): what their `q` plus this is, 0..16 (8 for Q4_0's
    /// -8..8, 0 for the others' 0..16); `None` for the other types.
    four_bit: Option<u8>,
    /// A kept panel of a 32-value type ([`Panel::kept`]): `ws` and `wm` as the f16 values
    /// they were widened from (a block's `d`, `-m`), half their bytes; then `ws`, `wm` are
    /// empty.
    wsh: Vec<u16>,
    wmh: Vec<u16>,
    /// 5-bit types (Q5_0, Q5_1): what their `q` plus this is, 0..32 (16 for Q5_0's -16..16, 0
    /// for Q5_1's 0..32); `None` for the other types.
    five_bit: Option<u8>,
    /// A kept panel of a 4-bit type ([`Panel::kept`]): per group of 4 inputs, 64 bytes whose
    /// low nibbles are rows 0..16's `q + four_bit` and high nibbles rows 16..32's, in `u`'s
    /// order (`u` is then empty): half the bytes a batched step streams. A 5-bit type's
    /// (`q + five_bit`): per scale group of 32 inputs, its 8 such blocks of 64 bytes (the
    /// values' low 4 bits), then 8 x 16 bytes of their fifth bits (per group of 4 inputs, a
    /// bit per byte of the first 64 bytes' low nibbles, then of their high nibbles): 5.5 bits
    /// per weight where the bytes took 8.
    nib: Vec<u8>,
}

impl Panel {
    /// Unpack `rows.len()` (at most [`PANEL`]) weight rows of `dtype`, `k` inputs each.
    ///
    /// With AVX-512 the values go from the raw blocks straight into the panel: each row's 32
    /// values at a time are made unsigned in a register, and 16 rows' worth transposed into
    /// the panel's 4-byte interleave ([`x86::pack`]); Q2_K and Q3_K are unpacked row by row
    /// first. Otherwise (and as the tests' reference) [`Panel::pack_portable`].
    pub fn pack(&mut self, dtype: GgmlDType, rows: &[&[u8]], k: usize) {
        self.pack_from(dtype, rows, k, false);
    }

    /// [`Panel::pack`] from rows in [`super::packed`]'s planes (a packed matrix of the int8
    /// mode): the same panel, without unpacking the rows to raw blocks first.
    pub fn pack_planes(&mut self, dtype: GgmlDType, rows: &[&[u8]], k: usize) {
        #[cfg(target_arch = "x86_64")]
        if available() && super::packed::packable(dtype, k) {
            self.pack_from(dtype, rows, k, true);
            return;
        }
        let (sb, bytes) = block_shape(dtype).expect("a GGUF block type");
        let raw: Vec<Vec<u8>> = rows
            .iter()
            .map(|r| {
                let mut out = vec![0u8; k / sb * bytes];
                super::packed::unpack_row(dtype, r, k, &mut out);
                out
            })
            .collect();
        let raw: Vec<&[u8]> = raw.iter().map(|r| &r[..]).collect();
        self.pack_from(dtype, &raw, k, false);
    }

    /// [`Panel::pack`] for Q8_0 rows kept in [`super::split8`]'s planes: row `j`'s first
    /// plane `first[j]` (scales, norms, high nibbles) and second `second[j]` (low nibbles).
    pub fn pack_split(&mut self, first: &[&[u8]], second: &[&[u8]], k: usize) {
        assert!(first.len() == second.len() && k.is_multiple_of(64));
        let nb = k / 32;
        assert!(
            first.iter().all(|r| r.len() >= 19 * nb) && second.iter().all(|r| r.len() >= 16 * nb)
        );
        #[cfg(target_arch = "x86_64")]
        if available() && !first.is_empty() {
            self.prepare(GgmlDType::Q8_0, first.len(), k);
            let ptrs: Vec<*const u8> = first.iter().chain(second).map(|r| r.as_ptr()).collect();
            // SAFETY: the CPU has the features; each pair of planes holds k values (asserted);
            // the panel, ws and wm are sized by `prepare`.
            unsafe { x86::pack(x86::SPLIT, self.u.as_mut_ptr(), self.scale_ptrs(), &ptrs, k) };
            return;
        }
        // Without the kernels: back to Q8_0 blocks.
        let raw: Vec<Vec<u8>> = first
            .iter()
            .zip(second)
            .map(|(a, b)| super::split8::raw_from_planes(a, b, k))
            .collect();
        let raw: Vec<&[u8]> = raw.iter().map(|r| &r[..]).collect();
        self.pack_portable(GgmlDType::Q8_0, &raw, k);
    }

    fn pack_from(&mut self, dtype: GgmlDType, rows: &[&[u8]], k: usize, planes: bool) {
        #[cfg(target_arch = "x86_64")]
        if available() && !rows.is_empty() {
            self.prepare(dtype, rows.len(), k);
            let code = x86::code(dtype);
            assert!(!planes || code < 5, "planes of a 32-value block type");
            let mut ptrs = [std::ptr::null::<u8>(); PANEL];
            if code == x86::UNPACKED {
                // Rows unpacked to i8 values one by one, their scales from the unpacking.
                self.tq.resize(rows.len() * k, 0);
                for (j, row) in rows.iter().enumerate() {
                    self.unpacked.unpack(dtype, row, k);
                    self.tq[j * k..(j + 1) * k].copy_from_slice(&self.unpacked.q[..k]);
                    self.scales_from_unpacked(j);
                }
                for (j, p) in ptrs.iter_mut().take(rows.len()).enumerate() {
                    // In bounds: j < rows.len() rows of k values.
                    *p = self.tq[j * k..].as_ptr() as *const u8;
                }
            } else {
                let (sb, bytes) = block_shape(dtype).expect("a GGUF block type");
                for (j, row) in rows.iter().enumerate() {
                    assert!(row.len() >= k / sb * bytes, "qgemm: a row shorter than k");
                    ptrs[j] = row.as_ptr();
                }
            }
            // Scales and minimums come with the values.
            // SAFETY: the CPU has the features (available()); every pointer holds k values of
            // its kind (checked above); the panel holds k / 4 quads of PANEL rows, ws and wm
            // k / g groups of PANEL (prepare, with g the type's group).
            unsafe {
                x86::pack(
                    code + if planes { x86::PLANES } else { 0 },
                    self.u.as_mut_ptr(),
                    self.scale_ptrs(),
                    &ptrs[..rows.len()],
                    k,
                )
            };
            return;
        }
        self.pack_portable(dtype, rows, k);
    }

    /// This panel without its packing buffers (unpacked rows; minimums of a type without
    /// them), to be kept and multiplied again. A 4-bit type's values are kept as nibbles, a
    /// 5-bit type's as nibbles and fifth bits ([`Panel::nib`]; the same products) unless
    /// `FERROFORMERS_NO_NIBBLE_PANELS=1`.
    pub fn kept(mut self) -> Panel {
        self.unpacked = Unpacked::default();
        self.tq = Vec::new();
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if let Some(bias) = self.four_bit {
            if !super::switch_once(&OFF, "FERROFORMERS_NO_NIBBLE_PANELS") {
                let quads = self.k / 4;
                let mut nib = vec![0u8; quads * 64];
                for (t, out) in nib.chunks_exact_mut(64).enumerate() {
                    let (lo, hi) = self.u[t * 4 * PANEL..(t + 1) * 4 * PANEL].split_at(64);
                    for (i, ((o, &a), &b)) in out.iter_mut().zip(lo).zip(hi).enumerate() {
                        // `u` is q + 128; rows past `rows` hold leftovers, cut to 4 bits too.
                        let (a, b) = ((a ^ 0x80).wrapping_add(bias), (b ^ 0x80).wrapping_add(bias));
                        debug_assert!(i / 4 >= self.rows || a < 16, "a 4-bit value out of range");
                        debug_assert!(
                            16 + i / 4 >= self.rows || b < 16,
                            "a 4-bit value out of range"
                        );
                        *o = (a & 15) | (b << 4);
                    }
                }
                self.nib = nib;
                self.u = Vec::new();
            }
        } else if let Some(bias) = self.five_bit {
            if !super::switch_once(&OFF, "FERROFORMERS_NO_NIBBLE_PANELS") {
                // Per scale group of 32 inputs: 8 x 64 bytes of low bits, then 8 x 16 of fifth
                // bits (two u64 masks per group of 4 inputs).
                let groups = self.k / 32;
                let mut nib = vec![0u8; groups * 8 * 80];
                for (gi, out) in nib.chunks_exact_mut(8 * 80).enumerate() {
                    let (low, high) = out.split_at_mut(8 * 64);
                    for q in 0..8 {
                        let t = gi * 8 + q;
                        let (lo, hi) = self.u[t * 4 * PANEL..(t + 1) * 4 * PANEL].split_at(64);
                        let (mut m0, mut m1) = (0u64, 0u64);
                        for (i, (&a, &b)) in lo.iter().zip(hi).enumerate() {
                            // `u` is q + 128; rows past `rows` hold leftovers, cut to 5 bits.
                            let (a, b) =
                                ((a ^ 0x80).wrapping_add(bias), (b ^ 0x80).wrapping_add(bias));
                            debug_assert!(
                                i / 4 >= self.rows || a < 32,
                                "a 5-bit value out of range"
                            );
                            debug_assert!(
                                16 + i / 4 >= self.rows || b < 32,
                                "a 5-bit value out of range"
                            );
                            low[q * 64 + i] = (a & 15) | (b << 4);
                            m0 |= u64::from((a >> 4) & 1) << i;
                            m1 |= u64::from((b >> 4) & 1) << i;
                        }
                        high[q * 16..q * 16 + 8].copy_from_slice(&m0.to_le_bytes());
                        high[q * 16 + 8..q * 16 + 16].copy_from_slice(&m1.to_le_bytes());
                    }
                }
                self.nib = nib;
                self.u = Vec::new();
            }
        }
        if !self.has_min {
            self.wm = Vec::new();
        }
        if !self.isc.is_empty() {
            // The kernel reads `isc` and `wd` instead.
            self.ws = Vec::new();
        }
        static F32: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if self.isc.is_empty() && !super::switch_once(&F32, "FERROFORMERS_F32_PANEL_SCALES") {
            // The 32-value types' scales and minimums are f16 values widened: kept as f16
            // (the same f32 values once widened again), where every one comes back exactly.
            let as_f16 = |v: &[f32]| -> Option<Vec<u16>> {
                v.iter()
                    .map(|&x| {
                        let h = half::f16::from_f32(x);
                        (h.to_f32().to_bits() == x.to_bits()).then_some(h.to_bits())
                    })
                    .collect()
            };
            if let (Some(wsh), Some(wmh)) = (as_f16(&self.ws), as_f16(&self.wm)) {
                (self.wsh, self.wmh) = (wsh, wmh);
                (self.ws, self.wm) = (Vec::new(), Vec::new());
            }
        }
        self.u.shrink_to_fit();
        self.ws.shrink_to_fit();
        self.wm.shrink_to_fit();
        self
    }

    /// Sizes and the fields every packing sets.
    fn prepare(&mut self, dtype: GgmlDType, rows: usize, k: usize) {
        assert!(rows <= PANEL, "a panel holds {PANEL} rows");
        assert!(k.is_multiple_of(32), "qgemm: k = {k} is not whole blocks");
        let g = group_of(dtype);
        let groups = k / g;
        self.k = k;
        self.g = g;
        self.rows = rows;
        // Rows past `rows` keep whatever an earlier tile left: finite values whose sums the
        // kernel computes but never stores.
        self.u.resize(k / 4 * 4 * PANEL, 128);
        self.ws.resize(groups * PANEL, 0.0);
        self.wm.resize(groups * PANEL, 0.0);
        if block_shape(dtype).is_some_and(|(sb, _)| sb == 256) {
            self.isc.resize(groups * PANEL, 0);
            self.wd.resize(k / 256 * PANEL, 0.0);
        } else {
            self.isc = Vec::new();
            self.wd = Vec::new();
        }
        use GgmlDType as D;
        self.has_min = rows > 0 && matches!(dtype, D::Q4_1 | D::Q5_1 | D::Q2K | D::Q4K | D::Q5K);
        self.four_bit = match dtype {
            D::Q4_0 => Some(8),
            D::Q4_1 | D::Q4K => Some(0),
            _ => None,
        };
        self.five_bit = match dtype {
            D::Q5_0 => Some(16),
            D::Q5_1 => Some(0),
            _ => None,
        };
        self.nib = Vec::new();
        self.wsh = Vec::new();
        self.wmh = Vec::new();
    }

    /// Row `j`'s group scales `d * sc` and minimums `dmin * mn` from [`Panel::unpacked`].
    fn scales_from_unpacked(&mut self, j: usize) {
        let u = &self.unpacked;
        for b in 0..self.k / self.g {
            let (s, gr) = (b * self.g / u.sb, b * self.g / GROUP);
            self.ws[b * PANEL + j] = u.d[s] * u.sc[gr] as f32;
            if u.has_min {
                self.wm[b * PANEL + j] = u.dmin[s] * u.mn[gr] as f32;
            }
            if !self.isc.is_empty() {
                // K-quants: the same in integers (superblocks of 256: `s` is the superblock).
                self.isc[b * PANEL + j] = u.sc[gr];
                self.wd[s * PANEL + j] = u.d[s];
            }
        }
    }

    /// Where the fast packing writes the scales (K-quants' integer ones too, when kept).
    #[cfg(target_arch = "x86_64")]
    fn scale_ptrs(&mut self) -> x86::Scales {
        let int = !self.isc.is_empty();
        x86::Scales {
            ws: self.ws.as_mut_ptr(),
            wm: self.wm.as_mut_ptr(),
            isc: if int {
                self.isc.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
            wd: if int {
                self.wd.as_mut_ptr()
            } else {
                std::ptr::null_mut()
            },
        }
    }

    /// The plain packing: each row unpacked, then copied into the panel four values at a time.
    pub fn pack_portable(&mut self, dtype: GgmlDType, rows: &[&[u8]], k: usize) {
        self.prepare(dtype, rows.len(), k);
        for (j, row) in rows.iter().enumerate() {
            self.unpacked.unpack(dtype, row, k);
            let u = &self.unpacked;
            let at = (j / 16) * 64 + (j % 16) * 4;
            let quads = k / 4;
            assert!(u.q.len() >= k && self.u.len() >= quads * 4 * PANEL);
            let (src, dst) = (u.q.as_ptr() as *const u32, self.u.as_mut_ptr());
            // Four values at a time, each `q + 128` (the sign bit flipped).
            for t in 0..quads {
                // SAFETY: t < k / 4 quads of q (k values) and of the panel (asserted above);
                // at + 4 <= 4 * PANEL.
                unsafe {
                    let v = src.add(t).read_unaligned() ^ 0x8080_8080;
                    (dst.add(t * 4 * PANEL + at) as *mut u32).write_unaligned(v);
                }
            }
            self.scales_from_unpacked(j);
        }
    }

    /// `out[i * ldo + j] = x_i . row_j` for every activation row `i` of `acts` and the panel's
    /// rows `j`.
    ///
    /// # Safety
    /// `out` must be valid for writes at `i * ldo + j` for `i < m`, `j <` the panel's rows,
    /// and no one else may write there meanwhile.
    pub unsafe fn product(&self, acts: &Acts, out: *mut f32, ldo: usize) {
        // SAFETY: the caller's promise.
        unsafe { self.product_then(acts, out, ldo, None) }
    }

    /// The bytes of groups `c0..c1` (weights, scales, minimums) as `(start, length)`.
    fn chunk_bytes(&self, c0: usize, c1: usize) -> [(*const u8, usize); 3] {
        let per = if self.nib.is_empty() {
            self.g / 4 * 4 * PANEL
        } else if self.five_bit.is_some() {
            self.g / 4 * 80
        } else {
            self.g / 4 * 64
        };
        let base = if self.nib.is_empty() {
            self.u.as_ptr()
        } else {
            self.nib.as_ptr()
        };
        // Groups c0..c1 of a per-group vector ([`PANEL`] values a group).
        fn span<T>(v: &[T], c0: usize, c1: usize) -> (*const u8, usize) {
            if v.is_empty() {
                return (std::ptr::null(), 0);
            }
            let at = v.as_ptr().wrapping_add(c0 * PANEL) as *const u8;
            (at, (c1 - c0) * PANEL * std::mem::size_of::<T>())
        }
        [
            (base.wrapping_add(c0 * per), (c1 - c0) * per),
            // The scales the kernel reads (K-quants: the integer ones).
            if !self.isc.is_empty() {
                span(&self.isc, c0, c1)
            } else if !self.wsh.is_empty() {
                span(&self.wsh, c0, c1)
            } else {
                span(&self.ws, c0, c1)
            },
            if !self.has_min {
                (std::ptr::null(), 0)
            } else if !self.wmh.is_empty() {
                span(&self.wmh, c0, c1)
            } else {
                span(&self.wm, c0, c1)
            },
        ]
    }

    /// [`Panel::product`], fetching into L2 while it runs (from its second pass of rows over a
    /// chunk, which reads the chunk from L1) the chunk that comes next: this panel's next
    /// chunk, or `next`'s first. The first pass over a chunk then finds it near instead of in
    /// memory.
    ///
    /// # Safety
    /// As [`Panel::product`].
    pub unsafe fn product_then(
        &self,
        acts: &Acts,
        out: *mut f32,
        ldo: usize,
        next: Option<&Panel>,
    ) {
        assert!(available(), "qgemm: the CPU has no AVX-512 VNNI");
        assert!(acts.k == self.k && acts.g == self.g && self.rows <= ldo);
        #[cfg(target_arch = "x86_64")]
        {
            let m = acts.rows.q.len() / self.k;
            let groups = self.k / self.g;
            // Chunks of at most CHUNK inputs, as even as the groups allow (SmolLM2's 576
            // inputs: 9 + 9 groups, not 16 + 2).
            let per_chunk = groups
                .div_ceil(groups.div_ceil(CHUNK / self.g).max(1))
                .max(1);
            // K-quants' integer scales sum over whole superblocks: chunks hold whole ones
            // (CHUNK / g is a multiple of a superblock's groups).
            let ks = !self.isc.is_empty();
            let per_chunk = if ks {
                per_chunk.next_multiple_of(256 / self.g)
            } else {
                per_chunk
            };
            // Nibbles only come with 32-value groups (the 4-bit types').
            let nib = !self.nib.is_empty();
            assert!(!nib || self.g == 32);
            // Fifth bits after each group's nibbles (5-bit types).
            let hb = nib && self.five_bit.is_some();
            // Scales (and minimums) kept as f16.
            let h16 = !self.wsh.is_empty();
            for c0 in (0..groups).step_by(per_chunk) {
                let c1 = (c0 + per_chunk).min(groups);
                let ahead = if c1 < groups {
                    self.chunk_bytes(c1, (c1 + per_chunk).min(groups))
                } else {
                    next.filter(|p| p.k == self.k && p.g == self.g)
                        .map_or([(std::ptr::null(), 0); 3], |p| {
                            p.chunk_bytes(0, per_chunk.min(groups))
                        })
                };
                let mut i = 0;
                while i < m {
                    let r = (m - i).min(x86::MR);
                    // The second pass fetches ahead (the first streams its own chunk).
                    let ahead = if i == x86::MR {
                        ahead
                    } else {
                        [(std::ptr::null(), 0); 3]
                    };
                    // SAFETY: the CPU has the features (asserted above); rows i..i + r of acts
                    // and out exist; groups c0..c1 lie in the panel and acts.
                    unsafe {
                        macro_rules! call {
                            // K-quants keep f32 scales.
                            ($r:literal, $g:literal, $min:literal, $nib:literal, true) => {
                                call!(@ $r, $g, $min, $nib, true, false, false)
                            };
                            ($r:literal, $g:literal, $min:literal, $nib:literal, false) => {
                                call!($r, $g, $min, $nib, false, false)
                            };
                            ($r:literal, $g:literal, $min:literal, $nib:literal, false, $hb:literal) => {
                                if h16 {
                                    call!(@ $r, $g, $min, $nib, false, $hb, true)
                                } else {
                                    call!(@ $r, $g, $min, $nib, false, $hb, false)
                                }
                            };
                            (@ $r:literal, $g:literal, $min:literal, $nib:literal, $ks:literal, $hb:literal, $h:literal) => {
                                x86::rows::<$r, $g, $min, $nib, $ks, $hb, $h>(
                                    self,
                                    acts,
                                    i,
                                    c0..c1,
                                    out,
                                    ldo,
                                    &ahead,
                                )
                            };
                        }
                        macro_rules! dispatch {
                            ($r:literal) => {
                                match (self.g == 32, self.has_min, nib, ks) {
                                    (true, false, true, false) if hb => {
                                        call!($r, 32, false, true, false, true)
                                    }
                                    (true, true, true, false) if hb => {
                                        call!($r, 32, true, true, false, true)
                                    }
                                    (true, false, false, false) => {
                                        call!($r, 32, false, false, false)
                                    }
                                    (true, true, false, false) => call!($r, 32, true, false, false),
                                    (true, false, true, false) => call!($r, 32, false, true, false),
                                    (true, true, true, false) => call!($r, 32, true, true, false),
                                    (true, false, false, true) => call!($r, 32, false, false, true),
                                    (true, true, false, true) => call!($r, 32, true, false, true),
                                    (true, false, true, true) => call!($r, 32, false, true, true),
                                    (true, true, true, true) => call!($r, 32, true, true, true),
                                    // Every 16-input type is a K-quant.
                                    (false, false, _, _) => call!($r, 16, false, false, true),
                                    (false, true, _, _) => call!($r, 16, true, false, true),
                                }
                            };
                        }
                        // A tail of 2 or 3 rows in one call: each call unpacks the
                        // panel's nibbles and widens its scales once for all its rows.
                        match r {
                            4 => dispatch!(4),
                            3 => dispatch!(3),
                            2 => dispatch!(2),
                            _ => dispatch!(1),
                        }
                    }
                    i += r;
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = (acts, out, ldo);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Acts, GgmlDType, Panel, PANEL};
    use std::arch::x86_64::*;

    /// Activation rows per kernel call.
    pub const MR: usize = 4;
    /// Scale groups ahead that the first rows' pass over a chunk fetches. A 16-row step over
    /// SmolLM2's gate/up shape (Q4_1 nibble panels, 24 copies, two threads) took 694-738 us
    /// per product with 4, against 745-816 without (alternating, AMD EPYC Zen 4); one
    /// thread alone is not limited by memory.
    const PF: usize = 4;

    /// [`pack`]'s source kinds: raw blocks of one type, or rows already unpacked to i8.
    pub const UNPACKED: u8 = 8;
    /// Added to a 32-value kind (0..=4): its rows are in [`super::super::packed`]'s planes.
    pub const PLANES: u8 = 16;
    /// A Q8_0 matrix in [`super::super::split8`]'s two planes: [`pack`] takes each row's
    /// first-plane pointer, then (as many again) its second-plane pointer.
    pub const SPLIT: u8 = 9;

    /// The kind [`pack`] reads for `dtype`: its raw blocks, except Q2_K and Q3_K.
    pub fn code(dtype: GgmlDType) -> u8 {
        use GgmlDType as D;
        match dtype {
            D::Q8_0 => 0,
            D::Q4_0 => 1,
            D::Q4_1 => 2,
            D::Q5_0 => 3,
            D::Q5_1 => 4,
            D::Q4K => 5,
            D::Q5K => 6,
            D::Q6K => 7,
            _ => UNPACKED,
        }
    }

    /// Values `32 * c .. 32 * c + 32` of one row, each `q + 128` (unsigned), from the row's raw
    /// blocks of kind `T` ([`code`]) or its unpacked i8 values (`T == UNPACKED`). The
    /// arithmetic is [`super::super::blocks`]'s unpacking, 32 lanes at a time.
    ///
    /// `P`: the row is in [`super::super::packed`]'s planes (`nb` blocks; kinds 0..=4), where
    /// block `c`'s values, fifth bits and scales sit in their planes instead of the block.
    #[inline(always)]
    unsafe fn chunk<const T: u8, const P: bool>(
        row: *const u8,
        lo_row: *const u8,
        c: usize,
        nb: usize,
    ) -> __m256i {
        let low = _mm256_set1_epi8(0x0F);
        let top = _mm256_set1_epi8(-128);
        // 16 packed bytes -> their low nibbles (values 0..16), then their high ones (16..32).
        let nibbles = |p: *const u8| {
            let x = _mm_loadu_si128(p as *const __m128i);
            _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16::<4>(x), x), low)
        };
        if T == SPLIT {
            // `q + 128` = 16 * high nibble (first plane, after d and the norms) + low nibble
            // (second plane, `lo_row`), the same value order as the 4-bit types.
            return _mm256_or_si256(
                _mm256_slli_epi16::<4>(nibbles(row.add(3 * nb + 16 * c))),
                nibbles(lo_row.add(16 * c)),
            );
        }
        let fifth = |n: __m256i, bits: *const u8| {
            let m = (bits as *const u32).read_unaligned();
            _mm256_mask_add_epi8(n, m, n, _mm256_set1_epi8(16))
        };
        if P {
            // The planes: d (2 nb bytes), then m (Q4_1, Q5_1: 2 nb), qh (Q5_0, Q5_1: 4 nb), qs.
            return match T {
                0 => _mm256_xor_si256(
                    _mm256_loadu_si256(row.add(2 * nb + 32 * c) as *const __m256i),
                    top,
                ),
                1 => _mm256_add_epi8(nibbles(row.add(2 * nb + 16 * c)), _mm256_set1_epi8(120)),
                2 => _mm256_or_si256(nibbles(row.add(4 * nb + 16 * c)), top),
                3 => _mm256_add_epi8(
                    fifth(nibbles(row.add(6 * nb + 16 * c)), row.add(2 * nb + 4 * c)),
                    _mm256_set1_epi8(112),
                ),
                _ => _mm256_or_si256(
                    fifth(nibbles(row.add(8 * nb + 16 * c)), row.add(4 * nb + 4 * c)),
                    top,
                ),
            };
        }
        match T {
            // Q8_0: q + 128.
            0 => _mm256_xor_si256(
                _mm256_loadu_si256(row.add(c * 34 + 2) as *const __m256i),
                top,
            ),
            // Q4_0: (nibble - 8) + 128.
            1 => _mm256_add_epi8(nibbles(row.add(c * 18 + 2)), _mm256_set1_epi8(120)),
            // Q4_1: nibble + 128.
            2 => _mm256_or_si256(nibbles(row.add(c * 20 + 4)), top),
            // Q5_0: (nibble | fifth bit - 16) + 128.
            3 => {
                let b = row.add(c * 22);
                _mm256_add_epi8(fifth(nibbles(b.add(6)), b.add(2)), _mm256_set1_epi8(112))
            }
            // Q5_1: (nibble | fifth bit) + 128.
            4 => {
                let b = row.add(c * 24);
                _mm256_or_si256(fifth(nibbles(b.add(8)), b.add(4)), top)
            }
            // Q4_K / Q5_K: sub-block `sub` of a superblock is the low (even) or high (odd)
            // nibbles of 32 bytes; Q5_K's fifth bits are bit `sub` of its 32 qh bytes.
            5 | 6 => {
                let (bytes, qoff) = if T == 5 { (144, 16) } else { (176, 48) };
                let (s, sub) = (c / 8, c % 8);
                let blk = row.add(s * bytes);
                let q = _mm256_loadu_si256(blk.add(qoff + 32 * (sub / 2)) as *const __m256i);
                let mut n = if sub % 2 == 0 {
                    _mm256_and_si256(q, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(q), low)
                };
                if T == 6 {
                    let qh = _mm256_loadu_si256(blk.add(16) as *const __m256i);
                    let m = _mm256_test_epi8_mask(qh, _mm256_set1_epi8((1u8 << sub) as i8));
                    n = _mm256_mask_add_epi8(n, m, n, _mm256_set1_epi8(16));
                }
                _mm256_or_si256(n, top)
            }
            // Q6_K: half `h` of a superblock, quarter `cc`: 4 bits of ql (low nibbles of
            // bytes 0..32 or 32..64 for quarters 0/1, high nibbles for 2/3) and 2 bits of qh
            // (at 2 * cc), minus 32, plus 128.
            7 => {
                let (s, sub) = (c / 8, c % 8);
                let (h, cc) = (sub / 4, sub % 4);
                let blk = row.add(s * 210);
                let ql = _mm256_loadu_si256(blk.add(64 * h + 32 * (cc % 2)) as *const __m256i);
                let qh = _mm256_loadu_si256(blk.add(128 + 32 * h) as *const __m256i);
                let lo = if cc < 2 {
                    _mm256_and_si256(ql, low)
                } else {
                    _mm256_and_si256(_mm256_srli_epi16::<4>(ql), low)
                };
                let hi = _mm256_and_si256(
                    _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * cc as i32)),
                    _mm256_set1_epi8(3),
                );
                let v = _mm256_or_si256(lo, _mm256_slli_epi16::<4>(hi));
                _mm256_add_epi8(v, _mm256_set1_epi8(96))
            }
            // Unpacked i8 values: q + 128.
            _ => _mm256_xor_si256(_mm256_loadu_si256(row.add(c * 32) as *const __m256i), top),
        }
    }

    /// Pack `rows` (1..=[`PANEL`] pointers to rows of `k` values of kind `code`) into the
    /// panel at `dst`. Per 16 rows and 32 values: 16 registers of 32 unsigned bytes, transposed
    /// as 4-byte quads so that each quad's 16 rows land in one 64-byte store. Missing rows of
    /// a half repeat its last row (finite values the kernel never stores).
    ///
    /// Raw kinds also write their rows' scales (`ws`) and minimums (`wm`, for the types that
    /// have them) per scale group, [`PANEL`] rows apart ([`k_scales`] for K-quants).
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VL and F16C; each pointer holds `k` values of its kind; `dst`
    /// holds `k / 4` quads of `4 * PANEL` bytes; `sc`'s `ws`, `wm` (and, when not null,
    /// `isc`) hold `k / g` groups of [`PANEL`] ([`super::group_of`]: 16 for Q6_K, else 32),
    /// its `wd` (when not null) `k / 256` superblocks of [`PANEL`].
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    pub unsafe fn pack(code: u8, dst: *mut u8, sc: Scales, rows: &[*const u8], k: usize) {
        match code {
            0 => pack_kind::<0, false>(dst, sc, rows, k),
            1 => pack_kind::<1, false>(dst, sc, rows, k),
            2 => pack_kind::<2, false>(dst, sc, rows, k),
            3 => pack_kind::<3, false>(dst, sc, rows, k),
            4 => pack_kind::<4, false>(dst, sc, rows, k),
            5 => pack_kind::<5, false>(dst, sc, rows, k),
            6 => pack_kind::<6, false>(dst, sc, rows, k),
            7 => pack_kind::<7, false>(dst, sc, rows, k),
            16 => pack_kind::<0, true>(dst, sc, rows, k),
            17 => pack_kind::<1, true>(dst, sc, rows, k),
            18 => pack_kind::<2, true>(dst, sc, rows, k),
            19 => pack_kind::<3, true>(dst, sc, rows, k),
            20 => pack_kind::<4, true>(dst, sc, rows, k),
            SPLIT => pack_kind::<SPLIT, false>(dst, sc, rows, k),
            _ => pack_kind::<UNPACKED, false>(dst, sc, rows, k),
        }
    }

    /// Where [`pack`] writes each scale group's scales, [`PANEL`] rows apart: `d * sc` (`ws`)
    /// and `dmin * mn` (`wm`); for K-quants also the integer `sc` (`isc`) and each superblock's
    /// `d` (`wd`), null for the other types.
    #[derive(Clone, Copy)]
    pub struct Scales {
        pub ws: *mut f32,
        pub wm: *mut f32,
        pub isc: *mut i8,
        pub wd: *mut f32,
    }

    impl Scales {
        /// The same, from row `h` of the panel on.
        fn at_row(self, h: usize) -> Scales {
            Scales {
                ws: self.ws.wrapping_add(h),
                wm: self.wm.wrapping_add(h),
                isc: self.isc.wrapping_add(h),
                wd: self.wd.wrapping_add(h),
            }
        }
    }

    /// Bytes per block of the 32-value kinds 0..=4.
    const BYTES: [usize; 5] = [34, 18, 20, 22, 24];

    /// Superblock `s` of 16 K-quant rows (kinds 5-7): per scale group, the rows' `d * sc` into
    /// `ws` and (Q4_K/Q5_K) `dmin * mn` into `wm`, [`PANEL`] floats apart per group: the same
    /// f32 products as the unpacking's, 16 rows per multiply. The small integer scales are
    /// read per row (Q4_K/Q5_K's 6-bit packing through `scale_min_k4`) into per-group columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    unsafe fn k_scales<const T: u8>(r: &[*const u8; 16], s: usize, out: Scales) {
        use crate::kernels::cpu::blocks::scale_min_k4;
        let (ws, wm) = (out.ws, out.wm);
        // The integer scales as they are, and the superblock's `d` (when wanted).
        let int = |at: usize, col: &[u8; 16]| {
            if !out.isc.is_null() {
                std::ptr::copy_nonoverlapping(col.as_ptr() as *const i8, out.isc.add(at), 16);
            }
        };
        let superblock_d = |d: __m512| {
            if !out.wd.is_null() {
                _mm512_storeu_ps(out.wd.add(s * PANEL), d);
            }
        };
        let bytes = [144usize, 176, 210][T as usize - 5];
        let halves = |off: usize| {
            let mut h = [0u16; 16];
            for i in 0..16 {
                h[i] = (r[i].add(s * bytes + off) as *const u16).read_unaligned();
            }
            _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr() as *const __m256i))
        };
        // Integer scales, one column of 16 rows per group, as f32.
        let column = |col: &[u8; 16], signed: bool| {
            let b = _mm_loadu_si128(col.as_ptr() as *const __m128i);
            _mm512_cvtepi32_ps(if signed {
                _mm512_cvtepi8_epi32(b)
            } else {
                _mm512_cvtepu8_epi32(b)
            })
        };
        if T == 7 {
            let d = halves(208);
            superblock_d(d);
            let mut sc = [[0u8; 16]; 16];
            for i in 0..16 {
                let blk = r[i].add(s * bytes);
                for (g, col) in sc.iter_mut().enumerate() {
                    col[i] = *blk.add(192 + g);
                }
            }
            for (g, col) in sc.iter().enumerate() {
                _mm512_storeu_ps(
                    ws.add((s * 16 + g) * PANEL),
                    _mm512_mul_ps(d, column(col, true)),
                );
                int((s * 16 + g) * PANEL, col);
            }
        } else {
            let (d, dmin) = (halves(0), halves(2));
            superblock_d(d);
            let (mut sc, mut mn) = ([[0u8; 16]; 8], [[0u8; 16]; 8]);
            for i in 0..16 {
                let q = std::slice::from_raw_parts(r[i].add(s * bytes + 4), 12);
                for sub in 0..8 {
                    (sc[sub][i], mn[sub][i]) = scale_min_k4(sub, q);
                }
            }
            for sub in 0..8 {
                let at = (s * 8 + sub) * PANEL;
                _mm512_storeu_ps(ws.add(at), _mm512_mul_ps(d, column(&sc[sub], false)));
                _mm512_storeu_ps(wm.add(at), _mm512_mul_ps(dmin, column(&mn[sub], false)));
                int(at, &sc[sub]);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
    unsafe fn pack_kind<const T: u8, const P: bool>(
        dst: *mut u8,
        sc: Scales,
        rows: &[*const u8],
        k: usize,
    ) {
        let (ws, wm) = (sc.ws, sc.wm);
        let nb = k / 32;
        // Split rows come as first planes, then second planes.
        let (rows, lo_rows) = if T == SPLIT {
            rows.split_at(rows.len() / 2)
        } else {
            (rows, &[][..])
        };
        let n = rows.len();
        assert!((1..=PANEL).contains(&n) && k.is_multiple_of(32));
        // Quads of rows 0-3 / 4-7 / 8-11 / 12-15 for one dword index: lanes 0 and 2 of
        // `a` and `b` (idx_a) or lanes 1 and 3 (idx_b), interleaved.
        let idx_a = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
        let idx_b = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
        // Bytes per 32 values, as far as prefetching cares.
        let ahead = match T {
            0..=4 => BYTES[T as usize],
            5 => 144 / 8,
            6 => 176 / 8,
            7 => 210 / 8,
            _ => 32,
        };
        for h in 0..n.div_ceil(16) {
            let r: [*const u8; 16] = std::array::from_fn(|i| rows[(h * 16 + i).min(n - 1)]);
            let rl: [*const u8; 16] = std::array::from_fn(|i| {
                lo_rows
                    .get((h * 16 + i).min(n - 1))
                    .copied()
                    .unwrap_or(std::ptr::null())
            });
            for c in 0..k / 32 {
                // Ask for the rows' blocks a few chunks ahead: 16 rows stream at once.
                // Prefetches never fault.
                if T == SPLIT {
                    if c % 4 == 0 {
                        for (&p, &q) in r.iter().zip(&rl) {
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(3 * nb + 16 * (c + 8)) as _);
                            _mm_prefetch::<_MM_HINT_T0>(q.wrapping_add(16 * (c + 8)) as _);
                        }
                    }
                } else if P {
                    // Planes: the values' plane is most of the bytes.
                    if c % 4 == 0 {
                        let q0 = [2, 2, 4, 6, 8][T as usize % 5] * nb;
                        let per = if T == 0 { 32 } else { 16 };
                        for &p in &r {
                            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(q0 + per * (c + 8)) as _);
                        }
                    }
                } else if c % 2 == 0 {
                    for &p in &r {
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(c * ahead + 8 * ahead) as _);
                    }
                }
                // z[i]: row i's 8 quads, then row i + 8's (a loop, not a closure: inlined).
                let mut z = [_mm512_setzero_si512(); 8];
                for i in 0..8 {
                    let lo = chunk::<T, P>(r[i], rl[i], c, nb);
                    let hi = chunk::<T, P>(r[i + 8], rl[i + 8], c, nb);
                    z[i] = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(lo), hi);
                }
                // 4x4 transposes inside each 128-bit lane, for rows 0-3 (+8) and 4-7 (+8):
                // u[e] lane 0 = rows 0-3 quad e, lane 1 = rows 0-3 quad e + 4, lanes 2/3 the
                // same for rows 8-11; v[e] likewise for rows 4-7 and 12-15.
                let quarter = |z0, z1, z2, z3| {
                    let t0 = _mm512_unpacklo_epi32(z0, z1);
                    let t1 = _mm512_unpackhi_epi32(z0, z1);
                    let t2 = _mm512_unpacklo_epi32(z2, z3);
                    let t3 = _mm512_unpackhi_epi32(z2, z3);
                    [
                        _mm512_unpacklo_epi64(t0, t2),
                        _mm512_unpackhi_epi64(t0, t2),
                        _mm512_unpacklo_epi64(t1, t3),
                        _mm512_unpackhi_epi64(t1, t3),
                    ]
                };
                let u = quarter(z[0], z[1], z[2], z[3]);
                let v = quarter(z[4], z[5], z[6], z[7]);
                if T < 5 || T == SPLIT {
                    // The 32-value kinds: 16 rows' f16 block scales (and Q4_1/Q5_1's minimums,
                    // negated) to f32 in one conversion; `d * 1` is `d`.
                    let bytes = BYTES[T as usize % 5];
                    // Raw: `off` into the block; planes: the d plane at 0, m's at 2 nb.
                    let half = |off: usize| {
                        let at = if P || T == SPLIT {
                            off * nb + 2 * c
                        } else {
                            c * bytes + off
                        };
                        let mut h = [0u16; 16];
                        for i in 0..16 {
                            h[i] = (r[i].add(at) as *const u16).read_unaligned();
                        }
                        _mm512_cvtph_ps(_mm256_loadu_si256(h.as_ptr() as *const __m256i))
                    };
                    _mm512_storeu_ps(ws.add(c * PANEL + h * 16), half(0));
                    if T == 2 || T == 4 {
                        let m = _mm512_castps_si512(half(2));
                        let neg = _mm512_xor_si512(m, _mm512_set1_epi32(i32::MIN));
                        _mm512_storeu_ps(wm.add(c * PANEL + h * 16), _mm512_castsi512_ps(neg));
                    }
                } else if T < UNPACKED && c % 8 == 0 {
                    // A K-quant superblock starts: its 16 rows' scales and minimums.
                    k_scales::<T>(&r, c / 8, sc.at_row(h * 16));
                }
                let base = dst.add(c * 8 * 4 * PANEL + h * 64);
                for e in 0..4 {
                    let qa = _mm512_permutex2var_epi64(u[e], idx_a, v[e]);
                    let qb = _mm512_permutex2var_epi64(u[e], idx_b, v[e]);
                    _mm512_storeu_si512(base.add(e * 4 * PANEL) as *mut __m512i, qa);
                    _mm512_storeu_si512(base.add((e + 4) * 4 * PANEL) as *mut __m512i, qb);
                }
            }
        }
    }

    /// `f += v * s * dx` for a row's two halves of 32 columns (`v` integer sums).
    #[inline(always)]
    unsafe fn scaled_add(f: &mut [__m512; 2], v: &[__m512i; 2], s: [__m512; 2], dx: f32) {
        let dx = _mm512_set1_ps(dx);
        for h in 0..2 {
            f[h] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v[h]), s[h]), dx, f[h]);
        }
    }

    /// Rows `i..i + R` of `acts` times the panel over scale `groups`; the first chunk (from
    /// group 0) writes `out`, later ones add to it. Meanwhile `ahead`'s bytes (up to three
    /// spans: the next chunk's weights, scales and minimums) are fetched into L2, a few lines
    /// per group.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,fma")]
    pub unsafe fn rows<
        const R: usize,
        const G: usize,
        const MIN: bool,
        const NIB: bool,
        const KS: bool,
        const HB: bool,
        const H: bool,
    >(
        p: &Panel,
        acts: &Acts,
        i: usize,
        groups: std::ops::Range<usize>,
        out: *mut f32,
        ldo: usize,
        ahead: &[(*const u8, usize); 3],
    ) {
        let (c0, c1) = (groups.start, groups.end);
        let k = p.k;
        // Lines of `ahead` to fetch per group.
        let lines: usize = ahead.iter().map(|&(_, n)| n.div_ceil(64)).sum();
        let per_group = lines.div_ceil((c1 - c0).max(1));
        let mut fetched = 0usize;
        let groups = k / G;
        let (m0, m1) = crate::kernels::cpu::panels::x86::col_masks(p.rows);
        let up = if NIB { p.nib.as_ptr() } else { p.u.as_ptr() };
        // Nibble panels: values `q + bias`, so each group's sum starts `bias * sum(xq)`
        // lower (`off` is `-128 * sum(xq)`).
        let bias = p.four_bit.or(p.five_bit).unwrap_or(0) as i32;
        // Bytes per group of 4 inputs in `nib` (5-bit types: 16 more, of fifth bits).
        let nib_quad = if HB { 80 } else { 64 };
        let sixteen = _mm512_set1_epi8(16);
        let low = _mm512_set1_epi8(0x0F);
        let (wsp, wmp) = (p.ws.as_ptr(), p.wm.as_ptr());
        let (wsh, wmh) = (p.wsh.as_ptr(), p.wmh.as_ptr());
        // 16 scales (or minimums) at `at`: f32, or kept f16 widened (`H`).
        let sixteen_of = |f: *const f32, h: *const u16, at: usize| {
            if H {
                _mm512_cvtph_ps(_mm256_loadu_si256(h.add(at) as *const __m256i))
            } else {
                _mm512_loadu_ps(f.add(at))
            }
        };
        let xq: [*const i8; R] = std::array::from_fn(|r| acts.rows.q.as_ptr().add((i + r) * k));
        let xd: [*const f32; R] = std::array::from_fn(|r| acts.d.as_ptr().add((i + r) * groups));
        let xo: [*const i32; R] = std::array::from_fn(|r| acts.off.as_ptr().add((i + r) * groups));
        let xs: [*const f32; R] = std::array::from_fn(|r| acts.s.as_ptr().add((i + r) * groups));
        let op: [*mut f32; R] = std::array::from_fn(|r| out.add((i + r) * ldo));
        // K-quants (KS): groups per superblock, and the integer sums of `sc * group sum` over
        // the current one.
        let per_sb = 256 / G;
        let mut ia = [[_mm512_setzero_si512(); 2]; R];
        let mut f = [[_mm512_setzero_ps(); 2]; R];
        if c0 > 0 {
            for r in 0..R {
                f[r][0] = _mm512_maskz_loadu_ps(m0, op[r]);
                f[r][1] = _mm512_maskz_loadu_ps(m1, op[r].add(16));
            }
        }
        for b in c0..c1 {
            // Into L2: the next chunk, a few lines per group. Prefetches never fault.
            for _ in 0..per_group.min(lines - fetched.min(lines)) {
                let mut l = fetched;
                for &(p, n) in ahead {
                    let nl = n.div_ceil(64);
                    if l < nl {
                        _mm_prefetch::<_MM_HINT_T1>(p.wrapping_add(64 * l) as *const i8);
                        break;
                    }
                    l -= nl;
                }
                fetched += 1;
            }
            let mut acc = [[_mm512_setzero_si512(); 2]; R];
            for r in 0..R {
                let o = *xo[r].add(b);
                let o = _mm512_set1_epi32(if NIB { o / 128 * bias } else { o });
                acc[r] = [o, o];
            }
            let ub = if NIB {
                up.add(b * G / 4 * nib_quad)
            } else {
                up.add(b * G / 4 * 4 * PANEL)
            };
            if i == 0 {
                // The first rows' pass streams the panel from memory: fetch a few groups ahead
                // (the weights, then the scales and minimums).
                let ahead = if NIB {
                    G / 4 * nib_quad
                } else {
                    G / 4 * 4 * PANEL
                } * PF;
                let lines = if NIB { G / 4 * nib_quad / 64 } else { G / 2 };
                for l in 0..lines {
                    _mm_prefetch::<_MM_HINT_T0>(ub.wrapping_add(ahead + 64 * l) as *const i8);
                }
                let sa = if KS {
                    p.isc.as_ptr().wrapping_add((b + PF) * PANEL)
                } else {
                    if H {
                        wsh.wrapping_add((b + PF) * PANEL) as *const i8
                    } else {
                        wsp.wrapping_add((b + PF) * PANEL) as *const i8
                    }
                };
                _mm_prefetch::<_MM_HINT_T0>(sa);
                _mm_prefetch::<_MM_HINT_T0>(sa.wrapping_add(64));
                if MIN {
                    let ma = if H {
                        wmh.wrapping_add((b + PF) * PANEL) as *const i8
                    } else {
                        wmp.wrapping_add((b + PF) * PANEL) as *const i8
                    };
                    _mm_prefetch::<_MM_HINT_T0>(ma);
                    _mm_prefetch::<_MM_HINT_T0>(ma.wrapping_add(64));
                }
            }
            for t in 0..G / 4 {
                let (w0, w1) = if NIB {
                    let v = _mm512_loadu_si512(ub.add(t * 64) as *const __m512i);
                    let (w0, w1) = (
                        _mm512_and_si512(v, low),
                        _mm512_and_si512(_mm512_srli_epi16::<4>(v), low),
                    );
                    if HB {
                        // The fifth bits: 16 more where set.
                        let hb = ub.add(G / 4 * 64 + t * 16) as *const u64;
                        (
                            _mm512_mask_add_epi8(w0, hb.read_unaligned(), w0, sixteen),
                            _mm512_mask_add_epi8(w1, hb.add(1).read_unaligned(), w1, sixteen),
                        )
                    } else {
                        (w0, w1)
                    }
                } else {
                    (
                        _mm512_loadu_si512(ub.add(t * 4 * PANEL) as *const __m512i),
                        _mm512_loadu_si512(ub.add(t * 4 * PANEL + 64) as *const __m512i),
                    )
                };
                for r in 0..R {
                    let xv = _mm512_set1_epi32(
                        (xq[r].add(b * G + 4 * t) as *const i32).read_unaligned(),
                    );
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, xv);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, xv);
                }
            }
            if KS {
                // `sc` in integers; the superblock's `d * dx` once at its end (below).
                let sc = p.isc.as_ptr().add(b * PANEL) as *const __m128i;
                let s0 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc));
                let s1 = _mm512_cvtepi8_epi32(_mm_loadu_si128(sc.add(1)));
                for r in 0..R {
                    ia[r][0] = _mm512_add_epi32(ia[r][0], _mm512_mullo_epi32(acc[r][0], s0));
                    ia[r][1] = _mm512_add_epi32(ia[r][1], _mm512_mullo_epi32(acc[r][1], s1));
                }
            }
            if KS && (b + 1) % per_sb == 0 {
                let wd = p.wd.as_ptr().add(b / per_sb * PANEL);
                let (d0, d1) = (_mm512_loadu_ps(wd), _mm512_loadu_ps(wd.add(16)));
                for r in 0..R {
                    // Q8_K: one activation scale per superblock.
                    scaled_add(&mut f[r], &ia[r], [d0, d1], *xd[r].add(b));
                    ia[r] = [_mm512_setzero_si512(); 2];
                }
            }
            if !KS {
                let s0 = sixteen_of(wsp, wsh, b * PANEL);
                let s1 = sixteen_of(wsp, wsh, b * PANEL + 16);
                for r in 0..R {
                    scaled_add(&mut f[r], &acc[r], [s0, s1], *xd[r].add(b));
                }
            }
            if MIN {
                let n0 = sixteen_of(wmp, wmh, b * PANEL);
                let n1 = sixteen_of(wmp, wmh, b * PANEL + 16);
                for r in 0..R {
                    let sx = _mm512_set1_ps(*xs[r].add(b));
                    f[r][0] = _mm512_fnmadd_ps(n0, sx, f[r][0]);
                    f[r][1] = _mm512_fnmadd_ps(n1, sx, f[r][1]);
                }
            }
        }
        for r in 0..R {
            _mm512_mask_storeu_ps(op[r], m0, f[r][0]);
            _mm512_mask_storeu_ps(op[r].add(16), m1, f[r][1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cpu::blocks::{dequantize, dot_int};
    use crate::kernels::cpu::test_values;
    use candle_core::quantized::QTensor;
    use candle_core::{Device, Tensor};

    /// Every block type we load.
    const TYPES: [GgmlDType; 10] = crate::kernels::cpu::blocks::BLOCK_TYPES;

    /// `n` rows of `k` test values quantized to `dt`: the file's bytes, and its row size.
    fn quantized_rows(dt: GgmlDType, n: usize, k: usize, seed: u64) -> (Vec<u8>, usize) {
        let w = test_values(n * k, seed, 2.0);
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let bytes = QTensor::quantize(&wt, dt).unwrap().data().unwrap().to_vec();
        let rb = bytes.len() / n;
        (bytes, rb)
    }

    /// The raw-block packing (AVX-512) against the plain one: the same panel bytes for every
    /// valid row, the same scales and minimums, for every type, full and partial panels
    /// (1, 7, 16, 17, 32 rows), one superblock and several.
    #[test]
    fn fast_packing_matches_portable() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: only the portable packing runs");
            return;
        }
        for (ti, dt) in TYPES.into_iter().enumerate() {
            for k in [256usize, 768] {
                let n = 32;
                let (bytes, rb) = quantized_rows(dt, n, k, 31 + ti as u64);
                let all: Vec<&[u8]> = bytes.chunks_exact(rb).collect();
                // The same rows in the int8 mode's planes (32-value types).
                let mut planes = bytes.clone();
                let packable = crate::kernels::cpu::packed::packable(dt, k);
                if packable {
                    crate::kernels::cpu::packed::pack_rows(dt, &mut planes, k);
                }
                let prows: Vec<&[u8]> = planes.chunks_exact(rb).collect();
                for (rows, from_planes) in [1usize, 7, 16, 17, 32]
                    .into_iter()
                    .flat_map(|r| [(r, false), (r, true)])
                {
                    if from_planes && !packable {
                        continue;
                    }
                    let (mut fast, mut plain) = (Panel::default(), Panel::default());
                    if from_planes {
                        fast.pack_planes(dt, &prows[..rows], k);
                    } else {
                        fast.pack(dt, &all[..rows], k);
                    }
                    plain.pack_portable(dt, &all[..rows], k);
                    assert_eq!(fast.has_min, plain.has_min, "{dt:?}");
                    for t in 0..k / 4 {
                        for j in 0..rows {
                            let at = t * 4 * PANEL + (j / 16) * 64 + (j % 16) * 4;
                            assert_eq!(
                                fast.u[at..at + 4],
                                plain.u[at..at + 4],
                                "{dt:?} k={k} rows={rows} planes={from_planes}: quad {t} of row {j}"
                            );
                        }
                    }
                    // K-quants' integer scales: the same, and `ws` is exactly `wd * isc`.
                    let k_quant = block_shape(dt).is_some_and(|(sb, _)| sb == 256);
                    assert_eq!(!fast.isc.is_empty(), k_quant, "{dt:?}: integer scales");
                    for s in 0..k / 256 {
                        for j in (0..rows).filter(|_| k_quant) {
                            let i = s * PANEL + j;
                            assert_eq!(fast.wd[i].to_bits(), plain.wd[i].to_bits(), "{dt:?} wd");
                            for b in s * 256 / group_of(dt)..(s + 1) * 256 / group_of(dt) {
                                let i = b * PANEL + j;
                                assert_eq!(fast.isc[i], plain.isc[i], "{dt:?} isc");
                                assert_eq!(
                                    fast.isc[i] as f32 * fast.wd[s * PANEL + j],
                                    fast.ws[i],
                                    "{dt:?}: ws = wd * isc"
                                );
                            }
                        }
                    }
                    for b in 0..k / group_of(dt) {
                        for j in 0..rows {
                            let i = b * PANEL + j;
                            assert_eq!(fast.ws[i].to_bits(), plain.ws[i].to_bits(), "{dt:?} ws");
                            if plain.has_min {
                                assert_eq!(fast.wm[i].to_bits(), plain.wm[i].to_bits(), "{dt:?}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Q8_0 rows kept in split8's planes pack to the same panel as their raw blocks.
    #[test]
    fn split_planes_pack_like_raw_blocks() {
        let k = 256;
        let (bytes, rb) = quantized_rows(GgmlDType::Q8_0, 32, k, 77);
        let split = crate::kernels::cpu::split8::SplitQ8::new(32, k, |r, out| {
            out.copy_from_slice(&bytes[r * rb..(r + 1) * rb])
        });
        let all: Vec<&[u8]> = bytes.chunks_exact(rb).collect();
        for rows in [1usize, 16, 19, 32] {
            let (first, second): (Vec<&[u8]>, Vec<&[u8]>) =
                (0..rows).map(|r| split.planes(r)).unzip();
            let (mut a, mut b) = (Panel::default(), Panel::default());
            a.pack_split(&first, &second, k);
            b.pack_portable(GgmlDType::Q8_0, &all[..rows], k);
            for t in 0..k / 4 {
                for j in 0..rows {
                    let at = t * 4 * PANEL + (j / 16) * 64 + (j % 16) * 4;
                    assert_eq!(
                        a.u[at..at + 4],
                        b.u[at..at + 4],
                        "rows={rows} quad {t} row {j}"
                    );
                }
            }
            for i in (0..k / 32).flat_map(|g| (0..rows).map(move |j| g * PANEL + j)) {
                assert_eq!(a.ws[i].to_bits(), b.ws[i].to_bits());
            }
        }
    }

    /// A kept panel (4-bit types as nibbles) gives the bits of the panel it was made from,
    /// for every type, full and partial panels, 1-17 rows, several chunks; a partial panel's
    /// leftover rows (from a tile of another type before) change nothing.
    #[test]
    fn kept_panels_multiply_like_fresh_ones() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        for (ti, dt) in TYPES.into_iter().enumerate() {
            for (m, n, k) in [
                (16usize, 32usize, 1280usize),
                (5, 19, 256),
                (1, 7, 768),
                (17, 32, 512),
            ] {
                let x = test_values(m * k, 3 + ti as u64, 3.0);
                let (bytes, rb) = quantized_rows(dt, n, k, 41 + ti as u64);
                let rows: Vec<&[u8]> = bytes.chunks_exact(rb).collect();
                let acts = Acts::new(&x, k, dt);
                // Leftovers: the scratch panel held a full Q8_0 tile before.
                let (q8, q8rb) = quantized_rows(GgmlDType::Q8_0, PANEL, k, 5);
                let q8rows: Vec<&[u8]> = q8.chunks_exact(q8rb).collect();
                let mut panel = Panel::default();
                panel.pack(GgmlDType::Q8_0, &q8rows, k);
                panel.pack(dt, &rows, k);
                let mut fresh = vec![0f32; m * n];
                // SAFETY: fresh is m x n and the panel holds n rows.
                unsafe { panel.product(&acts, fresh.as_mut_ptr(), n) };
                let kept = panel.kept();
                let four_bit = matches!(
                    dt,
                    GgmlDType::Q4_0
                        | GgmlDType::Q4_1
                        | GgmlDType::Q4K
                        | GgmlDType::Q5_0
                        | GgmlDType::Q5_1
                );
                assert_eq!(!kept.nib.is_empty(), four_bit, "{dt:?}: nibbles kept");
                assert_eq!(kept.u.is_empty(), four_bit, "{dt:?}: bytes dropped");
                // The 32-value types' scales kept as the f16 values they are.
                let thirty_two = block_shape(dt).is_some_and(|(sb, _)| sb == 32);
                assert_eq!(!kept.wsh.is_empty(), thirty_two, "{dt:?}: f16 scales");
                assert!(
                    !thirty_two || kept.ws.is_empty(),
                    "{dt:?}: f32 scales dropped"
                );
                let mut again = vec![f32::NAN; m * n];
                // SAFETY: as above. With a next panel to fetch ahead (fetching changes no
                // value).
                unsafe { kept.product_then(&acts, again.as_mut_ptr(), n, Some(&kept)) };
                for (i, (a, b)) in fresh.iter().zip(&again).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{dt:?} m={m} n={n} k={k}: value {i}"
                    );
                }
            }
        }
    }

    /// Every block type, prompt lengths that leave 1, 2 or 3 rows after the calls of four
    /// (kernel calls of 1, 2 and 3 rows), a partial panel, inputs over several chunks: the
    /// panel product equals the decoding kernels' integer dot (the same integer sums, in
    /// another f32 order) and the f64 product of the dequantized weights and rounded
    /// activations.
    #[test]
    fn panel_product_matches_integer_dots() {
        if !available() {
            eprintln!("no AVX-512 VNNI on this CPU: nothing to compare");
            return;
        }
        for (ti, dt) in TYPES.into_iter().enumerate() {
            for (m, n, k) in [
                (7usize, 19usize, 256usize),
                (5, 32, 1280),
                (9, 3, 768),
                (6, 21, 512),
            ] {
                let x: Vec<f32> = test_values(m * k, 5 + ti as u64, 3.0)
                    .iter()
                    .map(|v| v + 0.2)
                    .collect();
                let (bytes, rb) = quantized_rows(dt, n, k, 11 + ti as u64);
                let rows: Vec<&[u8]> = bytes.chunks_exact(rb).collect();
                let acts = Acts::new(&x, k, dt);
                let mut panel = Panel::default();
                let mut out = vec![f32::NAN; m * (n + 2)];
                for (p, tile) in rows.chunks(PANEL).enumerate() {
                    panel.pack(dt, tile, k);
                    // SAFETY: out is m x (n + 2); the tile's columns start at p * PANEL.
                    unsafe { panel.product(&acts, out.as_mut_ptr().add(p * PANEL), n + 2) };
                }
                let xr = acts.rows.dequantize();
                let mut u = Unpacked::default();
                let mut wrow = vec![0f32; k];
                for (j, row) in rows.iter().enumerate() {
                    u.unpack(dt, row, k);
                    dequantize(&u, &mut wrow);
                    for i in 0..m {
                        let got = out[i * (n + 2) + j];
                        let want = dot_int(&u, acts.rows.row(i));
                        let xi = &xr[i * k..(i + 1) * k];
                        let exact: f64 = wrow
                            .iter()
                            .zip(xi)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum();
                        let mag: f32 = wrow.iter().zip(xi).map(|(a, b)| (a * b).abs()).sum();
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + mag),
                            "{dt:?} m={m} k={k} ({i}, {j}): panel {got} vs row dot {want}"
                        );
                        // Q4_1/Q5_1 take the minimum's term from Q8_1's f16 `s`, as llama.cpp
                        // does: not the exact product of the rounded activations.
                        let tol = if matches!(dt, GgmlDType::Q4_1 | GgmlDType::Q5_1) {
                            1e-3
                        } else {
                            1e-5
                        };
                        assert!(
                            (got as f64 - exact).abs() <= tol * (1.0 + mag as f64),
                            "{dt:?} m={m} k={k} ({i}, {j}): panel {got} vs f64 {exact}"
                        );
                    }
                }
                for i in 0..m {
                    assert!(
                        out[i * (n + 2) + n].is_nan(),
                        "{dt:?}: wrote past the last row"
                    );
                }
            }
        }
    }
}
