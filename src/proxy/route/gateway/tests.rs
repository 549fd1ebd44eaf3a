//! Routing to endpoints on other networks: through the endpoint's gateway (by address or by
//! service hostname, with its port mapping), the errors ztunnel has (no gateway, no service
//! SANs), and "network first" with FAILOVER.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::super::tests::{endpoint, ip, service, store_with, vip, workload};
use super::super::{route, RouteError};
use crate::model::{
    GatewayAddress, GatewayDestination, LoadBalancing, LoadBalancingMode, NetworkAddr,
    RoutingScope, ServiceKey, SpiffeId, Workload, WorkloadStatus,
};
use crate::store::{Batch, Store, Upsert};

const SAN: &str = "spiffe://cluster.local/ns/default/sa/echo";

/// An endpoint of the service on network `net-b`, behind `gw`.
fn remote(name: &str, addr: &str, gw: Option<GatewayDestination>) -> Workload {
    let mut w = endpoint(name, addr, &[(80, 8080)]);
    w.network = "net-b".into();
    w.network_gateway = gw.map(|destination| GatewayAddress {
        destination,
        hbone_mtls_port: 15008,
    });
    w
}

fn gateway_workload() -> Workload {
    let mut w = workload("eastwest", "192.168.9.9");
    w.network = "net-b".into();
    w.namespace = "istio-system".into();
    w.service_account = "eastwest".into();
    w
}

fn by_address() -> GatewayDestination {
    GatewayDestination::Address(NetworkAddr::new("net-b", ip("192.168.9.9")))
}

fn sans(lb: LoadBalancing) -> crate::model::Service {
    let mut s = service(&[(80, 8080)], lb);
    s.subject_alt_names = vec![SAN.into()];
    s
}

fn route_one(store: &Store) -> Result<super::super::Upstream, RouteError> {
    route(
        &store.load(),
        &Arc::from(""),
        None,
        vip(80),
        &mut SmallRng::seed_from_u64(3),
    )
}

#[test]
fn a_remote_endpoint_is_reached_through_its_gateway() {
    let store = store_with(
        sans(LoadBalancing::default()),
        vec![
            remote("far", "10.9.0.5", Some(by_address())),
            gateway_workload(),
        ],
    );
    let up = route_one(&store).unwrap();
    let gw = up.gateway.expect("double HBONE");
    assert_eq!(up.addr, SocketAddr::new(ip("192.168.9.9"), 15008));
    assert_eq!(gw.authority, "echo.default.svc.cluster.local:80");
    assert_eq!(gw.inner, vec![SAN.parse::<SpiffeId>().unwrap()]);
    assert_eq!(
        gw.identities,
        vec![SpiffeId::new("cluster.local", "istio-system", "eastwest")]
    );
    assert_eq!(gw.workload.name, "eastwest");
    assert_eq!(up.workload.unwrap().name, "far");
}

#[test]
fn without_a_gateway_or_service_sans_it_is_an_error() {
    let store = store_with(
        sans(LoadBalancing::default()),
        vec![remote("far", "10.9.0.5", None)],
    );
    let e = route_one(&store).unwrap_err();
    assert!(matches!(e, RouteError::NoNetworkGateway { .. }), "{e}");
    assert!(e.to_string().contains("\"net-b\""), "{e}");

    let store = store_with(
        service(&[(80, 8080)], LoadBalancing::default()),
        vec![
            remote("far", "10.9.0.5", Some(by_address())),
            gateway_workload(),
        ],
    );
    let e = route_one(&store).unwrap_err();
    assert!(matches!(e, RouteError::NoServiceSans { .. }), "{e}");

    // A gateway that is not in the mesh state.
    let store = store_with(
        sans(LoadBalancing::default()),
        vec![remote("far", "10.9.0.5", Some(by_address()))],
    );
    let e = route_one(&store).unwrap_err();
    assert!(matches!(e, RouteError::GatewayUnknown { .. }), "{e}");
}

#[test]
fn a_gateway_service_is_load_balanced_on_its_mapped_port() {
    let gw_key = ServiceKey::parse("istio-system/eastwest.istio-system.svc.cluster.local").unwrap();
    let mut gw_svc = service(&[(15009, 15008)], LoadBalancing::default());
    gw_svc.name = "eastwest".into();
    gw_svc.namespace = "istio-system".into();
    gw_svc.hostname = "eastwest.istio-system.svc.cluster.local".into();
    gw_svc.vips = vec![];
    gw_svc.subject_alt_names =
        vec!["spiffe://cluster.local/ns/istio-system/sa/eastwest-svc".into()];
    let mut gw_wl = gateway_workload();
    gw_wl.services.insert(gw_key.clone(), Default::default());
    let mut far = remote(
        "far",
        "10.9.0.5",
        Some(GatewayDestination::Hostname(gw_key)),
    );
    far.network_gateway.as_mut().unwrap().hbone_mtls_port = 15009;
    // No address of its own: reachable only through the gateway.
    far.addresses.clear();
    let store = Store::new();
    store.apply(Batch {
        upserts: vec![
            Upsert::Service(sans(LoadBalancing::default())),
            Upsert::Service(gw_svc),
            Upsert::Workload(gw_wl),
            Upsert::Workload(far),
        ],
        ..Default::default()
    });
    let up = route_one(&store).unwrap();
    assert_eq!(
        up.addr,
        SocketAddr::new(ip("192.168.9.9"), 15008),
        "15009 maps to 15008"
    );
    let gw = up.gateway.unwrap();
    assert_eq!(
        gw.identities,
        vec![
            SpiffeId::new("cluster.local", "istio-system", "eastwest"),
            SpiffeId::new("cluster.local", "istio-system", "eastwest-svc"),
        ]
    );
}

#[test]
fn network_first_with_failover_and_every_network_alike_in_standard() {
    let failover = LoadBalancing {
        mode: LoadBalancingMode::Failover,
        routing_preference: vec![RoutingScope::Network],
        ..Default::default()
    };
    let near = endpoint("near", "10.0.1.1", &[(80, 8080)]);
    let far = remote("far", "10.9.0.5", Some(by_address()));
    let store = store_with(
        sans(failover.clone()),
        vec![near.clone(), far.clone(), gateway_workload()],
    );
    let client = workload("client", "10.0.2.2");
    let snap = store.load();
    let mut rng = SmallRng::seed_from_u64(11);
    for _ in 0..50 {
        let up = route(&snap, &Arc::from(""), Some(&client), vip(80), &mut rng).unwrap();
        assert!(up.gateway.is_none(), "the local endpoint first");
    }
    // The local endpoint unhealthy: through the gateway.
    let mut sick = near.clone();
    sick.status = WorkloadStatus::Unhealthy;
    let store = store_with(sans(failover), vec![sick, far.clone(), gateway_workload()]);
    let up = route(
        &store.load(),
        &Arc::from(""),
        Some(&client),
        vip(80),
        &mut rng,
    )
    .unwrap();
    assert!(up.gateway.is_some());
    // STANDARD: both networks are candidates.
    let store = store_with(
        sans(LoadBalancing::default()),
        vec![near, far, gateway_workload()],
    );
    let snap = store.load();
    let through = (0..200)
        .filter(|_| {
            route(&snap, &Arc::from(""), Some(&client), vip(80), &mut rng)
                .unwrap()
                .gateway
                .is_some()
        })
        .count();
    assert!(
        (50..150).contains(&through),
        "{through} of 200 through the gateway"
    );
}

#[test]
fn a_waypoint_on_another_network_is_reached_through_its_gateway() {
    let wp_key = ServiceKey::parse("default/wp.default.svc.cluster.local").unwrap();
    let mut svc = sans(LoadBalancing::default());
    svc.waypoint = Some(GatewayAddress {
        destination: GatewayDestination::Hostname(wp_key.clone()),
        hbone_mtls_port: 15008,
    });
    let mut wp_svc = service(&[(15008, 15008)], LoadBalancing::default());
    wp_svc.name = "wp".into();
    wp_svc.hostname = "wp.default.svc.cluster.local".into();
    wp_svc.vips = vec![];
    wp_svc.subject_alt_names = vec!["spiffe://cluster.local/ns/default/sa/wp".into()];
    let mut wp = remote("wp-0", "10.9.0.7", Some(by_address()));
    wp.services.clear();
    wp.services.insert(wp_key, Default::default());
    let store = Store::new();
    store.apply(Batch {
        upserts: vec![
            Upsert::Service(svc),
            Upsert::Service(wp_svc),
            Upsert::Workload(wp),
            Upsert::Workload(gateway_workload()),
            Upsert::Workload(endpoint("near", "10.0.1.1", &[(80, 8080)])),
        ],
        ..Default::default()
    });
    let up = route_one(&store).unwrap();
    let gw = up.gateway.expect("through the gateway");
    assert_eq!(up.addr, SocketAddr::new(ip("192.168.9.9"), 15008));
    // The authority names the service the client dialled; the inner tunnel proves the waypoint.
    assert_eq!(gw.authority, "echo.default.svc.cluster.local:80");
    assert_eq!(
        gw.inner,
        vec!["spiffe://cluster.local/ns/default/sa/wp"
            .parse::<SpiffeId>()
            .unwrap()]
    );
    assert!(up.workload.is_none() && up.waypoint.is_none());
}
