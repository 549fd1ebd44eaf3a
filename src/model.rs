//! Plain domain types of the mesh: workloads, services, endpoints, authorization policies and
//! identities, validated once at the trust boundary (`TryFrom` the protobuf messages).
//!
//! Invariants: every value of these types is valid (IPs have 4 or 16 bytes, ports are non-zero where
//! they must be, enums are known). Conversion never panics; it returns a [`ValidationError`] naming the
//! resource and the field. This module does no I/O.

mod authorization;
mod convert;
mod identity;
mod service;
mod workload;

use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use authorization::{
    Action, Authorization, Match, PolicyKey, PolicyScope, ServiceAccountMatch, StringMatch,
};
pub use convert::{Resource, ValidationError};
pub use identity::{IdentityError, SpiffeId};
pub use service::{
    best_match, HealthPolicy, IpFamilies, LoadBalancing, LoadBalancingMode, NetworkCidr,
    RoutingScope, Service, ServiceKey, Visibility, WeightedWaypoint,
};
pub use workload::{
    AppTunnel, Endpoint, GatewayAddress, GatewayDestination, Locality, PortMap, TunnelProtocol,
    Workload, WorkloadInfo, WorkloadStatus, WorkloadType, WorkloadUid,
};

/// An IP on a named network. Istio allows overlapping IP ranges on different networks, so an IP alone
/// does not identify a workload or a VIP; the default network is the empty string.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct NetworkAddr {
    pub network: Arc<str>,
    pub ip: IpAddr,
}

impl NetworkAddr {
    pub fn new(network: impl Into<Arc<str>>, ip: IpAddr) -> Self {
        Self {
            network: network.into(),
            ip,
        }
    }
}

impl fmt::Display for NetworkAddr {
    /// `<network>/<ip>`: the form of VIPs in config files and of on-demand xDS names.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.network, self.ip)
    }
}

/// Serialises a duration as `"10s"`-style text in configuration dumps.
pub fn serialize_duration<S: serde::Serializer>(
    d: &std::time::Duration,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
}
