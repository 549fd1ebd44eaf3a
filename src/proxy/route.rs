//! Choosing the upstream of an outbound connection from its original destination: a service VIP
//! becomes a load-balanced endpoint (with the port mapped to the endpoint's target port), a workload
//! IP that workload, anything else a passthrough. A service (or, dialled directly, a workload) with a
//! waypoint goes to the waypoint instead ([`waypoint`]). Pure: the caller passes the snapshot and
//! the RNG.

pub mod gateway;
pub mod waypoint;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use rand::Rng;

use crate::model::{
    GatewayAddress, HealthPolicy, LoadBalancing, LoadBalancingMode, NetworkAddr, RoutingScope,
    Service, ServiceKey, TunnelProtocol, Workload, WorkloadStatus,
};
use crate::store::Snapshot;
pub use gateway::NetworkGateway;
pub use waypoint::Waypoint;

/// Where an outbound connection goes.
#[derive(Clone, Debug)]
pub struct Upstream {
    /// The address to connect to (the endpoint's IP and target port, or the original destination).
    pub addr: SocketAddr,
    /// The destination workload, when the destination is in the mesh.
    pub workload: Option<Arc<Workload>>,
    /// The service the client addressed, when it dialled a VIP.
    pub service: Option<Arc<Service>>,
    pub kind: UpstreamKind,
    /// Set when the connection goes through a waypoint: the tunnel is opened to it (kind HBONE),
    /// and `addr` is the original destination, sent as the `:authority`.
    pub waypoint: Option<Waypoint>,
    /// The chosen endpoint is known by this hostname only (a DNS-resolution ServiceEntry): the
    /// IP of `addr` is unspecified until the outbound path resolves it (on-demand DNS); its
    /// port is the target port.
    pub hostname: Option<Arc<str>>,
    /// Set when the chosen endpoint is on another network: the connection is a double HBONE
    /// tunnel through that network's gateway ([`gateway`]), `addr` the gateway's HBONE address.
    pub gateway: Option<NetworkGateway>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamKind {
    /// A mesh workload reached over plain TCP (its protocol is TCP).
    Tcp,
    /// A mesh workload that expects an HBONE tunnel.
    Hbone,
    /// Not in the mesh (or a PASSTHROUGH service): straight to the original destination.
    Passthrough,
}

/// Why no upstream could be chosen. The client connection is closed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("service {service} has no healthy endpoint for port {port} (are its pods ready? is the workload's `services` map listing it?)")]
    NoHealthyEndpoint { service: ServiceKey, port: u16 },
    #[error("service {service} does not expose port {port}: expected one of {known:?}")]
    UnknownServicePort {
        service: ServiceKey,
        port: u16,
        known: Vec<u16>,
    },
    #[error("the waypoint {waypoint} of {owner} is not in the mesh state: expected a workload at that address or a service with that hostname (is the waypoint deployed, and has the control plane sent it?)")]
    WaypointUnknown { owner: String, waypoint: String },
    #[error("the waypoint {waypoint} of {owner} has no healthy endpoint (are the waypoint's pods ready?)")]
    WaypointNoEndpoint { owner: String, waypoint: String },
    #[error("the endpoint of {service} is known by hostname only, and on-demand DNS found no address: {reason}")]
    HostnameUnresolved { service: ServiceKey, reason: String },
    #[error("endpoint {workload} of {service} is on network {network:?}, not this node's {local:?}, and has no network gateway: cross-network traffic needs one")]
    NoNetworkGateway {
        service: ServiceKey,
        workload: String,
        network: String,
        local: String,
    },
    #[error("the network gateway {gateway} of {workload} is not in the mesh state (is the east-west gateway deployed, and has the control plane sent it?)")]
    GatewayUnknown { workload: String, gateway: String },
    #[error(
        "the network gateway {gateway} of {workload} has no healthy endpoint on its port {port}"
    )]
    GatewayNoEndpoint {
        workload: String,
        gateway: String,
        port: u16,
    },
    #[error("service {service} has no subject_alt_names: its endpoints on network {network:?} are reached through a gateway, and the tunnel inside must verify the service's identity")]
    NoServiceSans {
        service: ServiceKey,
        network: String,
    },
    #[error("the waypoint of {owner} is on network {network:?} and named by address: through a network gateway it must be a waypoint service (named by hostname), whose subject_alt_names the tunnel inside verifies")]
    RemoteWaypointByAddress { owner: String, network: String },
}

/// Resolves the upstream for a connection from `src` (the client workload, if known) to `dst`.
pub fn route(
    snapshot: &Snapshot,
    network: &Arc<str>,
    src: Option<&Workload>,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    let key = NetworkAddr::new(network.clone(), dst.ip());
    let client_ns = src.map(|w| w.namespace.as_str());
    if let Some(svc) = snapshot.service_by_vip(&key, client_ns) {
        return to_service(snapshot, network, svc, src, dst, rng);
    }
    if let Some(wl) = snapshot.workload_by_addr(&key) {
        if let Some(gw) = &wl.waypoint {
            let owner = format!("workload {}/{}", wl.namespace, wl.name);
            let local = src.map_or(&**network, |s| &*s.network);
            if let Some(wp) = waypoint::resolve(snapshot, gw, &owner, src, local, dst, rng)? {
                return Ok(via(wp, dst, Some(wl.clone()), None));
            }
        }
        return Ok(Upstream {
            addr: dst,
            kind: kind_of(wl),
            workload: Some(wl.clone()),
            service: None,
            waypoint: None,
            hostname: None,
            gateway: None,
        });
    }
    // An address range (a ServiceEntry's CIDR) last: a VIP or a workload's own address wins.
    if let Some(svc) = snapshot.service_by_range(&key, client_ns) {
        return to_service(snapshot, network, svc, src, dst, rng);
    }
    Ok(Upstream {
        addr: dst,
        workload: None,
        service: None,
        kind: UpstreamKind::Passthrough,
        waypoint: None,
        hostname: None,
        gateway: None,
    })
}

/// A connection to service `svc`: through one of its waypoints, unless the client is one of
/// them (its own traffic is not sent back to a waypoint), else to an endpoint.
fn to_service(
    snapshot: &Snapshot,
    network: &str,
    svc: &Arc<Service>,
    src: Option<&Workload>,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    // Asked only of a service that has a waypoint.
    let from_a_waypoint = || {
        src.is_some_and(|s| {
            svc.waypoints()
                .any(|gw| waypoint::is_waypoint(snapshot, gw, s))
        })
    };
    if let Some(gw) = pick_waypoint(svc, rng).filter(|_| !from_a_waypoint()) {
        let owner = format!("service {}", svc.key());
        let local = src.map_or(network, |s| &*s.network);
        if let Some(wp) = waypoint::resolve(snapshot, gw, &owner, src, local, dst, rng)? {
            if *wp.workload.network == *local {
                return Ok(via(wp, dst, None, Some(svc.clone())));
            }
            // A waypoint on another network: through its gateway, proving the waypoint
            // service's SANs (a waypoint named by address has none).
            let wp_svc = match &gw.destination {
                crate::model::GatewayDestination::Hostname(key) => snapshot.service(key),
                crate::model::GatewayDestination::Address(_) => None,
            };
            return match wp_svc {
                Some(wp_svc) => {
                    gateway::to_waypoint(snapshot, svc, &wp.workload, wp_svc, src, local, dst, rng)
                }
                None => Err(RouteError::RemoteWaypointByAddress {
                    owner,
                    network: wp.workload.network.to_string(),
                }),
            };
        }
    }
    service_endpoint(snapshot, network, svc, src, dst, &|_, _| true, rng)
}

/// An upstream through waypoint `wp`: the authority stays the original destination `dst` (the
/// waypoint applies its policy to what the client dialled, then routes it itself).
fn via(
    wp: Waypoint,
    dst: SocketAddr,
    workload: Option<Arc<Workload>>,
    service: Option<Arc<Service>>,
) -> Upstream {
    Upstream {
        addr: dst,
        workload,
        service,
        kind: UpstreamKind::Hbone,
        waypoint: Some(wp),
        hostname: None,
        gateway: None,
    }
}

fn kind_of(wl: &Workload) -> UpstreamKind {
    match wl.protocol {
        TunnelProtocol::Hbone => UpstreamKind::Hbone,
        TunnelProtocol::Tcp | TunnelProtocol::LegacyIstioMtls => UpstreamKind::Tcp,
    }
}

/// Load-balances `dst` (a VIP of `svc`) over the service's endpoints for which `keep(workload, ip)`
/// holds, ignoring the service's waypoint: what a waypoint does with the traffic sent to it. The
/// filter runs *before* the choice, so an endpoint this proxy cannot serve is never picked. An
/// endpoint known by hostname only is a candidate with no IP (`keep(workload, None)`), and so is
/// one on another network that has a gateway (the gateway finds it).
///
/// An endpoint on another network than the client's (`network` when the client is unknown) is
/// reached through its `network_gateway` (ztunnel's rule: no gateway is an error, not a skip).
/// Endpoints of every network are candidates alike unless the service prefers its own
/// (`routingPreference` with `NETWORK`, FAILOVER or STRICT): "network first".
pub fn service_endpoint(
    snapshot: &Snapshot,
    network: &str,
    svc: &Arc<Service>,
    src: Option<&Workload>,
    dst: SocketAddr,
    keep: &dyn Fn(&Workload, Option<IpAddr>) -> bool,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    let port = dst.port();
    if svc.load_balancing.mode == LoadBalancingMode::Passthrough {
        return Ok(Upstream {
            addr: dst,
            workload: None,
            service: Some(svc.clone()),
            kind: UpstreamKind::Passthrough,
            waypoint: None,
            hostname: None,
            gateway: None,
        });
    }
    let svc_target = svc.ports.get(&port).copied();
    let key = svc.key();
    let local = src.map_or(network, |s| &*s.network);
    let mut candidates: Vec<Candidate<'_>> = Vec::new();
    let mut any_port_mapping = svc_target.is_some();
    for (wl, ep) in snapshot.endpoints(&key) {
        let target = match ep.ports.get(&port).copied() {
            Some(t) if t != 0 => Some(t),
            _ => svc_target.filter(|t| *t != 0),
        };
        any_port_mapping |= ep.ports.contains_key(&port);
        let Some(target) = target else {
            continue;
        };
        let ip = pick_ip(wl, dst.ip());
        let remote = *wl.network != *local;
        if ip.is_none() && wl.hostname.is_empty() && !(remote && wl.network_gateway.is_some()) {
            continue;
        }
        if !keep(wl, ip) {
            continue;
        }
        candidates.push(Candidate { wl, ip, target });
    }
    if !any_port_mapping {
        return Err(RouteError::UnknownServicePort {
            service: key,
            port,
            known: svc.ports.keys().copied().collect(),
        });
    }
    let chosen = select(&candidates, &svc.load_balancing, src, rng)
        .ok_or(RouteError::NoHealthyEndpoint { service: key, port })?;
    let c = &candidates[chosen];
    if *c.wl.network != *local {
        return gateway::through(snapshot, svc, c.wl, src, local, dst, rng);
    }
    let unspecified = match dst.ip() {
        IpAddr::V4(_) => IpAddr::from(std::net::Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
    };
    Ok(Upstream {
        addr: SocketAddr::new(c.ip.unwrap_or(unspecified), c.target),
        kind: kind_of(c.wl),
        workload: Some(c.wl.clone()),
        service: Some(svc.clone()),
        waypoint: None,
        hostname: c.ip.is_none().then(|| c.wl.hostname.as_str().into()),
        gateway: None,
    })
}

/// The workload address of the same family as the VIP, else its first one.
fn pick_ip(wl: &Workload, like: IpAddr) -> Option<IpAddr> {
    wl.addresses
        .iter()
        .find(|a| a.is_ipv4() == like.is_ipv4())
        .or(wl.addresses.first())
        .copied()
}

/// One endpoint of a hop's service (a waypoint's or a network gateway's), chosen as the service's
/// VIP would be for `src`: `target` gives each endpoint's port from its port map, and
/// `addressless` says which endpoints without an address of `dst`'s family still count (they
/// are reached through their own gateway). `None` when no endpoint qualifies.
pub(super) fn hop_endpoint(
    snapshot: &Snapshot,
    svc: &Service,
    src: Option<&Workload>,
    dst: IpAddr,
    target: impl Fn(&crate::model::PortMap) -> u16,
    addressless: impl Fn(&Workload) -> bool,
    rng: &mut impl Rng,
) -> Option<(Arc<Workload>, Option<IpAddr>, u16)> {
    let candidates: Vec<Candidate<'_>> = snapshot
        .endpoints(&svc.key())
        .filter_map(|(wl, ep)| {
            let ip = pick_ip(wl, dst);
            (ip.is_some() || addressless(wl)).then(|| Candidate {
                wl,
                ip,
                target: target(&ep.ports),
            })
        })
        .collect();
    let c = &candidates[select(&candidates, &svc.load_balancing, src, rng)?];
    Some((c.wl.clone(), c.ip, c.target))
}

/// An endpoint eligible for a connection: its workload, address (`None`: known by hostname
/// only) and target port.
pub struct Candidate<'a> {
    pub wl: &'a Arc<Workload>,
    pub ip: Option<IpAddr>,
    pub target: u16,
}

/// Picks an endpoint (an index into `candidates`) with Istio's load-balancing semantics:
/// unhealthy endpoints are skipped unless the health policy allows all; in STRICT and FAILOVER
/// modes (STANDARD ignores routing preferences, as ztunnel), endpoints are ranked by how many leading scopes they share with the client (STRICT keeps only
/// full matches, FAILOVER the best rank present); among the survivors, weighted random by capacity.
pub fn select(
    candidates: &[Candidate<'_>],
    lb: &LoadBalancing,
    src: Option<&Workload>,
    rng: &mut impl Rng,
) -> Option<usize> {
    let ranked: Vec<(usize, usize)> = candidates
        .iter()
        .enumerate()
        .filter(|(_, c)| {
            lb.health_policy == HealthPolicy::AllowAll || c.wl.status == WorkloadStatus::Healthy
        })
        .filter_map(|(i, c)| {
            // Standard mode weighs no routing preference (ztunnel's rule).
            let rank = match lb.mode {
                LoadBalancingMode::Standard => 0,
                _ => rank(&lb.routing_preference, src, c.wl),
            };
            if lb.mode == LoadBalancingMode::Strict && rank != lb.routing_preference.len() {
                return None;
            }
            Some((i, rank))
        })
        .collect();
    let best = ranked.iter().map(|(_, r)| *r).max()?;
    let pool: Vec<usize> = ranked
        .iter()
        .filter(|(_, r)| *r == best)
        .map(|(i, _)| *i)
        .collect();
    weighted(&pool, candidates, rng)
}

/// How many leading routing-preference scopes `wl` shares with the client.
fn rank(prefs: &[RoutingScope], src: Option<&Workload>, wl: &Workload) -> usize {
    let Some(src) = src else {
        return 0;
    };
    prefs
        .iter()
        .take_while(|scope| match scope {
            RoutingScope::Region => src.locality.region == wl.locality.region,
            RoutingScope::Zone => src.locality.zone == wl.locality.zone,
            RoutingScope::Subzone => src.locality.subzone == wl.locality.subzone,
            RoutingScope::Node => src.node == wl.node,
            RoutingScope::Cluster => src.cluster_id == wl.cluster_id,
            RoutingScope::Network => src.network == wl.network,
        })
        .count()
}

fn weighted(pool: &[usize], candidates: &[Candidate<'_>], rng: &mut impl Rng) -> Option<usize> {
    weighted_choice(pool, |i| u64::from(candidates[*i].wl.capacity), rng).copied()
}

/// One of `items` drawn with probability proportional to `weight` (all weights 0: uniformly).
fn weighted_choice<'a, T>(
    items: &'a [T],
    weight: impl Fn(&T) -> u64,
    rng: &mut impl Rng,
) -> Option<&'a T> {
    if items.is_empty() {
        return None;
    }
    let total: u64 = items.iter().map(&weight).sum();
    if total == 0 {
        return items.get(rng.random_range(0..items.len()));
    }
    let mut pick = rng.random_range(0..total);
    for item in items {
        let w = weight(item);
        if pick < w {
            return Some(item);
        }
        pick -= w;
    }
    items.last()
}

/// The waypoint one connection to `svc` goes through: one of its weighted waypoints drawn by
/// weight, else its waypoint.
pub fn pick_waypoint<'a>(svc: &'a Service, rng: &mut impl Rng) -> Option<&'a GatewayAddress> {
    if svc.weighted_waypoints.is_empty() {
        return svc.waypoint.as_ref();
    }
    weighted_choice(&svc.weighted_waypoints, |w| u64::from(w.weight), rng).map(|w| &w.gateway)
}

#[cfg(test)]
mod tests;
