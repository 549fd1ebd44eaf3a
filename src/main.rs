//! The l4mesh binary: flags and environment → `Config` → runtime → run until a signal.

use clap::Parser;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let args = l4mesh::config::Args::parse();
    l4mesh::telemetry::init(args.log_format);
    // Give freed memory back to the OS in the background (jemalloc otherwise returns it only when
    // the allocator is busy): after a large xDS sync, an idle proxy shrinks back.
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::debug!(error = %e, "jemalloc background purging unavailable");
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
