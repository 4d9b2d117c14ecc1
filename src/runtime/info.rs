//! What `INFO quota` shows: the caches, PostgreSQL, the worker queue and pool, the NOTIFY
//! listener, the command counters and the usage ledger, as one section of named fields in a
//! fixed order.
//!
//! Builds plain values from the runtime's state and counters; `lib.rs` hands them to Redis's
//! `INFO` builder. Reads each lock once, one at a time, and holds none across the reply.

use std::sync::atomic::Ordering;

use super::{cache, clock, config, health, ledger, memory, notify, stats, worker};

/// The name of the section (`INFO quota` prints it as `quota_stats`).
pub(crate) const SECTION: &str = "stats";

/// One field's value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InfoValue {
    Int(i64),
    Text(String),
}

/// The fields of the section, in the order `INFO` prints them.
pub(crate) fn stats() -> Vec<(&'static str, InfoValue)> {
    use InfoValue::{Int, Text};
    let (cache_entries, cache_stats, flights, credit_bytes) = {
        let cache = cache::cache();
        let bytes = cache.bytes();
        (
            cache.len() as u64,
            cache.stats(),
            cache.flights() as u64,
            bytes,
        )
    };
    // One lock at a time (the two caches' locks are never held together).
    let cache_bytes = (credit_bytes + cache::policies().bytes()) as u64;
    let (connections, idle) = worker::pool_state();
    let queries = stats::PG_QUERIES.get();
    let avg_us = stats::PG_LATENCY_US_TOTAL
        .get()
        .checked_div(queries)
        .unwrap_or(0);
    let max_us = stats::PG_LATENCY_US_MAX.load(Ordering::Relaxed);
    let int = |v: u64| Int(i64::try_from(v).unwrap_or(i64::MAX));
    vec![
        ("cache_entries", int(cache_entries)),
        (
            "cache_max_entries",
            Int(config::int(&config::CACHE_MAX_ENTRIES)),
        ),
        ("cache_bytes", int(cache_bytes)),
        (
            "cache_max_bytes",
            int(u64::try_from(memory::cache_budget()).unwrap_or(u64::MAX)),
        ),
        (
            "cache_hits",
            int(cache_stats
                .hits
                .saturating_add(stats::CACHE_MEMO_HITS.get())),
        ),
        ("cache_misses", int(cache_stats.misses)),
        ("cache_stale_hits", int(cache_stats.stale_hits)),
        ("cache_evictions", int(cache_stats.evictions)),
        ("loads_in_flight", int(flights)),
        ("pg_queries", int(queries)),
        ("pg_errors", int(stats::PG_ERRORS.get())),
        ("pg_latency_avg_us", int(avg_us)),
        ("pg_latency_max_us", int(max_us)),
        ("pg_timeouts", int(stats::TIMEOUTS.get())),
        ("pg_down", Int(i64::from(health::is_down(clock::now_ms())))),
        ("queue_depth", int(worker::queue_depth() as u64)),
        ("clients_blocked", int(crate::ffi::blocked::blocked_total())),
        ("queue_max", Int(config::int(&config::QUEUE_MAX))),
        ("queue_busy_rejections", int(stats::BUSY_REJECTIONS.get())),
        ("pool_size", Int(config::int(&config::POOL_SIZE))),
        ("pool_connections", Int(i64::from(connections))),
        ("pool_idle", Int(i64::from(idle))),
        (
            "notify_state",
            Text(notify::notify_state_name().to_string()),
        ),
        ("notify_received", int(stats::NOTIFY_RECEIVED.get())),
        ("notify_reconnects", int(stats::NOTIFY_RECONNECTS.get())),
        ("admits_allowed", int(stats::ADMITS_ALLOWED.get())),
        ("admits_denied", int(stats::ADMITS_DENIED.get())),
        ("admits_pending", int(stats::ADMITS_PENDING.get())),
        ("admits_unavailable", int(stats::ADMITS_UNAVAILABLE.get())),
        ("grants", int(stats::GRANTS.get())),
        ("grants_duplicate", int(stats::GRANTS_DUPLICATE.get())),
        ("revokes", int(stats::REVOKES.get())),
        ("cleanups", int(stats::CLEANUPS.get())),
        ("admits_balance", int(stats::ADMITS_BALANCE.get())),
        ("ledger_accounts_pending", int(ledger::tracked() as u64)),
        ("ledger_flushes", int(stats::LEDGER_FLUSHES.get())),
        ("ledger_flush_errors", int(stats::LEDGER_FLUSH_ERRORS.get())),
        ("ledger_batches", int(stats::LEDGER_BATCHES.get())),
        (
            "ledger_batches_skipped",
            int(stats::LEDGER_BATCHES_SKIPPED.get()),
        ),
        (
            "ledger_batches_revised",
            int(stats::LEDGER_BATCHES_REVISED.get()),
        ),
        (
            "ledger_last_snapshot_us",
            int(stats::LEDGER_SNAPSHOT_US.load(Ordering::Relaxed)),
        ),
        (
            "ledger_last_snapshot_accounts",
            int(stats::LEDGER_SNAPSHOT_ACCOUNTS.load(Ordering::Relaxed)),
        ),
        (
            "ledger_last_snapshot_longest_tick_us",
            int(stats::LEDGER_SNAPSHOT_LONGEST_US.load(Ordering::Relaxed)),
        ),
        (
            "ledger_flush_waiting_ms",
            int(ledger::waiting_ms(clock::now_ms())),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Redis's builder refuses a section with a name twice, and `INFO` would then fail.
    #[test]
    fn every_field_is_named_once() {
        let fields = stats();
        let mut names: Vec<&str> = fields.iter().map(|(name, _)| *name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), fields.len());
    }
}
