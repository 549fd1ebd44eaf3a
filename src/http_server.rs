//! The small HTTP/1 servers for probes and operators (readiness, metrics, admin) share one accept
//! loop: each answer is computed synchronously from shared state, so a connection needs nothing
//! but a task and a function from request to response.
//!
//! A basic building block: it knows nothing of what the servers answer.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Request, Response, StatusCode};
use tokio::net::TcpListener;

/// Connections one source address may hold on each of these servers: room for Prometheus, a
/// probe and a person with curl, not for one client taking every place.
pub const MAX_PER_SOURCE: usize = 16;

/// The largest request head the servers read (ztunnel's 8 KiB): their requests are short.
const MAX_BUF: usize = 8 * 1024;

/// How long to pause after a failed accept: the usual cause (out of file descriptors) does not
/// clear at once, and retrying at full speed would only spin and flood the log.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Limits of the small HTTP servers for operators and probes, which bind the wildcard address
/// (15020, 15021): a client must send a whole request head within `header_timeout` (also the
/// idle time allowed between keep-alive requests), and each server holds at most
/// `max_connections` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HttpLimits {
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub header_timeout: Duration,
    pub max_connections: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(2),
            max_connections: 128,
        }
    }
}

/// Serves HTTP/1 on `listener` until the future is dropped, one task per connection, answering
/// each request with `answer`: a connection over `limiter`'s caps is closed at once (counted
/// there), and one that sends no complete request head within `header_timeout` (after
/// connecting, or idle after an answer) is closed. The limiter's name names the server in log
/// lines.
pub async fn serve<F, R>(
    listener: TcpListener,
    limiter: Arc<crate::limits::Limiter>,
    header_timeout: Duration,
    answer: F,
) where
    F: Fn(&Request<Incoming>) -> R + Clone + Send + Sync + 'static,
    R: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let what = limiter.name();
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                limiter.accept_failed();
                tracing::warn!(error = %e, "{what} accept failed; retrying in {ACCEPT_RETRY:?}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Ok(permit) = limiter.admit(peer.ip().to_canonical()) else {
            continue;
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&req);
                async move { Ok::<_, Infallible>(resp.await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .max_buf_size(MAX_BUF)
                .serve_connection(io, svc)
                .await;
        });
    }
}

/// A plain-text answer with `status`.
pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
