//! zero-shot-classification parity with transformers 4.57 on tiny NLI models (BART, RoBERTa),
//! from tests/fixtures/seq2seq (scripts/gen_fixtures_seq2seq.py).

mod common;

use std::path::PathBuf;

use ferroformers::{Error, Input, Params, PipelineOptions};
use serde_json::{json, Value};

fn dir(name: &str) -> PathBuf {
    common::fixtures().join("seq2seq").join("models").join(name)
}

fn expected(name: &str) -> Value {
    let p = common::fixtures()
        .join("seq2seq")
        .join("expected")
        .join(format!("{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn pipe(name: &str, batch_size: usize) -> ferroformers::Result<ferroformers::Pipeline> {
    ferroformers::pipeline_with(
        "zero-shot-classification",
        PipelineOptions {
            model: Some(dir(name).to_str().unwrap().to_string()),
            batch_size,
            ..Default::default()
        },
    )
}

#[test]
fn zero_shot_matches_python() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for name in ["bart-nli", "roberta-nli"] {
        let exp = expected(name);
        for (ci, case) in exp["pipelines"].as_array().unwrap().iter().enumerate() {
            let p = pipe(name, case["batch_size"].as_u64().unwrap_or(1) as usize).unwrap();
            let params: Params = case["params"].as_object().cloned().unwrap();
            let inputs: Vec<Input> = case["inputs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| Input::from_json(v, 0).unwrap())
                .collect();
            let outs = p.run(&inputs, &params).unwrap();
            let ours = serde_json::to_value(&outs).unwrap();
            if let Err(e) =
                common::compare(&ours, &case["outputs"], 1e-4, &format!("{name} case {ci}"))
            {
                failures.push(e);
            }
            checked += outs.len();
        }
    }
    assert!(checked >= 40, "only {checked} outputs checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn zero_shot_errors() {
    let p = pipe("bart-nli", 1).unwrap();
    let run = |params: Value| p.run(&["some text".into()], params.as_object().unwrap());
    let err = run(json!({"candidate_labels": []})).unwrap_err();
    assert!(err.to_string().contains("candidate_labels"), "{err}");
    let err = run(json!({})).unwrap_err();
    assert!(err.to_string().contains("candidate_labels"), "{err}");
    let err =
        run(json!({"candidate_labels": ["a"], "hypothesis_template": "no slot"})).unwrap_err();
    assert!(
        matches!(err, Error::InvalidParameter { ref name, .. } if name == "hypothesis_template"),
        "{err}"
    );
    // HF warns and silently uses the last logit; we refuse a model without an entailment label.
    let err = pipe("bert-no-entailment", 1).unwrap_err();
    assert!(err.to_string().contains("entailment"), "{err}");
}
