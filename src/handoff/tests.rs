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
        metrics: Some(Box::new(|om| {
            Some(if om {
                "# TYPE up gauge\nup 1\n# EOF\n".into()
            } else {
                "up 1\n".into()
            })
        })),
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

    let (mut inherited, takeover) = take_over(&path).await.unwrap().expect("a running l4mesh");
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
        take_over(&path).await.unwrap().unwrap()
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
    let (end, follow) = takeover.complete(async {}).await.unwrap();
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
        let (inherited, takeover) = take_over(&path).await.unwrap().unwrap();
        drop((inherited, takeover));
    }
    // A client that speaks no hand-off is closed, and the next successor is still served.
    let raw = crate::seqpacket::Conn::connect(&path).await.unwrap();
    raw.send(b"{\"type\":\"launch\"}", &[]).await.unwrap();
    assert!(raw.recv().await.unwrap().is_none());
    let (inherited, takeover) = take_over(&path).await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!drain.signal().is_draining());
    assert_eq!(released.successor(), None);
    // The old listener accepts as before.
    let addr = own.local_addr().unwrap();
    let _c = std::net::TcpStream::connect(addr).unwrap();
    own.accept().unwrap();

    // A drain of the running side refuses the waiting successor, which must not serve.
    drain.start();
    let e = takeover
        .complete(std::future::pending())
        .await
        .err()
        .expect("refused");
    assert!(e.to_string().contains("started draining"), "{e}");
    running.await.unwrap();
    // Its kept copies are closed with the drain (the refused successor's with its exit): the
    // hand-off socket no longer answers.
    drop(inherited);
    assert!(take_over(&path).await.unwrap().is_none());
}

#[tokio::test]
async fn another_protocol_is_refused_and_no_file_means_no_predecessor() {
    let dir = tempfile::tempdir().unwrap();
    assert!(take_over(&dir.path().join("absent.sock"))
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
