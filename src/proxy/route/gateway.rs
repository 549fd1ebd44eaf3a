//! Network gateways (Istio multi-network): a service endpoint on another network is not dialled
//! (its address is not routable from here); the connection goes to that endpoint's
//! `network_gateway` as double HBONE, the gateway picks the endpoint by service hostname. As
//! ztunnel:
//! - the outer tunnel goes to the gateway (its workload's address, or an endpoint of its service,
//!   on its `hbone_mtls_port` mapped to the target port), proving the gateway's identities;
//! - both CONNECTs name `<service hostname>:<service port>`;
//! - the inner tunnel proves the service's `subject_alt_names` (none is an error).
//!
//! Pure, like the rest of routing.

use std::net::SocketAddr;
use std::sync::Arc;

use rand::Rng;

use super::{hop_endpoint, RouteError, Upstream, UpstreamKind};
use crate::model::{GatewayDestination, Service, SpiffeId, Workload};
use crate::store::Snapshot;

/// The way to a service endpoint on another network.
#[derive(Clone, Debug)]
pub struct NetworkGateway {
    /// The gateway workload (the access log and the metrics' destination until the inner tunnel
    /// answers, as ztunnel).
    pub workload: Arc<Workload>,
    /// Identities the gateway may prove: its workload's, and its service's `subject_alt_names`
    /// when it is named by hostname.
    pub identities: Vec<SpiffeId>,
    /// Identities the destination may prove through the inner tunnel: the service's SANs.
    pub inner: Vec<SpiffeId>,
    /// `<service hostname>:<port the client dialled>`, both CONNECTs' authority.
    pub authority: String,
}

/// The upstream for endpoint `wl` of `svc`, which is on another network than `local`: the inner
/// tunnel proves `svc`'s SANs.
pub(super) fn through(
    snapshot: &Snapshot,
    svc: &Arc<Service>,
    wl: &Arc<Workload>,
    src: Option<&Workload>,
    local: &str,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    via(snapshot, svc, wl, svc, src, local, dst, rng)
}

/// The upstream for a connection to `svc` through its waypoint `wp` (an endpoint of the waypoint
/// service `wp_svc`), which is on another network than `local`: as ztunnel, the authority still
/// names `svc`, and the inner tunnel proves the waypoint service's SANs.
#[allow(clippy::too_many_arguments)]
pub(super) fn to_waypoint(
    snapshot: &Snapshot,
    svc: &Arc<Service>,
    wp: &Arc<Workload>,
    wp_svc: &Arc<Service>,
    src: Option<&Workload>,
    local: &str,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    let mut up = via(snapshot, svc, wp, wp_svc, src, local, dst, rng)?;
    up.workload = None;
    Ok(up)
}

/// Through `wl`'s network gateway to `svc` (the authority), the inner tunnel proving `proves`'s
/// SANs; a gateway service's endpoint is chosen for the client `src`, as a VIP's would be.
#[allow(clippy::too_many_arguments)]
fn via(
    snapshot: &Snapshot,
    svc: &Arc<Service>,
    wl: &Arc<Workload>,
    proves: &Service,
    src: Option<&Workload>,
    local: &str,
    dst: SocketAddr,
    rng: &mut impl Rng,
) -> Result<Upstream, RouteError> {
    let name = || format!("{}/{}", wl.namespace, wl.name);
    let gw = wl
        .network_gateway
        .as_ref()
        .ok_or_else(|| RouteError::NoNetworkGateway {
            service: svc.key(),
            workload: name(),
            network: wl.network.to_string(),
            local: local.to_owned(),
        })?;
    let inner: Vec<SpiffeId> = proves
        .subject_alt_names
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    if inner.is_empty() {
        return Err(RouteError::NoServiceSans {
            service: proves.key(),
            network: wl.network.to_string(),
        });
    }
    let (gw_wl, addr, identities) = match &gw.destination {
        GatewayDestination::Address(na) => {
            let gw_wl =
                snapshot
                    .workload_by_addr(na)
                    .ok_or_else(|| RouteError::GatewayUnknown {
                        workload: name(),
                        gateway: na.to_string(),
                    })?;
            let addr = SocketAddr::new(na.ip, gw.hbone_mtls_port);
            (gw_wl.clone(), addr, vec![gw_wl.identity()])
        }
        GatewayDestination::Hostname(key) => {
            let gw_svc = snapshot
                .service(key)
                .ok_or_else(|| RouteError::GatewayUnknown {
                    workload: name(),
                    gateway: key.to_string(),
                })?;
            // The gateway service's port `hbone_mtls_port`, mapped to each endpoint's target.
            let port = gw.hbone_mtls_port;
            let svc_target = gw_svc.ports.get(&port).copied().filter(|t| *t != 0);
            let target = |ports: &crate::model::PortMap| {
                ports
                    .get(&port)
                    .copied()
                    .filter(|t| *t != 0)
                    .or(svc_target)
                    .unwrap_or(port)
            };
            let (ep, ip, target) =
                hop_endpoint(snapshot, gw_svc, src, dst.ip(), target, |_| false, rng)
                    .and_then(|(ep, ip, target)| Some((ep, ip?, target)))
                    .ok_or_else(|| RouteError::GatewayNoEndpoint {
                        workload: name(),
                        gateway: key.to_string(),
                        port,
                    })?;
            let mut ids = vec![ep.identity()];
            for id in gw_svc
                .subject_alt_names
                .iter()
                .filter_map(|s| s.parse().ok())
            {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            (ep, SocketAddr::new(ip, target), ids)
        }
    };
    Ok(Upstream {
        addr,
        workload: Some(wl.clone()),
        service: Some(svc.clone()),
        kind: UpstreamKind::Hbone,
        waypoint: None,
        hostname: None,
        gateway: Some(NetworkGateway {
            workload: gw_wl,
            identities,
            inner,
            authority: format!("{}:{}", svc.hostname, dst.port()),
        }),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
