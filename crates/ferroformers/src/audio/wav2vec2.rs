//! `Wav2Vec2FeatureExtractor` (transformers 4.57): the waveform itself is the model's input
//! (`input_values`), zero-mean unit-variance normalized per input when `do_normalize` is set.
//!
//! The normalization is numpy's float32 arithmetic reproduced bit for bit: `x.mean()` and
//! `x.var()` are float32 pairwise sums ([`pairwise_sum`], numpy's summation order) divided by
//! the count in float64 and rounded to float32, then `(x - mean) / sqrt(var + 1e-7)` in float32. Over a padded batch with an
//! attention mask the statistics cover each input's real length and the padding is set back to
//! `padding_value`; without a mask (HF's quirk) they cover the padding too.

use std::path::Path;

use crate::error::{Error, Result};

/// transformers' `Wav2Vec2FeatureExtractor`, from a `preprocessor_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Wav2Vec2FeatureExtractor {
    pub feature_size: usize,
    pub sampling_rate: u32,
    pub padding_value: f32,
    pub do_normalize: bool,
    /// Whether a padded batch comes with an attention mask by default.
    pub return_attention_mask: bool,
}

impl Default for Wav2Vec2FeatureExtractor {
    /// HF's defaults: 16 kHz, normalized, padding 0.0, no attention mask.
    fn default() -> Self {
        Self {
            feature_size: 1,
            sampling_rate: 16000,
            padding_value: 0.0,
            do_normalize: true,
            return_attention_mask: false,
        }
    }
}

/// A padded batch: `input_values` `[b][longest]` and, when asked for, the 0/1 attention mask.
#[derive(Debug, Clone, PartialEq)]
pub struct PaddedValues {
    pub input_values: Vec<Vec<f32>>,
    pub attention_mask: Option<Vec<Vec<u32>>>,
}

impl Wav2Vec2FeatureExtractor {
    /// Reads a `preprocessor_config.json`; absent keys take HF's defaults.
    pub fn from_preprocessor_config(path: &Path) -> Result<Self> {
        let json = crate::config::read_json(path)?;
        let Some(obj) = json.as_object() else {
            return Err(Error::invalid_file(path, "expected a JSON object"));
        };
        if let Some(kind) = obj.get("feature_extractor_type").and_then(|v| v.as_str()) {
            if kind != "Wav2Vec2FeatureExtractor" {
                return Err(Error::invalid_file(
                    path,
                    format!(
                        "feature_extractor_type is `{kind}`, expected `Wav2Vec2FeatureExtractor`"
                    ),
                ));
            }
        }
        let mut fe = Self::default();
        let bool_key = |key: &str, default: bool| -> Result<bool> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => v.as_bool().ok_or_else(|| {
                    Error::invalid_file(path, format!("`{key}` must be true or false, got {v}"))
                }),
            }
        };
        fe.do_normalize = bool_key("do_normalize", fe.do_normalize)?;
        fe.return_attention_mask = bool_key("return_attention_mask", fe.return_attention_mask)?;
        if let Some(v) = obj.get("sampling_rate").filter(|v| !v.is_null()) {
            fe.sampling_rate = v
                .as_u64()
                .filter(|r| *r > 0 && *r <= u64::from(u32::MAX))
                .ok_or_else(|| {
                    Error::invalid_file(
                        path,
                        format!("`sampling_rate` must be a positive integer, got {v}"),
                    )
                })? as u32;
        }
        if let Some(v) = obj.get("feature_size").filter(|v| !v.is_null()) {
            fe.feature_size = v.as_u64().unwrap_or(0) as usize;
            if fe.feature_size != 1 {
                return Err(Error::invalid_file(
                    path,
                    format!("`feature_size` is {v}: only mono waveforms (1) are supported"),
                ));
            }
        }
        if let Some(v) = obj.get("padding_value").filter(|v| !v.is_null()) {
            fe.padding_value = v.as_f64().ok_or_else(|| {
                Error::invalid_file(path, format!("`padding_value` must be a number, got {v}"))
            })? as f32;
        }
        if let Some(side) = obj.get("padding_side").and_then(|v| v.as_str()) {
            if side != "right" {
                return Err(Error::invalid_file(
                    path,
                    format!("`padding_side` is `{side}`: only right padding is supported"),
                ));
            }
        }
        Ok(fe)
    }

    /// HF's check of `sampling_rate=`: a waveform at another rate is refused (resample first).
    pub fn check_rate(&self, sampling_rate: u32) -> Result<()> {
        if sampling_rate != self.sampling_rate {
            return Err(Error::param(
                "sampling_rate",
                format!(
                    "the model's feature extractor was trained at {} Hz; the waveform is at \
                     {sampling_rate} Hz: resample it to {} Hz first",
                    self.sampling_rate, self.sampling_rate
                ),
            ));
        }
        Ok(())
    }

    /// One waveform as the model's `input_values` (HF's call without padding: normalized over
    /// the whole waveform when `do_normalize`).
    pub fn extract(&self, samples: &[f32]) -> Vec<f32> {
        if self.do_normalize {
            normalize(samples, samples.len(), self.padding_value)
        } else {
            samples.to_vec()
        }
    }

    /// Waveforms padded to the longest with `padding_value` (HF's `padding=True`), normalized
    /// as HF does; `return_attention_mask` `None` takes the extractor's default.
    pub fn extract_padded(
        &self,
        waves: &[&[f32]],
        return_attention_mask: Option<bool>,
    ) -> PaddedValues {
        let longest = waves.iter().map(|w| w.len()).max().unwrap_or(0);
        let with_mask = return_attention_mask.unwrap_or(self.return_attention_mask);
        let mut values = Vec::with_capacity(waves.len());
        let mut mask = Vec::with_capacity(waves.len());
        for w in waves {
            let mut row = w.to_vec();
            row.resize(longest, self.padding_value);
            if self.do_normalize {
                // With a mask the statistics stop at the input's end; without one they run over
                // the padding as well (transformers' behaviour).
                let len = if with_mask { w.len() } else { longest };
                row = normalize(&row, len, self.padding_value);
            }
            values.push(row);
            let mut m = vec![1u32; w.len()];
            m.resize(longest, 0);
            mask.push(m);
        }
        PaddedValues {
            input_values: values,
            attention_mask: with_mask.then_some(mask),
        }
    }
}

/// `zero_mean_unit_var_norm` for one row: statistics over `x[..len]`, every value normalized,
/// values from `len` on set to `padding_value`.
fn normalize(x: &[f32], len: usize, padding_value: f32) -> Vec<f32> {
    let len = len.min(x.len());
    let real = &x[..len];
    // numpy divides the float32 sum by an integer count in float64, then rounds to float32.
    let n = len as f64;
    let mean = (f64::from(pairwise_sum(real)) / n) as f32;
    let centered: Vec<f32> = real.iter().map(|&v| (v - mean) * (v - mean)).collect();
    let var = (f64::from(pairwise_sum(&centered)) / n) as f32;
    let std = (var + 1e-7f32).sqrt();
    let mut out: Vec<f32> = x.iter().map(|&v| (v - mean) / std).collect();
    for v in &mut out[len..] {
        *v = padding_value;
    }
    out
}

/// numpy's float32 `add.reduce` over a contiguous array (`pairwise_sum` in its loops): blocks of
/// up to 128 summed in 8 interleaved lanes, larger ranges split in two (at a multiple of 8).
pub fn pairwise_sum(a: &[f32]) -> f32 {
    let n = a.len();
    if n < 8 {
        // numpy starts from -0.0 (keeps the sign of zeros).
        a.iter().fold(-0.0f32, |s, &v| s + v)
    } else if n <= 128 {
        let mut r = [0f32; 8];
        r.copy_from_slice(&a[..8]);
        let whole = n - n % 8;
        let mut i = 8;
        while i < whole {
            for j in 0..8 {
                r[j] += a[i + j];
            }
            i += 8;
        }
        let mut res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for &v in &a[whole..] {
            res += v;
        }
        res
    } else {
        let mut n2 = n / 2;
        n2 -= n2 % 8;
        pairwise_sum(&a[..n2]) + pairwise_sum(&a[n2..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairwise_sum_is_numpys() {
        // np.sum(np.arange(n, dtype=np.float32) * np.float32(0.1)) for these n.
        let v = |n: usize| -> Vec<f32> { (0..n).map(|i| i as f32 * 0.1f32).collect() };
        assert_eq!(pairwise_sum(&v(5)), 1.0);
        assert_eq!(pairwise_sum(&[]), 0.0);
        // Exact sums of small integers do not depend on the order.
        let ints: Vec<f32> = (0..1000).map(|i| (i % 7) as f32).collect();
        assert_eq!(pairwise_sum(&ints), ints.iter().sum::<f32>());
    }

    #[test]
    fn normalization_covers_the_real_length_with_a_mask() {
        let fe = Wav2Vec2FeatureExtractor {
            padding_value: 0.5,
            ..Default::default()
        };
        let a = [1.0f32, 3.0];
        let b = [1.0f32, 2.0, 3.0, 6.0];
        let p = fe.extract_padded(&[&a, &b], Some(true));
        let row = &p.input_values[0];
        assert!((row[0] + 1.0).abs() < 1e-6 && (row[1] - 1.0).abs() < 1e-6);
        assert_eq!(&row[2..], &[0.5, 0.5]);
        assert_eq!(p.attention_mask.unwrap()[0], vec![1, 1, 0, 0]);
        // Without a mask the padding counts in the statistics.
        let p = fe.extract_padded(&[&a, &b], Some(false));
        assert!(p.attention_mask.is_none());
        assert_eq!(p.input_values[0], normalize(&[1.0, 3.0, 0.5, 0.5], 4, 0.5));
        assert_eq!(fe.extract(&b), p.input_values[1]);
    }
}
