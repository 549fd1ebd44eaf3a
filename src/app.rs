//! Composition root: loads the mesh state, binds every listener (a port conflict fails startup),
//! wires the store into the proxy, and spawns the tasks. Only this module knows which runtime a task
//! runs on.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::config::{Config, Source};
use crate::localconfig::{self, LocalConfigError};
use crate::proxy::{InboundPlain, Outbound, ProxyCtx, Socks5};
use crate::socket::UpstreamOptions;
use crate::store::Store;

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
    #[error("loading the local config: {0}")]
    LocalConfig(#[from] LocalConfigError),
}

/// A started l4mesh: its bound addresses and store, and the tasks serving them (aborted on drop).
pub struct Running {
    pub outbound: SocketAddr,
    pub inbound_plaintext: SocketAddr,
    pub socks5: Option<SocketAddr>,
    pub store: Arc<Store>,
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
    let store = Arc::new(Store::new());
    let mut tasks = Vec::new();
    let batch = match &config.source {
        Source::EmbeddedDefault => localconfig::parse(localconfig::EMBEDDED_DEFAULT)?,
        Source::File(path) => localconfig::load(path)?,
    };
    let stats = store.apply(batch);
    let (w, s, p) = store.load().counts();
    tracing::info!(source = ?config.source, workloads = w, services = s, policies = p, version = stats.version, "mesh state loaded");
    if let Source::File(path) = &config.source {
        tasks.push(localconfig::watch(path.clone(), store.clone())?);
    }

    let outbound_l = bind("outbound", "outbound-addr", config.outbound_addr).await?;
    let inbound_l = bind(
        "inbound plaintext",
        "inbound-plaintext-addr",
        config.inbound_plaintext_addr,
    )
    .await?;
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
    let socks5 = match (&socks_l, config.socks5_addr) {
        (Some(l), Some(a)) => Some(local(l, "socks5", "socks5-addr", a)?),
        _ => None,
    };
    let mut own_addrs = vec![outbound, inbound_plaintext];
    own_addrs.extend(socks5);
    let ctx = Arc::new(ProxyCtx {
        store: store.clone(),
        network: config.network.as_str().into(),
        node_name: config.node_name.clone(),
        upstream: UpstreamOptions {
            mark: config.packet_mark,
            connect_timeout: config.connect_timeout,
        },
        own_addrs,
    });
    tasks.push(tokio::spawn(Outbound::new(outbound_l, ctx.clone()).run()));
    tasks.push(tokio::spawn(
        InboundPlain::new(inbound_l, ctx.clone()).run(),
    ));
    if let Some(l) = socks_l {
        tasks.push(tokio::spawn(Socks5::new(l, ctx.clone()).run()));
    }
    tracing::info!(%outbound, %inbound_plaintext, socks5 = ?socks5, "listening");
    Ok(Running {
        outbound,
        inbound_plaintext,
        socks5,
        store,
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
