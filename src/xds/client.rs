//! The I/O around [`super::protocol`]: connect (TLS or plaintext), send credentials, run the
//! stream, apply responses to the store, reconnect with jittered exponential backoff.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use prost::Message;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::convert::response_to_batch;
use super::demand::{Admit, NotFound, Subscriptions};
use super::protocol::{Protocol, TYPES};
use super::settings::XdsSettings;
use crate::control_plane::{self, error_chain as chain, ChannelError};
use crate::model::NetworkAddr;
use crate::proto::envoy::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use crate::proto::envoy::discovery::{DeltaDiscoveryResponse, Node};
use crate::proto::ADDRESS_TYPE_URL;
use crate::readiness::{BlockReady, Readiness};
use crate::store::Store;

const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

/// Why a stream to the control plane ended; the log line says what to check.
#[derive(Debug, thiserror::Error)]
pub enum XdsError {
    #[error("invalid XDS_ADDRESS {address:?}: {reason}")]
    Address { address: String, reason: String },
    #[error("reading the control plane's root certificate (XDS_ROOT_CA) {path}: {error}")]
    RootCa { path: String, error: std::io::Error },
    #[error("connecting to the control plane at {address} failed: {detail} (is it running and reachable? for https, is XDS_ROOT_CA the root that signed its certificate?)")]
    Connect { address: String, detail: String },
    #[error("the control plane at {address} refused our credentials: {message} (is AUTH_TOKEN a valid service-account token for this control plane?)")]
    Unauthenticated { address: String, message: String },
    #[error("the xDS stream with {address} failed: {status}")]
    Stream {
        address: String,
        status: Box<tonic::Status>,
    },
    #[error("the control plane at {address} closed the stream")]
    Closed { address: String },
}

impl From<ChannelError> for XdsError {
    fn from(e: ChannelError) -> Self {
        match e {
            ChannelError::Address { address, reason } => XdsError::Address { address, reason },
            ChannelError::RootCa {
                path,
                error: source,
            } => XdsError::RootCa {
                path,
                error: source,
            },
            ChannelError::Connect { address, detail } => XdsError::Connect { address, detail },
        }
    }
}

impl XdsError {
    /// A short label for the termination metric.
    pub fn reason(&self) -> &'static str {
        match self {
            XdsError::Address { .. } | XdsError::RootCa { .. } => "config",
            XdsError::Connect { .. } => "connect",
            XdsError::Unauthenticated { .. } => "unauthenticated",
            XdsError::Stream { .. } => "stream_error",
            XdsError::Closed { .. } => "closed",
        }
    }
}

/// Counters of the xDS client, read by the metrics endpoint.
#[derive(Default, Debug)]
pub struct XdsMetrics {
    /// Stream terminations by reason.
    pub terminations: Mutex<BTreeMap<&'static str, u64>>,
    /// Per type URL: (responses, bytes).
    pub messages: Mutex<BTreeMap<String, (u64, u64)>>,
    /// Per type URL: resources held.
    pub held: Mutex<BTreeMap<&'static str, usize>>,
    pub nacks: AtomicU64,
    /// Unix seconds of the last applied response.
    pub last_update: AtomicU64,
    pub connected: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Asks the control plane for an address the store does not know (on-demand mode) and waits a
/// bounded time for the answer. Bounded everywhere ([`super::demand`]): the queue to the xDS
/// client holds [`ON_DEMAND_QUEUE`] requests (a full queue answers "unknown" at once), and an
/// address that got no answer is not waited for again for [`NOT_FOUND_TTL`].
#[derive(Clone)]
pub struct OnDemand {
    tx: mpsc::Sender<NetworkAddr>,
    store: Arc<Store>,
    timeout: Duration,
    not_found: Arc<NotFound>,
}

/// Requests to the xDS client that may wait at once.
pub const ON_DEMAND_QUEUE: usize = 1024;
/// How long an address that got no on-demand answer is not waited for again.
pub const NOT_FOUND_TTL: Duration = Duration::from_secs(30);
/// Addresses remembered as not found, at most.
pub const NOT_FOUND_MAX: usize = 16 * 1024;
/// On-demand subscriptions one client holds, at most.
pub const SUBSCRIPTIONS_MAX: usize = 16 * 1024;
/// A subscription whose resource never arrived is dropped after this long.
pub const SUBSCRIPTION_TTL: Duration = Duration::from_secs(300);

impl OnDemand {
    /// Whether `addr` is (or became, within the timeout) a workload or service in the store.
    pub async fn resolve(&self, addr: &NetworkAddr) -> bool {
        let mut rx = self.store.subscribe();
        if known(&self.store, addr) {
            return true;
        }
        if self.not_found.contains(addr, Instant::now()) {
            return false;
        }
        match self.tx.try_send(addr.clone()) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::debug!(%addr, "on-demand queue full; not waiting for the control plane");
                return false;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return false,
        }
        let wait = async {
            while rx.changed().await.is_ok() {
                if known(&self.store, addr) {
                    return true;
                }
            }
            false
        };
        let found = tokio::time::timeout(self.timeout, wait)
            .await
            .unwrap_or(false);
        if found {
            self.not_found.remove(addr);
        } else {
            tracing::debug!(%addr, timeout = ?self.timeout, "on-demand lookup got no answer; not waiting again for {NOT_FOUND_TTL:?}");
            self.not_found.insert(addr.clone(), Instant::now());
        }
        found
    }
}

/// The xDS client task.
pub struct XdsClient {
    settings: XdsSettings,
    cluster_id: String,
    store: Arc<Store>,
    metrics: Arc<XdsMetrics>,
    protocol: Protocol,
    on_demand_rx: mpsc::Receiver<NetworkAddr>,
    demanded: Subscriptions,
    ready: HashMap<&'static str, BlockReady>,
}

impl XdsClient {
    /// Builds the client; readiness waits for the first response of each type.
    pub fn new(
        settings: XdsSettings,
        cluster_id: &str,
        node_name: &str,
        store: Arc<Store>,
        readiness: &Readiness,
    ) -> (XdsClient, OnDemand, Arc<XdsMetrics>) {
        let node = node(&settings, cluster_id, node_name);
        let (tx, on_demand_rx) = mpsc::channel(ON_DEMAND_QUEUE);
        let on_demand = OnDemand {
            tx,
            store: store.clone(),
            timeout: settings.on_demand_timeout,
            not_found: Arc::new(NotFound::new(NOT_FOUND_MAX, NOT_FOUND_TTL)),
        };
        let ready = TYPES
            .iter()
            .map(|t| (*t, readiness.register(format!("xDS {t}"))))
            .collect();
        let metrics = Arc::new(XdsMetrics::default());
        let client = XdsClient {
            protocol: Protocol::new(node, settings.on_demand),
            settings,
            cluster_id: cluster_id.to_owned(),
            store,
            metrics: metrics.clone(),
            on_demand_rx,
            demanded: Subscriptions::new(SUBSCRIPTIONS_MAX, SUBSCRIPTION_TTL),
            ready,
        };
        (client, on_demand, metrics)
    }

    /// Runs forever: one stream at a time, reconnecting with backoff.
    pub async fn run(mut self) {
        let mut backoff = BACKOFF_MIN;
        loop {
            let mut got_response = false;
            let err = self.session(&mut got_response).await;
            self.metrics.connected.store(false, Ordering::Relaxed);
            *lock(&self.metrics.terminations)
                .entry(err.reason())
                .or_default() += 1;
            if got_response {
                backoff = BACKOFF_MIN;
            }
            let delay = jitter(backoff);
            tracing::warn!(error = %err, retry_in = ?delay, "xDS stream ended; serving the last known state meanwhile");
            tokio::time::sleep(delay).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    async fn session(&mut self, got_response: &mut bool) -> XdsError {
        let address = self.settings.address.clone();
        let channel = match control_plane::connect(
            &self.settings.address,
            self.settings.root_ca.as_ref(),
            self.settings.packet_mark,
        )
        .await
        {
            Ok(c) => c,
            Err(e) => return e.into(),
        };
        let mut client =
            AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 << 20);
        let (tx, rx) = mpsc::channel(64);
        for req in self.protocol.initial_requests() {
            // The receiver is alive (it is in this scope); the channel has room for these.
            let _ = tx.try_send(req);
        }
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        control_plane::add_credentials(
            &mut request,
            self.settings.auth_token.as_deref(),
            &self.cluster_id,
        );
        let mut stream = match client.delta_aggregated_resources(request).await {
            Ok(r) => r.into_inner(),
            Err(status) => return status_error(&address, status),
        };
        self.metrics.connected.store(true, Ordering::Relaxed);
        tracing::info!(%address, "xDS stream open");
        let mut sweep = tokio::time::interval(SUBSCRIPTION_TTL / 4);
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(resp)) => {
                        *got_response = true;
                        let ack = self.handle(resp);
                        if tx.send(ack).await.is_err() {
                            return XdsError::Closed { address };
                        }
                    }
                    Ok(None) => return XdsError::Closed { address },
                    Err(status) => return status_error(&address, status),
                },
                Some(addr) = self.on_demand_rx.recv() => {
                    for req in self.demand(&addr) {
                        if tx.send(req).await.is_err() {
                            return XdsError::Closed { address };
                        }
                    }
                }
                _ = sweep.tick(), if !self.demanded.is_empty() => {
                    let store = &self.store;
                    let stale = self.demanded.sweep(Instant::now(), &|a| known(store, a));
                    if let Some(req) = self.protocol.unsubscribe(ADDRESS_TYPE_URL, &stale) {
                        tracing::debug!(names = stale.len(), "dropping on-demand subscriptions that never got a resource");
                        if tx.send(req).await.is_err() {
                            return XdsError::Closed { address };
                        }
                    }
                }
            }
        }
    }

    /// The requests for an on-demand name: unsubscribing stale names to make room, then
    /// subscribing; none when it is subscribed already or the ledger is full.
    fn demand(
        &mut self,
        addr: &NetworkAddr,
    ) -> Vec<crate::proto::envoy::discovery::DeltaDiscoveryRequest> {
        let store = &self.store;
        match self
            .demanded
            .admit(addr, Instant::now(), |a| known(store, a))
        {
            Admit::Known => Vec::new(),
            Admit::Full => {
                tracing::warn!(%addr, max = SUBSCRIPTIONS_MAX, "on-demand subscriptions are full of live names; not asking the control plane about this address");
                Vec::new()
            }
            Admit::Subscribe { stale } => {
                let name = addr.to_string();
                tracing::debug!(%name, "on-demand subscription");
                let unsub = self.protocol.unsubscribe(ADDRESS_TYPE_URL, &stale);
                unsub
                    .into_iter()
                    .chain(self.protocol.subscribe(ADDRESS_TYPE_URL, &name))
                    .collect()
            }
        }
    }

    /// Applies one response and returns its ACK or NACK.
    fn handle(
        &mut self,
        resp: DeltaDiscoveryResponse,
    ) -> crate::proto::envoy::discovery::DeltaDiscoveryRequest {
        let known = TYPES.contains(&resp.type_url.as_str());
        let bytes = resp.encoded_len();
        let resources = resp.resources.len();
        {
            let mut m = lock(&self.metrics.messages);
            let e = m.entry(resp.type_url.clone()).or_default();
            e.0 += 1;
            e.1 += bytes as u64;
        }
        let rejected = if known {
            let (batch, rejected) = response_to_batch(&resp);
            let (upserts, removals) = (batch.upserts.len(), batch.removals.len());
            let stats = self.store.apply(batch);
            tracing::debug!(type_url = %resp.type_url, upserts, removals, rejected = rejected.len(), version = stats.version, "xDS response applied");
            rejected
        } else {
            Vec::new()
        };
        let ack = self.protocol.on_response(&resp, &rejected);
        if let Some(e) = &ack.error_detail {
            self.metrics.nacks.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(type_url = %resp.type_url, nonce = %resp.nonce, "NACK: {}", e.message);
        }
        if known {
            if let Some(token) = self.ready.remove(resp.type_url.as_str()) {
                tracing::info!(type_url = %resp.type_url, resources, bytes, "first xDS response applied");
                token.done();
            }
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            self.metrics.last_update.store(now, Ordering::Relaxed);
            *lock(&self.metrics.held) = self.protocol.held_counts().into_iter().collect();
        }
        ack
    }
}

/// Whether the store holds a workload or service at `addr` (its subscription is live).
fn known(store: &Store, addr: &NetworkAddr) -> bool {
    let s = store.load();
    s.workload_by_addr(addr).is_some() || s.service_by_vip(addr, None).is_some()
}

fn status_error(address: &str, status: tonic::Status) -> XdsError {
    match status.code() {
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied => XdsError::Unauthenticated {
            address: address.to_owned(),
            message: status.message().to_owned(),
        },
        tonic::Code::Unavailable if status.message().contains("transport") => XdsError::Connect {
            address: address.to_owned(),
            detail: chain(&status),
        },
        _ => XdsError::Stream {
            address: address.to_owned(),
            status: Box::new(status),
        },
    }
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.5..1.5))
}

/// The node istiod expects from a ztunnel-compatible proxy.
fn node(s: &XdsSettings, cluster_id: &str, node_name: &str) -> Node {
    use prost_types::{value::Kind, Struct, Value};
    let str_value = |v: &str| Value {
        kind: Some(Kind::StringValue(v.to_owned())),
    };
    let mut fields: BTreeMap<String, Value> = s
        .meta
        .iter()
        .map(|(k, v)| (k.clone(), str_value(v)))
        .collect();
    fields.insert("NAME".into(), str_value(&s.pod_name));
    fields.insert("NAMESPACE".into(), str_value(&s.pod_namespace));
    fields.insert("INSTANCE_IPS".into(), str_value(&s.instance_ip));
    fields.insert("NODE_NAME".into(), str_value(node_name));
    fields.insert("CLUSTER_ID".into(), str_value(cluster_id));
    Node {
        id: format!(
            "ztunnel~{}~{}.{}~{}.svc.cluster.local",
            s.instance_ip, s.pod_name, s.pod_namespace, s.pod_namespace
        ),
        cluster: String::new(),
        metadata: Some(Struct { fields }),
        build_version: env!("CARGO_PKG_VERSION").into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_and_metadata() {
        let mut s = XdsSettings::plaintext("http://127.0.0.1:15010");
        s.pod_name = "ztunnel-abc".into();
        s.pod_namespace = "istio-system".into();
        s.instance_ip = "10.0.0.5".into();
        s.meta.insert("FOO".into(), "bar".into());
        let n = node(&s, "Kubernetes", "node-1");
        assert_eq!(
            n.id,
            "ztunnel~10.0.0.5~ztunnel-abc.istio-system~istio-system.svc.cluster.local"
        );
        let f = n.metadata.unwrap().fields;
        for k in ["NAME", "NAMESPACE", "INSTANCE_IPS", "NODE_NAME", "FOO"] {
            assert!(f.contains_key(k), "missing {k}");
        }
    }

    #[test]
    fn jitter_stays_within_half_and_one_and_a_half() {
        for _ in 0..1000 {
            let j = jitter(Duration::from_millis(100));
            assert!(
                j >= Duration::from_millis(50) && j <= Duration::from_millis(150),
                "{j:?}"
            );
        }
    }
}
