//! The metrics HTTP server (15020): `GET /metrics` and `GET /stats/prometheus` answer the same
//! exposition; anything else is a 404 that names the two paths.
//!
//! The format follows the scraper's `Accept` header: OpenMetrics text when it asks for
//! `application/openmetrics-text` (Prometheus does), else the Prometheus text format 0.0.4 (curl,
//! older scrapers). The body is encoded per request, on the runtime [`serve`] is spawned on.

use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{header, Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use super::Metrics;
use crate::http_server::text;

/// Content type of the OpenMetrics text answer.
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of the Prometheus text 0.0.4 answer.
pub const PROMETHEUS_CONTENT_TYPE: &str =
    prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Serves the metrics on `listener` until the future is dropped. Runtime-agnostic apart from
/// needing a tokio runtime to spawn one task per connection on.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    limiter: Arc<crate::limits::Limiter>,
    header_timeout: std::time::Duration,
) {
    crate::http_server::serve(listener, limiter, header_timeout, move |req| {
        std::future::ready(answer(req, &metrics))
    })
    .await
}

/// Whether the client accepts OpenMetrics text.
fn wants_openmetrics<B>(req: &Request<B>) -> bool {
    req.headers()
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

pub(super) fn answer<B>(req: &Request<B>, metrics: &Metrics) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if path != "/metrics" && path != "/stats/prometheus" {
        return text(
            StatusCode::NOT_FOUND,
            format!("expected GET /metrics or GET /stats/prometheus, found {path}\n"),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("expected GET {path}, found {}\n", req.method()),
        );
    }
    let om = wants_openmetrics(req);
    match metrics.encode(om) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            let ct = if om {
                OPENMETRICS_CONTENT_TYPE
            } else {
                PROMETHEUS_CONTENT_TYPE
            };
            resp.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(ct));
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the metrics failed: {e}\n"),
        ),
    }
}
