//! Upgrades that drop nothing: a running l4mesh hands its listening sockets to its successor over
//! a unix socket (`--handoff-socket`, `L4MESH_HANDOFF_SOCKET`), so that the listen queues are never
//! closed: a connection that reached one is accepted by one process or the other.
//!
//! The exchange, one JSON message per `SOCK_SEQPACKET` packet ([`crate::seqpacket`]):
//! 1. the successor connects and says `hello` (hand-off protocol and version);
//! 2. the running one answers `offer` (how many pods and sockets follow), then one `pod` packet
//!    per pod (shared mode) and one `socket` packet per listening socket, each carrying the socket
//!    as an `SCM_RIGHTS` descriptor (the hand-off socket itself among them); or `refused` with the
//!    reason (another protocol). One successor at a time: a second one waits in the backlog for
//!    the first's outcome, and gives up after 10 s;
//! 3. the successor builds itself on those sockets (bound addresses are checked against its own
//!    configuration), waits until it is ready (the same readiness as its listeners), and says
//!    `ready`;
//! 4. the old one stops accepting everywhere (its drain, with `UPGRADE_DRAIN_DEADLINE`), closes its
//!    copies of the sockets, answers `released`, and then reports `status` (connections still
//!    open, its metrics) every [`STATUS_EVERY`] until it exits.
//!
//! A successor that fails, closes or starts draining before `ready` changes nothing for the
//! running one (its sockets never stopped accepting). A predecessor that goes away without a
//! word (a crash, or its own drain) leaves the successor with the only copies: it serves alone.
//! A predecessor that serves on says `refused` before closing (it gave up waiting, or the
//! exchange broke), and the successor exits, draining what it accepted if it was ready.
//!
//! Split: [`wire`] (the messages, pure), this file (both ends of the exchange and the sockets a
//! process holds).

pub mod metrics_text;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::seqpacket::{Conn, Server};
use wire::{Kind, Message, PodOffer, SocketInfo, PROTOCOL};

/// How long the running l4mesh waits for a successor's `hello`, and a successor for the `offer`
/// and the sockets: a live peer answers at once.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the running l4mesh waits for a successor to become ready (its first xDS responses,
/// certificates) before it gives up and refuses it.
pub const READY_TIMEOUT: Duration = Duration::from_secs(300);
/// How often a draining predecessor reports what it still holds.
pub const STATUS_EVERY: Duration = Duration::from_secs(2);
/// The most sockets one hand-off carries (a dedicated configuration has about ten; shared mode
/// six per pod).
const MAX_SOCKETS: usize = 65536;
/// The largest metrics exposition of a predecessor that is relayed.
const MAX_METRICS: usize = 16 << 20;

#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("hand-off socket {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the process at {path} runs as user {uid}, not as this l4mesh's user {own} or root: it is not an l4mesh to take sockets from")]
    Stranger { path: PathBuf, uid: u32, own: u32 },
    #[error("the running l4mesh at {path} refused the hand-off: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("the running l4mesh at {path} broke the hand-off: expected {expected}, got {got}")]
    Protocol {
        path: PathBuf,
        expected: &'static str,
        got: String,
    },
    #[error("the running l4mesh (pid {pid}) is in another network namespace ({theirs}, this one {ours}): a dedicated l4mesh's listeners only serve the namespace they were made in; run the new one beside the old one (same pod, or hostNetwork)")]
    OtherNamespace {
        pid: u32,
        theirs: String,
        ours: String,
    },
    #[error("the running l4mesh (pid {pid}) has its {name} socket on {offered}, this one is configured for {configured}: start the new l4mesh with the same listener addresses")]
    Mismatch {
        pid: u32,
        name: String,
        offered: String,
        configured: SocketAddr,
    },
}

/// `e` and its causes, `: `-separated (for a log line or a message kept as text).
pub fn with_causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
}

/// The longest text field of a pod handed over (Kubernetes names are at most 253 bytes).
const MAX_FIELD: usize = 1024;

/// A listening socket this process holds, kept (a duplicate) to hand to a successor.
struct HeldSocket {
    info: SocketInfo,
    fd: OwnedFd,
}

#[derive(Default)]
struct HeldInner {
    sockets: Vec<HeldSocket>,
    pods: std::collections::BTreeMap<String, PodOffer>,
}

/// What this process would hand to a successor now: duplicates of its listening sockets (and,
/// in shared mode, of each pod's sockets and namespace, added and forgotten as pods come and
/// go). Clones share one set; a set that is not keeping ignores everything (no hand-off
/// configured, so that a closed listener really closes).
#[derive(Clone, Default)]
pub struct Held {
    inner: Option<Arc<Mutex<HeldInner>>>,
}

impl Held {
    fn keeping() -> Self {
        Self {
            inner: Some(Arc::default()),
        }
    }

    fn lock(&self) -> Option<std::sync::MutexGuard<'_, HeldInner>> {
        self.inner
            .as_ref()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Keeps a duplicate of `fd` for a successor, under `name`.
    pub fn keep(&self, name: &str, kind: Kind, addr: Option<SocketAddr>, fd: BorrowedFd<'_>) {
        let Some(mut inner) = self.lock() else {
            return;
        };
        match fd.try_clone_to_owned() {
            Ok(fd) => {
                inner.sockets.retain(|h| h.info.name != name);
                inner.sockets.push(HeldSocket {
                    info: SocketInfo {
                        name: name.into(),
                        kind,
                        addr,
                    },
                    fd,
                });
            }
            Err(e) => {
                tracing::warn!(socket = name, error = %e, "cannot keep this socket for a successor: an upgrade will not hand it over")
            }
        }
    }

    /// Records a pod served (its sockets are kept under [`wire::pod_socket`] names).
    pub fn keep_pod(&self, pod: PodOffer) {
        if let Some(mut inner) = self.lock() {
            inner.pods.insert(pod.uid.clone(), pod);
        }
    }

    /// Forgets a pod no longer served, closing the copies of its sockets and namespace.
    pub fn forget_pod(&self, uid: &str) {
        if let Some(mut inner) = self.lock() {
            inner.pods.remove(uid);
            let prefix = wire::pod_socket(uid, "");
            inner.sockets.retain(|h| !h.info.name.starts_with(&prefix));
        }
    }

    /// What an offer carries now: every socket (duplicated again, so that the set may change
    /// while they are sent) and the pods.
    fn offer(&self) -> (Vec<HeldSocket>, Vec<PodOffer>) {
        let Some(inner) = self.lock() else {
            return (Vec::new(), Vec::new());
        };
        let sockets = inner
            .sockets
            .iter()
            .filter_map(|h| {
                Some(HeldSocket {
                    info: h.info.clone(),
                    fd: h.fd.try_clone().ok()?,
                })
            })
            .collect();
        (sockets, inner.pods.values().cloned().collect())
    }

    /// Closes every copy (the hand-off completed, or a drain started) and keeps nothing more.
    fn close(&self) {
        if let Some(mut inner) = self.lock() {
            *inner = HeldInner::default();
        }
    }
}

/// A pod received from the predecessor (shared mode): its identity, namespace and sockets.
pub struct InheritedPod {
    pub pod: PodOffer,
    pub netns: OwnedFd,
    sockets: HashMap<String, (SocketInfo, OwnedFd)>,
}

impl InheritedPod {
    /// The pod's socket `what` (`outbound`, `dns-udp 127.0.0.1:15053`, ...), if it was handed
    /// over with the kind expected and a port `port` (0: any).
    pub fn take(&mut self, what: &str, kind: Kind, port: u16) -> Option<OwnedFd> {
        let (info, fd) = self.sockets.remove(what)?;
        let ok = info.kind == kind && info.addr.is_some_and(|a| port == 0 || a.port() == port);
        if !ok {
            tracing::info!(pod = %self.pod.name, socket = what, offered = %info.describe(), port, "the predecessor's pod socket does not match this configuration: bound afresh");
        }
        ok.then_some(fd)
    }
}

/// Where this process's listening sockets come from (a predecessor's hand-off, else a fresh bind)
/// and which ones it will hand on. Filled while the process binds; then moved to [`serve`].
#[derive(Default)]
pub struct Sockets {
    /// Offered by the predecessor and not yet taken, by name.
    inherited: HashMap<String, (SocketInfo, OwnedFd)>,
    /// Shared mode: the predecessor's pods.
    pods: Vec<PodOffer>,
    predecessor_pid: u32,
    held: Held,
}

impl Sockets {
    /// Sockets that are bound fresh and not kept (no hand-off configured).
    pub fn none() -> Self {
        Self::default()
    }

    /// Bound fresh, kept for a successor.
    pub fn keeping() -> Self {
        Self {
            held: Held::keeping(),
            ..Self::default()
        }
    }

    /// The set kept for a successor (shared with the pod manager).
    pub fn held(&self) -> Held {
        self.held.clone()
    }

    /// The predecessor's socket called `name`, if it offered one, checked against the address
    /// this process is configured for (port 0: any port on that IP).
    pub fn take(
        &mut self,
        name: &str,
        kind: Kind,
        configured: SocketAddr,
    ) -> Result<Option<OwnedFd>, HandoffError> {
        let Some((info, fd)) = self.inherited.remove(name) else {
            return Ok(None);
        };
        let matches = info.kind == kind
            && info.addr.is_some_and(|a| {
                a == configured || (configured.port() == 0 && a.ip() == configured.ip())
            });
        if !matches {
            return Err(HandoffError::Mismatch {
                pid: self.predecessor_pid,
                name: name.into(),
                offered: info.describe(),
                configured,
            });
        }
        Ok(Some(fd))
    }

    /// Records a listening socket for a successor (a duplicate descriptor: the process's own
    /// listener is closed by its drain, this copy when the hand-off completes or a drain starts).
    pub fn keep(&mut self, name: &str, kind: Kind, addr: Option<SocketAddr>, fd: BorrowedFd<'_>) {
        self.held.keep(name, kind, addr, fd);
    }

    /// The predecessor's pods (shared mode), each with its namespace and sockets; a pod whose
    /// namespace was not handed over is left out (the CNI agent's replay adds it again).
    pub fn take_pods(&mut self) -> Vec<InheritedPod> {
        let mut out = Vec::new();
        for pod in std::mem::take(&mut self.pods) {
            let prefix = wire::pod_socket(&pod.uid, "");
            let names: Vec<String> = self
                .inherited
                .keys()
                .filter(|n| n.starts_with(&prefix))
                .cloned()
                .collect();
            let mut sockets = HashMap::new();
            for n in names {
                if let Some(v) = self.inherited.remove(&n) {
                    sockets.insert(n[prefix.len()..].to_string(), v);
                }
            }
            match sockets.remove("netns") {
                Some((info, netns)) if info.kind == Kind::Netns => out.push(InheritedPod {
                    pod,
                    netns,
                    sockets,
                }),
                _ => {
                    tracing::warn!(pod = %pod.name, uid = %pod.uid, "the predecessor handed over a pod without its namespace; left to the CNI agent's replay")
                }
            }
        }
        out
    }

    /// The inherited hand-off socket, if the predecessor offered it.
    fn take_handoff(&mut self) -> Option<OwnedFd> {
        self.inherited
            .remove(wire::HANDOFF_SOCKET)
            .filter(|(info, _)| info.kind == Kind::Unix)
            .map(|(_, fd)| fd)
    }

    /// Offered sockets this process did not take (its configuration no longer has them): closed
    /// here, and named in the log.
    fn drop_untaken(&mut self) {
        for (name, (info, _)) in self.inherited.drain() {
            if name != wire::HANDOFF_SOCKET {
                tracing::info!(socket = %name, addr = %info.describe(), "the predecessor's socket is not in this configuration: closed when the predecessor releases it");
            }
        }
    }
}

/// What a successor knows of the process it replaces, for its metrics and admin.
#[derive(Debug, Default)]
pub struct PredecessorState {
    pub pid: u32,
    pub version: String,
    /// Connections it still holds (0 once gone).
    open: AtomicU64,
    /// Released: it stopped accepting and drains.
    released: AtomicBool,
    /// Gone: its hand-off connection closed (it exited).
    gone: AtomicBool,
    /// Its last metrics exposition, relayed with its own label: [Prometheus text 0.0.4,
    /// OpenMetrics text].
    metrics: Mutex<[Option<Arc<str>>; 2]>,
}

impl PredecessorState {
    pub fn open_connections(&self) -> u64 {
        self.open.load(Relaxed)
    }

    /// Whether it still runs (draining what it holds).
    pub fn draining(&self) -> bool {
        self.released.load(Relaxed) && !self.gone.load(Relaxed)
    }

    /// Its last metrics in the format asked for, while it still runs.
    pub fn metrics(&self, openmetrics: bool) -> Option<Arc<str>> {
        if self.gone.load(Relaxed) {
            return None;
        }
        self.metrics.lock().unwrap_or_else(PoisonError::into_inner)[usize::from(openmetrics)]
            .clone()
    }
}

/// A successor's open exchange with its predecessor, between receiving the sockets and ready.
pub struct Takeover {
    path: PathBuf,
    conn: Conn,
    pub state: Arc<PredecessorState>,
}

/// What this l4mesh tells a draining predecessor or a successor about itself.
fn hello() -> Message {
    Message::Hello {
        protocol: PROTOCOL,
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
    }
}

/// Asks a running l4mesh at `path` for its sockets. `Ok(None)`: nothing runs there (no file, or
/// a file no process listens on), so this process binds its own. `shared`: this process serves
/// pods (shared mode), whose sockets are in the pods' namespaces, so a predecessor in another
/// namespace (another Kubernetes pod) is fine; a dedicated one refuses it.
pub async fn take_over(
    path: &Path,
    shared: bool,
) -> Result<Option<(Sockets, Takeover)>, HandoffError> {
    let sock_err = |source| HandoffError::Socket {
        path: path.into(),
        source,
    };
    let conn = match Conn::connect(path).await {
        Ok(c) => c,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(sock_err(e)),
    };
    // Sockets (and pods' namespaces) are taken only from a process as privileged as this one.
    let uid = conn.peer_uid().map_err(sock_err)?;
    if !trusted_uid(uid) {
        return Err(HandoffError::Stranger {
            path: path.into(),
            uid,
            own: rustix::process::geteuid().as_raw(),
        });
    }
    let proto_err = |expected, got: String| HandoffError::Protocol {
        path: path.into(),
        expected,
        got,
    };
    send(&conn, &hello(), &[]).await.map_err(sock_err)?;
    let (offer, _) = recv_within(&conn, EXCHANGE_TIMEOUT)
        .await
        .map_err(sock_err)?;
    let (pid, version, offered, pods, netns) = match offer {
        Some(Message::Offer {
            protocol,
            version,
            pid,
            sockets,
            pods,
            netns,
        }) if protocol == PROTOCOL => (pid, version, sockets, pods, netns),
        Some(Message::Offer {
            protocol, version, ..
        }) => {
            return Err(proto_err(
                "hand-off protocol 1",
                format!("protocol {protocol} (l4mesh {version})"),
            ))
        }
        Some(Message::Refused { reason }) => {
            return Err(HandoffError::Refused {
                path: path.into(),
                reason,
            })
        }
        other => return Err(proto_err("an offer", wire::describe(other.as_ref()))),
    };
    if offered > MAX_SOCKETS || pods > MAX_SOCKETS {
        return Err(proto_err(
            "at most 65536 sockets and pods",
            format!("{offered} sockets and {pods} pods"),
        ));
    }
    let mut sockets = Sockets {
        predecessor_pid: pid,
        ..Sockets::keeping()
    };
    let refused = |reason| HandoffError::Refused {
        path: path.into(),
        reason,
    };
    for _ in 0..pods {
        match recv_within(&conn, EXCHANGE_TIMEOUT)
            .await
            .map_err(sock_err)?
        {
            (Some(Message::Pod(pod)), fds) => {
                if !fds.is_empty() {
                    return Err(proto_err(
                        "a pod without descriptors",
                        format!("a pod with {}", fds.len()),
                    ));
                }
                let longest = [&pod.uid, &pod.name, &pod.namespace, &pod.service_account]
                    .iter()
                    .map(|f| f.len())
                    .max()
                    .unwrap_or(0);
                if longest > MAX_FIELD {
                    return Err(proto_err(
                        "pod fields of at most 1024 bytes",
                        format!("{longest} bytes"),
                    ));
                }
                sockets.pods.push(pod)
            }
            (Some(Message::Refused { reason }), _) => return Err(refused(reason)),
            (other, _) => return Err(proto_err("a pod", wire::describe(other.as_ref()))),
        }
    }
    for _ in 0..offered {
        let (msg, mut fds) = recv_within(&conn, EXCHANGE_TIMEOUT)
            .await
            .map_err(sock_err)?;
        let info = match msg {
            Some(Message::Socket(info)) => info,
            Some(Message::Refused { reason }) => return Err(refused(reason)),
            other => return Err(proto_err("a socket", wire::describe(other.as_ref()))),
        };
        let count = fds.len();
        let (Some(fd), 1) = (fds.pop(), count) else {
            return Err(proto_err(
                "one descriptor with the socket",
                format!("{count} descriptors with {:?}", info.name),
            ));
        };
        if sockets.inherited.contains_key(&info.name) {
            return Err(proto_err(
                "each socket once",
                format!("{:?} twice", info.name),
            ));
        }
        wire::check_socket(&fd, &info)
            .map_err(|got| proto_err("a listening socket as offered", got))?;
        sockets.inherited.insert(info.name.clone(), (info, fd));
    }
    // Another pod: its node-level sockets are in its namespace, where this process's clients
    // (probes, scrapers) do not look; they are closed here and bound afresh.
    let ours = wire::own_netns();
    if netns.is_some() && netns != ours {
        if !shared {
            // Closing the exchange before ready: the running one serves on.
            return Err(HandoffError::OtherNamespace {
                pid,
                theirs: netns.unwrap_or_default(),
                ours: ours.unwrap_or_default(),
            });
        }
        sockets.inherited.retain(|name, _| wire::travels(name));
        tracing::info!(predecessor = pid, "upgrade: the running l4mesh is in another network namespace; only the pods' sockets and the hand-off socket are taken");
    }
    tracing::info!(predecessor = pid, %version, sockets = sockets.inherited.len(), pods = sockets.pods.len(), "upgrade: received the running l4mesh's listening sockets; taking over once ready");
    Ok(Some((
        sockets,
        Takeover {
            path: path.into(),
            conn,
            state: Arc::new(PredecessorState {
                pid,
                version,
                ..PredecessorState::default()
            }),
        },
    )))
}

/// How a successor's take-over ended.
pub enum TakeoverEnd {
    /// The predecessor stopped accepting: this process serves alone.
    Released,
    /// The predecessor went away without a word (it crashed, or started draining): this process
    /// holds the only copies of the sockets and serves alone.
    PredecessorGone,
    /// This process started draining before it was ready: it never said ready, and the
    /// predecessor serves on.
    Abandoned,
}

impl Takeover {
    /// Waits until `ready` resolves `true` (this process accepts; `false`: it drains instead),
    /// then tells the predecessor to let go, and keeps following its reports in `state` until
    /// it exits. An error (the predecessor refused, or broke the exchange) means this process
    /// must not serve.
    pub async fn complete(
        self,
        ready: impl std::future::Future<Output = bool>,
    ) -> Result<(TakeoverEnd, Follow), HandoffError> {
        let Takeover { path, conn, state } = self;
        let pid = state.pid;
        let sock_err = |source| HandoffError::Socket {
            path: path.clone(),
            source,
        };
        tokio::select! {
            ready = ready => if !ready {
                return Ok((TakeoverEnd::Abandoned, Follow::none(state)));
            },
            msg = conn.recv() => {
                return match msg.map_err(sock_err)?.map(|p| wire::decode(&p.bytes)) {
                    None => Ok((TakeoverEnd::PredecessorGone, Follow::none(state))),
                    Some(Ok(Message::Refused { reason })) => Err(HandoffError::Refused { path, reason }),
                    Some(other) => Err(HandoffError::Protocol {
                        path,
                        expected: "nothing before ready",
                        got: wire::describe(other.ok().as_ref()),
                    }),
                };
            }
        }
        if send(&conn, &Message::Ready, &[]).await.is_err() {
            return Ok((TakeoverEnd::PredecessorGone, Follow::none(state)));
        }
        match recv_within(&conn, EXCHANGE_TIMEOUT).await {
            Ok((Some(Message::Released { open_connections }), _)) => {
                state.open.store(open_connections, Relaxed);
                state.released.store(true, Relaxed);
                tracing::info!(
                    predecessor = pid,
                    open_connections,
                    "upgrade: the predecessor stopped accepting and drains; this l4mesh serves"
                );
                Ok((
                    TakeoverEnd::Released,
                    Follow {
                        conn: Some(conn),
                        state,
                    },
                ))
            }
            Ok((None, _)) | Err(_) => Ok((TakeoverEnd::PredecessorGone, Follow::none(state))),
            Ok((Some(Message::Refused { reason }), _)) => {
                Err(HandoffError::Refused { path, reason })
            }
            Ok((other, _)) => Err(HandoffError::Protocol {
                path,
                expected: "released",
                got: wire::describe(other.as_ref()),
            }),
        }
    }
}

/// A successor's view of its draining predecessor: its reports, until it exits.
pub struct Follow {
    conn: Option<Conn>,
    state: Arc<PredecessorState>,
}

impl Follow {
    fn none(state: Arc<PredecessorState>) -> Self {
        state.gone.store(true, Relaxed);
        Self { conn: None, state }
    }

    /// Reads the predecessor's reports into its state until it exits (its socket closes).
    pub async fn run(self) {
        let Follow { conn, state } = self;
        if let Some(conn) = conn {
            // Metrics arrive in pieces; each format's text is kept once whole. An exposition over
            // the limit is dropped to its last piece.
            let mut partial = [String::new(), String::new()];
            let mut overflowed = [false, false];
            loop {
                let msg = match conn.recv().await {
                    Ok(Some(p)) => wire::decode(&p.bytes),
                    Ok(None) => {
                        tracing::info!(predecessor = state.pid, "upgrade: the predecessor exited");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(predecessor = state.pid, error = %e, "upgrade: lost the predecessor's reports");
                        break;
                    }
                };
                match msg {
                    Ok(Message::Status { open_connections }) => {
                        state.open.store(open_connections, Relaxed);
                    }
                    Ok(Message::Metrics {
                        openmetrics,
                        text,
                        more,
                    }) => {
                        let i = usize::from(openmetrics);
                        let buf = &mut partial[i];
                        if overflowed[i] || buf.len() + text.len() > MAX_METRICS {
                            if !overflowed[i] {
                                tracing::warn!(predecessor = state.pid, limit = MAX_METRICS, "upgrade: the predecessor's metrics are larger than relayed; dropped");
                            }
                            buf.clear();
                            overflowed[i] = more;
                            continue;
                        }
                        buf.push_str(&text);
                        if !more {
                            let whole: Arc<str> = Arc::from(std::mem::take(buf));
                            state.metrics.lock().unwrap_or_else(PoisonError::into_inner)[i] =
                                Some(whole);
                        }
                    }
                    other => {
                        tracing::warn!(predecessor = state.pid, got = %wire::describe(other.ok().as_ref()), "upgrade: unexpected report from the predecessor; no longer following it");
                        break;
                    }
                }
            }
        }
        state.gone.store(true, Relaxed);
        state.open.store(0, Relaxed);
    }
}

/// The hand-off listener of a process: the predecessor's (handed over with the rest), else one
/// bound at `path` (replacing a file no process listens on).
pub fn listen(path: &Path, sockets: &mut Sockets) -> Result<Server, HandoffError> {
    let sock_err = |source| HandoffError::Socket {
        path: path.into(),
        source,
    };
    let server = match sockets.take_handoff() {
        Some(fd) => Server::from_fd(fd).map_err(sock_err)?,
        // Whoever connects gets every listener: only this user may (the peer's uid is checked
        // too, whatever the file's mode).
        None => Server::bind_with_mode(path, 0o600).map_err(sock_err)?,
    };
    sockets.drop_untaken();
    sockets.keep(wire::HANDOFF_SOCKET, Kind::Unix, None, server.as_fd());
    Ok(server)
}

/// What the running process does when a successor is ready to take over.
pub struct Handover {
    /// Starts this process's drain (every listener stops accepting).
    pub drain: crate::drain::Drain,
    /// Told that the drain is an upgrade (its deadline is `UPGRADE_DRAIN_DEADLINE`), and when
    /// the successor took over, so that servers not under the drain stop accepting too.
    pub released: Released,
    /// This process's metrics exposition (OpenMetrics text when `true`), relayed to the
    /// successor while it drains.
    pub metrics: Box<dyn Fn(bool) -> Option<String> + Send + Sync>,
}

/// Set once a successor took over: the process drains as an upgrade, and its servers that
/// answer during a drain (readiness, metrics, admin, DNS) stop accepting, their ports now the
/// successor's.
#[derive(Clone)]
pub struct Released {
    tx: Arc<tokio::sync::watch::Sender<Option<u32>>>,
}

impl Default for Released {
    fn default() -> Self {
        Self {
            tx: Arc::new(tokio::sync::watch::channel(None).0),
        }
    }
}

impl Released {
    /// The drain deadline: `upgrade` once a successor took over, else `normal`.
    pub fn deadline(&self, normal: Duration, upgrade: Duration) -> Duration {
        match self.successor() {
            Some(_) => upgrade,
            None => normal,
        }
    }

    /// The successor's pid, once it took over.
    pub fn successor(&self) -> Option<u32> {
        *self.tx.borrow()
    }

    fn set(&self, pid: u32) {
        self.tx.send_replace(Some(pid));
    }

    /// Resolves once a successor took over.
    pub async fn wait(&self) {
        let mut rx = self.tx.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }

    /// Runs `serve` until a successor takes over (then its listener is dropped: closed here,
    /// accepting in the successor).
    pub async fn until(&self, serve: impl std::future::Future<Output = ()>) {
        tokio::select! {
            () = serve => {}
            () = self.wait() => {}
        }
    }
}

/// When a server on a handed-over port serves (readiness, metrics, admin, DNS: the ports a
/// scraper, a probe or a client expects one answer from): from the take-over (at once when there
/// is no predecessor) until a successor takes over. The data path is not under it: its listeners
/// accept from readiness on, beside the predecessor's, until the predecessor lets go.
#[derive(Clone)]
pub struct Tenure {
    taken: tokio::sync::watch::Receiver<bool>,
    released: Released,
}

impl Tenure {
    /// `taken`: true once this process holds the ports alone (a failed take-over drops the
    /// sender: the server never starts).
    pub fn new(taken: tokio::sync::watch::Receiver<bool>, released: Released) -> Self {
        Self { taken, released }
    }

    /// Resolves `true` once this process holds its ports alone, `false` if it never will (its
    /// take-over failed).
    pub async fn taken(&self) -> bool {
        self.taken.clone().wait_for(|t| *t).await.is_ok()
    }

    /// A drain signal that starts when a successor takes over: for a server that finishes what
    /// it received rather than being dropped (the DNS proxy).
    pub fn release_signal(&self) -> crate::drain::Signal {
        let drain = crate::drain::Drain::new();
        let signal = drain.signal();
        let released = self.released.clone();
        tokio::spawn(async move {
            released.wait().await;
            drain.start();
        });
        signal
    }

    /// Runs `serve` for this process's tenure of its ports.
    pub async fn serve(mut self, serve: impl std::future::Future<Output = ()>) {
        if self.taken.wait_for(|t| *t).await.is_err() {
            return;
        }
        self.released.until(serve).await
    }
}

/// Serves successors on `server` until one takes over (then reports to it until this process
/// exits) or a drain starts (then the kept sockets are closed, so that closed listeners refuse).
pub async fn serve(server: Server, sockets: Sockets, handover: Handover) {
    let signal = handover.drain.signal();
    let held = sockets.held;
    let conn = loop {
        let conn = tokio::select! {
            biased;
            () = signal.draining() => {
                held.close();
                return;
            }
            c = server.accept() => c,
        };
        let conn = match conn.map(|c| {
            let uid = c.peer_uid();
            (c, uid)
        }) {
            Ok((_, Ok(uid))) if !trusted_uid(uid) => {
                tracing::warn!(uid, "upgrade: a process of another user connected to the hand-off socket; closed without an offer");
                continue;
            }
            Ok((c, Ok(_))) => c,
            Ok((_, Err(e))) | Err(e) => {
                tracing::warn!(error = %e, "upgrade: accepting on the hand-off socket failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let outcome = tokio::select! {
            biased;
            // This process drains (SIGTERM) during the exchange: it lets go without a word, and
            // the successor, holding the sockets too, serves alone once ready.
            () = signal.draining() => {
                held.close();
                return;
            }
            r = offer(&conn, &held) => r,
        };
        match outcome {
            Ok(pid) => break (conn, pid),
            Err(reason) => {
                tracing::warn!("upgrade: no hand-off, serving on as before: {reason}");
                // Said before closing, so that the successor exits instead of taking the
                // silence for this process's end (it may be gone already: then nothing is said).
                let refused = Message::Refused { reason };
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), send(&conn, &refused, &[])).await;
            }
        }
    };
    let (conn, pid) = conn;
    // Order matters: the deadline is chosen from `released` when the drain starts.
    handover.released.set(pid);
    handover.drain.start();
    held.close();
    drop(server);
    let open = handover.drain.live() as u64;
    tracing::info!(successor = pid, open_connections = open, "upgrade: the successor is ready and accepts; this l4mesh stopped accepting and drains what it holds");
    if send(
        &conn,
        &Message::Released {
            open_connections: open,
        },
        &[],
    )
    .await
    .is_err()
    {
        return;
    }
    loop {
        let status = Message::Status {
            open_connections: handover.drain.live() as u64,
        };
        let mut report = vec![status];
        for om in [false, true] {
            if let Some(text) = (handover.metrics)(om) {
                report.extend(wire::metrics_pieces(&text, om));
            }
        }
        for msg in &report {
            if let Err(e) = send(&conn, msg, &[]).await {
                tracing::info!(successor = pid, error = %e, "upgrade: the successor no longer hears reports");
                return;
            }
        }
        tokio::time::sleep(STATUS_EVERY).await;
    }
}

/// One successor's exchange: its pid once it is ready to take over; else why not (it went
/// away, spoke another protocol, sent something else, or was not ready in time).
async fn offer(conn: &Conn, held: &Held) -> Result<u32, String> {
    let (pid, version) = match recv_within(conn, EXCHANGE_TIMEOUT).await {
        Ok((
            Some(Message::Hello {
                protocol,
                version,
                pid,
            }),
            _,
        )) => {
            if protocol != PROTOCOL {
                return Err(format!("this l4mesh ({}) speaks hand-off protocol {PROTOCOL}, the successor (l4mesh {version}, pid {pid}) protocol {protocol}: upgrade through a restart", env!("CARGO_PKG_VERSION")));
            }
            (pid, version)
        }
        Ok((other, _)) => {
            return Err(format!(
                "expected hello from a client of the hand-off socket, got {}",
                wire::describe(other.as_ref())
            ))
        }
        Err(e) => return Err(format!("waiting for a successor's hello: {e}")),
    };
    let (held, pods) = held.offer();
    tracing::info!(successor = pid, %version, sockets = held.len(), pods = pods.len(), "upgrade: handing the listening sockets to a successor; serving on until it is ready");
    let sending = async {
        send(
            conn,
            &Message::Offer {
                protocol: PROTOCOL,
                version: env!("CARGO_PKG_VERSION").into(),
                pid: std::process::id(),
                sockets: held.len(),
                pods: pods.len(),
                netns: wire::own_netns(),
            },
            &[],
        )
        .await?;
        for pod in pods {
            send(conn, &Message::Pod(pod), &[]).await?;
        }
        for h in &held {
            send(conn, &Message::Socket(h.info.clone()), &[h.fd.as_fd()]).await?;
        }
        Ok::<_, std::io::Error>(())
    };
    // A successor that stops reading (frozen, stopped) does not hold this process.
    match tokio::time::timeout(EXCHANGE_TIMEOUT, sending).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("sending the sockets to pid {pid}: {e}")),
        Err(_) => {
            return Err(format!(
                "pid {pid} did not take the sockets within {EXCHANGE_TIMEOUT:?}"
            ))
        }
    }
    match tokio::time::timeout(READY_TIMEOUT, conn.recv()).await {
        Err(_) => Err(format!("pid {pid} was not ready within {READY_TIMEOUT:?}")),
        Ok(Ok(None)) => Err(format!("pid {pid} went away before it was ready")),
        Ok(Ok(Some(p))) => match wire::decode(&p.bytes) {
            Ok(Message::Ready) => Ok(pid),
            other => Err(format!(
                "expected ready from pid {pid}, got {}",
                wire::describe(other.ok().as_ref())
            )),
        },
        Ok(Err(e)) => Err(format!("waiting for pid {pid} to be ready: {e}")),
    }
}

/// Whether a peer of the hand-off socket runs as this process's user, or as root.
fn trusted_uid(uid: u32) -> bool {
    uid == 0 || uid == rustix::process::geteuid().as_raw()
}

async fn send(conn: &Conn, msg: &Message, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
    conn.send(&wire::encode(msg), fds).await
}

/// The next message (`None`: the peer closed) with the descriptors it carried; an undecodable
/// packet is an error naming what was wrong.
async fn recv_within(
    conn: &Conn,
    limit: Duration,
) -> std::io::Result<(Option<Message>, Vec<OwnedFd>)> {
    let packet = tokio::time::timeout(limit, conn.recv())
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no message within {limit:?}"),
            )
        })??;
    let Some(p) = packet else {
        return Ok((None, Vec::new()));
    };
    if p.truncated || p.ctrunc {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "a hand-off packet larger than allowed, or with too many descriptors",
        ));
    }
    let msg = wire::decode(&p.bytes)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
    Ok((Some(msg), p.fds))
}

#[cfg(test)]
mod tests;
