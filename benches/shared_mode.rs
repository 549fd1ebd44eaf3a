//! Shared mode against dedicated mode on the same simulated cluster (tests/integration/cluster),
//! side by side in one run: node 1 holds N pods (BENCH_PODS, default 100) plus a client pod `a`,
//! node 2 a server pod `b`. First every node runs one shared l4mesh fed by `l4mesh node-agent`;
//! then the same pods each run a dedicated l4mesh.
//!
//! Figures: the l4mesh memory of node 1 (RSS of its one shared process, or the sum of its N+1
//! dedicated ones) and per pod; the time a pod takes to be served (shared: from the agent's `add`
//! to its ack, which l4mesh sends once the pod's listeners are bound; dedicated: from process
//! start to a ready answer on 15021, polled every 100 ms, so it is coarse), p50/p99; pod → pod
//! throughput (one stream, 256 KiB writes) and request/response latency (1 KiB ping-pong, p50/p99)
//! from `a` to `b` over HBONE. Proxies have one worker thread and are pinned to core 1, the
//! bench's threads to core 0.
//!
//! Run (root): `cargo bench --bench shared_mode` (env BENCH_SECS, default 4; BENCH_PODS).
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

mod common;
#[path = "../tests/integration/cluster/control_plane.rs"]
mod control_plane;
#[path = "../tests/integration/netns.rs"]
mod netns;
mod pod_paths;
#[path = "../tests/integration/cluster/shared_node.rs"]
mod shared_node;
#[path = "../tests/integration/cluster/topology.rs"]
mod topology;

use std::time::Duration;

use common::rss_kib;
use pod_paths::{latency, pin, servers, throughput};
use topology::{Cluster, PodSpec};

const A: &str = "10.240.1.10";
const B: &str = "10.240.2.10";

fn fill_name(i: usize) -> &'static str {
    Box::leak(format!("p{i}").into_boxed_str())
}

fn state(n: usize) -> String {
    let wl = |name: &str, sa: &str, ip: &str, node: u8| {
        format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {sa}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: node-{node}\n"
        )
    };
    let mut s = String::from("workloads:\n");
    s += &wl("a", "client", A, 1);
    s += &wl("b", "server", B, 2);
    for i in 0..n {
        s += &wl(
            fill_name(i),
            &format!("sa{}", i % 10),
            &format!("10.240.1.{}", 100 + i),
            1,
        );
    }
    s
}

fn pods(n: usize) -> Vec<PodSpec> {
    let sas: [&'static str; 10] = [
        "sa0", "sa1", "sa2", "sa3", "sa4", "sa5", "sa6", "sa7", "sa8", "sa9",
    ];
    let mut v = vec![
        PodSpec::new("a", 1, 10, "client", true),
        PodSpec::new("b", 2, 10, "server", true),
    ];
    for i in 0..n {
        v.push(PodSpec::new(
            fill_name(i),
            1,
            (100 + i) as u8,
            sas[i % 10],
            true,
        ));
    }
    v
}

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort_unstable();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize)
        .copied()
        .unwrap_or_default()
}

/// What one mode measured.
struct Figures {
    rss_kib: u64,
    served: Vec<Duration>,
    gbps: f64,
    p50: Duration,
    p99: Duration,
}

fn measure(c: &Cluster, secs: f64, pids: &[u32], served: Vec<Duration>) -> Figures {
    for pid in pids {
        pin(*pid, "1");
    }
    // Let startup's transient allocations go back (jemalloc purges within a second or two).
    std::thread::sleep(Duration::from_secs(3));
    let rss_kib = pids.iter().map(|p| rss_kib(*p)).sum();
    let count = servers(&c.pod("b").ns.name, B);
    let a = c.pod("a").ns.name.clone();
    let gbps = throughput(&a, B, secs, &count);
    let (p50, p99) = latency(&a, B);
    Figures {
        rss_kib,
        served,
        gbps,
        p50,
        p99,
    }
}

fn main() {
    let Some(secs) = common::bench_secs(4.0) else {
        return;
    };
    if !netns::privileged("shared_mode bench", &[]) {
        return;
    }
    let n: usize = std::env::var("BENCH_PODS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
        .min(150);
    pin(std::process::id(), "0");
    let env = [
        ("ZTUNNEL_WORKER_THREADS", "1"),
        ("RUST_LOG", "warn,l4mesh::app=info,l4mesh::inpod=info"),
    ];

    let shared = {
        // BENCH_SHARED_NODES: which nodes run shared (default both; node 1 always, for its figures).
        let nodes: Vec<u8> = std::env::var("BENCH_SHARED_NODES")
            .unwrap_or_else(|_| "1,2".into())
            .split(',')
            .filter_map(|n| n.trim().parse().ok())
            .collect();
        let c = Cluster::start_mixed("sm", 2, &pods(n), &state(n), &env, &nodes);
        let node1 = &c.shared[&1];
        let served: Vec<Duration> = node1
            .agent_log()
            .lines()
            .filter(|l| l.contains("pod announced"))
            .filter_map(|l| {
                l.split("ack_us=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse()
                    .ok()
            })
            .map(Duration::from_micros)
            .collect();
        assert_eq!(
            served.len(),
            n + 1,
            "every pod of node 1 announced:\n{}",
            c.logs()
        );
        let node2 = match c.shared.get(&2) {
            Some(n) => n.l4mesh_pid(),
            None => c.pod("b").l4mesh_pid(),
        };
        pin(node2.unwrap(), "1");
        measure(&c, secs, &[node1.l4mesh_pid().unwrap()], served)
    };
    let dedicated = {
        let c = Cluster::start("dm", 2, &pods(n), &state(n), &env);
        let node1: Vec<&topology::Pod> = c.pods.values().filter(|p| p.spec.node == 1).collect();
        let served = node1.iter().filter_map(|p| p.ready_after).collect();
        pin(c.pod("b").l4mesh_pid().unwrap(), "1");
        let pids: Vec<u32> = node1.iter().filter_map(|p| p.l4mesh_pid()).collect();
        measure(&c, secs, &pids, served)
    };

    let pods_node1 = (n + 1) as f64;
    println!(
        "{} pods on node 1 ({n} + the client), {secs} s per throughput figure",
        n + 1
    );
    println!(
        "{:<10} {:>14} {:>12} {:>12} {:>12} {:>12} {:>10} {:>10}",
        "mode",
        "node-1 RSS",
        "RSS/pod",
        "served p50",
        "served p99",
        "throughput",
        "rr p50",
        "rr p99"
    );
    for (label, mut f) in [("shared", shared), ("dedicated", dedicated)] {
        let (s50, s99) = (
            percentile(&mut f.served, 0.5),
            percentile(&mut f.served, 0.99),
        );
        println!(
            "{label:<10} {:>10.1} MiB {:>8.1} KiB {:>9.2} ms {:>9.2} ms {:>6.2} Gbit/s {:>7.1} µs {:>7.1} µs",
            f.rss_kib as f64 / 1024.0,
            f.rss_kib as f64 / pods_node1,
            s50.as_secs_f64() * 1e3,
            s99.as_secs_f64() * 1e3,
            f.gbps,
            f.p50.as_secs_f64() * 1e6,
            f.p99.as_secs_f64() * 1e6
        );
    }
}
