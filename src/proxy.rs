//! The HTTP request path, top to bottom in [`forward`]: route, destination, endpoint, upstream
//! request, send, response. Each step is a line; the decisions are pure functions from
//! `route` and `balance`, the I/O happens here.
//!
//! Accounting (metrics, access log, in-flight counts) lives in a [`Completion`] that travels
//! with the response body and records when the body ends or is dropped, so durations and byte
//! counts include the body, and nothing is missed on any exit path.

use std::borrow::Cow;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Either, Full};

use crate::upstream::h1::UpstreamBody;
use hyper_util::rt::TokioIo;

use crate::balance::stable_hash;
use crate::config::ShardId;
use crate::config::{Balance, Destination, Forwarded, HeaderOps, ListenerKind, Route};
use crate::error::ProxyError;
use crate::resilience::Admit;
use crate::route::{self, Fields, HeadLines, RequestHead, RouteDecision};
use crate::shard;
use crate::state::{Shared, Snapshot};
use crate::telemetry::access_log::{now_rfc3339, LogRecord};
use crate::telemetry::metrics::class_index;
use crate::upstream::{Endpoint, InFlight, ReqBody};

/// Per-connection context, shared by the requests of one client connection.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: usize,
    pub worker: usize,
    pub client: SocketAddr,
    /// The client IP as a header value, made once per connection.
    pub client_ip: HeaderValue,
    /// Whether hyper may hand the connection back to attache's HTTP/1.1 server (see
    /// `listener::http`): `PARK_BUSY` while a request is in progress, `PARK_ARMED` once a
    /// bodiless request's response is complete, `PARK_PARKED` once the listener has answered
    /// hyper's idle read with end-of-file.
    pub park: AtomicU8,
    /// The connection's task, woken when parking is armed after hyper's last read.
    pub park_waker: futures_util::task::AtomicWaker,
    /// When the connection was accepted: the origin of `idle_since_ms`.
    epoch: Instant,
    /// Requests of this connection in progress (head read, response not yet complete).
    in_flight: AtomicU32,
    /// Milliseconds after `epoch` when the connection last had nothing in progress.
    idle_since_ms: AtomicU64,
}

pub const PARK_BUSY: u8 = 0;
pub const PARK_ARMED: u8 = 1;
pub const PARK_PARKED: u8 = 2;

impl ConnCtx {
    pub fn new(shared: Arc<Shared>, listener: usize, worker: usize, client: SocketAddr) -> ConnCtx {
        let client_ip = HeaderValue::from_str(&client.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        ConnCtx {
            shared,
            listener,
            worker,
            client,
            client_ip,
            park: AtomicU8::new(PARK_BUSY),
            park_waker: futures_util::task::AtomicWaker::new(),
            epoch: Instant::now(),
            in_flight: AtomicU32::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// Notes that the connection has nothing in progress as of `now`.
    pub fn idle_from(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
        self.idle_since_ms.store(ms, Ordering::Relaxed);
    }

    /// When the wait for the next request head runs out (`timeout` after the connection last
    /// went idle); `None` while a request is in progress.
    pub fn idle_deadline(&self, timeout: std::time::Duration) -> Option<Instant> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let since = std::time::Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed));
        Some(self.epoch + since + timeout)
    }
}

/// A request body from the client: none or a small one read whole (what attache's own
/// HTTP/1.1 server passes on), or hyper's stream.
pub enum ClientBody {
    Empty,
    /// The whole body, until it has been polled out.
    Full(Option<Bytes>),
    Hyper(hyper::body::Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Full(b) => b.is_none(),
            ClientBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ClientBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// [`handle`] for a request from hyper's server (no head lines): a future without a
/// lifetime parameter. (Through `handle`'s own, rustc fails to prove the connection's future
/// `Send`: "implementation of `Send` is not general enough".)
pub fn handle_hyper(
    req: Request<ClientBody>,
    conn: Arc<ConnCtx>,
) -> impl std::future::Future<Output = Result<Response<ProxyBody>, Infallible>> + Send + 'static {
    handle(req, None, conn)
}

/// Handles one request: never fails, every error becomes a response.
///
/// `lines`: the request's header fields as the lines of the head attache's own HTTP/1.1
/// server parsed (the request's header map is then empty); `None` for a request from hyper.
pub async fn handle(
    req: Request<ClientBody>,
    lines: Option<HeadLines<'_>>,
    conn: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snap = conn.shared.snapshot.load_full();
    let mut done = Completion::new(conn, snap, &req);
    let snap = done.snap.clone();
    match forward(req, lines, &snap, &mut done).await {
        Ok(resp) => {
            done.status = resp.status().as_u16();
            Ok(resp.map(|b| ProxyBody::new(b, done)))
        }
        Err(e) => {
            if let Some(resp) = fallback(&snap, &done, &e) {
                done.status = resp.status().as_u16();
                done.reason = Some(e.reason());
                return Ok(resp.map(|b| ProxyBody::new(Either::Right(b), done)));
            }
            done.status = e.status().as_u16();
            done.reason = Some(e.reason());
            done.conn.shared.metrics.local_reply(e.reason());
            if let (Some(c), crate::error::Side::Upstream) = (done.cluster, e.side()) {
                done.conn
                    .shared
                    .metrics
                    .upstream_error(&snap.config.clusters[c].name, e.reason());
            }
            tracing::debug!(error = %e, "request answered by attache");
            Ok(e.response().map(|b| ProxyBody::new(Either::Right(b), done)))
        }
    }
}

/// The route's static fallback, when its destination could not serve.
fn fallback(snap: &Snapshot, done: &Completion, e: &ProxyError) -> Option<Response<Full<Bytes>>> {
    if !e.unavailable() {
        return None;
    }
    let route = done.route?;
    let ListenerKind::Http { routes, .. } = &snap.config.listeners[done.conn.listener].kind else {
        return None;
    };
    let f = routes[route].fallback.as_ref()?;
    let mut resp = Response::new(Full::new(f.body.clone()));
    *resp.status_mut() = f.status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, f.content_type.clone());
    if let Ok(v) = HeaderValue::from_str(e.reason()) {
        resp.headers_mut().insert("x-attache-fallback", v);
    }
    Some(resp)
}

/// The body of a response on its way back: the upstream's, streamed, or one attache made
/// (errors, merged scatter-gather answers).
pub type RespInner = Either<UpstreamBody, Full<Bytes>>;

/// The request path. Returns the upstream's response or the error attache answers with.
async fn forward(
    req: Request<ClientBody>,
    lines: Option<HeadLines<'_>>,
    snap: &Snapshot,
    done: &mut Completion,
) -> Result<Response<RespInner>, ProxyError> {
    let conn = done.conn.clone();
    let listener = &snap.config.listeners[conn.listener];
    let ListenerKind::Http { routes, forwarded } = &listener.kind else {
        return Err(ProxyError::BadRequest("not an HTTP listener".into()));
    };

    // Decide the route: a pure function of the head and the snapshot.
    let head = RequestHead::new(req.method(), req.uri(), Fields::of(req.headers(), lines));
    let decision = route::select(routes, &head).ok_or_else(|| ProxyError::NoRoute {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    })?;
    let route = &routes[decision.route];
    done.route = Some(decision.route);
    snap.listeners[conn.listener].routes[decision.route]
        .requests
        .inc();
    rate_limit(
        snap,
        conn.listener,
        decision.route,
        route,
        &head,
        &decision,
        &conn,
    )?;

    // Decide the destination: one cluster, or the shards the key is allowed on.
    let plan;
    let targets = match route.destination {
        Destination::Cluster(cluster) => Targets::Cluster(cluster),
        Destination::Split(split_id) => {
            let split = &snap.config.splits[split_id];
            let choice = crate::split::choose(split, &head, &decision.captures, route);
            snap.split_stats[split_id][choice.variant].inc();
            done.variant = Some((split_id, choice.variant));
            Targets::Cluster(split.variants[choice.variant].cluster)
        }
        Destination::Shards(set_id) => {
            let set = &snap.config.shard_sets[set_id];
            if let Some(batch) = &route.batch {
                // Scatter-gather builds its sub-requests from a header map.
                let mut req = req;
                if let Some(lines) = lines {
                    *req.headers_mut() = lines.to_map()?;
                }
                // Boxed: a large, rare future that should not size every connection's state.
                let resp = Box::pin(shard::scatter::gather(
                    req, snap, set_id, route, batch, forwarded, &conn,
                ))
                .await?;
                return Ok(resp.map(Either::Right));
            }
            let dir = snap.directory_of(set);
            plan = match shard::plan_now(set, dir, &head, &decision.captures, route) {
                Some(p) => p,
                // Boxed: the lookup's future is large, and a cache miss is rare.
                None => Box::pin(shard::plan(set, dir, &head, &decision.captures, route)).await,
            }
            .map_err(|r| ProxyError::from_refusal(r, &set.key.to_string()))?;
            done.region = plan.region.clone();
            Targets::Shards {
                set: set_id,
                plan: &plan,
            }
        }
    };
    // Consistent-hash keys of the first few target clusters, on the stack.
    let mut keys = [(usize::MAX, None); MAX_KEYED_TARGETS];
    for (slot, c) in keys.iter_mut().zip(targets.clusters(snap)) {
        *slot = (
            c,
            hash_key(&snap.clusters[c].config.balance, &head, &decision, route),
        );
    }

    // Act: tries, retries and failover, within the targets only.
    let resp = execute(
        req, lines, snap, route, forwarded, &conn, done, targets, &keys,
    )
    .await?;
    Ok(resp.map(Either::Left))
}

/// Target clusters whose consistent-hash key is computed up front (later failover targets,
/// rare, balance without a key).
const MAX_KEYED_TARGETS: usize = 4;

/// Where a request may go.
#[derive(Clone, Copy)]
enum Targets<'p> {
    Cluster(usize),
    /// The allowed shards of a set, in order: the residency guarantee.
    Shards {
        set: usize,
        plan: &'p shard::Plan,
    },
}

impl Targets<'_> {
    fn clusters<'s>(&'s self, snap: &'s Snapshot) -> impl Iterator<Item = usize> + 's {
        let (one, many): (Option<usize>, &[ShardId]) = match self {
            Targets::Cluster(c) => (Some(*c), &[]),
            Targets::Shards { plan, .. } => (None, &plan.allowed),
        };
        let set = match self {
            Targets::Shards { set, .. } => Some(&snap.config.shard_sets[*set]),
            Targets::Cluster(_) => None,
        };
        one.into_iter().chain(
            many.iter()
                .filter_map(move |&id| set.map(|s| s.shards[id].cluster)),
        )
    }
}

/// The route's rate limit, if any: 429 with `Retry-After` when over it.
fn rate_limit(
    snap: &Snapshot,
    listener: usize,
    route_index: usize,
    route: &Route,
    head: &RequestHead<'_>,
    decision: &RouteDecision,
    conn: &ConnCtx,
) -> Result<(), ProxyError> {
    let (Some(limiter), Some(policy)) = (
        &snap.rate_limiters[listener][route_index],
        &route.rate_limit,
    ) else {
        return Ok(());
    };
    // A keyed limit with no key in the request shares one bucket ("" key).
    let key = policy
        .per
        .as_ref()
        .map(|on| route::key_value(on, head, &decision.captures, route).unwrap_or_default());
    limiter.check(key.as_deref()).map_err(|wait| {
        let listener = &snap.config.listeners[listener].name;
        conn.shared.metrics.rate_limited(listener, &route.name);
        ProxyError::RateLimited {
            retry_after_ms: wait.as_millis() as u64,
        }
    })
}

/// A request body as kept for tries: streamed once, or buffered for replays.
enum TryBody {
    Stream(Option<ClientBody>),
    Replay(Bytes),
}

/// Runs the tries of one request: target choice (first available allowed shard), cluster
/// breaker, concurrency limit, endpoint choice, the try itself (hedged when configured), and
/// the retry decision (policy, budget, deadline). Never leaves the targets.
#[allow(clippy::too_many_arguments)]
async fn execute(
    req: Request<ClientBody>,
    mut lines: Option<HeadLines<'_>>,
    snap: &Snapshot,
    route: &Route,
    forwarded: &Forwarded,
    conn: &ConnCtx,
    done: &mut Completion,
    targets: Targets<'_>,
    keys: &[(usize, Option<u64>)],
) -> Result<Response<UpstreamBody>, ProxyError> {
    // attache's own HTTP/1.1 server writes the response head: with no response header ops,
    // the upstream's header lines can go through as they are.
    let raw = !matches!(req.body(), ClientBody::Hyper(_)) && route.response_headers.is_empty();
    let started = done.start;
    let deadline = started + route.timeout;
    let first_cluster = match targets {
        Targets::Cluster(c) => c,
        Targets::Shards { set, plan } => plan
            .allowed
            .first()
            .map(|&id| snap.config.shard_sets[set].shards[id].cluster)
            .unwrap_or(0),
    };
    let cluster_config = &snap.clusters[first_cluster].config;
    let policy = route.retry.as_ref().unwrap_or(&cluster_config.retry);
    let per_try = route
        .per_try_timeout
        .or(cluster_config.per_try_timeout)
        .unwrap_or(route.timeout);
    let safe = policy.may_retry(req.method(), Fields::of(req.headers(), lines));
    let many_targets = matches!(targets, Targets::Shards { plan, .. } if plan.allowed.len() > 1);
    let replay_wanted = policy.attempts > 1 || route.hedge.is_some() || many_targets;

    // The body: an empty one or one already in memory replays for free; a small one of known
    // length is buffered when a replay may be wanted; anything else streams once.
    let (parts, incoming) = req.into_parts();
    let mut body = if let ClientBody::Full(Some(bytes)) = incoming {
        TryBody::Replay(bytes)
    } else if incoming.is_end_stream() {
        TryBody::Replay(Bytes::new())
    } else if replay_wanted
        && content_length(Fields::of(&parts.headers, lines))
            .is_some_and(|n| n <= policy.max_body as u64)
    {
        let bytes = http_body_util::Limited::new(incoming, policy.max_body)
            .collect()
            .await
            .map_err(|e| ProxyError::BadRequest(format!("reading the request body: {e}")))?
            .to_bytes();
        TryBody::Replay(bytes)
    } else {
        TryBody::Stream(Some(incoming))
    };
    // The client's head. Tries to HTTP/1.1 clusters with the body in memory encode their
    // request from it and leave it as it is, so retries and hedges need no copy; a try that
    // must own its request (HTTP/2, upgrades, a streamed body) takes it, and a copy is kept
    // first when a replay may follow.
    let upgrade = is_upgrade(parts.version, Fields::of(&parts.headers, lines))
        || parts.method == Method::CONNECT;
    let mut original = Some(parts);
    let mut replay_head: Option<(Method, Uri, Version, HeaderMap)> = None;

    let mut attempt_no = 0u32;
    let mut tried_shards: Vec<ShardId> = Vec::new();
    let mut avoid: Option<std::net::SocketAddr> = None;
    loop {
        attempt_no += 1;
        done.attempts = attempt_no;
        // Target: the cluster, or the first available allowed shard not yet given up on.
        let (cluster_id, shard_id) = match targets {
            Targets::Cluster(c) => (c, None),
            Targets::Shards { set, plan } => {
                let s = &snap.config.shard_sets[set];
                let available = |id: ShardId| snap.clusters[s.shards[id].cluster].available();
                match shard::first_available(&plan.allowed, &tried_shards, available) {
                    Some(id) => (s.shards[id].cluster, Some(id)),
                    None => return Err(shard_unavailable(snap, set, plan, None, conn)),
                }
            }
        };
        let cluster = &snap.clusters[cluster_id];
        done.cluster = Some(cluster_id);
        if let (Targets::Shards { set, .. }, Some(id)) = (targets, shard_id) {
            done.shard = Some((set, id));
        }
        let key = keys.iter().find(|k| k.0 == cluster_id).and_then(|k| k.1);

        // The cluster's breaker and concurrency limit.
        let admit = match &cluster.breaker {
            None => Admit::Yes,
            Some(b) => b.admit(),
        };
        if admit == Admit::No {
            let e = ProxyError::CircuitOpen {
                cluster: cluster.config.name.clone(),
            };
            return Err(finish_error(e, targets, snap, conn));
        }
        let _slot = match &cluster.limit {
            None => None,
            Some(l) => match l
                .acquire(deadline.saturating_duration_since(Instant::now()))
                .await
            {
                Ok(p) => Some(p),
                Err(_) => {
                    cluster.stats.overloaded.inc();
                    release_probe(cluster, admit);
                    let e = ProxyError::Overloaded {
                        cluster: cluster.config.name.clone(),
                    };
                    return Err(finish_error(e, targets, snap, conn));
                }
            },
        };

        // The request for this try.
        let wire = !upgrade && cluster.config.protocol == crate::config::UpstreamProtocol::Http1;
        if !wire {
            // This try owns its request: the header map is built from the raw lines, once.
            if let (Some(l), Some(p)) = (lines, original.as_mut()) {
                p.headers = l.to_map()?;
                lines = None;
            }
        }
        let req = match (&mut body, original.as_ref()) {
            (TryBody::Replay(b), Some(p)) if wire => TryReq::Wire {
                parts: p,
                lines,
                body: b.clone(),
            },
            (TryBody::Replay(b), _) => {
                if replay_wanted && replay_head.is_none() {
                    replay_head = original.as_ref().map(copy_head);
                }
                match (original.take(), &replay_head) {
                    (Some(p), _) => {
                        TryReq::Owned(Request::from_parts(p, Either::Right(Full::new(b.clone()))))
                    }
                    (None, Some(h)) => TryReq::Owned(rebuild(h, b.clone())),
                    (None, None) => unreachable_retry()?,
                }
            }
            (TryBody::Stream(b), _) => match (original.take(), b.take()) {
                (Some(p), Some(b)) => TryReq::Owned(Request::from_parts(p, Either::Left(b))),
                _ => unreachable_retry()?,
            },
        };
        let Some(endpoint) = cluster.pick(key, avoid) else {
            release_probe(cluster, admit);
            let e = ProxyError::NoHealthyEndpoint {
                cluster: cluster.config.name.clone(),
            };
            return Err(finish_error(e, targets, snap, conn));
        };
        // The try's deadline: the route's, or sooner with a shorter per-try timeout (the only
        // case that reads the clock here).
        let try_deadline = if per_try >= route.timeout {
            deadline
        } else {
            deadline.min(Instant::now() + per_try)
        };
        let hedge = match (route.hedge, &body) {
            (Some(delay), TryBody::Replay(b)) if safe && attempt_no == 1 => {
                let second = match (&req, &replay_head) {
                    (TryReq::Wire { parts, lines, body }, _) => Some(TryReq::Wire {
                        parts,
                        lines: *lines,
                        body: body.clone(),
                    }),
                    (TryReq::Owned(_), Some(h)) => Some(TryReq::Owned(rebuild(h, b.clone()))),
                    (TryReq::Owned(_), None) => None,
                };
                second.map(|s| (delay, s))
            }
            _ => None,
        };
        let try_started = shard_id.map(|_| Instant::now());
        let sent = match hedge {
            None => {
                let endpoint = endpoint.clone();
                send_one(
                    req,
                    snap,
                    cluster_id,
                    endpoint,
                    route,
                    forwarded,
                    conn,
                    try_deadline,
                    raw,
                )
                .await
            }
            // Boxed: a hedged try holds two tries and a timer; only hedging routes pay for it.
            Some(hedge) => {
                Box::pin(send_hedged(
                    req,
                    hedge,
                    snap,
                    cluster_id,
                    key,
                    &endpoint,
                    route,
                    forwarded,
                    conn,
                    try_deadline,
                    raw,
                ))
                .await
            }
        };
        let stats = shard_id.and_then(|id| match targets {
            Targets::Shards { set, .. } => Some(&snap.shard_stats[set][id]),
            Targets::Cluster(_) => None,
        });
        if let Some(st) = stats {
            st.requests.inc();
            if let Some(t) = try_started {
                st.latency.observe(t.elapsed());
            }
            if sent.outcome_failed() {
                st.errors.inc();
            }
        }
        record_breakers(cluster, &sent.endpoint, admit, !sent.outcome_failed());
        done.endpoint = Some(sent.in_flight);

        // Retry? Only within the policy, the budget and the deadline, and with a body to send.
        let can_replay = replay_wanted && matches!(body, TryBody::Replay(_));
        let retry_after = match &sent.result {
            Ok(resp) => crate::resilience::retry::retry_after(resp.headers()),
            Err(_) => None,
        };
        let wait = policy.should_retry(attempt_no, sent.outcome, safe, retry_after);
        let retry = match wait {
            Some(d) if can_replay && Instant::now() + d < deadline => {
                if cluster.budget.withdraw() {
                    Some(d)
                } else {
                    cluster.stats.budget_exhausted.inc();
                    None
                }
            }
            _ => None,
        };
        match retry {
            None => {
                return match sent.result {
                    Ok(resp) => Ok(resp),
                    Err(e) => Err(finish_error(e, targets, snap, conn)),
                }
            }
            Some(d) => {
                cluster.stats.retries.inc();
                avoid = Some(sent.endpoint.addr);
                // A shard that cannot be reached gives way to the next allowed one, if any.
                if let (
                    Targets::Shards { plan, .. },
                    Some(id),
                    crate::resilience::Outcome::ConnectFailed,
                ) = (targets, shard_id, sent.outcome)
                {
                    if plan.allowed.len() > tried_shards.len() + 1 {
                        tried_shards.push(id);
                    }
                }
                drop(sent.result);
                tokio::time::sleep(d).await;
            }
        }
    }
}

fn unreachable_retry<T>() -> Result<T, ProxyError> {
    // The loop only comes round again with a replayable body.
    Err(ProxyError::BadRequest(
        "the request body cannot be sent twice".into(),
    ))
}

fn content_length(headers: Fields<'_>) -> Option<u64> {
    headers
        .text(&header::CONTENT_LENGTH)
        .and_then(|v| v.parse().ok())
}

/// Gives back a half-open probe that was not used.
fn release_probe(cluster: &crate::upstream::ClusterState, admit: Admit) {
    if let (Some(b), Admit::Probe) = (&cluster.breaker, admit) {
        b.record(Admit::Probe, false);
    }
}

/// Records a try's result on the endpoint's and the cluster's breakers, and their metrics.
fn record_breakers(
    cluster: &crate::upstream::ClusterState,
    endpoint: &Endpoint,
    admit: Admit,
    success: bool,
) {
    if let Some(b) = &endpoint.breaker {
        let before = b.state();
        b.record(
            if before == crate::resilience::breaker::State::HalfOpen {
                Admit::Probe
            } else {
                Admit::Yes
            },
            success,
        );
        if before != crate::resilience::breaker::State::Open
            && b.state() == crate::resilience::breaker::State::Open
        {
            cluster.stats.ejections.inc();
            tracing::warn!(cluster = %cluster.config.name, endpoint = %endpoint.addr, "endpoint ejected");
        }
    }
    if let Some(b) = &cluster.breaker {
        b.record(admit, success);
        // Transitions also happen in `admit` (open → half-open): report every one since last.
        let after = b.transitions.load(std::sync::atomic::Ordering::Relaxed);
        let before = cluster
            .breaker_reported
            .swap(after, std::sync::atomic::Ordering::Relaxed);
        if after > before {
            cluster.stats.breaker_transitions.inc_by(after - before);
            cluster.stats.breaker_state.set(b.state().as_gauge());
            tracing::warn!(cluster = %cluster.config.name, state = ?b.state(), "circuit breaker changed");
        }
    }
}

/// Maps an error at the end of a shard-routed request: when no allowed shard could be reached,
/// the answer is `residency-unavailable` (or `shard-unavailable`), never another shard.
fn finish_error(
    e: ProxyError,
    targets: Targets<'_>,
    snap: &Snapshot,
    conn: &ConnCtx,
) -> ProxyError {
    match targets {
        Targets::Shards { set, plan }
            if matches!(
                e,
                ProxyError::ConnectFailed { .. }
                    | ProxyError::NoHealthyEndpoint { .. }
                    | ProxyError::CircuitOpen { .. }
                    | ProxyError::Overloaded { .. }
            ) =>
        {
            shard_unavailable(snap, set, plan, Some(e), conn)
        }
        _ => e,
    }
}

/// One try's result.
struct Sent {
    result: Result<Response<UpstreamBody>, ProxyError>,
    outcome: crate::resilience::Outcome,
    endpoint: Arc<Endpoint>,
    in_flight: InFlight,
}

impl Sent {
    /// Whether the try counts as a failure for breakers: no answer, or a 5xx.
    fn outcome_failed(&self) -> bool {
        match self.outcome {
            crate::resilience::Outcome::Response { status, .. } => status.is_server_error(),
            _ => true,
        }
    }
}

/// One try, and a second try to another endpoint after the delay; the first good answer wins
/// and the other is dropped (cancelled).
#[allow(clippy::too_many_arguments)]
async fn send_hedged(
    req: TryReq<'_>,
    (delay, second): (std::time::Duration, TryReq<'_>),
    snap: &Snapshot,
    cluster_id: usize,
    key: Option<u64>,
    endpoint: &Arc<Endpoint>,
    route: &Route,
    forwarded: &Forwarded,
    conn: &ConnCtx,
    deadline: Instant,
    raw: bool,
) -> Sent {
    let primary = send_one(
        req,
        snap,
        cluster_id,
        endpoint.clone(),
        route,
        forwarded,
        conn,
        deadline,
        raw,
    );
    tokio::pin!(primary);
    tokio::select! {
        sent = &mut primary => return sent,
        _ = tokio::time::sleep(delay) => {}
    }
    let cluster = &snap.clusters[cluster_id];
    let other = cluster
        .pick(key, Some(endpoint.addr))
        .filter(|e| e.addr != endpoint.addr);
    let Some(other) = other else {
        return primary.await;
    };
    if !cluster.budget.withdraw() {
        cluster.stats.budget_exhausted.inc();
        return primary.await;
    }
    cluster.stats.hedges.inc();
    let mut secondary = Box::pin(send_one(
        second, snap, cluster_id, other, route, forwarded, conn, deadline, raw,
    ));
    tokio::select! {
        sent = &mut primary => if sent.outcome_failed() { secondary.await } else { sent },
        sent = &mut secondary => if sent.outcome_failed() { primary.await } else { sent },
    }
}

/// Sends one try to one endpoint, bounded by `deadline`. With `raw`, a response read by
/// attache's HTTP/1.1 codec may keep its header lines for the client as they are (see
/// [`crate::upstream::wire::RawFields`]) instead of a header map.
#[allow(clippy::too_many_arguments)]
async fn send_one(
    req: TryReq<'_>,
    snap: &Snapshot,
    cluster_id: usize,
    endpoint: Arc<Endpoint>,
    route: &Route,
    forwarded: &Forwarded,
    conn: &ConnCtx,
    deadline: Instant,
    raw: bool,
) -> Sent {
    use crate::resilience::Outcome;
    let cluster = &snap.clusters[cluster_id];
    let in_flight = endpoint.start_request();
    // Only HTTP/1.1 clusters take an encoded head (`execute` chooses so); anything else
    // would get a shaped copy.
    let req = match req {
        TryReq::Wire { parts, lines, body }
            if cluster.config.protocol != crate::config::UpstreamProtocol::Http1 =>
        {
            match lines.map(|l| l.to_map()).transpose() {
                Ok(map) => {
                    let mut head = copy_head(parts);
                    if let Some(map) = map {
                        head.3 = map;
                    }
                    Ok(TryReq::Owned(rebuild(&head, body)))
                }
                Err(e) => Err(e),
            }
        }
        req => Ok(req),
    };
    let prepared = match req {
        Err(e) => Err(e),
        Ok(TryReq::Owned(mut req)) => prepare_request(
            &mut req,
            route,
            forwarded,
            conn,
            &endpoint,
            cluster.config.protocol,
        )
        .map(|upgrade| (upgrade, Either::Left(req))),
        Ok(TryReq::Wire { parts, lines, body }) => upstream_path(&parts.uri, route)
            .map(|path| (None, Either::Right((parts, lines, path, body)))),
    };
    let (client_upgrade, req) = match prepared {
        Ok(p) => p,
        Err(e) => {
            return Sent {
                result: Err(e),
                outcome: Outcome::Response {
                    status: StatusCode::BAD_REQUEST,
                    grpc: None,
                },
                endpoint,
                in_flight,
            }
        }
    };
    cluster.stats.requests.inc();
    cluster.stats.active.inc();
    let sent = Instant::now();
    let result = match req {
        Either::Right((parts, lines, path, body)) => {
            let pool = cluster.pool(conn.worker);
            let fields = Fields::of(&parts.headers, lines);
            let encode = |buf: &mut Vec<u8>| {
                encode_upstream_request(
                    buf,
                    &parts.method,
                    fields,
                    &parts.uri,
                    &path,
                    route,
                    forwarded,
                    conn,
                    body.len(),
                )
            };
            // The pool bounds the try by the deadline itself (a timer per connection, not
            // one per request).
            let send = pool.send_encoded(
                endpoint.addr,
                &parts.method,
                &encode,
                &body,
                raw,
                sent,
                deadline,
            );
            h1_result(send.await, &endpoint)
        }
        Either::Left(req) => match cluster.config.protocol {
            crate::config::UpstreamProtocol::Http1 => {
                let pool = cluster.pool(conn.worker);
                h1_result(
                    pool.send(endpoint.addr, req, raw, deadline).await,
                    &endpoint,
                )
            }
            crate::config::UpstreamProtocol::Http2 => {
                let client = cluster.client(conn.worker);
                tokio::time::timeout_at(deadline.into(), client.request(req))
                    .await
                    .map_err(|_| ())
                    .map(|r| {
                        r.map(|resp| resp.map(UpstreamBody::Client))
                            .map_err(|e| classify(&e, &endpoint))
                    })
            }
        },
    };
    cluster.stats.active.dec();
    let (result, outcome) = match result {
        Err(_) => (
            Err(ProxyError::Timeout {
                endpoint: endpoint.addr.to_string(),
                // The try's time, to the nearest millisecond.
                timeout_ms: (deadline.saturating_duration_since(sent).as_micros() as u64 + 500)
                    / 1000,
            }),
            Outcome::Timeout,
        ),
        Ok(Err(err)) => {
            let outcome = match err {
                ProxyError::ConnectFailed { .. } => Outcome::ConnectFailed,
                _ => Outcome::Reset,
            };
            (Err(err), outcome)
        }
        Ok(Ok(mut resp)) => {
            cluster.stats.latency.observe(sent.elapsed());
            cluster.stats.responses[class_index(resp.status().as_u16())].inc();
            let grpc = resp
                .headers()
                .get(&GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let outcome = Outcome::Response {
                status: resp.status(),
                grpc,
            };
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                if let Some(client_upgrade) = client_upgrade {
                    tunnel(client_upgrade, hyper::upgrade::on(&mut resp));
                    return Sent {
                        result: Ok(resp),
                        outcome,
                        endpoint,
                        in_flight,
                    };
                }
            }
            strip_hop_by_hop(resp.headers_mut(), false);
            apply_header_ops(resp.headers_mut(), &route.response_headers);
            (Ok(resp), outcome)
        }
    };
    if result.is_err() {
        endpoint
            .failures
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    Sent {
        result,
        outcome,
        endpoint,
        in_flight,
    }
}

/// The answer when no allowed shard can serve: fast, and never another shard.
fn shard_unavailable(
    snap: &Snapshot,
    set_id: usize,
    plan: &shard::Plan,
    last_error: Option<ProxyError>,
    conn: &ConnCtx,
) -> ProxyError {
    let set = &snap.config.shard_sets[set_id];
    let names: Vec<&str> = plan
        .allowed
        .iter()
        .map(|&i| set.shards[i].name.as_str())
        .collect();
    let detail = match last_error {
        Some(e) => e.to_string(),
        None => "no healthy endpoint, or its circuit is open".to_owned(),
    };
    if plan.residency {
        let region = plan.region.as_deref().unwrap_or("?");
        conn.shared.metrics.residency_denial(&set.name, region);
        ProxyError::ResidencyUnavailable {
            allowed: names.join(", "),
            detail,
        }
    } else {
        ProxyError::ShardUnavailable {
            shard: names.join(", "),
            detail,
        }
    }
}

/// One try's request: owned by the try, or the client's head, borrowed and encoded.
// Not boxed: a try's request is moved once, into its future; a box would allocate per try.
#[allow(clippy::large_enum_variant)]
enum TryReq<'p> {
    /// Shaped in place by [`prepare_request`] and moved into the try (HTTP/2 clusters,
    /// upgrades, streamed bodies).
    Owned(Request<ReqBody>),
    /// Encoded by [`encode_upstream_request`] from the client's head, which stays as it is
    /// (its fields are `lines` when there are any, else the head's map).
    Wire {
        parts: &'p http::request::Parts,
        lines: Option<HeadLines<'p>>,
        body: Bytes,
    },
}

/// What a replay needs of a request head (extensions are not kept).
fn copy_head(p: &http::request::Parts) -> (Method, Uri, Version, HeaderMap) {
    (
        p.method.clone(),
        p.uri.clone(),
        p.version,
        p.headers.clone(),
    )
}

fn rebuild(head: &(Method, Uri, Version, HeaderMap), body: Bytes) -> Request<ReqBody> {
    let mut req = Request::new(Either::Right(Full::new(body)));
    *req.method_mut() = head.0.clone();
    *req.uri_mut() = head.1.clone();
    *req.version_mut() = head.2;
    *req.headers_mut() = head.3.clone();
    req
}

/// One try against one cluster (used by scatter-gather's sub-requests): pick an endpoint,
/// shape the request, send, shape the response.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn attempt(
    req: Request<ReqBody>,
    snap: &Snapshot,
    cluster_id: usize,
    key: Option<u64>,
    route: &Route,
    forwarded: &Forwarded,
    conn: &ConnCtx,
    in_flight: &mut Option<InFlight>,
) -> Result<Response<UpstreamBody>, ProxyError> {
    let cluster = &snap.clusters[cluster_id];
    let admit = match &cluster.breaker {
        None => Admit::Yes,
        Some(b) => b.admit(),
    };
    if admit == Admit::No {
        return Err(ProxyError::CircuitOpen {
            cluster: cluster.config.name.clone(),
        });
    }
    let Some(endpoint) = cluster.pick(key, None) else {
        release_probe(cluster, admit);
        return Err(ProxyError::NoHealthyEndpoint {
            cluster: cluster.config.name.clone(),
        });
    };
    let sent = send_one(
        TryReq::Owned(req),
        snap,
        cluster_id,
        endpoint,
        route,
        forwarded,
        conn,
        Instant::now() + route.timeout,
        false, // the merge reads each part's headers
    )
    .await;
    record_breakers(cluster, &sent.endpoint, admit, !sent.outcome_failed());
    *in_flight = Some(sent.in_flight);
    sent.result
}

/// The consistent-hash key of a request, hashed, when the cluster balances on one.
fn hash_key(
    balance: &Balance,
    head: &RequestHead<'_>,
    decision: &RouteDecision,
    route: &Route,
) -> Option<u64> {
    let Balance::ConsistentHash(on) = balance else {
        return None;
    };
    route::key_value(on, head, &decision.captures, route).map(|v| stable_hash(v.as_bytes()))
}

/// Rewrites the client's request into the upstream request, in place. Returns the client's
/// pending upgrade when the request asks for one (WebSocket).
pub(crate) fn prepare_request(
    req: &mut Request<ReqBody>,
    route: &Route,
    forwarded: &Forwarded,
    conn: &ConnCtx,
    endpoint: &Endpoint,
    protocol: crate::config::UpstreamProtocol,
) -> Result<Option<hyper::upgrade::OnUpgrade>, ProxyError> {
    let upgrade = is_upgrade(req.version(), req.headers().into());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut *req));

    // Host: HTTP/2 clients send `:authority` only; an HTTP/1.1 upstream needs `Host`.
    if !req.headers().contains_key(header::HOST) {
        if let Some(a) = req.uri().authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                req.headers_mut().insert(header::HOST, v);
            }
        }
    }

    // The upstream URI: the endpoint's address, the (maybe rewritten) path and the query.
    let path_and_query = match rewritten_path(req.uri(), route) {
        Some(p) => p?,
        None => req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    };
    // HTTP/1.1 connections are ours and take the origin form; hyper-util's client (HTTP/2)
    // needs the absolute form to know where to connect.
    let mut parts = http::uri::Parts::default();
    if protocol == crate::config::UpstreamProtocol::Http2 {
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(endpoint.authority.clone());
    }
    parts.path_and_query = Some(path_and_query);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|e| ProxyError::BadRequest(e.to_string()))?;
    *req.version_mut() = match protocol {
        crate::config::UpstreamProtocol::Http1 => Version::HTTP_11,
        crate::config::UpstreamProtocol::Http2 => Version::HTTP_2,
    };

    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    if forwarded.x_forwarded_for {
        append_list(headers, &X_FORWARDED_FOR, &conn.client_ip);
    }
    if forwarded.x_forwarded_proto {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    }
    if forwarded.via {
        append_list(
            headers,
            &header::VIA,
            &HeaderValue::from_static("1.1 attache"),
        );
    }
    apply_header_ops(headers, &route.request_headers);
    Ok(client_upgrade)
}

/// The route's prefix rewrite of the path (the query kept), when it has one.
fn rewritten_path(uri: &Uri, route: &Route) -> Option<Result<http::uri::PathAndQuery, ProxyError>> {
    let (Some(to), Some(crate::config::PathMatch::Prefix(from))) =
        (&route.rewrite_prefix, &route.matcher.path)
    else {
        return None;
    };
    let path = route::rewrite_prefix(uri.path(), from, to);
    let text = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.into_owned(),
    };
    Some(
        http::uri::PathAndQuery::try_from(text)
            .map_err(|e| ProxyError::BadRequest(format!("rewritten path is invalid: {e}"))),
    )
}

/// The origin-form path and query an HTTP/1.1 upstream gets.
fn upstream_path<'u>(uri: &'u Uri, route: &Route) -> Result<Cow<'u, str>, ProxyError> {
    Ok(match rewritten_path(uri, route) {
        Some(p) => Cow::Owned(p?.as_str().to_owned()),
        None => Cow::Borrowed(uri.path_and_query().map_or("/", |p| p.as_str())),
    })
}

/// Writes the HTTP/1.1 request that [`prepare_request`] would make of the client's head,
/// straight from that head, which stays as it is: hop-by-hop headers (and those `connection`
/// names) left out, the forwarding headers joined or added, the route's header operations
/// applied, `host` from the URI when the client sent none, and the length the body needs.
/// For requests without an upgrade whose body is in memory (`body_len` bytes). Field names
/// go out as the client sent them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn encode_upstream_request(
    buf: &mut Vec<u8>,
    method: &Method,
    fields: Fields<'_>,
    uri: &Uri,
    path: &str,
    route: &Route,
    forwarded: &Forwarded,
    conn: &ConnCtx,
    body_len: usize,
) {
    use crate::upstream::wire;
    let ops = &route.request_headers;
    // The route's operations win over everything: a name it removes or sets is dropped here.
    let replaced = |name: &[u8]| {
        ops.remove.iter().any(|n| route::eq_name(name, n))
            || ops.add.iter().any(|(n, _)| route::eq_name(name, n))
    };
    let has_connection = fields.contains(&header::CONNECTION);
    let connection_names = |name: &[u8]| {
        fields.get_all(&header::CONNECTION).any(|v| {
            v.split(|&b| b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
        })
    };
    wire::request_line(buf, method, path);
    let mut has_length = false;
    let mut has_host = false;
    let mut xff_done = !forwarded.x_forwarded_for || replaced(b"x-forwarded-for");
    let mut via_done = !forwarded.via || replaced(b"via");
    for (name, value) in fields.iter() {
        // Against lower-case literals: a `HeaderName`'s text is a table lookup.
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        has_host |= is(b"host");
        if is(b"connection")
            || is(b"transfer-encoding")
            || is(b"upgrade")
            || is(b"keep-alive")
            || is(b"proxy-connection")
            || (is(b"te") && !value.eq_ignore_ascii_case(b"trailers"))
            || (forwarded.x_forwarded_proto && is(b"x-forwarded-proto"))
            || replaced(name)
            || (has_connection && connection_names(name))
        {
            continue;
        }
        // A list attache adds to goes out as one line, where its first value was: the
        // client's values, then attache's.
        let added = if forwarded.x_forwarded_for && is(b"x-forwarded-for") {
            Some((&mut xff_done, &X_FORWARDED_FOR, &conn.client_ip))
        } else if forwarded.via && is(b"via") {
            Some((&mut via_done, &header::VIA, &VIA_ATTACHE))
        } else {
            None
        };
        match added {
            Some((done, list, ours)) => {
                if !*done {
                    buf.extend_from_slice(name);
                    buf.extend_from_slice(b": ");
                    for v in fields.get_all(list) {
                        buf.extend_from_slice(v);
                        buf.extend_from_slice(b", ");
                    }
                    buf.extend_from_slice(ours.as_bytes());
                    buf.extend_from_slice(b"\r\n");
                    *done = true;
                }
            }
            None => {
                has_length |= is(b"content-length");
                wire::field_line(buf, name, value);
            }
        }
    }
    if !has_host && !replaced(b"host") {
        if let Some(a) = uri.authority() {
            wire::field_line(buf, b"host", a.as_str().as_bytes());
        }
    }
    if !xff_done {
        wire::field_line(buf, b"x-forwarded-for", conn.client_ip.as_bytes());
    }
    if forwarded.x_forwarded_proto && !replaced(b"x-forwarded-proto") {
        wire::field_line(buf, b"x-forwarded-proto", b"http");
    }
    if !via_done {
        wire::field_line(buf, b"via", VIA_ATTACHE.as_bytes());
    }
    for (name, value) in &ops.add {
        has_length |= *name == header::CONTENT_LENGTH;
        wire::field_line(buf, name.as_str().as_bytes(), value.as_bytes());
    }
    wire::end_request_head(buf, method, has_length, body_len);
}

static VIA_ATTACHE: HeaderValue = HeaderValue::from_static("1.1 attache");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn is_upgrade(version: Version, headers: Fields<'_>) -> bool {
    version == Version::HTTP_11
        && headers.contains(&header::UPGRADE)
        && headers
            .get_all(&header::CONNECTION)
            .filter_map(route::as_text)
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and the headers it names,
/// `Keep-Alive`, `Proxy-Connection`, `TE` (except `trailers`, which gRPC needs),
/// `Transfer-Encoding` and `Upgrade` (kept, with `Connection: upgrade`, for an upgrade).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // One pass over the names first: most messages carry none of these (or only
    // `connection: keep-alive`), and each removal is a hash lookup.
    let (mut connection, mut other) = (false, false);
    for name in headers.keys() {
        if name == header::CONNECTION {
            connection = true;
        } else if name == header::TRANSFER_ENCODING
            || name == header::UPGRADE
            || name == header::TE
            || name == KEEP_ALIVE
            || name == PROXY_CONNECTION
        {
            other = true;
        }
    }
    if !connection && !other {
        return;
    }
    if connection && !keep_upgrade {
        // The usual case, `connection: keep-alive` or `close` naming no other header: one
        // lookup removes it.
        if let http::header::Entry::Occupied(e) = headers.entry(header::CONNECTION) {
            let plain = e.iter().all(|v| {
                let v = v.as_bytes();
                v.eq_ignore_ascii_case(b"keep-alive") || v.eq_ignore_ascii_case(b"close")
            });
            if plain {
                e.remove();
                connection = false;
            }
        }
    }
    if connection {
        let listed = headers.get(header::CONNECTION).cloned();
        if let Some(list) = listed.as_ref().and_then(|v| v.to_str().ok()) {
            for name in list.split(',') {
                let name = name.trim();
                if name.eq_ignore_ascii_case("keep-alive") || name.eq_ignore_ascii_case("close") {
                    continue; // keep-alive is removed below; `close` names no header
                }
                if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                // from_bytes lower-cases.
                if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
                    headers.remove(n);
                }
            }
        }
        if keep_upgrade {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        } else {
            headers.remove(header::CONNECTION);
        }
    }
    if !other {
        return;
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if let Some(te) = headers.get(header::TE) {
        if !te.as_bytes().eq_ignore_ascii_case(b"trailers") {
            headers.remove(header::TE);
        }
    }
}

fn append_list(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    match headers.entry(name) {
        http::header::Entry::Occupied(mut existing) => {
            // Every line of the list, in order, then ours, as one line (`insert` replaces
            // them all).
            let mut joined = Vec::new();
            for old in existing.iter() {
                joined.extend_from_slice(old.as_bytes());
                joined.extend_from_slice(b", ");
            }
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                existing.insert(v);
            }
        }
        http::header::Entry::Vacant(slot) => {
            slot.insert(value.clone());
        }
    }
}

fn apply_header_ops(headers: &mut HeaderMap, ops: &HeaderOps) {
    for name in &ops.remove {
        headers.remove(name);
    }
    for (name, value) in &ops.add {
        headers.insert(name.clone(), value.clone());
    }
}

/// Maps a client error to what happened upstream.
fn classify(e: &hyper_util::client::legacy::Error, endpoint: &Endpoint) -> ProxyError {
    let detail = error_chain(e);
    let endpoint = endpoint.addr.to_string();
    if e.is_connect() {
        return ProxyError::ConnectFailed { endpoint, detail };
    }
    let hyper_err = std::error::Error::source(e).and_then(|s| s.downcast_ref::<hyper::Error>());
    match hyper_err {
        Some(h) if h.is_parse() || h.is_parse_status() => {
            ProxyError::UpstreamProtocol { endpoint, detail }
        }
        _ => ProxyError::UpstreamReset { endpoint, detail },
    }
}

/// An HTTP/1.1 pool's answer as `send_one` takes it: `Err(())` when the deadline passed,
/// otherwise the response or the error attache answers with.
fn h1_result(
    r: Result<Response<UpstreamBody>, crate::upstream::h1::SendError>,
    endpoint: &Endpoint,
) -> Result<Result<Response<UpstreamBody>, ProxyError>, ()> {
    use crate::upstream::h1::SendError;
    let e = match r {
        Ok(resp) => return Ok(Ok(resp)),
        Err(SendError::Timeout) => return Err(()),
        Err(e) => e,
    };
    let endpoint = endpoint.addr.to_string();
    let detail = e.to_string();
    Ok(Err(match e {
        SendError::Connect(_) => ProxyError::ConnectFailed { endpoint, detail },
        SendError::Protocol(_) => ProxyError::UpstreamProtocol { endpoint, detail },
        SendError::Hyper(h) if h.is_parse() || h.is_parse_status() => {
            ProxyError::UpstreamProtocol { endpoint, detail }
        }
        // (Timeout was answered above.)
        SendError::Hyper(_) | SendError::Io(_) | SendError::Timeout => {
            ProxyError::UpstreamReset { endpoint, detail }
        }
    }))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Joins the client's and the upstream's upgraded connections (WebSocket and friends).
fn tunnel(client: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(pair) => pair,
            Err(e) => {
                tracing::debug!(error = %e, "upgrade failed");
                return;
            }
        };
        let mut client = TokioIo::new(client);
        let mut upstream = TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            tracing::debug!(error = %e, "upgraded connection ended with an error");
        }
    });
}

/// The accounting of one request, recorded when dropped (when the response body is done).
pub struct Completion {
    pub(crate) conn: Arc<ConnCtx>,
    snap: Arc<Snapshot>,
    pub(crate) start: Instant,
    method: Method,
    /// Kept only when the access log is on.
    path: Option<String>,
    route: Option<usize>,
    cluster: Option<usize>,
    /// (shard set, shard) of a shard-routed request.
    pub(crate) shard: Option<(usize, usize)>,
    pub(crate) region: Option<Arc<str>>,
    /// (split, variant) of a split route.
    variant: Option<(usize, usize)>,
    pub(crate) endpoint: Option<InFlight>,
    status: u16,
    bytes: u64,
    reason: Option<&'static str>,
    /// Tries sent upstream (retries and hedges included).
    pub(crate) attempts: u32,
    /// A request without a body (and not CONNECT): once its response is complete, the client
    /// connection has nothing in progress, and hyper may hand it back.
    may_park: bool,
}

impl Completion {
    fn new(conn: Arc<ConnCtx>, snap: Arc<Snapshot>, req: &Request<ClientBody>) -> Completion {
        let start = Instant::now();
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        let path = (conn.shared.access_log.enabled() || conn.shared.recent.watched_at(start))
            .then(|| req.uri().path().to_owned());
        Completion {
            conn,
            snap,
            start,
            method: req.method().clone(),
            path,
            route: None,
            cluster: None,
            shard: None,
            region: None,
            variant: None,
            endpoint: None,
            status: 0,
            bytes: 0,
            reason: None,
            attempts: 0,
            may_park: req.body().is_end_stream() && req.method() != Method::CONNECT,
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let listener = &self.snap.config.listeners[self.conn.listener];
        if self.may_park && self.status != 101 {
            let armed = self.conn.park.compare_exchange(
                PARK_BUSY,
                PARK_ARMED,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            if armed.is_ok() {
                self.conn.park_waker.wake();
            }
        }
        let now = Instant::now();
        let elapsed = now.saturating_duration_since(self.start);
        self.conn.idle_from(now);
        self.conn.in_flight.fetch_sub(1, Ordering::Relaxed);
        if let Some(r) = self.route {
            let stats = &self.snap.listeners[self.conn.listener].routes[r];
            stats.responses[class_index(self.status)].inc();
            stats.latency.observe(elapsed);
        }
        let recent = &self.conn.shared.recent;
        if recent.watched_at(self.start + elapsed) {
            let route = self.route.and_then(|r| match &listener.kind {
                ListenerKind::Http { routes, .. } => routes.get(r).map(|r| r.name.clone()),
                ListenerKind::Tcp { .. } => None,
            });
            recent.record(crate::telemetry::recent::Recent {
                ts_ms: crate::telemetry::recent::now_ms(),
                listener: listener.name.clone(),
                route,
                cluster: self
                    .cluster
                    .map(|c| self.snap.config.clusters[c].name.clone()),
                shard: self
                    .shard
                    .map(|(s, i)| self.snap.config.shard_sets[s].shards[i].name.clone()),
                region: self.region.as_deref().map(str::to_owned),
                method: self.method.to_string(),
                path: self.path.clone().unwrap_or_default(),
                status: self.status,
                duration_ms: elapsed.as_secs_f64() * 1e3,
                reason: self.reason,
            });
        }
        let log = &self.conn.shared.access_log;
        if log.enabled() {
            let route = self.route.and_then(|r| match &listener.kind {
                ListenerKind::Http { routes, .. } => routes.get(r).map(|r| r.name.as_str()),
                ListenerKind::Tcp { .. } => None,
            });
            log.write(&LogRecord {
                ts: now_rfc3339(),
                listener: &listener.name,
                route,
                cluster: self
                    .cluster
                    .map(|c| self.snap.config.clusters[c].name.as_str()),
                shard: self
                    .shard
                    .map(|(s, i)| self.snap.config.shard_sets[s].shards[i].name.as_str()),
                region: self.region.as_deref(),
                variant: self
                    .variant
                    .map(|(s, v)| self.snap.config.splits[s].variants[v].name.as_str()),
                endpoint: self.endpoint.as_ref().map(|e| e.0.addr),
                client: self.conn.client,
                method: self.method.as_str(),
                path: self.path.as_deref().unwrap_or(""),
                status: self.status,
                bytes: self.bytes,
                duration_ms: elapsed.as_secs_f64() * 1e3,
                reason: self.reason,
                attempts: self.attempts,
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body (the upstream's, streamed, or attache's own) that carries the request's
    /// [`Completion`].
    pub struct ProxyBody {
        #[pin]
        inner: RespInner,
        done: Completion,
    }
}

impl ProxyBody {
    fn new(inner: RespInner, done: Completion) -> ProxyBody {
        ProxyBody { inner, done }
    }

    /// The upstream's header lines to write through as they are, when the response carries
    /// them (its header map then holds only what attache added).
    pub fn take_raw_fields(&mut self) -> Option<crate::upstream::wire::RawFields> {
        match &mut self.inner {
            Either::Left(up) => up.take_raw_fields(),
            Either::Right(_) => None,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.project();
        let polled = this.inner.poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.done.bytes += data.len() as u64;
                }
            }
            Poll::Ready(Some(Err(_))) => {
                this.done.reason = Some("upstream-reset-mid-body");
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// Every request's future is allocated (and moved) whole, whatever path it takes: rare
    /// paths (hedging, scatter-gather, hyper's client) are boxed so that they don't size it.
    #[test]
    fn the_request_future_stays_small() {
        let yaml = "admin: { address: \"127.0.0.1:0\" }\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n    routes: [ { cluster: a } ]\nclusters:\n  a: { endpoints: [\"127.0.0.1:1\"] }\n";
        let cfg = crate::config::Config::parse(yaml, std::path::Path::new("x.yaml")).unwrap();
        let shared = Shared::new(cfg, "x.yaml".into(), 1, crate::telemetry::AccessLog::Off);
        let ctx = Arc::new(ConnCtx::new(shared, 0, 0, "127.0.0.1:1".parse().unwrap()));
        let f = handle(Request::new(ClientBody::Empty), None, ctx);
        let size = std::mem::size_of_val(&f);
        assert!(size < 8 * 1024, "request future: {size} bytes");
    }

    /// A request head as a comparable value: the request line, then its fields, lower-cased
    /// names, sorted.
    fn head_of(bytes: &[u8]) -> (String, Vec<(String, String)>) {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut slots);
        assert!(
            req.parse(bytes).unwrap().is_complete(),
            "{}",
            String::from_utf8_lossy(bytes)
        );
        let line = format!("{} {}", req.method.unwrap(), req.path.unwrap());
        let mut fields: Vec<(String, String)> = req
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8(h.value.to_vec()).unwrap(),
                )
            })
            .collect();
        fields.sort();
        (line, fields)
    }

    /// The upstream request encoded from the client's head is the one `prepare_request`
    /// makes in place and `wire::encode_request` writes, for every kind of header handling.
    #[test]
    fn encoding_from_the_head_equals_preparing_in_place() {
        let route_yaml = [
            "{ cluster: a }",
            "{ cluster: a, match: { path: { prefix: /api } }, rewrite: { prefix: /v2 }, request_headers: { add: { x-team: feed, host: internal }, remove: [x-secret, x-forwarded-proto] } }",
        ];
        let forwarded_yaml = ["", "    forwarded: { via: true, x_forwarded_for: false }\n"];
        let cases: &[(&str, &str, &[(&str, &str)], usize)] = &[
            ("GET", "/api/x?y=1", &[("host", "h"), ("accept", "*/*")], 0),
            (
                "GET",
                "/api/x",
                &[
                    ("host", "h"),
                    ("connection", "keep-alive, x-hop"),
                    ("x-hop", "1"),
                    ("keep-alive", "timeout=5"),
                    ("proxy-connection", "keep-alive"),
                    ("upgrade", "h2c"),
                    ("te", "gzip"),
                    ("x-secret", "s"),
                ],
                0,
            ),
            ("GET", "/api/x", &[("host", "h"), ("te", "trailers")], 0),
            (
                "GET",
                "/api/x",
                &[
                    ("host", "h"),
                    ("x-forwarded-for", "1.2.3.4"),
                    ("via", "1.0 edge"),
                    ("x-forwarded-proto", "https"),
                ],
                0,
            ),
            (
                "GET",
                "/api/x",
                &[
                    ("host", "h"),
                    ("x-forwarded-for", "1.2.3.4"),
                    ("accept", "*/*"),
                    ("x-forwarded-for", "5.6.7.8"),
                    ("connection", "x-hop"),
                    ("X-Hop", "1"),
                ],
                0,
            ),
            ("GET", "http://up.example:81/api/x", &[("accept", "*/*")], 0),
            ("POST", "/api/x", &[("host", "h")], 5),
            (
                "POST",
                "/api/x",
                &[("host", "h"), ("content-length", "5")],
                5,
            ),
            ("DELETE", "/api/x", &[("host", "h")], 0),
        ];
        for route in route_yaml {
            for fwd in forwarded_yaml {
                let yaml = format!(
                    "admin: {{ address: \"127.0.0.1:0\" }}\nlisteners:\n  - name: main\n    address: \"127.0.0.1:0\"\n{fwd}    routes: [ {route} ]\nclusters:\n  a: {{ endpoints: [\"127.0.0.1:1\"] }}\n"
                );
                let cfg =
                    crate::config::Config::parse(&yaml, std::path::Path::new("x.yaml")).unwrap();
                let ListenerKind::Http { routes, forwarded } = &cfg.listeners[0].kind else {
                    panic!("http listener")
                };
                let (route, forwarded) = (routes[0].clone(), *forwarded);
                let shared = Shared::new(cfg, "x.yaml".into(), 1, crate::telemetry::AccessLog::Off);
                let endpoint = shared.snapshot.load().clusters[0].pick(None, None).unwrap();
                let ctx = ConnCtx::new(shared, 0, 0, "10.0.0.9:1".parse().unwrap());
                for (method, uri, fields, body_len) in cases {
                    let mut req = Request::builder().method(*method).uri(*uri);
                    for (n, v) in fields.iter() {
                        req = req.header(*n, *v);
                    }
                    let (parts, ()) = req.body(()).unwrap().into_parts();
                    let body = Bytes::from(vec![b'x'; *body_len]);

                    let mut in_place = rebuild(&copy_head(&parts), body.clone());
                    prepare_request(
                        &mut in_place,
                        &route,
                        &forwarded,
                        &ctx,
                        &endpoint,
                        crate::config::UpstreamProtocol::Http1,
                    )
                    .unwrap();
                    let mut a = Vec::new();
                    crate::upstream::wire::encode_request(
                        &mut a,
                        in_place.method(),
                        in_place.uri().path_and_query().unwrap().as_str(),
                        in_place.headers(),
                        *body_len,
                    );

                    let path = upstream_path(&parts.uri, &route).unwrap();
                    // From the header map (a request from hyper), and from the raw lines of
                    // the same head as attache's own server parses it: names in capitals,
                    // lines in the order given (the map groups a name's lines), the first
                    // line moved last.
                    let mut raw_head = format!("{method} {uri} HTTP/1.1\r\n");
                    let lines: Vec<String> = fields
                        .iter()
                        .map(|(n, v)| format!("{}: {v}\r\n", n.to_ascii_uppercase()))
                        .collect();
                    for line in lines.iter().skip(1).chain(lines.first()) {
                        raw_head.push_str(line);
                    }
                    raw_head.push_str("\r\n");
                    let spans = route::fields::spans_of(raw_head.as_bytes());
                    let lines = HeadLines {
                        head: raw_head.as_bytes(),
                        spans: &spans,
                    };
                    for fields_of in [Fields::Map(&parts.headers), Fields::Lines(lines)] {
                        let mut b = Vec::new();
                        encode_upstream_request(
                            &mut b,
                            &parts.method,
                            fields_of,
                            &parts.uri,
                            &path,
                            &route,
                            &forwarded,
                            &ctx,
                            *body_len,
                        );
                        assert_eq!(
                            head_of(&a),
                            head_of(&b),
                            "{method} {uri} {fields:?} on {} with forwarded {fwd:?}, from {}",
                            route.name,
                            if matches!(fields_of, Fields::Lines(_)) {
                                "raw lines"
                            } else {
                                "a map"
                            },
                        );
                    }
                }
            }
        }
    }

    fn names(h: &HeaderMap) -> Vec<&str> {
        let mut v: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_stripped() {
        let mut h = headers(&[
            ("host", "a"),
            ("Connection", "Keep-Alive, X-Secret, close"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("te", "gzip"),
            ("x-kept", "1"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["host", "x-kept"]);

        // `te: trailers` survives (gRPC needs it); an upgrade keeps its two headers.
        let mut h = headers(&[
            ("connection", "upgrade"),
            ("upgrade", "websocket"),
            ("te", "trailers"),
        ]);
        strip_hop_by_hop(&mut h, true);
        assert_eq!(names(&h), ["connection", "te", "upgrade"]);
        assert_eq!(h["connection"], "upgrade");

        // The usual upstream answer: `connection: keep-alive` (twice here) and its timeouts.
        let mut h = headers(&[
            ("connection", "keep-alive"),
            ("Connection", "CLOSE"),
            ("keep-alive", "timeout=5"),
            ("content-length", "3"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["content-length"]);

        // Nothing to strip: nothing changes.
        let mut h = headers(&[("host", "a"), ("accept", "*/*")]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(names(&h), ["accept", "host"]);
    }

    #[test]
    fn forwarded_for_appends_to_a_list() {
        let ip = HeaderValue::from_static("10.0.0.9");
        let mut h = HeaderMap::new();
        append_list(&mut h, &X_FORWARDED_FOR, &ip);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        let mut h = headers(&[("x-forwarded-for", "1.2.3.4")]);
        append_list(&mut h, &X_FORWARDED_FOR, &ip);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.9");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        // Every line of the client's list is kept, not only the first.
        let mut h = headers(&[
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-for", "5.6.7.8"),
        ]);
        append_list(&mut h, &X_FORWARDED_FOR, &ip);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, 10.0.0.9");
        assert_eq!(h.get_all(&X_FORWARDED_FOR).iter().count(), 1);
    }
}
