//! Integration tests: l4mesh started in-process on 127.0.0.0/8 addresses with real TCP backends.
//! One test binary with modules links once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod integration {
    mod admin;
    mod app_servers;
    mod app_tunnel;
    pub mod binary;
    mod capture;
    mod cluster;
    mod dns;
    mod dns_ztunnel;
    mod drain;
    mod envoy;
    mod faults;
    pub mod harness;
    mod hbone;
    mod identity;
    pub mod inpod;
    mod limits;
    mod local_mode;
    mod metrics;
    mod multinetwork;
    pub mod netns;
    mod otel;
    mod raw_hbone;
    mod rbac;
    mod redirect;
    mod trust;
    mod upgrade;
    mod waypoint;
    mod xds;
}
