//! Application tunnels: workload `b` asks for PROXY protocol on a port of its own
//! (`applicationTunnel: {protocol: PROXY, port}`). A client's stream through HBONE reaches that
//! port on b's loopback (LOCALHOST_APP_TUNNEL, ztunnel's default), starting with a PROXY v2
//! header that names the client, the destination it asked for and its SPIFFE identity (TLV
//! 0xD0). Checked byte for byte by a reader of our own, and by a real PROXY-protocol consumer:
//! HAProxy with `accept-proxy`, whose log shows the addresses it took from the header.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::harness::{
    exchange, socks5_connect_from, testserver, two_nodes_with, two_workloads_yaml, Backend,
    TwoNodes,
};
use super::netns::{has_tool, spawn_on_host, Output};

/// A process on the host's network (b's loopback is the host's in these in-process tests), killed
/// on drop.
struct HostProc {
    child: std::process::Child,
    out: Output,
}

impl Drop for HostProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port the client asks for on b (nothing listens there: the tunnel's port does).
const TARGET_PORT: u16 = 18080;

fn state(n: u8, protocol: &str, tunnel_port: u16) -> String {
    two_workloads_yaml(
        &format!("127.44.{n}.1"),
        &format!("127.44.{n}.2"),
        &format!("  applicationTunnel: {{ protocol: {protocol}, port: {tunnel_port} }}\n"),
        "",
    )
}

async fn mesh(n: u8, tunnel_port: u16) -> TwoNodes {
    mesh_with(n, "PROXY", tunnel_port, true).await
}

async fn mesh_with(n: u8, protocol: &str, tunnel_port: u16, on_loopback: bool) -> TwoNodes {
    let ts = testserver(state(n, protocol, tunnel_port), "127.0.0.1", None).await;
    two_nodes_with(ts, &format!("127.44.{n}"), |c| {
        c.localhost_app_tunnel = on_loopback
    })
    .await
}

/// What the reader saw in one header.
#[derive(Debug, PartialEq)]
struct Seen {
    src: SocketAddr,
    dst: SocketAddr,
    identity: String,
    payload: String,
}

/// Reads a PROXY v2 header (IPv4, TLVs) and then the payload, from the first connection.
async fn read_one(l: TcpListener) -> Seen {
    let (mut s, peer) = l.accept().await.unwrap();
    // Delivered on loopback, from loopback: only the proxy reaches the PROXY port.
    if l.local_addr().unwrap().ip() == IpAddr::from([127, 0, 0, 1]) {
        assert!(peer.ip().is_loopback(), "{peer}");
    }
    let mut head = [0u8; 16];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head[..12], b"\r\n\r\n\0\r\nQUIT\n", "the v2 signature");
    assert_eq!(
        (head[12], head[13]),
        (0x21, 0x11),
        "v2 PROXY, TCP over IPv4"
    );
    let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.unwrap();
    let ip = |b: &[u8]| IpAddr::from([b[0], b[1], b[2], b[3]]);
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    let src = SocketAddr::new(ip(&body[0..4]), port(&body[8..10]));
    let dst = SocketAddr::new(ip(&body[4..8]), port(&body[10..12]));
    let mut tlvs = &body[12..];
    let mut identity = String::new();
    while tlvs.len() >= 3 {
        let (t, l) = (tlvs[0], usize::from(u16::from_be_bytes([tlvs[1], tlvs[2]])));
        if t == 0xD0 {
            identity = String::from_utf8(tlvs[3..3 + l].to_vec()).unwrap();
        }
        tlvs = &tlvs[3 + l..];
    }
    assert!(tlvs.is_empty(), "TLVs fill the header exactly");
    let mut payload = String::new();
    s.read_to_string(&mut payload).await.unwrap();
    s.write_all(b"ok").await.unwrap();
    Seen {
        src,
        dst,
        identity,
        payload,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_protocol_names_the_client_the_target_and_its_identity() {
    let port = 18088;
    let m = mesh(1, port).await;
    let reader = tokio::spawn(read_one(
        TcpListener::bind(("127.0.0.1", port)).await.unwrap(),
    ));
    let a_ip: IpAddr = "127.44.1.1".parse().unwrap();
    let s = socks5_connect_from(a_ip, m.a.socks5.unwrap(), "127.44.1.2", TARGET_PORT)
        .await
        .expect("tunnel accepted");
    assert_eq!(exchange(s, "hello app").await, "ok");
    let seen = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        seen.dst,
        SocketAddr::new("127.44.1.2".parse().unwrap(), TARGET_PORT)
    );
    assert_eq!(seen.identity, "spiffe://cluster.local/ns/default/sa/client");
    assert_eq!(seen.payload, "hello app");
    // The client as b's proxy saw it: the HBONE connection's peer, as ztunnel writes it (the
    // client pod in a cluster; here a's in-process proxy dials from loopback's default address).
    assert_eq!(
        seen.src.ip(),
        "127.0.0.1".parse::<IpAddr>().unwrap(),
        "{seen:?}"
    );
    assert_ne!(seen.src.port(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_localhost_delivery_or_proxy_protocol() {
    // LOCALHOST_APP_TUNNEL=false: to the pod's own address, still with the header.
    let m = mesh_with(3, "PROXY", 18091, false).await;
    let reader = tokio::spawn(read_one(
        TcpListener::bind(("127.44.3.2", 18091)).await.unwrap(),
    ));
    let a_ip: IpAddr = "127.44.3.1".parse().unwrap();
    let s = socks5_connect_from(a_ip, m.a.socks5.unwrap(), "127.44.3.2", TARGET_PORT)
        .await
        .expect("tunnel accepted");
    assert_eq!(exchange(s, "on the pod ip").await, "ok");
    let seen = reader.await.unwrap();
    assert_eq!(seen.dst.to_string(), format!("127.44.3.2:{TARGET_PORT}"));
    assert_eq!(seen.payload, "on the pod ip");
    // Protocol NONE: only the port changes; the bytes arrive as they are.
    let m = mesh_with(4, "NONE", 18092, true).await;
    let _app = Backend::start("127.44.4.2:18092", "plain").await;
    let a_ip: IpAddr = "127.44.4.1".parse().unwrap();
    let s = socks5_connect_from(a_ip, m.a.socks5.unwrap(), "127.44.4.2", TARGET_PORT)
        .await
        .expect("tunnel accepted");
    assert_eq!(exchange(s, "no header").await, "plain:no header");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_takes_the_header() {
    if !has_tool("haproxy") {
        assert!(
            std::env::var_os("L4MESH_REQUIRE_PRIVILEGED").is_none(),
            "haproxy is missing (apt-get install haproxy; scripts/test.sh installs it)"
        );
        eprintln!("haproxy_takes_the_header: skipped (no haproxy)");
        return;
    }
    let (port, echo_port) = (18089, 18090);
    let m = mesh(2, port).await;
    let _echo = Backend::start(&format!("127.0.0.1:{echo_port}"), "app").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            r#"global
  log stdout format raw local0 info
defaults
  mode tcp
  log global
  timeout connect 5s
  timeout client 10s
  timeout server 10s
frontend app
  bind 127.0.0.1:{port} accept-proxy
  log-format "pp client=%ci frontend=%fi:%fp"
  default_backend echo
backend echo
  server s1 127.0.0.1:{echo_port}
"#
        ),
    )
    .unwrap();
    // HAProxy says nothing when it starts: the first exchange below waits for it.
    let (child, out) = spawn_on_host(&["haproxy", "-db", "-f", cfg.to_str().unwrap()], &[], "");
    let log = HostProc { child, out };
    let a_ip: IpAddr = "127.44.2.1".parse().unwrap();
    let mut answer = None;
    for _ in 0..50 {
        if let Ok(s) =
            socks5_connect_from(a_ip, m.a.socks5.unwrap(), "127.44.2.2", TARGET_PORT).await
        {
            let got = exchange(s, "through haproxy").await;
            if !got.is_empty() {
                answer = Some(got);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        answer.as_deref(),
        Some("app:through haproxy"),
        "{}",
        log.out.all()
    );
    let line = log
        .out
        .wait_for(&["pp client=127.0.0.1", "frontend=127.44.2.2:18080"])
        .unwrap_or_else(|| panic!("HAProxy's view of the connection:\n{}", log.out.all()));
    assert!(line.contains("pp "), "{line}");
}
