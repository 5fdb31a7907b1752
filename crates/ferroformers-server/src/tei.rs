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
    let (inputs, _) = inputs_of(v.get("inputs"), state.max_client_batch_size)?;
    let mut params = Params::new();
    let normalize = match v.get("normalize") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(ApiError::validation("`normalize` must be true or false")),
    };
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
    let mut params = Params::new();
    params.insert("top_k".into(), Value::Null);
    if v.get("raw_scores").and_then(Value::as_bool) == Some(true) {
        params.insert("function_to_apply".into(), json!("none"));
    }
    let out = run(&state, index, inputs, params).await?;
    outputs_json(&out, many)
}
