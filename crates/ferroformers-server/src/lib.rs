//! `ferroformers serve`: the pipelines behind HTTP routes that existing clients already speak.
//!
//! - TEI: `POST /embed`, `/predict`; `GET /health`, `/info`;
//! - the HF Inference API: `POST /` and `/models/{id}` with `{inputs, parameters}` for every
//!   task (the pipeline's own output shapes);
//! - OpenAI: `POST /v1/chat/completions`, `/v1/completions` (both also streamed as server-sent
//!   events), `/v1/embeddings` (float and base64), `GET /v1/models`;
//! - TGI: `POST /generate`, `/generate_stream` (token events), and `POST /` on a generation
//!   model as TGI answers it;
//! - probes: `GET /live`, `/ready`; Prometheus counters at `GET /metrics`; the OpenAPI
//!   document at `GET /api-doc/openapi.json` and a page of the routes at `GET /docs`.
//!
//! Encoder models batch dynamically: requests that wait together run as one pipeline call
//! ([`batch`]).
//!
//! Errors are JSON everywhere: `{"error", "error_type"}` on the HF/TEI routes, OpenAI's
//! `{"error": {message, type, param, code}}` on `/v1/*`. The pipelines stay synchronous
//! library code and run on blocking threads (their products use the rayon pool). Not yet:
//! continuous batching for generation.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ferroformers::{Input, Output, Params, Pipeline, PipelineOptions};
use serde_json::{json, Map, Value};

mod batch;

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
    /// How long a batch's first request waits for others to join (default 0: a batch is
    /// whatever is queued when the model is free).
    pub max_batch_wait: std::time::Duration,
    /// Requests running or queued at once; more are answered 429 at once (TGI: 128).
    pub max_concurrent_requests: usize,
    /// `--cors-allow-origin`: origins (or `*`) whose browser pages may call the server.
    pub cors_allow_origin: Vec<String>,
    /// Requests waiting in the models' batch queues at once; more are answered 429.
    pub max_queue_size: usize,
    /// A request that has not started answering after this long gets 504 (its work stops).
    pub request_timeout: Option<std::time::Duration>,
    /// One log line per request on stderr: JSON (`--json-output`) or plain text.
    pub json_output: bool,
    /// No per-request log lines.
    pub quiet: bool,
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
            max_batch_wait: std::time::Duration::ZERO,
            max_concurrent_requests: 128,
            cors_allow_origin: Vec::new(),
            max_queue_size: 256,
            request_timeout: None,
            json_output: false,
            quiet: false,
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
}

struct AppState {
    models: Vec<Served>,
    api_key: Option<String>,
    max_client_batch_size: usize,
    /// Requests running or waiting (the POST routes), against `max_concurrent_requests`.
    in_flight: std::sync::atomic::AtomicUsize,
    max_concurrent_requests: usize,
    /// Set on SIGTERM: `/ready` answers 503 and new work is refused while work in flight ends.
    draining: std::sync::atomic::AtomicBool,
    /// Origins a browser may call from (`*` for any); empty: no CORS headers.
    cors_origins: Vec<String>,
    /// Generations stopped because their client had gone.
    cancelled: std::sync::atomic::AtomicU64,
    max_queue_size: usize,
    request_timeout: Option<std::time::Duration>,
    log: Option<LogFormat>,
    requests: std::sync::Mutex<RequestStats>,
}

#[derive(Clone, Copy)]
enum LogFormat {
    Text,
    Json,
}

/// Upper bounds (seconds) of the request-duration histogram's buckets.
const BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Per route: answers by status, and a histogram of durations (until the answer's head).
#[derive(Default)]
struct RequestStats {
    count: std::collections::BTreeMap<(String, u16), u64>,
    duration: std::collections::BTreeMap<String, Histogram>,
    /// Generation: request start to first token, and the mean time per later token.
    first_token: Histogram,
    per_token: Histogram,
}

/// A Prometheus histogram over [`BUCKETS`] (seconds).
#[derive(Default, Clone)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, secs: f64) {
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

/// Cleared when a request's handler is dropped (hyper drops it when the client goes), so the
/// generation running for it stops at its next token.
struct ClientAlive(Arc<std::sync::atomic::AtomicBool>);

impl Drop for ClientAlive {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

/// Generate on a blocking thread; the generation stops early if the handler is dropped.
async fn generate_blocking(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
) -> Result<(Output, ferroformers::pipelines::text_generation::Usage), ApiError> {
    generate_with_tokens(state, index, input, params)
        .await
        .map(|(o, u, _)| (o, u))
}

/// [`generate_blocking`], also returning each token's text and log-probability (OpenAI's
/// `logprobs`).
async fn generate_with_tokens(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
) -> Result<
    (
        Output,
        ferroformers::pipelines::text_generation::Usage,
        Vec<(String, f32)>,
    ),
    ApiError,
> {
    use std::sync::atomic::Ordering::SeqCst;
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let _watch = ClientAlive(alive.clone());
    let st = state.clone();
    let mut clock = TokenClock::new();
    tokio::task::spawn_blocking(move || {
        let mut tokens: Vec<(String, f32)> = Vec::new();
        let out = st.models[index]
            .pipe
            .run_streaming(&input, &params, &mut |t| {
                if t.tail {
                    if let Some(last) = tokens.last_mut() {
                        last.0.push_str(t.text);
                    }
                } else {
                    clock.token();
                    tokens.push((t.text.to_string(), t.logprob));
                }
                alive.load(SeqCst)
            });
        if !alive.load(SeqCst) {
            st.cancelled.fetch_add(1, SeqCst);
        }
        clock.record(&st);
        out.map(|(o, u)| (o, u, tokens))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Backend", e.to_string()))?
    .map_err(ApiError::from)
}

/// OpenAI's `logprobs.content` entry for one token (no alternatives: `top_logprobs` is not
/// supported).
fn logprob_entry(text: &str, logprob: f32) -> Value {
    json!({"token": text, "logprob": logprob, "bytes": text.as_bytes(), "top_logprobs": []})
}

/// The task a model folder was made for: its config's `architectures`, a sentence-transformers
/// folder, a GGUF file.
pub fn infer_task(dir: &Path) -> Option<&'static str> {
    if dir.join("modules.json").is_file() {
        return Some("sentence-embeddings");
    }
    if dir.is_file() && dir.extension().is_some_and(|e| e == "gguf") {
        return Some("text-generation");
    }
    let cfg = ferroformers::config::ModelConfig::from_dir(dir).ok()?.raw;
    let arch = cfg
        .get("architectures")?
        .as_array()?
        .first()?
        .as_str()?
        .to_string();
    let task = if arch.ends_with("ForSequenceClassification") {
        "text-classification"
    } else if arch.ends_with("ForTokenClassification") {
        "token-classification"
    } else if arch.ends_with("ForQuestionAnswering") {
        "question-answering"
    } else if arch.ends_with("ForMaskedLM") {
        "fill-mask"
    } else if arch.ends_with("ForCausalLM") || arch.ends_with("LMHeadModel") {
        "text-generation"
    } else if arch.ends_with("ForConditionalGeneration") || arch.ends_with("MTModel") {
        "text2text-generation"
    } else if arch.ends_with("Model") {
        "feature-extraction"
    } else {
        return None;
    };
    Some(task)
}

fn load(
    spec: &ModelSpec,
    max_batch_inputs: usize,
    wait: std::time::Duration,
) -> Result<Served, String> {
    let dir =
        ferroformers::hub::resolve_or_download(&spec.model, None).map_err(|e| e.to_string())?;
    let task = match &spec.task {
        Some(t) => t.clone(),
        None => infer_task(&dir)
            .ok_or_else(|| {
                format!(
                    "cannot tell the task of `{}` from its files: give it as {}=TASK",
                    spec.model, spec.model
                )
            })?
            .to_string(),
    };
    let opts = PipelineOptions {
        model: Some(spec.model.clone()),
        ..PipelineOptions::default()
    };
    let pipe = ferroformers::pipeline_with(&task, opts).map_err(|e| e.to_string())?;
    // For token counts (`usage`): the model's own tokenizer, when it has one.
    let tokenizer = ferroformers::config::ModelConfig::from_dir(&dir)
        .ok()
        .and_then(|c| {
            ferroformers::tokenizer::Tokenizer::from_dir(
                &dir,
                &c.model_type,
                ferroformers::models::max_positions(&c),
            )
            .ok()
        });
    let task = pipe.task().to_string();
    let pipe = Arc::new(pipe);
    let batcher = (task != "text-generation")
        .then(|| batch::Batcher::start(pipe.clone(), max_batch_inputs, wait));
    Ok(Served {
        id: spec.model.clone(),
        task,
        pipe,
        tokenizer,
        batcher,
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
        let specs = cfg.models.clone();
        let (max_batch, wait) = (cfg.max_batch_inputs, cfg.max_batch_wait);
        let mut models = tokio::task::spawn_blocking(move || {
            specs
                .iter()
                .map(|s| load(s, max_batch, wait))
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
            max_client_batch_size: cfg.max_client_batch_size,
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            max_concurrent_requests: cfg.max_concurrent_requests.max(1),
            draining: std::sync::atomic::AtomicBool::new(false),
            cors_origins: cfg.cors_allow_origin.clone(),
            cancelled: std::sync::atomic::AtomicU64::new(0),
            max_queue_size: cfg.max_queue_size.max(1),
            request_timeout: cfg.request_timeout,
            log: (!cfg.quiet).then_some(if cfg.json_output {
                LogFormat::Json
            } else {
                LogFormat::Text
            }),
            requests: std::sync::Mutex::new(RequestStats::default()),
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
    /// with 503, requests in flight (streams included) finish, and the call returns.
    pub async fn run_until(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let state = self.state.clone();
        axum::serve(self.listener, self.app)
            .with_graceful_shutdown(async move {
                stop.await;
                state
                    .draining
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            })
            .await
    }
}

/// Load, bind and serve on a runtime of its own until SIGTERM or Ctrl-C (what the CLI calls).
pub fn serve_blocking(cfg: Config) -> Result<(), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        let server = Server::bind(cfg).await?;
        let addr = server.local_addr().map_err(|e| e.to_string())?;
        eprintln!("listening on http://{addr}");
        server.run().await.map_err(|e| e.to_string())
    })
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
        .route("/v1/embeddings", post(openai_embeddings))
        .route("/v1/chat/completions", post(openai_chat))
        .route("/v1/completions", post(openai_completions))
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
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("no route {}", uri.path()),
            )
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

async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if state.draining.load(std::sync::atomic::Ordering::SeqCst) {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "the server is shutting down",
        )
        .into_response()
    } else {
        StatusCode::OK.into_response()
    }
}

/// Counts a request in flight while it lives.
struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The POST routes' admission: 503 while draining, 429 with `Retry-After` beyond
/// `max_concurrent_requests` (decided before any response byte, streams included).
async fn admit(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use std::sync::atomic::Ordering::SeqCst;
    if req.method() != axum::http::Method::POST {
        return next.run(req).await;
    }
    let openai = req.uri().path().starts_with("/v1/");
    let shape = |e: ApiError| if openai { e.openai() } else { e };
    if state.draining.load(SeqCst) {
        return shape(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "Unavailable",
            "the server is shutting down",
        ))
        .into_response();
    }
    if state.in_flight.fetch_add(1, SeqCst) >= state.max_concurrent_requests {
        state.in_flight.fetch_sub(1, SeqCst);
        let mut r = shape(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Overloaded",
            format!(
                "the server is overloaded: {} requests in flight already",
                state.max_concurrent_requests
            ),
        ))
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    }
    let queued: u64 = state
        .models
        .iter()
        .filter_map(|m| m.batcher.as_ref())
        .map(|b| b.stats.queued.load(SeqCst))
        .sum();
    if queued as usize >= state.max_queue_size {
        let mut r = shape(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "Overloaded",
            format!(
                "the queue is full: {queued} requests waiting (max_queue_size {})",
                state.max_queue_size
            ),
        ))
        .into_response();
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        return r;
    }
    let guard = InFlight(state.clone());
    let resp = match state.request_timeout {
        None => next.run(req).await,
        Some(limit) => match tokio::time::timeout(limit, next.run(req)).await {
            Ok(r) => r,
            // The handler is dropped: its queued work is skipped, its generation stops.
            Err(_) => {
                return shape(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "Timeout",
                    format!(
                        "no answer within the request timeout ({:.1} s)",
                        limit.as_secs_f64()
                    ),
                ))
                .into_response()
            }
        },
    };
    // A streamed body keeps its slot until it has been sent.
    let (parts, body) = resp.into_parts();
    let body = axum::body::Body::new(GuardedBody {
        inner: body,
        _guard: guard,
    });
    Response::from_parts(parts, body)
}

/// Per request: counts and a duration histogram by route for `/metrics`, and one log line.
async fn observe(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let start = std::time::Instant::now();
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("other", |m| m.as_str())
        .to_string();
    let (method, path) = (req.method().to_string(), req.uri().path().to_string());
    let resp = next.run(req).await;
    let secs = start.elapsed().as_secs_f64();
    let status = resp.status().as_u16();
    if let Ok(mut st) = state.requests.lock() {
        *st.count.entry((route.clone(), status)).or_default() += 1;
        st.duration.entry(route.clone()).or_default().observe(secs);
    }
    match state.log {
        Some(LogFormat::Json) => eprintln!(
            "{}",
            json!({"timestamp": unix_time(), "method": method, "path": path, "route": route,
                   "status": status, "duration_ms": secs * 1000.0})
        ),
        Some(LogFormat::Text) => {
            eprintln!("{method} {path} {status} {:.1} ms", secs * 1000.0)
        }
        None => {}
    }
    resp
}

/// A response body that holds an [`InFlight`] slot until it is dropped.
struct GuardedBody {
    inner: axum::body::Body,
    _guard: InFlight,
}

impl axum::body::HttpBody for GuardedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// `--cors-allow-origin`: preflights answered (204) for the allowed origins, with the
/// `Authorization` and `Content-Type` headers allowed; every answer to them carries
/// `Access-Control-Allow-Origin`.
async fn cors(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let allowed = origin.as_deref().and_then(|o| {
        if state.cors_origins.iter().any(|a| a == "*") {
            Some("*".to_string())
        } else {
            state
                .cors_origins
                .iter()
                .any(|a| a == o)
                .then(|| o.to_string())
        }
    });
    let Some(allow) = allowed else {
        return next.run(req).await;
    };
    let value = |s: &str| header::HeaderValue::from_str(s).ok();
    let mut resp = if req.method() == axum::http::Method::OPTIONS {
        let mut r = StatusCode::NO_CONTENT.into_response();
        let h = r.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            header::HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            header::HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            header::HeaderValue::from_static("600"),
        );
        r
    } else {
        next.run(req).await
    };
    if let Some(v) = value(&allow) {
        resp.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    resp.headers_mut()
        .insert(header::VARY, header::HeaderValue::from_static("origin"));
    resp
}

/// An error as the route's family writes them.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
    openai: bool,
}

impl ApiError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            kind,
            message: message.into(),
            openai: false,
        }
    }

    fn validation(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "Validation", message)
    }

    fn openai(mut self) -> Self {
        self.openai = true;
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
            _ => (StatusCode::INTERNAL_SERVER_ERROR, "Backend"),
        };
        ApiError::new(status, kind, e.to_string())
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
            json!({"error": {"message": self.message, "type": kind, "param": null,
                             "code": self.status.as_u16()}})
        } else {
            json!({"error": self.message, "error_type": self.kind})
        };
        (self.status, axum::Json(body)).into_response()
    }
}

async fn require_api_key(
    State(state): State<Arc<AppState>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let public = matches!(
        req.uri().path(),
        "/health" | "/live" | "/ready" | "/metrics" | "/docs" | "/api-doc/openapi.json"
    );
    if let (Some(key), false) = (&state.api_key, public) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !constant_time_eq(given.as_bytes(), key.as_bytes()) {
            let e = ApiError::new(
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "a valid `Authorization: Bearer <api key>` header is required",
            );
            let e = if req.uri().path().starts_with("/v1/") {
                e.openai()
            } else {
                e
            };
            return e.into_response();
        }
    }
    next.run(req).await
}

/// Equal lengths and bytes, in time that does not depend on where they differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// The request body as a JSON object: 415 without a JSON content type, 413 over the payload
/// limit, 400 when it does not parse.
fn json_body(headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Result<Value, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status();
        let kind = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "PayloadTooLarge"
        } else {
            "BadRequest"
        };
        ApiError::new(status, kind, e.body_text())
    })?;
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
    let v = v.ok_or_else(|| ApiError::validation("missing field `inputs`"))?;
    let (items, many) = match v {
        Value::Array(a) => (a.iter().collect::<Vec<_>>(), true),
        other => (vec![other], false),
    };
    if items.is_empty() {
        return Err(ApiError::validation("`inputs` cannot be empty"));
    }
    if items.len() > max {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Validation",
            format!(
                "batch size {} > maximum allowed batch size {max}",
                items.len()
            ),
        ));
    }
    let inputs = items
        .iter()
        .enumerate()
        .map(|(i, x)| Input::from_json(x, i))
        .collect::<ferroformers::Result<Vec<_>>>()?;
    Ok((inputs, many))
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
        return b.run(inputs, params).await.map_err(ApiError::from);
    }
    let state = state.clone();
    tokio::task::spawn_blocking(move || state.models[index].pipe.run(&inputs, &params))
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Backend", e.to_string()))?
        .map_err(ApiError::from)
}

fn index_of(state: &AppState, m: &Served) -> usize {
    state
        .models
        .iter()
        .position(|x| std::ptr::eq(x, m))
        .unwrap_or(0)
}

async fn inference(
    state: Arc<AppState>,
    id: Option<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let m = model(&state, id.as_deref())?;
    let index = index_of(&state, m);
    if m.task == "text-generation" && v.get("inputs").is_some_and(Value::is_string) {
        // TGI's `POST /`: its parameters, `stream` for token events, else the Inference
        // API's `[{generated_text}]` (full text unless `return_full_text` is false).
        let (input, params, details) = tgi_request_with(&v, true)?;
        if v.get("stream").and_then(Value::as_bool) == Some(true) {
            return Ok(tgi_stream(&state, index, input, params, details));
        }
        let (out, usage) = generate_blocking(&state, index, input, params).await?;
        let mut one = json!({"generated_text": generated_text(&out)});
        if details {
            one["details"] = json!({
                "finish_reason": if usage.hit_limit { "length" } else { "eos_token" },
                "generated_tokens": usage.completion_tokens,
            });
        }
        return Ok(axum::Json(json!([one])).into_response());
    }
    let (inputs, many) = inputs_of(v.get("inputs"), state.max_client_batch_size)?;
    let params = params_of(&v)?;
    let out = run(&state, index, inputs, params).await?;
    let body = if many {
        serde_json::to_value(&out)
    } else {
        serde_json::to_value(&out[0])
    }
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Backend", e.to_string()))?;
    Ok(axum::Json(body).into_response())
}

async fn inference_default(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    inference(state, None, headers, body).await
}

/// `/models/{id}` and `/models/{id}/pipeline/{task}` (the task must be the model's).
async fn inference_model(
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
        let canonical = ferroformers::TASKS
            .iter()
            .find(|t| t.name == task || t.aliases.contains(&task.as_str()))
            .map(|t| t.name);
        if canonical != Some(m.task.as_str()) {
            return Err(ApiError::validation(format!(
                "`{id}` serves {}, not {task}",
                m.task
            )));
        }
    }
    inference(state, Some(id), headers, body).await
}

/// The embedding model to use: the named one or the first that embeds.
fn embedder<'a>(state: &'a AppState, id: Option<&str>) -> Result<&'a Served, ApiError> {
    let m = match id {
        Some(id) => model(state, Some(id))?,
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

fn embeddings_of(out: Vec<Output>) -> Result<Vec<Vec<f32>>, ApiError> {
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
async fn tei_embed(
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
async fn tei_predict(
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
    let body = if many {
        serde_json::to_value(&out)
    } else {
        serde_json::to_value(&out[0])
    }
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "Backend", e.to_string()))?;
    Ok(axum::Json(body).into_response())
}

/// OpenAI `/v1/embeddings`: `{input, model, encoding_format}`.
async fn openai_embeddings(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let inner = async {
        let v = json_body(&headers, body)?;
        let m = embedder(&state, v.get("model").and_then(Value::as_str))?;
        let index = index_of(&state, m);
        let texts: Vec<String> = match v.get("input") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            Some(_) => {
                return Err(ApiError::validation(
                    "`input` must be a string or a list of strings",
                ))
            }
            None => return Err(ApiError::validation("missing field `input`")),
        };
        let base64 = match v.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(ApiError::validation(format!(
                    "`encoding_format` is float or base64, not `{other}`"
                )))
            }
        };
        let tokens: usize = match &m.tokenizer {
            Some(t) => texts
                .iter()
                .map(|x| t.encode(x, None).map(|e| e.len()).unwrap_or(0))
                .sum(),
            None => 0,
        };
        let inputs: Vec<Input> = texts.into_iter().map(Input::from).collect();
        if inputs.is_empty() || inputs.len() > state.max_client_batch_size {
            return Err(ApiError::validation(format!(
                "between 1 and {} inputs per request",
                state.max_client_batch_size
            )));
        }
        let mut params = Params::new();
        params.insert("normalize".into(), json!(true));
        let vecs = embeddings_of(run(&state, index, inputs, params).await?)?;
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

async fn openai_models(State(state): State<Arc<AppState>>) -> Response {
    let data: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"id": m.id, "object": "model", "created": 0, "owned_by": "ferroformers"}))
        .collect();
    axum::Json(json!({"object": "list", "data": data})).into_response()
}

/// Prometheus text format: per model, requests waiting, batches run, requests and inputs in
/// them, the largest batch, requests dropped because their client had gone.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    use std::fmt::Write;
    use std::sync::atomic::Ordering::Relaxed;
    let mut out = String::new();
    type Series = (
        &'static str,
        &'static str,
        &'static str,
        fn(&batch::Stats) -> u64,
    );
    let series: [Series; 6] = [
        (
            "ferroformers_queue_size",
            "gauge",
            "requests waiting for a batch",
            |s| s.queued.load(Relaxed),
        ),
        (
            "ferroformers_batch_count",
            "counter",
            "pipeline calls run by the batcher",
            |s| s.batches.load(Relaxed),
        ),
        (
            "ferroformers_batch_requests_total",
            "counter",
            "requests in those calls",
            |s| s.batched_requests.load(Relaxed),
        ),
        (
            "ferroformers_batch_inputs_total",
            "counter",
            "inputs in those calls",
            |s| s.batched_inputs.load(Relaxed),
        ),
        (
            "ferroformers_batch_max_inputs",
            "gauge",
            "largest call so far, in inputs",
            |s| s.largest_batch.load(Relaxed),
        ),
        (
            "ferroformers_dropped_requests_total",
            "counter",
            "requests whose client left before they ran",
            |s| s.dropped.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for m in &state.models {
            if let Some(b) = &m.batcher {
                let id = m.id.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "{name}{{model=\"{id}\"}} {}", get(&b.stats));
            }
        }
    }
    if let Ok(st) = state.requests.lock() {
        let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "# HELP ferroformers_request_count answers by route and status\n\
             # TYPE ferroformers_request_count counter"
        );
        for ((route, status), n) in &st.count {
            let _ = writeln!(
                out,
                "ferroformers_request_count{{route=\"{}\",status=\"{status}\"}} {n}",
                esc(route)
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferroformers_request_duration_seconds time to each answer's head, by \
             route\n# TYPE ferroformers_request_duration_seconds histogram"
        );
        for (route, h) in &st.duration {
            h.write(
                &mut out,
                "ferroformers_request_duration_seconds",
                &format!("route=\"{}\",", esc(route)),
            );
        }
        let _ = writeln!(
            out,
            "# HELP ferroformers_time_to_first_token_seconds generation: request start to first \
             token\n# TYPE ferroformers_time_to_first_token_seconds histogram"
        );
        st.first_token
            .write(&mut out, "ferroformers_time_to_first_token_seconds", "");
        let _ = writeln!(
            out,
            "# HELP ferroformers_time_per_output_token_seconds generation: mean time per token \
             after the first\n# TYPE ferroformers_time_per_output_token_seconds histogram"
        );
        st.per_token
            .write(&mut out, "ferroformers_time_per_output_token_seconds", "");
    }
    let _ = writeln!(
        out,
        "# HELP ferroformers_generations_cancelled_total generations stopped because their \
         client had gone\n# TYPE ferroformers_generations_cancelled_total counter\n\
         ferroformers_generations_cancelled_total {}",
        state.cancelled.load(Relaxed)
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The routes as OpenAPI 3 (written by hand; a test keeps it and the router in step).
const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A page listing the routes from the OpenAPI document (no assets from elsewhere: the server
/// may have no internet).
async fn docs() -> Response {
    let spec: Value = serde_json::from_str(OPENAPI).unwrap_or(Value::Null);
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
    };
    let mut rows = String::new();
    if let Some(paths) = spec.get("paths").and_then(Value::as_object) {
        for (path, ops) in paths {
            for (method, op) in ops.as_object().into_iter().flatten() {
                let summary = op.get("summary").and_then(Value::as_str).unwrap_or("");
                rows.push_str(&format!(
                    "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td></tr>\n",
                    method.to_uppercase(),
                    esc(path),
                    esc(summary)
                ));
            }
        }
    }
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>ferroformers serve</title>\
         </head><body><h1>ferroformers serve</h1><p>The OpenAPI document: \
         <a href=\"/api-doc/openapi.json\">/api-doc/openapi.json</a></p>\
         <table border=\"1\" cellpadding=\"4\"><tr><th>method</th><th>path</th><th>what</th></tr>\n\
         {rows}</table></body></html>"
    );
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response()
}

async fn info(State(state): State<Arc<AppState>>) -> Response {
    let models: Vec<Value> = state
        .models
        .iter()
        .map(|m| json!({"model_id": m.id, "task": m.task}))
        .collect();
    let first = &state.models[0];
    let mut o = Map::new();
    o.insert("model_id".into(), json!(first.id));
    o.insert("task".into(), json!(first.task));
    o.insert("models".into(), json!(models));
    o.insert(
        "max_client_batch_size".into(),
        json!(state.max_client_batch_size),
    );
    o.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
    axum::Json(Value::Object(o)).into_response()
}

/// The text-generation model a request names (`model`), else the first one served.
fn generator<'a>(state: &'a AppState, id: Option<&str>) -> Result<&'a Served, ApiError> {
    let m = match id {
        Some(id) => model(state, Some(id))?,
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

/// OpenAI's sampling fields as generation parameters: `max_tokens` (or
/// `max_completion_tokens`; default 256) -> `max_new_tokens`, `temperature` (default 1; 0 means
/// greedy), `top_p`, `seed`, `stop` (a string or a list) -> `stop_strings`. `n` other than 1
/// is refused.
fn openai_params(v: &Value) -> Result<Params, ApiError> {
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
    let max = num("max_completion_tokens")?
        .or(num("max_tokens")?)
        .unwrap_or(256.0);
    if max < 1.0 || max.fract() != 0.0 {
        return Err(ApiError::validation(
            "`max_tokens` must be a whole number >= 1",
        ));
    }
    p.insert("max_new_tokens".into(), json!(max as u64));
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
    if let Some(seed) = num("seed")? {
        p.insert("seed".into(), json!(seed as u64));
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
    if num("n")?.is_some_and(|n| n != 1.0) {
        return Err(ApiError::validation("only `n: 1` is supported"));
    }
    p.insert("return_full_text".into(), json!(false));
    Ok(p)
}

/// A chat's messages: `content` a string or a list of `{type: "text", text}` parts.
fn chat_input(v: &Value) -> Result<Input, ApiError> {
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
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => parts
                .iter()
                .map(
                    |p| match (p.get("type").and_then(Value::as_str), p.get("text")) {
                        (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                        _ => Err(ApiError::validation(format!(
                            "messages[{i}]: only text content parts are supported"
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

fn unix_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A response id: the kind's prefix and a process-wide counter with the time.
fn response_id(prefix: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{prefix}-{:x}{n:04x}", unix_time())
}

fn generated_text(out: &Output) -> String {
    match out {
        Output::Generated(g) => g
            .first()
            .and_then(|g| g.generated_text.as_text().map(str::to_string))
            .unwrap_or_default(),
        _ => String::new(),
    }
}

/// How a generation request's answer goes out.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

async fn openai_generate(
    state: Arc<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
    kind: Kind,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let m = generator(&state, v.get("model").and_then(Value::as_str))?;
    let index = index_of(&state, m);
    let name = m.id.clone();
    let input = match kind {
        Kind::Chat => chat_input(&v)?,
        Kind::Completion => match v.get("prompt") {
            Some(Value::String(s)) => Input::Text(s.clone()),
            _ => return Err(ApiError::validation("`prompt` must be a string")),
        },
    };
    let params = openai_params(&v)?;
    let stream = v.get("stream").and_then(Value::as_bool).unwrap_or(false);
    // Chat's `logprobs: true`: each token's log-probability (no `top_logprobs` alternatives).
    let logprobs = match (kind, v.get("logprobs")) {
        (_, None | Some(Value::Null)) | (Kind::Chat, Some(Value::Bool(false))) => false,
        (Kind::Chat, Some(Value::Bool(true))) => true,
        (Kind::Chat, Some(_)) => {
            return Err(ApiError::validation("`logprobs` must be true or false"))
        }
        (Kind::Completion, Some(_)) => {
            return Err(ApiError::validation(
                "`logprobs` is supported on /v1/chat/completions only",
            ))
        }
    };
    if v.get("top_logprobs")
        .is_some_and(|t| !t.is_null() && t != &json!(0))
    {
        return Err(ApiError::validation("`top_logprobs` is not supported"));
    }
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
    if !stream {
        let (out, usage, tokens) = generate_with_tokens(&state, index, input, params).await?;
        let text = generated_text(&out);
        let lp = if logprobs {
            let content: Vec<Value> = tokens.iter().map(|(t, l)| logprob_entry(t, *l)).collect();
            json!({"content": content})
        } else {
            Value::Null
        };
        let choice = match kind {
            Kind::Chat => json!({"index": 0, "message": {"role": "assistant", "content": text},
                                 "logprobs": lp, "finish_reason": finish(&usage)}),
            Kind::Completion => json!({"index": 0, "text": text, "logprobs": null,
                                       "finish_reason": finish(&usage)}),
        };
        return Ok(axum::Json(json!({
            "id": id, "object": object, "created": created, "model": name,
            "choices": [choice], "usage": usage_json(&usage),
        }))
        .into_response());
    }
    // Streamed: the generation runs on a blocking thread and sends each piece of text as an
    // event; the parameters were checked above, so errors from here on are generation errors,
    // sent as a last event.
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(256);
    let mut clock = TokenClock::new();
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        let chunk = |choice: Value| {
            json!({"id": id, "object": chunk_object, "created": created, "model": name,
                   "choices": [choice]})
            .to_string()
        };
        if kind == Kind::Chat {
            let first = chunk(
                json!({"index": 0, "delta": {"role": "assistant", "content": ""},
                                     "logprobs": null, "finish_reason": null}),
            );
            let _ = tx.blocking_send(first);
        }
        // A send fails once the client has gone (the event stream was dropped): the
        // generation stops there.
        let mut gone = false;
        let result = st.models[index]
            .pipe
            .run_streaming(&input, &params, &mut |t| {
                if !t.tail {
                    clock.token();
                }
                if t.text.is_empty() && (t.tail || !logprobs) {
                    return true;
                }
                let delta = t.text;
                let lp = if logprobs && !t.tail {
                    json!({"content": [logprob_entry(delta, t.logprob)]})
                } else {
                    Value::Null
                };
                let choice = match kind {
                    Kind::Chat => json!({"index": 0, "delta": {"content": delta},
                                         "logprobs": lp, "finish_reason": null}),
                    Kind::Completion => json!({"index": 0, "text": delta, "logprobs": null,
                                               "finish_reason": null}),
                };
                gone = tx.blocking_send(chunk(choice)).is_err();
                !gone
            });
        clock.record(&st);
        if gone {
            st.cancelled
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        match result {
            Ok((_, usage)) => {
                let choice = match kind {
                    Kind::Chat => json!({"index": 0, "delta": {}, "logprobs": null,
                                         "finish_reason": finish(&usage)}),
                    Kind::Completion => json!({"index": 0, "text": "", "logprobs": null,
                                               "finish_reason": finish(&usage)}),
                };
                let _ = tx.blocking_send(chunk(choice));
                if include_usage {
                    let u = json!({"id": id, "object": chunk_object, "created": created,
                                   "model": name, "choices": [], "usage": usage_json(&usage)});
                    let _ = tx.blocking_send(u.to_string());
                }
            }
            Err(e) => {
                let err = ApiError::from(e);
                let _ = tx.blocking_send(
                    json!({"error": {"message": err.message, "type": "server_error",
                                     "param": null, "code": err.status.as_u16()}})
                    .to_string(),
                );
            }
        }
        let _ = tx.blocking_send("[DONE]".into());
    });
    use tokio_stream::StreamExt;
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(|data| {
        Ok::<_, std::convert::Infallible>(axum::response::sse::Event::default().data(data))
    });
    Ok(axum::response::sse::Sse::new(events)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

async fn openai_chat(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    openai_generate(state, headers, body, Kind::Chat)
        .await
        .map_err(ApiError::openai)
}

async fn openai_completions(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    openai_generate(state, headers, body, Kind::Completion)
        .await
        .map_err(ApiError::openai)
}

/// TGI's request: the prompt and the pipeline's parameters (`stop` as stop strings; greedy and
/// new text only unless asked), and whether `details` are wanted.
fn tgi_request(v: &Value) -> Result<(Input, Params, bool), ApiError> {
    tgi_request_with(v, false)
}

/// [`tgi_request`] with `return_full_text`'s default (TGI: true on `POST /` for a
/// text-generation model, as the Inference API answers; false on `/generate`). TGI's flags
/// this server does not implement are accepted at their neutral values and refused otherwise.
fn tgi_request_with(v: &Value, full_text: bool) -> Result<(Input, Params, bool), ApiError> {
    let input = match v.get("inputs") {
        Some(Value::String(s)) => Input::Text(s.clone()),
        _ => return Err(ApiError::validation("`inputs` must be a string")),
    };
    let mut params = params_of(v)?;
    for (flag, neutral) in [
        ("decoder_input_details", json!(false)),
        ("watermark", json!(false)),
        ("top_n_tokens", Value::Null),
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
    params
        .entry("do_sample".to_string())
        .or_insert(json!(false));
    params
        .entry("return_full_text".to_string())
        .or_insert(json!(full_text));
    let details = params.remove("details").and_then(|d| d.as_bool()) == Some(true);
    Ok((input, params, details))
}

/// TGI `/generate_stream`: one server-sent event per token (`{index, token: {id, text,
/// logprob, special}, generated_text, details, top_tokens}`), the last one carrying the whole
/// `generated_text` (and `details` when asked); no `[DONE]`.
async fn tgi_generate_stream(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let m = generator(&state, None)?;
    let index = index_of(&state, m);
    let (input, params, details) = tgi_request(&v)?;
    Ok(tgi_stream(&state, index, input, params, details))
}

/// The token events of one generation as TGI streams them.
fn tgi_stream(
    state: &Arc<AppState>,
    index: usize,
    input: Input,
    params: Params,
    details: bool,
) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<String>(256);
    let mut clock = TokenClock::new();
    let st = state.clone();
    tokio::task::spawn_blocking(move || {
        // Each token's event waits for the next token, so that the last one can carry the
        // generated text.
        let mut pending: Option<Value> = None;
        let mut n = 0usize;
        let mut gone = false;
        let result = st.models[index]
            .pipe
            .run_streaming(&input, &params, &mut |t| {
                if !t.tail {
                    clock.token();
                }
                if t.tail {
                    if let Some(p) = pending.as_mut() {
                        let text = format!("{}{}", p["token"]["text"].as_str().unwrap_or(""), t.text);
                        p["token"]["text"] = json!(text);
                    }
                    return true;
                }
                n += 1;
                if let Some(p) = pending.take() {
                    gone = tx.blocking_send(p.to_string()).is_err();
                }
                pending = Some(json!({
                    "index": n,
                    "token": {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special},
                    "generated_text": null, "details": null, "top_tokens": null,
                }));
                !gone
            });
        clock.record(&st);
        if gone {
            st.cancelled
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        match result {
            Ok((out, usage)) => {
                let mut last = pending.unwrap_or_else(|| {
                    json!({"index": 0, "token": null, "generated_text": null, "details": null,
                           "top_tokens": null})
                });
                last["generated_text"] = json!(generated_text(&out));
                if details {
                    last["details"] = json!({
                        "finish_reason": if usage.hit_limit { "length" } else { "eos_token" },
                        "generated_tokens": usage.completion_tokens,
                        "seed": null,
                    });
                }
                let _ = tx.blocking_send(last.to_string());
            }
            Err(e) => {
                let err = ApiError::from(e);
                let _ = tx.blocking_send(
                    json!({"error": err.message, "error_type": "generation"}).to_string(),
                );
            }
        }
    });
    use tokio_stream::StreamExt;
    let events = tokio_stream::wrappers::ReceiverStream::new(rx).map(|data| {
        Ok::<_, std::convert::Infallible>(axum::response::sse::Event::default().data(data))
    });
    axum::response::sse::Sse::new(events)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response()
}

/// TGI `/generate`: `{inputs, parameters}` (transformers' generation parameters, TGI's `stop`
/// as stop strings) -> `{generated_text}` (new text unless `return_full_text`).
async fn tgi_generate(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let v = json_body(&headers, body)?;
    let m = generator(&state, None)?;
    let index = index_of(&state, m);
    let (input, params, details) = tgi_request(&v)?;
    let (out, usage) = generate_blocking(&state, index, input, params).await?;
    let mut body = json!({"generated_text": generated_text(&out)});
    if details {
        body["details"] = json!({
            "finish_reason": if usage.hit_limit { "length" } else { "eos_token" },
            "generated_tokens": usage.completion_tokens,
        });
    }
    Ok(axum::Json(body).into_response())
}

/// Standard base64 with padding (OpenAI's `encoding_format: "base64"`: little-endian f32s).
fn base64_encode(bytes: &[u8]) -> String {
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
}
