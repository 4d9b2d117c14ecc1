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

/// A counter that only the main thread adds to (commands run there), read from any thread.
/// Adding is a plain load and store: a locked add would first wait for every store still in
/// flight, and an admission has just written to lines that were not in the cache.
pub(crate) struct MainCounter(AtomicU64);

impl MainCounter {
    pub(crate) const fn new() -> MainCounter {
        MainCounter(AtomicU64::new(0))
    }

    /// Adds one (main thread only: two threads adding at once could lose one).
    #[inline]
    pub(crate) fn incr(&self) {
        self.take_next();
    }

    /// Adds one and returns the value before it (main thread only, as `incr`).
    #[inline]
    pub(crate) fn take_next(&self) -> u64 {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(1), Ordering::Relaxed);
        v
    }

    /// The current value.
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Declares the counters (documented with `INFO quota` in the README).
macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $($(#[$doc])* pub(crate) static $name: Counter = Counter::new();)*
    };
    (main: $($(#[$doc:meta])* $name:ident),* $(,)?) => {
        $($(#[$doc])* pub(crate) static $name: MainCounter = MainCounter::new();)*
    };
}

counters! {
    PG_QUERIES, PG_ERRORS,
    /// Sum of Postgres job latencies in microseconds (average = this / PG_QUERIES).
    PG_LATENCY_US_TOTAL,
    GRANTS, GRANTS_DUPLICATE, REVOKES, CLEANUPS,
    BUSY_REJECTIONS, TIMEOUTS, NOTIFY_RECEIVED, NOTIFY_RECONNECTS,
    /// Ledger flushes that reached PostgreSQL, and those that failed.
    LEDGER_FLUSHES, LEDGER_FLUSH_ERRORS,
    /// Account batches written, and those skipped as already applied.
    LEDGER_BATCHES, LEDGER_BATCHES_SKIPPED, LEDGER_BATCHES_REVISED,
}
counters! {
    main:
    /// Admissions that used the credit remembered on the account instead of a cache lookup
    /// (reported as cache hits).
    CACHE_MEMO_HITS,
    ADMITS_ALLOWED, ADMITS_DENIED, ADMITS_PENDING, ADMITS_UNAVAILABLE,
    /// Admissions a balance paid for.
    ADMITS_BALANCE,
}
/// Main-thread microseconds of the last flush snapshot, and how many accounts it took.
pub(crate) static LEDGER_SNAPSHOT_US: AtomicU64 = AtomicU64::new(0);
pub(crate) static LEDGER_SNAPSHOT_LONGEST_US: AtomicU64 = AtomicU64::new(0);
pub(crate) static LEDGER_SNAPSHOT_ACCOUNTS: AtomicU64 = AtomicU64::new(0);
pub(crate) static PG_LATENCY_US_MAX: AtomicU64 = AtomicU64::new(0);

/// Records one Postgres round trip.
pub(crate) fn record_query(micros: u64, failed: bool) {
    PG_QUERIES.incr();
    if failed {
        PG_ERRORS.incr();
    }
    PG_LATENCY_US_TOTAL.add(micros);
    PG_LATENCY_US_MAX.fetch_max(micros, Ordering::Relaxed);
}
