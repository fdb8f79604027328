//! attache's own HTTP/1.1 upstream codec against an upstream that writes its answers byte by
//! byte as scripted: every body framing, informational heads, HEAD, HTTP/1.0, broken heads,
//! and which answers let the connection be pooled.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What the scripted upstream saw: connections accepted, and each request (head and body).
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    requests: Mutex<Vec<(String, Vec<u8>)>>,
}

fn big() -> Vec<u8> {
    (0..1024 * 1024).map(|i| (i % 251) as u8).collect()
}

/// The upstream's answer to a path, and whether it closes the connection after it.
fn answer(path: &str) -> (Vec<u8>, bool) {
    let s = |t: &str| t.as_bytes().to_vec();
    match path {
        "/big" => {
            let mut r = s("HTTP/1.1 200 OK\r\ncontent-length: 1048576\r\n\r\n");
            r.extend_from_slice(&big());
            (r, false)
        }
        "/chunked-trailers" => (
            s("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nwire\r\n1;x=y\r\n!\r\n0\r\ngrpc-status: 0\r\n\r\n"),
            false,
        ),
        "/until-close" => (s("HTTP/1.1 200 OK\r\n\r\nto the end"), true),
        "/informational" => (
            s("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </s.css>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\nx-final: yes\r\n\r\nfinal"),
            false,
        ),
        "/head" => (s("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n"), false),
        "/hop" => (
            s("HTTP/1.1 200 OK\r\nServer: scripted\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Case: Kept As Sent\r\nContent-Length: 2\r\nDate: Fri, 27 Nov 2026 16:00:00 GMT\r\n\r\nok"),
            false,
        ),
        "/hop-listed" => (
            s("HTTP/1.1 200 OK\r\nConnection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Other: 2\r\nContent-Length: 2\r\n\r\nok"),
            false,
        ),
        "/http10" => (s("HTTP/1.0 200 OK\r\ncontent-length: 3\r\n\r\nold"), true),
        "/bad-length" => (s("HTTP/1.1 200 OK\r\ncontent-length: ten\r\n\r\n"), true),
        "/garbage" => (s("SSH-2.0-OpenSSH_9.2\r\n\r\n"), true),
        "/short" => (s("HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"), true),
        _ => (s("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"), false),
    }
}

/// An upstream that reads requests (head, then a content-length body) and writes scripted
/// answers, keeping the connection open unless the answer says to close.
async fn scripted_upstream() -> (std::net::SocketAddr, Arc<Seen>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let shared = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            shared.connections.fetch_add(1, Ordering::SeqCst);
            let seen = shared.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break end + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len = content_length(&head).unwrap_or(0);
                    while buf.len() < end + len {
                        let mut chunk = [0u8; 4096];
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = buf[end..end + len].to_vec();
                    buf.drain(..end + len);
                    let path = head.split(' ').nth(1).unwrap_or("/").to_owned();
                    seen.requests.lock().unwrap().push((head, body));
                    if path.ends_with("/hang") {
                        // No answer: wait for the proxy to give up and close.
                        while !matches!(s.read(&mut [0u8; 64]).await, Ok(0) | Err(_)) {}
                        return;
                    }
                    let (reply, close) = answer(&path);
                    if s.write_all(&reply).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// One cluster with the default retry policy: small request bodies are buffered for a replay,
/// so every request here goes through attache's own codec (streamed bodies go through hyper).
fn config(addr: std::net::SocketAddr) -> String {
    format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ {{ cluster: a, timeout: 5s }} ]\nclusters:\n  a: {{ endpoints: [\"{addr}\"] }}\n"
    )
}

async fn request(at: &Attache, method: &str, path: &str, body: &'static [u8]) -> Got {
    send(
        Request::builder()
            .method(method)
            .uri(at.url("main", path))
            .body(Full::new(Bytes::from_static(body)))
            .unwrap(),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_body_framing_arrives_whole_and_keep_alive_answers_are_pooled() {
    let (addr, seen) = scripted_upstream().await;
    let at = Attache::start(&config(addr));

    // Keep-alive answers, one after another: one upstream connection per worker at most.
    let got = request(&at, "GET", "/big", b"").await;
    assert_eq!(got.status, 200);
    assert_eq!(
        Sha256::digest(&got.body)[..],
        Sha256::digest(big())[..],
        "1 MiB content-length body"
    );
    let got = request(&at, "GET", "/chunked-trailers", b"").await;
    assert_eq!((got.status, got.text()), (200, "wire!".to_owned()));
    let got = request(&at, "GET", "/informational", b"").await;
    assert_eq!((got.status, got.text()), (200, "final".to_owned()));
    assert_eq!(
        got.header("x-final"),
        Some("yes"),
        "the final head, not a 1xx"
    );
    let got = request(&at, "HEAD", "/head", b"").await;
    assert_eq!((got.status, got.text()), (200, String::new()));
    assert_eq!(got.header("content-length"), Some("10"));
    let got = request(&at, "POST", "/post", b"twelve bytes").await;
    assert_eq!((got.status, got.text()), (200, "ok".to_owned()));
    let got = request(&at, "POST", "/empty-post", b"").await;
    assert_eq!((got.status, got.text()), (200, "ok".to_owned()));
    let kept_alive = seen.connections.load(Ordering::SeqCst);
    assert!(
        kept_alive <= 2,
        "{kept_alive} connections for keep-alive answers"
    );
    {
        let requests = seen.requests.lock().unwrap();
        let (head, body) = &requests[4];
        assert!(head.starts_with("POST /post HTTP/1.1\r\n"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("content-length: 12\r\n"),
            "{head}"
        );
        assert_eq!(body, b"twelve bytes");
        let (head, _) = &requests[5];
        assert!(
            head.to_ascii_lowercase().contains("content-length: 0\r\n"),
            "{head}"
        );
    }

    // A body that ends when the connection does, and an HTTP/1.0 answer: both close it, and
    // the next request finds a fresh connection without noticing (how many depends on which
    // worker each request lands on: one per worker at most, plus the two closed).
    let got = request(&at, "GET", "/until-close", b"").await;
    assert_eq!((got.status, got.text()), (200, "to the end".to_owned()));
    let got = request(&at, "GET", "/http10", b"").await;
    assert_eq!((got.status, got.text()), (200, "old".to_owned()));
    for _ in 0..4 {
        let got = request(&at, "GET", "/", b"").await;
        assert_eq!((got.status, got.text()), (200, "ok".to_owned()));
    }
    let now = seen.connections.load(Ordering::SeqCst);
    assert!(
        now > kept_alive && now <= kept_alive + 4,
        "{kept_alive} then {now} connections: closing answers are not pooled, others are"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_answers_get_502_with_their_reason() {
    let (addr, _) = scripted_upstream().await;
    let at = Attache::start(&config(addr));
    for path in ["/bad-length", "/garbage"] {
        let got = request(&at, "GET", path, b"").await;
        assert_eq!(got.status, 502, "{path}");
        assert_eq!(
            got.header("x-attache-reason"),
            Some("upstream-protocol-error"),
            "{path}"
        );
    }
    // A body shorter than its content-length: the head went out, the body is cut short.
    get_cut_short(&at.url("main", "/short")).await;
    // Each worker writes its own lines: find the request's line rather than count on order.
    let log = at.access_log(3);
    let short = log.iter().find(|l| l["path"] == "/short").unwrap();
    assert_eq!(short["reason"], "upstream-reset-mid-body");
}

/// The head and body of one answer on a plain connection, as bytes.
async fn exchange(at: &Attache, path: &str) -> (String, String) {
    let mut s = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    read_response(&mut s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_headers_go_through_as_sent_without_hop_by_hop_ones() {
    let (addr, _seen) = scripted_upstream().await;
    let at = Attache::start(&config(addr));
    for _ in 0..2 {
        // attache's own HTTP/1.1 server writes the upstream's lines through (names keep
        // their case), without connection, keep-alive, or a second length or date.
        let (head, body) = exchange(&at, "/hop").await;
        assert_eq!(body, "ok");
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("\r\nServer: scripted\r\n"), "{head}");
        assert!(head.contains("\r\nX-Case: Kept As Sent\r\n"), "{head}");
        let lower = head.to_ascii_lowercase();
        assert!(
            !lower.contains("keep-alive") && !lower.contains("connection"),
            "{head}"
        );
        assert_eq!(lower.matches("content-length").count(), 1, "{head}");
        assert_eq!(lower.matches("\r\ndate: ").count(), 1, "{head}");
        assert!(
            head.contains("Date: Fri, 27 Nov 2026 16:00:00 GMT"),
            "{head}"
        );

        // A header named by `connection` is removed.
        let (head, _) = exchange(&at, "/hop-listed").await;
        let lower = head.to_ascii_lowercase();
        assert!(!lower.contains("x-secret"), "{head}");
        assert!(lower.contains("x-other: 2"), "{head}");
    }
    // h2c (hyper's server) gets the same headers from a header map.
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let resp = client
        .request(
            Request::get(at.url("main", "/hop"))
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.headers()["x-case"], "Kept As Sent");
    assert_eq!(resp.headers()["server"], "scripted");
    assert!(resp.headers().get("keep-alive").is_none());
}

/// Reads one response with a content-length body from a kept-alive client connection.
async fn read_response(s: &mut tokio::net::TcpStream) -> (String, String) {
    let mut buf = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8(buf[..end + 4].to_vec()).unwrap();
            let len = content_length(&head).unwrap();
            if buf.len() >= end + 4 + len {
                let body = String::from_utf8(buf[end + 4..end + 4 + len].to_vec()).unwrap();
                assert_eq!(buf.len(), end + 4 + len, "nothing after the response");
                return (head, body);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_times_out_at_each_requests_own_deadline() {
    // One client connection (one worker, one upstream connection in its pool). A pooled
    // connection keeps its timer from request to request: a later deadline moves it forward,
    // an earlier one re-registers it. Either way a hung try ends at its own route's timeout.
    let (addr, seen) = scripted_upstream().await;
    let at = Attache::start(&format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes:\n      - {{ match: {{ path: {{ prefix: /short }} }}, cluster: a, timeout: 300ms }}\n      - {{ match: {{ path: {{ prefix: /long }} }}, cluster: a, timeout: 1500ms }}\n      - {{ cluster: a, timeout: 800ms }}\nclusters:\n  a: {{ endpoints: [\"{addr}\"], retry: {{ attempts: 1 }} }}\n"
    ));
    let mut s = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    let mut ask = async |path: &str| {
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let t = std::time::Instant::now();
        let (head, body) = read_response(&mut s).await;
        (head, body, t.elapsed())
    };
    // Earlier than the registered deadline: 1.5 s set by the first request, 300 ms asked.
    let (head, body, _) = ask("/long/fast").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, "ok");
    let (head, _, took) = ask("/short/hang").await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(head.contains("x-attache-reason: timeout"), "{head}");
    assert!(took >= std::time::Duration::from_millis(250), "{took:?}");
    assert!(took < std::time::Duration::from_millis(1200), "{took:?}");
    // Later than the registered deadline: 300 ms set, then 800 ms asked. The try must not
    // end at the old 300 ms, nor run past its own.
    let (head, _, _) = ask("/short/fast").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (head, _, took) = ask("/mid/hang").await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(took >= std::time::Duration::from_millis(750), "{took:?}");
    assert!(took < std::time::Duration::from_millis(2000), "{took:?}");
    // After a long idle-free run of requests on one connection the timer still works, and
    // each timed-out try closed its upstream connection (no answer can be trusted on it).
    for _ in 0..20 {
        let (head, _, _) = ask("/long/fast").await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    }
    let (head, _, took) = ask("/short/hang").await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    assert!(took < std::time::Duration::from_millis(1200), "{took:?}");
    assert_eq!(seen.connections.load(Ordering::SeqCst), 3);
}
