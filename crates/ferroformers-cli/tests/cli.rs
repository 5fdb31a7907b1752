//! End-to-end: the `ferroformers` binary on fixture models.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn fixture(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

fn ff(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferroformers"))
        .args(args)
        .output()
        .unwrap()
}

fn ff_stdin(args: &[&str], input: &str) -> Output {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferroformers"))
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(format!("{input}\n").as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn lines(o: &Output) -> Vec<Value> {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// `--warmup`: the printed results are the timed pass's, the same as without it, once each;
/// the timing says how long the untimed pass took; with `--stream` it is refused.
#[test]
fn warmup_runs_once_untimed() {
    let m = fixture("bert-seqcls");
    let args = [
        "run",
        "text-classification",
        "--model",
        &m,
        "Hi",
        "Hello there",
    ];
    let plain = ff(&args);
    let mut with = args.to_vec();
    with.extend(["--warmup", "--timing"]);
    let o = ff(&with);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(lines(&o), lines(&plain));
    let timing: Value = String::from_utf8_lossy(&o.stderr)
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a timing line");
    assert!(timing["warmup_s"].as_f64().unwrap() > 0.0, "{timing}");
    assert!(timing["run_s"].as_f64().unwrap() > 0.0, "{timing}");
    let o = ff(&[
        "run",
        "text-generation",
        "--model",
        &m,
        "--warmup",
        "--stream",
        "Hi",
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--warmup"));
}

#[test]
fn text_classification_one_line_per_input() {
    let m = fixture("bert-seqcls");
    let o = ff(&[
        "run",
        "sentiment-analysis",
        "--model",
        &m,
        "Hi",
        "Hello there",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = lines(&o);
    assert_eq!(out.len(), 2);
    assert!(out[0]["label"].is_string() && out[0]["score"].is_number());
    let o = ff(&[
        "run",
        "text-classification",
        "--model",
        &m,
        "--param",
        "top_k=null",
        "Hi",
    ]);
    let out = lines(&o);
    assert_eq!(out[0].as_array().unwrap().len(), 3);
}

#[test]
fn jsonl_input_with_pairs_and_batches() {
    let dir = std::env::temp_dir().join(format!("ff-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("in.jsonl");
    std::fs::write(
        &file,
        "\"Hi\"\n{\"text\":\"How old are you?\",\"text_pair\":\"I am 24.\"}\n\"A longer sentence here.\"\n",
    )
    .unwrap();
    let m = fixture("bert-seqcls");
    let f = file.to_str().unwrap();
    let a = ff(&[
        "run",
        "text-classification",
        "--model",
        &m,
        "--input",
        f,
        "--batch-size",
        "2",
    ]);
    let b = ff(&["run", "text-classification", "--model", &m, "--input", f]);
    assert!(a.status.success(), "{}", String::from_utf8_lossy(&a.stderr));
    let (a, b) = (lines(&a), lines(&b));
    assert_eq!(a.len(), 3);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["label"], y["label"]);
        assert!((x["score"].as_f64().unwrap() - y["score"].as_f64().unwrap()).abs() < 1e-5);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Many inputs of different lengths go through the CLI in groups of batches (run side by side,
/// batches built from inputs of similar length): every line still belongs to its own input, as
/// the library gives it one input at a time.
#[test]
fn many_inputs_come_back_in_input_order() {
    let dir = std::env::temp_dir().join(format!("ff-cli-many-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("in.jsonl");
    let texts: Vec<String> = (0..150)
        .map(|i| format!("{} number {i}", "very good movie ".repeat(i % 9)))
        .collect();
    let body: String = texts
        .iter()
        .map(|t| serde_json::to_string(t).unwrap() + "\n")
        .collect();
    std::fs::write(&file, body).unwrap();
    let m = fixture("bert-seqcls");
    let opts = ferroformers::PipelineOptions {
        model: Some(m.clone()),
        ..Default::default()
    };
    let pipe = ferroformers::pipeline_with("text-classification", opts).unwrap();
    for batch in ["1", "4"] {
        let o = ff(&[
            "run",
            "text-classification",
            "--model",
            &m,
            "--input",
            file.to_str().unwrap(),
            "--batch-size",
            batch,
            "--threads",
            "2",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let got = lines(&o);
        assert_eq!(got.len(), texts.len());
        for (i, (line, text)) in got.iter().zip(&texts).enumerate() {
            let want = serde_json::to_value(pipe.run_one(text.as_str()).unwrap()).unwrap();
            assert!(line["label"].is_string(), "batch {batch} input {i}: {line}");
            assert_eq!(line["label"], want["label"], "batch {batch} input {i}");
            let (a, b) = (
                line["score"].as_f64().unwrap(),
                want["score"].as_f64().unwrap(),
            );
            assert!((a - b).abs() < 1e-5, "batch {batch} input {i}: {a} vs {b}");
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn fill_mask_targets_param_parsed_as_json() {
    let m = fixture("bert-mlm");
    let o = ff(&[
        "run",
        "fill-mask",
        "--model",
        &m,
        "--param",
        "targets=[\"paris\",\"is\"]",
        "The capital of France is [MASK].",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let out = lines(&o);
    let strs: Vec<&str> = out[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["token_str"].as_str().unwrap())
        .collect();
    assert_eq!(strs.len(), 2);
    assert!(strs.contains(&"paris") && strs.contains(&"is"));
}

#[test]
fn errors_go_to_stderr_with_nonzero_exit() {
    let m = fixture("bert-mlm");
    for args in [
        vec!["run", "no-such-task", "--model", &m, "x"],
        vec!["run", "fill-mask", "--model", &m, "no mask"],
        vec![
            "run",
            "fill-mask",
            "--model",
            &m,
            "--param",
            "top_k=-1",
            "a [MASK]",
        ],
        vec![
            "run",
            "fill-mask",
            "--model",
            "/nonexistent/model",
            "a [MASK]",
        ],
        vec!["run", "fill-mask", "--model", &m],
        vec!["frobnicate"],
        vec![
            "run",
            "fill-mask",
            "--model",
            &m,
            "--gguf-math",
            "int4",
            "a [MASK]",
        ],
        vec!["serve", "--model", &m, "--waiting-served-ratio", "-1"],
        vec!["serve", "--model", &m, "--max-waiting-tokens", "many"],
        vec!["serve", "--model", &m, "--max-batch-prefill-tokens", "0"],
        vec!["serve", "--model", &m, "--arrival-wait-ms", "-1"],
        vec!["serve", "--model", &m, "--arrival-wait-ms", "5000"],
        vec!["serve", "--model", &m, "--batch-invariant", "maybe"],
    ] {
        let o = ff(&args);
        assert!(!o.status.success(), "{args:?} should fail");
        assert!(o.stdout.is_empty(), "{args:?} printed to stdout");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.starts_with("error: "), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        if args.contains(&"--gguf-math") {
            assert!(
                err.contains("'int4' for '--gguf-math") && err.contains("possible values"),
                "{err}"
            );
        }
        for flag in [
            "--waiting-served-ratio",
            "--max-waiting-tokens",
            "--max-batch-prefill-tokens",
            "--arrival-wait-ms",
            "--batch-invariant",
        ] {
            if args.contains(&flag) {
                assert!(err.contains(flag), "{err}");
            }
        }
    }
}

/// `ff`, killing the command if it has not ended within `secs` (then the test fails instead
/// of hanging).
fn ff_within(args: &[&str], secs: u64) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferroformers"))
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed().as_secs() >= secs {
            child.kill().unwrap();
            let _ = child.wait();
            panic!("{args:?}: still running after {secs} s");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// The training fixtures' folder.
fn train_data() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train")
}

/// `train text-classification` of the fixture's base model on `train` (the fixture's
/// `seqcls.jsonl` when `None`) into `out`, with `extra` options.
fn train_seqcls(train: Option<&Path>, out: &Path, extra: &[&str]) -> Output {
    let data = train_data();
    let (init, file) = (data.join("bert-seqcls-init"), data.join("seqcls.jsonl"));
    let mut args = train_args("text-classification", &init, train.unwrap_or(&file), out);
    args.extend_from_slice(extra);
    ff(&args)
}

/// One epoch at a learning rate of 1e-3, evaluated on `file`.
fn one_epoch_evaluated_on(file: &Path) -> [&str; 6] {
    [
        "--eval",
        file.to_str().unwrap(),
        "--num-train-epochs",
        "1",
        "--learning-rate",
        "1e-3",
    ]
}

/// `train TASK --model INIT --train FILE --output OUT`, before any further options.
fn train_args<'a>(task: &'a str, init: &'a Path, file: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "train",
        task,
        "--model",
        init.to_str().unwrap(),
        "--train",
        file.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]
}

/// `--threads` above 1024 (or 0) is refused by every command that takes it, before anything
/// loads: 100000 threads (or 2^64-1) had the process starting threads for minutes.
#[test]
fn absurd_thread_counts_are_refused() {
    let m = fixture("bert-seqcls");
    let data = train_data();
    let init = data.join("bert-seqcls-init");
    let file = data.join("seqcls.jsonl");
    let out = std::env::temp_dir().join(format!("ff-cli-threads-{}", std::process::id()));
    for n in ["100000", "18446744073709551615", "1025", "0"] {
        for cmd in [
            vec![
                "run",
                "text-classification",
                "--model",
                &m,
                "--threads",
                n,
                "hi",
            ],
            vec!["serve", "--model", &m, "--port", "0", "--threads", n],
            [
                train_args("text-classification", &init, &file, &out),
                vec!["--threads", n],
            ]
            .concat(),
        ] {
            let o = ff_within(&cmd, 30);
            let err = String::from_utf8_lossy(&o.stderr);
            assert!(!o.status.success() && o.stdout.is_empty(), "{cmd:?}: {err}");
            assert!(
                err.contains("--threads") && err.contains("1024") && !err.contains("panicked"),
                "{cmd:?}: {err}"
            );
        }
    }
    assert!(!out.exists(), "training ran");
    let o = ff(&[
        "run",
        "text-classification",
        "--model",
        &m,
        "--threads",
        "1024",
        "hi",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// Every command that prints to stdout ends quietly with status 0 when stdout's reader has
/// gone (`ferroformers tasks | head -1`): `tasks` panicked with "failed printing to stdout:
/// Broken pipe" (status 101), `run` printed "error: Broken pipe" with status 1.
#[test]
fn closed_stdout_ends_quietly() {
    let m = fixture("bert-seqcls");
    let gpt2 = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/decoders/models/gpt2")
        .to_str()
        .unwrap()
        .to_string();
    let cache = std::env::temp_dir().join(format!("ff-cli-pipe-cache-{}", std::process::id()));
    std::fs::create_dir_all(&cache).unwrap();
    for args in [
        vec!["tasks"],
        vec!["cache"],
        vec!["completions", "bash"],
        vec![],
        vec!["run", "text-classification", "--model", &m, "Hi", "there"],
        vec![
            "run",
            "text-generation",
            "--model",
            &gpt2,
            "--stream",
            "--param",
            "max_new_tokens=3",
            "Hi",
        ],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferroformers"))
            .args(&args)
            .env("HF_HUB_CACHE", &cache)
            .env("HF_HUB_OFFLINE", "1")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // No reader is left: every write to stdout fails with a broken pipe.
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{args:?}: {:?} {err}", o.status);
        assert!(err.is_empty(), "{args:?}: {err}");
    }
    let _ = std::fs::remove_dir_all(&cache);
}

/// An `--input` line whose `text_pair` is not a string is an error naming the line and
/// `text_pair`, as a `text` that is not one is (the pair was dropped silently).
#[test]
fn jsonl_text_pair_that_is_not_a_string() {
    let m = fixture("bert-seqcls");
    for line in [
        r#"{"text":"a","text_pair":5}"#,
        r#"{"text":"a","text_pair":["b"]}"#,
        r#"{"text":"a","text_pair":{"x":1}}"#,
    ] {
        let o = ff_stdin(
            &["run", "text-classification", "--model", &m, "--input", "-"],
            &format!("\"fine\"\n{line}"),
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && o.stdout.is_empty(), "{line}: {err}");
        assert!(
            err.contains("line 2") && err.contains("`text_pair` must be a string"),
            "{line}: {err}"
        );
    }
}

/// An `--input` file's problems name the file and line: an input the pipeline refuses (an
/// empty text on line 3 was `invalid input #0`, counted within its group of inputs), bytes
/// that are not UTF-8, UTF-16 text; a UTF-8 byte-order mark is skipped (it was `not JSON`).
#[test]
fn jsonl_input_problems_name_the_line() {
    let m = fixture("bert-seqcls");
    let dir = std::env::temp_dir().join(format!("ff-cli-input-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let run = |name: &str, body: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        ff(&[
            "run",
            "text-classification",
            "--model",
            &m,
            "--input",
            p.to_str().unwrap(),
        ])
    };
    let o = run(
        "bom.jsonl",
        b"\xef\xbb\xbf{\"text\":\"good\"}\n{\"text\":\"bad\"}\n",
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(lines(&o).len(), 2);
    for (name, body, want) in [
        (
            "empty.jsonl",
            &b"{\"text\":\"a\"}\n{\"text\":\"b\"}\n{\"text\":\"\"}\n"[..],
            "empty.jsonl` line 3: the text is empty",
        ),
        (
            "latin1.jsonl",
            &b"{\"text\":\"a\"}\n{\"text\":\"caf\xe9\"}\n"[..],
            "line 2: not UTF-8 text (an invalid byte at column 13)",
        ),
        (
            "utf16.jsonl",
            &b"\xff\xfe{\x00}\x00\n\x00"[..],
            "is UTF-16 text",
        ),
    ] {
        let o = run(name, body);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{name}: {err}");
        assert!(err.contains(name) && err.contains(want), "{name}: {err}");
    }
    let o = ff(&["run", "text-classification", "--model", &m, "a", "b", ""]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("invalid input #2: the text is empty"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Where HF warns and the options are accepted, a warning on stderr, once, and stdout as
/// without it: min_new_tokens above max_new_tokens, --gguf-math on a model that is not GGUF,
/// and (when the SmolLM2 GGUF is in the HF cache) --tokenizer and --dtype bf16 with a GGUF
/// model on CPU. They were silent.
#[test]
fn ignored_or_unfeasible_options_warn_once() {
    let gpt2 =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoders/models/gpt2");
    let gpt2 = gpt2.to_str().unwrap();
    let warnings = |o: &Output| -> Vec<String> {
        String::from_utf8_lossy(&o.stderr)
            .lines()
            .filter(|l| l.starts_with("warning: "))
            .map(str::to_string)
            .collect()
    };
    let gen = [
        "run",
        "text-generation",
        "--model",
        gpt2,
        "--param",
        "do_sample=false",
        "--param",
        "max_new_tokens=2",
    ];
    let mut args = gen.to_vec();
    args.extend(["--param", "min_new_tokens=5", "a", "b"]);
    let o = ff(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(lines(&o).len(), 2);
    let w = warnings(&o);
    assert_eq!(w.len(), 1, "{w:?}");
    assert!(
        w[0].contains("min_new_tokens (5) is larger than max_new_tokens (2)"),
        "{w:?}"
    );

    let m = fixture("bert-seqcls");
    let plain = ff(&["run", "text-classification", "--model", &m, "a"]);
    let o = ff(&[
        "run",
        "text-classification",
        "--model",
        &m,
        "--gguf-math",
        "exact",
        "a",
    ]);
    assert!(o.status.success());
    assert_eq!(o.stdout, plain.stdout);
    let w = warnings(&o);
    assert!(
        w.len() == 1 && w[0].contains("--gguf-math is ignored"),
        "{w:?}"
    );

    const GGUF: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
    if ferroformers::hub::resolve(GGUF, None).is_err() {
        eprintln!("skipped the GGUF part: {GGUF} is not in the HF cache");
        return;
    }
    let mut args = gen.to_vec();
    args[3] = GGUF;
    args.push("Hi");
    let plain = ff(&args);
    args.extend(["--tokenizer", gpt2, "--dtype", "bf16"]);
    let o = ff(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(o.stdout, plain.stdout);
    let w = warnings(&o);
    assert!(
        w.len() == 2
            && w.iter().any(|l| l.contains("--tokenizer"))
            && w.iter().any(|l| l.contains("--dtype bf16 is ignored")),
        "{w:?}"
    );
}

/// `--device cuda` on a build without the `cuda` feature: one line that says how to get one,
/// and no output.
#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_the_feature_is_a_clear_error() {
    let m = fixture("bert-seqcls");
    for device in ["cuda", "cuda:1"] {
        let o = ff(&[
            "run",
            "text-classification",
            "--model",
            &m,
            "--device",
            device,
            "Hi",
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && o.stdout.is_empty(),
            "{device}: {err}"
        );
        assert!(
            err.contains("no CUDA support") && err.contains("--features cuda"),
            "{device}: {err}"
        );
    }
    let o = ff(&[
        "run",
        "text-classification",
        "--model",
        &m,
        "--device",
        "gpu0",
        "Hi",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("expected cpu, cuda or cuda:N"),
        "{err}"
    );
    // `serve` says the same before loading anything, and refuses an unknown dtype.
    for (args, want) in [
        (vec!["--device", "cuda"], "no CUDA support"),
        (vec!["--device", "gpu0"], "expected cpu, cuda or cuda:N"),
        (vec!["--dtype", "f64"], "'f64' for '--dtype"),
    ] {
        let mut all = vec!["serve", "--model", &m, "--port", "0"];
        all.extend(args.iter().copied());
        let o = ff(&all);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && o.stdout.is_empty(),
            "{args:?}: {err}"
        );
        assert!(
            err.contains(want) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn tasks_lists_every_task() {
    let o = ff(&["tasks"]);
    assert!(o.status.success());
    let s = String::from_utf8_lossy(&o.stdout);
    for t in ferroformers_tasks() {
        assert!(s.contains(t), "missing {t}");
    }
}

fn ferroformers_tasks() -> Vec<&'static str> {
    vec![
        "text-classification",
        "sentiment-analysis",
        "fill-mask",
        "feature-extraction",
        "sentence-embeddings",
    ]
}

/// `train` token-classification and question-answering (`run_ner`'s and `run_qa`'s data), then
/// `run` serves what they wrote.
#[test]
fn train_ner_and_qa_then_run() {
    let data = train_data();
    let tmp = std::env::temp_dir().join(format!("ff-cli-train-tasks-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    for (task, init, file, extra, run_input) in [
        (
            "token-classification",
            "bert-tokcls-init",
            "tokcls.jsonl",
            vec![],
            "\"John lives in Berlin.\"",
        ),
        (
            "question-answering",
            "bert-qa-init",
            "qa-squad.json",
            vec!["--doc-stride", "16"],
            "{\"question\": \"Where does John live?\", \"context\": \"John lives in Berlin.\"}",
        ),
    ] {
        let out = tmp.join(task);
        let (init, file) = (data.join(init), data.join(file));
        let mut args = train_args(task, &init, &file, &out);
        args.extend(one_epoch_evaluated_on(&file));
        args.extend(extra);
        let o = ff(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{task}: {err}");
        let metric = if task == "question-answering" {
            "eval_exact_match"
        } else {
            "eval_precision"
        };
        assert!(err.contains(metric) && err.contains("saved to"), "{err}");
        let config = std::fs::read_to_string(out.join("config.json")).unwrap();
        let class = if task == "question-answering" {
            "BertForQuestionAnswering"
        } else {
            "BertForTokenClassification"
        };
        assert!(config.contains(class), "{config}");
        let o = ff_stdin(
            &[
                "run",
                task,
                "--model",
                out.to_str().unwrap(),
                "--input",
                "-",
            ],
            run_input,
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v = lines(&o);
        assert_eq!(v.len(), 1, "{task}: {v:?}");
        if task == "question-answering" {
            assert!(v[0]["answer"].is_string(), "{v:?}");
        } else {
            assert!(v[0].is_array(), "{v:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
}

/// `train` with HF's option names, then `run` serves the folder it wrote; bad options and
/// data are errors before any training.
#[test]
fn train_then_run_the_saved_model() {
    let data = train_data();
    let init = data.join("bert-seqcls-init");
    let file = data.join("seqcls.jsonl");
    let out = std::env::temp_dir().join(format!("ff-cli-train-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let schedule = ["--lr-scheduler-type", "cosine", "--warmup-ratio", "0.2"];
    let o = train_seqcls(
        None,
        &out,
        &[&one_epoch_evaluated_on(&file)[..], &schedule].concat(),
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains("eval_accuracy") && err.contains("saved to"),
        "{err}"
    );
    let o = ff(&[
        "run",
        "text-classification",
        "--model",
        out.to_str().unwrap(),
        "Great!",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v = lines(&o);
    let item = if v[0].is_array() { &v[0][0] } else { &v[0] };
    let label = item["label"].as_str().unwrap();
    assert!(
        ["negative", "neutral", "positive"].contains(&label),
        "{v:?}"
    );

    let o = ff(&[
        "train",
        "text-classification",
        "--model",
        init.to_str().unwrap(),
        "--train",
        file.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--output"));
    let o = ff(&["train", "summarization", "--model", init.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("token-classification"));
    let o = ff(&["train", "text-classification", "--learning-rate", "fast"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("'fast' for '--learning-rate"), "{err}");
}

/// A bad option value names that option as the command line spells it (a zero eval batch
/// size blamed --per-device-train-batch-size, a negative --max-grad-norm weight_decay), and
/// `--stream` with num_return_sequences names num_return_sequences.
#[test]
fn bad_values_name_their_own_option() {
    let out = std::env::temp_dir().join(format!("ff-cli-train-names-{}", std::process::id()));
    for (flag, value, wrong) in [
        (
            "--per-device-eval-batch-size",
            "0",
            "per_device_train_batch_size",
        ),
        ("--per-device-train-batch-size", "0", "eval"),
        ("--max-grad-norm", "-1", "weight_decay"),
        ("--weight-decay", "-1", "max_grad_norm"),
    ] {
        let o = train_seqcls(None, &out, &[flag, value]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{flag}: {err}");
        assert!(
            err.contains(&format!("invalid value for {flag}:")) && !err.contains(wrong),
            "{flag}: {err}"
        );
    }
    // Other options the message names are spelled as options too.
    let o = train_seqcls(
        None,
        &out,
        &[
            "--load-best-model-at-end",
            "--eval-strategy",
            "steps",
            "--save-strategy",
            "steps",
            "--eval-steps",
            "3",
            "--save-steps",
            "4",
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("invalid value for --load-best-model-at-end: --save-steps 4 must be a multiple of --eval-steps 3"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&out);
    let gpt2 =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/decoders/models/gpt2");
    let o = ff(&[
        "run",
        "text-generation",
        "--model",
        gpt2.to_str().unwrap(),
        "--stream",
        "--param",
        "num_return_sequences=2",
        "Hi",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{err}");
    assert!(
        err.contains("`num_return_sequences`") && !err.contains("num_beams"),
        "{err}"
    );
}

/// `--max-steps 0` and `-1` (HF's default) train --num-train-epochs, as HF's `max_steps <= 0`
/// does (0 trained no step and saved the untrained model; -1 was refused).
#[test]
fn max_steps_zero_or_below_trains_the_epochs() {
    let out = std::env::temp_dir().join(format!("ff-cli-max-steps-{}", std::process::id()));
    let mut seen = Vec::new();
    for max_steps in ["0", "-1", "2"] {
        let o = train_seqcls(
            None,
            &out,
            &[
                "--num-train-epochs",
                "1",
                "--save-strategy",
                "no",
                "--max-steps",
                max_steps,
            ],
        );
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{max_steps}: {err}");
        let steps: usize = err
            .lines()
            .find_map(|l| l.strip_prefix("training on ")?.split(", ").nth(1))
            .and_then(|s| s.strip_suffix(" steps")?.parse().ok())
            .unwrap_or_else(|| panic!("{max_steps}: {err}"));
        seen.push(steps);
    }
    let _ = std::fs::remove_dir_all(&out);
    // seqcls.jsonl: one epoch of 8-example batches.
    assert!(
        seen[0] > 0 && seen[0] == seen[1] && seen[2] == 2,
        "{seen:?}"
    );
    let o = ff(&["train", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("0 or below (HF's default -1)"));
}

/// `--output` that cannot take the model (a file, a folder that cannot be made) is refused
/// before training, naming `--output` (the whole training ran, then saving failed with
/// "cannot read").
#[test]
fn train_output_is_checked_before_training() {
    let base = std::env::temp_dir().join(format!("ff-cli-train-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let a_file = base.join("a-file");
    std::fs::write(&a_file, "not a folder").unwrap();
    let mut cases = vec![
        (a_file.clone(), "is a file"),
        (a_file.join("below"), "cannot create the folder"),
    ];
    if cfg!(target_os = "linux") {
        cases.push((
            PathBuf::from("/proc/ff-no-such-folder"),
            "cannot create the folder",
        ));
    }
    for (out, want) in cases {
        let o = train_seqcls(None, &out, &["--max-steps", "1"]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{out:?}: {err}");
        assert!(
            err.contains("--output") && err.contains(want) && !err.contains("training on"),
            "{out:?}: {err}"
        );
    }
    // A folder that does not exist yet is made; one that exists is used; a training that
    // fails (bad data) leaves no empty folder behind.
    let made = base.join("new/model");
    let bad = base.join("bad.jsonl");
    std::fs::write(&bad, "not json\n").unwrap();
    let o = train_seqcls(Some(&bad), &made, &[]);
    assert!(!o.status.success());
    assert!(!made.exists(), "an empty folder was left");
    let _ = std::fs::remove_dir_all(&base);
}

/// Every command answers `--help` (and `help COMMAND`) on stdout with its usage, and succeeds.
#[test]
fn every_command_has_help() {
    for cmd in [
        "run",
        "train",
        "serve",
        "tasks",
        "download",
        "cache",
        "completions",
    ] {
        for args in [vec![cmd, "--help"], vec!["help", cmd]] {
            let o = ff(&args);
            let out = String::from_utf8_lossy(&o.stdout);
            assert!(
                o.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            assert!(
                out.contains(&format!("Usage: ferroformers {cmd}")),
                "{args:?}: {out}"
            );
        }
    }
    let o = ff(&["--help"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("Commands:"));
    let o = ff(&["--version"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).starts_with("ferroformers "));
}

/// A mistyped option, command or value is an error (exit 1, as every error of `run`) that
/// names the likely one.
#[test]
fn typos_get_a_suggestion() {
    let m = fixture("bert-mlm");
    for (args, want) in [
        (
            vec!["run", "fill-mask", "--modle", &m, "a [MASK]"],
            "'--model'",
        ),
        (vec!["serv", "--model", &m], "'serve'"),
        (
            vec![
                "run",
                "fill-mask",
                "--model",
                &m,
                "--dtype",
                "bf61",
                "a [MASK]",
            ],
            "'bf16'",
        ),
        (
            vec!["serve", "--model", &m, "--max-batch-total-token", "9"],
            "'--max-batch-total-tokens'",
        ),
    ] {
        let o = ff(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(o.stdout.is_empty(), "{args:?}");
        assert!(
            err.starts_with("error: ") && err.contains("similar") && err.contains(want),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn completions_for_each_shell() {
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let o = ff(&["completions", shell]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{shell}");
        // The script knows the commands and the server's flags.
        for word in ["serve", "max-batch-total-tokens", "gguf-math"] {
            assert!(out.contains(word), "{shell}: no {word}");
        }
    }
    let o = ff(&["completions", "tcsh"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("possible values"));
}

/// `serve` takes its model, address and port from TEI's and TGI's environment variables when
/// no flag gives them; a flag wins over its variable. SIGTERM ends it with status 0.
#[cfg(unix)]
#[test]
fn serve_reads_the_environment() {
    use std::io::{Read, Write};
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, flag_port) = (free_port(), free_port());
    let get = |port: u16, path: &str| -> Option<String> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        Some(out)
    };
    for (args, env_port, listen) in [
        (vec!["serve"], port, port),
        (
            vec!["serve", "--port", &flag_port.to_string()],
            port,
            flag_port,
        ),
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferroformers"))
            .args(&args)
            .env(
                "MODEL_ID",
                format!("{}=text-classification", fixture("bert-seqcls")),
            )
            .env("PORT", env_port.to_string())
            .env("HOSTNAME", "127.0.0.1")
            .env("SERVED_MODEL_NAME", "from-env")
            .env("MAX_BATCH_TOKENS", "777")
            .env("GRACEFUL_SHUTDOWN_TIMEOUT", "5")
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let start = std::time::Instant::now();
        let info = loop {
            if let Some(r) = get(listen, "/info").filter(|r| r.starts_with("HTTP/1.1 200")) {
                break r;
            }
            assert!(
                start.elapsed().as_secs() < 120 && child.try_wait().unwrap().is_none(),
                "{args:?}: the server did not answer on port {listen}"
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        };
        // SIGTERM: the server drains (nothing is in flight) and exits 0.
        let term = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(term.success());
        let stopped = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if stopped.elapsed().as_secs() > 20 {
                child.kill().unwrap();
                panic!("{args:?}: still running 20 s after SIGTERM");
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        assert!(status.success(), "{args:?}: {status}");
        assert!(info.contains("from-env"), "{args:?}: {info}");
        assert!(
            info.contains("\"max_batch_tokens\":777"),
            "{args:?}: {info}"
        );
    }
}

/// An input cut at the model's maximum length gives one warning on stderr (the answer covers
/// its start only); a short one none, and question answering's windows (which keep the
/// overflow) none.
#[test]
fn truncated_inputs_are_warned_about() {
    let m = fixture("bert-seqcls");
    let long = "good ".repeat(300);
    let o = ff(&["run", "text-classification", "--model", &m, &long, &long]);
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.matches("was cut there").count(), 1, "{err}");
    let o = ff(&["run", "text-classification", "--model", &m, "good"]);
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let qa = fixture("bert-qa");
    let input = std::env::temp_dir().join(format!("ff-cli-qa-long-{}.jsonl", std::process::id()));
    std::fs::write(
        &input,
        serde_json::json!({"question": "what", "context": long}).to_string(),
    )
    .unwrap();
    let o = ff(&[
        "run",
        "question-answering",
        "--model",
        &qa,
        "--input",
        input.to_str().unwrap(),
    ]);
    let _ = std::fs::remove_file(&input);
    assert!(o.status.success());
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `run --batch-invariant`: `true` on a model without batch-invariant arithmetic (the f32
/// Llama fixture, a fill-mask model) fails naming the flag and why; by default (`auto`) the
/// fixture runs without it (`--timing` says so). SmolLM2's Q4_1 GGUF (when in the HF cache)
/// runs with it by default, as `serve` does, streamed or not, with the tokens of
/// `--batch-invariant true`; `false` turns it off.
#[test]
fn run_batch_invariant_as_serve_does() {
    let llama = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/decoders/models/llama")
        .to_string_lossy()
        .into_owned();
    let mlm = fixture("bert-mlm");
    for (args, why) in [
        (
            vec!["run", "text-generation", "--model", &llama, "Hi"],
            "dense weights",
        ),
        (
            vec!["run", "fill-mask", "--model", &mlm, "a [MASK]"],
            "only text generation",
        ),
    ] {
        let o = ff(&[&args[..], &["--batch-invariant", "true"]].concat());
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success() && o.stdout.is_empty(),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("--batch-invariant") && err.contains(why) && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    // `--timing`'s line on stderr: whether the arithmetic was batch-invariant.
    let invariant = |o: &Output| -> bool {
        let err = String::from_utf8_lossy(&o.stderr);
        let line = err
            .lines()
            .rfind(|l| l.contains("batch_invariant"))
            .unwrap();
        let v: Value = serde_json::from_str(line).unwrap();
        v["batch_invariant"].as_bool().unwrap()
    };
    let o = ff(&[
        "run",
        "text-generation",
        "--model",
        &llama,
        "--timing",
        "--param",
        "max_new_tokens=3",
        "Hi",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!invariant(&o));
    const GGUF: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
    if ferroformers::hub::resolve(GGUF, None).is_err() {
        eprintln!("skipped the GGUF part: {GGUF} is not in the HF cache");
        return;
    }
    let gen = [
        "run",
        "text-generation",
        "--model",
        GGUF,
        "--timing",
        "--param",
        "max_new_tokens=12",
        "--param",
        "do_sample=false",
        "Once upon a time",
    ];
    let auto = ff(&gen);
    assert!(
        auto.status.success(),
        "{}",
        String::from_utf8_lossy(&auto.stderr)
    );
    assert!(invariant(&auto));
    let on = ff(&[&gen[..], &["--batch-invariant", "true"]].concat());
    assert!(invariant(&on));
    assert_eq!(on.stdout, auto.stdout);
    let off = ff(&[&gen[..], &["--batch-invariant", "false"]].concat());
    assert!(off.status.success() && !invariant(&off));
    // Streamed: the same text (the prompt not repeated).
    let streamed = ff(&[
        "run",
        "text-generation",
        "--model",
        GGUF,
        "--param",
        "max_new_tokens=12",
        "--param",
        "do_sample=false",
        "--stream",
        "Once upon a time",
    ]);
    assert!(streamed.status.success());
    let whole: Value = serde_json::from_slice(&auto.stdout).unwrap();
    let text = whole[0]["generated_text"].as_str().unwrap();
    assert_eq!(
        format!(
            "Once upon a time{}",
            String::from_utf8_lossy(&streamed.stdout).trim_end()
        ),
        text
    );
}
