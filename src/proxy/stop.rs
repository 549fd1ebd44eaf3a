//! Why a copy stopped before the end of its streams: a policy change revoked the connection, or
//! l4mesh is shutting down and the drain deadline passed. Both end the copy the same way; the
//! access log says which.

use super::conn_tracker::{Registration, Revocation};
use super::copy::CopyError;
use super::ProxyError;
use crate::drain::Signal;

pub(super) enum Stop {
    Revoked(Revocation),
    Drained,
}

/// Resolves when the policies now deny the connection or the drain deadline passed.
pub(super) async fn revoked_or_drained(reg: &mut Registration, drain: &Signal) -> Stop {
    tokio::select! {
        r = reg.revoked() => Stop::Revoked(r),
        () = drain.forced() => Stop::Drained,
    }
}

/// Resolves when the drain deadline passed.
pub(super) async fn drained(drain: &Signal) -> Stop {
    drain.forced().await;
    Stop::Drained
}

/// The connection's outcome from the copy's result and, if it was stopped, why.
pub(super) fn outcome(r: Result<(), CopyError>, stop: Option<Stop>) -> Result<(), ProxyError> {
    match (r, stop) {
        (Err(CopyError::Stopped), Some(Stop::Revoked(rev))) => Err(ProxyError::Revoked {
            policy: rev.policy,
            reason: rev.reason,
        }),
        (Err(CopyError::Stopped), Some(Stop::Drained)) => Err(ProxyError::Drained),
        (r, _) => r.map_err(ProxyError::from),
    }
}
