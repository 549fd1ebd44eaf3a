//! The local configuration file: ztunnel's `LOCAL_XDS_PATH` YAML format, and a watch that applies it to
//! the [`Store`] whenever it changes. It lets l4mesh run without a control plane.
//!
//! The file goes through the same trust boundary as xDS: YAML → serde structs → the protobuf messages
//! an xDS server would send (`istio.workload.Address`, `istio.security.Authorization`) → the model's
//! `TryFrom` conversions → one [`Batch`] with `replace_all`. So a resource means the same whichever way
//! it arrives, and this module checks only what the YAML form adds (IP strings, `"<network>/<ip>"`,
//! CIDR strings, enum names, duplicate entries). A load is all or nothing: one bad entry rejects the
//! file, with an error naming the entry (`workloads[2] (uid "…")`) and the field.
//!
//! # Format
//!
//! Three optional top-level lists; keys are camelCase and unknown keys are rejected everywhere.
//!
//! - `workloads`: `uid`, `name`, `namespace`, `serviceAccount`, `workloadIps` (IP strings), `protocol`
//!   (`HBONE`|`TCP`, default `TCP`), `node`, `network`, `trustDomain`, `waypoint`, `networkGateway`,
//!   `authorizationPolicies` (`"<namespace>/<name>"`), `status` (`Healthy`|`Unhealthy`), `clusterId`,
//!   `locality` (`{region, zone, subzone}`), `capacity`, `canonicalName`, `canonicalRevision`,
//!   `workloadName`, `workloadType` (`deployment`|`cronjob`|`pod`|`job`), `hostname`, `nativeTunnel`,
//!   `networkMode` (`Standard`|`HostNetwork`), `applicationTunnel` (`{protocol: NONE|PROXY, port}`),
//!   and `services`: `"<namespace>/<hostname>"` → `{ <service port>: <target port> }`.
//! - `services`: `name`, `namespace`, `hostname`, `vips` (`"<network>/<ip>"`, the default network is
//!   empty: `"/10.0.0.1"`; a range as `"<network>/<ip>/<prefix length>"`), `ports`
//!   (`{ <service port>: <target port> }`), `subjectAltNames`, `canonical`, `waypoint`,
//!   `weightedWaypoints` (`[{waypoint, weight}]`), `loadBalancer` (`{mode:
//!   Standard|Strict|Failover|Passthrough, routingPreferences:
//!   [Region|Zone|Subzone|Node|Cluster|Network], healthPolicy: OnlyHealthy|AllowAll}`),
//!   `ipFamilies` (`Automatic|IPv4Only|IPv6Only|Dual`), `visibility` (`Public|Namespace`: who may
//!   resolve its name, see the DNS proxy).
//! - `policies`: `name`, `namespace`, `scope` (`Global`|`Namespace`|`WorkloadSelector`, required),
//!   `action` (`Allow`|`Deny`, required), `dryRun`, and `rules`: a list (OR) of clauses (AND) of
//!   matches (OR). A match has `namespaces`, `principals` (and their `not…` forms) as string matches,
//!   `serviceAccounts`/`notServiceAccounts` as `{namespace, serviceAccount}`, `sourceIps`,
//!   `destinationIps` (and `not…`) as CIDRs (`"10.0.0.0/8"`; a bare IP is one address), and
//!   `destinationPorts`/`notDestinationPorts`. A string match is `!Exact "x"`, `!Prefix "x"`,
//!   `!Suffix "x"` or `!Presence` (ztunnel's YAML tags), or `{exact: "x"}`, `{prefix: …}`,
//!   `{suffix: …}`, `{presence: {}}`. (YAML wants whitespace after a tag, so inside a `[flow list]`
//!   write `!Presence ""`.)
//!
//! A `waypoint`/`networkGateway` is `{destination: "<network>/<ip>", hboneMtlsPort: 15008}`, or with
//! `destination: "<namespace>/<hostname>"` (ztunnel's forms; a destination whose part after `/` is an
//! IP is an address), or `{hostname: {namespace, hostname}, hboneMtlsPort}`. `hboneMtlsPort` defaults
//! to 15008. Enum names ignore case, `_` and `-`, so the proto spellings (`WORKLOAD_SELECTOR`,
//! `UNSPECIFIED_MODE`) work too.
//!
//! Not here: serving the file over xDS, certificates, what the resources mean (routing, RBAC), and the
//! choice between this file and a control plane (`config`/`app` decide).

mod messages;
mod raw;
#[cfg(test)]
mod tests;
mod watch;

pub use watch::FileWatch;

use std::collections::HashMap;
use std::hash::Hash;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::{self, ValidationError};
use crate::proto::istio::security as psec;
use crate::proto::istio::workload as pw;
use crate::store::{Batch, Store, Upsert};

/// The configuration l4mesh runs with when it has neither a control plane nor a file: one client and
/// an `echo` service with two endpoints, all on loopback addresses. Its comments say how to try it.
pub const EMBEDDED_DEFAULT: &str = include_str!("../examples/local-default.yaml");

/// Why a local config was refused. Every message names the entry (`workloads[2] (uid "…")`) and the
/// field, and says what was expected and what was found, so an operator can fix the file from the log
/// line alone. (The inner errors are part of the message, not `source()`, so that printing the chain
/// does not repeat them.)
#[derive(Debug, thiserror::Error)]
pub enum LocalConfigError {
    /// The file could not be read (missing, unreadable, not UTF-8).
    #[error("cannot read local config {}: {error}", .path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Not YAML, or not the shape of the format: an unknown key, a wrong type, a key given twice, a
    /// policy without `scope` or `action`. The message carries serde_yaml's line and column.
    #[error("{message}")]
    Yaml {
        message: String,
        error: serde_yaml::Error,
    },
    /// A value the YAML shape admits but the field does not: an IP, a `"<network>/<ip>"`, a CIDR, an
    /// enum name.
    #[error("{entry}: field `{field}`: expected {expected}, found {found}")]
    Field {
        entry: String,
        field: String,
        expected: String,
        found: String,
    },
    /// The model's conversion, the one xDS resources go through, rejected the entry. `field` is the
    /// YAML spelling of `error.field`.
    #[error("{entry}: field `{field}`: {}", .error.reason)]
    Invalid {
        entry: String,
        field: String,
        error: Box<ValidationError>,
    },
    /// Two entries define the same workload uid, service or policy; the store would keep only one.
    #[error("{entry}: {what} {key:?} is already defined by {first}")]
    Duplicate {
        entry: String,
        what: &'static str,
        key: String,
        first: String,
    },
    /// Any of the above, found in the named file.
    #[error("{}: {error}", .path.display())]
    InFile {
        path: PathBuf,
        error: Box<LocalConfigError>,
    },
    /// The file cannot be watched: its directory is missing, inotify limits, or no tokio runtime.
    #[error("cannot watch local config {}: {reason}", .path.display())]
    Watch { path: PathBuf, reason: String },
}

/// What kind of entry a message came from, to spell its fields as the file does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Workload,
    Service,
    Policy,
}

#[derive(Clone, Debug)]
struct Entry<T> {
    /// `workloads[2] (uid "…")`: how errors name the entry.
    label: String,
    kind: Kind,
    message: T,
}

/// A parsed local config file: the protobuf messages an xDS server would send for it, in file order
/// (workloads, then services, then policies). Kept as messages so that the xDS test server can serve
/// the same file that l4mesh loads; [`LocalConfig::into_batch`] validates them into model types.
#[derive(Clone, Debug, Default)]
pub struct LocalConfig {
    addresses: Vec<Entry<pw::Address>>,
    authorizations: Vec<Entry<psec::Authorization>>,
}

impl LocalConfig {
    /// Parses the YAML text into messages. Checks the YAML shape and the values only YAML has (IP and
    /// CIDR strings, enum names); the model's rules are checked by [`LocalConfig::into_batch`].
    pub fn from_yaml(yaml: &str) -> Result<Self, LocalConfigError> {
        let file: raw::File = serde_yaml::from_str(yaml).map_err(|e| yaml_error(yaml, e))?;
        let mut addresses = Vec::with_capacity(file.workloads.len() + file.services.len());
        for (i, w) in file.workloads.into_iter().enumerate() {
            let label = messages::workload_label(i, &w.uid, &w.namespace, &w.name);
            let workload = messages::workload(&messages::Ctx { label: &label }, w)?;
            addresses.push(Entry {
                label,
                kind: Kind::Workload,
                message: pw::Address {
                    r#type: Some(pw::address::Type::Workload(workload)),
                },
            });
        }
        for (i, s) in file.services.into_iter().enumerate() {
            let label = messages::service_label(i, &s.namespace, &s.hostname);
            let service = messages::service(&messages::Ctx { label: &label }, s)?;
            addresses.push(Entry {
                label,
                kind: Kind::Service,
                message: pw::Address {
                    r#type: Some(pw::address::Type::Service(service)),
                },
            });
        }
        let mut authorizations = Vec::with_capacity(file.policies.len());
        for (i, p) in file.policies.into_iter().enumerate() {
            let label = messages::policy_label(i, &p.namespace, &p.name);
            let policy = messages::policy(&messages::Ctx { label: &label }, p)?;
            authorizations.push(Entry {
                label,
                kind: Kind::Policy,
                message: policy,
            });
        }
        Ok(Self {
            addresses,
            authorizations,
        })
    }

    /// Reads and parses a file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, LocalConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| LocalConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_yaml(&text).map_err(|e| in_file(path, e))
    }

    /// The workloads and services, as `istio.workload.Address` resources.
    pub fn addresses(&self) -> impl Iterator<Item = &pw::Address> {
        self.addresses.iter().map(|e| &e.message)
    }

    /// The policies, as `istio.security.Authorization` resources.
    pub fn authorizations(&self) -> impl Iterator<Item = &psec::Authorization> {
        self.authorizations.iter().map(|e| &e.message)
    }

    /// Validates every message with the model's conversions and returns the whole state as one
    /// [`Batch`] with `replace_all`. Fails on the first invalid entry, and on two entries with the same
    /// workload uid, service `namespace/hostname` or policy `namespace/name`.
    pub fn into_batch(self) -> Result<Batch, LocalConfigError> {
        let mut upserts = Vec::with_capacity(self.addresses.len() + self.authorizations.len());
        let mut workloads = HashMap::new();
        let mut services = HashMap::new();
        for Entry {
            label,
            kind,
            message,
        } in self.addresses
        {
            match model::Resource::try_from(message) {
                Err(error) => return Err(invalid(label, kind, error)),
                Ok(model::Resource::Workload(w)) => {
                    first_definition(&mut workloads, w.uid.clone(), label, "workload uid")?;
                    upserts.push(Upsert::Workload(w));
                }
                Ok(model::Resource::Service(s)) => {
                    first_definition(&mut services, s.key(), label, "service")?;
                    upserts.push(Upsert::Service(s));
                }
            }
        }
        let mut policies = HashMap::new();
        for Entry {
            label,
            kind,
            message,
        } in self.authorizations
        {
            match model::Authorization::try_from(message) {
                Err(error) => return Err(invalid(label, kind, error)),
                Ok(p) => {
                    first_definition(&mut policies, p.key(), label, "policy")?;
                    upserts.push(Upsert::Policy(p));
                }
            }
        }
        Ok(Batch {
            upserts,
            removals: Vec::new(),
            replace_all: true,
        })
    }
}

/// Parses YAML text into a validated batch that replaces the whole store: the entry point for config
/// that does not come from a file (the [`EMBEDDED_DEFAULT`], tests).
pub fn parse(yaml: &str) -> Result<Batch, LocalConfigError> {
    LocalConfig::from_yaml(yaml)?.into_batch()
}

/// Reads, parses and validates the file at `path`; errors name the file. Used at startup, where an
/// invalid file should stop l4mesh rather than run it with a partial mesh.
pub fn load(path: &Path) -> Result<Batch, LocalConfigError> {
    LocalConfig::from_file(path)?
        .into_batch()
        .map_err(|e| in_file(path, e))
}

/// Watches `path` and applies the file to `store` each time it changes, so that edits take effect
/// without a restart. Changes are debounced (~100 ms); editors that save by writing another file and
/// renaming it over this one are handled (the parent directory is watched, filtered on the file name),
/// and so are Kubernetes ConfigMap volumes (their `..data` symlink swaps). An invalid edit is logged
/// with `tracing::warn!` and the last good config stays in force; a reload that succeeds is logged at
/// info with counts. The file is not loaded when the watch starts: load it first with [`load`].
///
/// The notifications are bridged into a tokio channel, so no worker thread ever blocks. The task runs
/// until it is aborted ([`tokio::task::JoinHandle::abort`]); dropping the handle detaches it, as for
/// any tokio task. Must be called within a tokio runtime.
pub fn watch(
    path: PathBuf,
    store: Arc<Store>,
) -> Result<tokio::task::JoinHandle<()>, LocalConfigError> {
    watch::spawn(path, store)
}

fn in_file(path: &Path, error: LocalConfigError) -> LocalConfigError {
    match error {
        // Already names the file.
        e @ (LocalConfigError::Read { .. } | LocalConfigError::InFile { .. }) => e,
        e => LocalConfigError::InFile {
            path: path.to_owned(),
            error: Box::new(e),
        },
    }
}

fn first_definition<K: Eq + Hash + ToString>(
    seen: &mut HashMap<K, String>,
    key: K,
    label: String,
    what: &'static str,
) -> Result<(), LocalConfigError> {
    if let Some(first) = seen.get(&key) {
        return Err(LocalConfigError::Duplicate {
            entry: label,
            what,
            key: key.to_string(),
            first: first.clone(),
        });
    }
    seen.insert(key, label);
    Ok(())
}

fn invalid(entry: String, kind: Kind, error: ValidationError) -> LocalConfigError {
    LocalConfigError::Invalid {
        field: yaml_field(kind, &error.field),
        entry,
        error: Box::new(error),
    }
}

/// Spells a field of a protobuf message (as the model's conversion names it) as the file does:
/// `addresses[0]` of a workload is `workloadIps[0]`, `rules[0].clauses[1].matches[2].source_ips[0]`
/// is `rules[0][1][2].sourceIps[0]`.
fn yaml_field(kind: Kind, field: &str) -> String {
    let mut f = field.to_owned();
    match kind {
        Kind::Workload => {
            if let Some(rest) = f.strip_prefix("addresses") {
                f = format!("workloadIps{rest}");
            }
            if f == "tunnel_protocol" {
                f = "protocol".into();
            }
        }
        Kind::Service => {
            if let Some(rest) = f.strip_prefix("addresses") {
                // `addresses[i].address` and `addresses[i].length` are both the VIP string `vips[i]`.
                let index_end = rest.find(']').map_or(rest.len(), |i| i + 1);
                f = format!("vips{}", &rest[..index_end]);
            }
            f = f
                .replacen(
                    "load_balancing.routing_preference",
                    "loadBalancer.routingPreferences",
                    1,
                )
                .replacen("load_balancing.", "loadBalancer.", 1);
        }
        Kind::Policy => f = f.replace(".clauses[", "[").replace(".matches[", "["),
    }
    // A gateway's `address.address` is the `destination` string.
    f = f.replace(".address.address", ".destination");
    camel_case(&f)
}

/// `hbone_mtls_port` → `hboneMtlsPort`, leaving text inside `[...]` (map keys) alone.
fn camel_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut depth = 0usize;
    let mut upper = false;
    for c in s.chars() {
        match c {
            '[' => depth += 1,
            ']' => depth = depth.saturating_sub(1),
            '_' if depth == 0 => {
                upper = true;
                continue;
            }
            _ => {}
        }
        if upper {
            out.extend(c.to_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

/// serde_yaml prefixes its messages with the path (`workloads[2].protocl: unknown field …`). When the
/// path points into an entry, name the entry as the other errors do: `workloads[2] (uid "…"): field
/// `protocl`: unknown field …`.
fn yaml_error(yaml: &str, error: serde_yaml::Error) -> LocalConfigError {
    let text = error.to_string();
    let message = name_entry(yaml, &text).unwrap_or(text);
    LocalConfigError::Yaml { message, error }
}

fn name_entry(yaml: &str, text: &str) -> Option<String> {
    let (list, rest) = ["workloads", "services", "policies"]
        .into_iter()
        .find_map(|l| Some((l, text.strip_prefix(l)?.strip_prefix('[')?)))?;
    let close = rest.find(']')?;
    let index: usize = rest[..close].parse().ok()?;
    let after = &rest[close + 1..];
    let (field, message) = match after.strip_prefix(": ") {
        Some(message) => (None, message),
        None => {
            let (field, message) = after.strip_prefix('.')?.split_once(": ")?;
            (Some(field), message)
        }
    };
    let idents: raw::Idents = serde_yaml::from_str(yaml).unwrap_or_default();
    let label = match list {
        "workloads" => {
            let id = idents.workloads.get(index).cloned().unwrap_or_default();
            messages::workload_label(index, &id.uid, &id.namespace, &id.name)
        }
        "services" => {
            let id = idents.services.get(index).cloned().unwrap_or_default();
            messages::service_label(index, &id.namespace, &id.hostname)
        }
        _ => {
            let id = idents.policies.get(index).cloned().unwrap_or_default();
            messages::policy_label(index, &id.namespace, &id.name)
        }
    };
    Some(match field {
        Some(field) => format!("{label}: field `{field}`: {message}"),
        None => format!("{label}: {message}"),
    })
}
