//! Connections: reading `quota.pg-url` (or `quota.listen-url`) into a `postgres::Config` and
//! TLS settings with the module's timeouts and keepalives, opening a connection the way libpq
//! would (TLS per `sslmode`, with its fallbacks), and the r2d2 pool that hands connections to
//! worker threads.
//!
//! Owns how a connection is opened and how pool failures become `StoreError`s. Sets nothing
//! on a session (a transaction pooler would lose it: timeouts are per transaction, see
//! `Store::read`). Must not run application queries, and must never let the URL
//! or the password into an error message.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postgres::config::{Host, SslMode as PgSslMode};
use postgres::{Client, NoTls};
use r2d2::ManageConnection;

use super::backoff::{up_to, Rng};
use super::connstr::ConnInfo;
use super::error::{describe, StoreError};
use super::passfile::{Credentials, Target as PassTarget};
use super::tls::{self, SslMode, TlsSettings};

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

/// libpq keywords rust-postgres does not know, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("passfile", "use quota.pg-passfile"),
    ("service", "spell the settings out"),
    ("require_auth", "not supported"),
    ("krbsrvname", "GSSAPI is not supported"),
    ("gsslib", "GSSAPI is not supported"),
    ("gssdelegation", "GSSAPI is not supported"),
    ("requirepeer", "not supported"),
    ("replication", "not supported"),
    ("sslkeylogfile", "not supported"),
    ("min_protocol_version", "not supported"),
    ("max_protocol_version", "not supported"),
];

/// Where and how to connect: rust-postgres's settings and the TLS ones it does not know.
/// (`Debug` hides the password: rust-postgres redacts it.)
#[derive(Clone, Debug)]
pub(crate) struct Target {
    pub config: postgres::Config,
    pub tls: TlsSettings,
}

/// Reads a connection string (see `connstr`) and applies the module's settings:
/// `connect_timeout` = the timeout, the application name (unless the string gives one),
/// TCP keepalives on, with dead-peer detection in tens of seconds rather than hours unless the
/// string tunes them, and server notices dropped (they would otherwise reach the `log` crate).
/// The `ssl*` keywords become [`TlsSettings`]; the rest goes to rust-postgres.
pub(crate) fn connection_config(
    url: &str,
    timeout_ms: u64,
    application_name: &str,
) -> Result<Target, StoreError> {
    let bad = |why: String| {
        StoreError::BadConfig(format!(
            "not a usable PostgreSQL URL or key=value string: {why}"
        ))
    };
    let info = ConnInfo::parse(url).map_err(|e| bad(e.0))?;
    let mut tls_params: Vec<(&str, &[u8])> = Vec::new();
    let mut rendered = Vec::new();
    let mut password: Option<&[u8]> = None;
    let mut fallback_name: Option<String> = None;
    for (key, value) in info.settings() {
        if tls::KEYWORDS.contains(&key) {
            tls_params.push((key, value));
            continue;
        }
        if let Some((_, what)) = UNSUPPORTED.iter().find(|(k, _)| *k == key) {
            return Err(bad(format!(
                "the parameter {key} is not supported ({what})"
            )));
        }
        let text =
            std::str::from_utf8(value).map_err(|_| bad(format!("the value of {key} is not UTF-8")));
        match key {
            "password" => password = Some(value),
            "fallback_application_name" => fallback_name = Some(text?.to_owned()),
            // rust-postgres always speaks UTF-8.
            "client_encoding" => {
                if !matches!(
                    text?.to_ascii_lowercase().as_str(),
                    "utf8" | "utf-8" | "unicode" | "auto"
                ) {
                    return Err(bad("client_encoding must be UTF8".into()));
                }
            }
            _ => rendered.push((key, text?)),
        }
    }
    let quoted = |(key, value): &(&str, &str)| {
        format!(
            "{key}='{}'",
            value.replace('\\', "\\\\").replace('\'', "\\'")
        )
    };
    let text: Vec<String> = rendered.iter().map(quoted).collect();
    let mut config: postgres::Config = text.join(" ").parse().map_err(|_| {
        // Which one: rust-postgres names the keyword, never the value.
        let why = rendered
            .iter()
            .find_map(|p| quoted(p).parse::<postgres::Config>().err())
            .and_then(|e| std::error::Error::source(&e).map(ToString::to_string))
            .unwrap_or_else(|| "refused".to_owned());
        bad(why)
    })?;
    if let Some(password) = password {
        config.password(password);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let mut tls = TlsSettings::from_params(&tls_params, home.as_deref()).map_err(bad)?;
    // libpq never uses TLS over a Unix socket.
    if !config.get_hosts().is_empty()
        && config
            .get_hosts()
            .iter()
            .all(|h| matches!(h, Host::Unix(_)))
    {
        tls.mode = SslMode::Disable;
    }
    let timeout = bounded_timeout(timeout_ms);
    config.connect_timeout(timeout);
    if config.get_application_name().is_none() {
        config.application_name(fallback_name.as_deref().unwrap_or(application_name));
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
    Ok(Target { config, tls })
}

impl Target {
    /// Opens one connection with the password looked up now (so a rotated password file
    /// applies), TLS as `sslmode` says: `prefer` retries plain when the handshake fails and
    /// `allow` retries with TLS when the server refuses a plain connection, as libpq does.
    /// `Err` is described and holds no password.
    pub(crate) fn connect(&self, creds: &Credentials) -> Result<Client, String> {
        let mut config = self.config.clone();
        let _ = apply_credentials(&mut config, creds);
        let secret = secret_of(&config);
        self.connect_as(&mut config)
            .map_err(|e| scrub(e, secret.as_deref()))
    }

    fn connect_as(&self, config: &mut postgres::Config) -> Result<Client, String> {
        let plain = |config: &mut postgres::Config| {
            config.ssl_mode(PgSslMode::Disable);
            config.connect(NoTls)
        };
        let encrypted = |config: &mut postgres::Config, mode: PgSslMode| {
            let tls = self.tls.connector()?;
            config.ssl_mode(mode);
            config.connect(tls).map_err(|e| describe(&e))
        };
        match self.tls.mode {
            SslMode::Disable => plain(config).map_err(|e| describe(&e)),
            SslMode::Allow => match plain(config) {
                Err(e) if e.as_db_error().is_some() => encrypted(config, PgSslMode::Require),
                other => other.map_err(|e| describe(&e)),
            },
            SslMode::Prefer => match encrypted(config, PgSslMode::Prefer) {
                Err(e) if e.starts_with(super::error::TLS_FAILED) => {
                    plain(config).map_err(|e| describe(&e))
                }
                other => other,
            },
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => {
                encrypted(config, PgSslMode::Require)
            }
        }
    }
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
        Some(Host::Tcp(host)) => host.as_str(),
        _ => "localhost",
    };
    let user = config.get_user().unwrap_or_default().to_owned();
    let database = config.get_dbname().unwrap_or(&user).to_owned();
    let target = PassTarget {
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

    /// Whether the latest attempt failed.
    fn failing(&self) -> bool {
        self.last_failure.lock().is_ok_and(|slot| slot.is_some())
    }

    /// The reason of a connection failure newer than `window` with no success since.
    fn recent_failure(&self, window: Duration) -> Option<String> {
        let slot = self.last_failure.lock().ok()?;
        slot.as_ref()
            .filter(|(at, _)| at.elapsed() < window)
            .map(|(_, reason)| reason.clone())
    }
}

/// A pooled connection.
pub(crate) struct PgConn {
    client: Client,
}

impl std::ops::Deref for PgConn {
    type Target = Client;
    fn deref(&self) -> &Client {
        &self.client
    }
}

impl std::ops::DerefMut for PgConn {
    fn deref_mut(&mut self) -> &mut Client {
        &mut self.client
    }
}

/// Opens connections (as `r2d2_postgres`'s manager does) with errors that say what went
/// wrong, looking the password up at every attempt (so a rotated password file applies to the
/// next connection) and recording each attempt.
pub(crate) struct Manager {
    target: Target,
    credentials: Credentials,
    secret: Option<String>,
    health: Arc<Health>,
    /// The pool's timeout: r2d2 retries a failed attempt after at most half of it.
    timeout: Duration,
    /// Jitter for the attempts that follow a failure (see `retry_pause`).
    rng: Mutex<Rng>,
}

/// How long an attempt that follows a failed one waits first: up to a quarter of the timeout.
///
/// While PostgreSQL refuses connections, r2d2 retries each missing connection on a fixed
/// schedule (0.4 s, 0.8 s, then every half timeout) that starts when the outage did, which is
/// the same moment on every node of a fleet: without this, the nodes would knock together, in
/// waves, on the server that comes back. The pause spreads each retry over half a step more.
fn retry_pause(timeout: Duration, random: u64) -> Duration {
    up_to(timeout / 4, random)
}

impl ManageConnection for Manager {
    type Connection = PgConn;
    type Error = ConnectError;

    fn connect(&self) -> Result<PgConn, ConnectError> {
        // Runs on r2d2's own threads (never a worker's or Redis's): a pause holds nobody.
        if self.health.failing() {
            let random = self.rng.lock().map_or(0, |mut rng| rng.next_u64());
            std::thread::sleep(retry_pause(self.timeout, random));
        }
        let result = self
            .target
            .connect(&self.credentials)
            .map(|client| PgConn { client })
            .map_err(|e| ConnectError(scrub(e, self.secret.as_deref())));
        self.health
            .record(result.as_ref().map(|_| ()).map_err(|e| e.0.as_str()));
        result
    }

    fn is_valid(&self, conn: &mut PgConn) -> Result<(), ConnectError> {
        conn.client
            .simple_query("")
            .map(|_| ())
            .map_err(|e| ConnectError(scrub(describe(&e), self.secret.as_deref())))
    }

    fn has_broken(&self, conn: &mut PgConn) -> bool {
        conn.client.is_closed()
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
    let target = connection_config(url, timeout_ms, APPLICATION_NAME)?;
    // Said once now; connections look the password up again each time.
    let mut probe = target.config.clone();
    let warning = apply_credentials(&mut probe, creds).err();
    let secret = secret_of(&probe);
    let health = Arc::new(Health::default());
    let manager = Manager {
        target,
        credentials: creds.clone(),
        secret: secret.clone(),
        health: Arc::clone(&health),
        timeout: bounded_timeout(timeout_ms),
        rng: Mutex::new(Rng::seeded()),
    };
    let pool = r2d2::Pool::builder()
        .max_size(size.max(1))
        .min_idle(Some(0))
        .connection_timeout(bounded_timeout(timeout_ms))
        .test_on_check_out(true)
        .error_handler(Box::new(r2d2::NopErrorHandler))
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
    fn a_retry_after_a_failure_pauses_up_to_a_quarter_timeout_spread_over_a_fleet() {
        let timeout = Duration::from_secs(2);
        assert_eq!(retry_pause(timeout, 0), Duration::ZERO);
        assert_eq!(retry_pause(timeout, 500_000), Duration::from_millis(500));
        // 1000 nodes, each its own generator: every pause within [0, 500 ms], spread over it.
        let pauses: Vec<u64> = (0..1000)
            .map(|_| retry_pause(timeout, Rng::seeded().next_u64()).as_micros() as u64)
            .collect();
        crate::store::backoff::assert_spread(&pauses, 0, 500_000);
    }

    #[test]
    fn config_gets_module_settings() {
        let c = connection_config("postgres://u:pw@db.example:5433/quota", 1500, "x")
            .unwrap()
            .config;
        assert_eq!(c.get_connect_timeout(), Some(&Duration::from_millis(1500)));
        assert_eq!(c.get_application_name(), Some("x"));
        assert!(c.get_keepalives());
        assert_eq!(c.get_keepalives_idle(), Duration::from_secs(10));
        assert_eq!(c.get_tcp_user_timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(c.get_ports(), &[5433]);

        let kv = "host=h user=u application_name=mine keepalives_idle=60 tcp_user_timeout=7";
        let c = connection_config(kv, 100, "x").unwrap().config;
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
        let c = connection_config("postgres://u:s3cr3t@h/db", 100, "x")
            .unwrap()
            .config;
        let secret = secret_of(&c);
        assert_eq!(secret.as_deref(), Some("s3cr3t"));
        assert_eq!(scrub("a s3cr3t b".into(), secret.as_deref()), "a *** b");
        let short = connection_config("postgres://u:ab@h/db", 100, "x")
            .unwrap()
            .config;
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
    fn tls_keywords_are_ours_and_the_rest_goes_to_rust_postgres() {
        let t = connection_config(
            "postgresql://u:pw@db.example/quota?sslmode=verify-full&sslrootcert=/etc/ca.pem&fallback_application_name=fb&client_encoding=UTF8&gssencmode=disable",
            1000,
            "x",
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(t.config.get_application_name(), Some("fb"));
        assert_eq!(t.config.get_password(), Some(&b"pw"[..]));
        assert_eq!(t.config.get_dbname(), Some("quota"));
        // libpq never uses TLS over a Unix socket.
        let unix = connection_config("host=/var/run/postgresql user=u sslmode=require", 1000, "x")
            .unwrap();
        assert_eq!(unix.tls.mode, SslMode::Disable);
        // A password that is not UTF-8 is sent as given.
        let raw = connection_config("postgresql://u:%FF%FE@h/db", 1000, "x").unwrap();
        assert_eq!(raw.config.get_password(), Some(&[0xff, 0xfe][..]));
    }

    #[test]
    fn refusals_name_the_parameter_not_its_value() {
        for (url, wanted) in [
            ("host=h port=s3cr3t", "`port`"),
            (
                "host=h passfile=/s3cr3t",
                "passfile is not supported (use quota.pg-passfile)",
            ),
            ("host=h bogus=s3cr3t", "bogus"),
            (
                "host=h client_encoding=s3cr3t",
                "client_encoding must be UTF8",
            ),
            ("host=h sslmode=s3cr3t", "sslmode must be"),
        ] {
            let e = connection_config(url, 100, "x").unwrap_err().to_string();
            assert!(e.contains(wanted), "{url}: {e}");
            assert!(!e.contains("s3cr3t"), "{e}");
        }
    }
}
