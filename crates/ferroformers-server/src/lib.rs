//! `ferroformers serve`: the pipelines behind HTTP routes that existing clients already speak.
//!
//! - TEI: `POST /embed`, `/predict`; `GET /health`, `/info`;
//! - the HF Inference API: `POST /` and `/models/{id}` with `{inputs, parameters}` for every
//!   task (the pipeline's own output shapes), or an audio file's bytes for speech recognition;
//! - OpenAI: `POST /v1/chat/completions`, `/v1/completions` (both also streamed as server-sent
//!   events), `/v1/embeddings` (float and base64), `/v1/audio/transcriptions` and
//!   `/v1/audio/translations` (multipart, speech recognition), `GET /v1/models`;
//! - TGI: `POST /generate`, `/generate_stream` (token events), and `POST /` on a generation
//!   model as TGI answers it;
//! - probes: `GET /live`, `/ready`; Prometheus counters at `GET /metrics`; the OpenAPI
//!   document at `GET /api-doc/openapi.json` and a page of the routes at `GET /docs`.
//!
//! Encoder models batch dynamically: requests that wait together run as one pipeline call
//! ([`batch`]). Generation batches continuously (`ferroformers::generation::continuous`):
//! requests generating at the same time share one forward pass per token, and new ones join
//! between steps (`--max-batch-total-tokens`).
//!
//! Errors are JSON everywhere: `{"error", "error_type"}` on the HF/TEI routes, OpenAI's
//! `{"error": {message, type, param, code}}` on `/v1/*`. The pipelines stay synchronous
//! library code and run on blocking threads (their products use the rayon pool).
//!
//! Where things are: `hf` (Inference API routes), `tei`, `tgi`, `openai` (each family's
//! routes), `audio` (speech recognition: OpenAI's audio routes, HF's audio bodies),
//! `generate` (generation for them: blocking thread, cancellation, token timing),
//! `middleware` (CORS, API key, admission and timeouts, request log and counts), `metrics`,
//! `docs` (OpenAPI), `batch` (dynamic batching); this file: configuration, loading, the
//! router, errors and the request-body helpers.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ferroformers::generation::Cancel;
use ferroformers::{Input, Output, Params, Pipeline, PipelineOptions};
use serde_json::{json, Map, Value};

mod audio;
mod batch;
mod docs;
mod generate;
mod hf;
mod metrics;
mod middleware;
mod openai;
mod tei;
mod tgi;

use audio::*;
use docs::*;
use generate::*;
use hf::*;
use metrics::*;
use middleware::*;
use openai::*;
use tei::*;
use tgi::*;

/// One model to serve: a folder or hub id, and its task (else read from its files).
#[derive(Debug, Clone)]
pub struct ModelSpec {
    pub model: String,
    pub task: Option<String>,
}

impl ModelSpec {
    /// `ID` or `ID=TASK`.
    pub fn parse(s: &str) -> Self {
        match s.rsplit_once('=') {
            Some((m, t)) if !t.is_empty() && !t.contains('/') => ModelSpec {
                model: m.to_string(),
                task: Some(t.to_string()),
            },
            _ => ModelSpec {
                model: s.to_string(),
                task: None,
            },
        }
    }
}

/// What `serve` takes (TEI's names and defaults where they exist).
#[derive(Debug, Clone)]
pub struct Config {
    pub models: Vec<ModelSpec>,
    /// The first model's name in `/v1/models` and `/info` (default: its id).
    pub served_model_name: Option<String>,
    pub hostname: String,
    pub port: u16,
    /// Bearer token every route but the probes requires.
    pub api_key: Option<String>,
    /// Largest request body in bytes (TEI: 2 MB).
    pub payload_limit: usize,
    /// Most inputs in one request (TEI: 32).
    pub max_client_batch_size: usize,
    /// Most inputs the requests merged into one pipeline call may hold together.
    pub max_batch_inputs: usize,
    /// Most tokens (each input's, special tokens included, after truncation to the model's
    /// limit) the requests merged into one pipeline call may hold together (TEI's
    /// `--max-batch-tokens`); a request over it by itself runs alone.
    pub max_batch_tokens: usize,
    /// Encoder routes: a request that does not say `truncate` has its over-long inputs cut at
    /// the model's limit (true, the default) or refused with 422 (false); TEI's
    /// `--auto-truncate` (whose default is false).
    pub auto_truncate: bool,
    /// How long a batch's first request waits for others to join (default 0: a batch is
    /// whatever is queued when the model is free).
    pub max_batch_wait: std::time::Duration,
    /// Generation: the tokens (prompt plus `max_new_tokens` each) the sequences of one
    /// continuously batched model may hold together; 0 turns continuous batching off (each
    /// request then generates on its own).
    pub max_batch_total_tokens: usize,
    /// Generation: when waiting requests join a running batch (`--max-waiting-tokens`,
    /// `--waiting-served-ratio`, TGI's rule) and the most prompt tokens one pass runs, longer
    /// prompts running in chunks (`--max-batch-prefill-tokens`); see
    /// [`ferroformers::generation::Admission`].
    pub admission: ferroformers::generation::Admission,
    /// Requests running or queued at once; more are answered 429 at once (TGI: 128).
    pub max_concurrent_requests: usize,
    /// TGI's `best_of`: the most candidates one request may ask for (TGI's `--max-best-of`,
    /// default 2).
    pub max_best_of: usize,
    /// `--cors-allow-origin`: origins (or `*`) whose browser pages may call the server.
    pub cors_allow_origin: Vec<String>,
    /// Requests waiting in the models' batch queues at once; more are answered 429.
    pub max_queue_size: usize,
    /// A request that has not started answering after this long gets 504 (its work stops).
    pub request_timeout: Option<std::time::Duration>,
    /// After SIGTERM, how long work in flight may take to finish. Past it, generations stop at
    /// their next token (a stream ends with an error event, a whole answer is 503), queued
    /// requests are refused with 503, and the server returns about a second later. Default
    /// 25 s: under Kubernetes' default grace period of 30 s.
    pub graceful_shutdown_timeout: std::time::Duration,
    /// [`serve_blocking`]'s log lines (`tracing`, filtered by `RUST_LOG`, default `info`) as
    /// JSON (`--json-output`) instead of plain text.
    pub json_output: bool,
    /// No per-request log events.
    pub quiet: bool,
    /// Where every model runs (`--device`: cpu, cuda or cuda:N).
    pub device: ferroformers::Device,
    /// The models' dtype (`--dtype`); `None`: f32 on CPU, on a GPU each checkpoint's own
    /// (transformers' `torch_dtype="auto"`, TGI's default).
    pub dtype: Option<ferroformers::DType>,
    /// GGUF models' arithmetic on CPU (`--gguf-math`); `None`: the library's default (int8,
    /// or `FERROFORMERS_GGUF_MATH`).
    pub gguf_math: Option<ferroformers::QuantMath>,
    /// Text generation models run batch-invariant arithmetic
    /// ([`ferroformers::Pipeline::make_batch_invariant`]): a request's tokens are the ones it
    /// gets alone, whatever else the server is running. `Some(true)`: loading fails, naming
    /// the reason, for a generation model without it; `Some(false)`: never; `None` (the
    /// default): where it costs nothing
    /// ([`ferroformers::Pipeline::batch_invariance_costs_nothing`], which depends on the CPU),
    /// not where it costs decoding speed.
    pub batch_invariant: Option<bool>,
    /// How long the server must be idle (no request in flight, none admitted) before it gives
    /// memory back: it drops the key/value buffers it keeps for rows that join a batch, then
    /// calls `on_idle`, once per idle spell. `None`: never. Default 30 s: the first requests
    /// after a release page-fault their memory in again (16 chats arriving together: time to
    /// first token p99 ~28 instead of ~20 ms), so a server busy in bursts keeps it.
    pub idle_release_after: Option<std::time::Duration>,
    /// Called on a blocking thread after the buffers are dropped: the place to hand memory
    /// the allocator keeps back to the system (the `serve` command purges mimalloc's freed
    /// pages).
    pub on_idle: Option<fn()>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            models: Vec::new(),
            served_model_name: None,
            hostname: "127.0.0.1".into(),
            port: 3000,
            api_key: None,
            payload_limit: 2_000_000,
            max_client_batch_size: 32,
            max_batch_inputs: 128,
            max_batch_tokens: 16_384,
            auto_truncate: true,
            max_batch_wait: std::time::Duration::ZERO,
            max_batch_total_tokens: 32_768,
            admission: Default::default(),
            max_concurrent_requests: 128,
            max_best_of: 2,
            cors_allow_origin: Vec::new(),
            max_queue_size: 256,
            request_timeout: None,
            graceful_shutdown_timeout: std::time::Duration::from_secs(25),
            json_output: false,
            quiet: false,
            device: ferroformers::Device::Cpu,
            dtype: None,
            gguf_math: None,
            batch_invariant: None,
            idle_release_after: Some(std::time::Duration::from_secs(30)),
            on_idle: None,
        }
    }
}

/// A loaded model.
struct Served {
    id: String,
    task: String,
    pipe: Arc<Pipeline>,
    tokenizer: Option<ferroformers::tokenizer::Tokenizer>,
    /// Encoder tasks: the queue that merges concurrent requests (generation runs per request).
    batcher: Option<batch::Batcher>,
    /// Speech recognition: Whisper or CTC (what the audio routes may ask of it).
    speech: Option<Speech>,
    /// Its config's label count (0 when it has none): `/rerank` takes a one-label classifier.
    num_labels: usize,
    /// The most tokens of an input the pipeline keeps (the tokenizer's limit, or
    /// sentence-transformers' `max_seq_length` for an embedding model).
    max_input: Option<usize>,
    /// The dtype it runs in (`/info`'s `model_dtype`).
    dtype: ferroformers::DType,
    /// Whether it runs on a GPU (`/info`'s `model_device_type`).
    cuda: bool,
    /// Text generation: whether its arithmetic is batch-invariant (`/info`).
    batch_invariant: bool,
    /// Embedding models: the size of their embeddings, once one has been computed (a request
    /// asking another `dimensions` is then refused before any work).
    embedding_size: std::sync::OnceLock<usize>,
}

struct AppState {
    models: Vec<Served>,
    api_key: Option<String>,
    /// `--payload-limit` (named in the audio routes' 413).
    payload_limit: usize,
    max_client_batch_size: usize,
    /// TGI's `best_of` limit (`/info`).
    max_best_of: usize,
    auto_truncate: bool,
    /// The encoder batches' limits (`/info`).
    batch_limits: batch::Limits,
    /// Requests running or waiting (the POST routes), against `max_concurrent_requests`.
    in_flight: std::sync::atomic::AtomicUsize,
    /// POST requests admitted since the start (the idle watcher's sign of activity).
    admitted: std::sync::atomic::AtomicU64,
    /// `Config::on_idle` and `Config::idle_release_after`.
    on_idle: Option<fn()>,
    idle_release_after: Option<std::time::Duration>,
    max_concurrent_requests: usize,
    /// Set on SIGTERM: `/ready` answers 503 and new work is refused while work in flight ends.
    draining: std::sync::atomic::AtomicBool,
    /// Set once draining has outlasted `graceful_shutdown_timeout`: work in flight is cut short.
    aborting: Arc<std::sync::atomic::AtomicBool>,
    graceful_shutdown_timeout: std::time::Duration,
    /// Origins a browser may call from (`*` for any); empty: no CORS headers.
    cors_origins: Vec<String>,
    /// Generations stopped because their client had gone.
    cancelled: std::sync::atomic::AtomicU64,
    max_queue_size: usize,
    /// Continuous batching's limits, reported by `/info` as TGI does.
    max_batch_total_tokens: usize,
    admission: ferroformers::generation::Admission,
    request_timeout: Option<std::time::Duration>,
    /// One `tracing` event per request (not with `--quiet`).
    log_requests: bool,
    requests: std::sync::Mutex<RequestStats>,
    /// Prompt scoring (`echo`, `prompt_logprobs`, `decoder_input_details`) runs outside the
    /// batch, each pass holding a chunk's logits and its own KV cache: at most
    /// [`SCORING_AT_ONCE`] at a time, the others wait their turn (more would not run faster
    /// on the CPU's threads, and would hold that memory each).
    scoring: Arc<tokio::sync::Semaphore>,
}

/// Prompt-scoring passes run at once (see `AppState::scoring`).
const SCORING_AT_ONCE: usize = 2;

/// Upper bounds (seconds) of the request-duration histogram's buckets.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per route: answers by status, and a histogram of durations (until the answer's head).
#[derive(Default)]
struct RequestStats {
    count: std::collections::BTreeMap<(String, u16), u64>,
    /// Error answers by route and `error_type` (TEI's `te_request_failure{err}`).
    failures: std::collections::BTreeMap<(String, &'static str), u64>,
    duration: std::collections::BTreeMap<String, Histogram>,
    /// Generation: request start to first token, and the mean time per later token.
    first_token: Histogram,
    per_token: Histogram,
}

/// A Prometheus histogram over [`BUCKETS`] (seconds).
#[derive(Default, Clone)]
pub(crate) struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    pub(crate) fn observe(&mut self, secs: f64) {
        for (b, &le) in self.buckets.iter_mut().zip(&BUCKETS) {
            if secs <= le {
                *b += 1;
            }
        }
        self.count += 1;
        self.sum += secs;
    }

    /// The series of one histogram, `labels` like `route="/embed",` (or empty).
    fn write(&self, out: &mut String, name: &str, labels: &str) {
        use std::fmt::Write;
        for (le, b) in BUCKETS.iter().zip(&self.buckets) {
            let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {b}");
        }
        let plain = labels.trim_end_matches(',');
        let _ = writeln!(
            out,
            "{name}_bucket{{{labels}le=\"+Inf\"}} {}\n{name}_sum{{{plain}}} {}\n{name}_count{{{plain}}} {}",
            self.count, self.sum, self.count
        );
    }
}

/// Times one generation's tokens for the first-token and per-token histograms.
struct TokenClock {
    start: std::time::Instant,
    first: Option<std::time::Instant>,
    last: Option<std::time::Instant>,
    tokens: usize,
}

impl TokenClock {
    fn new() -> Self {
        TokenClock {
            start: std::time::Instant::now(),
            first: None,
            last: None,
            tokens: 0,
        }
    }

    fn token(&mut self) {
        let now = std::time::Instant::now();
        self.first.get_or_insert(now);
        self.last = Some(now);
        self.tokens += 1;
    }

    fn record(&self, state: &AppState) {
        let (Some(first), Some(last)) = (self.first, self.last) else {
            return;
        };
        if let Ok(mut st) = state.requests.lock() {
            st.first_token.observe((first - self.start).as_secs_f64());
            if self.tokens > 1 {
                st.per_token
                    .observe((last - first).as_secs_f64() / (self.tokens - 1) as f64);
            }
        }
    }
}

/// How each model is loaded and batched.
#[derive(Clone)]
struct LoadOpts {
    limits: batch::Limits,
    wait: std::time::Duration,
    max_batch_total_tokens: usize,
    admission: ferroformers::generation::Admission,
    aborting: Arc<std::sync::atomic::AtomicBool>,
    device: ferroformers::Device,
    dtype: Option<ferroformers::DType>,
    gguf_math: Option<ferroformers::QuantMath>,
    batch_invariant: Option<bool>,
}

fn load(spec: &ModelSpec, o: &LoadOpts) -> Result<Served, String> {
    let dir =
        ferroformers::hub::resolve_or_download(&spec.model, None).map_err(|e| e.to_string())?;
    let task = match &spec.task {
        Some(t) => t.clone(),
        None => ferroformers::pipelines::registry::infer_task(&dir)
            .ok_or_else(|| {
                format!(
                    "cannot tell the task of `{}` from its files: give it as {}=TASK",
                    spec.model, spec.model
                )
            })?
            .to_string(),
    };
    let mut opts = PipelineOptions {
        model: Some(spec.model.clone()),
        device: o.device.clone(),
        // Only GGUF files have it (others would warn that it is ignored).
        gguf_math: o
            .gguf_math
            .filter(|_| ferroformers::pipelines::registry::is_gguf(&dir)),
        ..PipelineOptions::default()
    };
    // On a GPU: the checkpoint's dtype unless `--dtype` says, batches of 32 (as `run`).
    ferroformers::fill_device_defaults(&task, &mut opts, o.dtype, None);
    let (dtype, cuda) = (opts.dtype, !opts.device.is_cpu());
    let device = opts.device.clone();
    let mut pipe = ferroformers::pipeline_with(&task, opts).map_err(|e| e.to_string())?;
    // candle queues a GPU's work on the calling thread's stream; requests run on other
    // threads, so the weights' copies must be done before this thread hands the model on.
    device.synchronize().map_err(|e| e.to_string())?;
    if o.max_batch_total_tokens > 0 {
        pipe.enable_continuous_batching_with(o.max_batch_total_tokens, o.admission);
    }
    // By default where it costs no speed: a request's answer then never depends on the load.
    let batch_invariant = pipe.task() == "text-generation"
        && pipe
            .set_batch_invariance(o.batch_invariant)
            .map_err(|e| format!("--batch-invariant: model `{}`: {e}", spec.model))?;
    // A prompt plus max_new_tokens past the context window is a 422, as TGI and vLLM answer.
    pipe.refuse_past_context();
    let task = pipe.task().to_string();
    let speech = (task == ASR).then(|| Speech::of_dir(&dir));
    // For token counts (`usage`, segments' `tokens`): the model's own tokenizer, when it has
    // one (a faster-whisper folder's config.json is CTranslate2's, without `model_type`).
    let config = ferroformers::config::ModelConfig::from_dir(&dir);
    let num_labels = config.as_ref().map_or(0, |c| c.id2label.len());
    let tokenizer = match config {
        Ok(c) => ferroformers::tokenizer::Tokenizer::from_dir(
            &dir,
            &c.model_type,
            ferroformers::models::max_positions(&c),
        )
        .ok(),
        Err(_) if matches!(speech, Some(Speech::Whisper { .. })) => {
            ferroformers::tokenizer::Tokenizer::from_dir(&dir, "whisper", Some(448)).ok()
        }
        Err(_) => None,
    }
    // A GGUF file has no tokenizer files beside it: the one the pipeline built from its
    // vocabulary.
    .or_else(|| pipe.tokenizer().cloned());
    let st_limit = (task == "sentence-embeddings")
        .then(|| {
            let v: Value =
                serde_json::from_slice(&std::fs::read(dir.join("sentence_bert_config.json")).ok()?)
                    .ok()?;
            Some(v.get("max_seq_length")?.as_u64()? as usize)
        })
        .flatten();
    let max_input = tokenizer
        .as_ref()
        .map(|t| st_limit.map_or(t.max_length, |s| s.min(t.max_length)));
    let pipe = Arc::new(pipe);
    let batcher = (task != "text-generation").then(|| {
        let aborting = o.aborting.clone();
        batch::Batcher::start(pipe.clone(), tokenizer.clone(), o.limits, o.wait, aborting)
    });
    Ok(Served {
        id: spec.model.clone(),
        task,
        pipe,
        tokenizer,
        batcher,
        speech,
        num_labels,
        max_input,
        dtype,
        cuda,
        batch_invariant,
        embedding_size: std::sync::OnceLock::new(),
    })
}

/// A bound, loaded server (`run` serves until SIGTERM or Ctrl-C).
pub struct Server {
    listener: tokio::net::TcpListener,
    app: Router,
    state: Arc<AppState>,
}

impl Server {
    /// Load every model and bind the address (port 0 picks a free one).
    pub async fn bind(cfg: Config) -> Result<Server, String> {
        if cfg.models.is_empty() {
            return Err("`serve` needs at least one --model".into());
        }
        if cfg.admission.idle_priority
            && !ferroformers::generation::Admission::idle_priority_available()
        {
            return Err(
                "--idle-priority: this process may not bring a thread back from the idle \
                        scheduling priority (it needs CAP_SYS_NICE or an RLIMIT_NICE of 20), \
                        or the system has none"
                    .into(),
            );
        }
        let specs = cfg.models.clone();
        let opts = LoadOpts {
            limits: batch::Limits {
                inputs: cfg.max_batch_inputs,
                tokens: cfg.max_batch_tokens,
            },
            wait: cfg.max_batch_wait,
            max_batch_total_tokens: cfg.max_batch_total_tokens,
            admission: cfg.admission,
            aborting: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            device: cfg.device.clone(),
            dtype: cfg.dtype,
            gguf_math: cfg.gguf_math,
            batch_invariant: cfg.batch_invariant,
        };
        let o = opts.clone();
        let mut models = tokio::task::spawn_blocking(move || {
            specs
                .iter()
                .map(|s| load(s, &o))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| e.to_string())??;
        if let Some(name) = &cfg.served_model_name {
            models[0].id = name.clone();
        }
        let state = Arc::new(AppState {
            models,
            api_key: cfg.api_key.clone(),
            payload_limit: cfg.payload_limit,
            max_client_batch_size: cfg.max_client_batch_size,
            max_best_of: cfg.max_best_of,
            auto_truncate: cfg.auto_truncate,
            batch_limits: opts.limits,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            admitted: std::sync::atomic::AtomicU64::new(0),
            on_idle: cfg.on_idle,
            idle_release_after: cfg.idle_release_after,
            max_concurrent_requests: cfg.max_concurrent_requests.max(1),
            draining: std::sync::atomic::AtomicBool::new(false),
            aborting: opts.aborting,
            graceful_shutdown_timeout: cfg.graceful_shutdown_timeout,
            cors_origins: cfg.cors_allow_origin.clone(),
            cancelled: std::sync::atomic::AtomicU64::new(0),
            max_queue_size: cfg.max_queue_size.max(1),
            max_batch_total_tokens: cfg.max_batch_total_tokens,
            admission: cfg.admission,
            request_timeout: cfg.request_timeout,
            log_requests: !cfg.quiet,
            requests: std::sync::Mutex::new(RequestStats::default()),
            scoring: Arc::new(tokio::sync::Semaphore::new(SCORING_AT_ONCE)),
        });
        let app = router(state.clone(), cfg.payload_limit);
        let addr = format!("{}:{}", cfg.hostname, cfg.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        Ok(Server {
            listener,
            app,
            state,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serve until SIGTERM or Ctrl-C; requests in flight finish first.
    pub async fn run(self) -> std::io::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serve until `stop` completes, then drain: `/ready` answers 503, new work is refused
    /// with 503, requests in flight (streams included) finish, and the call returns. Work
    /// still running after `graceful_shutdown_timeout` is cut short (see [`Config`]).
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        use std::future::IntoFuture;
        use std::sync::atomic::Ordering::SeqCst;
        let state = self.state.clone();
        let started = Arc::new(tokio::sync::Notify::new());
        let (st, s) = (state.clone(), started.clone());
        let serve = axum::serve(self.listener, self.app)
            .with_graceful_shutdown(async move {
                stop.await;
                st.draining.store(true, SeqCst);
                s.notify_one();
            })
            .into_future();
        tokio::pin!(serve);
        let _idle = state
            .idle_release_after
            .map(|after| AbortOnDrop(tokio::spawn(when_idle(state.clone(), after))));
        tokio::select! {
            r = &mut serve => return r,
            _ = started.notified() => {}
        }
        let grace = state.graceful_shutdown_timeout;
        tracing::info!(
            "shutting down: waiting up to {:.1} s for requests in flight",
            grace.as_secs_f64()
        );
        if let Ok(r) = tokio::time::timeout(grace, &mut serve).await {
            return r;
        }
        tracing::warn!(
            "requests still running after the graceful shutdown timeout ({:.1} s): cutting them short",
            grace.as_secs_f64()
        );
        state.aborting.store(true, SeqCst);
        // Generations stop at their next token and send their last event (batched ones too);
        // an encoder's pipeline call already running cannot be stopped, and is left behind.
        match tokio::time::timeout(CUT_WAIT, &mut serve).await {
            Ok(r) => r,
            Err(_) => {
                tracing::warn!("connections still open; exiting without them");
                Ok(())
            }
        }
    }
}

/// A task stopped when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Gives memory back each time the server has been idle for `after` (no request in flight,
/// none admitted meanwhile): drops the spare key/value buffers, then calls `on_idle`, on a
/// blocking thread. Once per idle spell: the next waits for new work and a new idle spell.
/// The first spell starts once the models are loaded. A SmolLM2 server at 16 concurrent
/// chats went from 1.07 GB under load to 0.66-0.73 GB idle (0.32 GB at start).
async fn when_idle(state: Arc<AppState>, after: std::time::Duration) {
    use std::sync::atomic::Ordering::SeqCst;
    let f = state.on_idle;
    let tick = (after / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    let mut seen = state.admitted.load(SeqCst);
    let mut quiet_since = tokio::time::Instant::now();
    let mut done = false;
    loop {
        tokio::time::sleep(tick).await;
        let admitted = state.admitted.load(SeqCst);
        if admitted != seen || state.in_flight.load(SeqCst) > 0 {
            seen = admitted;
            quiet_since = tokio::time::Instant::now();
            done = false;
        } else if !done && quiet_since.elapsed() >= after {
            done = true;
            let _ = tokio::task::spawn_blocking(move || {
                ferroformers::kernels::cpu::attention::drop_spare_buffers();
                if let Some(f) = f {
                    f();
                }
            })
            .await;
        }
    }
}

/// How long, once work in flight has been cut short, the server waits for its last answers.
const CUT_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// The answer for work cut short by the graceful shutdown timeout.
fn shut_down() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "Unavailable",
        "the server shut down before this request finished (graceful shutdown timeout)",
    )
}

/// Log lines on stderr for this process: `tracing` events filtered by `RUST_LOG` (default
/// `info`), as JSON objects when `json`. Does nothing when a subscriber is already set.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let _ = if json {
        fmt.json().flatten_event(true).try_init()
    } else {
        fmt.try_init()
    };
}

/// How long an idle blocking thread (each request's generation runs on one) lives: tokio's
/// 10 s, or half of `idle_release_after` when that is shorter, so that an idle server's
/// request threads have exited, handing their freed pages (~200 MB of a SmolLM2 server's) to
/// the allocator's shared arenas, before `on_idle` runs.
fn blocking_keep_alive(idle_release_after: Option<std::time::Duration>) -> std::time::Duration {
    let tokio_default = std::time::Duration::from_secs(10);
    idle_release_after.map_or(tokio_default, |d| (d / 2).min(tokio_default))
}

/// Load, bind and serve on a runtime of its own until SIGTERM or Ctrl-C (what the CLI calls),
/// logging through [`init_logging`].
pub fn serve_blocking(cfg: Config) -> Result<(), String> {
    init_logging(cfg.json_output);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_keep_alive(blocking_keep_alive(cfg.idle_release_after))
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let r = rt.block_on(async {
        let server = Server::bind(cfg).await?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        tracing::info!("listening on http://{addr}");
        server.run().await.map_err(|e| e.to_string())
    });
    // Work cut short may still hold blocking threads (a pipeline call cannot be stopped):
    // they are not waited for.
    rt.shutdown_timeout(std::time::Duration::from_millis(100));
    r
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

fn router(state: Arc<AppState>, payload_limit: usize) -> Router {
    Router::new()
        .route("/", post(inference_default))
        .route("/models/{*id}", post(inference_model))
        .route("/embed", post(tei_embed))
        .route("/predict", post(tei_predict))
        .route("/embed_all", post(tei::tei_embed_all))
        .route("/similarity", post(tei::tei_similarity))
        .route("/rerank", post(tei::tei_rerank))
        .route("/tokenize", post(tei::tei_tokenize))
        .route("/decode", post(tei::tei_decode))
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completions))
        .route("/v1/audio/transcriptions", post(openai_transcriptions))
        .route("/v1/audio/translations", post(openai_translations))
        .route("/generate", post(tgi_generate))
        .route("/generate_stream", post(tgi_generate_stream))
        .route("/v1/models", get(openai_models))
        .route("/info", get(info))
        .route("/metrics", get(metrics))
        .route("/api-doc/openapi.json", get(openapi))
        .route("/docs", get(docs))
        .route("/health", get(|| async { StatusCode::OK }))
        .route("/live", get(|| async { StatusCode::OK }))
        .route("/ready", get(ready))
        .fallback(|uri: Uri| async move {
            let e = ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no route {}", uri.path()),
            );
            e.shaped_for(uri.path())
        })
        .method_not_allowed_fallback(|method: axum::http::Method, uri: Uri| async move {
            let e = ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                format!("{} does not take {method} requests", uri.path()),
            );
            e.shaped_for(uri.path())
        })
        .layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ))
        .layer(DefaultBodyLimit::max(payload_limit))
        .layer(axum::middleware::from_fn_with_state(state.clone(), cors))
        .with_state(state)
}

/// An error as the route's family writes them.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    openai: bool,
    /// OpenAI's `param`: the request field at fault.
    param: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            openai: false,
            param: None,
        }
    }

    /// A failure on the server's side (a blocking task that died, an answer that would not
    /// serialize).
    fn backend(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "Backend", e.to_string())
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Validation", message)
    }

    /// In OpenAI's shape, with the generation parameters a message names called as the
    /// request called them (`max_tokens`, `stop`, `min_tokens`), and `param` set to it.
    fn openai(mut self) -> Self {
        self.openai = true;
        for (ours, theirs) in [
            ("max_new_tokens", "max_tokens"),
            ("stop_strings", "stop"),
            ("min_new_tokens", "min_tokens"),
        ] {
            if self.param.as_deref() == Some(ours) {
                self.param = Some(theirs.into());
                self.message = self
                    .message
                    .replace(&format!("`{ours}`"), &format!("`{theirs}`"))
                    .replace(&format!("{ours} "), &format!("{theirs} "))
                    .replace(&format!("({ours} "), &format!("({theirs} "));
            }
        }
        // Our messages about a request field name it first, in backticks: that is `param`.
        if self.param.is_none() && self.status.is_client_error() {
            self.param = self
                .message
                .strip_prefix('`')
                .and_then(|m| m.split_once('`'))
                .map(|(f, _)| f)
                .filter(|f| {
                    !f.is_empty()
                        && f.chars()
                            .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c))
                })
                .map(str::to_string);
        }
        self
    }

    /// In OpenAI's shape on `/v1/*` paths, else as it is.
    fn shaped_for(self, path: &str) -> Self {
        if path.starts_with("/v1/") {
            self.openai()
        } else {
            self
        }
    }

    /// A 400 naming the request field at fault (OpenAI's `param`).
    fn bad_request(param: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "BadRequest", message).with_param(param)
    }

    fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }
}

impl From<ferroformers::Error> for ApiError {
    fn from(e: ferroformers::Error) -> Self {
        use ferroformers::Error as E;
        let (status, kind) = match &e {
            E::UnknownParameter { .. }
            | E::InvalidParameter { .. }
            | E::InvalidInput { .. }
            | E::Tokenizer(_) => (StatusCode::UNPROCESSABLE_ENTITY, "Validation"),
            // Audio the client sent that cannot be decoded.
            E::Audio { .. } => (StatusCode::BAD_REQUEST, "BadRequest"),
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "Backend"),
        };
        let mut param = match &e {
            E::InvalidParameter { name, .. } | E::UnknownParameter { name, .. } => {
                Some(name.clone())
            }
            _ => None,
        };
        let mut message = e.to_string();
        // TGI's `frequency_penalty` runs as the pipeline's `tgi_frequency_penalty`: errors
        // name it as the request did.
        if param.as_deref() == Some("tgi_frequency_penalty") {
            message = message.replace("tgi_frequency_penalty", "frequency_penalty");
            param = Some("frequency_penalty".into());
        }
        let mut out = ApiError::new(status, kind, message);
        out.param = param;
        out
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = if self.openai {
            let kind = if self.status.is_client_error() {
                "invalid_request_error"
            } else {
                "server_error"
            };
            json!({"error": {"message": self.message, "type": kind, "param": self.param,
                             "code": self.status.as_u16()}})
        } else {
            json!({"error": self.message, "error_type": self.kind})
        };
        let mut r = (self.status, axum::Json(body)).into_response();
        r.extensions_mut().insert(ErrorKind(self.kind));
        r
    }
}

/// An error answer's `error_type`, kept on the response for the failure counter.
#[derive(Clone, Copy)]
struct ErrorKind(&'static str);

/// The request body's bytes: 413 over the payload limit, 400 when it cannot be read.
fn body_bytes(body: Result<Bytes, BytesRejection>) -> Result<Bytes, ApiError> {
    body.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::new(
                status,
                "PayloadTooLarge",
                "the request body is larger than the server's limit (`--payload-limit` bytes)",
            );
        }
        ApiError::new(status, "BadRequest", e.body_text())
    })
}

/// The request body as a JSON object: 415 without a JSON content type, 413 over the payload
/// limit, 400 when it does not parse.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body_bytes(body)?;
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "UnsupportedMediaType",
            "expected `Content-Type: application/json`",
        ));
    }
    let v: Value = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "BadRequest",
            format!("the body is not JSON: {e}"),
        )
    })?;
    if !v.is_object() {
        return Err(ApiError::validation("the body must be a JSON object"));
    }
    Ok(v)
}

/// The model a request names for a task: by id; a name that matches none falls to the only
/// model of that task when there is exactly one (TGI and llama.cpp's server ignore the name,
/// and clients such as `InferenceClient` send a placeholder); else 404.
fn model_for<'a>(state: &'a AppState, id: &str, task: &str) -> Result<&'a Served, ApiError> {
    if let Some(m) = state.models.iter().find(|m| m.id == id) {
        return Ok(m);
    }
    let mut of_task = state.models.iter().filter(|m| m.task == task);
    match (of_task.next(), of_task.next()) {
        (Some(m), None) => Ok(m),
        _ => model(state, Some(id)),
    }
}

fn model<'a>(state: &'a AppState, id: Option<&str>) -> Result<&'a Served, ApiError> {
    match id {
        None => Ok(&state.models[0]),
        Some(id) => state.models.iter().find(|m| m.id == id).ok_or_else(|| {
            let known: Vec<&str> = state.models.iter().map(|m| m.id.as_str()).collect();
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no model `{id}` (serving: {})", known.join(", ")),
            )
        }),
    }
}

/// `inputs` as one or several pipeline inputs (`true` when it was a list).
fn inputs_of(v: Option<&Value>, max: usize) -> Result<(Vec<Input>, bool), ApiError> {
    let (items, many) = input_items(v, max)?;
    let inputs = items
        .iter()
        .enumerate()
        .map(|(i, x)| Input::from_json(x, i))
        .collect::<ferroformers::Result<Vec<_>>>()?;
    Ok((inputs, many))
}

/// Texts that may come as token ids (OpenAI's completion `prompt` and embedding `input`, TEI's
/// embedding `inputs`): a string, a list of token ids, or a list of up to `max` strings or
/// lists of token ids (`field` names the field in errors).
pub(crate) fn texts_or_ids(
    v: Option<&Value>,
    field: &str,
    max: usize,
) -> Result<Vec<Input>, ApiError> {
    let bad = || {
        ApiError::validation(format!(
            "`{field}` must be a string, a list of token ids, or a list of strings or of lists \
             of token ids"
        ))
        .with_param(field)
    };
    let ids = |list: &[Value]| -> Result<Input, ApiError> {
        if list.is_empty() {
            return Err(
                ApiError::validation(format!("`{field}` has an empty list of token ids"))
                    .with_param(field),
            );
        }
        list.iter()
            .map(|x| {
                x.as_u64()
                    .and_then(|i| u32::try_from(i).ok())
                    .ok_or_else(bad)
            })
            .collect::<Result<Vec<u32>, _>>()
            .map(Input::Tokens)
    };
    match v {
        None => Err(ApiError::validation(format!("missing field `{field}`")).with_param(field)),
        Some(Value::String(s)) => Ok(vec![Input::Text(s.clone())]),
        Some(Value::Array(list)) if list.first().is_some_and(Value::is_number) => {
            Ok(vec![ids(list)?])
        }
        Some(Value::Array(list)) if !list.is_empty() => {
            if list.len() > max {
                return Err(too_many(list.len(), max).with_param(field));
            }
            list.iter()
                .map(|p| match p {
                    Value::String(s) => Ok(Input::Text(s.clone())),
                    Value::Array(l) => ids(l),
                    _ => Err(bad()),
                })
                .collect()
        }
        Some(Value::Array(_)) => Err(ApiError::validation(format!(
            "`{field}` cannot be an empty list"
        ))
        .with_param(field)),
        _ => Err(bad()),
    }
}

/// The items of `inputs` (`true` when it was a list): present, not empty, at most `max`. A
/// list of `{"role", "content"}` messages is one chat, as transformers' pipeline reads it.
pub(crate) fn input_items(v: Option<&Value>, max: usize) -> Result<(Vec<&Value>, bool), ApiError> {
    let v = v.ok_or_else(|| ApiError::validation("missing field `inputs`"))?;
    let (items, many) = match v {
        Value::Array(a) if !ferroformers::pipelines::text_generation::is_chat(a) => {
            (a.iter().collect::<Vec<_>>(), true)
        }
        other => (vec![other], false),
    };
    if items.is_empty() {
        return Err(ApiError::validation("`inputs` cannot be empty"));
    }
    if items.len() > max {
        return Err(too_many(items.len(), max));
    }
    Ok((items, many))
}

/// 413 for `n` inputs where at most `max` are allowed (TEI's wording).
pub(crate) fn too_many(n: usize, max: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "Validation",
        format!("batch size {n} > maximum allowed batch size {max}"),
    )
}

/// An optional request count (absent or null: 0) that must be an integer from 0 to `max`
/// (OpenAI's `top_logprobs` up to 20, TGI's `top_n_tokens` up to its default limit of 5).
pub(crate) fn count_at_most(v: Option<&Value>, name: &str, max: u64) -> Result<usize, ApiError> {
    match v {
        None | Some(Value::Null) => Ok(0),
        Some(n) => match n.as_u64() {
            Some(n) if n <= max => Ok(n as usize),
            _ => Err(ApiError::validation(format!(
                "`{name}` must be an integer from 0 to {max}"
            ))),
        },
    }
}

fn params_of(v: &Value) -> Result<Params, ApiError> {
    match v.get("parameters") {
        None | Some(Value::Null) => Ok(Params::new()),
        Some(Value::Object(m)) => Ok(m.clone().into_iter().collect()),
        Some(_) => Err(ApiError::validation("`parameters` must be an object")),
    }
}

/// Run a pipeline off the async threads: through the model's batch queue, or (generation)
/// on a blocking thread of its own.
async fn run(
    state: &Arc<AppState>,
    index: usize,
    inputs: Vec<Input>,
    params: Params,
) -> Result<Vec<Output>, ApiError> {
    if let Some(b) = &state.models[index].batcher {
        return b.run(inputs, params).await;
    }
    let state = state.clone();
    // A generation joins its model's continuous batch (several prompts: the first, then the
    // next when it is done, or a batch of their own with `batch_size`): announced, so that an
    // idle batch waits for it while it is tokenized.
    let arrival = state.models[index].pipe.announce();
    tokio::task::spawn_blocking(move || {
        ferroformers::generation::arriving(arrival, || {
            state.models[index].pipe.run(&inputs, &params)
        })
    })
    .await
    .map_err(ApiError::backend)?
    .map_err(ApiError::from)
}

/// A pipeline's outputs as JSON: the list for a list of inputs, else the one output.
fn outputs_json(out: &[Output], many: bool) -> Result<Response, ApiError> {
    let body = if many {
        serde_json::to_value(out)
    } else {
        serde_json::to_value(&out[0])
    }
    .map_err(ApiError::backend)?;
    Ok(axum::Json(body).into_response())
}

fn index_of(state: &AppState, m: &Served) -> usize {
    state
        .models
        .iter()
        .position(|x| std::ptr::eq(x, m))
        .unwrap_or(0)
}

/// `float32`, `float16` or `bfloat16` (TEI's `model_dtype`).
fn dtype_name(d: ferroformers::DType) -> &'static str {
    match d {
        ferroformers::DType::F16 => "float16",
        ferroformers::DType::BF16 => "bfloat16",
        _ => "float32",
    }
}

async fn info(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| {
            let mut o = json!({"model_id": m.id, "task": m.task});
            if m.task == "text-generation" {
                o["batch_invariant"] = json!(m.batch_invariant);
            }
            o
        })
        .collect();
    let first = &state.models[0];
    let mut o = Map::new();
    o.insert("model_id".into(), json!(first.id));
    o.insert("task".into(), json!(first.task));
    // TEI's and TGI's names: the dtype as torch spells it without `torch.`, the device type.
    o.insert("model_dtype".into(), json!(dtype_name(first.dtype)));
    o.insert(
        "model_device_type".into(),
        json!(if first.cuda { "cuda" } else { "cpu" }),
    );
    o.insert("models".into(), json!(models));
    o.insert(
        "max_client_batch_size".into(),
        json!(state.max_client_batch_size),
    );
    o.insert(
        "max_concurrent_requests".into(),
        json!(state.max_concurrent_requests),
    );
    o.insert("max_best_of".into(), json!(state.max_best_of));
    if state.models.iter().any(|m| m.batcher.is_some()) {
        // TEI's names for the encoder batches' limits.
        o.insert("max_batch_tokens".into(), json!(state.batch_limits.tokens));
        o.insert(
            "max_batch_requests".into(),
            json!(state.batch_limits.inputs),
        );
    }
    if state.models.iter().any(|m| m.task == "text-generation") {
        // TGI's names for the continuous batch's limits.
        o.insert(
            "max_batch_total_tokens".into(),
            json!(state.max_batch_total_tokens),
        );
        o.insert(
            "max_waiting_tokens".into(),
            json!(state.admission.max_waiting_tokens),
        );
        o.insert(
            "waiting_served_ratio".into(),
            json!(state.admission.waiting_served_ratio),
        );
        o.insert(
            "max_batch_prefill_tokens".into(),
            json!(state.admission.max_prefill_tokens),
        );
        o.insert(
            "prefill_priority".into(),
            json!(state.admission.prefill_priority),
        );
        o.insert("idle_priority".into(), json!(state.admission.idle_priority));
        o.insert(
            "arrival_wait_ms".into(),
            json!(state.admission.arrival_wait.as_secs_f64() * 1e3),
        );
        o.insert("batch_invariant".into(), json!(first.batch_invariant));
    }
    o.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    axum::Json(Value::Object(o)).into_response()
}

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each fixture's task from its files: architectures through the library's head reading,
    /// generation classes, a sentence-transformers folder.
    #[test]
    fn base64_and_specs() {
        assert_eq!(base64_encode(b"Man"), "TWFu");
        assert_eq!(base64_encode(b"Ma"), "TWE=");
        assert_eq!(base64_encode(b"M"), "TQ==");
        let s = ModelSpec::parse("org/model=token-classification");
        assert_eq!(
            (s.model.as_str(), s.task.as_deref()),
            ("org/model", Some("token-classification"))
        );
        assert!(ModelSpec::parse("org/model").task.is_none());
        assert!(constant_time_eq(b"key", b"key"));
        assert!(!constant_time_eq(b"key", b"kez") && !constant_time_eq(b"key", b"keys"));
    }

    /// Past the graceful shutdown timeout, generations in flight stop at their next token: a
    /// TGI stream sends the tokens so far and an error event, an OpenAI stream an error and
    /// `[DONE]`, a whole answer is 503. (Set here before the requests start, so that the
    /// test does not race a generation that would otherwise finish first.)
    #[test]
    fn work_cut_short_ends_with_an_error() {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/decoders/models/llama");
        let cfg = Config {
            models: vec![ModelSpec::parse(&format!(
                "{}=text-generation",
                dir.display()
            ))],
            port: 0,
            quiet: true,
            ..Config::default()
        };
        let rt = tokio::runtime::Runtime::new().unwrap();
        let server = rt.block_on(Server::bind(cfg)).unwrap();
        server
            .state
            .aborting
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let base = format!("http://{}", server.local_addr().unwrap());
        std::thread::spawn(move || rt.block_on(server.run_until(std::future::pending())));
        let post = |path: &str, body: Value| match ureq::post(&format!("{base}{path}"))
            .set("Content-Type", "application/json")
            .send_string(&body.to_string())
        {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("{e}"),
        };
        let events = |raw: &str| -> Vec<String> {
            raw.split("\n\n")
                .filter_map(|e| e.strip_prefix("data:"))
                .map(|e| e.trim().to_string())
                .collect()
        };
        let params = json!({"max_new_tokens": 20, "do_sample": false});
        let (status, raw) = post(
            "/generate_stream",
            json!({"inputs": "Once upon a time", "parameters": params}),
        );
        assert_eq!(status, 200);
        let ev = events(&raw);
        assert_eq!(ev.len(), 2, "{raw}");
        let token: Value = serde_json::from_str(&ev[0]).unwrap();
        assert!(token["token"]["id"].is_u64(), "{raw}");
        let last: Value = serde_json::from_str(&ev[1]).unwrap();
        assert_eq!(last["error_type"], "shutdown", "{raw}");
        let (status, raw) = post(
            "/v1/completions",
            json!({"prompt": "Once upon a time", "max_tokens": 20, "stream": true}),
        );
        assert_eq!(status, 200);
        let ev = events(&raw);
        assert_eq!(ev.last().map(String::as_str), Some("[DONE]"), "{raw}");
        let err: Value = serde_json::from_str(&ev[ev.len() - 2]).unwrap();
        assert_eq!(err["error"]["code"], 503, "{raw}");
        assert!(ev.len() <= 3, "more than one token after the cut: {raw}");
        let (status, raw) = post(
            "/generate",
            json!({"inputs": "Once upon a time", "parameters": params}),
        );
        assert_eq!(status, 503, "{raw}");
        assert!(raw.contains("shut down"), "{raw}");
    }
}
