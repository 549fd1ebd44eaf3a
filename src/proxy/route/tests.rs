//! Routing and load-balancing tests: every mode and health policy, capacity weights (statistical
//! with a fixed seed), port mapping, passthrough.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::*;
use crate::model::{
    HealthPolicy, LoadBalancing, LoadBalancingMode, Locality, NetworkAddr, RoutingScope, Service,
    ServiceKey, TunnelProtocol, Workload, WorkloadStatus,
};
use crate::proto::istio::workload as pw;
use crate::store::{Batch, Store, Upsert};

pub(super) const SVC: &str = "default/echo.default.svc.cluster.local";

pub(super) fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

pub(super) fn workload(name: &str, addr: &str) -> Workload {
    let p = pw::Workload {
        uid: format!("cluster1//v1/Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        addresses: vec![match ip(addr) {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }],
        ..Default::default()
    };
    Workload::try_from(p).unwrap()
}

pub(super) fn endpoint(name: &str, addr: &str, ports: &[(u16, u16)]) -> Workload {
    let mut w = workload(name, addr);
    w.services.insert(
        ServiceKey::parse(SVC).unwrap(),
        ports.iter().copied().collect(),
    );
    w
}

pub(super) fn service(ports: &[(u16, u16)], lb: LoadBalancing) -> Service {
    Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        vips: vec![NetworkAddr::new("", ip("10.0.0.1"))],
        ports: ports.iter().copied().collect::<BTreeMap<_, _>>(),
        subject_alt_names: vec![],
        waypoint: None,
        load_balancing: lb,
        ip_families: crate::model::IpFamilies::Automatic,
        canonical: true,
        visibility: Default::default(),
        cidr_vips: Vec::new(),
        weighted_waypoints: Vec::new(),
    }
}

pub(super) fn store_with(svc: Service, wls: Vec<Workload>) -> Store {
    let store = Store::new();
    let mut upserts = vec![Upsert::Service(svc)];
    upserts.extend(wls.into_iter().map(Upsert::Workload));
    store.apply(Batch {
        upserts,
        ..Default::default()
    });
    store
}

fn net() -> Arc<str> {
    Arc::from("")
}

pub(super) fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(ip("10.0.0.1"), port)
}

/// Routes `n` connections and counts the chosen upstream addresses.
fn histogram(store: &Store, src: Option<&Workload>, n: usize) -> HashMap<SocketAddr, usize> {
    let snap = store.load();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut h = HashMap::new();
    for _ in 0..n {
        let up = route(&snap, &net(), src, vip(80), &mut rng).unwrap();
        *h.entry(up.addr).or_default() += 1;
    }
    h
}

#[test]
fn vip_maps_to_endpoint_target_port() {
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![endpoint("a", "10.1.0.1", &[(80, 9090)])],
    );
    let up = route(
        &store.load(),
        &net(),
        None,
        vip(80),
        &mut SmallRng::seed_from_u64(1),
    )
    .unwrap();
    // The endpoint's own mapping wins over the service's.
    assert_eq!(up.addr, "10.1.0.1:9090".parse().unwrap());
    assert_eq!(up.kind, UpstreamKind::Tcp);
    assert_eq!(
        up.service.unwrap().hostname,
        "echo.default.svc.cluster.local"
    );
}

#[test]
fn standard_mode_weighs_no_routing_preference() {
    let mut near = endpoint("near", "10.1.0.1", &[(80, 8080)]);
    near.locality.region = "r1".into();
    let mut far = endpoint("far", "10.1.0.2", &[(80, 8080)]);
    far.locality.region = "r2".into();
    let mut client = workload("client", "10.2.0.1");
    client.locality.region = "r1".into();
    let lb = LoadBalancing {
        mode: LoadBalancingMode::Standard,
        routing_preference: vec![RoutingScope::Region],
        ..LoadBalancing::default()
    };
    let store = store_with(service(&[(80, 8080)], lb), vec![near, far]);
    let h = histogram(&store, Some(&client), 400);
    // Both chosen (ztunnel: STANDARD ignores preferences); FAILOVER would pick `near` only.
    assert_eq!(h.len(), 2, "{h:?}");
}

#[test]
fn an_endpoint_known_by_hostname_is_chosen_unresolved() {
    let mut external = endpoint("ext", "10.1.0.1", &[(80, 443)]);
    external.addresses.clear();
    external.hostname = "db.example.com".into();
    // Neither an address nor a hostname: never a candidate.
    let mut nothing = endpoint("none", "10.1.0.2", &[(80, 443)]);
    nothing.addresses.clear();
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![external, nothing],
    );
    for seed in 0..20 {
        let up = route(
            &store.load(),
            &net(),
            None,
            vip(80),
            &mut SmallRng::seed_from_u64(seed),
        )
        .unwrap();
        assert_eq!(up.hostname.as_deref(), Some("db.example.com"));
        // The IP is resolved later; the target port is the endpoint's.
        assert_eq!(up.addr, "0.0.0.0:443".parse().unwrap());
        assert_eq!(up.workload.unwrap().name, "ext");
    }
    // A waypoint-style filter that takes addresses only leaves nothing.
    let svc = store
        .load()
        .service_by_vip(&NetworkAddr::new("", ip("10.0.0.1")), None)
        .unwrap()
        .clone();
    let addressed = |_: &Workload, a: Option<IpAddr>| a.is_some();
    assert!(matches!(
        service_endpoint(
            &store.load(),
            "",
            &svc,
            None,
            vip(80),
            &addressed,
            &mut SmallRng::seed_from_u64(1)
        ),
        Err(RouteError::NoHealthyEndpoint { .. })
    ));
}

#[test]
fn service_target_port_applies_when_endpoint_has_none() {
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![endpoint("a", "10.1.0.1", &[(80, 0)])],
    );
    let up = route(
        &store.load(),
        &net(),
        None,
        vip(80),
        &mut SmallRng::seed_from_u64(1),
    )
    .unwrap();
    assert_eq!(up.addr, "10.1.0.1:8080".parse().unwrap());
}

#[test]
fn unknown_service_port_is_an_error() {
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![endpoint("a", "10.1.0.1", &[(80, 8080)])],
    );
    let e = route(
        &store.load(),
        &net(),
        None,
        vip(81),
        &mut SmallRng::seed_from_u64(1),
    )
    .unwrap_err();
    assert!(
        matches!(e, RouteError::UnknownServicePort { port: 81, .. }),
        "{e}"
    );
}

#[test]
fn workload_ip_and_passthrough() {
    let mut hb = workload("h", "10.1.0.9");
    hb.protocol = TunnelProtocol::Hbone;
    let store = store_with(service(&[(80, 8080)], LoadBalancing::default()), vec![hb]);
    let snap = store.load();
    let mut rng = SmallRng::seed_from_u64(1);
    let up = route(
        &snap,
        &net(),
        None,
        "10.1.0.9:5000".parse().unwrap(),
        &mut rng,
    )
    .unwrap();
    assert_eq!(up.kind, UpstreamKind::Hbone);
    assert_eq!(up.addr, "10.1.0.9:5000".parse().unwrap());
    assert_eq!(up.workload.unwrap().name, "h");
    let up = route(
        &snap,
        &net(),
        None,
        "192.0.2.1:443".parse().unwrap(),
        &mut rng,
    )
    .unwrap();
    assert_eq!(up.kind, UpstreamKind::Passthrough);
    assert!(up.workload.is_none() && up.service.is_none());
    // The same IP on another network is not that workload.
    let other: Arc<str> = Arc::from("net2");
    let up = route(
        &snap,
        &other,
        None,
        "10.1.0.9:5000".parse().unwrap(),
        &mut rng,
    )
    .unwrap();
    assert_eq!(up.kind, UpstreamKind::Passthrough);
}

#[test]
fn no_healthy_endpoint_is_an_error_and_allow_all_overrides() {
    let mut a = endpoint("a", "10.1.0.1", &[(80, 8080)]);
    a.status = WorkloadStatus::Unhealthy;
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![a.clone()],
    );
    let e = route(
        &store.load(),
        &net(),
        None,
        vip(80),
        &mut SmallRng::seed_from_u64(1),
    )
    .unwrap_err();
    assert!(
        matches!(e, RouteError::NoHealthyEndpoint { port: 80, .. }),
        "{e}"
    );

    let lb = LoadBalancing {
        health_policy: HealthPolicy::AllowAll,
        ..Default::default()
    };
    let store = store_with(service(&[(80, 8080)], lb), vec![a]);
    let up = route(
        &store.load(),
        &net(),
        None,
        vip(80),
        &mut SmallRng::seed_from_u64(1),
    )
    .unwrap();
    assert_eq!(up.addr.ip(), ip("10.1.0.1"));
}

#[test]
fn unhealthy_endpoints_are_skipped() {
    let mut bad = endpoint("bad", "10.1.0.2", &[(80, 8080)]);
    bad.status = WorkloadStatus::Unhealthy;
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![endpoint("good", "10.1.0.1", &[(80, 8080)]), bad],
    );
    let h = histogram(&store, None, 200);
    assert_eq!(h.len(), 1);
    assert_eq!(h[&"10.1.0.1:8080".parse().unwrap()], 200);
}

#[test]
fn capacity_weights_the_choice() {
    let mut heavy = endpoint("heavy", "10.1.0.1", &[(80, 8080)]);
    heavy.capacity = 3;
    let light = endpoint("light", "10.1.0.2", &[(80, 8080)]);
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![heavy, light],
    );
    let n = 20_000;
    let h = histogram(&store, None, n);
    let heavy_share = h[&"10.1.0.1:8080".parse().unwrap()] as f64 / n as f64;
    // Expected 0.75; with 20 000 draws the standard deviation is ~0.003.
    assert!(
        (heavy_share - 0.75).abs() < 0.02,
        "heavy share {heavy_share}"
    );
}

#[test]
fn zero_capacity_everywhere_is_uniform() {
    let mut a = endpoint("a", "10.1.0.1", &[(80, 8080)]);
    let mut b = endpoint("b", "10.1.0.2", &[(80, 8080)]);
    a.capacity = 0;
    b.capacity = 0;
    let store = store_with(service(&[(80, 8080)], LoadBalancing::default()), vec![a, b]);
    let h = histogram(&store, None, 10_000);
    let share = h[&"10.1.0.1:8080".parse().unwrap()] as f64 / 10_000.0;
    assert!((share - 0.5).abs() < 0.03, "share {share}");
}

fn located(name: &str, addr: &str, region: &str, zone: &str) -> Workload {
    let mut w = endpoint(name, addr, &[(80, 8080)]);
    w.locality = Locality {
        region: region.into(),
        zone: zone.into(),
        subzone: String::new(),
    };
    w
}

#[test]
fn failover_prefers_the_closest_rank_and_falls_back() {
    let lb = LoadBalancing {
        mode: LoadBalancingMode::Failover,
        routing_preference: vec![RoutingScope::Region, RoutingScope::Zone],
        health_policy: HealthPolicy::OnlyHealthy,
    };
    let client = located("client", "10.9.0.1", "eu", "eu-1");
    let same_zone = located("z", "10.1.0.1", "eu", "eu-1");
    let same_region = located("r", "10.1.0.2", "eu", "eu-2");
    let far = located("f", "10.1.0.3", "us", "us-1");
    let store = store_with(
        service(&[(80, 8080)], lb.clone()),
        vec![same_zone.clone(), same_region.clone(), far.clone()],
    );
    let h = histogram(&store, Some(&client), 300);
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        vec![&"10.1.0.1:8080".parse().unwrap()]
    );

    // Zone endpoint unhealthy: fall back to the region.
    let mut sick = same_zone.clone();
    sick.status = WorkloadStatus::Unhealthy;
    let store = store_with(
        service(&[(80, 8080)], lb.clone()),
        vec![sick, same_region, far.clone()],
    );
    let h = histogram(&store, Some(&client), 300);
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        vec![&"10.1.0.2:8080".parse().unwrap()]
    );

    // Only a far endpoint: failover still uses it.
    let store = store_with(service(&[(80, 8080)], lb), vec![far]);
    let h = histogram(&store, Some(&client), 10);
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        vec![&"10.1.0.3:8080".parse().unwrap()]
    );
}

#[test]
fn strict_keeps_only_full_matches() {
    let lb = LoadBalancing {
        mode: LoadBalancingMode::Strict,
        routing_preference: vec![RoutingScope::Region, RoutingScope::Zone],
        health_policy: HealthPolicy::OnlyHealthy,
    };
    let client = located("client", "10.9.0.1", "eu", "eu-1");
    let same_zone = located("z", "10.1.0.1", "eu", "eu-1");
    let same_region = located("r", "10.1.0.2", "eu", "eu-2");
    let store = store_with(
        service(&[(80, 8080)], lb.clone()),
        vec![same_zone, same_region.clone()],
    );
    let h = histogram(&store, Some(&client), 200);
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        vec![&"10.1.0.1:8080".parse().unwrap()]
    );

    // No full match: no endpoint at all, rather than a silent cross-zone hop.
    let store = store_with(service(&[(80, 8080)], lb.clone()), vec![same_region]);
    let snap = store.load();
    let e = route(
        &snap,
        &net(),
        Some(&client),
        vip(80),
        &mut SmallRng::seed_from_u64(1),
    );
    assert!(matches!(e, Err(RouteError::NoHealthyEndpoint { .. })));
    // Unknown client: nothing matches a strict preference either.
    let e = route(
        &snap,
        &net(),
        None,
        vip(80),
        &mut SmallRng::seed_from_u64(1),
    );
    assert!(matches!(e, Err(RouteError::NoHealthyEndpoint { .. })));
}

#[test]
fn passthrough_mode_keeps_the_original_destination() {
    let lb = LoadBalancing {
        mode: LoadBalancingMode::Passthrough,
        ..Default::default()
    };
    let store = store_with(
        service(&[(80, 8080)], lb),
        vec![endpoint("a", "10.1.0.1", &[(80, 8080)])],
    );
    let up = route(
        &store.load(),
        &net(),
        None,
        vip(80),
        &mut SmallRng::seed_from_u64(1),
    )
    .unwrap();
    assert_eq!(up.addr, vip(80));
    assert_eq!(up.kind, UpstreamKind::Passthrough);
    assert!(up.service.is_some());
}

#[test]
fn node_and_network_scopes_rank() {
    let lb = LoadBalancing {
        mode: LoadBalancingMode::Failover,
        routing_preference: vec![RoutingScope::Network, RoutingScope::Node],
        health_policy: HealthPolicy::OnlyHealthy,
    };
    let mut client = endpoint("client", "10.9.0.1", &[]);
    client.node = "n1".into();
    let mut local = endpoint("local", "10.1.0.1", &[(80, 8080)]);
    local.node = "n1".into();
    let mut remote = endpoint("remote", "10.1.0.2", &[(80, 8080)]);
    remote.node = "n2".into();
    let store = store_with(service(&[(80, 8080)], lb), vec![local, remote]);
    let h = histogram(&store, Some(&client), 100);
    assert_eq!(
        h.keys().collect::<Vec<_>>(),
        vec![&"10.1.0.1:8080".parse().unwrap()]
    );
}

/// A waypoint picks only among the endpoints it can serve: the filter runs before the choice, so
/// every connection lands on a kept endpoint (never a random miss), and none kept is an error.
#[test]
fn service_endpoint_filters_before_choosing() {
    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![
            endpoint("a", "10.0.1.1", &[]),
            endpoint("b", "10.0.1.2", &[]),
            endpoint("c", "10.0.1.3", &[]),
        ],
    );
    let snap = store.load();
    let svc = snap
        .service_by_vip(&NetworkAddr::new(net(), ip("10.0.0.1")), None)
        .unwrap()
        .clone();
    let mut rng = SmallRng::seed_from_u64(7);
    let only_b = |_: &Workload, a: Option<IpAddr>| a == Some(ip("10.0.1.2"));
    for _ in 0..200 {
        let up = service_endpoint(&snap, "", &svc, None, vip(80), &only_b, &mut rng).unwrap();
        assert_eq!(up.addr, SocketAddr::new(ip("10.0.1.2"), 8080));
        assert!(up.service.is_some());
    }
    let none = |_: &Workload, _: Option<IpAddr>| false;
    assert!(matches!(
        service_endpoint(&snap, "", &svc, None, vip(80), &none, &mut rng),
        Err(RouteError::NoHealthyEndpoint { .. })
    ));
}

#[test]
fn an_address_range_never_takes_a_workloads_or_a_vips_traffic() {
    let mut ranged = service(&[(80, 8080)], LoadBalancing::default());
    ranged.name = "ranged".into();
    ranged.hostname = "ranged.example.com".into();
    ranged.vips.clear();
    ranged.cidr_vips = vec![crate::model::NetworkCidr {
        network: "".into(),
        net: "10.0.0.0/8".parse().unwrap(),
    }];
    let store = Store::new();
    store.apply(crate::store::Batch {
        upserts: vec![
            crate::store::Upsert::Service(ranged),
            crate::store::Upsert::Service(service(&[(80, 8080)], LoadBalancing::default())),
            crate::store::Upsert::Workload(endpoint("a", "10.1.0.1", &[(80, 8080)])),
        ],
        ..Default::default()
    });
    let snap = store.load();
    let go = |dst: &str| {
        route(
            &snap,
            &net(),
            None,
            dst.parse().unwrap(),
            &mut SmallRng::seed_from_u64(1),
        )
    };
    // The VIP and the pod keep their own routes.
    assert_eq!(go("10.0.0.1:80").unwrap().service.unwrap().name, "echo");
    let pod = go("10.1.0.1:8080").unwrap();
    assert!(pod.service.is_none());
    assert_eq!(pod.workload.unwrap().name, "a");
    // Anything else in the range is the range's service (which has no endpoint here).
    match go("10.200.0.1:80") {
        Err(RouteError::NoHealthyEndpoint { service, .. }) => {
            assert_eq!(service.hostname(), "ranged.example.com")
        }
        other => panic!("{other:?}"),
    }
}
