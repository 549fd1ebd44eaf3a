//! One delta response → one store batch, resource by resource: a resource that does not decode or
//! validate is rejected by name (and NACKed) while the others still apply.

use prost::Message;

use super::protocol::Rejected;
use crate::model::{self, PolicyKey};
use crate::proto::envoy::discovery::DeltaDiscoveryResponse;
use crate::proto::istio::security as psec;
use crate::proto::istio::workload as pw;
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use crate::store::{Batch, Removal, Upsert};

/// Converts the resources and removals of `resp` (of a known type).
pub fn response_to_batch(resp: &DeltaDiscoveryResponse) -> (Batch, Vec<Rejected>) {
    let mut batch = Batch::default();
    let mut rejected = Vec::new();
    let is_address = resp.type_url == ADDRESS_TYPE_URL;
    for r in &resp.resources {
        let reject = |reason: String| Rejected {
            name: r.name.clone(),
            reason,
        };
        let Some(any) = &r.resource else {
            rejected.push(reject("expected a resource body, found none".into()));
            continue;
        };
        if any.type_url != resp.type_url {
            rejected.push(reject(format!(
                "expected a resource of type {:?}, found {:?}",
                resp.type_url, any.type_url
            )));
            continue;
        }
        let upsert = if is_address {
            pw::Address::decode(any.value.as_slice())
                .map_err(|e| format!("not a valid istio.workload.Address: {e}"))
                .and_then(|a| model::Resource::try_from(a).map_err(|e| e.to_string()))
                .map(|res| match res {
                    model::Resource::Workload(w) => Upsert::Workload(w),
                    model::Resource::Service(s) => Upsert::Service(s),
                })
        } else {
            psec::Authorization::decode(any.value.as_slice())
                .map_err(|e| format!("not a valid istio.security.Authorization: {e}"))
                .and_then(|a| model::Authorization::try_from(a).map_err(|e| e.to_string()))
                .map(Upsert::Policy)
        };
        match upsert {
            Ok(u) => {
                if let Some(key) = key_of(&u) {
                    if key != r.name && !r.aliases.contains(&r.name) {
                        tracing::debug!(name = %r.name, %key, "xDS resource name differs from its key");
                    }
                }
                batch.upserts.push(u);
            }
            Err(reason) => rejected.push(reject(reason)),
        }
    }
    for name in &resp.removed_resources {
        batch.removals.push(if is_address {
            Removal::Address(name.clone())
        } else {
            Removal::Policy(PolicyKey(name.as_str().into()))
        });
    }
    debug_assert!(is_address || resp.type_url == AUTHORIZATION_TYPE_URL);
    (batch, rejected)
}

fn key_of(u: &Upsert) -> Option<String> {
    Some(match u {
        Upsert::Workload(w) => w.uid.to_string(),
        Upsert::Service(s) => s.key().to_string(),
        Upsert::Policy(p) => p.key().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::discovery::Resource;

    fn any(type_url: &str, value: Vec<u8>) -> Option<prost_types::Any> {
        Some(prost_types::Any {
            type_url: type_url.into(),
            value,
        })
    }

    #[test]
    fn bad_resources_are_rejected_by_name_and_the_rest_applies() {
        let good = pw::Address {
            r#type: Some(pw::address::Type::Workload(pw::Workload {
                uid: "c//v1/Pod/ns/good".into(),
                name: "good".into(),
                namespace: "ns".into(),
                addresses: vec![vec![10, 0, 0, 1]],
                ..Default::default()
            })),
        };
        let bad_ip = pw::Address {
            r#type: Some(pw::address::Type::Workload(pw::Workload {
                uid: "c//v1/Pod/ns/bad".into(),
                name: "bad".into(),
                namespace: "ns".into(),
                addresses: vec![vec![10, 0, 0, 1, 5]],
                ..Default::default()
            })),
        };
        let resp = DeltaDiscoveryResponse {
            type_url: ADDRESS_TYPE_URL.into(),
            resources: vec![
                Resource {
                    name: "c//v1/Pod/ns/good".into(),
                    resource: any(ADDRESS_TYPE_URL, good.encode_to_vec()),
                    ..Default::default()
                },
                Resource {
                    name: "c//v1/Pod/ns/bad".into(),
                    resource: any(ADDRESS_TYPE_URL, bad_ip.encode_to_vec()),
                    ..Default::default()
                },
                Resource {
                    name: "garbage".into(),
                    resource: any(ADDRESS_TYPE_URL, vec![0xff, 0xff, 0xff]),
                    ..Default::default()
                },
                Resource {
                    name: "wrongtype".into(),
                    resource: any(AUTHORIZATION_TYPE_URL, vec![]),
                    ..Default::default()
                },
                Resource {
                    name: "empty".into(),
                    resource: None,
                    ..Default::default()
                },
            ],
            removed_resources: vec!["ns/svc.example".into()],
            ..Default::default()
        };
        let (batch, rejected) = response_to_batch(&resp);
        assert_eq!(batch.upserts.len(), 1);
        assert_eq!(
            batch.removals,
            vec![Removal::Address("ns/svc.example".into())]
        );
        let names: Vec<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(
            names,
            vec!["c//v1/Pod/ns/bad", "garbage", "wrongtype", "empty"]
        );
        assert!(
            rejected[0].reason.contains("addresses[0]"),
            "{}",
            rejected[0].reason
        );
        assert!(rejected[1]
            .reason
            .contains("not a valid istio.workload.Address"));
    }

    #[test]
    fn policies_convert_and_remove() {
        let p = psec::Authorization {
            name: "deny".into(),
            namespace: "ns".into(),
            scope: 1,
            action: 1,
            ..Default::default()
        };
        let bad = psec::Authorization {
            action: 9,
            ..p.clone()
        };
        let resp = DeltaDiscoveryResponse {
            type_url: AUTHORIZATION_TYPE_URL.into(),
            resources: vec![
                Resource {
                    name: "ns/deny".into(),
                    resource: any(AUTHORIZATION_TYPE_URL, p.encode_to_vec()),
                    ..Default::default()
                },
                Resource {
                    name: "ns/bad".into(),
                    resource: any(AUTHORIZATION_TYPE_URL, bad.encode_to_vec()),
                    ..Default::default()
                },
            ],
            removed_resources: vec!["ns/old".into()],
            ..Default::default()
        };
        let (batch, rejected) = response_to_batch(&resp);
        assert_eq!(batch.upserts.len(), 1);
        assert_eq!(
            batch.removals,
            vec![Removal::Policy(PolicyKey("ns/old".into()))]
        );
        assert_eq!(rejected.len(), 1);
        assert!(
            rejected[0].reason.contains("action"),
            "{}",
            rejected[0].reason
        );
    }
}
