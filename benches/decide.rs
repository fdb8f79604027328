//! Microbenchmarks of the decision path (no sockets): route matching, shard key extraction
//! with a directory cache hit, split choice, and endpoint choice. Run with `cargo bench --bench decide`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use attache::config::{Config, ListenerKind};
use attache::route::{self, RequestHead};
use attache::shard::{self, DirectoryState};

fn main() {
    divan::main();
}

const CONFIG: &str = r#"
listeners:
  - address: 127.0.0.1:10000
    routes:
      - { name: health, match: { path: { exact: /healthz } }, cluster: users }
      - { name: api, match: { path: { prefix: /api }, headers: [{ name: x-version, exact: "2" }] }, cluster: users }
      - { name: batch, match: { path: { exact: /images }, methods: [GET] }, shard_set: images, batch: { query: users } }
      - { name: images, match: { path: { template: "/images/{user}/{rest*}" } }, shard_set: images }
      - { name: users, match: { path: { prefix: /users } }, cluster: users }
      - { name: feed, match: { path: { prefix: /feed } }, split: feed }
clusters:
  users: { endpoints: ["127.0.0.1:8100", "127.0.0.1:8101", "127.0.0.1:8102", "127.0.0.1:8103"] }
  india: { endpoints: ["127.0.0.1:8201"] }
  global: { endpoints: ["127.0.0.1:8202"] }
directories:
  regions: { table: { priya: IN, arjun: IN, alice: US, bob: GB } }
shard_sets:
  images:
    key: { capture: user }
    directory: regions
    shards: { india: { cluster: india, region: IN }, global: { cluster: global } }
    residency: { IN: [india], "*": [global] }
splits:
  feed:
    key: { header: x-user-id }
    variants:
      stable: { cluster: users, weight: 90 }
      beta: { cluster: global, weight: 10, keys: [tester, qa] }
    override: { header: x-attache-variant }
"#;

fn config() -> Config {
    Config::parse(CONFIG, Path::new("bench.yaml")).unwrap()
}

fn request() -> http::Request<()> {
    http::Request::get("http://127.0.0.1:10000/images/priya/1.png")
        .header("host", "127.0.0.1:10000")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .body(())
        .unwrap()
}

/// Route selection for a request that matches the fourth route (a template).
#[divan::bench]
fn route_select(bencher: divan::Bencher) {
    let config = config();
    let ListenerKind::Http { routes, .. } = &config.listeners[0].kind else {
        unreachable!()
    };
    let req = request();
    bencher.bench_local(|| {
        let head = RequestHead::new(req.method(), req.uri(), req.headers());
        divan::black_box(route::select(routes, &head))
    });
}

/// The whole shard decision with a cached answer: route, key from the path capture,
/// directory (table: the same cost as a cache hit), residency, first available shard.
#[divan::bench]
fn shard_plan_table(bencher: divan::Bencher) {
    let config = config();
    let ListenerKind::Http { routes, .. } = &config.listeners[0].kind else {
        unreachable!()
    };
    let metrics = attache::telemetry::Metrics::new();
    let dir = DirectoryState::new(
        config.directories[0].clone(),
        &[],
        metrics.directory("regions"),
    );
    let set = &config.shard_sets[0];
    let req = request();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    bencher.bench_local(|| {
        let head = RequestHead::new(req.method(), req.uri(), req.headers());
        let d = route::select(routes, &head).unwrap();
        let plan = rt
            .block_on(shard::plan(
                set,
                Some(&dir),
                &head,
                &d.captures,
                &routes[d.route],
            ))
            .unwrap();
        divan::black_box(shard::first_available(&plan.allowed, &[], |_| true))
    });
}

/// A directory cache hit on an HTTP lookup directory (warmed first by a real lookup on a
/// loopback lookup service).
#[divan::bench]
fn directory_cache_hit(bencher: divan::Bencher) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for mut s in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let body = "{\"country\":\"IN\"}";
            let _ = write!(
                s,
                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
        }
    });
    let text = format!(
        "clusters:\n  users: {{ endpoints: [\"{addr}\"] }}\ndirectories:\n  lookups:\n    http: {{ cluster: users, path: \"/users/{{key}}\", pointer: /country }}\n"
    );
    let config = Config::parse(&text, Path::new("bench.yaml")).unwrap();
    let metrics = attache::telemetry::Metrics::new();
    let clusters: Vec<_> = config
        .clusters
        .iter()
        .map(|c| attache::upstream::ClusterState::new(c.clone(), 1, metrics.cluster(&c.name)))
        .collect();
    let dir = DirectoryState::new(
        config.directories[0].clone(),
        &clusters,
        metrics.directory("lookups"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let warmed = rt.block_on(dir.locate("priya")).unwrap();
    assert_eq!(warmed.value.as_deref(), Some("IN"));
    bencher.bench_local(|| divan::black_box(rt.block_on(dir.locate("priya")).unwrap()));
}

/// Endpoint choice: least request (power of two choices) over four endpoints.
#[divan::bench]
fn endpoint_pick(bencher: divan::Bencher) {
    let config = config();
    let metrics = attache::telemetry::Metrics::new();
    let cluster = attache::upstream::ClusterState::new(
        config.clusters[2].clone(),
        1,
        metrics.cluster("users"),
    );
    let cluster = Arc::new(cluster);
    bencher.bench_local(|| divan::black_box(cluster.pick(None, None)));
}

/// Split choice for a keyed request: override header absent, allow list miss, the key's
/// place on the weight range (route selection not included).
#[divan::bench]
fn split_choice(bencher: divan::Bencher) {
    let config = config();
    let ListenerKind::Http { routes, .. } = &config.listeners[0].kind else {
        unreachable!()
    };
    let req = http::Request::get("http://127.0.0.1:10000/feed/today")
        .header("host", "127.0.0.1:10000")
        .header("user-agent", "bench")
        .header("accept", "*/*")
        .header("x-user-id", "priya")
        .body(())
        .unwrap();
    let head = RequestHead::new(req.method(), req.uri(), req.headers());
    let d = route::select(routes, &head).unwrap();
    let route = &routes[d.route];
    let split = &config.splits[0];
    bencher.bench_local(|| {
        let head = RequestHead::new(req.method(), req.uri(), req.headers());
        divan::black_box(attache::split::choose(split, &head, &d.captures, route))
    });
}
