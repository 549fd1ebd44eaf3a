//! Which mesh name a query asks for, and its addresses: pure lookups in one store snapshot, as
//! ztunnel's DNS server decides them.
//!
//! Checked against Istio's ztunnel side by side (`tests/integration/dns_ztunnel.rs`). A name is
//! tried as asked, and for a client whose namespace is known completed as a Kubernetes name when
//! it is a partial one (`echo`, `echo.ns`, `echo.ns.svc`): found so, the records are given under
//! the name asked (`echo. A <vip>`). Then each of the client's search domains is stripped (in
//! dedicated mode the pod's resolv.conf `search` list, in shared mode `<ns>.svc.<domain>`,
//! `svc.<domain>`, `<domain>`) and the rest tried the same way: found so, the answer is a CNAME
//! from the name asked to the stripped name, then the stripped name's records.
//!
//! Each candidate matches, in order: a service with that hostname (several may share one: the
//! client's namespace wins, then the canonical service, then `PREFERED_SERVICE_NAMESPACE`, then
//! the first registered); with `L4MESH_DNS_HEADLESS_PODS`, a pod of a headless Kubernetes service
//! (`<pod>.<service hostname>`); a wildcard host above it (`*.example.com` for `a.example.com`),
//! the most specific first. As in ztunnel, a service with that hostname that cannot be answered
//! (no VIP, not headless) does not stop the search: a wildcard above it still matches.
//!
//! A service answers with its VIPs on the client's network: when it has VIPs only on others, the
//! answer is empty (NOERROR), as ztunnel's. A service without VIPs is answered only when it is a
//! headless Kubernetes service (its hostname under `svc.<cluster domain>`): with the addresses of
//! its healthy endpoints on the client's network. Other services without VIPs (DNS-resolved
//! ServiceEntries) are left to the upstream resolvers.

use std::net::IpAddr;
use std::sync::Arc;

use crate::model::{best_match, Service, Visibility, Workload, WorkloadStatus};
use crate::store::Snapshot;

/// A mesh name found for a query.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The name the records are given under: the mesh's name for an alias, else the name asked.
    pub canonical: String,
    /// The query's name is another spelling of a mesh name (search domains): answer with a CNAME
    /// to [`Found::canonical`] first.
    pub alias: bool,
    /// Every address of the name on the client's network, both families (may be empty: the name
    /// exists, without an address the client can use).
    pub addrs: Vec<IpAddr>,
}

/// The client of a query, as far as it matters for names.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    /// The client's namespace (partial Kubernetes names are completed in it), when its workload
    /// is known.
    pub namespace: Option<&'a str>,
    /// The network whose addresses are answered.
    pub network: &'a str,
    /// The client's search domains: dedicated mode reads them from the pod's resolv.conf, as
    /// ztunnel; `None` (shared mode): `<ns>.svc.<domain>`, `svc.<domain>`, `<domain>`.
    pub search: Option<&'a [String]>,
}

/// How names are matched: the same for every client of one proxy.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NameRules {
    /// `CLUSTER_DOMAIN`: the suffix of Kubernetes names.
    pub cluster_domain: String,
    /// `PREFERED_SERVICE_NAMESPACE` (ztunnel's spelling): among services sharing a hostname, none
    /// of them in the client's namespace and none canonical, the one in this namespace.
    pub preferred_namespace: Option<String>,
    /// `L4MESH_DNS_RESPECT_VISIBILITY`: a service whose visibility is its own namespace is not
    /// answered to clients of other namespaces (stricter than ztunnel, which answers everyone;
    /// off by default).
    pub respect_visibility: bool,
    /// `L4MESH_DNS_HEADLESS_PODS`: a headless service's pods are answered by name
    /// (`<pod>.<service>.<ns>.svc.<domain>`) from the store, as ztunnel's newest source does;
    /// off by default, as the ztunnel release l4mesh is compared with (they are forwarded, and
    /// the cluster's DNS answers them).
    pub headless_pods: bool,
}

impl NameRules {
    /// ztunnel's rules for `cluster_domain`.
    pub fn new(cluster_domain: &str) -> NameRules {
        NameRules {
            cluster_domain: cluster_domain.to_owned(),
            preferred_namespace: None,
            respect_visibility: false,
            headless_pods: false,
        }
    }
}

/// The mesh name `qname` (lower case, without the final dot) stands for, or `None` (not a mesh
/// name: forward it).
pub fn lookup(
    snapshot: &Snapshot,
    qname: &str,
    client: Client<'_>,
    rules: &NameRules,
) -> Option<Found> {
    // `name` as it is, else completed as a Kubernetes name: the records are given under `name`
    // (ztunnel answers `echo` with `echo. A <vip>`, no CNAME).
    let as_named = |name: &str| {
        host(snapshot, name, client, rules).or_else(|| {
            let ns = client.namespace?;
            kube_fqdns(name, ns, &rules.cluster_domain)
                .iter()
                .find_map(|c| host(snapshot, c, client, rules))
        })
    };
    if let Some((addrs, _)) = as_named(qname) {
        return Some(Found {
            canonical: qname.to_owned(),
            alias: false,
            addrs,
        });
    }
    let derived;
    let searches: &[String] = match client.search {
        Some(list) => list,
        None => {
            let (Some(ns), domain) = (client.namespace, rules.cluster_domain.as_str()) else {
                return None;
            };
            derived = [
                format!("{ns}.svc.{domain}"),
                format!("svc.{domain}"),
                domain.to_owned(),
            ];
            &derived
        }
    };
    for search in searches {
        let Some(stripped) = qname
            .strip_suffix(search.as_str())
            .and_then(|s| s.strip_suffix('.'))
            .filter(|s| !s.is_empty())
        else {
            continue;
        };
        if let Some((addrs, wildcard)) = as_named(stripped) {
            // The resolver appended a search domain: a CNAME to the name without it, then that
            // name's records (a wildcard's records under the name asked, with no CNAME).
            return Some(Found {
                canonical: if wildcard { qname } else { stripped }.to_owned(),
                alias: !wildcard,
                addrs,
            });
        }
    }
    None
}

/// The Kubernetes names a partial one may stand for, as ztunnel expands them: one label is a
/// service of the client's namespace, two are `<service>.<namespace>`, three ending in `svc`
/// lack only the cluster domain; and the names of a headless service's pods, `<pod>.<service>`,
/// `<pod>.<service>.<namespace>`, `<pod>.<service>.<namespace>.svc`.
fn kube_fqdns(name: &str, ns: &str, domain: &str) -> Vec<String> {
    let labels: Vec<&str> = name.split('.').collect();
    let mut out = Vec::new();
    match labels.as_slice() {
        [_] => out.push(format!("{name}.{ns}.svc.{domain}")),
        [_, _] => {
            out.push(format!("{name}.svc.{domain}"));
            out.push(format!("{name}.{ns}.svc.{domain}"));
        }
        [_, _, last] => {
            if *last == "svc" {
                out.push(format!("{name}.{domain}"));
            }
            out.push(format!("{name}.svc.{domain}"));
        }
        [_, _, _, "svc"] => out.push(format!("{name}.{domain}")),
        _ => {}
    }
    out
}

/// The addresses of `name` if the mesh knows it (a service, a headless service's pod, a wildcard
/// host), and whether it matched through a wildcard.
fn host(
    snapshot: &Snapshot,
    name: &str,
    client: Client<'_>,
    rules: &NameRules,
) -> Option<(Vec<IpAddr>, bool)> {
    let services = snapshot
        .services_by_hostname(name)
        .filter(|s| visible(s, client, rules))
        .filter(|s| !s.vips.is_empty() || headless(s, &rules.cluster_domain));
    if let Some(svc) = best(services, client, rules) {
        return Some((addresses(snapshot, svc, client), false));
    }
    if let Some(addrs) = rules
        .headless_pods
        .then(|| headless_pod(snapshot, name, client, rules))
        .flatten()
    {
        return Some((addrs, false));
    }
    // `a.b.example.com`: `*.b.example.com`, then `*.example.com`, then `*.com`.
    let mut rest = name;
    while let Some((_, parent)) = rest.split_once('.') {
        let wildcard = format!("*.{parent}");
        let services = snapshot
            .services_by_hostname(&wildcard)
            .filter(|s| visible(s, client, rules) && !s.vips.is_empty());
        if let Some(svc) = best(services, client, rules) {
            return Some((vips(svc, client), true));
        }
        rest = parent;
    }
    None
}

/// `<pod>.<headless service hostname>`: the addresses of that pod when it is an endpoint of the
/// service (Kubernetes names a headless service's pods so, StatefulSets above all).
fn headless_pod(
    snapshot: &Snapshot,
    name: &str,
    client: Client<'_>,
    rules: &NameRules,
) -> Option<Vec<IpAddr>> {
    let (pod, service_host) = name.split_once('.')?;
    let services = snapshot
        .services_by_hostname(service_host)
        .filter(|s| visible(s, client, rules) && headless(s, &rules.cluster_domain));
    let svc = best(services, client, rules)?;
    let addrs: Vec<IpAddr> = snapshot
        .endpoints(&svc.key())
        .filter(|(wl, _)| wl.name == pod)
        .flat_map(|(wl, _)| endpoint_addrs(wl, client))
        .collect();
    (!addrs.is_empty()).then_some(addrs)
}

/// Among services sharing a hostname, the one a client means ([`best_match`], with the
/// preferred namespace).
fn best<'a>(
    services: impl Iterator<Item = &'a Arc<Service>>,
    client: Client<'_>,
    rules: &NameRules,
) -> Option<&'a Arc<Service>> {
    best_match(
        services,
        client.namespace,
        rules.preferred_namespace.as_deref(),
    )
}

fn visible(s: &Service, client: Client<'_>, rules: &NameRules) -> bool {
    !rules.respect_visibility
        || s.visibility == Visibility::Public
        || client.namespace == Some(s.namespace.as_str())
}

/// A Kubernetes service without a cluster IP: its name resolves to its pods.
fn headless(s: &Service, cluster_domain: &str) -> bool {
    s.vips.is_empty()
        && s.hostname
            .strip_suffix(cluster_domain)
            .is_some_and(|h| h.ends_with(".svc."))
}

fn addresses(snapshot: &Snapshot, svc: &Service, client: Client<'_>) -> Vec<IpAddr> {
    if !svc.vips.is_empty() {
        return vips(svc, client);
    }
    snapshot
        .endpoints(&svc.key())
        .flat_map(|(wl, _)| endpoint_addrs(wl, client))
        .collect()
}

fn vips(svc: &Service, client: Client<'_>) -> Vec<IpAddr> {
    svc.vips
        .iter()
        .filter(|v| &*v.network == client.network)
        .map(|v| v.ip)
        .collect()
}

/// A healthy endpoint's first address of each family, when it is on the client's network.
fn endpoint_addrs(wl: &Workload, client: Client<'_>) -> Vec<IpAddr> {
    if wl.status != WorkloadStatus::Healthy || &*wl.network != client.network {
        return Vec::new();
    }
    let v4 = wl.addresses.iter().find(|a| a.is_ipv4());
    let v6 = wl.addresses.iter().find(|a| a.is_ipv6());
    v4.into_iter().chain(v6).copied().collect()
}

#[cfg(test)]
mod tests;
