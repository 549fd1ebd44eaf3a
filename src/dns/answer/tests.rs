use super::*;

const MESH: &str = r#"
workloads:
- { uid: w/db-0, name: db-0, namespace: default, serviceAccount: db, workloadIps: ["10.1.0.10", "fd01::10"],
    services: { "default/db.default.svc.cluster.local": { 5432: 5432 } } }
- { uid: w/db-1, name: db-1, namespace: default, serviceAccount: db, workloadIps: ["10.1.0.11"],
    services: { "default/db.default.svc.cluster.local": { 5432: 5432 } } }
- { uid: w/db-2, name: db-2, namespace: default, serviceAccount: db, workloadIps: ["10.1.0.12"], status: Unhealthy,
    services: { "default/db.default.svc.cluster.local": { 5432: 5432 } } }
- { uid: w/db-3, name: db-3, namespace: default, serviceAccount: db, workloadIps: ["10.1.0.13"], network: far,
    services: { "default/db.default.svc.cluster.local": { 5432: 5432 } } }
services:
- name: echo
  namespace: default
  hostname: echo.default.svc.cluster.local
  vips: ["/10.9.0.1", "/fd00::1"]
  ports: { 80: 8080 }
- name: api
  namespace: other
  hostname: api.other.svc.cluster.local
  vips: ["/10.9.0.2"]
  ports: { 80: 8080 }
- name: wild
  namespace: default
  hostname: "*.example.com"
  vips: ["/10.9.0.3"]
  ports: { 80: 8080 }
- name: wilder
  namespace: default
  hostname: "*.deep.example.com"
  vips: ["/10.9.0.4"]
  ports: { 80: 8080 }
- name: se
  namespace: default
  hostname: db.external.test
  vips: ["/10.9.0.5"]
  ports: { 5432: 5432 }
- name: novip
  namespace: default
  hostname: dns-only.external.test
  ports: { 443: 443 }
- name: faraway
  namespace: default
  hostname: far.external.test
  vips: ["far/10.9.0.6"]
  ports: { 443: 443 }
- name: db
  namespace: default
  hostname: db.default.svc.cluster.local
  ports: { 5432: 5432 }
- name: shared-a
  namespace: a
  hostname: shared.test
  vips: ["/10.9.1.1"]
  ports: { 80: 80 }
- name: shared-b
  namespace: b
  hostname: shared.test
  vips: ["/10.9.1.2"]
  ports: { 80: 80 }
- name: shared-c
  namespace: c
  hostname: shared.test
  vips: ["/10.9.1.3"]
  ports: { 80: 80 }
- name: private
  namespace: other
  hostname: private.other.svc.cluster.local
  vips: ["/10.9.0.7"]
  ports: { 80: 80 }
  visibility: Namespace
"#;

fn snapshot_of(yaml: &str) -> std::sync::Arc<Snapshot> {
    let store = crate::store::Store::new();
    store.apply(crate::localconfig::parse(yaml).unwrap());
    store.load()
}

fn snapshot() -> std::sync::Arc<Snapshot> {
    snapshot_of(MESH)
}

const C: Client<'static> = Client {
    namespace: Some("default"),
    network: "",
    search: None,
};

fn rules() -> NameRules {
    NameRules {
        headless_pods: true,
        ..NameRules::new("cluster.local")
    }
}

fn get(s: &Snapshot, q: &str, c: Client<'_>) -> Option<Found> {
    lookup(s, q, c, &rules())
}

fn ips(f: &Found) -> Vec<String> {
    let mut v: Vec<String> = f.addrs.iter().map(ToString::to_string).collect();
    v.sort();
    v
}

#[test]
fn canonical_names_answer_every_address() {
    let s = snapshot();
    let f = get(&s, "echo.default.svc.cluster.local", C).unwrap();
    assert!(!f.alias);
    assert_eq!(ips(&f), ["10.9.0.1", "fd00::1"]);
    let f = get(&s, "db.external.test", C).unwrap();
    assert_eq!(ips(&f), ["10.9.0.5"]);
    // Unknown client: only exact names.
    let anon = Client {
        namespace: None,
        network: "",
        search: None,
    };
    assert!(get(&s, "echo.default.svc.cluster.local", anon).is_some());
    assert!(get(&s, "echo.default.default.svc.cluster.local", anon).is_none());
}

#[test]
fn search_domains_are_stripped_and_answered_as_aliases() {
    let s = snapshot();
    // The resolver appended a search domain: a CNAME to the name without it (ztunnel's answer).
    for (q, stripped) in [
        // `echo.default` from a pod of `default`: the first search domain appended.
        ("echo.default.default.svc.cluster.local", "echo.default"),
        // `echo.default.svc` with `svc.cluster.local` appended by the resolver.
        ("echo.default.svc.svc.cluster.local", "echo.default.svc"),
        // The full name with a search domain appended (ndots).
        (
            "echo.default.svc.cluster.local.default.svc.cluster.local",
            "echo.default.svc.cluster.local",
        ),
        // Another namespace's service by `<name>.<namespace>`.
        ("api.other.default.svc.cluster.local", "api.other"),
    ] {
        let f = get(&s, q, C).unwrap_or_else(|| panic!("{q}"));
        assert_eq!((f.canonical.as_str(), f.alias), (stripped, true), "{q}");
    }
    // A short name resolves only in the client's own namespace.
    assert!(get(&s, "api.default.svc.cluster.local", C).is_none());
    // Partial names asked as they are (no search list on the client): answered under that name.
    for q in ["echo", "echo.default", "echo.default.svc"] {
        let f = get(&s, q, C).unwrap_or_else(|| panic!("{q}"));
        assert_eq!((f.canonical.as_str(), f.alias), (q, false));
        assert_eq!(ips(&f), ["10.9.0.1", "fd00::1"]);
    }
    // Dedicated mode: the pod's own search list (here none: nothing is stripped).
    let none: &[String] = &[];
    let bare = Client {
        search: Some(none),
        ..C
    };
    assert!(get(&s, "echo.default.default.svc.cluster.local", bare).is_none());
    assert!(
        get(&s, "echo", bare).is_some(),
        "partial names still complete"
    );
    let custom = ["corp.example".to_owned()];
    let corp = Client {
        search: Some(&custom),
        ..C
    };
    let f = get(&s, "echo.default.corp.example", corp).unwrap();
    assert_eq!((f.canonical.as_str(), f.alias), ("echo.default", true));
    // Not a mesh name: forwarded.
    assert!(get(&s, "example.org", C).is_none());
    assert!(get(&s, "nope.default.svc.cluster.local", C).is_none());
}

#[test]
fn wildcards_match_below_them_the_most_specific_first() {
    let s = snapshot();
    let f = get(&s, "a.example.com", C).unwrap();
    assert_eq!(
        (f.canonical.as_str(), f.alias, ips(&f)),
        ("a.example.com", false, vec!["10.9.0.3".to_owned()])
    );
    let f = get(&s, "x.deep.example.com", C).unwrap();
    assert_eq!(ips(&f), ["10.9.0.4"]);
    let f = get(&s, "a.b.c.example.com", C).unwrap();
    assert_eq!(ips(&f), ["10.9.0.3"]);
    // The wildcard's own base name is not below it.
    assert!(get(&s, "example.com", C).is_none());
}

#[test]
fn services_without_an_address_here() {
    let s = snapshot();
    // No VIP at all and not a Kubernetes service: left to the upstream resolvers.
    assert!(get(&s, "dns-only.external.test", C).is_none());
    // VIPs on another network only: the name exists, with nothing to answer (NOERROR, empty).
    let f = get(&s, "far.external.test", C).unwrap();
    assert!(f.addrs.is_empty());
    let far = Client {
        namespace: Some("default"),
        network: "far",
        search: None,
    };
    assert_eq!(
        ips(&get(&s, "far.external.test", far).unwrap()),
        ["10.9.0.6"]
    );
}

#[test]
fn headless_services_answer_their_healthy_endpoints_and_pods() {
    let s = snapshot();
    // Healthy endpoints on the client's network, the first address of each family.
    let f = get(&s, "db.default.svc.cluster.local", C).unwrap();
    assert_eq!(ips(&f), ["10.1.0.10", "10.1.0.11", "fd01::10"]);
    // Its short name, answered under that name.
    let f = get(&s, "db", C).unwrap();
    assert_eq!((f.canonical.as_str(), f.alias), ("db", false));
    // One pod of it by name.
    let f = get(&s, "db-1.db.default.svc.cluster.local", C).unwrap();
    assert_eq!((f.alias, ips(&f)), (false, vec!["10.1.0.11".to_owned()]));
    // Its partial names, asked as they are (under that name) and through the search list (a
    // CNAME to the name without the search domain).
    for (q, canonical) in [
        ("db-0.db", "db-0.db"),
        ("db-0.db.default", "db-0.db.default"),
        ("db-0.db.default.svc", "db-0.db.default.svc"),
        (
            "db-0.db.default.default.svc.cluster.local",
            "db-0.db.default",
        ),
        (
            "db-0.db.default.svc.cluster.local",
            "db-0.db.default.svc.cluster.local",
        ),
    ] {
        let f = get(&s, q, C).unwrap_or_else(|| panic!("{q}"));
        assert_eq!(f.canonical, canonical, "{q}");
        assert_eq!(ips(&f), ["10.1.0.10", "fd01::10"], "{q}");
    }
    // Off (the default, as the ztunnel release compared with): forwarded.
    let plain = NameRules::new("cluster.local");
    assert!(lookup(&s, "db-1.db.default.svc.cluster.local", C, &plain).is_none());
    assert!(lookup(&s, "db.default.svc.cluster.local", C, &plain).is_some());
    // Not a pod of it, unhealthy, or on another network: not answered here.
    for q in [
        "db-9.db.default.svc.cluster.local",
        "db-2.db.default.svc.cluster.local",
        "db-3.db.default.svc.cluster.local",
    ] {
        assert!(get(&s, q, C).is_none(), "{q}");
    }
}

#[test]
fn a_shared_hostname_is_the_clients_namespace_then_canonical_then_preferred_then_oldest() {
    let s = snapshot();
    let from = |ns: &'static str| Client {
        namespace: Some(ns),
        network: "",
        search: None,
    };
    let one = |s: &Snapshot, c, r: &NameRules| ips(&lookup(s, "shared.test", c, r).unwrap());
    assert_eq!(one(&s, from("b"), &rules()), ["10.9.1.2"]);
    assert_eq!(one(&s, from("c"), &rules()), ["10.9.1.3"]);
    // From elsewhere: the oldest, unless one namespace is preferred.
    assert_eq!(one(&s, from("default"), &rules()), ["10.9.1.1"]);
    let preferred = NameRules {
        preferred_namespace: Some("c".into()),
        ..rules()
    };
    assert_eq!(one(&s, from("default"), &preferred), ["10.9.1.3"]);
    // A canonical service beats the preferred namespace.
    let s = snapshot_of(&MESH.replace(
        "  namespace: b\n  hostname: shared.test\n",
        "  namespace: b\n  hostname: shared.test\n  canonical: true\n",
    ));
    assert_eq!(one(&s, from("default"), &preferred), ["10.9.1.2"]);
    assert_eq!(one(&s, from("a"), &preferred), ["10.9.1.1"]);
}

#[test]
fn visibility_is_respected_only_when_asked() {
    let s = snapshot();
    // ztunnel's default: every client resolves every service.
    assert!(get(&s, "private.other.svc.cluster.local", C).is_some());
    let strict = NameRules {
        respect_visibility: true,
        ..rules()
    };
    assert!(lookup(&s, "private.other.svc.cluster.local", C, &strict).is_none());
    let own = Client {
        namespace: Some("other"),
        network: "",
        search: None,
    };
    assert!(lookup(&s, "private.other.svc.cluster.local", own, &strict).is_some());
    assert!(lookup(&s, "private", own, &strict).is_some());
    // Public services are unaffected.
    assert!(lookup(&s, "api.other.svc.cluster.local", C, &strict).is_some());
}
