//! Copying bytes both ways between a downstream and an upstream without interpreting them.
//!
//! Between two TCP sockets the bytes are copied through a buffer made for each read, as ztunnel
//! does; with `L4MESH_SPLICE_AFTER`, a direction that has moved that many bytes switches to
//! `splice(2)` through a kernel pipe, and the bytes no longer enter user space (a third less CPU
//! per GB, but a lower single-stream throughput and a slower round trip on this machine:
//! docs/performance.md). Between a TCP socket and an HBONE tunnel stream
//! they are copied once: read from the socket into a fresh buffer that is handed to h2 as it is,
//! and written to the socket from the chunks h2 decoded. Read sizes grow with the volume a
//! direction has moved (a request/response connection reads little at a time, a bulk transfer
//! gets large reads and few syscalls), and nothing is held between reads: an idle connection
//! costs no buffer. End of stream in one direction is propagated as a half-close
//! (`shutdown(SHUT_WR)`, END_STREAM), and the other direction keeps flowing until it ends too. An
//! error in either direction ends both.
//!
//! Every chunk moved is also added to the connection's [`Meter`] (its live byte metrics): one
//! atomic add per chunk, so metrics follow long connections without a per-byte cost.

use std::future::Future;
use std::io;
use std::pin::{pin, Pin};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;

use super::h2io::{H2Recv, H2Send};
use crate::metrics::Meter;

/// How much a direction reads at once, growing with the bytes it has `moved` (as ztunnel's copy
/// does): 1 KiB, 16 KiB after 128 KB, 256 KiB after 10 MB.
fn read_size(moved: u64) -> usize {
    match moved {
        0..128_000 => 1024,
        128_000..10_000_000 => 16 * 1024,
        _ => 256 * 1024,
    }
}

/// The next read from `r` into a buffer of its own, sized by the bytes the direction has `moved`
/// (nothing is held while the socket is idle); `None` at the end of the stream.
///
/// The read goes through tokio's `AsyncRead` on the socket's read half, not `readable()` +
/// `try_read`: a read that did not fill the buffer has drained the socket, and tokio then waits
/// for the next readiness event instead of calling `recv` again only to see `EAGAIN` (one
/// syscall in two on a request/response connection, measured with `benches/protocols.rs`).
async fn read_chunk(r: &mut ReadHalf<'_>, moved: u64) -> io::Result<Option<BytesMut>> {
    // The buffer is made once the socket has something to read: an idle connection holds none.
    r.as_ref().readable().await?;
    let mut buf = BytesMut::with_capacity(read_size(moved));
    match r.read_buf(&mut buf).await? {
        0 => Ok(None),
        _ => Ok(Some(buf)),
    }
}

/// Bytes moved in each direction, reported even when the copy ended with an error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transferred {
    /// Downstream → upstream.
    pub sent: u64,
    /// Upstream → downstream.
    pub received: u64,
}

/// Which side of the copy failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("reading from the client failed: {0}")]
    DownstreamRead(#[source] io::Error),
    #[error("writing to the client failed: {0}")]
    DownstreamWrite(#[source] io::Error),
    #[error("reading from the upstream failed: {0}")]
    UpstreamRead(#[source] io::Error),
    #[error("writing to the upstream failed: {0}")]
    UpstreamWrite(#[source] io::Error),
    /// The caller's stop signal fired (a policy change now denies the connection).
    #[error("stopped before the end of the stream")]
    Stopped,
}

enum Side {
    Read(io::Error),
    Write(io::Error),
}

/// Which direction a copy loop moves: where its chunks are metered.
#[derive(Clone, Copy)]
enum Flow {
    /// Downstream → upstream.
    ClientToServer,
    /// Upstream → downstream.
    ServerToClient,
}

impl Flow {
    #[inline]
    fn meter(self, meter: &Meter, n: u64) {
        match self {
            Flow::ClientToServer => meter.client_bytes(n),
            Flow::ServerToClient => meter.server_bytes(n),
        }
    }
}

/// Which end of the connection the TCP socket of a tunnelled copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcpEnd {
    /// The client's connection (outbound: the tunnel goes upstream).
    Downstream,
    /// The connection to the workload (inbound: the tunnel came from downstream).
    Upstream,
}

/// Copies between a TCP socket and an HBONE tunnel stream until both directions ended or one
/// failed, or until `stop` resolves ([`CopyError::Stopped`]); the bytes moved until then are
/// reported either way.
pub async fn tcp_tunnel_until(
    tcp: &mut TcpStream,
    recv: &mut H2Recv,
    send: &mut H2Send,
    end: TcpEnd,
    meter: &Meter,
    stop: impl Future<Output = ()>,
) -> (Transferred, Result<(), CopyError>) {
    let mut t = Transferred::default();
    let (mut tr, mut tw) = tcp.split();
    let result = match end {
        TcpEnd::Downstream => {
            both_ways(
                pin!(tcp_to_tunnel(
                    &mut tr,
                    send,
                    &mut t.sent,
                    meter,
                    Flow::ClientToServer
                )),
                pin!(tunnel_to_tcp(
                    recv,
                    &mut tw,
                    &mut t.received,
                    meter,
                    Flow::ServerToClient
                )),
                pin!(stop),
            )
            .await
        }
        TcpEnd::Upstream => {
            both_ways(
                pin!(tunnel_to_tcp(
                    recv,
                    &mut tw,
                    &mut t.sent,
                    meter,
                    Flow::ClientToServer
                )),
                pin!(tcp_to_tunnel(
                    &mut tr,
                    send,
                    &mut t.received,
                    meter,
                    Flow::ServerToClient
                )),
                pin!(stop),
            )
            .await
        }
    };
    (t, result)
}

/// Socket → tunnel: each read fills a buffer of its own, which goes to h2 without a copy and is
/// freed once written; between reads nothing is held.
async fn tcp_to_tunnel(
    r: &mut ReadHalf<'_>,
    w: &mut H2Send,
    counter: &mut u64,
    meter: &Meter,
    flow: Flow,
) -> Result<(), Side> {
    while let Some(buf) = read_chunk(r, *counter).await.map_err(Side::Read)? {
        let n = buf.len() as u64;
        w.send_chunk(buf.freeze()).await.map_err(Side::Write)?;
        *counter += n;
        flow.meter(meter, n);
    }
    // Half-close: tell the other side no more data comes from here.
    w.finish().map_err(Side::Write)
}

/// Tunnel → socket: the chunks h2 decoded are written as they are; the peer's window reopens
/// only once a chunk is in the socket (a slow reader slows the sender).
async fn tunnel_to_tcp(
    r: &mut H2Recv,
    w: &mut WriteHalf<'_>,
    counter: &mut u64,
    meter: &Meter,
    flow: Flow,
) -> Result<(), Side> {
    while let Some(chunk) = r.chunk().await.map_err(Side::Read)? {
        w.write_all(&chunk).await.map_err(Side::Write)?;
        r.release(chunk.len()).map_err(Side::Read)?;
        *counter += chunk.len() as u64;
        flow.meter(meter, chunk.len() as u64);
    }
    crate::socket::shutdown_write(w.as_ref()).map_err(Side::Write)
}

/// Drives both directions until both ended cleanly or one failed (which ends both).
///
/// The futures come pinned where the caller made them: moved in here and pinned again, each
/// would take its room twice in the connection's task.
async fn both_ways<U, D, S>(
    mut to_up: Pin<&mut U>,
    mut to_down: Pin<&mut D>,
    mut stop: Pin<&mut S>,
) -> Result<(), CopyError>
where
    U: Future<Output = Result<(), Side>>,
    D: Future<Output = Result<(), Side>>,
    S: Future<Output = ()>,
{
    let (mut up_done, mut down_done) = (false, false);
    loop {
        tokio::select! {
            () = &mut stop => return Err(CopyError::Stopped),
            r = &mut to_up, if !up_done => match r {
                Ok(()) => up_done = true,
                Err(Side::Read(e)) => return Err(CopyError::DownstreamRead(e)),
                Err(Side::Write(e)) => return Err(CopyError::UpstreamWrite(e)),
            },
            r = &mut to_down, if !down_done => match r {
                Ok(()) => down_done = true,
                Err(Side::Read(e)) => return Err(CopyError::UpstreamRead(e)),
                Err(Side::Write(e)) => return Err(CopyError::DownstreamWrite(e)),
            },
        }
        if up_done && down_done {
            return Ok(());
        }
    }
}

/// Bytes moved per `splice` call and the pipe size asked of the kernel.
const SPLICE_CHUNK: usize = 1 << 20;

/// Copies between two TCP streams through a buffer; a direction that has moved `splice_after`
/// bytes (if given) goes on socket → pipe → socket with `splice(2)`; if a pipe cannot be had (out
/// of file descriptors), the buffered copy goes on.
/// Ends early with [`CopyError::Stopped`] when `stop` resolves.
pub async fn tcp_until(
    down: &mut TcpStream,
    up: &mut TcpStream,
    splice_after: Option<u64>,
    meter: &Meter,
    stop: impl Future<Output = ()>,
) -> (Transferred, Result<(), CopyError>) {
    let mut t = Transferred::default();
    let after = splice_after.unwrap_or(u64::MAX);
    let (mut down_r, mut down_w) = down.split();
    let (mut up_r, mut up_w) = up.split();
    let result = both_ways(
        pin!(splice_one_way(
            &mut down_r,
            &mut up_w,
            &mut t.sent,
            after,
            meter,
            Flow::ClientToServer
        )),
        pin!(splice_one_way(
            &mut up_r,
            &mut down_w,
            &mut t.received,
            after,
            meter,
            Flow::ServerToClient
        )),
        pin!(stop),
    )
    .await;
    (t, result)
}

async fn splice_one_way(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    counter: &mut u64,
    splice_after: u64,
    meter: &Meter,
    flow: Flow,
) -> Result<(), Side> {
    use tokio::io::Interest;
    // A short exchange never gets a pipe: one costs more to make and close than a
    // request/response connection moves.
    if buffered_one_way(r, w, counter, meter, flow, splice_after).await? == Copied::All {
        return Ok(());
    }
    let pipe = match crate::socket::Pipe::new(SPLICE_CHUNK) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "no pipe for splice; going on with the buffered copy");
            // Boxed: the rare fallback's state would otherwise enlarge every copy.
            Box::pin(buffered_one_way(r, w, counter, meter, flow, u64::MAX)).await?;
            return Ok(());
        }
    };
    let (r, w) = (r.as_ref(), w.as_ref());
    loop {
        let n = r
            .async_io(Interest::READABLE, || pipe.fill_from(r, SPLICE_CHUNK))
            .await
            .map_err(Side::Read)?;
        if n == 0 {
            crate::socket::shutdown_write(w).map_err(Side::Write)?;
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            let m = w
                .async_io(Interest::WRITABLE, || pipe.drain_to(w, left))
                .await
                .map_err(Side::Write)?;
            left -= m;
            *counter += m as u64;
            flow.meter(meter, m as u64);
        }
    }
}

/// How far a buffered copy went.
#[derive(Debug, PartialEq, Eq)]
enum Copied {
    /// To the end of the stream (propagated as a half-close).
    All,
    /// Up to the volume it was asked to stop at; the stream goes on.
    Enough,
}

/// Copies through a buffer made for each read (nothing held between reads) until the end of the
/// stream, or until the direction has moved `enough` bytes in all.
async fn buffered_one_way(
    r: &mut ReadHalf<'_>,
    w: &mut WriteHalf<'_>,
    counter: &mut u64,
    meter: &Meter,
    flow: Flow,
    enough: u64,
) -> Result<Copied, Side> {
    while *counter < enough {
        let Some(buf) = read_chunk(r, *counter).await.map_err(Side::Read)? else {
            crate::socket::shutdown_write(w.as_ref()).map_err(Side::Write)?;
            return Ok(Copied::All);
        };
        w.write_all(&buf).await.map_err(Side::Write)?;
        *counter += buf.len() as u64;
        flow.meter(meter, buf.len() as u64);
    }
    Ok(Copied::Enough)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
