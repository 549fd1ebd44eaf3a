//! Helpers shared by the side-by-side benchmarks: child processes killed on drop, waiting for a
//! port, reading a process's RSS, finding a binary on PATH, a counting sink, a ping-pong latency.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A child process (l4mesh, Envoy) killed and reaped when the benchmark ends, even on panic.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `BENCH_SECS` (else `default`) per case when run by `cargo bench`; `None` under `cargo test
/// --benches`, which builds benches without running them.
pub fn bench_secs(default: f64) -> Option<f64> {
    std::env::args().any(|a| a == "--bench").then(|| {
        std::env::var("BENCH_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(default)
    })
}

/// `BENCH_RUNS` (else `default`, at least 1): how many runs a figure is the median of.
pub fn bench_runs(default: usize) -> usize {
    std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
        .max(1)
}

/// Pins this process (all its threads) to `core`, best effort: the load generator stays off the
/// proxy's core.
pub fn pin_self(core: usize) {
    let _ = std::process::Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &core.to_string(),
            &std::process::id().to_string(),
        ])
        .stdout(std::process::Stdio::null())
        .status();
}

/// The pid of the process listening on UDP `port` (the proxy itself, not a wrapper that
/// started it), from `ss`.
pub fn pid_on_udp(port: u16) -> Option<u32> {
    let out = std::process::Command::new("ss")
        .args(["-lunpH", "sport", "=", &format!(":{port}")])
        .output()
        .ok()?;
    let s = String::from_utf8_lossy(&out.stdout);
    s.split("pid=").nth(1)?.split(',').next()?.parse().ok()
}

/// Waits up to 10 s for `addr` to accept connections.
pub fn wait_port(addr: SocketAddr) {
    for _ in 0..200 {
        if TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{addr} never came up");
}

/// Resident memory of process `pid` in KiB (0 if it is gone): the `Rss` of `smaps_rollup`, summed
/// from the page tables when asked. `VmRSS` in `status` is kept per CPU by recent kernels and may
/// lag by megabytes, which made a per-connection figure (a delta over 1 000 connections) wrong.
pub fn rss_kib(pid: u32) -> u64 {
    let field = |file: &str, name: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{file}"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            })
    };
    field("smaps_rollup", "Rss:")
        .or_else(|| field("status", "VmRSS:"))
        .unwrap_or(0)
}

/// CPU seconds (user + system) used so far by process `pid`.
pub fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Istio's ztunnel for side-by-side runs: `ZTUNNEL_BIN`, else `../shared/bin/ztunnel`; the
/// path looked at when there is none.
pub fn ztunnel_bin() -> Result<std::path::PathBuf, std::path::PathBuf> {
    let p = std::env::var_os("ZTUNNEL_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/bin/ztunnel")
        });
    if p.is_file() {
        Ok(p)
    } else {
        Err(p)
    }
}

/// The path of `bin` on PATH, if any.
pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(bin))
            .find(|p| p.is_file())
    })
}

/// Serves `l` on threads of its own: each connection is read to its end and discarded, its bytes
/// added to `count`. The receiving end of every throughput case.
pub fn serve_sink(l: std::net::TcpListener, count: Arc<AtomicU64>, chunk: usize) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            let c = count.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; chunk];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    c.fetch_add(n as u64, Ordering::Relaxed);
                }
            });
        }
    });
}

/// What a throughput window measured: Gbit/s at the sink, the bytes behind it, and the CPU
/// seconds the proxy used meanwhile (when its pid was given).
pub struct Pushed {
    pub gbps: f64,
    pub bytes: u64,
    pub cpu_secs: Option<f64>,
}

/// Writes `chunk`-byte buffers on every one of `conns` from a thread each; after 300 ms of warm-up,
/// measures for `secs` how much the sink's `count` grew and what CPU `pid` used; then stops the
/// writers.
pub fn push(
    conns: Vec<TcpStream>,
    chunk: usize,
    secs: f64,
    count: &AtomicU64,
    pid: Option<u32>,
) -> Pushed {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let buf = vec![7u8; chunk];
                while !stop.load(Ordering::Relaxed) {
                    if s.write_all(&buf).is_err() {
                        break;
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let (b0, c0, t0) = (
        count.load(Ordering::Relaxed),
        pid.map(cpu_secs),
        std::time::Instant::now(),
    );
    std::thread::sleep(Duration::from_secs_f64(secs));
    let bytes = count.load(Ordering::Relaxed) - b0;
    let cpu = pid.map(cpu_secs).zip(c0).map(|(c1, c0)| c1 - c0);
    let elapsed = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    Pushed {
        gbps: bytes as f64 * 8.0 / elapsed / 1e9,
        bytes,
        cpu_secs: cpu,
    }
}

/// 2 200 ping-pongs of 1 KiB on `s` against an echo server, the first 200 as warm-up: the median
/// and 99th-percentile round trip.
pub fn ping_pong(s: &mut TcpStream) -> (Duration, Duration) {
    let msg = [42u8; 1024];
    let mut buf = [0u8; 1024];
    let mut v = Vec::with_capacity(2000);
    for i in 0..2200 {
        let t = std::time::Instant::now();
        s.write_all(&msg).unwrap();
        s.read_exact(&mut buf).unwrap();
        if i >= 200 {
            v.push(t.elapsed());
        }
    }
    v.sort();
    (v[v.len() / 2], v[v.len() * 99 / 100])
}

/// The median of `v` (NaN when empty): the figure the benches report of several runs.
pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// How a table row reads its figure from one column's figures (`None`: not measured there).
pub type Figure<F> = fn(&F) -> Option<f64>;

/// A table of figures, one column per proxy (or path) and one line per row, with l4mesh's ratio
/// to ztunnel at the end of each line when both are columns.
pub fn print_table<F>(title: &str, cols: &[(String, F)], rows: &[(&str, Figure<F>)]) {
    println!("\n{title}");
    let width = rows.iter().map(|r| r.0.chars().count()).max().unwrap_or(0) + 2;
    let mut head = format!("{:<width$}", "figure");
    for (name, _) in cols {
        head += &format!("{name:>11}");
    }
    let ratio = cols.iter().any(|c| c.0 == "ztunnel") && cols.iter().any(|c| c.0 == "l4mesh");
    if ratio {
        head += &format!("{:>17}", "l4mesh/ztunnel");
    }
    println!("{head}");
    for (label, get) in rows {
        let mut line = format!("{label:<width$}");
        for (_, f) in cols {
            line += &match get(f) {
                Some(v) => format!("{v:>11.2}"),
                None => format!("{:>11}", "-"),
            };
        }
        if ratio {
            let of = |n: &str| cols.iter().find(|c| c.0 == n).and_then(|c| get(&c.1));
            if let (Some(l), Some(z)) = (of("l4mesh"), of("ztunnel")) {
                line += &format!("{:>16.2}×", l / z);
            }
        }
        println!("{line}");
    }
}

/// A release l4mesh on core 1 with one worker thread, following `xds` as `node`, its listeners
/// on `ip` from `port_base` (admin `+0`, outbound `+1`, inbound `+6`, metrics `+20`, readiness
/// `+21`, SOCKS5 `+80`; HBONE on `ip:15008`), with `env` added. Not waited for: see [`ready`].
pub fn l4mesh_node(xds: &str, node: &str, ip: &str, port_base: u16, env: &[(&str, &str)]) -> Proc {
    let mut cmd = std::process::Command::new("taskset");
    cmd.args(["-c", "1", env!("CARGO_BIN_EXE_l4mesh")])
        .env("XDS_ADDRESS", xds)
        .env("NODE_NAME", node)
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("RUST_LOG", "error")
        .env("L4MESH_OUTBOUND_ADDR", format!("{ip}:{}", port_base + 1))
        .env(
            "L4MESH_INBOUND_PLAINTEXT_ADDR",
            format!("{ip}:{}", port_base + 6),
        )
        .env("L4MESH_SOCKS5_ADDR", format!("{ip}:{}", port_base + 80))
        .env("L4MESH_READINESS_ADDR", format!("{ip}:{}", port_base + 21))
        .env("L4MESH_METRICS_ADDR", format!("{ip}:{}", port_base + 20))
        .env("L4MESH_ADMIN_ADDR", format!("{ip}:{port_base}"))
        .env("L4MESH_HBONE_ADDR", format!("{ip}:15008"))
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null());
    Proc(cmd.spawn().expect("start l4mesh"))
}

/// Whether `GET /healthz/ready` at `addr` answers 200.
pub fn ready(addr: &str) -> bool {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return false;
    };
    let _ = s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.contains(" 200 ")
}

/// Writes cert chain, key and root PEM files for an Envoy; returns their paths.
pub fn envoy_files(
    dir: &std::path::Path,
    name: &str,
    cert: &l4mesh::identity::WorkloadCert,
) -> [String; 3] {
    let chain: String = cert
        .chain
        .iter()
        .map(|c| l4mesh::identity::der_to_pem("CERTIFICATE", c))
        .collect();
    let root: String = cert
        .roots
        .iter()
        .map(|c| l4mesh::identity::der_to_pem("CERTIFICATE", c))
        .collect();
    let key = l4mesh::identity::der_to_pem("PRIVATE KEY", cert.key.secret_pkcs8_der());
    let p = |f: &str| dir.join(format!("{name}-{f}")).display().to_string();
    std::fs::write(p("chain.pem"), chain).unwrap();
    std::fs::write(p("key.pem"), key).unwrap();
    std::fs::write(p("root.pem"), root).unwrap();
    [p("chain.pem"), p("key.pem"), p("root.pem")]
}

/// `common_tls_context: …` for a TLS context whose keys sit at `indent` spaces.
pub fn tls_context(files: &[String; 3], san: &str, indent: usize) -> String {
    let i2 = " ".repeat(indent + 2);
    let i4 = " ".repeat(indent + 4);
    format!(
        "common_tls_context:\n\
         {i2}tls_params: {{ tls_minimum_protocol_version: TLSv1_3, tls_maximum_protocol_version: TLSv1_3 }}\n\
         {i2}alpn_protocols: [\"h2\"]\n\
         {i2}tls_certificates: [{{ certificate_chain: {{ filename: \"{}\" }}, private_key: {{ filename: \"{}\" }} }}]\n\
         {i2}validation_context:\n\
         {i4}trusted_ca: {{ filename: \"{}\" }}\n\
         {i4}match_typed_subject_alt_names: [{{ san_type: URI, matcher: {{ prefix: \"{san}\" }} }}]",
        files[0], files[1], files[2]
    )
}

pub fn start_envoy(
    dir: &std::path::Path,
    name: &str,
    yaml: String,
    base_id: u32,
    port: SocketAddr,
) -> Proc {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    let child = std::process::Command::new("taskset")
        .args(["-c", "1", "envoy", "-c"])
        .arg(&path)
        .args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "-l",
            "error",
            "--base-id",
        ])
        .arg(base_id.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start envoy");
    let p = Proc(child);
    wait_port(port);
    p
}

/// Envoy terminating HBONE on `ip`:15008 (mutual TLS with `files`, any mesh client), every
/// CONNECT relayed to the cluster `cluster` (its YAML: one cluster named `upstream`).
pub fn hbone_terminator_yaml(ip: &str, files: &[String; 3], cluster: &str) -> String {
    format!(
        r#"admin: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }} }}
static_resources:
  listeners:
  - address: {{ socket_address: {{ address: {ip}, port_value: 15008 }} }}
    filter_chains:
    - transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext
          require_client_certificate: true
          {}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: hbone
          codec_type: HTTP2
          upgrade_configs: [{{ upgrade_type: CONNECT }}]
          http_filters: [{{ name: envoy.filters.http.router, typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }} }}]
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {{ connect_matcher: {{}} }}
                route: {{ cluster: upstream, timeout: 0s, upgrade_configs: [{{ upgrade_type: CONNECT, connect_config: {{}} }}] }}
  clusters:
{cluster}"#,
        tls_context(files, "spiffe://cluster.local/", 10)
    )
}

/// A SOCKS5 CONNECT through `proxy` to `dst` (IPv4), from `src` when given (so that the proxy
/// sees the client as the workload at that address); panics on a refusal.
pub fn socks5_connect(
    src: Option<std::net::IpAddr>,
    proxy: SocketAddr,
    dst: std::net::SocketAddrV4,
) -> TcpStream {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(src) = src {
        sock.bind(&SocketAddr::new(src, 0).into()).unwrap();
    }
    sock.connect(&proxy.into()).unwrap();
    let mut s: TcpStream = sock.into();
    s.write_all(&[5, 1, 0]).unwrap();
    let mut r = [0u8; 2];
    s.read_exact(&mut r).unwrap();
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&dst.ip().octets());
    req.extend_from_slice(&dst.port().to_be_bytes());
    s.write_all(&req).unwrap();
    let mut rep = [0u8; 10];
    s.read_exact(&mut rep).unwrap();
    assert_eq!(rep[1], 0, "SOCKS5 refused");
    s
}
