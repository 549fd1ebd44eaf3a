//! Upgrades in shared mode on the simulated cluster: both nodes' l4mesh replaced through the
//! hand-off socket while a client pod opens ~200 new connections a second to each of three
//! destinations (a pod on its node, a pod on the other node over HBONE, a host outside the mesh)
//! and 12 long-lived connections stream both ways. The new l4mesh serves every pod on the old
//! one's listeners (inside the pods' namespaces), then follows the CNI agent; nothing is refused
//! or reset, every byte comes back in order, the old processes exit once their connections end,
//! and a pod added after the upgrade is served by the new process.

use std::collections::BTreeSet;
use std::time::Duration;

use super::super::harness::{endpoint_of_yaml, service_yaml};
use super::netns::privileged;
use super::topology::{within, Cluster, PodSpec, OUTSIDE_IP};
use super::workload_yaml;

const C1: &str = "10.240.1.10";
const S1: &str = "10.240.1.11";
const C2: &str = "10.240.1.12";
const S2: &str = "10.240.2.10";
const VIP: &str = "10.240.200.7";

/// A streaming echo server on argv[1]:argv[2] (what comes in goes back, until EOF).
const STREAM_ECHO_PY: &str = r#"
import asyncio, sys
async def handle(r, w):
    try:
        while True:
            b = await r.read(65536)
            if not b:
                break
            w.write(b)
            await w.drain()
        w.write_eof()
        await w.drain()
    except OSError:
        pass
    w.close()
async def main():
    s = await asyncio.start_server(handle, sys.argv[1], int(sys.argv[2]), backlog=1024)
    print('ready', flush=True)
    await s.serve_forever()
asyncio.run(main())
"#;

/// Load for argv[1] seconds: argv[2] new connections a second to each target (a message, the
/// same back), and argv[3] long-lived connections per target streaming a pattern both ways and
/// checking the echo byte for byte; prints `summary <json>` at the end.
const LOAD_PY: &str = r#"
import asyncio, json, sys, time
dur, rate, nstreams = float(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
targets = [(t.rsplit(':', 1)[0], int(t.rsplit(':', 1)[1])) for t in sys.argv[4:]]
res = {'ok': 0, 'failed': 0, 'errors': [], 'streams_ok': 0, 'stream_bytes': 0, 'stream_errors': []}
PAT = bytes(j % 251 for j in range(70000))
def err(key, e):
    if len(res[key]) < 10:
        res[key].append(e)
async def short(ip, port, n):
    msg = b'ping %d' % n
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), 10)
        w.write(msg); await w.drain(); w.write_eof()
        back = await asyncio.wait_for(r.read(), 10)
        w.close()
        if back != msg:
            raise Exception('echo %r' % back[:40])
        res['ok'] += 1
    except Exception as e:
        res['failed'] += 1
        err('errors', '%s:%d #%d: %r' % (ip, port, n, e))
async def stream(ip, port, end):
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection(ip, port), 10)
        sent = 0
        async def reader():
            got = 0
            while True:
                b = await asyncio.wait_for(r.read(65536), 20)
                if not b:
                    return got
                o = got % 251
                if b != PAT[o:o + len(b)]:
                    raise Exception('bytes differ after %d' % got)
                got += len(b)
        rd = asyncio.ensure_future(reader())
        while time.time() < end:
            o = sent % 251
            w.write(PAT[o:o + 4096]); await w.drain()
            sent += 4096
            await asyncio.sleep(0.02)
        w.write_eof()
        got = await rd
        w.close()
        if got != sent:
            raise Exception('sent %d, %d came back' % (sent, got))
        res['streams_ok'] += 1
        res['stream_bytes'] += sent
    except Exception as e:
        err('stream_errors', '%s:%d: %r' % (ip, port, e))
async def main():
    end = time.time() + dur
    tasks = [asyncio.ensure_future(stream(ip, port, end)) for (ip, port) in targets for _ in range(nstreams)]
    print('started', flush=True)
    n = 0
    t0 = time.time()
    while time.time() < end:
        for (ip, port) in targets:
            n += 1
            tasks.append(asyncio.ensure_future(short(ip, port, n)))
        await asyncio.sleep(max(0, t0 + n / len(targets) / rate - time.time()))
    await asyncio.gather(*tasks)
    print('summary', json.dumps(res), flush=True)
asyncio.run(main())
"#;

fn state() -> String {
    let mut s = String::from("workloads:\n");
    s += &workload_yaml("c1", "client", C1, "node-1", "");
    s += &workload_yaml("c2", "client2", C2, "node-1", "");
    s += &workload_yaml("s1", "server", S1, "node-1", "");
    s += &workload_yaml(
        "s2",
        "server",
        S2,
        "node-2",
        &endpoint_of_yaml("echo", 8080),
    );
    s += "services:\n";
    s += &service_yaml("echo", VIP, 8080, "");
    s
}

#[test]
fn shared_mode_upgrade_under_load_loses_nothing() {
    if !privileged(
        "shared_mode_upgrade_under_load_loses_nothing",
        &["ss", "dig"],
    ) {
        return;
    }
    let pods = vec![
        PodSpec::new("c1", 1, 10, "client", true),
        PodSpec::new("s1", 1, 11, "server", true),
        // Not in the mesh at first: added after the upgrade.
        PodSpec::new("c2", 1, 12, "client2", false),
        PodSpec::new("s2", 2, 10, "server", true),
    ];
    let env = [("UPGRADE_DRAIN_DEADLINE", "1h")];
    let mut c = Cluster::start_mixed("su", 2, &pods, &state(), &env, &[1, 2]);
    for pod in ["s1", "s2"] {
        let p = c.pod_mut(pod);
        p.ns.spawn(
            &["python3", "-c", STREAM_ECHO_PY, "0.0.0.0", "8080"],
            &[],
            "ready",
        );
    }
    c.outside.spawn(
        &["python3", "-c", STREAM_ECHO_PY, "0.0.0.0", "8080"],
        &[],
        "ready",
    );
    let targets = [
        format!("{S1}:8080"),
        format!("{S2}:8080"),
        format!("{OUTSIDE_IP}:8080"),
    ];
    let mut args = vec!["python3", "-c", LOAD_PY, "14", "200", "4"];
    args.extend(targets.iter().map(String::as_str));
    let load = c.pod_mut("c1").ns.spawn(&args, &[], "started");

    std::thread::sleep(Duration::from_secs(2));
    for i in [2u8, 1] {
        let mut node = c.shared.remove(&i).expect("shared node");
        node.upgrade_l4mesh(&c, i);
        // The new process serves the pods on the old listeners, then follows the agent.
        assert!(
            node.wait_log(&["upgrade: the predecessor stopped accepting"])
                .is_some(),
            "{}",
            node.logs(i)
        );
        assert!(
            node.wait_log(&["connected to the CNI node agent"])
                .is_some(),
            "{}",
            node.logs(i)
        );
        let pods = if i == 1 { "pods=2" } else { "pods=1" };
        assert!(
            node.wait_log(&["received the running l4mesh's listening sockets", pods])
                .is_some(),
            "{}",
            node.logs(i)
        );
        c.shared.insert(i, node);
        std::thread::sleep(Duration::from_secs(2));
    }

    let line = within(Duration::from_secs(40), || load.wait_for(&["summary"]))
        .unwrap_or_else(|| panic!("no load summary: {}\n{}", load.all(), c.logs()));
    let json = line.split_once("summary ").map(|(_, j)| j).unwrap_or("{}");
    let res: serde_json::Value = serde_json::from_str(json).unwrap();
    let logs = || format!("{}\n{}", c.shared[&1].logs(1), c.shared[&2].logs(2));
    assert_eq!(res["failed"], 0, "{res}\n{}", logs());
    assert!(res["ok"].as_u64().unwrap() > 3000, "{res}");
    assert_eq!(res["streams_ok"], 12, "{res}\n{}", logs());
    assert!(
        res["stream_bytes"].as_u64().unwrap() > 12 * 1_000_000,
        "{res}"
    );

    // With their connections ended, the old processes exit (well before the deadline).
    for i in [1u8, 2] {
        let node = c.shared.get_mut(&i).unwrap();
        let exited = within(Duration::from_secs(15), || {
            let (child, _) = node.predecessor.as_mut()?;
            child.try_wait().ok().flatten()
        });
        let logs = node.logs(i);
        assert_eq!(exited.and_then(|s| s.code()), Some(0), "{logs}");
        assert!(logs.contains("closed_at_deadline=0"), "{logs}");
    }

    // The pods' DNS proxies now answer from the new process, on the adopted sockets (the old
    // one has exited), over UDP and TCP.
    for tcp in [false, true] {
        let mut args = vec![
            "dig",
            "+time=3",
            "+tries=1",
            "+short",
            "@127.0.0.1",
            "-p",
            "15053",
            "echo.default.svc.cluster.local",
        ];
        if tcp {
            args.push("+tcp");
        }
        let (_, out, _) = c.pod("c1").run(&args);
        assert_eq!(out.trim(), VIP, "tcp={tcp}\n{}", c.shared[&1].logs(1));
    }

    // The new processes adopted the pods (the agent's replay added none again).
    for (i, pod) in [(1u8, "default/c1"), (2, "default/s2")] {
        let node = &c.shared[&i];
        assert!(
            node.wait_log(&["pod adopted", pod]).is_some(),
            "{}",
            node.logs(i)
        );
        let added = node
            .l4mesh_log()
            .lines()
            .any(|l| l.contains("pod added") && l.contains(pod));
        assert!(!added, "{}", node.logs(i));
    }

    // A pod added after the upgrade is served by the new process: c2 reaches s2 over HBONE.
    c.shared.get_mut(&1).unwrap().members = BTreeSet::from(["c1", "s1", "c2"]);
    c.shared[&1].write_pods(&c);
    let node = &c.shared[&1];
    assert!(
        node.wait_log(&["pod added", "default/c2"]).is_some(),
        "{}",
        node.logs(1)
    );
    let got = within(Duration::from_secs(10), || {
        super::call(&c, "c2", S2, 8080, "after").filter(|g| g == "after")
    });
    assert_eq!(got.as_deref(), Some("after"), "{}", c.logs());
}
