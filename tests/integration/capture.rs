//! Transparent capture with the rules of `l4mesh redirect install` (iptables) inside network
//! namespaces: the outbound listener finds the original destination with SO_ORIGINAL_DST, the
//! inbound plaintext listener forwards to the local workload from the peer's address, and the
//! proxy's own (marked) sockets are not captured again.

use super::netns::*;

const MESH: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/pod
  name: pod
  namespace: default
  serviceAccount: pod
  workloadIps: ["10.237.0.2"]
  protocol: TCP
- uid: cluster1//v1/Pod/default/peer
  name: peer
  namespace: default
  serviceAccount: peer
  node: other-node
  workloadIps: ["10.237.0.1"]
  protocol: TCP
  services:
    "default/echo.default.svc.cluster.local": { 80: 8080 }
- uid: cluster1//v1/Pod/default/walled
  name: walled
  namespace: default
  serviceAccount: walled
  workloadIps: ["10.237.0.4"]
  protocol: HBONE
  waypoint: { destination: "/10.237.0.1", hboneMtlsPort: 15008 }
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.237.9.1"]
  ports: { 80: 8080 }
policies:
- name: deny-9001
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ { destinationPorts: [9001] } ]]]
"#;

/// Appended to `MESH` (policies is its last list): denies the port of the established connection.
const DENY_9000: &str = r#"- name: deny-9000
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ { destinationPorts: [9000] } ]]]
"#;

/// A client that connects, says so, and reports when the connection is closed under it.
const HOLD_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print('connected', flush=True)
c.settimeout(20)
try:
    print('closed', c.recv(1), flush=True)
except OSError as e:
    print('closed', e, flush=True)
"#;

#[test]
fn iptables_redirect_outbound_and_inbound() {
    if !privileged("iptables_redirect_outbound_and_inbound", &[]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.yaml");
    std::fs::write(&cfg, MESH).unwrap();

    // "pod" runs l4mesh; "peer" is another host reachable over a veth pair.
    let mut pod = Netns::new("pod");
    let mut peer = Netns::new("peer");
    pod.link(
        &peer,
        &format!("{}", std::process::id() % 100000),
        "10.237.0.2/24",
        "10.237.0.1/24",
    );
    // The VIP range is routed towards the peer (it is never reached: the proxy rewrites it).
    pod.exec(&["ip", "route", "add", "10.237.9.0/24", "via", "10.237.0.1"]);

    // The pod's capture rules, as `l4mesh redirect install` writes them (with the policy routing
    // that lets the app's replies reach l4mesh's orig-source sockets).
    let (ok, out, err) = pod.output(&[
        env!("CARGO_BIN_EXE_l4mesh"),
        "redirect",
        "install",
        "--backend",
        "iptables",
    ]);
    assert!(ok, "l4mesh redirect install: {out} {err}");

    peer.spawn(
        &["python3", "-c", ECHO_PY, "10.237.0.1", "8080", "peer"],
        &[],
        "ready",
    );
    pod.spawn(
        &["python3", "-c", ECHO_PY, "10.237.0.2", "9000", "pod"],
        &[],
        "ready",
    );
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let log = pod.spawn(
        &[bin],
        &[
            ("LOCAL_XDS_PATH", cfg.to_str().unwrap()),
            ("RUST_LOG", "info"),
            ("L4MESH_INBOUND_PLAINTEXT_ADDR", "0.0.0.0:15006"),
            ("UNSTABLE_ENABLE_SOCKS5", "false"),
            // The stricter waypoint rule (ztunnel's default lets plaintext through).
            ("L4MESH_ENFORCE_WAYPOINT", "true"),
        ],
        "listening",
    );

    // Outbound: the app dials the VIP; captured, load-balanced to the peer's endpoint on 8080.
    let (ok, out, err) = pod.output(&["python3", "-c", CLIENT_PY, "10.237.9.1", "80", "to-vip"]);
    assert!(
        ok,
        "client via VIP failed: {out} {err}\nl4mesh log:\n{}",
        log.all()
    );
    assert_eq!(out.trim(), "peer:10.237.0.2:to-vip");
    let line = log
        .wait_for(&["access", "10.237.9.1:80", "10.237.0.1:8080"])
        .unwrap_or_else(|| panic!("no access-log line for the VIP connection:\n{}", log.all()));
    assert!(line.contains("echo.default.svc.cluster.local"), "{line}");

    // Outbound to a workload IP directly, and the proxy's own upstream socket was not re-captured
    // (it would have looped back into 15001 and been refused).
    let (ok, out, _) = pod.output(&["python3", "-c", CLIENT_PY, "10.237.0.1", "8080", "to-pod"]);
    assert!(ok, "{out}");
    assert_eq!(out.trim(), "peer:10.237.0.2:to-pod");

    // Inbound: the peer dials the pod's app port; captured on 15006, forwarded to the workload.
    let (ok, out, err) =
        peer.output(&["python3", "-c", CLIENT_PY, "10.237.0.2", "9000", "inbound"]);
    assert!(
        ok,
        "inbound failed: {out} {err}\nl4mesh log:\n{}",
        log.all()
    );
    // ENABLE_ORIG_SRC is unset (on as root): the app sees the peer, not the pod's own address.
    assert_eq!(out.trim(), "pod:10.237.0.1:inbound");
    log.wait_for(&["access", "inbound", "10.237.0.2:9000"])
        .unwrap_or_else(|| panic!("no inbound access-log line:\n{}", log.all()));

    // Inbound to an address that is not a workload of this node: refused, reason logged.
    pod.exec(&[
        "ip",
        "addr",
        "add",
        "10.237.0.3/24",
        "dev",
        &format!("va-{}", std::process::id() % 100000),
    ]);
    let (ok, _, _) = peer.output(&["python3", "-c", CLIENT_PY, "10.237.0.3", "9000", "nobody"]);
    assert!(
        !ok,
        "a connection to a non-workload address must not be forwarded"
    );
    log.wait_for(&["no workload on this node"])
        .unwrap_or_else(|| panic!("no refusal logged:\n{}", log.all()));

    // Inbound plaintext to a workload behind a waypoint, with L4MESH_ENFORCE_WAYPOINT: refused
    // (it would bypass the waypoint).
    pod.exec(&[
        "ip",
        "addr",
        "add",
        "10.237.0.4/24",
        "dev",
        &format!("va-{}", std::process::id() % 100000),
    ]);
    let (ok, _, _) = peer.output(&["python3", "-c", CLIENT_PY, "10.237.0.4", "9000", "bypass"]);
    assert!(
        !ok,
        "plaintext to a workload behind a waypoint must not be forwarded"
    );
    log.wait_for(&["has a waypoint"])
        .unwrap_or_else(|| panic!("no waypoint refusal logged:\n{}", log.all()));

    // Inbound plaintext denied by an L4 policy (a listening app on 9001): closed without
    // connecting upstream, the policy named in the access log.
    pod.spawn(
        &["python3", "-c", ECHO_PY, "10.237.0.2", "9001", "pod"],
        &[],
        "ready",
    );
    let (ok, out, _) = peer.output(&["python3", "-c", CLIENT_PY, "10.237.0.2", "9001", "denied"]);
    assert!(
        !ok,
        "a connection denied by policy must not be forwarded: {out}"
    );
    log.wait_for(&["access", "RBAC", "default/deny-9001"])
        .unwrap_or_else(|| panic!("no RBAC denial logged:\n{}", log.all()));

    // A DENY written to the config file closes an established plaintext connection.
    let hold = peer.spawn(
        &["python3", "-c", HOLD_PY, "10.237.0.2", "9000"],
        &[],
        "connected",
    );
    // Let l4mesh admit the connection before the policy lands (else it is refused, not closed).
    std::thread::sleep(std::time::Duration::from_millis(500));
    std::fs::write(&cfg, format!("{MESH}{DENY_9000}")).unwrap();
    hold.wait_for(&["closed"])
        .unwrap_or_else(|| panic!("the established connection stayed open:\n{}", log.all()));
    log.wait_for(&["denies an established connection", "default/deny-9000"])
        .unwrap_or_else(|| panic!("no revocation logged:\n{}", log.all()));
}
