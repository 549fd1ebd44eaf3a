//! Waypoints: a destination service (or, without a service, a workload) whose `waypoint` is set is
//! reached through that waypoint over HBONE, with the original destination as the authority. Pure,
//! like the rest of routing: resolution reads the snapshot only.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;

use super::{hop_endpoint, pick_ip, RouteError};
use crate::model::{GatewayAddress, GatewayDestination, SpiffeId, Workload};
use crate::store::Snapshot;

/// The waypoint a connection goes through instead of its destination.
#[derive(Clone, Debug)]
pub struct Waypoint {
    /// The waypoint workload: the tunnel must prove its identity.
    pub workload: Arc<Workload>,
    /// `<waypoint ip>:<hbone_mtls_port>`, where the tunnel is opened. Unspecified for a waypoint
    /// on another network that has no address here: it is reached through its network gateway.
    pub addr: SocketAddr,
}

/// Resolves `gw` (the waypoint of `owner`, named in errors) for a connection from `src` (on
/// network `local`) to `dst`. `None` when the client is the waypoint itself: its own traffic to
/// the destination must not be sent back to it. A waypoint endpoint on another network may have
/// no address (it is reached through its gateway, as ztunnel keeps such endpoints).
pub(super) fn resolve(
    snapshot: &Snapshot,
    gw: &GatewayAddress,
    owner: &str,
    src: Option<&Workload>,
    local: &str,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Option<Waypoint>, RouteError> {
    let through_gateway = |wl: &Workload| *wl.network != *local && wl.network_gateway.is_some();
    let wl = match &gw.destination {
        GatewayDestination::Address(na) => {
            snapshot
                .workload_by_addr(na)
                .cloned()
                .ok_or_else(|| RouteError::WaypointUnknown {
                    owner: owner.to_owned(),
                    waypoint: na.to_string(),
                })?
        }
        GatewayDestination::Hostname(key) => {
            let svc = snapshot
                .service(key)
                .ok_or_else(|| RouteError::WaypointUnknown {
                    owner: owner.to_owned(),
                    waypoint: key.to_string(),
                })?;
            // The waypoint service's VIP stands for its endpoints: pick one the way a VIP is
            // load-balanced (the port is the HBONE port, so every endpoint qualifies).
            let port = gw.hbone_mtls_port;
            hop_endpoint(snapshot, svc, src, dst.ip(), |_| port, through_gateway, rng)
                .ok_or_else(|| RouteError::WaypointNoEndpoint {
                    owner: owner.to_owned(),
                    waypoint: key.to_string(),
                })?
                .0
        }
    };
    if src.is_some_and(|s| s.uid == wl.uid) {
        return Ok(None);
    }
    let ip = match &gw.destination {
        GatewayDestination::Address(na) => Some(na.ip),
        GatewayDestination::Hostname(_) => pick_ip(&wl, dst.ip()),
    }
    .or_else(|| {
        through_gateway(&wl).then_some(match dst.ip() {
            std::net::IpAddr::V4(_) => std::net::Ipv4Addr::UNSPECIFIED.into(),
            std::net::IpAddr::V6(_) => std::net::Ipv6Addr::UNSPECIFIED.into(),
        })
    })
    .ok_or_else(|| RouteError::WaypointNoEndpoint {
        owner: owner.to_owned(),
        waypoint: format!("{}/{}", wl.namespace, wl.name),
    })?;
    Ok(Some(Waypoint {
        addr: SocketAddr::new(ip, gw.hbone_mtls_port),
        workload: wl,
    }))
}

/// The identities a waypoint may prove: the workload at its address, or every endpoint of its
/// service. Empty when the waypoint is unknown (the inbound check then refuses: fail closed).
pub fn has_identity(snapshot: &Snapshot, gw: &GatewayAddress, id: &SpiffeId) -> bool {
    match &gw.destination {
        GatewayDestination::Address(na) => snapshot
            .workload_by_addr(na)
            .is_some_and(|w| w.has_identity(id)),
        GatewayDestination::Hostname(key) => {
            snapshot.endpoints(key).any(|(w, _)| w.has_identity(id))
        }
    }
}

/// The identities of a waypoint's workloads, for messages (checks use [`has_identity`]).
pub fn identities(snapshot: &Snapshot, gw: &GatewayAddress) -> Vec<SpiffeId> {
    let mut ids: Vec<SpiffeId> = match &gw.destination {
        GatewayDestination::Address(na) => snapshot
            .workload_by_addr(na)
            .map(|w| w.identity())
            .into_iter()
            .collect(),
        GatewayDestination::Hostname(key) => {
            snapshot.endpoints(key).map(|(w, _)| w.identity()).collect()
        }
    };
    ids.dedup();
    ids
}

/// Whether `wl` is the waypoint `gw` (by address, or as an endpoint of the waypoint service).
pub fn is_waypoint(snapshot: &Snapshot, gw: &GatewayAddress, wl: &Workload) -> bool {
    match &gw.destination {
        GatewayDestination::Address(na) => snapshot
            .workload_by_addr(na)
            .is_some_and(|w| w.uid == wl.uid),
        GatewayDestination::Hostname(key) => snapshot.endpoints(key).any(|(w, _)| w.uid == wl.uid),
    }
}

/// Whether a tunnel from `peer` may reach `wl`, which may have a waypoint: a workload behind a
/// waypoint takes tunnels only from that waypoint's identity, so that its policy cannot be
/// bypassed, or tunnels dialled on the waypoint itself (`dialled`, the workload the client sent
/// the tunnel to, when it is not `wl`: the waypoint serving `wl` from its own pod). The reason
/// for a refusal names who was expected.
pub fn admits(
    snapshot: &Snapshot,
    wl: &Workload,
    peer: &SpiffeId,
    dialled: Option<&Workload>,
) -> Result<(), String> {
    let Some(gw) = &wl.waypoint else {
        return Ok(());
    };
    if dialled.is_some_and(|d| is_waypoint(snapshot, gw, d)) || has_identity(snapshot, gw, peer) {
        return Ok(());
    }
    let ids = identities(snapshot, gw);
    let expected = if ids.is_empty() {
        "its waypoint, which is not in the mesh state".to_string()
    } else {
        ids.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" or ")
    };
    Err(format!(
        "workload {}/{} has a waypoint: tunnels must come from {expected}, not from {peer}",
        wl.namespace, wl.name
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
