//! Test harness for real NBD clients: serves the files of a directory (raw, `.vhd` decoded).
//!
//! `cargo run -p nbd-backend --example serve_dir -- DIR (--unix PATH | --tcp ADDR) [--read-only]`
//! Prints `listening on <addr>` once ready; Ctrl-C shuts down gracefully.

use std::sync::Arc;

use anyhow::{Context, bail};
use nbd_backend::dir::DirProvider;
use nbd_backend::{NbdServer, ServerConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (dir, rest) = args
        .split_first()
        .context("usage: serve_dir DIR (--unix PATH | --tcp ADDR) [--read-only]")?;
    let read_only = rest.iter().any(|a| a == "--read-only");
    let flag = |name: &str| {
        rest.iter()
            .position(|a| a == name)
            .and_then(|i| rest.get(i + 1))
    };
    let server = NbdServer::new(
        Arc::new(DirProvider::new(dir, read_only)),
        ServerConfig::default(),
        None,
    );
    let token = server.shutdown_token();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            token.cancel();
        }
    });
    if let Some(path) = flag("--unix") {
        let listener = tokio::net::UnixListener::bind(path).context("binding the unix socket")?;
        println!("listening on {path}");
        server.serve_unix(listener).await?;
    } else if let Some(addr) = flag("--tcp") {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .context("binding the TCP port")?;
        println!("listening on {}", listener.local_addr()?);
        server.serve_tcp(listener).await?;
    } else {
        bail!("give --unix PATH or --tcp ADDR");
    }
    server.shutdown().await;
    Ok(())
}
