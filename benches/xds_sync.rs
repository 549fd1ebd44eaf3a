//! xDS benchmarks against the real xds-testserver:
//! 1. initial sync of 100 000 workloads + 10 000 services into a separate l4mesh process (release
//!    binary): wall time from process start to ready, bytes of the responses, RSS once synced;
//! 2. change latency: a one-workload edit written to the testserver until the new snapshot is live
//!    in l4mesh (in-process, so the store's version notification marks the moment), with the same
//!    100k-workload state loaded.
//!
//! Run: `cargo bench --bench xds_sync` (env XDS_BENCH_WORKLOADS to change the size).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::rss_kib;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use l4mesh::config::{Config, Source, XdsSettings};
use xds_testserver::{Handle, StateSource};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn allocated() -> u64 {
    let _ = tikv_jemalloc_ctl::epoch::advance();
    tikv_jemalloc_ctl::stats::allocated::read().unwrap_or(0) as u64
}

fn state(workloads: u32, services: u32) -> String {
    let mut y = String::with_capacity(workloads as usize * 300);
    y.push_str("workloads:\n");
    for i in 0..workloads {
        let ns = i % 100;
        let svc = i % services;
        let ip = 0x0a00_0000u32 + i;
        let _ = write!(
            y,
            "- uid: cluster1//v1/Pod/ns{ns}/pod-{i}\n  name: pod-{i}\n  namespace: ns{ns}\n  serviceAccount: sa{ns}\n  workloadIps: [\"{}.{}.{}.{}\"]\n  protocol: HBONE\n  node: node-{}\n  services:\n    \"ns{}/svc{svc}.ns{}.svc.cluster.local\": {{ 80: 8080 }}\n",
            ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255, i % 50, svc % 100, svc % 100
        );
    }
    y.push_str("services:\n");
    for s in 0..services {
        let ip = 0xac10_0000u32 + s;
        let _ = write!(
            y,
            "- name: svc{s}\n  namespace: ns{}\n  hostname: svc{s}.ns{}.svc.cluster.local\n  vips: [\"/{}.{}.{}.{}\"]\n  ports: {{ 80: 8080 }}\n",
            s % 100, s % 100, ip >> 24, (ip >> 16) & 255, (ip >> 8) & 255, ip & 255
        );
    }
    y
}

fn ready(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n: u32 = std::env::var("XDS_BENCH_WORKLOADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let services = (n / 10).max(1);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let yaml = state(n, services);
    let t = Instant::now();
    let ts = rt
        .block_on(Handle::start(xds_testserver::Config::new(
            StateSource::Yaml(yaml),
        )))
        .unwrap();
    println!(
        "testserver loaded {n} workloads + {services} services in {:.2?}",
        t.elapsed()
    );
    let url = format!("http://{}", ts.addr());

    // 1. A separate l4mesh process syncing from scratch.
    let readiness = "127.0.0.1:27021";
    let t = Instant::now();
    let mut child = Command::new("taskset")
        .args(["-c", "1", env!("CARGO_BIN_EXE_l4mesh")])
        .env("XDS_ADDRESS", &url)
        .env("RUST_LOG", "info")
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("L4MESH_OUTBOUND_ADDR", "127.0.0.1:27001")
        .env("L4MESH_INBOUND_PLAINTEXT_ADDR", "127.0.0.1:27006")
        .env("L4MESH_METRICS_ADDR", "127.0.0.1:27020")
        .env("L4MESH_ADMIN_ADDR", "127.0.0.1:27000")
        .env("L4MESH_SOCKS5_ADDR", "127.0.0.1:27080")
        .env("L4MESH_READINESS_ADDR", readiness)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start l4mesh");
    let stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut bytes = 0u64;
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("first xDS response applied") {
                if let Some(b) = line
                    .split("bytes=")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                {
                    bytes += b
                        .trim_matches(|c: char| !c.is_ascii_digit())
                        .parse::<u64>()
                        .unwrap_or(0);
                }
            }
        }
        bytes
    });
    while !ready(readiness) {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "l4mesh never became ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let rss = rss_kib(child.id());
    std::thread::sleep(Duration::from_secs(12));
    let rss_settled = rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let bytes = log.join().unwrap_or(0);
    println!(
        "initial sync of {n} workloads + {services} services: {:.0} ms to ready, {:.1} MiB of responses, l4mesh RSS {:.1} MiB 1 s after ready, {:.1} MiB 13 s after",
        sync.as_secs_f64() * 1e3,
        bytes as f64 / 1048576.0,
        rss as f64 / 1024.0,
        rss_settled as f64 / 1024.0
    );

    // 2. Change latency, in-process.
    rt.block_on(async {
        let mut config = Config::local("127.0.0.1".parse().unwrap());
        config.source = Source::Xds(XdsSettings::plaintext(&url));
        config.readiness_addr = None;
        let before = allocated();
        let running = l4mesh::app::start(&config).await.unwrap();
        tokio::time::timeout(Duration::from_secs(120), running.readiness.wait())
            .await
            .expect("in-process l4mesh never became ready");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let held = allocated().saturating_sub(before);
        let (w, s, _) = running.store.load().counts();
        println!(
            "in-process l4mesh after sync holds {:.1} MiB (allocated), {} bytes per resource",
            held as f64 / 1048576.0,
            held / (w + s).max(1) as u64
        );
        let mut rx = running.store.subscribe();
        let mut lat = Vec::new();
        for i in 0..200u32 {
            rx.borrow_and_update();
            let yaml = format!(
                "workloads:\n- uid: cluster1//v1/Pod/ns0/pod-0\n  name: pod-0\n  namespace: ns0\n  serviceAccount: sa0\n  workloadIps: [\"10.250.{}.{}\"]\n  protocol: HBONE\n",
                i >> 8,
                i & 255
            );
            let t = Instant::now();
            ts.upsert_yaml(&yaml).unwrap();
            tokio::time::timeout(Duration::from_secs(10), rx.changed())
                .await
                .expect("change never applied")
                .unwrap();
            lat.push(t.elapsed());
        }
        println!(
            "change latency (testserver write → snapshot live), {n} workloads held, 200 changes: p50 {:.2?}, p99 {:.2?}, max {:.2?}",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99),
            percentile(&mut lat, 1.0)
        );
    });
}
