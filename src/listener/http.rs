//! The HTTP accept loop of one listener on one worker.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Listener;
use crate::proxy::{self, ConnCtx};
use crate::state::Shared;

/// The connection builder for a listener: HTTP/1.1 and h2c (prior knowledge) on one port.
pub fn builder(listener: &Listener) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(listener.header_read_timeout)
        .max_buf_size(listener.max_header_bytes)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(listener.max_header_bytes as u32);
    builder
}

/// Accepts connections until `shutdown` turns true; each connection is watched by `graceful`
/// so that a drain lets its in-flight requests finish.
pub async fn serve(
    socket: TcpListener,
    index: usize,
    worker: usize,
    shared: Arc<Shared>,
    graceful: &GracefulShutdown,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = shared.snapshot.load().config.listeners[index].clone();
    let builder = builder(&listener);
    let stats = shared.snapshot.load().listeners[index].stats.clone();
    loop {
        let (stream, client) = tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let open = shared.connections[index].fetch_add(1, Ordering::Relaxed) + 1;
        if open > listener.max_connections {
            shared.connections[index].fetch_sub(1, Ordering::Relaxed);
            stats.refused_connections.inc();
            drop(stream);
            continue;
        }
        stats.connections.inc();
        stats.active_connections.inc();
        let _ = stream.set_nodelay(true);
        let ctx = Arc::new(ConnCtx::new(shared.clone(), index, worker, client));
        let service = service_fn(move |req| proxy::handle(req, ctx.clone()));
        let conn = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        let shared = shared.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            shared.connections[index].fetch_sub(1, Ordering::Relaxed);
            stats.active_connections.dec();
        });
    }
}
