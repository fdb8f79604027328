//! Directories: key → region (or shard). Three sources: an inline table, a file (re-read when
//! it changes), and an HTTP lookup service behind a cache with TTLs, negative entries, a bound
//! on entries, single-flight misses and serve-stale-on-error.
//!
//! The cache is written by hand: it needs stale-on-error and negative entries with their own
//! TTL, which the cache crates (moka, quick_cache) do not offer together, and its hit path is a
//! read lock on one of 16 shards plus an `Arc` clone, with no allocation.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use http_body_util::{BodyExt, Either, Full};
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::balance::stable_hash;
use crate::config::{CachePolicy, Directory, DirectorySource};
use crate::telemetry::metrics::DirectoryStats;
use crate::upstream::ClusterState;

/// Everything but RFC 3986's unreserved characters is percent-encoded in lookup URLs, so a key
/// can never change the URL's path, query or authority.
const KEY_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

const CACHE_SHARDS: usize = 16;

/// What a directory says of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    /// The region or shard name; `None`: the directory does not know the key.
    pub value: Option<Arc<str>>,
    pub source: Source,
}

/// Where an answer came from (for explain, logs and metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Source {
    Table,
    File,
    CacheHit,
    Lookup,
    /// Past its TTL, served because the lookup service failed.
    Stale,
}

/// The lookup service failed and no usable entry was cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable(pub String);

type LookupResult = Result<Option<Arc<str>>, String>;

#[derive(Clone)]
struct Entry {
    value: Option<Arc<str>>,
    fetched: Instant,
}

/// A directory at run time.
pub struct DirectoryState {
    pub config: Directory,
    kind: Kind,
    pub stats: DirectoryStats,
}

enum Kind {
    /// The config's table, with values ready to share (no allocation per lookup).
    Table(HashMap<String, Arc<str>>),
    File {
        table: ArcSwap<HashMap<String, Arc<str>>>,
        modified: Mutex<Option<SystemTime>>,
    },
    Http {
        cluster: Arc<ClusterState>,
        cache: Vec<RwLock<HashMap<Box<str>, Entry>>>,
        pending: Mutex<HashMap<Box<str>, Shared<BoxFuture<'static, LookupResult>>>>,
        lookups: AtomicU64,
    },
}

impl std::fmt::Debug for DirectoryState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirectoryState")
            .field("name", &self.config.name)
            .finish()
    }
}

/// Reads a key → value map from a YAML (or JSON) file.
pub fn read_table_file(path: &Path) -> Result<HashMap<String, Arc<str>>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let map: std::collections::BTreeMap<String, String> = serde_saphyr::from_str(&text)
        .map_err(|e| format!("{}: not a map of key: value ({e})", path.display()))?;
    Ok(map.into_iter().map(|(k, v)| (k, Arc::from(v))).collect())
}

impl DirectoryState {
    /// Builds a directory; `clusters` are the snapshot's run-time clusters.
    pub fn new(
        config: Directory,
        clusters: &[Arc<ClusterState>],
        stats: DirectoryStats,
    ) -> Arc<DirectoryState> {
        let kind = match &config.source {
            DirectorySource::Table(t) => Kind::Table(
                t.iter()
                    .map(|(k, v)| (k.clone(), Arc::from(v.as_str())))
                    .collect(),
            ),
            DirectorySource::File(path) => {
                let table = read_table_file(path).unwrap_or_default();
                let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                Kind::File {
                    table: ArcSwap::from_pointee(table),
                    modified: Mutex::new(modified),
                }
            }
            DirectorySource::Http { cluster, .. } => Kind::Http {
                cluster: clusters[*cluster].clone(),
                cache: (0..CACHE_SHARDS)
                    .map(|_| RwLock::new(HashMap::new()))
                    .collect(),
                pending: Mutex::new(HashMap::new()),
                lookups: AtomicU64::new(0),
            },
        };
        Arc::new(DirectoryState {
            config,
            kind,
            stats,
        })
    }

    /// Whether a new snapshot may keep this state (same definition, same lookup cluster).
    pub fn reusable_for(&self, config: &Directory, clusters: &[Arc<ClusterState>]) -> bool {
        if self.config != *config {
            return false;
        }
        match (&self.kind, &config.source) {
            (Kind::Http { cluster, .. }, DirectorySource::Http { cluster: id, .. }) => {
                Arc::ptr_eq(cluster, &clusters[*id])
            }
            _ => true,
        }
    }

    /// Lookups sent to the lookup service so far.
    pub fn lookups(&self) -> u64 {
        match &self.kind {
            Kind::Http { lookups, .. } => lookups.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// The value for `key` when no I/O is needed: a table, a file, or a fresh cache entry
    /// (counted as a hit). `None`: the lookup service must be asked (see [`Self::locate`]).
    pub fn locate_now(&self, key: &str) -> Option<Located> {
        match &self.kind {
            Kind::Table(t) => Some(Located {
                value: t.get(key).cloned(),
                source: Source::Table,
            }),
            Kind::File { table, .. } => Some(Located {
                value: table.load().get(key).cloned(),
                source: Source::File,
            }),
            Kind::Http { cache, .. } => {
                let shard = &cache[(stable_hash(key.as_bytes()) as usize) % CACHE_SHARDS];
                let value = fresh_entry(shard, key, &self.config.cache)?.value;
                self.stats.hits.inc();
                Some(Located {
                    value,
                    source: Source::CacheHit,
                })
            }
        }
    }

    /// The value for `key`: [`Self::locate_now`], else one lookup shared by every request
    /// for the key, else a stale cache entry when the lookup fails.
    pub async fn locate(&self, key: &str) -> Result<Located, Unavailable> {
        if let Some(located) = self.locate_now(key) {
            return Ok(located);
        }
        match &self.kind {
            Kind::Table(_) | Kind::File { .. } => {
                Err(Unavailable("directory misconfigured".into()))
            }
            Kind::Http {
                cache,
                pending,
                cluster,
                lookups,
            } => {
                let policy = self.config.cache;
                let shard = &cache[(stable_hash(key.as_bytes()) as usize) % CACHE_SHARDS];
                // Not fresh (or not there): kept for the stale answer if the lookup fails.
                let cached = shard.read().ok().and_then(|m| m.get(key).cloned());
                let now = Instant::now();
                self.stats.misses.inc();
                let fetch = {
                    let mut p = pending
                        .lock()
                        .map_err(|_| Unavailable("directory lock poisoned".into()))?;
                    match p.get(key) {
                        Some(f) => f.clone(),
                        // A lookup that finished between our cache read and this lock has
                        // filled the cache: use it rather than look up again.
                        None if fresh_entry(shard, key, &policy).is_some() => {
                            self.stats.hits.inc();
                            let value = fresh_entry(shard, key, &policy).and_then(|e| e.value);
                            return Ok(Located {
                                value,
                                source: Source::CacheHit,
                            });
                        }
                        None => {
                            lookups.fetch_add(1, Ordering::Relaxed);
                            self.stats.inflight.inc();
                            let f =
                                fetch(cluster.clone(), self.config.source.clone(), key.to_owned())
                                    .boxed()
                                    .shared();
                            p.insert(key.into(), f.clone());
                            f
                        }
                    }
                };
                let result = fetch.await;
                if let Ok(mut p) = pending.lock() {
                    if p.remove(key).is_some() {
                        self.stats.inflight.dec();
                        if let Ok(value) = &result {
                            self.insert(shard, key, value.clone(), &policy);
                        }
                    }
                }
                match result {
                    Ok(value) => Ok(Located {
                        value,
                        source: Source::Lookup,
                    }),
                    Err(e) => {
                        self.stats.errors.inc();
                        match cached {
                            Some(c)
                                if now.duration_since(c.fetched)
                                    < fresh_for(&policy, &c) + policy.stale_for =>
                            {
                                self.stats.stale.inc();
                                Ok(Located {
                                    value: c.value,
                                    source: Source::Stale,
                                })
                            }
                            _ => Err(Unavailable(e)),
                        }
                    }
                }
            }
        }
    }

    fn insert(
        &self,
        shard: &RwLock<HashMap<Box<str>, Entry>>,
        key: &str,
        value: Option<Arc<str>>,
        policy: &CachePolicy,
    ) {
        let Ok(mut m) = shard.write() else { return };
        let per_shard = policy.max_entries.div_ceil(CACHE_SHARDS).max(1);
        if m.len() >= per_shard && !m.contains_key(key) {
            // Bounded memory: drop entries past any use first, then arbitrary ones.
            let now = Instant::now();
            m.retain(|_, e| {
                now.duration_since(e.fetched) < fresh_for(policy, e) + policy.stale_for
            });
            while m.len() >= per_shard {
                let Some(victim) = m.keys().next().cloned() else {
                    break;
                };
                m.remove(&victim);
            }
        }
        m.insert(
            key.into(),
            Entry {
                value,
                fetched: Instant::now(),
            },
        );
    }

    /// Re-reads a file directory when the file changed; a bad file keeps the old table.
    pub fn refresh_file(&self) {
        let (Kind::File { table, modified }, DirectorySource::File(path)) =
            (&self.kind, &self.config.source)
        else {
            return;
        };
        let now = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        let Ok(mut last) = modified.lock() else {
            return;
        };
        if now == *last {
            return;
        }
        match read_table_file(path) {
            Ok(t) => {
                table.store(Arc::new(t));
                *last = now;
                tracing::info!(directory = %self.config.name, "directory file reloaded");
            }
            Err(e) => {
                tracing::error!(directory = %self.config.name, error = %e, "directory file refused; keeping the last table")
            }
        }
    }

    /// The lookup URL path for a key (for explain).
    pub fn lookup_path(&self, key: &str) -> Option<String> {
        match &self.config.source {
            DirectorySource::Http { path, .. } => Some(lookup_path(path, key)),
            _ => None,
        }
    }

    /// Looks a key up in a table or file without I/O (for explain); `None` for HTTP.
    pub fn peek(&self, key: &str) -> Option<Option<Arc<str>>> {
        match &self.kind {
            Kind::Table(t) => Some(t.get(key).cloned()),
            Kind::File { table, .. } => Some(table.load().get(key).cloned()),
            Kind::Http { .. } => None,
        }
    }
}

fn fresh_entry(
    shard: &RwLock<HashMap<Box<str>, Entry>>,
    key: &str,
    policy: &CachePolicy,
) -> Option<Entry> {
    let e = shard.read().ok()?.get(key).cloned()?;
    (e.fetched.elapsed() < fresh_for(policy, &e)).then_some(e)
}

fn fresh_for(policy: &CachePolicy, e: &Entry) -> Duration {
    if e.value.is_some() {
        policy.ttl
    } else {
        policy.negative_ttl
    }
}

/// `/users/{key}` with the key percent-encoded.
pub fn lookup_path(template: &str, key: &str) -> String {
    template.replace("{key}", &utf8_percent_encode(key, KEY_ENCODE).to_string())
}

async fn fetch(cluster: Arc<ClusterState>, source: DirectorySource, key: String) -> LookupResult {
    let DirectorySource::Http {
        path,
        pointer,
        timeout,
        ..
    } = source
    else {
        return Err("not an HTTP directory".into());
    };
    let endpoint = cluster.pick(None, None).ok_or_else(|| {
        format!(
            "lookup cluster `{}` has no healthy endpoint",
            cluster.config.name
        )
    })?;
    let uri = format!("http://{}{}", endpoint.addr, lookup_path(&path, &key));
    let req = http::Request::get(uri)
        .header(http::header::ACCEPT, "application/json")
        .body(Either::Right(Full::new(Bytes::new())))
        .map_err(|e| e.to_string())?;
    let _in_flight = endpoint.start_request();
    let worker = 0;
    let answer = tokio::time::timeout(timeout, async {
        let resp = cluster
            .client(worker)
            .request(req)
            .await
            .map_err(|e| format!("lookup failed: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("lookup body: {e}"))?
            .to_bytes();
        Ok::<_, String>((status, body))
    })
    .await
    .map_err(|_| format!("lookup timed out after {timeout:?}"))??;
    match answer.0.as_u16() {
        404 => Ok(None),
        200..=299 => {
            let v: serde_json::Value = serde_json::from_slice(&answer.1)
                .map_err(|e| format!("lookup answer is not JSON: {e}"))?;
            match v.pointer(&pointer) {
                Some(serde_json::Value::String(s)) => Ok(Some(Arc::from(s.as_str()))),
                Some(serde_json::Value::Number(n)) => Ok(Some(Arc::from(n.to_string().as_str()))),
                Some(serde_json::Value::Null) | None => Ok(None),
                Some(other) => Err(format!(
                    "lookup value at {pointer} is not a string: {other}"
                )),
            }
        }
        s => Err(format!("lookup service answered {s}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_cannot_change_the_lookup_url() {
        assert_eq!(lookup_path("/users/{key}", "priya"), "/users/priya");
        assert_eq!(lookup_path("/users/{key}", "../admin"), "/users/..%2Fadmin");
        assert_eq!(lookup_path("/users/{key}", "a?b#c"), "/users/a%3Fb%23c");
        assert_eq!(lookup_path("/users/{key}", "a%2F"), "/users/a%252F");
        assert_eq!(lookup_path("/users/{key}", "ünï"), "/users/%C3%BCn%C3%AF");
        assert_eq!(lookup_path("/users/{key}", "a b"), "/users/a%20b");
    }
}
