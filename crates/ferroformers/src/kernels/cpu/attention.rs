//! Attention over plain f32 buffers, shared by the CPU fast paths: whole sequences at once
//! (BERT-family and T5 encoders), and for decoders (T5, Llama) a key/value buffer per layer
//! that grows by doubling, with one query row attending over it; and a few query rows over
//! cached keys for the candle decoders' `sdpa` on CPU (GPT-2, BART).

use super::bf16::{self, Bf16Weights};
use super::rowops::{fast_exp, softmax_masked_g};
use super::simd::{dispatch, dot16, max16, sum16};
use super::threads::{in_worker, par_tasks, SendPtr};

/// One attention layer's cached keys and values: per row and head, `[len, dim]` keys and
/// values in a vector of their own. Rows join, leave and are reordered by moving those
/// vectors (a continuous batch's new rows copy only themselves, a leaving row nothing), and a
/// row grows by its vectors' own doubling instead of re-laying out the whole buffer (one
/// `[rows, heads, cap, dim]` buffer copied ~160 MB at a time for a 16-row SmolLM2 batch).
///
/// [`KvBuffer::new_f16`] keeps the keys and values rounded to f16 (as llama.cpp's KV cache
/// does), two to each word of the same vectors: half the bytes to read per step, to copy when
/// rows join and to keep as prefixes. Readers then take [`KvBuffer::get_f16`].
#[derive(Debug, Clone)]
pub struct KvBuffer {
    heads: usize,
    dim: usize,
    len: usize,
    /// Values rounded to f16, two per f32 word (`dim` even).
    f16: bool,
    /// `rows * heads` slots, row-major.
    slots: Vec<Slot>,
}

/// One row's and head's keys and values, each `[positions, dim]` (in f16 mode `dim / 2` words
/// per position, each word two f16 values); its vectors go back to
/// [`SPARE`] when it is dropped.
///
/// The first `pad` positions (a multiple of [`SKIP_BLOCK`]) are left padding that is not
/// stored: the vectors hold positions `pad..`. A short row joined to a batch that a long
/// prompt made wide takes no memory and no copy for most of its padding; readers start at
/// `pad` (attention skips masked keys in whole blocks of `SKIP_BLOCK` anyway).
#[derive(Debug, Clone, Default)]
struct Slot {
    k: Vec<f32>,
    v: Vec<f32>,
    pad: usize,
}

impl Drop for Slot {
    fn drop(&mut self) {
        give_spare(std::mem::take(&mut self.k));
        give_spare(std::mem::take(&mut self.v));
    }
}

/// Freed key/value vectors, by capacity, for the next rows to take: a new vector's pages each
/// cost a page fault on first write (~1.7 us per 4 KiB on the Xeon of session 25: 15 rows
/// joining a SmolLM2 batch took ~17k faults, most of its 7-20 ms), and the allocator hands
/// freed memory back to the kernel. At most [`SPARE_BYTES`] are kept.
static SPARE: std::sync::Mutex<Spare> = std::sync::Mutex::new(Spare {
    by_capacity: std::collections::BTreeMap::new(),
    bytes: 0,
});
const SPARE_BYTES: usize = 128 << 20;

struct Spare {
    by_capacity: std::collections::BTreeMap<usize, Vec<Vec<f32>>>,
    bytes: usize,
}

fn spare() -> std::sync::MutexGuard<'static, Spare> {
    SPARE.lock().unwrap_or_else(|e| e.into_inner())
}

impl Spare {
    /// An empty vector with room for at least `n` values: the smallest kept one that fits,
    /// else a new one.
    fn take(&mut self, n: usize) -> Vec<f32> {
        let found = self
            .by_capacity
            .range_mut(n..)
            .next()
            .and_then(|(&c, vs)| Some((c, vs.pop()?)));
        match found {
            Some((c, mut v)) => {
                if self.by_capacity.get(&c).is_some_and(Vec::is_empty) {
                    self.by_capacity.remove(&c);
                }
                self.bytes -= c * std::mem::size_of::<f32>();
                v.clear();
                v
            }
            None => Vec::with_capacity(n),
        }
    }

    /// Keep `v` for [`Spare::take`] while `limit` bytes allow.
    fn give(&mut self, v: Vec<f32>, limit: usize) {
        let c = v.capacity();
        let bytes = c * std::mem::size_of::<f32>();
        if c > 0 && self.bytes + bytes <= limit {
            self.bytes += bytes;
            self.by_capacity.entry(c).or_default().push(v);
        }
    }
}

/// [`Spare::take`] from the shared pool.
fn take_spare(n: usize) -> Vec<f32> {
    spare().take(n)
}

/// Empty the pool of freed key/value vectors (a server gone idle hands them back): the bytes
/// it held. Rows that join later allocate afresh.
pub fn drop_spare_buffers() -> usize {
    let mut s = spare();
    s.by_capacity.clear();
    std::mem::take(&mut s.bytes)
}

/// [`Spare::give`] to the shared pool, up to [`SPARE_BYTES`].
fn give_spare(v: Vec<f32>) {
    if v.capacity() > 0 {
        spare().give(v, SPARE_BYTES);
    }
}

impl Slot {
    /// Store the padding from the block holding position `pos` on, when `pos` falls in the
    /// unstored padding (a write there, or a length shorter than it).
    fn unpad_to(&mut self, pos: usize, w: usize) {
        if pos >= self.pad {
            return;
        }
        let new = pos / SKIP_BLOCK * SKIP_BLOCK;
        let zeros = (self.pad - new) * w;
        for x in [&mut self.k, &mut self.v] {
            x.splice(0..0, std::iter::repeat_n(0.0, zeros));
        }
        self.pad = new;
    }

    /// The first `n` positions of `src` after `pad` positions of zeros, with room for `room`
    /// more (the zeros in whole blocks of [`SKIP_BLOCK`] are not stored).
    fn padded(src: &Slot, pad: usize, n: usize, room: usize, d: usize) -> Slot {
        let zeros = pad + src.pad.min(n);
        let virt = zeros / SKIP_BLOCK * SKIP_BLOCK;
        let stored = n.saturating_sub(src.pad);
        let part = |x: &[f32]| {
            let mut out = take_spare((zeros - virt + stored + room) * d);
            out.resize((zeros - virt) * d, 0.0);
            let have = (x.len() / d.max(1)).min(stored);
            out.extend_from_slice(&x[..have * d]);
            // Positions never stored read as zeros.
            out.resize((zeros - virt + stored) * d, 0.0);
            out
        };
        Slot {
            k: part(&src.k),
            v: part(&src.v),
            pad: virt,
        }
    }
}

/// `src` widened to f32 into `out` (exact), 16 values per instruction with AVX-512 (`half`'s
/// slice conversion goes through a function pointer per 8 values).
fn widen_f16(src: &[half::f16], out: &mut Vec<f32>) {
    out.clear();
    out.resize(src.len(), 0.0);
    #[cfg(target_arch = "x86_64")]
    if softmax16_available() {
        // SAFETY: the CPU has AVX-512F; `out` holds `src.len()` values.
        unsafe { x86::widen_f16(src, out) };
        return;
    }
    use half::slice::HalfFloatSliceExt;
    src.convert_to_f32_slice(out);
}

/// The parts of a join that have rows, each `n` at most its buffer's length.
fn used_parts<'a>(parts: &[(&'a KvBuffer, usize)]) -> Vec<(&'a KvBuffer, usize)> {
    parts
        .iter()
        .filter(|(b, _)| b.rows() > 0)
        .map(|&(b, n)| (b, n.min(b.len)))
        .collect()
}

/// Every row of `parts` as new slots: its first `n` positions right-aligned to `len` (zeros
/// before them), with room for `room` more.
fn padded_rows<'a>(
    parts: &'a [(&'a KvBuffer, usize)],
    len: usize,
    room: usize,
) -> impl Iterator<Item = Slot> + 'a {
    parts.iter().flat_map(move |&(b, n)| {
        b.slots
            .iter()
            .map(move |s| Slot::padded(s, len - n, n, room.max(1), b.words()))
    })
}

impl KvBuffer {
    pub fn new(rows: usize, heads: usize, dim: usize) -> Self {
        Self {
            heads,
            dim,
            len: 0,
            f16: false,
            slots: vec![Slot::default(); rows * heads],
        }
    }

    /// [`KvBuffer::new`] whose keys and values are kept rounded to f16 (f32 when `dim` is odd).
    pub fn new_f16(rows: usize, heads: usize, dim: usize) -> Self {
        Self {
            f16: dim.is_multiple_of(2),
            ..Self::new(rows, heads, dim)
        }
    }

    /// Whether it keeps f16 values ([`KvBuffer::get_f16`]).
    pub fn is_f16(&self) -> bool {
        self.f16
    }

    /// f32 words per position of a slot.
    fn words(&self) -> usize {
        if self.f16 {
            self.dim / 2
        } else {
            self.dim
        }
    }

    /// Bytes its keys and values take (reserved room included).
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
            .map(|s| s.k.capacity() + s.v.capacity())
            .sum::<usize>()
            * std::mem::size_of::<f32>()
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn rows(&self) -> usize {
        self.slots.len() / self.heads.max(1)
    }

    /// Room for `extra` more positions (each row's vectors grow by doubling, so a decoding
    /// step rarely copies anything).
    pub fn reserve(&mut self, extra: usize) {
        let w = self.words();
        for s in &mut self.slots {
            let have = self.len.saturating_sub(s.pad) * w;
            let want = have + extra * w;
            for x in [&mut s.k, &mut s.v] {
                x.truncate(have);
                if x.capacity() == 0 {
                    *x = take_spare(want);
                }
                x.reserve(want - x.len());
            }
        }
    }

    /// Store the key and value of `row`, `head` at position `pos` (positions before it that
    /// were never stored read as zeros).
    /// In f16 mode the values are rounded to the nearest f16 (ties to even).
    pub fn put(&mut self, row: usize, head: usize, pos: usize, k: &[f32], v: &[f32]) {
        let (d, w, f16) = (self.dim, self.words(), self.f16);
        let s = &mut self.slots[row * self.heads + head];
        s.unpad_to(pos, w);
        let pos = pos - s.pad;
        for (x, new) in [(&mut s.k, k), (&mut s.v, v)] {
            if x.len() < (pos + 1) * w {
                x.resize((pos + 1) * w, 0.0);
            }
            let at = &mut x[pos * w..(pos + 1) * w];
            if f16 {
                use half::slice::HalfFloatSliceExt;
                // SAFETY: `w` f32 words are `2 * w = d` f16 values (alignment 4 >= 2).
                let h =
                    unsafe { std::slice::from_raw_parts_mut(at.as_mut_ptr() as *mut half::f16, d) };
                h.convert_from_f32_slice(&new[..d]);
            } else {
                at.copy_from_slice(&new[..d]);
            }
        }
    }

    /// Positions `0..len` now hold data (any never stored read as zeros).
    pub fn set_len(&mut self, len: usize) {
        let w = self.words();
        for s in &mut self.slots {
            s.unpad_to(len, w);
            let n = (len - s.pad) * w;
            for x in [&mut s.k, &mut s.v] {
                if x.len() < n {
                    x.resize(n, 0.0);
                }
            }
        }
        self.len = len;
    }

    /// The leading positions of `row`, `head` that are padding and not stored: the getters
    /// below start after them (a multiple of [`SKIP_BLOCK`]; 0 for a buffer whose rows were
    /// never joined to longer ones).
    pub fn pad(&self, row: usize, head: usize) -> usize {
        self.slots[row * self.heads + head].pad
    }

    /// Keys and values of `row`, `head` at positions `pad..n` ([`KvBuffer::pad`]; f32 mode).
    pub fn get(&self, row: usize, head: usize, n: usize) -> (&[f32], &[f32]) {
        assert!(!self.f16, "an f16 KV buffer is read with get_f16");
        let s = &self.slots[row * self.heads + head];
        let n = n.saturating_sub(s.pad) * self.dim;
        (&s.k[..n], &s.v[..n])
    }

    /// Keys and values of `row`, `head` at positions `pad..n` ([`KvBuffer::pad`]; f16 mode).
    pub fn get_f16(&self, row: usize, head: usize, n: usize) -> (&[half::f16], &[half::f16]) {
        assert!(self.f16, "an f32 KV buffer is read with get");
        let s = &self.slots[row * self.heads + head];
        let w = n.saturating_sub(s.pad) * self.words();
        let h = |x: &[f32]| {
            let x = &x[..w];
            // SAFETY: `w` f32 words hold `n * dim` f16 values (alignment 4 >= 2).
            unsafe { std::slice::from_raw_parts(x.as_ptr() as *const half::f16, 2 * w) }
        };
        (h(&s.k), h(&s.v))
    }

    /// Keys and values of `row`, `head` at positions `pad..n` as f32 ([`KvBuffer::pad`]):
    /// borrowed in f32 mode, widened into `scratch` in f16 mode.
    pub fn get_f32<'a>(
        &'a self,
        row: usize,
        head: usize,
        n: usize,
        scratch: &'a mut (Vec<f32>, Vec<f32>),
    ) -> (&'a [f32], &'a [f32]) {
        if !self.f16 {
            return self.get(row, head, n);
        }
        let (k, v) = self.get_f16(row, head, n);
        widen_f16(k, &mut scratch.0);
        widen_f16(v, &mut scratch.1);
        (&scratch.0[..], &scratch.1[..])
    }

    /// Keep rows: row `i` afterwards is row `rows[i]` before. Rows are moved, not copied; a
    /// row kept twice (beam search) is copied once for each extra use.
    pub fn select_rows(&mut self, rows: &[usize]) -> candle_core::Result<()> {
        let n = self.rows();
        if let Some(&bad) = rows.iter().find(|&&r| r >= n) {
            candle_core::bail!("row {bad} is out of range ({n} rows)");
        }
        let mut uses = vec![0usize; n];
        rows.iter().for_each(|&r| uses[r] += 1);
        let h = self.heads;
        let mut old = std::mem::take(&mut self.slots);
        let mut slots = Vec::with_capacity(rows.len() * h);
        for &r in rows {
            uses[r] -= 1;
            for s in &mut old[r * h..(r + 1) * h] {
                slots.push(if uses[r] == 0 {
                    std::mem::take(s)
                } else {
                    s.clone()
                });
            }
        }
        self.slots = slots;
        Ok(())
    }

    /// The rows of several buffers as one, in order: from part `(b, n)` every row's first
    /// `n` positions (at most its length). All are right-aligned to the longest `n` (the
    /// shorter rows' first positions are zeros: left padding, which the attention bias masks),
    /// with room for `extra` more positions. Each value is copied once.
    pub fn join(parts: &[(&KvBuffer, usize)], extra: usize) -> candle_core::Result<KvBuffer> {
        let parts = used_parts(parts);
        let Some(&(first, _)) = parts.first() else {
            candle_core::bail!("no KV buffer rows to join");
        };
        let (heads, d, f16) = (first.heads, first.dim, first.f16);
        if let Some((b, _)) = parts
            .iter()
            .find(|(b, _)| (b.heads, b.dim, b.f16) != (heads, d, f16))
        {
            candle_core::bail!(
                "KV buffers of {heads}x{d} and {}x{} (heads x dim, f16 {f16} and {}) cannot be \
                 joined",
                b.heads,
                b.dim,
                b.f16
            );
        }
        let len = parts.iter().map(|&(_, n)| n).max().unwrap_or(0);
        let slots = padded_rows(&parts, len, extra).collect();
        Ok(KvBuffer {
            heads,
            dim: d,
            len,
            f16,
            slots,
        })
    }

    /// [`Self::join`] of this buffer and `parts` in place, when every part's `n` (at most
    /// its length) fits in this buffer's length: the new rows go after this one's,
    /// right-aligned, left-padded with zeros, with room for `extra` more positions; this
    /// buffer's rows are not touched. Returns whether it could; `false` leaves the buffer as
    /// it was.
    pub fn append_rows(&mut self, parts: &[(&KvBuffer, usize)], extra: usize) -> bool {
        let parts = used_parts(parts);
        let (heads, d, len, f16) = (self.heads, self.dim, self.len, self.f16);
        if self.rows() == 0
            || parts
                .iter()
                .any(|&(b, n)| (b.heads, b.dim, b.f16) != (heads, d, f16) || n > len)
        {
            return false;
        }
        self.slots.extend(padded_rows(&parts, len, extra));
        true
    }

    /// Row `r`'s `positions` (each `< len`, in the order given) as a buffer of its own (one
    /// row).
    pub fn extract_row(&self, r: usize, positions: &[usize]) -> KvBuffer {
        let (d, heads) = (self.words(), self.heads);
        let len = positions.len();
        let mut slots = vec![Slot::default(); heads];
        if r < self.rows() {
            for (h, out) in slots.iter_mut().enumerate() {
                let src = &self.slots[r * heads + h];
                for x in [&mut out.k, &mut out.v] {
                    *x = take_spare((len + 16) * d);
                }
                for &p in positions.iter().filter(|&&p| p < self.len) {
                    for (o, x) in [(&mut out.k, &src.k), (&mut out.v, &src.v)] {
                        match p.checked_sub(src.pad).filter(|&q| (q + 1) * d <= x.len()) {
                            Some(q) => o.extend_from_slice(&x[q * d..(q + 1) * d]),
                            None => o.resize(o.len() + d, 0.0),
                        }
                    }
                }
            }
        }
        let mut b = KvBuffer {
            heads,
            dim: self.dim,
            len: 0,
            f16: self.f16,
            slots,
        };
        b.set_len(len);
        b
    }

    /// [`KvBuffer::extract_row`] for a row that is leaving: its vectors are moved out (and
    /// their `positions` moved to the front in place) instead of copied, and the row is left
    /// empty. `positions` must be ascending. A finished sequence's copy held up the batch's
    /// step for ~5 ms on SmolLM2 (fresh pages faulted in for ~110 positions); a move costs
    /// nothing but the in-place shift past its left padding.
    pub fn take_row(&mut self, r: usize, positions: &[usize]) -> KvBuffer {
        if !positions.is_sorted_by(|a, b| a < b) {
            return self.extract_row(r, positions);
        }
        let (d, heads, len) = (self.words(), self.heads, self.len);
        let mut slots = vec![Slot::default(); heads];
        if r < self.rows() {
            for (h, out) in slots.iter_mut().enumerate() {
                let mut s = std::mem::take(&mut self.slots[r * heads + h]);
                // Every position taken is stored (the padding before the first one need not).
                s.unpad_to(positions.first().copied().unwrap_or(len).min(len), d);
                let pad = std::mem::take(&mut s.pad);
                for x in [&mut s.k, &mut s.v] {
                    if x.len() < (len - pad) * d {
                        x.resize((len - pad) * d, 0.0);
                    }
                    // Ascending positions: position i comes from p >= i, never overwritten
                    // before it is read.
                    let mut n = 0;
                    for &p in positions.iter().filter(|&&p| p < len) {
                        let p = p - pad;
                        if p != n {
                            x.copy_within(p * d..(p + 1) * d, n * d);
                        }
                        n += 1;
                    }
                    x.truncate(n * d);
                    // Room reserved for far more tokens than the row came to generate is
                    // given back (the kept prefixes' budget counts capacity).
                    if x.capacity() > 2 * x.len() + 64 * d {
                        x.shrink_to_fit();
                    }
                }
                *out = s;
            }
        }
        let mut b = KvBuffer {
            heads,
            dim: self.dim,
            len: 0,
            f16: self.f16,
            slots,
        };
        b.set_len(positions.len());
        b
    }

    /// Keep only the first `n` positions.
    pub fn truncate(&mut self, n: usize) {
        self.len = self.len.min(n);
    }

    /// Forget the first `n` positions of every row (left padding that no row needs any more).
    pub fn drop_front(&mut self, n: usize) {
        let n = n.min(self.len);
        if n == 0 {
            return;
        }
        let d = self.words();
        for s in &mut self.slots {
            // Unstored padding goes first, then stored positions.
            let cut = n.min(s.pad);
            for x in [&mut s.k, &mut s.v] {
                x.truncate(self.len.saturating_sub(s.pad) * d);
                let drop = ((n - cut) * d).min(x.len());
                x.drain(..drop);
            }
            s.pad -= cut;
            // What stays unstored is a whole number of blocks.
            let rest = s.pad % SKIP_BLOCK;
            if rest > 0 {
                for x in [&mut s.k, &mut s.v] {
                    x.splice(0..0, std::iter::repeat_n(0.0, rest * d));
                }
                s.pad -= rest;
            }
        }
        self.len -= n;
    }
}

/// Bidirectional attention per (sequence, head) over `qkv` `[b * s, 3 * heads * d]` (queries,
/// keys and values side by side): scores `scale * q . k`, plus the head's `bias` `[heads, s, s]`
/// when given (T5's position bias), keys whose `keep` `[b, s]` is 0 dropped, softmax, then the
/// weighted values. Returns `[b * s, heads * d]`; `par` spreads the (sequence, head) pairs over
/// rayon's threads (when the work is large enough to pay for it).
#[allow(clippy::too_many_arguments)]
pub fn attend_sequences(
    qkv: &[f32],
    b: usize,
    s: usize,
    heads: usize,
    d: usize,
    scale: f32,
    bias: Option<&[f32]>,
    keep: &[f32],
    par: bool,
) -> Vec<f32> {
    let mut ctx = Vec::new();
    attend_sequences_into(qkv, b, s, heads, d, scale, bias, keep, par, &mut ctx);
    ctx
}

/// Sequence `bi`'s key mask (of `keep` `[b, s]`), or none (empty) when it keeps every key:
/// checked once, not per row.
fn sequence_keep(keep: &[f32], bi: usize, s: usize) -> &[f32] {
    let keep = &keep[bi * s..(bi + 1) * s];
    if keep.iter().all(|&k| k != 0.0) {
        &[]
    } else {
        keep
    }
}

/// [`attend_sequences`] into `ctx` (resized to `[b * s, heads * d]`, every value written):
/// a buffer reused from layer to layer is not allocated and zeroed again each time.
#[allow(clippy::too_many_arguments)]
pub fn attend_sequences_into(
    qkv: &[f32],
    b: usize,
    s: usize,
    heads: usize,
    d: usize,
    scale: f32,
    bias: Option<&[f32]>,
    keep: &[f32],
    par: bool,
    ctx: &mut Vec<f32>,
) {
    let inner = heads * d;
    let stride = 3 * inner;
    assert!(qkv.len() >= b * s * stride && keep.len() >= b * s);
    assert!(bias.is_none_or(|t| t.len() >= heads * s * s));
    ctx.resize(b * s * inner, 0.0);
    // Each (sequence, head, block of query rows) writes its own columns of its own rows.
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let qb = query_block(s);
    let blocks = s.div_ceil(qb);
    let short = bias.is_none() && short_attention(s, d) && !short_attention_off();
    let job = |(bi, hd, blk): (usize, usize, usize)| {
        let keep = sequence_keep(keep, bi, s);
        let (i0, i1) = (blk * qb, ((blk + 1) * qb).min(s));
        let base = bi * s * stride;
        let out = ctx_ptr;
        let mut scores = Vec::new();
        let bias_row = |i: usize| match bias {
            Some(t) => &t[(hd * s + i0 + i) * s..(hd * s + i0 + i + 1) * s],
            None => &[][..],
        };
        // SAFETY: q rows i0..i1, and all s keys and values, of this sequence and head lie in
        // qkv (row stride `stride`); rows i0..i1, columns hd*d.. of ctx (row stride inner)
        // belong to this job only.
        let (q, k, v, o) = unsafe {
            (
                (qkv.as_ptr().add(base + i0 * stride + hd * d), stride),
                (qkv.as_ptr().add(base + inner + hd * d), stride),
                (qkv.as_ptr().add(base + 2 * inner + hd * d), stride),
                (out.0.add((bi * s + i0) * inner + hd * d), inner),
            )
        };
        // SAFETY: as above.
        unsafe {
            if short {
                attend_short(q, k, v, (i1 - i0, s, d), scale, keep, o);
            } else {
                attend_block(
                    q,
                    k,
                    v,
                    (i1 - i0, s, d),
                    scale,
                    |_| s,
                    bias_row,
                    keep,
                    o,
                    &mut scores,
                );
            }
        }
    };
    let jobs = (0..b)
        .flat_map(|bi| (0..heads).flat_map(move |hd| (0..blocks).map(move |blk| (bi, hd, blk))));
    // A short input's attention (one sentence: ~100k products) is over before rayon's threads
    // wake up: split only when there is real work.
    if par && b * heads * s * s * d >= 1 << 20 {
        let jobs: Vec<_> = jobs.collect();
        par_tasks(jobs.len(), |i| job(jobs[i]));
    } else {
        jobs.for_each(job);
    }
}

/// [`attend_sequences_into`] with both products in bfloat16 (f32 sums, softmax in f32), for
/// the reduced-precision modes (`--quantize int8`, `--dtype bf16`): per (sequence, head) the
/// keys and values are rounded and packed once ([`Bf16Weights`]), then each block of query
/// rows (scaled, rounded) takes its scores from the keys and its output from the rounded
/// probabilities and the values, through the bf16 products' kernels (`vdpbf16ps`, twice
/// f32's multiply-adds per cycle). No position bias. Needs [`bf16::available`].
#[allow(clippy::too_many_arguments)]
pub fn attend_sequences_bf16_into(
    qkv: &[f32],
    b: usize,
    s: usize,
    heads: usize,
    d: usize,
    scale: f32,
    keep: &[f32],
    par: bool,
    ctx: &mut Vec<f32>,
) {
    let inner = heads * d;
    let stride = 3 * inner;
    assert!(qkv.len() >= b * s * stride && keep.len() >= b * s);
    ctx.resize(b * s * inner, 0.0);
    if s == 0 {
        return;
    }
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let job = |i: usize| {
        let (bi, hd) = (i / heads, i % heads);
        let keep = sequence_keep(keep, bi, s);
        let row = |t: usize, part: usize| {
            let at = (bi * s + t) * stride + part * inner + hd * d;
            &qkv[at..at + d]
        };
        // Scores q . k_j: the keys are the product's columns; out = p @ v: the values its rows.
        let keys = Bf16Weights::from_columns(|j| row(j, 1), d, s);
        let values = Bf16Weights::from_rows(|t| row(t, 2), s, d);
        let (dp, sp) = (keys.padded_inputs(), values.padded_inputs());
        let zeros = vec![0f32; s.max(d)];
        let qb = QB.min(s);
        let mut qs = vec![0f32; d];
        let mut q = vec![0u16; qb * dp];
        let mut scores = vec![0f32; qb * s];
        let mut p = vec![0u16; qb * sp];
        let mut inv = vec![0f32; qb];
        let mut o = vec![0f32; qb * d];
        for i0 in (0..s).step_by(qb) {
            let rows = qb.min(s - i0);
            for (t, qr) in q.chunks_exact_mut(dp).take(rows).enumerate() {
                for (x, &y) in qs.iter_mut().zip(row(i0 + t, 0)) {
                    *x = y * scale;
                }
                bf16::round_row(&qs, &mut qr[..d]);
                qr[d..].fill(0);
            }
            keys.product_rounded(&q, rows, &zeros[..s], &mut scores);
            for ((sr, pr), iv) in scores
                .chunks_exact(s)
                .zip(p.chunks_exact_mut(sp))
                .zip(&mut inv)
                .take(rows)
            {
                let sum = exp_row_bf16(sr, keep, pr);
                *iv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
            }
            values.product_rounded(&p, rows, &zeros[..d], &mut o);
            for (t, (orow, &iv)) in o.chunks_exact_mut(d).zip(&inv).take(rows).enumerate() {
                for x in orow.iter_mut() {
                    *x *= iv;
                }
                let out = ctx_ptr;
                // SAFETY: row i0 + t of sequence bi, columns hd*d.. of ctx (row stride inner,
                // b * s rows, resized above) belong to this job only.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        orow.as_ptr(),
                        out.0.add((bi * s + i0 + t) * inner + hd * d),
                        d,
                    )
                };
            }
        }
    };
    if par && b * heads * s * s * d >= 1 << 20 {
        par_tasks(b * heads, job);
    } else {
        (0..b * heads).for_each(job);
    }
}

/// Softmax's numerators for one score row, rounded to bfloat16 into `out` (padding up to
/// `out.len()` zero): `exp(x - max)` over the kept keys (all, when `keep` is empty), 0 for
/// the dropped ones. Returns their sum (in f32, before rounding), by which the caller divides
/// the weighted values. The exponential is a short polynomial (relative error ~1e-6, far
/// below bf16's 4e-3). Needs [`bf16::available`].
fn exp_row_bf16(row: &[f32], keep: &[f32], out: &mut [u16]) -> f32 {
    assert!(out.len() >= row.len() && (keep.is_empty() || keep.len() >= row.len()));
    assert!(bf16::available(), "bf16 attention without AVX512-BF16");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has the features (asserted); lengths asserted above.
    unsafe {
        x86::exp_row_bf16(row, keep, out)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16 attention without AVX512-BF16")
}

/// Query rows per block of the tiled attention: a block's scores (`QB x keys`) are all that is
/// held at once, so memory grows with the input's length, not with its square, and one long
/// input splits into blocks that run on every core.
const QB: usize = 64;

/// Query rows per block for an input of `s` tokens: [`QB`], or more on long inputs, where each
/// block's products pack the head's keys and values again (`gemm` packs its operands per
/// call): 256 or 512 rows pack them a quarter or an eighth as often, for scores of up to
/// 512 x keys (4 MiB at 2048 keys). At 2048 tokens (BERT-base, int8, 2 threads) this took one
/// request from ~1.27 s to ~1.0-1.1 s.
fn query_block(s: usize) -> usize {
    match s {
        0..1024 => QB,
        1024..2048 => 4 * QB,
        _ => 8 * QB,
    }
}

/// Softmax over the first `vis` values of `row` (keys whose `keep` is 0 dropped, when `keep`
/// is not empty), zeros after them.
#[inline(always)]
fn softmax_prefix_g(row: &mut [f32], vis: usize, keep: &[f32]) {
    let (head, rest) = row.split_at_mut(vis);
    softmax_masked_g(head, if keep.is_empty() { keep } else { &keep[..vis] });
    rest.fill(0.0);
}
dispatch!(fn softmax_prefix_auto(row: &mut [f32], vis: usize, keep: &[f32]); via softmax_prefix_g);

/// [`softmax_prefix_g`]'s result, bit for bit: with AVX-512 one masked pass per 16 values (no
/// padded copy of the ragged end), else the dispatched loop. Attention calls it once per
/// score row, and encoder rows are short (MiniLM's are ~16 keys): the per-row overhead of the
/// plain loop was 7-8% of MiniLM's int8 run.
fn softmax_prefix(row: &mut [f32], vis: usize, keep: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        assert!(vis <= row.len() && (keep.is_empty() || keep.len() >= vis));
        // SAFETY: the CPU has AVX-512F; lengths checked above.
        unsafe { x86::softmax_prefix(row, vis, keep) };
        return;
    }
    softmax_prefix_auto(row, vis, keep)
}

/// Whether [`attend_short`] runs for `s` keys of `d` values: AVX-512F, at most 32 keys, `d`
/// a multiple of 16 up to 64 (MiniLM's 32, BERT's 64).
fn short_attention(s: usize, d: usize) -> bool {
    s <= 32 && d.is_multiple_of(16) && d <= 64 && softmax16_available()
}

/// `FERROFORMERS_NO_SHORT_ATTENTION=1`: short inputs take [`attend_block`] too.
fn short_attention_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| super::switch_on("FERROFORMERS_NO_SHORT_ATTENTION"))
}

/// One (sequence, head) of a short input, all in registers: the keys transposed once, each
/// query row's scores `scale * q . k_j` as one or two vectors of keys, softmax over them (keys
/// whose `keep` is 0 dropped), and the weighted values scaled by the sum's reciprocal. With
/// MiniLM's ~16-token sentences, `gemm`'s two calls per (sequence, head) and the softmax pass
/// between them took ~12% of a batch-32 int8 run. Same maths as [`attend_block`] in another
/// f32 order. Needs [`short_attention`]`(keys, d)`.
///
/// # Safety
/// As [`attend_block`]'s, with every row seeing all `keys` keys.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_short(
    q: (*const f32, usize),
    k: (*const f32, usize),
    v: (*const f32, usize),
    (rows, keys, d): (usize, usize, usize),
    scale: f32,
    keep: &[f32],
    out: (*mut f32, usize),
) {
    assert!(short_attention(keys, d) && (keep.is_empty() || keep.len() >= keys));
    if rows == 0 || keys == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the CPU has AVX-512F (short_attention); the caller's contract for the rest.
    unsafe {
        if keys <= 16 {
            x86::attend_short::<1>(q, k, v, (rows, keys, d), scale, keep, out)
        } else {
            x86::attend_short::<2>(q, k, v, (rows, keys, d), scale, keep, out)
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (q, k, v, scale, out);
}

/// Whether [`softmax_rows16`] has its AVX-512 kernel here (it has no other).
fn softmax16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// [`softmax_prefix`] (with `vis = keys`) on each of the up to 16 rows of `block` (`keys` <= 32
/// values each), bit for bit. Needs [`softmax16_available`].
fn softmax_rows16(block: &mut [f32], keys: usize, keep: &[f32]) {
    assert!(keys > 0 && keys <= 32 && block.len().is_multiple_of(keys) && block.len() <= 16 * keys);
    assert!(keep.is_empty() || keep.len() >= keys);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: softmax16_available() checked AVX-512F (the caller's contract); sizes above.
    unsafe {
        x86::softmax_rows16(block, keys, keep)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("softmax_rows16 without AVX-512")
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use crate::kernels::cpu::simd::x86::{lanes, transpose16};
    use std::arch::x86_64::*;

    /// `r[l]` = the sum of `a[l]`'s lanes, for 16 vectors at once (45 operations, against ~8
    /// per vector one at a time).
    #[inline(always)]
    unsafe fn hsum16(a: &[__m512; 16]) -> __m512 {
        // Pairs: per 128-bit lane, elements 0 and 2 sum a[2i]'s, 1 and 3 a[2i + 1]'s.
        let b: [__m512; 8] = std::array::from_fn(|i| {
            let (x, y) = (a[2 * i], a[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(x, y), _mm512_unpackhi_ps(x, y))
        });
        // Quads: per 128-bit lane, element e sums a[4i + e]'s four values there.
        let c: [__m512; 4] = std::array::from_fn(|i| {
            let (x, y) = (_mm512_castps_pd(b[2 * i]), _mm512_castps_pd(b[2 * i + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
            )
        });
        // Across the 128-bit lanes: c[i]'s four lanes summed into lane i.
        let e = |x: __m512, y: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
            )
        };
        let (e0, e1) = (e(c[0], c[1]), e(c[2], c[3]));
        e(e0, e1)
    }

    /// [`super::widen_f16`]'s AVX-512 copy.
    ///
    /// # Safety
    /// AVX-512F; `out.len() == src.len()`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn widen_f16(src: &[half::f16], out: &mut [f32]) {
        let n = src.len();
        debug_assert_eq!(out.len(), n);
        let (s, o) = (src.as_ptr() as *const u16, out.as_mut_ptr());
        let mut i = 0;
        unsafe {
            while i + 16 <= n {
                let h = _mm256_loadu_si256(s.add(i) as *const __m256i);
                _mm512_storeu_ps(o.add(i), _mm512_cvtph_ps(h));
                i += 16;
            }
        }
        for (x, h) in out[i..].iter_mut().zip(&src[i..]) {
            *x = h.to_f32();
        }
    }

    /// Cached keys and values as f32 (`heads` reads f32 and f16 caches alike).
    pub trait Wide: Copy {
        /// # Safety
        /// AVX-512F; 16 values readable at `p`.
        unsafe fn load16(p: *const Self) -> __m512;
    }

    impl Wide for f32 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const f32) -> __m512 {
            unsafe { _mm512_loadu_ps(p) }
        }
    }

    impl Wide for half::f16 {
        #[inline]
        #[target_feature(enable = "avx512f")]
        unsafe fn load16(p: *const half::f16) -> __m512 {
            unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i)) }
        }
    }

    /// [`super::attend_heads`] with AVX-512: `D` vectors of 16 per head (head size `16 * D`),
    /// keys and values f32 or f16 (widened as they are read: the same products).
    ///
    /// # Safety
    /// AVX-512F; `q` and `out` hold `g * 16 * D` values, `k` and `v` `keys * 16 * D`, `bias`
    /// `keys`, `scores` `g * keys`.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn heads<const D: usize, E: Wide>(
        q: &[f32],
        k: &[E],
        v: &[E],
        scale: f32,
        bias: &[f32],
        scores: &mut [f32],
        out: &mut [f32],
    ) {
        let hd = 16 * D;
        let (g, keys) = (q.len() / hd, bias.len());
        debug_assert!(k.len() >= keys * hd && v.len() >= keys * hd);
        debug_assert!(scores.len() >= g * keys && out.len() >= g * hd);
        let sc = _mm512_set1_ps(scale);
        let (kp, vp) = (k.as_ptr(), v.as_ptr());
        unsafe {
            for h in 0..g {
                let qv: [__m512; D] =
                    std::array::from_fn(|c| _mm512_loadu_ps(q.as_ptr().add(h * hd + 16 * c)));
                let dot = |j: usize| {
                    let kr = kp.add(j * hd);
                    let mut acc = _mm512_mul_ps(qv[0], E::load16(kr));
                    for (c, qc) in qv.iter().enumerate().skip(1) {
                        acc = _mm512_fmadd_ps(*qc, E::load16(kr.add(16 * c)), acc);
                    }
                    acc
                };
                let row = scores.as_mut_ptr().add(h * keys);
                // The first head's pass over the keys also asks for the values (read after the
                // softmax; a row's values are too few lines for the hardware prefetcher).
                let row_bytes = hd * std::mem::size_of::<E>();
                let fetch = |j0: usize, j1: usize| {
                    if h == 0 {
                        let base = vp.add(j0 * hd) as *const i8;
                        for off in (0..(j1 - j0) * row_bytes).step_by(64) {
                            _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(off));
                        }
                    }
                };
                let mut j = 0;
                while j + 16 <= keys {
                    fetch(j, j + 16);
                    let a: [__m512; 16] = std::array::from_fn(|l| dot(j + l));
                    let b = _mm512_loadu_ps(bias.as_ptr().add(j));
                    _mm512_storeu_ps(row.add(j), _mm512_fmadd_ps(hsum16(&a), sc, b));
                    j += 16;
                }
                fetch(j, keys);
                for (j, b) in bias.iter().enumerate().skip(j) {
                    *row.add(j) = _mm512_reduce_add_ps(dot(j)) * scale + b;
                }
                super::softmax_prefix(&mut scores[h * keys..(h + 1) * keys], keys, &[]);
            }
            // Probabilities times values, a few heads per pass over the values.
            let per = (16 / D).clamp(1, 4);
            for h0 in (0..g).step_by(per) {
                let hn = per.min(g - h0);
                let mut o = [[_mm512_setzero_ps(); D]; 4];
                for j in 0..keys {
                    let vr = vp.add(j * hd);
                    let vv: [__m512; D] = std::array::from_fn(|c| E::load16(vr.add(16 * c)));
                    for (hh, oh) in o.iter_mut().enumerate().take(hn) {
                        let p = _mm512_set1_ps(*scores.get_unchecked((h0 + hh) * keys + j));
                        for c in 0..D {
                            oh[c] = _mm512_fmadd_ps(p, vv[c], oh[c]);
                        }
                    }
                }
                for (hh, oh) in o.iter().enumerate().take(hn) {
                    for (c, oc) in oh.iter().enumerate() {
                        _mm512_storeu_ps(out.as_mut_ptr().add((h0 + hh) * hd + 16 * c), *oc);
                    }
                }
            }
        }
    }

    /// [`softmax_prefix`] with `vis = keys` on every row of `block` (up to 16 rows of `keys`
    /// values), with the rows across lanes: the maximum, exponentials and sum of every row at
    /// once, then back. The same operations per value as the row kernel, and the sum in the
    /// same order (per lane of 16 keys, then the lanes in order), so the same bits.
    ///
    /// # Safety
    /// AVX-512F; `keys <= 32`, `block.len()` a multiple of `keys` up to `16 * keys`, `keep`
    /// empty or at least `keys` long.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_rows16(block: &mut [f32], keys: usize, keep: &[f32]) {
        if keys <= 16 {
            unsafe { rows16::<1>(block, keys, keep) }
        } else {
            unsafe { rows16::<2>(block, keys, keep) }
        }
    }

    /// [`softmax_rows16`] for `keys <= 16 * H`.
    #[inline(always)]
    unsafe fn rows16<const H: usize>(block: &mut [f32], keys: usize, keep: &[f32]) {
        let rows = block.len() / keys;
        let p = block.as_mut_ptr();
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mask = |h: usize| lanes(keys.saturating_sub(16 * h));
        // r[h][j]: after the transpose, key 16 h + j of every row (lane = row).
        let mut r = [[_mm512_setzero_ps(); 16]; H];
        for (h, r) in r.iter_mut().enumerate() {
            for (i, r) in r.iter_mut().enumerate().take(rows) {
                *r = _mm512_mask_loadu_ps(ninf, mask(h), p.add(i * keys + 16 * h));
            }
            unsafe { transpose16(r) };
        }
        // Dropped keys count as -inf, as the row kernel makes them.
        for j in 0..keys.min(keep.len()) {
            if keep[j] == 0.0 {
                r[j / 16][j % 16] = ninf;
            }
        }
        let mut mx = ninf;
        for j in 0..keys {
            mx = _mm512_max_ps(mx, r[j / 16][j % 16]);
        }
        let mut lanes = [_mm512_setzero_ps(); 16];
        for j in 0..keys {
            let c = &mut r[j / 16][j % 16];
            let e = exp16(_mm512_sub_ps(*c, mx));
            let gone = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(*c, ninf);
            *c = _mm512_mask_mov_ps(e, gone, _mm512_setzero_ps());
            lanes[j % 16] = _mm512_add_ps(lanes[j % 16], *c);
        }
        let mut sum = _mm512_setzero_ps();
        for l in lanes {
            sum = _mm512_add_ps(sum, l);
        }
        let inv = _mm512_div_ps(_mm512_set1_ps(1.0), sum);
        for (h, r) in r.iter_mut().enumerate() {
            for c in r[..keys.saturating_sub(16 * h).min(16)].iter_mut() {
                *c = _mm512_mul_ps(*c, inv);
            }
            unsafe { transpose16(r) };
            for (i, r) in r.iter().enumerate().take(rows) {
                _mm512_mask_storeu_ps(p.add(i * keys + 16 * h), mask(h), *r);
            }
        }
    }

    /// [`super::exp_row_bf16`].
    ///
    /// # Safety
    /// AVX-512 F/BW/VL/BF16; `out` at least as long as `row`, `keep` empty or as long.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    pub unsafe fn exp_row_bf16(row: &[f32], keep: &[f32], out: &mut [u16]) -> f32 {
        let n = row.len();
        let p = row.as_ptr();
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        // Lanes in the row and kept.
        let kept = |i: usize| -> __mmask16 {
            let m = lanes(n - i);
            if keep.is_empty() {
                m
            } else {
                let k = unsafe { _mm512_maskz_loadu_ps(m, keep.as_ptr().add(i)) };
                _mm512_mask_cmp_ps_mask::<_CMP_NEQ_UQ>(m, k, _mm512_setzero_ps())
            }
        };
        let mut mx = ninf;
        for i in (0..n).step_by(16) {
            let v = unsafe { _mm512_mask_loadu_ps(ninf, kept(i), p.add(i)) };
            mx = _mm512_max_ps(mx, v);
        }
        let top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let set = _mm512_set1_ps;
        let mut acc = _mm512_setzero_ps();
        for i in (0..n).step_by(16) {
            let m = kept(i);
            let x = unsafe { _mm512_maskz_loadu_ps(m, p.add(i)) };
            // 2^t for t = (x - top) log2(e) <= 0: t = j + f, |f| <= 1/2, 2^f by a degree-5
            // polynomial, 2^j by scalef (0 below f32's range).
            let t = _mm512_mul_ps(_mm512_sub_ps(x, top), set(std::f32::consts::LOG2_E));
            let t = _mm512_max_ps(t, set(-150.0));
            let j = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
            let f = _mm512_sub_ps(t, j);
            let mut e = set(1.333_355_8e-3);
            for c in [9.618_129e-3, 5.550_411e-2, 2.402_265e-1, 6.931_472e-1, 1.0] {
                e = _mm512_fmadd_ps(e, f, set(c));
            }
            let e = _mm512_maskz_mov_ps(m, _mm512_scalef_ps(e, j));
            acc = _mm512_add_ps(acc, e);
            let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(e));
            unsafe {
                _mm256_mask_storeu_epi16(out.as_mut_ptr().add(i) as *mut i16, lanes(n - i), h)
            };
        }
        out[n..].fill(0);
        _mm512_reduce_add_ps(acc)
    }

    /// [`super::attend_short`] for up to `16 * H` keys.
    ///
    /// # Safety
    /// AVX-512F; as [`super::attend_short`]'s contract, `keys <= 16 * H`, `d` a multiple of
    /// 16 up to 64.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
    pub unsafe fn attend_short<const H: usize>(
        (q, qs): (*const f32, usize),
        (k, ks): (*const f32, usize),
        (v, vs): (*const f32, usize),
        (rows, keys, d): (usize, usize, usize),
        scale: f32,
        keep: &[f32],
        (out, os): (*mut f32, usize),
    ) {
        debug_assert!(keys <= 16 * H && d.is_multiple_of(16) && d <= 64);
        // The keys transposed: lane j of kt[t][h] is key 16 h + j's value t (entries t < d
        // written below before any read; no 8 KiB of zeros per call).
        use std::mem::MaybeUninit;
        // SAFETY: an array of MaybeUninit needs no initialisation.
        let mut kt: [[MaybeUninit<__m512>; H]; 64] = unsafe { MaybeUninit::uninit().assume_init() };
        for g in 0..d / 16 {
            for h in 0..H {
                let mut r = [_mm512_setzero_ps(); 16];
                for (j, r) in r.iter_mut().enumerate().take(keys.saturating_sub(16 * h)) {
                    *r = _mm512_loadu_ps(k.add((16 * h + j) * ks + 16 * g));
                }
                unsafe { transpose16(&mut r) };
                for (t, r) in r.iter().enumerate() {
                    kt[16 * g + t][h] = MaybeUninit::new(*r);
                }
            }
        }
        // Keys that exist and are kept.
        let mut valid = [0u16; H];
        for (h, m) in valid.iter_mut().enumerate() {
            *m = lanes(keys.saturating_sub(16 * h));
        }
        for j in 0..keys.min(keep.len()) {
            if keep[j] == 0.0 {
                valid[j / 16] &= !(1u16 << (j % 16));
            }
        }
        // Four query rows at a time: each of the keys' vectors feeds eight independent sums
        // (one row's sums alone waited on the multiply-adds' latency).
        let c = Short {
            kt: &kt,
            valid,
            v: (v, vs),
            keys,
            d,
            scale,
        };
        let mut i = 0;
        while i < rows {
            let (q, out) = ((q.add(i * qs), qs), (out.add(i * os), os));
            if rows - i >= 4 {
                short_rows::<H, 4>(&c, q, out);
                i += 4;
            } else {
                short_rows::<H, 1>(&c, q, out);
                i += 1;
            }
        }
    }

    /// What every block of query rows of one [`attend_short`] call shares.
    struct Short<'a, const H: usize> {
        /// The keys transposed (entries `t < d` written).
        kt: &'a [[std::mem::MaybeUninit<__m512>; H]; 64],
        /// Per vector of keys: those that exist and are kept.
        valid: [u16; H],
        v: (*const f32, usize),
        keys: usize,
        d: usize,
        scale: f32,
    }

    /// `R` query rows of [`attend_short`] against the transposed keys `kt`.
    #[inline(always)]
    #[allow(clippy::needless_range_loop)]
    unsafe fn short_rows<const H: usize, const R: usize>(
        c: &Short<'_, H>,
        (q, qs): (*const f32, usize),
        (out, os): (*mut f32, usize),
    ) {
        let Short {
            kt,
            valid,
            v: (v, vs),
            keys,
            d,
            scale,
        } = *c;
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mut acc = [[[_mm512_setzero_ps(); H]; 2]; R];
        for t in (0..d).step_by(2) {
            for u in 0..2 {
                for (r, acc) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*q.add(r * qs + t + u));
                    for h in 0..H {
                        // Written for every t < d (attend_short).
                        let k = unsafe { kt[t + u][h].assume_init() };
                        acc[u][h] = _mm512_fmadd_ps(x, k, acc[u][h]);
                    }
                }
            }
        }
        let mut e = [[_mm512_setzero_ps(); H]; R];
        let mut inv = [_mm512_setzero_ps(); R];
        for r in 0..R {
            let mut sc = [ninf; H];
            let mut mx = ninf;
            for h in 0..H {
                let s = _mm512_mul_ps(
                    _mm512_add_ps(acc[r][0][h], acc[r][1][h]),
                    _mm512_set1_ps(scale),
                );
                sc[h] = _mm512_mask_mov_ps(ninf, valid[h], s);
                mx = _mm512_max_ps(mx, sc[h]);
            }
            let mx = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
            let mut sum = _mm512_setzero_ps();
            for h in 0..H {
                e[r][h] = _mm512_maskz_mov_ps(valid[h], exp16(_mm512_sub_ps(sc[h], mx)));
                sum = _mm512_add_ps(sum, e[r][h]);
            }
            inv[r] = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
        }
        // Each key's weight spread from its lane (a permute, not a reload through memory),
        // times its values.
        let mut o = [[_mm512_setzero_ps(); 4]; R];
        for j in 0..keys {
            let lane = _mm512_set1_epi32((j % 16) as i32);
            let w: [__m512; R] = std::array::from_fn(|r| _mm512_permutexvar_ps(lane, e[r][j / 16]));
            for g in 0..d / 16 {
                let vj = _mm512_loadu_ps(v.add(j * vs + 16 * g));
                for r in 0..R {
                    o[r][g] = _mm512_fmadd_ps(w[r], vj, o[r][g]);
                }
            }
        }
        for r in 0..R {
            for g in 0..d / 16 {
                _mm512_storeu_ps(out.add(r * os + 16 * g), _mm512_mul_ps(o[r][g], inv[r]));
            }
        }
    }

    /// [`super::super::rowops::fast_exp`], 16 lanes: the same operations in the same order
    /// (no fused multiply-adds), so the same bits.
    #[inline(always)]
    unsafe fn exp16(x: __m512) -> __m512 {
        let set = _mm512_set1_ps;
        let x = _mm512_min_ps(_mm512_max_ps(x, set(-87.0)), set(88.0));
        let t = _mm512_mul_ps(x, set(std::f32::consts::LOG2_E));
        let z = _mm512_add_ps(t, set(12_582_912.0));
        let n = _mm512_sub_ps(z, set(12_582_912.0));
        let ni = _mm512_sub_epi32(_mm512_castps_si512(z), _mm512_set1_epi32(0x4B40_0000));
        let r = _mm512_sub_ps(
            _mm512_sub_ps(x, _mm512_mul_ps(n, set(0.693_359_4))),
            _mm512_mul_ps(n, set(-2.121_944_4e-4)),
        );
        let mut p = set(1.987_569_1e-4);
        for c in [
            1.398_199_9e-3,
            8.333_452e-3,
            4.166_579_6e-2,
            1.666_666_5e-1,
            0.5,
        ] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), set(c));
        }
        let e = _mm512_add_ps(
            _mm512_add_ps(_mm512_mul_ps(_mm512_mul_ps(p, r), r), r),
            set(1.0),
        );
        let two_n = _mm512_slli_epi32::<23>(_mm512_add_epi32(ni, _mm512_set1_epi32(127)));
        _mm512_mul_ps(e, _mm512_castsi512_ps(two_n))
    }

    /// Softmax over `row[..vis]` (values whose `keep` is 0 dropped, when `keep` is not
    /// empty), zeros after: [`super::softmax_prefix_g`]'s arithmetic (per-lane sums over the
    /// same 16-value chunks, added up in lane order).
    ///
    /// # Safety
    /// AVX-512F; `vis <= row.len()`, `keep` empty or at least `vis` long.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_prefix(row: &mut [f32], vis: usize, keep: &[f32]) {
        let p = row.as_mut_ptr();
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        let mask = |i: usize| lanes(vis - i);
        let mut mx = ninf;
        for i in (0..vis).step_by(16) {
            let m = mask(i);
            let mut v = _mm512_mask_loadu_ps(ninf, m, p.add(i));
            if !keep.is_empty() {
                let k = _mm512_maskz_loadu_ps(m, keep.as_ptr().add(i));
                let dropped = _mm512_mask_cmp_ps_mask::<_CMP_EQ_OQ>(m, k, _mm512_setzero_ps());
                v = _mm512_mask_mov_ps(v, dropped, ninf);
                _mm512_mask_storeu_ps(p.add(i), m, v);
            }
            mx = _mm512_max_ps(mx, v);
        }
        let top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        let mut acc = _mm512_setzero_ps();
        for i in (0..vis).step_by(16) {
            let m = mask(i);
            let v = _mm512_mask_loadu_ps(ninf, m, p.add(i));
            let e = exp16(_mm512_sub_ps(v, top));
            let gone = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(v, ninf);
            let e = _mm512_mask_mov_ps(e, gone, _mm512_setzero_ps());
            _mm512_mask_storeu_ps(p.add(i), m, e);
            acc = _mm512_add_ps(acc, e);
        }
        let mut lanes = [0f32; 16];
        _mm512_storeu_ps(lanes.as_mut_ptr(), acc);
        let mut sum = 0f32;
        for l in lanes {
            sum += l;
        }
        let inv = _mm512_set1_ps(1.0 / sum);
        for i in (0..vis).step_by(16) {
            let m = mask(i);
            let v = _mm512_maskz_loadu_ps(m, p.add(i));
            _mm512_mask_storeu_ps(p.add(i), m, _mm512_mul_ps(v, inv));
        }
        row[vis..].fill(0.0);
    }
}

/// One head's attention for a block of `rows` query rows over `keys` keys, through two `gemm`
/// products with the block's scores in between: `scale * q . k_j` plus `bias(i)` (when not
/// empty), only the first `visible(i)` keys for row `i` (causal masks: the block's products
/// stop at its last row's keys), keys whose `keep` is 0 dropped, softmax, weighted values.
/// Row `i` of q is at `q + i * qs`, key `j` at `k + j * ks` and `v + j * vs`, row `i` of the
/// output at `out + i * os` (`d` values each).
///
/// # Safety
/// The pointers must be valid for those rows (reads) and output rows (writes), and no one
/// else may write the output rows meanwhile.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_block<'b>(
    (q, qs): (*const f32, usize),
    (k, ks): (*const f32, usize),
    (v, vs): (*const f32, usize),
    (rows, keys, d): (usize, usize, usize),
    scale: f32,
    visible: impl Fn(usize) -> usize,
    bias: impl Fn(usize) -> &'b [f32],
    keep: &[f32],
    (out, os): (*mut f32, usize),
    scores: &mut Vec<f32>,
) {
    let kmax = (0..rows).map(&visible).max().unwrap_or(0).min(keys);
    if rows == 0 || kmax == 0 {
        return;
    }
    scores.clear();
    scores.resize(rows * kmax, 0.0);
    // SAFETY: the caller vouches for q (rows x d), k (kmax x d, read as its transpose) and v
    // (kmax x d); scores is rows x kmax.
    unsafe {
        gemm::gemm(
            rows,
            kmax,
            d,
            scores.as_mut_ptr(),
            1,
            kmax as isize,
            false,
            q,
            1,
            qs as isize,
            k,
            ks as isize,
            1,
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
    // Short inputs (every row sees all of at most 32 keys): sixteen rows at a time with the
    // keys across registers, the same bits as row by row. Row by row, each ~16-value row
    // waited on its own reductions: ~185 cycles per row, 6% of MiniLM's int8 run.
    let short = kmax <= 32 && (0..rows).all(|i| visible(i) >= kmax) && softmax16_available();
    for (i, row) in scores.chunks_exact_mut(kmax).enumerate() {
        let vis = visible(i).min(kmax);
        let b = bias(i);
        if !b.is_empty() {
            for (sc, &bv) in row[..vis].iter_mut().zip(b) {
                *sc += bv;
            }
        }
        if !short {
            softmax_prefix(row, vis, keep);
        }
    }
    if short {
        for block in scores.chunks_mut(16 * kmax) {
            softmax_rows16(block, kmax, keep);
        }
    }
    // SAFETY: as above; out is rows x d with row stride os.
    unsafe {
        gemm::gemm(
            rows,
            d,
            kmax,
            out,
            1,
            os as isize,
            false,
            scores.as_ptr(),
            1,
            kmax as isize,
            v,
            1,
            vs as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// One query row over `k`, `v` (`[keys, d]`, `keys = scores.len()`): scores `scale * q . k_j`
/// plus `bias` (when not empty), keys whose `keep` is 0 dropped (when not empty), softmax, and
/// `out = sum_j p_j v_j`. Additive masks of `f32::MIN` (as HF's) come out as exactly 0 too.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn attend_one_g(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    scale: f32,
    bias: &[f32],
    keep: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let dk = q.len();
    for (j, sc) in scores.iter_mut().enumerate() {
        *sc = dot16(q, &k[j * dk..(j + 1) * dk]) * scale;
    }
    if !bias.is_empty() {
        for (sc, &b) in scores.iter_mut().zip(bias) {
            *sc += b;
        }
    }
    softmax_masked_g(scores, keep);
    out.fill(0.0);
    for (j, &p) in scores.iter().enumerate() {
        for (o, &vv) in out.iter_mut().zip(&v[j * dk..(j + 1) * dk]) {
            *o += p * vv;
        }
    }
}
dispatch!(pub fn attend_one(q: &[f32], k: &[f32], v: &[f32], scale: f32, bias: &[f32], keep: &[f32], scores: &mut [f32], out: &mut [f32]); via attend_one_g);

/// Decoding attention of the `q.len() / hd` query heads that share one kv head (`k`, `v`:
/// `keys x hd`, keys in order), each a softmax of `scale * q . k + bias` over the keys, times
/// the values, into `out` (the heads side by side). `scores` holds `heads * keys` values. With
/// AVX-512 and `hd` 16, 32, 64 or 128, each key and value is read once for all the heads and
/// 16 keys' scores are summed across lanes together; otherwise [`attend_one`] per head.
pub fn attend_heads(
    q: &[f32],
    (k, v): (&[f32], &[f32]),
    hd: usize,
    scale: f32,
    bias: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) {
    if grouped_heads(q, (k, v), hd, scale, bias, scores, out) {
        return;
    }
    let (g, keys) = (q.len() / hd, bias.len());
    for h in 0..g {
        attend_one(
            &q[h * hd..(h + 1) * hd],
            &k[..keys * hd],
            &v[..keys * hd],
            scale,
            bias,
            &[],
            &mut scores[..keys],
            &mut out[h * hd..(h + 1) * hd],
        );
    }
}

/// [`attend_heads`]'s AVX-512 kernel, over f32 or f16 keys and values; `false` (nothing
/// done) where it does not apply (no AVX-512, a head size other than 16, 32, 64 or 128,
/// `FERROFORMERS_NO_GROUPED_ATTENTION=1`).
#[allow(unused_variables)]
fn grouped_heads<E: WideKv>(
    q: &[f32],
    (k, v): (&[E], &[E]),
    hd: usize,
    scale: f32,
    bias: &[f32],
    scores: &mut [f32],
    out: &mut [f32],
) -> bool {
    let (g, keys) = (q.len() / hd, bias.len());
    assert!(q.len() == g * hd && out.len() == g * hd && scores.len() >= g * keys);
    assert!(k.len() >= keys * hd && v.len() >= keys * hd);
    #[cfg(target_arch = "x86_64")]
    {
        static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        if softmax16_available() && !super::switch_once(&OFF, "FERROFORMERS_NO_GROUPED_ATTENTION") {
            // SAFETY: the CPU has AVX-512F; sizes checked above.
            unsafe {
                match hd {
                    16 => x86::heads::<1, E>(q, k, v, scale, bias, scores, out),
                    32 => x86::heads::<2, E>(q, k, v, scale, bias, scores, out),
                    64 => x86::heads::<4, E>(q, k, v, scale, bias, scores, out),
                    128 => x86::heads::<8, E>(q, k, v, scale, bias, scores, out),
                    _ => return false,
                }
            }
            return true;
        }
    }
    false
}

/// Key and value types of a KV cache ([`grouped_heads`] reads both).
#[cfg(target_arch = "x86_64")]
trait WideKv: x86::Wide {}
#[cfg(target_arch = "x86_64")]
impl<E: x86::Wide> WideKv for E {}
#[cfg(not(target_arch = "x86_64"))]
trait WideKv: Copy {}
#[cfg(not(target_arch = "x86_64"))]
impl<E: Copy> WideKv for E {}

/// Causal self-attention of `n` query rows over the keys cached in `kv` (decoder prompts and
/// steps): row `t` of `qkv` (row stride `width`, the `nh` query heads of `hd` values first) is
/// position `past + t % s` of batch row `t / s`; it sees the keys up to its own position, of kv
/// head `head / group`, with `bias[t * total..]` added (padding masks). Returns `[n, nh * hd]`.
/// Prompts (more than 4 rows per batch row) run in blocks of query rows through `gemm`, the
/// blocks spread over the threads, latest first; decoding steps run [`attend_one`] per row.
///
/// `invariant` (batch invariance): every row, prompts' included, takes the decoding steps'
/// grouped kernel from its first unmasked key, so its result is the same bits whatever the
/// pass: one row or many, any chunk of a prompt, any left padding (the keys sit in the same
/// lanes as when the sequence runs alone). Prompts then cost more: each row reads its keys
/// itself instead of `gemm` tiles sharing them.
pub fn attend_causal(
    qkv: &[f32],
    (width, n, s, past): (usize, usize, usize, usize),
    (nh, group, hd): (usize, usize, usize),
    kv: &KvBuffer,
    (bias, total): (&[f32], usize),
    scale: f32,
    invariant: bool,
) -> Vec<f32> {
    let q_w = nh * hd;
    assert!(qkv.len() >= n * width && width >= q_w && bias.len() >= n * total);
    assert!(n == 0 || past + (n - 1) % s < total);
    let mut ctx = vec![0f32; n * q_w];
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let work = n * nh * total * hd;
    // Decoding steps of a batch split across the threads from much less work than prompts:
    // the pool's workers wait spinning, so a split costs microseconds (16 SmolLM2 rows at 100
    // positions, ~0.9M products per layer, ran on one core: 12% of a step, the other idle).
    let par = work >= if s > 4 { 1 << 20 } else { 1 << 16 } && !in_worker();
    if s > 4 && !invariant {
        // Prompts: blocks of query rows per (batch row, head), the latest (longest) first.
        let b = n / s;
        let blocks = s.div_ceil(QB);
        let jobs = b * nh * blocks;
        // An f16 cache's keys and values, widened to f32 once per (row, kv head) for all the
        // jobs that read them (each job widening its own copy cost `group x blocks` times as
        // much: for a 2000-token prompt ~1G conversions and 4 GB of writes).
        let nkv = nh / group;
        let widened: Vec<(Vec<f32>, Vec<f32>)> = if kv.is_f16() {
            (0..b * nkv)
                .map(|i| {
                    let mut w = (Vec::new(), Vec::new());
                    let _ = kv.get_f32(i / nkv, i % nkv, past + s, &mut w);
                    w
                })
                .collect()
        } else {
            Vec::new()
        };
        let job = |item: usize| {
            let out = ctx_ptr;
            let item = jobs - 1 - item;
            let (blk, rest) = (item / (b * nh), item % (b * nh));
            let (r, head) = (rest / nh, rest % nh);
            let (i0, i1) = (blk * QB, ((blk + 1) * QB).min(s));
            let t0 = r * s + i0;
            let keys = past + i1;
            // Keys before `pad` are unstored padding (masked; `pad <= past`): the block
            // attends from there.
            let pad = kv.pad(r, head / group).min(past);
            let (ks, vs) = match widened.get(r * nkv + head / group) {
                Some((k, v)) => (&k[..(keys - pad) * hd], &v[..(keys - pad) * hd]),
                None => kv.get(r, head / group, keys),
            };
            let mut scores = Vec::new();
            // SAFETY: query rows t0..t0 + (i1 - i0) of qkv (row stride width), the head's
            // keys and values (contiguous, hd each), and rows t0.. of ctx, columns head*hd..
            // (row stride q_w: this job's only).
            unsafe {
                attend_block(
                    (qkv.as_ptr().add(t0 * width + head * hd), width),
                    (ks.as_ptr(), hd),
                    (vs.as_ptr(), hd),
                    (i1 - i0, keys - pad, hd),
                    scale,
                    |i| past + i0 + i + 1 - pad,
                    |i| &bias[(t0 + i) * total + pad..(t0 + i) * total + past + i0 + i + 1],
                    &[],
                    (out.0.add(t0 * q_w + head * hd), q_w),
                    &mut scores,
                );
            }
        };
        if par {
            crate::kernels::cpu::threads::par_ranges(jobs, |items| items.for_each(job));
        } else {
            (0..jobs).for_each(job);
        }
        return ctx;
    }
    // Decoding steps: one row at a time over the cache.
    let rows = |items: std::ops::Range<usize>| {
        let out = ctx_ptr;
        let mut scores = vec![0f32; group * total];
        let mut wide = (Vec::new(), Vec::new());
        for t in items {
            let (r, i) = (t / s, t % s);
            // Keys after this query's position are masked: skip them; and the row's left
            // padding, in whole blocks of [`SKIP_BLOCK`] keys (the kernels' lanes see the
            // same keys in the same order, and a masked key only ever adds an exact 0: the
            // same bits). A row joined to a batch whose cache is much longer than its own
            // (a long prompt among chats) no longer reads all of that padding every step.
            let keys = past + i + 1;
            let lead = masked_lead(&bias[t * total..t * total + keys], invariant);
            let brow = &bias[t * total + lead..t * total + keys];
            // The cache's rows start at their unstored padding (all masked, whole blocks:
            // within `lead`); `at` is where `lead` falls in what is stored.
            let at = |head: usize| {
                debug_assert!(kv.pad(r, head) <= lead, "unstored padding is masked");
                lead - kv.pad(r, head).min(lead)
            };
            // SAFETY: row t of ctx belongs to this item only.
            let crow = unsafe { std::slice::from_raw_parts_mut(out.0.add(t * q_w), q_w) };
            if n == 1 && !kv.is_f16() && !invariant {
                // One row alone (single-stream decoding): one head at a time, whose f32 order
                // the int8 mode's greedy agreement with llama.cpp was measured with (an f16
                // cache, the int8 mode's now, goes through the grouped kernel below, which
                // reads f16 without widening it first).
                for head in 0..nh {
                    let (ks, vs) = kv.get(r, head / group, keys);
                    let o = at(head / group) * hd;
                    attend_one(
                        &qkv[t * width + head * hd..t * width + (head + 1) * hd],
                        &ks[o..],
                        &vs[o..],
                        scale,
                        brow,
                        &[],
                        &mut scores[..keys - lead],
                        &mut crow[head * hd..(head + 1) * hd],
                    );
                }
                continue;
            }
            // Batched steps: the query heads of one kv head together (grouped-query attention).
            for kvh in 0..nh / group {
                let (h0, h1) = (kvh * group * hd, (kvh + 1) * group * hd);
                let q = &qkv[t * width + h0..t * width + h1];
                // f16 keys and values widened as the kernel reads them, else into f32 first.
                if kv.is_f16()
                    && grouped_heads(
                        q,
                        {
                            let (ks, vs) = kv.get_f16(r, kvh, keys);
                            (&ks[at(kvh) * hd..], &vs[at(kvh) * hd..])
                        },
                        hd,
                        scale,
                        brow,
                        &mut scores,
                        &mut crow[h0..h1],
                    )
                {
                    continue;
                }
                let (ks, vs) = kv.get_f32(r, kvh, keys, &mut wide);
                let o = at(kvh) * hd;
                attend_heads(
                    q,
                    (&ks[o..], &vs[o..]),
                    hd,
                    scale,
                    brow,
                    &mut scores,
                    &mut crow[h0..h1],
                );
            }
        }
    };
    if par {
        crate::kernels::cpu::threads::par_ranges(n, rows);
    } else {
        rows(0..n);
    }
    ctx
}

/// Leading keys of a decoding row that attention may skip: its masked ones (left padding,
/// `f32::MIN` in `bias`), in whole blocks of [`SKIP_BLOCK`], or all of them when `exact` (batch
/// invariance: the first unmasked key then sits in lane 0, as when the row has no padding).
fn masked_lead(bias: &[f32], exact: bool) -> usize {
    let n = bias.iter().take_while(|&&b| b == f32::MIN).count();
    // Its own position is never masked, so at least one key stays.
    let n = n.min(bias.len().saturating_sub(1));
    if exact {
        return n;
    }
    (n / SKIP_BLOCK) * SKIP_BLOCK
}

/// Masked keys are skipped in blocks of this many, a multiple of every attention kernel's
/// lane and unroll width, so the keys that remain sit in the same lanes as before.
const SKIP_BLOCK: usize = 64;

/// Softmax attention of a few query rows (decoding steps, beams): `q` `[b, h, s, d]` over `k`,
/// `v` `[b, kv_h, t, d]` (grouped-query when `kv_h < h`: query head `hh` reads kv head
/// `hh / (h / kv_h)`), scores `scale * q . k` plus the additive `bias` `[b, s, t]`. Plain loops
/// over the cached keys; returns `[b, s, h * d]`.
pub fn attend_few_queries(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    bias: &[f32],
    (b, h, s, d): (usize, usize, usize, usize),
    (kv_h, t): (usize, usize),
    scale: f32,
) -> Vec<f32> {
    let n_rep = h / kv_h;
    let mut out = vec![0f32; b * s * h * d];
    let mut scores = vec![0f32; t];
    for bi in 0..b {
        for hh in 0..h {
            let kh = hh / n_rep;
            let kbase = (bi * kv_h + kh) * t * d;
            for i in 0..s {
                let qrow = &q[((bi * h + hh) * s + i) * d..][..d];
                let brow = &bias[(bi * s + i) * t..][..t];
                for (j, sc) in scores.iter_mut().enumerate() {
                    *sc = dot16(qrow, &k[kbase + j * d..][..d]) * scale + brow[j];
                }
                let m = max16(&scores);
                for sc in scores.iter_mut() {
                    *sc = fast_exp(*sc - m);
                }
                let inv = 1.0 / sum16(&scores);
                let orow = &mut out[((bi * s + i) * h + hh) * d..][..d];
                for (j, &p) in scores.iter().enumerate() {
                    let p = p * inv;
                    for (o, &x) in orow.iter_mut().zip(&v[kbase + j * d..][..d]) {
                        *o += p * x;
                    }
                }
            }
        }
    }
    out
}

/// `RMSNorm` of one row as HF's Llama and T5 compute it: `w * (x / sqrt(mean(x^2) + eps))`.
#[inline(always)]
fn rms_norm_g(row: &mut [f32], w: &[f32], eps: f32) {
    let ss = dot16(row, row);
    let inv = 1.0 / (ss / row.len() as f32 + eps).sqrt();
    for (v, &g) in row.iter_mut().zip(w) {
        *v = g * (*v * inv);
    }
}
dispatch!(pub fn rms_norm(row: &mut [f32], w: &[f32], eps: f32); via rms_norm_g);

/// `rms_norm` of every `w.len()`-wide row of `x`, as a new buffer.
pub fn rms_norm_rows(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let mut out = x.to_vec();
    for row in out.chunks_exact_mut(w.len()) {
        rms_norm(row, w, eps);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::KvBuffer;

    /// Softmax's numerators in bf16 against f64's `exp(x - max)` on odd lengths, with and
    /// without dropped keys: each within bf16's rounding, dropped keys and the padding 0, the
    /// sum within 1e-6 of f64's.
    #[test]
    fn exp_row_bf16_matches_f64() {
        use super::exp_row_bf16;
        use crate::kernels::cpu::{bf16, test_values};
        if !bf16::available() {
            return;
        }
        for n in [1usize, 5, 16, 17, 40, 129] {
            let x = test_values(n, n as u64, 30.0);
            let some: Vec<f32> = (0..n).map(|i| (i % 3 != 1) as u8 as f32).collect();
            for keep in [&[][..], &some[..]] {
                let kept = |i: usize| keep.is_empty() || keep[i] != 0.0;
                let mut out = vec![0xffffu16; n + 3];
                let sum = exp_row_bf16(&x, keep, &mut out);
                let top = (0..n)
                    .filter(|&i| kept(i))
                    .map(|i| x[i] as f64)
                    .fold(f64::MIN, f64::max);
                let mut want_sum = 0f64;
                for i in 0..n {
                    let got = bf16::from_bf16(out[i]) as f64;
                    if !kept(i) {
                        assert_eq!(out[i], 0, "n={n} [{i}] dropped");
                        continue;
                    }
                    let e = (x[i] as f64 - top).exp();
                    want_sum += e;
                    assert!(
                        (got - e).abs() <= e * (1.0 / 256.0) + 1e-30,
                        "n={n} [{i}]: {got} vs {e}"
                    );
                }
                assert!(out[n..].iter().all(|&h| h == 0), "n={n}: padding");
                assert!(
                    (sum as f64 - want_sum).abs() <= 1e-6 * want_sum,
                    "n={n}: {sum} vs {want_sum}"
                );
            }
        }
    }

    /// The bf16 attention against the f32 one: every output within bf16's rounding of the
    /// values' scale, dropped keys (a padded second sequence) and every length class (short
    /// rows kernel, ragged blocks, several query blocks).
    #[test]
    fn bf16_attention_is_close_to_f32() {
        use super::{attend_sequences, attend_sequences_bf16_into};
        use crate::kernels::cpu::{bf16, test_values};
        if !bf16::available() {
            return;
        }
        for (s, heads, d) in [
            (1, 2, 16),
            (13, 3, 32),
            (32, 2, 64),
            (37, 2, 64),
            (150, 2, 64),
        ] {
            let b = 2;
            let qkv = test_values(b * s * 3 * heads * d, s as u64, 4.0);
            let mut keep = vec![1f32; b * s];
            for k in keep[s + s.div_ceil(2)..].iter_mut() {
                *k = 0.0;
            }
            let scale = 1.0 / (d as f32).sqrt();
            let want = attend_sequences(&qkv, b, s, heads, d, scale, None, &keep, false);
            for par in [false, true] {
                let mut got = vec![f32::NAN; 3];
                attend_sequences_bf16_into(&qkv, b, s, heads, d, scale, &keep, par, &mut got);
                assert_eq!(got.len(), want.len());
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(g, w)| (g - w).abs())
                    .fold(0f32, f32::max);
                // Values lie in [-2, 2]: bf16 keeps 8 bits, and the scores' rounding moves
                // the probabilities by a few parts in a thousand.
                assert!(
                    worst > 0.0 && worst < 0.02,
                    "s={s} heads={heads} d={d} par={par}: {worst}"
                );
            }
        }
    }

    /// Sixteen rows at a time give the row kernel's bits: every key count up to 32, partial
    /// blocks, dropped keys (some, and all), large and tiny values.
    #[test]
    fn softmax_rows16_matches_softmax_prefix() {
        if !super::softmax16_available() {
            return;
        }
        for keys in 1..=32 {
            for rows in [1, 5, 15, 16] {
                for mask in 0..4 {
                    let keep: Vec<f32> = match mask {
                        0 => vec![],
                        1 => (0..keys).map(|j| (j % 3 != 1) as u8 as f32).collect(),
                        2 => vec![0.0; keys],
                        _ => (0..keys).map(|j| (j + 1 != keys) as u8 as f32).collect(),
                    };
                    let scale = [1.0, 40.0, 1e-3, 300.0][mask];
                    let seed = (keys * 64 + rows * 4 + mask) as u64;
                    let x = crate::kernels::cpu::test_values(rows * keys, seed, scale);
                    let mut want = x.clone();
                    for row in want.chunks_exact_mut(keys) {
                        super::softmax_prefix(row, keys, &keep);
                    }
                    let mut got = x.clone();
                    super::softmax_rows16(&mut got, keys, &keep);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "keys {keys} rows {rows} mask {mask}"
                    );
                }
            }
        }
    }

    /// Selected rows hold the rows they name: swaps, cycles, a row copied over others (beams
    /// that die), rows kept, and a change in the number of rows.
    #[test]
    fn selected_rows_hold_the_rows_they_name() {
        let (rows, heads, dim, len) = (5, 3, 4, 7);
        let mut base = KvBuffer::new(rows, heads, dim);
        base.reserve(len);
        for r in 0..rows {
            for h in 0..heads {
                for p in 0..len {
                    let k: Vec<f32> = (0..dim)
                        .map(|i| (r * 1000 + h * 100 + p * 10 + i) as f32)
                        .collect();
                    let v: Vec<f32> = k.iter().map(|x| -x).collect();
                    base.put(r, h, p, &k, &v);
                }
            }
        }
        base.set_len(len);
        for order in [
            vec![0, 1, 2, 3, 4],
            vec![1, 0, 2, 3, 4],
            vec![1, 2, 3, 4, 0],
            vec![2, 2, 2, 0, 4],
            vec![4, 3, 3, 1, 1],
            vec![3, 1],
        ] {
            let mut got = base.clone();
            got.select_rows(&order).unwrap();
            assert_eq!(got.rows(), order.len());
            for (r, &from) in order.iter().enumerate() {
                for h in 0..heads {
                    assert_eq!(
                        got.get(r, h, len),
                        base.get(from, h, len),
                        "{order:?} row {r}"
                    );
                }
            }
        }
        assert!(base.clone().select_rows(&[0, 1, 2, 3, 5]).is_err());
    }

    /// The AVX-512 softmax gives the dispatched loop's bits: row lengths around 16 and 32,
    /// prefixes of every length, with and without dropped keys.
    #[test]
    fn softmax_prefix_matches_the_plain_loop() {
        for len in [1usize, 5, 15, 16, 17, 31, 33, 64] {
            let vals = crate::kernels::cpu::test_values(len, len as u64, 12.0);
            let keep: Vec<f32> = (0..len).map(|i| (i % 3 != 1) as u8 as f32).collect();
            for vis in 1..=len {
                for kp in [&[][..], &keep[..]] {
                    if !kp.is_empty() && kp[..vis].iter().all(|&k| k == 0.0) {
                        continue;
                    }
                    let mut fast = vals.clone();
                    softmax_prefix(&mut fast, vis, kp);
                    let mut plain = vals.clone();
                    softmax_prefix_g(&mut plain, vis, kp);
                    for (j, (a, b)) in fast.iter().zip(&plain).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "len {len} vis {vis} [{j}]");
                    }
                }
            }
        }
    }
    use super::*;

    #[test]
    fn buffer_grows_and_reorders_rows() {
        let mut b = KvBuffer::new(2, 1, 2);
        for pos in 0..20 {
            b.reserve(1);
            for row in 0..2 {
                let x = (row * 100 + pos) as f32;
                b.put(row, 0, pos, &[x, x], &[-x, -x]);
            }
            b.set_len(pos + 1);
        }
        b.select_rows(&[1, 1, 0]).unwrap();
        assert_eq!(b.rows(), 3);
        let (k, v) = b.get(1, 0, 20);
        assert_eq!(k[38], 119.0);
        assert_eq!(v[0], -100.0);
        let (k, _) = b.get(2, 0, 3);
        assert_eq!(k, [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
        assert!(b.select_rows(&[3]).is_err());
    }

    /// The short-input kernel against the general one: 1 to 32 keys, head sizes 16 to 64,
    /// dropped keys, query blocks that start past row 0.
    #[test]
    fn short_attention_matches_attend_block() {
        for (keys, d) in [
            (1usize, 32usize),
            (5, 16),
            (16, 32),
            (17, 64),
            (32, 48),
            (23, 32),
        ] {
            if !short_attention(keys, d) {
                eprintln!("no AVX-512F: nothing to compare");
                return;
            }
            let stride = 3 * d + 5;
            let qkv = crate::kernels::cpu::test_values(keys * stride, keys as u64 + d as u64, 2.0);
            let mut keep = vec![1f32; keys];
            if keys > 3 {
                keep[2] = 0.0;
                keep[keys - 1] = 0.0;
            }
            for keep in [&[][..], &keep[..]] {
                let rows = keys.min(7);
                let i0 = keys - rows;
                let run = |short: bool| {
                    let mut out = vec![f32::NAN; rows * d];
                    let mut scores = Vec::new();
                    let (q, k, v) = (
                        qkv[i0 * stride..].as_ptr(),
                        qkv[d..].as_ptr(),
                        qkv[2 * d + 1..].as_ptr(),
                    );
                    // SAFETY: every row of q (from i0), k and v lies in qkv; out is rows x d.
                    unsafe {
                        if short {
                            attend_short(
                                (q, stride),
                                (k, stride),
                                (v, stride),
                                (rows, keys, d),
                                0.3,
                                keep,
                                (out.as_mut_ptr(), d),
                            );
                        } else {
                            attend_block(
                                (q, stride),
                                (k, stride),
                                (v, stride),
                                (rows, keys, d),
                                0.3,
                                |_| keys,
                                |_| &[][..],
                                keep,
                                (out.as_mut_ptr(), d),
                                &mut scores,
                            );
                        }
                    }
                    out
                };
                let (a, b) = (run(true), run(false));
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (x - y).abs() <= 1e-5 * (1.0 + y.abs()),
                        "keys={keys} d={d} value {i}: {x} vs {y}"
                    );
                }
            }
        }
    }

    /// Grouped decoding attention against one head at a time: head sizes 16 to 128 (and one
    /// without the kernel), 1 to 7 query heads per kv head, 1 to 40 keys (whole and ragged
    /// blocks of 16), with a padding mask in the bias.
    #[test]
    fn grouped_heads_match_one_head_at_a_time() {
        for (hd, g, keys) in [
            (64usize, 3usize, 37usize),
            (64, 7, 16),
            (128, 2, 40),
            (16, 5, 1),
            (32, 1, 33),
            (48, 3, 9),
        ] {
            let q = crate::kernels::cpu::test_values(g * hd, hd as u64, 1.0);
            let k = crate::kernels::cpu::test_values(keys * hd, 3 + g as u64, 1.0);
            let v = crate::kernels::cpu::test_values(keys * hd, 5 + keys as u64, 1.0);
            let mut bias = vec![0f32; keys];
            if keys > 2 {
                bias[1] = f32::MIN;
            }
            let mut scores = vec![0f32; g * keys];
            let mut got = vec![f32::NAN; g * hd];
            attend_heads(&q, (&k, &v), hd, 0.125, &bias, &mut scores, &mut got);
            for h in 0..g {
                let mut want = vec![0f32; hd];
                let mut sc = vec![0f32; keys];
                attend_one(
                    &q[h * hd..(h + 1) * hd],
                    &k,
                    &v,
                    0.125,
                    &bias,
                    &[],
                    &mut sc,
                    &mut want,
                );
                for (a, b) in got[h * hd..(h + 1) * hd].iter().zip(&want) {
                    assert!(
                        (a - b).abs() <= 1e-5 * (1.0 + b.abs()),
                        "hd {hd} g {g} keys {keys} head {h}: {a} vs {b}"
                    );
                }
            }
        }
    }

    /// Rows appended in place read as the same rows joined into a new buffer; a part longer
    /// than the buffer is refused and leaves it unchanged.
    #[test]
    fn rows_append_in_place_like_a_join() {
        let filled = |rows: usize, len: usize, base: usize| {
            let mut b = KvBuffer::new(rows, 2, 3);
            b.reserve(len);
            for pos in 0..len {
                for row in 0..rows {
                    for h in 0..2 {
                        let x = (base + row * 100 + h * 10 + pos) as f32;
                        b.put(row, h, pos, &[x, x + 0.5, x + 0.25], &[-x, -x, -x]);
                    }
                }
            }
            b.set_len(len);
            b
        };
        let (run, a, c) = (filled(3, 9, 0), filled(2, 5, 1000), filled(1, 9, 2000));
        let want = KvBuffer::join(&[(&run, 9), (&a, 5), (&c, 7)], 4).unwrap();
        let mut got = filled(3, 9, 0);
        assert!(got.append_rows(&[(&a, 5), (&c, 7)], 4));
        assert_eq!((got.rows(), got.len()), (6, 9));
        for r in 0..6 {
            for h in 0..2 {
                assert_eq!(got.get(r, h, 9), want.get(r, h, 9), "row {r} head {h}");
            }
        }
        let long = filled(1, 12, 3000);
        assert!(!got.append_rows(&[(&long, 12)], 4));
        assert_eq!(got.rows(), 6);
    }

    /// A freed vector is handed to the next one that needs room (its pages are not faulted
    /// in again): the smallest kept one that fits, none past the byte limit. A pool of its
    /// own: the shared one also serves the tests running beside this one, which may take the
    /// vector first or have filled the pool (this test, on the shared pool through
    /// `KvBuffer`, failed about one run in five that way), so that `KvBuffer` takes from and
    /// gives to the shared pool is no longer asserted here.
    #[test]
    fn freed_vectors_are_taken_again() {
        let mut pool = Spare {
            by_capacity: Default::default(),
            bytes: 0,
        };
        let (big, small) = (
            Vec::<f32>::with_capacity(1000),
            Vec::<f32>::with_capacity(100),
        );
        let (pb, ps) = (big.as_ptr(), small.as_ptr());
        pool.give(big, 8000);
        pool.give(small, 8000);
        assert_eq!(pool.bytes, 4400);
        let mut over = Vec::<f32>::with_capacity(1000);
        over.push(1.0);
        pool.give(over, 8000);
        assert_eq!(pool.bytes, 4400, "past the limit: not kept");
        let a = pool.take(90);
        assert_eq!((a.as_ptr(), a.len()), (ps, 0), "the smallest that fits");
        let b = pool.take(500);
        assert_eq!(b.as_ptr(), pb);
        assert_eq!(pool.bytes, 0);
        let c = pool.take(50);
        assert!(
            c.capacity() >= 50 && ![pb, ps].contains(&c.as_ptr()),
            "a new one"
        );
    }

    /// Rows that join, leave or stay are moved, never copied: a kept row's keys and values
    /// stay where they were through appends, selections and the growth its room allows.
    #[test]
    fn kept_rows_are_not_copied() {
        let mut b = KvBuffer::new(3, 2, 4);
        b.reserve(2);
        for r in 0..3 {
            for h in 0..2 {
                for p in 0..2 {
                    let x = (r * 10 + h) as f32 + p as f32 / 10.0;
                    b.put(r, h, p, &[x; 4], &[-x; 4]);
                }
            }
        }
        b.set_len(2);
        let at = |b: &KvBuffer, r: usize, h: usize| {
            (b.get(r, h, 0).0.as_ptr(), b.get(r, h, 0).1.as_ptr())
        };
        let (row1, row2) = (at(&b, 1, 1), at(&b, 2, 0));
        let mut other = KvBuffer::new(1, 2, 4);
        other.reserve(1);
        other.put(0, 0, 0, &[7.0; 4], &[7.0; 4]);
        other.put(0, 1, 0, &[8.0; 4], &[8.0; 4]);
        other.set_len(1);
        assert!(b.append_rows(&[(&other, 1)], 8));
        assert_eq!((at(&b, 1, 1), at(&b, 2, 0)), (row1, row2));
        // The new row: left padding, then its one position, with room for 8 more.
        assert_eq!(b.get(3, 1, 2).0, [0.0, 0.0, 0.0, 0.0, 8.0, 8.0, 8.0, 8.0]);
        let new_row = at(&b, 3, 0);
        for p in 2..10 {
            b.put(3, 0, p, &[1.0; 4], &[1.0; 4]);
        }
        assert_eq!(at(&b, 3, 0), new_row, "room reserved at the append");
        b.select_rows(&[2, 1, 3]).unwrap();
        assert_eq!((at(&b, 1, 1), at(&b, 0, 0)), (row1, row2));
        assert_eq!(at(&b, 2, 0), new_row);
        assert_eq!(
            b.get(1, 1, 2).0,
            [11.0, 11.0, 11.0, 11.0, 11.1, 11.1, 11.1, 11.1]
        );
    }

    /// A buffer of `rows` rows, 2 heads of 3 values, `positions` positions, each value
    /// telling its row, head and position.
    fn numbered(rows: usize, positions: usize) -> KvBuffer {
        let mut b = KvBuffer::new(rows, 2, 3);
        for pos in 0..positions {
            b.reserve(1);
            for row in 0..rows {
                for h in 0..2 {
                    let x = (row * 100 + h * 10 + pos) as f32;
                    b.put(row, h, pos, &[x, x + 0.5, x + 0.25], &[-x, -x, -x]);
                }
            }
            b.set_len(pos + 1);
        }
        b
    }

    /// Rows leaving with the last rows moved into their slots (done in place) give the
    /// same buffer as the copying path, and the buffer keeps growing afterwards.
    #[test]
    fn rows_leave_in_place_like_a_copy() {
        let filled = || numbered(5, 7);
        for keep in [&[0usize, 4, 2][..], &[3, 1], &[0, 1, 2, 3], &[4]] {
            let mut a = filled();
            a.select_rows(keep).unwrap();
            assert_eq!(a.rows(), keep.len());
            for (i, &r) in keep.iter().enumerate() {
                let want = filled();
                for h in 0..2 {
                    assert_eq!(a.get(i, h, 7), want.get(r, h, 7), "keep {keep:?} row {i}");
                }
            }
            a.reserve(1);
            a.put(0, 1, 7, &[1.0; 3], &[2.0; 3]);
            a.set_len(8);
            assert_eq!(a.get(0, 1, 8).0[21..], [1.0; 3]);
        }
    }

    /// A leaving row's vectors moved out hold what a copy of its positions holds; the other
    /// rows are untouched, and the row left behind is empty.
    #[test]
    fn taken_rows_equal_extracted_ones() {
        let filled = || numbered(3, 9);
        for positions in [
            (0..9).collect::<Vec<usize>>(),
            vec![2, 3, 4, 7, 8],
            vec![5],
            vec![],
            vec![4, 2, 6],
        ] {
            for r in 0..3 {
                let want = filled().extract_row(r, &positions);
                let mut b = filled();
                let got = b.take_row(r, &positions);
                assert_eq!(got.len(), want.len());
                for h in 0..2 {
                    assert_eq!(
                        got.get(0, h, got.len()),
                        want.get(0, h, want.len()),
                        "{positions:?} row {r}"
                    );
                }
                for other in (0..3).filter(|&o| o != r) {
                    for h in 0..2 {
                        assert_eq!(b.get(other, h, 9), filled().get(other, h, 9));
                    }
                }
                let sorted = positions.is_sorted_by(|a, b| a < b);
                assert_eq!(b.slots[r * 2].k.capacity() == 0, sorted, "moved out");
            }
        }
    }

    #[test]
    fn one_row_attention_masks_and_normalises() {
        let q = [1.0, 0.0];
        let k = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0];
        let v = [1.0, 0.0, 0.0, 1.0, 5.0, 5.0];
        let mut scores = [0f32; 3];
        let mut out = [0f32; 2];
        // Third key dropped by bias f32::MIN, the rest: scores 1*0.5, 0 -> softmax.
        attend_one(
            &q,
            &k,
            &v,
            0.5,
            &[0.0, 0.0, f32::MIN],
            &[],
            &mut scores,
            &mut out,
        );
        let p0 = 0.5f32.exp() / (0.5f32.exp() + 1.0);
        assert!((out[0] - p0).abs() < 1e-6 && (out[1] - (1.0 - p0)).abs() < 1e-6);
        attend_one(
            &q,
            &k,
            &v,
            1.0,
            &[],
            &[0.0, 1.0, 0.0],
            &mut scores,
            &mut out,
        );
        assert_eq!(out, [0.0, 1.0]);
    }

    /// Plain reference: one query row over `keys` rows of k and v (stride `ks`), two passes.
    #[allow(clippy::too_many_arguments)]
    fn naive(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        ks: usize,
        keys: usize,
        scale: f32,
        add: &[f32],
        keep: &[f32],
    ) -> Vec<f32> {
        let d = q.len();
        let mut sc: Vec<f64> = (0..keys)
            .map(|j| {
                let dot: f64 = (0..d).map(|c| q[c] as f64 * k[j * ks + c] as f64).sum();
                dot * scale as f64 + add.get(j).map_or(0.0, |&b| b as f64)
            })
            .collect();
        for (j, x) in sc.iter_mut().enumerate() {
            if keep.get(j) == Some(&0.0) {
                *x = f64::NEG_INFINITY;
            }
        }
        let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = sc.iter().map(|x| (x - m).exp()).collect();
        let z: f64 = e.iter().sum();
        (0..d)
            .map(|c| {
                (0..keys)
                    .map(|j| e[j] / z * v[j * ks + c] as f64)
                    .sum::<f64>() as f32
            })
            .collect()
    }

    /// Whole sequences longer than one block of query rows, with a key mask and a T5-style
    /// bias: every row equals the plain two-pass softmax attention.
    #[test]
    fn tiled_sequences_match_plain_attention() {
        let (b, s, heads, d) = (2usize, 150usize, 2usize, 8usize);
        let inner = heads * d;
        let qkv = crate::kernels::cpu::test_values(b * s * 3 * inner, 3, 2.0);
        let bias = crate::kernels::cpu::test_values(heads * s * s, 4, 1.0);
        let mut keep = vec![1f32; b * s];
        for j in [3usize, 70, 149] {
            keep[s + j] = 0.0;
        }
        for with_bias in [false, true] {
            let t = with_bias.then_some(&bias[..]);
            for par in [false, true] {
                let ctx = attend_sequences(&qkv, b, s, heads, d, 0.3, t, &keep, par);
                for bi in 0..b {
                    for hd in 0..heads {
                        let base = bi * s * 3 * inner;
                        let k = &qkv[base + inner + hd * d..];
                        let v = &qkv[base + 2 * inner + hd * d..];
                        for i in [0usize, 63, 64, 100, 149] {
                            let q = &qkv[base + i * 3 * inner + hd * d..][..d];
                            let add = if with_bias {
                                &bias[(hd * s + i) * s..][..s]
                            } else {
                                &[][..]
                            };
                            let want =
                                naive(q, k, v, 3 * inner, s, 0.3, add, &keep[bi * s..(bi + 1) * s]);
                            let got = &ctx[(bi * s + i) * inner + hd * d..][..d];
                            for (g, w) in got.iter().zip(&want) {
                                assert!(
                                    (g - w).abs() < 1e-5,
                                    "({bi}, {hd}, {i}): {got:?} vs {want:?}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Long inputs take larger query blocks (256 rows from 1024 tokens, 512 from 2048): rows
    /// on both sides of the block edges still equal the plain attention.
    #[test]
    fn long_inputs_use_larger_blocks_with_the_same_rows() {
        for s in [1100usize, 2100] {
            let (heads, d) = (1usize, 8usize);
            let inner = heads * d;
            let qkv = crate::kernels::cpu::test_values(s * 3 * inner, 5, 2.0);
            let mut keep = vec![1f32; s];
            keep[7] = 0.0;
            let ctx = attend_sequences(&qkv, 1, s, heads, d, 0.3, None, &keep, true);
            for i in [0usize, 255, 256, 511, 512, 1023, s - 1] {
                let q = &qkv[i * 3 * inner..][..d];
                let want = naive(
                    q,
                    &qkv[inner..],
                    &qkv[2 * inner..],
                    3 * inner,
                    s,
                    0.3,
                    &[],
                    &keep,
                );
                let got = &ctx[i * inner..][..d];
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "s={s} row {i}: {got:?} vs {want:?}");
                }
            }
        }
    }

    /// `x` rounded to the nearest f16 and back.
    fn rounded(x: &[f32]) -> Vec<f32> {
        x.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect()
    }

    /// Buffers of `rows` rows, 2 heads of 4 values (f16's pairs), `positions` positions of
    /// values no f16 holds exactly: one in f16 mode, one in f32 holding the same values
    /// rounded.
    fn twin_buffers(rows: usize, positions: usize, seed: u64) -> (KvBuffer, KvBuffer) {
        let (mut half, mut full) = (KvBuffer::new_f16(rows, 2, 4), KvBuffer::new(rows, 2, 4));
        let vals = crate::kernels::cpu::test_values(rows * 2 * positions * 8, seed, 3.0);
        for pos in 0..positions {
            half.reserve(1);
            full.reserve(1);
            for row in 0..rows {
                for h in 0..2 {
                    let at = ((pos * rows + row) * 2 + h) * 8;
                    let (k, v) = (&vals[at..at + 4], &vals[at + 4..at + 8]);
                    half.put(row, h, pos, k, v);
                    full.put(row, h, pos, &rounded(k), &rounded(v));
                }
            }
            half.set_len(pos + 1);
            full.set_len(pos + 1);
        }
        (half, full)
    }

    /// Every row and head of an f16 buffer widened equals the f32 buffer's.
    fn assert_twins(half: &KvBuffer, full: &KvBuffer, what: &str) {
        assert!(half.is_f16() && !full.is_f16());
        assert_eq!(
            (half.rows(), half.len()),
            (full.rows(), full.len()),
            "{what}"
        );
        let mut wide = (Vec::new(), Vec::new());
        for r in 0..half.rows() {
            for h in 0..2 {
                let got = half.get_f32(r, h, half.len(), &mut wide);
                assert_eq!(got, full.get(r, h, full.len()), "{what}: row {r} head {h}");
            }
        }
    }

    /// An f16 buffer holds each value rounded to f16 (ties to even, as llama.cpp's KV cache)
    /// at half the bytes, and every way rows join, leave, move and shrink keeps it equal to an
    /// f32 buffer of the rounded values.
    #[test]
    fn f16_buffers_move_like_f32_ones_of_rounded_values() {
        let (mut half, mut full) = twin_buffers(4, 9, 21);
        assert_twins(&half, &full, "filled");
        assert_ne!(
            full.get(0, 0, 1).0,
            &crate::kernels::cpu::test_values(4 * 2 * 9 * 8, 21, 3.0)[..4],
            "the values are not f16 values already"
        );
        let words = |b: &KvBuffer| b.slots.iter().map(|s| s.k.len() + s.v.len()).sum::<usize>();
        assert_eq!(2 * words(&half), words(&full), "half the bytes");
        let (h2, f2) = twin_buffers(2, 6, 22);
        let joined = (
            KvBuffer::join(&[(&half, 9), (&h2, 5)], 3).unwrap(),
            KvBuffer::join(&[(&full, 9), (&f2, 5)], 3).unwrap(),
        );
        assert_twins(&joined.0, &joined.1, "joined");
        assert!(KvBuffer::join(&[(&half, 9), (&f2, 5)], 3).is_err());
        assert!(
            !half.clone().append_rows(&[(&f2, 5)], 3),
            "modes do not mix"
        );
        assert!(half.append_rows(&[(&h2, 5)], 3));
        assert!(full.append_rows(&[(&f2, 5)], 3));
        assert_twins(&half, &full, "appended");
        half.select_rows(&[5, 0, 2, 2]).unwrap();
        full.select_rows(&[5, 0, 2, 2]).unwrap();
        assert_twins(&half, &full, "selected");
        let positions = [1usize, 2, 5, 8];
        assert_twins(
            &half.extract_row(1, &positions),
            &full.extract_row(1, &positions),
            "extracted",
        );
        assert_twins(
            &half.take_row(2, &positions),
            &full.take_row(2, &positions),
            "taken",
        );
        // The taken row is empty; it leaves, as a finished row does.
        half.select_rows(&[0, 1, 3]).unwrap();
        full.select_rows(&[0, 1, 3]).unwrap();
        half.drop_front(3);
        full.drop_front(3);
        assert_twins(&half, &full, "front dropped");
        half.reserve(1);
        full.reserve(1);
        for r in 0..3 {
            half.put(r, 1, 6, &[0.1, 0.2, 0.3, 1e-9], &[7.0, 1e5, -2.5, 0.333]);
            full.put(
                r,
                1,
                6,
                &rounded(&[0.1, 0.2, 0.3, 1e-9]),
                &rounded(&[7.0, 1e5, -2.5, 0.333]),
            );
        }
        half.set_len(7);
        full.set_len(7);
        assert_twins(&half, &full, "grown");
    }

    /// Attention over an f16 buffer (prompt blocks, a batched step) gives the bits attention
    /// over the same values rounded in an f32 buffer gives; one row decoding, within 1e-5.
    #[test]
    fn f16_buffers_attend_like_f32_ones_of_rounded_values() {
        let (b, nh, group, hd) = (3usize, 6usize, 3usize, 64usize);
        let nkv = nh / group;
        for (rows, past, s) in [(b, 7usize, 40usize), (1, 50, 1), (b, 50, 1)] {
            let total = past + s;
            let (mut half, mut full) = (
                KvBuffer::new_f16(rows, nkv, hd),
                KvBuffer::new(rows, nkv, hd),
            );
            half.reserve(total);
            full.reserve(total);
            let vals = crate::kernels::cpu::test_values(rows * nkv * total * 2 * hd, 17, 2.0);
            for r in 0..rows {
                for g in 0..nkv {
                    for pos in 0..total {
                        let at = ((r * nkv + g) * total + pos) * 2 * hd;
                        let (k, v) = (&vals[at..at + hd], &vals[at + hd..at + 2 * hd]);
                        half.put(r, g, pos, k, v);
                        full.put(r, g, pos, &rounded(k), &rounded(v));
                    }
                }
            }
            half.set_len(total);
            full.set_len(total);
            let width = nh * hd + 2 * nkv * hd;
            let n = rows * s;
            let qkv = crate::kernels::cpu::test_values(n * width, 18, 2.0);
            let bias = vec![0f32; n * total];
            let run = |kv: &KvBuffer| {
                attend_causal(
                    &qkv,
                    (width, n, s, past),
                    (nh, group, hd),
                    kv,
                    (&bias, total),
                    0.2,
                    false,
                )
            };
            let (got, want) = (run(&half), run(&full));
            // One row alone over f32 runs one head at a time, over f16 the grouped kernel:
            // the same sums in another order.
            let tol = if n == 1 { 1e-5 } else { 0.0 };
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| (a - b).abs() <= tol * (1.0 + b.abs())),
                "rows {rows} past {past} s {s}"
            );
        }
    }

    /// Batch invariance (`invariant`): a query row's output is the same bits in a prompt pass
    /// of the whole sequence, in chunks of 1, 7 and 33 rows after the cached rest, as a
    /// decoding step beside another sequence, and left-padded by 70 positions in a batch of
    /// two (prompt rows and a decoding step), over f16 and f32 buffers.
    #[test]
    fn invariant_rows_do_not_depend_on_the_pass() {
        let (nh, group, hd, len, pad) = (6usize, 3usize, 64usize, 100usize, 70usize);
        let nkv = nh / group;
        let width = nh * hd + 2 * nkv * hd;
        let qkv = crate::kernels::cpu::test_values(len * width, 31, 2.0);
        let kvv = crate::kernels::cpu::test_values(nkv * len * 2 * hd, 32, 2.0);
        let other = crate::kernels::cpu::test_values((pad + len) * width, 33, 2.0);
        for f16 in [false, true] {
            let new = |rows| {
                if f16 {
                    KvBuffer::new_f16(rows, nkv, hd)
                } else {
                    KvBuffer::new(rows, nkv, hd)
                }
            };
            // Row `r` of `kv` holds the sequence's keys and values from position `at`, the
            // positions before it other values (masked).
            let fill = |kv: &mut KvBuffer, r: usize, at: usize| {
                for g in 0..nkv {
                    for pos in 0..at + len {
                        let o = if pos < at {
                            ((pos * nkv + g) % len) * 2 * hd
                        } else {
                            ((g * len) + pos - at) * 2 * hd
                        };
                        let src = if pos < at { &other } else { &kvv };
                        kv.put(r, g, pos, &src[o..o + hd], &src[o + hd..o + 2 * hd]);
                    }
                }
            };
            let mut alone = new(1);
            alone.reserve(len);
            fill(&mut alone, 0, 0);
            alone.set_len(len);
            let attend =
                |q: &[f32], kv: &KvBuffer, n: usize, s: usize, past: usize, bias: &[f32]| {
                    let total = bias.len() / n;
                    attend_causal(
                        q,
                        (width, n, s, past),
                        (nh, group, hd),
                        kv,
                        (bias, total),
                        0.2,
                        true,
                    )
                };
            let want = attend(&qkv, &alone, len, len, 0, &vec![0f32; len * len]);
            let row = |v: &[f32], t: usize| v[t * nh * hd..(t + 1) * nh * hd].to_vec();
            for chunk in [1usize, 7, 33] {
                for p0 in (0..len).step_by(chunk) {
                    let c = chunk.min(len - p0);
                    let q = &qkv[p0 * width..(p0 + c) * width];
                    let got = attend(q, &alone, c, c, p0, &vec![0f32; c * (p0 + c)]);
                    for i in 0..c {
                        assert!(
                            row(&got, i) == row(&want, p0 + i),
                            "f16 {f16}: chunks of {chunk}, position {}",
                            p0 + i
                        );
                    }
                }
            }
            // Batch row 0: the sequence after `pad` masked positions; row 1: other values.
            let total = pad + len;
            let mut batch = new(2);
            batch.reserve(total);
            fill(&mut batch, 0, pad);
            for g in 0..nkv {
                for pos in 0..total {
                    let o = (pos * width) % (other.len() - 2 * hd);
                    batch.put(1, g, pos, &other[o..o + hd], &other[o + hd..o + 2 * hd]);
                }
            }
            batch.set_len(total);
            let mut bias = vec![0f32; total];
            bias[..pad].fill(f32::MIN);
            // Prompt rows, both batch rows.
            let mut q = vec![0f32; pad * width];
            q.extend_from_slice(&qkv);
            q.extend_from_slice(&other[..total * width]);
            let biases = [bias.repeat(total), vec![0f32; total * total]].concat();
            let got = attend(&q, &batch, 2 * total, total, 0, &biases);
            for t in 0..len {
                assert!(
                    row(&got, pad + t) == row(&want, t),
                    "f16 {f16}: padded prompt row {t}"
                );
            }
            // The last position as a decoding step of two rows.
            let q = [&qkv[(len - 1) * width..len * width], &other[..width]].concat();
            let got = attend(
                &q,
                &batch,
                2,
                1,
                total - 1,
                &[bias.clone(), vec![0f32; total]].concat(),
            );
            assert!(
                row(&got, 0) == row(&want, len - 1),
                "f16 {f16}: padded step"
            );
        }
    }

    /// A decoder prompt of several blocks after cached keys (grouped-query heads, a padding
    /// bias), and a decoding step: every row sees exactly its own prefix.
    #[test]
    fn causal_blocks_match_plain_attention() {
        let (b, nh, group, hd) = (2usize, 4usize, 2usize, 8usize);
        let nkv = nh / group;
        for (past, s) in [(0usize, 130usize), (5, 70), (135, 1)] {
            let total = past + s;
            let kv = filled_kv(KvBuffer::new(b, nkv, hd), total, 7);
            let width = nh * hd + 2 * nkv * hd;
            let n = b * s;
            let qkv = crate::kernels::cpu::test_values(n * width, 8, 2.0);
            let mut bias = crate::kernels::cpu::test_values(n * total, 9, 0.5);
            // Batch row 1 is left padded by 3 positions.
            for t in s..n {
                bias[t * total..t * total + 3].fill(f32::MIN);
            }
            let ctx = attend_causal(
                &qkv,
                (width, n, s, past),
                (nh, group, hd),
                &kv,
                (&bias, total),
                0.35,
                false,
            );
            for t in 0..n {
                let (r, i) = (t / s, t % s);
                let vis = past + i + 1;
                for head in 0..nh {
                    let (ks, vs) = kv.get(r, head / group, vis);
                    let q = &qkv[t * width + head * hd..][..hd];
                    let want = naive(
                        q,
                        ks,
                        vs,
                        hd,
                        vis,
                        0.35,
                        &bias[t * total..t * total + vis],
                        &[],
                    );
                    let got = &ctx[t * nh * hd + head * hd..][..hd];
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() < 1e-5,
                            "past {past} ({t}, {head}): {got:?} vs {want:?}"
                        );
                    }
                }
            }
        }
    }

    /// `kv` (empty) with `total` positions of test keys and values (`seed`) in every row and
    /// head.
    fn filled_kv(mut kv: KvBuffer, total: usize, seed: u64) -> KvBuffer {
        let (b, nkv, hd) = (kv.rows(), kv.heads, kv.dim);
        kv.reserve(total);
        let vals = crate::kernels::cpu::test_values(b * nkv * total * 2 * hd, seed, 2.0);
        for r in 0..b {
            for g in 0..nkv {
                for pos in 0..total {
                    let at = ((r * nkv + g) * total + pos) * 2 * hd;
                    kv.put(r, g, pos, &vals[at..at + hd], &vals[at + hd..at + 2 * hd]);
                }
            }
        }
        kv.set_len(total);
        kv
    }

    /// Decoding rows with long left padding (a chat row in a batch whose cache a long prompt
    /// widened) skip the padding in whole blocks: the same bits as attending over every key,
    /// over f32 and f16 caches.
    #[test]
    fn decoding_rows_skip_their_padding_with_the_same_bits() {
        let (b, nh, group, hd) = (3usize, 6usize, 3usize, 64usize);
        let nkv = nh / group;
        let total = 300;
        // Row 0 unpadded, row 1 padded 231 positions (three blocks skipped), row 2 padded 70.
        let pads = [0usize, 231, 70];
        for f16 in [false, true] {
            let empty = if f16 {
                KvBuffer::new_f16(b, nkv, hd)
            } else {
                KvBuffer::new(b, nkv, hd)
            };
            let kv = filled_kv(empty, total, 17);
            let width = nh * hd + 2 * nkv * hd;
            let qkv = crate::kernels::cpu::test_values(b * width, 18, 2.0);
            let mut bias = vec![0f32; b * total];
            for (r, &p) in pads.iter().enumerate() {
                bias[r * total..r * total + p].fill(f32::MIN);
            }
            let ctx = attend_causal(
                &qkv,
                (width, b, 1, total - 1),
                (nh, group, hd),
                &kv,
                (&bias, total),
                0.125,
                false,
            );
            let mut wide = (Vec::new(), Vec::new());
            for r in 0..b {
                let brow = &bias[r * total..(r + 1) * total];
                for kvh in 0..nkv {
                    let (h0, h1) = (kvh * group * hd, (kvh + 1) * group * hd);
                    let q = &qkv[r * width + h0..r * width + h1];
                    let mut scores = vec![0f32; group * total];
                    let mut want = vec![0f32; h1 - h0];
                    let done = f16
                        && grouped_heads(
                            q,
                            kv.get_f16(r, kvh, total),
                            hd,
                            0.125,
                            brow,
                            &mut scores,
                            &mut want,
                        );
                    if !done {
                        let kvs = kv.get_f32(r, kvh, total, &mut wide);
                        attend_heads(q, kvs, hd, 0.125, brow, &mut scores, &mut want);
                    }
                    let got = &ctx[r * nh * hd + h0..r * nh * hd + h1];
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, w)| a.to_bits() == w.to_bits()),
                        "f16 {f16} row {r} kv head {kvh}"
                    );
                }
            }
        }
    }

    /// Row `r`, head `h` of `kv` as all its positions (unstored padding as zeros).
    fn dense(kv: &KvBuffer, r: usize, h: usize) -> (Vec<f32>, Vec<f32>) {
        let mut wide = (Vec::new(), Vec::new());
        let (k, v) = kv.get_f32(r, h, kv.len(), &mut wide);
        let zeros = vec![0f32; kv.pad(r, h) * kv.dim];
        (
            zeros.iter().chain(k).copied().collect(),
            zeros.iter().chain(v).copied().collect(),
        )
    }

    /// A short row joined to a long one keeps most of its left padding unstored (whole blocks
    /// of 64), and every operation reads it as zeros: the join's contents, writes into the
    /// padding, cutting the front (into and past the padding), taking and extracting rows,
    /// appending rows in place, and decoding attention over it (the same bits as over a
    /// buffer that stores the zeros).
    #[test]
    fn unstored_padding_reads_as_zeros() {
        let (heads, hd) = (2usize, 8usize);
        for f16 in [false, true] {
            let new = || {
                if f16 {
                    KvBuffer::new_f16(1, heads, hd)
                } else {
                    KvBuffer::new(1, heads, hd)
                }
            };
            let long = filled_kv(new(), 200, 3);
            let short = filled_kv(new(), 10, 4);
            let mut kv = KvBuffer::join(&[(&long, 200), (&short, 10)], 8).unwrap();
            assert_eq!((kv.pad(0, 0), kv.pad(1, 1)), (0, 128));
            // The reference: the same rows with the zeros stored.
            let mut want: Vec<Vec<(Vec<f32>, Vec<f32>)>> = (0..2)
                .map(|r| (0..heads).map(|h| dense(&kv, r, h)).collect())
                .collect();
            for (h, (k, _)) in want[1].iter().enumerate() {
                assert!(k[..190 * hd].iter().all(|&x| x == 0.0));
                assert_eq!(&k[190 * hd..], &dense(&short, 0, h).0[..]);
            }
            // Decoding attention over it equals attention over the dense rows.
            let nh = heads;
            let width = nh * hd + 2 * heads * hd;
            let qkv = crate::kernels::cpu::test_values(2 * width, 5, 1.0);
            let mut bias = vec![0f32; 2 * 200];
            bias[200..390].fill(f32::MIN);
            let got = attend_causal(
                &qkv,
                (width, 2, 1, 199),
                (nh, 1, hd),
                &kv,
                (&bias, 200),
                0.3,
                false,
            );
            for r in 0..2 {
                for h in 0..heads {
                    let (k, v) = &want[r][h];
                    let mut sc = vec![0f32; 200];
                    let mut out = vec![0f32; hd];
                    let q = &qkv[r * width + h * hd..r * width + (h + 1) * hd];
                    let brow = &bias[r * 200..(r + 1) * 200];
                    let lead = masked_lead(brow, false);
                    attend_heads(
                        q,
                        (&k[lead * hd..], &v[lead * hd..]),
                        hd,
                        0.3,
                        &brow[lead..],
                        &mut sc,
                        &mut out,
                    );
                    let g = &got[r * nh * hd + h * hd..][..hd];
                    assert!(
                        g.iter().zip(&out).all(|(a, b)| a.to_bits() == b.to_bits()),
                        "f16 {f16} row {r} head {h}"
                    );
                }
            }
            // A write into the padding stores it from that block on.
            let (k, v) = (vec![1.5f32; hd], vec![-2.5f32; hd]);
            kv.put(1, 0, 70, &k, &v);
            assert_eq!(kv.pad(1, 0), 64);
            want[1][0].0[70 * hd..71 * hd].copy_from_slice(&k);
            want[1][0].1[70 * hd..71 * hd].copy_from_slice(&v);
            let check = |kv: &KvBuffer, want: &[Vec<(Vec<f32>, Vec<f32>)>], what: &str| {
                for (r, row) in want.iter().enumerate() {
                    for (h, w) in row.iter().enumerate() {
                        assert_eq!(&dense(kv, r, h), w, "f16 {f16} {what}: row {r} head {h}");
                    }
                }
            };
            check(&kv, &want, "put");
            // Cutting 100 positions: into the stored padding of head 0, within the unstored
            // padding of head 1 (128 -> 28: stored again, a part of a block).
            kv.drop_front(100);
            for row in want.iter_mut() {
                for (k, v) in row.iter_mut() {
                    k.drain(..100 * hd);
                    v.drain(..100 * hd);
                }
            }
            check(&kv, &want, "drop_front");
            assert_eq!(kv.pad(1, 1), 0);
            // Another cut past all padding.
            let mut kv2 = KvBuffer::join(&[(&long, 200), (&short, 10)], 8).unwrap();
            kv2.drop_front(195);
            assert_eq!(
                dense(&kv2, 1, 1).0,
                dense(&short, 0, 1).0[5 * hd..].to_vec()
            );
            // Rows taken or extracted at their real positions.
            let positions: Vec<usize> = (90..100).collect();
            let e = kv.extract_row(1, &positions);
            let t = kv.take_row(1, &positions);
            for h in 0..heads {
                let real = dense(&short, 0, h);
                assert_eq!(dense(&e, 0, h).0, real.0, "f16 {f16} extract");
                assert_eq!(dense(&t, 0, h), real, "f16 {f16} take");
            }
            // A short row appended in place to a long buffer leaves its padding unstored too.
            let mut wide = filled_kv(new(), 200, 3);
            assert!(wide.append_rows(&[(&short, 10)], 4));
            assert_eq!(wide.pad(1, 0), 128);
            for h in 0..heads {
                let (k, _) = dense(&wide, 1, h);
                assert_eq!(&k[190 * hd..], &dense(&short, 0, h).0[..]);
            }
        }
    }
}
