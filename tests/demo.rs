//! `attache demo`, end to end: the real process with every service on free ports, driven over
//! HTTP the way a person following the tour would: faults set on the admin listener, the feed
//! read as JSON and HTML, uploads through the feed, and each shard's `/stats` as the witness
//! that residency held.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};
use support::*;

/// A running `attache demo --json` (see tests/support/demo.rs) and the tour's steps.
struct Demo(support::demo::DemoProcess);

impl std::ops::Deref for Demo {
    type Target = support::demo::DemoProcess;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Demo {
    fn start() -> Demo {
        Demo(support::demo::DemoProcess::start())
    }

    fn url(&self, key: &str, path: &str) -> String {
        format!("{}{path}", self.urls[key].as_str().unwrap())
    }

    fn shard(&self, name: &str, path: &str) -> String {
        format!("{}{path}", self.urls["shards"][name].as_str().unwrap())
    }

    async fn fault(&self, target: &str, mode: &str) {
        let got = post(
            &self.url("admin", &format!("/demo/fault/{target}/{mode}")),
            "",
        )
        .await;
        assert_eq!(got.status, 200, "{target}/{mode}: {}", got.text());
        assert_eq!(got.json(), json!({"target": target, "mode": mode}));
    }

    /// `GET {feed}/feed/{user}` as JSON, and how long it took.
    async fn feed(&self, user: &str) -> (Got, Duration) {
        let t = Instant::now();
        let got = get_with(
            &self.url("feed", &format!("/feed/{user}")),
            &[("accept", "application/json")],
        )
        .await;
        (got, t.elapsed())
    }

    async fn upload(&self, owner: &str, title: &str) -> Got {
        post(
            &self.url("feed", "/images"),
            &json!({"owner": owner, "title": title}).to_string(),
        )
        .await
    }

    /// The global shard has never served or stored an Indian user's data.
    async fn assert_residency_held(&self, when: &str) {
        let stats = get(&self.shard("global", "/stats")).await.json();
        assert_eq!(stats["region"], "GLOBAL");
        let owners = stats["owners"].as_array().unwrap();
        assert!(
            !owners.iter().any(|o| o == "priya" || o == "arjun"),
            "{when}: the global shard names an Indian user: {stats}"
        );
    }
}

async fn post(url: &str, body: &str) -> Got {
    send(
        Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_owned())))
            .unwrap(),
    )
    .await
    .unwrap()
}

/// The owners of a feed's items.
fn owners(feed: &Value) -> BTreeSet<String> {
    feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["owner"].as_str().unwrap().to_owned())
        .collect()
}

fn names(list: &Value) -> BTreeSet<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap().to_owned())
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

/// Polls until alice's feed is whole again: every friend's images, nobody degraded.
async fn until_whole(demo: &Demo) -> bool {
    eventually(Duration::from_secs(10), || async {
        let (got, _) = demo.feed("alice").await;
        got.status == 200
            && got.json()["degraded"] == json!([])
            && owners(&got.json()) == set(&["priya", "arjun", "bob", "carlos"])
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn india_down_degrades_the_feed_refuses_priyas_upload_and_comes_back() {
    let demo = Demo::start();
    for key in ["feed", "attache", "admin", "users"] {
        assert!(
            demo.urls[key]
                .as_str()
                .is_some_and(|u| u.starts_with("http://127.0.0.1:")),
            "{key}: {}",
            demo.urls
        );
    }
    assert!(demo.urls["shards"]["india"].is_string());
    assert!(demo.urls["shards"]["global"].is_string());

    // Whole: all four friends, from both shards, each tagged with its region.
    let (got, _) = demo.feed("alice").await;
    assert_eq!(got.status, 200, "{}", got.text());
    let feed = got.json();
    assert_eq!(feed["user"], "alice");
    assert_eq!(feed["degraded"], json!([]));
    assert_eq!(owners(&feed), set(&["priya", "arjun", "bob", "carlos"]));
    for item in feed["items"].as_array().unwrap() {
        let region = if item["owner"] == "priya" || item["owner"] == "arjun" {
            "IN"
        } else {
            "GLOBAL"
        };
        assert_eq!(item["region"], region, "{item}");
        assert!(
            item["title"].is_string() && item["id"].is_string(),
            "{item}"
        );
    }
    let picture = get(&demo.url("feed", feed["items"][0]["url"].as_str().unwrap())).await;
    assert_eq!(picture.status, 200);
    assert_eq!(picture.header("content-type"), Some("image/svg+xml"));
    assert!(picture.text().starts_with("<svg"), "{}", picture.text());
    let html = get(&demo.url("feed", "/feed/alice")).await;
    assert_eq!(html.status, 200);
    assert!(html
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    assert!(
        html.text().contains("<img src=\"/img/priya/"),
        "{}",
        html.text()
    );
    assert!(!html.text().contains("temporarily unavailable"));
    let india = get(&demo.shard("india", "/stats")).await.json();
    assert_eq!(india["region"], "IN");
    assert_eq!(names(&india["owners"]), set(&["priya", "arjun"]));
    let india_images = india["images"].as_u64().unwrap();
    demo.assert_residency_held("at start").await;

    // India down: its socket is closed for real.
    demo.fault("india", "down").await;
    let india_addr = demo.urls["shards"]["india"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    assert!(
        tokio::net::TcpStream::connect(&india_addr).await.is_err(),
        "india still accepts connections"
    );
    let faults = get(&demo.url("admin", "/demo/faults")).await.json();
    assert_eq!(
        faults,
        json!({"targets": {"india": "down", "global": "ok", "users": "ok"}})
    );

    // The feed still answers, fast, with everyone else; priya and arjun are named.
    let (got, took) = demo.feed("alice").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(took < Duration::from_millis(700), "took {took:?}");
    let feed = got.json();
    assert_eq!(owners(&feed), set(&["bob", "carlos"]));
    assert_eq!(names(&feed["degraded"]), set(&["priya", "arjun"]));
    let html = get(&demo.url("feed", "/feed/alice")).await;
    assert_eq!(html.status, 200);
    assert!(
        html.text()
            .contains("Images of 2 people are temporarily unavailable"),
        "{}",
        html.text()
    );

    // priya's upload is refused by attache, and lands nowhere else; bob's goes through.
    let refused = demo.upload("priya", "Refused while India is down").await;
    assert!(
        refused.status >= 500,
        "{} {}",
        refused.status,
        refused.text()
    );
    assert_eq!(
        refused.header("x-attache-reason"),
        Some("residency-unavailable"),
        "{}",
        refused.text()
    );
    assert_eq!(refused.json()["error"], "residency-unavailable");
    let stored = demo.upload("bob", "Stored while India is down").await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    assert_eq!(stored.json()["region"], "GLOBAL");
    demo.assert_residency_held("with india down").await;

    // India back: the feed becomes whole, and priya's refused upload is nowhere.
    demo.fault("india", "ok").await;
    assert!(until_whole(&demo).await, "alice's feed never became whole");
    let india = get(&demo.shard("india", "/stats")).await.json();
    assert_eq!(india["images"].as_u64().unwrap(), india_images);
    let (got, _) = demo.feed("alice").await;
    assert!(
        !got.text().contains("Refused while India is down"),
        "{}",
        got.text()
    );
    assert!(got.text().contains("Stored while India is down"));

    // Now priya's upload is stored, in India, and shows in alice's feed.
    let stored = demo.upload("priya", "Back online").await;
    assert_eq!(stored.status, 201, "{}", stored.text());
    assert_eq!(stored.json()["region"], "IN");
    let (got, _) = demo.feed("alice").await;
    assert!(got.text().contains("Back online"), "{}", got.text());
    demo.assert_residency_held("at the end").await;
    assert_eq!(
        *demo.more_stdout.lock().unwrap(),
        "",
        "stdout holds one line"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_india_shard_costs_the_feed_at_most_the_batch_timeout() {
    let demo = Demo::start();
    demo.fault("india", "hang").await;
    // A hung shard still accepts connections: this is not `down`.
    let india_addr = demo.urls["shards"]["india"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .to_owned();
    assert!(tokio::net::TcpStream::connect(&india_addr).await.is_ok());

    let (got, took) = demo.feed("alice").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert!(
        took < Duration::from_millis(1500),
        "bounded by the batch timeout (800ms): {took:?}"
    );
    assert_eq!(owners(&got.json()), set(&["bob", "carlos"]));
    assert_eq!(names(&got.json()["degraded"]), set(&["priya", "arjun"]));

    // Once the health check has seen it, the hung shard costs nothing.
    let fast = eventually(Duration::from_secs(10), || async {
        let (got, took) = demo.feed("alice").await;
        got.status == 200
            && names(&got.json()["degraded"]) == set(&["priya", "arjun"])
            && took < Duration::from_millis(400)
    })
    .await;
    assert!(fast, "the feed never stopped waiting for the hung shard");

    let refused = demo.upload("priya", "Into the void").await;
    assert!(refused.status >= 500, "{}", refused.text());
    assert!(refused.header("x-attache-reason").is_some());
    demo.assert_residency_held("with india hung").await;

    demo.fault("india", "ok").await;
    assert!(until_whole(&demo).await, "alice's feed never became whole");
    let (got, _) = demo.feed("alice").await;
    assert!(!got.text().contains("Into the void"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_down_gives_a_clear_error_not_a_hang() {
    let demo = Demo::start();
    demo.fault("users", "down").await;
    let (got, took) = demo.feed("alice").await;
    assert!(got.status >= 500, "{} {}", got.status, got.text());
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(got.json()["error"], "users-unavailable", "{}", got.text());
    assert_eq!(
        got.header("x-attache-reason"),
        Some("upstream-connect-failed")
    );
    let html = get(&demo.url("feed", "/feed/alice")).await;
    assert!(html.status >= 500);
    assert!(
        html.text().contains("The Users service is unavailable"),
        "{}",
        html.text()
    );

    demo.fault("users", "ok").await;
    assert!(until_whole(&demo).await, "the feed never came back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_controls_check_their_input_and_the_admin_api_still_works() {
    let demo = Demo::start();
    assert_eq!(
        get(&demo.url("admin", "/demo/faults")).await.json(),
        json!({"targets": {"india": "ok", "global": "ok", "users": "ok"}})
    );
    let unknown = post(&demo.url("admin", "/demo/fault/nowhere/down"), "").await;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "unknown-target");
    let bad_mode = post(&demo.url("admin", "/demo/fault/india/melt"), "").await;
    assert_eq!(bad_mode.status, 400);
    assert_eq!(bad_mode.json()["error"], "unknown-mode");
    // The built-in admin routes answer as before.
    assert_eq!(get(&demo.url("admin", "/ready")).await.status, 200);
    let clusters = get(&demo.url("admin", "/clusters")).await.json();
    assert_eq!(clusters["clusters"].as_array().unwrap().len(), 3);
    assert!(get(&demo.url("admin", "/metrics"))
        .await
        .text()
        .contains("attache_"));

    // `errors` on the global shard: the other way round, India's people still show.
    demo.fault("global", "errors").await;
    let direct = get(&demo.shard("global", "/stats")).await;
    assert_eq!(direct.status, 500);
    let (got, _) = demo.feed("alice").await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(owners(&got.json()), set(&["priya", "arjun"]));
    assert_eq!(names(&got.json()["degraded"]), set(&["bob", "carlos"]));

    // `slow`: answers, late.
    demo.fault("global", "slow").await;
    let t = Instant::now();
    let direct = get(&demo.shard("global", "/health")).await;
    assert_eq!(direct.status, 200);
    assert!(
        t.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );

    demo.fault("global", "ok").await;
    assert!(until_whole(&demo).await, "alice's feed never became whole");
    demo.assert_residency_held("after global faults").await;
}
