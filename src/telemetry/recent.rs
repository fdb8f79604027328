//! The last requests, for the dashboard. Recorded only while someone watches (the dashboard
//! polled `/stats` in the last 10 seconds), so the request path pays one atomic load otherwise.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// How many requests are kept.
pub const KEEP: usize = 50;
const WATCH_WINDOW_MS: u64 = 10_000;

/// One request, as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Recent {
    pub ts_ms: u64,
    pub listener: String,
    pub route: Option<String>,
    pub cluster: Option<String>,
    pub shard: Option<String>,
    pub region: Option<String>,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub duration_ms: f64,
    pub reason: Option<&'static str>,
}

/// A bounded ring of recent requests.
pub struct RecentRequests {
    ring: Mutex<VecDeque<Recent>>,
    watched_until_ms: AtomicU64,
    epoch: Instant,
}

impl Default for RecentRequests {
    fn default() -> Self {
        RecentRequests {
            ring: Mutex::new(VecDeque::with_capacity(KEEP)),
            watched_until_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl RecentRequests {
    /// Whether requests should be recorded now.
    pub fn watched(&self) -> bool {
        self.watched_at(Instant::now())
    }

    /// [`watched`](Self::watched) with a clock reading the caller already has.
    pub fn watched_at(&self, now: Instant) -> bool {
        let until = self.watched_until_ms.load(Ordering::Relaxed);
        until != 0 && (now.saturating_duration_since(self.epoch).as_millis() as u64) < until
    }

    /// Marks that someone is watching (called by `/stats`).
    pub fn watch(&self) {
        let until = self.epoch.elapsed().as_millis() as u64 + WATCH_WINDOW_MS;
        self.watched_until_ms.store(until, Ordering::Relaxed);
    }

    /// Records a request; skipped when the ring is busy rather than waiting.
    pub fn record(&self, r: Recent) {
        if let Ok(mut ring) = self.ring.try_lock() {
            if ring.len() == KEEP {
                ring.pop_front();
            }
            ring.push_back(r);
        }
    }

    /// The recorded requests, newest last.
    pub fn list(&self) -> Vec<Recent> {
        self.ring
            .lock()
            .map(|r| r.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
