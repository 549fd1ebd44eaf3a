//! Who the ends of an inbound connection are, for its metric labels: lookups in the snapshot the
//! connection was decided on. Pure functions (no I/O), used by the proxy's inbound paths, which
//! read the addresses from the wire (`proxy::hbone::forwarded_for`).

use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{NetworkAddr, Service, SpiffeId, Workload};
use crate::store::Snapshot;

/// The source workload of an inbound connection: the first of `candidates` (the forwarded client
/// address, then the TCP peer) that is a workload. With a proven `peer` identity the workload must
/// carry it, so a `forwarded` header can only name a workload of the identity that sent it; a
/// plaintext connection (no identity) takes the workload at its address.
pub fn inbound_source(
    snapshot: &Snapshot,
    network: &Arc<str>,
    candidates: &[IpAddr],
    peer: Option<&SpiffeId>,
) -> Option<Arc<Workload>> {
    candidates.iter().find_map(|ip| {
        snapshot
            .workload_by_addr(&NetworkAddr::new(network.clone(), *ip))
            .filter(|w| peer.is_none_or(|p| w.has_identity(p)))
            .cloned()
    })
}

/// The service an inbound connection to `wl` on `port` most likely came through (the server side
/// never sees the VIP): the first of the workload's services that maps a port to `port`.
pub fn inbound_service(snapshot: &Snapshot, wl: &Workload, port: u16) -> Option<Arc<Service>> {
    wl.services.iter().find_map(|(key, ports)| {
        let svc = snapshot.service(key)?;
        let hit = ports.iter().any(|(service_port, target)| {
            let target = if *target == 0 {
                svc.ports
                    .get(service_port)
                    .copied()
                    .unwrap_or(*service_port)
            } else {
                *target
            };
            target == port
        });
        hit.then(|| svc.clone())
    })
}
