//! Graceful shutdown of the real binary: SIGTERM (and `POST /quitquitquit`) make readiness fail at
//! once and close the listeners (new connections are refused), let a transfer in progress finish
//! intact, close what is still open at CONNECTION_TERMINATION_DEADLINE, and exit 0. Over HBONE,
//! the draining node sends GOAWAY: the peer opens no new tunnel on that connection while the
//! active one finishes.
//!
//! Addresses: 127.53.x and 127.54.x (127.55.x is otel.rs's).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::binary::{http, L4mesh};
use super::harness::{
    mesh_node, mesh_node_with, socks5_connect, socks5_connect_from, testserver, testserver_ca,
    two_workloads_yaml, Backend,
};
use super::raw_hbone;

/// `len` bytes of a pattern that detects reordering and loss.
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

/// Sends `data` in 64 KiB chunks with a pause between them (a transfer that takes a while),
/// half-closes, and reads the backend's whole answer.
async fn slow_exchange(mut s: TcpStream, data: Vec<u8>, pause: Duration) -> Vec<u8> {
    let (mut r, mut w) = s.split();
    let send = async {
        for chunk in data.chunks(64 * 1024) {
            w.write_all(chunk).await.unwrap();
            tokio::time::sleep(pause).await;
        }
        w.shutdown().await.unwrap();
    };
    let mut out = Vec::new();
    let recv = r.read_to_end(&mut out);
    let ((), n) = tokio::time::timeout(Duration::from_secs(15), async { tokio::join!(send, recv) })
        .await
        .expect("transfer timed out");
    n.unwrap();
    out
}

/// Waits (up to 3 s) until readiness answers 503 "draining".
async fn readiness_says_draining(node: &L4mesh) {
    for _ in 0..150 {
        if let Ok((503, body)) = http(node.readiness, "GET", "/healthz/ready").await {
            assert_eq!(body, "draining\n");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("readiness did not turn 503 draining; log:\n{}", node.log());
}

/// Waits (up to 3 s) until a TCP connection to `addr` is refused.
async fn refused(addr: SocketAddr) {
    for _ in 0..150 {
        match TcpStream::connect(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return,
            // A connection caught in the backlog while the listener closes is reset: it was not
            // served, but the listener was still there; try again until it is gone.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connecting to {addr}: expected a refusal, got {e}"),
            Ok(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{addr} still accepts connections during the drain");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_a_transfer_finish_and_refuses_new_connections() {
    let backend = Backend::start("127.53.3.9:18080", "b").await;
    let mut node = L4mesh::spawn(
        "127.53.3.1",
        &[("CONNECTION_TERMINATION_DEADLINE", "8s".into())],
    );
    node.ready().await;
    let dst = backend.addr;
    let s = socks5_connect(node.socks5, &dst.ip().to_string(), dst.port())
        .await
        .unwrap();
    // 4 MiB over ~1.3 s.
    let data = payload(4 * 1024 * 1024);
    let transfer = tokio::spawn(slow_exchange(s, data.clone(), Duration::from_millis(20)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let term = Instant::now();
    node.signal("TERM");

    readiness_says_draining(&node).await;
    refused(node.socks5).await;
    refused(SocketAddr::new(node.socks5.ip(), 15008)).await;
    assert!(
        !transfer.is_finished(),
        "the transfer should still be running during these checks"
    );

    let out = transfer.await.unwrap();
    assert_eq!(out.len(), 2 + data.len());
    assert!(
        out[..2] == *b"b:" && out[2..] == data[..],
        "bytes arrived intact"
    );
    // The drain ends with the last connection, well before the deadline.
    assert_eq!(
        node.exit_code(Duration::from_secs(5)).await,
        Some(0),
        "{}",
        node.log()
    );
    assert!(
        term.elapsed() < Duration::from_secs(6),
        "{:?}",
        term.elapsed()
    );
    assert_eq!(
        node.count(&["drained; exiting", "closed_at_deadline=0"]),
        1,
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_closes_a_connection_that_does_not_end() {
    let backend = Backend::start("127.53.4.9:18080", "b").await;
    let mut node = L4mesh::spawn(
        "127.53.4.1",
        &[("CONNECTION_TERMINATION_DEADLINE", "1500ms".into())],
    );
    node.ready().await;
    let dst = backend.addr;
    // The backend answers only after the client half-closes: this connection stays open.
    let mut s = socks5_connect(node.socks5, &dst.ip().to_string(), dst.port())
        .await
        .unwrap();
    s.write_all(b"still here").await.unwrap();
    let term = Instant::now();
    node.signal("TERM");
    let mut buf = [0u8; 16];
    let r = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("closed within the deadline and its grace");
    assert!(matches!(r, Ok(0) | Err(_)), "closed, not answered: {r:?}");
    let closed = term.elapsed();
    assert!(
        closed >= Duration::from_millis(1300) && closed < Duration::from_secs(3),
        "closed {closed:?} after SIGTERM; expected at the 1.5 s deadline"
    );
    assert_eq!(
        node.exit_code(Duration::from_secs(3)).await,
        Some(0),
        "{}",
        node.log()
    );
    assert_eq!(
        node.count(&["drained; exiting", "closed_at_deadline=1"]),
        1,
        "{}",
        node.log()
    );
    // Its access line says why it was closed.
    assert_eq!(
        node.count(&["connection failed", "LR", "drain deadline"]),
        1,
        "{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quitquitquit_drains_then_exits() {
    drain_then_exit("127.53.5", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_drains_then_exits() {
    drain_then_exit("127.53.8", Some("INT")).await;
}

/// Starts a drain with `signal` (else `POST /quitquitquit`) while a connection is open: readiness
/// says draining, new connections are refused, the admin server still answers, the open
/// connection ends normally, and l4mesh exits 0 having logged why once.
async fn drain_then_exit(net: &str, signal: Option<&str>) {
    let backend = Backend::start(&format!("{net}.9:18080"), "b").await;
    let mut node = L4mesh::spawn(
        &format!("{net}.1"),
        &[("CONNECTION_TERMINATION_DEADLINE", "8s".into())],
    );
    node.ready().await;
    let dst = backend.addr;
    let mut s = socks5_connect(node.socks5, &dst.ip().to_string(), dst.port())
        .await
        .unwrap();
    s.write_all(b"before").await.unwrap();

    let reason = match signal {
        Some(sig) => {
            node.signal(sig);
            format!("reason=\"SIG{sig}\"")
        }
        None => {
            let (code, body) = http(node.admin, "POST", "/quitquitquit").await.unwrap();
            assert_eq!(code, 200, "{body}");
            assert!(body.starts_with("draining"), "{body}");
            "reason=\"POST /quitquitquit\"".to_owned()
        }
    };
    readiness_says_draining(&node).await;
    refused(node.socks5).await;
    // The admin server still answers while draining.
    let (code, _) = http(node.admin, "GET", "/config_dump").await.unwrap();
    assert_eq!(code, 200);

    // The open connection still works and ends normally; then l4mesh exits.
    s.write_all(b" and after").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, "b:before and after");
    assert_eq!(
        node.exit_code(Duration::from_secs(5)).await,
        Some(0),
        "{}",
        node.log()
    );
    assert_eq!(node.count(&[&reason]), 1, "{}", node.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hbone_peer_gets_goaway_and_the_active_tunnel_finishes() {
    let (a_wl, b_wl) = ("127.54.1.1", "127.54.1.2");
    let state = two_workloads_yaml(a_wl, b_wl, "", "");
    let ts = testserver(state, "127.54.0.100", None).await;
    let _backend = Backend::start(&format!("{b_wl}:18080"), "b").await;
    // Node A in-process (its pool is observable), node B the real binary.
    let a = mesh_node(&ts, "127.54.1.11", "node-a", a_wl).await;
    let mut b = L4mesh::spawn(
        "127.54.1.12",
        &[
            ("XDS_ADDRESS", format!("http://{}", ts.addr())),
            ("NODE_NAME", "node-b".into()),
            ("L4MESH_HBONE_ADDR", format!("{b_wl}:15008")),
            ("CONNECTION_TERMINATION_DEADLINE", "8s".into()),
        ],
    );
    b.ready().await;
    tokio::time::timeout(Duration::from_secs(10), a.readiness.wait())
        .await
        .unwrap();
    let a_ip = a_wl.parse().unwrap();
    let socks = a.socks5.unwrap();

    // A tunnel A → B, active across the SIGTERM.
    let mut tunnel = socks5_connect_from(a_ip, socks, b_wl, 18080).await.unwrap();
    tunnel.write_all(b"through A").await.unwrap();
    // And a raw HBONE connection with one open stream, to see the GOAWAY on the wire.
    let hbone: SocketAddr = format!("{b_wl}:15008").parse().unwrap();
    let tcp = TcpStream::connect(hbone).await.unwrap();
    let raw = raw_hbone::client(testserver_ca(&ts), "client", tcp).await;
    let (resp, mut raw_send) = raw_hbone::connect(raw.clone(), format!("{b_wl}:18080")).await;
    assert_eq!(resp.status(), 200);
    raw_send
        .send_data(bytes::Bytes::from_static(b"raw"), false)
        .unwrap();
    assert_eq!(a.proxy.hbone.outbound_tls_connections(), 1);

    b.signal("TERM");

    // GOAWAY: the raw client may open no new stream on its connection.
    let mut goaway = None;
    for _ in 0..150 {
        match raw.clone().ready().await {
            Err(e) => {
                goaway = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let e = goaway.expect("the draining node sent GOAWAY within 3 s");
    assert!(e.is_go_away() && e.is_remote(), "{e:?}");
    // A's new connection to B gets no tunnel: not over the old connection (GOAWAY), and B's
    // listener is closed.
    refused(hbone).await;
    assert!(socks5_connect_from(a_ip, socks, b_wl, 18080).await.is_err());
    assert_eq!(
        a.proxy.hbone.outbound_tls_connections(),
        1,
        "no new TLS connection could be made"
    );

    // Both open streams still carry data to the end.
    raw_send
        .send_data(bytes::Bytes::from_static(b" stream"), true)
        .unwrap();
    let got = raw_hbone::read_to_end(resp).await;
    assert_eq!(got, b"b:raw stream");
    tunnel.write_all(b" and on").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, "b:through A and on");
    drop(raw);
    assert_eq!(
        b.exit_code(Duration::from_secs(6)).await,
        Some(0),
        "{}",
        b.log()
    );
    assert_eq!(
        b.count(&["drained; exiting", "closed_at_deadline=0"]),
        1,
        "{}",
        b.log()
    );
}

/// The in-process API: [`l4mesh::app::Running::drain`] is the same path as SIGTERM, and reports
/// what it had to close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_process_drain_reports_what_it_closed() {
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    let backend = Backend::start("127.53.6.9:18080", "b").await;
    let mut config = l4mesh::config::Config::local("127.53.6.1".parse().unwrap());
    config.connection_termination_deadline = Duration::from_millis(500);
    let r = l4mesh::app::start(&config).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), r.readiness.wait())
        .await
        .unwrap();
    let socks = r.socks5.unwrap();
    let dst = backend.addr;
    let mut s = socks5_connect(socks, &dst.ip().to_string(), dst.port())
        .await
        .unwrap();
    s.write_all(b"never finished").await.unwrap();
    assert_eq!(r.open_connections(), 1);

    let readiness = r.readiness_addr.unwrap();
    let checks = async {
        r.drain_requested().await;
        let (code, body) = http(readiness, "GET", "/healthz/ready").await.unwrap();
        assert_eq!((code, body.as_str()), (503, "draining\n"));
        refused(socks).await;
        let mut buf = [0u8; 8];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .expect("closed at the deadline");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    };
    let (report, ()) = tokio::join!(r.drain(), checks);
    assert_eq!((report.forced, report.left), (1, 0), "{report:?}");
    assert!(report.elapsed >= Duration::from_millis(450), "{report:?}");
    assert_eq!(r.open_connections(), 0);
}

/// At the deadline, an inbound HBONE tunnel still open is one connection closed (not two: its
/// TLS connection is not counted again), and its access line says `LR` (closed by
/// the drain), not `DC`/`UC` — even though the HTTP/2 connection is dropped at the same moment.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forced_hbone_tunnel_counts_once_and_is_logged_lr() {
    let b_wl = "127.54.2.2";
    // `a` only gives the raw client's identity (`client`) a served workload, for the CA.
    let state = two_workloads_yaml("127.54.2.1", b_wl, "", "");
    let ts = testserver(state, "127.54.2.100", None).await;
    let _backend = Backend::start(&format!("{b_wl}:18080"), "b").await;
    let col = super::otel::Collector::start("127.54.2.50").await;
    let b = mesh_node_with(&ts, "127.54.2.12", "node-b", b_wl, |config| {
        config.connection_termination_deadline = Duration::from_millis(300);
        config.otel = Some(super::otel::settings(col.endpoint(), 1.0));
    })
    .await;
    tokio::time::timeout(Duration::from_secs(10), b.readiness.wait())
        .await
        .unwrap();

    let tcp = TcpStream::connect(b.hbone).await.unwrap();
    let raw = raw_hbone::client(testserver_ca(&ts), "client", tcp).await;
    let (resp, mut send) = raw_hbone::connect(raw, format!("{b_wl}:18080")).await;
    assert_eq!(resp.status(), 200);
    send.send_data(bytes::Bytes::from_static(b"open"), false)
        .unwrap();
    // The backend answers at the end of the stream, which never comes.
    let _body = resp.into_body();
    assert_eq!(
        b.open_connections(),
        1,
        "one tunnel open, its TLS connection not counted"
    );

    let report = b.drain().await;
    assert_eq!((report.forced, report.left), (1, 0), "{report:?}");
    assert_eq!(b.open_connections(), 0);
    // The access record (exported over OTLP: the same fields as the access line) says LR.
    b.proxy.otel.as_ref().unwrap().shutdown().await;
    let flags: Vec<String> = col
        .logs()
        .iter()
        .filter_map(|(_, r)| super::otel::str_attr(&r.attributes, "response_flags"))
        .collect();
    assert_eq!(flags, ["LR"], "the tunnel is closed by the drain");
}

/// The binary exports from the operators' runtime and flushes at exit: with a batch delay far
/// longer than the test, the connection's span and access record reach the collector only
/// through the flush after the drain — and the exit still comes promptly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_flushes_otel_after_the_drain() {
    let backend = Backend::start("127.54.3.9:18080", "b").await;
    let col = super::otel::Collector::start("127.54.3.50").await;
    let mut node = L4mesh::spawn(
        "127.54.3.1",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", col.endpoint()),
            ("OTEL_BSP_SCHEDULE_DELAY", "600000".into()),
        ],
    );
    node.ready().await;
    let dst = backend.addr;
    let mut s = socks5_connect(node.socks5, &dst.ip().to_string(), dst.port())
        .await
        .unwrap();
    s.write_all(b"traced").await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, "b:traced");
    assert!(
        node.wait_line(&["connection complete"], Duration::from_secs(5))
            .await,
        "{}",
        node.log()
    );
    assert!(col.logs().is_empty(), "nothing exported before the exit");
    let term = Instant::now();
    node.signal("TERM");
    assert_eq!(
        node.exit_code(Duration::from_secs(5)).await,
        Some(0),
        "{}",
        node.log()
    );
    assert!(
        term.elapsed() < Duration::from_secs(4),
        "{:?}",
        term.elapsed()
    );
    let flags: Vec<String> = col
        .logs()
        .iter()
        .filter_map(|(_, r)| super::otel::str_attr(&r.attributes, "response_flags"))
        .collect();
    assert_eq!(flags, ["-"], "the access record, flushed at exit");
    assert_eq!(col.spans().len(), 1, "and the span");
}
