//! L4 authorization end to end, through two in-process l4mesh following one xds-testserver:
//! client → A's SOCKS5 → HBONE → B, where B enforces the policies the testserver pushes: a denied
//! tunnel gets 401 (and A refuses the client), and a policy pushed while a tunnel is open closes
//! it promptly while an unaffected tunnel stays open. Addresses: `127.48.<n>.x`.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;

use xds_testserver::Handle;

use super::harness::{
    deny_yaml, exchange, socks5_connect_from, testserver, two_nodes, two_workloads_yaml, Backend,
    TwoNodes,
};

/// Backend ports below the ephemeral range (see `hbone.rs`): one stays allowed, one gets denied.
const ALLOWED_PORT: u16 = 18080;
const DENIED_PORT: u16 = 18081;

fn state(n: u8) -> String {
    two_workloads_yaml(&format!("127.48.{n}.1"), &format!("127.48.{n}.2"), "", "")
}

/// A DENY of the client's principal towards `DENIED_PORT`, in the local-config format.
fn deny_policy() -> String {
    format!("policies:\n{}", deny_yaml("client", DENIED_PORT))
}

struct Mesh {
    a: l4mesh::app::Running,
    b: l4mesh::app::Running,
    ts: Handle,
    n: u8,
    _backends: (Backend, Backend),
}

impl Mesh {
    async fn start(n: u8) -> Mesh {
        let ts = testserver(state(n), "127.0.0.1", None).await;
        let TwoNodes { a, b, ts } = two_nodes(ts, &format!("127.48.{n}")).await;
        let allowed = Backend::start(&format!("127.48.{n}.2:{ALLOWED_PORT}"), "b").await;
        let denied = Backend::start(&format!("127.48.{n}.2:{DENIED_PORT}"), "b").await;
        Mesh {
            a,
            b,
            ts,
            n,
            _backends: (allowed, denied),
        }
    }

    /// A SOCKS5 connection from A's workload IP to B's workload on `port`.
    async fn connect(&self, port: u16) -> Result<tokio::net::TcpStream, u8> {
        let a_ip = format!("127.48.{}.1", self.n).parse().unwrap();
        socks5_connect_from(
            a_ip,
            self.a.socks5.unwrap(),
            &format!("127.48.{}.2", self.n),
            port,
        )
        .await
    }

    /// Pushes the DENY policy and waits until B applied it; returns when B applied it.
    async fn push_deny(&self) -> Instant {
        let mut rx = self.b.store.subscribe();
        rx.borrow_and_update();
        self.ts.upsert_yaml(&deny_policy()).unwrap();
        let key = l4mesh::model::PolicyKey(format!("default/deny-client-{DENIED_PORT}").into());
        tokio::time::timeout(Duration::from_secs(5), async {
            while self.b.store.load().policy(&key).is_none() {
                rx.changed().await.unwrap();
            }
        })
        .await
        .expect("B received the policy");
        Instant::now()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_tunnel_gets_401_and_allowed_one_passes() {
    let m = Mesh::start(1).await;
    // Before any policy both ports are reachable.
    let s = m
        .connect(DENIED_PORT)
        .await
        .expect("allowed before the policy");
    assert_eq!(exchange(s, "before").await, "b:before");

    m.push_deny().await;
    let r = m.connect(DENIED_PORT).await;
    assert!(r.is_err(), "a denied tunnel is refused to the client");
    let s = m
        .connect(ALLOWED_PORT)
        .await
        .expect("the other port stays allowed");
    assert_eq!(exchange(s, "after").await, "b:after");
    let answered_401 = m.b.proxy.hbone.tunnels.status(401);
    assert_eq!(
        answered_401.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "B answered 401 once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_deny_closes_an_established_tunnel_and_spares_the_other() {
    let m = Mesh::start(2).await;
    // Both tunnels are established (SOCKS5 success means B answered 200) and idle: the backends
    // answer only after the client half-closes.
    let mut doomed = m
        .connect(DENIED_PORT)
        .await
        .expect("allowed before the policy");
    let spared = m.connect(ALLOWED_PORT).await.expect("allowed");
    for _ in 0..100 {
        if m.b.proxy.conns.len() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(m.b.proxy.conns.len(), 2, "B tracks both tunnels");

    let applied = m.push_deny().await;
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(1), doomed.read(&mut buf))
        .await
        .expect("the denied tunnel closes within a second of B applying the policy");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "closed without data: {read:?}"
    );
    assert!(applied.elapsed() < Duration::from_secs(1));

    assert_eq!(exchange(spared, "still here").await, "b:still here");
    for _ in 0..100 {
        if m.b.proxy.conns.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        m.b.proxy.conns.is_empty(),
        "closed tunnels are deregistered"
    );
    assert!(m.b.proxy.hbone.tunnels.inbound_failed.load(Relaxed) >= 1);
}
