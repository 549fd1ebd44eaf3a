//! Connections lost while the node proxy is upgraded, side by side: l4mesh with the hand-off
//! socket, l4mesh restarted without it, ztunnel restarted (it has no hand-off), and Envoy's hot
//! restart (`--restart-epoch`), all through the same iptables capture (`capture`), under the same
//! load: new connections at `BENCH_RATE` a second (default 500; each: connect, 64 B each way,
//! close) and 20 long-lived connections each echoing 4 KiB every 20 ms, for `BENCH_SECS`
//! (default 10) with the upgrade 2 s in.
//!
//! A restart is what a DaemonSet roll does without a hand-off: SIGTERM to the old process (which
//! closes its listeners and drains for the default 5 s, then closes what is left), then the new
//! process once the old one exited. The hand-off starts the new process beside the old one.
//!
//! Run (root: it builds a network namespace): `cargo bench --bench upgrade`.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

mod capture;
mod common;
#[path = "../tests/integration/cluster/control_plane.rs"]
mod control_plane;
#[path = "../tests/integration/netns.rs"]
mod netns;
mod pod_paths;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use capture::{Capture, Proxy, Running, ECHO_PORT, TCP_DST};
use control_plane::enter_netns;

const STREAMS: usize = 20;

#[derive(Clone, Copy)]
enum Variant {
    L4meshHandoff,
    L4meshRestart,
    ZtunnelRestart,
    EnvoyHotRestart,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::L4meshHandoff => "l4mesh, hand-off",
            Variant::L4meshRestart => "l4mesh, restart",
            Variant::ZtunnelRestart => "ztunnel, restart",
            Variant::EnvoyHotRestart => "Envoy, hot restart",
        }
    }

    fn proxy(self) -> Proxy {
        match self {
            Variant::L4meshHandoff | Variant::L4meshRestart => Proxy::L4mesh,
            Variant::ZtunnelRestart => Proxy::Ztunnel,
            Variant::EnvoyHotRestart => Proxy::Envoy,
        }
    }
}

/// What a run saw.
struct Outcome {
    tried: u64,
    failed: u64,
    /// From the first failed new connection to the last one.
    window: Duration,
    kept: usize,
    /// From the start of the upgrade until the new process serves alone (hand-off, hot restart:
    /// the old one let go; restart: the new one is ready).
    took: Duration,
}

/// The load: paced short connections and long-lived echo streams, in the namespace.
struct Load {
    stop: Arc<AtomicBool>,
    tried: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<Instant>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
    streams: Vec<std::thread::JoinHandle<bool>>,
}

impl Load {
    fn start(ns: &str, rate: u64) -> Load {
        let dst: SocketAddr = format!("{TCP_DST}:{ECHO_PORT}").parse().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let tried = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let streams = (0..STREAMS)
            .map(|i| {
                let (ns, stop) = (ns.to_owned(), stop.clone());
                std::thread::spawn(move || {
                    enter_netns(&ns).unwrap();
                    stream(dst, i as u8, &stop)
                })
            })
            .collect();
        // Four pacers, each a quarter of the rate, each connection on its own thread so that a
        // slow one does not hold the pace.
        let threads = (0..4)
            .map(|_| {
                let (ns, stop, tried, failures) =
                    (ns.to_owned(), stop.clone(), tried.clone(), failures.clone());
                std::thread::spawn(move || {
                    enter_netns(&ns).unwrap();
                    let every = Duration::from_secs_f64(4.0 / rate as f64);
                    let mut next = Instant::now();
                    let mut inflight = Vec::new();
                    while !stop.load(Relaxed) {
                        next += every;
                        if let Some(d) = next.checked_duration_since(Instant::now()) {
                            std::thread::sleep(d);
                        }
                        tried.fetch_add(1, Relaxed);
                        let failures = failures.clone();
                        let ns = ns.clone();
                        inflight.push(std::thread::spawn(move || {
                            enter_netns(&ns).unwrap();
                            if !short(dst) {
                                failures.lock().unwrap().push(Instant::now());
                            }
                        }));
                        inflight.retain(|t: &std::thread::JoinHandle<()>| !t.is_finished());
                    }
                    for t in inflight {
                        let _ = t.join();
                    }
                })
            })
            .collect();
        Load {
            stop,
            tried,
            failures,
            threads,
            streams,
        }
    }

    fn finish(self) -> (u64, u64, Duration, usize) {
        self.stop.store(true, Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let kept = self
            .streams
            .into_iter()
            .map(|t| t.join().unwrap())
            .filter(|ok| *ok)
            .count();
        let f = self.failures.lock().unwrap();
        let window = match (f.iter().min(), f.iter().max()) {
            (Some(a), Some(b)) => *b - *a,
            _ => Duration::ZERO,
        };
        (self.tried.load(Relaxed), f.len() as u64, window, kept)
    }
}

/// One short connection: 64 bytes out, the same back.
fn short(dst: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    s.write_all(&msg).is_ok() && s.read_exact(&mut back).is_ok() && back == msg
}

/// A long-lived connection echoing 4 KiB every 20 ms until `stop`: whether every byte came back.
fn stream(dst: SocketAddr, id: u8, stop: &AtomicBool) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&dst, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut sent = 0u64;
    let (mut out, mut back) = (vec![0u8; 4096], vec![0u8; 4096]);
    while !stop.load(Relaxed) {
        for (i, b) in out.iter_mut().enumerate() {
            *b = ((sent + i as u64) % 251) as u8 ^ id;
        }
        if s.write_all(&out).is_err() || s.read_exact(&mut back).is_err() || back != out {
            return false;
        }
        sent += out.len() as u64;
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Polls `GET path` on the admin port (15000) in the namespace until the body contains `needle`
/// (at most 30 s).
fn until(ns: &str, path: &'static str, needle: &'static str) {
    let seen = pod_paths::in_ns(ns, move || {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if capture::http_get("127.0.0.1:15000", path).is_some_and(|b| b.contains(needle)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    });
    assert!(seen, "GET {path} never showed {needle}");
}

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status();
}

/// Waits up to `limit` for `r` to exit.
fn exited(r: &mut Running, limit: Duration) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if matches!(r.child.try_wait(), Ok(Some(_))) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn run(cap: &Capture, v: Variant, secs: f64, rate: u64) -> Outcome {
    let handoff = cap.dir.path().join("handoff.sock");
    let handoff = handoff.to_str().unwrap();
    let env: &[(&str, &str)] = match v {
        Variant::L4meshHandoff => &[("L4MESH_HANDOFF_SOCKET", handoff)],
        _ => &[],
    };
    let envoy_epoch = |n: &'static str| -> Vec<&'static str> {
        vec![
            "--restart-epoch",
            n,
            "--base-id",
            "77",
            "--drain-time-s",
            "5",
            "--parent-shutdown-time-s",
            "600",
        ]
    };
    let args = match v {
        Variant::EnvoyHotRestart => envoy_epoch("0"),
        _ => vec![],
    };
    let mut old = cap.start(v.proxy(), env, &args);
    // Warm: certificates, pools.
    let mut s = cap.connect(TCP_DST, ECHO_PORT);
    s.write_all(b"x").unwrap();
    s.read_exact(&mut [0u8]).unwrap();
    drop(s);
    let load = Load::start(&cap.ns.name, rate);
    std::thread::sleep(Duration::from_secs(2));
    let t0 = Instant::now();
    let new = match v {
        Variant::L4meshHandoff => {
            let new = cap.start(Proxy::L4mesh, env, &[]);
            // The old process answers readiness until the new one took over: that is seen on
            // the new one's admin API.
            until(&cap.ns.name, "/upgrade", "\"draining\": true");
            new
        }
        Variant::EnvoyHotRestart => {
            let new = cap.start(Proxy::Envoy, &[], &envoy_epoch("1"));
            until(&cap.ns.name, "/server_info", "\"restart_epoch\": 1");
            new
        }
        Variant::L4meshRestart | Variant::ZtunnelRestart => {
            signal(old.pid, "TERM");
            assert!(
                exited(&mut old, Duration::from_secs(30)),
                "{} did not exit",
                v.name()
            );
            cap.start(v.proxy(), env, &[])
        }
    };
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_secs_f64((secs - 2.0).max(3.0)));
    let (tried, failed, window, kept) = load.finish();
    drop(new);
    drop(old);
    // Let the kernel forget the sockets before the next variant binds.
    std::thread::sleep(Duration::from_millis(500));
    Outcome {
        tried,
        failed,
        window,
        kept,
        took,
    }
}

fn main() {
    let Some(secs) = common::bench_secs(10.0) else {
        return;
    };
    if !netns::privileged("upgrade bench", &["taskset"]) {
        return;
    }
    let rate: u64 = std::env::var("BENCH_RATE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(500);
    common::pin_self(0);
    let cap = Capture::new("upg");
    // Reported in the order of docs/performance.md's tables: l4mesh's two ways first.
    let mut variants: Vec<Variant> = capture::proxies()
        .into_iter()
        .flat_map(|p| match p {
            Proxy::L4mesh => vec![Variant::L4meshHandoff, Variant::L4meshRestart],
            Proxy::Ztunnel => vec![Variant::ZtunnelRestart],
            Proxy::Envoy => vec![Variant::EnvoyHotRestart],
        })
        .collect();
    variants.sort_by_key(|v| *v as u8);
    println!(
        "upgrade under load through iptables capture: {rate} new connections/s and {STREAMS} long-lived echo streams for {secs} s, upgrade 2 s in"
    );
    println!(
        "{:<20}{:>10}{:>10}{:>14}{:>17}{:>16}",
        "variant", "new conns", "failed", "failing (ms)", "long-lived kept", "took over (ms)"
    );
    for v in variants {
        let o = run(&cap, v, secs, rate);
        println!(
            "{:<20}{:>10}{:>10}{:>14}{:>17}{:>16}",
            v.name(),
            o.tried,
            o.failed,
            o.window.as_millis(),
            format!("{}/{STREAMS}", o.kept),
            o.took.as_millis()
        );
    }
}
