//! Label filling, the peers lookups, the counting of one connection, /proc parsing and the HTTP
//! answers, each against a real registry and its text encoding.

use std::sync::Arc;

use prometheus_client::registry::Registry;

use super::collect::{parse_btime, parse_proc_stat, ProcStat};
use super::peers::{inbound_service, inbound_source};
use super::traffic::{
    ConnLabels, ConnMetrics, Peer, Reporter, ResponseFlag, Traffic, TrafficLabels, UNKNOWN,
};
use super::Metrics;
use crate::model::{NetworkAddr, SpiffeId};
use crate::store::{Snapshot, Store};

const STATE: &str = r#"
workloads:
- uid: c1//v1/Pod/shop/client-5d8f
  name: client-5d8f
  namespace: shop
  serviceAccount: client
  workloadIps: ["10.0.0.1"]
  protocol: HBONE
  node: n1
  workloadName: client
  canonicalName: client-app
  canonicalRevision: v1
  clusterId: east
- uid: c1//v1/Pod/shop/server-77aa
  name: server-77aa
  namespace: shop
  serviceAccount: server
  workloadIps: ["10.0.0.2"]
  protocol: HBONE
  node: n2
  workloadName: server
  canonicalName: server-app
  canonicalRevision: v2
  clusterId: east
  locality: { region: eu-west1, zone: eu-west1-b }
  services:
    "shop/api.shop.svc.cluster.local": { 80: 8080 }
- uid: c1//v1/Pod/shop/bare
  name: bare
  namespace: shop
  serviceAccount: bare
  workloadIps: ["10.0.0.3"]
  protocol: TCP
  node: n2
services:
- name: api
  namespace: shop
  hostname: api.shop.svc.cluster.local
  vips: ["/10.0.0.100"]
  ports: { 80: 8080 }
"#;

fn snapshot() -> Arc<Snapshot> {
    let store = Store::new();
    store.apply(crate::localconfig::parse(STATE).unwrap());
    store.load()
}

fn wl(s: &Snapshot, ip: &str) -> Arc<crate::model::Workload> {
    s.workload_by_addr(&NetworkAddr::new(Arc::<str>::from(""), ip.parse().unwrap()))
        .unwrap()
        .clone()
}

#[test]
fn source_labels_of_an_hbone_connection() {
    let s = snapshot();
    let (client, server) = (wl(&s, "10.0.0.1"), wl(&s, "10.0.0.2"));
    let svc = s.service_by_hostname("api.shop.svc.cluster.local").unwrap();
    let id = client.identity();
    let l = TrafficLabels::new(
        Reporter::Source,
        Peer {
            workload: Some(&client),
            principal: Some(&id),
            workload_principal: false,
        },
        Some(&server),
        Some(svc),
        true,
    );
    assert_eq!(l.reporter, Reporter::Source);
    // Workload labels are the Deployment-level name, as Istio's dashboards group by it.
    assert_eq!(l.source_workload, "client");
    assert_eq!(l.source_workload_namespace, "shop");
    assert_eq!(
        l.source_principal,
        "spiffe://cluster.local/ns/shop/sa/client"
    );
    assert_eq!(l.source_app, "client-app");
    assert_eq!(l.source_canonical_service, "client-app");
    assert_eq!(l.source_version, "v1");
    assert_eq!(l.source_canonical_revision, "v1");
    assert_eq!(l.source_cluster, "east");
    assert_eq!(l.destination_workload, "server");
    assert_eq!(
        l.destination_principal,
        "spiffe://cluster.local/ns/shop/sa/server"
    );
    // Formatted in place, with the spelling of `SpiffeId`'s Display.
    assert_eq!(l.destination_principal, server.identity().to_string());
    assert_eq!(l.destination_service, "api.shop.svc.cluster.local");
    assert_eq!(l.destination_service_name, "api");
    assert_eq!(l.destination_service_namespace, "shop");
    assert_eq!(l.destination_version, "v2");
    assert_eq!(l.request_protocol, "tcp");
    assert_eq!(l.response_flags, ResponseFlag::None);
    assert_eq!(l.connection_security_policy, "mutual_tls");
}

#[test]
fn missing_values_are_unknown() {
    let s = snapshot();
    let bare = wl(&s, "10.0.0.3");
    // Plaintext from outside the mesh to a workload without canonical names or cluster.
    let l = TrafficLabels::new(
        Reporter::Destination,
        Peer::default(),
        Some(&bare),
        None,
        false,
    );
    assert_eq!(l.reporter, Reporter::Destination);
    for v in [
        &l.source_workload,
        &l.source_workload_namespace,
        &l.source_principal,
        &l.source_app,
        &l.source_cluster,
        &l.destination_app,
        &l.destination_cluster,
        &l.destination_service,
        &l.destination_service_name,
        &l.destination_service_namespace,
    ] {
        assert_eq!(v, UNKNOWN);
    }
    assert_eq!(l.destination_workload_namespace, "shop");
    // No workloadName in the state: the pod's own name stands in, as istiod names bare pods.
    assert_eq!(l.destination_workload, "bare");
    assert_eq!(
        l.destination_principal,
        "spiffe://cluster.local/ns/shop/sa/bare"
    );
    assert_eq!(l.connection_security_policy, "unknown");
    // Passthrough: nothing known of the destination either.
    let l = TrafficLabels::new(Reporter::Source, Peer::default(), None, None, false);
    assert_eq!(l.destination_principal, UNKNOWN);
    assert_eq!(l.destination_workload_namespace, UNKNOWN);
}

#[test]
fn locality_labels_follow_ztunnel() {
    let s = snapshot();
    let (client, server) = (wl(&s, "10.0.0.1"), wl(&s, "10.0.0.2"));
    let src = Peer {
        workload: Some(&client),
        principal: None,
        workload_principal: true,
    };
    let l = TrafficLabels::new(Reporter::Source, src, Some(&server), None, true);
    let loc = l
        .locality
        .0
        .as_ref()
        .expect("known workloads carry locality");
    assert_eq!(
        (
            loc.source_region.as_str(),
            loc.source_zone.as_str(),
            loc.destination_region.as_str(),
            loc.destination_zone.as_str()
        ),
        (UNKNOWN, UNKNOWN, "eu-west1", "eu-west1-b")
    );
    // After the 23 others, in ztunnel's order.
    let mut r = Registry::default();
    let f = prometheus_client::metrics::family::Family::<
        TrafficLabels,
        prometheus_client::metrics::counter::Counter,
    >::default();
    f.get_or_create(&l).inc();
    r.register("x", "x", f);
    let text = encode(&r);
    assert!(
        text.contains("connection_security_policy=\"mutual_tls\",source_region=\"unknown\",source_zone=\"unknown\",destination_region=\"eu-west1\",destination_zone=\"eu-west1-b\"}"),
        "{text}"
    );
    // Nothing known of either end: no locality labels at all.
    let l = TrafficLabels::new(Reporter::Source, Peer::default(), None, None, false);
    assert_eq!(l.locality.0, None);
    // A client proven over mutual TLS counts as known on the destination's side.
    let id = client.identity();
    let proven = Peer {
        workload: None,
        principal: Some(&id),
        workload_principal: false,
    };
    let l = TrafficLabels::new(Reporter::Destination, proven, None, None, true);
    assert!(l.locality.0.is_some());
}

#[test]
fn inbound_source_must_carry_the_proven_identity() {
    let s = snapshot();
    let net: Arc<str> = "".into();
    let client_id = SpiffeId::new("cluster.local", "shop", "client");
    let ip = |a: &str| a.parse().unwrap();
    let found = inbound_source(
        &s,
        &net,
        &[ip("10.0.0.1"), ip("127.0.0.1")],
        Some(&client_id),
    );
    assert_eq!(found.unwrap().name, "client-5d8f");
    // A forwarded address naming another identity's workload is not believed; the TCP peer
    // (here not a workload) is tried next.
    let other = SpiffeId::new("cluster.local", "shop", "intruder");
    assert!(inbound_source(&s, &net, &[ip("10.0.0.1"), ip("127.0.0.1")], Some(&other)).is_none());
    // Plaintext proves nothing: the workload at the address is taken.
    let found = inbound_source(&s, &net, &[ip("10.0.0.3")], None);
    assert_eq!(found.unwrap().name, "bare");
}

#[test]
fn inbound_service_is_guessed_from_the_target_port() {
    let s = snapshot();
    let server = wl(&s, "10.0.0.2");
    assert_eq!(
        inbound_service(&s, &server, 8080).unwrap().hostname,
        "api.shop.svc.cluster.local"
    );
    assert!(inbound_service(&s, &server, 9090).is_none());
}

fn encode(r: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, r).unwrap();
    out
}

#[test]
fn one_connection_counts_open_close_and_bytes_once() {
    let t = Arc::new(Traffic::default());
    let mut r = Registry::default();
    let istio = r.sub_registry_with_prefix("istio");
    istio.register("tcp_connections_opened", "o", t.opened.clone());
    istio.register("tcp_connections_closed", "c", t.closed.clone());
    istio.register("tcp_connections_failed", "f", t.failed.clone());
    istio.register("tcp_sent_bytes", "s", t.sent.clone());
    istio.register("tcp_received_bytes", "r", t.received.clone());
    r.register("open_connections", "g", t.open.clone());
    let m = t.open(&unknown_ends(Reporter::Source, false));
    let text = encode(&r);
    assert!(
        text.contains("open_connections{direction=\"outbound\"} 1"),
        "{text}"
    );
    // The common close's counter exists from the open (fetched then, so that the close takes no
    // lock), at 0.
    assert!(
        text.contains("istio_tcp_connections_closed_total{") && text.contains("\"} 0\n"),
        "{text}"
    );
    m.close(300, 7, ResponseFlag::Connect);
    m.close(1, 1, ResponseFlag::None); // a second close is ignored
    drop(m); // and so is the drop's
    let text = encode(&r);
    let line = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name) && l.contains('{'))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .to_owned()
    };
    assert!(line("istio_tcp_connections_opened_total").contains("response_flags=\"-\""));
    assert!(line("istio_tcp_connections_opened_total").ends_with(" 1"));
    let closed = text
        .lines()
        .find(|l| l.starts_with("istio_tcp_connections_closed_total") && l.contains("CONNECT"))
        .unwrap_or_else(|| panic!("no CONNECT close in {text}"));
    assert!(
        closed.contains("response_flags=\"CONNECT\"") && closed.ends_with(" 1"),
        "{closed}"
    );
    // Istio's directions: received = client → server, sent = server → client; bytes keep the
    // labels of the open.
    let received = line("istio_tcp_received_bytes_total");
    assert!(received.ends_with(" 300") && received.contains("response_flags=\"-\""));
    assert!(line("istio_tcp_sent_bytes_total").ends_with(" 7"));
    assert!(
        text.contains("open_connections{direction=\"outbound\"} 0"),
        "{text}"
    );
    // The `-` series (at 0) and the `CONNECT` one; Envoy's flags never reach the metric.
    assert_eq!(
        text.matches("istio_tcp_connections_closed_total{").count(),
        2
    );
    assert!(!text.contains("response_flags=\"UF\""), "{text}");
    // A close with a flag other than `-` is also a failure, under the labels of its close; the
    // clean close of another connection is not.
    let failed = line("istio_tcp_connections_failed_total");
    assert!(
        failed.contains("response_flags=\"CONNECT\"") && failed.ends_with(" 1"),
        "{failed}"
    );
    t.open(&unknown_ends(Reporter::Source, false))
        .close(1, 1, ResponseFlag::None);
    let text = encode(&r);
    assert_eq!(
        text.matches("istio_tcp_connections_failed_total{").count(),
        1,
        "{text}"
    );
    assert!(line("istio_tcp_connections_opened_total").contains(
        "reporter=\"source\",source_workload=\"unknown\",source_canonical_service=\"unknown\""
    ));
}

#[test]
fn metered_bytes_show_before_the_close_and_count_once() {
    let t = Arc::new(Traffic::default());
    let mut r = Registry::default();
    r.register("closed", "c", t.closed.clone());
    r.register("received", "r", t.received.clone());
    r.register("sent", "s", t.sent.clone());
    let m = t.open(&unknown_ends(Reporter::Source, true));
    let meter = m.meter();
    meter.client_bytes(100);
    meter.client_bytes(28);
    meter.server_bytes(5);
    let text = encode(&r);
    assert!(
        text.contains("received_total{reporter=\"source\""),
        "{text}"
    );
    let value = |text: &str, name: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.starts_with(name))
            .map(|l| l.rsplit(' ').next().unwrap().to_owned())
            .collect()
    };
    assert_eq!(value(&text, "received_total{"), ["128"]);
    assert_eq!(value(&text, "sent_total{"), ["5"]);
    assert_eq!(value(&text, "closed_total{"), ["0"], "{text}");
    // The close reports the same totals: they are not added again, and stay under the labels
    // of the open (ztunnel's rule); the close itself carries the flag.
    m.close(128, 5, ResponseFlag::Deny);
    let text = encode(&r);
    assert_eq!(value(&text, "received_total{"), ["128"]);
    assert_eq!(value(&text, "sent_total{"), ["5"]);
    assert!(text.contains("closed_total{") && text.contains("response_flags=\"DENY\""));
    // An empty meter (no destination known yet) counts nothing.
    crate::metrics::Meter::default().client_bytes(7);
}

#[test]
fn a_dropped_connection_still_counts_its_close() {
    let t = Arc::new(Traffic::default());
    let mut r = Registry::default();
    r.register("closed", "c", t.closed.clone());
    r.register("open", "g", t.open.clone());
    drop(t.open(&unknown_ends(Reporter::Destination, true)));
    let text = encode(&r);
    assert!(
        text.contains("closed_total{reporter=\"destination\""),
        "{text}"
    );
    assert!(text.contains("open{direction=\"inbound\"} 0"), "{text}");
}

#[test]
fn proc_stat_parses_with_spaces_in_the_name() {
    // Fields: pid (comm) state ppid … utime=250 stime=50 … starttime=1000 vsize rss.
    let stat = "4242 (l4mesh worker) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1000 104857600 2560 18446744073709551615";
    let s = parse_proc_stat(stat, 1_700_000_000, 100, 4096).unwrap();
    assert_eq!(
        s,
        ProcStat {
            cpu_seconds: 3.0,
            start_time_seconds: 1_700_000_010.0,
            virtual_bytes: 104_857_600,
            resident_bytes: 2560 * 4096,
        }
    );
    assert_eq!(
        parse_btime("cpu  1 2 3\nbtime 1700000000\nprocesses 9\n"),
        Some(1_700_000_000)
    );
    assert!(parse_proc_stat("garbage", 0, 100, 4096).is_none());
}

#[test]
fn the_real_proc_self_is_read() {
    let btime = parse_btime(&std::fs::read_to_string("/proc/stat").unwrap()).unwrap();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let s = parse_proc_stat(&stat, btime, rustix::param::clock_ticks_per_second(), 4096).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(s.resident_bytes > 1024 * 1024, "{s:?}");
    assert!(s.start_time_seconds <= now + 1.0 && s.start_time_seconds > now - 86_400.0 * 365.0);
}

#[test]
fn http_paths_and_formats() {
    let mut registry = Registry::default();
    let c: prometheus_client::metrics::counter::Counter = Default::default();
    c.inc();
    registry.register("probe", "a probe", c);
    let m = Metrics {
        registry,
        predecessor: None,
    };
    let req = |path: &str, accept: Option<&str>| {
        let mut b = http::Request::builder().uri(path);
        if let Some(a) = accept {
            b = b.header("accept", a);
        }
        b.body(()).unwrap()
    };
    let om = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    for path in ["/metrics", "/stats/prometheus"] {
        let r = super::server::answer(&req(path, Some(om)), &m);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], super::OPENMETRICS_CONTENT_TYPE);
        let r = super::server::answer(&req(path, None), &m);
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers()["content-type"],
            "text/plain; version=0.0.4; charset=utf-8"
        );
    }
    assert!(m.encode(true).unwrap().ends_with("# EOF\n"));
    assert!(m.encode(false).unwrap().contains("probe_total 1\n"));
    let r = super::server::answer(&req("/stats", None), &m);
    assert_eq!(r.status(), 404);
}

/// A connection nothing is known of.
fn unknown_ends(reporter: Reporter, mtls: bool) -> ConnLabels<'static> {
    ConnLabels {
        reporter,
        src: Peer::default(),
        dst: None,
        service: None,
        mtls,
    }
}

/// Opens an HBONE connection from the workload at `client` to the server, through its service,
/// with its workloads looked up in a snapshot of its own (as each connection does).
fn open_from(t: &Arc<Traffic>, client: &str) -> ConnMetrics {
    let s = snapshot();
    let (c, server) = (wl(&s, client), wl(&s, "10.0.0.2"));
    let id = c.identity();
    t.open(&ConnLabels {
        reporter: Reporter::Source,
        src: Peer {
            workload: Some(&c),
            principal: Some(&id),
            workload_principal: false,
        },
        dst: Some(&server),
        service: s
            .service_by_hostname("api.shop.svc.cluster.local")
            .map(|v| &**v),
        mtls: true,
    })
}

#[test]
fn connection_metrics_share_their_labels() {
    let t = Arc::new(Traffic::default());
    let a = open_from(&t, "10.0.0.1");
    let b = open_from(&t, "10.0.0.1");
    let other = open_from(&t, "10.0.0.3");
    // Same labels: one shared copy; other labels: their own.
    assert!(Arc::ptr_eq(a.shared_labels(), b.shared_labels()));
    assert!(!Arc::ptr_eq(a.shared_labels(), other.shared_labels()));
    // More connections with these labels add no copy: the count of holders is the cache's, the
    // series' and the four families' keys, not one per connection.
    let holders = Arc::strong_count(a.shared_labels());
    let more: Vec<ConnMetrics> = (0..10).map(|_| open_from(&t, "10.0.0.1")).collect();
    assert_eq!(Arc::strong_count(a.shared_labels()), holders);
    assert!(holders <= 6, "{holders}");
    drop(more);

    // What one open connection holds (figures in docs/metrics.md): two Arcs and two flags now;
    // before, a full `TrafficLabels` plus a gauge and two counter handles inline, and the label
    // strings on the heap.
    let now = std::mem::size_of::<ConnMetrics>();
    // The former layout: 19 `String`s and 4 `&'static str` labels, an `Arc<Traffic>`, a gauge,
    // two counter handles (8 bytes each) and two flags (padded to 8).
    let old_labels = 19 * std::mem::size_of::<String>() + 4 * std::mem::size_of::<&str>();
    let before = old_labels + 8 + 8 + 2 * 8 + 8;
    let l = a.labels();
    let strings = [
        &l.source_workload,
        &l.source_canonical_service,
        &l.source_canonical_revision,
        &l.source_workload_namespace,
        &l.source_principal,
        &l.source_app,
        &l.source_version,
        &l.source_cluster,
        &l.destination_service,
        &l.destination_service_namespace,
        &l.destination_service_name,
        &l.destination_workload,
        &l.destination_canonical_service,
        &l.destination_canonical_revision,
        &l.destination_workload_namespace,
        &l.destination_principal,
        &l.destination_app,
        &l.destination_version,
        &l.destination_cluster,
    ];
    // jemalloc rounds small allocations up to 8, 16, 32, 48, 64… bytes.
    let heap: usize = strings
        .iter()
        .map(|s| match s.capacity() {
            0..=8 => 8,
            9..=16 => 16,
            n => n.div_ceil(16) * 16,
        })
        .sum();
    eprintln!(
        "ConnMetrics: {now} bytes, no heap; before: {before} bytes inline + {heap} bytes of label strings"
    );
    assert!(now <= 24, "{now}");
    assert!(before >= 500 && heap >= 200, "{before} {heap}");
}

#[test]
fn a_clean_close_takes_no_family_lock_while_a_scrape_encodes() {
    let t = Arc::new(Traffic::default());
    let m = open_from(&t, "10.0.0.1");
    let key = super::labels::LabelKey(m.shared_labels().clone());
    // A scrape holds each family's read lock while it encodes it; creating a series there needs
    // the write lock. The common close (`-`) must not wait for it: its counter is fetched at open.
    let scrape = t.closed.get(&key).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let closer = std::thread::spawn(move || {
        m.close(10, 20, ResponseFlag::None);
        drop(m);
        tx.send(()).unwrap();
    });
    let done = rx.recv_timeout(std::time::Duration::from_secs(5));
    drop(scrape);
    closer.join().unwrap();
    assert!(done.is_ok(), "the close waited for the scrape's lock");
    assert_eq!(t.closed.get(&key).unwrap().get(), 1);
}

#[test]
fn fixed_series_exist_from_the_start() {
    // The direction gauges and the RBAC counters are fetched once, at construction: they show
    // (at 0) before any connection, and the data path never looks them up.
    let t = Arc::new(Traffic::default());
    let mut r = Registry::default();
    r.register("open", "g", t.open.clone());
    r.register("rbac", "c", t.rbac.clone());
    let text = encode(&r);
    for series in [
        "open{direction=\"inbound\"} 0",
        "open{direction=\"outbound\"} 0",
        "rbac_total{result=\"allow\"} 0",
        "rbac_total{result=\"deny\"} 0",
    ] {
        assert!(text.contains(series), "{series} in {text}");
    }
    t.rbac_decision(false);
    drop(open_from(&t, "10.0.0.1"));
    let text = encode(&r);
    assert!(text.contains("rbac_total{result=\"deny\"} 1"), "{text}");
    assert!(text.contains("open{direction=\"outbound\"} 0"), "{text}");
}

#[test]
fn interned_labels_are_found_by_their_values() {
    let s = snapshot();
    let (client, server, bare) = (wl(&s, "10.0.0.1"), wl(&s, "10.0.0.2"), wl(&s, "10.0.0.3"));
    let svc = s.service_by_hostname("api.shop.svc.cluster.local").unwrap();
    let id = client.identity();
    let svc: &crate::model::Service = svc;
    let conn = |src, principal, dst, mtls| labels_to(svc, src, principal, dst, mtls);
    let full = conn(Some(&client), Some(&id), Some(&server), true);
    let built = TrafficLabels::from(&full);
    assert!(full.matches(&built));
    // Equal values from another snapshot's copies of the workloads: the same key.
    let s2 = snapshot();
    let (client2, server2) = (wl(&s2, "10.0.0.1"), wl(&s2, "10.0.0.2"));
    let id2 = client2.identity();
    let again = conn(Some(&client2), Some(&id2), Some(&server2), true);
    assert_eq!(again.hash_key(), full.hash_key());
    assert!(again.matches(&built));
    // Any difference is seen: the principal (also one that is a prefix of the other), the
    // destination, the policy, the flag.
    let prefix = SpiffeId::new("cluster.local", "shop", "clien");
    let other = SpiffeId::new("cluster.local", "shop", "server");
    for differs in [
        conn(Some(&client), Some(&prefix), Some(&server), true),
        conn(Some(&client), Some(&other), Some(&server), true),
        conn(Some(&client), None, Some(&server), true),
        conn(Some(&client), Some(&id), Some(&bare), true),
        conn(Some(&client), Some(&id), Some(&server), false),
        conn(None, Some(&id), Some(&server), true),
    ] {
        assert!(!differs.matches(&built));
    }
    let mut flagged = built.clone();
    flagged.response_flags = ResponseFlag::Deny;
    assert!(!full.matches(&flagged));
    // The locality labels count: another zone, or none at all.
    let mut moved = built.clone();
    if let Some(l) = moved.locality.0.as_mut() {
        l.destination_zone = "eu-west1-c".into();
    }
    assert!(!full.matches(&moved));
    let mut absent = built.clone();
    absent.locality.0 = None;
    assert!(!full.matches(&absent));
    // The client workload's own identity, read from its fields, is the same principal.
    let mut own = conn(Some(&client), None, Some(&server), true);
    own.src.workload_principal = true;
    assert_eq!(own.hash_key(), full.hash_key());
    assert!(own.matches(&built));
    assert_eq!(TrafficLabels::from(&own), built);
    // The values built are the ones matched, `unknown` included.
    let none = unknown_ends(Reporter::Source, false);
    assert!(none.matches(&TrafficLabels::from(&none)));
    assert_eq!(TrafficLabels::from(&none).source_principal, UNKNOWN);
}

fn labels_to<'a>(
    service: &'a crate::model::Service,
    src: Option<&'a crate::model::Workload>,
    principal: Option<&'a SpiffeId>,
    dst: Option<&'a crate::model::Workload>,
    mtls: bool,
) -> ConnLabels<'a> {
    ConnLabels {
        reporter: Reporter::Destination,
        src: Peer {
            workload: src,
            principal,
            workload_principal: false,
        },
        dst,
        service: Some(service),
        mtls,
    }
}
