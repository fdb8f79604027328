//! The admin listener: readiness, liveness, metrics, effective config, cluster state, reload,
//! and the dashboard page.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::Shared;

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
    let resp = match (req.method(), req.uri().path()) {
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
            "not found: try /, /ready, /live, /metrics, /config, /clusters\n",
        ),
    };
    Ok(resp)
}

/// The dashboard page: self-contained, polls `/clusters` and `/metrics`.
const DASHBOARD: &str = include_str!("dashboard.html");
