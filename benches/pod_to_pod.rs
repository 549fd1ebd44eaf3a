//! Pod → pod across two nodes of the simulated cluster (tests/integration/cluster), side by side in
//! one run: two plain pods (no mesh: veth → node bridge → node routing → fabric bridge → node → veth)
//! and two mesh pods on the same nodes, where the client's connection is captured by its pod's
//! l4mesh and carried over HBONE (mutual TLS, HTTP/2 CONNECT) to the server pod's l4mesh, which
//! connects to the server from the client's IP (ENABLE_ORIG_SRC). l4mesh is the release binary with
//! one worker thread; both l4mesh processes are pinned to core 1, the bench's client and server
//! threads to core 0.
//!
//! Figures: single-stream throughput (256 KiB writes into a sink) and request/response latency
//! (2 000 ping-pongs of 1 KiB on one connection, p50/p99).
//!
//! Run (root: it builds network namespaces): `cargo bench --bench pod_to_pod` (env BENCH_SECS,
//! default 4). Not root: it says so and exits.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

// The cluster harness of the integration tests, reused as is (`topology` finds `netns` and
// `control_plane` as siblings, as under tests/integration/cluster.rs).
mod common;
#[path = "../tests/integration/cluster/control_plane.rs"]
mod control_plane;
#[path = "../tests/integration/netns.rs"]
mod netns;
#[path = "../tests/integration/cluster/shared_node.rs"]
mod shared_node;
#[path = "../tests/integration/cluster/topology.rs"]
mod topology;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control_plane::enter_netns;
use topology::{Cluster, PodSpec};

const SINK_PORT: u16 = 19000;
const ECHO_PORT: u16 = 19001;
const CHUNK: usize = 256 * 1024;

fn state() -> String {
    let mut s = String::from("workloads:\n");
    for (name, sa, ip, node) in [
        ("a", "client", "10.240.1.10", 1),
        ("b", "server", "10.240.2.10", 2),
    ] {
        s += &format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node-{node}\n"
        );
    }
    s
}

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("a", 1, 10, "client", true),
        PodSpec::new("b", 2, 10, "server", true),
        PodSpec::new("da", 1, 20, "plain", false),
        PodSpec::new("db", 2, 20, "plain", false),
    ]
}

/// Runs `f` on a thread inside the network namespace `ns`.
fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        enter_netns(&ns).expect("setns");
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

/// A sink (counting bytes) and an echo server on the server pod's address, in its namespace.
fn servers(ns: &str, ip: &str) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let (c, ip) = (count.clone(), ip.to_owned());
    let (sink, echo) = in_ns(ns, move || {
        (
            TcpListener::bind(format!("{ip}:{SINK_PORT}")).unwrap(),
            TcpListener::bind(format!("{ip}:{ECHO_PORT}")).unwrap(),
        )
    });
    common::serve_sink(sink, c, CHUNK);
    std::thread::spawn(move || {
        for s in echo.incoming() {
            let Ok(mut s) = s else { return };
            let _ = s.set_nodelay(true);
            std::thread::spawn(move || {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    count
}

/// A connection from the client pod `ns` to `ip:port` (its socket lives in that namespace).
fn connect(ns: &str, ip: &str, port: u16) -> TcpStream {
    let addr = format!("{ip}:{port}");
    let s = in_ns(ns, move || TcpStream::connect(addr).unwrap());
    s.set_nodelay(true).unwrap();
    s
}

fn throughput(ns: &str, ip: &str, secs: f64, count: &AtomicU64) -> f64 {
    let mut s = connect(ns, ip, SINK_PORT);
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let h = std::thread::spawn(move || {
        let buf = vec![7u8; CHUNK];
        while !st.load(Ordering::Relaxed) {
            if s.write_all(&buf).is_err() {
                break;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let b0 = count.load(Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let bytes = count.load(Ordering::Relaxed) - b0;
    let el = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let _ = h.join();
    bytes as f64 * 8.0 / el / 1e9
}

fn latency(ns: &str, ip: &str) -> (Duration, Duration) {
    common::ping_pong(&mut connect(ns, ip, ECHO_PORT))
}

fn pin(pid: u32, core: &str) {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", core, &pid.to_string()])
        .stdout(Stdio::null())
        .status();
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    if !netns::privileged("pod_to_pod bench", &[]) {
        return;
    }
    let secs: f64 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4.0);
    pin(std::process::id(), "0");
    let c = Cluster::start(
        "pb",
        2,
        &pods(),
        &state(),
        &[("ZTUNNEL_WORKER_THREADS", "1")],
    );
    for p in ["a", "b"] {
        pin(c.pod(p).l4mesh_pid().expect("l4mesh running"), "1");
    }
    let ns = |p: &str| c.pod(p).ns.name.clone();
    let direct_count = servers(&ns("db"), "10.240.2.20");
    let mesh_count = servers(&ns("b"), "10.240.2.10");

    println!("pod → pod across two nodes, {secs} s per throughput figure");
    println!(
        "{:<22} {:>12} {:>12} {:>12}",
        "path", "1 stream", "p50 (1 KiB)", "p99"
    );
    for (label, client, ip, count) in [
        (
            "direct veth (no mesh)",
            ns("da"),
            "10.240.2.20",
            &direct_count,
        ),
        ("l4mesh HBONE", ns("a"), "10.240.2.10", &mesh_count),
    ] {
        let gbps = throughput(&client, ip, secs, count);
        let (p50, p99) = latency(&client, ip);
        println!(
            "{label:<22} {:>7.2} Gbit/s {:>9.1} µs {:>9.1} µs",
            gbps,
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6
        );
    }
    // The mesh path really went through both proxies, over HBONE.
    assert!(
        c.pod("a")
            .wait_log(&["access", "outbound", "10.240.2.10:19000"])
            .is_some()
            && c.pod("b")
                .wait_log(&["access", "inbound_hbone", "10.240.2.10:19001"])
                .is_some(),
        "the mesh path did not go through l4mesh:\n{}",
        c.logs()
    );
}
