//! The admin server (default `127.0.0.1:15000`, loopback only): what l4mesh believes and a few
//! levers, for operators.
//!
//! - `GET /config_dump`: JSON of the workloads, services and policies of the current store
//!   snapshot, the certificates with their state and expiry, the effective configuration, and the
//!   xDS client's status;
//! - `GET /logging` shows the log filter; `POST /logging?level=…` changes it at runtime;
//! - `POST /quitquitquit`: drain, then exit (the same path as SIGTERM);
//! - `GET /debug/pprof/profile`, `GET /debug/pprof/heap`: CPU and heap profiles ([`pprof`]).
//!
//! Loopback is its first guard; in dedicated mode the workload shares that loopback, so the
//! mutating endpoints (`POST /logging`, `POST /quitquitquit`) can also require a token
//! ([`AdminToken`], `L4MESH_ADMIN_TOKEN_FILE`) sent as `Authorization: Bearer <token>`.
//!
//! It runs on the operators' runtime, apart from the data plane: a slow request never stalls
//! traffic. It only reads shared state (the store snapshot, counters) and never blocks on a lock
//! the data path takes per connection. Readiness (`/healthz/ready`) is served on its own port by
//! `readiness`.

mod config_dump;
mod logging;
mod pprof;
mod ztunnel_shape;

use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::drain::Drain;
pub(crate) use crate::http_server::text;
use crate::identity::SecretManager;
use crate::store::Store;
use crate::xds::XdsMetrics;

/// The secret the mutating endpoints require, read once from a file at startup.
pub struct AdminToken(Box<[u8]>);

/// Why the admin token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AdminTokenError {
    #[error("could not read the admin token file {path} (L4MESH_ADMIN_TOKEN_FILE)")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the admin token file {path} holds {len} bytes after trimming; expected a token of at least 16 bytes (L4MESH_ADMIN_TOKEN_FILE)")]
    TooShort {
        path: std::path::PathBuf,
        len: usize,
    },
}

impl AdminToken {
    /// The token in `path`, surrounding white space removed.
    pub fn read(path: &std::path::Path) -> Result<Self, AdminTokenError> {
        let raw = std::fs::read(path).map_err(|source| AdminTokenError::Read {
            path: path.to_owned(),
            source,
        })?;
        let token = raw.trim_ascii();
        if token.len() < 16 {
            return Err(AdminTokenError::TooShort {
                path: path.to_owned(),
                len: token.len(),
            });
        }
        Ok(Self(token.into()))
    }

    /// Whether `req` carries the token, compared in constant time.
    fn admits<B>(&self, req: &Request<B>) -> bool {
        let Some(given) = req
            .headers()
            .get(hyper::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        given.len() == self.0.len()
            && given
                .iter()
                .zip(self.0.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }
}

/// What the admin server reads and acts on.
pub struct AdminState {
    /// Required by the mutating endpoints when set.
    pub token: Option<AdminToken>,
    pub store: Arc<Store>,
    pub secrets: Arc<SecretManager>,
    /// The effective configuration, serialised once by the caller (admin does not depend on
    /// `config`, which sits above it).
    pub config: serde_json::Value,
    /// Present when the mesh state comes from a control plane.
    pub xds: Option<Arc<XdsMetrics>>,
    pub drain: Drain,
    /// The drain deadline, to tell a `/quitquitquit` caller how long the exit may take.
    pub deadline: Duration,
    /// Shared mode: the pods served.
    pub pods: Option<Arc<crate::inpod::manager::PodsView>>,
    /// The hand-off socket (`--handoff-socket`), when upgrades hand listeners over.
    pub handoff_socket: Option<std::path::PathBuf>,
    /// The l4mesh this one took over from, while it drains.
    pub predecessor: Option<Arc<crate::handoff::PredecessorState>>,
}

/// The endpoints, for `/` and for the 404 of an unknown path.
const ENDPOINTS: &str = "\
GET  /config_dump                 workloads, services, policies, certificates, configuration, xDS status (JSON)
GET  /upgrade                     the hand-off socket, and the replaced l4mesh still draining (JSON)
GET  /logging                     the log filter in force
POST /logging?level=<filter>      change it: a level (debug) or target=level items (access=debug,info); &reset starts from the startup filter
POST /quitquitquit                drain (readiness fails, listeners close, HBONE peers get GOAWAY), then exit
GET  /debug/pprof/profile         CPU profile, pprof protobuf: 1000 Hz for 10 s (?seconds=1..60)
GET  /debug/pprof/heap            heap profile, gzipped pprof protobuf (needs _RJEM_MALLOC_CONF=prof:true,prof_active:true)
";

/// Serves the admin API on `listener` until the task is dropped.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    limiter: Arc<crate::limits::Limiter>,
    header_timeout: std::time::Duration,
) {
    crate::http_server::serve(listener, limiter, header_timeout, move |req| {
        answer(req, &state)
    })
    .await
}

type Answer = std::pin::Pin<Box<dyn std::future::Future<Output = Response<Full<Bytes>>> + Send>>;

/// Profiles take seconds: their answers are futures. Every other endpoint answers at once.
fn answer<B>(req: &Request<B>, state: &AdminState) -> Answer {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/debug/pprof/profile") => match pprof::seconds(req.uri().query()) {
            Ok(duration) => Box::pin(pprof::cpu(duration)),
            Err(e) => Box::pin(std::future::ready(text(
                StatusCode::BAD_REQUEST,
                format!("{e}\n"),
            ))),
        },
        (&Method::GET, "/debug/pprof/heap") => Box::pin(pprof::heap()),
        _ => Box::pin(std::future::ready(route(req, state))),
    }
}

/// Answers one request; every handler is synchronous (they read snapshots and counters).
fn route<B>(req: &Request<B>, state: &AdminState) -> Response<Full<Bytes>> {
    let (method, path) = (req.method(), req.uri().path());
    if method == Method::POST && matches!(path, "/logging" | "/quitquitquit") {
        if let Some(token) = &state.token {
            if !token.admits(req) {
                tracing::warn!(%path, "admin: refused a POST without the admin token");
                return text(
                    StatusCode::UNAUTHORIZED,
                    format!("POST {path} needs this l4mesh's admin token (the contents of L4MESH_ADMIN_TOKEN_FILE) as `Authorization: Bearer <token>`; none or another was sent\n"),
                );
            }
        }
    }
    match path {
        "/" => text(
            StatusCode::OK,
            format!("l4mesh admin endpoints:\n{ENDPOINTS}"),
        ),
        "/config_dump" if method == Method::GET => config_dump::answer(state),
        "/upgrade" if method == Method::GET => upgrade(state),
        "/logging" if method == Method::GET || method == Method::POST => {
            logging::answer(method, req.uri().query())
        }
        "/quitquitquit" if method == Method::POST => quit(state),
        "/config_dump"
        | "/logging"
        | "/quitquitquit"
        | "/upgrade"
        | "/debug/pprof/profile"
        | "/debug/pprof/heap" => text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} is not allowed on {path}; expected one of:\n{ENDPOINTS}"),
        ),
        _ => text(
            StatusCode::NOT_FOUND,
            format!("no endpoint {path}; expected one of:\n{ENDPOINTS}"),
        ),
    }
}

/// What an operator watching an upgrade asks: is the hand-off on, and what does the replaced
/// process still hold.
fn upgrade(state: &AdminState) -> Response<Full<Bytes>> {
    let predecessor = state.predecessor.as_ref().map(|p| {
        serde_json::json!({
            "pid": p.pid,
            "version": p.version,
            "draining": p.draining(),
            "open_connections": p.open_connections(),
        })
    });
    let body = serde_json::json!({
        "handoff_socket": state.handoff_socket,
        "predecessor": predecessor,
    });
    let mut resp = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    resp
}

fn quit(state: &AdminState) -> Response<Full<Bytes>> {
    if state.drain.start() {
        tracing::info!("drain requested by POST /quitquitquit");
        text(
            StatusCode::OK,
            format!(
                "draining: l4mesh exits once its connections have ended, at most {:?} from now\n",
                state.deadline
            ),
        )
    } else {
        text(StatusCode::OK, "already draining\n".into())
    }
}

#[cfg(test)]
mod tests;
