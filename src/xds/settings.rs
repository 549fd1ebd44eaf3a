//! How to reach the control plane and identify to it: the part of the configuration the xDS client
//! owns (`config` builds it from flags and environment).

use std::path::PathBuf;

pub use crate::control_plane::RootCa;
use std::time::Duration;

/// How to reach and identify to the control plane.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct XdsSettings {
    /// `https://host:port` (TLS) or `http://host:port` (plaintext, for local use).
    pub address: String,
    /// Trust root for an `https` address; `None` means the system store.
    pub root_ca: Option<RootCa>,
    /// Service-account token file sent as `authorization: Bearer`, re-read on every connect.
    pub auth_token: Option<PathBuf>,
    /// Node id and metadata istiod expects (`ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`).
    pub pod_name: String,
    pub pod_namespace: String,
    pub instance_ip: String,
    /// `ISTIO_META_<KEY>` variables, as `<KEY>` → value.
    pub meta: std::collections::BTreeMap<String, String>,
    /// Subscribe to addresses on demand instead of receiving them all.
    pub on_demand: bool,
    /// How long a connection to an unknown IP waits for an on-demand answer.
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub on_demand_timeout: Duration,
    /// `SO_MARK` of the connections to the control plane (`PACKET_MARK`, set by `app` from the
    /// config; 0 = none), so that a captured pod does not redirect them.
    #[serde(skip)]
    pub packet_mark: u32,
}

impl XdsSettings {
    /// Settings for a plaintext local control plane, for tests.
    pub fn plaintext(address: &str) -> Self {
        Self {
            address: address.to_owned(),
            root_ca: None,
            auth_token: None,
            pod_name: "l4mesh".into(),
            pod_namespace: "istio-system".into(),
            instance_ip: "127.0.0.1".into(),
            meta: Default::default(),
            on_demand: false,
            on_demand_timeout: Duration::from_secs(2),
            packet_mark: 0,
        }
    }
}
