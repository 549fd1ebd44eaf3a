//! Where certificates come from: Istio's CA (`IstioCertificateService/CreateCertificate` on istiod
//! or xds-testserver) or an in-process [`LocalCa`] for local mode.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;

use super::cert::{pem_certs, CertError, WorkloadCert};
use super::local_ca::{csr_for, workload_cert_from_chain, CaError, LocalCa};
use crate::control_plane::{self, ChannelError, LoadedRoot, RootCa};
use crate::model::SpiffeId;
use crate::proto::istio::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::istio::ca::IstioCertificateRequest;

/// How to reach Istio's CA.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct IstioCaSettings {
    /// `https://istiod.istio-system.svc:15012`, or `http://…` for a local xds-testserver.
    pub address: String,
    /// Trust root for the CA server's certificate, and the mesh root certificates must chain to.
    pub root_ca: Option<RootCa>,
    pub auth_token: Option<PathBuf>,
    pub cluster_id: String,
    /// Requested validity (`SECRET_TTL`).
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub ttl: Duration,
    /// This proxy's own identity: requests for any other identity carry `ImpersonatedIdentity`.
    pub own_identity: Option<SpiffeId>,
    /// `SO_MARK` of the connections to the CA (`PACKET_MARK`, set by `app` from the config; 0 =
    /// none), so that a captured pod does not redirect them.
    #[serde(skip)]
    pub packet_mark: u32,
    /// How long one `CreateCertificate` call (connect, TLS, answer) may take: a CA that accepts
    /// the call and never answers must not stall renewal.
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub timeout: Duration,
}

/// The default of [`IstioCaSettings::timeout`].
pub const DEFAULT_CA_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("the CA at {address} refused to sign for {identity}: {status} (is AUTH_TOKEN valid, and is this proxy allowed to ask for that identity?)")]
    Refused {
        address: String,
        identity: SpiffeId,
        status: Box<tonic::Status>,
    },
    #[error("the CA at {address} returned an unusable certificate for {identity}: {error}")]
    BadCertificate {
        address: String,
        identity: SpiffeId,
        error: CertError,
    },
    #[error("the CA at {address} did not answer the request for {identity} within {after:?} (is istiod overloaded or unreachable?)")]
    Timeout {
        address: String,
        identity: SpiffeId,
        after: Duration,
    },
    #[error("local CA: {0}")]
    Local(#[from] CaError),
}

/// A certificate authority l4mesh can ask.
#[derive(Clone)]
pub enum CaClient {
    Istio(Arc<IstioCa>),
    /// Self-signed, in-process (`FAKE_CA`, local mode).
    Local {
        ca: Arc<LocalCa>,
        ttl: Duration,
    },
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaClient::Istio(ca) => write!(f, "IstioCa({})", ca.settings.address),
            CaClient::Local { ttl, .. } => write!(f, "LocalCa(ttl {ttl:?})"),
        }
    }
}

impl CaClient {
    /// Istio's CA at `settings.address`, its channel opened at the first request.
    pub fn istio(settings: IstioCaSettings) -> CaClient {
        CaClient::Istio(Arc::new(IstioCa {
            settings,
            channel: tokio::sync::Mutex::new(None),
            opened: std::sync::atomic::AtomicU64::new(0),
        }))
    }

    /// Obtains a fresh certificate for `id`.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<WorkloadCert, FetchError> {
        match self {
            CaClient::Local { ca, ttl } => Ok(ca.issue(id, *ttl)?),
            CaClient::Istio(ca) => {
                let s = &ca.settings;
                let mut used = None;
                let answer = match tokio::time::timeout(s.timeout, ca.fetch(id, &mut used)).await {
                    Ok(answer) => answer,
                    Err(_) => Err(FetchError::Timeout {
                        address: s.address.clone(),
                        identity: id.clone(),
                        after: s.timeout,
                    }),
                };
                if answer.as_ref().is_err_and(FetchError::unreachable) {
                    // The next request reconnects (and resolves the address) afresh, unless
                    // another one already did.
                    let mut cached = ca.channel.lock().await;
                    if used.is_some() && cached.as_ref().map(|c| c.2) == used {
                        *cached = None;
                    }
                }
                answer
            }
        }
    }
}

/// Istio's CA with the one gRPC channel every request shares: renewals of many identities at once
/// ride one HTTP/2 connection instead of a TCP and TLS handshake each.
pub struct IstioCa {
    settings: IstioCaSettings,
    /// The channel, the root it verifies the CA with, and which opening it is; reopened when
    /// the root file's content changes (the CA's serving certificate follows a root rotation) or
    /// the CA was unreachable through it.
    channel: tokio::sync::Mutex<Option<(LoadedRoot, Channel, u64)>>,
    /// Channels opened so far.
    opened: std::sync::atomic::AtomicU64,
}

impl FetchError {
    /// Whether the channel itself failed (connect, TLS, a dead connection, no answer), as opposed
    /// to the CA answering: then it is opened anew for the next request.
    fn unreachable(&self) -> bool {
        match self {
            FetchError::Channel(_) | FetchError::Timeout { .. } => true,
            FetchError::Refused { status, .. } => matches!(
                status.code(),
                tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Internal
            ),
            FetchError::BadCertificate { .. } | FetchError::Local(_) => false,
        }
    }
}

impl IstioCa {
    /// The shared channel and which opening it is, opened (again) if there is none or the root
    /// it was opened with is no longer the configured one.
    async fn channel(&self) -> Result<(Channel, u64), ChannelError> {
        let s = &self.settings;
        let root = LoadedRoot::read(s.root_ca.as_ref()).await?;
        let mut cached = self.channel.lock().await;
        if let Some((used, channel, n)) = cached.as_ref() {
            if *used == root {
                return Ok((channel.clone(), *n));
            }
            tracing::info!(address = %s.address, "the CA's root certificate changed; reconnecting with the new one");
        }
        let channel = control_plane::connect_loaded(&s.address, &root, s.packet_mark).await?;
        let n = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *cached = Some((root, channel.clone(), n));
        Ok((channel, n))
    }

    /// One request; `used` says which channel opening carried it.
    async fn fetch(
        &self,
        id: &SpiffeId,
        used: &mut Option<u64>,
    ) -> Result<WorkloadCert, FetchError> {
        let s = &self.settings;
        let (channel, n) = self.channel().await?;
        *used = Some(n);
        let (csr, key) = csr_for(id)?;
        let metadata = (s.own_identity.as_ref() != Some(id)).then(|| {
            use prost_types::{value::Kind, Struct, Value};
            let mut fields = std::collections::BTreeMap::new();
            fields.insert(
                "ImpersonatedIdentity".to_owned(),
                Value {
                    kind: Some(Kind::StringValue(id.to_string())),
                },
            );
            Struct { fields }
        });
        let mut req = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(s.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        control_plane::add_credentials(&mut req, s.auth_token.as_deref(), &s.cluster_id);
        let resp = IstioCertificateServiceClient::new(channel)
            .create_certificate(req)
            .await
            .map_err(|status| FetchError::Refused {
                address: s.address.clone(),
                identity: id.clone(),
                status: Box::new(status),
            })?
            .into_inner();
        let bad = |error| FetchError::BadCertificate {
            address: s.address.clone(),
            identity: id.clone(),
            error,
        };
        let roots = mesh_roots(&resp.cert_chain).map_err(bad)?;
        workload_cert_from_chain(id, &resp.cert_chain, key, roots).map_err(bad)
    }
}

/// The mesh roots, as ztunnel takes them: every certificate of the chain's last element (Istio
/// sends its root last, and while a root rotates that element holds the old and the new root).
/// The CA's own root (`CA_ROOT_CA`) only verifies the CA's serving certificate.
fn mesh_roots(chain: &[String]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    match chain {
        [] => Err(CertError::EmptyChain),
        [_leaf] => Err(CertError::NoRoot),
        [.., roots] => pem_certs(roots),
    }
}
