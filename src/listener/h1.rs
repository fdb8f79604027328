//! attache's own HTTP/1.1 server side: it reads request heads, passes requests without a body
//! or with a small one (read whole, at most 16 KiB of `content-length`) to the proxy and
//! writes their responses, with one read buffer per connection and nothing between the
//! socket and the request (no dispatcher task, no channel, no timer per request).
//!
//! It serves the common case only. A request it does not take (a chunked or larger body, an
//! upgrade, `expect`, HTTP/1.0, CONNECT, a target not in origin form, a head it cannot parse
//! or that is too large) is left in the buffer, untouched, for hyper's server, which answers
//! it and every error case as before and hands the connection back once idle (see
//! `listener::http`).
//!
//! Written here because hyper's server connection runs a dispatcher, its own buffers and a
//! timer per request, and no maintained crate frames HTTP/1.1 without owning the connection.
//! `httparse` (hyper's parser) parses; the proxy reads the header fields where they lie in the
//! head (`route::Fields`): no header map is built for the request.

use std::future::Future;
use std::io::{self, IoSlice};
use std::mem::MaybeUninit;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::error::ProxyError;
use crate::proxy::{self, ClientBody, ConnCtx};
use crate::route::{HeadLines, Span};
use crate::telemetry::ListenerStats;
use crate::upstream::wire::RawFields;

/// Headers in one request head (hyper's default limit too).
const MAX_HEADERS: usize = 100;
/// Room made in the read buffer before a read.
const READ_CHUNK: usize = 4096;
/// The largest request body attache reads whole itself (a larger one is hyper's, streamed).
const SMALL_BODY: usize = 16 * 1024;

/// How a stretch of serving ended.
pub enum Served {
    /// The connection is done: the client closed it, it failed, or the worker drains.
    Close,
    /// The buffer begins with a request attache leaves to hyper.
    Hyper,
}

/// What a connection needs to know of its listener.
pub struct Limits {
    /// Largest request head; a larger one goes to hyper, which answers 431.
    pub max_head: usize,
    /// Above this many connections on the listener, an idle connection gives back its buffers.
    pub park_above: usize,
}

/// Serves requests from `buf` and the socket until the connection ends or a request needs
/// hyper. Checks `draining` between requests. Counts itself in `parked_connections` while
/// idle without buffers.
pub async fn serve(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    ctx: &Arc<ConnCtx>,
    limits: &Limits,
    draining: &AtomicBool,
    stats: &ListenerStats,
) -> Served {
    let mut out = Out::default();
    let mut spans = Vec::new();
    let mut parked = Parked {
        stats,
        parked: false,
    };
    let mut need_bytes = false;
    loop {
        if need_bytes && !read_more(stream, buf, draining, &mut parked).await {
            return Served::Close;
        }
        // No await in this statement: nothing of `parse`'s answer but the request itself
        // (moved into the boxed exchange) outlives it.
        let (req, close) = match parse(buf, &mut spans) {
            Parsed::Request(req, head, close) => (Ok((req, head)), close),
            Parsed::Bad(e) => (Err(e), true),
            Parsed::Hyper => return Served::Hyper,
            Parsed::Partial if buf.len() > limits.max_head => return Served::Hyper,
            Parsed::Partial | Parsed::NeedBody => {
                need_bytes = true;
                continue;
            }
        };
        // Boxed: the request's state (proxy, upstream, response body) lives only while the
        // request does, not in every idle connection's task. Allocated before the future is
        // made, so that it is built in place rather than copied (it is several KiB).
        let slot = Box::new_uninit();
        let exchange = exchange(
            stream, buf, &mut out, req, &spans, ctx, limits, close, draining,
        );
        let Some(keep_alive) = Box::into_pin(Box::write(slot, exchange)).await else {
            return Served::Close;
        };
        if !keep_alive || draining.load(Ordering::Relaxed) {
            // The response said `connection: close` where it could.
            let _ = stream.shutdown().await;
            return Served::Close;
        }
        if buf.is_empty() {
            need_bytes = true;
            if ctx.shared.connections[ctx.listener].load(Ordering::Relaxed) > limits.park_above {
                // Idle on a busy listener: keep no buffers.
                *buf = BytesMut::new();
                out = Out::default();
                spans = Vec::new();
                parked.set(true);
            }
        } else {
            need_bytes = false; // a pipelined request, maybe whole
        }
    }
}

/// Waits for more bytes of a request head and appends them to `buf`; false when the client
/// closed or failed, or when the worker drains while nothing is buffered.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    draining: &AtomicBool,
    parked: &mut Parked<'_>,
) -> bool {
    let read = std::future::poll_fn(|cx| {
        if buf.is_empty() && draining.load(Ordering::Relaxed) {
            return Poll::Ready(false);
        }
        // Room is made only once the client has sent: a parked connection stays bufferless.
        match stream.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(false),
            Poll::Ready(Ok(())) => {}
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        read_some(stream, cx, buf).map(|n| n > 0)
    })
    .await;
    parked.set(false);
    read
}

/// Reads what the client has sent into `buf`: the byte count, 0 at end of stream or on an
/// error. Through tokio's `poll_read`, which marks the socket drained after a short read, so
/// that the next poll waits for the client instead of asking the kernel again (a read that
/// would only say "nothing yet" is a system call per request).
fn read_some(stream: &mut TcpStream, cx: &mut Context<'_>, buf: &mut BytesMut) -> Poll<usize> {
    match tokio_util::io::poll_read_buf(Pin::new(stream), cx, buf) {
        Poll::Pending => Poll::Pending,
        Poll::Ready(Ok(n)) => Poll::Ready(n),
        Poll::Ready(Err(_)) => Poll::Ready(0),
    }
}

/// Keeps `parked_connections` true on every exit, timeouts included (the future is dropped).
struct Parked<'a> {
    stats: &'a ListenerStats,
    parked: bool,
}

impl Parked<'_> {
    fn set(&mut self, parked: bool) {
        if parked != self.parked {
            self.parked = parked;
            if parked {
                self.stats.parked_connections.inc();
            } else {
                self.stats.parked_connections.dec();
            }
        }
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.set(false);
    }
}

/// What the front of the read buffer holds.
#[allow(clippy::large_enum_variant)] // returned once per request and taken apart at once
enum Parsed {
    /// A request taken off the buffer with its body, and its head (the header fields are
    /// the spans within it, the request's header map is empty); `true` when the client asked
    /// to close.
    Request(Request<ClientBody>, Bytes, bool),
    /// Not a whole head yet.
    Partial,
    /// A whole head, but not yet the whole (small) body it announces; the buffer is untouched.
    NeedBody,
    /// A request for hyper; the buffer is untouched.
    Hyper,
    /// A head taken off the buffer that turned out invalid: answer 400 and close.
    Bad(ProxyError),
}

/// Parses the request head at the front of `buf`. `spans` is the connection's scratch space,
/// so that parsing allocates nothing and initialises no fixed-size array.
fn parse(buf: &mut BytesMut, spans: &mut Vec<Span>) -> Parsed {
    if buf.is_empty() {
        return Parsed::Partial;
    }
    spans.clear();
    let mut raw = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let base = buf.as_ptr() as usize;
    let mut body_len: Option<usize> = None;
    let (len, method, path, close) = match httparse::ParserConfig::default()
        .parse_request_with_uninit_headers(&mut req, buf, &mut raw)
    {
        Ok(httparse::Status::Complete(len)) => {
            let (Some(1), Some(method), Some(path)) = (req.version, req.method, req.path) else {
                return Parsed::Hyper;
            };
            if !path.starts_with('/') || method == "CONNECT" {
                return Parsed::Hyper;
            }
            let Ok(method) = Method::from_bytes(method.as_bytes()) else {
                return Parsed::Hyper;
            };
            let mut close = false;
            for h in req.headers.iter() {
                let name = h.name.as_bytes();
                if name.eq_ignore_ascii_case(b"content-length") {
                    // One plain length, small enough to read whole; anything else is hyper's.
                    match (body_len, small_length(h.value)) {
                        (None, Some(n)) => body_len = Some(n),
                        _ => return Parsed::Hyper,
                    }
                } else if name.eq_ignore_ascii_case(b"connection") {
                    for token in h.value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                        if token.eq_ignore_ascii_case(b"close") {
                            close = true;
                        } else if token.eq_ignore_ascii_case(b"upgrade") {
                            return Parsed::Hyper;
                        }
                    }
                } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                    || name.eq_ignore_ascii_case(b"upgrade")
                    || name.eq_ignore_ascii_case(b"expect")
                {
                    return Parsed::Hyper;
                }
                let n = h.name.as_ptr() as usize - base;
                let v = h.value.as_ptr() as usize - base;
                spans.push((n, n + h.name.len(), v, v + h.value.len()));
            }
            let p = path.as_ptr() as usize - base;
            (len, method, (p, p + path.len()), close)
        }
        Ok(httparse::Status::Partial) => return Parsed::Partial,
        Err(_) => return Parsed::Hyper,
    };
    let body_len = body_len.unwrap_or(0);
    if buf.len() < len + body_len {
        return Parsed::NeedBody;
    }
    let head = buf.split_to(len).freeze();
    let body = match body_len {
        0 => ClientBody::Empty,
        n => ClientBody::Full(Some(buf.split_to(n).freeze())),
    };
    let Ok(uri) = Uri::from_maybe_shared(head.slice(path.0..path.1)) else {
        return Parsed::Bad(ProxyError::BadRequest("invalid request target".into()));
    };
    // No header map: the proxy reads the fields where they lie (`route::Fields`). httparse
    // has checked names (tokens) and values (no control characters but tab) as `http` would.
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    Parsed::Request(req, head, close)
}

/// A `content-length` value attache reads whole: digits only, at most [`SMALL_BODY`].
fn small_length(value: &[u8]) -> Option<usize> {
    let digits = value.trim_ascii();
    if digits.is_empty() || digits.len() > 6 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    (n <= SMALL_BODY).then_some(n)
}

/// One request (or a bad one's 400) and its response. While the proxy works on the request, the client socket is
/// watched: bytes of a pipelined next request go to `buf`, and a client that goes away
/// cancels the request (as hyper does). `None` when the connection must close at once;
/// otherwise whether the response left it reusable.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    out: &mut Out,
    req: Result<(Request<ClientBody>, Bytes), ProxyError>,
    spans: &[Span],
    ctx: &Arc<ConnCtx>,
    limits: &Limits,
    close: bool,
    draining: &AtomicBool,
) -> Option<bool> {
    let (req, head) = match req {
        Ok(req) => req,
        Err(e) => {
            return write_response(stream, out, e.response(), None, false, false)
                .await
                .ok()
        }
    };
    let head_only = req.method() == Method::HEAD;
    let lines = HeadLines { head: &head, spans };
    let mut handling = pin!(proxy::handle(req, Some(lines), ctx.clone()));
    let resp = std::future::poll_fn(|cx| {
        if let Poll::Ready(Ok(resp)) = handling.as_mut().poll(cx) {
            return Poll::Ready(Some(resp));
        }
        while buf.len() < limits.max_head {
            buf.reserve(READ_CHUNK / 4);
            match read_some(stream, cx, buf) {
                Poll::Pending => break,
                Poll::Ready(0) => return Poll::Ready(None),
                Poll::Ready(_) => {}
            }
        }
        Poll::Pending
    })
    .await?;
    let mut resp = resp;
    let raw = resp.body_mut().take_raw_fields();
    let keep_alive = !close && !draining.load(Ordering::Relaxed);
    write_response(stream, out, resp, raw, head_only, keep_alive)
        .await
        .ok()
}

/// Response bytes waiting for one vectored write: head (and chunk-size line), one data
/// frame, and what follows it (chunk end, last chunk, trailers). The buffers are the
/// connection's, reused.
#[derive(Default)]
struct Out {
    head: Vec<u8>,
    data: Bytes,
    tail: Vec<u8>,
}

impl Out {
    fn is_empty(&self) -> bool {
        self.head.is_empty() && self.data.is_empty() && self.tail.is_empty()
    }

    async fn write(&mut self, stream: &mut TcpStream) -> io::Result<()> {
        let data = std::mem::take(&mut self.data);
        let mut slices = [
            IoSlice::new(&self.head),
            IoSlice::new(&data),
            IoSlice::new(&self.tail),
        ];
        let mut left = self.head.len() + data.len() + self.tail.len();
        let mut bufs = &mut slices[..];
        while left > 0 {
            let n = stream.write_vectored(bufs).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            left -= n;
            IoSlice::advance_slices(&mut bufs, n);
        }
        self.head.clear();
        self.tail.clear();
        Ok(())
    }
}

/// How the body of a response is delimited on the wire.
#[derive(PartialEq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
}

/// Writes a response: head, then the body's frames as they come, each batch of ready frames
/// in one vectored write. `raw`: the upstream's header lines, written as they are before the
/// header map's. Returns whether the connection can carry another request.
async fn write_response<B>(
    stream: &mut TcpStream,
    out: &mut Out,
    resp: Response<B>,
    raw: Option<RawFields>,
    head_only: bool,
    keep_alive: bool,
) -> io::Result<bool>
where
    B: Body<Data = Bytes>,
{
    let (parts, body) = resp.into_parts();
    let status = parts.status;
    let bodiless = head_only
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let hint = body.size_hint().exact();
    let framing = match hint {
        _ if bodiless => Framing::None,
        Some(n) => Framing::Length(n),
        None => Framing::Chunked,
    };
    // A HEAD answer made by attache (an error) states its body's length; an upstream's
    // keeps its own `content-length`, or none.
    let head_length = hint.filter(|&n| head_only && n > 0);
    encode_head(
        &mut out.head,
        status,
        &parts.headers,
        raw.as_ref(),
        &framing,
        head_length,
        keep_alive,
    );
    drop(parts);
    if bodiless {
        drop(body);
        out.write(stream).await?;
        return Ok(keep_alive);
    }
    let mut body = pin!(body);
    let mut remaining = hint.unwrap_or(0);
    loop {
        let step = std::future::poll_fn(|cx| match body.as_mut().poll_frame(cx) {
            Poll::Pending if !out.is_empty() => Poll::Ready(Step::Flush),
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => Poll::Ready(Step::End),
            Poll::Ready(Some(Err(_))) => Poll::Ready(Step::Failed),
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Step::Frame(frame)),
        })
        .await;
        match step {
            Step::Flush => out.write(stream).await?,
            Step::Frame(frame) => match frame.into_data() {
                Ok(data) if data.is_empty() => {}
                Ok(data) => {
                    if !out.data.is_empty() {
                        out.write(stream).await?;
                    }
                    if framing == Framing::Chunked {
                        use std::io::Write as _;
                        let _ = write!(out.head, "{:x}\r\n", data.len());
                        out.tail.extend_from_slice(b"\r\n");
                    } else {
                        let len = data.len() as u64;
                        if len > remaining {
                            // A body longer than it said: what the client has is cut here.
                            return Err(io::ErrorKind::InvalidData.into());
                        }
                        remaining -= len;
                    }
                    out.data = data;
                }
                Err(frame) => {
                    if let (Framing::Chunked, Ok(trailers)) = (&framing, frame.into_trailers()) {
                        out.tail.extend_from_slice(b"0\r\n");
                        encode_fields(&mut out.tail, &trailers);
                        out.tail.extend_from_slice(b"\r\n");
                        out.write(stream).await?;
                        return Ok(keep_alive);
                    }
                }
            },
            Step::End => {
                if framing == Framing::Chunked {
                    out.tail.extend_from_slice(b"0\r\n\r\n");
                }
                out.write(stream).await?;
                if remaining > 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                return Ok(keep_alive);
            }
            Step::Failed => {
                // The client sees a cut response: the connection closes.
                let _ = out.write(stream).await;
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
}

enum Step {
    Frame(http_body::Frame<Bytes>),
    Flush,
    End,
    Failed,
}

/// Appends the status line and headers. Framing headers are attache's: the response's own
/// `content-length`, `transfer-encoding` and `connection` are replaced, except that a
/// response without a body (HEAD, 204, 304) keeps the `content-length` it has. `raw` lines
/// come first, as they are: the upstream codec already left out what is replaced here.
fn encode_head(
    buf: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    raw: Option<&RawFields>,
    framing: &Framing,
    head_length: Option<u64>,
    keep_alive: bool,
) {
    buf.extend_from_slice(b"HTTP/1.1 ");
    buf.extend_from_slice(status.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    buf.extend_from_slice(b"\r\n");
    let mut has_length = false;
    let mut has_date = false;
    if let Some(raw) = raw {
        buf.extend_from_slice(&raw.lines);
        has_length = raw.has_length;
        has_date = raw.has_date;
    }
    for (name, value) in headers {
        if *name == header::CONNECTION
            || *name == header::TRANSFER_ENCODING
            || name.as_str() == "keep-alive"
        {
            continue;
        }
        if *name == header::CONTENT_LENGTH {
            if *framing != Framing::None {
                continue;
            }
            has_length = true;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => length_line(buf, *n),
        Framing::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        Framing::None => {
            if let (false, Some(n)) = (has_length, head_length) {
                length_line(buf, n);
            }
        }
    }
    if !has_date && !headers.contains_key(header::DATE) {
        buf.extend_from_slice(b"date: ");
        date::append(buf);
        buf.extend_from_slice(b"\r\n");
    }
    if !keep_alive {
        buf.extend_from_slice(b"connection: close\r\n");
    }
    buf.extend_from_slice(b"\r\n");
}

fn length_line(buf: &mut Vec<u8>, n: u64) {
    buf.extend_from_slice(b"content-length: ");
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    buf.extend_from_slice(&digits[i..]);
    buf.extend_from_slice(b"\r\n");
}

fn encode_fields(buf: &mut Vec<u8>, fields: &HeaderMap) {
    for (name, value) in fields {
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
}

/// The `date` header's value, formatted once a second per thread (as hyper does).
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }

    pub fn append(buf: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHE.with_borrow_mut(|(at, text)| {
            if *at != secs {
                let s = httpdate::fmt_http_date(now);
                if s.len() == text.len() {
                    text.copy_from_slice(s.as_bytes());
                    *at = secs;
                }
            }
            buf.extend_from_slice(text);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    fn parsed(raw: &[u8]) -> (Parsed, BytesMut) {
        parsed_with(raw).0
    }

    fn parsed_with(raw: &[u8]) -> ((Parsed, BytesMut), Vec<Span>) {
        let mut buf = BytesMut::from(raw);
        let mut spans = Vec::new();
        ((parse(&mut buf, &mut spans), buf), spans)
    }

    #[test]
    fn bodiless_requests_are_taken_and_the_rest_left_in_place() {
        let ((p, rest), spans) =
            parsed_with(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\n\r\nGET /n");
        let Parsed::Request(req, head, close) = p else {
            panic!("not taken");
        };
        assert!(!close);
        assert_eq!(req.uri(), "/a?b=c");
        // No header map: the fields are read in the head.
        assert!(req.headers().is_empty());
        let fields = crate::route::Fields::Lines(HeadLines {
            head: &head,
            spans: &spans,
        });
        assert_eq!(fields.text(&header::HOST), Some("x"));
        let x_a = http::HeaderName::from_static("x-a");
        assert_eq!(fields.get_all(&x_a).collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(&rest[..], b"GET /n");

        let (p, _) = parsed(
            b"DELETE /a HTTP/1.1\r\nconnection: keep-alive, close\r\ncontent-length: 0\r\n\r\n",
        );
        assert!(matches!(p, Parsed::Request(_, _, true)));
    }

    #[test]
    fn small_bodies_are_read_whole() {
        let (p, rest) = parsed(b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhel");
        assert!(matches!(p, Parsed::NeedBody));
        assert_eq!(
            &rest[..],
            b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhel"
        );
        let (p, rest) = parsed(b"POST /a HTTP/1.1\r\ncontent-length: 5\r\n\r\nhelloGET");
        let Parsed::Request(req, _, false) = p else {
            panic!("not taken");
        };
        assert_eq!(&rest[..], b"GET");
        let ClientBody::Full(Some(body)) = req.into_body() else {
            panic!("no body");
        };
        assert_eq!(&body[..], b"hello");
        assert_eq!(small_length(b" 16384 "), Some(16384));
        assert_eq!(small_length(b"16385"), None);
        assert_eq!(small_length(b"1,1"), None);
    }

    #[test]
    fn anything_else_goes_to_hyper_untouched() {
        for raw in [
            &b"POST / HTTP/1.1\r\ncontent-length: 16385\r\n\r\nabc"[..],
            b"POST / HTTP/1.1\r\ncontent-length: +3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\ncontent-length: 3\r\ncontent-length: 3\r\n\r\nabc",
            b"POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
            b"GET / HTTP/1.1\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
            b"PUT / HTTP/1.1\r\nexpect: 100-continue\r\ncontent-length: 0\r\n\r\n",
            b"GET / HTTP/1.0\r\n\r\n",
            b"CONNECT a:443 HTTP/1.1\r\n\r\n",
            b"GET http://a/ HTTP/1.1\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
            b"GET / HTTP/1.1\r\ncontent-length: 0\r\ncontent-length: 1\r\n\r\n",
        ] {
            let (p, rest) = parsed(raw);
            assert!(
                matches!(p, Parsed::Hyper),
                "{}",
                String::from_utf8_lossy(raw)
            );
            assert_eq!(&rest[..], raw);
        }
        let (p, rest) = parsed(b"GET / HTTP/1.1\r\nhost: a\r\n");
        assert!(matches!(p, Parsed::Partial));
        assert_eq!(rest.len(), 25);
    }

    /// A parked connection waits for its client without a buffer: room is made only once
    /// there is something to read (10,000 idle connections would otherwise hold 40 MiB).
    #[test]
    fn a_parked_connection_allocates_nothing_until_the_client_sends() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let mut client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            let (mut server, _) = l.accept().await.unwrap();
            let shared = crate::state::Shared::new(
                crate::config::Config::parse(
                    "admin: { address: \"127.0.0.1:0\" }\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ { cluster: a } ]\nclusters:\n  a: { endpoints: [\"127.0.0.1:1\"] }\n",
                    std::path::Path::new("x.yaml"),
                )
                .unwrap(),
                "x.yaml".into(),
                1,
                crate::telemetry::AccessLog::Off,
            );
            let stats = shared.snapshot.load().listeners[0].stats.clone();
            let mut parked = Parked {
                stats: &stats,
                parked: false,
            };
            let mut buf = BytesMut::new();
            let draining = AtomicBool::new(false);
            // A first request read in full (a short read: the socket is known drained)...
            client.write_all(b"GET /1 HTTP/1.1\r\n\r\n").await.unwrap();
            assert!(read_more(&mut server, &mut buf, &draining, &mut parked).await);
            assert_eq!(&buf[..], b"GET /1 HTTP/1.1\r\n\r\n");
            // ...then parked: the buffer is given back, and a wait must not make another.
            buf = BytesMut::new();
            parked.set(true);
            {
                let read = read_more(&mut server, &mut buf, &draining, &mut parked);
                let mut read = pin!(read);
                let waker = std::task::Waker::noop();
                let polled = read.as_mut().poll(&mut Context::from_waker(waker));
                assert!(polled.is_pending());
            }
            assert_eq!(buf.capacity(), 0, "a silent client got a buffer");
            client.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            assert!(read_more(&mut server, &mut buf, &draining, &mut parked).await);
            assert_eq!(&buf[..], b"GET / HTTP/1.1\r\n");
            assert_eq!(stats.parked_connections.get(), 0);
        });
    }

    #[test]
    fn heads_are_framed_by_attache() {
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("99"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        h.insert(
            "date",
            HeaderValue::from_static("Fri, 27 Nov 2026 16:00:00 GMT"),
        );
        h.insert("x-a", HeaderValue::from_static("1"));
        let mut buf = Vec::new();
        encode_head(
            &mut buf,
            StatusCode::OK,
            &h,
            None,
            &Framing::Length(12345),
            None,
            false,
        );
        assert_eq!(
            String::from_utf8(buf).unwrap(),
            "HTTP/1.1 200 OK\r\ndate: Fri, 27 Nov 2026 16:00:00 GMT\r\nx-a: 1\r\ncontent-length: 12345\r\nconnection: close\r\n\r\n"
        );
        let mut buf = Vec::new();
        encode_head(
            &mut buf,
            StatusCode::NOT_MODIFIED,
            &h,
            None,
            &Framing::None,
            None,
            true,
        );
        let text = String::from_utf8(buf).unwrap();
        assert!(
            text.contains("content-length: 99\r\n") && !text.contains("connection"),
            "{text}"
        );
        let mut buf = Vec::new();
        h.remove("content-length");
        h.remove("date");
        encode_head(
            &mut buf,
            StatusCode::from_u16(599).unwrap(),
            &h,
            None,
            &Framing::Chunked,
            None,
            true,
        );
        let text = String::from_utf8(buf).unwrap();
        assert!(text.starts_with("HTTP/1.1 599 \r\n"), "{text}");
        assert!(
            text.contains("transfer-encoding: chunked\r\ndate: "),
            "{text}"
        );
        assert!(text.ends_with(" GMT\r\n\r\n"), "{text}");
    }
}
