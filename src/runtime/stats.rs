//! Counters for `INFO quota`, updated from any thread without locks.

use std::sync::atomic::{AtomicU64, Ordering};

/// One monotonically increasing counter.
pub(crate) struct Counter(AtomicU64);

impl Counter {
    const fn new() -> Counter {
        Counter(AtomicU64::new(0))
    }

    /// Adds one.
    pub(crate) fn incr(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n`.
    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

pub(crate) static PG_QUERIES: Counter = Counter::new();
pub(crate) static PG_ERRORS: Counter = Counter::new();
/// Sum of Postgres job latencies in microseconds (average = this / PG_QUERIES).
pub(crate) static PG_LATENCY_US_TOTAL: Counter = Counter::new();
pub(crate) static PG_LATENCY_US_MAX: AtomicU64 = AtomicU64::new(0);
/// Admissions that used the credit remembered on the account instead of a cache lookup
/// (reported as cache hits).
pub(crate) static CACHE_MEMO_HITS: Counter = Counter::new();
pub(crate) static ADMITS_ALLOWED: Counter = Counter::new();
pub(crate) static ADMITS_DENIED: Counter = Counter::new();
pub(crate) static ADMITS_PENDING: Counter = Counter::new();
pub(crate) static ADMITS_UNAVAILABLE: Counter = Counter::new();
pub(crate) static GRANTS: Counter = Counter::new();
pub(crate) static GRANTS_DUPLICATE: Counter = Counter::new();
pub(crate) static REVOKES: Counter = Counter::new();
pub(crate) static CLEANUPS: Counter = Counter::new();
pub(crate) static BUSY_REJECTIONS: Counter = Counter::new();
pub(crate) static TIMEOUTS: Counter = Counter::new();
pub(crate) static NOTIFY_RECEIVED: Counter = Counter::new();
pub(crate) static NOTIFY_RECONNECTS: Counter = Counter::new();

/// Records one Postgres round trip.
pub(crate) fn record_query(micros: u64, failed: bool) {
    PG_QUERIES.incr();
    if failed {
        PG_ERRORS.incr();
    }
    PG_LATENCY_US_TOTAL.add(micros);
    PG_LATENCY_US_MAX.fetch_max(micros, Ordering::Relaxed);
}
