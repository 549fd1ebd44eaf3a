//! The admin server: `/config_dump` follows xDS pushes and lists certificates with their expiry
//! (in-process, against the real xds-testserver); `/logging` changes the level of the real
//! binary at runtime and refuses a bad filter with a 400 that names it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xds_testserver::{Handle, StateSource};

use super::binary::{http, L4mesh};
use super::harness::{exchange, mesh_node, socks5_connect, Backend};

fn workload(name: &str, ip: &str, node: &str) -> String {
    format!(
        "- uid: cluster1//v1/Pod/default/{name}\n  name: {name}\n  namespace: default\n  serviceAccount: {name}\n  workloadIps: [\"{ip}\"]\n  protocol: HBONE\n  node: {node}\n"
    )
}

async fn config_dump(addr: std::net::SocketAddr) -> serde_json::Value {
    let (code, body) = http(addr, "GET", "/config_dump").await.unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn names(dump: &serde_json::Value) -> Vec<String> {
    dump["workloads"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_follows_an_xds_push_and_lists_certificates() {
    l4mesh::telemetry::init(l4mesh::telemetry::LogFormat::Plain);
    let mut c = xds_testserver::Config::new(StateSource::Yaml(format!(
        "workloads:\n{}",
        workload("a", "127.53.1.1", "node-a")
    )));
    c.listen = "127.53.0.100:0".parse().unwrap();
    let ts = Handle::start(c).await.unwrap();
    let node = mesh_node(&ts, "127.53.1.11", "node-a", "127.53.1.1").await;
    tokio::time::timeout(Duration::from_secs(10), node.readiness.wait())
        .await
        .unwrap();
    let admin = node.admin_addr.expect("the admin server is on by default");

    let dump = config_dump(admin).await;
    assert_eq!(names(&dump), vec!["a"]);
    assert_eq!(dump["config"]["node_name"], "node-a");
    assert_eq!(dump["xds"]["connected"], true, "{}", dump["xds"]);
    assert!(dump["xds"]["lastUpdate"].is_string(), "{}", dump["xds"]);
    let before = dump["storeVersion"].as_u64().unwrap();

    // The node's identity gets its certificate (asked as the workload appeared): listed with
    // its state and an expiry in the future.
    let id = "spiffe://cluster.local/ns/default/sa/a";
    let mut cert = serde_json::Value::Null;
    for _ in 0..100 {
        let dump = config_dump(admin).await;
        if let Some(c) = dump["certificates"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["identity"] == id && c["state"] == "Available")
        {
            cert = c.clone();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cert["state"], "Available", "no certificate for {id}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expiry = cert["expiry"].as_u64().unwrap();
    assert!(expiry > now && expiry <= now + 3600 + 60, "{cert}");
    assert!(
        cert["expirationTime"].as_str().unwrap().ends_with('Z'),
        "{cert}"
    );
    // ztunnel's shape: the leaf (and its roots) with PEM, serial and validity.
    let leaf = &cert["certChain"][0];
    assert_eq!(leaf["expirationTime"], cert["expirationTime"], "{cert}");
    assert!(leaf["validFrom"].as_str().unwrap().ends_with('Z'), "{cert}");
    let serial = leaf["serialNumber"].as_str().unwrap();
    assert!(
        !serial.is_empty() && serial.bytes().all(|b| b.is_ascii_digit()),
        "{cert}"
    );
    assert!(!cert["rootCerts"].as_array().unwrap().is_empty(), "{cert}");

    // A pushed workload shows up.
    ts.upsert_yaml(&format!(
        "workloads:\n{}",
        workload("pushed", "127.53.1.5", "node-x")
    ))
    .unwrap();
    // The store and the xDS counters are updated one after the other: wait for both.
    let held_two = |dump: &serde_json::Value| {
        dump["xds"]["resources"]
            .as_object()
            .is_some_and(|r| r.values().any(|n| n.as_u64() >= Some(2)))
    };
    let mut dump = config_dump(admin).await;
    for _ in 0..100 {
        if names(&dump).contains(&"pushed".to_owned()) && held_two(&dump) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        dump = config_dump(admin).await;
    }
    assert_eq!(names(&dump), vec!["a", "pushed"]);
    let pushed = &dump["workloads"][1];
    assert_eq!(pushed["workloadIps"][0], "127.53.1.5");
    assert_eq!(pushed["node"], "node-x");
    assert!(dump["storeVersion"].as_u64().unwrap() > before);
    assert!(
        dump["xds"]["resources"]
            .as_object()
            .unwrap()
            .values()
            .any(|n| n.as_u64() >= Some(2)),
        "{}",
        dump["xds"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_level_changes_at_runtime() {
    let backend = Backend::start("127.53.2.9:18080", "b").await;
    let node = L4mesh::spawn("127.53.2.1", &[]);
    node.ready().await;
    let dst = backend.addr;
    let via_socks = |msg: &'static str| async move {
        let s = socks5_connect(node.socks5, &dst.ip().to_string(), dst.port())
            .await
            .unwrap();
        exchange(s, msg).await
    };
    // A debug line of the outbound path ("outbound route") is not logged at info.
    assert_eq!(via_socks("one").await, "b:one");
    let access = [dst.to_string(), "connection complete".to_owned()];
    let access: Vec<&str> = access.iter().map(String::as_str).collect();
    assert!(node.wait_line(&access, Duration::from_secs(5)).await);
    assert_eq!(node.count(&["outbound route"]), 0, "{}", node.log());

    let (code, body) = http(node.admin, "GET", "/logging").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "log filter: info\n"));
    // A bad filter is refused and named; nothing changes.
    let (code, body) = http(node.admin, "POST", "/logging?level=l4mesh::proxy=loud")
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("\"loud\"") && body.contains("expected a level"),
        "{body}"
    );
    let (code, body) = http(node.admin, "POST", "/logging?level=chatty")
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("\"chatty\""), "{body}");

    // ztunnel's spelling target:level.
    let (code, body) = http(node.admin, "POST", "/logging?level=l4mesh::proxy:debug")
        .await
        .unwrap();
    assert_eq!(
        (code, body.as_str()),
        (200, "log filter: info,l4mesh::proxy=debug\n")
    );
    assert_eq!(via_socks("two").await, "b:two");
    assert!(
        node.wait_line(
            &["DEBUG", "outbound route", &dst.to_string()],
            Duration::from_secs(5)
        )
        .await,
        "{}",
        node.log()
    );
    // Back to the startup filter: debug lines stop.
    let (code, body) = http(node.admin, "POST", "/logging?reset").await.unwrap();
    assert_eq!((code, body.as_str()), (200, "log filter: info\n"));
    let seen = node.count(&["outbound route"]);
    let lines = node.count(&access);
    assert_eq!(via_socks("three").await, "b:three");
    // Wait for this connection's own access line (the earlier ones already match `access`).
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    while node.count(&access) <= lines {
        assert!(tokio::time::Instant::now() < until, "{}", node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(node.count(&["outbound route"]), seen, "{}", node.log());
}

/// One GET with a binary body (a profile takes seconds): the status and the body.
async fn get_bytes(addr: std::net::SocketAddr, path: &str) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out))
        .await
        .expect("answered within 30 s")
        .unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&out[..split]).into_owned();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, out[split + 4..].to_vec())
}

fn strings(p: &pprof::protos::Profile) -> Vec<&str> {
    p.string_table.iter().map(String::as_str).collect()
}

/// `/debug/pprof/profile` and `/debug/pprof/heap` of the real binary, read back as pprof
/// protobufs (the format `go tool pprof` reads): CPU samples taken while the process serves
/// requests, one profile at a time; jemalloc's heap profile when the binary starts with jemalloc
/// profiling on, and a 500 that says how to turn it on otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn profiles_are_pprof_protobufs() {
    use pprof::protos::Message;
    let conf = "prof:true,prof_active:true,lg_prof_sample:19";
    let profiled = L4mesh::spawn("127.53.3.1", &[("_RJEM_MALLOC_CONF", conf.into())]);
    let plain = L4mesh::spawn("127.53.3.2", &[]);
    profiled.ready().await;
    plain.ready().await;

    // Heap: gzipped pprof, in jemalloc_pprof's sample type, with samples.
    let (code, body) = get_bytes(profiled.admin, "/debug/pprof/heap").await;
    assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&body[..]), &mut raw).unwrap();
    let heap = pprof::protos::Profile::decode(&raw[..]).unwrap();
    let st = &heap.sample_type[0];
    let names = strings(&heap);
    assert_eq!(
        (names[st.ty as usize], names[st.unit as usize]),
        ("inuse_space", "bytes")
    );
    assert!(
        !heap.sample.is_empty(),
        "a running l4mesh has sampled allocations"
    );
    let (code, body) = get_bytes(plain.admin, "/debug/pprof/heap").await;
    assert_eq!(code, 500);
    assert!(String::from_utf8_lossy(&body).contains("_RJEM_MALLOC_CONF="));

    // CPU: two seconds while readiness is polled hard; a second profile meanwhile is refused.
    // Polled from three tasks, and taken again (up to three times) should a loaded machine leave
    // l4mesh too little CPU to be sampled at all.
    let busy = |addr: std::net::SocketAddr| {
        (0..3)
            .map(|_| {
                tokio::spawn(async move {
                    let until = std::time::Instant::now() + Duration::from_millis(2500);
                    while std::time::Instant::now() < until {
                        let _ = http(addr, "GET", "/healthz/ready").await;
                    }
                })
            })
            .collect::<Vec<_>>()
    };
    let mut cpu = None;
    for attempt in 0..3 {
        let load = busy(plain.readiness);
        let first = tokio::spawn(get_bytes(plain.admin, "/debug/pprof/profile?seconds=2"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        if attempt == 0 {
            let (code, body) = get_bytes(plain.admin, "/debug/pprof/profile?seconds=1").await;
            assert_eq!(code, 409, "{}", String::from_utf8_lossy(&body));
        }
        let (code, body) = first.await.unwrap();
        for l in load {
            l.await.unwrap();
        }
        assert_eq!(code, 200, "{}", String::from_utf8_lossy(&body));
        let profile = pprof::protos::Profile::decode(&body[..]).unwrap();
        let sampled = !profile.sample.is_empty();
        cpu = Some(profile);
        if sampled {
            break;
        }
    }
    let cpu = cpu.unwrap();
    let names = strings(&cpu);
    let period = cpu.period_type.as_ref().unwrap();
    assert_eq!(names[period.ty as usize], "cpu");
    assert_eq!(cpu.period, 1_000_000, "1000 Hz");
    assert!(
        (1_900_000_000..4_000_000_000).contains(&cpu.duration_nanos),
        "{}",
        cpu.duration_nanos
    );
    assert!(!cpu.sample.is_empty(), "a busy l4mesh was sampled");
    assert!(
        names.iter().any(|n| n.contains("l4mesh")),
        "its own functions are named"
    );
    let (code, body) = get_bytes(plain.admin, "/debug/pprof/profile?seconds=99").await;
    assert_eq!(code, 400);
    assert!(String::from_utf8_lossy(&body).contains("from 1 to 60"));
}
