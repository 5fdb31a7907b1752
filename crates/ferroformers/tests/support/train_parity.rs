//! Shared by the training tests: the fixture script's settings and the comparison of a run
//! with HF `Trainer`'s (losses, gradient norms, every weight after 5 steps).
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use ferroformers::train::{Event, Task, Trainer, TrainingArguments};

use crate::common;

pub fn train_dir() -> PathBuf {
    common::fixtures().join("train")
}

pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ff-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The fixture script's Trainer settings, in file order.
pub fn parity_args(out: &Path) -> TrainingArguments {
    TrainingArguments {
        output_dir: out.to_path_buf(),
        learning_rate: 1e-3,
        max_steps: Some(5),
        per_device_train_batch_size: 4,
        warmup_steps: 2,
        weight_decay: 0.01,
        max_grad_norm: 1.0,
        logging_steps: 1,
        shuffle: false,
        ..Default::default()
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>())
        .unwrap()
}

pub fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

/// Train `arch`'s init fixture on `data` for `task` with the fixture script's settings and
/// compare losses, gradient norms and every weight with HF `Trainer`'s.
pub fn check_parity(arch: &str, task: Task, data: &str, args: TrainingArguments) -> Trainer {
    let want = common::expected(&format!("train-{arch}"));
    let init = train_dir().join(format!("{arch}-init"));
    let mut t = Trainer::for_task(
        task,
        init.to_str().unwrap(),
        &train_dir().join(data),
        None,
        args,
    )
    .unwrap();
    assert!(t.params.fresh.is_empty(), "{arch}: {:?}", t.params.fresh);
    let mut losses = Vec::new();
    t.train(&mut |e| {
        if let Event::Step { loss, .. } = e {
            losses.push(loss)
        }
    })
    .unwrap();
    let grad_norms: Vec<f64> = t
        .log_history
        .iter()
        .filter_map(|h| h.get("grad_norm").and_then(|g| g.as_f64()))
        .collect();
    for (i, w) in want["losses"].as_array().unwrap().iter().enumerate() {
        let w = w.as_f64().unwrap();
        assert!(
            close(losses[i], w, 1e-4),
            "{arch} step {}: loss {} vs {w}",
            i + 1,
            losses[i]
        );
    }
    for (i, w) in want["grad_norms"].as_array().unwrap().iter().enumerate() {
        let w = w.as_f64().unwrap();
        assert!(
            close(grad_norms[i], w, 1e-4),
            "{arch} step {}: grad norm {} vs {w}",
            i + 1,
            grad_norms[i]
        );
    }
    let final_w = candle_core::safetensors::load(
        train_dir().join(format!("{arch}-final.safetensors")),
        &Device::Cpu,
    )
    .unwrap();
    let mut names: Vec<&String> = t.params.names.iter().collect();
    names.sort();
    let mut theirs: Vec<&String> = final_w.keys().collect();
    theirs.sort();
    assert_eq!(names, theirs, "{arch}: parameter names");
    let mut worst = (0f32, String::new());
    for (n, v) in t.params.names.iter().zip(&t.params.vars) {
        // The attention keys' biases shift every score of a row by the same amount, which
        // softmax ignores: their true gradient is 0, and what both frameworks compute is
        // rounding noise that Adam's normalisation turns into steps of about the learning
        // rate, in directions the noise decides. Bounded by the 5 steps' learning rates.
        // The same holds, for question answering, for what adds one constant to the start
        // (end) logits of every position that their softmax runs over: the head's bias and
        // the last layer's output LayerNorm bias (the head maps it to such a constant).
        let last = format!("layer.{}.", t.cfg.layers - 1);
        let qa_constant = task == Task::QuestionAnswering
            && (n.as_str() == "qa_outputs.bias"
                || (n.contains(&last)
                    && (n.ends_with("output.LayerNorm.bias")
                        || n.ends_with("output_layer_norm.bias"))
                    && !n.contains("attention")));
        let noise_only = n.ends_with("key.bias") || n.ends_with("k_lin.bias") || qa_constant;
        let d = max_diff(v.as_tensor(), &final_w[n]);
        if noise_only {
            assert!(d <= 5e-3, "{arch}: `{n}` moved {d} away from torch's");
        } else if d > worst.0 {
            worst = (d, n.clone());
        }
    }
    assert!(
        worst.0 <= 1e-4,
        "{arch}: weights differ by {} at `{}`",
        worst.0,
        worst.1
    );
    eprintln!(
        "{arch}: losses {losses:?}, largest weight difference {} ({})",
        worst.0, worst.1
    );
    t
}
