//! The outbound path: a client's connection, captured by redirection (or handed over by SOCKS5),
//! goes to the upstream its original destination resolves to. Phases: resolve → connect → copy.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::access::ConnLog;
use super::copy::{self, Transferred};
use super::hbone;
use super::pool::{PoolKey, Tunnel};
use super::route::{self, Upstream, UpstreamKind};
use super::{ProxyCtx, ProxyError, Role};
use crate::model::{NetworkAddr, SpiffeId, Workload};

/// An opened upstream: a TCP connection, or an HBONE tunnel to the destination's node.
pub(super) enum UpConn {
    Tcp(TcpStream),
    Tunnel(Box<Tunnel>),
}

pub(super) async fn serve(ctx: &ProxyCtx, down: TcpStream, src: SocketAddr) {
    let dst = match super::captured_dst(ctx, &down, src) {
        Ok(d) => d,
        Err(e) => {
            let (local, e) = *e;
            ConnLog::new(Role::Outbound, src, local)
                .in_pod(ctx.pod_name())
                .finish(Transferred::default(), Some(&e));
            return;
        }
    };
    let mut log = ConnLog::new(Role::Outbound, src, dst).in_pod(ctx.pod_name());
    // Boxed: connecting needs more state than copying does, and only for a moment; inline, a
    // held connection's task would keep that room for its whole life.
    match Box::pin(open(ctx, &mut log)).await {
        Ok(up) => relay(ctx, down, up, &log).await,
        Err(e) => log.finish(Transferred::default(), Some(&e)),
    }
}

/// Resolves and connects the upstream for `log.dst`, recording what was chosen in `log`.
pub(super) async fn open(ctx: &ProxyCtx, log: &mut ConnLog) -> Result<UpConn, ProxyError> {
    super::trace::start(ctx, log, None);
    if ctx.is_self_call(log.dst) {
        return Err(ProxyError::SelfCall { dst: log.dst });
    }
    if let Some(od) = &ctx.on_demand {
        let addr = NetworkAddr::new(ctx.network.clone(), log.dst.ip());
        od.resolve(&addr).await;
    }
    let (mut upstream, src_wl) = resolve(ctx, log)?;
    if let Some(host) = upstream.hostname.clone() {
        upstream.addr = on_demand_dns(ctx, &upstream, &host, src_wl.as_deref(), log.dst).await?;
    }
    let addr = upstream.addr;
    let kind = upstream.kind;
    log.metrics = Some(open_metrics(ctx, &upstream, src_wl.as_deref()));
    if let Some(gw) = upstream.gateway.clone() {
        let src_id = source_identity(ctx, log.src, src_wl.as_deref())?;
        log.upstream = Some(upstream);
        log.count_tunnel(&ctx.hbone.tunnels);
        return via_gateway(ctx, log, &src_id, &gw, addr, src_wl.as_deref()).await;
    }
    let tunnel = (kind == UpstreamKind::Hbone)
        .then(|| tunnel_key(ctx, log.src, &upstream, src_wl.as_deref()));
    log.upstream = Some(upstream);
    if let Some(key) = tunnel {
        let key = key?;
        log.count_tunnel(&ctx.hbone.tunnels);
        log.src_identity = Some(key.src.to_string());
        log.dst_identity = Some(
            key.expected
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(","),
        );
        let mut req = hbone::connect_request(addr, log.src, src_wl.as_deref(), &mut rand::rng())
            .map_err(|e| ProxyError::HboneHandshake(format!("building the CONNECT: {e}")))?;
        super::trace::hbone_connect(log, key.addr, &mut req);
        // Bounds the handshakes and the wait for the answer; dropping the future on timeout
        // releases the pool key's lock.
        let limit = ctx.upstream.connect_timeout;
        let t = match tokio::time::timeout(limit, ctx.hbone.pool.tunnel(ctx, &key, addr, req)).await
        {
            Ok(t) => t,
            Err(_) => Err(ProxyError::HboneHandshake(format!(
                "no tunnel to {addr} via {} within {limit:?} (is the peer's HBONE port reachable?)",
                key.addr
            ))),
        };
        log.status = match &t {
            Ok(t) => Some(t.status),
            Err(ProxyError::HboneStatus { status, .. }) => Some(*status),
            Err(_) => None,
        };
        return Ok(UpConn::Tunnel(Box::new(t?)));
    }
    // A passthrough or plain-TCP endpoint may be this namespace too.
    if ctx.is_self_call(addr) {
        return Err(ProxyError::SelfCall { dst: addr });
    }
    crate::socket::connect(addr, &ctx.upstream)
        .await
        .map(UpConn::Tcp)
        .map_err(|error| ProxyError::Connect { addr, error })
}

/// Double HBONE through the network gateway `gw` at `addr` (ztunnel's headers: the inner CONNECT
/// alone says which network the client is on).
async fn via_gateway(
    ctx: &ProxyCtx,
    log: &mut ConnLog,
    src_id: &SpiffeId,
    gw: &route::NetworkGateway,
    addr: SocketAddr,
    src_wl: Option<&Workload>,
) -> Result<UpConn, ProxyError> {
    log.src_identity = Some(src_id.to_string());
    log.dst_identity = Some(
        gw.inner
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(","),
    );
    let build = |network| {
        hbone::connect_request_via_gateway(
            &gw.authority,
            log.src,
            src_wl,
            network,
            &mut rand::rng(),
        )
        .map_err(|e| ProxyError::HboneHandshake(format!("building the CONNECT: {e}")))
    };
    let outer = build(None)?;
    let mut inner = build(Some(&ctx.network))?;
    super::trace::hbone_connect(log, addr, &mut inner);
    let limit = ctx.upstream.connect_timeout;
    let t = tokio::time::timeout(
        limit,
        super::double_hbone::tunnel(ctx, src_id, gw, addr, outer, inner),
    )
    .await
    .unwrap_or_else(|_| {
        Err(ProxyError::HboneHandshake(format!(
            "no tunnel to {} through the network gateway {addr} within {limit:?}",
            gw.authority
        )))
    });
    log.status = match &t {
        Ok(t) => Some(t.status),
        Err(ProxyError::HboneStatus { status, .. }) => Some(*status),
        Err(_) => None,
    };
    Ok(UpConn::Tunnel(Box::new(t?)))
}

/// The address of an endpoint known by `host` only (on-demand DNS), with the target port the
/// route chose; counted in `istio_on_demand_dns_total`.
async fn on_demand_dns(
    ctx: &ProxyCtx,
    up: &Upstream,
    host: &str,
    src_wl: Option<&Workload>,
    dst: SocketAddr,
) -> Result<SocketAddr, ProxyError> {
    ctx.metrics.on_demand_dns(src_wl, host);
    let ip = ctx.hostnames.pick(host, dst.ip()).await.map_err(|e| {
        route::RouteError::HostnameUnresolved {
            service: up
                .service
                .as_ref()
                .map(|s| s.key())
                .unwrap_or_else(|| crate::model::ServiceKey::from_parts("", host)),
            reason: e.to_string(),
        }
    })?;
    tracing::debug!(%host, %ip, "on-demand DNS: endpoint resolved");
    Ok(SocketAddr::new(ip, up.addr.port()))
}

/// Counts the connection opened, reported by the source: over HBONE the source principal is the
/// identity this side presents (ztunnel's rule), and the policy `mutual_tls`.
fn open_metrics(
    ctx: &ProxyCtx,
    up: &Upstream,
    src_wl: Option<&Workload>,
) -> crate::metrics::ConnMetrics {
    use crate::metrics::{Peer, Reporter};
    let hbone = up.kind == UpstreamKind::Hbone;
    let src = Peer {
        workload: src_wl,
        // The client workload's identity (read from its fields), else this node's own.
        principal: ctx
            .own_identity
            .as_ref()
            .filter(|_| hbone && src_wl.is_none()),
        workload_principal: hbone,
    };
    // Through a network gateway the destination is the gateway until the inner tunnel answers,
    // as ztunnel counts it: the endpoint the route saw is not necessarily the one it reaches.
    let dst = match &up.gateway {
        Some(gw) => Some(&*gw.workload),
        None => up.workload.as_deref(),
    };
    super::metering::open(
        ctx,
        Reporter::Source,
        src,
        dst,
        up.service.as_deref(),
        hbone,
    )
}

/// The identity a tunnel from `src` presents: the client workload's, else this l4mesh's own.
fn source_identity(
    ctx: &ProxyCtx,
    src: SocketAddr,
    src_wl: Option<&Workload>,
) -> Result<SpiffeId, ProxyError> {
    src_wl
        .map(Workload::identity)
        .or_else(|| ctx.own_identity.clone())
        .ok_or(ProxyError::NoSourceIdentity { src })
}

/// The pool key of a tunnel to `up`: the source identity (the client's workload, else this
/// l4mesh's own), the identities the server may prove, and `<workload ip>:15008`. Through a
/// waypoint: the waypoint's identity only, and `<waypoint ip>:<its HBONE port>`.
fn tunnel_key(
    ctx: &ProxyCtx,
    src: SocketAddr,
    up: &Upstream,
    src_wl: Option<&Workload>,
) -> Result<PoolKey, ProxyError> {
    let src_id = source_identity(ctx, src, src_wl)?;
    if let Some(wp) = &up.waypoint {
        return Ok(PoolKey {
            src: src_id,
            expected: vec![wp.workload.identity()],
            addr: wp.addr,
            pod: ctx.pod.as_ref().map(|p| p.uid.clone()),
            via: None,
        });
    }
    let mut expected: Vec<SpiffeId> = up.workload.iter().map(|w| w.identity()).collect();
    if let Some(svc) = &up.service {
        for san in &svc.subject_alt_names {
            match san.parse::<SpiffeId>() {
                Ok(id) if !expected.contains(&id) => expected.push(id),
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(service = %svc.hostname, %san, error = %e, "ignoring a subject_alt_name that is not a SPIFFE ID")
                }
            }
        }
    }
    Ok(PoolKey {
        src: src_id,
        expected,
        addr: SocketAddr::new(up.addr.ip(), hbone::HBONE_PORT),
        pod: ctx.pod.as_ref().map(|p| p.uid.clone()),
        via: None,
    })
}

/// Takes the snapshot once, picks the upstream, and keeps only the entities it needs.
fn resolve(
    ctx: &ProxyCtx,
    log: &mut ConnLog,
) -> Result<(Upstream, Option<std::sync::Arc<Workload>>), ProxyError> {
    let snapshot = ctx.store.load();
    let src_wl = ctx.source_workload(&snapshot, log.src)?;
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
    let waypoint = up.waypoint.as_ref().map(|w| w.addr);
    tracing::debug!(src = %log.src, dst = %log.dst, upstream = %up.addr, kind = ?up.kind, ?waypoint, "outbound route");
    Ok((up, src_wl))
}

/// Copies both ways until close (or the drain deadline) and writes the access-log line.
pub(super) async fn relay(ctx: &ProxyCtx, mut down: TcpStream, up: UpConn, log: &ConnLog) {
    super::trace::connected(log);
    let meter = log.meter();
    let mut stop = None;
    let until = async { stop = Some(super::stop::drained(&ctx.drain).await) };
    let (t, r) = match up {
        UpConn::Tcp(mut up) => {
            copy::tcp_until(&mut down, &mut up, ctx.splice_after, &meter, until).await
        }
        UpConn::Tunnel(mut tunnel) => {
            let Tunnel { recv, send, .. } = &mut *tunnel;
            let end = copy::TcpEnd::Downstream;
            let res = copy::tcp_tunnel_until(&mut down, recv, send, end, &meter, until).await;
            if res.1.is_err() {
                send.reset(h2::Reason::CANCEL);
            }
            res
        }
    };
    log.finish(t, super::stop::outcome(r, stop, &ctx.drain).err().as_ref());
}
