//! OpenTelemetry export end to end: two in-process l4mesh nodes (one xds-testserver for xDS and
//! certificates) export to an in-test OTLP gRPC receiver (opentelemetry-proto's TraceService and
//! LogsService). A tunnelled connection client → A (SOCKS5, outbound HBONE) → B (inbound HBONE) →
//! backend must show up as one trace across both nodes, with access-log records carrying it.
//! Addresses: workloads and listeners on 127.55.<n>.x, receivers on 127.56.<n>.1.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::logs::v1::logs_service_server::{
    LogsService, LogsServiceServer,
};
use opentelemetry_proto::tonic::collector::logs::v1::{
    ExportLogsServiceRequest, ExportLogsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value::Value, AnyValue, KeyValue};
use opentelemetry_proto::tonic::logs::v1::LogRecord;
use opentelemetry_proto::tonic::trace::v1::Span;
use xds_testserver::Handle;

use super::harness::{
    exchange, socks5_connect_from, testserver, two_nodes_with, two_workloads_yaml, Backend,
    TwoNodes,
};
use l4mesh::otel::OtelSettings;

const BACKEND_PORT: u16 = 18080;
/// Nothing listens here (the "collector is down" case).
const DOWN_PORT: u16 = 14317;

fn state(n: u8) -> String {
    two_workloads_yaml(&format!("127.55.{n}.1"), &format!("127.55.{n}.2"), "", "")
}

/// What the receiver got, per signal, with the exporting node's `k8s.node.name`.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    logs: Arc<Mutex<Vec<(String, LogRecord)>>>,
    /// `service.name` / `service.instance.id` of every resource seen.
    resources: Arc<Mutex<Vec<Vec<KeyValue>>>>,
    requests: Arc<Mutex<usize>>,
}

fn node_of(attrs: &[KeyValue]) -> String {
    str_attr(attrs, "k8s.node.name").unwrap_or_default()
}

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        *self.requests.lock().unwrap() += 1;
        for rs in req.into_inner().resource_spans {
            let res = rs.resource.map(|r| r.attributes).unwrap_or_default();
            let node = node_of(&res);
            self.resources.lock().unwrap().push(res);
            for ss in rs.scope_spans {
                for s in ss.spans {
                    self.spans.lock().unwrap().push((node.clone(), s));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl LogsService for Received {
    async fn export(
        &self,
        req: tonic::Request<ExportLogsServiceRequest>,
    ) -> Result<tonic::Response<ExportLogsServiceResponse>, tonic::Status> {
        *self.requests.lock().unwrap() += 1;
        for rl in req.into_inner().resource_logs {
            let res = rl.resource.map(|r| r.attributes).unwrap_or_default();
            let node = node_of(&res);
            self.resources.lock().unwrap().push(res);
            for sl in rl.scope_logs {
                for r in sl.log_records {
                    self.logs.lock().unwrap().push((node.clone(), r));
                }
            }
        }
        Ok(tonic::Response::new(ExportLogsServiceResponse::default()))
    }
}

/// An OTLP gRPC receiver on `ip` (ephemeral port), stopped on drop.
pub(super) struct Collector {
    addr: SocketAddr,
    got: Received,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    pub(super) async fn start(ip: &str) -> Collector {
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let got = Received::default();
        let router = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(got.clone()))
            .add_service(LogsServiceServer::new(got.clone()));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        let task = tokio::spawn(async move {
            router.serve_with_incoming(incoming).await.unwrap();
        });
        Collector { addr, got, task }
    }

    /// The same receiver behind TLS with a self-signed certificate for `ip`; returns it and the
    /// certificate's PEM (the root a client must trust).
    async fn start_tls(ip: &str) -> (Collector, String) {
        let key = rcgen::generate_simple_self_signed(vec![ip.to_owned()]).unwrap();
        let (cert, key) = (key.cert.pem(), key.signing_key.serialize_pem());
        let l = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        let got = Received::default();
        let tls = tonic::transport::ServerTlsConfig::new()
            .identity(tonic::transport::Identity::from_pem(&cert, &key));
        let router = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(TraceServiceServer::new(got.clone()))
            .add_service(LogsServiceServer::new(got.clone()));
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(l);
        let task = tokio::spawn(async move {
            router.serve_with_incoming(incoming).await.unwrap();
        });
        (Collector { addr, got, task }, cert)
    }

    pub(super) fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(super) fn spans(&self) -> Vec<(String, Span)> {
        self.got.spans.lock().unwrap().clone()
    }

    pub(super) fn logs(&self) -> Vec<(String, LogRecord)> {
        self.got.logs.lock().unwrap().clone()
    }
}

pub(super) fn str_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::IntValue(i) => Some(*i),
            _ => None,
        }
    })
}

fn body(r: &LogRecord) -> Option<String> {
    match r.body.as_ref()? {
        AnyValue {
            value: Some(Value::StringValue(s)),
        } => Some(s.clone()),
        _ => None,
    }
}

struct Mesh {
    a: l4mesh::app::Running,
    b: l4mesh::app::Running,
    n: u8,
    _ts: Handle,
}

impl Mesh {
    async fn start(
        n: u8,
        mut otel_a: Option<OtelSettings>,
        mut otel_b: Option<OtelSettings>,
    ) -> Mesh {
        let ts = testserver(state(n), "127.0.0.1", None).await;
        // `None` leaves the node's default configuration alone (so a test can check the default).
        let TwoNodes { a, b, ts } = two_nodes_with(ts, &format!("127.55.{n}"), |c| {
            let o = if c.node_name == "node-a" {
                otel_a.take()
            } else {
                otel_b.take()
            };
            if o.is_some() {
                c.otel = o;
            }
        })
        .await;
        for r in [&a, &b] {
            tokio::time::timeout(Duration::from_secs(10), r.readiness.wait())
                .await
                .expect("node ready");
        }
        Mesh { a, b, n, _ts: ts }
    }

    /// One tunnelled exchange a → b's backend; returns the reply.
    async fn exchange(&self, msg: &str) -> String {
        let a_ip = format!("127.55.{}.1", self.n).parse().unwrap();
        let b_wl = format!("127.55.{}.2", self.n);
        let s = socks5_connect_from(a_ip, self.a.socks5.unwrap(), &b_wl, BACKEND_PORT)
            .await
            .expect("tunnel accepted");
        exchange(s, msg).await
    }

    async fn backend(&self) -> Backend {
        Backend::start(&format!("127.55.{}.2:{BACKEND_PORT}", self.n), "b").await
    }
}

pub(super) fn settings(endpoint: String, ratio: f64) -> OtelSettings {
    let mut s = OtelSettings::new(endpoint);
    s.sampler_ratio = ratio;
    // Short batches: the test waits for them (and flushes too).
    s.schedule_delay = Duration::from_millis(100);
    s
}

/// Flushes both nodes until `done` holds, for at most 10 s.
async fn wait_until(m: &Mesh, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for r in [&m.a, &m.b] {
            if let Some(o) = &r.proxy.otel {
                o.flush().await;
            }
        }
        if done() {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn event_names(s: &Span) -> Vec<&str> {
    s.events.iter().map(|e| e.name.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnelled_connection_is_one_trace_across_both_nodes() {
    let col = Collector::start("127.56.1.1").await;
    let m = Mesh::start(
        1,
        Some(settings(col.endpoint(), 1.0)),
        Some(settings(col.endpoint(), 1.0)),
    )
    .await;
    let _backend = m.backend().await;
    let msg = "hello through the tunnel";
    let reply = m.exchange(msg).await;
    assert_eq!(reply, format!("b:{msg}"));

    let span_on = |node: &str, name: &str| {
        col.spans()
            .into_iter()
            .find(|(n, s)| n == node && s.name == name)
            .map(|(_, s)| s)
    };
    wait_until(&m, "both spans and both access records", || {
        span_on("node-a", "l4mesh socks5").is_some()
            && span_on("node-b", "l4mesh inbound_hbone").is_some()
            && col.logs().len() >= 2
    })
    .await;
    let out = span_on("node-a", "l4mesh socks5").unwrap();
    let inb = span_on("node-b", "l4mesh inbound_hbone").unwrap();

    // One trace: B's span is a child of A's, whose parent is nobody.
    assert_eq!(out.trace_id.len(), 16);
    assert_eq!(inb.trace_id, out.trace_id, "same trace id on both nodes");
    assert_eq!(
        inb.parent_span_id, out.span_id,
        "inbound's parent is the outbound span"
    );
    assert!(out.parent_span_id.is_empty(), "outbound starts the trace");
    assert_eq!(out.kind, 3, "outbound is a CLIENT span");
    assert_eq!(inb.kind, 2, "inbound is a SERVER span");
    assert_eq!(out.flags & 0xff, 1, "sampled");

    // The access-log fields, on both.
    let (sent, recv) = (msg.len() as i64, reply.len() as i64);
    for (s, dir) in [(&out, "outbound"), (&inb, "inbound")] {
        let a = &s.attributes;
        assert_eq!(int_attr(a, "bytes_sent"), Some(sent), "{dir} bytes_sent");
        assert_eq!(int_attr(a, "bytes_recv"), Some(recv), "{dir} bytes_recv");
        assert_eq!(int_attr(a, "hbone.status"), Some(200), "{dir}");
        assert_eq!(str_attr(a, "response_flags").as_deref(), Some("-"), "{dir}");
        assert_eq!(str_attr(a, "direction").as_deref(), Some(dir));
        assert_eq!(
            str_attr(a, "dst.addr"),
            Some(format!("127.55.1.2:{BACKEND_PORT}")),
            "{dir}"
        );
        assert_eq!(
            str_attr(a, "src.identity").as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/client"),
            "{dir}"
        );
        assert_eq!(
            str_attr(a, "dst.identity").as_deref(),
            Some("spiffe://cluster.local/ns/default/sa/server"),
            "{dir}"
        );
        assert_eq!(str_attr(a, "dst.workload").as_deref(), Some("b"), "{dir}");
        // Status unset (0) means not an error.
        assert_ne!(s.status.as_ref().map_or(0, |st| st.code), 2, "{dir}");
    }
    assert_eq!(
        str_attr(&out.attributes, "src.workload").as_deref(),
        Some("default/a")
    );
    assert_eq!(
        event_names(&out),
        ["accepted", "hbone connect", "tunnel established", "closed"]
    );
    assert_eq!(
        event_names(&inb),
        ["accepted", "tunnel established", "closed"]
    );

    // Each node's resource names it.
    for node in ["node-a", "node-b"] {
        let res = col.got.resources.lock().unwrap();
        let r = res
            .iter()
            .find(|r| node_of(r) == node)
            .unwrap_or_else(|| panic!("no resource for {node}"));
        assert_eq!(str_attr(r, "service.name").as_deref(), Some("l4mesh"));
        assert_eq!(str_attr(r, "service.instance.id").as_deref(), Some(node));
    }

    // The access-log records carry the trace and their node's span.
    let logs = col.logs();
    for (node, span) in [("node-a", &out), ("node-b", &inb)] {
        let (_, r) = logs
            .iter()
            .find(|(n, r)| n == node && r.trace_id == out.trace_id)
            .unwrap_or_else(|| panic!("no access record from {node} with the trace id"));
        assert_eq!(r.span_id, span.span_id, "{node}");
        assert_eq!(r.severity_number, 9, "{node}: INFO");
        assert_eq!(r.severity_text, "INFO");
        assert_eq!(body(r).as_deref(), Some("connection complete"));
        assert_eq!(int_attr(&r.attributes, "bytes_sent"), Some(sent), "{node}");
        assert_eq!(int_attr(&r.attributes, "bytes_recv"), Some(recv), "{node}");
        assert_eq!(int_attr(&r.attributes, "hbone.status"), Some(200));
        assert!(str_attr(&r.attributes, "listener").is_some(), "{node}");
    }
    for r in [&m.a, &m.b] {
        let o = r.proxy.otel.as_ref().unwrap();
        o.shutdown().await;
        assert_eq!(o.exports().failed.load(Relaxed), 0);
        assert!(o.exports().ok.load(Relaxed) >= 2, "spans and logs exported");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_connection_is_a_warning_with_an_error_span() {
    let col = Collector::start("127.56.2.1").await;
    let m = Mesh::start(
        2,
        Some(settings(col.endpoint(), 1.0)),
        Some(settings(col.endpoint(), 1.0)),
    )
    .await;
    // No backend: B answers 503, A's client is closed.
    let a_ip = "127.55.2.1".parse().unwrap();
    let s = socks5_connect_from(a_ip, m.a.socks5.unwrap(), "127.55.2.2", BACKEND_PORT).await;
    if let Ok(s) = s {
        assert_eq!(exchange(s, "x").await, "", "nothing comes back");
    }
    wait_until(&m, "warning records from both nodes", || {
        let l = col.logs();
        ["node-a", "node-b"]
            .iter()
            .all(|n| l.iter().any(|(ln, r)| ln == n && r.severity_number == 13))
    })
    .await;
    let logs = col.logs();
    let rec = |node: &str| {
        logs.iter()
            .find(|(n, r)| n == node && r.severity_number == 13)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    let (ra, rb) = (rec("node-a"), rec("node-b"));
    assert_eq!(ra.trace_id, rb.trace_id, "one trace for the refused tunnel");
    assert_eq!(ra.severity_text, "WARN");
    assert_eq!(body(&rb).as_deref(), Some("connection failed"));
    assert_eq!(int_attr(&ra.attributes, "hbone.status"), Some(503));
    assert_eq!(int_attr(&rb.attributes, "hbone.status"), Some(503));
    assert!(str_attr(&rb.attributes, "error").is_some());
    wait_until(&m, "the error spans", || {
        col.spans()
            .iter()
            .filter(|(_, s)| s.trace_id == ra.trace_id)
            .count()
            == 2
    })
    .await;
    for (node, s) in col.spans() {
        assert_eq!(
            s.status.as_ref().map(|st| st.code),
            Some(2),
            "{node}: {} has an error status",
            s.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_caller_gets_the_receivers_ratio() {
    // A samples nothing (ratio 0): its CONNECT's traceparent says "not sampled", as an OTel-off
    // l4mesh's or ztunnel's does. B samples everything: it records its inbound span, in A's
    // trace, instead of following A's "not sampled".
    let col = Collector::start("127.56.3.1").await;
    let m = Mesh::start(
        3,
        Some(settings(col.endpoint(), 0.0)),
        Some(settings(col.endpoint(), 1.0)),
    )
    .await;
    let _backend = m.backend().await;
    assert_eq!(m.exchange("unsampled").await, "b:unsampled");
    wait_until(&m, "access records from both nodes and B's span", || {
        let l = col.logs();
        ["node-a", "node-b"]
            .iter()
            .all(|n| l.iter().any(|(ln, _)| ln == n))
            && !col.spans().is_empty()
    })
    .await;
    let logs = col.logs();
    assert_eq!(logs.len(), 2, "one record per node: {logs:?}");
    let rec = |node: &str| {
        logs.iter()
            .find(|(n, _)| n == node)
            .map(|(_, r)| r.clone())
            .unwrap()
    };
    let (ra, rb) = (rec("node-a"), rec("node-b"));
    assert_eq!(ra.trace_id, rb.trace_id, "the trace id still flows");
    assert_eq!(ra.flags & 1, 0, "A's record says: not sampled");
    assert_eq!(rb.flags & 1, 1, "B's record says: sampled by B's ratio");
    for o in [&m.a, &m.b] {
        o.proxy.otel.as_ref().unwrap().shutdown().await;
    }
    let spans = col.spans();
    assert_eq!(spans.len(), 1, "only B's span: {spans:?}");
    let (node, span) = &spans[0];
    assert_eq!(node, "node-b");
    assert_eq!(span.name, "l4mesh inbound_hbone");
    assert_eq!(span.trace_id, ra.trace_id, "in A's trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otel_off_sends_nothing() {
    let col = Collector::start("127.56.4.1").await;
    let m = Mesh::start(4, None, None).await;
    assert!(m.a.proxy.otel.is_none() && m.b.proxy.otel.is_none());
    let _backend = m.backend().await;
    assert_eq!(m.exchange("quiet").await, "b:quiet");
    // Nothing to flush; give a wrongly enabled exporter several batch intervals to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(*col.got.requests.lock().unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_does_not_break_traffic() {
    let down = format!("http://127.56.5.1:{DOWN_PORT}");
    let m = Mesh::start(
        5,
        Some(settings(down.clone(), 1.0)),
        Some(settings(down, 1.0)),
    )
    .await;
    let _backend = m.backend().await;
    for i in 0..20 {
        let started = Instant::now();
        assert_eq!(m.exchange(&format!("x{i}")).await, format!("b:x{i}"));
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "exchange {i} took {:?}",
            started.elapsed()
        );
        if i == 10 {
            // Batches have been tried (and failed) meanwhile.
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    // Shutdown tries to flush to nobody, and still returns in bounded time.
    let started = Instant::now();
    for r in [&m.a, &m.b] {
        let o = r.proxy.otel.as_ref().unwrap();
        o.shutdown().await;
        // Exports were tried, failed, and were dropped.
        assert!(o.exports().failed.load(Relaxed) >= 2);
        assert_eq!(o.exports().ok.load(Relaxed), 0);
    }
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "shutdown took {:?}",
        started.elapsed()
    );
    // Still serving after the exporters are gone.
    assert_eq!(m.exchange("after").await, "b:after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_to_an_https_collector_with_a_configured_root() {
    let (col, ca_pem) = Collector::start_tls("127.56.6.1").await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("otel-ca.pem");
    std::fs::write(&ca, ca_pem).unwrap();
    let tls = |ratio| {
        let mut s = settings(format!("https://{}", col.addr), ratio);
        s.certificate = Some(ca.clone());
        s
    };
    let m = Mesh::start(6, Some(tls(1.0)), Some(tls(1.0))).await;
    let _backend = m.backend().await;
    assert_eq!(m.exchange("over tls").await, "b:over tls");
    wait_until(&m, "spans and records from both nodes over TLS", || {
        let (s, l) = (col.spans(), col.logs());
        ["node-a", "node-b"]
            .iter()
            .all(|n| s.iter().any(|(sn, _)| sn == n) && l.iter().any(|(ln, _)| ln == n))
    })
    .await;
    for r in [&m.a, &m.b] {
        let o = r.proxy.otel.as_ref().unwrap();
        o.shutdown().await;
        assert_eq!(
            o.exports().failed.load(Relaxed),
            0,
            "TLS exports all succeeded"
        );
    }
    // Without that root (system roots only) the collector's certificate is refused.
    let before = *col.got.requests.lock().unwrap();
    let untrusting = l4mesh::otel::Otel::new(
        &settings(format!("https://{}", col.addr), 1.0),
        "node-c",
        |ep| l4mesh::control_plane::lazy_channel(ep, 0),
    )
    .unwrap();
    let span = untrusting.start(
        "probe",
        opentelemetry::trace::SpanKind::Internal,
        None,
        Vec::new(),
    );
    span.finish(Vec::new(), None, "probe");
    untrusting.flush().await;
    assert!(untrusting.exports().failed.load(Relaxed) >= 1);
    assert_eq!(untrusting.exports().ok.load(Relaxed), 0);
    assert_eq!(*col.got.requests.lock().unwrap(), before);
    untrusting.shutdown().await;
}
