//! `GET /stats`: one JSON document with every counter the dashboard shows. Counters are
//! cumulative; the page derives rates and quantiles from the difference between two polls.

use serde_json::{json, Value};

use crate::config::Locate;
use crate::state::Shared;
use crate::telemetry::metrics::BUCKETS;

/// The whole stats document.
pub fn stats(shared: &Shared) -> Value {
    shared.recent.watch();
    let snap = shared.snapshot.load();
    let config = &snap.config;
    let classes = |c: &[prometheus_client::metrics::counter::Counter; 5]| json!({ "1xx": c[0].get(), "2xx": c[1].get(), "3xx": c[2].get(), "4xx": c[3].get(), "5xx": c[4].get() });
    let mut routes = Vec::new();
    for (l, listener) in config.listeners.iter().enumerate() {
        if let crate::config::ListenerKind::Http { routes: rs, .. } = &listener.kind {
            for (r, route) in rs.iter().enumerate() {
                let s = &snap.listeners[l].routes[r];
                routes.push(json!({
                    "listener": listener.name,
                    "route": route.name,
                    "requests": s.requests.get(),
                    "responses": classes(&s.responses),
                    "latency_buckets": s.latency.counts().to_vec(),
                }));
            }
        }
    }
    let clusters: Vec<Value> = snap
        .clusters
        .iter()
        .map(|c| {
            let mut v = c.status_json();
            v["requests"] = c.stats.requests.get().into();
            v["responses"] = classes(&c.stats.responses);
            v["active"] = c.stats.active.get().into();
            v["latency_buckets"] = json!(c.stats.latency.counts().to_vec());
            v["available"] = c.available().into();
            v
        })
        .collect();
    let shard_sets: Vec<Value> = config
        .shard_sets
        .iter()
        .enumerate()
        .map(|(i, set)| {
            let shards: Vec<Value> = set
                .shards
                .iter()
                .enumerate()
                .map(|(j, sh)| {
                    let st = &snap.shard_stats[i][j];
                    json!({
                        "name": sh.name,
                        "region": sh.region,
                        "cluster": config.clusters[sh.cluster].name,
                        "available": snap.clusters[sh.cluster].available(),
                        "requests": st.requests.get(),
                        "errors": st.errors.get(),
                        "latency_buckets": st.latency.counts().to_vec(),
                    })
                })
                .collect();
            json!({
                "name": set.name,
                "key": set.key.to_string(),
                "directory": match set.locate {
                    Locate::Region(d) | Locate::Shard(d) => Some(config.directories[d].name.clone()),
                    Locate::Hash => None,
                },
                "shards": shards,
            })
        })
        .collect();
    let directories: Vec<Value> = snap
        .directories
        .iter()
        .map(|d| {
            json!({
                "name": d.config.name,
                "hits": d.stats.hits.get(),
                "misses": d.stats.misses.get(),
                "stale": d.stats.stale.get(),
                "errors": d.stats.errors.get(),
                "in_flight": d.stats.inflight.get(),
                "lookups": d.lookups(),
            })
        })
        .collect();
    json!({
        "generation": snap.generation,
        "uptime_s": shared.started.elapsed().as_secs_f64(),
        "demo": shared.admin_hook.get().is_some(),
        "buckets": BUCKETS.to_vec(),
        "routes": routes,
        "clusters": clusters,
        "shard_sets": shard_sets,
        "directories": directories,
        "residency_denials": shared.metrics.residency_denials_total(),
        "recent": shared.recent.list(),
    })
}
