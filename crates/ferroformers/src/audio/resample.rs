//! `torchaudio.functional.resample` (sinc_interp_hann, lowpass_filter_width 6, rolloff 0.99),
//! the resampler transformers' speech pipeline applies to `{"raw", "sampling_rate"}` inputs.
//!
//! torchaudio reduces the two rates by their gcd to `orig : new`, builds `new` windowed-sinc
//! filters (one per output phase) over `2 * width + orig` input taps, and runs them as a conv1d
//! with stride `orig` over the waveform zero-padded by `width` on the left and `width + orig` on
//! the right. We build the same kernel with the same float32 operations (see [`kernel`]) and
//! accumulate each output in f64; the result is within ~1e-7 of torch's f32 convolution.

use super::error;
use crate::error::Result;

const LOWPASS_FILTER_WIDTH: f64 = 6.0;
const ROLLOFF: f64 = 0.99;

/// Resamples `samples` from `from` Hz to `to` Hz exactly like
/// `torchaudio.functional.resample(x, from, to)` with its defaults; the output has
/// `ceil(len * to / from)` samples. Equal rates return the input unchanged.
pub fn resample(samples: &[f32], from: u32, to: u32) -> Result<Vec<f32>> {
    if from == 0 || to == 0 {
        return Err(error(
            "resampling",
            format!("sampling rates must be positive (got {from} Hz -> {to} Hz)"),
        ));
    }
    if from == to {
        return Ok(samples.to_vec());
    }
    let g = gcd(from, to);
    let (orig, new) = ((from / g) as usize, (to / g) as usize);
    let (rows, width) = kernel(orig, new);

    let len = samples.len();
    let frames = len / orig + 1;
    let target = (new as u64 * len as u64).div_ceil(orig as u64) as usize;
    let mut out = Vec::with_capacity(frames * new);
    'frames: for frame in 0..frames {
        // Index into the unpadded waveform of the frame's first tap.
        let origin = (frame * orig) as isize - width as isize;
        for row in &rows {
            if out.len() == target {
                break 'frames;
            }
            let first = origin + row.offset as isize;
            let mut acc = 0.0f64;
            for (i, &k) in row.taps.iter().enumerate() {
                let at = first + i as isize;
                if at >= 0 && (at as usize) < len {
                    acc += f64::from(k) * f64::from(samples[at as usize]);
                }
            }
            out.push(acc as f32);
        }
    }
    Ok(out)
}

/// One output phase's filter: its non-zero span, starting `offset` taps into the full kernel.
struct Row {
    offset: usize,
    taps: Vec<f32>,
}

/// torchaudio's `_get_sinc_resample_kernel` for gcd-reduced rates: `new` rows and the padding
/// `width`.
///
/// `resample` passes the waveform's dtype down, so for f32 audio every kernel tensor op runs in
/// float32, Python scalars included (rounded to f32 first); we repeat those ops in the same
/// order. Taps whose time falls outside the six zero crossings (clamped to +-6) are ~1e-22 and
/// are dropped: they cannot move an f32 output.
fn kernel(orig: usize, new: usize) -> (Vec<Row>, usize) {
    let base_freq = orig.min(new) as f64 * ROLLOFF;
    let width = (LOWPASS_FILTER_WIDTH * orig as f64 / base_freq).ceil() as usize;
    let n_taps = 2 * width + orig;
    let (base_freq32, scale32) = (base_freq as f32, (base_freq / orig as f64) as f32);
    let lpw = LOWPASS_FILTER_WIDTH as f32;
    let pi = std::f32::consts::PI;
    let rows = (0..new)
        .map(|j| {
            let phase = -(j as f32) / new as f32;
            let times: Vec<f32> = (0..n_taps)
                .map(|i| {
                    let idx = (i as f32 - width as f32) / orig as f32;
                    ((phase + idx) * base_freq32).clamp(-lpw, lpw)
                })
                .collect();
            let first = times.iter().position(|t| t.abs() < lpw).unwrap_or(0);
            let last = times
                .iter()
                .rposition(|t| t.abs() < lpw)
                .map_or(first, |l| l + 1);
            let taps = times[first..last]
                .iter()
                .map(|&t| {
                    let window = (t * pi / lpw / 2.0).cos();
                    let window = window * window;
                    let t = t * pi;
                    let sinc = if t == 0.0 { 1.0 } else { t.sin() / t };
                    sinc * (window * scale32)
                })
                .collect();
            Row {
                offset: first,
                taps,
            }
        })
        .collect();
    (rows, width)
}

fn gcd(mut a: u32, mut b: u32) -> u32 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_returns_the_input() {
        let x = [0.25f32, -0.5, 1.0];
        assert_eq!(resample(&x, 16000, 16000).expect("same rate"), x.to_vec());
        assert!(resample(&[], 16000, 16000).expect("empty").is_empty());
    }

    #[test]
    fn zero_rate_is_an_error() {
        let msg = resample(&[0.0], 0, 16000).unwrap_err().to_string();
        assert!(msg.contains("0 Hz"), "{msg}");
        assert!(resample(&[0.0], 16000, 0).is_err());
    }

    #[test]
    fn output_length_is_ceil_of_the_ratio() {
        for (len, from, to, want) in [
            (8001, 8000, 16000, 16002),
            (44101, 44100, 16000, 16001),
            (7, 16000, 22050, 10),
            (0, 48000, 16000, 0),
            (1, 48000, 16000, 1),
        ] {
            let x = vec![0.1f32; len];
            assert_eq!(resample(&x, from, to).expect("resample").len(), want);
        }
    }

    #[test]
    fn kernel_of_2x_upsampling_matches_torchaudio() {
        // torchaudio._get_sinc_resample_kernel(8000, 16000, 8000): width 7, taps 15 (row 0 is
        // symmetric and peaks at rolloff = 0.99).
        let (rows, width) = kernel(1, 2);
        assert_eq!(width, 7);
        assert_eq!(rows[0].offset + rows[0].taps.len(), 14);
        let centre = rows[0].taps[7 - rows[0].offset];
        assert!((centre - 0.99).abs() < 1e-7, "{centre}");
        let half = &rows[1];
        let peak = half.taps[7 - half.offset];
        assert!((peak - 0.62591).abs() < 1e-5, "{peak}");
    }

    #[test]
    fn a_dc_signal_stays_dc_away_from_the_edges() {
        let x = vec![0.5f32; 4410];
        let y = resample(&x, 44100, 16000).expect("resample");
        for &v in &y[100..y.len() - 100] {
            assert!((v - 0.5).abs() < 1e-3, "{v}");
        }
    }
}
