//! Test helpers: a delta-ADS client built on l4mesh's generated tonic client, a minimal HTTP/1.1
//! client for the admin API, the test state, and timeouts so that no test can hang.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use l4mesh::proto::envoy::discovery::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use l4mesh::proto::envoy::discovery::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Node, Status as RpcStatus,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};
use xds_testserver::{Config, Handle, Kind, StateSource};

pub const CLIENT: &str = "cluster1//v1/Pod/default/client";
pub const ECHO: &str = "cluster1//v1/Pod/default/echo";
pub const SVC: &str = "default/echo.default.svc.cluster.local";
pub const POLICY: &str = "default/deny-9999";

pub const YAML: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.1.1"]
  protocol: HBONE
  services:
    "default/echo.default.svc.cluster.local": { 80: 8080 }
- uid: cluster1//v1/Pod/default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  workloadIps: ["127.0.2.1"]
  protocol: HBONE
  services:
    "default/echo.default.svc.cluster.local": { 80: 8080 }
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.10.0.1"]
  ports: { 80: 8080 }
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ { destinationPorts: [9999] } ]]]
"#;

/// How long a test waits for any one thing.
pub const WAIT: Duration = Duration::from_secs(10);
/// How long "nothing arrives" is watched for.
pub const QUIET: Duration = Duration::from_millis(300);

/// Bounds a whole test.
pub async fn bounded<F: Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test timed out");
}

/// Waits until `cond` holds; fails the test after [`WAIT`].
pub async fn eventually(mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A plaintext server with the test state and an admin API.
pub async fn start() -> Handle {
    Handle::start(Config::new(StateSource::Yaml(YAML.to_owned())))
        .await
        .unwrap()
}

/// A delta ADS stream as a client sees it.
pub struct Client {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    rx: Streaming<DeltaDiscoveryResponse>,
}

impl Client {
    /// Opens a stream over `channel`, with `authorization: Bearer <token>` when given.
    pub async fn open(channel: Channel, token: Option<&str>) -> Result<Client, Status> {
        let (tx, rx) = mpsc::channel(16);
        let mut request = Request::new(ReceiverStream::new(rx));
        if let Some(token) = token {
            request
                .metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let response = tokio::time::timeout(WAIT, client.delta_aggregated_resources(request))
            .await
            .expect("no answer to the stream")?;
        Ok(Client {
            tx,
            rx: response.into_inner(),
        })
    }

    /// A plaintext stream to `addr`.
    pub async fn connect(addr: SocketAddr) -> Client {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Client::open(channel, None).await.unwrap()
    }

    pub async fn send(&self, req: DeltaDiscoveryRequest) {
        self.tx.send(req).await.unwrap();
    }

    /// The next response; fails the test after [`WAIT`].
    pub async fn recv(&mut self) -> DeltaDiscoveryResponse {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("no response in time")
            .expect("stream error")
            .expect("stream ended")
    }

    /// The next message or end of the stream.
    pub async fn next(&mut self) -> Result<Option<DeltaDiscoveryResponse>, Status> {
        tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("nothing in time")
    }

    /// Asserts nothing arrives for [`QUIET`].
    pub async fn expect_quiet(&mut self) {
        if let Ok(m) = tokio::time::timeout(QUIET, self.rx.message()).await {
            panic!("expected no message, got {m:?}");
        }
    }

    /// Sends a wildcard first request for `kind` and returns the initial response.
    pub async fn wildcard(&mut self, kind: Kind) -> DeltaDiscoveryResponse {
        self.send(first(kind)).await;
        self.recv().await
    }

    pub async fn ack(&self, r: &DeltaDiscoveryResponse) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            ..Default::default()
        })
        .await;
    }

    pub async fn nack(&self, r: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            type_url: r.type_url.clone(),
            response_nonce: r.nonce.clone(),
            error_detail: Some(RpcStatus {
                code: 3,
                message: message.to_owned(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }
}

/// The first request of a type, with a node.
pub fn first(kind: Kind) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        node: Some(Node {
            id: "ztunnel~127.0.1.1~client.default~default.svc.cluster.local".into(),
            ..Default::default()
        }),
        type_url: kind.type_url().to_owned(),
        ..Default::default()
    }
}

pub fn names(r: &DeltaDiscoveryResponse) -> Vec<&str> {
    r.resources.iter().map(|r| r.name.as_str()).collect()
}

/// An HTTP/1.1 request to the admin API: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let fut = async {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        out
    };
    let out = tokio::time::timeout(WAIT, fut)
        .await
        .expect("admin API timed out");
    let split = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("no end of headers");
    let head = String::from_utf8_lossy(&out[..split]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("no status");
    (status, out[split + 4..].to_vec())
}

/// An admin API request whose body is text.
pub async fn http_text(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let (status, body) = http(addr, method, path, body.as_bytes()).await;
    (status, String::from_utf8(body).unwrap())
}
