//! Store benchmarks: applying a one-workload change to a store of 100 000 workloads and 10 000
//! services (persistent maps keep it independent of the store size), and loading 100 000
//! workloads from scratch (time and resident memory).
//!
//! Run: `cargo bench --bench store`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Instant;

use criterion::Criterion;
use l4mesh::model::{Service, Workload};
use l4mesh::proto::istio::workload as pw;
use l4mesh::store::{Batch, Store, Upsert};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn workload(i: u32) -> Workload {
    let svc = format!(
        "ns{}/svc{}.ns{}.svc.cluster.local",
        i % 100,
        i % 10_000,
        i % 100
    );
    let mut services = std::collections::HashMap::new();
    services.insert(
        svc,
        pw::PortList {
            ports: vec![pw::Port {
                service_port: 80,
                target_port: 8080,
                app_protocol: 0,
            }],
        },
    );
    let p = pw::Workload {
        uid: format!("cluster1//v1/Pod/ns{}/pod-{i}", i % 100),
        name: format!("pod-{i}"),
        namespace: format!("ns{}", i % 100),
        service_account: "default".into(),
        addresses: vec![(0x0a00_0000u32 + i).to_be_bytes().to_vec()],
        tunnel_protocol: 1,
        node: format!("node-{}", i % 50),
        services,
        ..Default::default()
    };
    Workload::try_from(p).expect("valid workload")
}

fn service(i: u32) -> Service {
    let p = pw::Service {
        name: format!("svc{i}"),
        namespace: format!("ns{}", i % 100),
        hostname: format!("svc{i}.ns{}.svc.cluster.local", i % 100),
        addresses: vec![pw::NetworkAddress {
            network: String::new(),
            address: (0xac10_0000u32 + i).to_be_bytes().to_vec(),
            length: None,
        }],
        ports: vec![pw::Port {
            service_port: 80,
            target_port: 8080,
            app_protocol: 0,
        }],
        ..Default::default()
    };
    Service::try_from(p).expect("valid service")
}

/// Bytes the allocator has handed out and not got back: what the program holds.
fn allocated() -> u64 {
    let _ = tikv_jemalloc_ctl::epoch::advance();
    tikv_jemalloc_ctl::stats::allocated::read().unwrap_or(0) as u64
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn full_batch() -> Batch {
    let mut upserts: Vec<Upsert> = (0..10_000).map(|i| Upsert::Service(service(i))).collect();
    upserts.extend((0..100_000).map(|i| Upsert::Workload(workload(i))));
    Batch {
        upserts,
        ..Default::default()
    }
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    // Load from scratch: time and memory held by the store.
    let batch = full_batch();
    let held_before = allocated();
    let before = rss_kib();
    let store = Store::new();
    let t = Instant::now();
    store.apply(batch);
    let took = t.elapsed();
    let after = rss_kib();
    let held = allocated().saturating_sub(held_before);
    println!(
        "store memory after that load (allocated, input batch freed): {:.1} MiB, {} bytes per resource",
        held as f64 / 1048576.0,
        held / 110_000
    );
    println!(
        "load 100k workloads + 10k services from scratch: {:.1} ms, RSS +{:.1} MiB (store, plus allocator pages kept from the freed input batch)",
        took.as_secs_f64() * 1e3,
        after.saturating_sub(before) as f64 / 1024.0
    );

    let mut c = Criterion::default().configure_from_args();
    let mut i = 0u32;
    c.bench_function(
        "apply one-workload change (100k workloads, 10k services)",
        |b| {
            b.iter(|| {
                i = i.wrapping_add(1);
                let mut w = workload(i % 100_000);
                w.addresses = vec![std::net::IpAddr::from([10, 200, (i >> 8) as u8, i as u8])];
                black_box(store.apply(Batch {
                    upserts: vec![Upsert::Workload(w)],
                    ..Default::default()
                }))
            })
        },
    );
    c.bench_function("snapshot load + workload lookup by address", |b| {
        let addr = l4mesh::model::NetworkAddr::new("", std::net::IpAddr::from([10, 0, 1, 1]));
        b.iter(|| {
            let snap = store.load();
            black_box(snap.workload_by_addr(&addr).map(|w| w.capacity))
        })
    });
    c.final_summary();
}
