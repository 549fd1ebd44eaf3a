//! `SOCK_SEQPACKET` unix sockets carrying descriptors: the ZDS socket to istio-cni's node agent
//! (`INPOD_UDS`: one protobuf message per packet, a pod's network namespace passed as an
//! `SCM_RIGHTS` descriptor) and the upgrade hand-off socket (listening sockets passed from an old
//! l4mesh to a new one). Non-blocking, driven by tokio's `AsyncFd`; no `unsafe` (rustix's safe
//! `recvmsg`/`sendmsg`).
//!
//! A received packet comes out with its descriptors already owned (`OwnedFd`, close-on-exec), so
//! that they are closed on every path that drops them; more descriptors than [`MAX_FDS`] or a
//! packet larger than [`MAX_PACKET`] is reported as truncated by the kernel's flags, never read
//! past.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::OwnedFd;
use std::path::Path;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendFlags, SocketAddrUnix, SocketFlags, SocketType,
};
use tokio::io::unix::AsyncFd;

/// The largest packet read: a WorkloadRequest is a few hundred bytes, a hand-off message a few
/// KiB.
pub const MAX_PACKET: usize = 64 * 1024;
/// Descriptors one packet may carry before the kernel reports `MSG_CTRUNC` (a valid one carries
/// at most one; room for a few more lets l4mesh see and close what a broken agent sends).
pub const MAX_FDS: usize = 4;

/// One received packet.
#[derive(Debug)]
pub struct Packet {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// `MSG_TRUNC`: the packet was longer than [`MAX_PACKET`].
    pub truncated: bool,
    /// `MSG_CTRUNC`: it carried more descriptors than there was room for.
    pub ctrunc: bool,
}

/// A connected ZDS socket.
#[derive(Debug)]
pub struct Conn {
    fd: AsyncFd<OwnedFd>,
}

impl Conn {
    /// Connects to the agent's socket at `path`.
    pub async fn connect(path: &Path) -> io::Result<Conn> {
        let fd = seqpacket()?;
        let addr = SocketAddrUnix::new(path)?;
        match rustix::net::connect(&fd, &addr) {
            Ok(()) => {}
            Err(rustix::io::Errno::INPROGRESS) | Err(rustix::io::Errno::AGAIN) => {}
            Err(e) => return Err(e.into()),
        }
        let fd = crate::socket::async_fd(fd)?;
        // A unix connect completes at once or fails; wait for writability for the rare
        // in-progress case, then read the outcome.
        let _ = fd.writable().await?;
        if let Some(e) = rustix::net::sockopt::socket_error(fd.get_ref())?.err() {
            return Err(e.into());
        }
        Ok(Conn { fd })
    }

    /// Wraps one end of a connected `SOCK_SEQPACKET` pair (tests, and an agent's accepted
    /// socket in `node-agent`).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Conn> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Conn {
            fd: crate::socket::async_fd(fd)?,
        })
    }

    /// The user id of the process at the other end (`SO_PEERCRED`, as it was when it
    /// connected).
    pub fn peer_uid(&self) -> io::Result<u32> {
        Ok(rustix::net::sockopt::socket_peercred(self.fd.get_ref())?
            .uid
            .as_raw())
    }

    /// Sends one packet, with `fds` as `SCM_RIGHTS` when given.
    pub async fn send(&self, bytes: &[u8], fds: &[std::os::fd::BorrowedFd<'_>]) -> io::Result<()> {
        loop {
            let mut guard = self.fd.writable().await?;
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() && !control.push(rustix::net::SendAncillaryMessage::ScmRights(fds)) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} descriptors do not fit one packet (at most {MAX_FDS})",
                        fds.len()
                    ),
                ));
            }
            let res = rustix::net::sendmsg(
                self.fd.get_ref(),
                &[IoSlice::new(bytes)],
                &mut control,
                SendFlags::NOSIGNAL,
            );
            match res {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(io::Error::other(format!(
                        "sent {n} of {} bytes of a packet",
                        bytes.len()
                    )))
                }
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one packet; `Ok(None)` when the peer closed the connection.
    pub async fn recv(&self) -> io::Result<Option<Packet>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let mut buf = vec![0u8; MAX_PACKET];
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let res = rustix::net::recvmsg(
                self.fd.get_ref(),
                &mut [IoSliceMut::new(&mut buf)],
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            );
            match res {
                Ok(msg) => {
                    // Own every descriptor first, whatever the packet turns out to be.
                    let mut fds = Vec::new();
                    for m in control.drain() {
                        if let RecvAncillaryMessage::ScmRights(rights) = m {
                            fds.extend(rights);
                        }
                    }
                    if msg.bytes == 0
                        && fds.is_empty()
                        && !msg.flags.contains(ReturnFlags::TRUNC)
                        && peer_closed(self.fd.get_ref())?
                    {
                        return Ok(None);
                    }
                    buf.truncate(msg.bytes.min(MAX_PACKET));
                    return Ok(Some(Packet {
                        bytes: buf,
                        fds,
                        truncated: msg.flags.contains(ReturnFlags::TRUNC),
                        ctrunc: msg.flags.contains(ReturnFlags::CTRUNC),
                    }));
                }
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// A listening socket: the agent's end of ZDS (`l4mesh node-agent`), or the hand-off socket of
/// a running l4mesh.
#[derive(Debug)]
pub struct Server {
    fd: AsyncFd<OwnedFd>,
}

impl Server {
    /// Listens at `path`, replacing a socket file left by an agent that is gone (one that still
    /// answers is in use: that is an error, not a takeover).
    pub fn bind(path: &Path) -> io::Result<Server> {
        remove_stale(path)?;
        let fd = seqpacket()?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(path)?)?;
        rustix::net::listen(&fd, 16)?;
        Ok(Server {
            fd: crate::socket::async_fd(fd)?,
        })
    }

    /// [`Server::bind`] with the socket file at `mode` from the start (bound under a temporary
    /// name, given the mode, then renamed into place): no moment where the umask's mode lets
    /// another user connect.
    pub fn bind_with_mode(path: &Path, mode: u32) -> io::Result<Server> {
        use std::os::unix::fs::PermissionsExt;
        remove_stale(path)?;
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let fd = seqpacket()?;
        rustix::net::bind(&fd, &SocketAddrUnix::new(&tmp)?)?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .and_then(|()| rustix::net::listen(&fd, 16).map_err(io::Error::from))
            .and_then(|()| std::fs::rename(&tmp, path));
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(Server {
            fd: crate::socket::async_fd(fd)?,
        })
    }

    /// Wraps a listening socket received from another process (the hand-off socket itself is
    /// handed over).
    pub fn from_fd(fd: OwnedFd) -> io::Result<Server> {
        rustix::io::ioctl_fionbio(&fd, true)?;
        Ok(Server {
            fd: crate::socket::async_fd(fd)?,
        })
    }

    /// The listening socket, to duplicate for a successor.
    pub fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        use std::os::fd::AsFd;
        self.fd.get_ref().as_fd()
    }

    /// The next peer that connects.
    pub async fn accept(&self) -> io::Result<Conn> {
        loop {
            let mut guard = self.fd.readable().await?;
            match rustix::net::accept_with(
                self.fd.get_ref(),
                SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
            ) {
                Ok(fd) => return Conn::from_fd(fd),
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Removes a socket file at `path` that no process listens on; one that still answers is in
/// use: that is an error, not a takeover.
fn remove_stale(path: &Path) -> io::Result<()> {
    if path.exists() {
        // Blocking would not matter: a unix connect completes or fails at once.
        let probe = seqpacket()?;
        let live = matches!(
            rustix::net::connect(&probe, &SocketAddrUnix::new(path)?),
            Ok(()) | Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INPROGRESS)
        );
        if live {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by a running process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    Ok(())
}

/// Whether the peer has closed: a `recvmsg` of 0 bytes is either that or an empty packet (an
/// empty WorkloadRequest encodes to nothing), and only the hang-up flag tells them apart.
fn peer_closed(fd: &OwnedFd) -> io::Result<bool> {
    use rustix::event::{PollFd, PollFlags};
    let mut pfd = [PollFd::new(fd, PollFlags::RDHUP)];
    rustix::event::poll(
        &mut pfd,
        Some(&rustix::time::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        }),
    )?;
    Ok(pfd[0]
        .revents()
        .intersects(PollFlags::HUP | PollFlags::RDHUP))
}

fn seqpacket() -> io::Result<OwnedFd> {
    Ok(rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?)
}

/// A connected pair of ZDS sockets (tests, and a fake agent).
pub fn pair() -> io::Result<(Conn, Conn)> {
    let (a, b) = rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::NONBLOCK | SocketFlags::CLOEXEC,
        None,
    )?;
    Ok((Conn::from_fd(a)?, Conn::from_fd(b)?))
}
