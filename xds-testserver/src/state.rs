//! The resources the server serves: per [`Kind`], a map from resource name to the encoded `Any`
//! value and its version, plus the index that resolves on-demand names (`<network>/<ip>`) to the
//! workload or service holding that address.
//!
//! Invariants: a version is the FNV-1a 64 hash (hex) of the exact bytes served, so it is the same
//! across server restarts for the same content; encoding is deterministic (the one protobuf map,
//! `Workload.services`, is written in key order). Local-config YAML is parsed and validated with
//! l4mesh's own parser and model conversions, so the server never serves a file l4mesh would refuse
//! (use [`State::put_raw`] for that on purpose).
//!
//! Not here: who holds what (see `protocol`), I/O, locking.

#[cfg(test)]
pub(crate) mod tests;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use l4mesh::localconfig::{LocalConfig, LocalConfigError};
use l4mesh::proto::istio::security as psec;
use l4mesh::proto::istio::workload as pw;
use prost::Message;

use crate::Kind;

/// One resource as served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    /// The xDS resource name: workload uid, `namespace/hostname`, or `namespace/name`.
    pub name: String,
    /// [`version_of`] the value.
    pub version: String,
    /// The `Any.value` bytes.
    pub value: Vec<u8>,
    /// The `<network>/<ip>` addresses the resource answers to (empty for policies and raw values).
    pub addresses: Vec<String>,
    /// Whether this came from workload, service or policy YAML, or raw bytes.
    pub origin: Origin,
}

/// Where an [`Entry`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Workload,
    Service,
    Policy,
    Raw,
}

impl Entry {
    fn new(name: String, value: Vec<u8>, addresses: Vec<String>, origin: Origin) -> Self {
        Self {
            version: version_of(&value),
            name,
            value,
            addresses,
            origin,
        }
    }
}

/// The resources of one kind.
#[derive(Clone, Debug, Default)]
struct KindState {
    resources: BTreeMap<String, Arc<Entry>>,
    /// `<network>/<ip>` → resource name; workloads win over services on a shared address.
    by_address: BTreeMap<String, String>,
    /// Hash of every (name, version): the `system_version_info` of responses.
    system_version: String,
}

impl KindState {
    fn reindex(&mut self) {
        self.by_address.clear();
        // Services first, then workloads overwrite: a workload IP wins over a VIP (ztunnel's lookup
        // order for an address is workloads, then services).
        for origin in [Origin::Service, Origin::Workload] {
            for e in self.resources.values().filter(|e| e.origin == origin) {
                for a in &e.addresses {
                    self.by_address.insert(a.clone(), e.name.clone());
                }
            }
        }
        let mut h = Fnv::new();
        for e in self.resources.values() {
            h.write(e.name.as_bytes());
            h.write(&[0]);
            h.write(e.version.as_bytes());
            h.write(&[0]);
        }
        self.system_version = h.hex();
    }
}

/// Parsed, validated resources, ready to be put in a [`State`].
#[derive(Clone, Debug, Default)]
pub(crate) struct Resources(Vec<(Kind, Entry)>);

impl Resources {
    /// Parses and validates local-config YAML. Blank text is no resources.
    pub fn from_yaml(yaml: &str) -> Result<Self, LocalConfigError> {
        if yaml.trim().is_empty() {
            return Ok(Self::default());
        }
        let config = LocalConfig::from_yaml(yaml)?;
        // The model's conversions, as l4mesh runs them on load: also refuses duplicates.
        config.clone().into_batch()?;
        Ok(Self::from_config(&config))
    }

    /// Reads, parses and validates a local-config file; errors name the file.
    pub fn from_file(path: &Path) -> Result<Self, LocalConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| LocalConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_yaml(&text).map_err(|e| match e {
            e @ (LocalConfigError::Read { .. } | LocalConfigError::InFile { .. }) => e,
            e => LocalConfigError::InFile {
                path: path.to_owned(),
                error: Box::new(e),
            },
        })
    }

    fn from_config(config: &LocalConfig) -> Self {
        let mut out = Vec::new();
        for address in config.addresses() {
            if let Some(entry) = address_entry(address) {
                out.push((Kind::Address, entry));
            }
        }
        for policy in config.authorizations() {
            out.push((Kind::Authorization, policy_entry(policy)));
        }
        Self(out)
    }

    /// How many resources of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        self.0.iter().filter(|(k, _)| *k == kind).count()
    }
}

/// Everything served, of both kinds. Cheap to clone (entries are shared).
#[derive(Clone, Debug)]
pub(crate) struct State {
    address: KindState,
    authorization: KindState,
}

impl Default for State {
    fn default() -> Self {
        let mut s = Self {
            address: KindState::default(),
            authorization: KindState::default(),
        };
        s.address.reindex();
        s.authorization.reindex();
        s
    }
}

impl State {
    /// A state holding exactly `resources`.
    pub fn new(resources: Resources) -> Self {
        let mut s = Self::default();
        s.upsert(resources);
        s
    }

    fn kind(&self, kind: Kind) -> &KindState {
        match kind {
            Kind::Address => &self.address,
            Kind::Authorization => &self.authorization,
        }
    }

    fn kind_mut(&mut self, kind: Kind) -> &mut KindState {
        match kind {
            Kind::Address => &mut self.address,
            Kind::Authorization => &mut self.authorization,
        }
    }

    /// Replaces everything with `resources`.
    pub fn replace(&mut self, resources: Resources) {
        *self = Self::new(resources);
    }

    /// Adds or replaces each of `resources` by name; the others stay.
    pub fn upsert(&mut self, resources: Resources) {
        for (kind, entry) in resources.0 {
            self.kind_mut(kind)
                .resources
                .insert(entry.name.clone(), Arc::new(entry));
        }
        for kind in Kind::ALL {
            self.kind_mut(kind).reindex();
        }
    }

    /// Removes one resource; false when there was none of that name.
    pub fn remove(&mut self, kind: Kind, name: &str) -> bool {
        let k = self.kind_mut(kind);
        let removed = k.resources.remove(name).is_some();
        if removed {
            k.reindex();
        }
        removed
    }

    /// Serves `value` as the `Any.value` of resource `name`, whatever it contains.
    pub fn put_raw(&mut self, kind: Kind, name: &str, value: Vec<u8>) {
        let k = self.kind_mut(kind);
        let entry = Entry::new(name.to_owned(), value, Vec::new(), Origin::Raw);
        k.resources.insert(name.to_owned(), Arc::new(entry));
        k.reindex();
    }

    /// The resource named exactly `name`.
    pub fn get(&self, kind: Kind, name: &str) -> Option<&Arc<Entry>> {
        self.kind(kind).resources.get(name)
    }

    /// The resource a subscribed name stands for: the resource of that name, or for an Address name
    /// of the form `<network>/<ip>` the workload (else the service) holding that address.
    pub fn resolve(&self, kind: Kind, name: &str) -> Option<&Arc<Entry>> {
        let k = self.kind(kind);
        if let Some(e) = k.resources.get(name) {
            return Some(e);
        }
        if kind != Kind::Address {
            return None;
        }
        let (network, ip) = name.split_once('/')?;
        let ip: IpAddr = ip.parse().ok()?;
        // Normalise the IP's spelling (`::ffff:…`, leading zeros in IPv6) as the index does.
        let canonical = k.by_address.get(&network_addr(network, ip))?;
        k.resources.get(canonical)
    }

    /// Every resource of `kind`, by name.
    pub fn entries(&self, kind: Kind) -> impl Iterator<Item = &Arc<Entry>> {
        self.kind(kind).resources.values()
    }

    /// The hash of every (name, version) of `kind`: same content, same value, across restarts.
    pub fn system_version(&self, kind: Kind) -> &str {
        &self.kind(kind).system_version
    }

    /// Names and versions, for the admin API.
    pub fn summary(&self) -> StateSummary {
        let kind = |k: Kind| KindSummary {
            system_version: self.system_version(k).to_owned(),
            resources: self
                .entries(k)
                .map(|e| (e.name.clone(), e.version.clone()))
                .collect(),
        };
        StateSummary {
            address: kind(Kind::Address),
            authorization: kind(Kind::Authorization),
        }
    }
}

/// The served state in short: per kind, the system version and every resource name → version.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StateSummary {
    /// Workloads and services.
    pub address: KindSummary,
    /// Policies.
    pub authorization: KindSummary,
}

/// One kind of [`StateSummary`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct KindSummary {
    /// The `system_version_info` responses of this kind carry.
    pub system_version: String,
    /// Resource name → version.
    pub resources: BTreeMap<String, String>,
}

fn network_addr(network: &str, ip: IpAddr) -> String {
    format!("{network}/{ip}")
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

fn address_entry(address: &pw::Address) -> Option<Entry> {
    match address.r#type.as_ref()? {
        pw::address::Type::Workload(w) => {
            let addresses = w
                .addresses
                .iter()
                .filter_map(|a| ip_of(a))
                .map(|ip| network_addr(&w.network, ip))
                .collect();
            let value = encode_workload_address(w);
            Some(Entry::new(
                w.uid.clone(),
                value,
                addresses,
                Origin::Workload,
            ))
        }
        pw::address::Type::Service(s) => {
            let addresses = s
                .addresses
                .iter()
                .filter_map(|a| Some(network_addr(&a.network, ip_of(&a.address)?)))
                .collect();
            let name = format!("{}/{}", s.namespace, s.hostname);
            Some(Entry::new(
                name,
                address.encode_to_vec(),
                addresses,
                Origin::Service,
            ))
        }
    }
}

fn policy_entry(policy: &psec::Authorization) -> Entry {
    let name = format!("{}/{}", policy.namespace, policy.name);
    Entry::new(name, policy.encode_to_vec(), Vec::new(), Origin::Policy)
}

/// `istio.workload.Address{workload}` encoded deterministically: prost writes a map field in the
/// `HashMap`'s (random) order, so `services` is left out of the message and appended in key order.
/// Field order does not matter to a protobuf decoder; the bytes decode to the same message.
fn encode_workload_address(workload: &pw::Workload) -> Vec<u8> {
    let mut rest = workload.clone();
    let services: BTreeMap<String, pw::PortList> =
        std::mem::take(&mut rest.services).into_iter().collect();
    let mut bytes = rest.encode_to_vec();
    let services = ServicesField {
        services: services
            .into_iter()
            .map(|(key, value)| ServicesEntry {
                key,
                value: Some(value),
            })
            .collect(),
    };
    bytes.extend(services.encode_to_vec());
    AddressWorkloadBytes { workload: bytes }.encode_to_vec()
}

/// `istio.workload.Address` with field 1 (`workload`) as already-encoded bytes (same wire format).
#[derive(Clone, PartialEq, prost::Message)]
struct AddressWorkloadBytes {
    #[prost(bytes = "vec", tag = "1")]
    workload: Vec<u8>,
}

/// `Workload.services` (field 22) as a list of map entries, which is its wire format.
#[derive(Clone, PartialEq, prost::Message)]
struct ServicesField {
    #[prost(message, repeated, tag = "22")]
    services: Vec<ServicesEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct ServicesEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<pw::PortList>,
}

/// The version of a value: FNV-1a 64 of its bytes, as 16 hex digits.
pub(crate) fn version_of(bytes: &[u8]) -> String {
    let mut h = Fnv::new();
    h.write(bytes);
    h.hex()
}

/// FNV-1a, 64 bits: tiny, stable across runs and platforms (unlike `std`'s `DefaultHasher`).
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 ^= u64::from(*b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}
