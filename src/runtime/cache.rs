//! The shared caches: user credits and named policies, each behind a mutex with its epoch
//! published on release (the main thread's memo of recently read policies, a speed trick, is
//! in `policy_memo`).
//!
//! Worker and listener threads update the caches without the Redis lock; a lock is held only
//! for in-memory work, never across a Postgres call or a reply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::config;
use super::jobs::Waiter;
use crate::core::cache::{Cache, CacheConfig, CacheValue, Lookup, UserCredits};
use crate::core::policy::CachedPolicy;
use crate::core::Millis;

/// How long a user whose load failed is decided without credits before Postgres is tried again.
pub(crate) const RETRY_AFTER_FAILURE_MS: Millis = 1000;

static CACHE: LazyLock<Mutex<Cache<Waiter>>> =
    LazyLock::new(|| Mutex::new(Cache::new(cache_config())));

/// The cache's epoch as of the last time its lock was released (see `cache_epoch`).
static CACHE_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The credits cache, locked (recovers from a poisoned lock: the data stays consistent per
/// call). Releasing it publishes the cache's epoch for `cache_epoch`.
pub(crate) fn cache() -> CacheGuard<Waiter> {
    CacheGuard::lock(&CACHE, &CACHE_EPOCH)
}

/// The cache's epoch without taking its lock: a credit remembered at this epoch (see
/// `CreditMemo`) is still what the cache would answer. A change made under the lock shows
/// here once the lock is released, so before anything that follows the change (such as the
/// reply to the `QUOTA.GRANT` that made it) can happen.
pub(crate) fn cache_epoch() -> u64 {
    CACHE_EPOCH.load(Ordering::Acquire)
}

/// A locked cache; releasing it publishes the cache's epoch.
pub(crate) struct CacheGuard<W: 'static, V: CacheValue + 'static = UserCredits> {
    cache: MutexGuard<'static, Cache<W, V>>,
    epoch: &'static AtomicU64,
}

impl<W, V: CacheValue> CacheGuard<W, V> {
    fn lock(cache: &'static Mutex<Cache<W, V>>, epoch: &'static AtomicU64) -> Self {
        CacheGuard {
            cache: cache
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            epoch,
        }
    }
}

impl<W, V: CacheValue> CacheGuard<W, V> {
    /// Looks `key` up, a load starting (or being waited on) only while PostgreSQL is worth
    /// waiting for (see `health`): otherwise a key not known is `Unavailable` at once.
    pub(crate) fn find(&mut self, key: &[u8], now: Millis) -> Lookup<'_, V> {
        self.cache
            .lookup_gated(key, now, || super::health::may_load(now))
    }
}

impl<W, V: CacheValue> std::ops::Deref for CacheGuard<W, V> {
    type Target = Cache<W, V>;
    fn deref(&self) -> &Self::Target {
        &self.cache
    }
}

impl<W, V: CacheValue> std::ops::DerefMut for CacheGuard<W, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.cache
    }
}

impl<W, V: CacheValue> Drop for CacheGuard<W, V> {
    fn drop(&mut self) {
        // Still under the lock: the published epoch only ever moves forward.
        self.epoch.store(self.cache.epoch(), Ordering::Release);
    }
}

/// The named-policy cache: same rules, TTLs and bound as the credits cache, one entry per
/// (tenant, project, name), "no such policy" cached as a negative entry.
pub(crate) type PolicyCache = Cache<Waiter, CachedPolicy>;

static POLICIES: LazyLock<Mutex<PolicyCache>> =
    LazyLock::new(|| Mutex::new(Cache::new(cache_config())));

/// The policy cache's epoch as of the last time its lock was released.
static POLICY_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The policy cache, locked (recovers from a poisoned lock). When both locks are held, this
/// one is taken first (see `gather`). Releasing it publishes the cache's epoch for
/// `policy_epoch`.
pub(crate) fn policies() -> CacheGuard<Waiter, CachedPolicy> {
    CacheGuard::lock(&POLICIES, &POLICY_EPOCH)
}

/// The policy cache's epoch without taking its lock (see `policy_memo`).
pub(crate) fn policy_epoch() -> u64 {
    POLICY_EPOCH.load(Ordering::Acquire)
}

/// The cache tunables from the configuration.
pub(crate) fn cache_config() -> CacheConfig {
    CacheConfig {
        ttl_ms: config::int(&config::CACHE_TTL_MS).max(0),
        negative_ttl_ms: config::int(&config::NEGATIVE_TTL_MS).max(0),
        max_entries: usize::try_from(config::int(&config::CACHE_MAX_ENTRIES))
            .unwrap_or(1)
            .max(1),
        retry_ms: RETRY_AFTER_FAILURE_MS,
        max_bytes: super::memory::cache_budget(),
    }
}
