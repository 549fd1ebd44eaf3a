//! The derived fields of a closed connection (upstream address, waypoint, flag, blame, error,
//! duration), computed once at close and shared by the access-log line (`access`) and the OTel
//! span and record (`trace`), so that both say the same thing and neither pays for it twice.

use super::access::ConnLog;
use super::copy::Transferred;
use super::ProxyError;

/// What the access line and the span say about a connection beyond its [`ConnLog`] fields.
pub(super) struct AccessFields<'a> {
    pub transferred: Transferred,
    /// What was dialled (`dst.upstream`); through a waypoint, the tunnel's authority.
    pub upstream: Option<String>,
    /// `namespace/name@ip:port` of the waypoint the connection went through.
    pub waypoint: Option<String>,
    /// `namespace/name@ip:port` of the network gateway a double-HBONE connection went through.
    pub gateway: Option<String>,
    /// The CONNECT authority through a network gateway (`<service hostname>:<port>`), ztunnel's
    /// `dst.hbone_addr`.
    pub hbone_addr: Option<&'a str>,
    pub service: Option<&'a str>,
    pub dst_workload: Option<&'a str>,
    pub dst_namespace: Option<&'a str>,
    pub duration_ms: u64,
    /// `-`, or the response flag of the failure (`DC`, `UC`, `LR`…).
    pub flag: &'static str,
    pub blame: Option<String>,
    pub error: Option<String>,
}

impl<'a> AccessFields<'a> {
    pub fn new(log: &'a ConnLog, transferred: Transferred, err: Option<&ProxyError>) -> Self {
        let up = log.upstream.as_ref();
        let dst_workload = up.and_then(|u| u.workload.as_ref());
        let (flag, blame, error) = match err {
            None => ("-", None, None),
            Some(e) => {
                let (flag, blame) = e.classify();
                (flag, Some(format!("{blame:?}")), Some(e.to_string()))
            }
        };
        Self {
            transferred,
            upstream: up.map(|u| u.addr.to_string()),
            waypoint: up
                .and_then(|u| u.waypoint.as_ref())
                .map(|w| format!("{}/{}@{}", w.workload.namespace, w.workload.name, w.addr)),
            gateway: up.and_then(|u| {
                let g = u.gateway.as_ref()?;
                Some(format!(
                    "{}/{}@{}",
                    g.workload.namespace, g.workload.name, u.addr
                ))
            }),
            hbone_addr: up
                .and_then(|u| u.gateway.as_ref())
                .map(|g| g.authority.as_str()),
            service: up
                .and_then(|u| u.service.as_ref())
                .map(|s| s.hostname.as_str()),
            dst_workload: dst_workload.map(|w| w.name.as_str()),
            dst_namespace: dst_workload.map(|w| w.namespace.as_str()),
            duration_ms: log.start.elapsed().as_millis() as u64,
            flag,
            blame,
            error,
        }
    }

    /// Whether the connection failed.
    pub fn failed(&self) -> bool {
        self.error.is_some()
    }
}
