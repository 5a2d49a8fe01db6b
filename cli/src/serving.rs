//! What every serving subcommand shares: binding, the `listening on` line the launcher reads, shutdown on SIGTERM or
//! Ctrl-C, and the node name a worker registers with.

use std::io::Write;
use std::net::SocketAddr;

use anyhow::{Context, Result};

/// Binds `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))
}

/// Prints the one stdout line `switchyard up` waits for, once the server is about to accept connections.
pub fn announce(listener: &tokio::net::TcpListener) -> Result<SocketAddr> {
    let addr = listener.local_addr().context("reading the bound address")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{addr}")?;
    stdout.flush()?;
    Ok(addr)
}

/// Resolves on SIGTERM (Kubernetes, `switchyard up`) or Ctrl-C.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutting down");
}

/// A multi-threaded tokio runtime for a server process.
pub fn runtime(worker_threads: usize) -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads.max(1))
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// This machine's name: `/proc/sys/kernel/hostname`, else `$HOSTNAME`, else `local`.
pub fn hostname() -> String {
    let from_proc = std::fs::read_to_string("/proc/sys/kernel/hostname").ok();
    let from_env = || std::env::var("HOSTNAME").ok();
    from_proc
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .or_else(|| from_env().map(|name| name.trim().to_string()).filter(|name| !name.is_empty()))
        .unwrap_or_else(|| "local".to_string())
}
