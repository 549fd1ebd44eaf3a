//! Both ends of the exchange in one process, on real sockets: a running side serving its kept
//! sockets at a path, a successor taking them over.

use super::*;
use std::io::{Read, Write};

fn running_side(dir: &Path) -> (PathBuf, std::net::TcpListener, Sockets, Server) {
    let path = dir.join("handoff.sock");
    let mut sockets = Sockets::keeping();
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    sockets.keep("outbound", Kind::Tcp, Some(addr), l.as_fd());
    let server = listen(&path, &mut sockets).unwrap();
    (path, l, sockets, server)
}

fn handover(drain: &crate::drain::Drain) -> (Handover, Released) {
    let released = Released::default();
    let h = Handover {
        drain: drain.clone(),
        released: released.clone(),
        metrics: Box::new(|om| {
            Some(if om {
                "# TYPE up gauge\nup 1\n# EOF\n".into()
            } else {
                "up 1\n".into()
            })
        }),
    };
    (h, released)
}

#[tokio::test]
async fn a_successor_takes_the_sockets_and_the_old_one_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let (path, own, sockets, server) = running_side(dir.path());
    let addr = own.local_addr().unwrap();
    let drain = crate::drain::Drain::new();
    let (h, released) = handover(&drain);
    // A connection held by the running side: the drain waits for it.
    let conn = drain.signal().watch();
    let running = tokio::spawn(serve(server, sockets, h));

    let (mut inherited, takeover) = take_over(&path, false)
        .await
        .unwrap()
        .expect("a running l4mesh");
    assert_eq!(takeover.state.pid, std::process::id());
    // A wrong address for a socket is refused with both addresses named.
    let wrong: SocketAddr = "127.0.0.2:1".parse().unwrap();
    let e = inherited.take("outbound", Kind::Tcp, wrong).unwrap_err();
    assert!(
        e.to_string().contains(&addr.to_string()) && e.to_string().contains("127.0.0.2:1"),
        "{e}"
    );
    let (mut inherited, takeover) = {
        drop(takeover);
        // The dropped exchange was the running side's only successor: it serves on.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!drain.signal().is_draining());
        take_over(&path, false).await.unwrap().unwrap()
    };
    let any_port = SocketAddr::new(addr.ip(), 0);
    let fd = inherited
        .take("outbound", Kind::Tcp, any_port)
        .unwrap()
        .expect("offered");
    let taken = std::net::TcpListener::from(fd);
    assert_eq!(taken.local_addr().unwrap(), addr);
    // Nothing else was offered but the hand-off socket, which the successor listens on next.
    assert!(inherited.take("admin", Kind::Tcp, addr).unwrap().is_none());

    // Before ready, the running side still accepts; a queued connection is served by whoever
    // accepts, and the listen queue is the same socket.
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let (mut s, _) = own.accept().unwrap();
    s.write_all(b"old").unwrap();
    let mut b = [0u8; 3];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"old");
    assert!(!drain.signal().is_draining());

    let successor_server = listen(&path, &mut inherited).unwrap();
    let (end, follow) = takeover.complete(async { true }).await.unwrap();
    assert!(matches!(end, TakeoverEnd::Released));
    assert_eq!(released.successor(), Some(std::process::id()));
    assert!(drain.signal().is_draining());
    let state = follow.state.clone();
    assert_eq!(state.open_connections(), 1);
    assert!(state.draining());
    let following = tokio::spawn(follow.run());
    // The predecessor's metrics arrive, in both formats.
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while state.metrics(true).is_none() || state.metrics(false).is_none() {
        assert!(tokio::time::Instant::now() < until, "no metrics relayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state.metrics(false).as_deref(), Some("up 1\n"));

    // The old side's copies are closed; the successor's listener still takes connections.
    drop(own);
    let c2 = std::net::TcpStream::connect(addr).unwrap();
    let (s2, _) = taken.accept().unwrap();
    assert_eq!(s2.peer_addr().unwrap(), c2.local_addr().unwrap());

    // The old side exits once its connection ends: the successor sees it gone.
    drop(conn);
    running.abort();
    let _ = running.await;
    tokio::time::timeout(Duration::from_secs(5), following)
        .await
        .unwrap()
        .unwrap();
    assert!(!state.draining());
    assert!(state.metrics(true).is_none());
    drop(successor_server);
}

#[tokio::test]
async fn a_successor_that_fails_before_ready_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, own, sockets, server) = running_side(dir.path());
    let drain = crate::drain::Drain::new();
    let (h, released) = handover(&drain);
    let running = tokio::spawn(serve(server, sockets, h));
    for _ in 0..2 {
        let (inherited, takeover) = take_over(&path, false).await.unwrap().unwrap();
        drop((inherited, takeover));
    }
    // A client that speaks no hand-off is refused and closed, and the next successor is still
    // served.
    let raw = crate::seqpacket::Conn::connect(&path).await.unwrap();
    raw.send(b"{\"type\":\"launch\"}", &[]).await.unwrap();
    let p = raw.recv().await.unwrap().expect("a refusal");
    match wire::decode(&p.bytes).unwrap() {
        Message::Refused { reason } => {
            assert!(
                reason.contains("not a hand-off message")
                    || reason.contains("expected a hand-off message"),
                "{reason}"
            )
        }
        m => panic!("{m:?}"),
    }
    assert!(raw.recv().await.unwrap().is_none());
    // A successor that starts draining before it is ready lets go without a word: the running
    // side serves on.
    let (abandoning, takeover) = take_over(&path, false).await.unwrap().unwrap();
    let (end, _) = takeover.complete(async { false }).await.unwrap();
    assert!(matches!(end, TakeoverEnd::Abandoned));
    drop(abandoning);
    let (inherited, takeover) = take_over(&path, false).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!drain.signal().is_draining());
    assert_eq!(released.successor(), None);
    // The old listener accepts as before.
    let addr = own.local_addr().unwrap();
    let _c = std::net::TcpStream::connect(addr).unwrap();
    own.accept().unwrap();

    // A drain of the running side (SIGTERM) during the exchange: it lets go without a word, and
    // the waiting successor, holding the sockets too, serves alone.
    drain.start();
    let (end, _) = takeover.complete(std::future::pending()).await.unwrap();
    assert!(matches!(end, TakeoverEnd::PredecessorGone));
    running.await.unwrap();
    // Its kept copies are closed with the drain (the successor's with its exit): the hand-off
    // socket no longer answers.
    drop(inherited);
    assert!(take_over(&path, false).await.unwrap().is_none());
}

#[tokio::test]
async fn another_protocol_is_refused_and_no_file_means_no_predecessor() {
    let dir = tempfile::tempdir().unwrap();
    assert!(take_over(&dir.path().join("absent.sock"), false)
        .await
        .unwrap()
        .is_none());
    let (path, _own, sockets, server) = running_side(dir.path());
    let drain = crate::drain::Drain::new();
    let (h, _) = handover(&drain);
    let _running = tokio::spawn(serve(server, sockets, h));
    let raw = crate::seqpacket::Conn::connect(&path).await.unwrap();
    let hello = Message::Hello {
        protocol: PROTOCOL + 1,
        version: "9.9.9".into(),
        pid: 1,
    };
    raw.send(&wire::encode(&hello), &[]).await.unwrap();
    let p = raw.recv().await.unwrap().unwrap();
    match wire::decode(&p.bytes).unwrap() {
        Message::Refused { reason } => {
            assert!(
                reason.contains("protocol 2") && reason.contains("9.9.9"),
                "{reason}"
            )
        }
        m => panic!("{m:?}"),
    }
}

#[tokio::test]
async fn a_node_of_many_pods_is_handed_over_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("handoff.sock");
    let mut sockets = Sockets::keeping();
    let held = sockets.held();
    let netns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let mut listeners = Vec::new();
    for i in 0..300 {
        let uid = format!("uid-{i:03}-{}", "x".repeat(30));
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        held.keep(
            &wire::pod_socket(&uid, "outbound"),
            Kind::Tcp,
            l.local_addr().ok(),
            l.as_fd(),
        );
        held.keep(
            &wire::pod_socket(&uid, "netns"),
            Kind::Netns,
            None,
            netns.as_fd(),
        );
        held.keep_pod(PodOffer {
            uid,
            name: format!("pod-{i}-{}", "n".repeat(60)),
            namespace: "default".into(),
            service_account: "sa".into(),
        });
        listeners.push(l);
    }
    // A pod removed before the offer is not in it.
    held.forget_pod(&format!("uid-000-{}", "x".repeat(30)));
    let server = listen(&path, &mut sockets).unwrap();
    let drain = crate::drain::Drain::new();
    let (h, _) = handover(&drain);
    let _running = tokio::spawn(serve(server, sockets, h));
    let (mut inherited, _takeover) = take_over(&path, false).await.unwrap().unwrap();
    let mut pods = inherited.take_pods();
    assert_eq!(pods.len(), 299);
    pods.sort_by(|a, b| a.pod.uid.cmp(&b.pod.uid));
    let first = &mut pods[0];
    assert!(first.pod.uid.starts_with("uid-001-"));
    let fd = first.take("outbound", Kind::Tcp, 0).expect("outbound");
    let l = std::net::TcpListener::from(fd);
    assert_eq!(l.local_addr().unwrap(), listeners[1].local_addr().unwrap());
    // A port other than configured is not taken (bound afresh instead).
    let mut second = pods.remove(1);
    assert!(second.take("outbound", Kind::Tcp, 1).is_none());
}

/// Connects to `path` as user `nobody` (root and `setpriv` needed) and says hello: what the
/// process saw (`refused`: it could not connect; `closed`: connected, and closed without a word).
fn hello_as_nobody(path: &Path) -> Option<String> {
    // Debian's python (another user may not run one installed under /root).
    let python = Path::new("/usr/bin/python3");
    if !rustix::process::geteuid().is_root() || !python.exists() {
        return None;
    }
    let py = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print('refused', e.errno); sys.exit(0)
s.settimeout(5)
try:
    s.send(b'{"type":"hello","protocol":1,"version":"x","pid":1}')
    print('closed' if s.recv(65536) == b'' else 'answered')
except (ConnectionResetError, BrokenPipeError):
    print('closed')
"#;
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(python)
        .args(["-c", py])
        .arg(path)
        .output()
        .ok()?;
    Some(format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

#[tokio::test]
async fn only_this_user_or_root_may_take_the_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _own, sockets, server) = running_side(dir.path());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let drain = crate::drain::Drain::new();
    let (h, _) = handover(&drain);
    let _running = tokio::spawn(serve(server, sockets, h));
    let dir_mode = std::fs::Permissions::from_mode(0o755);
    std::fs::set_permissions(dir.path(), dir_mode).unwrap();
    let path2 = path.clone();
    let Some(seen) = tokio::task::spawn_blocking(move || hello_as_nobody(&path2))
        .await
        .unwrap()
    else {
        return; // not root, or no setpriv/python3: the file mode above is what protects
    };
    assert!(seen.starts_with("refused 13"), "{seen}");
    // Even with the file opened to everyone, the peer's user is checked.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let path2 = path.clone();
    let seen = tokio::task::spawn_blocking(move || hello_as_nobody(&path2))
        .await
        .unwrap();
    assert_eq!(seen.as_deref(), Some("closed"));
    // And the running side still serves its own user.
    assert!(take_over(&path, false).await.unwrap().is_some());
}
