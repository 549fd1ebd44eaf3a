//! The xDS client against the real xds-testserver over real sockets: initial sync, live changes,
//! per-resource NACKs, restart with resume, credentials and TLS failures, readiness, on-demand.

use std::time::Duration;

use l4mesh::config::{Config, RootCa, Source, XdsSettings};
use l4mesh::model::{NetworkAddr, PolicyKey};
use xds_testserver::{Handle, Kind, StateSource};

use super::harness::*;

/// A mesh on 127.<n>.0.0/16: VIP 127.<n>.10.1:80 → the given endpoints, plus one policy.
fn state(n: u8, endpoints: &[(&str, u8, u16)]) -> String {
    let mut y = String::from("workloads:\n");
    for (name, x, port) in endpoints {
        y += &format!(
            "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  workloadIps: [\"127.{n}.1.{x}\"]\n  protocol: TCP\n  services:\n    \"default/echo.default.svc.cluster.local\": {{ 80: {port} }}\n"
        );
    }
    y += &format!(
        "services:\n- name: echo\n  namespace: default\n  hostname: echo.default.svc.cluster.local\n  vips: [\"/127.{n}.10.1\"]\n  ports: {{ 80: 8080 }}\n"
    );
    y += "policies:\n- name: deny-9999\n  namespace: default\n  scope: Namespace\n  action: Deny\n  rules: [[[ { destinationPorts: [9999] } ]]]\n";
    y
}

async fn testserver(yaml: &str) -> Handle {
    Handle::start(xds_testserver::Config::new(StateSource::Yaml(
        yaml.to_owned(),
    )))
    .await
    .unwrap()
}

fn xds_config(ip: &str, settings: XdsSettings) -> Config {
    let mut c = Config::local(ip.parse().unwrap());
    c.source = Source::Xds(settings);
    c.connect_timeout = Duration::from_secs(2);
    c
}

async fn start(config: &Config) -> l4mesh::app::Running {
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    l4mesh::app::start(config).await.unwrap()
}

async fn ready(r: &l4mesh::app::Running) {
    tokio::time::timeout(Duration::from_secs(10), r.readiness.wait())
        .await
        .unwrap_or_else(|_| panic!("not ready: waiting for {:?}", r.readiness.pending()));
}

/// Polls `cond` on the store for up to 10 s.
async fn eventually(
    r: &l4mesh::app::Running,
    what: &str,
    cond: impl Fn(&l4mesh::store::Snapshot) -> bool,
) {
    for _ in 0..200 {
        if cond(&r.store.load()) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tokio::time::timeout(TIMEOUT, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    (code, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_and_live_changes() {
    let _a = Backend::start("127.31.1.1:18080", "a").await;
    let _b = Backend::start("127.31.1.2:18080", "b").await;
    let ts = testserver(&state(31, &[("a", 1, 18080)])).await;
    let r = start(&xds_config(
        "127.31.0.1",
        XdsSettings::plaintext(&format!("http://{}", ts.addr())),
    ))
    .await;
    ready(&r).await;
    let snap = r.store.load();
    assert_eq!(
        snap.counts(),
        (1, 1, 1),
        "one workload, one service, one policy"
    );
    drop(snap);
    let s = socks5_connect(r.socks5.unwrap(), "127.31.10.1", 80)
        .await
        .unwrap();
    assert_eq!(exchange(s, "1").await, "a:1");

    // Re-point the VIP to b: pushed, applied, new connections follow.
    ts.set_state_yaml(&state(31, &[("b", 2, 18080)])).unwrap();
    eventually(&r, "workload a replaced by b", |s| {
        s.workload_by_addr(&NetworkAddr::new("", "127.31.1.2".parse().unwrap()))
            .is_some()
            && s.workload_by_addr(&NetworkAddr::new("", "127.31.1.1".parse().unwrap()))
                .is_none()
    })
    .await;
    let s = socks5_connect(r.socks5.unwrap(), "127.31.10.1", 80)
        .await
        .unwrap();
    assert_eq!(exchange(s, "2").await, "b:2");

    // Removals of each kind.
    assert!(ts.remove(Kind::Authorization, "default/deny-9999"));
    eventually(&r, "policy removed", |s| {
        s.policy(&PolicyKey("default/deny-9999".into())).is_none()
    })
    .await;
    assert!(ts.remove(Kind::Address, "default/echo.default.svc.cluster.local"));
    eventually(&r, "service removed", |s| s.counts().1 == 0).await;
    // The VIP is now outside the mesh: passthrough to 127.31.10.1:80, where nothing listens.
    assert_eq!(
        socks5_connect(r.socks5.unwrap(), "127.31.10.1", 80)
            .await
            .unwrap_err(),
        5
    );

    // Every response was ACKed.
    let clients = ts.clients();
    assert_eq!(clients.len(), 1);
    assert!(ts.nacks().is_empty(), "{:?}", ts.nacks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resource_is_nacked_by_name_and_the_rest_applies() {
    let ts = testserver(&state(32, &[("a", 1, 18080)])).await;
    // A workload with a 5-byte address, and bytes that are not protobuf at all: both in the
    // initial response, next to the good resources.
    use prost::Message;
    let bad = l4mesh::proto::istio::workload::Address {
        r#type: Some(l4mesh::proto::istio::workload::address::Type::Workload(
            l4mesh::proto::istio::workload::Workload {
                uid: "cluster1//v1/Pod/default/bad".into(),
                name: "bad".into(),
                namespace: "default".into(),
                addresses: vec![vec![127, 32, 1, 9, 9]],
                ..Default::default()
            },
        )),
    };
    ts.push_raw(
        Kind::Address,
        "cluster1//v1/Pod/default/bad",
        bad.encode_to_vec(),
    );
    ts.push_raw(Kind::Address, "garbage", vec![0xff, 0x01, 0x02]);
    let r = start(&xds_config(
        "127.32.0.1",
        XdsSettings::plaintext(&format!("http://{}", ts.addr())),
    ))
    .await;
    ready(&r).await;
    assert_eq!(
        r.store.load().counts(),
        (1, 1, 1),
        "the good resources applied"
    );
    let mut nacks = ts.nacks();
    for _ in 0..100 {
        if !nacks.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        nacks = ts.nacks();
    }
    assert!(!nacks.is_empty(), "the bad resources must be NACKed");
    let msg = &nacks[0].nack.message;
    assert!(
        msg.contains("cluster1//v1/Pod/default/bad") && msg.contains("addresses[0]"),
        "{msg}"
    );
    assert!(msg.contains("garbage"), "{msg}");
    assert_eq!(
        r.xds_metrics
            .as_ref()
            .unwrap()
            .nacks
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );

    // A later fix of the bad resource is accepted.
    ts.upsert_yaml("workloads:\n- uid: cluster1//v1/Pod/default/bad\n  name: bad\n  namespace: default\n  workloadIps: [\"127.32.1.9\"]\n")
        .unwrap();
    eventually(&r, "fixed workload applied", |s| s.counts().0 == 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn testserver_restart_resumes_and_converges() {
    let _a = Backend::start("127.33.1.1:18080", "a").await;
    let _c = Backend::start("127.33.1.3:18080", "c").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("state.yaml");
    std::fs::write(&file, state(33, &[("a", 1, 18080), ("b", 2, 18080)])).unwrap();
    let mut tsc = xds_testserver::Config::new(StateSource::File(file.clone()));
    tsc.admin_listen = None;
    let ts = Handle::start(tsc.clone()).await.unwrap();
    let addr = ts.addr();
    let r = start(&xds_config(
        "127.33.0.1",
        XdsSettings::plaintext(&format!("http://{addr}")),
    ))
    .await;
    ready(&r).await;
    assert_eq!(r.store.load().counts(), (2, 1, 1));

    // A connection opened before the restart, finished after it.
    let long = socks5_connect(r.socks5.unwrap(), "127.33.1.1", 18080)
        .await
        .unwrap();

    ts.shutdown().await;
    // Control plane gone: traffic flows on the last known state.
    let s = socks5_connect(r.socks5.unwrap(), "127.33.1.1", 18080)
        .await
        .unwrap();
    assert_eq!(exchange(s, "down").await, "a:down");

    // The file changes while the server is down: b removed, c added, the policy removed.
    let mut new_state = state(33, &[("a", 1, 18080), ("c", 3, 18080)]);
    new_state.truncate(new_state.find("policies:").unwrap());
    std::fs::write(&file, &new_state).unwrap();
    tsc.listen = addr;
    let ts = Handle::start(tsc).await.unwrap();
    eventually(&r, "exactly the new state", |s| {
        let ip = |x: &str| NetworkAddr::new("", x.parse().unwrap());
        s.counts() == (2, 1, 0)
            && s.workload_by_addr(&ip("127.33.1.3")).is_some()
            && s.workload_by_addr(&ip("127.33.1.2")).is_none()
    })
    .await;
    assert_eq!(exchange(long, "long").await, "a:long");
    // The client resumed: the reconnect declared what it held, so unchanged resources were not
    // sent again (the Address responses since reconnect carry only c and the removals).
    let clients = ts.clients();
    let info = clients
        .iter()
        .find(|c| c.connected)
        .expect("a connected client");
    let addr_info = &info.types[&Kind::Address];
    assert!(addr_info.nacks.is_empty());
    assert_eq!(addr_info.held, 3, "a, c and the service held after resume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_trust_failures_back_off_without_crashing() {
    let dir = tempfile::tempdir().unwrap();
    let mut tsc = xds_testserver::Config::new(StateSource::Yaml(state(34, &[])));
    tsc.tls = Some(xds_testserver::TlsConfig::default());
    tsc.token = Some("s3cret".into());
    let ts = Handle::start(tsc).await.unwrap();
    let root = ts.root_cert_pem().unwrap();
    let url = format!("https://127.0.0.1:{}", ts.addr().port());

    // Wrong token: refused, retried with backoff, not ready, no crash.
    let bad_token = dir.path().join("bad-token");
    std::fs::write(&bad_token, "nope\n").unwrap();
    let mut s = XdsSettings::plaintext(&url);
    s.root_ca = Some(RootCa::Pem(root.clone()));
    s.auth_token = Some(bad_token);
    let r = start(&xds_config("127.34.0.1", s.clone())).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!r.readiness.is_ready());
    let m = r.xds_metrics.clone().unwrap();
    let unauth = m
        .terminations
        .lock()
        .unwrap()
        .get("unauthenticated")
        .copied()
        .unwrap_or(0);
    assert!(unauth >= 2, "expected repeated refusals, got {unauth}");
    assert!(
        unauth <= 12,
        "expected exponential backoff, got {unauth} attempts in 2 s"
    );
    let (code, body) = http_get(r.readiness_addr.unwrap(), "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("xDS type.googleapis.com/istio.workload.Address"),
        "{body}"
    );
    drop(r);

    // Untrusted server certificate: a connect error, no crash.
    let other = Handle::start({
        let mut c = xds_testserver::Config::new(StateSource::Yaml(String::new()));
        c.tls = Some(xds_testserver::TlsConfig::default());
        c
    })
    .await
    .unwrap();
    let good_token = dir.path().join("token");
    std::fs::write(&good_token, "s3cret").unwrap();
    let mut untrusted = s.clone();
    untrusted.root_ca = Some(RootCa::Pem(other.root_cert_pem().unwrap()));
    untrusted.auth_token = Some(good_token.clone());
    let r = start(&xds_config("127.34.0.2", untrusted)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!r.readiness.is_ready());
    let m = r.xds_metrics.clone().unwrap();
    assert!(
        m.terminations
            .lock()
            .unwrap()
            .get("connect")
            .copied()
            .unwrap_or(0)
            >= 1
    );
    drop(r);

    // Right token and root (from a file): ready.
    let root_file = dir.path().join("root.pem");
    std::fs::write(&root_file, &root).unwrap();
    let mut good = s;
    good.root_ca = Some(RootCa::File(root_file));
    good.auth_token = Some(good_token);
    let r = start(&xds_config("127.34.0.3", good)).await;
    ready(&r).await;
    let (code, body) = http_get(r.readiness_addr.unwrap(), "/healthz/ready").await;
    assert_eq!((code, body.trim()), (200, "ready"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_resolves_an_unknown_ip() {
    let backend = Backend::start("127.35.1.1:0", "w").await;
    let ts = testserver(&state(35, &[("w", 1, backend.addr.port())])).await;
    let mut s = XdsSettings::plaintext(&format!("http://{}", ts.addr()));
    s.on_demand = true;
    let r = start(&xds_config("127.35.0.1", s)).await;
    ready(&r).await;
    let ip = NetworkAddr::new("", "127.35.1.1".parse().unwrap());
    assert!(
        r.store.load().workload_by_addr(&ip).is_none(),
        "on demand: nothing before asking"
    );
    let conn = socks5_connect(r.socks5.unwrap(), "127.35.1.1", backend.addr.port())
        .await
        .unwrap();
    assert_eq!(exchange(conn, "od").await, "w:od");
    let snap = r.store.load();
    let w = snap
        .workload_by_addr(&ip)
        .expect("resolved through the control plane");
    assert_eq!(w.name, "w");
    assert_eq!(snap.counts().0, 1, "only what was asked for");
}

/// Issue 14, item 7: a connection to an address the control plane does not know waits the
/// on-demand timeout once; repeat connections to it pass through at once (negative cache), and
/// a flood of distinct unknown addresses never blocks the data path longer than the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_does_not_wait_twice_for_an_unknown_address() {
    let backend = Backend::start("127.35.2.9:0", "outside").await;
    let ts = testserver(&state(37, &[])).await;
    let mut s = XdsSettings::plaintext(&format!("http://{}", ts.addr()));
    s.on_demand = true;
    s.on_demand_timeout = Duration::from_millis(1500);
    let r = start(&xds_config("127.35.2.1", s)).await;
    ready(&r).await;
    let port = backend.addr.port();
    let t0 = std::time::Instant::now();
    let conn = socks5_connect(r.socks5.unwrap(), "127.35.2.9", port)
        .await
        .unwrap();
    assert_eq!(exchange(conn, "1").await, "outside:1");
    let first = t0.elapsed();
    assert!(
        first >= Duration::from_millis(700),
        "the first waits: {first:?}"
    );
    for i in 0..5 {
        let t = std::time::Instant::now();
        let conn = socks5_connect(r.socks5.unwrap(), "127.35.2.9", port)
            .await
            .unwrap();
        assert_eq!(exchange(conn, &i.to_string()).await, format!("outside:{i}"));
        assert!(
            t.elapsed() < Duration::from_millis(700),
            "repeat {i} waited {:?}",
            t.elapsed()
        );
    }
    // Many distinct unknown addresses at once: each waits at most the timeout, together.
    let t = std::time::Instant::now();
    let mut tasks = Vec::new();
    for i in 0..64u8 {
        let socks = r.socks5.unwrap();
        tasks.push(tokio::spawn(async move {
            // Nothing listens there: refused, after the on-demand wait.
            socks5_connect(socks, &format!("127.35.3.{}", i + 1), 9).await
        }));
    }
    for t in tasks {
        assert!(t.await.unwrap().is_err());
    }
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_waits_for_the_control_plane() {
    // Reserve a port for a control plane that starts later.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let r = start(&xds_config("127.36.0.1", XdsSettings::plaintext(&url))).await;
    let (code, body) = http_get(r.readiness_addr.unwrap(), "/healthz/ready").await;
    assert_eq!(code, 503);
    assert!(
        body.contains("Authorization") && body.contains("Address"),
        "{body}"
    );
    // Listeners do not serve before ready: a SOCKS5 handshake gets no answer yet.
    let pending = tokio::spawn(socks5_connect(r.socks5.unwrap(), "127.36.1.1", 1));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pending.is_finished(),
        "the listener answered before the state was known"
    );

    let mut tsc = xds_testserver::Config::new(StateSource::Yaml(state(36, &[])));
    tsc.listen = format!("127.0.0.1:{port}").parse().unwrap();
    let _ts = Handle::start(tsc).await.unwrap();
    ready(&r).await;
    let (code, _) = http_get(r.readiness_addr.unwrap(), "/healthz/ready").await;
    assert_eq!(code, 200);
    // The queued connection is now served (nothing listens at the destination: refused).
    let res = tokio::time::timeout(TIMEOUT, pending)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(res.unwrap_err(), 5);
}
