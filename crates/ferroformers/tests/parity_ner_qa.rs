//! Parity of token-classification and question-answering with Python `transformers` 4.57 on the
//! tiny fixture models (labels, words, spans and answers exact; scores within 1e-4), and their
//! errors on bad inputs.

mod common;

use common::*;
use ferroformers::{Error, Input, Output, Params, Pipeline, PipelineOptions};
use serde_json::{json, Value};

const TOL: f64 = 1e-4;
const MODELS: &[&str] = &[
    "bert-tokcls",
    "bert-cased-tokcls",
    "distilbert-tokcls",
    "roberta-tokcls",
    "bert-qa",
    "distilbert-qa",
    "roberta-qa",
];

fn load(name: &str, task: &str, batch_size: usize) -> Pipeline {
    let opts = PipelineOptions {
        model: Some(model_dir(name).to_str().unwrap().to_string()),
        batch_size,
        ..Default::default()
    };
    ferroformers::pipeline_with(task, opts).unwrap_or_else(|e| panic!("{name} {task}: {e}"))
}

fn run_cases(name: &str) -> (usize, Vec<String>) {
    let exp = expected(name);
    let mut failures = Vec::new();
    let mut checked = 0;
    for (ci, case) in exp["pipelines"].as_array().unwrap().iter().enumerate() {
        let task = case["task"].as_str().unwrap();
        if task != "token-classification" && task != "question-answering" {
            continue;
        }
        let pipe = load(
            name,
            task,
            case["batch_size"].as_u64().unwrap_or(1) as usize,
        );
        let params: Params = case["params"].as_object().cloned().unwrap_or_default();
        let inputs: Vec<Input> = case["inputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| Input::from_json(v, 0).unwrap())
            .collect();
        let label = format!("{name} case {ci} ({task} {params:?} {})", case["call"]);
        let outs = match pipe.run(&inputs, &params) {
            Ok(o) => o,
            Err(e) => {
                failures.push(format!("{label}: error {e}"));
                continue;
            }
        };
        let want = case["outputs"].as_array().unwrap();
        if outs.len() != want.len() {
            failures.push(format!("{label}: {} outputs vs {}", outs.len(), want.len()));
            continue;
        }
        for (i, (ours, want)) in outs.iter().zip(want).enumerate() {
            let ours = serde_json::to_value(ours).unwrap();
            if let Err(e) = compare(&ours, want, TOL, &format!("{label} input {i}")) {
                failures.push(e);
            }
            checked += 1;
        }
    }
    (checked, failures)
}

#[test]
fn token_classification_and_qa_match_python() {
    let mut failures = Vec::new();
    let mut checked = 0;
    for name in MODELS {
        let (n, f) = run_cases(name);
        assert!(
            n > 0,
            "{name}: no token-classification / question-answering cases"
        );
        checked += n;
        failures.extend(f);
    }
    assert!(checked > 100, "only {checked} outputs checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} outputs differ:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn params(v: Value) -> Params {
    v.as_object().cloned().unwrap()
}

fn err_text(r: ferroformers::Result<Vec<Output>>) -> String {
    match r {
        Ok(o) => panic!("expected an error, got {o:?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn qa_bad_inputs_are_clear_errors() {
    let qa = load("bert-qa", "question-answering", 1);
    let none = Params::new();
    let ok = [Input::question("Where do I live?", "I live in Berlin.")];

    let e = Input::from_json(&json!({"question": "Where?"}), 2).unwrap_err();
    assert!(matches!(e, Error::InvalidInput { index: 2, .. }), "{e}");
    assert!(e.to_string().contains("context"), "{e}");
    let e = Input::from_json(&json!({"context": "Berlin"}), 0).unwrap_err();
    assert!(e.to_string().contains("question"), "{e}");

    let e = err_text(qa.run(&[Input::question("Where?", "")], &none));
    assert!(e.contains("context") && e.contains("empty"), "{e}");
    let e = err_text(qa.run(&[Input::question("", "Berlin")], &none));
    assert!(e.contains("question") && e.contains("empty"), "{e}");
    let e = err_text(qa.run(&[Input::from("just text")], &none));
    assert!(e.contains("question"), "{e}");

    let e = err_text(qa.run(&ok, &params(json!({"max_answer_len": 0}))));
    assert!(e.contains("max_answer_len"), "{e}");
    let e = err_text(qa.run(&ok, &params(json!({"top_k": 0}))));
    assert!(e.contains("top_k"), "{e}");
    let e = err_text(qa.run(&ok, &params(json!({"max_seq_len": 32, "doc_stride": 40}))));
    assert!(e.contains("doc_stride"), "{e}");
    // A stride as long as the context window would make the tokenizer loop forever / panic.
    let long = "word ".repeat(200);
    let e = err_text(qa.run(
        &[Input::question("Where do I live?", long.as_str())],
        &params(json!({"max_seq_len": 32, "doc_stride": 26})),
    ));
    assert!(e.contains("doc_stride"), "{e}");
    let e = err_text(qa.run(&ok, &params(json!({"max_seq_len": 4096}))));
    assert!(e.contains("max_seq_len"), "{e}");
    // A question that leaves no room for the context.
    let q = "why ".repeat(40);
    let e = err_text(qa.run(
        &[Input::question(q.as_str(), long.as_str())],
        &params(json!({"max_seq_len": 32, "doc_stride": 4})),
    ));
    assert!(e.contains("max_seq_len"), "{e}");

    // Typed input and HF's shapes: one answer is a dict, top_k > 1 a list.
    let out = qa.run(&ok, &none).unwrap();
    assert!(matches!(out[0], Output::Answer(_)), "{out:?}");
    let out = qa.run(&ok, &params(json!({"top_k": 3}))).unwrap();
    assert!(
        matches!(&out[0], Output::Answers(a) if a.len() == 3),
        "{out:?}"
    );
}

#[test]
fn token_classification_bad_inputs_are_clear_errors() {
    let ner = load("bert-tokcls", "ner", 1);
    let text = [Input::from("John lives in Berlin.")];
    let e = err_text(ner.run(&text, &params(json!({"stride": 48}))));
    assert!(e.contains("stride"), "{e}");
    let e = err_text(ner.run(
        &text,
        &params(json!({"stride": 47, "aggregation_strategy": "simple"})),
    ));
    assert!(e.contains("stride"), "{e}");
    let e = err_text(ner.run(
        &text,
        &params(json!({"stride": 4, "aggregation_strategy": "none"})),
    ));
    assert!(e.contains("aggregation_strategy"), "{e}");
    let e = err_text(ner.run(&text, &params(json!({"aggregation_strategy": "mean"}))));
    assert!(e.contains("aggregation_strategy"), "{e}");
    let e = err_text(ner.run(&[Input::question("q", "c")], &Params::new()));
    assert!(e.contains("question-answering"), "{e}");

    // Long inputs: truncated without a stride, covered by windows with one; never a crash.
    let long = "John Smith lives in New York City and works in Paris. ".repeat(30);
    let out = ner
        .run(&[Input::from(long.as_str())], &Params::new())
        .unwrap();
    let Output::Entities(short) = &out[0] else {
        panic!("{out:?}")
    };
    assert!(short.iter().all(|e| e.end <= 200), "{short:?}");
    let p = params(json!({"stride": 8, "aggregation_strategy": "first"}));
    let out = ner.run(&[Input::from(long.as_str())], &p).unwrap();
    let Output::Entities(all) = &out[0] else {
        panic!("{out:?}")
    };
    assert!(all.iter().any(|e| e.end > 1000), "{all:?}");
    // Without an explicit strategy HF allows a stride (tokens, merged across windows).
    ner.run(&[Input::from(long.as_str())], &params(json!({"stride": 8})))
        .unwrap();
}
