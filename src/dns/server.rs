//! The DNS listeners: UDP and TCP on the same address(es), every query answered from the store
//! or forwarded ([`super::respond`], [`super::forward`]).
//!
//! Limits (the listener faces every process of the pod): at most [`MAX_IN_FLIGHT`] queries in
//! flight per client address and [`MAX_TOTAL`] in all (more are dropped, as a busy resolver
//! does; the client retries); TCP connections at most [`MAX_TCP`], closed after [`TCP_IDLE`]
//! without a query or with a reply unread, one message at a time of at most 65 535 bytes (the
//! length prefix's limit). The limits are the node's ([`DnsLimits`], shared by every pod's
//! server in shared mode). A server's tasks (each query, each TCP client) are its own: stopping
//! it (a removed pod) ends them all and closes every socket it had.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use super::forward::Upstreams;
use super::{answer, fit_udp, question, respond, servfail, Reply, Transport};
use crate::store::Store;

/// Queries in flight from one client address.
pub const MAX_IN_FLIGHT: usize = 64;
/// Queries in flight in all.
pub const MAX_TOTAL: usize = 1024;
/// Open TCP connections.
pub const MAX_TCP: usize = 256;
/// A TCP connection without a query for this long is closed (ztunnel's TCP request timeout).
pub const TCP_IDLE: Duration = Duration::from_secs(5);
/// The largest UDP query read whole; a longer datagram is cut, fails to parse and gets FORMERR
/// (queries are a question and an OPT record: a few hundred bytes at most).
pub const MAX_UDP_QUERY: usize = 4096;

/// ztunnel's DNS metrics (`istio_dns_*`, registered by the metrics module).
pub struct DnsMetrics {
    pub requests: Family<DnsLabels, Counter>,
    pub upstream_requests: Family<DnsLabels, Counter>,
    pub upstream_failures: Family<DnsLabels, Counter>,
    pub upstream_duration: Family<DnsLabels, Histogram, fn() -> Histogram>,
}

impl Default for DnsMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            upstream_requests: Family::default(),
            upstream_failures: Family::default(),
            // ztunnel's bucket bounds, in increasing order (ztunnel lists 0.005 before 0.001).
            upstream_duration: Family::new_with_constructor(|| {
                Histogram::new([0.001, 0.005, 0.01, 0.1, 1.0, 5.0])
            }),
        }
    }
}

/// ztunnel's labels of the DNS metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DnsLabels {
    pub request_query_type: String,
    pub request_protocol: &'static str,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
}

/// Who the queries come from and where their answers come from.
#[derive(Clone)]
pub struct DnsContext {
    pub store: Arc<Store>,
    pub network: Arc<str>,
    pub rules: answer::NameRules,
    /// The served workload (dedicated mode, or the pod in shared mode): every client is it.
    /// `None`: the client is the workload at the query's source address, if any.
    pub own_workload: Option<crate::model::WorkloadInfo>,
    /// The clients' search domains: dedicated mode's are the pod's resolv.conf `search` list;
    /// `None` (shared mode): derived from each pod's namespace.
    pub search: Option<Vec<String>>,
    pub node_name: String,
    pub upstreams: Upstreams,
    pub metrics: Arc<DnsMetrics>,
    /// The node's limits, shared by every server made from this context.
    pub limits: Arc<DnsLimits>,
}

/// Queries in flight and TCP clients, counted for the whole node.
pub struct DnsLimits {
    inflight: Arc<InFlight>,
    tcp_open: Arc<tokio::sync::Semaphore>,
}

impl Default for DnsLimits {
    fn default() -> Self {
        Self {
            inflight: Arc::default(),
            tcp_open: Arc::new(tokio::sync::Semaphore::new(MAX_TCP)),
        }
    }
}

/// The bound DNS sockets.
pub struct DnsServer {
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
}

/// Counts queries in flight per client; a slot is given back when its guard drops.
#[derive(Default)]
struct InFlight {
    by_client: Mutex<HashMap<IpAddr, usize>>,
}

struct Slot(Arc<InFlight>, IpAddr);

impl Drop for Slot {
    fn drop(&mut self) {
        let mut m = self
            .0
            .by_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl InFlight {
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<Slot> {
        let mut m = self
            .by_client
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let total: usize = m.values().sum();
        let n = m.entry(ip).or_default();
        if *n >= MAX_IN_FLIGHT || total >= MAX_TOTAL {
            return None;
        }
        *n += 1;
        Some(Slot(self.clone(), ip))
    }
}

impl DnsServer {
    /// A server on UDP and TCP on the first of `addrs` (an error if it cannot) and on the others
    /// where it can (the IPv6 loopback of the default pair is absent where IPv6 is off); `pair`
    /// makes each address's sockets, in turn (bound now, a pod's in its namespace, or handed over
    /// by a predecessor); `owner` names whose they are in the line of a skipped address.
    pub async fn bind_with<F, Fut>(
        addrs: &[SocketAddr],
        owner: &str,
        mut pair: F,
    ) -> std::io::Result<(DnsServer, Vec<SocketAddr>)>
    where
        F: FnMut(SocketAddr) -> Fut,
        Fut: std::future::Future<
            Output = std::io::Result<(std::net::UdpSocket, std::net::TcpListener)>,
        >,
    {
        let (mut udp, mut tcp, mut bound) = (Vec::new(), Vec::new(), Vec::new());
        for (i, a) in addrs.iter().enumerate() {
            match pair(*a).await {
                Ok((u, t)) => {
                    bound.push(u.local_addr()?);
                    udp.push(UdpSocket::from_std(u)?);
                    tcp.push(TcpListener::from_std(t)?);
                }
                Err(e) if i > 0 => {
                    tracing::info!(addr = %a, owner, error = %e, "DNS proxy: not listening on this address");
                }
                Err(e) => return Err(e),
            }
        }
        Ok((DnsServer { udp, tcp }, bound))
    }

    /// Shows `keep` each socket (`dns-udp <addr>`, `dns-tcp <addr>`) to be kept for a successor.
    pub fn keep_sockets(
        &self,
        mut keep: impl FnMut(
            String,
            crate::handoff::wire::Kind,
            SocketAddr,
            std::os::fd::BorrowedFd<'_>,
        ),
    ) {
        use crate::handoff::wire::Kind;
        use std::os::fd::AsFd;
        for u in &self.udp {
            if let Ok(a) = u.local_addr() {
                keep(format!("dns-udp {a}"), Kind::Udp, a, u.as_fd());
            }
        }
        for t in &self.tcp {
            if let Ok(a) = t.local_addr() {
                keep(format!("dns-tcp {a}"), Kind::Tcp, a, t.as_fd());
            }
        }
    }

    /// Serves until `stop` drains (then it stops receiving and lets the queries and TCP clients
    /// in flight finish, for at most [`STOP_GRACE`]) or until dropped (its tasks with it).
    pub async fn run(self, ctx: Arc<DnsContext>, stop: crate::drain::Signal) {
        let inflight = ctx.limits.inflight.clone();
        let tcp_open = ctx.limits.tcp_open.clone();
        let mut set = tokio::task::JoinSet::new();
        for u in self.udp {
            set.spawn(serve_udp(
                Arc::new(u),
                ctx.clone(),
                inflight.clone(),
                stop.clone(),
            ));
        }
        for t in self.tcp {
            set.spawn(serve_tcp(
                t,
                ctx.clone(),
                inflight.clone(),
                tcp_open.clone(),
                stop.clone(),
            ));
        }
        while set.join_next().await.is_some() {}
    }
}

/// How long a stopped DNS server lets the queries it received finish (a forwarded one waits for
/// its upstream).
pub const STOP_GRACE: Duration = Duration::from_secs(5);

async fn serve_udp(
    sock: Arc<UdpSocket>,
    ctx: Arc<DnsContext>,
    inflight: Arc<InFlight>,
    stop: crate::drain::Signal,
) {
    let mut buf = vec![0u8; MAX_UDP_QUERY];
    // The queries being answered: bounded by the in-flight limits, aborted with this task.
    let mut queries = tokio::task::JoinSet::new();
    let mut stopped = std::pin::pin!(stop.draining());
    loop {
        while queries.try_join_next().is_some() {}
        let received = tokio::select! {
            biased;
            () = &mut stopped => break,
            r = sock.recv_from(&mut buf) => r,
        };
        let (n, peer) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: UDP receive failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let Some(slot) = inflight.take(peer.ip().to_canonical()) else {
            tracing::debug!(%peer, "DNS: too many queries in flight from this client; dropped");
            continue;
        };
        let (query, ctx, sock) = (buf[..n].to_vec(), ctx.clone(), sock.clone());
        queries.spawn(async move {
            let _slot = slot;
            if let Some(reply) = handle(&ctx, &query, peer, Transport::Udp).await {
                let _ = sock.send_to(&reply, peer).await;
            }
        });
    }
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while queries.join_next().await.is_some() {}
    })
    .await;
}

async fn serve_tcp(
    l: TcpListener,
    ctx: Arc<DnsContext>,
    inflight: Arc<InFlight>,
    open: Arc<tokio::sync::Semaphore>,
    stop: crate::drain::Signal,
) {
    // The TCP clients: bounded by `open`, aborted with this task.
    let mut clients = tokio::task::JoinSet::new();
    let mut stopped = std::pin::pin!(stop.draining());
    loop {
        while clients.try_join_next().is_some() {}
        let accepted = tokio::select! {
            biased;
            () = &mut stopped => break,
            a = l.accept() => a,
        };
        let (s, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, "DNS: TCP accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            continue; // over the cap: closed at once
        };
        let (ctx, inflight) = (ctx.clone(), inflight.clone());
        clients.spawn(async move {
            let _permit = permit;
            let _ = tcp_conn(s, peer, &ctx, &inflight).await;
        });
    }
    // Stopped: the listener closes now; clients get the grace to finish.
    drop(l);
    let _ = tokio::time::timeout(STOP_GRACE, async {
        while clients.join_next().await.is_some() {}
    })
    .await;
}

/// One TCP client: length-prefixed queries, one at a time, until it closes or idles.
async fn tcp_conn(
    mut s: TcpStream,
    peer: SocketAddr,
    ctx: &DnsContext,
    inflight: &Arc<InFlight>,
) -> std::io::Result<()> {
    loop {
        let len = match tokio::time::timeout(TCP_IDLE, s.read_u16()).await {
            Ok(Ok(len)) => len,
            _ => return Ok(()),
        };
        let mut query = vec![0u8; usize::from(len)];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut query))
            .await
            .map_err(|_| std::io::Error::other("idle mid-message"))??;
        let Some(_slot) = inflight.take(peer.ip().to_canonical()) else {
            return Ok(());
        };
        let Some(reply) = handle(ctx, &query, peer, Transport::Tcp).await else {
            return Ok(());
        };
        let Ok(len) = u16::try_from(reply.len()) else {
            return Ok(());
        };
        let mut framed = Vec::with_capacity(reply.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&reply);
        // A client that does not read its reply does not keep its place.
        tokio::time::timeout(TCP_IDLE, s.write_all(&framed))
            .await
            .map_err(|_| std::io::Error::other("reply unread"))??;
    }
}

/// The reply to one query from `peer`, or `None` (nothing can be answered).
async fn handle(
    ctx: &DnsContext,
    query: &[u8],
    peer: SocketAddr,
    transport: Transport,
) -> Option<Vec<u8>> {
    let protocol = match transport {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    };
    let started = Instant::now();
    let snapshot = ctx.store.load();
    let peer_ip = peer.ip().to_canonical();
    let by_addr = || {
        snapshot
            .workload_by_addr(&crate::model::NetworkAddr::new(
                ctx.network.clone(),
                peer_ip,
            ))
            .cloned()
    };
    let client_wl = match &ctx.own_workload {
        Some(own) => snapshot
            .workloads_on_node(&ctx.node_name)
            .find(|w| own.is(w))
            .cloned()
            .or_else(by_addr),
        None => by_addr(),
    };
    let namespace = ctx
        .own_workload
        .as_ref()
        .map(|w| w.namespace.as_str())
        .or(client_wl.as_deref().map(|w| w.namespace.as_str()));
    let client = answer::Client {
        namespace,
        network: &ctx.network,
        search: ctx.search.as_deref(),
    };
    let (name, qtype) = question(query).unwrap_or_else(|| ("?".into(), "unknown".into()));
    let labels = DnsLabels {
        request_query_type: qtype.clone(),
        request_protocol: protocol,
        source_canonical_service: client_wl
            .as_deref()
            .map_or_else(|| "unknown".into(), |w| w.canonical_name.clone()),
        source_canonical_revision: client_wl
            .as_deref()
            .map_or_else(|| "unknown".into(), |w| w.canonical_revision.clone()),
    };
    ctx.metrics.requests.get_or_create(&labels).inc();
    match respond(query, &snapshot, client, &ctx.rules, transport) {
        Reply::Send { bytes, rcode } => {
            tracing::debug!(target: "dns", client = %peer, protocol, %name, qtype = %qtype, source = "store", rcode = %rcode, duration_us = started.elapsed().as_micros() as u64, "dns query answered");
            Some(bytes)
        }
        Reply::Drop => {
            tracing::debug!(target: "dns", client = %peer, protocol, "dns query dropped: not a DNS query");
            None
        }
        Reply::Forward => {
            ctx.metrics.upstream_requests.get_or_create(&labels).inc();
            let t = Instant::now();
            let answer = ctx.upstreams.exchange(query).await;
            ctx.metrics
                .upstream_duration
                .get_or_create(&labels)
                .observe(t.elapsed().as_secs_f64());
            match answer {
                Ok(bytes) => {
                    let mut bytes = match transport {
                        Transport::Udp => fit_udp(query, bytes),
                        Transport::Tcp => bytes,
                    };
                    // Not l4mesh's to vouch for: AA cleared, as ztunnel answers forwarded names.
                    if let Some(flags) = bytes.get_mut(2) {
                        *flags &= !0x04;
                    }
                    tracing::debug!(target: "dns", client = %peer, protocol, %name, qtype = %qtype, source = "upstream", duration_us = started.elapsed().as_micros() as u64, "dns query forwarded");
                    Some(bytes)
                }
                Err(e) => {
                    ctx.metrics.upstream_failures.get_or_create(&labels).inc();
                    tracing::debug!(target: "dns", client = %peer, protocol, %name, qtype = %qtype, error = %e, "dns query failed upstream: SERVFAIL");
                    servfail(query)
                }
            }
        }
    }
}
