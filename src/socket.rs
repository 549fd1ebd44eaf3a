//! The one place that talks to the kernel's socket options: original destination of a redirected
//! connection (`SO_ORIGINAL_DST`), the packet mark that keeps the proxy's own sockets out of the
//! redirection rules (`SO_MARK`), the client's source address on upstream sockets
//! (`IP_TRANSPARENT`, `IP_FREEBIND`), `TCP_NODELAY` and keepalive.
#![allow(unsafe_code)]

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, TcpKeepalive, Type};
use tokio::net::{TcpSocket, TcpStream};

/// `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` from `<linux/netfilter_ipv4.h>` and `_ipv6.h`.
const SO_ORIGINAL_DST: libc::c_int = 80;

/// The destination a client dialled before iptables/nftables `REDIRECT` sent it to the proxy.
/// Fails with `ENOENT` when the connection was not redirected.
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    // An IPv4 connection on a dual-stack (`[::]`) listener reports a v4-mapped local address;
    // conntrack knows it as IPv4, so the IPv4 option answers for it.
    match canonical(stream.local_addr()?) {
        SocketAddr::V4(_) => {
            let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            // SAFETY: `addr` is a valid, writable sockaddr_in and `len` holds its size.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IP,
                    SO_ORIGINAL_DST,
                    (&mut addr as *mut libc::sockaddr_in).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
            Ok(SocketAddr::V4(SocketAddrV4::new(
                ip,
                u16::from_be(addr.sin_port),
            )))
        }
        SocketAddr::V6(_) => {
            let mut addr: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            // SAFETY: `addr` is a valid, writable sockaddr_in6 and `len` holds its size.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_IPV6,
                    SO_ORIGINAL_DST,
                    (&mut addr as *mut libc::sockaddr_in6).cast(),
                    &mut len,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
            let v6 = SocketAddrV6::new(ip, u16::from_be(addr.sin6_port), 0, 0);
            Ok(match v6.ip().to_ipv4_mapped() {
                Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
                None => SocketAddr::V6(v6),
            })
        }
    }
}

/// `addr` with an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, what a dual-stack listener reports
/// for an IPv4 peer) as the IPv4 address it is: lookups, policy `source_ips` ranges and logs all
/// use the one form.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The destination to use for an accepted connection: the original one if it was redirected, else
/// the address the client dialled (the listener's own address when nothing redirected it).
pub fn destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    match original_dst(stream) {
        Ok(a) => Ok(a),
        Err(_) => stream.local_addr().map(canonical),
    }
}

/// Options for sockets the proxy opens towards upstreams.
#[derive(Clone, Debug)]
pub struct UpstreamOptions {
    /// `SO_MARK` so that redirection rules skip the proxy's own traffic; 0 = do not mark.
    pub mark: u32,
    pub connect_timeout: Duration,
    /// Whether the inbound paths connect to the local workload from the client's own IP
    /// (`ENABLE_ORIG_SRC`), so that the application sees who called it rather than l4mesh.
    pub orig_src: bool,
    /// Connections that were to use the client's address (`orig_src`) but were made from
    /// l4mesh's own after the kernel refused it (logged at debug each time). Shared by the clones
    /// of these options; read it through `ProxyCtx::upstream`.
    pub orig_src_fallbacks: Arc<AtomicU64>,
    /// TCP keepalive (and `TCP_USER_TIMEOUT`) of the sockets.
    pub keepalive: Keepalive,
    /// Shared mode: the pod whose network namespace the sockets are made in (on its namespace's
    /// thread); `None`: this thread's namespace.
    pub netns: Option<Arc<crate::inpod::netns::PodNetns>>,
}

/// TCP keepalive of the proxy's sockets (ztunnel's `KEEPALIVE_*` settings and defaults): probes
/// after `time` idle, every `interval`, `retries` times, so that a peer that vanished without a
/// FIN or RST is noticed and its connection's descriptors freed. With `user_timeout`, also
/// `TCP_USER_TIMEOUT = time + retries × interval`, which bounds how long sent data may stay
/// unacknowledged (keepalive alone only probes idle connections); off by default, as in ztunnel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Keepalive {
    pub enabled: bool,
    #[serde(serialize_with = "serialize_secs")]
    pub time: Duration,
    #[serde(serialize_with = "serialize_secs")]
    pub interval: Duration,
    pub retries: u32,
    pub user_timeout: bool,
}

impl Default for Keepalive {
    fn default() -> Self {
        Self {
            enabled: true,
            time: Duration::from_secs(180),
            interval: Duration::from_secs(180),
            retries: 9,
            user_timeout: false,
        }
    }
}

impl Keepalive {
    /// `TCP_USER_TIMEOUT` when on: the time keepalive needs to give up on a dead peer.
    pub fn user_timeout(&self) -> Option<Duration> {
        (self.enabled && self.user_timeout).then(|| {
            self.time
                .saturating_add(self.interval.saturating_mul(self.retries))
        })
    }

    fn apply(&self, socket: &socket2::SockRef<'_>) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let ka = TcpKeepalive::new()
            .with_time(self.time)
            .with_interval(self.interval)
            .with_retries(self.retries);
        socket.set_tcp_keepalive(&ka)?;
        if let Some(t) = self.user_timeout() {
            socket.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }
}

fn serialize_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{}s", d.as_secs_f64()))
}

/// Why `ENABLE_ORIG_SRC` cannot be honoured.
#[derive(Debug, thiserror::Error)]
#[error("ENABLE_ORIG_SRC=true needs the capability CAP_NET_ADMIN (or CAP_NET_RAW) to set IP_TRANSPARENT, and this process does not have it ({error}); grant the capability (securityContext.capabilities.add: [NET_ADMIN]) or unset ENABLE_ORIG_SRC / set it to false")]
pub struct OrigSrcError {
    error: io::Error,
}

/// Decides whether upstream connections use the client's address, as ztunnel's
/// `maybe_set_transparent`: explicitly on (`Some(true)`) without the capability is an error naming
/// it; unset is on exactly when the capability is there; off is off. The mode and the reason are
/// logged once, at startup.
pub fn orig_src_mode(configured: Option<bool>) -> Result<bool, OrigSrcError> {
    let probe = transparent_probe();
    match (configured, probe) {
        (Some(true), Err(source)) => Err(OrigSrcError { error: source }),
        (Some(true), Ok(())) => {
            tracing::info!("ENABLE_ORIG_SRC=true: workloads see their callers' addresses");
            Ok(true)
        }
        (Some(false), _) => {
            tracing::info!("ENABLE_ORIG_SRC=false: workloads see l4mesh's address as the caller");
            Ok(false)
        }
        (None, Ok(())) => {
            tracing::info!("ENABLE_ORIG_SRC unset and IP_TRANSPARENT allowed (CAP_NET_ADMIN or CAP_NET_RAW): workloads see their callers' addresses");
            Ok(true)
        }
        (None, Err(e)) => {
            tracing::info!(error = %e, "ENABLE_ORIG_SRC unset and IP_TRANSPARENT not allowed (no CAP_NET_ADMIN / CAP_NET_RAW): workloads see l4mesh's address as the caller");
            Ok(false)
        }
    }
}

static MARK_WARNED: AtomicBool = AtomicBool::new(false);

/// Opens a TCP connection with the mark, `TCP_NODELAY` and keepalive set, bounded by the timeout.
pub async fn connect(dst: SocketAddr, opts: &UpstreamOptions) -> io::Result<TcpStream> {
    connect_from(dst, None, opts).await
}

/// [`connect`], from the client's address `src` when `opts.orig_src` is on: the socket is bound to
/// `src` (port chosen by the kernel) with `IP_TRANSPARENT` + `IP_FREEBIND`, which lets it use an
/// address that is not the pod's own. Replies reach it only with the policy routing that
/// `l4mesh redirect install` sets up. When the kernel refuses (neither CAP_NET_ADMIN nor
/// CAP_NET_RAW, another address family…) the connection is made from l4mesh's own address
/// instead, counted in `opts.orig_src_fallbacks`: a lost source address is better than a failed
/// connection. IPv4-mapped IPv6 addresses are bound as the IPv4 addresses they are.
pub async fn connect_from(
    dst: SocketAddr,
    src: Option<IpAddr>,
    opts: &UpstreamOptions,
) -> io::Result<TcpStream> {
    let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let socket = match &opts.netns {
        // A socket belongs to the namespace it was made in: the pod's thread makes it, the
        // runtime connects it.
        Some(netns) => {
            let (mark, orig_src, keepalive, fallbacks) = (
                opts.mark,
                opts.orig_src,
                opts.keepalive,
                opts.orig_src_fallbacks.clone(),
            );
            netns
                .run(move || upstream_socket(dst, src, mark, orig_src, &keepalive, &fallbacks))
                .await
                .map_err(io::Error::other)?
        }
        None => upstream_socket(
            dst,
            src,
            opts.mark,
            opts.orig_src,
            &opts.keepalive,
            &opts.orig_src_fallbacks,
        )?,
    };
    let socket = TcpSocket::from_std_stream(socket.into());
    match tokio::time::timeout(opts.connect_timeout, socket.connect(dst)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "connect to {dst} timed out after {:?}",
                opts.connect_timeout
            ),
        )),
    }
}

/// A non-blocking upstream socket for `dst`, not yet connected, made in this thread's network
/// namespace: marked, `TCP_NODELAY`, keepalive, and bound to the client's address `src` when
/// `orig_src` asks for it (falling back to l4mesh's own, counted in `fallbacks`).
fn upstream_socket(
    dst: SocketAddr,
    src: Option<IpAddr>,
    mark: u32,
    orig_src: bool,
    keepalive: &Keepalive,
    fallbacks: &AtomicU64,
) -> io::Result<Socket> {
    let mut socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if let Some(src) = src.filter(|_| orig_src).map(|ip| ip.to_canonical()) {
        if let Err(e) = bind_transparent(&socket, src, dst) {
            // The capability was checked at startup (`orig_src_mode`): what is left are
            // per-connection cases (another address family, an address in use), counted.
            fallbacks.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(%src, %dst, error = %e,
                "cannot connect from the client's address; this connection uses l4mesh's own address");
            // The failed socket may be half-configured (transparent but not bound): start over.
            socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
        }
    }
    if mark != 0 {
        if let Err(e) = socket.set_mark(mark) {
            // Without CAP_NET_ADMIN the mark cannot be set; fine outside a capture setup.
            if !MARK_WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(mark, error = %e,
                    "cannot set SO_MARK on upstream sockets (needs CAP_NET_ADMIN); traffic capture rules cannot tell proxy traffic apart");
            }
        }
    }
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    keepalive.apply(&socket2::SockRef::from(&socket))?;
    Ok(socket)
}

/// Whether this process may set `IP_TRANSPARENT` (CAP_NET_ADMIN or CAP_NET_RAW): the default of
/// `ENABLE_ORIG_SRC`, as in ztunnel.
pub fn transparent_allowed() -> bool {
    transparent_probe().is_ok()
}

fn transparent_probe() -> io::Result<()> {
    Socket::new(Domain::IPV4, Type::STREAM, None).and_then(|s| s.set_ip_transparent_v4(true))
}

/// Whether `ip` is one of this network namespace's own addresses: a plain socket (no
/// `IP_FREEBIND`/`IP_TRANSPARENT`) can bind it. A dedicated-mode l4mesh runs in its pod's
/// namespace, so these are exactly the addresses of the pod it serves. (With the sysctl
/// `net.ipv[46].ip_nonlocal_bind=1` every address binds; l4mesh pods do not set it.)
pub fn is_local_address(ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    Socket::new(
        Domain::for_address(SocketAddr::new(ip, 0)),
        Type::STREAM,
        None,
    )
    .and_then(|s| s.bind(&SocketAddr::new(ip, 0).into()))
    .is_ok()
}

/// Binds `socket` to `(src, any port)` with `IP_TRANSPARENT` and `IP_FREEBIND`.
fn bind_transparent(socket: &Socket, src: IpAddr, dst: SocketAddr) -> io::Result<()> {
    match (src, dst) {
        (IpAddr::V4(_), SocketAddr::V4(_)) => {
            socket.set_ip_transparent_v4(true)?;
            socket.set_freebind_v4(true)?;
        }
        (IpAddr::V6(_), SocketAddr::V6(_)) => {
            socket.set_ip_transparent_v6(true)?;
            socket.set_freebind_v6(true)?;
        }
        _ => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("client address {src} and destination {dst} are of different families"),
            ))
        }
    }
    socket.bind(&SocketAddr::new(src, 0).into())
}

/// Registers an owned descriptor (the ZDS socket) with tokio's reactor, for reading and writing.
/// Safe to offer: an `OwnedFd` is open and its raw value cannot change while the `AsyncFd` owns
/// it, which is all the registration requires.
pub fn async_fd(
    fd: std::os::fd::OwnedFd,
) -> io::Result<tokio::io::unix::AsyncFd<std::os::fd::OwnedFd>> {
    use tokio::io::{unix::AsyncFd, Interest};
    // SAFETY: `fd` is an open descriptor owned by the AsyncFd from here on, so it stays open and
    // refers to the same file description until the AsyncFd drops it.
    Ok(unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE | Interest::WRITABLE) }?)
}

/// Applied to accepted downstream connections.
pub fn tune_accepted(stream: &TcpStream, keepalive: &Keepalive) -> io::Result<()> {
    stream.set_nodelay(true)?;
    keepalive.apply(&socket2::SockRef::from(stream))
}

/// A kernel pipe used to move bytes between two sockets with `splice(2)`, so that a plaintext
/// TCP↔TCP copy never passes through user space.
pub struct Pipe {
    r: std::os::fd::OwnedFd,
    w: std::os::fd::OwnedFd,
}

impl Pipe {
    /// A non-blocking pipe; `size` asks the kernel for a larger buffer (best effort).
    pub fn new(size: usize) -> io::Result<Pipe> {
        use std::os::fd::FromRawFd;
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (r, w) = unsafe {
            (
                std::os::fd::OwnedFd::from_raw_fd(fds[0]),
                std::os::fd::OwnedFd::from_raw_fd(fds[1]),
            )
        };
        let size = libc::c_int::try_from(size).unwrap_or(libc::c_int::MAX);
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own; failure only leaves the default size.
        unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, size) };
        Ok(Pipe { r, w })
    }

    /// Moves up to `len` bytes from the socket `from` into the pipe. `Ok(0)` is end of stream.
    pub fn fill_from(&self, from: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(from.as_raw_fd(), self.w.as_raw_fd(), len)
    }

    /// Moves up to `len` bytes from the pipe into the socket `to`.
    pub fn drain_to(&self, to: &impl AsRawFd, len: usize) -> io::Result<usize> {
        splice(self.r.as_raw_fd(), to.as_raw_fd(), len)
    }
}

fn splice(from: libc::c_int, to: libc::c_int, len: usize) -> io::Result<usize> {
    // SAFETY: both fds are open for the duration of the call; null offsets are valid for
    // sockets and pipes.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Half-closes the write side of a socket (propagates a FIN).
pub fn shutdown_write(stream: &TcpStream) -> io::Result<()> {
    match socket2::SockRef::from(stream).shutdown(std::net::Shutdown::Write) {
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(orig_src: bool) -> UpstreamOptions {
        UpstreamOptions {
            mark: 0,
            connect_timeout: Duration::from_secs(2),
            orig_src,
            orig_src_fallbacks: Default::default(),
            keepalive: Keepalive::default(),
            netns: None,
        }
    }

    /// The peer address a listener on 127.0.0.1 sees for `connect_from(.., src, ..)`.
    async fn seen_from(src: Option<IpAddr>, orig_src: bool) -> IpAddr {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let o = opts(orig_src);
        let (up, acc) = tokio::join!(connect_from(dst, src, &o), l.accept());
        up.expect("the connection is made whatever happens to the source address");
        acc.unwrap().1.ip()
    }

    #[tokio::test]
    async fn keepalive_and_user_timeout_are_set_on_both_ends() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut o = opts(false);
        o.keepalive = Keepalive {
            enabled: true,
            time: Duration::from_secs(30),
            interval: Duration::from_secs(5),
            retries: 4,
            user_timeout: true,
        };
        let (up, acc) = tokio::join!(connect(l.local_addr().unwrap(), &o), l.accept());
        let (up, (down, _)) = (up.unwrap(), acc.unwrap());
        tune_accepted(&down, &o.keepalive).unwrap();
        for s in [&up, &down] {
            let s = socket2::SockRef::from(s);
            assert!(s.keepalive().unwrap());
            assert_eq!(s.tcp_keepalive_time().unwrap(), Duration::from_secs(30));
            assert_eq!(s.tcp_keepalive_interval().unwrap(), Duration::from_secs(5));
            assert_eq!(s.tcp_keepalive_retries().unwrap(), 4);
            // 30 s + 4 × 5 s.
            assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(50)));
        }
        // ztunnel's defaults: keepalive on, no user timeout.
        let d = Keepalive::default();
        assert_eq!(d.user_timeout(), None);
        let plain = opts(false);
        let (up, _acc) = tokio::join!(connect(l.local_addr().unwrap(), &plain), l.accept());
        let up = up.unwrap();
        let up = socket2::SockRef::from(&up);
        assert_eq!(up.tcp_keepalive_time().unwrap(), Duration::from_secs(180));
        assert_eq!(up.tcp_user_timeout().unwrap(), None);
    }

    #[tokio::test]
    async fn client_address_when_allowed_else_own_address() {
        let client: IpAddr = "127.0.0.2".parse().unwrap();
        let expected = if transparent_allowed() {
            client
        } else {
            "127.0.0.1".parse().unwrap()
        };
        assert_eq!(seen_from(Some(client), true).await, expected);
        // Off: never the client's address.
        assert_eq!(
            seen_from(Some(client), false).await,
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[tokio::test]
    async fn an_ipv4_mapped_client_address_is_bound_as_ipv4() {
        let mapped: IpAddr = "::ffff:127.0.0.3".parse().unwrap();
        let expected = if transparent_allowed() {
            "127.0.0.3".parse().unwrap()
        } else {
            "127.0.0.1".parse::<IpAddr>().unwrap()
        };
        assert_eq!(seen_from(Some(mapped), true).await, expected);
    }

    #[test]
    fn orig_src_mode_follows_the_capability() {
        let allowed = transparent_allowed();
        assert!(!orig_src_mode(Some(false)).unwrap());
        assert_eq!(orig_src_mode(None).unwrap(), allowed);
        match orig_src_mode(Some(true)) {
            Ok(on) => assert!(on && allowed),
            Err(e) => {
                assert!(!allowed);
                assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}");
            }
        }
    }

    #[test]
    fn local_addresses_are_the_ones_that_bind() {
        assert!(is_local_address("127.0.0.1".parse().unwrap()));
        assert!(is_local_address("::ffff:127.0.0.1".parse().unwrap()));
        // TEST-NET-3: never assigned here.
        assert!(!is_local_address("203.0.113.7".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_refused_bind_falls_back_to_a_normal_connect() {
        // An IPv6 client address cannot be the source of an IPv4 connection: the bind is refused
        // and the connection is made from l4mesh's own address instead of failing.
        let v6: IpAddr = "::1".parse().unwrap();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = l.local_addr().unwrap();
        let o = opts(true);
        let (up, acc) = tokio::join!(connect_from(dst, Some(v6), &o), l.accept());
        up.expect("the connection is made from l4mesh's own address");
        assert_eq!(acc.unwrap().1.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(o.orig_src_fallbacks.load(Ordering::Relaxed), 1);
    }
}
