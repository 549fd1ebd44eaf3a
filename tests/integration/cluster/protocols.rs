//! Real application protocols through the mesh, on the netns cluster: Debian's PostgreSQL and
//! Redis servers in pods, their own clients (`psql`, `redis-cli`) in a client pod, every pod with
//! its l4mesh. Two paths to each: a mesh pod on the other node (captured → HBONE → delivered) and
//! a pod outside the mesh (captured → plain TCP). Each check asserts what the application saw:
//! rows read back, values, messages in order, and the client's address in the server's view.
//! A server that speaks first, and a client that half-closes and keeps reading, on both paths.
//! A gRPC bidirectional stream held 30 s, then the client's l4mesh drained: it keeps flowing
//! until the drain deadline and ends there. Then policy changes while sessions are open: a transaction spanning a change that still
//! allows it commits; a DENY of Redis closes its held subscription and leaves PostgreSQL alone.

use std::fmt::Write as _;
use std::path::Path;
use std::process::Command;

use super::app_servers::{pg_bin, postgres, redis};
use super::netns::{privileged, Output};
use super::topology::{Cluster, PodSpec};
use super::workload_yaml;

const CLIENT: &str = "10.240.1.10";
/// A mesh pod (HBONE path).
const MESH: &str = "10.240.2.10";
/// A pod outside the mesh (plain TCP path).
const PLAIN: &str = "10.240.2.11";
const ROWS: usize = 10_000;

fn state() -> String {
    let mut s = String::from("workloads:\n");
    s += &workload_yaml("pc", "client", CLIENT, "node-1", "");
    s += &workload_yaml("sm", "server", MESH, "node-2", "");
    s
}

/// Runs `sh -c script` in the client pod; its stdout, or a panic with everything seen.
fn client(c: &Cluster, script: &str) -> String {
    let (ok, out, err) = c.pod("pc").run(&["sh", "-c", script]);
    assert!(ok, "{script}\nstdout: {out}\nstderr: {err}\n{}", c.logs());
    out
}

fn value(i: usize) -> String {
    format!("row-{i}-{}", "x".repeat(i % 50))
}

/// PostgreSQL at `ip`: a table of ROWS rows written in one transaction and read back whole, and
/// the client's address as the server saw it.
fn check_postgres(c: &Cluster, ip: &str, dir: &Path) {
    let table = format!("t_{}", ip.replace('.', "_"));
    let mut sql = format!("CREATE TABLE {table} (id int PRIMARY KEY, v text NOT NULL);\nBEGIN;\n");
    for chunk in (1..=ROWS).collect::<Vec<_>>().chunks(1000) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| format!("({i},'{}')", value(*i)))
            .collect();
        writeln!(sql, "INSERT INTO {table} VALUES {};", values.join(",")).unwrap();
    }
    sql.push_str("COMMIT;\n");
    let file = dir.join(format!("{table}.sql"));
    std::fs::write(&file, sql).unwrap();
    let psql = format!("psql -h {ip} -p 5432 -U postgres -v ON_ERROR_STOP=1 -At");
    client(c, &format!("{psql} -q -f {}", file.display()));
    let rows = client(c, &format!("{psql} -c 'SELECT v FROM {table} ORDER BY id'"));
    let want: Vec<String> = (1..=ROWS).map(value).collect();
    let got: Vec<&str> = rows.lines().collect();
    assert_eq!(got.len(), ROWS, "rows read back from {ip}");
    assert!(
        got.iter().zip(&want).all(|(g, w)| *g == w),
        "rows from {ip} differ"
    );
    let seen = client(c, &format!("{psql} -c 'SELECT host(inet_client_addr())'"));
    assert_eq!(seen.trim(), CLIENT, "the client's address in {ip}'s view");
}

/// Redis at `ip`: SET/GET, a pipelined burst of ROWS SETs, and a SUBSCRIBE held while another
/// client publishes.
fn check_redis(c: &Cluster, ip: &str, dir: &Path) {
    let cli = format!("redis-cli -h {ip} -p 6379");
    assert_eq!(client(c, &format!("{cli} SET greeting hello")).trim(), "OK");
    assert_eq!(client(c, &format!("{cli} GET greeting")).trim(), "hello");
    // The burst in Redis's own protocol, as `redis-cli --pipe` sends it.
    let mut resp = String::new();
    for i in 0..ROWS {
        let (k, v) = (format!("key:{i}"), value(i));
        write!(
            resp,
            "*3\r\n$3\r\nSET\r\n${}\r\n{k}\r\n${}\r\n{v}\r\n",
            k.len(),
            v.len()
        )
        .unwrap();
    }
    let file = dir.join(format!("burst-{ip}.resp"));
    std::fs::write(&file, resp).unwrap();
    let piped = client(c, &format!("{cli} --pipe < {}", file.display()));
    assert!(
        piped.contains(&format!("errors: 0, replies: {ROWS}")),
        "{piped}"
    );
    assert_eq!(
        client(c, &format!("{cli} DBSIZE")).trim(),
        (ROWS + 1).to_string()
    );
    assert_eq!(
        client(c, &format!("{cli} GET key:9999")).trim(),
        value(9999)
    );
    // A subscriber held open while another connection publishes.
    let (mut child, out) = subscribe(c, ip, "news");
    std::thread::sleep(std::time::Duration::from_millis(200));
    publish_in_order(c, ip, "news", &["m0", "m1", "m2", "m3", "m4"], &out);
    let _ = child.kill();
    let _ = child.wait();
}

/// `redis-cli SUBSCRIBE channel` to `ip` from the client pod, held until the caller kills it.
fn subscribe(c: &Cluster, ip: &str, channel: &str) -> (std::process::Child, Output) {
    c.pod("pc").ns.spawn_owned(
        &["redis-cli", "-h", ip, "-p", "6379", "SUBSCRIBE", channel],
        &[],
        channel,
    )
}

/// Publishes `msgs` on `channel` at `ip`, each received by exactly one subscriber, and asserts
/// that the subscriber whose output is `sub` printed them all, in order.
fn publish_in_order(c: &Cluster, ip: &str, channel: &str, msgs: &[&str], sub: &Output) {
    for m in msgs {
        let n = client(
            c,
            &format!("redis-cli -h {ip} -p 6379 PUBLISH {channel} {m}"),
        );
        assert_eq!(n.trim(), "1", "one subscriber received {m}");
    }
    let last = msgs.last().copied().unwrap_or_default();
    let all = super::topology::within(std::time::Duration::from_secs(5), || {
        let all = sub.all();
        all.contains(last).then_some(all)
    })
    .unwrap_or_else(|| sub.all());
    // redis-cli prints each message as three lines: `message`, the channel, the payload.
    let got: Vec<&str> = all.lines().filter(|l| msgs.contains(l)).collect();
    assert_eq!(got, msgs, "{all}");
}

/// A server that speaks first (a banner before reading, as SMTP and MySQL do), answers a line,
/// and after the client's half-close still sends its goodbye: on argv[1]:argv[2].
const BANNER_SERVER_PY: &str = r#"
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print('ready', flush=True)
def serve(c):
    c.settimeout(10)
    try:
        c.sendall(b'220 banner\r\n')
        f = c.makefile('rb')
        line = f.readline().strip()
        c.sendall(b'250 got ' + line + b'\r\n')
        rest = f.read()  # until the client's half-close
        c.sendall(b'221 bye after ' + str(len(rest)).encode() + b' more bytes\r\n')
    except OSError as e:
        print('server error', e, flush=True)
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

/// The client of [`BANNER_SERVER_PY`]: reads the banner before sending anything, sends a line and
/// more bytes, half-closes, and reads to the end; prints what it read.
const BANNER_CLIENT_PY: &str = r#"
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
f = c.makefile('rb')
banner = f.readline()
c.sendall(b'HELO pc\r\n')
reply = f.readline()
c.sendall(b'x' * 1000)
c.shutdown(socket.SHUT_WR)
rest = f.read()
print(repr(banner), repr(reply), repr(rest))
"#;

/// Server-speaks-first and half-close at `ip:2525`.
fn check_banner(c: &Cluster, ip: &str) {
    let (ok, out, err) = c
        .pod("pc")
        .run(&["python3", "-c", BANNER_CLIENT_PY, ip, "2525"]);
    assert!(ok, "{ip}: {out} {err}\n{}", c.logs());
    assert_eq!(
        out.trim(),
        r"b'220 banner\r\n' b'250 got HELO pc\r\n' b'221 bye after 1000 more bytes\r\n'",
        "{ip}"
    );
}

/// A gRPC echo service with one bidirectional-streaming method (`/echo.Echo/Bidi`), messages as
/// raw bytes (no stubs to generate), on argv[1]:argv[2].
const GRPC_SERVER_PY: &str = r#"
import grpc, sys, time
from concurrent import futures
def bidi(requests, context):
    for m in requests:
        yield m
handler = grpc.method_handlers_generic_handler('echo.Echo', {
    'Bidi': grpc.stream_stream_rpc_method_handler(bidi)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
server.add_insecure_port(sys.argv[1] + ':' + sys.argv[2])
server.start()
print('ready', flush=True)
server.wait_for_termination()
"#;

/// A client holding one bidirectional stream to argv[1]:argv[2]: a message every 100 ms, each
/// echo checked; prints `echo <n> <unix time>` for each and `ended <status> <unix time>` at the
/// end (or `failed` on a wrong echo).
const GRPC_CLIENT_PY: &str = r#"
import grpc, queue, sys, time
ch = grpc.insecure_channel(sys.argv[1] + ':' + sys.argv[2])
grpc.channel_ready_future(ch).result(timeout=10)
bidi = ch.stream_stream('/echo.Echo/Bidi')
q = queue.Queue()
def outgoing():
    while True:
        m = q.get()
        if m is None:
            return
        yield m
responses = bidi(outgoing())
print('open', flush=True)
i = 0
try:
    while True:
        msg = b'm%d' % i
        q.put(msg)
        r = next(responses)
        if r != msg:
            print('failed', r, msg, flush=True)
            sys.exit(1)
        print('echo', i, time.time(), flush=True)
        i += 1
        time.sleep(0.1)
except grpc.RpcError as e:
    print('ended', e.code(), time.time(), flush=True)
"#;

/// A gRPC bidirectional stream to the mesh server held for `hold`, then a drain of the client's
/// l4mesh (deadline `deadline`): the stream keeps carrying messages during the drain and ends at
/// the deadline, not before it.
fn check_grpc_under_drain(c: &mut Cluster, hold: std::time::Duration, deadline: f64) {
    c.pod_mut("sm").ns.spawn(
        &["python3", "-c", GRPC_SERVER_PY, "0.0.0.0", "50051"],
        &[],
        "ready",
    );
    let (mut client, out) = c.pod("pc").ns.spawn_owned(
        &["python3", "-c", GRPC_CLIENT_PY, MESH, "50051"],
        &[],
        "open",
    );
    std::thread::sleep(hold);
    let echoes = |out: &Output| -> Vec<f64> {
        out.all()
            .lines()
            .filter_map(|l| l.strip_prefix("echo "))
            .filter_map(|l| l.split(' ').nth(1)?.parse().ok())
            .collect()
    };
    let before = echoes(&out).len();
    let expected = (hold.as_secs_f64() * 10.0 * 0.8) as usize;
    assert!(
        before >= expected,
        "only {before} echoes in {hold:?}: {}",
        out.all()
    );
    let pid = c.pod("pc").l4mesh_pid().expect("the client's l4mesh");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let term = now();
    let ok = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
    let ended =
        super::topology::within(std::time::Duration::from_secs_f64(deadline + 10.0), || {
            out.all()
                .lines()
                .find_map(|l| l.strip_prefix("ended ").map(str::to_owned))
        })
        .unwrap_or_else(|| panic!("the stream did not end: {}", out.all()));
    let _ = client.kill();
    let _ = client.wait();
    let all = out.all();
    assert!(!all.contains("failed"), "{all}");
    let (status, at) = ended.rsplit_once(' ').unwrap();
    let at: f64 = at.parse().unwrap();
    let last_echo = echoes(&out).last().copied().unwrap_or(0.0);
    // Messages kept flowing through the drain, up to the deadline (less one message's time and
    // a margin), and the stream ended at the deadline, not before it and not long after.
    assert!(
        last_echo >= term + deadline - 0.6,
        "the last echo came {:.2} s after SIGTERM, the deadline is {deadline} s: {all}",
        last_echo - term
    );
    assert!(
        at >= term + deadline - 0.3 && at <= term + deadline + 2.0,
        "the stream ended {:.2} s after SIGTERM ({status}), the deadline is {deadline} s",
        at - term
    );
    assert!(status.contains("UNAVAILABLE"), "{status}");
}

/// Policy changes while sessions are open, on the mesh server: a PostgreSQL transaction spans a
/// change that still allows it and commits; a DENY of Redis closes a held subscription (the live
/// re-check) while the PostgreSQL session goes on untouched.
fn check_policy_changes(c: &Cluster, dir: &Path) {
    let psql = format!("psql -h {MESH} -p 5432 -U postgres -v ON_ERROR_STOP=1 -At");
    client(c, &format!("{psql} -c 'CREATE TABLE tx (id int)'"));
    // A session fed through a FIFO: statements are sent as the test goes.
    let fifo = dir.join("session.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let (mut session, session_out) = c.pod("pc").ns.spawn_owned(
        &["sh", "-c", &format!("exec {psql} < {}", fifo.display())],
        &[],
        "",
    );
    let mut feed = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let mut say = |sql: &str| {
        use std::io::Write;
        feed.write_all(sql.as_bytes()).unwrap();
        feed.flush().unwrap();
    };
    say("BEGIN;\nINSERT INTO tx VALUES (1);\nSELECT 'in-tx-1';\n");
    let seen = |out: &Output, what: &str| {
        super::topology::within(std::time::Duration::from_secs(10), || {
            out.all().contains(what).then_some(())
        })
        .is_some()
    };
    assert!(seen(&session_out, "in-tx-1"), "{}", session_out.all());
    let (mut sub, sub_out) = subscribe(c, MESH, "held");
    // A change that still allows both: only the client's identity, to these two ports.
    let allow = r#"policies:
- name: allow-client
  namespace: default
  scope: Namespace
  action: Allow
  rules:
  - - - principals: [!Exact "cluster.local/ns/default/sa/client"]
        destinationPorts: [5432, 6379]
"#;
    c.control.handle.upsert_yaml(allow).unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    say("INSERT INTO tx VALUES (2);\nSELECT 'in-tx-2';\n");
    assert!(seen(&session_out, "in-tx-2"), "{}", session_out.all());
    assert!(
        matches!(sub.try_wait(), Ok(None)),
        "the subscription survives a change that allows it: {}",
        sub_out.all()
    );
    // Redis denied: the held subscription is closed by the re-check, a new client refused.
    let deny = format!(
        "policies:\n{}",
        super::super::harness::deny_yaml("client", 6379)
    );
    c.control.handle.upsert_yaml(&deny).unwrap();
    let closed = super::topology::within(std::time::Duration::from_secs(10), || {
        sub.try_wait().ok().flatten()
    });
    assert!(
        closed.is_some(),
        "the denied subscription is still open: {}",
        sub_out.all()
    );
    let (ok, out, _) = c
        .pod("pc")
        .run(&["redis-cli", "-h", MESH, "-p", "6379", "PING"]);
    assert!(!(ok && out.contains("PONG")), "a denied client got {out}");
    // The PostgreSQL session, still allowed, was not touched: the transaction commits.
    say("INSERT INTO tx VALUES (3);\nCOMMIT;\nSELECT 'rows', count(*) FROM tx;\n");
    drop(feed);
    let done = super::topology::within(std::time::Duration::from_secs(10), || {
        session.try_wait().ok().flatten()
    });
    assert!(
        done.is_some_and(|s| s.success()),
        "the session: {}",
        session_out.all()
    );
    assert!(
        session_out.all().contains("rows|3"),
        "{}",
        session_out.all()
    );
    let _ = sub.kill();
    let _ = sub.wait();
    // Back to no policy (an ALLOW policy denies every port it does not name).
    for name in ["default/allow-client", "default/deny-client-6379"] {
        assert!(
            c.control
                .handle
                .remove(xds_testserver::Kind::Authorization, name),
            "{name}"
        );
    }
}

#[test]
fn postgres_redis_and_raw_protocols_through_hbone_and_plain_paths() {
    let Some(bin) = pg_bin() else {
        assert!(
            std::env::var("L4MESH_REQUIRE_PRIVILEGED").as_deref() != Ok("1"),
            "L4MESH_REQUIRE_PRIVILEGED=1 but no PostgreSQL server under /usr/lib/postgresql"
        );
        eprintln!("SKIPPED postgres_redis_and_raw_protocols_through_hbone_and_plain_paths: no PostgreSQL server (scripts/test.sh installs it)");
        return;
    };
    if !privileged(
        "postgres_redis_and_raw_protocols_through_hbone_and_plain_paths",
        &[
            "psql",
            "redis-server",
            "redis-cli",
            "runuser",
            "setpriv",
            "mkfifo",
        ],
    ) {
        return;
    }
    let pods = vec![
        PodSpec::new("pc", 1, 10, "client", true),
        PodSpec::new("sm", 2, 10, "server", true),
        PodSpec::new("sp", 2, 11, "plain", false),
    ];
    let mut c = Cluster::start(
        "ap",
        2,
        &pods,
        &state(),
        &[("CONNECTION_TERMINATION_DEADLINE", "3s")],
    );
    let dir = tempfile::tempdir().unwrap();
    // Readable by postgres (the servers' data) and by the client pod's commands.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut held = None;
    for (pod, ip) in [("sm", MESH), ("sp", PLAIN)] {
        let pg = dir.path().join(format!("pg-{pod}"));
        std::fs::create_dir(&pg).unwrap();
        postgres(&mut c.pod_mut(pod).ns, &bin, &pg);
        redis(&mut c.pod_mut(pod).ns, dir.path());
        if held.is_none() {
            // A subscription to the mesh server held through everything below.
            held = Some(subscribe(&c, MESH, "all-along"));
        }
        check_postgres(&c, ip, dir.path());
        check_redis(&c, ip, dir.path());
        c.pod_mut(pod).ns.spawn(
            &["python3", "-c", BANNER_SERVER_PY, "0.0.0.0", "2525"],
            &[],
            "ready",
        );
        check_banner(&c, ip);
    }
    // The subscription held since the start still receives, in order.
    let (mut sub, sub_out) = held.expect("held subscription");
    publish_in_order(
        &c,
        MESH,
        "all-along",
        &["late0", "late1", "late2"],
        &sub_out,
    );
    assert!(matches!(sub.try_wait(), Ok(None)), "{}", sub_out.all());
    let _ = sub.kill();
    let _ = sub.wait();
    check_policy_changes(&c, dir.path());
    // Last: it drains the client's l4mesh.
    check_grpc_under_drain(&mut c, std::time::Duration::from_secs(30), 3.0);
    // The mesh server's l4mesh delivered the sessions from the client's identity.
    let seen = c.pod("sm").wait_log(&[
        "dst.addr=10.240.2.10:5432",
        "src.identity=\"spiffe://cluster.local/ns/default/sa/client\"",
    ]);
    assert!(seen.is_some(), "{}", c.logs());
    assert!(
        c.pod("sm")
            .wait_log(&["dst.addr=10.240.2.10:6379", "src.identity"])
            .is_some(),
        "{}",
        c.logs()
    );
}
