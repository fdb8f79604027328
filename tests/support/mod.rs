//! Test support: scripted upstreams on real sockets, an attache process started from a config,
//! and a small HTTP client. Every address is 127.0.0.1 with a port the kernel picked.

#![allow(dead_code, clippy::unwrap_used)]

pub mod demo;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;
pub type HandlerFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>;
pub type Handler = Arc<dyn Fn(Request<Incoming>) -> HandlerFuture + Send + Sync>;

/// A body from bytes.
pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

/// A response with a status and a text body.
pub fn text(status: u16, body: &str) -> Response<Body> {
    let mut r = Response::new(full(body.to_owned()));
    *r.status_mut() = StatusCode::from_u16(status).unwrap();
    r
}

/// One request an upstream received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: http::HeaderMap,
}

/// A real HTTP server (HTTP/1.1 and h2c) on 127.0.0.1 with a scripted handler.
pub struct Upstream {
    pub addr: SocketAddr,
    pub requests: Arc<AtomicUsize>,
    pub connections: Arc<AtomicUsize>,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// An upstream that answers 200 with `body` only after `delay`: slow, or hung when the
    /// delay outlasts the test.
    pub async fn slow(delay: Duration, body: &'static str) -> Upstream {
        Upstream::start(move |_req| async move {
            tokio::time::sleep(delay).await;
            text(200, body)
        })
        .await
    }

    /// Starts an upstream whose handler is `f`.
    pub async fn start<F, Fut>(f: F) -> Upstream
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Response<Body>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(f(req)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (r, c, s) = (requests.clone(), connections.clone(), seen.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (handler, r, s) = (handler.clone(), r.clone(), s.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        r.fetch_add(1, Ordering::SeqCst);
                        s.lock().unwrap().push(Seen {
                            method: req.method().to_string(),
                            uri: req.uri().to_string(),
                            headers: req.headers().clone(),
                        });
                        let fut = handler(req);
                        async move { Ok::<_, std::convert::Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            requests,
            connections,
            seen,
            task,
        }
    }

    /// An upstream that answers every request with `body` and names itself in `x-upstream`.
    pub async fn named(name: &'static str) -> Upstream {
        Upstream::start(move |_req| async move {
            let mut r = text(200, name);
            r.headers_mut().insert("x-upstream", name.parse().unwrap());
            r
        })
        .await
    }

    pub fn hits(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Stops accepting; open connections end with the test runtime.
    pub fn stop(&self) {
        self.task.abort();
    }
}

/// An attache process started from a config (listener and admin ports may be 0).
pub struct Attache {
    pub child: Child,
    pub admin: SocketAddr,
    pub listeners: HashMap<String, SocketAddr>,
    pub dir: tempfile::TempDir,
    pub stderr: Arc<Mutex<String>>,
}

/// Path of the built binary.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_attache")
}

impl Attache {
    /// Writes `yaml` to a file and starts `attache run` on it; returns once it is ready.
    pub fn start(yaml: &str) -> Attache {
        Self::start_with(yaml, &[])
    }

    pub fn start_with(yaml: &str, extra: &[&str]) -> Attache {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("attache.yaml");
        std::fs::write(&path, yaml).unwrap();
        let log = dir.path().join("access.log");
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--access-log")
            .arg(&log)
            .args(extra)
            .env("ATTACHE_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let collected = Arc::new(Mutex::new(String::new()));
        let sink = collected.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("ready=") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(line[i + 6..].to_owned());
                    }
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let ready = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(r) => r,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "attache did not become ready:\n{}",
                    collected.lock().unwrap()
                );
            }
        };
        let v: serde_json::Value = serde_json::from_str(&ready).unwrap();
        let admin = v["admin"].as_str().unwrap().parse().unwrap();
        let listeners = v["listeners"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, a)| (k.clone(), a.as_str().unwrap().parse().unwrap()))
            .collect();
        Attache {
            child,
            admin,
            listeners,
            dir,
            stderr: collected,
        }
    }

    /// `http://ADDR{path}` for a listener.
    pub fn url(&self, listener: &str, path: &str) -> String {
        format!("http://{}{}", self.listeners[listener], path)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin, path)
    }

    pub fn config_path(&self) -> std::path::PathBuf {
        self.dir.path().join("attache.yaml")
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit (bounded) and returns its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The access log lines so far, waiting (bounded) until at least `n` are there.
    pub fn access_log(&self, n: usize) -> Vec<serde_json::Value> {
        let path = self.dir.path().join("access.log");
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let lines: Vec<serde_json::Value> = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            if lines.len() >= n || Instant::now() > deadline {
                return lines;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Attache {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A response read whole.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Sends one request on a fresh HTTP/1.1 connection.
pub async fn send(req: Request<Full<Bytes>>) -> Result<Got, String> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let (parts, body) = resp.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("{e:?}"))?
        .to_bytes();
    Ok(Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    })
}

/// GET a URL.
pub async fn get(url: &str) -> Got {
    send(Request::get(url).body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

/// GET with headers.
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Got {
    let mut req = Request::get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap()
}

/// The content-length of a raw HTTP/1.1 head, if it has one.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().unwrap())
    })
}

/// GETs `url` on a fresh connection and expects the response to be cut short: either its
/// head (already on its way) and a body that fails, or, when the failure lands before the
/// head was flushed, the connection closed before any response. Panics on a whole response.
pub async fn get_cut_short(url: &str) {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
        .await;
    if let Ok(resp) = resp {
        assert_eq!(resp.status(), 200, "the head was already sent");
        assert!(
            resp.into_body().collect().await.is_err(),
            "the client sees the body cut short"
        );
    }
}

/// Polls `f` until it returns true or `within` passes; returns whether it did.
pub async fn eventually<F, Fut>(within: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A 127.0.0.1 port that refuses connections: bound but never listening, and held for as
/// long as the returned socket lives, so no other test can take the port meanwhile.
pub fn refusing_port() -> (socket2::Socket, SocketAddr) {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = s.local_addr().unwrap().as_socket().unwrap();
    (s, addr)
}
