//! The file layer of the config: serde structs that mirror the YAML exactly.
//!
//! Every struct refuses unknown fields, and every value that validation may complain about is
//! wrapped in [`Spanned`] so that the complaint can name its line and column. Nothing here is
//! checked beyond its YAML type; `config::validate` turns these into real types.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_saphyr::Spanned;

/// A spanned value: the value and where it was written.
pub type S<T> = Spanned<T>;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub access_log: Option<S<String>>,
    #[serde(default)]
    pub workers: Option<S<u32>>,
    #[serde(default)]
    pub shutdown_grace: Option<S<String>>,
    #[serde(default)]
    pub listeners: Vec<FileListener>,
    #[serde(default)]
    pub clusters: BTreeMap<String, FileCluster>,
    #[serde(default)]
    pub directories: BTreeMap<String, FileDirectory>,
    #[serde(default)]
    pub shard_sets: BTreeMap<String, FileShardSet>,
    #[serde(default)]
    pub splits: BTreeMap<String, FileSplit>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    #[serde(default)]
    pub address: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    #[serde(default)]
    pub name: Option<S<String>>,
    pub address: S<String>,
    #[serde(default)]
    pub protocol: Option<S<String>>,
    /// For `protocol: tcp`: the cluster that receives the bytes.
    #[serde(default)]
    pub cluster: Option<S<String>>,
    #[serde(default)]
    pub routes: Option<S<Vec<S<FileRoute>>>>,
    #[serde(default)]
    pub max_connections: Option<S<u64>>,
    #[serde(default)]
    pub park_idle_above: Option<S<u64>>,
    #[serde(default)]
    pub header_read_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_header_bytes: Option<S<u64>>,
    #[serde(default)]
    pub forwarded: Option<FileForwarded>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileForwarded {
    #[serde(default)]
    pub x_forwarded_for: Option<bool>,
    #[serde(default)]
    pub x_forwarded_proto: Option<bool>,
    #[serde(default)]
    pub via: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    #[serde(default)]
    pub name: Option<S<String>>,
    #[serde(default, rename = "match")]
    pub matcher: Option<FileMatch>,
    #[serde(default)]
    pub cluster: Option<S<String>>,
    #[serde(default)]
    pub shard_set: Option<S<String>>,
    #[serde(default)]
    pub split: Option<S<String>>,
    #[serde(default)]
    pub batch: Option<S<FileBatch>>,
    #[serde(default)]
    pub rewrite: Option<FileRewrite>,
    #[serde(default)]
    pub request_headers: Option<FileHeaderOps>,
    #[serde(default)]
    pub response_headers: Option<FileHeaderOps>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub per_try_timeout: Option<S<String>>,
    #[serde(default)]
    pub retry: Option<S<FileRetry>>,
    #[serde(default)]
    pub hedge: Option<S<FileHedge>>,
    #[serde(default)]
    pub rate_limit: Option<S<FileRateLimit>>,
    #[serde(default)]
    pub fallback: Option<S<FileFallback>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMatch {
    #[serde(default)]
    pub host: Option<S<String>>,
    #[serde(default)]
    pub path: Option<S<FilePathMatch>>,
    #[serde(default)]
    pub methods: Option<Vec<S<String>>>,
    #[serde(default)]
    pub headers: Option<Vec<FileValueMatch>>,
    #[serde(default)]
    pub query: Option<Vec<FileValueMatch>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePathMatch {
    #[serde(default)]
    pub exact: Option<S<String>>,
    #[serde(default)]
    pub prefix: Option<S<String>>,
    #[serde(default)]
    pub regex: Option<S<String>>,
    #[serde(default)]
    pub template: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileValueMatch {
    pub name: S<String>,
    #[serde(default)]
    pub exact: Option<S<String>>,
    #[serde(default)]
    pub regex: Option<S<String>>,
    #[serde(default)]
    pub present: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRewrite {
    #[serde(default)]
    pub prefix: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHeaderOps {
    #[serde(default)]
    pub add: BTreeMap<String, S<String>>,
    #[serde(default)]
    pub remove: Vec<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCluster {
    pub endpoints: S<Vec<S<String>>>,
    #[serde(default)]
    pub protocol: Option<S<String>>,
    #[serde(default)]
    pub balance: Option<S<String>>,
    #[serde(default)]
    pub hash_on: Option<S<FileHashOn>>,
    #[serde(default)]
    pub connect_timeout: Option<S<String>>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub idle_timeout: Option<S<String>>,
    #[serde(default)]
    pub max_idle_per_endpoint: Option<S<u64>>,
    #[serde(default)]
    pub dns_refresh: Option<S<String>>,
    #[serde(default)]
    pub health_check: Option<FileHealthCheck>,
    #[serde(default)]
    pub retry: Option<S<FileRetry>>,
    #[serde(default)]
    pub breaker: Option<S<FileBreaker>>,
    #[serde(default)]
    pub outlier_detection: Option<S<FileOutlier>>,
    #[serde(default)]
    pub max_requests: Option<S<u64>>,
    #[serde(default)]
    pub max_pending: Option<S<u64>>,
    #[serde(default)]
    pub per_try_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRetry {
    #[serde(default)]
    pub attempts: Option<S<u32>>,
    /// `connect-failure`, `reset`, `timeout`, and status codes such as `503`.
    #[serde(default)]
    pub on: Option<Vec<S<String>>>,
    /// gRPC status codes by number or name (`unavailable`, `resource-exhausted`...).
    #[serde(default)]
    pub grpc: Option<Vec<S<String>>>,
    #[serde(default)]
    pub backoff_base: Option<S<String>>,
    #[serde(default)]
    pub backoff_max: Option<S<String>>,
    #[serde(default)]
    pub budget_ratio: Option<S<f64>>,
    #[serde(default)]
    pub budget_min_per_second: Option<S<u32>>,
    #[serde(default)]
    pub idempotency_header: Option<S<String>>,
    #[serde(default)]
    pub max_body: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBreaker {
    #[serde(default)]
    pub consecutive_failures: Option<S<u32>>,
    #[serde(default)]
    pub failure_rate: Option<S<f64>>,
    #[serde(default)]
    pub window: Option<S<String>>,
    #[serde(default)]
    pub min_requests: Option<S<u32>>,
    #[serde(default)]
    pub open_for: Option<S<String>>,
    #[serde(default)]
    pub max_open_for: Option<S<String>>,
    #[serde(default)]
    pub half_open_probes: Option<S<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOutlier {
    #[serde(default)]
    pub consecutive_errors: Option<S<u32>>,
    #[serde(default)]
    pub base_ejection: Option<S<String>>,
    #[serde(default)]
    pub max_ejection: Option<S<String>>,
    #[serde(default)]
    pub max_ejected_percent: Option<S<u32>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHedge {
    pub delay: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRateLimit {
    pub requests_per_second: S<f64>,
    #[serde(default)]
    pub burst: Option<S<u32>>,
    #[serde(default)]
    pub per: Option<S<FileHashOn>>,
    #[serde(default)]
    pub max_keys: Option<S<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileFallback {
    #[serde(default)]
    pub status: Option<S<u16>>,
    #[serde(default)]
    pub body: Option<S<String>>,
    #[serde(default)]
    pub content_type: Option<S<String>>,
}

/// Where the consistent-hash key comes from: exactly one field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHashOn {
    #[serde(default)]
    pub header: Option<S<String>>,
    #[serde(default)]
    pub query: Option<S<String>>,
    #[serde(default)]
    pub cookie: Option<S<String>>,
    #[serde(default)]
    pub capture: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealthCheck {
    pub path: S<String>,
    #[serde(default)]
    pub interval: Option<S<String>>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub healthy_threshold: Option<S<u32>>,
    #[serde(default)]
    pub unhealthy_threshold: Option<S<u32>>,
}

/// A directory: where a shard key's region (or shard) is found.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDirectory {
    #[serde(default)]
    pub table: Option<S<BTreeMap<String, String>>>,
    #[serde(default)]
    pub file: Option<S<String>>,
    #[serde(default)]
    pub http: Option<S<FileHttpLookup>>,
    #[serde(default)]
    pub cache: Option<FileCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHttpLookup {
    pub cluster: S<String>,
    /// Path with `{key}`, e.g. `/users/{key}`; the key is percent-encoded.
    pub path: S<String>,
    /// JSON pointer to the value in the answer, e.g. `/country`.
    pub pointer: S<String>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCache {
    #[serde(default)]
    pub ttl: Option<S<String>>,
    #[serde(default)]
    pub negative_ttl: Option<S<String>>,
    #[serde(default)]
    pub max_entries: Option<S<u64>>,
    #[serde(default)]
    pub stale_for: Option<S<String>>,
}

/// A set of shards and how a request's key picks one.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileShardSet {
    pub key: S<FileKey>,
    #[serde(default)]
    pub directory: Option<S<String>>,
    /// `region` (default) or `shard`: what the directory's values name.
    #[serde(default)]
    pub directory_values: Option<S<String>>,
    /// Consistent hashing over the shards instead of a directory.
    #[serde(default)]
    pub hash: Option<S<bool>>,
    #[serde(default)]
    pub default_shard: Option<S<String>>,
    /// Region for keys the directory does not know (default: refuse with 404).
    #[serde(default)]
    pub unknown_key_region: Option<S<String>>,
    pub shards: S<BTreeMap<String, FileShard>>,
    #[serde(default)]
    pub residency: Option<S<BTreeMap<String, Vec<S<String>>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileShard {
    pub cluster: S<String>,
    #[serde(default)]
    pub region: Option<S<String>>,
}

/// Where the shard key comes from: exactly one source.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKey {
    #[serde(default)]
    pub header: Option<S<String>>,
    #[serde(default)]
    pub query: Option<S<String>>,
    #[serde(default)]
    pub cookie: Option<S<String>>,
    #[serde(default)]
    pub capture: Option<S<String>>,
    #[serde(default)]
    pub jwt: Option<S<FileJwt>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileJwt {
    pub claim: S<String>,
    /// Header carrying `Bearer <token>` (default `authorization`).
    #[serde(default)]
    pub header: Option<S<String>>,
    #[serde(default)]
    pub hs256_secret_env: Option<S<String>>,
    #[serde(default)]
    pub hs256_secret_file: Option<S<String>>,
    #[serde(default)]
    pub rs256_public_key_file: Option<S<String>>,
    #[serde(default)]
    pub es256_public_key_file: Option<S<String>>,
    /// Read claims without checking the signature: only behind a gateway that verified.
    #[serde(default)]
    pub unverified_claims_behind_trusted_gateway: Option<S<bool>>,
}

/// A traffic split: variants (each a cluster) chosen per request, sticky per key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSplit {
    /// Whose request it is: the same key is always given the same variant.
    #[serde(default)]
    pub key: Option<S<FileKey>>,
    pub variants: S<BTreeMap<String, S<FileVariant>>>,
    /// A header or cookie that names the variant outright (testers, QA).
    #[serde(default, rename = "override")]
    pub override_: Option<S<FileOverride>>,
    /// The variant for requests without a key (default: spread by weight, per request).
    #[serde(default)]
    pub unkeyed: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileVariant {
    pub cluster: S<String>,
    #[serde(default)]
    pub weight: Option<S<u32>>,
    /// Keys always given this variant, whatever the weights say (an allow list).
    #[serde(default)]
    pub keys: Option<Vec<S<String>>>,
}

/// Where a request may name its variant: exactly one of the two.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOverride {
    #[serde(default)]
    pub header: Option<S<String>>,
    #[serde(default)]
    pub cookie: Option<S<String>>,
}

/// A route's batch form: many keys in one request, split by shard and merged.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileBatch {
    /// Query parameter holding the keys (`?users=a,b,c`).
    #[serde(default)]
    pub query: Option<S<String>>,
    /// JSON pointer to an array of keys in the request body.
    #[serde(default)]
    pub json_body: Option<S<String>>,
    #[serde(default)]
    pub separator: Option<S<String>>,
    /// `concat` (arrays; with `items`, the arrays at that pointer) or `object`.
    #[serde(default)]
    pub merge: Option<S<String>>,
    #[serde(default)]
    pub items: Option<S<String>>,
    #[serde(default)]
    pub partial_field: Option<S<String>>,
    #[serde(default)]
    pub timeout: Option<S<String>>,
    #[serde(default)]
    pub max_keys: Option<S<u64>>,
    #[serde(default)]
    pub max_bytes: Option<S<u64>>,
}
