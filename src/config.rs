//! The module's configuration: every `quota.*` option, its default, and typed accessors.
//!
//! Values live in atomics and mutexes registered with Redis (module arguments at load and
//! `CONFIG SET/GET quota.<name>`). Changing one calls `on_change`, which tells the running
//! pieces (store, cache, listener) to pick it up. Nothing here talks to Postgres.

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Mutex;

use redis_module::configuration::ConfigurationContext;
use redis_module::enum_configuration;
use redis_module::{ConfigurationValue, RedisError, RedisString};

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

/// A string option whose values are checked before Redis accepts them (a bad value is refused
/// by `CONFIG SET`, or fails the module load, instead of breaking every later command).
pub struct CheckedText {
    value: Mutex<String>,
    check: fn(&str) -> Result<(), String>,
}

impl CheckedText {
    const fn new(check: fn(&str) -> Result<(), String>) -> CheckedText {
        CheckedText {
            value: Mutex::new(String::new()),
            check,
        }
    }
}

impl ConfigurationValue<RedisString> for CheckedText {
    fn get(&self, _ctx: &ConfigurationContext) -> RedisString {
        RedisString::create(None, text(self).as_str())
    }

    fn set(&self, _ctx: &ConfigurationContext, value: RedisString) -> Result<(), RedisError> {
        let value = value
            .try_as_str()
            .map_err(|_| RedisError::Str("must be UTF-8"))?
            .to_owned();
        (self.check)(&value).map_err(RedisError::String)?;
        let mut slot = self.value.lock().unwrap_or_else(|p| p.into_inner());
        *slot = value;
        Ok(())
    }
}

fn check_url(url: &str) -> Result<(), String> {
    crate::store::validate_url(url).map_err(|e| e.to_string().trim_start_matches("ERR ").to_owned())
}

fn check_schema(name: &str) -> Result<(), String> {
    crate::store::validate_schema(name)
        .map_err(|e| e.to_string().trim_start_matches("ERR ").to_owned())
}

/// `quota.pg-url` (sensitive).
pub static PG_URL: CheckedText = CheckedText::new(check_url);
/// `quota.schema`.
pub static SCHEMA: CheckedText = CheckedText::new(check_schema);
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
pub fn text(option: &CheckedText) -> String {
    option.value.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Byte ranges of the password inside a PostgreSQL URL or key=value string (`user:PASSWORD@`
/// in the authority, or any `password=VALUE`), so it can be masked where Redis would show it.
pub fn secret_spans(url: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    if let Some(scheme_end) = find(url, b"://") {
        let start = scheme_end + 3;
        let end = url[start..]
            .iter()
            .position(|&b| b == b'/' || b == b'?')
            .map_or(url.len(), |i| start + i);
        if let Some(at) = url[start..end].iter().rposition(|&b| b == b'@') {
            let userinfo = start..start + at;
            if let Some(colon) = url[userinfo.clone()].iter().position(|&b| b == b':') {
                spans.push(userinfo.start + colon + 1..userinfo.end);
            }
        }
    }
    let mut from = 0;
    while let Some(i) = find(&url[from..], b"password=") {
        let start = from + i + b"password=".len();
        let quoted = url.get(start) == Some(&b'\'');
        let end = url[start..]
            .iter()
            .enumerate()
            .position(|(j, &b)| {
                if quoted {
                    j > 0 && b == b'\''
                } else {
                    b == b' ' || b == b'&'
                }
            })
            .map_or(url.len(), |j| start + j + usize::from(quoted));
        spans.push(start..end);
        from = end.max(start);
    }
    spans
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
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

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(url: &str) -> String {
        let mut bytes = url.as_bytes().to_vec();
        for span in secret_spans(&bytes.clone()) {
            for b in &mut bytes[span] {
                *b = b'*';
            }
        }
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn passwords_are_found_in_every_url_form() {
        assert_eq!(
            masked("postgresql://u:S3cret@h:5/db"),
            "postgresql://u:******@h:5/db"
        );
        assert_eq!(masked("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            masked("postgres://h/db?password=abc&x=1"),
            "postgres://h/db?password=***&x=1"
        );
        assert_eq!(
            masked("host=h password=abc user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            masked("host=h password='a b' user=u"),
            "host=h password=***** user=u"
        );
        assert_eq!(
            masked("postgresql://u:p@ss@h/db"),
            "postgresql://u:****@h/db"
        );
    }
}
