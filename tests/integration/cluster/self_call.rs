//! Issue 14, item 1: l4mesh's own ports are never a destination. ztunnel's malicious-calls matrix
//! (its tests/namespaced.rs) on the simulated cluster: every source — the pod's own app, a plain
//! pod outside the mesh, a mesh pod (whose l4mesh tunnels over HBONE), a raw HBONE client — dials
//! every port l4mesh listens on, on the pod's IP and on loopback. Each call must end quickly
//! (within a second: refused, closed, a TLS alert, or an HTTP error from the operators' servers) and never loop:
//! before the fix, a connection to `<pod IP>:15006` was redirected to 15006, admitted, and connected
//! again to `<pod IP>:15006` until descriptors ran out. Afterwards the pod's l4mesh holds no more
//! descriptors than before, and the data path still serves.

use std::time::Duration;

use super::super::harness::workload_yaml;
use super::super::netns::{privileged, CLIENT_PY};
use super::topology::{within, Cluster, PodSpec};

const S: &str = "10.240.1.10";
const C: &str = "10.240.2.10";
const P: &str = "10.240.2.30";

/// Every port an l4mesh in dedicated mode listens on (SOCKS5 is off in the cluster).
const OWN_PORTS: [u16; 6] = [15001, 15006, 15008, 15000, 15020, 15021];

/// Dials each `ip:port` argument, sends a line and reads the first answer; prints
/// `<target> <outcome> <ms>`: `connection` (could not connect), `closed` (closed or reset with
/// nothing sent back), `tls` (a TLS alert), `http` (an HTTP 4xx), `data` (anything else: bytes
/// came back through), `timeout` (no answer and still open after 3 s: the sign of a loop).
const PROBE_PY: &str = r#"
import socket, sys, time
for t in sys.argv[1:]:
    ip, port = t.rsplit(':', 1)
    t0 = time.time()
    try:
        c = socket.create_connection((ip, int(port)), timeout=2)
    except OSError:
        print(t, 'connection', int((time.time() - t0) * 1000), flush=True)
        continue
    try:
        c.settimeout(3)
        c.sendall(b'hello world\r\n\r\n')
        d = c.recv(64)
        out = 'closed' if not d else 'tls' if d[0] == 0x15 else 'http' if d.startswith(b'HTTP/1.1 4') else 'data'
    except socket.timeout:
        out = 'timeout'
    except OSError:
        out = 'closed'
    c.close()
    print(t, out, int((time.time() - t0) * 1000), flush=True)
"#;

fn state() -> String {
    let mut s = String::from("workloads:\n");
    s += &workload_yaml("s", "server", S, "node-1", "");
    s += &workload_yaml("c", "client", C, "node-2", "");
    s += &format!(
        r#"- uid: cluster1//v1/Pod/default/p
  name: p
  namespace: default
  serviceAccount: plain
  workloadIps: ["{P}"]
  protocol: TCP
  node: node-2
"#
    );
    s
}

fn pods() -> Vec<PodSpec> {
    vec![
        PodSpec::new("s", 1, 10, "server", true),
        PodSpec::new("c", 2, 10, "client", true),
        PodSpec::new("p", 2, 30, "plain", false),
    ]
}

/// Runs [`PROBE_PY`] in `pod` against `targets`; (target, outcome, milliseconds) per line.
fn probe(c: &Cluster, pod: &str, targets: &[String]) -> Vec<(String, String, u64)> {
    let mut args = vec!["python3", "-c", PROBE_PY];
    args.extend(targets.iter().map(String::as_str));
    let (ok, out, err) = c.pod(pod).run(&args);
    assert!(ok, "probe from {pod} failed: {out} {err}");
    out.lines()
        .map(|l| {
            let mut w = l.split_whitespace();
            let (t, o, ms) = (w.next(), w.next(), w.next());
            match (t, o, ms.and_then(|m| m.parse().ok())) {
                (Some(t), Some(o), Some(ms)) => (t.to_owned(), o.to_owned(), ms),
                _ => panic!("unexpected probe line {l:?}"),
            }
        })
        .collect()
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn targets(ips: &[&str]) -> Vec<String> {
    ips.iter()
        .flat_map(|ip| OWN_PORTS.iter().map(move |p| format!("{ip}:{p}")))
        .collect()
}

#[test]
fn own_ports_are_never_a_destination() {
    if !privileged("own_ports_are_never_a_destination", &[]) {
        return;
    }
    let mut c = Cluster::start("q", 2, &pods(), &state(), &[]);
    let s_echo = c.echo("s", "0.0.0.0", 8080, "s");
    let pid = c.pod("s").l4mesh_pid().expect("s runs l4mesh");
    // Warm the data path (pool, certificates) so that its descriptors are counted before.
    let call = |c: &Cluster, msg: &str| {
        let (ok, out, _) = c
            .pod("c")
            .run(&["python3", "-c", CLIENT_PY, S, "8080", msg]);
        ok.then(|| out.trim().to_owned())
    };
    assert_eq!(call(&c, "warm").as_deref(), Some("s:10.240.2.10:warm"));
    let fds_before = open_fds(pid);

    // (source pod, targets, what each target may answer). The operators' HTTP servers answer
    // junk with a 400 where they are reachable; everything else is refused or closed.
    let loopback_and_pod = targets(&["127.0.0.1", S]);
    let mut results = Vec::new();
    results.extend(
        probe(&c, "s", &loopback_and_pod)
            .into_iter()
            .map(|r| ("s", r)),
    );
    results.extend(probe(&c, "p", &targets(&[S])).into_iter().map(|r| ("p", r)));
    results.extend(probe(&c, "c", &targets(&[S])).into_iter().map(|r| ("c", r)));
    results.extend(
        probe(&c, "c", &targets(&["127.0.0.1", C]))
            .into_iter()
            .map(|r| ("c", r)),
    );
    let mut failures = Vec::new();
    for (from, (target, outcome, ms)) in &results {
        let port: u16 = target
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap();
        let allowed: &[&str] = match port {
            15020 | 15021 | 15000 => &["connection", "closed", "http"],
            15008 => &["connection", "closed", "tls"],
            _ => &["connection", "closed"],
        };
        if !allowed.contains(&outcome.as_str()) || *ms > 1000 {
            failures.push(format!("{from} → {target}: {outcome} after {ms} ms"));
        }
    }
    // The loop of the issue: plaintext redirected to the pod's own inbound port lands on 15006
    // with its own address as the original destination: refused as not redirected, at once.
    let p_15006 = results
        .iter()
        .find(|(from, (t, _, _))| *from == "p" && *t == format!("{S}:15006"));
    assert!(
        matches!(p_15006, Some((_, (_, o, _))) if o == "closed"),
        "{p_15006:?}"
    );
    let line = c
        .pod("s")
        .wait_log(&["access", "10.240.2.30", &format!("{S}:15006")])
        .unwrap_or_else(|| panic!("no access line for p → {S}:15006:\n{}", c.logs()));
    assert!(line.contains("was not redirected"), "{line}");
    assert!(
        failures.is_empty(),
        "calls to l4mesh's own ports that did not end quickly or got through:\n{}\n{}",
        failures.join("\n"),
        c.logs()
    );
    // Through the mesh (c's l4mesh tunnels to s), the CONNECT to s's own port is the one
    // refused by port.
    c.pod("s")
        .wait_log(&["access", "is l4mesh itself", &format!("{S}:15006")])
        .unwrap_or_else(|| panic!("no self-call refusal logged:\n{}", c.logs()));

    // A raw HBONE client proving c's identity: CONNECT to each port of s that forwards is a
    // 400; the metrics server, which forwards nothing, stays reachable through the mesh (a meshed
    // Prometheus scrapes it), as with ztunnel.
    for (port, want) in [(15001, 400), (15006, 400), (15008, 400), (15020, 200)] {
        let authority = format!("{S}:{port}");
        let status = super::raw_tunnel_status(&c.pod("c").ns.name, S, "client", &authority);
        assert_eq!(status, want, "CONNECT {authority}\n{}", c.logs());
    }

    // No descriptor is left behind (the refused connections close at once) and the data path
    // still serves.
    let settled = within(Duration::from_secs(5), || {
        (open_fds(pid) <= fds_before + 2).then_some(())
    });
    assert!(
        settled.is_some(),
        "l4mesh in s holds {} descriptors, {fds_before} before the calls",
        open_fds(pid)
    );
    assert_eq!(call(&c, "after").as_deref(), Some("s:10.240.2.10:after"));
    drop(s_echo);
}
