//! L4 authorization policies, as Istio's control plane sends them. Evaluation lives in `rbac`.

use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;

/// `<namespace>/<name>`: the xDS name of a policy, and how workloads list the policies selecting them.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct PolicyKey(pub Arc<str>);

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum PolicyScope {
    Global,
    Namespace,
    WorkloadSelector,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Action {
    Allow,
    Deny,
}

/// Serialised as ztunnel dumps it: `{"Exact": "x"}`, …, `{"Presence": []}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    /// Any non-empty value.
    Presence,
}

impl serde::Serialize for StringMatch {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StringMatch::Exact(v) => s.serialize_newtype_variant("StringMatch", 0, "Exact", v),
            StringMatch::Prefix(v) => s.serialize_newtype_variant("StringMatch", 1, "Prefix", v),
            StringMatch::Suffix(v) => s.serialize_newtype_variant("StringMatch", 2, "Suffix", v),
            StringMatch::Presence => {
                s.serialize_newtype_variant("StringMatch", 3, "Presence", &[(); 0])
            }
        }
    }
}

impl StringMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(s) => value.starts_with(s.as_str()),
            StringMatch::Suffix(s) => value.ends_with(s.as_str()),
            StringMatch::Presence => !value.is_empty(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountMatch {
    pub namespace: String,
    pub service_account: String,
}

/// One match: every populated field must pass.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccountMatch>,
    pub not_service_accounts: Vec<ServiceAccountMatch>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<IpNet>,
    pub not_source_ips: Vec<IpNet>,
    pub destination_ips: Vec<IpNet>,
    pub not_destination_ips: Vec<IpNet>,
    pub destination_ports: Vec<u16>,
    pub not_destination_ports: Vec<u16>,
}

/// An L4 authorization policy. `rules` is rules (OR) of clauses (AND) of matches (OR).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Authorization {
    pub name: String,
    pub namespace: String,
    pub scope: PolicyScope,
    pub action: Action,
    pub rules: Vec<Vec<Vec<Match>>>,
    pub dry_run: bool,
}

impl Authorization {
    pub fn key(&self) -> PolicyKey {
        PolicyKey(format!("{}/{}", self.namespace, self.name).into())
    }
}
