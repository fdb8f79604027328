//! Configuration: the YAML file, its validation, and the immutable [`Config`] the proxy runs.
//!
//! Two layers (house style): [`file`] mirrors the YAML with `deny_unknown_fields` and source
//! positions; [`validate`] converts it into [`Config`], made of real types (`SocketAddr`,
//! `Duration`, compiled regexes, cluster indices instead of names), collecting every error with
//! `file:line:column: field.path: message`. Nothing downstream ever sees an unchecked value.

pub mod duration;
pub mod file;
mod validate;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};

pub use crate::resilience::{BreakerPolicy, RetryPolicy};

pub use duration::{format_duration, parse_duration};

/// Default admin listener address (a DESIGN.md contract).
pub const DEFAULT_ADMIN_ADDRESS: &str = "127.0.0.1:9901";
/// How long a cluster waits for a TCP connect, by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a request waits for the upstream's response head, by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an idle pooled upstream connection is kept, by default.
pub const DEFAULT_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a client may take to send a request head, by default.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted, by default (larger gets 431).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 64 * 1024;
/// Connections a listener accepts at once, by default.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Open connections of a listener past which idle HTTP/1.1 connections park, by default.
pub const DEFAULT_PARK_IDLE_ABOVE: usize = 64;
/// How long in-flight requests may run after SIGTERM, by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// How often DNS endpoints are re-resolved, by default.
pub const DEFAULT_DNS_REFRESH: Duration = Duration::from_secs(30);

/// A validated configuration: what the proxy runs and what `attache explain` reads.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (for messages).
    pub source: PathBuf,
    pub admin: Admin,
    pub access_log: AccessLog,
    /// Worker threads, each a current-thread runtime with its own listeners (SO_REUSEPORT).
    /// `None`: one per CPU this process may run on.
    pub workers: Option<usize>,
    pub shutdown_grace: Duration,
    pub listeners: Vec<Listener>,
    /// Clusters, indexed by [`ClusterId`].
    pub clusters: Vec<Cluster>,
    /// Directories, indexed by [`DirectoryId`].
    pub directories: Vec<Directory>,
    /// Shard sets, indexed by [`ShardSetId`].
    pub shard_sets: Vec<ShardSet>,
    /// Traffic splits, indexed by [`SplitId`].
    pub splits: Vec<Split>,
}

/// Index of a cluster in [`Config::clusters`].
pub type ClusterId = usize;
/// Index of a directory in [`Config::directories`].
pub type DirectoryId = usize;
/// Index of a shard set in [`Config::shard_sets`].
pub type ShardSetId = usize;
/// Index of a shard in [`ShardSet::shards`].
pub type ShardId = usize;
/// Index of a split in [`Config::splits`].
pub type SplitId = usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admin {
    pub address: SocketAddr,
}

/// Where the JSON access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLog {
    Off,
    Stdout,
    File(PathBuf),
}

impl AccessLog {
    /// Parses `off`, `stdout` or a file path (the `--access-log` flag and the config field).
    pub fn parse(text: &str) -> Self {
        match text {
            "off" => AccessLog::Off,
            "stdout" | "-" => AccessLog::Stdout,
            path => AccessLog::File(PathBuf::from(path)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    pub kind: ListenerKind,
    pub max_connections: usize,
    /// While the listener holds more connections than this, an idle HTTP/1.1 connection parks:
    /// it releases its buffers (a 4 KiB read buffer and the response head's) until the client
    /// sends again. Below it, connections keep them and save an allocation per request.
    pub park_idle_above: usize,
    /// Time allowed for a request head to arrive (with a small body attache reads whole, for
    /// HTTP/1.1). For HTTP/1.1 it also bounds how long an idle keep-alive connection waits
    /// for its next request (the timer runs while the connection has no request in progress).
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
}

#[derive(Debug, Clone)]
pub enum ListenerKind {
    /// HTTP/1.1 and h2c on one port; requests go through `routes`, first match wins.
    Http {
        routes: Vec<Route>,
        forwarded: Forwarded,
    },
    /// Raw bytes to one cluster.
    Tcp { cluster: ClusterId },
}

/// Which forwarding headers attache adds to upstream requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forwarded {
    /// Append the client address to `x-forwarded-for` (default on).
    pub x_forwarded_for: bool,
    /// Set `x-forwarded-proto: http` (default on).
    pub x_forwarded_proto: bool,
    /// Append `1.1 attache` to `via` (default off: an ambassador is usually invisible).
    pub via: bool,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub rewrite_prefix: Option<String>,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    /// Time allowed for the upstream's response head (the cluster's timeout when not set).
    pub timeout: Duration,
    pub destination: Destination,
    /// The batch form of a shard-set route (scatter-gather).
    pub batch: Option<Batch>,
    /// Overrides the cluster's retry policy.
    pub retry: Option<RetryPolicy>,
    /// Overrides the cluster's per-try timeout.
    pub per_try_timeout: Option<Duration>,
    /// Hedging: after this delay, a second try to another endpoint (idempotent requests).
    pub hedge: Option<Duration>,
    pub rate_limit: Option<RateLimit>,
    pub fallback: Option<Fallback>,
}

/// Where a matched request goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Cluster(ClusterId),
    /// A shard of a set, chosen by the request's shard key.
    Shards(ShardSetId),
    /// A variant of a split, chosen per request (sticky per key).
    Split(SplitId),
}

/// A traffic split (beta testing, canaries): which variant a request gets is attache's
/// decision, made by [`crate::split::choose`].
#[derive(Debug, Clone)]
pub struct Split {
    pub name: String,
    /// Whose request it is; `None`: every request is spread by weight.
    pub key: Option<KeySource>,
    /// In the file's order of names; weights are taken in this order.
    pub variants: Vec<Variant>,
    /// Sum of the weights (at least 1).
    pub total_weight: u64,
    /// Where a request may name its variant outright.
    pub override_: Option<VariantOverride>,
    /// The variant of requests without a key; `None`: spread by weight.
    pub unkeyed: Option<usize>,
    /// Allow-listed keys and their variant, sorted by key (binary search).
    pub allow: Vec<(Box<str>, usize)>,
    /// A stable hash of the name: two splits put different keys in their first variants.
    pub salt: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub cluster: ClusterId,
    pub weight: u32,
}

/// A header or a cookie that names a variant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VariantOverride {
    Header(HeaderName),
    Cookie(String),
}

/// A set of shards, the key that picks one, and the residency policy.
#[derive(Debug, Clone)]
pub struct ShardSet {
    pub name: String,
    pub key: KeySource,
    pub locate: Locate,
    /// Where requests without a key go; `None` refuses them with 400 `shard-key-missing`.
    pub default_shard: Option<ShardId>,
    /// Region for keys the directory does not know; `None` refuses them (404).
    pub unknown_key_region: Option<String>,
    pub shards: Vec<Shard>,
    pub residency: Residency,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shard {
    pub name: String,
    pub cluster: ClusterId,
    /// The region the shard's data lives in (shown by explain, metrics, admin).
    pub region: Option<String>,
}

/// How a key finds its shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Locate {
    /// The directory names the key's region; residency names the shards allowed for it.
    Region(DirectoryId),
    /// The directory names the key's shard.
    Shard(DirectoryId),
    /// Rendezvous hashing over the shards: no directory, no failover.
    Hash,
}

/// Region → the shards allowed to hold its keys, in order of preference (first available
/// wins; the others are failover). A key is never sent anywhere else.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Residency {
    pub rules: Vec<(String, Vec<ShardId>)>,
    /// The `"*"` rule: every region not named.
    pub default: Option<Vec<ShardId>>,
}

impl Residency {
    /// The shards allowed for a region, or `None` when no rule covers it.
    pub fn allowed(&self, region: &str) -> Option<&[ShardId]> {
        self.rules
            .iter()
            .find(|(r, _)| r.eq_ignore_ascii_case(region))
            .map(|(_, s)| s.as_slice())
            .or(self.default.as_deref())
    }
}

/// Where a shard key is read from.
#[derive(Debug, Clone)]
pub enum KeySource {
    Header(HeaderName),
    Query(String),
    Cookie(String),
    Capture(String),
    Jwt(JwtKey),
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::Header(h) => write!(f, "header {h}"),
            KeySource::Query(q) => write!(f, "query parameter {q}"),
            KeySource::Cookie(c) => write!(f, "cookie {c}"),
            KeySource::Capture(c) => write!(f, "path capture {c}"),
            KeySource::Jwt(j) => write!(f, "JWT claim {} ({})", j.claim, j.verify.name()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct JwtKey {
    pub header: HeaderName,
    pub claim: String,
    pub verify: JwtVerify,
}

/// How a JWT's signature is checked. Key material is never shown by `/config`.
#[derive(Clone)]
pub enum JwtVerify {
    Hs256(Vec<u8>),
    Rs256(Vec<u8>),
    Es256(Vec<u8>),
    /// Claims read without a signature check: an explicit opt-in for deployments where a
    /// gateway in front already verified the token.
    UnverifiedBehindTrustedGateway,
}

impl JwtVerify {
    pub fn name(&self) -> &'static str {
        match self {
            JwtVerify::Hs256(_) => "HS256",
            JwtVerify::Rs256(_) => "RS256",
            JwtVerify::Es256(_) => "ES256",
            JwtVerify::UnverifiedBehindTrustedGateway => "unverified: trusted gateway",
        }
    }
}

impl fmt::Debug for JwtVerify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A directory: key → region or shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directory {
    pub name: String,
    pub source: DirectorySource,
    pub cache: CachePolicy,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectorySource {
    Table(std::collections::BTreeMap<String, String>),
    /// A YAML or JSON map in a file, re-read when it changes.
    File(PathBuf),
    /// A lookup service: `GET {path with the key}` on a cluster, the value at `pointer`.
    Http {
        cluster: ClusterId,
        path: String,
        pointer: String,
        timeout: Duration,
    },
}

/// Cache of an HTTP directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    pub ttl: Duration,
    /// How long "no such key" is remembered.
    pub negative_ttl: Duration,
    pub max_entries: usize,
    /// How long past its TTL an entry may still answer when the lookup service fails.
    pub stale_for: Duration,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            ttl: Duration::from_secs(60),
            negative_ttl: Duration::from_secs(10),
            max_entries: 100_000,
            stale_for: Duration::from_secs(600),
        }
    }
}

/// Scatter-gather: where the keys are, how answers merge, and the bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub keys: BatchKeys,
    pub merge: Merge,
    /// Field added to a merged object naming what is missing (default `_partial`).
    pub partial_field: String,
    pub timeout: Duration,
    pub max_keys: usize,
    pub max_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BatchKeys {
    Query {
        name: String,
        separator: String,
    },
    /// JSON pointer to an array of strings in the request body.
    JsonBody {
        pointer: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Merge {
    /// Answers are arrays, or objects with an array at `items`: concatenated.
    Concat { items: Option<String> },
    /// Answers are objects: merged key by key.
    Object,
}

/// The conditions of a route; all present conditions must hold.
#[derive(Debug, Clone, Default)]
pub struct RouteMatch {
    pub host: Option<HostMatch>,
    pub path: Option<PathMatch>,
    pub methods: Vec<Method>,
    pub headers: Vec<ValueMatch>,
    pub query: Vec<ValueMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Exact(String),
    /// `*.example.com`: holds `.example.com`.
    Suffix(String),
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
    Template(crate::route::Template),
}

#[derive(Debug, Clone)]
pub struct ValueMatch {
    pub name: String,
    pub header: Option<HeaderName>,
    pub rule: ValueRule,
}

#[derive(Debug, Clone)]
pub enum ValueRule {
    Exact(String),
    Regex(regex::Regex),
    Present(bool),
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderOps {
    pub add: Vec<(HeaderName, HeaderValue)>,
    pub remove: Vec<HeaderName>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.remove.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<EndpointSpec>,
    pub protocol: UpstreamProtocol,
    pub balance: Balance,
    pub connect_timeout: Duration,
    /// Default response-head timeout of routes to this cluster.
    pub timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    pub dns_refresh: Duration,
    pub health_check: Option<HealthCheck>,
    /// Retries of requests to this cluster (routes may override).
    pub retry: RetryPolicy,
    /// The cluster's circuit breaker (off unless configured).
    pub breaker: Option<BreakerPolicy>,
    /// Per-endpoint breakers: endpoints that keep failing leave the balancer for a while.
    pub outlier: Option<Outlier>,
    /// At most this many requests in flight (`None`: no limit)...
    pub max_requests: Option<usize>,
    /// ...and this many waiting for a slot; more get 503 `overloaded`.
    pub max_pending: usize,
    /// Time allowed for one try (the route's timeout bounds all tries together).
    pub per_try_timeout: Option<Duration>,
}

/// Outlier ejection: per-endpoint breakers, bounded so that most endpoints stay in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outlier {
    pub breaker: BreakerPolicy,
    /// When more than this share of endpoints is ejected, ejection is ignored (panic mode).
    pub max_ejected_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Outlier {
            breaker: BreakerPolicy {
                consecutive_failures: 5,
                failure_rate_permille: 0,
                open_for: Duration::from_secs(5),
                max_open_for: Duration::from_secs(60),
                half_open_probes: 1,
                ..BreakerPolicy::default()
            },
            max_ejected_percent: 50,
        }
    }
}

/// A route's local rate limit.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimit {
    pub per_second: f64,
    pub burst: u32,
    /// Per key (one bucket each, at most `max_keys`), or one bucket for the route.
    pub per: Option<HashOn>,
    pub max_keys: usize,
}

/// A static answer for when the route's destination cannot serve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fallback {
    pub status: http::StatusCode,
    pub body: bytes::Bytes,
    pub content_type: HeaderValue,
}

impl Cluster {
    /// Whether any endpoint needs DNS.
    pub fn uses_dns(&self) -> bool {
        self.endpoints
            .iter()
            .any(|e| matches!(e, EndpointSpec::Dns { .. }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSpec {
    Addr(SocketAddr),
    /// A DNS name, re-resolved every `dns_refresh`; every address it yields is an endpoint.
    Dns {
        host: String,
        port: u16,
    },
}

impl fmt::Display for EndpointSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointSpec::Addr(a) => write!(f, "{a}"),
            EndpointSpec::Dns { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamProtocol {
    Http1,
    Http2,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    /// Power of two random choices, least in-flight requests wins (the default).
    LeastRequest,
    RoundRobin,
    /// Rendezvous hashing on a request key.
    ConsistentHash(HashOn),
}

impl Balance {
    pub fn name(&self) -> &'static str {
        match self {
            Balance::LeastRequest => "least_request",
            Balance::RoundRobin => "round_robin",
            Balance::ConsistentHash(_) => "consistent_hash",
        }
    }
}

/// A request key for consistent hashing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashOn {
    Header(HeaderName),
    Query(String),
    Cookie(String),
    /// A named capture of the route's path template.
    Capture(String),
}

impl fmt::Display for HashOn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HashOn::Header(h) => write!(f, "header {h}"),
            HashOn::Query(q) => write!(f, "query {q}"),
            HashOn::Cookie(c) => write!(f, "cookie {c}"),
            HashOn::Capture(c) => write!(f, "path capture {c}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// One config error: where it is and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: u64,
    pub column: u64,
    /// Dotted field path, e.g. `listeners[0].routes[2].cluster`.
    pub field: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}: {}",
            self.file, self.line, self.column, self.field, self.message
        )
    }
}

/// Every error found in one file, in file order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: name.clone(),
                line: 0,
                column: 0,
                field: "(file)".into(),
                message: format!("cannot read: {e}"),
            }])
        })?;
        Self::parse(&text, path)
    }

    /// Validates config text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
        validate::parse(text, path)
    }

    /// Position of a listener by name.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }

    /// Position of a cluster by name.
    pub fn cluster_id(&self, name: &str) -> Option<ClusterId> {
        self.clusters.iter().position(|c| c.name == name)
    }

    /// A one-line summary for `attache check`.
    pub fn summary(&self) -> String {
        let routes: usize = self
            .listeners
            .iter()
            .map(|l| match &l.kind {
                ListenerKind::Http { routes, .. } => routes.len(),
                ListenerKind::Tcp { .. } => 0,
            })
            .sum();
        let endpoints: usize = self.clusters.iter().map(|c| c.endpoints.len()).sum();
        format!(
            "{}: ok: {} listener(s), {} route(s), {} cluster(s), {} endpoint(s), admin on {}",
            self.source.display(),
            self.listeners.len(),
            routes,
            self.clusters.len(),
            endpoints,
            self.admin.address
        )
    }

    /// The effective config as JSON for `GET /config`: defaults filled in, secrets redacted.
    pub fn effective(&self) -> serde_json::Value {
        use serde_json::json;
        let clusters: Vec<_> = self
            .clusters
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "endpoints": c.endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
                    "protocol": match c.protocol { UpstreamProtocol::Http1 => "http1", UpstreamProtocol::Http2 => "http2" },
                    "balance": c.balance.name(),
                    "hash_on": match &c.balance { Balance::ConsistentHash(h) => Some(h.to_string()), _ => None },
                    "connect_timeout": format_duration(c.connect_timeout),
                    "timeout": format_duration(c.timeout),
                    "idle_timeout": format_duration(c.idle_timeout),
                    "max_idle_per_endpoint": c.max_idle_per_endpoint,
                    "dns_refresh": format_duration(c.dns_refresh),
                    "health_check": c.health_check.as_ref().map(|h| json!({
                        "path": h.path,
                        "interval": format_duration(h.interval),
                        "timeout": format_duration(h.timeout),
                        "healthy_threshold": h.healthy_threshold,
                        "unhealthy_threshold": h.unhealthy_threshold,
                    })),
                })
            })
            .collect();
        let listeners: Vec<_> = self
            .listeners
            .iter()
            .map(|l| {
                let mut v = json!({
                    "name": l.name,
                    "address": l.address.to_string(),
                    "max_connections": l.max_connections,
                    "park_idle_above": l.park_idle_above,
                    "header_read_timeout": format_duration(l.header_read_timeout),
                    "max_header_bytes": l.max_header_bytes,
                });
                match &l.kind {
                    ListenerKind::Tcp { cluster } => {
                        v["protocol"] = json!("tcp");
                        v["cluster"] = json!(self.clusters[*cluster].name);
                    }
                    ListenerKind::Http { routes, forwarded } => {
                        v["protocol"] = json!("http");
                        v["forwarded"] = json!({
                            "x_forwarded_for": forwarded.x_forwarded_for,
                            "x_forwarded_proto": forwarded.x_forwarded_proto,
                            "via": forwarded.via,
                        });
                        v["routes"] = routes.iter().map(|r| self.route_json(r)).collect();
                    }
                }
                v
            })
            .collect();
        json!({
            "source": self.source.display().to_string(),
            "admin": { "address": self.admin.address.to_string() },
            "access_log": match &self.access_log {
                AccessLog::Off => "off".to_owned(),
                AccessLog::Stdout => "stdout".to_owned(),
                AccessLog::File(p) => p.display().to_string(),
            },
            "workers": self.workers,
            "shutdown_grace": format_duration(self.shutdown_grace),
            "listeners": listeners,
            "clusters": clusters,
            "directories": self.directories.iter().map(|d| json!({
                "name": d.name,
                "source": match &d.source {
                    DirectorySource::Table(t) => json!({"table": t}),
                    DirectorySource::File(p) => json!({"file": p.display().to_string()}),
                    DirectorySource::Http { cluster, path, pointer, timeout } => json!({"http": {
                        "cluster": self.clusters[*cluster].name, "path": path, "pointer": pointer,
                        "timeout": format_duration(*timeout),
                    }}),
                },
                "cache": {
                    "ttl": format_duration(d.cache.ttl),
                    "negative_ttl": format_duration(d.cache.negative_ttl),
                    "max_entries": d.cache.max_entries,
                    "stale_for": format_duration(d.cache.stale_for),
                },
            })).collect::<Vec<_>>(),
            "shard_sets": self.shard_sets.iter().map(|s| {
                let names = |ids: &[ShardId]| ids.iter().map(|i| s.shards[*i].name.clone()).collect::<Vec<_>>();
                json!({
                    "name": s.name,
                    "key": s.key.to_string(),
                    "locate": match s.locate {
                        Locate::Region(d) => json!({"directory": self.directories[d].name, "values": "region"}),
                        Locate::Shard(d) => json!({"directory": self.directories[d].name, "values": "shard"}),
                        Locate::Hash => json!("hash"),
                    },
                    "default_shard": s.default_shard.map(|i| s.shards[i].name.clone()),
                    "unknown_key_region": s.unknown_key_region,
                    "shards": s.shards.iter().map(|sh| json!({
                        "name": sh.name, "cluster": self.clusters[sh.cluster].name, "region": sh.region,
                    })).collect::<Vec<_>>(),
                    "residency": {
                        "rules": s.residency.rules.iter().map(|(r, ids)| (r.clone(), names(ids))).collect::<std::collections::BTreeMap<_, _>>(),
                        "default": s.residency.default.as_deref().map(names),
                    },
                })
            }).collect::<Vec<_>>(),
            "splits": self.splits.iter().map(|s| json!({
                "name": s.name,
                "key": s.key.as_ref().map(|k| k.to_string()),
                "variants": s.variants.iter().enumerate().map(|(i, v)| json!({
                    "name": v.name,
                    "cluster": self.clusters[v.cluster].name,
                    "weight": v.weight,
                    "allow_listed_keys": s.allow.iter().filter(|(_, to)| *to == i).count(),
                })).collect::<Vec<_>>(),
                "override": s.override_.as_ref().map(|o| match o {
                    VariantOverride::Header(h) => json!({"header": h.as_str()}),
                    VariantOverride::Cookie(c) => json!({"cookie": c}),
                }),
                "unkeyed": s.unkeyed.map(|i| s.variants[i].name.clone()),
            })).collect::<Vec<_>>(),
        })
    }

    fn route_json(&self, r: &Route) -> serde_json::Value {
        use serde_json::json;
        let m = &r.matcher;
        let redact = |name: &HeaderName, value: &HeaderValue| -> String {
            if is_secret_header(name) {
                "<redacted>".to_owned()
            } else {
                value.to_str().unwrap_or("<binary>").to_owned()
            }
        };
        json!({
            "name": r.name,
            "match": {
                "host": m.host.as_ref().map(|h| match h { HostMatch::Exact(e) => e.clone(), HostMatch::Suffix(s) => format!("*{s}") }),
                "path": m.path.as_ref().map(|p| match p {
                    PathMatch::Exact(e) => json!({"exact": e}),
                    PathMatch::Prefix(e) => json!({"prefix": e}),
                    PathMatch::Regex(e) => json!({"regex": e.as_str()}),
                    PathMatch::Template(t) => json!({"template": t.source()}),
                }),
                "methods": m.methods.iter().map(|x| x.as_str()).collect::<Vec<_>>(),
                "headers": m.headers.iter().map(value_match_json).collect::<Vec<_>>(),
                "query": m.query.iter().map(value_match_json).collect::<Vec<_>>(),
            },
            "destination": match r.destination {
                Destination::Cluster(c) => json!({"cluster": self.clusters[c].name}),
                Destination::Shards(s) => json!({"shard_set": self.shard_sets[s].name}),
                Destination::Split(s) => json!({"split": self.splits[s].name}),
            },
            "batch": r.batch.as_ref().map(|b| json!({
                "keys": match &b.keys {
                    BatchKeys::Query { name, separator } => json!({"query": name, "separator": separator}),
                    BatchKeys::JsonBody { pointer } => json!({"json_body": pointer}),
                },
                "merge": match &b.merge {
                    Merge::Concat { items } => json!({"concat": items}),
                    Merge::Object => json!("object"),
                },
                "partial_field": b.partial_field,
                "timeout": format_duration(b.timeout),
                "max_keys": b.max_keys,
                "max_bytes": b.max_bytes,
            })),
            "rewrite_prefix": r.rewrite_prefix,
            "timeout": format_duration(r.timeout),
            "request_headers": {
                "add": r.request_headers.add.iter().map(|(n, v)| (n.to_string(), redact(n, v))).collect::<std::collections::BTreeMap<_, _>>(),
                "remove": r.request_headers.remove.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            },
            "response_headers": {
                "add": r.response_headers.add.iter().map(|(n, v)| (n.to_string(), redact(n, v))).collect::<std::collections::BTreeMap<_, _>>(),
                "remove": r.response_headers.remove.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            },
        })
    }
}

fn value_match_json(v: &ValueMatch) -> serde_json::Value {
    use serde_json::json;
    match &v.rule {
        ValueRule::Exact(e) => json!({"name": v.name, "exact": e}),
        ValueRule::Regex(r) => json!({"name": v.name, "regex": r.as_str()}),
        ValueRule::Present(p) => json!({"name": v.name, "present": p}),
    }
}

/// Headers whose values are credentials and never shown by `/config` or `explain`.
pub fn is_secret_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "authorization" | "proxy-authorization" | "cookie" | "x-api-key" | "api-key"
    )
}
