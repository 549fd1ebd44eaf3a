//! The DNS proxy (ztunnel's, on 15053 when DNS capture is on): mesh names (service hostnames,
//! ServiceEntry hosts, wildcard hosts) are answered from the store, authoritatively; every other
//! name goes to the upstream resolvers of `/etc/resolv.conf`.
//!
//! Split: [`answer`] (which mesh name a query means: pure store lookups and search-domain
//! stripping), [`respond`] here (a query's bytes → the reply's bytes or "forward it": the DNS
//! wire format through hickory-proto, never a parser of our own), [`forward`] (the upstream
//! exchange, UDP with a TCP retry when truncated), [`server`] (the UDP and TCP listeners, their
//! limits and metrics), [`resolve`] (on-demand DNS for destinations known by hostname only,
//! used by the outbound path whether or not the DNS proxy runs).

pub mod answer;
pub mod forward;
pub mod resolve;
pub mod server;

use std::net::IpAddr;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use rand::seq::SliceRandom;

pub use server::{DnsMetrics, DnsServer};

/// The TTL of answers from the store (ztunnel's).
pub const TTL_SECS: u32 = 30;

/// The UDP payload l4mesh announces in EDNS answers (DNS Flag Day 2020's safe size).
pub const EDNS_PAYLOAD: u16 = 1232;

/// What to do with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Send these bytes back (an answer from the store, or an error the request earned).
    Send { bytes: Vec<u8>, rcode: ResponseCode },
    /// Not a mesh name: the upstream resolvers answer it (the request as it came).
    Forward,
    /// Not even a DNS header: nothing can be answered (no id to answer with).
    Drop,
}

/// How a reply travels: over UDP it must fit what the client can take (512 bytes, or the size
/// its EDNS record announces), else it is cut and flagged truncated so that the client asks
/// again over TCP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The reply to `request` (one DNS message, as it came over `transport`) for `client`, from
/// `snapshot`. Only A and AAAA questions are answered from the store, as ztunnel: any other type
/// is forwarded, for mesh names too.
pub fn respond(
    request: &[u8],
    snapshot: &crate::store::Snapshot,
    client: answer::Client<'_>,
    rules: &answer::NameRules,
    transport: Transport,
) -> Reply {
    let msg = match Message::from_vec(request) {
        Ok(m) => m,
        Err(_) => return formerr(request),
    };
    if msg.message_type() != MessageType::Query {
        // Answering a response could make two servers talk to each other forever.
        return Reply::Drop;
    }
    if msg.op_code() != OpCode::Query {
        return error(&msg, ResponseCode::NotImp);
    }
    let [query] = msg.queries() else {
        // RFC 9619: one question per query.
        return error(&msg, ResponseCode::FormErr);
    };
    if !matches!(query.query_type(), RecordType::A | RecordType::AAAA)
        || query.query_class() != DNSClass::IN
    {
        return Reply::Forward;
    }
    let qname = query.name().to_lowercase().to_ascii();
    let qname = qname.strip_suffix('.').unwrap_or(&qname);
    let Some(mut found) = answer::lookup(snapshot, qname, client, rules) else {
        return Reply::Forward;
    };
    let mut out = response(&msg, ResponseCode::NoError);
    out.set_authoritative(true);
    let mut target = query.name().clone();
    if found.alias {
        match Name::from_ascii(format!("{}.", found.canonical)) {
            Ok(canonical) => {
                out.add_answer(Record::from_rdata(
                    query.name().clone(),
                    TTL_SECS,
                    RData::CNAME(CNAME(canonical.clone())),
                ));
                target = canonical;
            }
            Err(_) => return error(&msg, ResponseCode::ServFail),
        }
    }
    // Spread the clients over the addresses, as ztunnel does.
    found.addrs.shuffle(&mut rand::rng());
    // The other family of a mesh name: no records, NOERROR (not NXDOMAIN).
    for ip in &found.addrs {
        let rdata = match (query.query_type(), ip) {
            (RecordType::A, IpAddr::V4(v4)) => RData::A(A(*v4)),
            (RecordType::AAAA, IpAddr::V6(v6)) => RData::AAAA(AAAA(*v6)),
            _ => continue,
        };
        out.add_answer(Record::from_rdata(target.clone(), TTL_SECS, rdata));
    }
    let limit = match transport {
        Transport::Udp => usize::from(msg.max_payload()),
        Transport::Tcp => usize::from(u16::MAX),
    };
    fit(out, limit)
}

/// `out` encoded in at most `limit` bytes: whole when it fits; else without its additional
/// records when that is enough; else as many answers as fit, flagged truncated (the client asks
/// again over TCP).
fn fit(mut out: Message, limit: usize) -> Reply {
    let fits = |m: &Message| m.to_vec().ok().filter(|b| b.len() <= limit);
    if let Some(bytes) = fits(&out) {
        return Reply::Send {
            bytes,
            rcode: out.response_code(),
        };
    }
    let additionals = out.take_additionals();
    if !additionals.is_empty() {
        if let Some(bytes) = fits(&out) {
            return Reply::Send {
                bytes,
                rcode: out.response_code(),
            };
        }
    }
    let answers = out.take_answers();
    out.take_name_servers();
    out.set_truncated(true);
    // The most answers that fit (a binary search: a headless service may have thousands).
    let (mut lo, mut hi) = (0, answers.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        out.insert_answers(answers[..mid].to_vec());
        if fits(&out).is_some() {
            lo = mid;
        } else {
            hi = mid - 1;
        }
        out.take_answers();
    }
    out.insert_answers(answers[..lo].to_vec());
    send(out)
}

/// An upstream's answer to `request`, made to fit a UDP reply to the client: the answer the
/// forwarder got whole over TCP may be larger than what the client takes over UDP. What cannot
/// be cut to size becomes an empty truncated reply (the client asks again over TCP).
pub fn fit_udp(request: &[u8], answer: Vec<u8>) -> Vec<u8> {
    // Every client takes 512 bytes: most answers need no look at the request.
    if answer.len() <= 512 {
        return answer;
    }
    let Ok(req) = Message::from_vec(request) else {
        return answer;
    };
    let limit = usize::from(req.max_payload());
    if answer.len() <= limit {
        return answer;
    }
    if let Ok(Reply::Send { bytes, .. }) = Message::from_vec(&answer).map(|m| fit(m, limit)) {
        if bytes.len() <= limit {
            return bytes;
        }
    }
    let mut empty = response(&req, ResponseCode::NoError);
    empty.set_truncated(true);
    empty.to_vec().unwrap_or_default()
}

/// SERVFAIL for `request` (no upstream answered it); `None` when it does not parse.
pub fn servfail(request: &[u8]) -> Option<Vec<u8>> {
    let req = Message::from_vec(request).ok()?;
    response(&req, ResponseCode::ServFail).to_vec().ok()
}

/// The question's name and type (`a`, `aaaa`, …), for the metrics' label and the query's log
/// line; `None` when the request does not parse.
pub fn question(request: &[u8]) -> Option<(String, String)> {
    let m = Message::from_vec(request).ok()?;
    let q = m.queries().first()?;
    Some((
        q.name().to_ascii(),
        q.query_type().to_string().to_lowercase(),
    ))
}

/// A response skeleton for `req`: its id, (first) question and recursion-desired flag, and an EDNS
/// record when it had one (RFC 6891), announcing what l4mesh takes over UDP.
fn response(req: &Message, rcode: ResponseCode) -> Message {
    let mut out = Message::new();
    out.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(rcode);
    // One question at most: a reply to a many-question query (FORMERR) stays small.
    out.add_queries(req.queries().iter().take(1).cloned());
    if req.extensions().is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_PAYLOAD);
        out.set_edns(edns);
    }
    out
}

fn error(req: &Message, rcode: ResponseCode) -> Reply {
    send(response(req, rcode))
}

fn send(out: Message) -> Reply {
    let rcode = out.response_code();
    match out.to_vec() {
        Ok(bytes) => Reply::Send { bytes, rcode },
        Err(_) => Reply::Drop,
    }
}

/// FORMERR for a request that does not parse: answered with its id when it has a header at all.
fn formerr(request: &[u8]) -> Reply {
    let [a, b, ..] = request else {
        return Reply::Drop;
    };
    let mut out = Message::new();
    out.set_id(u16::from_be_bytes([*a, *b]))
        .set_message_type(MessageType::Response)
        .set_response_code(ResponseCode::FormErr);
    send(out)
}

#[cfg(test)]
mod tests;
