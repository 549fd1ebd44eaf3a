//! Table-driven tests of the evaluation: every field and its `not_` form, every string match,
//! plaintext versus mutual TLS, then the combination rules (scopes, DENY over ALLOW, empty ALLOW,
//! dry run, several policies). Each row says what it expects and why.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::model::{
    Locality, PolicyScope, ServiceAccountMatch, TunnelProtocol, WorkloadStatus, WorkloadType,
    WorkloadUid,
};
use crate::store::{Batch, Store, Upsert};

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// A peer `spiffe://cluster.local/ns/<ns>/sa/<sa>` from 10.0.0.1 to 10.0.1.1:8080.
fn mtls(ns: &str, sa: &str) -> ConnCtx {
    ConnCtx {
        peer: Some(SpiffeId::new("cluster.local", ns, sa)),
        src_ip: ip("10.0.0.1"),
        dst_ip: ip("10.0.1.1"),
        dst_port: 8080,
    }
}

/// The same connection without identity.
fn plain() -> ConnCtx {
    ConnCtx {
        peer: None,
        ..mtls("x", "x")
    }
}

fn policy(ns: &str, name: &str, scope: PolicyScope, action: Action, rules: Rules) -> Authorization {
    Authorization {
        name: name.into(),
        namespace: ns.into(),
        scope,
        action,
        rules,
        dry_run: false,
    }
}

/// Rules (OR) of clauses (AND) of matches (OR).
type Rules = Vec<Vec<Vec<Match>>>;

fn one(m: Match) -> Rules {
    vec![vec![vec![m]]]
}

fn exact(s: &str) -> StringMatch {
    StringMatch::Exact(s.into())
}

fn sa(ns: &str, sa: &str) -> ServiceAccountMatch {
    ServiceAccountMatch {
        namespace: ns.into(),
        service_account: sa.into(),
    }
}

/// Whether the single match `m` matches `conn` (as a lone DENY policy: matched means denied).
fn hits(m: &Match, conn: &ConnCtx) -> bool {
    let p = policy(
        "default",
        "t",
        PolicyScope::Namespace,
        Action::Deny,
        one(m.clone()),
    );
    !evaluate_policies([&p], conn).is_allow()
}

#[test]
fn fields_and_their_not_forms() {
    let m = Match::default;
    let client = mtls("default", "client");
    let other_ns = mtls("prod", "client");
    // (why, match, connection, expected to match)
    #[rustfmt::skip]
    let rows: Vec<(&str, Match, ConnCtx, bool)> = vec![
        ("an empty match has no field to fail", m(), client.clone(), true),
        ("namespace hit", Match { namespaces: vec![exact("default")], ..m() }, client.clone(), true),
        ("namespace miss", Match { namespaces: vec![exact("default")], ..m() }, other_ns.clone(), false),
        ("one of several namespaces hits", Match { namespaces: vec![exact("a"), exact("prod")], ..m() }, other_ns.clone(), true),
        ("notNamespaces excludes the peer's", Match { not_namespaces: vec![exact("default")], ..m() }, client.clone(), false),
        ("notNamespaces of another passes", Match { not_namespaces: vec![exact("default")], ..m() }, other_ns.clone(), true),
        ("positive hit but excluded by not_: the not_ wins", Match { namespaces: vec![StringMatch::Presence], not_namespaces: vec![exact("default")], ..m() }, client.clone(), false),
        ("service account pair hits", Match { service_accounts: vec![sa("default", "client")], ..m() }, client.clone(), true),
        ("service account in another namespace misses", Match { service_accounts: vec![sa("default", "client")], ..m() }, other_ns.clone(), false),
        ("notServiceAccounts excludes", Match { not_service_accounts: vec![sa("default", "client")], ..m() }, client.clone(), false),
        ("notServiceAccounts of another passes", Match { not_service_accounts: vec![sa("default", "client")], ..m() }, other_ns.clone(), true),
        ("principal compares without spiffe://", Match { principals: vec![exact("cluster.local/ns/default/sa/client")], ..m() }, client.clone(), true),
        ("principal with the scheme never hits", Match { principals: vec![exact("spiffe://cluster.local/ns/default/sa/client")], ..m() }, client.clone(), false),
        ("notPrincipals excludes", Match { not_principals: vec![exact("cluster.local/ns/default/sa/client")], ..m() }, client.clone(), false),
        ("notPrincipals of another passes", Match { not_principals: vec![exact("cluster.local/ns/default/sa/client")], ..m() }, other_ns.clone(), true),
        ("source CIDR contains the peer IP", Match { source_ips: vec![net("10.0.0.0/24")], ..m() }, client.clone(), true),
        ("source CIDR misses", Match { source_ips: vec![net("10.9.0.0/16")], ..m() }, client.clone(), false),
        ("notSourceIps excludes", Match { not_source_ips: vec![net("10.0.0.1/32")], ..m() }, client.clone(), false),
        ("notSourceIps of another passes", Match { not_source_ips: vec![net("10.0.0.2/32")], ..m() }, client.clone(), true),
        ("IPv6 CIDR never contains an IPv4 peer", Match { source_ips: vec![net("::/0")], ..m() }, client.clone(), false),
        ("destination CIDR hits", Match { destination_ips: vec![net("10.0.1.0/24")], ..m() }, client.clone(), true),
        ("destination CIDR misses", Match { destination_ips: vec![net("10.0.2.0/24")], ..m() }, client.clone(), false),
        ("notDestinationIps excludes", Match { not_destination_ips: vec![net("10.0.1.1/32")], ..m() }, client.clone(), false),
        ("notDestinationIps of another passes", Match { not_destination_ips: vec![net("10.0.1.2/32")], ..m() }, client.clone(), true),
        ("destination port hits", Match { destination_ports: vec![80, 8080], ..m() }, client.clone(), true),
        ("destination port misses", Match { destination_ports: vec![80], ..m() }, client.clone(), false),
        ("notDestinationPorts excludes", Match { not_destination_ports: vec![8080], ..m() }, client.clone(), false),
        ("notDestinationPorts of another passes", Match { not_destination_ports: vec![5432], ..m() }, client.clone(), true),
        ("every populated field must pass: port hits, namespace misses", Match { destination_ports: vec![8080], namespaces: vec![exact("prod")], ..m() }, client.clone(), false),
        ("every populated field passes", Match { destination_ports: vec![8080], namespaces: vec![exact("default")], source_ips: vec![net("10.0.0.0/8")], ..m() }, client.clone(), true),
    ];
    for (why, m, conn, want) in rows {
        assert_eq!(hits(&m, &conn), want, "{why}");
    }
}

#[test]
fn string_match_kinds_on_principals() {
    let client = mtls("default", "client");
    // (why, string match, expected to hit `cluster.local/ns/default/sa/client`)
    #[rustfmt::skip]
    let rows = [
        ("exact equal", exact("cluster.local/ns/default/sa/client"), true),
        ("exact differs", exact("cluster.local/ns/default/sa/clien"), false),
        ("prefix of the trust domain form", StringMatch::Prefix("cluster.local/ns/default/".into()), true),
        ("prefix elsewhere", StringMatch::Prefix("cluster.local/ns/prod/".into()), false),
        ("suffix", StringMatch::Suffix("/sa/client".into()), true),
        ("suffix misses", StringMatch::Suffix("/sa/server".into()), false),
        ("presence: any identity", StringMatch::Presence, true),
    ];
    for (why, s, want) in rows {
        let pos = Match {
            principals: vec![s.clone()],
            ..Match::default()
        };
        assert_eq!(hits(&pos, &client), want, "principals {why}");
        let neg = Match {
            not_principals: vec![s],
            ..Match::default()
        };
        assert_eq!(hits(&neg, &client), !want, "notPrincipals {why}");
    }
    // Namespaces take the same kinds.
    let ns = |s| Match {
        namespaces: vec![s],
        ..Match::default()
    };
    assert!(hits(&ns(StringMatch::Prefix("def".into())), &client));
    assert!(hits(&ns(StringMatch::Suffix("ault".into())), &client));
    assert!(!hits(&ns(StringMatch::Suffix("prod".into())), &client));
}

#[test]
fn plaintext_never_hits_identity_fields() {
    let m = Match::default;
    // (why, match, expected to match a plaintext connection)
    #[rustfmt::skip]
    let rows: Vec<(&str, Match, bool)> = vec![
        ("namespaces need an identity", Match { namespaces: vec![StringMatch::Presence], ..m() }, false),
        ("service accounts need an identity", Match { service_accounts: vec![sa("x", "x")], ..m() }, false),
        ("principals, even presence, need an identity", Match { principals: vec![StringMatch::Presence], ..m() }, false),
        ("notNamespaces: nothing to exclude", Match { not_namespaces: vec![exact("x")], ..m() }, true),
        ("notServiceAccounts: nothing to exclude", Match { not_service_accounts: vec![sa("x", "x")], ..m() }, true),
        ("notPrincipals: nothing to exclude (so a DENY on notPrincipals denies plaintext)", Match { not_principals: vec![StringMatch::Presence], ..m() }, true),
        ("IP and port fields apply to plaintext", Match { source_ips: vec![net("10.0.0.1/32")], destination_ports: vec![8080], ..m() }, true),
    ];
    for (why, m, want) in rows {
        assert_eq!(hits(&m, &plain()), want, "{why}");
    }
    // The same connection with mutual TLS hits the identity fields.
    assert!(hits(
        &Match {
            principals: vec![StringMatch::Presence],
            ..m()
        },
        &mtls("x", "x")
    ));
}

#[test]
fn rule_structure() {
    let port = |p| Match {
        destination_ports: vec![p],
        ..Match::default()
    };
    let c = mtls("default", "client");
    // (why, rules, expected to match a connection to port 8080)
    #[rustfmt::skip]
    let rows: Vec<(&str, Rules, bool)> = vec![
        ("no rules matches nothing", vec![], false),
        ("a rule without clauses matches (vacuous AND)", vec![vec![]], true),
        ("a clause without matches matches nothing (empty OR)", vec![vec![vec![]]], false),
        ("rules are OR", vec![vec![vec![port(1)]], vec![vec![port(8080)]]], true),
        ("clauses are AND: one fails", vec![vec![vec![port(8080)], vec![port(1)]]], false),
        ("clauses are AND: all pass", vec![vec![vec![port(8080)], vec![Match::default()]]], true),
        ("matches are OR", vec![vec![vec![port(1), port(8080)]]], true),
    ];
    for (why, rules, want) in rows {
        let p = policy("default", "t", PolicyScope::Namespace, Action::Deny, rules);
        assert_eq!(!evaluate_policies([&p], &c).is_allow(), want, "{why}");
    }
}

fn deny_port(name: &str, p: u16) -> Authorization {
    let m = Match {
        destination_ports: vec![p],
        ..Match::default()
    };
    policy(
        "default",
        name,
        PolicyScope::Namespace,
        Action::Deny,
        one(m),
    )
}

fn allow_ns(name: &str, ns: &str) -> Authorization {
    let m = Match {
        namespaces: vec![exact(ns)],
        ..Match::default()
    };
    policy(
        "default",
        name,
        PolicyScope::Namespace,
        Action::Allow,
        one(m),
    )
}

fn dry(mut p: Authorization) -> Authorization {
    p.dry_run = true;
    p
}

fn key(s: &str) -> PolicyKey {
    PolicyKey(s.into())
}

fn deny(policy: &str, reason: DenyReason) -> Verdict {
    Verdict::Deny {
        policy: key(policy),
        reason,
    }
}

fn allow(policy: Option<&str>) -> Verdict {
    Verdict::Allow {
        policy: policy.map(key),
    }
}

#[test]
fn combination_rules() {
    let c = mtls("default", "client");
    // (why, policies, expected verdict)
    #[rustfmt::skip]
    let rows: Vec<(&str, Vec<Authorization>, Verdict)> = vec![
        ("no policy: allow", vec![], allow(None)),
        ("a DENY that does not match: allow", vec![deny_port("d", 1)], allow(None)),
        ("a matching DENY rejects", vec![deny_port("d", 8080)], deny("default/d", DenyReason::DenyMatched)),
        ("DENY wins over a matching ALLOW", vec![allow_ns("a", "default"), deny_port("d", 8080)], deny("default/d", DenyReason::DenyMatched)),
        ("an ALLOW applies and matches", vec![allow_ns("a", "default")], allow(Some("default/a"))),
        ("an ALLOW applies and none matches: deny", vec![allow_ns("a", "prod")], deny("default/a", DenyReason::NoAllowMatched)),
        ("one of several ALLOWs matching suffices", vec![allow_ns("a", "prod"), allow_ns("b", "default")], allow(Some("default/b"))),
        ("an ALLOW without rules applies and matches nothing: deny all", vec![policy("default", "empty", PolicyScope::Namespace, Action::Allow, vec![])], deny("default/empty", DenyReason::NoAllowMatched)),
        ("a DENY without rules denies nothing", vec![policy("default", "empty", PolicyScope::Namespace, Action::Deny, vec![])], allow(None)),
        ("several matching DENYs: the smallest key is named", vec![deny_port("z", 8080), deny_port("b", 8080)], deny("default/b", DenyReason::DenyMatched)),
        ("a dry-run DENY that matches is not enforced", vec![dry(deny_port("d", 8080))], allow(None)),
        ("a dry-run ALLOW does not make ALLOWs apply", vec![dry(allow_ns("a", "prod"))], allow(None)),
        ("a dry-run ALLOW does not rescue an unmatched enforced ALLOW", vec![allow_ns("a", "prod"), dry(allow_ns("b", "default"))], deny("default/a", DenyReason::NoAllowMatched)),
    ];
    for (why, ps, want) in rows {
        assert_eq!(evaluate_policies(&ps, &c).verdict, want, "{why}");
    }
}

#[test]
fn dry_run_outcomes_are_reported() {
    let c = mtls("default", "client");
    let ps = [
        dry(deny_port("d", 8080)),
        dry(allow_ns("a", "prod")),
        deny_port("e", 1),
    ];
    let d = evaluate_policies(&ps, &c);
    assert_eq!(d.verdict, allow(None));
    assert_eq!(
        d.dry_run,
        vec![
            DryRun {
                policy: key("default/a"),
                action: Action::Allow,
                matched: false
            },
            DryRun {
                policy: key("default/d"),
                action: Action::Deny,
                matched: true
            },
        ],
        "both dry-run policies are reported, sorted; the enforced one is not"
    );
}

fn workload(ns: &str, selected: &[&str]) -> Workload {
    Workload {
        uid: WorkloadUid(format!("c//v1/Pod/{ns}/w").into()),
        name: "w".into(),
        namespace: ns.into(),
        service_account: "w".into(),
        trust_domain: "cluster.local".into(),
        addresses: vec![ip("10.0.1.1")],
        hostname: String::new(),
        network: "".into(),
        protocol: TunnelProtocol::Hbone,
        waypoint: None,
        network_gateway: None,
        node: "n".into(),
        canonical_name: String::new(),
        canonical_revision: String::new(),
        workload_type: WorkloadType::Pod,
        workload_name: String::new(),
        native_tunnel: false,
        application_tunnel: None,
        services: BTreeMap::new(),
        authorization_policies: selected.iter().map(|s| s.to_string()).collect(),
        status: WorkloadStatus::Healthy,
        cluster_id: String::new(),
        locality: Locality::default(),
        host_network: false,
        capacity: 1,
    }
}

#[test]
fn scopes_select_the_applicable_policies() {
    let all = Match::default;
    let deny_all = |ns: &str, name: &str, scope| policy(ns, name, scope, Action::Deny, one(all()));
    let store = Store::new();
    store.apply(Batch {
        upserts: vec![
            Upsert::Policy(deny_all("istio-system", "global", PolicyScope::Global)),
            Upsert::Policy(deny_all("prod", "ns-prod", PolicyScope::Namespace)),
            Upsert::Policy(deny_all("web", "ns-web", PolicyScope::Namespace)),
            Upsert::Policy(deny_all("prod", "selected", PolicyScope::WorkloadSelector)),
            Upsert::Policy(deny_all("prod", "unlisted", PolicyScope::WorkloadSelector)),
            // Listed by the workload but namespace-scoped: applies through its namespace only.
            Upsert::Policy(deny_all("other", "listed-ns", PolicyScope::Namespace)),
        ],
        ..Batch::default()
    });
    let snap = store.load();
    let c = mtls("default", "client");
    let applied = |w: &Workload| {
        let mut keys: Vec<String> = snap
            .policies_for(w)
            .map(|p| p.key().0.to_string())
            .collect();
        keys.sort();
        keys
    };
    // (why, workload, expected applicable policies)
    #[rustfmt::skip]
    let rows: Vec<(&str, Workload, Vec<&str>)> = vec![
        ("global applies everywhere; other namespaces' do not", workload("dev", &[]), vec!["istio-system/global"]),
        ("its namespace's policies apply", workload("web", &[]), vec!["istio-system/global", "web/ns-web"]),
        ("workload-selector policies apply only when listed", workload("prod", &["prod/selected", "other/listed-ns"]), vec!["istio-system/global", "prod/ns-prod", "prod/selected"]),
    ];
    for (why, w, want) in rows {
        assert_eq!(applied(&w), want, "{why}");
        assert!(
            !evaluate(&snap, &w, &c).is_allow(),
            "{why}: the global DENY-all decides"
        );
    }
    // Without the global policy, an unlisted workload-selector policy does not deny.
    store.apply(Batch {
        removals: vec![crate::store::Removal::Policy(key("istio-system/global"))],
        ..Batch::default()
    });
    let snap = store.load();
    assert!(evaluate(&snap, &workload("dev", &[]), &c).is_allow());
    // Listed, it applies (istiod lists exactly the policies that select a workload).
    let d = evaluate(&snap, &workload("dev", &["prod/unlisted"]), &c);
    assert_eq!(d.policy(), Some(&key("prod/unlisted")));
    let d = evaluate(&snap, &workload("prod", &["prod/selected"]), &c);
    assert_eq!(
        d.policy(),
        Some(&key("prod/ns-prod")),
        "smallest matching key"
    );
}

#[test]
fn plaintext_versus_mtls_under_one_allow() {
    // ALLOW only identities of "default": a plaintext peer has none and is denied.
    let ps = [allow_ns("a", "default")];
    assert!(evaluate_policies(&ps, &mtls("default", "client")).is_allow());
    assert_eq!(
        evaluate_policies(&ps, &plain()).verdict,
        deny("default/a", DenyReason::NoAllowMatched)
    );
    // DENY all but one principal: plaintext has no principal to exclude, so it is denied.
    let m = Match {
        not_principals: vec![exact("cluster.local/ns/default/sa/client")],
        ..Match::default()
    };
    let ps = [policy(
        "default",
        "d",
        PolicyScope::Namespace,
        Action::Deny,
        one(m),
    )];
    assert!(evaluate_policies(&ps, &mtls("default", "client")).is_allow());
    assert!(!evaluate_policies(&ps, &mtls("default", "other")).is_allow());
    assert!(!evaluate_policies(&ps, &plain()).is_allow());
}
