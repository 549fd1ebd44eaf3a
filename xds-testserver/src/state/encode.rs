//! Turning l4mesh's model messages into served [`Entry`]s: deterministic encoding, the addresses a
//! resource answers to, and the FNV-1a hashes behind versions and system versions.
//!
//! Not here: which entries are served (`state`).

use std::collections::BTreeMap;
use std::net::IpAddr;

use l4mesh::proto::istio::security as psec;
use l4mesh::proto::istio::workload as pw;
use prost::Message;

use super::{Entry, Origin};

/// `<network>/<ip>`, the key of the address index and the canonical spelling of an on-demand name.
pub(super) fn network_addr(network: &str, ip: IpAddr) -> String {
    format!("{network}/{ip}")
}

fn ip_of(bytes: &[u8]) -> Option<IpAddr> {
    match bytes.len() {
        4 => <[u8; 4]>::try_from(bytes).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(bytes).ok().map(IpAddr::from),
        _ => None,
    }
}

pub(super) fn address_entry(address: &pw::Address) -> Option<Entry> {
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

pub(super) fn policy_entry(policy: &psec::Authorization) -> Entry {
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

/// The share of one (name, version) in a system version: FNV-1a 64 of `name\0version\0`, mixed
/// (splitmix64's finalizer) so that the wrapping sum of shares, which does not depend on the order of
/// the resources and is updated per change, is not a linear function of the FNV states.
pub(super) fn entry_share(name: &str, version: &str) -> u64 {
    let mut h = Fnv::new();
    h.write(name.as_bytes());
    h.write(&[0]);
    h.write(version.as_bytes());
    h.write(&[0]);
    let mut z = h.0;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
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
