//! `GET /config_dump`: one JSON document of what l4mesh believes, shaped like ztunnel's (the mesh
//! state's `workloads`, `services`, `policies`; `certificates`; `config`) plus `xds`, the
//! control-plane client's status. The model types serialise as they are; this file only adds the
//! views that need shaping (timestamps, counters behind locks).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};

use super::{text, AdminState};
use crate::model::{Authorization, Service, Workload};
use crate::xds::XdsMetrics;

#[derive(serde::Serialize)]
struct ConfigDump {
    version: &'static str,
    /// The store snapshot's version: it grows with every applied update.
    store_version: u64,
    workloads: Vec<Arc<Workload>>,
    services: Vec<Arc<Service>>,
    policies: Vec<Arc<Authorization>>,
    certificates: Vec<CertView>,
    config: serde_json::Value,
    /// `null` when the mesh state comes from a local file.
    xds: Option<XdsView>,
    /// Shared mode: the pods the CNI agent handed over, with their state; `null` in dedicated
    /// mode.
    pods: Option<Vec<crate::inpod::manager::PodEntry>>,
}

#[derive(serde::Serialize)]
struct CertView {
    identity: String,
    /// `initializing`, `available` or `unavailable`.
    state: &'static str,
    error: Option<String>,
    /// RFC 3339, UTC.
    expiration_time: Option<String>,
    /// Seconds since the Unix epoch.
    expiry: Option<u64>,
}

#[derive(serde::Serialize)]
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

fn dump(state: &AdminState) -> ConfigDump {
    let snapshot = state.store.load();
    let mut workloads: Vec<_> = snapshot.workloads().cloned().collect();
    workloads.sort_by(|a, b| a.uid.cmp(&b.uid));
    let mut services: Vec<_> = snapshot.services().cloned().collect();
    services.sort_by_key(|s| s.key());
    let mut policies: Vec<_> = snapshot.policies().cloned().collect();
    policies.sort_by_key(|p| p.key());
    let certificates = state
        .secrets
        .status()
        .into_iter()
        .map(|c| CertView {
            expiration_time: c.expiry.map(rfc3339),
            identity: c.identity,
            state: c.state,
            error: c.error,
            expiry: c.expiry,
        })
        .collect();
    ConfigDump {
        version: env!("CARGO_PKG_VERSION"),
        store_version: snapshot.version(),
        workloads,
        services,
        policies,
        certificates,
        config: state.config.clone(),
        xds: state.xds.as_deref().map(xds_view),
        pods: state.pods.as_ref().map(|p| p.pods()),
    }
}

pub(super) fn answer(state: &AdminState) -> Response<Full<Bytes>> {
    match serde_json::to_vec_pretty(&dump(state)) {
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
