//! The mesh CA: set up once from a plug-in CA or a generated root (the one CA behind workload
//! certificates and the serving certificate), the policy deciding whether a `CreateCertificate`
//! request is signed and for how long, and the tonic `IstioCertificateService` around them.
//!
//! Policy, checked in this order:
//! 1. the bearer token, as for xDS (`UNAUTHENTICATED`);
//! 2. the CSR parses, with a valid signature, and has exactly one SAN: a URI that is a SPIFFE ID
//!    (`INVALID_ARGUMENT`, as is an `ImpersonatedIdentity` that is not a string or not a SPIFFE ID);
//! 3. that identity is in the trust domain, equals the request metadata's `ImpersonatedIdentity`
//!    when there is one, and is the identity of a workload in the served state or an allowed
//!    identity (`PERMISSION_DENIED`, naming the identity and the rule).
//!
//! The validity is the requested number of seconds, or the maximum when 0 or negative, capped at
//! the maximum. Signing is l4mesh's [`LocalCa::sign_csr`]: the chain is leaf first, root last.
//!
//! Cost: the served identities are computed with l4mesh's model conversion (so defaults, such as
//! `cluster.local` and the `default` service account, are l4mesh's) once per state change, on the
//! first request after it: O(workloads); then a request costs O(log identities) and one signature.
//!
//! Not here: the signing itself (`l4mesh::identity`), the serving certificate (`tls`), any caller
//! identity beyond the token (no mTLS: a token holder may ask for any served identity).

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use l4mesh::identity::{CaError, LocalCa};
use l4mesh::model::{Resource, SpiffeId};
use l4mesh::proto::istio::ca::istio_certificate_service_server::IstioCertificateService;
use l4mesh::proto::istio::ca::{IstioCertificateRequest, IstioCertificateResponse};
use l4mesh::proto::istio::workload as pw;
use prost::Message;
use prost_types::value::Kind as ValueKind;
use rcgen::{CertificateSigningRequestParams, SanType};
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::ads::check_token;
use crate::server::Shared;
use crate::state::{Origin, State};
use crate::{tls, CaPem, Config, Error, Kind};

/// The request metadata key naming the identity a node proxy asks for on a workload's behalf.
pub(crate) const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// How many served identities a refusal lists.
const LISTED: usize = 8;

/// What the CA did so far: for tests ([`crate::Handle::ca_stats`]) and `GET /ca`.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CaStats {
    /// Certificates signed.
    pub issued: u64,
    /// Requests refused, whatever the reason (token, CSR, identity, signing).
    pub refused: u64,
    /// The latest refusal: `<gRPC code>: <message>`.
    pub last_refusal: Option<String>,
}

/// The `GET /ca` answer.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct CaInfo {
    trust_domain: String,
    max_cert_ttl_secs: u64,
    /// Whether the CA came from `Config::ca` (else it was generated at start).
    plugged_in: bool,
    allowed_identities: Vec<String>,
    #[serde(flatten)]
    stats: CaStats,
    root_cert_pem: String,
}

/// The CA, its policy settings and its counters.
pub(crate) struct MeshCa {
    ca: LocalCa,
    /// What every answer ends with: the CA's root, or the configured roots (which include it).
    roots_pem: String,
    max_ttl: Duration,
    allowed: BTreeSet<SpiffeId>,
    plugged_in: bool,
    stats: Mutex<CaStats>,
    /// The identities of the served workloads, for the state of that id.
    served: Mutex<Option<(u64, Arc<BTreeSet<SpiffeId>>)>>,
}

impl MeshCa {
    /// Loads `config.ca` (checked by `LocalCa::from_pem`) or generates a root, checks the other CA
    /// settings, and writes the root to `config.root_cert_out`. Also returns the CA's PEM, for the
    /// serving certificate.
    pub fn setup(config: &Config) -> Result<(MeshCa, CaPem), Error> {
        if config.max_cert_ttl < Duration::from_secs(1) {
            return Err(Error::CaSetup(format!(
                "the maximum certificate validity is {:?}: expected at least one second",
                config.max_cert_ttl
            )));
        }
        let td = config.trust_domain.as_str();
        let pem = match &config.ca {
            Some(pem) => pem.clone(),
            None => tls::generate_root(td)?,
        };
        let ca = LocalCa::from_pem(&pem.cert_pem, &pem.key_pem, &pem.chain_pem, td)?;
        let roots_pem = mesh_roots(&ca, &pem.roots_pem)?;
        let allowed = config
            .allowed_identities
            .iter()
            .map(|s| allowed_identity(s, td))
            .collect::<Result<_, _>>()?;
        if let Some(path) = &config.root_cert_out {
            std::fs::write(path, &roots_pem).map_err(|error| Error::WriteRootCert {
                path: path.clone(),
                error,
            })?;
        }
        let mesh = MeshCa {
            ca,
            roots_pem,
            max_ttl: config.max_cert_ttl,
            allowed,
            plugged_in: config.ca.is_some(),
            stats: Mutex::default(),
            served: Mutex::default(),
        };
        Ok((mesh, pem))
    }

    /// The mesh roots (PEM): the root every certificate of this CA chains to, and any other root
    /// configured beside it.
    pub fn root_pem(&self) -> String {
        self.roots_pem.clone()
    }

    /// The root, DER.
    pub fn root_der(&self) -> Vec<u8> {
        self.ca
            .roots()
            .first()
            .map(|r| r.to_vec())
            .unwrap_or_default()
    }

    pub fn trust_domain(&self) -> &str {
        self.ca.trust_domain()
    }

    pub fn plugged_in(&self) -> bool {
        self.plugged_in
    }

    fn stats_mut(&self) -> MutexGuard<'_, CaStats> {
        // Poisoning is ignored: plain counters.
        self.stats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn stats(&self) -> CaStats {
        self.stats_mut().clone()
    }

    pub fn info(&self) -> CaInfo {
        CaInfo {
            trust_domain: self.trust_domain().to_owned(),
            max_cert_ttl_secs: self.max_ttl.as_secs(),
            plugged_in: self.plugged_in,
            allowed_identities: self.allowed.iter().map(ToString::to_string).collect(),
            stats: self.stats(),
            root_cert_pem: self.root_pem(),
        }
    }

    /// The identities of the workloads of `state`, computed once per state.
    fn served(&self, state: &State) -> Arc<BTreeSet<SpiffeId>> {
        let mut cache = self.served.lock().unwrap_or_else(|p| p.into_inner());
        match &*cache {
            Some((id, ids)) if *id == state.id() => ids.clone(),
            _ => {
                let ids = Arc::new(served_identities(state));
                *cache = Some((state.id(), ids.clone()));
                ids
            }
        }
    }

    /// Decides on a request (the token aside): the identity and validity to sign for, or why not.
    pub fn authorize(
        &self,
        req: &IstioCertificateRequest,
        state: &State,
    ) -> Result<(SpiffeId, Duration), Status> {
        let id = csr_identity(&req.csr).map_err(Status::invalid_argument)?;
        if id.trust_domain != self.trust_domain() {
            return Err(Status::permission_denied(format!(
                "{id} is not in this CA's trust domain {:?}",
                self.trust_domain()
            )));
        }
        if let Some(imp) = impersonated(req.metadata.as_ref()).map_err(Status::invalid_argument)? {
            if imp != id {
                return Err(Status::permission_denied(format!(
                    "the CSR asks for {id} but the request metadata's {IMPERSONATED_IDENTITY} is \
                     {imp}: a certificate is issued only for the identity impersonated"
                )));
            }
        }
        let served = self.served(state);
        if !served.contains(&id) && !self.allowed.contains(&id) {
            return Err(Status::permission_denied(not_allowed(&id, &served)));
        }
        Ok((id, validity(req.validity_duration, self.max_ttl)))
    }

    /// Signs an authorized CSR: the PEM chain, leaf first, the mesh roots last.
    pub fn sign(&self, csr: &str, id: &SpiffeId, ttl: Duration) -> Result<Vec<String>, Status> {
        let mut chain = self.ca.sign_csr(csr, id, ttl).map_err(|e| match e {
            CaError::Csr(_) | CaError::CsrIdentity { .. } => {
                Status::invalid_argument(e.to_string())
            }
            e => Status::internal(format!("signing a certificate for {id} failed: {e}")),
        })?;
        if let Some(root) = chain.last_mut() {
            root.clone_from(&self.roots_pem);
        }
        Ok(chain)
    }

    fn record_issue(&self) {
        self.stats_mut().issued += 1;
    }

    fn record_refusal(&self, status: &Status) {
        let mut stats = self.stats_mut();
        stats.refused += 1;
        stats.last_refusal = Some(format!("{:?}: {}", status.code(), status.message()));
    }
}

/// The configured mesh roots (PEM), checked to hold only certificates and the CA's own root; or
/// that root alone when none are configured.
fn mesh_roots(ca: &LocalCa, configured: &str) -> Result<String, Error> {
    if configured.trim().is_empty() {
        return Ok(ca.root_pem());
    }
    let roots = l4mesh::identity::pem_certs(configured)
        .map_err(|e| Error::CaSetup(format!("the mesh roots (root-cert.pem): {e}")))?;
    if !ca.roots().iter().all(|r| roots.contains(r)) {
        return Err(Error::CaSetup(format!(
            "the mesh roots (root-cert.pem, {} certificate(s)) do not include the root of the CA's \
             chain: every certificate the CA signs would be untrusted",
            roots.len()
        )));
    }
    Ok(configured.trim().to_owned() + "\n")
}

/// An `allowed_identities` entry: a SPIFFE ID in the trust domain.
fn allowed_identity(s: &str, trust_domain: &str) -> Result<SpiffeId, Error> {
    let id: SpiffeId = s
        .trim()
        .parse()
        .map_err(|e| Error::CaSetup(format!("allowed identity: {e}")))?;
    if id.trust_domain != trust_domain {
        return Err(Error::CaSetup(format!(
            "allowed identity {id} is not in the trust domain {trust_domain:?}: it could never be \
             signed"
        )));
    }
    Ok(id)
}

/// The identity of every workload served (raw values excepted), as l4mesh computes it.
pub(crate) fn served_identities(state: &State) -> BTreeSet<SpiffeId> {
    state
        .entries(Kind::Address)
        .filter(|e| e.origin == Origin::Workload)
        .filter_map(|e| pw::Address::decode(&e.value[..]).ok())
        .filter_map(|a| match Resource::try_from(a) {
            Ok(Resource::Workload(w)) => Some(w.identity()),
            _ => None,
        })
        .collect()
}

/// The validity to sign for: the requested seconds, the maximum when 0 or negative, at most the
/// maximum.
pub(crate) fn validity(requested_secs: i64, max: Duration) -> Duration {
    match u64::try_from(requested_secs) {
        Ok(secs) if secs > 0 => Duration::from_secs(secs).min(max),
        _ => max,
    }
}

/// The SPIFFE ID a CSR asks for: its one SAN, a URI.
pub(crate) fn csr_identity(csr_pem: &str) -> Result<SpiffeId, String> {
    if csr_pem.trim().is_empty() {
        return Err("the request has no CSR: expected a PEM CERTIFICATE REQUEST".to_owned());
    }
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| {
        format!("the CSR is not a PEM CERTIFICATE REQUEST with a valid signature: {e}")
    })?;
    match csr.params.subject_alt_names.as_slice() {
        [SanType::URI(uri)] => uri
            .as_str()
            .parse()
            .map_err(|e| format!("the CSR's URI SAN is not an Istio identity: {e}")),
        sans => Err(format!(
            "the CSR has the subject alternative names [{}]: expected exactly one, the SPIFFE ID \
             as a URI",
            sans.iter().map(describe_san).collect::<Vec<_>>().join(", ")
        )),
    }
}

fn describe_san(san: &SanType) -> String {
    match san {
        SanType::URI(uri) => format!("URI:{}", uri.as_str()),
        SanType::DnsName(dns) => format!("DNS:{}", dns.as_str()),
        SanType::IpAddress(ip) => format!("IP:{ip}"),
        other => format!("{other:?}"),
    }
}

/// The `ImpersonatedIdentity` of the request metadata, if any.
pub(crate) fn impersonated(
    metadata: Option<&prost_types::Struct>,
) -> Result<Option<SpiffeId>, String> {
    let Some(value) = metadata.and_then(|m| m.fields.get(IMPERSONATED_IDENTITY)) else {
        return Ok(None);
    };
    match &value.kind {
        Some(ValueKind::StringValue(s)) => s
            .parse()
            .map(Some)
            .map_err(|e| format!("request metadata {IMPERSONATED_IDENTITY}: {e}")),
        other => Err(format!(
            "request metadata {IMPERSONATED_IDENTITY}: expected a string (a SPIFFE ID), found \
             {other:?}"
        )),
    }
}

/// Why `id` is refused although in the trust domain.
fn not_allowed(id: &SpiffeId, served: &BTreeSet<SpiffeId>) -> String {
    let mut listed: Vec<String> = served
        .iter()
        .take(LISTED)
        .map(ToString::to_string)
        .collect();
    if served.len() > LISTED {
        listed.push(format!("and {} more", served.len() - LISTED));
    }
    format!(
        "{id} is not allowed: no served workload has this identity (namespace {:?}, service \
         account {:?}), and it is not an allowed identity (--allow-identity); served identities: \
         [{}]",
        id.namespace,
        id.service_account,
        listed.join(", ")
    )
}

/// The gRPC service.
pub(crate) struct CaService {
    shared: Arc<Shared>,
}

impl CaService {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }

    fn answer(&self, request: &Request<IstioCertificateRequest>) -> Result<Issued, Status> {
        check_token(self.shared.token.as_deref(), request.metadata())?;
        let req = request.get_ref();
        let ca = &self.shared.ca;
        let (id, ttl) = ca.authorize(req, &self.shared.current_state())?;
        let chain = ca.sign(&req.csr, &id, ttl)?;
        Ok(Issued { id, ttl, chain })
    }
}

struct Issued {
    id: SpiffeId,
    ttl: Duration,
    chain: Vec<String>,
}

#[tonic::async_trait]
impl IstioCertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let peer = request.remote_addr();
        let ca = &self.shared.ca;
        match self.answer(&request) {
            Ok(Issued { id, ttl, chain }) => {
                ca.record_issue();
                info!(peer = ?peer, identity = %id, ttl_secs = ttl.as_secs(), "issued a certificate");
                Ok(Response::new(IstioCertificateResponse {
                    cert_chain: chain,
                }))
            }
            Err(status) => {
                ca.record_refusal(&status);
                warn!(
                    peer = ?peer,
                    code = ?status.code(),
                    "refused a certificate request: {}",
                    status.message()
                );
                Err(status)
            }
        }
    }
}
