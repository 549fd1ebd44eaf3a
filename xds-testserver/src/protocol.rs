//! The server side of delta xDS for one stream, as pure bookkeeping: per type URL, the subscription
//! (wildcard and/or names), what the client holds (name → version), the responses awaiting an ACK,
//! and the ACK/NACK history. It turns a request, or a new [`State`], into the responses to send.
//!
//! Rules it implements:
//! - The first request of a type with an empty subscribe list is a wildcard subscription; `*` in
//!   `resource_names_subscribe` subscribes to everything, `*` in `resource_names_unsubscribe` ends
//!   that (ztunnel's on-demand mode sends both at once: nothing). Other names are explicit.
//! - `initial_resource_versions` on the first request of a type seeds what the client holds; in a
//!   non-wildcard subscription those names also count as subscribed, so they keep being updated.
//! - A resource is sent when the client does not hold its current version, or when a subscribed alias
//!   resolving to it (`<network>/<ip>`) is new; it carries those aliases. A held name that no longer
//!   exists or is no longer of interest is sent in `removed_resources`.
//! - What is sent is assumed held (optimistically): a NACKed version is not sent again until it
//!   changes. ACKs move a response's versions into the acknowledged set.
//! - The first request of each type is always answered, even when there is nothing to send, so that
//!   a client knows its initial sync is done; later requests are answered only when there is a delta.
//!
//! Cost: a type remembers the id of the state it last synced to; a later state of the same history
//! is caught up from its change log, so a change of k resources (or a request (un)subscribing k
//! names) costs O(k · log N), and an ACK O(resources it acknowledges). A full diff (O(N)) is done on
//! the first request of a type, when the wildcard is (un)subscribed, and for a state of another
//! history ([`State::replace`], a stream too far behind), e.g. a file reload or `set_state_yaml`.
//!
//! Not here: sockets, locks, clocks (time is an argument), logging, authentication; the per-type
//! bookkeeping itself is in `type_state`.

#[cfg(test)]
mod incremental_tests;
#[cfg(test)]
mod tests;
mod type_state;

use std::collections::BTreeMap;

use l4mesh::proto::envoy::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};

use crate::state::State;
use crate::Kind;
use type_state::{Delta, Sent, Touched, TypeState};

/// Responses kept awaiting an ACK per type; older ones are forgotten (a client that never ACKs).
const MAX_OUTSTANDING: usize = 64;
/// NACKs remembered per type.
const MAX_NACKS: usize = 32;

/// A NACK: a client refused (part of) a response.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NackInfo {
    /// The nonce of the refused response (as echoed by the client).
    pub nonce: String,
    /// `error_detail.code` (a gRPC status code).
    pub code: i32,
    /// `error_detail.message`: what the client said was wrong.
    pub message: String,
    /// When it arrived, in milliseconds since the Unix epoch.
    pub time_unix_ms: u64,
    /// The resources (and removals) of the refused response, when the nonce was known.
    pub resources: Vec<String>,
}

/// The state of one type on one stream, as the admin API shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct TypeInfo {
    /// The type URL.
    pub type_url: String,
    /// Subscribed to everything.
    pub wildcard: bool,
    /// Explicitly subscribed names (on-demand names, aliases, canonical names).
    pub subscribed: Vec<String>,
    /// Resources the client holds (or was sent and did not ACK yet).
    pub held: usize,
    /// Resources whose current version the client has ACKed.
    pub acked: usize,
    /// The nonce of the last ACKed response.
    pub last_acked_nonce: Option<String>,
    /// Nonces of responses not yet ACKed or NACKed.
    pub pending_nonces: Vec<String>,
    /// Responses sent on this type.
    pub responses_sent: u64,
    /// ACKs received.
    pub acks: u64,
    /// NACKs received (the most recent ones).
    pub nacks: Vec<NackInfo>,
}

/// Something worth logging or recording that a request did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// The client accepted the response with this nonce.
    Ack { kind: Kind, nonce: String },
    /// The client refused a response.
    Nack { kind: Kind, nack: NackInfo },
    /// An ACK for a nonce this stream never sent or already forgot (harmless).
    UnknownNonce { kind: Kind, nonce: String },
    /// A type URL this server does not serve; the request was ignored.
    UnknownType { type_url: String },
}

/// What handling a request produced.
#[derive(Debug, Default)]
pub(crate) struct Output {
    pub responses: Vec<DeltaDiscoveryResponse>,
    pub events: Vec<Event>,
}

/// The delta-xDS state of one stream.
#[derive(Debug)]
pub(crate) struct StreamState {
    nonce_prefix: String,
    next_nonce: u64,
    node_id: Option<String>,
    types: BTreeMap<Kind, TypeState>,
}

impl StreamState {
    /// A new stream; its nonces are `<nonce_prefix>-<n>`, so make the prefix unique per stream and
    /// per server run.
    pub fn new(nonce_prefix: impl Into<String>) -> Self {
        Self {
            nonce_prefix: nonce_prefix.into(),
            next_nonce: 1,
            node_id: None,
            types: BTreeMap::new(),
        }
    }

    /// The node id the client sent (on its first request).
    pub fn node_id(&self) -> Option<&str> {
        self.node_id.as_deref()
    }

    /// Handles one request against the current `state`.
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        state: &State,
        now_unix_ms: u64,
    ) -> Output {
        let mut out = Output::default();
        if self.node_id.is_none() {
            if let Some(node) = &req.node {
                self.node_id = Some(node.id.clone());
            }
        }
        let Some(kind) = Kind::from_type_url(&req.type_url) else {
            out.events.push(Event::UnknownType {
                type_url: req.type_url.clone(),
            });
            return out;
        };
        let first = !self.types.contains_key(&kind);
        let ts = self.types.entry(kind).or_default();
        out.events.extend(ts.ack(kind, req, now_unix_ms));
        let touched = ts.subscribe(kind, req, first);
        let delta = ts.sync(kind, state, touched);
        out.responses
            .extend(self.respond(kind, state, delta, first));
        out
    }

    /// The responses that bring every subscribed type up to date with a new `state`.
    pub fn on_state(&mut self, state: &State) -> Vec<DeltaDiscoveryResponse> {
        let kinds: Vec<Kind> = self.types.keys().copied().collect();
        let mut responses = Vec::new();
        for kind in kinds {
            if let Some(ts) = self.types.get_mut(&kind) {
                let delta = ts.sync(kind, state, Touched::Names(Vec::new()));
                responses.extend(self.respond(kind, state, delta, false));
            }
        }
        responses
    }

    /// Per type, for the admin API.
    pub fn info(&self) -> BTreeMap<Kind, TypeInfo> {
        self.types.iter().map(|(k, ts)| (*k, ts.info(*k))).collect()
    }

    fn respond(
        &mut self,
        kind: Kind,
        state: &State,
        delta: Delta,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        if delta.resources.is_empty() && delta.removed.is_empty() && !always {
            return None;
        }
        let nonce = format!("{}-{}", self.nonce_prefix, self.next_nonce);
        self.next_nonce += 1;
        let ts = self.types.entry(kind).or_default();
        if ts.outstanding.len() == MAX_OUTSTANDING {
            ts.outstanding.pop_front();
        }
        ts.outstanding.push_back(Sent {
            nonce: nonce.clone(),
            upserts: delta
                .resources
                .iter()
                .map(|r| (r.name.clone(), r.version.clone()))
                .collect(),
            removals: delta.removed.clone(),
        });
        ts.responses_sent += 1;
        Some(DeltaDiscoveryResponse {
            system_version_info: state.system_version(kind).to_owned(),
            resources: delta.resources,
            type_url: kind.type_url().to_owned(),
            removed_resources: delta.removed,
            nonce,
        })
    }
}
