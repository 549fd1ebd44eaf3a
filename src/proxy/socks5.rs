//! SOCKS5 front end (RFC 1928: no authentication, CONNECT only) for the outbound path: lets a user
//! send traffic through l4mesh without any redirection rules. Domain names resolve through the
//! store's service hostnames first (so `echo.default.svc.cluster.local` reaches its VIP), then
//! through the system resolver.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::access::ConnLog;
use super::copy::Transferred;
use super::{outbound, ProxyCtx, ProxyError, Role};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reply codes of RFC 1928 §6.
const REP_OK: u8 = 0x00;
const REP_GENERAL: u8 = 0x01;
const REP_HOST_UNREACHABLE: u8 = 0x04;
const REP_REFUSED: u8 = 0x05;
const REP_CMD_UNSUPPORTED: u8 = 0x07;
const REP_ATYP_UNSUPPORTED: u8 = 0x08;

pub(super) async fn serve(ctx: &ProxyCtx, mut down: TcpStream, src: SocketAddr) {
    let dst = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(ctx, &mut down)).await {
        Ok(Ok(dst)) => dst,
        Ok(Err((e, rep))) => {
            if let Some(rep) = rep {
                let _ = reply(&mut down, rep).await;
            }
            let local = down.local_addr().unwrap_or(src);
            ConnLog::new(Role::Socks5, src, local).finish(Transferred::default(), Some(&e));
            return;
        }
        Err(_) => {
            let local = down.local_addr().unwrap_or(src);
            let e = ProxyError::Socks5(format!(
                "client sent no complete request within {HANDSHAKE_TIMEOUT:?}"
            ));
            ConnLog::new(Role::Socks5, src, local).finish(Transferred::default(), Some(&e));
            return;
        }
    };
    let mut log = ConnLog::new(Role::Socks5, src, dst);
    match outbound::open(ctx, &mut log).await {
        Ok(up) => {
            if reply(&mut down, REP_OK).await.is_ok() {
                outbound::relay(ctx, down, up, &log).await;
            } else {
                log.finish(
                    Transferred::default(),
                    Some(&ProxyError::Socks5(
                        "client went away before the reply".into(),
                    )),
                );
            }
        }
        Err(e) => {
            let rep = match &e {
                ProxyError::Connect { .. } => REP_REFUSED,
                ProxyError::Route(_) => REP_HOST_UNREACHABLE,
                _ => REP_GENERAL,
            };
            let _ = reply(&mut down, rep).await;
            log.finish(Transferred::default(), Some(&e));
        }
    }
}

/// What went wrong in a handshake, and the reply code to send back (none when the client
/// cannot take one).
pub type HandshakeError = (ProxyError, Option<u8>);

fn proto_err(msg: impl Into<String>, rep: Option<u8>) -> HandshakeError {
    (ProxyError::Socks5(msg.into()), rep)
}

async fn handshake(ctx: &ProxyCtx, s: &mut TcpStream) -> Result<SocketAddr, HandshakeError> {
    match read_request(s).await? {
        Host::Ip(ip, port) => Ok(SocketAddr::new(ip, port)),
        Host::Name(name, port) => resolve_name(ctx, &name, port).await,
    }
}

/// Reads a client's greeting and CONNECT request (answering the greeting), up to the target;
/// the caller resolves a name and sends the final reply. Generic over the stream so that it can
/// be fuzzed on bytes in memory.
pub async fn read_request<S>(s: &mut S) -> Result<Host, HandshakeError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let io = |e: std::io::Error| proto_err(format!("reading the request: {e}"), None);
    let mut head = [0u8; 2];
    s.read_exact(&mut head).await.map_err(io)?;
    if head[0] != 5 {
        return Err(proto_err(
            format!("expected SOCKS version 5, found {}", head[0]),
            None,
        ));
    }
    let mut methods = vec![0u8; usize::from(head[1])];
    s.read_exact(&mut methods).await.map_err(io)?;
    if !methods.contains(&0) {
        let _ = s.write_all(&[5, 0xff]).await;
        return Err(proto_err(
            format!("expected the no-authentication method (0) among {methods:?}"),
            None,
        ));
    }
    s.write_all(&[5, 0]).await.map_err(io)?;
    let mut req = [0u8; 4];
    s.read_exact(&mut req).await.map_err(io)?;
    if req[0] != 5 {
        return Err(proto_err(
            format!("expected version 5 in the request, found {}", req[0]),
            Some(REP_GENERAL),
        ));
    }
    if req[1] != 1 {
        return Err(proto_err(
            format!("expected command CONNECT (1), found {}", req[1]),
            Some(REP_CMD_UNSUPPORTED),
        ));
    }
    let host: IpAddr = match req[3] {
        1 => {
            let mut b = [0u8; 4];
            s.read_exact(&mut b).await.map_err(io)?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        4 => {
            let mut b = [0u8; 16];
            s.read_exact(&mut b).await.map_err(io)?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        3 => {
            let mut len = [0u8; 1];
            s.read_exact(&mut len).await.map_err(io)?;
            let mut b = vec![0u8; usize::from(len[0])];
            s.read_exact(&mut b).await.map_err(io)?;
            let name = String::from_utf8(b)
                .map_err(|_| proto_err("domain name is not UTF-8", Some(REP_GENERAL)))?;
            return read_port(s).await.map(|port| Host::Name(name, port));
        }
        t => {
            return Err(proto_err(
                format!("expected address type 1, 3 or 4, found {t}"),
                Some(REP_ATYP_UNSUPPORTED),
            ))
        }
    };
    read_port(s).await.map(|port| Host::Ip(host, port))
}

async fn read_port<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> Result<u16, HandshakeError> {
    let mut port = [0u8; 2];
    s.read_exact(&mut port)
        .await
        .map_err(|e| proto_err(format!("reading the request: {e}"), None))?;
    Ok(u16::from_be_bytes(port))
}

/// The target of a SOCKS5 CONNECT, with its port.
#[derive(Debug, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr, u16),
    Name(String, u16),
}

async fn resolve_name(ctx: &ProxyCtx, name: &str, port: u16) -> Result<SocketAddr, HandshakeError> {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let vip = {
        let snapshot = ctx.store.load();
        // As the DNS proxy would answer the served workload: its namespace's service first.
        let client_ns = ctx.own_workload.as_ref().map(|w| w.namespace.as_str());
        crate::model::best_match(snapshot.services_by_hostname(name), client_ns, None).and_then(
            |svc| {
                svc.vips
                    .iter()
                    .find(|v| v.network == ctx.network)
                    .or(svc.vips.first())
                    .map(|v| v.ip)
            },
        )
    };
    if let Some(ip) = vip {
        return Ok(SocketAddr::new(ip, port));
    }
    match tokio::net::lookup_host((name, port)).await {
        Ok(mut addrs) => addrs.next().ok_or_else(|| {
            proto_err(
                format!("{name:?} is neither a mesh service hostname nor resolvable by DNS"),
                Some(REP_HOST_UNREACHABLE),
            )
        }),
        Err(e) => Err(proto_err(
            format!("{name:?} is neither a mesh service hostname nor resolvable by DNS: {e}"),
            Some(REP_HOST_UNREACHABLE),
        )),
    }
}

async fn reply(s: &mut TcpStream, rep: u8) -> std::io::Result<()> {
    s.write_all(&[5, rep, 0, 1, 0, 0, 0, 0, 0, 0]).await
}
