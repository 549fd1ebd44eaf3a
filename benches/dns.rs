//! The DNS proxy side by side, in one run: queries per second and p50/p99 latency for names
//! answered from the mesh store and for names forwarded upstream, through l4mesh, through Istio's
//! ztunnel (`../shared/bin/ztunnel` or `ZTUNNEL_BIN`; skipped, saying so, when absent) and from
//! dnsmasq itself (the upstream, serving the same names from a hosts file: what a plain resolver
//! costs).
//!
//! Setup (all on loopback): dnsmasq on 127.0.0.77:53 knows `svc-<i>.default.svc.cluster.local`
//! (the mesh's 1 000 service names, at their VIPs) and `ext-<i>.bench.test` (1 000 names outside
//! the mesh). l4mesh and ztunnel run the same mesh file (1 000 services and the client workload,
//! dedicated mode, one worker thread) with DNS capture on and dnsmasq as their upstream (ztunnel
//! reads /etc/resolv.conf only: it runs in a mount namespace of its own where a resolv.conf naming
//! dnsmasq is bound over it). Every server is pinned to core 1; the load generator (32 queries in
//! flight over UDP, each answered before the next on its socket, names drawn at random) runs on
//! core 0, for `BENCH_SECS` (default 4) per case.
//!
//! Run (as root, for the mount namespace and port 53): `cargo bench --bench dns`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{pid_on_udp, pin_self, rss_kib, wait_port, which, Proc};
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};

const NAMES: usize = 1000;
const IN_FLIGHT: usize = 32;
const UPSTREAM: &str = "127.0.0.77";

fn vip(i: usize) -> String {
    format!("10.9.{}.{}", i / 250, i % 250 + 1)
}

fn mesh_yaml() -> String {
    let mut s = String::from(
        "workloads:\n- uid: cluster1//v1/Pod/default/client\n  name: client\n  namespace: default\n  serviceAccount: client\n  workloadIps: [\"127.0.0.1\"]\n  protocol: TCP\n  node: bench\n  services: {}\nservices:\n",
    );
    for i in 0..NAMES {
        s += &format!(
            "- {{ name: svc-{i}, namespace: default, hostname: svc-{i}.default.svc.cluster.local, vips: [\"/{}\"], ports: {{ 80: 8080 }} }}\n",
            vip(i)
        );
    }
    s
}

fn hosts() -> String {
    let mut s = String::new();
    for i in 0..NAMES {
        s += &format!("{} svc-{i}.default.svc.cluster.local\n", vip(i));
        s += &format!("192.0.{}.{} ext-{i}.bench.test\n", 2 + i / 250, i % 250 + 1);
    }
    s
}

/// Waits until `server` answers a query for `name` over UDP.
fn wait_dns(server: SocketAddr, name: &str) -> bool {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let q = query(name, 1);
    let mut buf = [0u8; 2048];
    for _ in 0..100 {
        let _ = sock.send_to(&q, server);
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if Message::from_vec(&buf[..n]).is_ok_and(|m| !m.answers().is_empty()) {
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut m = Message::new();
    m.set_id(id).set_recursion_desired(true);
    m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

/// One case's figures.
struct Figures {
    qps: f64,
    p50: Duration,
    p99: Duration,
    lost: u64,
}

/// `IN_FLIGHT` clients on one thread (non-blocking sockets, polled round robin), each asking
/// `names(i)` for a random `i` and waiting for its answer (1 s, then counted lost) before the
/// next, for `secs`.
fn load(server: SocketAddr, names: &dyn Fn(usize) -> String, secs: f64) -> Figures {
    let socks: Vec<std::net::UdpSocket> = (0..IN_FLIGHT)
        .map(|_| {
            let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            s.connect(server).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut sent: Vec<(u16, Instant)> = vec![(0, Instant::now()); IN_FLIGHT];
    let mut lat = Vec::with_capacity(1 << 20);
    let mut lost = 0;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let next = |rng: &mut u64| {
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        *rng
    };
    let ask = |i: usize, sent: &mut Vec<(u16, Instant)>, rng: &mut u64| {
        let r = next(rng);
        let id = (r >> 16) as u16;
        let q = query(&names(r as usize % NAMES), id);
        sent[i] = (id, Instant::now());
        let _ = socks[i].send(&q);
    };
    for i in 0..IN_FLIGHT {
        ask(i, &mut sent, &mut rng);
    }
    let start = Instant::now();
    let end = start + Duration::from_secs_f64(secs);
    let mut buf = [0u8; 2048];
    while Instant::now() < end {
        let mut idle = true;
        for i in 0..IN_FLIGHT {
            match socks[i].recv(&mut buf) {
                Ok(n) if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == sent[i].0 => {
                    lat.push(sent[i].1.elapsed());
                    ask(i, &mut sent, &mut rng);
                    idle = false;
                }
                Ok(_) => {}
                Err(_) if sent[i].1.elapsed() > Duration::from_secs(1) => {
                    lost += 1;
                    ask(i, &mut sent, &mut rng);
                }
                Err(_) => {}
            }
        }
        if idle {
            std::hint::spin_loop();
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    lat.sort_unstable();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    Figures {
        qps: lat.len() as f64 / elapsed,
        p50: pct(0.5),
        p99: pct(0.99),
        lost,
    }
}

fn start_dnsmasq(hosts: &Path) -> Option<Proc> {
    let bin = which("dnsmasq")?;
    let child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin)
        .args([
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={UPSTREAM}"),
            "--port=53",
            "--cache-size=10000",
        ])
        .arg(format!("--addn-hosts={}", hosts.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    Some(Proc(child))
}

fn start_l4mesh(mesh: &Path, resolv: &Path) -> (Proc, SocketAddr) {
    let dns: SocketAddr = "127.0.0.1:25053".parse().unwrap();
    let child = Command::new("taskset")
        .args(["-c", "1", env!("CARGO_BIN_EXE_l4mesh")])
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("RUST_LOG", "warn")
        .env("LOCAL_XDS_PATH", mesh)
        .env("PROXY_WORKLOAD_INFO", "default/client/client")
        .env("NODE_NAME", "bench")
        .env("ISTIO_META_DNS_CAPTURE", "true")
        .env("DNS_PROXY_ADDR", dns.to_string())
        .env("L4MESH_DNS_RESOLV_CONF", resolv)
        .env("UNSTABLE_ENABLE_SOCKS5", "false")
        .env("L4MESH_OUTBOUND_ADDR", "127.0.0.1:25001")
        .env("L4MESH_INBOUND_PLAINTEXT_ADDR", "127.0.0.1:25006")
        .env("L4MESH_HBONE_ADDR", "127.0.0.1:25008")
        .env("L4MESH_READINESS_ADDR", "127.0.0.1:25021")
        .env("L4MESH_METRICS_ADDR", "127.0.0.1:25020")
        .env("L4MESH_ADMIN_ADDR", "127.0.0.1:25000")
        .stdout(Stdio::null())
        .spawn()
        .expect("start l4mesh");
    wait_port("127.0.0.1:25021".parse().unwrap());
    (Proc(child), dns)
}

/// ztunnel with DNS capture on, in a mount namespace whose /etc/resolv.conf names dnsmasq.
fn start_ztunnel(mesh: &Path, resolv: &Path) -> Option<(Proc, SocketAddr)> {
    let bin = match common::ztunnel_bin() {
        Ok(b) => b,
        Err(looked) => {
            eprintln!(
                "ztunnel: skipped ({} not found; set ZTUNNEL_BIN)",
                looked.display()
            );
            return None;
        }
    };
    let script = format!(
        "mount --bind {} /etc/resolv.conf && exec taskset -c 1 {}",
        resolv.display(),
        bin.display()
    );
    let child = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c", &script])
        .env("FAKE_CA", "true")
        .env("XDS_ADDRESS", "")
        .env("CA_ADDRESS", "")
        .env("LOCAL_XDS_PATH", mesh)
        .env("PROXY_MODE", "dedicated")
        .env("PROXY_WORKLOAD_INFO", "default/client/client")
        .env("ZTUNNEL_WORKER_THREADS", "1")
        .env("ISTIO_META_DNS_CAPTURE", "true")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Proc(child);
    wait_port("127.0.0.1:15021".parse().unwrap());
    Some((p, "127.0.0.1:15053".parse().unwrap()))
}

fn main() {
    let Some(secs) = common::bench_secs(4.0) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (mesh, hosts_file, resolv) = (
        dir.path().join("mesh.yaml"),
        dir.path().join("hosts"),
        dir.path().join("resolv.conf"),
    );
    std::fs::write(&mesh, mesh_yaml()).unwrap();
    std::fs::write(&hosts_file, hosts()).unwrap();
    std::fs::write(&resolv, format!("nameserver {UPSTREAM}\n")).unwrap();

    let Some(_dnsmasq) = start_dnsmasq(&hosts_file) else {
        eprintln!("dns bench: skipped (dnsmasq not found: apt-get install dnsmasq-base)");
        return;
    };
    let upstream: SocketAddr = format!("{UPSTREAM}:53").parse().unwrap();
    assert!(
        wait_dns(upstream, "ext-1.bench.test"),
        "dnsmasq does not answer on {upstream} (port 53 taken? not root?)"
    );
    let (_l4, l4_dns) = start_l4mesh(&mesh, &resolv);
    assert!(wait_dns(l4_dns, "svc-1.default.svc.cluster.local"));
    let zt = start_ztunnel(&mesh, &resolv);
    if let Some((_, addr)) = &zt {
        if !wait_dns(*addr, "svc-1.default.svc.cluster.local") {
            eprintln!("ztunnel: its DNS proxy did not answer on {addr}");
        }
    }
    pin_self(0);

    let mesh_name = |i: usize| format!("svc-{i}.default.svc.cluster.local");
    let ext_name = |i: usize| format!("ext-{i}.bench.test");
    let mut servers: Vec<(&str, SocketAddr, Option<u32>)> = vec![
        ("dnsmasq (direct)", upstream, pid_on_udp(53)),
        ("l4mesh", l4_dns, pid_on_udp(l4_dns.port())),
    ];
    if let Some((_, addr)) = &zt {
        servers.push(("ztunnel", *addr, pid_on_udp(addr.port())));
    }
    println!(
        "DNS: {IN_FLIGHT} queries in flight over UDP, {NAMES} names each kind, {secs} s per case; servers on core 1, client on core 0"
    );
    println!(
        "| server | names | queries/s | p50 | p99 | lost | RSS after |\n|---|---|---|---|---|---|---|"
    );
    for (kind, names) in [
        (
            "mesh (from the store)",
            &mesh_name as &dyn Fn(usize) -> String,
        ),
        ("forwarded", &ext_name),
    ] {
        for (server, addr, pid) in &servers {
            // Warm-up (caches, allocations), then the measured run.
            load(*addr, names, 0.5);
            let f = load(*addr, names, secs);
            println!(
                "| {server} | {kind} | {:.0} | {:.1} µs | {:.1} µs | {} | {} |",
                f.qps,
                f.p50.as_secs_f64() * 1e6,
                f.p99.as_secs_f64() * 1e6,
                f.lost,
                pid.map_or("?".to_owned(), |p| format!(
                    "{:.1} MiB",
                    rss_kib(p) as f64 / 1024.0
                )),
            );
        }
    }
}
