use l4mesh::proto::istio::workload as pw;
use prost::Message;

use super::*;

pub(crate) const YAML: &str = r#"
workloads:
- uid: cluster1//v1/Pod/default/client
  name: client
  namespace: default
  serviceAccount: client
  workloadIps: ["127.0.1.1"]
  protocol: HBONE
  services:
    "default/echo.default.svc.cluster.local": { 80: 8080 }
    "default/other.default.svc.cluster.local": { 81: 8081 }
    "default/third.default.svc.cluster.local": { 82: 8082 }
- uid: cluster1//v1/Pod/default/echo
  name: echo
  namespace: default
  serviceAccount: echo
  network: net2
  workloadIps: ["10.0.0.1"]
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/127.10.0.1", "/127.0.1.1"]
  ports: { 80: 8080 }
policies:
- name: deny-9999
  namespace: default
  scope: Namespace
  action: Deny
  rules: [[[ { destinationPorts: [9999] } ]]]
"#;

pub(crate) fn state() -> State {
    State::new(Resources::from_yaml(YAML).unwrap())
}

#[test]
fn names_resources_as_istio_does() {
    let s = state();
    let addresses: Vec<_> = s.entries(Kind::Address).map(|e| e.name.as_str()).collect();
    assert_eq!(
        addresses,
        [
            "cluster1//v1/Pod/default/client",
            "cluster1//v1/Pod/default/echo",
            "default/echo.default.svc.cluster.local"
        ]
    );
    let policies: Vec<_> = s
        .entries(Kind::Authorization)
        .map(|e| e.name.as_str())
        .collect();
    assert_eq!(policies, ["default/deny-9999"]);
}

#[test]
fn values_decode_to_the_parsed_messages() {
    let config = LocalConfig::from_yaml(YAML).unwrap();
    let s = state();
    for address in config.addresses() {
        let name = match address.r#type.as_ref().unwrap() {
            pw::address::Type::Workload(w) => w.uid.clone(),
            pw::address::Type::Service(s) => format!("{}/{}", s.namespace, s.hostname),
        };
        let entry = s.get(Kind::Address, &name).unwrap();
        assert_eq!(
            &pw::Address::decode(entry.value.as_slice()).unwrap(),
            address
        );
    }
}

#[test]
fn versions_are_content_hashes_independent_of_map_order() {
    // Each parse builds new HashMaps (new random order); the bytes and versions must not move.
    let first = state();
    for _ in 0..20 {
        let again = state();
        for (a, b) in first
            .entries(Kind::Address)
            .zip(again.entries(Kind::Address))
        {
            assert_eq!(a.value, b.value);
            assert_eq!(a.version, b.version);
        }
    }
    let e = first
        .get(Kind::Address, "cluster1//v1/Pod/default/client")
        .unwrap();
    assert_eq!(e.version, version_of(&e.value));
    assert_eq!(e.version.len(), 16);
    // FNV-1a 64 reference values.
    assert_eq!(version_of(b""), "cbf29ce484222325");
    assert_eq!(version_of(b"a"), "af63dc4c8601ec8c");
}

#[test]
fn system_version_follows_content() {
    let a = state();
    let b = state();
    assert_eq!(
        a.system_version(Kind::Address),
        b.system_version(Kind::Address)
    );
    let mut c = state();
    assert!(c.remove(Kind::Address, "cluster1//v1/Pod/default/echo"));
    assert_ne!(
        a.system_version(Kind::Address),
        c.system_version(Kind::Address)
    );
    assert_eq!(
        a.system_version(Kind::Authorization),
        c.system_version(Kind::Authorization)
    );
}

#[test]
fn resolves_network_addresses_workloads_first() {
    let s = state();
    let name = |n: &str| s.resolve(Kind::Address, n).map(|e| e.name.clone());
    // 127.0.1.1 is both the client's IP and (oddly) a VIP: the workload wins.
    assert_eq!(
        name("/127.0.1.1").as_deref(),
        Some("cluster1//v1/Pod/default/client")
    );
    assert_eq!(
        name("/127.10.0.1").as_deref(),
        Some("default/echo.default.svc.cluster.local")
    );
    assert_eq!(
        name("net2/10.0.0.1").as_deref(),
        Some("cluster1//v1/Pod/default/echo")
    );
    assert_eq!(name("/10.0.0.1"), None, "wrong network");
    assert_eq!(name("/10.9.9.9"), None);
    assert_eq!(
        name("default/echo.default.svc.cluster.local").as_deref(),
        Some("default/echo.default.svc.cluster.local")
    );
    assert_eq!(
        s.resolve(Kind::Authorization, "/127.0.1.1")
            .map(|e| &e.name),
        None
    );
    assert!(s
        .resolve(Kind::Authorization, "default/deny-9999")
        .is_some());
}

#[test]
fn invalid_or_duplicate_entries_are_refused() {
    let dup = "workloads:\n- {uid: a, name: a, namespace: n}\n- {uid: a, name: b, namespace: n}\n";
    let err = Resources::from_yaml(dup).unwrap_err().to_string();
    assert!(err.contains("already defined"), "{err}");
    let bad = "workloads:\n- {uid: a, name: a, namespace: n, workloadIps: [nope]}\n";
    assert!(Resources::from_yaml(bad).is_err());
    assert!(Resources::from_yaml("bogus: 1").is_err());
}

#[test]
fn blank_yaml_is_empty() {
    let r = Resources::from_yaml("  \n").unwrap();
    assert_eq!(r.count(Kind::Address), 0);
    let r = Resources::from_yaml("{}").unwrap();
    assert_eq!(r.count(Kind::Address), 0);
}

#[test]
fn upsert_replace_remove_and_raw() {
    let mut s = state();
    let upsert = "policies:\n- {name: p2, namespace: ns, scope: Global, action: Allow}\n";
    s.upsert(Resources::from_yaml(upsert).unwrap());
    assert_eq!(s.entries(Kind::Authorization).count(), 2);
    assert_eq!(s.entries(Kind::Address).count(), 3);

    s.put_raw(Kind::Address, "junk", vec![0xff, 0x01]);
    let raw = s.get(Kind::Address, "junk").unwrap();
    assert_eq!(raw.value, vec![0xff, 0x01]);
    assert_eq!(raw.origin, Origin::Raw);

    assert!(s.remove(Kind::Address, "junk"));
    assert!(!s.remove(Kind::Address, "junk"));

    s.replace(Resources::from_yaml(upsert).unwrap());
    assert_eq!(s.entries(Kind::Address).count(), 0);
    assert_eq!(
        s.resolve(Kind::Address, "/127.0.1.1").map(|e| &e.name),
        None
    );
    let summary = s.summary();
    assert_eq!(summary.authorization.resources.len(), 1);
    assert!(summary.authorization.resources.contains_key("ns/p2"));
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.yaml");
    std::fs::write(
        &path,
        "workloads:\n- {uid: a, name: a, namespace: n}\n- {uid: a, name: a, namespace: n}\n",
    )
    .unwrap();
    let err = Resources::from_file(&path).unwrap_err().to_string();
    assert!(err.contains("state.yaml"), "{err}");
    let err = Resources::from_file(&dir.path().join("missing.yaml"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("missing.yaml"), "{err}");
}

#[test]
fn changes_since_names_what_changed_within_one_history() {
    let s = state();
    let echo = "cluster1//v1/Pod/default/echo";
    assert_eq!(
        s.changes_since(Kind::Address, s.id()),
        Some(BTreeSet::new())
    );
    let mut next = s.clone();
    assert_eq!(next.id(), s.id(), "clones share the id");
    assert!(next.remove(Kind::Address, echo));
    next.put_raw(Kind::Authorization, "default/raw", vec![1]);
    assert_ne!(next.id(), s.id());
    let changed = next.changes_since(Kind::Address, s.id()).unwrap();
    assert_eq!(changed, BTreeSet::from([echo.to_owned()]));
    let changed = next.changes_since(Kind::Authorization, s.id()).unwrap();
    assert_eq!(changed, BTreeSet::from(["default/raw".to_owned()]));
    // Moving 127.0.1.1 off the client makes the VIP holder (the service) answer to it again.
    let moved = "workloads:\n- {uid: \"cluster1//v1/Pod/default/client\", name: client, \
                 namespace: default, workloadIps: [\"127.0.1.2\"]}\n";
    let mut moved_state = s.clone();
    moved_state.upsert(Resources::from_yaml(moved).unwrap());
    let changed = moved_state.changes_since(Kind::Address, s.id()).unwrap();
    assert!(changed.contains("cluster1//v1/Pod/default/client"));
    assert!(changed.contains("default/echo.default.svc.cluster.local"));
    // Another history, a diverged branch, or a replaced state: unknown, so a full diff.
    assert_eq!(next.changes_since(Kind::Address, state().id()), None);
    assert_eq!(next.changes_since(Kind::Address, moved_state.id()), None);
    let mut replaced = next.clone();
    replaced.replace(Resources::default());
    assert_eq!(replaced.changes_since(Kind::Address, next.id()), None);
}
