//! Resilience against scripted upstreams: retries and their budget, idempotency, breakers,
//! outlier ejection, hedging, rate and concurrency limits, fallbacks, timeouts.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::*;

fn config(endpoints: &[std::net::SocketAddr], cluster_extra: &str, route_extra: &str) -> String {
    let eps: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: main
    address: "127.0.0.1:0"
    routes:
      - name: r
        cluster: c
{route_extra}
clusters:
  c:
    endpoints: [{}]
{cluster_extra}
"#,
        eps.join(", ")
    )
}

/// An upstream that fails `n` times (503) and then answers 200.
async fn fails_then_ok(n: usize) -> Upstream {
    let count = Arc::new(AtomicUsize::new(0));
    Upstream::start(move |_req| {
        let i = count.fetch_add(1, Ordering::SeqCst);
        async move {
            if i < n {
                text(503, "not yet")
            } else {
                text(200, "ok")
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_twice_then_succeed_is_retried_and_logged() {
    let up = fails_then_ok(2).await;
    let at = Attache::start(&config(
        &[up.addr],
        "    retry: { attempts: 3, backoff_base: 1ms, backoff_max: 5ms }",
        "",
    ));
    let got = get(&at.url("main", "/x")).await;
    assert_eq!(got.status, 200);
    assert_eq!(up.hits(), 3);
    let log = at.access_log(1);
    assert_eq!(log[0]["attempts"], 3);
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("attache_retries_total{cluster=\"c\"} 2"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_budget_bounds_what_upstreams_receive_in_an_outage() {
    let up = Upstream::start(|_req| async { text(503, "down") }).await;
    let at = Attache::start(&config(
        &[up.addr],
        "    retry: { attempts: 3, backoff_base: 1ms, backoff_max: 2ms, budget_ratio: 0.2, budget_min_per_second: 2 }",
        "",
    ));
    let n = 100;
    let t = Instant::now();
    for _ in 0..n {
        assert_eq!(get(&at.url("main", "/x")).await.status, 503);
    }
    let secs = t.elapsed().as_secs_f64().ceil() as usize;
    let hits = up.hits();
    // Without a budget: 3 × 100 = 300.
    let bound = n + n / 5 + 2 * (secs + 1);
    assert!(
        hits <= bound,
        "{hits} upstream requests for {n} requests in {secs} s (bound {bound})"
    );
    assert!(hits > n, "some retries happened: {hits}");
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        !metrics.contains("attache_retry_budget_exhausted_total{cluster=\"c\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_is_retried_only_with_an_idempotency_key() {
    let up = Upstream::start(|_req| async { text(503, "down") }).await;
    let at = Attache::start(&config(
        &[up.addr],
        "    retry: { attempts: 2, backoff_base: 1ms }",
        "",
    ));
    let post = |key: Option<&str>| {
        let mut r =
            Request::post(at.url("main", "/pay")).header("content-type", "application/json");
        if let Some(k) = key {
            r = r.header("idempotency-key", k);
        }
        r.body(Full::new(Bytes::from_static(b"{\"amount\":1}")))
            .unwrap()
    };
    assert_eq!(send(post(None)).await.unwrap().status, 503);
    assert_eq!(
        up.hits(),
        1,
        "a POST without Idempotency-Key is never retried"
    );
    assert_eq!(send(post(Some("k-1"))).await.unwrap().status, 503);
    assert_eq!(up.hits(), 3, "with one it is, body and all");
    // The client can opt out.
    let got = get_with(&at.url("main", "/x"), &[("x-attache-retry", "off")]).await;
    assert_eq!(got.status, 503);
    assert_eq!(up.hits(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let count = Arc::new(AtomicUsize::new(0));
    let c = count.clone();
    let up = Upstream::start(move |req| {
        let i = c.fetch_add(1, Ordering::SeqCst);
        let long = req.uri().path() == "/long";
        async move {
            let mut r = text(if i.is_multiple_of(2) { 503 } else { 200 }, "x");
            r.headers_mut().insert(
                "retry-after",
                if long { "120" } else { "0" }.parse().unwrap(),
            );
            r
        }
    })
    .await;
    let at = Attache::start(&config(&[up.addr], "    retry: { attempts: 2 }", ""));
    assert_eq!(
        get(&at.url("main", "/short")).await.status,
        200,
        "Retry-After: 0 is retried"
    );
    assert_eq!(up.hits(), 2);
    assert_eq!(
        get(&at.url("main", "/long")).await.status,
        503,
        "Retry-After: 120 s is not waited for"
    );
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_breaker_opens_answers_at_once_and_a_probe_closes_it() {
    let broken = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let b = broken.clone();
    let up = Upstream::start(move |_req| {
        let broken = b.load(Ordering::SeqCst);
        async move {
            if broken {
                text(500, "broken")
            } else {
                text(200, "fine")
            }
        }
    })
    .await;
    let at = Attache::start(&config(
        &[up.addr],
        "    retry: { attempts: 1 }\n    outlier_detection: { consecutive_errors: 100 }\n    breaker: { consecutive_failures: 3, open_for: 300ms }",
        "",
    ));
    for _ in 0..3 {
        assert_eq!(get(&at.url("main", "/x")).await.status, 500);
    }
    let hits_when_opened = up.hits();
    for _ in 0..20 {
        let got = get(&at.url("main", "/x")).await;
        assert_eq!(got.status, 503);
        assert_eq!(got.header("x-attache-reason"), Some("circuit-open"));
    }
    assert_eq!(
        up.hits(),
        hits_when_opened,
        "nothing reaches the upstream while open"
    );
    let log = at.access_log(23);
    let open: Vec<f64> = log
        .iter()
        .filter(|l| l["reason"] == "circuit-open")
        .map(|l| l["duration_ms"].as_f64().unwrap())
        .collect();
    let mut sorted = open.clone();
    sorted.sort_by(f64::total_cmp);
    assert!(
        sorted[sorted.len() / 2] < 0.5,
        "median time attache spent on an open-circuit answer: {sorted:?} ms"
    );
    let clusters = get(&at.admin_url("/clusters")).await.json();
    assert_eq!(clusters["clusters"][0]["breaker"]["state"], "open");
    assert!(
        clusters["clusters"][0]["breaker"]["next_probe_ms"]
            .as_u64()
            .unwrap()
            <= 300
    );
    // Back up: after the open period one probe goes through and closes the breaker.
    broken.store(false, Ordering::SeqCst);
    let url = at.url("main", "/x");
    assert!(
        eventually(Duration::from_secs(3), || {
            let url = url.clone();
            async move { get(&url).await.status == 200 }
        })
        .await
    );
    let clusters = get(&at.admin_url("/clusters")).await.json();
    assert_eq!(clusters["clusters"][0]["breaker"]["state"], "closed");
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("attache_breaker_state{cluster=\"c\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("attache_breaker_transitions_total{cluster=\"c\"} 3"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_endpoints_are_ejected_and_the_rest_serve() {
    let bad = Upstream::start(|_req| async { text(500, "bad") }).await;
    let good = Upstream::named("good").await;
    let at = Attache::start(&config(
        &[bad.addr, good.addr],
        "    retry: { attempts: 1 }\n    balance: round_robin\n    outlier_detection: { consecutive_errors: 3, base_ejection: 30s }",
        "",
    ));
    for _ in 0..12 {
        get(&at.url("main", "/x")).await;
    }
    let bad_hits = bad.hits();
    assert!(bad_hits >= 3, "{bad_hits}");
    for _ in 0..20 {
        assert_eq!(get(&at.url("main", "/x")).await.text(), "good");
    }
    assert_eq!(bad.hits(), bad_hits, "the ejected endpoint gets nothing");
    let clusters = get(&at.admin_url("/clusters")).await.json();
    let eps = clusters["clusters"][0]["endpoints"].as_array().unwrap();
    assert!(eps
        .iter()
        .any(|e| e["address"] == bad.addr.to_string().as_str() && e["ejected"] == true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_returns_the_fast_answer() {
    let slow = Upstream::slow(Duration::from_millis(800), "slow").await;
    let fast = Upstream::named("fast").await;
    let at = Attache::start(&config(
        &[slow.addr, fast.addr],
        "    balance: round_robin",
        "        hedge: { delay: 50ms }",
    ));
    for _ in 0..6 {
        let t = Instant::now();
        let got = get(&at.url("main", "/x")).await;
        assert_eq!(got.text(), "fast");
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        !metrics.contains("attache_hedges_total{cluster=\"c\"} 0"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_past_the_rate() {
    let up = Upstream::named("a").await;
    let at = Attache::start(&config(
        &[up.addr],
        "",
        "        rate_limit: { requests_per_second: 5, burst: 5 }",
    ));
    let t = Instant::now();
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..30 {
        let got = get(&at.url("main", "/x")).await;
        match got.status {
            200 => ok += 1,
            429 => {
                limited += 1;
                assert_eq!(got.header("x-attache-reason"), Some("rate-limited"));
                assert!(got.header("retry-after").is_some());
            }
            s => panic!("{s}"),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    assert!(
        ok >= 5 && (ok as f64) <= 5.0 + 5.0 * secs + 1.0,
        "{ok} allowed in {secs:.2} s"
    );
    assert!(limited > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_rate_limits_are_per_key() {
    let up = Upstream::named("a").await;
    let at = Attache::start(&config(
        &[up.addr],
        "",
        "        rate_limit: { requests_per_second: 1, burst: 2, per: { header: x-user } }",
    ));
    for user in ["priya", "bob"] {
        assert_eq!(
            get_with(&at.url("main", "/x"), &[("x-user", user)])
                .await
                .status,
            200
        );
        assert_eq!(
            get_with(&at.url("main", "/x"), &[("x-user", user)])
                .await
                .status,
            200
        );
        assert_eq!(
            get_with(&at.url("main", "/x"), &[("x-user", user)])
                .await
                .status,
            429
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limits_answer_overloaded() {
    let up = Upstream::slow(Duration::from_millis(400), "slow").await;
    let at = Attache::start(&config(
        &[up.addr],
        "    max_requests: 1\n    max_pending: 0\n    retry: { attempts: 1 }",
        "",
    ));
    let url = at.url("main", "/x");
    let first = tokio::spawn(async move { get(&url).await });
    assert!(
        eventually(Duration::from_secs(5), || {
            let n = up.hits();
            async move { n == 1 }
        })
        .await
    );
    let second = get(&at.url("main", "/x")).await;
    assert_eq!(second.status, 503);
    assert_eq!(second.header("x-attache-reason"), Some("overloaded"));
    assert_eq!(first.await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fallback_answers_when_the_cluster_cannot() {
    let (_hold, addr) = refusing_port();
    let at = Attache::start(&config(
        &[addr],
        "",
        "        fallback: { status: 200, body: '{\"images\": []}', content_type: application/json }",
    ));
    let got = get(&at.url("main", "/x")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "{\"images\": []}");
    assert_eq!(
        got.header("x-attache-fallback"),
        Some("upstream-connect-failed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_ends_within_its_timeout() {
    let hung = Upstream::slow(Duration::from_secs(30), "late").await;
    let at = Attache::start(&config(
        &[hung.addr],
        "    retry: { attempts: 5, on: [timeout], backoff_base: 1ms }\n    per_try_timeout: 100ms",
        "        timeout: 350ms",
    ));
    for _ in 0..3 {
        let t = Instant::now();
        let got = get(&at.url("main", "/x")).await;
        let took = t.elapsed();
        assert_eq!(got.status, 504);
        assert!(took < Duration::from_millis(600), "{took:?}");
    }
    assert!(
        hung.hits() >= 6,
        "per-try timeouts let retries happen: {}",
        hung.hits()
    );
}
