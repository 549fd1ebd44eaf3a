//! Outbound HBONE connections, pooled: tunnels (HTTP/2 streams) share one TLS+HTTP/2 connection
//! per (source identity, expected destination identities, destination address).
//!
//! Concurrent first requests for a key open one connection: each key has its own async lock, held
//! across that key's handshake only (the map lock is held for a lookup, never across I/O). A
//! connection takes at most `POOL_MAX_STREAMS_PER_CONNECTION` tunnels at once; then, or when it died, the next
//! request opens a replacement (the old one keeps serving its streams until they end).
//!
//! Each connection's driver task also sends a keepalive PING every [`Liveness::ping_interval`] (one
//! left unanswered at the next tick marks the connection dead) and closes it once it carried no
//! stream for [`Liveness::idle`]. A request that fails on a pooled connection anyway is retried once
//! on another: the failed connection is handed to no one again, so the tunnels it failed together
//! (a draining peer's GOAWAY) share one replacement rather than each opening its own in turn.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use h2::client::SendRequest;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};

use super::h2io::{self, H2Recv, H2Send};
use super::{ProxyCtx, ProxyError};
use crate::model::SpiffeId;
use crate::tls::crl::{Checker, Tracking};
use crate::tls::{self, ManagedCert};

/// What a pooled connection is for.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    /// The identity whose certificate the client presents.
    pub src: SpiffeId,
    /// The identities the server may prove (workload identity, service SANs).
    pub expected: Vec<SpiffeId>,
    /// `<workload ip>:15008`.
    pub addr: SocketAddr,
    /// Shared mode: the pod (uid) whose namespace the connection is made in. Pods never share
    /// a connection: it would carry one pod's traffic from another's address, and outlive it.
    pub pod: Option<Arc<str>>,
    /// Set for a pooled inner connection of double HBONE (`L4MESH_POOL_INNER_TUNNELS`): it runs
    /// inside a tunnel to the gateway at `addr` instead of over TCP.
    pub via: Option<Arc<Via>>,
}

/// How an inner connection reaches its destination: a tunnel through a network gateway.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Via {
    /// The gateway's identities.
    pub gateway: Vec<SpiffeId>,
    /// The outer CONNECT's authority (`<service hostname>:<port>`).
    pub authority: String,
}

/// An open tunnel: both halves, and the pool slot it holds until dropped (none for a tunnel
/// that is not pooled: double HBONE's inner one).
pub struct Tunnel {
    pub recv: H2Recv,
    pub send: H2Send,
    pub status: u16,
    _guard: Option<StreamGuard>,
}

impl Tunnel {
    /// A tunnel on a connection of its own, outside the pool.
    pub fn unpooled(recv: H2Recv, send: H2Send, status: u16) -> Tunnel {
        Tunnel {
            recv,
            send,
            status,
            _guard: None,
        }
    }

    /// The tunnel as one byte stream (for a TLS session inside it), still holding its slot.
    pub fn into_io(self) -> TunnelIo {
        TunnelIo {
            io: tokio::io::join(self.recv, self.send),
            _guard: self._guard,
        }
    }
}

/// A tunnel read and written as one stream: double HBONE runs the inner TLS over it.
pub struct TunnelIo {
    io: tokio::io::Join<H2Recv, H2Send>,
    _guard: Option<StreamGuard>,
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Counts a stream against its connection's limit (and in the pool's total) until dropped.
struct StreamGuard(Arc<AtomicUsize>, Arc<AtomicUsize>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts a live connection (its driver task runs) until dropped, whichever way the task ends.
struct LiveGuard(Arc<AtomicUsize>);

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The pool's size, read by the metrics endpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Distinct (source identity, expected identities, address) keys held.
    pub keys: usize,
    /// Outbound HBONE connections whose driver still runs (including replaced ones still
    /// carrying their streams).
    pub connections: usize,
    /// Tunnels (HTTP/2 streams) open on them.
    pub streams: usize,
}

#[derive(Clone)]
struct Conn {
    send: SendRequest<Bytes>,
    active: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    /// Streams it takes at once (`POOL_MAX_STREAMS_PER_CONNECTION`).
    max: usize,
    /// The pool's stream total.
    streams: Arc<AtomicUsize>,
}

impl Conn {
    /// Takes a stream slot if the connection is alive and below the limit.
    fn take(&self) -> Option<Taken> {
        if self.dead.load(Ordering::Acquire) {
            return None;
        }
        let prev = self.active.fetch_add(1, Ordering::AcqRel);
        self.streams.fetch_add(1, Ordering::Relaxed);
        let guard = StreamGuard(self.active.clone(), self.streams.clone());
        if prev >= self.max {
            return None; // the guard gives the slot back
        }
        Some((self.send.clone(), guard, self.dead.clone()))
    }
}

/// A stream slot: the connection's request handle, the slot's guard, and the connection's `dead`
/// flag (set by a tunnel that saw the connection fail, so that no other is handed it).
type Taken = (SendRequest<Bytes>, StreamGuard, Arc<AtomicBool>);

/// The pool of one l4mesh.
#[derive(Default)]
pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<Option<Conn>>>>>,
    /// The TLS client configuration per (source identity, expected identities), with the roots it
    /// was built for: a new pooled connection reuses it (and its parsed key) unless the roots
    /// changed. Bounded like `slots`, whose keys these are without the address.
    configs: Mutex<HashMap<(SpiffeId, Vec<SpiffeId>), ClientConfigFor>>,
    live: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
}

/// A client configuration and the mesh roots it trusts.
type ClientConfigFor = (Vec<CertificateDer<'static>>, Arc<rustls::ClientConfig>);

impl Pool {
    /// The client configuration of `key`, built only when none exists for its identities or the
    /// roots changed (CA rotation).
    pub(super) fn client_config(
        &self,
        ctx: &ProxyCtx,
        key: &PoolKey,
        roots: &[CertificateDer<'static>],
    ) -> Result<Arc<rustls::ClientConfig>, ProxyError> {
        let id = (key.src.clone(), key.expected.clone());
        let mut configs = self.configs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((r, cfg)) = configs.get(&id) {
            if r.as_slice() == roots {
                return Ok(cfg.clone());
            }
        }
        let cfg = tls::client_config(
            ManagedCert::new(ctx.secrets.clone(), key.src.clone()),
            roots.to_vec(),
            key.expected.clone(),
            ctx.hbone.revocation.clone(),
        )?;
        configs.insert(id, (roots.to_vec(), cfg.clone()));
        Ok(cfg)
    }

    pub fn stats(&self) -> PoolStats {
        PoolStats {
            keys: self
                .slots
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .len(),
            connections: self.live.load(Ordering::Relaxed),
            streams: self.streams.load(Ordering::Relaxed),
        }
    }

    fn slot(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<Option<Conn>>> {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        // The key holds identities: clone it only when the slot is new, not on every tunnel.
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        slots.entry(key.clone()).or_default().clone()
    }

    /// Forgets keys whose connection died (or never opened), so the map does not grow with every
    /// destination ever seen. Runs when a connection is opened (rare); a slot in use is kept.
    fn prune(&self) {
        let mut slots = self.slots.lock().unwrap_or_else(PoisonError::into_inner);
        slots.retain(|_, slot| match slot.try_lock() {
            Ok(conn) => conn
                .as_ref()
                .is_some_and(|c| !c.dead.load(Ordering::Acquire)),
            Err(_) => true,
        });
    }

    /// A stream slot on a live connection for `key`, opening one if needed.
    async fn acquire(&self, ctx: &ProxyCtx, key: &PoolKey) -> Result<Taken, ProxyError> {
        let slot = self.slot(key);
        let mut current = slot.lock().await;
        if let Some(taken) = current.as_ref().and_then(Conn::take) {
            return Ok(taken);
        }
        self.prune();
        let conn = connect(ctx, key).await?;
        let taken = conn.take().ok_or_else(|| {
            ProxyError::HboneHandshake(format!("new connection to {} died at once", key.addr))
        })?;
        *current = Some(conn);
        Ok(taken)
    }

    /// Opens a CONNECT tunnel to `dst` (the request's authority) with `req` over a pooled
    /// connection; the peer must answer 200.
    pub async fn tunnel(
        &self,
        ctx: &ProxyCtx,
        key: &PoolKey,
        dst: SocketAddr,
        req: http::Request<()>,
    ) -> Result<Tunnel, ProxyError> {
        let mut retried = false;
        loop {
            let (send, guard, dead) = self.acquire(ctx, key).await?;
            match request(send, req.clone()).await {
                Ok((status, recv, send)) if status == 200 => {
                    return Ok(Tunnel {
                        recv: H2Recv::new(recv),
                        send: H2Send::new(send),
                        status,
                        _guard: Some(guard),
                    })
                }
                Ok((status, ..)) => {
                    return Err(ProxyError::HboneStatus {
                        peer: key.addr,
                        dst,
                        status,
                    })
                }
                // A failure at the connection level (closed, GOAWAY, stream refused) on a
                // pooled connection: retry once on another. The failed one is handed to no one
                // again, so of the tunnels it failed at once (a draining peer's GOAWAY fails
                // every stream it had not started), the first opens a new connection and the
                // rest share it, instead of each opening its own in turn behind the slot's lock.
                Err(e) if !retried && retryable(&e) => {
                    tracing::debug!(addr = %key.addr, error = %e, "pooled HBONE connection failed; reconnecting");
                    dead.store(true, Ordering::Release);
                    retried = true;
                }
                Err(e) => {
                    return Err(ProxyError::HboneHandshake(format!(
                        "CONNECT to {dst} via {}: {e}",
                        key.addr
                    )))
                }
            }
        }
    }
}

/// Whether a failed request says nothing about the tunnel itself, only about the connection.
fn retryable(e: &h2::Error) -> bool {
    e.is_io() || e.is_go_away() || !e.is_remote() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

pub(super) async fn request(
    send: SendRequest<Bytes>,
    req: http::Request<()>,
) -> Result<(u16, h2::RecvStream, h2::SendStream<Bytes>), h2::Error> {
    let mut send = send.ready().await?;
    let (resp, stream) = send.send_request(req, false)?;
    let resp = resp.await?;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body(), stream))
}

/// Opens a TLS+HTTP/2 connection for `key` and spawns its driver.
async fn connect(ctx: &ProxyCtx, key: &PoolKey) -> Result<Conn, ProxyError> {
    match &key.via {
        None => {
            let tcp = crate::socket::connect(key.addr, &ctx.upstream)
                .await
                .map_err(|error| ProxyError::Connect {
                    addr: key.addr,
                    error,
                })?;
            establish(ctx, key, tcp).await
        }
        Some(via) => {
            // The outer tunnel, itself pooled; its CONNECT serves every stream of this inner
            // connection, so it names no client.
            let outer = PoolKey {
                src: key.src.clone(),
                expected: via.gateway.clone(),
                addr: key.addr,
                pod: key.pod.clone(),
                via: None,
            };
            let req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri(via.authority.as_str())
                .body(())
                .map_err(|e| ProxyError::HboneHandshake(format!("building the CONNECT: {e}")))?;
            let tunnel = Box::pin(ctx.hbone.pool.tunnel(ctx, &outer, key.addr, req)).await?;
            establish(ctx, key, tunnel.into_io()).await
        }
    }
}

/// TLS (verifying `key.expected`) and HTTP/2 over `io`, and the connection's driver spawned.
async fn establish<T>(ctx: &ProxyCtx, key: &PoolKey, io: T) -> Result<Conn, ProxyError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (tls, tracking) = client_tls(ctx, key, io).await?;
    let (send, conn) = h2io::client_builder(&ctx.h2)
        .handshake(tls)
        .await
        .map_err(|e| ProxyError::HboneHandshake(format!("HTTP/2 with {}: {e}", key.addr)))?;
    let (active, dead) = (
        Arc::new(AtomicUsize::new(0)),
        Arc::new(AtomicBool::new(false)),
    );
    let pool = &ctx.hbone.pool;
    pool.live.fetch_add(1, Ordering::Relaxed);
    let live = LiveGuard(pool.live.clone());
    let driver = keep(
        conn,
        active.clone(),
        dead.clone(),
        Liveness {
            idle: ctx.h2.unused_release_timeout,
            ping_interval: ctx.h2.ping_interval,
        },
        key.addr,
        tracking,
    );
    tokio::spawn(async move {
        let _live = live;
        driver.await
    });
    let max = usize::try_from(ctx.h2.max_streams_per_connection).unwrap_or(usize::MAX);
    Ok(Conn {
        send,
        active,
        dead,
        max,
        streams: pool.streams.clone(),
    })
}

/// The client side of an HBONE TLS session over `io`: `key.src`'s certificate, the server must
/// prove one of `key.expected`; with `CRL_PATH`, tracked so that a later list can close it.
pub(super) async fn client_tls<T>(
    ctx: &ProxyCtx,
    key: &PoolKey,
    io: T,
) -> Result<(tokio_rustls::client::TlsStream<T>, Option<Tracking>), ProxyError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let cert = ctx.secrets.fetch(&key.src).await?;
    let cfg = ctx.hbone.pool.client_config(ctx, key, &cert.roots)?;
    let since = ctx.hbone.revocation.as_ref().map(|r| r.generation());
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::IpAddress(key.addr.ip().into()), io)
        .await
        .map_err(|error| ProxyError::Tls {
            addr: key.addr,
            inbound: false,
            error,
        })?;
    let tracking = match (&ctx.hbone.revocation, since) {
        (Some(rev), Some(since)) => Some(rev.track(
            tls.get_ref().1,
            Arc::new(cert.roots.clone()),
            Checker::Client,
            since,
        )),
        _ => None,
    };
    ctx.hbone.count_outbound();
    Ok((tls, tracking))
}

/// When a pooled connection is given up (wire-facts §3: ztunnel's defaults; `idle` comes from
/// `POOL_UNUSED_RELEASE_TIMEOUT`).
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    /// A PING is sent this often; one still unanswered at the next tick means the peer is gone.
    pub ping_interval: Duration,
    /// A connection that carried no stream for this long is closed (checked at each tick).
    pub idle: Duration,
}

impl Default for Liveness {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(10),
            idle: Duration::from_secs(300),
        }
    }
}

/// Drives `conn` until it ends, misses a PING, stays idle too long, or a revocation list revokes
/// the server's certificate (then it is dropped at once: its streams are reset); then marks it
/// `dead` so the pool never hands it out again.
async fn keep<T>(
    mut conn: h2::client::Connection<T, Bytes>,
    active: Arc<AtomicUsize>,
    dead: Arc<AtomicBool>,
    live: Liveness,
    addr: SocketAddr,
    mut tracking: Option<Tracking>,
) where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut pings = conn.ping_pong();
    tokio::pin!(conn);
    let start = tokio::time::Instant::now() + live.ping_interval;
    let mut tick = tokio::time::interval_at(start, live.ping_interval);
    // After a stall, one tick (not a burst that would send a PING and call it missing at once).
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ping_sent = false;
    let mut idle_since: Option<Instant> = None;
    let why = loop {
        let pong = std::future::poll_fn(|cx| match pings.as_mut() {
            Some(p) if ping_sent => p.poll_pong(cx),
            _ => std::task::Poll::Pending,
        });
        // Biased: a pong that arrived is seen before the tick that would call it missing.
        let revoked = Tracking::revoked_if_any(tracking.as_mut());
        tokio::select! {
            biased;
            () = revoked => {
                tracing::warn!(%addr, "the HBONE server's certificate is now revoked (CRL_PATH): closing the connection and its tunnels");
                break "peer certificate revoked".to_string();
            }
            r = &mut conn => break match r {
                Ok(()) => "closed".to_string(),
                Err(e) => e.to_string(),
            },
            r = pong => match r {
                Ok(_) => ping_sent = false,
                Err(e) => break format!("keepalive: {e}"),
            },
            _ = tick.tick() => {
                if ping_sent {
                    break format!("keepalive PING unanswered for {:?}", live.ping_interval);
                }
                if let Some(p) = pings.as_mut() {
                    ping_sent = p.send_ping(h2::Ping::opaque()).is_ok();
                }
                if active.load(Ordering::Acquire) == 0 {
                    if idle_since.get_or_insert_with(Instant::now).elapsed() >= live.idle {
                        break format!("idle for {:?}", live.idle);
                    }
                } else {
                    idle_since = None;
                }
            }
        }
    };
    dead.store(true, Ordering::Release);
    tracing::debug!(%addr, reason = %why, "HBONE connection released");
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
