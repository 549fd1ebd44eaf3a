//! The TCP↔TCP copy, buffered and (with `L4MESH_SPLICE_AFTER`) switching to splice: every byte
//! arrives in order, each direction is counted, and a half-close travels both ways.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// A connected pair of loopback sockets.
async fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    let (b, _) = l.accept().await.unwrap();
    (a, b)
}

/// The client sends `up` and half-closes; the server answers with `down` and closes after the
/// client's end. Returns what each received and what the copy counted.
async fn exchange(
    up: Vec<u8>,
    down: Vec<u8>,
    splice_after: Option<u64>,
) -> (Vec<u8>, Vec<u8>, Transferred) {
    let (mut client, mut proxy_down) = pair().await;
    let (mut proxy_up, mut server) = pair().await;
    let copy = tokio::spawn(async move {
        let meter = Meter::default();
        let (t, r) = tcp_until(
            &mut proxy_down,
            &mut proxy_up,
            splice_after,
            &meter,
            std::future::pending(),
        )
        .await;
        r.unwrap();
        t
    });
    let srv = tokio::spawn(async move {
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        server.write_all(&down).await.unwrap();
        server.shutdown().await.unwrap();
        got
    });
    client.write_all(&up).await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    client.read_to_end(&mut got).await.unwrap();
    (srv.await.unwrap(), got, copy.await.unwrap())
}

fn pattern(len: usize, seed: u32) -> Vec<u8> {
    (0..len as u32).map(|i| (i * seed % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_exchange_stays_buffered_and_arrives_whole() {
    let (up, down) = (pattern(100, 7), pattern(3000, 11));
    let (at_server, at_client, t) = exchange(up.clone(), down.clone(), Some(128 * 1024)).await;
    assert_eq!(at_server, up);
    assert_eq!(at_client, down);
    assert_eq!((t.sent, t.received), (100, 3000));
}

/// Past `splice_after` a direction switches to splice mid-stream: nothing is lost, duplicated or
/// reordered at the switch, in either direction; without it, the buffered copy moves it all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_transfer_arrives_whole_buffered_or_spliced() {
    for splice_after in [None, Some(128 * 1024), Some(1)] {
        let (up, down) = (pattern(5_000_001, 13), pattern(3_000_017, 17));
        let (at_server, at_client, t) = exchange(up.clone(), down.clone(), splice_after).await;
        assert!(
            at_server == up,
            "client → server bytes intact ({splice_after:?})"
        );
        assert!(
            at_client == down,
            "server → client bytes intact ({splice_after:?})"
        );
        assert_eq!((t.sent, t.received), (5_000_001, 3_000_017));
    }
}

#[test]
fn read_sizes_grow_with_the_volume_moved() {
    assert_eq!(read_size(0), 1024);
    assert_eq!(read_size(200_000), 16 * 1024);
    assert_eq!(read_size(10_200_000), 256 * 1024);
}
