//! A connection's OpenTelemetry span and access-log record (`crate::otel`), driven from the
//! connection's [`ConnLog`]: started when the path knows the connection, events at each phase,
//! ended with the access-log fields when the log line is written. Every function is a no-op when
//! OTel is off (`ConnLog::trace` is `None`): one branch on the data path.

use opentelemetry::trace::SpanKind;
use opentelemetry::KeyValue;

use super::access::ConnLog;
use super::access_fields::AccessFields;
use super::{ProxyCtx, Role};

/// Starts the connection's span. Inbound HBONE passes the CONNECT's headers: the span continues
/// the trace of their `traceparent` (the caller's outbound span is its parent).
pub(super) fn start(ctx: &ProxyCtx, log: &mut ConnLog, parent: Option<&http::HeaderMap>) {
    let Some(otel) = &ctx.otel else { return };
    let kind = if log.role.inbound() {
        SpanKind::Server
    } else {
        SpanKind::Client
    };
    // What never changes; the rest is known at the end (inbound HBONE learns `dst.addr` from
    // the CONNECT).
    let attrs = vec![
        KeyValue::new("direction", log.role.direction()),
        KeyValue::new("listener", log.role.name()),
        KeyValue::new("src.addr", log.src.to_string()),
    ];
    log.trace = Some(otel.start(span_name(log), kind, parent, attrs));
}

/// Names are low-cardinality: the path, not the addresses.
fn span_name(log: &ConnLog) -> &'static str {
    match log.role {
        Role::Socks5 => "l4mesh socks5",
        Role::InboundHbone => "l4mesh inbound_hbone",
        Role::InboundPlaintext => "l4mesh inbound_plaintext",
        Role::Outbound => "l4mesh outbound",
    }
}

/// Outbound HBONE: writes this connection's `traceparent` into the CONNECT (replacing the random
/// one `hbone::connect_request` puts there when OTel is off) and marks the start of the CONNECT.
pub(super) fn hbone_connect(
    log: &ConnLog,
    tunnel_addr: std::net::SocketAddr,
    req: &mut http::Request<()>,
) {
    let Some(t) = &log.trace else { return };
    t.inject(req.headers_mut());
    t.event(
        "hbone connect",
        vec![KeyValue::new("hbone.addr", tunnel_addr.to_string())],
    );
}

/// The upstream is connected (TCP), or the tunnel is established (HBONE: 200 received or sent).
pub(super) fn connected(log: &ConnLog) {
    let Some(t) = &log.trace else { return };
    let mut attrs = Vec::new();
    if let Some(u) = &log.upstream {
        attrs.push(KeyValue::new("dst.upstream", u.addr.to_string()));
    }
    match log.status {
        Some(s) => {
            attrs.push(KeyValue::new("hbone.status", i64::from(s)));
            t.event("tunnel established", attrs);
        }
        None => t.event("upstream connected", attrs),
    }
}

/// Ends the span and emits the access-log record, both with the access line's fields.
pub(super) fn finish(log: &ConnLog, f: &AccessFields<'_>) {
    let Some(trace) = &log.trace else { return };
    let mut attrs = Vec::with_capacity(20);
    let mut opt = |k: &'static str, v: Option<String>| {
        if let Some(v) = v {
            attrs.push(KeyValue::new(k, v));
        }
    };
    opt("src.workload", log.src_workload.clone());
    opt("src.identity", log.src_identity.clone());
    opt("dst.identity", log.dst_identity.clone());
    opt("dst.upstream", f.upstream.clone());
    opt("dst.service", f.service.map(str::to_owned));
    opt("dst.workload", f.dst_workload.map(str::to_owned));
    opt("dst.namespace", f.dst_namespace.map(str::to_owned));
    opt("dst.waypoint", f.waypoint.clone());
    opt("blame", f.blame.clone());
    opt("error", f.error.clone());
    attrs.extend([
        KeyValue::new("dst.addr", log.dst.to_string()),
        KeyValue::new("bytes_sent", f.transferred.sent as i64),
        KeyValue::new("bytes_recv", f.transferred.received as i64),
        KeyValue::new("duration_ms", f.duration_ms as i64),
        KeyValue::new("response_flags", f.flag),
    ]);
    if let Some(s) = log.status {
        attrs.push(KeyValue::new("hbone.status", i64::from(s)));
    }
    let message = if f.failed() {
        "connection failed"
    } else {
        "connection complete"
    };
    trace.finish(attrs, f.error.as_deref(), message);
}
