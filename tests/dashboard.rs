//! The dashboard in a real browser: headless Chromium driven over the W3C WebDriver protocol by
//! a small client written here (plain HTTP/JSON to `chromedriver`). Chromium and chromedriver
//! must be installed (`scripts/test` installs them); without them these tests fail.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use serde_json::{json, Value};
use support::*;

/// The key W3C WebDriver uses for an element reference.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// How long one WebDriver command may take (starting a browser is the slow one).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A `chromedriver` on a port the kernel picked, holding one headless Chromium session.
/// Dropping it ends the session (which closes the browser) and stops the driver.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

/// What a wait reads from the page.
enum Probe<'a> {
    /// The visible text of the first element matching a CSS selector.
    Text(&'a str),
    /// An attribute of the first element matching a CSS selector ("" when absent).
    Attribute(&'a str, &'a str),
}

impl Browser {
    /// Starts chromedriver with `--port=0` (it prints the port it got) and opens a session.
    async fn start() -> Browser {
        let mut driver = Command::new("chromedriver")
            .arg("--port=0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot start chromedriver ({e}): install chromium and chromium-driver (scripts/test does)")
            });
        let stdout = driver.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let said = Arc::new(Mutex::new(String::new()));
        let sink = said.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                // "ChromeDriver was started successfully on port 40223."
                if let Some(rest) = line.split("successfully on port ").nth(1) {
                    if let (Some(tx), Ok(port)) =
                        (tx.take(), rest.trim_end_matches('.').trim().parse::<u16>())
                    {
                        let _ = tx.send(port);
                    }
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let port = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(port) if port != 0 => port,
            _ => {
                let _ = driver.kill();
                let _ = driver.wait();
                panic!(
                    "chromedriver did not report its port:\n{}",
                    said.lock().unwrap()
                );
            }
        };
        let mut browser = Browser {
            driver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match browser.call(Method::GET, "/status", None).await {
                Ok(v) if v["ready"] == true => break,
                other => assert!(
                    Instant::now() < deadline,
                    "chromedriver is not ready: {other:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1100",
            ] },
        } } });
        let created = browser
            .call(Method::POST, "/session", Some(caps))
            .await
            .unwrap_or_else(|e| {
                panic!("cannot open a Chromium session (is chromium installed?): {e}")
            });
        browser.session = created["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// One WebDriver command; `Ok` holds the response's `value`, `Err` the protocol error.
    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{}", self.base, path))
            .header("content-type", "application/json; charset=utf-8")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let got = tokio::time::timeout(COMMAND_TIMEOUT, send(req))
            .await
            .map_err(|_| format!("{path}: no answer within {COMMAND_TIMEOUT:?}"))??;
        let v: Value = serde_json::from_slice(&got.body)
            .map_err(|e| format!("{path}: not JSON ({e}): {}", got.text()))?;
        if got.status != 200 {
            return Err(format!(
                "{path}: {} {}: {}",
                got.status, v["value"]["error"], v["value"]["message"]
            ));
        }
        Ok(v["value"].clone())
    }

    fn path(&self, rest: &str) -> String {
        format!("/session/{}{}", self.session, rest)
    }

    async fn goto(&self, url: &str) {
        self.call(
            Method::POST,
            &self.path("/url"),
            Some(json!({ "url": url })),
        )
        .await
        .unwrap();
    }

    /// The element reference of the first match of `css`.
    async fn find(&self, css: &str) -> Result<String, String> {
        let v = self
            .call(
                Method::POST,
                &self.path("/element"),
                Some(json!({ "using": "css selector", "value": css })),
            )
            .await?;
        v[ELEMENT]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{css}: no element reference in {v}"))
    }

    /// Reads a probe; errors (no such element yet, stale element) are reported, not fatal.
    async fn read(&self, probe: &Probe<'_>) -> Result<String, String> {
        let (css, what) = match probe {
            Probe::Text(css) => (css, "/text".to_owned()),
            Probe::Attribute(css, name) => (css, format!("/attribute/{name}")),
        };
        let el = self.find(css).await?;
        let v = self
            .call(
                Method::GET,
                &self.path(&format!("/element/{el}{what}")),
                None,
            )
            .await?;
        Ok(v.as_str().unwrap_or_default().to_owned())
    }

    /// Polls `probe` until `ok` holds for what it reads; on timeout saves a screenshot and
    /// fails with the last value seen. Returns that value.
    async fn wait(&self, probe: Probe<'_>, within: Duration, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let got = self.read(&probe).await;
            if let Ok(v) = &got {
                if ok(v) {
                    return v.clone();
                }
            }
            if Instant::now() > deadline {
                let shot = artifact("dashboard-failure.png");
                self.screenshot(&shot).await;
                let (css, what) = match probe {
                    Probe::Text(css) => (css, "text".to_owned()),
                    Probe::Attribute(css, name) => (css, format!("attribute {name}")),
                };
                panic!(
                    "{css} {what}: still {got:?} after {within:?}; screenshot {}",
                    shot.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for an element's text to be exactly `expected`.
    async fn wait_text(&self, css: &str, expected: &str, within: Duration) {
        self.wait(Probe::Text(css), within, |t| t.trim() == expected)
            .await;
    }

    /// Clicks the element matching `css`, waiting (bounded) for it to appear.
    async fn click(&self, css: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let clicked = match self.find(css).await {
                Ok(el) => self
                    .call(
                        Method::POST,
                        &self.path(&format!("/element/{el}/click")),
                        Some(json!({})),
                    )
                    .await
                    .map(|_| ()),
                Err(e) => Err(e),
            };
            match clicked {
                Ok(()) => return,
                Err(e) => assert!(Instant::now() < deadline, "cannot click {css}: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Saves a PNG screenshot of the page.
    async fn screenshot(&self, to: &std::path::Path) {
        let v = self
            .call(Method::GET, &self.path("/screenshot"), None)
            .await
            .unwrap();
        let png = base64_decode(v.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::write(to, png).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session closes Chromium; the driver is killed after. Drop cannot await,
        // so the DELETE runs on a runtime of its own.
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(async {
                    let req = Request::delete(url).body(Full::new(Bytes::new())).unwrap();
                    let _ = tokio::time::timeout(Duration::from_secs(10), send(req)).await;
                });
            })
            .join();
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// A path under `target/` for files CI keeps (screenshots).
fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target")
        .join(name)
}

/// Standard base64 (RFC 4648) to bytes; WebDriver screenshots come this way.
fn base64_decode(s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => continue,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// Background traffic: one GET (as JSON), whatever comes of it.
async fn poke(url: &str) {
    let req = Request::get(url)
        .header("accept", "application/json")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), send(req)).await;
}

use support::demo::DemoProcess as Demo;

/// The demo's story on the page: both shards up, India taken down with the fault button and
/// shown DOWN while Global stays UP, then brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_fault_buttons_take_a_shard_down_and_back_on_the_dashboard() {
    let demo = Demo::start();
    let admin = demo.base("/admin");
    let feed = demo.base("/feed");
    let browser = Browser::start().await;
    // Some traffic, so that the tiles and tables show rates and latencies.
    let traffic = tokio::spawn(async move {
        loop {
            for user in ["alice", "priya"] {
                poke(&format!("{feed}/feed/{user}")).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    browser.goto(&format!("{admin}/")).await;
    let within = Duration::from_secs(30);
    browser.wait_text("#shard-india .state", "UP", within).await;
    browser
        .wait_text("#shard-global .state", "UP", within)
        .await;

    browser.click("#fault-india-down").await;
    // The button shows the current mode once the demo has taken it.
    browser
        .wait(
            Probe::Attribute("#fault-india-down", "class"),
            within,
            |c| c.split_whitespace().any(|c| c == "on"),
        )
        .await;
    browser
        .wait_text("#shard-india .state", "DOWN", within)
        .await;
    let global = browser.read(&Probe::Text("#shard-global .state")).await;
    assert_eq!(
        global.as_deref(),
        Ok("UP"),
        "India's fault must not touch Global"
    );
    // Indian keys may only go to India: the page says they are refused meanwhile.
    browser
        .wait(Probe::Text(".alert"), within, |t| {
            t.contains("IN keys are refused")
        })
        .await;
    let faults = get(&format!("{admin}/demo/faults")).await.json();
    assert_eq!(faults["targets"]["india"], "down", "{faults}");

    browser.click("#fault-india-ok").await;
    browser.wait_text("#shard-india .state", "UP", within).await;
    traffic.abort();
    browser.screenshot(&artifact("dashboard.png")).await;
}

/// A shard upstream whose health (and every answer) can be switched off.
async fn switchable_shard(name: &'static str, up: Arc<AtomicBool>) -> Upstream {
    Upstream::start(move |_req| {
        let up = up.load(Ordering::SeqCst);
        async move {
            if up {
                text(200, name)
            } else {
                text(503, "switched off")
            }
        }
    })
    .await
}

/// Without the demo: tiles follow health checks, rates and recent requests appear, the
/// residency story is told when a region's only shard is down, and the connection indicator
/// turns red when attache stops answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_follows_shard_health_traffic_and_the_connection() {
    let india_up = Arc::new(AtomicBool::new(true));
    let india = switchable_shard("india", india_up.clone()).await;
    let global = switchable_shard("global", Arc::new(AtomicBool::new(true))).await;
    let check = "health_check: { path: /health, interval: 100ms, timeout: 500ms, healthy_threshold: 1, unhealthy_threshold: 1 }";
    let mut at = Attache::start(&format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: app
    address: "127.0.0.1:0"
    routes:
      - {{ name: images, match: {{ path: {{ template: "/images/{{user}}/{{rest*}}" }} }}, shard_set: images }}
clusters:
  india: {{ endpoints: ["{}"], {check} }}
  global: {{ endpoints: ["{}"], {check} }}
directories:
  regions: {{ table: {{ priya: IN, bob: GB }} }}
shard_sets:
  images:
    key: {{ capture: user }}
    directory: regions
    shards: {{ india: {{ cluster: india, region: IN }}, global: {{ cluster: global }} }}
    residency: {{ IN: [india], "*": [global] }}
"#,
        india.addr, global.addr
    ));
    let browser = Browser::start().await;
    let (bob, priya) = (
        at.url("app", "/images/bob/1"),
        at.url("app", "/images/priya/1"),
    );
    let traffic = tokio::spawn(async move {
        loop {
            poke(&bob).await;
            poke(&priya).await;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    });
    browser.goto(&at.admin_url("/")).await;
    let within = Duration::from_secs(30);
    browser.wait_text("#shard-india .state", "UP", within).await;
    browser
        .wait_text("#shard-global .state", "UP", within)
        .await;
    browser
        .wait(Probe::Attribute("#conn", "class"), within, |c| c == "ok")
        .await;
    // Rates come from the difference of two polls; traffic is flowing, so they are positive.
    let rps = browser
        .wait(
            Probe::Text(r#"#shard-global [data-k="req/s"]"#),
            within,
            |t| t.parse::<f64>().is_ok_and(|r| r > 0.0),
        )
        .await;
    assert!(rps.parse::<f64>().unwrap() < 1000.0, "{rps} req/s");
    browser
        .wait(Probe::Text(r#"#shard-india [data-k="p50"]"#), within, |t| {
            t.ends_with("ms")
        })
        .await;
    browser
        .wait(Probe::Text("#recent"), within, |t| {
            t.contains("/images/priya/1") && t.contains("/images/bob/1")
        })
        .await;
    browser
        .wait(Probe::Text("#routes"), within, |t| t.contains("images"))
        .await;

    // India fails its health checks: its tile goes DOWN, Global's stays UP, Indian keys are
    // refused and the page says why.
    india_up.store(false, Ordering::SeqCst);
    browser
        .wait_text("#shard-india .state", "DOWN", within)
        .await;
    browser
        .wait(Probe::Attribute("#shard-india", "class"), within, |c| {
            c.contains("down")
        })
        .await;
    let global_state = browser.read(&Probe::Text("#shard-global .state")).await;
    assert_eq!(global_state.as_deref(), Ok("UP"));
    browser
        .wait(Probe::Text("#set-images .alert"), within, |t| {
            t.contains("IN keys are refused")
        })
        .await;
    browser
        .wait(Probe::Text("#recent"), within, |t| {
            t.contains("residency-unavailable")
        })
        .await;
    browser.screenshot(&artifact("dashboard-shards.png")).await;

    india_up.store(true, Ordering::SeqCst);
    browser.wait_text("#shard-india .state", "UP", within).await;

    // attache goes away: the indicator turns red.
    traffic.abort();
    at.child.kill().unwrap();
    at.child.wait().unwrap();
    browser
        .wait(Probe::Attribute("#conn", "class"), within, |c| c == "bad")
        .await;
}

#[test]
fn base64_decodes_what_webdriver_sends() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGVsbG8h"), b"hello!");
    assert_eq!(base64_decode("iVBORw0KGgo="), b"\x89PNG\r\n\x1a\n");
}
