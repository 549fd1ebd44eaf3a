//! The access log: one line per connection at close, on the tracing target `access`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use super::copy::Transferred;
use super::route::Upstream;
use super::ProxyError;
use super::Role;

/// Counters of HBONE tunnels, per direction, kept until the metrics endpoint exports them. Plain
/// atomics: a tunnel's open and close each cost a few relaxed adds, never a lock.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    /// Tunnels opened (counted when the CONNECT stream is taken or the tunnel is asked for).
    pub inbound_opened: AtomicU64,
    pub outbound_opened: AtomicU64,
    pub inbound_failed: AtomicU64,
    pub outbound_failed: AtomicU64,
    /// Bytes client → server, over tunnels of each direction.
    pub inbound_bytes_sent: AtomicU64,
    pub inbound_bytes_received: AtomicU64,
    pub outbound_bytes_sent: AtomicU64,
    pub outbound_bytes_received: AtomicU64,
    /// CONNECT answers by status, both directions: the four HBONE uses, then any other.
    pub status_200: AtomicU64,
    pub status_400: AtomicU64,
    pub status_401: AtomicU64,
    pub status_503: AtomicU64,
    pub status_other: AtomicU64,
}

impl TunnelCounters {
    /// Counts a tunnel opened, when it starts (so that long-lived tunnels show at once).
    pub fn opened(&self, inbound: bool) {
        let c = if inbound {
            &self.inbound_opened
        } else {
            &self.outbound_opened
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// The counter of CONNECT answers with `status`.
    pub fn status(&self, status: u16) -> &AtomicU64 {
        match status {
            200 => &self.status_200,
            400 => &self.status_400,
            401 => &self.status_401,
            503 => &self.status_503,
            _ => &self.status_other,
        }
    }

    fn record(&self, inbound: bool, t: Transferred, status: Option<u16>, ok: bool) {
        let (failed, sent, received) = if inbound {
            (
                &self.inbound_failed,
                &self.inbound_bytes_sent,
                &self.inbound_bytes_received,
            )
        } else {
            (
                &self.outbound_failed,
                &self.outbound_bytes_sent,
                &self.outbound_bytes_received,
            )
        };
        if !ok {
            failed.fetch_add(1, Ordering::Relaxed);
        }
        sent.fetch_add(t.sent, Ordering::Relaxed);
        received.fetch_add(t.received, Ordering::Relaxed);
        if let Some(s) = status {
            self.status(s).fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What is known of a connection, filled in as it progresses.
pub(crate) struct ConnLog {
    /// The listener the connection came through (and so its direction).
    pub role: Role,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub start: Instant,
    pub src_workload: Option<String>,
    pub upstream: Option<Upstream>,
    /// The SPIFFE ID the peer proved (inbound HBONE), or this side's (outbound HBONE).
    pub src_identity: Option<String>,
    /// Outbound HBONE: the identities the server had to prove (its certificate was verified
    /// against them); inbound: the destination workload's identity.
    pub dst_identity: Option<String>,
    /// The CONNECT status answered (inbound) or received (outbound HBONE).
    pub status: Option<u16>,
    /// Set on HBONE connections (by [`ConnLog::count_tunnel`]): where the tunnel is counted.
    pub counters: Option<Arc<TunnelCounters>>,
    /// The connection's OTel span when OTel is on (`super::trace`).
    pub trace: Option<crate::otel::ConnTrace>,
    /// The Istio TCP metrics of the connection, once its destination is known.
    pub metrics: Option<crate::metrics::ConnMetrics>,
    /// Shared mode: the pod (`<namespace>/<name>`) whose namespace the connection was captured in.
    pub pod: Option<Arc<str>>,
}

impl ConnLog {
    pub fn new(role: Role, src: SocketAddr, dst: SocketAddr) -> Self {
        Self {
            role,
            src,
            dst,
            start: Instant::now(),
            src_workload: None,
            upstream: None,
            src_identity: None,
            dst_identity: None,
            status: None,
            counters: None,
            trace: None,
            metrics: None,
            pod: None,
        }
    }

    /// Names the pod the connection was captured in (shared mode; `None` leaves it out).
    pub fn in_pod(mut self, pod: Option<Arc<str>>) -> Self {
        self.pod = pod;
        self
    }

    /// Marks the connection an HBONE tunnel: counts it opened now, and its end at `finish`.
    pub fn count_tunnel(&mut self, counters: &Arc<TunnelCounters>) {
        counters.opened(self.role.inbound());
        self.counters = Some(counters.clone());
    }

    /// The live byte counters of this connection's metrics (empty before its destination is
    /// known), for the copy loop.
    pub fn meter(&self) -> crate::metrics::Meter {
        self.metrics
            .as_ref()
            .map(crate::metrics::ConnMetrics::meter)
            .unwrap_or_default()
    }

    pub fn finish(&self, t: Transferred, err: Option<&ProxyError>) {
        if let Some(c) = &self.counters {
            c.record(self.role.inbound(), t, self.status, err.is_none());
        }
        // Computed once, for this line and for the span.
        let fields = super::access_fields::AccessFields::new(self, t, err);
        let flag = fields.flag;
        if let Some(m) = &self.metrics {
            // The metric's flag is ztunnel's (`-`, `DENY`, `CONNECT`), the log's Envoy's.
            let metric_flag = err.map_or_else(Default::default, ProxyError::metric_flag);
            m.close(t.sent, t.received, metric_flag);
        }
        // One set of fields; the level says whether it went well.
        macro_rules! access_line {
            ($level:expr, $msg:literal) => {
                tracing::event!(
                    target: "access",
                    $level,
                    direction = self.role.direction(),
                    listener = self.role.name(),
                    pod = self.pod.as_deref(),
                    src.addr = %self.src,
                    src.workload = self.src_workload.as_deref(),
                    src.identity = self.src_identity.as_deref(),
                    dst.identity = self.dst_identity.as_deref(),
                    dst.addr = %self.dst,
                    dst.upstream = fields.upstream.as_deref(),
                    dst.service = fields.service,
                    dst.workload = fields.dst_workload,
                    dst.namespace = fields.dst_namespace,
                    dst.waypoint = fields.waypoint.as_deref(),
                    dst.gateway = fields.gateway.as_deref(),
                    dst.hbone_addr = fields.hbone_addr,
                    hbone.status = self.status,
                    bytes_sent = t.sent,
                    bytes_recv = t.received,
                    duration_ms = fields.duration_ms,
                    response_flags = flag,
                    blame = fields.blame.as_deref(),
                    error = fields.error.as_deref(),
                    $msg
                )
            };
        }
        if err.is_none() {
            access_line!(tracing::Level::INFO, "connection complete");
        } else {
            access_line!(tracing::Level::WARN, "connection failed");
        }
        super::trace::finish(self, &fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tunnels_count_at_open_and_statuses_without_a_lock() {
        let c = Arc::new(TunnelCounters::default());
        let src: SocketAddr = "127.51.0.1:40000".parse().unwrap();
        let dst: SocketAddr = "127.51.0.2:15008".parse().unwrap();
        let mut log = ConnLog::new(Role::InboundHbone, src, dst);
        log.count_tunnel(&c);
        // Opened as soon as the tunnel starts, before it ends.
        assert_eq!(c.inbound_opened.load(Ordering::Relaxed), 1);
        assert_eq!(c.outbound_opened.load(Ordering::Relaxed), 0);
        for s in [200, 200, 400, 401, 503, 418] {
            c.record(false, Transferred::default(), Some(s), true);
        }
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        assert_eq!(
            [
                n(&c.status_200),
                n(&c.status_400),
                n(&c.status_401),
                n(&c.status_503),
                n(&c.status_other)
            ],
            [2, 1, 1, 1, 1]
        );
        // Ending counts no second open.
        assert_eq!(c.outbound_opened.load(Ordering::Relaxed), 0);
    }
}
