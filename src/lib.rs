//! attache: an ambassador sidecar.
//!
//! An application talks plain HTTP (or TCP) to attache on localhost; attache sends each request
//! to the right remote service and adds what every client should have: routing, load
//! balancing, health checks, shard routing with residency, traffic splits, timeouts, retries,
//! circuit breakers, metrics and access logs (TLS origination follows in a later issue: one more
//! kind of cluster, not another request path).
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | [`config`] | the YAML file, its validation into an immutable [`config::Config`] |
//! | [`listener`] | sockets (SO_REUSEPORT per worker), HTTP/1.1 (attache's own server for requests without a body or with a small one, hyper's for the rest) + h2c and TCP accept loops |
//! | [`route`] | route selection: a pure function of the request head |
//! | [`shard`] | shard keys, directories (cached lookups), residency plans, scatter-gather |
//! | [`split`] | traffic splits: the variant a request gets (override, allow list, sticky weight) |
//! | [`balance`] | endpoint selection: least request (P2C), round robin, consistent hash |
//! | [`upstream`] | clusters at run time: endpoints, pools, DNS, health checks |
//! | [`proxy`] | the request path, step by step, and per-request accounting |
//! | [`error`] | errors attache answers itself and their HTTP mapping |
//! | [`telemetry`] | Prometheus metrics and the JSON access log |
//! | [`admin`] | the admin listener: `/ready`, `/live`, `/metrics`, `/config`, `/clusters`, `/` |
//! | [`explain`] | `attache explain`: the proxy's decision for a request, without sending it |
//! | [`resilience`] | retries with budgets, circuit breakers (outlier ejection), concurrency and rate limits |
//! | [`state`] | the config snapshot swapped on reload, shared by every worker |
//! | [`server`] | process lifecycle: workers, signals, reload, drain |
//! | [`demo`] | `attache demo`: the seed's image-sharing system (feed, users, sharded image store) on one machine, with fault controls |
//!
//! # Request path
//!
//! ```text
//!  app ──HTTP──▶ listener (worker thread, own socket); a head attache parses itself gets
//!                  │  no header map: its fields are read in place (route::Fields)
//!                  ▼
//!          proxy::handle ── snapshot.load() ── Completion (metrics + log on body end)
//!                  │
//!     decide:  route::select ─▶ destination (cluster | shards | split) ─▶ balance::pick
//!                  │
//!     act:     HTTP/1.1 upstream, body in memory: encode_upstream_request writes the
//!              upstream head from the client's (rewrite, hop-by-hop, forwarded, header
//!              ops); otherwise prepare_request shapes the request in place for hyper
//!                  │
//!              upstream pool (per worker, per cluster) ──▶ endpoint
//!                  │
//!              response ──▶ header ops (or its header lines as they are) ──▶ back to the app
//! ```

pub mod admin;
pub mod balance;
pub mod config;
pub mod demo;
pub mod error;
pub mod explain;
pub mod listener;
pub mod proxy;
pub mod resilience;
pub mod route;
pub mod server;
pub mod shard;
pub mod split;
pub mod state;
pub mod telemetry;
pub mod upstream;
