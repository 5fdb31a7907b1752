//! The server on loopback with fixture models: each route's answer equals the library
//! pipeline's, and every bad request gets its status code and a JSON error body.

use std::path::PathBuf;

use ferroformers::{Input, Params, PipelineOptions};
use ferroformers_server::{Config, ModelSpec, Server};
use serde_json::{json, Value};

/// The fixture's canonical path (a URL path cannot hold `..`).
fn fixture(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name);
    std::fs::canonicalize(p)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

fn decoder() -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/decoders/models/llama");
    std::fs::canonicalize(p)
        .unwrap()
        .to_str()
        .unwrap()
        .to_string()
}

const KEY: &str = "test-key";

/// The real SmolLM2 GGUF's hub id, when it is in the HF cache (scripts/fetch-models.sh smollm2)
/// and FERROFORMERS_SKIP_REAL_MODELS is not 1; else `None`, the test saying it is skipped.
fn smollm2() -> Option<&'static str> {
    const ID: &str = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF";
    if std::env::var("FERROFORMERS_SKIP_REAL_MODELS").is_ok_and(|v| v == "1")
        || ferroformers::hub::resolve(ID, None).is_err()
    {
        eprintln!("skipped: {ID} is not in the HF cache (scripts/fetch-models.sh smollm2)");
        return None;
    }
    Some(ID)
}

/// Start a server (port 0) on a runtime of its own; its base URL.
fn start() -> String {
    start_with(|_| {})
}

fn start_with(change: impl FnOnce(&mut Config)) -> String {
    let mut cfg = Config {
        models: vec![
            ModelSpec::parse(&fixture("minilm-st")),
            ModelSpec::parse(&fixture("bert-seqcls")),
            ModelSpec::parse(&format!("{}=ner", fixture("bert-tokcls"))),
            ModelSpec::parse(&format!("{}=text-generation", decoder())),
        ],
        port: 0,
        api_key: Some(KEY.into()),
        payload_limit: 4096,
        max_client_batch_size: 4,
        ..Config::default()
    };
    change(&mut cfg);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let server = Server::bind(cfg).await.unwrap();
            tx.send(server.local_addr().unwrap()).unwrap();
            server.run().await.unwrap();
        });
    });
    format!("http://{}", rx.recv().unwrap())
}

/// POST `body` with the key, for a streamed answer (read it with [`sse_chunks`]).
fn post_stream(url: &str, body: Value) -> ureq::Response {
    ureq::post(url)
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_json(body)
        .unwrap()
}

/// The text of a stream's events at `pointer` (`/choices/0/text`), joined.
fn chunk_texts(chunks: &[Value], pointer: &str) -> String {
    chunks
        .iter()
        .filter_map(|c| c.pointer(pointer).and_then(Value::as_str))
        .collect()
}

/// A completion stream's `token_logprobs`, event after event.
fn chunk_logprobs(chunks: &[Value]) -> Vec<Value> {
    chunks
        .iter()
        .filter_map(|c| {
            c["choices"][0]["logprobs"]["token_logprobs"]
                .as_array()
                .cloned()
        })
        .flatten()
        .collect()
}

/// `GET /info` with the key.
fn get_info(base: &str) -> Value {
    ureq::get(&format!("{base}/info"))
        .set("Authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap()
}

/// POST a body; (status, JSON body).
fn post(url: &str, body: &str, content_type: Option<&str>, key: Option<&str>) -> (u16, Value) {
    let mut req = ureq::post(url);
    if let Some(ct) = content_type {
        req = req.set("Content-Type", ct);
    }
    if let Some(k) = key {
        req = req.set("Authorization", &format!("Bearer {k}"));
    }
    let resp = match req.send_string(body) {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{url}: {e}"),
    };
    let status = resp.status();
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"));
    (status, v)
}

fn post_json(url: &str, body: Value) -> (u16, Value) {
    post(url, &body.to_string(), Some("application/json"), Some(KEY))
}

fn library_pipeline(task: &str, model: &str) -> ferroformers::Pipeline {
    ferroformers::pipeline_with(
        task,
        PipelineOptions {
            model: Some(model.to_string()),
            ..Default::default()
        },
    )
    .unwrap()
}

fn pipeline_json(task: &str, model: &str, inputs: &[Input], params: Params) -> Value {
    let pipe = library_pipeline(task, model);
    serde_json::to_value(pipe.run(inputs, &params).unwrap()).unwrap()
}

/// The decoder fixture's text for `input` through the library pipeline: greedy, new text
/// only, `max_new_tokens`, then `extra` (a JSON object of parameters) over those.
fn decoder_text(input: Input, max_new_tokens: u64, extra: Value) -> String {
    let mut p = Params::new();
    p.insert("max_new_tokens".into(), json!(max_new_tokens));
    p.insert("do_sample".into(), json!(false));
    p.insert("return_full_text".into(), json!(false));
    p.extend(extra.as_object().unwrap().clone());
    let v = pipeline_json("text-generation", &decoder(), &[input], p);
    v[0][0]["generated_text"].as_str().unwrap().to_string()
}

/// The chat the generation tests send: one user message, "Hi there".
fn hi_there() -> Input {
    Input::Chat(vec![ferroformers::generation::Message::new(
        "user", "Hi there",
    )])
}

/// Equal JSON, numbers within 1e-9 (serde_json's default float parsing is not correctly
/// rounded: the same f64 can come back one ulp away).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            (x.as_f64().unwrap() - y.as_f64().unwrap()).abs() <= 1e-9
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

/// Wait (up to 10 s) until a request is queued at the server's batcher.
fn wait_until_queued(base: &str) {
    for _ in 0..1000 {
        let m = ureq::get(&format!("{base}/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        let queued = m
            .lines()
            .filter(|l| l.starts_with("ferroformers_queue_size{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>();
        if queued > 0 {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("no request reached the queue");
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn decode_base64(s: &str) -> Vec<f32> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        _ => 63,
    };
    let mut bytes = Vec::new();
    for q in s.as_bytes().chunks(4) {
        let n = q
            .iter()
            .take_while(|&&c| c != b'=')
            .fold(0u32, |a, &c| (a << 6) | val(c) as u32);
        let pad = q.iter().filter(|&&c| c == b'=').count();
        let n = n << (6 * pad);
        let b = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        bytes.extend_from_slice(&b[..3 - pad]);
    }
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

#[test]
fn routes_answer_as_the_pipelines_do() {
    let base = start();
    let texts = ["A quiet walk in the park.", "The market fell sharply."];
    let inputs: Vec<Input> = texts.iter().map(|t| Input::from(*t)).collect();

    // TEI /embed: normalized sentence embeddings.
    let (status, got) = post_json(&format!("{base}/embed"), json!({"inputs": texts}));
    assert_eq!(status, 200, "{got}");
    let mut p = Params::new();
    p.insert("normalize".into(), json!(true));
    let want = pipeline_json("sentence-embeddings", &fixture("minilm-st"), &inputs, p);
    for (g, w) in got.as_array().unwrap().iter().zip(want.as_array().unwrap()) {
        let (g, w) = (floats(g), floats(w));
        assert!(g.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-6));
    }

    // OpenAI /v1/embeddings in base64: the same vectors, and token counts.
    let (status, got_b64) = post_json(
        &format!("{base}/v1/embeddings"),
        json!({"input": texts, "encoding_format": "base64"}),
    );
    assert_eq!(status, 200, "{got_b64}");
    assert!(got_b64["usage"]["prompt_tokens"].as_u64().unwrap() > 4);
    for (i, d) in got_b64["data"].as_array().unwrap().iter().enumerate() {
        let v = decode_base64(d["embedding"].as_str().unwrap());
        assert_eq!(v, floats(&got[i]), "base64 embedding {i}");
    }

    // TEI /predict: every label, best first.
    let (status, got) = post_json(&format!("{base}/predict"), json!({"inputs": texts[0]}));
    assert_eq!(status, 200, "{got}");
    let mut p = Params::new();
    p.insert("top_k".into(), Value::Null);
    let want = pipeline_json(
        "text-classification",
        &fixture("bert-seqcls"),
        &inputs[..1],
        p,
    );
    assert!(same(&got, &want[0]), "{got} vs {}", want[0]);

    // HF Inference API on a named model: its pipeline's output, parameters included.
    let (status, got) = post_json(
        &format!("{base}/models/{}", fixture("bert-tokcls")),
        json!({"inputs": texts, "parameters": {"aggregation_strategy": "simple"}}),
    );
    assert_eq!(status, 200, "{got}");
    let mut p = Params::new();
    p.insert("aggregation_strategy".into(), json!("simple"));
    let want = pipeline_json("ner", &fixture("bert-tokcls"), &inputs, p);
    assert!(same(&got, &want), "{got} vs {want}");
    let (status, _) = post_json(
        &format!(
            "{base}/models/{}/pipeline/token-classification",
            fixture("bert-tokcls")
        ),
        json!({"inputs": texts[0]}),
    );
    assert_eq!(status, 200);

    let models = ureq::get(&format!("{base}/v1/models"))
        .set("Authorization", &format!("Bearer {KEY}"))
        .call()
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    assert_eq!(models["data"].as_array().unwrap().len(), 4);
}

/// A list of `{"role", "content"}` messages as `inputs` is one chat on the Inference API's
/// route (transformers' pipeline reads it so), and a list of such lists several chats.
#[test]
fn inference_api_reads_a_message_list_as_one_chat() {
    let base = start();
    let url = format!("{base}/models/{}", decoder());
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let parameters = json!({"max_new_tokens": 10, "do_sample": false, "return_full_text": false});
    let want = decoder_text(hi_there(), 10, json!({}));
    let (status, got) = post_json(&url, json!({"inputs": messages, "parameters": parameters}));
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got[0]["generated_text"].as_str(),
        Some(want.as_str()),
        "{got}"
    );
    let (status, got) = post_json(
        &url,
        json!({"inputs": [messages, messages], "parameters": parameters}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got.as_array().map(Vec::len), Some(2), "{got}");
    for one in got.as_array().unwrap() {
        assert_eq!(
            one[0]["generated_text"].as_str(),
            Some(want.as_str()),
            "{got}"
        );
    }
}

/// OpenAI's and vLLM's sampling fields reach the pipeline under its names (penalties, bias,
/// `min_tokens`), so the answers are the library's for the same parameters (the formulas are
/// unit-tested there against vLLM's); fields the server does not implement are refused with
/// the field named, their neutral values pass.
#[test]
fn openai_penalties_bias_and_unsupported_fields() {
    let base = start();
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let gen = |extra: Value| decoder_text(hi_there(), 10, extra);
    let plain = gen(json!({}));
    let mut differs = 0;
    for (openai, library) in [
        // Negative penalties (allowed: [-2, 2]) favour what was generated, which changes this
        // random model's text within 10 tokens; positive ones need repeats to act on.
        (
            json!({"frequency_penalty": -2.0}),
            json!({"frequency_penalty": -2.0}),
        ),
        (
            json!({"presence_penalty": -2.0}),
            json!({"presence_penalty": -2.0}),
        ),
        (
            json!({"repetition_penalty": 1.5, "min_tokens": 10}),
            json!({"repetition_penalty": 1.5, "min_new_tokens": 10}),
        ),
        (
            json!({"logit_bias": {"42": 100}}),
            json!({"logit_bias": {"42": 100}}),
        ),
    ] {
        let want = gen(library);
        differs += usize::from(want != plain);
        let mut body = json!({"messages": messages, "max_tokens": 10, "temperature": 0,
                              "logprobs": true});
        body.as_object_mut()
            .unwrap()
            .extend(openai.as_object().unwrap().clone());
        let (status, got) = post_json(&format!("{base}/v1/chat/completions"), body);
        assert_eq!(status, 200, "{openai}: {got}");
        assert_eq!(
            got["choices"][0]["message"]["content"].as_str().unwrap(),
            want,
            "{openai}"
        );
        if openai.get("logit_bias").is_some() {
            // +100 on one token makes it every step's choice.
            let tokens: Vec<&Value> = got["choices"][0]["logprobs"]["content"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| &e["token"])
                .collect();
            assert_eq!(tokens.len(), 10, "{got}");
            assert!(tokens.iter().all(|t| *t == tokens[0]), "{got}");
        }
    }
    assert!(differs >= 3, "the fields changed too little: {plain:?}");

    let neutral = json!({"echo": false, "tools": [], "response_format": {"type": "text"},
                         "best_of": 1, "n": 1, "suffix": null, "user": "x", "top_k": -1});
    let mut body = json!({"prompt": "Once upon", "max_tokens": 2});
    body.as_object_mut()
        .unwrap()
        .extend(neutral.as_object().unwrap().clone());
    let (status, got) = post_json(&format!("{base}/v1/completions"), body);
    assert_eq!(status, 200, "{got}");
    for (bad, field) in [
        (json!({"n": 17}), "`n`"),
        (json!({"n": 0}), "`n`"),
        (json!({"n": 1.5}), "`n`"),
        (json!({"n": 3, "best_of": 2}), "best_of"),
        (json!({"best_of": 17}), "best_of"),
        (json!({"best_of": 1.5}), "best_of"),
        (json!({"echo": 1}), "echo"),
        (json!({"suffix": "end"}), "suffix"),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f"}}]}),
            "tools",
        ),
        (
            json!({"response_format": {"type": "json_object"}}),
            "response_format",
        ),
        (json!({"logit_bias": {"999999": 1}}), "logit_bias"),
        (json!({"logit_bias": {"x": 1}}), "logit_bias"),
        (json!({"logit_bias": [1, 2]}), "logit_bias"),
        (json!({"logit_bias": {"3": 200}}), "logit_bias"),
        (json!({"frequency_penalty": 3}), "frequency_penalty"),
        (json!({"presence_penalty": "x"}), "presence_penalty"),
        (json!({"top_k": -2}), "top_k"),
        (json!({"min_tokens": 1.5}), "min_tokens"),
    ] {
        let mut body = json!({"prompt": "Once upon", "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let (status, err) = post_json(&format!("{base}/v1/completions"), body);
        assert!(status == 400 || status == 422, "{bad}: {status} {err}");
        let msg = err["error"]["message"].as_str().unwrap();
        assert!(msg.contains(field), "{bad}: {msg}");
        // `param` names the field, as OpenAI's errors do.
        let key = bad.as_object().unwrap().keys().next_back().unwrap().clone();
        if field.trim_matches('`') == key {
            assert_eq!(err["error"]["param"], json!(key), "{bad}: {err}");
        }
    }
}

/// The events of a streamed OpenAI answer, `[DONE]` last, parsed.
fn sse_chunks(resp: ureq::Response) -> Vec<Value> {
    assert!(resp.content_type().starts_with("text/event-stream"));
    let raw = resp.into_string().unwrap();
    let events: Vec<&str> = raw
        .split("\n\n")
        .filter(|e| !e.trim().is_empty() && !e.starts_with(':'))
        .map(|e| {
            e.strip_prefix("data: ")
                .unwrap_or_else(|| panic!("not an event: {e:?}"))
        })
        .collect();
    assert_eq!(*events.last().unwrap(), "[DONE]");
    assert_eq!(events.iter().filter(|e| **e == "[DONE]").count(), 1);
    events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect()
}

/// OpenAI's `n`: that many choices, each sampled with its own seed (the request's plus the
/// choice's index), so each equals the pipeline's text for that seed; the prompt counted once
/// in `usage`, every choice's tokens summed. Streamed, every event names its choice and one
/// `[DONE]` ends them all. Greedy choices are the same text.
#[test]
fn openai_n_choices() {
    let base = start();
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let sampled = |seed: u64| {
        decoder_text(
            hi_there(),
            6,
            json!({"min_new_tokens": 6, "do_sample": true, "temperature": 1.0, "top_k": 0,
                   "seed": seed}),
        )
    };
    let want: Vec<String> = (0..3).map(|i| sampled(7 + i)).collect();
    assert!(
        want[0] != want[1] || want[1] != want[2],
        "three seeds gave one text: {want:?}"
    );
    let request = json!({"messages": messages, "max_tokens": 6, "min_tokens": 6,
                         "temperature": 1.0, "seed": 7, "n": 3});
    let (status, got) = post_json(&format!("{base}/v1/chat/completions"), request.clone());
    assert_eq!(status, 200, "{got}");
    let choices = got["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3, "{got}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(
            c["message"]["content"].as_str().unwrap(),
            want[i],
            "choice {i}"
        );
        assert_eq!(c["finish_reason"], "length");
    }
    let (_, one) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": messages, "max_tokens": 6, "min_tokens": 6, "temperature": 1.0,
               "seed": 7}),
    );
    assert_eq!(one["choices"][0]["message"]["content"], want[0].as_str());
    assert_eq!(got["usage"]["prompt_tokens"], one["usage"]["prompt_tokens"]);
    assert_eq!(got["usage"]["completion_tokens"], 18);

    // Streamed: the same three texts, told apart by `index`; a role chunk and a finish
    // reason for each; the usage summed.
    let mut body = request.clone();
    body["stream"] = json!(true);
    body["stream_options"] = json!({"include_usage": true});
    let resp = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_string(&body.to_string())
        .unwrap();
    let chunks = sse_chunks(resp);
    let mut texts = vec![String::new(); 3];
    let (mut roles, mut finishes) = (0, 0);
    for c in &chunks[..chunks.len() - 1] {
        let choice = &c["choices"][0];
        let i = choice["index"].as_u64().unwrap() as usize;
        if let Some(t) = choice["delta"]["content"].as_str() {
            texts[i].push_str(t);
        }
        roles += usize::from(choice["delta"]["role"] == "assistant");
        finishes += usize::from(!choice["finish_reason"].is_null());
    }
    assert_eq!(texts, want);
    assert_eq!((roles, finishes), (3, 3));
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["completion_tokens"], 18);
    assert_eq!(usage["prompt_tokens"], one["usage"]["prompt_tokens"]);

    // Completions, greedy: n copies of the one greedy text.
    let (status, got) = post_json(
        &format!("{base}/v1/completions"),
        json!({"prompt": "Once upon", "max_tokens": 4, "temperature": 0, "n": 2,
               "best_of": 2}),
    );
    assert_eq!(status, 200, "{got}");
    let c = got["choices"].as_array().unwrap();
    assert_eq!(c.len(), 2);
    assert_eq!(c[0]["text"], c[1]["text"]);
    assert_eq!((&c[0]["index"], &c[1]["index"]), (&json!(0), &json!(1)));
}

/// OpenAI's `best_of`: the candidates are the `n = best_of` choices of the same seeds, and the
/// `n` returned are those with the highest cumulative log-probability, best first, numbered
/// from 0, only their tokens counted; a stream asked for comes whole (as vLLM). TGI's
/// `best_of`: the candidate with the highest mean log-probability, the other in
/// `best_of_sequences`, each with the seed that makes it again; sampling, no seed, no stream
/// and at most `--max-best-of`; a sampling parameter alone samples.
#[test]
fn best_of_ranks_candidates() {
    let base = start();
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let chat = |extra: Value| {
        let mut body = json!({"messages": messages, "max_tokens": 6, "temperature": 1.0,
                              "seed": 3, "logprobs": true});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, got) = post_json(&format!("{base}/v1/chat/completions"), body);
        assert_eq!(status, 200, "{got}");
        got
    };
    let text = |c: &Value| c["message"]["content"].as_str().unwrap().to_string();
    let score = |c: &Value| -> f64 {
        c["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .sum()
    };
    let all = chat(json!({"n": 4}));
    let cands: Vec<(String, f64, u64)> = all["choices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let n = c["logprobs"]["content"].as_array().unwrap().len() as u64;
            (text(c), score(c), n)
        })
        .collect();
    let mut want: Vec<usize> = (0..4).collect();
    want.sort_by(|&a, &b| cands[b].1.total_cmp(&cands[a].1));
    assert!(
        want != [0, 1, 2, 3] || cands.iter().any(|c| c.0 != cands[0].0),
        "{cands:?}"
    );
    for n in [1usize, 2] {
        let got = chat(json!({"n": n, "best_of": 4}));
        let choices = got["choices"].as_array().unwrap();
        assert_eq!(choices.len(), n, "{got}");
        for (i, c) in choices.iter().enumerate() {
            assert_eq!(c["index"], i);
            assert_eq!(text(c), cands[want[i]].0, "n={n}, choice {i}: {cands:?}");
        }
        let tokens: u64 = want[..n].iter().map(|&i| cands[i].2).sum();
        assert_eq!(got["usage"]["completion_tokens"], tokens);
    }
    let got = chat(json!({"n": 1, "best_of": 4, "stream": true}));
    assert_eq!(got["object"], "chat.completion");
    assert_eq!(text(&got["choices"][0]), cands[want[0]].0);

    // TGI: two candidates, the better per token answers.
    let tgi = |route: &str, params: Value| {
        post_json(
            &format!("{base}/{route}"),
            json!({"inputs": "Once upon", "parameters": params}),
        )
    };
    let (status, got) = tgi(
        "generate",
        json!({"max_new_tokens": 6, "do_sample": true, "best_of": 2, "details": true}),
    );
    assert_eq!(status, 200, "{got}");
    let d = &got["details"];
    let others = d["best_of_sequences"].as_array().unwrap();
    assert_eq!(others.len(), 1, "{got}");
    let mean = |d: &Value| {
        let t = d["tokens"].as_array().unwrap();
        t.iter()
            .map(|t| t["logprob"].as_f64().unwrap())
            .sum::<f64>()
            / t.len() as f64
    };
    assert!(mean(d) >= mean(&others[0]) - 1e-5, "{got}");
    for (seq, text) in [
        (d, &got["generated_text"]),
        (&others[0], &others[0]["generated_text"]),
    ] {
        let seed = seq["seed"].as_u64().unwrap();
        let (status, again) = tgi(
            "generate",
            json!({"max_new_tokens": 6, "do_sample": true, "seed": seed, "details": true}),
        );
        assert_eq!(status, 200, "{again}");
        assert_eq!(&again["generated_text"], text);
        assert_eq!(again["details"]["seed"], seed);
    }
    for (route, params, field) in [
        ("generate", json!({"best_of": 2}), "sampling"),
        (
            "generate",
            json!({"best_of": 2, "do_sample": true, "seed": 1}),
            "seed",
        ),
        (
            "generate",
            json!({"best_of": 3, "do_sample": true}),
            "best_of",
        ),
        (
            "generate",
            json!({"best_of": 0, "do_sample": true}),
            "best_of",
        ),
        (
            "generate_stream",
            json!({"best_of": 2, "do_sample": true}),
            "streaming",
        ),
    ] {
        let (status, got) = tgi(route, params.clone());
        assert_eq!(status, 422, "{params}: {got}");
        assert!(
            got["error"].as_str().unwrap().contains(field),
            "{params}: {got}"
        );
    }
    // A temperature alone samples (a seed is reported); greedy reports none.
    let (_, warm) = tgi("generate", json!({"temperature": 0.7, "details": true}));
    assert!(warm["details"]["seed"].is_u64(), "{warm}");
    let (_, greedy) = tgi("generate", json!({"details": true}));
    assert!(greedy["details"]["seed"].is_null(), "{greedy}");
    assert_eq!(get_info(&base)["max_best_of"], 2);
}

/// Greedy generation through OpenAI's chat and completions routes (whole and streamed) and
/// TGI's `/generate` gives the pipeline's text; usage counts and the stream's byte format.
#[test]
fn generation_routes_match_the_pipeline() {
    let base = start();
    let gen = |input: Input, n: u64| decoder_text(input, n, json!({}));
    let messages = json!([{"role": "user", "content": "Hi there"}]);
    let want = gen(hi_there(), 8);

    let (status, got) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": messages, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["object"], "chat.completion");
    assert_eq!(
        got["choices"][0]["message"]["content"].as_str().unwrap(),
        want
    );
    assert_eq!(got["choices"][0]["finish_reason"], "length");
    assert_eq!(got["usage"]["completion_tokens"], 8);
    let prompt_tokens = got["usage"]["prompt_tokens"].as_u64().unwrap();
    assert!(prompt_tokens > 2);

    // A model name that matches nothing goes to the only generation model (InferenceClient
    // sends a placeholder name).
    let (status, named) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"model": "dummy", "messages": messages, "max_tokens": 8, "temperature": 0}),
    );
    assert_eq!(status, 200, "{named}");
    assert_eq!(
        named["choices"][0]["message"]["content"].as_str().unwrap(),
        want
    );

    // `logprobs: true`: one entry per token, text adding up to the answer.
    let (status, got) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": messages, "max_tokens": 8, "temperature": 0, "logprobs": true}),
    );
    assert_eq!(status, 200, "{got}");
    let entries = got["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(entries.len(), 8);
    let joined: String = entries
        .iter()
        .map(|e| e["token"].as_str().unwrap())
        .collect();
    assert_eq!(joined, want);
    assert!(entries
        .iter()
        .all(|e| e["logprob"].as_f64().unwrap() <= 0.0));

    // `top_logprobs: 3`: three alternatives per token, most likely first; greedy picks the
    // first, with the same log-probability. Streamed, the same entries come one per chunk.
    let body = json!({"messages": messages, "max_tokens": 8, "temperature": 0,
                      "logprobs": true, "top_logprobs": 3});
    let (status, got) = post_json(&format!("{base}/v1/chat/completions"), body.clone());
    assert_eq!(status, 200, "{got}");
    let with_top = got["choices"][0]["logprobs"]["content"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(with_top.len(), 8);
    for (e, plain) in with_top.iter().zip(entries) {
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{e}");
        let lps: Vec<f64> = top.iter().map(|t| t["logprob"].as_f64().unwrap()).collect();
        assert!(lps.windows(2).all(|w| w[0] >= w[1]), "{e}");
        assert!(
            (lps[0] - e["logprob"].as_f64().unwrap()).abs() < 1e-6,
            "{e}"
        );
        assert_eq!(e["logprob"], plain["logprob"]);
        assert!(lps.iter().map(|l| l.exp()).sum::<f64>() <= 1.0 + 1e-6);
    }
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let raw = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_string(&streamed.to_string())
        .unwrap()
        .into_string()
        .unwrap();
    let streamed_entries: Vec<Value> = raw
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .filter(|e| *e != "[DONE]")
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    // (A token's text can differ: text held back until the end comes as its own chunk when
    // streamed, appended to the last token when whole; so can the same token's text among its
    // alternatives, which is its own.)
    let alternatives = |v: &[Value]| -> Vec<(Value, Vec<(Value, Value)>)> {
        v.iter()
            .map(|e| {
                let top = e["top_logprobs"].as_array().unwrap();
                let top = top
                    .iter()
                    .map(|t| {
                        let own = t["token"] == e["token"];
                        let text = if own { Value::Null } else { t["token"].clone() };
                        (text, t["logprob"].clone())
                    })
                    .collect();
                (e["logprob"].clone(), top)
            })
            .collect()
    };
    assert_eq!(alternatives(&streamed_entries), alternatives(&with_top));
    for bad in [
        json!({"top_logprobs": 21, "logprobs": true}),
        json!({"top_logprobs": 2}),
    ] {
        let mut b = json!({"messages": messages, "max_tokens": 2});
        b.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let (status, err) = post_json(&format!("{base}/v1/chat/completions"), b);
        assert_eq!(status, 422, "{err}");
        assert!(err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("top_logprobs"));
    }

    // Streamed: `data: <json>\n\n` events, a role chunk first, deltas that add up to the same
    // text, a finish reason, the usage chunk asked for, then `[DONE]`.
    let resp = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_string(
            &json!({"messages": messages, "max_tokens": 8, "temperature": 0, "stream": true,
                    "stream_options": {"include_usage": true}})
            .to_string(),
        )
        .unwrap();
    let chunks = sse_chunks(resp);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunk_texts(&chunks, "/choices/0/delta/content");
    assert_eq!(text, want);
    let finish: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finish, [&json!("length")]);
    let usage = &chunks.last().unwrap()["usage"];
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), prompt_tokens);
    assert_eq!(usage["completion_tokens"], 8);

    let want = gen(Input::Text("Once upon".into()), 6);
    let (status, got) = post_json(
        &format!("{base}/v1/completions"),
        json!({"prompt": "Once upon", "max_tokens": 6, "temperature": 0}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["text"].as_str().unwrap(), want);
    let (status, got) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 6, "details": true}}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["generated_text"].as_str().unwrap(), want);
    assert_eq!(got["details"]["generated_tokens"], 6);

    // TGI's stream: an event per token, the last with the whole text and the details.
    let resp = ureq::post(&format!("{base}/generate_stream"))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_string(
            &json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 6, "details": true}})
                .to_string(),
        )
        .unwrap();
    let raw = resp.into_string().unwrap();
    let events: Vec<Value> = raw
        .split("\n\n")
        .filter(|e| !e.trim().is_empty() && !e.starts_with(':'))
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    assert_eq!(events.len(), 6, "{raw}");
    let text: String = events
        .iter()
        .map(|e| e["token"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, want);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["index"], i + 1);
        assert!(e["token"]["logprob"].as_f64().unwrap() <= 0.0);
        assert!(e["token"]["id"].is_u64());
    }
    let last = events.last().unwrap();
    assert_eq!(last["generated_text"].as_str().unwrap(), want);
    assert_eq!(last["details"]["generated_tokens"], 6);
    assert!(events[0]["generated_text"].is_null());

    // `details` list every token; `top_n_tokens: 2` adds each token's two most likely
    // alternatives (greedy: the token itself first), whole and streamed alike.
    let body = json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 6, "details": true,
                      "top_n_tokens": 2}});
    let (status, got) = post_json(&format!("{base}/generate"), body.clone());
    assert_eq!(status, 200, "{got}");
    let tokens = got["details"]["tokens"].as_array().unwrap();
    let top = got["details"]["top_tokens"].as_array().unwrap();
    assert_eq!((tokens.len(), top.len()), (6, 6), "{got}");
    for (i, (t, alts)) in tokens.iter().zip(top).enumerate() {
        assert_eq!(t["id"], events[i]["token"]["id"], "{got}");
        assert_eq!(t["logprob"], events[i]["token"]["logprob"]);
        let alts = alts.as_array().unwrap();
        assert_eq!(alts.len(), 2);
        assert_eq!(alts[0]["id"], t["id"]);
        assert!(alts[0]["logprob"].as_f64() >= alts[1]["logprob"].as_f64());
    }
    let raw = ureq::post(&format!("{base}/generate_stream"))
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_string(&body.to_string())
        .unwrap()
        .into_string()
        .unwrap();
    let streamed: Vec<Value> = raw
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(|e| serde_json::from_str::<Value>(e).unwrap()["top_tokens"].clone())
        .collect();
    assert_eq!(&streamed[..], &top[..]);
    let (status, err) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "Once upon", "parameters": {"top_n_tokens": 6}}),
    );
    assert_eq!(status, 422, "{err}");

    // TGI's `POST /` on a generation model (what `InferenceClient.text_generation` sends):
    // `[{generated_text}]`, the prompt included unless `return_full_text` is false.
    let (status, got) = post_json(
        &format!("{base}/models/{}", decoder()),
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 6,
               "decoder_input_details": false, "watermark": false,
               "frequency_penalty": 0.0}, "stream": false}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got[0]["generated_text"].as_str().unwrap(),
        format!("Once upon{want}")
    );

    // Refusals, in each family's error shape.
    let (status, body) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": messages, "n": 99}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("`n`"));
    let (status, body) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": messages, "model": fixture("bert-seqcls")}),
    );
    assert_eq!(status, 422, "{body}");
    let (status, body) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "a", "parameters": {"watermark": true}}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("watermark"));
    // TGI's frequency penalty (prompt counted, divided by the row's length) is the pipeline's
    // `tgi_frequency_penalty`, not its OpenAI one.
    // A prompt of one repeated token, which the penalty (at most 2 x count / length) can
    // move on this random model.
    const PROMPT: &str = "allPPPPPPPPPPPP";
    let tgi_gen = |extra: Value| decoder_text(Input::from(PROMPT), 12, extra);
    let penalized = tgi_gen(json!({"tgi_frequency_penalty": -2.0}));
    assert_ne!(penalized, tgi_gen(json!({})));
    assert_ne!(penalized, tgi_gen(json!({"frequency_penalty": -2.0})));
    let (status, body) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": PROMPT, "parameters": {"max_new_tokens": 12,
               "frequency_penalty": -2.0}}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["generated_text"].as_str().unwrap(), penalized);
    let (status, body) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "a", "parameters": {"frequency_penalty": 2.5}}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("frequency_penalty"));
    let (status, body) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "a", "parameters": {"frobnicate": 1}}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("frobnicate"));

    // Every generation above timed its first token and the ones after it.
    let m = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let count = |name: &str| -> u64 {
        m.lines()
            .find(|l| l.starts_with(&format!("{name}_count")))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {m}"))
    };
    assert!(
        count("ferroformers_time_to_first_token_seconds") >= 6,
        "{m}"
    );
    assert!(
        count("ferroformers_time_per_output_token_seconds") >= 6,
        "{m}"
    );
}

#[test]
fn bad_requests_get_status_codes_and_json_errors() {
    let base = start();
    let embed = format!("{base}/embed");
    let cases: Vec<(&str, (u16, Value), u16, &str)> = vec![
        (
            "no content type",
            post(&embed, "{\"inputs\": \"a\"}", None, Some(KEY)),
            415,
            "Content-Type",
        ),
        (
            "not JSON",
            post(&embed, "{inputs", Some("application/json"), Some(KEY)),
            400,
            "not JSON",
        ),
        (
            "no key",
            post(
                &embed,
                "{\"inputs\": \"a\"}",
                Some("application/json"),
                None,
            ),
            401,
            "Authorization",
        ),
        (
            "wrong key",
            post(
                &embed,
                "{\"inputs\": \"a\"}",
                Some("application/json"),
                Some("nope"),
            ),
            401,
            "Authorization",
        ),
        (
            "too large",
            post_json(&embed, json!({"inputs": "x".repeat(5000)})),
            413,
            "",
        ),
        (
            "too many inputs",
            post_json(&embed, json!({"inputs": ["a", "b", "c", "d", "e"]})),
            413,
            "batch size 5",
        ),
        (
            "missing inputs",
            post_json(&embed, json!({"text": "a"})),
            422,
            "inputs",
        ),
        (
            "unknown parameter",
            post_json(
                &format!("{base}/models/{}", fixture("bert-seqcls")),
                json!({"inputs": "a", "parameters": {"top_q": 1}}),
            ),
            422,
            "top_q",
        ),
        (
            "unknown model",
            post_json(&format!("{base}/models/org/none"), json!({"inputs": "a"})),
            404,
            "org/none",
        ),
        (
            "unknown route",
            post_json(&format!("{base}/nowhere"), json!({})),
            404,
            "/nowhere",
        ),
    ];
    for (what, (status, body), want, needle) in cases {
        assert_eq!(status, want, "{what}: {body}");
        let msg = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("{what}: {body}"));
        assert!(msg.contains(needle), "{what}: {msg}");
        assert!(body["error_type"].is_string(), "{what}: {body}");
    }
    // OpenAI routes answer OpenAI's error shape.
    let (status, body) = post_json(&format!("{base}/v1/embeddings"), json!({"input": 3}));
    assert_eq!(status, 422);
    assert!(body["error"]["message"].as_str().unwrap().contains("input"));
    assert_eq!(body["error"]["type"], "invalid_request_error");
    // Values of the wrong type or range are refused, naming the field in `param`.
    let chat = format!("{base}/v1/chat/completions");
    let hi = json!([{"role": "user", "content": "hi"}]);
    for (url, body, field) in [
        (
            &chat,
            json!({"messages": hi, "max_tokens": 2, "seed": -1}),
            "seed",
        ),
        (
            &chat,
            json!({"messages": hi, "max_tokens": 2, "seed": 1.5}),
            "seed",
        ),
        (
            &chat,
            json!({"messages": hi, "max_tokens": 2, "stream": "yes"}),
            "stream",
        ),
        (
            &chat,
            json!({"messages": hi, "max_tokens": 2, "model": 5}),
            "model",
        ),
        (
            &chat,
            json!({"messages": [{"role": "user", "content": [{"type": "text"}]}]}),
            "",
        ),
        (
            &format!("{base}/v1/embeddings"),
            json!({"input": "a", "encoding_format": 5}),
            "encoding_format",
        ),
        (
            &format!("{base}/v1/embeddings"),
            json!({"input": "a", "dimensions": 0}),
            "dimensions",
        ),
        (
            &format!("{base}/v1/embeddings"),
            json!({"input": "a", "dimensions": 5}),
            "dimensions",
        ),
    ] {
        let (status, err) = post_json(url, body.clone());
        assert_eq!(status, 422, "{body}: {err}");
        if field.is_empty() {
            let msg = err["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains("content[0]") && msg.contains("`text`"),
                "{msg}"
            );
        } else {
            assert_eq!(err["error"]["param"], field, "{body}: {err}");
        }
    }
    // A sentence-transformers model answers the Inference API's feature-extraction with its
    // sentence embeddings (as the hosted API); another task stays a 422.
    let st = fixture("minilm-st");
    let (status, body) = post_json(
        &format!("{base}/models/{st}/pipeline/feature-extraction"),
        json!({"inputs": "a"}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(floats(&body).len(), 32, "{body}");
    let (status, _) = post_json(
        &format!("{base}/models/{st}/pipeline/text-classification"),
        json!({"inputs": "a"}),
    );
    assert_eq!(status, 422);
    // The model's own size is served.
    let (status, _) = post_json(
        &format!("{base}/v1/embeddings"),
        json!({"input": "a", "dimensions": 32}),
    );
    assert_eq!(status, 200);
    // Once the size is known, another `dimensions` is refused before any work.
    let (_, value) = metrics_of(&base, "minilm-st");
    let calls = value("ferroformers_inference_duration_seconds_count");
    let (status, err) = post_json(
        &format!("{base}/v1/embeddings"),
        json!({"input": "a", "dimensions": 5}),
    );
    assert_eq!(status, 422, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains("32"));
    let (_, value) = metrics_of(&base, "minilm-st");
    assert_eq!(
        value("ferroformers_inference_duration_seconds_count"),
        calls
    );
    // An unknown /v1 route answers in OpenAI's shape; a route asked with another method gets
    // a JSON 405.
    let (status, body) = post_json(&format!("{base}/v1/nowhere"), json!({}));
    assert_eq!(status, 404);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/v1/nowhere"));
    for (path, openai) in [("/embed", false), ("/v1/chat/completions", true)] {
        let err = ureq::get(&format!("{base}{path}"))
            .set("Authorization", &format!("Bearer {KEY}"))
            .call()
            .unwrap_err();
        let ureq::Error::Status(405, resp) = err else {
            panic!("{path}: {err:?}")
        };
        let body: Value = resp.into_json().unwrap();
        let msg = if openai {
            &body["error"]["message"]
        } else {
            &body["error"]
        };
        assert!(msg.as_str().unwrap().contains("GET"), "{path}: {body}");
    }
    // Probes stay public.
    assert_eq!(
        ureq::get(&format!("{base}/health"))
            .call()
            .unwrap()
            .status(),
        200
    );
}

/// Generation requests that cannot run get their error status before any event is sent,
/// streamed or not: a prompt plus max_new_tokens past the context window (64 positions for the
/// fixture) is a 422 naming the window (OpenAI's routes call the field `max_tokens` and name it
/// in `param`), as are bad sampling values and max_new_tokens 0 on the stream routes; too many
/// inputs on `/v1/embeddings` is a 413 as on TEI's routes.
#[test]
fn generation_limits_are_refused_before_any_event() {
    let base = start();
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post_json(&format!("{base}/v1/chat/completions"), body)
    };
    for stream in [false, true] {
        let route = format!(
            "{base}/{}",
            if stream {
                "generate_stream"
            } else {
                "generate"
            }
        );
        for (what, (status, body)) in [
            (
                "/generate",
                post_json(
                    &route,
                    json!({"inputs": "Hello there", "parameters": {"max_new_tokens": 100}}),
                ),
            ),
            (
                "overflowing max_new_tokens",
                post_json(
                    &route,
                    json!({"inputs": "Hello there",
                           "parameters": {"max_new_tokens": u64::MAX}}),
                ),
            ),
        ] {
            assert_eq!(status, 422, "{what} stream={stream}: {body}");
            let msg = body["error"].as_str().unwrap();
            assert!(
                msg.contains("max_new_tokens") && msg.contains("context window of 64 tokens"),
                "{what}: {msg}"
            );
        }
        let (status, body) = chat(json!({"max_tokens": 100, "stream": stream}));
        assert_eq!(status, 422, "chat stream={stream}: {body}");
        assert_eq!(body["error"]["param"], "max_tokens", "{body}");
        let msg = body["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains("`max_tokens`") && !msg.contains("max_new_tokens"),
            "{msg}"
        );
        assert_eq!(body["error"]["type"], "invalid_request_error");
        let (status, body) = chat(
            json!({"max_tokens": 3, "stream": stream, "temperature": 0.5,
                                         "top_p": 2}),
        );
        assert_eq!(status, 422, "top_p 2, stream={stream}: {body}");
        assert_eq!(body["error"]["param"], "top_p", "{body}");
    }
    for body in [
        json!({"inputs": "hi", "parameters": {"max_new_tokens": 3, "top_p": 2}}),
        json!({"inputs": "hi", "parameters": {"max_new_tokens": 0}}),
        json!({"inputs": "hi", "parameters": {"max_new_tokens": 3, "do_sample": true,
                                               "top_p": 0}}),
    ] {
        let (status, err) = post_json(&format!("{base}/generate_stream"), body.clone());
        assert_eq!(status, 422, "{body}: {err}");
        assert!(err["error"].is_string(), "{err}");
    }
    // TGI's frequency_penalty is named as the request named it.
    let (status, body) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "hi", "parameters": {"max_new_tokens": 2, "frequency_penalty": 9}}),
    );
    assert_eq!(status, 422, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("`frequency_penalty`") && !msg.contains("tgi_"),
        "{msg}"
    );
    // TGI's finish reasons: its limit, one of its stop strings (the first tokens' own text).
    let tgi = |params: Value| {
        post_json(
            &format!("{base}/generate"),
            json!({"inputs": "Hello there", "parameters": params}),
        )
    };
    let (_, first) = tgi(json!({"max_new_tokens": 3, "details": true}));
    assert_eq!(first["details"]["finish_reason"], "length", "{first}");
    let text = first["generated_text"].as_str().unwrap().to_string();
    assert!(!text.trim().is_empty(), "{first}");
    let (_, stopped) = tgi(json!({"max_new_tokens": 20, "details": true, "stop": [text]}));
    assert_eq!(
        stopped["details"]["finish_reason"], "stop_sequence",
        "{stopped}"
    );
    // Without max_tokens the default (256) is cut to what the window has left (TGI's and
    // vLLM's default), not refused.
    let (status, body) = post_json(
        &format!("{base}/v1/completions"),
        json!({"prompt": "Once upon a time", "temperature": 0, "min_tokens": 64}),
    );
    assert_eq!(status, 200, "{body}");
    let u = &body["usage"];
    assert_eq!(
        u["prompt_tokens"].as_u64().unwrap() + u["completion_tokens"].as_u64().unwrap(),
        64,
        "{body}"
    );
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    // Within the window, the stream runs as before.
    let (status, _) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "Hello there", "parameters": {"max_new_tokens": 5}}),
    );
    assert_eq!(status, 200);
    let (status, body) = post_json(
        &format!("{base}/v1/embeddings"),
        json!({"input": ["a", "b", "c", "d", "e"]}),
    );
    assert_eq!(status, 413, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("batch size 5"));
}

/// `/metrics` as text, and a reader of one series' value for the model whose id holds
/// `model`.
fn metrics_of(base: &str, model: &str) -> (String, impl Fn(&str) -> f64) {
    let metrics = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let (text, model) = (metrics.clone(), model.to_string());
    let value = move |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains(&model))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text}"))
    };
    (metrics, value)
}

/// Concurrent requests to one encoder model run as shared pipeline calls (the metrics say so)
/// and each gets the answer it gets alone.
#[test]
fn concurrent_requests_are_batched() {
    let base = start_with(|c| c.max_batch_wait = std::time::Duration::from_millis(300));
    let texts: Vec<String> = (0..12)
        .map(|i| format!("Sentence number {i} is {} long.", "very ".repeat(i)))
        .collect();
    let handles: Vec<_> = texts
        .iter()
        .map(|t| {
            let (url, t) = (format!("{base}/embed"), t.clone());
            std::thread::spawn(move || post_json(&url, json!({"inputs": t})))
        })
        .collect();
    let answers: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let (metrics, value) = metrics_of(&base, "minilm-st");
    let (batches, requests) = (
        value("ferroformers_batch_count"),
        value("ferroformers_batch_requests_total"),
    );
    assert_eq!(requests, 12.0, "{metrics}");
    assert!(batches < 12.0, "no request was merged: {metrics}");
    assert!(value("ferroformers_batch_max_inputs") > 1.0);
    let mut p = Params::new();
    p.insert("normalize".into(), json!(true));
    for (t, (status, got)) in texts.iter().zip(&answers) {
        assert_eq!(*status, 200, "{got}");
        let want = pipeline_json(
            "sentence-embeddings",
            &fixture("minilm-st"),
            &[Input::from(t.as_str())],
            p.clone(),
        );
        let (g, w) = (floats(&got[0]), floats(&want[0]));
        let d = g
            .iter()
            .zip(&w)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(d < 1e-5, "{t}: batched answer differs by {d}");
    }
}

/// A batched generation (text2text here; summarization, translation and speech recognition
/// run the same way) stops once its request has gone: a request that would generate for
/// hours times out with 504, and the model's worker is free for the next request at once
/// (before, it went on to its `max_new_tokens`, holding every later request of the model).
#[test]
fn abandoned_batched_generation_stops() {
    let t5 = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/seq2seq/models/t5")
        .canonicalize()
        .unwrap();
    let id = t5.to_str().unwrap().to_string();
    let spec = format!("{id}=text2text-generation");
    let base = start_with(|c| {
        c.models = vec![ModelSpec::parse(&spec)];
        c.request_timeout = Some(std::time::Duration::from_millis(500));
    });
    let url = format!("{base}/models/{id}");
    // The random T5 never says its end token: a billion new tokens would run for days. Greedy
    // search, then beam search.
    for beams in [1, 2] {
        let (status, err) = post_json(
            &url,
            json!({"inputs": "translate English to German: hi",
                   "parameters": {"max_new_tokens": 1_000_000_000, "num_beams": beams}}),
        );
        assert_eq!(status, 504, "{err}");
        let t = std::time::Instant::now();
        let (status, got) = post_json(
            &url,
            json!({"inputs": "translate English to German: hi", "parameters": {"max_new_tokens": 3}}),
        );
        assert_eq!(status, 200, "{got}");
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "after {beams} beams, the next request waited {:?}",
            t.elapsed()
        );
    }
}

/// An idle server gives memory back: `on_idle` runs once the server has been idle for
/// `idle_release_after`, once per idle spell (not again until new work has come and gone),
/// and not while requests keep coming.
#[test]
fn idle_server_gives_memory_back() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    static IDLE: AtomicUsize = AtomicUsize::new(0);
    fn on_idle() {
        IDLE.fetch_add(1, SeqCst);
    }
    let after = std::time::Duration::from_millis(600);
    let base = start_with(|c| {
        c.on_idle = Some(on_idle);
        c.idle_release_after = Some(after);
    });
    let wait_for = |n: usize| {
        let t = std::time::Instant::now();
        while IDLE.load(SeqCst) < n {
            assert!(t.elapsed().as_secs() < 20, "on_idle never ran a {n}th time");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    // The first idle spell starts once the models are loaded.
    wait_for(1);
    std::thread::sleep(after * 3);
    assert_eq!(IDLE.load(SeqCst), 1, "on_idle ran twice in one idle spell");
    // Requests closer together than `after` keep the server busy.
    let url = format!("{base}/generate");
    let body = json!({"inputs": "Hello", "parameters": {"max_new_tokens": 4}});
    let start = std::time::Instant::now();
    while start.elapsed() < after * 4 {
        let (status, got) = post_json(&url, body.clone());
        assert_eq!(status, 200, "{got}");
        std::thread::sleep(after / 10);
    }
    assert_eq!(
        IDLE.load(SeqCst),
        1,
        "on_idle ran while requests kept coming"
    );
    // After them, a new spell.
    wait_for(2);
    std::thread::sleep(after * 3);
    assert_eq!(IDLE.load(SeqCst), 2);
}

/// TEI's `/tokenize` and `/decode`: tokens with byte offsets into the input (special tokens
/// with their own text and no offsets), not truncated; ids back to text.
/// A GGUF file has no tokenizer files beside it: `/tokenize` and `/decode` read the vocabulary
/// the file holds (the real SmolLM2 Q4_1, scripts/fetch-models.sh smollm2; skipped when it is
/// not in the HF cache or FERROFORMERS_SKIP_REAL_MODELS=1). The ids are transformers 4.57.1's
/// (`AutoTokenizer.from_pretrained(dir, gguf_file=..)`, `add_special_tokens=False`: with
/// special tokens transformers puts `<|im_start|>` first, which the file's
/// `add_bos_token=false` and llama.cpp do not).
#[test]
fn gguf_tokenize_and_decode() {
    let Some(id) = smollm2() else {
        return;
    };
    let base = start_with(|c| c.models = vec![ModelSpec::parse(&format!("{id}=text-generation"))]);
    let text = "H\u{e9}llo w\u{f6}rld, na\u{ef}ve caf\u{e9}!";
    for (input, want) in [
        ("The capital of France is", vec![504, 3575, 282, 4649, 314]),
        (
            text,
            vec![
                56, 2756, 31394, 267, 29989, 400, 28, 15486, 46494, 37366, 17,
            ],
        ),
    ] {
        let (status, body) = post_json(
            &format!("{base}/tokenize"),
            json!({"inputs": input, "add_special_tokens": false}),
        );
        assert_eq!(status, 200, "{body}");
        let tokens = body[0].as_array().unwrap();
        let ids: Vec<u64> = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
        assert_eq!(ids, want, "{body}");
        // Byte offsets that cover the input, each token's text its slice.
        let mut at = 0;
        for t in tokens {
            let (a, b) = (t["start"].as_u64().unwrap(), t["stop"].as_u64().unwrap());
            assert_eq!(a as usize, at, "{t}");
            assert_eq!(t["text"], input[a as usize..b as usize], "{t}");
            at = b as usize;
        }
        assert_eq!(at, input.len());
        let (status, body) = post_json(&format!("{base}/decode"), json!({"ids": ids}));
        assert_eq!(status, 200, "{body}");
        assert_eq!(body, json!([input]));
    }
}

#[test]
fn tei_tokenize_and_decode() {
    let base = start();
    let (status, body) = post_json(
        &format!("{base}/tokenize"),
        json!({"inputs": "H\u{e9}llo world"}),
    );
    assert_eq!(status, 200, "{body}");
    let tokens = body[0].as_array().unwrap();
    let first = &tokens[0];
    assert_eq!(first["special"], true, "{body}");
    assert!(
        first["start"].is_null() && first["text"] == "[CLS]",
        "{body}"
    );
    assert_eq!(tokens.last().unwrap()["text"], "[SEP]", "{body}");
    // Byte offsets: "é" is two bytes, so "world" starts at byte 7 (character 6).
    let word = tokens.iter().find(|t| t["text"] == "world").unwrap();
    assert_eq!(
        (word["start"].as_u64(), word["stop"].as_u64()),
        (Some(7), Some(12))
    );
    for t in tokens.iter().filter(|t| t["special"] == false) {
        let (a, b) = (t["start"].as_u64().unwrap(), t["stop"].as_u64().unwrap());
        assert_eq!(t["text"], "H\u{e9}llo world"[a as usize..b as usize], "{t}");
    }
    let ids: Vec<u64> = tokens.iter().map(|t| t["id"].as_u64().unwrap()).collect();
    // A list of inputs, without special tokens; long inputs are not truncated.
    let long = "word ".repeat(700);
    let (status, body) = post_json(
        &format!("{base}/tokenize"),
        json!({"inputs": ["H\u{e9}llo world", long], "add_special_tokens": false}),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body[0].as_array().unwrap().len(), ids.len() - 2);
    assert!(body[1].as_array().unwrap().len() >= 700, "truncated");
    // Decode one list or several; special tokens skipped unless asked.
    let (status, body) = post_json(&format!("{base}/decode"), json!({"ids": ids}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!(["hello world"]));
    let (_, body) = post_json(
        &format!("{base}/decode"),
        json!({"ids": [ids, ids[1..ids.len() - 2]], "skip_special_tokens": false}),
    );
    assert_eq!(body[0], "[CLS] hello world [SEP]", "{body}");
    assert_eq!(body[1], "hello");
    for (route, bad, needle) in [
        ("/decode", json!({"ids": "12"}), "ids"),
        ("/decode", json!({"ids": [-1]}), "ids"),
        ("/decode", json!({}), "ids"),
        ("/tokenize", json!({"inputs": 3}), "inputs"),
        ("/tokenize", json!({"inputs": []}), "inputs"),
        (
            "/tokenize",
            json!({"inputs": "x", "prompt_name": "query"}),
            "prompt_name",
        ),
        ("/tokenize", json!({"inputs": "x", "model": "nope"}), "nope"),
    ] {
        let (status, body) = post_json(&format!("{base}{route}"), bad.clone());
        assert!(
            status == 422 || status == 404,
            "{route} {bad}: {status} {body}"
        );
        assert!(
            body["error"].as_str().unwrap().contains(needle),
            "{route} {bad}: {body}"
        );
    }
    let (status, _) = post_json(
        &format!("{base}/tokenize"),
        json!({"inputs": ["a", "b", "c", "d", "e"]}),
    );
    assert_eq!(status, 413);
}

/// TEI's `/embed_all` (every token's vector, cut at sentence-transformers' length; their mean
/// is `/embed`'s unnormalized vector for this mean-pooling model) and `/similarity` (the
/// sentence-similarity pipeline's scores).
#[test]
fn tei_embed_all_and_similarity() {
    let base = start();
    let (status, all) = post_json(
        &format!("{base}/embed_all"),
        json!({"inputs": ["A short one.", "word ".repeat(100)]}),
    );
    assert_eq!(status, 200, "{all}");
    let rows = all[0].as_array().unwrap();
    let (_, pooled) = post_json(
        &format!("{base}/embed"),
        json!({"inputs": "A short one.", "normalize": false}),
    );
    let pooled = floats(&pooled[0]);
    let n = rows.len() as f32;
    for (j, want) in pooled.iter().enumerate() {
        let mean: f32 = rows
            .iter()
            .map(|r| r[j].as_f64().unwrap() as f32)
            .sum::<f32>()
            / n;
        assert!(
            (mean - want).abs() < 1e-5,
            "dimension {j}: {mean} vs {want}"
        );
    }
    // sentence_bert_config.json's max_seq_length (48) cuts the long input.
    assert_eq!(all[1].as_array().unwrap().len(), 48);
    let (status, one) = post_json(&format!("{base}/embed_all"), json!({"inputs": "Hi"}));
    assert_eq!(status, 200, "{one}");
    assert_eq!(
        one.as_array().unwrap().len(),
        1,
        "a single input is still a list of one"
    );
    let (source, sentences) = ("The cat sat.", vec!["A cat was sitting.", "Stocks fell."]);
    let (status, got) = post_json(
        &format!("{base}/similarity"),
        json!({"inputs": {"source_sentence": source, "sentences": sentences},
               "parameters": {"truncate": true}}),
    );
    assert_eq!(status, 200, "{got}");
    let want = pipeline_json(
        "sentence-similarity",
        &fixture("minilm-st"),
        &[Input::Similarity {
            source_sentence: source.into(),
            sentences: sentences.iter().map(|s| s.to_string()).collect(),
        }],
        Params::new(),
    );
    let (g, w) = (floats(&got), floats(&want[0]));
    assert_eq!(g.len(), 2);
    assert!(
        g.iter().zip(&w).all(|(a, b)| (a - b).abs() < 1e-5),
        "{got} vs {want}"
    );
    for bad in [
        json!({"inputs": {"source_sentence": "a", "sentences": []}}),
        json!({"inputs": {"sentences": ["a"]}}),
        json!({"inputs": "a"}),
    ] {
        let (status, body) = post_json(&format!("{base}/similarity"), bad.clone());
        assert_eq!(status, 422, "{bad}: {body}");
    }
    // The source sentence counts: 4 sentences + 1 is over the batch limit of 4.
    let (status, _) = post_json(
        &format!("{base}/similarity"),
        json!({"inputs": {"source_sentence": "a", "sentences": ["b", "c", "d", "e"]}}),
    );
    assert_eq!(status, 413);
}

/// TEI's `truncate`: an over-long input is cut unless the request (or, when it does not say,
/// `--auto-truncate false`) asks for a refusal, which is 422 naming the limit
/// (sentence-transformers' `max_seq_length`, 48, for the embedding model).
#[test]
fn tei_truncate_cuts_or_refuses() {
    let long = "word ".repeat(60);
    let base = start();
    let embed = format!("{base}/embed");
    let (status, _) = post_json(&embed, json!({"inputs": long}));
    assert_eq!(status, 200);
    let (status, body) = post_json(
        &embed,
        json!({"inputs": ["short", long], "truncate": false}),
    );
    assert_eq!(status, 422, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("input 1") && msg.contains("limit of 48"),
        "{msg}"
    );
    let (status, _) = post_json(&embed, json!({"inputs": "short", "truncate": false}));
    assert_eq!(status, 200);
    let (status, body) = post_json(&embed, json!({"inputs": "x", "truncate": "no"}));
    assert_eq!(status, 422, "{body}");
    let (status, body) = post_json(
        &format!("{base}/predict"),
        json!({"inputs": "word ".repeat(600), "truncate": false}),
    );
    assert_eq!(status, 422, "{body}");
    let base = start_with(|c| c.auto_truncate = false);
    for (route, body) in [
        ("/embed", json!({"inputs": long})),
        ("/embed_all", json!({"inputs": long})),
        ("/v1/embeddings", json!({"input": long})),
        (
            "/similarity",
            json!({"inputs": {"source_sentence": long, "sentences": ["a"]}}),
        ),
    ] {
        let (status, answer) = post_json(&format!("{base}{route}"), body.clone());
        assert_eq!(status, 422, "{route}: {answer}");
    }
    let (status, _) = post_json(
        &format!("{base}/embed"),
        json!({"inputs": long, "truncate": true}),
    );
    assert_eq!(status, 200);
}

/// TEI's `/rerank` on a one-label classifier: each (query, text) pair's score (sigmoid of the
/// logit, or the logit with `raw_scores`) as the pipeline gives it, best first; a server
/// whose classifier has several labels says it has no re-ranker.
#[test]
fn tei_rerank() {
    let base = start();
    let (status, body) = post_json(
        &format!("{base}/rerank"),
        json!({"query": "q", "texts": ["a"]}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("3 labels"),
        "{body}"
    );
    let base = start_with(|c| {
        c.models
            .push(ModelSpec::parse(&fixture("bert-seqcls-regression")))
    });
    let query = "What is deep learning?";
    let texts = [
        "Deep learning is a kind of machine learning.",
        "Paris is in France.",
        "Cats.",
    ];
    let (status, ranks) = post_json(
        &format!("{base}/rerank"),
        json!({"query": query, "texts": texts, "return_text": true}),
    );
    assert_eq!(status, 200, "{ranks}");
    let (_, raw) = post_json(
        &format!("{base}/rerank"),
        json!({"query": query, "texts": texts, "raw_scores": true}),
    );
    let ranks = ranks.as_array().unwrap();
    assert_eq!(ranks.len(), 3);
    let scores: Vec<f64> = ranks.iter().map(|r| r["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{ranks:?}");
    for r in ranks {
        let i = r["index"].as_u64().unwrap() as usize;
        assert_eq!(r["text"], texts[i]);
        let mut p = Params::new();
        p.insert("function_to_apply".into(), json!("sigmoid"));
        let want = pipeline_json(
            "text-classification",
            &fixture("bert-seqcls-regression"),
            &[Input::TextPair {
                text: query.into(),
                text_pair: texts[i].into(),
            }],
            p,
        );
        let want = want[0]["score"].as_f64().unwrap();
        assert!(
            (r["score"].as_f64().unwrap() - want).abs() < 1e-6,
            "{r} vs {want}"
        );
        let logit = raw
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["index"] == i)
            .unwrap()["score"]
            .as_f64()
            .unwrap();
        assert!(raw
            .as_array()
            .unwrap()
            .iter()
            .all(|x| x.get("text").is_none()));
        assert!(
            (1.0 / (1.0 + (-logit).exp()) - want).abs() < 1e-6,
            "{logit} vs {want}"
        );
    }
    for bad in [
        json!({"query": "q", "texts": []}),
        json!({"query": "q"}),
        json!({"texts": ["a"]}),
        json!({"query": "q", "texts": ["a"], "raw_scores": "yes"}),
        json!({"query": "q", "texts": ["a"], "truncation_direction": "left"}),
    ] {
        let (status, body) = post_json(&format!("{base}/rerank"), bad.clone());
        assert_eq!(status, 422, "{bad}: {body}");
    }
}

/// `--max-batch-tokens`: merged requests hold at most that many tokens together (the metrics
/// count them), a request over it by itself still runs alone, and `/info` reports both limits
/// as TEI names them.
#[test]
fn batches_keep_to_the_token_budget() {
    let texts: Vec<String> = (0..6)
        .map(|i| format!("the cat number {i} sat on the mat today"))
        .collect();
    // Each text's tokens as the model sees them (all the same length here).
    let dir = PathBuf::from(fixture("minilm-st"));
    let tok = ferroformers::tokenizer::Tokenizer::from_dir(&dir, "bert", Some(512)).unwrap();
    let n = tok.encode(&texts[0], None).unwrap().len();
    assert!(texts
        .iter()
        .all(|t| tok.encode(t, None).unwrap().len() == n));
    // Two requests fit the budget, three do not.
    let budget = 2 * n + n / 2;
    let base = start_with(|c| {
        c.max_batch_wait = std::time::Duration::from_millis(300);
        c.max_batch_tokens = budget;
    });
    let handles: Vec<_> = texts
        .iter()
        .map(|t| {
            let (url, t) = (format!("{base}/embed"), t.clone());
            std::thread::spawn(move || post_json(&url, json!({"inputs": t})))
        })
        .collect();
    for h in handles {
        let (status, body) = h.join().unwrap();
        assert_eq!(status, 200, "{body}");
    }
    let (metrics, value) = metrics_of(&base, "minilm-st");
    assert_eq!(value("ferroformers_batch_requests_total"), 6.0, "{metrics}");
    assert_eq!(
        value("ferroformers_batch_tokens_total"),
        (6 * n) as f64,
        "{metrics}"
    );
    // At most two requests fit, so six need at least three calls; some were merged.
    let largest = value("ferroformers_batch_max_tokens");
    assert!(largest > n as f64 && largest <= budget as f64, "{metrics}");
    assert!(value("ferroformers_batch_count") >= 3.0, "{metrics}");
    // One request of four texts is over the budget by itself: it runs alone.
    let four: Vec<&String> = texts.iter().take(4).collect();
    let (status, body) = post_json(&format!("{base}/embed"), json!({"inputs": four}));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 4);
    let (_, value) = metrics_of(&base, "minilm-st");
    assert_eq!(value("ferroformers_batch_max_tokens"), (4 * n) as f64);
    let info = get_info(&base);
    assert_eq!(info["max_batch_tokens"], budget, "{info}");
    assert_eq!(info["max_batch_requests"], 128, "{info}");
    // TEI's and TGI's names for where and in what the model runs (the CPU default: f32).
    assert_eq!(info["model_dtype"], "float32", "{info}");
    assert_eq!(info["model_device_type"], "cpu", "{info}");
}

/// `--dtype bf16`: the models load in bf16 (`/info` says so) and `/embed` answers what the
/// pipeline gives in bf16, which differs from f32's.
#[test]
fn dtype_reaches_the_models() {
    let model = fixture("minilm-st");
    let base = start_with(|c| {
        c.models = vec![ModelSpec::parse(&model)];
        c.dtype = Some(ferroformers::DType::BF16);
    });
    let info = get_info(&base);
    assert_eq!(info["model_dtype"], "bfloat16", "{info}");
    let text = "the cat sat on the mat";
    let (status, body) = post_json(&format!("{base}/embed"), json!({"inputs": text}));
    assert_eq!(status, 200, "{body}");
    let got = floats(&body[0]);
    let run = |dtype| {
        let pipe = ferroformers::pipeline_with(
            "sentence-embeddings",
            PipelineOptions {
                model: Some(model.clone()),
                dtype,
                ..Default::default()
            },
        )
        .unwrap();
        let out = serde_json::to_value(pipe.run(&[text.into()], &Params::new()).unwrap()).unwrap();
        floats(&out[0])
    };
    // (On a CPU without AVX512-BF16 the pipeline's bf16 falls back to f32, so the two may
    // be equal there; where they differ, the server's must be bf16's.)
    let (bf16, f32) = (
        run(ferroformers::DType::BF16),
        run(ferroformers::DType::F32),
    );
    let diff = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    assert!(diff(&got, &bf16) <= 1e-6, "{got:?} vs {bf16:?}");
    if diff(&bf16, &f32) > 1e-5 {
        assert!(diff(&got, &f32) > 1e-5, "bf16 answered f32's numbers");
    }
}

/// Generation requests at the same time go through the continuous batch: each answer equals
/// the pipeline's alone (greedy, its own length and prompt), and `/metrics` counts the batch's
/// steps and the sequences in them.
#[test]
fn concurrent_generations_share_the_continuous_batch() {
    let base = start_with(|c| {
        c.max_concurrent_requests = 64;
        c.admission.max_waiting_tokens = 7;
        // The longer prompts run in chunks, between the others' steps.
        c.admission.max_prefill_tokens = 6;
    });
    // `/info` reports the batch's limits under TGI's names.
    let info = get_info(&base);
    assert_eq!(info["max_batch_total_tokens"], 32_768, "{info}");
    assert_eq!(info["max_waiting_tokens"], 7, "{info}");
    assert_eq!(info["waiting_served_ratio"], 0.0, "{info}");
    assert_eq!(info["max_batch_prefill_tokens"], 6, "{info}");
    assert_eq!(info["prefill_priority"], true, "{info}");
    assert_eq!(info["max_concurrent_requests"], 64, "{info}");
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Request {i}: {}", "more ".repeat(i)))
        .collect();
    let handles: Vec<_> = prompts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let (url, t) = (format!("{base}/generate"), t.clone());
            std::thread::spawn(move || {
                post_json(
                    &url,
                    json!({"inputs": t, "parameters": {"max_new_tokens": 10 + 2 * i,
                           "do_sample": false}}),
                )
            })
        })
        .collect();
    let answers: Vec<(u16, Value)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (t, (status, got))) in prompts.iter().zip(&answers).enumerate() {
        assert_eq!(*status, 200, "{got}");
        let mut p = Params::new();
        p.insert("max_new_tokens".into(), json!(10 + 2 * i));
        p.insert("do_sample".into(), json!(false));
        p.insert("return_full_text".into(), json!(false));
        let want = pipeline_json("text-generation", &decoder(), &[Input::from(t.as_str())], p);
        assert_eq!(
            got["generated_text"], want[0][0]["generated_text"],
            "request {i}"
        );
    }
    let (metrics, value) = metrics_of(&base, "llama");
    let (steps, rows) = (
        value("ferroformers_generation_steps_total"),
        value("ferroformers_generation_step_rows_total"),
    );
    // Every request's tokens after its first came from a step of the batch (fewer where
    // a request met its end-of-sequence token first), and eight requests sent at once shared
    // steps.
    let decoded: f64 = (0..8).map(|i| (9 + 2 * i) as f64).sum();
    assert!(rows > 0.0 && rows <= decoded, "{metrics}");
    assert!(steps < rows, "no step ran two sequences: {metrics}");
    assert!(value("ferroformers_generation_batch_max_size") >= 2.0);
    assert_eq!(value("ferroformers_generation_batch_current_size"), 0.0);
    assert!(
        value("ferroformers_generation_prefill_chunks_total") >= 2.0,
        "{metrics}"
    );
    assert_eq!(
        value("ferroformers_generation_cancelled_prompts_total"),
        0.0
    );
    eprintln!(
        "continuous batch: {steps} steps for {decoded} tokens, at most {} sequences",
        value("ferroformers_generation_batch_max_size")
    );
}

/// Beyond `max_concurrent_requests` a request is refused at once with 429 and `Retry-After`;
/// CORS preflights are answered for an allowed origin only.
#[test]
fn overload_is_refused_with_429_and_cors_preflights_pass() {
    let base = start_with(|c| {
        c.max_concurrent_requests = 1;
        c.max_batch_wait = std::time::Duration::from_millis(1500);
        c.cors_allow_origin = vec!["https://app.example".into()];
    });
    let url = format!("{base}/embed");
    let slow = {
        let url = url.clone();
        std::thread::spawn(move || post_json(&url, json!({"inputs": "first"})))
    };
    wait_until_queued(&base);
    let resp = ureq::post(&url)
        .set("Content-Type", "application/json")
        .set("Authorization", &format!("Bearer {KEY}"))
        .send_string("{\"inputs\": \"second\"}");
    let Err(ureq::Error::Status(429, r)) = resp else {
        panic!("expected 429, got {resp:?}")
    };
    assert_eq!(r.header("Retry-After"), Some("1"));
    let body: Value = r.into_json().unwrap();
    assert_eq!(body["error_type"], "Overloaded");
    assert_eq!(slow.join().unwrap().0, 200);
    // The slot is free again.
    assert_eq!(post_json(&url, json!({"inputs": "third"})).0, 200);

    let pre = ureq::request("OPTIONS", &url)
        .set("Origin", "https://app.example")
        .set("Access-Control-Request-Method", "POST")
        .set(
            "Access-Control-Request-Headers",
            "authorization, content-type",
        )
        .call()
        .unwrap();
    assert_eq!(pre.status(), 204);
    assert_eq!(
        pre.header("Access-Control-Allow-Origin"),
        Some("https://app.example")
    );
    assert!(pre
        .header("Access-Control-Allow-Headers")
        .unwrap()
        .contains("authorization"));
    let other = ureq::request("OPTIONS", &url)
        .set("Origin", "https://evil.example")
        .call();
    match other {
        Ok(r) => assert!(r.header("Access-Control-Allow-Origin").is_none()),
        Err(ureq::Error::Status(_, r)) => {
            assert!(r.header("Access-Control-Allow-Origin").is_none())
        }
        Err(e) => panic!("{e}"),
    }
}

/// A server that runs until the sender is used: its base URL, the sender, its thread.
fn start_stoppable(
    cfg: Config,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let s = Server::bind(cfg).await.unwrap();
            addr_tx.send(s.local_addr().unwrap()).unwrap();
            s.run_until(async {
                let _ = stop_rx.await;
            })
            .await
            .unwrap();
        });
    });
    (
        format!("http://{}", addr_rx.recv().unwrap()),
        stop_tx,
        server,
    )
}

/// When told to stop, the server lets the request in flight finish and then returns.
#[test]
fn shutdown_drains_requests_in_flight() {
    let cfg = Config {
        models: vec![ModelSpec::parse(&fixture("minilm-st"))],
        port: 0,
        max_batch_wait: std::time::Duration::from_millis(1000),
        ..Config::default()
    };
    let (base, stop_tx, server) = start_stoppable(cfg);
    let url = format!("{base}/embed");
    let in_flight = std::thread::spawn(move || {
        post(
            &url,
            "{\"inputs\": \"still running\"}",
            Some("application/json"),
            None,
        )
    });
    wait_until_queued(&base);
    stop_tx.send(()).unwrap();
    let (status, body) = in_flight.join().unwrap();
    assert_eq!(status, 200, "{body}");
    server.join().unwrap();
}

/// Past `graceful_shutdown_timeout`, a request still queued is refused with 503 naming the
/// shutdown instead of run, and the server returns.
#[test]
fn shutdown_timeout_refuses_what_is_still_queued() {
    let cfg = Config {
        models: vec![ModelSpec::parse(&fixture("minilm-st"))],
        port: 0,
        max_batch_wait: std::time::Duration::from_millis(300),
        graceful_shutdown_timeout: std::time::Duration::ZERO,
        ..Config::default()
    };
    let (base, stop_tx, server) = start_stoppable(cfg);
    let url = format!("{base}/embed");
    let queued = std::thread::spawn(move || {
        post(
            &url,
            "{\"inputs\": \"too late\"}",
            Some("application/json"),
            None,
        )
    });
    wait_until_queued(&base);
    let start = std::time::Instant::now();
    stop_tx.send(()).unwrap();
    let (status, body) = queued.join().unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("shut down"),
        "{body}"
    );
    server.join().unwrap();
    assert!(start.elapsed() < std::time::Duration::from_secs(5));
}

/// A stream open when shutdown starts runs to its end: every token, the finish reason and
/// `[DONE]`, then the server exits.
#[test]
fn shutdown_lets_open_streams_finish() {
    use std::io::Read;
    let cfg = Config {
        models: vec![ModelSpec::parse(&format!("{}=text-generation", decoder()))],
        port: 0,
        ..Config::default()
    };
    let (base, stop_tx, server) = start_stoppable(cfg);
    let resp = ureq::post(&format!("{base}/v1/completions"))
        .set("Content-Type", "application/json")
        .send_string(
            &json!({"prompt": "Once upon a time", "max_tokens": 50, "temperature": 0,
                    "stream": true, "stream_options": {"include_usage": true}})
            .to_string(),
        )
        .unwrap();
    let mut reader = resp.into_reader();
    let mut first = [0u8; 16];
    reader.read_exact(&mut first).unwrap();
    stop_tx.send(()).unwrap();
    let mut rest = String::new();
    reader.read_to_string(&mut rest).unwrap();
    let raw = format!("{}{rest}", String::from_utf8_lossy(&first));
    let events: Vec<&str> = raw
        .split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .collect();
    assert_eq!(events.last(), Some(&"[DONE]"), "{raw}");
    let usage: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    let finish: Value = serde_json::from_str(events[events.len() - 3]).unwrap();
    assert!(finish["choices"][0]["finish_reason"].is_string(), "{raw}");
    let n = usage["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(n > 1, "{raw}");
    server.join().unwrap();
}

/// Every path and port that deploy/ names exists: the probes, the metrics path and the port in
/// the Kubernetes manifest and the Dockerfile.
#[test]
fn deploy_files_name_real_routes() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    let k8s = std::fs::read_to_string(root.join("k8s.yaml")).unwrap();
    let docker = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    // `path: /x` (probes) and `prometheus.io/path: /x`.
    let mut paths: Vec<&str> = k8s
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split("path: ").nth(1))
        .filter_map(|rest| rest.split([',', '}', ' ']).next())
        .collect();
    paths.sort();
    paths.dedup();
    assert!(paths.len() >= 4, "{paths:?}");
    assert!(k8s.contains("containerPort: 3000") && k8s.contains("prometheus.io/port: \"3000\""));
    assert!(docker.contains("EXPOSE 3000") && docker.contains("\"--port\", \"3000\""));
    let base = start();
    for p in paths {
        let status = match ureq::get(&format!("{base}{p}")).call() {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(s, _)) => s,
            Err(e) => panic!("{p}: {e}"),
        };
        assert_eq!(status, 200, "{p}");
    }
}

/// A full batch queue answers 429; a request past `request_timeout` answers 504, its queued
/// work is dropped unrun, and the metrics count both by route and status.
#[test]
fn queue_limit_timeout_and_request_metrics() {
    let base = start_with(|c| {
        c.max_queue_size = 1;
        c.max_batch_wait = std::time::Duration::from_millis(1500);
    });
    let url = format!("{base}/embed");
    let first = {
        let url = url.clone();
        std::thread::spawn(move || post_json(&url, json!({"inputs": "first"})))
    };
    wait_until_queued(&base);
    let (status, body) = post_json(&url, json!({"inputs": "second"}));
    assert_eq!(status, 429, "{body}");
    assert!(body["error"].as_str().unwrap().contains("queue is full"));
    assert_eq!(first.join().unwrap().0, 200);
    let (m, _) = metrics_of(&base, "minilm-st");
    assert!(
        m.contains(
            "ferroformers_request_failure_total{route=\"/embed\",error_type=\"Overloaded\"} 1"
        ),
        "{m}"
    );
    // The first request waited its batch's 1.5 s in the queue; one pipeline call ran.
    let series = |name: &str| {
        m.lines()
            .find(|l| l.starts_with(name) && l.contains("minilm-st"))
            .unwrap_or_else(|| panic!("no {name} in {m}"))
            .to_string()
    };
    assert!(series("ferroformers_queue_duration_seconds_count").ends_with(" 1"));
    assert!(series("ferroformers_queue_duration_seconds_bucket{model").ends_with(" 0"));
    assert!(series("ferroformers_inference_duration_seconds_count").ends_with(" 1"));

    let base = start_with(|c| {
        c.request_timeout = Some(std::time::Duration::from_millis(300));
        c.max_batch_wait = std::time::Duration::from_millis(1500);
    });
    let t = std::time::Instant::now();
    let (status, body) = post_json(&format!("{base}/embed"), json!({"inputs": "slow"}));
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error_type"], "Timeout");
    assert!(t.elapsed() < std::time::Duration::from_millis(1400));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let m = ureq::get(&format!("{base}/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        m.contains("ferroformers_request_count{route=\"/embed\",status=\"504\"} 1"),
        "{m}"
    );
    assert!(m.contains("ferroformers_request_duration_seconds_count{route=\"/embed\"} 1"));
    assert!(
        m.contains("ferroformers_request_failure_total{route=\"/embed\",error_type=\"Timeout\"} 1"),
        "{m}"
    );
    let dropped = m
        .lines()
        .find(|l| l.starts_with("ferroformers_dropped_requests_total") && l.contains("minilm-st"))
        .unwrap();
    assert!(dropped.ends_with(" 1"), "{dropped}");
}

/// Under overload (16 clients at once, room for 2 and a queue of 3), every request is either
/// answered or refused with 429: none is lost, none errs otherwise.
#[test]
fn overload_answers_or_refuses_every_request() {
    let base = start_with(|c| {
        c.max_concurrent_requests = 2;
        c.max_queue_size = 3;
        c.max_batch_wait = std::time::Duration::from_millis(100);
    });
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let url = format!("{base}/embed");
            std::thread::spawn(move || post_json(&url, json!({"inputs": format!("request {i}")})).0)
        })
        .collect();
    let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    let refused = statuses.iter().filter(|&&s| s == 429).count();
    assert_eq!(ok + refused, 16, "{statuses:?}");
    assert!(ok >= 1 && refused >= 1, "{statuses:?}");
}

/// The OpenAPI document names exactly the routes the router has: each of its paths answers
/// something other than 404 for its method, and /docs lists them.
#[test]
fn openapi_document_matches_the_router() {
    let base = start();
    let spec: Value = ureq::get(&format!("{base}/api-doc/openapi.json"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let paths = spec["paths"].as_object().unwrap();
    assert!(paths.len() >= 14);
    for (path, ops) in paths {
        let path = path.replace("{id}", &fixture("bert-seqcls"));
        for method in ops.as_object().unwrap().keys() {
            let url = format!("{base}{path}");
            let resp = match method.as_str() {
                "get" => ureq::get(&url)
                    .set("Authorization", &format!("Bearer {KEY}"))
                    .call(),
                _ => ureq::post(&url)
                    .set("Authorization", &format!("Bearer {KEY}"))
                    .set("Content-Type", "application/json")
                    .send_string("{}"),
            };
            let status = match resp {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(s, r)) => {
                    let body = r.into_string().unwrap_or_default();
                    assert!(!body.contains("no route"), "{method} {path}: {body}");
                    s
                }
                Err(e) => panic!("{method} {path}: {e}"),
            };
            assert_ne!(status, 404, "{method} {path}");
            assert_ne!(status, 405, "{method} {path}");
        }
    }
    let page = ureq::get(&format!("{base}/docs"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(page.contains("/v1/chat/completions") && page.contains("/api-doc/openapi.json"));
}

/// The Inference API's shapes where they differ from the pipelines' (what
/// `huggingface_hub.InferenceClient` parses; crates/ferroformers-py/tests/test_clients.py runs
/// the client itself): text-classification answers a list of labels per input, nested also
/// for one input; zero-shot-classification a list of `{label, score}` per input; an embedding
/// model given `{source_sentence, sentences}` the similarity scores, as TEI's `/similarity`.
#[test]
fn inference_api_shapes_for_inference_client() {
    let nli = std::fs::canonicalize(
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/seq2seq/models/bart-nli"),
    )
    .unwrap();
    let nli = nli.to_str().unwrap().to_string();
    let base = start_with(|c| {
        c.models
            .push(ModelSpec::parse(&format!("{nli}=zero-shot-classification")))
    });
    let text = "A quiet walk in the park.";
    let url = |m: &str| format!("{base}/models/{m}");

    let (status, got) = post_json(&url(&fixture("bert-seqcls")), json!({"inputs": text}));
    assert_eq!(status, 200, "{got}");
    let want = pipeline_json(
        "text-classification",
        &fixture("bert-seqcls"),
        &[Input::from(text)],
        Params::new(),
    );
    assert!(same(&got, &json!([[want[0]]])), "{got} vs [[{}]]", want[0]);
    let (status, got) = post_json(
        &url(&fixture("bert-seqcls")),
        json!({"inputs": [text, text], "parameters": {"top_k": 2}}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got.as_array().map(Vec::len), Some(2), "{got}");
    assert_eq!(got[1].as_array().map(Vec::len), Some(2), "{got}");

    let mut p = Params::new();
    p.insert(
        "candidate_labels".into(),
        json!(["outdoors", "finance", "cooking"]),
    );
    let (status, got) = post_json(
        &url(&nli),
        json!({"inputs": text, "parameters": {"candidate_labels": ["outdoors", "finance", "cooking"]}}),
    );
    assert_eq!(status, 200, "{got}");
    let want = pipeline_json("zero-shot-classification", &nli, &[Input::from(text)], p);
    let pairs: Vec<Value> = (0..3)
        .map(|i| json!({"label": want[0]["labels"][i], "score": want[0]["scores"][i]}))
        .collect();
    assert!(same(&got, &json!(pairs)), "{got} vs {want}");

    let (status, got) = post_json(
        &url(&fixture("minilm-st")),
        json!({"inputs": {"source_sentence": text, "sentences": [text, "The market fell."]}}),
    );
    assert_eq!(status, 200, "{got}");
    let (status, tei) = post_json(
        &format!("{base}/similarity"),
        json!({"inputs": {"source_sentence": text, "sentences": [text, "The market fell."]}}),
    );
    assert_eq!(status, 200, "{tei}");
    assert_eq!(got, tei);
    assert!((got[0].as_f64().unwrap() - 1.0).abs() < 1e-5, "{got}");

    // `generate_parameters` are the pipeline's generation parameters; given twice, a 422.
    let gen = json!({"max_new_tokens": 3, "do_sample": false});
    let (status, got) = post_json(
        &url(&decoder()),
        json!({"inputs": ["Hello"], "parameters": {"generate_parameters": gen}}),
    );
    assert_eq!(status, 200, "{got}");
    let mut p = Params::new();
    p.insert("max_new_tokens".into(), json!(3));
    p.insert("do_sample".into(), json!(false));
    let want = pipeline_json("text-generation", &decoder(), &[Input::from("Hello")], p);
    assert_eq!(got, want);
    let (status, got) = post_json(
        &url(&decoder()),
        json!({"inputs": ["Hello"], "parameters": {"max_new_tokens": 2, "generate_parameters": gen}}),
    );
    assert_eq!(status, 422, "{got}");
    assert!(
        got["error"].as_str().unwrap().contains("max_new_tokens"),
        "{got}"
    );
}

/// `/v1/completions` with a list of prompts (OpenAI's and vLLM's batch form): each prompt's `n`
/// choices in order, `index` counting on over the prompts, each equal to that prompt sent
/// alone; `usage` counts every prompt once; streamed the same. More prompts than
/// `--max-client-batch-size` is a 413; token ids are refused by name.
#[test]
fn completions_take_a_list_of_prompts() {
    let base = start();
    let url = format!("{base}/v1/completions");
    let alone: Vec<(String, u64)> = ["Hello", "Once upon"]
        .iter()
        .map(|p| {
            let (status, got) = post_json(
                &url,
                json!({"prompt": p, "max_tokens": 4, "temperature": 0}),
            );
            assert_eq!(status, 200, "{got}");
            (
                got["choices"][0]["text"].as_str().unwrap().to_string(),
                got["usage"]["prompt_tokens"].as_u64().unwrap(),
            )
        })
        .collect();
    let body = json!({"prompt": ["Hello", "Once upon"], "max_tokens": 4, "temperature": 0, "n": 2});
    let (status, got) = post_json(&url, body.clone());
    assert_eq!(status, 200, "{got}");
    let choices = got["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 4, "{got}");
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i, "{got}");
        assert_eq!(c["text"], alone[i / 2].0.as_str(), "choice {i}: {got}");
    }
    assert_eq!(
        got["usage"]["prompt_tokens"].as_u64().unwrap(),
        alone[0].1 + alone[1].1
    );
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let resp = post_stream(&url, streamed);
    let chunks = sse_chunks(resp);
    let mut texts = vec![String::new(); 4];
    for c in &chunks {
        for ch in c["choices"].as_array().unwrap() {
            texts[ch["index"].as_u64().unwrap() as usize] += ch["text"].as_str().unwrap();
        }
    }
    for (i, t) in texts.iter().enumerate() {
        assert_eq!(t, &alone[i / 2].0, "streamed choice {i}");
    }
    assert_eq!(
        chunks.last().unwrap()["usage"]["prompt_tokens"]
            .as_u64()
            .unwrap(),
        alone[0].1 + alone[1].1
    );
    // Token ids (the text's, as the pipeline encodes it) run as the text does, alone or in a
    // list.
    let pipe = library_pipeline("text-generation", &decoder());
    let ids = pipe.tokenizer().unwrap().encode("Hello", None).unwrap().ids;
    for prompt in [json!(ids), json!([ids, "Once upon"])] {
        let (status, got) = post_json(
            &url,
            json!({"prompt": prompt, "max_tokens": 4, "temperature": 0}),
        );
        assert_eq!(status, 200, "{got}");
        assert_eq!(
            got["choices"][0]["text"],
            alone[0].0.as_str(),
            "{prompt}: {got}"
        );
        assert_eq!(
            got["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
            ids.len()
                + if prompt[1].is_string() {
                    alone[1].1 as usize
                } else {
                    0
                }
        );
    }
    for (prompt, status) in [
        (json!(["a", "b", "c", "d", "e"]), 413),
        (json!([1, -2, 3]), 422),
        (json!([[]]), 422),
        (json!([99_999_999]), 422),
        (json!([1.5]), 422),
        (json!([]), 422),
    ] {
        let (got_status, err) = post_json(&url, json!({"prompt": prompt, "max_tokens": 2}));
        assert_eq!(got_status, status, "{prompt}: {err}");
        assert_eq!(err["error"]["param"], "prompt", "{err}");
    }
}

/// A completion's legacy `logprobs: N`: per token its text, log-probability (TGI's `details`
/// give the same), at most N + 1 alternatives with the sampled token's, and its offset in the
/// text; streamed, each event carries its token's. `top_logprobs` is chat's and refused here.
#[test]
fn completions_give_legacy_logprobs() {
    let base = start();
    let url = format!("{base}/v1/completions");
    let (status, tgi) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 5, "details": true}}),
    );
    assert_eq!(status, 200, "{tgi}");
    let want: Vec<f64> = tgi["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();
    let body = json!({"prompt": "Once upon", "max_tokens": 5, "temperature": 0, "logprobs": 2});
    let (status, got) = post_json(&url, body.clone());
    assert_eq!(status, 200, "{got}");
    let lp = &got["choices"][0]["logprobs"];
    let logprobs: Vec<f64> = lp["token_logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(logprobs.len(), 5, "{got}");
    assert!(
        logprobs
            .iter()
            .zip(&want)
            .all(|(a, b)| (a - b).abs() < 1e-5),
        "{logprobs:?} vs {want:?}"
    );
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(tokens.concat(), got["choices"][0]["text"].as_str().unwrap());
    let mut at = 0;
    for (i, (t, top)) in tokens
        .iter()
        .zip(lp["top_logprobs"].as_array().unwrap())
        .enumerate()
    {
        assert_eq!(lp["text_offset"][i], at, "{lp}");
        at += t.chars().count();
        let top = top.as_object().unwrap();
        assert!((1..=3).contains(&top.len()), "{lp}");
        let best = top
            .values()
            .map(|v| v.as_f64().unwrap())
            .fold(f64::MIN, f64::max);
        // Greedy: the sampled token is the most likely one.
        assert!((best - logprobs[i]).abs() < 1e-5, "{lp}");
    }
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let resp = post_stream(&url, streamed);
    let per_event: Vec<f64> = chunk_logprobs(&sse_chunks(resp))
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(per_event, logprobs);
    for bad in [
        json!({"logprobs": 21}),
        json!({"logprobs": true}),
        json!({"top_logprobs": 2}),
    ] {
        let mut b = json!({"prompt": "Hi", "max_tokens": 2});
        b.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let (status, err) = post_json(&url, b);
        assert_eq!(status, 422, "{bad}: {err}");
    }
}

/// `echo` on /v1/completions (lm-evaluation-harness' log-likelihood requests): the prompt
/// comes back before the completion with its tokens' log-probabilities, first token null.
/// Scoring a prompt in one pass gives what generating it one token at a time gave (TGI's
/// `details`), and TGI's `decoder_input_details` gives the same prompt scores.
#[test]
fn completions_echo_the_prompt_with_its_logprobs() {
    let base = start();
    let url = format!("{base}/v1/completions");
    let (status, tgi) = post_json(
        &format!("{base}/generate"),
        // The fixture's repetition penalty (1.3) would change the generated scores.
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 5, "details": true,
                                                     "decoder_input_details": true,
                                                     "repetition_penalty": 1.0}}),
    );
    assert_eq!(status, 200, "{tgi}");
    let ids_of = |list: &Value| -> Vec<u64> {
        list.as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].as_u64().unwrap())
            .collect()
    };
    let prefill = &tgi["details"]["prefill"];
    let prompt_ids = ids_of(prefill);
    assert!(prompt_ids.len() >= 2, "{tgi}");
    assert!(prefill[0]["logprob"].is_null(), "{prefill}");
    let generated = &tgi["details"]["tokens"];
    let mut all = prompt_ids.clone();
    all.extend(ids_of(generated));
    // Every token after the first: its prompt score, then its generation score.
    let want: Vec<f64> = prefill.as_array().unwrap()[1..]
        .iter()
        .chain(generated.as_array().unwrap())
        .map(|t| t["logprob"].as_f64().unwrap())
        .collect();

    let body = json!({"prompt": all, "max_tokens": 0, "echo": true, "logprobs": 1,
                      "temperature": 0});
    let (status, got) = post_json(&url, body.clone());
    assert_eq!(status, 200, "{got}");
    let choice = &got["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{got}");
    assert_eq!(got["usage"]["prompt_tokens"], all.len(), "{got}");
    assert_eq!(got["usage"]["completion_tokens"], 0, "{got}");
    let lp = &choice["logprobs"];
    assert!(
        lp["token_logprobs"][0].is_null() && lp["top_logprobs"][0].is_null(),
        "{lp}"
    );
    let scores: Vec<f64> = lp["token_logprobs"].as_array().unwrap()[1..]
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(scores.len(), want.len(), "{lp}");
    for (i, (a, b)) in scores.iter().zip(&want).enumerate() {
        assert!((a - b).abs() < 1e-4, "token {}: {a} vs {b}", i + 1);
    }
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let text = choice["text"].as_str().unwrap();
    assert_eq!(tokens.concat(), text);
    // Token ids are decoded as given, the BOS token the tokenizer added among them.
    assert_eq!(
        text,
        format!("<s>Once upon{}", tgi["generated_text"].as_str().unwrap())
    );
    let mut at = 0;
    for (i, t) in tokens.iter().enumerate() {
        assert_eq!(lp["text_offset"][i], at, "{lp}");
        at += t.chars().count();
        if i > 0 {
            // The token among its alternatives, under its own text (lm-eval's greedy check
            // compares it with the best of them).
            let top = lp["top_logprobs"][i].as_object().unwrap();
            assert!((1..=2).contains(&top.len()), "{lp}");
            assert_eq!(top[*t].as_f64().unwrap(), scores[i - 1], "{lp}");
        }
    }

    // With a completion: the prompt, then what the same request without `echo` gives.
    let plain = json!({"prompt": "Once upon", "max_tokens": 3, "temperature": 0, "logprobs": 0});
    let (_, without) = post_json(&url, plain.clone());
    let mut echoed = plain;
    echoed["echo"] = json!(true);
    let (status, with) = post_json(&url, echoed.clone());
    assert_eq!(status, 200, "{with}");
    let completion = without["choices"][0]["text"].as_str().unwrap();
    assert_eq!(
        with["choices"][0]["text"],
        format!("Once upon{completion}"),
        "{with}"
    );
    let n_tokens = with["choices"][0]["logprobs"]["tokens"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(n_tokens, prompt_ids.len() + 3, "{with}");
    assert_eq!(with["usage"]["completion_tokens"], 3, "{with}");
    // A scored prompt's keys and values are kept: generating from it runs its last token only
    // (metrics: prompt tokens taken from kept prefixes), and gives the same text.
    let (metric, value) = metrics_of(&base, &decoder());
    let before = value("ferroformers_generation_prefix_tokens_total");
    assert!(
        metric.contains("ferroformers_generation_prefix_hits_total"),
        "{metric}"
    );
    let long = "Little house by the sea: a story in which nothing much happens, and";
    let (status, scored) = post_json(
        &url,
        json!({"prompt": long, "max_tokens": 3, "temperature": 0, "echo": true, "logprobs": 0}),
    );
    assert_eq!(status, 200, "{scored}");
    let prompt_len = scored["usage"]["prompt_tokens"].as_u64().unwrap() as f64;
    let (_, value) = metrics_of(&base, &decoder());
    assert_eq!(
        value("ferroformers_generation_prefix_tokens_total") - before,
        prompt_len - 1.0
    );
    let (_, plain_long) = post_json(
        &url,
        json!({"prompt": long, "max_tokens": 3, "temperature": 0}),
    );
    assert_eq!(
        scored["choices"][0]["text"],
        format!(
            "{long}{}",
            plain_long["choices"][0]["text"].as_str().unwrap()
        )
    );
    // Many at once: scoring passes take turns, and each answer is the one alone.
    let alone = post_json(
        &url,
        json!({"prompt": long, "max_tokens": 0, "echo": true, "logprobs": 1}),
    )
    .1;
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                post_json(
                    &url,
                    json!({"prompt": long, "max_tokens": 0, "echo": true, "logprobs": 1}),
                )
            })
        })
        .collect();
    for t in threads {
        let (status, got) = t.join().unwrap();
        assert_eq!(status, 200, "{got}");
        assert_eq!(got["choices"], alone["choices"]);
    }
    // Streamed: the prompt first, then the completion's pieces.
    echoed["stream"] = json!(true);
    let resp = post_stream(&url, echoed);
    let chunks = sse_chunks(resp);
    assert_eq!(chunks[0]["choices"][0]["text"], "Once upon", "{chunks:?}");
    let joined: String = chunk_texts(&chunks, "/choices/0/text");
    assert_eq!(joined, format!("Once upon{completion}"));
    let streamed_lps = chunk_logprobs(&chunks);
    assert_eq!(
        streamed_lps,
        with["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()
            .clone()
    );

    // Refused: echo on a chat, a non-boolean echo, max_tokens 0 without echo, and the
    // prompt's details on a TGI stream.
    for (route, bad) in [
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}], "echo": true}),
        ),
        ("/v1/completions", json!({"prompt": "Hi", "echo": "yes"})),
        ("/v1/completions", json!({"prompt": "Hi", "max_tokens": 0})),
        (
            "/generate_stream",
            json!({"inputs": "Hi", "parameters": {"decoder_input_details": true}}),
        ),
    ] {
        let (status, err) = post_json(&format!("{base}{route}"), bad.clone());
        assert_eq!(status, 422, "{bad}: {err}");
    }
}

/// Embedding routes take token ids (OpenAI's `input`, TEI's `inputs`), run as given: a text's
/// ids (special tokens included) embed as the text does; too many are cut at the model's limit;
/// bad ids are refused with the field named.
#[test]
fn embeddings_take_token_ids() {
    let base = start();
    let text = "A short one.";
    let (_, tokens) = post_json(&format!("{base}/tokenize"), json!({ "inputs": text }));
    let ids: Vec<u64> = tokens[0]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    assert!(ids.len() > 3, "{tokens}");
    let url = format!("{base}/v1/embeddings");
    let (status, by_text) = post_json(&url, json!({ "input": text }));
    assert_eq!(status, 200, "{by_text}");
    let (status, by_ids) = post_json(&url, json!({"input": [ids.clone(), text]}));
    assert_eq!(status, 200, "{by_ids}");
    let want = floats(&by_text["data"][0]["embedding"]);
    for i in 0..2 {
        let got = floats(&by_ids["data"][i]["embedding"]);
        let d = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(d < 1e-5, "input {i}: differs by {d}");
    }
    let (_, one) = post_json(&url, json!({ "input": ids }));
    assert_eq!(
        floats(&one["data"][0]["embedding"]),
        floats(&by_ids["data"][0]["embedding"])
    );
    assert_eq!(one["usage"]["prompt_tokens"], ids.len(), "{one}");
    // TEI's /embed and /embed_all.
    let (status, tei) = post_json(&format!("{base}/embed"), json!({ "inputs": [ids] }));
    assert_eq!(status, 200, "{tei}");
    let (_, tei_text) = post_json(&format!("{base}/embed"), json!({ "inputs": text }));
    assert_eq!(floats(&tei[0]), floats(&tei_text[0]));
    let long: Vec<u64> = std::iter::repeat_n(ids[1], 100).collect();
    let (status, all) = post_json(
        &format!("{base}/embed_all"),
        json!({"inputs": [ids.clone(), long]}),
    );
    assert_eq!(status, 200, "{all}");
    assert_eq!(all[0].as_array().unwrap().len(), ids.len());
    // Cut at sentence_bert_config.json's max_seq_length (48), as a long text is.
    assert_eq!(all[1].as_array().unwrap().len(), 48);
    for bad in [
        json!([999_999]),
        json!([[]]),
        json!([]),
        json!([1, "a"]),
        json!([[1, -2]]),
        json!({"ids": [1]}),
    ] {
        let (status, err) = post_json(&url, json!({ "input": bad }));
        assert_eq!(status, 422, "{bad}: {err}");
        assert!(
            err["error"]["message"].as_str().unwrap().contains("input")
                || err["error"]["param"] == "input",
            "{bad}: {err}"
        );
    }
    let (status, err) = post_json(&url, json!({"input": [[1], [2], [3], [4], [5]]}));
    assert_eq!(status, 413, "{err}");
}

/// `--gguf-math` reaches a served GGUF model: `exact` scores a prompt as the library does with
/// f32 activations; the default (int8 activations, as llama.cpp) differs from that by its
/// rounding. Skipped without SmolLM2 in the HF cache.
#[test]
fn gguf_math_reaches_served_models() {
    let Some(id) = smollm2() else {
        return;
    };
    let text = "The capital of France is Paris, and the capital of Italy is Rome.";
    let scores = |math: Option<ferroformers::QuantMath>| -> Vec<f64> {
        let base = start_with(|c| {
            c.models = vec![ModelSpec::parse(&format!("{id}=text-generation"))];
            c.gguf_math = math;
        });
        let (status, got) = post_json(
            &format!("{base}/v1/completions"),
            json!({"prompt": text, "max_tokens": 0, "echo": true, "logprobs": 0}),
        );
        assert_eq!(status, 200, "{got}");
        got["choices"][0]["logprobs"]["token_logprobs"]
            .as_array()
            .unwrap()[1..]
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect()
    };
    let exact = ferroformers::pipeline_with(
        "text-generation",
        PipelineOptions {
            model: Some(id.to_string()),
            gguf_math: Some(ferroformers::QuantMath::Exact),
            ..Default::default()
        },
    )
    .unwrap();
    let want: Vec<f64> = exact
        .prompt_tokens(&Input::from(text), &Params::new(), Some(0), None)
        .unwrap()[1..]
        .iter()
        .map(|t| t.logprob.unwrap() as f64)
        .collect();
    let diff = |a: &[f64]| {
        assert_eq!(a.len(), want.len());
        a.iter()
            .zip(&want)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    };
    assert!(diff(&scores(Some(ferroformers::QuantMath::Exact))) < 1e-4);
    assert!(diff(&scores(None)) > 1e-3, "int8 activations round");
}

/// `--batch-invariant`: with `true` a model without batch-invariant arithmetic (the f32
/// decoder fixture) fails to load, saying why; by default (`auto`) it loads without. SmolLM2's
/// GGUF (Q4_1 and Q8_0, where it costs nothing) has it by default, and answers 24 greedy
/// requests at once (two rounds, prompts chunked between steps, the second round's from kept
/// prefixes) exactly as it answers each alone. Without it the int8 products of a batch, of a
/// chunk and of one row sum in other orders, and some answers under load differ. The SmolLM2
/// part is skipped without it in the HF cache.
#[test]
fn batch_invariant_answers_equal_the_answers_alone() {
    let cfg = Config {
        models: vec![ModelSpec::parse(&format!("{}=text-generation", decoder()))],
        port: 0,
        batch_invariant: Some(true),
        ..Config::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let err = match rt.block_on(Server::bind(cfg)) {
        Ok(_) => panic!("the f32 fixture has no batch-invariant products"),
        Err(e) => e,
    };
    assert!(
        err.contains("--batch-invariant") && err.contains("dense weights"),
        "{err}"
    );
    let generation = |id: &str| vec![ModelSpec::parse(&format!("{id}=text-generation"))];
    let base = start_with(|c| c.models = generation(&decoder()));
    assert_eq!(get_info(&base)["batch_invariant"], false);
    let Some(id) = smollm2() else {
        return;
    };
    let off = start_with(|c| {
        c.models = generation(id);
        c.batch_invariant = Some(false);
    });
    assert_eq!(get_info(&off)["batch_invariant"], false);
    let base = start_with(|c| {
        c.models = generation(id);
        c.max_concurrent_requests = 64;
        c.admission.max_prefill_tokens = 8;
    });
    let info = get_info(&base);
    assert_eq!(info["batch_invariant"], true, "{info}");
    assert_eq!(info["models"][0]["batch_invariant"], true, "{info}");
    let prompts: Vec<String> = (0..12)
        .map(|i| {
            format!(
                "Story {i}: once upon a time {}",
                "there was a cat, ".repeat(i % 4)
            )
        })
        .collect();
    greedy_answers_equal_the_answers_alone(&base, &prompts, 24);
}

/// Each of `prompts` asked alone (greedy, `max_tokens`), then all of them twice at once: the
/// answers under load equal the answers alone.
fn greedy_answers_equal_the_answers_alone(base: &str, prompts: &[String], max_tokens: usize) {
    let url = format!("{base}/v1/completions");
    let ask = |p: &str| {
        let (status, got) = post_json(
            &url,
            json!({"prompt": p, "max_tokens": max_tokens, "temperature": 0}),
        );
        assert_eq!(status, 200, "{got}");
        got["choices"][0]["text"].as_str().unwrap().to_string()
    };
    let alone: Vec<String> = prompts.iter().map(|p| ask(p)).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .chain(prompts)
            .map(|p| s.spawn(move || (p, ask(p))))
            .collect();
        for h in handles {
            let (p, got) = h.join().unwrap();
            let i = prompts.iter().position(|q| q == p).unwrap();
            assert_eq!(got, alone[i], "{p:?} under load");
        }
    });
}

/// `--idle-priority`: where a thread may come back from the idle scheduling priority, the
/// server says so in `/info`, and 16 greedy requests at once (their prompt passes and steps
/// at that priority) get the answers they get alone; `/metrics` counts the prompt passes that
/// stopped for requests arriving during them. Where it may not, the server refuses the flag.
#[test]
fn idle_priority_steps_answer_as_requests_alone() {
    let spec = ModelSpec::parse(&format!("{}=text-generation", decoder()));
    if !ferroformers::generation::Admission::idle_priority_available() {
        let cfg = Config {
            models: vec![spec],
            port: 0,
            admission: ferroformers::generation::Admission {
                idle_priority: true,
                ..Default::default()
            },
            ..Config::default()
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        match rt.block_on(Server::bind(cfg)) {
            Ok(_) => panic!("the flag was taken where it cannot work"),
            Err(e) => assert!(e.contains("--idle-priority"), "{e}"),
        }
        return;
    }
    let base = start_with(|c| {
        c.models = vec![spec];
        c.admission.idle_priority = true;
        c.max_concurrent_requests = 64;
    });
    assert_eq!(get_info(&base)["idle_priority"], true);
    let prompts: Vec<String> = (0..8)
        .map(|i| format!("Story {i}: once upon a time"))
        .collect();
    greedy_answers_equal_the_answers_alone(&base, &prompts, 12);
    let (_, value) = metrics_of(&base, "");
    assert!(value("ferroformers_generation_restarted_prompt_passes_total") >= 0.0);
}

/// `--arrival-wait-ms`: every generation route announces its request to the batch and the
/// request arrives when its prompt joins the queue (or when it fails first), so requests one
/// at a time never wait for one another, nor for themselves: with a 3 s wait, a streamed and
/// a plain chat, TGI's streamed and plain routes, the Inference API's route (greedy, and beam
/// search outside the batch) and a streamed chat refused by its checks each end at once, and `/metrics` counts no wait. A streamed request refused for one of its
/// prompts is refused whole, before any event. Two streamed choices wait at most until the
/// second arrives. Concurrent greedy requests get the answers they get alone.
#[test]
fn announced_requests_arrive_and_lone_ones_never_wait() {
    let spec = ModelSpec::parse(&format!("{}=text-generation", decoder()));
    let base = start_with(|c| {
        c.models = vec![spec];
        c.admission.arrival_wait = std::time::Duration::from_secs(3);
        c.max_concurrent_requests = 64;
    });
    assert_eq!(get_info(&base)["arrival_wait_ms"], 3000.0);
    let chat = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                              "temperature": 0});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        body
    };
    let openai = format!("{base}/v1/chat/completions");
    // Every route announces each generation it runs, once per prompt or choice.
    let announced = || metrics_of(&base, "").1("ferroformers_generation_announced_requests_total");
    let mut seen = 0.0;
    let mut announced_since = |n: f64, what: &str| {
        let now = announced();
        assert_eq!(now - seen, n, "announcements by {what}");
        seen = now;
    };
    let t = std::time::Instant::now();
    let chunks = sse_chunks(post_stream(&openai, chat(json!({"stream": true}))));
    assert!(!chunk_texts(&chunks, "/choices/0/delta/content").is_empty());
    announced_since(1.0, "a streamed chat");
    let (status, body) = post_json(&openai, chat(json!({})));
    assert_eq!(status, 200, "{body}");
    announced_since(1.0, "a chat");
    let tgi = json!({"inputs": "Hello there", "parameters": {"max_new_tokens": 4}});
    let (status, body) = post_json(&format!("{base}/generate"), tgi.clone());
    assert_eq!(status, 200, "{body}");
    announced_since(1.0, "TGI's /generate");
    let events = post_stream(&format!("{base}/generate_stream"), tgi)
        .into_string()
        .unwrap();
    assert!(events.contains("\"generated_text\":\""), "{events}");
    announced_since(1.0, "TGI's /generate_stream");
    // The Inference API's route with a chat (a pipeline call): one through the batch, and one
    // by beam search (outside it). (Its text prompts take TGI's way, above.)
    // `inputs` with `extra` parameters on the Inference API's route.
    let inference = |inputs: Value, extra: &Value| {
        let mut parameters = json!({"max_new_tokens": 4});
        parameters
            .as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        post_json(
            &format!("{base}/"),
            json!({"inputs": inputs, "parameters": parameters}),
        )
    };
    for extra in [json!({}), json!({"num_beams": 2, "do_sample": false})] {
        let (status, body) = inference(json!([{"role": "user", "content": "hi"}]), &extra);
        assert_eq!(status, 200, "{extra}: {body}");
        announced_since(1.0, "the Inference API's chat");
    }
    let (status, body) = post_json(&openai, chat(json!({"stream": true, "max_tokens": 100})));
    assert_eq!(status, 422, "{body}");
    announced_since(1.0, "a refused streamed chat");
    let chunks = sse_chunks(post_stream(&openai, chat(json!({"stream": true}))));
    assert!(!chunk_texts(&chunks, "/choices/0/delta/content").is_empty());
    announced_since(1.0, "a streamed chat");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "a lone request waited for an announced one: {:?}",
        t.elapsed()
    );
    let waits = || metrics_of(&base, "").1("ferroformers_generation_arrival_waits_total");
    assert_eq!(waits(), 0.0);
    // One prompt of two refused (past the 64-token context): 422 before any event, nothing
    // counted as a cancelled stream, and both announcements end (the first prompt's may wait
    // for the second's until it is refused).
    let (status, body) = post_json(
        &format!("{base}/v1/completions"),
        json!({"prompt": ["Hello", "word ".repeat(60)], "max_tokens": 20, "stream": true}),
    );
    assert_eq!(status, 422, "{body}");
    assert!(waits() <= 1.0);
    announced_since(2.0, "a streamed completion of two prompts");
    let (metrics, value) = metrics_of(&base, "");
    assert_eq!(
        value("ferroformers_generations_cancelled_total"),
        0.0,
        "{metrics}"
    );
    // Two choices are two requests: the first may wait for the second, until it arrives.
    let t = std::time::Instant::now();
    let two = sse_chunks(post_stream(
        &openai,
        chat(json!({"stream": true, "n": 2, "temperature": 1.0, "seed": 3})),
    ));
    assert!(two.iter().any(|c| c["choices"][0]["index"] == 1), "{two:?}");
    assert!(t.elapsed() < std::time::Duration::from_secs(3));
    assert!(waits() <= 2.0);
    announced_since(2.0, "a streamed chat of two choices");
    // Several prompts in one request: each is announced (the first may wait for the second);
    // the Inference API's, a pipeline call, once for the call (its prompts run one after
    // another through the batch, or in parallel, or with `batch_size` in a batch of their own).
    let t = std::time::Instant::now();
    let (status, body) = post_json(
        &format!("{base}/v1/completions"),
        json!({"prompt": ["Hello", "Hi"], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(status, 200, "{body}");
    announced_since(2.0, "a completion of two prompts");
    for extra in [json!({}), json!({"batch_size": 2})] {
        let (status, body) = inference(json!(["Hello", "Hi there"]), &extra);
        assert_eq!(status, 200, "{extra}: {body}");
        announced_since(1.0, "the Inference API's two prompts");
    }
    assert!(
        t.elapsed() < std::time::Duration::from_secs(3),
        "an announcement outlived its arrival: {:?}",
        t.elapsed()
    );
    assert!(waits() <= 5.0);
    let prompts: Vec<String> = (0..6).map(|i| format!("Tale {i}: there was")).collect();
    greedy_answers_equal_the_answers_alone(&base, &prompts, 8);
}

/// OpenAI's `stop`: the text ends before the first stop string (OpenAI and vLLM leave it out;
/// TGI, like transformers, keeps it), streamed or not, and `finish_reason` is `stop`.
#[test]
fn openai_stop_strings_are_left_out() {
    let base = start();
    let url = format!("{base}/v1/completions");
    let body = json!({"prompt": "Once upon", "max_tokens": 12, "temperature": 0});
    let (_, free) = post_json(&url, body.clone());
    let full = free["choices"][0]["text"].as_str().unwrap().to_string();
    // A stop string from the middle of the free text.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 6, "{full}");
    let stop: String = chars[4..6].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let mut stopped = body.clone();
    stopped["stop"] = json!(["never-there", stop]);
    let (status, got) = post_json(&url, stopped.clone());
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["text"], want, "stop {stop:?} in {full:?}");
    assert_eq!(got["choices"][0]["finish_reason"], "stop", "{got}");
    stopped["stream"] = json!(true);
    let resp = post_stream(&url, stopped);
    let chunks = sse_chunks(resp);
    let joined: String = chunk_texts(&chunks, "/choices/0/text");
    assert_eq!(joined, want);
    // A stop string that comes with the last token allowed: still left out, and `stop`.
    let n_tokens = got["usage"]["completion_tokens"].clone();
    let mut at_limit = body.clone();
    at_limit["max_tokens"] = n_tokens;
    at_limit["stop"] = json!(stop);
    let (_, last) = post_json(&url, at_limit);
    assert_eq!(last["choices"][0]["text"], want, "{last}");
    assert_eq!(last["choices"][0]["finish_reason"], "stop", "{last}");
    // TGI keeps the stop sequence, as TGI does.
    let (_, tgi) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 12, "stop": [stop],
                                                     "repetition_penalty": 1.3}}),
    );
    assert!(
        tgi["generated_text"].as_str().unwrap().contains(&stop),
        "{tgi}"
    );
    // Chat, streamed and not.
    let chat_url = format!("{base}/v1/chat/completions");
    let chat = json!({"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 12,
                      "temperature": 0});
    let (_, free) = post_json(&chat_url, chat.clone());
    let full = free["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    let chars: Vec<char> = full.chars().collect();
    let stop: String = chars[3..5].iter().collect();
    let want = &full[..full.find(&stop).unwrap()];
    let mut stopped = chat;
    stopped["stop"] = json!(stop);
    let (_, got) = post_json(&chat_url, stopped.clone());
    assert_eq!(got["choices"][0]["message"]["content"], want, "{got}");
    stopped["stream"] = json!(true);
    let resp = post_stream(&chat_url, stopped);
    let joined: String = chunk_texts(&sse_chunks(resp), "/choices/0/delta/content");
    assert_eq!(joined, want);
}

/// vLLM's extra request fields: `stop_token_ids`, `ignore_eos`, `include_stop_str_in_output`,
/// `skip_special_tokens`, `continue_final_message`; the ones not implemented (guided decoding,
/// beam search, ...) are refused by name instead of being ignored.
#[test]
fn vllm_extra_fields() {
    let base = start();
    let url = format!("{base}/v1/completions");
    let (_, tgi) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "Once upon", "parameters": {"max_new_tokens": 8, "details": true}}),
    );
    let ids: Vec<u64> = tgi["details"]["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_u64().unwrap())
        .collect();
    // The first generated token that has not come before ends it.
    let k = (1..ids.len())
        .find(|&k| !ids[..k].contains(&ids[k]))
        .unwrap();
    let body = json!({"prompt": "Once upon", "max_tokens": 8, "temperature": 0,
                      "stop_token_ids": [ids[k]]});
    let (status, got) = post_json(&url, body);
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["usage"]["completion_tokens"], k + 1, "{got}");
    assert_eq!(got["choices"][0]["finish_reason"], "stop", "{got}");
    // ignore_eos (vLLM's): an end token is generated like any other and the text goes on to
    // max_tokens. The fixture's end token (`</s>`, id 1) forced with logit_bias: without
    // ignore_eos it ends the text at once; with it, it comes 20 times, left out of the
    // text unless skip_special_tokens is false.
    let forced = json!({"prompt": "Once upon", "max_tokens": 20, "temperature": 0,
                        "logit_bias": {"1": 100}});
    let (_, got) = post_json(&url, forced.clone());
    assert_eq!(got["usage"]["completion_tokens"], 1, "{got}");
    assert_eq!(got["choices"][0]["finish_reason"], "stop", "{got}");
    let mut body = forced.clone();
    body["ignore_eos"] = json!(true);
    let (_, got) = post_json(&url, body.clone());
    assert_eq!(got["usage"]["completion_tokens"], 20, "{got}");
    assert_eq!(got["choices"][0]["finish_reason"], "length", "{got}");
    assert_eq!(got["choices"][0]["text"], "", "{got}");
    body["skip_special_tokens"] = json!(false);
    let (_, got) = post_json(&url, body);
    assert_eq!(got["choices"][0]["text"], "</s>".repeat(20), "{got}");
    // A stop token id still ends it.
    let (_, got) = post_json(
        &url,
        json!({"prompt": "Once upon", "max_tokens": 20, "temperature": 0, "ignore_eos": true,
               "stop_token_ids": [ids[k]]}),
    );
    assert_eq!(got["usage"]["completion_tokens"], k + 1, "{got}");
    assert_eq!(got["choices"][0]["finish_reason"], "stop", "{got}");
    // include_stop_str_in_output keeps the stop string that `stop` leaves out.
    let (_, free) = post_json(
        &url,
        json!({"prompt": "Once upon", "max_tokens": 8, "temperature": 0}),
    );
    let full = free["choices"][0]["text"].as_str().unwrap().to_string();
    let stop: String = full.chars().skip(3).take(2).collect();
    let upto = full.find(&stop).unwrap() + stop.len();
    let (_, kept) = post_json(
        &url,
        json!({"prompt": "Once upon", "max_tokens": 8, "temperature": 0, "stop": stop,
               "include_stop_str_in_output": true}),
    );
    assert_eq!(kept["choices"][0]["text"], full[..upto], "{kept}");
    let resp = post_stream(
        &url,
        json!({"prompt": "Once upon", "max_tokens": 8, "temperature": 0,
                          "stop": stop, "include_stop_str_in_output": true, "stream": true}),
    );
    let joined: String = chunk_texts(&sse_chunks(resp), "/choices/0/text");
    assert_eq!(joined, full[..upto]);
    let (status, _) = post_json(
        &url,
        json!({"prompt": "Once upon", "max_tokens": 2, "skip_special_tokens": false}),
    );
    assert_eq!(status, 200);
    // prompt_logprobs: each prompt token's score (TGI's prefill gives the same), its rank, and
    // its 2 most likely alternatives; a chat's beside its choices.
    let (_, tgi) = post_json(
        &format!("{base}/generate"),
        json!({"inputs": "Once upon a time", "parameters": {"max_new_tokens": 1,
               "details": true, "decoder_input_details": true}}),
    );
    let prefill = tgi["details"]["prefill"].as_array().unwrap().clone();
    let (status, got) = post_json(
        &url,
        json!({"prompt": "Once upon a time", "max_tokens": 1, "prompt_logprobs": 2}),
    );
    assert_eq!(status, 200, "{got}");
    let plp = got["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert_eq!(plp.len(), prefill.len(), "{got}");
    assert!(plp[0].is_null());
    for (entry, want) in plp.iter().zip(&prefill).skip(1) {
        let own = &entry[want["id"].to_string()];
        let lp = own["logprob"].as_f64().unwrap();
        assert!(
            (lp - want["logprob"].as_f64().unwrap()).abs() < 1e-5,
            "{entry}"
        );
        assert!(own["rank"].as_u64().unwrap() >= 1, "{entry}");
        let entries = entry.as_object().unwrap();
        assert!((2..=3).contains(&entries.len()), "{entry}");
        // The best alternative is rank 1, and no entry is more likely than it.
        let best = entries.values().find(|e| e["rank"] == 1).unwrap();
        assert!(entries
            .values()
            .all(|e| e["logprob"].as_f64() <= best["logprob"].as_f64()));
    }
    let (status, got) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
               "prompt_logprobs": 0}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(
        got["prompt_logprobs"].as_array().unwrap().len(),
        got["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        "{got}"
    );
    // continue_final_message: the last (assistant) message goes on, as the pipeline's.
    let chat = vec![
        ferroformers::generation::Message::new("user", "Hi there"),
        ferroformers::generation::Message::new("assistant", "Well"),
    ];
    let want = decoder_text(
        Input::Chat(chat),
        4,
        json!({"continue_final_message": true}),
    );
    let (status, got) = post_json(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "Hi there"},
                            {"role": "assistant", "content": "Well"}],
               "max_tokens": 4, "temperature": 0, "continue_final_message": true,
               "add_generation_prompt": false}),
    );
    assert_eq!(status, 200, "{got}");
    assert_eq!(got["choices"][0]["message"]["content"], want, "{got}");
    for (route, bad, field) in [
        (
            "/v1/completions",
            json!({"guided_json": {"type": "object"}}),
            "guided_json",
        ),
        (
            "/v1/completions",
            json!({"use_beam_search": true}),
            "use_beam_search",
        ),
        (
            "/v1/completions",
            json!({"length_penalty": 2.0}),
            "length_penalty",
        ),
        ("/v1/completions", json!({"bad_words": ["x"]}), "bad_words"),
        (
            "/v1/completions",
            json!({"stop_token_ids": [999_999]}),
            "stop_token_ids",
        ),
        (
            "/v1/completions",
            json!({"stop_token_ids": "x"}),
            "stop_token_ids",
        ),
        (
            "/v1/completions",
            json!({"ignore_eos": "yes"}),
            "ignore_eos",
        ),
        (
            "/v1/completions",
            json!({"prompt_logprobs": 1, "stream": true}),
            "prompt_logprobs",
        ),
        (
            "/v1/completions",
            json!({"prompt_logprobs": 21}),
            "prompt_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"chat_template_kwargs": {"enable_thinking": true}}),
            "chat_template_kwargs",
        ),
        (
            "/v1/chat/completions",
            json!({"add_generation_prompt": false}),
            "add_generation_prompt",
        ),
        (
            "/v1/chat/completions",
            json!({"continue_final_message": true, "add_generation_prompt": true}),
            "continue_final_message",
        ),
    ] {
        let mut body = json!({"prompt": "Hi", "messages": [{"role": "user", "content": "Hi"}],
                              "max_tokens": 2});
        body.as_object_mut()
            .unwrap()
            .extend(bad.as_object().unwrap().clone());
        let (status, err) = post_json(&format!("{base}{route}"), body);
        assert_eq!(status, 422, "{bad}: {err}");
        assert_eq!(err["error"]["param"], field, "{bad}: {err}");
    }
}
