//! Which mesh name a query asks for, and its addresses: pure lookups in one store snapshot.
//!
//! A client's resolver appends its search domains to short names (`echo` → `echo.<ns>.svc.
//! cluster.local`, `echo.other` → `echo.other.<ns>.svc.cluster.local`, …), so a name not found
//! as asked is completed as a Kubernetes name when it is a partial one (`echo`, `echo.ns`,
//! `echo.ns.svc`), then tried with each of the client's search domains stripped (and the
//! stripped name completed the same way); a match found
//! that way is answered as an alias (a CNAME to the canonical name, then its addresses), as
//! ztunnel does. Wildcard hosts (`*.example.com`) match any name below them, the longest first.

use std::net::IpAddr;

use crate::model::Service;
use crate::store::Snapshot;

/// A mesh name found for a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The name the mesh knows (a service hostname; for a wildcard host, the name asked).
    pub canonical: String,
    /// The query's name is another spelling of it (search domains): answer with a CNAME first.
    pub alias: bool,
    /// Every address of the name on the client's network, both families.
    pub addrs: Vec<IpAddr>,
}

/// The client of a query, as far as it matters for names.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// The client's namespace (its search domains follow from it), when its workload is known.
    pub namespace: Option<&'a str>,
    /// The network whose addresses are answered.
    pub network: &'a str,
}

/// The mesh name `qname` (lower case, without the final dot) stands for, or `None` (not a mesh
/// name: forward it).
pub fn lookup(
    snapshot: &Snapshot,
    qname: &str,
    client: Client<'_>,
    cluster_domain: &str,
) -> Option<Found> {
    if let Some(f) = exact(snapshot, qname, client.network) {
        return Some(f);
    }
    let ns = client.namespace?;
    // A partial Kubernetes name asked as it is (`echo`, `echo.ns`, `echo.ns.svc`).
    if let Some(mut f) = kube_fqdns(qname, ns, cluster_domain)
        .iter()
        .find_map(|c| exact(snapshot, c, client.network))
    {
        f.alias = true;
        return Some(f);
    }
    let searches = [
        format!("{ns}.svc.{cluster_domain}"),
        format!("svc.{cluster_domain}"),
        cluster_domain.to_owned(),
    ];
    for search in &searches {
        let Some(stripped) = qname
            .strip_suffix(search.as_str())
            .and_then(|s| s.strip_suffix('.'))
            .filter(|s| !s.is_empty())
        else {
            continue;
        };
        let candidates =
            std::iter::once(stripped.to_owned()).chain(kube_fqdns(stripped, ns, cluster_domain));
        for c in candidates {
            if let Some(mut f) = exact(snapshot, &c, client.network) {
                f.alias = f.canonical != qname;
                return Some(f);
            }
        }
    }
    None
}

/// The Kubernetes names a partial one may stand for, as ztunnel expands them: one label is a
/// service of the client's namespace, two are `<service>.<namespace>`, three ending in `svc`
/// lack only the cluster domain.
fn kube_fqdns(name: &str, ns: &str, domain: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    match labels.as_slice() {
        [_] => vec![format!("{name}.{ns}.svc.{domain}")],
        [_, _] => vec![format!("{name}.svc.{domain}")],
        [_, _, "svc"] => vec![format!("{name}.{domain}")],
        _ => Vec::new(),
    }
}

/// A service with exactly this hostname, else the most specific wildcard host above it; a
/// service without an address on the client's network is not answered here (as ztunnel, the
/// upstream resolvers may know it).
fn exact(snapshot: &Snapshot, name: &str, network: &str) -> Option<Found> {
    if let Some(svc) = snapshot.service_by_hostname(name) {
        return Some(found(svc, svc.hostname.clone(), network)).filter(|f| !f.addrs.is_empty());
    }
    snapshot
        .services()
        .filter(|s| {
            s.hostname
                .strip_prefix('*')
                .is_some_and(|suffix| suffix.starts_with('.') && name.ends_with(suffix))
        })
        .max_by_key(|s| s.hostname.len())
        .map(|svc| found(svc, name.to_owned(), network))
        .filter(|f| !f.addrs.is_empty())
}

fn found(svc: &Service, canonical: String, network: &str) -> Found {
    Found {
        canonical,
        alias: false,
        addrs: svc
            .vips
            .iter()
            .filter(|v| &*v.network == network)
            .map(|v| v.ip)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> std::sync::Arc<Snapshot> {
        let yaml = r#"
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
"#;
        let store = crate::store::Store::new();
        store.apply(crate::localconfig::parse(yaml).unwrap());
        store.load()
    }

    const C: Client<'static> = Client {
        namespace: Some("default"),
        network: "",
    };

    fn ips(f: &Found) -> Vec<String> {
        f.addrs.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn canonical_names_answer_every_address() {
        let s = snapshot();
        let f = lookup(&s, "echo.default.svc.cluster.local", C, "cluster.local").unwrap();
        assert!(!f.alias);
        assert_eq!(ips(&f), ["10.9.0.1", "fd00::1"]);
        let f = lookup(&s, "db.external.test", C, "cluster.local").unwrap();
        assert_eq!(ips(&f), ["10.9.0.5"]);
        // Unknown client: only exact names.
        let anon = Client {
            namespace: None,
            network: "",
        };
        assert!(lookup(&s, "echo.default.svc.cluster.local", anon, "cluster.local").is_some());
        assert!(lookup(
            &s,
            "echo.default.default.svc.cluster.local",
            anon,
            "cluster.local"
        )
        .is_none());
    }

    #[test]
    fn search_domains_are_stripped_and_answered_as_aliases() {
        let s = snapshot();
        for q in [
            // `echo.default` from a pod of `default`: the first search domain appended.
            "echo.default.default.svc.cluster.local",
            // `echo.default.svc` with `svc.cluster.local` appended by the resolver.
            "echo.default.svc.svc.cluster.local",
            // The full name with a search domain appended (ndots).
            "echo.default.svc.cluster.local.default.svc.cluster.local",
        ] {
            let f = lookup(&s, q, C, "cluster.local").unwrap_or_else(|| panic!("{q}"));
            assert!(f.alias, "{q}");
            assert_eq!(f.canonical, "echo.default.svc.cluster.local", "{q}");
        }
        // Another namespace's service by `<name>.<namespace>`.
        let f = lookup(
            &s,
            "api.other.default.svc.cluster.local",
            C,
            "cluster.local",
        )
        .unwrap();
        assert_eq!(f.canonical, "api.other.svc.cluster.local");
        // A short name resolves only in the client's own namespace.
        assert!(lookup(&s, "api.default.svc.cluster.local", C, "cluster.local").is_none());
        // Partial names asked as they are (no search list on the client).
        for q in ["echo", "echo.default", "echo.default.svc"] {
            let f = lookup(&s, q, C, "cluster.local").unwrap_or_else(|| panic!("{q}"));
            assert_eq!(
                (f.canonical.as_str(), f.alias),
                ("echo.default.svc.cluster.local", true)
            );
        }
        // Not a mesh name: forwarded.
        assert!(lookup(&s, "example.org", C, "cluster.local").is_none());
        assert!(lookup(&s, "nope.default.svc.cluster.local", C, "cluster.local").is_none());
    }

    #[test]
    fn wildcards_match_below_them_the_longest_first() {
        let s = snapshot();
        let f = lookup(&s, "a.example.com", C, "cluster.local").unwrap();
        assert_eq!(
            (f.canonical.as_str(), ips(&f)),
            ("a.example.com", vec!["10.9.0.3".to_owned()])
        );
        let f = lookup(&s, "x.deep.example.com", C, "cluster.local").unwrap();
        assert_eq!(ips(&f), ["10.9.0.4"]);
        // No address on the client's network: left to the upstream resolvers.
        assert!(lookup(&s, "dns-only.external.test", C, "cluster.local").is_none());
        // The wildcard's own base name is not below it.
        assert!(lookup(&s, "example.com", C, "cluster.local").is_none());
    }
}
