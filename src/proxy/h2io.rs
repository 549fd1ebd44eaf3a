//! An HTTP/2 stream as a byte stream: [`H2Recv`] hands out the received chunks ([`H2Recv::chunk`],
//! the bytes h2 decoded, not copied) and [`H2Send`] sends chunks the caller owns
//! ([`H2Send::send_chunk`], handed to h2 as they are), so `copy::tcp_tunnel_until` moves bytes
//! between TCP and a tunnel without copying them in user space. Both are also `AsyncRead` /
//! `AsyncWrite`, for callers that want a byte stream.
//!
//! Flow control follows the bytes: receive capacity is released as the reader consumes data (a
//! slow reader stops the peer instead of buffering without bound), and a write reserves send
//! capacity and waits for the peer's window before handing a chunk to h2. `poll_shutdown` sends
//! END_STREAM (the TCP half-close); the end of the `RecvStream` reads as EOF.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest chunk one write asks send capacity for. Independent of the negotiated frame size: h2
/// splits a chunk into frames itself; this only bounds how much one write holds at once.
const MAX_CHUNK: usize = 1024 * 1024;

/// HTTP/2 and pool tuning (ztunnel's `POOL_*` and `HTTP2_*` settings; defaults from wire-facts §3).
/// Validated by the config layer before it gets here.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Tuning {
    /// Tunnels one pooled outbound connection carries at once (`POOL_MAX_STREAMS_PER_CONNECTION`).
    pub max_streams_per_connection: u32,
    /// A pooled connection that carried no stream this long is closed (`POOL_UNUSED_RELEASE_TIMEOUT`).
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub unused_release_timeout: std::time::Duration,
    /// Per-stream flow-control window, both ends (`HTTP2_STREAM_WINDOW_SIZE`).
    pub stream_window: u32,
    /// Per-connection flow-control window, both ends (`HTTP2_CONNECTION_WINDOW_SIZE`).
    pub connection_window: u32,
    /// Largest frame this end accepts (`HTTP2_FRAME_SIZE`).
    pub frame_size: u32,
    /// Both ends PING their peer this often; a PING still unanswered at the next one means the
    /// peer is gone and the connection is dropped (ztunnel: 10 s).
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub ping_interval: std::time::Duration,
    /// An inbound HBONE connection that carried no stream for this long gets a GOAWAY
    /// (`L4MESH_HBONE_IDLE_TIMEOUT`). Longer than the clients' pool release, so that a client
    /// normally closes first.
    #[serde(serialize_with = "crate::model::serialize_duration")]
    pub server_idle_timeout: std::time::Duration,
    /// `L4MESH_POOL_INNER_TUNNELS`: double HBONE's inner connections are pooled (off: one per
    /// connection, as ztunnel).
    pub pool_inner_tunnels: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_streams_per_connection: 100,
            unused_release_timeout: std::time::Duration::from_secs(300),
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            frame_size: 1024 * 1024,
            ping_interval: std::time::Duration::from_secs(10),
            server_idle_timeout: std::time::Duration::from_secs(15 * 60),
            pool_inner_tunnels: false,
        }
    }
}

fn to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        if let Some(io) = e.into_io() {
            return io;
        }
        return io::Error::other("HTTP/2 connection I/O failed");
    }
    let kind = if e.is_reset() || e.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}

/// The receiving half of a tunnel stream.
pub struct H2Recv {
    recv: RecvStream,
    /// Received but not yet read; its length is still held against the peer's window.
    pending: Bytes,
    eof: bool,
}

impl H2Recv {
    pub fn new(recv: RecvStream) -> Self {
        Self {
            recv,
            pending: Bytes::new(),
            eof: false,
        }
    }

    /// The next received chunk, `None` at the end of the stream. The chunk still counts against
    /// the peer's window until [`H2Recv::release`] says it left this process.
    pub async fn chunk(&mut self) -> io::Result<Option<Bytes>> {
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    /// `n` bytes of received chunks were delivered: the peer may send that much more.
    pub fn release(&mut self, n: usize) -> io::Result<()> {
        self.recv.flow_control().release_capacity(n).map_err(to_io)
    }

    /// What is left of the last chunk a reader took part of, else the next chunk from h2.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<Option<Bytes>>> {
        if !self.pending.is_empty() {
            return Poll::Ready(Ok(Some(std::mem::take(&mut self.pending))));
        }
        if self.eof {
            return Poll::Ready(Ok(None));
        }
        match ready!(self.recv.poll_data(cx)) {
            Some(Ok(data)) => return Poll::Ready(Ok(Some(data))),
            // A reset with NO_ERROR after the peer is done is a clean end.
            Some(Err(e)) if e.reason() != Some(Reason::NO_ERROR) => {
                return Poll::Ready(Err(to_io(e)))
            }
            None | Some(Err(_)) => {}
        }
        self.eof = true;
        Poll::Ready(Ok(None))
    }
}

impl AsyncRead for H2Recv {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // An empty chunk (h2 may hand one over) reads as nothing: ask again.
        let mut chunk = loop {
            match ready!(this.poll_chunk(cx))? {
                None => return Poll::Ready(Ok(())),
                Some(c) if c.is_empty() => continue,
                Some(c) => break c,
            }
        };
        let n = chunk.len().min(buf.remaining());
        buf.put_slice(&chunk[..n]);
        chunk.advance(n);
        this.pending = chunk;
        // The bytes left h2's hands: let the peer send that much more.
        this.release(n)?;
        Poll::Ready(Ok(()))
    }
}

/// The sending half of a tunnel stream.
pub struct H2Send {
    send: SendStream<Bytes>,
    shut: bool,
}

impl H2Send {
    pub fn new(send: SendStream<Bytes>) -> Self {
        Self { send, shut: false }
    }

    /// Resets the stream (the peer sees the tunnel fail, not a clean end).
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }

    /// Send capacity for up to `want` bytes: what h2 assigned already, else waits for the peer's
    /// window (noticing a reset by the peer meanwhile).
    fn poll_room(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.shut {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of the tunnel stream",
            )));
        }
        let want = want.min(MAX_CHUNK);
        self.send.reserve_capacity(want);
        // `poll_capacity` only reports increases: use what is assigned already first.
        let mut have = self.send.capacity();
        while have == 0 {
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(n))) => have = n,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(to_io(e))),
                Poll::Ready(None) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "the tunnel stream is closed for sending",
                    )))
                }
                Poll::Pending => {
                    if let Poll::Ready(r) = self.send.poll_reset(cx) {
                        let e = match r {
                            Ok(reason) => io::Error::new(
                                io::ErrorKind::ConnectionReset,
                                format!("the peer reset the tunnel stream ({reason})"),
                            ),
                            Err(e) => to_io(e),
                        };
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Pending;
                }
            }
        }
        Poll::Ready(Ok(have.min(want)))
    }

    /// Sends `data` as it is (no copy: h2 holds it until written), as the peer's window allows.
    pub async fn send_chunk(&mut self, mut data: Bytes) -> io::Result<()> {
        while !data.is_empty() {
            let n = std::future::poll_fn(|cx| self.poll_room(cx, data.len())).await?;
            self.send
                .send_data(data.split_to(n), false)
                .map_err(to_io)?;
        }
        Ok(())
    }

    /// Ends the sending half (END_STREAM: the TCP half-close).
    pub fn finish(&mut self) -> io::Result<()> {
        if !self.shut {
            self.shut = true;
            self.send.reserve_capacity(0);
            self.send.send_data(Bytes::new(), true).map_err(to_io)?;
        }
        Ok(())
    }
}

impl AsyncWrite for H2Send {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        let n = ready!(this.poll_room(cx, buf.len()))?;
        this.send
            .send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes frames as soon as they are queued.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.finish())
    }
}

/// The HTTP/2 server settings of an HBONE listener (wire-facts §3).
pub fn server_builder(t: &Tuning) -> h2::server::Builder {
    use super::hbone::settings as s;
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(s::MAX_CONCURRENT_STREAMS)
        .max_header_list_size(s::MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(s::MAX_SEND_BUFFER)
        .initial_window_size(t.stream_window)
        .initial_connection_window_size(t.connection_window)
        .max_frame_size(t.frame_size);
    b
}

/// The HTTP/2 client settings of an HBONE connection (wire-facts §3).
pub fn client_builder(t: &Tuning) -> h2::client::Builder {
    use super::hbone::settings as s;
    let mut b = h2::client::Builder::new();
    b.max_header_list_size(s::MAX_HEADER_LIST_SIZE)
        .max_send_buffer_size(s::MAX_SEND_BUFFER)
        .initial_window_size(t.stream_window)
        .initial_connection_window_size(t.connection_window)
        .max_frame_size(t.frame_size)
        .enable_push(false);
    b
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
