//! `csvd --config node.toml`: one cluster node.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

#[derive(Parser)]
#[command(name = "csvd", version, about = "Cluster Shared Volumes node daemon")]
struct Cli {
    /// The node configuration (TOML).
    #[arg(short, long, env = "CSVD_CONFIG")]
    config: PathBuf,
}

/// mimalloc, not glibc's malloc: on the NBD request path glibc's malloc and free were about
/// 30 % of the daemon's user CPU (4 KiB blocks take its slow bins and consolidate its fast
/// ones); mimalloc gave 5-13 % more random 4 KiB IOPS (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match csvd::config::NodeConfig::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("csvd: {e}");
            return ExitCode::from(2);
        }
    };
    csvd::init_tracing(&cfg.log);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("csvd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(csvd::daemon::run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("csvd: {e:#}");
            ExitCode::FAILURE
        }
    }
}
