//! The inbound HBONE path (15008): mutual TLS with the certificate of the workload that was
//! dialled, HTTP/2, and per CONNECT stream: validate, authorize (`rbac`; 401 on deny), connect to
//! the local workload, answer 200, copy both ways until close or until a policy change revokes the
//! tunnel, one access-log line.
//!
//! The certificate is chosen by the destination IP of the TCP connection (no SNI, wire-facts §3):
//! a connection to an address that is not a workload of this node is closed before TLS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use rustls::ServerConfig;
use rustls_pki_types::CertificateDer;
use tokio::net::TcpStream;

use super::access::ConnLog;
use super::conn_tracker::Registration;
use super::copy::{self, Transferred};
use super::h2io::{self, H2Recv, H2Send};
use super::hbone::{self, Outcome};
use super::route::{waypoint, Upstream, UpstreamKind};
use super::{ProxyCtx, ProxyError, Role};
use crate::model::{SpiffeId, Workload};
use crate::rbac::ConnCtx;
use crate::store::Snapshot;
use crate::tls::crl::{Checker, Tracking};
use crate::tls::{self, ManagedCert, SourceResolver};

/// How long a client has to complete the TLS and HTTP/2 handshakes.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Server TLS configs, one per local identity, built once (the certificate itself is looked up
/// per handshake, so rotation needs no rebuild; a change of roots does).
#[derive(Default)]
pub struct ServerConfigs {
    by_identity: Mutex<HashMap<SpiffeId, Built>>,
}

/// A server config and the roots it was built with.
type Built = (Arc<Vec<CertificateDer<'static>>>, Arc<ServerConfig>);

impl ServerConfigs {
    /// The config for `wl`'s identity and the roots it verifies clients with.
    async fn get(&self, ctx: &ProxyCtx, wl: &Workload) -> Result<Built, ProxyError> {
        let id = wl.identity();
        let cert = ctx.secrets.fetch(&id).await?;
        let lock = || {
            self.by_identity
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        if let Some((roots, cfg)) = lock().get(&id) {
            if **roots == cert.roots {
                return Ok((roots.clone(), cfg.clone()));
            }
        }
        let resolver = SourceResolver::new(ManagedCert::new(ctx.secrets.clone(), id.clone()));
        let cfg = tls::server_config(
            Arc::new(resolver),
            cert.roots.clone(),
            &wl.trust_domain,
            ctx.hbone.revocation.clone(),
        )?;
        let built = (Arc::new(cert.roots.clone()), cfg);
        lock().insert(id, built.clone());
        Ok(built)
    }
}

/// What the waypoint rule decided for one tunnel.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Decision {
    Allow,
    Deny(String),
}

/// `watcher` counts the connection for the drain until the handshakes succeed; from then on the
/// connection only carries tunnels, which the drain counts instead.
pub(super) async fn serve(
    ctx: Arc<ProxyCtx>,
    tcp: TcpStream,
    src: SocketAddr,
    mut watcher: crate::drain::Watcher,
) {
    let dialled = match crate::socket::destination(&tcp) {
        Ok(d) => d,
        Err(e) => {
            let local = tcp.local_addr().unwrap_or(src);
            ConnLog::new(Role::InboundHbone, src, local)
                .in_pod(ctx.pod_name())
                .finish(Transferred::default(), Some(&ProxyError::OrigDst(e)));
            return;
        }
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&ctx, tcp, dialled)).await {
        Ok(Ok((conn, peer, tracking))) => {
            watcher.uncount();
            serve_h2(ctx, conn, src, dialled, peer, tracking).await
        }
        Ok(Err(e)) => ConnLog::new(Role::InboundHbone, src, dialled)
            .in_pod(ctx.pod_name())
            .finish(Transferred::default(), Some(&e)),
        Err(_) => ConnLog::new(Role::InboundHbone, src, dialled)
            .in_pod(ctx.pod_name())
            .finish(
                Transferred::default(),
                Some(&ProxyError::HboneHandshake(format!(
                    "the client did not complete the handshakes within {HANDSHAKE_TIMEOUT:?}"
                ))),
            ),
    }
}

type ServerConn = h2::server::Connection<tokio_rustls::server::TlsStream<TcpStream>, Bytes>;

/// TLS with the dialled workload's certificate, then HTTP/2; returns the connection, the
/// client's proven identity, and (with `CRL_PATH`) the connection's tracking for revocation.
async fn handshake(
    ctx: &ProxyCtx,
    tcp: TcpStream,
    dialled: SocketAddr,
) -> Result<(ServerConn, SpiffeId, Option<Tracking>), ProxyError> {
    let wl = ctx
        .local_workload(&ctx.store.load(), dialled.ip())
        .ok_or_else(|| ProxyError::NotLocalWorkload {
            dst: dialled,
            node: ctx.node_name.clone(),
        })?;
    let (roots, cfg) = ctx.hbone.server_configs.get(ctx, &wl).await?;
    let since = ctx.hbone.revocation.as_ref().map(|r| r.generation());
    let tls = tokio_rustls::TlsAcceptor::from(cfg)
        .accept(tcp)
        .await
        .map_err(|e| ProxyError::Tls {
            addr: dialled,
            inbound: true,
            error: e,
        })?;
    let peer = tls::peer_identity(tls.get_ref().1)?;
    let tracking = match (&ctx.hbone.revocation, since) {
        (Some(rev), Some(since)) => Some(rev.track(tls.get_ref().1, roots, Checker::Server, since)),
        _ => None,
    };
    ctx.hbone.count_inbound();
    let conn = h2io::server_builder(&ctx.h2)
        .handshake(tls)
        .await
        .map_err(|e| ProxyError::HboneHandshake(e.to_string()))?;
    Ok((conn, peer, tracking))
}

/// Accepts CONNECT streams until the connection ends. When a drain starts, the peer gets a
/// GOAWAY (it opens new tunnels elsewhere) while the streams already open continue; at the drain
/// deadline the connection is dropped. When a revocation list revokes the client's certificate,
/// the connection ends at once (a GOAWAY, then it is dropped with its streams).
async fn serve_h2(
    ctx: Arc<ProxyCtx>,
    mut conn: ServerConn,
    src: SocketAddr,
    dialled: SocketAddr,
    peer: SpiffeId,
    mut tracking: Option<Tracking>,
) {
    let peer = Arc::new(peer);
    let drain = ctx.drain.clone();
    let mut draining = std::pin::pin!(drain.draining());
    let mut forced = std::pin::pin!(drain.forced());
    let mut going_away = false;
    // A peer that vanished (no FIN, no RST) is found by a PING still unanswered a tick later; a
    // connection that carries no stream for `server_idle_timeout` gets a GOAWAY.
    let (ping_interval, idle_limit) = (ctx.h2.ping_interval, ctx.h2.server_idle_timeout);
    let mut pings = conn.ping_pong();
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + ping_interval, ping_interval);
    // A stalled runtime must not fire missed ticks back to back: that would send a PING and find
    // it unanswered at once.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_sent = false;
    let mut idle_since: Option<tokio::time::Instant> = None;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        let pong = std::future::poll_fn(|cx| match pings.as_mut() {
            Some(p) if ping_sent => p.poll_pong(cx),
            _ => std::task::Poll::Pending,
        });
        let revoked = Tracking::revoked_if_any(tracking.as_mut());
        // Biased: a pong that arrived is seen before the tick that would call it missing.
        let next = tokio::select! {
            biased;
            () = &mut forced => {
                tracing::debug!(%src, %dialled, "HBONE connection closed at the drain deadline");
                return;
            }
            () = revoked => {
                tracing::warn!(%src, %dialled, peer = %peer, "the HBONE client's certificate is now revoked (CRL_PATH): closing its connection and its tunnels");
                conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                // Flush the GOAWAY, briefly: the streams are not waited for.
                let _ = tokio::time::timeout(Duration::from_millis(100), conn.accept()).await;
                return;
            }
            r = pong => {
                match r {
                    Ok(_) => ping_sent = false,
                    Err(e) => {
                        tracing::debug!(%src, %dialled, error = %e, "HBONE keepalive failed; closing");
                        return;
                    }
                }
                continue;
            }
            _ = tick.tick() => {
                if ping_sent {
                    tracing::info!(%src, %dialled, peer = %peer, "HBONE peer left a PING unanswered for {ping_interval:?}; closing its connection and its tunnels");
                    return;
                }
                if let Some(p) = pings.as_mut() {
                    ping_sent = p.send_ping(h2::Ping::opaque()).is_ok();
                }
                if open.load(std::sync::atomic::Ordering::Acquire) == 0 && !going_away {
                    let since = *idle_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= idle_limit {
                        tracing::debug!(%src, %dialled, "HBONE connection idle for {idle_limit:?}: sending GOAWAY");
                        conn.graceful_shutdown();
                        going_away = true;
                    }
                } else {
                    idle_since = None;
                }
                continue;
            }
            () = &mut draining, if !going_away => None,
            next = conn.accept() => Some(next),
        };
        match next {
            None => {
                tracing::debug!(%src, %dialled, "draining: sending GOAWAY to the HBONE peer");
                conn.graceful_shutdown();
                going_away = true;
            }
            Some(None) => return,
            Some(Some(Ok((req, respond)))) => {
                let held = (ctx.drain.watch(), OpenStream::new(open.clone()));
                idle_since = None;
                // The stream's own future is the task (no wrapper holding its arguments twice).
                let (ctx, peer) = (ctx.clone(), peer.clone());
                tokio::spawn(stream(ctx, req, respond, src, dialled, peer, held));
            }
            Some(Some(Err(e))) => {
                tracing::debug!(%src, %dialled, error = %e, "HBONE connection ended");
                return;
            }
        }
    }
}

/// One open stream of an inbound HBONE connection, counted while it lives (the idle check).
struct OpenStream(Arc<std::sync::atomic::AtomicUsize>);

impl OpenStream {
    fn new(n: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Self(n)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// One CONNECT stream, from validation to the access-log line; `_held` (the drain's watcher, the
/// connection's count of open streams) is released when it ends.
async fn stream(
    ctx: Arc<ProxyCtx>,
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    src: SocketAddr,
    dialled: SocketAddr,
    peer: Arc<SpiffeId>,
    _held: (crate::drain::Watcher, OpenStream),
) {
    let (ctx, peer) = (&*ctx, &*peer);
    let mut log = ConnLog::new(Role::InboundHbone, src, dialled).in_pod(ctx.pod_name());
    super::trace::start(ctx, &mut log, Some(req.headers()));
    log.src_identity = Some(peer.to_string());
    log.count_tunnel(&ctx.hbone.tunnels);
    // Boxed, as outbound's: connecting's state is needed only until the copy starts.
    let (mut up, mut reg) = match Box::pin(open(ctx, &req, peer, dialled, &mut log)).await {
        Ok(up) => up,
        Err(e) => {
            let status = match &e {
                ProxyError::Refused(o) => o.status(),
                ProxyError::Rbac { .. } => http::StatusCode::UNAUTHORIZED,
                ProxyError::Connect { .. } => http::StatusCode::SERVICE_UNAVAILABLE,
                _ => http::StatusCode::BAD_REQUEST,
            };
            log.status = Some(status.as_u16());
            let mut resp = http::Response::new(());
            *resp.status_mut() = status;
            let _ = respond.send_response(resp, true);
            log.finish(Transferred::default(), Some(&e));
            return;
        }
    };
    // Answer before any data: the client sends nothing until it sees the 200.
    let send = match respond.send_response(http::Response::new(()), false) {
        Ok(s) => s,
        Err(e) => {
            let e = ProxyError::HboneHandshake(format!("answering the CONNECT: {e}"));
            log.finish(Transferred::default(), Some(&e));
            return;
        }
    };
    log.status = Some(200);
    super::trace::connected(&log);
    let (mut tr, mut tw) = (H2Recv::new(req.into_body()), H2Send::new(send));
    // A policy change that now denies the tunnel, or the drain deadline, ends the copy; the
    // bytes moved until then are still reported.
    let mut stop = None;
    let meter = log.meter();
    let end = copy::TcpEnd::Upstream;
    let (t, r) = copy::tcp_tunnel_until(&mut up, &mut tr, &mut tw, end, &meter, async {
        stop = Some(super::stop::revoked_or_drained(&mut reg, &ctx.drain).await);
    })
    .await;
    let r = super::stop::outcome(r, stop, &ctx.drain);
    if r.is_err() {
        tw.reset(h2::Reason::CANCEL);
    }
    log.finish(t, r.err().as_ref());
}

/// Validates the request, authorizes it (tracking it for live re-checks), and connects to the
/// local workload it names.
async fn open(
    ctx: &ProxyCtx,
    req: &http::Request<h2::RecvStream>,
    peer: &SpiffeId,
    dialled: SocketAddr,
    log: &mut ConnLog,
) -> Result<(TcpStream, Registration), ProxyError> {
    let authority = hbone::validate(req)?;
    // One snapshot for every decision about this stream.
    let snapshot = ctx.store.load();
    // A service hostname is delivered to the dialled workload, on the port the service maps to.
    let (target, by_host, header_dst) = match authority {
        hbone::Authority::Addr(a) => (a, None, a),
        hbone::Authority::Host { host, port } => {
            let (target, svc) = hostname_target(ctx, &snapshot, dialled, &host, port)?;
            let header_dst =
                service_vip(&svc, &ctx.network).map_or(target, |vip| SocketAddr::new(vip, port));
            (target, Some(svc), header_dst)
        }
    };
    log.dst = target;
    let target_wl = ctx.local_workload(&snapshot, target.ip());
    // The workload the tunnel was dialled on (whose certificate was presented), looked up once
    // for every rule below; the target's own when the authority names the dialled address.
    let dialled_wl = if target.ip().to_canonical() == dialled.ip().to_canonical() {
        target_wl.clone()
    } else {
        ctx.local_workload(&snapshot, dialled.ip())
    };
    // The dialled workload asks for an application tunnel: every stream sent to it goes to it
    // (on the tunnel's port), whatever the authority names; with PROXY protocol the header tells
    // it the client and the target (a waypoint receiving every destination's traffic so, as in
    // ztunnel, or an application that wants PROXY protocol).
    let app_tunnel = dialled_wl
        .as_ref()
        .and_then(|d| Some((d.clone(), d.application_tunnel.clone()?)));
    let (wl, addr, service) = match (&app_tunnel, target_wl) {
        (Some((d, t)), _) => (
            d.clone(),
            SocketAddr::new(dialled.ip(), t.port.unwrap_or(target.port())),
            None,
        ),
        // A tunnel for another workload of this node would borrow the dialled one's
        // certificate, unless the dialled one is that workload (another of its addresses) or its
        // waypoint.
        (None, Some(wl)) if !dialled_is_or_serves(&snapshot, dialled_wl.as_deref(), &wl) => {
            return Err(Outcome::IpMismatch {
                dialled: dialled.ip(),
                authority: target,
            }
            .into());
        }
        (None, Some(wl)) => (wl, target, None),
        (None, None) => {
            let (wl, addr, svc) = service_endpoint(ctx, &snapshot, dialled_wl.clone(), target)?;
            (wl, addr, Some(svc))
        }
    };
    let service = service.or(by_host);
    let proxy_protocol = app_tunnel.as_ref().is_some_and(|(_, t)| t.proxy_protocol);
    // Only the proxy reaches an app's PROXY port: on the pod's loopback (LOCALHOST_APP_TUNNEL).
    let on_loopback = proxy_protocol && ctx.localhost_app_tunnel;
    let delivery = if on_loopback {
        SocketAddr::new(loopback_like(addr.ip()), addr.port())
    } else {
        addr
    };
    // Checked on the port the stream is finally delivered to (a service port resolves to its
    // target port first): one of l4mesh's forwarding ports there is l4mesh itself. On loopback
    // every one of its ports is (the admin API answers there alone).
    let own = if on_loopback {
        ctx.own_ports.contains(addr.port())
    } else {
        ctx.own_ports.forwards(addr.port())
    };
    if own {
        return Err(ProxyError::SelfCall { dst: delivery });
    }
    log.dst_identity = Some(wl.identity().to_string());
    // The source workload is the one at the `forwarded` client address, else at the TCP peer,
    // that carries the identity the peer proved.
    // Through a network gateway (double HBONE, the client says its network): the TCP peer is
    // the gateway and the client's address is on another network, so neither names the source
    // (ztunnel's rule); the identity it proved still does.
    let from_gateway = req
        .headers()
        .get(super::hbone::X_FORWARDED_NETWORK)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|n| !n.eq_ignore_ascii_case(&ctx.network));
    let forwarded = super::hbone::forwarded_for(req.headers());
    let addrs = [forwarded.unwrap_or(log.src.ip()), log.src.ip()];
    let client_addrs = if from_gateway {
        &[][..]
    } else {
        &addrs[usize::from(forwarded.is_none())..]
    };
    // The service the client addressed (waypoint path), else guessed from the target port.
    log.metrics = Some(super::metering::inbound(
        ctx,
        &snapshot,
        client_addrs,
        Some(peer),
        &wl,
        target.port(),
        service.as_deref(),
    ));
    log.upstream = Some(Upstream {
        addr: delivery,
        workload: Some(wl.clone()),
        service: service.clone(),
        kind: UpstreamKind::Tcp,
        waypoint: None,
        hostname: None,
        gateway: None,
    });
    // Without L4MESH_ENFORCE_WAYPOINT (ztunnel's default), policies alone decide.
    let waypoint = if ctx.enforce_waypoint {
        waypoint_rule(&snapshot, peer, dialled_wl.as_deref(), &wl)
    } else {
        Decision::Allow
    };
    if let Decision::Deny(why) = waypoint {
        tracing::warn!(peer = %peer, workload = %format!("{}/{}", wl.namespace, wl.name), "{why}");
        // A denial like a policy's: counted with the RBAC decisions.
        ctx.metrics.rbac_decision(false);
        return Err(Outcome::Denied(why).into());
    }
    // On the waypoint path (`service`), `dst_ip` is the chosen endpoint's IP, not the VIP the
    // client dialled: policies of the destination workload are written for its own addresses.
    // The delivered address, as ztunnel (through an application tunnel: the dialled workload's
    // address and the tunnel's port).
    let conn = ConnCtx {
        peer: Some(peer.clone()),
        src_ip: log.src.ip(),
        dst_ip: addr.ip(),
        dst_port: addr.port(),
    };
    // The workload the tunnel was sent to, when it is not the destination (a waypoint's pod):
    // the tracker re-applies the waypoint rule with it.
    let via = if ctx.enforce_waypoint {
        super::conn_tracker::Via::Hbone {
            dialled: dialled_wl
                .filter(|d| d.uid != wl.uid)
                .map(|d| d.uid.clone()),
        }
    } else {
        super::conn_tracker::Via::Unchecked
    };
    let reg = super::admit(ctx, &snapshot, &wl, conn, via)?;
    let client = original_client(&snapshot, forwarded, peer, &wl, log.src.ip());
    drop(snapshot);
    let mut up = if on_loopback {
        crate::socket::connect(delivery, &ctx.upstream)
            .await
            .map_err(|error| ProxyError::Connect {
                addr: delivery,
                error,
            })?
    } else {
        // The workload sees the client's IP rather than l4mesh's when ENABLE_ORIG_SRC allows it.
        crate::socket::connect_from(addr, Some(client), &ctx.upstream)
            .await
            .map_err(|error| ProxyError::Connect { addr, error })?
    };
    if proxy_protocol {
        use tokio::io::AsyncWriteExt;
        // PROXY names addresses only: a hostname's service by its VIP, as ztunnel.
        let header = super::proxy_protocol::header(log.src, header_dst, Some(&peer.to_string()));
        up.write_all(&header)
            .await
            .map_err(|error| ProxyError::Connect {
                addr: delivery,
                error,
            })?;
    }
    Ok((up, reg))
}

/// Where a CONNECT naming service `host` on `port` goes (ztunnel's `SvcHostname`): to the
/// workload the tunnel was dialled on, on the port it (as the service's endpoint) or the service
/// maps `port` to; among services sharing the hostname, the workload's namespace's first.
fn hostname_target(
    ctx: &ProxyCtx,
    snapshot: &Snapshot,
    dialled: SocketAddr,
    host: &str,
    port: u16,
) -> Result<(SocketAddr, Arc<crate::model::Service>), ProxyError> {
    let Some(wl) = ctx.local_workload(snapshot, dialled.ip()) else {
        return Err(Outcome::NoUpstream(format!(
            "a CONNECT for {host}:{port} goes to the workload it was dialled on, and {} is none of this node's",
            dialled.ip()
        ))
        .into());
    };
    let svc = crate::model::best_match(
        snapshot.services_by_hostname(host),
        Some(&wl.namespace),
        None,
    )
    .ok_or_else(|| Outcome::NoUpstream(format!("no service has the hostname {host}")))?
    .clone();
    let mapped = |p: Option<&u16>| p.copied().filter(|p| *p != 0);
    // The workload's own membership (one map lookup, not a scan of the service's endpoints).
    let target = wl
        .services
        .get(&svc.key())
        .and_then(|ports| mapped(ports.get(&port)))
        .or_else(|| mapped(svc.ports.get(&port)))
        .ok_or_else(|| {
            Outcome::NoUpstream(format!(
                "service {} maps no port {port} for {}/{} (expected one of {:?})",
                svc.key(),
                wl.namespace,
                wl.name,
                svc.ports.keys().collect::<Vec<_>>()
            ))
        })?;
    Ok((SocketAddr::new(dialled.ip(), target), svc))
}

/// A VIP of `svc` on `network`, IPv4 first.
fn service_vip(svc: &crate::model::Service, network: &str) -> Option<std::net::IpAddr> {
    let on_net = || svc.vips.iter().filter(|v| &*v.network == network);
    on_net()
        .find(|v| v.ip.is_ipv4())
        .or_else(|| on_net().next())
        .map(|v| v.ip)
}

/// The loopback address of `ip`'s family.
fn loopback_like(ip: std::net::IpAddr) -> std::net::IpAddr {
    match ip.to_canonical() {
        std::net::IpAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
        std::net::IpAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
    }
}

/// The client address the workload should see. The tunnel's TCP source is the client pod's IP
/// (its dedicated-mode l4mesh runs in the pod), except for a tunnel from the destination's
/// waypoint, whose TCP source is the waypoint: then the client is the one its `forwarded` header
/// names (ztunnel's `get_original_src_from_fwded`). Only the waypoint's proven identity is trusted
/// with that header, so no other peer can make l4mesh connect from an address of its choosing.
fn original_client(
    snapshot: &Snapshot,
    forwarded: Option<std::net::IpAddr>,
    peer: &SpiffeId,
    wl: &Workload,
    tcp_src: std::net::IpAddr,
) -> std::net::IpAddr {
    let from_waypoint = wl
        .waypoint
        .as_ref()
        .is_some_and(|gw| waypoint::has_identity(snapshot, gw, peer));
    let forwarded = forwarded.filter(|_| from_waypoint);
    forwarded.unwrap_or(tcp_src).to_canonical()
}

/// For a tunnel dialled on a waypoint this l4mesh serves, with a service VIP as its authority (a
/// client sends a service's traffic to the service's waypoint): the service, and the endpoint the
/// waypoint picks, load balanced as the service says, as `ip:target port`.
///
/// l4mesh acting as a waypoint opens no HBONE onwards, and in dedicated mode it serves only its own
/// pod: a hop to another pod would break (with ENABLE_ORIG_SRC the replies would bypass it, and a
/// workload behind a waypoint refuses plaintext). So the candidates are filtered to the endpoints
/// this l4mesh serves *before* the choice ([`serves`]); none left is a 503 that says so, never a
/// random one. Anything that is not a service of this waypoint keeps the 400 of a foreign authority.
fn service_endpoint(
    ctx: &ProxyCtx,
    snapshot: &Snapshot,
    dialled: Option<Arc<Workload>>,
    target: SocketAddr,
) -> Result<(Arc<Workload>, SocketAddr, Arc<crate::model::Service>), ProxyError> {
    let mismatch = || ProxyError::from(Outcome::AuthorityMismatch { authority: target });
    let waypoint = dialled.ok_or_else(mismatch)?;
    // Among the services at that VIP, the ones this waypoint serves.
    let vip = crate::model::NetworkAddr::new(ctx.network.clone(), target.ip());
    let svc = crate::model::best_match(
        snapshot.services_at_vip(&vip).filter(|s| {
            s.waypoints()
                .any(|gw| waypoint::is_waypoint(snapshot, gw, &waypoint))
        }),
        Some(waypoint.namespace.as_str()),
        None,
    )
    .ok_or_else(mismatch)?
    .clone();
    // A waypoint forwards to its own pod's addresses: never to a hostname.
    let keep =
        |wl: &Workload, ip: Option<std::net::IpAddr>| ip.is_some_and(|ip| ctx.serves(wl, ip));
    let up = super::route::service_endpoint(
        snapshot,
        &ctx.network,
        &svc,
        Some(&waypoint),
        target,
        &keep,
        &mut rand::rng(),
    )
    .map_err(|e| {
        Outcome::NoUpstream(format!(
            "service {} has no endpoint that this l4mesh (the waypoint {}/{}) serves: l4mesh acting as a waypoint forwards only to the addresses of its own pod ({e})",
            svc.key(),
            waypoint.namespace,
            waypoint.name,
        ))
    })?;
    // Checked by `serves`, but the store may hold the workload under another address.
    let wl = ctx.local_workload(snapshot, up.addr.ip()).ok_or_else(|| {
        Outcome::NoUpstream(format!(
            "service {} picked endpoint {}, which is not a workload of this node ({})",
            svc.key(),
            up.addr,
            ctx.node_name
        ))
    })?;
    Ok((wl, up.addr, svc))
}

/// Whether `dialled`, the workload the tunnel was dialled on, is `wl` itself (at the same or
/// another of its addresses, e.g. the other family of a dual-stack pod) or a waypoint of `wl`
/// (which then takes the tunnel for `wl`'s address: a client sends a workload's traffic to its
/// waypoint).
fn dialled_is_or_serves(snapshot: &Snapshot, dialled: Option<&Workload>, wl: &Workload) -> bool {
    let Some(d) = dialled else {
        return false;
    };
    d.uid == wl.uid
        || wl
            .waypoint
            .as_ref()
            .is_some_and(|gw| waypoint::is_waypoint(snapshot, gw, d))
}

/// A workload with a waypoint takes tunnels only from that waypoint's identity, so that its policy
/// cannot be bypassed. A tunnel dialled on the waypoint itself (the client sent it to the waypoint,
/// which serves the destination on this node) is the waypoint's own traffic and passes
/// ([`waypoint::admits`], which the connection tracker re-applies on every mesh change).
fn waypoint_rule(
    snapshot: &Snapshot,
    peer: &SpiffeId,
    dialled: Option<&Workload>,
    wl: &Workload,
) -> Decision {
    match waypoint::admits(snapshot, wl, peer, dialled) {
        Ok(()) => Decision::Allow,
        Err(why) => Decision::Deny(why),
    }
}

#[cfg(test)]
mod tests {
    use super::super::hbone::forwarded_for;
    use super::*;
    use crate::model::{GatewayAddress, GatewayDestination, NetworkAddr};
    use crate::proto::istio::workload as pw;
    use crate::store::{Batch, Store, Upsert};
    use std::net::IpAddr;

    fn workload(name: &str, addr: &str, sa: &str) -> Workload {
        let ip: IpAddr = addr.parse().unwrap();
        Workload::try_from(pw::Workload {
            uid: format!("cluster1//v1/Pod/default/{name}"),
            name: name.into(),
            namespace: "default".into(),
            service_account: sa.into(),
            addresses: vec![match ip {
                IpAddr::V4(a) => a.octets().to_vec(),
                IpAddr::V6(a) => a.octets().to_vec(),
            }],
            ..Default::default()
        })
        .unwrap()
    }

    fn id(sa: &str) -> SpiffeId {
        format!("spiffe://cluster.local/ns/default/sa/{sa}")
            .parse()
            .unwrap()
    }

    /// The `forwarded` client is used only on a tunnel from the destination's own waypoint;
    /// from anyone else (or for a workload without a waypoint) the TCP source stays, so a peer
    /// cannot choose the address l4mesh connects from. IPv4-mapped addresses come out as IPv4.
    #[test]
    fn forwarded_client_only_from_the_destinations_waypoint() {
        let mut d = workload("d", "10.0.0.2", "server");
        d.waypoint = Some(GatewayAddress {
            destination: GatewayDestination::Address(NetworkAddr::new(
                "",
                "10.0.0.9".parse().unwrap(),
            )),
            hbone_mtls_port: 15008,
        });
        let plain = workload("p", "10.0.0.3", "server");
        let store = Store::new();
        store.apply(Batch {
            upserts: vec![
                Upsert::Workload(workload("wp", "10.0.0.9", "waypoint")),
                Upsert::Workload(d.clone()),
                Upsert::Workload(plain.clone()),
            ],
            ..Default::default()
        });
        let snap = store.load();
        let mut headers = http::HeaderMap::new();
        headers.insert("forwarded", "for=\"10.0.0.1:4000\"".parse().unwrap());
        let tcp: IpAddr = "10.0.0.9".parse().unwrap();
        let client: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            original_client(&snap, forwarded_for(&headers), &id("waypoint"), &d, tcp),
            client
        );
        assert_eq!(
            original_client(&snap, forwarded_for(&headers), &id("client"), &d, tcp),
            tcp
        );
        assert_eq!(
            original_client(&snap, forwarded_for(&headers), &id("waypoint"), &plain, tcp),
            tcp
        );
        // No header: the TCP source, as IPv4 when it was IPv4-mapped.
        let mapped: IpAddr = "::ffff:10.0.0.9".parse().unwrap();
        assert_eq!(
            original_client(&snap, None, &id("waypoint"), &d, mapped),
            tcp
        );
    }
}
