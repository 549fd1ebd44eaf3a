//! Store behaviour: upserts replace, removals clean every index, order of arrival does not matter,
//! old snapshots stay intact, and the policy lookup returns exactly the applicable policies.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::*;
use crate::model::{
    Action, Authorization, LoadBalancing, Locality, Match, NetworkAddr, PolicyKey, PolicyScope,
    PortMap, Service, ServiceKey, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
    WorkloadUid,
};

// ---------------------------------------------------------------------------------------------
// Builders
// ---------------------------------------------------------------------------------------------

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn addr(s: &str) -> NetworkAddr {
    NetworkAddr::new("", ip(s))
}

fn uid(s: &str) -> WorkloadUid {
    WorkloadUid(s.into())
}

fn skey(s: &str) -> ServiceKey {
    ServiceKey::parse(s).unwrap()
}

fn pkey(s: &str) -> PolicyKey {
    PolicyKey(s.into())
}

/// A workload `uid` in `namespace` with these IPs (default network), member of these services with
/// the port map 80 → 8080.
fn workload(uid_: &str, namespace: &str, ips: &[&str], services: &[&str]) -> Workload {
    Workload {
        uid: uid(uid_),
        name: uid_.rsplit('/').next().unwrap_or(uid_).to_owned(),
        namespace: namespace.into(),
        service_account: "default".into(),
        trust_domain: "cluster.local".into(),
        addresses: ips.iter().map(|s| ip(s)).collect(),
        hostname: String::new(),
        network: "".into(),
        protocol: TunnelProtocol::Hbone,
        waypoint: None,
        network_gateway: None,
        node: "node-a".into(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        workload_type: WorkloadType::Pod,
        workload_name: String::new(),
        native_tunnel: false,
        application_tunnel: None,
        services: services
            .iter()
            .map(|k| (skey(k), PortMap::from([(80, 8080)])))
            .collect(),
        authorization_policies: Vec::new(),
        status: WorkloadStatus::Healthy,
        cluster_id: "cluster1".into(),
        locality: Locality::default(),
        host_network: false,
        capacity: 1,
    }
}

/// A service `namespace/hostname` with these VIPs on the default network, port 80 → 8080.
fn service(namespace: &str, hostname: &str, vips: &[&str]) -> Service {
    Service {
        name: hostname.split('.').next().unwrap_or(hostname).to_owned(),
        namespace: namespace.into(),
        hostname: hostname.into(),
        vips: vips.iter().map(|s| addr(s)).collect(),
        ports: BTreeMap::from([(80, 8080)]),
        subject_alt_names: Vec::new(),
        waypoint: None,
        load_balancing: LoadBalancing::default(),
        ip_families: crate::model::IpFamilies::Automatic,
        canonical: false,
        visibility: Default::default(),
        cidr_vips: Vec::new(),
        weighted_waypoints: Vec::new(),
    }
}

fn policy(namespace: &str, name: &str, scope: PolicyScope) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: namespace.into(),
        scope,
        action: Action::Deny,
        rules: vec![vec![vec![Match {
            destination_ports: vec![9999],
            ..Default::default()
        }]]],
        dry_run: false,
    }
}

fn upserts(us: Vec<Upsert>) -> Batch {
    Batch {
        upserts: us,
        ..Default::default()
    }
}

fn removals(rs: Vec<Removal>) -> Batch {
    Batch {
        removals: rs,
        ..Default::default()
    }
}

fn remove_addr(name: &str) -> Removal {
    Removal::Address(name.into())
}

/// The uids of a service's endpoints, sorted.
fn endpoint_uids(snap: &Snapshot, key: &str) -> Vec<String> {
    let mut v: Vec<String> = snap
        .endpoints(&skey(key))
        .map(|(w, ep)| {
            assert_eq!(w.uid, ep.workload, "endpoint joined to the wrong workload");
            w.uid.to_string()
        })
        .collect();
    v.sort();
    v
}

/// The keys of the policies that apply to `w`, in lookup order.
fn policy_keys(snap: &Snapshot, w: &Workload) -> Vec<String> {
    snap.policies_for(w).map(|p| p.key().to_string()).collect()
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

const ECHO: &str = "default/echo.default.svc.cluster.local";
const ECHO_HOST: &str = "echo.default.svc.cluster.local";

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

#[test]
fn empty_store_starts_at_version_zero() {
    let store = Store::new();
    let snap = store.load();
    assert_eq!(snap.version(), 0);
    assert_eq!(snap.counts(), (0, 0, 0));
    assert!(snap.workload_by_addr(&addr("10.0.0.1")).is_none());
    assert_eq!(*store.subscribe().borrow(), 0);
    assert!(Batch::default().is_empty());
    assert!(!Batch {
        replace_all: true,
        ..Default::default()
    }
    .is_empty());
}

#[test]
fn upsert_replaces_workload_with_same_uid() {
    let store = Store::new();
    let s = store.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.1"],
        &[],
    ))]));
    assert_eq!(s.upserted, 1);
    assert_eq!(
        store
            .load()
            .workload_by_addr(&addr("10.0.0.1"))
            .unwrap()
            .uid,
        uid("w1")
    );

    store.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.2"],
        &[],
    ))]));
    let snap = store.load();
    assert!(snap.workload_by_addr(&addr("10.0.0.1")).is_none());
    assert_eq!(
        snap.workload_by_addr(&addr("10.0.0.2")).unwrap().uid,
        uid("w1")
    );
    assert_eq!(
        snap.workload(&uid("w1")).unwrap().addresses,
        vec![ip("10.0.0.2")]
    );
    assert_eq!(snap.counts(), (1, 0, 0));
}

#[test]
fn workload_addresses_are_per_network() {
    let store = Store::new();
    let mut w = workload("w1", "default", &["10.0.0.1"], &[]);
    w.network = "net1".into();
    store.apply(upserts(vec![Upsert::Workload(w)]));
    let snap = store.load();
    assert!(snap.workload_by_addr(&addr("10.0.0.1")).is_none());
    assert_eq!(
        snap.workload_by_addr(&NetworkAddr::new("net1", ip("10.0.0.1")))
            .unwrap()
            .uid,
        uid("w1")
    );
}

#[test]
fn upsert_changing_services_moves_endpoints() {
    let store = Store::new();
    store.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.1"],
        &[ECHO, "default/a.default.svc.cluster.local"],
    ))]));
    assert_eq!(endpoint_uids(&store.load(), ECHO), vec!["w1"]);
    store.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.1"],
        &["default/b.default.svc.cluster.local"],
    ))]));
    let snap = store.load();
    assert!(endpoint_uids(&snap, ECHO).is_empty());
    assert!(endpoint_uids(&snap, "default/a.default.svc.cluster.local").is_empty());
    assert_eq!(
        endpoint_uids(&snap, "default/b.default.svc.cluster.local"),
        vec!["w1"]
    );
}

#[test]
fn removing_a_workload_cleans_every_index() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Service(service("default", ECHO_HOST, &["10.96.0.1"])),
        Upsert::Workload(workload("w1", "default", &["10.0.0.1", "fd00::1"], &[ECHO])),
        Upsert::Workload(workload("w2", "default", &["10.0.0.2"], &[ECHO])),
    ]));
    assert_eq!(endpoint_uids(&store.load(), ECHO), vec!["w1", "w2"]);

    let s = store.apply(removals(vec![remove_addr("w1")]));
    assert_eq!((s.removed, s.unknown_removals), (1, 0));
    let snap = store.load();
    assert!(snap.workload(&uid("w1")).is_none());
    assert!(snap.workload_by_addr(&addr("10.0.0.1")).is_none());
    assert!(snap.workload_by_addr(&addr("fd00::1")).is_none());
    assert_eq!(endpoint_uids(&snap, ECHO), vec!["w2"]);
    assert!(snap.workloads().all(|w| w.uid != uid("w1")));
    // The service and the other workload are untouched.
    assert!(snap.service(&skey(ECHO)).is_some());
    assert_eq!(
        snap.workload_by_addr(&addr("10.0.0.2")).unwrap().uid,
        uid("w2")
    );
    assert_eq!(snap.counts(), (1, 1, 0));

    // No stale index survives: the same uid coming back elsewhere, without services, is found only
    // at its new address and in no service.
    store.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.9"],
        &[],
    ))]));
    let snap = store.load();
    assert!(snap.workload_by_addr(&addr("10.0.0.1")).is_none());
    assert!(snap.workload_by_addr(&addr("fd00::1")).is_none());
    assert_eq!(
        snap.workload_by_addr(&addr("10.0.0.9")).unwrap().uid,
        uid("w1")
    );
    assert_eq!(endpoint_uids(&snap, ECHO), vec!["w2"]);
}

#[test]
fn two_workloads_sharing_an_ip_removing_the_non_owner_keeps_the_owner() {
    let store = Store::new();
    // w2 arrives last, so it owns the address entry.
    store.apply(upserts(vec![
        Upsert::Workload(workload("w1", "default", &["10.0.0.1"], &[])),
        Upsert::Workload(workload("w2", "default", &["10.0.0.1"], &[])),
    ]));
    assert_eq!(
        store
            .load()
            .workload_by_addr(&addr("10.0.0.1"))
            .unwrap()
            .uid,
        uid("w2")
    );
    store.apply(removals(vec![remove_addr("w1")]));
    let snap = store.load();
    assert_eq!(
        snap.workload_by_addr(&addr("10.0.0.1")).unwrap().uid,
        uid("w2")
    );
    assert!(snap.workload(&uid("w1")).is_none());
}

#[test]
fn two_workloads_sharing_an_ip_removing_the_owner_falls_back_to_the_other() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Workload(workload("w1", "default", &["10.0.0.1"], &[])),
        Upsert::Workload(workload("w2", "default", &["10.0.0.1"], &[])),
    ]));
    store.apply(removals(vec![remove_addr("w2")]));
    let snap = store.load();
    assert!(snap.workload(&uid("w2")).is_none());
    assert_eq!(
        snap.workload_by_addr(&addr("10.0.0.1"))
            .map(|w| w.uid.clone()),
        Some(uid("w1")),
        "w1 still has 10.0.0.1 and must stay resolvable"
    );
    store.apply(removals(vec![remove_addr("w1")]));
    assert!(store.load().workload_by_addr(&addr("10.0.0.1")).is_none());
}

// ---------------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------------

#[test]
fn upsert_replaces_service_vips() {
    let store = Store::new();
    store.apply(upserts(vec![Upsert::Service(service(
        "default",
        ECHO_HOST,
        &["10.96.0.1", "fd10::1"],
    ))]));
    store.apply(upserts(vec![Upsert::Service(service(
        "default",
        ECHO_HOST,
        &["10.96.0.2"],
    ))]));
    let snap = store.load();
    assert!(snap.service_by_vip(&addr("10.96.0.1"), None).is_none());
    assert!(snap.service_by_vip(&addr("fd10::1"), None).is_none());
    assert_eq!(
        snap.service_by_vip(&addr("10.96.0.2"), None).unwrap().key(),
        skey(ECHO)
    );
    assert_eq!(
        snap.service_by_hostname(ECHO_HOST).unwrap().key(),
        skey(ECHO)
    );
    assert_eq!(snap.counts(), (0, 1, 0));
}

#[test]
fn removing_a_service_by_name_cleans_every_index() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Service(service("default", ECHO_HOST, &["10.96.0.1", "fd10::1"])),
        Upsert::Service(service(
            "default",
            "other.default.svc.cluster.local",
            &["10.96.0.5"],
        )),
        Upsert::Workload(workload("w1", "default", &["10.0.0.1"], &[ECHO])),
    ]));
    let s = store.apply(removals(vec![remove_addr(ECHO)]));
    assert_eq!((s.removed, s.unknown_removals), (1, 0));
    let snap = store.load();
    assert!(snap.service(&skey(ECHO)).is_none());
    assert!(snap.service_by_vip(&addr("10.96.0.1"), None).is_none());
    assert!(snap.service_by_vip(&addr("fd10::1"), None).is_none());
    assert!(snap.service_by_hostname(ECHO_HOST).is_none());
    assert!(snap.services().all(|s| s.key() != skey(ECHO)));
    // The other service and the workload are untouched.
    assert!(snap
        .service_by_hostname("other.default.svc.cluster.local")
        .is_some());
    assert!(snap.service_by_vip(&addr("10.96.0.5"), None).is_some());
    assert_eq!(
        snap.workload_by_addr(&addr("10.0.0.1")).unwrap().uid,
        uid("w1")
    );
    assert_eq!(snap.counts(), (1, 1, 0));

    // The same service back with another VIP: the old VIP stays unknown, and the workload that still
    // names the service is its endpoint again.
    store.apply(upserts(vec![Upsert::Service(service(
        "default",
        ECHO_HOST,
        &["10.96.0.9"],
    ))]));
    let snap = store.load();
    assert!(snap.service_by_vip(&addr("10.96.0.1"), None).is_none());
    assert_eq!(
        snap.service_by_vip(&addr("10.96.0.9"), None).unwrap().key(),
        skey(ECHO)
    );
    assert_eq!(endpoint_uids(&snap, ECHO), vec!["w1"]);
}

#[test]
fn unknown_removals_are_counted_not_fatal() {
    let store = Store::new();
    store.apply(upserts(vec![Upsert::Workload(workload(
        "cluster1//v1/Pod/default/w1",
        "default",
        &["10.0.0.1"],
        &[],
    ))]));
    let s = store.apply(removals(vec![
        remove_addr("cluster1//v1/Pod/default/nope"),
        remove_addr("default/nope.default.svc.cluster.local"),
        remove_addr("not a key"),
        remove_addr(""),
        Removal::Policy(pkey("default/nope")),
        remove_addr("cluster1//v1/Pod/default/w1"),
    ]));
    assert_eq!(s.unknown_removals, 5);
    assert_eq!(s.removed, 1);
    assert_eq!(s.upserted, 0);
    assert_eq!(s.version, 2);
    assert_eq!(store.load().counts(), (0, 0, 0));
}

#[test]
fn endpoints_join_whichever_arrives_first() {
    // Service first, then workload (in two batches).
    let a = Store::new();
    a.apply(upserts(vec![Upsert::Service(service(
        "default",
        ECHO_HOST,
        &["10.96.0.1"],
    ))]));
    assert!(endpoint_uids(&a.load(), ECHO).is_empty());
    a.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.1"],
        &[ECHO],
    ))]));

    // Workload first, then service.
    let b = Store::new();
    b.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.1"],
        &[ECHO],
    ))]));
    assert_eq!(endpoint_uids(&b.load(), ECHO), vec!["w1"]);
    assert!(b.load().service(&skey(ECHO)).is_none());
    b.apply(upserts(vec![Upsert::Service(service(
        "default",
        ECHO_HOST,
        &["10.96.0.1"],
    ))]));

    // Both in one batch, workload first.
    let c = Store::new();
    c.apply(upserts(vec![
        Upsert::Workload(workload("w1", "default", &["10.0.0.1"], &[ECHO])),
        Upsert::Service(service("default", ECHO_HOST, &["10.96.0.1"])),
    ]));

    for store in [&a, &b, &c] {
        let snap = store.load();
        let eps: Vec<_> = snap.endpoints(&skey(ECHO)).collect();
        assert_eq!(eps.len(), 1);
        let (w, ep) = eps[0];
        assert_eq!(w.uid, uid("w1"));
        assert_eq!(ep.workload, uid("w1"));
        assert_eq!(ep.ports, PortMap::from([(80, 8080)]));
        let svc = snap.service_by_vip(&addr("10.96.0.1"), None).unwrap();
        assert_eq!(svc.key(), skey(ECHO));
        assert_eq!(snap.counts(), (1, 1, 0));
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots and versions
// ---------------------------------------------------------------------------------------------

#[test]
fn old_snapshot_is_unaffected_by_later_writes() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Service(service("default", ECHO_HOST, &["10.96.0.1"])),
        Upsert::Workload(workload("w1", "default", &["10.0.0.1"], &[ECHO])),
        Upsert::Workload(workload("w2", "default", &["10.0.0.2"], &[ECHO])),
        Upsert::Policy(policy("default", "p1", PolicyScope::Namespace)),
    ]));
    let old = store.load();
    assert_eq!(old.version(), 1);

    let s = store.apply(Batch {
        upserts: vec![
            Upsert::Service(service("default", ECHO_HOST, &["10.96.0.2"])),
            Upsert::Workload(workload("w3", "default", &["10.0.0.3"], &[ECHO])),
            Upsert::Policy(policy("default", "p2", PolicyScope::Global)),
        ],
        removals: vec![remove_addr("w1"), Removal::Policy(pkey("default/p1"))],
        replace_all: false,
    });
    assert_eq!(s.version, 2);
    assert_eq!((s.upserted, s.removed, s.unknown_removals), (3, 2, 0));

    // The old snapshot still sees the old state, in every index.
    assert_eq!(old.version(), 1);
    assert_eq!(old.counts(), (2, 1, 1));
    assert_eq!(
        old.workload_by_addr(&addr("10.0.0.1")).unwrap().uid,
        uid("w1")
    );
    assert!(old.workload_by_addr(&addr("10.0.0.3")).is_none());
    assert!(old.service_by_vip(&addr("10.96.0.1"), None).is_some());
    assert!(old.service_by_vip(&addr("10.96.0.2"), None).is_none());
    assert_eq!(endpoint_uids(&old, ECHO), vec!["w1", "w2"]);
    assert!(old.policy(&pkey("default/p1")).is_some());
    assert!(old.policy(&pkey("default/p2")).is_none());
    let w2 = old.workload(&uid("w2")).unwrap().clone();
    assert_eq!(policy_keys(&old, &w2), vec!["default/p1"]);

    // The new one sees the new state.
    let new = store.load();
    assert_eq!(new.version(), 2);
    assert_eq!(new.counts(), (2, 1, 1));
    assert!(new.workload_by_addr(&addr("10.0.0.1")).is_none());
    assert!(new.service_by_vip(&addr("10.96.0.1"), None).is_none());
    assert!(new.service_by_vip(&addr("10.96.0.2"), None).is_some());
    assert_eq!(endpoint_uids(&new, ECHO), vec!["w2", "w3"]);
    assert_eq!(policy_keys(&new, &w2), vec!["default/p2"]);
}

#[test]
fn version_increases_by_one_per_batch() {
    let store = Store::new();
    for i in 1..=5u64 {
        let s = store.apply(upserts(vec![Upsert::Workload(workload(
            &format!("w{i}"),
            "default",
            &[&format!("10.0.0.{i}")],
            &[],
        ))]));
        assert_eq!(s.version, i);
        assert_eq!(store.load().version(), i);
    }
    // An empty batch and a batch of only unknown removals still publish a new version.
    assert_eq!(store.apply(Batch::default()).version, 6);
    assert_eq!(store.apply(removals(vec![remove_addr("nope")])).version, 7);
    assert_eq!(store.load().counts(), (5, 0, 0));
}

#[test]
fn subscriber_sees_the_new_version() {
    let store = Store::new();
    let mut rx = store.subscribe();
    assert_eq!(*rx.borrow_and_update(), 0);
    assert!(!rx.has_changed().unwrap());
    let s = store.apply(upserts(vec![Upsert::Policy(policy(
        "default",
        "p",
        PolicyScope::Global,
    ))]));
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), s.version);
    assert_eq!(s.version, 1);
    store.apply(Batch::default());
    store.apply(Batch::default());
    assert!(rx.has_changed().unwrap());
    assert_eq!(*rx.borrow_and_update(), 3);
    // A receiver subscribed later starts at the current version.
    assert_eq!(*store.subscribe().borrow(), 3);
}

#[test]
fn replace_all_removes_everything_not_in_the_batch() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Service(service("default", ECHO_HOST, &["10.96.0.1"])),
        Upsert::Service(service(
            "default",
            "gone.default.svc.cluster.local",
            &["10.96.0.2"],
        )),
        Upsert::Workload(workload("w1", "default", &["10.0.0.1"], &[ECHO])),
        Upsert::Workload(workload("w2", "default", &["10.0.0.2"], &[ECHO])),
        Upsert::Policy(policy("default", "keep", PolicyScope::Namespace)),
        Upsert::Policy(policy("default", "drop", PolicyScope::Namespace)),
        Upsert::Policy(policy("istio-system", "global", PolicyScope::Global)),
    ]));
    let s = store.apply(Batch {
        upserts: vec![
            Upsert::Service(service("default", ECHO_HOST, &["10.96.0.1"])),
            Upsert::Workload(workload("w2", "default", &["10.0.0.2"], &[ECHO])),
            Upsert::Policy(policy("default", "keep", PolicyScope::Namespace)),
        ],
        removals: vec![],
        replace_all: true,
    });
    assert_eq!(s.version, 2);
    assert_eq!(s.upserted, 3);
    let snap = store.load();
    assert_eq!(snap.counts(), (1, 1, 1));
    assert!(snap.workload(&uid("w1")).is_none());
    assert!(snap.workload_by_addr(&addr("10.0.0.1")).is_none());
    assert_eq!(
        snap.workload_by_addr(&addr("10.0.0.2")).unwrap().uid,
        uid("w2")
    );
    assert!(snap.service_by_vip(&addr("10.96.0.2"), None).is_none());
    assert!(snap
        .service_by_hostname("gone.default.svc.cluster.local")
        .is_none());
    assert_eq!(endpoint_uids(&snap, ECHO), vec!["w2"]);
    assert!(snap.policy(&pkey("default/drop")).is_none());
    assert!(snap.policy(&pkey("istio-system/global")).is_none());
    let w2 = snap.workload(&uid("w2")).unwrap().clone();
    assert_eq!(policy_keys(&snap, &w2), vec!["default/keep"]);

    // An empty replace-all clears everything.
    store.apply(Batch {
        replace_all: true,
        ..Default::default()
    });
    let snap = store.load();
    assert_eq!(snap.counts(), (0, 0, 0));
    assert!(endpoint_uids(&snap, ECHO).is_empty());
    assert!(snap.policies_for(&w2).next().is_none());
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

#[test]
fn policies_for_returns_exactly_the_applicable_policies() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Policy(policy("istio-system", "global", PolicyScope::Global)),
        Upsert::Policy(policy("default", "ns", PolicyScope::Namespace)),
        Upsert::Policy(policy("other", "other-ns", PolicyScope::Namespace)),
        Upsert::Policy(policy("default", "selected", PolicyScope::WorkloadSelector)),
        Upsert::Policy(policy("default", "unlisted", PolicyScope::WorkloadSelector)),
        Upsert::Policy(policy(
            "other",
            "other-selected",
            PolicyScope::WorkloadSelector,
        )),
    ]));
    let mut w = workload("w1", "default", &["10.0.0.1"], &[]);
    w.authorization_policies = vec![
        "default/selected".into(),
        // A namespace policy listed by name is still returned once only.
        "default/ns".into(),
        // A global one too.
        "istio-system/global".into(),
        // Listed but not (yet) known.
        "default/missing".into(),
    ];
    let snap = store.load();
    let got = policy_keys(&snap, &w);
    assert_eq!(
        sorted(got.clone()),
        vec!["default/ns", "default/selected", "istio-system/global"]
    );
    assert_eq!(got.len(), 3, "a policy was returned twice: {got:?}");

    // A workload in another namespace sees the global one and its own namespace's.
    let other = workload("w2", "other", &["10.0.0.2"], &[]);
    assert_eq!(
        sorted(policy_keys(&snap, &other)),
        vec!["istio-system/global", "other/other-ns"]
    );
    // A workload in a namespace without policies sees only the global one.
    let lonely = workload("w3", "lonely", &["10.0.0.3"], &[]);
    assert_eq!(policy_keys(&snap, &lonely), vec!["istio-system/global"]);
}

#[test]
fn removing_policies_cleans_every_index() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Policy(policy("istio-system", "global", PolicyScope::Global)),
        Upsert::Policy(policy("default", "ns", PolicyScope::Namespace)),
        Upsert::Policy(policy("default", "ns2", PolicyScope::Namespace)),
        Upsert::Policy(policy("default", "selected", PolicyScope::WorkloadSelector)),
    ]));
    let mut w = workload("w1", "default", &["10.0.0.1"], &[]);
    w.authorization_policies = vec!["default/selected".into()];
    assert_eq!(policy_keys(&store.load(), &w).len(), 4);

    let s = store.apply(removals(vec![
        Removal::Policy(pkey("istio-system/global")),
        Removal::Policy(pkey("default/ns")),
        Removal::Policy(pkey("default/selected")),
    ]));
    assert_eq!((s.removed, s.unknown_removals), (3, 0));
    let snap = store.load();
    assert!(snap.policy(&pkey("istio-system/global")).is_none());
    assert!(snap.policy(&pkey("default/ns")).is_none());
    assert!(snap.policy(&pkey("default/selected")).is_none());
    assert_eq!(policy_keys(&snap, &w), vec!["default/ns2"]);
    assert_eq!(snap.counts(), (0, 0, 1));

    // No stale namespace or global entry: the same keys come back as workload-selector policies,
    // which a workload that does not list them must not get.
    store.apply(removals(vec![Removal::Policy(pkey("default/ns2"))]));
    store.apply(upserts(vec![
        Upsert::Policy(policy(
            "istio-system",
            "global",
            PolicyScope::WorkloadSelector,
        )),
        Upsert::Policy(policy("default", "ns", PolicyScope::WorkloadSelector)),
        Upsert::Policy(policy("default", "ns2", PolicyScope::WorkloadSelector)),
    ]));
    let plain = workload("w2", "default", &["10.0.0.2"], &[]);
    assert!(policy_keys(&store.load(), &plain).is_empty());
    assert_eq!(store.load().counts(), (0, 0, 3));
}

#[test]
fn policy_scope_change_by_upsert_moves_it_between_indexes() {
    let store = Store::new();
    let w = workload("w1", "default", &["10.0.0.1"], &[]);
    store.apply(upserts(vec![Upsert::Policy(policy(
        "default",
        "p",
        PolicyScope::Namespace,
    ))]));
    assert_eq!(policy_keys(&store.load(), &w), vec!["default/p"]);

    store.apply(upserts(vec![Upsert::Policy(policy(
        "default",
        "p",
        PolicyScope::WorkloadSelector,
    ))]));
    assert!(policy_keys(&store.load(), &w).is_empty());

    store.apply(upserts(vec![Upsert::Policy(policy(
        "default",
        "p",
        PolicyScope::Global,
    ))]));
    let other_ns = workload("w2", "elsewhere", &["10.0.0.2"], &[]);
    assert_eq!(policy_keys(&store.load(), &other_ns), vec!["default/p"]);
    assert_eq!(policy_keys(&store.load(), &w), vec!["default/p"]);

    // An upsert replaces the policy's content too.
    let mut allow = policy("default", "p", PolicyScope::Global);
    allow.action = Action::Allow;
    store.apply(upserts(vec![Upsert::Policy(allow)]));
    let snap = store.load();
    assert_eq!(
        snap.policy(&pkey("default/p")).unwrap().action,
        Action::Allow
    );
    assert_eq!(snap.counts(), (0, 0, 1));
}

// ---------------------------------------------------------------------------------------------
// Scale
// ---------------------------------------------------------------------------------------------

#[test]
fn scale_20k_workloads_2k_services_then_one_change() {
    const WORKLOADS: u32 = 20_000;
    const SERVICES: u32 = 2_000;
    let svc_key = |i: u32| format!("ns{}/svc{i}.ns{}.svc.cluster.local", i % 50, i % 50);
    let wl_ip = |i: u32| format!("10.{}.{}.{}", i >> 16, (i >> 8) & 0xff, i & 0xff);

    let mut batch = Vec::with_capacity((WORKLOADS + SERVICES) as usize);
    for i in 0..SERVICES {
        let key = svc_key(i);
        let (ns, host) = key.split_once('/').unwrap();
        batch.push(Upsert::Service(service(
            ns,
            host,
            &[&format!("172.16.{}.{}", i >> 8, i & 0xff)],
        )));
    }
    for i in 0..WORKLOADS {
        let svc = svc_key(i % SERVICES);
        batch.push(Upsert::Workload(workload(
            &format!("w{i}"),
            svc.split_once('/').unwrap().0,
            &[&wl_ip(i)],
            &[&svc],
        )));
    }
    let store = Store::new();
    let s = store.apply(Batch {
        upserts: batch,
        removals: vec![],
        replace_all: true,
    });
    assert_eq!(s.upserted, (WORKLOADS + SERVICES) as usize);
    let before = store.load();
    assert_eq!(before.counts(), (WORKLOADS as usize, SERVICES as usize, 0));
    assert_eq!(endpoint_uids(&before, &svc_key(7)).len(), 10);

    // One workload moves to another IP and another service.
    let moved = 12_345u32;
    let old_svc = svc_key(moved % SERVICES);
    let new_svc = svc_key(3);
    let (new_ns, _) = new_svc.split_once('/').unwrap();
    let s = store.apply(upserts(vec![Upsert::Workload(workload(
        &format!("w{moved}"),
        new_ns,
        &["10.200.0.1"],
        &[&new_svc],
    ))]));
    assert_eq!(s.version, 2);
    assert_eq!((s.upserted, s.removed), (1, 0));

    let after = store.load();
    assert_eq!(after.counts(), (WORKLOADS as usize, SERVICES as usize, 0));
    assert!(after.workload_by_addr(&addr(&wl_ip(moved))).is_none());
    assert_eq!(
        after.workload_by_addr(&addr("10.200.0.1")).unwrap().uid,
        uid(&format!("w{moved}"))
    );
    let old_eps = endpoint_uids(&after, &old_svc);
    assert_eq!(old_eps.len(), 9);
    assert!(!old_eps.contains(&format!("w{moved}")));
    let new_eps = endpoint_uids(&after, &new_svc);
    assert_eq!(new_eps.len(), 11);
    assert!(new_eps.contains(&format!("w{moved}")));

    // Every other workload is still found by address, in both snapshots.
    for i in (0..WORKLOADS).step_by(97).filter(|i| *i != moved) {
        let want = uid(&format!("w{i}"));
        assert_eq!(after.workload_by_addr(&addr(&wl_ip(i))).unwrap().uid, want);
        // Unchanged entities are shared with the previous snapshot, not copied.
        assert!(Arc::ptr_eq(
            after.workload(&want).unwrap(),
            before.workload(&want).unwrap()
        ));
    }
    for i in (0..SERVICES).step_by(13) {
        let key = svc_key(i);
        let (_, host) = key.split_once('/').unwrap();
        assert_eq!(after.service_by_hostname(host).unwrap().key(), skey(&key));
        assert_eq!(
            after
                .service_by_vip(&addr(&format!("172.16.{}.{}", i >> 8, i & 0xff)), None)
                .unwrap()
                .key(),
            skey(&key)
        );
    }
    // The reader of the old snapshot still sees the workload where it was.
    assert_eq!(
        before.workload_by_addr(&addr(&wl_ip(moved))).unwrap().uid,
        uid(&format!("w{moved}"))
    );
    assert_eq!(endpoint_uids(&before, &old_svc).len(), 10);
    assert_eq!(endpoint_uids(&before, &new_svc).len(), 10);
}

#[test]
fn shared_ip_lookup_follows_the_latest_holder() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Workload(workload("w1", "default", &["10.0.0.1"], &[])),
        Upsert::Workload(workload("w2", "default", &["10.0.0.1"], &[])),
        Upsert::Workload(workload("w3", "default", &["10.0.0.1"], &[])),
    ]));
    let by_ip = |store: &Store| {
        store
            .load()
            .workload_by_addr(&addr("10.0.0.1"))
            .map(|w| w.uid.to_string())
    };
    assert_eq!(by_ip(&store).as_deref(), Some("w3"));
    // Updating an older holder makes it the latest.
    store.apply(upserts(vec![Upsert::Workload(workload(
        "w1",
        "default",
        &["10.0.0.1"],
        &[],
    ))]));
    assert_eq!(by_ip(&store).as_deref(), Some("w1"));
    let old = store.load();
    store.apply(removals(vec![remove_addr("w1")]));
    assert_eq!(by_ip(&store).as_deref(), Some("w3"));
    store.apply(removals(vec![remove_addr("w3")]));
    assert_eq!(by_ip(&store).as_deref(), Some("w2"));
    // Moving the last holder away empties the entry.
    store.apply(upserts(vec![Upsert::Workload(workload(
        "w2",
        "default",
        &["10.0.0.2"],
        &[],
    ))]));
    assert_eq!(by_ip(&store), None);
    // The snapshot taken earlier is unaffected by the in-place index edits.
    assert_eq!(
        old.workload_by_addr(&addr("10.0.0.1")).unwrap().uid,
        uid("w1")
    );
}

#[test]
fn services_sharing_a_hostname_or_vip_survive_each_others_removal() {
    // The same external host declared in two namespaces (two ServiceEntries) is common in Istio.
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Service(service("a", "api.example.com", &["240.240.0.1"])),
        Upsert::Service(service("b", "api.example.com", &["240.240.0.1"])),
    ]));
    let snap = store.load();
    // By hostname, the first registered.
    assert_eq!(
        snap.service_by_hostname("api.example.com")
            .unwrap()
            .namespace,
        "a"
    );
    // By VIP, as ztunnel: the client's namespace's, else the first registered.
    assert_eq!(
        snap.service_by_vip(&addr("240.240.0.1"), Some("b"))
            .unwrap()
            .namespace,
        "b"
    );
    assert_eq!(
        snap.service_by_vip(&addr("240.240.0.1"), None)
            .unwrap()
            .namespace,
        "a"
    );

    store.apply(removals(vec![remove_addr("a/api.example.com")]));
    let snap = store.load();
    assert_eq!(
        snap.service_by_vip(&addr("240.240.0.1"), None)
            .unwrap()
            .namespace,
        "b"
    );
    store.apply(upserts(vec![Upsert::Service(service(
        "a",
        "api.example.com",
        &["240.240.0.1"],
    ))]));
    store.apply(removals(vec![remove_addr("b/api.example.com")]));
    let snap = store.load();
    assert_eq!(
        snap.service_by_hostname("api.example.com")
            .map(|s| s.namespace.clone())
            .as_deref(),
        Some("a"),
        "a/api.example.com is still there and must stay resolvable by hostname"
    );
    assert_eq!(
        snap.service_by_vip(&addr("240.240.0.1"), None)
            .map(|s| s.namespace.clone())
            .as_deref(),
        Some("a")
    );
    store.apply(removals(vec![remove_addr("a/api.example.com")]));
    let snap = store.load();
    assert!(snap.service_by_hostname("api.example.com").is_none());
    assert!(snap.service_by_vip(&addr("240.240.0.1"), None).is_none());
}

#[test]
fn workloads_on_node_follow_upserts_and_removals() {
    use crate::proto::istio::workload as pw;
    let wl = |name: &str, node: &str| {
        Workload::try_from(pw::Workload {
            uid: format!("c//v1/Pod/ns/{name}"),
            name: name.into(),
            namespace: "ns".into(),
            node: node.into(),
            ..Default::default()
        })
        .unwrap()
    };
    let store = Store::new();
    store.apply(Batch {
        upserts: vec![
            Upsert::Workload(wl("a", "n1")),
            Upsert::Workload(wl("b", "n1")),
            Upsert::Workload(wl("c", "n2")),
        ],
        ..Default::default()
    });
    let names = |node: &str| {
        let mut v: Vec<String> = store
            .load()
            .workloads_on_node(node)
            .map(|w| w.name.clone())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("n1"), vec!["a", "b"]);
    // Moving b to n2, removing a.
    store.apply(Batch {
        upserts: vec![Upsert::Workload(wl("b", "n2"))],
        removals: vec![Removal::Address("c//v1/Pod/ns/a".into())],
        ..Default::default()
    });
    assert!(names("n1").is_empty());
    assert_eq!(names("n2"), vec!["b", "c"]);
}

#[test]
fn a_shared_vip_is_the_clients_namespace_then_canonical_then_first() {
    let store = Store::new();
    let mut canonical = service("c", "shared.c.svc.cluster.local", &["10.96.7.1"]);
    canonical.canonical = true;
    store.apply(upserts(vec![
        Upsert::Service(service("a", "shared.a.svc.cluster.local", &["10.96.7.1"])),
        Upsert::Service(service("b", "shared.b.svc.cluster.local", &["10.96.7.1"])),
    ]));
    let snap = store.load();
    let ns_of = |snap: &Snapshot, client| {
        snap.service_by_vip(&addr("10.96.7.1"), client)
            .unwrap()
            .namespace
            .clone()
    };
    assert_eq!(ns_of(&snap, Some("b")), "b");
    assert_eq!(ns_of(&snap, Some("a")), "a");
    // From elsewhere: the first registered.
    assert_eq!(ns_of(&snap, Some("z")), "a");
    assert_eq!(ns_of(&snap, None), "a");
    store.apply(upserts(vec![Upsert::Service(canonical)]));
    let snap = store.load();
    assert_eq!(ns_of(&snap, Some("z")), "c");
    assert_eq!(ns_of(&snap, Some("b")), "b");
}

#[test]
fn address_ranges_match_after_exact_vips_the_longest_prefix_first() {
    let store = Store::new();
    let ranged = |ns: &str, host: &str, cidrs: &[&str]| {
        let mut s = service(ns, host, &[]);
        s.cidr_vips = cidrs
            .iter()
            .map(|c| crate::model::NetworkCidr {
                network: "".into(),
                net: c.parse().unwrap(),
            })
            .collect();
        s
    };
    store.apply(upserts(vec![
        Upsert::Service(ranged("default", "wide.example.com", &["10.1.0.0/16"])),
        Upsert::Service(ranged(
            "default",
            "narrow.example.com",
            &["10.1.2.0/24", "fd00::/64"],
        )),
        Upsert::Service(service("default", ECHO_HOST, &["10.1.2.3"])),
    ]));
    let snap = store.load();
    // Exact VIPs first (the router asks ranges only for what no VIP or workload holds).
    let host = |ip: &str| {
        snap.service_by_vip(&addr(ip), None)
            .or_else(|| snap.service_by_range(&addr(ip), None))
            .map(|s| s.hostname.clone())
    };
    assert_eq!(host("10.1.2.3").as_deref(), Some(ECHO_HOST), "exact first");
    assert!(snap.service_by_vip(&addr("10.1.2.4"), None).is_none());
    assert_eq!(host("10.1.2.4").as_deref(), Some("narrow.example.com"));
    assert_eq!(host("10.1.9.9").as_deref(), Some("wide.example.com"));
    assert_eq!(host("fd00::7").as_deref(), Some("narrow.example.com"));
    assert_eq!(host("10.2.0.1"), None);
    // Another network's address is not in the range.
    assert!(snap
        .service_by_range(&NetworkAddr::new("far", ip("10.1.2.4")), None)
        .is_none());
    // Gone with its service.
    store.apply(removals(vec![remove_addr("default/narrow.example.com")]));
    let snap = store.load();
    assert_eq!(
        snap.service_by_range(&addr("10.1.2.4"), None)
            .map(|s| s.hostname.as_str()),
        Some("wide.example.com")
    );
}

#[test]
fn an_updated_service_keeps_its_place_among_holders() {
    let store = Store::new();
    store.apply(upserts(vec![
        Upsert::Service(service("a", "shared.example.com", &["10.96.8.1"])),
        Upsert::Service(service("b", "shared.example.com", &["10.96.8.1"])),
    ]));
    // `a` resent (a control plane's reconnect), then updated with a second VIP: still first.
    store.apply(upserts(vec![Upsert::Service(service(
        "a",
        "shared.example.com",
        &["10.96.8.1"],
    ))]));
    store.apply(upserts(vec![Upsert::Service(service(
        "a",
        "shared.example.com",
        &["10.96.8.1", "10.96.8.2"],
    ))]));
    let snap = store.load();
    let first = |snap: &Snapshot| {
        snap.service_by_vip(&addr("10.96.8.1"), None)
            .unwrap()
            .namespace
            .clone()
    };
    assert_eq!(first(&snap), "a");
    let hosts: Vec<String> = snap
        .services_by_hostname("shared.example.com")
        .map(|s| s.namespace.clone())
        .collect();
    assert_eq!(hosts, ["a", "b"]);
    assert_eq!(
        snap.service_by_vip(&addr("10.96.8.2"), None)
            .unwrap()
            .namespace,
        "a"
    );
    // A VIP dropped by the update is `a`'s no more.
    store.apply(upserts(vec![Upsert::Service(service(
        "a",
        "shared.example.com",
        &["10.96.8.2"],
    ))]));
    let snap = store.load();
    assert_eq!(first(&snap), "b");
    assert_eq!(
        snap.service_by_vip(&addr("10.96.8.2"), None)
            .unwrap()
            .namespace,
        "a"
    );
}
