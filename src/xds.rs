//! The delta-xDS client: streams workloads, services and L4 policies from istiod (or
//! xds-testserver) into the store, one batch per response, and answers each with an ACK or a NACK
//! naming every rejected resource. Reconnects with jittered backoff and resumes from the versions
//! it holds; while disconnected the store keeps the last known state and traffic keeps flowing.
//!
//! Split: `protocol` (pure bookkeeping: subscriptions, versions, ACK/NACK), `convert` (response →
//! batch, per-resource rejects), `demand` (pure bounds of on-demand xDS), `client` (the tonic
//! loop, TLS, credentials, backoff, on-demand).
//! Not here: certificates (identity), what the resources mean (proxy, rbac).

mod client;
mod convert;
pub mod demand;
pub mod protocol;
mod settings;

pub use client::{OnDemand, XdsClient, XdsError, XdsMetrics};
pub use convert::response_to_batch;
pub use settings::{RootCa, XdsSettings};
