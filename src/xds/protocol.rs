//! Delta-xDS bookkeeping, pure: what the client holds per type (name → version), what it is
//! subscribed to, the requests to send on (re)connect, and the ACK or NACK for each response.
//! No I/O and no clock: the client loop in `client.rs` feeds it.

use std::collections::{BTreeSet, HashMap};

use crate::proto::envoy::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status};
use crate::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// The two types an ambient node proxy subscribes to, in the order it subscribes.
pub const TYPES: [&str; 2] = [ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL];

/// gRPC status code INVALID_ARGUMENT, used in NACKs.
const INVALID_ARGUMENT: i32 = 3;

/// A resource of a response that was not applied, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub name: String,
    pub reason: String,
}

/// Per-type state.
#[derive(Clone, Debug, Default)]
pub struct TypeState {
    /// Name → version of every resource held (applied).
    pub held: HashMap<String, String>,
    /// Wildcard subscription (everything); false in on-demand mode.
    pub wildcard: bool,
    /// Names subscribed explicitly (on-demand).
    pub names: BTreeSet<String>,
    /// Whether a response of this type has been applied since start.
    pub synced: bool,
}

/// The client side of the delta protocol for all types.
#[derive(Clone, Debug)]
pub struct Protocol {
    node: Node,
    /// In [`TYPES`] order (Address first, as ztunnel subscribes).
    types: Vec<(&'static str, TypeState)>,
}

impl Protocol {
    /// `on_demand` makes the Address type start with no subscription (names come one by one).
    pub fn new(node: Node, on_demand: bool) -> Self {
        let types = TYPES
            .iter()
            .map(|t| {
                let wildcard = !(on_demand && *t == ADDRESS_TYPE_URL);
                (
                    *t,
                    TypeState {
                        wildcard,
                        ..Default::default()
                    },
                )
            })
            .collect();
        Self { node, types }
    }

    pub fn state(&self, type_url: &str) -> Option<&TypeState> {
        self.types
            .iter()
            .find(|(t, _)| *t == type_url)
            .map(|(_, s)| s)
    }

    fn state_mut(&mut self, type_url: &str) -> Option<&mut TypeState> {
        self.types
            .iter_mut()
            .find(|(t, _)| *t == type_url)
            .map(|(_, s)| s)
    }

    /// The first request of every type on a new stream: node, subscriptions, and the versions
    /// already held so that the server only sends what changed (and removes what is gone).
    pub fn initial_requests(&self) -> Vec<DeltaDiscoveryRequest> {
        self.types
            .iter()
            .map(|(t, st)| {
                let (subscribe, unsubscribe) = if st.wildcard {
                    (Vec::new(), Vec::new())
                } else {
                    // `*` in and out in one request: explicitly nothing but the names.
                    let mut s = vec!["*".to_owned()];
                    s.extend(st.names.iter().cloned());
                    (s, vec!["*".to_owned()])
                };
                DeltaDiscoveryRequest {
                    node: Some(self.node.clone()),
                    type_url: (*t).to_owned(),
                    resource_names_subscribe: subscribe,
                    resource_names_unsubscribe: unsubscribe,
                    initial_resource_versions: st
                        .held
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                    ..Default::default()
                }
            })
            .collect()
    }

    /// Records what a response changed (after the caller applied the accepted part) and returns
    /// the one request that answers it: an ACK, or a NACK naming every rejected resource.
    /// Rejected resources keep their previously held version, so a fixed resend is applied.
    pub fn on_response(
        &mut self,
        resp: &DeltaDiscoveryResponse,
        rejected: &[Rejected],
    ) -> DeltaDiscoveryRequest {
        let mut req = DeltaDiscoveryRequest {
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        };
        let Some(st) = self.state_mut(&resp.type_url) else {
            req.error_detail = Some(Status {
                code: INVALID_ARGUMENT,
                message: format!(
                    "unexpected type {:?}: expected one of {:?}",
                    resp.type_url, TYPES
                ),
                details: vec![],
            });
            return req;
        };
        let bad: BTreeSet<&str> = rejected.iter().map(|r| r.name.as_str()).collect();
        for r in &resp.resources {
            if !bad.contains(r.name.as_str()) {
                st.held.insert(r.name.clone(), r.version.clone());
            }
        }
        for name in &resp.removed_resources {
            st.held.remove(name);
        }
        st.synced = true;
        if !rejected.is_empty() {
            let detail: Vec<String> = rejected
                .iter()
                .map(|r| format!("{}: {}", r.name, r.reason))
                .collect();
            req.error_detail = Some(Status {
                code: INVALID_ARGUMENT,
                message: format!(
                    "rejected {} of {} resources: {}",
                    rejected.len(),
                    resp.resources.len(),
                    detail.join("; ")
                ),
                details: vec![],
            });
        }
        req
    }

    /// Subscribes to one more name (on-demand); `None` when already subscribed or wildcard.
    pub fn subscribe(&mut self, type_url: &str, name: &str) -> Option<DeltaDiscoveryRequest> {
        let st = self.state_mut(type_url)?;
        if st.wildcard || !st.names.insert(name.to_owned()) {
            return None;
        }
        Some(DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_subscribe: vec![name.to_owned()],
            ..Default::default()
        })
    }

    /// Unsubscribes on-demand names (what the store holds of them is removed by the server);
    /// `None` when none of them was subscribed.
    pub fn unsubscribe(
        &mut self,
        type_url: &str,
        names: &[String],
    ) -> Option<DeltaDiscoveryRequest> {
        let st = self.state_mut(type_url)?;
        let gone: Vec<String> = names
            .iter()
            .filter(|n| st.names.remove(n.as_str()))
            .cloned()
            .collect();
        (!gone.is_empty()).then(|| DeltaDiscoveryRequest {
            type_url: type_url.to_owned(),
            resource_names_unsubscribe: gone,
            ..Default::default()
        })
    }

    /// Whether every type has applied at least one response.
    pub fn all_synced(&self) -> bool {
        self.types.iter().all(|(_, s)| s.synced)
    }

    /// How many resources are held per type, for metrics.
    pub fn held_counts(&self) -> Vec<(&'static str, usize)> {
        self.types.iter().map(|(t, s)| (*t, s.held.len())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::discovery::Resource;

    fn node() -> Node {
        Node {
            id: "ztunnel~127.0.0.1~l4mesh.istio-system~istio-system.svc.cluster.local".into(),
            ..Default::default()
        }
    }

    fn resp(
        type_url: &str,
        nonce: &str,
        res: &[(&str, &str)],
        removed: &[&str],
    ) -> DeltaDiscoveryResponse {
        DeltaDiscoveryResponse {
            type_url: type_url.into(),
            nonce: nonce.into(),
            resources: res
                .iter()
                .map(|(n, v)| Resource {
                    name: (*n).into(),
                    version: (*v).into(),
                    ..Default::default()
                })
                .collect(),
            removed_resources: removed.iter().map(|s| (*s).to_owned()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn first_requests_are_wildcard_with_node() {
        let p = Protocol::new(node(), false);
        let reqs = p.initial_requests();
        assert_eq!(reqs.len(), 2);
        for r in &reqs {
            assert!(r.node.is_some());
            assert!(r.resource_names_subscribe.is_empty());
            assert!(r.initial_resource_versions.is_empty());
        }
        assert_eq!(reqs[0].type_url, ADDRESS_TYPE_URL);
        assert_eq!(reqs[1].type_url, AUTHORIZATION_TYPE_URL);
    }

    #[test]
    fn ack_tracks_versions_and_reconnect_sends_them() {
        let mut p = Protocol::new(node(), false);
        let ack = p.on_response(
            &resp(ADDRESS_TYPE_URL, "n1", &[("a", "1"), ("b", "1")], &[]),
            &[],
        );
        assert_eq!(ack.response_nonce, "n1");
        assert!(ack.error_detail.is_none());
        assert!(
            ack.node.is_none(),
            "only the first request carries the node"
        );
        p.on_response(&resp(ADDRESS_TYPE_URL, "n2", &[("a", "2")], &["b"]), &[]);
        let reqs = p.initial_requests();
        let addr = &reqs[0];
        assert_eq!(addr.initial_resource_versions.len(), 1);
        assert_eq!(addr.initial_resource_versions["a"], "2");
        assert!(!p.all_synced(), "authorization has not answered yet");
        p.on_response(&resp(AUTHORIZATION_TYPE_URL, "n3", &[], &[]), &[]);
        assert!(p.all_synced());
    }

    #[test]
    fn nack_names_every_rejected_resource_and_keeps_old_versions() {
        let mut p = Protocol::new(node(), false);
        p.on_response(&resp(ADDRESS_TYPE_URL, "n1", &[("a", "1")], &[]), &[]);
        let rejected = vec![
            Rejected {
                name: "a".into(),
                reason: "field `addresses[0]`: 5 bytes".into(),
            },
            Rejected {
                name: "c".into(),
                reason: "not a workload".into(),
            },
        ];
        let nack = p.on_response(
            &resp(
                ADDRESS_TYPE_URL,
                "n2",
                &[("a", "2"), ("b", "1"), ("c", "1")],
                &[],
            ),
            &rejected,
        );
        let e = nack.error_detail.expect("a NACK");
        assert_eq!(nack.response_nonce, "n2");
        assert!(
            e.message.contains("a: field `addresses[0]`"),
            "{}",
            e.message
        );
        assert!(e.message.contains("c: not a workload"), "{}", e.message);
        assert!(e.message.contains("rejected 2 of 3"), "{}", e.message);
        let st = p.state(ADDRESS_TYPE_URL).unwrap();
        assert_eq!(
            st.held["a"], "1",
            "the rejected update keeps the old version"
        );
        assert_eq!(st.held["b"], "1");
        assert!(!st.held.contains_key("c"));
    }

    #[test]
    fn unknown_type_is_nacked() {
        let mut p = Protocol::new(node(), false);
        let nack = p.on_response(&resp("type.googleapis.com/foo", "n", &[], &[]), &[]);
        assert!(nack
            .error_detail
            .unwrap()
            .message
            .contains("unexpected type"));
    }

    #[test]
    fn on_demand_subscribes_names() {
        let mut p = Protocol::new(node(), true);
        let reqs = p.initial_requests();
        assert_eq!(reqs[0].resource_names_subscribe, vec!["*"]);
        assert_eq!(reqs[0].resource_names_unsubscribe, vec!["*"]);
        assert!(
            reqs[1].resource_names_subscribe.is_empty(),
            "policies stay wildcard"
        );
        let sub = p.subscribe(ADDRESS_TYPE_URL, "/10.0.0.1").unwrap();
        assert_eq!(sub.resource_names_subscribe, vec!["/10.0.0.1"]);
        assert!(
            p.subscribe(ADDRESS_TYPE_URL, "/10.0.0.1").is_none(),
            "once only"
        );
        assert!(
            p.subscribe(AUTHORIZATION_TYPE_URL, "x").is_none(),
            "wildcard already"
        );
        // A reconnect re-subscribes the names.
        let reqs = p.initial_requests();
        assert_eq!(reqs[0].resource_names_subscribe, vec!["*", "/10.0.0.1"]);
        // An unsubscribed name is gone from the next reconnect; unknown names send nothing.
        let un = p
            .unsubscribe(ADDRESS_TYPE_URL, &["/10.0.0.1".into(), "/10.9.9.9".into()])
            .unwrap();
        assert_eq!(un.resource_names_unsubscribe, vec!["/10.0.0.1"]);
        assert!(p
            .unsubscribe(ADDRESS_TYPE_URL, &["/10.0.0.1".into()])
            .is_none());
        assert_eq!(p.initial_requests()[0].resource_names_subscribe, vec!["*"]);
    }
}
