//! The ZDS protocol (wire-facts §8, `istio.workload.zds`), pure: one packet's bytes and the
//! descriptors that came with it in, a typed [`Request`] or a [`ZdsError`] out; the bytes of the
//! hello and of each ack. No I/O: [`super::transport`] moves packets, the pod manager acts on them.
//!
//! Invariants: every descriptor handed to [`decode`] is either returned inside the request it
//! belongs to (the `add`'s network namespace) or closed before it returns, on every path; the
//! agent is outside input, so nothing here panics on what it sends.

use std::os::fd::OwnedFd;

use prost::Message;

use crate::model::WorkloadInfo;
use crate::proto::istio::workload::zds as pb;

/// What the agent says about one pod.
#[derive(Debug)]
pub enum Request {
    /// A pod to serve, with its network namespace (opened by the agent, owned now by l4mesh);
    /// `info` is the pod as the agent knows it (its workload may not have reached the store yet).
    Add {
        uid: String,
        info: Option<WorkloadInfo>,
        netns: OwnedFd,
    },
    /// A pod l4mesh already serves, replayed after a reconnect: keep it as it is.
    Keep { uid: String },
    /// A pod to stop serving.
    Del { uid: String },
    /// The replay after a (re)connect is complete: pods not replayed are gone.
    SnapshotSent,
}

impl Request {
    /// The message's name, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Add { .. } => "add",
            Request::Keep { .. } => "keep",
            Request::Del { .. } => "del",
            Request::SnapshotSent => "snapshot_sent",
        }
    }
}

/// Why a packet was refused; answered with an ack carrying this text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ZdsError {
    #[error("the packet was truncated (MSG_TRUNC): expected one whole WorkloadRequest per packet")]
    Truncated,
    #[error("the descriptors of the packet were truncated (MSG_CTRUNC): expected at most one")]
    ControlTruncated,
    #[error("the packet is not a WorkloadRequest: {0}")]
    Undecodable(String),
    #[error("the WorkloadRequest carries no payload (expected add, keep, del or snapshot_sent)")]
    NoPayload,
    #[error("{kind} has an empty uid; expected the pod's uid")]
    EmptyUid { kind: &'static str },
    #[error("add for {uid} came without a descriptor; expected exactly one (the pod's network namespace)")]
    AddWithoutNetns { uid: String },
    #[error("{kind} came with {count} descriptors; expected {expected}")]
    Descriptors {
        kind: &'static str,
        count: usize,
        expected: usize,
    },
}

/// Reads one request. `truncated`/`ctrunc` are the `MSG_TRUNC`/`MSG_CTRUNC` flags of the
/// `recvmsg` that brought it; `fds` the descriptors it carried (closed here unless returned).
pub fn decode(
    packet: &[u8],
    mut fds: Vec<OwnedFd>,
    truncated: bool,
    ctrunc: bool,
) -> Result<Request, ZdsError> {
    if truncated {
        return Err(ZdsError::Truncated);
    }
    if ctrunc {
        return Err(ZdsError::ControlTruncated);
    }
    let req =
        pb::WorkloadRequest::decode(packet).map_err(|e| ZdsError::Undecodable(e.to_string()))?;
    let check_uid = |uid: String, kind| {
        if uid.is_empty() {
            Err(ZdsError::EmptyUid { kind })
        } else {
            Ok(uid)
        }
    };
    let no_fds = |kind: &'static str, fds: &[OwnedFd]| {
        if fds.is_empty() {
            Ok(())
        } else {
            Err(ZdsError::Descriptors {
                kind,
                count: fds.len(),
                expected: 0,
            })
        }
    };
    use pb::workload_request::Payload;
    match req.payload.ok_or(ZdsError::NoPayload)? {
        Payload::Add(a) => {
            let uid = check_uid(a.uid, "add")?;
            if fds.len() > 1 {
                return Err(ZdsError::Descriptors {
                    kind: "add",
                    count: fds.len(),
                    expected: 1,
                });
            }
            let netns = fds
                .pop()
                .ok_or(ZdsError::AddWithoutNetns { uid: uid.clone() })?;
            let info = a.workload_info.map(|w| WorkloadInfo {
                name: w.name,
                namespace: w.namespace,
                service_account: w.service_account,
            });
            Ok(Request::Add { uid, info, netns })
        }
        Payload::Keep(k) => {
            no_fds("keep", &fds)?;
            Ok(Request::Keep {
                uid: check_uid(k.uid, "keep")?,
            })
        }
        Payload::Del(d) => {
            no_fds("del", &fds)?;
            Ok(Request::Del {
                uid: check_uid(d.uid, "del")?,
            })
        }
        Payload::SnapshotSent(_) => {
            no_fds("snapshot_sent", &fds)?;
            Ok(Request::SnapshotSent)
        }
    }
}

/// The first packet l4mesh sends: `ZdsHello{version: V1}`.
pub fn hello() -> Vec<u8> {
    pb::ZdsHello {
        version: pb::Version::V1 as i32,
    }
    .encode_to_vec()
}

/// The answer to one request: an ack, its error empty on success.
pub fn ack(result: Result<(), &str>) -> Vec<u8> {
    pb::WorkloadResponse {
        payload: Some(pb::workload_response::Payload::Ack(pb::Ack {
            error: result.err().unwrap_or_default().to_owned(),
        })),
    }
    .encode_to_vec()
}

/// What a (re)connected agent's replay means for the pods l4mesh holds: after the hello the agent
/// sends every pod it knows (`add` or `keep`), then `snapshot_sent`; a pod held but not replayed
/// was removed while l4mesh was not listening.
#[derive(Debug, Default)]
pub struct Replay {
    seen: std::collections::BTreeSet<String>,
    done: bool,
}

impl Replay {
    /// Notes a pod named during the replay (ignored once it is over).
    pub fn saw(&mut self, uid: &str) {
        if !self.done {
            self.seen.insert(uid.to_owned());
        }
    }

    /// Ends the replay: the pods of `held` it did not name, to be removed. A second
    /// `snapshot_sent` removes nothing.
    pub fn finish<'a>(&mut self, held: impl IntoIterator<Item = &'a String>) -> Vec<String> {
        if self.done {
            return Vec::new();
        }
        self.done = true;
        held.into_iter()
            .filter(|u| !self.seen.contains(*u))
            .cloned()
            .collect()
    }

    /// Whether `snapshot_sent` has come.
    pub fn is_done(&self) -> bool {
        self.done
    }
}

#[cfg(test)]
#[path = "zds_tests.rs"]
mod tests;
