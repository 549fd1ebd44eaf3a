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
///
/// A copy that failed once the drain deadline passed is `Drained` too, even if it did not see
/// the deadline itself: at the deadline an HBONE server drops its HTTP/2 connection, and a
/// tunnel's copy may see its stream reset before its own stop future runs — that is the drain's
/// doing, not the peer's (`LR`, not `DC`/`UC`).
pub(super) fn outcome(
    r: Result<(), CopyError>,
    stop: Option<Stop>,
    drain: &Signal,
) -> Result<(), ProxyError> {
    match (r, stop) {
        (Err(CopyError::Stopped), Some(Stop::Revoked(Revocation::Policy { policy, reason }))) => {
            Err(ProxyError::Revoked { policy, reason })
        }
        (Err(CopyError::Stopped), Some(Stop::Revoked(Revocation::Mesh(why)))) => {
            Err(ProxyError::Unadmitted(why))
        }
        (Err(CopyError::Stopped), Some(Stop::Drained)) => Err(ProxyError::Drained),
        (Err(_), None | Some(Stop::Drained)) if drain.is_forced() => Err(ProxyError::Drained),
        (r, _) => r.map_err(ProxyError::from),
    }
}
