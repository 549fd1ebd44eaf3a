//! Composition root: loads the mesh state, binds every listener (a port conflict fails startup),
//! wires the store into the proxy, and spawns the tasks. Only this module knows which runtime a task
//! runs on: in the binary ([`run`]) the data plane has a multi-thread runtime and the operators'
//! servers (admin, metrics), OTLP export, the xDS client and certificate renewal a current-thread
//! runtime on a thread of their own, so that a slow request, collector or control-plane update
//! never stalls traffic; in-process tests ([`start`]) run
//! everything on their runtime.
//!
//! Lifecycle: SIGTERM, SIGINT and `POST /quitquitquit` all lead to [`Running::drain`].

use std::future::Future;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{CaSource, Config, Source};
use crate::drain::{Drain, DrainReport};
use crate::handoff::{wire::Kind, Sockets};
use crate::identity::{CaClient, LocalCa, SecretManager};
use crate::localconfig::{self, LocalConfigError};
use crate::metrics::Metrics;
use crate::proxy::{Listener, ProxyCtx, Role};
use crate::readiness::Readiness;
use crate::socket::UpstreamOptions;
use crate::store::Store;
use crate::xds::{XdsClient, XdsMetrics};

#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("binding the {name} listener on {addr}: {error} (is another l4mesh or ztunnel already running? choose another address with --{flag})")]
    Bind {
        name: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        error: std::io::Error,
    },
    #[error("creating the local CA: {0}")]
    LocalCa(#[from] crate::identity::CaError),
    #[error("loading the local config: {0}")]
    LocalConfig(#[from] LocalConfigError),
    #[error("starting OpenTelemetry export: {0}")]
    Otel(#[from] crate::otel::OtelError),
    #[error(transparent)]
    OrigSrc(#[from] crate::socket::OrigSrcError),
    #[error(transparent)]
    AdminToken(#[from] crate::admin::AdminTokenError),
    #[error(transparent)]
    Handoff(#[from] crate::handoff::HandoffError),
    #[error("binding the DNS proxy on {addr}: {error} (is another DNS proxy running? choose another address with DNS_PROXY_ADDR)")]
    DnsBind {
        addr: SocketAddr,
        error: std::io::Error,
    },
}

/// A started l4mesh: its bound addresses and store, and the tasks serving them (aborted on drop).
pub struct Running {
    pub outbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub socks5: Option<SocketAddr>,
    pub hbone: SocketAddr,
    pub readiness_addr: Option<SocketAddr>,
    /// Where the Prometheus metrics are served, when enabled.
    pub metrics_addr: Option<SocketAddr>,
    pub store: Arc<Store>,
    pub readiness: Readiness,
    /// Present when the state comes from a control plane.
    pub xds_metrics: Option<Arc<XdsMetrics>>,
    /// The certificates of this node's identities.
    pub secrets: Arc<SecretManager>,
    /// What every connection handler shares (HBONE counters among it).
    pub proxy: Arc<ProxyCtx>,
    /// This l4mesh's metrics registry (what `/metrics` serves).
    pub metrics: Arc<Metrics>,
    /// The admin server's address (`None` when disabled).
    pub admin_addr: Option<SocketAddr>,
    /// Where the DNS proxy listens (UDP and TCP; empty when DNS capture is off).
    pub dns_addrs: Vec<SocketAddr>,
    /// The process being replaced, while this one takes over from it (`--handoff-socket`).
    pub predecessor: Option<Arc<crate::handoff::PredecessorState>>,
    drain: Drain,
    deadline: Duration,
    upgrade_deadline: Duration,
    /// Set when a successor took over (the drain is an upgrade's).
    released: crate::handoff::Released,
    /// Set when this process must not serve (its take-over was refused); the drain has started.
    failed: Arc<std::sync::OnceLock<String>>,
    tasks: Vec<JoinHandle<()>>,
}

/// After the drain deadline, how long the connections told to close get to do so (they stop at
/// their next wake-up; this only bounds a handler stuck elsewhere, e.g. in a connect).
const FORCE_GRACE: Duration = Duration::from_millis(500);

impl Running {
    /// Drains: readiness answers 503 at once, every listener closes (new connections are
    /// refused), HBONE peers get a GOAWAY, and open connections continue until they end or the
    /// deadline (`connection_termination_deadline`) passes; then the rest are closed. The same
    /// path as SIGTERM and `/quitquitquit`; resolves when it is over.
    pub async fn drain(&self) -> DrainReport {
        self.drain.drain(self.drain_deadline(), FORCE_GRACE).await
    }

    /// The deadline of this process's drain: an upgrade's (`UPGRADE_DRAIN_DEADLINE`) once a
    /// successor took over, else `connection_termination_deadline`.
    pub fn drain_deadline(&self) -> Duration {
        self.released.deadline(self.deadline, self.upgrade_deadline)
    }

    /// The successor's pid, once one took over this process's sockets.
    pub fn successor(&self) -> Option<u32> {
        self.released.successor()
    }

    /// Why this process must not serve (its take-over was refused), once known.
    pub fn failure(&self) -> Option<&str> {
        self.failed.get().map(String::as_str)
    }

    /// Resolves once a drain has been asked for (by `/quitquitquit` or [`Running::drain`]).
    pub async fn drain_requested(&self) {
        self.drain.signal().draining().await
    }

    /// Connections currently open (the ones a drain waits for).
    pub fn open_connections(&self) -> usize {
        self.drain.live()
    }
}

/// A server for operators (admin, metrics), built on the runtime it is to run on: its listener
/// was bound at startup (so that a port conflict fails startup) as a std socket, and is
/// registered with that runtime's reactor here.
pub type OperatorTask = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// An [`OperatorTask`] serving `listener` with `serve`.
pub fn operator_task<F, Fut>(
    name: &'static str,
    listener: std::net::TcpListener,
    tenure: crate::handoff::Tenure,
    serve: F,
) -> OperatorTask
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    Box::new(move || {
        Box::pin(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => tenure.serve(serve(l)).await,
                Err(e) => {
                    tracing::error!(server = name, error = %e, "cannot serve: the listener could not join the runtime")
                }
            }
        })
    })
}

/// A TCP listener for `name` (the flag's name without `-addr` names it in a hand-off): the
/// predecessor's in an upgrade, else bound now (`SO_REUSEADDR`, a backlog of 1024, as tokio);
/// non-blocking, and kept for a successor.
fn listen_tcp(
    sockets: &mut Sockets,
    name: &'static str,
    flag: &'static str,
    addr: SocketAddr,
) -> Result<(std::net::TcpListener, SocketAddr), AppError> {
    let err = |error| AppError::Bind {
        name,
        flag,
        addr,
        error,
    };
    let key = flag.trim_end_matches("-addr");
    let l = match sockets.take(key, Kind::Tcp, addr)? {
        Some(fd) => std::net::TcpListener::from(fd),
        None => bind_tcp(addr).map_err(err)?,
    };
    l.set_nonblocking(true).map_err(err)?;
    let local = l.local_addr().map_err(err)?;
    sockets.keep(key, Kind::Tcp, Some(local), l.as_fd());
    Ok((l, local))
}

fn bind_tcp(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// [`listen_tcp`], registered with the current runtime (the data path's and readiness's).
fn listen_tokio(
    sockets: &mut Sockets,
    name: &'static str,
    flag: &'static str,
    addr: SocketAddr,
) -> Result<(TcpListener, SocketAddr), AppError> {
    let (l, local) = listen_tcp(sockets, name, flag, addr)?;
    let l = TcpListener::from_std(l).map_err(|error| AppError::Bind {
        name,
        flag,
        addr,
        error,
    })?;
    Ok((l, local))
}

/// The DNS proxy's UDP socket and TCP listener on `addr` (the same port for both, also when the
/// configured one is 0): the predecessor's in an upgrade, else bound now; kept for a successor.
fn dns_pair(
    sockets: &mut Sockets,
    addr: SocketAddr,
) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let (ukey, tkey) = (format!("dns-udp {addr}"), format!("dns-tcp {addr}"));
    let take = |sockets: &mut Sockets, key: &str, kind| {
        sockets.take(key, kind, addr).map_err(std::io::Error::other)
    };
    let u = match take(sockets, &ukey, Kind::Udp)? {
        Some(fd) => std::net::UdpSocket::from(fd),
        None => std::net::UdpSocket::bind(addr)?,
    };
    let bound = u.local_addr()?;
    let t = match take(sockets, &tkey, Kind::Tcp)? {
        Some(fd) => std::net::TcpListener::from(fd),
        None => bind_tcp(bound)?,
    };
    u.set_nonblocking(true)?;
    t.set_nonblocking(true)?;
    sockets.keep(&ukey, Kind::Udp, Some(bound), u.as_fd());
    sockets.keep(&tkey, Kind::Tcp, Some(bound), t.as_fd());
    Ok((u, t))
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts l4mesh on the current tokio runtime, the operators' servers included. Ready to serve
/// when it returns.
pub async fn start(config: &Config) -> Result<Running, AppError> {
    let (mut running, operators) = build(config, None).await?;
    for task in operators {
        running.tasks.push(tokio::spawn(task()));
    }
    Ok(running)
}

/// Everything but the operators' servers, which are returned to be run where the caller chooses.
/// `operators`: the runtime they will run on, where OTLP export runs too (`None`: the current
/// one).
async fn build(
    config: &Config,
    operators: Option<&tokio::runtime::Handle>,
) -> Result<(Running, Vec<OperatorTask>), AppError> {
    // Read before anything is spawned: a bad file fails startup with nothing left running.
    let admin_token = match (&config.admin_addr, &config.admin_token_file) {
        (Some(_), Some(p)) => Some(crate::admin::AdminToken::read(p)?),
        _ => None,
    };
    // Every listener and received descriptor counts against it: raised to the hard limit first.
    let nofile = crate::limits::raise_nofile();
    // An upgrade: the running l4mesh's sockets, before anything is bound.
    let (mut sockets, takeover) = match &config.handoff_socket {
        Some(path) => match crate::handoff::take_over(path, config.inpod.is_some()).await? {
            Some((sockets, takeover)) => (sockets, Some(takeover)),
            None => (Sockets::keeping(), None),
        },
        None => (Sockets::none(), None),
    };
    let predecessor = takeover.as_ref().map(|t| t.state.clone());
    let released = crate::handoff::Released::default();
    // The ports a client expects one answer from are served from the take-over on.
    let (taken_tx, taken_rx) = tokio::sync::watch::channel(takeover.is_none());
    let tenure = crate::handoff::Tenure::new(taken_rx, released.clone());
    let drain = Drain::new();
    let store = Arc::new(Store::new());
    let readiness = Readiness::new();
    let mut tasks = Vec::new();
    let mut on_demand = None;
    let mut xds_metrics = None;
    match &config.source {
        Source::EmbeddedDefault | Source::File(_) => {
            let batch = match &config.source {
                Source::File(path) => localconfig::load(path)?,
                _ => localconfig::parse(localconfig::EMBEDDED_DEFAULT)?,
            };
            let stats = store.apply(batch);
            let (w, s, p) = store.load().counts();
            tracing::info!(source = ?config.source, workloads = w, services = s, policies = p, version = stats.version, "mesh state loaded");
            if let Source::File(path) = &config.source {
                tasks.push(localconfig::watch(path.clone(), store.clone())?);
            }
        }
        Source::Xds(settings) => {
            let (client, od, metrics) = XdsClient::new(
                crate::xds::XdsSettings {
                    packet_mark: config.packet_mark,
                    ..settings.clone()
                },
                &config.cluster_id,
                &config.node_name,
                store.clone(),
                &readiness,
            );
            if settings.on_demand {
                on_demand = Some(od);
            }
            xds_metrics = Some(metrics);
            tracing::info!(address = %settings.address, on_demand = settings.on_demand, "following the control plane");
            tasks.push(spawn_control(operators, client.run()));
        }
    }

    let ca = match &config.ca {
        CaSource::Local { ttl } => CaClient::Local {
            ca: Arc::new(LocalCa::generate(&config.trust_domain)?),
            ttl: *ttl,
        },
        CaSource::Istio(s) => CaClient::istio(s.clone()),
    };
    tracing::info!(ca = ?ca, "certificate authority");
    let secrets = SecretManager::new(ca);
    let only = match (&config.ca, &config.workload_info) {
        (_, Some(w)) => Some(crate::model::SpiffeId::new(
            &config.trust_domain,
            &w.namespace,
            &w.service_account,
        )),
        _ => None,
    };
    let own_identity = only.clone();
    // Certificates of the node's identities are fetched and renewed by workers this task starts,
    // so they run where it runs. In shared mode the pod manager keeps them instead: exactly the
    // identities of the pods it serves.
    if config.inpod.is_none() {
        tasks.push(spawn_control(
            operators,
            crate::identity::follow_store(
                store.clone(),
                config.node_name.clone(),
                only,
                secrets.clone(),
            ),
        ));
    }

    // Dedicated mode binds the data path here; shared mode binds it in each pod's namespace.
    let data = match &config.inpod {
        None => Some(DataListeners::bind(config, &mut sockets)?),
        Some(_) => None,
    };
    let (outbound, inbound_plaintext, hbone, socks5) = match &data {
        Some(d) => (
            d.outbound.1,
            d.inbound.1,
            d.hbone.1,
            d.socks.as_ref().map(|s| s.1),
        ),
        // Shared mode: the addresses of every pod's listeners, each in its own namespace.
        None => (
            config.outbound_addr,
            config.inbound_plaintext_addr,
            config.hbone_addr,
            None,
        ),
    };
    let (readiness_l, readiness_addr) = match config.readiness_addr {
        Some(a) => {
            let (l, local) = listen_tokio(&mut sockets, "readiness", "readiness-addr", a)?;
            (Some(l), Some(local))
        }
        None => (None, None),
    };
    // The DNS proxy: in dedicated mode bound now with the other listeners (a port conflict fails
    // startup); in shared mode inside each pod, with the pod's other listeners.
    // The upstream resolvers (resolv.conf, read once now): the DNS proxy forwards to them, and
    // on-demand DNS asks them.
    let resolv_conf = std::fs::read_to_string(&config.resolv_conf).unwrap_or_else(|e| {
        tracing::warn!(path = %config.resolv_conf.display(), error = %e, "cannot read the upstream resolvers: names outside the mesh and hostname destinations will not resolve");
        String::new()
    });
    let resolvers = crate::dns::forward::Upstreams::from_resolv_conf(
        &resolv_conf,
        crate::dns::forward::DEFAULT_TIMEOUT,
        config.packet_mark,
    );
    let dns_server = match (&config.dns, &config.inpod) {
        (Some(d), None) => {
            let first =
                d.addrs.first().copied().unwrap_or_else(|| {
                    SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), 15053)
                });
            // An upgrade takes the predecessor's sockets.
            let (server, bound) = crate::dns::DnsServer::bind_with(&d.addrs, "this node", |a| {
                std::future::ready(dns_pair(&mut sockets, a))
            })
            .await
            .map_err(|error| AppError::DnsBind { addr: first, error })?;
            Some((server, bound))
        }
        _ => None,
    };
    let dns_addrs: Vec<SocketAddr> = dns_server.iter().flat_map(|(_, b)| b.clone()).collect();
    let dns_metrics = config
        .dns
        .as_ref()
        .map(|_| Arc::new(crate::dns::DnsMetrics::default()));
    let dns_ctx = match (&config.dns, &dns_metrics) {
        (Some(settings), Some(metrics)) => Some(Arc::new(dns_context(
            config,
            settings,
            resolvers.clone(),
            // Dedicated mode runs in the pod: its resolv.conf is the client's (ztunnel's rule).
            config
                .inpod
                .is_none()
                .then(|| crate::dns::forward::search_domains(&resolv_conf)),
            store.clone(),
            metrics.clone(),
        ))),
        _ => None,
    };
    let (metrics_l, metrics_addr) = match config.metrics_addr {
        Some(a) => {
            let (l, local) = listen_tcp(&mut sockets, "metrics", "metrics-addr", a)?;
            (Some(l), Some(local))
        }
        None => (None, None),
    };
    // Every listener's connection caps ([`crate::limits`]); the data path's default follows the
    // open-file limit, raised to its hard limit first.
    let limits = Arc::new(crate::limits::Registry::default());
    let data_caps = crate::limits::Caps {
        max_connections: config
            .max_connections
            .unwrap_or_else(|| crate::limits::default_max_connections(nofile)),
        max_per_source: config.max_connections_per_source,
    };
    // Per source too: these bind the wildcard address, and one client holding every place would
    // leave kubelet's probes refused.
    let http_caps = crate::limits::Caps {
        max_connections: config.http.max_connections,
        max_per_source: crate::http_server::MAX_PER_SOURCE,
    };
    let http_limiter = |name| limits.limiter(name, http_caps);
    // Bound with the others so that its port is one of l4mesh's own from the first connection.
    let admin_l = match config.admin_addr {
        Some(a) => Some(listen_tcp(&mut sockets, "admin", "admin-addr", a)?),
        None => None,
    };
    let admin_addr = admin_l.as_ref().map(|(_, local)| *local);
    let own_ports = crate::proxy::OwnPorts::new(
        [outbound, inbound_plaintext, hbone]
            .into_iter()
            .chain(socks5)
            .map(|a| a.port()),
        readiness_addr
            .into_iter()
            .chain(metrics_addr)
            .chain(admin_addr)
            .chain(dns_addrs.iter().copied())
            // Shared mode: the pods' DNS port.
            .chain(config.dns.iter().flat_map(|d| d.addrs.iter().copied()))
            .map(|a| a.port()),
    );
    // Read before the first handshake; followed on the operators' runtime.
    let revocation = config.crl_path.clone().map(crate::tls::Revocation::load);
    if let Some(rev) = &revocation {
        tasks.push(spawn_control(operators, rev.clone().follow()));
    }
    let ctx = Arc::new(ProxyCtx {
        store: store.clone(),
        network: config.network.as_str().into(),
        node_name: config.node_name.clone(),
        upstream: UpstreamOptions {
            mark: config.packet_mark,
            connect_timeout: config.connect_timeout,
            orig_src: crate::socket::orig_src_mode(config.enable_orig_src)?,
            orig_src_fallbacks: Default::default(),
            keepalive: config.keepalive,
            netns: None,
        },
        own_ports,
        on_demand,
        hostnames: Arc::new(crate::dns::resolve::HostResolver::new(resolvers.clone())),
        secrets: secrets.clone(),
        own_identity,
        own_workload: config.workload_info.clone(),
        h2: config.h2,
        splice_after: config.splice_after,
        localhost_app_tunnel: config.localhost_app_tunnel,
        enforce_waypoint: config.enforce_waypoint,
        hbone: Arc::new(crate::proxy::HboneState::new(revocation)),
        conns: Default::default(),
        otel: match &config.otel {
            Some(o) => Some(otel(o, &config.node_name, config.packet_mark, operators)?),
            None => None,
        },
        metrics: Default::default(),
        drain: drain.signal(),
        pod: None,
    });
    let pods = config.inpod.as_ref().map(|inpod| {
        let limiter = |role: Role| limits.limiter(role.name(), data_caps);
        let manager = crate::inpod::manager::PodManager::new(
            crate::inpod::manager::NodeParts {
                base: ctx.clone(),
                trust_domain: config.trust_domain.clone(),
                readiness: readiness.clone(),
                node_drain: drain.signal(),
                deadline: config.connection_termination_deadline,
                control: operators.cloned(),
                held: sockets.held(),
            },
            crate::inpod::manager::PodListeners {
                outbound: outbound.port(),
                inbound_plaintext: inbound_plaintext.port(),
                hbone: hbone.port(),
                port_reuse: inpod.port_reuse,
                limiters: [
                    limiter(Role::Outbound),
                    limiter(Role::InboundPlaintext),
                    limiter(Role::InboundHbone),
                ],
                dns: match (&config.dns, &dns_ctx) {
                    (Some(d), Some(ctx)) => Some(crate::inpod::manager::PodDns {
                        addrs: d.addrs.clone(),
                        template: ctx.clone(),
                    }),
                    _ => None,
                },
            },
            takeover.is_some(),
        );
        (manager, inpod.uds.clone())
    });
    // An upgrade in shared mode: the predecessor's pods, on their own sockets.
    let pods = match pods {
        Some((mut manager, uds)) => {
            for pod in sockets.take_pods() {
                let (name, uid) = (pod.pod.name.clone(), pod.pod.uid.clone());
                if let Err(e) = manager.adopt(pod).await {
                    tracing::warn!(pod = %name, %uid, error = %e, "upgrade: could not serve a pod handed over; left to the CNI agent's replay");
                }
            }
            Some((manager, uds))
        }
        None => None,
    };
    let pods_view = pods.as_ref().map(|(m, _)| m.view());
    let metrics = Arc::new(Metrics::new(crate::metrics::Sources {
        limits: limits.clone(),
        traffic: ctx.metrics.clone(),
        hbone: ctx.hbone.clone(),
        orig_src_fallbacks: ctx.upstream.orig_src_fallbacks.clone(),
        store: ctx.store.clone(),
        node_name: ctx.node_name.clone(),
        xds: xds_metrics.clone(),
        secrets: secrets.clone(),
        // `start` runs on the data-plane runtime: its figures are the ones exported.
        runtime: tokio::runtime::Handle::current(),
        pods: pods_view.clone(),
        dns: dns_metrics.clone(),
        predecessor: predecessor.clone(),
    }));
    // Closes established inbound connections that a policy change now denies.
    // On the operators' runtime: re-checking 10 000 connections against a new policy set must not
    // take a data-plane worker's turn.
    tasks.push(spawn_control(
        operators,
        ctx.conns.clone().follow(store.clone()),
    ));
    if let Some(l) = readiness_l {
        tasks.push(tokio::spawn(tenure.clone().serve(crate::readiness::serve(
            l,
            readiness.clone(),
            drain.signal(),
            http_limiter("readiness"),
            config.http.header_timeout,
        ))));
    }
    // Listeners are bound (so a port conflict fails startup) but accept only once the mesh state
    // is known: connections wait in the backlog meanwhile instead of being misrouted.
    if let Some(data) = data {
        let (gate, signal) = (readiness.clone(), drain.signal());
        let listener = |l, role: Role| {
            let limiter = limits.limiter(role.name(), data_caps);
            Listener::new(l, ctx.clone(), role, limiter)
        };
        let mut serve = vec![
            listener(data.outbound.0, Role::Outbound),
            listener(data.inbound.0, Role::InboundPlaintext),
            listener(data.hbone.0, Role::InboundHbone),
        ];
        serve.extend(data.socks.map(|(l, _)| listener(l, Role::Socks5)));
        tasks.push(tokio::spawn(crate::proxy::serve_when_ready(
            serve, gate, signal,
        )));
    }
    if let (Some((server, _)), Some(ctx)) = (dns_server, dns_ctx) {
        tracing::info!(addrs = ?dns_addrs, upstreams = ?ctx.upstreams.servers(), "DNS proxy: mesh names from the store, the rest forwarded");
        let (tenure, stop) = (tenure.clone(), tenure.release_signal());
        tasks.push(tokio::spawn(async move {
            if tenure.taken().await {
                server.run(ctx, stop).await
            }
        }));
    }
    if let Some((mut manager, uds)) = pods {
        let signal = drain.signal();
        let (tenure, released) = (tenure.clone(), released.clone());
        let deadlines = (
            config.connection_termination_deadline,
            config.upgrade_drain_deadline,
        );
        let deadline = move || released.deadline(deadlines.0, deadlines.1);
        tracing::info!(path = %uds.display(), "shared mode: following the CNI node agent (INPOD_UDS) for pods");
        tasks.push(tokio::spawn(async move {
            // The node's drain waits until every pod is drained.
            let _hold = signal.hold();
            // In an upgrade, the agent is followed once the predecessor let go of it (it closes
            // its ZDS connection as it drains): the agent sees one proxy at a time.
            let follow = async {
                if tenure.taken().await {
                    crate::inpod::follow(&uds, &mut manager).await
                }
            };
            tokio::select! {
                () = follow => {}
                () = signal.draining() => {}
            }
            manager.drain_all(deadline()).await;
        }));
    }
    let mut operators = Vec::new();
    if let Some(l) = metrics_l {
        let (m, limiter) = (metrics.clone(), http_limiter("metrics"));
        let header_timeout = config.http.header_timeout;
        operators.push(operator_task("metrics", l, tenure.clone(), move |l| {
            crate::metrics::serve(l, m, limiter, header_timeout)
        }));
    }
    if let Some((l, _)) = admin_l {
        let state = Arc::new(crate::admin::AdminState {
            token: admin_token,
            store: store.clone(),
            secrets: secrets.clone(),
            config: serde_json::to_value(config).unwrap_or_else(|e| {
                serde_json::Value::String(format!("the configuration could not be serialised: {e}"))
            }),
            xds: xds_metrics.clone(),
            drain: drain.clone(),
            deadline: config.connection_termination_deadline,
            pods: pods_view.clone(),
            handoff_socket: config.handoff_socket.clone(),
            predecessor: predecessor.clone(),
        });
        let (limiter, header_timeout) = (http_limiter("admin"), config.http.header_timeout);
        operators.push(operator_task("admin", l, tenure.clone(), move |l| {
            crate::admin::serve(l, state, limiter, header_timeout)
        }));
    }
    let failed = Arc::new(std::sync::OnceLock::new());
    if let Some(path) = &config.handoff_socket {
        let server = crate::handoff::listen(path, &mut sockets)?;
        let handover = crate::handoff::Handover {
            drain: drain.clone(),
            released: released.clone(),
            metrics: {
                let m = metrics.clone();
                Box::new(move |om| m.encode_own(om).ok())
            },
        };
        let (readiness, drain, failed) = (readiness.clone(), drain.clone(), failed.clone());
        let signal = drain.signal();
        tracing::info!(path = %path.display(), "upgrade: a successor started with --handoff-socket at this path takes over these listeners");
        tasks.push(tokio::spawn(async move {
            if let Some(t) = takeover {
                let ready = async {
                    tokio::select! {
                        () = readiness.wait() => true,
                        () = signal.draining() => false,
                    }
                };
                match t.complete(ready).await {
                    Ok((crate::handoff::TakeoverEnd::Abandoned, _)) => return,
                    Ok((_, follow)) => {
                        taken_tx.send_replace(true);
                        tokio::spawn(follow.run());
                    }
                    Err(e) => {
                        // The predecessor serves on; what this process accepted (if it was
                        // ready) drains.
                        let _ = failed.set(crate::handoff::with_causes(&e));
                        drain.start();
                        return;
                    }
                }
            }
            crate::handoff::serve(server, sockets, handover).await
        }));
    }
    tracing::info!(%outbound, %inbound_plaintext, %hbone, socks5 = ?socks5, readiness = ?readiness_addr, metrics = ?metrics_addr, admin = ?admin_addr, own_ports = ?ctx.own_ports.ports(), "listening");
    let running = Running {
        outbound,
        inbound_plaintext,
        socks5,
        hbone,
        readiness_addr,
        metrics_addr,
        store,
        readiness,
        xds_metrics,
        secrets,
        proxy: ctx,
        metrics,
        admin_addr,
        dns_addrs,
        predecessor,
        drain,
        deadline: config.connection_termination_deadline,
        upgrade_deadline: config.upgrade_drain_deadline,
        released,
        failed,
        tasks,
    };
    Ok((running, operators))
}

/// The DNS proxy's context for this node (dedicated mode: every client is the served workload;
/// shared mode: the template of each pod's).
fn dns_context(
    config: &Config,
    settings: &crate::config::DnsSettings,
    upstreams: crate::dns::forward::Upstreams,
    search: Option<Vec<String>>,
    store: Arc<crate::store::Store>,
    metrics: Arc<crate::dns::DnsMetrics>,
) -> crate::dns::server::DnsContext {
    if config.inpod.is_some() {
        tracing::info!(addrs = ?settings.addrs, upstreams = ?upstreams.servers(), "DNS proxy: in every pod, mesh names from the store, the rest forwarded from the pod");
    }
    crate::dns::server::DnsContext {
        store,
        network: config.network.as_str().into(),
        rules: settings.rules.clone(),
        own_workload: config.workload_info.clone(),
        search,
        node_name: config.node_name.clone(),
        upstreams,
        metrics,
        limits: Default::default(),
    }
}

/// Dedicated mode's data-path listeners with their bound addresses.
struct DataListeners {
    outbound: (TcpListener, SocketAddr),
    inbound: (TcpListener, SocketAddr),
    hbone: (TcpListener, SocketAddr),
    socks: Option<(TcpListener, SocketAddr)>,
}

impl DataListeners {
    fn bind(config: &Config, sockets: &mut Sockets) -> Result<Self, AppError> {
        Ok(Self {
            outbound: listen_tokio(sockets, "outbound", "outbound-addr", config.outbound_addr)?,
            inbound: listen_tokio(
                sockets,
                "inbound plaintext",
                "inbound-plaintext-addr",
                config.inbound_plaintext_addr,
            )?,
            hbone: listen_tokio(sockets, "inbound HBONE", "hbone-addr", config.hbone_addr)?,
            socks: match config.socks5_addr {
                Some(a) => Some(listen_tokio(sockets, "socks5", "socks5-addr", a)?),
                None => None,
            },
        })
    }
}

/// Spawns a control-plane task (the xDS client, certificate renewal) on the operators' runtime
/// when there is one: decoding a large xDS response or signing a CSR then never holds a
/// data-plane thread. The data plane only reads what they publish (the store, the certificates).
fn spawn_control<F>(operators: Option<&tokio::runtime::Handle>, task: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match operators {
        Some(rt) => rt.spawn(task),
        None => tokio::spawn(task),
    }
}

/// The OTLP exporters, built on the operators' runtime when there is one: the gRPC channel's
/// worker (and so every export: HTTP/2, TLS, protobuf encoding) runs on the runtime current at
/// construction, which must not be the data plane's. Their sockets carry `PACKET_MARK`.
fn otel(
    settings: &crate::otel::OtelSettings,
    node: &str,
    mark: u32,
    operators: Option<&tokio::runtime::Handle>,
) -> Result<Arc<crate::otel::Otel>, crate::otel::OtelError> {
    let _entered = operators.map(tokio::runtime::Handle::enter);
    crate::otel::Otel::new(settings, node, |ep| {
        crate::control_plane::lazy_channel(ep, mark)
    })
}

/// The operators' runtime: a current-thread runtime on its own thread, running the operator
/// servers and OTLP export until dropped. Started before the rest is built, so that what runs
/// on it can be created inside it ([`OperatorRuntime::handle`]).
struct OperatorRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl OperatorRuntime {
    fn start() -> std::io::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("l4mesh-admin".into())
            .spawn(move || {
                // Tasks spawned through the handle run while this thread drives the runtime.
                rt.block_on(async move {
                    let _ = stopped.await;
                });
                rt.shutdown_timeout(Duration::from_millis(200));
            })?;
        Ok(Self {
            handle,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    fn spawn(&self, tasks: Vec<OperatorTask>) {
        for task in tasks {
            self.handle.spawn(task());
        }
    }
}

impl Drop for OperatorRuntime {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::warn!("the operators' runtime thread panicked");
            }
        }
    }
}

/// Runs l4mesh until SIGTERM, SIGINT or `/quitquitquit`, then drains and returns (exit 0); the
/// binary's whole life. A second signal during the drain ends it at once.
pub fn run(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("l4mesh-worker")
        .enable_all()
        .build()?;
    let result = rt.block_on(async {
        // Installed before anything is ready, so that a SIGTERM right after readiness is seen.
        let mut signals = Signals::new()?;
        let operator_rt = OperatorRuntime::start()?;
        let (running, operators) = build(&config, Some(operator_rt.handle())).await?;
        operator_rt.spawn(operators);
        let (why, by_signal) = tokio::select! {
            s = signals.recv() => (s, true),
            () = running.drain_requested() => (match (running.failure(), running.successor()) {
                (Some(_), _) => "the take-over failed",
                (None, Some(_)) => "a successor took over (upgrade)",
                (None, None) => "POST /quitquitquit",
            }, false),
        };
        if let Some(e) = running.failure() {
            // The predecessor serves on; the connections this process accepted meanwhile (if
            // any) finish within the normal deadline.
            let e = e.to_owned();
            tracing::error!(error = %e, "upgrade failed; draining what this process accepted, then exiting");
            running.drain().await;
            return Err(anyhow::anyhow!("{e}"));
        }
        tracing::info!(
            reason = why,
            deadline = ?running.drain_deadline(),
            open_connections = running.open_connections(),
            "draining: readiness fails, listeners closed, HBONE peers told to go away; open connections may finish until the deadline"
        );
        let drained = running.drain();
        tokio::pin!(drained);
        // A drain for an upgrade ignores one signal: Kubernetes sends SIGTERM to the replaced
        // pod after its successor took over, and its connections must not end for that.
        let mut spare = running.successor().is_some() && !by_signal;
        let hurried = loop {
            tokio::select! {
                r = &mut drained => {
                    tracing::info!(
                        elapsed_ms = r.elapsed.as_millis() as u64,
                        closed_at_deadline = r.forced,
                        still_open = r.left,
                        "drained; exiting (connections and HBONE tunnels closed at the deadline, and still open after the grace)"
                    );
                    break false;
                }
                s = signals.recv() => {
                    if std::mem::take(&mut spare) {
                        tracing::info!(
                            signal = s,
                            open_connections = running.open_connections(),
                            deadline = ?running.drain_deadline(),
                            "signal during the upgrade's drain: the successor serves, open connections continue until the deadline (a second signal exits now)"
                        );
                        continue;
                    }
                    tracing::warn!(
                        signal = s,
                        open_connections = running.open_connections(),
                        "second signal during the drain; exiting now"
                    );
                    break true;
                }
            }
        };
        match running.proxy.otel.clone() {
            // Asked to hurry: the queued spans and records are dropped.
            Some(_) if hurried => {}
            // After the connections ended, so that their spans and records go out too; at most
            // `otel::SHUTDOWN_TIMEOUT`, and a (further) signal cuts it short.
            Some(otel) => tokio::select! {
                () = otel.shutdown() => {}
                s = signals.recv() => tracing::warn!(
                    signal = s,
                    "signal during the OTLP flush; exiting without it"
                ),
            },
            None => {}
        }
        // The exporters' channel lives on the operators' runtime: it stops after the flush.
        drop(operator_rt);
        Ok::<_, anyhow::Error>(())
    });
    // Whatever is left (connections stuck past the grace, background tasks) ends with the runtime.
    rt.shutdown_timeout(Duration::from_millis(500));
    result
}

/// SIGTERM and SIGINT, installed once.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
