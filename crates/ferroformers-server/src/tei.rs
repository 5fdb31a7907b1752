//! TEI's routes: `/embed` and `/predict`.

use super::*;

/// The embedding model to use: the named one or the first that embeds.
pub(crate) fn embedder<'a>(state: &'a AppState, id: Option<&str>) -> Result<&'a Served, ApiError> {
    let m = match id {
        Some(id) => model_for(state, id, "sentence-embeddings")?,
        None => state
            .models
            .iter()
            .find(|m| m.task == "sentence-embeddings")
            .unwrap_or(&state.models[0]),
    };
    if m.task != "sentence-embeddings" {
        return Err(ApiError::validation(format!(
            "`{}` is a {} model, not an embedding model (serve it as ID=sentence-embeddings)",
            m.id, m.task
        )));
    }
    Ok(m)
}

pub(crate) fn embeddings_of(out: Vec<Output>) -> Result<Vec<Vec<f32>>, ApiError> {
    out.into_iter()
        .map(|o| match o {
            Output::Embedding(v) => Ok(v),
            other => Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Backend",
                format!("the pipeline gave {other:?}, not an embedding"),
            )),
        })
        .collect()
}

/// TEI `/embed`: `{inputs, normalize (true), truncate}` -> one vector per input.
pub(crate) async fn tei_embed(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let m = embedder(&state, None)?;
    let index = index_of(&state, m);
    // As TEI: texts or token ids.
    let inputs = texts_or_ids(v.get("inputs"), "inputs", state.max_client_batch_size)?;
    unsupported_options(&v)?;
    check_lengths(&state, m, &v, &inputs)?;
    let mut params = Params::new();
    let normalize = flag(&v, "normalize", true)?;
    params.insert("normalize".into(), json!(normalize));
    let out = run(&state, index, inputs, params).await?;
    Ok(axum::Json(embeddings_of(out)?).into_response())
}

/// TEI `/predict`: `{inputs, raw_scores}` -> every label with its score, best first; a list of
/// those for a list of inputs.
pub(crate) async fn tei_predict(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let m = state
        .models
        .iter()
        .find(|m| m.task == "text-classification")
        .ok_or_else(|| ApiError::validation("no text-classification model is served"))?;
    let index = index_of(&state, m);
    // TEI: a pair is a two-string list; a list of pairs (or of strings) is a batch.
    let raw = v
        .get("inputs")
        .ok_or_else(|| ApiError::validation("missing field `inputs`"))?;
    let as_input = |x: &Value| -> Option<Value> {
        match x {
            Value::String(_) => Some(x.clone()),
            Value::Array(p) if p.len() == 2 && p.iter().all(Value::is_string) => {
                Some(json!({"text": p[0], "text_pair": p[1]}))
            }
            _ => None,
        }
    };
    let (items, many) = match raw {
        Value::Array(a) if a.iter().all(Value::is_string) && a.len() == 2 => {
            // ["a", "b"]: TEI reads a batch of two texts.
            (a.clone(), true)
        }
        Value::Array(a) => (a.clone(), true),
        other => (vec![other.clone()], false),
    };
    let items = items
        .iter()
        .map(|x| as_input(x).ok_or_else(|| ApiError::validation("each input is a text or a pair")))
        .collect::<Result<Vec<_>, _>>()?;
    let (inputs, _) = inputs_of(Some(&Value::Array(items)), state.max_client_batch_size)?;
    unsupported_options(&v)?;
    check_lengths(&state, m, &v, &inputs)?;
    let mut params = Params::new();
    params.insert("top_k".into(), Value::Null);
    if v.get("raw_scores").and_then(Value::as_bool) == Some(true) {
        params.insert("function_to_apply".into(), json!("none"));
    }
    let out = run(&state, index, inputs, params).await?;
    outputs_json(&out, many)
}

/// A boolean field of the body: `default` when absent or null.
fn flag(v: &Value, name: &str, default: bool) -> Result<bool, ApiError> {
    match v.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(ApiError::validation(format!(
            "`{name}` must be true or false"
        ))),
    }
}

/// TEI's `truncate` in `v` (absent or null -> `--auto-truncate`): when false, an input longer
/// than the model's limit is refused with 422 naming the limit, instead of cut.
pub(crate) fn check_lengths(
    state: &AppState,
    m: &Served,
    v: &Value,
    inputs: &[Input],
) -> Result<(), ApiError> {
    let truncate = flag(v, "truncate", state.auto_truncate)?;
    let (Some(max), Some(tok), false) = (m.max_input, m.tokenizer.as_ref(), truncate) else {
        return Ok(());
    };
    for (i, input) in inputs.iter().enumerate() {
        let n = match input {
            Input::Text(t) => tok.untruncated_len(t, None),
            Input::TextPair { text, text_pair } => tok.untruncated_len(text, Some(text_pair)),
            Input::Tokens(ids) => Ok(ids.len()),
            _ => continue,
        }
        .map_err(|e| ApiError::validation(format!("tokenization failed: {e}")))?;
        if n > max {
            return Err(ApiError::validation(format!(
                "input {i} has {n} tokens, more than the model's limit of {max}: shorten it, \
                 or send `truncate: true` to cut it"
            )));
        }
    }
    Ok(())
}

/// TEI's request options that change what is computed and that this server does not offer:
/// a `prompt_name` (sentence-transformers prompts) and left truncation.
fn unsupported_options(v: &Value) -> Result<(), ApiError> {
    if !matches!(v.get("prompt_name"), None | Some(Value::Null)) {
        return Err(ApiError::validation(
            "`prompt_name` is not supported: prepend the prompt to the text",
        ));
    }
    match v.get("truncation_direction") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(d)) if d.eq_ignore_ascii_case("right") => Ok(()),
        Some(other) => Err(ApiError::validation(format!(
            "`truncation_direction` {other} is not supported: inputs are truncated on the right"
        ))),
    }
}

/// A list of strings of 1 to `max_client_batch_size` items (`what` names the field).
fn texts(v: Option<&Value>, what: &str, max: usize) -> Result<Vec<String>, ApiError> {
    let items = match v {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => {
            return Err(ApiError::validation(format!("missing field `{what}`")))
        }
        Some(_) => {
            return Err(ApiError::validation(format!(
                "`{what}` must be a list of strings"
            )))
        }
    };
    if items.is_empty() {
        return Err(ApiError::validation(format!("`{what}` cannot be empty")));
    }
    if items.len() > max {
        return Err(too_many(items.len(), max));
    }
    items
        .iter()
        .map(|x| {
            x.as_str()
                .map(str::to_string)
                .ok_or_else(|| ApiError::validation(format!("`{what}` must be a list of strings")))
        })
        .collect()
}

/// TEI `/embed_all`: `{inputs}` -> for each input, every token's last hidden state (special
/// tokens included, no pooling, not normalized), cut at the model's limit.
pub(crate) async fn tei_embed_all(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    unsupported_options(&v)?;
    let m = embedder(&state, None)?;
    let index = index_of(&state, m);
    let inputs = texts_or_ids(v.get("inputs"), "inputs", state.max_client_batch_size)?;
    check_lengths(&state, m, &v, &inputs)?;
    let mut params = Params::new();
    params.insert("pooling".into(), json!("none"));
    let out = run(&state, index, inputs, params).await?;
    let tokens = out
        .into_iter()
        .map(|o| match o {
            Output::Features(mut f) if f.len() == 1 => Ok(f.remove(0)),
            other => Err(ApiError::backend(format!(
                "the pipeline gave {other:?}, not token embeddings"
            ))),
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(axum::Json(tokens).into_response())
}

/// TEI `/similarity`: `{inputs: {source_sentence, sentences}, parameters}` -> the cosine
/// similarity of the source sentence's embedding to each sentence's.
pub(crate) async fn tei_similarity(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let p = v.get("parameters").filter(|p| !p.is_null());
    if let Some(p) = p {
        if !p.is_object() {
            return Err(ApiError::validation("`parameters` must be an object"));
        }
        unsupported_options(p)?;
    }
    let m = embedder(&state, None)?;
    let scores = similarity_scores(&state, m, v.get("inputs"), p).await?;
    Ok(axum::Json(scores).into_response())
}

/// The cosine similarity of `inputs.source_sentence`'s embedding (model `m`'s, normalized) to
/// each of `inputs.sentences`' (TEI's `/similarity`, and the Inference API's
/// sentence-similarity input on an embedding model).
pub(crate) async fn similarity_scores(
    state: &Arc<AppState>,
    m: &Served,
    inputs: Option<&Value>,
    p: Option<&Value>,
) -> Result<Vec<f32>, ApiError> {
    let index = index_of(state, m);
    let inputs = inputs.filter(|i| i.is_object()).ok_or_else(|| {
        ApiError::validation("`inputs` must be an object {source_sentence, sentences}")
    })?;
    let source = inputs
        .get("source_sentence")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::validation("`inputs.source_sentence` must be a string"))?;
    let max = state.max_client_batch_size;
    let sentences = texts(inputs.get("sentences"), "inputs.sentences", max)?;
    // The source sentence counts towards the batch, as in TEI.
    if sentences.len() + 1 > max {
        return Err(too_many(sentences.len() + 1, max));
    }
    let all: Vec<Input> = std::iter::once(source.to_string())
        .chain(sentences)
        .map(Input::Text)
        .collect();
    check_lengths(state, m, p.unwrap_or(&Value::Null), &all)?;
    let mut params = Params::new();
    params.insert("normalize".into(), json!(true));
    let vecs = embeddings_of(run(state, index, all, params).await?)?;
    Ok(vecs[1..]
        .iter()
        .map(|v| v.iter().zip(&vecs[0]).map(|(a, b)| a * b).sum())
        .collect())
}

/// The model `/rerank` uses: the first text-classification model with one label (a
/// cross-encoder).
fn reranker(state: &AppState) -> Result<&Served, ApiError> {
    let mut classifiers = state
        .models
        .iter()
        .filter(|m| m.task == "text-classification");
    let first = classifiers.clone().next();
    match (classifiers.find(|m| m.num_labels == 1), first) {
        (Some(m), _) => Ok(m),
        (None, Some(m)) => Err(ApiError::validation(format!(
            "`{}` has {} labels: it is not a re-ranker (a cross-encoder with one label)",
            m.id, m.num_labels
        ))),
        (None, None) => Err(ApiError::validation(
            "no re-ranker is served (a text-classification model with one label)",
        )),
    }
}

/// TEI `/rerank`: `{query, texts, raw_scores, return_text}` -> `[{index, score, text?}]`,
/// best first: the cross-encoder's score of each (query, text) pair, through a sigmoid unless
/// `raw_scores`.
pub(crate) async fn tei_rerank(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    unsupported_options(&v)?;
    let raw_scores = flag(&v, "raw_scores", false)?;
    let return_text = flag(&v, "return_text", false)?;
    let query = v
        .get("query")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::validation("`query` must be a string"))?;
    let texts = texts(v.get("texts"), "texts", state.max_client_batch_size)?;
    let m = reranker(&state)?;
    let index = index_of(&state, m);
    let inputs: Vec<Input> = texts
        .iter()
        .map(|t| Input::TextPair {
            text: query.to_string(),
            text_pair: t.clone(),
        })
        .collect();
    check_lengths(&state, m, &v, &inputs)?;
    let mut params = Params::new();
    let f = if raw_scores { "none" } else { "sigmoid" };
    params.insert("function_to_apply".into(), json!(f));
    let out = run(&state, index, inputs, params).await?;
    let mut ranks = Vec::with_capacity(out.len());
    for (i, o) in out.into_iter().enumerate() {
        let score = match o {
            Output::Label(l) => l.score as f32,
            Output::Labels(l) if !l.is_empty() => l[0].score as f32,
            other => {
                return Err(ApiError::backend(format!(
                    "the pipeline gave {other:?}, not a score"
                )))
            }
        };
        if score.is_nan() {
            return Err(ApiError::backend("score is NaN"));
        }
        ranks.push((i, score));
    }
    // Best first; equal scores keep their order.
    ranks.sort_by(|a, b| b.1.total_cmp(&a.1));
    let body: Vec<Value> = ranks
        .into_iter()
        .map(|(i, score)| {
            let mut r = json!({"index": i, "score": score});
            if return_text {
                r["text"] = json!(texts[i]);
            }
            r
        })
        .collect();
    Ok(axum::Json(body).into_response())
}

/// The tokenizer `/tokenize` and `/decode` use: the body `model`'s, else the first model's.
fn tokenizer_of<'a>(
    state: &'a AppState,
    v: &Value,
) -> Result<&'a ferroformers::tokenizer::Tokenizer, ApiError> {
    let id = match v.get("model") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(ApiError::validation("`model` must be a string")),
    };
    let m = model(state, id)?;
    m.tokenizer.as_ref().ok_or_else(|| {
        ApiError::validation(format!("`{}` has no tokenizer this server can read", m.id))
    })
}

/// TEI `/tokenize`: `{inputs, add_special_tokens (true)}` -> for each input, its tokens
/// `{id, text, special, start, stop}` (byte offsets into the input; special tokens have their
/// own text and no offsets), not truncated.
pub(crate) async fn tei_tokenize(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    unsupported_options(&v)?;
    let tok = tokenizer_of(&state, &v)?;
    let add_special = flag(&v, "add_special_tokens", true)?;
    let inputs = match v.get("inputs") {
        Some(Value::String(s)) => vec![s.clone()],
        other => texts(other, "inputs", state.max_client_batch_size)?,
    };
    let tokenized = inputs
        .iter()
        .map(|input| {
            let tokens = tok
                .tokens(input, add_special)
                .map_err(|e| ApiError::validation(format!("tokenization failed: {e}")))?;
            Ok(tokens
                .into_iter()
                .map(|t| {
                    json!({"id": t.id, "text": t.text, "special": t.special,
                           "start": t.start, "stop": t.stop})
                })
                .collect::<Vec<_>>())
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(axum::Json(tokenized).into_response())
}

/// TEI `/decode`: `{ids: [..] | [[..], ..], skip_special_tokens (true)}` -> one text per list
/// of ids, as the tokenizer's decoder gives it.
pub(crate) async fn tei_decode(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let tok = tokenizer_of(&state, &v)?;
    let skip = flag(&v, "skip_special_tokens", true)?;
    let bad = || ApiError::validation("`ids` must be a list of token ids or a list of such lists");
    let id_list = |x: &Value| -> Result<Vec<u32>, ApiError> {
        x.as_array()
            .ok_or_else(bad)?
            .iter()
            .map(|i| {
                i.as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(bad)
            })
            .collect()
    };
    let lists = match v.get("ids") {
        None | Some(Value::Null) => return Err(ApiError::validation("missing field `ids`")),
        Some(Value::Array(a)) if !a.is_empty() && a.iter().all(Value::is_array) => {
            if a.len() > state.max_client_batch_size {
                return Err(too_many(a.len(), state.max_client_batch_size));
            }
            a.iter().map(id_list).collect::<Result<Vec<_>, _>>()?
        }
        Some(x) => vec![id_list(x)?],
    };
    let decoded = lists
        .iter()
        .map(|ids| {
            tok.decode_raw(ids, skip)
                .map_err(|e| ApiError::validation(format!("decoding failed: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(axum::Json(decoded).into_response())
}
