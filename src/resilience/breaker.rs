//! Circuit breakers: closed, open, half-open, as straight-line code over a few atomics.
//!
//! A breaker trips on consecutive failures, or on a failure rate over a sliding window once
//! the window holds a minimum number of requests. While open, requests are refused at once
//! (no waiting on the dead upstream). When the open period ends, a few probes go through
//! (half-open): a success closes the breaker, a failure opens it again for longer (the open
//! period doubles on each repeated trip, up to a maximum). The same type serves clusters
//! (answering 503 `circuit-open`) and endpoints (outlier ejection: the balancer skips them).

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When a breaker trips and how it recovers (a plain value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Trip after this many failures in a row (0: never on this rule).
    pub consecutive_failures: u32,
    /// Trip when failures/requests over `window` reaches this (per thousand; 0: never).
    pub failure_rate_permille: u32,
    pub window: Duration,
    /// The failure rate counts only once the window holds this many requests.
    pub min_requests: u32,
    /// First open period; doubles on each trip that follows a failed probe.
    pub open_for: Duration,
    pub max_open_for: Duration,
    /// Requests let through while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            consecutive_failures: 5,
            failure_rate_permille: 500,
            window: Duration::from_secs(10),
            min_requests: 20,
            open_for: Duration::from_secs(5),
            max_open_for: Duration::from_secs(60),
            half_open_probes: 1,
        }
    }
}

/// The state of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u8)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    fn from_u8(v: u8) -> State {
        match v {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// As a gauge value: 0 closed, 1 open, 2 half-open.
    pub fn as_gauge(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }
}

const SLOTS: usize = 10;

/// A circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    policy: BreakerPolicy,
    state: AtomicU8,
    consecutive: AtomicU32,
    /// Per window slot: (slot number, requests << 32 | failures).
    slots: [(AtomicU64, AtomicU64); SLOTS],
    /// Milliseconds since `epoch`.
    since_ms: AtomicU64,
    open_until_ms: AtomicU64,
    probes: AtomicU32,
    trips: AtomicU32,
    /// State changes so far.
    pub transitions: AtomicU64,
    epoch: Instant,
    /// Serialises state changes (rare); checks and records never take it.
    change: Mutex<()>,
}

/// Whether a request may go, and if so whether it is a half-open probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    Probe,
    No,
}

impl Breaker {
    pub fn new(policy: BreakerPolicy) -> Breaker {
        Breaker {
            policy,
            state: AtomicU8::new(0),
            consecutive: AtomicU32::new(0),
            slots: std::array::from_fn(|_| (AtomicU64::new(u64::MAX), AtomicU64::new(0))),
            since_ms: AtomicU64::new(0),
            open_until_ms: AtomicU64::new(0),
            probes: AtomicU32::new(0),
            trips: AtomicU32::new(0),
            transitions: AtomicU64::new(0),
            epoch: Instant::now(),
            change: Mutex::new(()),
        }
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether a request would be admitted now, without taking a probe slot (for balancers).
    pub fn would_admit(&self) -> bool {
        match self.state() {
            State::Closed => true,
            State::Open => self.now_ms() >= self.open_until_ms.load(Ordering::Relaxed),
            State::HalfOpen => self.probes.load(Ordering::Relaxed) < self.policy.half_open_probes,
        }
    }

    /// Admits a request or refuses it. A probe must be followed by [`record`](Self::record).
    pub fn admit(&self) -> Admit {
        match self.state() {
            State::Closed => Admit::Yes,
            State::Open => {
                if self.now_ms() < self.open_until_ms.load(Ordering::Relaxed) {
                    return Admit::No;
                }
                self.transition(State::Open, State::HalfOpen);
                self.take_probe()
            }
            State::HalfOpen => self.take_probe(),
        }
    }

    fn take_probe(&self) -> Admit {
        let max = self.policy.half_open_probes;
        match self
            .probes
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |p| {
                (p < max).then_some(p + 1)
            }) {
            Ok(_) => Admit::Probe,
            Err(_) => Admit::No,
        }
    }

    /// Records how an admitted request ended.
    pub fn record(&self, admitted: Admit, success: bool) {
        if admitted == Admit::Probe {
            self.probes.fetch_sub(1, Ordering::AcqRel);
            if success {
                if self.transition(State::HalfOpen, State::Closed) {
                    self.trips.store(0, Ordering::Relaxed);
                }
            } else {
                self.trip(State::HalfOpen);
            }
            return;
        }
        // The common case, a success with no failure-rate rule, touches one atomic (and writes
        // it only after a failure).
        if success && self.policy.failure_rate_permille == 0 {
            if self.consecutive.load(Ordering::Relaxed) != 0 {
                self.consecutive.store(0, Ordering::Relaxed);
            }
            return;
        }
        let (requests, failures) = if self.policy.failure_rate_permille > 0 {
            self.count(success)
        } else {
            (0, 0)
        };
        if success {
            self.consecutive.store(0, Ordering::Relaxed);
            return;
        }
        let consecutive = self.consecutive.fetch_add(1, Ordering::Relaxed) + 1;
        let p = &self.policy;
        let by_count = p.consecutive_failures > 0 && consecutive >= p.consecutive_failures;
        let by_rate = p.failure_rate_permille > 0
            && requests >= u64::from(p.min_requests)
            && failures * 1000 >= requests * u64::from(p.failure_rate_permille);
        if by_count || by_rate {
            self.trip(State::Closed);
        }
    }

    /// Adds one request to the window; returns the window's (requests, failures).
    fn count(&self, success: bool) -> (u64, u64) {
        let slot_ms = (self.policy.window.as_millis() as u64 / SLOTS as u64).max(1);
        let now_slot = self.now_ms() / slot_ms;
        let (number, counts) = &self.slots[(now_slot as usize) % SLOTS];
        let seen = number.load(Ordering::Acquire);
        if seen != now_slot
            && number
                .compare_exchange(seen, now_slot, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            counts.store(0, Ordering::Release);
        }
        counts.fetch_add((1 << 32) | u64::from(!success), Ordering::AcqRel);
        let mut requests = 0;
        let mut failures = 0;
        for (n, c) in &self.slots {
            let n = n.load(Ordering::Acquire);
            if n != u64::MAX && n + SLOTS as u64 > now_slot {
                let v = c.load(Ordering::Acquire);
                requests += v >> 32;
                failures += v & 0xffff_ffff;
            }
        }
        (requests, failures)
    }

    fn trip(&self, from: State) {
        let trips = self.trips.load(Ordering::Relaxed);
        let open_for = self
            .policy
            .open_for
            .saturating_mul(1u32 << trips.min(16))
            .min(self.policy.max_open_for);
        if self.transition(from, State::Open) {
            self.open_until_ms.store(
                self.now_ms() + open_for.as_millis() as u64,
                Ordering::Relaxed,
            );
            self.trips.fetch_add(1, Ordering::Relaxed);
            self.consecutive.store(0, Ordering::Relaxed);
            for (n, c) in &self.slots {
                n.store(u64::MAX, Ordering::Relaxed);
                c.store(0, Ordering::Relaxed);
            }
        }
    }

    fn transition(&self, from: State, to: State) -> bool {
        let Ok(_guard) = self.change.lock() else {
            return false;
        };
        if self.state() != from {
            return false;
        }
        self.state.store(to as u8, Ordering::Release);
        self.since_ms.store(self.now_ms(), Ordering::Relaxed);
        self.transitions.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// For `/clusters`: state, for how long, and when it next lets a probe through.
    pub fn status_json(&self) -> serde_json::Value {
        let now = self.now_ms();
        let state = self.state();
        let next_probe_ms = match state {
            State::Open => Some(
                self.open_until_ms
                    .load(Ordering::Relaxed)
                    .saturating_sub(now),
            ),
            _ => None,
        };
        serde_json::json!({
            "state": state,
            "since_ms": now.saturating_sub(self.since_ms.load(Ordering::Relaxed)),
            "next_probe_ms": next_probe_ms,
            "transitions": self.transitions.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BreakerPolicy {
        BreakerPolicy {
            consecutive_failures: 3,
            failure_rate_permille: 0,
            open_for: Duration::from_millis(50),
            max_open_for: Duration::from_millis(400),
            ..BreakerPolicy::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_a_probe() {
        let b = Breaker::new(policy());
        for _ in 0..2 {
            assert_eq!(b.admit(), Admit::Yes);
            b.record(Admit::Yes, false);
        }
        assert_eq!(b.state(), State::Closed);
        b.record(Admit::Yes, false);
        assert_eq!(b.state(), State::Open);
        assert_eq!(b.admit(), Admit::No);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Admit::Probe);
        assert_eq!(b.admit(), Admit::No, "one probe at a time");
        b.record(Admit::Probe, true);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.transitions.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn a_failed_probe_reopens_for_longer() {
        let b = Breaker::new(policy());
        for _ in 0..3 {
            b.record(Admit::Yes, false);
        }
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Admit::Probe);
        b.record(Admit::Probe, false);
        assert_eq!(b.state(), State::Open);
        // Second trip: 100 ms open.
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Admit::No);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit(), Admit::Probe);
    }

    #[test]
    fn trips_on_failure_rate() {
        let b = Breaker::new(BreakerPolicy {
            consecutive_failures: 0,
            failure_rate_permille: 500,
            min_requests: 10,
            ..BreakerPolicy::default()
        });
        for i in 0..9 {
            b.record(Admit::Yes, i % 2 == 0);
        }
        assert_eq!(b.state(), State::Closed, "below the minimum");
        b.record(Admit::Yes, false);
        b.record(Admit::Yes, false);
        assert_eq!(b.state(), State::Open);
    }
}
