//! Builds the protobuf messages an xDS server would send from the file's serde shape. Only what the
//! YAML form itself needs is checked here (an IP in a string, `"<network>/<ip>"`, a CIDR, an enum
//! name); everything else is left to the model's `TryFrom` conversions, exactly as for xDS.

use std::net::IpAddr;

use super::{raw, LocalConfigError};
use crate::proto::istio::security as psec;
use crate::proto::istio::workload as pw;

/// The entry being built, for error messages.
pub(super) struct Ctx<'a> {
    pub label: &'a str,
}

impl Ctx<'_> {
    fn err(
        &self,
        field: impl Into<String>,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) -> LocalConfigError {
        LocalConfigError::Field {
            entry: self.label.to_owned(),
            field: field.into(),
            expected: expected.into(),
            found: found.into(),
        }
    }

    fn ip(&self, field: &str, s: &str) -> Result<IpAddr, LocalConfigError> {
        s.trim().parse().map_err(|_| {
            self.err(
                field,
                "an IP address such as \"10.0.0.1\" or \"fd00::1\"",
                format!("{s:?}"),
            )
        })
    }

    /// A service address: `"<network>/<ip>"`, or a range `"<network>/<ip>/<prefix length>"` (a
    /// ServiceEntry's CIDR address).
    fn vip(&self, field: &str, s: &str) -> Result<pw::NetworkAddress, LocalConfigError> {
        let expected = "\"<network>/<ip>\" or \"<network>/<ip>/<prefix length>\", e.g. \"/10.0.0.1\" or \"/10.1.0.0/16\"";
        let bad = || self.err(field, expected, format!("{s:?}"));
        let mut parts = s.splitn(3, '/');
        let (network, ip, len) = (parts.next(), parts.next(), parts.next());
        let ip: IpAddr = ip.ok_or_else(bad)?.trim().parse().map_err(|_| bad())?;
        let length = match len {
            None => None,
            // Range-checked by the model's conversion.
            Some(l) => Some(l.trim().parse::<u32>().map_err(|_| bad())?),
        };
        Ok(pw::NetworkAddress {
            network: network.unwrap_or_default().to_owned(),
            address: ip_bytes(ip),
            length,
        })
    }

    /// `"10.0.0.0/8"`, or a bare IP meaning a single address (/32 or /128). The prefix length is
    /// range-checked by the model's conversion.
    fn cidr(&self, field: &str, s: &str) -> Result<psec::Address, LocalConfigError> {
        let expected = "a CIDR such as \"10.0.0.0/8\" or \"fd00::/8\", or a single IP address";
        let (ip, len) = match s.split_once('/') {
            Some((ip, len)) => (ip, Some(len)),
            None => (s, None),
        };
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| self.err(field, expected, format!("{s:?}")))?;
        let length = match len {
            None if ip.is_ipv4() => 32,
            None => 128,
            Some(len) => len
                .trim()
                .parse()
                .map_err(|_| self.err(field, expected, format!("{s:?}")))?,
        };
        Ok(psec::Address {
            address: ip_bytes(ip),
            length,
        })
    }

    /// An enum written by name; case, `_` and `-` are ignored so that both the file's `WorkloadSelector`
    /// and the proto's `WORKLOAD_SELECTOR` are accepted. Absent means the proto default (0).
    fn enumeration(
        &self,
        field: &str,
        value: Option<&str>,
        choices: &[(&str, i32)],
        expected: &str,
    ) -> Result<i32, LocalConfigError> {
        let Some(v) = value else { return Ok(0) };
        let key: String = v
            .chars()
            .filter(|c| !matches!(c, '_' | '-' | ' '))
            .map(|c| c.to_ascii_lowercase())
            .collect();
        choices
            .iter()
            .find(|(name, _)| *name == key)
            .map(|(_, n)| *n)
            .ok_or_else(|| self.err(field, format!("one of {expected}"), format!("{v:?}")))
    }
}

fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

// Accepted spellings (normalised: lower case, no `_`/`-`) → proto enum values.
const PROTOCOLS: &[(&str, i32)] = &[
    ("tcp", pw::TunnelProtocol::None as i32),
    ("none", pw::TunnelProtocol::None as i32),
    ("hbone", pw::TunnelProtocol::Hbone as i32),
    (
        "legacyistiomtls",
        pw::TunnelProtocol::LegacyIstioMtls as i32,
    ),
];
const NETWORK_MODES: &[(&str, i32)] = &[
    ("standard", pw::NetworkMode::Standard as i32),
    ("hostnetwork", pw::NetworkMode::HostNetwork as i32),
];
const STATUSES: &[(&str, i32)] = &[
    ("healthy", pw::WorkloadStatus::Healthy as i32),
    ("unhealthy", pw::WorkloadStatus::Unhealthy as i32),
];
const WORKLOAD_TYPES: &[(&str, i32)] = &[
    ("deployment", pw::WorkloadType::Deployment as i32),
    ("cronjob", pw::WorkloadType::Cronjob as i32),
    ("pod", pw::WorkloadType::Pod as i32),
    ("job", pw::WorkloadType::Job as i32),
];
const APP_TUNNEL_PROTOCOLS: &[(&str, i32)] = &[
    ("none", pw::application_tunnel::Protocol::None as i32),
    ("proxy", pw::application_tunnel::Protocol::Proxy as i32),
];
const IP_FAMILIES: &[(&str, i32)] = &[
    ("automatic", pw::IpFamilies::Automatic as i32),
    ("ipv4only", pw::IpFamilies::Ipv4Only as i32),
    ("ipv4", pw::IpFamilies::Ipv4Only as i32),
    ("ipv6only", pw::IpFamilies::Ipv6Only as i32),
    ("ipv6", pw::IpFamilies::Ipv6Only as i32),
    ("dual", pw::IpFamilies::Dual as i32),
];
const VISIBILITY: &[(&str, i32)] = &[
    ("public", pw::service::Visibility::Public as i32),
    ("namespace", pw::service::Visibility::Namespace as i32),
];
const LB_MODES: &[(&str, i32)] = &[
    ("standard", pw::load_balancing::Mode::UnspecifiedMode as i32),
    (
        "unspecified",
        pw::load_balancing::Mode::UnspecifiedMode as i32,
    ),
    (
        "unspecifiedmode",
        pw::load_balancing::Mode::UnspecifiedMode as i32,
    ),
    ("strict", pw::load_balancing::Mode::Strict as i32),
    ("failover", pw::load_balancing::Mode::Failover as i32),
    ("passthrough", pw::load_balancing::Mode::Passthrough as i32),
];
const LB_SCOPES: &[(&str, i32)] = &[
    ("region", pw::load_balancing::Scope::Region as i32),
    ("zone", pw::load_balancing::Scope::Zone as i32),
    ("subzone", pw::load_balancing::Scope::Subzone as i32),
    ("node", pw::load_balancing::Scope::Node as i32),
    ("cluster", pw::load_balancing::Scope::Cluster as i32),
    ("network", pw::load_balancing::Scope::Network as i32),
];
const HEALTH_POLICIES: &[(&str, i32)] = &[
    (
        "onlyhealthy",
        pw::load_balancing::HealthPolicy::OnlyHealthy as i32,
    ),
    (
        "allowall",
        pw::load_balancing::HealthPolicy::AllowAll as i32,
    ),
];
const POLICY_SCOPES: &[(&str, i32)] = &[
    ("global", psec::Scope::Global as i32),
    ("namespace", psec::Scope::Namespace as i32),
    ("workloadselector", psec::Scope::WorkloadSelector as i32),
];
const ACTIONS: &[(&str, i32)] = &[
    ("allow", psec::Action::Allow as i32),
    ("deny", psec::Action::Deny as i32),
];

/// `workloads[2] (uid "…")`, or the name when the uid is missing.
pub(super) fn workload_label(index: usize, uid: &str, namespace: &str, name: &str) -> String {
    if !uid.is_empty() {
        format!("workloads[{index}] (uid {uid:?})")
    } else {
        label("workloads", index, namespace, name)
    }
}

/// `services[0] ("<namespace>/<hostname>")`.
pub(super) fn service_label(index: usize, namespace: &str, hostname: &str) -> String {
    label("services", index, namespace, hostname)
}

/// `policies[0] ("<namespace>/<name>")`.
pub(super) fn policy_label(index: usize, namespace: &str, name: &str) -> String {
    label("policies", index, namespace, name)
}

fn label(list: &str, index: usize, namespace: &str, name: &str) -> String {
    if namespace.is_empty() && name.is_empty() {
        format!("{list}[{index}]")
    } else {
        format!("{list}[{index}] (\"{namespace}/{name}\")")
    }
}

pub(super) fn workload(ctx: &Ctx<'_>, w: raw::Workload) -> Result<pw::Workload, LocalConfigError> {
    let addresses = w
        .workload_ips
        .iter()
        .enumerate()
        .map(|(i, s)| ctx.ip(&format!("workloadIps[{i}]"), s).map(ip_bytes))
        .collect::<Result<Vec<_>, _>>()?;
    let tunnel_protocol = ctx.enumeration(
        "protocol",
        w.protocol.as_deref(),
        PROTOCOLS,
        "HBONE, TCP, LEGACY_ISTIO_MTLS",
    )?;
    let network_mode = ctx.enumeration(
        "networkMode",
        w.network_mode.as_deref(),
        NETWORK_MODES,
        "Standard, HostNetwork",
    )?;
    let status = ctx.enumeration(
        "status",
        w.status.as_deref(),
        STATUSES,
        "Healthy, Unhealthy",
    )?;
    let workload_type = ctx.enumeration(
        "workloadType",
        w.workload_type.as_deref(),
        WORKLOAD_TYPES,
        "deployment, cronjob, pod, job",
    )?;
    let application_tunnel = match w.application_tunnel {
        None => None,
        Some(t) => Some(pw::ApplicationTunnel {
            protocol: ctx.enumeration(
                "applicationTunnel.protocol",
                t.protocol.as_deref(),
                APP_TUNNEL_PROTOCOLS,
                "NONE, PROXY",
            )?,
            port: t.port,
        }),
    };
    let waypoint = w
        .waypoint
        .map(|g| gateway(ctx, "waypoint", g))
        .transpose()?;
    let network_gateway = w
        .network_gateway
        .map(|g| gateway(ctx, "networkGateway", g))
        .transpose()?;
    let services = w
        .services
        .0
        .into_iter()
        .map(|(key, ports)| {
            (
                key,
                pw::PortList {
                    ports: ports_of(ports),
                },
            )
        })
        .collect();
    Ok(pw::Workload {
        uid: w.uid,
        name: w.name,
        namespace: w.namespace,
        addresses,
        hostname: w.hostname,
        network: w.network,
        tunnel_protocol,
        trust_domain: w.trust_domain,
        service_account: w.service_account,
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
        locality: w.locality.map(|l| pw::Locality {
            region: l.region,
            zone: l.zone,
            subzone: l.subzone,
        }),
        network_mode,
        extensions: Vec::new(),
        capacity: w.capacity,
    })
}

fn ports_of(ports: raw::PortMap) -> Vec<pw::Port> {
    ports
        .0
        .into_iter()
        .map(|(service, target)| pw::Port {
            service_port: service.0,
            target_port: target.0,
            app_protocol: pw::AppProtocol::Unknown as i32,
        })
        .collect()
}

fn gateway(
    ctx: &Ctx<'_>,
    field: &str,
    g: raw::Gateway,
) -> Result<pw::GatewayAddress, LocalConfigError> {
    use pw::gateway_address::Destination;
    let destination = match (g.destination, g.hostname) {
        (Some(_), Some(_)) => {
            return Err(ctx.err(field, "either `destination` or `hostname`", "both"))
        }
        (Some(d), None) => {
            let expected = "\"<network>/<ip>\" or \"<namespace>/<hostname>\"";
            let (left, right) = d.split_once('/').ok_or_else(|| {
                ctx.err(format!("{field}.destination"), expected, format!("{d:?}"))
            })?;
            Some(match right.trim().parse::<IpAddr>() {
                Ok(ip) => Destination::Address(pw::NetworkAddress {
                    network: left.to_owned(),
                    address: ip_bytes(ip),
                    length: None,
                }),
                Err(_) => Destination::Hostname(pw::NamespacedHostname {
                    namespace: left.to_owned(),
                    hostname: right.to_owned(),
                }),
            })
        }
        (None, Some(h)) => Some(Destination::Hostname(pw::NamespacedHostname {
            namespace: h.namespace,
            hostname: h.hostname,
        })),
        // The conversion rejects a gateway without a destination, as it does for xDS.
        (None, None) => None,
    };
    Ok(pw::GatewayAddress {
        destination,
        hbone_mtls_port: g.hbone_mtls_port,
    })
}

pub(super) fn service(ctx: &Ctx<'_>, s: raw::Service) -> Result<pw::Service, LocalConfigError> {
    let addresses = s
        .vips
        .iter()
        .enumerate()
        .map(|(i, v)| ctx.vip(&format!("vips[{i}]"), v))
        .collect::<Result<Vec<_>, _>>()?;
    let load_balancing = s
        .load_balancer
        .map(|lb| load_balancing(ctx, lb))
        .transpose()?;
    let ip_families = ctx.enumeration(
        "ipFamilies",
        s.ip_families.as_deref(),
        IP_FAMILIES,
        "Automatic, IPv4Only, IPv6Only, Dual",
    )?;
    let visibility = ctx.enumeration(
        "visibility",
        s.visibility.as_deref(),
        VISIBILITY,
        "Public, Namespace",
    )?;
    let waypoint = s
        .waypoint
        .map(|g| gateway(ctx, "waypoint", g))
        .transpose()?;
    let weighted_waypoints = s
        .weighted_waypoints
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            Ok(pw::WeightedWaypoint {
                destination: Some(gateway(
                    ctx,
                    &format!("weightedWaypoints[{i}].waypoint"),
                    w.waypoint,
                )?),
                weight: w.weight,
            })
        })
        .collect::<Result<Vec<_>, LocalConfigError>>()?;
    Ok(pw::Service {
        name: s.name,
        namespace: s.namespace,
        hostname: s.hostname,
        addresses,
        ports: ports_of(s.ports),
        subject_alt_names: s.subject_alt_names,
        waypoint,
        load_balancing,
        ip_families,
        canonical: s.canonical,
        visibility,
        weighted_waypoints,
        ..Default::default()
    })
}

fn load_balancing(
    ctx: &Ctx<'_>,
    lb: raw::LoadBalancer,
) -> Result<pw::LoadBalancing, LocalConfigError> {
    let routing_preference = lb
        .routing_preferences
        .iter()
        .enumerate()
        .map(|(i, s)| {
            ctx.enumeration(
                &format!("loadBalancer.routingPreferences[{i}]"),
                Some(s),
                LB_SCOPES,
                "Region, Zone, Subzone, Node, Cluster, Network",
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(pw::LoadBalancing {
        routing_preference,
        mode: ctx.enumeration(
            "loadBalancer.mode",
            lb.mode.as_deref(),
            LB_MODES,
            "Standard, Strict, Failover, Passthrough",
        )?,
        health_policy: ctx.enumeration(
            "loadBalancer.healthPolicy",
            lb.health_policy.as_deref(),
            HEALTH_POLICIES,
            "OnlyHealthy, AllowAll",
        )?,
    })
}

pub(super) fn policy(
    ctx: &Ctx<'_>,
    p: raw::Policy,
) -> Result<psec::Authorization, LocalConfigError> {
    let scope = ctx.enumeration(
        "scope",
        Some(&p.scope),
        POLICY_SCOPES,
        "Global, Namespace, WorkloadSelector",
    )?;
    let action = ctx.enumeration("action", Some(&p.action), ACTIONS, "Allow, Deny")?;
    let mut rules = Vec::with_capacity(p.rules.len());
    for (ri, rule) in p.rules.into_iter().enumerate() {
        let mut clauses = Vec::with_capacity(rule.len());
        for (ci, clause) in rule.into_iter().enumerate() {
            let matches = clause
                .into_iter()
                .enumerate()
                .map(|(mi, m)| rbac_match(ctx, &format!("rules[{ri}][{ci}][{mi}]"), m))
                .collect::<Result<Vec<_>, _>>()?;
            clauses.push(psec::Clause { matches });
        }
        rules.push(psec::Rule { clauses });
    }
    Ok(psec::Authorization {
        name: p.name,
        namespace: p.namespace,
        scope,
        action,
        rules,
        dry_run: p.dry_run,
        extensions: Vec::new(),
    })
}

fn rbac_match(ctx: &Ctx<'_>, field: &str, m: raw::Match) -> Result<psec::Match, LocalConfigError> {
    let cidrs = |name: &str, v: &[String]| {
        v.iter()
            .enumerate()
            .map(|(i, s)| ctx.cidr(&format!("{field}.{name}[{i}]"), s))
            .collect::<Result<Vec<_>, _>>()
    };
    let strings = |v: Vec<raw::StringMatch>| v.into_iter().map(string_match).collect();
    let accounts = |v: Vec<raw::ServiceAccount>| {
        v.into_iter()
            .map(|a| psec::ServiceAccountMatch {
                namespace: a.namespace,
                service_account: a.service_account,
            })
            .collect()
    };
    Ok(psec::Match {
        source_ips: cidrs("sourceIps", &m.source_ips)?,
        not_source_ips: cidrs("notSourceIps", &m.not_source_ips)?,
        destination_ips: cidrs("destinationIps", &m.destination_ips)?,
        not_destination_ips: cidrs("notDestinationIps", &m.not_destination_ips)?,
        namespaces: strings(m.namespaces),
        not_namespaces: strings(m.not_namespaces),
        service_accounts: accounts(m.service_accounts),
        not_service_accounts: accounts(m.not_service_accounts),
        principals: strings(m.principals),
        not_principals: strings(m.not_principals),
        destination_ports: m.destination_ports,
        not_destination_ports: m.not_destination_ports,
        extensions: Vec::new(),
    })
}

fn string_match(s: raw::StringMatch) -> psec::StringMatch {
    use psec::string_match::MatchType;
    psec::StringMatch {
        match_type: Some(match s {
            raw::StringMatch::Exact(x) => MatchType::Exact(x),
            raw::StringMatch::Prefix(x) => MatchType::Prefix(x),
            raw::StringMatch::Suffix(x) => MatchType::Suffix(x),
            raw::StringMatch::Presence => MatchType::Presence(()),
        }),
    }
}
