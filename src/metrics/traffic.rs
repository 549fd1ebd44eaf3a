//! The Istio TCP metrics (wire-facts §7) and the other counters the data path touches.
//!
//! A connection's labels are computed once, when its destination is known ([`Traffic::open`]),
//! and interned: connections with the same labels share one [`Series`] (the labels and their
//! counter handles), so an open connection holds two `Arc`s, not its own label strings, and its
//! close with `-` takes no lock. No label is computed or looked up per byte. Bytes are added as
//! they move through a [`Meter`] (one atomic add per chunk copied), so a long-lived connection's
//! bytes show while it lasts. Every label value is a name from the store
//! (workload, namespace, service, identity) or a fixed word: no ports, addresses or connection ids,
//! so the number of series is bounded by the mesh's size, not by its traffic.
//!
//! Depends only on `model`, so that `proxy` can use it; the registry, the collectors and the HTTP
//! server live in the parent module, above `proxy`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

pub use super::labels::{
    ConnLabels, LabelKey, Peer, Reporter, ResponseFlag, TrafficLabels, UNKNOWN,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct DirectionLabel {
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(super) struct ResultLabel {
    pub result: &'static str,
}

/// The labels of `istio_on_demand_dns_total`, ztunnel's: the client's, and the hostname.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OnDemandDnsLabels {
    pub source_workload: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_cluster: String,
    pub hostname: String,
}

impl OnDemandDnsLabels {
    fn new(src: Option<&crate::model::Workload>, hostname: &str) -> Self {
        let or_unknown =
            |v: Option<&str>| v.filter(|v| !v.is_empty()).unwrap_or(UNKNOWN).to_owned();
        let name = src.map(super::labels::workload_name);
        let service = src.map(|w| w.canonical_name.as_str());
        let revision = src.map(|w| w.canonical_revision.as_str());
        Self {
            source_workload: or_unknown(name),
            source_canonical_service: or_unknown(service),
            source_canonical_revision: or_unknown(revision),
            source_workload_namespace: or_unknown(src.map(|w| w.namespace.as_str())),
            source_principal: src.map_or_else(|| UNKNOWN.to_owned(), |w| w.identity().to_string()),
            source_app: or_unknown(service),
            source_version: or_unknown(revision),
            source_cluster: or_unknown(src.map(|w| w.cluster_id.as_str())),
            hostname: hostname.to_owned(),
        }
    }
}

/// The metric handles the data path updates; one per l4mesh (never global: several l4mesh may run
/// in one process, each counting alone).
#[derive(Debug)]
pub struct Traffic {
    pub(super) opened: Family<LabelKey, Counter>,
    pub(super) closed: Family<LabelKey, Counter>,
    /// ztunnel's `istio_tcp_connections_failed`: connections that ended with any flag but `-`
    /// (also counted closed), under the labels of their close.
    pub(super) failed: Family<LabelKey, Counter>,
    /// Istio's direction: bytes the server sent back (upstream → downstream).
    pub(super) sent: Family<LabelKey, Counter>,
    /// Istio's direction: bytes the client sent (downstream → upstream).
    pub(super) received: Family<LabelKey, Counter>,
    pub(super) open: Family<DirectionLabel, Gauge>,
    pub(super) rbac: Family<ResultLabel, Counter>,
    /// ztunnel's `istio_on_demand_dns`: connections whose destination had to be resolved.
    pub(super) on_demand_dns: Family<OnDemandDnsLabels, Counter>,
    /// The handles of `open` and `rbac`, fetched once: their label sets are fixed.
    inbound_open: Gauge,
    outbound_open: Gauge,
    allowed: Counter,
    denied: Counter,
    /// Every label set seen, with its counter handles, shared by the connections that carry it;
    /// filed by [`ConnLabels::hash_key`] so that an open finds its set without building a string.
    /// Holds the families' keys and is never pruned, as they are not: both are bounded by the
    /// mesh's names (label values come from the store), not by the traffic.
    series: RwLock<HashMap<u64, Vec<Arc<Series>>>>,
}

impl Default for Traffic {
    fn default() -> Self {
        let open: Family<DirectionLabel, Gauge> = Family::default();
        let gauge = |r: Reporter| {
            open.get_or_create_owned(&DirectionLabel {
                direction: r.direction(),
            })
        };
        let (inbound_open, outbound_open) = (gauge(Reporter::Destination), gauge(Reporter::Source));
        let rbac: Family<ResultLabel, Counter> = Family::default();
        let allowed = rbac.get_or_create_owned(&ResultLabel { result: "allow" });
        let denied = rbac.get_or_create_owned(&ResultLabel { result: "deny" });
        Self {
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            open,
            rbac,
            on_demand_dns: Family::default(),
            inbound_open,
            outbound_open,
            allowed,
            denied,
            series: RwLock::default(),
        }
    }
}

/// The counters of a close with a flag other than `-`: closed, and failed.
#[derive(Debug)]
struct FlaggedClose {
    closed: Counter,
    failed: Counter,
}

/// One label set's counters, fetched from the families once, when the first connection with these
/// labels opens; later connections with the same labels touch no family (no family lock).
#[derive(Debug)]
pub struct Series {
    labels: LabelKey,
    opened: Counter,
    /// The closed counter with `response_flags="-"`, the common close.
    closed: Counter,
    sent: Counter,
    received: Counter,
    /// The closed and failed counters with `DENY` / `CONNECT`, fetched at the first such close.
    deny: OnceLock<FlaggedClose>,
    connect: OnceLock<FlaggedClose>,
}

impl Traffic {
    /// Counts a connection as opened with `labels`; the returned record counts its close.
    /// Connections with labels seen before share their [`Series`]: the open costs a read lock on
    /// the cache and two atomic adds, and touches no metric family. Only the first connection
    /// of a label set fetches its counters (taking the families' write locks, which wait for a
    /// scrape in progress; see docs/metrics.md).
    pub fn open(self: &Arc<Self>, labels: &ConnLabels<'_>) -> ConnMetrics {
        let series = self.intern(labels);
        series.opened.inc();
        self.gauge(series.labels.0.reporter).inc();
        ConnMetrics {
            traffic: self.clone(),
            series,
            closed: AtomicBool::new(false),
            metered: AtomicBool::new(false),
        }
    }

    /// The shared series of `labels`, created on first sight. A known label set is found by
    /// its hash and compared in place: no string is built.
    fn intern(&self, labels: &ConnLabels<'_>) -> Arc<Series> {
        let hash = labels.hash_key();
        let find = |map: &HashMap<u64, Vec<Arc<Series>>>| {
            map.get(&hash)?
                .iter()
                .find(|s| labels.matches(&s.labels.0))
                .cloned()
        };
        if let Some(s) = find(&self.series.read().unwrap_or_else(|p| p.into_inner())) {
            return s;
        }
        // Fetched outside the cache's lock: a family's write lock may wait for a scrape, and
        // opens of known label sets must not wait behind it. Two racing first opens fetch the
        // same counters (the family dedups by label values), and one of the two series is kept.
        let key = LabelKey(Arc::new(TrafficLabels::from(labels)));
        let series = Arc::new(Series {
            opened: self.opened.get_or_create_owned(&key),
            closed: self.closed.get_or_create_owned(&key),
            sent: self.sent.get_or_create_owned(&key),
            received: self.received.get_or_create_owned(&key),
            deny: OnceLock::new(),
            connect: OnceLock::new(),
            labels: key,
        });
        let mut map = self.series.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = find(&map) {
            return s;
        }
        map.entry(hash).or_default().push(series.clone());
        series
    }

    /// The open-connections gauge of the side that reports.
    fn gauge(&self, reporter: Reporter) -> &Gauge {
        match reporter {
            Reporter::Source => &self.outbound_open,
            Reporter::Destination => &self.inbound_open,
        }
    }

    /// Counts a connection whose destination, known by `hostname` only, was resolved for it.
    pub fn on_demand_dns(&self, src: Option<&crate::model::Workload>, hostname: &str) {
        self.on_demand_dns
            .get_or_create(&OnDemandDnsLabels::new(src, hostname))
            .inc();
    }

    /// Counts one authorization decision on an inbound connection.
    pub fn rbac_decision(&self, allowed: bool) {
        if allowed {
            self.allowed.inc();
        } else {
            self.denied.inc();
        }
    }

    /// Counts a close of `series` with `flag`: closed, and failed unless the flag is `-`.
    fn count_close(&self, series: &Series, flag: ResponseFlag) {
        let cell = match flag {
            ResponseFlag::None => {
                series.closed.inc();
                return;
            }
            ResponseFlag::Deny => &series.deny,
            ResponseFlag::Connect => &series.connect,
        };
        let counters = cell.get_or_init(|| {
            // The only clone of a label set, once per (label set, flag).
            let mut l = TrafficLabels::clone(&*series.labels.0);
            l.response_flags = flag;
            let key = LabelKey(Arc::new(l));
            FlaggedClose {
                closed: self.closed.get_or_create_owned(&key),
                failed: self.failed.get_or_create_owned(&key),
            }
        });
        counters.closed.inc();
        counters.failed.inc();
    }
}

/// Live byte counters the copy loop adds to as bytes move (one relaxed atomic add per chunk), so
/// that a long-lived connection's bytes show while it lasts. Empty (counting nothing) by default.
#[derive(Clone, Debug, Default)]
pub struct Meter {
    series: Option<Arc<Series>>,
}

impl Meter {
    /// `n` bytes went client → server (downstream → upstream).
    #[inline]
    pub fn client_bytes(&self, n: u64) {
        if let Some(s) = &self.series {
            s.received.inc_by(n);
        }
    }

    /// `n` bytes went server → client (upstream → downstream).
    #[inline]
    pub fn server_bytes(&self, n: u64) {
        if let Some(s) = &self.series {
            s.sent.inc_by(n);
        }
    }
}

/// One open connection's metrics: counted closed (with its bytes) by [`ConnMetrics::close`], or
/// on drop if the handler never got there (its task was aborted).
///
/// Memory held per connection: `size_of::<ConnMetrics>()` = 24 bytes (two `Arc`s and two flags)
/// and no heap of its own; the labels (~520 bytes inline plus their ~19 heap strings) and the
/// counter handles live once per label set in the shared [`Series`]. Before the label sets were
/// shared, every connection held its own copy: 560 bytes inline plus ~300 bytes of strings (see
/// `metrics::tests::connection_metrics_share_their_labels`).
#[derive(Debug)]
pub struct ConnMetrics {
    traffic: Arc<Traffic>,
    series: Arc<Series>,
    closed: AtomicBool,
    /// Whether a [`Meter`] counts the bytes live (then the close adds none).
    metered: AtomicBool,
}

impl ConnMetrics {
    pub fn labels(&self) -> &TrafficLabels {
        &self.series.labels.0
    }

    /// The labels, shared with the other connections that carry them.
    pub fn shared_labels(&self) -> &Arc<TrafficLabels> {
        &self.series.labels.0
    }

    /// The byte counters of this connection's labels, for the copy loop to add to as it goes. As
    /// in ztunnel, live bytes are counted under the labels known at open (`response_flags="-"`);
    /// the close then adds only the closed count.
    pub fn meter(&self) -> Meter {
        self.metered.store(true, Ordering::Release);
        Meter {
            series: Some(self.series.clone()),
        }
    }

    /// Counts the close once: `client_bytes` went downstream → upstream, `server_bytes` back
    /// (added here unless a [`Meter`] counted them already); `flag` is ztunnel's flag for how it
    /// ended. A close with `-` (the common case) uses the handle fetched at open: no family lock.
    pub fn close(&self, client_bytes: u64, server_bytes: u64, flag: ResponseFlag) {
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        self.traffic.count_close(&self.series, flag);
        // Bytes always count under the labels of the open, as the meter's do.
        if !self.metered.load(Ordering::Acquire) {
            self.series.received.inc_by(client_bytes);
            self.series.sent.inc_by(server_bytes);
        }
    }
}

impl Drop for ConnMetrics {
    fn drop(&mut self) {
        self.close(0, 0, ResponseFlag::None);
        self.traffic.gauge(self.series.labels.0.reporter).dec();
    }
}
