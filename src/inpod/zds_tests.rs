use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use prost::Message;

use super::*;

/// A descriptor to pass, and the far end that reads EOF once every copy of it is closed.
fn probe() -> (OwnedFd, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    b.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (OwnedFd::from(a), b)
}

fn closed(far: &mut UnixStream) -> bool {
    matches!(far.read(&mut [0u8; 1]), Ok(0))
}

fn req(payload: pb::workload_request::Payload) -> Vec<u8> {
    pb::WorkloadRequest {
        payload: Some(payload),
    }
    .encode_to_vec()
}

fn add(uid: &str) -> Vec<u8> {
    req(pb::workload_request::Payload::Add(pb::AddWorkload {
        uid: uid.into(),
        workload_info: Some(pb::WorkloadInfo {
            name: "p".into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
        }),
    }))
}

#[test]
fn add_takes_its_one_descriptor() {
    let (fd, mut far) = probe();
    match decode(&add("uid-1"), vec![fd], false, false).unwrap() {
        Request::Add { uid, info, netns } => {
            assert_eq!(uid, "uid-1");
            assert_eq!(
                info,
                Some(WorkloadInfo {
                    name: "p".into(),
                    namespace: "ns".into(),
                    service_account: "sa".into()
                })
            );
            drop(netns);
        }
        other => panic!("{other:?}"),
    }
    assert!(closed(&mut far));
}

#[test]
fn every_refusal_names_the_problem_and_closes_the_descriptors() {
    use pb::workload_request::Payload;
    let keep = req(Payload::Keep(pb::KeepWorkload { uid: "k".into() }));
    let del = req(Payload::Del(pb::DelWorkload { uid: "d".into() }));
    let snap = req(Payload::SnapshotSent(pb::SnapshotSent {}));
    let empty_uid = req(Payload::Del(pb::DelWorkload { uid: String::new() }));
    let cases: Vec<(Vec<u8>, usize, bool, bool, ZdsError)> = vec![
        (
            add("a"),
            0,
            false,
            false,
            ZdsError::AddWithoutNetns { uid: "a".into() },
        ),
        (
            add("a"),
            2,
            false,
            false,
            ZdsError::Descriptors {
                kind: "add",
                count: 2,
                expected: 1,
            },
        ),
        (
            keep.clone(),
            1,
            false,
            false,
            ZdsError::Descriptors {
                kind: "keep",
                count: 1,
                expected: 0,
            },
        ),
        (
            del,
            1,
            false,
            false,
            ZdsError::Descriptors {
                kind: "del",
                count: 1,
                expected: 0,
            },
        ),
        (
            snap,
            3,
            false,
            false,
            ZdsError::Descriptors {
                kind: "snapshot_sent",
                count: 3,
                expected: 0,
            },
        ),
        (add("a"), 1, true, false, ZdsError::Truncated),
        (add("a"), 1, false, true, ZdsError::ControlTruncated),
        (vec![], 0, false, false, ZdsError::NoPayload),
        (
            empty_uid,
            0,
            false,
            false,
            ZdsError::EmptyUid { kind: "del" },
        ),
    ];
    for (packet, n, trunc, ctrunc, want) in cases {
        let (fds, mut fars): (Vec<_>, Vec<_>) = (0..n).map(|_| probe()).unzip();
        let got = decode(&packet, fds, trunc, ctrunc).unwrap_err();
        assert_eq!(got, want);
        assert!(!got.to_string().is_empty());
        for far in &mut fars {
            assert!(closed(far), "a descriptor stayed open after {got}");
        }
    }
    let e = decode(b"\xff\xff\xff", Vec::new(), false, false).unwrap_err();
    assert!(matches!(e, ZdsError::Undecodable(_)), "{e}");
}

#[test]
fn hello_and_acks_are_the_wire_messages() {
    let h = pb::ZdsHello::decode(hello().as_slice()).unwrap();
    assert_eq!(h.version, pb::Version::V1 as i32);
    let ok = pb::WorkloadResponse::decode(ack(Ok(())).as_slice()).unwrap();
    let bad = pb::WorkloadResponse::decode(ack(Err("no")).as_slice()).unwrap();
    let text = |r: pb::WorkloadResponse| match r.payload {
        Some(pb::workload_response::Payload::Ack(a)) => a.error,
        None => panic!("no ack"),
    };
    assert_eq!(text(ok), "");
    assert_eq!(text(bad), "no");
}

#[test]
fn replay_removes_what_was_not_replayed_once() {
    let held: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
    let mut r = Replay::default();
    r.saw("a");
    r.saw("c");
    r.saw("new");
    assert!(!r.is_done());
    assert_eq!(r.finish(&held), vec!["b".to_owned()]);
    assert!(r.is_done());
    r.saw("b");
    assert!(
        r.finish(&held).is_empty(),
        "a second snapshot_sent removes nothing"
    );
}
