//! Services: VIPs and hostnames in front of a set of workload endpoints.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use super::{GatewayAddress, NetworkAddr};

/// `<namespace>/<hostname>`: the xDS name of a service, and the key workloads use to join it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceKey(pub Arc<str>);

impl ServiceKey {
    /// Validates `namespace/hostname`: both parts non-empty, the hostname without `/` or spaces.
    pub fn parse(s: &str) -> Result<Self, &'static str> {
        let (ns, host) = s
            .split_once('/')
            .ok_or("expected <namespace>/<hostname>, found no '/'")?;
        if ns.is_empty() || host.is_empty() {
            return Err("expected <namespace>/<hostname>, one of them is empty");
        }
        if host.contains('/') || s.chars().any(char::is_whitespace) {
            return Err("expected <namespace>/<hostname>, found '/' or whitespace in the hostname");
        }
        Ok(Self(s.into()))
    }

    pub fn from_parts(namespace: &str, hostname: &str) -> Self {
        Self(format!("{namespace}/{hostname}").into())
    }

    pub fn namespace(&self) -> &str {
        self.0.split_once('/').map_or("", |(ns, _)| ns)
    }

    pub fn hostname(&self) -> &str {
        self.0.split_once('/').map_or("", |(_, h)| h)
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum LoadBalancingMode {
    /// Weighted random by capacity over every eligible endpoint (no routing preference).
    Standard,
    /// Only endpoints that match every routing preference of the client.
    Strict,
    /// Prefer the endpoints that match the longest prefix of the routing preferences.
    Failover,
    /// Send to the original destination as-is (no endpoint selection).
    Passthrough,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum RoutingScope {
    Region,
    Zone,
    Subzone,
    Node,
    Cluster,
    Network,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum HealthPolicy {
    OnlyHealthy,
    AllowAll,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct LoadBalancing {
    pub mode: LoadBalancingMode,
    pub routing_preference: Vec<RoutingScope>,
    pub health_policy: HealthPolicy,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        Self {
            mode: LoadBalancingMode::Standard,
            routing_preference: Vec::new(),
            health_policy: HealthPolicy::OnlyHealthy,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum IpFamilies {
    Automatic,
    Ipv4Only,
    Ipv6Only,
    Dual,
}

/// A service address covering a range (a ServiceEntry's CIDR address, e.g. `10.1.0.0/16`): a
/// destination inside it that is no exact VIP goes to the service, the longest prefix first.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct NetworkCidr {
    pub network: Arc<str>,
    pub net: ipnet::IpNet,
}

impl NetworkCidr {
    /// Whether `addr` is inside this range, on the same network.
    pub fn contains(&self, addr: &NetworkAddr) -> bool {
        self.network == addr.network && self.net.contains(&addr.ip)
    }
}

/// Who may see a service (Kubernetes `exportTo`): everyone, or its own namespace only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub enum Visibility {
    #[default]
    Public,
    Namespace,
}

/// A service of the mesh.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    /// Exact addresses (a prefix of the full length, or none).
    pub vips: Vec<NetworkAddr>,
    /// Address ranges (a shorter prefix).
    pub cidr_vips: Vec<NetworkCidr>,
    /// Service port → target port; a target of 0 means "the endpoint's own mapping".
    pub ports: BTreeMap<u16, u16>,
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
    /// Several waypoints sharing the service's traffic by weight (a waypoint canary); when set,
    /// a connection picks one of them instead of `waypoint`.
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    pub load_balancing: LoadBalancing,
    pub ip_families: IpFamilies,
    pub canonical: bool,
    /// Enforced only where l4mesh is asked to be stricter than ztunnel (the DNS proxy's
    /// `L4MESH_DNS_RESPECT_VISIBILITY`); ztunnel carries it and decides nothing by it.
    pub visibility: Visibility,
}

/// One of a service's weighted waypoints.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WeightedWaypoint {
    pub gateway: GatewayAddress,
    pub weight: u32,
}

impl Service {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::from_parts(&self.namespace, &self.hostname)
    }

    /// Every waypoint of the service (the weighted ones, else the one): a tunnel dialled on any of
    /// them is the service's waypoint traffic.
    pub fn waypoints(&self) -> impl Iterator<Item = &GatewayAddress> {
        let weighted = self.weighted_waypoints.iter().map(|x| &x.gateway);
        let single = self
            .waypoint
            .iter()
            .filter(|_| self.weighted_waypoints.is_empty());
        weighted.chain(single)
    }
}

/// Among services sharing an address or a hostname, the one a client means (ztunnel's
/// `ServiceMatch`): the one in the client's namespace, else the canonical one, else the one in
/// `preferred_namespace`, else the first given.
pub fn best_match<'a>(
    services: impl Iterator<Item = &'a Arc<Service>>,
    client_namespace: Option<&str>,
    preferred_namespace: Option<&str>,
) -> Option<&'a Arc<Service>> {
    let (mut canonical, mut preferred, mut first) = (None, None, None);
    for s in services {
        if client_namespace == Some(s.namespace.as_str()) {
            return Some(s);
        }
        if s.canonical {
            canonical = canonical.or(Some(s));
        } else if preferred_namespace == Some(s.namespace.as_str()) {
            preferred = preferred.or(Some(s));
        }
        first = first.or(Some(s));
    }
    canonical.or(preferred).or(first)
}
