//! Bad inputs give typed errors that name the problem; nothing panics.

mod common;

use common::model_dir;
use ferroformers::{Error, Input, Params, PipelineOptions};
use serde_json::json;

fn opts(model: &str) -> PipelineOptions {
    PipelineOptions {
        model: Some(model_dir(model).to_str().unwrap().to_string()),
        ..Default::default()
    }
}

fn params(v: serde_json::Value) -> Params {
    v.as_object().unwrap().clone()
}

#[test]
fn unknown_task() {
    let err = ferroformers::pipeline_with("sentiment", opts("bert-seqcls")).unwrap_err();
    assert!(matches!(err, Error::UnknownTask { .. }), "{err}");
    assert!(err.to_string().contains("text-classification"), "{err}");
}

#[test]
fn empty_text() {
    let p = ferroformers::pipeline_with("text-classification", opts("bert-seqcls")).unwrap();
    let err = p.run(&["".into()], &Params::new()).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { index: 0, .. }), "{err}");
    let err = p
        .run(&["fine".into(), "   ".into()], &Params::new())
        .unwrap_err();
    assert!(matches!(err, Error::InvalidInput { index: 1, .. }), "{err}");
}

#[test]
fn unknown_and_mistyped_parameters() {
    let p = ferroformers::pipeline_with("text-classification", opts("bert-seqcls")).unwrap();
    let err = p
        .run(&["hi".into()], &params(json!({"topk": 2})))
        .unwrap_err();
    assert!(
        matches!(err, Error::UnknownParameter { ref name, .. } if name == "topk"),
        "{err}"
    );
    assert!(
        err.to_string().contains("top_k"),
        "lists accepted names: {err}"
    );
    let err = p
        .run(&["hi".into()], &params(json!({"top_k": "two"})))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidParameter { ref name, .. } if name == "top_k"),
        "{err}"
    );
    let err = p
        .run(
            &["hi".into()],
            &params(json!({"function_to_apply": "relu"})),
        )
        .unwrap_err();
    assert!(err.to_string().contains("function_to_apply"), "{err}");
    let f = ferroformers::pipeline_with("feature-extraction", opts("bert-base")).unwrap();
    let err = f
        .run(&["hi".into()], &params(json!({"pooling": "median"})))
        .unwrap_err();
    assert!(err.to_string().contains("pooling"), "{err}");
}

#[test]
fn folder_without_config() {
    let err = ferroformers::pipeline_with("text-classification", opts("no-config")).unwrap_err();
    assert!(matches!(err, Error::MissingFile { .. }), "{err}");
    assert!(err.to_string().contains("config.json"), "{err}");
}

/// A GGUF file, or a folder of them, for a task that does not load GGUF: the error says so and
/// names the task (it was "config.json is missing: every model folder needs a config.json").
#[test]
fn gguf_for_a_task_that_does_not_load_it() {
    let dir = std::env::temp_dir().join(format!("ff-gguf-task-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("model.Q4_0.gguf");
    std::fs::write(&file, b"GGUF").unwrap();
    for model in [&dir, &file] {
        for task in [
            "text-classification",
            "sentence-embeddings",
            "summarization",
        ] {
            let o = PipelineOptions {
                model: Some(model.to_str().unwrap().to_string()),
                ..Default::default()
            };
            let err = ferroformers::pipeline_with(task, o)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("model.Q4_0.gguf")
                    && err.contains(&format!("{task} does not load GGUF files"))
                    && err.contains("text-generation")
                    && !err.contains("every model folder needs"),
                "{task}: {err}"
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corrupt_safetensors() {
    let mut o = opts("corrupt");
    o.tokenizer = Some(model_dir("bert-base").to_str().unwrap().to_string());
    let err = ferroformers::pipeline_with("text-classification", o).unwrap_err();
    assert!(matches!(err, Error::Weights { .. }), "{err}");
    assert!(err.to_string().contains("model.safetensors"), "{err}");
}

#[test]
fn missing_model_names_where_it_looked() {
    // A hub id not in the cache would be downloaded: stay off the network (tests only ever
    // talk to 127.0.0.1); the offline error still says where it looked.
    std::env::set_var("HF_HUB_OFFLINE", "1");
    let o = PipelineOptions {
        model: Some("no-such-org/no-such-model".into()),
        ..Default::default()
    };
    let err = ferroformers::pipeline_with("text-classification", o).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound { .. }), "{err}");
    assert!(
        err.to_string()
            .contains("models--no-such-org--no-such-model"),
        "{err}"
    );
}

#[test]
fn missing_head_tensor_is_named() {
    // A bare model has no classifier: an error naming the tensor, not random weights.
    let err = ferroformers::pipeline_with("text-classification", opts("bert-base")).unwrap_err();
    assert!(
        err.to_string().contains("pooler.dense.weight") || err.to_string().contains("classifier"),
        "{err}"
    );
}

#[test]
fn fill_mask_without_mask() {
    let p = ferroformers::pipeline_with("fill-mask", opts("bert-mlm")).unwrap();
    let err = p.run(&["no mask here".into()], &Params::new()).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { .. }), "{err}");
    assert!(err.to_string().contains("[MASK]"), "{err}");
    let err = p
        .run(&["a [MASK]".into()], &params(json!({"targets": []})))
        .unwrap_err();
    assert!(err.to_string().contains("targets"), "{err}");
}

#[test]
fn long_input_is_truncated_not_a_crash() {
    let p = ferroformers::pipeline_with("text-classification", opts("roberta-seqcls")).unwrap();
    let long = "word ".repeat(2000);
    let out = p
        .run(&[Input::from(long.as_str())], &Params::new())
        .unwrap();
    assert_eq!(out.len(), 1);
    let err = p
        .run(&["x".into()], &params(json!({"truncation": false})))
        .unwrap_err();
    assert!(err.to_string().contains("truncation"), "{err}");
}

#[test]
fn bad_input_json() {
    let err = Input::from_json(&json!(3), 4).unwrap_err();
    assert!(matches!(err, Error::InvalidInput { index: 4, .. }), "{err}");
    let err = Input::from_json(&json!({"txt": "a"}), 0).unwrap_err();
    assert!(err.to_string().contains("txt"), "{err}");
    // A pair that is not a string is an error, not dropped (the text ran alone).
    for pair in [json!(5), json!(["b"]), json!({"t": "b"}), json!(true)] {
        let err = Input::from_json(&json!({"text": "a", "text_pair": pair}), 2).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { index: 2, .. }), "{err}");
        assert!(
            err.to_string().contains("`text_pair` must be a string"),
            "{pair}: {err}"
        );
    }
    assert!(matches!(
        Input::from_json(&json!({"text": "a", "text_pair": null}), 0).unwrap(),
        Input::Text(t) if t == "a"
    ));
    // A list of messages is one chat, as `{"messages": [..]}` is (transformers' pipeline
    // takes the list itself); other lists are named as what they are not.
    let chat =
        json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]);
    let want = Input::from_json(&json!({ "messages": chat }), 0).unwrap();
    let got = Input::from_json(&chat, 0).unwrap();
    assert!(matches!(&got, Input::Chat(m) if m.len() == 2), "{got:?}");
    assert_eq!(format!("{got:?}"), format!("{want:?}"));
    for (bad, says) in [
        (json!([1, 2]), "a chat (a list of"),
        (json!([]), "a chat (a list of"),
        (
            json!([{"role": "user"}]),
            "each message needs string `role` and `content`",
        ),
    ] {
        let err = Input::from_json(&bad, 3).unwrap_err();
        assert!(matches!(err, Error::InvalidInput { index: 3, .. }), "{err}");
        assert!(err.to_string().contains(says), "{bad}: {err}");
    }
    // A chat given to another task is named as what it is.
    let p = ferroformers::pipeline_with("text-classification", opts("bert-seqcls")).unwrap();
    let err = p.run(&[got], &Params::new()).unwrap_err();
    assert!(
        err.to_string()
            .contains("a chat input (`{messages}` or a list of messages) is for text-generation"),
        "{err}"
    );
}

#[test]
fn quantize_int8_where_there_is_no_int8_path() {
    let gpt2 = common::fixtures().join("decoders/models/gpt2");
    let mut o = PipelineOptions {
        model: Some(gpt2.to_str().unwrap().to_string()),
        ..Default::default()
    };
    o.quantize = Some(ferroformers::Quantize::Int8);
    let err = ferroformers::pipeline_with("text-generation", o).unwrap_err();
    assert!(
        matches!(&err, Error::InvalidParameter { name, .. } if name == "quantize"),
        "{err}"
    );
    assert!(err.to_string().contains("encoder models"), "{err}");
    // bf16 weights take candle's path, which has no int8 kernels.
    let mut o = opts("bert-seqcls");
    o.quantize = Some(ferroformers::Quantize::Int8);
    o.dtype = ferroformers::DType::BF16;
    let err = ferroformers::pipeline_with("text-classification", o).unwrap_err();
    assert!(err.to_string().contains("f32"), "{err}");
}

/// A copy of the fixture folder `src` in a temporary folder of its own (`tag`), with
/// `config.json`'s `key` set to `value`.
fn with_config(src: &std::path::Path, tag: &str, key: &str, value: serde_json::Value) -> String {
    let dir = std::env::temp_dir().join(format!("ff-badcfg-{}-{tag}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.path().is_file() {
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
    }
    let path = dir.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    c[key] = value;
    std::fs::write(&path, c.to_string()).unwrap();
    dir.to_str().unwrap().to_string()
}

/// Head counts of 0, or that do not split the hidden size, are refused when the config is
/// read, naming config.json, the field and the values (they divided by zero or failed a
/// kernel's assertion: a panic).
#[test]
fn head_counts_that_do_not_split_the_hidden_size() {
    let seq2seq = common::fixtures().join("seq2seq/models");
    let cases = [
        (
            "bert-seqcls",
            "num_attention_heads",
            0,
            "num_attention_heads is 0",
        ),
        (
            "bert-seqcls",
            "num_attention_heads",
            7,
            "hidden_size 32 does not split into num_attention_heads 7",
        ),
        (
            "roberta-seqcls",
            "num_attention_heads",
            0,
            "num_attention_heads is 0",
        ),
        (
            "xlm-roberta-seqcls",
            "num_attention_heads",
            7,
            "num_attention_heads 7",
        ),
        ("distilbert-seqcls", "n_heads", 0, "n_heads is 0"),
        (
            "distilbert-seqcls",
            "n_heads",
            3,
            "does not split into n_heads 3",
        ),
        (
            "bart",
            "encoder_attention_heads",
            0,
            "encoder_attention_heads is 0",
        ),
        (
            "bart",
            "decoder_attention_heads",
            3,
            "d_model 32 does not split into decoder_attention_heads 3",
        ),
        (
            "marian",
            "encoder_attention_heads",
            3,
            "encoder_attention_heads 3",
        ),
        (
            "marian",
            "decoder_attention_heads",
            0,
            "decoder_attention_heads is 0",
        ),
        ("t5", "num_heads", 0, "num_heads is 0"),
        ("t5", "d_kv", 0, "d_kv is 0"),
    ];
    for (i, (model, key, value, want)) in cases.into_iter().enumerate() {
        let (src, task) = if model.contains("bert") {
            (model_dir(model), "text-classification")
        } else {
            (seq2seq.join(model), "text2text-generation")
        };
        let dir = with_config(&src, &format!("{model}-{i}"), key, json!(value));
        let o = PipelineOptions {
            model: Some(dir.clone()),
            ..Default::default()
        };
        let err = ferroformers::pipeline_with(task, o)
            .map(|_| ())
            .unwrap_err();
        assert!(
            matches!(&err, Error::InvalidFile { path, .. } if path.ends_with("config.json")),
            "{model} {key}={value}: {err}"
        );
        assert!(
            err.to_string().contains(want),
            "{model} {key}={value}: {err}"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// A tokenizer with more tokens than the model's embeddings (not the model's own): the error
/// names the token, its id and the vocabulary size, instead of the embedding lookup's index
/// error.
#[test]
fn tokens_outside_the_vocabulary_are_named() {
    let dir = with_config(&model_dir("bert-seqcls"), "vocab", "vocab_size", json!(500));
    let path = std::path::Path::new(&dir).join("tokenizer.json");
    let mut t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    t["added_tokens"].as_array_mut().unwrap().push(json!({
        "id": 600, "content": "zzzq", "single_word": false, "lstrip": false, "rstrip": false,
        "normalized": false, "special": false
    }));
    std::fs::write(&path, t.to_string()).unwrap();
    let o = PipelineOptions {
        model: Some(dir),
        ..Default::default()
    };
    let p = ferroformers::pipeline_with("text-classification", o).unwrap();
    assert!(p.run(&["hello".into()], &Params::new()).is_ok());
    let err = p
        .run(&["hello zzzq".into()], &Params::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("outside the model's vocabulary of 500") && err.contains("zzzq"),
        "{err}"
    );
}

/// Generation sizes no machine could allocate are refused with the parameter named, on
/// encoder-decoders and decoders alike (2^63 beams overflowed a vector's capacity in the
/// seq2seq beam search: a panic that stopped the server's worker for the model).
#[test]
fn absurd_generation_sizes_are_refused() {
    let fixtures = common::fixtures();
    let cases = [
        (fixtures.join("seq2seq/models/t5"), "text2text-generation"),
        (fixtures.join("decoders/models/gpt2"), "text-generation"),
    ];
    for (dir, task) in cases {
        let o = PipelineOptions {
            model: Some(dir.to_str().unwrap().to_string()),
            ..Default::default()
        };
        let p = ferroformers::pipeline_with(task, o).unwrap();
        for bad in [
            json!({"num_beams": 1u64 << 63, "max_new_tokens": 2}),
            json!({"num_beams": 2000, "max_new_tokens": 2}),
            json!({"do_sample": true, "num_return_sequences": 1u64 << 40, "max_new_tokens": 2}),
        ] {
            let err = p.run(&["Hello".into()], &params(bad.clone())).unwrap_err();
            assert!(
                matches!(err, Error::InvalidParameter { .. })
                    && err.to_string().contains("at most 1024"),
                "{task} {bad}: {err}"
            );
        }
    }
}
