//! Caps on the connections a listener holds, so that no peer — a flood, a slowloris, a leaking
//! client — can take every file descriptor of the process and with it the other listeners, the
//! control-plane connection and the admin API.
//!
//! Each listener has one [`Limiter`]: a cap on its open connections and, optionally, on the open
//! connections of one source address. An accepted connection takes a [`Permit`] before anything
//! else; a connection over a cap is closed at once, counted (by listener and reason, exported as
//! `l4mesh_connections_refused_total`) and logged at most once per [`LOG_EVERY`] per listener with
//! the number refused since. Admission is two atomic operations when the per-source cap is off
//! (the default), plus one sharded-map entry when it is on. Nothing here reads from a socket.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often, at most, a listener logs that it refused connections.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Why a connection was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The listener holds its maximum of connections.
    ListenerLimit,
    /// The connection's source address holds its maximum of this listener's connections.
    SourceLimit,
}

impl Refusal {
    /// The `reason` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::ListenerLimit => "listener_limit",
            Refusal::SourceLimit => "source_limit",
        }
    }
}

/// The caps of one listener; 0 is "no cap".
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Caps {
    pub max_connections: usize,
    pub max_per_source: usize,
}

/// The open connections of one listener and its caps.
#[derive(Debug)]
pub struct Limiter {
    name: &'static str,
    caps: Caps,
    open: AtomicUsize,
    /// Open connections per source address (only kept when `max_per_source` is set).
    sources: dashmap::DashMap<IpAddr, usize>,
    refused_listener: AtomicU64,
    refused_source: AtomicU64,
    /// `accept` calls that failed (out of descriptors, most often); the loop pauses and goes on.
    accept_errors: AtomicU64,
    /// Refusals not yet logged, and when the last log line was written.
    unlogged: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

impl Limiter {
    /// A limiter for the listener `name` (the `listener` label).
    pub fn new(name: &'static str, caps: Caps) -> Arc<Self> {
        Arc::new(Self {
            name,
            caps,
            open: AtomicUsize::new(0),
            sources: dashmap::DashMap::new(),
            refused_listener: AtomicU64::new(0),
            refused_source: AtomicU64::new(0),
            accept_errors: AtomicU64::new(0),
            unlogged: AtomicU64::new(0),
            last_log: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Connections this listener holds now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused so far for `reason`.
    pub fn refused(&self, reason: Refusal) -> u64 {
        match reason {
            Refusal::ListenerLimit => self.refused_listener.load(Ordering::Relaxed),
            Refusal::SourceLimit => self.refused_source.load(Ordering::Relaxed),
        }
    }

    /// Counts a failed `accept` (the caller logs it and retries after a pause).
    pub fn accept_failed(&self) {
        self.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// Failed `accept` calls so far.
    pub fn accept_errors(&self) -> u64 {
        self.accept_errors.load(Ordering::Relaxed)
    }

    /// Takes a place for a connection from `src`, or refuses it (counted and logged). The place
    /// is given back when the permit drops.
    pub fn admit(self: &Arc<Self>, src: IpAddr) -> Result<Permit, Refusal> {
        let max = self.caps.max_connections;
        let before = self.open.fetch_add(1, Ordering::AcqRel);
        if max != 0 && before >= max {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(self.refuse(Refusal::ListenerLimit, src));
        }
        let per = self.caps.max_per_source;
        let source = if per == 0 {
            None
        } else {
            let mut n = self.sources.entry(src).or_insert(0);
            if *n >= per {
                drop(n);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(self.refuse(Refusal::SourceLimit, src));
            }
            *n += 1;
            Some(src)
        };
        Ok(Permit {
            limiter: self.clone(),
            source,
        })
    }

    fn refuse(&self, reason: Refusal, src: IpAddr) -> Refusal {
        match reason {
            Refusal::ListenerLimit => &self.refused_listener,
            Refusal::SourceLimit => &self.refused_source,
        }
        .fetch_add(1, Ordering::Relaxed);
        let unlogged = self.unlogged.fetch_add(1, Ordering::Relaxed) + 1;
        let now = Instant::now();
        // A refusal that cannot take the lock is counted for the next line.
        if let Ok(mut last) = self.last_log.try_lock() {
            if last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) {
                *last = Some(now);
                self.unlogged.fetch_sub(unlogged, Ordering::Relaxed);
                tracing::warn!(
                    listener = self.name,
                    reason = reason.as_str(),
                    %src,
                    refused = unlogged,
                    max_connections = self.caps.max_connections,
                    max_per_source = self.caps.max_per_source,
                    "refusing connections over the listener's cap (closed at once; see l4mesh_connections_refused_total, and the caps in the configuration)"
                );
            }
        }
        reason
    }

    fn release(&self, source: Option<IpAddr>) {
        if let Some(src) = source {
            // Removing the entry at zero keeps the map as small as the sources holding
            // connections now.
            self.sources.remove_if_mut(&src, |_, n| {
                *n = n.saturating_sub(1);
                *n == 0
            });
        }
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A connection's place in its listener; dropping it frees the place.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    source: Option<IpAddr>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limiter.release(self.source);
    }
}

/// Every limiter of one l4mesh, for the metrics and the config dump.
#[derive(Debug, Default)]
pub struct Registry(Mutex<Vec<Arc<Limiter>>>);

impl Registry {
    /// A limiter for `name`, registered.
    pub fn limiter(&self, name: &'static str, caps: Caps) -> Arc<Limiter> {
        let l = Limiter::new(name, caps);
        if let Ok(mut v) = self.0.lock() {
            v.push(l.clone());
        }
        l
    }

    /// The registered limiters, in registration order.
    pub fn all(&self) -> Vec<Arc<Limiter>> {
        self.0.lock().map(|v| v.clone()).unwrap_or_default()
    }
}

/// The soft limit on open files after raising it to the hard limit, as ztunnel does at start: a
/// node proxy's connections are its descriptors, and the usual soft default (1024) would cap it
/// far below what the kernel allows. Returns the limit in force.
pub fn raise_nofile() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let lim = getrlimit(Resource::Nofile);
    if let (Some(cur), Some(max)) = (lim.current, lim.maximum) {
        if cur < max {
            let raised = rustix::process::Rlimit {
                current: Some(max),
                maximum: Some(max),
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => {
                    tracing::info!(from = cur, to = max, "raised the open-file limit");
                    return max;
                }
                Err(e) => {
                    tracing::info!(limit = cur, hard = max, error = %e, "could not raise the open-file limit")
                }
            }
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

/// The default cap of one data-path listener: a quarter of the open-file limit (a proxied
/// connection holds two descriptors or more, and several listeners share the limit), so that a
/// flood on one listener leaves descriptors for the others and for the control plane.
pub fn default_max_connections(nofile: u64) -> usize {
    usize::try_from(nofile / 4).unwrap_or(usize::MAX).max(64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn listener_cap_refuses_over_the_max_and_frees_on_drop() {
        let l = Limiter::new(
            "t",
            Caps {
                max_connections: 2,
                max_per_source: 0,
            },
        );
        let a = l.admit(ip("10.0.0.1")).unwrap();
        let _b = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.3")).unwrap_err(), Refusal::ListenerLimit);
        assert_eq!(l.open(), 2);
        assert_eq!(l.refused(Refusal::ListenerLimit), 1);
        drop(a);
        assert_eq!(l.open(), 1);
        let _c = l.admit(ip("10.0.0.3")).unwrap();
        // No per-source bookkeeping when that cap is off.
        assert!(l.sources.is_empty());
    }

    #[test]
    fn source_cap_is_per_address_and_the_map_shrinks() {
        let l = Limiter::new(
            "t",
            Caps {
                max_connections: 0,
                max_per_source: 2,
            },
        );
        let a1 = l.admit(ip("10.0.0.1")).unwrap();
        let a2 = l.admit(ip("10.0.0.1")).unwrap();
        assert_eq!(l.admit(ip("10.0.0.1")).unwrap_err(), Refusal::SourceLimit);
        let b = l.admit(ip("10.0.0.2")).unwrap();
        assert_eq!(l.open(), 3);
        assert_eq!(l.refused(Refusal::SourceLimit), 1);
        drop((a1, a2, b));
        assert_eq!(l.open(), 0);
        assert!(l.sources.is_empty(), "{:?}", l.sources);
    }

    #[test]
    fn no_cap_admits_everything() {
        let l = Limiter::new(
            "t",
            Caps {
                max_connections: 0,
                max_per_source: 0,
            },
        );
        let permits: Vec<_> = (0..1000)
            .map(|_| l.admit(ip("10.0.0.1")).unwrap())
            .collect();
        assert_eq!(l.open(), 1000);
        drop(permits);
        assert_eq!(l.open(), 0);
    }

    #[test]
    fn default_cap_is_a_quarter_of_the_descriptors() {
        assert_eq!(default_max_connections(1 << 20), 1 << 18);
        assert_eq!(default_max_connections(100), 64);
    }
}
