//! attache's own HTTP/1.1 server side, driven by raw clients on real sockets: requests it
//! serves itself and requests it leaves to hyper taking turns on one connection (pipelined
//! too), response framing (HEAD, unknown lengths, `connection: close`), a client that hangs
//! up cancelling its request upstream, and a small body that stalls being cut off.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn config(upstream: std::net::SocketAddr, timeout: &str) -> String {
    format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ {{ cluster: a, timeout: {timeout} }} ]\nclusters:\n  a: {{ endpoints: [\"{upstream}\"] }}\n"
    )
}

/// One response read off a raw connection: its head, and its body unframed.
struct Answer {
    head: String,
    body: Vec<u8>,
}

impl Answer {
    fn status(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A raw HTTP/1.1 client connection that reads responses by their framing.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn connect(at: &Attache) -> Client {
        Client {
            s: TcpStream::connect(at.listeners["main"]).await.unwrap(),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, raw: &str) {
        self.s.write_all(raw.as_bytes()).await.unwrap();
    }

    async fn fill(&mut self, want: usize) {
        while self.buf.len() < want {
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .expect("no answer within 10 s")
                .unwrap();
            assert!(
                n > 0,
                "closed early; have {:?}",
                String::from_utf8_lossy(&self.buf)
            );
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).to_string();
                self.buf.drain(..i + 2);
                return line;
            }
            let have = self.buf.len();
            self.fill(have + 1).await;
        }
    }

    /// Waits for attache to close the connection without sending anything, no sooner than
    /// `not_before` from now (and within 5 s).
    async fn closed_silently(&mut self, not_before: Duration) {
        let t = Instant::now();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), self.s.read_to_end(&mut rest))
            .await
            .expect("not closed within 5 s")
            .unwrap();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert!(t.elapsed() >= not_before, "closed after {:?}", t.elapsed());
    }

    /// Reads one response; `head_only` for the answer to a HEAD request.
    async fn answer(&mut self, head_only: bool) -> Answer {
        let mut head = String::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            head.push_str(&line);
            head.push('\n');
        }
        let mut answer = Answer {
            head,
            body: Vec::new(),
        };
        if head_only {
            return answer;
        }
        if answer.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line().await, 16).unwrap();
                if size == 0 {
                    assert_eq!(self.line().await, "", "trailers where none were sent");
                    break;
                }
                self.fill(size + 2).await;
                answer.body.extend(self.buf.drain(..size));
                assert_eq!(self.buf.drain(..2).as_slice(), b"\r\n");
            }
        } else {
            let len: usize = answer.header("content-length").unwrap().parse().unwrap();
            self.fill(len).await;
            answer.body = self.buf.drain(..len).collect();
        }
        answer
    }
}

/// An upstream that answers "METHOD body-length".
async fn echo_upstream() -> Upstream {
    Upstream::start(|req| async move {
        let method = req.method().to_string();
        let body = req.into_body().collect().await.unwrap().to_bytes();
        text(200, &format!("{method} {}", body.len()))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attache_and_hyper_take_turns_on_one_connection() {
    let up = echo_upstream().await;
    let at = Attache::start(&config(up.addr, "5s"));
    let mut c = Client::connect(&at).await;
    // Bodiless requests are attache's; requests with bodies are hyper's; each hands the
    // connection back to the other.
    let big = "x".repeat(20_000);
    let turns = [
        ("GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_owned(), "GET 0"),
        // A small body is read whole by attache; a chunked or larger one streams via hyper.
        (
            "POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nhello".to_owned(),
            "POST 5",
        ),
        ("GET / HTTP/1.1\r\nhost: a\r\n\r\n".to_owned(), "GET 0"),
        (
            "POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
                .to_owned(),
            "POST 3",
        ),
        (
            format!("PUT / HTTP/1.1\r\nhost: a\r\ncontent-length: 20000\r\n\r\n{big}"),
            "PUT 20000",
        ),
        (
            "DELETE / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n".to_owned(),
            "DELETE 0",
        ),
    ];
    for (request, want) in &turns {
        c.send(request).await;
        let a = c.answer(false).await;
        assert_eq!(a.status(), "HTTP/1.1 200 OK");
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            *want,
            "for {request:.60?}"
        );
    }
    // A small body that arrives after its head, in two writes.
    c.send("PATCH / HTTP/1.1\r\nhost: a\r\ncontent-length: 6\r\n\r\nabc")
        .await;
    c.send("def").await;
    assert_eq!(c.answer(false).await.body, b"PATCH 6");
    // All of them pipelined in one write: answered in order.
    let all: String = turns.iter().map(|(r, _)| r.as_str()).collect();
    c.send(&all).await;
    for (request, want) in &turns {
        let a = c.answer(false).await;
        assert_eq!(
            String::from_utf8_lossy(&a.body),
            *want,
            "for {request:.60?}"
        );
    }
    assert_eq!(up.hits(), 2 * turns.len() + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_unknown_length_and_close_are_framed_right() {
    let up = Upstream::start(|req| async move {
        match req.uri().path() {
            // A body of unknown length: hyper sends it chunked, attache relays it chunked.
            "/stream" => {
                let chunks = ["ab", "cd"].map(|c| {
                    Ok::<_, std::convert::Infallible>(http_body::Frame::data(Bytes::from(c)))
                });
                let body = StreamBody::new(futures_util::stream::iter(chunks));
                http::Response::new(body.map_err(|e| match e {}).boxed())
            }
            _ => text(200, &"x".repeat(1234)),
        }
    })
    .await;
    let at = Attache::start(&config(up.addr, "5s"));
    let mut c = Client::connect(&at).await;

    c.send("HEAD /page HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let a = c.answer(true).await;
    assert_eq!(a.status(), "HTTP/1.1 200 OK");
    assert_eq!(a.header("content-length"), Some("1234"), "{}", a.head);

    c.send("GET /stream HTTP/1.1\r\nhost: a\r\n\r\n").await;
    let a = c.answer(false).await;
    assert_eq!(a.header("transfer-encoding"), Some("chunked"), "{}", a.head);
    assert_eq!(a.body, b"abcd");
    assert!(a.header("date").is_some(), "{}", a.head);

    // The connection is still in step after both, and `connection: close` ends it.
    c.send("GET /page HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
        .await;
    let a = c.answer(false).await;
    assert_eq!(a.body.len(), 1234);
    assert_eq!(a.header("connection"), Some("close"));
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty() && c.buf.is_empty());
    assert_eq!(up.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_cancels_its_request_upstream() {
    // An upstream that never answers and reports when attache closes its connection.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (got_head, mut head_seen) = tokio::sync::mpsc::channel(1);
    let (closed, mut close_seen) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        got_head.send(()).await.unwrap();
        let n = s.read(&mut buf).await.unwrap_or(0);
        closed.send((n, Instant::now())).await.unwrap();
    });
    let at = Attache::start(&config(addr, "60s"));
    let mut c = Client::connect(&at).await;
    c.send("GET /slow HTTP/1.1\r\nhost: a\r\n\r\n").await;
    head_seen.recv().await.unwrap();
    let hung_up = Instant::now();
    drop(c);
    let (n, at_close) = tokio::time::timeout(Duration::from_secs(10), close_seen.recv())
        .await
        .expect("the upstream request was not cancelled")
        .unwrap();
    assert_eq!(n, 0, "attache sent more on the upstream connection");
    assert!(at_close - hung_up < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_that_stalls_is_cut_off_like_a_slow_head() {
    let up = echo_upstream().await;
    let yaml =
        config(up.addr, "5s").replace("    routes:", "    header_read_timeout: 300ms\n    routes:");
    let at = Attache::start(&yaml);
    let mut c = Client::connect(&at).await;
    c.send("POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\n\r\nab")
        .await;
    c.closed_silently(Duration::from_millis(250)).await;
    assert_eq!(up.hits(), 0);
}

/// An HTTP/1.1 connection's one timer serves both the wait for the next request head and the
/// deadline of the upstream try in progress: a try longer than `header_read_timeout` is
/// neither cut off when the head timeout passes nor left hanging after its own deadline, on
/// the first request of a connection and on a later one; once idle again, the connection is
/// closed after the head timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_try_longer_than_the_head_timeout_ends_at_its_own_deadline() {
    let hung = Upstream::slow(Duration::from_secs(30), "late").await;
    let yaml = config(hung.addr, "700ms")
        .replace("    routes:", "    header_read_timeout: 200ms\n    routes:");
    let at = Attache::start(&yaml);
    let mut c = Client::connect(&at).await;
    for _ in 0..2 {
        let t = Instant::now();
        c.send("GET /x HTTP/1.1\r\nhost: a\r\n\r\n").await;
        let answer = c.answer(false).await;
        let took = t.elapsed();
        assert_eq!(
            answer.status(),
            "HTTP/1.1 504 Gateway Timeout",
            "{}",
            answer.head
        );
        assert_eq!(answer.header("x-attache-reason"), Some("timeout"));
        assert!(
            took >= Duration::from_millis(650) && took < Duration::from_millis(1500),
            "{took:?}"
        );
    }
    // Idle again: closed after the head timeout.
    c.closed_silently(Duration::from_millis(150)).await;
}

/// A request attache serves itself is routed on its header fields where they lie in the
/// head (no header map is built): names match in any case, a list sent as several lines is
/// joined in order, and the lines `connection` names stay behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_fields_are_read_where_they_lie_in_the_head() {
    let a = Upstream::start(|_req| async move { text(200, "a") }).await;
    let b = Upstream::start(|_req| async move { text(200, "b") }).await;
    let yaml = format!(
        "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes:\n      - {{ cluster: b, match: {{ headers: [{{ name: x-version, exact: \"2\" }}] }} }}\n      - {{ cluster: a }}\nclusters:\n  a: {{ endpoints: [\"{}\"] }}\n  b: {{ endpoints: [\"{}\"] }}\n",
        a.addr, b.addr
    );
    let at = Attache::start(&yaml);
    let mut c = Client::connect(&at).await;
    c.send(
        "GET /x HTTP/1.1\r\nHost: app\r\nX-Forwarded-For: 1.2.3.4\r\nX-VERSION: 2\r\n\
         x-forwarded-for: 5.6.7.8\r\nConnection: X-Hop\r\nx-hop: 1\r\n\r\n",
    )
    .await;
    let answer = c.answer(false).await;
    assert_eq!(answer.body, b"b", "routed on `X-VERSION: 2`");
    let seen = b.seen.lock().unwrap().last().cloned().unwrap();
    let xff: Vec<_> = seen.headers.get_all("x-forwarded-for").iter().collect();
    assert_eq!(xff, ["1.2.3.4, 5.6.7.8, 127.0.0.1"]);
    assert_eq!(seen.headers["host"], "app");
    assert!(seen.headers.get("x-hop").is_none(), "named by connection");
    assert!(seen.headers.get("connection").is_none());
    assert_eq!(seen.headers["x-version"], "2");

    c.send("GET /x HTTP/1.1\r\nhost: app\r\nx-version: 3\r\n\r\n")
        .await;
    assert_eq!(c.answer(false).await.body, b"a");
}
