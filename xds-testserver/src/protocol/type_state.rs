//! One type on one stream: the subscription, what the client holds, and the delta that brings it
//! in line with a [`State`], computed over the names that may differ only: those the state's change
//! log names since the last sync, and those a request (un)subscribed; a full diff when that is not
//! known (see [`TypeState::sync`]).
//!
//! Not here: nonces and responses (`protocol`'s `StreamState`).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use l4mesh::proto::envoy::discovery::{DeltaDiscoveryRequest, Resource};
use prost_types::Any;

use super::{Event, NackInfo, TypeInfo, MAX_NACKS};
use crate::state::{address_key, Entry, State};
use crate::Kind;

/// One response awaiting its ACK: what it changed.
#[derive(Clone, Debug)]
pub(super) struct Sent {
    pub(super) nonce: String,
    pub(super) upserts: Vec<(String, String)>,
    pub(super) removals: Vec<String>,
}

/// One type on one stream.
#[derive(Clone, Debug, Default)]
pub(super) struct TypeState {
    pub(super) wildcard: bool,
    pub(super) names: BTreeSet<String>,
    /// Address key (`<network>/<ip>`, canonical spelling) → the subscribed names standing for it.
    pub(super) names_by_key: BTreeMap<String, BTreeSet<String>>,
    /// Name → version the client holds (or was sent).
    pub(super) held: BTreeMap<String, String>,
    /// Aliases each held resource was last sent with.
    pub(super) sent_aliases: BTreeMap<String, BTreeSet<String>>,
    /// Name → version the client ACKed.
    pub(super) acked: BTreeMap<String, String>,
    /// How many held names have their held version ACKed.
    pub(super) acked_count: usize,
    /// The id of the state that `held` and `sent_aliases` match.
    pub(super) synced: Option<u64>,
    pub(super) outstanding: VecDeque<Sent>,
    pub(super) last_acked_nonce: Option<String>,
    pub(super) nacks: VecDeque<NackInfo>,
    pub(super) responses_sent: u64,
    pub(super) acks: u64,
}

/// The delta: resources to send and names to remove.
pub(super) struct Delta {
    pub(super) resources: Vec<Resource>,
    pub(super) removed: Vec<String>,
}

/// What a request changed in a subscription.
pub(super) enum Touched {
    /// The wildcard, or the first request: every name may be concerned.
    All,
    /// Only these names were (un)subscribed.
    Names(Vec<String>),
}

impl TypeState {
    /// Applies a subscription change.
    pub(super) fn subscribe(
        &mut self,
        kind: Kind,
        req: &DeltaDiscoveryRequest,
        first: bool,
    ) -> Touched {
        let was_wildcard = self.wildcard;
        let mut touched = Vec::new();
        if first && req.resource_names_subscribe.is_empty() {
            self.wildcard = true;
        }
        for name in &req.resource_names_subscribe {
            if name == "*" {
                self.wildcard = true;
            } else {
                self.add_name(kind, name);
                touched.push(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                self.wildcard = false;
            } else {
                self.remove_name(kind, name);
                touched.push(name.clone());
            }
        }
        if first {
            for (name, version) in &req.initial_resource_versions {
                self.hold(name, version);
                if !self.wildcard {
                    self.add_name(kind, name);
                }
            }
        }
        if first || self.wildcard != was_wildcard {
            Touched::All
        } else {
            Touched::Names(touched)
        }
    }

    fn add_name(&mut self, kind: Kind, name: &str) {
        if self.names.insert(name.to_owned()) {
            if let Some(key) = address_key(kind, name) {
                self.names_by_key
                    .entry(key)
                    .or_default()
                    .insert(name.to_owned());
            }
        }
    }

    fn remove_name(&mut self, kind: Kind, name: &str) {
        if self.names.remove(name) {
            if let Some(key) = address_key(kind, name) {
                if let Some(names) = self.names_by_key.get_mut(&key) {
                    names.remove(name);
                    if names.is_empty() {
                        self.names_by_key.remove(&key);
                    }
                }
            }
        }
    }

    /// Whether the client ACKed the version of `name` it holds.
    fn is_acked(&self, name: &str) -> bool {
        matches!((self.held.get(name), self.acked.get(name)), (Some(h), Some(a)) if h == a)
    }

    /// Runs `f`, which changes what is held or ACKed of `name` only, keeping `acked_count` right.
    fn edit(&mut self, name: &str, f: impl FnOnce(&mut Self)) {
        let before = self.is_acked(name);
        f(self);
        match (before, self.is_acked(name)) {
            (false, true) => self.acked_count += 1,
            (true, false) => self.acked_count -= 1,
            _ => {}
        }
    }

    fn hold(&mut self, name: &str, version: &str) {
        self.edit(name, |s| {
            s.held.insert(name.to_owned(), version.to_owned());
        });
    }

    /// Handles `response_nonce` / `error_detail`.
    pub(super) fn ack(
        &mut self,
        kind: Kind,
        req: &DeltaDiscoveryRequest,
        now_unix_ms: u64,
    ) -> Option<Event> {
        if req.response_nonce.is_empty() {
            return None;
        }
        let nonce = req.response_nonce.clone();
        let sent = self
            .outstanding
            .iter()
            .position(|s| s.nonce == nonce)
            .and_then(|i| self.outstanding.remove(i));
        if let Some(status) = &req.error_detail {
            let resources = sent.map_or_else(Vec::new, |s| {
                s.upserts
                    .into_iter()
                    .map(|(name, _)| name)
                    .chain(s.removals)
                    .collect()
            });
            let nack = NackInfo {
                nonce,
                code: status.code,
                message: status.message.clone(),
                time_unix_ms: now_unix_ms,
                resources,
            };
            if self.nacks.len() == MAX_NACKS {
                self.nacks.pop_front();
            }
            self.nacks.push_back(nack.clone());
            return Some(Event::Nack { kind, nack });
        }
        let Some(sent) = sent else {
            return Some(Event::UnknownNonce { kind, nonce });
        };
        for (name, version) in sent.upserts {
            self.edit(&name, |s| {
                s.acked.insert(name.clone(), version);
            });
        }
        for name in sent.removals {
            self.edit(&name, |s| {
                s.acked.remove(&name);
            });
        }
        self.acks += 1;
        self.last_acked_nonce = Some(nonce.clone());
        Some(Event::Ack { kind, nonce })
    }

    /// What the client should receive to match `state`, recorded as held. Only the names that may
    /// differ are looked at: those the state's log names since the last sync, and what `touched`
    /// resolves to; everything when that is not known (first sync, wildcard change, a state of
    /// another history or too far ahead).
    pub(super) fn sync(&mut self, kind: Kind, state: &State, touched: Touched) -> Delta {
        let changed = match (touched, self.synced) {
            (Touched::Names(names), Some(id)) => state.changes_since(kind, id).map(|mut c| {
                let resolved = names.iter().filter_map(|n| state.resolve(kind, n));
                c.extend(resolved.map(|e| e.name.clone()));
                c
            }),
            _ => None,
        };
        let candidates = changed.unwrap_or_else(|| self.everything(kind, state));
        self.synced = Some(state.id());
        self.delta(kind, state, candidates)
    }

    /// Every name a full diff looks at: what the client holds and what is of interest in `state`.
    fn everything(&self, kind: Kind, state: &State) -> BTreeSet<String> {
        let mut all: BTreeSet<String> = self.held.keys().cloned().collect();
        if self.wildcard {
            all.extend(state.entries(kind).map(|e| e.name.clone()));
        }
        let resolved = self.names.iter().filter_map(|n| state.resolve(kind, n));
        all.extend(resolved.map(|e| e.name.clone()));
        all
    }

    /// The resource `name` of `state`, with the subscribed aliases resolving to it, when the client
    /// is interested in it.
    fn interest<'s>(
        &self,
        kind: Kind,
        state: &'s State,
        name: &str,
    ) -> Option<(&'s Arc<Entry>, BTreeSet<String>)> {
        let entry = state.get(kind, name)?;
        let mut aliases = BTreeSet::new();
        for key in &entry.addresses {
            for alias in self.names_by_key.get(key).into_iter().flatten() {
                if alias != name && state.resolve(kind, alias).is_some_and(|e| e.name == name) {
                    aliases.insert(alias.clone());
                }
            }
        }
        let wanted = self.wildcard || self.names.contains(name) || !aliases.is_empty();
        wanted.then_some((entry, aliases))
    }

    /// The delta over `candidates` (every name whose interest or version may have changed).
    fn delta(&mut self, kind: Kind, state: &State, candidates: BTreeSet<String>) -> Delta {
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        for name in candidates {
            let Some((entry, aliases)) = self.interest(kind, state, &name) else {
                if self.held.contains_key(&name) {
                    self.edit(&name, |s| {
                        s.held.remove(&name);
                    });
                    self.sent_aliases.remove(&name);
                    removed.push(name);
                }
                continue;
            };
            let known_aliases = self.sent_aliases.get(&name);
            let new_alias = aliases
                .iter()
                .any(|a| !known_aliases.is_some_and(|k| k.contains(a)));
            let outdated = self.held.get(&name) != Some(&entry.version);
            if outdated || new_alias {
                resources.push(Resource {
                    name: name.clone(),
                    aliases: aliases.iter().cloned().collect(),
                    version: entry.version.clone(),
                    resource: Some(Any {
                        type_url: kind.type_url().to_owned(),
                        value: entry.value.clone(),
                    }),
                    ttl: None,
                    cache_control: None,
                });
                self.hold(&name, &entry.version);
            }
            self.sent_aliases.insert(name, aliases);
        }
        Delta { resources, removed }
    }

    pub(super) fn info(&self, kind: Kind) -> TypeInfo {
        TypeInfo {
            type_url: kind.type_url().to_owned(),
            wildcard: self.wildcard,
            subscribed: self.names.iter().cloned().collect(),
            held: self.held.len(),
            acked: self.acked_count,
            last_acked_nonce: self.last_acked_nonce.clone(),
            pending_nonces: self.outstanding.iter().map(|s| s.nonce.clone()).collect(),
            responses_sent: self.responses_sent,
            acks: self.acks,
            nacks: self.nacks.iter().cloned().collect(),
        }
    }
}
