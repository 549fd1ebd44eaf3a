//! The driver of a pooled connection over an in-memory HTTP/2 pair: idle release, keepalive.

use std::time::Duration;

use super::*;
use crate::proxy::h2io;

const FAST: Liveness = Liveness {
    ping_interval: Duration::from_millis(50),
    idle: Duration::from_millis(200),
};

/// A client connection driven by `keep`, to a server that answers (polls its connection) only if
/// `answering`. Returns the dead flag, the server task, and the request handle (dropping every
/// handle ends a client connection, as when the pool replaced it).
async fn kept(
    answering: bool,
    busy: bool,
    live: Liveness,
) -> (
    Arc<AtomicBool>,
    tokio::task::JoinHandle<()>,
    SendRequest<Bytes>,
) {
    let (c, s) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let mut conn = h2io::server_builder(&Default::default())
            .handshake::<_, Bytes>(s)
            .await
            .unwrap();
        if answering {
            while conn.accept().await.is_some() {}
        } else {
            std::future::pending::<()>().await;
        }
    });
    let (send, conn) = h2io::client_builder(&Default::default())
        .handshake(c)
        .await
        .unwrap();
    let active = Arc::new(AtomicUsize::new(usize::from(busy)));
    let dead = Arc::new(AtomicBool::new(false));
    let addr = "127.0.0.1:15008".parse().unwrap();
    tokio::spawn(keep(conn, active, dead.clone(), live, addr, None));
    (dead, server, send)
}

#[tokio::test]
async fn idle_connection_is_released() {
    let (dead, _server, _send) = kept(true, false, FAST).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(dead.load(Ordering::Acquire));
}

#[tokio::test]
async fn busy_connection_with_a_live_peer_stays() {
    // Pings every 250 ms (slack for a loaded machine), well past the idle time.
    let live = Liveness {
        ping_interval: Duration::from_millis(250),
        ..FAST
    };
    let (dead, _server, _send) = kept(true, true, live).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!dead.load(Ordering::Acquire));
}

#[tokio::test]
async fn unanswered_ping_marks_dead() {
    let (dead, _server, _send) = kept(false, true, FAST).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(dead.load(Ordering::Acquire));
}

#[tokio::test]
async fn closed_peer_marks_dead() {
    let (dead, server, _send) = kept(true, true, FAST).await;
    server.abort();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(dead.load(Ordering::Acquire));
}

#[tokio::test]
async fn dropping_every_handle_ends_the_connection() {
    let (dead, _server, send) = kept(true, true, FAST).await;
    drop(send);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(dead.load(Ordering::Acquire));
}

#[tokio::test]
async fn a_connection_takes_at_most_its_configured_streams() {
    let (dead, _server, send) = kept(true, true, FAST).await;
    let conn = Conn {
        send,
        active: Arc::new(AtomicUsize::new(0)),
        dead: dead.clone(),
        max: 2,
        streams: Arc::new(AtomicUsize::new(0)),
    };
    let first = conn.take().expect("slot 1");
    let _second = conn.take().expect("slot 2");
    assert!(
        conn.take().is_none(),
        "POOL_MAX_STREAMS_PER_CONNECTION reached"
    );
    assert_eq!(
        conn.active.load(Ordering::Acquire),
        2,
        "a refused take gives its slot back"
    );
    assert_eq!(
        conn.streams.load(Ordering::Acquire),
        2,
        "the pool's total counts the two streams, not the refused one"
    );
    drop(first);
    assert_eq!(conn.streams.load(Ordering::Acquire), 1);
    assert!(conn.take().is_some(), "a finished stream frees its slot");
    dead.store(true, Ordering::Release);
    assert!(
        conn.take().is_none(),
        "a dead connection is never handed out"
    );
}
