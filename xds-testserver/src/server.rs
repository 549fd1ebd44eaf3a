//! [`Handle`]: binds the gRPC and admin listeners, serves them, watches the state file, and offers
//! the state operations that the admin API and tests use. `Shared` is what every task holds: the
//! current state (a `watch` channel that also wakes every stream on a change), the client registry,
//! the token, the mesh CA and the shutdown signal. Both gRPC services, delta ADS and the Istio CA,
//! are served on the one gRPC listener.
//!
//! Not here: the protocol (`protocol`), the per-stream loop (`ads`), the CA policy (`ca`), the
//! HTTP routes (`admin`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use l4mesh::proto::envoy::discovery::aggregated_discovery_service_server::AggregatedDiscoveryServiceServer;
use l4mesh::proto::istio::ca::istio_certificate_service_server::IstioCertificateServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::{info, warn};

use crate::ca::{CaService, CaStats, MeshCa};
use crate::clients::{ClientInfo, Nack, Registry};
use crate::state::{Resources, State, StateSummary};
use crate::{admin, ads, tls, watch as file_watch, Config, Error, Kind, StateSource};

/// How long [`Handle::shutdown`] waits for each server task before aborting it.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// What every task of a server shares.
pub(crate) struct Shared {
    state: watch::Sender<Arc<State>>,
    clients: Mutex<Registry>,
    /// The bearer token every stream and CA request must present, if any.
    pub token: Option<String>,
    /// The mesh CA.
    pub ca: MeshCa,
    shutdown: watch::Sender<bool>,
    /// Unique to this server run, so nonces never repeat across restarts.
    pub nonce_prefix: String,
    next_client_id: AtomicU64,
}

impl Shared {
    fn new(state: State, token: Option<String>, ca: MeshCa) -> Self {
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        Self {
            state: watch::Sender::new(Arc::new(state)),
            clients: Mutex::new(Registry::default()),
            token,
            ca,
            shutdown: watch::Sender::new(false),
            nonce_prefix: format!("{:x}", boot & 0xffff_ffff_ffff),
            next_client_id: AtomicU64::new(1),
        }
    }

    /// Follows the state: the stream tasks wait on this for changes.
    pub fn subscribe_state(&self) -> watch::Receiver<Arc<State>> {
        self.state.subscribe()
    }

    /// The current state.
    pub fn current_state(&self) -> Arc<State> {
        self.state.borrow().clone()
    }

    /// Completes when the server is shutting down.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.shutdown.subscribe();
        async move {
            // An error means the sender is gone: stopped as well.
            let _ = rx.wait_for(|stop| *stop).await;
        }
    }

    /// The registry (poisoning is ignored: it holds plain data).
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new stream id.
    pub fn next_client_id(&self) -> u64 {
        self.next_client_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Applies `f` to a copy of the state (O(1): its maps are persistent) and publishes it when `f`
    /// says it changed something.
    fn modify(&self, f: impl FnOnce(&mut State) -> bool) -> bool {
        self.state.send_if_modified(|current| {
            let mut next = State::clone(current);
            let changed = f(&mut next);
            if changed {
                *current = Arc::new(next);
            }
            changed
        })
    }

    /// Replaces the whole state with `resources` and pushes the difference.
    pub fn replace(&self, resources: Resources) {
        self.modify(|s| {
            s.replace(resources);
            true
        });
    }

    /// Replaces the whole state with the YAML's resources.
    pub fn set_state_yaml(&self, yaml: &str) -> Result<(), Error> {
        self.replace(Resources::from_yaml(yaml)?);
        Ok(())
    }

    /// Adds or replaces each resource of the YAML.
    pub fn upsert_yaml(&self, yaml: &str) -> Result<(), Error> {
        let resources = Resources::from_yaml(yaml)?;
        self.modify(|s| {
            s.upsert(resources);
            true
        });
        Ok(())
    }

    /// Removes one resource.
    pub fn remove(&self, kind: Kind, name: &str) -> bool {
        self.modify(|s| s.remove(kind, name))
    }

    /// Serves raw bytes as a resource.
    pub fn push_raw(&self, kind: Kind, name: &str, value: Vec<u8>) {
        self.modify(|s| {
            s.put_raw(kind, name, value);
            true
        });
    }

    /// Names and versions.
    pub fn summary(&self) -> StateSummary {
        self.state.borrow().summary()
    }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or_default()
}

/// A running server. Dropping it stops serving too, without waiting; prefer [`Handle::shutdown`].
pub struct Handle {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Handle {
    /// Loads the state, binds the listeners (port 0 picks an ephemeral port), and serves until
    /// [`Handle::shutdown`]. Fails on an invalid state, an unusable CA or CA setting, a root that
    /// cannot be written, a serving certificate that cannot be made, a listener that cannot be bound,
    /// or a state file that cannot be watched. Must be called within a tokio runtime.
    pub async fn start(config: Config) -> Result<Handle, Error> {
        let resources = match &config.state {
            StateSource::Yaml(yaml) => Resources::from_yaml(yaml)?,
            StateSource::File(path) => Resources::from_file(path)?,
        };
        let (ca, ca_pem) = MeshCa::setup(&config)?;
        let tls = match &config.tls {
            Some(tls_config) => Some(tls::serving(
                tls_config,
                &ca_pem,
                &ca.root_der(),
                config.listen.ip(),
            )?),
            None => None,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|error| Error::Bind {
                what: "gRPC",
                addr: config.listen,
                error,
            })?;
        let addr = listener.local_addr().map_err(|error| Error::Bind {
            what: "gRPC",
            addr: config.listen,
            error,
        })?;
        let admin_listener = match config.admin_listen {
            Some(admin) => {
                let l = TcpListener::bind(admin)
                    .await
                    .map_err(|error| Error::Bind {
                        what: "admin",
                        addr: admin,
                        error,
                    })?;
                let a = l.local_addr().map_err(|error| Error::Bind {
                    what: "admin",
                    addr: admin,
                    error,
                })?;
                Some((l, a))
            }
            None => None,
        };
        let (addresses, policies) = (
            resources.count(Kind::Address),
            resources.count(Kind::Authorization),
        );
        let shared = Arc::new(Shared::new(State::new(resources), config.token.clone(), ca));

        let mut tasks = Vec::new();
        if let StateSource::File(path) = &config.state {
            tasks.push(file_watch::spawn(path.clone(), shared.clone())?);
        }

        let mut builder = tonic::transport::Server::builder();
        let serves_tls = tls.is_some();
        if let Some(tls) = tls {
            builder = builder
                .tls_config(tls)
                .map_err(|e| Error::Tls(e.to_string()))?;
        }
        let stopped = shared.stopped();
        let router = builder
            .add_service(AggregatedDiscoveryServiceServer::new(ads::Ads::new(
                shared.clone(),
            )))
            .add_service(IstioCertificateServiceServer::new(CaService::new(
                shared.clone(),
            )));
        tasks.push(tokio::spawn(async move {
            let incoming = TcpListenerStream::new(listener);
            if let Err(e) = router.serve_with_incoming_shutdown(incoming, stopped).await {
                warn!(error = %e, "gRPC server failed");
            }
        }));

        let admin_addr = admin_listener.map(|(listener, admin_addr)| {
            let app = admin::router(shared.clone());
            let stopped = shared.stopped();
            tasks.push(tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stopped)
                    .await
                {
                    warn!(error = %e, "admin server failed");
                }
            }));
            admin_addr
        });
        info!(
            %addr,
            admin = ?admin_addr,
            tls = serves_tls,
            token = shared.token.is_some(),
            trust_domain = shared.ca.trust_domain(),
            ca = if shared.ca.plugged_in() { "plug-in" } else { "generated" },
            addresses,
            policies,
            "xds-testserver serving delta ADS and the Istio CA"
        );
        Ok(Handle {
            shared,
            addr,
            admin_addr,
            tasks,
        })
    }

    /// The gRPC address actually bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin API address actually bound, if any.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The mesh root certificate (PEM): workload certificates and, with TLS, the serving certificate
    /// chain to it. Always `Some` (the CA exists with or without TLS); an `Option` for the callers
    /// written when it existed with TLS only.
    pub fn root_cert_pem(&self) -> Option<String> {
        Some(self.shared.ca.root_pem())
    }

    /// Certificates signed and requests refused so far by the CA.
    pub fn ca_stats(&self) -> CaStats {
        self.shared.ca.stats()
    }

    /// Replaces the whole state with the YAML (local-config format) and pushes the differences.
    /// An invalid YAML changes nothing.
    pub fn set_state_yaml(&self, yaml: &str) -> Result<(), Error> {
        self.shared.set_state_yaml(yaml)
    }

    /// Adds or replaces (by name) every resource of the YAML; the others stay.
    pub fn upsert_yaml(&self, yaml: &str) -> Result<(), Error> {
        self.shared.upsert_yaml(yaml)
    }

    /// Removes one resource by name (workload uid, `namespace/hostname`, `namespace/name`); false when
    /// there was none.
    pub fn remove(&self, kind: Kind, name: &str) -> bool {
        self.shared.remove(kind, name)
    }

    /// Serves `value`, unchecked, as the `Any.value` of resource `name` (to test how a client handles
    /// malformed input). It replaces any resource of that name.
    pub fn push_raw(&self, kind: Kind, name: &str, value: Vec<u8>) {
        self.shared.push_raw(kind, name, value)
    }

    /// Connected and recently disconnected clients.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.shared.registry().clients()
    }

    /// Every NACK received (the most recent 1024), oldest first.
    pub fn nacks(&self) -> Vec<Nack> {
        self.shared.registry().nacks()
    }

    /// Resource names and versions currently served.
    pub fn state(&self) -> StateSummary {
        self.shared.summary()
    }

    /// Stops serving: the listeners close, open streams end with `UNAVAILABLE`, the file watch stops.
    /// Waits up to 5 s per task, then aborts it.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        for mut task in std::mem::take(&mut self.tasks) {
            if tokio::time::timeout(SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                warn!("a server task did not stop in time; aborting it");
                task.abort();
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        for task in &self.tasks {
            task.abort();
        }
    }
}
