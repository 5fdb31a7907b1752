//! OpenAI's routes as vLLM and llama.cpp implement them: chat and text completions (whole or
//! streamed as server-sent events ending in `[DONE]`), embeddings, the model list.

use super::*;

/// OpenAI's `logprobs.content` entry for token `id`, with its `top_logprobs` alternatives;
/// where the token is among them it has its own `text` there too.
pub(crate) fn logprob_entry(
    id: u32,
    text: &str,
    logprob: f32,
    top: &[ferroformers::pipelines::text_generation::TopToken],
) -> Value {
    let top: Vec<Value> = top
        .iter()
        .map(|t| {
            let alt = if t.id == id { text } else { &t.text };
            json!({"token": alt, "logprob": t.logprob, "bytes": alt.as_bytes()})
        })
        .collect();
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes(), "top_logprobs": top})
}

/// One token of a completion's legacy log-probabilities: its text, its log-probability and
/// its alternatives (`{text: logprob}`); both `None` for an echoed prompt's first token, which
/// follows nothing (vLLM's nulls).
type LegacyToken = (String, Option<f32>, Option<Value>);

/// A scored token as a [`LegacyToken`]: its most likely alternatives with the token itself
/// among them (as OpenAI: up to N + 1 entries), the token keyed by its own `text`.
fn legacy_token(
    id: u32,
    text: &str,
    logprob: f32,
    top: &[ferroformers::pipelines::text_generation::TopToken],
) -> LegacyToken {
    let mut alts = serde_json::Map::new();
    for t in top {
        let key = if t.id == id { text } else { &t.text };
        alts.entry(key.to_string()).or_insert(json!(t.logprob));
    }
    if !top.iter().any(|t| t.id == id) {
        alts.entry(text.to_string()).or_insert(json!(logprob));
    }
    (text.to_string(), Some(logprob), Some(Value::Object(alts)))
}

/// An echoed prompt's tokens as [`LegacyToken`]s: each with the text it adds to the prompt.
/// `n`: the alternatives asked for (the tokens may hold more, scored for `prompt_logprobs`).
fn prompt_legacy(
    tokens: &[ferroformers::pipelines::text_generation::PromptToken],
    n: usize,
) -> Vec<LegacyToken> {
    tokens
        .iter()
        .map(|t| match t.logprob {
            Some(lp) => legacy_token(t.id, &t.piece, lp, &t.top[..n.min(t.top.len())]),
            None => (t.piece.clone(), None, None),
        })
        .collect()
}

/// vLLM's `prompt_logprobs`: per prompt token `null` for the first, then `{id: {logprob, rank,
/// decoded_token}}` for the token and its `n` most likely alternatives there.
fn vllm_prompt_logprobs(
    tokens: &[ferroformers::pipelines::text_generation::PromptToken],
    n: usize,
) -> Value {
    tokens
        .iter()
        .map(|t| match (t.logprob, t.rank) {
            (Some(lp), Some(rank)) => {
                let mut m = serde_json::Map::new();
                m.insert(
                    t.id.to_string(),
                    json!({"logprob": lp, "rank": rank, "decoded_token": t.text}),
                );
                for (k, alt) in t.top.iter().take(n).enumerate() {
                    m.entry(alt.id.to_string()).or_insert(
                        json!({"logprob": alt.logprob, "rank": k + 1, "decoded_token": alt.text}),
                    );
                }
                Value::Object(m)
            }
            _ => Value::Null,
        })
        .collect()
}

/// A completion's log-probabilities in OpenAI's legacy shape: per token its text, its
/// log-probability, its alternatives, and where its text starts in the completion, in
/// characters from `offset`.
fn legacy_logprobs(tokens: &[LegacyToken], offset: usize) -> Value {
    let mut at = offset;
    let (mut texts, mut lps, mut tops, mut offsets) = (vec![], vec![], vec![], vec![]);
    for (text, lp, top) in tokens {
        texts.push(json!(text));
        lps.push(json!(lp));
        tops.push(top.clone().unwrap_or(Value::Null));
        offsets.push(json!(at));
        at += text.chars().count();
    }
    json!({"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets})
}

/// A boolean field of the body (absent or null: false).
fn bool_field(v: &Value, k: &str) -> Result<bool, ApiError> {
    match v.get(k) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(x) => {
            Err(ApiError::validation(format!("`{k}` must be true or false, got {x}")).with_param(k))
        }
    }
}

/// The stop strings of a request's parameters (`stop`).
fn stops_of(params: &Params) -> Vec<String> {
    params
        .get("stop_strings")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Where the first of `stops` starts in `text` (searched from byte `from`), and where it ends.
fn first_stop(text: &str, from: usize, stops: &[String]) -> Option<(usize, usize)> {
    stops
        .iter()
        .filter_map(|s| {
            text[from..]
                .find(s.as_str())
                .map(|i| (from + i, from + i + s.len()))
        })
        .min()
}

/// The largest char boundary of `text` at or before `i`.
fn floor_boundary(text: &str, mut i: usize) -> usize {
    i = i.min(text.len());
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// A generation's text as OpenAI returns it: cut before its first stop string (the pipeline,
/// as transformers' `stop_strings`, keeps it; OpenAI and vLLM do not), and whether one was
/// there (then `finish_reason` is `stop`, as vLLM says even when it came with the last token
/// allowed; TGI says `length` then).
/// With `keep` (vLLM's `include_stop_str_in_output`) the text is cut after it instead.
fn without_stop(text: String, stops: &[String], keep: bool) -> (String, bool) {
    match first_stop(&text, 0, stops) {
        Some((i, end)) => (text[..if keep { end } else { i }].to_string(), true),
        None => (text, false),
    }
}

/// A streamed generation's text as OpenAI streams it: text that may be the start of a stop
/// string is held back until the next pieces show it is not (vLLM's stop buffer), and nothing
/// from a stop string on is sent.
struct StopHold<'a> {
    stops: &'a [String],
    /// The stop string itself goes out (`include_stop_str_in_output`).
    keep: bool,
    /// Bytes held back: the longest stop string's, less one.
    hold: usize,
    text: String,
    sent: usize,
    stopped: bool,
}

impl<'a> StopHold<'a> {
    fn new(stops: &'a [String], keep: bool) -> Self {
        let hold = stops.iter().map(String::len).max().unwrap_or(1) - 1;
        StopHold {
            stops,
            keep,
            hold,
            text: String::new(),
            sent: 0,
            stopped: false,
        }
    }

    /// Add a piece; the text that can go out now.
    fn push(&mut self, piece: &str) -> String {
        if self.stopped {
            return String::new();
        }
        self.text.push_str(piece);
        if self.stops.is_empty() {
            self.sent = self.text.len();
            return piece.to_string();
        }
        // A stop string that ends in the new piece starts at most `hold` bytes before it.
        let from = floor_boundary(&self.text, self.sent.saturating_sub(self.hold));
        let end = match first_stop(&self.text, from, self.stops) {
            Some((i, end)) => {
                self.stopped = true;
                (if self.keep { end } else { i }).max(self.sent)
            }
            None => {
                floor_boundary(&self.text, self.text.len().saturating_sub(self.hold)).max(self.sent)
            }
        };
        let out = self.text[self.sent..end].to_string();
        self.sent = end;
        out
    }

    /// What is still held back once the generation has ended.
    fn finish(&mut self) -> String {
        let rest = if self.stopped {
            String::new()
        } else {
            self.text[self.sent..].to_string()
        };
        self.sent = self.text.len();
        rest
    }
}

/// An echoed prompt (`echo`): its text (a text prompt as given; token ids decoded) and its
/// tokens, scored when log-probabilities were asked for.
struct Echo {
    text: String,
    tokens: Vec<ferroformers::pipelines::text_generation::PromptToken>,
}

/// The prompts to echo, scored with `top` alternatives per token when `logprobs` is set.
async fn echo_prompts(
    state: &Arc<AppState>,
    index: usize,
    inputs: &[Input],
    params: &Params,
    logprobs: Option<usize>,
) -> Result<Vec<Echo>, ApiError> {
    let mut echoes = Vec::with_capacity(inputs.len());
    for input in inputs {
        let tokens = prompt_tokens(state, index, input, params, logprobs).await?;
        let text = match input {
            Input::Text(s) => s.clone(),
            _ => tokens.iter().map(|t| t.piece.as_str()).collect(),
        };
        echoes.push(Echo { text, tokens });
    }
    Ok(echoes)
}

/// The body's `model`: absent or null (the default), else a string.
fn model_name(v: &Value) -> Result<Option<&str>, ApiError> {
    match v.get("model") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(x) => Err(
            ApiError::validation(format!("`model` must be a string, got {x}")).with_param("model"),
        ),
    }
}

/// OpenAI `/v1/embeddings`: `{input, model, encoding_format}`.
pub(crate) async fn openai_embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let inner = async {
        let v = json_body(&headers, body)?;
        let m = embedder(&state, model_name(&v)?)?;
        let index = index_of(&state, m);
        // Strings or token ids (run as given, as vLLM), at most `--max-client-batch-size`.
        let inputs = texts_or_ids(v.get("input"), "input", state.max_client_batch_size)?;
        let base64 = match v.get("encoding_format") {
            None | Some(Value::Null) => false,
            Some(Value::String(f)) if f == "float" => false,
            Some(Value::String(f)) if f == "base64" => true,
            Some(other) => {
                return Err(ApiError::validation(format!(
                    "`encoding_format` is float or base64, not {other}"
                ))
                .with_param("encoding_format"))
            }
        };
        // `dimensions` (OpenAI's shortened embeddings): only the model's own size is served,
        // as vLLM answers for a model without Matryoshka training (checked before any work
        // once the size is known, else after the first computation).
        let dimensions = match v.get("dimensions") {
            None | Some(Value::Null) => None,
            Some(d) => match d.as_u64().filter(|&d| d >= 1) {
                Some(d) => Some(d as usize),
                None => {
                    return Err(ApiError::validation(format!(
                        "`dimensions` must be a whole number >= 1, got {d}"
                    ))
                    .with_param("dimensions"))
                }
            },
        };
        let wrong_size = |d: usize, have: usize| {
            ApiError::validation(format!(
                "`dimensions` {d} is not served: this model's embeddings have {have} dimensions"
            ))
            .with_param("dimensions")
        };
        if let (Some(d), Some(&have)) = (dimensions, m.embedding_size.get()) {
            if d != have {
                return Err(wrong_size(d, have));
            }
        }
        let tokens: usize = inputs
            .iter()
            .map(|x| match (x, &m.tokenizer) {
                (Input::Tokens(ids), _) => ids.len(),
                (Input::Text(s), Some(t)) => t.encode(s, None).map(|e| e.len()).unwrap_or(0),
                _ => 0,
            })
            .sum();
        // As TEI's OpenAI route: over-long inputs follow `--auto-truncate`.
        check_lengths(&state, m, &Value::Null, &inputs)?;
        let mut params = Params::new();
        params.insert("normalize".into(), json!(true));
        let vecs = embeddings_of(run(&state, index, inputs, params).await?)?;
        if let Some(have) = vecs.first().map(Vec::len) {
            let _ = m.embedding_size.set(have);
            if let Some(d) = dimensions.filter(|&d| d != have) {
                return Err(wrong_size(d, have));
            }
        }
        let data: Vec<Value> = vecs
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let embedding = if base64 {
                    let bytes: Vec<u8> = e.iter().flat_map(|x| x.to_le_bytes()).collect();
                    json!(base64_encode(&bytes))
                } else {
                    json!(e)
                };
                json!({"object": "embedding", "embedding": embedding, "index": i})
            })
            .collect();
        Ok(axum::Json(json!({
            "object": "list",
            "data": data,
            "model": m.id,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }))
        .into_response())
    };
    inner.await.map_err(ApiError::openai)
}

pub(crate) async fn openai_models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "ferroformers"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// OpenAI's sampling fields as generation parameters: `max_tokens` (or
/// `max_completion_tokens`; default 256, or what the context window has left) ->
/// `max_new_tokens`, `temperature` (default 1; 0 means
/// greedy), `top_p`, `seed`, `stop` (a string or a list) -> `stop_strings`,
/// `frequency_penalty`, `presence_penalty` and `logit_bias` as vLLM applies them, and vLLM's
/// extra fields `top_k` (-1 or 0: all), `min_p`, `repetition_penalty` and `min_tokens`.
/// Fields whose meaning this server does not implement (`suffix`, `tools`, a
/// `response_format` other than text) are refused, never ignored.
pub(crate) fn openai_params(v: &Value) -> Result<Params, ApiError> {
    let mut p = Params::new();
    let num = |k: &str| -> Result<Option<f64>, ApiError> {
        match v.get(k) {
            None | Some(Value::Null) => Ok(None),
            Some(x) => x
                .as_f64()
                .map(Some)
                .ok_or_else(|| ApiError::validation(format!("`{k}` must be a number"))),
        }
    };
    // Absent: the pipeline's default (256), cut to what the context window has left.
    // 0 with `echo` (vLLM): the prompt alone, nothing generated.
    let echo = v.get("echo") == Some(&Value::Bool(true));
    if let Some(max) = num("max_completion_tokens")?.or(num("max_tokens")?) {
        if max.fract() != 0.0 || max < 0.0 || (max == 0.0 && !echo) {
            return Err(ApiError::validation(
                "`max_tokens` must be a whole number >= 1 (0 only with `echo`)",
            )
            .with_param("max_tokens"));
        }
        if max > 0.0 {
            p.insert("max_new_tokens".into(), json!(max as u64));
        }
    }
    let temperature = num("temperature")?.unwrap_or(1.0);
    if temperature < 0.0 {
        return Err(ApiError::validation("`temperature` must be >= 0"));
    }
    if temperature == 0.0 {
        p.insert("do_sample".into(), json!(false));
    } else {
        p.insert("do_sample".into(), json!(true));
        p.insert("temperature".into(), json!(temperature));
        if let Some(t) = num("top_p")? {
            p.insert("top_p".into(), json!(t));
        }
        // OpenAI samples from the whole vocabulary; transformers' default is top_k 50.
        p.insert("top_k".into(), json!(0));
    }
    match v.get("seed") {
        None | Some(Value::Null) => {}
        Some(x) => match x.as_u64() {
            Some(seed) => {
                p.insert("seed".into(), json!(seed));
            }
            None => {
                return Err(ApiError::validation(format!(
                    "`seed` must be a whole number from 0 to 2^64 - 1, got {x}"
                ))
                .with_param("seed"))
            }
        },
    }
    match v.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => {
            p.insert("stop_strings".into(), json!([s]));
        }
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => {
            if !a.is_empty() {
                p.insert("stop_strings".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => {
            return Err(ApiError::validation(
                "`stop` must be a string or a list of strings",
            ))
        }
    }
    for (field, to) in [
        ("frequency_penalty", "frequency_penalty"),
        ("presence_penalty", "presence_penalty"),
        ("repetition_penalty", "repetition_penalty"),
        ("min_p", "min_p"),
    ] {
        if let Some(x) = num(field)? {
            p.insert(to.into(), json!(x));
        }
    }
    if let Some(k) = num("top_k")? {
        if k.fract() != 0.0 || k < -1.0 {
            return Err(ApiError::validation(
                "`top_k` must be a whole number, -1 or 0 for all tokens",
            ));
        }
        if temperature != 0.0 {
            p.insert("top_k".into(), json!(k.max(0.0) as u64));
        }
    }
    if let Some(n) = num("min_tokens")? {
        if n.fract() != 0.0 || n < 0.0 {
            return Err(ApiError::validation(
                "`min_tokens` must be a whole number >= 0",
            ));
        }
        p.insert("min_new_tokens".into(), json!(n as u64));
    }
    match v.get("logit_bias") {
        None | Some(Value::Null) => {}
        Some(Value::Object(m)) => {
            p.insert("logit_bias".into(), Value::Object(m.clone()));
        }
        Some(_) => {
            return Err(ApiError::validation(
                "`logit_bias` must be an object of token ids to numbers",
            ))
        }
    }
    refuse_unsupported(v)?;
    // vLLM's extra sampling fields.
    match v.get("stop_token_ids") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a))
            if a.iter()
                .all(|x| x.as_u64().is_some_and(|i| i <= u32::MAX as u64)) =>
        {
            if !a.is_empty() {
                p.insert("stop_token_ids".into(), Value::Array(a.clone()));
            }
        }
        Some(_) => {
            return Err(
                ApiError::validation("`stop_token_ids` must be a list of token ids")
                    .with_param("stop_token_ids"),
            )
        }
    }
    if bool_field(v, "ignore_eos")? {
        // vLLM's: an end token does not end the generation; it is generated like any other
        // token (and, being special, left out of the text unless `skip_special_tokens` is
        // false) and the generation goes on, to `max_tokens` (256 when not given) or the
        // context window's end. `stop_token_ids` still end it.
        let stop_ids = p.remove("stop_token_ids").unwrap_or_else(|| json!([]));
        p.insert("eos_token_id".into(), stop_ids);
    }
    if v.get("skip_special_tokens").is_some_and(|x| !x.is_null()) {
        let skip = bool_field(v, "skip_special_tokens")?;
        p.insert("skip_special_tokens".into(), json!(skip));
    }
    p.insert("return_full_text".into(), json!(false));
    Ok(p)
}

/// The most choices (`n`) one request may ask for: each is a sequence in the continuous batch.
pub(crate) const MAX_CHOICES: usize = 16;

/// OpenAI's `n`: how many choices to generate for the prompt (1 by default).
fn choices_of(v: &Value) -> Result<usize, ApiError> {
    match v.get("n") {
        None | Some(Value::Null) => Ok(1),
        Some(x) => match x.as_f64() {
            Some(n) if n.fract() == 0.0 && (1.0..=MAX_CHOICES as f64).contains(&n) => {
                Ok(n as usize)
            }
            _ => Err(ApiError::validation(format!(
                "`n` must be a whole number from 1 to {MAX_CHOICES}, got {x}"
            ))),
        },
    }
}

/// OpenAI's `best_of`: how many candidates to generate, of which the `n` most likely are
/// returned (default `n`; at least `n`, at most [`MAX_CHOICES`]).
fn best_of_of(v: &Value, n: usize) -> Result<usize, ApiError> {
    match v.get("best_of") {
        None | Some(Value::Null) => Ok(n),
        Some(x) => match x.as_f64() {
            Some(b) if b.fract() == 0.0 && (n as f64..=MAX_CHOICES as f64).contains(&b) => {
                Ok(b as usize)
            }
            _ => Err(ApiError::validation(format!(
                "`best_of` must be a whole number from `n` ({n}) to {MAX_CHOICES}, got {x}"
            ))),
        },
    }
}

/// Which `n` of the candidates to return when `best_of` made more: the highest cumulative
/// log-probabilities of their tokens first, ties in candidate order (vLLM's ranking); all of
/// them, in order, when there are no extra ones.
fn ranked(done: &[Generated], n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..done.len()).collect();
    if done.len() > n {
        let score = |g: &Generated| g.2.iter().map(|t| t.logprob as f64).sum::<f64>();
        let scores: Vec<f64> = done.iter().map(score).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        order.truncate(n);
    }
    order
}

/// The parameters of choice `i` of `n`: sampled choices each get their own seed (the
/// request's `seed` plus `i`, as a fixed seed must still give `n` different samples; without
/// one, a random base), so they differ, while greedy ones are the same text, as vLLM's.
fn choice_params(params: &Params, i: usize, n: usize, base: u64) -> Params {
    let mut p = params.clone();
    if n > 1 && p.get("do_sample") == Some(&json!(true)) {
        let seed = p.get("seed").and_then(Value::as_u64).unwrap_or(base);
        p.insert("seed".into(), json!(seed.wrapping_add(i as u64)));
    }
    p
}

/// OpenAI fields this server does not implement, refused when they ask for something (their
/// neutral values pass): a client must not get plain text where it asked for JSON or a tool
/// call.
fn refuse_unsupported(v: &Value) -> Result<(), ApiError> {
    let set = |k: &str| !matches!(v.get(k), None | Some(Value::Null));
    // vLLM's extras this server does not implement, when they ask for something.
    for k in [
        "guided_json",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "structured_outputs",
        "truncate_prompt_tokens",
        "allowed_token_ids",
        "chat_template",
    ] {
        if set(k) {
            return Err(
                ApiError::validation(format!("`{k}` is not supported by this server"))
                    .with_param(k),
            );
        }
    }
    for (k, neutral) in [
        ("use_beam_search", json!(false)),
        ("length_penalty", json!(1.0)),
        ("spaces_between_special_tokens", json!(true)),
        ("return_tokens_as_token_ids", json!(false)),
    ] {
        match v.get(k) {
            None | Some(Value::Null) => {}
            Some(x) if x == &neutral || x.as_f64().is_some() && x.as_f64() == neutral.as_f64() => {}
            Some(x) => {
                return Err(ApiError::validation(format!(
                    "`{k}` {x} is not supported by this server (only {neutral})"
                ))
                .with_param(k))
            }
        }
    }
    for k in ["bad_words", "chat_template_kwargs"] {
        let empty = match v.get(k) {
            None | Some(Value::Null) => true,
            Some(Value::Array(a)) => a.is_empty(),
            Some(Value::Object(o)) => o.is_empty(),
            _ => false,
        };
        if !empty {
            return Err(
                ApiError::validation(format!("`{k}` is not supported by this server"))
                    .with_param(k),
            );
        }
    }
    if set("suffix") {
        return Err(
            ApiError::validation("`suffix` is not supported by this server").with_param("suffix"),
        );
    }
    if matches!(v.get("tools"), Some(Value::Array(a)) if !a.is_empty())
        || (set("tools") && !v["tools"].is_array())
        || set("functions")
    {
        let field = if set("functions") {
            "functions"
        } else {
            "tools"
        };
        return Err(ApiError::validation(format!(
            "`{field}` (function calling) is not supported by this server"
        ))
        .with_param(field));
    }
    match v.get("response_format") {
        None | Some(Value::Null) => {}
        Some(f) if f.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(f) => {
            return Err(ApiError::validation(format!(
            "`response_format` {} is not supported by this server: only `{{\"type\": \"text\"}}`",
            f.get("type").unwrap_or(f)
        ))
            .with_param("response_format"))
        }
    }
    Ok(())
}

/// `/v1/completions`' `prompt`, as OpenAI and vLLM take it: a string, a list of token ids, or
/// a list of up to `max` strings or lists of token ids (each its own completion). Ids run as
/// given (no special tokens added).
fn completion_prompts(v: &Value, max: usize) -> Result<Vec<Input>, ApiError> {
    texts_or_ids(v.get("prompt"), "prompt", max)
}

/// A chat's messages: `content` a string or a list of `{type: "text", text}` parts;
/// `developer_as_system` reads the role `developer` as `system`.
pub(crate) fn chat_input(v: &Value, developer_as_system: bool) -> Result<Input, ApiError> {
    let list = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::validation("missing field `messages` (a list)"))?;
    if list.is_empty() {
        return Err(ApiError::validation("`messages` cannot be empty"));
    }
    let mut msgs = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::validation(format!("messages[{i}] has no `role`")))?;
        let role = if developer_as_system && role == "developer" {
            "system"
        } else {
            role
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .enumerate()
                .map(
                    |(j, p)| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        (Some("text"), _) => Err(ApiError::validation(format!(
                            "messages[{i}].content[{j}] is a text part without a `text` string"
                        ))),
                        _ => Err(ApiError::validation(format!(
                            "messages[{i}].content[{j}]: only text content parts are supported"
                        ))),
                    },
                )
                .collect::<Result<Vec<_>, _>>()?
                .concat(),
            _ => {
                return Err(ApiError::validation(format!(
                    "messages[{i}] has no string `content`"
                )))
            }
        };
        msgs.push(ferroformers::generation::Message::new(role, content));
    }
    Ok(Input::Chat(msgs))
}

/// A response id: the kind's prefix and a process-wide counter with the time.
pub(crate) fn response_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{:x}{n:04x}", unix_time())
}

/// How a generation request's answer goes out.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Kind {
    Chat,
    Completion,
}

pub(crate) async fn openai_generate(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let m = generator(&state, model_name(&v)?)?;
    let index = index_of(&state, m);
    let name = m.id.clone();
    let inputs = match kind {
        Kind::Chat => {
            // OpenAI's `developer` messages (what the SDKs send for reasoning models) are
            // system messages to a template that does not name the role itself, as llama.cpp's
            // server maps them.
            let knows = m
                .pipe
                .chat_template()
                .is_some_and(|t| t.knows_role("developer"));
            vec![chat_input(&v, !knows)?]
        }
        Kind::Completion => completion_prompts(&v, state.max_client_batch_size)?,
    };
    let mut params = openai_params(&v)?;
    // vLLM's chat fields: `continue_final_message` continues the last (assistant) message
    // instead of starting a new one, which needs `add_generation_prompt: false`; the template
    // always adds the generation prompt otherwise.
    if kind == Kind::Chat {
        let cont = bool_field(&v, "continue_final_message")?;
        let gen_prompt = match v.get("add_generation_prompt") {
            None | Some(Value::Null) => !cont,
            _ => bool_field(&v, "add_generation_prompt")?,
        };
        match (cont, gen_prompt) {
            (true, true) => {
                return Err(ApiError::validation(
                    "`continue_final_message` and `add_generation_prompt` cannot both be true",
                )
                .with_param("continue_final_message"))
            }
            (false, false) => {
                return Err(ApiError::validation(
                    "`add_generation_prompt: false` is supported only with \
                     `continue_final_message: true`",
                )
                .with_param("add_generation_prompt"))
            }
            (true, false) => {
                params.insert("continue_final_message".into(), json!(true));
            }
            (false, true) => {
                params.insert("continue_final_message".into(), json!(false));
            }
        }
    }
    // `echo` (completions, as vLLM): the prompt comes back before the completion, with its
    // tokens' log-probabilities when `logprobs` is set; with `max_tokens: 0`, the prompt alone
    // (lm-evaluation-harness' log-likelihoods).
    let echo = bool_field(&v, "echo")?;
    if echo && kind == Kind::Chat {
        return Err(ApiError::validation(
            "`echo` is for /v1/completions: a chat's answer is a new message",
        )
        .with_param("echo"));
    }
    let echo_only = echo
        && ["max_completion_tokens", "max_tokens"]
            .iter()
            .find_map(|k| v.get(*k).filter(|x| !x.is_null()))
            .and_then(Value::as_f64)
            == Some(0.0);
    // Token ids the request names (prompts, `logit_bias`) must be in the vocabulary.
    if let Some(tok) = &m.tokenizer {
        let vocab = tok.vocab_size();
        let stop_ids: Vec<u32> = params
            .get("stop_token_ids")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|i| i as u32)
                    .collect()
            })
            .unwrap_or_default();
        let named = inputs
            .iter()
            .filter_map(|input| match input {
                Input::Tokens(ids) => Some(("prompt", ids.as_slice())),
                _ => None,
            })
            .chain([("stop_token_ids", stop_ids.as_slice())]);
        for (field, ids) in named {
            if let Some(id) = tok.unknown_id(ids) {
                return Err(ApiError::validation(format!(
                    "`{field}` has token id {id}, outside the model's vocabulary of {vocab} tokens"
                ))
                .with_param(field));
            }
        }
        if let Some(Value::Object(bias)) = params.get("logit_bias") {
            if let Some(k) = bias
                .keys()
                .find(|k| k.trim().parse::<usize>().is_ok_and(|id| id >= vocab))
            {
                return Err(ApiError::validation(format!(
                "`logit_bias` names token {k}, outside the model's vocabulary of {vocab} tokens"
            ))
                .with_param("logit_bias"));
            }
        }
    }
    let n = choices_of(&v)?;
    let best_of = best_of_of(&v, n)?;
    // As vLLM: with more candidates than choices (`best_of` > `n`), the answer comes whole
    // even when a stream was asked for (the ranking needs every candidate's end).
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(x) => {
            return Err(
                ApiError::validation(format!("`stream` must be true or false, got {x}"))
                    .with_param("stream"),
            )
        }
    } && best_of == n;
    // Chat's `logprobs: true`: each token's log-probability, with `top_logprobs` (0..=20)
    // alternatives; a completion's legacy `logprobs: N` (0..=20, as vLLM; OpenAI's limit is 5):
    // each token's and its N most likely alternatives'.
    let (logprobs, top) = match kind {
        Kind::Chat => {
            let logprobs = match v.get("logprobs") {
                None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                Some(Value::Bool(true)) => true,
                Some(_) => return Err(ApiError::validation("`logprobs` must be true or false")),
            };
            let top = count_at_most(v.get("top_logprobs"), "top_logprobs", 20)?;
            if top > 0 && !logprobs {
                return Err(ApiError::validation(
                    "`top_logprobs` needs `logprobs: true`",
                ));
            }
            (logprobs, top)
        }
        Kind::Completion => {
            if !matches!(v.get("top_logprobs"), None | Some(Value::Null)) {
                return Err(ApiError::validation(
                    "`top_logprobs` is for /v1/chat/completions: a completion takes `logprobs: N`",
                ));
            }
            match v.get("logprobs") {
                None | Some(Value::Null) => (false, 0),
                x => (true, count_at_most(x, "logprobs", 20)?),
            }
        }
    };
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (id, object, chunk_object) = match kind {
        Kind::Chat => (
            response_id("chatcmpl"),
            "chat.completion",
            "chat.completion.chunk",
        ),
        Kind::Completion => (response_id("cmpl"), "text_completion", "text_completion"),
    };
    let created = unix_time();
    let usage_json = |u: &ferroformers::pipelines::text_generation::Usage| {
        json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
               "total_tokens": u.prompt_tokens + u.completion_tokens})
    };
    let finish = |u: &ferroformers::pipelines::text_generation::Usage| {
        if u.hit_limit {
            "length"
        } else {
            "stop"
        }
    };
    // The base seed of sampled choices when the request gives none.
    let base = random_seed();
    // vLLM's `include_stop_str_in_output`: the text keeps the stop string.
    let keep_stop = bool_field(&v, "include_stop_str_in_output")?;
    let stops = stops_of(&params);
    // vLLM's `prompt_logprobs: N` (0 to 20; not streamed): each prompt token's
    // log-probability and rank, and its N most likely alternatives.
    let prompt_lp = match v.get("prompt_logprobs") {
        None | Some(Value::Null) => None,
        Some(x) => {
            if stream {
                return Err(ApiError::validation(
                    "`prompt_logprobs` is not supported with `stream`",
                )
                .with_param("prompt_logprobs"));
            }
            Some(count_at_most(Some(x), "prompt_logprobs", 20)?)
        }
    };
    let echoes = if echo || prompt_lp.is_some() {
        let scored = (echo && logprobs) || prompt_lp.is_some();
        let n = top.max(prompt_lp.unwrap_or(0));
        echo_prompts(&state, index, &inputs, &params, scored.then_some(n)).await?
    } else {
        Vec::new()
    };
    let prompt_lps: Vec<Value> = match prompt_lp {
        Some(n) => echoes
            .iter()
            .map(|e| vllm_prompt_logprobs(&e.tokens, n))
            .collect(),
        None => Vec::new(),
    };
    if !stream {
        // The candidates join the continuous batch together; the `n` returned are numbered
        // from 0 in their rank's order, and only their tokens are counted (as vLLM).
        let ps: Vec<Params> = (0..best_of)
            .map(|i| choice_params(&params, i, best_of, base))
            .collect();
        // Several prompts (completions): each prompt's candidates, all in the batch at once;
        // the choices prompt by prompt, `index` counting on over them (as vLLM).
        let mut set = tokio::task::JoinSet::new();
        for (p, input) in inputs.iter().enumerate().filter(|_| !echo_only) {
            let (st, input, ps) = (state.clone(), input.clone(), ps.clone());
            set.spawn(async move { (p, generate_many(&st, index, &input, ps, top).await) });
        }
        let mut per_prompt = Vec::with_capacity(inputs.len());
        while let Some(r) = set.join_next().await {
            let (p, r) = r.map_err(ApiError::backend)?;
            per_prompt.push((p, r?));
        }
        per_prompt.sort_by_key(|d| d.0);
        let mut choices = Vec::with_capacity(n * inputs.len());
        let (mut prompt_tokens, mut completion_tokens) = (0, 0);
        if echo_only {
            for (p, e) in echoes.iter().enumerate() {
                let lp = if logprobs {
                    legacy_logprobs(&prompt_legacy(&e.tokens, top), 0)
                } else {
                    Value::Null
                };
                for c in 0..n {
                    let mut choice = json!({"index": p * n + c, "text": e.text, "logprobs": lp,
                                            "finish_reason": "length"});
                    if let Some(plp) = prompt_lps.get(p) {
                        choice["prompt_logprobs"] = plp.clone();
                    }
                    choices.push(choice);
                }
                prompt_tokens += e.tokens.len();
            }
        }
        for (p, done) in &per_prompt {
            let mut prompt_counted = false;
            for (i, c) in ranked(done, n).into_iter().enumerate() {
                let i = p * n + i;
                let (out, usage, tokens) = &done[c];
                let (text, stopped) = without_stop(generated_text(out), &stops, keep_stop);
                let finish_reason = if stopped { "stop" } else { finish(usage) };
                choices.push(match kind {
                    Kind::Chat => {
                        let lp = if logprobs {
                            let content: Vec<Value> = tokens
                                .iter()
                                .map(|t| logprob_entry(t.id, &t.text, t.logprob, &t.top))
                                .collect();
                            json!({"content": content})
                        } else {
                            Value::Null
                        };
                        json!({"index": i, "message": {"role": "assistant", "content": text},
                               "logprobs": lp, "finish_reason": finish_reason})
                    }
                    Kind::Completion => {
                        let echoed = echoes.get(*p).filter(|_| echo);
                        let lp = if logprobs {
                            let mut toks = echoed.map_or(vec![], |e| prompt_legacy(&e.tokens, top));
                            toks.extend(
                                tokens
                                    .iter()
                                    .map(|t| legacy_token(t.id, &t.text, t.logprob, &t.top)),
                            );
                            legacy_logprobs(&toks, 0)
                        } else {
                            Value::Null
                        };
                        let text = match echoed {
                            Some(e) => format!("{}{text}", e.text),
                            None => text,
                        };
                        let mut choice = json!({"index": i, "text": text, "logprobs": lp,
                                                "finish_reason": finish_reason});
                        if let Some(plp) = prompt_lps.get(*p) {
                            choice["prompt_logprobs"] = plp.clone();
                        }
                        choice
                    }
                });
                // OpenAI counts each prompt once and every choice's tokens.
                if !std::mem::replace(&mut prompt_counted, true) {
                    prompt_tokens += usage.prompt_tokens;
                }
                completion_tokens += usage.completion_tokens;
            }
        }
        let usage = ferroformers::pipelines::text_generation::Usage {
            prompt_tokens,
            completion_tokens,
            hit_limit: false,
            stop_string: false,
        };
        let mut body = json!({
            "id": id, "object": object, "created": created, "model": name,
            "choices": choices, "usage": usage_json(&usage),
        });
        // A chat's prompt scores go beside its choices (vLLM's place for them).
        if let (Kind::Chat, Some(plp)) = (kind, prompt_lps.first()) {
            body["prompt_logprobs"] = plp.clone();
        }
        return Ok(axum::Json(body).into_response());
    }
    // Streamed: each choice runs on a blocking thread and sends each piece of text as an event
    // carrying its `index`; the parameters were checked above, so errors from here on are
    // generation errors, sent as an event. The last choice to end sends the usage (asked for)
    // and `[DONE]`. Each choice is announced to the model's batch first, so that an idle batch
    // waits for it while it is checked and tokenized.
    let mut arrivals: Vec<_> = (0..inputs.len() * n)
        .map(|_| {
            (!echo_only)
                .then(|| state.models[index].pipe.announce())
                .flatten()
        })
        .collect();
    for input in inputs.iter().filter(|_| !echo_only) {
        check_stream(&state, index, input, &choice_params(&params, 0, n, base)).await?;
    }
    // Each choice's first event with `echo`: the prompt's text, its log-probabilities, and
    // the characters they cover (where the completion's offsets start).
    let echo_events: Vec<(String, Value, usize)> = echoes
        .iter()
        .map(|e| {
            let toks = prompt_legacy(&e.tokens, top);
            let chars = toks.iter().map(|t| t.0.chars().count()).sum();
            let lp = if logprobs {
                legacy_logprobs(&toks, 0)
            } else {
                Value::Null
            };
            (e.text.clone(), lp, chars)
        })
        .collect();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    // Choices still running, and the usage summed so far (prompt, completion).
    let left = Arc::new(std::sync::Mutex::new((n * inputs.len(), 0usize, 0usize)));
    let cancel = Cancel::new();
    for (p, c) in (0..inputs.len()).flat_map(|p| (0..n).map(move |c| (p, c))) {
        let (st, tx, left, stop) = (state.clone(), tx.clone(), left.clone(), cancel.clone());
        let (id, name, input) = (id.clone(), name.clone(), inputs[p].clone());
        let params = choice_params(&params, c, n, base);
        let echoed = echo_events.get(p).cloned();
        let stops = stops.clone();
        let prompt_len = echoes.get(p).map_or(0, |e| e.tokens.len());
        // Its `index`: the choices of several prompts count on, prompt by prompt.
        let i = p * n + c;
        let mut clock = TokenClock::new();
        let arrival = arrivals[i].take();
        tokio::task::spawn_blocking(move || {
            let chunk = |choice: Value| {
                json!({"id": id, "object": chunk_object, "created": created, "model": name,
                       "choices": [choice]})
                .to_string()
            };
            if kind == Kind::Chat {
                let first = chunk(
                    json!({"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": null, "finish_reason": null}),
                );
                let _ = tx.send(first);
            }
            // A send fails once the client has gone (the event stream was dropped): the
            // generation stops there.
            let (mut gone, mut cut) = (false, false);
            // Characters of the completion sent so far (legacy logprobs' `text_offset`).
            let mut offset = 0usize;
            let mut held = StopHold::new(&stops, keep_stop);
            if let Some((text, lp, chars)) = echoed {
                let _ = tx.send(chunk(json!({"index": i, "text": text, "logprobs": lp,
                                             "finish_reason": null})));
                offset = chars;
            }
            let result = if echo_only {
                Ok((
                    Output::Generated(Vec::new()),
                    ferroformers::pipelines::text_generation::Usage {
                        prompt_tokens: prompt_len,
                        completion_tokens: 0,
                        hit_limit: true,
                        stop_string: false,
                    },
                ))
            } else {
                let pipe = &st.models[index].pipe;
                ferroformers::generation::arriving(arrival, || {
                    pipe.run_streaming_until(&input, &params, top, &stop, &mut |t| {
                        if !t.tail {
                            clock.token();
                        }
                        // The text released (stop strings held back and cut); the
                        // log-probabilities are the token's own, with its own piece.
                        let delta = held.push(t.text);
                        let with_lp = logprobs && !t.tail;
                        if delta.is_empty() && !with_lp {
                            return true;
                        }
                        let choice = match kind {
                            Kind::Chat => {
                                let lp = if with_lp {
                                    json!({"content": [logprob_entry(t.id, t.text, t.logprob, t.top)]})
                                } else {
                                    Value::Null
                                };
                                json!({"index": i, "delta": {"content": delta},
                                       "logprobs": lp, "finish_reason": null})
                            }
                            Kind::Completion => {
                                let lp = if with_lp {
                                    legacy_logprobs(&[legacy_token(t.id, t.text, t.logprob, t.top)], offset)
                                } else {
                                    Value::Null
                                };
                                offset += t.text.chars().count();
                                json!({"index": i, "text": delta, "logprobs": lp,
                                       "finish_reason": null})
                            }
                        };
                        gone = tx.send(chunk(choice)).is_err();
                        cut = cut_short(&st);
                        !gone && !cut
                    })
                })
            };
            if stream_ended(&st, &clock, gone || stop.is_cancelled()) {
                return;
            }
            let result = if cut {
                Err(shut_down())
            } else {
                result.map_err(ApiError::from)
            };
            let mut usage = None;
            match result {
                Ok((_, u)) => {
                    // Text held back for a stop string that did not come.
                    let rest = held.finish();
                    if !rest.is_empty() {
                        let _ = tx.send(chunk(match kind {
                            Kind::Chat => json!({"index": i, "delta": {"content": rest},
                                                 "logprobs": null, "finish_reason": null}),
                            Kind::Completion => json!({"index": i, "text": rest,
                                                       "logprobs": null, "finish_reason": null}),
                        }));
                    }
                    let reason = if held.stopped { "stop" } else { finish(&u) };
                    let choice = match kind {
                        Kind::Chat => json!({"index": i, "delta": {}, "logprobs": null,
                                             "finish_reason": reason}),
                        Kind::Completion => json!({"index": i, "text": "", "logprobs": null,
                                                   "finish_reason": reason}),
                    };
                    let _ = tx.send(chunk(choice));
                    usage = Some(u);
                }
                Err(err) => {
                    let _ = tx.send(
                        json!({"error": {"message": err.message, "type": "server_error",
                                         "param": null, "code": err.status.as_u16()}})
                        .to_string(),
                    );
                }
            }
            let mut left = left.lock().unwrap_or_else(|e| e.into_inner());
            left.0 -= 1;
            if let Some(u) = usage {
                // Each prompt counted once (by its first choice).
                if c == 0 {
                    left.1 += u.prompt_tokens;
                }
                left.2 += u.completion_tokens;
            }
            if left.0 == 0 {
                if include_usage {
                    let total = ferroformers::pipelines::text_generation::Usage {
                        prompt_tokens: left.1,
                        completion_tokens: left.2,
                        hit_limit: false,
                        stop_string: false,
                    };
                    let u = json!({"id": id, "object": chunk_object, "created": created,
                                   "model": name, "choices": [], "usage": usage_json(&total)});
                    let _ = tx.send(u.to_string());
                }
                let _ = tx.send("[DONE]".into());
            }
        });
    }
    Ok(sse_response(rx, cancel))
}

pub(crate) async fn openai_chat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    openai_generate(state, headers, body, Kind::Chat)
        .await
        .map_err(ApiError::openai)
}

pub(crate) async fn openai_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    openai_generate(state, headers, body, Kind::Completion)
        .await
        .map_err(ApiError::openai)
}

/// Standard base64 with padding (OpenAI's `encoding_format: "base64"`: little-endian f32s).
pub(crate) fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn streamed(pieces: &[&str], stops: &[&str]) -> (Vec<String>, String) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut held = StopHold::new(&stops, false);
        let out: Vec<String> = pieces.iter().map(|p| held.push(p)).collect();
        (out, held.finish())
    }

    /// Streamed text is what the whole answer gives: cut before the first stop string, the
    /// start of a possible stop string held back until the next piece shows it is not one.
    #[test]
    fn stop_strings_are_cut_and_held_back() {
        let (out, rest) = streamed(&["Hel", "lo W", "orld"], &["o W"]);
        assert_eq!((out.concat(), rest.as_str()), ("Hell".to_string(), ""));
        assert_eq!(out[0], "H", "two bytes held: they may start `o W`");
        // No stop string comes: everything, the held part at the end.
        let (out, rest) = streamed(&["Hel", "lo ", "there"], &["xyz", "o W"]);
        assert_eq!(out.concat() + &rest, "Hello there");
        // Several stop strings: the first in the text wins; one at the very start gives "".
        let (out, _) = streamed(&["a-b", "-c."], &[".", "-c"]);
        assert_eq!(out.concat(), "a-b");
        let (out, _) = streamed(&[" A", " mix"], &[" "]);
        assert_eq!(out.concat(), "");
        // Multi-byte characters are never split.
        let (out, rest) = streamed(&["caf\u{e9}", "\u{e9}s"], &["\u{e9}\u{e9}x"]);
        assert!(out.iter().all(|o| o.is_char_boundary(o.len())));
        assert_eq!(out.concat() + &rest, "caf\u{e9}\u{e9}s");
        // Pieces shorter than the part held back.
        let (out, rest) = streamed(&["a", "b", "cdefgh"], &["xyzw1"]);
        assert_eq!((out.concat(), rest.as_str()), ("abcd".to_string(), "efgh"));
        // Without stop strings nothing is held.
        let (out, rest) = streamed(&["a", "b"], &[]);
        assert_eq!(
            (out, rest.as_str()),
            (vec!["a".to_string(), "b".to_string()], "")
        );
        for (stop, want) in [("o W", ("Hell", true)), ("xy", ("Hello World", false))] {
            let (text, stopped) = without_stop("Hello World".into(), &[stop.into()], false);
            assert_eq!((text.as_str(), stopped), want);
        }
        let kept = without_stop("Hello World".into(), &["o W".into()], true);
        assert_eq!(kept, ("Hello W".to_string(), true));
        let stops = ["o W".to_string()];
        let mut held = StopHold::new(&stops, true);
        let out: String = ["Hel", "lo Wor", "ld"]
            .iter()
            .map(|p| held.push(p))
            .collect();
        assert_eq!(out + &held.finish(), "Hello W");
    }
}
