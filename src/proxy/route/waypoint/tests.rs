//! Waypoint routing: a service's waypoint by address and by hostname, a workload's waypoint, the
//! waypoint's own traffic, and a waypoint missing from the mesh state.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::super::{route, RouteError, UpstreamKind};
use super::*;
use crate::model::{LoadBalancing, NetworkAddr, Service, ServiceKey};
use crate::proto::istio::workload as pw;
use crate::store::{Batch, Store, Upsert};

const WP_SVC: &str = "istio-system/waypoint.istio-system.svc.cluster.local";

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn workload(name: &str, addr: &str, sa: &str) -> Workload {
    let p = pw::Workload {
        uid: format!("cluster1//v1/Pod/default/{name}"),
        name: name.into(),
        namespace: "default".into(),
        service_account: sa.into(),
        addresses: vec![match ip(addr) {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        }],
        ..Default::default()
    };
    Workload::try_from(p).unwrap()
}

fn by_addr(addr: &str) -> GatewayAddress {
    GatewayAddress {
        destination: GatewayDestination::Address(NetworkAddr::new("", ip(addr))),
        hbone_mtls_port: 15008,
    }
}

fn by_host() -> GatewayAddress {
    GatewayAddress {
        destination: GatewayDestination::Hostname(ServiceKey::parse(WP_SVC).unwrap()),
        hbone_mtls_port: 15009,
    }
}

fn service(name: &str, vip: &str, waypoint: Option<GatewayAddress>) -> Service {
    Service {
        name: name.into(),
        namespace: "default".into(),
        hostname: format!("{name}.default.svc.cluster.local"),
        vips: vec![NetworkAddr::new("", ip(vip))],
        ports: [(80, 8080)].into_iter().collect::<BTreeMap<_, _>>(),
        subject_alt_names: vec![],
        waypoint,
        load_balancing: LoadBalancing::default(),
        ip_families: crate::model::IpFamilies::Automatic,
        canonical: true,
        visibility: Default::default(),
        cidr_vips: Vec::new(),
        weighted_waypoints: Vec::new(),
    }
}

/// The waypoint workload (10.0.0.9, identity `sa/waypoint`), an endpoint of the waypoint service.
fn waypoint_wl() -> Workload {
    let mut w = workload("waypoint", "10.0.0.9", "waypoint");
    w.services.insert(
        ServiceKey::parse(WP_SVC).unwrap(),
        [(15009, 15009)].into_iter().collect(),
    );
    w
}

fn store(services: Vec<Service>, workloads: Vec<Workload>) -> Store {
    let store = Store::new();
    let mut upserts: Vec<Upsert> = services.into_iter().map(Upsert::Service).collect();
    upserts.extend(workloads.into_iter().map(Upsert::Workload));
    store.apply(Batch {
        upserts,
        ..Default::default()
    });
    store
}

fn wp_service() -> Service {
    let mut s = service("waypoint", "10.0.0.99", None);
    s.namespace = "istio-system".into();
    s.hostname = "waypoint.istio-system.svc.cluster.local".into();
    s
}

/// The echo service (VIP 10.0.0.1) with endpoint `a` (10.1.0.1).
fn echo_endpoint() -> Workload {
    let mut a = workload("a", "10.1.0.1", "echo");
    a.services.insert(
        ServiceKey::parse("default/echo.default.svc.cluster.local").unwrap(),
        BTreeMap::new(),
    );
    a
}

fn go(
    store: &Store,
    src: Option<&Workload>,
    dst: &str,
) -> Result<super::super::Upstream, RouteError> {
    let dst: SocketAddr = dst.parse().unwrap();
    route(
        &store.load(),
        &Arc::from(""),
        src,
        dst,
        &mut SmallRng::seed_from_u64(1),
    )
}

#[test]
fn service_waypoint_by_address_keeps_the_vip_as_authority() {
    let s = store(
        vec![service("echo", "10.0.0.1", Some(by_addr("10.0.0.9")))],
        vec![echo_endpoint(), waypoint_wl()],
    );
    let up = go(&s, None, "10.0.0.1:80").unwrap();
    assert_eq!(up.kind, UpstreamKind::Hbone);
    assert_eq!(up.addr, "10.0.0.1:80".parse().unwrap());
    let wp = up.waypoint.unwrap();
    assert_eq!(wp.addr, "10.0.0.9:15008".parse().unwrap());
    assert_eq!(wp.workload.name, "waypoint");
    assert!(up.service.is_some());
    assert!(
        up.workload.is_none(),
        "no endpoint is chosen: the waypoint does that"
    );
}

#[test]
fn service_waypoint_by_hostname_picks_an_endpoint_of_the_waypoint_service() {
    let s = store(
        vec![service("echo", "10.0.0.1", Some(by_host())), wp_service()],
        vec![echo_endpoint(), waypoint_wl()],
    );
    let up = go(&s, None, "10.0.0.1:80").unwrap();
    let wp = up.waypoint.unwrap();
    assert_eq!(wp.addr, "10.0.0.9:15009".parse().unwrap());
    assert_eq!(
        wp.workload.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/waypoint"
    );
}

#[test]
fn workload_waypoint_applies_to_its_own_address() {
    let mut dst = workload("b", "10.1.0.2", "b");
    dst.waypoint = Some(by_addr("10.0.0.9"));
    let s = store(vec![], vec![dst, waypoint_wl()]);
    let up = go(&s, None, "10.1.0.2:8080").unwrap();
    assert_eq!(up.addr, "10.1.0.2:8080".parse().unwrap());
    assert_eq!(up.kind, UpstreamKind::Hbone);
    assert_eq!(up.workload.unwrap().name, "b");
    assert_eq!(up.waypoint.unwrap().addr, "10.0.0.9:15008".parse().unwrap());
}

#[test]
fn the_waypoint_itself_goes_straight_to_the_destination() {
    let mut dst = workload("b", "10.1.0.2", "b");
    dst.waypoint = Some(by_addr("10.0.0.9"));
    let wp = waypoint_wl();
    let s = store(vec![], vec![dst, wp.clone()]);
    let up = go(&s, Some(&wp), "10.1.0.2:8080").unwrap();
    assert!(up.waypoint.is_none());
    assert_eq!(up.kind, UpstreamKind::Tcp);
}

#[test]
fn missing_waypoint_is_a_clear_error() {
    let mut dst = workload("b", "10.1.0.2", "b");
    dst.waypoint = Some(by_addr("10.0.0.9"));
    let s = store(vec![], vec![dst]);
    let e = go(&s, None, "10.1.0.2:8080").unwrap_err();
    assert_eq!(
        e,
        RouteError::WaypointUnknown {
            owner: "workload default/b".into(),
            waypoint: "/10.0.0.9".into(),
        }
    );
    assert!(e.to_string().contains("is the waypoint deployed"), "{e}");
    // A hostname waypoint whose service is gone, or has no endpoint.
    let s = store(
        vec![service("echo", "10.0.0.1", Some(by_host()))],
        vec![echo_endpoint()],
    );
    let e = go(&s, None, "10.0.0.1:80").unwrap_err();
    assert!(matches!(e, RouteError::WaypointUnknown { .. }), "{e}");
    let s = store(
        vec![service("echo", "10.0.0.1", Some(by_host())), wp_service()],
        vec![echo_endpoint()],
    );
    let e = go(&s, None, "10.0.0.1:80").unwrap_err();
    assert!(matches!(e, RouteError::WaypointNoEndpoint { .. }), "{e}");
}

#[test]
fn waypoint_identities_and_membership() {
    let wp = waypoint_wl();
    let other = workload("c", "10.1.0.3", "c");
    let s = store(vec![wp_service()], vec![wp.clone(), other.clone()]);
    let snap = s.load();
    for gw in [by_addr("10.0.0.9"), by_host()] {
        assert_eq!(identities(&snap, &gw), vec![wp.identity()]);
        assert!(is_waypoint(&snap, &gw, &wp));
        assert!(!is_waypoint(&snap, &gw, &other));
    }
    assert!(identities(&snap, &by_addr("10.9.9.9")).is_empty());
}

/// Weighted waypoints by address.
fn weighted(list: &[(&str, u32)]) -> Vec<crate::model::WeightedWaypoint> {
    list.iter()
        .map(|(addr, weight)| crate::model::WeightedWaypoint {
            gateway: by_addr(addr),
            weight: *weight,
        })
        .collect()
}

#[test]
fn weighted_waypoints_share_a_service_by_weight() {
    let mut svc = service("echo", "10.0.0.1", Some(by_addr("10.0.0.7")));
    svc.weighted_waypoints = weighted(&[("10.0.0.9", 1), ("10.0.0.8", 3)]);
    let canary = workload("canary", "10.0.0.8", "waypoint");
    let s = store(vec![svc], vec![echo_endpoint(), waypoint_wl(), canary]);
    let snap = s.load();
    let mut rng = SmallRng::seed_from_u64(9);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..4000 {
        let up = route(
            &snap,
            &Arc::from(""),
            None,
            "10.0.0.1:80".parse().unwrap(),
            &mut rng,
        )
        .unwrap();
        *counts
            .entry(up.waypoint.unwrap().workload.name.clone())
            .or_insert(0u32) += 1;
    }
    // About 1 : 3; the single `waypoint` field is not used while weighted ones are set.
    let (stable, canary) = (counts["waypoint"], counts["canary"]);
    assert_eq!(stable + canary, 4000, "{counts:?}");
    assert!((800..1200).contains(&stable), "{counts:?}");
    // All weights 0: any of them.
    let mut svc = service("zero", "10.0.0.2", None);
    svc.weighted_waypoints = weighted(&[("10.0.0.9", 0), ("10.0.0.8", 0)]);
    let seen: std::collections::HashSet<_> = (0..200)
        .map(|_| super::super::pick_waypoint(&svc, &mut rng).unwrap().clone())
        .map(|g| format!("{g:?}"))
        .collect();
    assert_eq!(seen.len(), 2);
    assert_eq!(svc.waypoints().count(), 2);
}

#[test]
fn a_weighted_waypoints_own_traffic_is_not_sent_to_another() {
    let mut svc = service("echo", "10.0.0.1", None);
    svc.weighted_waypoints = weighted(&[("10.0.0.9", 1), ("10.0.0.8", 1)]);
    let canary = workload("canary", "10.0.0.8", "waypoint");
    let s = store(
        vec![svc],
        vec![echo_endpoint(), waypoint_wl(), canary.clone()],
    );
    let snap = s.load();
    let mut rng = SmallRng::seed_from_u64(3);
    // From either waypoint: straight to the endpoint, never through the other waypoint.
    for _ in 0..100 {
        for from in [&canary, &waypoint_wl()] {
            let up = route(
                &snap,
                &Arc::from(""),
                Some(from),
                "10.0.0.1:80".parse().unwrap(),
                &mut rng,
            )
            .unwrap();
            assert!(up.waypoint.is_none(), "{} → {:?}", from.name, up.waypoint);
            assert_eq!(up.workload.unwrap().name, "a");
        }
    }
}
