//! Waypoints across three in-process l4mesh instances following one xds-testserver: A (the
//! client's node), W (the waypoint's node) and B (a node whose workload has a waypoint).
//!
//! l4mesh's inbound HBONE only forwards to workloads of its own node, so the "waypoint" here is an
//! l4mesh whose node also runs the destination workload `d` (whose waypoint is the workload `w` of
//! that node): A must send the tunnel to `w`, with `d`'s `ip:port` as the authority, and W forwards
//! it. A real waypoint (Envoy) would route the authority anywhere; that path is Envoy's, not ours.

use std::net::IpAddr;

use xds_testserver::Handle;

use super::harness::{
    endpoint_of_yaml, exchange, mesh_node as node, service_yaml, socks5_connect_from, testserver,
    testserver_ca, two_workloads_yaml, workload_yaml, Backend, TwoNodes,
};
use super::raw_hbone;

/// Below the ephemeral range, like hbone.rs (an ephemeral port could equal an l4mesh listener's).
const BACKEND_PORT: u16 = 18080;

/// Addresses `127.47.<n>.x`: a (client, node-a), b (node-b, waypoint w), w (the waypoint,
/// node-w), d (node-w, waypoint w); the service `plain` (no waypoint) has endpoint b.
fn state(n: u8) -> String {
    let ip = |last: u8| format!("127.47.{n}.{last}");
    let waypoint = format!(
        "  waypoint: {{ destination: \"/{}\", hboneMtlsPort: 15008 }}\n",
        ip(3)
    );
    let b_extra = format!("{waypoint}{}", endpoint_of_yaml("plain", BACKEND_PORT));
    let rest = format!(
        "{}{}services:\n{}",
        workload_yaml("w", "waypoint", &ip(3), "node-w", ""),
        workload_yaml("d", "server", &ip(4), "node-w", &waypoint),
        service_yaml("plain", &ip(100), BACKEND_PORT, ""),
    );
    two_workloads_yaml(&ip(1), &ip(2), &b_extra, &rest)
}

struct Mesh {
    a: l4mesh::app::Running,
    b: l4mesh::app::Running,
    w: l4mesh::app::Running,
    n: u8,
    ts: Handle,
}

impl Mesh {
    fn ip(&self, last: u8) -> String {
        format!("127.47.{}.{last}", self.n)
    }

    fn a_ip(&self) -> IpAddr {
        self.ip(1).parse().unwrap()
    }
}

async fn mesh(n: u8) -> Mesh {
    mesh_with(n, false).await
}

/// [`mesh`], with `L4MESH_ENFORCE_WAYPOINT` as `enforce` on the nodes.
async fn mesh_with(n: u8, enforce: bool) -> Mesh {
    let ts = testserver(state(n), "127.0.0.1", None).await;
    let TwoNodes { a, b, ts } = super::harness::two_nodes_with(ts, &format!("127.47.{n}"), |c| {
        c.enforce_waypoint = enforce
    })
    .await;
    let w = node(
        &ts,
        format!("127.47.{n}.13"),
        "node-w",
        format!("127.47.{n}.3"),
    )
    .await;
    Mesh { a, b, w, n, ts }
}

/// The status B answers to a CONNECT for `authority`, from a raw HBONE client presenting
/// `client`'s certificate.
async fn raw_connect(m: &Mesh, client: &str, authority: String) -> u16 {
    let tcp = tokio::net::TcpStream::connect(m.b.hbone).await.unwrap();
    let send = raw_hbone::client(testserver_ca(&m.ts), client, tcp).await;
    raw_hbone::status(send, authority).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workload_with_a_waypoint_is_reached_through_it() {
    let m = mesh(1).await;
    let _d = Backend::start(&format!("{}:{BACKEND_PORT}", m.ip(4)), "d").await;
    let s = socks5_connect_from(m.a_ip(), m.a.socks5.unwrap(), &m.ip(4), BACKEND_PORT)
        .await
        .expect("tunnel through the waypoint accepted");
    assert_eq!(exchange(s, "via waypoint").await, "d:via waypoint");
    // The tunnel went to the waypoint's node (TLS with w's identity), not to d's address.
    assert_eq!(m.w.proxy.hbone.inbound_tls_connections(), 1);
    assert_eq!(m.a.proxy.hbone.outbound_tls_connections(), 1);
    assert_eq!(m.b.proxy.hbone.inbound_tls_connections(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_a_direct_tunnel_is_left_to_policies() {
    // ztunnel's behaviour: the waypoint is not enforced by the destination's proxy (an
    // AuthorizationPolicy allowing only the waypoint's identity does that).
    let m = mesh(3).await;
    let _b = Backend::start(&format!("{}:{BACKEND_PORT}", m.ip(2)), "b").await;
    let target = format!("{}:{BACKEND_PORT}", m.ip(2));
    assert_eq!(raw_connect(&m, "client", target.clone()).await, 200);
    assert_eq!(raw_connect(&m, "waypoint", target).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_with_a_waypoint_refuses_direct_tunnels() {
    let m = mesh_with(2, true).await;
    let _b = Backend::start(&format!("{}:{BACKEND_PORT}", m.ip(2)), "b").await;
    let target = format!("{}:{BACKEND_PORT}", m.ip(2));
    // Straight from the client's identity: 401 (the waypoint's policy would be bypassed).
    assert_eq!(raw_connect(&m, "client", target.clone()).await, 401);
    // From the waypoint's identity: accepted.
    assert_eq!(raw_connect(&m, "waypoint", target).await, 200);
    // Through A: the service `plain` has no waypoint, so A picks endpoint b and tunnels to B
    // directly; B refuses, and so the client's connection is refused.
    let r = socks5_connect_from(m.a_ip(), m.a.socks5.unwrap(), &m.ip(100), 80).await;
    assert!(
        r.is_err(),
        "B refuses a direct tunnel for a workload with a waypoint"
    );
    assert!(m.b.proxy.hbone.inbound_tls_connections() >= 3);
}
