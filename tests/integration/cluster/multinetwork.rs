//! Issue 16, item 1 on the simulated cluster: node 1 is network `net-a`, node 2 `net-b`, and
//! neither routes to the other's pod subnet (the routes are removed once the cluster is up), as
//! two networks of one mesh. The east-west gateway is a real Envoy on the outside host
//! (10.240.0.3), which both networks reach, as they would a gateway's load-balancer address. A pod
//! on net-a dials the service `echo` (its only endpoint on net-b): its l4mesh opens double HBONE
//! through the gateway, which routes the outer CONNECT by `<hostname>:<port>` to b's pod on :15008
//! and relays the inner TLS untouched. A direct connection to b's address has no route.

use std::time::Duration;

use super::super::envoy::{envoy_binary, write_pems};
use super::super::multinetwork::{eastwest_config, HOST};
use super::netns::{privileged, CLIENT_PY};
use super::topology::{within, Cluster, PodSpec, CONTROL_PLANE_IP, CONTROL_PLANE_PORT, OUTSIDE_IP};

const A: &str = "10.240.1.10";
const B: &str = "10.240.2.10";
const VIP: &str = "10.240.201.1";

fn state() -> String {
    format!(
        r#"
workloads:
- uid: cluster1//v1/Pod/default/a
  name: a
  namespace: default
  serviceAccount: client
  workloadIps: ["{A}"]
  protocol: HBONE
  node: node-1
  network: net-a
- uid: cluster1//v1/Pod/default/b
  name: b
  namespace: default
  serviceAccount: server
  workloadIps: ["{B}"]
  protocol: HBONE
  node: node-2
  network: net-b
  networkGateway: {{ destination: "net-b/{OUTSIDE_IP}", hboneMtlsPort: 15008 }}
  services:
    "default/{HOST}": {{ 80: 8080 }}
- uid: cluster1//v1/Pod/default/eastwest
  name: eastwest
  namespace: default
  serviceAccount: eastwest
  workloadIps: ["{OUTSIDE_IP}"]
  protocol: HBONE
  network: net-b
services:
- name: echo
  namespace: default
  hostname: {HOST}
  vips: ["net-a/{VIP}"]
  ports: {{ 80: 8080 }}
  subjectAltNames: ["spiffe://cluster.local/ns/default/sa/server"]
"#
    )
}

fn call(c: &Cluster, ip: &str, port: u16, msg: &str) -> Option<String> {
    let (ok, out, _) = c
        .pod("a")
        .run(&["python3", "-c", CLIENT_PY, ip, &port.to_string(), msg]);
    ok.then(|| out.trim().to_owned())
}

#[test]
fn cross_network_through_an_envoy_east_west_gateway() {
    if !privileged("cross_network_through_an_envoy_east_west_gateway", &[]) {
        return;
    }
    let envoy = envoy_binary();
    let pods = [
        PodSpec {
            network: "net-a",
            ..PodSpec::new("a", 1, 10, "client", true)
        },
        PodSpec {
            network: "net-b",
            ..PodSpec::new("b", 2, 10, "server", true)
        },
    ];
    let mut c = Cluster::start("mnet", 2, &pods, &state(), &[]);
    // Two networks: no route between the pod subnets; the fabric (the gateway) stays reachable.
    c.node(1).exec(&["ip", "route", "del", "10.240.2.0/24"]);
    c.node(2).exec(&["ip", "route", "del", "10.240.1.0/24"]);

    // The gateway's certificate from the cluster's CA, asked from the outside host's namespace.
    let dir = c.dir().join("eastwest");
    std::fs::create_dir_all(&dir).unwrap();
    let cp = format!("{CONTROL_PLANE_IP}:{CONTROL_PLANE_PORT}")
        .parse()
        .unwrap();
    let (netns, pems) = (c.outside.name.clone(), dir.clone());
    std::thread::spawn(move || {
        super::control_plane::enter_netns(&netns).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ca = l4mesh::identity::CaClient::istio(super::super::harness::istio_ca_at(cp));
        rt.block_on(write_pems(ca, "eastwest", &pems));
    })
    .join()
    .unwrap();
    let access_log = dir.join("access.log");
    let config = eastwest_config(OUTSIDE_IP, "spiffe://cluster.local/ns/default/sa/client", B)
        .replace("{DIR}", &dir.display().to_string())
        .replace("{ACCESS_LOG}", &access_log.display().to_string())
        .replace("{ADMIN_IP}", "127.0.0.1")
        .replace("{ADMIN_PORT}", "19000");
    let config_path = dir.join("envoy.yaml");
    std::fs::write(&config_path, config).unwrap();
    let base_id = (std::process::id() % 100_000) * 10 + 7;
    let log = c.outside.spawn(
        &[
            envoy.to_str().unwrap(),
            "-c",
            config_path.to_str().unwrap(),
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--base-id",
            &base_id.to_string(),
            "--file-flush-interval-msec",
            "100",
        ],
        &[],
        "starting main dispatch loop",
    );
    assert!(
        log.wait_for(&["starting main dispatch loop"]).is_some(),
        "envoy did not start: {}",
        log.all()
    );
    let echo = c.echo("b", B, 8080, "b");

    // Through the gateway, as many times as asked.
    for i in 0..3 {
        let msg = format!("across-{i}");
        let got = within(Duration::from_secs(10), || call(&c, VIP, 80, &msg))
            .unwrap_or_else(|| panic!("no answer through the gateway\n{}", c.logs()));
        assert!(
            got.starts_with("b:") && got.ends_with(&format!(":{msg}")),
            "{got}"
        );
    }
    let line = within(Duration::from_secs(5), || {
        std::fs::read_to_string(&access_log)
            .ok()?
            .lines()
            .find(|l| l.contains(&format!("CONNECT {HOST}:80 200")))
            .map(str::to_owned)
    })
    .expect("the gateway logged the outer CONNECT");
    assert!(
        line.contains("sa/client") && line.contains(&format!("up={B}:15008")),
        "{line}"
    );
    assert!(
        echo.wait_for(&["got", "across-2"]).is_some(),
        "{}",
        echo.all()
    );
    // a's l4mesh logged the double HBONE.
    assert!(
        c.pod("a")
            .wait_log(&[
                "dst.gateway=\"default/eastwest@10.240.0.3:15008\"",
                "dst.hbone_addr"
            ])
            .is_some(),
        "{}",
        c.pod("a").log()
    );

    // b's own address is not routable from net-a: a passthrough connection finds no route.
    assert_eq!(call(&c, B, 8080, "direct"), None);
}
