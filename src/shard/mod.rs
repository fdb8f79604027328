//! Shard routing with residency: a request's key → (directory) → region → the shards allowed
//! to hold it → the first of them that can serve.
//!
//! The guarantee lives in one place, [`plan`]: it returns the *allowed* shards for a key, and
//! every caller (the proxy's attempts and failover, scatter-gather, explain) chooses only from
//! that list. Nothing else in the request path knows shard names. When none of the allowed
//! shards can serve, the answer is 503 `residency-unavailable`; a key is never sent elsewhere.

pub mod directory;
pub mod key;
pub mod scatter;

use std::sync::Arc;

use smallvec::{smallvec, SmallVec};

use crate::balance::{self, stable_hash};
use crate::config::{Locate, Route, ShardId, ShardSet};
use crate::route::{Captures, RequestHead};
pub use directory::{DirectoryState, Located, Source};
pub use key::KeyError;

/// Why a request cannot be given a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Key(KeyError),
    /// The directory does not know the key, and no `unknown_key_region` is set.
    UnknownKey,
    /// The lookup service failed and no usable cache entry exists.
    DirectoryUnavailable(String),
    /// No residency rule covers the key's region: no shard may hold it.
    NoRule {
        region: String,
    },
    /// The directory named a shard that is not in the set.
    BadShard {
        name: String,
    },
}

/// The shards a key may go to, in order of preference (inline up to four: no allocation
/// per request), and how that was decided.
pub type Allowed = SmallVec<[ShardId; 4]>;

/// The shards a key may go to, in order of preference, and how that was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub allowed: Allowed,
    /// The key's region, when the directory gives regions.
    pub region: Option<Arc<str>>,
    /// Where the directory's answer came from.
    pub source: Option<Source>,
    /// True when residency (not just ownership) decided the list.
    pub residency: bool,
}

/// Plans one key (already extracted and checked).
pub async fn plan_key(
    set: &ShardSet,
    dir: Option<&DirectoryState>,
    key: &str,
) -> Result<Plan, Refusal> {
    match (set.locate, dir) {
        (Locate::Hash, _) => plan_located(set, key, None),
        (_, None) => Err(Refusal::DirectoryUnavailable("no directory".into())),
        (_, Some(dir)) => {
            let located = dir
                .locate(key)
                .await
                .map_err(|e| Refusal::DirectoryUnavailable(e.0))?;
            plan_located(set, key, Some(located))
        }
    }
}

/// The plan of a key once its directory answer (if the set uses a directory) is known.
fn plan_located(set: &ShardSet, key: &str, located: Option<Located>) -> Result<Plan, Refusal> {
    let Some(located) = located else {
        let ids: Vec<usize> = (0..set.shards.len()).collect();
        return Ok(Plan {
            allowed: smallvec![rendezvous(set, &ids, key)],
            region: None,
            source: None,
            residency: false,
        });
    };
    if let Locate::Shard(_) = set.locate {
        let name = located.value.ok_or(Refusal::UnknownKey)?;
        let id = set
            .shards
            .iter()
            .position(|s| *s.name == *name)
            .ok_or_else(|| Refusal::BadShard {
                name: name.to_string(),
            })?;
        return Ok(Plan {
            allowed: smallvec![id],
            region: None,
            source: Some(located.source),
            residency: false,
        });
    }
    let region: Arc<str> = match located.value {
        Some(r) => r,
        None => match &set.unknown_key_region {
            Some(r) => Arc::from(r.as_str()),
            None => return Err(Refusal::UnknownKey),
        },
    };
    let allowed = set
        .residency
        .allowed(&region)
        .ok_or_else(|| Refusal::NoRule {
            region: region.to_string(),
        })?;
    Ok(Plan {
        allowed: SmallVec::from_slice(allowed),
        region: Some(region),
        source: Some(located.source),
        residency: true,
    })
}

/// Plans a request: reads its key, then [`plan_key`]. A missing key goes to the set's
/// `default_shard` when it has one.
pub async fn plan(
    set: &ShardSet,
    dir: Option<&DirectoryState>,
    head: &RequestHead<'_>,
    captures: &Captures,
    route: &Route,
) -> Result<Plan, Refusal> {
    match key::extract(&set.key, head, captures, route) {
        Ok(k) => plan_key(set, dir, &k).await,
        Err(e) => keyless(set, e),
    }
}

/// [`plan`] without waiting, when the answer needs no lookup (a table, a file, a fresh
/// cache entry, hashing, no key); `None` when it does. The request path tries this first and
/// only then builds (and boxes) the lookup's future.
pub fn plan_now(
    set: &ShardSet,
    dir: Option<&DirectoryState>,
    head: &RequestHead<'_>,
    captures: &Captures,
    route: &Route,
) -> Option<Result<Plan, Refusal>> {
    let key = match key::extract(&set.key, head, captures, route) {
        Ok(k) => k,
        Err(e) => return Some(keyless(set, e)),
    };
    match (set.locate, dir) {
        (Locate::Hash, _) => Some(plan_located(set, &key, None)),
        (_, None) => Some(Err(Refusal::DirectoryUnavailable("no directory".into()))),
        (_, Some(dir)) => {
            let located = dir.locate_now(&key)?;
            Some(plan_located(set, &key, Some(located)))
        }
    }
}

/// The plan of a request whose key could not be read: the default shard for a missing key.
fn keyless(set: &ShardSet, e: KeyError) -> Result<Plan, Refusal> {
    match (e, set.default_shard) {
        (KeyError::Missing, Some(id)) => Ok(Plan {
            allowed: smallvec![id],
            region: None,
            source: None,
            residency: false,
        }),
        (e, _) => Err(Refusal::Key(e)),
    }
}

/// The first allowed shard that is available and not yet tried.
pub fn first_available(
    allowed: &[ShardId],
    tried: &[ShardId],
    available: impl Fn(ShardId) -> bool,
) -> Option<ShardId> {
    allowed
        .iter()
        .copied()
        .find(|id| !tried.contains(id) && available(*id))
}

fn rendezvous(set: &ShardSet, ids: &[ShardId], key: &str) -> ShardId {
    let k = stable_hash(key.as_bytes());
    ids.iter()
        .copied()
        .max_by_key(|&i| balance::mix(k ^ balance::identity_of(&set.shards[i].name)))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn set() -> Config {
        Config::parse(
            r#"
clusters:
  india: { endpoints: ["127.0.0.1:1"] }
  eu: { endpoints: ["127.0.0.1:2"] }
  global: { endpoints: ["127.0.0.1:3"] }
directories:
  regions:
    table: { priya: IN, arjun: IN, hans: DE, alice: US, ghost: XX }
shard_sets:
  images:
    key: { header: x-user }
    directory: regions
    shards:
      india: { cluster: india, region: IN }
      eu: { cluster: eu, region: EU }
      global: { cluster: global }
    residency:
      IN: [india]
      DE: [eu]
      "*": [global, eu]
"#,
            Path::new("t.yaml"),
        )
        .unwrap()
    }

    #[tokio::test]
    async fn residency_decides_the_allowed_shards() {
        let config = set();
        let s = &config.shard_sets[0];
        let metrics = crate::telemetry::Metrics::new();
        let dir = DirectoryState::new(
            config.directories[0].clone(),
            &[],
            metrics.directory("regions"),
        );
        let id = |n: &str| s.shards.iter().position(|x| x.name == n).unwrap();
        let p = plan_key(s, Some(&dir), "priya").await.unwrap();
        assert_eq!(p.allowed[..], [id("india")]);
        assert_eq!(p.region.as_deref(), Some("IN"));
        assert_eq!(
            plan_key(s, Some(&dir), "hans").await.unwrap().allowed[..],
            [id("eu")]
        );
        assert_eq!(
            plan_key(s, Some(&dir), "alice").await.unwrap().allowed[..],
            [id("global"), id("eu")]
        );
        assert_eq!(
            plan_key(s, Some(&dir), "nobody").await,
            Err(Refusal::UnknownKey)
        );
        // India down: priya has nowhere to go; alice fails over within her allowed set.
        let india_down = |i: ShardId| i != id("india");
        assert_eq!(first_available(&[id("india")], &[], india_down), None);
        let global_down = |i: ShardId| i != id("global");
        assert_eq!(
            first_available(&[id("global"), id("eu")], &[], global_down),
            Some(id("eu"))
        );
        assert_eq!(
            first_available(&[id("global"), id("eu")], &[id("global")], |_| true),
            Some(id("eu"))
        );
    }

    /// The request path's synchronous plan agrees with the awaited one wherever no lookup
    /// is needed, and defers (`None`) where one is.
    #[tokio::test]
    async fn planning_without_waiting_agrees_and_defers_lookups() {
        let config = set();
        let s = &config.shard_sets[0];
        let metrics = crate::telemetry::Metrics::new();
        let table = DirectoryState::new(
            config.directories[0].clone(),
            &[],
            metrics.directory("regions"),
        );
        let mut route_cfg = Config::parse(
            "listeners:\n  - address: 127.0.0.1:1\n    routes: [ { cluster: c } ]\nclusters:\n  c: { endpoints: [\"127.0.0.1:1\"] }\n",
            Path::new("r.yaml"),
        )
        .unwrap();
        let crate::config::ListenerKind::Http { routes, .. } = &mut route_cfg.listeners[0].kind
        else {
            panic!("http listener")
        };
        let route = &routes[0];
        for user in ["priya", "hans", "alice", "nobody", "ghost"] {
            let req = http::Request::get("/x")
                .header("x-user", user)
                .body(())
                .unwrap();
            let head = RequestHead::new(req.method(), req.uri(), req.headers());
            let captures = crate::route::Captures::default();
            let now = plan_now(s, Some(&table), &head, &captures, route).expect("no lookup");
            assert_eq!(
                now,
                plan(s, Some(&table), &head, &captures, route).await,
                "{user}"
            );
        }
        // A lookup service's directory with nothing cached: the plan must wait.
        let http = Config::parse(
            "clusters:\n  users: { endpoints: [\"127.0.0.1:1\"] }\ndirectories:\n  lookups:\n    http: { cluster: users, path: \"/users/{key}\", pointer: /country }\n",
            Path::new("h.yaml"),
        )
        .unwrap();
        let clusters: Vec<_> = http
            .clusters
            .iter()
            .map(|c| crate::upstream::ClusterState::new(c.clone(), 1, metrics.cluster(&c.name)))
            .collect();
        let cold = DirectoryState::new(
            http.directories[0].clone(),
            &clusters,
            metrics.directory("lookups"),
        );
        let req = http::Request::get("/x")
            .header("x-user", "priya")
            .body(())
            .unwrap();
        let head = RequestHead::new(req.method(), req.uri(), req.headers());
        let captures = crate::route::Captures::default();
        assert!(plan_now(s, Some(&cold), &head, &captures, route).is_none());
    }
}
