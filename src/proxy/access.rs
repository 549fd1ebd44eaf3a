//! The access log: one line per connection at close, on the tracing target `access`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::copy::Transferred;
use super::route::Upstream;
use super::ProxyError;

/// Counters of HBONE tunnels, per direction, kept until the metrics endpoint exports them.
#[derive(Debug, Default)]
pub struct TunnelCounters {
    pub inbound_opened: AtomicU64,
    pub outbound_opened: AtomicU64,
    pub inbound_failed: AtomicU64,
    pub outbound_failed: AtomicU64,
    /// Bytes client → server, over tunnels of each direction.
    pub inbound_bytes_sent: AtomicU64,
    pub inbound_bytes_received: AtomicU64,
    pub outbound_bytes_sent: AtomicU64,
    pub outbound_bytes_received: AtomicU64,
    /// CONNECT answers by status (200, 400, 401, 503…), both directions.
    pub by_status: Mutex<BTreeMap<u16, u64>>,
}

impl TunnelCounters {
    fn record(&self, inbound: bool, t: Transferred, status: Option<u16>, ok: bool) {
        let (opened, failed, sent, received) = if inbound {
            (
                &self.inbound_opened,
                &self.inbound_failed,
                &self.inbound_bytes_sent,
                &self.inbound_bytes_received,
            )
        } else {
            (
                &self.outbound_opened,
                &self.outbound_failed,
                &self.outbound_bytes_sent,
                &self.outbound_bytes_received,
            )
        };
        opened.fetch_add(1, Ordering::Relaxed);
        if !ok {
            failed.fetch_add(1, Ordering::Relaxed);
        }
        sent.fetch_add(t.sent, Ordering::Relaxed);
        received.fetch_add(t.received, Ordering::Relaxed);
        if let Some(s) = status {
            *self
                .by_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(s)
                .or_default() += 1;
        }
    }
}

/// What is known of a connection, filled in as it progresses.
pub(crate) struct ConnLog {
    pub direction: &'static str,
    pub listener: &'static str,
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
    /// Set on HBONE connections: where the tunnel is counted at close.
    pub counters: Option<Arc<TunnelCounters>>,
    /// The connection's OTel span when OTel is on (`super::trace`).
    pub trace: Option<crate::otel::ConnTrace>,
    /// The Istio TCP metrics of the connection, once its destination is known.
    pub metrics: Option<crate::metrics::ConnMetrics>,
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
            dst_identity: None,
            status: None,
            counters: None,
            trace: None,
            metrics: None,
        }
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
            c.record(self.direction == "inbound", t, self.status, err.is_none());
        }
        // Computed once, for this line and for the span.
        let fields = super::access_fields::AccessFields::new(self, t, err);
        let flag = fields.flag;
        if let Some(m) = &self.metrics {
            m.close(t.sent, t.received, flag);
        }
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
                    dst.identity = self.dst_identity.as_deref(),
                    dst.addr = %self.dst,
                    dst.upstream = fields.upstream.as_deref(),
                    dst.service = fields.service,
                    dst.workload = fields.dst_workload,
                    dst.namespace = fields.dst_namespace,
                    dst.waypoint = fields.waypoint.as_deref(),
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
