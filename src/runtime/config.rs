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
/// `quota.listen-url` (sensitive): the NOTIFY listener's URL (empty = `quota.pg-url`), so the
/// pool may go through a transaction pooler while the listener holds a session of its own.
pub(crate) static LISTEN_URL: CheckedText = CheckedText::new(check_url);
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

/// The settings that hold a connection string (sensitive: they may carry a password).
const URL_SETTINGS: [&str; 2] = ["quota.pg-url", "quota.listen-url"];

/// Whether `CONFIG SET <name> <value>` holds a password: `quota.pg-password`, or a
/// `quota.pg-url` or `quota.listen-url` with a password in it (or that cannot be read, and so
/// might: then it is hidden whole).
pub(crate) fn is_secret_setting(name: &[u8], value: &[u8]) -> bool {
    (name.eq_ignore_ascii_case(b"quota.pg-password") && !value.is_empty())
        || (URL_SETTINGS
            .iter()
            .any(|s| name.eq_ignore_ascii_case(s.as_bytes()))
            && holds_secret(value))
}

/// Whether a connection string holds a password, or cannot be read (and might).
pub(crate) fn holds_secret(url: &[u8]) -> bool {
    crate::store::password_spans(url).is_none_or(|spans| !spans.is_empty())
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

/// The module arguments, as the configurations are registered in `lib.rs` (Redis matches
/// them byte for byte).
pub(crate) const MODULE_ARGUMENTS: &[&str] = &[
    "pool-size",
    "pg-timeout-ms",
    "queue-max",
    "cache-ttl-ms",
    "negative-ttl-ms",
    "cache-max-entries",
    "cache-max-memory",
    "cleanup-interval",
    "flush-interval",
    "lease-ttl",
    "pg-url",
    "listen-url",
    "pg-password",
    "pg-passfile",
    "schema",
    "auto-deploy",
    "notify",
    "script-miss",
];

/// What `init` does to the module arguments before Redis keeps them for `MODULE LIST` and
/// `CONFIG REWRITE`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct LoadPlan {
    /// (index of the value among the arguments, the text Redis keeps instead, the argument).
    pub rewrites: Vec<(usize, String, &'static str)>,
    /// The password taken out of the URL arguments, for `quota.pg-password`.
    pub password: Option<String>,
}

/// Checks the module arguments and plans their rewrite, or says (by argument name only, never
/// a value) why the module must not load:
/// - every argument is a known name followed by a value, each name once, and no value is
///   itself an argument name (Redis's module configuration reads the first occurrence of a name
///   wherever it is, and silently ignores unknown ones);
/// - `pg-password` is refused (`MODULE LIST` would show it);
/// - a value must survive `CONFIG REWRITE`, which writes the `loadmodule` line unquoted: a URL
///   with a space or a quote, or in the key=value form, becomes the same settings as a URL
///   (percent-encoded); another value with a space or a quote, or an empty one, is refused;
/// - the password of `pg-url` and `listen-url` is moved to `quota.pg-password` (the two must
///   agree, and agree with a `quota.pg-password` already set).
pub(crate) fn plan_load_args(args: &[&[u8]], pg_password: &str) -> Result<LoadPlan, String> {
    let name_of = |arg: &[u8]| {
        MODULE_ARGUMENTS
            .iter()
            .copied()
            .find(|n| n.as_bytes() == arg)
    };
    if args.len() % 2 == 1 {
        let last = args.last().and_then(|a| name_of(a));
        return Err(match last {
            Some(name) => format!("the module argument {name} has no value"),
            None => "the module arguments are not name value pairs".into(),
        });
    }
    let mut plan = LoadPlan::default();
    let mut seen: Vec<&str> = Vec::new();
    for (pair, chunk) in args.chunks(2).enumerate() {
        let (name, value) = (chunk[0], chunk[1]);
        let Some(name) = name_of(name) else {
            let shown: String = String::from_utf8_lossy(name)
                .chars()
                .take(64)
                .map(|c| if c.is_control() { '?' } else { c })
                .collect();
            return Err(format!(
                "unknown module argument '{shown}' (the arguments are: {})",
                MODULE_ARGUMENTS.join(", ")
            ));
        };
        if seen.contains(&name) {
            return Err(format!("the module argument {name} is given twice"));
        }
        seen.push(name);
        if let Some(other) = name_of(value) {
            return Err(format!(
                "the value of the module argument {name} is the name of the argument {other}: Redis would read it as that argument"
            ));
        }
        if name == "pg-password" {
            return Err(
                "pg-password cannot be a module argument (MODULE LIST would show it): \
                        use a quota.pg-password line in redis.conf or quota.pg-passfile"
                    .into(),
            );
        }
        let value_index = pair * 2 + 1;
        let option = match name {
            "pg-url" => "pg-url",
            "listen-url" => "listen-url",
            _ => {
                if !survives_rewrite(value) {
                    return Err(format!(
                        "the module argument {name} is empty or holds a space or a quote, which CONFIG REWRITE would write unquoted: give it as a quota.{name} line in redis.conf"
                    ));
                }
                continue;
            }
        };
        let text = std::str::from_utf8(value)
            .map_err(|_| format!("the module argument {name} is not UTF-8"))?;
        let info = crate::store::ConnInfo::parse(text).map_err(|e| {
            format!("the module argument {name} is not a usable PostgreSQL URL: {e}")
        })?;
        if let Some(password) = info.password() {
            let password = String::from_utf8_lossy(password).into_owned();
            if plan.password.as_ref().is_some_and(|p| *p != password) {
                return Err(
                    "pg-url and listen-url carry different passwords: give them in a \
                            password file (quota.pg-passfile, one line per host and user)"
                        .into(),
                );
            }
            if !pg_password.is_empty() && pg_password != password {
                return Err(format!(
                    "the module argument {name} carries a password other than quota.pg-password: keep one of them"
                ));
            }
            plan.password = Some(password);
        }
        let shown = info.without_password(text);
        let rewritten =
            if info.form == crate::store::Form::Url && survives_rewrite(shown.as_bytes()) {
                shown
            } else {
                info.to_url(false)
            };
        if rewritten.as_bytes() != value {
            plan.rewrites.push((value_index, rewritten, option));
        }
    }
    Ok(plan)
}

/// Whether Redis can write `value` unquoted in a `loadmodule` line and read it back the same:
/// not empty, no white space, no quote (its config parser splits on spaces and reads quotes).
fn survives_rewrite(value: &[u8]) -> bool {
    !value.is_empty()
        && !value
            .iter()
            .any(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c | b'"' | b'\''))
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
    fn url_settings_with_a_password_or_unreadable_are_secret() {
        for name in [&b"quota.pg-url"[..], b"QUOTA.LISTEN-URL"] {
            assert!(is_secret_setting(
                name,
                b"postgresql://quota2:Zx/9kQ+Lm=@host/db"
            ));
            assert!(is_secret_setting(name, b"host=h password='a b'"));
            // Cannot be read: might hold one.
            assert!(is_secret_setting(name, b"host=h pass word"));
            assert!(is_secret_setting(
                name,
                b"postgresql://quota:12/ab+c=@db/quota"
            ));
            assert!(!is_secret_setting(name, b"postgresql://quota@db/quota"));
            assert!(!is_secret_setting(name, b""));
        }
    }

    fn args<'a>(list: &'a [&'a str]) -> Vec<&'a [u8]> {
        list.iter().map(|a| a.as_bytes()).collect()
    }

    #[test]
    fn unknown_or_malformed_module_arguments_are_refused_by_name() {
        let e = plan_load_args(&args(&["pool_size", "8"]), "").unwrap_err();
        assert!(e.starts_with("unknown module argument 'pool_size'"), "{e}");
        let e = plan_load_args(&args(&["pg-ulr", "postgresql://u:Secret1@h/db"]), "").unwrap_err();
        assert!(e.contains("'pg-ulr'") && !e.contains("Secret1"), "{e}");
        let e = plan_load_args(&args(&["PG-URL", "x"]), "").unwrap_err();
        assert!(e.contains("'PG-URL'"), "{e}");
        let e = plan_load_args(&args(&["schema", "a", "pool-size"]), "").unwrap_err();
        assert!(e.contains("pool-size has no value"), "{e}");
        let e = plan_load_args(&args(&["schema", "a", "schema", "b"]), "").unwrap_err();
        assert!(e.contains("given twice"), "{e}");
        let e = plan_load_args(&args(&["schema", "pool-size", "pool-size", "8"]), "").unwrap_err();
        assert!(e.contains("name of the argument pool-size"), "{e}");
        let e = plan_load_args(&args(&["pg-password", "Secret1"]), "").unwrap_err();
        assert!(e.contains("pg-password cannot be a module argument") && !e.contains("Secret1"));
        let e = plan_load_args(&args(&["pg-passfile", "/a b/pgpass"]), "").unwrap_err();
        assert!(e.contains("quota.pg-passfile line"), "{e}");
        let e = plan_load_args(&args(&["pg-url", "host=h password=Secret1 x"]), "").unwrap_err();
        assert!(!e.contains("Secret1"), "{e}");
        assert_eq!(
            plan_load_args(&args(&["schema", "s", "pool-size", "8"]), ""),
            Ok(LoadPlan::default())
        );
    }

    #[test]
    fn url_arguments_lose_their_password_and_become_rewritable() {
        let plan = plan_load_args(
            &args(&[
                "pg-url",
                "host=127.0.0.1 port=5432 user=quota dbname=quota password='Zx/9 k'",
                "listen-url",
                "postgresql://quota:Zx%2F9%20k@db:5432/quota",
            ]),
            "",
        )
        .unwrap();
        assert_eq!(plan.password.as_deref(), Some("Zx/9 k"));
        assert_eq!(
            plan.rewrites,
            vec![
                (
                    1,
                    "postgresql://quota@127.0.0.1:5432/quota".to_owned(),
                    "pg-url"
                ),
                (
                    3,
                    "postgresql://quota@db:5432/quota".to_owned(),
                    "listen-url"
                ),
            ]
        );
        // A URL that needs nothing is left alone.
        let plan = plan_load_args(&args(&["pg-url", "postgresql://q@h/db"]), "").unwrap();
        assert_eq!(plan, LoadPlan::default());
        // Passwords that disagree.
        let e = plan_load_args(
            &args(&[
                "pg-url",
                "postgresql://q:a1@h/db",
                "listen-url",
                "postgresql://q:b2@h/db",
            ]),
            "",
        )
        .unwrap_err();
        assert!(
            e.contains("different passwords") && !e.contains("a1") && !e.contains("b2"),
            "{e}"
        );
        let e = plan_load_args(&args(&["pg-url", "postgresql://q:a1@h/db"]), "other").unwrap_err();
        assert!(e.contains("other than quota.pg-password"), "{e}");
        assert!(plan_load_args(&args(&["pg-url", "postgresql://q:a1@h/db"]), "a1").is_ok());
    }

    #[test]
    fn module_arguments_are_the_registered_configurations() {
        // Every `["name", &config::...` registered in lib.rs, and nothing else.
        let lib = include_str!("../lib.rs");
        let mut registered: Vec<&str> = lib
            .split("[\"")
            .skip(1)
            .filter_map(|rest| {
                let (name, after) = rest.split_once('"')?;
                after.starts_with(", &config::").then_some(name)
            })
            .collect();
        registered.sort_unstable();
        let mut listed = MODULE_ARGUMENTS.to_vec();
        listed.sort_unstable();
        assert_eq!(registered, listed);
    }
}
