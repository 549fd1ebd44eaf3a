//! The inbound plaintext path (15006): a connection redirected to a workload of this node from
//! outside the mesh (or from a non-HBONE peer) is forwarded to that workload. Policy enforcement
//! hooks in here once the RBAC engine lands.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::access::ConnLog;
use super::copy::Transferred;
use super::route::{Upstream, UpstreamKind};
use super::{outbound, ProxyCtx, ProxyError};
use crate::model::NetworkAddr;

pub(super) async fn serve(ctx: &ProxyCtx, down: TcpStream, src: SocketAddr) {
    // A capture listener only takes redirected traffic: a connection dialled straight at it is a
    // loop (l4mesh's own unmarked traffic) or a misuse, and is refused.
    let dst = match crate::socket::original_dst(&down) {
        Ok(d) => d,
        Err(e) => {
            let local = down.local_addr().unwrap_or(src);
            ConnLog::new("inbound", "inbound_plaintext", src, local).finish(
                Transferred::default(),
                Some(&ProxyError::NotRedirected { local, source: e }),
            );
            return;
        }
    };
    let mut log = ConnLog::new("inbound", "inbound_plaintext", src, dst);
    match open(ctx, &mut log).await {
        Ok(up) => outbound::relay(down, up, &log).await,
        Err(e) => log.finish(Transferred::default(), Some(&e)),
    }
}

async fn open(ctx: &ProxyCtx, log: &mut ConnLog) -> Result<outbound::UpConn, ProxyError> {
    let dst = log.dst;
    if ctx.is_own_listener(dst) {
        return Err(ProxyError::Loop { dst });
    }
    let workload = {
        let snapshot = ctx.store.load();
        let wl = snapshot
            .workload_by_addr(&NetworkAddr::new(ctx.network.clone(), dst.ip()))
            .filter(|w| w.node == ctx.node_name)
            .cloned();
        wl.ok_or_else(|| ProxyError::NotLocalWorkload {
            dst,
            node: ctx.node_name.clone(),
        })?
    };
    // A workload behind a waypoint takes traffic only from its waypoint, over HBONE: plaintext
    // proves no identity, so it would bypass the waypoint's policy.
    if workload.waypoint.is_some() {
        return Err(super::hbone::Outcome::Denied(format!(
            "workload {}/{} has a waypoint; plaintext inbound traffic would bypass it (expected HBONE from the waypoint)",
            workload.namespace, workload.name
        ))
        .into());
    }
    log.upstream = Some(Upstream {
        addr: dst,
        workload: Some(workload),
        service: None,
        kind: UpstreamKind::Tcp,
        waypoint: None,
    });
    crate::socket::connect(dst, &ctx.upstream)
        .await
        .map(outbound::UpConn::Tcp)
        .map_err(|source| ProxyError::Connect { addr: dst, source })
}
