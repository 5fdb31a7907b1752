//! What every request passes through: CORS, the API key, admission (429 / 503 / timeouts),
//! the per-request log line and metrics; the readiness probe.

use super::*;

pub(crate) async fn ready(State(state): State<Arc<AppState>>) -> Response {
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
pub(crate) struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The POST routes' admission: 503 while draining, 429 with `Retry-After` beyond
/// `max_concurrent_requests` (decided before any response byte, streams included).
pub(crate) async fn admit(
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
    state.admitted.fetch_add(1, SeqCst);
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
pub(crate) async fn observe(
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
        if status >= 400 {
            let kind = resp
                .extensions()
                .get::<ErrorKind>()
                .map_or("Other", |k| k.0);
            *st.failures.entry((route.clone(), kind)).or_default() += 1;
        }
        st.duration.entry(route.clone()).or_default().observe(secs);
    }
    if state.log_requests {
        tracing::info!(
            target: "ferroformers_server::request",
            %method,
            %path,
            %route,
            status,
            duration_ms = secs * 1000.0,
        );
    }
    resp
}

/// A response body that holds an [`InFlight`] slot until it is dropped.
pub(crate) struct GuardedBody {
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
pub(crate) async fn cors(
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

pub(crate) async fn require_api_key(
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
            return e.shaped_for(req.uri().path()).into_response();
        }
    }
    next.run(req).await
}

/// Equal lengths and bytes, in time that does not depend on where they differ.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() != b.len()) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}
