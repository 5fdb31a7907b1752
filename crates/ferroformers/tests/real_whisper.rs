//! Real Whisper models read straight from their faster-whisper (CTranslate2) folders, put in the
//! HF cache by `scripts/fetch-models.sh whisper-tiny-en` (CI) and `whisper-base` (opt-in: the
//! base test runs when that model is in the cache). The clips are
//! tests/fixtures/whisper/speech*.flac (espeak-ng); the references are transformers 4.57.1's
//! pipeline on the same weights converted to an HF folder (scripts/gen_whisper_real_refs.py ->
//! tests/fixtures/whisper/real/*.json).
//!
//! Set FERROFORMERS_SKIP_REAL_MODELS=1 to skip where the models cannot be fetched.

mod common;

use ferroformers::{Input, Params, PipelineOptions};
use serde_json::Value;

fn skip() -> bool {
    std::env::var("FERROFORMERS_SKIP_REAL_MODELS").is_ok_and(|v| v == "1")
}

fn whisper_dir() -> std::path::PathBuf {
    common::fixtures().join("whisper")
}

fn reference(name: &str) -> Value {
    let p = whisper_dir().join("real").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Cases with an output (transformers refuses long audio without timestamps: checked as an
/// error below).
fn supported(case: &Value) -> bool {
    case.get("output").is_some_and(|o| o.is_object())
}

fn check(name: &str, must_exist: bool) {
    let exp = reference(name);
    let model = exp["model"].as_str().unwrap();
    let p = match ferroformers::pipeline_with(
        "automatic-speech-recognition",
        PipelineOptions {
            model: Some(model.to_string()),
            ..Default::default()
        },
    ) {
        Ok(p) => p,
        Err(e) if !must_exist => {
            eprintln!(
                "skipped {model}: {e} (scripts/fetch-models.sh {})",
                exp["fetch_models_key"]
            );
            return;
        }
        Err(e) => panic!(
            "{e}\n(run scripts/fetch-models.sh {})",
            exp["fetch_models_key"]
        ),
    };
    // The FLAC decodes to the samples ffmpeg gave transformers.
    for (file, info) in exp["clips"].as_object().unwrap() {
        let a = ferroformers::audio::decode_file(&whisper_dir().join(file)).unwrap();
        assert_eq!(
            a.samples.len() as u64,
            info["samples"].as_u64().unwrap(),
            "{file}"
        );
        let sum: f64 = a.samples.iter().map(|&x| x as f64).sum();
        let want = info["sum"].as_f64().unwrap();
        assert!(
            (sum - want).abs() < 1e-6 * (1.0 + want.abs()),
            "{file}: sum {sum} vs {want}"
        );
    }
    let mut checked = 0;
    for case in exp["pipeline"].as_array().unwrap() {
        if !supported(case) {
            continue;
        }
        let clip = whisper_dir().join(case["clip"].as_str().unwrap());
        let params: Params = case["params"].as_object().unwrap().clone();
        let out = p
            .run(&[Input::Text(clip.display().to_string())], &params)
            .unwrap_or_else(|e| panic!("{model} {}: {e}", case["name"]));
        let ours = serde_json::to_value(&out[0]).unwrap();
        common::compare(&ours, &case["output"], 1e-6, "$").unwrap_or_else(|e| {
            panic!(
                "{model} {} {params:?}: {e}\nours {ours}\nwant {}",
                case["name"], case["output"]
            )
        });
        checked += 1;
    }
    assert!(checked >= 4, "{model}: only {checked} cases checked");
}

#[test]
fn whisper_tiny_en_transcribes_as_transformers() {
    if skip() {
        eprintln!("skipped: FERROFORMERS_SKIP_REAL_MODELS=1");
        return;
    }
    check("tiny-en", true);
}

#[test]
fn whisper_base_transcribes_as_transformers() {
    if skip() {
        return;
    }
    check("base", false);
}

/// `return_window_stats` (ours; what OpenAI's `verbose_json` segments carry) on the 50.6 s
/// clip, greedy: each 30 s window's start (`seek`, 10 ms frames), average log-probability,
/// compression ratio and no-speech probability equal faster-whisper 1.2.1's on the same
/// CTranslate2 file (float32, `beam_size=1`, `temperature=0`,
/// `condition_on_previous_text=False`, no VAD): the values below are what it printed.
#[test]
fn whisper_tiny_en_window_stats_match_faster_whisper() {
    if skip() {
        return;
    }
    let p = ferroformers::pipeline_with(
        "automatic-speech-recognition",
        PipelineOptions {
            model: Some("Systran/faster-whisper-tiny.en".into()),
            ..Default::default()
        },
    )
    .expect("scripts/fetch-models.sh whisper-tiny-en");
    let clip = whisper_dir().join("speech-long.flac");
    let params: Params = serde_json::from_value(serde_json::json!({
        "return_timestamps": true,
        "return_window_stats": true,
        "generate_kwargs": {"num_beams": 1},
    }))
    .unwrap();
    let out = p
        .run(&[Input::Text(clip.display().to_string())], &params)
        .unwrap();
    let v = serde_json::to_value(&out[0]).unwrap();
    // (seek, avg_logprob, compression_ratio, no_speech_prob)
    let want = [
        (0, -0.1974, 1.5476, 0.0864),
        (2524, -0.1905, 1.4663, 0.1223),
        (4722, -0.4526, 0.8491, 0.1433),
    ];
    let windows = v["windows"].as_array().expect("windows");
    assert_eq!(windows.len(), want.len(), "{v}");
    for (w, (seek, lp, cr, ns)) in windows.iter().zip(want) {
        assert_eq!(w["seek"], seek, "{w}");
        let close = |k: &str, x: f64| (w[k].as_f64().unwrap() - x).abs() < 1e-3;
        assert!(close("avg_logprob", lp), "{w}");
        assert!(close("compression_ratio", cr), "{w}");
        assert!(close("no_speech_prob", ns), "{w}");
        assert_eq!(w["temperature"], 0.0);
        assert_eq!(w["skipped"], false);
    }
    // The statistics change nothing else.
    let mut plain = params.clone();
    plain.remove("return_window_stats");
    let base = serde_json::to_value(
        &p.run(&[Input::Text(clip.display().to_string())], &plain)
            .unwrap()[0],
    )
    .unwrap();
    assert_eq!(base["chunks"], v["chunks"]);
    assert!(base.get("windows").is_none());
    // A value that is not a boolean is refused, naming the parameter.
    let mut bad = params.clone();
    bad.insert("return_window_stats".into(), "yes".into());
    let err = p
        .run(&[Input::Text(clip.display().to_string())], &bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("return_window_stats"), "{err}");
}
