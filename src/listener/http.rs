//! The HTTP accept loop of one listener on one worker, and the life of each client connection:
//! protocol detection (HTTP/1.1, or h2c with prior knowledge), serving, hand-overs and draining.
//!
//! **HTTP/1.1** is served by attache's own server side ([`super::h1`]) for the common case, a
//! request without a body or with a small one, and by hyper's server for everything else
//! (chunked or large bodies, upgrades, `expect`, HTTP/1.0, heads that do not parse).
//! [`super::h1`] stops at the first request it does not take, leaving it unread in the
//! buffer; a hyper connection starts on those bytes and serves until the connection is idle
//! again after a bodiless request, then hands the socket back.
//! The hand-back: once that response is complete, [`ClientIo`] answers hyper's next read that
//! would block with end-of-file, which hyper treats as a clean close between requests, and it
//! skips the socket shutdown that would follow (hyper has no other way to give a connection
//! back). An idle connection on a listener with more than `park_idle_above` connections keeps
//! no buffers ("parked"), only its socket.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::Request;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::h1;
use crate::config::Listener;
use crate::proxy::{self, ClientBody, ConnCtx};
use crate::state::Shared;
use crate::telemetry::ListenerStats;

/// The client preface of HTTP/2 with prior knowledge (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The connection builders of a listener.
pub struct Builders {
    h1: http1::Builder,
    h2: http2::Builder<TokioExecutor>,
    /// How long an idle HTTP/1.1 connection may wait for its next request.
    idle_timeout: Duration,
    limits: h1::Limits,
}

/// The connection builders for a listener: HTTP/1.1 and h2c (prior knowledge) on one port.
pub fn builders(listener: &Listener) -> Builders {
    // No hyper header-read timer: it costs a boxed timer armed and disarmed per request.
    // `serve_draining` checks the same deadline with one lazy timer per connection.
    let mut h1 = http1::Builder::new();
    h1.header_read_timeout(None)
        .max_buf_size(listener.max_header_bytes)
        .keep_alive(true);
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_header_list_size(listener.max_header_bytes as u32);
    Builders {
        h1,
        h2,
        idle_timeout: listener.header_read_timeout,
        limits: h1::Limits {
            max_head: listener.max_header_bytes,
            park_above: listener.park_idle_above,
        },
    }
}

/// Lets a worker's client connections finish their requests, then waits for all of them.
pub struct Drain(watch::Sender<bool>);

impl Default for Drain {
    fn default() -> Drain {
        Drain(watch::channel(false).0)
    }
}

impl Drain {
    fn watcher(&self) -> watch::Receiver<bool> {
        self.0.subscribe()
    }

    /// Asks every connection to finish (idle ones close at once) and waits until all have.
    pub async fn shutdown(self) {
        self.0.send_replace(true);
        self.0.closed().await;
    }
}

/// Accepts connections until `shutdown` turns true; each connection watches `drain`, so that
/// a drain lets its in-flight requests finish.
pub async fn serve(
    socket: TcpListener,
    index: usize,
    worker: usize,
    shared: Arc<Shared>,
    drain: &Drain,
    mut shutdown: watch::Receiver<bool>,
) {
    let listener = shared.snapshot.load().config.listeners[index].clone();
    let builders = Arc::new(builders(&listener));
    let stats = shared.snapshot.load().listeners[index].stats.clone();
    loop {
        let (stream, client) = tokio::select! {
            accepted = socket.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let open = shared.connections[index].fetch_add(1, Ordering::Relaxed) + 1;
        if open > listener.max_connections {
            shared.connections[index].fetch_sub(1, Ordering::Relaxed);
            stats.refused_connections.inc();
            drop(stream);
            continue;
        }
        stats.connections.inc();
        stats.active_connections.inc();
        let _ = stream.set_nodelay(true);
        let ctx = Arc::new(ConnCtx::new(shared.clone(), index, worker, client));
        let shared = shared.clone();
        let stats = stats.clone();
        let builders = builders.clone();
        let drain = drain.watcher();
        tokio::spawn(async move {
            connection(stream, ctx, builders, drain, &stats).await;
            shared.connections[index].fetch_sub(1, Ordering::Relaxed);
            stats.active_connections.dec();
        });
    }
}

/// One client connection, from accept to close.
async fn connection(
    mut stream: TcpStream,
    ctx: Arc<ConnCtx>,
    builders: Arc<Builders>,
    mut drain: watch::Receiver<bool>,
    stats: &ListenerStats,
) {
    let Some(mut buf) = sniff(&mut stream, &builders, &mut drain).await else {
        return;
    };
    if buf.starts_with(H2_PREFACE) {
        let io = TokioIo::new(ClientIo::new(stream, buf.freeze(), ctx.clone(), false));
        let service = service_fn(move |req: Request<Incoming>| {
            proxy::handle_hyper(req.map(ClientBody::Hyper), ctx.clone())
        });
        // Boxed: inline, hyper's HTTP/2 connection would size every connection's task.
        let mut conn = Box::pin(builders.h2.serve_connection(io, service));
        let result = serve_draining(&mut conn, &drain, |c| c.as_mut().graceful_shutdown(), None);
        if let Some(Err(e)) = result.await {
            tracing::debug!(error = %e, "client connection ended with an error");
        }
        return;
    }
    let idle = Some((&*ctx, builders.idle_timeout));
    loop {
        // attache's own HTTP/1.1 server, until a request needs hyper's.
        let draining = AtomicBool::new(false);
        let served = {
            let mut own = std::pin::pin!(h1::serve(
                &mut stream,
                &mut buf,
                &ctx,
                &builders.limits,
                &draining,
                stats
            ));
            let graceful = |_: &mut _| draining.store(true, Ordering::Relaxed);
            serve_draining(&mut own, &drain, graceful, idle).await
        };
        match served {
            None => {
                tracing::debug!("client connection closed: no request head within the timeout");
                return;
            }
            Some(h1::Served::Close) => return,
            Some(h1::Served::Hyper) => {}
        }

        // hyper's server, from the first byte of the request attache left to it, until the
        // connection is idle after a bodiless request.
        ctx.park.store(proxy::PARK_BUSY, Ordering::Relaxed);
        let io = TokioIo::new(ClientIo::new(
            stream,
            buf.split().freeze(),
            ctx.clone(),
            true,
        ));
        let service = {
            let ctx = ctx.clone();
            service_fn(move |req: Request<Incoming>| {
                // hyper calls this as soon as it has read a head, before it reads again.
                ctx.park.store(proxy::PARK_BUSY, Ordering::Relaxed);
                proxy::handle_hyper(req.map(ClientBody::Hyper), ctx.clone())
            })
        };
        // Boxed so that the connection's task doesn't keep room for hyper's state.
        let mut conn = Box::new(builders.h1.serve_connection(io, service).with_upgrades());
        let result = serve_draining(
            &mut *conn,
            &drain,
            |c| Pin::new(c).graceful_shutdown(),
            idle,
        );
        let Some(result) = result.await else {
            tracing::debug!("client connection closed: no request head within the timeout");
            return;
        };
        if ctx.park.load(Ordering::Relaxed) != proxy::PARK_PARKED {
            if let Err(e) = result {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
            return;
        }
        // Handed back: hyper stopped at our end-of-file between two requests. An error here
        // is hyper finding a partly read head (pipelining); the bytes are in `read_buf`.
        let Some(parts) = conn.into_parts() else {
            return; // upgraded
        };
        let io = parts.io.into_inner();
        stream = io.stream;
        buf.extend_from_slice(&parts.read_buf);
    }
}

/// Runs a hyper connection to its end; when the worker drains, asks it to finish what is in
/// flight and close. The drain's change future is polled once, to leave this task's waker
/// with the channel; after that each wake-up reads only the channel's version (re-polling the
/// future would take the channel's lock on every wake-up of a busy connection).
///
/// With `idle` (HTTP/1.1), the connection also ends, returning `None`, when no request head
/// has arrived within the timeout since it last went idle (keep-alive timeout and slow-head
/// cut-off at once). One timer per connection, checked lazily: when it fires, it is moved to
/// the current deadline unless that has passed, so requests never touch it.
async fn serve_draining<C, G>(
    conn: &mut C,
    drain: &watch::Receiver<bool>,
    graceful: G,
    idle: Option<(&ConnCtx, Duration)>,
) -> Option<C::Output>
where
    C: Future + Unpin,
    G: Fn(&mut C),
{
    let mut watcher = drain.clone();
    let mut changed = std::pin::pin!(watcher.changed());
    let (mut registered, mut draining) = (false, false);
    // HTTP/1.1 only: HTTP/2 streams bring their own deadlines.
    let mut timer = std::pin::pin!(idle.map(|(_, timeout)| tokio::time::sleep(timeout)));
    let mut timer_polled = false;
    std::future::poll_fn(|cx| {
        if !draining {
            draining = if registered {
                drain.has_changed().unwrap_or(true)
            } else {
                registered = true;
                changed.as_mut().poll(cx).is_ready()
            };
            if draining {
                graceful(&mut *conn);
            }
        }
        if let (Some((ctx, timeout)), Some(mut timer)) = (idle, timer.as_mut().as_pin_mut()) {
            if !timer_polled {
                // Registers the timer with this task; later wake-ups only read its state.
                timer_polled = true;
                let _ = timer.as_mut().poll(cx);
            }
            while timer.is_elapsed() {
                let now = Instant::now();
                match ctx.idle_deadline(timeout) {
                    Some(deadline) if deadline <= now => return Poll::Ready(None),
                    Some(deadline) => timer.as_mut().reset(deadline.into()),
                    None => timer.as_mut().reset((now + timeout).into()),
                }
                let _ = timer.as_mut().poll(cx); // registers the moved timer
            }
        }
        Pin::new(&mut *conn).poll(cx).map(Some)
    })
    .await
}

/// Reads the first bytes of a connection, enough to tell h2c's preface from HTTP/1.1.
/// `None` when the client went away, stayed silent too long, or the worker drains.
async fn sniff(
    stream: &mut TcpStream,
    builders: &Builders,
    drain: &mut watch::Receiver<bool>,
) -> Option<BytesMut> {
    if !wait_readable(stream, builders, drain).await {
        return None;
    }
    // Allocated once the client has sent: room for a whole head, read in one go.
    let mut buf = BytesMut::with_capacity(4096);
    let mut ready = true;
    while buf.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&buf) {
        if !ready && !wait_readable(stream, builders, drain).await {
            return None;
        }
        ready = false;
        match stream.try_read_buf(&mut buf) {
            Ok(0) => return None,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return None,
        }
    }
    Some(buf)
}

/// Waits until the client sends; false when it stays silent for the idle timeout, when the
/// worker drains, or on a socket error.
async fn wait_readable(
    stream: &TcpStream,
    builders: &Builders,
    drain: &mut watch::Receiver<bool>,
) -> bool {
    if *drain.borrow() {
        return false;
    }
    tokio::select! {
        r = stream.readable() => r.is_ok(),
        _ = tokio::time::sleep(builders.idle_timeout) => false,
        _ = drain.changed() => false,
    }
}

/// The client socket as hyper sees it: bytes read ahead first, then the socket; once the
/// current response is complete, a read that would block becomes end-of-file (parking).
struct ClientIo {
    stream: TcpStream,
    prefix: Bytes,
    ctx: Arc<ConnCtx>,
    parkable: bool,
}

impl ClientIo {
    fn new(stream: TcpStream, prefix: Bytes, ctx: Arc<ConnCtx>, parkable: bool) -> ClientIo {
        ClientIo {
            stream,
            prefix,
            ctx,
            parkable,
        }
    }

    fn parked(&self) -> bool {
        self.parkable && self.ctx.park.load(Ordering::Relaxed) == proxy::PARK_PARKED
    }
}

impl AsyncRead for ClientIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        match Pin::new(&mut this.stream).poll_read(cx, buf) {
            Poll::Pending
                if this.parkable
                    && this
                        .ctx
                        .park
                        .compare_exchange(
                            proxy::PARK_ARMED,
                            proxy::PARK_PARKED,
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        )
                        .is_ok() =>
            {
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                // Busy: if the response completes after this read (hyper reads ahead while it
                // writes), the completion wakes this task to read again, and park.
                if this.parkable {
                    this.ctx.park_waker.register(cx.waker());
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl AsyncWrite for ClientIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.parked() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size<F: std::future::Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }

    /// A parked connection is its task: keep hyper's connection states (HTTP/2's is over 1.5
    /// KiB) out of it, boxed, so that 10,000 idle clients stay small.
    #[test]
    fn a_connection_task_stays_small() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = l.local_addr().unwrap();
            let s = TcpStream::connect(addr).await.unwrap();
            let yaml = "admin: { address: \"127.0.0.1:0\" }\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ { cluster: a } ]\nclusters:\n  a: { endpoints: [\"127.0.0.1:1\"] }\n";
            let cfg = crate::config::Config::parse(yaml, std::path::Path::new("x.yaml")).unwrap();
            let b = Arc::new(builders(&cfg.listeners[0]));
            let shared = Shared::new(cfg, "x.yaml".into(), 1, crate::telemetry::AccessLog::Off);
            let stats = shared.snapshot.load().listeners[0].stats.clone();
            let ctx = Arc::new(ConnCtx::new(shared.clone(), 0, 0, addr));
            let drain = Drain::default();
            let f = connection(s, ctx, b, drain.watcher(), &stats);
            assert!(size(&f) < 1024, "connection future: {} bytes", size(&f));
        });
    }
}
