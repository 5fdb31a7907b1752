//! `feature-extraction` (per-token hidden states, HF's nested shape) and sentence embeddings
//! (`pooling` + `normalize`, honouring a sentence-transformers folder's `1_Pooling/config.json`,
//! `modules.json` and `sentence_bert_config.json`). Task `sentence-embeddings` is
//! feature-extraction with `pooling="auto"`.

use std::path::Path;

use candle_core::Tensor;
use serde_json::Value;

use super::{param, EncoderRunner, Input, Output, Params, PipelineOptions, Task};
use crate::config::read_json;
use crate::error::{Error, Result};
use crate::models::Head;
use crate::tokenizer::Tokenizer;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    Mean,
    Cls,
    Max,
    /// Mean times sqrt(length), sentence-transformers' `mean_sqrt_len_tokens`.
    MeanSqrtLen,
}

impl Pooling {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "mean" => Ok(Self::Mean),
            "cls" => Ok(Self::Cls),
            "max" => Ok(Self::Max),
            "mean_sqrt_len" => Ok(Self::MeanSqrtLen),
            _ => Err(Error::param(
                "pooling",
                format!("`{s}` is not one of mean, cls, max, mean_sqrt_len, auto"),
            )),
        }
    }

    /// Pool every row of a padded batch `[b, s, h]` at once on the batch's device (row `i`
    /// has `lens[i]` real tokens): each row what [`Pooling::apply`] gives it, but only `[b, h]`
    /// comes to the host instead of every token's vector, and the reductions run on the GPU
    /// (measured on an H200 before: MiniLM at batch 256 moved 50 MB to the host per batch and
    /// pooled it there on one thread).
    pub fn apply_batch(self, hidden: &Tensor, lens: &[usize]) -> Result<Tensor> {
        let (b, s, _) = hidden.dims3()?;
        if lens.len() != b || lens.iter().any(|&n| n == 0 || n > s) {
            return Err(candle_core::Error::Msg(format!(
                "pooling: {} row lengths ({lens:?}) for a batch of {b} rows of {s} positions",
                lens.len()
            ))
            .into());
        }
        let dev = hidden.device();
        // Per position: `keep` for the row's real tokens, `pad` for its padding.
        let per_position = |keep: f32, pad: f32| -> Result<Tensor> {
            let v: Vec<f32> = lens
                .iter()
                .flat_map(|&n| (0..s).map(move |j| if j < n { keep } else { pad }))
                .collect();
            Ok(Tensor::from_vec(v, (b, s, 1), dev)?)
        };
        let scaled = |sqrt: bool| -> Result<Tensor> {
            let sum = hidden.broadcast_mul(&per_position(1.0, 0.0)?)?.sum(1)?;
            // The same factor as `apply`'s: 1 / n (or 1 / sqrt(n)) rounded from f64.
            let by: Vec<f32> = lens
                .iter()
                .map(|&n| (1.0 / if sqrt { (n as f64).sqrt() } else { n as f64 }) as f32)
                .collect();
            Ok(sum.broadcast_mul(&Tensor::from_vec(by, (b, 1), dev)?)?)
        };
        Ok(match self {
            Pooling::Cls => hidden.narrow(1, 0, 1)?.squeeze(1)?.contiguous()?,
            Pooling::Mean => scaled(false)?,
            Pooling::MeanSqrtLen => scaled(true)?,
            Pooling::Max => hidden
                .broadcast_add(&per_position(0.0, f32::NEG_INFINITY)?)?
                .max(1)?,
        })
    }

    /// Pool one sequence's hidden states `[s, h]` (padding already removed).
    ///
    /// Plain loops over the rows, in candle's order (`sum(0)` adds the rows first to last;
    /// `/ n` is candle's `affine(1 / n, 0)`): candle's reduction over the first dimension
    /// walks it with strides, ~2% of MiniLM's batch-32 run on the thread that also feeds the
    /// workers.
    pub fn apply(self, hidden: &Tensor) -> Result<Vec<f32>> {
        let (s, h) = hidden.dims2()?;
        // The rows' sum divided by `by` (the mean poolings only read the values this way).
        let scaled = |by: f64| -> Result<Vec<f32>> {
            let data = hidden.flatten_all()?.to_vec1::<f32>()?;
            let mut acc = vec![0f32; h];
            for row in data.chunks_exact(h.max(1)) {
                for (a, x) in acc.iter_mut().zip(row) {
                    *a += x;
                }
            }
            let mul = (1.0 / by) as f32;
            acc.iter_mut().for_each(|a| *a = *a * mul + 0.0);
            Ok(acc)
        };
        Ok(match self {
            Pooling::Cls => hidden.get(0)?.to_vec1()?,
            Pooling::Mean => scaled(s as f64)?,
            Pooling::MeanSqrtLen => scaled((s as f64).sqrt())?,
            Pooling::Max => hidden.max(0)?.to_vec1()?,
        })
    }
}

pub fn l2_normalize(v: &mut [f32]) {
    // torch.nn.functional.normalize: x / max(||x||, eps)
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
}

/// What a sentence-transformers folder says about pooling.
#[derive(Debug, Clone, Default)]
pub struct SentenceTransformerConfig {
    pub pooling: Option<Pooling>,
    pub normalize: bool,
    pub max_seq_length: Option<usize>,
}

impl SentenceTransformerConfig {
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let mut cfg = Self::default();
        let modules = dir.join("modules.json");
        let mut pooling_dir = dir.join("1_Pooling");
        if modules.is_file() {
            if let Value::Array(mods) = read_json(&modules)? {
                for m in mods {
                    let ty = m.get("type").and_then(Value::as_str).unwrap_or("");
                    let path = m.get("path").and_then(Value::as_str).unwrap_or("");
                    if ty.ends_with(".Normalize") {
                        cfg.normalize = true;
                    } else if ty.ends_with(".Pooling") {
                        pooling_dir = dir.join(path);
                    }
                }
            }
        }
        let pooling_cfg = pooling_dir.join("config.json");
        if pooling_cfg.is_file() {
            let v = read_json(&pooling_cfg)?;
            let on = |k: &str| v.get(k).and_then(Value::as_bool).unwrap_or(false);
            cfg.pooling = if on("pooling_mode_cls_token") {
                Some(Pooling::Cls)
            } else if on("pooling_mode_max_tokens") {
                Some(Pooling::Max)
            } else if on("pooling_mode_mean_sqrt_len_tokens") {
                Some(Pooling::MeanSqrtLen)
            } else if on("pooling_mode_mean_tokens") {
                Some(Pooling::Mean)
            } else {
                None
            };
        }
        let sbert = dir.join("sentence_bert_config.json");
        if sbert.is_file() {
            cfg.max_seq_length = read_json(&sbert)?
                .get("max_seq_length")
                .and_then(Value::as_u64)
                .map(|n| n as usize);
        }
        Ok(cfg)
    }
}

pub(crate) struct FeatureExtraction {
    runner: EncoderRunner,
    st: SentenceTransformerConfig,
    /// The tokenizer truncating at sentence-transformers' `max_seq_length`, for pooled output
    /// (and token output of the sentence-embeddings task).
    st_tokenizer: Option<Tokenizer>,
    default_pooling: bool,
}

impl FeatureExtraction {
    pub fn load(opts: &PipelineOptions, model: &str, default_pooling: bool) -> Result<Self> {
        let task = if default_pooling {
            "sentence-embeddings"
        } else {
            "feature-extraction"
        };
        let runner = EncoderRunner::load(opts, model, Head::Base, task)?;
        let dir = runner.config.path.parent().unwrap_or(Path::new("."));
        let st = SentenceTransformerConfig::from_dir(dir)?;
        let st_tokenizer = match st.max_seq_length {
            Some(n) if n < runner.tokenizer.max_length => {
                let mut t = runner.tokenizer.clone();
                t.set_max_length(n)?;
                Some(t)
            }
            _ => None,
        };
        Ok(Self {
            runner,
            st,
            st_tokenizer,
            default_pooling,
        })
    }
}

impl Task for FeatureExtraction {
    fn accepted_params(&self) -> &'static [&'static str] {
        &["pooling", "normalize", "truncation"]
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        let pooling = match param::opt_str(params, "pooling")? {
            Some("auto") => Some(self.st.pooling.unwrap_or(Pooling::Mean)),
            Some("none") => None,
            Some(s) => Some(Pooling::parse(s)?),
            None if self.default_pooling => Some(self.st.pooling.unwrap_or(Pooling::Mean)),
            None => None,
        };
        let normalize =
            param::opt_bool(params, "normalize")?.unwrap_or(pooling.is_some() && self.st.normalize);
        if normalize && pooling.is_none() {
            return Err(Error::param(
                "normalize",
                "normalize applies to pooled sentence embeddings; also pass pooling",
            ));
        }
        param::check_truncation(params)?;
        // sentence-transformers' own length limit for pooled output, and for token embeddings
        // of a sentence-embeddings pipeline (`encode(output_value="token_embeddings")`).
        let tokenizer = match &self.st_tokenizer {
            Some(t) if pooling.is_some() || self.default_pooling => t,
            _ => &self.runner.tokenizer,
        };
        let encs = super::encode_each(inputs, |i, inp| match inp {
            Input::Tokens(ids) => tokenizer.encoded_ids(ids, i),
            _ => {
                let (t, p) = inp.text_and_pair(i)?;
                tokenizer.encode(t, p)
            }
        })?;
        let mut outs = Vec::with_capacity(inputs.len());
        // On a GPU the pooling runs there, on whole batches (`Pooling::apply_batch`).
        let on_device = pooling.filter(|_| !self.runner.device.is_cpu());
        let pool = on_device.map(|p| {
            move |out: &Tensor, chunk: &[&super::Encoded]| -> Result<Tensor> {
                let lens: Vec<usize> = chunk.iter().map(|e| e.len()).collect();
                p.apply_batch(out, &lens)
            }
        });
        let reduce = pool.as_ref().map(|f| f as &super::BatchReduce);
        self.runner
            .run_reducing(&encs, batch_size, reduce, |_, hidden| {
                outs.push(match pooling {
                    Some(p) => {
                        let mut v = if on_device.is_some() {
                            hidden.to_vec1()?
                        } else {
                            p.apply(&hidden)?
                        };
                        if normalize {
                            l2_normalize(&mut v);
                        }
                        Output::Embedding(v)
                    }
                    None => Output::Features(vec![hidden.to_vec2()?]),
                });
                Ok(())
            })?;
        Ok(outs)
    }
}

/// Parse `{"source_sentence": .., "sentences": [..]}`.
pub(crate) fn similarity_from_json(
    o: &serde_json::Map<String, Value>,
    index: usize,
) -> Result<Input> {
    let source = o
        .get("source_sentence")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::input(index, "`source_sentence` must be a string"))?;
    let sentences = o
        .get("sentences")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::input(index, "`sentences` must be a list of strings"))?
        .iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| Error::input(index, "`sentences` must be a list of strings"))
        })
        .collect::<Result<Vec<_>>>()?;
    if sentences.is_empty() {
        return Err(Error::input(index, "`sentences` is empty"));
    }
    Ok(Input::Similarity {
        source_sentence: source.to_string(),
        sentences,
    })
}

/// `sentence-similarity` (the sentence-transformers / Inference API task): cosine similarity of
/// `source_sentence` to each of `sentences`, from normalised pooled embeddings.
pub(crate) struct SentenceSimilarity {
    inner: FeatureExtraction,
}

impl SentenceSimilarity {
    pub fn load(opts: &PipelineOptions, model: &str) -> Result<Self> {
        Ok(Self {
            inner: FeatureExtraction::load(opts, model, true)?,
        })
    }
}

impl Task for SentenceSimilarity {
    fn accepted_params(&self) -> &'static [&'static str] {
        &["pooling", "truncation"]
    }

    fn run(&self, inputs: &[Input], params: &Params, batch_size: usize) -> Result<Vec<Output>> {
        let mut params = params.clone();
        params.insert("normalize".into(), Value::Bool(true));
        let mut outs = Vec::with_capacity(inputs.len());
        for (i, input) in inputs.iter().enumerate() {
            let Input::Similarity {
                source_sentence,
                sentences,
            } = input
            else {
                return Err(Error::input(
                    i,
                    "sentence-similarity takes {\"source_sentence\": .., \"sentences\": [..]}",
                ));
            };
            let texts: Vec<Input> = std::iter::once(source_sentence)
                .chain(sentences)
                .map(|t| Input::Text(t.clone()))
                .collect();
            let embs = self.inner.run(&texts, &params, batch_size)?;
            let vecs: Vec<&Vec<f32>> = embs
                .iter()
                .filter_map(|o| match o {
                    Output::Embedding(v) => Some(v),
                    _ => None,
                })
                .collect();
            let scores = vecs[1..]
                .iter()
                .map(|v| v.iter().zip(vecs[0]).map(|(a, b)| a * b).sum::<f32>() as f64)
                .collect();
            outs.push(Output::Scores(scores));
        }
        Ok(outs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Whole-batch pooling (what a GPU runs) gives each row what the per-row pooling gives
    /// it, padding ignored.
    #[test]
    fn batch_pooling_equals_row_pooling() {
        let (b, s, h) = (3, 5, 4);
        let data: Vec<f32> = (0..b * s * h)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let batch = Tensor::from_vec(data, (b, s, h), &Device::Cpu).unwrap();
        let lens = [5, 2, 3];
        for p in [
            Pooling::Mean,
            Pooling::Cls,
            Pooling::Max,
            Pooling::MeanSqrtLen,
        ] {
            let pooled = p.apply_batch(&batch, &lens).unwrap();
            assert_eq!(pooled.dims(), &[b, h]);
            for (i, &n) in lens.iter().enumerate() {
                let row = batch.get(i).unwrap().narrow(0, 0, n).unwrap();
                let want = p.apply(&row).unwrap();
                let got: Vec<f32> = pooled.get(i).unwrap().to_vec1().unwrap();
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() <= 1e-6, "{p:?} row {i}: {got:?} vs {want:?}");
                }
            }
        }
        assert!(Pooling::Mean.apply_batch(&batch, &[5, 0, 3]).is_err());
        assert!(Pooling::Mean.apply_batch(&batch, &[5, 6, 3]).is_err());
        assert!(Pooling::Mean.apply_batch(&batch, &[5]).is_err());
    }

    #[test]
    fn pooling_modes() {
        let h = Tensor::new(&[[1f32, 4.0], [3.0, 2.0]], &Device::Cpu).unwrap();
        assert_eq!(Pooling::Mean.apply(&h).unwrap(), vec![2.0, 3.0]);
        assert_eq!(Pooling::Cls.apply(&h).unwrap(), vec![1.0, 4.0]);
        assert_eq!(Pooling::Max.apply(&h).unwrap(), vec![3.0, 4.0]);
        let mut v = vec![3.0, 4.0];
        l2_normalize(&mut v);
        assert_eq!(v, vec![0.6, 0.8]);
        assert!(Pooling::parse("median").is_err());
    }
}
