//! The one place that enters a pod's network namespace. A socket belongs to the namespace of the
//! thread that created it, and keeps it wherever it is used after: so each pod gets a thread of
//! its own that enters the pod's namespace once (`setns(CLONE_NEWNET)`) and then creates sockets
//! on request; the runtime's threads never change namespace.
//!
//! The thread lives as long as its [`PodNetns`]; dropping it ends the thread, which closes the
//! namespace descriptor the agent handed over.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};

type Job = Box<dyn FnOnce() + Send>;

/// A pod's network namespace, with the thread that creates sockets in it.
pub struct PodNetns {
    jobs: std::sync::mpsc::Sender<Job>,
    name: String,
}

impl std::fmt::Debug for PodNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PodNetns({})", self.name)
    }
}

/// Why a pod's namespace cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("entering the network namespace of {pod} (expected a network namespace descriptor from the CNI agent; does l4mesh have CAP_SYS_ADMIN?)")]
    Enter {
        pod: String,
        #[source]
        source: io::Error,
    },
    #[error("the namespace thread of {pod} is gone")]
    Gone { pod: String },
    #[error("creating a socket in the network namespace of {pod}")]
    Socket {
        pod: String,
        #[source]
        source: io::Error,
    },
}

impl PodNetns {
    /// Starts the thread of `pod` (its name in logs and errors) and enters `netns` on it;
    /// returns once it is in, or why it could not enter.
    pub fn enter(netns: OwnedFd, pod: &str) -> Result<PodNetns, NetnsError> {
        let (jobs, rx) = std::sync::mpsc::channel::<Job>();
        let (entered_tx, entered) = std::sync::mpsc::sync_channel::<io::Result<()>>(1);
        let thread_name = format!("l4mesh-netns-{}", pod.chars().take(32).collect::<String>());
        std::thread::Builder::new()
            .name(thread_name)
            .spawn(move || {
                let r = rustix::thread::move_into_link_name_space(
                    netns.as_fd(),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )
                .map_err(io::Error::from);
                let ok = r.is_ok();
                let _ = entered_tx.send(r);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
                drop(netns);
            })
            .map_err(|source| NetnsError::Enter {
                pod: pod.to_owned(),
                source,
            })?;
        match entered.recv() {
            Ok(Ok(())) => Ok(PodNetns {
                jobs,
                name: pod.to_owned(),
            }),
            Ok(Err(source)) => Err(NetnsError::Enter {
                pod: pod.to_owned(),
                source,
            }),
            Err(_) => Err(NetnsError::Gone {
                pod: pod.to_owned(),
            }),
        }
    }

    /// Runs `f` on the namespace's thread (inside the namespace) and returns what it made.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(f());
        });
        let gone = || NetnsError::Gone {
            pod: self.name.clone(),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        rx.await
            .map_err(|_| gone())?
            .map_err(|source| NetnsError::Socket {
                pod: self.name.clone(),
                source,
            })
    }

    /// A listening TCP socket on `addr` inside the namespace (non-blocking, for the runtime);
    /// `reuse_port` sets `SO_REUSEPORT`, so that a second l4mesh can bind beside a draining one
    /// (`INPOD_PORT_REUSE`).
    pub async fn listen(
        &self,
        addr: SocketAddr,
        reuse_port: bool,
    ) -> Result<std::net::TcpListener, NetnsError> {
        self.run(move || {
            let s = bound(addr, socket2::Type::STREAM, reuse_port)?;
            s.listen(1024)?;
            Ok(std::net::TcpListener::from(OwnedFd::from(s)))
        })
        .await
    }

    /// A UDP socket bound to `addr` inside the namespace (non-blocking, for the runtime);
    /// `reuse_port` as for [`PodNetns::listen`].
    pub async fn bind_udp(
        &self,
        addr: SocketAddr,
        reuse_port: bool,
    ) -> Result<std::net::UdpSocket, NetnsError> {
        self.run(move || {
            let s = bound(addr, socket2::Type::DGRAM, reuse_port)?;
            Ok(std::net::UdpSocket::from(OwnedFd::from(s)))
        })
        .await
    }

    /// A bare socket of the namespace (blocking, unbound): what is done with it after (bind,
    /// connect, options) happens in the namespace it was made in, from any thread.
    pub async fn socket(
        &self,
        domain: socket2::Domain,
        ty: socket2::Type,
    ) -> Result<socket2::Socket, NetnsError> {
        self.run(move || socket2::Socket::new(domain, ty, None))
            .await
    }

    /// The pod's name, as given to [`PodNetns::enter`].
    pub fn pod(&self) -> &str {
        &self.name
    }
}

/// A non-blocking socket of `ty` bound to `addr`, made on the calling thread (so in its
/// namespace): `SO_REUSEADDR`, `SO_REUSEPORT` when asked, and for IPv6 dual stack when `addr` is
/// the unspecified address (`[::]` takes IPv4 too, as ztunnel binds its pod listeners), IPv6 alone
/// otherwise.
fn bound(addr: SocketAddr, ty: socket2::Type, reuse_port: bool) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    s.set_reuse_address(true)?;
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        s.set_only_v6(!addr.ip().is_unspecified())?;
    }
    s.bind(&addr.into())?;
    s.set_nonblocking(true)?;
    Ok(s)
}
