//! xds-testserver: a delta-ADS control plane for l4mesh's tests and for meshes without Kubernetes.
//!
//! It serves `envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources` for the
//! two types an ambient node proxy asks for, `istio.workload.Address` (workloads and services) and
//! `istio.security.Authorization` (L4 policies), from a state written in l4mesh's local-config YAML
//! format and parsed by l4mesh's own parser ([`l4mesh::localconfig::LocalConfig`]). The state comes
//! from a string or a watched file, and can be changed at run time through [`Handle`] or the HTTP
//! admin API; every change is pushed to every connected client as a delta.
//!
//! It is also the mesh's certificate authority: `istio.v1.auth.IstioCertificateService/CreateCertificate`
//! on the same gRPC port, signing workload CSRs with l4mesh's own [`l4mesh::identity::LocalCa`] for
//! the identities of the workloads served (and any [`Config::allowed_identities`]). The same CA signs
//! the gRPC serving certificate when TLS is on, so one root ([`Handle::root_cert_pem`]) verifies both.
//!
//! Module map:
//! - `state`: the resources served, their content-hash versions, the address index and the log of
//!   recent changes, in persistent maps (pure);
//! - `protocol`: per-stream delta bookkeeping: subscriptions, what the client holds, nonces,
//!   ACK/NACK, the response for a state change, computed from the changed names (pure, unit-tested
//!   without sockets);
//! - `ads`: the tonic service and the per-stream task around `protocol`;
//! - `clients`: the registry of connected and recently disconnected clients and of NACKs;
//! - `ca`: the mesh CA's setup, its signing policy (who may obtain which identity, for how long;
//!   pure) and the tonic `IstioCertificateService`;
//! - `admin`: the axum admin API; `watch`: the file watch; `tls`: the generated root and the
//!   serving certificate;
//! - `server`: [`Handle`], which binds, serves and stops all of the above.
//!
//! Not here: state-of-the-world xDS (`StreamAggregatedResources` answers `UNIMPLEMENTED`), other type
//! URLs, Kubernetes, client certificates (mTLS: a CSR is authorized by the bearer token and the
//! served state, not by the caller's node), CA rotation, and any persistence: the state lives in
//! memory.

mod admin;
mod ads;
mod ca;
mod clients;
mod protocol;
mod server;
mod state;
mod tls;
mod watch;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use l4mesh::identity::CaError;
use l4mesh::localconfig::LocalConfigError;
use l4mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

pub use ca::CaStats;
pub use clients::{ClientInfo, Nack};
pub use protocol::{NackInfo, TypeInfo};
pub use server::Handle;
pub use state::{KindSummary, StateSummary};

/// Where the served state comes from.
#[derive(Clone, Debug)]
pub enum StateSource {
    /// YAML text in the local-config format. An empty (or blank) string is an empty state.
    Yaml(String),
    /// A local-config YAML file, loaded at start and watched: valid edits are pushed to the clients,
    /// invalid ones (and a file that turns blank, most likely mid-write) are logged and the previous
    /// state stays.
    File(PathBuf),
}

/// The trust domain when none is configured.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// The longest validity the CA signs for when none is configured: 24 h, Istio's default.
pub const DEFAULT_MAX_CERT_TTL: Duration = Duration::from_secs(86_400);

/// A plug-in mesh CA (istiod's "plug in your own CA certificates"): a root or intermediate
/// certificate, its private key, and the chain from it up to the root, all PEM.
#[derive(Clone, Default)]
pub struct CaPem {
    /// The CA certificate that signs: a self-signed root, or an intermediate.
    pub cert_pem: String,
    /// The CA's private key (PEM, PKCS#8 or SEC1 EC key).
    pub key_pem: String,
    /// For an intermediate, the certificates above it up to and including the root (it may start
    /// with `cert_pem` itself); empty for a root. The root is what clients must trust
    /// ([`Handle::root_cert_pem`]).
    pub chain_pem: String,
    /// The mesh roots (istiod's `root-cert.pem`), sent as the last element of every certificate
    /// answer: while a root rotates it holds the old and the new root, and a node proxy trusts
    /// both. Empty: the root of the chain alone. It must include that root.
    pub roots_pem: String,
}

impl fmt::Debug for CaPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaPem")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .field("chain_pem", &self.chain_pem)
            .field("roots_pem", &self.roots_pem)
            .finish()
    }
}

/// TLS for the gRPC listener: a serving certificate signed by the server's mesh CA ([`Config::ca`]).
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    /// Extra subject alternative names (DNS names or IPs) for the serving certificate, besides
    /// `localhost`, `istiod.istio-system.svc` and the listen IP (127.0.0.1 and ::1 when the listen IP
    /// is unspecified).
    pub sans: Vec<String>,
}

/// Everything [`Handle::start`] needs.
#[derive(Clone)]
pub struct Config {
    /// The gRPC listener; port 0 picks an ephemeral port ([`Handle::addr`]).
    pub listen: SocketAddr,
    /// The HTTP admin API listener, or `None` for no admin API.
    pub admin_listen: Option<SocketAddr>,
    /// The initial state, and whether to watch a file.
    pub state: StateSource,
    /// TLS on the gRPC listener; `None` serves plaintext.
    pub tls: Option<TlsConfig>,
    /// When set, every xDS stream and every `CreateCertificate` call must carry
    /// `authorization: Bearer <token>`, or is refused with `UNAUTHENTICATED`.
    pub token: Option<String>,
    /// The mesh CA, which signs workload certificates and the serving certificate. `None` generates
    /// a fresh ECDSA P-256 root for this run.
    pub ca: Option<CaPem>,
    /// Where to write the mesh root certificate (PEM) at start, for clients that read it from a file.
    pub root_cert_out: Option<PathBuf>,
    /// The trust domain of the mesh: the CA signs only identities `spiffe://<trust_domain>/...`.
    /// Default [`DEFAULT_TRUST_DOMAIN`].
    pub trust_domain: String,
    /// The longest validity the CA signs for (a request for more, or for 0, gets this). At least one
    /// second. Default [`DEFAULT_MAX_CERT_TTL`].
    pub max_cert_ttl: Duration,
    /// SPIFFE IDs the CA signs for besides those of the served workloads (in the trust domain).
    pub allowed_identities: Vec<String>,
}

impl Config {
    /// Plaintext gRPC and the admin API on ephemeral ports of 127.0.0.1, no token, a generated CA for
    /// `cluster.local` signing for the served workloads for up to 24 h: the usual test setup.
    pub fn new(state: StateSource) -> Self {
        let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 0));
        Self {
            listen: local,
            admin_listen: Some(local),
            state,
            tls: None,
            token: None,
            ca: None,
            root_cert_out: None,
            trust_domain: DEFAULT_TRUST_DOMAIN.to_owned(),
            max_cert_ttl: DEFAULT_MAX_CERT_TTL,
            allowed_identities: Vec::new(),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field("state", &self.state)
            .field("tls", &self.tls)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("root_cert_out", &self.root_cert_out)
            .field("trust_domain", &self.trust_domain)
            .field("max_cert_ttl", &self.max_cert_ttl)
            .field("allowed_identities", &self.allowed_identities)
            .finish()
    }
}

/// The two resource types served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// `istio.workload.Address`: workloads (named by uid) and services (`<namespace>/<hostname>`).
    Address,
    /// `istio.security.Authorization`: policies (`<namespace>/<name>`).
    Authorization,
}

impl Kind {
    /// Both kinds, in a fixed order.
    pub const ALL: [Kind; 2] = [Kind::Address, Kind::Authorization];

    /// The type URL of requests, responses and `Any` values of this kind.
    pub fn type_url(self) -> &'static str {
        match self {
            Kind::Address => ADDRESS_TYPE_URL,
            Kind::Authorization => AUTHORIZATION_TYPE_URL,
        }
    }

    /// The kind of a type URL, if it is one of the two served.
    pub fn from_type_url(type_url: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.type_url() == type_url)
    }

    /// `address` or `authorization`: the spelling of the admin API and of JSON output.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Address => "address",
            Kind::Authorization => "authorization",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Kind {
    type Err = Error;

    /// `address` or `authorization` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Error> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| Error::UnknownKind(s.to_owned()))
    }
}

/// Why the server could not start, or why a state change was refused.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The YAML (or file) is not a valid local config; the message names the entry and the field.
    #[error("{0}")]
    Config(#[from] LocalConfigError),
    /// A listener could not be bound.
    #[error("cannot listen for {what} on {addr}: {error} (is another process using the port?)")]
    Bind {
        /// `gRPC` or `admin`.
        what: &'static str,
        /// The address asked for.
        addr: SocketAddr,
        /// The socket error.
        error: std::io::Error,
    },
    /// The serving certificate could not be made.
    #[error("TLS setup: {0}")]
    Tls(String),
    /// The plug-in CA is unusable (not a CA, key mismatch, broken chain, invalid trust domain).
    #[error("mesh CA: {0}")]
    Ca(#[from] CaError),
    /// A CA setting is invalid, or a root could not be generated.
    #[error("mesh CA setup: {0}")]
    CaSetup(String),
    /// The root certificate could not be written to `--root-cert-out`.
    #[error("cannot write the root certificate to {}: {error}", .path.display())]
    WriteRootCert {
        /// Where it was to be written.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// The state file cannot be watched.
    #[error("cannot watch {}: {reason}", .path.display())]
    Watch {
        /// The state file.
        path: PathBuf,
        /// What failed (missing directory, inotify limits).
        reason: String,
    },
    /// A resource kind other than `address` or `authorization`.
    #[error("unknown resource kind {0:?}: expected `address` or `authorization`")]
    UnknownKind(String),
}
