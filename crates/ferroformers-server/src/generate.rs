//! Generation for the routes: on a blocking thread, stopped when the client has gone, with
//! each token's text, log-probability and timing.

use super::*;

/// Cancels a request's generation when dropped with the request's handler or its event stream
/// (hyper drops them when the client goes, and a request timeout drops the handler): the
/// generation stops at its next token, a queued prompt never runs, and a long prompt stops
/// between its chunks; a batched pipeline call stops once every request in it is cancelled
/// (`batch.rs`).
pub(crate) struct ClientAlive(pub Cancel);

impl Drop for ClientAlive {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// A generated token: id, text, log-probability, whether it is special, and its `top` most
/// likely alternatives.
pub(crate) struct TokenLog {
    pub id: u32,
    pub text: String,
    pub logprob: f32,
    pub special: bool,
    pub top: Vec<ferroformers::pipelines::text_generation::TopToken>,
}

/// Every check a streamed generation makes before its first token (parameters, the prompt,
/// its length against the context window), on a blocking thread: a bad request gets its error
/// status before any event is sent, as the same request without `stream` does.
pub(crate) async fn check_stream(
    state: &Arc<AppState>,
    index: usize,
    input: &Input,
    params: &Params,
) -> Result<(), ApiError> {
    let (st, input, params) = (state.clone(), input.clone(), params.clone());
    tokio::task::spawn_blocking(move || st.models[index].pipe.check_streaming(&input, &params))
        .await
        .map_err(ApiError::backend)?
        .map_err(ApiError::from)
}

/// Generate on a blocking thread (stopped early if the handler is dropped): the output, its
/// token counts, and each token with its log-probability (OpenAI's `logprobs`, TGI's
/// `details`) and its `top` most likely alternatives (`top_logprobs`, `top_n_tokens`).
pub(crate) async fn generate_with_tokens(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
    top: usize,
) -> Result<Generated, ApiError> {
    use std::sync::atomic::Ordering::SeqCst;
    let cancel = Cancel::new();
    let _watch = ClientAlive(cancel.clone());
    let st = state.clone();
    let mut clock = TokenClock::new();
    // An idle batch waits for it while its thread starts and tokenizes it.
    let arrival = state.models[index].pipe.announce();
    tokio::task::spawn_blocking(move || {
        let mut tokens: Vec<TokenLog> = Vec::new();
        let mut cut = false;
        let pipe = &st.models[index].pipe;
        let out = ferroformers::generation::arriving(arrival, || {
            pipe.run_streaming_until(&input, &params, top, &cancel, &mut |t| {
                if t.tail {
                    if let Some(last) = tokens.last_mut() {
                        last.text.push_str(t.text);
                    }
                } else {
                    clock.token();
                    tokens.push(TokenLog {
                        id: t.id,
                        text: t.text.to_string(),
                        logprob: t.logprob,
                        special: t.special,
                        top: t.top.to_vec(),
                    });
                }
                cut = cut_short(&st);
                !cancel.is_cancelled() && !cut
            })
        });
        if cancel.is_cancelled() {
            st.cancelled.fetch_add(1, SeqCst);
        }
        clock.record(&st);
        if cut {
            return Err(shut_down());
        }
        out.map(|(o, u)| (o, u, tokens)).map_err(ApiError::from)
    })
    .await
    .map_err(ApiError::backend)?
}

/// A prompt's tokens as a generation of it starts from, scored with `logprobs` alternatives
/// per token when set (OpenAI's `echo`, TGI's `decoder_input_details`), on a blocking thread
/// that stops between chunks of the prompt once the request is dropped (the client gone).
pub(crate) async fn prompt_tokens(
    state: &Arc<AppState>,
    index: usize,
    input: &Input,
    params: &Params,
    logprobs: Option<usize>,
) -> Result<Vec<ferroformers::pipelines::text_generation::PromptToken>, ApiError> {
    let cancel = Cancel::new();
    let _watch = ClientAlive(cancel.clone());
    // Only scoring waits its turn (the tokens alone cost no model pass); the pass keeps its
    // turn until it ends, also when the request is dropped meanwhile.
    let turn = match logprobs {
        Some(_) => Some(
            state
                .scoring
                .clone()
                .acquire_owned()
                .await
                .map_err(ApiError::backend)?,
        ),
        None => None,
    };
    let (st, input, params) = (state.clone(), input.clone(), params.clone());
    tokio::task::spawn_blocking(move || {
        let _turn = turn;
        st.models[index]
            .pipe
            .prompt_tokens(&input, &params, logprobs, Some(&cancel))
    })
    .await
    .map_err(ApiError::backend)?
    .map_err(ApiError::from)
}

/// One generation's answer ([`generate_with_tokens`]): its output, token counts and tokens.
pub(crate) type Generated = (
    Output,
    ferroformers::pipelines::text_generation::Usage,
    Vec<TokenLog>,
);

/// Generations of one input at once, one per entry of `params` (OpenAI's `n` and `best_of`,
/// TGI's `best_of`): they join the continuous batch together. The answers come in the order
/// of `params`; one failing, or the future dropped (the client gone), aborts the others.
pub(crate) async fn generate_many(
    state: &Arc<AppState>,
    index: usize,
    input: &Input,
    params: Vec<Params>,
    top: usize,
) -> Result<Vec<Generated>, ApiError> {
    let mut set = tokio::task::JoinSet::new();
    for (i, p) in params.into_iter().enumerate() {
        let (st, input) = (state.clone(), input.clone());
        set.spawn(async move { (i, generate_with_tokens(&st, index, input, p, top).await) });
    }
    let mut done = Vec::with_capacity(set.len());
    while let Some(r) = set.join_next().await {
        let (i, r) = r.map_err(ApiError::backend)?;
        done.push((i, r?));
    }
    done.sort_by_key(|d| d.0);
    Ok(done.into_iter().map(|d| d.1).collect())
}

/// A seed for a sampled generation that was given none (each call another).
pub(crate) fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Whether the graceful shutdown timeout has passed: a generation still running stops at its
/// next token.
pub(crate) fn cut_short(st: &AppState) -> bool {
    st.aborting.load(std::sync::atomic::Ordering::SeqCst)
}

/// The text-generation model a request names (`model`), else the first one served.
pub(crate) fn generator<'a>(state: &'a AppState, id: Option<&str>) -> Result<&'a Served, ApiError> {
    let m = match id {
        Some(id) => model_for(state, id, "text-generation")?,
        None => state
            .models
            .iter()
            .find(|m| m.task == "text-generation")
            .ok_or_else(|| ApiError::validation("no text-generation model is served"))?,
    };
    if m.task != "text-generation" {
        return Err(ApiError::validation(format!(
            "`{}` is a {} model, not a text-generation model",
            m.id, m.task
        )));
    }
    Ok(m)
}

pub(crate) fn generated_text(out: &Output) -> String {
    match out {
        Output::Generated(g) => g
            .first()
            .and_then(|g| g.generated_text.as_text().map(str::to_string))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// A streamed generation's end, seen from its thread: its token timing recorded; `true` (and
/// counted) when it stopped because the client had gone, so nothing more is sent.
pub(crate) fn stream_ended(st: &AppState, clock: &TokenClock, gone: bool) -> bool {
    clock.record(st);
    if gone {
        st.cancelled
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    gone
}

/// Server-sent events, one per message from the generation's thread, with keep-alive
/// comments while it is quiet. The channel is unbounded: a slow reader must not stall the
/// generation thread, which shares its decoding steps with other requests (tokens are small,
/// and a generation's length is bounded). `cancel` is cancelled when the stream is dropped
/// (the client has gone): before its first token the generation sends nothing that could
/// fail, so this is how a queued or long prompt learns it.
pub(crate) fn sse_response(
    rx: tokio::sync::mpsc::UnboundedReceiver<String>,
    cancel: Cancel,
) -> Response {
    use tokio_stream::StreamExt;
    let watch = ClientAlive(cancel);
    let events = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(move |data| {
        let _ = &watch;
        Ok::<_, std::convert::Infallible>(axum::response::sse::Event::default().data(data))
    });
    axum::response::sse::Sse::new(events)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response()
}
