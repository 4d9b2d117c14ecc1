//! What the store answers besides rows: its error (whose `Display` is the wire text) and the
//! outcomes of writes, and this process's origin id (to tell its own notifications).

use std::borrow::Cow;
use std::fmt;
use std::sync::OnceLock;

use crate::core::credit::Replenishment;

/// This process's origin id: 16 hex digits, random per process. Every write transaction sets
/// it (`set_config('redis_quota.origin', ..., true)`, local to the transaction, so a
/// transaction pooler carries nothing over) and the NOTIFY triggers put it in their payload,
/// which tells the listener which changes this node made itself, through any pooler.
pub(crate) fn origin() -> &'static str {
    static ORIGIN: OnceLock<String> = OnceLock::new();
    ORIGIN.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        format!("{:016x}", h.finish())
    })
}

/// Whether a notification's origin is this process.
pub(crate) fn is_own_origin(origin: Option<&str>) -> bool {
    origin == Some(self::origin())
}

/// Why a store operation failed. `Display` is the exact one-line wire error; no message ever
/// contains the connection URL or the password.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum StoreError {
    /// `quota.pg-url` is empty.
    NotConfigured,
    /// A setting cannot work (bad URL, schema name, zero timeout or pool size).
    BadConfig(String),
    /// PostgreSQL cannot be reached, the connection broke, or no pooled connection came free
    /// within the timeout.
    Unavailable(String),
    /// A statement or a lock wait ran past `quota.pg-timeout-ms` (SQLSTATE 57014 or 55P03).
    Timeout,
    /// PostgreSQL refused a statement; the server's message, on one line.
    Query(String),
    /// The request cannot be applied to the stored row (a top-up would overflow a column, an
    /// amount does not fit its column); the text is the whole wire error, `ERR ...`.
    Invalid(String),
}

impl StoreError {
    /// Whether PostgreSQL could not be used at all (not configured, unreachable, too slow), as
    /// opposed to refusing this particular request. Admission falls back to the base policy on
    /// these.
    pub(crate) fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Timeout | StoreError::NotConfigured
        )
    }

    /// Classifies a `postgres` error: connection trouble is `Unavailable`, statement and lock
    /// timeouts are `Timeout`, anything else the server refused is `Query`.
    pub(crate) fn from_pg(err: &postgres::Error) -> StoreError {
        if let Some(db) = err.as_db_error() {
            return classify_db(db.code().code(), db.message());
        }
        let text = describe(err);
        if err.is_closed() || has_io_source(err) || is_connection_kind(&err.to_string()) {
            StoreError::Unavailable(text)
        } else {
            StoreError::Query(text)
        }
    }
}

/// Maps a server error by SQLSTATE.
pub(crate) fn classify_db(code: &str, message: &str) -> StoreError {
    match code {
        // query_canceled (statement_timeout), lock_not_available (lock_timeout).
        "57014" | "55P03" => StoreError::Timeout,
        // admin/crash shutdown, cannot connect now; read-only (a standby answered a write).
        "57P01" | "57P02" | "57P03" | "25006" => StoreError::Unavailable(message.to_owned()),
        // connection exception, insufficient resources, authentication, unknown database.
        _ if code.starts_with("08")
            || code.starts_with("53")
            || code.starts_with("28")
            || code == "3D000" =>
        {
            StoreError::Unavailable(message.to_owned())
        }
        _ => StoreError::Query(message.to_owned()),
    }
}

/// The kinds of non-server `postgres` errors that mean the connection itself failed (matched on
/// the crate's fixed `Display` text, since its error kind is private).
pub(super) fn is_connection_kind(kind_text: &str) -> bool {
    const KINDS: [&str; 8] = [
        "error communicating with the server",
        "connection closed",
        "error connecting to server",
        "timeout waiting for server",
        "error performing TLS handshake",
        "authentication error",
        "unexpected message from server",
        "error parsing response from server",
    ];
    KINDS.iter().any(|k| kind_text.starts_with(k))
}

fn has_io_source(err: &postgres::Error) -> bool {
    std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>())
}

/// How [`describe`] begins the message of a failed TLS handshake.
pub(crate) const TLS_FAILED: &str = "TLS: ";

/// A one-line description of a `postgres` error: the server's message for server errors,
/// `TLS: <why>` for a failed TLS handshake, else the error kind and its cause ("error
/// connecting to server: Connection refused").
pub(crate) fn describe(err: &postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return db.message().to_owned();
    }
    let cause = std::error::Error::source(err).map(ToString::to_string);
    if err.to_string() == "error performing TLS handshake" {
        return match cause.as_deref() {
            Some("server does not support TLS") => format!(
                "{TLS_FAILED}the server does not support TLS (ssl = off), and sslmode requires it"
            ),
            Some(why) => format!("{TLS_FAILED}{why}"),
            None => format!("{TLS_FAILED}the handshake failed"),
        };
    }
    match cause {
        Some(cause) => format!("{err}: {cause}"),
        None => err.to_string(),
    }
}

/// Replaces line breaks so that a message stays one line on the wire.
fn one_line(text: &str) -> Cow<'_, str> {
    if text.contains(['\r', '\n']) {
        Cow::Owned(text.replace("\r\n", " ").replace(['\r', '\n'], " "))
    } else {
        Cow::Borrowed(text)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::NotConfigured => f.write_str("ERR quota.pg-url is not set"),
            StoreError::BadConfig(msg) => write!(f, "ERR {}", one_line(msg)),
            StoreError::Unavailable(reason) => {
                write!(f, "ERR PostgreSQL unavailable: {}", one_line(reason))
            }
            StoreError::Timeout => f.write_str(
                "ERR PostgreSQL did not answer within the timeout (quota.pg-timeout-ms)",
            ),
            StoreError::Query(msg) => write!(f, "ERR PostgreSQL error: {}", one_line(msg)),
            StoreError::Invalid(msg) => f.write_str(&one_line(msg)),
        }
    }
}

impl std::error::Error for StoreError {}

/// What `QUOTA.GRANT` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrantOutcome {
    /// The row as committed; on a duplicate purchase id, the row as it is now (`None` if the
    /// user has no row for that bundle).
    pub record: Option<Replenishment>,
    /// The purchase id was already recorded for this (tenant, project): nothing was written.
    pub duplicate: bool,
    /// Every active row of the user after the grant (expired ones included), by bundle: the
    /// cache entry to write through.
    pub live_rows: Vec<Replenishment>,
}

/// What `QUOTA.REVOKE` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RevokeOutcome {
    /// An active row was deactivated.
    pub revoked: bool,
    /// Every active row of the user afterwards, by bundle: the cache entry to write through.
    pub live_rows: Vec<Replenishment>,
}

/// What `QUOTA.CLEANUP` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CleanupOutcome {
    /// How many expired rows were deactivated.
    pub deactivated: u64,
    /// The distinct users (tenant, project, user) whose rows changed, sorted: their cache
    /// entries are stale.
    pub users: Vec<(String, String, String)>,
    /// Another node was already cleaning up: nothing was done.
    pub skipped: bool,
}
