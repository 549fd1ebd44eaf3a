//! The `xds-testserver` binary: flags → [`xds_testserver::Config`] → [`xds_testserver::Handle`],
//! then serve until Ctrl-C or SIGTERM. Logs go to stderr, filtered by `RUST_LOG` (default `info`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use xds_testserver::{CaPem, Config, Handle, StateSource, TlsConfig};

/// A delta-ADS control plane for l4mesh (and ztunnel) tests and local meshes.
///
/// Serves `DeltaAggregatedResources` for `istio.workload.Address` and `istio.security.Authorization`
/// from a YAML file in l4mesh's local-config format (ztunnel's LOCAL_XDS_PATH format), pushing every
/// edit of the file to the connected clients, with an HTTP admin API to inspect clients and change
/// the state. Point l4mesh at it with XDS_ADDRESS=http://127.0.0.1:15010.
#[derive(Debug, Parser)]
#[command(name = "xds-testserver", version)]
struct Args {
    /// The state to serve: a local-config YAML file (workloads, services, policies). It is watched:
    /// valid edits are pushed to every client, invalid ones are logged and ignored. Without it the
    /// server starts empty; fill it through the admin API (PUT /state).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Address of the gRPC (delta ADS) listener.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15010")]
    listen: SocketAddr,

    /// Address of the HTTP admin API (GET /clients, GET|PUT /state, POST /resources, POST /raw, ...).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:15011")]
    admin_listen: SocketAddr,

    /// Serve TLS on the gRPC listener, with a certificate signed by the server's mesh CA (a fresh
    /// ECDSA P-256 root unless --ca-cert/--ca-key are given), valid for localhost,
    /// istiod.istio-system.svc, the listen IP and every --san. The root is written to --root-cert-out.
    #[arg(long)]
    tls: bool,

    /// PEM certificate of the mesh CA to sign the serving certificate with (needs --ca-key, --tls).
    #[arg(long, value_name = "FILE", requires_all = ["ca_key", "tls"])]
    ca_cert: Option<PathBuf>,

    /// PEM private key of the --ca-cert CA.
    #[arg(long, value_name = "FILE", requires_all = ["ca_cert", "tls"])]
    ca_key: Option<PathBuf>,

    /// An extra subject alternative name (DNS name or IP) for the serving certificate; repeatable.
    #[arg(long = "san", value_name = "NAME_OR_IP", requires = "tls")]
    sans: Vec<String>,

    /// Where to write the mesh root certificate (PEM) with --tls, for clients to trust
    /// (l4mesh: XDS_ROOT_CA=<this file>).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "./xds-testserver-root-cert.pem"
    )]
    root_cert_out: PathBuf,

    /// Require `authorization: Bearer <token>` on every xDS stream, the token being this file's
    /// content (trimmed); other streams are refused with UNAUTHENTICATED. (l4mesh: AUTH_TOKEN=<file>.)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn config(args: Args) -> anyhow::Result<Config> {
    let tls = if args.tls {
        let ca = match (&args.ca_cert, &args.ca_key) {
            (Some(cert), Some(key)) => Some(CaPem {
                cert_pem: read(cert, "--ca-cert")?,
                key_pem: read(key, "--ca-key")?,
            }),
            _ => None,
        };
        Some(TlsConfig {
            ca,
            sans: args.sans,
            root_cert_out: Some(args.root_cert_out),
        })
    } else {
        None
    };
    let token = match &args.token_file {
        Some(path) => {
            let token = read(path, "--token-file")?.trim().to_owned();
            if token.is_empty() {
                bail!("--token-file {} is empty", path.display());
            }
            Some(token)
        }
        None => None,
    };
    Ok(Config {
        listen: args.listen,
        admin_listen: Some(args.admin_listen),
        state: match args.config {
            Some(path) => StateSource::File(path),
            None => StateSource::Yaml(String::new()),
        },
        tls,
        token,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let config = config(Args::parse())?;
    let root_out = config.tls.as_ref().and_then(|t| t.root_cert_out.clone());
    let handle = Handle::start(config).await?;
    if let Some(path) = root_out {
        tracing::info!(path = %path.display(), "wrote the mesh root certificate");
    }
    shutdown_signal().await?;
    tracing::info!("shutting down");
    handle.shutdown().await;
    Ok(())
}

async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        tokio::select! {
            r = tokio::signal::ctrl_c() => r.context("cannot listen for Ctrl-C")?,
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    tokio::signal::ctrl_c()
        .await
        .context("cannot listen for Ctrl-C")?;
    Ok(())
}
