//! The module's configuration: every `quota.*` option, its default, and typed accessors.
//!
//! Values live in atomics and mutexes registered with Redis (module arguments at load and
//! `CONFIG SET/GET quota.<name>`). Changing one calls `on_change`, which tells the running
//! pieces (store, cache, listener) to pick it up. Nothing here talks to Postgres.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use redis_module::configuration::ConfigurationContext;
use redis_module::enum_configuration;

enum_configuration! {
    /// What `QUOTA.ADMIT` does on a cache miss where it cannot block (MULTI, scripts).
    #[derive(Debug, PartialEq, Eq)]
    #[allow(non_camel_case_types)]
    pub enum ScriptMiss {
        /// Decide on the base policy, reply `replenishment pending`, load in the background.
        base = 0,
        /// Reply `TRYAGAIN` and load in the background.
        error = 1,
    }
}

/// `quota.pg-url` (sensitive).
pub static PG_URL: Mutex<String> = Mutex::new(String::new());
/// `quota.schema`.
pub static SCHEMA: Mutex<String> = Mutex::new(String::new());
/// `quota.pool-size` (worker threads and Postgres connections; immutable after load).
pub static POOL_SIZE: AtomicI64 = AtomicI64::new(DEFAULT_POOL_SIZE);
/// `quota.pg-timeout-ms`.
pub static PG_TIMEOUT_MS: AtomicI64 = AtomicI64::new(DEFAULT_PG_TIMEOUT_MS);
/// `quota.queue-max` (immutable after load).
pub static QUEUE_MAX: AtomicI64 = AtomicI64::new(DEFAULT_QUEUE_MAX);
/// `quota.cache-ttl-ms`.
pub static CACHE_TTL_MS: AtomicI64 = AtomicI64::new(DEFAULT_CACHE_TTL_MS);
/// `quota.negative-ttl-ms`.
pub static NEGATIVE_TTL_MS: AtomicI64 = AtomicI64::new(DEFAULT_NEGATIVE_TTL_MS);
/// `quota.cache-max-entries`.
pub static CACHE_MAX_ENTRIES: AtomicI64 = AtomicI64::new(DEFAULT_CACHE_MAX_ENTRIES);
/// `quota.script-miss`.
pub static SCRIPT_MISS: Mutex<ScriptMiss> = Mutex::new(ScriptMiss::base);
/// `quota.auto-deploy`.
pub static AUTO_DEPLOY: AtomicBool = AtomicBool::new(true);
/// `quota.notify`.
pub static NOTIFY: AtomicBool = AtomicBool::new(true);
/// `quota.cleanup-interval` in seconds (0 = off).
pub static CLEANUP_INTERVAL: AtomicI64 = AtomicI64::new(DEFAULT_CLEANUP_INTERVAL);
/// `quota.lease-ttl` in seconds.
pub static LEASE_TTL: AtomicI64 = AtomicI64::new(DEFAULT_LEASE_TTL);

pub const DEFAULT_SCHEMA: &str = "control_plane";
pub const DEFAULT_POOL_SIZE: i64 = 4;
pub const DEFAULT_PG_TIMEOUT_MS: i64 = 2000;
pub const DEFAULT_QUEUE_MAX: i64 = 10_000;
pub const DEFAULT_CACHE_TTL_MS: i64 = 10_000;
pub const DEFAULT_NEGATIVE_TTL_MS: i64 = 5_000;
pub const DEFAULT_CACHE_MAX_ENTRIES: i64 = 1_000_000;
pub const DEFAULT_CLEANUP_INTERVAL: i64 = 3600;
pub const DEFAULT_LEASE_TTL: i64 = 300;
/// Longest lease a caller may ask for with `LEASE_TTL`: 1 day.
pub const MAX_LEASE_TTL: i64 = 86_400;

/// Reads a string option.
pub fn text(option: &Mutex<String>) -> String {
    option.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Reads an integer option.
pub fn int(option: &AtomicI64) -> i64 {
    option.load(Ordering::Relaxed)
}

/// Reads a boolean option.
pub fn flag(option: &AtomicBool) -> bool {
    option.load(Ordering::Relaxed)
}

/// The configured miss policy for scripts and MULTI.
pub fn script_miss() -> ScriptMiss {
    SCRIPT_MISS
        .lock()
        .map(|m| m.clone())
        .unwrap_or(ScriptMiss::base)
}

/// Called by Redis after any `quota.*` option changed.
pub fn on_change<G, T>(_ctx: &ConfigurationContext, name: &str, _value: &'static T) {
    crate::state::reconfigure(name);
}
