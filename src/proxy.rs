//! The HTTP request path, top to bottom in [`forward`]: route, destination, endpoint, upstream
//! request, send, response. Each step is a line; the decisions are pure functions from
//! `route` and `balance`, the I/O happens here.
//!
//! Accounting (metrics, access log, in-flight counts) lives in a [`Completion`] that travels
//! with the response body and records when the body ends or is dropped, so durations and byte
//! counts include the body, and nothing is missed on any exit path.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::balance::stable_hash;
use crate::config::ShardId;
use crate::config::{Balance, Destination, Forwarded, HashOn, HeaderOps, ListenerKind, Route};
use crate::error::ProxyError;
use crate::route::{self, RequestHead, RouteDecision};
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
}

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
        }
    }
}

/// Handles one request: never fails, every error becomes a response.
pub async fn handle(
    req: Request<Incoming>,
    conn: Arc<ConnCtx>,
) -> Result<Response<ProxyBody>, Infallible> {
    let snap = conn.shared.snapshot.load_full();
    let mut done = Completion::new(conn, snap, &req);
    let snap = done.snap.clone();
    match forward(req, &snap, &mut done).await {
        Ok(resp) => {
            done.status = resp.status().as_u16();
            Ok(resp.map(|b| ProxyBody::new(b, done)))
        }
        Err(e) => {
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

/// The body of a response on its way back: the upstream's, streamed, or one attache made
/// (errors, merged scatter-gather answers).
pub type RespInner = Either<Incoming, Full<Bytes>>;

/// The request path. Returns the upstream's response or the error attache answers with.
async fn forward(
    req: Request<Incoming>,
    snap: &Snapshot,
    done: &mut Completion,
) -> Result<Response<RespInner>, ProxyError> {
    let conn = done.conn.clone();
    let listener = &snap.config.listeners[conn.listener];
    let ListenerKind::Http { routes, forwarded } = &listener.kind else {
        return Err(ProxyError::BadRequest("not an HTTP listener".into()));
    };

    // Decide the route: a pure function of the head and the snapshot.
    let head = RequestHead::new(req.method(), req.uri(), req.headers());
    let decision = route::select(routes, &head).ok_or_else(|| ProxyError::NoRoute {
        method: req.method().to_string(),
        path: req.uri().path().to_owned(),
    })?;
    let route = &routes[decision.route];
    done.route = Some(decision.route);
    snap.listeners[conn.listener].routes[decision.route]
        .requests
        .inc();

    match route.destination {
        Destination::Cluster(cluster) => {
            let key = hash_key(
                &snap.clusters[cluster].config.balance,
                &head,
                &decision,
                route,
            );
            done.cluster = Some(cluster);
            let req = req.map(Either::Left);
            let resp = attempt(
                req,
                snap,
                cluster,
                key,
                route,
                forwarded,
                &conn,
                &mut done.endpoint,
            )
            .await?;
            Ok(resp.map(Either::Left))
        }
        Destination::Shards(set_id) => {
            let set = &snap.config.shard_sets[set_id];
            if let Some(batch) = &route.batch {
                let resp =
                    shard::scatter::gather(req, snap, set_id, route, batch, forwarded, &conn)
                        .await?;
                return Ok(resp.map(Either::Right));
            }
            // Decide the shard: key → directory → allowed shards (the residency guarantee).
            let plan = shard::plan(
                set,
                snap.directory_of(set),
                &head,
                &decision.captures,
                route,
            )
            .await
            .map_err(|r| ProxyError::from_refusal(r, &set.key.to_string()))?;
            done.region = plan.region.clone();
            let keys: Vec<Option<u64>> = plan
                .allowed
                .iter()
                .map(|&id| {
                    hash_key(
                        &snap.clusters[set.shards[id].cluster].config.balance,
                        &head,
                        &decision,
                        route,
                    )
                })
                .collect();
            // A request without a body can fail over to the next allowed shard: keep its head.
            let replay =
                (plan.allowed.len() > 1 && req.body().is_end_stream()).then(|| head_of(&req));
            let mut first = Some(req.map(Either::Left));
            let mut tried = Vec::with_capacity(plan.allowed.len());
            let mut last_error: Option<ProxyError> = None;
            loop {
                let available = |id: ShardId| snap.clusters[set.shards[id].cluster].available();
                let next = shard::first_available(&plan.allowed, &tried, available);
                let (Some(shard_id), Some(req)) =
                    (next, first.take().or_else(|| replay.as_ref().map(rebuild)))
                else {
                    return Err(shard_unavailable(snap, set_id, &plan, last_error, &conn));
                };
                let position = plan
                    .allowed
                    .iter()
                    .position(|&a| a == shard_id)
                    .unwrap_or(0);
                tried.push(shard_id);
                let cluster = set.shards[shard_id].cluster;
                done.cluster = Some(cluster);
                done.shard = Some((set_id, shard_id));
                let stats = &snap.shard_stats[set_id][shard_id];
                stats.requests.inc();
                let started = Instant::now();
                match attempt(
                    req,
                    snap,
                    cluster,
                    keys[position],
                    route,
                    forwarded,
                    &conn,
                    &mut done.endpoint,
                )
                .await
                {
                    Ok(resp) => {
                        stats.latency.observe(started.elapsed());
                        if resp.status().is_server_error() {
                            stats.errors.inc();
                        }
                        return Ok(resp.map(Either::Left));
                    }
                    // Never reached the shard: the next allowed one may take it.
                    Err(
                        e @ (ProxyError::ConnectFailed { .. }
                        | ProxyError::NoHealthyEndpoint { .. }),
                    ) => {
                        stats.errors.inc();
                        last_error = Some(e);
                    }
                    Err(e) => {
                        stats.errors.inc();
                        return Err(e);
                    }
                }
            }
        }
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
        None => "no healthy endpoint".to_owned(),
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

/// A copy of a bodiless request's head, to send it again.
fn head_of(req: &Request<Incoming>) -> (Method, Uri, Version, HeaderMap) {
    (
        req.method().clone(),
        req.uri().clone(),
        req.version(),
        req.headers().clone(),
    )
}

fn rebuild(head: &(Method, Uri, Version, HeaderMap)) -> Request<ReqBody> {
    let mut req = Request::new(Either::Right(Full::new(Bytes::new())));
    *req.method_mut() = head.0.clone();
    *req.uri_mut() = head.1.clone();
    *req.version_mut() = head.2;
    *req.headers_mut() = head.3.clone();
    req
}

/// One try against one cluster: pick an endpoint, shape the request, send, shape the response.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn attempt(
    mut req: Request<ReqBody>,
    snap: &Snapshot,
    cluster_id: usize,
    key: Option<u64>,
    route: &Route,
    forwarded: &Forwarded,
    conn: &ConnCtx,
    in_flight: &mut Option<InFlight>,
) -> Result<Response<Incoming>, ProxyError> {
    let cluster = &snap.clusters[cluster_id];
    let endpoint = cluster
        .pick(key, None)
        .ok_or_else(|| ProxyError::NoHealthyEndpoint {
            cluster: cluster.config.name.clone(),
        })?;
    let client_upgrade = prepare_request(
        &mut req,
        route,
        forwarded,
        conn,
        &endpoint,
        cluster.config.protocol,
    )?;
    *in_flight = Some(endpoint.start_request());
    cluster.stats.requests.inc();
    cluster.stats.active.inc();
    let sent = Instant::now();
    let result =
        tokio::time::timeout(route.timeout, cluster.client(conn.worker).request(req)).await;
    cluster.stats.active.dec();
    let mut resp = match result {
        Err(_) => {
            endpoint
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ProxyError::Timeout {
                endpoint: endpoint.addr.to_string(),
                timeout_ms: route.timeout.as_millis() as u64,
            });
        }
        Ok(Err(e)) => {
            endpoint
                .failures
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(classify(&e, &endpoint));
        }
        Ok(Ok(resp)) => resp,
    };
    cluster.stats.latency.observe(sent.elapsed());
    cluster.stats.responses[class_index(resp.status().as_u16())].inc();

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            tunnel(client_upgrade, hyper::upgrade::on(&mut resp));
            return Ok(resp);
        }
    }
    strip_hop_by_hop(resp.headers_mut(), false);
    apply_header_ops(resp.headers_mut(), &route.response_headers);
    Ok(resp)
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
    match on {
        HashOn::Header(h) => head.headers.get(h).map(|v| stable_hash(v.as_bytes())),
        HashOn::Query(q) => head.query_param(q).map(|v| stable_hash(v.as_bytes())),
        HashOn::Cookie(c) => head.cookie(c).map(|v| stable_hash(v.as_bytes())),
        HashOn::Capture(name) => match &route.matcher.path {
            Some(crate::config::PathMatch::Template(t)) => t
                .name_index(name)
                .and_then(|i| decision.captures.get(i, head.path))
                .map(|v| stable_hash(v.as_bytes())),
            _ => None,
        },
    }
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
    let upgrade = is_upgrade(req.version(), req.headers());
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
    let path_and_query = match (&route.rewrite_prefix, &route.matcher.path) {
        (Some(to), Some(crate::config::PathMatch::Prefix(from))) => {
            let path = route::rewrite_prefix(req.uri().path(), from, to);
            let text = match req.uri().query() {
                Some(q) => format!("{path}?{q}"),
                None => path.into_owned(),
            };
            http::uri::PathAndQuery::try_from(text)
                .map_err(|e| ProxyError::BadRequest(format!("rewritten path is invalid: {e}")))?
        }
        _ => req
            .uri()
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    };
    let mut parts = http::uri::Parts::default();
    parts.scheme = Some(http::uri::Scheme::HTTP);
    parts.authority = Some(endpoint.authority.clone());
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

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

fn is_upgrade(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and the headers it names,
/// `Keep-Alive`, `Proxy-Connection`, `TE` (except `trailers`, which gRPC needs),
/// `Transfer-Encoding` and `Upgrade` (kept, with `Connection: upgrade`, for an upgrade).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if let Some(conn) = headers.get(header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',') {
                let name = name.trim();
                if keep_upgrade && name.eq_ignore_ascii_case("upgrade") {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()) {
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
    match headers.get(name) {
        Some(existing) => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + value.len());
            joined.extend_from_slice(existing.as_bytes());
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(value.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(name.clone(), v);
            }
        }
        None => {
            headers.insert(name.clone(), value.clone());
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
    start: Instant,
    method: Method,
    /// Kept only when the access log is on.
    path: Option<String>,
    route: Option<usize>,
    cluster: Option<usize>,
    /// (shard set, shard) of a shard-routed request.
    pub(crate) shard: Option<(usize, usize)>,
    pub(crate) region: Option<Arc<str>>,
    pub(crate) endpoint: Option<InFlight>,
    status: u16,
    bytes: u64,
    reason: Option<&'static str>,
}

impl Completion {
    fn new(conn: Arc<ConnCtx>, snap: Arc<Snapshot>, req: &Request<Incoming>) -> Completion {
        let path = (conn.shared.access_log.enabled() || conn.shared.recent.watched())
            .then(|| req.uri().path().to_owned());
        Completion {
            conn,
            snap,
            start: Instant::now(),
            method: req.method().clone(),
            path,
            route: None,
            cluster: None,
            shard: None,
            region: None,
            endpoint: None,
            status: 0,
            bytes: 0,
            reason: None,
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        let listener = &self.snap.config.listeners[self.conn.listener];
        if let Some(r) = self.route {
            let stats = &self.snap.listeners[self.conn.listener].routes[r];
            stats.responses[class_index(self.status)].inc();
            stats.latency.observe(elapsed);
        }
        let recent = &self.conn.shared.recent;
        if recent.watched() {
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
                endpoint: self.endpoint.as_ref().map(|e| e.0.addr),
                client: self.conn.client,
                method: self.method.as_str(),
                path: self.path.as_deref().unwrap_or(""),
                status: self.status,
                bytes: self.bytes,
                duration_ms: elapsed.as_secs_f64() * 1e3,
                reason: self.reason,
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// A response body (the upstream's, streamed, or attache's own) that carries the request's
    /// [`Completion`].
    pub struct ProxyBody {
        #[pin]
        inner: Either<Incoming, Full<Bytes>>,
        done: Completion,
    }
}

impl ProxyBody {
    fn new(inner: Either<Incoming, Full<Bytes>>, done: Completion) -> ProxyBody {
        ProxyBody { inner, done }
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
