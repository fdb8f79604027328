//! Process lifecycle: bind every socket, start one worker thread per core (each a
//! current-thread tokio runtime with its own SO_REUSEPORT sockets), run the admin listener and
//! background tasks on the control thread, reload on SIGHUP, drain on SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::config::{Config, ListenerKind};
use crate::listener;
use crate::state::{access_log_target, Shared};
use crate::telemetry::AccessLog;

/// What stops a server from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind {what} on {address}: {source}")]
    Bind {
        what: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the access log: {0}")]
    AccessLog(std::io::Error),
    #[error("cannot start a runtime: {0}")]
    Runtime(std::io::Error),
}

/// The addresses a server actually bound (port 0 in the config becomes a real port).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Addresses {
    pub admin: SocketAddr,
    /// Listener name → bound address, in config order.
    pub listeners: Vec<(String, SocketAddr)>,
}

impl Addresses {
    /// The bound address of a listener.
    pub fn listener(&self, name: &str) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, a)| *a)
    }
}

/// A server with every socket bound, ready to [`run`](Server::run).
pub struct Server {
    shared: Arc<Shared>,
    /// `sockets[worker][listener]`.
    sockets: Vec<Vec<std::net::TcpListener>>,
    admin: std::net::TcpListener,
    addresses: Addresses,
}

/// Worker threads to run when the config does not say: one per CPU this process may use
/// (so `taskset -c 1` gives one worker).
pub fn default_workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

impl Server {
    /// Binds the admin listener and every listener once per worker.
    pub fn bind(config: Config, access_log_flag: Option<&str>) -> Result<Server, StartError> {
        let workers = config.workers.unwrap_or_else(default_workers);
        let access_log = AccessLog::open(&access_log_target(&config, access_log_flag))
            .map_err(StartError::AccessLog)?;
        let admin = std::net::TcpListener::bind(config.admin.address).map_err(|source| {
            StartError::Bind {
                what: "the admin listener".into(),
                address: config.admin.address,
                source,
            }
        })?;
        let _ = admin.set_nonblocking(true);
        let admin_addr = admin.local_addr().unwrap_or(config.admin.address);
        let mut sockets: Vec<Vec<std::net::TcpListener>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut bound = Vec::new();
        for l in &config.listeners {
            let (addr, per_worker) =
                listener::bind_all(l.address, workers).map_err(|source| StartError::Bind {
                    what: format!("listener `{}`", l.name),
                    address: l.address,
                    source,
                })?;
            bound.push((l.name.clone(), addr));
            for (w, s) in per_worker.into_iter().enumerate() {
                sockets[w].push(s);
            }
        }
        let path = config.source.clone();
        let shared = Shared::new(config, path, workers, access_log);
        Ok(Server {
            shared,
            sockets,
            admin,
            addresses: Addresses {
                admin: admin_addr,
                listeners: bound,
            },
        })
    }

    /// The bound addresses.
    pub fn addresses(&self) -> &Addresses {
        &self.addresses
    }

    /// The shared state (for in-process users such as the demo).
    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until SIGTERM or SIGINT (then drains) or until `stop` resolves.
    pub fn run(
        self,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("attache-control")
            .build()
            .map_err(StartError::Runtime)?;
        let Server {
            shared,
            sockets,
            admin,
            addresses,
        } = self;
        runtime.block_on(async move {
            shared.snapshot.load().start(None).await;
            let admin = TcpListener::from_std(admin).map_err(StartError::Runtime)?;
            tokio::spawn(crate::admin::serve(admin, shared.clone()));

            let (shutdown_tx, shutdown_rx) = watch::channel(false);
            let mut threads = Vec::new();
            for (w, worker_sockets) in sockets.into_iter().enumerate() {
                let shared = shared.clone();
                let shutdown = shutdown_rx.clone();
                let thread = std::thread::Builder::new()
                    .name(format!("attache-worker-{w}"))
                    .spawn(move || {
                        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
                        match runtime {
                            Ok(rt) => rt.block_on(worker(w, worker_sockets, shared, shutdown)),
                            Err(e) => tracing::error!(error = %e, "cannot start a worker runtime"),
                        }
                    })
                    .map_err(StartError::Runtime)?;
                threads.push(thread);
            }
            shared.set_ready(true);
            let ready = serde_json::json!({ "ready": true, "admin": addresses.admin, "listeners": addresses.listeners.iter().map(|(n, a)| (n.clone(), a.to_string())).collect::<std::collections::BTreeMap<_, _>>() });
            tracing::info!(%ready, "attache is ready");

            wait_for_stop(&shared, stop).await;
            tracing::info!("draining: no new connections; in-flight requests may finish");
            shared.set_ready(false);
            let _ = shutdown_tx.send(true);
            let grace = shared.snapshot.load().config.shutdown_grace;
            let joined = tokio::task::spawn_blocking(move || {
                for t in threads {
                    let _ = t.join();
                }
            });
            let _ = tokio::time::timeout(grace + Duration::from_secs(1), joined).await;
            shared.access_log.flush();
            tracing::info!("stopped");
            Ok(())
        })
    }
}

async fn wait_for_stop(shared: &Shared, stop: impl std::future::Future<Output = ()>) {
    let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    ) else {
        tracing::error!("cannot install signal handlers; running until stopped");
        stop.await;
        return;
    };
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = &mut stop => return,
            _ = hup.recv() => { let _ = shared.reload().await; }
        }
    }
}

/// How often a worker sweeps its idle upstream connections.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// One worker: accept loops for every listener, then the drain.
async fn worker(
    index: usize,
    sockets: Vec<std::net::TcpListener>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<bool>,
) {
    let drain = listener::http::Drain::default();
    let flusher = {
        let shared = shared.clone();
        tokio::spawn(async move {
            // With the access log off, an idle worker wakes once a second, not ten times.
            let every = if shared.access_log.enabled() {
                crate::telemetry::access_log::FLUSH_INTERVAL
            } else {
                SWEEP_INTERVAL
            };
            let per_sweep = (SWEEP_INTERVAL.as_millis() / every.as_millis().max(1)).max(1) as u32;
            let mut tick = tokio::time::interval(every);
            let mut ticks = 0u32;
            loop {
                tick.tick().await;
                shared.access_log.flush();
                // About once a second: close this worker's expired or dead idle upstream
                // connections even when no request comes to check them out.
                ticks = ticks.wrapping_add(1);
                if ticks.is_multiple_of(per_sweep) {
                    for cluster in &shared.snapshot.load().clusters {
                        cluster.pool(index).sweep();
                    }
                }
            }
        })
    };
    let snapshot = shared.snapshot.load_full();
    // Every accept loop runs until the shutdown signal; the drain starts when all have stopped.
    let mut loops: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>> =
        Vec::new();
    let mut tcp_listeners = Vec::new();
    for (i, socket) in sockets.into_iter().enumerate() {
        let socket = match TcpListener::from_std(socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot register a listener");
                continue;
            }
        };
        match snapshot.config.listeners[i].kind {
            ListenerKind::Http { .. } => loops.push(Box::pin(listener::http::serve(
                socket,
                i,
                index,
                shared.clone(),
                &drain,
                shutdown.clone(),
            ))),
            ListenerKind::Tcp { .. } => {
                tcp_listeners.push(i);
                loops.push(Box::pin(listener::tcp::serve(
                    socket,
                    i,
                    shared.clone(),
                    shutdown.clone(),
                )));
            }
        }
    }
    drop(snapshot);
    futures_util::future::join_all(loops).await;
    let grace = shared.snapshot.load().config.shutdown_grace;
    let deadline = tokio::time::Instant::now() + grace;
    if tokio::time::timeout_at(deadline, drain.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            worker = index,
            "grace period over with requests still in flight"
        );
    }
    // TCP tunnels have no request boundaries: give them the rest of the grace period.
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while tcp_listeners
        .iter()
        .any(|&i| shared.connections[i].load(std::sync::atomic::Ordering::Relaxed) > 0)
        && tokio::time::Instant::now() < deadline
    {
        tick.tick().await;
    }
    flusher.abort();
    shared.access_log.flush();
}
