//! Whisper against transformers 4.57.1 on tiny random models (tests/fixtures/whisper, made by
//! scripts/gen_fixtures_whisper.py): features, encoder states, the decoder's first logits,
//! language detection, `model.generate` token ids for each kwargs case, and
//! `pipeline("automatic-speech-recognition")` outputs. The same models load from HF folders
//! and from CTranslate2 (faster-whisper) folders.

mod common;

use common::asr_pipeline;

use std::path::PathBuf;

use ferroformers::audio::decode_file;
use ferroformers::pipelines::automatic_speech_recognition::SpeechRecognition;
use ferroformers::pipelines::whisper_languages::name_of;
use ferroformers::{pipeline_with, Input, Params, PipelineOptions};
use serde_json::Value;

fn root() -> PathBuf {
    common::fixtures().join("whisper")
}

fn expected(name: &str) -> Value {
    let p = root().join("expected").join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn load(model: &str) -> SpeechRecognition {
    let opts = PipelineOptions {
        model: Some(root().join("models").join(model).display().to_string()),
        ..Default::default()
    };
    SpeechRecognition::load(&opts, opts.model.as_deref().unwrap())
        .unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn clip(path: &str) -> Vec<f32> {
    let a = decode_file(&root().join(path)).unwrap();
    assert_eq!(a.sampling_rate, 16000);
    a.samples
}

fn clip_path(exp: &Value, name: &str) -> String {
    exp["clips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no clip {name}"))["path"]
        .as_str()
        .unwrap()
        .to_string()
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

/// Features, encoder states, first decoder logits and detected languages of `model`, against
/// the references of `reference` (the same weights).
fn check_model_outputs(model: &str, reference: &str) {
    let exp = expected(reference);
    let asr = load(model);
    for enc in exp["encoder"].as_array().unwrap() {
        let name = enc["clip"].as_str().unwrap();
        let wave = clip(&clip_path(&exp, name));
        let feats = asr.extractor.extract(&wave).unwrap();
        let frames = asr.extractor.nb_max_frames;
        let want = f64s(&enc["input_features"]["bin_sum"]);
        for (m, w) in want.iter().enumerate() {
            let ours: f64 = feats[m * frames..(m + 1) * frames]
                .iter()
                .map(|&x| x as f64)
                .sum();
            assert!(
                close(ours, *w, 1e-5),
                "{model} {name} mel bin {m}: {ours} vs {w}"
            );
        }
        let features = candle_core::Tensor::from_vec(
            feats,
            (1, asr.extractor.feature_size, frames),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let hidden = asr.model.encode_features(&features).unwrap();
        let h: Vec<Vec<f32>> = hidden.squeeze(0).unwrap().to_vec2().unwrap();
        let lhs = &enc["last_hidden_state"];
        for (p, row) in lhs["first4"].as_array().unwrap().iter().enumerate() {
            for (j, w) in f64s(row).iter().enumerate() {
                let o = h[p][j] as f64;
                assert!(
                    close(o, *w, 1e-4),
                    "{model} {name} hidden[{p}][{j}]: {o} vs {w}"
                );
            }
        }
        // A sum over 1500 positions: each within ~1e-5 of torch's, so the sum within 1500x.
        for (j, w) in f64s(&lhs["dim_sum"]).iter().enumerate() {
            let o: f64 = h.iter().map(|r| r[j] as f64).sum();
            let tol = 2e-5 * h.len() as f64 + 1e-4 * w.abs();
            assert!(
                (o - w).abs() <= tol,
                "{model} {name} dim_sum[{j}]: {o} vs {w}"
            );
        }
    }
    // The pipeline names the same language (what the server's verbose_json reports).
    let pipe = pipeline_with(
        "automatic-speech-recognition",
        PipelineOptions {
            model: Some(root().join("models").join(model).display().to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    for case in exp["language_detection"].as_array().unwrap_or(&Vec::new()) {
        let name = case["clip"].as_str().unwrap();
        let langs = asr
            .detect_languages(&[clip(&clip_path(&exp, name))])
            .unwrap();
        assert_eq!(
            langs[0] as u64,
            case["lang_id"].as_u64().unwrap(),
            "{model} {name}: detected language"
        );
        let code = case["lang_token"].as_str().unwrap();
        let code = code.trim_start_matches("<|").trim_end_matches("|>");
        let input = Input::Audio {
            samples: clip(&clip_path(&exp, name)),
            sampling_rate: 16000,
        };
        assert_eq!(
            pipe.spoken_languages(&[input]).unwrap(),
            Some(vec![name_of(code).unwrap().to_string()]),
            "{model} {name}: spoken language"
        );
    }
}

fn check_generate(model: &str, reference: &str) {
    let exp = expected(reference);
    let asr = load(model);
    let mut checked = 0;
    for case in exp["generate"].as_array().unwrap() {
        let names: Vec<String> = match &case["clip"] {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a.iter().map(|c| c.as_str().unwrap().to_string()).collect(),
            _ => panic!("clip"),
        };
        let waves: Vec<Vec<f32>> = names.iter().map(|n| clip(&clip_path(&exp, n))).collect();
        let kwargs: Params = case["kwargs"].as_object().unwrap().clone();
        let ours = asr
            .generate_tokens(&waves, &kwargs)
            .unwrap_or_else(|e| panic!("{model} {names:?} {kwargs:?}: {e}"));
        // A batch comes back from transformers as one tensor, shorter rows right-padded with
        // the pad token (= end of text): ours are the rows without it.
        let pad = exp["generation_config"]["pad_token_id"].as_u64().unwrap() as u32;
        let want: Vec<Vec<u32>> = case["sequences"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let mut row: Vec<u32> = f64s(s).into_iter().map(|x| x as u32).collect();
                while names.len() > 1 && row.last() == Some(&pad) {
                    row.pop();
                }
                row
            })
            .collect();
        assert_eq!(ours, want, "{model} {names:?} {kwargs:?}");
        checked += 1;
    }
    assert!(
        checked >= 15,
        "{model}: only {checked} generate cases checked"
    );
}

fn pipeline_input(v: &Value) -> Input {
    let o = v.as_object().unwrap();
    let path = root().join(o.get("path").or(o.get("raw")).unwrap().as_str().unwrap());
    if o.contains_key("raw") {
        Input::Audio {
            samples: clip(path.strip_prefix(root()).unwrap().to_str().unwrap()),
            sampling_rate: o["sampling_rate"].as_u64().unwrap() as u32,
        }
    } else {
        Input::Text(path.display().to_string())
    }
}

fn check_pipelines(model: &str, reference: &str) {
    let exp = expected(reference);
    let p = asr_pipeline(&root().join("models").join(model));
    let mut checked = 0;
    for case in exp["pipelines"].as_array().unwrap() {
        let inputs: Vec<Input> = case["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(pipeline_input)
            .collect();
        let params: Params = case["params"].as_object().unwrap().clone();
        let out = p
            .run(&inputs, &params)
            .unwrap_or_else(|e| panic!("{model} {params:?}: {e}"));
        let ours = serde_json::to_value(&out).unwrap();
        let want = if case["call"] == "list" {
            case["output"].clone()
        } else {
            Value::Array(vec![case["output"].clone()])
        };
        common::compare(&ours, &want, 1e-6, "$")
            .unwrap_or_else(|e| panic!("{model} {params:?}: {e}\nours {ours}\nwant {want}"));
        checked += 1;
    }
    assert!(
        checked >= 9,
        "{model}: only {checked} pipeline cases checked"
    );
}

#[test]
fn multilingual_model_matches_transformers() {
    check_model_outputs("whisper-random", "whisper-random");
}

#[test]
fn english_only_model_matches_transformers() {
    check_model_outputs("whisper-random-en", "whisper-random-en");
}

#[test]
fn mel_128_model_matches_transformers() {
    check_model_outputs("whisper-random-128", "whisper-random-128");
}

#[test]
fn ctranslate2_folder_matches_the_hf_model() {
    check_model_outputs("whisper-random-ct2", "whisper-random");
    check_generate("whisper-random-ct2", "whisper-random");
}

#[test]
fn ctranslate2_f16_folder_matches_transformers() {
    check_model_outputs("whisper-random-ct2-f16", "whisper-random-ct2-f16");
}

#[test]
fn generate_matches_transformers() {
    check_generate("whisper-random", "whisper-random");
    check_generate("whisper-random-en", "whisper-random-en");
}

#[test]
fn pipeline_matches_transformers() {
    check_pipelines("whisper-random", "whisper-random");
    check_pipelines("whisper-random-en", "whisper-random-en");
}

#[test]
fn bad_audio_inputs_are_clear_errors() {
    let p = asr_pipeline(&root().join("models").join("whisper-random"));
    let err = |inp: Input, params: Params| p.run(&[inp], &params).unwrap_err().to_string();
    let none = Params::new();
    assert!(
        err(Input::Text("/no/such/file.wav".into()), none.clone()).contains("/no/such/file.wav")
    );
    assert!(err(
        Input::AudioBytes(b"not audio at all".to_vec()),
        none.clone()
    )
    .contains("audio"));
    let empty = Input::Audio {
        samples: vec![],
        sampling_rate: 16000,
    };
    assert!(err(empty, none.clone()).contains("no samples"));
    let long = Input::Audio {
        samples: vec![0.0; 16000 * 31],
        sampling_rate: 16000,
    };
    assert!(err(long.clone(), none.clone()).contains("chunk_length_s"));
    let mut bad_lang = Params::new();
    bad_lang.insert(
        "generate_kwargs".into(),
        serde_json::json!({"language": "klingon"}),
    );
    let short = Input::Audio {
        samples: vec![0.0; 1600],
        sampling_rate: 16000,
    };
    assert!(err(short.clone(), bad_lang).contains("klingon"));
    let mut bad_task = Params::new();
    bad_task.insert(
        "generate_kwargs".into(),
        serde_json::json!({"task": "summarize"}),
    );
    assert!(err(short, bad_task).contains("task"));
    // A text input to an English-only model with a language: refused as transformers does.
    let en = asr_pipeline(&root().join("models").join("whisper-random-en"));
    let mut lang = Params::new();
    lang.insert("language".into(), "fr".into());
    let e = en
        .run(
            &[Input::Audio {
                samples: vec![0.0; 1600],
                sampling_rate: 16000,
            }],
            &lang,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("English-only"), "{e}");
}
