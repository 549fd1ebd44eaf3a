//! L4 authorization: may this connection reach this destination workload? Istio's semantics
//! (wire-facts §4), evaluated against one store [`Snapshot`].
//!
//! Role: the pure decision behind the inbound listeners (HBONE and plaintext) and the live
//! re-check of established connections (`proxy::conn_tracker`). Layer 3: reads the snapshot only.
//!
//! Semantics, exactly:
//! - applicable policies: GLOBAL, NAMESPACE of the destination's namespace, and the
//!   WORKLOAD_SELECTOR ones the workload lists ([`Snapshot::policies_for`]);
//! - a matching enforced DENY rejects; else if no enforced ALLOW applies, allow; else allow only
//!   if an ALLOW matches; dry-run policies are evaluated and reported, never enforced;
//! - policy = any rule (no rules: matches nothing); rule = all clauses; clause = any match;
//!   match = every populated field passes; field = (positive list empty or one entry hits) and
//!   (`not_` list empty or no entry hits).
//!
//! Plaintext peers (no identity): the identity fields (`namespaces`, `service_accounts`,
//! `principals`) never *hit*, as in ztunnel. So a positive identity list fails for them, and a
//! `not_` identity list passes (there is nothing to exclude). This is also the secure reading for
//! DENY: a DENY with `notPrincipals: [X]` denies plaintext peers, as Envoy does.
//!
//! Invariants: no I/O, no locks, no panics on any policy content. The deciding policy is the
//! smallest key among the candidates, so the logged name is deterministic.
//! Does not: validate policies (that is `model::convert`), log (callers do), or cache.

#[cfg(test)]
mod tests;

use std::net::IpAddr;

use ipnet::IpNet;

use crate::model::{Action, Authorization, Match, PolicyKey, SpiffeId, StringMatch, Workload};
use crate::store::Snapshot;

/// What is known of a connection when it is authorized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnCtx {
    /// The identity the peer proved with mutual TLS; `None` for plaintext.
    pub peer: Option<SpiffeId>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

/// Why a connection was denied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyReason {
    /// An enforced DENY policy matched.
    DenyMatched,
    /// Enforced ALLOW policies apply, and none matched.
    NoAllowMatched,
}

impl DenyReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DenyReason::DenyMatched => "a DENY policy matched",
            DenyReason::NoAllowMatched => "ALLOW policies apply and none matched",
        }
    }
}

/// The enforced outcome.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `policy` is the ALLOW policy that matched, `None` when no ALLOW policy applies.
    Allow { policy: Option<PolicyKey> },
    /// `policy` is the matching DENY policy; for [`DenyReason::NoAllowMatched`], one of the ALLOW
    /// policies that did not match (so operators know where to look).
    Deny {
        policy: PolicyKey,
        reason: DenyReason,
    },
}

/// A dry-run policy's outcome: evaluated, reported, never enforced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DryRun {
    pub policy: PolicyKey,
    pub action: Action,
    /// Whether it matched: a matched DENY would have denied, a matched ALLOW would have allowed.
    pub matched: bool,
}

/// The verdict and the dry-run outcomes of one evaluation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub verdict: Verdict,
    pub dry_run: Vec<DryRun>,
}

impl Decision {
    pub fn is_allow(&self) -> bool {
        matches!(self.verdict, Verdict::Allow { .. })
    }

    /// The deciding policy, if any, for logs.
    pub fn policy(&self) -> Option<&PolicyKey> {
        match &self.verdict {
            Verdict::Allow { policy } => policy.as_ref(),
            Verdict::Deny { policy, .. } => Some(policy),
        }
    }
}

/// Decides whether `conn` may reach `dst`, under the policies of `snapshot`.
pub fn evaluate(snapshot: &Snapshot, dst: &Workload, conn: &ConnCtx) -> Decision {
    evaluate_policies(snapshot.policies_for(dst).map(|p| &**p), conn)
}

/// [`evaluate`] over an explicit list of applicable policies.
pub fn evaluate_policies<'a>(
    policies: impl IntoIterator<Item = &'a Authorization>,
    conn: &ConnCtx,
) -> Decision {
    // Computed once: principals compare against it for every match.
    let principal = conn.peer.as_ref().map(SpiffeId::principal);
    let peer = Peer {
        id: conn.peer.as_ref(),
        principal: principal.as_deref(),
    };
    let mut dry_run = Vec::new();
    let mut deny: Option<PolicyKey> = None;
    let mut allowed: Option<PolicyKey> = None;
    let mut unmatched_allow: Option<PolicyKey> = None;
    for p in policies {
        let matched = policy_matches(p, conn, &peer);
        if p.dry_run {
            dry_run.push(DryRun {
                policy: p.key(),
                action: p.action,
                matched,
            });
            continue;
        }
        let slot = match (p.action, matched) {
            (Action::Deny, true) => &mut deny,
            (Action::Deny, false) => continue,
            (Action::Allow, true) => &mut allowed,
            (Action::Allow, false) => &mut unmatched_allow,
        };
        let key = p.key();
        if slot.as_ref().is_none_or(|k| key < *k) {
            *slot = Some(key);
        }
    }
    dry_run.sort_by(|a, b| a.policy.cmp(&b.policy));
    let verdict = if let Some(policy) = deny {
        Verdict::Deny {
            policy,
            reason: DenyReason::DenyMatched,
        }
    } else if allowed.is_some() {
        Verdict::Allow { policy: allowed }
    } else if let Some(policy) = unmatched_allow {
        Verdict::Deny {
            policy,
            reason: DenyReason::NoAllowMatched,
        }
    } else {
        Verdict::Allow { policy: None }
    };
    Decision { verdict, dry_run }
}

/// The peer's identity in the forms the fields compare against.
struct Peer<'a> {
    id: Option<&'a SpiffeId>,
    principal: Option<&'a str>,
}

/// Any rule matches; a policy without rules matches nothing.
fn policy_matches(p: &Authorization, conn: &ConnCtx, peer: &Peer<'_>) -> bool {
    p.rules.iter().any(|rule| {
        rule.iter()
            .all(|clause| clause.iter().any(|m| match_matches(m, conn, peer)))
    })
}

/// A field passes if its positive list is empty or one entry hits, and its `not_` list is empty
/// or no entry hits.
fn field<T>(pos: &[T], neg: &[T], hit: impl Fn(&T) -> bool) -> bool {
    (pos.is_empty() || pos.iter().any(&hit)) && !neg.iter().any(&hit)
}

fn match_matches(m: &Match, conn: &ConnCtx, peer: &Peer<'_>) -> bool {
    let ns_hit = |s: &StringMatch| peer.id.is_some_and(|id| s.matches(&id.namespace));
    let principal_hit = |s: &StringMatch| peer.principal.is_some_and(|p| s.matches(p));
    let sa_hit = |sa: &crate::model::ServiceAccountMatch| {
        peer.id.is_some_and(|id| {
            id.namespace == sa.namespace && id.service_account == sa.service_account
        })
    };
    let src_hit = |n: &IpNet| n.contains(&conn.src_ip);
    let dst_hit = |n: &IpNet| n.contains(&conn.dst_ip);
    let port_hit = |p: &u16| *p == conn.dst_port;
    field(&m.namespaces, &m.not_namespaces, ns_hit)
        && field(&m.service_accounts, &m.not_service_accounts, sa_hit)
        && field(&m.principals, &m.not_principals, principal_hit)
        && field(&m.source_ips, &m.not_source_ips, src_hit)
        && field(&m.destination_ips, &m.not_destination_ips, dst_hit)
        && field(&m.destination_ports, &m.not_destination_ports, port_hit)
}
