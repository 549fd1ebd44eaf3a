//! Exporter wrappers that log failed exports, rate-limited: a collector that is down must neither
//! stop l4mesh nor flood its log with one line per batch. The SDK's own error logging is compiled
//! out (no `internal-logs` feature), so these lines are the only trace of a failing collector.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{LogBatch, LogExporter};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};
use opentelemetry_sdk::Resource;

/// At most one warning per signal this often while exports keep failing.
pub(super) const REPORT_EVERY: Duration = Duration::from_secs(30);

/// What to say about one export result, decided by [`Limiter::observe`].
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Report {
    Nothing,
    /// A failure to log, with how many failed exports were not logged before it.
    Failed {
        suppressed: u64,
    },
    /// Exports work again after `failures` failed ones.
    Recovered {
        failures: u64,
    },
}

/// Rate limiting of failure reports: the first failure is reported at once, later ones at most
/// every `every`, and the first success after failures once.
#[derive(Debug)]
pub(super) struct Limiter {
    every: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    last_report: Option<Instant>,
    suppressed: u64,
    failures: u64,
}

impl Limiter {
    pub(super) fn new(every: Duration) -> Self {
        Self {
            every,
            state: Mutex::default(),
        }
    }

    pub(super) fn observe(&self, ok: bool, now: Instant) -> Report {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            let failures = std::mem::take(&mut s.failures);
            s.suppressed = 0;
            s.last_report = None;
            return if failures > 0 {
                Report::Recovered { failures }
            } else {
                Report::Nothing
            };
        }
        s.failures += 1;
        match s.last_report {
            Some(t) if now.duration_since(t) < self.every => {
                s.suppressed += 1;
                Report::Nothing
            }
            _ => {
                s.last_report = Some(now);
                Report::Failed {
                    suppressed: std::mem::take(&mut s.suppressed),
                }
            }
        }
    }
}

/// Export outcomes of one l4mesh, both signals (for tests and, later, metrics).
#[derive(Debug, Default)]
pub struct ExportCounts {
    /// Batches the collector accepted.
    pub ok: AtomicU64,
    /// Batches that failed (after the exporter's retries) and were dropped.
    pub failed: AtomicU64,
}

/// An exporter whose failures are logged (rate-limited) before the SDK drops the batch.
pub(super) struct Logged<E> {
    inner: E,
    signal: &'static str,
    limiter: Limiter,
    counts: Arc<ExportCounts>,
}

impl<E> Logged<E> {
    pub(super) fn new(inner: E, signal: &'static str, counts: Arc<ExportCounts>) -> Self {
        Self {
            inner,
            signal,
            limiter: Limiter::new(REPORT_EVERY),
            counts,
        }
    }

    fn report(&self, res: &OTelSdkResult, items: usize) {
        let counter = if res.is_ok() {
            &self.counts.ok
        } else {
            &self.counts.failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match self.limiter.observe(res.is_ok(), Instant::now()) {
            Report::Nothing => {}
            Report::Failed { suppressed } => {
                let error = res.as_ref().err().map(ToString::to_string);
                tracing::warn!(
                    signal = self.signal,
                    items,
                    error = error.as_deref(),
                    failed_since_last_report = suppressed,
                    "OTLP export failed; the batch is dropped (next report in {REPORT_EVERY:?} at the earliest)"
                );
            }
            Report::Recovered { failures } => {
                tracing::info!(
                    signal = self.signal,
                    failed_exports = failures,
                    "OTLP export works again"
                );
            }
        }
    }
}

impl<E> fmt::Debug for Logged<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Logged")
            .field("signal", &self.signal)
            .finish_non_exhaustive()
    }
}

impl<E: SpanExporter> SpanExporter for Logged<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len();
        let res = self.inner.export(batch).await;
        self.report(&res, n);
        res
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

impl<E: LogExporter> LogExporter for Logged<E> {
    async fn export(&self, batch: LogBatch<'_>) -> OTelSdkResult {
        let n = batch.iter().count();
        let res = self.inner.export(batch).await;
        self.report(&res, n);
        res
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}
