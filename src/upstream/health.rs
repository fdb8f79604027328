//! Background work of a cluster: DNS re-resolution and active HTTP health checks.
//!
//! The tasks hold only a weak reference: when a reload drops the cluster, they end.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::ClusterState;

/// Starts DNS and health-check tasks for a cluster on the current runtime.
pub fn spawn_background(cluster: &Arc<ClusterState>) {
    if cluster.config.uses_dns() {
        let weak = Arc::downgrade(cluster);
        let every = cluster.config.dns_refresh;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(c) = weak.upgrade() else { return };
                if let Err(e) = c.resolve().await {
                    tracing::warn!(cluster = %c.config.name, error = %e, "DNS resolution failed; keeping last endpoints");
                }
            }
        });
    }
    if cluster.config.health_check.is_some() {
        let weak = Arc::downgrade(cluster);
        tokio::spawn(health_loop(weak));
    }
}

async fn health_loop(weak: Weak<ClusterState>) {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: hyper_util::client::legacy::Client<_, Empty<Bytes>> =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .build(connector);
    loop {
        let (interval, endpoints, check) = {
            let Some(c) = weak.upgrade() else { return };
            let Some(check) = c.config.health_check.clone() else {
                return;
            };
            (check.interval, c.endpoints().clone(), check)
        };
        let probes = endpoints.iter().map(|e| {
            let client = client.clone();
            let uri = format!("http://{}{}", e.addr, check.path);
            async move {
                let ok = match uri.parse::<http::Uri>() {
                    Ok(uri) => matches!(
                        tokio::time::timeout(check.timeout, client.get(uri)).await,
                        Ok(Ok(resp)) if resp.status().is_success()
                    ),
                    Err(_) => false,
                };
                (e.clone(), ok)
            }
        });
        let results = futures_util::future::join_all(probes).await;
        let Some(c) = weak.upgrade() else { return };
        for (e, ok) in results {
            if let Some(now) =
                e.health_result(ok, check.healthy_threshold, check.unhealthy_threshold)
            {
                tracing::info!(cluster = %c.config.name, endpoint = %e.addr, healthy = now, "endpoint health changed");
            }
        }
        drop(c);
        tokio::time::sleep(interval.max(Duration::from_millis(10))).await;
    }
}
