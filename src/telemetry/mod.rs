//! Telemetry: Prometheus metrics and the JSON access log.
//!
//! Metric handles are resolved once per config snapshot (per route, per cluster), so the
//! request path only touches atomics: no label hashing, no registry lock.

pub mod access_log;
pub mod metrics;
pub mod recent;

pub use access_log::{AccessLog, LogRecord};
pub use metrics::{
    ClusterStats, DirectoryStats, Histogram, ListenerStats, Metrics, RouteStats, ShardStats,
};
