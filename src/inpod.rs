//! Shared (in-pod) mode's link to istio-cni: the node agent hands l4mesh each ambient pod's
//! network namespace over ZDS (`INPOD_UDS`); l4mesh answers every request with an ack, in order.
//!
//! Split: [`zds`] (the protocol, pure: packet + descriptors → request, acks), [`transport`] (the
//! `SOCK_SEQPACKET` socket with `SCM_RIGHTS`), [`netns`] (the one place that enters a pod's
//! network namespace: a thread per pod that makes its sockets), and [`follow`] here: connect with capped backoff
//! while the agent is away, hello, then one request → one ack, handing each valid request to a
//! [`PodHandler`]. A packet the protocol refuses gets an error ack naming why and changes nothing;
//! its descriptors are closed. After every reconnect the agent replays its pods and then
//! `snapshot_sent`; the handler hears [`PodHandler::reconnected`] first, so that it can tell
//! replayed pods from vanished ones ([`zds::Replay`]).
//!
//! The handler of the binary is [`manager::PodManager`]: a proxy per pod, its listeners and
//! upstream sockets made through the pod's [`netns::PodNetns`], served by the proxy's phases
//! with the pod's identity.

pub mod agent;
pub mod manager;
pub mod netns;
pub use crate::seqpacket as transport;
pub mod zds;

use std::path::Path;
use std::time::Duration;

pub use zds::{Request, ZdsError};

/// What acts on the agent's requests.
pub trait PodHandler {
    /// A new connection to the agent: its replay follows.
    fn reconnected(&mut self);
    /// One valid request; the error text, if any, goes back in the ack. The ack waits for it
    /// (an `add` is acked once the pod's listeners are bound).
    fn handle(
        &mut self,
        req: Request,
    ) -> impl std::future::Future<Output = Result<(), String>> + Send;
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Follows the agent at `path` forever: reconnects with capped exponential backoff, logging why
/// each attempt failed (the first at warn, then at debug until it works again).
pub async fn follow(path: &Path, handler: &mut (impl PodHandler + Send)) {
    let mut backoff = BACKOFF_MIN;
    let mut failures = 0u32;
    loop {
        match transport::Conn::connect(path).await {
            Ok(conn) => {
                failures = 0;
                backoff = BACKOFF_MIN;
                tracing::info!(path = %path.display(), "connected to the CNI node agent (ZDS)");
                handler.reconnected();
                match session(&conn, handler).await {
                    Ok(()) => {
                        tracing::warn!(path = %path.display(), "the CNI node agent closed the ZDS connection; reconnecting")
                    }
                    Err(e) => {
                        tracing::warn!(path = %path.display(), error = %e, "ZDS connection failed; reconnecting")
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(path = %path.display(), error = %e, retry_in = ?backoff, "cannot reach the CNI node agent (INPOD_UDS); is istio-cni running on this node?");
                } else {
                    tracing::debug!(path = %path.display(), error = %e, retry_in = ?backoff, attempt = failures, "still cannot reach the CNI node agent");
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// One connection: hello, then request → ack until the agent closes it.
pub async fn session(
    conn: &transport::Conn,
    handler: &mut (impl PodHandler + Send),
) -> std::io::Result<()> {
    conn.send(&zds::hello(), &[]).await?;
    while let Some(p) = conn.recv().await? {
        let result = match zds::decode(&p.bytes, p.fds, p.truncated, p.ctrunc) {
            Err(e) => Err(e.to_string()),
            Ok(req) => {
                let kind = req.kind();
                handler.handle(req).await.inspect_err(|e| {
                    tracing::warn!(request = kind, error = %e, "ZDS request failed");
                })
            }
        };
        let ack = match &result {
            Ok(()) => zds::ack(Ok(())),
            Err(e) => {
                tracing::debug!(error = %e, "ZDS: answering with an error ack");
                zds::ack(Err(e))
            }
        };
        conn.send(&ack, &[]).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
