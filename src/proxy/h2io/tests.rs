//! The adapter over an in-memory HTTP/2 connection: echo, 10 MB both ways, half-close.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// A server on one end of a duplex pipe that echoes each CONNECT stream after answering 200;
/// returns the client's `SendRequest`.
async fn echo_pair() -> h2::client::SendRequest<Bytes> {
    echo_pair_tuned(Tuning::default()).await
}

async fn echo_pair_tuned(t: Tuning) -> h2::client::SendRequest<Bytes> {
    let (c, s) = tokio::io::duplex(1 << 20);
    tokio::spawn(async move {
        let mut conn = server_builder(&t).handshake::<_, Bytes>(s).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let resp = http::Response::new(());
                let send = respond.send_response(resp, false).unwrap();
                let (mut r, mut w) = (H2Recv::new(req.into_body()), H2Send::new(send));
                tokio::io::copy(&mut r, &mut w).await.unwrap();
                w.shutdown().await.unwrap();
            });
        }
    });
    let (send_req, conn) = client_builder(&t).handshake(c).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send_req
}

async fn open(client: &mut h2::client::SendRequest<Bytes>) -> (H2Recv, H2Send) {
    let target: SocketAddr = "10.0.0.1:80".parse().unwrap();
    let req = crate::proxy::hbone::connect_request(
        target,
        "10.0.0.2:1".parse().unwrap(),
        None,
        &mut rand::rng(),
    )
    .unwrap();
    let c = client.clone().ready().await.unwrap();
    *client = c;
    let (resp, send) = client.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    (H2Recv::new(resp.into_body()), H2Send::new(send))
}

#[tokio::test]
async fn echo_and_half_close() {
    let mut client = echo_pair().await;
    let (mut r, mut w) = open(&mut client).await;
    w.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    r.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    // Half-close: the server sees EOF, finishes its copy, and closes its side.
    w.shutdown().await.unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    assert!(w.write_all(b"late").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_megabytes_both_ways() {
    let mut client = echo_pair().await;
    let (mut r, mut w) = open(&mut client).await;
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i * 7 % 251) as u8)
        .collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(100_000) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::with_capacity(expected.len());
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert_eq!(got.len(), expected.len());
    assert!(got == expected, "bytes came back intact");
}

#[tokio::test]
async fn streams_share_one_connection() {
    let mut client = echo_pair().await;
    let mut a = open(&mut client).await;
    let mut b = open(&mut client).await;
    a.1.write_all(b"a").await.unwrap();
    b.1.write_all(b"b").await.unwrap();
    let mut buf = [0u8; 1];
    b.0.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"b");
    a.0.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"a");
}

/// The smallest frame size and windows far below a write's chunk: flow control still moves
/// every byte (the tuning reaches both builders).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smallest_frames_and_tiny_windows_carry_a_megabyte() {
    let mut client = echo_pair_tuned(Tuning {
        frame_size: 16 * 1024,
        stream_window: 20_000,
        connection_window: 70_000,
        ..Tuning::default()
    })
    .await;
    let (mut r, mut w) = open(&mut client).await;
    let data: Vec<u8> = (0..1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut got = Vec::new();
    r.read_to_end(&mut got).await.unwrap();
    writer.await.unwrap();
    assert!(got == data, "bytes crossed intact");
}

/// The tunnelled copy (`copy::tcp_tunnel_until`) from both ends: a TCP client behind the
/// downstream end and the echoing tunnel; then a TCP workload behind the upstream end. 10 MB
/// cross intact, every byte is counted in its direction, and the half-close from either side
/// reaches the other as END_STREAM / FIN.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnelled_copy_moves_every_byte_and_the_half_close() {
    use crate::proxy::copy::{tcp_tunnel_until, TcpEnd};
    let data: Vec<u8> = (0..10 * 1024 * 1024u32)
        .map(|i| (i * 13 % 251) as u8)
        .collect();

    // Downstream end: the client writes everything, half-closes, reads the echo to its end.
    let mut client = echo_pair().await;
    let (mut recv, mut send) = open(&mut client).await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut app = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (mut tcp, _) = l.accept().await.unwrap();
    let sent = data.clone();
    let app_side = tokio::spawn(async move {
        let (mut r, mut w) = app.split();
        let write = async {
            w.write_all(&sent).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let read = r.read_to_end(&mut got);
        let (_, n) = tokio::join!(write, read);
        n.unwrap();
        got
    });
    let meter = crate::metrics::Meter::default();
    let (t, r) = tcp_tunnel_until(
        &mut tcp,
        &mut recv,
        &mut send,
        TcpEnd::Downstream,
        &meter,
        std::future::pending(),
    )
    .await;
    r.unwrap();
    assert_eq!((t.sent, t.received), (data.len() as u64, data.len() as u64));
    assert!(app_side.await.unwrap() == data, "echoed bytes intact");

    // Upstream end: the tunnel's client sends and half-closes; the workload echoes until FIN.
    let (mut tunnel_r, mut tunnel_w, mut recv, mut send) = tunnel_pair().await;
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut tcp = tokio::net::TcpStream::connect(l.local_addr().unwrap())
        .await
        .unwrap();
    let (mut workload, _) = l.accept().await.unwrap();
    tokio::spawn(async move {
        let (mut r, mut w) = workload.split();
        tokio::io::copy(&mut r, &mut w).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let sent = data.clone();
    let peer = tokio::spawn(async move {
        let write = async {
            tunnel_w.write_all(&sent).await.unwrap();
            tunnel_w.shutdown().await.unwrap();
        };
        let mut got = Vec::new();
        let read = tunnel_r.read_to_end(&mut got);
        let (_, n) = tokio::join!(write, read);
        n.unwrap();
        got
    });
    let (t, r) = tcp_tunnel_until(
        &mut tcp,
        &mut recv,
        &mut send,
        TcpEnd::Upstream,
        &meter,
        std::future::pending(),
    )
    .await;
    r.unwrap();
    assert_eq!((t.sent, t.received), (data.len() as u64, data.len() as u64));
    assert!(peer.await.unwrap() == data, "echoed bytes intact");
}

/// One CONNECT stream seen from both ends: the client's halves, then the server's.
async fn tunnel_pair() -> (H2Recv, H2Send, H2Recv, H2Send) {
    let t = Tuning::default();
    let (c, s) = tokio::io::duplex(1 << 20);
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let mut conn = server_builder(&t).handshake::<_, Bytes>(s).await.unwrap();
        let (req, mut respond) = conn.accept().await.unwrap().unwrap();
        let send = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let _ = tx.send((H2Recv::new(req.into_body()), H2Send::new(send)));
        // Keep driving the connection.
        while conn.accept().await.is_some() {}
    });
    let (send_req, conn) = client_builder(&t).handshake(c).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut client = send_req;
    let (r, w) = open(&mut client).await;
    let (sr, sw) = rx.await.unwrap();
    (r, w, sr, sw)
}
