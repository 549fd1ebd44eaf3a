//! ztunnel's DNS answers are the contract: Istio's ztunnel (`../shared/bin/ztunnel` or
//! `ZTUNNEL_BIN`) and l4mesh run side by side in one network namespace on the same mesh file,
//! with dnsmasq as their upstream (ztunnel reads /etc/resolv.conf: `ip netns exec` binds the
//! namespace's `/etc/netns/<name>/resolv.conf` over it), and every query gets the same status,
//! authority flag and answers (names, types and data; TTLs of forwarded answers aside) from both.

use super::inpod::ztunnel_bin;
use super::netns::{privileged, Netns};

const MESH: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.0.1"]
  protocol: TCP
  node: n1
  services: {}
- uid: cluster1//v1/Pod/default/db-0
  name: db-0
  namespace: default
  serviceAccount: db
  workloadIps: ["10.1.0.10"]
  protocol: TCP
  node: n2
  services: { "default/db.default.svc.cluster.local": { 5432: 5432 } }
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.9.0.1"]
  ports: { 80: 8080 }
- name: api
  namespace: other
  hostname: api.other.svc.cluster.local
  vips: ["/10.9.0.2", "/fd00::2"]
  ports: { 80: 8080 }
- name: wild
  namespace: default
  hostname: "*.example.com"
  vips: ["/10.9.0.3"]
  ports: { 80: 8080 }
- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
  vips: []
  ports: { 5432: 5432 }
- name: far
  namespace: default
  hostname: far.example.org
  vips: ["elsewhere/10.9.0.4"]
  ports: { 80: 80 }
"#;

/// The pod's resolver configuration: its search list is the client's (dedicated mode).
const RESOLV: &str =
    "search default.svc.cluster.local svc.cluster.local cluster.local\nnameserver 10.54.0.2\n";

/// What a DNS answer says, as compared: status, authoritative, and the answer records as
/// `name type data`, sorted.
#[derive(Debug, PartialEq)]
struct Said {
    status: String,
    authoritative: bool,
    answers: Vec<String>,
}

fn ask(ns: &Netns, port: u16, name: &str, qtype: &str) -> Said {
    try_ask(ns, port, name, qtype)
        .unwrap_or_else(|e| panic!("no answer from port {port} for {name} {qtype}: {e}"))
}

fn try_ask(ns: &Netns, port: u16, name: &str, qtype: &str) -> Result<Said, String> {
    let p = port.to_string();
    let (_, out, err) = ns.output(&[
        "dig",
        "@127.0.0.1",
        "-p",
        &p,
        "+time=3",
        "+tries=1",
        "+noall",
        "+answer",
        "+comments",
        name,
        qtype,
    ]);
    let status = out
        .split("status: ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .ok_or_else(|| format!("{out} {err}"))?
        .to_owned();
    let authoritative = out
        .lines()
        .find(|l| l.contains(";; flags:"))
        .is_some_and(|l| l.split(';').nth(2).unwrap_or("").contains(" aa"));
    let mut answers: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with(';') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // name TTL class type data…
            format!("{} {} {}", f[0].to_lowercase(), f[3], f[4..].join(" "))
        })
        .collect();
    answers.sort();
    Ok(Said {
        status,
        authoritative,
        answers,
    })
}

#[test]
fn dns_answers_match_ztunnels() {
    if !privileged("dns_answers_match_ztunnels", &["dig", "dnsmasq"]) {
        return;
    }
    let Some(ztunnel) = ztunnel_bin() else {
        eprintln!(
            "SKIPPED dns_answers_match_ztunnels: no ztunnel at ZTUNNEL_BIN or ../shared/bin/ztunnel"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mesh = dir.path().join("mesh.yaml");
    std::fs::write(&mesh, MESH).unwrap();
    let mut ns = Netns::new("dnszt");
    let mut up = Netns::new("dnsztup");
    ns.link(&up, "dz", "10.54.0.1/24", "10.54.0.2/24");
    // The namespace's resolv.conf, bound over /etc/resolv.conf by `ip netns exec`; removed at
    // the end (and by the guard on a failure).
    struct EtcNetns(std::path::PathBuf);
    impl Drop for EtcNetns {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let etc = EtcNetns(std::path::Path::new("/etc/netns").join(&ns.name));
    std::fs::create_dir_all(&etc.0).unwrap();
    std::fs::write(etc.0.join("resolv.conf"), RESOLV).unwrap();
    up.spawn(
        &[
            "dnsmasq",
            "--no-daemon",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=10.54.0.2",
            "--local=/test/",
            "--address=/upstream.test/192.0.2.7",
        ],
        &[],
        "started",
    );
    let zt = ns.spawn(
        &[ztunnel.to_str().unwrap()],
        &[
            ("FAKE_CA", "true"),
            ("XDS_ADDRESS", ""),
            ("CA_ADDRESS", ""),
            ("LOCAL_XDS_PATH", mesh.to_str().unwrap()),
            ("PROXY_MODE", "dedicated"),
            ("PROXY_WORKLOAD_INFO", "default/client/client"),
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("RUST_LOG", "info"),
        ],
        "",
    );
    let bin = env!("CARGO_BIN_EXE_l4mesh");
    let l4 = ns.spawn(
        &[bin],
        &[
            ("ISTIO_META_DNS_CAPTURE", "true"),
            ("DNS_PROXY_ADDR", "127.0.0.1:25053"),
            ("LOCAL_XDS_PATH", mesh.to_str().unwrap()),
            ("PROXY_WORKLOAD_INFO", "default/client/client"),
            ("NODE_NAME", "n1"),
            ("UNSTABLE_ENABLE_SOCKS5", "false"),
            ("L4MESH_OUTBOUND_ADDR", "127.0.0.1:25001"),
            ("L4MESH_INBOUND_PLAINTEXT_ADDR", "127.0.0.1:25006"),
            ("L4MESH_HBONE_ADDR", "127.0.0.1:25008"),
            ("L4MESH_READINESS_ADDR", "127.0.0.1:25021"),
            ("L4MESH_METRICS_ADDR", "127.0.0.1:25020"),
            ("L4MESH_DISABLE_ADMIN", "true"),
        ],
        "listening",
    );
    // Both answer the canonical name before the comparison starts.
    let ready = |port| {
        (0..50).any(|_| {
            let answered = try_ask(&ns, port, "echo.default.svc.cluster.local", "A")
                .is_ok_and(|s| !s.answers.is_empty());
            if !answered {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            answered
        })
    };
    assert!(ready(15053), "ztunnel's DNS proxy:\n{}", zt.all());
    assert!(ready(25053), "l4mesh's DNS proxy:\n{}", l4.all());
    let queries = [
        ("echo.default.svc.cluster.local", "A"),
        ("EcHo.Default.svc.cluster.local", "A"),
        ("echo.default.svc.cluster.local", "AAAA"),
        ("echo", "A"),
        ("echo.default", "A"),
        ("echo.default.svc", "A"),
        ("echo.default.default.svc.cluster.local", "A"),
        (
            "echo.default.svc.cluster.local.default.svc.cluster.local",
            "A",
        ),
        ("api.other", "A"),
        ("api.other.svc.cluster.local", "AAAA"),
        ("api.other.default.svc.cluster.local", "A"),
        ("api.default.svc.cluster.local", "A"),
        ("anything.example.com", "A"),
        ("a.b.example.com", "A"),
        ("example.com", "A"),
        ("db.default.svc.cluster.local", "A"),
        ("far.example.org", "A"),
        ("upstream.test", "A"),
        ("missing.test", "A"),
        ("echo.default.svc.cluster.local", "TXT"),
        ("db-0.db.default.svc.cluster.local", "A"),
        ("db", "A"),
        ("db.default.default.svc.cluster.local", "A"),
        ("x.example.com.default.svc.cluster.local", "A"),
        ("echo.default.svc.cluster.local", "MX"),
        ("api.other.svc.cluster.local", "ANY"),
    ];
    let mut differ = Vec::new();
    for (name, qtype) in queries {
        let (z, l) = (ask(&ns, 15053, name, qtype), ask(&ns, 25053, name, qtype));
        if z != l {
            differ.push(format!("{name} {qtype}:\n  ztunnel {z:?}\n  l4mesh  {l:?}"));
        }
    }
    assert!(
        differ.is_empty(),
        "l4mesh answers differently from ztunnel:\n{}",
        differ.join("\n")
    );
}
