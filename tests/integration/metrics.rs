//! Metrics, checked by the real consumer: a Prometheus server (Debian package `prometheus`) started
//! on loopback scrapes two in-process l4mesh nodes every second while the test sends known traffic
//! between them; its HTTP API must then report exactly the connections and bytes sent, per reporter
//! and with the workload, principal and security labels Istio's dashboards use, the bytes of a
//! connection still open, and a tunnel denied by policy flagged `DENY` (ztunnel's flag, not the
//! access log's `RBAC`) on both sides. The dashboard's
//! queries are run against it too. A plain scrape checks both paths and the content types.
//!
//! Addresses: 127.51.0.x (workloads, listeners, Prometheus) and 127.52.0.x (the scrape test).

use std::net::{IpAddr, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::harness::{
    self, deny_yaml, endpoint_of_yaml, exchange, service_yaml, socks5_connect_from, testserver,
    Backend, TwoNodes,
};

const BACKEND_PORT: u16 = 18080;
/// A port the mesh's policy denies to the client (nothing needs to listen there).
const DENIED_PORT: u16 = 18081;
const PROMETHEUS: &str = "127.51.0.50:19090";

fn state(net: u8) -> String {
    let echo_endpoint = endpoint_of_yaml("echo", BACKEND_PORT);
    let echo = service_yaml(
        "echo",
        &format!("127.{net}.0.100"),
        BACKEND_PORT,
        "  subjectAltNames: [\"spiffe://cluster.local/ns/default/sa/server\"]\n",
    );
    let deny = deny_yaml("client", DENIED_PORT);
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/client-7f9c
  name: client-7f9c
  namespace: default
  serviceAccount: client
  workloadIps: ["127.{net}.0.1"]
  protocol: HBONE
  node: node-a
  workloadName: client
  canonicalName: client-app
  canonicalRevision: v1
  clusterId: cluster1
- uid: cluster1//v1/Pod/default/server-5d2b
  name: server-5d2b
  namespace: default
  serviceAccount: server
  workloadIps: ["127.{net}.0.2"]
  protocol: HBONE
  node: node-b
  workloadName: server
  canonicalName: server-app
  canonicalRevision: v2
  clusterId: cluster1
{echo_endpoint}- uid: cluster1//v1/Pod/default/legacy-0
  name: legacy-0
  namespace: default
  serviceAccount: legacy
  workloadIps: ["127.{net}.0.3"]
  protocol: TCP
  node: node-b
  workloadName: legacy
  clusterId: cluster1
services:
{echo}policies:
{deny}"#
    )
}

/// The two nodes, and the client's workload IP (on node A).
async fn two_nodes(net: u8) -> (TwoNodes, IpAddr) {
    let ts = testserver(state(net), &format!("127.{net}.0.10"), None).await;
    let nodes = harness::two_nodes(ts, &format!("127.{net}.0")).await;
    (nodes, format!("127.{net}.0.1").parse().unwrap())
}

/// One HTTP/1.0 GET; returns the status line's code, the headers (lower-cased names) and the body.
async fn http_get(addr: SocketAddr, target: &str) -> (u16, Vec<(String, String)>, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .expect("HTTP answer within 10 s")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("HTTP head and body");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus server in a temporary directory, killed (and the directory removed) on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job `l4mesh`) every second; waits until it is ready.
    async fn start(targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n- job_name: l4mesh\n  metrics_path: /stats/prometheus\n  \
             static_configs:\n  - targets: [{list}]\n"
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr: SocketAddr = PROMETHEUS.parse().unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("prometheus.log")).unwrap(),
            ))
            .spawn()
            .expect("the `prometheus` binary runs (Debian package prometheus; scripts/test.sh installs it)");
        let mut p = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait().unwrap() {
                let log = std::fs::read_to_string(p._dir.path().join("prometheus.log"));
                panic!("prometheus exited at start: {status}; log: {log:?}");
            }
            if TcpStream::connect(addr).await.is_ok() && http_get(addr, "/-/ready").await.0 == 200 {
                return p;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus was not ready on {addr} within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Runs an instant query; returns the result vector (panics on a query error).
    async fn query(&self, promql: &str) -> Vec<serde_json::Value> {
        let (status, _, body) = http_get(
            self.addr,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )
        .await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(status, 200, "query {promql:?} failed: {body}");
        assert_eq!(v["status"], "success", "query {promql:?}: {body}");
        v["data"]["result"].as_array().cloned().unwrap_or_default()
    }

    /// The single value `promql` yields, if it yields exactly one sample.
    async fn scalar(&self, promql: &str) -> Option<f64> {
        let r = self.query(promql).await;
        match r.as_slice() {
            [one] => one["value"][1].as_str()?.parse().ok(),
            _ => None,
        }
    }

    /// Waits (bounded) until `promql` yields exactly `want`; returns what it last saw otherwise.
    async fn await_value(&self, promql: &str, want: f64) -> Result<(), Option<f64>> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let got = self.scalar(promql).await;
            if got == Some(want) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(got);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_counts_what_was_sent() {
    let (m, client_ip) = two_nodes(51).await;
    let server = Backend::start(&format!("127.51.0.2:{BACKEND_PORT}"), "b").await;
    let legacy = Backend::start(&format!("127.51.0.3:{BACKEND_PORT}"), "legacy").await;
    let (a_metrics, b_metrics) = (m.a.metrics_addr.unwrap(), m.b.metrics_addr.unwrap());
    let prom = Prometheus::start(&[a_metrics, b_metrics]).await;

    // Three HBONE connections through the service VIP: 1000, 2000 and 3000 bytes up; each answer
    // is "b:" and the same bytes back.
    let socks = m.a.socks5.unwrap();
    for n in [1000usize, 2000, 3000] {
        let s = socks5_connect_from(client_ip, socks, "127.51.0.100", 80)
            .await
            .expect("tunnel accepted");
        let msg = "x".repeat(n);
        assert_eq!(exchange(s, &msg).await, format!("b:{msg}"));
    }
    // One plaintext connection to the TCP (non-mesh-protocol) workload: 500 up, 507 back.
    let s = socks5_connect_from(client_ip, socks, "127.51.0.3", legacy.addr.port())
        .await
        .unwrap();
    let msg = "y".repeat(500);
    assert_eq!(exchange(s, &msg).await, format!("legacy:{msg}"));
    // One tunnel B's policy denies (401): counted opened and closed with the flag DENY, each side.
    assert!(
        socks5_connect_from(client_ip, socks, "127.51.0.2", DENIED_PORT)
            .await
            .is_err(),
        "the policy denies the tunnel"
    );
    let (a, b) = (a_metrics.to_string(), b_metrics.to_string());
    let sum = |metric: &str, instance: &str, selector: &str| {
        format!("sum({metric}{{instance=\"{instance}\",{selector}}})")
    };
    let mtls_src = "reporter=\"source\",connection_security_policy=\"mutual_tls\"";
    let mtls_dst = "reporter=\"destination\",connection_security_policy=\"mutual_tls\"";
    let plain_src = "reporter=\"source\",connection_security_policy=\"unknown\"";

    // A long connection: its bytes show while it is still open (metered per chunk, not at close).
    let mut long = socks5_connect_from(client_ip, socks, "127.51.0.100", 80)
        .await
        .unwrap();
    long.write_all(&[b'z'; 4000]).await.unwrap();
    let while_open = [
        ("istio_tcp_received_bytes_total", &a, mtls_src, 10000.0),
        ("istio_tcp_received_bytes_total", &b, mtls_dst, 10000.0),
        ("istio_tcp_connections_opened_total", &a, mtls_src, 5.0),
        ("istio_tcp_connections_closed_total", &a, mtls_src, 4.0),
        ("istio_tcp_connections_opened_total", &b, mtls_dst, 5.0),
        ("istio_tcp_connections_closed_total", &b, mtls_dst, 4.0),
        ("l4mesh_open_connections", &a, "direction=\"outbound\"", 1.0),
        ("l4mesh_open_connections", &b, "direction=\"inbound\"", 1.0),
        // Tunnels count as opened when they start, the long one included.
        (
            "l4mesh_hbone_tunnels_opened_total",
            &a,
            "direction=\"outbound\"",
            5.0,
        ),
        (
            "l4mesh_hbone_tunnels_opened_total",
            &b,
            "direction=\"inbound\"",
            5.0,
        ),
    ];
    for (metric, instance, selector, want) in while_open {
        let q = sum(metric, instance, selector);
        if let Err(got) = prom.await_value(&q, want).await {
            panic!(
                "while the long connection is open, {q}: expected {want}, Prometheus has {got:?}"
            );
        }
    }
    long.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), long.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(answer, format!("b:{}", "z".repeat(4000)));
    drop(long);
    drop(server);

    let expect = [
        // Node A reports as the source, node B as the destination; both see the same traffic:
        // five tunnels (one denied), 1000 + 2000 + 3000 + 4000 bytes up, each answer 2 bytes
        // longer.
        ("istio_tcp_connections_opened_total", &a, mtls_src, 5.0),
        ("istio_tcp_connections_closed_total", &a, mtls_src, 5.0),
        // ztunnel's failures: the denied tunnel, on each side (also counted closed).
        ("istio_tcp_connections_failed_total", &a, mtls_src, 1.0),
        ("istio_tcp_connections_failed_total", &b, mtls_dst, 1.0),
        ("istio_tcp_received_bytes_total", &a, mtls_src, 10000.0),
        ("istio_tcp_sent_bytes_total", &a, mtls_src, 10008.0),
        ("istio_tcp_connections_opened_total", &b, mtls_dst, 5.0),
        ("istio_tcp_connections_closed_total", &b, mtls_dst, 5.0),
        ("istio_tcp_received_bytes_total", &b, mtls_dst, 10000.0),
        ("istio_tcp_sent_bytes_total", &b, mtls_dst, 10008.0),
        ("istio_tcp_connections_opened_total", &a, plain_src, 1.0),
        ("istio_tcp_connections_closed_total", &a, plain_src, 1.0),
        ("istio_tcp_received_bytes_total", &a, plain_src, 500.0),
        ("istio_tcp_sent_bytes_total", &a, plain_src, 507.0),
        ("l4mesh_open_connections", &a, "direction=~\".*\"", 0.0),
        ("l4mesh_open_connections", &b, "direction=~\".*\"", 0.0),
    ];
    for (metric, instance, selector, want) in expect {
        let q = sum(metric, instance, selector);
        if let Err(got) = prom.await_value(&q, want).await {
            panic!("{q}: expected {want}, Prometheus has {got:?}");
        }
    }
    // Nothing else was counted: no destination-side plaintext on B; the only failures are the
    // denied tunnel's, one per side, flagged DENY.
    assert_eq!(
        prom.scalar(&format!(
            "sum(istio_tcp_connections_opened_total{{instance=\"{b}\"}})"
        ))
        .await,
        Some(5.0)
    );
    for (instance, reporter) in [(&a, "source"), (&b, "destination")] {
        let rows = prom
            .query(&format!(
                "sum by (response_flags, destination_workload, source_principal) (istio_tcp_connections_closed_total{{instance=\"{instance}\",reporter=\"{reporter}\",response_flags!=\"-\"}})"
            ))
            .await;
        assert_eq!(rows.len(), 1, "{reporter}: {rows:?}");
        assert_eq!(rows[0]["metric"]["response_flags"], "DENY", "{rows:?}");
        assert_eq!(rows[0]["metric"]["destination_workload"], "server");
        assert_eq!(
            rows[0]["metric"]["source_principal"],
            "spiffe://cluster.local/ns/default/sa/client"
        );
        assert_eq!(rows[0]["value"][1], "1", "{rows:?}");
        let failed = prom
            .query(&format!(
                "sum by (response_flags) (istio_tcp_connections_failed_total{{instance=\"{instance}\",reporter=\"{reporter}\"}})"
            ))
            .await;
        assert_eq!(failed.len(), 1, "{reporter}: {failed:?}");
        assert_eq!(failed[0]["metric"]["response_flags"], "DENY", "{failed:?}");
    }
    let deny = format!("sum(l4mesh_rbac_decisions_total{{instance=\"{b}\",result=\"deny\"}})");
    assert_eq!(prom.scalar(&deny).await, Some(1.0), "{deny}");
    let answered = |status: &str| {
        format!("l4mesh_hbone_connect_responses_total{{instance=\"{b}\",status=\"{status}\"}}")
    };
    assert_eq!(prom.scalar(&answered("401")).await, Some(1.0));
    assert_eq!(prom.scalar(&answered("200")).await, Some(4.0));
    assert_eq!(prom.scalar(&answered("other")).await, Some(0.0));

    // The labels of each side, as Istio's dashboards select them.
    for (instance, reporter) in [(&a, "source"), (&b, "destination")] {
        let rows = prom
            .query(&format!(
                "istio_tcp_connections_opened_total{{instance=\"{instance}\",reporter=\"{reporter}\",connection_security_policy=\"mutual_tls\",destination_service!=\"unknown\"}}"
            ))
            .await;
        assert_eq!(
            rows.len(),
            1,
            "one label set per side for the VIP traffic: {rows:?}"
        );
        let l = &rows[0]["metric"];
        let want = [
            ("source_workload", "client"),
            ("source_workload_namespace", "default"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("source_app", "client-app"),
            ("source_version", "v1"),
            ("source_cluster", "cluster1"),
            ("destination_workload", "server"),
            ("destination_workload_namespace", "default"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/server",
            ),
            ("destination_app", "server-app"),
            ("destination_version", "v2"),
            ("destination_canonical_service", "server-app"),
            ("destination_canonical_revision", "v2"),
            ("destination_service", "echo.default.svc.cluster.local"),
            ("destination_service_name", "echo"),
            ("destination_service_namespace", "default"),
            ("request_protocol", "tcp"),
            ("response_flags", "-"),
        ];
        for (k, v) in want {
            assert_eq!(l[k], v, "{reporter} label {k}: {l}");
        }
    }
    let rows = prom
        .query(&format!(
            "istio_tcp_connections_opened_total{{instance=\"{a}\",connection_security_policy=\"unknown\"}}"
        ))
        .await;
    let l = &rows[0]["metric"];
    assert_eq!(l["destination_workload"], "legacy");
    assert_eq!(
        l["destination_app"], "unknown",
        "missing values are `unknown`"
    );
    assert_eq!(
        l["source_principal"], "unknown",
        "no mutual TLS, no principal"
    );
    assert_eq!(l["destination_service"], "unknown", "dialled by pod IP");
    // Label values are names from the mesh state, never addresses or ports: the number of series
    // is bounded by the mesh's size, not by its traffic.
    for inst in [&a, &b] {
        let rows = prom
            .query(&format!(
                "{{__name__=~\"istio_tcp_.*\",instance=\"{inst}\"}}"
            ))
            .await;
        assert!(!rows.is_empty(), "no istio_tcp_* series for {inst}");
        for row in &rows {
            for (k, v) in row["metric"].as_object().unwrap() {
                if ["instance", "job", "__name__"].contains(&k.as_str()) {
                    continue;
                }
                let v = v.as_str().unwrap();
                assert!(
                    !k.ends_with("_port")
                        && !k.ends_with("_ip")
                        && !v.contains("127.51.")
                        && v.parse::<std::net::IpAddr>().is_err(),
                    "unbounded label {k}={v} on {inst}"
                );
            }
        }
    }

    // The rest of what the dashboard shows is there and agrees.
    let rbac = format!("sum(l4mesh_rbac_decisions_total{{instance=\"{b}\",result=\"allow\"}})");
    assert_eq!(prom.await_value(&rbac, 4.0).await, Ok(()), "{rbac}");
    let tunnels =
        format!("l4mesh_hbone_tunnels_opened_total{{instance=\"{a}\",direction=\"outbound\"}}");
    assert_eq!(prom.await_value(&tunnels, 5.0).await, Ok(()), "{tunnels}");
    let pool = format!("l4mesh_hbone_pool_connections{{instance=\"{a}\"}}");
    assert_eq!(prom.await_value(&pool, 1.0).await, Ok(()), "{pool}");
    let build = format!("istio_build{{instance=\"{a}\",component=\"ztunnel\"}}");
    assert_eq!(prom.await_value(&build, 1.0).await, Ok(()), "{build}");

    // Every query of the Grafana dashboard parses and runs against this Prometheus.
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("docs/grafana/l4mesh-dashboard.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let mut queries = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let expr = expr
                .replace("$__rate_interval", "1m")
                .replace("$__interval", "1m")
                .replace("$instance", ".*")
                .replace("$namespace", ".*")
                .replace("$workload", ".*");
            let rows = prom.query(&expr).await;
            queries += 1;
            // Instant vectors that exist from the first scrape must have data.
            if !expr.contains('[') {
                assert!(!rows.is_empty(), "dashboard query {expr:?} found nothing");
            }
        }
    }
    assert!(
        queries >= 8,
        "the dashboard has its panels ({queries} queries)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_serves_both_paths_in_both_formats() {
    let (m, _) = two_nodes(52).await;
    let addr = m.a.metrics_addr.unwrap();
    // The node's certificate is fetched in the background: scrape until it is reported.
    let available = "l4mesh_certificate_state{identity=\"spiffe://cluster.local/ns/default/sa/client\",state=\"available\"} 1";
    let deadline = Instant::now() + Duration::from_secs(10);
    let (status, headers, prom_text) = loop {
        let r = http_get(addr, "/metrics").await;
        if r.2.contains(available) || Instant::now() > deadline {
            break r;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200);
    let ct = |h: &[(String, String)]| {
        h.iter()
            .find(|(k, _)| k == "content-type")
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(ct(&headers), "text/plain; version=0.0.4; charset=utf-8");
    let (status, headers, same) = http_get(addr, "/stats/prometheus").await;
    assert_eq!(status, 200);
    assert_eq!(ct(&headers), "text/plain; version=0.0.4; charset=utf-8");
    // The same families on both paths (values such as CPU time move between scrapes).
    let names = |t: &str| {
        t.lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(names(&prom_text), names(&same));
    for want in [
        "istio_build{component=\"ztunnel\",tag=\"",
        "istio_xds_message_total{url=\"type.googleapis.com/istio.workload.Address\"}",
        "istio_xds_message_total{url=\"type.googleapis.com/istio.security.Authorization\"}",
        "# TYPE istio_xds_connection_terminations_total counter",
        "l4mesh_xds_connected 1",
        available,
        "l4mesh_certificate_expiry_timestamp_seconds{identity=\"spiffe://cluster.local/ns/default/sa/client\"}",
        "process_resident_memory_bytes ",
        "process_cpu_seconds_total ",
        "process_open_fds ",
        "process_max_fds ",
        "process_start_time_seconds ",
        // ztunnel's runtime figures, under its names (the OpenMetrics text below has its types).
        "tokio_num_workers 2",
        "tokio_num_alive_tasks ",
        "tokio_global_queue_depth ",
        "tokio_worker_total_busy_duration_seconds_total{worker=\"1\"} ",
        "l4mesh_hbone_pool_connections 0",
        "l4mesh_xds_resources{url=\"type.googleapis.com/istio.workload.Address\"} 4",
    ] {
        assert!(prom_text.contains(want), "{want:?} missing from:\n{prom_text}");
    }
    // No traffic yet: the TCP families have no series (they appear with the first connection).
    assert!(!prom_text.contains("istio_tcp_"), "{prom_text}");

    // OpenMetrics when asked for, as Prometheus does.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!(
            "GET /metrics HTTP/1.0\r\nHost: {addr}\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).await.unwrap();
    assert!(raw
        .to_ascii_lowercase()
        .contains("content-type: application/openmetrics-text; version=1.0.0; charset=utf-8"));
    assert!(raw.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    // The runtime figures exactly as ztunnel's OpenMetrics text has them: the park counts are
    // counters whose samples have no `_total`.
    for want in [
        "# TYPE tokio_num_workers gauge\ntokio_num_workers 2\n",
        "# TYPE tokio_worker_total_busy_duration_seconds counter\n",
        "\ntokio_worker_total_busy_duration_seconds_total{worker=\"0\"} ",
        "# TYPE tokio_worker_park_count counter\ntokio_worker_park_count{worker=\"0\"} ",
        "# TYPE tokio_worker_park_unpark_count counter\ntokio_worker_park_unpark_count{worker=\"0\"} ",
    ] {
        assert!(raw.contains(want), "{want:?} missing from:\n{raw}");
    }

    let (status, _, body) = http_get(addr, "/stats").await;
    assert_eq!(status, 404);
    assert!(body.contains("/metrics"), "{body}");
}
