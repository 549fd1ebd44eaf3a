//! The DNS proxy in shared mode: every pod the node agent hands over gets its own DNS listener
//! (127.0.0.1:15053 inside the pod), the agent captures the pod's port 53 to it
//! (`AMBIENT_DNS_CAPTURE`), mesh names are answered as that pod (its namespace's search
//! domains), and other names are forwarded from the pod's namespace (marked, so not captured
//! again) to the node's resolver: dnsmasq on the node's pod bridge.

use std::collections::BTreeSet;
use std::time::Duration;

use super::netns::privileged;
use super::topology::{within, Cluster, PodSpec};
use super::workload_yaml;

const C1: &str = "10.240.1.10";
const S1: &str = "10.240.1.11";
const VIP: &str = "10.240.200.1";
/// The pod's own DNS proxy, and the service asked most.
const OWN_PROXY: &str = "@127.0.0.1";
const ECHO: &str = "echo.default.svc.cluster.local";
/// The node's resolver: dnsmasq on node 1's pod bridge.
const RESOLVER: &str = "10.240.1.1";

fn state() -> String {
    let mut s = String::from("workloads:\n");
    s += &workload_yaml(
        "c1",
        "client",
        C1,
        "node-1",
        "  canonicalName: client-app\n",
    );
    s += &workload_yaml(
        "s1",
        "server",
        S1,
        "node-1",
        "  services:\n    \"default/db.default.svc.cluster.local\": { 5432: 5432 }\n",
    );
    s += &format!(
        r#"services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{ 80: 8080 }}
- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
  ports: {{ 5432: 5432 }}
"#
    );
    s
}

#[test]
fn shared_mode_serves_dns_in_every_pod() {
    if !privileged(
        "shared_mode_serves_dns_in_every_pod",
        &["dig", "dnsmasq", "ss"],
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    std::fs::write(&resolv, format!("nameserver {RESOLVER}\n")).unwrap();
    let pods = vec![
        PodSpec::new("c1", 1, 10, "client", true),
        PodSpec::new("s1", 1, 11, "server", true),
        // Outside the mesh: no capture, no DNS proxy.
        PodSpec::new("p1", 1, 12, "plain", false),
    ];
    let env = [
        ("L4MESH_DNS_RESOLV_CONF", resolv.to_str().unwrap()),
        ("AMBIENT_DNS_CAPTURE", "true"),
        // Pods of headless services by name from the store (off by default, as ztunnel).
        ("L4MESH_DNS_HEADLESS_PODS", "true"),
        ("RUST_LOG", "info,dns=debug"),
    ];
    let mut c = Cluster::start_mixed("sd", 1, &pods, &state(), &env, &[1]);
    let logs = |c: &Cluster| c.logs();
    let _dnsmasq = c.node_mut(1).spawn(
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            &format!("--listen-address={RESOLVER}"),
            "--local=/test/",
            "--address=/upstream.test/192.0.2.7",
            "--address=/echo.default.svc.cluster.local/192.0.2.99",
            "--log-queries",
        ],
        &[],
        "started",
    );

    // Each mesh pod listens on 15053 in its own namespace (UDP and TCP).
    for pod in ["c1", "s1"] {
        let got = within(Duration::from_secs(5), || {
            let (_, out, _) = c.pod(pod).run(&["ss", "-lnuH"]);
            out.contains("127.0.0.1:15053").then_some(())
        });
        assert!(got.is_some(), "{pod} has a DNS listener\n{}", logs(&c));
    }
    let (_, out, _) = c.pod("p1").run(&["ss", "-lnuH"]);
    assert!(!out.contains(":15053"), "p1 is not in the mesh: {out}");

    // Captured: a query to the node's resolver is answered by the pod's proxy from the store
    // (dnsmasq would say 192.0.2.99), over UDP and TCP.
    let at = format!("@{RESOLVER}");
    assert_eq!(
        dig(&c, "c1", &[&at, "echo.default.svc.cluster.local"]),
        VIP,
        "{}",
        logs(&c)
    );
    assert_eq!(
        dig(&c, "c1", &[&at, "+tcp", "echo.default.svc.cluster.local"]),
        VIP
    );
    // As the pod: its namespace completes a short name, and strips its search domains (a
    // CNAME to the name without it).
    assert_eq!(dig(&c, "c1", &[&at, "echo"]), VIP);
    assert_eq!(dig(&c, "c1", &[&at, "echo.default.svc.cluster.local"]), VIP);
    assert_eq!(
        dig(&c, "c1", &[&at, "echo.default.default.svc.cluster.local"]),
        format!("echo.default.\n{VIP}")
    );
    // A headless service: its endpoints; one pod of it by name.
    assert_eq!(dig(&c, "c1", &[&at, "db.default.svc.cluster.local"]), S1);
    assert_eq!(dig(&c, "c1", &[&at, "s1.db.default.svc.cluster.local"]), S1);
    // Forwarded from the pod's namespace, marked: it reaches dnsmasq instead of looping back.
    assert_eq!(
        dig(&c, "c1", &[&at, "upstream.test"]),
        "192.0.2.7",
        "{}",
        logs(&c)
    );
    assert_eq!(dig(&c, "s1", &[&at, "+tcp", "upstream.test"]), "192.0.2.7");
    // Straight to the proxy's address inside the pod.
    assert_eq!(dig(&c, "s1", &[OWN_PROXY, "-p", "15053", ECHO]), VIP);
    // A pod outside the mesh is not captured: dnsmasq answers it.
    assert_eq!(
        dig(&c, "p1", &[&at, "echo.default.svc.cluster.local"]),
        "192.0.2.99"
    );
    let node = c.shared.get(&1).unwrap();
    node.wait_log(&["dns query answered", "name=echo.default.svc.cluster.local."])
        .unwrap_or_else(|| panic!("no query line\n{}", logs(&c)));
    // The node's metrics count the pods' queries, by the pod's canonical service.
    let (_, metrics, _) = c.node(1).output(&[
        "python3",
        "-c",
        "import urllib.request; print(urllib.request.urlopen('http://10.240.0.11:15020/metrics', timeout=3).read().decode())",
    ]);
    for needle in [
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"udp\",source_canonical_service=\"client-app\"",
        "istio_dns_requests_total{request_query_type=\"a\",request_protocol=\"tcp\"",
        "istio_dns_upstream_requests_total{request_query_type=\"a\"",
    ] {
        assert!(metrics.contains(needle), "{needle} in\n{metrics}");
    }

    // The pod deleted: its DNS listener leaves with its other listeners, and a TCP client it
    // was serving is closed then (not at the 5 s idle timeout).
    let held = c
        .pod_mut("c1")
        .ns
        .spawn(&["python3", "-c", HOLD_TCP_PY], &[], "answered");
    let mut n = c.shared.remove(&1).unwrap();
    n.members.remove("c1");
    n.write_pods(&c);
    c.shared.insert(1, n);
    let t = std::time::Instant::now();
    assert!(
        within(Duration::from_secs(4), || held
            .all()
            .contains("closed")
            .then_some(()))
        .is_some(),
        "c1's TCP DNS client closed with the pod: {}\n{}",
        held.all(),
        logs(&c)
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    let gone = within(Duration::from_secs(5), || {
        let (_, out, _) = c.pod("c1").run(&["ss", "-lnuH"]);
        (!out.contains(":15053")).then_some(())
    });
    assert!(gone.is_some(), "c1's DNS listener is gone\n{}", logs(&c));
    let members: BTreeSet<_> = c.shared.get(&1).unwrap().members.iter().copied().collect();
    assert_eq!(members, BTreeSet::from(["s1"]));
    assert_eq!(
        dig(&c, "s1", &[OWN_PROXY, "-p", "15053", ECHO]),
        VIP,
        "s1 still served\n{}",
        logs(&c)
    );
    // Added again: its DNS proxy is back.
    let mut n = c.shared.remove(&1).unwrap();
    n.members.insert("c1");
    n.write_pods(&c);
    c.shared.insert(1, n);
    let back = within(Duration::from_secs(5), || {
        (dig(&c, "c1", &[&at, "echo.default.svc.cluster.local"]) == VIP).then_some(())
    });
    assert!(back.is_some(), "c1 served again\n{}", logs(&c));
}

/// A TCP DNS client of 127.0.0.1:15053: one query answered, then held open until the server
/// closes it.
const HOLD_TCP_PY: &str = r#"
import socket, struct
q = struct.pack('>HHHHHH', 7, 0x0100, 1, 0, 0, 0) + b'\x04echo\x07default\x03svc\x07cluster\x05local\x00\x00\x01\x00\x01'
s = socket.create_connection(('127.0.0.1', 15053), timeout=30)
s.sendall(struct.pack('>H', len(q)) + q)
n = struct.unpack('>H', s.recv(2))[0]
print('answered', flush=True)
try:
    while s.recv(4096): pass
except OSError:
    pass
print('closed', flush=True)
"#;

/// `dig +short` in `pod`; its answer lines.
fn dig(c: &Cluster, pod: &str, args: &[&str]) -> String {
    let mut full = vec!["dig", "+time=3", "+tries=1", "+short"];
    full.extend_from_slice(args);
    c.pod(pod).run(&full).1.trim().to_owned()
}
