//! Audio parity against tests/fixtures/audio/expected.json (scripts/gen_fixtures_audio.py):
//! ffmpeg's decoding as transformers' `ffmpeg_read` runs it, torchaudio's resample and
//! transformers' WhisperFeatureExtractor. Run with `--nocapture` to see the measured differences.

use std::path::PathBuf;

use ferroformers::audio::{
    decode_bytes, decode_file, mel_filter_bank, resample, Audio, WhisperFeatureExtractor,
};
use serde_json::Value;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/audio")
}

fn expected() -> Value {
    let path = dir().join("expected.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).expect("expected.json parses")
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

fn num(v: &Value) -> f64 {
    v.as_f64().expect("number")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// How far `got` is from a `summary()` of the generator: (max |diff| over the stored samples,
/// |diff| of the sums, |diff| of the sums of squares).
fn compare(name: &str, got: &[f32], want: &Value, tol: f32, len_tol: usize) -> f32 {
    let len = want["len"].as_u64().expect("len") as usize;
    assert!(
        got.len().abs_diff(len) <= len_tol,
        "{name}: {} samples, expected {len}",
        got.len()
    );
    let head = floats(&want["head"]);
    let mut diff = max_abs_diff(&got[..head.len().min(got.len())], &head);
    if let (Some(stride), Some(strided)) = (want["stride"].as_u64(), want.get("strided")) {
        let picked: Vec<f32> = got.iter().step_by(stride as usize).copied().collect();
        diff = diff.max(max_abs_diff(&picked, &floats(strided)));
    }
    let sum: f64 = got.iter().map(|&x| f64::from(x)).sum();
    let sumsq: f64 = got.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    let (dsum, dsq) = (
        (sum - num(&want["sum"])).abs(),
        (sumsq - num(&want["sumsq"])).abs(),
    );
    println!(
        "{name:<40} len {:>6} (want {len:>6}) max|diff| {diff:.3e} sum {dsum:.2e} sumsq {dsq:.2e}",
        got.len()
    );
    assert!(diff <= tol, "{name}: max |diff| {diff:e} > {tol:e}");
    if len_tol == 0 {
        // Over all samples: an error the stored head/stride would miss shows up here.
        // (Summation order alone moves an f64 sum by ~1e-15, hence the floor on `tol`.)
        let bound = f64::from(tol.max(1e-7)) * len as f64;
        assert!(dsum <= bound, "{name}: sum off by {dsum:e}");
        assert!(dsq <= 2.0 * bound, "{name}: sum of squares off by {dsq:e}");
    }
    diff
}

fn decoded(name: &str) -> Audio {
    decode_file(&dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn lossy(name: &str) -> bool {
    name.ends_with(".mp3") || name.ends_with(".ogg")
}

#[test]
fn decoding_matches_ffmpeg_at_the_native_rate() {
    let exp = expected();
    for file in exp["files"].as_array().expect("files") {
        let name = file["name"].as_str().expect("name");
        let audio = decoded(name);
        assert_eq!(
            audio.sampling_rate as u64,
            file["sampling_rate"].as_u64().expect("rate")
        );
        // At 16 kHz, ffmpeg_read does no resampling: its output is the native reference.
        let want = file.get("native").unwrap_or(&file["ffmpeg_16k"]);
        // PCM and FLAC: ffmpeg's conversion and downmix, bit for bit. MP3/Vorbis: two decoders.
        let tol = if lossy(name) { 1e-5 } else { 0.0 };
        compare(&format!("{name} native"), &audio.samples, want, tol, 0);

        let bytes = std::fs::read(dir().join(name)).expect("read fixture");
        assert_eq!(decode_bytes(&bytes).expect("decode_bytes"), audio, "{name}");
    }
}

#[test]
fn files_at_16k_match_torchaudio_exactly_and_ffmpeg_read_closely() {
    let exp = expected();
    for file in exp["files"].as_array().expect("files") {
        let name = file["name"].as_str().expect("name");
        let at16k = decoded(name).to_rate(16000).expect("to 16 kHz");
        if let Some(want) = file.get("torchaudio_16k") {
            let tol = if lossy(name) { 1e-5 } else { 1e-6 };
            compare(
                &format!("{name} torchaudio 16k"),
                &at16k.samples,
                want,
                tol,
                0,
            );
        }
        // ffmpeg_read's own resampler (swr) is not torchaudio's: a close, not exact, match.
        let tol = if file.get("torchaudio_16k").is_some() {
            2e-2
        } else if lossy(name) {
            1e-5
        } else {
            0.0
        };
        let len_tol = if file.get("torchaudio_16k").is_some() {
            1
        } else {
            0
        };
        compare(
            &format!("{name} ffmpeg_read 16k"),
            &at16k.samples,
            &file["ffmpeg_16k"],
            tol,
            len_tol,
        );
    }
}

#[test]
fn resample_matches_torchaudio() {
    let exp = expected();
    for case in exp["resample"].as_array().expect("resample") {
        let source = case["source"].as_str().expect("source");
        let length = case["length"].as_u64().expect("length") as usize;
        let (from, to) = (
            case["from"].as_u64().expect("from") as u32,
            case["to"].as_u64().expect("to") as u32,
        );
        let audio = decoded(source);
        assert_eq!(audio.sampling_rate, from);
        let got = resample(&audio.samples[..length], from, to).expect("resample");
        let name = format!("resample {source}[..{length}] {from}->{to}");
        let tol = if lossy(source) { 1e-5 } else { 1e-6 };
        compare(&name, &got, &case["out"], tol, 0);
    }
}

#[test]
fn mel_filters_match_transformers() {
    let exp = expected();
    for feature_size in [80usize, 128] {
        let want = exp["mel_filters"][feature_size.to_string()]
            .as_array()
            .expect("filters");
        let bank = mel_filter_bank(201, feature_size, 0.0, 8000.0, 16000);
        let nonzero = bank.iter().filter(|&&w| w as f32 != 0.0).count();
        assert_eq!(nonzero, want.len(), "{feature_size} bins: non-zero weights");
        let mut diff = 0.0f32;
        for entry in want {
            let (m, k, w) = (
                entry[0].as_u64().expect("mel") as usize,
                entry[1].as_u64().expect("bin") as usize,
                num(&entry[2]) as f32,
            );
            diff = diff.max((bank[k * feature_size + m] as f32 - w).abs());
        }
        println!("mel filters {feature_size}: max|diff| {diff:e}");
        assert!(diff <= 1e-9, "{feature_size}: {diff}");
    }
}

fn waveform(exp: &Value, name: &str) -> Vec<f32> {
    let recipe = &exp["waveforms"][name];
    let base = decoded(recipe["source"].as_str().expect("source")).samples;
    let take = recipe["take"].as_u64().expect("take") as usize;
    base[..take].repeat(recipe["repeat"].as_u64().expect("repeat") as usize)
}

#[test]
fn whisper_features_match_transformers() {
    let exp = expected();
    for case in exp["features"].as_array().expect("features") {
        let wave_name = case["waveform"].as_str().expect("waveform");
        let feature_size = case["feature_size"].as_u64().expect("feature_size") as usize;
        let fe = WhisperFeatureExtractor::new(feature_size);
        let wave = waveform(&exp, wave_name);
        let padding = case["padding"].as_str().expect("padding");
        let (out, frames_total) = if padding == "longest" {
            fe.extract_longest(&wave).expect("features")
        } else {
            (fe.extract(&wave).expect("features"), fe.num_frames())
        };
        let shape = &case["shape"];
        assert_eq!(shape[0].as_u64(), Some(feature_size as u64));
        assert_eq!(shape[1].as_u64(), Some(frames_total as u64));
        assert_eq!(out.len(), feature_size * frames_total);

        let frames: Vec<usize> = case["frames"]
            .as_array()
            .expect("frames")
            .iter()
            .map(|f| f.as_u64().expect("frame") as usize)
            .collect();
        let mut diff = 0.0f32;
        for (m, row) in case["values"]
            .as_array()
            .expect("values")
            .iter()
            .enumerate()
        {
            let want = floats(row);
            let got: Vec<f32> = frames.iter().map(|&t| out[m * frames_total + t]).collect();
            diff = diff.max(max_abs_diff(&got, &want));
        }
        let mut bin_sum_diff = 0.0f64;
        for (m, want) in case["bin_sums"]
            .as_array()
            .expect("bin_sums")
            .iter()
            .enumerate()
        {
            let got: f64 = out[m * frames_total..(m + 1) * frames_total]
                .iter()
                .map(|&v| f64::from(v))
                .sum();
            bin_sum_diff = bin_sum_diff.max((got - num(want)).abs());
        }
        let min = out.iter().copied().fold(f32::INFINITY, f32::min);
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        println!(
            "features {wave_name:<6} {padding:<10} x{feature_size:<3} ({} samples): max|diff| {diff:.3e}, \
             per-bin sums {bin_sum_diff:.2e}, min {min} / {}, max {max} / {}",
            wave.len(),
            case["min"],
            case["max"]
        );
        assert!(
            diff <= 1e-4,
            "{wave_name} x{feature_size}: max |diff| {diff:e}"
        );
        // A per-bin sum is over ~3000 frames: 3000 * 1e-5 would be a systematic error.
        assert!(
            bin_sum_diff <= 3e-2,
            "{wave_name} x{feature_size}: per-bin sums off by {bin_sum_diff:e}"
        );
        assert!((min - num(&case["min"]) as f32).abs() <= 1e-4);
        assert!((max - num(&case["max"]) as f32).abs() <= 1e-4);
    }
}

#[test]
fn preprocessor_config_fixture_loads() {
    let fe =
        WhisperFeatureExtractor::from_preprocessor_config(&dir().join("preprocessor_config.json"))
            .expect("preprocessor_config.json");
    assert_eq!(fe.feature_size, 128);
    assert_eq!(
        (fe.sampling_rate, fe.hop_length, fe.n_fft),
        (16000, 160, 400)
    );
    assert_eq!(
        (fe.chunk_length, fe.n_samples, fe.nb_max_frames),
        (30, 480000, 3000)
    );
    assert_eq!(fe.padding_value, 0.0);
}

#[test]
fn feature_extraction_speed_for_30_s() {
    // Not a pass/fail check (shared CI cores): prints the time per call on one thread.
    let exp = expected();
    let long = waveform(&exp, "long");
    for (what, wave) in [
        ("30 s of audio", &long[..]),
        ("0.05 s + padding", &long[..800]),
    ] {
        for feature_size in [80, 128] {
            let fe = WhisperFeatureExtractor::new(feature_size);
            fe.extract(wave).expect("warm-up");
            let runs = 10;
            let start = std::time::Instant::now();
            for _ in 0..runs {
                std::hint::black_box(fe.extract(std::hint::black_box(wave)).expect("features"));
            }
            let ms = start.elapsed().as_secs_f64() * 1000.0 / runs as f64;
            println!("WhisperFeatureExtractor({feature_size}).extract({what}): {ms:.1} ms");
        }
    }
}

#[test]
fn damaged_files_are_errors_with_the_file_named() {
    let tmp = std::env::temp_dir().join(format!("ff-audio-test-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).expect("temp dir");
    let wav = std::fs::read(dir().join("mono16k_s16.wav")).expect("fixture");

    let header_only = tmp.join("header_cut.wav");
    std::fs::write(&header_only, &wav[..20]).expect("write");
    let msg = decode_file(&header_only).unwrap_err().to_string();
    assert!(msg.contains("header_cut.wav"), "{msg}");

    let empty = tmp.join("empty.flac");
    std::fs::write(&empty, b"").expect("write");
    let msg = decode_file(&empty).unwrap_err().to_string();
    assert!(msg.contains("empty.flac"), "{msg}");

    let garbage = tmp.join("noise.mp3");
    let bytes: Vec<u8> = (0..20000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&garbage, &bytes).expect("write");
    let err = decode_file(&garbage);
    assert!(
        err.is_err(),
        "garbage decoded as {:?} samples",
        err.map(|a| a.samples.len())
    );

    // Data cut short: ffmpeg (and we) keep the samples that are there.
    let cut = decode_bytes(&wav[..wav.len() / 2]).expect("truncated data still decodes");
    let full = decoded("mono16k_s16.wav");
    assert!(
        cut.samples.len() >= full.samples.len() / 2 - 1200,
        "{}",
        cut.samples.len()
    );
    assert_eq!(cut.samples[..], full.samples[..cut.samples.len()]);
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn truncated_and_corrupted_files_never_panic() {
    // Every fixture cut at a range of lengths and with scattered bytes overwritten: decoding
    // returns audio or an error, never unwinds into the caller (symphonia panics on some of
    // these; decode catches them).
    const ROUNDS: usize = 60;
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for entry in std::fs::read_dir(dir()).expect("fixture dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "json" || e == "md") {
            continue;
        }
        let bytes = std::fs::read(&path).expect("read");
        for cut in (0..bytes.len()).step_by(bytes.len() / 40 + 1) {
            let _ = decode_bytes(&bytes[..cut]);
        }
        for _ in 0..ROUNDS {
            let mut damaged = bytes.clone();
            // Half the damage lands in the first 256 bytes, where the headers are.
            for i in 0..8 {
                let span = if i % 2 == 0 {
                    damaged.len().min(256)
                } else {
                    damaged.len()
                };
                let at = (next() % span as u64) as usize;
                damaged[at] = next() as u8;
            }
            let _ = decode_bytes(&damaged);
        }
    }
}
