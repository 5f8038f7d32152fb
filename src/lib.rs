//! csvd: the node daemon, the operator CLI and the local-cluster launcher.
//!
//! Binaries are thin: `src/bin/csvd.rs` and `src/bin/csvctl.rs` parse arguments and
//! call into this library, which the integration tests in `tests/` drive directly.

pub mod bench;
pub mod chaos;
pub mod client;
pub mod cluster;
pub mod config;
pub mod ctl;
pub mod daemon;
pub mod exports;
pub mod fault;
pub mod format;
pub mod fsck;
pub mod netns;
pub mod redirect;
pub mod redirect_bench;
pub mod spawner;
pub mod workload;

/// Sets up logging to stderr with `filter` (overridden by `RUST_LOG`).
pub fn init_tracing(filter: &str) {
    let env = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
