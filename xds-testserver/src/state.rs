//! The resources the server serves: per [`Kind`], a map from resource name to the encoded `Any`
//! value and its version, plus the index that resolves on-demand names (`<network>/<ip>`) to the
//! workload or service holding that address, and a log of the most recent changes.
//!
//! Invariants: a version is the FNV-1a 64 hash (hex) of the exact bytes served, so it is the same
//! across server restarts for the same content; encoding is deterministic (the one protobuf map,
//! `Workload.services`, is written in key order). Local-config YAML is parsed and validated with
//! l4mesh's own parser and model conversions, so the server never serves a file l4mesh would refuse
//! (use [`State::put_raw`] for that on purpose).
//!
//! Cost: the maps are persistent (`imbl`), so cloning a state is O(1) and a change of k resources
//! costs O(k · log N), index and system version included. Every state has an id, fresh for each
//! change and shared by clones; the log says, per change, which names may now look different to a
//! subscriber (the resources changed, and the resources an address alias resolved to before or
//! after), so that a stream in sync with an older id can catch up by recomputing only those names
//! ([`State::changes_since`]). [`State::replace`] starts a new history: streams diff everything then.
//!
//! Not here: who holds what (see `protocol`), I/O, locking.

mod encode;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use imbl::{OrdMap, Vector};
use l4mesh::localconfig::{LocalConfig, LocalConfigError};

pub(crate) use encode::version_of;

use crate::Kind;

/// Changes kept in a state's log; a stream further behind diffs everything.
const MAX_LOG: usize = 1024;

/// Source of state ids: unique within the process, increasing along a history.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn fresh_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

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

/// The resources holding one `<network>/<ip>`.
#[derive(Clone, Debug, Default)]
struct Holders {
    workloads: BTreeSet<String>,
    services: BTreeSet<String>,
}

impl Holders {
    /// The resource the address resolves to: a workload IP wins over a VIP (ztunnel's lookup order
    /// for an address is workloads, then services); among equals, the greatest name.
    fn winner(&self) -> Option<&String> {
        self.workloads.last().or_else(|| self.services.last())
    }

    fn set(&mut self, origin: Origin) -> Option<&mut BTreeSet<String>> {
        match origin {
            Origin::Workload => Some(&mut self.workloads),
            Origin::Service => Some(&mut self.services),
            Origin::Policy | Origin::Raw => None,
        }
    }
}

/// The resources of one kind.
#[derive(Clone, Debug, Default)]
struct KindState {
    resources: OrdMap<String, Arc<Entry>>,
    /// `<network>/<ip>` → the resources holding it.
    by_address: OrdMap<String, Holders>,
    /// Wrapping sum of the [`encode::entry_share`] of every resource.
    share_sum: u64,
    /// `share_sum` in hex: the `system_version_info` of responses.
    system_version: String,
}

impl KindState {
    /// Puts `entry` in place of any resource of its name; adds the names it affects to `changed`.
    fn insert(&mut self, entry: Arc<Entry>, changed: &mut BTreeSet<String>) {
        let name = entry.name.clone();
        if let Some(old) = self.resources.insert(name.clone(), entry.clone()) {
            self.unindex(&old, changed);
        }
        self.index(&entry, changed);
        changed.insert(name);
    }

    /// Removes the resource `name`, if any; adds the names it affects to `changed`.
    fn remove(&mut self, name: &str, changed: &mut BTreeSet<String>) -> bool {
        let Some(old) = self.resources.remove(name) else {
            return false;
        };
        self.unindex(&old, changed);
        changed.insert(name.to_owned());
        true
    }

    fn index(&mut self, e: &Entry, changed: &mut BTreeSet<String>) {
        self.share_sum = self
            .share_sum
            .wrapping_add(encode::entry_share(&e.name, &e.version));
        for a in &e.addresses {
            let holders = self.by_address.entry(a.clone()).or_default();
            changed.extend(holders.winner().cloned());
            if let Some(set) = holders.set(e.origin) {
                set.insert(e.name.clone());
            }
            changed.extend(holders.winner().cloned());
        }
    }

    fn unindex(&mut self, e: &Entry, changed: &mut BTreeSet<String>) {
        self.share_sum = self
            .share_sum
            .wrapping_sub(encode::entry_share(&e.name, &e.version));
        for a in &e.addresses {
            let Some(holders) = self.by_address.get_mut(a) else {
                continue;
            };
            changed.extend(holders.winner().cloned());
            if let Some(set) = holders.set(e.origin) {
                set.remove(&e.name);
            }
            changed.extend(holders.winner().cloned());
            if holders.winner().is_none() {
                self.by_address.remove(a);
            }
        }
    }

    /// The resource an address key resolves to.
    fn by_key(&self, key: &str) -> Option<&Arc<Entry>> {
        let name = self.by_address.get(key)?.winner()?;
        self.resources.get(name)
    }

    /// Completes a change: a changed name that is itself an address alias stood for (and may stand
    /// for again) whatever that address resolves to; and the system version moves.
    fn settle(&mut self, kind: Kind, changed: &mut BTreeSet<String>) {
        let targets: Vec<String> = changed
            .iter()
            .filter_map(|n| self.by_key(&address_key(kind, n)?))
            .map(|e| e.name.clone())
            .collect();
        changed.extend(targets);
        self.system_version = format!("{:016x}", self.share_sum);
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
            if let Some(entry) = encode::address_entry(address) {
                out.push((Kind::Address, entry));
            }
        }
        for policy in config.authorizations() {
            out.push((Kind::Authorization, encode::policy_entry(policy)));
        }
        Self(out)
    }

    /// How many resources of `kind`.
    pub fn count(&self, kind: Kind) -> usize {
        self.0.iter().filter(|(k, _)| *k == kind).count()
    }
}

/// One change in a [`State`]'s log: from the state `parent` to the next one in the log (or to the
/// state holding the log, for the last).
#[derive(Debug, Default)]
struct Change {
    parent: u64,
    /// Per kind ([`Kind::ALL`] order), the names that may look different to a subscriber.
    names: [BTreeSet<String>; 2],
}

fn slot(kind: Kind) -> usize {
    match kind {
        Kind::Address => 0,
        Kind::Authorization => 1,
    }
}

/// Everything served, of both kinds. Cheap to clone (persistent maps, shared entries).
#[derive(Clone, Debug)]
pub(crate) struct State {
    kinds: [KindState; 2],
    /// Fresh for every change; clones share it.
    id: u64,
    /// The most recent changes, oldest first; the last one leads to `id`.
    log: Vector<Arc<Change>>,
}

impl Default for State {
    fn default() -> Self {
        let mut s = Self {
            kinds: Default::default(),
            id: fresh_id(),
            log: Vector::new(),
        };
        s.apply(Resources::default());
        s
    }
}

impl State {
    /// A state holding exactly `resources`, with a history of its own.
    pub fn new(resources: Resources) -> Self {
        let mut s = Self::default();
        s.apply(resources);
        s
    }

    fn kind(&self, kind: Kind) -> &KindState {
        &self.kinds[slot(kind)]
    }

    /// Puts `resources` in and settles the indexes, without recording a change.
    fn apply(&mut self, resources: Resources) -> [BTreeSet<String>; 2] {
        let mut names: [BTreeSet<String>; 2] = Default::default();
        for (kind, entry) in resources.0 {
            self.kinds[slot(kind)].insert(Arc::new(entry), &mut names[slot(kind)]);
        }
        for kind in Kind::ALL {
            self.kinds[slot(kind)].settle(kind, &mut names[slot(kind)]);
        }
        names
    }

    /// Records a change of `names` as the step to a fresh id.
    fn commit(&mut self, names: [BTreeSet<String>; 2]) {
        let id = fresh_id();
        self.log.push_back(Arc::new(Change {
            parent: self.id,
            names,
        }));
        if self.log.len() > MAX_LOG {
            self.log.pop_front();
        }
        self.id = id;
    }

    /// This state's id: two states with the same id have the same content.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The names of `kind` that may look different to a subscriber in this state than in the state
    /// `since` (an earlier id of this history); `None` when `since` is not in the log (another
    /// history, before a [`State::replace`], or too old): then only a full diff will do.
    pub fn changes_since(&self, kind: Kind, since: u64) -> Option<BTreeSet<String>> {
        if since == self.id {
            return Some(BTreeSet::new());
        }
        let start = self.log.binary_search_by(|c| c.parent.cmp(&since)).ok()?;
        let mut names = BTreeSet::new();
        for change in self.log.iter().skip(start) {
            names.extend(change.names[slot(kind)].iter().cloned());
        }
        Some(names)
    }

    /// Replaces everything with `resources`; a new history starts.
    pub fn replace(&mut self, resources: Resources) {
        *self = Self::new(resources);
    }

    /// Adds or replaces each of `resources` by name; the others stay.
    pub fn upsert(&mut self, resources: Resources) {
        let names = self.apply(resources);
        self.commit(names);
    }

    /// Removes one resource; false when there was none of that name.
    pub fn remove(&mut self, kind: Kind, name: &str) -> bool {
        let mut names: [BTreeSet<String>; 2] = Default::default();
        let k = &mut self.kinds[slot(kind)];
        if !k.remove(name, &mut names[slot(kind)]) {
            return false;
        }
        k.settle(kind, &mut names[slot(kind)]);
        self.commit(names);
        true
    }

    /// Serves `value` as the `Any.value` of resource `name`, whatever it contains.
    pub fn put_raw(&mut self, kind: Kind, name: &str, value: Vec<u8>) {
        let mut names: [BTreeSet<String>; 2] = Default::default();
        let entry = Entry::new(name.to_owned(), value, Vec::new(), Origin::Raw);
        let k = &mut self.kinds[slot(kind)];
        k.insert(Arc::new(entry), &mut names[slot(kind)]);
        k.settle(kind, &mut names[slot(kind)]);
        self.commit(names);
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
        k.by_key(&address_key(kind, name)?)
    }

    /// Every resource of `kind`, by name.
    pub fn entries(&self, kind: Kind) -> impl Iterator<Item = &Arc<Entry>> {
        self.kind(kind).resources.values()
    }

    /// A hash of every (name, version) of `kind`: same content, same value, across restarts.
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

/// The address-index key an on-demand name of `kind` stands for: `<network>/<ip>` with the IP
/// spelled canonically (`::ffff:…`, leading zeros in IPv6), for Address names of that form only.
pub(crate) fn address_key(kind: Kind, name: &str) -> Option<String> {
    if kind != Kind::Address {
        return None;
    }
    let (network, ip) = name.split_once('/')?;
    let ip: IpAddr = ip.parse().ok()?;
    Some(encode::network_addr(network, ip))
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
