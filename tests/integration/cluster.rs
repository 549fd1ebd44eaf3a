//! Issue 7 on a simulated cluster (see `cluster/topology.rs`): two nodes, mesh pods each running
//! the real `l4mesh` binary in dedicated mode behind `l4mesh redirect install` rules (node 1 with
//! iptables, node 2 with nftables when `nft` exists), a plain TCP pod, a host outside the mesh,
//! and an xds-testserver serving xDS and certificates. Unmodified clients (python plain sockets)
//! dial service VIPs and pod IPs; each check asserts the bytes that arrived and the source IP the
//! server saw. One topology serves every scenario (it takes a few seconds to build).

mod control_plane;
mod multinetwork;
mod protocols;
mod self_call;
mod shared;
mod shared_dns;
pub mod shared_node;
mod shared_upgrade;
pub mod topology;

use std::time::Duration;

use super::app_servers;
/// Where `topology` finds it (the bench includes `topology` next to its own `netns`).
use super::harness::workload_yaml;
use super::netns;
use super::raw_hbone;
use netns::{privileged, CLIENT_PY};
use topology::{within, Cluster, PodSpec, OUTSIDE_IP};

const C1: &str = "10.240.1.10";
const S1: &str = "10.240.1.11";
const S2: &str = "10.240.2.10";
const S3: &str = "10.240.2.11";
const WP: &str = "10.240.2.20";
/// The workload `d` (behind the waypoint `wp`), served from the waypoint's pod.
const D: &str = "10.240.2.21";
/// The only endpoint of the service `wsvc` (whose waypoint is `wp`), also in the waypoint's pod.
const E: &str = "10.240.2.22";
const T1: &str = "10.240.2.30";
const VIP: &str = "10.240.200.1";
/// The VIP of `wsvc`, a service with a waypoint.
const WVIP: &str = "10.240.200.2";

fn state() -> String {
    let hbone = |name: &str, sa: &str, ip: &str, node: u8, extra: &str| {
        workload_yaml(name, sa, ip, &format!("node-{node}"), extra)
    };
    let svc = r#"  services:
    "default/echo.default.svc.cluster.local": { 80: 8080 }
"#;
    let mut s = String::from("workloads:\n");
    s += &hbone("c1", "client", C1, 1, "");
    // s1 (another node) and s3 (this node, another pod) are also endpoints of `wsvc`, whose
    // waypoint `wp` serves only its own pod: it must never pick them.
    let wsvc = "    \"default/wsvc.default.svc.cluster.local\": { 80: 8080 }\n";
    s += &hbone("s1", "server", S1, 1, &format!("  services:\n{wsvc}"));
    s += &hbone("s2", "server", S2, 2, svc);
    s += &hbone("s3", "server", S3, 2, &format!("{svc}{wsvc}"));
    s += &hbone("wp", "waypoint", WP, 2, "");
    s += &hbone(
        "d",
        "server",
        D,
        2,
        &format!("  waypoint: {{ destination: \"/{WP}\", hboneMtlsPort: 15008 }}\n"),
    );
    s += &hbone(
        "e",
        "server",
        E,
        2,
        r#"  services:
    "default/wsvc.default.svc.cluster.local": { 80: 8080 }
"#,
    );
    s += &format!(
        r#"- uid: cluster1//v1/Pod/default/t1
  name: t1
  namespace: default
  serviceAccount: plain
  workloadIps: ["{T1}"]
  protocol: TCP
  node: node-2
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{ 80: 8080 }}
- name: wsvc
  namespace: default
  hostname: wsvc.default.svc.cluster.local
  vips: ["/{WVIP}"]
  ports: {{ 80: 8080 }}
  waypoint: {{ destination: "/{WP}", hboneMtlsPort: 15008 }}
policies:
- name: deny-9090
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ {{ destinationPorts: [9090] }} ]]]
"#
    );
    s
}

/// Pushed at run time: denies c1's address everywhere in the namespace.
fn deny_c1() -> String {
    format!(
        r#"policies:
- name: deny-c1
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ {{ sourceIps: ["{C1}/32"] }} ]]]
"#
    )
}

fn pods(nft: bool) -> Vec<PodSpec> {
    let pod = |name, node, host, sa, mesh| PodSpec {
        backend: if node == 2 && nft {
            "nftables"
        } else {
            "iptables"
        },
        ..PodSpec::new(name, node, host, sa, mesh)
    };
    let mut wp = pod("wp", 2, 20, "waypoint", true);
    wp.extra_hosts.extend([21, 22]);
    vec![
        pod("c1", 1, 10, "client", true),
        pod("s1", 1, 11, "server", true),
        pod("s2", 2, 10, "server", true),
        pod("s3", 2, 11, "server", true),
        wp,
        pod("t1", 2, 30, "plain", false),
    ]
}

/// The status a raw HBONE client presenting `sa`'s certificate gets for a CONNECT to
/// `authority`, dialled on `ip:15008` from inside namespace `netns` (on a thread that joins it; its
/// sockets carry l4mesh's packet mark, so the pod's capture rules leave them alone, as they leave
/// l4mesh's own).
fn raw_tunnel_status(netns: &str, ip: &str, sa: &str, authority: &str) -> u16 {
    let (netns, sa, authority) = (netns.to_owned(), sa.to_owned(), authority.to_owned());
    let hbone: std::net::SocketAddr = format!("{ip}:15008").parse().unwrap();
    std::thread::spawn(move || {
        control_plane::enter_netns(&netns).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let cp = std::net::SocketAddr::new(
                topology::CONTROL_PLANE_IP.parse().unwrap(),
                topology::CONTROL_PLANE_PORT,
            );
            // Its sockets carry the mark, as l4mesh's own: the pod's capture rules skip them.
            let ca = l4mesh::identity::IstioCaSettings {
                packet_mark: 1337,
                ..super::harness::istio_ca_at(cp)
            };
            let opts = l4mesh::socket::UpstreamOptions {
                mark: 1337,
                connect_timeout: Duration::from_secs(5),
                orig_src: false,
                orig_src_fallbacks: Default::default(),
                keepalive: Default::default(),
                netns: None,
            };
            let tcp = l4mesh::socket::connect(hbone, &opts).await.unwrap();
            let send = raw_hbone::client(ca, &sa, tcp).await;
            raw_hbone::status(send, authority).await
        })
    })
    .join()
    .unwrap()
}

/// Sends `msg` from `pod` to `ip:port` with a plain socket; the answer, or None on failure.
fn call(c: &Cluster, pod: &str, ip: &str, port: u16, msg: &str) -> Option<String> {
    let (ok, out, _) = c
        .pod(pod)
        .run(&["python3", "-c", CLIENT_PY, ip, &port.to_string(), msg]);
    ok.then(|| out.trim().to_owned())
}

fn call_from_outside(c: &Cluster, ip: &str, port: u16, msg: &str) -> Option<String> {
    let (ok, out, _) = c
        .outside
        .output(&["python3", "-c", CLIENT_PY, ip, &port.to_string(), msg]);
    ok.then(|| out.trim().to_owned())
}

#[test]
fn cluster_scenarios() {
    // Node 2 uses nftables: with L4MESH_REQUIRE_PRIVILEGED a missing nft fails instead of
    // silently testing iptables twice.
    if !privileged("cluster_scenarios", &["nft"]) {
        return;
    }
    let nft = true;
    let t0 = std::time::Instant::now();
    // The stricter waypoint rule: a direct tunnel to a workload with a waypoint is refused.
    let mut c = Cluster::start(
        "k",
        2,
        &pods(nft),
        &state(),
        &[("L4MESH_ENFORCE_WAYPOINT", "true")],
    );
    let s1 = c.echo("s1", "0.0.0.0", 8080, "s1");
    let s1_9090 = c.echo("s1", "0.0.0.0", 9090, "s1-9090");
    let s2 = c.echo("s2", "0.0.0.0", 8080, "s2");
    c.echo("s3", "0.0.0.0", 8080, "s3");
    c.echo("wp", D, 8080, "d");
    c.echo("wp", E, 8080, "e");
    c.echo("t1", "0.0.0.0", 8080, "t1");
    let out = c.outside.spawn(
        &["python3", "-c", netns::ECHO_PY, OUTSIDE_IP, "8080", "ext"],
        &[],
        "ready",
    );
    let logs = |c: &Cluster| c.logs();

    // 1. pod → service VIP on another node: captured, load-balanced over s2 and s3, HBONE, and
    //    the servers see c1's pod IP.
    let mut seen = std::collections::BTreeSet::new();
    for i in 0..16 {
        let msg = format!("vip{i}");
        let got = call(&c, "c1", VIP, 80, &msg)
            .unwrap_or_else(|| panic!("c1 → VIP failed\n{}", logs(&c)));
        let (name, rest) = got.split_once(':').unwrap();
        assert_eq!(rest, format!("{C1}:{msg}"), "server saw another source");
        seen.insert(name.to_owned());
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["s2", "s3"],
        "both endpoints"
    );
    c.pod("c1")
        .wait_log(&[
            "access",
            "outbound",
            VIP,
            "spiffe://cluster.local/ns/default/sa/server",
        ])
        .unwrap_or_else(|| panic!("no HBONE outbound access line in c1\n{}", logs(&c)));
    c.pod("s2")
        .wait_log(&[
            "access",
            "inbound_hbone",
            "spiffe://cluster.local/ns/default/sa/client",
        ])
        .unwrap_or_else(|| panic!("no inbound HBONE access line in s2\n{}", logs(&c)));

    // 2. pod → pod, same node and across nodes (HBONE either way; the source is kept).
    assert_eq!(
        call(&c, "c1", S1, 8080, "same-node").as_deref(),
        Some(format!("s1:{C1}:same-node").as_str()),
        "{}",
        logs(&c)
    );
    assert_eq!(
        call(&c, "c1", S2, 8080, "cross-node").as_deref(),
        Some(format!("s2:{C1}:cross-node").as_str()),
        "{}",
        logs(&c)
    );
    c.pod("s1")
        .wait_log(&["access", "inbound_hbone", &format!("{S1}:8080")])
        .unwrap_or_else(|| panic!("same-node traffic did not arrive over HBONE\n{}", logs(&c)));

    // 3. to a TCP (non-mesh) workload: plaintext (t1 has no proxy to terminate HBONE).
    assert_eq!(
        call(&c, "c1", T1, 8080, "plain").as_deref(),
        Some(format!("t1:{C1}:plain").as_str()),
        "{}",
        logs(&c)
    );
    c.pod("c1")
        .wait_log(&["access", "outbound", &format!("{T1}:8080")])
        .unwrap_or_else(|| panic!("c1's l4mesh did not carry the plaintext call\n{}", logs(&c)));

    // 4. to an address outside the mesh: passthrough.
    assert_eq!(
        call(&c, "c1", OUTSIDE_IP, 8080, "passthrough").as_deref(),
        Some(format!("ext:{C1}:passthrough").as_str()),
        "{}",
        logs(&c)
    );
    c.pod("c1")
        .wait_log(&["access", "outbound", &format!("{OUTSIDE_IP}:8080")])
        .unwrap_or_else(|| panic!("passthrough not through c1's l4mesh\n{}", logs(&c)));
    assert!(out.wait_for(&["got", C1, "passthrough"]).is_some());

    // 5. inbound plaintext from outside the mesh: captured on 15006 (the app sees the outside
    //    host's address), and subject to policy (port 9090 is denied in the namespace).
    assert_eq!(
        call_from_outside(&c, S1, 8080, "from-outside").as_deref(),
        Some(format!("s1:{OUTSIDE_IP}:from-outside").as_str()),
        "{}",
        logs(&c)
    );
    c.pod("s1")
        .wait_log(&["access", "inbound_plaintext", &format!("{S1}:8080")])
        .unwrap_or_else(|| panic!("outside call not captured on 15006\n{}", logs(&c)));
    assert_eq!(call_from_outside(&c, S1, 9090, "denied-port"), None);
    c.pod("s1")
        .wait_log(&[
            "access",
            "inbound_plaintext",
            &format!("{S1}:9090"),
            "deny-9090",
        ])
        .unwrap_or_else(|| panic!("no policy denial logged in s1\n{}", logs(&c)));
    assert!(
        !s1_9090.all().contains("denied-port"),
        "a denied connection reached the app"
    );

    // 6. a DENY policy pushed through the control plane blocks c1 across nodes, and removing it
    //    lets it through again.
    c.control.handle.upsert_yaml(&deny_c1()).unwrap();
    // Attempts before the push arrives may pass; each carries its own number.
    let mut attempt = 0;
    let denied = within(Duration::from_secs(10), || {
        attempt += 1;
        let probe = format!("deny-probe-{attempt}.");
        call(&c, "c1", S2, 8080, &probe).is_none().then_some(probe)
    })
    .unwrap_or_else(|| panic!("the pushed DENY policy did not take effect\n{}", logs(&c)));
    c.pod("s2")
        .wait_log(&["access", "inbound_hbone", "deny-c1"])
        .unwrap_or_else(|| panic!("s2 did not log the denial\n{}", logs(&c)));
    assert!(
        !s2.all().contains(&denied),
        "a denied connection reached the app"
    );
    // The policy is about c1's address only: the outside host still reaches s2.
    assert_eq!(
        call_from_outside(&c, S2, 8080, "not-c1").as_deref(),
        Some(format!("s2:{OUTSIDE_IP}:not-c1").as_str()),
        "{}",
        logs(&c)
    );
    assert!(c
        .control
        .handle
        .remove(xds_testserver::Kind::Authorization, "default/deny-c1"));
    within(Duration::from_secs(10), || {
        call(&c, "c1", S2, 8080, "allowed-again")
    })
    .unwrap_or_else(|| {
        panic!(
            "removing the DENY policy did not restore traffic\n{}",
            logs(&c)
        )
    });

    // 7. waypoints (an l4mesh acting as one, as in waypoint.rs: it serves its own node). A
    //    workload with a waypoint: c1's tunnel goes to wp, which forwards to d keeping c1's address.
    assert_eq!(
        call(&c, "c1", D, 8080, "via-waypoint").as_deref(),
        Some(format!("d:{C1}:via-waypoint").as_str()),
        "{}",
        logs(&c)
    );
    c.pod("c1")
        .wait_log(&["access", "outbound", &format!("{D}:8080"), "sa/waypoint"])
        .unwrap_or_else(|| panic!("c1 did not tunnel to the waypoint\n{}", logs(&c)));
    c.pod("wp")
        .wait_log(&["access", "inbound_hbone", &format!("{D}:8080"), "sa/client"])
        .unwrap_or_else(|| panic!("the waypoint did not carry the call\n{}", logs(&c)));

    //    A direct tunnel to d (bypassing its waypoint) with c1's identity, from c1's pod: 401
    //    (L4MESH_ENFORCE_WAYPOINT).
    assert_eq!(
        raw_tunnel_status(&c.pod("c1").ns.name, D, "client", &format!("{D}:8080")),
        401,
        "{}",
        logs(&c)
    );
    c.pod("wp")
        .wait_log(&["has a waypoint: tunnels must come from"])
        .unwrap_or_else(|| panic!("the waypoint's pod did not say why\n{}", logs(&c)));

    //    And a service whose waypoint is wp: c1 sends the VIP's traffic to wp (authority VIP:80),
    //    which picks the service's endpoint in its own pod, e — every time, although s1 (another
    //    node) and s3 (wp's node, another pod) are endpoints too: no random 503, no stray hop.
    for i in 0..12 {
        let msg = format!("svc-via-waypoint{i}");
        assert_eq!(
            call(&c, "c1", WVIP, 80, &msg).as_deref(),
            Some(format!("e:{C1}:{msg}").as_str()),
            "{}",
            logs(&c)
        );
    }
    c.pod("c1")
        .wait_log(&["access", "outbound", &format!("{WVIP}:80"), "sa/waypoint"])
        .unwrap_or_else(|| panic!("c1 did not send the service to its waypoint\n{}", logs(&c)));
    c.pod("wp")
        .wait_log(&[
            "access",
            "inbound_hbone",
            &format!("{WVIP}:80"),
            &format!("{E}:8080"),
        ])
        .unwrap_or_else(|| panic!("the waypoint did not route the service\n{}", logs(&c)));

    // 8. l4mesh stopped in c1: its captured traffic fails closed (no bypass to the server), and
    //    comes back when l4mesh does.
    let before = s1.all().matches("got").count();
    c.pod_mut("c1").stop_l4mesh();
    assert_eq!(call(&c, "c1", S1, 8080, "while-stopped"), None);
    assert_eq!(call(&c, "c1", VIP, 80, "while-stopped"), None);
    assert!(
        !s1.all().contains("while-stopped"),
        "traffic bypassed the stopped proxy"
    );
    assert_eq!(s1.all().matches("got").count(), before);
    c.start_l4mesh("c1");
    assert_eq!(
        call(&c, "c1", S1, 8080, "restarted").as_deref(),
        Some(format!("s1:{C1}:restarted").as_str()),
        "{}",
        logs(&c)
    );
    // The same on the receiving side: with s1's l4mesh stopped, inbound traffic (plaintext from
    // outside, HBONE from c1) does not reach the app either, until it is back.
    c.pod_mut("s1").stop_l4mesh();
    assert_eq!(call_from_outside(&c, S1, 8080, "inbound-stopped"), None);
    assert_eq!(call(&c, "c1", S1, 8080, "inbound-stopped"), None);
    assert!(
        !s1.all().contains("inbound-stopped"),
        "inbound traffic bypassed the stopped proxy"
    );
    c.start_l4mesh("s1");
    assert_eq!(
        call_from_outside(&c, S1, 8080, "inbound-back").as_deref(),
        Some(format!("s1:{OUTSIDE_IP}:inbound-back").as_str()),
        "{}",
        logs(&c)
    );
    let back = within(Duration::from_secs(10), || {
        call(&c, "c1", S1, 8080, "hbone-back")
    });
    assert_eq!(
        back.as_deref(),
        Some(format!("s1:{C1}:hbone-back").as_str()),
        "{}",
        logs(&c)
    );
    eprintln!("cluster_scenarios: all scenarios in {:?}", t0.elapsed());
}

/// A failing test still leaves nothing behind: every namespace (and with it every link, rule and
/// route) and every process of the cluster is gone once the panic unwinds.
#[test]
fn cluster_cleans_up_after_a_panic() {
    if !privileged("cluster_cleans_up_after_a_panic", &[]) {
        return;
    }
    let names = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = names.clone();
    let pid = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen_pid = pid.clone();
    let r = std::panic::catch_unwind(move || {
        let pod = PodSpec {
            name: "x1",
            node: 1,
            host: 10,
            extra_hosts: Vec::new(),
            mesh: true,
            service_account: "client",
            backend: "iptables",
            network: "",
        };
        let state = "workloads:\n- uid: cluster1//v1/Pod/default/x1\n  name: x1\n  namespace: default\n  serviceAccount: client\n  workloadIps: [\"10.240.1.10\"]\n  protocol: HBONE\n  node: node-1\n";
        let c = Cluster::start("z", 1, &[pod], state, &[]);
        *seen.lock().unwrap() = c.namespaces();
        *seen_pid.lock().unwrap() = c.pod("x1").l4mesh_pid();
        panic!("deliberate failure with the cluster up");
    });
    assert!(r.is_err());
    let names = names.lock().unwrap().clone();
    assert_eq!(names.len(), 5, "{names:?}");
    let list = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout);
    for n in &names {
        assert!(
            !list.contains(n.as_str()),
            "namespace {n} left behind:\n{list}"
        );
    }
    let pid = pid.lock().unwrap().expect("l4mesh was running");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "l4mesh (pid {pid}) left running"
    );
}
