//! Prometheus metrics (prometheus-client), with a lock-free latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram made of atomics. prometheus-client's own histogram takes a lock on
/// every observation; this one is what the request path can afford.
#[derive(Clone, Debug, Default)]
pub struct Histogram {
    inner: Arc<HistogramInner>,
}

#[derive(Debug, Default)]
struct HistogramInner {
    /// Non-cumulative counts; the last slot is +Inf.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Histogram {
    /// Records one duration.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let slot = BUCKETS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BUCKETS.len());
        self.inner.counts[slot].fetch_add(1, Ordering::Relaxed);
        self.inner
            .sum_nanos
            .fetch_add(d.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Count per bucket (non-cumulative), +Inf last.
    pub fn counts(&self) -> [u64; BUCKETS.len() + 1] {
        std::array::from_fn(|i| self.inner.counts[i].load(Ordering::Relaxed))
    }

    /// An estimate of quantile `q` (0..1) from bucket counts, by linear interpolation.
    pub fn quantile_of(counts: &[u64], q: f64) -> Option<f64> {
        let total: u64 = counts.iter().sum();
        if total == 0 {
            return None;
        }
        let target = q * total as f64;
        let mut seen = 0.0;
        let mut lower = 0.0;
        for (i, c) in counts.iter().enumerate() {
            let upper = BUCKETS
                .get(i)
                .copied()
                .unwrap_or(BUCKETS[BUCKETS.len() - 1] * 2.0);
            let next = seen + *c as f64;
            if next >= target && *c > 0 {
                return Some(lower + (upper - lower) * ((target - seen) / *c as f64));
            }
            seen = next;
            lower = upper;
        }
        Some(lower)
    }
}

impl TypedMetric for Histogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Histogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // prometheus-client takes per-bucket counts and makes them cumulative itself.
        let counts = self.counts();
        let buckets: Vec<(f64, u64)> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| (BUCKETS.get(i).copied().unwrap_or(f64::MAX), *c))
            .collect();
        let total = counts.iter().sum();
        let sum = self.inner.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, total, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Status classes counted separately: 1xx..5xx.
pub fn class_index(status: u16) -> usize {
    ((status / 100) as usize).clamp(1, 5) - 1
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// Per-route handles.
#[derive(Clone, Debug)]
pub struct RouteStats {
    pub requests: Counter,
    pub responses: [Counter; 5],
    pub latency: Histogram,
}

/// Per-cluster handles.
#[derive(Clone, Debug)]
pub struct ClusterStats {
    pub requests: Counter,
    pub responses: [Counter; 5],
    pub latency: Histogram,
    pub active: Gauge,
    pub retries: Counter,
    pub budget_exhausted: Counter,
    pub overloaded: Counter,
    /// 0 closed, 1 open, 2 half-open.
    pub breaker_state: Gauge,
    pub breaker_transitions: Counter,
    pub ejections: Counter,
    pub hedges: Counter,
}

/// Per-listener handles.
#[derive(Clone, Debug)]
pub struct ListenerStats {
    pub connections: Counter,
    pub active_connections: Gauge,
    pub refused_connections: Counter,
    /// Idle HTTP/1.1 connections parked (hyper's state released until the client sends).
    pub parked_connections: Gauge,
}

/// Per-directory handles.
#[derive(Clone, Debug)]
pub struct DirectoryStats {
    pub hits: Counter,
    pub misses: Counter,
    pub stale: Counter,
    pub errors: Counter,
    pub inflight: Gauge,
}

/// Per-shard handles.
#[derive(Clone, Debug)]
pub struct ShardStats {
    pub requests: Counter,
    pub errors: Counter,
    pub latency: Histogram,
}

/// The registry and its families.
pub struct Metrics {
    registry: Mutex<Registry>,
    requests: Family<Labels, Counter>,
    responses: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
    upstream_requests: Family<Labels, Counter>,
    upstream_responses: Family<Labels, Counter>,
    upstream_latency: Family<Labels, Histogram>,
    upstream_active: Family<Labels, Gauge>,
    upstream_errors: Family<Labels, Counter>,
    connections: Family<Labels, Counter>,
    active_connections: Family<Labels, Gauge>,
    refused_connections: Family<Labels, Counter>,
    parked_connections: Family<Labels, Gauge>,
    reloads: Family<Labels, Counter>,
    /// Requests answered by attache itself, by reason.
    local_replies: Family<Labels, Counter>,
    directory_hits: Family<Labels, Counter>,
    directory_misses: Family<Labels, Counter>,
    directory_stale: Family<Labels, Counter>,
    directory_errors: Family<Labels, Counter>,
    directory_inflight: Family<Labels, Gauge>,
    shard_requests: Family<Labels, Counter>,
    split_requests: Family<Labels, Counter>,
    shard_errors: Family<Labels, Counter>,
    shard_latency: Family<Labels, Histogram>,
    residency_denials: Family<Labels, Counter>,
    partial_responses: Family<Labels, Counter>,
    retries: Family<Labels, Counter>,
    budget_exhausted: Family<Labels, Counter>,
    overloaded: Family<Labels, Counter>,
    breaker_state: Family<Labels, Gauge>,
    breaker_transitions: Family<Labels, Counter>,
    ejections: Family<Labels, Counter>,
    hedges: Family<Labels, Counter>,
    rate_limited: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Metrics {
    /// Creates the registry with every family registered.
    pub fn new() -> Self {
        let m = Metrics {
            registry: Mutex::new(Registry::with_prefix("attache")),
            requests: Family::default(),
            responses: Family::default(),
            latency: Family::default(),
            upstream_requests: Family::default(),
            upstream_responses: Family::default(),
            upstream_latency: Family::default(),
            upstream_active: Family::default(),
            upstream_errors: Family::default(),
            connections: Family::default(),
            active_connections: Family::default(),
            refused_connections: Family::default(),
            parked_connections: Family::default(),
            reloads: Family::default(),
            local_replies: Family::default(),
            directory_hits: Family::default(),
            directory_misses: Family::default(),
            directory_stale: Family::default(),
            directory_errors: Family::default(),
            directory_inflight: Family::default(),
            shard_requests: Family::default(),
            split_requests: Family::default(),
            shard_errors: Family::default(),
            shard_latency: Family::default(),
            residency_denials: Family::default(),
            partial_responses: Family::default(),
            retries: Family::default(),
            budget_exhausted: Family::default(),
            overloaded: Family::default(),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            ejections: Family::default(),
            hedges: Family::default(),
            rate_limited: Family::default(),
        };
        if let Ok(mut r) = m.registry.lock() {
            r.register(
                "requests",
                "Requests received, by listener and route",
                m.requests.clone(),
            );
            r.register(
                "responses",
                "Responses sent, by listener, route and status class",
                m.responses.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Time from request head to end of response, by listener and route",
                m.latency.clone(),
            );
            r.register(
                "upstream_requests",
                "Requests sent to a cluster",
                m.upstream_requests.clone(),
            );
            r.register(
                "upstream_responses",
                "Upstream responses, by cluster and status class",
                m.upstream_responses.clone(),
            );
            r.register(
                "upstream_duration_seconds",
                "Upstream time to response head, by cluster",
                m.upstream_latency.clone(),
            );
            r.register(
                "upstream_active_requests",
                "Requests in flight to a cluster",
                m.upstream_active.clone(),
            );
            r.register(
                "upstream_errors",
                "Upstream failures, by cluster and reason",
                m.upstream_errors.clone(),
            );
            r.register(
                "connections",
                "Client connections accepted, by listener",
                m.connections.clone(),
            );
            r.register(
                "active_connections",
                "Client connections open, by listener",
                m.active_connections.clone(),
            );
            r.register(
                "refused_connections",
                "Client connections refused over max_connections",
                m.refused_connections.clone(),
            );
            r.register(
                "parked_connections",
                "Idle HTTP/1.1 client connections holding only their socket, by listener",
                m.parked_connections.clone(),
            );
            r.register(
                "config_reloads",
                "Config reloads, by result",
                m.reloads.clone(),
            );
            r.register(
                "local_replies",
                "Responses attache answered itself, by reason",
                m.local_replies.clone(),
            );
            r.register(
                "directory_cache_hits",
                "Directory lookups answered from the cache",
                m.directory_hits.clone(),
            );
            r.register(
                "directory_cache_misses",
                "Directory lookups that went to the lookup service",
                m.directory_misses.clone(),
            );
            r.register(
                "directory_stale_serves",
                "Stale entries served because the lookup service failed",
                m.directory_stale.clone(),
            );
            r.register(
                "directory_lookup_errors",
                "Failed lookups",
                m.directory_errors.clone(),
            );
            r.register(
                "directory_lookups_in_flight",
                "Lookups in flight (single-flight: one per key)",
                m.directory_inflight.clone(),
            );
            r.register(
                "shard_requests",
                "Requests sent to a shard",
                m.shard_requests.clone(),
            );
            r.register(
                "split_requests",
                "Requests given each variant of a split, by split and variant",
                m.split_requests.clone(),
            );
            r.register(
                "shard_errors",
                "Requests to a shard that failed or got a 5xx",
                m.shard_errors.clone(),
            );
            r.register(
                "shard_duration_seconds",
                "Shard time to response head",
                m.shard_latency.clone(),
            );
            r.register(
                "residency_denials",
                "Requests refused because no allowed shard could serve",
                m.residency_denials.clone(),
            );
            r.register(
                "partial_responses",
                "Scatter-gather answers with missing shards",
                m.partial_responses.clone(),
            );
            r.register("retries", "Retries sent to a cluster", m.retries.clone());
            r.register(
                "retry_budget_exhausted",
                "Retries refused because the cluster's retry budget was empty",
                m.budget_exhausted.clone(),
            );
            r.register(
                "overloaded",
                "Requests refused by a cluster's concurrency limit",
                m.overloaded.clone(),
            );
            r.register(
                "breaker_state",
                "Cluster circuit breaker: 0 closed, 1 open, 2 half-open",
                m.breaker_state.clone(),
            );
            r.register(
                "breaker_transitions",
                "Cluster circuit breaker state changes",
                m.breaker_transitions.clone(),
            );
            r.register(
                "outlier_ejections",
                "Endpoints ejected by outlier detection",
                m.ejections.clone(),
            );
            r.register("hedges", "Hedged second tries", m.hedges.clone());
            r.register(
                "rate_limited",
                "Requests refused by a route's rate limit",
                m.rate_limited.clone(),
            );
        }
        m
    }

    /// Handles for one route.
    pub fn route(&self, listener: &str, route: &str) -> RouteStats {
        let base = [("listener", listener), ("route", route)];
        RouteStats {
            requests: self.requests.get_or_create(&labels(&base)).clone(),
            responses: CLASSES.map(|c| {
                self.responses
                    .get_or_create(&labels(&[base[0], base[1], ("class", c)]))
                    .clone()
            }),
            latency: self.latency.get_or_create(&labels(&base)).clone(),
        }
    }

    /// Handles for one cluster.
    pub fn cluster(&self, cluster: &str) -> ClusterStats {
        let base = [("cluster", cluster)];
        ClusterStats {
            requests: self.upstream_requests.get_or_create(&labels(&base)).clone(),
            responses: CLASSES.map(|c| {
                self.upstream_responses
                    .get_or_create(&labels(&[base[0], ("class", c)]))
                    .clone()
            }),
            latency: self.upstream_latency.get_or_create(&labels(&base)).clone(),
            active: self.upstream_active.get_or_create(&labels(&base)).clone(),
            retries: self.retries.get_or_create(&labels(&base)).clone(),
            budget_exhausted: self.budget_exhausted.get_or_create(&labels(&base)).clone(),
            overloaded: self.overloaded.get_or_create(&labels(&base)).clone(),
            breaker_state: self.breaker_state.get_or_create(&labels(&base)).clone(),
            breaker_transitions: self
                .breaker_transitions
                .get_or_create(&labels(&base))
                .clone(),
            ejections: self.ejections.get_or_create(&labels(&base)).clone(),
            hedges: self.hedges.get_or_create(&labels(&base)).clone(),
        }
    }

    /// Handles for one listener.
    pub fn listener(&self, listener: &str) -> ListenerStats {
        let base = labels(&[("listener", listener)]);
        ListenerStats {
            connections: self.connections.get_or_create(&base).clone(),
            active_connections: self.active_connections.get_or_create(&base).clone(),
            refused_connections: self.refused_connections.get_or_create(&base).clone(),
            parked_connections: self.parked_connections.get_or_create(&base).clone(),
        }
    }

    /// Handles for one directory.
    pub fn directory(&self, name: &str) -> DirectoryStats {
        let l = labels(&[("directory", name)]);
        DirectoryStats {
            hits: self.directory_hits.get_or_create(&l).clone(),
            misses: self.directory_misses.get_or_create(&l).clone(),
            stale: self.directory_stale.get_or_create(&l).clone(),
            errors: self.directory_errors.get_or_create(&l).clone(),
            inflight: self.directory_inflight.get_or_create(&l).clone(),
        }
    }

    /// Handles for one shard of a set.
    pub fn shard(&self, set: &str, shard: &str) -> ShardStats {
        let l = labels(&[("shard_set", set), ("shard", shard)]);
        ShardStats {
            requests: self.shard_requests.get_or_create(&l).clone(),
            errors: self.shard_errors.get_or_create(&l).clone(),
            latency: self.shard_latency.get_or_create(&l).clone(),
        }
    }

    /// The request counter of one variant of a split.
    pub fn split_variant(&self, split: &str, variant: &str) -> Counter {
        self.split_requests
            .get_or_create(&labels(&[("split", split), ("variant", variant)]))
            .clone()
    }

    /// Counts a residency denial (the failure path).
    pub fn residency_denial(&self, set: &str, region: &str) {
        self.residency_denials
            .get_or_create(&labels(&[("shard_set", set), ("region", region)]))
            .inc();
    }

    /// Residency denials over every set and region (for the dashboard).
    pub fn residency_denials_total(&self) -> u64 {
        // Families keep no list of their members; encode and sum is the public way, and the
        // dashboard's poll rate makes its cost irrelevant.
        let mut out = String::new();
        let mut r = Registry::default();
        r.register("d", "", self.residency_denials.clone());
        if prometheus_client::encoding::text::encode(&mut out, &r).is_err() {
            return 0;
        }
        out.lines()
            .filter(|l| l.starts_with("d_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }

    /// Counts a request refused by a rate limit.
    pub fn rate_limited(&self, listener: &str, route: &str) {
        self.rate_limited
            .get_or_create(&labels(&[("listener", listener), ("route", route)]))
            .inc();
    }

    /// Counts a partial scatter-gather answer.
    pub fn partial(&self, set: &str) {
        self.partial_responses
            .get_or_create(&labels(&[("shard_set", set)]))
            .inc();
    }

    /// Counts an upstream failure (the failure path, where a label lookup is affordable).
    pub fn upstream_error(&self, cluster: &str, reason: &str) {
        self.upstream_errors
            .get_or_create(&labels(&[("cluster", cluster), ("reason", reason)]))
            .inc();
    }

    /// Counts a response attache answered itself.
    pub fn local_reply(&self, reason: &str) {
        self.local_replies
            .get_or_create(&labels(&[("reason", reason)]))
            .inc();
    }

    /// Counts a config reload attempt.
    pub fn reload(&self, ok: bool) {
        let result = if ok { "ok" } else { "rejected" };
        self.reloads
            .get_or_create(&labels(&[("result", result)]))
            .inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_counts_and_quantiles() {
        let h = Histogram::default();
        for _ in 0..90 {
            h.observe(Duration::from_micros(300));
        }
        for _ in 0..10 {
            h.observe(Duration::from_millis(200));
        }
        let counts = h.counts();
        assert_eq!(counts[0], 90);
        assert_eq!(counts.iter().sum::<u64>(), 100);
        let p50 = Histogram::quantile_of(&counts, 0.5).unwrap();
        assert!(p50 <= 0.0005, "{p50}");
        let p99 = Histogram::quantile_of(&counts, 0.99).unwrap();
        assert!(p99 > 0.1 && p99 <= 0.25, "{p99}");
    }

    #[test]
    fn exposition_has_families() {
        let m = Metrics::new();
        let r = m.route("main", "images");
        r.requests.inc();
        r.latency.observe(Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains("attache_requests_total{listener=\"main\",route=\"images\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("attache_request_duration_seconds_bucket{le=\"0.005\",listener=\"main\",route=\"images\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("attache_request_duration_seconds_bucket{le=\"+Inf\",listener=\"main\",route=\"images\"} 1"),
            "{text}"
        );
    }
}
