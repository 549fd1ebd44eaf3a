//! `l4mesh redirect install|remove` inside a pod's network namespace, for both backends: the
//! installed rules capture an app's outbound connection (15001) and inbound traffic from a peer
//! namespace (15006) — reaching the app from the peer's own address (ENABLE_ORIG_SRC) —;
//! `install` is idempotent; `remove` leaves no rule, `ip rule` or route behind.

use super::netns::*;

const MESH: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/pod
  name: pod
  namespace: default
  serviceAccount: pod
  workloadIps: ["10.238.0.2"]
  protocol: TCP
- uid: cluster1//v1/Pod/default/peer
  name: peer
  namespace: default
  serviceAccount: peer
  node: other-node
  workloadIps: ["10.238.0.1"]
  protocol: TCP
"#;

/// Runs `l4mesh redirect <action> --backend <backend>` in `ns` and asserts it succeeded.
fn redirect(ns: &Netns, action: &str, backend: &str) {
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let (ok, out, err) = ns.output(&[bin, "redirect", action, "--backend", backend]);
    assert!(
        ok,
        "l4mesh redirect {action} --backend {backend} failed: {out} {err}"
    );
}

/// The capture rules of `ns` as its backend lists them (iptables: IPv4 and IPv6), and the policy
/// routing of both families.
fn rules(ns: &Netns, backend: &str) -> String {
    let (ok, out, err) = if backend == "iptables" {
        let (ok4, v4, e4) = ns.output(&["iptables-save"]);
        let (ok6, v6, e6) = ns.output(&["ip6tables-save"]);
        (
            ok4 && ok6,
            format!("{v4}\n== ip6tables\n{v6}"),
            format!("{e4} {e6}"),
        )
    } else {
        ns.output(&["nft", "list", "ruleset"])
    };
    assert!(ok, "listing rules failed: {err}");
    format!("{out}\n{}", routing(ns))
}

/// `ip rule` and table 100 of both families.
fn routing(ns: &Netns) -> String {
    let mut s = String::new();
    for f in ["-4", "-6"] {
        let (ok, rules, err) = ns.output(&["ip", f, "rule", "show"]);
        assert!(ok, "ip {f} rule show failed: {err}");
        let (_, routes, _) = ns.output(&["ip", f, "route", "show", "table", "100"]);
        s += &format!("== ip {f} rule\n{rules}\n== ip {f} table 100\n{routes}\n");
    }
    s
}

fn check_backend(backend: &str, n: u32) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.yaml");
    std::fs::write(&cfg, MESH).unwrap();

    let mut pod = Netns::new(&format!("rpod{n}"));
    let mut peer = Netns::new(&format!("rpeer{n}"));
    pod.link(
        &peer,
        &format!("r{n}{}", std::process::id() % 100000),
        "10.238.0.2/24",
        "10.238.0.1/24",
    );

    // Installed twice: the second run replaces the first (one jump / one table, not two). With
    // one excluded port each way, which must bypass l4mesh.
    for _ in 0..2 {
        let bin = env!("CARGO_BIN_EXE_l4mesh");
        let (ok, out, err) = pod.output(&[
            bin,
            "redirect",
            "install",
            "--backend",
            backend,
            "--exclude-inbound-ports",
            "15020,15021,9001",
            "--exclude-outbound-ports",
            "8081",
        ]);
        assert!(
            ok,
            "l4mesh redirect install --backend {backend} failed: {out} {err}"
        );
    }
    let installed = rules(&pod, backend);
    if backend == "iptables" {
        let (v4, _) = installed.split_once("== ip6tables").unwrap();
        assert_eq!(v4.matches("-j L4MESH_OUTPUT").count(), 1, "{installed}");
        assert!(v4.contains("--to-ports 15006"), "{installed}");
        assert_eq!(
            v4.matches("-j L4MESH_MANGLE_OUTPUT").count(),
            1,
            "{installed}"
        );
        assert!(installed.contains("--set-xmark 0x111/0xfff"), "{installed}");
        // The same chains for IPv6, else IPv6 TCP would bypass the capture.
        let (_, v6) = installed.split_once("== ip6tables").unwrap();
        assert_eq!(v6.matches("-j L4MESH_OUTPUT").count(), 1, "{installed}");
        assert!(v6.contains("--to-ports 15006"), "{installed}");
        // istio-cni's masked mark match.
        assert!(v6.contains("--mark 0x539/0xfff -j RETURN"), "{installed}");
    } else {
        assert_eq!(
            installed.matches("table inet l4mesh").count(),
            1,
            "{installed}"
        );
        assert!(installed.contains("redirect to :15001"), "{installed}");
        assert!(installed.contains("type route hook output"), "{installed}");
    }
    // Both families, tagged as l4mesh's.
    assert_eq!(
        installed
            .matches("fwmark 0x111/0xfff lookup 100 proto 176")
            .count(),
        2,
        "{installed}"
    );
    assert_eq!(
        installed.matches("local default dev lo proto 176").count(),
        2,
        "{installed}"
    );

    peer.spawn(
        &["python3", "-c", ECHO_PY, "10.238.0.1", "8080", "peer"],
        &[],
        "ready",
    );
    peer.spawn(
        &["python3", "-c", ECHO_PY, "10.238.0.1", "8081", "peerx"],
        &[],
        "ready",
    );
    pod.spawn(
        &["python3", "-c", ECHO_PY, "10.238.0.2", "9001", "podx"],
        &[],
        "ready",
    );
    pod.spawn(
        &["python3", "-c", ECHO_PY, "10.238.0.2", "9000", "pod"],
        &[],
        "ready",
    );
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let log = pod.spawn(
        &[bin],
        &[
            ("LOCAL_XDS_PATH", cfg.to_str().unwrap()),
            ("RUST_LOG", "info"),
            ("UNSTABLE_ENABLE_SOCKS5", "false"),
        ],
        "listening",
    );

    // Outbound: an unmodified client dials the peer; captured on 15001 and forwarded by l4mesh
    // (its own, marked, upstream socket is not captured again).
    let (ok, out, err) = pod.output(&["python3", "-c", CLIENT_PY, "10.238.0.1", "8080", "out"]);
    assert!(
        ok,
        "[{backend}] outbound failed: {out} {err}\nl4mesh log:\n{}",
        log.all()
    );
    assert_eq!(out.trim(), "peer:10.238.0.2:out");
    log.wait_for(&["access", "10.238.0.1:8080"])
        .unwrap_or_else(|| panic!("[{backend}] no outbound access-log line:\n{}", log.all()));

    // Inbound: the peer dials the pod's app port; captured on 15006 and forwarded to the app.
    let (ok, out, err) = peer.output(&["python3", "-c", CLIENT_PY, "10.238.0.2", "9000", "in"]);
    assert!(
        ok,
        "[{backend}] inbound failed: {out} {err}\nl4mesh log:\n{}",
        log.all()
    );
    // ENABLE_ORIG_SRC is unset, so on as root: the app sees the peer's address, not the pod's
    // own, and its replies find their way back through the installed policy routing.
    assert_eq!(out.trim(), "pod:10.238.0.1:in", "[{backend}]");
    log.wait_for(&["access", "inbound", "10.238.0.2:9000"])
        .unwrap_or_else(|| panic!("[{backend}] no inbound access-log line:\n{}", log.all()));

    // Excluded ports, both ways: the connection works directly, and l4mesh never sees it (it
    // logs a captured connection made after them, so their lines would be there by then).
    let (ok, out, err) = pod.output(&["python3", "-c", CLIENT_PY, "10.238.0.1", "8081", "x"]);
    assert!(ok, "[{backend}] excluded outbound failed: {out} {err}");
    assert_eq!(out.trim(), "peerx:10.238.0.2:x", "[{backend}]");
    let (ok, out, err) = peer.output(&["python3", "-c", CLIENT_PY, "10.238.0.2", "9001", "x"]);
    assert!(ok, "[{backend}] excluded inbound failed: {out} {err}");
    assert_eq!(out.trim(), "podx:10.238.0.1:x", "[{backend}]");
    let (ok, out, err) = pod.output(&["python3", "-c", CLIENT_PY, "10.238.0.1", "8080", "after"]);
    assert!(
        ok && out.trim() == "peer:10.238.0.2:after",
        "[{backend}] {out} {err}"
    );
    log.wait_for(&["access", "10.238.0.1:8080", "bytes_sent=5"])
        .unwrap_or_else(|| {
            panic!(
                "[{backend}] no access line for the last call:\n{}",
                log.all()
            )
        });
    let all = log.all();
    assert!(
        !all.contains("10.238.0.1:8081") && !all.contains("10.238.0.2:9001"),
        "[{backend}] an excluded port went through l4mesh:\n{all}"
    );

    // Removal leaves nothing of l4mesh's, and a second removal is a no-op that succeeds.
    redirect(&pod, "remove", backend);
    redirect(&pod, "remove", backend);
    let left = rules(&pod, backend);
    assert!(!left.contains("L4MESH"), "[{backend}] rules left:\n{left}");
    assert!(!left.contains("l4mesh"), "[{backend}] rules left:\n{left}");
    assert!(
        !left.contains("lookup 100"),
        "[{backend}] rules left:\n{left}"
    );
    assert!(
        !left.contains("local default"),
        "[{backend}] routes left:\n{left}"
    );
}

/// `remove` clears both backends' rules whatever `--backend` says (a switch of backend leaves no
/// stale capture), `install` clears the other backend's first, and istio-cni's identical but
/// untagged policy routing is neither an install failure nor removed.
#[test]
fn redirect_both_backends_and_istio_cni_routing() {
    if !privileged(
        "redirect_both_backends_and_istio_cni_routing",
        &["nft", "ip6tables"],
    ) {
        return;
    }
    let pod = Netns::new("rpod4");
    // What istio-cni puts in a pod: the same rule and route, without l4mesh's tag.
    pod.exec(&[
        "ip",
        "-4",
        "rule",
        "add",
        "fwmark",
        "0x111/0xfff",
        "pref",
        "32764",
        "lookup",
        "100",
    ]);
    pod.exec(&[
        "ip",
        "-4",
        "route",
        "add",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        "100",
    ]);

    redirect(&pod, "install", "iptables");
    let ipt = rules(&pod, "iptables");
    assert!(ipt.contains("L4MESH_OUTPUT"), "{ipt}");
    // Switching backend: install removes the iptables rules before adding the nft table.
    redirect(&pod, "install", "nftables");
    let both = format!("{}\n{}", rules(&pod, "iptables"), rules(&pod, "nftables"));
    assert!(!both.contains("L4MESH"), "iptables leftovers:\n{both}");
    assert_eq!(both.matches("table inet l4mesh").count(), 1, "{both}");
    // And back, then `remove` naming the *other* backend still removes everything of l4mesh's.
    redirect(&pod, "install", "iptables");
    redirect(&pod, "remove", "nftables");
    let left = format!("{}\n{}", rules(&pod, "iptables"), rules(&pod, "nftables"));
    assert!(!left.contains("L4MESH"), "rules left:\n{left}");
    assert!(!left.contains("l4mesh"), "rules left:\n{left}");
    assert!(!left.contains("proto 176"), "l4mesh routing left:\n{left}");
    // istio-cni's rule and route are still there.
    assert!(
        left.contains("32764:\tfrom all fwmark 0x111/0xfff lookup 100\n"),
        "istio-cni's rule was removed:\n{left}"
    );
    assert!(
        left.contains("local default dev lo scope host"),
        "istio-cni's route was removed:\n{left}"
    );
}

#[test]
fn redirect_install_capture_remove() {
    if !privileged("redirect_install_capture_remove", &["nft", "ip6tables"]) {
        return;
    }
    check_backend("iptables", 1);
    check_backend("nftables", 2);
}

/// Without CAP_NET_ADMIN and CAP_NET_RAW (dropped with `setpriv`; either one allows
/// IP_TRANSPARENT): ENABLE_ORIG_SRC=true is a startup error naming the capability (ztunnel's
/// `maybe_set_transparent`), and unset means off, said once at startup — the app then sees the
/// pod's own address.
#[test]
fn orig_src_without_cap_net_admin() {
    if !privileged("orig_src_without_cap_net_admin", &["setpriv"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("mesh.yaml");
    std::fs::write(&cfg, MESH).unwrap();
    let mut pod = Netns::new("rpod3");
    let peer = Netns::new("rpeer3");
    pod.link(
        &peer,
        &format!("r3{}", std::process::id() % 100000),
        "10.238.0.2/24",
        "10.238.0.1/24",
    );
    redirect(&pod, "install", "iptables");
    pod.spawn(
        &["python3", "-c", ECHO_PY, "10.238.0.2", "9000", "pod"],
        &[],
        "ready",
    );
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let no_caps = [
        "setpriv",
        "--bounding-set",
        "-net_admin,-net_raw",
        "--inh-caps",
        "-net_admin,-net_raw",
        bin,
    ];
    let cfg_path = cfg.to_str().unwrap();

    // Explicitly on: refused at startup, naming the capability.
    let mut explicit = vec![
        "env",
        "ENABLE_ORIG_SRC=true",
        "UNSTABLE_ENABLE_SOCKS5=false",
    ];
    let local = format!("LOCAL_XDS_PATH={cfg_path}");
    explicit.push(&local);
    explicit.extend_from_slice(&no_caps);
    let (ok, out, err) = pod.output(&explicit);
    assert!(
        !ok,
        "l4mesh started with ENABLE_ORIG_SRC=true and no capability: {out} {err}"
    );
    assert!(
        err.contains("ENABLE_ORIG_SRC=true needs the capability CAP_NET_ADMIN"),
        "{out} {err}"
    );

    // Unset: off, and the startup log says so and why.
    let log = pod.spawn(
        &no_caps,
        &[
            ("LOCAL_XDS_PATH", cfg_path),
            ("RUST_LOG", "info"),
            ("UNSTABLE_ENABLE_SOCKS5", "false"),
        ],
        "listening",
    );
    log.wait_for(&["ENABLE_ORIG_SRC unset and IP_TRANSPARENT not allowed"])
        .unwrap_or_else(|| panic!("no startup line about the mode:\n{}", log.all()));
    for msg in ["in", "again"] {
        let (ok, out, err) = peer.output(&["python3", "-c", CLIENT_PY, "10.238.0.2", "9000", msg]);
        assert!(
            ok,
            "inbound failed: {out} {err}\nl4mesh log:\n{}",
            log.all()
        );
        assert_eq!(
            out.trim(),
            format!("pod:10.238.0.2:{msg}"),
            "the pod's own address\n{}",
            log.all()
        );
    }
    // Off is not a per-connection fallback: nothing about it after startup.
    assert!(
        !log.all()
            .contains("cannot connect from the client's address"),
        "{}",
        log.all()
    );
}
