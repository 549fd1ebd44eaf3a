//! Profiles on the admin port, as ztunnel serves them, for `go tool pprof` and its kin:
//! - `GET /debug/pprof/profile`: CPU samples of the whole process at 1000 Hz for 10 s (or
//!   `?seconds=N`, 1 to 60), as a pprof protobuf; one at a time;
//! - `GET /debug/pprof/heap`: jemalloc's sampled heap profile, as a gzipped pprof protobuf, when
//!   jemalloc profiling is on (`_RJEM_MALLOC_CONF=prof:true,prof_active:true,lg_prof_sample:19`;
//!   off by default, where ztunnel builds it in: it costs memory); otherwise a 500 that says so.
//!
//! Both run on blocking threads, off the admin server's runtime, and leave the data plane alone
//! apart from the sampling itself.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};

use super::text;

/// ztunnel's sampling rate.
const FREQUENCY: i32 = 1000;
/// ztunnel's duration, when the query does not say.
const DEFAULT_SECONDS: u64 = 10;
const MAX_SECONDS: u64 = 60;

/// Set while a CPU profile runs: the sampler is process-wide.
static PROFILING: AtomicBool = AtomicBool::new(false);

/// Holds [`PROFILING`] until the sampling ends, even when the client leaves before (hyper then
/// drops the request's future, not the blocking thread that owns this).
struct Profiling;

impl Drop for Profiling {
    fn drop(&mut self) {
        PROFILING.store(false, Ordering::Release);
    }
}

/// The duration asked for by `seconds=N`, within 1..=60; the default without it.
pub(super) fn seconds(query: Option<&str>) -> Result<Duration, String> {
    let asked = form_urlencoded::parse(query.unwrap_or_default().as_bytes())
        .find(|(k, _)| k == "seconds")
        .map(|(_, v)| v.into_owned());
    let Some(asked) = asked else {
        return Ok(Duration::from_secs(DEFAULT_SECONDS));
    };
    match asked.parse::<u64>() {
        Ok(n) if (1..=MAX_SECONDS).contains(&n) => Ok(Duration::from_secs(n)),
        _ => Err(format!(
            "seconds={asked:?}: expected a whole number of seconds from 1 to {MAX_SECONDS}"
        )),
    }
}

/// Samples the process for `duration` and answers the pprof protobuf.
pub(super) async fn cpu(duration: Duration) -> Response<Full<Bytes>> {
    if PROFILING.swap(true, Ordering::AcqRel) {
        return text(
            StatusCode::CONFLICT,
            "a CPU profile is already being taken; try again when it ends\n".into(),
        );
    }
    let running = Profiling;
    let taken = tokio::task::spawn_blocking(move || {
        let _running = running;
        profile(duration).map_err(|e| e.to_string())
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|r| r);
    match taken {
        Ok(body) => protobuf(body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("CPU profile failed: {e}\n"),
        ),
    }
}

fn profile(duration: Duration) -> Result<Vec<u8>, pprof::Error> {
    use pprof::protos::Message;
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(FREQUENCY)
        // Frames inside these cannot be unwound safely from a signal handler.
        .blocklist(&["libc", "libgcc", "pthread", "vdso"])
        .build()?;
    std::thread::sleep(duration);
    let report = guard.report().build()?;
    Ok(report.pprof()?.encode_to_vec())
}

/// jemalloc's heap profile, or why there is none.
pub(super) async fn heap() -> Response<Full<Bytes>> {
    let Some(ctl) = jemalloc_pprof::PROF_CTL.as_ref() else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "jemalloc profiling is not enabled: start l4mesh with \
             _RJEM_MALLOC_CONF=prof:true,prof_active:true,lg_prof_sample:19\n"
                .into(),
        );
    };
    let mut ctl = ctl.clone().lock_owned().await;
    if !ctl.activated() {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "jemalloc profiling is built in but not active (prof_active:false)\n".into(),
        );
    }
    // A dump writes, reads back and compresses the whole profile: seconds on a big heap.
    let dumped = tokio::task::spawn_blocking(move || ctl.dump_pprof().map_err(|e| e.to_string()))
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
    match dumped {
        Ok(body) => protobuf(body),
        Err(e) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("jemalloc heap profile failed: {e}\n"),
        ),
    }
}

fn protobuf(body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    resp.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}
