//! The Llama family (Llama, Mistral, Qwen2, SmolLM), as `modeling_llama.py`: RMSNorm pre-norm
//! layers, grouped-query attention with rotary position embeddings (`rope_theta`, `linear` and
//! `llama3` scaling), a SwiGLU MLP, tied or untied output embeddings, and Qwen2's q/k/v biases.
//! The same model is built from a GGUF file (see `gguf.rs`), with quantized projections.
//!
//! Which path runs where: f32 on CPU takes `forward_cpu`, over plain buffers through
//! `kernels::cpu` (products, RMSNorm, one query row of attention over a growing KV buffer,
//! SwiGLU); GPU and other dtypes take `forward_candle`. GGUF projections run on our block
//! kernels (`kernels::cpu::quantized`) on CPU and on candle's `QMatMul` elsewhere. A test at
//! the end checks that the two paths agree.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::causal_lm::{last_position, screen_logits, CausalLm, KvCache, Proj, RmsNorm};
use super::layers::sdpa;
use super::layers::Linear;
use crate::kernels::cpu::attention::{attend_causal, rms_norm, rms_norm_rows};
use crate::kernels::cpu::quantized::{QuantLinear, QuantMath};
use crate::kernels::cpu::rowops::{activate, mul_in_place, silu_mul, Activation};

fn default_theta() -> f64 {
    10000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    2048
}

/// `rope_scaling` in config.json.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RopeScaling {
    #[serde(alias = "type")]
    pub rope_type: String,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    #[serde(default)]
    pub original_max_position_embeddings: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Llama's switch for q/k/v/o biases; Qwen2 always has q/k/v biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// GGUF checkpoints store q/k rotated for interleaved (GPT-J style) RoPE.
    #[serde(skip)]
    pub rope_interleaved: bool,
    /// The MLP's gate activation: Llama's `hidden_act` (SiLU), Gemma's `hidden_activation`
    /// (tanh GELU).
    #[serde(default)]
    pub hidden_act: Option<Activation>,
    #[serde(default)]
    pub hidden_activation: Option<Activation>,
    /// Gemma 3: attention scores scaled by `query_pre_attn_scalar ** -0.5`.
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Gemma 3: the window of its `sliding_attention` layers (keys within the last
    /// `sliding_window` positions, the query's own included).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Gemma 3 before `layer_types`: every `sliding_window_pattern`-th layer is global.
    #[serde(default)]
    pub sliding_window_pattern: Option<usize>,
    /// Gemma 3: the RoPE base of the sliding layers (the global ones use `rope_theta`).
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
}

/// The names [`LlamaConfig::check_named`] gives the fields in its messages: config.json's, or
/// the GGUF metadata keys they were read from.
pub struct LlamaFieldNames<'a> {
    pub hidden_size: &'a str,
    pub num_attention_heads: &'a str,
    pub num_key_value_heads: &'a str,
    pub head_dim: &'a str,
}

impl crate::config::CheckedConfig for LlamaConfig {
    fn check(&self) -> std::result::Result<(), String> {
        self.check_named(&LlamaFieldNames {
            hidden_size: "hidden_size",
            num_attention_heads: "num_attention_heads",
            num_key_value_heads: "num_key_value_heads",
            head_dim: "head_dim",
        })
    }
}

impl LlamaConfig {
    /// What the attention code divides by and splits with: at least one head and one KV
    /// head, heads a multiple of the KV heads (each KV head serves a whole group of query
    /// heads), and a head size that is even (RoPE rotates pairs) and not 0, given or the
    /// hidden size split evenly by the heads.
    pub fn check_named(&self, n: &LlamaFieldNames) -> std::result::Result<(), String> {
        let heads = self.num_attention_heads;
        if heads == 0 {
            return Err(format!(
                "{} is 0; a model needs at least one head",
                n.num_attention_heads
            ));
        }
        let kv = self.kv_heads();
        if kv == 0 {
            return Err(format!(
                "{} is 0; a model needs at least one key/value head",
                n.num_key_value_heads
            ));
        }
        if !heads.is_multiple_of(kv) {
            return Err(format!(
                "{} {heads} is not a multiple of {} {kv} (each key/value head serves a \
                 group of query heads)",
                n.num_attention_heads, n.num_key_value_heads
            ));
        }
        match self.head_dim {
            Some(d) if d == 0 || d % 2 == 1 => Err(format!(
                "{} is {d}; the head size must be even and at least 2 (RoPE rotates pairs)",
                n.head_dim
            )),
            Some(_) => Ok(()),
            None => {
                crate::config::check_heads(
                    n.hidden_size,
                    self.hidden_size,
                    n.num_attention_heads,
                    heads,
                )?;
                let d = self.hidden_size / heads;
                if d == 0 || d % 2 == 1 {
                    return Err(format!(
                        "{} {} over {} {heads} gives heads of size {d}; the head size must \
                         be even and at least 2 (RoPE rotates pairs)",
                        n.hidden_size, self.hidden_size, n.num_attention_heads
                    ));
                }
                Ok(())
            }
        }
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or_else(|| self.hidden_size / self.num_attention_heads.max(1))
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Gemma 3 (`gemma3_text` in config.json, `gemma3` in GGUF): the same stack with q/k
    /// norms, norms after attention and MLP, scaled embeddings and sliding-window layers.
    pub fn is_gemma3(&self) -> bool {
        matches!(self.model_type.as_str(), "gemma3_text" | "gemma3")
    }

    pub fn activation(&self) -> Activation {
        self.hidden_activation
            .or(self.hidden_act)
            .unwrap_or(Activation::Silu)
    }

    /// The attention scores' scale.
    pub fn attn_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(q) => q.powf(-0.5),
            None => 1.0 / (self.head_dim() as f64).sqrt(),
        }
    }

    /// Per layer: whether it attends within `sliding_window` only (Gemma 3's
    /// `sliding_attention` layers; as HF, every layer is global for the other types).
    pub fn sliding_layers(&self) -> Vec<bool> {
        let n = self.num_hidden_layers;
        if !self.is_gemma3() || self.sliding_window.is_none() {
            return vec![false; n];
        }
        match &self.layer_types {
            Some(t) => (0..n)
                .map(|i| t.get(i).is_some_and(|t| t == "sliding_attention"))
                .collect(),
            None => {
                let p = self.sliding_window_pattern.unwrap_or(6).max(1);
                (0..n).map(|i| (i + 1) % p != 0).collect()
            }
        }
    }

    /// HF's `ROPE_INIT_FUNCTIONS`: the inverse frequencies, in f32 as torch computes them.
    pub fn inv_freq(&self) -> candle_core::Result<Vec<f32>> {
        let d = self.head_dim();
        let base = self.rope_theta as f32;
        let inv: Vec<f32> = (0..d)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / d as f32))
            .collect();
        let Some(s) = &self.rope_scaling else {
            return Ok(inv);
        };
        let factor = s.factor.unwrap_or(1.0) as f32;
        match s.rope_type.as_str() {
            "default" => Ok(inv),
            "linear" => Ok(inv.iter().map(|f| f / factor).collect()),
            "llama3" => {
                let low = s.low_freq_factor.unwrap_or(1.0) as f32;
                let high = s.high_freq_factor.unwrap_or(4.0) as f32;
                let old = s.original_max_position_embeddings.unwrap_or(8192) as f32;
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                Ok(inv
                    .iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen > low_wavelen {
                            f / factor
                        } else if wavelen < high_wavelen {
                            f
                        } else {
                            let smooth = (old / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect())
            }
            other => candle_core::bail!(
                "rope_scaling type `{other}` is not supported (default, linear, llama3)"
            ),
        }
    }
}

/// cos/sin tables `[b, s, head_dim/2]` for the given positions.
pub struct Rotary {
    inv_freq: Vec<f32>,
    interleaved: bool,
}

impl Rotary {
    fn new(cfg: &LlamaConfig) -> Result<Self> {
        Ok(Self {
            inv_freq: cfg.inv_freq()?,
            interleaved: cfg.rope_interleaved,
        })
    }

    /// cos and sin of `pos * inv_freq` (f32, as torch), `[positions, head_dim/2]` each.
    fn angles(&self, pos: &[u32]) -> (Vec<f32>, Vec<f32>) {
        let n = pos.len() * self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for &p in pos {
            for f in &self.inv_freq {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        (cos, sin)
    }

    fn cos_sin(&self, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let (b, s) = position_ids.dims2()?;
        let pos: Vec<u32> = position_ids.flatten_all()?.to_vec1()?;
        let half = self.inv_freq.len();
        let (cos, sin) = self.angles(&pos);
        let dev = position_ids.device();
        Ok((
            Tensor::from_vec(cos, (b, s, half), dev)?.to_dtype(dtype)?,
            Tensor::from_vec(sin, (b, s, half), dev)?.to_dtype(dtype)?,
        ))
    }

    fn apply(&self, xs: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(xs, cos, sin)
        } else {
            candle_nn::rotary_emb::rope(xs, cos, sin)
        }
    }
}

/// A forward pass's rotation angles: `cos`/`sin` for the keys, and for the queries the same
/// times the attention scale (a rotation is linear, so `rope(q, c*s, n*s) = s * rope(q, c, n)`:
/// the scale is applied once per pass instead of once per layer; exact for the usual power-of-two
/// scales, within rounding otherwise).
struct Angles {
    cos: Tensor,
    sin: Tensor,
    cos_q: Tensor,
    sin_q: Tensor,
}

impl Angles {
    fn new((cos, sin): (Tensor, Tensor), scale: f64) -> Result<Self> {
        Ok(Self {
            cos_q: (&cos * scale)?,
            sin_q: (&sin * scale)?,
            cos,
            sin,
        })
    }
}

struct Attention {
    /// q, k and v stacked, when they can be (GGUF blocks): one product instead of three.
    qkv_proj: Option<Proj>,
    q_proj: Proj,
    k_proj: Proj,
    v_proj: Proj,
    o_proj: Proj,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
    /// Gemma 3's RMSNorms over each head's query and key, before the rotation.
    qk_norms: Option<(RmsNorm, RmsNorm)>,
    scale: f64,
    /// Attends within the model's sliding window only, with the local rotation.
    sliding: bool,
}

impl Attention {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        xs: &Tensor,
        angles: &Angles,
        rotary: &Rotary,
        bias: &Tensor,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, s, _) = xs.dims3()?;
        let heads = |t: Tensor, n: usize| -> Result<Tensor> {
            t.reshape((b, s, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = match &self.qkv_proj {
            Some(p) => {
                let y = p.forward(xs)?;
                let (nq, nk) = (
                    self.num_heads * self.head_dim,
                    self.num_kv_heads * self.head_dim,
                );
                (
                    y.narrow(2, 0, nq)?,
                    y.narrow(2, nq, nk)?,
                    y.narrow(2, nq + nk, nk)?,
                )
            }
            None => (
                self.q_proj.forward(xs)?,
                self.k_proj.forward(xs)?,
                self.v_proj.forward(xs)?,
            ),
        };
        let mut q = heads(q, self.num_heads)?;
        let mut k = heads(k, self.num_kv_heads)?;
        let v = heads(v, self.num_kv_heads)?;
        if let Some((qn, kn)) = &self.qk_norms {
            q = qn.forward(&q)?;
            k = kn.forward(&k)?;
        }
        // The query's rotation carries the scores' scale (`angles`): no scaling op per layer.
        let q = rotary.apply(&q, &angles.cos_q, &angles.sin_q)?;
        let k = rotary.apply(&k, &angles.cos, &angles.sin)?;
        let (k, v) = cache.append(layer, &k, &v)?;
        let ctx = sdpa(&q, &k, &v, bias, 1.0)?;
        self.o_proj.forward(&ctx)
    }
}

struct Mlp {
    /// gate and up stacked, when they can be.
    gate_up_proj: Option<Proj>,
    gate_proj: Proj,
    up_proj: Proj,
    down_proj: Proj,
    act: Activation,
}

impl Module for Mlp {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let (gate, up) = match &self.gate_up_proj {
            Some(p) => {
                let y = p.forward(xs)?;
                let i = y.dim(D::Minus1)? / 2;
                (y.narrow(D::Minus1, 0, i)?, y.narrow(D::Minus1, i, i)?)
            }
            None => (self.gate_proj.forward(xs)?, self.up_proj.forward(xs)?),
        };
        let gate = match self.act {
            Activation::Silu => gate.silu()?,
            act => act.forward(&gate)?,
        };
        self.down_proj.forward(&(gate * up)?)
    }
}

struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    /// The norm before the MLP (Gemma's `pre_feedforward_layernorm`).
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
    /// Gemma 3's norms of the attention's and the MLP's outputs, before each residual sum.
    out_norms: Option<(RmsNorm, RmsNorm)>,
    /// The norms' weights as f32, for the CPU path.
    norms: LayerNorms,
}

/// A layer's RMSNorm weights as f32 (the CPU path).
struct LayerNorms {
    input: Vec<f32>,
    pre_mlp: Vec<f32>,
    /// q and k (per head), attention output, MLP output: Gemma 3.
    qk: Option<(Vec<f32>, Vec<f32>)>,
    out: Option<(Vec<f32>, Vec<f32>)>,
}

/// The parts of a Llama model, so that GGUF loading can assemble one from its own tensors.
pub struct LlamaParts {
    pub embed_tokens: EmbedTable,
    pub layers: Vec<LlamaLayerParts>,
    pub norm: Tensor,
    pub lm_head: Proj,
}

/// The token embedding table: dense, or GGUF blocks expanded row by row on lookup (no f32
/// copy of a 49k x 576 table kept in memory).
pub enum EmbedTable {
    Dense(Tensor),
    Blocks(QuantLinear),
}

impl EmbedTable {
    fn forward(&self, input_ids: &Tensor, hidden: usize, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(t) => Embedding::new(t.clone(), hidden).forward(input_ids),
            Self::Blocks(q) => {
                let dims = input_ids.dims().to_vec();
                let ids: Vec<u32> = input_ids.flatten_all()?.to_vec1()?;
                let mut out_dims = dims;
                out_dims.push(hidden);
                q.embed(&ids, input_ids.device())?
                    .to_dtype(dtype)?
                    .reshape(out_dims)
            }
        }
    }
}

/// One layer's weights. Norm weights are the factors the normalised rows are multiplied by
/// (Gemma's `1 + weight`, as GGUF files store them).
pub struct LlamaLayerParts {
    pub input_layernorm: Tensor,
    pub q_proj: Proj,
    pub k_proj: Proj,
    pub v_proj: Proj,
    pub o_proj: Proj,
    /// The norm before the MLP.
    pub post_attention_layernorm: Tensor,
    pub gate_proj: Proj,
    pub up_proj: Proj,
    pub down_proj: Proj,
    /// Gemma 3: q and k norms (per head).
    pub qk_norms: Option<(Tensor, Tensor)>,
    /// Gemma 3: the norms of the attention output and of the MLP output.
    pub out_norms: Option<(Tensor, Tensor)>,
}

pub struct Llama {
    embed_tokens: EmbedTable,
    hidden: usize,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Proj,
    rotary: Rotary,
    max_positions: usize,
    device: Device,
    dtype: DType,
    /// The final norm's weight as f32 and the norms' epsilon, for the CPU path.
    norm_f32: Vec<f32>,
    eps: f32,
    /// Gemma 3: the sliding layers' rotation, the window, the embeddings' scale and the
    /// logits' soft cap.
    local_rotary: Option<Rotary>,
    window: Option<usize>,
    embed_scale: Option<f32>,
    softcap: Option<f32>,
    /// The CPU path keeps keys and values in f16, as llama.cpp does: GGUF weights in the int8
    /// mode, whose numbers follow llama.cpp's rather than transformers' (f32 with
    /// `FERROFORMERS_KV_F32=1`).
    kv_f16: bool,
    /// [`CausalLm::make_batch_invariant`] was called: attention takes one f32 order per query
    /// row, whatever the pass (the projections' panels see to theirs).
    batch_invariant: bool,
}

fn dense(vb: &VarBuilder, out_dim: usize, in_dim: usize, bias: bool) -> Result<Proj> {
    let w = vb.get((out_dim, in_dim), "weight")?;
    let b = if bias {
        Some(vb.get(out_dim, "bias")?)
    } else {
        None
    };
    Ok(Proj::Dense(Linear::new(w, b)?))
}

impl Llama {
    pub fn load(cfg: &LlamaConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.kv_heads(), cfg.head_dim());
        let qkv_bias = cfg.model_type == "qwen2" || cfg.attention_bias;
        let gemma = cfg.is_gemma3();
        // Gemma's RMSNorm multiplies by `1 + weight` (summed in f32).
        let norm = |vb: VarBuilder, n: usize| -> Result<Tensor> {
            let w = vb.get(n, "weight")?;
            if gemma {
                (w.to_dtype(DType::F32)? + 1.0)?.to_dtype(w.dtype())
            } else {
                Ok(w)
            }
        };
        let m = vb.pp("model");
        let embed_tokens = m.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| {
                let lb = m.pp("layers").pp(l);
                let att = lb.pp("self_attn");
                let mlp = lb.pp("mlp");
                let (pre_mlp, qk_norms, out_norms) = if gemma {
                    (
                        norm(lb.pp("pre_feedforward_layernorm"), h)?,
                        Some((norm(att.pp("q_norm"), hd)?, norm(att.pp("k_norm"), hd)?)),
                        Some((
                            norm(lb.pp("post_attention_layernorm"), h)?,
                            norm(lb.pp("post_feedforward_layernorm"), h)?,
                        )),
                    )
                } else {
                    (norm(lb.pp("post_attention_layernorm"), h)?, None, None)
                };
                Ok(LlamaLayerParts {
                    input_layernorm: norm(lb.pp("input_layernorm"), h)?,
                    q_proj: dense(&att.pp("q_proj"), nh * hd, h, qkv_bias)?,
                    k_proj: dense(&att.pp("k_proj"), nkv * hd, h, qkv_bias)?,
                    v_proj: dense(&att.pp("v_proj"), nkv * hd, h, qkv_bias)?,
                    o_proj: dense(&att.pp("o_proj"), h, nh * hd, cfg.attention_bias)?,
                    post_attention_layernorm: pre_mlp,
                    gate_proj: dense(&mlp.pp("gate_proj"), i, h, false)?,
                    up_proj: dense(&mlp.pp("up_proj"), i, h, false)?,
                    down_proj: dense(&mlp.pp("down_proj"), h, i, false)?,
                    qk_norms,
                    out_norms,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings || !vb.contains_tensor("lm_head.weight") {
            Proj::Dense(Linear::new(embed_tokens.clone(), None)?)
        } else {
            dense(&vb.pp("lm_head"), cfg.vocab_size, h, false)?
        };
        let parts = LlamaParts {
            embed_tokens: EmbedTable::Dense(embed_tokens),
            layers,
            norm: norm(m.pp("norm"), h)?,
            lm_head,
        };
        Self::from_parts(cfg, parts, vb.device(), vb.dtype())
    }

    pub fn from_parts(
        cfg: &LlamaConfig,
        p: LlamaParts,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let eps = cfg.rms_norm_eps;
        let sliding = cfg.sliding_layers();
        let kv_f16 = device.is_cpu()
            && p.layers.first().is_some_and(
                |l| matches!(&l.q_proj, Proj::Blocks(q, _) if q.math() == QuantMath::Int8),
            )
            && !crate::kernels::cpu::switch_on("FERROFORMERS_KV_F32");
        let pair = |p: Option<(Tensor, Tensor)>| {
            p.map(|(a, b)| (RmsNorm::new(a, eps), RmsNorm::new(b, eps)))
        };
        let f32s = |p: &Option<(RmsNorm, RmsNorm)>| -> Result<Option<(Vec<f32>, Vec<f32>)>> {
            p.as_ref()
                .map(|(a, b)| Ok((a.parts()?.0, b.parts()?.0)))
                .transpose()
        };
        let layers = p
            .layers
            .into_iter()
            .enumerate()
            .map(|(li, l)| -> Result<DecoderLayer> {
                let input_layernorm = RmsNorm::new(l.input_layernorm, eps);
                let post_attention_layernorm = RmsNorm::new(l.post_attention_layernorm, eps);
                let (qk_norms, out_norms) = (pair(l.qk_norms), pair(l.out_norms));
                let norms = LayerNorms {
                    input: input_layernorm.parts()?.0,
                    pre_mlp: post_attention_layernorm.parts()?.0,
                    qk: f32s(&qk_norms)?,
                    out: f32s(&out_norms)?,
                };
                Ok(DecoderLayer {
                    norms,
                    out_norms,
                    input_layernorm,
                    self_attn: Attention {
                        qkv_proj: Proj::stack(&[&l.q_proj, &l.k_proj, &l.v_proj])?,
                        q_proj: l.q_proj,
                        k_proj: l.k_proj,
                        v_proj: l.v_proj,
                        o_proj: l.o_proj,
                        num_heads: cfg.num_attention_heads,
                        num_kv_heads: cfg.kv_heads(),
                        head_dim: cfg.head_dim(),
                        qk_norms,
                        scale: cfg.attn_scale(),
                        sliding: sliding.get(li).copied().unwrap_or(false),
                    },
                    post_attention_layernorm,
                    mlp: Mlp {
                        gate_up_proj: Proj::stack(&[&l.gate_proj, &l.up_proj])?,
                        gate_proj: l.gate_proj,
                        up_proj: l.up_proj,
                        down_proj: l.down_proj,
                        act: cfg.activation(),
                    },
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::new(p.norm, eps);
        Ok(Self {
            embed_tokens: p.embed_tokens,
            hidden: cfg.hidden_size,
            layers,
            norm_f32: norm.parts()?.0,
            eps: eps as f32,
            norm,
            lm_head: p.lm_head,
            rotary: Rotary::new(cfg)?,
            local_rotary: if cfg.is_gemma3() {
                Some(Rotary::new(&LlamaConfig {
                    rope_theta: cfg.rope_local_base_freq.unwrap_or(10000.0),
                    rope_scaling: None,
                    ..cfg.clone()
                })?)
            } else {
                None
            },
            window: cfg.sliding_window.filter(|_| sliding.iter().any(|&s| s)),
            // HF: `hidden_size ** 0.5` as an f32 tensor.
            embed_scale: cfg
                .is_gemma3()
                .then(|| (cfg.hidden_size as f64).sqrt() as f32),
            softcap: cfg.final_logit_softcapping.map(|c| c as f32),
            max_positions: cfg.max_position_embeddings,
            device: device.clone(),
            dtype,
            kv_f16,
            batch_invariant: false,
        })
    }

    /// [`Self::projections`], to change.
    fn projections_mut(&mut self) -> Vec<&mut Proj> {
        let mut all = Vec::new();
        for l in &mut self.layers {
            let (at, mlp) = (&mut l.self_attn, &mut l.mlp);
            match &mut at.qkv_proj {
                Some(p) => all.push(p),
                None => all.extend([&mut at.q_proj, &mut at.k_proj, &mut at.v_proj]),
            }
            all.push(&mut at.o_proj);
            match &mut mlp.gate_up_proj {
                Some(p) => all.push(p),
                None => all.extend([&mut mlp.gate_proj, &mut mlp.up_proj]),
            }
            all.push(&mut mlp.down_proj);
        }
        all.push(&mut self.lm_head);
        all
    }

    /// Every projection of the model, the output one last.
    fn projections(&self) -> Vec<&Proj> {
        let mut all = Vec::new();
        for l in &self.layers {
            let (at, mlp) = (&l.self_attn, &l.mlp);
            match &at.qkv_proj {
                Some(p) => all.push(p),
                None => all.extend([&at.q_proj, &at.k_proj, &at.v_proj]),
            }
            all.push(&at.o_proj);
            match &mlp.gate_up_proj {
                Some(p) => all.push(p),
                None => all.extend([&mlp.gate_proj, &mlp.up_proj]),
            }
            all.push(&mlp.down_proj);
        }
        all.push(&self.lm_head);
        all
    }
}

impl Rotary {
    /// Rotate one head's `x` in place at the angles `pos * inv_freq` (`cos`, `sin`).
    fn rotate(&self, x: &mut [f32], cos: &[f32], sin: &[f32]) {
        let half = cos.len();
        if self.interleaved {
            for i in 0..half {
                let (a, b) = (x[2 * i], x[2 * i + 1]);
                x[2 * i] = a * cos[i] - b * sin[i];
                x[2 * i + 1] = a * sin[i] + b * cos[i];
            }
        } else {
            for i in 0..half {
                let (a, b) = (x[i], x[i + half]);
                x[i] = a * cos[i] - b * sin[i];
                x[i + half] = b * cos[i] + a * sin[i];
            }
        }
    }
}

impl Llama {
    /// The forward pass over plain f32 buffers (CPU, f32 activations): the same arithmetic as
    /// the candle path ([`Self::forward_candle`]) without its ~25 small tensor ops (and their
    /// allocations) per layer, and a KV cache that grows in place instead of being concatenated
    /// every step.
    fn forward_cpu(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        let (b, s) = input_ids.dims2()?;
        let n = b * s;
        // One new token in each of several rows: a batched decoding step.
        let step = s == 1 && b > 1;
        let h = self.hidden;
        let Some(first) = self.layers.first() else {
            candle_core::bail!("the model has no layers");
        };
        let (nh, nkv, hd) = (
            first.self_attn.num_heads,
            first.self_attn.num_kv_heads,
            first.self_attn.head_dim,
        );
        let (q_w, kv_w) = (nh * hd, nkv * hd);
        let group = nh / nkv;
        let scale = first.self_attn.scale as f32;
        let total = bias.dim(3)?;
        let past = total - s;
        let bias: Vec<f32> = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let local_bias = self.window.map(|w| {
            let mut v = bias.clone();
            window_bias(&mut v, s, total, w);
            v
        });
        let pos: Vec<u32> = position_ids.flatten_all()?.to_vec1()?;
        let half = self.rotary.inv_freq.len();
        let (cos, sin) = self.rotary.angles(&pos);
        let local = self.local_rotary.as_ref().map(|r| (r, r.angles(&pos)));
        let mut x: Vec<f32> = self
            .embed_tokens
            .forward(input_ids, h, DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        if let Some(sc) = self.embed_scale {
            x.iter_mut().for_each(|v| *v *= sc);
        }
        let bufs = cache.buffers(b, nkv, hd, self.kv_f16)?;
        if bufs
            .first()
            .is_some_and(|kv| kv.len() != past || kv.rows() != b)
        {
            candle_core::bail!("the KV cache does not match the attention bias");
        }
        for (layer, kv) in self.layers.iter().zip(bufs.iter_mut()) {
            if super::causal_lm::layer_boundary() {
                candle_core::bail!("the pass was stopped between two layers");
            }
            let at = &layer.self_attn;
            let (rotary, (cos, sin), bias) = match (&local, &local_bias) {
                (Some((r, (c, sn))), Some(b)) if at.sliding => (*r, (c, sn), b),
                _ => (&self.rotary, (&cos, &sin), &bias),
            };
            let hn = rms_norm_rows(&x, &layer.norms.input, self.eps);
            let mut qkv = match &at.qkv_proj {
                Some(p) => p.forward_rows(&hn, n, step)?,
                None => {
                    let (q, k, v) = (
                        at.q_proj.forward_rows(&hn, n, step)?,
                        at.k_proj.forward_rows(&hn, n, step)?,
                        at.v_proj.forward_rows(&hn, n, step)?,
                    );
                    let mut out = Vec::with_capacity(n * (q_w + 2 * kv_w));
                    for t in 0..n {
                        out.extend_from_slice(&q[t * q_w..(t + 1) * q_w]);
                        out.extend_from_slice(&k[t * kv_w..(t + 1) * kv_w]);
                        out.extend_from_slice(&v[t * kv_w..(t + 1) * kv_w]);
                    }
                    out
                }
            };
            let width = q_w + 2 * kv_w;
            kv.reserve(s);
            for t in 0..n {
                let (c, sn) = (
                    &cos[t * half..(t + 1) * half],
                    &sin[t * half..(t + 1) * half],
                );
                let row = &mut qkv[t * width..(t + 1) * width];
                for (hi, head) in row[..q_w + kv_w].chunks_exact_mut(hd).enumerate() {
                    if let Some((qn, kn)) = &layer.norms.qk {
                        rms_norm(head, if hi < nh { qn } else { kn }, self.eps);
                    }
                    rotary.rotate(head, c, sn);
                }
                let (r, i) = (t / s, t % s);
                for g in 0..nkv {
                    let k = &row[q_w + g * hd..q_w + (g + 1) * hd];
                    let v = &row[q_w + kv_w + g * hd..q_w + kv_w + (g + 1) * hd];
                    kv.put(r, g, past + i, k, v);
                }
            }
            kv.set_len(total);
            let ctx = attend_causal(
                &qkv,
                (width, n, s, past),
                (nh, group, hd),
                kv,
                (bias, total),
                scale,
                self.batch_invariant,
            );
            let mut o = at.o_proj.forward_rows(&ctx, n, step)?;
            if let Some((on, _)) = &layer.norms.out {
                o = rms_norm_rows(&o, on, self.eps);
            }
            x.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
            let hn = rms_norm_rows(&x, &layer.norms.pre_mlp, self.eps);
            let mlp = &layer.mlp;
            let (gate, up, inter) = match &mlp.gate_up_proj {
                Some(p) => {
                    let gu = p.forward_rows(&hn, n, step)?;
                    let inter = gu.len() / n / 2;
                    let (mut g, mut u) =
                        (Vec::with_capacity(n * inter), Vec::with_capacity(n * inter));
                    for row in gu.chunks_exact(2 * inter) {
                        g.extend_from_slice(&row[..inter]);
                        u.extend_from_slice(&row[inter..]);
                    }
                    (g, u, inter)
                }
                None => {
                    let g = mlp.gate_proj.forward_rows(&hn, n, step)?;
                    let inter = g.len() / n;
                    (g, mlp.up_proj.forward_rows(&hn, n, step)?, inter)
                }
            };
            let mut act = gate;
            if mlp.act == Activation::Silu {
                silu_mul(&mut act, &up);
            } else {
                activate(&mut act, mlp.act);
                mul_in_place(&mut act, &up);
            }
            let mut down = mlp.down_proj.forward_rows(&act, n, step)?;
            debug_assert_eq!(act.len(), n * inter);
            if let Some((_, mn)) = &layer.norms.out {
                down = rms_norm_rows(&down, mn, self.eps);
            }
            x.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        }
        let (x, rows_out) = if last_only {
            let mut last = Vec::with_capacity(b * h);
            for r in 0..b {
                last.extend_from_slice(&x[((r + 1) * s - 1) * h..(r + 1) * s * h]);
            }
            (last, 1)
        } else {
            (x, s)
        };
        let y = rms_norm_rows(&x, &self.norm_f32, self.eps);
        let screened = match (&self.lm_head, cache.screen()) {
            (Proj::Blocks(q, None), Some(always)) if last_only => {
                q.matmul_screened(&y, b * rows_out, always)
            }
            _ => None,
        };
        let mut logits = match screened {
            Some(l) => l,
            None => self.lm_head.forward_rows(&y, b * rows_out, step)?,
        };
        if let Some(cap) = self.softcap {
            logits.iter_mut().for_each(|l| *l = (*l / cap).tanh() * cap);
        }
        let vocab = logits.len() / (b * rows_out);
        Tensor::from_vec(logits, (b, rows_out, vocab), &self.device)
    }
}

impl CausalLm for Llama {
    fn forward(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        if self.device.is_cpu() && self.dtype == DType::F32 {
            return self.forward_cpu(input_ids, position_ids, bias, cache, last_only);
        }
        self.forward_candle(input_ids, position_ids, bias, cache, last_only)
    }

    fn num_layers(&self) -> usize {
        self.layers.len()
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.max_positions)
    }

    fn prepare_batched_steps(&self) {
        if !(self.device.is_cpu() && self.dtype == DType::F32) {
            return;
        }
        self.projections().iter().for_each(|p| p.keep_panels());
    }

    fn batch_invariance_costs_nothing(&self) -> bool {
        self.device.is_cpu()
            && self.dtype == DType::F32
            && self
                .projections()
                .iter()
                .all(|p| p.batch_invariance_costs_nothing())
    }

    /// On CPU in f32 with every projection in GGUF blocks of the int8 mode (VNNI panels):
    /// the projections multiply their kept panels at any number of rows
    /// ([`QuantLinear::make_batch_invariant`]), and attention runs every query row, prompts
    /// included, through the decoding kernel from the row's first unmasked key (so a key's
    /// lane never depends on another row's padding). Norms, rotations and the rest are per row
    /// already.
    fn make_batch_invariant(&mut self) -> std::result::Result<(), String> {
        if !(self.device.is_cpu() && self.dtype == DType::F32) {
            return Err("batch-invariant arithmetic runs on the CPU in f32 only".into());
        }
        let projections = self.projections();
        if let Some(why) = projections
            .iter()
            .find_map(|p| p.batch_invariance_problem())
        {
            return Err(why);
        }
        for p in self.projections_mut() {
            p.make_batch_invariant()?;
        }
        self.batch_invariant = true;
        Ok(())
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

impl Llama {
    /// The forward pass in candle ops: GPU, and dtypes other than f32.
    fn forward_candle(
        &self,
        input_ids: &Tensor,
        position_ids: &Tensor,
        bias: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Tensor> {
        let mut xs = self
            .embed_tokens
            .forward(input_ids, self.hidden, self.dtype)?;
        if let Some(sc) = self.embed_scale {
            xs = (xs * sc as f64)?;
        }
        // Every layer has the model's one attention scale.
        let scale = self.layers.first().map_or(1.0, |l| l.self_attn.scale);
        let global = Angles::new(self.rotary.cos_sin(position_ids, self.dtype)?, scale)?;
        let local = match (&self.local_rotary, self.window) {
            (Some(r), Some(w)) => {
                let (b, one, s, t) = bias.dims4()?;
                let mut v: Vec<f32> = bias.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                window_bias(&mut v, s, t, w);
                let lb =
                    Tensor::from_vec(v, (b, one, s, t), bias.device())?.to_dtype(self.dtype)?;
                let angles = Angles::new(r.cos_sin(position_ids, self.dtype)?, scale)?;
                Some((r, angles, lb))
            }
            _ => None,
        };
        // In the scores' dtype once, not in every layer (`sdpa` casts it to theirs).
        let bias = &bias.to_dtype(self.dtype)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let (rotary, angles, bias) = match &local {
                Some((r, cs, lb)) if layer.self_attn.sliding => (*r, cs, lb),
                _ => (&self.rotary, &global, bias),
            };
            let residual = &xs;
            let h = layer.input_layernorm.forward(&xs)?;
            let mut h = layer
                .self_attn
                .forward(&h, angles, rotary, bias, cache, i)?;
            if let Some((on, _)) = &layer.out_norms {
                h = on.forward(&h)?;
            }
            let xs1 = (residual + h)?;
            let mut h = layer
                .mlp
                .forward(&layer.post_attention_layernorm.forward(&xs1)?)?;
            if let Some((_, mn)) = &layer.out_norms {
                h = mn.forward(&h)?;
            }
            xs = (xs1 + h)?;
        }
        if last_only {
            xs = last_position(&xs)?;
        }
        let xs = self.norm.forward(&xs)?;
        let logits = self.lm_head.forward(&xs)?.to_dtype(DType::F32)?;
        let logits = match self.softcap {
            Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?,
            None => logits,
        };
        match cache.screen() {
            Some(always) if last_only => screen_logits(&logits, always),
            _ => Ok(logits),
        }
    }
}

/// Gemma 3's sliding layers: besides the causal bias, a query at cache position `q` sees only
/// the keys at positions `j > q - window` (HF's `sliding_window_overlay`; positions count the
/// padding). `bias`: rows of `total` keys, `s` query rows per sequence, the last `s` new.
fn window_bias(bias: &mut [f32], s: usize, total: usize, window: usize) {
    let past = total - s;
    for (r, row) in bias.chunks_exact_mut(total).enumerate() {
        let q = past + r % s;
        for v in row.iter_mut().take((q + 1).saturating_sub(window)) {
            *v = f32::MIN;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::causal_lm::causal_bias;

    /// A tiny random decoder of `tests/fixtures/decoders/models`: its folder and config.
    fn fixture(name: &str) -> (std::path::PathBuf, LlamaConfig) {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/decoders/models")
            .join(name);
        let cfg = crate::config::ModelConfig::from_dir(&dir)
            .unwrap()
            .parse()
            .unwrap();
        (dir, cfg)
    }

    /// Both paths over a left-padded batch of two prompts (the padded positions' own outputs
    /// are left out), then decoding steps past the KV buffers' first capacity with the rows
    /// reordered and repeated (beams) in between.
    #[test]
    fn cpu_path_matches_candle_path() {
        let dev = Device::Cpu;
        for name in ["llama", "llama3-rope", "qwen2", "gemma3"] {
            let (dir, cfg) = fixture(name);
            let vb = crate::weights::Weights::from_dir(&dir)
                .unwrap()
                .into_var_builder(DType::F32, &dev);
            let model = Llama::load(&cfg, vb).unwrap();
            let v = cfg.vocab_size as u32;
            let mut mask = vec![vec![1u8; 6], vec![0, 0, 1, 1, 1, 1]];
            let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % v).collect();
            let ids = Tensor::from_vec(ids, (2, 6), &dev).unwrap();
            // HF's positions: cumsum(mask) - 1, pads at 1.
            let pos: Vec<u32> = mask
                .iter()
                .flat_map(|m| {
                    let mut c = 0u32;
                    m.iter()
                        .map(|&x| {
                            c += x as u32;
                            if x == 0 {
                                1
                            } else {
                                c - 1
                            }
                        })
                        .collect::<Vec<_>>()
                })
                .collect();
            let pos = Tensor::from_vec(pos, (2, 6), &dev).unwrap();
            let bias = causal_bias(&mask, 6, &dev).unwrap();
            let (mut ca, mut cb) = (
                KvCache::new(model.num_layers()),
                KvCache::new(model.num_layers()),
            );
            let la = model
                .forward_cpu(&ids, &pos, &bias, &mut ca, false)
                .unwrap();
            let lb = model
                .forward_candle(&ids, &pos, &bias, &mut cb, false)
                .unwrap();
            // Positions that are padding attend to nothing (garbage either way): skip them.
            for (row, pads) in [(0, 0), (1, 2)] {
                let (a, b) = (
                    la.get(row).unwrap().narrow(0, pads, 6 - pads).unwrap(),
                    lb.get(row).unwrap().narrow(0, pads, 6 - pads).unwrap(),
                );
                let d = crate::models::max_abs_diff(&a, &b);
                assert!(d < 1e-4, "{name} prompt row {row}: {d}");
            }
            let mut tokens = vec![3u32, 4];
            for step in 0..20u32 {
                if step == 3 {
                    // Two rows -> three: row 1 twice, then row 0.
                    ca.select_rows(&[1, 1, 0]).unwrap();
                    cb.select_rows(&[1, 1, 0]).unwrap();
                    mask = vec![mask[1].clone(), mask[1].clone(), mask[0].clone()];
                    tokens = vec![tokens[1], tokens[1], tokens[0]];
                }
                let b = tokens.len();
                let mut pos = Vec::with_capacity(b);
                for m in mask.iter_mut() {
                    m.push(1);
                    pos.push(m.iter().map(|&x| x as u32).sum::<u32>() - 1);
                }
                let ids = Tensor::from_vec(tokens.clone(), (b, 1), &dev).unwrap();
                let pos = Tensor::from_vec(pos, (b, 1), &dev).unwrap();
                let bias = causal_bias(&mask, 1, &dev).unwrap();
                let la = model.forward_cpu(&ids, &pos, &bias, &mut ca, true).unwrap();
                let lb = model
                    .forward_candle(&ids, &pos, &bias, &mut cb, true)
                    .unwrap();
                let d = crate::models::max_abs_diff(&la, &lb);
                assert!(d < 1e-4, "{name} step {step}: {d}");
                tokens = (0..b as u32).map(|i| (step * 13 + i * 7 + 2) % v).collect();
            }
            assert_eq!(ca.seq_len(), 26);
            assert_eq!(cb.seq_len(), 26);
        }
    }

    /// With an f16 KV cache (the int8 GGUF mode's) the logits stay within f16 rounding of the
    /// f32 cache's, through a prompt and batched steps.
    #[test]
    fn f16_kv_cache_rounds_only_keys_and_values() {
        let dev = Device::Cpu;
        for name in ["llama", "gemma3"] {
            let (dir, cfg) = fixture(name);
            let load = |f16: bool| {
                let vb = crate::weights::Weights::from_dir(&dir)
                    .unwrap()
                    .into_var_builder(DType::F32, &dev);
                let mut m = Llama::load(&cfg, vb).unwrap();
                assert!(!m.kv_f16, "safetensors weights keep an f32 cache");
                m.kv_f16 = f16;
                m
            };
            let (full, half) = (load(false), load(true));
            let v = cfg.vocab_size as u32;
            let mut mask = vec![vec![1u8; 6], vec![0, 0, 1, 1, 1, 1]];
            let ids: Vec<u32> = (0..12).map(|i| (i * 37 + 5) % v).collect();
            let ids = Tensor::from_vec(ids, (2, 6), &dev).unwrap();
            let pos: Vec<u32> = [0, 1, 2, 3, 4, 5, 1, 1, 0, 1, 2, 3].to_vec();
            let pos = Tensor::from_vec(pos, (2, 6), &dev).unwrap();
            let bias = causal_bias(&mask, 6, &dev).unwrap();
            let (mut ca, mut cb) = (
                KvCache::new(full.num_layers()),
                KvCache::new(half.num_layers()),
            );
            let mut logits = |ids: &Tensor, pos: &Tensor, bias: &Tensor, last: bool| {
                let a = full.forward_cpu(ids, pos, bias, &mut ca, last).unwrap();
                let b = half.forward_cpu(ids, pos, bias, &mut cb, last).unwrap();
                crate::models::max_abs_diff(&a, &b)
            };
            let mut diffs = vec![logits(&ids, &pos, &bias, true)];
            for step in 0..6u32 {
                let mut pos = Vec::new();
                for m in mask.iter_mut() {
                    m.push(1);
                    pos.push(m.iter().map(|&x| x as u32).sum::<u32>() - 1);
                }
                let ids = Tensor::from_vec(vec![step % v, (step * 7 + 3) % v], (2, 1), &dev);
                let pos = Tensor::from_vec(pos, (2, 1), &dev).unwrap();
                let bias = causal_bias(&mask, 1, &dev).unwrap();
                diffs.push(logits(&ids.unwrap(), &pos, &bias, true));
            }
            assert!(
                diffs.iter().all(|&d| d > 0.0 && d < 2e-2),
                "{name}: logits apart by {diffs:?}"
            );
            assert_eq!(ca.seq_len(), cb.seq_len());
        }
    }

    /// Window 2 over 2 cached + 2 new positions: the query at position 2 sees keys 1..=2, the
    /// one at 3 sees 2..=3 (the causal part stays the causal bias's).
    #[test]
    fn window_bias_hides_keys_out_of_the_window() {
        let mut bias = vec![0f32; 2 * 4];
        window_bias(&mut bias, 2, 4, 2);
        let m = f32::MIN;
        assert_eq!(bias, [m, 0.0, 0.0, 0.0, m, m, 0.0, 0.0]);
    }

    /// Head counts the attention code would divide by zero with, split unevenly, or group
    /// wrongly (9 heads over 2 KV heads ran and gave garbage) are refused by name.
    #[test]
    fn head_counts_are_checked() {
        use crate::config::CheckedConfig;
        let cfg = |over: serde_json::Value| -> LlamaConfig {
            let mut v = serde_json::json!({
                "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
                "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2
            });
            for (k, x) in over.as_object().unwrap() {
                v[k] = x.clone();
            }
            serde_json::from_value(v).unwrap()
        };
        cfg(serde_json::json!({})).check().unwrap();
        cfg(serde_json::json!({"head_dim": 16})).check().unwrap();
        cfg(serde_json::json!({"num_key_value_heads": null}))
            .check()
            .unwrap();
        for (over, want) in [
            (
                serde_json::json!({"num_attention_heads": 0}),
                "num_attention_heads is 0",
            ),
            (
                serde_json::json!({"num_attention_heads": 0, "head_dim": 8}),
                "num_attention_heads is 0",
            ),
            (
                serde_json::json!({"num_key_value_heads": 0}),
                "num_key_value_heads is 0",
            ),
            (
                serde_json::json!({"num_attention_heads": 9, "num_key_value_heads": 2, "head_dim": 8}),
                "num_attention_heads 9 is not a multiple of num_key_value_heads 2",
            ),
            (
                serde_json::json!({"num_attention_heads": 7, "num_key_value_heads": 7}),
                "hidden_size 32 does not split into num_attention_heads 7",
            ),
            (serde_json::json!({"head_dim": 0}), "head_dim is 0"),
            (serde_json::json!({"head_dim": 7}), "head_dim is 7"),
        ] {
            let c = cfg(over.clone());
            let err = c.check().unwrap_err();
            assert!(err.contains(want), "{over}: {err}");
        }
    }

    #[test]
    fn llama3_scaling_keeps_high_and_scales_low_frequencies() {
        let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
            "vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 1, "num_attention_heads": 4,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
        }))
        .unwrap();
        let inv = cfg.inv_freq().unwrap();
        // Wavelength 2*pi lies between 16/4 and 16/1: smoothed between scaled and kept.
        let smooth = (16.0 / (2.0 * std::f32::consts::PI) - 1.0) / 3.0;
        assert!(
            (inv[0] - ((1.0 - smooth) / 8.0 + smooth)).abs() < 1e-6,
            "{}",
            inv[0]
        );
        // Wavelength beyond 16: scaled by the factor.
        assert!((inv[3] - 1.0 / 10000f32.powf(0.75) / 8.0).abs() < 1e-9);
    }
}
