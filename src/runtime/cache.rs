//! The shared caches: user credits and named policies, each behind a mutex with its epoch
//! published on release, and the main thread's memo of recently read policies.
//!
//! Worker and listener threads update the caches without the Redis lock; a lock is held only
//! for in-memory work, never across a Postgres call or a reply.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};

use super::config;
use super::jobs::Waiter;
use crate::core::cache::{Cache, CacheConfig, CacheValue, Lookup, UserCredits};
use crate::core::ids::PolicyId;
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
/// one is taken first (see `gather`). Releasing it publishes the cache's epoch for `remembered_policy`.
pub(crate) fn policies() -> CacheGuard<Waiter, CachedPolicy> {
    CacheGuard::lock(&POLICIES, &POLICY_EPOCH)
}

/// Longest a remembered policy is used without asking the cache (keeps its LRU order honest).
const POLICY_MEMO_MAX_MS: Millis = 1000;
/// Policies remembered at once (a deployment has a few tiers).
const POLICY_MEMO_SLOTS: usize = 4;

/// A policy read from a fresh cache entry, remembered by the main thread so that an admission
/// under a named policy skips the key, the lock and the lookup.
struct PolicyMemo {
    /// `tenant \0 project \0 name` (ids never contain NUL).
    ids: Box<[u8]>,
    found: CachedPolicy,
    epoch: u64,
    until: Millis,
}

impl PolicyMemo {
    fn is(&self, id: &PolicyId<'_>) -> bool {
        let (t, p, n) = (id.tenant.len(), id.project.len(), id.name.len());
        self.ids.len() == t + p + n + 2
            && self.ids.get(..t) == Some(id.tenant.as_bytes())
            && self.ids.get(t + 1..t + 1 + p) == Some(id.project.as_bytes())
            && self.ids.get(t + p + 2..) == Some(id.name.as_bytes())
    }
}

thread_local! {
    static POLICY_MEMOS: std::cell::RefCell<(usize, [Option<PolicyMemo>; POLICY_MEMO_SLOTS])> =
        const { std::cell::RefCell::new((0, [None, None, None, None])) };
}

/// The policy remembered for `id`, if the policy cache has not changed since and its entry is
/// still fresh (what a lookup would answer, without the lookup).
pub(crate) fn remembered_policy(id: &PolicyId<'_>, now: Millis) -> Option<CachedPolicy> {
    let epoch = POLICY_EPOCH.load(Ordering::Acquire);
    POLICY_MEMOS.with(|memos| {
        let memos = memos.try_borrow().ok()?;
        memos
            .1
            .iter()
            .flatten()
            .find(|m| m.epoch == epoch && now < m.until && m.is(id))
            .map(|m| m.found)
    })
}

/// Remembers what a fresh policy-cache entry held at `epoch` (see `remembered_policy`).
pub(crate) fn remember_policy(
    id: &PolicyId<'_>,
    found: CachedPolicy,
    epoch: u64,
    fresh_until: Millis,
    now: Millis,
) {
    let mut ids = Vec::with_capacity(id.tenant.len() + id.project.len() + id.name.len() + 2);
    ids.extend_from_slice(id.tenant.as_bytes());
    ids.push(0);
    ids.extend_from_slice(id.project.as_bytes());
    ids.push(0);
    ids.extend_from_slice(id.name.as_bytes());
    let memo = PolicyMemo {
        ids: ids.into(),
        found,
        epoch,
        until: fresh_until.min(now.saturating_add(POLICY_MEMO_MAX_MS)),
    };
    POLICY_MEMOS.with(|memos| {
        if let Ok(mut memos) = memos.try_borrow_mut() {
            let (next, slots) = &mut *memos;
            let at = slots
                .iter()
                .position(|m| m.as_ref().is_some_and(|m| m.is(id)))
                .unwrap_or(*next % POLICY_MEMO_SLOTS);
            if let Some(slot) = slots.get_mut(at) {
                *slot = Some(memo);
            }
            *next = next.wrapping_add(1);
        }
    });
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
