//! The OpenAPI document and a page of the routes.

use super::*;

/// The routes as OpenAPI 3 (written by hand; a test keeps it and the router in step).
pub(crate) const OPENAPI: &str = include_str!("openapi.json");

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// A page listing the routes from the OpenAPI document (no assets from elsewhere: the server
/// may have no internet).
pub(crate) async fn docs() -> Response {
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
