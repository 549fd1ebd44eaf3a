//! The inbound plaintext path (15006): a connection redirected to a workload of this node from
//! outside the mesh (or from a non-HBONE peer) is forwarded to that workload. Policy enforcement
//! hooks in here once the RBAC engine lands.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};

use super::access::ConnLog;
use super::copy::Transferred;
use super::route::{Upstream, UpstreamKind};
use super::{outbound, ProxyCtx, ProxyError};
use crate::model::NetworkAddr;

/// The inbound plaintext capture listener.
pub struct InboundPlain {
    listener: TcpListener,
    ctx: Arc<ProxyCtx>,
}

impl InboundPlain {
    pub fn new(listener: TcpListener, ctx: Arc<ProxyCtx>) -> Self {
        Self { listener, ctx }
    }

    pub fn address(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run(self) {
        let ctx = self.ctx;
        super::accept_loop(self.listener, "inbound_plaintext", move |stream, peer| {
            let ctx = ctx.clone();
            async move { serve(&ctx, stream, peer).await }
        })
        .await
    }
}

async fn serve(ctx: &ProxyCtx, down: TcpStream, src: SocketAddr) {
    let dst = match crate::socket::destination(&down) {
        Ok(d) => d,
        Err(e) => {
            let local = down.local_addr().unwrap_or(src);
            ConnLog::new("inbound", "inbound_plaintext", src, local)
                .finish(Transferred::default(), Some(&ProxyError::OrigDst(e)));
            return;
        }
    };
    let mut log = ConnLog::new("inbound", "inbound_plaintext", src, dst);
    match open(ctx, &mut log).await {
        Ok(up) => outbound::relay(down, up, &log).await,
        Err(e) => log.finish(Transferred::default(), Some(&e)),
    }
}

async fn open(ctx: &ProxyCtx, log: &mut ConnLog) -> Result<TcpStream, ProxyError> {
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
    log.upstream = Some(Upstream {
        addr: dst,
        workload: Some(workload),
        service: None,
        kind: UpstreamKind::Tcp,
    });
    crate::socket::connect(dst, &ctx.upstream)
        .await
        .map_err(|source| ProxyError::Connect { addr: dst, source })
}
