//! Figures read at scrape time: nothing here runs on the data path. Each collector reads state
//! l4mesh keeps anyway (atomics, small maps behind short locks, /proc) and encodes it.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::identity::SecretManager;
use crate::xds::XdsMetrics;

type Labels = Vec<(&'static str, String)>;

/// Writes one family of `kind`: `rows` of (labels, value), each value made a metric by `metric`.
fn family<V, M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    kind: MetricType,
    rows: impl IntoIterator<Item = (Labels, V)>,
    metric: fn(V) -> M,
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, v) in rows {
        metric(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// Writes one gauge family: `rows` of (labels, value).
fn gauges<V>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result
where
    ConstGauge<V>: EncodeMetric,
{
    family(enc, name, help, MetricType::Gauge, rows, ConstGauge::new)
}

/// Writes one counter family (the `_total` suffix is added by the encoder).
fn counters<V>(
    enc: &mut DescriptorEncoder,
    name: &'static str,
    help: &str,
    rows: impl IntoIterator<Item = (Labels, V)>,
) -> std::fmt::Result
where
    ConstCounter<V>: EncodeMetric,
{
    family(
        enc,
        name,
        help,
        MetricType::Counter,
        rows,
        ConstCounter::new,
    )
}

fn one<V>(v: V) -> [(Labels, V); 1] {
    [(Vec::new(), v)]
}

fn label(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

/// The process, as Prometheus' own process collector names it, from /proc/self.
#[derive(Debug, Default)]
pub struct Process;

/// What /proc/self/stat and /proc/stat say, in the units Prometheus uses.
#[derive(Debug, Default, PartialEq)]
pub struct ProcStat {
    pub cpu_seconds: f64,
    pub start_time_seconds: f64,
    pub virtual_bytes: u64,
    pub resident_bytes: u64,
}

/// Parses `/proc/self/stat` (fields after the parenthesised command name, which may contain
/// spaces) with the boot time from `/proc/stat`, the clock tick rate and the page size.
pub fn parse_proc_stat(stat: &str, btime: u64, ticks: u64, page: u64) -> Option<ProcStat> {
    let after = stat.rsplit_once(')')?.1;
    // `after` starts at field 3 (state); utime is field 14, stime 15, starttime 22, vsize 23,
    // rss 24.
    let f: Vec<&str> = after.split_whitespace().collect();
    let num = |field: usize| f.get(field - 3)?.parse::<u64>().ok();
    let ticks = ticks.max(1) as f64;
    Some(ProcStat {
        cpu_seconds: (num(14)? + num(15)?) as f64 / ticks,
        start_time_seconds: btime as f64 + num(22)? as f64 / ticks,
        virtual_bytes: num(23)?,
        resident_bytes: num(24)? * page,
    })
}

/// The `btime` line of `/proc/stat`: boot time in Unix seconds.
pub fn parse_btime(stat: &str) -> Option<u64> {
    stat.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

impl Collector for Process {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let btime = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_btime(&s))
            .unwrap_or(0);
        let ticks = rustix::param::clock_ticks_per_second();
        let page = rustix::param::page_size() as u64;
        if let Some(s) = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|s| parse_proc_stat(&s, btime, ticks, page))
        {
            counters(
                &mut enc,
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds",
                one(s.cpu_seconds),
            )?;
            gauges(
                &mut enc,
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                one(s.resident_bytes as i64),
            )?;
            gauges(
                &mut enc,
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                one(s.virtual_bytes as i64),
            )?;
            gauges(
                &mut enc,
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                one(s.start_time_seconds),
            )?;
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            // The directory handle itself is one of the entries.
            let open = dir.count().saturating_sub(1);
            gauges(
                &mut enc,
                "process_open_fds",
                "Number of open file descriptors",
                one(open as i64),
            )?;
        }
        if let Some(lim) = rustix::process::getrlimit(rustix::process::Resource::Nofile).current {
            gauges(
                &mut enc,
                "process_max_fds",
                "Maximum number of open file descriptors",
                one(lim as i64),
            )?;
        }
        Ok(())
    }
}

/// Every listener's open connections, caps and refusals ([`crate::limits`]).
#[derive(Debug)]
pub struct Limits(pub Arc<crate::limits::Registry>);

impl Collector for Limits {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use crate::limits::Refusal;
        let all = self.0.all();
        counters(
            &mut enc,
            "l4mesh_connections_refused",
            "Connections closed at accept because a listener's cap was reached, by listener and reason (listener_limit, source_limit)",
            all.iter().flat_map(|l| {
                [Refusal::ListenerLimit, Refusal::SourceLimit].map(|r| {
                    (
                        vec![("listener", l.name().to_owned()), ("reason", r.as_str().to_owned())],
                        l.refused(r),
                    )
                })
            }),
        )?;
        counters(
            &mut enc,
            "l4mesh_accept_errors",
            "Failed accept calls, by listener (out of descriptors, most often); the listener pauses 50 ms and goes on",
            all.iter()
                .map(|l| (label("listener", l.name()), l.accept_errors())),
        )?;
        gauges(
            &mut enc,
            "l4mesh_listener_connections",
            "Connections each listener holds now (counted against its cap)",
            all.iter()
                .map(|l| (label("listener", l.name()), l.open() as i64)),
        )?;
        gauges(
            &mut enc,
            "l4mesh_listener_max_connections",
            "Each listener's cap on the connections it holds (0: none)",
            all.iter()
                .map(|l| (label("listener", l.name()), l.caps().max_connections as i64)),
        )
    }
}

/// The data-plane runtime's figures, under ztunnel's names (its `tokio_` collector): a dashboard
/// built for ztunnel reads them. As in ztunnel, the park counts are counters whose samples carry
/// no `_total` suffix.
#[derive(Debug)]
pub struct Runtime(pub tokio::runtime::Handle);

impl Collector for Runtime {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let m = self.0.metrics();
        let workers = m.num_workers();
        gauges(
            &mut enc,
            "tokio_num_workers",
            "the number of worker threads used by the runtime",
            one(workers as i64),
        )?;
        gauges(
            &mut enc,
            "tokio_global_queue_depth",
            "the number of tasks currently scheduled in the runtime's global queue",
            one(m.global_queue_depth() as i64),
        )?;
        gauges(
            &mut enc,
            "tokio_num_alive_tasks",
            "the number of alive tasks in the runtime",
            one(m.num_alive_tasks() as i64),
        )?;
        let per_worker = |f: &dyn Fn(usize) -> f64| {
            (0..workers)
                .map(|w| (label("worker", w.to_string()), f(w)))
                .collect::<Vec<_>>()
        };
        counters(
            &mut enc,
            "tokio_worker_total_busy_duration_seconds",
            "the amount of time worker threads have been busy",
            per_worker(&|w| m.worker_total_busy_duration(w).as_secs_f64()),
        )?;
        let counts = |f: &dyn Fn(usize) -> u64| {
            (0..workers)
                .map(|w| {
                    (
                        label("worker", w.to_string()),
                        i64::try_from(f(w)).unwrap_or(i64::MAX),
                    )
                })
                .collect::<Vec<_>>()
        };
        family(
            &mut enc,
            "tokio_worker_park_count",
            "the total number of times the given worker thread has parked",
            MetricType::Counter,
            counts(&|w| m.worker_park_count(w)),
            ConstGauge::new,
        )?;
        family(
            &mut enc,
            "tokio_worker_park_unpark_count",
            "the total number of times the given worker thread has parked and unparked",
            MetricType::Counter,
            counts(&|w| m.worker_park_unpark_count(w)),
            ConstGauge::new,
        )
    }
}

/// Certificate revocation (`CRL_PATH`), as ztunnel counts it; absent without revocation lists.
#[derive(Debug)]
pub struct Revocation(pub Arc<crate::tls::Revocation>);

impl Collector for Revocation {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        use crate::tls::crl::Checker;
        let c = &self.0.counts;
        let by_reporter = |f: &dyn Fn(Checker) -> u64| {
            [Checker::Client, Checker::Server].map(|k| (label("reporter", k.reporter()), f(k)))
        };
        counters(
            &mut enc,
            "istio_crl_policy_rejections",
            "The total number of connections rejected due to CRL certificate revocation (unstable)",
            by_reporter(&|k| c.rejections(k)),
        )?;
        counters(
            &mut enc,
            "istio_crl_untracked_connections",
            "The total number of connections not tracked for CRL existing-connection enforcement because a peer certificate failed to parse (unstable)",
            by_reporter(&|k| c.untracked(k)),
        )?;
        gauges(
            &mut enc,
            "l4mesh_crl_lists",
            "Certificate revocation lists loaded from CRL_PATH",
            one(self.0.lists() as i64),
        )?;
        gauges(
            &mut enc,
            "l4mesh_crl_tracked_connections",
            "Live HBONE connections that a new revocation list would close if it revoked their peer",
            one(self.0.tracked() as i64),
        )
    }
}

/// The certificates of this node's identities.
pub struct Certificates(pub Arc<SecretManager>);

impl std::fmt::Debug for Certificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certificates")
    }
}

impl Collector for Certificates {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let status = self.0.status();
        gauges(
            &mut enc,
            "l4mesh_certificate_state",
            "1 for each identity of this node in its certificate state (initializing, available, expired, unavailable)",
            status.iter().map(|s| {
                let mut l = label("identity", s.identity.clone());
                l.push(("state", s.state.to_owned()));
                (l, 1i64)
            }),
        )?;
        gauges(
            &mut enc,
            "l4mesh_certificate_expiry_timestamp_seconds",
            "When the certificate in use for each identity expires, in Unix seconds",
            status
                .iter()
                .filter_map(|s| Some((label("identity", s.identity.clone()), s.expiry? as i64))),
        )?;
        counters(
            &mut enc,
            "l4mesh_certificate_unavailable",
            "Handshakes that needed a certificate of this node and found none valid (expired, or never issued): each failed",
            one(self.0.unavailable_total()),
        )
    }
}

/// HBONE: tunnel counters, TLS connections and the outbound pool.
pub struct Hbone {
    pub hbone: Arc<crate::proxy::HboneState>,
    pub orig_src_fallbacks: Arc<std::sync::atomic::AtomicU64>,
}

impl std::fmt::Debug for Hbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hbone")
    }
}

impl Collector for Hbone {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let h = &self.hbone;
        let c = &h.tunnels;
        let dir = |d: &'static str| label("direction", d);
        counters(
            &mut enc,
            "l4mesh_hbone_tunnels_opened",
            "HBONE tunnels (CONNECT streams) opened, by direction (counted when they start)",
            [
                (dir("inbound"), c.inbound_opened.load(Relaxed)),
                (dir("outbound"), c.outbound_opened.load(Relaxed)),
            ],
        )?;
        counters(
            &mut enc,
            "l4mesh_hbone_tunnels_failed",
            "HBONE tunnels that ended with an error, by direction",
            [
                (dir("inbound"), c.inbound_failed.load(Relaxed)),
                (dir("outbound"), c.outbound_failed.load(Relaxed)),
            ],
        )?;
        let flow = |d: &'static str, f: &'static str| {
            let mut l = dir(d);
            l.push(("flow", f.to_owned()));
            l
        };
        counters(
            &mut enc,
            "l4mesh_hbone_tunnel_bytes",
            "Bytes carried by HBONE tunnels, by direction and flow (added at close)",
            [
                (
                    flow("inbound", "client_to_server"),
                    c.inbound_bytes_sent.load(Relaxed),
                ),
                (
                    flow("inbound", "server_to_client"),
                    c.inbound_bytes_received.load(Relaxed),
                ),
                (
                    flow("outbound", "client_to_server"),
                    c.outbound_bytes_sent.load(Relaxed),
                ),
                (
                    flow("outbound", "server_to_client"),
                    c.outbound_bytes_received.load(Relaxed),
                ),
            ],
        )?;
        let status = |s: &'static str, n: &std::sync::atomic::AtomicU64| {
            (label("status", s), n.load(Relaxed))
        };
        counters(
            &mut enc,
            "l4mesh_hbone_connect_responses",
            "HBONE CONNECT answers sent or received, by HTTP status (200, 400, 401, 503, other)",
            [
                status("200", &c.status_200),
                status("400", &c.status_400),
                status("401", &c.status_401),
                status("503", &c.status_503),
                status("other", &c.status_other),
            ],
        )?;
        counters(
            &mut enc,
            "l4mesh_hbone_tls_connections",
            "HBONE TLS connections accepted (inbound) or opened (outbound)",
            [
                (dir("inbound"), h.inbound_tls_connections()),
                (dir("outbound"), h.outbound_tls_connections()),
            ],
        )?;
        let pool = h.pool_stats();
        gauges(
            &mut enc,
            "l4mesh_hbone_pool_connections",
            "Outbound HBONE connections open in the pool",
            one(pool.connections as i64),
        )?;
        gauges(
            &mut enc,
            "l4mesh_hbone_pool_streams",
            "Tunnels open on pooled outbound HBONE connections",
            one(pool.streams as i64),
        )?;
        gauges(
            &mut enc,
            "l4mesh_hbone_pool_keys",
            "Distinct (source identity, destination identities, address) keys in the pool",
            one(pool.keys as i64),
        )?;
        counters(
            &mut enc,
            "l4mesh_orig_src_fallbacks",
            "Inbound connections that could not keep the client's source IP (ENABLE_ORIG_SRC) and connected from l4mesh's own address",
            one(self.orig_src_fallbacks.load(Relaxed)),
        )
    }
}

/// Shared mode's pods, under ztunnel's `workload_manager_*` names (no `istio_` prefix, as
/// ztunnel registers them).
pub struct Pods {
    pub view: Arc<crate::inpod::manager::PodsView>,
    pub store: Arc<crate::store::Store>,
    pub node_name: String,
}

impl std::fmt::Debug for Pods {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pods")
    }
}

impl Collector for Pods {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let snapshot = self.store.load();
        let stats = self.view.stats(|pod| {
            snapshot
                .workloads_on_node(&self.node_name)
                .any(|wl| wl.name == pod.name && wl.namespace == pod.namespace)
        });
        gauges(
            &mut enc,
            "workload_manager_active_proxy_count",
            "Pods served now (their listeners accept in their network namespaces)",
            one(stats.active as i64),
        )?;
        gauges(
            &mut enc,
            "workload_manager_pending_proxy_count",
            "Pods served whose workload the control plane has not sent yet",
            one(stats.pending as i64),
        )?;
        counters(
            &mut enc,
            "workload_manager_proxies_started",
            "Pod proxies started (pods added by the CNI node agent)",
            one(stats.started),
        )?;
        counters(
            &mut enc,
            "workload_manager_proxies_stopped",
            "Pod proxies stopped (pods removed, once drained)",
            one(stats.stopped),
        )
    }
}

/// The xDS client's counters.
pub struct Xds(pub Arc<XdsMetrics>);

impl std::fmt::Debug for Xds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Xds")
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Collector for Xds {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let x = &self.0;
        // Copies taken under each lock, encoded after it is released.
        let terminations: Vec<(&'static str, u64)> = lock(&x.terminations)
            .iter()
            .map(|(k, v)| (*k, *v))
            .collect();
        let messages: Vec<(String, (u64, u64))> = lock(&x.messages)
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        let held: Vec<(&'static str, usize)> =
            lock(&x.held).iter().map(|(k, v)| (*k, *v)).collect();
        counters(
            &mut enc,
            "istio_xds_connection_terminations",
            "The total number of completed connections to xds server, by reason",
            terminations
                .into_iter()
                .map(|(r, n)| (label("reason", r), n)),
        )?;
        counters(
            &mut enc,
            "istio_xds_message",
            "Total number of messages received, by type URL",
            messages
                .iter()
                .map(|(u, (n, _))| (label("url", u.clone()), *n)),
        )?;
        counters(
            &mut enc,
            "istio_xds_message_bytes",
            "Total bytes of messages received, by type URL",
            messages
                .iter()
                .map(|(u, (_, b))| (label("url", u.clone()), *b)),
        )?;
        gauges(
            &mut enc,
            "l4mesh_xds_resources",
            "Resources held from the control plane, by type URL",
            held.into_iter().map(|(u, n)| (label("url", u), n as i64)),
        )?;
        counters(
            &mut enc,
            "l4mesh_xds_nacks",
            "xDS responses rejected (NACKed)",
            one(x.nacks.load(Relaxed)),
        )?;
        gauges(
            &mut enc,
            "l4mesh_xds_connected",
            "1 while the xDS stream is connected",
            one(i64::from(x.connected.load(Relaxed))),
        )?;
        gauges(
            &mut enc,
            "l4mesh_xds_last_update_timestamp_seconds",
            "When the last xDS response was applied, in Unix seconds (0: never)",
            one(x.last_update.load(Relaxed) as i64),
        )
    }
}
