//! OpenTelemetry export: connection spans and access-log records over OTLP gRPC, off by default.
//!
//! Not global on purpose: one [`Otel`] per started l4mesh, held by `app` and reached through the
//! proxy context, so that two nodes in one process export with their own resource
//! (`service.instance.id` / `k8s.node.name`). When OTel is off there is no `Otel` at all and the
//! data path pays one `Option` check per connection — no `tracing` layer sees every event.
//!
//! Export is batched on the SDK's background threads: the data path only pushes finished spans and
//! records into bounded queues (full queue = dropped, never a wait); the gRPC channel itself runs
//! on the runtime current when [`Otel::new`] runs (the binary: the operators'). Export failures are logged,
//! rate-limited, by [`export`]'s wrappers. [`Otel::shutdown`] flushes what is queued.
//!
//! This module knows nothing of connections: the proxy hands it names, attributes and the parent
//! `traceparent` header (`proxy::trace` maps a connection's access-log fields onto it).

mod export;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::logs::{AnyValue, LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanKind, Status, TraceContextExt as _, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, InstrumentationScope, KeyValue};
use opentelemetry_otlp::WithTonicConfig as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::logs::{BatchLogProcessor, SdkLogger, SdkLoggerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, ParentBasedSampler, Sampler, SdkTracer, SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tonic::transport::{Channel, Endpoint};

pub use export::ExportCounts;
pub use opentelemetry::trace::{SpanId, TraceId};

/// How long [`Otel::shutdown`] waits, in all, for the queued spans and records to be exported
/// (both signals at once). It runs after the drain deadline, inside Kubernetes' grace period
/// (`terminationGracePeriodSeconds`, which should exceed the deadline by more than this): what a
/// collector cannot take in 2 s is dropped rather than risking a SIGKILL.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// OTel settings, by the standard OTel environment names (`Config::otel`; `None` = off).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct OtelSettings {
    /// OTLP gRPC collector, `http://host:4317` or `https://…` (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub endpoint: String,
    /// Share of new traces recorded, in [0, 1] (`OTEL_TRACES_SAMPLER_ARG`); a connection that
    /// arrives with a sampled `traceparent` is recorded whatever the ratio ([`sampler`]).
    pub sampler_ratio: f64,
    /// `service.name` of the resource (`OTEL_SERVICE_NAME`).
    pub service_name: String,
    /// How long finished spans and records wait to be sent in one batch (`OTEL_BSP_SCHEDULE_DELAY`).
    #[serde(serialize_with = "serialize_duration")]
    pub schedule_delay: Duration,
    /// PEM file of the roots that verify an `https` collector (`OTEL_EXPORTER_OTLP_CERTIFICATE`);
    /// `None`: the system's roots.
    pub certificate: Option<PathBuf>,
}

impl OtelSettings {
    /// Settings for `endpoint` with the defaults of a deployment: every new trace sampled,
    /// `service.name=l4mesh`, batches every 5 s.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            sampler_ratio: 1.0,
            service_name: "l4mesh".into(),
            schedule_delay: Duration::from_secs(5),
            certificate: None,
        }
    }

    /// Checks what the exporter would otherwise refuse (or silently misuse) at startup.
    pub fn validate(&self) -> Result<(), SettingsError> {
        let bad = |reason: &str| SettingsError::Endpoint {
            endpoint: self.endpoint.clone(),
            reason: reason.into(),
        };
        let uri: http::Uri = self
            .endpoint
            .parse()
            .map_err(|e: http::uri::InvalidUri| bad(&e.to_string()))?;
        match uri.scheme_str() {
            Some("http") if self.certificate.is_some() => {
                return Err(SettingsError::CertificateWithoutTls(self.endpoint.clone()))
            }
            Some("http") | Some("https") => {}
            Some(other) => return Err(bad(&format!("scheme {other:?} is not http or https"))),
            None => return Err(bad("no scheme")),
        }
        if uri.host().is_none_or(str::is_empty) {
            return Err(bad("no host"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("a path: OTLP gRPC endpoints are host and port only"));
        }
        if !(0.0..=1.0).contains(&self.sampler_ratio) {
            return Err(SettingsError::Ratio(self.sampler_ratio));
        }
        if self.service_name.trim().is_empty() {
            return Err(SettingsError::ServiceName);
        }
        if self.schedule_delay.is_zero() {
            return Err(SettingsError::Delay);
        }
        Ok(())
    }
}

/// As `model::serialize_duration` (`"5s"`), which this basic module may not import.
fn serialize_duration<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{d:?}"))
}

/// Why the OTel settings cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SettingsError {
    #[error(
        "OTEL_EXPORTER_OTLP_ENDPOINT must be http(s)://host[:port], found {endpoint:?}: {reason}"
    )]
    Endpoint { endpoint: String, reason: String },
    #[error("OTEL_TRACES_SAMPLER_ARG must be a ratio between 0 and 1, found {0}")]
    Ratio(f64),
    #[error("OTEL_SERVICE_NAME must not be empty")]
    ServiceName,
    #[error("OTEL_BSP_SCHEDULE_DELAY must be at least 1 ms, found 0")]
    Delay,
    #[error("OTEL_EXPORTER_OTLP_CERTIFICATE is set but the endpoint {0:?} is not https://; expected an https endpoint or no certificate")]
    CertificateWithoutTls(String),
}

/// Why the exporters could not be built.
#[derive(Debug, thiserror::Error)]
pub enum OtelError {
    #[error("invalid OTel settings: {0}")]
    Settings(#[from] SettingsError),
    #[error("reading OTEL_EXPORTER_OTLP_CERTIFICATE {path:?} (expected a PEM file of CA certificates): {error}")]
    Certificate {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("building the OTLP {signal} exporter for {endpoint}: {reason}")]
    Exporter {
        signal: &'static str,
        endpoint: String,
        reason: String,
    },
}

/// One l4mesh's tracer and logger, with their exporters.
pub struct Otel {
    tracer: SdkTracer,
    logger: SdkLogger,
    traces: SdkTracerProvider,
    logs: SdkLoggerProvider,
    shut: AtomicBool,
    counts: Arc<ExportCounts>,
}

impl std::fmt::Debug for Otel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Otel").finish_non_exhaustive()
    }
}

impl Otel {
    /// Builds the exporters for `node` (its resource names it). Must run inside a tokio runtime:
    /// the gRPC channel's worker is spawned on it, and every export goes through that runtime
    /// (the binary enters the operators' runtime for this, keeping export off the data plane).
    /// Nothing is dialled until the first export.
    ///
    /// `connect` makes the channel from the configured endpoint: the composition root passes one
    /// that marks the sockets with `PACKET_MARK` (`control_plane::lazy_channel`), so that a
    /// captured pod's capture rules do not redirect its own telemetry; this basic module cannot
    /// know about marks. Both signals share the channel (one HTTP/2 connection).
    pub fn new(
        settings: &OtelSettings,
        node: &str,
        connect: impl FnOnce(&Endpoint) -> Channel,
    ) -> Result<Arc<Self>, OtelError> {
        settings.validate()?;
        let built = |signal| {
            move |e: opentelemetry_otlp::ExporterBuildError| OtelError::Exporter {
                signal,
                endpoint: settings.endpoint.clone(),
                reason: e.to_string(),
            }
        };
        let channel = connect(&endpoint(settings)?);
        let span_exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_channel(channel.clone());
        let log_exporter = opentelemetry_otlp::LogExporter::builder()
            .with_tonic()
            .with_channel(channel);
        let span_exporter = span_exporter.build().map_err(built("traces"))?;
        let log_exporter = log_exporter.build().map_err(built("logs"))?;
        let resource = resource(settings, node);
        let counts = Arc::new(ExportCounts::default());
        let spans = BatchSpanProcessor::builder(export::Logged::new(
            span_exporter,
            "traces",
            counts.clone(),
        ))
        .with_batch_config(
            opentelemetry_sdk::trace::BatchConfigBuilder::default()
                .with_scheduled_delay(settings.schedule_delay)
                .build(),
        )
        .build();
        let traces = SdkTracerProvider::builder()
            .with_span_processor(spans)
            .with_sampler(sampler(settings.sampler_ratio))
            .with_resource(resource.clone())
            .build();
        let records =
            BatchLogProcessor::builder(export::Logged::new(log_exporter, "logs", counts.clone()))
                .with_batch_config(
                    opentelemetry_sdk::logs::BatchConfigBuilder::default()
                        .with_scheduled_delay(settings.schedule_delay)
                        .build(),
                )
                .build();
        let logs = SdkLoggerProvider::builder()
            .with_log_processor(records)
            .with_resource(resource)
            .build();
        let scope = InstrumentationScope::builder("l4mesh")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        tracing::info!(
            endpoint = %settings.endpoint,
            sampler_ratio = settings.sampler_ratio,
            service_name = %settings.service_name,
            "exporting connection spans and access-log records over OTLP gRPC"
        );
        Ok(Arc::new(Self {
            tracer: traces.tracer_with_scope(scope.clone()),
            logger: logs.logger_with_scope(scope),
            traces,
            logs,
            shut: AtomicBool::new(false),
            counts,
        }))
    }

    /// Starts a connection's span: a child of the `traceparent` in `parent` when it carries a
    /// valid one (the caller's sampling decision is kept), else a new trace.
    pub fn start(
        self: &Arc<Self>,
        name: &'static str,
        kind: SpanKind,
        parent: Option<&http::HeaderMap>,
        attributes: Vec<KeyValue>,
    ) -> ConnTrace {
        let parent_cx = match parent.and_then(remote_parent) {
            Some(sc) => Context::new().with_remote_span_context(sc),
            None => Context::new(),
        };
        let span = self
            .tracer
            .span_builder(name)
            .with_kind(kind)
            .with_attributes(attributes.clone())
            .start_with_context(&self.tracer, &parent_cx);
        let cx = parent_cx.with_span(span);
        cx.span().add_event("accepted", Vec::new());
        ConnTrace {
            cx,
            otel: self.clone(),
            start_attributes: attributes,
        }
    }

    /// How many export batches succeeded and failed so far (traces and logs together).
    pub fn exports(&self) -> &ExportCounts {
        &self.counts
    }

    /// Exports everything queued so far and waits for it (bounded by the exporter's timeout).
    /// Runs the SDK's blocking flush on a blocking thread, so it can be awaited on any runtime.
    pub async fn flush(&self) {
        let (traces, logs) = (self.traces.clone(), self.logs.clone());
        let r = tokio::task::spawn_blocking(move || (traces.force_flush(), logs.force_flush()));
        if let Ok((t, l)) = r.await {
            for (signal, res) in [("traces", t), ("logs", l)] {
                // The failed export itself was already reported (rate-limited) by `export`.
                if let Err(e) = res {
                    tracing::debug!(signal, error = %e, "OTLP flush did not complete");
                }
            }
        }
    }

    /// Flushes and stops both exporters (for drain). Later spans and records are dropped.
    /// Idempotent; both signals at once, bounded by [`SHUTDOWN_TIMEOUT`] in all.
    pub async fn shutdown(&self) {
        if self.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        let (t, l) = self.shut_down_providers();
        // Each waits at most SHUTDOWN_TIMEOUT on its own thread; this bounds the wait too, in
        // case a provider overruns its timeout.
        let both = async { (t.await, l.await) };
        match tokio::time::timeout(SHUTDOWN_TIMEOUT + Duration::from_millis(100), both).await {
            Ok((t, l)) => {
                for (signal, res) in [("traces", t), ("logs", l)] {
                    match res {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => {
                            tracing::warn!(signal, error = %e, "OTLP shutdown did not flush everything")
                        }
                        Err(_) => {
                            tracing::warn!(signal, "OTLP shutdown thread ended without an answer")
                        }
                    }
                }
            }
            Err(_) => tracing::warn!(
                timeout = ?SHUTDOWN_TIMEOUT,
                "OTLP shutdown did not finish in time; the rest is dropped"
            ),
        }
    }

    /// Starts shutting both providers down, each on a thread of its own (the SDK's shutdown
    /// blocks): concurrently, so that the total wait is one timeout, not one per signal.
    fn shut_down_providers(
        &self,
    ) -> (
        tokio::sync::oneshot::Receiver<OTelSdkResult>,
        tokio::sync::oneshot::Receiver<OTelSdkResult>,
    ) {
        let traces = self.traces.clone();
        let logs = self.logs.clone();
        (
            on_thread("traces", move || {
                traces.shutdown_with_timeout(SHUTDOWN_TIMEOUT)
            }),
            on_thread("logs", move || logs.shutdown_with_timeout(SHUTDOWN_TIMEOUT)),
        )
    }
}

/// Runs `f` on a new thread; its result arrives on the receiver (dropped if no thread could be
/// started, which the receiver sees as a closed channel).
fn on_thread(
    signal: &'static str,
    f: impl FnOnce() -> OTelSdkResult + Send + 'static,
) -> tokio::sync::oneshot::Receiver<OTelSdkResult> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name(format!("l4mesh-otel-{signal}"))
        .spawn(move || {
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::debug!(signal, error = %e, "no thread to shut the OTLP exporter down; dropping its queue");
    }
    rx
}

impl Drop for Otel {
    /// The SDK shuts a provider down, blocking, when its last handle drops — which could be a
    /// connection task on a data-plane thread. Shutting down here, on threads of their own, keeps
    /// that wait off every runtime thread.
    fn drop(&mut self) {
        if self.shut.swap(true, Ordering::SeqCst) {
            return;
        }
        drop(self.shut_down_providers());
    }
}

/// Parent-based with the node's ratio for roots, except that a **remote** parent flagged "not
/// sampled" gets the node's ratio too (Go's `WithRemoteParentNotSampled(TraceIDRatioBased)`).
///
/// Why: an l4mesh with OTel off — and ztunnel — sends a random `traceparent` flagged not sampled
/// on every CONNECT. Plain parent-based sampling would then never record an inbound span from
/// such a peer. A sampled remote parent is still followed (a trace started elsewhere stays
/// whole), and local parents keep the standard behaviour. The ratio is decided on the trace id,
/// so nodes with equal ratios still agree on a trace.
pub fn sampler(ratio: f64) -> ParentBasedSampler {
    Sampler::parent_based(Sampler::TraceIdRatioBased(ratio))
        .with_remote_parent_not_sampled(Sampler::TraceIdRatioBased(ratio))
}

/// The collector's endpoint: per-request timeout as the exporter's own
/// (`OTEL_EXPORTER_OTLP_TIMEOUT`, ms, default 10 s), and for `https` the configured roots, else
/// the system's (the exporter's own default would trust none).
fn endpoint(settings: &OtelSettings) -> Result<Endpoint, OtelError> {
    let bad = |reason: String| OtelError::Exporter {
        signal: "traces and logs",
        endpoint: settings.endpoint.clone(),
        reason,
    };
    let timeout = std::env::var("OTEL_EXPORTER_OTLP_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(10), Duration::from_millis);
    let ep = Endpoint::from_shared(settings.endpoint.clone())
        .map_err(|e| bad(e.to_string()))?
        .timeout(timeout);
    if !settings.endpoint.starts_with("https://") {
        return Ok(ep);
    }
    let cfg = tonic::transport::ClientTlsConfig::new();
    let cfg = match &settings.certificate {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|error| OtelError::Certificate {
                path: path.clone(),
                error,
            })?;
            cfg.ca_certificate(tonic::transport::Certificate::from_pem(pem))
        }
        None => cfg.with_native_roots(),
    };
    ep.tls_config(cfg).map_err(|e| bad(e.to_string()))
}

fn resource(settings: &OtelSettings, node: &str) -> Resource {
    let mut attrs = vec![
        KeyValue::new("service.name", settings.service_name.clone()),
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
    ];
    if !node.is_empty() {
        attrs.push(KeyValue::new("service.instance.id", node.to_owned()));
        attrs.push(KeyValue::new("k8s.node.name", node.to_owned()));
    }
    Resource::builder_empty().with_attributes(attrs).build()
}

/// A connection's span, and the logger its access-log record goes to.
pub struct ConnTrace {
    cx: Context,
    otel: Arc<Otel>,
    /// Given at start: the span has them, the record repeats them.
    start_attributes: Vec<KeyValue>,
}

impl ConnTrace {
    /// A point in the connection's life (upstream connected, tunnel established…).
    pub fn event(&self, name: &'static str, attributes: Vec<KeyValue>) {
        self.cx.span().add_event(name, attributes);
    }

    /// This span's identity: the trace, the span, and whether it is sampled.
    pub fn span_context(&self) -> SpanContext {
        self.cx.span().span_context().clone()
    }

    /// Writes `traceparent` (this span as the parent, its sampling decision in the flags) into a
    /// request that carries the connection on (HBONE CONNECT).
    pub fn inject(&self, headers: &mut http::HeaderMap) {
        TraceContextPropagator::new().inject_context(&self.cx, &mut HeadersMut(headers));
    }

    /// Ends the span, adding `attributes` (those not given at start) and an error status when
    /// `error` is set, and emits the access-log record with the start attributes, these, and this
    /// span's ids.
    pub fn finish(&self, attributes: Vec<KeyValue>, error: Option<&str>, message: &'static str) {
        let span = self.cx.span();
        let sc = span.span_context().clone();
        if span.is_recording() {
            span.set_attributes(attributes.iter().cloned());
            if let Some(e) = error {
                span.set_status(Status::error(e.to_owned()));
            }
            span.add_event("closed", Vec::new());
        }
        span.end();
        let logger = &self.otel.logger;
        let mut rec = logger.create_log_record();
        let now = SystemTime::now();
        rec.set_timestamp(now);
        rec.set_observed_timestamp(now);
        rec.set_target("access");
        rec.set_event_name("l4mesh.access");
        let (number, text) = match error {
            None => (Severity::Info, "INFO"),
            Some(_) => (Severity::Warn, "WARN"),
        };
        rec.set_severity_number(number);
        rec.set_severity_text(text);
        rec.set_body(AnyValue::from(message));
        rec.add_attributes(
            self.start_attributes
                .iter()
                .cloned()
                .chain(attributes)
                .map(|kv| (kv.key, any_value(kv.value))),
        );
        if sc.is_valid() {
            rec.set_trace_context(sc.trace_id(), sc.span_id(), Some(sc.trace_flags()));
        }
        logger.emit(rec);
    }
}

/// A span attribute's value as a log attribute's (the log data model has its own type).
fn any_value(v: opentelemetry::Value) -> AnyValue {
    use opentelemetry::Value;
    match v {
        Value::Bool(b) => AnyValue::Boolean(b),
        Value::I64(i) => AnyValue::Int(i),
        Value::F64(f) => AnyValue::Double(f),
        Value::String(s) => AnyValue::String(s),
        other => AnyValue::String(other.to_string().into()),
    }
}

/// The caller's span that a `traceparent` (with its `tracestate`) in `headers` names, when it is
/// valid: what [`Otel::start`] continues. Outside input: fuzzed (`fuzz/`).
pub fn remote_parent(headers: &http::HeaderMap) -> Option<SpanContext> {
    let cx = TraceContextPropagator::new().extract(&Headers(headers));
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// Reads `traceparent`/`tracestate` from request headers.
struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes `traceparent` (and `tracestate` when there is one) into request headers, replacing any.
struct HeadersMut<'a>(&'a mut http::HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(key.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            self.0.insert(k, v);
        }
    }
}

#[cfg(test)]
mod tests;
