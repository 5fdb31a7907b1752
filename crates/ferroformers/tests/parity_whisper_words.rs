//! Whisper word-level timestamps (`return_timestamps="word"`) against transformers 4.57.1 on
//! the tiny random fixture models: `tests/fixtures/whisper/words/expected.json`, made by
//! scripts/gen_fixtures_whisper_words.py (greedy and beams, short-form, chunked, long-form).

mod common;

use common::{asr_pipeline, run_asr_case};

use std::path::PathBuf;

use ferroformers::Input;
use serde_json::{json, Value};

fn root() -> PathBuf {
    common::fixtures().join("whisper")
}

/// Texts equal; timestamps within 0.01 s (both are multiples of 0.02 plus offsets).
fn check_output(ours: &Value, want: &Value, what: &str) {
    assert_eq!(ours["text"], want["text"], "{what}: text");
    let (o, w) = (
        ours["chunks"].as_array().unwrap(),
        want["chunks"].as_array().unwrap(),
    );
    let texts = |c: &[Value]| c.iter().map(|x| x["text"].clone()).collect::<Vec<_>>();
    assert_eq!(texts(o), texts(w), "{what}: word texts");
    for (k, (a, b)) in o.iter().zip(w).enumerate() {
        for e in 0..2 {
            let (x, y) = (
                a["timestamp"][e].as_f64().unwrap(),
                b["timestamp"][e].as_f64().unwrap(),
            );
            assert!(
                (x - y).abs() <= 0.01 + 1e-9,
                "{what}: word {k} {:?} timestamp {:?} vs {:?}",
                a["text"],
                a["timestamp"],
                b["timestamp"]
            );
        }
        assert_eq!(
            a.get("language"),
            b.get("language"),
            "{what}: word {k} language"
        );
    }
}

fn check_model(model: &str) {
    let exp: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("words").join("expected.json")).unwrap(),
    )
    .unwrap();
    let p = asr_pipeline(&root().join("models").join(model));
    let cases = exp["models"][model].as_array().unwrap();
    let mut checked = 0;
    for case in cases {
        let (what, res) = run_asr_case(&p, &root(), model, case);
        let ours = res.unwrap_or_else(|e| panic!("{what}: {e}"));
        check_output(&ours, &case["output"], &what);
        checked += 1;
    }
    assert!(checked >= 6, "{model}: only {checked} cases");
}

#[test]
fn word_timestamps_match_transformers_multilingual() {
    check_model("whisper-random");
}

#[test]
fn word_timestamps_match_transformers_english_only() {
    check_model("whisper-random-en");
}

#[test]
fn word_timestamps_need_alignment_heads() {
    // A copy of the fixture model whose generation config has no alignment heads.
    let src = root().join("models").join("whisper-random");
    let dir = std::env::temp_dir().join(format!("ferro-whisper-noheads-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let gpath = dir.join("generation_config.json");
    let mut g: Value = serde_json::from_str(&std::fs::read_to_string(&gpath).unwrap()).unwrap();
    g.as_object_mut().unwrap().remove("alignment_heads");
    std::fs::write(&gpath, g.to_string()).unwrap();
    let p = asr_pipeline(&dir);
    let clip = Input::Text(root().join("audio/chirp_2s.wav").display().to_string());
    let params = |v: Value| v.as_object().unwrap().clone();
    let err = p
        .run(
            std::slice::from_ref(&clip),
            &params(json!({"return_timestamps": "word"})),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("alignment_heads"), "{err}");
    // Segments still work without them.
    p.run(
        std::slice::from_ref(&clip),
        &params(json!({"return_timestamps": true})),
    )
    .unwrap();
    let err = p
        .run(&[clip], &params(json!({"return_timestamps": "char"})))
        .unwrap_err()
        .to_string();
    assert!(err.contains("char"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
