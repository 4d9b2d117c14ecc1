//! The usage ledger from outside: a server on a schema of its own ([`TestEnv`]), the sums of
//! the hourly rows PostgreSQL holds ([`ledger_sums`]) and waiting for a flush
//! ([`wait_ledger_flushed`]).

use super::*;

/// One Redis with the module on the shared PostgreSQL and a schema of its own.
pub struct TestEnv {
    pub server: RedisServer,
    pub schema: String,
    /// The shared PostgreSQL's URL.
    pub pg: String,
}

impl TestEnv {
    /// [`test_server_with`] on a fresh schema, with more module arguments.
    pub fn start(extra: &[(&str, &str)]) -> TestEnv {
        let schema = unique_schema();
        let server = test_server_with(&schema, extra);
        // The NOTIFY listener drops the whole cache when it connects: let that happen before
        // the test, not in its middle (a slow machine connects it late).
        if !extra.iter().any(|(k, v)| *k == "notify" && *v == "no") {
            server.wait_notify_state("listening", Duration::from_secs(30));
        }
        TestEnv {
            server,
            schema,
            pg: PgServer::shared(),
        }
    }

    /// [`TestEnv::start`] and a connection to it.
    pub fn start_con(extra: &[(&str, &str)]) -> (TestEnv, redis::Connection) {
        let env = TestEnv::start(extra);
        let con = env.con();
        (env, con)
    }

    pub fn con(&self) -> redis::Connection {
        self.server.client()
    }

    /// One number from SQL, `{h}` = the hourly ledger, `{t}` = the credits table.
    pub fn sql_i64(&self, q: &str) -> i64 {
        sql_i64(&self.pg, &self.schema, q)
    }

    /// Sum of a ledger column over the user's accounts.
    pub fn ledger(&self, user: &str, column: &str) -> i64 {
        self.sql_i64(&format!(
            "SELECT coalesce(sum({column}), 0) FROM {{h}} WHERE user_id = '{user}'"
        ))
    }

    /// Waits (20 s at most) until nothing is left to flush.
    pub fn flushed(&self) {
        wait_ledger_flushed(&self.server, Duration::from_secs(20));
    }
}

/// One number from SQL on `url`, `{h}` = the hourly ledger and `{t}` = the credits table of
/// `schema`.
pub fn sql_i64(url: &str, schema: &str, q: &str) -> i64 {
    let q = q
        .replace("{h}", &format!("{schema}.quota_usage_hourly"))
        .replace("{t}", &format!("{schema}.user_quota_replenishment"));
    let out = psql(url, &q);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("{q}: {out:?}"))
}

/// `sql_i64`, or `None` while the query fails (e.g. before the module has deployed the
/// schema: a node that has not needed PostgreSQL yet deploys it in the background).
pub fn try_sql_i64(url: &str, schema: &str, q: &str) -> Option<i64> {
    let q = q
        .replace("{h}", &format!("{schema}.quota_usage_hourly"))
        .replace("{t}", &format!("{schema}.user_quota_replenishment"));
    try_psql(url, &q).ok()?.trim().parse().ok()
}

/// Waits until `INFO quota` shows `quota_ledger_accounts_pending:0` (every account's usage is
/// in PostgreSQL and acknowledged); fails the test after `timeout`.
pub fn wait_ledger_flushed(server: &RedisServer, timeout: Duration) {
    let ok = wait_until(timeout, || {
        info_i64(server, "quota_ledger_accounts_pending") == 0
    });
    assert!(
        ok,
        "the ledger did not flush within {timeout:?}: {} accounts pending, {} flushes, {} failed",
        info_i64(server, "quota_ledger_accounts_pending"),
        info_i64(server, "quota_ledger_flushes"),
        info_i64(server, "quota_ledger_flush_errors"),
    );
}

/// What the ledger holds (or should hold) for some accounts: requests admitted minus
/// released, tokens committed, and the balance debits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LedgerSums {
    pub requests: i64,
    pub tokens: i64,
    pub requests_debited: i64,
    pub tokens_debited: i64,
}

impl LedgerSums {
    pub fn add(&mut self, o: &LedgerSums) {
        self.requests += o.requests;
        self.tokens += o.tokens;
        self.requests_debited += o.requests_debited;
        self.tokens_debited += o.tokens_debited;
    }
}

/// The sums of `quota_usage_hourly` in `schema` per (user, bundle), over every hour.
pub fn ledger_sums(url: &str, schema: &str) -> HashMap<(String, String), LedgerSums> {
    let out = psql(
        url,
        &format!(
            "SELECT user_id, bundle_id, sum(requests), sum(tokens), sum(requests_debited), \
             sum(tokens_debited) FROM {schema}.quota_usage_hourly GROUP BY 1, 2"
        ),
    );
    out.lines()
        .filter(|l| !l.is_empty())
        .map(|line| {
            let f: Vec<&str> = line.split('|').collect();
            assert_eq!(f.len(), 6, "a ledger row: {line:?}");
            let n = |i: usize| -> i64 { f[i].parse().unwrap_or_else(|_| panic!("{line:?}")) };
            let sums = LedgerSums {
                requests: n(2),
                tokens: n(3),
                requests_debited: n(4),
                tokens_debited: n(5),
            };
            ((f[0].to_string(), f[1].to_string()), sums)
        })
        .collect()
}

/// [`ledger_sums`] added up per user.
pub fn ledger_sums_by_user(url: &str, schema: &str) -> HashMap<String, LedgerSums> {
    let mut out: HashMap<String, LedgerSums> = HashMap::new();
    for ((user, _), sums) in ledger_sums(url, schema) {
        out.entry(user).or_default().add(&sums);
    }
    out
}

/// The ledger counters of `INFO quota`: flushes, failed flushes, batches written, batches
/// skipped as already applied, accounts pending.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LedgerInfo {
    pub flushes: i64,
    pub flush_errors: i64,
    pub batches: i64,
    pub batches_skipped: i64,
    pub pending: i64,
    /// How long the oldest flush slice has waited for PostgreSQL (ms).
    pub waiting_ms: i64,
}

impl LedgerInfo {
    pub fn of(server: &RedisServer) -> LedgerInfo {
        let info = server.info("quota");
        let n = |f: &str| -> i64 {
            info.get(f)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no integer {f} in INFO quota: {info:?}"))
        };
        LedgerInfo {
            flushes: n("quota_ledger_flushes"),
            flush_errors: n("quota_ledger_flush_errors"),
            batches: n("quota_ledger_batches"),
            batches_skipped: n("quota_ledger_batches_skipped"),
            pending: n("quota_ledger_accounts_pending"),
            waiting_ms: n("quota_ledger_flush_waiting_ms"),
        }
    }
}
