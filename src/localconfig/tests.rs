//! Tests of the local config format: the design example, both string-match spellings, every error
//! path (each message must name the entry and the field), the shipped examples, and the file watch.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::model::{
    Action, Authorization, GatewayDestination, HealthPolicy, IpFamilies, LoadBalancingMode,
    NetworkAddr, PolicyKey, PolicyScope, RoutingScope, Service, ServiceKey, StringMatch,
    TunnelProtocol, Workload, WorkloadStatus, WorkloadType, WorkloadUid,
};
use crate::store::Snapshot;

const WIRE_FACTS_EXAMPLE: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.1.1"]
  protocol: HBONE
  services:
    "default/echo.default.svc.cluster.local": { 80: 8080 }
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.10.0.1"]
  ports: { 80: 8080 }
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ { destinationPorts: [9999] } ]]]
"#;

const MULTI_SERVICE: &str = include_str!("../../examples/multi-service.yaml");

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn workloads(b: &Batch) -> Vec<&Workload> {
    b.upserts
        .iter()
        .filter_map(|u| match u {
            Upsert::Workload(w) => Some(w),
            _ => None,
        })
        .collect()
}

fn services(b: &Batch) -> Vec<&Service> {
    b.upserts
        .iter()
        .filter_map(|u| match u {
            Upsert::Service(s) => Some(s),
            _ => None,
        })
        .collect()
}

fn policies(b: &Batch) -> Vec<&Authorization> {
    b.upserts
        .iter()
        .filter_map(|u| match u {
            Upsert::Policy(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn err(yaml: &str) -> String {
    match parse(yaml) {
        Ok(b) => panic!("expected an error, parsed {} upserts", b.upserts.len()),
        Err(e) => e.to_string(),
    }
}

fn assert_contains(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "{text:?} should contain {p:?}");
    }
}

#[test]
fn wire_facts_example_yields_the_batch() {
    let batch = parse(WIRE_FACTS_EXAMPLE).unwrap();
    assert!(batch.replace_all);
    assert!(batch.removals.is_empty());

    let ws = workloads(&batch);
    assert_eq!(ws.len(), 1);
    let w = ws[0];
    assert_eq!(w.uid, WorkloadUid("cluster1//v1/Pod/default/client".into()));
    assert_eq!(w.addresses, vec![ip("127.0.1.1")]);
    assert_eq!(w.protocol, TunnelProtocol::Hbone);
    assert_eq!(w.service_account, "client");
    let echo = ServiceKey::parse("default/echo.default.svc.cluster.local").unwrap();
    assert_eq!(w.services[&echo], [(80, 8080)].into_iter().collect());

    let ss = services(&batch);
    assert_eq!(ss.len(), 1);
    assert_eq!(ss[0].vips, vec![NetworkAddr::new("", ip("127.10.0.1"))]);
    assert_eq!(ss[0].ports, [(80, 8080)].into_iter().collect());
    assert_eq!(ss[0].key(), echo);

    let ps = policies(&batch);
    assert_eq!(ps.len(), 1);
    assert_eq!(ps[0].scope, PolicyScope::Namespace);
    assert_eq!(ps[0].action, Action::Deny);
    assert_eq!(ps[0].rules.len(), 1);
    assert_eq!(ps[0].rules[0][0][0].destination_ports, vec![9999]);

    // And the store indexes it as xDS resources would be.
    let store = Store::new();
    store.apply(batch);
    let snap = store.load();
    assert_eq!(snap.counts(), (1, 1, 1));
    assert!(snap
        .service_by_vip(&NetworkAddr::new("", ip("127.10.0.1")), None)
        .is_some());
    assert_eq!(snap.endpoints(&echo).count(), 1);
    assert!(snap
        .policy(&PolicyKey("default/deny-9999".into()))
        .is_some());
}

#[test]
fn local_config_exposes_the_proto_messages() {
    let lc = LocalConfig::from_yaml(WIRE_FACTS_EXAMPLE).unwrap();
    let addrs: Vec<_> = lc.addresses().collect();
    assert_eq!(addrs.len(), 2);
    match &addrs[0].r#type {
        Some(pw::address::Type::Workload(w)) => {
            assert_eq!(w.addresses, vec![vec![127, 0, 1, 1]]);
            assert_eq!(w.tunnel_protocol, pw::TunnelProtocol::Hbone as i32);
        }
        other => panic!("expected a workload, found {other:?}"),
    }
    match &addrs[1].r#type {
        Some(pw::address::Type::Service(s)) => {
            assert_eq!(s.addresses[0].address, vec![127, 10, 0, 1]);
            assert_eq!(s.addresses[0].network, "");
        }
        other => panic!("expected a service, found {other:?}"),
    }
    let auths: Vec<_> = lc.authorizations().collect();
    assert_eq!(auths[0].action, psec::Action::Deny as i32);
    assert_eq!(
        auths[0].rules[0].clauses[0].matches[0].destination_ports,
        vec![9999]
    );
}

fn policy_with(matches: &str) -> String {
    format!(
        "policies:\n- name: p\n  namespace: ns\n  scope: Global\n  action: Allow\n  rules:\n  - - - {matches}\n"
    )
}

fn only_policy(yaml: &str) -> Authorization {
    let batch = parse(yaml).unwrap();
    let ps = policies(&batch);
    assert_eq!(ps.len(), 1);
    ps[0].clone()
}

#[test]
fn tags_and_map_form_give_the_same_model() {
    let tagged = policy_with(
        r#"{ principals: [!Exact "cluster.local/ns/a/sa/b", !Prefix "cluster.local/ns/", !Suffix "/sa/b", !Presence ""], namespaces: [!Exact a] }"#,
    );
    let mapped = policy_with(
        r#"{ principals: [{exact: "cluster.local/ns/a/sa/b"}, {prefix: "cluster.local/ns/"}, {suffix: "/sa/b"}, {presence: {}}], namespaces: [{Exact: a}] }"#,
    );
    let a = only_policy(&tagged);
    let b = only_policy(&mapped);
    assert_eq!(a, b);
    let m = &a.rules[0][0][0];
    assert_eq!(
        m.principals,
        vec![
            StringMatch::Exact("cluster.local/ns/a/sa/b".into()),
            StringMatch::Prefix("cluster.local/ns/".into()),
            StringMatch::Suffix("/sa/b".into()),
            StringMatch::Presence,
        ]
    );
    assert_eq!(m.namespaces, vec![StringMatch::Exact("a".into())]);
}

#[test]
fn ztunnel_block_style_policy_parses() {
    let yaml = r#"
policies:
- name: allow-client
  namespace: default
  scope: WorkloadSelector
  action: Allow
  dryRun: false
  rules:
  - - - principals:
        - !Exact cluster.local/ns/default/sa/client
        - !Suffix /sa/admin
        notNamespaces:
        - !Prefix kube-
        sourceIps: ["10.0.0.0/8", "127.0.0.1", "fd00::/8"]
        destinationPorts: [8080]
    - - serviceAccounts:
        - namespace: default
          serviceAccount: client
"#;
    let p = only_policy(yaml);
    assert_eq!(p.scope, PolicyScope::WorkloadSelector);
    assert_eq!(p.rules[0].len(), 2, "two clauses");
    let m = &p.rules[0][0][0];
    assert_eq!(
        m.source_ips,
        vec![
            "10.0.0.0/8".parse().unwrap(),
            "127.0.0.1/32".parse().unwrap(),
            "fd00::/8".parse().unwrap(),
        ]
    );
    assert_eq!(m.not_namespaces, vec![StringMatch::Prefix("kube-".into())]);
    assert_eq!(
        p.rules[0][1][0].service_accounts[0].service_account,
        "client"
    );
}

#[test]
fn presence_spellings() {
    // A bare tag must be followed by whitespace or a line break, so in a flow list it needs a value.
    let block = policy_with("principals:\n        - !Presence\n        - !Presence\n");
    let p = only_policy(&block);
    assert_eq!(
        p.rules[0][0][0].principals,
        vec![StringMatch::Presence, StringMatch::Presence]
    );
    for form in [
        "!Presence \"\"",
        "!Presence {}",
        "!Presence []",
        "{presence: {}}",
        "{presence: null}",
        "{Presence: \"\"}",
    ] {
        let p = only_policy(&policy_with(&format!("{{ principals: [{form}] }}")));
        assert_eq!(
            p.rules[0][0][0].principals,
            vec![StringMatch::Presence],
            "{form}"
        );
    }
}

#[test]
fn string_match_errors_name_the_place() {
    let e = err(&policy_with("{ principals: [\"plain\"] }"));
    assert_contains(
        &e,
        &[
            "policies[0] (\"ns/p\")",
            "principals",
            "!Exact",
            "\"plain\"",
        ],
    );
    let e = err(&policy_with("{ principals: [!Regex \"a.*\"] }"));
    assert_contains(&e, &["policies[0] (\"ns/p\")", "\"Regex\""]);
    let e = err(&policy_with("{ principals: [!Presence \"x\"] }"));
    assert_contains(&e, &["presence", "\"x\""]);
}

#[test]
fn error_unknown_key() {
    let e = err("workloads:\n- uid: u1\n  name: a\n  namespace: ns\n  protocl: HBONE\n");
    assert_contains(&e, &["workloads[0] (uid \"u1\")", "protocl", "line 5"]);
    let e = err("workload: []\n");
    assert_contains(&e, &["workload", "workloads"]);
    // ztunnel's older format, a bare list of workloads.
    let e = err("- name: local\n  namespace: default\n");
    assert_contains(&e, &["expected a map with the lists `workloads`"]);
    let e = err(&policy_with("{ destinationPort: [80] }"));
    assert_contains(
        &e,
        &[
            "policies[0] (\"ns/p\")",
            "rules[0][0][0]",
            "destinationPort",
        ],
    );
}

#[test]
fn error_bad_ip() {
    let e = err("workloads:\n- uid: u1\n  name: a\n  namespace: ns\n  workloadIps: [\"10.0.0.1\", \"10.0.0.300\"]\n");
    assert_contains(
        &e,
        &[
            "workloads[0] (uid \"u1\")",
            "workloadIps[1]",
            "expected an IP address",
            "\"10.0.0.300\"",
        ],
    );
}

#[test]
fn error_vip_without_network() {
    let e =
        err("services:\n- name: s\n  namespace: ns\n  hostname: s.ns\n  vips: [\"10.0.0.1\"]\n");
    assert_contains(
        &e,
        &[
            "services[0] (\"ns/s.ns\")",
            "vips[0]",
            "<network>/<ip>",
            "\"10.0.0.1\"",
        ],
    );
    let e =
        err("services:\n- name: s\n  namespace: ns\n  hostname: s.ns\n  vips: [\"net/nope\"]\n");
    assert_contains(&e, &["vips[0]", "\"net/nope\""]);
}

#[test]
fn error_bad_cidr() {
    let e = err(&policy_with("{ sourceIps: [\"10.0.0.0/40\"] }"));
    assert_contains(
        &e,
        &[
            "policies[0] (\"ns/p\")",
            "rules[0][0][0].sourceIps[0]",
            "32",
            "40",
        ],
    );
    let e = err(&policy_with("{ notDestinationIps: [\"10.0.0.0/x\"] }"));
    assert_contains(
        &e,
        &[
            "rules[0][0][0].notDestinationIps[0]",
            "CIDR",
            "\"10.0.0.0/x\"",
        ],
    );
}

#[test]
fn error_service_port_zero() {
    let e = err("services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  ports: { 0: 8080 }\n");
    assert_contains(
        &e,
        &[
            "services[0] (\"default/echo.default.svc.cluster.local\")",
            "ports[0].servicePort",
            "1..=65535",
            "found 0",
        ],
    );
}

#[test]
fn error_unknown_protocol() {
    let e = err("workloads:\n- uid: u1\n  name: a\n  namespace: ns\n  protocol: QUIC\n");
    assert_contains(
        &e,
        &[
            "workloads[0] (uid \"u1\")",
            "`protocol`",
            "HBONE",
            "TCP",
            "\"QUIC\"",
        ],
    );
}

#[test]
fn error_services_key_without_slash() {
    let e = err(
        "workloads:\n- uid: u1\n  name: a\n  namespace: ns\n  services: { noslash: { 80: 80 } }\n",
    );
    assert_contains(
        &e,
        &[
            "workloads[0] (uid \"u1\")",
            "services[\"noslash\"]",
            "<namespace>/<hostname>",
        ],
    );
}

#[test]
fn error_missing_required_fields() {
    let e = err("workloads:\n- name: a\n  namespace: ns\n");
    assert_contains(&e, &["workloads[0] (\"ns/a\")", "`uid`", "non-empty"]);
    let e = err("policies:\n- name: p\n  namespace: ns\n  action: Deny\n");
    assert_contains(&e, &["policies[0] (\"ns/p\")", "scope"]);
}

#[test]
fn error_duplicates() {
    let e = err(
        "workloads:\n- {uid: u1, name: a, namespace: ns}\n- {uid: u1, name: b, namespace: ns}\n",
    );
    assert_contains(
        &e,
        &[
            "workloads[1] (uid \"u1\")",
            "already defined by workloads[0]",
        ],
    );
    let e = err("services:\n- {name: s, namespace: ns, hostname: h}\n- {name: t, namespace: ns, hostname: h}\n");
    assert_contains(&e, &["services[1] (\"ns/h\")", "services[0]"]);
    let e =
        err("services:\n- {name: s, namespace: ns, hostname: h, ports: {80: 8080, 80: 9090}}\n");
    assert_contains(
        &e,
        &["services[0] (\"ns/h\")", "`ports`", "key 80 appears twice"],
    );
}

#[test]
fn error_enum_and_type_mistakes() {
    let e =
        err("services:\n- {name: s, namespace: ns, hostname: h, loadBalancer: {mode: Random}}\n");
    assert_contains(
        &e,
        &[
            "services[0] (\"ns/h\")",
            "loadBalancer.mode",
            "Failover",
            "\"Random\"",
        ],
    );
    let e = err(&policy_with("{ destinationPorts: [-1] }"));
    assert_contains(&e, &["policies[0] (\"ns/p\")", "destinationPorts[0]"]);
    let e = err(&policy_with("{ destinationPorts: [70000] }"));
    assert_contains(
        &e,
        &["rules[0][0][0].destinationPorts[0]", "65535", "70000"],
    );
    let e = err(
        "workloads:\n- uid: u1\n  name: a\n  namespace: ns\n  waypoint: { hboneMtlsPort: 15008 }\n",
    );
    assert_contains(&e, &["workloads[0] (uid \"u1\")", "`waypoint`", "neither"]);
    let e = err("workloads:\n- uid: u1\n  name: a\n  namespace: ns\n  waypoint: { destination: \"/10.0.0.1\", hostname: {namespace: a, hostname: b} }\n");
    assert_contains(&e, &["`waypoint`", "both"]);
}

#[test]
fn errors_from_a_file_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(&path, "workloads:\n- uid: u1\n  workloadIps: [nope]\n").unwrap();
    let e = load(&path).unwrap_err().to_string();
    assert_contains(
        &e,
        &["bad.yaml", "workloads[0] (uid \"u1\")", "workloadIps[0]"],
    );
    let e = load(&dir.path().join("missing.yaml"))
        .unwrap_err()
        .to_string();
    assert_contains(&e, &["cannot read local config", "missing.yaml"]);
}

#[test]
fn empty_file_is_an_empty_mesh() {
    for yaml in ["", "# nothing yet\n", "workloads: []\n"] {
        let b = parse(yaml).unwrap();
        assert!(b.upserts.is_empty() && b.replace_all, "{yaml:?}");
    }
}

#[test]
fn gateway_forms() {
    let yaml = r#"
workloads:
- uid: a
  name: a
  namespace: ns
  waypoint: { destination: "net1/10.0.0.9", hboneMtlsPort: 15009 }
  networkGateway: { destination: "istio-system/eastwest.istio-system.svc.cluster.local" }
- uid: b
  name: b
  namespace: ns
  waypoint: { hostname: { namespace: ns, hostname: wp.ns.svc.cluster.local } }
"#;
    let batch = parse(yaml).unwrap();
    let ws = workloads(&batch);
    let wp = ws[0].waypoint.as_ref().unwrap();
    assert_eq!(
        wp.destination,
        GatewayDestination::Address(NetworkAddr::new("net1", ip("10.0.0.9")))
    );
    assert_eq!(wp.hbone_mtls_port, 15009);
    let gw = ws[0].network_gateway.as_ref().unwrap();
    assert_eq!(
        gw.destination,
        GatewayDestination::Hostname(
            ServiceKey::parse("istio-system/eastwest.istio-system.svc.cluster.local").unwrap()
        )
    );
    assert_eq!(gw.hbone_mtls_port, 15008, "default port");
    let wp = ws[1].waypoint.as_ref().unwrap();
    assert_eq!(
        wp.destination,
        GatewayDestination::Hostname(ServiceKey::parse("ns/wp.ns.svc.cluster.local").unwrap())
    );
}

#[test]
fn enum_spellings() {
    let yaml = r#"
workloads:
- { uid: a, name: a, namespace: ns, workloadType: CronJob, status: UNHEALTHY, protocol: hbone }
- { uid: b, name: b, namespace: ns, workloadType: pod, networkMode: HOST_NETWORK }
services:
- name: s
  namespace: ns
  hostname: s.ns
  ipFamilies: IPv4
  loadBalancer: { mode: UNSPECIFIED_MODE, routingPreferences: [ZONE, subzone], healthPolicy: ALLOW_ALL }
policies:
- { name: p, namespace: ns, scope: WORKLOAD_SELECTOR, action: DENY }
"#;
    let batch = parse(yaml).unwrap();
    let ws = workloads(&batch);
    assert_eq!(ws[0].workload_type, WorkloadType::CronJob);
    assert_eq!(ws[0].status, WorkloadStatus::Unhealthy);
    assert_eq!(ws[0].protocol, TunnelProtocol::Hbone);
    assert_eq!(ws[1].workload_type, WorkloadType::Pod);
    assert!(ws[1].host_network);
    let s = services(&batch)[0];
    assert_eq!(s.ip_families, IpFamilies::Ipv4Only);
    assert_eq!(s.load_balancing.mode, LoadBalancingMode::Standard);
    assert_eq!(
        s.load_balancing.routing_preference,
        vec![RoutingScope::Zone, RoutingScope::Subzone]
    );
    assert_eq!(s.load_balancing.health_policy, HealthPolicy::AllowAll);
    let p = policies(&batch)[0];
    assert_eq!(
        (p.scope, p.action),
        (PolicyScope::WorkloadSelector, Action::Deny)
    );
    assert!(p.rules.is_empty());
}

#[test]
fn embedded_default_parses() {
    let batch = parse(EMBEDDED_DEFAULT).unwrap();
    let store = Store::new();
    store.apply(batch);
    let snap = store.load();
    assert_eq!(snap.counts(), (3, 1, 0));
    let client = snap
        .workload_by_addr(&NetworkAddr::new("", ip("127.0.0.1")))
        .unwrap();
    assert_eq!(
        client.uid,
        WorkloadUid("cluster1//v1/Pod/default/client".into())
    );
    assert_eq!(client.protocol, TunnelProtocol::Tcp);
    let echo = snap
        .service_by_hostname("echo.default.svc.cluster.local")
        .unwrap();
    assert_eq!(echo.vips, vec![NetworkAddr::new("", ip("127.10.0.1"))]);
    assert_eq!(echo.ports, [(80, 8080)].into_iter().collect());
    let mut endpoints: Vec<IpAddr> = snap
        .endpoints(&echo.key())
        .map(|(w, ep)| {
            assert_eq!(ep.ports, [(80, 8080)].into_iter().collect());
            assert_eq!(w.protocol, TunnelProtocol::Tcp);
            w.addresses[0]
        })
        .collect();
    endpoints.sort();
    assert_eq!(endpoints, vec![ip("127.0.0.2"), ip("127.0.0.3")]);
}

#[test]
fn multi_service_example_parses() {
    let batch = parse(MULTI_SERVICE).unwrap();
    let (w, s, p) = (
        workloads(&batch).len(),
        services(&batch).len(),
        policies(&batch).len(),
    );
    assert_eq!((w, s, p), (5, 3, 3));
    let frontend = services(&batch)
        .into_iter()
        .find(|s| s.name == "frontend")
        .unwrap();
    assert_eq!(frontend.load_balancing.mode, LoadBalancingMode::Failover);
    assert!(frontend.waypoint.is_some());
    let fw = workloads(&batch)
        .into_iter()
        .find(|w| w.name == "frontend-7d4f")
        .unwrap();
    assert_eq!(fw.capacity, 2);
    assert_eq!(fw.locality.zone, "eu-west1-b");
    let audit = policies(&batch)
        .into_iter()
        .find(|p| p.name == "audit-unknown-principals")
        .unwrap();
    assert!(audit.dry_run);
}

#[test]
fn proto_fields_are_spelled_as_in_the_file() {
    assert_eq!(yaml_field(Kind::Workload, "addresses[1]"), "workloadIps[1]");
    assert_eq!(yaml_field(Kind::Workload, "tunnel_protocol"), "protocol");
    assert_eq!(
        yaml_field(Kind::Workload, "network_gateway.address.address"),
        "networkGateway.destination"
    );
    assert_eq!(
        yaml_field(Kind::Workload, "services[\"a_b/c\"].ports[0].service_port"),
        "services[\"a_b/c\"].ports[0].servicePort"
    );
    assert_eq!(yaml_field(Kind::Service, "addresses[2].length"), "vips[2]");
    assert_eq!(
        yaml_field(Kind::Service, "load_balancing.routing_preference[0]"),
        "loadBalancer.routingPreferences[0]"
    );
    assert_eq!(
        yaml_field(
            Kind::Policy,
            "rules[0].clauses[1].matches[2].not_source_ips[3]"
        ),
        "rules[0][1][2].notSourceIps[3]"
    );
}

fn one_workload(name: &str, ip: &str) -> String {
    format!(
        "workloads:\n- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  workloadIps: [\"{ip}\"]\n"
    )
}

fn has_workload(snap: &Snapshot, name: &str) -> bool {
    snap.workload(&WorkloadUid(
        format!("cluster1//v1/Pod/default/{name}").into(),
    ))
    .is_some()
}

async fn wait_until(store: &Store, what: &str, f: impl Fn(&Snapshot) -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !f(&store.load()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "store did not reflect {what} within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn watch_applies_edits_and_keeps_the_last_good_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mesh.yaml");
    std::fs::write(&path, one_workload("a", "127.0.0.11")).unwrap();
    let store = Arc::new(Store::new());
    store.apply(load(&path).unwrap());
    let handle = watch(path.clone(), store.clone()).unwrap();

    // An edit in place.
    std::fs::write(&path, one_workload("b", "127.0.0.12")).unwrap();
    wait_until(&store, "the in-place edit", |s| {
        has_workload(s, "b") && !has_workload(s, "a")
    })
    .await;

    // A save by write-to-temp + rename, as many editors do.
    let tmp = dir.path().join(".mesh.yaml.swp");
    std::fs::write(&tmp, one_workload("c", "127.0.0.13")).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    wait_until(&store, "the renamed file", |s| {
        has_workload(s, "c") && !has_workload(s, "b")
    })
    .await;

    // An invalid edit changes nothing.
    let version = store.load().version();
    std::fs::write(&path, "workloads:\n- uid: x\n  bogus: true\n").unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(store.load().version(), version);
    assert!(has_workload(&store.load(), "c"));

    // A file unrelated to the config in the same directory is ignored.
    std::fs::write(dir.path().join("other.yaml"), "not: [valid").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(store.load().version(), version);

    // Fixing the file applies it again.
    std::fs::write(&path, one_workload("d", "127.0.0.14")).unwrap();
    wait_until(&store, "the fixed file", |s| has_workload(s, "d")).await;

    handle.abort();
}

#[tokio::test]
async fn watch_fails_for_a_missing_directory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("no-such-dir").join("mesh.yaml");
    let e = watch(path, Arc::new(Store::new())).unwrap_err().to_string();
    assert_contains(&e, &["cannot watch local config", "mesh.yaml"]);
}

#[test]
fn port_keys_may_be_quoted_and_lists_empty() {
    let yaml = "workloads:\nservices:\n- {name: s, namespace: ns, hostname: h, ports: {\"80\": \"8080\", 443: 8443}}\n";
    let batch = parse(yaml).unwrap();
    assert_eq!(
        services(&batch)[0].ports,
        [(80, 8080), (443, 8443)].into_iter().collect()
    );
}

#[test]
fn service_address_ranges_and_bad_vips() {
    let yaml = r#"
services:
- { name: ext, namespace: default, hostname: ext.example.com, vips: ["/10.1.0.0/16", "net2/10.9.0.1"], ports: { 443: 443 } }
"#;
    let batch = crate::localconfig::parse(yaml).unwrap();
    let store = Store::new();
    store.apply(batch);
    let snap = store.load();
    let host = |a: NetworkAddr| {
        snap.service_by_vip(&a, None)
            .or_else(|| snap.service_by_range(&a, None))
            .map(|s| s.hostname.clone())
    };
    assert_eq!(
        host(NetworkAddr::new("", ip("10.1.200.7"))).as_deref(),
        Some("ext.example.com")
    );
    assert_eq!(
        host(NetworkAddr::new("net2", ip("10.9.0.1"))).as_deref(),
        Some("ext.example.com")
    );
    for bad in ["10.0.0.1", "/10.0.0.1/33", "/10.0.0.1/x", "/not-an-ip"] {
        let e = crate::localconfig::parse(&yaml.replace("/10.1.0.0/16", bad))
            .err()
            .unwrap_or_else(|| panic!("{bad} accepted"));
        assert!(e.to_string().contains("vips[0]"), "{bad}: {e}");
    }
}

#[test]
fn weighted_waypoints_from_the_file() {
    let yaml = r#"
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.0.0.1"]
  ports: { 80: 8080 }
  weightedWaypoints:
  - { waypoint: { destination: "/10.0.0.9" }, weight: 1 }
  - { waypoint: { destination: "istio-system/canary.istio-system.svc.cluster.local", hboneMtlsPort: 15009 }, weight: 3 }
"#;
    let store = Store::new();
    store.apply(crate::localconfig::parse(yaml).unwrap());
    let snap = store.load();
    let svc = snap
        .service_by_vip(&NetworkAddr::new("", ip("10.0.0.1")), None)
        .unwrap();
    let weights: Vec<u32> = svc.weighted_waypoints.iter().map(|w| w.weight).collect();
    assert_eq!(weights, [1, 3]);
    assert_eq!(svc.weighted_waypoints[1].gateway.hbone_mtls_port, 15009);
    // A weighted waypoint without a destination is refused, naming it.
    let e = crate::localconfig::parse(
        &yaml.replace(r#"destination: "/10.0.0.9""#, "hboneMtlsPort: 15008"),
    )
    .err()
    .unwrap();
    assert!(e.to_string().contains("weightedWaypoints[0]"), "{e}");
}
