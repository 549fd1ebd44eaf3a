//! xDS resources from the control plane: one resource's bytes, as an Address (workload or
//! service) or an Authorization (policy) by the first byte, through the same conversion a
//! response takes. A bad resource must be rejected by name, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use l4mesh::proto::envoy::discovery::{DeltaDiscoveryResponse, Resource};
use l4mesh::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

fuzz_target!(|data: &[u8]| {
    let Some((&kind, value)) = data.split_first() else {
        return;
    };
    let type_url = if kind & 1 == 0 {
        ADDRESS_TYPE_URL
    } else {
        AUTHORIZATION_TYPE_URL
    };
    let resp = DeltaDiscoveryResponse {
        type_url: type_url.to_owned(),
        resources: vec![Resource {
            name: "fuzz".into(),
            version: "1".into(),
            resource: Some(prost_types::Any {
                type_url: type_url.to_owned(),
                value: value.to_vec(),
            }),
            ..Default::default()
        }],
        removed_resources: if kind & 2 == 0 {
            Vec::new()
        } else {
            vec![String::from_utf8_lossy(value).into_owned()]
        },
        nonce: "n".into(),
        ..Default::default()
    };
    let (batch, rejected) = l4mesh::xds::response_to_batch(&resp);
    // Whatever was accepted must apply to a store.
    let store = l4mesh::store::Store::new();
    store.apply(batch);
    for r in rejected {
        let _ = r;
    }
});
