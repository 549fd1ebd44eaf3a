//! What the drain costs a connection (criterion), side by side with what a `tokio::sync::watch`
//! channel would cost in its place:
//! - per connection: taking a watcher and registering (then dropping) a `forced()` wait;
//! - per wake-up of a connection's task: polling its pending `forced()` wait again (lock-free)
//!   versus polling a pending `watch::Receiver::changed()` (takes the channel's mutex), on one
//!   thread and with two threads polling at once (two connections on two workers).
//!
//! Run: `cargo bench --bench drain`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::hint::black_box;
use std::pin::pin;
use std::task::{Context, Waker};

use criterion::Criterion;
use l4mesh::drain::Drain;

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let mut c = Criterion::default().configure_from_args();
    let mut cx = Context::from_waker(Waker::noop());
    let drain = Drain::new();
    let signal = drain.signal();

    let mut group = c.benchmark_group("drain per connection");
    group.bench_function("watcher + forced() registered and dropped", |b| {
        b.iter(|| {
            let w = signal.watch();
            let mut f = pin!(signal.forced());
            black_box(f.as_mut().poll(&mut cx).is_pending());
            drop(w);
        })
    });
    group.finish();

    let mut group = c.benchmark_group("drain per wake-up");
    let mut forced = pin!(signal.forced());
    assert!(forced.as_mut().poll(&mut cx).is_pending());
    group.bench_function("poll pending forced()", |b| {
        b.iter(|| black_box(forced.as_mut().poll(&mut cx).is_pending()))
    });
    let (_tx, mut rx) = tokio::sync::watch::channel(false);
    let mut changed = pin!(rx.changed());
    assert!(changed.as_mut().poll(&mut cx).is_pending());
    group.bench_function("poll pending watch::changed()", |b| {
        b.iter(|| black_box(changed.as_mut().poll(&mut cx).is_pending()))
    });
    group.finish();

    // Two threads, each with its own pending wait on the one drain / the one channel; the time
    // is per poll on each thread.
    let mut group = c.benchmark_group("drain per wake-up, 2 threads");
    group.bench_function("poll pending forced()", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let signal = signal.clone();
                move |n| {
                    let mut cx = Context::from_waker(Waker::noop());
                    let mut f = pin!(signal.forced());
                    for _ in 0..n {
                        black_box(f.as_mut().poll(&mut cx).is_pending());
                    }
                }
            })
        })
    });
    let (tx, rx) = tokio::sync::watch::channel(false);
    group.bench_function("poll pending watch::changed()", |b| {
        b.iter_custom(|iters| {
            two_threads(iters, || {
                let mut rx = rx.clone();
                move |n| {
                    let mut cx = Context::from_waker(Waker::noop());
                    let mut f = pin!(rx.changed());
                    for _ in 0..n {
                        black_box(f.as_mut().poll(&mut cx).is_pending());
                    }
                }
            })
        })
    });
    drop(tx);
    group.finish();
    c.final_summary();
}

/// Runs `make()`'s closure on two threads at once with `iters` polls each; the elapsed time.
fn two_threads<F, G>(iters: u64, make: F) -> std::time::Duration
where
    F: Fn() -> G,
    G: FnOnce(u64) + Send + 'static,
{
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(3));
    let threads: Vec<_> = (0..2)
        .map(|_| {
            let (run, barrier) = (make(), barrier.clone());
            std::thread::spawn(move || {
                barrier.wait();
                run(iters);
            })
        })
        .collect();
    barrier.wait();
    let start = std::time::Instant::now();
    for t in threads {
        t.join().unwrap();
    }
    start.elapsed()
}
