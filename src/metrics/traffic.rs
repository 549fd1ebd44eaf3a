//! The Istio TCP metrics (wire-facts §7) and the other counters the data path touches.
//!
//! A connection's labels are computed once, when its destination is known ([`Traffic::open`]),
//! and reused at close; no label is computed or looked up per byte. Bytes are added as they move
//! through a [`Meter`] (two counter handles fetched once; one atomic add per chunk copied), so a
//! long-lived connection's bytes show while it lasts. Every label value is a name from the store
//! (workload, namespace, service, identity) or a fixed word: no ports, addresses or connection ids,
//! so the number of series is bounded by the mesh's size, not by its traffic.
//!
//! Depends only on `model`, so that `proxy` can use it; the registry, the collectors and the HTTP
//! server live in the parent module, above `proxy`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

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
    fn direction(self) -> &'static str {
        match self {
            Reporter::Source => "outbound",
            Reporter::Destination => "inbound",
        }
    }
}

/// The labels of `istio_tcp_*`, in Istio's names and order.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TrafficLabels {
    pub reporter: &'static str,
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
    /// `-` on the opened and byte counters and for a clean close; on the closed counter of a failed
    /// connection, the access log's flag (`RBAC`, `UF`, `DC`…).
    pub response_flags: &'static str,
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
    /// (its Deployment, not the pod; the pod's name when none is given, as istiod names bare pods), `*_app`/`*_canonical_service` its canonical name,
    /// `*_version`/`*_canonical_revision` its canonical revision; the source principal is only
    /// what mutual TLS proves (or presents), the destination principal the destination
    /// workload's identity. Empty values become `unknown`.
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
            reporter: reporter.as_str(),
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
            destination_principal: dst
                .map_or_else(|| UNKNOWN.to_owned(), |w| w.identity().to_string()),
            destination_app: field(dst, |w| &w.canonical_name),
            destination_version: field(dst, |w| &w.canonical_revision),
            destination_cluster: field(dst, |w| &w.cluster_id),
            request_protocol: "tcp",
            response_flags: "-",
            connection_security_policy: if mtls { "mutual_tls" } else { UNKNOWN },
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResultLabel {
    pub result: &'static str,
}

/// The metric handles the data path updates; one per l4mesh (never global: several l4mesh may run
/// in one process, each counting alone).
#[derive(Default, Debug)]
pub struct Traffic {
    pub(super) opened: Family<TrafficLabels, Counter>,
    pub(super) closed: Family<TrafficLabels, Counter>,
    /// Istio's direction: bytes the server sent back (upstream → downstream).
    pub(super) sent: Family<TrafficLabels, Counter>,
    /// Istio's direction: bytes the client sent (downstream → upstream).
    pub(super) received: Family<TrafficLabels, Counter>,
    pub(super) open: Family<DirectionLabel, Gauge>,
    pub(super) rbac: Family<ResultLabel, Counter>,
}

impl Traffic {
    /// Counts a connection as opened with `labels`; the returned record counts its close.
    /// Every handle the connection needs later is fetched here, so that the close costs one more
    /// lookup (the closed counter, whose labels carry the outcome) and the bytes none.
    pub fn open(self: &Arc<Self>, labels: TrafficLabels) -> ConnMetrics {
        let reporter = if labels.reporter == Reporter::Source.as_str() {
            Reporter::Source
        } else {
            Reporter::Destination
        };
        self.opened.get_or_create(&labels).inc();
        let open = self
            .open
            .get_or_create(&DirectionLabel {
                direction: reporter.direction(),
            })
            .clone();
        open.inc();
        let bytes = Meter {
            client: Some(self.received.get_or_create(&labels).clone()),
            server: Some(self.sent.get_or_create(&labels).clone()),
        };
        ConnMetrics {
            traffic: self.clone(),
            open,
            bytes,
            labels,
            closed: AtomicBool::new(false),
            metered: AtomicBool::new(false),
        }
    }

    /// Counts one authorization decision on an inbound connection.
    pub fn rbac_decision(&self, allowed: bool) {
        let result = if allowed { "allow" } else { "deny" };
        self.rbac.get_or_create(&ResultLabel { result }).inc();
    }
}

/// Live byte counters the copy loop adds to as bytes move (one relaxed atomic add per chunk), so
/// that a long-lived connection's bytes show while it lasts. Empty (counting nothing) by default.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    client: Option<Counter>,
    server: Option<Counter>,
}

impl Meter {
    /// `n` bytes went client → server (downstream → upstream).
    #[inline]
    pub fn client_bytes(&self, n: u64) {
        if let Some(c) = &self.client {
            c.inc_by(n);
        }
    }

    /// `n` bytes went server → client (upstream → downstream).
    #[inline]
    pub fn server_bytes(&self, n: u64) {
        if let Some(c) = &self.server {
            c.inc_by(n);
        }
    }
}

/// One open connection's metrics: counted closed (with its bytes) by [`ConnMetrics::close`], or
/// on drop if the handler never got there (its task was aborted).
#[derive(Debug)]
pub struct ConnMetrics {
    traffic: Arc<Traffic>,
    /// This direction's open-connections gauge.
    open: Gauge,
    /// The byte counters of `labels`.
    bytes: Meter,
    labels: TrafficLabels,
    closed: AtomicBool,
    /// Whether a [`Meter`] counts the bytes live (then the close adds none).
    metered: AtomicBool,
}

impl ConnMetrics {
    pub fn labels(&self) -> &TrafficLabels {
        &self.labels
    }

    /// The byte counters of this connection's labels, for the copy loop to add to as it goes. As
    /// in ztunnel, live bytes are counted under the labels known at open (`response_flags="-"`);
    /// the close then adds only the closed count.
    pub fn meter(&self) -> Meter {
        self.metered.store(true, Ordering::Release);
        self.bytes.clone()
    }

    /// Counts the close once: `client_bytes` went downstream → upstream, `server_bytes` back
    /// (added here unless a [`Meter`] counted them already); `flag` is the access log's response
    /// flag (`-` when it went well).
    pub fn close(&self, client_bytes: u64, server_bytes: u64, flag: &'static str) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        let labels = if flag == self.labels.response_flags {
            std::borrow::Cow::Borrowed(&self.labels)
        } else {
            let mut l = self.labels.clone();
            l.response_flags = flag;
            std::borrow::Cow::Owned(l)
        };
        self.traffic.closed.get_or_create(&labels).inc();
        // Bytes always count under the labels of the open, as the meter's do.
        if !self.metered.load(Ordering::Acquire) {
            self.bytes.client_bytes(client_bytes);
            self.bytes.server_bytes(server_bytes);
        }
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.close(0, 0, "-");
        self.open.dec();
    }
}
