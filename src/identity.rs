//! Workload identity: one SPIFFE certificate per identity this node proxy serves, obtained from a
//! certificate authority (Istio's CA over gRPC, or a self-signed local CA), renewed at half its
//! lifetime, and handed to the TLS layer.
//!
//! Not here: TLS configurations and peer verification (`tls`), which identities the node serves
//! (the caller says, from the store).

mod ca_client;
mod cert;
mod local_ca;
mod manager;

pub use ca_client::{CaClient, FetchError, IstioCa, IstioCaSettings, DEFAULT_CA_TIMEOUT};
pub use cert::{leaf_facts, pem_certs, refresh_at, CertError, WorkloadCert};
pub use local_ca::{csr_for, der_to_pem, workload_cert_from_chain, CaError, LocalCa};
pub use manager::{CertHold, CertState, CertStatus, NoCertificate, SecretManager};

use std::sync::Arc;

use crate::model::SpiffeId;
use crate::store::Store;

/// Keeps the certificates of exactly the identities of this node's workloads (those whose `node`
/// equals `node_name`; with `only`, just that one identity), following every store change: new
/// identities are prefetched, departed ones dropped. Runs until the store is dropped.
pub async fn follow_store(
    store: Arc<Store>,
    node_name: String,
    only: Option<SpiffeId>,
    secrets: Arc<SecretManager>,
) {
    let mut rx = store.subscribe();
    loop {
        let ids: Vec<SpiffeId> = match &only {
            Some(id) => vec![id.clone()],
            None => {
                let snap = store.load();
                let mut ids: Vec<SpiffeId> = snap
                    .workloads_on_node(&node_name)
                    .map(|w| w.identity())
                    .collect();
                ids.sort();
                ids.dedup();
                ids
            }
        };
        secrets.retain(&ids);
        if rx.changed().await.is_err() {
            return;
        }
    }
}
