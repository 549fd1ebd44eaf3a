//! A raw HBONE client: mutual TLS with a workload's certificate and HTTP/2 CONNECT by hand, for
//! tests that must see what an l4mesh answers on the wire (statuses, GOAWAY, open streams) rather
//! than what another l4mesh makes of it.

use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use tokio::net::TcpStream;

use l4mesh::identity::{CaClient, IstioCaSettings, SecretManager};
use l4mesh::model::SpiffeId;

/// The SPIFFE ID of service account `sa` in namespace `default`.
pub fn spiffe(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
        .parse()
        .unwrap()
}

/// Opens HTTP/2 over TLS on `tcp` (already connected to an HBONE listener), presenting `sa`'s
/// certificate from the Istio CA `ca` and expecting the peer to be the service account `server`.
pub async fn client(ca: IstioCaSettings, sa: &str, tcp: TcpStream) -> SendRequest<Bytes> {
    let secrets = SecretManager::new(CaClient::istio(ca));
    let cert = secrets.fetch(&spiffe(sa)).await.unwrap();
    let cfg = l4mesh::tls::client_config(
        l4mesh::tls::ManagedCert::new(secrets.clone(), spiffe(sa)),
        cert.roots.clone(),
        vec![spiffe("server")],
        None,
    )
    .unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(tcp.peer_addr().unwrap().ip().into());
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(name, tcp)
        .await
        .unwrap();
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// Sends a CONNECT for `authority` on `send` and waits (up to 5 s) for the answer; returns it and
/// the stream's sending half (the tunnel stays open while both are held).
pub async fn connect(
    send: SendRequest<Bytes>,
    authority: String,
) -> (http::Response<RecvStream>, SendStream<Bytes>) {
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap();
    let (resp, stream) = send
        .ready()
        .await
        .unwrap()
        .send_request(req, false)
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), resp)
        .await
        .unwrap()
        .unwrap();
    (resp, stream)
}

/// The status the HBONE listener answers to a CONNECT for `authority` on `send`.
pub async fn status(send: SendRequest<Bytes>, authority: String) -> u16 {
    connect(send, authority).await.0.status().as_u16()
}

/// Everything the stream of `resp` carries until its end (5 s at most per chunk), with flow
/// control released as it is read.
pub async fn read_to_end(resp: http::Response<RecvStream>) -> Vec<u8> {
    let mut body = resp.into_body();
    let mut got = Vec::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), body.data())
        .await
        .unwrap()
    {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    got
}
