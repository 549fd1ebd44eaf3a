use std::collections::HashMap;

use l4mesh::proto::envoy::discovery::{Node, Status};

use super::*;
use crate::state::tests::{state, YAML};
use crate::state::Resources;

const CLIENT: &str = "cluster1//v1/Pod/default/client";
const ECHO: &str = "cluster1//v1/Pod/default/echo";
const SVC: &str = "default/echo.default.svc.cluster.local";

fn req(kind: Kind) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: kind.type_url().to_owned(),
        ..Default::default()
    }
}

fn first(kind: Kind) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~10.0.0.9~a.default~default.svc.cluster.local".into(),
            ..Default::default()
        }),
        ..req(kind)
    }
}

fn ack(kind: Kind, nonce: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        response_nonce: nonce.to_owned(),
        ..req(kind)
    }
}

fn nack(kind: Kind, nonce: &str, message: &str) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        error_detail: Some(Status {
            code: 3,
            message: message.into(),
            details: vec![],
        }),
        ..ack(kind, nonce)
    }
}

fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

/// One response, and its nonce.
fn one(out: Output) -> DeltaDiscoveryResponse {
    assert_eq!(out.responses.len(), 1, "{:?}", out.responses);
    out.responses.into_iter().next().unwrap()
}

fn edited(replace: &str, with: &str) -> State {
    assert!(YAML.contains(replace));
    State::new(Resources::from_yaml(&YAML.replace(replace, with)).unwrap())
}

#[test]
fn wildcard_initial_sync_sends_everything_then_acks_are_quiet() {
    let s = state();
    let mut st = StreamState::new("t");
    let r = one(st.on_request(&first(Kind::Address), &s, 1));
    assert_eq!(names(&r), [CLIENT, ECHO, SVC]);
    assert_eq!(r.type_url, Kind::Address.type_url());
    assert_eq!(r.nonce, "t-1");
    assert_eq!(r.system_version_info, s.system_version(Kind::Address));
    assert!(r.removed_resources.is_empty());
    let any = r.resources[0].resource.as_ref().unwrap();
    assert_eq!(any.type_url, Kind::Address.type_url());
    assert_eq!(
        r.resources[0].version,
        s.get(Kind::Address, CLIENT).unwrap().version
    );
    assert_eq!(
        st.node_id(),
        Some("ztunnel~10.0.0.9~a.default~default.svc.cluster.local")
    );

    let out = st.on_request(&ack(Kind::Address, &r.nonce), &s, 2);
    assert!(out.responses.is_empty());
    assert_eq!(
        out.events,
        [Event::Ack {
            kind: Kind::Address,
            nonce: "t-1".into()
        }]
    );
    let info = &st.info()[&Kind::Address];
    assert!(info.wildcard);
    assert_eq!((info.held, info.acked, info.acks), (3, 3, 1));
    assert_eq!(info.last_acked_nonce.as_deref(), Some("t-1"));
    assert!(info.pending_nonces.is_empty());
    // The same state again: nothing to say.
    assert!(st.on_state(&s).is_empty());
}

#[test]
fn first_request_is_answered_even_when_empty() {
    let mut st = StreamState::new("t");
    let r = one(st.on_request(&first(Kind::Authorization), &State::default(), 1));
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
    // A second request without changes is not answered.
    assert!(st
        .on_request(&ack(Kind::Authorization, &r.nonce), &State::default(), 2)
        .responses
        .is_empty());
}

#[test]
fn a_change_pushes_only_the_difference() {
    let s = state();
    let mut st = StreamState::new("t");
    let r = one(st.on_request(&first(Kind::Address), &s, 1));
    st.on_request(&ack(Kind::Address, &r.nonce), &s, 2);
    st.on_request(&first(Kind::Authorization), &s, 3);

    // echo's service account changes, the service goes away; policies are untouched.
    let mut next = edited("serviceAccount: echo", "serviceAccount: echo2");
    assert!(next.remove(Kind::Address, SVC));
    let rs = st.on_state(&next);
    assert_eq!(rs.len(), 1, "{rs:?}");
    assert_eq!(names(&rs[0]), [ECHO]);
    assert_eq!(rs[0].removed_resources, [SVC]);
    assert_ne!(rs[0].nonce, r.nonce);
    assert_eq!(
        rs[0].system_version_info,
        next.system_version(Kind::Address)
    );
    let info = &st.info()[&Kind::Address];
    assert_eq!((info.held, info.acked), (2, 1));
}

#[test]
fn nacked_versions_are_not_resent_until_they_change() {
    let s = state();
    let mut st = StreamState::new("t");
    let r = one(st.on_request(&first(Kind::Address), &s, 1));
    let out = st.on_request(&nack(Kind::Address, &r.nonce, "echo: bad port"), &s, 42);
    assert!(out.responses.is_empty());
    let Event::Nack { kind, nack } = &out.events[0] else {
        panic!("{:?}", out.events);
    };
    assert_eq!(*kind, Kind::Address);
    assert_eq!(nack.message, "echo: bad port");
    assert_eq!(nack.code, 3);
    assert_eq!(nack.time_unix_ms, 42);
    assert_eq!(nack.nonce, r.nonce);
    assert_eq!(nack.resources, [CLIENT, ECHO, SVC]);
    let info = &st.info()[&Kind::Address];
    assert_eq!(info.nacks.len(), 1);
    assert_eq!(info.acked, 0);
    assert!(info.last_acked_nonce.is_none());

    assert!(st.on_state(&s).is_empty(), "same versions: no resend");
    let next = edited("serviceAccount: echo", "serviceAccount: echo2");
    let rs = st.on_state(&next);
    assert_eq!(names(&rs[0]), [ECHO]);
}

#[test]
fn reconnect_with_initial_versions_gets_only_differences() {
    let s = state();
    let held = |n: &str| s.get(Kind::Address, n).unwrap().version.clone();
    let mut req = first(Kind::Address);
    req.initial_resource_versions = HashMap::from([
        (CLIENT.to_owned(), held(CLIENT)),
        (ECHO.to_owned(), "stale".to_owned()),
        ("cluster1//v1/Pod/default/gone".to_owned(), "1".to_owned()),
    ]);
    let mut st = StreamState::new("t2");
    let r = one(st.on_request(&req, &s, 1));
    assert_eq!(names(&r), [ECHO, SVC]);
    assert_eq!(r.removed_resources, ["cluster1//v1/Pod/default/gone"]);

    // Nothing differs: an empty answer (the first request of a type is always answered).
    let mut req = first(Kind::Address);
    req.initial_resource_versions = s
        .entries(Kind::Address)
        .map(|e| (e.name.clone(), e.version.clone()))
        .collect();
    let r = one(StreamState::new("t3").on_request(&req, &s, 1));
    assert!(r.resources.is_empty() && r.removed_resources.is_empty());
}

#[test]
fn on_demand_names_resolve_to_canonical_resources_with_aliases() {
    let s = state();
    let mut st = StreamState::new("t");
    let mut start = first(Kind::Address);
    start.resource_names_subscribe = vec!["*".into()];
    start.resource_names_unsubscribe = vec!["*".into()];
    let r = one(st.on_request(&start, &s, 1));
    assert!(r.resources.is_empty(), "subscribe+unsubscribe * is nothing");
    assert!(!st.info()[&Kind::Address].wildcard);

    let mut sub = ack(Kind::Address, &r.nonce);
    sub.resource_names_subscribe = vec!["/127.0.1.1".into(), "/10.9.9.9".into()];
    let r = one(st.on_request(&sub, &s, 2));
    assert_eq!(names(&r), [CLIENT]);
    assert_eq!(r.resources[0].aliases, ["/127.0.1.1"]);

    // A canonical name is sent as itself, without aliases.
    let mut sub = req(Kind::Address);
    sub.resource_names_subscribe = vec![SVC.into()];
    let r = one(st.on_request(&sub, &s, 3));
    assert_eq!(names(&r), [SVC]);
    assert!(r.resources[0].aliases.is_empty());

    // The unknown address appears later: it is sent then.
    let next = edited("[\"127.0.1.1\"]", "[\"127.0.1.1\", \"10.9.9.9\"]");
    let rs = st.on_state(&next);
    assert_eq!(rs.len(), 1);
    assert_eq!(names(&rs[0]), [CLIENT]);
    let mut aliases = rs[0].resources[0].aliases.clone();
    aliases.sort();
    assert_eq!(aliases, ["/10.9.9.9", "/127.0.1.1"]);

    // Unsubscribing both aliases removes the workload; the service stays.
    let mut unsub = req(Kind::Address);
    unsub.resource_names_unsubscribe = vec!["/127.0.1.1".into(), "/10.9.9.9".into()];
    let r = one(st.on_request(&unsub, &next, 4));
    assert!(r.resources.is_empty());
    assert_eq!(r.removed_resources, [CLIENT]);
    assert_eq!(st.info()[&Kind::Address].subscribed, [SVC]);
}

#[test]
fn a_new_alias_of_a_held_resource_is_sent_again() {
    let s = state();
    let mut st = StreamState::new("t");
    let mut start = first(Kind::Address);
    start.resource_names_subscribe = vec![SVC.into()];
    let r = one(st.on_request(&start, &s, 1));
    assert_eq!(names(&r), [SVC]);
    let mut sub = req(Kind::Address);
    sub.resource_names_subscribe = vec!["/127.10.0.1".into()];
    let r = one(st.on_request(&sub, &s, 2));
    assert_eq!(names(&r), [SVC]);
    assert_eq!(r.resources[0].aliases, ["/127.10.0.1"]);
}

#[test]
fn explicit_initial_versions_count_as_subscribed() {
    let s = state();
    let mut start = first(Kind::Address);
    start.resource_names_subscribe = vec!["*".into()];
    start.resource_names_unsubscribe = vec!["*".into()];
    start.initial_resource_versions = HashMap::from([(ECHO.to_owned(), "old".to_owned())]);
    let mut st = StreamState::new("t");
    let r = one(st.on_request(&start, &s, 1));
    assert_eq!(names(&r), [ECHO]);
    let mut gone = s.clone();
    gone.remove(Kind::Address, ECHO);
    let rs = st.on_state(&gone);
    assert_eq!(rs[0].removed_resources, [ECHO]);
}

#[test]
fn unsubscribing_the_wildcard_removes_everything_not_named() {
    let s = state();
    let mut st = StreamState::new("t");
    let mut start = first(Kind::Address);
    start.resource_names_subscribe = vec!["*".into(), ECHO.into()];
    assert_eq!(one(st.on_request(&start, &s, 1)).resources.len(), 3);
    let mut unsub = req(Kind::Address);
    unsub.resource_names_unsubscribe = vec!["*".into()];
    let r = one(st.on_request(&unsub, &s, 2));
    assert_eq!(r.removed_resources, [CLIENT, SVC]);
}

#[test]
fn unknown_types_and_nonces_are_reported() {
    let s = state();
    let mut st = StreamState::new("t");
    let mut r = req(Kind::Address);
    r.type_url = "type.googleapis.com/envoy.config.cluster.v3.Cluster".into();
    let out = st.on_request(&r, &s, 1);
    assert!(out.responses.is_empty());
    assert!(matches!(out.events[0], Event::UnknownType { .. }));

    st.on_request(&first(Kind::Address), &s, 1);
    let out = st.on_request(&ack(Kind::Address, "nope"), &s, 2);
    assert_eq!(
        out.events,
        [Event::UnknownNonce {
            kind: Kind::Address,
            nonce: "nope".into()
        }]
    );
}

#[test]
fn responses_carry_the_resource_bytes() {
    let mut s = state();
    s.put_raw(Kind::Authorization, "default/raw", vec![0xde, 0xad]);
    let mut st = StreamState::new("t");
    let r = one(st.on_request(&first(Kind::Authorization), &s, 1));
    let raw = r
        .resources
        .iter()
        .find(|r| r.name == "default/raw")
        .unwrap();
    let any = raw.resource.as_ref().unwrap();
    assert_eq!(any.value, [0xde, 0xad]);
    assert_eq!(any.type_url, Kind::Authorization.type_url());
    assert_eq!(raw.version, crate::state::version_of(&[0xde, 0xad]));
}
