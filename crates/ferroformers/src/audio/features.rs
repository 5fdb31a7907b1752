//! Whisper's log-mel input features, as transformers 4.57's `WhisperFeatureExtractor` computes
//! them when torch is installed (`_torch_extract_fbank_features`, the path the pipeline takes).
//!
//! The steps, and where we compute them more exactly than torch (the outputs agree within ~1e-5,
//! which is torch's own float32 error):
//! 1. pad with `padding_value` / truncate to `n_samples` (`padding="max_length", truncation=True`);
//! 2. `torch.stft(center=True, pad_mode="reflect")` with a periodic Hann window, `|X|^2`, and
//!    the last frame dropped: we run the real FFT in f64 on the f32 window torch uses;
//! 3. the Slaney mel filter bank (`mel_filter_bank`, float64 in numpy, rounded to float32 by the
//!    torch path): we round the same way, multiply in f64, and only over each filter's non-zero
//!    bins;
//! 4. `clamp(min=1e-10).log10()`, floor at `max - 8`, then `(x + 4) / 4`: in f32 like torch.

use std::path::Path;
use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

use super::error;
use crate::error::{Error, Result};

/// transformers' `WhisperFeatureExtractor`: a waveform at `sampling_rate` Hz to the
/// `[feature_size][nb_max_frames]` log-mel matrix Whisper's encoder takes.
///
/// Config values the torch path ignores are ignored here too; `dither` (0 in every released
/// Whisper config) is not applied: its noise is random and could not be matched anyway.
#[derive(Clone)]
pub struct WhisperFeatureExtractor {
    pub feature_size: usize,
    pub sampling_rate: u32,
    pub hop_length: usize,
    pub n_fft: usize,
    pub chunk_length: usize,
    pub n_samples: usize,
    pub nb_max_frames: usize,
    pub padding_value: f32,
    /// torch.hann_window(n_fft) (periodic), f32 values widened to f64.
    window: Vec<f64>,
    /// Per mel bin: the first frequency bin with a non-zero weight, and the weights from there.
    filters: Vec<(usize, Vec<f64>)>,
    fft: Arc<dyn RealToComplex<f64>>,
}

impl std::fmt::Debug for WhisperFeatureExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WhisperFeatureExtractor")
            .field("feature_size", &self.feature_size)
            .field("sampling_rate", &self.sampling_rate)
            .field("hop_length", &self.hop_length)
            .field("n_fft", &self.n_fft)
            .field("chunk_length", &self.chunk_length)
            .field("n_samples", &self.n_samples)
            .field("nb_max_frames", &self.nb_max_frames)
            .field("padding_value", &self.padding_value)
            .finish_non_exhaustive()
    }
}

impl WhisperFeatureExtractor {
    /// HF's defaults (16 kHz, hop 160, n_fft 400, 30 s chunks) with `feature_size` mel bins
    /// (80 for Whisper up to large-v2, 128 for large-v3 and turbo).
    pub fn new(feature_size: usize) -> Self {
        Self::with(feature_size, 16000, 160, 30, 400, 0.0)
    }

    /// Reads a `preprocessor_config.json`; absent keys take HF's defaults. Stored `n_samples`,
    /// `nb_max_frames` and `mel_filters` are recomputed, as transformers does.
    pub fn from_preprocessor_config(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::invalid_file(path, e))?;
        let Some(obj) = json.as_object() else {
            return Err(Error::invalid_file(path, "expected a JSON object"));
        };
        if let Some(kind) = obj.get("feature_extractor_type").and_then(|v| v.as_str()) {
            if kind != "WhisperFeatureExtractor" {
                return Err(Error::invalid_file(
                    path,
                    format!(
                        "feature_extractor_type is `{kind}`, expected `WhisperFeatureExtractor`"
                    ),
                ));
            }
        }
        let positive = |key: &str, default: u64| -> Result<u64> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(default),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 && n <= u64::from(u32::MAX) => Ok(n),
                    _ => Err(Error::invalid_file(
                        path,
                        format!("`{key}` must be a positive integer, got {v}"),
                    )),
                },
            }
        };
        let feature_size = positive("feature_size", 80)? as usize;
        let sampling_rate = positive("sampling_rate", 16000)? as u32;
        let hop_length = positive("hop_length", 160)? as usize;
        let chunk_length = positive("chunk_length", 30)? as usize;
        let n_fft = positive("n_fft", 400)? as usize;
        let padding_value = match obj.get("padding_value") {
            None | Some(serde_json::Value::Null) => 0.0,
            Some(v) => v.as_f64().ok_or_else(|| {
                Error::invalid_file(path, format!("`padding_value` must be a number, got {v}"))
            })? as f32,
        };
        if chunk_length * sampling_rate as usize <= n_fft / 2 {
            return Err(Error::invalid_file(
                path,
                format!(
                    "chunk_length * sampling_rate ({} samples) must exceed n_fft / 2 ({}) for \
                     the STFT's reflect padding",
                    chunk_length * sampling_rate as usize,
                    n_fft / 2
                ),
            ));
        }
        Ok(Self::with(
            feature_size,
            sampling_rate,
            hop_length,
            chunk_length,
            n_fft,
            padding_value,
        ))
    }

    fn with(
        feature_size: usize,
        sampling_rate: u32,
        hop_length: usize,
        chunk_length: usize,
        n_fft: usize,
        padding_value: f32,
    ) -> Self {
        let n_samples = chunk_length * sampling_rate as usize;
        let bins = 1 + n_fft / 2;
        // The mel bank is float64 in transformers; the torch path casts it to float32.
        let bank = mel_filter_bank(bins, feature_size, 0.0, 8000.0, sampling_rate);
        let filters = (0..feature_size)
            .map(|m| {
                let column: Vec<f64> = (0..bins)
                    .map(|k| f64::from(bank[k * feature_size + m] as f32))
                    .collect();
                let first = column.iter().position(|&w| w != 0.0).unwrap_or(0);
                let last = column
                    .iter()
                    .rposition(|&w| w != 0.0)
                    .map_or(first, |l| l + 1);
                (first, column[first..last].to_vec())
            })
            .collect();
        Self {
            feature_size,
            sampling_rate,
            hop_length,
            n_fft,
            chunk_length,
            n_samples,
            nb_max_frames: n_samples / hop_length.max(1),
            padding_value,
            window: hann_window(n_fft),
            filters,
            fft: RealFftPlanner::<f64>::new().plan_fft_forward(n_fft.max(1)),
        }
    }

    /// Frames in one output row: the STFT's `1 + n_samples / hop_length` (even `n_fft`) minus
    /// the dropped last one, i.e. `nb_max_frames` (3000 for 30 s at 16 kHz).
    pub fn num_frames(&self) -> usize {
        self.frames_for(self.n_samples)
    }

    /// STFT frames of an `n`-sample waveform, without the dropped last one.
    fn frames_for(&self, n: usize) -> usize {
        (n + 2 * (self.n_fft / 2)).saturating_sub(self.n_fft) / self.hop_length.max(1)
    }

    /// Log-mel features of one 16 kHz (`sampling_rate`) waveform, padded with `padding_value`
    /// or truncated to `n_samples` first (HF's `padding="max_length", truncation=True`);
    /// row-major `[feature_size][num_frames()]`.
    pub fn extract(&self, samples: &[f32]) -> Result<Vec<f32>> {
        self.log_mel(samples, self.n_samples)
    }

    /// Log-mel features of the whole waveform, neither padded nor truncated (HF's
    /// `padding="longest", truncation=False`: what the pipeline asks for when a Whisper input
    /// is longer than 30 s and no `chunk_length_s` is given, for long-form generation).
    /// Returns the row-major `[feature_size][frames]` matrix and `frames`
    /// (`len / hop_length`); the `max - 8` floor is taken over the whole input.
    pub fn extract_longest(&self, samples: &[f32]) -> Result<(Vec<f32>, usize)> {
        let features = self.log_mel(samples, samples.len())?;
        Ok((features, self.frames_for(samples.len())))
    }

    /// Features of `samples` padded or truncated to `n` samples.
    fn log_mel(&self, samples: &[f32], n: usize) -> Result<Vec<f32>> {
        let pad = self.n_fft / 2;
        if n <= pad || self.n_fft == 0 || self.hop_length == 0 {
            return Err(error(
                "feature extraction",
                format!(
                    "a waveform of {n} samples is too short for the STFT's reflect padding \
                     (needs more than n_fft / 2 = {pad}; n_fft {}, hop_length {})",
                    self.n_fft, self.hop_length
                ),
            ));
        }
        // Padded/truncated waveform with torch.stft's reflect padding (the edge sample is not
        // repeated) on both sides.
        let mut padded = Vec::with_capacity(n + 2 * pad);
        let wave = |i: usize| samples.get(i).copied().unwrap_or(self.padding_value);
        padded.extend((1..=pad).rev().map(wave));
        padded.extend((0..n).map(wave));
        padded.extend((n - 1 - pad..n - 1).rev().map(wave));

        let frames = self.frames_for(n);
        let bins = 1 + self.n_fft / 2;
        let mut input = vec![0.0f64; self.n_fft];
        let mut spectrum = self.fft.make_output_vec();
        let mut scratch = self.fft.make_scratch_vec();
        let mut power = vec![0.0f64; bins];
        let mut out = vec![0.0f32; self.feature_size * frames];
        for t in 0..frames {
            let frame = &padded[t * self.hop_length..t * self.hop_length + self.n_fft];
            if frame.iter().all(|&s| s == 0.0) {
                // Silence padding: the spectrum is exactly zero, the FFT can be skipped.
                for m in 0..self.feature_size {
                    out[m * frames + t] = 1e-10f32.log10();
                }
                continue;
            }
            for ((x, &s), &w) in input.iter_mut().zip(frame).zip(&self.window) {
                *x = f64::from(s) * w;
            }
            self.fft
                .process_with_scratch(&mut input, &mut spectrum, &mut scratch)
                .map_err(|e| error("feature extraction", format!("FFT failed: {e}")))?;
            for (p, c) in power.iter_mut().zip(&spectrum) {
                *p = c.re * c.re + c.im * c.im;
            }
            for (m, (first, weights)) in self.filters.iter().enumerate() {
                let energy: f64 = weights
                    .iter()
                    .zip(&power[*first..])
                    .map(|(w, p)| w * p)
                    .sum();
                out[m * frames + t] = (energy as f32).max(1e-10).log10();
            }
        }
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = max - 8.0;
        for v in &mut out {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
        Ok(out)
    }
}

/// `torch.hann_window(n)` (periodic): `0.5 - 0.5 cos(2 pi i / n)`, rounded to f32 as torch
/// stores it.
fn hann_window(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| {
            let w = 0.5 - 0.5 * (2.0 * std::f64::consts::PI * i as f64 / n as f64).cos();
            f64::from(w as f32)
        })
        .collect()
}

/// transformers' `audio_utils.mel_filter_bank(..., norm="slaney", mel_scale="slaney")`: a
/// row-major `[num_frequency_bins][num_mel_filters]` float64 matrix, computed with numpy's
/// operation order (`linspace`, triangular slopes, area normalisation).
pub fn mel_filter_bank(
    num_frequency_bins: usize,
    num_mel_filters: usize,
    min_frequency: f64,
    max_frequency: f64,
    sampling_rate: u32,
) -> Vec<f64> {
    let mel_min = hertz_to_mel(min_frequency);
    let mel_max = hertz_to_mel(max_frequency);
    let filter_freqs: Vec<f64> = linspace(mel_min, mel_max, num_mel_filters + 2)
        .into_iter()
        .map(mel_to_hertz)
        .collect();
    let fft_freqs = linspace(0.0, f64::from(sampling_rate / 2), num_frequency_bins.max(1));
    let mut bank = vec![0.0f64; num_frequency_bins * num_mel_filters];
    for (k, &f) in fft_freqs.iter().enumerate().take(num_frequency_bins) {
        for m in 0..num_mel_filters {
            let (lo, centre, hi) = (filter_freqs[m], filter_freqs[m + 1], filter_freqs[m + 2]);
            let down = -(lo - f) / (centre - lo);
            let up = (hi - f) / (hi - centre);
            let enorm = 2.0 / (hi - lo);
            bank[k * num_mel_filters + m] = 0.0f64.max(down.min(up)) * enorm;
        }
    }
    bank
}

/// `np.linspace(start, stop, num)`: `start + i * step`, with the last point exactly `stop`.
fn linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    (0..num)
        .map(|i| {
            if i + 1 == num {
                stop
            } else {
                i as f64 * step + start
            }
        })
        .collect()
}

const MIN_LOG_HERTZ: f64 = 1000.0;
const MIN_LOG_MEL: f64 = 15.0;

/// Slaney's mel scale: linear below 1 kHz, logarithmic above.
fn hertz_to_mel(freq: f64) -> f64 {
    if freq >= MIN_LOG_HERTZ {
        MIN_LOG_MEL + (freq / MIN_LOG_HERTZ).ln() * (27.0 / 6.4f64.ln())
    } else {
        3.0 * freq / 200.0
    }
}

fn mel_to_hertz(mels: f64) -> f64 {
    if mels >= MIN_LOG_MEL {
        MIN_LOG_HERTZ * ((6.4f64.ln() / 27.0) * (mels - MIN_LOG_MEL)).exp()
    } else {
        200.0 * mels / 3.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_hf() {
        let fe = WhisperFeatureExtractor::new(80);
        assert_eq!(
            (fe.sampling_rate, fe.hop_length, fe.n_fft, fe.chunk_length),
            (16000, 160, 400, 30)
        );
        assert_eq!(
            (fe.n_samples, fe.nb_max_frames, fe.num_frames()),
            (480000, 3000, 3000)
        );
    }

    #[test]
    fn mel_filter_rows_match_transformers() {
        // WhisperFeatureExtractor(feature_size=80).mel_filters (float64), transformers 4.57.1.
        let bank = mel_filter_bank(201, 80, 0.0, 8000.0, 16000);
        let at = |k: usize, m: usize| bank[k * 80 + m];
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * b.abs().max(1.0);
        assert!(close(at(1, 0), 0.024_862_593_984_176_087), "{}", at(1, 0));
        assert!(close(at(1, 1), 0.001_990_821_888_098_070_6), "{}", at(1, 1));
        assert!(close(at(2, 1), 0.022_871_772_096_078_023), "{}", at(2, 1));
        assert!(
            close(at(43, 40), 0.014_735_565_741_439_168),
            "{}",
            at(43, 40)
        );
        assert!(
            close(at(186, 79), 0.000_366_741_679_784_925_85),
            "{}",
            at(186, 79)
        );
        // Non-zero spans: filter 0 is bin 1 alone, filter 40 bins 42..=44, filter 79 186..=199.
        let span = |m: usize| -> Vec<usize> { (0..201).filter(|&k| at(k, m) != 0.0).collect() };
        assert_eq!(span(0), vec![1]);
        assert_eq!(span(40), vec![42, 43, 44]);
        assert_eq!(span(79), (186..=199).collect::<Vec<_>>());
    }

    #[test]
    fn silence_is_the_floor_everywhere() {
        let fe = WhisperFeatureExtractor::new(80);
        let out = fe.extract(&[]).expect("silence");
        assert_eq!(out.len(), 80 * 3000);
        // log10(1e-10) = -10, the maximum too, so (x + 4) / 4 = -1.5 everywhere.
        assert!(out.iter().all(|&v| v == -1.5), "{:?}", &out[..4]);
    }

    #[test]
    fn config_errors_name_the_problem() {
        let dir = std::env::temp_dir().join(format!("ff-audio-fe-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("preprocessor_config.json");
        std::fs::write(&path, r#"{"feature_size": 128, "sampling_rate": 0}"#).expect("write");
        let msg = WhisperFeatureExtractor::from_preprocessor_config(&path)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("sampling_rate"), "{msg}");
        std::fs::write(&path, r#"{"feature_size": 128}"#).expect("write");
        let fe = WhisperFeatureExtractor::from_preprocessor_config(&path).expect("defaults");
        assert_eq!((fe.feature_size, fe.nb_max_frames), (128, 3000));
        std::fs::write(&path, "not json").expect("write");
        assert!(WhisperFeatureExtractor::from_preprocessor_config(&path).is_err());
        std::fs::remove_dir_all(&dir).ok();
    }
}
