//! Where certificates come from: Istio's CA (`IstioCertificateService/CreateCertificate` on istiod
//! or xds-testserver) or an in-process [`LocalCa`] for local mode.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;

use super::cert::{pem_certs, CertError, WorkloadCert};
use super::local_ca::{csr_for, workload_cert_from_chain, CaError, LocalCa};
use crate::control_plane::{self, ChannelError, RootCa};
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
    #[error("the CA at {address} returned an unusable certificate for {identity}: {source}")]
    BadCertificate {
        address: String,
        identity: SpiffeId,
        #[source]
        source: CertError,
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
    Istio(IstioCaSettings),
    /// Self-signed, in-process (`FAKE_CA`, local mode).
    Local {
        ca: Arc<LocalCa>,
        ttl: Duration,
    },
}

impl std::fmt::Debug for CaClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CaClient::Istio(s) => write!(f, "IstioCa({})", s.address),
            CaClient::Local { ttl, .. } => write!(f, "LocalCa(ttl {ttl:?})"),
        }
    }
}

impl CaClient {
    /// Obtains a fresh certificate for `id`.
    pub async fn fetch(&self, id: &SpiffeId) -> Result<WorkloadCert, FetchError> {
        match self {
            CaClient::Local { ca, ttl } => Ok(ca.issue(id, *ttl)?),
            CaClient::Istio(s) => match tokio::time::timeout(s.timeout, fetch_istio(s, id)).await {
                Ok(r) => r,
                Err(_) => Err(FetchError::Timeout {
                    address: s.address.clone(),
                    identity: id.clone(),
                    after: s.timeout,
                }),
            },
        }
    }
}

async fn fetch_istio(s: &IstioCaSettings, id: &SpiffeId) -> Result<WorkloadCert, FetchError> {
    let channel = control_plane::connect(&s.address, s.root_ca.as_ref(), s.packet_mark).await?;
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
    let bad = |source| FetchError::BadCertificate {
        address: s.address.clone(),
        identity: id.clone(),
        source,
    };
    let roots = mesh_roots(s.root_ca.as_ref(), &resp.cert_chain).map_err(bad)?;
    workload_cert_from_chain(id, &resp.cert_chain, key, roots).map_err(bad)
}

/// The roots a returned chain must verify against: the configured root when it is a PEM we hold,
/// else the last certificate of the chain (Istio sends its root last).
fn mesh_roots(
    configured: Option<&RootCa>,
    chain: &[String],
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    match configured {
        Some(RootCa::Pem(pem)) => pem_certs(pem),
        Some(RootCa::File(path)) => {
            let pem = std::fs::read_to_string(path)
                .map_err(|e| CertError::Parse(format!("{}: {e}", path.display())))?;
            pem_certs(&pem)
        }
        None | Some(RootCa::System) => {
            let last = chain.last().ok_or(CertError::EmptyChain)?;
            pem_certs(last)
        }
    }
}
