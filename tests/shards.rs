//! Shard routing with residency, against real upstreams: the guarantee under random shard
//! states, directory caching (single-flight, stale-on-error), isolation, scatter-gather and
//! hostile keys.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

/// A shard upstream: answers `{"images": [{"owner": user}]}` for `/images/{user}/...` and for
/// batches `/images?users=a,b`, and remembers every owner it saw.
async fn shard(name: &'static str) -> Upstream {
    Upstream::start(move |req| async move {
        let path = req.uri().path().to_owned();
        if path == "/health" {
            return text(200, "ok");
        }
        let owners: Vec<String> = if path == "/images" && req.method() == http::Method::POST {
            let body = http_body_util::BodyExt::collect(req.into_body())
                .await
                .unwrap()
                .to_bytes();
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            v["users"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|u| u.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        } else if path == "/images" {
            let q = req.uri().query().unwrap_or("");
            attache::route::query_param(q, "users")
                .map(|v| v.split(',').map(str::to_owned).collect())
                .unwrap_or_default()
        } else {
            vec![path.split('/').nth(2).unwrap_or("").to_owned()]
        };
        let images: Vec<_> = owners
            .iter()
            .map(|o| serde_json::json!({"owner": o, "shard": name}))
            .collect();
        let mut r = text(200, &serde_json::json!({ "images": images }).to_string());
        r.headers_mut().insert("x-shard", name.parse().unwrap());
        r
    })
    .await
}

/// Owners a shard upstream has seen.
fn owners_seen(up: &Upstream) -> Vec<String> {
    up.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| !s.uri.starts_with("/health"))
        .flat_map(|s| {
            let uri: http::Uri = s.uri.parse().unwrap();
            if uri.path() == "/images" {
                attache::route::query_param(uri.query().unwrap_or(""), "users")
                    .map(|v| v.split(',').map(str::to_owned).collect::<Vec<_>>())
                    .unwrap_or_default()
            } else {
                vec![uri.path().split('/').nth(2).unwrap_or("").to_owned()]
            }
        })
        .collect()
}

/// The Users service: `/users/{name}` → `{"country": ...}`, counting lookups per user.
struct Users {
    up: Upstream,
    failing: Arc<AtomicBool>,
}

async fn users(table: &'static [(&'static str, &'static str)], delay: Duration) -> Users {
    let failing = Arc::new(AtomicBool::new(false));
    let f = failing.clone();
    let up = Upstream::start(move |req| {
        let fail = f.load(Ordering::SeqCst);
        async move {
            tokio::time::sleep(delay).await;
            if fail {
                return text(500, "users service is broken");
            }
            let name = req.uri().path().trim_start_matches("/users/").to_owned();
            match table.iter().find(|(n, _)| *n == name) {
                Some((_, c)) => text(200, &format!("{{\"name\":\"{name}\",\"country\":\"{c}\"}}")),
                None => text(404, "{}"),
            }
        }
    })
    .await;
    Users { up, failing }
}

const PEOPLE: &[(&str, &str)] = &[
    ("alice", "US"),
    ("bob", "GB"),
    ("carlos", "BR"),
    ("priya", "IN"),
    ("arjun", "IN"),
    ("hans", "DE"),
];

fn residency_config(
    users: SocketAddr,
    india: SocketAddr,
    global: SocketAddr,
    extra: &str,
) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: app
    address: "127.0.0.1:0"
    routes:
      - name: batch
        match: {{ path: {{ exact: /images }} }}
        shard_set: images
        batch: {{ query: users, merge: concat, items: /images, partial_field: degraded, timeout: 500ms }}
      - name: images
        match: {{ path: {{ template: "/images/{{user}}/{{rest*}}" }} }}
        shard_set: images
        timeout: 300ms
clusters:
  users: {{ endpoints: ["{users}"] }}
  india: {{ endpoints: ["{india}"], connect_timeout: 200ms }}
  global: {{ endpoints: ["{global}"], connect_timeout: 200ms }}
directories:
  country:
    http: {{ cluster: users, path: "/users/{{key}}", pointer: /country, timeout: 1s }}
{extra}
shard_sets:
  images:
    key: {{ capture: user }}
    directory: country
    shards:
      india: {{ cluster: india, region: IN }}
      global: {{ cluster: global }}
    residency:
      IN: [india]
      "*": [global]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn india_down_refuses_indian_users_fast_and_serves_everyone_else() {
    let users = users(PEOPLE, Duration::ZERO).await;
    let global = shard("global").await;
    let (_hold, india) = refusing_port();
    let at = Attache::start(&residency_config(users.up.addr, india, global.addr, ""));
    for user in ["alice", "bob", "carlos"] {
        let got = get(&at.url("app", &format!("/images/{user}/1.png"))).await;
        assert_eq!(got.status, 200, "{user}");
        assert_eq!(got.header("x-shard"), Some("global"));
    }
    for user in ["priya", "arjun"] {
        let t = Instant::now();
        let got = get(&at.url("app", &format!("/images/{user}/1.png"))).await;
        assert_eq!(got.status, 503, "{user}: {}", got.text());
        assert_eq!(
            got.header("x-attache-reason"),
            Some("residency-unavailable")
        );
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        // Writes too: nothing lands anywhere else.
        let post = send(
            Request::post(at.url("app", &format!("/images/{user}/new")))
                .body(Full::new(Bytes::from("img")))
                .unwrap(),
        )
        .await
        .unwrap();
        assert_eq!(post.status, 503);
    }
    let seen = owners_seen(&global);
    assert!(
        !seen.iter().any(|o| o == "priya" || o == "arjun"),
        "global saw an Indian user: {seen:?}"
    );
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("attache_residency_denials_total{shard_set=\"images\",region=\"IN\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("attache_shard_requests_total{shard_set=\"images\",shard=\"global\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_shard_does_not_slow_the_others() {
    let users = users(PEOPLE, Duration::ZERO).await;
    let global = shard("global").await;
    let india = Upstream::slow(Duration::from_secs(30), "late").await;
    let at = Attache::start(&residency_config(
        users.up.addr,
        india.addr,
        global.addr,
        "",
    ));
    // Warm the directory cache so that only the shards' behaviour is measured.
    for u in ["alice", "priya"] {
        let _ = get(&at.url("app", &format!("/images/{u}/warm"))).await;
    }
    let hung: Vec<_> = (0..8)
        .map(|i| {
            let url = at.url("app", &format!("/images/priya/{i}"));
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for i in 0..20 {
        let t = Instant::now();
        let got = get(&at.url("app", &format!("/images/alice/{i}"))).await;
        assert_eq!(got.status, 200);
        assert!(
            t.elapsed() < Duration::from_millis(150),
            "alice took {:?} while india hangs",
            t.elapsed()
        );
    }
    for h in hung {
        let got = h.await.unwrap();
        assert_eq!(got.status, 504);
        assert_eq!(got.header("x-attache-reason"), Some("timeout"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_lookup() {
    let users = users(PEOPLE, Duration::from_millis(200)).await;
    let global = shard("global").await;
    let india = shard("india").await;
    let at = Attache::start(&residency_config(
        users.up.addr,
        india.addr,
        global.addr,
        "",
    ));
    let all: Vec<_> = (0..100)
        .map(|i| {
            let url = at.url("app", &format!("/images/priya/{i}"));
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for h in all {
        let got = h.await.unwrap();
        assert_eq!(got.status, 200);
        assert_eq!(got.header("x-shard"), Some("india"));
    }
    assert_eq!(
        users.up.hits(),
        1,
        "100 concurrent misses for one key make exactly one lookup"
    );
    // Cached now: no further lookups.
    get(&at.url("app", "/images/priya/again")).await;
    assert_eq!(users.up.hits(), 1);
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("attache_directory_cache_hits_total{directory=\"country\"}"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_entries_serve_within_their_maximum_age_only() {
    let users = users(PEOPLE, Duration::ZERO).await;
    let global = shard("global").await;
    let india = shard("india").await;
    let cache = "    cache: { ttl: 100ms, negative_ttl: 100ms, stale_for: 700ms }";
    let at = Attache::start(&residency_config(
        users.up.addr,
        india.addr,
        global.addr,
        cache,
    ));
    let fetched = Instant::now();
    assert_eq!(
        get(&at.url("app", "/images/priya/a"))
            .await
            .header("x-shard"),
        Some("india")
    );
    users.failing.store(true, Ordering::SeqCst);
    // Past the TTL, the lookup fails: the stale entry answers, until ttl + stale_for.
    let url = at.url("app", "/images/priya/b");
    let mut saw_stale = false;
    let refused_at = loop {
        let got = get(&url).await;
        let age = fetched.elapsed();
        match got.status {
            200 => {
                assert_eq!(got.header("x-shard"), Some("india"));
                assert!(
                    age < Duration::from_millis(800) + Duration::from_millis(100),
                    "stale served at {age:?}"
                );
                if age > Duration::from_millis(100) {
                    saw_stale = true;
                }
            }
            503 => {
                assert_eq!(
                    got.header("x-attache-reason"),
                    Some("directory-unavailable")
                );
                break age;
            }
            s => panic!("unexpected {s}"),
        }
        assert!(age < Duration::from_secs(5), "never refused");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    assert!(saw_stale, "a stale entry was served after the TTL");
    assert!(
        refused_at >= Duration::from_millis(800),
        "refused at {refused_at:?}, before ttl + stale_for"
    );
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        !metrics.contains("attache_directory_stale_serves_total{directory=\"country\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scatter_gather_returns_the_live_shards_marked_partial() {
    let users = users(PEOPLE, Duration::ZERO).await;
    let global = shard("global").await;
    let india = Upstream::slow(Duration::from_secs(30), "late").await;
    let at = Attache::start(&residency_config(
        users.up.addr,
        india.addr,
        global.addr,
        "",
    ));
    let t = Instant::now();
    let got = get(&at.url("app", "/images?users=alice,priya,bob,arjun,carlos")).await;
    let took = t.elapsed();
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(
        took < Duration::from_millis(1500),
        "bounded by the sub-request timeout: {took:?}"
    );
    assert_eq!(got.header("x-attache-partial"), Some("india"));
    let v = got.json();
    let owners: Vec<&str> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["owner"].as_str().unwrap())
        .collect();
    assert_eq!(owners, ["alice", "bob", "carlos"]);
    assert_eq!(
        v["degraded"]["missing_shards"],
        serde_json::json!(["india"])
    );
    assert!(v["degraded"]["missing_keys"]["priya"].is_string());
    // Everything healthy: whole, not partial.
    let global_only = get(&at.url("app", "/images?users=alice,bob")).await;
    assert_eq!(global_only.status, 200);
    assert!(global_only.header("x-attache-partial").is_none());
    // Bounds.
    let many: Vec<String> = (0..101).map(|i| format!("u{i}")).collect();
    let too_many = get(&at.url("app", &format!("/images?users={}", many.join(",")))).await;
    assert_eq!(too_many.status, 400);
    assert_eq!(too_many.header("x-attache-reason"), Some("too-many-keys"));
    // India only, and India hangs: nothing to return.
    let none = get(&at.url("app", "/images?users=priya")).await;
    assert_eq!(none.status, 503);
    assert_eq!(
        none.header("x-attache-reason"),
        Some("all-shards-unavailable")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_keys_are_refused_or_encoded() {
    let users = users(PEOPLE, Duration::ZERO).await;
    let global = shard("global").await;
    let india = shard("india").await;
    let at = Attache::start(&residency_config(
        users.up.addr,
        india.addr,
        global.addr,
        "",
    ));
    let long = "x".repeat(300);
    let cases = [
        (format!("/images/{long}/a"), 400, "shard-key-invalid"),
        ("/images/%FF%FE/a".to_owned(), 400, "shard-key-invalid"),
        ("/images/../a".to_owned(), 400, "shard-key-invalid"),
        ("/images/%2E%2E/a".to_owned(), 400, "shard-key-invalid"),
        ("/images/a%0Ab/a".to_owned(), 400, "shard-key-invalid"),
        ("/images/nobody/a".to_owned(), 404, "shard-key-unknown"),
    ];
    for (path, status, reason) in &cases {
        let got = get(&at.url("app", path)).await;
        assert_eq!(got.status, *status, "{path}: {}", got.text());
        assert_eq!(got.header("x-attache-reason"), Some(*reason), "{path}");
    }
    // Characters that would change a lookup URL are percent-encoded: the Users service sees
    // exactly one path segment, never another URL.
    let got = get(&at.url("app", "/images/a%2F..%2Fadmin%3Fx=1/a")).await;
    assert_eq!(got.status, 404);
    let seen: Vec<String> = users
        .up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.uri.clone())
        .collect();
    assert!(
        seen.contains(&"/users/a%2F..%2Fadmin%3Fx%3D1".to_owned()),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|u| u.starts_with("/users/") && !u[7..].contains('/') && !u.contains('?')),
        "{seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_keys_are_refused_or_sent_to_the_default_shard() {
    let a = shard("a").await;
    let b = shard("b").await;
    let yaml = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: app
    address: "127.0.0.1:0"
    routes:
      - {{ name: strict, match: {{ path: {{ prefix: /strict }} }}, shard_set: strict }}
      - {{ name: lenient, match: {{ path: {{ prefix: /lenient }} }}, shard_set: lenient }}
clusters:
  a: {{ endpoints: ["{}"] }}
  b: {{ endpoints: ["{}"] }}
shard_sets:
  strict:
    key: {{ header: x-user }}
    hash: true
    shards: {{ a: {{ cluster: a }}, b: {{ cluster: b }} }}
  lenient:
    key: {{ header: x-user }}
    hash: true
    default_shard: b
    shards: {{ a: {{ cluster: a }}, b: {{ cluster: b }} }}
"#,
        a.addr, b.addr
    );
    let at = Attache::start(&yaml);
    let got = get(&at.url("app", "/strict/x")).await;
    assert_eq!(got.status, 400);
    assert_eq!(got.header("x-attache-reason"), Some("shard-key-missing"));
    assert_eq!(get(&at.url("app", "/lenient/x")).await.status, 200);
    assert_eq!(a.hits() + b.hits(), 1);
    assert_eq!(b.hits(), 1, "the default shard");
    // Hashing is sticky per key and spreads keys.
    let mut per_shard: HashMap<String, usize> = HashMap::new();
    for i in 0..40 {
        let user = format!("user-{i}");
        let first = get_with(&at.url("app", "/strict/x"), &[("x-user", &user)])
            .await
            .header("x-shard")
            .unwrap()
            .to_owned();
        let again = get_with(&at.url("app", "/strict/y"), &[("x-user", &user)])
            .await
            .header("x-shard")
            .unwrap()
            .to_owned();
        assert_eq!(first, again);
        *per_shard.entry(first).or_default() += 1;
    }
    assert_eq!(per_shard.len(), 2, "{per_shard:?}");
}

/// The guarantee, over random keys, regions and shard states: no request ever reaches a shard
/// outside its allowed set.
#[test]
fn residency_holds_under_random_shard_states() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    #[derive(Debug, Clone, Copy)]
    enum State {
        Up,
        Down,
        Hung,
        Erroring,
    }
    let state = prop_oneof![
        Just(State::Up),
        Just(State::Down),
        Just(State::Hung),
        Just(State::Erroring)
    ];
    let regions = ["IN", "DE", "US", "BR", "XX"];
    let strategy = (
        proptest::collection::vec(state, 4),
        proptest::collection::vec((0usize..40, 0usize..regions.len()), 1..25),
    );
    let mut runner = TestRunner::new(Config {
        cases: 10,
        ..Config::default()
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runner
        .run(&strategy, |(states, requests)| {
            rt.block_on(async {
                // Shards: india (IN), eu (DE, also a failover for the rest), us, global.
                let names = ["india", "eu", "us", "global"];
                let mut addrs = Vec::new();
                let mut ups = Vec::new();
                let mut holds = Vec::new();
                for (i, s) in states.iter().enumerate() {
                    let name = names[i];
                    match s {
                        State::Down => {
                            let (h, a) = refusing_port();
                            holds.push(h);
                            addrs.push(a);
                        }
                        State::Up => {
                            let up = shard(name).await;
                            addrs.push(up.addr);
                            ups.push((name, up));
                        }
                        State::Hung => {
                            let up = Upstream::slow(Duration::from_secs(30), "late").await;
                            addrs.push(up.addr);
                            ups.push((name, up));
                        }
                        State::Erroring => {
                            let up = Upstream::start(|_req| async { text(500, "boom") }).await;
                            addrs.push(up.addr);
                            ups.push((name, up));
                        }
                    }
                }
                // Key k lives in region regions[r] as the test says.
                let mut region_of = HashMap::new();
                for (k, r) in &requests {
                    region_of.entry(format!("k{k}")).or_insert(regions[*r]);
                }
                let table: String = region_of.iter().map(|(k, r)| format!("{k}: {r}, ")).collect();
                let yaml = format!(
                    r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: app
    address: "127.0.0.1:0"
    routes: [ {{ match: {{ path: {{ template: "/images/{{user}}/{{rest*}}" }} }}, shard_set: s, timeout: 150ms }} ]
clusters:
  india: {{ endpoints: ["{}"], connect_timeout: 100ms }}
  eu: {{ endpoints: ["{}"], connect_timeout: 100ms }}
  us: {{ endpoints: ["{}"], connect_timeout: 100ms }}
  global: {{ endpoints: ["{}"], connect_timeout: 100ms }}
directories:
  regions: {{ table: {{ {table} }} }}
shard_sets:
  s:
    key: {{ capture: user }}
    directory: regions
    shards:
      india: {{ cluster: india, region: IN }}
      eu: {{ cluster: eu, region: EU }}
      us: {{ cluster: us, region: US }}
      global: {{ cluster: global }}
    residency:
      IN: [india]
      DE: [eu]
      US: [us, global]
      "*": [global, eu]
"#,
                    addrs[0], addrs[1], addrs[2], addrs[3]
                );
                let allowed = |region: &str| -> &'static [&'static str] {
                    match region {
                        "IN" => &["india"],
                        "DE" => &["eu"],
                        "US" => &["us", "global"],
                        _ => &["global", "eu"],
                    }
                };
                let at = Attache::start(&yaml);
                for (k, _) in &requests {
                    let key = format!("k{k}");
                    let got = get(&at.url("app", &format!("/images/{key}/x"))).await;
                    if got.status == 200 {
                        let shard = got.header("x-shard").unwrap_or("?").to_owned();
                        prop_assert!(allowed(region_of[&key]).contains(&shard.as_str()), "{key} ({}) answered by {shard}", region_of[&key]);
                    }
                }
                for (name, up) in &ups {
                    for owner in owners_seen(up) {
                        let region = region_of.get(&owner).copied().unwrap_or("?");
                        prop_assert!(
                            allowed(region).contains(name),
                            "shard {name} saw {owner} of region {region}; states {states:?}"
                        );
                    }
                }
                Ok(())
            })
        })
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_shows_key_region_allowed_and_chosen_shards() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    std::fs::write(
        &path,
        r#"
listeners:
  - address: 127.0.0.1:10000
    routes: [ { match: { path: { template: "/images/{user}/{rest*}" } }, shard_set: images } ]
clusters:
  india: { endpoints: ["127.0.0.1:1"] }
  global: { endpoints: ["127.0.0.1:2"] }
directories:
  regions: { table: { priya: IN, bob: GB } }
shard_sets:
  images:
    key: { capture: user }
    directory: regions
    shards: { india: { cluster: india, region: IN }, global: { cluster: global } }
    residency: { IN: [india], "*": [global] }
"#,
    )
    .unwrap();
    let out = std::process::Command::new(binary())
        .args(["explain", "--config"])
        .arg(&path)
        .arg("http://127.0.0.1:10000/images/priya/1.png")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("shard key   priya (from path capture user)"),
        "{text}"
    );
    assert!(text.contains("region      IN"), "{text}");
    assert!(text.contains("allowed     india"), "{text}");
    assert!(
        text.contains("shard       india (no failover outside this list)"),
        "{text}"
    );
    assert!(text.contains("cluster     india"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_directories_reload_and_json_batches_split_by_shard() {
    let india = shard("india").await;
    let global = shard("global").await;
    let dir = tempfile::tempdir().unwrap();
    let table = dir.path().join("regions.yaml");
    std::fs::write(&table, "priya: IN\nbob: GB\n").unwrap();
    let yaml = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: app
    address: "127.0.0.1:0"
    routes:
      - name: batch
        match: {{ path: {{ exact: /images }}, methods: [POST] }}
        shard_set: images
        batch: {{ json_body: /users, merge: concat, items: /images }}
      - name: one
        match: {{ path: {{ template: "/images/{{user}}/{{rest*}}" }} }}
        shard_set: images
clusters:
  india: {{ endpoints: ["{}"] }}
  global: {{ endpoints: ["{}"] }}
directories:
  regions: {{ file: "{}" }}
shard_sets:
  images:
    key: {{ capture: user }}
    directory: regions
    shards: {{ india: {{ cluster: india, region: IN }}, global: {{ cluster: global }} }}
    residency: {{ IN: [india], "*": [global] }}
"#,
        india.addr,
        global.addr,
        table.display()
    );
    let at = Attache::start(&yaml);
    assert_eq!(
        get(&at.url("app", "/images/bob/1")).await.header("x-shard"),
        Some("global")
    );
    assert_eq!(
        get(&at.url("app", "/images/arjun/1")).await.status,
        404,
        "not in the file yet"
    );
    // The file changes: attache re-reads it (within about a second).
    std::fs::write(&table, "priya: IN\nbob: GB\narjun: IN\n").unwrap();
    let url = at.url("app", "/images/arjun/1");
    assert!(
        eventually(Duration::from_secs(5), || {
            let url = url.clone();
            async move { get(&url).await.header("x-shard") == Some("india") }
        })
        .await
    );
    // A JSON batch: {"users": [...]} split by shard, each shard sent only its own keys.
    let body = serde_json::json!({ "users": ["priya", "bob", "arjun"] }).to_string();
    let got = send(
        Request::post(at.url("app", "/images"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200, "{}", got.text());
    let v = got.json();
    let mut served: Vec<(&str, &str)> = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["owner"].as_str().unwrap(), i["shard"].as_str().unwrap()))
        .collect();
    served.sort();
    assert_eq!(
        served,
        [("arjun", "india"), ("bob", "global"), ("priya", "india")]
    );
}
