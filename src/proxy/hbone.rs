//! HBONE's CONNECT on the wire (wire-facts §3), pure: the request a client sends, the validation a
//! server applies to a request, and the status each outcome maps to. No I/O here; the listeners and
//! the pool use these so that both ends agree on every header.

use std::net::{IpAddr, SocketAddr};

use http::{Method, Request, StatusCode};

use crate::model::{Workload, WorkloadType};

/// The port HBONE servers listen on.
pub const HBONE_PORT: u16 = 15008;

/// Fixed HTTP/2 settings of both ends (wire-facts §3); the tunable ones are in
/// [`super::h2io::Tuning`].
pub mod settings {
    /// Streams one inbound connection carries at once (ztunnel: 100). Not tied to
    /// `POOL_MAX_STREAMS_PER_CONNECTION`, which limits this end's own outbound connections.
    pub const MAX_CONCURRENT_STREAMS: u32 = 100;
    /// Largest header block accepted: CONNECT headers are small, anything bigger is abuse.
    pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
    /// Bytes one stream may hold queued for a peer that does not read (ztunnel: 400 KiB); past it
    /// the copy waits, so a stalled peer costs at most this plus its flow-control windows.
    pub const MAX_SEND_BUFFER: usize = 400 * 1024;
}

/// Why a CONNECT was refused, or that it was accepted; each maps to the status HBONE peers expect.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Outcome {
    #[error("accepted")]
    Ok,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("authority {authority} is not a workload on this node")]
    AuthorityMismatch { authority: SocketAddr },
    #[error("ip mismatch: the tunnel was dialled on {dialled} but its authority is {authority}; a CONNECT must name the workload it was sent to (only that workload's waypoint takes tunnels for other addresses)")]
    IpMismatch {
        dialled: std::net::IpAddr,
        authority: SocketAddr,
    },
    #[error("denied by policy: {0}")]
    Denied(String),
    #[error("no upstream: {0}")]
    NoUpstream(String),
}

impl Outcome {
    /// The `:status` answered for this outcome.
    pub fn status(&self) -> StatusCode {
        match self {
            Outcome::Ok => StatusCode::OK,
            Outcome::BadRequest(_)
            | Outcome::AuthorityMismatch { .. }
            | Outcome::IpMismatch { .. } => StatusCode::BAD_REQUEST,
            Outcome::Denied(_) => StatusCode::UNAUTHORIZED,
            Outcome::NoUpstream(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

/// The `baggage` header (W3C) describing the source workload, so the peer's telemetry can name it.
pub fn baggage(wl: &Workload) -> String {
    let kind = match wl.workload_type {
        WorkloadType::Deployment => "deployment",
        WorkloadType::CronJob => "cronjob",
        WorkloadType::Pod => "pod",
        WorkloadType::Job => "job",
    };
    let workload_name = if wl.workload_name.is_empty() {
        &wl.name
    } else {
        &wl.workload_name
    };
    let mut parts = Vec::with_capacity(5);
    let mut push = |k: String, v: &str| {
        // Values are Kubernetes names (no `,`/`;`/`=`); anything else would break the list.
        if !v.is_empty() && !v.contains([',', ';', '=', ' ']) {
            parts.push(format!("{k}={v}"));
        }
    };
    push("k8s.cluster.name".into(), &wl.cluster_id);
    push("k8s.namespace.name".into(), &wl.namespace);
    push(format!("k8s.{kind}.name"), workload_name);
    push("service.name".into(), &wl.canonical_name);
    push("service.version".into(), &wl.canonical_revision);
    parts.join(",")
}

/// The `forwarded` header (RFC 7239) naming the original client; IPv6 in brackets.
pub fn forwarded(client: SocketAddr) -> String {
    // `SocketAddr`'s Display already brackets IPv6 (`[::1]:80`).
    format!("for=\"{client}\"")
}

/// The client address an HBONE CONNECT names in its `forwarded: for="<ip>:<port>"` header (RFC
/// 7239; IPv6 in brackets), if any.
pub fn forwarded_for(headers: &http::HeaderMap) -> Option<IpAddr> {
    let v = headers.get("forwarded")?.to_str().ok()?;
    v.split([';', ',']).find_map(|part| {
        let (k, val) = part.trim().split_once('=')?;
        if !k.trim().eq_ignore_ascii_case("for") {
            return None;
        }
        let val = val.trim().trim_matches('"');
        if let Some(rest) = val.strip_prefix('[') {
            return rest.split_once(']')?.0.parse().ok();
        }
        val.parse::<IpAddr>()
            .ok()
            .or_else(|| val.rsplit_once(':')?.0.parse().ok())
    })
}

/// A fresh W3C `traceparent` (version 00, random trace and span ids, not sampled). With OTel on,
/// `proxy::trace` replaces it with the connection span's context.
pub fn traceparent(rng: &mut impl rand::Rng) -> String {
    let trace: u128 = rng.random::<u128>().max(1);
    let span: u64 = rng.random::<u64>().max(1);
    format!("00-{trace:032x}-{span:016x}-00")
}

/// The classic CONNECT request (only `:method` and `:authority` as pseudo-headers) for a tunnel to
/// `target`, from `client` (the application's address), with `src`'s metadata when known.
pub fn connect_request(
    target: SocketAddr,
    client: SocketAddr,
    src: Option<&Workload>,
    rng: &mut impl rand::Rng,
) -> Result<Request<()>, http::Error> {
    // An authority-form URI: h2 sends `:authority` and neither `:scheme` nor `:path`.
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .header("forwarded", forwarded(client))
        .header("traceparent", traceparent(rng));
    if let Some(wl) = src {
        let bag = baggage(wl);
        if !bag.is_empty() {
            b = b.header("baggage", bag);
        }
    }
    b.body(())
}

/// The `x-forwarded-network` header: the network a double-HBONE client is on, sent on the inner
/// CONNECT only (ztunnel's), so that the destination knows the TCP peer is a gateway.
pub const X_FORWARDED_NETWORK: &str = "x-forwarded-network";

/// A CONNECT through a network gateway (double HBONE): `authority` is `<service hostname>:<port>`,
/// `forwarded` also names that host (ztunnel's); the inner request carries the client's
/// `network`, the outer none.
pub fn connect_request_via_gateway(
    authority: &str,
    client: SocketAddr,
    src: Option<&Workload>,
    network: Option<&str>,
    rng: &mut impl rand::Rng,
) -> Result<Request<()>, http::Error> {
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    let mut b = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .header("forwarded", format!("{};host={host}", forwarded(client)))
        .header("traceparent", traceparent(rng));
    if let Some(wl) = src {
        let bag = baggage(wl);
        if !bag.is_empty() {
            b = b.header("baggage", bag);
        }
    }
    if let Some(network) = network {
        b = b.header(X_FORWARDED_NETWORK, network);
    }
    b.body(())
}

/// Checks a request a server received: CONNECT with an `ip:port` authority. Returns the target.
pub fn validate<B>(req: &Request<B>) -> Result<Authority, Outcome> {
    if req.method() != Method::CONNECT {
        return Err(Outcome::BadRequest(format!(
            "method {} is not CONNECT: an HBONE server only tunnels",
            req.method()
        )));
    }
    let authority = req
        .uri()
        .authority()
        .ok_or_else(|| Outcome::BadRequest("CONNECT without :authority".into()))?;
    if let Ok(addr) = authority.as_str().parse::<SocketAddr>() {
        return Ok(Authority::Addr(addr));
    }
    let bad = || {
        Outcome::BadRequest(format!(
            "authority {:?} is neither ip:port nor <service hostname>:port",
            authority.as_str()
        ))
    };
    let port = authority.port_u16().filter(|p| *p != 0).ok_or_else(bad)?;
    let host = authority.host().trim_end_matches('.').to_ascii_lowercase();
    // Stricter than ztunnel (which takes any host): a DNS name, so that nothing else reaches the
    // store's lookups or the logs.
    if host.is_empty() || hickory_proto::rr::Name::from_ascii(&host).is_err() {
        return Err(bad());
    }
    Ok(Authority::Host { host, port })
}

/// What a CONNECT names: a workload's (or a VIP's) address, or a service by hostname (ztunnel's
/// `SvcHostname`, which its double-HBONE path through a network gateway sends).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Authority {
    Addr(SocketAddr),
    Host { host: String, port: u16 },
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn workload() -> Workload {
        let yaml = r#"
workloads:
- uid: c//v1/Pod/ns1/web-1
  name: web-1
  namespace: ns1
  serviceAccount: web
  workloadIps: ["10.0.0.1"]
  workloadType: deployment
  workloadName: web
  canonicalName: web-svc
  canonicalRevision: v2
  clusterId: cluster1
"#;
        let batch = crate::localconfig::parse(yaml).unwrap();
        let store = crate::store::Store::new();
        store.apply(batch);
        let snap = store.load();
        let addr = crate::model::NetworkAddr::new(
            std::sync::Arc::<str>::from(""),
            "10.0.0.1".parse().unwrap(),
        );
        (**snap.workload_by_addr(&addr).unwrap()).clone()
    }

    fn rng() -> rand::rngs::SmallRng {
        rand::rngs::SmallRng::seed_from_u64(7)
    }

    #[test]
    fn baggage_names_the_source() {
        assert_eq!(
            baggage(&workload()),
            "k8s.cluster.name=cluster1,k8s.namespace.name=ns1,k8s.deployment.name=web,\
             service.name=web-svc,service.version=v2"
        );
    }

    #[test]
    fn forwarded_brackets_ipv6() {
        assert_eq!(
            forwarded("10.1.2.3:4567".parse().unwrap()),
            "for=\"10.1.2.3:4567\""
        );
        assert_eq!(
            forwarded("[fd00::1]:80".parse().unwrap()),
            "for=\"[fd00::1]:80\""
        );
    }

    #[test]
    fn forwarded_header_names_the_client() {
        let h = |v: &str| {
            let mut m = http::HeaderMap::new();
            m.insert("forwarded", v.parse().unwrap());
            m
        };
        assert_eq!(
            forwarded_for(&h("for=\"10.0.0.1:34567\"")),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(
            forwarded_for(&h("for=\"[fd00::1]:80\"")),
            Some("fd00::1".parse().unwrap())
        );
        assert_eq!(
            forwarded_for(&h("proto=https;For=10.0.0.9")),
            Some("10.0.0.9".parse().unwrap())
        );
        // What a double-HBONE client sends: the host is not the address.
        assert_eq!(
            forwarded_for(&h("for=\"10.0.0.1:1\";host=echo.default.svc.cluster.local")),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(forwarded_for(&h("for=unknown")), None);
        assert_eq!(forwarded_for(&http::HeaderMap::new()), None);
    }

    #[test]
    fn traceparent_is_w3c() {
        let t = traceparent(&mut rng());
        let parts: Vec<&str> = t.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!(
            (parts[0], parts[1].len(), parts[2].len(), parts[3]),
            ("00", 32, 16, "00")
        );
        assert!(parts[1..3]
            .iter()
            .all(|p| p.chars().all(|c| c.is_ascii_hexdigit())));
    }

    #[test]
    fn connect_request_is_classic_connect() {
        let wl = workload();
        let req = connect_request(
            "10.0.0.2:8080".parse().unwrap(),
            "10.0.0.1:34567".parse().unwrap(),
            Some(&wl),
            &mut rng(),
        )
        .unwrap();
        assert_eq!(req.method(), Method::CONNECT);
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.2:8080");
        assert!(req.uri().scheme().is_none());
        assert!(req.uri().path_and_query().is_none());
        let h = req.headers();
        assert_eq!(h["forwarded"], "for=\"10.0.0.1:34567\"");
        assert!(h["baggage"]
            .to_str()
            .unwrap()
            .contains("k8s.namespace.name=ns1"));
        assert!(h["traceparent"].to_str().unwrap().starts_with("00-"));
        assert_eq!(
            validate(&req).unwrap(),
            Authority::Addr("10.0.0.2:8080".parse().unwrap())
        );

        let anon = connect_request(
            "[fd00::2]:80".parse().unwrap(),
            "[fd00::1]:1".parse().unwrap(),
            None,
            &mut rng(),
        )
        .unwrap();
        assert!(!anon.headers().contains_key("baggage"));
        assert_eq!(
            validate(&anon).unwrap(),
            Authority::Addr("[fd00::2]:80".parse().unwrap())
        );
    }

    #[test]
    fn validation_refuses_with_400() {
        let get = Request::get("http://10.0.0.2:80/").body(()).unwrap();
        let e = validate(&get).unwrap_err();
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let no_auth = Request::builder()
            .method(Method::CONNECT)
            .uri("/x")
            .body(())
            .unwrap();
        assert_eq!(validate(&no_auth).unwrap_err().status(), 400);
        let connect = |uri: &str| {
            Request::builder()
                .method(Method::CONNECT)
                .uri(uri)
                .body(())
                .unwrap()
        };
        // A service hostname is an authority (any case, a final dot).
        assert_eq!(
            validate(&connect("Web.NS1.svc.cluster.local.:80")).unwrap(),
            Authority::Host {
                host: "web.ns1.svc.cluster.local".into(),
                port: 80
            }
        );
        for bad in ["web.ns1.svc", "web..ns1:80", "web.ns1:0"] {
            assert_eq!(validate(&connect(bad)).unwrap_err().status(), 400, "{bad}");
        }
        let no_port = Request::builder()
            .method(Method::CONNECT)
            .uri("10.0.0.2")
            .body(())
            .unwrap();
        assert_eq!(validate(&no_port).unwrap_err().status(), 400);
    }

    #[test]
    fn outcomes_map_to_statuses() {
        assert_eq!(Outcome::Ok.status(), 200);
        let a = "1.2.3.4:5".parse().unwrap();
        assert_eq!(Outcome::AuthorityMismatch { authority: a }.status(), 400);
        assert_eq!(Outcome::Denied("x".into()).status(), 401);
        assert_eq!(Outcome::NoUpstream("x".into()).status(), 503);
    }
}
