//! Shared run-time state: the current config snapshot (swapped whole on reload), metrics, the
//! access log, and readiness.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{self, Config, ListenerKind};
use crate::config::{Locate, ShardSet};
use crate::resilience::RateLimiter;
use crate::shard::DirectoryState;
use crate::telemetry::recent::RecentRequests;
use crate::telemetry::{AccessLog, ListenerStats, Metrics, RouteStats, ShardStats};
use crate::upstream::{self, ClusterState};
use prometheus_client::metrics::counter::Counter;

/// Everything a request needs from one config generation. A request loads it once and finishes
/// on it, even if a reload swaps in another meanwhile.
#[derive(Debug)]
pub struct Snapshot {
    pub config: Config,
    /// Run-time clusters, indexed like `config.clusters`.
    pub clusters: Vec<Arc<ClusterState>>,
    /// Per listener (indexed like `config.listeners`): metric handles.
    pub listeners: Vec<ListenerRuntime>,
    /// Run-time directories, indexed like `config.directories`.
    pub directories: Vec<Arc<DirectoryState>>,
    /// Per shard set, per shard: metric handles.
    pub shard_stats: Vec<Vec<ShardStats>>,
    /// Per split, per variant: the request counter.
    pub split_stats: Vec<Vec<Counter>>,
    /// Per listener, per route: the route's rate limiter, if it has one.
    pub rate_limiters: Vec<Vec<Option<RateLimiter>>>,
    pub generation: u64,
}

/// Metric handles of one listener and its routes.
#[derive(Debug)]
pub struct ListenerRuntime {
    pub stats: ListenerStats,
    pub routes: Vec<RouteStats>,
}

/// An extra admin handler: gets the method and path (and body), answers or passes (`None`).
pub type AdminHook = Arc<
    dyn Fn(
            http::Method,
            String,
            bytes::Bytes,
        ) -> futures_util::future::BoxFuture<
            'static,
            Option<http::Response<http_body_util::Full<bytes::Bytes>>>,
        > + Send
        + Sync,
>;

/// State shared by every worker, the admin listener and the signal handler.
pub struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub workers: usize,
    pub config_path: PathBuf,
    /// Open client connections per listener (for `max_connections`).
    pub connections: Vec<AtomicUsize>,
    /// The last requests, for the dashboard.
    pub recent: RecentRequests,
    /// Extra admin routes (the demo's fault controls), answered before the built-in ones.
    pub admin_hook: std::sync::OnceLock<AdminHook>,
    pub started: std::time::Instant,
    ready: AtomicBool,
    generation: AtomicU64,
}

impl Snapshot {
    /// Builds a snapshot; clusters whose definition did not change are taken over from
    /// `previous` with their state (health, pools).
    pub fn build(
        config: Config,
        previous: Option<&Snapshot>,
        metrics: &Metrics,
        workers: usize,
        generation: u64,
    ) -> Snapshot {
        let clusters: Vec<Arc<ClusterState>> = config
            .clusters
            .iter()
            .map(|c| {
                previous
                    .and_then(|p| p.clusters.iter().find(|old| old.config == *c))
                    .cloned()
                    .unwrap_or_else(|| {
                        ClusterState::new(c.clone(), workers, metrics.cluster(&c.name))
                    })
            })
            .collect();
        let listeners = config
            .listeners
            .iter()
            .map(|l| ListenerRuntime {
                stats: metrics.listener(&l.name),
                routes: match &l.kind {
                    ListenerKind::Http { routes, .. } => routes
                        .iter()
                        .map(|r| metrics.route(&l.name, &r.name))
                        .collect(),
                    ListenerKind::Tcp { .. } => Vec::new(),
                },
            })
            .collect();
        let directories = config
            .directories
            .iter()
            .map(|d| {
                previous
                    .and_then(|p| {
                        p.directories
                            .iter()
                            .find(|old| old.reusable_for(d, &clusters))
                    })
                    .cloned()
                    .unwrap_or_else(|| {
                        DirectoryState::new(d.clone(), &clusters, metrics.directory(&d.name))
                    })
            })
            .collect();
        let shard_stats = config
            .shard_sets
            .iter()
            .map(|s| {
                s.shards
                    .iter()
                    .map(|sh| metrics.shard(&s.name, &sh.name))
                    .collect()
            })
            .collect();
        let split_stats = config
            .splits
            .iter()
            .map(|s| {
                s.variants
                    .iter()
                    .map(|v| metrics.split_variant(&s.name, &v.name))
                    .collect()
            })
            .collect();
        let rate_limiters = config
            .listeners
            .iter()
            .map(|l| match &l.kind {
                ListenerKind::Http { routes, .. } => routes
                    .iter()
                    .map(|r| {
                        r.rate_limit
                            .as_ref()
                            .map(|p| RateLimiter::new(p.per_second, p.burst, p.max_keys))
                    })
                    .collect(),
                ListenerKind::Tcp { .. } => Vec::new(),
            })
            .collect();
        Snapshot {
            config,
            clusters,
            listeners,
            directories,
            shard_stats,
            split_stats,
            rate_limiters,
            generation,
        }
    }

    /// The directory a shard set reads, if any.
    pub fn directory_of(&self, set: &ShardSet) -> Option<&DirectoryState> {
        match set.locate {
            Locate::Region(d) | Locate::Shard(d) => self.directories.get(d).map(|d| &**d),
            Locate::Hash => None,
        }
    }

    /// Starts DNS resolution and health checks for clusters new in this snapshot, and resolves
    /// their DNS endpoints once before the snapshot serves.
    pub async fn start(&self, previous: Option<&Snapshot>) {
        for c in &self.clusters {
            let reused = previous.is_some_and(|p| p.clusters.iter().any(|o| Arc::ptr_eq(o, c)));
            if reused {
                continue;
            }
            if c.config.uses_dns() {
                if let Err(e) = c.resolve().await {
                    tracing::warn!(cluster = %c.config.name, error = %e, "DNS resolution failed");
                }
            }
            upstream::spawn_background(c);
        }
        for d in &self.directories {
            let reused = previous.is_some_and(|p| p.directories.iter().any(|o| Arc::ptr_eq(o, d)));
            if !reused && matches!(d.config.source, crate::config::DirectorySource::File(_)) {
                let weak = Arc::downgrade(d);
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                    loop {
                        tick.tick().await;
                        let Some(d) = weak.upgrade() else { return };
                        d.refresh_file();
                    }
                });
            }
        }
    }
}

impl Shared {
    /// Shared state for a first, valid config.
    pub fn new(
        config: Config,
        config_path: PathBuf,
        workers: usize,
        access_log: AccessLog,
    ) -> Arc<Shared> {
        let metrics = Metrics::new();
        let connections = config
            .listeners
            .iter()
            .map(|_| AtomicUsize::new(0))
            .collect();
        let snapshot = Snapshot::build(config, None, &metrics, workers, 1);
        Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            metrics,
            access_log,
            workers,
            config_path,
            connections,
            recent: RecentRequests::default(),
            admin_hook: std::sync::OnceLock::new(),
            started: std::time::Instant::now(),
            ready: AtomicBool::new(false),
            generation: AtomicU64::new(1),
        })
    }

    /// Whether `/ready` says yes.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Re-reads the config file and swaps it in when valid. A bad file is refused with its
    /// errors and the running config stays.
    pub async fn reload(&self) -> Result<u64, String> {
        let result = self.try_reload().await;
        self.metrics.reload(result.is_ok());
        match &result {
            Ok(generation) => tracing::info!(generation, "config reloaded"),
            Err(e) => tracing::error!("config reload refused; the running config stays:\n{e}"),
        }
        result
    }

    async fn try_reload(&self) -> Result<u64, String> {
        let config = Config::load(&self.config_path).map_err(|e| e.to_string())?;
        let current = self.snapshot.load_full();
        check_listeners_unchanged(&current.config, &config)?;
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        let next = Snapshot::build(
            config,
            Some(&current),
            &self.metrics,
            self.workers,
            generation,
        );
        next.start(Some(&current)).await;
        self.snapshot.store(Arc::new(next));
        Ok(generation)
    }
}

/// Listeners are bound once at start; a reload may change routes and clusters, not sockets.
fn check_listeners_unchanged(old: &Config, new: &Config) -> Result<(), String> {
    let shape = |c: &Config| -> Vec<(String, std::net::SocketAddr, bool)> {
        c.listeners
            .iter()
            .map(|l| {
                (
                    l.name.clone(),
                    l.address,
                    matches!(l.kind, ListenerKind::Tcp { .. }),
                )
            })
            .collect()
    };
    if shape(old) != shape(new) || old.admin != new.admin {
        return Err(format!(
            "{}: listeners or the admin address changed; that needs a restart",
            new.source.display()
        ));
    }
    Ok(())
}

/// Access log target: the flag overrides the config.
pub fn access_log_target(config: &Config, flag: Option<&str>) -> config::AccessLog {
    match flag {
        Some(f) => config::AccessLog::parse(f),
        None => config.access_log.clone(),
    }
}
