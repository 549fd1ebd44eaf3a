//! Logging through `tracing`: level from `RUST_LOG` (default `info`), plain or JSON lines.
//! Access-log lines use the target `access`, one per connection at close.
//!
//! The filter is reloadable: the admin server's `/logging` reads and changes it while l4mesh runs
//! ([`log_filter`], [`set_log_filter`]).

mod log_filter;

use std::sync::{Mutex, OnceLock, PoisonError};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

pub use log_filter::FilterError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Plain,
    Json,
}

/// The installed filter's reload handle, the filter l4mesh started with, and the current one.
struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
    startup: String,
    current: Mutex<String>,
}

static CONTROL: OnceLock<LogControl> = OnceLock::new();

/// Why the log filter could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error(transparent)]
    Filter(#[from] FilterError),
    #[error("the log filter cannot be changed: l4mesh's logger is not the one installed in this process")]
    NotInstalled,
    #[error("reloading the log filter failed: {0}")]
    Reload(String),
}

/// Installs the global subscriber. Safe to call more than once (later calls are no-ops), which
/// in-process tests rely on.
pub fn init(format: LogFormat) {
    let env = std::env::var("RUST_LOG").ok();
    let rejected = env
        .as_deref()
        .and_then(|s| EnvFilter::try_new(s).err().map(|e| (s.to_owned(), e)));
    let startup = match (&env, &rejected) {
        (Some(s), None) => s.clone(),
        _ => "info".to_owned(),
    };
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&startup));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let fmt = match format {
        LogFormat::Plain => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .boxed(),
    };
    if tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok()
    {
        let _ = CONTROL.set(LogControl {
            handle,
            current: Mutex::new(startup.clone()),
            startup,
        });
        if let Some((value, e)) = rejected {
            tracing::warn!(rust_log = %value, error = %e, "RUST_LOG is not a valid filter; logging at info");
        }
    }
}

/// The filter in force, `RUST_LOG` syntax (`None` if l4mesh's logger is not installed).
pub fn log_filter() -> Option<String> {
    CONTROL.get().map(|c| {
        c.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    })
}

/// Changes the log filter at runtime: `spec`'s directives replace those of the same target (a
/// bare level replaces the default level); with `reset` they apply to the startup filter instead
/// (an empty `spec` with `reset` restores it). Returns the filter now in force.
pub fn set_log_filter(spec: &str, reset: bool) -> Result<String, LogError> {
    let control = CONTROL.get().ok_or(LogError::NotInstalled)?;
    let changes = if reset && spec.trim().is_empty() {
        Vec::new()
    } else {
        log_filter::parse(spec)?
    };
    let mut current = control
        .current
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let base = if reset {
        control.startup.as_str()
    } else {
        current.as_str()
    };
    let next = log_filter::merge(base, &changes);
    let filter = EnvFilter::builder().parse(&next).map_err(|e| {
        LogError::Filter(FilterError::Directive {
            directive: next.clone(),
            reason: e.to_string(),
        })
    })?;
    control
        .handle
        .reload(filter)
        .map_err(|e| LogError::Reload(e.to_string()))?;
    tracing::info!(filter = %next, previous = %current, "log filter changed");
    *current = next.clone();
    Ok(next)
}
