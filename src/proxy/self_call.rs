//! Connections addressed to l4mesh itself. A listener bound to the wildcard address answers on
//! every address of its namespace, so `<pod IP>:15006` is l4mesh's inbound listener as much as
//! `127.0.0.1:15006` is. A connection to one of those ports that l4mesh accepted and then forwarded
//! would be accepted again, forwarded again, and so on until descriptors run out: a remote denial of
//! service. So l4mesh refuses by *port*, as ztunnel's `illegal_ports` does, whatever address the
//! listener is bound to.
//!
//! Where each path checks:
//! - outbound (capture and SOCKS5): the original destination, and the chosen upstream of a
//!   plain-TCP route, when the port is any of l4mesh's (the operators' servers included: nothing
//!   reaches the admin API through the data path) and the address is this namespace's own
//!   (loopback, unspecified, or an address a plain socket can bind). A remote pod's port 15008 is
//!   not refused here: that pod's proxy refuses it.
//! - inbound plaintext and HBONE: the port the connection is finally delivered to, when it is one
//!   of the data-path listeners (the ones that forward, as ztunnel's `illegal_ports`). The
//!   destination of an inbound connection is by definition this namespace, so the port alone
//!   decides. The metrics and readiness servers stay reachable through the mesh (a meshed
//!   Prometheus scrapes them; they forward nothing, so no loop is possible).
//!
//! This module only decides; the paths log and count the refusal.

use std::net::SocketAddr;

/// The ports l4mesh listens on in the namespace of the workloads it serves, as bound (a
/// configured port 0 counts as the port the kernel chose): the data-path listeners (15001, 15006,
/// 15008, 15080 when SOCKS5 is on), which forward, and the operators' ones (15000, 15020, 15021).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnPorts {
    forwarding: Box<[u16]>,
    all: Box<[u16]>,
}

fn port_set(ports: impl IntoIterator<Item = u16>) -> Box<[u16]> {
    let mut v: Vec<u16> = ports.into_iter().filter(|p| *p != 0).collect();
    v.sort_unstable();
    v.dedup();
    v.into_boxed_slice()
}

impl OwnPorts {
    /// The data-path listeners' `forwarding` ports and the operators' servers' `operators`
    /// ports; port 0 (nothing bound) is left out.
    pub fn new(
        forwarding: impl IntoIterator<Item = u16>,
        operators: impl IntoIterator<Item = u16>,
    ) -> Self {
        let forwarding = port_set(forwarding);
        let all = port_set(forwarding.iter().copied().chain(operators));
        Self { forwarding, all }
    }

    /// Whether `port` is one of l4mesh's listeners that forward: never an inbound destination.
    pub fn forwards(&self, port: u16) -> bool {
        self.forwarding.binary_search(&port).is_ok()
    }

    /// Whether `port` is any of l4mesh's listeners.
    pub fn contains(&self, port: u16) -> bool {
        self.all.binary_search(&port).is_ok()
    }

    /// Every port, ascending (for the config dump and logs).
    pub fn ports(&self) -> &[u16] {
        &self.all
    }

    /// Whether an outbound destination is l4mesh itself: one of its ports on an address of this
    /// namespace. `is_local` answers for the addresses that are neither loopback nor unspecified;
    /// it is asked only for l4mesh's own ports, so the common case costs no system call.
    pub fn is_self(
        &self,
        dst: SocketAddr,
        is_local: impl FnOnce(std::net::IpAddr) -> bool,
    ) -> bool {
        if !self.contains(dst.port()) {
            return false;
        }
        let ip = dst.ip().to_canonical();
        ip.is_loopback() || ip.is_unspecified() || is_local(ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports() -> OwnPorts {
        OwnPorts::new([15008, 15001, 15006, 0, 15001], [15020, 15021, 15000])
    }

    #[test]
    fn ports_are_a_sorted_set_without_zero() {
        let p = ports();
        assert_eq!(p.ports(), &[15000, 15001, 15006, 15008, 15020, 15021]);
        assert!(p.contains(15006) && p.contains(15020));
        assert!(!p.contains(0) && !p.contains(8080));
        // Only the data-path listeners are refused as inbound destinations.
        assert!(p.forwards(15006) && p.forwards(15008) && p.forwards(15001));
        assert!(!p.forwards(15020) && !p.forwards(15021) && !p.forwards(15000));
    }

    #[test]
    fn own_port_on_any_own_address_is_self() {
        let p = ports();
        let never_local = |_| false;
        for dst in [
            "127.0.0.1:15006",
            "127.3.4.5:15001",
            "0.0.0.0:15008",
            "[::1]:15020",
            "[::]:15021",
            "[::ffff:127.0.0.1]:15000",
        ] {
            assert!(p.is_self(dst.parse().unwrap(), never_local), "{dst}");
        }
        // The pod's own address: asked of the namespace.
        let pod: SocketAddr = "10.1.2.3:15006".parse().unwrap();
        assert!(p.is_self(pod, |ip| ip == pod.ip()));
        assert!(!p.is_self(pod, never_local));
        // Another port of an own address, and a remote pod's 15008, are not self.
        assert!(!p.is_self("127.0.0.1:8080".parse().unwrap(), |_| true));
        assert!(!p.is_self("10.9.9.9:15008".parse().unwrap(), never_local));
    }

    #[test]
    fn the_namespace_is_asked_only_for_own_ports() {
        let asked = std::cell::Cell::new(false);
        let p = ports();
        p.is_self("10.1.2.3:8080".parse().unwrap(), |_| {
            asked.set(true);
            true
        });
        assert!(!asked.get());
    }
}
