//! The outbound path: a client's connection, captured by redirection (or handed over by SOCKS5),
//! goes to the upstream its original destination resolves to. Phases: resolve → connect → copy.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::access::ConnLog;
use super::copy::{self, Transferred};
use super::route::{self, Upstream, UpstreamKind};
use super::{ProxyCtx, ProxyError};
use crate::model::NetworkAddr;

pub(super) async fn serve(ctx: &ProxyCtx, down: TcpStream, src: SocketAddr) {
    let dst = match crate::socket::destination(&down) {
        Ok(d) => d,
        Err(e) => {
            let local = down.local_addr().unwrap_or(src);
            ConnLog::new("outbound", "outbound", src, local)
                .finish(Transferred::default(), Some(&ProxyError::OrigDst(e)));
            return;
        }
    };
    let mut log = ConnLog::new("outbound", "outbound", src, dst);
    match open(ctx, &mut log).await {
        Ok(up) => relay(down, up, &log).await,
        Err(e) => log.finish(Transferred::default(), Some(&e)),
    }
}

/// Resolves and connects the upstream for `log.dst`, recording what was chosen in `log`.
pub(super) async fn open(ctx: &ProxyCtx, log: &mut ConnLog) -> Result<TcpStream, ProxyError> {
    if ctx.is_own_listener(log.dst) {
        return Err(ProxyError::Loop { dst: log.dst });
    }
    if let Some(od) = &ctx.on_demand {
        let addr = NetworkAddr::new(ctx.network.clone(), log.dst.ip());
        od.resolve(&addr).await;
    }
    let upstream = resolve(ctx, log)?;
    let addr = upstream.addr;
    let kind = upstream.kind;
    let workload = upstream.workload.as_ref().map(|w| w.uid.to_string());
    log.upstream = Some(upstream);
    if kind == UpstreamKind::Hbone {
        return Err(ProxyError::HboneUnavailable {
            dst: addr,
            workload: workload.unwrap_or_default(),
        });
    }
    if ctx.is_own_listener(addr) {
        return Err(ProxyError::Loop { dst: addr });
    }
    crate::socket::connect(addr, &ctx.upstream)
        .await
        .map_err(|source| ProxyError::Connect { addr, source })
}

/// Takes the snapshot once, picks the upstream, and keeps only the entities it needs.
fn resolve(ctx: &ProxyCtx, log: &mut ConnLog) -> Result<Upstream, ProxyError> {
    let snapshot = ctx.store.load();
    let src_wl = snapshot
        .workload_by_addr(&NetworkAddr::new(ctx.network.clone(), log.src.ip()))
        .cloned();
    log.src_workload = src_wl
        .as_ref()
        .map(|w| format!("{}/{}", w.namespace, w.name));
    let up = route::route(
        &snapshot,
        &ctx.network,
        src_wl.as_deref(),
        log.dst,
        &mut rand::rng(),
    )?;
    tracing::debug!(src = %log.src, dst = %log.dst, upstream = %up.addr, kind = ?up.kind, "outbound route");
    Ok(up)
}

/// Copies both ways until close and writes the access-log line.
pub(super) async fn relay(mut down: TcpStream, mut up: TcpStream, log: &ConnLog) {
    let (t, r) = copy::tcp(&mut down, &mut up).await;
    log.finish(t, r.err().map(ProxyError::from).as_ref());
}
