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
    pub(crate) enum ScriptMiss {
        /// Decide on the base policy, reply `replenishment pending`, load in the background.
        base = 0,
        /// Reply `TRYAGAIN` and load in the background.
        error = 1,
    }
}

/// A string option whose values are checked before Redis accepts them (a bad value is refused
/// by `CONFIG SET`, or fails the module load, instead of breaking every later command).
pub(crate) struct CheckedText {
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
        let value = unstash(value)?;
        (self.check)(&value).map_err(RedisError::String)?;
        let mut slot = self.value.lock().unwrap_or_else(|p| p.into_inner());
        *slot = value;
        Ok(())
    }
}

fn check_url(url: &str) -> Result<(), String> {
    crate::store::validate_url(url).map_err(|e| e.to_string().trim_start_matches("ERR ").to_owned())
}

fn check_nothing(_: &str) -> Result<(), String> {
    Ok(())
}

fn check_schema(name: &str) -> Result<(), String> {
    crate::store::validate_schema(name)
        .map_err(|e| e.to_string().trim_start_matches("ERR ").to_owned())
}

/// `quota.pg-url` (sensitive).
pub(crate) static PG_URL: CheckedText = CheckedText::new(check_url);
/// `quota.pg-password` (sensitive): the password when `quota.pg-url` carries none.
pub(crate) static PG_PASSWORD: CheckedText = CheckedText::new(check_nothing);
/// `quota.pg-passfile`: a pgpass file holding the password (empty = libpq's default).
pub(crate) static PG_PASSFILE: CheckedText = CheckedText::new(check_nothing);
/// `quota.schema`.
pub(crate) static SCHEMA: CheckedText = CheckedText::new(check_schema);
/// `quota.pool-size` (worker threads and Postgres connections; immutable after load).
pub(crate) static POOL_SIZE: AtomicI64 = AtomicI64::new(DEFAULT_POOL_SIZE);
/// `quota.pg-timeout-ms`.
pub(crate) static PG_TIMEOUT_MS: AtomicI64 = AtomicI64::new(DEFAULT_PG_TIMEOUT_MS);
/// `quota.queue-max` (immutable after load).
pub(crate) static QUEUE_MAX: AtomicI64 = AtomicI64::new(DEFAULT_QUEUE_MAX);
/// `quota.cache-ttl-ms`.
pub(crate) static CACHE_TTL_MS: AtomicI64 = AtomicI64::new(DEFAULT_CACHE_TTL_MS);
/// `quota.negative-ttl-ms`.
pub(crate) static NEGATIVE_TTL_MS: AtomicI64 = AtomicI64::new(DEFAULT_NEGATIVE_TTL_MS);
/// `quota.cache-max-entries`.
pub(crate) static CACHE_MAX_ENTRIES: AtomicI64 = AtomicI64::new(DEFAULT_CACHE_MAX_ENTRIES);
/// `quota.cache-max-memory` in bytes (0 = a tenth of `maxmemory`, see `runtime::memory`).
pub(crate) static CACHE_MAX_MEMORY: AtomicI64 = AtomicI64::new(0);
/// `quota.script-miss`.
pub(crate) static SCRIPT_MISS: Mutex<ScriptMiss> = Mutex::new(ScriptMiss::base);
/// `quota.auto-deploy`.
pub(crate) static AUTO_DEPLOY: AtomicBool = AtomicBool::new(true);
/// `quota.notify`.
pub(crate) static NOTIFY: AtomicBool = AtomicBool::new(true);
/// `quota.cleanup-interval` in seconds (0 = off).
pub(crate) static CLEANUP_INTERVAL: AtomicI64 = AtomicI64::new(DEFAULT_CLEANUP_INTERVAL);
/// `quota.flush-interval`: most seconds between two flushes of the usage ledger.
pub(crate) static FLUSH_INTERVAL: AtomicI64 = AtomicI64::new(DEFAULT_FLUSH_INTERVAL);
/// `quota.lease-ttl` in seconds.
pub(crate) static LEASE_TTL: AtomicI64 = AtomicI64::new(DEFAULT_LEASE_TTL);

pub(crate) const DEFAULT_SCHEMA: &str = "control_plane";
pub(crate) const DEFAULT_POOL_SIZE: i64 = 4;
pub(crate) const DEFAULT_PG_TIMEOUT_MS: i64 = 2000;
pub(crate) const DEFAULT_QUEUE_MAX: i64 = 10_000;
pub(crate) const DEFAULT_CACHE_TTL_MS: i64 = 10_000;
pub(crate) const DEFAULT_NEGATIVE_TTL_MS: i64 = 5_000;
pub(crate) const DEFAULT_CACHE_MAX_ENTRIES: i64 = 1_000_000;
pub(crate) const DEFAULT_CLEANUP_INTERVAL: i64 = 3600;
pub(crate) const DEFAULT_LEASE_TTL: i64 = 300;
pub(crate) const DEFAULT_FLUSH_INTERVAL: i64 = 10;
/// Longest lease a caller may ask for with `LEASE_TTL`: 1 day.
pub(crate) const MAX_LEASE_TTL: i64 = 86_400;

/// Sets a string option from the module itself (not through Redis).
pub(crate) fn set_text(option: &CheckedText, value: String) {
    let mut slot = option.value.lock().unwrap_or_else(|p| p.into_inner());
    *slot = value;
}

/// Values of sensitive settings taken out of `CONFIG SET` commands before Redis records them
/// (its slow log keeps a module's settings as given), each under the placeholder that took
/// its place in the command. Bounded: a placeholder whose command never ran is dropped.
static STASHED: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
const STASH_MAX: usize = 16;
const PLACEHOLDER_PREFIX: &str = "(redacted by redis-quota ";

/// Whether `CONFIG SET <name> <value>` holds a password: `quota.pg-password`, or a
/// `quota.pg-url` with a password in it.
pub(crate) fn is_secret_setting(name: &[u8], value: &[u8]) -> bool {
    (name.eq_ignore_ascii_case(b"quota.pg-password") && !value.is_empty())
        || (name.eq_ignore_ascii_case(b"quota.pg-url") && !secret_spans(value).is_empty())
}

/// Keeps `value` for the `CONFIG SET` about to run and returns the placeholder to put in the
/// command instead (what the slow log will show).
pub(crate) fn stash_secret(value: String, nonce: u64) -> String {
    let placeholder = format!("{PLACEHOLDER_PREFIX}{nonce:016x})");
    let mut stash = STASHED.lock().unwrap_or_else(|p| p.into_inner());
    if stash.len() >= STASH_MAX {
        stash.remove(0);
    }
    stash.push((placeholder.clone(), value));
    placeholder
}

/// The value a placeholder stands for (taken out of the stash), or `value` itself.
fn unstash(value: String) -> Result<String, RedisError> {
    if !value.starts_with(PLACEHOLDER_PREFIX) {
        return Ok(value);
    }
    let mut stash = STASHED.lock().unwrap_or_else(|p| p.into_inner());
    match stash
        .iter()
        .position(|(placeholder, _)| *placeholder == value)
    {
        Some(i) => Ok(stash.remove(i).1),
        None => Err(RedisError::Str(
            "the value was lost before it was applied: set it again",
        )),
    }
}

/// Reads a string option.
pub(crate) fn text(option: &CheckedText) -> String {
    option.value.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Byte ranges of the password inside a PostgreSQL URL or key=value string, so it can be
/// masked where Redis would show it: `user:PASSWORD@` in a URL's authority, a `password`
/// query parameter (its name possibly percent-encoded: `pass%77ord=`), or a `password` keyword
/// (spaces around `=` allowed, the value possibly quoted with `\'` and `\\` escapes).
pub(crate) fn secret_spans(url: &[u8]) -> Vec<std::ops::Range<usize>> {
    password_parts(url).into_iter().map(|p| p.value).collect()
}

/// The URL or key=value string without its password (a URL loses `:password` or its
/// `password` parameter, a key=value string its `password` keyword): what may be shown.
pub(crate) fn without_password(url: &[u8]) -> Vec<u8> {
    let parts = password_parts(url);
    url.iter()
        .enumerate()
        .filter(|(i, _)| !parts.iter().any(|p| p.whole.contains(i)))
        .map(|(_, b)| *b)
        .collect()
}

/// One password found in a connection string: the value, and what to cut to drop it.
struct PasswordPart {
    value: std::ops::Range<usize>,
    whole: std::ops::Range<usize>,
}

fn password_parts(url: &[u8]) -> Vec<PasswordPart> {
    let is_url = [b"postgresql://".as_slice(), b"postgres://"]
        .iter()
        .any(|scheme| {
            url.len() >= scheme.len() && url[..scheme.len()].eq_ignore_ascii_case(scheme)
        });
    if is_url {
        url_password_parts(url)
    } else {
        keyword_password_parts(url)
    }
}

fn url_password_parts(url: &[u8]) -> Vec<PasswordPart> {
    let mut parts = Vec::new();
    let start = find(url, b"://").map_or(0, |i| i + 3);
    let end = url[start..]
        .iter()
        .position(|&b| b == b'/' || b == b'?')
        .map_or(url.len(), |i| start + i);
    if let Some(at) = url[start..end].iter().rposition(|&b| b == b'@') {
        let userinfo = start..start + at;
        if let Some(colon) = url[userinfo.clone()].iter().position(|&b| b == b':') {
            parts.push(PasswordPart {
                value: userinfo.start + colon + 1..userinfo.end,
                whole: userinfo.start + colon..userinfo.end,
            });
        }
    }
    let Some(question) = url[start..]
        .iter()
        .position(|&b| b == b'?')
        .map(|i| start + i)
    else {
        return parts;
    };
    let mut from = question + 1;
    while from <= url.len() {
        let to = url[from..]
            .iter()
            .position(|&b| b == b'&')
            .map_or(url.len(), |i| from + i);
        let param = &url[from..to];
        if let Some(eq) = param.iter().position(|&b| b == b'=') {
            if percent_decoded(&param[..eq]).eq_ignore_ascii_case(b"password") {
                let whole = if to < url.len() {
                    from..to + 1 // with the '&' that follows
                } else {
                    from - 1..to // with the '&' or '?' before it
                };
                parts.push(PasswordPart {
                    value: from + eq + 1..to,
                    whole,
                });
            }
        }
        from = to + 1;
    }
    parts
}

fn keyword_password_parts(text: &[u8]) -> Vec<PasswordPart> {
    let mut parts = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while text.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= text.len() {
            return parts;
        }
        let key_start = i;
        while text
            .get(i)
            .is_some_and(|b| *b != b'=' && !b.is_ascii_whitespace())
        {
            i += 1;
        }
        let key = &text[key_start..i];
        i = skip_ws(i);
        if text.get(i) != Some(&b'=') {
            continue; // not `key = value`: the parser refuses it; nothing to mask here
        }
        i = skip_ws(i + 1);
        let value_start = i;
        if text.get(i) == Some(&b'\'') {
            i += 1;
            while let Some(&b) = text.get(i) {
                i += if b == b'\\' { 2 } else { 1 };
                if b == b'\'' {
                    break;
                }
            }
        } else {
            while let Some(&b) = text.get(i) {
                if b.is_ascii_whitespace() {
                    break;
                }
                i += if b == b'\\' { 2 } else { 1 };
            }
        }
        let value_end = i.min(text.len());
        if key.eq_ignore_ascii_case(b"password") {
            parts.push(PasswordPart {
                value: value_start..value_end,
                whole: key_start..value_end,
            });
        }
        i = value_end;
    }
}

/// `%XX` escapes decoded (invalid ones kept as they are).
fn percent_decoded(text: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(text.len());
    let mut i = 0;
    while let Some(&b) = text.get(i) {
        match (
            b,
            text.get(i + 1).and_then(|h| hex(*h)),
            text.get(i + 2).and_then(|l| hex(*l)),
        ) {
            (b'%', Some(high), Some(low)) => {
                out.push(high << 4 | low);
                i += 3;
            }
            _ => {
                out.push(b);
                i += 1;
            }
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// The password sources for a URL without one (`quota.pg-password`, `quota.pg-passfile`).
pub(crate) fn credentials() -> crate::store::Credentials {
    crate::store::Credentials {
        password: text(&PG_PASSWORD),
        passfile: text(&PG_PASSFILE),
    }
}

/// How long a client waits on Postgres before its timeout callback answers.
pub(crate) fn block_timeout_ms() -> i64 {
    int(&PG_TIMEOUT_MS).max(1) + 250
}

/// Reads an integer option.
pub(crate) fn int(option: &AtomicI64) -> i64 {
    option.load(Ordering::Relaxed)
}

/// Reads a boolean option.
pub(crate) fn flag(option: &AtomicBool) -> bool {
    option.load(Ordering::Relaxed)
}

/// The configured miss policy for scripts and MULTI.
pub(crate) fn script_miss() -> ScriptMiss {
    SCRIPT_MISS
        .lock()
        .map(|m| m.clone())
        .unwrap_or(ScriptMiss::base)
}

/// For the command filter: a placeholder to put in place of `value` when `CONFIG SET <name>
/// <value>` sets a password, the value itself kept in the stash until the setter takes it.
pub(crate) fn hide_secret(name: &[u8], value: &[u8]) -> Option<String> {
    if !is_secret_setting(name, value) {
        return None;
    }
    let text = std::str::from_utf8(value).ok()?;
    Some(stash_secret(text.to_owned(), super::clock::new_lease_id()))
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
            masked("postgres://h/db?x=1&pass%77ord=abc"),
            "postgres://h/db?x=1&pass%77ord=***"
        );
        assert_eq!(
            masked("postgres://h/db?PASSWORD=abc"),
            "postgres://h/db?PASSWORD=***"
        );
        assert_eq!(
            masked("host=h password=abc user=u"),
            "host=h password=*** user=u"
        );
        assert_eq!(
            masked("host=h password = abc user=u"),
            "host=h password = *** user=u"
        );
        assert_eq!(
            masked("host=h password='a b' user=u"),
            "host=h password=***** user=u"
        );
        assert_eq!(
            masked(r"host=h password='a\' b\\' user=u"),
            r"host=h password=********* user=u"
        );
        assert_eq!(masked(r"password=a\ b user=u"), r"password=**** user=u");
        assert_eq!(
            masked("postgresql://u:p@ss@h/db"),
            "postgresql://u:****@h/db"
        );
        // A key=value string is not taken for a URL because a value contains "://".
        assert_eq!(masked("host=h password=x://y@z"), "host=h password=*******");
    }

    #[test]
    fn stashed_secrets_come_back_once() {
        assert!(is_secret_setting(b"QUOTA.PG-PASSWORD", b"x"));
        assert!(!is_secret_setting(b"quota.pg-password", b""));
        assert!(is_secret_setting(b"quota.pg-url", b"host=h password=x"));
        assert!(!is_secret_setting(b"quota.pg-url", b"postgres://u@h/db"));
        assert!(!is_secret_setting(b"quota.schema", b"password=x"));
        let placeholder = stash_secret("s3cret".into(), 7);
        assert!(!placeholder.contains("s3cret"));
        assert_eq!(unstash(placeholder.clone()).ok().as_deref(), Some("s3cret"));
        assert!(unstash(placeholder).is_err(), "a placeholder is good once");
        assert_eq!(unstash("plain".into()).ok().as_deref(), Some("plain"));
        let first = stash_secret("old".into(), 1);
        for n in 0..STASH_MAX as u64 {
            stash_secret("newer".into(), 100 + n);
        }
        assert!(unstash(first).is_err(), "the stash is bounded");
    }

    #[test]
    fn what_may_be_shown_has_no_password_at_all() {
        let shown = |url: &str| String::from_utf8(without_password(url.as_bytes())).unwrap();
        assert_eq!(
            shown("postgresql://u:S3cret@h:5/db"),
            "postgresql://u@h:5/db"
        );
        assert_eq!(
            shown("postgres://h/db?password=abc&x=1"),
            "postgres://h/db?x=1"
        );
        assert_eq!(
            shown("postgres://h/db?x=1&pass%77ord=abc"),
            "postgres://h/db?x=1"
        );
        assert_eq!(shown("postgres://h/db?password=abc"), "postgres://h/db");
        assert_eq!(shown(r"host=h password = 'a\' b' user=u"), "host=h  user=u");
        assert_eq!(shown("postgres://u@h/db"), "postgres://u@h/db");
        for url in [
            "postgresql://u:S3cret@h:5/db",
            "host=h password = S3cret user=u",
            "postgres://h/db?pass%77ord=S3cret",
        ] {
            let text = shown(url);
            assert!(!text.contains("S3cret"), "{text}");
            assert!(
                crate::store::validate_url(&text).is_ok(),
                "{text} still parses"
            );
        }
    }
}
