//! Integration tests: an in-process xds-testserver on ephemeral loopback ports, driven with
//! l4mesh's generated tonic client over real sockets. One test binary with modules links once.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod testserver {
    mod admin;
    mod ads;
    mod ca;
    mod ca_binary;
    pub mod common;
    mod tls;
}
