//! Upstream clusters at run time: endpoints with their live state, connection pools, endpoint
//! discovery (static and DNS) and active health checks.
//!
//! A [`ClusterState`] is built from a config [`Cluster`] and kept across reloads while its
//! definition does not change, so endpoint health, in-flight counts and pooled connections
//! survive a reload. Each worker thread has its own pools, so pool bookkeeping never crosses
//! threads: HTTP/1.1 clusters use [`h1::Pool`] (connections driven from the request's own
//! task, with attache's own codec in `wire` for every request whose body is in memory),
//! HTTP/2 clusters, health checks and directory lookups hyper-util's pooled client
//! ([`ClusterState::client`]).

pub mod h1;
mod health;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::proxy::ClientBody;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::uri::Authority;
use http_body_util::{Either, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::balance::{self, Candidate};
use crate::config::{Cluster, EndpointSpec, Outlier, UpstreamProtocol};
use crate::resilience::{Breaker, ConcurrencyLimit, RetryBudget};
use crate::telemetry::ClusterStats;

pub use health::spawn_background;

/// A request body as sent upstream: streamed from the client, or replayed from a buffer.
pub type ReqBody = Either<ClientBody, Full<Bytes>>;

/// A pooled HTTP client for one cluster on one worker.
pub type Client = hyper_util::client::legacy::Client<HttpConnector, ReqBody>;

/// One upstream address and what attache knows of it.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as a URI authority, made once.
    pub authority: Authority,
    identity: u64,
    in_flight: AtomicU32,
    healthy: AtomicBool,
    health_successes: AtomicU32,
    health_failures: AtomicU32,
    /// Requests sent to this endpoint.
    pub requests: AtomicU64,
    /// Requests that failed (connect errors, resets, timeouts).
    pub failures: AtomicU64,
    /// Outlier ejection: this endpoint's breaker.
    pub breaker: Option<Breaker>,
}

impl Endpoint {
    fn new(addr: SocketAddr, outlier: Option<&Outlier>) -> Arc<Endpoint> {
        let authority = Authority::try_from(addr.to_string().as_str())
            .unwrap_or_else(|_| Authority::from_static("invalid"));
        Arc::new(Endpoint {
            addr,
            authority,
            identity: balance::identity_of(&addr.to_string()),
            in_flight: AtomicU32::new(0),
            healthy: AtomicBool::new(true),
            health_successes: AtomicU32::new(0),
            health_failures: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            breaker: outlier.map(|o| Breaker::new(o.breaker.clone())),
        })
    }

    /// Whether the outlier detector lets traffic through now.
    pub fn not_ejected(&self) -> bool {
        self.breaker.as_ref().is_none_or(|b| b.would_admit())
    }

    /// Whether health checks currently let it take traffic.
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Requests in flight.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Marks a request in flight until the guard drops.
    pub fn start_request(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Records a health check result; returns the new health when it changed.
    fn health_result(
        &self,
        ok: bool,
        healthy_threshold: u32,
        unhealthy_threshold: u32,
    ) -> Option<bool> {
        if ok {
            self.health_failures.store(0, Ordering::Relaxed);
            let n = self.health_successes.fetch_add(1, Ordering::Relaxed) + 1;
            if !self.healthy() && n >= healthy_threshold {
                self.healthy.store(true, Ordering::Relaxed);
                return Some(true);
            }
        } else {
            self.health_successes.store(0, Ordering::Relaxed);
            let n = self.health_failures.fetch_add(1, Ordering::Relaxed) + 1;
            if self.healthy() && n >= unhealthy_threshold {
                self.healthy.store(false, Ordering::Relaxed);
                return Some(false);
            }
        }
        None
    }
}

impl Candidate for Arc<Endpoint> {
    fn available(&self) -> bool {
        self.healthy() && self.not_ejected()
    }
    fn load(&self) -> u32 {
        self.in_flight()
    }
    fn identity(&self) -> u64 {
        self.identity
    }
}

/// An endpoint seen by health alone (outlier ejection ignored).
struct HealthOnly(Arc<Endpoint>);

impl Candidate for HealthOnly {
    fn available(&self) -> bool {
        self.0.healthy()
    }
    fn load(&self) -> u32 {
        self.0.in_flight()
    }
    fn identity(&self) -> u64 {
        self.0.identity
    }
}

/// A request in flight to an endpoint; dropping it ends the request.
#[derive(Debug)]
pub struct InFlight(pub Arc<Endpoint>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A cluster at run time.
pub struct ClusterState {
    pub config: Cluster,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    counter: AtomicUsize,
    clients: Vec<Client>,
    /// HTTP/1.1 connections driven from the request's task, one pool per worker.
    pools: Vec<Arc<h1::Pool>>,
    pub stats: ClusterStats,
    /// Retries allowed to this cluster.
    pub budget: RetryBudget,
    /// The cluster's circuit breaker, when configured.
    pub breaker: Option<Breaker>,
    /// In-flight and pending limits, when configured.
    pub limit: Option<ConcurrencyLimit>,
    /// Breaker transitions already counted in metrics.
    pub breaker_reported: AtomicU64,
}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterState")
            .field("name", &self.config.name)
            .finish()
    }
}

impl ClusterState {
    /// Builds a cluster with one pool per worker. DNS endpoints join on the first resolution.
    pub fn new(config: Cluster, workers: usize, stats: ClusterStats) -> Arc<ClusterState> {
        let endpoints = config
            .endpoints
            .iter()
            .filter_map(|e| match e {
                EndpointSpec::Addr(a) => Some(Endpoint::new(*a, config.outlier.as_ref())),
                EndpointSpec::Dns { .. } => None,
            })
            .collect();
        let clients = (0..workers.max(1)).map(|_| build_client(&config)).collect();
        let pools = (0..workers.max(1))
            .map(|_| {
                Arc::new(h1::Pool::new(
                    config.max_idle_per_endpoint,
                    config.idle_timeout,
                    config.connect_timeout,
                ))
            })
            .collect();
        Arc::new(ClusterState {
            budget: RetryBudget::new(
                config.retry.budget_permille,
                config.retry.budget_min_per_second,
            ),
            breaker: config.breaker.clone().map(Breaker::new),
            limit: config
                .max_requests
                .map(|m| ConcurrencyLimit::new(m, config.max_pending)),
            breaker_reported: AtomicU64::new(0),
            config,
            endpoints: ArcSwap::from_pointee(endpoints),
            counter: AtomicUsize::new(0),
            clients,
            pools,
            stats,
        })
    }

    /// The current endpoints.
    pub fn endpoints(&self) -> arc_swap::Guard<Arc<Vec<Arc<Endpoint>>>> {
        self.endpoints.load()
    }

    /// Picks an endpoint with the cluster's balance; `key` is the hashed consistent-hash key.
    pub fn pick(&self, key: Option<u64>, avoid: Option<SocketAddr>) -> Option<Arc<Endpoint>> {
        let endpoints = self.endpoints.load();
        let avoid = avoid.and_then(|a| endpoints.iter().position(|e| e.addr == a));
        // Outlier ejection never takes out more than its share of the cluster: past it, every
        // healthy endpoint takes traffic again (Envoy's "panic" rule).
        if let Some(o) = &self.config.outlier {
            let ejected = endpoints.iter().filter(|e| !e.not_ejected()).count();
            if ejected > 0 && ejected * 100 > endpoints.len() * o.max_ejected_percent as usize {
                let healthy: Vec<HealthOnly> =
                    endpoints.iter().map(|e| HealthOnly(e.clone())).collect();
                return balance::pick(&self.config.balance, &healthy, &self.counter, key, avoid)
                    .map(|i| endpoints[i].clone());
            }
        }
        balance::pick(&self.config.balance, &endpoints, &self.counter, key, avoid)
            .map(|i| endpoints[i].clone())
    }

    /// Whether the cluster can take a request now: its breaker would admit one and an
    /// endpoint is healthy.
    pub fn available(&self) -> bool {
        self.breaker.as_ref().is_none_or(|b| b.would_admit())
            && self.endpoints.load().iter().any(|e| e.healthy())
    }

    /// This worker's pooled client.
    pub fn client(&self, worker: usize) -> &Client {
        &self.clients[worker % self.clients.len()]
    }

    /// This worker's pool of HTTP/1.1 connections (the request path of HTTP/1.1 clusters).
    pub fn pool(&self, worker: usize) -> &Arc<h1::Pool> {
        &self.pools[worker % self.pools.len()]
    }

    /// Re-resolves DNS endpoints; keeps the state of addresses that stay.
    pub async fn resolve(&self) -> Result<(), String> {
        let mut addrs: Vec<SocketAddr> = Vec::new();
        let mut errors = Vec::new();
        for spec in &self.config.endpoints {
            match spec {
                EndpointSpec::Addr(a) => addrs.push(*a),
                EndpointSpec::Dns { host, port } => {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(found) => addrs.extend(found),
                        Err(e) => errors.push(format!("{host}: {e}")),
                    }
                }
            }
        }
        if !errors.is_empty() && addrs.is_empty() {
            // Keep the last known endpoints rather than emptying the cluster.
            return Err(errors.join("; "));
        }
        addrs.sort();
        addrs.dedup();
        let old = self.endpoints.load();
        let next: Vec<Arc<Endpoint>> = addrs
            .into_iter()
            .map(|a| {
                old.iter()
                    .find(|e| e.addr == a)
                    .cloned()
                    .unwrap_or_else(|| Endpoint::new(a, self.config.outlier.as_ref()))
            })
            .collect();
        self.endpoints.store(Arc::new(next));
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// `/clusters` view.
    pub fn status_json(&self) -> serde_json::Value {
        let endpoints: Vec<_> = self
            .endpoints
            .load()
            .iter()
            .map(|e| {
                serde_json::json!({
                    "address": e.addr.to_string(),
                    "healthy": e.healthy(),
                    "in_flight": e.in_flight(),
                    "requests": e.requests.load(Ordering::Relaxed),
                    "failures": e.failures.load(Ordering::Relaxed),
                    "ejected": !e.not_ejected(),
                    "breaker": e.breaker.as_ref().map(|b| b.status_json()),
                })
            })
            .collect();
        let healthy = self.endpoints.load().iter().filter(|e| e.healthy()).count();
        serde_json::json!({
            "name": self.config.name,
            "balance": self.config.balance.name(),
            "healthy_endpoints": healthy,
            "endpoints": endpoints,
            "breaker": self.breaker.as_ref().map(|b| b.status_json()),
            "retry_budget_exhausted": self.budget.exhausted.load(Ordering::Relaxed),
            "pending": self.limit.as_ref().map(|l| l.pending()),
        })
    }
}

fn build_client(config: &Cluster) -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(config.connect_timeout));
    connector.enforce_http(true);
    let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(config.idle_timeout)
        .pool_max_idle_per_host(config.max_idle_per_endpoint)
        // A request on a pooled connection that the upstream closed meanwhile is retried once
        // on a fresh connection: it never reached the upstream.
        .retry_canceled_requests(true)
        .set_host(false);
    if config.protocol == UpstreamProtocol::Http2 {
        builder.http2_only(true);
    }
    builder.build(connector)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_thresholds() {
        let e = Endpoint::new("127.0.0.1:1".parse().unwrap(), None);
        assert_eq!(e.health_result(false, 2, 3), None);
        assert_eq!(e.health_result(false, 2, 3), None);
        assert_eq!(e.health_result(false, 2, 3), Some(false));
        assert!(!e.healthy());
        assert_eq!(e.health_result(true, 2, 3), None);
        assert_eq!(e.health_result(false, 2, 3), None);
        assert_eq!(e.health_result(true, 2, 3), None);
        assert_eq!(e.health_result(true, 2, 3), Some(true));
        assert!(e.healthy());
    }
}
