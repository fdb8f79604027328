//! The TCP accept loop: bytes between a client and one endpoint of a cluster.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::ListenerKind;
use crate::state::Shared;

/// Accepts until `shutdown`; every tunnel is counted in `shared.connections` so that the drain
/// can wait for it.
pub async fn serve(
    socket: TcpListener,
    index: usize,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let (mut client, _) = tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let snap = shared.snapshot.load_full();
        let listener = &snap.config.listeners[index];
        let ListenerKind::Tcp { cluster } = listener.kind else {
            continue;
        };
        let open = shared.connections[index].fetch_add(1, Ordering::Relaxed) + 1;
        let stats = &snap.listeners[index].stats;
        if open > listener.max_connections {
            shared.connections[index].fetch_sub(1, Ordering::Relaxed);
            stats.refused_connections.inc();
            continue;
        }
        stats.connections.inc();
        stats.active_connections.inc();
        let shared = shared.clone();
        tokio::spawn(async move {
            let cluster = &snap.clusters[cluster];
            let _ = client.set_nodelay(true);
            match cluster.pick(None, None) {
                None => {
                    tracing::warn!(cluster = %cluster.config.name, "no healthy endpoint for a tcp connection")
                }
                Some(endpoint) => {
                    let _in_flight = endpoint.start_request();
                    match tokio::time::timeout(
                        cluster.config.connect_timeout,
                        TcpStream::connect(endpoint.addr),
                    )
                    .await
                    {
                        Ok(Ok(mut upstream)) => {
                            let _ = upstream.set_nodelay(true);
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                        }
                        Ok(Err(e)) => {
                            endpoint.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(endpoint = %endpoint.addr, error = %e, "tcp connect failed");
                        }
                        Err(_) => {
                            endpoint.failures.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(endpoint = %endpoint.addr, "tcp connect timed out");
                        }
                    }
                }
            }
            shared.connections[index].fetch_sub(1, Ordering::Relaxed);
            snap.listeners[index].stats.active_connections.dec();
        });
    }
}
