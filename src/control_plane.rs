//! The gRPC channel to the control plane (istiod or xds-testserver), shared by the xDS client and
//! the CA client: TLS with the configured trust root (or plaintext for `http://`), and the
//! per-call credentials istiod expects (`authorization: Bearer <token>`, `clusterid`).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How long opening a TCP connection to the control plane may take (the connector's and tonic's
/// bound alike).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// tonic's connector, replaced so that the socket carries the packet mark
/// ([`crate::socket::connect`]): a dedicated-mode pod's capture rules skip marked packets, so
/// l4mesh's own xDS and CA traffic is not redirected into its outbound listener — which would wait
/// for the readiness that this very traffic brings. TLS (for `https://`) is layered on top by tonic.
#[derive(Clone, Copy, Debug)]
struct MarkedConnector {
    /// l4mesh's `PACKET_MARK`; 0 = none.
    mark: u32,
}

type ConnectFuture = Pin<
    Box<
        dyn Future<Output = std::io::Result<hyper_util::rt::TokioIo<tokio::net::TcpStream>>> + Send,
    >,
>;

impl tonic::codegen::Service<http::Uri> for MarkedConnector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = std::io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let mark = self.mark;
        Box::pin(async move {
            let host = uri
                .host()
                .unwrap_or_default()
                .trim_matches(['[', ']'])
                .to_owned();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            let opts = crate::socket::UpstreamOptions {
                mark,
                connect_timeout: CONNECT_TIMEOUT,
                orig_src: false,
                orig_src_fallbacks: Default::default(),
                netns: None,
                keepalive: Default::default(),
            };
            let mut last = None;
            for addr in tokio::net::lookup_host((host.as_str(), port)).await? {
                match crate::socket::connect(addr, &opts).await {
                    Ok(s) => return Ok(hyper_util::rt::TokioIo::new(s)),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("expected {host} to resolve to an address, found none"),
                )
            }))
        })
    }
}

/// Where the trust root for the control plane's certificate comes from (`XDS_ROOT_CA`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RootCa {
    /// The operating system's trust store (`SYSTEM`).
    System,
    /// A PEM file.
    File(PathBuf),
    /// PEM text given inline.
    Pem(String),
}

impl RootCa {
    /// `SYSTEM`, inline PEM (starts with `-----BEGIN`), or a file path.
    pub fn parse(s: &str) -> RootCa {
        let t = s.trim();
        if t.eq_ignore_ascii_case("SYSTEM") {
            RootCa::System
        } else if t.starts_with("-----BEGIN") {
            RootCa::Pem(t.to_owned())
        } else {
            RootCa::File(PathBuf::from(t))
        }
    }
}

/// Why a channel could not be opened; the text says what to check.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("invalid control-plane address {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("reading the control plane's root certificate {path}: {error}")]
    RootCa { path: String, error: std::io::Error },
    #[error("connecting to the control plane at {address} failed: {detail} (is it running and reachable? for https, is the configured root the one that signed its certificate?)")]
    Connect { address: String, detail: String },
}

/// The control plane's trust root as read now: what a channel is opened with, and what decides
/// whether a kept channel still fits the configured root (the file may have been rotated).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoadedRoot {
    /// The operating system's trust store (also for `http://`, where it is not used).
    System,
    /// PEM text, from the configuration or read from the file.
    Pem(Vec<u8>),
}

impl LoadedRoot {
    /// Reads the root file now (a rotated file is seen at the next call).
    pub async fn read(root_ca: Option<&RootCa>) -> Result<LoadedRoot, ChannelError> {
        Ok(match root_ca {
            None | Some(RootCa::System) => LoadedRoot::System,
            Some(RootCa::Pem(pem)) => LoadedRoot::Pem(pem.clone().into_bytes()),
            Some(RootCa::File(path)) => {
                LoadedRoot::Pem(tokio::fs::read(path).await.map_err(|error| {
                    ChannelError::RootCa {
                        path: path.display().to_string(),
                        error,
                    }
                })?)
            }
        })
    }
}

/// Opens a channel to `address` (`https://` with TLS verified against `root_ca`, read now, or
/// `http://`), its socket carrying the packet `mark` (0 = none).
pub async fn connect(
    address: &str,
    root_ca: Option<&RootCa>,
    mark: u32,
) -> Result<Channel, ChannelError> {
    connect_loaded(address, &LoadedRoot::read(root_ca).await?, mark).await
}

/// [`connect`] with a root already read.
pub async fn connect_loaded(
    address: &str,
    root: &LoadedRoot,
    mark: u32,
) -> Result<Channel, ChannelError> {
    let bad = |reason: String| ChannelError::Address {
        address: address.to_owned(),
        reason,
    };
    let mut ep = Endpoint::from_shared(address.to_owned())
        .map_err(|e| bad(e.to_string()))?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if address.starts_with("https://") {
        let host = ep
            .uri()
            .host()
            .unwrap_or_default()
            .trim_matches(['[', ']'])
            .to_owned();
        let tls = ClientTlsConfig::new().domain_name(host);
        let tls = match root {
            LoadedRoot::System => tls.with_native_roots(),
            LoadedRoot::Pem(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
        };
        ep = ep.tls_config(tls).map_err(|e| bad(error_chain(&e)))?;
    }
    ep.connect_with_connector(MarkedConnector { mark })
        .await
        .map_err(|e| ChannelError::Connect {
            address: address.to_owned(),
            detail: error_chain(&e),
        })
}

/// A channel to `ep`, connected on first use, whose sockets carry the mark (as the control
/// plane's): for l4mesh's other outgoing gRPC, the OTLP export, which a captured pod's capture
/// rules must not redirect into its own outbound listener either.
pub fn lazy_channel(ep: &Endpoint, mark: u32) -> Channel {
    ep.connect_with_connector_lazy(MarkedConnector { mark })
}

/// Reads the token file (re-read on every call: Kubernetes rotates it). No file, no token.
pub fn read_token(path: Option<&Path>) -> Option<String> {
    let path = path?;
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Some(t.trim().to_owned()),
        Ok(_) => {
            tracing::warn!(path = %path.display(), "AUTH_TOKEN file is empty; connecting without a token");
            None
        }
        Err(e) => {
            tracing::debug!(path = %path.display(), error = %e, "no AUTH_TOKEN file; connecting without a token");
            None
        }
    }
}

/// Adds `authorization: Bearer <token>` (when a token file is readable) and `clusterid`.
pub fn add_credentials<T>(
    req: &mut tonic::Request<T>,
    token_file: Option<&Path>,
    cluster_id: &str,
) {
    if let Some(token) = read_token(token_file) {
        match format!("Bearer {token}").parse() {
            Ok(v) => {
                req.metadata_mut().insert("authorization", v);
            }
            Err(_) => {
                tracing::warn!("AUTH_TOKEN holds characters not allowed in a header; not sent")
            }
        }
    }
    if let Ok(v) = cluster_id.parse() {
        req.metadata_mut().insert("clusterid", v);
    }
}

/// An error with all its sources, so that "invalid peer certificate: UnknownIssuer" reaches the log.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
