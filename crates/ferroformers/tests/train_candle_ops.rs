//! The trainer's candle path (what a GPU or another dtype runs: candle's matmuls, composite
//! LayerNorm and softmax, `index_select` embeddings, attention through split heads, gradients
//! from candle's backward pass, AdamW on a copy) against HF `Trainer`, forced on CPU: the
//! same fixtures and tolerances as the fused CPU ops in `train.rs`. A test binary of its own,
//! since the switch is process-wide.

mod common;
#[path = "support/train_parity.rs"]
mod parity;

use ferroformers::train::{Task, TrainingArguments};
use parity::{check_parity, parity_args, tmp};

#[test]
fn candle_path_matches_hf_trainer() {
    ferroformers::train::ops::use_candle_ops(true);
    let probe = candle_core::Tensor::zeros(2, candle_core::DType::F32, &candle_core::Device::Cpu);
    assert!(!ferroformers::train::ops::fused(&probe.unwrap()));
    for (arch, task, data) in [
        ("bert-seqcls", Task::TextClassification, "seqcls.jsonl"),
        ("roberta-seqcls", Task::TextClassification, "seqcls.jsonl"),
        ("bert-tokcls", Task::TokenClassification, "tokcls.jsonl"),
        ("distilbert-qa", Task::QuestionAnswering, "qa.jsonl"),
        ("roberta-qa", Task::QuestionAnswering, "qa.jsonl"),
    ] {
        let out = tmp(&format!("candle-{arch}"));
        let args = TrainingArguments {
            max_length: Some(if task == Task::QuestionAnswering {
                48
            } else {
                128
            }),
            doc_stride: 16,
            ..parity_args(&out)
        };
        check_parity(arch, task, data, args);
    }
}
