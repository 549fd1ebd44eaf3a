//! Conversion from the wire messages into the model: the values that land, the defaults, and a typed
//! error (kind, resource name, field path) for every class of bad input. Nothing may panic.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use prost::Message;

use super::*;
use crate::proto::istio::security as psec;
use crate::proto::istio::workload as pw;

const UID: &str = "cluster1//v1/Pod/default/client";
const SVC_KEY: &str = "default/echo.default.svc.cluster.local";
const POLICY_NAME: &str = "default/allow-client";

// ---------------------------------------------------------------------------------------------
// Builders of valid wire messages
// ---------------------------------------------------------------------------------------------

fn v6(s: &str) -> Vec<u8> {
    s.parse::<Ipv6Addr>().unwrap().octets().to_vec()
}

fn port(service_port: u32, target_port: u32) -> pw::Port {
    pw::Port {
        service_port,
        target_port,
        app_protocol: 0,
    }
}

fn port_list(ports: Vec<pw::Port>) -> pw::PortList {
    pw::PortList { ports }
}

fn wp_address(ip: Vec<u8>) -> pw::GatewayAddress {
    pw::GatewayAddress {
        destination: Some(pw::gateway_address::Destination::Address(
            pw::NetworkAddress {
                network: String::new(),
                address: ip,
                length: None,
            },
        )),
        hbone_mtls_port: 0,
    }
}

fn wp_hostname(namespace: &str, hostname: &str, port: u32) -> pw::GatewayAddress {
    pw::GatewayAddress {
        destination: Some(pw::gateway_address::Destination::Hostname(
            pw::NamespacedHostname {
                namespace: namespace.into(),
                hostname: hostname.into(),
            },
        )),
        hbone_mtls_port: port,
    }
}

/// A valid workload: two addresses (v4, v6), HBONE, one service, a waypoint by address, defaults
/// left empty.
fn valid_workload() -> pw::Workload {
    pw::Workload {
        uid: UID.into(),
        name: "client".into(),
        namespace: "default".into(),
        addresses: vec![vec![10, 0, 0, 1], v6("fd00::1")],
        tunnel_protocol: pw::TunnelProtocol::Hbone as i32,
        node: "node-a".into(),
        waypoint: Some(wp_address(vec![10, 0, 0, 9])),
        services: HashMap::from([(
            SVC_KEY.to_owned(),
            port_list(vec![port(80, 8080), port(443, 0)]),
        )]),
        authorization_policies: vec!["default/selected".into()],
        cluster_id: "cluster1".into(),
        ..Default::default()
    }
}

fn net_addr(network: &str, ip: Vec<u8>, length: Option<u32>) -> pw::NetworkAddress {
    pw::NetworkAddress {
        network: network.into(),
        address: ip,
        length,
    }
}

/// A valid service: a v4 VIP on the default network, a v6 VIP on `net2`, two ports.
fn valid_service() -> pw::Service {
    pw::Service {
        name: "echo".into(),
        namespace: "default".into(),
        hostname: "echo.default.svc.cluster.local".into(),
        addresses: vec![
            net_addr("", vec![10, 96, 0, 1], None),
            net_addr("net2", v6("fd10::1"), Some(128)),
        ],
        ports: vec![port(80, 8080), port(9090, 0)],
        subject_alt_names: vec!["spiffe://cluster.local/ns/default/sa/echo".into()],
        ..Default::default()
    }
}

fn exact(s: &str) -> psec::StringMatch {
    psec::StringMatch {
        match_type: Some(psec::string_match::MatchType::Exact(s.into())),
    }
}

fn sec_addr(address: Vec<u8>, length: u32) -> psec::Address {
    psec::Address { address, length }
}

fn rule(clauses: Vec<Vec<psec::Match>>) -> psec::Rule {
    psec::Rule {
        clauses: clauses
            .into_iter()
            .map(|matches| psec::Clause { matches })
            .collect(),
    }
}

/// A valid namespace-scoped ALLOW policy with one rule, one clause, one match.
fn valid_policy() -> psec::Authorization {
    psec::Authorization {
        name: "allow-client".into(),
        namespace: "default".into(),
        scope: psec::Scope::Namespace as i32,
        action: psec::Action::Allow as i32,
        rules: vec![rule(vec![vec![psec::Match {
            namespaces: vec![exact("default")],
            destination_ports: vec![8080],
            ..Default::default()
        }]])],
        ..Default::default()
    }
}

/// A policy whose only match is `m`, at `rules[0].clauses[0].matches[0]`.
fn policy_with_match(m: psec::Match) -> psec::Authorization {
    psec::Authorization {
        rules: vec![rule(vec![vec![m]])],
        ..valid_policy()
    }
}

const M0: &str = "rules[0].clauses[0].matches[0]";

// ---------------------------------------------------------------------------------------------
// Error assertion helper
// ---------------------------------------------------------------------------------------------

/// Asserts that `r` is a `ValidationError` of this kind, resource name and field, and that its text
/// names both the resource and the field.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(
    r: Result<T, ValidationError>,
    kind: ResourceKind,
    name: &str,
    field: &str,
) -> ValidationError {
    let e = match r {
        Ok(v) => panic!("expected an error on `{field}`, converted to {v:?}"),
        Err(e) => e,
    };
    assert_eq!(e.kind, kind, "{e}");
    assert_eq!(e.name, name, "{e}");
    assert_eq!(e.field, field, "{e}");
    assert!(!e.reason.is_empty(), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(name), "{text:?} does not name {name:?}");
    assert!(text.contains(field), "{text:?} does not name {field:?}");
    e
}

fn workload_err(w: pw::Workload, field: &str) -> ValidationError {
    assert_invalid(Workload::try_from(w), ResourceKind::Workload, UID, field)
}

fn service_err(s: pw::Service, field: &str) -> ValidationError {
    assert_invalid(Service::try_from(s), ResourceKind::Service, SVC_KEY, field)
}

fn policy_err(p: psec::Authorization, field: &str) -> ValidationError {
    assert_invalid(
        Authorization::try_from(p),
        ResourceKind::Authorization,
        POLICY_NAME,
        field,
    )
}

// ---------------------------------------------------------------------------------------------
// Workloads: good input
// ---------------------------------------------------------------------------------------------

#[test]
fn workload_fields_land_and_defaults_apply() {
    let w = Workload::try_from(valid_workload()).unwrap();
    assert_eq!(w.uid, WorkloadUid(UID.into()));
    assert_eq!(w.name, "client");
    assert_eq!(w.namespace, "default");
    assert_eq!(
        w.addresses,
        vec![
            IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
            IpAddr::V6("fd00::1".parse().unwrap()),
        ]
    );
    assert_eq!(&*w.network, "");
    assert_eq!(w.protocol, TunnelProtocol::Hbone);
    // Defaults.
    assert_eq!(w.service_account, "default");
    assert_eq!(w.trust_domain, "cluster.local");
    assert_eq!(w.capacity, 1);
    assert_eq!(w.status, WorkloadStatus::Healthy);
    assert_eq!(w.workload_type, WorkloadType::Deployment);
    assert!(!w.host_network);
    assert_eq!(w.application_tunnel, None);
    assert_eq!(w.network_gateway, None);
    assert_eq!(w.locality, Locality::default());
    // The waypoint's HBONE port 0 means the standard 15008.
    assert_eq!(
        w.waypoint,
        Some(GatewayAddress {
            destination: GatewayDestination::Address(NetworkAddr::new(
                "",
                IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9))
            )),
            hbone_mtls_port: 15008,
        })
    );
    // services map → PortMap, target 0 kept as "not mapped here".
    let key = ServiceKey::parse(SVC_KEY).unwrap();
    assert_eq!(w.services.len(), 1);
    assert_eq!(w.services[&key], PortMap::from([(80, 8080), (443, 0)]));
    assert_eq!(
        w.authorization_policies,
        vec!["default/selected".to_owned()]
    );
    assert_eq!(w.node, "node-a");
    assert_eq!(w.cluster_id, "cluster1");
    assert_eq!(
        w.identity().to_string(),
        "spiffe://cluster.local/ns/default/sa/default"
    );
    assert_eq!(
        w.network_addrs().collect::<Vec<_>>(),
        vec![
            NetworkAddr::new("", IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1))),
            NetworkAddr::new("", "fd00::1".parse().unwrap()),
        ]
    );
}

#[test]
fn workload_explicit_values_override_defaults() {
    let w = Workload::try_from(pw::Workload {
        service_account: "client-sa".into(),
        trust_domain: "example.org".into(),
        capacity: Some(7),
        network: "net1".into(),
        tunnel_protocol: pw::TunnelProtocol::LegacyIstioMtls as i32,
        status: pw::WorkloadStatus::Unhealthy as i32,
        workload_type: pw::WorkloadType::Pod as i32,
        network_mode: pw::NetworkMode::HostNetwork as i32,
        waypoint: Some(wp_hostname(
            "istio-system",
            "waypoint.istio-system.svc.cluster.local",
            15009,
        )),
        network_gateway: Some(pw::GatewayAddress {
            hbone_mtls_port: 15443,
            ..wp_address(v6("fd00::99"))
        }),
        application_tunnel: Some(pw::ApplicationTunnel {
            protocol: pw::application_tunnel::Protocol::Proxy as i32,
            port: 15088,
        }),
        locality: Some(pw::Locality {
            region: "r1".into(),
            zone: "z1".into(),
            subzone: "s1".into(),
        }),
        ..valid_workload()
    })
    .unwrap();
    assert_eq!(w.service_account, "client-sa");
    assert_eq!(w.trust_domain, "example.org");
    assert_eq!(w.capacity, 7);
    assert_eq!(&*w.network, "net1");
    assert_eq!(w.protocol, TunnelProtocol::LegacyIstioMtls);
    assert_eq!(w.status, WorkloadStatus::Unhealthy);
    assert_eq!(w.workload_type, WorkloadType::Pod);
    assert!(w.host_network);
    assert_eq!(
        w.waypoint,
        Some(GatewayAddress {
            destination: GatewayDestination::Hostname(ServiceKey::from_parts(
                "istio-system",
                "waypoint.istio-system.svc.cluster.local"
            )),
            hbone_mtls_port: 15009,
        })
    );
    assert_eq!(
        w.network_gateway,
        Some(GatewayAddress {
            destination: GatewayDestination::Address(NetworkAddr::new(
                "",
                "fd00::99".parse().unwrap()
            )),
            hbone_mtls_port: 15443,
        })
    );
    assert_eq!(
        w.application_tunnel,
        Some(AppTunnel {
            proxy_protocol: true,
            port: Some(15088),
        })
    );
    assert_eq!(
        w.locality,
        Locality {
            region: "r1".into(),
            zone: "z1".into(),
            subzone: "s1".into(),
        }
    );
    assert_eq!(
        w.identity().to_string(),
        "spiffe://example.org/ns/default/sa/client-sa"
    );
    // The addresses are on the workload's network.
    assert!(w.network_addrs().all(|a| &*a.network == "net1"));
}

#[test]
fn workload_tcp_without_addresses_or_services_is_valid() {
    let w = Workload::try_from(pw::Workload {
        addresses: vec![],
        services: HashMap::new(),
        tunnel_protocol: pw::TunnelProtocol::None as i32,
        waypoint: None,
        application_tunnel: Some(pw::ApplicationTunnel {
            protocol: 0,
            port: 0,
        }),
        ..valid_workload()
    })
    .unwrap();
    assert_eq!(w.protocol, TunnelProtocol::Tcp);
    assert!(w.addresses.is_empty());
    assert!(w.services.is_empty());
    assert_eq!(w.waypoint, None);
    // Port 0 of the application tunnel means "the connection's own port".
    assert_eq!(
        w.application_tunnel,
        Some(AppTunnel {
            proxy_protocol: false,
            port: None,
        })
    );
}

#[test]
fn address_wraps_workload_and_service() {
    let a = pw::Address {
        r#type: Some(pw::address::Type::Workload(valid_workload())),
    };
    match Resource::try_from(a).unwrap() {
        Resource::Workload(w) => assert_eq!(&*w.uid.0, UID),
        other => panic!("expected a workload, found {other:?}"),
    }
    let a = pw::Address {
        r#type: Some(pw::address::Type::Service(valid_service())),
    };
    match Resource::try_from(a).unwrap() {
        Resource::Service(s) => assert_eq!(s.key().to_string(), SVC_KEY),
        other => panic!("expected a service, found {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Workloads: bad input
// ---------------------------------------------------------------------------------------------

#[test]
fn workload_address_of_wrong_length_names_its_index() {
    for bad in [
        vec![],
        vec![1, 2, 3],
        vec![1, 2, 3, 4, 5],
        vec![0; 15],
        vec![0; 17],
    ] {
        let n = bad.len();
        let e = workload_err(
            pw::Workload {
                addresses: vec![vec![10, 0, 0, 1], bad],
                ..valid_workload()
            },
            "addresses[1]",
        );
        assert!(e.reason.contains(&format!("{n} bytes")), "{e}");
    }
    // The first bad address is the one reported.
    workload_err(
        pw::Workload {
            addresses: vec![vec![1, 2, 3, 4, 5], vec![1]],
            ..valid_workload()
        },
        "addresses[0]",
    );
}

#[test]
fn workload_display_names_uid_and_field() {
    let e = Workload::try_from(pw::Workload {
        addresses: vec![vec![1, 2, 3, 4, 5]],
        ..valid_workload()
    })
    .unwrap_err();
    let text = e.to_string();
    assert!(text.contains(UID), "{text}");
    assert!(text.contains("addresses[0]"), "{text}");
    assert!(text.starts_with("workload "), "{text}");
    assert!(text.contains("5 bytes"), "{text}");
}

#[test]
fn workload_unknown_enums_are_rejected() {
    let e = workload_err(
        pw::Workload {
            tunnel_protocol: 7,
            ..valid_workload()
        },
        "tunnel_protocol",
    );
    assert!(e.reason.contains('7'), "{e}");
    let e = workload_err(
        pw::Workload {
            status: 9,
            ..valid_workload()
        },
        "status",
    );
    assert!(e.reason.contains('9'), "{e}");
    workload_err(
        pw::Workload {
            tunnel_protocol: -1,
            ..valid_workload()
        },
        "tunnel_protocol",
    );
    workload_err(
        pw::Workload {
            workload_type: 4,
            ..valid_workload()
        },
        "workload_type",
    );
    workload_err(
        pw::Workload {
            network_mode: 2,
            ..valid_workload()
        },
        "network_mode",
    );
    workload_err(
        pw::Workload {
            application_tunnel: Some(pw::ApplicationTunnel {
                protocol: 2,
                port: 0,
            }),
            ..valid_workload()
        },
        "application_tunnel.protocol",
    );
}

#[test]
fn workload_service_ports_out_of_range_are_rejected() {
    let with_ports = |ports| pw::Workload {
        services: HashMap::from([(SVC_KEY.to_owned(), port_list(ports))]),
        ..valid_workload()
    };
    let f = format!("services[{SVC_KEY:?}]");
    let e = workload_err(
        with_ports(vec![port(0, 8080)]),
        &format!("{f}.ports[0].service_port"),
    );
    assert!(e.reason.contains("found 0"), "{e}");
    let e = workload_err(
        with_ports(vec![port(80, 8080), port(65536, 8080)]),
        &format!("{f}.ports[1].service_port"),
    );
    assert!(e.reason.contains("65536"), "{e}");
    workload_err(
        with_ports(vec![port(80, 70000)]),
        &format!("{f}.ports[0].target_port"),
    );
    workload_err(
        with_ports(vec![port(u32::MAX, 1)]),
        &format!("{f}.ports[0].service_port"),
    );
    // The edges are valid: 65535 both sides, and a target of 0.
    let w = Workload::try_from(with_ports(vec![port(65535, 65535), port(1, 0)])).unwrap();
    assert_eq!(
        w.services[&ServiceKey::parse(SVC_KEY).unwrap()],
        PortMap::from([(65535, 65535), (1, 0)])
    );
}

#[test]
fn workload_bad_service_keys_are_rejected() {
    for key in ["noslash", "/host", "ns/", "/", "", "ns/a/b", "ns/ho st"] {
        let e = workload_err(
            pw::Workload {
                services: HashMap::from([(key.to_owned(), port_list(vec![port(80, 80)]))]),
                ..valid_workload()
            },
            &format!("services[{key:?}]"),
        );
        assert!(e.reason.contains("<namespace>/<hostname>"), "{e}");
    }
}

#[test]
fn service_address_ranges_are_kept_apart_from_exact_vips() {
    let addr = |ip: [u8; 4], length| pw::NetworkAddress {
        network: String::new(),
        address: ip.to_vec(),
        length,
    };
    let s = Service::try_from(pw::Service {
        addresses: vec![
            addr([10, 0, 0, 1], None),
            addr([10, 0, 0, 2], Some(32)),
            addr([10, 1, 2, 3], Some(16)),
        ],
        ..valid_service()
    })
    .unwrap();
    assert_eq!(s.vips.len(), 2);
    assert_eq!(s.cidr_vips.len(), 1);
    // The range's host bits are cleared.
    assert_eq!(s.cidr_vips[0].net.to_string(), "10.1.0.0/16");
}

#[test]
fn workload_hostname_must_be_a_dns_name() {
    for bad in ["bad name.example", "a..b", &"x".repeat(300)] {
        workload_err(
            pw::Workload {
                addresses: vec![],
                hostname: bad.to_owned(),
                ..valid_workload()
            },
            "hostname",
        );
    }
    let w = Workload::try_from(pw::Workload {
        addresses: vec![],
        hostname: "db.example.com".into(),
        ..valid_workload()
    })
    .unwrap();
    assert_eq!(
        (w.hostname.as_str(), w.addresses.len()),
        ("db.example.com", 0)
    );
}

#[test]
fn workload_missing_identity_fields_are_rejected() {
    // Without a uid, the error names the workload by its name.
    assert_invalid(
        Workload::try_from(pw::Workload {
            uid: String::new(),
            ..valid_workload()
        }),
        ResourceKind::Workload,
        "client",
        "uid",
    );
    workload_err(
        pw::Workload {
            name: String::new(),
            ..valid_workload()
        },
        "name",
    );
    workload_err(
        pw::Workload {
            namespace: String::new(),
            ..valid_workload()
        },
        "namespace",
    );
}

#[test]
fn workload_bad_gateways_are_rejected() {
    workload_err(
        pw::Workload {
            waypoint: Some(pw::GatewayAddress {
                destination: None,
                hbone_mtls_port: 15008,
            }),
            ..valid_workload()
        },
        "waypoint",
    );
    workload_err(
        pw::Workload {
            waypoint: Some(wp_address(vec![10, 0, 0])),
            ..valid_workload()
        },
        "waypoint.address.address",
    );
    workload_err(
        pw::Workload {
            waypoint: Some(pw::GatewayAddress {
                hbone_mtls_port: 65536,
                ..wp_address(vec![10, 0, 0, 9])
            }),
            ..valid_workload()
        },
        "waypoint.hbone_mtls_port",
    );
    workload_err(
        pw::Workload {
            network_gateway: Some(wp_hostname("", "gw.example.com", 0)),
            ..valid_workload()
        },
        "network_gateway.hostname",
    );
    workload_err(
        pw::Workload {
            application_tunnel: Some(pw::ApplicationTunnel {
                protocol: 1,
                port: 65536,
            }),
            ..valid_workload()
        },
        "application_tunnel.port",
    );
}

// ---------------------------------------------------------------------------------------------
// Services
// ---------------------------------------------------------------------------------------------

#[test]
fn service_fields_land() {
    let s = Service::try_from(valid_service()).unwrap();
    assert_eq!(s.name, "echo");
    assert_eq!(s.namespace, "default");
    assert_eq!(s.hostname, "echo.default.svc.cluster.local");
    assert_eq!(s.key(), ServiceKey::parse(SVC_KEY).unwrap());
    assert_eq!(
        s.vips,
        vec![
            NetworkAddr::new("", IpAddr::V4(Ipv4Addr::new(10, 96, 0, 1))),
            NetworkAddr::new("net2", "fd10::1".parse().unwrap()),
        ]
    );
    assert_eq!(s.ports, BTreeMap::from([(80, 8080), (9090, 0)]));
    assert_eq!(
        s.subject_alt_names,
        vec!["spiffe://cluster.local/ns/default/sa/echo".to_owned()]
    );
    assert_eq!(s.waypoint, None);
    assert_eq!(s.load_balancing, LoadBalancing::default());
    assert_eq!(s.load_balancing.mode, LoadBalancingMode::Standard);
    assert_eq!(s.ip_families, IpFamilies::Automatic);
    assert!(!s.canonical);
}

#[test]
fn service_load_balancing_waypoint_and_families_land() {
    use pw::load_balancing as plb;
    let s = Service::try_from(pw::Service {
        load_balancing: Some(pw::LoadBalancing {
            routing_preference: vec![
                plb::Scope::Region as i32,
                plb::Scope::Zone as i32,
                plb::Scope::Subzone as i32,
                plb::Scope::Node as i32,
                plb::Scope::Cluster as i32,
                plb::Scope::Network as i32,
            ],
            mode: plb::Mode::Failover as i32,
            health_policy: plb::HealthPolicy::AllowAll as i32,
        }),
        ip_families: pw::IpFamilies::Dual as i32,
        waypoint: Some(wp_hostname(
            "default",
            "waypoint.default.svc.cluster.local",
            0,
        )),
        canonical: true,
        visibility: pw::service::Visibility::Namespace as i32,
        ..valid_service()
    })
    .unwrap();
    assert_eq!(s.visibility, Visibility::Namespace);
    assert_eq!(
        s.load_balancing,
        LoadBalancing {
            mode: LoadBalancingMode::Failover,
            routing_preference: vec![
                RoutingScope::Region,
                RoutingScope::Zone,
                RoutingScope::Subzone,
                RoutingScope::Node,
                RoutingScope::Cluster,
                RoutingScope::Network,
            ],
            health_policy: HealthPolicy::AllowAll,
        }
    );
    assert_eq!(s.ip_families, IpFamilies::Dual);
    assert!(s.canonical);
    assert_eq!(
        s.waypoint,
        Some(GatewayAddress {
            destination: GatewayDestination::Hostname(ServiceKey::from_parts(
                "default",
                "waypoint.default.svc.cluster.local"
            )),
            hbone_mtls_port: 15008,
        })
    );
    for (mode, want) in [
        (plb::Mode::UnspecifiedMode, LoadBalancingMode::Standard),
        (plb::Mode::Strict, LoadBalancingMode::Strict),
        (plb::Mode::Passthrough, LoadBalancingMode::Passthrough),
    ] {
        let s = Service::try_from(pw::Service {
            load_balancing: Some(pw::LoadBalancing {
                mode: mode as i32,
                ..Default::default()
            }),
            ..valid_service()
        })
        .unwrap();
        assert_eq!(s.load_balancing.mode, want);
        assert_eq!(s.load_balancing.health_policy, HealthPolicy::OnlyHealthy);
    }
}

#[test]
fn service_unknown_load_balancing_values_are_rejected() {
    let with_lb = |lb| pw::Service {
        load_balancing: Some(lb),
        ..valid_service()
    };
    let e = service_err(
        with_lb(pw::LoadBalancing {
            mode: 9,
            ..Default::default()
        }),
        "load_balancing.mode",
    );
    assert!(e.reason.contains('9'), "{e}");
    // UNSPECIFIED_SCOPE (0) is not a usable preference; 42 is unknown.
    service_err(
        with_lb(pw::LoadBalancing {
            routing_preference: vec![0],
            ..Default::default()
        }),
        "load_balancing.routing_preference[0]",
    );
    let e = service_err(
        with_lb(pw::LoadBalancing {
            routing_preference: vec![1, 42],
            ..Default::default()
        }),
        "load_balancing.routing_preference[1]",
    );
    assert!(e.reason.contains("42"), "{e}");
    service_err(
        with_lb(pw::LoadBalancing {
            health_policy: 2,
            ..Default::default()
        }),
        "load_balancing.health_policy",
    );
}

#[test]
fn service_other_unknown_enums_are_rejected() {
    service_err(
        pw::Service {
            ip_families: 4,
            ..valid_service()
        },
        "ip_families",
    );
    service_err(
        pw::Service {
            visibility: 2,
            ..valid_service()
        },
        "visibility",
    );
    service_err(
        pw::Service {
            ports: vec![
                port(80, 8080),
                pw::Port {
                    app_protocol: 6,
                    ..port(81, 8081)
                },
            ],
            ..valid_service()
        },
        "ports[1].app_protocol",
    );
}

#[test]
fn service_address_prefix_longer_than_address_is_rejected() {
    let e = service_err(
        pw::Service {
            addresses: vec![net_addr("", vec![10, 96, 0, 1], Some(33))],
            ..valid_service()
        },
        "addresses[0].length",
    );
    assert!(e.reason.contains("33"), "{e}");
    let e = service_err(
        pw::Service {
            addresses: vec![
                net_addr("", vec![10, 96, 0, 1], Some(32)),
                net_addr("", v6("fd10::1"), Some(129)),
            ],
            ..valid_service()
        },
        "addresses[1].length",
    );
    assert!(e.reason.contains("129"), "{e}");
    // A huge length does not wrap around into a valid u8.
    service_err(
        pw::Service {
            addresses: vec![net_addr("", vec![10, 96, 0, 1], Some(256 + 8))],
            ..valid_service()
        },
        "addresses[0].length",
    );
    // The longest valid lengths pass.
    let s = Service::try_from(pw::Service {
        addresses: vec![
            net_addr("", vec![10, 96, 0, 1], Some(32)),
            net_addr("", v6("fd10::1"), Some(128)),
        ],
        ..valid_service()
    })
    .unwrap();
    assert_eq!(s.vips.len(), 2);
}

#[test]
fn service_bad_address_bytes_are_rejected() {
    service_err(
        pw::Service {
            addresses: vec![
                net_addr("", vec![10, 96, 0, 1], None),
                net_addr("", vec![1, 2, 3, 4, 5], None),
            ],
            ..valid_service()
        },
        "addresses[1].address",
    );
}

#[test]
fn service_ports_out_of_range_are_rejected() {
    let e = service_err(
        pw::Service {
            ports: vec![port(0, 8080)],
            ..valid_service()
        },
        "ports[0].service_port",
    );
    assert!(e.reason.contains("found 0"), "{e}");
    service_err(
        pw::Service {
            ports: vec![port(80, 8080), port(65536, 80)],
            ..valid_service()
        },
        "ports[1].service_port",
    );
    service_err(
        pw::Service {
            ports: vec![port(80, 100_000)],
            ..valid_service()
        },
        "ports[0].target_port",
    );
}

#[test]
fn service_bad_names_are_rejected() {
    assert_invalid(
        Service::try_from(pw::Service {
            name: String::new(),
            ..valid_service()
        }),
        ResourceKind::Service,
        SVC_KEY,
        "name",
    );
    assert_invalid(
        Service::try_from(pw::Service {
            namespace: String::new(),
            ..valid_service()
        }),
        ResourceKind::Service,
        "/echo.default.svc.cluster.local",
        "namespace",
    );
    assert_invalid(
        Service::try_from(pw::Service {
            hostname: String::new(),
            ..valid_service()
        }),
        ResourceKind::Service,
        "default/",
        "hostname",
    );
    assert_invalid(
        Service::try_from(pw::Service {
            hostname: "echo/x".into(),
            ..valid_service()
        }),
        ResourceKind::Service,
        "default/echo/x",
        "namespace/hostname",
    );
}

#[test]
fn service_display_names_key_and_field() {
    let e = Service::try_from(pw::Service {
        ports: vec![port(0, 1)],
        ..valid_service()
    })
    .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("service "), "{text}");
    assert!(text.contains(SVC_KEY), "{text}");
    assert!(text.contains("ports[0].service_port"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Addresses
// ---------------------------------------------------------------------------------------------

#[test]
fn address_with_neither_type_is_rejected() {
    let e = assert_invalid(
        Resource::try_from(pw::Address { r#type: None }),
        ResourceKind::Address,
        "",
        "type",
    );
    assert!(e.to_string().starts_with("address "), "{e}");
}

#[test]
fn address_errors_carry_the_inner_resource() {
    let a = pw::Address {
        r#type: Some(pw::address::Type::Workload(pw::Workload {
            tunnel_protocol: 7,
            ..valid_workload()
        })),
    };
    assert_invalid(
        Resource::try_from(a),
        ResourceKind::Workload,
        UID,
        "tunnel_protocol",
    );
    let a = pw::Address {
        r#type: Some(pw::address::Type::Service(pw::Service {
            ports: vec![port(0, 0)],
            ..valid_service()
        })),
    };
    assert_invalid(
        Resource::try_from(a),
        ResourceKind::Service,
        SVC_KEY,
        "ports[0].service_port",
    );
}

// ---------------------------------------------------------------------------------------------
// Authorization policies
// ---------------------------------------------------------------------------------------------

#[test]
fn policy_basic_fields_land() {
    let p = Authorization::try_from(valid_policy()).unwrap();
    assert_eq!(p.name, "allow-client");
    assert_eq!(p.namespace, "default");
    assert_eq!(p.key(), PolicyKey(POLICY_NAME.into()));
    assert_eq!(p.scope, PolicyScope::Namespace);
    assert_eq!(p.action, Action::Allow);
    assert!(!p.dry_run);
    assert_eq!(
        p.rules,
        vec![vec![vec![Match {
            namespaces: vec![StringMatch::Exact("default".into())],
            destination_ports: vec![8080],
            ..Default::default()
        }]]]
    );

    for (scope, want) in [
        (psec::Scope::Global, PolicyScope::Global),
        (psec::Scope::WorkloadSelector, PolicyScope::WorkloadSelector),
    ] {
        let p = Authorization::try_from(psec::Authorization {
            scope: scope as i32,
            action: psec::Action::Deny as i32,
            dry_run: true,
            rules: vec![],
            ..valid_policy()
        })
        .unwrap();
        assert_eq!(p.scope, want);
        assert_eq!(p.action, Action::Deny);
        assert!(p.dry_run);
        assert!(p.rules.is_empty());
    }
}

#[test]
fn policy_with_every_match_field_round_trips() {
    use psec::string_match::MatchType;
    let sm = |t| psec::StringMatch {
        match_type: Some(t),
    };
    let sa = |ns: &str, sa: &str| psec::ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    };
    let m = psec::Match {
        namespaces: vec![
            sm(MatchType::Exact("default".into())),
            sm(MatchType::Prefix("team-".into())),
        ],
        not_namespaces: vec![sm(MatchType::Suffix("-test".into()))],
        service_accounts: vec![sa("default", "client")],
        not_service_accounts: vec![sa("other", "bad")],
        principals: vec![
            sm(MatchType::Exact(
                "cluster.local/ns/default/sa/client".into(),
            )),
            sm(MatchType::Presence(())),
        ],
        not_principals: vec![sm(MatchType::Prefix(
            "cluster.local/ns/kube-system/".into(),
        ))],
        source_ips: vec![sec_addr(vec![10, 0, 0, 0], 8), sec_addr(v6("fd00::"), 64)],
        not_source_ips: vec![sec_addr(vec![10, 1, 2, 3], 32)],
        destination_ips: vec![sec_addr(vec![192, 168, 1, 0], 24)],
        not_destination_ips: vec![sec_addr(v6("fd00::1"), 128), sec_addr(vec![0, 0, 0, 0], 0)],
        destination_ports: vec![80, 65535],
        not_destination_ports: vec![1, 9999],
        extensions: vec![],
    };
    let p = Authorization::try_from(psec::Authorization {
        rules: vec![
            rule(vec![
                vec![m.clone()],
                vec![psec::Match::default(), m.clone()],
            ]),
            rule(vec![]),
        ],
        ..valid_policy()
    })
    .unwrap();

    let net = |s: &str| s.parse::<IpNet>().unwrap();
    let want = Match {
        namespaces: vec![
            StringMatch::Exact("default".into()),
            StringMatch::Prefix("team-".into()),
        ],
        not_namespaces: vec![StringMatch::Suffix("-test".into())],
        service_accounts: vec![ServiceAccountMatch {
            namespace: "default".into(),
            service_account: "client".into(),
        }],
        not_service_accounts: vec![ServiceAccountMatch {
            namespace: "other".into(),
            service_account: "bad".into(),
        }],
        principals: vec![
            StringMatch::Exact("cluster.local/ns/default/sa/client".into()),
            StringMatch::Presence,
        ],
        not_principals: vec![StringMatch::Prefix("cluster.local/ns/kube-system/".into())],
        source_ips: vec![net("10.0.0.0/8"), net("fd00::/64")],
        not_source_ips: vec![net("10.1.2.3/32")],
        destination_ips: vec![net("192.168.1.0/24")],
        not_destination_ips: vec![net("fd00::1/128"), net("0.0.0.0/0")],
        destination_ports: vec![80, 65535],
        not_destination_ports: vec![1, 9999],
    };
    assert_eq!(
        p.rules,
        vec![
            vec![vec![want.clone()], vec![Match::default(), want.clone()]],
            vec![],
        ]
    );
    // The converted values behave as the wire meant.
    let m = &p.rules[0][0][0];
    assert!(m.namespaces[1].matches("team-a"));
    assert!(!m.namespaces[1].matches("other"));
    assert!(m.not_namespaces[0].matches("ns-test"));
    assert!(m.principals[1].matches("anything"));
    assert!(!m.principals[1].matches(""));
    assert!(m.source_ips[0].contains(&"10.200.0.1".parse::<IpAddr>().unwrap()));
    assert!(m.source_ips[1].contains(&"fd00::abcd".parse::<IpAddr>().unwrap()));
    assert!(!m.source_ips[0].contains(&"11.0.0.1".parse::<IpAddr>().unwrap()));
}

#[test]
fn policy_cidr_keeps_host_bits_as_sent() {
    // A CIDR with host bits set (10.1.2.3/8) is accepted; containment still uses the prefix.
    let p = Authorization::try_from(policy_with_match(psec::Match {
        source_ips: vec![sec_addr(vec![10, 1, 2, 3], 8)],
        ..Default::default()
    }))
    .unwrap();
    let net = p.rules[0][0][0].source_ips[0];
    assert_eq!(net.prefix_len(), 8);
    assert!(net.contains(&"10.9.9.9".parse::<IpAddr>().unwrap()));
}

#[test]
fn policy_unknown_enums_are_rejected() {
    let e = policy_err(
        psec::Authorization {
            action: 5,
            ..valid_policy()
        },
        "action",
    );
    assert!(e.reason.contains('5'), "{e}");
    let e = policy_err(
        psec::Authorization {
            scope: 9,
            ..valid_policy()
        },
        "scope",
    );
    assert!(e.reason.contains('9'), "{e}");
}

#[test]
fn policy_cidr_longer_than_address_is_rejected() {
    let e = policy_err(
        policy_with_match(psec::Match {
            source_ips: vec![
                sec_addr(vec![10, 0, 0, 0], 8),
                sec_addr(vec![10, 0, 0, 1], 33),
            ],
            ..Default::default()
        }),
        &format!("{M0}.source_ips[1]"),
    );
    assert!(e.reason.contains("33"), "{e}");
    let e = policy_err(
        policy_with_match(psec::Match {
            source_ips: vec![sec_addr(v6("fd00::"), 129)],
            ..Default::default()
        }),
        &format!("{M0}.source_ips[0]"),
    );
    assert!(e.reason.contains("129"), "{e}");
    policy_err(
        policy_with_match(psec::Match {
            not_source_ips: vec![sec_addr(vec![10, 0, 0, 1], 256)],
            ..Default::default()
        }),
        &format!("{M0}.not_source_ips[0]"),
    );
    policy_err(
        policy_with_match(psec::Match {
            destination_ips: vec![sec_addr(vec![10, 0, 0, 1], u32::MAX)],
            ..Default::default()
        }),
        &format!("{M0}.destination_ips[0]"),
    );
    policy_err(
        policy_with_match(psec::Match {
            not_destination_ips: vec![sec_addr(vec![1, 2, 3, 4, 5], 8)],
            ..Default::default()
        }),
        &format!("{M0}.not_destination_ips[0]"),
    );
}

#[test]
fn policy_bad_ports_are_rejected() {
    policy_err(
        policy_with_match(psec::Match {
            destination_ports: vec![80, 0],
            ..Default::default()
        }),
        &format!("{M0}.destination_ports[1]"),
    );
    policy_err(
        policy_with_match(psec::Match {
            destination_ports: vec![65536],
            ..Default::default()
        }),
        &format!("{M0}.destination_ports[0]"),
    );
    policy_err(
        policy_with_match(psec::Match {
            not_destination_ports: vec![0],
            ..Default::default()
        }),
        &format!("{M0}.not_destination_ports[0]"),
    );
}

#[test]
fn policy_string_match_without_type_is_rejected() {
    for (name, m) in [
        (
            "namespaces",
            psec::Match {
                namespaces: vec![psec::StringMatch { match_type: None }],
                ..Default::default()
            },
        ),
        (
            "not_namespaces",
            psec::Match {
                not_namespaces: vec![psec::StringMatch { match_type: None }],
                ..Default::default()
            },
        ),
        (
            "principals",
            psec::Match {
                principals: vec![psec::StringMatch { match_type: None }],
                ..Default::default()
            },
        ),
    ] {
        policy_err(policy_with_match(m), &format!("{M0}.{name}[0]"));
    }
    policy_err(
        policy_with_match(psec::Match {
            not_principals: vec![
                exact("a"),
                exact("b"),
                psec::StringMatch { match_type: None },
            ],
            ..Default::default()
        }),
        &format!("{M0}.not_principals[2]"),
    );
}

#[test]
fn policy_service_account_match_needs_both_parts() {
    let sa = |ns: &str, sa: &str| psec::ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    };
    policy_err(
        policy_with_match(psec::Match {
            service_accounts: vec![sa("default", "")],
            ..Default::default()
        }),
        &format!("{M0}.service_accounts[0]"),
    );
    policy_err(
        policy_with_match(psec::Match {
            not_service_accounts: vec![sa("default", "a"), sa("", "b")],
            ..Default::default()
        }),
        &format!("{M0}.not_service_accounts[1]"),
    );
}

#[test]
fn policy_clause_without_matches_is_rejected() {
    let e = policy_err(
        psec::Authorization {
            rules: vec![rule(vec![vec![psec::Match::default()], vec![]])],
            ..valid_policy()
        },
        "rules[0].clauses[1].matches",
    );
    assert!(e.reason.contains("at least one match"), "{e}");
}

#[test]
fn policy_error_path_indexes_rule_clause_and_match() {
    let good = psec::Match::default();
    let bad = psec::Match {
        destination_ports: vec![0],
        ..Default::default()
    };
    policy_err(
        psec::Authorization {
            rules: vec![
                rule(vec![vec![good.clone()]]),
                rule(vec![
                    vec![good.clone()],
                    vec![good.clone(), good.clone(), bad],
                ]),
            ],
            ..valid_policy()
        },
        "rules[1].clauses[1].matches[2].destination_ports[0]",
    );
}

#[test]
fn policy_missing_names_are_rejected() {
    assert_invalid(
        Authorization::try_from(psec::Authorization {
            name: String::new(),
            ..valid_policy()
        }),
        ResourceKind::Authorization,
        "default/",
        "name",
    );
    assert_invalid(
        Authorization::try_from(psec::Authorization {
            namespace: String::new(),
            ..valid_policy()
        }),
        ResourceKind::Authorization,
        "/allow-client",
        "namespace",
    );
}

#[test]
fn policy_display_names_policy_and_field() {
    let e = Authorization::try_from(psec::Authorization {
        action: 5,
        ..valid_policy()
    })
    .unwrap_err();
    let text = e.to_string();
    assert!(text.starts_with("authorization policy "), "{text}");
    assert!(text.contains(POLICY_NAME), "{text}");
    assert!(text.contains("`action`"), "{text}");
}

// ---------------------------------------------------------------------------------------------
// Fuzz: arbitrary bytes never panic conversion
// ---------------------------------------------------------------------------------------------

/// splitmix64: a tiny deterministic generator, so the fuzz inputs are the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }

    /// `seed` with a few random byte flips, insertions and deletions.
    fn mutate(&mut self, seed: &[u8]) -> Vec<u8> {
        let mut v = seed.to_vec();
        for _ in 0..=self.below(4) {
            match self.below(3) {
                0 if !v.is_empty() => {
                    let i = self.below(v.len());
                    v[i] ^= 1 << self.below(8);
                }
                1 => {
                    let i = self.below(v.len() + 1);
                    v.insert(i, self.next() as u8);
                }
                _ if !v.is_empty() => {
                    let i = self.below(v.len());
                    v.remove(i);
                }
                _ => {}
            }
        }
        v
    }
}

/// Converts, and checks the model's invariants on success and the error's shape on failure.
fn convert_address(bytes: &[u8]) -> Option<bool> {
    let a = pw::Address::decode(bytes).ok()?;
    Some(match Resource::try_from(a) {
        Ok(Resource::Workload(w)) => {
            assert!(!w.uid.0.is_empty());
            assert!(w.services.values().all(|p| !p.contains_key(&0)));
            for g in w.waypoint.iter().chain(&w.network_gateway) {
                assert_ne!(g.hbone_mtls_port, 0, "port 0 must become 15008");
            }
            true
        }
        Ok(Resource::Service(s)) => {
            assert!(!s.ports.contains_key(&0));
            assert!(ServiceKey::parse(&s.key().0).is_ok());
            true
        }
        Err(e) => {
            assert!(e.to_string().contains(&e.field));
            false
        }
    })
}

fn convert_policy(bytes: &[u8]) -> Option<bool> {
    let p = psec::Authorization::decode(bytes).ok()?;
    Some(match Authorization::try_from(p) {
        Ok(p) => {
            for m in p.rules.iter().flatten().flatten() {
                assert!(!m.destination_ports.contains(&0));
                assert!(!m.not_destination_ports.contains(&0));
                for n in m.source_ips.iter().chain(&m.destination_ips) {
                    assert!(n.prefix_len() <= n.max_prefix_len());
                }
            }
            assert!(p.rules.iter().flatten().all(|c| !c.is_empty()));
            true
        }
        Err(e) => {
            assert!(e.to_string().contains(&e.field));
            false
        }
    })
}

#[test]
fn fuzz_random_bytes_never_panic() {
    let mut rng = Rng(0x6C34_6D65_7368);
    let mut decoded = 0;
    for _ in 0..2000 {
        let bytes = rng.bytes(64);
        decoded += usize::from(convert_address(&bytes).is_some());
        decoded += usize::from(convert_policy(&bytes).is_some());
    }
    // Empty and some short inputs decode, so conversion did run.
    assert!(decoded > 0);
}

#[test]
fn fuzz_mutated_valid_messages_never_panic() {
    let seeds_addr = [
        pw::Address {
            r#type: Some(pw::address::Type::Workload(valid_workload())),
        }
        .encode_to_vec(),
        pw::Address {
            r#type: Some(pw::address::Type::Service(valid_service())),
        }
        .encode_to_vec(),
    ];
    let mut full = valid_policy();
    full.rules[0].clauses[0].matches[0].source_ips = vec![sec_addr(vec![10, 0, 0, 0], 8)];
    full.rules[0].clauses[0].matches[0].principals = vec![psec::StringMatch {
        match_type: Some(psec::string_match::MatchType::Presence(())),
    }];
    let seed_policy = full.encode_to_vec();

    let mut rng = Rng(42);
    let (mut ok, mut err) = (0, 0);
    for i in 0..2000 {
        let bytes = rng.mutate(&seeds_addr[i % 2]);
        match convert_address(&bytes) {
            Some(true) => ok += 1,
            Some(false) => err += 1,
            None => {}
        }
        let bytes = rng.mutate(&seed_policy);
        match convert_policy(&bytes) {
            Some(true) => ok += 1,
            Some(false) => err += 1,
            None => {}
        }
    }
    // Mutations of valid messages exercise both the accepting and the rejecting paths.
    assert!(ok > 0, "no mutated message converted");
    assert!(err > 0, "no mutated message was rejected");
}
