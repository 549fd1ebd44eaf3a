//! Why a connection failed, who is to blame, and the flag the access log shows.

use std::io;
use std::net::SocketAddr;

use super::copy::CopyError;
use super::route::RouteError;

/// The side responsible for a failed connection; operators start their search there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    Downstream,
    Upstream,
    Policy,
    ControlPlane,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("could not read the original destination of the connection: {0}")]
    OrigDst(#[source] io::Error),
    #[error("destination {dst} is one of l4mesh's own listeners; refusing the connection so that it does not loop (was the traffic redirected twice, or dialled directly?)")]
    Loop { dst: SocketAddr },
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("connecting to {addr} failed: {source} (is the destination listening? is a firewall or NetworkPolicy blocking it?)")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("destination {dst} is workload {workload}, which only accepts HBONE tunnels, and this l4mesh has no HBONE support yet; set the workload's protocol to TCP to reach it in plaintext")]
    HboneUnavailable { dst: SocketAddr, workload: String },
    #[error("inbound connection to {dst}: no workload on this node (NODE_NAME {node:?}) has that address; expected the address of a local workload")]
    NotLocalWorkload { dst: SocketAddr, node: String },
    #[error("SOCKS5 handshake: {0}")]
    Socks5(String),
    #[error(transparent)]
    Copy(#[from] CopyError),
}

impl ProxyError {
    /// The access-log response flag (Envoy's vocabulary) and the side to blame.
    pub fn classify(&self) -> (&'static str, Blame) {
        match self {
            ProxyError::OrigDst(_) => ("NR", Blame::Internal),
            ProxyError::Loop { .. } => ("NR", Blame::Downstream),
            ProxyError::Route(_) => ("UH", Blame::ControlPlane),
            ProxyError::Connect { .. } => ("UF", Blame::Upstream),
            ProxyError::HboneUnavailable { .. } => ("NR", Blame::Internal),
            ProxyError::NotLocalWorkload { .. } => ("NR", Blame::Downstream),
            ProxyError::Socks5(_) => ("DPE", Blame::Downstream),
            ProxyError::Copy(CopyError::DownstreamRead(_) | CopyError::DownstreamWrite(_)) => {
                ("DC", Blame::Downstream)
            }
            ProxyError::Copy(CopyError::UpstreamRead(_) | CopyError::UpstreamWrite(_)) => {
                ("UC", Blame::Upstream)
            }
        }
    }
}
