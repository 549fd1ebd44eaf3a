//! Prometheus metrics, served on 15020 at `/metrics` and `/stats/prometheus` (wire-facts §7).
//!
//! Two kinds of metric, so that the data path pays as little as possible:
//! - counters the data path updates ([`Traffic`]: the Istio TCP metrics, RBAC decisions, open
//!   connections), with each label set built once and shared by its connections with its counter
//!   handles ([`traffic::Series`]), and bytes added per chunk copied through them ([`Meter`]);
//! - figures read only when scraped ([`collect`]: xDS, certificates, the HBONE pool and tunnel
//!   counters, the process, the data-plane tokio runtime), as prometheus-client `Collector`s that
//!   read state l4mesh keeps anyway.
//!
//! One [`Metrics`] per l4mesh, created by `app` and never global: tests run several l4mesh in one
//! process and each counts alone. [`serve`] is a plain future, so the caller picks the runtime.
//!
//! Layering: [`traffic`] and [`peers`] depend only on `model`/`store` and are used by `proxy`; this
//! module's registry and collectors read figures that `proxy`, `xds` and `identity` keep (the
//! proxy's [`Sources`] are its counters and HBONE state, never the whole `ProxyCtx`), so it sits
//! above them.

mod collect;
mod labels;
pub mod peers;
mod server;
pub mod traffic;

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::identity::SecretManager;
use crate::xds::XdsMetrics;

pub use server::{serve, OPENMETRICS_CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE};
pub use traffic::{
    ConnLabels, ConnMetrics, Meter, Peer, Reporter, ResponseFlag, Traffic, TrafficLabels,
};

/// The `component` of `istio_build`: dashboards select the node proxy by this name.
pub const BUILD_COMPONENT: &str = "ztunnel";

/// What the metrics read: the proxy's figures (never the proxy itself), the xDS client's
/// counters when there is a control plane, the certificates, and the data-plane runtime.
pub struct Sources {
    /// The Istio TCP metrics and the rest the data path counts.
    pub traffic: Arc<Traffic>,
    /// HBONE: tunnel counters, TLS connections, the pool, the revocation lists.
    pub hbone: Arc<crate::proxy::HboneState>,
    /// Inbound connections that could not keep the client's address (`ENABLE_ORIG_SRC`).
    pub orig_src_fallbacks: Arc<std::sync::atomic::AtomicU64>,
    /// The store and this node's name: shared mode's pods are checked against them.
    pub store: Arc<crate::store::Store>,
    pub node_name: String,
    /// Every listener's connection caps and refusals.
    pub limits: Arc<crate::limits::Registry>,
    pub xds: Option<Arc<XdsMetrics>>,
    pub secrets: Arc<SecretManager>,
    /// The runtime the listeners run on (its figures are exported, not the admin runtime's).
    pub runtime: tokio::runtime::Handle,
    /// Shared mode: the pods served.
    pub pods: Option<Arc<crate::inpod::manager::PodsView>>,
    /// The DNS proxy's metrics, when DNS capture is on.
    pub dns: Option<Arc<crate::dns::DnsMetrics>>,
    /// The l4mesh this one took over from: its metrics are relayed while it drains.
    pub predecessor: Option<Arc<crate::handoff::PredecessorState>>,
}

/// The registry of one l4mesh.
pub struct Metrics {
    registry: Registry,
    predecessor: Option<Arc<crate::handoff::PredecessorState>>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    tag: &'static str,
}

impl Metrics {
    pub fn new(sources: Sources) -> Self {
        let mut registry = Registry::default();
        let istio = registry.sub_registry_with_prefix("istio");
        let t = &sources.traffic;
        istio.register(
            "tcp_connections_opened",
            "The total number of TCP connections opened",
            t.opened.clone(),
        );
        istio.register(
            "tcp_connections_closed",
            "The total number of TCP connections closed",
            t.closed.clone(),
        );
        istio.register(
            "tcp_connections_failed",
            "The total number of TCP connections that failed to establish (unstable)",
            t.failed.clone(),
        );
        istio.register(
            "tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection (server to client)",
            t.sent.clone(),
        );
        istio.register(
            "tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection (client to server)",
            t.received.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component: BUILD_COMPONENT,
                tag: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        istio.register("build", "Istio component build info", build);
        istio.register(
            "on_demand_dns",
            "The total number of requests that used on-demand DNS (unstable)",
            t.on_demand_dns.clone(),
        );
        if let Some(d) = &sources.dns {
            istio.register(
                "dns_requests",
                "Total number of DNS requests (unstable)",
                d.requests.clone(),
            );
            istio.register(
                "dns_upstream_requests",
                "Total number of DNS requests forwarded to upstream (unstable)",
                d.upstream_requests.clone(),
            );
            istio.register(
                "dns_upstream_failures",
                "Total number of DNS requests that failed to forward upstream (unstable)",
                d.upstream_failures.clone(),
            );
            istio.register_with_unit(
                "dns_upstream_request_duration",
                "Total time in seconds Istio takes to get DNS response from upstream (unstable)",
                prometheus_client::registry::Unit::Seconds,
                d.upstream_duration.clone(),
            );
        }

        let own = registry.sub_registry_with_prefix("l4mesh");
        own.register(
            "open_connections",
            "Proxied connections open now, by direction (inbound: HBONE tunnels and plaintext; outbound: captured and SOCKS5)",
            t.open.clone(),
        );
        own.register(
            "rbac_decisions",
            "Authorization decisions on inbound connections, by result",
            t.rbac.clone(),
        );

        registry.register_collector(Box::new(collect::Process));
        registry.register_collector(Box::new(collect::Runtime(sources.runtime)));
        registry.register_collector(Box::new(collect::Certificates(sources.secrets)));
        if let Some(view) = sources.pods {
            registry.register_collector(Box::new(collect::Pods {
                view,
                store: sources.store,
                node_name: sources.node_name,
            }));
        }
        if let Some(rev) = &sources.hbone.revocation {
            registry.register_collector(Box::new(collect::Revocation(rev.clone())));
        }
        registry.register_collector(Box::new(collect::Hbone {
            hbone: sources.hbone,
            orig_src_fallbacks: sources.orig_src_fallbacks,
        }));
        registry.register_collector(Box::new(collect::Limits(sources.limits)));
        if let Some(x) = sources.xds {
            registry.register_collector(Box::new(collect::Xds(x)));
        }
        Self {
            registry,
            predecessor: sources.predecessor,
        }
    }

    /// The exposition: OpenMetrics text when `openmetrics`, else Prometheus text 0.0.4. While a
    /// predecessor drains after an upgrade, its series are in it too, labelled
    /// `l4mesh_process="predecessor"`.
    pub fn encode(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let own = self.encode_own(openmetrics)?;
        match self
            .predecessor
            .as_ref()
            .and_then(|p| p.metrics(openmetrics))
        {
            Some(theirs) => Ok(crate::handoff::metrics_text::merge(&own, &theirs)),
            None => Ok(own),
        }
    }

    /// This process's own exposition (what it relays to a successor while it drains).
    pub fn encode_own(&self, openmetrics: bool) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        if openmetrics {
            prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        } else {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry)?;
        }
        Ok(out)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
