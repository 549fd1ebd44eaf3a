//! RBAC decision time with 1, 100 and 10 000 policies in scope (criterion). Every policy applies to
//! the destination (namespace scope) and none matches, so each decision walks all of them: the
//! worst case for a given count. One ALLOW policy that matches makes the verdict "allow".
//!
//! A second group re-checks 10 000 established connections against 1 000 policies, what one
//! policy update costs the connection tracker (it runs on the operators' runtime, off the data
//! plane, yielding every `YIELD_EVERY` connections: the longest it holds that thread is the total
//! divided by 10 000 / `YIELD_EVERY`).
//!
//! Run: `cargo bench --bench rbac`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion};
use l4mesh::model::{Authorization, Workload};
use l4mesh::proto::istio::security as psec;
use l4mesh::proto::istio::workload as pw;
use l4mesh::rbac::{evaluate, ConnCtx};
use l4mesh::store::{Batch, Store, Upsert};

fn policy(i: usize, action: i32, port: u32) -> Authorization {
    Authorization::try_from(psec::Authorization {
        name: format!("p{i}"),
        namespace: "default".into(),
        scope: 1,
        action,
        rules: vec![psec::Rule {
            clauses: vec![psec::Clause {
                matches: vec![psec::Match {
                    principals: vec![psec::StringMatch {
                        match_type: Some(psec::string_match::MatchType::Prefix(format!(
                            "cluster.local/ns/other-{i}/"
                        ))),
                    }],
                    destination_ports: vec![port],
                    ..Default::default()
                }],
            }],
        }],
        ..Default::default()
    })
    .unwrap()
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let dst = Workload::try_from(pw::Workload {
        uid: "c//v1/Pod/default/server".into(),
        name: "server".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 2]],
        ..Default::default()
    })
    .unwrap();
    let conn = ConnCtx {
        peer: Some(
            "spiffe://cluster.local/ns/default/sa/client"
                .parse()
                .unwrap(),
        ),
        src_ip: "10.0.0.1".parse().unwrap(),
        dst_ip: "10.0.0.2".parse().unwrap(),
        dst_port: 8080,
    };
    let mut c = Criterion::default().configure_from_args();
    let mut group = c.benchmark_group("rbac decision");
    for n in [1usize, 100, 10_000] {
        let store = Store::new();
        // n - 1 DENY policies that do not match, one ALLOW that does not match either.
        let mut upserts: Vec<Upsert> = (0..n.saturating_sub(1))
            .map(|i| Upsert::Policy(policy(i, 1, 9999)))
            .collect();
        upserts.push(Upsert::Policy(policy(n, 0, 9999)));
        upserts.push(Upsert::Workload(dst.clone()));
        store.apply(Batch {
            upserts,
            ..Default::default()
        });
        let snap = store.load();
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| black_box(evaluate(&snap, &dst, black_box(&conn))))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("policy re-check");
    group.sample_size(10);
    let store = Store::new();
    // 1 000 DENY policies that do not match and no ALLOW: every connection stays allowed after
    // walking all of them, so each iteration re-checks all 10 000.
    let mut upserts: Vec<Upsert> = (0..1000)
        .map(|i| Upsert::Policy(policy(i, 1, 9999)))
        .collect();
    upserts.push(Upsert::Workload(dst.clone()));
    store.apply(Batch {
        upserts,
        ..Default::default()
    });
    let tracker = std::sync::Arc::new(l4mesh::proxy::ConnTracker::default());
    let regs: Vec<_> = (0..10_000u16)
        .map(|i| {
            let mut c = conn.clone();
            c.dst_port = 8080 + (i % 100);
            tracker.register(
                c,
                dst.uid.clone(),
                l4mesh::proxy::conn_tracker::Via::Plaintext,
            )
        })
        .collect();
    assert_eq!(
        tracker.recheck(&store),
        0,
        "nothing is revoked: every iteration re-checks all"
    );
    group.bench_function("10000 connections x 1000 policies", |b| {
        b.iter(|| black_box(tracker.recheck(&store)))
    });
    group.finish();
    drop(regs);
    c.final_summary();
}
