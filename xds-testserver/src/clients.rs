//! The registry of xDS clients: the connected ones and the most recently disconnected, with each
//! type's subscription and ACK/NACK state as the stream last reported it, and a log of every NACK.
//! It is what `GET /clients`, `GET /nacks`, [`crate::Handle::clients`] and [`crate::Handle::nacks`]
//! show.
//!
//! Not here: the protocol itself (the streams report into this), I/O.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;

use crate::protocol::{NackInfo, TypeInfo};
use crate::Kind;

/// Disconnected clients kept for inspection.
const MAX_DISCONNECTED: usize = 32;
/// NACKs kept in the server-wide log.
const MAX_NACKS: usize = 1024;

/// One xDS stream, as `GET /clients` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClientInfo {
    /// A number unique to the stream within this server run.
    pub id: u64,
    /// `node.id` of the client's first request (empty until it arrives).
    pub node_id: String,
    /// The client's address, when known.
    pub peer: Option<SocketAddr>,
    /// Whether the stream is still open.
    pub connected: bool,
    /// When the stream opened, in milliseconds since the Unix epoch.
    pub connected_at_unix_ms: u64,
    /// When it closed.
    pub disconnected_at_unix_ms: Option<u64>,
    /// Per type (`address`, `authorization`): subscription, held and ACKed versions, NACKs.
    pub types: BTreeMap<Kind, TypeInfo>,
}

/// A NACK with the client that sent it, as `GET /nacks` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Nack {
    /// The stream ([`ClientInfo::id`]).
    pub client_id: u64,
    /// The client's node id.
    pub node_id: String,
    /// The client's address.
    pub peer: Option<SocketAddr>,
    /// The type of the refused response.
    pub kind: Kind,
    /// The nonce, error and refused resources.
    #[serde(flatten)]
    pub nack: NackInfo,
}

/// Connected and recently disconnected clients, and the NACK log.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    clients: BTreeMap<u64, ClientInfo>,
    nacks: VecDeque<Nack>,
}

impl Registry {
    /// A stream opened.
    pub fn connected(&mut self, id: u64, peer: Option<SocketAddr>, now_unix_ms: u64) {
        self.clients.insert(
            id,
            ClientInfo {
                id,
                node_id: String::new(),
                peer,
                connected: true,
                connected_at_unix_ms: now_unix_ms,
                disconnected_at_unix_ms: None,
                types: BTreeMap::new(),
            },
        );
    }

    /// A stream's latest state.
    pub fn update(&mut self, id: u64, node_id: Option<&str>, types: BTreeMap<Kind, TypeInfo>) {
        if let Some(c) = self.clients.get_mut(&id) {
            if let Some(node_id) = node_id {
                node_id.clone_into(&mut c.node_id);
            }
            c.types = types;
        }
    }

    /// Records a NACK of stream `id`.
    pub fn nack(&mut self, id: u64, kind: Kind, nack: NackInfo) {
        let (node_id, peer) = self
            .clients
            .get(&id)
            .map(|c| (c.node_id.clone(), c.peer))
            .unwrap_or_default();
        if self.nacks.len() == MAX_NACKS {
            self.nacks.pop_front();
        }
        self.nacks.push_back(Nack {
            client_id: id,
            node_id,
            peer,
            kind,
            nack,
        });
    }

    /// A stream closed; the oldest disconnected clients beyond the limit are forgotten.
    pub fn disconnected(&mut self, id: u64, now_unix_ms: u64) {
        if let Some(c) = self.clients.get_mut(&id) {
            c.connected = false;
            c.disconnected_at_unix_ms = Some(now_unix_ms);
        }
        let mut gone: Vec<(u64, u64)> = self
            .clients
            .values()
            .filter_map(|c| Some((c.disconnected_at_unix_ms?, c.id)))
            .collect();
        if gone.len() > MAX_DISCONNECTED {
            gone.sort_unstable();
            for (_, id) in &gone[..gone.len() - MAX_DISCONNECTED] {
                self.clients.remove(id);
            }
        }
    }

    /// Every client known, connected ones and recently disconnected, by id.
    pub fn clients(&self) -> Vec<ClientInfo> {
        self.clients.values().cloned().collect()
    }

    /// The NACK log, oldest first.
    pub fn nacks(&self) -> Vec<Nack> {
        self.nacks.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_a_bounded_number_of_disconnected_clients() {
        let mut r = Registry::default();
        for id in 0..(MAX_DISCONNECTED as u64 + 5) {
            r.connected(id, None, id);
            r.disconnected(id, 1000 + id);
        }
        r.connected(999, None, 0);
        let clients = r.clients();
        assert_eq!(clients.len(), MAX_DISCONNECTED + 1);
        assert!(clients.iter().any(|c| c.id == 999 && c.connected));
        assert!(!clients.iter().any(|c| c.id < 5));
    }

    #[test]
    fn nacks_name_their_client() {
        let mut r = Registry::default();
        r.connected(7, None, 0);
        r.update(
            7,
            Some("ztunnel~1.2.3.4~a.b~b.svc.cluster.local"),
            BTreeMap::new(),
        );
        let info = NackInfo {
            nonce: "n".into(),
            code: 3,
            message: "bad".into(),
            time_unix_ms: 1,
            resources: vec![],
        };
        r.nack(7, Kind::Address, info.clone());
        let nacks = r.nacks();
        assert_eq!(nacks.len(), 1);
        assert_eq!(nacks[0].node_id, "ztunnel~1.2.3.4~a.b~b.svc.cluster.local");
        assert_eq!(nacks[0].nack, info);
    }
}
