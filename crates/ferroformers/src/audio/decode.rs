//! Audio files to mono f32 samples at their own rate, as ffmpeg converts and downmixes them.
//!
//! transformers reads files with `ffmpeg -i pipe:0 -ac 1 -ar 16000 -f f32le`. We decode with
//! symphonia (pure Rust: WAV, FLAC, MP3, OGG/Vorbis) and reproduce the two ffmpeg steps that
//! come before resampling, bit for bit:
//!
//! - **Sample conversion** (libswresample's `audioconvert.c`): integers become floats by one
//!   exact power-of-two scaling: `u8` `(x - 128) / 128`, `s16` `x / 32768`, `s24` `x / 2^23`,
//!   `s32` `float(x) / 2^31` (rounded to f32 first, as C's int-to-float does).
//! - **Downmix for `-ac 1`** (libswresample's `swr_build_matrix`, measured with Debian's ffmpeg
//!   5.1): stereo becomes `0.70710677 * L + 0.70710677 * R` (M_SQRT1_2 each, in f32, no
//!   normalisation and no clipping because the output format is float). With more channels each
//!   one gets a weight by position: front left/right (and their centre-side neighbours) M_SQRT1_2,
//!   front centre 1, LFE 0, back/side 0.5, top 0, summed in channel order in f32 (f64 input is
//!   mixed in f64 and rounded once, as swr's double path does).
//!
//! Caveats: a plain (non-`WAVE_FORMAT_EXTENSIBLE`) WAV with 3, 4, 5, 7 or 8 channels has no
//! channel mask; symphonia then assumes the first N positions while ffmpeg assumes its default
//! layouts (2.1, 4.0, 5.0, 6.1, 7.1), so such files mix differently. MP3 and Vorbis are lossy
//! codecs whose decoders differ from ffmpeg's in rounding (below 1e-6 on our fixtures).

use std::io::Cursor;
use std::path::Path;

use symphonia::core::audio::{AudioBufferRef, Channels, Signal};
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymphoniaError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::{MediaSource, MediaSourceStream};
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::{error, Audio};
use crate::error::{Error, Result};

const SUPPORTED: &str = "WAV (8/16/24/32-bit PCM, 32/64-bit float), FLAC, MP3, OGG/Vorbis";

/// Decodes an audio file to mono samples at the file's own sampling rate.
///
/// The extension is only a hint: the container is recognised from its content. The file is
/// read whole, as transformers does before piping it to ffmpeg.
pub fn decode_file(path: &Path) -> Result<Audio> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    decode(bytes, hint, &format!("file `{}`", path.display()))
}

/// Decodes in-memory audio file contents (what `ffmpeg_read` receives) to mono samples at the
/// file's own sampling rate.
pub fn decode_bytes(bytes: &[u8]) -> Result<Audio> {
    decode(
        bytes.to_vec(),
        Hint::new(),
        &format!("bytes ({} bytes)", bytes.len()),
    )
}

fn decode(bytes: Vec<u8>, hint: Hint, what: &str) -> Result<Audio> {
    if bytes.is_empty() {
        return Err(error(what, "no data (empty input)"));
    }
    // symphonia 0.5 panics on a few malformed inputs instead of returning an error: on this
    // one (a WAV declaring 0 Hz) before it gets the chance, on any other by catching the panic.
    if wav_sampling_rate(&bytes) == Some(0) {
        return Err(error(
            what,
            "the WAV header declares a sampling rate of 0 Hz",
        ));
    }
    let source: Box<dyn MediaSource> = Box::new(Cursor::new(bytes));
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        decode_stream(source, hint, what)
    }))
    .unwrap_or_else(|panic| {
        let reason = crate::error::panic_message(&*panic).unwrap_or_default();
        Err(error(
            what,
            format!("corrupt audio file (the decoder failed: {reason})"),
        ))
    })
}

/// The sampling rate in a RIFF/WAVE `fmt ` chunk, if `bytes` start like a WAV file.
fn wav_sampling_rate(bytes: &[u8]) -> Option<u32> {
    let u32_at = |at: usize| -> Option<u32> {
        let b = bytes.get(at..at + 4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    if bytes.get(..4)? != b"RIFF" || bytes.get(8..12)? != b"WAVE" {
        return None;
    }
    let mut at = 12usize;
    while let Some(id) = bytes.get(at..at + 4) {
        let size = u32_at(at + 4)? as usize;
        if id == b"fmt " {
            return u32_at(at + 12);
        }
        at = at.checked_add(8 + size + (size & 1))?;
    }
    None
}

fn decode_stream(source: Box<dyn MediaSource>, hint: Hint, what: &str) -> Result<Audio> {
    let stream = MediaSourceStream::new(source, Default::default());
    // Gapless: drop the encoder delay and padding of MP3 (LAME tag) and Vorbis, as ffmpeg does.
    let format_opts = FormatOptions {
        enable_gapless: true,
        ..Default::default()
    };
    let probed = symphonia::default::get_probe()
        .format(&hint, stream, &format_opts, &MetadataOptions::default())
        .map_err(|e| match e {
            SymphoniaError::Unsupported(_) => error(
                what,
                format!("unsupported or unrecognised audio format (supported: {SUPPORTED})"),
            ),
            e => error(what, format!("corrupt or truncated audio file: {e}")),
        })?;
    let mut reader = probed.format;
    let track = reader
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| error(what, "the file has no audio track"))?;
    let track_id = track.id;
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| {
            error(
                what,
                format!("unsupported audio codec ({e}; supported: {SUPPORTED})"),
            )
        })?;

    let mut samples = Vec::new();
    let mut sampling_rate = track.codec_params.sample_rate.unwrap_or(0);
    let mut skipped = 0usize;
    let mut last_error = None;
    loop {
        let packet = match reader.next_packet() {
            Ok(packet) => packet,
            // The end of the stream (symphonia has no other way to say so), also for a file
            // cut short: like ffmpeg, keep what was decoded.
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(SymphoniaError::ResetRequired) => break,
            // Damage the demuxer cannot step over after some audio: keep that audio (ffmpeg
            // would resync and go on; failing would lose everything).
            Err(SymphoniaError::DecodeError(_)) if !samples.is_empty() => break,
            Err(e) => return Err(error(what, format!("corrupt audio stream: {e}"))),
        };
        if packet.track_id() != track_id {
            continue;
        }
        match decoder.decode(&packet) {
            Ok(buffer) => {
                sampling_rate = buffer.spec().rate;
                mix_to_mono(&buffer, &mut samples);
            }
            // ffmpeg skips a damaged packet and goes on; so do we.
            Err(SymphoniaError::DecodeError(e)) => {
                skipped += 1;
                last_error = Some(e);
            }
            Err(SymphoniaError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                break
            }
            Err(e) => return Err(error(what, format!("cannot decode audio: {e}"))),
        }
    }
    if samples.is_empty() {
        let why = match last_error {
            Some(e) => format!("no audio could be decoded ({skipped} damaged packets: {e})"),
            None => "the file contains no audio samples (empty audio)".to_string(),
        };
        return Err(error(what, why));
    }
    if sampling_rate == 0 {
        return Err(error(what, "the file declares a sampling rate of 0 Hz"));
    }
    Ok(Audio {
        samples,
        sampling_rate,
    })
}

/// ffmpeg's weight of one channel position when downmixing to mono (see the module docs).
fn position_weight(position: Channels) -> f32 {
    const SQRT1_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
    if position.intersects(
        Channels::FRONT_LEFT
            | Channels::FRONT_RIGHT
            | Channels::FRONT_LEFT_CENTRE
            | Channels::FRONT_RIGHT_CENTRE,
    ) {
        SQRT1_2
    } else if position == Channels::FRONT_CENTRE {
        1.0
    } else if position.intersects(
        Channels::REAR_LEFT
            | Channels::REAR_RIGHT
            | Channels::REAR_CENTRE
            | Channels::SIDE_LEFT
            | Channels::SIDE_RIGHT,
    ) {
        0.5
    } else {
        0.0 // LFE, top and wide channels: swr leaves them out of a mono mix
    }
}

/// Weights of the buffer's channels (in plane order) for ffmpeg's `-ac 1`.
fn mono_weights(channels: Channels) -> Vec<f32> {
    match channels.count() {
        // Whatever position symphonia gives a lone channel, ffmpeg treats it as mono.
        1 => vec![1.0],
        2 => vec![std::f32::consts::FRAC_1_SQRT_2; 2],
        _ => channels.iter().map(position_weight).collect(),
    }
}

/// Appends the buffer's frames, converted and downmixed like ffmpeg, to `out`.
fn mix_to_mono(buffer: &AudioBufferRef<'_>, out: &mut Vec<f32>) {
    let weights = mono_weights(buffer.spec().channels);
    match buffer {
        AudioBufferRef::U8(b) => mix(b.as_ref(), &weights, out, |x| {
            (i32::from(x) - 0x80) as f32 * (1.0 / 128.0)
        }),
        AudioBufferRef::U16(b) => mix(b.as_ref(), &weights, out, |x| {
            (i32::from(x) - 0x8000) as f32 * (1.0 / 32768.0)
        }),
        AudioBufferRef::U24(b) => mix(b.as_ref(), &weights, out, |x| {
            (x.inner() as i32 - 0x80_0000) as f32 * (1.0 / 8_388_608.0)
        }),
        AudioBufferRef::U32(b) => mix(b.as_ref(), &weights, out, |x| {
            (i64::from(x) - 0x8000_0000) as f32 * (1.0 / 2_147_483_648.0)
        }),
        AudioBufferRef::S8(b) => mix(b.as_ref(), &weights, out, |x| f32::from(x) * (1.0 / 128.0)),
        AudioBufferRef::S16(b) => mix(b.as_ref(), &weights, out, |x| {
            f32::from(x) * (1.0 / 32768.0)
        }),
        AudioBufferRef::S24(b) => mix(b.as_ref(), &weights, out, |x| {
            x.inner() as f32 * (1.0 / 8_388_608.0)
        }),
        AudioBufferRef::S32(b) => mix(b.as_ref(), &weights, out, |x| {
            x as f32 * (1.0 / 2_147_483_648.0)
        }),
        AudioBufferRef::F32(b) => mix(b.as_ref(), &weights, out, |x| x),
        AudioBufferRef::F64(b) => mix_f64(b.as_ref(), &weights, out),
    }
}

/// Converts every channel to f32, then sums `weight * x` in channel order in f32, skipping
/// zero weights: swr's float rematrix (`sum2_float` / its generic loop) computes exactly that.
fn mix<S: symphonia::core::sample::Sample>(
    buffer: &symphonia::core::audio::AudioBuffer<S>,
    weights: &[f32],
    out: &mut Vec<f32>,
    to_f32: impl Fn(S) -> f32,
) {
    let frames = buffer.frames();
    let start = out.len();
    if weights.len() == 1 {
        // Mono is passed through without a multiply (swr does no rematrix at all).
        out.extend(buffer.chan(0).iter().map(|&x| to_f32(x)));
        return;
    }
    out.resize(start + frames, 0.0);
    let dst = &mut out[start..];
    for (channel, &weight) in weights.iter().enumerate() {
        if weight == 0.0 {
            continue;
        }
        for (acc, &x) in dst.iter_mut().zip(buffer.chan(channel)) {
            *acc += weight * to_f32(x);
        }
    }
}

/// 64-bit float input: swr mixes in double and rounds to float once at the end.
fn mix_f64(buffer: &symphonia::core::audio::AudioBuffer<f64>, weights: &[f32], out: &mut Vec<f32>) {
    let frames = buffer.frames();
    let mut acc = vec![0.0f64; frames];
    for (channel, &weight) in weights.iter().enumerate() {
        if weight == 0.0 {
            continue;
        }
        // swr keeps the matrix in double: M_SQRT1_2 itself, not its f32 rounding.
        let weight = match weight {
            w if w == std::f32::consts::FRAC_1_SQRT_2 => std::f64::consts::FRAC_1_SQRT_2,
            w => f64::from(w),
        };
        for (a, &x) in acc.iter_mut().zip(buffer.chan(channel)) {
            *a += if weights.len() == 1 { x } else { weight * x };
        }
    }
    out.extend(acc.into_iter().map(|x| x as f32));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(channels: u16, bits: u16, tag: u16, rate: u32, data: &[u8]) -> Vec<u8> {
        let align = channels * bits / 8;
        let mut fmt = Vec::new();
        fmt.extend_from_slice(&tag.to_le_bytes());
        fmt.extend_from_slice(&channels.to_le_bytes());
        fmt.extend_from_slice(&rate.to_le_bytes());
        fmt.extend_from_slice(&(rate * u32::from(align)).to_le_bytes());
        fmt.extend_from_slice(&align.to_le_bytes());
        fmt.extend_from_slice(&bits.to_le_bytes());
        let mut body = b"WAVEfmt ".to_vec();
        body.extend_from_slice(&(fmt.len() as u32).to_le_bytes());
        body.extend_from_slice(&fmt);
        body.extend_from_slice(b"data");
        body.extend_from_slice(&(data.len() as u32).to_le_bytes());
        body.extend_from_slice(data);
        let mut out = b"RIFF".to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    fn s16(values: &[i16]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn s16_is_divided_by_32768() {
        let audio = decode_bytes(&wav(1, 16, 1, 16000, &s16(&[0, 1, -32768, 32767, 16384])))
            .expect("valid wav");
        assert_eq!(audio.sampling_rate, 16000);
        assert_eq!(
            audio.samples,
            vec![0.0, 1.0 / 32768.0, -1.0, 32767.0 / 32768.0, 0.5]
        );
    }

    #[test]
    fn stereo_downmix_is_sqrt_half_each_without_clipping() {
        let audio =
            decode_bytes(&wav(2, 16, 1, 8000, &s16(&[16384, 0, -32768, -32768]))).expect("wav");
        let c = std::f32::consts::FRAC_1_SQRT_2;
        assert_eq!(audio.samples, vec![c * 0.5, -2.0 * c]);
        assert!(audio.samples[1] < -1.4);
    }

    #[test]
    fn u8_is_centred_on_128() {
        let audio = decode_bytes(&wav(1, 8, 1, 8000, &[128, 0, 255, 192])).expect("wav");
        assert_eq!(audio.samples, vec![0.0, -1.0, 127.0 / 128.0, 0.5]);
    }

    #[test]
    fn surround_weights_follow_ffmpeg() {
        let five_one = Channels::FRONT_LEFT
            | Channels::FRONT_RIGHT
            | Channels::FRONT_CENTRE
            | Channels::LFE1
            | Channels::REAR_LEFT
            | Channels::REAR_RIGHT;
        let c = std::f32::consts::FRAC_1_SQRT_2;
        assert_eq!(mono_weights(five_one), vec![c, c, 1.0, 0.0, 0.5, 0.5]);
        assert_eq!(mono_weights(Channels::FRONT_LEFT), vec![1.0]);
        assert_eq!(mono_weights(Channels::FRONT_CENTRE), vec![1.0]);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let empty = decode_bytes(&[]).unwrap_err().to_string();
        assert!(empty.contains("empty"), "{empty}");

        let garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
        let msg = decode_bytes(&garbage).unwrap_err().to_string();
        assert!(msg.contains("unsupported or unrecognised"), "{msg}");

        // A header cut in the middle of the fmt chunk.
        let full = wav(1, 16, 1, 16000, &s16(&[1, 2, 3, 4]));
        assert!(decode_bytes(&full[..30]).is_err());

        // A valid header with no samples.
        let msg = decode_bytes(&wav(1, 16, 1, 16000, &[]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("empty audio"), "{msg}");

        // A declared sampling rate of 0.
        let msg = decode_bytes(&wav(1, 16, 1, 0, &s16(&[1, 2, 3, 4])))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("0 Hz"), "{msg}");

        let missing = decode_file(Path::new("/nonexistent/x.wav"))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("x.wav"), "{missing}");
    }

    #[test]
    fn truncated_data_keeps_the_decoded_part() {
        // ffmpeg decodes what is there when the data chunk is shorter than declared.
        let values: Vec<i16> = (0..4000).map(|i| (i * 13 % 2000) as i16).collect();
        let full = wav(1, 16, 1, 16000, &s16(&values));
        let audio = decode_bytes(&full[..full.len() - 1001]).expect("partial wav");
        assert!(!audio.samples.is_empty() && audio.samples.len() < values.len());
        for (got, want) in audio.samples.iter().zip(&values) {
            assert_eq!(*got, f32::from(*want) / 32768.0);
        }
    }
}
