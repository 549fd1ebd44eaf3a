//! l4mesh: an L4 node proxy for Istio's ambient mesh.
//!
//! Module map, with the layering rule: imports point down this list, never up.
//! 1. [`socket`], [`telemetry`], [`otel`], [`http_server`], [`readiness`], [`redirect`], [`drain`],
//!    [`limits`], [`seqpacket`], [`handoff`] —
//!    basics (the only `unsafe`/libc lives in `socket`; the only `std::process::Command` in
//!    `redirect`, the capture-rules subcommand; `otel` exports spans and records the proxy
//!    describes to it; `http_server` is the accept loop of the small HTTP servers; `drain` is
//!    graceful shutdown's signal and connection count; `limits` caps each listener's connections;
//!    `seqpacket` passes descriptors over unix sockets; `handoff` hands listening sockets to a
//!    successor in an upgrade);
//! 2. [`proto`], [`model`] — generated wire types, and the plain domain types validated from them;
//! 3. [`store`], [`localconfig`], [`rbac`] — the lock-free snapshot of the mesh, the YAML file that
//!    feeds it, and L4 authorization evaluated against a snapshot;
//! 4. [`control_plane`], [`xds`], [`identity`] — the gRPC channel to istiod, the delta-xDS client
//!    that feeds the store, workload certificates;
//! 5. [`tls`] — rustls configurations with SPIFFE verification (HBONE's mutual TLS);
//! 6. [`proxy`] — the data plane: listeners, routing, copying bytes;
//! 7. [`metrics`] — Prometheus metrics: the registry, its scrape-time collectors (which read the
//!    proxy, xDS and identity state) and the HTTP server; its `traffic` and `peers` children
//!    depend only on `model`/`store`, as the data path updates them;
//! 8. [`admin`] — the operators' HTTP API (config dump, log levels, drain-then-exit); [`inpod`] —
//!    shared mode's ZDS link to istio-cni (protocol, socket, the follow loop);
//! 9. [`config`], [`app`] — typed configuration and the composition root.
//!
//! `model`, `store`, `rbac` and `proxy::route` do no I/O and are tested with plain `#[test]`s.

pub mod admin;
pub mod app;
pub mod config;
pub mod control_plane;
pub mod dns;
pub mod drain;
pub mod handoff;
pub mod http_server;
pub mod identity;
pub mod inpod;
pub mod limits;
pub mod localconfig;
pub mod metrics;
pub mod model;
pub mod otel;
pub mod proto;
pub mod proxy;
pub mod rbac;
pub mod readiness;
pub mod redirect;
pub mod seqpacket;
pub mod socket;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod xds;
