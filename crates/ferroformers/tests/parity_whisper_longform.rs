//! Whisper's long-form options against transformers 4.57.1 on the tiny random fixture models:
//! `prompt_ids` (`first-segment` and `all-segments`), `condition_on_prev_tokens`, and the
//! temperature fallback's thresholds (`logprob_threshold`, `no_speech_threshold`,
//! `compression_ratio_threshold`) where the outcome is deterministic: threshold sweeps pin each
//! window's average log-probability and no-speech probability. Expected outputs:
//! `tests/fixtures/whisper/longform/expected.json`, made by
//! scripts/gen_fixtures_whisper_longform.py.

mod common;

use common::{asr_pipeline, run_asr_case};

use std::path::PathBuf;

use ferroformers::Input;
use serde_json::{json, Value};

fn root() -> PathBuf {
    common::fixtures().join("whisper")
}

fn expected() -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("longform").join("expected.json")).unwrap(),
    )
    .unwrap()
}

/// Texts equal, chunk texts equal, timestamps within 0.01 s.
fn check_output(ours: &Value, want: &Value, what: &str) {
    assert_eq!(ours["text"], want["text"], "{what}: text");
    let (Some(o), Some(w)) = (ours["chunks"].as_array(), want["chunks"].as_array()) else {
        assert_eq!(ours.get("chunks"), want.get("chunks"), "{what}: chunks");
        return;
    };
    assert_eq!(o.len(), w.len(), "{what}: chunks {ours} vs {want}");
    for (k, (a, b)) in o.iter().zip(w).enumerate() {
        assert_eq!(a["text"], b["text"], "{what}: chunk {k} text");
        for e in 0..2 {
            match (a["timestamp"][e].as_f64(), b["timestamp"][e].as_f64()) {
                (Some(x), Some(y)) => assert!(
                    (x - y).abs() <= 0.01 + 1e-9,
                    "{what}: chunk {k} timestamp {:?} vs {:?}",
                    a["timestamp"],
                    b["timestamp"]
                ),
                (x, y) => assert_eq!(x, y, "{what}: chunk {k} timestamp"),
            }
        }
    }
}

fn check_model(model: &str) {
    let exp = expected();
    let p = asr_pipeline(&root().join("models").join(model));
    let cases = exp["models"][model].as_array().unwrap();
    let mut checked = 0;
    let mut skipped_windows = 0;
    for case in cases {
        let (what, res) = run_asr_case(&p, &root(), model, case);
        if let Some(err) = case.get("error") {
            assert!(
                res.is_err(),
                "{what}: transformers raised {err}, we did not"
            );
            continue;
        }
        let ours = res.unwrap_or_else(|e| panic!("{what}: {e}"));
        check_output(&ours, &case["output"], &what);
        if case["output"]["text"] == "" {
            skipped_windows += 1;
        }
        checked += 1;
    }
    assert!(checked >= 40, "{model}: only {checked} cases");
    // The sweeps must cross the thresholds: some cases skip everything, most do not.
    assert!(skipped_windows >= 2, "{model}: no case skipped a window");
}

#[test]
fn longform_options_match_transformers_multilingual() {
    check_model("whisper-random");
}

#[test]
fn longform_options_match_transformers_english_only() {
    check_model("whisper-random-en");
}

#[test]
fn longform_options_refuse_bad_values() {
    let p = asr_pipeline(&root().join("models").join("whisper-random"));
    let clip = Input::Text(root().join("audio/chirp_2s.wav").display().to_string());
    for (kwargs, needle) in [
        (json!({"prompt_ids": "hello"}), "prompt_ids"),
        (json!({"prompt_ids": [1, 99999999]}), "prompt_ids"),
        (
            json!({"prompt_condition_type": "all-segments"}),
            "condition_on_prev_tokens",
        ),
        (
            json!({"prompt_condition_type": "some"}),
            "prompt_condition_type",
        ),
        (
            json!({"condition_on_prev_tokens": "yes"}),
            "condition_on_prev_tokens",
        ),
        (json!({"temperature": [0.0, -1.0]}), "temperature"),
        (json!({"no_speech_threshold": 0.6}), "logprob_threshold"),
        (json!({"logprob_threshold": "low"}), "logprob_threshold"),
        (
            json!({"prompt_ids": vec![220; 440], "max_new_tokens": 20}),
            "max_new_tokens",
        ),
    ] {
        let params = json!({"generate_kwargs": kwargs})
            .as_object()
            .unwrap()
            .clone();
        let err = p
            .run(std::slice::from_ref(&clip), &params)
            .expect_err(&format!("{kwargs} was accepted"))
            .to_string();
        assert!(err.contains(needle), "{kwargs}: {err}");
    }
}
