//! Settings validation, the failure-report limiter, and `traceparent` propagation with
//! parent-based sampling (no collector needed: nothing is exported before a flush).

use super::export::{Limiter, Report};
use super::*;

#[test]
fn settings_validation_names_the_setting() {
    assert_eq!(
        OtelSettings::new("http://127.0.0.1:4317").validate(),
        Ok(())
    );
    assert_eq!(
        OtelSettings::new("https://collector.obs:4317/").validate(),
        Ok(())
    );
    for (endpoint, why) in [
        ("collector:4317", "no scheme"),
        ("grpc://collector:4317", "not http or https"),
        ("http://", "empty string"),
        ("http://collector:4317/v1/traces", "a path"),
        ("not a url", "invalid uri character"),
    ] {
        let e = OtelSettings::new(endpoint).validate().unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("OTEL_EXPORTER_OTLP_ENDPOINT")
                && msg.contains(&format!("found {endpoint:?}"))
                && msg.contains(why),
            "{endpoint}: {msg}"
        );
    }
    for ratio in [-0.1, 1.5, f64::NAN] {
        let mut s = OtelSettings::new("http://127.0.0.1:4317");
        s.sampler_ratio = ratio;
        let e = s.validate().unwrap_err();
        assert!(
            e.to_string()
                .contains("OTEL_TRACES_SAMPLER_ARG must be a ratio between 0 and 1"),
            "{e}"
        );
    }
    let mut s = OtelSettings::new("http://127.0.0.1:4317");
    s.service_name = " ".into();
    assert_eq!(s.validate(), Err(SettingsError::ServiceName));
    let mut s = OtelSettings::new("http://127.0.0.1:4317");
    s.certificate = Some("/etc/ca.pem".into());
    let e = s.validate().unwrap_err().to_string();
    assert!(
        e.contains("OTEL_EXPORTER_OTLP_CERTIFICATE is set but the endpoint \"http://127.0.0.1:4317\" is not https://"),
        "{e}"
    );
    s.endpoint = "https://127.0.0.1:4317".into();
    assert_eq!(s.validate(), Ok(()));
}

#[test]
fn limiter_reports_first_failure_then_rarely_then_recovery() {
    let l = Limiter::new(Duration::from_secs(30));
    let t0 = Instant::now();
    assert_eq!(l.observe(true, t0), Report::Nothing);
    assert_eq!(l.observe(false, t0), Report::Failed { suppressed: 0 });
    for i in 1..=5 {
        assert_eq!(
            l.observe(false, t0 + Duration::from_secs(i)),
            Report::Nothing
        );
    }
    assert_eq!(
        l.observe(false, t0 + Duration::from_secs(31)),
        Report::Failed { suppressed: 5 }
    );
    assert_eq!(
        l.observe(true, t0 + Duration::from_secs(32)),
        Report::Recovered { failures: 7 }
    );
    assert_eq!(
        l.observe(true, t0 + Duration::from_secs(33)),
        Report::Nothing
    );
    // After a recovery, the next failure is news again.
    assert_eq!(
        l.observe(false, t0 + Duration::from_secs(34)),
        Report::Failed { suppressed: 0 }
    );
}

use std::time::Instant;

fn otel(ratio: f64) -> Arc<Otel> {
    let mut s = OtelSettings::new("http://127.0.0.1:9");
    s.sampler_ratio = ratio;
    Otel::new(&s, "node-a", Endpoint::connect_lazy).unwrap()
}

fn traceparent(t: &ConnTrace) -> String {
    let mut h = http::HeaderMap::new();
    t.inject(&mut h);
    h["traceparent"].to_str().unwrap().to_owned()
}

fn headers(traceparent: &str) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    h.insert("traceparent", traceparent.parse().unwrap());
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traceparent_carries_the_span_and_the_sampling_decision() {
    let (a, b) = (otel(1.0), otel(1.0));
    let out = a.start("outbound", SpanKind::Client, None, Vec::new());
    let sc = out.span_context();
    assert!(sc.is_valid() && sc.is_sampled());
    let tp = traceparent(&out);
    assert_eq!(tp, format!("00-{}-{}-01", sc.trace_id(), sc.span_id()));

    let inb = b.start("inbound", SpanKind::Server, Some(&headers(&tp)), Vec::new());
    let isc = inb.span_context();
    assert_eq!(isc.trace_id(), sc.trace_id(), "the trace continues");
    assert_ne!(isc.span_id(), sc.span_id());
    assert!(isc.is_sampled());

    // A caller's "not sampled" (an OTel-off peer's random traceparent) gets this node's ratio
    // of 1: recorded, in the caller's trace.
    let unsampled = format!("00-{}-{}-00", sc.trace_id(), sc.span_id());
    let inb = b.start(
        "inbound",
        SpanKind::Server,
        Some(&headers(&unsampled)),
        Vec::new(),
    );
    assert!(inb.span_context().is_sampled());
    assert_eq!(inb.span_context().trace_id(), sc.trace_id());

    // A malformed header starts a new trace, sampled by this node's ratio.
    let inb = b.start(
        "inbound",
        SpanKind::Server,
        Some(&headers("00-zz-11-01")),
        Vec::new(),
    );
    assert_ne!(inb.span_context().trace_id(), sc.trace_id());
    assert!(inb.span_context().is_sampled());
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_zero_samples_no_new_trace_but_follows_a_sampled_caller() {
    let o = otel(0.0);
    let root = o.start("outbound", SpanKind::Client, None, Vec::new());
    let sc = root.span_context();
    assert!(
        sc.is_valid(),
        "an unsampled span still has ids to propagate"
    );
    assert!(!sc.is_sampled());
    assert!(traceparent(&root).ends_with("-00"));
    let sampled = format!("00-{}-{}-01", TraceId::from(7u128), SpanId::from(9u64));
    let child = o.start(
        "inbound",
        SpanKind::Server,
        Some(&headers(&sampled)),
        Vec::new(),
    );
    assert!(child.span_context().is_sampled());
    // An unsampled caller gets this node's ratio (0): not recorded.
    let unsampled = format!("00-{}-{}-00", TraceId::from(7u128), SpanId::from(9u64));
    let child = o.start(
        "inbound",
        SpanKind::Server,
        Some(&headers(&unsampled)),
        Vec::new(),
    );
    assert!(!child.span_context().is_sampled());
    assert!(child.span_context().is_valid());
    o.shutdown().await;
    // Idempotent, and quick the second time.
    tokio::time::timeout(Duration::from_millis(100), o.shutdown())
        .await
        .unwrap();
}

#[test]
fn an_unreadable_certificate_fails_startup_with_its_path() {
    let mut s = OtelSettings::new("https://127.0.0.1:4317");
    s.certificate = Some("/nonexistent/otel-ca.pem".into());
    let e = Otel::new(&s, "n", Endpoint::connect_lazy)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("reading OTEL_EXPORTER_OTLP_CERTIFICATE \"/nonexistent/otel-ca.pem\"")
            && e.contains("expected a PEM file"),
        "{e}"
    );
}

/// The sampler's four parent cases and the root, decided on ratio 1 and 0: only a remote
/// unsampled parent differs from plain parent-based sampling.
#[test]
fn remote_unsampled_parents_get_the_ratio_local_ones_do_not() {
    use opentelemetry::trace::{TraceFlags, TraceState};
    use opentelemetry_sdk::trace::SamplingDecision;
    use opentelemetry_sdk::trace::ShouldSample as _;
    let decide = |ratio: f64, parent: Option<(bool, bool)>| {
        let cx = parent.map(|(remote, sampled)| {
            let flags = if sampled {
                TraceFlags::SAMPLED
            } else {
                TraceFlags::default()
            };
            let sc = SpanContext::new(
                TraceId::from(0x1234u128),
                SpanId::from(5u64),
                flags,
                remote,
                TraceState::default(),
            );
            Context::new().with_remote_span_context(sc)
        });
        sampler(ratio)
            .should_sample(
                cx.as_ref(),
                TraceId::from(0x1234u128),
                "n",
                &SpanKind::Server,
                &[],
                &[],
            )
            .decision
            == SamplingDecision::RecordAndSample
    };
    for ratio in [0.0, 1.0] {
        let by_ratio = ratio == 1.0;
        assert_eq!(decide(ratio, None), by_ratio, "root, ratio {ratio}");
        assert!(
            decide(ratio, Some((true, true))),
            "remote sampled, ratio {ratio}"
        );
        assert_eq!(
            decide(ratio, Some((true, false))),
            by_ratio,
            "remote unsampled, ratio {ratio}"
        );
        assert!(
            decide(ratio, Some((false, true))),
            "local sampled, ratio {ratio}"
        );
        assert!(
            !decide(ratio, Some((false, false))),
            "local unsampled, ratio {ratio}"
        );
    }
}

/// Shutdown waits for both signals at once, at most SHUTDOWN_TIMEOUT in all, even when the
/// collector accepts connections but never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_when_the_collector_hangs() {
    // Accepts TCP, never speaks HTTP/2: every export hangs until its timeout.
    let hung = tokio::net::TcpListener::bind("127.55.9.1:0").await.unwrap();
    let addr = hung.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = hung.accept().await {
            held.push(s);
        }
    });
    let o = Otel::new(
        &OtelSettings::new(format!("http://{addr}")),
        "node-a",
        Endpoint::connect_lazy,
    )
    .unwrap();
    for _ in 0..10 {
        let t = o.start("outbound", SpanKind::Client, None, Vec::new());
        t.finish(Vec::new(), None, "connection complete");
    }
    let started = Instant::now();
    o.shutdown().await;
    let took = started.elapsed();
    assert!(
        took <= SHUTDOWN_TIMEOUT + Duration::from_millis(500),
        "shutdown took {took:?}, more than {SHUTDOWN_TIMEOUT:?}"
    );
    accepting.abort();
}
