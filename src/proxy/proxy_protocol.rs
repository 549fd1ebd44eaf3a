//! The PROXY protocol v2 header (HAProxy's specification) that l4mesh writes first on a
//! connection it delivers through a workload's application tunnel: the application (or a
//! waypoint) learns the client's address, the destination the client asked for, and the
//! identity the client proved over mutual TLS (TLV 0xD0, as ztunnel writes it).
//!
//! Only written, never parsed: l4mesh does not accept PROXY protocol on any listener.

use std::net::{IpAddr, SocketAddr};

/// The 12 bytes every v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Version 2, command PROXY.
const VERSION_PROXY: u8 = 0x21;
/// AF_INET / AF_INET6 with STREAM transport.
const TCP4: u8 = 0x11;
const TCP6: u8 = 0x21;
/// ztunnel's TLV type for the client's SPIFFE identity.
pub const TLV_PEER_IDENTITY: u8 = 0xD0;

/// The header for a connection from `src` to `dst` (the client's address and the destination
/// it asked for), with the client's proven `identity` when there is one. Both addresses are
/// given in one family: IPv4 when both are IPv4 (or IPv4-mapped), else IPv6 (an IPv4 address
/// as its IPv4-mapped form). An identity too long for a TLV (over 65 535 bytes) is left out.
pub fn header(src: SocketAddr, dst: SocketAddr, identity: Option<&str>) -> Vec<u8> {
    let (src_ip, dst_ip) = (src.ip().to_canonical(), dst.ip().to_canonical());
    let mut addrs = Vec::with_capacity(36);
    let family = match (src_ip, dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            addrs.extend_from_slice(&s.octets());
            addrs.extend_from_slice(&d.octets());
            TCP4
        }
        (s, d) => {
            addrs.extend_from_slice(&v6(s));
            addrs.extend_from_slice(&v6(d));
            TCP6
        }
    };
    addrs.extend_from_slice(&src.port().to_be_bytes());
    addrs.extend_from_slice(&dst.port().to_be_bytes());
    let tlv = identity.and_then(|id| {
        let len = u16::try_from(id.len()).ok()?;
        let mut t = Vec::with_capacity(3 + id.len());
        t.push(TLV_PEER_IDENTITY);
        t.extend_from_slice(&len.to_be_bytes());
        t.extend_from_slice(id.as_bytes());
        Some(t)
    });
    let tlv = tlv.unwrap_or_default();
    // At most 36 + 3 + 65 535 bytes: the length field holds it only without the largest TLV.
    let Ok(len) = u16::try_from(addrs.len() + tlv.len()) else {
        return header(src, dst, None);
    };
    let mut out = Vec::with_capacity(16 + usize::from(len));
    out.extend_from_slice(&SIGNATURE);
    out.push(VERSION_PROXY);
    out.push(family);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&addrs);
    out.extend_from_slice(&tlv);
    out
}

fn v6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_with_the_identity_byte_for_byte() {
        let id = "spiffe://cluster.local/ns/default/sa/client";
        let h = header(
            "10.0.0.1:40000".parse().unwrap(),
            "10.0.0.2:8080".parse().unwrap(),
            Some(id),
        );
        let mut want = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
        want.extend_from_slice(&[0x21, 0x11]);
        want.extend_from_slice(&(12 + 3 + id.len() as u16).to_be_bytes());
        want.extend_from_slice(&[10, 0, 0, 1, 10, 0, 0, 2]);
        want.extend_from_slice(&40000u16.to_be_bytes());
        want.extend_from_slice(&8080u16.to_be_bytes());
        want.push(0xD0);
        want.extend_from_slice(&(id.len() as u16).to_be_bytes());
        want.extend_from_slice(id.as_bytes());
        assert_eq!(h, want);
    }

    #[test]
    fn ipv6_mixed_and_mapped_addresses() {
        // IPv4-mapped on both sides: still IPv4.
        let h = header(
            "[::ffff:10.0.0.1]:1".parse().unwrap(),
            "[::ffff:10.0.0.2]:2".parse().unwrap(),
            None,
        );
        assert_eq!((h[13], &h[14..16]), (0x11, &[0u8, 12][..]));
        // One IPv6 address: both as IPv6, the IPv4 one mapped.
        let h = header(
            "10.0.0.1:1".parse().unwrap(),
            "[fd00::2]:2".parse().unwrap(),
            None,
        );
        assert_eq!((h[13], &h[14..16]), (0x21, &[0u8, 36][..]));
        assert_eq!(
            &h[16..32],
            &"::ffff:10.0.0.1"
                .parse::<std::net::Ipv6Addr>()
                .unwrap()
                .octets()
        );
        assert_eq!(
            &h[32..48],
            &"fd00::2".parse::<std::net::Ipv6Addr>().unwrap().octets()
        );
        assert_eq!(&h[48..52], &[0, 1, 0, 2]);
        assert_eq!(h.len(), 52);
    }

    #[test]
    fn an_identity_too_long_is_left_out() {
        let long = "x".repeat(70_000);
        let h = header(
            "10.0.0.1:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
            Some(&long),
        );
        assert_eq!(h.len(), 16 + 12);
    }
}
