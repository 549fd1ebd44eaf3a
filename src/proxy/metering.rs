//! Opening a connection's Istio TCP metrics, the same way on every path: the paths differ only in
//! who reports, how the source is known, and whether mutual TLS carries the connection.

use std::net::IpAddr;

use super::ProxyCtx;
use crate::metrics::{peers, ConnLabels, ConnMetrics, Peer, Reporter};
use crate::model::{Service, SpiffeId, Workload};
use crate::store::Snapshot;

/// Counts a connection opened with the labels of its two ends and its service.
pub(super) fn open(
    ctx: &ProxyCtx,
    reporter: Reporter,
    src: Peer<'_>,
    dst: Option<&Workload>,
    service: Option<&Service>,
    mtls: bool,
) -> ConnMetrics {
    ctx.metrics.open(&ConnLabels {
        reporter,
        src,
        dst,
        service,
        mtls,
    })
}

/// Counts an inbound connection to the local workload `wl` on `port`, reported by the
/// destination. The source workload is the first of `client_addrs` that is a workload (carrying
/// the `principal` mutual TLS proved, when there is one: then the policy is `mutual_tls`). The
/// service is `service` when the path knows it, else the one of `wl`'s services that maps a port
/// to `port` (the server side never sees the VIP).
pub(super) fn inbound(
    ctx: &ProxyCtx,
    snapshot: &Snapshot,
    client_addrs: &[IpAddr],
    principal: Option<&SpiffeId>,
    wl: &Workload,
    port: u16,
    service: Option<&Service>,
) -> ConnMetrics {
    let src_wl = peers::inbound_source(snapshot, &ctx.network, client_addrs, principal);
    let guessed;
    let service = match service {
        Some(s) => Some(s),
        None => {
            guessed = peers::inbound_service(snapshot, wl, port);
            guessed.as_deref()
        }
    };
    open(
        ctx,
        Reporter::Destination,
        Peer {
            workload: src_wl.as_deref(),
            principal,
            workload_principal: false,
        },
        Some(wl),
        service,
        principal.is_some(),
    )
}
