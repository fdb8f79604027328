//! HTTP/1.1 upstream connections driven from the request's own task, pooled per worker.
//!
//! hyper-util's pooled client runs every upstream connection as a task of its own: a request
//! crosses a channel to that task and its response crosses a oneshot back, two extra task
//! wake-ups and a shared pool per request. Here the request's task polls the connection
//! itself, first while waiting for the response head, then from the response body
//! ([`PooledBody`]), and the connection goes back to this worker's [`Pool`] when the body is
//! done. hyper's own `client::conn::http1` still does the HTTP/1.1 codec; only the pool and
//! the driving are ours, because no crate drives a pooled connection from the caller's task.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::ReqBody;

/// The connection future (with upgrades: hyper hands the socket to a 101's upgrade). Boxed
/// because hyper doesn't name its type; one allocation per connection, not per request.
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// One upstream connection: the request sender and the connection future that does its I/O.
struct Conn {
    sender: http1::SendRequest<ReqBody>,
    driver: Driver,
    /// The driver future has completed (connection closed or upgraded): never poll it again.
    done: bool,
}

impl Conn {
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
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Connect(e) => write!(f, "connect: {e}"),
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

    /// Sends `req` (origin-form URI) to `addr` on a pooled connection or a new one.
    pub async fn send(
        self: &Arc<Self>,
        addr: SocketAddr,
        req: Request<ReqBody>,
    ) -> Result<Response<UpstreamBody>, SendError> {
        let mut req = req;
        loop {
            let (mut conn, reused) = match self.checkout(addr).await {
                Some(c) => (c, true),
                None => (self.connect(addr).await?, false),
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

    /// An idle connection to `addr` that is still open, if any.
    async fn checkout(&self, addr: SocketAddr) -> Option<Conn> {
        loop {
            let mut conn = self.take(addr)?;
            if std::future::poll_fn(|cx| Poll::Ready(conn.reusable(cx))).await {
                return Some(conn);
            }
        }
    }

    /// The most recently pooled connection to `addr` (the worker's sweep drops expired ones;
    /// one that expired since is dropped here).
    fn take(&self, addr: SocketAddr) -> Option<Conn> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let at = idle.iter().rposition(|i| i.addr == addr)?;
            let i = idle.swap_remove(at);
            if i.since.elapsed() < self.idle_timeout {
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

    async fn connect(&self, addr: SocketAddr) -> Result<Conn, SendError> {
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
        let (sender, driver) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Hyper)?;
        Ok(Conn {
            sender,
            driver: Box::pin(driver.with_upgrades()),
            done: false,
        })
    }
}

/// A response body from upstream: from a pooled HTTP/1.1 connection, or from hyper-util's
/// client (HTTP/2 clusters, upgrades).
pub enum UpstreamBody {
    Pooled(PooledBody),
    Client(Incoming),
}

/// The body of a response on a pooled connection: polling it drives the connection, and the
/// connection returns to the pool when the body is done.
pub struct PooledBody {
    body: Incoming,
    conn: Option<Conn>,
    pool: Arc<Pool>,
    addr: SocketAddr,
    /// The body has returned its end.
    ended: bool,
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // Only a connection whose response was read to the end can carry another request.
        if self.ended || self.body.is_end_stream() {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            if conn.reusable(&mut cx) {
                self.pool.put(self.addr, conn);
            }
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpstreamBody::Client(body) => Pin::new(body).poll_frame(cx),
            UpstreamBody::Pooled(p) => {
                if let Some(conn) = &mut p.conn {
                    conn.drive(cx);
                }
                let polled = Pin::new(&mut p.body).poll_frame(cx);
                if let Poll::Ready(None) = polled {
                    p.ended = true;
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Client(body) => body.is_end_stream(),
            UpstreamBody::Pooled(p) => p.body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Client(body) => body.size_hint(),
            UpstreamBody::Pooled(p) => p.body.size_hint(),
        }
    }
}
