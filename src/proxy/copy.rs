//! Copying bytes both ways between a downstream and an upstream without interpreting them.
//!
//! Each direction has its own buffer that starts small (an idle connection costs little) and grows
//! when reads fill it (a bulk transfer gets large reads and few syscalls). End of stream in one
//! direction is propagated as a half-close (`shutdown(SHUT_WR)`), and the other direction keeps
//! flowing until it ends too. An error in either direction ends both.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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
}

enum Side {
    Read(io::Error),
    Write(io::Error),
}

async fn one_way<R, W>(r: &mut R, w: &mut W, counter: &mut u64) -> Result<(), Side>
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
        if n == buf.len() && step + 1 < STEPS.len() {
            step += 1;
            buf = vec![0u8; STEPS[step]];
        }
    }
}

/// Copies until both directions reached end of stream, or one failed.
pub async fn bidirectional<DR, DW, UR, UW>(
    down_r: &mut DR,
    down_w: &mut DW,
    up_r: &mut UR,
    up_w: &mut UW,
) -> (Transferred, Result<(), CopyError>)
where
    DR: AsyncRead + Unpin + ?Sized,
    DW: AsyncWrite + Unpin + ?Sized,
    UR: AsyncRead + Unpin + ?Sized,
    UW: AsyncWrite + Unpin + ?Sized,
{
    let mut t = Transferred::default();
    let result = {
        let up = one_way(down_r, up_w, &mut t.sent);
        let down = one_way(up_r, down_w, &mut t.received);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            tokio::select! {
                r = &mut up, if !up_done => match r {
                    Ok(()) => up_done = true,
                    Err(Side::Read(e)) => break Err(CopyError::DownstreamRead(e)),
                    Err(Side::Write(e)) => break Err(CopyError::UpstreamWrite(e)),
                },
                r = &mut down, if !down_done => match r {
                    Ok(()) => down_done = true,
                    Err(Side::Read(e)) => break Err(CopyError::UpstreamRead(e)),
                    Err(Side::Write(e)) => break Err(CopyError::DownstreamWrite(e)),
                },
            }
            if up_done && down_done {
                break Ok(());
            }
        }
    };
    (t, result)
}

/// [`bidirectional`] for two TCP streams, without locks or extra tasks.
pub async fn tcp(
    down: &mut tokio::net::TcpStream,
    up: &mut tokio::net::TcpStream,
) -> (Transferred, Result<(), CopyError>) {
    let (mut dr, mut dw) = down.split();
    let (mut ur, mut uw) = up.split();
    bidirectional(&mut dr, &mut dw, &mut ur, &mut uw).await
}
