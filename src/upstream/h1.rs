//! HTTP/1.1 upstream connections driven from the request's own task, pooled per worker.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own: a request
//! crosses a channel to that task and its response crosses a oneshot back, two extra task
//! wake-ups and a shared pool per request. Here the request's task does the connection's I/O
//! itself, first while waiting for the response head, then from the response body, and the
//! connection goes back to this worker's [`Pool`] when the body is done.
//!
//! Two kinds of connection share the pool's bookkeeping:
//! - **Wire** connections ([`WireConn`], the request path's common case): a request whose body
//!   is already in memory (every bodiless request, and every replayable one) is written in
//!   one `write` and its response read with attache's own codec ([`super::wire`]), with no
//!   dispatcher or channel in between, and bounded by the connection's one timer, moved to
//!   each request's deadline (no timer set up and torn down per request).
//! - **hyper** connections ([`HyperConn`]): requests whose body streams from the client
//!   (read and write at once, `expect: 100-continue`) and upgrades (WebSocket) go through
//!   hyper's `client::conn::http1`, polled from the request's task too.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::wire::{self, Chunked, Decoded, Framing};
use super::ReqBody;

/// Bytes reserved for a read from a wire connection: at first, and at most (see
/// [`WireConn::poll_fill`]).
const READ_CHUNK: usize = 16 * 1024;
const READ_CHUNK_MAX: usize = 64 * 1024;
/// A request body up to this size is copied behind its head and sent in the same write.
const COALESCE_BODY: usize = 16 * 1024;

/// The connection future (with upgrades: hyper hands the socket to a 101's upgrade). Boxed
/// because hyper doesn't name its type; one allocation per connection, not per request.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// A connection for attache's own codec: the socket and its buffers.
pub struct WireConn {
    io: TcpStream,
    /// Bytes read and not yet consumed (a response head, body bytes, ...).
    rbuf: BytesMut,
    /// The request being written.
    wbuf: Vec<u8>,
    /// Scratch space for parsing response heads.
    spans: Vec<wire::Span>,
    /// Bytes to make room for before a read: grows while reads fill the room.
    read_size: usize,
    /// The deadline of the request on the connection. One timer for the connection's life,
    /// moved to each request's deadline: a later deadline than the one registered only
    /// updates tokio's entry (its wheel moves the entry when the old time comes), where a
    /// timer per request is a wheel insertion and removal under the driver's lock. None
    /// until the first request.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A hyper connection: the request sender and the connection future that does its I/O.
struct HyperConn {
    sender: http1::SendRequest<ReqBody>,
    driver: Driver,
    /// The driver future has completed (connection closed or upgraded): never poll it again.
    done: bool,
}

impl HyperConn {
    /// Polls the connection's I/O; false once the connection has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.done && self.driver.as_mut().poll(cx).is_ready() {
            self.done = true;
        }
        !self.done
    }

    /// Whether an idle connection can take a request now (polls it once to find out).
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && self.sender.is_ready()
    }
}

enum Conn {
    /// Boxed once, when connected: the request path moves a response holding its connection
    /// through several layers, and a pointer is cheaper to move than the connection.
    Wire(Box<WireConn>),
    Hyper(HyperConn),
}

impl Conn {
    /// Whether an idle connection can take a request now: still open, nothing unasked-for
    /// arrived. Costs no system call while the socket has seen no event.
    fn reusable(&mut self, cx: &mut Context<'_>) -> bool {
        match self {
            Conn::Hyper(c) => c.reusable(cx),
            Conn::Wire(c) => {
                if !c.rbuf.is_empty() {
                    return false;
                }
                match c.io.poll_read_ready(cx) {
                    Poll::Pending => true,
                    Poll::Ready(Err(_)) => false,
                    // Readable: end of stream, stray bytes, or a stale event (WouldBlock,
                    // which also clears the readiness).
                    Poll::Ready(Ok(())) => matches!(
                        c.io.try_read(&mut [0u8; 1]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                    ),
                }
            }
        }
    }
}

struct Idle {
    addr: SocketAddr,
    conn: Conn,
    since: Instant,
}

/// One worker's idle HTTP/1.1 connections to one cluster's endpoints.
pub struct Pool {
    idle: Mutex<Vec<Idle>>,
    max_idle_per_endpoint: usize,
    idle_timeout: Duration,
    connect_timeout: Duration,
}

/// Why a request got no response head.
#[derive(Debug)]
pub enum SendError {
    Connect(String),
    Hyper(hyper::Error),
    /// The connection failed or closed before a whole response head arrived.
    Io(std::io::Error),
    /// The upstream's response broke HTTP/1.1.
    Protocol(wire::WireError),
    /// The deadline passed before a whole response head arrived.
    Timeout,
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
            SendError::Io(e) => write!(f, "{e}"),
            SendError::Protocol(e) => write!(f, "{e}"),
            SendError::Timeout => write!(f, "no response head before the deadline"),
            SendError::Hyper(e) => {
                write!(f, "{e}")?;
                let mut source = std::error::Error::source(e);
                while let Some(s) = source {
                    write!(f, ": {s}")?;
                    source = s.source();
                }
                Ok(())
            }
        }
    }
}

impl Pool {
    pub fn new(
        max_idle_per_endpoint: usize,
        idle_timeout: Duration,
        connect_timeout: Duration,
    ) -> Pool {
        Pool {
            idle: Mutex::new(Vec::new()),
            max_idle_per_endpoint,
            idle_timeout,
            connect_timeout,
        }
    }

    /// Sends `req` (origin-form URI) to `addr` on a pooled connection or a new one, and
    /// gives up with [`SendError::Timeout`] at `deadline`.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<ReqBody>,
        raw: bool,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        match req.into_parts() {
            (parts, Either::Right(full))
                if !parts.headers.contains_key(http::header::UPGRADE)
                    && parts.method != Method::CONNECT =>
            {
                self.send_wire(addr, parts, full_bytes(full), raw, deadline)
                    .await
            }
            // Boxed: hyper's client state would size every request's future.
            (parts, body) => Box::pin(tokio::time::timeout_at(
                deadline.into(),
                self.send_hyper(addr, Request::from_parts(parts, body)),
            ))
            .await
            .unwrap_or(Err(SendError::Timeout)),
        }
    }

    /// Sends a request whose body is in memory with attache's own codec.
    async fn send_wire(
        self: &Arc<Self>,
        addr: SocketAddr,
        parts: http::request::Parts,
        body: Bytes,
        raw: bool,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let encode = |buf: &mut Vec<u8>| {
            wire::encode_request(buf, &parts.method, path, &parts.headers, body.len())
        };
        let now = Instant::now();
        self.send_encoded(addr, &parts.method, &encode, &body, raw, now, deadline)
            .await
    }

    /// Sends a request whose head `encode` writes (into an empty buffer) and whose body is
    /// `body`, with attache's own codec. `encode` runs again if a pooled connection turns
    /// out to be closed and the request goes on a fresh one. `now`: the time as the caller
    /// has just read it (to tell expired pooled connections). Gives up with
    /// [`SendError::Timeout`] at `deadline`.
    #[allow(clippy::too_many_arguments)]
    pub async fn send_encoded(
        self: &Arc<Self>,
        addr: SocketAddr,
        method: &Method,
        encode: &(dyn Fn(&mut Vec<u8>) + Sync),
        body: &Bytes,
        raw: bool,
        now: Instant,
        deadline: Instant,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let coalesce = body.len() <= COALESCE_BODY;
        loop {
            let (mut conn, reused) = match self.checkout(addr, true, now).await {
                Some(Conn::Wire(c)) => (c, true),
                // Boxed: connecting (with its timer) is the rare case.
                _ => match Box::pin(tokio::time::timeout_at(
                    deadline.into(),
                    self.connect_wire(addr),
                ))
                .await
                {
                    Ok(c) => (c?, false),
                    Err(_) => return Err(SendError::Timeout),
                },
            };
            conn.wbuf.clear();
            encode(&mut conn.wbuf);
            if coalesce {
                conn.wbuf.extend_from_slice(body);
            }
            let mut timer = match conn.timer.take() {
                Some(mut t) => {
                    t.as_mut().reset(deadline.into());
                    t
                }
                None => Box::pin(tokio::time::sleep_until(deadline.into())),
            };
            let head = {
                let exchange = async {
                    let mut written = conn.io.write_all(&conn.wbuf).await;
                    if written.is_ok() && !coalesce {
                        written = conn.io.write_all(body).await;
                    }
                    match written {
                        Ok(()) => conn.read_head(method, raw).await,
                        Err(e) => Err(HeadError::Closed(e)),
                    }
                };
                let mut exchange = std::pin::pin!(exchange);
                std::future::poll_fn(|cx| match exchange.as_mut().poll(cx) {
                    Poll::Ready(head) => Poll::Ready(Some(head)),
                    Poll::Pending => timer.as_mut().poll(cx).map(|()| None),
                })
                .await
            };
            // The connection closes with a request in flight: no response will come.
            let Some(head) = head else {
                return Err(SendError::Timeout);
            };
            conn.timer = Some(timer);
            match head {
                Ok(head) => {
                    let state = match head.framing {
                        Framing::Empty | Framing::Length(0) => BodyState::Done,
                        Framing::Length(n) => BodyState::Length(n),
                        Framing::Chunked => BodyState::Chunked(Chunked::Size),
                        Framing::Close => BodyState::Close,
                    };
                    let mut resp = Response::new(UpstreamBody::Wire(WireBody {
                        conn: Some(conn),
                        pool: self.clone(),
                        addr,
                        state,
                        keep_alive: head.keep_alive,
                        raw: head.raw,
                    }));
                    *resp.status_mut() = head.status;
                    *resp.version_mut() = head.version;
                    *resp.headers_mut() = head.headers;
                    return Ok(resp);
                }
                // A pooled connection the upstream had closed (the keep-alive race): nothing
                // of a response came back, so an idempotent request goes again on a fresh
                // connection (RFC 9110 §9.2.2).
                Err(HeadError::Closed(_)) if reused && method.is_idempotent() => {}
                Err(HeadError::Closed(e) | HeadError::Io(e)) => return Err(SendError::Io(e)),
                Err(HeadError::Protocol(e)) => return Err(SendError::Protocol(e)),
            }
        }
    }

    /// Sends a request with a streamed body, or an upgrade, through hyper.
    async fn send_hyper(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut req = req;
        loop {
            let (mut conn, reused) = match self.checkout(addr, false, Instant::now()).await {
                Some(Conn::Hyper(c)) => (c, true),
                _ => (self.connect_hyper(addr).await?, false),
            };
            let sent = {
                let mut fut = std::pin::pin!(conn.sender.try_send_request(req));
                std::future::poll_fn(|cx| {
                    conn.drive(cx);
                    fut.as_mut().poll(cx)
                })
                .await
            };
            match sent {
                Ok(resp) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        // The connection now belongs to the tunnel: let hyper hand its socket
                        // to the upgrade.
                        if !conn.done {
                            tokio::spawn(conn.driver);
                        }
                        return Ok(resp.map(UpstreamBody::Client));
                    }
                    return Ok(resp.map(|body| {
                        UpstreamBody::Pooled(PooledBody {
                            body,
                            conn: Some(conn),
                            pool: self.clone(),
                            addr,
                            ended: false,
                        })
                    }));
                }
                Err(mut e) => match e.take_message() {
                    // A pooled connection the upstream had closed: the request never left,
                    // send it again on a fresh connection.
                    Some(back) if reused => req = back,
                    _ => return Err(SendError::Hyper(e.into_error())),
                },
            }
        }
    }

    /// An idle connection of the kind asked for to `addr` that is still open at `now`, if any.
    async fn checkout(&self, addr: SocketAddr, wire: bool, now: Instant) -> Option<Conn> {
        loop {
            let mut conn = self.take(addr, wire, now)?;
            if std::future::poll_fn(|cx| Poll::Ready(conn.reusable(cx))).await {
                return Some(conn);
            }
        }
    }

    /// The most recently pooled connection of that kind to `addr` (the worker's sweep drops
    /// expired ones; one that expired since is dropped here).
    fn take(&self, addr: SocketAddr, wire: bool, now: Instant) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let at = idle
                .iter()
                .rposition(|i| i.addr == addr && matches!(i.conn, Conn::Wire(_)) == wire)?;
            let i = idle.swap_remove(at);
            if now.saturating_duration_since(i.since) < self.idle_timeout {
                return Some(i.conn);
            }
        }
    }

    /// Drops idle connections past the idle timeout or closed by the upstream (their sockets
    /// would otherwise linger until the next request to this cluster on this worker).
    pub fn sweep(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        idle.retain_mut(|i| {
            now.duration_since(i.since) < self.idle_timeout && i.conn.reusable(&mut cx)
        });
    }

    fn put(&self, addr: SocketAddr, conn: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.iter().filter(|i| i.addr == addr).count() < self.max_idle_per_endpoint {
            idle.push(Idle {
                addr,
                conn,
                since: Instant::now(),
            });
        }
    }

    async fn connect_tcp(&self, addr: SocketAddr) -> Result<TcpStream, SendError> {
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| {
                SendError::Connect(format!(
                    "timed out after {} ms",
                    self.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| SendError::Connect(e.to_string()))?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect_wire(&self, addr: SocketAddr) -> Result<Box<WireConn>, SendError> {
        Ok(Box::new(WireConn {
            io: self.connect_tcp(addr).await?,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            spans: Vec::new(),
            read_size: READ_CHUNK,
            timer: None,
        }))
    }

    async fn connect_hyper(&self, addr: SocketAddr) -> Result<HyperConn, SendError> {
        let stream = self.connect_tcp(addr).await?;
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Hyper)?;
        Ok(HyperConn {
            sender,
            driver: Box::pin(driver.with_upgrades()),
            done: false,
        })
    }
}

/// The bytes of an in-memory body (`Full` yields them at once).
fn full_bytes(mut full: http_body_util::Full<Bytes>) -> Bytes {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    match Pin::new(&mut full).poll_frame(&mut cx) {
        Poll::Ready(Some(Ok(frame))) => frame.into_data().unwrap_or_default(),
        _ => Bytes::new(),
    }
}

/// Why a wire connection gave no response head.
enum HeadError {
    /// The connection closed or failed before any byte of a response arrived.
    Closed(std::io::Error),
    /// It failed after part of the response arrived.
    Io(std::io::Error),
    Protocol(wire::WireError),
}

impl WireConn {
    /// Reads more bytes into `rbuf`; `Ok(0)` at the end of the stream.
    ///
    /// A read that fills all the room it was given doubles the room of later reads, up to
    /// [`READ_CHUNK_MAX`] (as hyper's adaptive reads do): a 16 KiB response then comes in one
    /// read and leaves in one write, instead of two of each (head and body overflowing a
    /// 16 KiB buffer). Connections that carry small responses keep small buffers.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.rbuf.capacity() - self.rbuf.len() < self.read_size / 4 {
            self.rbuf.reserve(self.read_size);
        }
        let room = self.rbuf.capacity() - self.rbuf.len();
        let read = std::pin::pin!(self.io.read_buf(&mut self.rbuf)).poll(cx);
        if let Poll::Ready(Ok(n)) = read {
            if n == room && self.read_size < READ_CHUNK_MAX {
                self.read_size *= 2;
            }
        }
        read
    }

    /// Reads the final response head (1xx heads before it are dropped).
    async fn read_head(&mut self, method: &Method, raw: bool) -> Result<wire::Head, HeadError> {
        let mut received = false;
        loop {
            if !self.rbuf.is_empty() {
                match wire::parse_response(&mut self.rbuf, method, &mut self.spans, raw) {
                    Ok(Some(head)) if head.status == StatusCode::SWITCHING_PROTOCOLS => {
                        return Err(HeadError::Protocol(wire::WireError(
                            "101 Switching Protocols to a request that asked for no upgrade".into(),
                        )));
                    }
                    Ok(Some(head)) if head.status.is_informational() => continue,
                    Ok(Some(head)) => return Ok(head),
                    Ok(None) => {}
                    Err(e) => return Err(HeadError::Protocol(e)),
                }
            }
            match std::future::poll_fn(|cx| self.poll_fill(cx)).await {
                Ok(0) => {
                    let e = std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        if received {
                            "connection closed in the middle of the response head"
                        } else {
                            "connection closed before a response"
                        },
                    );
                    return Err(if received {
                        HeadError::Io(e)
                    } else {
                        HeadError::Closed(e)
                    });
                }
                Ok(_) => received = true,
                Err(e) if received => return Err(HeadError::Io(e)),
                Err(e) => return Err(HeadError::Closed(e)),
            }
        }
    }
}

/// A response body from upstream: read by attache's codec, from a pooled hyper connection,
/// or from hyper-util's client (HTTP/2 clusters, upgrades).
pub enum UpstreamBody {
    Wire(WireBody),
    Pooled(PooledBody),
    Client(Incoming),
}

impl UpstreamBody {
    /// The header lines to write through, if the response was read with them (its header
    /// map is then empty).
    pub fn take_raw_fields(&mut self) -> Option<wire::RawFields> {
        match self {
            UpstreamBody::Wire(w) => w.raw.take(),
            _ => None,
        }
    }
}

/// Where a wire response body is.
enum BodyState {
    Length(u64),
    Chunked(Chunked),
    Close,
    Done,
}

/// The body of a response read with attache's codec: polling it reads the connection, and
/// the connection returns to the pool when the body is done.
pub struct WireBody {
    /// None once the connection failed (it is closed, not pooled).
    conn: Option<Box<WireConn>>,
    pool: Arc<Pool>,
    addr: SocketAddr,
    state: BodyState,
    keep_alive: bool,
    /// The response's header lines, when they are to be written through (see
    /// [`wire::RawFields`]); taken by the server that writes the response.
    raw: Option<wire::RawFields>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl WireBody {
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            if let BodyState::Done = self.state {
                return Poll::Ready(None);
            }
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            match &mut self.state {
                BodyState::Done => {}
                BodyState::Length(left) => {
                    if !conn.rbuf.is_empty() {
                        let n = (conn.rbuf.len() as u64).min(*left);
                        let data = conn.rbuf.split_to(n as usize).freeze();
                        *left -= n;
                        if *left == 0 {
                            self.state = BodyState::Done;
                        }
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                BodyState::Chunked(chunked) => match chunked.decode(&mut conn.rbuf) {
                    Ok(Decoded::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                    Ok(Decoded::Trailers(t)) => {
                        self.state = BodyState::Done;
                        return Poll::Ready(Some(Ok(Frame::trailers(t))));
                    }
                    Ok(Decoded::End) => {
                        self.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    Ok(Decoded::NeedMore) => {}
                    Err(e) => {
                        self.conn = None;
                        return Poll::Ready(Some(Err(e.into())));
                    }
                },
                BodyState::Close => {
                    if !conn.rbuf.is_empty() {
                        let data = conn.rbuf.split().freeze();
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
            }
            match std::task::ready!(conn.poll_fill(cx)) {
                Ok(0) => {
                    self.conn = None;
                    if let BodyState::Close = self.state {
                        self.state = BodyState::Done;
                        return Poll::Ready(None);
                    }
                    return Poll::Ready(Some(Err(
                        "the upstream closed the connection in the middle of the body".into(),
                    )));
                }
                Ok(_) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }
}

impl Drop for WireBody {
    fn drop(&mut self) {
        // Only a connection whose response was read to the end, with nothing after it, can
        // carry another request.
        if !self.keep_alive || !matches!(self.state, BodyState::Done) {
            return;
        }
        if let Some(mut conn) = self.conn.take() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            // The timer forgets the request's task (it would otherwise keep the task's memory
            // alive, and wake it, when the deadline passes with the connection idle).
            if let Some(t) = conn.timer.as_mut() {
                let _ = t.as_mut().poll(&mut cx);
            }
            let mut conn = Conn::Wire(conn);
            if conn.reusable(&mut cx) {
                self.pool.put(self.addr, conn);
            }
        }
    }
}

/// The body of a response on a pooled hyper connection: polling it drives the connection,
/// and the connection returns to the pool when the body is done.
pub struct PooledBody {
    body: Incoming,
    conn: Option<HyperConn>,
    pool: Arc<Pool>,
    addr: SocketAddr,
    /// The body has returned its end.
    ended: bool,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        let Some(conn) = self.conn.take() else {
            return;
        };
        // Only a connection whose response was read to the end can carry another request.
        if self.ended || self.body.is_end_stream() {
            let mut conn = Conn::Hyper(conn);
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if conn.reusable(&mut cx) {
                self.pool.put(self.addr, conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            UpstreamBody::Wire(w) => w.poll_frame(cx),
            UpstreamBody::Client(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            UpstreamBody::Pooled(p) => {
                if let Some(conn) = &mut p.conn {
                    conn.drive(cx);
                }
                let polled = Pin::new(&mut p.body).poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    p.ended = true;
                }
                polled.map_err(Into::into)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Wire(w) => matches!(w.state, BodyState::Done),
            UpstreamBody::Client(body) => body.is_end_stream(),
            UpstreamBody::Pooled(p) => p.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Wire(w) => match w.state {
                BodyState::Done => SizeHint::with_exact(0),
                BodyState::Length(n) => SizeHint::with_exact(n),
                _ => SizeHint::default(),
            },
            UpstreamBody::Client(body) => body.size_hint(),
            UpstreamBody::Pooled(p) => p.body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection to a peer on loopback, and the peer's end.
    async fn pair(read_size: usize) -> (WireConn, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let io = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (peer, _) = listener.accept().await.unwrap();
        let conn = WireConn {
            io,
            rbuf: BytesMut::new(),
            wbuf: Vec::new(),
            spans: Vec::new(),
            read_size,
            timer: None,
        };
        (conn, peer)
    }

    async fn fill(conn: &mut WireConn) -> usize {
        std::future::poll_fn(|cx| conn.poll_fill(cx)).await.unwrap()
    }

    #[tokio::test]
    async fn reads_that_fill_their_room_grow_up_to_the_cap() {
        let (mut conn, mut peer) = pair(READ_CHUNK).await;
        // On loopback a write is in the reader's queue when write_all returns.
        peer.write_all(&[7u8; 56 * 1024]).await.unwrap();
        let mut reads = Vec::new();
        while reads.iter().sum::<usize>() < 56 * 1024 {
            reads.push(fill(&mut conn).await);
            let _ = conn.rbuf.split();
        }
        assert_eq!(
            reads,
            [READ_CHUNK, 2 * READ_CHUNK, 8 * 1024],
            "each full read doubles"
        );
        assert_eq!(conn.read_size, READ_CHUNK_MAX);

        // Small reads leave it as it is; it never passes the cap.
        peer.write_all(b"small").await.unwrap();
        assert_eq!(fill(&mut conn).await, 5);
        assert_eq!(conn.read_size, READ_CHUNK_MAX);
    }

    #[tokio::test]
    async fn a_grown_connection_reads_a_large_response_at_once() {
        let (mut conn, mut peer) = pair(READ_CHUNK_MAX).await;
        peer.write_all(&[7u8; 40 * 1024]).await.unwrap();
        assert_eq!(fill(&mut conn).await, 40 * 1024);
    }
}
