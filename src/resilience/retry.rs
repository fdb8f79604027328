//! Retries: which outcomes may be tried again, how long to wait, and the budget that keeps
//! retries from multiplying an outage.
//!
//! A retry budget (as Finagle and linkerd have it) allows retries up to a ratio of recent
//! requests plus a small floor per second; when it is empty, failures are answered at once.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, Method, StatusCode};

/// The request header that turns retries off for one request (`x-attache-retry: off`).
static X_ATTACHE_RETRY: HeaderName = HeaderName::from_static("x-attache-retry");

/// What an attempt came to, as far as retrying is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The connection could not be made: the upstream never saw the request.
    ConnectFailed,
    /// The connection broke before a response head arrived.
    Reset,
    /// No response head within the per-try timeout.
    Timeout,
    /// A response arrived with this status (and gRPC status, when it is in the head).
    Response {
        status: StatusCode,
        grpc: Option<u32>,
    },
}

/// The retry policy of a cluster or route (a plain value: decisions are pure methods).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries, the first included (1 = no retries).
    pub attempts: u32,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_timeout: bool,
    /// Response statuses that are retried.
    pub statuses: Vec<u16>,
    /// gRPC statuses (from `grpc-status` in a trailers-only response head) that are retried.
    pub grpc: Vec<u32>,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Budget: retries may be at most this many per thousand requests...
    pub budget_permille: u32,
    /// ...plus this many per second.
    pub budget_min_per_second: u32,
    /// A non-idempotent request carrying this header may be retried.
    pub idempotency_header: HeaderName,
    /// Largest body kept for a replay; larger requests are not retried.
    pub max_body: usize,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            on_connect_failure: true,
            on_reset: true,
            on_timeout: false,
            statuses: vec![502, 503, 504],
            grpc: vec![14],
            backoff_base: Duration::from_millis(25),
            backoff_max: Duration::from_millis(250),
            budget_permille: 200,
            budget_min_per_second: 10,
            idempotency_header: HeaderName::from_static("idempotency-key"),
            max_body: 64 * 1024,
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    pub fn off() -> Self {
        RetryPolicy {
            attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// Whether a request may be retried at all: idempotent methods, or any method with the
    /// idempotency header; never when the client opted out with `x-attache-retry: off`.
    pub fn may_retry(&self, method: &Method, headers: crate::route::Fields<'_>) -> bool {
        if self.attempts <= 1 {
            return false;
        }
        if headers
            .get(&X_ATTACHE_RETRY)
            .is_some_and(|v| v.eq_ignore_ascii_case(b"off"))
        {
            return false;
        }
        is_idempotent(method) || headers.contains(&self.idempotency_header)
    }

    /// After try number `attempt` (1-based) ended with `outcome`: wait this long and try again,
    /// or `None`. `safe` says whether the request may be retried (see [`may_retry`]); a connect
    /// failure is retried even when it is not, since the upstream never saw the request.
    /// `retry_after` is the upstream's `Retry-After`, which is honoured up to `backoff_max`
    /// (longer means "not now": no retry).
    pub fn should_retry(
        &self,
        attempt: u32,
        outcome: Outcome,
        safe: bool,
        retry_after: Option<Duration>,
    ) -> Option<Duration> {
        if attempt >= self.attempts {
            return None;
        }
        let retryable = match outcome {
            Outcome::ConnectFailed => self.on_connect_failure,
            Outcome::Reset => safe && self.on_reset,
            Outcome::Timeout => safe && self.on_timeout,
            Outcome::Response { status, grpc } => {
                safe && (self.statuses.contains(&status.as_u16())
                    || grpc.is_some_and(|g| self.grpc.contains(&g)))
            }
        };
        if !retryable {
            return None;
        }
        match retry_after {
            Some(d) if d > self.backoff_max => None,
            Some(d) => Some(d),
            None => Some(self.backoff(attempt)),
        }
    }

    /// Exponential backoff with full jitter: uniform in [0, min(max, base × 2^(attempt-1))].
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .backoff_base
            .saturating_mul(1u32 << (attempt.saturating_sub(1)).min(16));
        let cap = exp.min(self.backoff_max);
        cap.mul_f64(fastrand::f64())
    }
}

/// Methods whose repetition has the same effect as one request (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Parses `Retry-After` in seconds (the HTTP-date form is not retried on: it means later).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(http::header::RETRY_AFTER)?.to_str().ok()?;
    v.trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
        .or(Some(Duration::MAX))
}

/// The retry budget of one cluster: tokens in thousandths of a retry.
///
/// Each request deposits `permille` thousandths; each retry withdraws 1000. The floor adds
/// `min_per_second` retries each second, up to one second's worth. Deposits are capped at what
/// 100 requests bring, so a long calm period cannot save up for a storm. Over any interval of
/// `t` seconds with `n` requests, retries ≤ n × permille/1000 + min_per_second × (t + 1).
#[derive(Debug)]
pub struct RetryBudget {
    permille: u32,
    min_per_second: u32,
    deposits: AtomicI64,
    floor: AtomicI64,
    floor_refilled_ms: AtomicU64,
    epoch: Instant,
    /// Retries refused because the budget was empty.
    pub exhausted: AtomicU64,
}

impl RetryBudget {
    pub fn new(permille: u32, min_per_second: u32) -> RetryBudget {
        RetryBudget {
            permille,
            min_per_second,
            deposits: AtomicI64::new(0),
            floor: AtomicI64::new(i64::from(min_per_second) * 1000),
            floor_refilled_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            exhausted: AtomicU64::new(0),
        }
    }

    /// Every request (not retry) deposits.
    pub fn deposit(&self) {
        let cap = i64::from(self.permille) * 100;
        let add = i64::from(self.permille);
        let _ = self
            .deposits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                Some((d + add).min(cap))
            });
    }

    /// Takes one retry from the budget; `false` when it is empty.
    pub fn withdraw(&self) -> bool {
        self.refill_floor();
        if self
            .deposits
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |d| {
                (d >= 1000).then_some(d - 1000)
            })
            .is_ok()
        {
            return true;
        }
        if self
            .floor
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                (f >= 1000).then_some(f - 1000)
            })
            .is_ok()
        {
            return true;
        }
        self.exhausted.fetch_add(1, Ordering::Relaxed);
        false
    }

    fn refill_floor(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.floor_refilled_ms.load(Ordering::Relaxed);
        if now < last + 1000 {
            return;
        }
        if self
            .floor_refilled_ms
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
        {
            self.floor
                .store(i64::from(self.min_per_second) * 1000, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resp(status: u16) -> Outcome {
        Outcome::Response {
            status: StatusCode::from_u16(status).unwrap(),
            grpc: None,
        }
    }

    #[test]
    fn retries_what_is_safe_and_retryable() {
        let p = RetryPolicy::default();
        assert!(
            p.should_retry(1, Outcome::ConnectFailed, false, None)
                .is_some(),
            "never reached the upstream"
        );
        assert!(
            p.should_retry(1, Outcome::Reset, false, None).is_none(),
            "a POST may have been seen"
        );
        assert!(p.should_retry(1, Outcome::Reset, true, None).is_some());
        assert!(p.should_retry(1, resp(503), true, None).is_some());
        assert!(p.should_retry(1, resp(500), true, None).is_none());
        assert!(p.should_retry(1, resp(200), true, None).is_none());
        assert!(
            p.should_retry(2, resp(503), true, None).is_none(),
            "attempts are bounded"
        );
        let grpc = Outcome::Response {
            status: StatusCode::OK,
            grpc: Some(14),
        };
        assert!(
            p.should_retry(1, grpc, true, None).is_some(),
            "gRPC UNAVAILABLE"
        );
        assert_eq!(
            p.should_retry(1, resp(503), true, Some(Duration::from_millis(100))),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            p.should_retry(1, resp(503), true, Some(Duration::from_secs(30))),
            None
        );
    }

    #[test]
    fn only_idempotent_or_keyed_requests_may_retry() {
        let p = RetryPolicy::default();
        let mut h = HeaderMap::new();
        assert!(p.may_retry(&Method::GET, (&h).into()));
        assert!(!p.may_retry(&Method::POST, (&h).into()));
        h.insert("idempotency-key", "abc".parse().unwrap());
        assert!(p.may_retry(&Method::POST, (&h).into()));
        h.insert("x-attache-retry", "off".parse().unwrap());
        assert!(!p.may_retry(&Method::GET, (&h).into()));
        assert!(!RetryPolicy::off().may_retry(&Method::GET, (&HeaderMap::new()).into()));
    }

    #[test]
    fn backoff_is_jittered_and_capped() {
        let p = RetryPolicy::default();
        for attempt in 1..10 {
            let d = p.backoff(attempt);
            assert!(d <= p.backoff_max);
        }
        let spread: std::collections::HashSet<_> = (0..20).map(|_| p.backoff(3)).collect();
        assert!(spread.len() > 10, "jitter spreads retries");
    }

    #[test]
    fn budget_bounds_retries() {
        let b = RetryBudget::new(200, 3);
        let mut retries = 0;
        for _ in 0..100 {
            b.deposit();
            if b.withdraw() {
                retries += 1;
            }
        }
        // 100 requests at 20% plus a floor of 3.
        assert!(retries <= 20 + 3, "{retries}");
        assert!(retries >= 20, "{retries}");
        assert!(b.exhausted.load(Ordering::Relaxed) > 0);
    }
}
