//! On-demand DNS for destinations known by hostname only: a service endpoint whose workload has
//! a `hostname` and no address (a DNS-resolution ServiceEntry) is resolved when a connection
//! picks it, through the same upstream resolvers (and marked sockets) as the DNS proxy's
//! forwarder, as ztunnel resolves them with its system resolver.
//!
//! Answers are cached by their TTL (clamped to [`MIN_TTL`]..[`MAX_TTL`]); a name without
//! addresses is remembered for [`NEGATIVE_TTL`], so that a stream of connections to it does not
//! become a stream of queries. At most [`MAX_ENTRIES`] names are held. A resolver that fails
//! (no answer, SERVFAIL) is not cached: the next connection asks again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use rand::seq::IndexedRandom;

use super::forward::{ForwardError, Upstreams};

/// The shortest time an answer is kept (a TTL of 0 would mean a query per connection).
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// The longest time an answer is kept, whatever its TTL.
pub const MAX_TTL: Duration = Duration::from_secs(300);
/// How long a name without addresses (NXDOMAIN, no A/AAAA) is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(30);
/// Names held at most (hickory's cache size in ztunnel).
pub const MAX_ENTRIES: usize = 4096;

/// Why a hostname gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{host:?} is not a valid DNS name")]
    InvalidName { host: String },
    #[error("{host} has no address (the resolvers answered, with no A or AAAA record)")]
    NoAddress { host: String },
    #[error("resolving {host}: {cause}")]
    Upstream { host: String, cause: ForwardError },
    #[error("resolving {host}: the resolver answered {rcode}")]
    Rcode { host: String, rcode: ResponseCode },
}

struct Entry {
    addrs: Arc<[IpAddr]>,
    until: Instant,
}

/// Resolves hostnames with a TTL cache.
pub struct HostResolver {
    upstreams: Upstreams,
    cache: Mutex<HashMap<String, Entry>>,
}

impl HostResolver {
    pub fn new(upstreams: Upstreams) -> HostResolver {
        HostResolver {
            upstreams,
            cache: Mutex::default(),
        }
    }

    /// One address of `host` for a connection: of `like`'s family when it has one (the family
    /// the client dialled), else any; chosen at random among them.
    pub async fn pick(&self, host: &str, like: IpAddr) -> Result<IpAddr, ResolveError> {
        let addrs = self.resolve(host).await?;
        let same: Vec<IpAddr> = addrs
            .iter()
            .copied()
            .filter(|a| a.is_ipv4() == like.is_ipv4())
            .collect();
        let pool = if same.is_empty() { &addrs[..] } else { &same };
        pool.choose(&mut rand::rng())
            .copied()
            .ok_or_else(|| ResolveError::NoAddress {
                host: host.to_owned(),
            })
    }

    /// Every address of `host` (A and AAAA), from the cache while it is fresh.
    pub async fn resolve(&self, host: &str) -> Result<Arc<[IpAddr]>, ResolveError> {
        let key = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(addrs) = self.cached(&key) {
            return if addrs.is_empty() {
                Err(ResolveError::NoAddress { host: key })
            } else {
                Ok(addrs)
            };
        }
        let name = Name::from_ascii(format!("{key}."))
            .map_err(|_| ResolveError::InvalidName { host: key.clone() })?;
        let (v4, v6) = tokio::join!(
            self.query(&key, &name, RecordType::A),
            self.query(&key, &name, RecordType::AAAA)
        );
        // One family failing is fine when the other gave addresses; with none, the failure is
        // the answer (and not remembered as "no address").
        let (addrs, ttl) = match (v4, v6) {
            (Err(e), Err(_)) => return Err(e),
            (Err(e), Ok((found, _))) | (Ok((found, _)), Err(e)) if found.is_empty() => {
                return Err(e)
            }
            (a, b) => {
                let answered: Vec<_> = [a, b].into_iter().flatten().collect();
                let ttl = answered.iter().filter_map(|(_, t)| *t).min();
                (
                    answered
                        .into_iter()
                        .flat_map(|(found, _)| found)
                        .collect::<Vec<_>>(),
                    ttl,
                )
            }
        };
        let keep = match ttl {
            _ if addrs.is_empty() => NEGATIVE_TTL,
            Some(t) => Duration::from_secs(u64::from(t)).clamp(MIN_TTL, MAX_TTL),
            None => MIN_TTL,
        };
        let addrs: Arc<[IpAddr]> = addrs.into();
        self.store(key.clone(), addrs.clone(), keep);
        if addrs.is_empty() {
            return Err(ResolveError::NoAddress { host: key });
        }
        Ok(addrs)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn cached(&self, key: &str) -> Option<Arc<[IpAddr]>> {
        let cache = self.lock();
        let e = cache.get(key)?;
        (e.until > Instant::now()).then(|| e.addrs.clone())
    }

    fn store(&self, key: String, addrs: Arc<[IpAddr]>, keep: Duration) {
        let now = Instant::now();
        let mut cache = self.lock();
        if cache.len() >= MAX_ENTRIES && !cache.contains_key(&key) {
            cache.retain(|_, e| e.until > now);
            // Still full of fresh names: one goes (any; the cache only saves queries).
            if cache.len() >= MAX_ENTRIES {
                if let Some(k) = cache.keys().next().cloned() {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(
            key,
            Entry {
                addrs,
                until: now + keep,
            },
        );
    }

    /// The addresses of one type and their smallest TTL; NXDOMAIN is "none".
    async fn query(
        &self,
        host: &str,
        name: &Name,
        t: RecordType,
    ) -> Result<(Vec<IpAddr>, Option<u32>), ResolveError> {
        let mut m = Message::new();
        m.set_id(rand::random())
            .set_recursion_desired(true)
            .add_query(Query::query(name.clone(), t));
        let request = m.to_vec().map_err(|_| ResolveError::InvalidName {
            host: host.to_owned(),
        })?;
        let bytes =
            self.upstreams
                .exchange(&request)
                .await
                .map_err(|cause| ResolveError::Upstream {
                    host: host.to_owned(),
                    cause,
                })?;
        let answer = Message::from_vec(&bytes).map_err(|e| ResolveError::Upstream {
            host: host.to_owned(),
            cause: ForwardError::Failed(format!("an answer that does not parse: {e}")),
        })?;
        match answer.response_code() {
            ResponseCode::NoError => {}
            ResponseCode::NXDomain => return Ok((Vec::new(), None)),
            rcode => {
                return Err(ResolveError::Rcode {
                    host: host.to_owned(),
                    rcode,
                })
            }
        }
        let mut ttl = None::<u32>;
        let addrs = answer
            .answers()
            .iter()
            .filter_map(|r| {
                let ip = match r.data() {
                    RData::A(a) if t == RecordType::A => IpAddr::V4(a.0),
                    RData::AAAA(a) if t == RecordType::AAAA => IpAddr::V6(a.0),
                    _ => return None,
                };
                ttl = Some(ttl.map_or(r.ttl(), |x| x.min(r.ttl())));
                Some(ip)
            })
            .collect();
        Ok((addrs, ttl))
    }
}

#[cfg(test)]
mod tests;
