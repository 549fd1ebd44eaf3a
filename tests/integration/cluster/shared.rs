//! Shared mode on the simulated cluster, twice: both nodes shared (one l4mesh per node for all
//! its pods, handed over by a real `l4mesh node-agent` per node), and a mixed cluster (node 1
//! shared, node 2 a dedicated l4mesh per pod). Each check asserts the bytes that arrived, the
//! source the server saw and the identity the destination received.

use std::collections::BTreeSet;
use std::time::Duration;

use super::call;
use super::netns::{privileged, Output};
use super::topology::{within, Cluster, PodSpec};
use super::workload_yaml;

const C1: &str = "10.240.1.10";
const S1: &str = "10.240.1.11";
const C2: &str = "10.240.1.12";
const C3: &str = "10.240.1.13";
const S2: &str = "10.240.2.10";
const S3: &str = "10.240.2.11";
const S4: &str = "10.240.2.12";
const VIP: &str = "10.240.200.1";

/// Connects, sends `hold`, and reads until the connection closes; prints `held`, then `closed`.
const HOLD_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
c.sendall(b'hold'); print('held', flush=True)
c.settimeout(60)
try:
    while c.recv(65536): pass
    print('closed', flush=True)
except OSError as e:
    print('closed', e, flush=True)
"#;

fn state() -> String {
    let mut s = String::from("workloads:\n");
    s += &workload_yaml("c1", "client", C1, "node-1", "");
    s += &workload_yaml("c2", "client2", C2, "node-1", "");
    s += &workload_yaml("c3", "client3", C3, "node-1", "");
    s += &workload_yaml("s1", "server", S1, "node-1", "");
    s += &workload_yaml("s3", "server", S3, "node-2", "");
    s += &workload_yaml("s4", "other", S4, "node-2", "");
    s += &workload_yaml(
        "s2",
        "server",
        S2,
        "node-2",
        "  services:\n    \"default/echo.default.svc.cluster.local\": { 80: 8080 }\n",
    );
    s += &format!(
        r#"services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/{VIP}"]
  ports: {{ 80: 8080 }}
"#
    );
    s
}

fn hold(c: &mut Cluster, pod: &str, ip: &str, port: u16) -> Output {
    c.pod_mut(pod).ns.spawn(
        &["python3", "-c", HOLD_PY, ip, &port.to_string()],
        &[],
        "held",
    )
}

fn node(c: &Cluster) -> &super::shared_node::SharedNode {
    c.shared.get(&1).expect("node 1 is shared")
}

fn closed(o: &Output) -> bool {
    o.all().contains("closed")
}

/// A line of the log that saw `pod`'s inbound traffic (its node's shared l4mesh, or its own),
/// with every needle.
fn dst_log(c: &Cluster, pod: &str, needles: &[&str]) -> Option<String> {
    let spec = &c.pod(pod).spec;
    match c.shared.get(&spec.node) {
        Some(n) => {
            let tag = format!("pod=\"default/{pod}\"");
            let mut all = needles.to_vec();
            all.push(&tag);
            n.wait_log(&all)
        }
        None => c.pod(pod).wait_log(needles),
    }
}

#[test]
fn shared_mode_on_every_node() {
    if !privileged("shared_mode_on_every_node", &["ss"]) {
        return;
    }
    scenarios("sa", &[1, 2]);
}

#[test]
fn shared_mode_beside_dedicated_mode() {
    if !privileged("shared_mode_beside_dedicated_mode", &["ss"]) {
        return;
    }
    scenarios("sm", &[1]);
}

/// Node 1 (always shared): c1, s1, c2 in the mesh, c3 joining later; node 2 (`shared` or
/// dedicated): s2 (the VIP's endpoint), s3, s4.
fn scenarios(prefix: &str, shared: &[u8]) {
    let pods = vec![
        PodSpec::new("c1", 1, 10, "client", true),
        PodSpec::new("s1", 1, 11, "server", true),
        PodSpec::new("c2", 1, 12, "client2", true),
        // Not in the mesh at first: added to the agent's file during the test.
        PodSpec::new("c3", 1, 13, "client3", false),
        PodSpec::new("s2", 2, 10, "server", true),
        PodSpec::new("s3", 2, 11, "server", true),
        PodSpec::new("s4", 2, 12, "other", true),
    ];
    let env = [("CONNECTION_TERMINATION_DEADLINE", "2s")];
    let mut c = Cluster::start_mixed(prefix, 2, &pods, &state(), &env, shared);
    c.echo("s1", "0.0.0.0", 8080, "s1");
    c.echo("s2", "0.0.0.0", 8080, "s2");
    let logs = |c: &Cluster| c.logs();

    // 1. pod → VIP → pod on the other node over HBONE, each pod with its own
    //    identity: the destination saw c1 as `client` and c2 as `client2`.
    for (pod, ip, sa) in [("c1", C1, "client"), ("c2", C2, "client2")] {
        let got = call(&c, pod, VIP, 80, pod);
        assert_eq!(
            got.as_deref(),
            Some(format!("s2:{ip}:{pod}").as_str()),
            "{pod} → VIP\n{}",
            logs(&c)
        );
        dst_log(
            &c,
            "s2",
            &[
                "inbound_hbone",
                &format!("spiffe://cluster.local/ns/default/sa/{sa}"),
            ],
        )
        .unwrap_or_else(|| panic!("s2 did not see {pod} as {sa}\n{}", logs(&c)));
        node(&c)
            .wait_log(&["access", "outbound", &format!("pod=\"default/{pod}\""), VIP])
            .unwrap_or_else(|| panic!("no outbound access line of {pod}\n{}", logs(&c)));
    }

    // 2. two pods of the shared node: HBONE from c1's namespace to s1's, source kept.
    assert_eq!(
        call(&c, "c1", S1, 8080, "same-node").as_deref(),
        Some(format!("s1:{C1}:same-node").as_str()),
        "{}",
        logs(&c)
    );
    node(&c)
        .wait_log(&[
            "inbound_hbone",
            "pod=\"default/s1\"",
            "spiffe://cluster.local/ns/default/sa/client",
        ])
        .unwrap_or_else(|| panic!("s1's inbound line\n{}", logs(&c)));
    // …and from node 2 into node 1, from another service account.
    assert_eq!(
        call(&c, "s4", S1, 8080, "from-node-2").as_deref(),
        Some(format!("s1:{S4}:from-node-2").as_str()),
        "{}",
        logs(&c)
    );
    dst_log(
        &c,
        "s1",
        &[
            "inbound_hbone",
            "spiffe://cluster.local/ns/default/sa/other",
        ],
    )
    .unwrap_or_else(|| panic!("s1 did not see s4 as other\n{}", logs(&c)));

    // 3. a pod deleted: its listeners leave its namespace at once, its connection closes at
    //    the deadline (2 s), the other pods' connections are untouched.
    let keep = hold(&mut c, "c1", S2, 8080);
    let gone = hold(&mut c, "c2", S2, 8080);
    let mut n = c.shared.remove(&1).unwrap();
    n.members.remove("c2");
    n.write_pods(&c);
    c.shared.insert(1, n);
    node(&c)
        .wait_log(&["pod removed", "uid-c2"])
        .unwrap_or_else(|| panic!("c2 not removed\n{}", logs(&c)));
    let listening = within(Duration::from_secs(5), || {
        let (_, out, _) = c.pod("c2").run(&["ss", "-ltnH"]);
        (!out.contains(":15001")).then_some(())
    });
    assert!(listening.is_some(), "c2's listeners are gone\n{}", logs(&c));
    assert!(
        within(Duration::from_secs(6), || closed(&gone).then_some(())).is_some(),
        "c2's connection closed at the deadline (client: {:?}; sockets: {:?})\n{}",
        gone.all(),
        c.pod("c2").run(&["ss", "-tanp"]),
        logs(&c)
    );
    node(&c)
        .wait_log(&["pod drained", "uid-c2"])
        .unwrap_or_else(|| panic!("c2 not drained\n{}", logs(&c)));
    assert!(!closed(&keep), "c1's connection was untouched");

    // 4. a pod added while c1's connection flows: c3 joins with its own identity.
    let mut n = c.shared.remove(&1).unwrap();
    n.members.insert("c3");
    n.write_pods(&c);
    c.shared.insert(1, n);
    node(&c)
        .wait_log(&["pod added", "default/c3"])
        .unwrap_or_else(|| panic!("c3 not added\n{}", logs(&c)));
    let got = within(Duration::from_secs(5), || call(&c, "c3", VIP, 80, "c3"));
    assert_eq!(
        got.as_deref(),
        Some(format!("s2:{C3}:c3").as_str()),
        "{}",
        logs(&c)
    );
    dst_log(
        &c,
        "s2",
        &[
            "inbound_hbone",
            "spiffe://cluster.local/ns/default/sa/client3",
        ],
    )
    .unwrap_or_else(|| panic!("s2 did not see c3 as client3\n{}", logs(&c)));
    assert!(!closed(&keep), "c1's connection was untouched");

    // 5. the agent restarts with c3 removed meanwhile: l4mesh reconnects, the replay keeps c1
    //    (its connection untouched) and c3, not replayed, is removed.
    let mut n = c.shared.remove(&1).unwrap();
    n.stop_agent();
    n.members.remove("c3");
    n.write_pods(&c);
    n.start_agent(&c, 1);
    c.shared.insert(1, n);
    node(&c)
        .wait_log(&["pod removed", "uid-c3", "not in the CNI agent's replay"])
        .unwrap_or_else(|| panic!("c3 not reconciled away\n{}", logs(&c)));
    assert!(
        !closed(&keep),
        "c1's connection survived the agent's restart"
    );
    assert_eq!(
        call(&c, "c1", VIP, 80, "after-agent").as_deref(),
        Some(format!("s2:{C1}:after-agent").as_str()),
        "{}",
        logs(&c)
    );

    // 6. l4mesh restarts: the agent replays its pods to the new process; traffic flows again.
    let mut n = c.shared.remove(&1).unwrap();
    n.start_l4mesh(&c, 1);
    c.shared.insert(1, n);
    node(&c)
        .wait_agent_log(&["replay to the proxy complete", "pods=2"])
        .unwrap_or_else(|| panic!("no replay to the new l4mesh\n{}", logs(&c)));
    assert_eq!(
        call(&c, "c1", VIP, 80, "after-restart").as_deref(),
        Some(format!("s2:{C1}:after-restart").as_str()),
        "{}",
        logs(&c)
    );
    let members: BTreeSet<_> = node(&c).members.iter().copied().collect();
    assert_eq!(members, BTreeSet::from(["c1", "s1"]));
}
