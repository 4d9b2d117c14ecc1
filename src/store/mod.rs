//! PostgreSQL, the source of truth for credits: the connection pool, the queries behind
//! `QUOTA.GRANT`/`REVOKE`/`LIST`/`CLEANUP` and cache loads, the project-wide reads
//! (`QUOTA.FIND`, `QUOTA.TOP`), the schema deploy and the LISTEN/NOTIFY listener.
//!
//! Owns every SQL statement and every PostgreSQL type. Must not know Redis: callers (worker
//! threads, never the Redis main thread) get core types (`Replenishment`) and a `StoreError`
//! whose `Display` is the exact wire error. Nothing here decides admission or touches the cache.

pub(crate) mod backoff;
pub(crate) mod connstr;
mod ledger;
pub(crate) mod listener;
mod passfile;
mod policies;
mod pool;
mod project;
mod queries;
mod rows;
mod schema;
mod tls;
mod tls_connect;

#[cfg(test)]
mod pg_tests;

use std::fmt;

use postgres::Client;

use crate::core::credit::{GrantRequest, Replenishment};
use crate::core::ids::{AccountId, PolicyId, UserId};
use crate::core::policy::{Limits, PolicyRecord};
use crate::core::Millis;

mod error;

pub(crate) use error::{CleanupOutcome, GrantOutcome, RevokeOutcome, StoreError};
pub(crate) use ledger::{AccountBatch, BatchOutcome, HourRow};
pub(crate) use passfile::Credentials;
pub(crate) use project::{FindAfter, FindPage, FindQuery, TopBy, TopQuery, TopUser};

pub(crate) use connstr::{password_spans, ConnInfo, Form};
pub(crate) use schema::validate_schema;

/// Checks that `url` parses as a PostgreSQL URL or key=value string (empty = not configured).
/// The error never quotes the URL.
pub(crate) fn validate_url(url: &str) -> Result<(), StoreError> {
    if url.is_empty() {
        return Ok(());
    }
    pool::connection_config(url, 1000, "redis-quota").map(|_| ())
}

/// How to reach PostgreSQL (from the `quota.*` module configuration).
#[derive(Clone)]
pub(crate) struct StoreConfig {
    /// `quota.pg-url`: a `postgres://` URL or a `key=value` connection string. Secret.
    pub url: String,
    /// The password when the URL has none (`quota.pg-password`, `quota.pg-passfile`).
    pub credentials: Credentials,
    /// `quota.schema`: the schema holding the tables (see [`validate_schema`]).
    pub schema: String,
    /// `quota.pg-timeout-ms`: bound on connecting, waiting for a pooled connection, each
    /// statement and each lock wait.
    pub timeout_ms: u64,
    /// `quota.pool-size`: most connections open at once.
    pub pool_size: u32,
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL may carry a password: never print it.
        f.debug_struct("StoreConfig")
            .field("url", &passfile::redacted(&self.url))
            .field("credentials", &self.credentials)
            .field("schema", &self.schema)
            .field("timeout_ms", &self.timeout_ms)
            .field("pool_size", &self.pool_size)
            .finish()
    }
}

/// The PostgreSQL side of the module: a pool of connections and the statements run on it.
/// `Send + Sync`; share it in an `Arc`. Every method blocks on the network, so call them from
/// worker threads only.
pub(crate) struct Store {
    pool: pool::PgPool,
    schema: String,
    sql: queries::Statements,
    policy_sql: policies::PolicyStatements,
    ledger_sql: ledger::LedgerStatements,
    project_sql: project::ProjectStatements,
    timeout_ms: u64,
    /// Run first in every transaction: the timeouts (`SET LOCAL`, so they hold through a
    /// transaction pooler) and this node's origin id for the NOTIFY triggers.
    tx_setup: String,
}

/// The statement that opens every transaction (see [`Store::write`], [`Store::read`]): one `SELECT` of
/// three `set_config(..., true)`, the transaction-local form of `SET LOCAL`, which costs one
/// parse where three `SET LOCAL` statements cost three.
fn tx_setup(timeout_ms: u64) -> String {
    let ms = pool::bounded_timeout(timeout_ms).as_millis();
    // The origin is 16 hex digits made here: safe to splice.
    format!(
        "SELECT set_config('statement_timeout', '{ms}', true), \
         set_config('lock_timeout', '{ms}', true), \
         set_config('redis_quota.origin', '{}', true)",
        error::origin()
    )
}

impl Store {
    /// Prepares the pool without touching the network (connections open on first use).
    /// Fails on an empty URL (`NotConfigured`), an unparsable URL, a bad schema name, or a zero
    /// timeout or pool size (`BadConfig`).
    pub(crate) fn new(cfg: &StoreConfig) -> Result<Store, StoreError> {
        if cfg.url.trim().is_empty() {
            return Err(StoreError::NotConfigured);
        }
        validate_schema(&cfg.schema)?;
        if cfg.timeout_ms == 0 {
            return Err(StoreError::BadConfig(
                "quota.pg-timeout-ms must be at least 1".into(),
            ));
        }
        if cfg.pool_size == 0 {
            return Err(StoreError::BadConfig(
                "quota.pool-size must be at least 1".into(),
            ));
        }
        let pool = pool::build(&cfg.url, &cfg.credentials, cfg.timeout_ms, cfg.pool_size)?;
        Ok(Store {
            pool,
            schema: cfg.schema.clone(),
            sql: queries::Statements::new(&cfg.schema),
            policy_sql: policies::PolicyStatements::new(&cfg.schema),
            ledger_sql: ledger::LedgerStatements::new(&cfg.schema),
            project_sql: project::ProjectStatements::new(&cfg.schema),
            timeout_ms: cfg.timeout_ms,
            tx_setup: tx_setup(cfg.timeout_ms),
        })
    }

    /// Runs `f` on a connection checked out of the pool for the call.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.checkout()?;
        f(&mut conn)
    }

    /// Runs a read in a read-only transaction opened with [`tx_setup`], so the timeouts bound
    /// it through a transaction pooler as well: a statement past `pg-timeout-ms` is ended by
    /// the server itself.
    ///
    /// Not with a client-side cancel request: a cancel races the statement (a late one can
    /// hit the connection's next statement), and PgBouncer 1.18 (Debian 12's) exits on a
    /// cancel request whose sender closes its socket before PgBouncer has passed it on, which
    /// is what rust-postgres's cancel does (`FATAL ... disconnect_client(): bad client
    /// state: 0`, pgbouncer#801; fixed in 1.19). What the bounded transaction costs is in
    /// `measure_timeout_costs`.
    fn read<T>(
        &self,
        f: impl FnOnce(&mut postgres::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.checkout()?;
        let mut tx = conn
            .build_transaction()
            .read_only(true)
            .start()
            .map_err(|e| StoreError::from_pg(&e))?;
        tx.batch_execute(&self.tx_setup)
            .map_err(|e| StoreError::from_pg(&e))?;
        let out = f(&mut tx)?;
        tx.commit().map_err(|e| StoreError::from_pg(&e))?;
        Ok(out)
    }

    /// Runs `f` in a write transaction opened with [`tx_setup`]; `f` commits it.
    fn write<T>(
        &self,
        f: impl FnOnce(postgres::Transaction<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut conn = self.pool.checkout()?;
        let mut tx = conn.transaction().map_err(|e| StoreError::from_pg(&e))?;
        tx.batch_execute(&self.tx_setup)
            .map_err(|e| StoreError::from_pg(&e))?;
        f(tx)
    }

    /// Creates or completes the schema (`sql/deploy-control-plane.sql` with the schema name
    /// substituted) in one transaction, under an advisory lock so that nodes deploying at the
    /// same time wait for each other instead of failing.
    pub(crate) fn deploy(&self) -> Result<(), StoreError> {
        self.with_conn(|c| schema::deploy(c, &self.schema, self.timeout_ms))
    }

    /// All active rows of the user, any bundle, by bundle id; expired ones included (the core
    /// checks expiry when it reads). What the credits cache holds for the user.
    pub(crate) fn load_user(&self, user: &UserId) -> Result<Vec<Replenishment>, StoreError> {
        self.read(|c| queries::active_rows(c, &self.sql, user))
    }

    /// The active rows of several users in one query, in the order of `users` (what a burst of
    /// cold users costs: one round trip instead of one each).
    pub(crate) fn load_users(
        &self,
        users: &[UserId],
    ) -> Result<Vec<Vec<Replenishment>>, StoreError> {
        self.read(|c| queries::active_rows_many(c, &self.sql, users))
    }

    /// Applies `QUOTA.GRANT` to (user, bundle) in one transaction: locks the row, computes the
    /// new values from the current ones (`GrantRequest::apply`), writes them, records the event.
    /// A purchase id already recorded for the (tenant, project) writes nothing and returns
    /// `duplicate` with the current row.
    pub(crate) fn grant(
        &self,
        user: &UserId,
        bundle: &str,
        req: &GrantRequest,
        now: Millis,
    ) -> Result<GrantOutcome, StoreError> {
        match self.write(|tx| queries::grant(tx, &self.sql, user, bundle, req, now))? {
            queries::Granted::Done(outcome) => Ok(outcome),
            queries::Granted::Duplicate => {
                self.read(|c| queries::duplicate_outcome(c, &self.sql, user, bundle))
            }
        }
    }

    /// Soft-deletes (user, bundle) and records a `revoke` event if it was active.
    pub(crate) fn revoke(&self, user: &UserId, bundle: &str) -> Result<RevokeOutcome, StoreError> {
        self.write(|tx| queries::revoke(tx, &self.sql, user, bundle))
    }

    /// The user's rows by bundle id: active and unexpired ones (by the database clock), or every
    /// row with `all`.
    pub(crate) fn list(&self, user: &UserId, all: bool) -> Result<Vec<Replenishment>, StoreError> {
        self.read(|c| queries::list(c, &self.sql, user, all))
    }

    /// Deactivates every active row that expired at or before `now` and records an `expire`
    /// event for each. Skipped (not an error) while another node holds the cleanup lock.
    pub(crate) fn cleanup(&self, now: Millis) -> Result<CleanupOutcome, StoreError> {
        self.write(|tx| queries::cleanup(tx, &self.sql, &self.schema, now))
    }

    /// Applies one flush of the usage ledger (one batch per account) in one transaction: a
    /// batch whose sequence was applied before is skipped; see `ledger::flush`.
    pub(crate) fn flush_ledger(
        &self,
        batches: &[AccountBatch],
    ) -> Result<Vec<BatchOutcome>, StoreError> {
        if batches.is_empty() {
            return Ok(Vec::new());
        }
        self.write(|tx| ledger::flush(tx, &self.ledger_sql, batches))
    }

    /// `QUOTA.HISTORY`: the account's hourly ledger rows with `from <= hour < to`.
    pub(crate) fn history(
        &self,
        account: &AccountId<'_>,
        from: i64,
        to: i64,
    ) -> Result<Vec<HourRow>, StoreError> {
        self.read(|c| ledger::history(c, &self.ledger_sql, account, from, to))
    }

    /// `QUOTA.FIND`: one page of a project's live rows (see `project::find`).
    pub(crate) fn find(&self, query: &FindQuery) -> Result<FindPage, StoreError> {
        self.read(|c| project::find(c, &self.project_sql, query))
    }

    /// `QUOTA.TOP`: a project's heaviest users over a range of hours (see `project::top`).
    pub(crate) fn top(&self, query: &TopQuery) -> Result<Vec<TopUser>, StoreError> {
        self.read(|c| project::top(c, &self.project_sql, query))
    }

    /// Why the configured password file could not be used, if so (the owner logs it once).
    pub(crate) fn credentials_warning(&self) -> Option<&str> {
        self.pool.warning()
    }

    /// A named policy, or `None` when there is none by that name (what the policy cache holds).
    pub(crate) fn load_policy(&self, id: &PolicyId) -> Result<Option<PolicyRecord>, StoreError> {
        self.read(|c| policies::get(c, &self.policy_sql, id))
    }

    /// `QUOTA.POLICY SET`: creates or replaces the policy and records a `policy_set` event.
    pub(crate) fn set_policy(
        &self,
        id: &PolicyId,
        limits: &Limits,
    ) -> Result<PolicyRecord, StoreError> {
        self.write(|tx| policies::set(tx, &self.policy_sql, id, limits))
    }

    /// `QUOTA.POLICY DEL`: deletes the policy (recording a `policy_delete` event); whether it
    /// existed.
    pub(crate) fn delete_policy(&self, id: &PolicyId) -> Result<bool, StoreError> {
        self.write(|tx| policies::delete(tx, &self.policy_sql, id))
    }

    /// `QUOTA.POLICY LIST`: every policy of (tenant, project), by name.
    pub(crate) fn list_policies(
        &self,
        tenant: &str,
        project: &str,
    ) -> Result<Vec<PolicyRecord>, StoreError> {
        self.read(|c| policies::list(c, &self.policy_sql, tenant, project))
    }

    /// (open connections, idle connections), for `INFO quota`.
    pub(crate) fn pool_state(&self) -> (u32, u32) {
        self.pool.state()
    }

    /// The configured schema name.
    #[cfg(test)]
    fn schema(&self) -> &str {
        &self.schema
    }

    /// The NOTIFY channel the triggers send on: `<schema>_quota_changed`.
    #[cfg(test)]
    fn channel(&self) -> String {
        schema::channel(&self.schema)
    }
}

#[cfg(test)]
mod tests {
    use super::error::{classify_db, is_connection_kind};
    use super::listener::Listener;
    use super::*;

    fn cfg(url: &str) -> StoreConfig {
        StoreConfig {
            url: url.into(),
            credentials: Credentials::default(),
            schema: "control_plane".into(),
            timeout_ms: 1000,
            pool_size: 2,
        }
    }

    #[test]
    fn wire_texts_are_exact_and_one_line() {
        for (err, wire) in [
            (StoreError::NotConfigured, "ERR quota.pg-url is not set"),
            (
                StoreError::Unavailable("connection closed".into()),
                "ERR PostgreSQL unavailable: connection closed",
            ),
            (
                StoreError::Timeout,
                "ERR PostgreSQL did not answer within the timeout (quota.pg-timeout-ms)",
            ),
            (
                StoreError::Query("a\nb\r\nc".into()),
                "ERR PostgreSQL error: a b c",
            ),
            (
                StoreError::Invalid("ERR ADD would take X above 1".into()),
                "ERR ADD would take X above 1",
            ),
            (StoreError::BadConfig("x".into()), "ERR x"),
        ] {
            assert_eq!(err.to_string(), wire);
        }
    }

    #[test]
    fn unavailable_covers_outages_only() {
        assert!(StoreError::NotConfigured.is_unavailable());
        assert!(StoreError::Timeout.is_unavailable());
        assert!(StoreError::Unavailable(String::new()).is_unavailable());
        assert!(!StoreError::Query(String::new()).is_unavailable());
        assert!(!StoreError::Invalid(String::new()).is_unavailable());
        assert!(!StoreError::BadConfig(String::new()).is_unavailable());
    }

    #[test]
    fn sqlstates_map_to_kinds() {
        assert_eq!(
            classify_db("57014", "canceling statement"),
            StoreError::Timeout
        );
        assert_eq!(classify_db("55P03", "lock timeout"), StoreError::Timeout);
        assert_eq!(
            classify_db("57P01", "terminating connection"),
            StoreError::Unavailable("terminating connection".into())
        );
        assert!(classify_db("08006", "x").is_unavailable());
        assert!(classify_db("53300", "too many clients").is_unavailable());
        assert!(classify_db("28P01", "password authentication failed").is_unavailable());
        assert_eq!(
            classify_db("22003", "integer out of range"),
            StoreError::Query("integer out of range".into())
        );
        assert_eq!(
            classify_db("42P01", "no table"),
            StoreError::Query("no table".into())
        );
    }

    #[test]
    fn connection_kinds_are_recognised() {
        assert!(is_connection_kind("error connecting to server"));
        assert!(is_connection_kind("connection closed"));
        assert!(!is_connection_kind("error deserializing column 3"));
        assert!(!is_connection_kind("db error"));
    }

    #[test]
    fn new_validates_without_touching_the_network() {
        assert_eq!(Store::new(&cfg("")).err(), Some(StoreError::NotConfigured));
        assert_eq!(
            Store::new(&cfg("   ")).err(),
            Some(StoreError::NotConfigured)
        );
        let bad = Store::new(&cfg("postgres://u:hunter2@[::1")).err();
        assert!(matches!(bad, Some(StoreError::BadConfig(_))), "{bad:?}");
        assert!(!bad
            .map(|e| e.to_string())
            .unwrap_or_default()
            .contains("hunter2"));
        let mut c = cfg("host=203.0.113.1 user=u password=hunter2");
        c.schema = "Bad".into();
        assert!(matches!(
            Store::new(&c).err(),
            Some(StoreError::BadConfig(_))
        ));
        c.schema = "s".into();
        c.timeout_ms = 0;
        assert!(matches!(
            Store::new(&c).err(),
            Some(StoreError::BadConfig(_))
        ));
        c.timeout_ms = 10;
        c.pool_size = 0;
        assert!(matches!(
            Store::new(&c).err(),
            Some(StoreError::BadConfig(_))
        ));
        c.pool_size = 1;
        // An unroutable address: building must not connect (it would hang or fail).
        let store = Store::new(&c).expect("store builds offline");
        assert_eq!(store.pool_state(), (0, 0));
        assert_eq!(store.schema(), "s");
        assert_eq!(store.channel(), "s_quota_changed");
        let url_form = Store::new(&cfg("postgresql://u:pw@localhost:5432/db?sslmode=disable"));
        assert!(url_form.is_ok());
    }

    #[test]
    fn handles_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Store>();
        send_sync::<Listener>();
        send_sync::<StoreError>();
    }

    #[test]
    fn config_debug_hides_the_url() {
        let text = format!("{:?}", cfg("postgres://u:hunter2@h/db"));
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
    }
}
