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
    assert!(v["store_version"].as_u64().unwrap() >= 1);
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
