//! The trust boundary: protobuf messages from the control plane (or the local config file, which is
//! turned into the same messages) become validated domain types, or a [`ValidationError`] that names
//! the resource and the field. Nothing here panics on any input.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::IpNet;

use super::*;
use crate::proto::istio::security as psec;
use crate::proto::istio::workload as pw;

/// What kind of resource a [`ValidationError`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    Address,
    Workload,
    Service,
    Authorization,
}

impl std::fmt::Display for ResourceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResourceKind::Address => "address",
            ResourceKind::Workload => "workload",
            ResourceKind::Service => "service",
            ResourceKind::Authorization => "authorization policy",
        })
    }
}

/// A resource the control plane sent that l4mesh refuses, and why. Its text goes into NACKs and logs.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: field `{field}`: {reason}")]
pub struct ValidationError {
    pub kind: ResourceKind,
    /// The resource's name (uid, `namespace/hostname`, `namespace/name`), or what is known of it.
    pub name: String,
    pub field: String,
    pub reason: String,
}

/// A validated `istio.workload.Address`.
// Short-lived (converted, then moved into the store): boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Resource {
    Workload(Workload),
    Service(Service),
}

struct Ctx {
    kind: ResourceKind,
    name: String,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, reason: impl Into<String>) -> ValidationError {
        ValidationError {
            kind: self.kind,
            name: self.name.clone(),
            field: field.into(),
            reason: reason.into(),
        }
    }

    fn non_empty(&self, field: &str, v: String) -> Result<String, ValidationError> {
        if v.is_empty() {
            return Err(self.err(field, "expected a non-empty value, found \"\""));
        }
        Ok(v)
    }

    fn ip(&self, field: &str, bytes: &[u8]) -> Result<IpAddr, ValidationError> {
        match bytes.len() {
            4 => Ok(IpAddr::V4(Ipv4Addr::from([
                bytes[0], bytes[1], bytes[2], bytes[3],
            ]))),
            16 => {
                let mut a = [0u8; 16];
                a.copy_from_slice(bytes);
                Ok(IpAddr::V6(Ipv6Addr::from(a)))
            }
            n => Err(self.err(
                field,
                format!("expected an IP address of 4 or 16 bytes, found {n} bytes"),
            )),
        }
    }

    fn cidr(&self, field: &str, bytes: &[u8], len: u32) -> Result<IpNet, ValidationError> {
        let ip = self.ip(field, bytes)?;
        let max = if ip.is_ipv4() { 32 } else { 128 };
        let plen = u8::try_from(len).ok().filter(|l| u32::from(*l) <= max);
        let plen = plen.ok_or_else(|| {
            self.err(
                field,
                format!("expected a prefix length of at most {max} for {ip}, found {len}"),
            )
        })?;
        IpNet::new(ip, plen).map_err(|e| self.err(field, e.to_string()))
    }

    fn port(&self, field: &str, v: u32, allow_zero: bool) -> Result<u16, ValidationError> {
        match u16::try_from(v) {
            Ok(0) if !allow_zero => Err(self.err(field, "expected a port in 1..=65535, found 0")),
            Ok(p) => Ok(p),
            Err(_) => Err(self.err(field, format!("expected a port in 0..=65535, found {v}"))),
        }
    }

    fn enumeration<T>(
        &self,
        field: &str,
        v: i32,
        known: &str,
        f: impl FnOnce(i32) -> Option<T>,
    ) -> Result<T, ValidationError> {
        f(v).ok_or_else(|| {
            self.err(
                field,
                format!("unknown enum value {v}, expected one of {known}"),
            )
        })
    }
}

impl TryFrom<pw::Address> for Resource {
    type Error = ValidationError;

    fn try_from(a: pw::Address) -> Result<Self, ValidationError> {
        match a.r#type {
            Some(pw::address::Type::Workload(w)) => Ok(Resource::Workload(w.try_into()?)),
            Some(pw::address::Type::Service(s)) => Ok(Resource::Service(s.try_into()?)),
            None => Err(ValidationError {
                kind: ResourceKind::Address,
                name: String::new(),
                field: "type".into(),
                reason: "expected a workload or a service, found neither".into(),
            }),
        }
    }
}

fn gateway(
    ctx: &Ctx,
    field: &str,
    g: pw::GatewayAddress,
) -> Result<GatewayAddress, ValidationError> {
    let destination = match g.destination {
        Some(pw::gateway_address::Destination::Address(a)) => {
            GatewayDestination::Address(NetworkAddr::new(
                a.network,
                ctx.ip(&format!("{field}.address.address"), &a.address)?,
            ))
        }
        Some(pw::gateway_address::Destination::Hostname(h)) => {
            let key = format!("{}/{}", h.namespace, h.hostname);
            GatewayDestination::Hostname(
                ServiceKey::parse(&key).map_err(|e| ctx.err(format!("{field}.hostname"), e))?,
            )
        }
        None => return Err(ctx.err(field, "expected an address or a hostname, found neither")),
    };
    let port = ctx.port(&format!("{field}.hbone_mtls_port"), g.hbone_mtls_port, true)?;
    Ok(GatewayAddress {
        destination,
        hbone_mtls_port: if port == 0 { 15008 } else { port },
    })
}

impl TryFrom<pw::Workload> for Workload {
    type Error = ValidationError;

    fn try_from(w: pw::Workload) -> Result<Self, ValidationError> {
        let ctx = Ctx {
            kind: ResourceKind::Workload,
            name: if w.uid.is_empty() {
                w.name.clone()
            } else {
                w.uid.clone()
            },
        };
        let uid = WorkloadUid(ctx.non_empty("uid", w.uid)?.into());
        let name = ctx.non_empty("name", w.name)?;
        let namespace = ctx.non_empty("namespace", w.namespace)?;
        let addresses = w
            .addresses
            .iter()
            .enumerate()
            .map(|(i, a)| ctx.ip(&format!("addresses[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        // Resolved by on-demand DNS when the workload has no address: a DNS name or nothing.
        if !w.hostname.is_empty() && hickory_proto::rr::Name::from_ascii(&w.hostname).is_err() {
            return Err(ctx.err(
                "hostname",
                format!("expected a DNS name, found {:?}", w.hostname),
            ));
        }
        let protocol = ctx.enumeration(
            "tunnel_protocol",
            w.tunnel_protocol,
            "NONE(0), HBONE(1), LEGACY_ISTIO_MTLS(2)",
            |v| match pw::TunnelProtocol::try_from(v).ok()? {
                pw::TunnelProtocol::None => Some(TunnelProtocol::Tcp),
                pw::TunnelProtocol::Hbone => Some(TunnelProtocol::Hbone),
                pw::TunnelProtocol::LegacyIstioMtls => Some(TunnelProtocol::LegacyIstioMtls),
            },
        )?;
        let workload_type = ctx.enumeration(
            "workload_type",
            w.workload_type,
            "DEPLOYMENT(0), CRONJOB(1), POD(2), JOB(3)",
            |v| {
                Some(match pw::WorkloadType::try_from(v).ok()? {
                    pw::WorkloadType::Deployment => WorkloadType::Deployment,
                    pw::WorkloadType::Cronjob => WorkloadType::CronJob,
                    pw::WorkloadType::Pod => WorkloadType::Pod,
                    pw::WorkloadType::Job => WorkloadType::Job,
                })
            },
        )?;
        let status = ctx.enumeration("status", w.status, "HEALTHY(0), UNHEALTHY(1)", |v| {
            Some(match pw::WorkloadStatus::try_from(v).ok()? {
                pw::WorkloadStatus::Healthy => WorkloadStatus::Healthy,
                pw::WorkloadStatus::Unhealthy => WorkloadStatus::Unhealthy,
            })
        })?;
        let host_network = ctx.enumeration(
            "network_mode",
            w.network_mode,
            "STANDARD(0), HOST_NETWORK(1)",
            |v| Some(pw::NetworkMode::try_from(v).ok()? == pw::NetworkMode::HostNetwork),
        )?;
        let application_tunnel = match w.application_tunnel {
            None => None,
            Some(t) => {
                let proxy_protocol = ctx.enumeration(
                    "application_tunnel.protocol",
                    t.protocol,
                    "NONE(0), PROXY(1)",
                    |v| {
                        Some(
                            pw::application_tunnel::Protocol::try_from(v).ok()?
                                == pw::application_tunnel::Protocol::Proxy,
                        )
                    },
                )?;
                let port = ctx.port("application_tunnel.port", t.port, true)?;
                Some(AppTunnel {
                    proxy_protocol,
                    port: (port != 0).then_some(port),
                })
            }
        };
        let mut services = BTreeMap::new();
        for (key, list) in w.services {
            let field = format!("services[{key:?}]");
            let skey = ServiceKey::parse(&key).map_err(|e| ctx.err(&field, e))?;
            let mut ports = PortMap::new();
            for (i, p) in list.ports.iter().enumerate() {
                let sp = ctx.port(
                    &format!("{field}.ports[{i}].service_port"),
                    p.service_port,
                    false,
                )?;
                let tp = ctx.port(
                    &format!("{field}.ports[{i}].target_port"),
                    p.target_port,
                    true,
                )?;
                ports.insert(sp, tp);
            }
            services.insert(skey, ports);
        }
        let waypoint = w
            .waypoint
            .map(|g| gateway(&ctx, "waypoint", g))
            .transpose()?;
        let network_gateway = w
            .network_gateway
            .map(|g| gateway(&ctx, "network_gateway", g))
            .transpose()?;
        let locality = w.locality.map_or_else(Locality::default, |l| Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        });
        Ok(Workload {
            uid,
            name,
            namespace,
            service_account: if w.service_account.is_empty() {
                "default".into()
            } else {
                w.service_account
            },
            trust_domain: if w.trust_domain.is_empty() {
                "cluster.local".into()
            } else {
                w.trust_domain
            },
            addresses,
            hostname: w.hostname,
            network: Arc::from(w.network),
            protocol,
            waypoint,
            network_gateway,
            node: w.node,
            canonical_name: w.canonical_name,
            canonical_revision: w.canonical_revision,
            workload_type,
            workload_name: w.workload_name,
            native_tunnel: w.native_tunnel,
            application_tunnel,
            services,
            authorization_policies: w.authorization_policies,
            status,
            cluster_id: w.cluster_id,
            locality,
            host_network,
            capacity: w.capacity.unwrap_or(1),
        })
    }
}

impl TryFrom<pw::Service> for Service {
    type Error = ValidationError;

    fn try_from(s: pw::Service) -> Result<Self, ValidationError> {
        let ctx = Ctx {
            kind: ResourceKind::Service,
            name: format!("{}/{}", s.namespace, s.hostname),
        };
        let name = ctx.non_empty("name", s.name)?;
        let namespace = ctx.non_empty("namespace", s.namespace)?;
        let hostname = ctx.non_empty("hostname", s.hostname)?;
        ServiceKey::parse(&ctx.name).map_err(|e| ctx.err("namespace/hostname", e))?;
        let (mut vips, mut cidr_vips) = (Vec::with_capacity(s.addresses.len()), Vec::new());
        for (i, a) in s.addresses.iter().enumerate() {
            let field = format!("addresses[{i}]");
            let ip = ctx.ip(&format!("{field}.address"), &a.address)?;
            if let Some(len) = a.length {
                let net = ctx.cidr(&format!("{field}.length"), &a.address, len)?;
                if net.prefix_len() < net.max_prefix_len() {
                    cidr_vips.push(NetworkCidr {
                        network: a.network.as_str().into(),
                        net: net.trunc(),
                    });
                    continue;
                }
            }
            let vip = NetworkAddr::new(a.network.clone(), ip);
            // Listed twice is held once.
            if !vips.contains(&vip) {
                vips.push(vip);
            }
        }
        let mut ports = BTreeMap::new();
        for (i, p) in s.ports.iter().enumerate() {
            let sp = ctx.port(&format!("ports[{i}].service_port"), p.service_port, false)?;
            let tp = ctx.port(&format!("ports[{i}].target_port"), p.target_port, true)?;
            ctx.enumeration(
                &format!("ports[{i}].app_protocol"),
                p.app_protocol,
                "UNKNOWN(0), HTTP11(1), HTTP2(2), GRPC(3), TCP(4), TLS(5)",
                |v| pw::AppProtocol::try_from(v).ok(),
            )?;
            ports.insert(sp, tp);
        }
        let load_balancing = match s.load_balancing {
            None => LoadBalancing::default(),
            Some(lb) => load_balancing(&ctx, lb)?,
        };
        let ip_families = ctx.enumeration(
            "ip_families",
            s.ip_families,
            "AUTOMATIC(0), IPV4_ONLY(1), IPV6_ONLY(2), DUAL(3)",
            |v| {
                Some(match pw::IpFamilies::try_from(v).ok()? {
                    pw::IpFamilies::Automatic => IpFamilies::Automatic,
                    pw::IpFamilies::Ipv4Only => IpFamilies::Ipv4Only,
                    pw::IpFamilies::Ipv6Only => IpFamilies::Ipv6Only,
                    pw::IpFamilies::Dual => IpFamilies::Dual,
                })
            },
        )?;
        let visibility =
            ctx.enumeration("visibility", s.visibility, "PUBLIC(0), NAMESPACE(1)", |v| {
                Some(match pw::service::Visibility::try_from(v).ok()? {
                    pw::service::Visibility::Public => Visibility::Public,
                    pw::service::Visibility::Namespace => Visibility::Namespace,
                })
            })?;
        let waypoint = s
            .waypoint
            .map(|g| gateway(&ctx, "waypoint", g))
            .transpose()?;
        let mut weighted_waypoints = Vec::with_capacity(s.weighted_waypoints.len());
        for (i, w) in s.weighted_waypoints.into_iter().enumerate() {
            let field = format!("weighted_waypoints[{i}]");
            let g = w
                .destination
                .ok_or_else(|| ctx.err(&field, "expected a destination, found none"))?;
            weighted_waypoints.push(WeightedWaypoint {
                gateway: gateway(&ctx, &format!("{field}.destination"), g)?,
                weight: w.weight,
            });
        }
        Ok(Service {
            name,
            namespace,
            hostname,
            vips,
            cidr_vips,
            ports,
            subject_alt_names: s.subject_alt_names,
            waypoint,
            weighted_waypoints,
            load_balancing,
            ip_families,
            canonical: s.canonical,
            visibility,
        })
    }
}

fn load_balancing(ctx: &Ctx, lb: pw::LoadBalancing) -> Result<LoadBalancing, ValidationError> {
    use pw::load_balancing as plb;
    let mode = ctx.enumeration(
        "load_balancing.mode",
        lb.mode,
        "UNSPECIFIED_MODE(0), STRICT(1), FAILOVER(2), PASSTHROUGH(3)",
        |v| {
            Some(match plb::Mode::try_from(v).ok()? {
                plb::Mode::UnspecifiedMode => LoadBalancingMode::Standard,
                plb::Mode::Strict => LoadBalancingMode::Strict,
                plb::Mode::Failover => LoadBalancingMode::Failover,
                plb::Mode::Passthrough => LoadBalancingMode::Passthrough,
            })
        },
    )?;
    let mut routing_preference = Vec::with_capacity(lb.routing_preference.len());
    for (i, s) in lb.routing_preference.iter().enumerate() {
        let scope = ctx.enumeration(
            &format!("load_balancing.routing_preference[{i}]"),
            *s,
            "REGION(1), ZONE(2), SUBZONE(3), NODE(4), CLUSTER(5), NETWORK(6)",
            |v| {
                Some(match plb::Scope::try_from(v).ok()? {
                    plb::Scope::UnspecifiedScope => return None,
                    plb::Scope::Region => RoutingScope::Region,
                    plb::Scope::Zone => RoutingScope::Zone,
                    plb::Scope::Subzone => RoutingScope::Subzone,
                    plb::Scope::Node => RoutingScope::Node,
                    plb::Scope::Cluster => RoutingScope::Cluster,
                    plb::Scope::Network => RoutingScope::Network,
                })
            },
        )?;
        routing_preference.push(scope);
    }
    let health_policy = ctx.enumeration(
        "load_balancing.health_policy",
        lb.health_policy,
        "ONLY_HEALTHY(0), ALLOW_ALL(1)",
        |v| {
            Some(match plb::HealthPolicy::try_from(v).ok()? {
                plb::HealthPolicy::OnlyHealthy => HealthPolicy::OnlyHealthy,
                plb::HealthPolicy::AllowAll => HealthPolicy::AllowAll,
            })
        },
    )?;
    Ok(LoadBalancing {
        mode,
        routing_preference,
        health_policy,
    })
}

impl TryFrom<psec::Authorization> for Authorization {
    type Error = ValidationError;

    fn try_from(a: psec::Authorization) -> Result<Self, ValidationError> {
        let ctx = Ctx {
            kind: ResourceKind::Authorization,
            name: format!("{}/{}", a.namespace, a.name),
        };
        let name = ctx.non_empty("name", a.name)?;
        let namespace = ctx.non_empty("namespace", a.namespace)?;
        let scope = ctx.enumeration(
            "scope",
            a.scope,
            "GLOBAL(0), NAMESPACE(1), WORKLOAD_SELECTOR(2)",
            |v| {
                Some(match psec::Scope::try_from(v).ok()? {
                    psec::Scope::Global => PolicyScope::Global,
                    psec::Scope::Namespace => PolicyScope::Namespace,
                    psec::Scope::WorkloadSelector => PolicyScope::WorkloadSelector,
                })
            },
        )?;
        let action = ctx.enumeration("action", a.action, "ALLOW(0), DENY(1)", |v| {
            Some(match psec::Action::try_from(v).ok()? {
                psec::Action::Allow => Action::Allow,
                psec::Action::Deny => Action::Deny,
            })
        })?;
        let mut rules = Vec::with_capacity(a.rules.len());
        for (ri, rule) in a.rules.into_iter().enumerate() {
            let mut clauses = Vec::with_capacity(rule.clauses.len());
            for (ci, clause) in rule.clauses.into_iter().enumerate() {
                if clause.matches.is_empty() {
                    return Err(ctx.err(
                        format!("rules[{ri}].clauses[{ci}].matches"),
                        "expected at least one match, found none (a clause without matches can never be satisfied)",
                    ));
                }
                let mut matches = Vec::with_capacity(clause.matches.len());
                for (mi, m) in clause.matches.into_iter().enumerate() {
                    let field = format!("rules[{ri}].clauses[{ci}].matches[{mi}]");
                    matches.push(rbac_match(&ctx, &field, m)?);
                }
                clauses.push(matches);
            }
            rules.push(clauses);
        }
        Ok(Authorization {
            name,
            namespace,
            scope,
            action,
            rules,
            dry_run: a.dry_run,
        })
    }
}

fn rbac_match(ctx: &Ctx, field: &str, m: psec::Match) -> Result<Match, ValidationError> {
    let strings =
        |name: &str, v: Vec<psec::StringMatch>| -> Result<Vec<StringMatch>, ValidationError> {
            v.into_iter()
                .enumerate()
                .map(|(i, s)| {
                    use psec::string_match::MatchType;
                    match s.match_type {
                        Some(MatchType::Exact(x)) => Ok(StringMatch::Exact(x)),
                        Some(MatchType::Prefix(x)) => Ok(StringMatch::Prefix(x)),
                        Some(MatchType::Suffix(x)) => Ok(StringMatch::Suffix(x)),
                        Some(MatchType::Presence(_)) => Ok(StringMatch::Presence),
                        None => Err(ctx.err(
                            format!("{field}.{name}[{i}]"),
                            "expected exact, prefix, suffix or presence, found none",
                        )),
                    }
                })
                .collect()
        };
    let accounts = |name: &str,
                    v: Vec<psec::ServiceAccountMatch>|
     -> Result<Vec<ServiceAccountMatch>, ValidationError> {
        v.into_iter()
            .enumerate()
            .map(|(i, s)| {
                if s.namespace.is_empty() || s.service_account.is_empty() {
                    return Err(ctx.err(
                        format!("{field}.{name}[{i}]"),
                        "expected both namespace and serviceAccount, one is empty",
                    ));
                }
                Ok(ServiceAccountMatch {
                    namespace: s.namespace,
                    service_account: s.service_account,
                })
            })
            .collect()
    };
    let cidrs = |name: &str, v: Vec<psec::Address>| -> Result<Vec<IpNet>, ValidationError> {
        v.into_iter()
            .enumerate()
            .map(|(i, a)| ctx.cidr(&format!("{field}.{name}[{i}]"), &a.address, a.length))
            .collect()
    };
    let ports = |name: &str, v: Vec<u32>| -> Result<Vec<u16>, ValidationError> {
        v.into_iter()
            .enumerate()
            .map(|(i, p)| ctx.port(&format!("{field}.{name}[{i}]"), p, false))
            .collect()
    };
    Ok(Match {
        namespaces: strings("namespaces", m.namespaces)?,
        not_namespaces: strings("not_namespaces", m.not_namespaces)?,
        service_accounts: accounts("service_accounts", m.service_accounts)?,
        not_service_accounts: accounts("not_service_accounts", m.not_service_accounts)?,
        principals: strings("principals", m.principals)?,
        not_principals: strings("not_principals", m.not_principals)?,
        source_ips: cidrs("source_ips", m.source_ips)?,
        not_source_ips: cidrs("not_source_ips", m.not_source_ips)?,
        destination_ips: cidrs("destination_ips", m.destination_ips)?,
        not_destination_ips: cidrs("not_destination_ips", m.not_destination_ips)?,
        destination_ports: ports("destination_ports", m.destination_ports)?,
        not_destination_ports: ports("not_destination_ports", m.not_destination_ports)?,
    })
}

#[cfg(test)]
mod tests;
