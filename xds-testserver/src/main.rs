//! The `xds-testserver` binary: flags → [`xds_testserver::Config`] → [`xds_testserver::Handle`],
//! then serve until Ctrl-C or SIGTERM. Logs go to stderr, filtered by `RUST_LOG` (default `info`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use tracing_subscriber::EnvFilter;
use xds_testserver::{CaPem, Config, Handle, StateSource, TlsConfig};

/// A delta-ADS control plane and Istio CA for l4mesh (and ztunnel) tests and local meshes.
///
/// Serves `DeltaAggregatedResources` for `istio.workload.Address` and `istio.security.Authorization`
/// from a YAML file in l4mesh's local-config format (ztunnel's LOCAL_XDS_PATH format), pushing every
/// edit of the file to the connected clients, with an HTTP admin API to inspect clients and change
/// the state. On the same gRPC port, `IstioCertificateService/CreateCertificate` signs workload CSRs
/// for the identities of the served workloads. Point l4mesh at it with
/// XDS_ADDRESS=http://127.0.0.1:15010 (the CA address defaults to it).
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

    /// Serve TLS on the gRPC listener, with a certificate signed by the mesh CA, valid for
    /// localhost, istiod.istio-system.svc, the listen IP and every --san.
    #[arg(long)]
    tls: bool,

    /// PEM certificate of the mesh CA (a root, or an intermediate with --ca-chain), as istiod's
    /// "plug in your own CA certificates"; needs --ca-key. Without it a fresh ECDSA P-256 root is
    /// generated for this run (and written to --root-cert-out).
    #[arg(long, value_name = "FILE", requires = "ca_key")]
    ca_cert: Option<PathBuf>,

    /// PEM private key of the --ca-cert CA (PKCS#8 or SEC1).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_key: Option<PathBuf>,

    /// PEM certificates from an intermediate --ca-cert up to and including the root (istiod's
    /// cert-chain.pem).
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    ca_chain: Option<PathBuf>,

    /// PEM mesh roots sent at the end of every certificate answer (istiod's root-cert.pem): during
    /// a root rotation, the old and the new root, so that node proxies trust both. Must include
    /// the root of the --ca-cert chain. Default: that root alone.
    #[arg(long, value_name = "FILE", requires = "ca_cert")]
    root_cert: Option<PathBuf>,

    /// An extra subject alternative name (DNS name or IP) for the serving certificate; repeatable.
    #[arg(long = "san", value_name = "NAME_OR_IP", requires = "tls")]
    sans: Vec<String>,

    /// Where to write the mesh root certificate (PEM) at start, with or without --tls (for a plug-in
    /// CA, the root of its chain), for clients to trust (l4mesh: XDS_ROOT_CA=<this file> with --tls,
    /// CA_ROOT_CA=<this file> without).
    #[arg(
        long,
        value_name = "FILE",
        default_value = "./xds-testserver-root-cert.pem"
    )]
    root_cert_out: PathBuf,

    /// Require `authorization: Bearer <token>` on every xDS stream and certificate request, the
    /// token being this file's content (trimmed); others are refused with UNAUTHENTICATED.
    /// (l4mesh: AUTH_TOKEN=<file>.)
    #[arg(long, value_name = "FILE")]
    token_file: Option<PathBuf>,

    /// Trust domain of the mesh: the CA signs only spiffe://<this>/ns/<namespace>/sa/<account>.
    #[arg(long, value_name = "DOMAIN", default_value = xds_testserver::DEFAULT_TRUST_DOMAIN)]
    trust_domain: String,

    /// The longest certificate validity the CA signs for; longer requests (and requests for 0) get
    /// this.
    #[arg(long, value_name = "SECONDS", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    max_cert_ttl: u64,

    /// A SPIFFE ID the CA signs for besides the identities of the served workloads
    /// (spiffe://<trust domain>/ns/<namespace>/sa/<service account>); repeatable.
    #[arg(long = "allow-identity", value_name = "SPIFFE_ID")]
    allowed_identities: Vec<String>,
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {what} {}", path.display()))
}

fn config(args: Args) -> anyhow::Result<Config> {
    let ca = match (&args.ca_cert, &args.ca_key) {
        (Some(cert), Some(key)) => Some(CaPem {
            cert_pem: read(cert, "--ca-cert")?,
            key_pem: read(key, "--ca-key")?,
            chain_pem: match &args.ca_chain {
                Some(chain) => read(chain, "--ca-chain")?,
                None => String::new(),
            },
            roots_pem: match &args.root_cert {
                Some(roots) => read(roots, "--root-cert")?,
                None => String::new(),
            },
        }),
        _ => None,
    };
    let tls = args.tls.then_some(TlsConfig { sans: args.sans });
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
        ca,
        root_cert_out: Some(args.root_cert_out),
        trust_domain: args.trust_domain,
        max_cert_ttl: Duration::from_secs(args.max_cert_ttl),
        allowed_identities: args.allowed_identities,
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
    let root_out = config.root_cert_out.clone();
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
