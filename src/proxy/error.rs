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
    #[error("connection to {local} was not redirected by the capture rules ({error}); capture listeners only take redirected traffic (is l4mesh's own traffic unmarked, or is a client dialling the port directly?)")]
    NotRedirected { local: SocketAddr, error: io::Error },
    #[error("destination {dst} is l4mesh itself (port {} is one of its listeners); refusing the connection so that it does not loop (was the traffic redirected twice, or is a client dialling l4mesh's ports?)", dst.port())]
    SelfCall { dst: SocketAddr },
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("connecting to {addr} failed: {error} (is the destination listening? is a firewall or NetworkPolicy blocking it?)")]
    Connect { addr: SocketAddr, error: io::Error },
    #[error("inbound connection to {dst}: no workload on this node (NODE_NAME {node:?}) has that address; expected the address of a local workload")]
    NotLocalWorkload { dst: SocketAddr, node: String },
    #[error(transparent)]
    Refused(#[from] super::hbone::Outcome),
    #[error("TLS handshake with {addr}: {error} (do both sides trust the same mesh root? is the peer's identity the expected one?)")]
    Tls {
        addr: SocketAddr,
        /// Whether we were the server (the client is to blame) or the client.
        inbound: bool,
        error: io::Error,
    },
    #[error(transparent)]
    TlsSetup(#[from] crate::tls::TlsError),
    #[error(transparent)]
    Certificate(#[from] crate::identity::NoCertificate),
    #[error("HBONE: {0}")]
    HboneHandshake(String),
    #[error("HBONE peer {peer} answered the CONNECT to {dst} with status {status} (400: not a workload of that node; 401: denied by its policy; 503: the workload did not accept the connection)")]
    HboneStatus {
        peer: SocketAddr,
        dst: SocketAddr,
        status: u16,
    },
    #[error("no identity to open an HBONE tunnel from {src}: the source is not a known workload and this l4mesh has no workload identity of its own (set PROXY_WORKLOAD_INFO in dedicated mode)")]
    NoSourceIdentity { src: SocketAddr },
    #[error("source address {src} belongs to workload {workload}, which this l4mesh does not serve ({}); refusing to tunnel with its identity (did an application bind a foreign source address?)", served.as_deref().map_or("no PROXY_WORKLOAD_INFO, and the address is not this network namespace's".to_owned(), |s| format!("it serves {s}")))]
    ForeignSource {
        src: SocketAddr,
        workload: String,
        served: Option<String>,
    },
    #[error("denied by authorization policy {policy}: {reason} (list the policies applying to the destination workload in the config dump; the access log flag is RBAC)")]
    Rbac {
        policy: String,
        reason: &'static str,
    },
    #[error("closed: after a policy change, authorization policy {policy} denies this established connection ({reason})")]
    Revoked {
        policy: String,
        reason: &'static str,
    },
    #[error("closed: after a mesh change the established connection is no longer admitted: {0}")]
    Unadmitted(String),
    #[error("closed: l4mesh is shutting down and the connection was still open at the drain deadline (CONNECTION_TERMINATION_DEADLINE)")]
    Drained,
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
            ProxyError::NotRedirected { .. } => ("NR", Blame::Downstream),
            ProxyError::SelfCall { .. } => ("NR", Blame::Downstream),
            ProxyError::Route(_) => ("UH", Blame::ControlPlane),
            ProxyError::Connect { .. } => ("UF", Blame::Upstream),
            ProxyError::NotLocalWorkload { .. } => ("NR", Blame::Downstream),
            ProxyError::Socks5(_) => ("DPE", Blame::Downstream),
            ProxyError::Rbac { .. } | ProxyError::Revoked { .. } | ProxyError::Unadmitted(_) => {
                ("RBAC", Blame::Policy)
            }
            ProxyError::Refused(o) => match o {
                super::hbone::Outcome::Denied(_) => ("RBAC", Blame::Policy),
                super::hbone::Outcome::NoUpstream(_) => ("UF", Blame::Upstream),
                _ => ("DPE", Blame::Downstream),
            },
            ProxyError::Tls { inbound: true, .. } => ("DPE", Blame::Downstream),
            ProxyError::Tls { .. } => ("UF", Blame::Upstream),
            ProxyError::TlsSetup(_) | ProxyError::Certificate(_) => ("NR", Blame::Internal),
            ProxyError::HboneHandshake(_) => ("DPE", Blame::Downstream),
            ProxyError::HboneStatus { status: 401, .. } => ("RBAC", Blame::Policy),
            ProxyError::HboneStatus { .. } => ("UF", Blame::Upstream),
            ProxyError::NoSourceIdentity { .. } => ("NR", Blame::Internal),
            ProxyError::ForeignSource { .. } => ("NR", Blame::Downstream),
            ProxyError::Copy(CopyError::DownstreamRead(_) | CopyError::DownstreamWrite(_)) => {
                ("DC", Blame::Downstream)
            }
            ProxyError::Copy(CopyError::UpstreamRead(_) | CopyError::UpstreamWrite(_)) => {
                ("UC", Blame::Upstream)
            }
            ProxyError::Copy(CopyError::Stopped) => ("RBAC", Blame::Policy),
            // Envoy's "local reset": this proxy closed the connection.
            ProxyError::Drained => ("LR", Blame::Internal),
        }
    }

    /// The `response_flags` of the metrics: ztunnel's three values, not the access log's Envoy
    /// flags. A connection refused by policy is `DENY`, one whose upstream could not be reached
    /// is `CONNECT`; every other end is `-`, including an established connection reset mid-copy,
    /// closed by a policy change or by the drain (ztunnel records those without a flag).
    pub fn metric_flag(&self) -> crate::metrics::ResponseFlag {
        use crate::metrics::ResponseFlag;
        if matches!(
            self,
            ProxyError::Copy(_)
                | ProxyError::Revoked { .. }
                | ProxyError::Unadmitted(_)
                | ProxyError::Drained
        ) {
            return ResponseFlag::None;
        }
        match self.classify().0 {
            "RBAC" => ResponseFlag::Deny,
            "UF" | "UH" => ResponseFlag::Connect,
            _ => ResponseFlag::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ResponseFlag;

    fn io() -> io::Error {
        io::Error::from(io::ErrorKind::ConnectionReset)
    }

    #[test]
    fn metric_flags_are_ztunnels_and_the_log_keeps_envoys() {
        let addr: SocketAddr = "127.51.0.1:80".parse().unwrap();
        let cases = [
            (
                ProxyError::Rbac {
                    policy: "ns/deny".into(),
                    reason: "r",
                },
                "RBAC",
                ResponseFlag::Deny,
            ),
            (
                ProxyError::Refused(super::super::hbone::Outcome::Denied("no".into())),
                "RBAC",
                ResponseFlag::Deny,
            ),
            (
                ProxyError::HboneStatus {
                    peer: addr,
                    dst: addr,
                    status: 401,
                },
                "RBAC",
                ResponseFlag::Deny,
            ),
            (
                ProxyError::Connect { addr, error: io() },
                "UF",
                ResponseFlag::Connect,
            ),
            (
                ProxyError::HboneStatus {
                    peer: addr,
                    dst: addr,
                    status: 503,
                },
                "UF",
                ResponseFlag::Connect,
            ),
            (
                ProxyError::Route(RouteError::WaypointNoEndpoint {
                    owner: "o".into(),
                    waypoint: "w".into(),
                }),
                "UH",
                ResponseFlag::Connect,
            ),
            // Ends of established connections keep `-`, as in ztunnel.
            (
                ProxyError::Copy(CopyError::UpstreamRead(io())),
                "UC",
                ResponseFlag::None,
            ),
            (
                ProxyError::Copy(CopyError::DownstreamWrite(io())),
                "DC",
                ResponseFlag::None,
            ),
            (
                ProxyError::Revoked {
                    policy: "ns/deny".into(),
                    reason: "r",
                },
                "RBAC",
                ResponseFlag::None,
            ),
            (
                ProxyError::Copy(CopyError::Stopped),
                "RBAC",
                ResponseFlag::None,
            ),
            (ProxyError::Drained, "LR", ResponseFlag::None),
            (ProxyError::SelfCall { dst: addr }, "NR", ResponseFlag::None),
            (
                ProxyError::HboneHandshake("bad".into()),
                "DPE",
                ResponseFlag::None,
            ),
        ];
        for (e, log_flag, metric_flag) in cases {
            assert_eq!(e.classify().0, log_flag, "{e}");
            assert_eq!(e.metric_flag(), metric_flag, "{e}");
        }
        assert_eq!(ResponseFlag::Deny.as_str(), "DENY");
        assert_eq!(ResponseFlag::Connect.as_str(), "CONNECT");
        assert_eq!(ResponseFlag::None.as_str(), "-");
    }
}
