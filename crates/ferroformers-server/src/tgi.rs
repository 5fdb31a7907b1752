//! TGI's routes: `/generate`, `/generate_stream` (an event per token, no `[DONE]`) and its
//! answer to `POST /` on a generation model.

use super::*;

/// TGI's request: the prompt and the pipeline's parameters (`stop` as stop strings; greedy and
/// new text only unless asked), and whether `details` are wanted.
pub(crate) fn tgi_request(v: &Value) -> Result<(Input, Params, TgiOpts), ApiError> {
    tgi_request_with(v, false)
}

/// What a TGI request asks for besides the generation: `details`, and `top_n_tokens`
/// alternatives per token.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TgiOpts {
    pub details: bool,
    pub top_n: usize,
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
pub(crate) fn tgi_request_with(
    v: &Value,
    full_text: bool,
) -> Result<(Input, Params, TgiOpts), ApiError> {
    let input = match v.get("inputs") {
        Some(Value::String(s)) => Input::Text(s.clone()),
        _ => return Err(ApiError::validation("`inputs` must be a string")),
    };
    let mut params = params_of(v)?;
    for (flag, neutral) in [
        ("decoder_input_details", json!(false)),
        ("watermark", json!(false)),
        ("truncate", Value::Null),
        ("best_of", Value::Null),
        ("adapter_id", Value::Null),
        ("grammar", Value::Null),
    ] {
        if let Some(x) = params.remove(flag) {
            if x != neutral && !(flag == "best_of" && x == json!(1)) {
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
    params
        .entry("do_sample".to_string())
        .or_insert(json!(false));
    params
        .entry("return_full_text".to_string())
        .or_insert(json!(full_text));
    let top_n = count_at_most(params.remove("top_n_tokens").as_ref(), "top_n_tokens", 5)?;
    let details = params.remove("details").and_then(|d| d.as_bool()) == Some(true);
    Ok((input, params, TgiOpts { details, top_n }))
}

/// TGI `/generate_stream`: one server-sent event per token (`{index, token: {id, text,
/// logprob, special}, generated_text, details, top_tokens}`), the last one carrying the whole
/// `generated_text` (and `details` when asked); no `[DONE]`.
pub(crate) async fn tgi_generate_stream(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (index, input, params, details) = tgi_call(&state, &headers, body)?;
    Ok(tgi_stream(&state, index, input, params, details))
}

/// A TGI route's request: the served generation model's index, the input, the parameters and
/// what else was asked for.
fn tgi_call(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(usize, Input, Params, TgiOpts), ApiError> {
    let v = json_body(headers, body)?;
    let index = index_of(state, generator(state, None)?);
    let (input, params, details) = tgi_request(&v)?;
    Ok((index, input, params, details))
}

/// The token events of one generation as TGI streams them.
pub(crate) fn tgi_stream(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
    opts: TgiOpts,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut clock = TokenClock::new();
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        // Each token's event waits for the next token, so that the last one can carry the
        // generated text.
        let mut pending: Option<Value> = None;
        let mut n = 0usize;
        let (mut gone, mut cut) = (false, false);
        let result =
            st.models[index]
                .pipe
                .run_streaming_top(&input, &params, opts.top_n, &mut |t| {
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
                });
        if stream_ended(&st, &clock, gone) {
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
                    last["details"] = tgi_details(&usage);
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
    sse_response(rx)
}

/// TGI `/generate`: `{inputs, parameters}` (transformers' generation parameters, TGI's `stop`
/// as stop strings) -> `{generated_text}` (new text unless `return_full_text`).
pub(crate) async fn tgi_generate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (index, input, params, opts) = tgi_call(&state, &headers, body)?;
    Ok(axum::Json(tgi_whole(&state, index, input, params, opts).await?).into_response())
}

/// TGI's `details` as both routes give them: why generation stopped, how many tokens it made.
fn tgi_details(usage: &ferroformers::pipelines::text_generation::Usage) -> Value {
    json!({
        "finish_reason": if usage.hit_limit { "length" } else { "eos_token" },
        "generated_tokens": usage.completion_tokens,
        "seed": null,
    })
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
    let (out, usage, tokens) =
        generate_with_tokens(state, index, input, params, opts.top_n).await?;
    let mut body = json!({"generated_text": generated_text(&out)});
    if opts.details {
        let mut d = tgi_details(&usage);
        d["prefill"] = json!([]);
        d["tokens"] = tokens
            .iter()
            .map(|t| tgi_token(t.id, &t.text, t.logprob, t.special))
            .collect();
        if opts.top_n > 0 {
            d["top_tokens"] = Value::Array(tokens.iter().map(|t| tgi_top(&t.top)).collect());
        }
        body["details"] = d;
    }
    Ok(body)
}
