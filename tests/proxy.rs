//! The core proxy against real sockets: HTTP/1.1, h2c, gRPC framing with trailers, WebSocket,
//! TCP, large bodies, routing, balancing, health checks, upstream failures, limits, drain.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioExecutor;
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn one_cluster(upstream: &Upstream, extra_cluster: &str) -> String {
    format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: main
    address: "127.0.0.1:0"
    routes:
      - cluster: backend
clusters:
  backend:
    endpoints: ["{}"]
{extra_cluster}
"#,
        upstream.addr
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_keep_alive_reuses_connections_both_sides() {
    let up = Upstream::named("a").await;
    let at = Attache::start(&one_cluster(&up, ""));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build_http::<Full<Bytes>>();
    for _ in 0..20 {
        let resp = client
            .request(
                Request::get(at.url("main", "/x"))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "a");
    }
    assert_eq!(up.hits(), 20);
    // Sequential requests from one client connection reuse one upstream connection per worker.
    assert!(
        up.connections.load(Ordering::SeqCst) <= 2,
        "{}",
        up.connections.load(Ordering::SeqCst)
    );
}

/// Reads a request head from a raw upstream socket; `None` when the peer closes first.
async fn read_head(s: &mut tokio::net::TcpStream) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    Some(got)
}

/// Reads one HTTP/1.1 response with a content-length body from a raw socket; `buf` carries
/// bytes read past it. Returns the status line and the body.
async fn read_response(s: &mut tokio::net::TcpStream, buf: &mut Vec<u8>) -> (String, String) {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len = content_length(&head).unwrap();
            while buf.len() < end + 4 + len {
                let mut chunk = [0u8; 4096];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "connection closed mid-body");
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).to_string();
            buf.drain(..end + 4 + len);
            return (head.lines().next().unwrap().to_owned(), body);
        }
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The `parked_connections` gauge of listener "main".
async fn parked(at: &Attache) -> u64 {
    let metrics = get(&at.admin_url("/metrics")).await.text();
    metrics
        .lines()
        .find(|l| l.starts_with("attache_parked_connections{") && l.contains("listener=\"main\""))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_http1_connections_park_and_resume_on_the_same_socket() {
    let up = Upstream::named("a").await;
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    header_read_timeout: 2s\n    park_idle_above: 0\n    routes: [ {{ cluster: a }} ]\nclusters:\n  a: {{ endpoints: [\"{}\"] }}\n",
        up.addr
    );
    let at = Attache::start(&yaml);
    let mut s = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    let mut buf = Vec::new();
    s.write_all(b"GET /1 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "a");
    // Idle after its response: the connection parks (hyper's state is released).
    assert!(eventually(Duration::from_secs(5), || async { parked(&at).await == 1 }).await);

    // A head arriving in two pieces wakes it; the new hyper connection waits for the rest.
    s.write_all(b"GET /2 HTTP/1.1\r\nho").await.unwrap();
    s.flush().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || async { parked(&at).await == 0 }).await);
    s.write_all(b"st: a\r\n\r\n").await.unwrap();
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "a"));

    // Two pipelined requests in one write: both answered, in order.
    s.write_all(b"GET /3 HTTP/1.1\r\nhost: a\r\n\r\nGET /4 HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "a");
    assert_eq!(read_response(&mut s, &mut buf).await.1, "a");

    // A whole request followed by part of the next: whether the connection parks in between
    // (keeping the partial head) or not, the rest completes the second request.
    s.write_all(b"GET /5 HTTP/1.1\r\nhost: a\r\n\r\nGET /6 HTTP/1.1\r\nhos")
        .await
        .unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "a");
    s.write_all(b"t: a\r\n\r\n").await.unwrap();
    assert_eq!(read_response(&mut s, &mut buf).await.1, "a");
    assert_eq!(up.hits(), 6);
    let paths: Vec<String> = up
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.uri.clone())
        .collect();
    assert_eq!(paths, ["/1", "/2", "/3", "/4", "/5", "/6"]);

    // A parked connection that stays silent is closed after the idle limit (header_read_timeout).
    assert!(eventually(Duration::from_secs(5), || async { parked(&at).await == 1 }).await);
    let t = Instant::now();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    assert!(eventually(Duration::from_secs(5), || async { parked(&at).await == 0 }).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_empty_upstream_responses_keep_their_pooled_connection() {
    // Chunked bodies (no content-length), empty 204s and HEAD answers all end their message
    // cleanly, so the upstream connection goes back to the pool after each.
    let up = Upstream::start(|req| async move {
        if req.uri().path() == "/empty" {
            return text(204, "");
        }
        let frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> =
            ["ab", "cd", "ef"]
                .into_iter()
                .map(|c| Ok(Frame::data(Bytes::from(c))))
                .collect();
        http::Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
            frames,
        ))))
    })
    .await;
    let at = Attache::start(&one_cluster(&up, ""));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1)
        .build_http::<Full<Bytes>>();
    for i in 0..30 {
        let (method, path) = match i % 3 {
            0 => ("GET", "/chunked"),
            1 => ("GET", "/empty"),
            _ => ("HEAD", "/chunked"),
        };
        let resp = client
            .request(
                Request::builder()
                    .method(method)
                    .uri(at.url("main", path))
                    .body(Full::new(Bytes::new()))
                    .unwrap(),
            )
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        match i % 3 {
            0 => assert_eq!((status, &body[..]), (200, &b"abcdef"[..])),
            1 => assert_eq!((status, &body[..]), (204, &b""[..])),
            _ => assert_eq!((status, &body[..]), (200, &b""[..])),
        }
    }
    assert_eq!(up.hits(), 30);
    assert!(
        up.connections.load(Ordering::SeqCst) <= 2,
        "{} upstream connections for 30 sequential requests",
        up.connections.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_closed_while_pooled_are_replaced_unseen() {
    // An upstream that answers one request per connection as keep-alive, then closes it: every
    // pooled connection is dead by the time it is reused.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                    .await;
                // Closing at once: whether attache sees the close before its next request or
                // only when sending it, the client must not notice.
            });
        }
    });
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ {{ cluster: a }} ]\nclusters:\n  a: {{ endpoints: [\"{addr}\"], retry: {{ attempts: 1 }} }}\n"
    );
    let at = Attache::start(&yaml);
    for i in 0..10 {
        let got = get(&at.url("main", &format!("/{i}"))).await;
        assert_eq!(
            (got.status, got.text()),
            (200, "ok".to_owned()),
            "request {i}"
        );
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_upstream_connections_close_after_idle_timeout_without_traffic() {
    // An upstream that answers one request as keep-alive, then waits for attache to close.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let closed = Arc::new(AtomicBool::new(false));
    let flag = closed.clone();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        read_head(&mut s).await.unwrap();
        let mut buf = [0u8; 64];
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await
            .unwrap();
        // Anything but end-of-file (a second request, say) fails the test below.
        if let Ok(0) = s.read(&mut buf).await {
            flag.store(true, Ordering::SeqCst);
        }
    });
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ {{ cluster: a }} ]\nclusters:\n  a: {{ endpoints: [\"{addr}\"], idle_timeout: 300ms }}\n"
    );
    let at = Attache::start(&yaml);
    let got = get(&at.url("main", "/")).await;
    assert_eq!((got.status, got.text()), (200, "ok".to_owned()));
    // No more requests: the pooled connection is closed by attache's sweep all the same.
    assert!(
        eventually(Duration::from_secs(5), || async {
            closed.load(Ordering::SeqCst)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_on_the_same_port() {
    let up = Upstream::named("a").await;
    let at = Attache::start(&one_cluster(&up, ""));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    let mut handles = Vec::new();
    for i in 0..10 {
        let client = client.clone();
        let url = at.url("main", &format!("/h2/{i}"));
        handles.push(tokio::spawn(async move {
            let resp = client
                .request(Request::get(url).body(Full::new(Bytes::new())).unwrap())
                .await
                .unwrap();
            assert_eq!(resp.version(), http::Version::HTTP_2);
            assert_eq!(resp.status(), 200);
            resp.into_body().collect().await.unwrap().to_bytes()
        }));
    }
    for h in handles {
        assert_eq!(h.await.unwrap(), "a");
    }
    let seen = up.seen.lock().unwrap();
    // The upstream (an HTTP/1.1 cluster) got a Host header made from :authority.
    assert!(seen.iter().all(|s| s.headers.get("host").is_some()));
}

/// gRPC's wire format: a 5-byte prefix (compressed flag, big-endian length) per message.
fn grpc_frame(msg: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(0);
    b.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    b.extend_from_slice(msg);
    Bytes::from(b)
}

/// A gRPC service over h2 (unary when `count` is 1, server streaming otherwise): answers
/// `count` messages then the `grpc-status` trailer.
async fn grpc_upstream() -> Upstream {
    Upstream::start(|req| async move {
        assert_eq!(req.headers()["content-type"], "application/grpc");
        assert_eq!(
            req.headers().get("te").map(|v| v.to_str().unwrap()),
            Some("trailers")
        );
        let streaming = req.uri().path().ends_with("/Stream");
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let name = String::from_utf8_lossy(&body[5..]).into_owned();
        let count = if streaming { 3 } else { 1 };
        let mut frames: Vec<Result<Frame<Bytes>, Box<dyn std::error::Error + Send + Sync>>> = (0
            ..count)
            .map(|i| {
                Ok(Frame::data(grpc_frame(
                    format!("hello {name} #{i}").as_bytes(),
                )))
            })
            .collect();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        frames.push(Ok(Frame::trailers(trailers)));
        let body = StreamBody::new(futures_util::stream::iter(frames));
        let mut resp = http::Response::new(BodyExt::boxed(body));
        resp.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        resp
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_unary_and_server_streaming_keep_trailers() {
    let up = grpc_upstream().await;
    let at = Attache::start(&one_cluster(&up, "    protocol: http2"));
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<Full<Bytes>>();
    for (method, want) in [("Unary", 1usize), ("Stream", 3)] {
        let req = Request::post(at.url("main", &format!("/demo.Greeter/{method}")))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(grpc_frame(b"priya")))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected
            .trailers()
            .cloned()
            .expect("grpc trailers pass through");
        assert_eq!(trailers["grpc-status"], "0");
        let bytes = collected.to_bytes();
        let mut messages = Vec::new();
        let mut rest = &bytes[..];
        while rest.len() >= 5 {
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            messages.push(String::from_utf8_lossy(&rest[5..5 + len]).into_owned());
            rest = &rest[5 + len..];
        }
        assert_eq!(messages.len(), want, "{method}: {messages:?}");
        assert_eq!(messages[0], "hello priya #0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_tunnelled() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() {
                        ws.send(Message::text(format!("echo: {}", msg.to_text().unwrap())))
                            .await
                            .unwrap();
                    }
                }
            });
        }
    });
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes:\n      - cluster: ws\nclusters:\n  ws:\n    endpoints: [\"{addr}\"]\n"
    );
    let at = Attache::start(&yaml);
    let stream = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    let url = format!("ws://{}/chat", at.listeners["main"]);
    let (mut ws, resp) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        ws.send(Message::text(format!("hi {i}"))).await.unwrap();
        let reply = ws.next().await.unwrap().unwrap();
        assert_eq!(reply.to_text().unwrap(), format!("echo: hi {i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_forwards_bytes() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: raw\n    address: \"127.0.0.1:0\"\n    protocol: tcp\n    cluster: echo\nclusters:\n  echo:\n    endpoints: [\"{addr}\"]\n"
    );
    let at = Attache::start(&yaml);
    let mut s = tokio::net::TcpStream::connect(at.listeners["raw"])
        .await
        .unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut back = Vec::new();
    let read = r.read_to_end(&mut back);
    let (_, n) = tokio::join!(write, read);
    n.unwrap();
    assert_eq!(back, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mib_bodies_stream_both_ways_intact() {
    // The upstream hashes what it receives and answers with 1 MiB of its own.
    let up = Upstream::start(|req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let digest = hex(&Sha256::digest(&body));
        let reply: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(7) % 256) as u8)
            .collect();
        let mut r = http::Response::new(full(reply));
        r.headers_mut()
            .insert("x-request-sha256", digest.parse().unwrap());
        r
    })
    .await;
    let at = Attache::start(&one_cluster(&up, ""));
    let payload: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(13) % 256) as u8)
        .collect();
    let sent_digest = hex(&Sha256::digest(&payload));
    let got = send(
        Request::post(at.url("main", "/upload"))
            .body(Full::new(Bytes::from(payload)))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-request-sha256"), Some(sent_digest.as_str()));
    let want: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(7) % 256) as u8)
        .collect();
    assert_eq!(hex(&Sha256::digest(&got.body)), hex(&Sha256::digest(&want)));
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_pick_clusters_rewrite_and_set_headers() {
    let images = Upstream::named("images").await;
    let users = Upstream::named("users").await;
    let yaml = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: main
    address: "127.0.0.1:0"
    forwarded: {{ via: true }}
    routes:
      - name: users
        match: {{ path: {{ prefix: /api/users }}, methods: [GET] }}
        rewrite: {{ prefix: /v1/users }}
        request_headers: {{ add: {{ x-team: feed }}, remove: [x-secret] }}
        response_headers: {{ add: {{ x-served-by: attache }} }}
        cluster: users
      - name: images
        match: {{ path: {{ template: "/images/{{user}}/{{rest*}}" }} }}
        cluster: images
clusters:
  images: {{ endpoints: ["{}"] }}
  users: {{ endpoints: ["{}"] }}
"#,
        images.addr, users.addr
    );
    let at = Attache::start(&yaml);
    let got = get_with(
        &at.url("main", "/api/users/priya?x=1"),
        &[("x-secret", "s"), ("connection", "x-hop"), ("x-hop", "1")],
    )
    .await;
    assert_eq!(got.text(), "users");
    assert_eq!(got.header("x-served-by"), Some("attache"));
    let seen = users.seen.lock().unwrap().last().cloned().unwrap();
    assert_eq!(seen.uri, "/v1/users/priya?x=1");
    assert_eq!(seen.headers["x-team"], "feed");
    assert!(seen.headers.get("x-secret").is_none());
    assert!(
        seen.headers.get("x-hop").is_none(),
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["via"], "1.1 attache");

    assert_eq!(
        get(&at.url("main", "/images/priya/a.png")).await.text(),
        "images"
    );
    let miss = get(&at.url("main", "/nothing")).await;
    assert_eq!(miss.status, 404);
    assert_eq!(miss.header("x-attache-reason"), Some("no-route"));
    assert_eq!(miss.json()["error"], "no-route");
    // POST does not match the GET-only users route.
    let post = send(
        Request::post(at.url("main", "/api/users/x"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(post.status, 404);

    let log = at.access_log(4);
    assert!(log.iter().any(|l| l["route"] == "users"
        && l["cluster"] == "users"
        && l["status"] == 200
        && l["path"] == "/api/users/priya"));
    assert!(log
        .iter()
        .any(|l| l["status"] == 404 && l["reason"] == "no-route"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balancing_spreads_and_consistent_hash_sticks() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let c = Upstream::named("c").await;
    let yaml = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: main
    address: "127.0.0.1:0"
    routes:
      - name: rr
        match: {{ path: {{ prefix: /rr }} }}
        cluster: rr
      - name: lr
        match: {{ path: {{ prefix: /lr }} }}
        cluster: lr
      - name: hash
        match: {{ path: {{ template: "/u/{{user}}" }} }}
        cluster: hash
clusters:
  rr: {{ endpoints: ["{a}", "{b}", "{c}"], balance: round_robin }}
  lr: {{ endpoints: ["{a}", "{b}", "{c}"] }}
  hash: {{ endpoints: ["{a}", "{b}", "{c}"], balance: consistent_hash, hash_on: {{ capture: user }} }}
"#,
        a = a.addr,
        b = b.addr,
        c = c.addr
    );
    let at = Attache::start(&yaml);
    let mut counts = std::collections::HashMap::new();
    for _ in 0..30 {
        *counts
            .entry(get(&at.url("main", "/rr")).await.text())
            .or_insert(0) += 1;
    }
    // Round robin per worker: every endpoint gets a fair share.
    for name in ["a", "b", "c"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((6..=14).contains(&n), "{counts:?}");
    }
    let mut lr = std::collections::HashSet::new();
    for _ in 0..60 {
        lr.insert(get(&at.url("main", "/lr")).await.text());
    }
    assert_eq!(lr.len(), 3, "least request reaches every endpoint: {lr:?}");
    for user in ["priya", "arjun", "alice", "bob"] {
        let first = get(&at.url("main", &format!("/u/{user}"))).await.text();
        for _ in 0..5 {
            assert_eq!(
                get(&at.url("main", &format!("/u/{user}"))).await.text(),
                first
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_eject_and_return_endpoints() {
    let sick = Arc::new(AtomicBool::new(false));
    let flag = sick.clone();
    let a = Upstream::start(move |req| {
        let sick = flag.load(Ordering::SeqCst);
        async move {
            if req.uri().path() == "/healthz" && sick {
                text(503, "sick")
            } else {
                text(200, "a")
            }
        }
    })
    .await;
    let b = Upstream::named("b").await;
    let yaml = format!(
        r#"
admin: {{ address: "127.0.0.1:0" }}
listeners:
  - name: main
    address: "127.0.0.1:0"
    routes: [ {{ cluster: pair }} ]
clusters:
  pair:
    endpoints: ["{}", "{}"]
    health_check: {{ path: /healthz, interval: 50ms, timeout: 200ms, healthy_threshold: 2, unhealthy_threshold: 2 }}
"#,
        a.addr, b.addr
    );
    let at = Attache::start(&yaml);
    let healthy = |want: bool| {
        let url = at.admin_url("/clusters");
        let a_addr = a.addr.to_string();
        move || {
            let url = url.clone();
            let a_addr = a_addr.clone();
            async move {
                let v = get(&url).await.json();
                v["clusters"][0]["endpoints"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|e| e["address"] == a_addr.as_str() && e["healthy"] == want)
            }
        }
    };
    sick.store(true, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), healthy(false)).await,
        "a is ejected"
    );
    for _ in 0..20 {
        assert_eq!(get(&at.url("main", "/")).await.text(), "b");
    }
    sick.store(false, Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(5), healthy(true)).await,
        "a returns"
    );
    let mut seen_a = false;
    for _ in 0..40 {
        seen_a |= get(&at.url("main", "/")).await.text() == "a";
    }
    assert!(seen_a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_refused_gives_502_fast() {
    let (_hold, addr) = refusing_port();
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ {{ cluster: gone }} ]\nclusters:\n  gone: {{ endpoints: [\"{addr}\"] }}\n"
    );
    let at = Attache::start(&yaml);
    let t = Instant::now();
    let got = get(&at.url("main", "/")).await;
    assert_eq!(got.status, 502);
    assert_eq!(
        got.header("x-attache-reason"),
        Some("upstream-connect-failed")
    );
    assert_eq!(got.json()["error"], "upstream-connect-failed");
    assert!(t.elapsed() < Duration::from_secs(1));
}

/// A raw upstream that reads a request head then misbehaves.
async fn raw_upstream(behaviour: &'static str) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                if read_head(&mut s).await.is_none() {
                    return;
                }
                match behaviour {
                    "reset-before-head" => {
                        let sock = socket2::SockRef::from(&s);
                        let _ = sock.set_linger(Some(Duration::ZERO));
                        drop(s);
                    }
                    "reset-mid-body" => {
                        let _ = s
                            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\npartial")
                            .await;
                        let _ = s.flush().await;
                        let sock = socket2::SockRef::from(&s);
                        let _ = sock.set_linger(Some(Duration::ZERO));
                        drop(s);
                    }
                    "hang" => {
                        tokio::time::sleep(Duration::from_secs(60)).await;
                    }
                    _ => {}
                }
            });
        }
    });
    addr
}

fn raw_config(addr: std::net::SocketAddr, timeout: &str) -> String {
    format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ {{ cluster: bad, timeout: {timeout} }} ]\nclusters:\n  bad: {{ endpoints: [\"{addr}\"] }}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_and_hang_get_their_status_within_the_timeout() {
    let reset = raw_upstream("reset-before-head").await;
    let at = Attache::start(&raw_config(reset, "2s"));
    let got = get(&at.url("main", "/")).await;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("x-attache-reason"), Some("upstream-reset"));

    let hang = raw_upstream("hang").await;
    let at = Attache::start(&raw_config(hang, "300ms"));
    let t = Instant::now();
    let got = get(&at.url("main", "/")).await;
    let took = t.elapsed();
    assert_eq!(got.status, 504);
    assert_eq!(got.header("x-attache-reason"), Some("timeout"));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "{took:?}"
    );

    let mid = raw_upstream("reset-mid-body").await;
    let at = Attache::start(&raw_config(mid, "2s"));
    // The client never gets a complete response.
    get_cut_short(&at.url("main", "/")).await;
    let log = at.access_log(1);
    assert_eq!(log[0]["reason"], "upstream-reset-mid-body");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_headers_get_431_and_slow_clients_are_cut_off() {
    let up = Upstream::start(|req| async move {
        if req.uri().path() == "/slow" {
            // An upstream slower than the header timeout (simulated latency).
            tokio::time::sleep(Duration::from_millis(700)).await;
        }
        text(200, "a")
    })
    .await;
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    max_header_bytes: 8192\n    header_read_timeout: 300ms\n    routes: [ {{ cluster: a }} ]\nclusters:\n  a: {{ endpoints: [\"{}\"] }}\n",
        up.addr
    );
    let at = Attache::start(&yaml);
    let big = "x".repeat(16 * 1024);
    let mut s = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    s.write_all(format!("GET / HTTP/1.1\r\nhost: a\r\nx-big: {big}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply).await;
    assert!(reply.starts_with("HTTP/1.1 431"), "{reply}");

    // A client that sends half a head and stops is disconnected after the header timeout.
    let mut s = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n").await.unwrap();
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(up.hits(), 0);

    // A request slower than the header timeout is not cut (the timeout runs only while the
    // connection waits for a head), and the idle keep-alive connection after it closes once
    // the timeout has passed.
    let mut s = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let (status, body) = read_response(&mut s, &mut buf).await;
    assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "a"));
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap();
    let idle = t.elapsed();
    assert!(
        idle >= Duration::from_millis(250) && idle < Duration::from_secs(3),
        "{idle:?}"
    );
    assert!(rest.is_empty(), "{rest:?}");
    assert_eq!(up.hits(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_extra_connection() {
    let up = Upstream::named("a").await;
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nworkers: 1\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    max_connections: 2\n    routes: [ {{ cluster: a }} ]\nclusters:\n  a: {{ endpoints: [\"{}\"] }}\n",
        up.addr
    );
    let at = Attache::start(&yaml);
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(at.listeners["main"])
            .await
            .unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    let mut third = tokio::net::TcpStream::connect(at.listeners["main"])
        .await
        .unwrap();
    let _ = third.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let mut buf = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        n.is_err() || buf.is_empty(),
        "the third connection is closed unanswered"
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_refuses_new_ones() {
    let up = Upstream::slow(Duration::from_millis(700), "slow").await;
    let mut at = Attache::start(&one_cluster(&up, ""));
    let url = at.url("main", "/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    assert!(
        eventually(Duration::from_secs(5), || {
            let n = up.hits();
            async move { n == 1 }
        })
        .await
    );
    at.signal("TERM");
    let addr = at.listeners["main"];
    assert!(
        eventually(Duration::from_secs(5), || async move {
            tokio::net::TcpStream::connect(addr).await.is_err()
        })
        .await,
        "new connections are refused during the drain"
    );
    let got = in_flight.await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "slow");
    let code = tokio::task::spawn_blocking(move || at.wait_exit(Duration::from_secs(10)))
        .await
        .unwrap();
    assert_eq!(code, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_answer() {
    let up = Upstream::named("a").await;
    let at = Attache::start(&one_cluster(&up, ""));
    get(&at.url("main", "/x")).await;
    assert_eq!(get(&at.admin_url("/ready")).await.status, 200);
    assert_eq!(get(&at.admin_url("/live")).await.status, 200);
    let metrics = get(&at.admin_url("/metrics")).await.text();
    assert!(
        metrics.contains("attache_requests_total{listener=\"main\",route=\"route-0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("attache_upstream_responses_total{cluster=\"backend\",class=\"2xx\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("attache_active_connections"), "{metrics}");
    let config = get(&at.admin_url("/config")).await.json();
    assert_eq!(config["clusters"][0]["name"], "backend");
    assert_eq!(config["clusters"][0]["connect_timeout"], "1s");
    let clusters = get(&at.admin_url("/clusters")).await.json();
    assert_eq!(clusters["clusters"][0]["endpoints"][0]["requests"], 1);
    let page = get(&at.admin_url("/")).await;
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_a_good_config_and_keeps_the_old_on_a_bad_one() {
    let a = Upstream::named("a").await;
    let b = Upstream::named("b").await;
    let at = Attache::start(&one_cluster(&a, ""));
    assert_eq!(get(&at.url("main", "/")).await.text(), "a");
    // A bad file is refused; the running config stays.
    let good = std::fs::read_to_string(at.config_path()).unwrap();
    std::fs::write(
        at.config_path(),
        good.replace("cluster: backend", "cluster: nope"),
    )
    .unwrap();
    let r = send(
        Request::post(at.admin_url("/reload"))
            .body(Full::new(Bytes::new()))
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.text().contains("unknown cluster `nope`"), "{}", r.text());
    assert_eq!(get(&at.url("main", "/")).await.text(), "a");
    // A good one is taken on SIGHUP.
    std::fs::write(
        at.config_path(),
        good.replace(&a.addr.to_string(), &b.addr.to_string()),
    )
    .unwrap();
    at.signal("HUP");
    let url = at.url("main", "/");
    assert!(
        eventually(Duration::from_secs(5), || {
            let url = url.clone();
            async move { get(&url).await.text() == "b" }
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_endpoints_are_resolved() {
    let up = Upstream::named("by-name").await;
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ {{ cluster: named }} ]\nclusters:\n  named: {{ endpoints: [\"localhost:{}\"], dns_refresh: 100ms }}\n",
        up.addr.port()
    );
    let at = Attache::start(&yaml);
    let clusters = get(&at.admin_url("/clusters")).await.json();
    let addrs: Vec<String> = clusters["clusters"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        addrs.contains(&up.addr.to_string()),
        "localhost resolved to {addrs:?}"
    );
    // If localhost also names ::1 (where nothing listens), the connect-failure retry moves on.
    for _ in 0..5 {
        assert_eq!(get(&at.url("main", "/")).await.text(), "by-name");
    }
}
