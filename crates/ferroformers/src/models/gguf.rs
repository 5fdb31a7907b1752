//! GGUF (llama.cpp's format) for the Llama family: metadata -> config, the embedded vocabulary
//! and merges -> tokenizer, the chat template's source and special token ids, and the tensors
//! kept quantized (on CPU our block kernels, `kernels::cpu::quantized`; elsewhere candle's
//! `QMatMul` over the file's blocks: Q4_0, Q4_1, Q8_0, Q4_K, Q6_K, ... F16, F32).
//!
//! This file hands out pieces ([`load_text_parts`]); `generation::TextGenerator::from_gguf`
//! assembles them into a text generator (models do not import generation here).

use std::path::Path;

use candle_core::quantized::{gguf_file, QMatMul};
use candle_core::{DType, Device};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::prepend::Prepend;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::utils::Sequence as NormalizerSequence;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::SplitDelimiterBehavior;
use tokenizers::{AddedToken, PreTokenizerWrapper};

use super::causal_lm::Proj;
use super::layers::Linear;
use super::llama::{
    EmbedTable, Llama, LlamaConfig, LlamaFieldNames, LlamaLayerParts, LlamaParts, RopeScaling,
};
use crate::config::TokenizerConfig;
use crate::error::{Error, Result};
use crate::kernels::cpu::quantized::{QuantLinear, QuantMath};
use crate::kernels::cpu::rowops::Activation;
use crate::tokenizer::Tokenizer;

/// `FERROFORMERS_GGUF_DEQUANTIZE=1`: dequantize every matrix on load (to f32 unless another dtype
/// is asked for; 4-8x the memory,
/// same numbers as the CPU block kernels, which keep f32 activations). candle's `QMatMul`
/// (GPU, block types without a CPU kernel here) rounds its input to 8 bits as llama.cpp does,
/// so its logits drift ~0.1 from transformers' GGUF loading (which dequantizes).
fn dequantize() -> bool {
    std::env::var("FERROFORMERS_GGUF_DEQUANTIZE").is_ok_and(|v| v == "1")
}

/// The projection for a quantized weight: on CPU our row-expanding kernels (f32 activations,
/// transformers' numbers), elsewhere candle's `QMatMul`.
fn quantized_proj(
    w: candle_core::quantized::QTensor,
    b: Option<candle_core::Tensor>,
    device: &Device,
    math: QuantMath,
) -> candle_core::Result<Proj> {
    if device.is_cpu() {
        if let Some(q) = QuantLinear::new(&w)? {
            return Ok(Proj::Blocks(q.with_math(math), b));
        }
    }
    Ok(Proj::Quantized(QMatMul::from_qtensor(w)?, b))
}

/// An opened GGUF file: its metadata and tensor index.
pub struct GgufFile {
    pub content: gguf_file::Content,
    file: std::fs::File,
    path: std::path::PathBuf,
    /// The arithmetic of the CPU block products.
    pub math: QuantMath,
    /// Dequantize every tensor to this dtype on load and run dense products (a GPU, where
    /// f16/bf16 products are fast; `FERROFORMERS_GGUF_DEQUANTIZE=1`); `None`: quantized blocks.
    pub dense: Option<DType>,
}

fn werr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Weights {
        path: path.to_path_buf(),
        detail: e.to_string(),
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        // The metadata is read value by value (Gemma's 262k token strings and scores) with a
        // position query or two each: from a memory map those cost nothing, from the file
        // they were ~260k system calls.
        // SAFETY: the map is read-only and dropped before this function returns; a file
        // changed underneath gives wrong metadata (then errors), as reading it would.
        let content = match unsafe { memmap2::Mmap::map(&file) } {
            Ok(map) => gguf_file::Content::read(&mut std::io::Cursor::new(&map[..])),
            Err(_) => gguf_file::Content::read(&mut file),
        }
        .map_err(|e| werr(path, format!("not a readable GGUF file ({e})")))?;
        Ok(Self {
            content,
            file,
            path: path.to_path_buf(),
            math: QuantMath::default(),
            dense: dequantize().then_some(DType::F32),
        })
    }

    fn meta(&self, key: &str) -> Option<&gguf_file::Value> {
        self.content.metadata.get(key)
    }

    pub fn get_usize(&self, key: &str) -> Option<usize> {
        use gguf_file::Value as V;
        Some(match self.meta(key)? {
            V::U8(v) => *v as usize,
            V::U16(v) => *v as usize,
            V::U32(v) => *v as usize,
            V::U64(v) => *v as usize,
            V::I8(v) => (*v).max(0) as usize,
            V::I16(v) => (*v).max(0) as usize,
            V::I32(v) => (*v).max(0) as usize,
            V::I64(v) => (*v).max(0) as usize,
            _ => return None,
        })
    }

    pub fn get_f64(&self, key: &str) -> Option<f64> {
        use gguf_file::Value as V;
        Some(match self.meta(key)? {
            V::F32(v) => *v as f64,
            V::F64(v) => *v,
            _ => self.get_usize(key)? as f64,
        })
    }

    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.meta(key)?.to_string().ok().map(String::as_str)
    }

    fn require(&self, key: &str) -> Result<usize> {
        self.get_usize(key)
            .ok_or_else(|| werr(&self.path, format!("metadata `{key}` is missing")))
    }

    fn qtensor(&mut self, name: &str, device: &Device) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| werr(&self.path, format!("tensor `{name}`: {e}")))
    }

    fn has(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    fn proj(&mut self, name: &str, device: &Device) -> Result<Proj> {
        let w = self.qtensor(&format!("{name}.weight"), device)?;
        let bias_name = format!("{name}.bias");
        let b = if self.has(&bias_name) {
            Some(self.dense(&bias_name, device)?)
        } else {
            None
        };
        if self.dense.is_some() {
            let d = self.dequantized(&w, device)?;
            return Ok(Proj::Dense(
                Linear::new(d, b).map_err(|e| werr(&self.path, e))?,
            ));
        }
        quantized_proj(w, b, device, self.math).map_err(|e| werr(&self.path, e))
    }

    fn dense(&mut self, name: &str, device: &Device) -> Result<candle_core::Tensor> {
        let w = self.qtensor(name, device)?;
        self.dequantized(&w, device)
    }

    /// A quantized tensor expanded to the dense dtype (f32 unless `dense` asks for another).
    fn dequantized(
        &self,
        w: &candle_core::quantized::QTensor,
        device: &Device,
    ) -> Result<candle_core::Tensor> {
        w.dequantize(device)
            .and_then(|d| d.to_dtype(self.dense.unwrap_or(DType::F32)))
            .map_err(|e| werr(&self.path, e))
    }

    /// The model config from `<arch>.*` metadata.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        let arch = self
            .get_str("general.architecture")
            .unwrap_or("llama")
            .to_string();
        if !["llama", "qwen2", "mistral", "gemma3"].contains(&arch.as_str()) {
            return Err(Error::UnsupportedModel {
                model_type: format!("{arch} (GGUF)"),
                task: "text-generation".into(),
                supported: "llama, mistral, qwen2, gemma3".into(),
            });
        }
        let gemma = arch == "gemma3";
        let k = |s: &str| format!("{arch}.{s}");
        let hidden = self.require(&k("embedding_length"))?;
        let heads = self.require(&k("attention.head_count"))?;
        let vocab = match self.meta("tokenizer.ggml.tokens") {
            Some(v) => v.to_vec().map(Vec::len).unwrap_or(0),
            None => 0,
        };
        let vocab = self.get_usize(&k("vocab_size")).unwrap_or(vocab);
        let rope_scaling = match self.get_str(&k("rope.scaling.type")) {
            Some("linear") => Some(RopeScaling {
                rope_type: "linear".into(),
                factor: self.get_f64(&k("rope.scaling.factor")),
                low_freq_factor: None,
                high_freq_factor: None,
                original_max_position_embeddings: None,
            }),
            _ => None,
        };
        let cfg = LlamaConfig {
            model_type: arch.clone(),
            vocab_size: vocab,
            hidden_size: hidden,
            intermediate_size: self.require(&k("feed_forward_length"))?,
            num_hidden_layers: self.require(&k("block_count"))?,
            num_attention_heads: heads,
            num_key_value_heads: self.get_usize(&k("attention.head_count_kv")),
            head_dim: self
                .get_usize(&k("attention.key_length"))
                .or(self.get_usize(&k("rope.dimension_count"))),
            rms_norm_eps: self
                .get_f64(&k("attention.layer_norm_rms_epsilon"))
                .unwrap_or(1e-5),
            rope_theta: self.get_f64(&k("rope.freq_base")).unwrap_or(10000.0),
            rope_scaling,
            max_position_embeddings: self.get_usize(&k("context_length")).unwrap_or(2048),
            tie_word_embeddings: !self.has("output.weight"),
            attention_bias: false,
            // llama.cpp's converter permutes Llama's q/k for interleaved rotation; Qwen2 and
            // Gemma keep HF's halves layout (NEOX rope).
            rope_interleaved: arch == "llama",
            hidden_act: None,
            hidden_activation: gemma.then_some(Activation::GeluNew),
            // llama.cpp scales Gemma 3's scores by 1/sqrt(key_length) (27B aside), which is
            // `query_pre_attn_scalar` for the published sizes; its sliding layers follow the
            // pattern 6 with a local RoPE base of 10000, as HF's defaults.
            query_pre_attn_scalar: if gemma {
                self.get_usize(&k("attention.key_length")).map(|d| d as f64)
            } else {
                None
            },
            sliding_window: if gemma {
                self.get_usize(&k("attention.sliding_window"))
            } else {
                None
            },
            layer_types: None,
            sliding_window_pattern: gemma.then_some(6),
            rope_local_base_freq: gemma.then_some(10000.0),
            final_logit_softcapping: self.get_f64(&k("final_logit_softcapping")),
        };
        // The fields' names in messages: the metadata keys they came from.
        let head_dim_key = if self.has_meta(&k("attention.key_length")) {
            k("attention.key_length")
        } else {
            k("rope.dimension_count")
        };
        let (hidden_key, heads_key, kv_key) = (
            k("embedding_length"),
            k("attention.head_count"),
            k("attention.head_count_kv"),
        );
        cfg.check_named(&LlamaFieldNames {
            hidden_size: &hidden_key,
            num_attention_heads: &heads_key,
            num_key_value_heads: &kv_key,
            head_dim: &head_dim_key,
        })
        .map_err(|e| werr(&self.path, e))?;
        Ok(cfg)
    }

    fn has_meta(&self, key: &str) -> bool {
        self.meta(key).is_some()
    }

    /// The attention projections of every layer have the shapes the head counts imply
    /// (`[rows, columns]` as torch's): the metadata can be consistent by itself and still not
    /// describe the tensors (9 heads of 64 stored, `head_count` 7 read), which the quantized
    /// kernels would only notice by a panic.
    fn check_attention_shapes(&self, cfg: &LlamaConfig) -> Result<()> {
        let hd = cfg.head_dim();
        let (q, kv) = (cfg.num_attention_heads * hd, cfg.kv_heads() * hd);
        let h = cfg.hidden_size;
        for i in 0..cfg.num_hidden_layers {
            for (name, want) in [
                ("attn_q", [q, h]),
                ("attn_k", [kv, h]),
                ("attn_v", [kv, h]),
                ("attn_output", [h, q]),
            ] {
                let t = format!("blk.{i}.{name}.weight");
                let Some(info) = self.content.tensor_infos.get(&t) else {
                    continue; // Reported as missing when it is read.
                };
                if info.shape.dims() != want {
                    return Err(werr(
                        &self.path,
                        format!(
                            "tensor `{t}` has shape {:?}, but the metadata's head counts \
                             ({} heads, {} key/value heads, of size {hd}) imply {want:?}",
                            info.shape.dims(),
                            cfg.num_attention_heads,
                            cfg.kv_heads()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The model, with quantized projections.
    pub fn llama(&mut self, cfg: &LlamaConfig, device: &Device) -> Result<Llama> {
        self.check_attention_shapes(cfg)?;
        let embed = self.qtensor("token_embd.weight", device)?;
        let tied = !self.has("output.weight");
        // The output projection of greedy steps is screened where it is Q8_0 in the int8
        // mode (`kernels::cpu::split8`); a tied table is split for both uses.
        let blocks = if device.is_cpu() && self.dense.is_none() {
            QuantLinear::new(&embed)
                .map_err(|e| werr(&self.path, e))?
                .map(|q| {
                    // Lookups alone read an untied table as stored (no packing at load).
                    if tied {
                        q.with_math(self.math).split_for_screening()
                    } else {
                        q
                    }
                })
        } else {
            None
        };
        let (embed_tokens, tied_head) = match blocks {
            Some(q) => (EmbedTable::Blocks(q.clone()), Proj::Blocks(q, None)),
            None => {
                let dense = self.dequantized(&embed, device)?;
                let head = if self.dense.is_some() {
                    Proj::Dense(Linear::new(dense.clone(), None).map_err(|e| werr(&self.path, e))?)
                } else {
                    quantized_proj(embed, None, device, self.math)
                        .map_err(|e| werr(&self.path, e))?
                };
                (EmbedTable::Dense(dense), head)
            }
        };
        let lm_head = if tied {
            tied_head
        } else {
            match self.proj("output", device)? {
                Proj::Blocks(q, None) => Proj::Blocks(q.split_for_screening(), None),
                p => p,
            }
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        let gemma = cfg.is_gemma3();
        for i in 0..cfg.num_hidden_layers {
            let p = format!("blk.{i}");
            // llama.cpp's converter stores Gemma's norms as `1 + weight` already.
            let (qk_norms, out_norms) = if gemma {
                (
                    Some((
                        self.dense(&format!("{p}.attn_q_norm.weight"), device)?,
                        self.dense(&format!("{p}.attn_k_norm.weight"), device)?,
                    )),
                    Some((
                        self.dense(&format!("{p}.post_attention_norm.weight"), device)?,
                        self.dense(&format!("{p}.post_ffw_norm.weight"), device)?,
                    )),
                )
            } else {
                (None, None)
            };
            layers.push(LlamaLayerParts {
                qk_norms,
                out_norms,
                input_layernorm: self.dense(&format!("{p}.attn_norm.weight"), device)?,
                q_proj: self.proj(&format!("{p}.attn_q"), device)?,
                k_proj: self.proj(&format!("{p}.attn_k"), device)?,
                v_proj: self.proj(&format!("{p}.attn_v"), device)?,
                o_proj: self.proj(&format!("{p}.attn_output"), device)?,
                post_attention_layernorm: self.dense(&format!("{p}.ffn_norm.weight"), device)?,
                gate_proj: self.proj(&format!("{p}.ffn_gate"), device)?,
                up_proj: self.proj(&format!("{p}.ffn_up"), device)?,
                down_proj: self.proj(&format!("{p}.ffn_down"), device)?,
            });
        }
        let parts = LlamaParts {
            embed_tokens,
            layers,
            norm: self.dense("output_norm.weight", device)?,
            lm_head,
        };
        let dtype = self.dense.unwrap_or(DType::F32);
        Llama::from_parts(cfg, parts, device, dtype).map_err(|e| werr(&self.path, e))
    }

    fn bpe_tokenizer(&self, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
        let merges: Vec<(String, String)> = match self.meta("tokenizer.ggml.merges") {
            Some(v) => v
                .to_vec()
                .map_err(|e| werr(&self.path, e))?
                .iter()
                .filter_map(|m| {
                    let s = m.to_string().ok()?;
                    let (a, b) = s.split_once(' ')?;
                    Some((a.to_string(), b.to_string()))
                })
                .collect(),
            None => Vec::new(),
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .ignore_merges(false)
            .build()
            .map_err(|e| werr(&self.path, e))?;
        let mut t = tokenizers::Tokenizer::new(bpe);
        let byte_level = ByteLevel::new(false, true, true);
        // The pre-tokenizer each model's own tokenizer.json has (llama.cpp's `pre` names it).
        let split = |pattern: &str| -> Result<PreTokenizerWrapper> {
            let split = Split::new(
                SplitPattern::Regex(pattern.into()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| werr(&self.path, e))?;
            Ok(Sequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into())
        };
        let pre: PreTokenizerWrapper = match self.get_str("tokenizer.ggml.pre") {
            Some("qwen2") => split(QWEN2_SPLIT)?,
            Some("llama3") | Some("llama-bpe") => split(LLAMA3_SPLIT)?,
            // SmolLM splits digits one by one before the GPT-2 regex.
            Some("smollm") => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            _ => byte_level.into(),
        };
        t.with_pre_tokenizer(Some(pre));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        Ok(t)
    }

    /// SentencePiece BPE pieces (Gemma's) as a BPE model with byte fallback, as llama.cpp
    /// and the original `tokenizer.json` segment text: merges ranked by the score of the
    /// piece they make (the file's scores are those ranks, negated), so the highest-scoring
    /// adjacent pair merges first, as SentencePiece does. Spaces become `▁`; no prefix space
    /// unless `tokenizer.ggml.add_space_prefix` says so. (transformers' GGUF converter builds a
    /// Unigram model from these scores instead, which segments differently: "The capital" is
    /// 8 pieces there and 2 in llama.cpp and in Gemma's own tokenizer.)
    fn spm_bpe_tokenizer(&self, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
        let scores: Vec<f32> = match self.meta("tokenizer.ggml.scores") {
            Some(v) => v
                .to_vec()
                .map_err(|e| werr(&self.path, e))?
                .iter()
                .map(|x| x.to_f32().map_err(|e| werr(&self.path, e)))
                .collect::<Result<_>>()?,
            None => return Err(werr(&self.path, "no token scores (tokenizer.ggml.scores)")),
        };
        if scores.len() != tokens.len() {
            return Err(werr(
                &self.path,
                format!("{} token scores for {} tokens", scores.len(), tokens.len()),
            ));
        }
        let index: std::collections::HashMap<&str, usize> = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.as_str(), i))
            .collect();
        // Every split of every piece into two pieces, ordered by the whole piece's score
        // (then by the halves' scores), as transformers' `GGUFTokenizerSkeleton` orders them.
        let mut merges: Vec<(f32, f32, f32, usize, usize)> = Vec::new();
        for (t, &score) in tokens.iter().zip(&scores) {
            for (at, _) in t.char_indices().skip(1) {
                let (l, r) = t.split_at(at);
                if let (Some(&li), Some(&ri)) = (index.get(l), index.get(r)) {
                    merges.push((score, scores[li], scores[ri], li, ri));
                }
            }
        }
        merges.sort_by(|a, b| {
            b.0.total_cmp(&a.0)
                .then(b.1.total_cmp(&a.1))
                .then(b.2.total_cmp(&a.2))
        });
        let merges: Vec<(String, String)> = merges
            .into_iter()
            .map(|(_, _, _, l, r)| (tokens[l].clone(), tokens[r].clone()))
            .collect();
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let unk = self
            .get_usize("tokenizer.ggml.unknown_token_id")
            .and_then(|i| tokens.get(i))
            .cloned();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .byte_fallback(true)
            .fuse_unk(true);
        if let Some(u) = unk {
            builder = builder.unk_token(u);
        }
        let model = builder.build().map_err(|e| werr(&self.path, e))?;
        let mut t = tokenizers::Tokenizer::new(model);
        let prefix = matches!(
            self.meta("tokenizer.ggml.add_space_prefix"),
            Some(gguf_file::Value::Bool(true))
        );
        let space = Replace::new(" ", "\u{2581}").map_err(|e| werr(&self.path, e))?;
        if prefix {
            t.with_normalizer(Some(NormalizerSequence::new(vec![
                Prepend::new("\u{2581}".into()).into(),
                space.into(),
            ])))
        } else {
            t.with_normalizer(Some(space))
        }
        .map_err(|e| werr(&self.path, e))?;
        let mut steps: Vec<DecoderWrapper> = vec![
            Replace::new("\u{2581}", " ")
                .map_err(|e| werr(&self.path, e))?
                .into(),
            ByteFallback::default().into(),
            Fuse::default().into(),
        ];
        if prefix {
            steps.push(Strip::new(' ', 1, 0).into());
        }
        t.with_decoder(Some(DecoderSequence::new(steps)));
        Ok(t)
    }

    fn token_strings(&self) -> Result<Vec<String>> {
        let v = self
            .meta("tokenizer.ggml.tokens")
            .ok_or_else(|| werr(&self.path, "no embedded vocabulary (tokenizer.ggml.tokens)"))?;
        v.to_vec()
            .map_err(|e| werr(&self.path, e))?
            .iter()
            .map(|t| t.to_string().cloned().map_err(|e| werr(&self.path, e)))
            .collect()
    }

    /// The embedded tokenizer: byte-level BPE (`tokenizer.ggml.model == "gpt2"`, as
    /// transformers' GGUF converter builds it), or Gemma 3's SentencePiece BPE (`"llama"`, as
    /// llama.cpp segments it).
    pub fn tokenizer(&self, model_limit: Option<usize>) -> Result<(Tokenizer, TokenizerConfig)> {
        let model = self.get_str("tokenizer.ggml.model").unwrap_or("");
        let arch = self.get_str("general.architecture").unwrap_or("");
        let tokens = self.token_strings()?;
        let mut t = match model {
            "gpt2" => self.bpe_tokenizer(&tokens)?,
            "llama" if arch == "gemma3" => self.spm_bpe_tokenizer(&tokens)?,
            _ => {
                return Err(werr(
                    &self.path,
                    format!(
                        "embedded tokenizer `{model}` ({arch}) is not supported (byte-level BPE \
                         `gpt2`, and Gemma 3's SentencePiece `llama` are); pass --tokenizer \
                         with a tokenizer.json folder"
                    ),
                ))
            }
        };
        // Control and user-defined tokens are matched whole, as added tokens.
        let types: Vec<i64> = match self.meta("tokenizer.ggml.token_type") {
            Some(v) => v
                .to_vec()
                .map(|a| {
                    a.iter()
                        .map(|x| x.to_i32().map(i64::from).unwrap_or(1))
                        .collect()
                })
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let specials: Vec<AddedToken> = types
            .iter()
            .enumerate()
            .filter(|(_, ty)| **ty == 3 || (**ty == 4 && model == "gpt2"))
            .filter_map(|(i, _)| tokens.get(i))
            .map(|s| AddedToken::from(s.clone(), true))
            .collect();
        t.add_special_tokens(specials)
            .map_err(|e| werr(&self.path, e))?;
        if model != "gpt2" {
            // SentencePiece's user-defined pieces (Gemma's "\n", runs of spaces, `<table>`..)
            // are matched whole in the raw text but are text: decoded, never skipped.
            let user: Vec<AddedToken> = types
                .iter()
                .enumerate()
                .filter(|(_, ty)| **ty == 4)
                .filter_map(|(i, _)| tokens.get(i))
                .map(|s| AddedToken::from(s.clone(), false).normalized(false))
                .collect();
            t.add_tokens(user).map_err(|e| werr(&self.path, e))?;
        }
        let name = |key: &str| self.get_usize(key).and_then(|i| tokens.get(i)).cloned();
        let cfg = TokenizerConfig {
            bos_token: name("tokenizer.ggml.bos_token_id"),
            eos_token: name("tokenizer.ggml.eos_token_id"),
            unk_token: name("tokenizer.ggml.unknown_token_id"),
            pad_token: name("tokenizer.ggml.padding_token_id"),
            model_max_length: model_limit,
            ..Default::default()
        };
        let add_bos = matches!(
            self.meta("tokenizer.ggml.add_bos_token"),
            Some(gguf_file::Value::Bool(true))
        );
        if let (true, Some(bos), Some(id)) = (
            add_bos,
            cfg.bos_token.clone(),
            self.get_usize("tokenizer.ggml.bos_token_id"),
        ) {
            let tp = TemplateProcessing::builder()
                .try_single(format!("{bos} $A"))
                .map_err(|e| werr(&self.path, e))?
                .special_tokens(vec![(bos, id as u32)])
                .build()
                .map_err(|e| werr(&self.path, e))?;
            t.with_post_processor(Some(tp));
        }
        Ok((Tokenizer::from_tokenizer(t, &cfg, model_limit)?, cfg))
    }
}

/// Qwen2's pre-tokenizer regex (its tokenizer.json's `Split`, before byte-level mapping).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's: as Qwen2's with numbers in runs of up to three digits.
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Everything text generation needs from one GGUF file, as it stores it: the model, the
/// embedded tokenizer and the metadata's chat template and special token ids.
pub struct GgufTextParts {
    pub model: Llama,
    pub tokenizer: Tokenizer,
    /// The special tokens by name (`bos_token`, `eos_token`, `unk_token`, `pad_token`).
    pub tokenizer_config: TokenizerConfig,
    /// `tokenizer.chat_template`: the Jinja source, not yet parsed.
    pub chat_template: Option<String>,
    /// `tokenizer.ggml.bos_token_id`
    pub bos_token_id: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`
    pub eos_token_id: Option<u32>,
    /// `tokenizer.ggml.padding_token_id`
    pub pad_token_id: Option<u32>,
}

/// Open `path` and read the model (quantized projections on `device`), the tokenizer (limited
/// to the model's context window) and the chat template and special ids from its metadata.
pub fn load_text_parts(
    path: &Path,
    device: &Device,
    dtype: DType,
    math: QuantMath,
) -> Result<GgufTextParts> {
    let mut f = GgufFile::open(path)?;
    f.math = math;
    // A GPU runs dense products in `dtype` (f16/bf16): candle's quantized GPU kernels round
    // activations to 8 bits and are slower than cuBLAS at batch sizes above a few rows.
    if !device.is_cpu() || f.dense.is_some() {
        f.dense = Some(dtype);
    } else if dtype != DType::F32 {
        eprintln!(
            "warning: --dtype {} is ignored: a GGUF model on CPU runs its quantized blocks with \
             f32 activations (--gguf-math chooses their arithmetic)",
            dtype.as_str()
        );
    }
    let cfg = f.llama_config()?;
    let model = f.llama(&cfg, device)?;
    let (tokenizer, tokenizer_config) = f.tokenizer(Some(cfg.max_position_embeddings))?;
    let id = |key: &str| f.get_usize(key).map(|x| x as u32);
    Ok(GgufTextParts {
        chat_template: f.get_str("tokenizer.chat_template").map(str::to_string),
        bos_token_id: id("tokenizer.ggml.bos_token_id"),
        eos_token_id: id("tokenizer.ggml.eos_token_id"),
        pad_token_id: id("tokenizer.ggml.padding_token_id"),
        model,
        tokenizer,
        tokenizer_config,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::gguf_file::{self, Value};
    use candle_core::quantized::{GgmlDType, QTensor};
    use candle_core::{DType, Device, Tensor};

    use super::GgufFile;
    use crate::models::causal_lm::{causal_bias, CausalLm, KvCache};

    /// A Llama's metadata: `width` wide, `ffn` in its MLP, `layers` layers, 4 heads and 2
    /// key/value heads, `rope` dimensions rotated.
    fn llama_meta(width: u32, ffn: u32, layers: u32, rope: u32) -> Vec<(String, Value)> {
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            ("llama.embedding_length".into(), Value::U32(width)),
            ("llama.feed_forward_length".into(), Value::U32(ffn)),
            ("llama.block_count".into(), Value::U32(layers)),
            ("llama.attention.head_count".into(), Value::U32(4)),
            ("llama.attention.head_count_kv".into(), Value::U32(2)),
            ("llama.rope.dimension_count".into(), Value::U32(rope)),
        ]
    }

    /// A GGUF file of a tiny Llama: 32 wide, 4 heads and 2 key/value heads of 8 (`over`
    /// replaces metadata values), with its one layer's attention projections (zeros, f32)
    /// shaped for those counts.
    fn tiny(tag: &str, over: &[(&str, u32)]) -> GgufFile {
        let mut meta = llama_meta(32, 64, 1, 8);
        for (k, v) in over {
            meta.iter_mut().find(|(m, _)| m == k).unwrap().1 = Value::U32(*v);
        }
        let zeros = |r: usize, c: usize| {
            let t = Tensor::zeros((r, c), DType::F32, &Device::Cpu).unwrap();
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        let tensors = [
            ("blk.0.attn_q.weight", zeros(32, 32)),
            ("blk.0.attn_k.weight", zeros(16, 32)),
            ("blk.0.attn_v.weight", zeros(16, 32)),
            ("blk.0.attn_output.weight", zeros(32, 32)),
        ];
        let path =
            std::env::temp_dir().join(format!("ff-gguf-heads-{}-{tag}.gguf", std::process::id()));
        let mut w = std::fs::File::create(&path).unwrap();
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (*k, t)).collect();
        gguf_file::write(&mut w, &meta, &tensors).unwrap();
        drop(w);
        let f = GgufFile::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }

    /// Head counts of 0, KV heads that do not divide the heads, a head size of 0, and counts
    /// that do not fit the stored tensors (they panicked, or ran and gave garbage) are errors
    /// naming the metadata key.
    #[test]
    fn llama_head_counts_are_checked() {
        let f = tiny("ok", &[]);
        let cfg = f.llama_config().unwrap();
        f.check_attention_shapes(&cfg).unwrap();
        for (key, v, want) in [
            (
                "llama.attention.head_count",
                0,
                "llama.attention.head_count is 0",
            ),
            (
                "llama.attention.head_count_kv",
                0,
                "llama.attention.head_count_kv is 0",
            ),
            (
                "llama.attention.head_count",
                3,
                "llama.attention.head_count 3 is not a multiple of llama.attention.head_count_kv 2",
            ),
            (
                "llama.rope.dimension_count",
                0,
                "llama.rope.dimension_count is 0",
            ),
        ] {
            let err = tiny(&format!("{key}-{v}"), &[(key, v)])
                .llama_config()
                .unwrap_err()
                .to_string();
            assert!(err.contains(want), "{key}={v}: {err}");
        }
        // Consistent by themselves, but 2 heads of 8 are not the 32 rows stored.
        let mut f = tiny("two-heads", &[("llama.attention.head_count", 2)]);
        let cfg = f.llama_config().unwrap();
        let err = f.check_attention_shapes(&cfg).unwrap_err().to_string();
        assert!(
            err.contains("blk.0.attn_q.weight") && err.contains("[16, 32]"),
            "{err}"
        );
        let err = f
            .llama(&cfg, &Device::Cpu)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("blk.0.attn_q.weight"), "{err}");
    }

    /// A 2-layer Llama 256 wide (4 heads of 64, 2 key/value heads), 512 in its MLP, 96
    /// tokens, random weights: its projections in every block type a GGUF file brings (the
    /// Q4_K_M mix's Q4_K, Q5_0, Q6_K and Q8_0 among them), the output one untied Q8_0 (split
    /// for greedy screening). Opened in the int8 mode.
    fn mixed_llama() -> GgufFile {
        use GgmlDType as D;
        llama_of_types(&[
            [D::Q4K, D::Q5_0, D::Q6K, D::Q8_0, D::Q4_1, D::Q4K, D::Q6K],
            [D::Q5K, D::Q4_0, D::Q8_0, D::Q2K, D::Q6K, D::Q5_1, D::Q3K],
        ])
    }

    /// [`mixed_llama`] with its layers' projections (q, k, v, o, gate, up, down) in `types`.
    fn llama_of_types(types: &[[GgmlDType; 7]; 2]) -> GgufFile {
        use crate::kernels::cpu::test_values;
        let mut meta = llama_meta(256, 512, 2, 64);
        meta.push(("llama.vocab_size".into(), Value::U32(96)));
        let mut seed = 7u64;
        let mut q = |r: usize, c: usize, dt: GgmlDType| {
            seed += 1;
            let t = Tensor::from_vec(test_values(r * c, seed, 0.3), (r, c), &Device::Cpu);
            QTensor::quantize(&t.unwrap(), dt).unwrap()
        };
        use GgmlDType as D;
        let mut tensors: Vec<(String, QTensor)> = vec![
            ("token_embd.weight".into(), q(96, 256, D::Q8_0)),
            ("output.weight".into(), q(96, 256, D::Q8_0)),
        ];
        let shapes = [
            (256, 256),
            (128, 256),
            (128, 256),
            (256, 256),
            (512, 256),
            (512, 256),
            (256, 512),
        ];
        let names = [
            "attn_q",
            "attn_k",
            "attn_v",
            "attn_output",
            "ffn_gate",
            "ffn_up",
            "ffn_down",
        ];
        for (i, types) in types.iter().enumerate() {
            for ((name, &(r, c)), &dt) in names.iter().zip(&shapes).zip(types) {
                tensors.push((format!("blk.{i}.{name}.weight"), q(r, c, dt)));
            }
        }
        let ones = |n: usize| {
            let t = Tensor::ones(n, DType::F32, &Device::Cpu).unwrap();
            QTensor::quantize(&t, GgmlDType::F32).unwrap()
        };
        tensors.push(("output_norm.weight".into(), ones(256)));
        for i in 0..2 {
            tensors.push((format!("blk.{i}.attn_norm.weight"), ones(256)));
            tensors.push((format!("blk.{i}.ffn_norm.weight"), ones(256)));
        }
        // (Tests run in parallel threads: one file per call.)
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("ff-gguf-mixed-{}-{call}.gguf", std::process::id()));
        let mut w = std::fs::File::create(&path).unwrap();
        let meta: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
        let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        gguf_file::write(&mut w, &meta, &tensors).unwrap();
        drop(w);
        let mut f = GgufFile::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        f.math = crate::kernels::cpu::quantized::QuantMath::Int8;
        f
    }

    /// One forward pass of `rows` (each `s` ids, left padding masked in `mask`, which covers
    /// the cached positions and these) at `positions`: every position's logits, `[row][pos]`
    /// (the last one's only for a decoding step, `s == 1`, as the generator asks).
    fn pass(
        lm: &dyn CausalLm,
        cache: &mut KvCache,
        rows: &[Vec<u32>],
        positions: &[Vec<u32>],
        mask: &[Vec<u8>],
    ) -> Vec<Vec<Vec<f32>>> {
        let (b, s) = (rows.len(), rows[0].len());
        let cpu = Device::Cpu;
        let ids = Tensor::from_vec(rows.concat(), (b, s), &cpu).unwrap();
        let pos = Tensor::from_vec(positions.concat(), (b, s), &cpu).unwrap();
        let bias = causal_bias(mask, s, &cpu).unwrap();
        let logits = lm.forward(&ids, &pos, &bias, cache, s == 1).unwrap();
        logits.to_vec3::<f32>().unwrap()
    }

    /// Greedy decoding alone: the prompt in passes of `chunk` positions, then `steps` tokens,
    /// `screened` as the generator's greedy steps are (the output product exact only for the
    /// tokens that could be the largest, estimates below them for the rest). Returns every
    /// prompt position's logits, then each step's, and the tokens.
    fn alone(
        lm: &dyn CausalLm,
        prompt: &[u32],
        chunk: usize,
        steps: usize,
        screened: bool,
    ) -> (Vec<Vec<f32>>, Vec<u32>) {
        let mut cache = KvCache::new(lm.num_layers());
        let mut logits = Vec::new();
        let mut done = 0;
        while done < prompt.len() {
            let end = (done + chunk).min(prompt.len());
            let pos: Vec<u32> = (done as u32..end as u32).collect();
            let out = pass(
                lm,
                &mut cache,
                &[prompt[done..end].to_vec()],
                &[pos],
                &[vec![1; end]],
            );
            logits.extend(out.into_iter().next().unwrap());
            done = end;
        }
        let argmax =
            |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as u32;
        let mut tokens = vec![argmax(logits.last().unwrap())];
        if screened {
            cache.set_screen(Some(std::sync::Arc::new(Vec::new())));
        }
        for j in 0..steps {
            let at = (prompt.len() + j) as u32;
            let mask = vec![1u8; prompt.len() + j + 1];
            let out = pass(lm, &mut cache, &[vec![tokens[j]]], &[vec![at]], &[mask]);
            let l = out[0][0].clone();
            tokens.push(argmax(&l));
            logits.push(l);
        }
        (logits, tokens)
    }

    /// [`CausalLm::batch_invariance_costs_nothing`]: a Llama whose projections are all Q4_0,
    /// Q4_1, Q4_K or Q8_0 (their panels no larger than their blocks) has it; one with any 5-
    /// or 6-bit matrix only on Intel's cores (where their panels decode faster); one with a
    /// 2- or 3-bit matrix, the exact mode, or a CPU without the VNNI panels, not.
    #[test]
    fn batch_invariance_costs_nothing_for_4_and_8_bit_blocks() {
        use GgmlDType as D;
        let vnni = crate::kernels::cpu::qgemm::available();
        let intel = crate::kernels::cpu::intel_cores();
        let free = [D::Q4_0, D::Q4_1, D::Q4K, D::Q8_0, D::Q4_1, D::Q4K, D::Q4_0];
        let mut f = llama_of_types(&[free, free]);
        let cfg = f.llama_config().unwrap();
        let lm = f.llama(&cfg, &Device::Cpu).unwrap();
        assert_eq!(lm.batch_invariance_costs_nothing(), vnni);
        for (slow, on_intel) in [
            (D::Q5_0, true),
            (D::Q6K, true),
            (D::Q5K, true),
            (D::Q2K, false),
        ] {
            let mut one = free;
            one[4] = slow;
            let mut f = llama_of_types(&[free, one]);
            let lm = f.llama(&cfg, &Device::Cpu).unwrap();
            assert_eq!(
                lm.batch_invariance_costs_nothing(),
                vnni && intel && on_intel,
                "{slow:?}"
            );
        }
        let mut f = llama_of_types(&[free, free]);
        f.math = crate::kernels::cpu::quantized::QuantMath::Exact;
        let lm = f.llama(&cfg, &Device::Cpu).unwrap();
        assert!(!lm.batch_invariance_costs_nothing(), "the exact mode");
    }

    /// Batch invariance ([`CausalLm::make_batch_invariant`]): a sequence's logits are the same
    /// bits alone in one pass, alone with its prompt in chunks of 1, 3 and 8 positions, and in
    /// a batch with two others of other lengths (left padding, prompt rows and decoding rows
    /// of 3), over every block type; greedy steps that screen the output product choose the
    /// same tokens with the same logits. Without it the chunked and batched logits differ (int8
    /// products of 1-4 rows and of more sum in other f32 orders, as does prompt attention).
    #[test]
    fn batch_invariant_logits_do_not_depend_on_the_pass() {
        let mut f = mixed_llama();
        let cfg = f.llama_config().unwrap();
        let mut lm = f.llama(&cfg, &Device::Cpu).unwrap();
        if !crate::kernels::cpu::qgemm::available() {
            let err = lm.make_batch_invariant().unwrap_err();
            assert!(err.contains("AVX-512 VNNI"), "{err}");
            return;
        }
        lm.make_batch_invariant().unwrap();
        let prompts: Vec<Vec<u32>> = [9usize, 37, 90]
            .iter()
            .map(|&n| {
                (0..n as u32)
                    .map(|i| (i * 37 + n as u32 * 11) % 96)
                    .collect()
            })
            .collect();
        let steps = 6;
        let solo: Vec<(Vec<Vec<f32>>, Vec<u32>)> = prompts
            .iter()
            .map(|p| alone(&lm, p, p.len(), steps, false))
            .collect();
        for (p, (logits, tokens)) in prompts.iter().zip(&solo) {
            for (chunk, screened) in [(1, false), (3, true), (8, false), (p.len(), true)] {
                let (l, t) = alone(&lm, p, chunk, steps, screened);
                let what = format!("prompt of {} in chunks of {chunk}", p.len());
                assert_eq!(&t, tokens, "{what}");
                for (i, (a, b)) in l.iter().zip(logits).enumerate() {
                    if screened && i >= p.len() {
                        // A screened step: the chosen token's logit is the full product's.
                        let next = t[i + 1 - p.len()] as usize;
                        assert_eq!(a[next].to_bits(), b[next].to_bits(), "{what}: step {i}");
                    } else {
                        assert!(a == b, "{what}: position {i}");
                    }
                }
            }
        }
        // All three together, left-padded to the longest, then decoding side by side.
        let s = prompts.iter().map(Vec::len).max().unwrap();
        let pad = |p: &Vec<u32>| s - p.len();
        let rows: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| [vec![0; pad(p)], p.clone()].concat())
            .collect();
        let positions: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| [vec![0; pad(p)], (0..p.len() as u32).collect()].concat())
            .collect();
        let mut mask: Vec<Vec<u8>> = prompts
            .iter()
            .map(|p| [vec![0; pad(p)], vec![1; p.len()]].concat())
            .collect();
        let mut cache = KvCache::new(lm.num_layers());
        let out = pass(&lm, &mut cache, &rows, &positions, &mask);
        for (r, p) in prompts.iter().enumerate() {
            for i in 0..p.len() {
                assert!(
                    out[r][pad(p) + i] == solo[r].0[i],
                    "batched prompt {r}, position {i}"
                );
            }
        }
        for j in 0..steps {
            mask.iter_mut().for_each(|m| m.push(1));
            let rows: Vec<Vec<u32>> = solo.iter().map(|(_, t)| vec![t[j]]).collect();
            let positions: Vec<Vec<u32>> =
                prompts.iter().map(|p| vec![(p.len() + j) as u32]).collect();
            let out = pass(&lm, &mut cache, &rows, &positions, &mask);
            for (r, p) in prompts.iter().enumerate() {
                assert!(
                    out[r][0] == solo[r].0[p.len() + j],
                    "batched row {r}, step {j}"
                );
            }
        }
    }
}
