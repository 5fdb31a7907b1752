//! Shared helpers for the parity tests: fixture paths and tolerant JSON comparison.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join("models").join(name)
}

pub fn expected(name: &str) -> Value {
    let p = fixtures().join("expected").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).unwrap()
}

pub fn expected_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join("expected"))
        .unwrap()
        .filter_map(|e| {
            let p = e.ok()?.path();
            if p.extension()? != "json" {
                return None;
            }
            Some(p.file_stem()?.to_str()?.to_string())
        })
        .filter(|n| model_dir(n).is_dir())
        .collect();
    names.sort();
    names
}

/// Compare `ours` to `want`: numbers within `tol` (absolute, or relative for large values),
/// everything else exactly. Returns the first difference, with its JSON path.
pub fn compare(ours: &Value, want: &Value, tol: f64, path: &str) -> Result<(), String> {
    match (ours, want) {
        (Value::Number(a), Value::Number(b)) => {
            let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
            if (a - b).abs() <= tol * b.abs().max(1.0) {
                Ok(())
            } else {
                Err(format!("{path}: {a} vs expected {b}"))
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            if a.len() != b.len() {
                return Err(format!(
                    "{path}: length {} vs expected {}",
                    a.len(),
                    b.len()
                ));
            }
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                compare(x, y, tol, &format!("{path}[{i}]"))?;
            }
            Ok(())
        }
        (Value::Object(a), Value::Object(b)) => {
            let mut ka: Vec<&String> = a.keys().collect();
            let mut kb: Vec<&String> = b.keys().collect();
            ka.sort();
            kb.sort();
            if ka != kb {
                return Err(format!("{path}: keys {ka:?} vs expected {kb:?}"));
            }
            for k in kb {
                compare(&a[k], &b[k], tol, &format!("{path}.{k}"))?;
            }
            Ok(())
        }
        (a, b) if a == b => Ok(()),
        (a, b) => Err(format!("{path}: {a} vs expected {b}")),
    }
}

/// A decoder fixture (tests/fixtures/decoders/models/NAME) as a generator, f32 on CPU.
pub fn decoder(name: &str) -> ferroformers::generation::TextGenerator {
    decoder_at(&fixtures().join("decoders/models").join(name))
}

/// The decoder in folder `p` as a generator, f32 on CPU.
pub fn decoder_at(p: &std::path::Path) -> ferroformers::generation::TextGenerator {
    ferroformers::generation::TextGenerator::load(
        &p.to_string_lossy(),
        None,
        None,
        &candle_core::Device::Cpu,
        candle_core::DType::F32,
        None,
    )
    .unwrap()
}

/// The automatic-speech-recognition pipeline of the model folder `dir`.
pub fn asr_pipeline(dir: &std::path::Path) -> ferroformers::Pipeline {
    ferroformers::pipeline_with(
        "automatic-speech-recognition",
        ferroformers::PipelineOptions {
            model: Some(dir.display().to_string()),
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// One case of a Whisper fixture (`{"clip", "params", ...}`, the clip a path under `root`):
/// a label for messages, and the pipeline's output for the clip with the case's parameters,
/// as JSON (the error's text when it fails).
pub fn run_asr_case(
    p: &ferroformers::Pipeline,
    root: &std::path::Path,
    model: &str,
    case: &Value,
) -> (String, Result<Value, String>) {
    let params: ferroformers::Params = case["params"].as_object().unwrap().clone();
    let what = format!("{model} {} {params:?}", case["clip"]);
    let clip = root.join(case["clip"].as_str().unwrap());
    let input = ferroformers::Input::Text(clip.display().to_string());
    let out = p
        .run(&[input], &params)
        .map(|out| serde_json::to_value(&out).unwrap()[0].clone())
        .map_err(|e| e.to_string());
    (what, out)
}
