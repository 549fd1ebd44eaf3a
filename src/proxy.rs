//! The data plane: listeners that accept connections, choose an upstream from the store snapshot,
//! connect, and copy bytes both ways until close, then write one access-log line.
//!
//! Listeners: outbound capture (15001), SOCKS5 (15080) feeding the same outbound logic, inbound
//! plaintext capture (15006), inbound HBONE (15008). Every listener follows one lifecycle: the caller binds the socket (a
//! port conflict fails startup), wraps it with `new`, reads `address()`, then awaits `run()`.
//! This module does not interpret application bytes.

#[cfg(test)]
mod accept_tests;
mod access;
mod access_fields;
pub mod conn_tracker;
pub mod copy;
mod error;
pub mod h2io;
pub mod hbone;
mod inbound_hbone;
mod inbound_plain;
mod metering;
mod outbound;
mod pool;
pub mod route;
mod socks5;
mod stop;
mod trace;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::identity::SecretManager;
use crate::socket::UpstreamOptions;
use crate::store::Store;

pub use conn_tracker::ConnTracker;
pub use error::{Blame, ProxyError};
pub use h2io::Tuning as H2Tuning;
pub use pool::PoolStats;

/// What every connection handler needs, shared by all listeners.
pub struct ProxyCtx {
    pub store: Arc<Store>,
    /// The network this node's workloads are on (`NETWORK`); keys every address lookup.
    pub network: Arc<str>,
    /// This node's name (`NODE_NAME`): inbound connections are only for workloads on it.
    pub node_name: String,
    pub upstream: UpstreamOptions,
    /// The addresses l4mesh's own listeners are bound to, to refuse connections that would loop.
    pub own_addrs: Vec<SocketAddr>,
    /// In on-demand xDS mode: asks the control plane about unknown destinations.
    pub on_demand: Option<crate::xds::OnDemand>,
    /// The certificates of this node's identities (HBONE presents them on both ends).
    pub secrets: Arc<SecretManager>,
    /// The identity of this l4mesh's own workload (dedicated mode): the source identity of
    /// outbound tunnels from clients that are not known workloads.
    pub own_identity: Option<crate::model::SpiffeId>,
    /// HTTP/2 windows, frame size and pool limits of both HBONE ends.
    pub h2: H2Tuning,
    /// Shared HBONE state: server TLS configs, the tunnel pool, counters.
    pub hbone: HboneState,
    /// Established inbound connections, re-checked when the policies change.
    pub conns: Arc<ConnTracker>,
    /// OpenTelemetry export of connection spans and access-log records; `None` = off.
    pub otel: Option<Arc<crate::otel::Otel>>,
    /// This l4mesh's traffic metrics (Istio TCP metrics, RBAC decisions, open connections).
    pub metrics: Arc<crate::metrics::Traffic>,
    /// Shutdown: listeners stop accepting when it starts; copies stop at its deadline.
    pub drain: crate::drain::Signal,
}

/// HBONE state shared by all connections of one l4mesh.
#[derive(Default)]
pub struct HboneState {
    server_configs: inbound_hbone::ServerConfigs,
    pool: pool::Pool,
    inbound_tls: AtomicU64,
    outbound_tls: AtomicU64,
    /// Per-tunnel counters (opened, failed, bytes, CONNECT statuses).
    pub tunnels: Arc<access::TunnelCounters>,
}

impl HboneState {
    /// TLS connections accepted by the inbound HBONE listener (each carries many tunnels).
    pub fn inbound_tls_connections(&self) -> u64 {
        self.inbound_tls.load(Ordering::Relaxed)
    }

    /// TLS connections opened by outbound HBONE (pooled: fewer than tunnels).
    pub fn outbound_tls_connections(&self) -> u64 {
        self.outbound_tls.load(Ordering::Relaxed)
    }

    /// The outbound connection pool's size now.
    pub fn pool_stats(&self) -> pool::PoolStats {
        self.pool.stats()
    }

    fn count_inbound(&self) {
        self.inbound_tls.fetch_add(1, Ordering::Relaxed);
    }

    fn count_outbound(&self) {
        self.outbound_tls.fetch_add(1, Ordering::Relaxed);
    }
}

impl ProxyCtx {
    /// The workload of this node with address `ip` on this node's network: the only destinations
    /// the inbound paths serve.
    pub fn local_workload(
        &self,
        snapshot: &crate::store::Snapshot,
        ip: std::net::IpAddr,
    ) -> Option<Arc<crate::model::Workload>> {
        snapshot
            .workload_by_addr(&crate::model::NetworkAddr::new(self.network.clone(), ip))
            .filter(|w| w.node == self.node_name)
            .cloned()
    }

    /// Whether `dst` is one of l4mesh's own listeners (a connection to it would loop forever): the
    /// same address, or a loopback address for a wildcard listener. A listener bound to one IP is
    /// not hit by the same port on another IP. Together with capture listeners refusing traffic that
    /// was not redirected, this stops every loop, including via a wildcard listener and a pod IP.
    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        self.own_addrs.iter().any(|l| {
            l.port() == dst.port()
                && (l.ip() == dst.ip()
                    || dst.ip().is_unspecified()
                    || l.ip().is_unspecified() && dst.ip().is_loopback())
        })
    }
}

/// Authorizes an inbound connection to the local workload `wl` and, if allowed, tracks it for
/// live re-checks. Every decision is logged at debug with the policy that made it.
///
/// `snapshot` is the one the caller took for this connection. The store may change between the
/// evaluation and the registration; a re-check after registering closes that window (a later
/// change is the tracker's job).
pub(crate) fn admit(
    ctx: &ProxyCtx,
    snapshot: &crate::store::Snapshot,
    wl: &crate::model::Workload,
    conn: crate::rbac::ConnCtx,
) -> Result<conn_tracker::Registration, ProxyError> {
    let result = admit_once(ctx, snapshot, wl, conn);
    // One decision per connection, whichever snapshot made it.
    ctx.metrics.rbac_decision(result.is_ok());
    result
}

fn admit_once(
    ctx: &ProxyCtx,
    snapshot: &crate::store::Snapshot,
    wl: &crate::model::Workload,
    conn: crate::rbac::ConnCtx,
) -> Result<conn_tracker::Registration, ProxyError> {
    decide(snapshot, wl, &conn)?;
    let reg = ctx.conns.register(conn.clone(), wl.uid.clone());
    let now = ctx.store.load();
    if now.version() != snapshot.version() {
        if let Some(wl) = now.workload(&wl.uid) {
            decide(&now, wl, &conn)?;
        }
    }
    Ok(reg)
}

fn decide(
    snapshot: &crate::store::Snapshot,
    wl: &crate::model::Workload,
    conn: &crate::rbac::ConnCtx,
) -> Result<(), ProxyError> {
    let d = crate::rbac::evaluate(snapshot, wl, conn);
    tracing::debug!(
        peer = conn.peer.as_ref().map(|p| p.to_string()).as_deref(),
        src = %conn.src_ip,
        dst = %SocketAddr::new(conn.dst_ip, conn.dst_port),
        workload = %wl.uid,
        allowed = d.is_allow(),
        policy = d.policy().map(|p| p.to_string()).as_deref(),
        dry_run = ?d.dry_run,
        "authorization decision"
    );
    match d.verdict {
        crate::rbac::Verdict::Allow { .. } => Ok(()),
        crate::rbac::Verdict::Deny { policy, reason } => Err(ProxyError::Rbac {
            policy: policy.to_string(),
            reason: reason.as_str(),
        }),
    }
}

/// Which path a listener's connections take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Redirected outbound traffic (15001).
    Outbound,
    /// Redirected inbound plaintext traffic (15006).
    InboundPlaintext,
    /// SOCKS5 front end of the outbound path (15080).
    Socks5,
    /// HBONE tunnels from other mesh proxies (15008).
    InboundHbone,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Outbound => "outbound",
            Role::InboundPlaintext => "inbound_plaintext",
            Role::Socks5 => "socks5",
            Role::InboundHbone => "inbound_hbone",
        }
    }
}

/// A bound listener and the path its connections take.
pub struct Listener {
    listener: tokio::net::TcpListener,
    ctx: Arc<ProxyCtx>,
    role: Role,
}

impl Listener {
    pub fn new(listener: tokio::net::TcpListener, ctx: Arc<ProxyCtx>, role: Role) -> Self {
        Self {
            listener,
            ctx,
            role,
        }
    }

    pub fn address(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until a drain starts (then the socket is closed, so that new
    /// connections are refused) or the task is dropped.
    pub async fn run(self) {
        let (ctx, role) = (self.ctx, self.role);
        let drain = ctx.drain.clone();
        accept_loop(
            self.listener,
            role.name(),
            &drain,
            move |stream, peer, watcher| {
                let ctx = ctx.clone();
                async move {
                    // The watcher lives as long as the connection; an HBONE connection hands it
                    // over, counting as a connection until its tunnels do instead.
                    match (role, watcher) {
                        (Role::InboundHbone, w) => inbound_hbone::serve(ctx, stream, peer, w).await,
                        (Role::Outbound, _w) => outbound::serve(&ctx, stream, peer).await,
                        (Role::InboundPlaintext, _w) => {
                            inbound_plain::serve(&ctx, stream, peer).await
                        }
                        (Role::Socks5, _w) => socks5::serve(&ctx, stream, peer).await,
                    }
                }
            },
        )
        .await
    }
}

/// Accepts connections until a drain starts, spawning `handle` for each with the drain watcher it
/// must hold for its life; a failed accept (e.g. out of file descriptors) is logged and retried
/// after a short pause instead of killing the listener. Returning drops (closes) the listening
/// socket.
///
/// No connection can be accepted yet unwatched when the drain looks for open ones: the loop holds
/// the drain for its whole life ([`crate::drain::Signal::hold`]), checks the drain before every
/// accept (`biased`), and watches an accepted connection before anything else, so the count of
/// holders never drops to zero between an accept and its watcher.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    name: &'static str,
    drain: &crate::drain::Signal,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, crate::drain::Watcher) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let _hold = drain.hold();
    let mut draining = std::pin::pin!(drain.draining());
    loop {
        let accepted = tokio::select! {
            biased;
            () = &mut draining => {
                tracing::info!(listener = name, "draining: stopped accepting connections");
                return;
            }
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let watcher = drain.watch();
                if let Err(e) = crate::socket::tune_accepted(&stream) {
                    tracing::debug!(listener = name, %peer, error = %e, "could not tune accepted socket");
                }
                tokio::spawn(handle(stream, peer, watcher));
            }
            Err(e) => {
                tracing::warn!(listener = name, error = %e, "accept failed; retrying in 50ms");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
