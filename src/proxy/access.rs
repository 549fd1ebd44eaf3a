//! The access log: one line per connection at close, on the tracing target `access`.

use std::net::SocketAddr;
use std::time::Instant;

use super::copy::Transferred;
use super::route::Upstream;
use super::ProxyError;

/// What is known of a connection, filled in as it progresses.
pub(crate) struct ConnLog {
    pub direction: &'static str,
    pub listener: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub start: Instant,
    pub src_workload: Option<String>,
    pub upstream: Option<Upstream>,
    /// The SPIFFE ID the peer proved (inbound HBONE).
    pub src_identity: Option<String>,
    /// The CONNECT status answered (inbound) or received (outbound HBONE).
    pub status: Option<u16>,
}

impl ConnLog {
    pub fn new(
        direction: &'static str,
        listener: &'static str,
        src: SocketAddr,
        dst: SocketAddr,
    ) -> Self {
        Self {
            direction,
            listener,
            src,
            dst,
            start: Instant::now(),
            src_workload: None,
            upstream: None,
            src_identity: None,
            status: None,
        }
    }

    pub fn finish(&self, t: Transferred, err: Option<&ProxyError>) {
        let up = self.upstream.as_ref();
        let upstream_addr = up.map(|u| u.addr.to_string());
        let dst_workload = up.and_then(|u| u.workload.as_ref());
        let service = up
            .and_then(|u| u.service.as_ref())
            .map(|s| s.hostname.as_str());
        let duration_ms = self.start.elapsed().as_millis() as u64;
        let (flag, blame, error) = match err {
            None => ("-", None, None),
            Some(e) => {
                let (flag, blame) = e.classify();
                (flag, Some(blame), Some(e.to_string()))
            }
        };
        // One set of fields; the level says whether it went well.
        macro_rules! access_line {
            ($level:expr, $msg:literal) => {
                tracing::event!(
                    target: "access",
                    $level,
                    direction = self.direction,
                    listener = self.listener,
                    src.addr = %self.src,
                    src.workload = self.src_workload.as_deref(),
                    src.identity = self.src_identity.as_deref(),
                    dst.addr = %self.dst,
                    dst.upstream = upstream_addr.as_deref(),
                    dst.service = service,
                    dst.workload = dst_workload.map(|w| w.name.as_str()),
                    dst.namespace = dst_workload.map(|w| w.namespace.as_str()),
                    hbone.status = self.status,
                    bytes_sent = t.sent,
                    bytes_recv = t.received,
                    duration_ms,
                    response_flags = flag,
                    blame = blame.map(|b| format!("{b:?}")),
                    error = error.as_deref(),
                    $msg
                )
            };
        }
        if err.is_none() {
            access_line!(tracing::Level::INFO, "connection complete");
        } else {
            access_line!(tracing::Level::WARN, "connection failed");
        }
    }
}
