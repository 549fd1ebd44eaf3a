//! Upgrades of the real binary through the hand-off socket, under load: a new l4mesh started
//! with the same configuration takes the running one's listening sockets, and the old one stops
//! accepting and drains. Through both nodes of an HBONE path and a plain-TCP path: ~200 new
//! connections a second per path and 20 long-lived connections streaming both ways; no
//! connection is refused or reset, every byte arrives in order, and each old process exits once
//! its last connection ends. A successor that dies before it is ready changes nothing; a SIGTERM
//! with the hand-off configured still drains as before.
//!
//! Addresses: 127.58.x.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::binary::{http, L4mesh};
use super::harness::{self, testserver, two_workloads_yaml};

/// An echo server: every connection gets back what it sends, until it half-closes.
async fn echo_server(addr: &str) -> tokio::task::JoinHandle<()> {
    let l = TcpListener::bind(addr).await.unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    })
}

/// A SOCKS5 CONNECT from `src` through `proxy` to `dst`, every failure an error (the load
/// generator counts them rather than panicking).
async fn socks5(src: IpAddr, proxy: SocketAddr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    let s = socket.connect(proxy).await?;
    harness::socks5_handshake(s, &dst.ip().to_string(), dst.port())
        .await?
        .map_err(|code| std::io::Error::other(format!("SOCKS5 reply {code}")))
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    errors: std::sync::Mutex<Vec<String>>,
}

impl Tally {
    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Relaxed);
        let mut e = self.errors.lock().unwrap();
        if e.len() < 10 {
            e.push(what);
        }
    }
}

/// One short connection: a message out, the same back, closed.
async fn short(src: IpAddr, proxy: SocketAddr, dst: SocketAddr, n: u64) -> Result<(), String> {
    let work = async {
        let mut s = socks5(src, proxy, dst).await?;
        let msg = format!("ping {n}");
        s.write_all(msg.as_bytes()).await?;
        s.shutdown().await?;
        let mut back = String::new();
        s.read_to_string(&mut back).await?;
        if back != msg {
            return Err(std::io::Error::other(format!(
                "echo {back:?}, sent {msg:?}"
            )));
        }
        Ok::<_, std::io::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs(10), work).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{dst} #{n}: {e}")),
        Err(_) => Err(format!("{dst} #{n}: timed out")),
    }
}

/// New connections at `per_sec` to each of `dsts` until `stop`.
fn load(
    src: IpAddr,
    proxy: SocketAddr,
    dsts: Vec<SocketAddr>,
    per_sec: u64,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per_sec));
        let mut set = tokio::task::JoinSet::new();
        let mut n = 0;
        while !stop.load(Relaxed) {
            tick.tick().await;
            for dst in &dsts {
                n += 1;
                let (dst, tally) = (*dst, tally.clone());
                set.spawn(async move {
                    match short(src, proxy, dst, n).await {
                        Ok(()) => tally.ok.fetch_add(1, Relaxed),
                        Err(e) => {
                            tally.fail(e);
                            0
                        }
                    };
                });
            }
            while set.try_join_next().is_some() {}
        }
        while set.join_next().await.is_some() {}
    })
}

/// A long-lived connection streaming a pattern both ways until `stop`; returns the bytes sent
/// and checks that the echo is the same bytes in the same order.
async fn stream(mut s: TcpStream, id: u8, stop: Arc<AtomicBool>) -> Result<u64, String> {
    let (mut r, mut w) = s.split();
    let send = async {
        let mut sent = 0u64;
        let mut chunk = vec![0u8; 4096];
        while !stop.load(Relaxed) {
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = ((sent + i as u64) % 251) as u8 ^ id;
            }
            w.write_all(&chunk)
                .await
                .map_err(|e| format!("write: {e}"))?;
            sent += chunk.len() as u64;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        w.shutdown().await.map_err(|e| format!("shutdown: {e}"))?;
        Ok::<_, String>(sent)
    };
    let recv = async {
        let mut got = 0u64;
        let mut buf = vec![0u8; 16384];
        loop {
            let n = r.read(&mut buf).await.map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Ok::<_, String>(got);
            }
            for (i, b) in buf[..n].iter().enumerate() {
                let want = ((got + i as u64) % 251) as u8 ^ id;
                if *b != want {
                    return Err(format!("byte {} is {b}, expected {want}", got + i as u64));
                }
            }
            got += n as u64;
        }
    };
    let (sent, got) = tokio::try_join!(send, recv).map_err(|e| format!("stream {id}: {e}"))?;
    if sent != got {
        return Err(format!("stream {id}: sent {sent} bytes, {got} came back"));
    }
    Ok(sent)
}

/// Two nodes as real binaries, each with its hand-off socket: C (the client's: SOCKS5 and
/// outbound HBONE) and S (the server workload's inbound HBONE).
struct Mesh {
    env_c: Vec<(&'static str, String)>,
    env_s: Vec<(&'static str, String)>,
    ip_c: &'static str,
    ip_s: &'static str,
}

impl Mesh {
    fn new(xds: SocketAddr, dir: &Path, deadline: &str) -> Mesh {
        let common = |node: &str, sock: &str| {
            vec![
                ("XDS_ADDRESS", format!("http://{xds}")),
                ("NODE_NAME", node.to_string()),
                (
                    "L4MESH_HANDOFF_SOCKET",
                    dir.join(sock).display().to_string(),
                ),
                ("UPGRADE_DRAIN_DEADLINE", deadline.to_string()),
            ]
        };
        let mut env_s = common("node-b", "s.sock");
        env_s.push(("L4MESH_HBONE_ADDR", "127.58.1.2:15008".into()));
        Mesh {
            env_c: common("node-a", "c.sock"),
            env_s,
            ip_c: "127.58.1.11",
            ip_s: "127.58.1.12",
        }
    }

    fn spawn_c(&self) -> L4mesh {
        L4mesh::spawn(self.ip_c, &self.env_c)
    }

    fn spawn_s(&self) -> L4mesh {
        L4mesh::spawn(self.ip_s, &self.env_s)
    }
}

/// Waits until `node` logs that its successor took over.
async fn handed_over(node: &L4mesh) {
    assert!(
        node.wait_line(&["the successor is ready"], Duration::from_secs(20))
            .await,
        "no hand-off; log:\n{}",
        node.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrading_both_nodes_under_load_loses_nothing() {
    let (a_wl, b_wl) = ("127.58.1.1", "127.58.1.2");
    let ts = testserver(two_workloads_yaml(a_wl, b_wl, "", ""), "127.58.0.100", None).await;
    let _mesh_backend = echo_server(&format!("{b_wl}:18080")).await;
    let _plain_backend = echo_server("127.58.1.9:18080").await;
    let dir = tempfile::tempdir().unwrap();
    let mesh = Mesh::new(ts.addr(), dir.path(), "1h");
    let mut old_s = mesh.spawn_s();
    let mut old_c = mesh.spawn_c();
    old_s.ready().await;
    old_c.ready().await;
    let src: IpAddr = a_wl.parse().unwrap();
    let socks = old_c.socks5;
    let hbone_dst: SocketAddr = format!("{b_wl}:18080").parse().unwrap();
    let plain_dst: SocketAddr = "127.58.1.9:18080".parse().unwrap();

    // 20 long-lived connections, half through HBONE, half plain, streaming both ways.
    let stop_streams = Arc::new(AtomicBool::new(false));
    let mut streams = Vec::new();
    for id in 0..20u8 {
        let dst = if id % 2 == 0 { hbone_dst } else { plain_dst };
        let s = socks5(src, socks, dst).await.unwrap();
        streams.push(tokio::spawn(stream(s, id, stop_streams.clone())));
    }
    // ~200 new connections a second on each path.
    let (stop_load, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let load = load(
        src,
        socks,
        vec![hbone_dst, plain_dst],
        200,
        stop_load.clone(),
        tally.clone(),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The server's node first: its HBONE listener goes to the new process.
    let new_s = mesh.spawn_s();
    handed_over(&old_s).await;
    new_s.ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Then the client's node: SOCKS5, readiness, metrics, admin.
    let new_c = mesh.spawn_c();
    handed_over(&old_c).await;
    new_c.ready().await;
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The new client node reports the old one's series apart while it drains.
    let metrics: SocketAddr = format!("{}:15020", mesh.ip_c).parse().unwrap();
    let (code, body) = http(metrics, "GET", "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("l4mesh_open_connections{l4mesh_process=\"predecessor\""),
        "{body}"
    );
    // Its admin API says what the old one still holds (the long-lived connections).
    let (code, body) = http(new_c.admin, "GET", "/upgrade").await.unwrap();
    assert_eq!(code, 200);
    let up: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(up["predecessor"]["pid"], old_c.pid(), "{body}");
    assert_eq!(up["predecessor"]["draining"], true, "{body}");
    assert!(
        up["predecessor"]["open_connections"].as_u64().unwrap() >= 20,
        "{body}"
    );
    // Readiness is the new process's (the old one stopped answering there).
    let (code, _) = http(old_c.readiness, "GET", "/healthz/ready")
        .await
        .unwrap();
    assert_eq!(code, 200);

    // Kubernetes sends SIGTERM to the replaced pod after the new one is ready: the old process
    // keeps its connections (one signal is spared during an upgrade's drain).
    old_c.signal("TERM");
    assert!(
        old_c
            .wait_line(
                &["signal during the upgrade's drain"],
                Duration::from_secs(5)
            )
            .await,
        "{}",
        old_c.log()
    );
    stop_load.store(true, Relaxed);
    tokio::time::timeout(Duration::from_secs(20), load)
        .await
        .unwrap()
        .unwrap();
    let (ok, failed) = (tally.ok.load(Relaxed), tally.failed.load(Relaxed));
    assert_eq!(
        failed,
        0,
        "{ok} connections served, {failed} failed: {:?}\nold S:\n{}\nnew S:\n{}",
        tally.errors.lock().unwrap(),
        old_s.log(),
        new_s.log()
    );
    assert!(ok >= 1000, "only {ok} connections in the run");

    // The long-lived connections were all held by the old processes, and carried every byte.
    assert!(old_c.exit_code(Duration::from_millis(100)).await.is_none());
    stop_streams.store(true, Relaxed);
    for s in streams {
        let sent = tokio::time::timeout(Duration::from_secs(20), s)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(sent > 100_000, "stream moved only {sent} bytes");
    }
    // With nothing left, the old processes exit, well before the deadline (1h).
    for (name, old) in [("C", &mut old_c), ("S", &mut old_s)] {
        assert_eq!(
            old.exit_code(Duration::from_secs(15)).await,
            Some(0),
            "old {name}:\n{}",
            old.log()
        );
        assert_eq!(
            old.count(&["drained; exiting", "closed_at_deadline=0"]),
            1,
            "{}",
            old.log()
        );
    }
    // The new ones serve alone, and may be upgraded again.
    short(src, new_c.socks5, hbone_dst, 0).await.unwrap();
    assert_eq!(
        new_c.count(&["the predecessor exited"]),
        1,
        "{}",
        new_c.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_before_ready_changes_nothing() {
    let (a_wl, b_wl) = ("127.58.2.1", "127.58.2.2");
    let ts = testserver(two_workloads_yaml(a_wl, b_wl, "", ""), "127.58.0.101", None).await;
    let _backend = echo_server("127.58.2.9:18080").await;
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("h.sock").display().to_string();
    let env = |xds: String| {
        vec![
            ("XDS_ADDRESS", xds),
            ("NODE_NAME", "node-a".to_string()),
            ("L4MESH_HANDOFF_SOCKET", sock.clone()),
            ("CONNECTION_TERMINATION_DEADLINE", "5s".to_string()),
        ]
    };
    let mut old = L4mesh::spawn("127.58.2.11", &env(format!("http://{}", ts.addr())));
    old.ready().await;
    let src: IpAddr = a_wl.parse().unwrap();
    let dst: SocketAddr = "127.58.2.9:18080".parse().unwrap();
    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Tally::default()));
    let load = load(src, old.socks5, vec![dst], 200, stop.clone(), tally.clone());

    // A successor whose control plane never answers: it takes the sockets but is never ready.
    let dead_xds = "http://127.58.2.250:1".to_string();
    let mut doomed = L4mesh::spawn("127.58.2.11", &env(dead_xds.clone()));
    assert!(
        doomed
            .wait_line(
                &["received the running l4mesh's listening sockets"],
                Duration::from_secs(10)
            )
            .await,
        "{}",
        doomed.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    doomed.signal("KILL");
    assert!(
        doomed.exit_code(Duration::from_secs(5)).await.is_some(),
        "{}",
        doomed.log()
    );
    assert!(
        old.wait_line(&["went away before it was ready"], Duration::from_secs(5))
            .await,
        "{}",
        old.log()
    );
    // And one that exits with an error of its own (a port its configuration moved).
    let mut moved = env(format!("http://{}", ts.addr()));
    moved.push(("L4MESH_SOCKS5_ADDR", "127.58.2.11:15081".into()));
    let mut wrong = L4mesh::spawn("127.58.2.11", &moved);
    assert_eq!(
        wrong.exit_code(Duration::from_secs(10)).await,
        Some(1),
        "{}",
        wrong.log()
    );
    assert!(
        wrong.count(&["socks5", "127.58.2.11:15080", "127.58.2.11:15081"]) >= 1,
        "{}",
        wrong.log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Relaxed);
    load.await.unwrap();
    assert_eq!(
        tally.failed.load(Relaxed),
        0,
        "{:?}\n{}",
        tally.errors.lock().unwrap(),
        old.log()
    );
    assert!(tally.ok.load(Relaxed) > 300);
    let (code, _) = http(old.readiness, "GET", "/healthz/ready").await.unwrap();
    assert_eq!(
        code, 200,
        "the old process still answers its readiness alone"
    );

    // A SIGTERM with the hand-off configured drains as without it: listeners refuse at once.
    let mut held = socks5(src, old.socks5, dst).await.unwrap();
    old.signal("TERM");
    let mut refused = false;
    for _ in 0..150 {
        match TcpStream::connect(old.socks5).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(refused, "SOCKS5 still accepts during the drain");
    held.write_all(b"still").await.unwrap();
    held.shutdown().await.unwrap();
    let mut back = String::new();
    held.read_to_string(&mut back).await.unwrap();
    assert_eq!(back, "still");
    assert_eq!(
        old.exit_code(Duration::from_secs(5)).await,
        Some(0),
        "{}",
        old.log()
    );
    // Nothing answers at the hand-off path now: a new l4mesh binds afresh.
    let mut fresh = L4mesh::spawn("127.58.2.11", &env(format!("http://{}", ts.addr())));
    fresh.ready().await;
    assert_eq!(fresh.count(&["received the running"]), 0, "{}", fresh.log());
    fresh.signal("TERM");
    assert_eq!(fresh.exit_code(Duration::from_secs(10)).await, Some(0));
}
