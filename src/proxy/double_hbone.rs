//! Double HBONE (Istio multi-network): a tunnel to a service endpoint on another network, through
//! that network's gateway ([`super::route::gateway`] chose it). As ztunnel:
//! - the outer tunnel is an ordinary pooled HBONE tunnel to the gateway, proving the gateway's
//!   identity, whose CONNECT names `<service hostname>:<port>`; the gateway picks an endpoint of
//!   that service and relays the stream's bytes to its node's HBONE port;
//! - inside that stream, a TLS session of its own with the destination (end to end: the gateway
//!   sees ciphertext), proving the service's SANs, then HTTP/2 and the inner CONNECT with the same
//!   authority plus `x-forwarded-network`;
//! - the inner connection carries this one tunnel only, and ends with it: the gateway picks an
//!   endpoint per outer tunnel, so each connection may reach another one.
//!
//! `L4MESH_POOL_INNER_TUNNELS=true` pools the inner connections instead (beyond ztunnel): a new
//! connection then costs one HTTP/2 stream instead of a stream, a TLS handshake and an HTTP/2
//! handshake, but the streams of one inner connection all reach the endpoint the gateway chose
//! for it (up to `POOL_MAX_STREAMS_PER_CONNECTION` of them).

use std::net::SocketAddr;
use std::sync::Arc;

use super::h2io::{self, H2Recv, H2Send};
use super::pool::{PoolKey, Tunnel, Via};
use super::route::NetworkGateway;
use super::{ProxyCtx, ProxyError};
use crate::model::SpiffeId;
use crate::tls::crl::Tracking;

/// Opens the outer tunnel to `gw` at `addr` (`outer` its CONNECT), then the inner one to the
/// destination (`inner` its CONNECT), presenting `src`'s certificate on both. With
/// `L4MESH_POOL_INNER_TUNNELS` the inner connection is pooled instead (per source, service and
/// gateway), and `outer` is not used: the pooled connection's own outer tunnel names no client.
pub(super) async fn tunnel(
    ctx: &ProxyCtx,
    src: &SpiffeId,
    gw: &NetworkGateway,
    addr: SocketAddr,
    outer: http::Request<()>,
    inner: http::Request<()>,
) -> Result<Tunnel, ProxyError> {
    let pod = ctx.pod.as_ref().map(|p| p.uid.clone());
    if ctx.h2.pool_inner_tunnels {
        let key = PoolKey {
            src: src.clone(),
            expected: gw.inner.clone(),
            addr,
            pod,
            via: Some(Arc::new(Via {
                gateway: gw.identities.clone(),
                authority: gw.authority.clone(),
            })),
        };
        return ctx.hbone.pool.tunnel(ctx, &key, addr, inner).await;
    }
    let outer_key = PoolKey {
        src: src.clone(),
        expected: gw.identities.clone(),
        addr,
        pod: pod.clone(),
        via: None,
    };
    let outer = ctx.hbone.pool.tunnel(ctx, &outer_key, addr, outer).await?;

    // The inner session: the same source certificate, the destination service's identities.
    let inner_key = PoolKey {
        src: src.clone(),
        expected: gw.inner.clone(),
        addr,
        pod,
        via: None,
    };
    let (tls, mut tracking) = super::pool::client_tls(ctx, &inner_key, outer.into_io()).await?;
    let (send, conn) = h2io::client_builder(&ctx.h2)
        .handshake(tls)
        .await
        .map_err(|e| {
            ProxyError::HboneHandshake(format!("inner HTTP/2 through the gateway {addr}: {e}"))
        })?;
    // The inner connection's driver: it ends when its one stream does (or the destination's
    // certificate is revoked).
    tokio::spawn(async move {
        let revoked = Tracking::revoked_if_any(tracking.as_mut());
        tokio::select! {
            _ = conn => {}
            () = revoked => tracing::warn!(gateway = %addr, "the destination's certificate is now revoked (CRL_PATH): closing the tunnel through the gateway"),
        }
    });
    let authority = inner.uri().to_string();
    let (status, recv, send) = super::pool::request(send, inner).await.map_err(|e| {
        ProxyError::HboneHandshake(format!("inner CONNECT to {authority} via {addr}: {e}"))
    })?;
    if status != 200 {
        return Err(ProxyError::HboneStatus {
            peer: addr,
            dst: addr,
            status,
        });
    }
    Ok(Tunnel::unpooled(
        H2Recv::new(recv),
        H2Send::new(send),
        status,
    ))
}
