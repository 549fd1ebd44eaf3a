//! The serde shape of the file, and nothing more: camelCase keys, unknown keys rejected, every list
//! and most scalars optional. Values whose meaning needs checking (IPs, CIDRs, enum names) stay
//! strings here; `messages` turns them into protobuf fields, so that its errors can name the entry.

use std::collections::HashSet;
use std::fmt;
use std::hash::Hash;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_yaml::Value;

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a map with the lists `workloads`, `services` and `policies`"
)]
pub(super) struct File {
    #[serde(default)]
    pub workloads: Vec<Workload>,
    #[serde(default)]
    pub services: Vec<Service>,
    #[serde(default)]
    pub policies: Vec<Policy>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    default,
    expecting = "a workload: a map of its fields"
)]
pub(super) struct Workload {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
    pub workload_ips: Vec<String>,
    pub protocol: Option<String>,
    pub network_mode: Option<String>,
    pub node: String,
    pub network: String,
    pub trust_domain: String,
    pub waypoint: Option<Gateway>,
    pub network_gateway: Option<Gateway>,
    pub authorization_policies: Vec<String>,
    pub status: Option<String>,
    pub cluster_id: String,
    pub locality: Option<Locality>,
    pub capacity: Option<u32>,
    pub canonical_name: String,
    pub canonical_revision: String,
    pub workload_name: String,
    pub workload_type: Option<String>,
    pub hostname: String,
    pub native_tunnel: bool,
    pub application_tunnel: Option<AppTunnel>,
    /// `"<namespace>/<hostname>"` → service port → target port, in file order.
    pub services: Entries<String, PortMap>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct Locality {
    pub region: String,
    pub zone: String,
    pub subzone: String,
}

/// A waypoint or network gateway. `destination` is `"<network>/<ip>"` or `"<namespace>/<hostname>"`
/// (ztunnel's form); `hostname: {namespace, hostname}` is the explicit alternative.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct Gateway {
    pub destination: Option<String>,
    pub hostname: Option<NamespacedHostname>,
    pub hbone_mtls_port: u32,
}

/// A service's waypoint with its weight: `{waypoint: <gateway>, weight: 3}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct WeightedWaypoint {
    pub waypoint: Gateway,
    pub weight: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(super) struct NamespacedHostname {
    pub namespace: String,
    pub hostname: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct AppTunnel {
    pub protocol: Option<String>,
    pub port: u32,
}

#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    default,
    expecting = "a service: a map of its fields"
)]
pub(super) struct Service {
    pub name: String,
    pub namespace: String,
    pub hostname: String,
    pub vips: Vec<String>,
    pub ports: PortMap,
    pub subject_alt_names: Vec<String>,
    pub canonical: bool,
    pub waypoint: Option<Gateway>,
    pub weighted_waypoints: Vec<WeightedWaypoint>,
    pub load_balancer: Option<LoadBalancer>,
    pub ip_families: Option<String>,
    pub visibility: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct LoadBalancer {
    pub mode: Option<String>,
    pub routing_preferences: Vec<String>,
    pub health_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    expecting = "a policy: a map of its fields"
)]
pub(super) struct Policy {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    /// Required: defaulting to GLOBAL would silently widen a policy.
    pub scope: String,
    /// Required: defaulting to ALLOW would silently change what a policy means.
    pub action: String,
    #[serde(default)]
    pub dry_run: bool,
    /// Rules (OR) of clauses (AND) of matches (OR).
    #[serde(default)]
    pub rules: Vec<Vec<Vec<Match>>>,
}

/// Unknown keys are rejected here too: a misspelt `notPrincipals` silently ignored would widen a policy.
#[derive(Debug, Default, Deserialize)]
#[serde(
    deny_unknown_fields,
    rename_all = "camelCase",
    default,
    expecting = "a match: a map of `namespaces`, `principals`, `sourceIps`, `destinationPorts`, ..."
)]
pub(super) struct Match {
    pub namespaces: Vec<StringMatch>,
    pub not_namespaces: Vec<StringMatch>,
    pub service_accounts: Vec<ServiceAccount>,
    pub not_service_accounts: Vec<ServiceAccount>,
    pub principals: Vec<StringMatch>,
    pub not_principals: Vec<StringMatch>,
    pub source_ips: Vec<String>,
    pub not_source_ips: Vec<String>,
    pub destination_ips: Vec<String>,
    pub not_destination_ips: Vec<String>,
    pub destination_ports: Vec<u32>,
    pub not_destination_ports: Vec<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct ServiceAccount {
    pub namespace: String,
    pub service_account: String,
}

/// Just enough of each entry to name it in an error about the entry's shape. Everything else is
/// ignored (duplicate keys included), so this parses where [`File`] failed.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Idents {
    pub workloads: Vec<Ident>,
    pub services: Vec<Ident>,
    pub policies: Vec<Ident>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(default)]
pub(super) struct Ident {
    #[serde(deserialize_with = "lenient_string")]
    pub uid: String,
    #[serde(deserialize_with = "lenient_string")]
    pub name: String,
    #[serde(deserialize_with = "lenient_string")]
    pub namespace: String,
    #[serde(deserialize_with = "lenient_string")]
    pub hostname: String,
}

/// A string, or empty for anything else.
fn lenient_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(match Value::deserialize(d)? {
        Value::String(s) => s,
        _ => String::new(),
    })
}

/// `!Exact "x"`, `!Prefix "x"`, `!Suffix "x"`, `!Presence` (ztunnel's tagged form), or the map form
/// `{exact: "x"}`, `{prefix: "x"}`, `{suffix: "x"}`, `{presence: {}}`. Names are case-insensitive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

const STRING_MATCH_FORMS: &str =
    "a string match: !Exact \"...\", !Prefix \"...\", !Suffix \"...\", \
     !Presence, or one of {exact: \"...\"}, {prefix: \"...\"}, {suffix: \"...\"}, {presence: {}}";

impl StringMatch {
    fn from_parts(kind: &str, value: &Value) -> Result<Self, String> {
        let text = || match value {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            Value::Bool(b) => Ok(b.to_string()),
            other => Err(format!(
                "expected a string after {kind}, found {}",
                describe(other)
            )),
        };
        match kind.to_ascii_lowercase().as_str() {
            "exact" => text().map(StringMatch::Exact),
            "prefix" => text().map(StringMatch::Prefix),
            "suffix" => text().map(StringMatch::Suffix),
            "presence" => {
                let empty = match value {
                    Value::Null => true,
                    Value::String(s) => s.is_empty(),
                    Value::Mapping(m) => m.is_empty(),
                    Value::Sequence(s) => s.is_empty(),
                    _ => false,
                };
                if empty {
                    Ok(StringMatch::Presence)
                } else {
                    Err(format!(
                        "expected nothing after presence (it matches any non-empty value), found {}",
                        describe(value)
                    ))
                }
            }
            _ => Err(format!("expected {STRING_MATCH_FORMS}, found {kind:?}")),
        }
    }
}

impl<'de> Deserialize<'de> for StringMatch {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Through `Value`, which keeps YAML tags, so that both forms take one code path.
        let v = Value::deserialize(d)?;
        let parsed = match &v {
            Value::Tagged(t) => {
                let tag = t.tag.to_string();
                StringMatch::from_parts(tag.trim_start_matches('!'), &t.value)
            }
            Value::Mapping(m) if m.len() == 1 => match m.iter().next() {
                Some((Value::String(k), value)) => StringMatch::from_parts(k, value),
                _ => Err(format!(
                    "expected {STRING_MATCH_FORMS}, found {}",
                    describe(&v)
                )),
            },
            other => Err(format!(
                "expected {STRING_MATCH_FORMS}, found {}",
                describe(other)
            )),
        };
        parsed.map_err(de::Error::custom)
    }
}

/// A short description of a YAML value for error messages.
fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("{b}"),
        Value::Number(n) => format!("{n}"),
        Value::String(s) => format!("{s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(m) => {
            let keys: Vec<String> = m
                .keys()
                .map(|k| match k {
                    Value::String(s) => s.clone(),
                    other => describe(other),
                })
                .collect();
            format!("a map with keys [{}]", keys.join(", "))
        }
        Value::Tagged(t) => format!("{} {}", t.tag, describe(&t.value)),
    }
}

/// A YAML map read in file order, rejecting a key that appears twice (serde's maps would keep the
/// last value silently).
#[derive(Debug)]
pub(super) struct Entries<K, V>(pub Vec<(K, V)>);

impl<K, V> Default for Entries<K, V> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<'de, K, V> Deserialize<'de> for Entries<K, V>
where
    K: Deserialize<'de> + Eq + Hash + Clone + fmt::Display,
    V: Deserialize<'de>,
{
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct EntriesVisitor<K, V>(PhantomData<(K, V)>);

        impl<'de, K, V> Visitor<'de> for EntriesVisitor<K, V>
        where
            K: Deserialize<'de> + Eq + Hash + Clone + fmt::Display,
            V: Deserialize<'de>,
        {
            type Value = Entries<K, V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map")
            }

            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Entries(Vec::new()))
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen = HashSet::new();
                let mut out = Vec::new();
                while let Some((k, v)) = map.next_entry::<K, V>()? {
                    if !seen.insert(k.clone()) {
                        return Err(de::Error::custom(format!("the key {k} appears twice")));
                    }
                    out.push((k, v));
                }
                Ok(Entries(out))
            }
        }

        d.deserialize_map(EntriesVisitor(PhantomData))
    }
}

/// Service port → target port, e.g. `{ 80: 8080 }`, in file order. Ports are kept as read (`u32`):
/// the range checks belong to the model's conversion, which reports them like xDS rejects.
pub(super) type PortMap = Entries<PortNumber, PortNumber>;

/// A port number written as a YAML integer (or a string of digits, as JSON-minded tools write keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct PortNumber(pub u32);

impl<'de> Deserialize<'de> for PortNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PortVisitor;

        impl Visitor<'_> for PortVisitor {
            type Value = PortNumber;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number")
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortNumber, E> {
                u32::try_from(v)
                    .map(PortNumber)
                    .map_err(|_| E::custom(format!("expected a port number, found {v}")))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortNumber, E> {
                u32::try_from(v)
                    .map(PortNumber)
                    .map_err(|_| E::custom(format!("expected a port number, found {v}")))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortNumber, E> {
                v.trim()
                    .parse()
                    .map(PortNumber)
                    .map_err(|_| E::custom(format!("expected a port number, found {v:?}")))
            }
        }

        d.deserialize_any(PortVisitor)
    }
}

impl fmt::Display for PortNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}
