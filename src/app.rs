//! Composition root: loads the mesh state, binds every listener (a port conflict fails startup),
//! wires the store into the proxy, and spawns the tasks. Only this module knows which runtime a task
//! runs on.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{CaSource, Config, Source};
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
    #[error("binding the {name} listener on {addr}: {source} (is another l4mesh or ztunnel already running? choose another address with --{flag})")]
    Bind {
        name: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("creating the local CA: {0}")]
    LocalCa(#[from] crate::identity::CaError),
    #[error("loading the local config: {0}")]
    LocalConfig(#[from] LocalConfigError),
    #[error("starting OpenTelemetry export: {0}")]
    Otel(#[from] crate::otel::OtelError),
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
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

async fn bind(
    name: &'static str,
    flag: &'static str,
    addr: SocketAddr,
) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind {
            name,
            flag,
            addr,
            source,
        })
}

/// Starts l4mesh on the current tokio runtime. Ready to serve when it returns.
pub async fn start(config: &Config) -> Result<Running, AppError> {
    // Before any control-plane connection: a captured pod must not redirect l4mesh's own xDS/CA.
    crate::control_plane::set_mark(config.packet_mark);
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
                settings.clone(),
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
            tasks.push(tokio::spawn(client.run()));
        }
    }

    let ca = match &config.ca {
        CaSource::Local { ttl } => CaClient::Local {
            ca: Arc::new(LocalCa::generate(&config.trust_domain)?),
            ttl: *ttl,
        },
        CaSource::Istio(s) => CaClient::Istio(s.clone()),
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
    tasks.push(tokio::spawn(crate::identity::follow_store(
        store.clone(),
        config.node_name.clone(),
        only,
        secrets.clone(),
    )));

    let outbound_l = bind("outbound", "outbound-addr", config.outbound_addr).await?;
    let inbound_l = bind(
        "inbound plaintext",
        "inbound-plaintext-addr",
        config.inbound_plaintext_addr,
    )
    .await?;
    let hbone_l = bind("inbound HBONE", "hbone-addr", config.hbone_addr).await?;
    let socks_l = match config.socks5_addr {
        Some(a) => Some(bind("socks5", "socks5-addr", a).await?),
        None => None,
    };
    let local = |l: &TcpListener, name: &'static str, flag: &'static str, addr: SocketAddr| {
        l.local_addr().map_err(|source| AppError::Bind {
            name,
            flag,
            addr,
            source,
        })
    };
    let outbound = local(
        &outbound_l,
        "outbound",
        "outbound-addr",
        config.outbound_addr,
    )?;
    let inbound_plaintext = local(
        &inbound_l,
        "inbound plaintext",
        "inbound-plaintext-addr",
        config.inbound_plaintext_addr,
    )?;
    let hbone = local(&hbone_l, "inbound HBONE", "hbone-addr", config.hbone_addr)?;
    let socks5 = match (&socks_l, config.socks5_addr) {
        (Some(l), Some(a)) => Some(local(l, "socks5", "socks5-addr", a)?),
        _ => None,
    };
    let readiness_l = match config.readiness_addr {
        Some(a) => Some(bind("readiness", "readiness-addr", a).await?),
        None => None,
    };
    let readiness_addr = match (&readiness_l, config.readiness_addr) {
        (Some(l), Some(a)) => Some(local(l, "readiness", "readiness-addr", a)?),
        _ => None,
    };
    let metrics_l = match config.metrics_addr {
        Some(a) => Some(bind("metrics", "metrics-addr", a).await?),
        None => None,
    };
    let metrics_addr = match (&metrics_l, config.metrics_addr) {
        (Some(l), Some(a)) => Some(local(l, "metrics", "metrics-addr", a)?),
        _ => None,
    };
    let mut own_addrs = vec![outbound, inbound_plaintext, hbone];
    own_addrs.extend(socks5);
    own_addrs.extend(readiness_addr);
    own_addrs.extend(metrics_addr);
    let ctx = Arc::new(ProxyCtx {
        store: store.clone(),
        network: config.network.as_str().into(),
        node_name: config.node_name.clone(),
        upstream: UpstreamOptions {
            mark: config.packet_mark,
            connect_timeout: config.connect_timeout,
            orig_src: config
                .enable_orig_src
                .unwrap_or_else(crate::socket::transparent_allowed),
        },
        own_addrs,
        on_demand,
        secrets: secrets.clone(),
        own_identity,
        h2: config.h2,
        hbone: Default::default(),
        conns: Default::default(),
        otel: match &config.otel {
            Some(o) => Some(crate::otel::Otel::new(o, &config.node_name)?),
            None => None,
        },
        metrics: Default::default(),
    });
    let metrics = Arc::new(Metrics::new(crate::metrics::Sources {
        proxy: ctx.clone(),
        xds: xds_metrics.clone(),
        secrets: secrets.clone(),
        // `start` runs on the data-plane runtime: its figures are the ones exported.
        runtime: tokio::runtime::Handle::current(),
    }));
    if let Some(l) = metrics_l {
        tasks.push(tokio::spawn(crate::metrics::serve(l, metrics.clone())));
    }
    // Closes established inbound connections that a policy change now denies.
    tasks.push(tokio::spawn(ctx.conns.clone().follow(store.clone())));
    if let Some(l) = readiness_l {
        tasks.push(tokio::spawn(crate::readiness::serve(l, readiness.clone())));
    }
    // Listeners are bound (so a port conflict fails startup) but accept only once the mesh state
    // is known: connections wait in the backlog meanwhile instead of being misrouted.
    let gate = readiness.clone();
    let outbound_task = Listener::new(outbound_l, ctx.clone(), Role::Outbound);
    let inbound_task = Listener::new(inbound_l, ctx.clone(), Role::InboundPlaintext);
    let socks_task = socks_l.map(|l| Listener::new(l, ctx.clone(), Role::Socks5));
    let hbone_task = Listener::new(hbone_l, ctx.clone(), Role::InboundHbone);
    tasks.push(tokio::spawn(async move {
        gate.wait().await;
        let mut set = tokio::task::JoinSet::new();
        set.spawn(outbound_task.run());
        set.spawn(inbound_task.run());
        set.spawn(hbone_task.run());
        if let Some(s) = socks_task {
            set.spawn(s.run());
        }
        while set.join_next().await.is_some() {}
    }));
    tracing::info!(%outbound, %inbound_plaintext, %hbone, socks5 = ?socks5, readiness = ?readiness_addr, metrics = ?metrics_addr, "listening");
    Ok(Running {
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
        tasks,
    })
}

/// Runs l4mesh until SIGTERM or SIGINT; the binary's whole life.
pub fn run(config: Config) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .thread_name("l4mesh-worker")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let running = start(&config).await?;
        let sig = wait_for_signal().await;
        tracing::info!(signal = sig, "shutting down");
        if let Some(otel) = running.proxy.otel.clone() {
            otel.shutdown().await;
        }
        drop(running);
        Ok(())
    })
}

async fn wait_for_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops l4mesh");
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    }
}
