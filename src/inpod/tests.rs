//! The ZDS session against a fake agent on a socket pair: hello first, one ack per request in
//! order, valid requests handed over with their descriptor, bad ones refused with a reason and
//! their descriptors closed, the session ending cleanly when the agent goes.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use prost::Message;

use super::*;
use crate::proto::istio::workload::zds as pb;

#[derive(Default)]
struct Recorder {
    reconnects: usize,
    seen: Vec<String>,
    /// The namespaces received, kept open as a pod manager would.
    netns: Vec<OwnedFd>,
}

impl PodHandler for Recorder {
    fn reconnected(&mut self) {
        self.reconnects += 1;
    }

    async fn handle(&mut self, req: Request) -> Result<(), String> {
        match req {
            Request::Add { uid, netns, .. } => {
                self.seen.push(format!("add {uid}"));
                self.netns.push(netns);
                Ok(())
            }
            Request::Keep { uid } => {
                self.seen.push(format!("keep {uid}"));
                Ok(())
            }
            Request::Del { uid } if uid == "unknown" => Err(format!("no pod {uid}")),
            Request::Del { uid } => {
                self.seen.push(format!("del {uid}"));
                Ok(())
            }
            Request::SnapshotSent => {
                self.seen.push("snapshot_sent".into());
                Ok(())
            }
        }
    }
}

fn encode(p: pb::workload_request::Payload) -> Vec<u8> {
    pb::WorkloadRequest { payload: Some(p) }.encode_to_vec()
}

async fn ack_of(agent: &transport::Conn) -> String {
    let p = tokio::time::timeout(Duration::from_secs(2), agent.recv())
        .await
        .expect("an ack within 2 s")
        .unwrap()
        .expect("the session is open");
    match pb::WorkloadResponse::decode(p.bytes.as_slice())
        .unwrap()
        .payload
    {
        Some(pb::workload_response::Payload::Ack(a)) => a.error,
        None => panic!("a response without an ack"),
    }
}

#[tokio::test]
async fn one_ack_per_request_in_order_and_bad_input_changes_nothing() {
    use pb::workload_request::Payload;
    let (proxy, agent) = transport::pair().unwrap();
    let session = tokio::spawn(async move {
        let mut r = Recorder::default();
        session(&proxy, &mut r).await.map(|()| r)
    });
    let hello = agent.recv().await.unwrap().unwrap();
    assert_eq!(
        pb::ZdsHello::decode(hello.bytes.as_slice())
            .unwrap()
            .version,
        pb::Version::V1 as i32
    );
    let add = |uid: &str| {
        encode(Payload::Add(pb::AddWorkload {
            uid: uid.into(),
            workload_info: None,
        }))
    };
    // A good add with its namespace (a socket standing in for it).
    let (ns, _ns_far) = UnixStream::pair().unwrap();
    agent.send(&add("p1"), &[ns.as_fd()]).await.unwrap();
    drop(ns);
    assert_eq!(ack_of(&agent).await, "");
    // An add without a descriptor; a keep with one; garbage; two descriptors on an add.
    agent.send(&add("p2"), &[]).await.unwrap();
    assert!(ack_of(&agent).await.contains("without a descriptor"));
    let (stray, mut stray_far) = UnixStream::pair().unwrap();
    stray_far
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let keep = encode(Payload::Keep(pb::KeepWorkload { uid: "p1".into() }));
    agent.send(&keep, &[stray.as_fd()]).await.unwrap();
    drop(stray);
    assert!(ack_of(&agent).await.contains("expected 0"));
    assert!(
        matches!(stray_far.read(&mut [0u8; 1]), Ok(0)),
        "the stray descriptor must be closed"
    );
    agent.send(b"\x08\xff\xff", &[]).await.unwrap();
    assert!(ack_of(&agent).await.contains("not a WorkloadRequest"));
    let (x, _xf) = UnixStream::pair().unwrap();
    let (y, _yf) = UnixStream::pair().unwrap();
    agent
        .send(&add("p3"), &[x.as_fd(), y.as_fd()])
        .await
        .unwrap();
    assert!(ack_of(&agent).await.contains("2 descriptors"));
    // The handler's own refusal comes back too.
    let del = |uid: &str| encode(Payload::Del(pb::DelWorkload { uid: uid.into() }));
    agent.send(&del("unknown"), &[]).await.unwrap();
    assert_eq!(ack_of(&agent).await, "no pod unknown");
    agent.send(&keep, &[]).await.unwrap();
    assert_eq!(ack_of(&agent).await, "");
    agent
        .send(&encode(Payload::SnapshotSent(pb::SnapshotSent {})), &[])
        .await
        .unwrap();
    assert_eq!(ack_of(&agent).await, "");
    agent.send(&del("p1"), &[]).await.unwrap();
    assert_eq!(ack_of(&agent).await, "");
    drop(agent);
    let r = tokio::time::timeout(Duration::from_secs(2), session)
        .await
        .unwrap()
        .unwrap()
        .expect("the session ends cleanly when the agent goes");
    assert_eq!(
        r.seen,
        ["add p1", "keep p1", "snapshot_sent", "del p1"].map(String::from)
    );
    assert_eq!(r.netns.len(), 1);
}

#[tokio::test]
async fn follow_waits_for_the_agent_and_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ztunnel.sock");
    let p = path.clone();
    let follower = tokio::spawn(async move {
        let mut r = Recorder::default();
        follow(&p, &mut r).await;
    });
    // The agent appears after l4mesh started trying.
    tokio::time::sleep(Duration::from_millis(300)).await;
    // std has no SEQPACKET listener: rustix's.
    let fd = rustix::net::socket_with(
        rustix::net::AddressFamily::UNIX,
        rustix::net::SocketType::SEQPACKET,
        rustix::net::SocketFlags::CLOEXEC,
        None,
    )
    .unwrap();
    rustix::net::bind(&fd, &rustix::net::SocketAddrUnix::new(&path).unwrap()).unwrap();
    rustix::net::listen(&fd, 4).unwrap();
    for _ in 0..2 {
        let accepted = tokio::task::spawn_blocking({
            let fd = fd.try_clone().unwrap();
            move || rustix::net::accept(&fd).unwrap()
        })
        .await
        .unwrap();
        let agent = transport::Conn::from_fd(accepted).unwrap();
        let hello = tokio::time::timeout(Duration::from_secs(5), agent.recv())
            .await
            .expect("a hello on every connection")
            .unwrap()
            .unwrap();
        assert!(pb::ZdsHello::decode(hello.bytes.as_slice()).is_ok());
        // The agent restarts: l4mesh reconnects.
        drop(agent);
    }
    follower.abort();
}
