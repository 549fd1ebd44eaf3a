//! `GET /config_dump`: one JSON document of what l4mesh believes, in ztunnel's shape (the mesh
//! state's `workloads`, `services`, `policies`, `certificates` as [`super::ztunnel_shape`] writes
//! them; `version`; `config`; `staticConfig`; `workloadState` in shared mode) so that tools that
//! read ztunnel's dump read this one, plus l4mesh's own sections: `storeVersion`, `xds` (the
//! control-plane client's status) and `pods`.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};

use super::ztunnel_shape::{CertView, ServiceView, WorkloadView};
use super::{text, AdminState};
use crate::model::Authorization;
use crate::xds::XdsMetrics;

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct ConfigDump<'a> {
    version: BuildInfo,
    /// The store snapshot's version: it grows with every applied update.
    store_version: u64,
    workloads: Vec<WorkloadView<'a>>,
    services: Vec<ServiceView<'a>>,
    policies: Vec<Arc<Authorization>>,
    certificates: Vec<CertsView>,
    config: serde_json::Value,
    /// ztunnel's parsed local file; l4mesh applies its local file into the state above: `null`.
    static_config: Option<()>,
    /// `null` when the mesh state comes from a local file.
    xds: Option<XdsView>,
    /// Shared mode: the pods the CNI agent handed over, by uid, as ztunnel lists them; absent in
    /// dedicated mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    workload_state: Option<BTreeMap<String, PodStateView>>,
    /// Shared mode: the same pods with l4mesh's details; `null` in dedicated mode.
    pods: Option<Vec<crate::inpod::manager::PodEntry>>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct BuildInfo {
    version: &'static str,
    build_profile: &'static str,
}

#[derive(serde::Serialize)]
struct PodStateView {
    /// `Up` (listening) or `Draining`.
    state: &'static str,
    info: PodInfoView,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct PodInfoView {
    name: String,
    namespace: String,
    service_account: String,
}

/// An identity's certificate as ztunnel lists it, with l4mesh's error and expiry beside.
#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct CertsView {
    identity: String,
    /// ztunnel's words: `Initializing`, `Available`, `Unavailable: <why>`.
    state: String,
    cert_chain: Vec<CertView>,
    root_certs: Vec<CertView>,
    error: Option<String>,
    /// RFC 3339, UTC, of the leaf's end of validity.
    expiration_time: Option<String>,
    /// The same, in seconds since the Unix epoch.
    expiry: Option<u64>,
}

#[derive(serde::Serialize)]
#[serde(rename_all = "camelCase")]
struct XdsView {
    connected: bool,
    /// RFC 3339, UTC, of the last applied response; `null` before the first.
    last_update: Option<String>,
    /// Resources held, per type URL.
    resources: BTreeMap<&'static str, usize>,
    /// Responses and their bytes received, per type URL.
    responses: BTreeMap<String, Received>,
    /// Resources rejected (NACKed) since start.
    nacks: u64,
    /// Stream terminations by reason.
    terminations: BTreeMap<&'static str, u64>,
}

#[derive(serde::Serialize)]
struct Received {
    responses: u64,
    bytes: u64,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn xds_view(m: &XdsMetrics) -> XdsView {
    let last = m.last_update.load(Ordering::Relaxed);
    XdsView {
        connected: m.connected.load(Ordering::Relaxed),
        last_update: (last > 0).then(|| rfc3339(last)),
        resources: lock(&m.held).clone(),
        responses: lock(&m.messages)
            .iter()
            .map(|(t, (n, b))| {
                (
                    t.clone(),
                    Received {
                        responses: *n,
                        bytes: *b,
                    },
                )
            })
            .collect(),
        nacks: m.nacks.load(Ordering::Relaxed),
        terminations: lock(&m.terminations).clone(),
    }
}

fn certs_view(c: crate::identity::CertStatus) -> CertsView {
    let views = |ders: &[rustls_pki_types::CertificateDer<'static>]| {
        ders.iter().filter_map(|d| CertView::of(d)).collect()
    };
    let state = match (c.state, &c.error) {
        ("initializing", _) => "Initializing".to_owned(),
        ("available", _) => "Available".to_owned(),
        ("expired", _) => "Unavailable: the certificate expired before its renewal".to_owned(),
        (_, Some(e)) => format!("Unavailable: {e}"),
        (other, None) => format!("Unavailable: {other}"),
    };
    CertsView {
        identity: c.identity,
        state,
        cert_chain: c.cert.as_ref().map_or_else(Vec::new, |w| views(&w.chain)),
        root_certs: c.cert.as_ref().map_or_else(Vec::new, |w| views(&w.roots)),
        error: c.error,
        expiration_time: c.expiry.map(rfc3339),
        expiry: c.expiry,
    }
}

fn answer_dump(state: &AdminState) -> serde_json::Result<Vec<u8>> {
    let snapshot = state.store.load();
    let mut workloads: Vec<_> = snapshot.workloads().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<_> = snapshot.services().collect();
    services.sort_by_key(|s| s.key());
    let mut policies: Vec<_> = snapshot.policies().cloned().collect();
    policies.sort_by_key(|p| p.key());
    let pods = state.pods.as_ref().map(|p| p.pods());
    let dump = ConfigDump {
        version: BuildInfo {
            version: env!("CARGO_PKG_VERSION"),
            build_profile: if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
        },
        store_version: snapshot.version(),
        workloads: workloads.into_iter().map(|w| WorkloadView::of(w)).collect(),
        services: services
            .into_iter()
            .map(|s| ServiceView::of(s, &snapshot))
            .collect(),
        policies,
        certificates: state.secrets.status().into_iter().map(certs_view).collect(),
        config: state.config.clone(),
        static_config: None,
        xds: state.xds.as_deref().map(xds_view),
        workload_state: pods.as_ref().map(|pods| {
            pods.iter()
                .map(|p| {
                    (
                        p.uid.clone(),
                        PodStateView {
                            state: if p.state == "listening" {
                                "Up"
                            } else {
                                "Draining"
                            },
                            info: PodInfoView {
                                name: p.name.clone(),
                                namespace: p.namespace.clone(),
                                service_account: p.service_account.clone(),
                            },
                        },
                    )
                })
                .collect()
        }),
        pods,
    };
    serde_json::to_vec_pretty(&dump)
}

pub(super) fn answer(state: &AdminState) -> Response<Full<Bytes>> {
    match answer_dump(state) {
        Ok(body) => {
            let mut resp = Response::new(Full::new(Bytes::from(body)));
            resp.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("serialising the config dump failed: {e}\n"),
        ),
    }
}

/// Unix seconds → `YYYY-MM-DDThh:mm:ssZ` (proleptic Gregorian, UTC).
pub(super) fn rfc3339(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Days since 1970-01-01 → civil date (H. Hinnant's algorithm), shifted to an era start.
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
