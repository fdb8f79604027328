//! The admin listener: readiness, liveness, metrics, effective config, cluster state, reload,
//! and the dashboard page.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::Shared;

mod stats;

/// Serves the admin API until the process ends.
pub async fn serve(socket: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((stream, _)) = socket.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(req, shared.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    resp
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    reply(
        StatusCode::OK,
        "application/json",
        serde_json::to_vec_pretty(value).unwrap_or_default(),
    )
}

async fn handle(
    req: Request<Incoming>,
    shared: Arc<Shared>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if let Some(hook) = shared.admin_hook.get() {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let body = http_body_util::Limited::new(req.into_body(), 1 << 20)
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        if let Some(resp) = hook(method.clone(), path.clone(), body).await {
            return Ok(resp);
        }
        return Ok(builtin(&method, &path, &shared).await);
    }
    Ok(builtin(req.method(), req.uri().path(), &shared).await)
}

async fn builtin(method: &Method, path: &str, shared: &Shared) -> Response<Full<Bytes>> {
    match (method, path) {
        (&Method::GET, "/stats") => json(&stats::stats(shared)),
        (&Method::GET, "/ready") => {
            if shared.is_ready() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (&Method::GET, "/live") => reply(StatusCode::OK, "text/plain", "live\n"),
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            shared.metrics.encode(),
        ),
        (&Method::GET, "/config") => {
            let snap = shared.snapshot.load();
            let mut v = snap.config.effective();
            v["generation"] = snap.generation.into();
            json(&v)
        }
        (&Method::GET, "/clusters") => {
            let snap = shared.snapshot.load();
            json(&serde_json::json!({
                "generation": snap.generation,
                "clusters": snap.clusters.iter().map(|c| c.status_json()).collect::<Vec<_>>(),
            }))
        }
        (&Method::POST, "/reload") => match shared.reload().await {
            Ok(generation) => {
                json(&serde_json::json!({ "reloaded": true, "generation": generation }))
            }
            Err(e) => {
                let mut r = json(
                    &serde_json::json!({ "reloaded": false, "errors": e.lines().collect::<Vec<_>>() }),
                );
                *r.status_mut() = StatusCode::BAD_REQUEST;
                r
            }
        },
        (&Method::GET, "/") => reply(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "not found: try /, /ready, /live, /metrics, /config, /clusters, /stats\n",
        ),
    }
}

/// The dashboard page: self-contained, polls `/stats`.
const DASHBOARD: &str = include_str!("dashboard.html");
