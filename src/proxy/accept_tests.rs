//! The accept loop against the drain: a connection accepted as the drain starts must be watched
//! before the drain can find nothing open (else it is reset unserved after "drained").

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use crate::drain::Drain;

/// Polls `f` once.
async fn poll_once<F: Future + Unpin>(f: &mut F) -> Poll<F::Output> {
    std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut *f).poll(cx))).await
}

/// Connections wait in the backlog, the listener reported readable, when the drain starts: the
/// drain must not end before the loop has stopped, and the loop must stop rather than accept.
/// The loop is polled by hand, so that the drain's first look comes before the loop runs again
/// (the moment of the race); repeated, because the old unbiased select chose accept half of the
/// time.
#[tokio::test(flavor = "current_thread")]
async fn no_connection_is_accepted_after_the_drain_ended() {
    for round in 0..16u16 {
        let d = Drain::new();
        let signal = d.signal();
        let listener = tokio::net::TcpListener::bind("127.55.1.1:0").await.unwrap();
        let limiter = crate::limits::Limiter::new(
            "test",
            crate::limits::Caps {
                max_connections: 0,
                max_per_source: 0,
            },
        );
        let addr = listener.local_addr().unwrap();
        let ended = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicUsize::new(0));
        let (e, l) = (ended.clone(), late.clone());
        let looping = super::accept_loop(
            listener,
            &limiter,
            Default::default(),
            &signal,
            move |_stream, _peer, watcher, _p| {
                let (e, l) = (e.clone(), l.clone());
                async move {
                    let _watcher = watcher;
                    if e.load(SeqCst) {
                        l.fetch_add(1, SeqCst);
                    }
                }
            },
        );
        let mut looping = std::pin::pin!(looping);
        assert!(
            poll_once(&mut looping).await.is_pending(),
            "waiting in accept"
        );
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(std::net::TcpStream::connect(addr).unwrap());
        }
        // The reactor sees the listener readable; the loop is not polled meanwhile.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let drain = d.drain(Duration::from_secs(2), Duration::from_millis(100));
        let mut drain = std::pin::pin!(drain);
        let first = poll_once(&mut drain).await;
        if first.is_ready() {
            ended.store(true, SeqCst);
        }
        assert!(
            poll_once(&mut looping).await.is_ready(),
            "round {round}: the loop stops once draining"
        );
        let r = match first {
            Poll::Ready(r) => r,
            Poll::Pending => tokio::time::timeout(Duration::from_secs(2), drain)
                .await
                .unwrap(),
        };
        ended.store(true, SeqCst);
        // Whatever was spawned runs now.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!((r.forced, r.left), (0, 0), "round {round}: {r:?}");
        assert_eq!(
            late.load(SeqCst),
            0,
            "round {round}: a connection was accepted after the drain had ended"
        );
        assert_eq!(d.live(), 0);
    }
}
