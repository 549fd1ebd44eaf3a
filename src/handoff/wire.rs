//! The hand-off messages: one JSON object per packet, tagged by `type`. Pure: encoding,
//! decoding, and the check that a received descriptor is the listening socket it was said to be.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;

/// The hand-off protocol spoken; a peer speaking another is refused with a clear reason.
pub const PROTOCOL: u32 = 1;

/// The name under which the hand-off socket itself is handed over.
pub const HANDOFF_SOCKET: &str = "handoff";

/// The largest metrics text one packet carries (JSON escaping may double it; a packet holds
/// 64 KiB); a longer exposition goes in several.
pub const METRICS_CHUNK: usize = 16 * 1024;

/// What kind of socket a handed descriptor is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A listening TCP socket.
    Tcp,
    /// A bound UDP socket (the DNS proxy).
    Udp,
    /// The listening hand-off socket.
    Unix,
    /// A pod's network namespace (shared mode), as the CNI agent handed it over.
    Netns,
}

/// A pod served in shared mode, as the CNI agent described it (its identity).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PodOffer {
    pub uid: String,
    pub name: String,
    pub namespace: String,
    pub service_account: String,
}

/// The name under which a pod's socket (or namespace: `netns`) is handed over.
pub fn pod_socket(uid: &str, what: &str) -> String {
    format!("pod/{uid}/{what}")
}

/// A socket as offered: its name (what it is for), kind and bound address.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SocketInfo {
    pub name: String,
    pub kind: Kind,
    /// `None` for the unix hand-off socket.
    pub addr: Option<SocketAddr>,
}

impl SocketInfo {
    /// `tcp 127.0.0.1:15001`, for messages.
    pub fn describe(&self) -> String {
        match self.addr {
            Some(a) => format!("{:?} {a}", self.kind).to_lowercase(),
            None => format!("{:?}", self.kind).to_lowercase(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// Successor → running: who is asking.
    Hello {
        protocol: u32,
        version: String,
        pid: u32,
    },
    /// Running → successor: what follows, `pods` [`Message::Pod`]s then `sockets`
    /// [`Message::Socket`]s (one packet each, so that a node of many pods fits).
    Offer {
        protocol: u32,
        version: String,
        pid: u32,
        sockets: usize,
        /// Shared mode: the pods whose sockets and namespaces are among the sockets.
        #[serde(default)]
        pods: usize,
        /// The offering process's network namespace ([`own_netns`]): a successor in another
        /// one (another pod) takes only what does not belong to a namespace of its own.
        #[serde(default)]
        netns: Option<String>,
    },
    /// Running → successor: a pod served in shared mode.
    Pod(PodOffer),
    /// Running → successor: one socket, as the packet's one descriptor.
    Socket(SocketInfo),
    /// Running → successor: no hand-off (or no longer), and why.
    Refused { reason: String },
    /// Successor → running: accepting; stop.
    Ready,
    /// Running → successor: stopped accepting; draining this many connections.
    Released { open_connections: u64 },
    /// Draining predecessor → successor, every few seconds until it exits.
    Status { open_connections: u64 },
    /// Draining predecessor → successor: a piece of its metrics exposition (`openmetrics`: in
    /// OpenMetrics text, else Prometheus text 0.0.4); `more` until the last piece.
    Metrics {
        openmetrics: bool,
        text: String,
        more: bool,
    },
}

/// This process's network namespace, as `device:inode` of `/proc/self/ns/net` (`None` where it
/// cannot be read).
pub fn own_netns() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata("/proc/self/ns/net").ok()?;
    Some(format!("{}:{}", m.dev(), m.ino()))
}

/// Whether a socket called `name` belongs to a pod (or is the hand-off socket): a successor in
/// another network namespace still takes those, as they are not in its predecessor's namespace.
pub fn travels(name: &str) -> bool {
    name == HANDOFF_SOCKET || name.starts_with("pod/")
}

pub fn encode(msg: &Message) -> Vec<u8> {
    // Serialising these types cannot fail (no maps with non-string keys, no custom serialisers).
    serde_json::to_vec(msg).unwrap_or_default()
}

pub fn decode(bytes: &[u8]) -> Result<Message, String> {
    serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "expected a hand-off message (JSON with a known \"type\"), got {} bytes that are not one: {e}",
            bytes.len()
        )
    })
}

/// A message's kind for error messages (`nothing` when the peer closed).
pub fn describe(msg: Option<&Message>) -> String {
    match msg {
        None => "nothing (the peer closed)".into(),
        Some(m) => {
            let json = serde_json::to_value(m).unwrap_or_default();
            json.get("type")
                .and_then(|t| t.as_str())
                .unwrap_or("an unknown message")
                .to_string()
        }
    }
}

/// Splits a metrics text into pieces of at most [`METRICS_CHUNK`] bytes, at line ends where a
/// line fits (a piece is never empty; an empty text is one empty piece).
pub fn metrics_pieces(text: &str, openmetrics: bool) -> Vec<Message> {
    let mut pieces = Vec::new();
    let mut rest = text;
    loop {
        let cut = if rest.len() <= METRICS_CHUNK {
            rest.len()
        } else {
            let window = &rest[..floor_char_boundary(rest, METRICS_CHUNK)];
            match window.rfind('\n') {
                Some(i) => i + 1,
                None => window.len().max(1),
            }
        };
        let (piece, tail) = rest.split_at(cut);
        rest = tail;
        pieces.push(Message::Metrics {
            openmetrics,
            text: piece.to_string(),
            more: !rest.is_empty(),
        });
        if rest.is_empty() {
            return pieces;
        }
    }
}

fn floor_char_boundary(s: &str, mut i: usize) -> usize {
    while i > 0 && !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Whether `fd` is the socket `info` says it is: its type, listening (TCP, unix), bound to the
/// address. `Err` says what it is instead.
pub fn check_socket(fd: &OwnedFd, info: &SocketInfo) -> Result<(), String> {
    if info.kind == Kind::Netns {
        // Entering it checks it (`setns` refuses anything but a network namespace).
        return Ok(());
    }
    let sock = socket2::SockRef::from(fd);
    let ty = sock
        .r#type()
        .map_err(|e| format!("a descriptor that is not a socket ({e})"))?;
    let want = match info.kind {
        Kind::Tcp => socket2::Type::STREAM,
        Kind::Udp => socket2::Type::DGRAM,
        Kind::Unix => socket2::Type::SEQPACKET,
        Kind::Netns => return Ok(()),
    };
    if ty != want {
        return Err(format!(
            "{:?}: a socket of type {ty:?}, not {}",
            info.name,
            info.describe()
        ));
    }
    if info.kind != Kind::Udp && !sock.is_listener().unwrap_or(false) {
        return Err(format!("{:?}: a socket that is not listening", info.name));
    }
    if let Some(addr) = info.addr {
        let local = sock.local_addr().ok().and_then(|a| a.as_socket());
        if local != Some(addr) {
            return Err(format!(
                "{:?}: a socket bound to {local:?}, not {addr}",
                info.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_packets_say_what_they_are() {
        let offer = Message::Offer {
            protocol: PROTOCOL,
            version: "1.2.3".into(),
            pid: 7,
            sockets: 1,
            pods: 0,
            netns: own_netns(),
        };
        let bytes = encode(&offer);
        assert!(String::from_utf8_lossy(&bytes).contains(r#""type":"offer""#));
        assert_eq!(decode(&bytes).unwrap(), offer);
        assert_eq!(describe(Some(&offer)), "offer");
        assert_eq!(describe(None), "nothing (the peer closed)");
        let e = decode(br#"{"type":"launch"}"#).unwrap_err();
        assert!(e.contains("expected a hand-off message"), "{e}");
        assert!(decode(b"\xff\x00").is_err());
        let socket = Message::Socket(SocketInfo {
            name: "outbound".into(),
            kind: Kind::Tcp,
            addr: Some("127.0.0.1:15001".parse().unwrap()),
        });
        assert_eq!(decode(&encode(&socket)).unwrap(), socket);
        // The largest pod name Kubernetes allows, with its namespace, fits a packet many times.
        let pod = Message::Pod(PodOffer {
            uid: "u".repeat(36),
            name: "n".repeat(253),
            namespace: "s".repeat(63),
            service_account: "a".repeat(253),
        });
        assert!(encode(&pod).len() < 1024);
        assert_eq!(decode(&encode(&pod)).unwrap(), pod);
    }

    #[test]
    fn only_pod_sockets_and_the_handoff_socket_leave_their_namespace() {
        assert!(travels(HANDOFF_SOCKET));
        assert!(travels(&pod_socket("uid-1", "outbound")));
        assert!(travels(&pod_socket("uid-1", "netns")));
        for name in [
            "admin",
            "metrics",
            "readiness",
            "outbound",
            "dns-udp 127.0.0.1:15053",
        ] {
            assert!(!travels(name), "{name}");
        }
        let own = own_netns().expect("/proc/self/ns/net");
        assert!(own.contains(':'), "{own}");
        assert_eq!(own_netns(), Some(own));
    }

    #[test]
    fn metrics_pieces_cut_at_lines_and_join_back() {
        let line = "x_total{a=\"é\"} 1\n";
        let text: String = line.repeat(METRICS_CHUNK / line.len() * 3 + 7);
        let pieces = metrics_pieces(&text, true);
        assert!(pieces.len() >= 3, "{}", pieces.len());
        let mut joined = String::new();
        for (i, p) in pieces.iter().enumerate() {
            let Message::Metrics { text, more, .. } = p else {
                panic!("{p:?}")
            };
            assert!(text.len() <= METRICS_CHUNK);
            assert!(text.ends_with('\n'));
            assert_eq!(*more, i + 1 < pieces.len());
            joined.push_str(text);
        }
        assert_eq!(joined, text);
        // One line longer than a piece is still cut (at a character boundary).
        let long = "é".repeat(METRICS_CHUNK);
        let joined: String = metrics_pieces(&long, false)
            .into_iter()
            .map(|p| match p {
                Message::Metrics { text, .. } => text,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(joined, long);
        assert_eq!(metrics_pieces("", true).len(), 1);
    }

    #[test]
    fn a_descriptor_is_checked_against_what_was_offered() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let fd: OwnedFd = l.into();
        let info = |kind, addr| SocketInfo {
            name: "outbound".into(),
            kind,
            addr,
        };
        check_socket(&fd, &info(Kind::Tcp, Some(addr))).unwrap();
        let e = check_socket(&fd, &info(Kind::Udp, Some(addr))).unwrap_err();
        assert!(e.contains("not udp"), "{e}");
        let other: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let e = check_socket(&fd, &info(Kind::Tcp, Some(other))).unwrap_err();
        assert!(e.contains("not 127.0.0.1:1"), "{e}");
        // Bound but not listening.
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let a = s.local_addr().unwrap().as_socket();
        let e = check_socket(&OwnedFd::from(s), &info(Kind::Tcp, a)).unwrap_err();
        assert!(e.contains("not listening"), "{e}");
        // Not a socket at all.
        let file: OwnedFd = std::fs::File::open("/dev/null").unwrap().into();
        let e = check_socket(&file, &info(Kind::Tcp, Some(addr))).unwrap_err();
        assert!(e.contains("not a socket"), "{e}");
    }
}
