//! Shared mode's pod proxies: what the CNI agent's requests do. Each added pod gets the three
//! data-path listeners bound inside its network namespace (through its [`PodNetns`] thread) and a
//! [`ProxyCtx`] of its own ([`ProxyCtx::for_pod`]: the pod's identity, its namespace for upstream
//! sockets, its own drain); everything else (store, certificates, HBONE pool, metrics) is the
//! node's. `del` drains the pod alone; the node's drain drains them all.
//!
//! Invariants: a replayed pod (`add` or `keep` of a uid already served) keeps its listeners and
//! connections, and the new descriptor is closed; a pod's namespace descriptor is closed when its
//! proxy is gone (its thread ends with the last [`PodNetns`] reference); every request is
//! answered, an unusable one with an error naming why.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use super::netns::{NetnsError, PodNetns};
use super::zds::Replay;
use super::{PodHandler, Request};
use crate::dns::server::{DnsContext, DnsServer};
use crate::drain::{Drain, Signal};
use crate::limits::Limiter;
use crate::model::{SpiffeId, WorkloadInfo};
use crate::proxy::{Listener, PodScope, ProxyCtx, Role};
use crate::readiness::{BlockReady, Readiness};

/// After a pod's drain deadline, how long its remaining connections get to close.
const FORCE_GRACE: Duration = Duration::from_millis(500);

/// How the pod listeners are made, the same for every pod.
pub struct PodListeners {
    /// The ports of the outbound (15001), inbound plaintext (15006) and HBONE (15008) listeners.
    pub outbound: u16,
    pub inbound_plaintext: u16,
    pub hbone: u16,
    /// `INPOD_PORT_REUSE`.
    pub port_reuse: bool,
    /// The node-wide caps of each role's listeners (shared by the pods).
    pub limiters: [Arc<Limiter>; 3],
    /// The DNS proxy each pod gets (`None`: DNS capture off).
    pub dns: Option<PodDns>,
}

/// A pod's DNS proxy: where it listens inside the pod, and the node's context it starts from
/// (the pod's own workload and namespace are filled in per pod).
pub struct PodDns {
    /// `DNS_PROXY_ADDR` (default `127.0.0.1:15053` and `[::1]:15053`): the first must bind; the
    /// others are skipped where the pod lacks them (no IPv6 loopback).
    pub addrs: Vec<SocketAddr>,
    pub template: Arc<DnsContext>,
}

impl PodDns {
    /// The context of `pod`'s DNS proxy: every client is the pod, forwarded queries leave from
    /// its namespace.
    fn for_pod(&self, pod: &WorkloadInfo, netns: &Arc<PodNetns>) -> Arc<DnsContext> {
        Arc::new(DnsContext {
            own_workload: Some(pod.clone()),
            upstreams: self.template.upstreams.from_pod(netns.clone()),
            ..(*self.template).clone()
        })
    }
}

/// What the manager needs from the node.
pub struct NodeParts {
    /// The node's context: the template of every pod's.
    pub base: Arc<ProxyCtx>,
    pub trust_domain: String,
    /// Listeners accept once this is ready (the mesh state is known).
    pub readiness: Readiness,
    /// The node's drain: a pod being drained holds it, so the node's drain waits for it.
    pub node_drain: Signal,
    /// How long a removed pod's connections may continue.
    pub deadline: Duration,
    /// Where certificate workers run (the operators' runtime; `None`: the current one), so that
    /// signing requests never take a data-plane thread.
    pub control: Option<tokio::runtime::Handle>,
    /// What an upgrade hands to a successor: every pod's sockets and namespace are kept in it.
    pub held: crate::handoff::Held,
}

/// The pods, for metrics and `/config_dump`.
#[derive(Default)]
pub struct PodsView {
    pods: Mutex<BTreeMap<String, PodEntry>>,
    started: AtomicU64,
    stopped: AtomicU64,
}

/// One pod as `/config_dump` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PodEntry {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    /// `listening` or `draining`.
    pub state: &'static str,
    /// Seconds since the Unix epoch when the agent added it.
    pub added: u64,
}

/// The figures of ztunnel's `workload_manager_*` metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    /// Pods whose listeners accept.
    pub active: usize,
    /// Pods served whose workload has not reached the store yet (their identity is known from
    /// the agent; metrics and policies of their connections wait for it).
    pub pending: usize,
    pub started: u64,
    pub stopped: u64,
}

impl PodsView {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, PodEntry>> {
        self.pods.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every pod held, listening or draining.
    pub fn pods(&self) -> Vec<PodEntry> {
        self.lock().values().cloned().collect()
    }

    /// The counts now; `known` says whether a pod's workload is in the store.
    pub fn stats(&self, known: impl Fn(&PodEntry) -> bool) -> PodStats {
        let pods = self.lock();
        let listening = || pods.values().filter(|p| p.state == "listening");
        PodStats {
            active: listening().count(),
            pending: listening().filter(|p| !known(p)).count(),
            started: self.started.load(Relaxed),
            stopped: self.stopped.load(Relaxed),
        }
    }
}

/// A served pod.
struct PodProxy {
    drain: Drain,
    listeners: tokio::task::JoinHandle<()>,
    /// Its DNS proxy: stops receiving with the listeners, answers what it received.
    dns: Option<tokio::task::JoinHandle<()>>,
    identity: SpiffeId,
}

/// Acts on the agent's requests ([`PodHandler`]): one proxy per pod.
pub struct PodManager {
    node: NodeParts,
    listeners: PodListeners,
    pods: HashMap<String, PodProxy>,
    replay: Replay,
    /// Readiness waits for the first `snapshot_sent`.
    first_snapshot: Option<BlockReady>,
    view: Arc<PodsView>,
}

impl PodManager {
    /// `adopting`: the pods come from a predecessor's hand-off first ([`PodManager::adopt`]), so
    /// readiness does not wait for the agent (followed only once the predecessor lets go).
    pub fn new(node: NodeParts, listeners: PodListeners, adopting: bool) -> Self {
        let first_snapshot = (!adopting).then(|| {
            node.readiness
                .register("the CNI node agent's pods (ZDS snapshot_sent)")
        });
        Self {
            node,
            listeners,
            pods: HashMap::new(),
            replay: Replay::default(),
            first_snapshot,
            view: Arc::default(),
        }
    }

    /// What metrics and the admin server read.
    pub fn view(&self) -> Arc<PodsView> {
        self.view.clone()
    }

    /// Drains every pod at once (the node's drain, `deadline` its own or an upgrade's) and
    /// resolves when all are done.
    pub async fn drain_all(&mut self, deadline: Duration) {
        self.node.deadline = deadline;
        let all: Vec<String> = self.pods.keys().cloned().collect();
        let mut set = tokio::task::JoinSet::new();
        for uid in all {
            if let Some(task) = self.remove(&uid, "the node drains", true) {
                set.spawn(task);
            }
        }
        while set.join_next().await.is_some() {}
    }

    /// Serves a pod handed over by the predecessor (an upgrade): its listeners and DNS sockets
    /// are the predecessor's (their queues never closed); what was not handed over, or does not
    /// match this configuration, is bound afresh in the pod's namespace.
    pub async fn adopt(&mut self, mut pod: crate::handoff::InheritedPod) -> Result<(), String> {
        let info = WorkloadInfo {
            name: pod.pod.name.clone(),
            namespace: pod.pod.namespace.clone(),
            service_account: pod.pod.service_account.clone(),
        };
        let (uid, netns) = (
            pod.pod.uid.clone(),
            pod.netns.try_clone().map_err(|e| e.to_string())?,
        );
        self.start_pod(uid, info, netns, Some(&mut pod)).await
    }

    async fn add(
        &mut self,
        uid: String,
        info: Option<WorkloadInfo>,
        netns: std::os::fd::OwnedFd,
    ) -> Result<(), String> {
        self.replay.saw(&uid);
        if self.pods.contains_key(&uid) {
            // A replay after a reconnect: the pod keeps what it has; the new descriptor closes.
            tracing::debug!(%uid, "add of a pod already served (replay): kept as it is");
            return Ok(());
        }
        let info = info.ok_or_else(|| {
            format!("add for {uid} carries no workload_info; expected the pod's name, namespace and service account (its identity)")
        })?;
        self.start_pod(uid, info, netns, None).await
    }

    /// Serves a pod: its three listeners (on the wildcard address of its namespace, `[::]` or
    /// `0.0.0.0` where it has no IPv6) and its DNS proxy, each socket the predecessor's where
    /// `inherited` holds it (an upgrade), else bound now in the pod's namespace.
    async fn start_pod(
        &mut self,
        uid: String,
        info: WorkloadInfo,
        netns_fd: std::os::fd::OwnedFd,
        mut inherited: Option<&mut crate::handoff::InheritedPod>,
    ) -> Result<(), String> {
        use crate::handoff::wire::Kind;
        let adopted = inherited.is_some();
        let scope = Arc::new(PodScope::new(&uid, info));
        let netns_copy = netns_fd.try_clone().map_err(|e| e.to_string())?;
        let netns = Arc::new(PodNetns::enter(netns_copy, &scope.name).map_err(|e| e.to_string())?);
        let l = &self.listeners;
        let mut bound = Vec::with_capacity(3);
        for (what, port) in [
            ("outbound", l.outbound),
            ("inbound-plaintext", l.inbound_plaintext),
            ("hbone", l.hbone),
        ] {
            let handed = inherited
                .as_deref_mut()
                .and_then(|p| p.take(what, Kind::Tcp, port));
            bound.push(match handed {
                Some(fd) => std::net::TcpListener::from(fd),
                None => self
                    .bind_one(&netns, port)
                    .await
                    .map_err(|e| e.to_string())?,
            });
        }
        // A pod whose DNS port is taken (by its application) is still served, without DNS.
        let dns = match &self.listeners.dns {
            Some(d) => {
                let reuse = self.listeners.port_reuse;
                let server = DnsServer::bind_with(&d.addrs, netns.pod(), |addr| {
                    let mut take = |kind, name: String| {
                        inherited
                            .as_deref_mut()
                            .and_then(|p| p.take(&name, kind, addr.port()))
                    };
                    let u = take(Kind::Udp, format!("dns-udp {addr}"));
                    let t = take(Kind::Tcp, format!("dns-tcp {addr}"));
                    let netns = &netns;
                    async move {
                        let udp = match u {
                            Some(fd) => std::net::UdpSocket::from(fd),
                            None => netns
                                .bind_udp(addr, reuse)
                                .await
                                .map_err(std::io::Error::other)?,
                        };
                        let tcp = match t {
                            Some(fd) => std::net::TcpListener::from(fd),
                            None => netns
                                .listen(addr, reuse)
                                .await
                                .map_err(std::io::Error::other)?,
                        };
                        udp.set_nonblocking(true)?;
                        tcp.set_nonblocking(true)?;
                        Ok((udp, tcp))
                    }
                })
                .await;
                match server {
                    Ok((server, _)) => Some((server, d.for_pod(&scope.info, &netns))),
                    Err(e) => {
                        tracing::warn!(pod = %scope.name, error = %e, "pod DNS proxy not started: its DNS queries are not answered by l4mesh");
                        None
                    }
                }
            }
            None => None,
        };
        self.serve_pod(uid, scope, netns, netns_fd, bound, dns, adopted)
    }

    /// Serves a pod on its bound listeners (and DNS server), keeping copies of them and of its
    /// namespace (`netns_fd`) for a successor. `adopted`: handed over by a predecessor.
    #[allow(clippy::too_many_arguments)]
    fn serve_pod(
        &mut self,
        uid: String,
        scope: Arc<PodScope>,
        netns: Arc<PodNetns>,
        netns_fd: std::os::fd::OwnedFd,
        bound: Vec<std::net::TcpListener>,
        dns: Option<(DnsServer, Arc<DnsContext>)>,
        adopted: bool,
    ) -> Result<(), String> {
        use crate::handoff::wire::{pod_socket, Kind, PodOffer};
        use std::os::fd::AsFd;
        let identity = SpiffeId::new(
            &self.node.trust_domain,
            &scope.info.namespace,
            &scope.info.service_account,
        );
        let drain = Drain::new();
        let ctx = Arc::new(self.node.base.for_pod(
            scope.clone(),
            identity.clone(),
            netns.clone(),
            drain.signal(),
        ));
        let held = &self.node.held;
        let mut serve = Vec::new();
        let mut kept = Vec::new();
        for ((l, role), limiter) in bound
            .into_iter()
            .zip([Role::Outbound, Role::InboundPlaintext, Role::InboundHbone])
            .zip(&self.listeners.limiters)
        {
            let what = match role {
                Role::Outbound => "outbound",
                Role::InboundPlaintext => "inbound-plaintext",
                _ => "hbone",
            };
            kept.push((what, l.local_addr().ok(), l.try_clone()));
            let l = tokio::net::TcpListener::from_std(l).map_err(|e| {
                format!(
                    "the {} listener of {} could not join the runtime: {e}",
                    role.name(),
                    scope.name
                )
            })?;
            serve.push(Listener::new(l, ctx.clone(), role, limiter.clone()));
        }
        // Kept for a successor once nothing can fail any more (a failed add keeps nothing).
        held.forget_pod(&uid);
        held.keep(
            &pod_socket(&uid, "netns"),
            Kind::Netns,
            None,
            netns_fd.as_fd(),
        );
        drop(netns_fd);
        for (what, addr, l) in kept {
            match l {
                Ok(l) => held.keep(&pod_socket(&uid, what), Kind::Tcp, addr, l.as_fd()),
                Err(e) => {
                    tracing::warn!(pod = %scope.name, socket = what, error = %e, "cannot keep this socket for a successor")
                }
            }
        }
        if let Some((server, _)) = &dns {
            server.keep_sockets(|what, kind, addr, fd| {
                held.keep(&pod_socket(&uid, &what), kind, Some(addr), fd)
            });
        }
        held.keep_pod(PodOffer {
            uid: uid.clone(),
            name: scope.info.name.clone(),
            namespace: scope.info.namespace.clone(),
            service_account: scope.info.service_account.clone(),
        });
        // Started once nothing can fail any more (a failed add leaves no task behind). It answers
        // from readiness on (before, the store may not hold the mesh names yet; after an
        // upgrade, the predecessor answers meanwhile) and stops with the pod's listeners.
        let dns = dns.map(|(server, ctx)| {
            let (ready, stop) = (self.node.readiness.clone(), drain.signal());
            tokio::spawn(async move {
                tokio::select! {
                    () = ready.wait() => server.run(ctx, stop).await,
                    () = stop.draining() => {}
                }
            })
        });
        let (gate, signal) = (self.node.readiness.clone(), drain.signal());
        let listeners = tokio::spawn(crate::proxy::serve_when_ready(serve, gate, signal));
        if adopted {
            tracing::info!(pod = %scope.name, %uid, service_account = %scope.info.service_account, "pod adopted from the predecessor: listening on its sockets");
        } else {
            tracing::info!(pod = %scope.name, %uid, service_account = %scope.info.service_account, "pod added: listening in its network namespace");
        }
        self.view.started.fetch_add(1, Relaxed);
        self.view.lock().insert(
            uid.clone(),
            PodEntry {
                uid: uid.clone(),
                name: scope.info.name.clone(),
                namespace: scope.info.namespace.clone(),
                service_account: scope.info.service_account.clone(),
                state: "listening",
                added: SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            },
        );
        self.pods.insert(
            uid,
            PodProxy {
                drain,
                listeners,
                dns,
                identity,
            },
        );
        self.sync_certificates();
        Ok(())
    }

    /// The certificates held are exactly those of the pods served (one per service account):
    /// a new identity is fetched now, one no pod needs any more is forgotten.
    fn sync_certificates(&self) {
        let mut ids: Vec<SpiffeId> = self.pods.values().map(|p| p.identity.clone()).collect();
        ids.sort();
        ids.dedup();
        self.with_certificates(|secrets| secrets.retain(&ids));
    }

    /// Runs `f` on the certificate manager inside the control runtime, where the certificates'
    /// fetch-and-renew workers it starts must run.
    fn with_certificates<R>(&self, f: impl FnOnce(&Arc<crate::identity::SecretManager>) -> R) -> R {
        let _on = self
            .node
            .control
            .as_ref()
            .map(tokio::runtime::Handle::enter);
        f(&self.node.base.secrets)
    }

    /// A pod listener on `port`, dual stack where the namespace has IPv6.
    async fn bind_one(
        &self,
        netns: &PodNetns,
        port: u16,
    ) -> Result<std::net::TcpListener, NetnsError> {
        let reuse = self.listeners.port_reuse;
        let v6 = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), port);
        match netns.listen(v6, reuse).await {
            Ok(s) => Ok(s),
            Err(e) => {
                tracing::debug!(pod = netns.pod(), port, error = %e, "no dual-stack listener; binding IPv4 only");
                let v4 = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
                netns.listen(v4, reuse).await
            }
        }
    }

    /// Stops serving `uid`: its listeners (and DNS proxy) close at once; the returned task lets its
    /// connections finish until the deadline, closes the rest, then forgets the pod (dropping its
    /// namespace). `dns_grace`: the DNS proxy answers the queries it received first.
    fn remove(
        &mut self,
        uid: &str,
        why: &'static str,
        dns_grace: bool,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        let pod = self.pods.remove(uid)?;
        self.node.held.forget_pod(uid);
        // Its listeners and DNS proxy stop receiving. The node draining (an upgrade's successor
        // answers next), the DNS proxy answers what it received; a pod deleted, it stops now.
        pod.drain.start();
        if !dns_grace {
            if let Some(dns) = &pod.dns {
                dns.abort();
            }
        }
        // Connections it accepted that have not yet made their TLS handshake (waiting for a
        // pooled tunnel, say) still present its certificate: it is kept until the pod drained.
        let cert = self.with_certificates(|secrets| secrets.hold(&pod.identity));
        self.sync_certificates();
        if let Some(e) = self.view.lock().get_mut(uid) {
            e.state = "draining";
        }
        tracing::info!(%uid, reason = why, deadline = ?self.node.deadline, "pod removed: its listeners are closed; its connections may finish until the deadline");
        let (view, uid, deadline) = (self.view.clone(), uid.to_owned(), self.node.deadline);
        // The node's drain waits for this one too.
        let hold = self.node.node_drain.hold();
        Some(async move {
            let report = pod.drain.drain(deadline, FORCE_GRACE).await;
            drop(cert);
            pod.listeners.abort();
            // The DNS proxy ends by itself once what it received is answered (bounded).
            if let Some(dns) = pod.dns {
                let abort = dns.abort_handle();
                let grace = crate::dns::server::STOP_GRACE + Duration::from_secs(1);
                if tokio::time::timeout(grace, dns).await.is_err() {
                    abort.abort();
                }
            }
            // Unless the pod was added again meanwhile (its new entry is listening).
            let mut pods = view.lock();
            if pods.get(&uid).is_some_and(|e| e.state == "draining") {
                pods.remove(&uid);
            }
            drop(pods);
            view.stopped.fetch_add(1, Relaxed);
            tracing::info!(%uid, elapsed_ms = report.elapsed.as_millis() as u64, closed_at_deadline = report.forced, "pod drained");
            drop(hold);
        })
    }

    fn del(&mut self, uid: &str, why: &'static str) {
        if let Some(task) = self.remove(uid, why, false) {
            tokio::spawn(task);
        }
    }
}

impl PodHandler for PodManager {
    fn reconnected(&mut self) {
        self.replay = Replay::default();
    }

    async fn handle(&mut self, req: Request) -> Result<(), String> {
        match req {
            Request::Add { uid, info, netns } => self.add(uid, info, netns).await,
            Request::Keep { uid } => {
                self.replay.saw(&uid);
                if self.pods.contains_key(&uid) {
                    Ok(())
                } else {
                    Err(format!(
                        "keep for {uid}, which is not served; expected an add for a pod l4mesh does not hold"
                    ))
                }
            }
            Request::Del { uid } => {
                if self.pods.contains_key(&uid) {
                    self.del(&uid, "the CNI agent removed it");
                } else {
                    tracing::debug!(%uid, "del of a pod not served: nothing to do");
                }
                Ok(())
            }
            Request::SnapshotSent => {
                for uid in self.replay.finish(self.pods.keys()) {
                    self.del(&uid, "not in the CNI agent's replay");
                }
                if let Some(ready) = self.first_snapshot.take() {
                    ready.done();
                }
                Ok(())
            }
        }
    }
}
