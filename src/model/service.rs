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
    pub vips: Vec<NetworkAddr>,
    /// Service port → target port; a target of 0 means "the endpoint's own mapping".
    pub ports: BTreeMap<u16, u16>,
    pub subject_alt_names: Vec<String>,
    pub waypoint: Option<GatewayAddress>,
    pub load_balancing: LoadBalancing,
    pub ip_families: IpFamilies,
    pub canonical: bool,
    /// Enforced only where l4mesh is asked to be stricter than ztunnel (the DNS proxy's
    /// `L4MESH_DNS_RESPECT_VISIBILITY`); ztunnel carries it and decides nothing by it.
    pub visibility: Visibility,
}

impl Service {
    pub fn key(&self) -> ServiceKey {
        ServiceKey::from_parts(&self.namespace, &self.hostname)
    }
}
