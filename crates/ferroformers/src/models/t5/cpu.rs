//! T5 on CPU in plain f32 buffers: the same arithmetic as the candle layers in `t5.rs`, without
//! a dozen small tensor ops (and their allocations and copies) per layer and decoding step.
//! Attention, RMSNorm, products and row loops are the kernels' (`kernels::cpu`).
//!
//! Matrices keep the checkpoint's `[out, in]` layout (`kernels::cpu::linear`); q/k/v, k/v and
//! the gated feed-forward's `wi_0`/`wi_1` are stacked into one matrix each, and a tied LM head
//! is the embedding table itself. The decoder keeps its self-attention keys/values in buffers that grow by
//! doubling; the cross-attention keys/values stay one copy per input, and beams (rows) point at
//! their input, so reordering beams copies only the self-attention cache.

use candle_core::{bail, DType, Result};
use candle_nn::VarBuilder;

use super::{relative_bucket, T5Config};
use crate::kernels::cpu::attention::{attend_one, attend_sequences, rms_norm_rows, KvBuffer};
use crate::kernels::cpu::linear::{matmul, matmul_into};
use crate::kernels::cpu::rowops::{self, mul_in_place};
use crate::kernels::cpu::threads::in_worker;
use crate::models::layers::Activation;

struct Cross {
    norm: Vec<f32>,
    /// `[inner, d]`
    q: Vec<f32>,
    /// `[2 inner, d]`: keys, then values.
    kv: Vec<f32>,
    /// `[d, inner]`
    o: Vec<f32>,
}

struct Layer {
    attn_norm: Vec<f32>,
    /// `[3 inner, d]`: queries, keys, values.
    qkv: Vec<f32>,
    /// `[d, inner]`
    o: Vec<f32>,
    cross: Option<Cross>,
    ff_norm: Vec<f32>,
    /// `[ff, d]`, or `[2 ff, d]` (`wi_0`, then `wi_1`) when gated.
    wi: Vec<f32>,
    /// `[d, ff]`
    wo: Vec<f32>,
}

pub struct T5Cpu {
    d: usize,
    heads: usize,
    d_kv: usize,
    d_ff: usize,
    vocab: usize,
    eps: f32,
    gated: bool,
    act: Activation,
    num_buckets: usize,
    max_distance: usize,
    /// `[vocab, d]`
    shared: Vec<f32>,
    enc: Vec<Layer>,
    enc_norm: Vec<f32>,
    /// `[buckets, heads]`
    enc_rel: Vec<f32>,
    dec: Vec<Layer>,
    dec_norm: Vec<f32>,
    dec_rel: Vec<f32>,
    /// `[vocab, d]`; `None`: tied to `shared`.
    lm_head: Option<Vec<f32>>,
    output_scale: f32,
}

/// The decoder's state between steps.
pub struct DecoderState {
    len: usize,
    rows: usize,
    /// Per layer: self-attention keys and values of every row.
    self_kv: Vec<KvBuffer>,
    /// Per layer, `[inputs, heads, src, d_kv]`.
    cross_k: Vec<Vec<f32>>,
    cross_v: Vec<Vec<f32>>,
    /// `[inputs, src]`, 1 for real tokens, 0 for padding.
    keep: Vec<f32>,
    src: usize,
    /// The input each row decodes.
    input_of: Vec<usize>,
}

impl DecoderState {
    /// Tokens already decoded.
    pub fn seq_len(&self) -> usize {
        self.len
    }

    /// Keep rows: row `i` afterwards is row `rows[i]` before.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= self.rows) {
            bail!("row {bad} is out of range ({} rows)", self.rows);
        }
        // Rows are moved (beams that keep their own row copy nothing).
        for buf in &mut self.self_kv {
            buf.select_rows(rows)?;
        }
        self.input_of = rows.iter().map(|&r| self.input_of[r]).collect();
        self.rows = rows.len();
        Ok(())
    }
}

fn get(vb: &VarBuilder, shape: (usize, usize), name: &str) -> Result<Vec<f32>> {
    vb.get(shape, name)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1()
}

fn get1(vb: &VarBuilder, n: usize, name: &str) -> Result<Vec<f32>> {
    vb.get(n, name)?.to_dtype(DType::F32)?.to_vec1()
}

/// An `nn.Linear(i, o, bias=False)` weight, `[o, i]`.
fn linear(vb: &VarBuilder, i: usize, o: usize) -> Result<Vec<f32>> {
    get(vb, (o, i), "weight")
}

impl T5Cpu {
    pub fn load(cfg: &T5Config, vb: &VarBuilder) -> Result<Self> {
        let (gated, act) = cfg.feed_forward()?;
        let (d, heads, d_kv, d_ff) = (cfg.d_model, cfg.num_heads, cfg.d_kv, cfg.d_ff);
        let inner = heads * d_kv;
        let buckets = cfg.relative_attention_num_buckets;
        let self_attn =
            |a: VarBuilder, norm: VarBuilder| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
                let qkv = [
                    linear(&a.pp("q"), d, inner)?,
                    linear(&a.pp("k"), d, inner)?,
                    linear(&a.pp("v"), d, inner)?,
                ]
                .concat();
                Ok((
                    get1(&norm, d, "weight")?,
                    qkv,
                    linear(&a.pp("o"), inner, d)?,
                ))
            };
        let ff = |f: VarBuilder, norm: VarBuilder| -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
            let wi = if gated {
                [
                    linear(&f.pp("wi_0"), d, d_ff)?,
                    linear(&f.pp("wi_1"), d, d_ff)?,
                ]
                .concat()
            } else {
                linear(&f.pp("wi"), d, d_ff)?
            };
            Ok((get1(&norm, d, "weight")?, wi, linear(&f.pp("wo"), d_ff, d)?))
        };
        let enc_vb = vb.pp("encoder");
        let dec_vb = vb.pp("decoder");
        let mut enc = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let b = enc_vb.pp("block").pp(i).pp("layer");
            let (attn_norm, qkv, o) =
                self_attn(b.pp(0).pp("SelfAttention"), b.pp(0).pp("layer_norm"))?;
            let (ff_norm, wi, wo) = ff(b.pp(1).pp("DenseReluDense"), b.pp(1).pp("layer_norm"))?;
            enc.push(Layer {
                attn_norm,
                qkv,
                o,
                cross: None,
                ff_norm,
                wi,
                wo,
            });
        }
        let mut dec = Vec::new();
        for i in 0..cfg.num_decoder_layers.unwrap_or(cfg.num_layers) {
            let b = dec_vb.pp("block").pp(i).pp("layer");
            let (attn_norm, qkv, o) =
                self_attn(b.pp(0).pp("SelfAttention"), b.pp(0).pp("layer_norm"))?;
            let c = b.pp(1).pp("EncDecAttention");
            let cross = Cross {
                norm: get1(&b.pp(1).pp("layer_norm"), d, "weight")?,
                q: linear(&c.pp("q"), d, inner)?,
                kv: [linear(&c.pp("k"), d, inner)?, linear(&c.pp("v"), d, inner)?].concat(),
                o: linear(&c.pp("o"), inner, d)?,
            };
            let (ff_norm, wi, wo) = ff(b.pp(2).pp("DenseReluDense"), b.pp(2).pp("layer_norm"))?;
            dec.push(Layer {
                attn_norm,
                qkv,
                o,
                cross: Some(cross),
                ff_norm,
                wi,
                wo,
            });
        }
        let rel = |stack: &VarBuilder, n_layers: usize| -> Result<Vec<f32>> {
            if n_layers == 0 {
                return Ok(Vec::new());
            }
            get(
                &stack.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
                (buckets, heads),
                "weight",
            )
        };
        let shared = get(&vb.pp("shared"), (cfg.vocab_size, d), "weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(linear(&vb.pp("lm_head"), d, cfg.vocab_size)?)
        };
        Ok(Self {
            d,
            heads,
            d_kv,
            d_ff,
            vocab: cfg.vocab_size,
            eps: cfg.layer_norm_epsilon as f32,
            gated,
            act,
            num_buckets: buckets,
            max_distance: cfg.relative_attention_max_distance,
            enc_rel: rel(&enc_vb, enc.len())?,
            dec_rel: rel(&dec_vb, dec.len())?,
            enc_norm: get1(&enc_vb.pp("final_layer_norm"), d, "weight")?,
            dec_norm: get1(&dec_vb.pp("final_layer_norm"), d, "weight")?,
            shared,
            enc,
            dec,
            lm_head,
            output_scale: if cfg.tie_word_embeddings {
                (d as f32).powf(-0.5)
            } else {
                1.0
            },
        })
    }

    pub fn vocab(&self) -> usize {
        self.vocab
    }

    pub fn hidden(&self) -> usize {
        self.d
    }

    fn embed(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let d = self.d;
        let mut x = Vec::with_capacity(ids.len() * d);
        for &id in ids {
            let id = id as usize;
            if id >= self.vocab {
                bail!(
                    "token id {id} is out of range for the vocabulary of {}",
                    self.vocab
                );
            }
            x.extend_from_slice(&self.shared[id * d..(id + 1) * d]);
        }
        Ok(x)
    }

    /// `compute_bias`: `[heads, q_len, k_len]` for queries at `past..past + q_len`.
    fn position_bias(
        &self,
        table: &[f32],
        q_len: usize,
        k_len: usize,
        past: usize,
        bidirectional: bool,
    ) -> Vec<f32> {
        let h = self.heads;
        let mut out = vec![0f32; h * q_len * k_len];
        for i in 0..q_len {
            for j in 0..k_len {
                let rel = j as i64 - (past + i) as i64;
                let b = relative_bucket(rel, bidirectional, self.num_buckets, self.max_distance);
                for hd in 0..h {
                    out[(hd * q_len + i) * k_len + j] = table[b * h + hd];
                }
            }
        }
        out
    }

    fn norm(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        rms_norm_rows(x, w, self.eps)
    }

    /// `x += FF(norm(x))`.
    fn feed_forward(&self, l: &Layer, x: &mut [f32], rows: usize, par: bool) {
        let (d, f) = (self.d, self.d_ff);
        let h = self.norm(x, &l.ff_norm);
        let width = if self.gated { 2 * f } else { f };
        let mut hi = matmul(&h, rows, d, &l.wi, width, par);
        let inner = if self.gated {
            let mut g = vec![0f32; rows * f];
            for (gr, hr) in g.chunks_exact_mut(f).zip(hi.chunks_exact(2 * f)) {
                gr.copy_from_slice(&hr[..f]);
                rowops::activate(gr, self.act);
                mul_in_place(gr, &hr[f..]);
            }
            g
        } else {
            rowops::activate(&mut hi, self.act);
            hi
        };
        matmul_into(&inner, rows, f, &l.wo, d, x, true, par);
    }

    /// Encoder states `[b * s, d]` of `ids` `[b, s]` with 0/1 `keep` `[b, s]`.
    pub fn encode(&self, ids: &[u32], b: usize, s: usize, keep: &[f32]) -> Result<Vec<f32>> {
        let par = !in_worker() && rayon::current_num_threads() > 1;
        let (d, rows) = (self.d, b * s);
        let inner = self.heads * self.d_kv;
        let mut x = self.embed(ids)?;
        let bias = self.position_bias(&self.enc_rel, s, s, 0, true);
        for l in &self.enc {
            let h = self.norm(&x, &l.attn_norm);
            let qkv = matmul(&h, rows, d, &l.qkv, 3 * inner, par);
            let ctx = attend_sequences(
                &qkv,
                b,
                s,
                self.heads,
                self.d_kv,
                1.0,
                Some(&bias),
                keep,
                par,
            );
            matmul_into(&ctx, rows, inner, &l.o, d, &mut x, true, par);
            self.feed_forward(l, &mut x, rows, par);
        }
        Ok(self.norm(&x, &self.enc_norm))
    }

    /// A decoder state over encoder states `[b * src, d]` with their 0/1 `keep` `[b, src]`;
    /// one row per input.
    pub fn new_state(&self, enc: &[f32], b: usize, src: usize, keep: Vec<f32>) -> DecoderState {
        let par = !in_worker() && rayon::current_num_threads() > 1;
        let (d, dk, h) = (self.d, self.d_kv, self.heads);
        let inner = h * dk;
        let mut cross_k = Vec::with_capacity(self.dec.len());
        let mut cross_v = Vec::with_capacity(self.dec.len());
        for l in &self.dec {
            let c = l
                .cross
                .as_ref()
                .expect("decoder layers have cross-attention");
            let kv = matmul(enc, b * src, d, &c.kv, 2 * inner, par);
            let mut k = vec![0f32; b * h * src * dk];
            let mut v = vec![0f32; b * h * src * dk];
            for bi in 0..b {
                for t in 0..src {
                    let row = &kv[(bi * src + t) * 2 * inner..(bi * src + t + 1) * 2 * inner];
                    for hd in 0..h {
                        let to = ((bi * h + hd) * src + t) * dk;
                        k[to..to + dk].copy_from_slice(&row[hd * dk..(hd + 1) * dk]);
                        v[to..to + dk]
                            .copy_from_slice(&row[inner + hd * dk..inner + (hd + 1) * dk]);
                    }
                }
            }
            cross_k.push(k);
            cross_v.push(v);
        }
        DecoderState {
            len: 0,
            rows: b,
            self_kv: vec![KvBuffer::new(b, h, dk); self.dec.len()],
            cross_k,
            cross_v,
            keep,
            src,
            input_of: (0..b).collect(),
        }
    }

    /// Logits `[rows * s, vocab]` of decoder tokens `ids` `[rows, s]` after the cached ones.
    pub fn decode(&self, ids: &[u32], s: usize, st: &mut DecoderState) -> Result<Vec<f32>> {
        let rows = st.rows;
        if ids.len() != rows * s {
            bail!("{} decoder tokens for {rows} rows of {s}", ids.len());
        }
        let par = !in_worker() && rayon::current_num_threads() > 1;
        let (d, dk, h) = (self.d, self.d_kv, self.heads);
        let inner = h * dk;
        let n = rows * s;
        let mut x = self.embed(ids)?;
        let past = st.len;
        let total = past + s;
        let bias = self.position_bias(&self.dec_rel, s, total, past, false);
        let mut scores = vec![0f32; total.max(st.src)];
        for (li, l) in self.dec.iter().enumerate() {
            // Self-attention: cache this step's keys and values, then attend causally.
            let hn = self.norm(&x, &l.attn_norm);
            let qkv = matmul(&hn, n, d, &l.qkv, 3 * inner, par);
            let kv = &mut st.self_kv[li];
            kv.reserve(s);
            for r in 0..rows {
                for i in 0..s {
                    let row = &qkv[(r * s + i) * 3 * inner..(r * s + i + 1) * 3 * inner];
                    for hd in 0..h {
                        let k = &row[inner + hd * dk..inner + (hd + 1) * dk];
                        let v = &row[2 * inner + hd * dk..2 * inner + (hd + 1) * dk];
                        kv.put(r, hd, past + i, k, v);
                    }
                }
            }
            kv.set_len(total);
            let mut ctx = vec![0f32; n * inner];
            for r in 0..rows {
                for i in 0..s {
                    let keys = past + i + 1;
                    for hd in 0..h {
                        let q = &qkv[(r * s + i) * 3 * inner + hd * dk..][..dk];
                        let (ks, vs) = kv.get(r, hd, keys);
                        let b0 = (hd * s + i) * total;
                        attend_one(
                            q,
                            ks,
                            vs,
                            1.0,
                            &bias[b0..b0 + keys],
                            &[],
                            &mut scores[..keys],
                            &mut ctx[(r * s + i) * inner + hd * dk..][..dk],
                        );
                    }
                }
            }
            matmul_into(&ctx, n, inner, &l.o, d, &mut x, true, par);

            // Cross-attention over the row's input.
            let c = l
                .cross
                .as_ref()
                .expect("decoder layers have cross-attention");
            let hn = self.norm(&x, &c.norm);
            let q = matmul(&hn, n, d, &c.q, inner, par);
            let src = st.src;
            let (ck, cv) = (&st.cross_k[li], &st.cross_v[li]);
            ctx.fill(0.0);
            for r in 0..rows {
                let b = st.input_of[r];
                let keep = &st.keep[b * src..(b + 1) * src];
                for i in 0..s {
                    for hd in 0..h {
                        let kv0 = (b * h + hd) * src * dk;
                        attend_one(
                            &q[(r * s + i) * inner + hd * dk..][..dk],
                            &ck[kv0..kv0 + src * dk],
                            &cv[kv0..kv0 + src * dk],
                            1.0,
                            &[],
                            keep,
                            &mut scores[..src],
                            &mut ctx[(r * s + i) * inner + hd * dk..][..dk],
                        );
                    }
                }
            }
            matmul_into(&ctx, n, inner, &c.o, d, &mut x, true, par);
            self.feed_forward(l, &mut x, n, par);
        }
        st.len = total;
        let mut y = self.norm(&x, &self.dec_norm);
        if self.output_scale != 1.0 {
            y.iter_mut().for_each(|v| *v *= self.output_scale);
        }
        let head = self.lm_head.as_deref().unwrap_or(&self.shared);
        Ok(matmul(&y, n, d, head, self.vocab, par))
    }
}
