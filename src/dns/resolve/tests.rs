//! Against a real UDP resolver on loopback (answers built with hickory-proto): addresses of both
//! families, the cache and its TTLs, names without addresses, failures not cached.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use hickory_proto::op::MessageType;
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::Record;

use super::*;

/// Serves `dual.test` (A 192.0.2.1, 192.0.2.2; AAAA 2001:db8::1; TTL 60), `v4.test` (A
/// 192.0.2.3, TTL 0), NXDOMAIN for the rest, SERVFAIL for `broken.test`; counts queries.
async fn resolver() -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 4096];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            seen.fetch_add(1, Ordering::SeqCst);
            let q = Message::from_vec(&buf[..n]).unwrap();
            let query = q.queries()[0].clone();
            let mut out = Message::new();
            out.set_id(q.id())
                .set_message_type(MessageType::Response)
                .add_query(query.clone());
            let name = query.name().to_ascii();
            let rec = |ttl, data| Record::from_rdata(query.name().clone(), ttl, data);
            match (name.as_str(), query.query_type()) {
                ("dual.test.", RecordType::A) => {
                    out.add_answer(rec(60, RData::A(A::new(192, 0, 2, 1))));
                    out.add_answer(rec(90, RData::A(A::new(192, 0, 2, 2))));
                }
                ("dual.test.", RecordType::AAAA) => {
                    out.add_answer(rec(
                        60,
                        RData::AAAA(AAAA::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
                    ));
                }
                ("v4.test.", RecordType::A) => {
                    out.add_answer(rec(0, RData::A(A::new(192, 0, 2, 3))));
                }
                ("v4.test.", _) => {}
                // An IPv4-only name whose A query fails: no answer to that one.
                ("flaky.test.", RecordType::A) => continue,
                ("flaky.test.", _) => {}
                ("broken.test.", _) => {
                    out.set_response_code(ResponseCode::ServFail);
                }
                _ => {
                    out.set_response_code(ResponseCode::NXDomain);
                }
            }
            let _ = sock.send_to(&out.to_vec().unwrap(), peer).await;
        }
    });
    (addr, count)
}

fn resolver_at(addr: SocketAddr) -> HostResolver {
    HostResolver::new(Upstreams::new(vec![addr], Duration::from_millis(500), 0))
}

#[tokio::test]
async fn both_families_cached_by_ttl_and_picked_by_the_dialled_family() {
    let (addr, count) = resolver().await;
    let r = resolver_at(addr);
    let mut got: Vec<String> = r
        .resolve("Dual.Test.")
        .await
        .unwrap()
        .iter()
        .map(ToString::to_string)
        .collect();
    got.sort();
    assert_eq!(got, ["192.0.2.1", "192.0.2.2", "2001:db8::1"]);
    assert_eq!(count.load(Ordering::SeqCst), 2, "one A and one AAAA query");
    // Cached (TTL 60 s): no more queries, whatever the spelling.
    for _ in 0..10 {
        let v4 = r
            .pick("dual.test", "10.0.0.1".parse().unwrap())
            .await
            .unwrap();
        assert!(v4.is_ipv4());
        let v6 = r
            .pick("DUAL.test", "fd00::1".parse().unwrap())
            .await
            .unwrap();
        assert_eq!(v6.to_string(), "2001:db8::1");
    }
    assert_eq!(count.load(Ordering::SeqCst), 2);
    // The other family when the dialled one has none.
    let any = r.pick("v4.test", "fd00::1".parse().unwrap()).await.unwrap();
    assert_eq!(any.to_string(), "192.0.2.3");
}

#[tokio::test]
async fn a_zero_ttl_is_kept_one_second() {
    let (addr, count) = resolver().await;
    let r = resolver_at(addr);
    r.resolve("v4.test").await.unwrap();
    r.resolve("v4.test").await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 2);
    tokio::time::sleep(MIN_TTL + Duration::from_millis(100)).await;
    r.resolve("v4.test").await.unwrap();
    assert_eq!(
        count.load(Ordering::SeqCst),
        4,
        "asked again after a second"
    );
}

#[tokio::test]
async fn no_address_is_remembered_and_failures_are_not() {
    let (addr, count) = resolver().await;
    let r = resolver_at(addr);
    for _ in 0..3 {
        assert!(matches!(
            r.resolve("missing.test").await,
            Err(ResolveError::NoAddress { .. })
        ));
    }
    assert_eq!(count.load(Ordering::SeqCst), 2, "NXDOMAIN kept");
    for _ in 0..2 {
        let e = r.resolve("broken.test").await.unwrap_err();
        assert!(matches!(e, ResolveError::Rcode { .. }), "{e}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 6, "SERVFAIL asked again");
    // One family failing, the other empty: the failure, not remembered as "no address".
    let before = count.load(Ordering::SeqCst);
    for _ in 0..2 {
        let e = r.resolve("flaky.test").await.unwrap_err();
        assert!(matches!(e, ResolveError::Upstream { .. }), "{e}");
    }
    assert_eq!(count.load(Ordering::SeqCst), before + 4);
    assert!(matches!(
        r.resolve("bad name..test").await,
        Err(ResolveError::InvalidName { .. })
    ));
    // No resolver at all: a clear error, in time.
    let silent = HostResolver::new(Upstreams::new(Vec::new(), Duration::from_secs(1), 0));
    let e = silent.resolve("dual.test").await.unwrap_err();
    assert!(e.to_string().contains("no nameserver"), "{e}");
}

#[tokio::test]
async fn the_cache_holds_at_most_max_entries() {
    let (addr, _) = resolver().await;
    let r = resolver_at(addr);
    for i in 0..MAX_ENTRIES + 10 {
        r.store(
            format!("n{i}.test"),
            Arc::from(vec![IpAddr::from([192, 0, 2, 1])]),
            MAX_TTL,
        );
    }
    assert_eq!(r.lock().len(), MAX_ENTRIES);
}
