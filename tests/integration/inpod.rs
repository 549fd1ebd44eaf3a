//! Shared mode's namespace handling on real network namespaces: a socket made through a pod's
//! `PodNetns` lives in that pod's namespace (reachable on the pod's own loopback, listed by the
//! pod's `ss`), and a descriptor that is not a network namespace is refused with a clear error.

use std::os::fd::OwnedFd;

use tokio::io::AsyncWriteExt;

use l4mesh::inpod::netns::PodNetns;

use super::netns::{privileged, Netns};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_are_made_inside_the_pod_namespace() {
    if !privileged("sockets_are_made_inside_the_pod_namespace", &[]) {
        return;
    }
    let pod = Netns::new("inpod");
    let fd: OwnedFd = std::fs::File::open(format!("/var/run/netns/{}", pod.name))
        .unwrap()
        .into();
    let ns = PodNetns::enter(fd, "default/pod").unwrap();
    let l = ns
        .listen("127.0.0.1:0".parse().unwrap(), true)
        .await
        .unwrap();
    let port = l.local_addr().unwrap().port();
    let l = tokio::net::TcpListener::from_std(l).unwrap();
    let served = tokio::spawn(async move {
        let (mut s, peer) = l.accept().await.unwrap();
        s.write_all(b"inside").await.unwrap();
        (peer, l)
    });
    // The pod's own loopback reaches it: the socket is the pod's.
    let (ok, out, err) = pod.output(&[
        "python3",
        "-c",
        "import socket,sys; s=socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=3); print(s.recv(16).decode())",
        &port.to_string(),
    ]);
    assert!(ok, "connect from inside the pod: {out} {err}");
    assert_eq!(out.trim(), "inside");
    let (peer, _listening) = served.await.unwrap();
    assert!(peer.ip().is_loopback());
    let (_, listing, _) = pod.output(&["ss", "-ltnH"]);
    assert!(
        listing.contains(&format!("127.0.0.1:{port}")),
        "the pod's ss lists the listener: {listing}"
    );
    // The thread keeps serving: more sockets through the same namespace.
    for _ in 0..16 {
        let l = ns.listen("127.0.0.1:0".parse().unwrap(), false).await;
        assert!(l.is_ok(), "{l:?}");
    }
    // Not a network namespace: refused, naming the pod.
    let f: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
    let e = PodNetns::enter(f, "default/bad").unwrap_err().to_string();
    assert!(
        e.contains("entering the network namespace of default/bad"),
        "{e}"
    );
    assert_eq!(ns.pod(), "default/pod");
}

/// A bad request: what it is, its payload (or raw bytes), the descriptors sent with it, and
/// what its error ack must name.
type Case = (
    &'static str,
    Option<l4mesh::proto::istio::workload::zds::workload_request::Payload>,
    Option<Vec<u8>>,
    Vec<std::fs::File>,
    &'static str,
);

/// The next packet l4mesh sends on the ZDS connection (within 5 s).
async fn answer(conn: &l4mesh::inpod::transport::Conn) -> l4mesh::inpod::transport::Packet {
    tokio::time::timeout(std::time::Duration::from_secs(5), conn.recv())
        .await
        .expect("an answer within 5 s")
        .unwrap()
        .expect("the connection stays open")
}

/// The descriptors process `pid` holds.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A misbehaving CNI agent against the real binary in shared mode: every bad request gets an
/// error ack naming it (a `del` of an unknown pod a no-op ack), in order; l4mesh keeps running,
/// a valid pod is served and removed after, and no descriptor is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_zds_requests_are_refused_without_leaks() {
    use l4mesh::inpod::transport::Server;
    use l4mesh::proto::istio::workload::zds as pb;
    use pb::workload_request::Payload;
    use prost::Message;
    use std::os::fd::AsFd;
    use std::time::Duration;

    if !privileged("bad_zds_requests_are_refused_without_leaks", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("zds.sock");
    let server = Server::bind(&sock).unwrap();
    let node = Netns::new("zdsnode");
    let pod = Netns::new("zdspod");
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let (mut child, log) = node.spawn_owned(
        &[bin],
        &[
            ("PROXY_MODE", "shared"),
            ("INPOD_UDS", sock.to_str().unwrap()),
            ("CONNECTION_TERMINATION_DEADLINE", "1s"),
            ("RUST_LOG", "info"),
        ],
        "listening",
    );
    let pid = child.id();
    let conn = tokio::time::timeout(Duration::from_secs(10), server.accept())
        .await
        .expect("l4mesh connects to the agent")
        .unwrap();
    let hello = answer(&conn).await;
    assert_eq!(
        pb::ZdsHello::decode(hello.bytes.as_slice())
            .unwrap()
            .version,
        pb::Version::V1 as i32
    );
    let ask = |payload: Option<Payload>, raw: Option<Vec<u8>>, files: Vec<std::fs::File>| {
        let conn = &conn;
        async move {
            let bytes = raw.unwrap_or_else(|| pb::WorkloadRequest { payload }.encode_to_vec());
            let fds: Vec<_> = files.iter().map(|f| f.as_fd()).collect();
            conn.send(&bytes, &fds).await.unwrap();
            drop(files);
            let p = answer(conn).await;
            match pb::WorkloadResponse::decode(p.bytes.as_slice())
                .unwrap()
                .payload
            {
                Some(pb::workload_response::Payload::Ack(a)) => a.error,
                None => panic!("a response without an ack"),
            }
        }
    };
    let info = |name: &str| {
        Some(pb::WorkloadInfo {
            name: name.into(),
            namespace: "default".into(),
            service_account: "sa".into(),
        })
    };
    let add = |uid: &str, wi| {
        Some(Payload::Add(pb::AddWorkload {
            uid: uid.into(),
            workload_info: wi,
        }))
    };
    let null = || std::fs::File::open("/dev/null").unwrap();
    let netns = || std::fs::File::open(format!("/var/run/netns/{}", pod.name)).unwrap();
    // The first snapshot: l4mesh becomes ready, and what it opens once is open.
    let snapshot = Some(Payload::SnapshotSent(pb::SnapshotSent {}));
    assert_eq!(ask(snapshot.clone(), None, vec![]).await, "");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let baseline = fds(pid);

    let cases: Vec<Case> = vec![
        (
            "garbage",
            None,
            Some(vec![0xff; 7]),
            vec![],
            "not a WorkloadRequest",
        ),
        (
            "truncated",
            None,
            Some(vec![0x0a; 70 * 1024]),
            vec![],
            "truncated",
        ),
        ("no payload", None, Some(Vec::new()), vec![], "no payload"),
        (
            "add without fd",
            add("a", info("a")),
            None,
            vec![],
            "without a descriptor",
        ),
        (
            "add with 2 fds",
            add("a", info("a")),
            None,
            vec![null(), null()],
            "2 descriptors",
        ),
        (
            "add with 4 fds",
            add("a", info("a")),
            None,
            vec![null(), null(), null(), null()],
            "4 descriptors",
        ),
        (
            "add without info",
            add("a", None),
            None,
            vec![netns()],
            "no workload_info",
        ),
        (
            "add of a non-netns",
            add("a", info("a")),
            None,
            vec![null()],
            "entering the network namespace",
        ),
        (
            "empty uid",
            add("", info("a")),
            None,
            vec![netns()],
            "empty uid",
        ),
        (
            "del with fd",
            Some(Payload::Del(pb::DelWorkload { uid: "a".into() })),
            None,
            vec![null()],
            "1 descriptors",
        ),
        (
            "snapshot with fd",
            snapshot.clone(),
            None,
            vec![null()],
            "1 descriptors",
        ),
        (
            "keep of an unknown uid",
            Some(Payload::Keep(pb::KeepWorkload {
                uid: "ghost".into(),
            })),
            None,
            vec![],
            "not served",
        ),
    ];
    for (what, payload, raw, files, expect) in cases {
        let e = ask(payload, raw, files).await;
        assert!(
            e.contains(expect),
            "{what}: ack {e:?}, expected it to name {expect:?}"
        );
    }
    // A del of an unknown pod: nothing to do, acked.
    let del = |uid: &str| Some(Payload::Del(pb::DelWorkload { uid: uid.into() }));
    assert_eq!(ask(del("ghost"), None, vec![]).await, "");
    // A valid pod is still served after all that, and removed cleanly.
    assert_eq!(
        ask(add("good", info("good")), None, vec![netns()]).await,
        ""
    );
    let (_, listening, _) = pod.output(&["ss", "-ltnH"]);
    assert!(listening.contains(":15001"), "the pod listens: {listening}");
    assert_eq!(ask(del("good"), None, vec![]).await, "");
    log.wait_for(&["pod drained", "uid=good"])
        .unwrap_or_else(|| panic!("the pod was not drained:\n{}", log.all()));
    let (_, listening, _) = pod.output(&["ss", "-ltnH"]);
    assert!(
        !listening.contains(":15001"),
        "the pod's listeners are gone: {listening}"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "l4mesh is still running"
    );
    let settled = (0..30).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        fds(pid) <= baseline
    });
    assert!(
        settled,
        "descriptors: {} now, {baseline} before the bad requests\n{}",
        fds(pid),
        log.all()
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// Istio's ztunnel for interop tests: `ZTUNNEL_BIN`, else `../shared/bin/ztunnel` next to the
/// project; `None` (the caller skips, saying why) when neither exists.
pub fn ztunnel_bin() -> Option<std::path::PathBuf> {
    let p = std::env::var_os("ZTUNNEL_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bin/ztunnel")
        });
    p.exists().then_some(p)
}

/// `l4mesh node-agent` speaks the real protocol: Istio's ztunnel in shared mode, following it,
/// says hello, acks the replay, becomes ready, binds its listeners inside the announced pod's
/// namespace, and closes them when the pod leaves the agent's file.
#[test]
fn real_ztunnel_follows_the_node_agent() {
    if !privileged("real_ztunnel_follows_the_node_agent", &["ss"]) {
        return;
    }
    let Some(ztunnel) = ztunnel_bin() else {
        eprintln!("SKIPPED real_ztunnel_follows_the_node_agent: no ztunnel at ZTUNNEL_BIN or ../shared/bin/ztunnel");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (sock, pods, mesh) = (
        dir.path().join("zds.sock"),
        dir.path().join("pods.yaml"),
        dir.path().join("mesh.yaml"),
    );
    let mut node = Netns::new("ztnode");
    let pod = Netns::new("ztpod");
    let pod_file = format!(
        "pods:\n- uid: uid-p1\n  name: p1\n  namespace: default\n  serviceAccount: sa\n  netns: /var/run/netns/{}\n",
        pod.name
    );
    std::fs::write(&pods, &pod_file).unwrap();
    std::fs::write(
        &mesh,
        super::harness::workload_yaml("p1", "sa", "10.251.0.2", "node-1", "  services: {}\n")
            .replacen("- uid", "workloads:\n- uid", 1),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let agent = node.spawn(
        &[
            bin,
            "node-agent",
            "--socket",
            sock.to_str().unwrap(),
            "--pods",
            pods.to_str().unwrap(),
            "--no-capture",
            "--removal-delay",
            "0s",
        ],
        &[("RUST_LOG", "info")],
        "serving ZDS",
    );
    let zt = node.spawn(
        &[ztunnel.to_str().unwrap()],
        &[
            ("PROXY_MODE", "shared"),
            ("INPOD_UDS", sock.to_str().unwrap()),
            ("FAKE_CA", "true"),
            ("XDS_ADDRESS", ""),
            ("CA_ADDRESS", ""),
            ("LOCAL_XDS_PATH", mesh.to_str().unwrap()),
            ("NODE_NAME", "node-1"),
            ("RUST_LOG", "info"),
        ],
        "",
    );
    let logs = || format!("agent:\n{}\nztunnel:\n{}", agent.all(), zt.all());
    agent
        .wait_for(&["replay to the proxy complete", "pods=1"])
        .unwrap_or_else(|| panic!("ztunnel did not ack the replay\n{}", logs()));
    let listens = |want: bool| {
        (0..100).any(|_| {
            let (_, out, _) = pod.output(&["ss", "-ltnH"]);
            let all = [":15001", ":15006", ":15008"]
                .iter()
                .all(|p| out.contains(p));
            let none = [":15001", ":15006", ":15008"]
                .iter()
                .all(|p| !out.contains(p));
            if (want && all) || (!want && none) {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        })
    };
    assert!(listens(true), "ztunnel listens in the pod\n{}", logs());
    let (ok, _, err) = node.output(&[
        "python3",
        "-c",
        "import urllib.request; assert urllib.request.urlopen('http://127.0.0.1:15021/healthz/ready', timeout=3).status == 200",
    ]);
    assert!(ok, "ztunnel is ready after the snapshot: {err}\n{}", logs());
    // The pod leaves the file: `del`, acked, and ztunnel stops listening there.
    std::fs::write(&pods, "pods: []\n").unwrap();
    assert!(
        listens(false),
        "ztunnel closed the pod's listeners\n{}",
        logs()
    );
    assert!(
        !agent.all().contains("refused a request"),
        "ztunnel acked every request without error\n{}",
        logs()
    );
}
