//! The module under Redis's `maxmemory`: the byte budget of the credit and policy caches, and
//! a warning when the eviction policy can evict account keys.
//!
//! The caches live in the module's memory, which counts in Redis's `used_memory` like keys do:
//! unbounded, they would push Redis into evicting keys (account keys among them) or refusing
//! writes. Each cache is held to `quota.cache-max-memory` bytes, or when that is 0 to a tenth
//! of `maxmemory` (no byte bound without `maxmemory`; `quota.cache-max-entries` bounds it
//! still). Redis's own settings are read at load and again after each `CONFIG SET` of them;
//! the caller then gives the caches their new tunables.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::config;
use crate::ffi::ctx::Ctx;
use crate::ffi::key_events::server_setting;

/// `maxmemory` in bytes as last read (0 = no limit).
static MAXMEMORY: AtomicU64 = AtomicU64::new(0);
/// The eviction policy last read can evict account keys (warned about once per change).
static UNSAFE_POLICY: AtomicBool = AtomicBool::new(false);

/// The share of `maxmemory` each cache may take when `quota.cache-max-memory` is 0.
const AUTO_SHARE: u64 = 10;

/// The byte bound of each cache.
pub(crate) fn cache_budget() -> usize {
    let configured = u64::try_from(config::int(&config::CACHE_MAX_MEMORY)).unwrap_or(0);
    let bytes = match (configured, MAXMEMORY.load(Ordering::Relaxed)) {
        (0, 0) => u64::MAX,
        (0, max) => (max / AUTO_SHARE).max(1 << 20),
        (n, _) => n,
    };
    usize::try_from(bytes).unwrap_or(usize::MAX)
}

/// Whether an eviction policy can evict account keys: every policy but `noeviction` (account
/// keys carry an expiry while their windows count, so the `volatile-*` policies pick them
/// too).
pub(crate) fn is_unsafe_policy(policy: &str) -> bool {
    !policy.eq_ignore_ascii_case("noeviction")
}

/// Reads `maxmemory` and `maxmemory-policy` again: applies the cache budget, and warns when
/// Redis may now evict account keys.
pub(crate) fn refresh(ctx: Ctx) {
    let max = server_setting(ctx, c"maxmemory")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    MAXMEMORY.store(max, Ordering::Relaxed);
    let policy = server_setting(ctx, c"maxmemory-policy").unwrap_or_default();
    let risky = max > 0 && is_unsafe_policy(&policy);
    if risky && !UNSAFE_POLICY.swap(true, Ordering::Relaxed) {
        super::alerts::warning(&format!(
            "quota: maxmemory-policy is {policy} with maxmemory {max}: Redis may evict \
             account keys under memory pressure, and an evicted account's counters start again \
             from zero (its limits can be exceeded; its usage not flushed yet still reaches the \
             ledger). Use noeviction: admissions are then refused with OOM instead"
        ));
    } else if !risky {
        UNSAFE_POLICY.store(false, Ordering::Relaxed);
    }
}

/// Whether a `CONFIG SET` of these settings changes what `refresh` reads.
pub(crate) fn concerns(names: &[&str]) -> bool {
    names
        .iter()
        .any(|n| n.eq_ignore_ascii_case("maxmemory") || n.eq_ignore_ascii_case("maxmemory-policy"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_noeviction_keeps_account_keys() {
        assert!(!is_unsafe_policy("noeviction"));
        for p in [
            "allkeys-lru",
            "allkeys-lfu",
            "allkeys-random",
            "volatile-lru",
            "volatile-lfu",
            "volatile-random",
            "volatile-ttl",
        ] {
            assert!(is_unsafe_policy(p), "{p}");
        }
    }
}
