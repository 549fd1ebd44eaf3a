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
mod pod_paths;
#[path = "../tests/integration/cluster/shared_node.rs"]
mod shared_node;
#[path = "../tests/integration/cluster/topology.rs"]
mod topology;

use pod_paths::{latency, pin, servers, throughput};
use topology::{Cluster, PodSpec};

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

fn main() {
    let Some(secs) = common::bench_secs(4.0) else {
        return;
    };
    if !netns::privileged("pod_to_pod bench", &[]) {
        return;
    }
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
