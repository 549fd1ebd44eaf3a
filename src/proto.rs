//! Types generated from `proto/` by `build.rs`. Protobuf stops at `localconfig` and (later) `xds`:
//! everything else sees [`crate::model`] types.
#![allow(clippy::all, missing_docs)]

pub mod envoy {
    pub mod discovery {
        include!(concat!(env!("OUT_DIR"), "/envoy.service.discovery.v3.rs"));
    }
}

pub mod istio {
    pub mod workload {
        include!(concat!(env!("OUT_DIR"), "/istio.workload.rs"));
        pub mod zds {
            include!(concat!(env!("OUT_DIR"), "/istio.workload.zds.rs"));
        }
    }
    pub mod security {
        include!(concat!(env!("OUT_DIR"), "/istio.security.rs"));
    }
    pub mod ca {
        include!(concat!(env!("OUT_DIR"), "/istio.v1.auth.rs"));
    }
}

/// Type URL of a Workload or Service resource (`istio.workload.Address`).
pub const ADDRESS_TYPE_URL: &str = "type.googleapis.com/istio.workload.Address";
/// Type URL of an L4 authorization policy (`istio.security.Authorization`).
pub const AUTHORIZATION_TYPE_URL: &str = "type.googleapis.com/istio.security.Authorization";
