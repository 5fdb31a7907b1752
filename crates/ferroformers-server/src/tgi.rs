//! TGI's routes: `/generate`, `/generate_stream` (an event per token, no `[DONE]`) and its
//! answer to `POST /` on a generation model.

use super::*;

/// TGI's request: the prompt and the pipeline's parameters (`stop` as stop strings; greedy and
/// new text only unless asked), and whether `details` are wanted.
pub(crate) fn tgi_request(
    v: &Value,
    max_best_of: usize,
    stream: bool,
) -> Result<(Input, Params, TgiOpts), ApiError> {
    tgi_request_with(v, false, max_best_of, stream)
}

/// What a TGI request asks for besides the generation: `details`, and `top_n_tokens`
/// alternatives per token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TgiOpts {
    pub details: bool,
    pub top_n: usize,
    /// `best_of`: candidates to generate, the most likely returned (1: just the one).
    pub best_of: usize,
    /// The seed of a sampled generation (given, or drawn here), which `details` report.
    pub seed: Option<u64>,
    /// `decoder_input_details`: the prompt's tokens with their log-probabilities in
    /// `details.prefill`.
    pub prefill: bool,
}

/// A token as TGI writes it.
fn tgi_token(id: u32, text: &str, logprob: f32, special: bool) -> Value {
    json!({"id": id, "text": text, "logprob": logprob, "special": special})
}

fn tgi_top(top: &[ferroformers::pipelines::text_generation::TopToken]) -> Value {
    Value::Array(
        top.iter()
            .map(|t| tgi_token(t.id, &t.text, t.logprob, t.special))
            .collect(),
    )
}

/// [`tgi_request`] with `return_full_text`'s default (TGI: true on `POST /` for a
/// text-generation model, as the Inference API answers; false on `/generate`). TGI's flags
/// this server does not implement are accepted at their neutral values and refused otherwise.
/// As TGI, a request samples when it asks to (`do_sample`) or sets a sampling parameter
/// (`temperature` other than 1, `top_k`, `top_p` or `typical_p` below 1); `best_of` (at most
/// `max_best_of`, TGI's `--max-best-of`) needs sampling, no `seed` and no stream.
pub(crate) fn tgi_request_with(
    v: &Value,
    full_text: bool,
    max_best_of: usize,
    stream: bool,
) -> Result<(Input, Params, TgiOpts), ApiError> {
    let input = match v.get("inputs") {
        Some(Value::String(s)) => Input::Text(s.clone()),
        _ => return Err(ApiError::validation("`inputs` must be a string")),
    };
    let mut params = params_of(v)?;
    // As TGI: the prompt's log-probabilities come with a whole answer only.
    let prefill = match params.remove("decoder_input_details") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => false,
        Some(Value::Bool(true)) if !stream => true,
        Some(Value::Bool(true)) => {
            return Err(ApiError::validation(
                "`decoder_input_details` is not supported when streaming tokens",
            ))
        }
        Some(x) => {
            return Err(ApiError::validation(format!(
                "`decoder_input_details` must be true or false, got {x}"
            )))
        }
    };
    for (flag, neutral) in [
        ("watermark", json!(false)),
        ("truncate", Value::Null),
        ("adapter_id", Value::Null),
        ("grammar", Value::Null),
    ] {
        if let Some(x) = params.remove(flag) {
            if x != neutral {
                return Err(ApiError::validation(format!(
                    "`{flag}` is not supported by this server"
                )));
            }
        }
    }
    if let Some(stop) = params.remove("stop") {
        params.insert("stop_strings".into(), stop);
    }
    // TGI's frequency penalty counts the prompt too and divides by the row's length: the
    // pipeline's `tgi_frequency_penalty`, not its OpenAI `frequency_penalty`.
    if let Some(f) = params.remove("frequency_penalty") {
        params.insert("tgi_frequency_penalty".into(), f);
    }
    // TGI's ranges, checked whether or not the request samples (a greedy request ignoring a
    // bad value would hide the client's mistake); `top_p` 1 is taken as "all" here.
    for (k, ok, range) in [
        (
            "top_p",
            (|x: f64| x > 0.0 && x <= 1.0) as fn(f64) -> bool,
            "> 0 and <= 1",
        ),
        ("typical_p", |x: f64| x > 0.0 && x <= 1.0, "> 0 and <= 1"),
        ("temperature", |x: f64| x > 0.0, "> 0"),
        ("repetition_penalty", |x: f64| x > 0.0, "> 0"),
    ] {
        match params.get(k) {
            None | Some(Value::Null) => {}
            Some(x) if x.as_f64().is_some_and(ok) => {}
            Some(x) => {
                return Err(
                    ApiError::validation(format!("`{k}` must be {range}, got {x}")).with_param(k),
                )
            }
        }
    }
    if let Some(d) = params
        .get("do_sample")
        .filter(|d| !d.is_null() && !d.is_boolean())
    {
        return Err(
            ApiError::validation(format!("`do_sample` must be true or false, got {d}"))
                .with_param("do_sample"),
        );
    }
    let num = |k: &str| params.get(k).and_then(Value::as_f64);
    let warped = num("temperature").is_some_and(|t| t != 1.0)
        || num("top_k").is_some_and(|k| k != 0.0)
        || num("top_p").is_some_and(|p| p < 1.0)
        || num("typical_p").is_some_and(|p| p < 1.0);
    let sampling = match params.get("do_sample") {
        None | Some(Value::Null) => warped,
        Some(d) => d.as_bool() == Some(true) || warped,
    };
    params.insert("do_sample".into(), json!(sampling));
    let best_of = match params.remove("best_of") {
        None | Some(Value::Null) => 1,
        Some(b) => match b.as_u64() {
            Some(b) if b >= 1 && max_best_of <= 1 && b != 1 => {
                return Err(ApiError::validation(
                    "`best_of` != 1 is not allowed for this endpoint",
                ))
            }
            Some(b) if (1..=max_best_of as u64).contains(&b) => b as usize,
            _ => {
                return Err(ApiError::validation(format!(
                    "`best_of` must be > 0 and <= {max_best_of}. Given: {b}"
                )))
            }
        },
    };
    let seed = match params.get("seed") {
        None | Some(Value::Null) => None,
        Some(s) => Some(
            s.as_u64()
                .ok_or_else(|| ApiError::validation("`seed` must be a whole number >= 0"))?,
        ),
    };
    if best_of > 1 {
        if !sampling {
            return Err(ApiError::validation(
                "you must use sampling when `best_of` is > 1",
            ));
        }
        if seed.is_some() {
            return Err(ApiError::validation(
                "`seed` must not be set when `best_of` is > 1",
            ));
        }
        if stream {
            return Err(ApiError::validation(
                "`best_of` != 1 is not supported when streaming tokens",
            ));
        }
    }
    // A sampled generation's seed, reported in `details` (each best_of candidate draws its own
    // when it runs).
    let seed = match (sampling, seed) {
        (true, None) if best_of == 1 => {
            let s = random_seed();
            params.insert("seed".into(), json!(s));
            Some(s)
        }
        (true, s) => s,
        (false, _) => None,
    };
    params
        .entry("return_full_text".to_string())
        .or_insert(json!(full_text));
    let top_n = count_at_most(params.remove("top_n_tokens").as_ref(), "top_n_tokens", 5)?;
    let details = params.remove("details").and_then(|d| d.as_bool()) == Some(true);
    Ok((
        input,
        params,
        TgiOpts {
            details,
            top_n,
            best_of,
            seed,
            prefill,
        },
    ))
}

/// TGI `/generate_stream`: one server-sent event per token (`{index, token: {id, text,
/// logprob, special}, generated_text, details, top_tokens}`), the last one carrying the whole
/// `generated_text` (and `details` when asked); no `[DONE]`.
pub(crate) async fn tgi_generate_stream(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (index, input, params, details) = tgi_call(&state, &headers, body, true)?;
    tgi_stream(&state, index, input, params, details).await
}

/// A TGI route's request: the served generation model's index, the input, the parameters and
/// what else was asked for.
fn tgi_call(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    stream: bool,
) -> Result<(usize, Input, Params, TgiOpts), ApiError> {
    let v = json_body(headers, body)?;
    let index = index_of(state, generator(state, None)?);
    let (input, params, details) = tgi_request(&v, state.max_best_of, stream)?;
    Ok((index, input, params, details))
}

/// The token events of one generation as TGI streams them.
pub(crate) async fn tgi_stream(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
    opts: TgiOpts,
) -> Result<Response, ApiError> {
    // An idle batch waits for it while it is checked and tokenized.
    let arrival = state.models[index].pipe.announce();
    check_stream(state, index, &input, &params).await?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut clock = TokenClock::new();
    let st = state.clone();
    let cancel = Cancel::new();
    let stop = cancel.clone();
    tokio::task::spawn_blocking(move || {
        // Each token's event waits for the next token, so that the last one can carry the
        // generated text.
        let mut pending: Option<Value> = None;
        let mut n = 0usize;
        let (mut gone, mut cut) = (false, false);
        let pipe = &st.models[index].pipe;
        let result = ferroformers::generation::arriving(arrival, || {
            pipe.run_streaming_until(&input, &params, opts.top_n, &stop, &mut |t| {
                if !t.tail {
                    clock.token();
                }
                if t.tail {
                    if let Some(p) = pending.as_mut() {
                        let text =
                            format!("{}{}", p["token"]["text"].as_str().unwrap_or(""), t.text);
                        p["token"]["text"] = json!(text);
                    }
                    return true;
                }
                n += 1;
                if let Some(p) = pending.take() {
                    gone = tx.send(p.to_string()).is_err();
                }
                let top = if opts.top_n > 0 {
                    tgi_top(t.top)
                } else {
                    Value::Null
                };
                pending = Some(json!({
                    "index": n,
                    "token": tgi_token(t.id, t.text, t.logprob, t.special),
                    "generated_text": null, "details": null, "top_tokens": top,
                }));
                cut = cut_short(&st);
                !gone && !cut
            })
        });
        if stream_ended(&st, &clock, gone || stop.is_cancelled()) {
            return;
        }
        if cut {
            // The tokens made so far, then the reason the stream ends early.
            if let Some(p) = pending {
                let _ = tx.send(p.to_string());
            }
            let err = shut_down();
            let _ = tx.send(json!({"error": err.message, "error_type": "shutdown"}).to_string());
            return;
        }
        match result {
            Ok((out, usage)) => {
                let mut last = pending.unwrap_or_else(|| {
                    json!({"index": 0, "token": null, "generated_text": null, "details": null,
                           "top_tokens": null})
                });
                last["generated_text"] = json!(generated_text(&out));
                if opts.details {
                    last["details"] = tgi_details(&usage, opts.seed);
                }
                let _ = tx.send(last.to_string());
            }
            Err(e) => {
                let err = ApiError::from(e);
                let _ =
                    tx.send(json!({"error": err.message, "error_type": "generation"}).to_string());
            }
        }
    });
    Ok(sse_response(rx, cancel))
}

/// TGI `/generate`: `{inputs, parameters}` (transformers' generation parameters, TGI's `stop`
/// as stop strings) -> `{generated_text}` (new text unless `return_full_text`).
pub(crate) async fn tgi_generate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (index, input, params, opts) = tgi_call(&state, &headers, body, false)?;
    Ok(axum::Json(tgi_whole(&state, index, input, params, opts).await?).into_response())
}

/// TGI's `details` as both routes give them: why generation stopped, how many tokens it made,
/// the seed of a sampled generation.
fn tgi_details(
    usage: &ferroformers::pipelines::text_generation::Usage,
    seed: Option<u64>,
) -> Value {
    json!({
        "finish_reason": if usage.hit_limit {
            "length"
        } else if usage.stop_string {
            "stop_sequence"
        } else {
            "eos_token"
        },
        "generated_tokens": usage.completion_tokens,
        "seed": seed,
    })
}

/// One generation's `details` with its tokens (and their alternatives with `top_n_tokens`).
fn tgi_token_details(g: &Generated, seed: Option<u64>, top_n: usize) -> Value {
    let (_, usage, tokens) = g;
    let mut d = tgi_details(usage, seed);
    d["prefill"] = json!([]);
    d["tokens"] = tokens
        .iter()
        .map(|t| tgi_token(t.id, &t.text, t.logprob, t.special))
        .collect();
    if top_n > 0 {
        d["top_tokens"] = Value::Array(tokens.iter().map(|t| tgi_top(&t.top)).collect());
    }
    d
}

/// Which of TGI's `best_of` candidates it returns: the highest mean log-probability of the
/// generated tokens (in f32, as TGI sums them), the first of equals.
fn tgi_best(done: &[Generated]) -> usize {
    let (mut best, mut max) = (0, f32::MIN);
    for (i, g) in done.iter().enumerate() {
        let mean = g.2.iter().map(|t| t.logprob).sum::<f32>() / g.2.len() as f32;
        if mean > max {
            (best, max) = (i, mean);
        }
    }
    best
}

/// TGI's whole answer: `{generated_text}`, with `details` when asked (why it stopped, how many
/// tokens, each token, and with `top_n_tokens` each token's alternatives).
pub(crate) async fn tgi_whole(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
    opts: TgiOpts,
) -> Result<Value, ApiError> {
    // `details.prefill`: each prompt token decoded alone, with its log-probability after the
    // ones before it (null for the first), as TGI; empty unless asked for.
    let prefill = if opts.details && opts.prefill {
        let tokens = prompt_tokens(state, index, &input, &params, Some(0)).await?;
        tokens
            .iter()
            .map(|t| json!({"id": t.id, "text": t.text, "logprob": t.logprob}))
            .collect()
    } else {
        Vec::new()
    };
    let with_prefill = |mut d: Value| {
        d["prefill"] = Value::Array(prefill.clone());
        d
    };
    if opts.best_of > 1 {
        // TGI's best_of: that many sampled candidates, each with a seed of its own, at once;
        // the most likely per token is the answer, the others its `best_of_sequences`.
        let seeds: Vec<u64> = (0..opts.best_of).map(|_| random_seed()).collect();
        let ps = seeds
            .iter()
            .map(|&s| {
                let mut p = params.clone();
                p.insert("seed".into(), json!(s));
                p
            })
            .collect();
        let done = generate_many(state, index, &input, ps, opts.top_n).await?;
        let best = tgi_best(&done);
        let mut body = json!({"generated_text": generated_text(&done[best].0)});
        if opts.details {
            let mut d = with_prefill(tgi_token_details(
                &done[best],
                Some(seeds[best]),
                opts.top_n,
            ));
            d["best_of_sequences"] = (0..done.len())
                .filter(|&i| i != best)
                .map(|i| {
                    let mut s =
                        with_prefill(tgi_token_details(&done[i], Some(seeds[i]), opts.top_n));
                    s["generated_text"] = json!(generated_text(&done[i].0));
                    s
                })
                .collect();
            body["details"] = d;
        }
        return Ok(body);
    }
    let g = generate_with_tokens(state, index, input, params, opts.top_n).await?;
    let mut body = json!({"generated_text": generated_text(&g.0)});
    if opts.details {
        body["details"] = with_prefill(tgi_token_details(&g, opts.seed, opts.top_n));
    }
    Ok(body)
}
