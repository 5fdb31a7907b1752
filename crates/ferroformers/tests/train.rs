//! Fine-tuning against HF `Trainer` (fixtures from scripts/gen_fixtures_train.py): losses,
//! gradient norms and every weight after 5 AdamW steps with warm-up, decay and clipping; every
//! parameter gets a gradient, and finite differences agree with it; the saved model serves in
//! our pipeline with the trainer's own logits; bad data is refused before training.

mod common;
#[path = "support/train_parity.rs"]
mod parity;

use std::path::Path;

use candle_core::{Device, Tensor};
use ferroformers::train::data::Target;
use ferroformers::train::{EvalStrategy, Event, SaveStrategy, Task, Trainer, TrainingArguments};
use ferroformers::{Input, Params, PipelineOptions};
use parity::{check_parity, close, max_diff, parity_args, tmp, train_dir};

#[test]
fn five_steps_match_hf_trainer_for_bert_distilbert_roberta() {
    for arch in ["bert-seqcls", "distilbert-seqcls", "roberta-seqcls"] {
        let out = tmp(arch);
        check_parity(
            arch,
            Task::TextClassification,
            "seqcls.jsonl",
            parity_args(&out),
        );
    }
}

/// Token classification as `run_ner`: tags on each word's first sub-token (the fixture's
/// aligned labels), the models' own label order kept, then 5 steps as HF's `Trainer`.
#[test]
fn token_classification_matches_hf_trainer() {
    for arch in ["bert-tokcls", "distilbert-tokcls", "roberta-tokcls"] {
        let want = common::expected(&format!("train-{arch}"));
        let out = tmp(arch);
        let args = TrainingArguments {
            max_length: Some(128),
            ..parity_args(&out)
        };
        let t = check_parity(arch, Task::TokenClassification, "tokcls.jsonl", args);
        let feats = t.train_features();
        let want_ids = want["input_ids"].as_array().unwrap();
        let want_tags = want["label_ids"].as_array().unwrap();
        assert_eq!(feats.len(), want_ids.len(), "{arch}");
        for (i, (ids, target, _)) in feats.iter().enumerate() {
            let wi: Vec<u32> = serde_json::from_value(want_ids[i].clone()).unwrap();
            let wt: Vec<i64> = serde_json::from_value(want_tags[i].clone()).unwrap();
            assert_eq!(*ids, wi.as_slice(), "{arch} row {i}: ids");
            assert_eq!(**target, Target::Tags(wt), "{arch} row {i}: tags");
        }
    }
}

/// Question answering as `run_qa`: windows of 48 tokens with a stride of 16, each labelled with
/// the answer's tokens or CLS (the fixture's features), then 5 steps as HF's `Trainer`; the
/// nested SQuAD file gives the same features as the JSON Lines one.
#[test]
fn question_answering_matches_hf_trainer() {
    for arch in ["bert-qa", "distilbert-qa", "roberta-qa"] {
        let want = common::expected(&format!("train-{arch}"));
        let out = tmp(arch);
        let args = TrainingArguments {
            max_length: Some(48),
            doc_stride: 16,
            ..parity_args(&out)
        };
        let t = Trainer::for_task(
            Task::QuestionAnswering,
            train_dir().join(format!("{arch}-init")).to_str().unwrap(),
            &train_dir().join("qa.jsonl"),
            None,
            args.clone(),
        )
        .unwrap();
        let feats = t.train_features();
        let want_f = want["features"].as_array().unwrap();
        assert_eq!(feats.len(), want_f.len(), "{arch}: windows");
        for (i, (ids, target, example)) in feats.iter().enumerate() {
            let w = &want_f[i];
            let wi: Vec<u32> = serde_json::from_value(w["input_ids"].clone()).unwrap();
            assert_eq!(*ids, wi.as_slice(), "{arch} window {i}: ids");
            assert_eq!(*example, w["example"].as_u64().unwrap() as usize);
            let span = Target::Span(
                w["start_position"].as_u64().unwrap() as u32,
                w["end_position"].as_u64().unwrap() as u32,
            );
            assert_eq!(**target, span, "{arch} window {i}");
        }
        let nested = Trainer::for_task(
            Task::QuestionAnswering,
            train_dir().join(format!("{arch}-init")).to_str().unwrap(),
            &train_dir().join("qa-squad.json"),
            None,
            args.clone(),
        )
        .unwrap();
        let same: Vec<_> = nested.train_features().into_iter().collect();
        assert_eq!(same, feats, "{arch}: SQuAD layout");
        check_parity(arch, Task::QuestionAnswering, "qa.jsonl", args);
    }
}

/// seqeval's and the SQuAD script's numbers on the fixture's tricky cases.
#[test]
fn metrics_match_seqeval_and_squad() {
    use ferroformers::train::metrics;
    let want = common::expected("train-metrics");
    let strs =
        |v: &serde_json::Value| -> Vec<Vec<String>> { serde_json::from_value(v.clone()).unwrap() };
    for (i, c) in want["seqeval"].as_array().unwrap().iter().enumerate() {
        let (p, r, f, a) = metrics::seqeval(&strs(&c["true"]), &strs(&c["pred"]));
        for (name, ours) in [("precision", p), ("recall", r), ("f1", f), ("accuracy", a)] {
            let w = c[name].as_f64().unwrap();
            assert!(
                close(ours, w, 1e-12),
                "seqeval case {i} {name}: {ours} vs {w}"
            );
        }
    }
    for (i, c) in want["squad"].as_array().unwrap().iter().enumerate() {
        let preds: Vec<String> = serde_json::from_value(c["predictions"].clone()).unwrap();
        let (em, f1) = metrics::squad(&preds, &strs(&c["references"]));
        let (wem, wf1) = (
            c["exact_match"].as_f64().unwrap(),
            c["f1"].as_f64().unwrap(),
        );
        assert!(
            close(em, wem, 1e-9) && close(f1, wf1, 1e-9),
            "squad case {i}: {em} {f1} vs {wem} {wf1}"
        );
    }
}

/// Gradient accumulation over 2 batches for one epoch of 5 batches (groups of 2, 2 and 1, each
/// loss divided by its own group's size, as HF's `Trainer` does): the groups' mean losses, the
/// 3 gradient norms and every weight match HF's.
#[test]
fn gradient_accumulation_matches_hf_trainer() {
    let want = common::expected("train-bert-seqcls-accum");
    let out = tmp("accum");
    let mut t = Trainer::new(
        train_dir().join("bert-seqcls-init").to_str().unwrap(),
        &train_dir().join("seqcls.jsonl"),
        None,
        TrainingArguments {
            max_steps: None,
            num_train_epochs: 1.0,
            gradient_accumulation_steps: 2,
            ..parity_args(&out)
        },
    )
    .unwrap();
    assert_eq!(t.total_steps(), 3);
    let mut losses = Vec::new();
    t.train(&mut |e| {
        if let Event::Step { loss, .. } = e {
            losses.push(loss)
        }
    })
    .unwrap();
    let l: Vec<f64> = want["losses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let groups = [(l[0] + l[1]) / 2.0, (l[2] + l[3]) / 2.0, l[4]];
    for (i, (a, b)) in losses.iter().zip(groups).enumerate() {
        assert!(close(*a, b, 1e-4), "step {}: loss {a} vs {b}", i + 1);
    }
    let norms: Vec<f64> = t
        .log_history
        .iter()
        .filter_map(|h| h.get("grad_norm").and_then(|g| g.as_f64()))
        .collect();
    for (i, w) in want["grad_norms"].as_array().unwrap().iter().enumerate() {
        let w = w.as_f64().unwrap();
        assert!(
            close(norms[i], w, 1e-4),
            "step {}: grad norm {} vs {w}",
            i + 1,
            norms[i]
        );
    }
    let final_w = candle_core::safetensors::load(
        train_dir().join("bert-seqcls-accum-final.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    for (n, v) in t.params.names.iter().zip(&t.params.vars) {
        let d = max_diff(v.as_tensor(), &final_w[n]);
        let tol = if n.ends_with("key.bias") { 5e-3 } else { 1e-4 };
        assert!(d <= tol, "`{n}` differs by {d}");
    }
}

/// Checkpoints hold everything a run needs: resuming from one mid-epoch, from one at an
/// epoch's end, or from one in the second epoch gives exactly the weights of the run that was
/// never interrupted (dropout on: the generators are restored too); `save_total_limit` keeps
/// the newest.
#[test]
fn resuming_a_checkpoint_continues_bit_for_bit() {
    let data = train_dir().join("seqcls.jsonl");
    let model = common::model_dir("bert-seqcls");
    let model = model.to_str().unwrap();
    let args = |out: &Path, strategy: SaveStrategy| TrainingArguments {
        output_dir: out.to_path_buf(),
        learning_rate: 1e-3,
        max_steps: Some(7),
        per_device_train_batch_size: 4,
        logging_steps: 1,
        save_strategy: strategy,
        save_steps: 3,
        ..Default::default()
    };
    let out = tmp("ckpt");
    let mut whole = Trainer::new(model, &data, None, args(&out, SaveStrategy::Steps)).unwrap();
    whole.train(&mut |_| {}).unwrap();
    assert!(out.join("checkpoint-3").is_dir() && out.join("checkpoint-6").is_dir());
    let out_e = tmp("ckpt-epoch");
    let mut by_epoch = Trainer::new(model, &data, None, args(&out_e, SaveStrategy::Epoch)).unwrap();
    by_epoch.train(&mut |_| {}).unwrap();
    assert!(out_e.join("checkpoint-5").is_dir());
    for ckpt in [
        out.join("checkpoint-3"),
        out.join("checkpoint-6"),
        out_e.join("checkpoint-5"),
    ] {
        let again = tmp("ckpt-again");
        let mut t = Trainer::new(model, &data, None, args(&again, SaveStrategy::No)).unwrap();
        t.resume_from_checkpoint(&ckpt).unwrap();
        t.train(&mut |_| {}).unwrap();
        assert_eq!(t.global_step, 7);
        for (n, (a, b)) in t
            .params
            .names
            .iter()
            .zip(t.params.vars.iter().zip(&whole.params.vars))
        {
            assert_eq!(
                max_diff(a.as_tensor(), b.as_tensor()),
                0.0,
                "{}: `{n}` differs from the uninterrupted run",
                ckpt.display()
            );
        }
        let losses = |t: &Trainer| -> Vec<f64> {
            t.log_history
                .iter()
                .filter_map(|h| h.get("loss")?.as_f64())
                .collect()
        };
        // The entries before the checkpoint come back from trainer_state.json: serde_json's
        // default parser may move the last digit of an f64.
        let (a, b) = (losses(&t), losses(&whole));
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-12, "{}: {a:?} vs {b:?}", ckpt.display());
        }
    }
    let limited = tmp("ckpt-limit");
    let mut t = Trainer::new(
        model,
        &data,
        None,
        TrainingArguments {
            save_steps: 2,
            save_total_limit: Some(2),
            ..args(&limited, SaveStrategy::Steps)
        },
    )
    .unwrap();
    t.train(&mut |_| {}).unwrap();
    let mut left: Vec<String> = std::fs::read_dir(&limited)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["checkpoint-4", "checkpoint-6"]);
}

/// `load_best_model_at_end`: evaluation and checkpoints every step, the lowest evaluation
/// loss wins; its checkpoint survives `save_total_limit`, trainer_state.json names it, and
/// the model ends with its weights. Mismatched schedules are refused.
#[test]
fn best_model_is_loaded_at_end() {
    let data = train_dir().join("seqcls.jsonl");
    let model = common::model_dir("bert-seqcls");
    let model = model.to_str().unwrap();
    let out = tmp("best");
    let args = TrainingArguments {
        output_dir: out.clone(),
        learning_rate: 3e-2,
        max_steps: Some(6),
        per_device_train_batch_size: 4,
        eval_strategy: Some(EvalStrategy::Steps),
        eval_steps: 1,
        save_strategy: SaveStrategy::Steps,
        save_steps: 1,
        save_total_limit: Some(1),
        load_best_model_at_end: true,
        ..Default::default()
    };
    let mut t = Trainer::new(model, &data, Some(&data), args.clone()).unwrap();
    t.train(&mut |_| {}).unwrap();
    let evals: Vec<(f64, usize)> = t
        .log_history
        .iter()
        .filter_map(|h| {
            Some((
                h.get("eval_loss")?.as_f64()?,
                h.get("step")?.as_u64()? as usize,
            ))
        })
        .collect();
    assert_eq!(evals.len(), 6);
    let (best_loss, best_step) =
        evals
            .iter()
            .cloned()
            .fold((f64::INFINITY, 0), |a, b| if b.0 < a.0 { b } else { a });
    let (v, step, dir) = t.best.clone().unwrap();
    assert_eq!((v, step), (best_loss, best_step));
    let dir = dir.unwrap();
    assert!(dir.ends_with(format!("checkpoint-{best_step}")) && dir.is_dir());
    assert!(
        out.join("checkpoint-6").is_dir(),
        "the newest checkpoint is kept too"
    );
    // The weights now are the best checkpoint's.
    let saved =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    for (n, v) in t.params.names.iter().zip(&t.params.vars) {
        assert_eq!(max_diff(v.as_tensor(), &saved[n]), 0.0, "`{n}`");
    }
    assert!((t.evaluate().unwrap().loss - best_loss).abs() < 1e-6);
    let e = refused(
        model,
        &data,
        Some(&data),
        TrainingArguments {
            save_strategy: SaveStrategy::Epoch,
            ..args
        },
    );
    assert!(e.contains("load_best_model_at_end"), "{e}");
}

/// A bare base model (no head: a fresh, seeded one): every parameter, embeddings to head,
/// gets a non-zero gradient; and central differences of the loss agree with the gradient of
/// the largest-gradient element of every parameter tensor (each layer type: embeddings,
/// LayerNorm, attention, feed-forward, pooler, classifier).
#[test]
fn every_parameter_gets_its_gradient() {
    for base in ["bert-base", "distilbert-base", "roberta-base"] {
        let out = tmp(base);
        let t = Trainer::new(
            common::model_dir(base).to_str().unwrap(),
            &train_dir().join("seqcls.jsonl"),
            None,
            parity_args(&out),
        )
        .unwrap();
        assert!(
            t.params.fresh.iter().any(|n| n.starts_with("classifier")),
            "{base}: {:?}",
            t.params.fresh
        );
        let idx = [0usize, 1, 2, 3];
        let (loss0, grads) = t.loss_and_gradients(&idx, false).unwrap();
        for (n, g) in t.params.names.iter().zip(&grads) {
            // Key biases excepted: softmax ignores a shift of a whole row, so their true
            // gradient is 0 (the central differences below check that).
            if !(n.ends_with("key.bias") || n.ends_with("k_lin.bias")) {
                assert!(g.iter().any(|&x| x != 0.0), "{base}: `{n}` got no gradient");
            }
        }
        let eps = 1e-2f32;
        for (i, (n, g)) in t.params.names.iter().zip(&grads).enumerate() {
            let (j, &gj) = g
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.abs().total_cmp(&b.1.abs()))
                .unwrap();
            let var = &t.params.vars[i];
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let shape = var.as_tensor().shape().clone();
            let at = |delta: f32| {
                let mut v = orig.clone();
                v[j] += delta;
                var.set(&Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap())
                    .unwrap();
                t.loss_and_gradients(&idx, false).unwrap().0
            };
            let numeric = (at(eps) - at(-eps)) / (2.0 * eps as f64);
            var.set(&Tensor::from_vec(orig, shape, &Device::Cpu).unwrap())
                .unwrap();
            assert!(
                (numeric - gj as f64).abs() <= 2e-3 + 0.05 * (gj as f64).abs(),
                "{base}: `{n}`[{j}]: backward {gj} vs central difference {numeric} (loss {loss0})"
            );
        }
    }
}

/// Trained and saved: the folder has HF's files and names, the pipeline loads it and gives
/// the trainer's own probabilities, and the same seed gives the same weights.
#[test]
fn saved_model_serves_in_the_pipeline() {
    let out = tmp("saved");
    let args = TrainingArguments {
        max_steps: Some(3),
        learning_rate: 1e-3,
        logging_steps: 1,
        eval_strategy: Some(EvalStrategy::Steps),
        eval_steps: 3,
        ..parity_args(&out)
    };
    let init = train_dir().join("bert-seqcls-init");
    let data = train_dir().join("seqcls.jsonl");
    let mut t = Trainer::new(
        init.to_str().unwrap(),
        &data,
        Some(&data),
        TrainingArguments {
            shuffle: true,
            ..args.clone()
        },
    )
    .unwrap();
    t.train(&mut |_| {}).unwrap();
    t.save(&out).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "vocab.txt",
        "trainer_state.json",
        "training_args.json",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "BertForSequenceClassification");
    assert_eq!(cfg["id2label"]["2"], "positive");
    assert_eq!(cfg["label2id"]["negative"], 0);
    assert_eq!(cfg["problem_type"], "single_label_classification");
    // safetensors header: HF's names (those of the fixture Python wrote) and {"format": "pt"}.
    let bytes = std::fs::read(out.join("model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
    let ours: std::collections::BTreeSet<String> = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    let hf = candle_core::safetensors::load(
        common::model_dir("bert-seqcls").join("model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let hf: std::collections::BTreeSet<String> = hf.keys().cloned().collect();
    assert_eq!(ours, hf);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("trainer_state.json")).unwrap())
            .unwrap();
    assert_eq!(state["global_step"], 3);
    assert!(state["log_history"]
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h.get("eval_accuracy").is_some()));

    let texts = [
        "I absolutely loved this movie!",
        "The weather today is neither good nor bad.",
    ];
    let logits = t.logits(&[(texts[0], None), (texts[1], None)]).unwrap();
    let pipe = ferroformers::pipeline_with(
        "text-classification",
        PipelineOptions {
            model: Some(out.to_str().unwrap().into()),
            ..Default::default()
        },
    )
    .unwrap();
    let mut params = Params::new();
    params.insert("top_k".into(), serde_json::Value::Null);
    for (i, text) in texts.iter().enumerate() {
        let res = pipe.run(&[Input::Text(text.to_string())], &params).unwrap();
        let v = serde_json::to_value(&res[0]).unwrap();
        let row = &logits[i];
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let z: f32 = row.iter().map(|x| (x - m).exp()).sum();
        for item in v.as_array().unwrap() {
            let label = item["label"].as_str().unwrap();
            let id = ["negative", "neutral", "positive"]
                .iter()
                .position(|l| *l == label)
                .unwrap();
            let p = (row[id] - m).exp() / z;
            let s = item["score"].as_f64().unwrap() as f32;
            assert!(
                (p - s).abs() < 1e-5,
                "{text}: {label} pipeline {s} vs trainer {p}"
            );
        }
    }
    // Same seed, same run.
    let mut t2 = Trainer::new(
        init.to_str().unwrap(),
        &data,
        None,
        TrainingArguments {
            shuffle: true,
            ..args
        },
    )
    .unwrap();
    t2.train(&mut |_| {}).unwrap();
    for (a, b) in t.params.vars.iter().zip(&t2.params.vars) {
        let d = max_diff(a.as_tensor(), b.as_tensor());
        assert_eq!(d, 0.0);
    }
}

/// The error `Trainer::new` gives (it must refuse).
fn refused(model: &str, train: &Path, eval: Option<&Path>, args: TrainingArguments) -> String {
    match Trainer::new(model, train, eval, args) {
        Ok(_) => panic!("{} was accepted", train.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn bad_data_is_refused_before_training() {
    let dir = tmp("bad");
    let init = train_dir().join("bert-seqcls-init");
    let init = init.to_str().unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let defaults = TrainingArguments::default;
    let train = write(
        "train.jsonl",
        "{\"text\": \"good\", \"label\": \"pos\"}\n{\"text\": \"bad\", \"label\": \"neg\"}\n",
    );
    let eval = write(
        "eval.jsonl",
        "{\"text\": \"fine\", \"label\": \"pos\"}\n{\"text\": \"meh\", \"label\": \"mixed\"}\n",
    );
    let cases: Vec<(String, &[&str])> =
        vec![
        (refused(init, &train, Some(&eval), defaults()), &["eval.jsonl", "line 2", "`mixed`"]),
        (
            refused(init, &write("missing.csv", "sentence,label\nhello,pos\n"), None, defaults()),
            &["missing.csv", "line 2", "`text`"],
        ),
        (refused(init, &write("empty.jsonl", "\n"), None, defaults()), &["empty"]),
        (
            refused(
                init,
                &write(
                    "reg.jsonl",
                    "{\"text\": \"a\", \"label\": 0.5}\n{\"text\": \"b\", \"label\": \"high\"}\n",
                ),
                None,
                defaults(),
            ),
            &["reg.jsonl", "line 2"],
        ),
        (
            refused(
                init,
                &train,
                None,
                TrainingArguments {
                    learning_rate: -1.0,
                    ..defaults()
                },
            ),
            &["learning_rate"],
        ),
        (
            refused(common::model_dir("no-config").to_str().unwrap(), &train, None, defaults()),
            &["config.json"],
        ),
    ];
    for (e, parts) in cases {
        assert!(
            parts.iter().all(|p| e.contains(p)),
            "{e}: expected {parts:?}"
        );
    }

    // Token classification and question answering.
    let tok_init = train_dir().join("bert-tokcls-init");
    let qa_init = train_dir().join("bert-qa-init");
    let task_refused =
        |task: Task, init: &Path, train: &Path, eval: Option<&Path>| match Trainer::for_task(
            task,
            init.to_str().unwrap(),
            train,
            eval,
            defaults(),
        ) {
            Ok(_) => panic!("{} was accepted", train.display()),
            Err(e) => e.to_string(),
        };
    let tags_ok = write(
        "tags.jsonl",
        "{\"tokens\": [\"John\", \"ran\"], \"ner_tags\": [\"B-PER\", \"O\"]}\n",
    );
    let squad = |ctx: &str, answer: &str, start: usize| {
        format!(
            "{{\"id\": \"x\", \"question\": \"Who?\", \"context\": \"{ctx}\", \"answers\": \
             {{\"text\": [\"{answer}\"], \"answer_start\": [{start}]}}}}\n"
        )
    };
    let qa_ok = write("qa-ok.jsonl", &squad("John ran.", "John", 0));
    let cases: Vec<(String, &[&str])> = vec![
        (
            task_refused(
                Task::TokenClassification,
                &tok_init,
                &write(
                    "mismatch.jsonl",
                    "{\"tokens\": [\"a\"], \"ner_tags\": [\"O\"]}\n\
                     {\"tokens\": [\"John\", \"ran\"], \"ner_tags\": [\"B-PER\"]}\n",
                ),
                None,
            ),
            &["mismatch.jsonl", "line 2", "2 words but 1 tags"],
        ),
        (
            task_refused(
                Task::TokenClassification,
                &tok_init,
                &tags_ok,
                Some(&write(
                    "tags-eval.jsonl",
                    "{\"tokens\": [\"Bonn\"], \"ner_tags\": [\"B-LOC\"]}\n",
                )),
            ),
            &["tags-eval.jsonl", "line 1", "`B-LOC`"],
        ),
        (
            task_refused(
                Task::TokenClassification,
                &tok_init,
                &write(
                    "words.jsonl",
                    "{\"text\": \"John ran\", \"label\": \"x\"}\n",
                ),
                None,
            ),
            &["words.jsonl", "line 1", "`tokens`"],
        ),
        (
            task_refused(
                Task::QuestionAnswering,
                &qa_init,
                &write("outside.jsonl", &squad("John ran.", "John ran away", 0)),
                None,
            ),
            &["outside.jsonl", "line 1", "outside the context"],
        ),
        (
            task_refused(
                Task::QuestionAnswering,
                &qa_init,
                &qa_ok,
                Some(&write("shifted.jsonl", &squad("John ran.", "John", 2))),
            ),
            &["shifted.jsonl", "line 1", "not the context's text"],
        ),
    ];
    for (e, parts) in cases {
        assert!(
            parts.iter().all(|p| e.contains(p)),
            "{e}: expected {parts:?}"
        );
    }
}

/// Labels that do not fit the base model: names other than the model's (same count) train
/// with a warning naming both sets, as `run_glue`/`run_ner` warn; a single distinct label, an
/// integer past the model's classes and a new NER tag are errors naming the label, the file
/// and line where it first appears, and the model's labels (they were weight-shape errors).
#[test]
fn labels_that_do_not_fit_the_model_are_named() {
    let dir = tmp("labels");
    let write = |name: &str, body: &str| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let seq = train_dir().join("bert-seqcls-init");
    let seq = seq.to_str().unwrap();
    let other = write(
        "other.jsonl",
        "{\"text\": \"good\", \"label\": \"positive\"}\n\
         {\"text\": \"bad\", \"label\": \"negative\"}\n\
         {\"text\": \"odd\", \"label\": \"weird\"}\n",
    );
    let t = Trainer::new(seq, &other, None, TrainingArguments::default()).unwrap();
    assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
    let w = &t.warnings[0];
    assert!(
        w.contains("NEGATIVE, NEUTRAL, POSITIVE")
            && w.contains("negative, positive, weird")
            && w.contains("ignored"),
        "{w}"
    );
    let same = write(
        "same.jsonl",
        "{\"text\": \"good\", \"label\": \"POSITIVE\"}\n\
         {\"text\": \"bad\", \"label\": \"NEGATIVE\"}\n\
         {\"text\": \"meh\", \"label\": \"NEUTRAL\"}\n",
    );
    let t = Trainer::new(seq, &same, None, TrainingArguments::default()).unwrap();
    assert!(t.warnings.is_empty(), "{:?}", t.warnings);

    let single = write(
        "single.jsonl",
        "{\"text\": \"good\", \"label\": \"positive\"}\n\
         {\"text\": \"fine\", \"label\": \"positive\"}\n",
    );
    let e = refused(seq, &single, None, TrainingArguments::default());
    assert!(
        e.contains("single.jsonl") && e.contains("`positive`") && e.contains("two"),
        "{e}"
    );
    let seven = write(
        "seven.jsonl",
        "{\"text\": \"a\", \"label\": 0}\n{\"text\": \"b\", \"label\": 1}\n\
         {\"text\": \"c\", \"label\": 7}\n",
    );
    let e = refused(seq, &seven, None, TrainingArguments::default());
    for part in ["seven.jsonl", "line 3", "`7`", "3 classes", "NEGATIVE"] {
        assert!(e.contains(part), "{e}: expected {part}");
    }
    assert!(!e.contains("shape"), "{e}");

    let tok = train_dir().join("bert-tokcls-init");
    let new_tag = write(
        "new-tag.jsonl",
        "{\"tokens\": [\"John\", \"ran\"], \"ner_tags\": [\"B-PER\", \"O\"]}\n\
         {\"tokens\": [\"Bonn\"], \"ner_tags\": [\"B-CITY\"]}\n",
    );
    let e = match Trainer::for_task(
        Task::TokenClassification,
        tok.to_str().unwrap(),
        &new_tag,
        None,
        TrainingArguments::default(),
    ) {
        Ok(_) => panic!("a new tag was accepted"),
        Err(e) => e.to_string(),
    };
    for part in [
        "new-tag.jsonl",
        "line 2",
        "`B-CITY`",
        "B-MISC",
        "--ignore-mismatched-sizes",
    ] {
        assert!(e.contains(part), "{e}: expected {part}");
    }
}

/// `max_steps` 0 trains the epochs, as HF's `max_steps <= 0` does (it trained no step and
/// saved the untrained model).
#[test]
fn max_steps_zero_trains_the_epochs() {
    let init = train_dir().join("bert-seqcls-init");
    let file = train_dir().join("seqcls.jsonl");
    let steps = |max_steps| {
        let args = TrainingArguments {
            max_steps,
            num_train_epochs: 2.0,
            per_device_train_batch_size: 4,
            ..TrainingArguments::default()
        };
        Trainer::new(init.to_str().unwrap(), &file, None, args)
            .unwrap()
            .total_steps()
    };
    let epochs = steps(None);
    assert!(epochs > 0);
    assert_eq!(steps(Some(0)), epochs);
    assert_eq!(steps(Some(3)), 3);
}

/// Words through XLM-RoBERTa's SentencePiece tokenizer (`Metaspace`: each word starts a new
/// piece) as HF's `tokenizer(words, is_split_into_words=True)` gives them (transformers 4.57.1 on
/// the xlm-roberta-seqcls fixture): the ids and each token's word.
#[test]
fn xlm_roberta_words_align_as_hf() {
    let dir = common::model_dir("xlm-roberta-seqcls");
    let tok = ferroformers::tokenizer::Tokenizer::from_dir(&dir, "xlm-roberta", Some(512)).unwrap();
    let words: Vec<String> = ["Hello", "Zürich,", "naïve", "café-bar", "x"]
        .iter()
        .map(|w| w.to_string())
        .collect();
    let enc = tok.encode_words(&words).unwrap();
    assert_eq!(
        enc.ids,
        [0, 172, 81, 12, 382, 20, 4, 25, 10, 476, 77, 63, 10, 56, 196, 121, 47, 68, 4, 70, 2]
    );
    let want: Vec<Option<u32>> = [
        None,
        Some(0),
        Some(0),
        Some(0),
        Some(1),
        Some(1),
        Some(2),
        Some(2),
        Some(2),
        Some(2),
        Some(2),
        Some(3),
        Some(3),
        Some(3),
        Some(3),
        Some(3),
        Some(3),
        Some(3),
        Some(4),
        Some(4),
        None,
    ]
    .to_vec();
    assert_eq!(enc.word_ids, want);
}
