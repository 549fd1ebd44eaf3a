//! `respond` on real DNS messages (built and read with hickory-proto): what the store answers,
//! what it forwards, what it refuses.

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};

use super::*;

fn snapshot() -> std::sync::Arc<crate::store::Snapshot> {
    let store = crate::store::Store::new();
    store.apply(
        crate::localconfig::parse(
            r#"
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.9.0.1"]
  ports: { 80: 8080 }
"#,
        )
        .unwrap(),
    );
    store.load()
}

fn query(name: &str, t: RecordType) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(4242).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
    m.to_vec().unwrap()
}

const C: answer::Client<'static> = answer::Client {
    namespace: Some("default"),
    network: "",
};

fn reply(q: &[u8]) -> Message {
    match respond(q, &snapshot(), C, "cluster.local") {
        Reply::Send { bytes, .. } => Message::from_vec(&bytes).unwrap(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_service_is_answered_authoritatively_in_any_case() {
    let m = reply(&query("EcHo.Default.svc.cluster.local.", RecordType::A));
    assert_eq!(m.id(), 4242);
    assert_eq!(m.message_type(), MessageType::Response);
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.authoritative());
    let a: Vec<_> = m.answers().iter().map(|r| r.data().clone()).collect();
    assert_eq!(
        a,
        [RData::A(
            "10.9.0.1".parse::<std::net::Ipv4Addr>().unwrap().into()
        )]
    );
    assert_eq!(m.answers()[0].ttl(), TTL_SECS);
}

#[test]
fn the_other_family_is_noerror_without_answers() {
    let m = reply(&query("echo.default.svc.cluster.local.", RecordType::AAAA));
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
}

#[test]
fn a_search_domain_spelling_gets_a_cname_then_the_address() {
    let m = reply(&query(
        "echo.default.default.svc.cluster.local.",
        RecordType::A,
    ));
    let answers = m.answers();
    assert_eq!(answers.len(), 2, "{answers:?}");
    match answers[0].data() {
        RData::CNAME(c) => assert_eq!(c.0.to_ascii(), "echo.default.svc.cluster.local."),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        answers[1].name().to_ascii(),
        "echo.default.svc.cluster.local."
    );
}

#[test]
fn other_names_are_forwarded_and_garbage_refused() {
    assert_eq!(
        respond(
            &query("example.org.", RecordType::A),
            &snapshot(),
            C,
            "cluster.local"
        ),
        Reply::Forward
    );
    // A header and garbage: FORMERR with the request's id.
    let m = match respond(
        &[0x12, 0x34, 0xff, 0xff, 1],
        &snapshot(),
        C,
        "cluster.local",
    ) {
        Reply::Send { bytes, rcode } => {
            assert_eq!(rcode, ResponseCode::FormErr);
            Message::from_vec(&bytes).unwrap()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(m.id(), 0x1234);
    // Not even an id: nothing to answer.
    assert_eq!(respond(&[1], &snapshot(), C, "cluster.local"), Reply::Drop);
    // A response is never answered (no ping-pong between servers).
    let mut r =
        Message::from_vec(&query("echo.default.svc.cluster.local.", RecordType::A)).unwrap();
    r.set_message_type(MessageType::Response);
    assert_eq!(
        respond(&r.to_vec().unwrap(), &snapshot(), C, "cluster.local"),
        Reply::Drop
    );
    let s = servfail(&query("example.org.", RecordType::A)).unwrap();
    assert_eq!(
        Message::from_vec(&s).unwrap().response_code(),
        ResponseCode::ServFail
    );
    assert_eq!(
        question(&query("x.", RecordType::AAAA)),
        Some(("x.".to_owned(), "aaaa".to_owned()))
    );
    assert_eq!(question(&[1, 2, 3]), None);
}
