//! wav2vec2 (CTC) against transformers 4.57.1 on tiny random models (tests/fixtures/wav2vec2,
//! made by scripts/gen_fixtures_wav2vec2.py): `Wav2Vec2FeatureExtractor` outputs,
//! `Wav2Vec2ForCTC` logits (one clip, padded batches with and without the mask), and
//! `pipeline("automatic-speech-recognition")` outputs (text, char and word timestamps, chunked
//! audio with strides, batches of different lengths). One model is "group"-norm with a post-LN
//! encoder (as wav2vec2-base-960h), the other "layer"-norm with the stable (pre-LN) encoder (as
//! wav2vec2-large-960h-lv60-self); the first also loads from a pytorch_model.bin with the old
//! weight-norm names.

mod common;

use common::asr_pipeline;

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use ferroformers::audio::{decode_file, Wav2Vec2FeatureExtractor};
use ferroformers::pipelines::automatic_speech_recognition_ctc::CtcSpeechRecognition;
use ferroformers::{Input, Params, PipelineOptions};
use serde_json::Value;

const MODELS: &[&str] = &["w2v-group", "w2v-stable"];

fn root() -> PathBuf {
    common::fixtures().join("wav2vec2")
}

fn model_path(model: &str) -> String {
    root().join("models").join(model).display().to_string()
}

fn expected(model: &str) -> Value {
    let p = root().join("expected").join(format!("{model}.json"));
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn load(model: &str) -> CtcSpeechRecognition {
    let opts = PipelineOptions::default();
    CtcSpeechRecognition::load(&opts, &model_path(model)).unwrap_or_else(|e| panic!("{model}: {e}"))
}

fn clip_file(name: &str) -> PathBuf {
    common::fixtures()
        .join("whisper/audio")
        .join(format!("{name}.wav"))
}

fn clip(name: &str) -> Vec<f32> {
    let a = decode_file(&clip_file(name)).unwrap();
    assert_eq!(a.sampling_rate, 16000);
    a.samples
}

fn f64s(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// `values` against a `values_summary` of the generator; returns how many sampled values are
/// bit-identical.
fn check_values(values: &[f32], want: &Value, what: &str) -> (usize, usize) {
    assert_eq!(
        values.len() as u64,
        want["len"].as_u64().unwrap(),
        "{what}: length"
    );
    let n = values.len();
    let mut sampled: Vec<(usize, f64)> = Vec::new();
    sampled.extend(f64s(&want["first8"]).into_iter().enumerate());
    sampled.extend(
        f64s(&want["last8"])
            .into_iter()
            .enumerate()
            .map(|(i, v)| (n - 8.min(n) + i, v)),
    );
    sampled.extend(
        f64s(&want["every101"])
            .into_iter()
            .enumerate()
            .map(|(i, v)| (i * 101, v)),
    );
    let mut exact = 0;
    for &(i, w) in &sampled {
        let o = values[i] as f64;
        assert!(
            (o - w).abs() <= 1e-6 * (1.0 + w.abs()),
            "{what}[{i}]: {o} vs {w}"
        );
        // serde_json's float parsing may be an f64 ulp off; the float32 values are exact.
        exact += usize::from(values[i] == w as f32);
    }
    let sum: f64 = values.iter().map(|&v| v as f64).sum();
    let sum_sq: f64 = values.iter().map(|&v| (v as f64).powi(2)).sum();
    let (ws, wq) = (
        want["sum"].as_f64().unwrap(),
        want["sum_sq"].as_f64().unwrap(),
    );
    assert!(
        (sum - ws).abs() <= 1e-5 * n as f64,
        "{what}: sum {sum} vs {ws}"
    );
    assert!(
        (sum_sq - wq).abs() <= 1e-5 * wq.max(1.0),
        "{what}: sum_sq {sum_sq} vs {wq}"
    );
    (exact, sampled.len())
}

#[test]
fn feature_extractor_matches_transformers() {
    for model in MODELS {
        let exp = expected(model);
        let fe = Wav2Vec2FeatureExtractor::from_preprocessor_config(
            &root()
                .join("models")
                .join(model)
                .join("preprocessor_config.json"),
        )
        .unwrap();
        let (mut exact, mut total) = (0, 0);
        for case in exp["features"].as_array().unwrap() {
            let name = case["clip"].as_str().unwrap();
            let (e, t) = check_values(&fe.extract(&clip(name)), case, &format!("{model} {name}"));
            exact += e;
            total += t;
        }
        for case in exp["features_batch"].as_array().unwrap() {
            let waves: Vec<Vec<f32>> = case["clips"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| clip(c.as_str().unwrap()))
                .collect();
            let refs: Vec<&[f32]> = waves.iter().map(Vec::as_slice).collect();
            let ram = case["return_attention_mask"].as_bool().unwrap();
            let out = fe.extract_padded(&refs, Some(ram));
            for (i, (row, want)) in out
                .input_values
                .iter()
                .zip(case["rows"].as_array().unwrap())
                .enumerate()
            {
                let (e, t) = check_values(row, want, &format!("{model} batch mask={ram} row {i}"));
                exact += e;
                total += t;
            }
            match (&out.attention_mask, case.get("attention_mask_sums")) {
                (Some(m), Some(sums)) => {
                    let ours: Vec<f64> = m.iter().map(|r| r.iter().sum::<u32>() as f64).collect();
                    assert_eq!(ours, f64s(sums));
                }
                (None, None) => {}
                (m, s) => panic!("{model}: attention mask {m:?} vs {s:?}"),
            }
        }
        // numpy's float32 summation order is reproduced: the values are the same bits.
        assert_eq!(
            exact, total,
            "{model}: {exact} of {total} values bit-identical"
        );
        let err = fe.check_rate(8000).unwrap_err().to_string();
        assert!(err.contains("16000") && err.contains("8000"), "{err}");
    }
}

/// Logits of one case of `expected.logits` against the reference summary.
fn check_logits(model: &str, logits: &Tensor, want: &Value) {
    let name = want["name"].as_str().unwrap();
    let dims: Vec<u64> = logits.dims().iter().map(|&d| d as u64).collect();
    let shape: Vec<u64> = want["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(dims, shape, "{model} {name}: shape");
    let l: Vec<Vec<Vec<f32>>> = logits.to_vec3().unwrap();
    let mut worst = 0f64;
    for (key, row) in want["rows"].as_object().unwrap() {
        let (b, t) = key.split_once(',').unwrap();
        let (b, t): (usize, usize) = (b.parse().unwrap(), t.parse().unwrap());
        for (v, w) in f64s(row).iter().enumerate() {
            let d = (l[b][t][v] as f64 - w).abs();
            worst = worst.max(d);
            assert!(
                d <= 1e-4 * (1.0 + w.abs()),
                "{model} {name} [{b},{t},{v}]: {} vs {w}",
                l[b][t][v]
            );
        }
    }
    let frames = shape[1] as f64;
    for (b, sums) in want["vocab_sums"].as_array().unwrap().iter().enumerate() {
        for (v, w) in f64s(sums).iter().enumerate() {
            let o: f64 = l[b].iter().map(|r| r[v] as f64).sum();
            assert!(
                (o - w).abs() <= 1e-4 * frames + 1e-5 * w.abs(),
                "{model} {name} vocab_sum[{b}][{v}]: {o} vs {w}"
            );
        }
    }
    for (b, sums) in want["frame_sums_every7"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
    {
        for (i, w) in f64s(sums).iter().enumerate() {
            let o: f64 = l[b][i * 7].iter().map(|&x| x as f64).sum();
            assert!(
                (o - w).abs() <= 1e-3,
                "{model} {name} frame_sum[{b}][{}]: {o} vs {w}",
                i * 7
            );
        }
    }
    if let Some(am) = want.get("argmax") {
        for (b, row) in am.as_array().unwrap().iter().enumerate() {
            let ours = ferroformers::ctc::argmax_rows(
                &l[b].iter().flatten().copied().collect::<Vec<_>>(),
                shape[2] as usize,
            );
            let want: Vec<u32> = f64s(row).into_iter().map(|x| x as u32).collect();
            assert_eq!(ours, want, "{model} {name} argmax row {b}");
        }
    }
    eprintln!("{model} {name}: worst logit difference {worst:.2e}");
}

fn model_logits(asr: &CtcSpeechRecognition, case: &Value) -> Tensor {
    let clips: Vec<Vec<f32>> = case["clips"]
        .as_array()
        .unwrap()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let mut w = clip(c.as_str().unwrap());
            if let Some(n) = case.get("truncate").and_then(|t| t[i].as_u64()) {
                w.truncate(n as usize);
            }
            w
        })
        .collect();
    let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
    if case.get("normalize_padding").is_none() {
        // What the pipeline feeds the model: each input normalized alone, padded, masked.
        return asr.logits(&refs).unwrap();
    }
    // The extractor called on the batch (statistics over each real length), then the model
    // with or without the mask.
    let padded = asr.extractor.extract_padded(&refs, Some(true));
    let (b, n) = (refs.len(), padded.input_values[0].len());
    let values: Vec<f32> = padded.input_values.into_iter().flatten().collect();
    let input = Tensor::from_vec(values, (b, n), &Device::Cpu).unwrap();
    let lengths: Vec<usize> = refs.iter().map(|r| r.len()).collect();
    let mask = case["mask"].as_bool().unwrap();
    asr.model
        .forward(&input, mask.then_some(lengths.as_slice()))
        .unwrap()
}

#[test]
fn logits_match_transformers() {
    for model in MODELS {
        let exp = expected(model);
        let asr = load(model);
        assert_eq!(
            asr.model.config.inputs_to_logits_ratio() as u64,
            exp["inputs_to_logits_ratio"].as_u64().unwrap()
        );
        for case in exp["logits"].as_array().unwrap() {
            check_logits(model, &model_logits(&asr, case), case);
        }
    }
}

/// Both weight-norm spellings load to the same model: `weight_g`/`weight_v` in a
/// pytorch_model.bin (the hub's wav2vec2-base-960h) and torch 2's `parametrizations` names in
/// safetensors.
#[test]
fn legacy_weight_norm_names_load() {
    let new = load("w2v-group");
    let old = load("w2v-group-legacy");
    let wave = clip("chirp_2s");
    let a: Vec<f32> = new
        .logits(&[&wave])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let b: Vec<f32> = old
        .logits(&[&wave])
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(a, b);
    let exp = expected("w2v-group");
    check_logits(
        "w2v-group-legacy",
        &old.logits(&[&clip("tone_0.3s")]).unwrap(),
        &exp["logits"][0],
    );
}

#[test]
fn pipeline_matches_transformers() {
    for model in MODELS {
        let exp = expected(model);
        let p = asr_pipeline(&root().join("models").join(model));
        for case in exp["pipeline"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let inputs: Vec<Input> = case["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| Input::Audio {
                    samples: clip(i["clip"].as_str().unwrap()),
                    sampling_rate: i["sampling_rate"].as_u64().unwrap() as u32,
                })
                .collect();
            let mut params: Params = case["params"].as_object().unwrap().clone();
            params.insert("batch_size".into(), case["batch_size"].clone());
            let out = p
                .run(&inputs, &params)
                .unwrap_or_else(|e| panic!("{model} {name}: {e}"));
            let ours = serde_json::to_value(&out).unwrap();
            if let Err(e) =
                common::compare(&ours, &case["outputs"], 1e-9, &format!("{model} {name}"))
            {
                panic!("{e}");
            }
        }
    }
}

#[test]
fn file_inputs_decode_as_waveforms() {
    let p = asr_pipeline(&root().join("models").join("w2v-stable"));
    let exp = expected("w2v-stable");
    let case = &exp["pipeline"][1];
    assert_eq!(case["name"], "text/chirp");
    let path = clip_file("chirp_2s").display().to_string();
    let bytes = std::fs::read(&path).unwrap();
    for input in [Input::Text(path), Input::AudioBytes(bytes)] {
        let out = p.run(&[input], &Params::new()).unwrap();
        assert_eq!(serde_json::to_value(&out).unwrap(), case["outputs"]);
    }
}

#[test]
fn infer_task_and_default_dispatch() {
    let dir = root().join("models/w2v-group");
    assert_eq!(
        ferroformers::pipelines::registry::infer_task(&dir),
        Some("automatic-speech-recognition")
    );
    assert_eq!(
        asr_pipeline(&root().join("models").join("w2v-group")).task(),
        "automatic-speech-recognition"
    );
}

#[test]
fn bad_inputs_and_parameters_are_clear_errors() {
    let p = asr_pipeline(&root().join("models").join("w2v-group"));
    let exp = expected("w2v-group");
    let audio = |n: usize| Input::Audio {
        samples: (0..n).map(|i| (i as f32 * 0.01).sin()).collect(),
        sampling_rate: 16000,
    };
    let err = |inp: Input, params: Params| p.run(&[inp], &params).unwrap_err().to_string();
    let with = |k: &str, v: Value| {
        let mut m = Params::new();
        m.insert(k.into(), v);
        m
    };
    // transformers' message for return_timestamps=True (or False) with a CTC model.
    let hf = exp["errors"]["return_timestamps_true"].as_str().unwrap();
    for v in [
        Value::Bool(true),
        Value::Bool(false),
        Value::from("segment"),
    ] {
        let e = err(audio(1600), with("return_timestamps", v));
        assert!(e.contains(hf), "{e}");
    }
    assert!(err(audio(0), Params::new()).contains("no samples"));
    // Fewer samples than one frame's receptive field (85 for this model).
    let e = err(audio(50), Params::new());
    assert!(e.contains("85"), "{e}");
    let e = err(audio(1600), with("return_language", Value::Bool(true)));
    assert!(e.contains("Only Whisper"), "{e}");
    let mut chunk = with("chunk_length_s", Value::from(0.1));
    chunk.insert("stride_length_s".into(), Value::from(0.05));
    assert!(err(audio(16000), chunk).contains("stride"));
    assert!(
        err(Input::Text("/no/such/file.wav".into()), Params::new()).contains("/no/such/file.wav")
    );
    assert!(err(Input::AudioBytes(b"not audio".to_vec()), Params::new()).contains("audio"));
    let e = err(audio(1600), with("num_beams", Value::from(3)));
    assert!(e.contains("num_beams"), "{e}");
}
