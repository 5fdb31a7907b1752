//! Whisper's decoder on CPU in plain f32 buffers: the same arithmetic as the candle layers in
//! `whisper.rs`, without a dozen small tensor ops (and their allocations and copies) per layer
//! and decoding step, and without a KV cache grown by concatenation.
//!
//! Matrices keep the checkpoint's `[out, in]` layout (`kernels::cpu::linear`), so a few rows
//! (a step, beams) stream each weight once: self-attention's q/k/v and cross-attention's k/v
//! are one matrix each, their missing key bias zeros. Self-attention keys and values live in
//! buffers written in place (room doubles when full); beam reordering copies only the rows
//! that now hold another beam's history. Cross-attention keys
//! and values are computed once per encoded input, shared (`Arc`) by every row decoding that
//! input (beams, a language-detection pass, the word-timing pass); the beams of one input
//! attend over them together, as products that read each head's keys and values once.

use std::sync::Arc;

use candle_core::{bail, DType, Result};
use candle_nn::VarBuilder;

use super::{WhisperConfig, LAYER_NORM_EPS};
use crate::kernels::cpu::attention::{attend_one, attend_sequences_into, KvBuffer};
use crate::kernels::cpu::linear::{gemm_into, linear_into, matmul_into, Layout, Weights};
use crate::kernels::cpu::rowops::{activate_par, layer_norm_rows, softmax_rows};
use crate::kernels::cpu::screen::ScreenPlan;
use crate::kernels::cpu::threads::{in_worker, par_ranges, SendPtr};
use crate::models::layers::Activation;

/// LayerNorm's gain, bias and epsilon.
type Norm = (Vec<f32>, Vec<f32>, f32);

/// `x @ w^T + b`, `w` `[out, in]`, in f16 when the checkpoint's values are f16 numbers (as
/// Whisper's are): a step streams half the bytes for the same products.
struct Dense {
    w: Weights,
    b: Vec<f32>,
}

/// A tensor at `vb` as an f32 vector.
fn f32s(vb: &VarBuilder, shape: &[usize], name: &str) -> Result<Vec<f32>> {
    vb.get(shape, name)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

/// Rows of `names` (each `[out_i, d_in]`) stacked into one `[out, in]` matrix, and their
/// biases; a name whose bias the checkpoint does not have (Whisper's `k_proj`) gets zeros.
fn stacked(
    vb: &VarBuilder,
    names: &[&str],
    d_in: usize,
    d_out: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let mut w = Vec::with_capacity(names.len() * d_out * d_in);
    let mut b = Vec::with_capacity(names.len() * d_out);
    for name in names {
        let p = vb.pp(*name);
        w.extend(f32s(&p, &[d_out, d_in], "weight")?);
        if p.contains_tensor("bias") {
            b.extend(f32s(&p, &[d_out], "bias")?);
        } else {
            b.extend(std::iter::repeat_n(0f32, d_out));
        }
    }
    Ok((w, b))
}

impl Dense {
    /// [`stacked`]'s matrix, in f16 when every value is one.
    fn load(vb: &VarBuilder, names: &[&str], d_in: usize, d_out: usize) -> Result<Self> {
        let (w, b) = stacked(vb, names, d_in, d_out)?;
        Ok(Self {
            w: Weights::new(w),
            b,
        })
    }

    fn n(&self) -> usize {
        self.b.len()
    }

    fn k(&self) -> usize {
        self.w.len() / self.b.len()
    }

    /// `x [rows, in] @ w^T + b`.
    fn forward(&self, x: &[f32], rows: usize, par: bool) -> Vec<f32> {
        let mut out = Vec::with_capacity(rows * self.n());
        for _ in 0..rows {
            out.extend_from_slice(&self.b);
        }
        self.w
            .matmul_into(x, rows, self.k(), self.n(), &mut out, true, par);
        out
    }

    /// `acc += x [rows, in] @ w^T + b` (a residual connection).
    fn add_to(&self, x: &[f32], rows: usize, acc: &mut [f32], par: bool) {
        for row in acc.chunks_exact_mut(self.n()) {
            row.iter_mut().zip(&self.b).for_each(|(a, b)| *a += b);
        }
        self.w
            .matmul_into(x, rows, self.k(), self.n(), acc, true, par);
    }
}

fn norm(vb: &VarBuilder, d: usize) -> Result<Norm> {
    Ok((
        f32s(vb, &[d], "weight")?,
        f32s(vb, &[d], "bias")?,
        LAYER_NORM_EPS as f32,
    ))
}

struct Layer {
    self_norm: Norm,
    /// `[3d, d]`: queries, keys, values.
    qkv: Dense,
    self_out: Dense,
    cross_norm: Norm,
    cross_q: Dense,
    /// `[2d, d]`: keys, then values (of the encoder states, once per input).
    cross_kv: Dense,
    cross_out: Dense,
    ff_norm: Norm,
    fc1: Dense,
    fc2: Dense,
}

/// The decoder stack (embeddings and the output projection stay the model's candle tensors:
/// they are the same numbers on both paths and the largest of them).
pub struct DecoderCpu {
    d: usize,
    heads: usize,
    dk: usize,
    max_target: usize,
    act: Activation,
    embed_scale: f32,
    /// `[max_target, d]`
    pos: Vec<f32>,
    layers: Vec<Layer>,
    norm: Norm,
}

/// `w` `[rows, cols]` transposed to `[cols, rows]`.
fn transpose(w: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut t = vec![0f32; w.len()];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = w[r * cols + c];
        }
    }
    t
}

/// A product for many rows: `w` `[in, out]` (`W^T`, what `gemm` reads fastest), the bias.
struct Wide {
    w: Vec<f32>,
    b: Vec<f32>,
}

impl Wide {
    /// Rows of `names` (each `[d_out, d_in]`) stacked, then transposed; a missing bias (the
    /// key projection's) is zeros.
    fn load(vb: &VarBuilder, names: &[&str], d_in: usize, d_out: usize) -> Result<Self> {
        let (w, b) = stacked(vb, names, d_in, d_out)?;
        Ok(Self {
            w: transpose(&w, b.len(), d_in),
            b,
        })
    }

    /// `out = x [rows, in] @ W + b (+ residual)`.
    fn apply(
        &self,
        x: &[f32],
        rows: usize,
        residual: Option<&[f32]>,
        out: &mut Vec<f32>,
        par: bool,
    ) {
        let k = self.w.len() / self.b.len();
        out.resize(rows * self.b.len(), 0.0);
        linear_into(x, rows, k, (&self.w, &self.b), residual, out, par);
    }
}

/// One pre-LN encoder layer.
struct EncoderLayer {
    attn_norm: Norm,
    /// `[d, 3d]`: queries, keys (no bias), values.
    qkv: Wide,
    out: Wide,
    ff_norm: Norm,
    fc1: Wide,
    fc2: Wide,
}

/// Whisper's encoder on CPU in plain f32 buffers: each convolution is one product over rows
/// of three neighbouring frames (`[frames, 3 * channels]`, the kernel reordered at load to
/// `[3, channels, out]` to match), GELU in place, positions added; then pre-LN layers with
/// one `[q; k; v]` product, the tiled attention kernel (scores never written whole), biases
/// and residuals as the products' starting values. The same arithmetic as the candle
/// encoder in `whisper.rs`, without its convolution's unfolding copies, transposes and
/// per-op buffers.
pub struct EncoderCpu {
    d: usize,
    heads: usize,
    mels: usize,
    act: Activation,
    /// `[3 * mels, d]` and `[3 * d, d]` (`[in, out]`, the unfolded input's three frames
    /// first), with their biases.
    conv1: Wide,
    conv2: Wide,
    /// `[max_source, d]`
    pos: Vec<f32>,
    layers: Vec<EncoderLayer>,
    norm: Norm,
}

impl EncoderCpu {
    /// `vb` at `model.encoder`.
    pub fn load(cfg: &WhisperConfig, vb: &VarBuilder) -> Result<Self> {
        let (d, heads, ffn, mels) = (
            cfg.d_model,
            cfg.encoder_attention_heads,
            cfg.encoder_ffn_dim,
            cfg.num_mel_bins,
        );
        if heads == 0 || d % heads != 0 {
            bail!("d_model {d} does not split into {heads} encoder heads");
        }
        // `[out, in, 3]` -> `[3, in, out]`: a row of the unfolded input is three frames.
        let conv = |name: &str, cin: usize| -> Result<Wide> {
            let w = f32s(&vb.pp(name), &[d, cin, 3], "weight")?;
            let mut r = vec![0f32; w.len()];
            for o in 0..d {
                for c in 0..cin {
                    for t in 0..3 {
                        r[(t * cin + c) * d + o] = w[(o * cin + c) * 3 + t];
                    }
                }
            }
            let b = f32s(&vb.pp(name), &[d], "bias")?;
            Ok(Wide { w: r, b })
        };
        let layers = (0..cfg.encoder_layers)
            .map(|i| -> Result<EncoderLayer> {
                let l = vb.pp("layers").pp(i);
                let sa = l.pp("self_attn");
                Ok(EncoderLayer {
                    attn_norm: norm(&l.pp("self_attn_layer_norm"), d)?,
                    qkv: Wide::load(&sa, &["q_proj", "k_proj", "v_proj"], d, d)?,
                    out: Wide::load(&sa, &["out_proj"], d, d)?,
                    ff_norm: norm(&l.pp("final_layer_norm"), d)?,
                    fc1: Wide::load(&l, &["fc1"], d, ffn)?,
                    fc2: Wide::load(&l, &["fc2"], ffn, d)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            d,
            heads,
            mels,
            act: cfg.activation_function,
            conv1: conv("conv1", mels)?,
            conv2: conv("conv2", d)?,
            pos: f32s(
                &vb.pp("embed_positions"),
                &[cfg.max_source_positions, d],
                "weight",
            )?,
            layers,
            norm: norm(&vb.pp("layer_norm"), d)?,
        })
    }

    /// Encoder states `[b * frames / 2, d]` of log-mel features `[b, mels, frames]`.
    pub fn forward(&self, features: &[f32], b: usize, frames: usize) -> Result<Vec<f32>> {
        let (d, mels) = (self.d, self.mels);
        let src = frames / 2;
        if features.len() != b * mels * frames
            || !frames.is_multiple_of(2)
            || src * d > self.pos.len()
        {
            bail!(
                "{} feature values for {b} inputs of {mels} mel bins x {frames} frames \
                 (at most {} frames)",
                features.len(),
                2 * self.pos.len() / d
            );
        }
        let par = !in_worker();
        let mut x = vec![0f32; b * src * d];
        let (mut cols, mut y1, mut y2) = (Vec::new(), Vec::new(), Vec::new());
        for (f, xb) in features
            .chunks_exact(mels * frames)
            .zip(x.chunks_exact_mut(src * d))
        {
            // conv1 (stride 1, padding 1) over frames-first features, then GELU.
            unfold(
                &transpose(f, mels, frames),
                frames,
                mels,
                1,
                frames,
                &mut cols,
            );
            self.conv1.apply(&cols, frames, None, &mut y1, par);
            activate_par(&mut y1, Activation::Gelu, par);
            // conv2 (stride 2, padding 1), GELU, positions.
            unfold(&y1, frames, d, 2, src, &mut cols);
            self.conv2.apply(&cols, src, None, &mut y2, par);
            activate_par(&mut y2, Activation::Gelu, par);
            for ((o, y), p) in xb.iter_mut().zip(&y2).zip(&self.pos) {
                *o = y + p;
            }
        }
        let rows = b * src;
        let keep = vec![1f32; rows];
        let dk = d / self.heads;
        let scale = (dk as f32).powf(-0.5);
        let (mut h, mut qkv, mut ctx, mut y, mut ff) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for l in &self.layers {
            h.clone_from(&x);
            layer_norm_rows(&mut h, d, &l.attn_norm, par);
            l.qkv.apply(&h, rows, None, &mut qkv, par);
            attend_sequences_into(
                &qkv, b, src, self.heads, dk, scale, None, &keep, par, &mut ctx,
            );
            l.out.apply(&ctx, rows, Some(&x), &mut y, par);
            h.clone_from(&y);
            layer_norm_rows(&mut h, d, &l.ff_norm, par);
            l.fc1.apply(&h, rows, None, &mut ff, par);
            activate_par(&mut ff, self.act, par);
            l.fc2.apply(&ff, rows, Some(&y), &mut x, par);
        }
        layer_norm_rows(&mut x, d, &self.norm, par);
        Ok(x)
    }
}

/// Rows of three neighbouring frames of `x` (`[frames, c]`, frames first) for a kernel-3
/// convolution with padding 1: output frame `t` reads input frames `stride * t - 1 ..=
/// stride * t + 1` (zeros outside), `cols` `[out_frames, 3 * c]`.
fn unfold(
    x: &[f32],
    frames: usize,
    c: usize,
    stride: usize,
    out_frames: usize,
    cols: &mut Vec<f32>,
) {
    cols.clear();
    cols.resize(out_frames * 3 * c, 0.0);
    for (t, row) in cols.chunks_exact_mut(3 * c).enumerate() {
        for (tap, dst) in row.chunks_exact_mut(c).enumerate() {
            let at = (stride * t + tap).checked_sub(1);
            if let Some(at) = at.filter(|&a| a < frames) {
                dst.copy_from_slice(&x[at * c..(at + 1) * c]);
            }
        }
    }
}

/// Cross-attention keys and values of encoded inputs: per layer `[inputs, heads, src, dk]`.
pub struct CrossKv {
    inputs: usize,
    src: usize,
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The decoder's state between steps.
pub struct DecoderState {
    len: usize,
    rows: usize,
    /// Per layer: self-attention keys and values of every row, room for every position.
    self_kv: Vec<KvBuffer>,
    cross: Arc<CrossKv>,
    /// The input each row decodes.
    input_of: Vec<usize>,
    /// Set for a greedy search that needs only each step's argmax: the output projection is
    /// screened ([`crate::kernels::cpu::screen`]).
    pub(crate) screen: Option<Arc<ScreenPlan>>,
}

impl DecoderState {
    /// Tokens already decoded.
    pub fn seq_len(&self) -> usize {
        self.len
    }

    /// Encoded inputs (one row each in a fresh state).
    pub fn inputs(&self) -> usize {
        self.cross.inputs
    }

    /// Keep rows: row `i` afterwards is row `rows[i]` before.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            bail!("row {bad} is out of range ({} rows)", self.rows);
        }
        for buf in &mut self.self_kv {
            buf.select_rows(rows)?;
        }
        self.input_of = rows.iter().map(|&r| self.input_of[r]).collect();
        self.rows = rows.len();
        Ok(())
    }
}

/// Cross-attention probabilities to keep while decoding: `heads` (`(layer, head)`), and for
/// each of them one row of `src` probabilities per decoded position.
struct Capture<'a> {
    heads: &'a [(usize, usize)],
    out: Vec<Vec<Vec<f32>>>,
}

impl DecoderCpu {
    /// `vb` at `model.decoder`.
    pub fn load(cfg: &WhisperConfig, vb: &VarBuilder, embed_scale: f64) -> Result<Self> {
        let (d, heads, ffn) = (
            cfg.d_model,
            cfg.decoder_attention_heads,
            cfg.decoder_ffn_dim,
        );
        if heads == 0 || d % heads != 0 {
            bail!("d_model {d} does not split into {heads} decoder heads");
        }
        let layers = (0..cfg.decoder_layers)
            .map(|i| -> Result<Layer> {
                let l = vb.pp("layers").pp(i);
                let (sa, ca) = (l.pp("self_attn"), l.pp("encoder_attn"));
                Ok(Layer {
                    self_norm: norm(&l.pp("self_attn_layer_norm"), d)?,
                    qkv: Dense::load(&sa, &["q_proj", "k_proj", "v_proj"], d, d)?,
                    self_out: Dense::load(&sa, &["out_proj"], d, d)?,
                    cross_norm: norm(&l.pp("encoder_attn_layer_norm"), d)?,
                    cross_q: Dense::load(&ca, &["q_proj"], d, d)?,
                    cross_kv: Dense::load(&ca, &["k_proj", "v_proj"], d, d)?,
                    cross_out: Dense::load(&ca, &["out_proj"], d, d)?,
                    ff_norm: norm(&l.pp("final_layer_norm"), d)?,
                    fc1: Dense::load(&l, &["fc1"], d, ffn)?,
                    fc2: Dense::load(&l, &["fc2"], ffn, d)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            d,
            heads,
            dk: d / heads,
            max_target: cfg.max_target_positions,
            act: cfg.activation_function,
            embed_scale: embed_scale as f32,
            pos: f32s(
                &vb.pp("embed_positions"),
                &[cfg.max_target_positions, d],
                "weight",
            )?,
            layers,
            norm: norm(&vb.pp("layer_norm"), d)?,
        })
    }

    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Cross-attention keys and values of encoder states `[inputs * src, d]`.
    pub fn cross_kv(&self, enc: &[f32], inputs: usize, src: usize) -> Result<CrossKv> {
        let (d, h, dk) = (self.d, self.heads, self.dk);
        if enc.len() != inputs * src * d {
            bail!(
                "{} encoder values for {inputs} inputs of {src} x {d}",
                enc.len()
            );
        }
        let par = !in_worker();
        let mut ks = Vec::with_capacity(self.layers.len());
        let mut vs = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let kv = l.cross_kv.forward(enc, inputs * src, par);
            let mut k = vec![0f32; inputs * src * d];
            let mut v = vec![0f32; inputs * src * d];
            for b in 0..inputs {
                for t in 0..src {
                    let row = &kv[(b * src + t) * 2 * d..(b * src + t + 1) * 2 * d];
                    for hd in 0..h {
                        let to = ((b * h + hd) * src + t) * dk;
                        k[to..to + dk].copy_from_slice(&row[hd * dk..(hd + 1) * dk]);
                        v[to..to + dk].copy_from_slice(&row[d + hd * dk..d + (hd + 1) * dk]);
                    }
                }
            }
            ks.push(k);
            vs.push(v);
        }
        Ok(CrossKv {
            inputs,
            src,
            k: ks,
            v: vs,
        })
    }

    /// A state with one row per input of `cross`, nothing decoded.
    pub fn new_state(&self, cross: Arc<CrossKv>) -> DecoderState {
        let rows = (0..cross.inputs).collect();
        self.state_of(cross, rows)
    }

    /// A state whose row `r` decodes input `input_of[r]` of `cross`. The self-attention
    /// buffers start with room for 64 positions and double when full (a few copies per
    /// window): room for all `max_target_positions` in every row from the start would hold
    /// gigabytes for a batch of beams of a large model.
    fn state_of(&self, cross: Arc<CrossKv>, input_of: Vec<usize>) -> DecoderState {
        let rows = input_of.len();
        let mut buf = KvBuffer::new(rows, self.heads, self.dk);
        buf.reserve(64.min(self.max_target));
        DecoderState {
            len: 0,
            rows,
            self_kv: vec![buf; self.layers.len()],
            cross,
            input_of,
            screen: None,
        }
    }

    /// A fresh state over the same encoded inputs as `st` (shared, not copied).
    pub fn restart(&self, st: &DecoderState) -> DecoderState {
        self.new_state(st.cross.clone())
    }

    /// Final decoder states `[rows * s, d]` of tokens `ids` `[rows, s]` after the cached ones;
    /// `embed` is the `[vocab, d]` token embedding table.
    pub fn decode(
        &self,
        embed: &[f32],
        ids: &[u32],
        s: usize,
        st: &mut DecoderState,
    ) -> Result<Vec<f32>> {
        self.run(embed, ids, s, st, None)
    }

    /// The cross-attention probabilities of the alignment `heads` (`(layer, head)`) for one
    /// teacher-forced pass over `ids` from position 0, decoding encoded input `input` of
    /// `st`'s: `[head][row][source position]` (see `alignment_attention` in `whisper.rs`).
    pub fn alignment_attention(
        &self,
        embed: &[f32],
        ids: &[u32],
        st: &DecoderState,
        input: usize,
        heads: &[(usize, usize)],
    ) -> Result<Vec<Vec<Vec<f32>>>> {
        if input >= st.cross.inputs {
            bail!(
                "encoded input {input} of {} for the alignment heads",
                st.cross.inputs
            );
        }
        if let Some(&(l, h)) = heads
            .iter()
            .find(|&&(l, h)| l >= self.layers.len() || h >= self.heads)
        {
            bail!(
                "alignment head ({l}, {h}) but the decoder has {} layers of {} heads",
                self.layers.len(),
                self.heads
            );
        }
        let mut one = self.state_of(st.cross.clone(), vec![input]);
        let mut cap = Capture {
            heads,
            out: vec![Vec::new(); heads.len()],
        };
        self.run(embed, ids, ids.len(), &mut one, Some(&mut cap))?;
        Ok(cap.out)
    }

    fn run(
        &self,
        embed: &[f32],
        ids: &[u32],
        s: usize,
        st: &mut DecoderState,
        mut capture: Option<&mut Capture>,
    ) -> Result<Vec<f32>> {
        let (d, h, dk) = (self.d, self.heads, self.dk);
        let rows = st.rows;
        if s == 0 || ids.len() != rows * s {
            bail!("{} decoder tokens for {rows} rows of {s}", ids.len());
        }
        let past = st.len;
        let total = past + s;
        if total > self.max_target {
            bail!(
                "the decoder has {} positions; {total} tokens do not fit",
                self.max_target
            );
        }
        let vocab = embed.len() / d;
        let n = rows * s;
        let par = !in_worker();
        // Token embeddings (scaled) plus positions.
        let mut x = Vec::with_capacity(n * d);
        for (t, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= vocab {
                bail!("token id {id} is out of range for the vocabulary of {vocab}");
            }
            let p = past + t % s;
            let (e, pe) = (&embed[id * d..(id + 1) * d], &self.pos[p * d..(p + 1) * d]);
            x.extend(e.iter().zip(pe).map(|(e, p)| e * self.embed_scale + p));
        }
        let scale = 1.0 / (dk as f32).sqrt();
        let last = match &capture {
            Some(c) => c.heads.iter().map(|&(l, _)| l).max().unwrap_or(0),
            None => self.layers.len().saturating_sub(1),
        };
        let mut ctx = vec![0f32; n * d];
        for (li, l) in self.layers.iter().enumerate().take(last + 1) {
            // Self-attention: this step's keys and values into the cache, then causal.
            let mut hn = x.clone();
            layer_norm_rows(&mut hn, d, &l.self_norm, par);
            let qkv = l.qkv.forward(&hn, n, par);
            let kv = &mut st.self_kv[li];
            kv.reserve(s);
            for t in 0..n {
                let row = &qkv[t * 3 * d..(t + 1) * 3 * d];
                for hd in 0..h {
                    let k = &row[d + hd * dk..d + (hd + 1) * dk];
                    let v = &row[2 * d + hd * dk..2 * d + (hd + 1) * dk];
                    kv.put(t / s, hd, past + t % s, k, v);
                }
            }
            kv.set_len(total);
            self_attention(&qkv, (n, s, past), (h, dk), kv, scale, &mut ctx, par);
            l.self_out.add_to(&ctx, n, &mut x, par);

            // Cross-attention over the row's input.
            let mut hn = x.clone();
            layer_norm_rows(&mut hn, d, &l.cross_norm, par);
            let q = l.cross_q.forward(&hn, n, par);
            let want: Vec<(usize, usize)> = capture
                .as_ref()
                .map(|c| {
                    c.heads
                        .iter()
                        .enumerate()
                        .filter(|(_, &(layer, _))| layer == li)
                        .map(|(i, &(_, head))| (i, head))
                        .collect()
                })
                .unwrap_or_default();
            let probs = cross_attention(
                &q,
                (s, &st.input_of),
                (&st.cross, li),
                (h, dk),
                scale,
                &mut ctx,
                &want,
                par,
            );
            if let Some(c) = capture.as_deref_mut() {
                for (i, p) in probs {
                    c.out[i] = p;
                }
                if li == last {
                    break;
                }
            }
            l.cross_out.add_to(&ctx, n, &mut x, par);

            // Feed-forward.
            let mut hn = x.clone();
            layer_norm_rows(&mut hn, d, &l.ff_norm, par);
            let mut f = l.fc1.forward(&hn, n, par);
            activate_par(&mut f, self.act, par);
            l.fc2.add_to(&f, n, &mut x, par);
        }
        st.len = total;
        layer_norm_rows(&mut x, d, &self.norm, par);
        Ok(x)
    }
}

/// Causal self-attention of `n` query rows (row `t`: position `past + t % s` of state row
/// `t / s`) over the cache `kv`, into `ctx` `[n, h * dk]`; `qkv` rows are `[q; k; v]`.
fn self_attention(
    qkv: &[f32],
    (n, s, past): (usize, usize, usize),
    (h, dk): (usize, usize),
    kv: &KvBuffer,
    scale: f32,
    ctx: &mut [f32],
    par: bool,
) {
    let d = h * dk;
    let total = past + s;
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let items = |range: std::ops::Range<usize>| {
        let out = ctx_ptr;
        let mut scores = vec![0f32; total];
        for item in range {
            let (t, hd) = (item / h, item % h);
            let keys = past + t % s + 1;
            let (ks, vs) = kv.get(t / s, hd, keys);
            // SAFETY: row t, columns hd*dk.. of ctx belong to this item only.
            let o = unsafe { std::slice::from_raw_parts_mut(out.0.add(t * d + hd * dk), dk) };
            attend_one(
                &qkv[t * 3 * d + hd * dk..][..dk],
                ks,
                vs,
                scale,
                &[],
                &[],
                &mut scores[..keys],
                o,
            );
        }
    };
    if par && n * h * total * dk >= 1 << 18 {
        par_ranges(n * h, items);
    } else {
        items(0..n * h);
    }
}

/// Cross-attention of query rows `q` `[rows * s, h * dk]` (state row `r` decodes input
/// `input_of[r]`) over layer `li` of `cross`, into `ctx`. The rows of one input attend
/// together, per head: scores as one product over the head's keys (`[m, dk] x [src, dk]^T`,
/// the keys streamed once for all `m` rows), softmax, one product with the values. Returns
/// the probabilities of the `want`ed heads (`(index, head)`), one row per query.
#[allow(clippy::too_many_arguments)]
fn cross_attention(
    q: &[f32],
    (s, input_of): (usize, &[usize]),
    (cross, li): (&CrossKv, usize),
    (h, dk): (usize, usize),
    scale: f32,
    ctx: &mut [f32],
    want: &[(usize, usize)],
    par: bool,
) -> Vec<(usize, Vec<Vec<f32>>)> {
    let d = h * dk;
    let src = cross.src;
    // The query rows of each input, in row order.
    let mut groups: Vec<(usize, Vec<usize>)> = Vec::new();
    for (r, &b) in input_of.iter().enumerate() {
        let rows = (0..s).map(|i| r * s + i);
        match groups.iter_mut().find(|(g, _)| *g == b) {
            Some((_, v)) => v.extend(rows),
            None => groups.push((b, rows.collect())),
        }
    }
    let (ck, cv) = (&cross.k[li], &cross.v[li]);
    let ctx_ptr = SendPtr(ctx.as_mut_ptr());
    let kept: std::sync::Mutex<Vec<(usize, Vec<Vec<f32>>)>> = std::sync::Mutex::new(Vec::new());
    let job = |item: usize| {
        let out = ctx_ptr;
        let (g, hd) = (item / h, item % h);
        let (b, rows) = (&groups[g].0, &groups[g].1);
        let m = rows.len();
        let at = (b * h + hd) * src * dk;
        let (k, v) = (&ck[at..at + src * dk], &cv[at..at + src * dk]);
        let mut qs = Vec::with_capacity(m * dk);
        for &t in rows {
            qs.extend(
                q[t * d + hd * dk..t * d + (hd + 1) * dk]
                    .iter()
                    .map(|x| x * scale),
            );
        }
        let mut scores = vec![0f32; m * src];
        matmul_into(&qs, m, dk, k, src, &mut scores, false, false);
        softmax_rows(&mut scores, src, &[]);
        let mut o = vec![0f32; m * dk];
        gemm_into(&scores, m, src, v, dk, Layout::InOut, &mut o, false, false);
        for (i, &t) in rows.iter().enumerate() {
            // SAFETY: row t, columns hd*dk.. of ctx belong to this (input, head) only: each
            // row decodes one input.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(t * d + hd * dk), dk) };
            dst.copy_from_slice(&o[i * dk..(i + 1) * dk]);
        }
        for &(idx, head) in want {
            if head == hd {
                let p = scores.chunks_exact(src).map(<[f32]>::to_vec).collect();
                kept.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((idx, p));
            }
        }
    };
    let jobs = groups.len() * h;
    if par && jobs > 1 {
        par_ranges(jobs, |r| r.for_each(&job));
    } else {
        (0..jobs).for_each(job);
    }
    kept.into_inner().unwrap_or_else(|e| e.into_inner())
}
