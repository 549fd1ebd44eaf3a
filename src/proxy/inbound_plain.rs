//! The inbound plaintext path (15006): a connection redirected to a workload of this node from
//! outside the mesh (or from a non-HBONE peer) is forwarded to that workload if its policies allow
//! a peer without identity (`rbac`); a denied connection is closed without connecting upstream, and
//! an established one is closed when a policy change denies it.

use std::net::SocketAddr;

use tokio::net::TcpStream;

use super::access::ConnLog;
use super::conn_tracker::Registration;
use super::copy::{self, Transferred};
use super::route::{Upstream, UpstreamKind};
use super::{ProxyCtx, ProxyError, Role};
use crate::rbac::ConnCtx;

pub(super) async fn serve(ctx: &ProxyCtx, down: TcpStream, src: SocketAddr) {
    let dst = match super::captured_dst(ctx, &down, src) {
        Ok(d) => d,
        Err(e) => {
            let (local, e) = *e;
            ConnLog::new(Role::InboundPlaintext, src, local)
                .in_pod(ctx.pod_name())
                .finish(Transferred::default(), Some(&e));
            return;
        }
    };
    let mut log = ConnLog::new(Role::InboundPlaintext, src, dst).in_pod(ctx.pod_name());
    super::trace::start(ctx, &mut log, None);
    let (mut down, (mut up, mut reg)) = match open(ctx, &mut log).await {
        Ok(up) => (down, up),
        Err(e) => return log.finish(Transferred::default(), Some(&e)),
    };
    super::trace::connected(&log);
    // A revocation or the drain deadline ends the copy; the bytes moved until then are still
    // reported.
    let mut stop = None;
    let meter = log.meter();
    let (t, r) = copy::tcp_until(&mut down, &mut up, ctx.splice_after, &meter, async {
        stop = Some(super::stop::revoked_or_drained(&mut reg, &ctx.drain).await);
    })
    .await;
    let r = super::stop::outcome(r, stop, &ctx.drain);
    log.finish(t, r.err().as_ref());
}

async fn open(ctx: &ProxyCtx, log: &mut ConnLog) -> Result<(TcpStream, Registration), ProxyError> {
    let dst = log.dst;
    // Whatever address it was sent to, an inbound connection is for this namespace: one of
    // l4mesh's forwarding ports there is l4mesh itself.
    if ctx.own_ports.forwards(dst.port()) {
        return Err(ProxyError::SelfCall { dst });
    }
    let snapshot = ctx.store.load();
    let workload =
        ctx.local_workload(&snapshot, dst.ip())
            .ok_or_else(|| ProxyError::NotLocalWorkload {
                dst,
                node: ctx.node_name.clone(),
            })?;
    log.metrics = Some(super::metering::inbound(
        ctx,
        &snapshot,
        &[log.src.ip()],
        None,
        &workload,
        dst.port(),
        None,
    ));
    // With L4MESH_ENFORCE_WAYPOINT, a workload behind a waypoint takes traffic only from its
    // waypoint, over HBONE: plaintext proves no identity, so it would bypass the waypoint's policy.
    // (ztunnel, the default, lets it through: an AuthorizationPolicy is what forces the waypoint.)
    if ctx.enforce_waypoint && workload.waypoint.is_some() {
        return Err(super::hbone::Outcome::Denied(format!(
            "workload {}/{} has a waypoint; plaintext inbound traffic would bypass it (expected HBONE from the waypoint)",
            workload.namespace, workload.name
        ))
        .into());
    }
    log.upstream = Some(Upstream {
        addr: dst,
        workload: Some(workload.clone()),
        service: None,
        kind: UpstreamKind::Tcp,
        waypoint: None,
        hostname: None,
        gateway: None,
    });
    let conn = ConnCtx {
        peer: None,
        src_ip: log.src.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let via = if ctx.enforce_waypoint {
        super::conn_tracker::Via::Plaintext
    } else {
        super::conn_tracker::Via::Unchecked
    };
    let reg = super::admit(ctx, &snapshot, &workload, conn, via)?;
    drop(snapshot);
    // The workload sees the caller's IP, not l4mesh's, when ENABLE_ORIG_SRC allows it.
    let up = crate::socket::connect_from(dst, Some(log.src.ip()), &ctx.upstream)
        .await
        .map_err(|error| ProxyError::Connect { addr: dst, error })?;
    Ok((up, reg))
}
