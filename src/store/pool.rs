//! Connections: parsing `quota.pg-url` into a `postgres::Config` with the module's timeouts and
//! keepalives, and the r2d2 pool that hands connections to worker threads.
//!
//! Owns how a connection is opened and set up (session timeouts) and how pool failures become
//! `StoreError`s. Must not run application queries, and must never let the URL or the password
//! into an error message.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::{Client, NoTls};
use r2d2::{CustomizeConnection, ManageConnection};

use super::error::{describe, StoreError};
use super::passfile::{Credentials, Target};

/// A pooled connection; derefs to `postgres::Client`.
pub(crate) type Conn = r2d2::PooledConnection<Manager>;

/// The `application_name` of pool connections.
pub(crate) const APPLICATION_NAME: &str = "redis-quota";

/// Timeouts are clamped to 1 ms ..= 1 hour (r2d2 panics on zero, `Instant` arithmetic on huge).
pub(crate) const MAX_TIMEOUT_MS: u64 = 60 * 60 * 1000;

/// The timeout actually used for a configured `quota.pg-timeout-ms`.
pub(crate) fn bounded_timeout(timeout_ms: u64) -> Duration {
    Duration::from_millis(timeout_ms.clamp(1, MAX_TIMEOUT_MS))
}

/// libpq's default keepalive idle time, which we treat as "not set by the URL".
const DEFAULT_KEEPALIVES_IDLE: Duration = Duration::from_secs(2 * 60 * 60);

/// Parses the URL (`postgres://...` or `key=value ...`) and applies the module's settings:
/// `connect_timeout` = the timeout, the application name (unless the URL gives one), TCP
/// keepalives on, with dead-peer detection in tens of seconds rather than hours unless the URL
/// tunes them, and server notices dropped (they would otherwise reach the `log` crate).
pub(crate) fn connection_config(
    url: &str,
    timeout_ms: u64,
    application_name: &str,
) -> Result<postgres::Config, StoreError> {
    // The parse error can quote a character of the URL, so it is not repeated.
    let mut config: postgres::Config = url.parse().map_err(|_| {
        StoreError::BadConfig(
            "quota.pg-url must be a PostgreSQL URL or key=value connection string".into(),
        )
    })?;
    let timeout = bounded_timeout(timeout_ms);
    config.connect_timeout(timeout);
    if config.get_application_name().is_none() {
        config.application_name(application_name);
    }
    config.keepalives(true);
    if config.get_keepalives_idle() == DEFAULT_KEEPALIVES_IDLE {
        config.keepalives_idle(Duration::from_secs(10));
    }
    if config.get_keepalives_interval().is_none() {
        config.keepalives_interval(Duration::from_secs(3));
    }
    if config.get_keepalives_retries().is_none() {
        config.keepalives_retries(3);
    }
    if config.get_tcp_user_timeout().is_none() {
        // Unacknowledged writes to a vanished server fail after this instead of ~15 minutes.
        config.tcp_user_timeout(timeout.saturating_mul(2).max(Duration::from_secs(5)));
    }
    config.notice_callback(|_| {});
    Ok(config)
}

/// Fills in the password from `creds` when the URL carries none (a password in the URL wins,
/// as with libpq). `Err` says why the password file could not be used; the config is then left
/// without a password.
pub(crate) fn apply_credentials(
    config: &mut postgres::Config,
    creds: &Credentials,
) -> Result<(), String> {
    if config.get_password().is_some() {
        return Ok(());
    }
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(host)) => host.as_str(),
        _ => "localhost",
    };
    let user = config.get_user().unwrap_or_default().to_owned();
    let database = config.get_dbname().unwrap_or(&user).to_owned();
    let target = Target {
        host,
        port: config.get_ports().first().copied().unwrap_or(5432),
        database: &database,
        user: &user,
    };
    if let Some(password) = creds.password_for(&target)? {
        config.password(password);
    }
    Ok(())
}

/// The password in the config, if any: scrubbed from every message as a last line of defence.
pub(crate) fn secret_of(config: &postgres::Config) -> Option<String> {
    config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .filter(|p| p.len() >= 4)
}

/// Removes the password from a message.
pub(crate) fn scrub(text: String, secret: Option<&str>) -> String {
    match secret {
        Some(s) if text.contains(s) => text.replace(s, "***"),
        _ => text,
    }
}

/// Why opening or setting up a connection failed: a described, scrubbed message (r2d2 keeps
/// only the `Display` of the last error, and `postgres::Error`'s drops the cause).
#[derive(Debug)]
pub(crate) struct ConnectError(String);

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConnectError {}

/// The outcome of the latest connection attempt, so that checkouts fail at once while the
/// server is known to refuse connections instead of each waiting the whole timeout.
#[derive(Default)]
pub(crate) struct Health {
    /// When the latest attempt failed and why; `None` once an attempt succeeded.
    last_failure: Mutex<Option<(Instant, String)>>,
}

impl Health {
    fn record(&self, outcome: Result<(), &str>) {
        if let Ok(mut slot) = self.last_failure.lock() {
            *slot = outcome
                .err()
                .map(|reason| (Instant::now(), reason.to_owned()));
        }
    }

    /// The reason of a connection failure newer than `window` with no success since.
    fn recent_failure(&self, window: Duration) -> Option<String> {
        let slot = self.last_failure.lock().ok()?;
        slot.as_ref()
            .filter(|(at, _)| at.elapsed() < window)
            .map(|(_, reason)| reason.clone())
    }
}

/// Opens connections (as `r2d2_postgres`'s manager does) with errors that say what went
/// wrong, looking the password up at every attempt (so a rotated password file applies to the
/// next connection) and recording each attempt.
pub(crate) struct Manager {
    config: postgres::Config,
    credentials: Credentials,
    secret: Option<String>,
    health: Arc<Health>,
}

impl Manager {
    fn error(&self, err: &postgres::Error, secret: Option<&str>) -> ConnectError {
        ConnectError(scrub(scrub(describe(err), self.secret.as_deref()), secret))
    }
}

impl ManageConnection for Manager {
    type Connection = Client;
    type Error = ConnectError;

    fn connect(&self) -> Result<Client, ConnectError> {
        let mut config = self.config.clone();
        let _ = apply_credentials(&mut config, &self.credentials);
        let secret = secret_of(&config);
        let result = config
            .connect(NoTls)
            .map_err(|e| self.error(&e, secret.as_deref()));
        self.health
            .record(result.as_ref().map(|_| ()).map_err(|e| e.0.as_str()));
        result
    }

    fn is_valid(&self, conn: &mut Client) -> Result<(), ConnectError> {
        conn.simple_query("")
            .map(|_| ())
            .map_err(|e| self.error(&e, None))
    }

    fn has_broken(&self, conn: &mut Client) -> bool {
        conn.is_closed()
    }
}

/// Runs on every new connection: bounds each statement and each lock wait by the timeout.
#[derive(Debug)]
struct SessionSetup {
    sql: String,
}

impl SessionSetup {
    fn new(timeout_ms: u64) -> SessionSetup {
        let ms = bounded_timeout(timeout_ms).as_millis();
        SessionSetup {
            sql: format!("SET statement_timeout = {ms}; SET lock_timeout = {ms}"),
        }
    }
}

impl CustomizeConnection<Client, ConnectError> for SessionSetup {
    fn on_acquire(&self, conn: &mut Client) -> Result<(), ConnectError> {
        conn.batch_execute(&self.sql)
            .map_err(|e| ConnectError(describe(&e)))?;
        // Remember this backend, so the listener can tell this node's own writes apart.
        let row = conn
            .query_one("SELECT pg_backend_pid()", &[])
            .map_err(|e| ConnectError(describe(&e)))?;
        super::error::remember_own_backend(row.get::<_, i32>(0));
        Ok(())
    }
}

/// The pool of connections, plus what is needed to report its failures.
pub(crate) struct PgPool {
    pool: r2d2::Pool<Manager>,
    secret: Option<String>,
    health: Arc<Health>,
    /// How long a failed connection attempt makes checkouts fail fast.
    fail_fast: Duration,
    /// Why the configured password could not be used, if so.
    warning: Option<String>,
}

/// While connecting fails, r2d2 retries in the background at least every half timeout; a
/// failure this recent (or one timeout, if longer) means the server is still refusing.
const FAIL_FAST_MIN: Duration = Duration::from_secs(1);

/// Builds the pool without connecting: connections open on demand (`min_idle` 0), and waiting
/// for one is bounded by the timeout. Zero sizes and timeouts are raised to 1 (r2d2 panics on
/// zero); `Store::new` refuses them before getting here.
pub(crate) fn build(
    url: &str,
    creds: &Credentials,
    timeout_ms: u64,
    size: u32,
) -> Result<PgPool, StoreError> {
    let config = connection_config(url, timeout_ms, APPLICATION_NAME)?;
    // Said once now; connections look the password up again each time.
    let mut probe = config.clone();
    let warning = apply_credentials(&mut probe, creds).err();
    let secret = secret_of(&probe);
    let health = Arc::new(Health::default());
    let manager = Manager {
        config,
        credentials: creds.clone(),
        secret: secret.clone(),
        health: Arc::clone(&health),
    };
    let pool = r2d2::Pool::builder()
        .max_size(size.max(1))
        .min_idle(Some(0))
        .connection_timeout(bounded_timeout(timeout_ms))
        .test_on_check_out(true)
        .error_handler(Box::new(r2d2::NopErrorHandler))
        .connection_customizer(Box::new(SessionSetup::new(timeout_ms)))
        .build_unchecked(manager);
    let fail_fast = bounded_timeout(timeout_ms).max(FAIL_FAST_MIN);
    Ok(PgPool {
        pool,
        secret,
        health,
        fail_fast,
        warning,
    })
}

impl PgPool {
    /// A connection, waiting at most the timeout; `Unavailable` with the last connect error
    /// when none could be had. While the latest connection attempt failed (and r2d2 keeps
    /// retrying in the background), a checkout that finds no idle connection fails at once
    /// rather than holding a worker thread for the whole timeout.
    pub(crate) fn checkout(&self) -> Result<Conn, StoreError> {
        if let Some(conn) = self.pool.try_get() {
            return Ok(conn);
        }
        if let Some(reason) = self.health.recent_failure(self.fail_fast) {
            return Err(StoreError::Unavailable(reason));
        }
        self.pool.get().map_err(|e| {
            StoreError::Unavailable(pool_failure(&e.to_string(), self.secret.as_deref()))
        })
    }

    /// Why the configured password file could not be used, if so (said once, by the owner).
    pub(crate) fn warning(&self) -> Option<&str> {
        self.warning.as_deref()
    }

    /// (open connections, idle connections).
    pub(crate) fn state(&self) -> (u32, u32) {
        let state = self.pool.state();
        (state.connections, state.idle_connections)
    }
}

/// The reason a checkout failed, from r2d2's "timed out waiting for connection[: last error]".
fn pool_failure(text: &str, secret: Option<&str>) -> String {
    const PREFIX: &str = "timed out waiting for connection: ";
    match text.strip_prefix(PREFIX) {
        Some(last) if !last.is_empty() => scrub(last.to_owned(), secret),
        _ => "no connection free within quota.pg-timeout-ms".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_gets_module_settings() {
        let c = connection_config("postgres://u:pw@db.example:5433/quota", 1500, "x").unwrap();
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_millis(1500)));
        assert_eq!(c.get_application_name(), Some("x"));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(c.get_ports(), &[5433]);

        let kv = "host=h user=u application_name=mine keepalives_idle=60 tcp_user_timeout=7";
        let c = connection_config(kv, 100, "x").unwrap();
        assert_eq!(c.get_application_name(), Some("mine"));
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(7)));
    }

    #[test]
    fn bad_urls_do_not_echo_the_url() {
        for url in [
            "postgres://u:s3cr3t@[::1",
            "host=h password='s3cr3t",
            "bogus=s3cr3t",
        ] {
            let err = connection_config(url, 100, "x").unwrap_err();
            assert!(matches!(err, StoreError::BadConfig(_)));
            assert!(!err.to_string().contains("s3cr3t"), "{err}");
        }
    }

    #[test]
    fn secrets_are_scrubbed() {
        let c = connection_config("postgres://u:s3cr3t@h/db", 100, "x").unwrap();
        let secret = secret_of(&c);
        assert_eq!(secret.as_deref(), Some("s3cr3t"));
        assert_eq!(scrub("a s3cr3t b".into(), secret.as_deref()), "a *** b");
        let short = connection_config("postgres://u:ab@h/db", 100, "x").unwrap();
        assert_eq!(secret_of(&short), None);
    }

    #[test]
    fn pool_failures_keep_the_last_error() {
        assert_eq!(
            pool_failure(
                "timed out waiting for connection: error connecting to server: refused",
                None
            ),
            "error connecting to server: refused"
        );
        assert_eq!(
            pool_failure("timed out waiting for connection", None),
            "no connection free within quota.pg-timeout-ms"
        );
        assert_eq!(
            pool_failure(
                "timed out waiting for connection: pw=hunter2",
                Some("hunter2")
            ),
            "pw=***"
        );
    }

    #[test]
    fn recent_connect_failures_are_remembered_until_a_success() {
        let health = Health::default();
        assert_eq!(health.recent_failure(Duration::from_secs(1)), None);
        health.record(Err("refused"));
        assert_eq!(
            health.recent_failure(Duration::from_secs(1)).as_deref(),
            Some("refused")
        );
        assert_eq!(health.recent_failure(Duration::ZERO), None);
        health.record(Ok(()));
        assert_eq!(health.recent_failure(Duration::from_secs(1)), None);
    }

    #[test]
    fn session_setup_bounds_statements_and_locks() {
        assert_eq!(
            SessionSetup::new(250).sql,
            "SET statement_timeout = 250; SET lock_timeout = 250"
        );
        assert!(SessionSetup::new(u64::MAX).sql.contains("= 3600000;"));
        assert!(SessionSetup::new(0).sql.contains("= 1;"));
    }
}
