//! Copying bytes both ways between a downstream and an upstream without interpreting them.
//!
//! Each direction has its own buffer that starts small (an idle connection costs little) and grows
//! when reads fill it (a bulk transfer gets large reads and few syscalls). End of stream in one
//! direction is propagated as a half-close (`shutdown(SHUT_WR)`), and the other direction keeps
//! flowing until it ends too. An error in either direction ends both. Between two TCP sockets the
//! bytes move with `splice(2)` through a kernel pipe (made lazily, at the first byte) instead.
//!
//! Every chunk moved is also added to the connection's [`Meter`] (its live byte metrics): one
//! atomic add per chunk, so metrics follow long connections without a per-byte cost.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::metrics::Meter;

/// Buffer sizes a direction steps through as traffic shows it needs more.
const STEPS: [usize; 3] = [1024, 16 * 1024, 256 * 1024];

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

async fn one_way<R, W>(
    r: &mut R,
    w: &mut W,
    counter: &mut u64,
    meter: &Meter,
    flow: Flow,
) -> Result<(), Side>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut step = 0;
    let mut buf = vec![0u8; STEPS[0]];
    loop {
        let n = r.read(&mut buf).await.map_err(Side::Read)?;
        if n == 0 {
            // Half-close: tell the other side no more data comes from here.
            w.shutdown().await.map_err(Side::Write)?;
            return Ok(());
        }
        w.write_all(&buf[..n]).await.map_err(Side::Write)?;
        *counter += n as u64;
        flow.meter(meter, n as u64);
        if n == buf.len() && step + 1 < STEPS.len() {
            step += 1;
            buf = vec![0u8; STEPS[step]];
        }
    }
}

/// Copies until both directions reached end of stream or one failed, or until `stop` resolves
/// ([`CopyError::Stopped`]); the bytes moved until then are reported either way.
pub async fn bidirectional_until<DR, DW, UR, UW>(
    down_r: &mut DR,
    down_w: &mut DW,
    up_r: &mut UR,
    up_w: &mut UW,
    meter: &Meter,
    stop: impl std::future::Future<Output = ()>,
) -> (Transferred, Result<(), CopyError>)
where
    DR: AsyncRead + Unpin + ?Sized,
    DW: AsyncWrite + Unpin + ?Sized,
    UR: AsyncRead + Unpin + ?Sized,
    UW: AsyncWrite + Unpin + ?Sized,
{
    let mut t = Transferred::default();
    let result = both_ways(
        one_way(down_r, up_w, &mut t.sent, meter, Flow::ClientToServer),
        one_way(up_r, down_w, &mut t.received, meter, Flow::ServerToClient),
        stop,
    )
    .await;
    (t, result)
}

/// Drives both directions until both ended cleanly or one failed (which ends both).
async fn both_ways(
    to_up: impl std::future::Future<Output = Result<(), Side>>,
    to_down: impl std::future::Future<Output = Result<(), Side>>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<(), CopyError> {
    tokio::pin!(to_up, to_down, stop);
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

/// Copies between two TCP streams. On Linux the bytes move socket → pipe → socket with
/// `splice(2)` and never enter user space; if a pipe cannot be had (out of file descriptors), the
/// buffered copy takes over.
/// Ends early with [`CopyError::Stopped`] when `stop` resolves.
pub async fn tcp_until(
    down: &mut tokio::net::TcpStream,
    up: &mut tokio::net::TcpStream,
    meter: &Meter,
    stop: impl std::future::Future<Output = ()>,
) -> (Transferred, Result<(), CopyError>) {
    let mut t = Transferred::default();
    let (down, up) = (&*down, &*up);
    let result = both_ways(
        splice_one_way(down, up, &mut t.sent, meter, Flow::ClientToServer),
        splice_one_way(up, down, &mut t.received, meter, Flow::ServerToClient),
        stop,
    )
    .await;
    (t, result)
}

async fn splice_one_way(
    r: &tokio::net::TcpStream,
    w: &tokio::net::TcpStream,
    counter: &mut u64,
    meter: &Meter,
    flow: Flow,
) -> Result<(), Side> {
    use tokio::io::Interest;
    // An idle connection holds no pipe: it is made when the first bytes arrive.
    r.readable().await.map_err(Side::Read)?;
    let pipe = match crate::socket::Pipe::new(SPLICE_CHUNK) {
        Ok(p) => p,
        Err(e) => {
            tracing::debug!(error = %e, "no pipe for splice; using the buffered copy");
            return buffered_one_way(r, w, counter, meter, flow).await;
        }
    };
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

/// The user-space fallback of [`splice_one_way`], on shared references to the streams.
async fn buffered_one_way(
    r: &tokio::net::TcpStream,
    w: &tokio::net::TcpStream,
    counter: &mut u64,
    meter: &Meter,
    flow: Flow,
) -> Result<(), Side> {
    let mut step = 0;
    let mut buf = vec![0u8; STEPS[0]];
    loop {
        r.readable().await.map_err(Side::Read)?;
        let n = match r.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Side::Read(e)),
        };
        if n == 0 {
            crate::socket::shutdown_write(w).map_err(Side::Write)?;
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            w.writable().await.map_err(Side::Write)?;
            match w.try_write(&buf[off..n]) {
                Ok(m) => off += m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(Side::Write(e)),
            }
        }
        *counter += n as u64;
        flow.meter(meter, n as u64);
        if n == buf.len() && step + 1 < STEPS.len() {
            step += 1;
            buf = vec![0u8; STEPS[step]];
        }
    }
}
