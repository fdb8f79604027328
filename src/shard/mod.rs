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

/// The shards a key may go to, in order of preference, and how that was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub allowed: Vec<ShardId>,
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
    match set.locate {
        Locate::Hash => {
            let ids: Vec<usize> = (0..set.shards.len()).collect();
            let chosen = rendezvous(set, &ids, key);
            Ok(Plan {
                allowed: vec![chosen],
                region: None,
                source: None,
                residency: false,
            })
        }
        Locate::Shard(_) => {
            let dir = dir.ok_or_else(|| Refusal::DirectoryUnavailable("no directory".into()))?;
            let located = dir
                .locate(key)
                .await
                .map_err(|e| Refusal::DirectoryUnavailable(e.0))?;
            let name = located.value.ok_or(Refusal::UnknownKey)?;
            let id = set
                .shards
                .iter()
                .position(|s| *s.name == *name)
                .ok_or_else(|| Refusal::BadShard {
                    name: name.to_string(),
                })?;
            Ok(Plan {
                allowed: vec![id],
                region: None,
                source: Some(located.source),
                residency: false,
            })
        }
        Locate::Region(_) => {
            let dir = dir.ok_or_else(|| Refusal::DirectoryUnavailable("no directory".into()))?;
            let located = dir
                .locate(key)
                .await
                .map_err(|e| Refusal::DirectoryUnavailable(e.0))?;
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
                allowed: allowed.to_vec(),
                region: Some(region),
                source: Some(located.source),
                residency: true,
            })
        }
    }
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
        Err(KeyError::Missing) => match set.default_shard {
            Some(id) => Ok(Plan {
                allowed: vec![id],
                region: None,
                source: None,
                residency: false,
            }),
            None => Err(Refusal::Key(KeyError::Missing)),
        },
        Err(e) => Err(Refusal::Key(e)),
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
        assert_eq!(p.allowed, vec![id("india")]);
        assert_eq!(p.region.as_deref(), Some("IN"));
        assert_eq!(
            plan_key(s, Some(&dir), "hans").await.unwrap().allowed,
            vec![id("eu")]
        );
        assert_eq!(
            plan_key(s, Some(&dir), "alice").await.unwrap().allowed,
            vec![id("global"), id("eu")]
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
}
