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
mod copy;
pub mod double_hbone;
mod error;
pub mod h2io;
pub mod hbone;
mod inbound_hbone;
mod inbound_plain;
mod metering;
mod outbound;
mod pool;
pub mod proxy_protocol;
pub mod route;
mod self_call;
pub mod socks5;
#[cfg(test)]
mod source_tests;
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
pub use self_call::OwnPorts;

/// What every connection handler needs, shared by all listeners.
pub struct ProxyCtx {
    pub store: Arc<Store>,
    /// The network this node's workloads are on (`NETWORK`); keys every address lookup.
    pub network: Arc<str>,
    /// This node's name (`NODE_NAME`): inbound connections are only for workloads on it.
    pub node_name: String,
    pub upstream: UpstreamOptions,
    /// The ports of l4mesh's own listeners: a connection to one of them on an address of this
    /// namespace is refused, whatever the listener's bind address ([`self_call`]).
    pub own_ports: OwnPorts,
    /// In on-demand xDS mode: asks the control plane about unknown destinations.
    pub on_demand: Option<crate::xds::OnDemand>,
    /// On-demand DNS: endpoints known by hostname only are resolved through it (from this
    /// node's namespace, as ztunnel's system resolver).
    pub hostnames: Arc<crate::dns::resolve::HostResolver>,
    /// The certificates of this node's identities (HBONE presents them on both ends).
    pub secrets: Arc<SecretManager>,
    /// The identity of this l4mesh's own workload (dedicated mode): the source identity of
    /// outbound tunnels from clients that are not known workloads.
    pub own_identity: Option<crate::model::SpiffeId>,
    /// The workload this l4mesh serves (dedicated mode, `PROXY_WORKLOAD_INFO`): the only source
    /// of outbound identity and, with the pod's other addresses, the destinations inbound serves.
    pub own_workload: Option<crate::model::WorkloadInfo>,
    /// HTTP/2 windows, frame size and pool limits of both HBONE ends.
    pub h2: H2Tuning,
    /// `L4MESH_SPLICE_AFTER`: a plain TCP↔TCP copy direction that has moved this many bytes goes
    /// on with `splice(2)`; `None`: always the buffered copy (ztunnel's way).
    pub splice_after: Option<u64>,
    /// `LOCALHOST_APP_TUNNEL`: a workload whose application tunnel speaks PROXY protocol gets its
    /// streams on its loopback (`127.0.0.1:<port>`), so that only the proxy reaches that port.
    pub localhost_app_tunnel: bool,
    /// `L4MESH_ENFORCE_WAYPOINT`: a workload with a waypoint takes HBONE only from the waypoint
    /// and no plaintext (stricter than ztunnel, where an AuthorizationPolicy does that).
    pub enforce_waypoint: bool,
    /// Shared HBONE state: server TLS configs, the tunnel pool, counters (one for the node: the
    /// pods of shared mode share it; pool keys keep their connections apart).
    pub hbone: Arc<HboneState>,
    /// Established inbound connections, re-checked when the policies change.
    pub conns: Arc<ConnTracker>,
    /// OpenTelemetry export of connection spans and access-log records; `None` = off.
    pub otel: Option<Arc<crate::otel::Otel>>,
    /// This l4mesh's traffic metrics (Istio TCP metrics, RBAC decisions, open connections).
    pub metrics: Arc<crate::metrics::Traffic>,
    /// Shutdown: listeners stop accepting when it starts; copies stop at its deadline. In
    /// shared mode, a pod's own (its `del` drains it alone).
    pub drain: crate::drain::Signal,
    /// Shared mode: the pod whose network namespace this context's listeners and upstream
    /// sockets are in ([`crate::inpod`]); `None` in dedicated mode and for the node itself.
    pub pod: Option<Arc<PodScope>>,
}

/// The pod a shared-mode context serves, as the CNI agent named it. Its workload is found in the
/// store by name (never by a packet's address); its identity follows from its namespace and
/// service account, so it is known before the workload reaches the store.
#[derive(Debug)]
pub struct PodScope {
    /// The pod's uid as the agent sent it (Kubernetes' pod uid).
    pub uid: Arc<str>,
    pub info: crate::model::WorkloadInfo,
    /// `<namespace>/<name>`, for access lines and errors.
    pub name: Arc<str>,
}

impl PodScope {
    pub fn new(uid: &str, info: crate::model::WorkloadInfo) -> Self {
        let name = format!("{}/{}", info.namespace, info.name).into();
        Self {
            uid: uid.into(),
            info,
            name,
        }
    }

    /// The pod's workload in `snapshot`, if it arrived: the one at `ip` when that is the pod
    /// (the common case, one lookup), else the pod's by name among the node's workloads.
    pub fn workload<'a>(
        &self,
        snapshot: &'a crate::store::Snapshot,
        network: &Arc<str>,
        node: &str,
        ip: Option<std::net::IpAddr>,
    ) -> Option<&'a Arc<crate::model::Workload>> {
        ip.and_then(|ip| {
            snapshot.workload_by_addr(&crate::model::NetworkAddr::new(network.clone(), ip))
        })
        .filter(|wl| self.info.is(wl))
        .or_else(|| snapshot.workloads_on_node(node).find(|wl| self.info.is(wl)))
    }
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
    /// `CRL_PATH`'s revocation lists: checked at both ends' handshakes; a live connection whose
    /// peer a new list revokes is closed.
    pub revocation: Option<Arc<crate::tls::Revocation>>,
}

impl HboneState {
    pub fn new(revocation: Option<Arc<crate::tls::Revocation>>) -> Self {
        Self {
            revocation,
            ..Self::default()
        }
    }

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
    /// The workload with address `ip` on this node's network that this l4mesh serves: the only
    /// destinations the inbound paths accept. In dedicated mode (`PROXY_WORKLOAD_INFO`) that is
    /// the served workload, whatever its `node` (ztunnel does not ask for `NODE_NAME` there), or
    /// another workload of this node at an address of this pod's network namespace (a pod may
    /// carry several workload addresses); without it, any workload of `NODE_NAME`.
    pub fn local_workload(
        &self,
        snapshot: &crate::store::Snapshot,
        ip: std::net::IpAddr,
    ) -> Option<Arc<crate::model::Workload>> {
        let wl =
            snapshot.workload_by_addr(&crate::model::NetworkAddr::new(self.network.clone(), ip))?;
        self.serves(wl, ip).then(|| wl.clone())
    }

    /// Whether this l4mesh serves `wl` at its address `ip` ([`Self::local_workload`]'s rule).
    pub fn serves(&self, wl: &crate::model::Workload, ip: std::net::IpAddr) -> bool {
        if let Some(pod) = &self.pod {
            // Shared mode: only the pod whose namespace this listener is in.
            return pod.info.is(wl);
        }
        match &self.own_workload {
            Some(own) => {
                own.is(wl) || wl.node == self.node_name && crate::socket::is_local_address(ip)
            }
            None => wl.node == self.node_name,
        }
    }

    /// The workload whose identity an outbound connection from `src` carries, or why it has
    /// none it may use. Identity never follows an address alone: an app can bind a foreign
    /// source address (`IP_FREEBIND`). In dedicated mode the workload at `src` counts only when
    /// it is the served one or `src` is an address of this pod; any other known workload's
    /// address is refused. Without `PROXY_WORKLOAD_INFO` (local runs), only an address of this
    /// network namespace names its workload. `Ok(None)`: not a known workload (the node's own
    /// identity applies).
    pub fn source_workload(
        &self,
        snapshot: &crate::store::Snapshot,
        src: SocketAddr,
    ) -> Result<Option<Arc<crate::model::Workload>>, ProxyError> {
        // `src` is canonical (accept_loop made it so).
        let ip = src.ip();
        if let Some(pod) = &self.pod {
            // Shared mode: whatever address it used, the connection came from this pod's
            // namespace, so it is the pod's (its identity applies until its workload arrives).
            return Ok(pod
                .workload(snapshot, &self.network, &self.node_name, Some(ip))
                .cloned());
        }
        let wl =
            snapshot.workload_by_addr(&crate::model::NetworkAddr::new(self.network.clone(), ip));
        source_decision(self.own_workload.as_ref(), wl, src, || {
            crate::socket::is_local_address(ip)
        })
    }

    /// Whether an outbound destination is l4mesh itself (a connection to it would loop): one of
    /// its ports on loopback, the unspecified address or an address of this namespace.
    pub fn is_self_call(&self, dst: SocketAddr) -> bool {
        match &self.pod {
            // The pod's namespace is not this thread's: its addresses are its workload's.
            Some(pod) => self.own_ports.is_self(dst, |ip| {
                let snapshot = self.store.load();
                pod.workload(&snapshot, &self.network, &self.node_name, Some(ip))
                    .is_some_and(|wl| wl.addresses.contains(&ip))
            }),
            None => self.own_ports.is_self(dst, crate::socket::is_local_address),
        }
    }

    /// The context of one pod in shared mode: this (the node's) context with the pod's identity,
    /// its namespace for upstream sockets and its own drain; everything else shared.
    pub fn for_pod(
        &self,
        pod: Arc<PodScope>,
        identity: crate::model::SpiffeId,
        netns: Arc<crate::inpod::netns::PodNetns>,
        drain: crate::drain::Signal,
    ) -> ProxyCtx {
        ProxyCtx {
            store: self.store.clone(),
            network: self.network.clone(),
            node_name: self.node_name.clone(),
            upstream: UpstreamOptions {
                netns: Some(netns),
                ..self.upstream.clone()
            },
            own_ports: self.own_ports.clone(),
            on_demand: self.on_demand.clone(),
            hostnames: self.hostnames.clone(),
            secrets: self.secrets.clone(),
            own_identity: Some(identity),
            own_workload: Some(pod.info.clone()),
            h2: self.h2,
            splice_after: self.splice_after,
            localhost_app_tunnel: self.localhost_app_tunnel,
            enforce_waypoint: self.enforce_waypoint,
            hbone: self.hbone.clone(),
            conns: self.conns.clone(),
            otel: self.otel.clone(),
            metrics: self.metrics.clone(),
            drain,
            pod: Some(pod),
        }
    }

    /// The pod this context serves (`<namespace>/<name>`), shared mode only.
    pub fn pod_name(&self) -> Option<Arc<str>> {
        self.pod.as_ref().map(|p| p.name.clone())
    }
}

/// [`ProxyCtx::source_workload`] once the workload at the source address (`wl`) is known;
/// `is_local` says whether the address is this network namespace's, asked only when the
/// workload is not the served one.
fn source_decision(
    own: Option<&crate::model::WorkloadInfo>,
    wl: Option<&Arc<crate::model::Workload>>,
    src: SocketAddr,
    is_local: impl FnOnce() -> bool,
) -> Result<Option<Arc<crate::model::Workload>>, ProxyError> {
    let Some(wl) = wl else {
        return Ok(None);
    };
    if own.is_some_and(|own| own.is(wl)) || is_local() {
        return Ok(Some(wl.clone()));
    }
    Err(ProxyError::ForeignSource {
        src,
        workload: format!("{}/{}", wl.namespace, wl.name),
        served: own.map(|o| format!("{}/{}", o.namespace, o.name)),
    })
}

/// The original destination of a connection accepted on a capture listener (15001, 15006), or
/// why it was not redirected; the error comes with the listener's address for the log line.
///
/// A connection dialled straight at the listener is a loop (l4mesh's own unmarked traffic) or a
/// misuse. Without a conntrack entry `SO_ORIGINAL_DST` fails; with one (any NAT rule loaded) it
/// answers with the address dialled, which is then the listener's own port: both are refused.
fn captured_dst(
    ctx: &ProxyCtx,
    stream: &tokio::net::TcpStream,
    src: SocketAddr,
) -> Result<SocketAddr, Box<(SocketAddr, ProxyError)>> {
    // Asked only on the refusal paths: `original_dst` already read the local address once.
    let local = || crate::socket::canonical(stream.local_addr().unwrap_or(src));
    let not_redirected = |local, source| {
        Box::new((
            local,
            ProxyError::NotRedirected {
                local,
                error: source,
            },
        ))
    };
    match crate::socket::original_dst(stream) {
        Ok(dst) if ctx.own_ports.contains(dst.port()) && dst == local() => Err(not_redirected(
            dst,
            std::io::Error::other("the original destination is the listener itself"),
        )),
        Ok(dst) => Ok(dst),
        Err(e) => Err(not_redirected(local(), e)),
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
    via: conn_tracker::Via,
) -> Result<conn_tracker::Registration, ProxyError> {
    let result = admit_once(ctx, snapshot, wl, conn, via);
    // One decision per connection, whichever snapshot made it.
    ctx.metrics.rbac_decision(result.is_ok());
    result
}

fn admit_once(
    ctx: &ProxyCtx,
    snapshot: &crate::store::Snapshot,
    wl: &crate::model::Workload,
    conn: crate::rbac::ConnCtx,
    via: conn_tracker::Via,
) -> Result<conn_tracker::Registration, ProxyError> {
    decide(snapshot, wl, &conn)?;
    let reg = ctx.conns.register(conn.clone(), wl.uid.clone(), via);
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
    /// The `listener` of the access log and of spans.
    pub fn name(self) -> &'static str {
        match self {
            Role::Outbound => "outbound",
            Role::InboundPlaintext => "inbound_plaintext",
            Role::Socks5 => "socks5",
            Role::InboundHbone => "inbound_hbone",
        }
    }

    /// Whether the connections come to this node's workloads (else from them).
    pub fn inbound(self) -> bool {
        matches!(self, Role::InboundPlaintext | Role::InboundHbone)
    }

    /// The `direction` of the access log and of spans.
    pub fn direction(self) -> &'static str {
        if self.inbound() {
            "inbound"
        } else {
            "outbound"
        }
    }
}

/// A bound listener, the path its connections take, and its connection caps.
pub struct Listener {
    listener: tokio::net::TcpListener,
    ctx: Arc<ProxyCtx>,
    role: Role,
    limiter: Arc<crate::limits::Limiter>,
}

impl Listener {
    pub fn new(
        listener: tokio::net::TcpListener,
        ctx: Arc<ProxyCtx>,
        role: Role,
        limiter: Arc<crate::limits::Limiter>,
    ) -> Self {
        Self {
            listener,
            ctx,
            role,
            limiter,
        }
    }

    pub fn address(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves connections until a drain starts (then the socket is closed, so that new
    /// connections are refused) or the task is dropped.
    ///
    /// Each role spawns its own handler, so a connection's task is the size of its own path's
    /// future, not of the largest of the four (an outbound task was 16 KiB for SOCKS5's sake).
    pub async fn run(self) {
        // Each handler's future is made inside the task's async block, not moved into it: a
        // future moved in and then awaited takes its room twice in the task.
        match self.role {
            // The watcher lives as long as the connection; an HBONE connection hands it over,
            // counting as a connection until its tunnels do instead.
            Role::InboundHbone => {
                self.serve(|ctx, stream, peer, watcher, permit| async move {
                    let _permit = permit;
                    inbound_hbone::serve(ctx, stream, peer, watcher).await
                })
                .await
            }
            Role::Outbound => {
                self.serve(|ctx, stream, peer, watcher, permit| async move {
                    let _held = (watcher, permit);
                    outbound::serve(&ctx, stream, peer).await
                })
                .await
            }
            Role::InboundPlaintext => {
                self.serve(|ctx, stream, peer, watcher, permit| async move {
                    let _held = (watcher, permit);
                    inbound_plain::serve(&ctx, stream, peer).await
                })
                .await
            }
            Role::Socks5 => {
                self.serve(|ctx, stream, peer, watcher, permit| async move {
                    let _held = (watcher, permit);
                    socks5::serve(&ctx, stream, peer).await
                })
                .await
            }
        }
    }

    /// The accept loop with `handle` spawned for each admitted connection, given the drain
    /// watcher and the limiter's permit to hold for the connection's life.
    async fn serve<F, Fut>(self, handle: F)
    where
        F: Fn(
            Arc<ProxyCtx>,
            tokio::net::TcpStream,
            SocketAddr,
            crate::drain::Watcher,
            crate::limits::Permit,
        ) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let ctx = self.ctx;
        let (drain, keepalive) = (ctx.drain.clone(), ctx.upstream.keepalive);
        accept_loop(
            self.listener,
            &self.limiter,
            keepalive,
            &drain,
            move |stream, peer, watcher, permit| handle(ctx.clone(), stream, peer, watcher, permit),
        )
        .await
    }
}

/// Serves `listeners` once `ready` (the mesh state is known; connections wait in the backlog
/// until then instead of being misrouted) until `drain` starts; a drain before readiness drops
/// (closes) them unused. One path for dedicated mode's listeners and each pod's.
pub async fn serve_when_ready(
    listeners: Vec<Listener>,
    ready: crate::readiness::Readiness,
    drain: crate::drain::Signal,
) {
    tokio::select! {
        () = ready.wait() => {}
        () = drain.draining() => return,
    }
    let mut set = tokio::task::JoinSet::new();
    for l in listeners {
        set.spawn(l.run());
    }
    while set.join_next().await.is_some() {}
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
///
/// A connection over the listener's caps ([`crate::limits`]) is closed before it is watched or
/// spawned; the permit of an admitted one goes with it to `handle`.
async fn accept_loop<F, Fut>(
    listener: tokio::net::TcpListener,
    limiter: &Arc<crate::limits::Limiter>,
    keepalive: crate::socket::Keepalive,
    drain: &crate::drain::Signal,
    handle: F,
) where
    F: Fn(tokio::net::TcpStream, SocketAddr, crate::drain::Watcher, crate::limits::Permit) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let name = limiter.name();
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
                // Canonical once, here: every phase after sees `::ffff:a.b.c.d` as `a.b.c.d`.
                let peer = crate::socket::canonical(peer);
                let Ok(permit) = limiter.admit(peer.ip()) else {
                    // Closed unserved (dropping the stream); counted and logged by the limiter.
                    continue;
                };
                if let Err(e) = crate::socket::tune_accepted(&stream, &keepalive) {
                    tracing::debug!(listener = name, %peer, error = %e, "could not tune accepted socket");
                }
                tokio::spawn(handle(stream, peer, watcher, permit));
            }
            Err(e) => {
                limiter.accept_failed();
                tracing::warn!(listener = name, error = %e, "accept failed; retrying in 50ms");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}
