//! The small HTTP/1 servers for probes and operators (readiness, metrics, admin) share one accept
//! loop: each answer is computed synchronously from shared state, so a connection needs nothing
//! but a task and a function from request to response.
//!
//! A basic building block: it knows nothing of what the servers answer.

use std::convert::Infallible;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{header, Request, Response, StatusCode};
use tokio::net::TcpListener;

/// How long to pause after a failed accept: the usual cause (out of file descriptors) does not
/// clear at once, and retrying at full speed would only spin and flood the log.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// Serves HTTP/1 on `listener` until the future is dropped, one task per connection, answering
/// each request with `answer`. `what` names the server in the log line of a failed accept.
pub async fn serve<F>(listener: TcpListener, what: &'static str, answer: F)
where
    F: Fn(&Request<Incoming>) -> Response<Full<Bytes>> + Clone + Send + Sync + 'static,
{
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "{what} accept failed; retrying in {ACCEPT_RETRY:?}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let resp = answer(&req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
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
