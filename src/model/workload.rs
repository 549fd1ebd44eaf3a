//! Workloads (pods, VMs) and the endpoints they contribute to services.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use super::{NetworkAddr, ServiceKey, SpiffeId};

/// The unique id of a workload (`cluster1//v1/Pod/ns/name`): its xDS resource name.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct WorkloadUid(pub Arc<str>);

impl std::fmt::Display for WorkloadUid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// How a workload accepts mesh traffic: through an HBONE tunnel, or plain TCP (not in the mesh).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum TunnelProtocol {
    Tcp,
    Hbone,
    /// Sidecar-era Istio mTLS; l4mesh sends plain TCP to it, as ztunnel does.
    LegacyIstioMtls,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WorkloadStatus {
    Healthy,
    Unhealthy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum WorkloadType {
    Deployment,
    CronJob,
    Pod,
    Job,
}

/// Where a workload runs, for locality-aware load balancing.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// A waypoint or network gateway: traffic to the owner goes through it over HBONE.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct GatewayAddress {
    pub destination: GatewayDestination,
    pub hbone_mtls_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum GatewayDestination {
    Address(NetworkAddr),
    Hostname(ServiceKey),
}

/// PROXY protocol towards the application (the workload's `application_tunnel`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct AppTunnel {
    pub proxy_protocol: bool,
    pub port: Option<u16>,
}

/// Service port → target port of one workload for one service. A target of 0 means "not mapped here"
/// (the service's own target port applies).
pub type PortMap = BTreeMap<u16, u16>;

/// A workload of the mesh, as the control plane describes it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Workload {
    pub uid: WorkloadUid,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub trust_domain: String,
    pub addresses: Vec<IpAddr>,
    pub hostname: String,
    pub network: Arc<str>,
    pub protocol: TunnelProtocol,
    pub waypoint: Option<GatewayAddress>,
    pub network_gateway: Option<GatewayAddress>,
    pub node: String,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_type: WorkloadType,
    pub workload_name: String,
    pub native_tunnel: bool,
    pub application_tunnel: Option<AppTunnel>,
    pub services: BTreeMap<ServiceKey, PortMap>,
    /// Keys (`namespace/name`) of the WORKLOAD_SELECTOR policies that select this workload.
    pub authorization_policies: Vec<String>,
    pub status: WorkloadStatus,
    pub cluster_id: String,
    pub locality: Locality,
    pub host_network: bool,
    /// Relative weight in load balancing (default 1).
    pub capacity: u32,
}

impl Workload {
    /// The identity this workload's certificate carries.
    pub fn identity(&self) -> SpiffeId {
        SpiffeId::new(&self.trust_domain, &self.namespace, &self.service_account)
    }

    /// Whether this workload's certificate carries `id`, compared field by field: no string is
    /// built, which matters where it is asked for every connection.
    pub fn has_identity(&self, id: &SpiffeId) -> bool {
        self.service_account == id.service_account
            && self.namespace == id.namespace
            && self.trust_domain == id.trust_domain
    }

    /// The workload's addresses on its network: the keys it is found by.
    pub fn network_addrs(&self) -> impl Iterator<Item = NetworkAddr> + '_ {
        self.addresses
            .iter()
            .map(|ip| NetworkAddr::new(self.network.clone(), *ip))
    }
}

/// One workload's membership in one service: which workload, and its port mapping.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    pub workload: WorkloadUid,
    pub ports: PortMap,
}

/// `<namespace>/<name>/<service account>` of a workload named outside the mesh state: the one a
/// dedicated-mode l4mesh serves (`PROXY_WORKLOAD_INFO`), or a pod the CNI agent hands over (ZDS).
/// Matching by name means neither identity nor the destinations served depend on an address a
/// workload can choose.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct WorkloadInfo {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
}

impl std::str::FromStr for WorkloadInfo {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.split('/').collect::<Vec<_>>().as_slice() {
            [ns, name, sa] if !ns.is_empty() && !name.is_empty() && !sa.is_empty() => Ok(Self {
                namespace: (*ns).into(),
                name: (*name).into(),
                service_account: (*sa).into(),
            }),
            _ => Err(format!(
                "expected <namespace>/<name>/<service account>, found {s:?}"
            )),
        }
    }
}

impl WorkloadInfo {
    /// Whether `wl` is this workload.
    pub fn is(&self, wl: &Workload) -> bool {
        wl.name == self.name && wl.namespace == self.namespace
    }
}
