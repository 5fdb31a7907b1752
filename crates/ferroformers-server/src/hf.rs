//! The HF Inference API: `POST /`, `/models/{id}` and `/models/{id}/pipeline/{task}` with
//! `{inputs, parameters}`, answered with the pipeline's own output; for speech recognition also
//! an audio file's bytes as the body (`Content-Type: audio/*` or `application/octet-stream`).

use super::*;

pub(crate) async fn inference(
    state: Arc<AppState>,
    id: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    if is_audio_body(&headers) {
        return inference_audio(&state, id.as_deref(), body).await;
    }
    let v = json_body(&headers, body)?;
    let m = model(&state, id.as_deref())?;
    let index = index_of(&state, m);
    if m.task == "text-generation" && v.get("inputs").is_some_and(Value::is_string) {
        // TGI's `POST /`: its parameters, `stream` for token events, else the Inference
        // API's `[{generated_text}]` (full text unless `return_full_text` is false).
        let stream = v.get("stream").and_then(Value::as_bool) == Some(true);
        let (input, params, opts) = tgi_request_with(&v, true, state.max_best_of, stream)?;
        if stream {
            return tgi_stream(&state, index, input, params, opts).await;
        }
        let whole = tgi_whole(&state, index, input, params, opts).await?;
        return Ok(axum::Json(json!([whole])).into_response());
    }
    if m.task == "sentence-embeddings"
        && v.get("inputs")
            .is_some_and(|i| i.get("source_sentence").is_some())
    {
        // The Inference API's sentence-similarity input on an embedding model (what
        // `InferenceClient.sentence_similarity` sends): the scores, as TEI's `/similarity`.
        let p = v.get("parameters").filter(|p| !p.is_null());
        if p.is_some_and(|p| !p.is_object()) {
            return Err(ApiError::validation("`parameters` must be an object"));
        }
        let scores = similarity_scores(&state, m, v.get("inputs"), p).await?;
        return Ok(axum::Json(scores).into_response());
    }
    let (inputs, many) = if m.speech.is_some() {
        speech_inputs(v.get("inputs"), state.max_client_batch_size)?
    } else {
        inputs_of(v.get("inputs"), state.max_client_batch_size)?
    };
    let mut params = params_of(&v)?;
    // The Inference API's text-to-text tasks nest the generation options in
    // `generate_parameters` (what `InferenceClient.summarization` and `.translation` send):
    // they are the pipeline's own parameters.
    match params.remove("generate_parameters") {
        None | Some(Value::Null) => {}
        Some(Value::Object(g)) => {
            for (k, x) in g {
                if params.contains_key(&k) {
                    return Err(ApiError::validation(format!(
                        "`{k}` is in both `parameters` and `parameters.generate_parameters`"
                    )));
                }
                params.insert(k, x);
            }
        }
        Some(_) => {
            return Err(ApiError::validation(
                "`parameters.generate_parameters` must be an object",
            ))
        }
    }
    let out = run(&state, index, inputs, params).await?;
    api_json(&m.task, &out, many)
}

/// The pipeline's outputs as the Inference API answers them (what `InferenceClient` parses):
/// the pipeline's own JSON, except text-classification, a list of labels per input, nested in
/// a list also for one input (`[[{label, score}]]`), and zero-shot-classification, a list of
/// `{label, score}` per input, best first, in place of the pipeline's `{sequence, labels,
/// scores}`.
fn api_json(task: &str, out: &[Output], many: bool) -> Result<Response, ApiError> {
    let classification = task == "text-classification";
    if !classification && task != "zero-shot-classification" {
        return outputs_json(out, many);
    }
    let each = |o: &Output| -> Result<Value, ApiError> {
        let v = serde_json::to_value(o).map_err(ApiError::backend)?;
        if classification {
            return Ok(if v.is_object() { json!([v]) } else { v });
        }
        Ok(match (v.get("labels"), v.get("scores")) {
            (Some(Value::Array(labels)), Some(Value::Array(scores))) => labels
                .iter()
                .zip(scores)
                .map(|(label, score)| json!({"label": label, "score": score}))
                .collect(),
            _ => v,
        })
    };
    let body = if many {
        Value::Array(out.iter().map(each).collect::<Result<_, _>>()?)
    } else if classification {
        json!([each(&out[0])?])
    } else {
        each(&out[0])?
    };
    Ok(axum::Json(body).into_response())
}

/// An audio file's bytes as the body (what `InferenceClient.automatic_speech_recognition`
/// sends): the named model, or on `POST /` the first speech-recognition model, with the
/// pipeline's defaults; `{"text"}` as the Inference API answers.
async fn inference_audio(
    state: &Arc<AppState>,
    id: Option<&str>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body_bytes(body)?;
    let m = match id {
        Some(id) => model(state, Some(id))?,
        None => state
            .models
            .iter()
            .find(|m| m.speech.is_some())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "an audio body needs a speech-recognition model, and none is served",
                )
            })?,
    };
    if m.speech.is_none() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!(
                "`{}` is a {} model: audio bodies are for speech-recognition models (send                  `Content-Type: application/json` with {{inputs, parameters}})",
                m.id, m.task
            ),
        ));
    }
    if body.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            "the body is empty: send the audio file's bytes",
        ));
    }
    let index = index_of(state, m);
    let out = run(
        state,
        index,
        vec![Input::AudioBytes(body.to_vec())],
        Params::new(),
    )
    .await?;
    outputs_json(&out, false)
}

pub(crate) async fn inference_default(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    inference(state, None, headers, body).await
}

/// `/models/{id}` and `/models/{id}/pipeline/{task}` (the task must be the model's).
pub(crate) async fn inference_model(
    State(state): State<Arc<AppState>>,
    UrlPath(path): UrlPath<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let (id, task) = match path.split_once("/pipeline/") {
        Some((id, task)) => (id.to_string(), Some(task.to_string())),
        None => (path, None),
    };
    if let Some(task) = task {
        let m = model(&state, Some(&id))?;
        let canonical = ferroformers::pipelines::registry::lookup(&task).map(|t| t.name);
        // A sentence-transformers model answers the Inference API's `feature-extraction` with
        // its sentence embeddings, as the hosted API does for such models.
        let embeds = m.task == "sentence-embeddings"
            && canonical.as_deref().ok() == Some("feature-extraction");
        if canonical.ok() != Some(m.task.as_str()) && !embeds {
            return Err(ApiError::validation(format!(
                "`{id}` serves {}, not {task}",
                m.task
            )));
        }
    }
    inference(state, Some(id), headers, body).await
}
