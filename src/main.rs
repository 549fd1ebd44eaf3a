//! The l4mesh binary: flags and environment → `Config` → runtime → run until a signal.

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's `malloc_conf`, read at its initialisation: purge freed pages in a background thread,
/// and return them with MADV_DONTNEED (muzzy decay 0) rather than MADV_FREE, which the kernel counts
/// in RSS until memory pressure. After a large xDS sync, an idle proxy shrinks back within seconds.
#[repr(transparent)]
pub struct MallocConf(*const u8);
// SAFETY: a pointer to an immutable, 'static, NUL-terminated string.
#[allow(unsafe_code)]
unsafe impl Sync for MallocConf {}
#[allow(unsafe_code)]
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: MallocConf = MallocConf(
    c"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0"
        .as_ptr()
        .cast(),
);

fn main() -> std::process::ExitCode {
    let args = l4mesh::config::Args::parse_in_environment();
    l4mesh::telemetry::init(args.log_format);
    if let Some(l4mesh::config::Command::Redirect { action }) = &args.command {
        return match l4mesh::redirect::run(action) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("l4mesh redirect failed: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(l4mesh::config::Command::NodeAgent(a)) = &args.command {
        let settings = l4mesh::inpod::agent::AgentSettings {
            socket: a.socket.clone(),
            pods: a.pods.clone(),
            capture: (!a.no_capture).then(|| a.capture.clone()),
            removal_delay: a.removal_delay,
        };
        let result = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())
            .and_then(|rt| {
                rt.block_on(async {
                    use tokio::signal::unix::{signal, SignalKind};
                    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
                    tokio::select! {
                        // Every cause, not only the outermost message.
                        r = l4mesh::inpod::agent::run(settings) => {
                            r.map_err(|e| format!("{:#}", anyhow::Error::from(e)))
                        }
                        _ = tokio::signal::ctrl_c() => Ok(()),
                        _ = term.recv() => Ok(()),
                    }
                })
            });
        return match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!("l4mesh node-agent failed: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match tikv_jemalloc_ctl::background_thread::read() {
        Ok(true) => {}
        other => tracing::debug!(state = ?other, "jemalloc background purging is off"),
    }
    let config = match args.into_config() {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("invalid configuration: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match serde_json::to_string(&config) {
        Ok(j) => {
            tracing::info!(config = %j, version = env!("CARGO_PKG_VERSION"), "starting l4mesh")
        }
        Err(e) => tracing::warn!(error = %e, "could not serialise the configuration"),
    }
    match l4mesh::app::run(config) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("l4mesh failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
