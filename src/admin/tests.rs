use super::*;

fn state() -> AdminState {
    let store = Arc::new(Store::new());
    let batch = crate::localconfig::parse(crate::localconfig::EMBEDDED_DEFAULT).unwrap();
    store.apply(batch);
    let ca = crate::identity::LocalCa::generate("cluster.local").unwrap();
    AdminState {
        token: None,
        store,
        secrets: SecretManager::new(crate::identity::CaClient::Local {
            ca: Arc::new(ca),
            ttl: Duration::from_secs(3600),
        }),
        config: serde_json::json!({"node_name": "n1"}),
        xds: Some(Arc::new(XdsMetrics::default())),
        drain: Drain::new(),
        deadline: Duration::from_secs(5),
        pods: None,
        handoff_socket: None,
        predecessor: None,
    }
}

fn body(r: Response<Full<Bytes>>) -> (StatusCode, String) {
    use http_body_util::BodyExt;
    let status = r.status();
    let bytes = futures_now(r.into_body().collect()).unwrap().to_bytes();
    (status, String::from_utf8(bytes.to_vec()).unwrap())
}

/// A `Full` body is ready at once.
fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

fn req(method: Method, uri: &str) -> Request<()> {
    Request::builder().method(method).uri(uri).body(()).unwrap()
}

#[test]
fn config_dump_has_every_section() {
    let s = state();
    let (status, b) = body(route(&req(Method::GET, "/config_dump"), &s));
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let names: Vec<&str> = v["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert!(!names.is_empty(), "{b}");
    assert_eq!(
        v["services"][0]["hostname"],
        "echo.default.svc.cluster.local"
    );
    assert!(v["policies"].is_array());
    assert!(v["certificates"].is_array());
    assert_eq!(v["config"]["node_name"], "n1");
    assert_eq!(v["xds"]["connected"], false);
    assert!(v["storeVersion"].as_u64().unwrap() >= 1);
}

#[test]
fn unknown_paths_and_methods_list_the_endpoints() {
    let s = state();
    let (status, b) = body(route(&req(Method::GET, "/stats"), &s));
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(b.contains("/stats") && b.contains("/config_dump"), "{b}");
    assert!(b.contains("/quitquitquit") && b.contains("/logging"), "{b}");
    let (status, b) = body(route(&req(Method::GET, "/quitquitquit"), &s));
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(b.contains("GET is not allowed"), "{b}");
    assert!(!s.drain.signal().is_draining(), "a GET must not drain");
}

#[test]
fn profile_durations_and_methods() {
    use std::time::Duration;
    assert_eq!(pprof::seconds(None), Ok(Duration::from_secs(10)));
    assert_eq!(
        pprof::seconds(Some("seconds=3")),
        Ok(Duration::from_secs(3))
    );
    for bad in [
        "seconds=0",
        "seconds=61",
        "seconds=-1",
        "seconds=1.5",
        "seconds=",
    ] {
        let e = pprof::seconds(Some(bad)).unwrap_err();
        assert!(e.contains("from 1 to 60"), "{bad}: {e}");
    }
    let s = state();
    for path in ["/debug/pprof/profile", "/debug/pprof/heap"] {
        let (status, b) = body(route(&req(Method::POST, path), &s));
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert!(b.contains("/debug/pprof/heap"), "{b}");
    }
}

#[test]
fn quitquitquit_starts_the_drain_once() {
    let s = state();
    let (status, b) = body(route(&req(Method::POST, "/quitquitquit"), &s));
    assert_eq!(status, StatusCode::OK);
    assert!(b.contains("draining"), "{b}");
    assert!(s.drain.signal().is_draining());
    let (_, b) = body(route(&req(Method::POST, "/quitquitquit"), &s));
    assert!(b.contains("already draining"), "{b}");
}

#[test]
fn logging_refuses_unknown_parameters_and_get_changes() {
    let (status, b) = body(logging::answer(&Method::POST, Some("lvl=debug")));
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(b.contains("\"lvl\""), "{b}");
    let (status, _) = body(logging::answer(&Method::GET, Some("level=debug")));
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
}

#[test]
fn timestamps() {
    assert_eq!(config_dump::rfc3339(0), "1970-01-01T00:00:00Z");
    assert_eq!(config_dump::rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    assert_eq!(config_dump::rfc3339(1_798_761_599), "2026-12-31T23:59:59Z");
}

#[test]
fn mutating_endpoints_need_the_token_when_one_is_set() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "  0123456789abcdef-secret\n").unwrap();
    let mut s = state();
    s.token = Some(AdminToken::read(&path).unwrap());
    let with = |method: Method, uri: &str, auth: Option<&str>| {
        let mut b = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        body(route(&b.body(()).unwrap(), &s))
    };
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer 0123456789abcdef-secreT"),
        Some("0123456789abcdef-secret"),
    ] {
        let (code, text) = with(Method::POST, "/quitquitquit", auth);
        assert_eq!(code, StatusCode::UNAUTHORIZED, "{auth:?}");
        assert!(text.contains("L4MESH_ADMIN_TOKEN_FILE"), "{text}");
        assert_eq!(
            with(Method::POST, "/logging?level=debug", auth).0,
            StatusCode::UNAUTHORIZED
        );
    }
    assert!(
        !s.drain.signal().is_draining(),
        "a refused quit must not drain"
    );
    // Reading stays open; the right token passes.
    assert_eq!(with(Method::GET, "/config_dump", None).0, StatusCode::OK);
    let (code, _) = with(
        Method::POST,
        "/quitquitquit",
        Some("Bearer 0123456789abcdef-secret"),
    );
    assert_eq!(code, StatusCode::OK);
    assert!(s.drain.signal().is_draining());
    // A short or missing token file is a startup error naming it.
    std::fs::write(&path, "short").unwrap();
    let e = AdminToken::read(&path).err().unwrap().to_string();
    assert!(
        e.contains("at least 16") && e.contains("L4MESH_ADMIN_TOKEN_FILE"),
        "{e}"
    );
    let e = AdminToken::read(&dir.path().join("none"))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("could not read the admin token file"), "{e}");
}

/// ztunnel's own dump types (field names from its `Workload`, `Service`, `Authorization` and
/// `CertsDump`, which deny unknown fields): l4mesh's dump must read with them. Fields are read by
/// deserialisation itself (names and types), not all by the test.
#[allow(dead_code)]
mod ztunnel_types {
    use std::collections::BTreeMap;

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Workload {
        pub workload_ips: Vec<String>,
        pub waypoint: Option<Gateway>,
        pub network_gateway: Option<Gateway>,
        pub protocol: String,
        pub network_mode: String,
        pub uid: String,
        pub name: String,
        pub namespace: String,
        pub trust_domain: Option<String>,
        pub service_account: Option<String>,
        pub network: Option<String>,
        pub workload_name: Option<String>,
        pub workload_type: Option<String>,
        pub canonical_name: Option<String>,
        pub canonical_revision: Option<String>,
        pub hostname: Option<String>,
        pub node: Option<String>,
        pub native_tunnel: Option<bool>,
        pub application_tunnel: Option<AppTunnel>,
        pub authorization_policies: Option<Vec<String>>,
        pub status: String,
        pub cluster_id: String,
        pub locality: Option<Locality>,
        pub services: Option<Vec<String>>,
        pub capacity: u32,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Gateway {
        pub destination: String,
        pub hbone_mtls_port: u16,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct AppTunnel {
        pub protocol: String,
        pub port: Option<u16>,
    }

    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    pub struct Locality {
        pub region: String,
        pub zone: String,
        pub subzone: String,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Service {
        pub name: String,
        pub namespace: String,
        pub hostname: String,
        pub vips: Vec<String>,
        pub ports: BTreeMap<String, u16>,
        pub endpoints: BTreeMap<String, Endpoint>,
        pub subject_alt_names: Vec<String>,
        pub waypoint: Option<Gateway>,
        pub load_balancer: Option<LoadBalancer>,
        pub ip_families: Option<String>,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Endpoint {
        pub workload_uid: String,
        pub port: BTreeMap<String, u16>,
        pub status: String,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct LoadBalancer {
        pub routing_preferences: Vec<String>,
        pub mode: String,
        pub health_policy: String,
    }

    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    pub struct Policy {
        pub name: String,
        pub namespace: String,
        pub scope: String,
        pub action: String,
        pub rules: Vec<Vec<Vec<serde_json::Map<String, serde_json::Value>>>>,
        pub dry_run: bool,
    }
}

#[test]
fn config_dump_reads_with_ztunnels_field_names() {
    use ztunnel_types as zt;
    let s = state();
    s.store.apply(
        crate::localconfig::parse(
            r#"
workloads:
- uid: c//v1/Pod/ns1/web-1
  name: web-1
  namespace: ns1
  serviceAccount: web
  workloadIps: ["10.0.0.1", "fd00::1"]
  protocol: HBONE
  node: n1
  canonicalName: web
  locality: { region: r1, zone: z1, subzone: s1 }
  waypoint: { destination: "/10.0.0.9", hboneMtlsPort: 15008 }
  applicationTunnel: { protocol: PROXY, port: 15088 }
  services: { "ns1/web.ns1.svc.cluster.local": { 80: 8080 } }
services:
- name: web
  namespace: ns1
  hostname: web.ns1.svc.cluster.local
  vips: ["/10.96.0.1", "/10.1.0.0/16"]
  ports: { 80: 8080 }
  loadBalancer: { mode: Failover, routingPreferences: [Region, Zone] }
  ipFamilies: Dual
policies:
- name: p
  namespace: ns1
  scope: Namespace
  action: Deny
  rules: [[[ { principals: [!Prefix "cluster.local/ns/x", !Presence ""], serviceAccounts: [{namespace: a, serviceAccount: b}], destinationPorts: [9999] } ]]]
"#,
        )
        .unwrap(),
    );
    let (status, b) = body(route(&req(Method::GET, "/config_dump"), &s));
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&b).unwrap();
    let web = v["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "web-1")
        .unwrap();
    let w: zt::Workload = serde_json::from_value(web.clone()).unwrap();
    assert_eq!(w.workload_ips, ["10.0.0.1", "fd00::1"]);
    assert_eq!(
        (w.protocol.as_str(), w.status.as_str()),
        ("HBONE", "Healthy")
    );
    assert_eq!(w.waypoint.unwrap().destination, "/10.0.0.9");
    let t = w.application_tunnel.unwrap();
    assert_eq!((t.protocol.as_str(), t.port), ("PROXY", Some(15088)));
    assert_eq!(w.locality.unwrap().zone, "z1");
    assert_eq!(w.services.unwrap(), ["ns1/web.ns1.svc.cluster.local"]);
    let svc = v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap();
    let svc: zt::Service = serde_json::from_value(svc.clone()).unwrap();
    assert_eq!(svc.vips, ["/10.96.0.1", "/10.1.0.0/16"]);
    assert_eq!(svc.ports["80"], 8080);
    let ep = &svc.endpoints["c//v1/Pod/ns1/web-1"];
    assert_eq!((ep.port["80"], ep.status.as_str()), (8080, "Healthy"));
    let lb = svc.load_balancer.unwrap();
    assert_eq!(
        (lb.mode.as_str(), lb.routing_preferences.len()),
        ("Failover", 2)
    );
    assert_eq!(svc.ip_families.as_deref(), Some("Dual"));
    let p: zt::Policy = serde_json::from_value(v["policies"][0].clone()).unwrap();
    assert_eq!(
        (p.scope.as_str(), p.action.as_str(), p.dry_run),
        ("Namespace", "Deny", false)
    );
    let m = &p.rules[0][0][0];
    assert_eq!(
        m["principals"],
        serde_json::json!([{"Prefix": "cluster.local/ns/x"}, {"Presence": []}])
    );
    assert_eq!(
        m["serviceAccounts"],
        serde_json::json!([{"namespace": "a", "serviceAccount": "b"}])
    );
    assert_eq!(m["destinationPorts"], serde_json::json!([9999]));
    assert!(v["staticConfig"].is_null() && v["version"]["version"].is_string());
}
