//! The plain-TCP data path in local mode: VIPs, workload IPs, passthrough, half-close, hot reload.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::harness::*;

/// A mesh on 127.<n>.0.0/16: VIP 127.<n>.10.1:80 → endpoints on 127.<n>.1.<x>:<port>.
fn mesh_yaml(n: u8, endpoints: &[(&str, u8, u16)]) -> String {
    let mut y = String::from("workloads:\n");
    for (name, x, port) in endpoints {
        y += &format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  workloadIps: [\"127.{n}.1.{x}\"]\n  protocol: TCP\n  services:\n    \"default/echo.default.svc.cluster.local\": {{ 80: {port} }}\n"
        );
    }
    y += &format!(
        "services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  vips: [\"/127.{n}.10.1\"]\n  ports: {{ 80: 8080 }}\n"
    );
    y
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_workload_and_passthrough() {
    let a = Backend::start("127.21.1.1:18080", "a").await;
    let _b = Backend::start("127.21.1.2:18081", "b").await;
    let outside = Backend::start("127.21.2.1:0", "outside").await;
    let mesh = Mesh::start(
        "127.21.0.1",
        &mesh_yaml(21, &[("a", 1, 18080), ("b", 2, 18081)]),
    )
    .await;

    // VIP → one of the two endpoints, on each endpoint's own target port.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let s = socks5_connect(mesh.socks(), "127.21.10.1", 80)
            .await
            .unwrap();
        let reply = exchange(s, "hi").await;
        assert!(
            reply == "a:hi" || reply == "b:hi",
            "unexpected reply {reply:?}"
        );
        seen.insert(reply);
    }
    assert_eq!(
        seen.len(),
        2,
        "both endpoints should serve some of 20 connections"
    );

    // Hostname → VIP through the store.
    let s = socks5_connect(mesh.socks(), "echo.default.svc.cluster.local", 80)
        .await
        .unwrap();
    assert!(exchange(s, "by-name").await.ends_with(":by-name"));

    // Workload IP → that workload.
    let s = socks5_connect(mesh.socks(), "127.21.1.1", a.addr.port())
        .await
        .unwrap();
    assert_eq!(exchange(s, "direct").await, "a:direct");

    // Unknown IP → passthrough.
    let s = socks5_connect(mesh.socks(), "127.21.2.1", outside.addr.port())
        .await
        .unwrap();
    assert_eq!(exchange(s, "pass").await, "outside:pass");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_close_keeps_the_reply_flowing() {
    // The backend only answers after it saw the client's FIN; the answer must still arrive.
    let _a = Backend::start("127.22.1.1:18080", "a").await;
    let mesh = Mesh::start("127.22.0.1", &mesh_yaml(22, &[("a", 1, 18080)])).await;
    let mut s = socks5_connect(mesh.socks(), "127.22.10.1", 80)
        .await
        .unwrap();
    let payload = vec![b'x'; 300_000];
    s.write_all(&payload).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(TIMEOUT, s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.len(), 2 + payload.len());
    assert!(out.starts_with(b"a:xxx"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_edit_reroutes_and_invalid_edit_keeps_old() {
    let _a = Backend::start("127.23.1.1:18080", "a").await;
    let _b = Backend::start("127.23.1.2:18080", "b").await;
    let mesh = Mesh::start("127.23.0.1", &mesh_yaml(23, &[("a", 1, 18080)])).await;
    let s = socks5_connect(mesh.socks(), "127.23.10.1", 80)
        .await
        .unwrap();
    assert_eq!(exchange(s, "1").await, "a:1");

    // Re-point the service at b only: new connections follow, no restart.
    assert!(
        mesh.rewrite(&mesh_yaml(23, &[("b", 2, 18080)])).await,
        "reload not applied"
    );
    let s = socks5_connect(mesh.socks(), "127.23.10.1", 80)
        .await
        .unwrap();
    assert_eq!(exchange(s, "2").await, "b:2");

    // An invalid edit is rejected; the last good config stays in force.
    let version = mesh.running.store.load().version();
    std::fs::write(&mesh.config_path, "workloads:\n- uid: x\n  bogusKey: 1\n").unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(mesh.running.store.load().version(), version);
    let s = socks5_connect(mesh.socks(), "127.23.10.1", 80)
        .await
        .unwrap();
    assert_eq!(exchange(s, "3").await, "b:3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_are_clean() {
    let mesh = Mesh::start("127.24.0.1", &mesh_yaml(24, &[])).await;
    // A service with no endpoint: host unreachable, connection closed.
    let e = socks5_connect(mesh.socks(), "127.24.10.1", 80)
        .await
        .unwrap_err();
    assert_eq!(e, 4, "expected SOCKS5 'host unreachable'");
    // A port the service does not expose.
    let e = socks5_connect(mesh.socks(), "127.24.10.1", 81)
        .await
        .unwrap_err();
    assert_eq!(e, 4);
    // Nothing listening at a passthrough destination: connection refused.
    let e = socks5_connect(mesh.socks(), "127.24.3.1", 9)
        .await
        .unwrap_err();
    assert_eq!(e, 5, "expected SOCKS5 'connection refused'");
    // The proxy's own listener: refused, no loop.
    let out = mesh.running.outbound;
    let e = socks5_connect(mesh.socks(), &out.ip().to_string(), out.port())
        .await
        .unwrap_err();
    assert_eq!(e, 1);
    // Every own port, on any loopback address (the listeners are bound to 127.24.0.1 only) and
    // the admin server among them: refused before any connect.
    let r = &mesh.running;
    let own = [
        r.outbound.port(),
        r.inbound_plaintext.port(),
        r.hbone.port(),
        mesh.socks().port(),
        r.metrics_addr.unwrap().port(),
        r.readiness_addr.unwrap().port(),
        r.admin_addr.unwrap().port(),
    ];
    for port in own {
        for ip in ["127.24.0.1", "127.0.0.1", "127.99.0.1"] {
            let e = socks5_connect(mesh.socks(), ip, port).await.unwrap_err();
            assert_eq!(e, 1, "{ip}:{port}");
        }
    }
    // Dialling the outbound listener directly (not redirected) is a loop: closed at once.
    let mut s = TcpStream::connect(out).await.unwrap();
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    // Garbage on the SOCKS5 port: closed, l4mesh keeps serving.
    let mut s = TcpStream::connect(mesh.socks()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let n = tokio::time::timeout(TIMEOUT, s.read(&mut buf))
        .await
        .unwrap()
        .unwrap_or(0);
    assert_eq!(n, 0);
    let e = socks5_connect(mesh.socks(), "127.24.10.1", 80)
        .await
        .unwrap_err();
    assert_eq!(e, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_fails_clearly() {
    // An invalid file fails startup with an error naming the problem.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "workloads:\n- uid: x\n  workloadIps: [\"300.1.1.1\"]\n",
    )
    .unwrap();
    let mut config = l4mesh::config::Config::local("127.25.0.1".parse().unwrap());
    config.source = l4mesh::config::Source::File(path);
    let e = l4mesh::app::start(&config).await.err().expect("must fail");
    assert!(e.to_string().contains("300.1.1.1"), "{e}");

    // A port conflict fails startup and names the listener.
    let taken = std::net::TcpListener::bind("127.25.0.2:0").unwrap();
    let mut config = l4mesh::config::Config::local("127.25.0.2".parse().unwrap());
    config.outbound_addr = taken.local_addr().unwrap();
    let e = l4mesh::app::start(&config).await.err().expect("must fail");
    assert!(e.to_string().contains("outbound"), "{e}");
}
