//! Readiness: l4mesh is ready once every startup task (the local config, or the first response of
//! each xDS type) has completed. Listeners do not accept before that, and `GET /healthz/ready`
//! (port 15021) answers 200, or 503 naming what is still awaited.
//!
//! Once a drain starts (SIGTERM, `/quitquitquit`) it answers 503 `draining` at once, so that
//! load balancers and Kubernetes stop sending new work while connections finish.
//!
//! A basic building block: it knows nothing of xDS or the proxy; they hold [`BlockReady`] tokens.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The set of startup tasks not yet done.
#[derive(Clone)]
pub struct Readiness {
    pending: Arc<Mutex<BTreeSet<String>>>,
    ready_tx: Arc<watch::Sender<bool>>,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

/// A startup task that blocks readiness until [`BlockReady::done`] is called.
pub struct BlockReady {
    name: String,
    readiness: Readiness,
}

impl BlockReady {
    pub fn done(self) {
        self.readiness.complete(&self.name);
    }
}

impl Readiness {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(true);
        Self {
            pending: Arc::new(Mutex::new(BTreeSet::new())),
            ready_tx: Arc::new(tx),
        }
    }

    /// Registers a task that must complete before l4mesh is ready.
    pub fn register(&self, name: impl Into<String>) -> BlockReady {
        let name = name.into();
        self.lock().insert(name.clone());
        self.ready_tx.send_replace(false);
        BlockReady {
            name,
            readiness: self.clone(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn complete(&self, name: &str) {
        let mut p = self.lock();
        p.remove(name);
        if p.is_empty() {
            tracing::info!("ready: every startup task has completed");
            self.ready_tx.send_replace(true);
        }
    }

    /// What readiness still waits for (empty when ready).
    pub fn pending(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }

    pub fn is_ready(&self) -> bool {
        self.lock().is_empty()
    }

    /// Resolves once ready.
    pub async fn wait(&self) {
        let mut rx = self.ready_tx.subscribe();
        // The sender lives in self, so this only ends when ready.
        let _ = rx.wait_for(|r| *r).await;
    }
}

/// Serves `GET /healthz/ready` on `listener` forever (also while draining: it answers 503 then).
pub async fn serve(
    listener: TcpListener,
    readiness: Readiness,
    drain: crate::drain::Signal,
    limiter: Arc<crate::limits::Limiter>,
    header_timeout: std::time::Duration,
) {
    crate::http_server::serve(listener, limiter, header_timeout, move |req| {
        std::future::ready(answer(req, &readiness, drain.is_draining()))
    })
    .await
}

fn answer<B>(req: &Request<B>, readiness: &Readiness, draining: bool) -> Response<Full<Bytes>> {
    let (status, body) = if req.uri().path() != "/healthz/ready" {
        (
            StatusCode::NOT_FOUND,
            format!("expected GET /healthz/ready, found {}\n", req.uri().path()),
        )
    } else if draining {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n".to_owned())
    } else {
        let pending = readiness.pending();
        if pending.is_empty() {
            (StatusCode::OK, "ready\n".to_owned())
        } else {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: waiting for {}\n", pending.join(", ")),
            )
        }
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_after_every_task() {
        let r = Readiness::new();
        assert!(r.is_ready());
        let a = r.register("xds: Address");
        let b = r.register("xds: Authorization");
        assert_eq!(r.pending(), vec!["xds: Address", "xds: Authorization"]);
        a.done();
        assert!(!r.is_ready());
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait().await }
        });
        b.done();
        tokio::time::timeout(std::time::Duration::from_secs(1), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(r.is_ready());
    }

    #[test]
    fn draining_is_not_ready() {
        let r = Readiness::new();
        let req = Request::get("/healthz/ready").body(()).unwrap();
        assert_eq!(answer(&req, &r, false).status(), StatusCode::OK);
        let resp = answer(&req, &r, true);
        assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    }
}
