//! Fault controls: every demo service listens through a [`Switch`], a listener whose mode can be
//! changed while it runs, and [`Faults`] answers `POST {admin}/demo/fault/{target}/{mode}` on
//! attache's admin listener (through [`Shared::admin_hook`](crate::state::Shared)).
//!
//! The faults are real, not simulated in attache: `down` closes the listening socket and every
//! open connection (new connections are refused; `ok` binds the same port again), `hang` accepts
//! and reads requests but never answers (also on keep-alive connections that were already open),
//! `slow` answers after [`SLOW_DELAY`], `errors` answers 500.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::web::{self, Handler};
use crate::state::AdminHook;

/// How long a `slow` service waits before answering: longer than the demo's route timeouts.
pub const SLOW_DELAY: Duration = Duration::from_millis(1500);

/// The largest request body a demo service reads.
const MAX_BODY: usize = 1 << 20;

/// What a service does with the requests it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Serves normally.
    Ok,
    /// The listening socket is closed: connections are refused.
    Down,
    /// Accepts and reads requests, never answers.
    Hang,
    /// Answers after [`SLOW_DELAY`].
    Slow,
    /// Answers 500 to everything.
    Errors,
}

impl Mode {
    /// Every mode, in the order the API lists them.
    pub const ALL: [Mode; 5] = [Mode::Ok, Mode::Down, Mode::Hang, Mode::Slow, Mode::Errors];

    /// The mode named `text` (`ok`, `down`, `hang`, `slow`, `errors`).
    pub fn parse(text: &str) -> Option<Mode> {
        Mode::ALL.into_iter().find(|m| m.name() == text)
    }

    /// The mode's name in the API.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Ok => "ok",
            Mode::Down => "down",
            Mode::Hang => "hang",
            Mode::Slow => "slow",
            Mode::Errors => "errors",
        }
    }
}

/// A service's listener with a fault mode.
pub struct Switch {
    name: String,
    addr: SocketAddr,
    handler: Handler,
    runtime: Handle,
    mode: watch::Sender<Mode>,
    /// The accept loop; `None` while the service is down.
    accept: tokio::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Switch {
    /// Serves `handler` on `listener` (already bound) on `runtime`, in mode `ok`.
    pub fn start(
        name: &str,
        listener: std::net::TcpListener,
        handler: Handler,
        runtime: &Handle,
    ) -> std::io::Result<Arc<Switch>> {
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (mode, _) = watch::channel(Mode::Ok);
        let task = spawn_accept(runtime, listener, handler.clone(), mode.subscribe());
        Ok(Arc::new(Switch {
            name: name.to_owned(),
            addr,
            handler,
            runtime: runtime.clone(),
            mode,
            accept: tokio::sync::Mutex::new(Some(task)),
        }))
    }

    /// The service's name (a fault target).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The address the service listens on (and binds again after `down`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        *self.mode.borrow()
    }

    /// Sets the mode. `down` returns once the socket and every connection are closed; leaving
    /// `down` binds the same address again and fails (staying down) if it is taken meanwhile.
    pub async fn set(&self, mode: Mode) -> std::io::Result<()> {
        let mut accept = self.accept.lock().await;
        let was = self.mode.send_replace(mode);
        if mode == Mode::Down {
            if let Some(task) = accept.take() {
                let _ = task.await;
            }
        } else if accept.is_none() {
            let bound = std::net::TcpListener::bind(self.addr).and_then(|l| {
                l.set_nonblocking(true)?;
                Ok(l)
            });
            match bound {
                Ok(listener) => {
                    *accept = Some(spawn_accept(
                        &self.runtime,
                        listener,
                        self.handler.clone(),
                        self.mode.subscribe(),
                    ));
                }
                Err(e) => {
                    self.mode.send_replace(Mode::Down);
                    return Err(e);
                }
            }
        }
        tracing::info!(service = %self.name, from = was.name(), to = mode.name(), "demo fault set");
        Ok(())
    }
}

fn spawn_accept(
    runtime: &Handle,
    listener: std::net::TcpListener,
    handler: Handler,
    mode: watch::Receiver<Mode>,
) -> JoinHandle<()> {
    runtime.spawn(async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => accept_loop(listener, handler, mode).await,
            Err(e) => tracing::error!(error = %e, "cannot register a demo listener"),
        }
    })
}

/// Accepts until the mode turns `down`, then closes every connection it accepted.
async fn accept_loop(listener: TcpListener, handler: Handler, mut mode: watch::Receiver<Mode>) {
    let per_connection = mode.clone();
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(serve_connection(stream, handler.clone(), per_connection.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: back off briefly rather than spin.
                    tracing::warn!(error = %e, "demo accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = until_down(&mut mode) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    drop(listener);
    connections.shutdown().await;
}

/// Resolves when the mode is `down` (or can no longer change).
async fn until_down(mode: &mut watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Down).await;
}

async fn serve_connection(stream: TcpStream, handler: Handler, mode: watch::Receiver<Mode>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let (handler, mode) = (handler.clone(), mode.clone());
        async move { Ok::<_, Infallible>(respond(req, handler, mode).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service)
        .await;
}

/// One request under the current mode (read when the request arrives, and again when a hang
/// ends).
async fn respond(
    req: Request<Incoming>,
    handler: Handler,
    mut mode: watch::Receiver<Mode>,
) -> Response<Full<Bytes>> {
    loop {
        let now = *mode.borrow_and_update();
        match now {
            Mode::Hang => {
                if mode.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            Mode::Slow => {
                tokio::time::sleep(SLOW_DELAY).await;
                break;
            }
            Mode::Errors => {
                return web::error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "injected-fault",
                    "this service is in `errors` mode (attache demo fault controls)",
                )
            }
            Mode::Ok | Mode::Down => break,
        }
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return web::error(StatusCode::BAD_REQUEST, "bad-body", e),
    };
    handler(Request::from_parts(parts, body)).await
}

/// The fault targets, by name, and the admin routes that control them.
pub struct Faults {
    targets: BTreeMap<String, Arc<Switch>>,
}

impl Faults {
    /// Controls for these services (each named by [`Switch::name`]).
    pub fn new(switches: impl IntoIterator<Item = Arc<Switch>>) -> Faults {
        Faults {
            targets: switches
                .into_iter()
                .map(|s| (s.name().to_owned(), s))
                .collect(),
        }
    }

    /// The admin hook: answers `/demo/faults` and `/demo/fault/...`, passes every other path
    /// to the built-in admin routes.
    pub fn hook(self: Arc<Self>) -> AdminHook {
        Arc::new(move |method, path, _body| {
            let faults = self.clone();
            Box::pin(async move { faults.answer(&method, &path).await })
        })
    }

    /// Every target and its mode: `{"targets": {"india": "ok", ...}}`.
    pub fn status(&self) -> serde_json::Value {
        let targets: serde_json::Map<String, serde_json::Value> = self
            .targets
            .iter()
            .map(|(name, s)| (name.clone(), s.mode().name().into()))
            .collect();
        serde_json::json!({ "targets": targets })
    }

    async fn answer(&self, method: &Method, path: &str) -> Option<Response<Full<Bytes>>> {
        if path == "/demo/faults" {
            return Some(match *method {
                Method::GET => web::json(StatusCode::OK, &self.status()),
                _ => not_allowed("GET"),
            });
        }
        let rest = path.strip_prefix("/demo/fault/")?;
        if method != Method::POST {
            return Some(not_allowed("POST"));
        }
        let known = || self.targets.keys().cloned().collect::<Vec<_>>().join(", ");
        let Some((target, mode)) = rest.split_once('/') else {
            return Some(web::error(
                StatusCode::NOT_FOUND,
                "unknown-fault",
                format!(
                    "use POST /demo/fault/{{target}}/{{mode}}; targets: {}",
                    known()
                ),
            ));
        };
        let Some(switch) = self.targets.get(target) else {
            return Some(web::error(
                StatusCode::NOT_FOUND,
                "unknown-target",
                format!("no demo service `{target}`; targets: {}", known()),
            ));
        };
        let Some(mode) = Mode::parse(mode) else {
            let modes: Vec<&str> = Mode::ALL.iter().map(|m| m.name()).collect();
            return Some(web::error(
                StatusCode::BAD_REQUEST,
                "unknown-mode",
                format!("no mode `{mode}`; modes: {}", modes.join(", ")),
            ));
        };
        Some(match switch.set(mode).await {
            Ok(()) => web::json(
                StatusCode::OK,
                &serde_json::json!({ "target": target, "mode": mode.name() }),
            ),
            Err(e) => web::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "rebind-failed",
                format!("{target} stays down: cannot bind {}: {e}", switch.addr()),
            ),
        })
    }
}

fn not_allowed(allow: &'static str) -> Response<Full<Bytes>> {
    let mut resp = web::error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        format!("use {allow}"),
    );
    resp.headers_mut()
        .insert(http::header::ALLOW, http::HeaderValue::from_static(allow));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_round_trip_by_name() {
        for m in Mode::ALL {
            assert_eq!(Mode::parse(m.name()), Some(m));
        }
        assert_eq!(Mode::parse("broken"), None);
        assert_eq!(Mode::parse("OK"), None);
    }

    fn echo() -> Handler {
        Arc::new(|_req| Box::pin(async { web::respond(StatusCode::OK, "text/plain", "hi") }))
    }

    async fn get(addr: SocketAddr) -> Result<u16, String> {
        let client = web::Client::new(Duration::from_millis(300));
        client
            .get(&format!("http://{addr}/"))
            .await
            .map(|r| r.status.as_u16())
            .map_err(|e| e.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn down_refuses_and_ok_binds_the_same_port_again() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let switch = Switch::start("t", listener, echo(), &Handle::current()).unwrap();
        let addr = switch.addr();
        assert_eq!(get(addr).await, Ok(200));
        switch.set(Mode::Down).await.unwrap();
        let refused = tokio::net::TcpStream::connect(addr).await;
        assert!(refused.is_err(), "connected while down");
        switch.set(Mode::Errors).await.unwrap();
        assert_eq!(switch.addr(), addr);
        assert_eq!(get(addr).await, Ok(500));
        switch.set(Mode::Hang).await.unwrap();
        assert!(get(addr).await.unwrap_err().contains("no answer"));
        switch.set(Mode::Ok).await.unwrap();
        assert_eq!(get(addr).await, Ok(200));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hook_answers_its_routes_only() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let switch = Switch::start("india", listener, echo(), &Handle::current()).unwrap();
        let faults = Arc::new(Faults::new([switch.clone()]));
        let hook = faults.clone().hook();
        let status = |r: Option<Response<Full<Bytes>>>| r.map(|r| r.status().as_u16());
        assert_eq!(
            status(hook(Method::GET, "/ready".into(), Bytes::new()).await),
            None
        );
        assert_eq!(
            status(
                hook(
                    Method::POST,
                    "/demo/fault/nowhere/down".into(),
                    Bytes::new()
                )
                .await
            ),
            Some(404)
        );
        assert_eq!(
            status(hook(Method::POST, "/demo/fault/india/melt".into(), Bytes::new()).await),
            Some(400)
        );
        assert_eq!(
            status(hook(Method::GET, "/demo/fault/india/down".into(), Bytes::new()).await),
            Some(405)
        );
        assert_eq!(
            status(hook(Method::POST, "/demo/fault/india/slow".into(), Bytes::new()).await),
            Some(200)
        );
        assert_eq!(switch.mode(), Mode::Slow);
        assert_eq!(
            faults.status(),
            serde_json::json!({"targets": {"india": "slow"}})
        );
    }
}
