//! The real sentence-transformers/all-MiniLM-L6-v2 (put in the HF cache by
//! scripts/fetch-models.sh) against embeddings computed once with Python sentence-transformers
//! (scripts/ref_minilm.py -> tests/fixtures/expected/all-minilm-l6-v2.json).
//!
//! Set FERROFORMERS_SKIP_REAL_MODELS=1 to skip where the model cannot be fetched; CI fetches it.

mod common;

use ferroformers::{Input, Params, PipelineOptions};

fn skip() -> bool {
    std::env::var("FERROFORMERS_SKIP_REAL_MODELS").is_ok_and(|v| v == "1")
}

#[test]
fn minilm_embeddings_match_sentence_transformers() {
    if skip() {
        eprintln!("skipped: FERROFORMERS_SKIP_REAL_MODELS=1");
        return;
    }
    let exp = common::expected("all-minilm-l6-v2");
    let model = exp["model"].as_str().unwrap();
    let pipe = ferroformers::pipeline_with(
        "sentence-embeddings",
        PipelineOptions {
            model: Some(model.to_string()),
            batch_size: 4,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n(run scripts/fetch-models.sh minilm first)"));
    let texts: Vec<Input> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Input::from(t.as_str().unwrap()))
        .collect();
    let outs = pipe.run(&texts, &Params::new()).unwrap();
    let ours = serde_json::to_value(&outs).unwrap();
    common::compare(&ours, &exp["embeddings"], 1e-4, "embeddings").unwrap();

    // Cosine similarity of the paraphrase pair, from normalised embeddings.
    let a: Vec<f64> = serde_json::from_value(ours[0].clone()).unwrap();
    let b: Vec<f64> = serde_json::from_value(ours[1].clone()).unwrap();
    let sim: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let want = exp["similarity_0_1"].as_f64().unwrap();
    assert!((sim - want).abs() < 1e-4, "similarity {sim} vs {want}");
}

#[test]
fn minilm_token_ids_match_python() {
    if skip() {
        return;
    }
    let exp = common::expected("all-minilm-l6-v2");
    let dir = ferroformers::hub::resolve(exp["model"].as_str().unwrap(), None).unwrap();
    let cfg = ferroformers::config::ModelConfig::from_dir(&dir).unwrap();
    let mut tok = ferroformers::tokenizer::Tokenizer::from_dir(
        &dir,
        &cfg.model_type,
        ferroformers::models::max_positions(&cfg),
    )
    .unwrap();
    tok.set_max_length(exp["st_max_seq_length"].as_u64().unwrap() as usize)
        .unwrap();
    for (i, t) in exp["texts"].as_array().unwrap().iter().enumerate() {
        let enc = tok.encode(t.as_str().unwrap(), None).unwrap();
        let want: Vec<u32> = serde_json::from_value(exp["input_ids"][i].clone()).unwrap();
        assert_eq!(enc.ids, want, "text #{i}");
    }
}

#[test]
fn minilm_sentence_similarity_task() {
    if skip() {
        return;
    }
    let exp = common::expected("all-minilm-l6-v2");
    let pipe = ferroformers::pipeline_with(
        "sentence-similarity",
        PipelineOptions {
            model: Some(exp["model"].as_str().unwrap().to_string()),
            ..Default::default()
        },
    )
    .unwrap();
    let input = Input::from_json(
        &serde_json::json!({
            "source_sentence": exp["texts"][0],
            "sentences": [exp["texts"][1], exp["texts"][0]],
        }),
        0,
    )
    .unwrap();
    let out = serde_json::to_value(pipe.run(&[input], &Params::new()).unwrap()).unwrap();
    let want = exp["similarity_0_1"].as_f64().unwrap();
    assert!((out[0][0].as_f64().unwrap() - want).abs() < 1e-4, "{out}");
    assert!((out[0][1].as_f64().unwrap() - 1.0).abs() < 1e-5, "{out}");
}

/// MiniLM's embeddings of the reference texts with `opts`, and each one's cosine with
/// sentence-transformers' f32 embedding.
fn minilm_cosines(opts: PipelineOptions) -> (Vec<Vec<f64>>, Vec<f64>) {
    let exp = common::expected("all-minilm-l6-v2");
    let pipe = ferroformers::pipeline_with(
        "sentence-embeddings",
        PipelineOptions {
            model: Some(exp["model"].as_str().unwrap().to_string()),
            batch_size: 4,
            ..opts
        },
    )
    .unwrap();
    let texts: Vec<Input> = exp["texts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| Input::from(t.as_str().unwrap()))
        .collect();
    let ours = serde_json::to_value(pipe.run(&texts, &Params::new()).unwrap()).unwrap();
    let vec = |v: &serde_json::Value| -> Vec<f64> { serde_json::from_value(v.clone()).unwrap() };
    let embs: Vec<Vec<f64>> = (0..texts.len()).map(|i| vec(&ours[i])).collect();
    let cos = embs
        .iter()
        .enumerate()
        .map(|(i, a)| cosine(a, &vec(&exp["embeddings"][i])))
        .collect();
    (embs, cos)
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// `--quantize int8` keeps MiniLM's embeddings close to sentence-transformers' f32 ones
/// (cosine per sentence) and its paraphrase similarity nearly unchanged.
#[test]
fn minilm_int8_embeddings_stay_close_to_f32() {
    if skip() {
        return;
    }
    let (embs, cos) = minilm_cosines(PipelineOptions {
        quantize: Some(ferroformers::Quantize::Int8),
        ..Default::default()
    });
    for (i, &c) in cos.iter().enumerate() {
        assert!(c > 0.995, "text #{i}: cosine {c} against f32");
        // Not equal: the int8 path really ran.
        assert!(c < 1.0 - 1e-9, "text #{i}: identical to f32");
    }
    let mean = cos.iter().sum::<f64>() / cos.len() as f64;
    assert!(mean >= 0.999, "mean cosine {mean} against f32");
    let sim = cosine(&embs[0], &embs[1]);
    let want = common::expected("all-minilm-l6-v2")["similarity_0_1"]
        .as_f64()
        .unwrap();
    assert!((sim - want).abs() < 0.01, "similarity {sim} vs {want}");
}

/// `--dtype bf16` on a CPU with AVX512-BF16: the layers' products in bf16, embeddings within
/// a cosine of 1e-4 of sentence-transformers' f32 ones. Elsewhere it keeps f32 (with a
/// warning), so the embeddings match f32's.
#[test]
fn minilm_bf16_embeddings_stay_close_to_f32() {
    if skip() {
        return;
    }
    let (_, cos) = minilm_cosines(PipelineOptions {
        dtype: ferroformers::DType::BF16,
        ..Default::default()
    });
    for (i, &c) in cos.iter().enumerate() {
        assert!(c > 0.9999, "text #{i}: cosine {c} against f32");
        if ferroformers::kernels::cpu::bf16::available() {
            assert!(c < 1.0 - 1e-10, "text #{i}: identical to f32");
        }
    }
}
