//! `csvctl`: the operator's tool.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    if std::env::args_os().nth(1).as_deref()
        == Some(std::ffi::OsStr::new(csvd::spawner::SPAWNER_ARG))
    {
        return match csvd::spawner::serve() {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("csvctl spawner: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let cli = csvd::ctl::Cli::parse();
    csvd::init_tracing("warn");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("csvctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(csvd::ctl::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("csvctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}
