//! Limits: concurrency per cluster (in-flight and pending), and local rate limits per route,
//! optionally per key with bounded memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// At most `max_requests` in flight to a cluster, and at most `max_pending` waiting for a slot.
#[derive(Debug)]
pub struct ConcurrencyLimit {
    slots: Arc<Semaphore>,
    pending: AtomicUsize,
    max_pending: usize,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Overloaded;

impl ConcurrencyLimit {
    pub fn new(max_requests: usize, max_pending: usize) -> ConcurrencyLimit {
        ConcurrencyLimit {
            slots: Arc::new(Semaphore::new(max_requests.max(1))),
            pending: AtomicUsize::new(0),
            max_pending,
        }
    }

    /// A slot now, or after waiting (up to `wait`) among at most `max_pending` others.
    pub async fn acquire(&self, wait: Duration) -> Result<OwnedSemaphorePermit, Overloaded> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(p);
        }
        if self.pending.fetch_add(1, Ordering::AcqRel) >= self.max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(Overloaded);
        }
        let got = tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await;
        self.pending.fetch_sub(1, Ordering::AcqRel);
        match got {
            Ok(Ok(p)) => Ok(p),
            _ => Err(Overloaded),
        }
    }

    /// Requests waiting for a slot.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A token bucket: `rate` per second, up to `burst` at once; per key when keyed, with at most
/// `max_keys` buckets (idle full buckets are dropped first, then arbitrary ones).
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    max_keys: usize,
    shared: Mutex<Bucket>,
    keyed: Mutex<HashMap<Box<str>, Bucket>>,
}

impl RateLimiter {
    pub fn new(rate: f64, burst: u32, max_keys: usize) -> RateLimiter {
        let burst = f64::from(burst.max(1));
        RateLimiter {
            rate,
            burst,
            max_keys: max_keys.max(1),
            shared: Mutex::new(Bucket {
                tokens: burst,
                at: Instant::now(),
            }),
            keyed: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token; on refusal, how long until one is there (for `Retry-After`).
    pub fn check(&self, key: Option<&str>) -> Result<(), Duration> {
        let now = Instant::now();
        match key {
            None => {
                let Ok(mut b) = self.shared.lock() else {
                    return Ok(());
                };
                self.take(&mut b, now)
            }
            Some(k) => {
                let Ok(mut map) = self.keyed.lock() else {
                    return Ok(());
                };
                if !map.contains_key(k) && map.len() >= self.max_keys {
                    let (rate, burst) = (self.rate, self.burst);
                    map.retain(|_, b| {
                        b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst
                    });
                    while map.len() >= self.max_keys {
                        let Some(victim) = map.keys().next().cloned() else {
                            break;
                        };
                        map.remove(&victim);
                    }
                }
                let b = map.entry(k.into()).or_insert(Bucket {
                    tokens: self.burst,
                    at: now,
                });
                self.take(b, now)
            }
        }
    }

    fn take(&self, b: &mut Bucket, now: Instant) -> Result<(), Duration> {
        b.tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.rate).min(self.burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - b.tokens) / self.rate))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limit_allows_the_burst_then_the_rate() {
        let r = RateLimiter::new(10.0, 5, 100);
        let allowed = (0..20).filter(|_| r.check(None).is_ok()).count();
        assert_eq!(allowed, 5);
        let wait = r.check(None).unwrap_err();
        assert!(wait <= Duration::from_millis(100));
    }

    #[test]
    fn keyed_buckets_are_separate_and_bounded() {
        let r = RateLimiter::new(1.0, 1, 3);
        assert!(r.check(Some("a")).is_ok());
        assert!(r.check(Some("a")).is_err());
        assert!(r.check(Some("b")).is_ok());
        for k in ["c", "d", "e", "f"] {
            let _ = r.check(Some(k));
        }
        assert!(r.keyed.lock().unwrap().len() <= 3);
    }

    #[tokio::test]
    async fn concurrency_limit_queues_then_refuses() {
        let l = ConcurrencyLimit::new(1, 1);
        let first = l.acquire(Duration::from_millis(10)).await.unwrap();
        // One may wait; it times out here since the slot is held.
        assert_eq!(
            l.acquire(Duration::from_millis(10)).await.unwrap_err(),
            Overloaded
        );
        drop(first);
        assert!(l.acquire(Duration::from_millis(10)).await.is_ok());
    }
}
