//! SPIFFE identities of Istio workloads: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.

use std::fmt;
use std::str::FromStr;

/// Why a string is not an Istio SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {input:?}: expected spiffe://<trust domain>/ns/<namespace>/sa/<service account>, {reason}")]
pub struct IdentityError {
    pub input: String,
    pub reason: &'static str,
}

/// The identity a workload proves with its certificate, and the subject of RBAC rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SpiffeId {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

impl SpiffeId {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    /// The form RBAC `principals` compare against: the URI without `spiffe://`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

impl FromStr for SpiffeId {
    type Err = IdentityError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| IdentityError {
            input: s.to_owned(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| err("the scheme is not spiffe://"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => {
                if td.is_empty() || ns.is_empty() || sa.is_empty() {
                    return Err(err("a segment is empty"));
                }
                let valid = |p: &str| {
                    p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
                };
                if !valid(td) || !valid(ns) || !valid(sa) {
                    return Err(err("a segment has a character outside [A-Za-z0-9-._~]"));
                }
                Ok(SpiffeId::new(td, ns, sa))
            }
            _ => Err(err(
                "the path does not have the form /ns/<namespace>/sa/<service account>",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let s = "spiffe://cluster.local/ns/default/sa/client";
        let id: SpiffeId = s.parse().unwrap();
        assert_eq!(id.to_string(), s);
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/client");
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "http://cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/ns/a/sa/b/extra",
            "spiffe://cluster.local/sa/a/ns/b",
            "spiffe://clu ster/ns/a/sa/b",
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad:?} should fail");
        }
    }
}
