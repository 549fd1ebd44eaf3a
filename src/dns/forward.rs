//! The upstream resolvers: every name that is not the mesh's goes to the `nameserver`s of
//! `/etc/resolv.conf`, in order, over UDP, and again over TCP when the answer came truncated.
//! Their sockets carry `PACKET_MARK`, so that a captured port 53 does not send them back to
//! l4mesh. An answer is relayed as it came (NXDOMAIN included); only when no resolver answers
//! in time does the client get SERVFAIL (the server's job).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::inpod::netns::PodNetns;

/// How long one resolver gets to answer (ztunnel's forwarder waits 5 s in all; here each of
/// at most three resolvers gets this).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Why no resolver answered.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no nameserver is configured (expected `nameserver <ip>` lines in /etc/resolv.conf)")]
    NoUpstream,
    #[error("no upstream resolver answered ({0})")]
    Failed(String),
}

/// The search domains of a resolv.conf text (the last `search` or `domain` line wins, as the C
/// library reads them), lower case, without final dots.
pub fn search_domains(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for l in text.lines() {
        let mut words = l.split_whitespace();
        if let Some("search" | "domain") = words.next() {
            out = words
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .filter(|d| !d.is_empty())
                .collect();
        }
    }
    out
}

/// The resolvers and how to reach them.
#[derive(Clone, Debug)]
pub struct Upstreams {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    mark: u32,
    /// Shared mode: the pod whose queries these are; its namespace makes the sockets (so the
    /// queries leave from the pod, as ztunnel's do).
    netns: Option<Arc<PodNetns>>,
}

impl Upstreams {
    /// The `nameserver` lines of a resolv.conf text (at most three, as the C library reads
    /// them); other lines are ignored.
    pub fn from_resolv_conf(text: &str, timeout: Duration, mark: u32) -> Upstreams {
        let servers = text
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                (words.next() == Some("nameserver"))
                    .then(|| words.next())
                    .flatten()
                    .and_then(|ip| ip.split('%').next()?.parse::<IpAddr>().ok())
            })
            .take(3)
            .map(|ip| SocketAddr::new(ip, 53))
            .collect();
        Upstreams {
            servers,
            timeout,
            mark,
            netns: None,
        }
    }

    /// The same resolvers, asked from `netns` (a pod's namespace).
    pub fn from_pod(&self, netns: Arc<PodNetns>) -> Upstreams {
        Upstreams {
            netns: Some(netns),
            ..self.clone()
        }
    }

    /// Given resolvers (tests, and other ports than 53).
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration, mark: u32) -> Upstreams {
        Upstreams {
            servers,
            timeout,
            mark,
            netns: None,
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// The first answer any resolver gives to `request` (its bytes as they came).
    pub async fn exchange(&self, request: &[u8]) -> Result<Vec<u8>, ForwardError> {
        if self.servers.is_empty() {
            return Err(ForwardError::NoUpstream);
        }
        let mut errors = Vec::new();
        for server in &self.servers {
            match tokio::time::timeout(self.timeout, self.one(*server, request)).await {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(e)) => errors.push(format!("{server}: {e}")),
                Err(_) => errors.push(format!("{server}: no answer within {:?}", self.timeout)),
            }
        }
        Err(ForwardError::Failed(errors.join("; ")))
    }

    async fn one(&self, server: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
        let answer = self.udp(server, request).await?;
        // TC: the whole answer only fits a TCP exchange.
        if answer.get(2).is_some_and(|b| b & 0x02 != 0) {
            return self.tcp(server, request).await;
        }
        Ok(answer)
    }

    async fn udp(&self, server: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
        let any: IpAddr = match server {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let (domain, ty) = (socket2::Domain::for_address(server), socket2::Type::DGRAM);
        let s = match &self.netns {
            Some(ns) => ns.socket(domain, ty).await.map_err(std::io::Error::other)?,
            None => socket2::Socket::new(domain, ty, None)?,
        };
        self.mark(&s);
        s.set_nonblocking(true)?;
        s.bind(&SocketAddr::new(any, 0).into())?;
        let s = tokio::net::UdpSocket::from_std(s.into())?;
        s.connect(server).await?;
        s.send(request).await?;
        // The upstream answers within the size the request announces (512 without EDNS).
        let cap = hickory_proto::op::Message::from_vec(request)
            .map_or(512, |m| usize::from(m.max_payload()));
        let mut buf = vec![0u8; cap];
        loop {
            let n = s.recv(&mut buf).await?;
            // Only the answer to this request (same id) counts; anything else is ignored.
            if n >= 2 && request.len() >= 2 && buf[..2] == request[..2] {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    }

    async fn tcp(&self, server: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
        let opts = crate::socket::UpstreamOptions {
            mark: self.mark,
            connect_timeout: self.timeout,
            orig_src: false,
            orig_src_fallbacks: Default::default(),
            keepalive: Default::default(),
            netns: self.netns.clone(),
        };
        let mut s = crate::socket::connect(server, &opts).await?;
        let len = u16::try_from(request.len())
            .map_err(|_| std::io::Error::other("a query longer than 65 535 bytes"))?;
        s.write_all(&len.to_be_bytes()).await?;
        s.write_all(request).await?;
        let len = s.read_u16().await?;
        let mut buf = vec![0u8; usize::from(len)];
        s.read_exact(&mut buf).await?;
        Ok(buf)
    }

    fn mark(&self, s: &socket2::Socket) {
        if self.mark != 0 {
            if let Err(e) = s.set_mark(self.mark) {
                tracing::debug!(mark = self.mark, error = %e, "cannot mark the DNS upstream socket");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order_at_most_three() {
        let u = Upstreams::from_resolv_conf(
            "# comment\nsearch default.svc.cluster.local\nnameserver 10.96.0.10\nnameserver fe80::1%eth0\nnameserver bogus\nnameserver 1.1.1.1\nnameserver 8.8.8.8\noptions ndots:5\n",
            DEFAULT_TIMEOUT,
            1337,
        );
        let s: Vec<String> = u.servers().iter().map(ToString::to_string).collect();
        assert_eq!(s, ["10.96.0.10:53", "[fe80::1]:53", "1.1.1.1:53"]);
        assert_eq!(
            search_domains("domain x.y\nsearch Default.svc.cluster.local. svc.cluster.local\n"),
            ["default.svc.cluster.local", "svc.cluster.local"]
        );
        assert!(search_domains("nameserver 1.1.1.1\n").is_empty());
    }
}
