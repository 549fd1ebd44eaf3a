//! Multi-network (issue 16, item 1): node-a on network `net-a`, node-b on `net-b`, one
//! xds-testserver. Workload b (service `echo`) is on net-b behind its network gateway, a real Envoy
//! (the east-west gateway role, as Istio's is): it terminates the outer HBONE tunnel (proving the
//! gateway's identity), routes it by its `:authority` (`<service hostname>:<port>`) and relays the
//! bytes, still TLS from end to end, to b's node on :15008. The client on net-a dials echo's VIP;
//! l4mesh opens double HBONE through the gateway and b's node serves the inner tunnel.

use std::net::IpAddr;
use std::time::Duration;

use super::envoy::{envoy_binary, issue_pems, terminator_config, Envoy};
use super::harness::{exchange, mesh_node_with, socks5_connect_from, testserver, Backend};

const NET: &str = "127.63.1";
const BACKEND_PORT: u16 = 18080;
pub(super) const HOST: &str = "echo.default.svc.cluster.local";

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

/// a (client, net-a), b (server, net-b, endpoint of echo, behind the gateway), the gateway
/// workload (net-b), and echo, whose VIP is on net-a.
fn state() -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: client
  workloadIps: ["{NET}.1"]
  protocol: HBONE
  node: node-a
  network: net-a
- uid: cluster1//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: server
  workloadIps: ["{NET}.2"]
  protocol: HBONE
  node: node-b
  network: net-b
  networkGateway: {{ destination: "net-b/{NET}.3", hboneMtlsPort: 15008 }}
  services:
    "default/{HOST}": {{ 80: {BACKEND_PORT} }}
- uid: cluster1//v1/Pod/default/eastwest
  name: eastwest
  namespace: default
  serviceAccount: eastwest
  workloadIps: ["{NET}.3"]
  protocol: HBONE
  node: node-gw
  network: net-b
services:
- name: echo
  namespace: default
  hostname: {HOST}
  vips: ["net-a/{NET}.100"]
  ports: {{ 80: {BACKEND_PORT} }}
  subjectAltNames: ["{server}"]
"#,
        server = spiffe("server")
    )
}

/// Envoy as the east-west gateway on `ip`:15008: mutual TLS as `eastwest` (clients of the mesh
/// accepted), CONNECTs for `HOST` relayed as raw bytes to `upstream` (b's node).
pub(super) fn eastwest_config(ip: &str, client: &str, upstream: &str) -> String {
    let authority = format!("{}:[0-9]+", HOST.replace('.', "\\\\."));
    let cluster = format!(
        r#"  - name: upstream
    type: STATIC
    connect_timeout: 5s
    load_assignment:
      cluster_name: upstream
      endpoints:
      - lb_endpoints:
        - endpoint: {{address: {{socket_address: {{address: "{upstream}", port_value: 15008}}}}}}
"#
    );
    terminator_config(ip, client, &authority, &cluster)
}

/// The value of the first sample of `name` whose line has every one of `parts` (0 when none).
fn sample(node: &l4mesh::app::Running, name: &str, parts: &[&str]) -> u64 {
    node.metrics
        .encode(false)
        .unwrap()
        .lines()
        .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
        .find_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn double_hbone_through_an_envoy_east_west_gateway() {
    through_the_gateway(NET, 30, false).await;
}

/// `L4MESH_POOL_INNER_TUNNELS`: the inner connection is pooled too, so three connections make
/// two TLS connections from node a (the outer to the gateway, one inner) and one at node b.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooled_inner_tunnels_through_the_gateway() {
    through_the_gateway("127.63.2", 31, true).await;
}

async fn through_the_gateway(net: &str, envoy_n: u8, pooled: bool) {
    envoy_binary();
    let state = state().replace(NET, net);
    let (a_ip, b_ip, gw_ip) = (format!("{net}.1"), format!("{net}.2"), format!("{net}.3"));
    let ts = testserver(state, "127.0.0.1", None).await;
    let a = mesh_node_with(&ts, format!("{net}.11"), "node-a", &a_ip, |c| {
        c.network = "net-a".into();
        c.h2.pool_inner_tunnels = pooled;
    })
    .await;
    let b = mesh_node_with(&ts, format!("{net}.12"), "node-b", &b_ip, |c| {
        c.network = "net-b".into()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    issue_pems(&ts, "eastwest", dir.path()).await;
    let config = eastwest_config(&gw_ip, &spiffe("client"), &b_ip);
    let gw_hbone = format!("{gw_ip}:15008").parse().unwrap();
    let envoy = Envoy::start(envoy_n, dir, &config, Some(gw_hbone)).await;
    let _backend = Backend::start(&format!("{b_ip}:{BACKEND_PORT}"), "b").await;

    let src: IpAddr = a_ip.parse().unwrap();
    for i in 0..3 {
        let s = socks5_connect_from(src, a.socks5.unwrap(), &format!("{net}.100"), 80)
            .await
            .expect("a tunnel through the gateway");
        let msg = format!("hello across networks {i}");
        assert_eq!(exchange(s, &msg).await, format!("b:{msg}"));
    }

    // The gateway saw the outer CONNECT by service hostname, from the client's identity (logged
    // when the tunnel ends: a pooled inner connection keeps its outer tunnel open).
    if !pooled {
        let line = envoy
            .access_line(&[
                &format!("CONNECT {HOST}:80 200"),
                &spiffe("client"),
                &format!("up={b_ip}:15008"),
            ])
            .await;
        assert!(line.contains("rx="), "{line}");
    }

    // Node a counts the connections to the service through the gateway (ztunnel's destination
    // until the inner tunnel answers); node b counts them from the client's proven identity,
    // with no source workload (the TCP peer is the gateway, the client on another network).
    let opened = "istio_tcp_connections_opened_total";
    assert_eq!(
        sample(
            &a,
            opened,
            &[
                "reporter=\"source\"",
                "destination_workload=\"eastwest\"",
                &format!("destination_service=\"{HOST}\""),
            ]
        ),
        3
    );
    let from_client = format!("source_principal=\"{}\"", spiffe("client"));
    assert_eq!(
        sample(
            &b,
            opened,
            &[
                "reporter=\"destination\"",
                &from_client,
                "source_workload=\"unknown\"",
                "destination_workload=\"b\"",
            ]
        ),
        3
    );
    // One pooled outer connection to the gateway; each client connection its own inner one
    // (ztunnel's way), or one pooled inner connection for the three.
    let inner = if pooled { 1 } else { 3 };
    assert_eq!(a.proxy.hbone.outbound_tls_connections(), 1 + inner);
    assert_eq!(b.proxy.hbone.inbound_tls_connections(), inner);

    // With the gateway gone there is no way to b: the connection fails (nothing dials b itself).
    drop(envoy);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = socks5_connect_from(src, a.socks5.unwrap(), &format!("{net}.100"), 80).await;
    assert!(refused.is_err(), "no gateway, no tunnel");
}
