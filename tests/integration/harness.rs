//! Test harness: backends that identify themselves, a SOCKS5 client, and an l4mesh started
//! in-process on a local config file the test can rewrite.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use l4mesh::config::{Config, Source};

pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A TCP backend that answers each connection, once the client half-closed, with
/// `<name>:<everything it read>` and then closes.
pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    pub async fn start(addr: &str, name: &str) -> Backend {
        let l = TcpListener::bind(addr).await.unwrap();
        let addr = l.local_addr().unwrap();
        let name = name.to_owned();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let name = name.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    if s.read_to_end(&mut buf).await.is_ok() {
                        let mut out = format!("{name}:").into_bytes();
                        out.extend_from_slice(&buf);
                        let _ = s.write_all(&out).await;
                        let _ = s.shutdown().await;
                    }
                });
            }
        });
        Backend { addr, task }
    }
}

/// Opens a SOCKS5 CONNECT through `proxy` to `dst` (an IP:port or a host name); returns the stream
/// on success or the SOCKS5 reply code on refusal.
pub async fn socks5_connect(proxy: SocketAddr, host: &str, port: u16) -> Result<TcpStream, u8> {
    socks5_handshake(TcpStream::connect(proxy).await.unwrap(), host, port)
        .await
        .unwrap()
}

/// [`socks5_connect`] from the source address `src` (so that l4mesh sees the client as the
/// workload with that IP).
pub async fn socks5_connect_from(
    src: IpAddr,
    proxy: SocketAddr,
    host: &str,
    port: u16,
) -> Result<TcpStream, u8> {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(src, 0)).unwrap();
    socks5_handshake(socket.connect(proxy).await.unwrap(), host, port)
        .await
        .unwrap()
}

/// The SOCKS5 exchange on `s` for `host:port`: `Ok(Err(code))` when the proxy refused, and every
/// I/O failure an error (a load generator counts them rather than panicking).
pub async fn socks5_handshake(
    mut s: TcpStream,
    host: &str,
    port: u16,
) -> std::io::Result<Result<TcpStream, u8>> {
    s.write_all(&[5, 1, 0]).await?;
    let mut r = [0u8; 2];
    s.read_exact(&mut r).await?;
    if r != [5, 0] {
        return Err(std::io::Error::other(format!(
            "SOCKS5 method selection: expected [5, 0], got {r:?}"
        )));
    }
    let mut req = vec![5, 1, 0];
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => {
            req.push(1);
            req.extend_from_slice(&a.octets());
        }
        Ok(IpAddr::V6(a)) => {
            req.push(4);
            req.extend_from_slice(&a.octets());
        }
        Err(_) => {
            req.push(3);
            req.push(host.len() as u8);
            req.extend_from_slice(host.as_bytes());
        }
    }
    req.extend_from_slice(&port.to_be_bytes());
    s.write_all(&req).await?;
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).await?;
    Ok(if rep[1] == 0 { Ok(s) } else { Err(rep[1]) })
}

/// Reads `s` until the peer closes it (EOF or an error); how long that took, or `None` if it was
/// still open after `limit`.
pub async fn closed_within<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
    limit: Duration,
) -> Option<Duration> {
    let t0 = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit.saturating_sub(t0.elapsed()), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

/// Sends `msg`, half-closes, and reads the whole answer.
pub async fn exchange(mut s: TcpStream, msg: &str) -> String {
    tokio::time::timeout(TIMEOUT, async move {
        s.write_all(msg.as_bytes()).await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await
    .expect("exchange timed out")
}

/// An l4mesh running in-process on a config file in a temporary directory.
pub struct Mesh {
    pub running: l4mesh::app::Running,
    pub config_path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts l4mesh with its listeners on ephemeral ports of `ip`, on the config `yaml`.
    pub async fn start(ip: &str, yaml: &str) -> Mesh {
        l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("mesh.yaml");
        std::fs::write(&config_path, yaml).unwrap();
        let mut config = Config::local(ip.parse().unwrap());
        config.source = Source::File(config_path.clone());
        config.connect_timeout = Duration::from_secs(2);
        let running = l4mesh::app::start(&config).await.unwrap();
        Mesh {
            running,
            config_path,
            _dir: dir,
        }
    }

    pub fn socks(&self) -> SocketAddr {
        self.running.socks5.unwrap()
    }

    /// Rewrites the config file and waits until the store published a new version.
    pub async fn rewrite(&self, yaml: &str) -> bool {
        let mut rx = self.running.store.subscribe();
        rx.borrow_and_update();
        std::fs::write(&self.config_path, yaml).unwrap();
        tokio::time::timeout(Duration::from_secs(3), rx.changed())
            .await
            .is_ok()
    }
}

/// Settings for the Istio CA of an in-process xds-testserver (plaintext, no token).
pub fn testserver_ca(ts: &xds_testserver::Handle) -> l4mesh::identity::IstioCaSettings {
    istio_ca_at(ts.addr())
}

/// Settings for a plaintext Istio CA at `addr` (no token, one-hour certificates, no mark).
pub fn istio_ca_at(addr: std::net::SocketAddr) -> l4mesh::identity::IstioCaSettings {
    l4mesh::identity::IstioCaSettings {
        address: format!("http://{addr}"),
        root_ca: None,
        auth_token: None,
        cluster_id: "Kubernetes".into(),
        ttl: Duration::from_secs(3600),
        own_identity: None,
        packet_mark: 0,
        timeout: l4mesh::identity::DEFAULT_CA_TIMEOUT,
    }
}

/// An l4mesh on node `node`, with its listeners on ephemeral ports of `listen_ip` and HBONE on
/// `hbone_ip:15008`, following `ts` for xDS and certificates.
pub async fn mesh_node(
    ts: &xds_testserver::Handle,
    listen_ip: impl AsRef<str>,
    node: &str,
    hbone_ip: impl AsRef<str>,
) -> l4mesh::app::Running {
    mesh_node_with(ts, listen_ip, node, hbone_ip, |_| {}).await
}

/// [`mesh_node`], with `configure` adjusting the configuration before the node starts.
pub async fn mesh_node_with(
    ts: &xds_testserver::Handle,
    listen_ip: impl AsRef<str>,
    node: &str,
    hbone_ip: impl AsRef<str>,
    configure: impl FnOnce(&mut Config),
) -> l4mesh::app::Running {
    let mut config = Config::local(listen_ip.as_ref().parse().unwrap());
    config.node_name = node.into();
    config.hbone_addr = SocketAddr::new(hbone_ip.as_ref().parse().unwrap(), 15008);
    // Generous: the tests run in parallel on a small machine, in debug builds.
    config.connect_timeout = Duration::from_secs(5);
    config.source = Source::Xds(l4mesh::config::XdsSettings::plaintext(&format!(
        "http://{}",
        ts.addr()
    )));
    config.ca = l4mesh::config::CaSource::Istio(testserver_ca(ts));
    configure(&mut config);
    l4mesh::app::start(&config).await.unwrap()
}

/// An in-process xds-testserver (xDS and the CA) serving `state`, on an ephemeral port of `ip`,
/// signing with `ca` when given (else a root of its own).
pub async fn testserver(
    state: String,
    ip: &str,
    ca: Option<xds_testserver::CaPem>,
) -> xds_testserver::Handle {
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    let mut c = xds_testserver::Config::new(xds_testserver::StateSource::Yaml(state));
    c.listen = SocketAddr::new(ip.parse().unwrap(), 0);
    c.ca = ca;
    xds_testserver::Handle::start(c).await.unwrap()
}

/// Two in-process l4mesh nodes, `node-a` and `node-b`, following one xds-testserver (declared
/// last, so that it stops after them).
pub struct TwoNodes {
    pub a: l4mesh::app::Running,
    pub b: l4mesh::app::Running,
    pub ts: xds_testserver::Handle,
}

/// `node-a` and `node-b` following `ts`: listeners on `<net>.11` and `<net>.12`, HBONE on their
/// workloads' IPs `<net>.1` and `<net>.2` (`net` the first three octets, e.g. `127.43.1`).
pub async fn two_nodes(ts: xds_testserver::Handle, net: &str) -> TwoNodes {
    two_nodes_with(ts, net, |_| {}).await
}

/// [`two_nodes`], with `configure` adjusting each node's configuration before it starts (its
/// `node_name` says which node it is).
pub async fn two_nodes_with(
    ts: xds_testserver::Handle,
    net: &str,
    mut configure: impl FnMut(&mut Config),
) -> TwoNodes {
    let a = mesh_node_with(
        &ts,
        format!("{net}.11"),
        "node-a",
        format!("{net}.1"),
        &mut configure,
    )
    .await;
    let b = mesh_node_with(
        &ts,
        format!("{net}.12"),
        "node-b",
        format!("{net}.2"),
        &mut configure,
    )
    .await;
    TwoNodes { a, b, ts }
}

/// One HBONE workload of an xds-testserver state, in namespace `default`: `name` with service
/// account `sa` at `ip` on `node`, followed by `extra` (whole lines, indented by two).
pub fn workload_yaml(name: &str, sa: &str, ip: &str, node: &str, extra: &str) -> String {
    format!(
        r#"- uid: cluster1//v1/Pod/default/{name}
  name: {name}
  namespace: default
  serviceAccount: {sa}
  workloadIps: ["{ip}"]
  protocol: HBONE
  node: {node}
{extra}"#
    )
}

/// The state of the two-node tests: workload `a` (service account `client`) on node-a at `a_ip`,
/// `b` (`server`) on node-b at `b_ip` followed by `b_extra`, and then `rest` (services, policies).
pub fn two_workloads_yaml(a_ip: &str, b_ip: &str, b_extra: &str, rest: &str) -> String {
    format!(
        "workloads:\n{}{}{rest}",
        workload_yaml("a", "client", a_ip, "node-a", ""),
        workload_yaml("b", "server", b_ip, "node-b", b_extra)
    )
}

/// A service `name` in namespace `default` on the VIP `vip`, port 80 to `target_port`, followed by
/// `extra` (whole lines, indented by two).
pub fn service_yaml(name: &str, vip: &str, target_port: u16, extra: &str) -> String {
    format!(
        r#"- name: {name}
  namespace: default
  hostname: {name}.default.svc.cluster.local
  vips: ["/{vip}"]
  ports: {{ 80: {target_port} }}
{extra}"#
    )
}

/// The workload lines that make it an endpoint of the service `name` (port 80 to `target_port`).
pub fn endpoint_of_yaml(name: &str, target_port: u16) -> String {
    format!(
        "  services:\n    \"default/{name}.default.svc.cluster.local\": {{ 80: {target_port} }}\n"
    )
}

/// A namespace-wide DENY, named `deny-<sa>-<port>`, of service account `sa` towards `port`.
pub fn deny_yaml(sa: &str, port: u16) -> String {
    format!(
        r#"- name: deny-{sa}-{port}
  namespace: default
  scope: Namespace
  action: Deny
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/{sa}"]
        destinationPorts: [{port}]
"#
    )
}

/// A root CA the test holds the key of, for an xds-testserver to sign with (Istio's "plug in your
/// own CA"), and the same CA in-process (to mint certificates or revocation lists of its own).
pub fn plug_in_root(cn: &str) -> (xds_testserver::CaPem, l4mesh::identity::LocalCa) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.self_signed(&key).unwrap();
    let pem = xds_testserver::CaPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        ..Default::default()
    };
    let ca = l4mesh::identity::LocalCa::from_pem(&pem.cert_pem, &pem.key_pem, "", "cluster.local")
        .unwrap();
    (pem, ca)
}
