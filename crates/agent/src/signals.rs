//! Stopping on signals, shared by both binaries (`drover` depends on this
//! crate for `drover up` already): the first SIGINT/SIGTERM cancels the
//! shutdown token so work ends cleanly; a second exits at once.

use tokio_util::sync::CancellationToken;

/// First SIGINT/SIGTERM: stop cleanly. Second: exit at once.
pub async fn stop_on_signals(shutdown: CancellationToken) {
    #[cfg(unix)]
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM");
            return;
        }
    };
    for round in 0..2 {
        #[cfg(unix)]
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
        if round == 0 {
            tracing::info!("shutting down (signal again to exit at once)");
            shutdown.cancel();
        } else {
            eprintln!("exiting at once");
            std::process::exit(130);
        }
    }
}
