//! Bounds on on-demand xDS: every connection to an address the store does not know may ask the
//! control plane about it, so an app dialling random IPs (a scanner, a misconfigured client, the
//! internet) must not grow l4mesh's subscriptions, its request queue or its connection latency
//! without limit.
//!
//! Two pure ledgers, time given as input:
//! - [`Subscriptions`] (the xDS client's side): the names subscribed on demand and since when.
//!   At most `max` names; a name whose resource never arrived is unsubscribed after `ttl`, so it
//!   is not re-sent on every reconnect forever. A full ledger first drops such stale names; if all
//!   are live, the new name is refused (the connection goes on as passthrough).
//! - [`NotFound`] (the data path's side): addresses asked about recently that got no answer
//!   within the timeout. Connections to them for `ttl` do not wait again; the subscription stays,
//!   so a late answer still lands in the store and wins.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::model::NetworkAddr;

/// What became of a demand for a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Admit {
    /// Subscribe to it; `stale` are names to unsubscribe first to make room.
    Subscribe { stale: Vec<String> },
    /// Already subscribed.
    Known,
    /// The ledger is full of names whose resources exist or are still awaited.
    Full,
}

/// The on-demand subscriptions of one xDS client.
#[derive(Debug)]
pub struct Subscriptions {
    max: usize,
    ttl: Duration,
    names: HashMap<String, (NetworkAddr, Instant)>,
}

impl Subscriptions {
    pub fn new(max: usize, ttl: Duration) -> Self {
        Self {
            max,
            ttl,
            names: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Records a demand for `addr` at `now`. `known` says whether an address is in the store
    /// (its subscription is live).
    pub fn admit(
        &mut self,
        addr: &NetworkAddr,
        now: Instant,
        known: impl Fn(&NetworkAddr) -> bool,
    ) -> Admit {
        let name = addr.to_string();
        if self.names.contains_key(&name) {
            return Admit::Known;
        }
        let mut stale = Vec::new();
        if self.names.len() >= self.max {
            stale = self.sweep(now, &known);
            if self.names.len() >= self.max {
                return Admit::Full;
            }
        }
        self.names.insert(name, (addr.clone(), now));
        Admit::Subscribe { stale }
    }

    /// Removes and returns the names older than the TTL whose resource is not in the store.
    pub fn sweep(&mut self, now: Instant, known: &impl Fn(&NetworkAddr) -> bool) -> Vec<String> {
        let ttl = self.ttl;
        let stale: Vec<String> = self
            .names
            .iter()
            .filter(|(_, (addr, since))| now.duration_since(*since) >= ttl && !known(addr))
            .map(|(n, _)| n.clone())
            .collect();
        for n in &stale {
            self.names.remove(n);
        }
        stale
    }
}

/// How often, at most, a full [`NotFound`] cache is swept for expired entries.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Addresses that recently got no on-demand answer, so that repeat connections do not wait.
#[derive(Debug)]
pub struct NotFound {
    max: usize,
    ttl: Duration,
    until: dashmap::DashMap<NetworkAddr, Instant>,
    last_sweep: std::sync::Mutex<Option<Instant>>,
}

impl NotFound {
    pub fn new(max: usize, ttl: Duration) -> Self {
        Self {
            max,
            ttl,
            until: dashmap::DashMap::new(),
            last_sweep: std::sync::Mutex::new(None),
        }
    }

    /// Whether `addr` got no answer less than the TTL ago.
    pub fn contains(&self, addr: &NetworkAddr, now: Instant) -> bool {
        match self.until.get(addr).map(|u| *u) {
            Some(until) if now < until => true,
            Some(_) => {
                self.until.remove_if(addr, |_, u| now >= *u);
                false
            }
            None => false,
        }
    }

    /// Notes that `addr` got no answer at `now`. A full cache drops its expired entries first,
    /// at most once per second (a sweep visits every entry); still full, the address is not
    /// cached (its connections keep waiting, nothing grows).
    pub fn insert(&self, addr: NetworkAddr, now: Instant) {
        if self.until.len() >= self.max {
            let swept = self
                .last_sweep
                .lock()
                .map(|mut last| {
                    if last.is_some_and(|t| now.duration_since(t) < SWEEP_EVERY) {
                        return false;
                    }
                    *last = Some(now);
                    true
                })
                .unwrap_or(false);
            if swept {
                self.until.retain(|_, u| now < *u);
            }
            if self.until.len() >= self.max {
                return;
            }
        }
        self.until.insert(addr, now + self.ttl);
    }

    /// Forgets `addr` (it was found after all).
    pub fn remove(&self, addr: &NetworkAddr) {
        self.until.remove(addr);
    }

    pub fn len(&self) -> usize {
        self.until.len()
    }

    pub fn is_empty(&self) -> bool {
        self.until.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(i: u8) -> NetworkAddr {
        NetworkAddr::new("", std::net::IpAddr::from([10, 0, 0, i]))
    }

    #[test]
    fn subscriptions_are_bounded_and_stale_ones_make_room() {
        let t0 = Instant::now();
        let mut s = Subscriptions::new(2, Duration::from_secs(60));
        let none = |_: &NetworkAddr| false;
        assert_eq!(
            s.admit(&addr(1), t0, none),
            Admit::Subscribe { stale: vec![] }
        );
        assert_eq!(s.admit(&addr(1), t0, none), Admit::Known);
        assert_eq!(
            s.admit(&addr(2), t0, none),
            Admit::Subscribe { stale: vec![] }
        );
        // Full, and nothing is old enough to drop.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(s.admit(&addr(3), t1, none), Admit::Full);
        // Later: the two never-answered names are stale and make room; a live one stays.
        let t2 = t0 + Duration::from_secs(61);
        let live = |a: &NetworkAddr| *a == addr(2);
        match s.admit(&addr(3), t2, live) {
            Admit::Subscribe { stale } => assert_eq!(stale, vec!["/10.0.0.1".to_owned()]),
            other => panic!("{other:?}"),
        }
        assert_eq!(s.len(), 2);
        // The sweep alone drops what is stale and unknown.
        let t3 = t2 + Duration::from_secs(61);
        assert_eq!(s.sweep(t3, &live), vec!["/10.0.0.3".to_owned()]);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn not_found_expires_and_is_bounded() {
        let t0 = Instant::now();
        let n = NotFound::new(2, Duration::from_secs(30));
        n.insert(addr(1), t0);
        assert!(n.contains(&addr(1), t0 + Duration::from_secs(29)));
        assert!(!n.contains(&addr(1), t0 + Duration::from_secs(30)));
        assert!(n.is_empty(), "an expired entry is dropped when read");
        n.insert(addr(1), t0);
        n.insert(addr(2), t0);
        n.insert(addr(3), t0);
        assert_eq!(n.len(), 2, "a full cache takes no more live entries");
        assert!(!n.contains(&addr(3), t0));
        n.insert(addr(3), t0 + Duration::from_secs(31));
        assert_eq!(n.len(), 1, "expired entries make room");
        assert!(n.contains(&addr(3), t0 + Duration::from_secs(31)));
        n.remove(&addr(3));
        assert!(n.is_empty());
    }
}
