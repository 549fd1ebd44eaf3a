//! Graceful shutdown as a building block: a [`Drain`] starts the drain; listeners and connection
//! tasks observe it through a [`Signal`]; every connection holds a [`Watcher`] while it lives, so
//! that [`Drain::drain`] can wait until all of them are gone or a deadline passes, then tell the
//! rest to close ([`Signal::forced`]) and wait a short grace for them.
//!
//! Three phases, only ever moving forward: running → draining (listeners stop accepting, HBONE
//! servers send GOAWAY, readiness says "draining") → forced (copies stop, sockets close).
//!
//! Cost on the data path: holding a `Watcher` is one atomic increment and one decrement. Awaiting
//! [`Signal::draining`] or [`Signal::forced`] registers a waker once (one short section under one
//! of [`SHARDS`] mutexes, so that connections on different threads rarely meet) and deregisters it
//! on drop; every later poll is lock-free (an atomic load and an `AtomicWaker` update), so a copy
//! loop that selects on `forced()` pays no lock per wake-up or per byte. (A `tokio::sync::watch`
//! or `Notify` takes its mutex on every poll of a pending wait, one mutex shared by every
//! connection.)
//!
//! Does not: close sockets itself, know about listeners or HTTP/2, or choose the deadline.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use atomic_waker::AtomicWaker;
use tokio::sync::Notify;

const RUNNING: u8 = 0;
const DRAINING: u8 = 1;
const FORCED: u8 = 2;

/// Waker registries; a future's shard is its id modulo this.
const SHARDS: usize = 16;

struct Shared {
    phase: AtomicU8,
    /// Wakers of pending [`Phase`] futures, registered once per future.
    waiters: [Mutex<Waiters>; SHARDS],
    next_waiter: AtomicU64,
    /// Live [`Watcher`]s of every kind: the drain is idle when none is left.
    live: AtomicUsize,
    /// Live counted watchers: the connections (HBONE: tunnels) that reports and logs count.
    conns: AtomicUsize,
    /// Notified when `live` drops to zero while draining.
    idle: Notify,
}

#[derive(Default)]
struct Waiters {
    wakers: HashMap<u64, Arc<AtomicWaker>>,
}

impl Shared {
    fn waiters(&self, id: u64) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiters[(id % SHARDS as u64) as usize]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Starts the drain and waits for it; held by the composition root (and the admin server's
/// `/quitquitquit`). Clones share one drain.
#[derive(Clone)]
pub struct Drain {
    shared: Arc<Shared>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

/// What a drain ended with. Counts are connections as a client sees them: a proxied TCP
/// connection, or one HBONE tunnel (the TLS connection carrying tunnels is not counted again).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// From the start of the drain to its end.
    pub elapsed: Duration,
    /// Connections still open at the deadline, told to close.
    pub forced: usize,
    /// Connections still open after the grace that followed (closed by the process exit).
    pub left: usize,
}

impl Drain {
    pub fn new() -> Self {
        Self {
            shared: Arc::new(Shared {
                phase: AtomicU8::new(RUNNING),
                waiters: std::array::from_fn(|_| Mutex::new(Waiters::default())),
                next_waiter: AtomicU64::new(0),
                live: AtomicUsize::new(0),
                conns: AtomicUsize::new(0),
                idle: Notify::new(),
            }),
        }
    }

    /// What listeners and connections observe.
    pub fn signal(&self) -> Signal {
        Signal {
            shared: self.shared.clone(),
        }
    }

    /// Starts draining; returns whether this call started it (later calls do nothing).
    pub fn start(&self) -> bool {
        self.advance(DRAINING)
    }

    /// Connections (counted watchers) still open.
    pub fn live(&self) -> usize {
        self.shared.conns.load(SeqCst)
    }

    /// Watchers of every kind still held: the drain waits for this to reach zero.
    fn holders(&self) -> usize {
        self.shared.live.load(SeqCst)
    }

    fn advance(&self, to: u8) -> bool {
        let prev = self.shared.phase.fetch_max(to, SeqCst);
        if prev >= to {
            return false;
        }
        for shard in 0..SHARDS as u64 {
            let wakers: Vec<_> = self
                .shared
                .waiters(shard)
                .wakers
                .values()
                .cloned()
                .collect();
            for w in wakers {
                w.wake();
            }
        }
        true
    }

    /// Starts the drain (if not started) and waits until every watcher is gone or `deadline`
    /// passed; then forces the rest to close and waits up to `grace` for them.
    pub async fn drain(&self, deadline: Duration, grace: Duration) -> DrainReport {
        let started = Instant::now();
        self.start();
        if self.wait_idle(deadline).await {
            return DrainReport {
                elapsed: started.elapsed(),
                forced: 0,
                left: 0,
            };
        }
        let forced = self.live();
        self.advance(FORCED);
        self.wait_idle(grace).await;
        DrainReport {
            elapsed: started.elapsed(),
            forced,
            left: self.live(),
        }
    }

    /// Whether the watchers were all gone within `limit`.
    async fn wait_idle(&self, limit: Duration) -> bool {
        let until = tokio::time::Instant::now() + limit;
        loop {
            // Created before the check: a drop to zero after the check still wakes it.
            let notified = self.shared.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.holders() == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.holders() == 0;
            }
        }
    }
}

/// A view of the drain: whether it started, futures for its phases, and new watchers.
#[derive(Clone)]
pub struct Signal {
    shared: Arc<Shared>,
}

impl Signal {
    pub fn is_draining(&self) -> bool {
        self.shared.phase.load(SeqCst) >= DRAINING
    }

    /// Whether the deadline passed: a connection failing now was most likely closed by the drain.
    pub fn is_forced(&self) -> bool {
        self.shared.phase.load(SeqCst) >= FORCED
    }

    /// Resolves once the drain started (listeners stop accepting, HTTP/2 servers send GOAWAY).
    pub fn draining(&self) -> Phase<'_> {
        Phase::new(&self.shared, DRAINING)
    }

    /// Resolves once the deadline passed: the connections still open must close now.
    pub fn forced(&self) -> Phase<'_> {
        Phase::new(&self.shared, FORCED)
    }

    /// Counts a connection until the returned watcher is dropped.
    pub fn watch(&self) -> Watcher {
        Watcher::new(self.shared.clone(), true)
    }

    /// Keeps the drain from ending until dropped, without counting as a connection: held by a
    /// listener's accept loop (so that a connection accepted as the drain starts is watched
    /// before the drain can see nothing open) and by tasks that only carry connections.
    pub fn hold(&self) -> Watcher {
        Watcher::new(self.shared.clone(), false)
    }
}

/// Held by a connection task for its whole life; the drain waits for every one to be dropped.
pub struct Watcher {
    shared: Arc<Shared>,
    /// Whether it counts as a connection ([`Signal::watch`]) or only holds the drain.
    counted: bool,
}

impl Watcher {
    fn new(shared: Arc<Shared>, counted: bool) -> Self {
        shared.live.fetch_add(1, SeqCst);
        if counted {
            shared.conns.fetch_add(1, SeqCst);
        }
        Self { shared, counted }
    }

    /// Stops counting this watcher as a connection while it still holds the drain: an HBONE TLS
    /// connection, once established, only carries tunnels, which are counted themselves.
    pub fn uncount(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.shared.conns.fetch_sub(1, SeqCst);
        }
    }
}

impl Clone for Watcher {
    fn clone(&self) -> Self {
        Self::new(self.shared.clone(), self.counted)
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        if self.counted {
            self.shared.conns.fetch_sub(1, SeqCst);
        }
        // Only the last watcher of a drain pays for the notification (which takes a lock).
        if self.shared.live.fetch_sub(1, SeqCst) == 1 && self.shared.phase.load(SeqCst) >= DRAINING
        {
            self.shared.idle.notify_waiters();
        }
    }
}

/// A future resolving when the drain reaches a phase. Registers its waker on first poll only.
pub struct Phase<'a> {
    shared: &'a Shared,
    target: u8,
    slot: Option<(u64, Arc<AtomicWaker>)>,
}

impl<'a> Phase<'a> {
    fn new(shared: &'a Shared, target: u8) -> Self {
        Self {
            shared,
            target,
            slot: None,
        }
    }

    fn reached(&self) -> bool {
        self.shared.phase.load(SeqCst) >= self.target
    }
}

impl Future for Phase<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.reached() {
            return Poll::Ready(());
        }
        match &self.slot {
            Some((_, w)) => w.register(cx.waker()),
            None => {
                let w = Arc::new(AtomicWaker::new());
                w.register(cx.waker());
                let id = self.shared.next_waiter.fetch_add(1, SeqCst);
                self.shared.waiters(id).wakers.insert(id, w.clone());
                self.slot = Some((id, w));
            }
        }
        // Checked again after registering: an advance in between has either seen the waker or
        // is visible here.
        if self.reached() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl Drop for Phase<'_> {
    fn drop(&mut self) {
        if let Some((id, _)) = self.slot.take() {
            self.shared.waiters(id).wakers.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(d: &Drain) -> usize {
        (0..SHARDS as u64)
            .map(|s| d.shared.waiters(s).wakers.len())
            .sum()
    }

    #[tokio::test]
    async fn drain_ends_when_the_last_watcher_goes() {
        let d = Drain::new();
        let s = d.signal();
        let w = s.watch();
        let w2 = w.clone();
        assert_eq!(d.live(), 2);
        assert!(!s.is_draining());
        let conn = tokio::spawn(async move {
            let _w = w2;
            tokio::time::sleep(Duration::from_millis(100)).await;
        });
        drop(w);
        let r = d
            .drain(Duration::from_secs(5), Duration::from_secs(1))
            .await;
        assert!(s.is_draining());
        assert_eq!((r.forced, r.left), (0, 0));
        assert!(r.elapsed >= Duration::from_millis(90), "{r:?}");
        assert!(r.elapsed < Duration::from_secs(2), "{r:?}");
        conn.await.unwrap();
    }

    #[tokio::test]
    async fn deadline_forces_the_rest() {
        let d = Drain::new();
        let s = d.signal();
        // One connection ends when forced; one ignores it.
        let obedient = s.watch();
        let stubborn = s.watch();
        let s2 = s.clone();
        let conn = tokio::spawn(async move {
            let _w = obedient;
            s2.forced().await;
        });
        let r = d
            .drain(Duration::from_millis(100), Duration::from_millis(200))
            .await;
        assert_eq!(r.forced, 2);
        assert_eq!(r.left, 1);
        conn.await.unwrap();
        drop(stubborn);
        assert_eq!(d.live(), 0);
    }

    #[tokio::test]
    async fn holds_keep_the_drain_open_but_are_not_connections() {
        let d = Drain::new();
        let s = d.signal();
        let hold = s.hold();
        // A tunnel carrier: counted while it is a plain connection, then only a holder.
        let mut carrier = s.watch();
        let tunnel = s.watch();
        assert_eq!(d.live(), 2);
        carrier.uncount();
        carrier.uncount();
        assert_eq!(d.live(), 1, "uncount is idempotent");
        let s2 = s.clone();
        let conns = tokio::spawn(async move {
            let (_c, _t) = (carrier, tunnel);
            s2.forced().await;
        });
        assert!(!s.is_forced());
        let r = d
            .drain(Duration::from_millis(100), Duration::from_millis(200))
            .await;
        assert!(s.is_forced());
        assert_eq!(
            (r.forced, r.left),
            (1, 0),
            "the tunnel, not its carrier nor the hold"
        );
        conns.await.unwrap();
        drop(hold);
        assert_eq!(d.holders(), 0);

        // A hold alone keeps the drain from ending early.
        let d = Drain::new();
        let hold = d.signal().hold();
        assert_eq!(d.live(), 0);
        let released = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(hold);
        });
        let r = d.drain(Duration::from_secs(5), Duration::ZERO).await;
        assert!(r.elapsed >= Duration::from_millis(90), "{r:?}");
        assert_eq!((r.forced, r.left), (0, 0));
        released.await.unwrap();
    }

    #[tokio::test]
    async fn phase_futures_wake_and_deregister() {
        let d = Drain::new();
        let s = d.signal();
        // More waiters than shards: every one is woken.
        let waiting: Vec<_> = (0..40)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move { s.draining().await })
            })
            .collect();
        // Polled once (registered), then woken by the start.
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(registered(&d), 40);
        assert!(d.start());
        assert!(!d.start(), "a second start does nothing");
        for w in waiting {
            tokio::time::timeout(Duration::from_secs(1), w)
                .await
                .unwrap()
                .unwrap();
        }
        assert_eq!(registered(&d), 0);
        // Already reached: resolves at once, without registering.
        s.draining().await;
        assert_eq!(registered(&d), 0);
    }
}
