//! The labels of the Istio TCP metrics (wire-facts §7): their values, computed once per
//! connection from the store's names, and the shared key the metric families hold them by.

use std::fmt::Write as _;
use std::hash::{Hash, Hasher};
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
    /// After the others, as ztunnel: present when either end is a known workload (or a proven
    /// client), each value `unknown` when empty; absent entirely otherwise.
    #[prometheus(flatten)]
    pub locality: OptionalLocality,
}

/// The four locality labels of ztunnel's `istio_tcp_*` (its `LocalityLabels`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct LocalityLabels {
    pub source_region: String,
    pub source_zone: String,
    pub destination_region: String,
    pub destination_zone: String,
}

/// The locality labels or none at all (not four `unknown`s): ztunnel's `OptionallyEncode`.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct OptionalLocality(pub Option<LocalityLabels>);

impl EncodeLabelSet for OptionalLocality {
    fn encode(&self, encoder: &mut LabelSetEncoder) -> std::fmt::Result {
        match &self.0 {
            Some(l) => l.encode(encoder),
            None => Ok(()),
        }
    }
}

/// What one end of a connection is known as.
#[derive(Clone, Copy, Default)]
pub struct Peer<'a> {
    /// The workload found in the store, if any.
    pub workload: Option<&'a Workload>,
    /// The identity proven over mutual TLS (or presented, on the originating side).
    pub principal: Option<&'a SpiffeId>,
    /// The principal is `workload`'s own identity (outbound HBONE presents the client
    /// workload's): taken from its fields, so that no `SpiffeId` is built per connection.
    /// Used when `principal` is `None`.
    pub workload_principal: bool,
}

/// The workload's `workload_name`, else its own name (istiod always fills the former; a local
/// config may not).
pub(super) fn workload_name(w: &Workload) -> &str {
    if w.workload_name.is_empty() {
        &w.name
    } else {
        &w.workload_name
    }
}

/// One label value as the store gives it, borrowed: a name, or a SPIFFE id in its three parts.
/// Lets an open find its interned label set without building any string.
#[derive(Clone, Copy, Debug)]
pub(super) enum Val<'a> {
    Str(&'a str),
    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    Spiffe(&'a str, &'a str, &'a str),
}

impl<'a> Val<'a> {
    /// A name; empty becomes `unknown`.
    fn name(s: &'a str) -> Self {
        Val::Str(if s.is_empty() { UNKNOWN } else { s })
    }

    fn owned(self) -> String {
        match self {
            Val::Str(s) => s.to_owned(),
            Val::Spiffe(td, ns, sa) => format!("spiffe://{td}/ns/{ns}/sa/{sa}"),
        }
    }

    /// Whether the label value `s` is this value.
    fn is(self, s: &str) -> bool {
        match self {
            Val::Str(v) => v == s,
            Val::Spiffe(td, ns, sa) => (|| {
                let rest = s.strip_prefix("spiffe://")?.strip_prefix(td)?;
                let rest = rest.strip_prefix("/ns/")?.strip_prefix(ns)?;
                Some(rest.strip_prefix("/sa/")? == sa)
            })()
            .unwrap_or(false),
        }
    }

    fn hash<H: Hasher>(self, h: &mut H) {
        match self {
            Val::Str(s) => s.hash(h),
            Val::Spiffe(td, ns, sa) => (td, ns, sa).hash(h),
        }
    }
}

/// A workload's SPIFFE id in its three parts.
fn spiffe_of(w: &Workload) -> (&str, &str, &str) {
    (&w.trust_domain, &w.namespace, &w.service_account)
}

/// What a connection's labels are made of, borrowed from the store's snapshot: enough to find
/// their interned copy (`hash_key`, `matches`) and, the first time, to
/// build it ([`TrafficLabels::from`]).
#[derive(Clone, Copy)]
pub struct ConnLabels<'a> {
    pub reporter: Reporter,
    pub src: Peer<'a>,
    pub dst: Option<&'a Workload>,
    pub service: Option<&'a Service>,
    /// Mutual TLS carries the connection (HBONE).
    pub mtls: bool,
}

impl<'a> ConnLabels<'a> {
    /// The 19 string labels, in [`TrafficLabels`]' order. As ztunnel: `*_workload` is the
    /// workload's `workload_name` (its Deployment, not the pod; the pod's name when none is given,
    /// as istiod names bare pods), `*_app`/`*_canonical_service` its canonical name,
    /// `*_version`/`*_canonical_revision` its canonical revision; the source principal is only
    /// what mutual TLS proves (or presents), the destination principal the destination
    /// workload's identity. Empty values become `unknown`.
    fn values(&self) -> [Val<'a>; 19] {
        let (s, d, svc) = (self.src.workload, self.dst, self.service);
        let w = |w: Option<&'a Workload>, f: fn(&'a Workload) -> &'a str| {
            Val::name(w.map(f).unwrap_or_default())
        };
        let sv = |f: fn(&'a Service) -> &'a str| Val::name(svc.map(f).unwrap_or_default());
        let spiffe = |p: Option<(&'a str, &'a str, &'a str)>| {
            p.map_or(Val::Str(UNKNOWN), |(td, ns, sa)| Val::Spiffe(td, ns, sa))
        };
        [
            w(s, workload_name),
            w(s, |w| &w.canonical_name),
            w(s, |w| &w.canonical_revision),
            w(s, |w| &w.namespace),
            spiffe(match (self.src.principal, s) {
                (Some(p), _) => Some((
                    p.trust_domain.as_str(),
                    p.namespace.as_str(),
                    p.service_account.as_str(),
                )),
                (None, Some(w)) if self.src.workload_principal => Some(spiffe_of(w)),
                (None, _) => None,
            }),
            w(s, |w| &w.canonical_name),
            w(s, |w| &w.canonical_revision),
            w(s, |w| &w.cluster_id),
            sv(|s| &s.hostname),
            sv(|s| &s.namespace),
            sv(|s| &s.name),
            w(d, workload_name),
            w(d, |w| &w.canonical_name),
            w(d, |w| &w.canonical_revision),
            w(d, |w| &w.namespace),
            spiffe(d.map(spiffe_of)),
            w(d, |w| &w.canonical_name),
            w(d, |w| &w.canonical_revision),
            w(d, |w| &w.cluster_id),
        ]
    }

    /// `source_region`, `source_zone`, `destination_region`, `destination_zone`, when ztunnel
    /// would have them: a known source or destination workload, or a client proven over mutual
    /// TLS (ztunnel's "derived source" on inbound).
    fn locality(&self) -> Option<[Val<'a>; 4]> {
        let (s, d) = (self.src.workload, self.dst);
        let proven = self.reporter == Reporter::Destination && self.src.principal.is_some();
        if s.is_none() && d.is_none() && !proven {
            return None;
        }
        let l = |w: Option<&'a Workload>, f: fn(&'a Workload) -> &'a str| {
            Val::name(w.map(f).unwrap_or_default())
        };
        Some([
            l(s, |w| &w.locality.region),
            l(s, |w| &w.locality.zone),
            l(d, |w| &w.locality.region),
            l(d, |w| &w.locality.zone),
        ])
    }

    fn security_policy(&self) -> &'static str {
        if self.mtls {
            "mutual_tls"
        } else {
            UNKNOWN
        }
    }

    /// The key the interning cache files these labels under (the same for equal labels).
    pub(super) fn hash_key(&self) -> u64 {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.reporter.hash(&mut h);
        self.mtls.hash(&mut h);
        for v in self.values() {
            v.hash(&mut h);
        }
        match self.locality() {
            Some(l) => l.iter().for_each(|v| v.hash(&mut h)),
            None => 0u8.hash(&mut h),
        }
        h.finish()
    }

    /// Whether `l` (with `response_flags="-"`) are these labels.
    pub(super) fn matches(&self, l: &TrafficLabels) -> bool {
        l.reporter == self.reporter
            && l.connection_security_policy == self.security_policy()
            && l.response_flags == ResponseFlag::None
            && self.values().iter().zip(l.strings()).all(|(v, s)| v.is(s))
            && match (self.locality(), &l.locality.0) {
                (None, None) => true,
                (Some(v), Some(l)) => v.iter().zip(l.strings()).all(|(v, s)| v.is(s)),
                _ => false,
            }
    }
}

impl From<&ConnLabels<'_>> for TrafficLabels {
    fn from(c: &ConnLabels<'_>) -> Self {
        let [source_workload, source_canonical_service, source_canonical_revision, source_workload_namespace, source_principal, source_app, source_version, source_cluster, destination_service, destination_service_namespace, destination_service_name, destination_workload, destination_canonical_service, destination_canonical_revision, destination_workload_namespace, destination_principal, destination_app, destination_version, destination_cluster] =
            c.values().map(Val::owned);
        Self {
            reporter: c.reporter,
            source_workload,
            source_canonical_service,
            source_canonical_revision,
            source_workload_namespace,
            source_principal,
            source_app,
            source_version,
            source_cluster,
            destination_service,
            destination_service_namespace,
            destination_service_name,
            destination_workload,
            destination_canonical_service,
            destination_canonical_revision,
            destination_workload_namespace,
            destination_principal,
            destination_app,
            destination_version,
            destination_cluster,
            request_protocol: "tcp",
            response_flags: ResponseFlag::None,
            connection_security_policy: c.security_policy(),
            locality: OptionalLocality(c.locality().map(|l| {
                let [source_region, source_zone, destination_region, destination_zone] =
                    l.map(Val::owned);
                LocalityLabels {
                    source_region,
                    source_zone,
                    destination_region,
                    destination_zone,
                }
            })),
        }
    }
}

impl TrafficLabels {
    /// The labels of one connection (see [`ConnLabels`]).
    pub fn new(
        reporter: Reporter,
        src: Peer<'_>,
        dst: Option<&Workload>,
        service: Option<&Service>,
        mtls: bool,
    ) -> Self {
        Self::from(&ConnLabels {
            reporter,
            src,
            dst,
            service,
            mtls,
        })
    }

    /// The 19 string labels, in order.
    pub fn strings(&self) -> [&String; 19] {
        [
            &self.source_workload,
            &self.source_canonical_service,
            &self.source_canonical_revision,
            &self.source_workload_namespace,
            &self.source_principal,
            &self.source_app,
            &self.source_version,
            &self.source_cluster,
            &self.destination_service,
            &self.destination_service_namespace,
            &self.destination_service_name,
            &self.destination_workload,
            &self.destination_canonical_service,
            &self.destination_canonical_revision,
            &self.destination_workload_namespace,
            &self.destination_principal,
            &self.destination_app,
            &self.destination_version,
            &self.destination_cluster,
        ]
    }
}

impl LocalityLabels {
    fn strings(&self) -> [&String; 4] {
        [
            &self.source_region,
            &self.source_zone,
            &self.destination_region,
            &self.destination_zone,
        ]
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
