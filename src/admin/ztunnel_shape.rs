//! The mesh state and certificates of `/config_dump` in ztunnel's JSON shape (camelCase fields,
//! `workloadIps`, `"<network>/<ip>"` strings, endpoints keyed by workload uid, certificates with
//! their chain and roots), so that tools reading ztunnel's dump (`istioctl ztunnel-config`) read
//! l4mesh's. Views borrow from the model: nothing is copied until serialisation.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{
    AppTunnel, GatewayAddress, GatewayDestination, HealthPolicy, IpFamilies, LoadBalancingMode,
    Locality, RoutingScope, Service, TunnelProtocol, Workload, WorkloadStatus, WorkloadType,
};
use crate::store::Snapshot;

/// One workload as ztunnel dumps it.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadView<'a> {
    workload_ips: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    waypoint: Option<GatewayView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    network_gateway: Option<GatewayView>,
    protocol: &'static str,
    network_mode: &'static str,
    uid: &'a str,
    name: &'a str,
    namespace: &'a str,
    trust_domain: &'a str,
    service_account: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    network: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    workload_name: &'a str,
    workload_type: &'static str,
    #[serde(skip_serializing_if = "str::is_empty")]
    canonical_name: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    canonical_revision: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    hostname: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    node: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    native_tunnel: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    application_tunnel: Option<AppTunnelView>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    authorization_policies: &'a [String],
    status: &'static str,
    cluster_id: &'a str,
    #[serde(skip_serializing_if = "is_default_locality")]
    locality: &'a Locality,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    services: Vec<String>,
    capacity: u32,
}

fn is_default_locality(l: &&Locality) -> bool {
    **l == Locality::default()
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GatewayView {
    destination: String,
    hbone_mtls_port: u16,
}

#[derive(Serialize)]
struct AppTunnelView {
    protocol: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    port: Option<u16>,
}

fn gateway(g: &GatewayAddress) -> GatewayView {
    GatewayView {
        destination: match &g.destination {
            GatewayDestination::Address(a) => format!("{}/{}", a.network, a.ip),
            GatewayDestination::Hostname(k) => k.to_string(),
        },
        hbone_mtls_port: g.hbone_mtls_port,
    }
}

impl<'a> WorkloadView<'a> {
    pub fn of(w: &'a Workload) -> Self {
        WorkloadView {
            workload_ips: w.addresses.iter().map(ToString::to_string).collect(),
            waypoint: w.waypoint.as_ref().map(gateway),
            network_gateway: w.network_gateway.as_ref().map(gateway),
            protocol: match w.protocol {
                TunnelProtocol::Tcp => "TCP",
                TunnelProtocol::Hbone => "HBONE",
                TunnelProtocol::LegacyIstioMtls => "LEGACY_ISTIO_MTLS",
            },
            network_mode: if w.host_network {
                "HostNetwork"
            } else {
                "Standard"
            },
            uid: &w.uid.0,
            name: &w.name,
            namespace: &w.namespace,
            trust_domain: &w.trust_domain,
            service_account: &w.service_account,
            network: &w.network,
            workload_name: &w.workload_name,
            workload_type: match w.workload_type {
                WorkloadType::Deployment => "deployment",
                WorkloadType::CronJob => "cronjob",
                WorkloadType::Pod => "pod",
                WorkloadType::Job => "job",
            },
            canonical_name: &w.canonical_name,
            canonical_revision: &w.canonical_revision,
            hostname: &w.hostname,
            node: &w.node,
            native_tunnel: w.native_tunnel,
            application_tunnel: w
                .application_tunnel
                .as_ref()
                .map(|t: &AppTunnel| AppTunnelView {
                    protocol: if t.proxy_protocol { "PROXY" } else { "NONE" },
                    port: t.port,
                }),
            authorization_policies: &w.authorization_policies,
            status: status(w.status),
            cluster_id: &w.cluster_id,
            locality: &w.locality,
            services: w.services.keys().map(ToString::to_string).collect(),
            capacity: w.capacity,
        }
    }
}

fn status(s: WorkloadStatus) -> &'static str {
    match s {
        WorkloadStatus::Healthy => "Healthy",
        WorkloadStatus::Unhealthy => "Unhealthy",
    }
}

/// One service as ztunnel dumps it, with its endpoints.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceView<'a> {
    name: &'a str,
    namespace: &'a str,
    hostname: &'a str,
    vips: Vec<String>,
    ports: BTreeMap<String, u16>,
    endpoints: BTreeMap<String, EndpointView>,
    subject_alt_names: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    waypoint: Option<GatewayView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    load_balancer: Option<LoadBalancerView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip_families: Option<&'static str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct EndpointView {
    workload_uid: String,
    port: BTreeMap<String, u16>,
    status: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoadBalancerView {
    routing_preferences: Vec<&'static str>,
    mode: &'static str,
    health_policy: &'static str,
}

impl<'a> ServiceView<'a> {
    pub fn of(s: &'a Service, snapshot: &Snapshot) -> Self {
        let ports = |m: &BTreeMap<u16, u16>| m.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let lb = &s.load_balancing;
        let default_lb = lb.mode == LoadBalancingMode::Standard
            && lb.routing_preference.is_empty()
            && lb.health_policy == HealthPolicy::OnlyHealthy;
        ServiceView {
            name: &s.name,
            namespace: &s.namespace,
            hostname: &s.hostname,
            vips: s
                .vips
                .iter()
                .map(|v| format!("{}/{}", v.network, v.ip))
                .chain(
                    s.cidr_vips
                        .iter()
                        .map(|c| format!("{}/{}", c.network, c.net)),
                )
                .collect(),
            ports: ports(&s.ports),
            endpoints: snapshot
                .endpoints(&s.key())
                .map(|(w, ep)| {
                    (
                        w.uid.to_string(),
                        EndpointView {
                            workload_uid: w.uid.to_string(),
                            port: ports(&ep.ports),
                            status: status(w.status),
                        },
                    )
                })
                .collect(),
            subject_alt_names: &s.subject_alt_names,
            waypoint: s.waypoint.as_ref().map(gateway),
            load_balancer: (!default_lb).then(|| LoadBalancerView {
                routing_preferences: lb
                    .routing_preference
                    .iter()
                    .map(|r| match r {
                        RoutingScope::Region => "Region",
                        RoutingScope::Zone => "Zone",
                        RoutingScope::Subzone => "Subzone",
                        RoutingScope::Node => "Node",
                        RoutingScope::Cluster => "Cluster",
                        RoutingScope::Network => "Network",
                    })
                    .collect(),
                mode: match lb.mode {
                    LoadBalancingMode::Standard => "Standard",
                    LoadBalancingMode::Strict => "Strict",
                    LoadBalancingMode::Failover => "Failover",
                    LoadBalancingMode::Passthrough => "Passthrough",
                },
                health_policy: match lb.health_policy {
                    HealthPolicy::OnlyHealthy => "OnlyHealthy",
                    HealthPolicy::AllowAll => "AllowAll",
                },
            }),
            ip_families: match s.ip_families {
                IpFamilies::Automatic => None,
                IpFamilies::Ipv4Only => Some("IPv4"),
                IpFamilies::Ipv6Only => Some("IPv6"),
                IpFamilies::Dual => Some("Dual"),
            },
        }
    }
}

/// A certificate as ztunnel dumps it: the PEM text base64-encoded, the serial in decimal,
/// validity in RFC 3339.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CertView {
    pem: String,
    serial_number: String,
    valid_from: String,
    expiration_time: String,
}

impl CertView {
    /// `None` when the certificate does not parse (never for one l4mesh accepted).
    pub fn of(der: &[u8]) -> Option<CertView> {
        use base64::Engine;
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let validity = cert.validity();
        let secs = |t: x509_parser::time::ASN1Time| u64::try_from(t.timestamp()).unwrap_or(0);
        let pem = crate::identity::der_to_pem("CERTIFICATE", der);
        Some(CertView {
            pem: base64::engine::general_purpose::STANDARD.encode(pem),
            serial_number: cert.serial.to_string(),
            valid_from: super::config_dump::rfc3339(secs(validity.not_before)),
            expiration_time: super::config_dump::rfc3339(secs(validity.not_after)),
        })
    }
}
