//! wav2vec 2.0 (Baevski et al. 2020) with its CTC head, as `modeling_wav2vec2.py` (transformers
//! 4.57) runs `Wav2Vec2ForCTC` for inference:
//!
//! 1. the feature encoder: 1-D convolutions over the raw waveform (`conv_dim`, `conv_kernel`,
//!    `conv_stride`), each followed by GELU; `feat_extract_norm` "group" puts a GroupNorm (one
//!    group per channel, statistics over time) after the first convolution only (wav2vec2-base),
//!    "layer" a LayerNorm over the channels after every one (wav2vec2-large-lv60);
//! 2. the feature projection: LayerNorm, then a linear layer to `hidden_size`;
//! 3. the positional convolution: a grouped convolution (`num_conv_pos_embeddings` wide,
//!    `num_conv_pos_embedding_groups` groups) with weight normalization over dim 2, the extra
//!    frame of an even kernel dropped, GELU, added to the states;
//! 4. the transformer encoder: post-LN layers after a LayerNorm (`do_stable_layer_norm` false,
//!    `Wav2Vec2Encoder`) or pre-LN layers and a final LayerNorm (true,
//!    `Wav2Vec2EncoderStableLayerNorm`);
//! 5. `lm_head`: the per-frame logits over the CTC vocabulary.
//!
//! With sample lengths (a padded batch), frames past each input's
//! `_get_feat_extract_output_lengths` are zeroed before the positional convolution and masked as
//! attention keys, as HF does with an `attention_mask`. The convolutions and normalizations see
//! the padding either way (so a "group" model's outputs depend on the batch, as in HF).
//!
//! Weight normalization is read in both stored forms: `weight_g`/`weight_v` (older hub
//! checkpoints such as wav2vec2-base-960h) and `parametrizations.weight.original0/original1`
//! (what torch 2.x's `save_pretrained` writes).
//!
//! Which path runs where: candle ops everywhere (any device and dtype), except on CPU f32: the
//! GroupNorm statistics are plain loops with f64 sums (torch's float accumulation over tens of
//! thousands of frames is more exact than candle's running f32 sum), and the encoder's
//! self-attention is the tiled kernel (`kernels::cpu::attention::attend_sequences`: scores are
//! never written whole, which matters for minutes of audio at 50 frames a second). The unit
//! test at the end checks both attention paths against each other.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{layer_norm, Conv1d, Conv1dConfig, LayerNorm, VarBuilder};
use serde::Deserialize;

use super::layers::{attention, attention_bias, in_worker, linear, Activation, Linear};
use crate::kernels::cpu::attention::attend_sequences;

/// `nn.LayerNorm` / `nn.GroupNorm` default epsilon (the conv layers do not use the config's).
const NORM_EPS: f64 = 1e-5;

fn default_conv_dim() -> Vec<usize> {
    vec![512; 7]
}
fn default_conv_stride() -> Vec<usize> {
    vec![5, 2, 2, 2, 2, 2, 2]
}
fn default_conv_kernel() -> Vec<usize> {
    vec![10, 3, 3, 3, 3, 2, 2]
}
fn default_feat_extract_norm() -> String {
    "group".into()
}
fn default_layer_norm_eps() -> f64 {
    1e-5
}
fn default_pos_kernel() -> usize {
    128
}
fn default_pos_groups() -> usize {
    16
}

/// The part of `Wav2Vec2Config` inference needs (defaults as HF's).
#[derive(Debug, Clone, Deserialize)]
pub struct Wav2Vec2Config {
    /// `None` in a base model's config; the CTC head needs it.
    #[serde(default)]
    pub vocab_size: Option<usize>,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default)]
    pub hidden_act: Activation,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_feat_extract_norm")]
    pub feat_extract_norm: String,
    #[serde(default)]
    pub feat_extract_activation: Activation,
    #[serde(default = "default_conv_dim")]
    pub conv_dim: Vec<usize>,
    #[serde(default = "default_conv_stride")]
    pub conv_stride: Vec<usize>,
    #[serde(default = "default_conv_kernel")]
    pub conv_kernel: Vec<usize>,
    #[serde(default)]
    pub conv_bias: bool,
    #[serde(default = "default_pos_kernel")]
    pub num_conv_pos_embeddings: usize,
    #[serde(default = "default_pos_groups")]
    pub num_conv_pos_embedding_groups: usize,
    #[serde(default)]
    pub do_stable_layer_norm: bool,
    #[serde(default)]
    pub add_adapter: bool,
    #[serde(default)]
    pub adapter_attn_dim: Option<usize>,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
}

impl Wav2Vec2Config {
    /// Checks what the model code assumes; the message says what is unsupported.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let n = self.conv_dim.len();
        if n == 0 || self.conv_kernel.len() != n || self.conv_stride.len() != n {
            return Err(format!(
                "conv_dim, conv_kernel and conv_stride must have the same non-zero length \
                 (got {}, {}, {})",
                n,
                self.conv_kernel.len(),
                self.conv_stride.len()
            ));
        }
        if self.conv_kernel.contains(&0) || self.conv_stride.contains(&0) {
            return Err("conv_kernel and conv_stride must be positive".into());
        }
        if !["group", "layer"].contains(&self.feat_extract_norm.as_str()) {
            return Err(format!(
                "feat_extract_norm is `{}`, but has to be one of ['group', 'layer']",
                self.feat_extract_norm
            ));
        }
        if self.add_adapter {
            return Err(
                "add_adapter (a convolutional adapter after the encoder) is not supported".into(),
            );
        }
        if self.adapter_attn_dim.is_some() {
            return Err("adapter_attn_dim (MMS language adapters) is not supported".into());
        }
        let h = self.hidden_size;
        if self.num_attention_heads == 0 || !h.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {h} is not a multiple of num_attention_heads {}",
                self.num_attention_heads
            ));
        }
        let g = self.num_conv_pos_embedding_groups;
        if g == 0 || !h.is_multiple_of(g) {
            return Err(format!(
                "hidden_size {h} is not a multiple of num_conv_pos_embedding_groups {g}"
            ));
        }
        Ok(())
    }

    /// Waveform samples per logit frame: the product of the conv strides (HF's
    /// `inputs_to_logits_ratio`).
    pub fn inputs_to_logits_ratio(&self) -> usize {
        self.conv_stride.iter().product()
    }

    /// `_get_feat_extract_output_lengths`: frames the feature encoder makes of `samples`
    /// samples (0 when the waveform is shorter than the receptive field).
    pub fn output_length(&self, samples: usize) -> usize {
        let mut n = samples as i64;
        for (&k, &s) in self.conv_kernel.iter().zip(&self.conv_stride) {
            n = (n - k as i64).div_euclid(s as i64) + 1;
            if n <= 0 {
                return 0;
            }
        }
        n as usize
    }

    /// The fewest samples that give one frame.
    pub fn receptive_field(&self) -> usize {
        let mut field = 1;
        for (&k, &s) in self.conv_kernel.iter().zip(&self.conv_stride).rev() {
            field = (field - 1) * s + k;
        }
        field
    }
}

/// The normalization after a feature-encoder convolution.
enum ConvNorm {
    None,
    /// `nn.GroupNorm(C, C)`: per channel, over time. `weight`, `bias` `[C]`.
    Group(Tensor, Tensor),
    /// `nn.LayerNorm(C)` over the channels of each frame.
    Layer(LayerNorm),
}

struct ConvLayer {
    conv: Conv1d,
    norm: ConvNorm,
    act: Activation,
}

impl ConvLayer {
    fn load(cfg: &Wav2Vec2Config, i: usize, vb: VarBuilder) -> Result<Self> {
        let c_in = if i == 0 { 1 } else { cfg.conv_dim[i - 1] };
        let c_out = cfg.conv_dim[i];
        let k = cfg.conv_kernel[i];
        let weight = vb.pp("conv").get((c_out, c_in, k), "weight")?;
        let bias = if cfg.conv_bias {
            Some(vb.pp("conv").get(c_out, "bias")?)
        } else {
            None
        };
        let conv = Conv1d::new(
            weight,
            bias,
            Conv1dConfig {
                stride: cfg.conv_stride[i],
                ..Default::default()
            },
        );
        let norm = match (cfg.feat_extract_norm.as_str(), i) {
            ("group", 0) => ConvNorm::Group(
                vb.pp("layer_norm").get(c_out, "weight")?,
                vb.pp("layer_norm").get(c_out, "bias")?,
            ),
            ("layer", _) => ConvNorm::Layer(layer_norm(c_out, NORM_EPS, vb.pp("layer_norm"))?),
            _ => ConvNorm::None,
        };
        Ok(Self {
            conv,
            norm,
            act: cfg.feat_extract_activation,
        })
    }

    /// `[b, c_in, n]` -> `[b, c_out, n']`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.conv.forward(xs)?;
        let xs = match &self.norm {
            ConvNorm::None => xs,
            ConvNorm::Group(w, b) => group_norm_per_channel(&xs, w, b)?,
            ConvNorm::Layer(ln) => ln
                .forward(&xs.transpose(1, 2)?.contiguous()?)?
                .transpose(1, 2)?,
        };
        self.act.forward(&xs.contiguous()?)
    }
}

/// `nn.GroupNorm(C, C)` on `[b, C, t]`: each channel of each row normalized over time (biased
/// variance), then scaled and shifted per channel.
fn group_norm_per_channel(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (b, c, t) = xs.dims3()?;
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        let x: Vec<f32> = xs.flatten_all()?.to_vec1()?;
        let w: Vec<f32> = weight.to_dtype(DType::F32)?.to_vec1()?;
        let bi: Vec<f32> = bias.to_dtype(DType::F32)?.to_vec1()?;
        let mut out = vec![0f32; x.len()];
        for (r, (row, dst)) in x.chunks_exact(t).zip(out.chunks_exact_mut(t)).enumerate() {
            let ch = r % c;
            let mean = row.iter().map(|&v| f64::from(v)).sum::<f64>() / t as f64;
            let var = row
                .iter()
                .map(|&v| (f64::from(v) - mean).powi(2))
                .sum::<f64>()
                / t as f64;
            let scale = f64::from(w[ch]) / (var + NORM_EPS).sqrt();
            let shift = f64::from(bi[ch]);
            for (d, &v) in dst.iter_mut().zip(row) {
                *d = ((f64::from(v) - mean) * scale + shift) as f32;
            }
        }
        return Tensor::from_vec(out, (b, c, t), xs.device());
    }
    // Half-precision sums over thousands of frames would lose the statistics: f32 at least.
    let dtype = xs.dtype();
    let work = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let x = xs.to_dtype(work)?;
    let mean = x.mean_keepdim(D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centered.broadcast_div(&(var + NORM_EPS)?.sqrt()?)?;
    normed
        .broadcast_mul(&weight.to_dtype(work)?.reshape((1, c, 1))?)?
        .broadcast_add(&bias.to_dtype(work)?.reshape((1, c, 1))?)?
        .to_dtype(dtype)
}

/// `Wav2Vec2PositionalConvEmbedding`: grouped convolution (weight-normalized), same padding,
/// GELU.
struct PositionalConv {
    conv: Conv1d,
    /// An even kernel makes one frame too many (`Wav2Vec2SamePadLayer`).
    drop_last: bool,
    act: Activation,
}

impl PositionalConv {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let k = cfg.num_conv_pos_embeddings;
        let groups = cfg.num_conv_pos_embedding_groups;
        let shape = (h, h / groups, k);
        let weight = if vb.contains_tensor("weight_g") {
            weight_norm(&vb.get((1, 1, k), "weight_g")?, &vb.get(shape, "weight_v")?)?
        } else if vb.contains_tensor("parametrizations.weight.original0") {
            weight_norm(
                &vb.get((1, 1, k), "parametrizations.weight.original0")?,
                &vb.get(shape, "parametrizations.weight.original1")?,
            )?
        } else {
            // Weight normalization already folded in.
            vb.get(shape, "weight")?
        };
        let conv = Conv1d::new(
            weight,
            Some(vb.get(h, "bias")?),
            Conv1dConfig {
                padding: k / 2,
                groups,
                ..Default::default()
            },
        );
        Ok(Self {
            conv,
            drop_last: k.is_multiple_of(2),
            act: cfg.feat_extract_activation,
        })
    }

    /// `[b, t, h]` -> the position embeddings `[b, t, h]`.
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let t = xs.dim(1)?;
        let ys = self.conv.forward(&xs.transpose(1, 2)?.contiguous()?)?;
        let ys = if self.drop_last {
            ys.narrow(2, 0, t)?
        } else {
            ys
        };
        self.act.forward(&ys.contiguous()?)?.transpose(1, 2)
    }
}

/// `torch._weight_norm(v, g, dim=2)`: `v * (g / ||v||)`, the norm over every dim but 2.
fn weight_norm(g: &Tensor, v: &Tensor) -> Result<Tensor> {
    let norm = v.sqr()?.sum_keepdim(0)?.sum_keepdim(1)?.sqrt()?;
    v.broadcast_mul(&(g / norm)?)
}

struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    /// `[q; k; v]` as one product, for the CPU attention kernel.
    qkv: Linear,
    out: Linear,
    heads: usize,
    layer_norm: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    act: Activation,
    final_layer_norm: LayerNorm,
    /// Pre-LN (`Wav2Vec2EncoderLayerStableLayerNorm`) rather than post-LN.
    stable: bool,
}

impl EncoderLayer {
    fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let a = vb.pp("attention");
        let q = linear(h, h, a.pp("q_proj"))?;
        let k = linear(h, h, a.pp("k_proj"))?;
        let v = linear(h, h, a.pp("v_proj"))?;
        let w = |name: &str| a.pp(name).get((h, h), "weight");
        let b = |name: &str| a.pp(name).get(h, "bias");
        let qkv = Linear::new(
            Tensor::cat(&[w("q_proj")?, w("k_proj")?, w("v_proj")?], 0)?,
            Some(Tensor::cat(&[b("q_proj")?, b("k_proj")?, b("v_proj")?], 0)?),
        )?;
        let f = vb.pp("feed_forward");
        Ok(Self {
            q,
            k,
            v,
            qkv,
            out: linear(h, h, a.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            layer_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("layer_norm"))?,
            ff_in: linear(h, cfg.intermediate_size, f.pp("intermediate_dense"))?,
            ff_out: linear(cfg.intermediate_size, h, f.pp("output_dense"))?,
            act: cfg.hidden_act,
            final_layer_norm: layer_norm(h, cfg.layer_norm_eps, vb.pp("final_layer_norm"))?,
            stable: cfg.do_stable_layer_norm,
        })
    }

    /// Self-attention over `xs` `[b, t, h]` with keys masked by `keep` (`[b, t]` 0/1); `bias`
    /// is the same mask as an additive `[b, 1, 1, t]` bias (candle's path).
    fn attend(&self, xs: &Tensor, keep: &[f32], bias: &Tensor) -> Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        let ctx = if xs.device().is_cpu() && xs.dtype() == DType::F32 {
            let qkv: Vec<f32> = self.qkv.forward(xs)?.flatten_all()?.to_vec1()?;
            let d = h / self.heads;
            let scale = 1.0 / (d as f32).sqrt();
            let ctx = attend_sequences(&qkv, b, t, self.heads, d, scale, None, keep, !in_worker());
            Tensor::from_vec(ctx, (b, t, h), xs.device())?
        } else {
            let q = self.q.forward(xs)?;
            let k = self.k.forward(xs)?;
            let v = self.v.forward(xs)?;
            attention(&q, &k, &v, bias, self.heads)?
        };
        self.out.forward(&ctx)
    }

    fn feed_forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.ff_out
            .forward(&self.act.forward(&self.ff_in.forward(xs)?)?)
    }

    fn forward(&self, xs: &Tensor, keep: &[f32], bias: &Tensor) -> Result<Tensor> {
        if self.stable {
            let h = (xs + self.attend(&self.layer_norm.forward(xs)?, keep, bias)?)?;
            &h + self.feed_forward(&self.final_layer_norm.forward(&h)?)?
        } else {
            let h = self
                .layer_norm
                .forward(&(xs + self.attend(xs, keep, bias)?)?)?;
            self.final_layer_norm
                .forward(&(&h + self.feed_forward(&h)?)?)
        }
    }
}

/// `Wav2Vec2ForCTC`: waveform in, per-frame CTC logits out.
pub struct Wav2Vec2ForCtc {
    conv_layers: Vec<ConvLayer>,
    projection_norm: LayerNorm,
    projection: Linear,
    pos_conv: PositionalConv,
    /// After the positional convolution (post-LN) or after the last layer (stable).
    encoder_norm: LayerNorm,
    layers: Vec<EncoderLayer>,
    lm_head: Linear,
    pub config: Wav2Vec2Config,
}

impl Wav2Vec2ForCtc {
    /// `vb` at the root (`wav2vec2.` and `lm_head.` below it).
    pub fn load(cfg: &Wav2Vec2Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let vocab = cfg.vocab_size.ok_or_else(|| {
            candle_core::Error::Msg(
                "config.json has no vocab_size: the CTC head needs one (is this a base model \
                 without a head?)"
                    .into(),
            )
        })?;
        let m = vb.pp("wav2vec2");
        let enc = m.pp("encoder");
        let h = cfg.hidden_size;
        let last = *cfg.conv_dim.last().unwrap_or(&h);
        Ok(Self {
            conv_layers: (0..cfg.conv_dim.len())
                .map(|i| ConvLayer::load(cfg, i, m.pp("feature_extractor.conv_layers").pp(i)))
                .collect::<Result<_>>()?,
            projection_norm: layer_norm(
                last,
                cfg.layer_norm_eps,
                m.pp("feature_projection.layer_norm"),
            )?,
            projection: linear(last, h, m.pp("feature_projection.projection"))?,
            pos_conv: PositionalConv::load(cfg, enc.pp("pos_conv_embed.conv"))?,
            encoder_norm: layer_norm(h, cfg.layer_norm_eps, enc.pp("layer_norm"))?,
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::load(cfg, enc.pp("layers").pp(i)))
                .collect::<Result<_>>()?,
            lm_head: linear(h, vocab, vb.pp("lm_head"))?,
            config: cfg.clone(),
        })
    }

    /// The encoder's last hidden states `[b, t, hidden]` of `input_values` `[b, n]` (the
    /// feature extractor's output). `lengths`: each row's real sample count in a padded batch
    /// (HF's `attention_mask`); `None` attends to every frame.
    pub fn hidden_states(
        &self,
        input_values: &Tensor,
        lengths: Option<&[usize]>,
    ) -> Result<Tensor> {
        let (b, _) = input_values.dims2()?;
        let dtype = self.projection.weight_t().dtype();
        let mut xs = input_values.to_dtype(dtype)?.unsqueeze(1)?;
        for layer in &self.conv_layers {
            xs = layer.forward(&xs)?;
        }
        let xs = xs.transpose(1, 2)?.contiguous()?;
        let t = xs.dim(1)?;
        let mut xs = self
            .projection
            .forward(&self.projection_norm.forward(&xs)?)?;
        // `_get_feature_vector_attention_mask`: frames before each row's output length.
        let keep: Vec<f32> = match lengths {
            Some(l) => {
                if l.len() != b {
                    candle_core::bail!("{} lengths for a batch of {b}", l.len());
                }
                l.iter()
                    .flat_map(|&n| {
                        let frames = self.config.output_length(n).min(t);
                        (0..t).map(move |i| if i < frames { 1f32 } else { 0f32 })
                    })
                    .collect()
            }
            None => vec![1f32; b * t],
        };
        let masked = keep.contains(&0.0);
        let mask = Tensor::from_vec(keep.clone(), (b, t), xs.device())?.to_dtype(dtype)?;
        if masked {
            xs = xs.broadcast_mul(&mask.unsqueeze(2)?)?;
        }
        let bias = if masked {
            attention_bias(&mask, dtype)?
        } else {
            Tensor::zeros((1, 1, 1, 1), dtype, xs.device())?
        };
        let mut xs = (&xs + self.pos_conv.forward(&xs)?)?;
        if !self.config.do_stable_layer_norm {
            xs = self.encoder_norm.forward(&xs)?;
        }
        for layer in &self.layers {
            xs = layer.forward(&xs, &keep, &bias)?;
        }
        if self.config.do_stable_layer_norm {
            xs = self.encoder_norm.forward(&xs)?;
        }
        Ok(xs)
    }

    /// CTC logits `[b, t, vocab]` of `input_values` `[b, n]`; `lengths` as in
    /// [`Wav2Vec2ForCtc::hidden_states`].
    pub fn forward(&self, input_values: &Tensor, lengths: Option<&[usize]>) -> Result<Tensor> {
        let hidden = self.hidden_states(input_values, lengths)?;
        self.lm_head.forward(&hidden)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn config() -> Wav2Vec2Config {
        serde_json::from_value(serde_json::json!({
            "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 16, "vocab_size": 5,
            "conv_dim": [4, 4], "conv_kernel": [10, 3], "conv_stride": [5, 2],
            "num_conv_pos_embeddings": 4, "num_conv_pos_embedding_groups": 2
        }))
        .unwrap()
    }

    #[test]
    fn output_lengths_and_ratio() {
        let c = config();
        assert_eq!(c.inputs_to_logits_ratio(), 10);
        // (n - 10) / 5 + 1 frames, then (f - 3) / 2 + 1.
        assert_eq!(c.output_length(100), 9);
        assert_eq!(c.receptive_field(), 20);
        assert_eq!(c.output_length(20), 1);
        assert_eq!(c.output_length(19), 0);
        assert_eq!(c.output_length(0), 0);
        // wav2vec2-base: 320 samples a frame, 400 for the first.
        let base: Wav2Vec2Config = serde_json::from_value(serde_json::json!({
            "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
            "intermediate_size": 3072
        }))
        .unwrap();
        assert_eq!(base.inputs_to_logits_ratio(), 320);
        assert_eq!(base.receptive_field(), 400);
        assert_eq!(base.output_length(16000), 49);
    }

    #[test]
    fn weight_norm_scales_each_kernel_column() {
        let v = Tensor::new(&[[[3f32, 0.0]], [[4.0, 2.0]]], &Device::Cpu).unwrap();
        let g = Tensor::new(&[[[10f32, 1.0]]], &Device::Cpu).unwrap();
        let w: Vec<Vec<Vec<f32>>> = weight_norm(&g, &v).unwrap().to_vec3().unwrap();
        assert_eq!(w, vec![vec![vec![6.0, 0.0]], vec![vec![8.0, 1.0]]]);
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        let d: Vec<f32> = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        d.into_iter().fold(0f32, f32::max)
    }

    /// The CPU attention kernel and candle's ops give the same encoder layer, with and without
    /// masked keys; the CPU GroupNorm loop matches candle's ops.
    #[test]
    fn cpu_paths_match_candle_ops() {
        let dev = Device::Cpu;
        let c = config();
        let vm = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        EncoderLayer::load(&c, vb.pp("layer")).unwrap();
        // The VarMap made zeros: give every weight random values, then load again.
        for var in vm.data().lock().unwrap().values() {
            var.set(&Tensor::randn(0f32, 0.5, var.shape(), &dev).unwrap())
                .unwrap();
        }
        let layer = EncoderLayer::load(&c, vb.pp("layer")).unwrap();
        let xs = Tensor::randn(0f32, 1.0, (2, 7, 8), &dev).unwrap();
        let ragged = [vec![1f32; 7], vec![1., 1., 1., 1., 0., 0., 0.]].concat();
        for keep in [vec![1f32; 14], ragged] {
            let mask = Tensor::from_vec(keep.clone(), (2, 7), &dev).unwrap();
            let bias = attention_bias(&mask, DType::F32).unwrap();
            let fast = layer.attend(&xs, &keep, &bias).unwrap();
            let q = layer.q.forward(&xs).unwrap();
            let k = layer.k.forward(&xs).unwrap();
            let v = layer.v.forward(&xs).unwrap();
            let slow = layer
                .out
                .forward(&attention(&q, &k, &v, &bias, layer.heads).unwrap())
                .unwrap();
            assert!(max_diff(&fast, &slow) < 1e-5, "{}", max_diff(&fast, &slow));
            assert!(
                fast.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.1
            );
        }
        let x = Tensor::randn(0f32, 1.0, (2, 3, 50), &dev).unwrap();
        let w = Tensor::new(&[1.0f32, 0.5, 2.0], &dev).unwrap();
        let b = Tensor::new(&[0.0f32, 0.1, -0.2], &dev).unwrap();
        let fast = group_norm_per_channel(&x, &w, &b).unwrap();
        let f64s = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let slow = group_norm_per_channel(&f64s(&x), &f64s(&w), &f64s(&b))
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert!(max_diff(&fast, &slow) < 1e-5, "{}", max_diff(&fast, &slow));
    }
}
