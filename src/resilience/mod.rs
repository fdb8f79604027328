//! Resilience: timeouts are set per route and cluster in `config`; this module owns the
//! policies and state that decide what happens when an upstream fails: retries with backoff
//! and a budget ([`retry`]), circuit breakers for clusters and endpoints, which also serve as
//! outlier ejection ([`breaker`]), and concurrency and rate limits ([`limit`]).

pub mod breaker;
pub mod limit;
pub mod retry;

pub use breaker::{Admit, Breaker, BreakerPolicy};
pub use limit::{ConcurrencyLimit, Overloaded, RateLimiter};
pub use retry::{Outcome, RetryBudget, RetryPolicy};
