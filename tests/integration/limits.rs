//! Issue 14, item 4: every listener has limits. The operators' HTTP servers close a client that
//! trickles its request head (slowloris) or idles after an answer, and hold a bounded number of
//! connections; each data-path listener caps its connections, in total and (when asked) per
//! source. A connection over a cap is closed at once and counted in
//! `l4mesh_connections_refused_total`, while the listener keeps serving.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use l4mesh::config::{Config, Source};

use super::binary::http;
use super::harness::closed_within;
use super::harness::{exchange, socks5_connect, Backend};

const MESH: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.57.0.1"]
  protocol: TCP
"#;

async fn start(configure: impl FnOnce(&mut Config)) -> (l4mesh::app::Running, tempfile::TempDir) {
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, MESH).unwrap();
    let mut config = Config::local("127.57.0.1".parse().unwrap());
    config.source = Source::File(path);
    configure(&mut config);
    let r = l4mesh::app::start(&config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), r.readiness.wait())
        .await
        .unwrap();
    (r, dir)
}

/// The value of the sample of `family` whose labels contain every `labels` pair.
async fn sample(metrics: SocketAddr, family: &str, labels: &[&str]) -> Option<f64> {
    let (code, body) = http(metrics, "GET", "/metrics").await.ok()?;
    assert_eq!(code, 200);
    body.lines()
        .filter(|l| l.starts_with(family) && labels.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_servers_close_slow_and_idle_clients_and_cap_connections() {
    let (r, _dir) = start(|c| {
        c.http.header_timeout = Duration::from_millis(400);
        c.http.max_connections = 3;
    })
    .await;
    let ready = r.readiness_addr.unwrap();

    // Slowloris: a head sent a byte at a time never completes; closed at the header timeout.
    let mut slow = TcpStream::connect(ready).await.unwrap();
    let trickle = async {
        for b in b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n" {
            if slow.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(1), trickle)
        .await
        .ok();
    let took = closed_within(&mut slow, Duration::from_secs(3)).await;
    assert!(
        took.is_some(),
        "a trickled request head kept its connection"
    );

    // Keep-alive: one answer, then idle → closed at the same timeout.
    let mut idle = TcpStream::connect(ready).await.unwrap();
    idle.write_all(b"GET /healthz/ready HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let took = closed_within(&mut idle, Duration::from_secs(3)).await;
    assert!(
        matches!(took, Some(t) if t >= Duration::from_millis(300)),
        "an idle keep-alive connection must close at the header timeout: {took:?}"
    );

    // The cap: three held connections, the fourth is closed at once (before any timeout), and
    // once one goes the server answers again.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(ready).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut over = TcpStream::connect(ready).await.unwrap();
    let took = closed_within(&mut over, Duration::from_millis(300)).await;
    assert!(took.is_some(), "a fourth connection was held over the cap");
    drop(held);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (code, _) = http(ready, "GET", "/healthz/ready").await.unwrap();
    assert_eq!(code, 200);
    let refused = sample(
        r.metrics_addr.unwrap(),
        "l4mesh_connections_refused_total",
        &["listener=\"readiness\"", "reason=\"listener_limit\""],
    )
    .await;
    assert!(matches!(refused, Some(n) if n >= 1.0), "{refused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_path_listeners_cap_connections_in_total_and_per_source() {
    let (r, _dir) = start(|c| {
        c.max_connections = Some(2);
    })
    .await;
    let _b = Backend::start("127.57.0.9:18081", "b").await;
    let socks = r.socks5.unwrap();
    let metrics = r.metrics_addr.unwrap();
    assert_eq!(
        sample(
            metrics,
            "l4mesh_listener_max_connections",
            &["listener=\"socks5\""]
        )
        .await,
        Some(2.0)
    );
    // Two held SOCKS5 connections fill the listener; a third is closed unserved.
    let h1 = socks5_connect(socks, "127.57.0.9", 18081).await.unwrap();
    let h2 = socks5_connect(socks, "127.57.0.9", 18081).await.unwrap();
    let mut over = TcpStream::connect(socks).await.unwrap();
    let took = closed_within(&mut over, Duration::from_millis(500)).await;
    assert!(took.is_some(), "a third connection was served over the cap");
    let refused = sample(
        metrics,
        "l4mesh_connections_refused_total",
        &["listener=\"socks5\"", "reason=\"listener_limit\""],
    )
    .await;
    assert_eq!(refused, Some(1.0));
    // Places free as connections end; the data path serves again.
    assert_eq!(exchange(h1, "1").await, "b:1");
    drop(h2);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let s = socks5_connect(socks, "127.57.0.9", 18081).await.unwrap();
    assert_eq!(exchange(s, "2").await, "b:2");
    drop(r);

    // Per source: two from one address, a third from it is refused, another address passes.
    let (r, _dir) = start(|c| {
        c.max_connections_per_source = 2;
    })
    .await;
    let socks = r.socks5.unwrap();
    let from = |ip: &str| {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
        sock.connect(socks)
    };
    let _a1 = from("127.57.1.1").await.unwrap();
    let _a2 = from("127.57.1.1").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut a3 = from("127.57.1.1").await.unwrap();
    let took = closed_within(&mut a3, Duration::from_millis(500)).await;
    assert!(
        took.is_some(),
        "a third connection from one source was served"
    );
    let mut b1 = from("127.57.1.2").await.unwrap();
    assert!(
        closed_within(&mut b1, Duration::from_millis(300))
            .await
            .is_none(),
        "another source must still be served"
    );
    let refused = sample(
        r.metrics_addr.unwrap(),
        "l4mesh_connections_refused_total",
        &["listener=\"socks5\"", "reason=\"source_limit\""],
    )
    .await;
    assert_eq!(refused, Some(1.0));
}
