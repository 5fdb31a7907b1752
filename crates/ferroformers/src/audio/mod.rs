//! Audio inputs for speech pipelines: decoding files to mono samples, resampling, Whisper's
//! log-mel features and wav2vec2's normalized waveforms.
//!
//! The reference is what transformers' `automatic-speech-recognition` pipeline feeds its model:
//! - a file or bytes go through `ffmpeg -i pipe:0 -ac 1 -ar 16000 -f f32le`
//!   ([`decode_file`]/[`decode_bytes`] reproduce ffmpeg's sample conversion and downmix, then
//!   [`Audio::to_rate`] resamples);
//! - a `{"raw", "sampling_rate"}` waveform at another rate goes through
//!   `torchaudio.functional.resample` ([`resample`], exact);
//! - the 16 kHz waveform becomes `input_features` through `WhisperFeatureExtractor`
//!   ([`WhisperFeatureExtractor::extract`]), or wav2vec2's normalized `input_values` through
//!   [`Wav2Vec2FeatureExtractor`].

mod decode;
mod features;
mod resample;
mod wav2vec2;

pub use decode::{decode_bytes, decode_file};
pub use features::{mel_filter_bank, WhisperFeatureExtractor};
pub use resample::resample;
pub use wav2vec2::{pairwise_sum, PaddedValues, Wav2Vec2FeatureExtractor};

use crate::error::{Error, Result};

/// A mono waveform: samples nominally in [-1, 1] (a downmix may exceed it; ffmpeg does not clip
/// float output either) at `sampling_rate` Hz.
#[derive(Debug, Clone, PartialEq)]
pub struct Audio {
    pub samples: Vec<f32>,
    pub sampling_rate: u32,
}

impl Audio {
    /// Length in seconds.
    pub fn duration_s(&self) -> f64 {
        if self.sampling_rate == 0 {
            return 0.0;
        }
        self.samples.len() as f64 / f64::from(self.sampling_rate)
    }

    /// The same audio at `rate` Hz, through [`resample`] (torchaudio's sinc resampler).
    ///
    /// For decoded files this is where we part from transformers: `ffmpeg_read` resamples with
    /// ffmpeg's default swr resampler, which cannot be reproduced bit for bit; we use the
    /// torchaudio-exact resampler instead (the one the pipeline applies to raw waveforms). On
    /// our fixtures the two differ by up to 4e-3..2e-2 per sample (most at 8 kHz, where swr's
    /// longer filter keeps more of the band near Nyquist) and the length by at most one sample
    /// (see tests/fixtures/audio/README.md).
    pub fn to_rate(&self, rate: u32) -> Result<Audio> {
        Ok(Audio {
            samples: resample(&self.samples, self.sampling_rate, rate)?,
            sampling_rate: rate,
        })
    }
}

/// An `Error::Audio` about `what` (a file, bytes, a parameter).
pub(crate) fn error(what: impl ToString, detail: impl ToString) -> Error {
    Error::Audio {
        what: what.to_string(),
        detail: detail.to_string(),
    }
}
