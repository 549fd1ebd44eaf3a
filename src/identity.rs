//! Workload identity: one SPIFFE certificate per identity this node proxy serves, obtained from a
//! certificate authority (Istio's CA over gRPC, or a self-signed local CA), renewed at half its
//! lifetime, and handed to the TLS layer.
//!
//! Not here: TLS configurations and peer verification (`tls`), which identities the node serves
//! (the caller says, from the store).

mod cert;

pub use cert::{leaf_facts, pem_certs, refresh_at, CertError, WorkloadCert};
