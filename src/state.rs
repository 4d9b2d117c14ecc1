//! Process-wide state of the module: the credits cache, the clock, lease ids, and the reaction
//! to configuration changes (rebuild the store, restart the NOTIFY listener, resize the cache).
//!
//! The cache sits behind a mutex so worker and listener threads can update it without the Redis
//! lock; it is held only for in-memory work, never across a Postgres call or a reply.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::config;
use crate::core::cache::{CacheConfig, CreditCache};
use crate::core::ids::{PolicyId, UserId};
use crate::core::policy::CachedPolicy;
use crate::core::Millis;
use crate::ffi::blocked::Blocked;
use crate::stats;
use crate::store::listener::{Listener, ListenerEvent};
use crate::worker::Done;

/// How long a user whose load failed is decided without credits before Postgres is tried again.
pub const RETRY_AFTER_FAILURE_MS: Millis = 1000;

static CACHE: LazyLock<Mutex<CreditCache<Blocked<Done>>>> =
    LazyLock::new(|| Mutex::new(CreditCache::new(cache_config())));

/// The cache's epoch as of the last time its lock was released (see `cache_epoch`).
static CACHE_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The credits cache, locked (recovers from a poisoned lock: the data stays consistent per
/// call). Releasing it publishes the cache's epoch for `cache_epoch`.
pub fn cache() -> CacheGuard {
    CacheGuard(
        CACHE
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    )
}

/// The cache's epoch without taking its lock: a credit remembered at this epoch (see
/// `CreditMemo`) is still what the cache would answer. A change made under the lock shows
/// here once the lock is released, so before anything that follows the change (such as the
/// reply to the `QUOTA.GRANT` that made it) can happen.
pub fn cache_epoch() -> u64 {
    CACHE_EPOCH.load(Ordering::Acquire)
}

/// The locked cache.
pub struct CacheGuard(MutexGuard<'static, CreditCache<Blocked<Done>>>);

impl std::ops::Deref for CacheGuard {
    type Target = CreditCache<Blocked<Done>>;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for CacheGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for CacheGuard {
    fn drop(&mut self) {
        // Still under the lock: the published epoch only ever moves forward.
        CACHE_EPOCH.store(self.0.epoch(), Ordering::Release);
    }
}

/// A client waiting on a named policy's load. `then` is the user whose credits its command
/// needs next: once the policy is in, the worker moves the client onto that user's credit
/// load when those are not cached either, so the client is answered once, with both known.
pub struct PolicyWaiter {
    pub client: Blocked<Done>,
    pub then: Option<(Box<[u8]>, crate::worker::OwnedUser)>,
}

/// The named-policy cache: same rules, TTLs and bound as the credits cache, one entry per
/// (tenant, project, name), "no such policy" cached as a negative entry.
pub type PolicyCache = CreditCache<PolicyWaiter, CachedPolicy>;

static POLICIES: LazyLock<Mutex<PolicyCache>> =
    LazyLock::new(|| Mutex::new(CreditCache::new(cache_config())));

/// The policy cache's epoch as of the last time its lock was released.
static POLICY_EPOCH: AtomicU64 = AtomicU64::new(0);

/// The policy cache, locked (recovers from a poisoned lock). Never held together with the
/// credits cache's lock. Releasing it publishes the cache's epoch for `remembered_policy`.
pub fn policies() -> PolicyGuard {
    PolicyGuard(
        POLICIES
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    )
}

/// The locked policy cache.
pub struct PolicyGuard(MutexGuard<'static, PolicyCache>);

impl std::ops::Deref for PolicyGuard {
    type Target = PolicyCache;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for PolicyGuard {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        POLICY_EPOCH.store(self.0.epoch(), Ordering::Release);
    }
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
pub fn remembered_policy(id: &PolicyId<'_>, now: Millis) -> Option<CachedPolicy> {
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
pub fn remember_policy(
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
pub fn cache_config() -> CacheConfig {
    CacheConfig {
        ttl_ms: config::int(&config::CACHE_TTL_MS).max(0),
        negative_ttl_ms: config::int(&config::NEGATIVE_TTL_MS).max(0),
        max_entries: usize::try_from(config::int(&config::CACHE_MAX_ENTRIES))
            .unwrap_or(1)
            .max(1),
        retry_ms: RETRY_AFTER_FAILURE_MS,
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

static LEASE_SEED: LazyLock<u64> = LazyLock::new(|| {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    t ^ (u64::from(std::process::id()) << 32)
});
static LEASE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A new lease id, unique across this process and (by its seed) across restarts.
pub fn new_lease_id() -> u64 {
    let n = LEASE_COUNTER.fetch_add(1, Ordering::Relaxed);
    // SplitMix64 over seed + counter: distinct counters give distinct ids.
    let mut z = LEASE_SEED.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// NOTIFY listener state, for `INFO quota`.
pub static NOTIFY_STATE: AtomicU8 = AtomicU8::new(NOTIFY_OFF);
pub const NOTIFY_OFF: u8 = 0;
pub const NOTIFY_CONNECTING: u8 = 1;
pub const NOTIFY_LISTENING: u8 = 2;
pub const NOTIFY_DISCONNECTED: u8 = 3;

/// The state's name for `INFO quota`.
pub fn notify_state_name() -> &'static str {
    match NOTIFY_STATE.load(Ordering::Relaxed) {
        NOTIFY_CONNECTING => "connecting",
        NOTIFY_LISTENING => "listening",
        NOTIFY_DISCONNECTED => "disconnected",
        _ => "off",
    }
}

static LISTENER: Mutex<Option<Listener>> = Mutex::new(None);

/// (Re)starts the NOTIFY listener from the configuration, or stops it when `quota.notify` is
/// off or no `quota.pg-url` is set. The old listener is stopped on a thread of its own so the
/// caller (the Redis main thread) never waits for it.
pub fn restart_listener() {
    let old = LISTENER.lock().ok().and_then(|mut l| l.take());
    if let Some(old) = old {
        let _ = std::thread::Builder::new()
            .name("quota-listener-stop".into())
            .spawn(move || old.stop());
    }
    let url = config::text(&config::PG_URL);
    if !config::flag(&config::NOTIFY) || url.is_empty() {
        NOTIFY_STATE.store(NOTIFY_OFF, Ordering::Relaxed);
        return;
    }
    NOTIFY_STATE.store(NOTIFY_CONNECTING, Ordering::Relaxed);
    let schema = config::text(&config::SCHEMA);
    let timeout = config::int(&config::PG_TIMEOUT_MS).max(1) as u64;
    let on_event = Box::new(|event: ListenerEvent| match event {
        ListenerEvent::Changed {
            tenant,
            project,
            user,
            own,
        } => {
            stats::NOTIFY_RECEIVED.incr();
            let key = UserId {
                tenant: &tenant,
                project: &project,
                user: &user,
            }
            .key();
            if own {
                // This node wrote it and already refreshed its entry; a background refresh
                // settles any race between concurrent writes without making anyone wait.
                cache().mark_stale(&key);
            } else {
                cache().invalidate(&key);
            }
        }
        ListenerEvent::PolicyChanged {
            tenant,
            project,
            name,
            own,
        } => {
            stats::NOTIFY_RECEIVED.incr();
            let key = PolicyId {
                tenant: &tenant,
                project: &project,
                name: &name,
            }
            .key();
            if own {
                policies().mark_stale(&key);
            } else {
                policies().invalidate(&key);
            }
        }
        ListenerEvent::Connected => {
            // Notifications may have been missed while disconnected: forget everything.
            NOTIFY_STATE.store(NOTIFY_LISTENING, Ordering::Relaxed);
            cache().clear();
            // PostgreSQL is reachable (again): it may not hold the schema (first start, a
            // restored or replaced server).
            crate::worker::redeploy();
            policies().clear();
        }
        ListenerEvent::Disconnected(_) => {
            stats::NOTIFY_RECONNECTS.incr();
            NOTIFY_STATE.store(NOTIFY_DISCONNECTED, Ordering::Relaxed);
        }
    });
    match Listener::spawn(url, config::credentials(), schema, timeout, on_event) {
        Ok(listener) => {
            if let Ok(mut slot) = LISTENER.lock() {
                *slot = Some(listener);
            }
        }
        Err(e) => {
            NOTIFY_STATE.store(NOTIFY_DISCONNECTED, Ordering::Relaxed);
            redis_module::logging::log_warning(format!(
                "quota: cannot start the NOTIFY listener: {e}"
            ));
        }
    }
}

/// Stops the listener and waits for it (module unload and shutdown only).
pub fn stop_listener() {
    let old = LISTENER.lock().ok().and_then(|mut l| l.take());
    if let Some(old) = old {
        old.stop();
    }
    NOTIFY_STATE.store(NOTIFY_OFF, Ordering::Relaxed);
}

/// Applies a changed option (the name with or without the `quota.` prefix).
pub fn reconfigure(name: &str) {
    if !crate::worker::is_running() {
        return; // still loading: `init` applies everything once.
    }
    match name.trim_start_matches("quota.") {
        "pg-url" | "pg-password" | "pg-passfile" | "schema" => {
            // Another database or schema: nothing cached so far is known to hold there.
            crate::worker::rebuild_backend();
            cache().clear();
            policies().clear();
            restart_listener();
            crate::worker::deploy_soon();
        }
        "pg-timeout-ms" => {
            crate::worker::rebuild_backend();
            restart_listener();
        }
        "notify" => restart_listener(),
        "cache-ttl-ms" | "negative-ttl-ms" | "cache-max-entries" => {
            cache().set_config(cache_config());
            policies().set_config(cache_config());
        }
        "auto-deploy" => {
            crate::worker::rebuild_backend();
            crate::worker::deploy_soon();
        }
        _ => {}
    }
}

/// Shared, immutable user rows: re-exported for the command shells.
pub type Credits = crate::core::cache::UserCredits;
