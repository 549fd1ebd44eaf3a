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
    search: None,
};

fn rules() -> answer::NameRules {
    answer::NameRules::new("cluster.local")
}

fn ask(q: &[u8]) -> Reply {
    respond(q, &snapshot(), C, &rules(), Transport::Udp)
}

fn reply(q: &[u8]) -> Message {
    match ask(q) {
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
    // ztunnel's answer: a CNAME to the name without the search domain, then its address.
    match answers[0].data() {
        RData::CNAME(c) => assert_eq!(c.0.to_ascii(), "echo.default."),
        other => panic!("{other:?}"),
    }
    assert_eq!(answers[1].name().to_ascii(), "echo.default.");
}

#[test]
fn other_names_are_forwarded_and_garbage_refused() {
    assert_eq!(ask(&query("example.org.", RecordType::A)), Reply::Forward);
    // A header and garbage: FORMERR with the request's id.
    let m = match ask(&[0x12, 0x34, 0xff, 0xff, 1]) {
        Reply::Send { bytes, rcode } => {
            assert_eq!(rcode, ResponseCode::FormErr);
            Message::from_vec(&bytes).unwrap()
        }
        other => panic!("{other:?}"),
    };
    assert_eq!(m.id(), 0x1234);
    // Not even an id: nothing to answer.
    assert_eq!(ask(&[1]), Reply::Drop);
    // A response is never answered (no ping-pong between servers).
    let mut r =
        Message::from_vec(&query("echo.default.svc.cluster.local.", RecordType::A)).unwrap();
    r.set_message_type(MessageType::Response);
    assert_eq!(ask(&r.to_vec().unwrap()), Reply::Drop);
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

#[test]
fn other_record_types_of_mesh_names_are_forwarded_as_ztunnel() {
    for t in [
        RecordType::TXT,
        RecordType::SRV,
        RecordType::MX,
        RecordType::NS,
    ] {
        assert_eq!(
            ask(&query("echo.default.svc.cluster.local.", t)),
            Reply::Forward,
            "{t}"
        );
    }
}

/// A headless service with `n` endpoints.
fn many(n: u32) -> std::sync::Arc<crate::store::Snapshot> {
    let mut yaml = String::from("workloads:\n");
    for i in 0..n {
        yaml += &format!(
            "- {{ uid: w/p{i}, name: p{i}, namespace: default, serviceAccount: p, workloadIps: [\"10.2.{}.{}\"], services: {{ \"default/big.default.svc.cluster.local\": {{ 80: 80 }} }} }}\n",
            i / 250,
            i % 250 + 1
        );
    }
    yaml += "services:\n- { name: big, namespace: default, hostname: big.default.svc.cluster.local, ports: { 80: 80 } }\n";
    let store = crate::store::Store::new();
    store.apply(crate::localconfig::parse(&yaml).unwrap());
    store.load()
}

#[test]
fn a_reply_too_large_for_udp_is_truncated_and_whole_over_tcp() {
    let s = many(300);
    let q = query("big.default.svc.cluster.local.", RecordType::A);
    let (udp, tcp) = (
        respond(&q, &s, C, &rules(), Transport::Udp),
        respond(&q, &s, C, &rules(), Transport::Tcp),
    );
    let Reply::Send { bytes, .. } = udp else {
        panic!("{udp:?}")
    };
    assert!(bytes.len() <= 512, "{}", bytes.len());
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.truncated());
    // As many as fit: one more would not.
    let kept = m.answers().len();
    let mut more = m.clone();
    let extra = more.answers()[0].clone();
    more.add_answer(extra);
    assert!(kept > 20 && more.to_vec().unwrap().len() > 512, "{kept}");
    let Reply::Send { bytes, .. } = tcp else {
        panic!("{tcp:?}")
    };
    let m = Message::from_vec(&bytes).unwrap();
    assert!(!m.truncated());
    assert_eq!(m.answers().len(), 300);
    // A client announcing a larger UDP payload (EDNS) gets more, and an EDNS record back.
    let mut big = Message::from_vec(&q).unwrap();
    let mut edns = Edns::new();
    edns.set_max_payload(4096);
    big.set_edns(edns);
    let Reply::Send { bytes, .. } =
        respond(&big.to_vec().unwrap(), &s, C, &rules(), Transport::Udp)
    else {
        panic!()
    };
    let m = Message::from_vec(&bytes).unwrap();
    assert!(bytes.len() <= 4096 && m.truncated() && m.answers().len() > 200);
    assert_eq!(
        m.extensions().as_ref().map(Edns::max_payload),
        Some(EDNS_PAYLOAD)
    );
}

#[test]
fn a_cname_stays_first_when_truncated() {
    // `big` through the search list: a CNAME, then as many addresses as fit.
    let s = many(300);
    let q = query("big.default.default.svc.cluster.local.", RecordType::A);
    let Reply::Send { bytes, .. } = respond(&q, &s, C, &rules(), Transport::Udp) else {
        panic!()
    };
    let m = Message::from_vec(&bytes).unwrap();
    assert!(m.truncated() && bytes.len() <= 512);
    assert!(matches!(m.answers()[0].data(), RData::CNAME(_)));
}

#[test]
fn forwarded_answers_fit_the_clients_udp_size() {
    let s = many(300);
    let q = query("big.default.svc.cluster.local.", RecordType::A);
    // What an upstream would send whole over TCP: 300 answers.
    let Reply::Send { bytes: whole, .. } = respond(&q, &s, C, &rules(), Transport::Tcp) else {
        panic!()
    };
    let cut = fit_udp(&q, whole.clone());
    assert!(cut.len() <= 512);
    let m = Message::from_vec(&cut).unwrap();
    assert!(m.truncated() && m.id() == 4242 && !m.answers().is_empty());
    // Small enough already: as it came.
    let small = query("x.", RecordType::A);
    assert_eq!(fit_udp(&small, small.clone()), small);
    // Not a message at all (an upstream's garbage): an empty truncated reply, within the size.
    let junk = vec![0xffu8; 2000];
    let m = Message::from_vec(&fit_udp(&q, junk)).unwrap();
    assert!(m.truncated() && m.answers().is_empty() && m.id() == 4242);
    // A question of another class is not the mesh's: forwarded.
    let mut chaos = Message::from_vec(&q).unwrap();
    let mut cq = chaos.take_queries().remove(0);
    cq.set_query_class(hickory_proto::rr::DNSClass::CH);
    chaos.add_query(cq);
    assert_eq!(
        respond(&chaos.to_vec().unwrap(), &s, C, &rules(), Transport::Udp),
        Reply::Forward
    );
}
