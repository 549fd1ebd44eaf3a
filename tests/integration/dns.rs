//! The DNS proxy with real parts, in network namespaces: the l4mesh binary with DNS capture on,
//! dnsmasq as the upstream resolver in a namespace of its own (its address in the `resolv.conf`
//! given to l4mesh), `dig` as the client, then `l4mesh redirect install --dns-capture` capturing
//! the namespace's port 53.
//! Mesh names come from the store (aliases through search domains, wildcard hosts, the other
//! family empty), other names from dnsmasq (NXDOMAIN passed through), over UDP and TCP; an
//! upstream that never answers gives SERVFAIL within the timeout; garbage gets FORMERR and the
//! proxy keeps answering.

use super::netns::{privileged, Netns};

const MESH: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.0.1"]
  protocol: TCP
  node: n1
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.9.0.1"]
  ports: { 80: 8080 }
- name: api
  namespace: other
  hostname: api.other.svc.cluster.local
  vips: ["/10.9.0.2", "/fd00::2"]
  ports: { 80: 8080 }
- name: wild
  namespace: default
  hostname: "*.example.com"
  vips: ["/10.9.0.3"]
  ports: { 80: 8080 }
- name: private
  namespace: default
  hostname: private.default.svc.cluster.local
  vips: ["/10.9.0.7"]
  ports: { 80: 8080 }
  visibility: Namespace
- name: external-db
  namespace: default
  hostname: db.upstream.test
  vips: ["/10.9.0.8"]
  ports: { 5432: 8080 }
- name: range
  namespace: default
  hostname: range.example.com
  vips: ["/10.60.0.0/16"]
  ports: { 5432: 8080 }
# One VIP, three namespaces (the client's neither first nor last): the client's namespace wins.
- name: shared
  namespace: other
  hostname: shared.example.com
  vips: ["/10.61.0.1"]
  ports: { 80: 9999 }
- name: shared
  namespace: default
  hostname: shared.example.com
  vips: ["/10.61.0.1"]
  ports: { 80: 8080 }
- name: shared
  namespace: third
  hostname: shared.example.com
  vips: ["/10.61.0.1"]
  ports: { 80: 9999 }
"#;

/// A DNS-resolution ServiceEntry's endpoint: known by hostname only; and the endpoints of a
/// service with an address range and of two services sharing a VIP.
const EXTERNAL: &str = r#"
- uid: cluster1//v1/WorkloadEntry/default/ranged
  name: ranged
  namespace: default
  workloadIps: ["10.53.0.2"]
  protocol: TCP
  services:
    "default/range.example.com": { 5432: 8080 }
    "default/shared.example.com": { 80: 8080 }
    "other/shared.example.com": { 80: 9999 }
    "third/shared.example.com": { 80: 9999 }
- uid: cluster1//v1/ServiceEntry/default/external-db/db.upstream.test
  name: external-db
  namespace: default
  hostname: db.upstream.test
  protocol: TCP
  services: { "default/db.upstream.test": { 5432: 8080 } }
"#;

/// Through the SOCKS5 listener at argv[1] to argv[2]:argv[3]: sends argv[4], half-closes,
/// prints the reply.
const SOCKS_PY: &str = r#"
import socket, sys, ipaddress
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=5)
s.sendall(b'\x05\x01\x00'); assert s.recv(2) == b'\x05\x00'
s.sendall(b'\x05\x01\x00\x01' + ipaddress.ip_address(sys.argv[2]).packed + int(sys.argv[3]).to_bytes(2, 'big'))
r = s.recv(10); assert r[1] == 0, r
s.sendall(sys.argv[4].encode()); s.shutdown(socket.SHUT_WR)
data = b''
while True:
    c = s.recv(65536)
    if not c: break
    data += c
print(data.decode())
"#;

/// Sends argv[2] UDP queries for argv[3] to 127.0.0.1:argv[1] as fast as it can, without
/// waiting for answers.
const FLOOD_PY: &str = r#"
import socket, struct, sys
port, n, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
q = b''.join(bytes([len(l)]) + l.encode() for l in name.split('.')) + b'\x00\x00\x01\x00\x01'
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(n):
    s.sendto(struct.pack('>HHHHHH', i & 0xffff, 0x0100, 1, 0, 0, 0) + q, ('127.0.0.1', port))
print('sent', n)
"#;

/// The peak resident memory (KiB, `VmHWM`) of the process listening on UDP `port` in `ns`.
fn peak_rss_of_udp_listener(ns: &Netns, port: u16) -> u64 {
    let (_, out, _) = ns.output(&["ss", "-lunpH", "sport", "=", &format!(":{port}")]);
    let pid = out
        .split("pid=")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .unwrap_or_else(|| panic!("no listener on {port}: {out}"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// `dig` inside `ns` against `port` on 127.0.0.1; its whole output.
fn dig(ns: &Netns, port: u16, args: &[&str]) -> String {
    let p = port.to_string();
    let mut full = vec!["dig", "@127.0.0.1", "-p", &p, "+time=5", "+tries=1"];
    full.extend_from_slice(args);
    let (_, out, err) = ns.output(&full);
    format!("{out}{err}")
}

fn short(ns: &Netns, port: u16, args: &[&str]) -> String {
    let mut a = vec!["+short"];
    a.extend_from_slice(args);
    dig(ns, port, &a).trim().to_owned()
}

#[test]
fn dns_proxy_answers_mesh_names_and_forwards_the_rest() {
    if !privileged(
        "dns_proxy_answers_mesh_names_and_forwards_the_rest",
        &["dig", "dnsmasq"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(
        &mesh,
        MESH.replacen(
            "\nworkloads:\n",
            &format!("\nworkloads:\n{}", EXTERNAL.trim_start_matches('\n')),
            1,
        ),
    )
    .unwrap();
    let hosts = dir.path().join("many.hosts");
    std::fs::write(
        &hosts,
        (1..=100)
            .map(|i| format!("192.0.2.{i} many.test\n"))
            .collect::<String>(),
    )
    .unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(
        &resolv,
        "search default.svc.cluster.local\nnameserver 10.53.0.2\n",
    )
    .unwrap();
    let silent = dir.path().join("silent.conf");
    std::fs::write(&silent, "nameserver 127.0.0.3\n").unwrap();
    let mut ns = Netns::new("dns");
    // The upstream resolver in a namespace of its own, as a cluster's DNS service is: queries to
    // it leave the client's namespace (so capture rules see them).
    let mut up = Netns::new("dnsup");
    ns.link(&up, "dns", "10.53.0.1/24", "10.53.0.2/24");
    // The upstream: names under .test are its own (unknown ones NXDOMAIN).
    up.spawn(
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=10.53.0.2",
            "--local=/test/",
            "--address=/upstream.test/192.0.2.7",
            // A hostname-only destination, and a name too large for one UDP answer.
            "--address=/db.upstream.test/10.53.0.2",
            &format!("--addn-hosts={}", hosts.display()),
            "--log-queries",
        ],
        &[],
        "started",
    );
    // The hostname-only destination's server.
    up.spawn(
        &[
            "python3",
            "-c",
            super::netns::ECHO_PY,
            "10.53.0.2",
            "8080",
            "external",
        ],
        &[],
        "ready",
    );
    // A resolver that reads and never answers.
    ns.spawn(
        &[
            "python3",
            "-c",
            "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.3', 53)); print('ready', flush=True)\nwhile True: s.recv(4096)",
        ],
        &[],
        "ready",
    );
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let start = |ns: &mut Netns,
                 port: &str,
                 conf: &std::path::Path,
                 readiness: &str,
                 extra: &[(&str, &str)]| {
        let addr = format!("127.0.0.1:{port}");
        let metrics = format!("127.0.0.1:{}", readiness.parse::<u16>().unwrap() + 1);
        let socks = format!("127.0.0.1:{}", readiness.parse::<u16>().unwrap() + 2);
        let ready = format!("127.0.0.1:{readiness}");
        let mut envs = vec![
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("DNS_PROXY_ADDR", addr.as_str()),
            ("L4MESH_DNS_RESOLV_CONF", conf.to_str().unwrap()),
            ("LOCAL_XDS_PATH", mesh.to_str().unwrap()),
            ("PROXY_WORKLOAD_INFO", "default/client/client"),
            ("NODE_NAME", "n1"),
            ("L4MESH_SOCKS5_ADDR", socks.as_str()),
            ("L4MESH_OUTBOUND_ADDR", "127.0.0.1:0"),
            ("L4MESH_INBOUND_PLAINTEXT_ADDR", "127.0.0.1:0"),
            ("L4MESH_HBONE_ADDR", "127.0.0.1:0"),
            ("L4MESH_READINESS_ADDR", ready.as_str()),
            ("L4MESH_METRICS_ADDR", metrics.as_str()),
            ("L4MESH_DISABLE_ADMIN", "true"),
            ("RUST_LOG", "info,dns=debug,l4mesh=debug"),
        ];
        envs.extend_from_slice(extra);
        ns.spawn(&[bin], &envs, "listening")
    };
    let log = start(&mut ns, "15053", &resolv, "15021", &[]);
    let _silent_log = start(&mut ns, "15054", &silent, "15031", &[]);
    // A client of another namespace, with the stricter visibility rule.
    let _strict_log = start(
        &mut ns,
        "15055",
        &resolv,
        "15041",
        &[
            ("PROXY_WORKLOAD_INFO", "other/client/client"),
            ("L4MESH_DNS_RESPECT_VISIBILITY", "true"),
        ],
    );
    let p = 15053;

    // From the store: the canonical name, authoritative.
    assert_eq!(
        short(&ns, p, &["echo.default.svc.cluster.local", "A"]),
        "10.9.0.1",
        "{}",
        log.all()
    );
    let full = dig(&ns, p, &["ECHO.default.svc.cluster.local", "A"]);
    assert!(
        full.contains("status: NOERROR") && full.contains(" aa"),
        "authoritative, any case: {full}"
    );
    // The other family of a mesh name: NOERROR, no answer.
    let aaaa = dig(&ns, p, &["echo.default.svc.cluster.local", "AAAA"]);
    assert!(
        aaaa.contains("status: NOERROR") && aaaa.contains("ANSWER: 0"),
        "{aaaa}"
    );
    assert_eq!(
        short(&ns, p, &["api.other.svc.cluster.local", "AAAA"]),
        "fd00::2"
    );
    // A spelling with one of the pod's search domains (its resolv.conf's `search` line): a
    // CNAME to the name without it, then that name's address (ztunnel's answer).
    assert_eq!(
        short(&ns, p, &["echo.default.default.svc.cluster.local", "A"]),
        "echo.default.\n10.9.0.1"
    );
    assert_eq!(
        short(&ns, p, &["api.other.default.svc.cluster.local", "A"]),
        "api.other.\n10.9.0.2"
    );
    // A partial Kubernetes name asked as it is (dig uses no search list): under that name.
    assert_eq!(short(&ns, p, &["echo", "A"]), "10.9.0.1");
    // A wildcard host.
    assert_eq!(short(&ns, p, &["anything.example.com", "A"]), "10.9.0.3");
    // Forwarded to dnsmasq; its NXDOMAIN passed through.
    assert_eq!(
        short(&ns, p, &["upstream.test", "A"]),
        "192.0.2.7",
        "{}",
        log.all()
    );
    // One debug line per query: name, type, where the answer came from.
    log.wait_for(&[
        "dns query forwarded",
        "name=upstream.test.",
        "qtype=a",
        "source=\"upstream\"",
    ])
    .unwrap_or_else(|| panic!("no query line:\n{}", log.all()));
    log.wait_for(&[
        "dns query answered",
        "name=echo.default.svc.cluster.local.",
        "source=\"store\"",
    ])
    .unwrap_or_else(|| panic!("no query line:\n{}", log.all()));
    let nx = dig(&ns, p, &["missing.test", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // TCP, both kinds.
    assert_eq!(
        short(&ns, p, &["+tcp", "echo.default.svc.cluster.local", "A"]),
        "10.9.0.1"
    );
    assert_eq!(short(&ns, p, &["+tcp", "upstream.test", "A"]), "192.0.2.7");
    // Garbage: FORMERR for what has a header, and the proxy goes on.
    let (ok, out, err) = ns.output(&[
        "python3",
        "-c",
        "import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(3)\ns.sendto(b'\\x12\\x34\\xff\\xff\\x00', ('127.0.0.1', 15053)); r=s.recv(512); print(r[:2].hex(), r[3] & 15)\ns.sendto(b'\\x01', ('127.0.0.1', 15053))",
    ]);
    assert!(ok, "{out} {err}");
    assert_eq!(out.trim(), "1234 1", "FORMERR with the request's id");
    assert_eq!(
        short(&ns, p, &["echo.default.svc.cluster.local", "A"]),
        "10.9.0.1"
    );
    // An upstream that never answers: SERVFAIL, within the timeout (2 s), not a hang.
    let t = std::time::Instant::now();
    let sf = dig(&ns, 15054, &["silent.test", "A"]);
    assert!(sf.contains("status: SERVFAIL"), "{sf}");
    assert!(
        t.elapsed() < std::time::Duration::from_secs(4),
        "{:?}",
        t.elapsed()
    );
    // Captured: with the pod's DNS redirected to the proxy, a query addressed to the upstream is
    // answered from the store, and what is forwarded reaches the upstream without looping back
    // (the proxy's own queries carry the mark).
    let (ok, out, err) = ns.output(&[
        bin,
        "redirect",
        "install",
        "--backend",
        "iptables",
        "--dns-capture",
    ]);
    assert!(ok, "{out} {err}");
    let via = |args: &[&str]| {
        let mut full = vec!["dig", "@10.53.0.2", "+time=5", "+tries=1", "+short"];
        full.extend_from_slice(args);
        ns.output(&full).1.trim().to_owned()
    };
    assert_eq!(
        via(&["echo.default.svc.cluster.local", "A"]),
        "10.9.0.1",
        "{}",
        log.all()
    );
    assert_eq!(
        via(&["+tcp", "echo.default.svc.cluster.local", "A"]),
        "10.9.0.1"
    );
    assert_eq!(via(&["upstream.test", "A"]), "192.0.2.7", "{}", log.all());
    let (ok, out, err) = ns.output(&[bin, "redirect", "remove"]);
    assert!(ok, "{out} {err}");
    // Uncaptured again: the upstream itself answers (it does not know the mesh name).
    assert_ne!(via(&["echo.default.svc.cluster.local", "A"]), "10.9.0.1");
    // Visibility: a namespace-private service is answered to its own namespace always (and to
    // every namespace by default, as ztunnel); with the stricter rule, not to another one.
    assert_eq!(
        short(&ns, p, &["private.default.svc.cluster.local", "A"]),
        "10.9.0.7"
    );
    let hidden = dig(&ns, 15055, &["private.default.svc.cluster.local", "A"]);
    assert!(
        hidden.contains("status: ") && !hidden.contains("10.9.0.7") && !hidden.contains(" aa"),
        "forwarded, not answered: {hidden}"
    );
    assert_eq!(
        short(&ns, 15055, &["echo.default.svc.cluster.local", "A"]),
        "10.9.0.1"
    );
    // Other record types of a mesh name go upstream (dnsmasq knows none: no answer).
    let txt = dig(&ns, p, &["echo.default.svc.cluster.local", "TXT"]);
    assert!(!txt.contains(" aa") && !txt.contains("10.9.0.1"), "{txt}");
    // An upstream answer too large for UDP: the proxy asks again over TCP and gives the client
    // what fits, flagged truncated; the client's TCP retry gets all 100.
    let cut = dig(&ns, p, &["+ignore", "+noedns", "many.test", "A"]);
    assert!(cut.contains(" tc"), "truncated: {cut}");
    let size: usize = cut
        .split("MSG SIZE  rcvd: ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(usize::MAX);
    assert!(size <= 512, "{size} bytes over UDP without EDNS");
    assert_eq!(short(&ns, p, &["many.test", "A"]).lines().count(), 100);
    // A hostname-only destination: on-demand DNS through dnsmasq, then the connection.
    let (ok, out, err) = ns.output(&["python3", "-c", SOCKS_PY, "15023", "10.9.0.8", "5432", "hi"]);
    assert!(ok, "{out} {err}\n{}", log.all());
    assert_eq!(out.trim(), "external:10.53.0.1:hi");
    log.wait_for(&[
        "on-demand DNS: endpoint resolved",
        "db.upstream.test",
        "10.53.0.2",
    ])
    .unwrap_or_else(|| panic!("{}", log.all()));
    // An address inside a service's range, and a VIP two namespaces share: the range's service,
    // and the client's namespace's service.
    for (dst, port) in [("10.60.7.7", "5432"), ("10.61.0.1", "80")] {
        let (ok, out, err) = ns.output(&["python3", "-c", SOCKS_PY, "15023", dst, port, dst]);
        assert!(ok, "{dst}: {out} {err}\n{}", log.all());
        assert_eq!(out.trim(), format!("external:10.53.0.1:{dst}"));
    }
    // A flood of queries that wait on a silent upstream: dropped beyond the limits, memory
    // bounded, and the proxy still answers.
    let before = peak_rss_of_udp_listener(&ns, 15054);
    let (ok, out, err) = ns.output(&["python3", "-c", FLOOD_PY, "15054", "50000", "flood.test"]);
    assert!(ok, "{out} {err}");
    // Past the upstream timeout: every query taken has been answered (SERVFAIL) or dropped.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let after = peak_rss_of_udp_listener(&ns, 15054);
    assert!(
        after < before + 32 * 1024,
        "peak RSS {before} KiB → {after} KiB after 50 000 queries"
    );
    // Another client (the flooding one holds its own 64 slots for the upstream's timeout).
    assert_eq!(
        short(
            &ns,
            15054,
            &["-b", "127.0.0.2", "echo.default.svc.cluster.local", "A"]
        ),
        "10.9.0.1"
    );
    // ztunnel's metrics, by query type and protocol.
    let (_, metrics, _) = ns.output(&["python3", "-c", "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:15022/metrics', timeout=3).read().decode())"]);
    for needle in [
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\"",
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"tcp\"",
        "istio_dns_upstream_requests_total{request_query_type=\"a\"",
        "istio_dns_upstream_request_duration_seconds_bucket",
        "istio_on_demand_dns_total{source_workload=\"client\"",
        "hostname=\"db.upstream.test\"",
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }
}
