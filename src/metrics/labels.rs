//! The labels of the Istio TCP metrics (wire-facts §7): their values, computed once per
//! connection from the store's names, and the shared key the metric families hold them by.

use std::borrow::Borrow;
use std::fmt::Write as _;
use std::sync::Arc;

use prometheus_client::encoding::{
    EncodeLabelSet, EncodeLabelValue, LabelSetEncoder, LabelValueEncoder,
};

use crate::model::{Service, SpiffeId, Workload};

/// The value of a label nothing is known for (Istio's convention).
pub const UNKNOWN: &str = "unknown";

/// Which end of the connection reports it: Istio counts every connection twice in a mesh, once by
/// the originating proxy and once by the terminating one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reporter {
    /// The proxy of the client (outbound capture and SOCKS5).
    Source,
    /// The proxy of the server (inbound HBONE and inbound plaintext).
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }

    /// The value of the `direction` label of the open-connections gauge.
    pub(super) fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        }
    }
}

impl EncodeLabelValue for Reporter {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.as_str())
    }
}

/// The `response_flags` of `istio_tcp_connections_closed_total`, in ztunnel's vocabulary (its
/// `ResponseFlags`: only these three values), not the Envoy flags of the access log: dashboards
/// built for ztunnel filter on `DENY` and `CONNECT`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ResponseFlag {
    /// `-`: a clean close, and every close of an established connection (resets mid-copy, a
    /// policy change, the drain), as ztunnel records them.
    #[default]
    None,
    /// `DENY`: refused by authorization policy before any byte was relayed.
    Deny,
    /// `CONNECT`: the upstream could not be reached (connect failed, HBONE peer refused, no
    /// healthy upstream).
    Connect,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::Deny => "DENY",
            ResponseFlag::Connect => "CONNECT",
        }
    }
}

impl EncodeLabelValue for ResponseFlag {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.as_str())
    }
}

/// The labels of `istio_tcp_*`, in Istio's names and order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub destination_service: String,
    pub destination_service_namespace: String,
    pub destination_service_name: String,
    pub destination_workload: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_cluster: String,
    pub request_protocol: &'static str,
    /// `-` on the opened and byte counters and for a clean close; on the closed counter of a
    /// connection refused by policy or by its upstream, `DENY` or `CONNECT`.
    pub response_flags: ResponseFlag,
    /// `mutual_tls` on HBONE, else `unknown`.
    pub connection_security_policy: &'static str,
}

/// What one end of a connection is known as.
#[derive(Clone, Copy, Default)]
pub struct Peer<'a> {
    /// The workload found in the store, if any.
    pub workload: Option<&'a Workload>,
    /// The identity proven over mutual TLS (or presented, on the originating side).
    pub principal: Option<&'a SpiffeId>,
}

/// The workload's `workload_name`, else its own name (istiod always fills the former; a local
/// config may not).
fn workload_name(w: &Workload) -> &str {
    if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    }
}

fn or_unknown(s: &str) -> String {
    if s.is_empty() {
        UNKNOWN.to_owned()
    } else {
        s.to_owned()
    }
}

impl TrafficLabels {
    /// The labels of one connection. As ztunnel: `*_workload` is the workload's `workload_name`
    /// (its Deployment, not the pod; the pod's name when none is given, as istiod names bare
    /// pods), `*_app`/`*_canonical_service` its canonical name, `*_version`/`*_canonical_revision`
    /// its canonical revision; the source principal is only what mutual TLS proves (or presents),
    /// the destination principal the destination workload's identity. Empty values become
    /// `unknown`.
    pub fn new(
        reporter: Reporter,
        src: Peer<'_>,
        dst: Option<&Workload>,
        service: Option<&Service>,
        mtls: bool,
    ) -> Self {
        let s = src.workload;
        let field = |w: Option<&Workload>, f: fn(&Workload) -> &str| {
            or_unknown(w.map(f).unwrap_or_default())
        };
        let svc = |f: fn(&Service) -> &str| or_unknown(service.map(f).unwrap_or_default());
        Self {
            reporter,
            source_workload: field(s, workload_name),
            source_canonical_service: field(s, |w| &w.canonical_name),
            source_canonical_revision: field(s, |w| &w.canonical_revision),
            source_workload_namespace: field(s, |w| &w.namespace),
            source_principal: src
                .principal
                .map_or_else(|| UNKNOWN.to_owned(), ToString::to_string),
            source_app: field(s, |w| &w.canonical_name),
            source_version: field(s, |w| &w.canonical_revision),
            source_cluster: field(s, |w| &w.cluster_id),
            destination_service: svc(|s| &s.hostname),
            destination_service_namespace: svc(|s| &s.namespace),
            destination_service_name: svc(|s| &s.name),
            destination_workload: field(dst, workload_name),
            destination_canonical_service: field(dst, |w| &w.canonical_name),
            destination_canonical_revision: field(dst, |w| &w.canonical_revision),
            destination_workload_namespace: field(dst, |w| &w.namespace),
            // The workload's SPIFFE id, formatted as `SpiffeId` displays it, without building
            // one (three Strings) first.
            destination_principal: dst.map_or_else(
                || UNKNOWN.to_owned(),
                |w| {
                    format!(
                        "spiffe://{}/ns/{}/sa/{}",
                        w.trust_domain, w.namespace, w.service_account
                    )
                },
            ),
            destination_app: field(dst, |w| &w.canonical_name),
            destination_version: field(dst, |w| &w.canonical_revision),
            destination_cluster: field(dst, |w| &w.cluster_id),
            request_protocol: "tcp",
            response_flags: ResponseFlag::None,
            connection_security_policy: if mtls { "mutual_tls" } else { UNKNOWN },
        }
    }
}

/// One label set as the metric families key it: an `Arc`, so that the four Istio families and
/// every open connection with these labels share one copy (hash and equality are the labels').
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct LabelKey(pub Arc<TrafficLabels>);

impl EncodeLabelSet for LabelKey {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        self.0.encode(encoder)
    }
}

impl Borrow<TrafficLabels> for LabelKey {
    fn borrow(&self) -> &TrafficLabels {
        &self.0
    }
}
