//! The JSON access log: one line per request, written in batches.
//!
//! Each worker formats into its own thread-local buffer and writes it out when it passes 16 KiB
//! or when the worker's flush tick comes (every 100 ms), so logging costs one `write` per batch
//! rather than one per request, and workers never share a lock.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::config;

/// How often each worker writes out its buffered lines.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
const FLUSH_AT: usize = 16 * 1024;

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(FLUSH_AT * 2));
}

/// Where lines go.
#[derive(Debug)]
pub enum AccessLog {
    Off,
    Stdout,
    File(File),
}

/// One request, as logged.
#[derive(Debug, serde::Serialize)]
pub struct LogRecord<'a> {
    pub ts: String,
    pub listener: &'a str,
    pub route: Option<&'a str>,
    pub cluster: Option<&'a str>,
    pub shard: Option<&'a str>,
    pub region: Option<&'a str>,
    /// The variant of a split route.
    pub variant: Option<&'a str>,
    pub endpoint: Option<SocketAddr>,
    pub client: SocketAddr,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub duration_ms: f64,
    pub reason: Option<&'a str>,
    /// Tries sent upstream: more than 1 when retried or hedged.
    pub attempts: u32,
}

impl AccessLog {
    /// Opens the configured target.
    pub fn open(target: &config::AccessLog) -> std::io::Result<AccessLog> {
        Ok(match target {
            config::AccessLog::Off => AccessLog::Off,
            config::AccessLog::Stdout => AccessLog::Stdout,
            config::AccessLog::File(p) => {
                AccessLog::File(OpenOptions::new().create(true).append(true).open(p)?)
            }
        })
    }

    /// Whether lines are written at all (callers skip building records when not).
    pub fn enabled(&self) -> bool {
        !matches!(self, AccessLog::Off)
    }

    /// Buffers one line; writes the buffer out when it is large.
    pub fn write(&self, record: &LogRecord<'_>) {
        if !self.enabled() {
            return;
        }
        let full = BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            if serde_json::to_writer(&mut *b, record).is_ok() {
                b.push(b'\n');
            }
            b.len() >= FLUSH_AT
        });
        if full {
            self.flush();
        }
    }

    /// Writes out this thread's buffered lines.
    pub fn flush(&self) {
        BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            if b.is_empty() {
                return;
            }
            let _ = match self {
                AccessLog::Off => Ok(()),
                AccessLog::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&b).and_then(|_| out.flush())
                }
                AccessLog::File(f) => (&*f).write_all(&b),
            };
            b.clear();
        });
    }
}

/// Now as RFC 3339 UTC with milliseconds, e.g. `2026-11-27T08:00:00.123Z`.
pub fn now_rfc3339() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        now.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's algorithm (a few lines; a
/// date crate would be a dependency for one function).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}
