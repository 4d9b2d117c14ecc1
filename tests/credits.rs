//! Integration tests of the credits commands (`QUOTA.GRANT`, `GET`, `REVOKE`, `LIST`,
//! `CLEANUP`, `INVALIDATE`) through the `redis` crate against a real `redis-server` with the
//! module, on the shared PostgreSQL, one schema per test.
//!
//! What a user of the commands would notice: the records they get back (fields, types, values),
//! what is stored in PostgreSQL, which credit applies, the cache staying coherent with writes
//! made here and by SQL, errors for bad input that change nothing, and no leaked secrets.
mod common;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::*;
use redis::ConnectionLike;

/// Every field of a record, in no particular order (GRANT adds `duplicate`).
/// The record fields that hold a limit's amount.
const LIMIT_FIELDS: [&str; 7] = [
    "requests_per_day",
    "requests_per_month",
    "total_requests",
    "tokens_per_hour",
    "tokens_per_day",
    "tokens_per_month",
    "max_concurrent",
];

const RECORD_FIELDS: [&str; 25] = [
    "tenant",
    "project",
    "user_id",
    "bundle_id",
    "requests_per_day",
    "requests_per_month",
    "total_requests",
    "tokens_per_hour",
    "tokens_per_day",
    "tokens_per_month",
    "max_concurrent",
    "requests_per_second",
    "requests_per_minute",
    "tokens_per_minute",
    "expires_at",
    "purchase_id",
    "purchase_amount_usd",
    "purchase_notes",
    "active",
    "created_at",
    "updated_at",
    "requests_balance",
    "tokens_balance",
    "requests_balance_debited",
    "tokens_balance_debited",
];

/// What `QUOTA.GET` adds to a record: what each balance has left.
const GET_EXTRA: [&str; 2] = ["requests_balance_left", "tokens_balance_left"];

/// Every field `INFO quota` must carry.
const INFO_FIELDS: [&str; 28] = [
    "quota_cache_entries",
    "quota_cache_hits",
    "quota_cache_misses",
    "quota_cache_stale_hits",
    "quota_cache_evictions",
    "quota_loads_in_flight",
    "quota_pg_queries",
    "quota_pg_errors",
    "quota_pg_latency_avg_us",
    "quota_pg_latency_max_us",
    "quota_pg_timeouts",
    "quota_queue_depth",
    "quota_queue_max",
    "quota_queue_busy_rejections",
    "quota_pool_size",
    "quota_pool_connections",
    "quota_pool_idle",
    "quota_notify_state",
    "quota_notify_received",
    "quota_notify_reconnects",
    "quota_admits_allowed",
    "quota_admits_denied",
    "quota_admits_pending",
    "quota_admits_unavailable",
    "quota_grants",
    "quota_grants_duplicate",
    "quota_revokes",
    "quota_cleanups",
];

const T: &str = "acme";
const P: &str = "chat";

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

/// One Redis with the module on the shared PostgreSQL and a schema of its own.
struct Env {
    server: RedisServer,
    schema: String,
    pg: String,
}

impl Env {
    fn start() -> Env {
        Env::start_with(&[])
    }

    /// Starts Redis with extra module arguments. Unless `notify no` is given, waits for the
    /// NOTIFY listener: its first connect drops the whole cache, which would otherwise race
    /// with the cache behaviour a test looks at.
    fn start_with(extra: &[(&str, &str)]) -> Env {
        let schema = unique_schema();
        let server = test_server_with(&schema, extra);
        let env = Env {
            server,
            schema,
            pg: PgServer::shared(),
        };
        if !extra.iter().any(|(k, v)| *k == "notify" && *v == "no") {
            env.wait_notify("listening");
        }
        env
    }

    /// [`Env::start`] and a connection to it.
    fn start_con() -> (Env, redis::Connection) {
        let env = Env::start();
        let con = env.con();
        (env, con)
    }

    fn con(&self) -> redis::Connection {
        self.server.client()
    }

    /// SQL with `{t}` = the credits table and `{e}` = the event table of this schema.
    fn sql(&self, q: &str) -> String {
        psql(&self.pg, &self.expand(q))
    }

    fn expand(&self, q: &str) -> String {
        q.replace("{t}", &format!("{}.user_quota_replenishment", self.schema))
            .replace(
                "{e}",
                &format!("{}.user_quota_replenishment_event", self.schema),
            )
    }

    /// A digest of everything stored for this schema: rows (all columns) and events.
    fn snapshot(&self) -> String {
        self.sql(
            "SELECT (SELECT count(*) FROM {t}) || ':' || \
             coalesce((SELECT md5(string_agg(r::text, '|' ORDER BY r::text)) FROM {t} r), '-') \
             || ':' || (SELECT count(*) FROM {e})",
        )
    }

    fn info_i64(&self, field: &str) -> i64 {
        info_i64(&self.server, field)
    }

    /// Waits until no load or refresh is in flight.
    fn settle(&self) {
        assert!(
            wait_until(Duration::from_secs(5), || self
                .info_i64("quota_loads_in_flight")
                == 0),
            "a load stayed in flight for 5 s"
        );
    }

    /// Waits (up to 5 s) for a NOTIFY received after the count `before`.
    fn wait_notified_after(&self, before: i64) {
        let received = || self.info_i64("quota_notify_received") > before;
        assert!(
            wait_until(Duration::from_secs(5), received),
            "no NOTIFY received within 5 s"
        );
    }

    fn wait_notify(&self, state: &str) {
        self.server
            .wait_notify_state(state, Duration::from_secs(15));
    }
}

/// A command from byte-string arguments (for NUL and invalid UTF-8).
fn bcmd(args: &[&[u8]]) -> redis::Cmd {
    let mut c = redis::cmd(std::str::from_utf8(args[0]).expect("command name"));
    for a in &args[1..] {
        c.arg(*a);
    }
    c
}

/// The raw reply, errors nested in arrays (EXEC) kept as `Value::ServerError`.
fn raw_reply(con: &mut redis::Connection, args: &[&str]) -> Value {
    con.req_command(&cmd(args))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"))
}

fn int_reply(con: &mut redis::Connection, args: &[&str]) -> i64 {
    match query(con, args).unwrap_or_else(|e| panic!("{args:?}: {e}")) {
        Value::Int(i) => i,
        other => panic!("{args:?} replied {other:?}, not an integer"),
    }
}

fn ping(con: &mut redis::Connection) {
    let pong: String = redis::cmd("PING").query(con).expect("PING");
    assert_eq!(pong, "PONG");
}

/// A record field that must be an integer reply (not a string holding one).
fn int_field(m: &HashMap<String, Value>, field: &str) -> i64 {
    match m.get(field) {
        Some(Value::Int(i)) => *i,
        other => panic!("field {field} should be an integer reply, got {other:?} in {m:?}"),
    }
}

/// A record field that must be a string reply.
fn str_field(m: &HashMap<String, Value>, field: &str) -> String {
    match m.get(field) {
        Some(Value::BulkString(b)) => String::from_utf8(b.clone()).expect("UTF-8 field"),
        Some(Value::SimpleString(s)) => s.clone(),
        Some(Value::VerbatimString { text, .. }) => text.clone(),
        other => panic!("field {field} should be a string reply, got {other:?} in {m:?}"),
    }
}

fn assert_nil(m: &HashMap<String, Value>, fields: &[&str]) {
    for f in fields {
        assert!(field_is_nil(m, f), "field {f} should be nil in {m:?}");
    }
}

/// The record carries exactly the table's columns (plus `extra`).
fn assert_record_fields(m: &HashMap<String, Value>, extra: &[&str]) {
    let got: BTreeSet<&str> = m.keys().map(String::as_str).collect();
    let mut want: BTreeSet<&str> = RECORD_FIELDS.iter().copied().collect();
    want.extend(extra.iter().copied());
    assert_eq!(got, want, "record fields differ: {m:?}");
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Polls `QUOTA.GET` until `pred` holds (bounded); returns the last reply.
fn poll_get(
    con: &mut redis::Connection,
    ids: [&str; 4],
    timeout: Duration,
    mut pred: impl FnMut(&Option<HashMap<String, Value>>) -> bool,
) -> (bool, Option<HashMap<String, Value>>) {
    let deadline = Instant::now() + timeout;
    loop {
        let r = con.get(ids);
        if pred(&r) {
            return (true, r);
        }
        if Instant::now() >= deadline {
            return (false, r);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bundle_of(r: &Option<HashMap<String, Value>>) -> Option<String> {
    r.as_ref().and_then(|m| field_str(m, "bundle_id"))
}

/// Polls `QUOTA.GET` on `ids` (up to 5 s) until the '*' row answers for it: whether it did,
/// and the last reply.
fn poll_falls_back_to_global(
    con: &mut redis::Connection,
    ids: [&str; 4],
) -> (bool, Option<HashMap<String, Value>>) {
    poll_get(con, ids, Duration::from_secs(5), |r| {
        bundle_of(r).as_deref() == Some("*")
    })
}

/// `CONFIG SET name value`, and `CONFIG GET name` must read `value` back.
fn set_and_read_back(con: &mut redis::Connection, name: &str, value: &str) {
    query(con, &["CONFIG", "SET", name, value]).expect("CONFIG SET");
    let cfg = to_map(query(con, &["CONFIG", "GET", name]).expect("CONFIG GET"));
    assert_eq!(
        cfg.get(name).and_then(value_to_string).as_deref(),
        Some(value)
    );
}

// ---------------------------------------------------------------------------
// QUOTA.GRANT
// ---------------------------------------------------------------------------

#[test]
fn grant_replies_the_stored_record_with_typed_fields_and_replace_clears_absent_ones() {
    let (env, mut con) = Env::start_con();
    let ids = [T, P, "alice", "*"];
    let before = now_s();
    let expires = before + 3600;
    let exp = expires.to_string();
    let opts = Opts::words(format!(
        "REQUESTS_PER_DAY 10 requests_per_month 200 TOTAL_REQUESTS 2147483647 \
         TOKENS_PER_HOUR 5000 Tokens_Per_Day 9223372036854775807 TOKENS_PER_MONTH 0 \
         MAX_CONCURRENT 3 EXPIRES_AT {exp} PURCHASE pay-1 AMOUNT 10"
    ));
    let r = con.grant(ids, opts.and(["NOTES", "trial bonus"]));
    let after = now_s();
    assert_record_fields(&r, &["duplicate"]);
    assert_eq!(str_field(&r, "tenant"), T);
    assert_eq!(str_field(&r, "project"), P);
    assert_eq!(str_field(&r, "user_id"), "alice");
    assert_eq!(str_field(&r, "bundle_id"), "*");
    assert_eq!(int_field(&r, "requests_per_day"), 10);
    assert_eq!(int_field(&r, "requests_per_month"), 200);
    assert_eq!(int_field(&r, "total_requests"), 2147483647);
    assert_eq!(int_field(&r, "tokens_per_hour"), 5000);
    assert_eq!(int_field(&r, "tokens_per_day"), i64::MAX);
    assert_eq!(int_field(&r, "tokens_per_month"), 0);
    assert_eq!(int_field(&r, "max_concurrent"), 3);
    assert_eq!(int_field(&r, "expires_at"), expires);
    assert_eq!(str_field(&r, "purchase_id"), "pay-1");
    assert_eq!(str_field(&r, "purchase_amount_usd"), "10.00");
    assert_eq!(str_field(&r, "purchase_notes"), "trial bonus");
    assert_eq!(int_field(&r, "active"), 1);
    assert_eq!(int_field(&r, "duplicate"), 0);
    let created = int_field(&r, "created_at");
    let updated = int_field(&r, "updated_at");
    // The database clock and ours agree within a few seconds on one machine.
    assert!(
        (before - 5..=after + 5).contains(&created),
        "created_at {created} not near now ({before}..{after})"
    );
    assert!(
        updated >= created,
        "updated_at {updated} < created_at {created}"
    );

    // PostgreSQL holds exactly that.
    let row = env.sql(
        "SELECT additional_requests_per_day, additional_requests_per_month, \
         additional_total_requests, additional_tokens_per_hour, additional_tokens_per_day, \
         additional_tokens_per_month, additional_max_concurrent, \
         extract(epoch FROM expires_at)::bigint, purchase_id, purchase_amount_usd::text, \
         purchase_notes, active, floor(extract(epoch FROM created_at))::bigint \
         FROM {t} WHERE tenant = 'acme' AND project = 'chat' AND user_id = 'alice' \
         AND bundle_id = '*'",
    );
    assert_eq!(
        row,
        format!(
            "10|200|2147483647|5000|9223372036854775807|0|3|{expires}|pay-1|10.00|trial bonus|t|{created}"
        )
    );

    // GET answers the same record (without `duplicate`).
    let g = con
        .get([T, P, "alice", "any-bundle"])
        .expect("GET finds the '*' row");
    assert_record_fields(&g, &GET_EXTRA);
    for f in RECORD_FIELDS {
        assert_eq!(g.get(f), r.get(f), "GET and GRANT differ on {f}");
    }

    // A replace with one amount: every absent amount, the expiry and the purchase fields
    // become nil; the row keeps its creation time.
    let r2 = con.grant(ids, "TOKENS_PER_DAY 7");
    assert_record_fields(&r2, &["duplicate"]);
    assert_eq!(int_field(&r2, "tokens_per_day"), 7);
    let cleared: Vec<&str> = RECORD_FIELDS
        .into_iter()
        .filter(|f| LIMIT_FIELDS.contains(f) || f.starts_with("purchase_"))
        .chain(["expires_at"])
        .filter(|f| *f != "tokens_per_day")
        .collect();
    assert_eq!(cleared.len(), 10, "{cleared:?}");
    assert_nil(&r2, &cleared);
    assert_eq!(int_field(&r2, "active"), 1);
    assert_eq!(int_field(&r2, "duplicate"), 0);
    assert_eq!(int_field(&r2, "created_at"), created);
    assert_eq!(
        env.sql(
            "SELECT coalesce(additional_requests_per_day::text, 'NULL'), \
             coalesce(expires_at::text, 'NULL'), coalesce(purchase_id, 'NULL'), \
             coalesce(purchase_amount_usd::text, 'NULL'), coalesce(purchase_notes, 'NULL'), \
             additional_tokens_per_day FROM {t} WHERE user_id = 'alice'"
        ),
        "NULL|NULL|NULL|NULL|NULL|7"
    );

    // Money is exact: one decimal is padded, the largest amount survives unchanged.
    let r3 = con.grant(ids, "AMOUNT 0.5");
    assert_eq!(str_field(&r3, "purchase_amount_usd"), "0.50");
    let r4 = con.grant(ids, "AMOUNT 99999999.99");
    assert_eq!(str_field(&r4, "purchase_amount_usd"), "99999999.99");
    assert_eq!(
        env.sql("SELECT purchase_amount_usd::text FROM {t} WHERE user_id = 'alice'"),
        "99999999.99"
    );
    // A grant without any option is a row with every amount nil.
    let r5 = con.grant(ids, "");
    assert_nil(&r5, &["tokens_per_day", "purchase_amount_usd"]);
    assert_eq!(int_field(&r5, "active"), 1);
}

#[test]
fn grant_reactivates_a_revoked_row() {
    let (env, mut con) = Env::start_con();
    let ids = [T, P, "bob", "gpt"];
    let first = con.grant(ids, "REQUESTS_PER_DAY 5");
    assert_eq!(con.revoke(ids), 1);
    assert!(con.get(ids).is_none(), "a revoked row must not apply");
    let all = con.list([T, P, "bob"], true);
    let revoked = to_map(
        all.get("gpt")
            .expect("LIST ALL shows the revoked row")
            .clone(),
    );
    assert_eq!(int_field(&revoked, "active"), 0);

    let again = con.grant(ids, "REQUESTS_PER_DAY 6");
    assert_eq!(int_field(&again, "active"), 1);
    assert_eq!(int_field(&again, "requests_per_day"), 6);
    assert_eq!(
        int_field(&again, "created_at"),
        int_field(&first, "created_at"),
        "reactivation updates the same row"
    );
    let g = con.get(ids).expect("the reactivated row applies");
    assert_eq!(int_field(&g, "requests_per_day"), 6);
    assert_eq!(
        env.sql("SELECT count(*), bool_and(active) FROM {t} WHERE user_id = 'bob'"),
        "1|t"
    );
}

#[test]
fn expires_in_and_expires_at_set_the_expiry() {
    let (env, mut con) = Env::start_con();
    let ids = [T, P, "carol", "*"];

    let before = now_s();
    let r = con.grant(ids, "REQUESTS_PER_DAY 1 EXPIRES_IN 3600");
    let after = now_s();
    let at = int_field(&r, "expires_at");
    assert!(
        (before + 3600..=after + 3600).contains(&at),
        "EXPIRES_IN 3600 gave expires_at {at}, expected {}..{}",
        before + 3600,
        after + 3600
    );
    assert_eq!(
        env.sql("SELECT extract(epoch FROM expires_at)::bigint FROM {t} WHERE user_id = 'carol'"),
        at.to_string()
    );

    let fixed = now_s() + 86_400 * 30;
    let r = con.grant(ids, ["EXPIRES_AT", &fixed.to_string()]);
    assert_eq!(int_field(&r, "expires_at"), fixed);
    // The latest accepted instant.
    let r = con.grant(ids, "EXPIRES_AT 253402300799");
    assert_eq!(int_field(&r, "expires_at"), 253402300799);
    // A replace without expiry: never expires.
    let r = con.grant(ids, "REQUESTS_PER_DAY 1");
    assert_nil(&r, &["expires_at"]);
    assert_eq!(
        env.sql("SELECT expires_at IS NULL FROM {t} WHERE user_id = 'carol'"),
        "t"
    );
}

#[test]
fn add_tops_up_live_rows_and_starts_from_zero_on_missing_expired_or_revoked_ones() {
    let (env, mut con) = Env::start_con();

    // Missing row: a top-up from zero, never expiring.
    let missing = [T, P, "dave", "missing"];
    let r = con.grant(missing, "ADD REQUESTS_PER_DAY 5");
    assert_eq!(int_field(&r, "requests_per_day"), 5);
    assert_nil(&r, &["expires_at", "tokens_per_day"]);
    assert_eq!(int_field(&r, "active"), 1);

    // Live row: given amounts add up, absent ones and the expiry are kept, money adds up.
    let live = [T, P, "dave", "live"];
    let base = con.grant(
        live,
        "REQUESTS_PER_DAY 10 TOKENS_PER_DAY 100 EXPIRES_IN 3600 AMOUNT 1.50 PURCHASE p-live-1",
    );
    let expiry = int_field(&base, "expires_at");
    let r = con.grant(live, "add REQUESTS_PER_DAY 5 AMOUNT 2.25");
    assert_eq!(int_field(&r, "requests_per_day"), 15);
    assert_eq!(int_field(&r, "tokens_per_day"), 100);
    assert_eq!(int_field(&r, "expires_at"), expiry);
    assert_eq!(str_field(&r, "purchase_amount_usd"), "3.75");
    assert_eq!(int_field(&r, "duplicate"), 0);
    // An expiry given with ADD replaces the old one.
    let before = now_s();
    let r = con.grant(live, "ADD TOKENS_PER_DAY 1 EXPIRES_IN 7200");
    assert!(int_field(&r, "expires_at") >= before + 7200);
    assert_eq!(int_field(&r, "tokens_per_day"), 101);
    assert_eq!(int_field(&r, "requests_per_day"), 15);
    let g = con.get(live).expect("live row");
    assert_eq!(int_field(&g, "tokens_per_day"), 101);
    assert_eq!(
        env.sql(
            "SELECT additional_requests_per_day, additional_tokens_per_day, \
             purchase_amount_usd::text FROM {t} WHERE bundle_id = 'live'"
        ),
        "15|101|3.75"
    );
    // A top-up that would overflow the money column is refused and changes nothing.
    con.grant(live, "AMOUNT 99999999.99 REQUESTS_PER_DAY 1");
    let snap = env.snapshot();
    let e = query_err(
        &mut con,
        &["QUOTA.GRANT", T, P, "dave", "live", "ADD", "AMOUNT", "0.01"],
    );
    assert!(e.contains("AMOUNT"), "overflowing AMOUNT top-up: {e}");
    assert_eq!(env.snapshot(), snap, "a refused top-up changed PostgreSQL");
    // Likewise an INT column.
    con.grant(live, "REQUESTS_PER_DAY 2147483647");
    let snap = env.snapshot();
    let e = query_err(
        &mut con,
        &with_account("QUOTA.GRANT", live, &["ADD", "REQUESTS_PER_DAY", "1"]),
    );
    assert!(e.contains("REQUESTS_PER_DAY"), "overflowing top-up: {e}");
    assert_eq!(env.snapshot(), snap, "a refused top-up changed PostgreSQL");

    // Revoked row: a top-up starts from zero and reactivates it.
    let revoked = [T, P, "dave", "revoked"];
    con.grant(revoked, "REQUESTS_PER_DAY 10 TOKENS_PER_DAY 50");
    assert_eq!(con.revoke(revoked), 1);
    let r = con.grant(revoked, "ADD REQUESTS_PER_DAY 5");
    assert_eq!(int_field(&r, "requests_per_day"), 5);
    assert_nil(&r, &["tokens_per_day"]);
    assert_eq!(int_field(&r, "active"), 1);

    // Expired row: a top-up starts from zero and, without an expiry, never expires.
    let expired = [T, P, "dave", "expired"];
    con.grant(
        expired,
        "REQUESTS_PER_DAY 10 TOKENS_PER_DAY 50 EXPIRES_IN 1",
    );
    let (ok, last) = poll_get(&mut con, expired, Duration::from_secs(5), |r| r.is_none());
    assert!(ok, "the row did not expire within 5 s: {last:?}");
    let r = con.grant(expired, "ADD REQUESTS_PER_DAY 5");
    assert_eq!(int_field(&r, "requests_per_day"), 5);
    assert_nil(&r, &["tokens_per_day", "expires_at"]);
    assert_eq!(int_field(&r, "active"), 1);
    let g = con.get(expired).expect("the topped-up row applies again");
    assert_eq!(int_field(&g, "requests_per_day"), 5);

    // The event log tells grants from top-ups.
    assert_eq!(
        env.sql("SELECT count(*) FROM {e} WHERE event_type = 'topup'"),
        "5",
        "one topup event per successful ADD"
    );
}

#[test]
fn a_purchase_id_is_applied_once_per_tenant_and_project() {
    let (env, mut con) = Env::start_con();
    let dup_before = env.info_i64("quota_grants_duplicate");

    let star = [T, P, "erin", "*"];
    let r = con.grant(star, "ADD REQUESTS_PER_DAY 5 PURCHASE pay-42");
    assert_eq!(int_field(&r, "duplicate"), 0);
    assert_eq!(int_field(&r, "requests_per_day"), 5);

    // The same purchase again: nothing changes, the current record comes back.
    let r = con.grant(star, "ADD REQUESTS_PER_DAY 5 PURCHASE pay-42");
    assert_eq!(int_field(&r, "duplicate"), 1);
    assert_eq!(int_field(&r, "requests_per_day"), 5, "applied twice");
    assert_eq!(str_field(&r, "purchase_id"), "pay-42");
    let g = con.get(star).expect("row");
    assert_eq!(int_field(&g, "requests_per_day"), 5);
    // A replace carrying the same purchase id is a duplicate too.
    let r = con.grant(star, "REQUESTS_PER_DAY 1 PURCHASE pay-42");
    assert_eq!(int_field(&r, "duplicate"), 1);
    assert_eq!(int_field(&r, "requests_per_day"), 5);

    // Same tenant and project, another bundle of the same user: still a duplicate.
    let r = con.grant(
        [T, P, "erin", "gpt"],
        "ADD REQUESTS_PER_DAY 7 PURCHASE pay-42",
    );
    assert_eq!(int_field(&r, "duplicate"), 1);
    let g = con.get([T, P, "erin", "gpt"]).expect("the '*' row applies");
    assert_eq!(field_str(&g, "bundle_id").as_deref(), Some("*"));
    assert_eq!(int_field(&g, "requests_per_day"), 5);

    // Same tenant and project, another user: a duplicate, nothing stored for that user.
    let r = con.grant([T, P, "frank", "*"], "REQUESTS_PER_DAY 7 PURCHASE pay-42");
    assert_eq!(int_field(&r, "duplicate"), 1);
    assert!(con.get([T, P, "frank", "*"]).is_none());
    assert_eq!(
        env.sql("SELECT count(*) FROM {t} WHERE user_id = 'frank' OR bundle_id = 'gpt'"),
        "0"
    );

    // Another project (or tenant): a new purchase.
    let r = con.grant(
        [T, "other-project", "erin", "*"],
        "ADD REQUESTS_PER_DAY 9 PURCHASE pay-42",
    );
    assert_eq!(int_field(&r, "duplicate"), 0);
    assert_eq!(int_field(&r, "requests_per_day"), 9);
    let r = con.grant(
        ["other-tenant", P, "erin", "*"],
        "ADD REQUESTS_PER_DAY 3 PURCHASE pay-42",
    );
    assert_eq!(int_field(&r, "duplicate"), 0);
    assert_eq!(int_field(&r, "requests_per_day"), 3);

    assert_eq!(
        env.sql("SELECT additional_requests_per_day FROM {t} WHERE tenant = 'acme' AND project = 'chat'"),
        "5"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM {e} WHERE purchase_id = 'pay-42'"),
        "3",
        "one event per (tenant, project)"
    );
    assert_eq!(env.info_i64("quota_grants_duplicate") - dup_before, 4);
}

// ---------------------------------------------------------------------------
// QUOTA.GET
// ---------------------------------------------------------------------------

#[test]
fn get_prefers_the_bundle_row_then_the_star_row_then_nil() {
    let (_env, mut con) = Env::start_con();
    assert!(
        con.get([T, P, "gina", "gpt"]).is_none(),
        "nothing granted yet"
    );

    con.grant([T, P, "gina", "*"], "REQUESTS_PER_DAY 1");
    con.grant([T, P, "gina", "gpt"], "REQUESTS_PER_DAY 2");
    let g = con.get([T, P, "gina", "gpt"]).expect("bundle row");
    assert_eq!(str_field(&g, "bundle_id"), "gpt");
    assert_eq!(int_field(&g, "requests_per_day"), 2);
    let g = con.get([T, P, "gina", "claude"]).expect("'*' row");
    assert_eq!(str_field(&g, "bundle_id"), "*");
    assert_eq!(int_field(&g, "requests_per_day"), 1);
    assert_eq!(str_field(&g, "user_id"), "gina");

    // Revoked bundle row: the '*' row applies.
    assert_eq!(con.revoke([T, P, "gina", "gpt"]), 1);
    let g = con
        .get([T, P, "gina", "gpt"])
        .expect("'*' row after revoke");
    assert_eq!(str_field(&g, "bundle_id"), "*");
    // Nothing applies once both are revoked; another user or project sees nothing either.
    assert_eq!(con.revoke([T, P, "gina", "*"]), 1);
    assert!(con.get([T, P, "gina", "gpt"]).is_none());
    con.grant([T, P, "gina", "*"], "REQUESTS_PER_DAY 1");
    assert!(con.get([T, "other", "gina", "gpt"]).is_none());
    assert!(con.get([T, P, "gina2", "gpt"]).is_none());
}

#[test]
fn an_expired_bundle_row_falls_back_to_the_star_row() {
    let (env, mut con) = Env::start_con();
    con.grant([T, P, "hank", "*"], "REQUESTS_PER_DAY 1");
    let r = con.grant([T, P, "hank", "gpt"], "REQUESTS_PER_DAY 2 EXPIRES_IN 1");
    let expires = int_field(&r, "expires_at");
    let g = con.get([T, P, "hank", "gpt"]).expect("bundle row");
    assert_eq!(str_field(&g, "bundle_id"), "gpt");

    let (ok, last) = poll_falls_back_to_global(&mut con, [T, P, "hank", "gpt"]);
    assert!(ok, "GET did not fall back to '*' within 5 s: {last:?}");
    assert!(
        now_s() >= expires,
        "fell back before the row expired ({} < {expires})",
        now_s()
    );
    // Expiry is checked at read time: the row is still active in PostgreSQL.
    assert_eq!(
        env.sql("SELECT active FROM {t} WHERE bundle_id = 'gpt'"),
        "t"
    );
    // LIST shows live rows only; LIST ALL the expired one too.
    let live = con.list([T, P, "hank"], false);
    assert_eq!(
        live.keys().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from(["*".to_string()])
    );
    let all = con.list([T, P, "hank"], true);
    assert!(
        all.contains_key("gpt"),
        "LIST ALL lacks the expired row: {all:?}"
    );
}

// ---------------------------------------------------------------------------
// QUOTA.REVOKE, QUOTA.LIST, QUOTA.CLEANUP, QUOTA.INVALIDATE
// ---------------------------------------------------------------------------

#[test]
fn revoke_answers_1_then_0_and_soft_deletes() {
    let (env, mut con) = Env::start_con();
    let ids = [T, P, "ivy", "gpt"];
    assert_eq!(con.revoke(ids), 0, "nothing to revoke");
    con.grant(ids, "REQUESTS_PER_DAY 3");
    let revokes = env.info_i64("quota_revokes");
    assert_eq!(con.revoke(ids), 1);
    assert_eq!(con.revoke(ids), 0, "already revoked");
    assert!(con.get(ids).is_none());
    assert_eq!(env.info_i64("quota_revokes") - revokes, 1);
    assert_eq!(
        env.sql("SELECT count(*), bool_or(active) FROM {t} WHERE user_id = 'ivy'"),
        "1|f",
        "REVOKE is a soft delete"
    );
    assert_eq!(
        env.sql("SELECT count(*) FROM {e} WHERE event_type = 'revoke'"),
        "1"
    );
}

#[test]
fn list_maps_bundles_to_records_and_all_adds_revoked_and_expired_rows() {
    let (_env, mut con) = Env::start_con();
    let user = [T, P, "jack"];
    assert!(con.list(user, false).is_empty());
    assert!(con.list(user, true).is_empty());

    con.grant(
        [T, P, "jack", "expiring"],
        "REQUESTS_PER_DAY 4 EXPIRES_IN 1",
    );
    con.grant([T, P, "jack", "*"], "REQUESTS_PER_DAY 1");
    con.grant([T, P, "jack", "gpt"], "TOKENS_PER_DAY 2 AMOUNT 3");
    con.grant([T, P, "jack", "revoked"], "REQUESTS_PER_DAY 3");
    assert_eq!(con.revoke([T, P, "jack", "revoked"]), 1);
    // Another user's rows never show.
    con.grant([T, P, "jack2", "gpt"], "REQUESTS_PER_DAY 9");

    let (ok, last) = poll_falls_back_to_global(&mut con, [T, P, "jack", "expiring"]);
    assert!(ok, "the expiring row did not expire: {last:?}");

    let live = con.list(user, false);
    let keys: BTreeSet<String> = live.keys().cloned().collect();
    assert_eq!(keys, BTreeSet::from(["*".to_string(), "gpt".to_string()]));
    for (bundle, v) in live {
        let rec = to_map(v);
        assert_record_fields(&rec, &[]);
        assert_eq!(str_field(&rec, "bundle_id"), bundle);
        assert_eq!(str_field(&rec, "user_id"), "jack");
        if bundle == "gpt" {
            assert_eq!(int_field(&rec, "tokens_per_day"), 2);
            assert_eq!(str_field(&rec, "purchase_amount_usd"), "3.00");
            assert_nil(&rec, &["requests_per_day", "expires_at"]);
        }
    }

    let all = con.list(user, true);
    let keys: BTreeSet<String> = all.keys().cloned().collect();
    assert_eq!(
        keys,
        ["*", "gpt", "revoked", "expiring"]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    let revoked = to_map(all["revoked"].clone());
    assert_eq!(int_field(&revoked, "active"), 0);
    let expiring = to_map(all["expiring"].clone());
    assert!(int_field(&expiring, "expires_at") <= now_s());
    // `all` is case-insensitive.
    let lower = query_map(&mut con, &["QUOTA.LIST", T, P, "jack", "all"]);
    assert_eq!(lower.len(), 4);
}

#[test]
fn cleanup_deactivates_expired_rows_and_every_change_is_an_event() {
    let (env, mut con) = Env::start_con();
    let cleanups = env.info_i64("quota_cleanups");
    // Nothing expired yet.
    con.grant([T, P, "kim", "e1"], "REQUESTS_PER_DAY 1 EXPIRES_IN 1");
    con.grant([T, P, "lee", "e2"], "REQUESTS_PER_DAY 1 EXPIRES_IN 1");
    con.grant([T, P, "kim", "keep"], "REQUESTS_PER_DAY 1 EXPIRES_IN 3600");
    con.grant([T, P, "kim", "keep"], "ADD REQUESTS_PER_DAY 1");
    con.grant([T, P, "kim", "gone"], "REQUESTS_PER_DAY 1");
    assert_eq!(con.revoke([T, P, "kim", "gone"]), 1);

    // Wait until both short rows are past their expiry (as the module sees it).
    for ids in [[T, P, "kim", "e1"], [T, P, "lee", "e2"]] {
        let (ok, last) = poll_get(&mut con, ids, Duration::from_secs(5), |r| r.is_none());
        assert!(ok, "{ids:?} did not expire: {last:?}");
    }
    let ok = wait_until(Duration::from_secs(5), || {
        env.sql("SELECT count(*) FROM {t} WHERE expires_at <= now()") == "2"
    });
    assert!(ok, "PostgreSQL does not see the two rows as expired");

    assert_eq!(int_reply(&mut con, &["QUOTA.CLEANUP"]), 2);
    assert_eq!(
        int_reply(&mut con, &["QUOTA.CLEANUP"]),
        0,
        "second run finds nothing"
    );
    assert_eq!(env.info_i64("quota_cleanups") - cleanups, 2);
    assert_eq!(
        env.sql("SELECT string_agg(bundle_id || '=' || active, ',' ORDER BY bundle_id) FROM {t}"),
        "e1=false,e2=false,gone=false,keep=true"
    );
    assert_eq!(
        env.sql(
            "SELECT string_agg(event_type || ':' || n, ',' ORDER BY event_type) FROM \
             (SELECT event_type, count(*) AS n FROM {e} GROUP BY event_type) x"
        ),
        "expire:2,grant:4,revoke:1,topup:1"
    );
    assert_eq!(
        env.sql(
            "SELECT string_agg(user_id || '/' || bundle_id, ',' ORDER BY bundle_id) \
             FROM {e} WHERE event_type = 'expire'"
        ),
        "kim/e1,lee/e2"
    );
    // The rows stay readable through LIST ALL, inactive.
    let all = con.list([T, P, "kim"], true);
    assert_eq!(int_field(&to_map(all["e1"].clone()), "active"), 0);
}

#[test]
fn invalidate_drops_the_entry_so_the_next_get_reads_postgres() {
    // Without NOTIFY, a change made by SQL is only seen once the entry is dropped.
    let env = Env::start_with(&[("notify", "no"), ("cache-ttl-ms", "600000")]);
    let mut con = env.con();
    let ids = [T, P, "mia", "*"];
    assert_eq!(
        int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "mia"]),
        0,
        "nothing cached yet"
    );
    con.grant(ids, "REQUESTS_PER_DAY 1");
    assert_eq!(
        int_field(&con.get(ids).expect("row"), "requests_per_day"),
        1
    );
    env.sql("UPDATE {t} SET additional_requests_per_day = 55 WHERE user_id = 'mia'");
    assert_eq!(
        int_field(&con.get(ids).expect("row"), "requests_per_day"),
        1,
        "served from the cache (no NOTIFY, long TTL)"
    );
    let misses = env.info_i64("quota_cache_misses");
    assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "mia"]), 1);
    assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "mia"]), 0);
    let g = con.get(ids).expect("row");
    assert_eq!(int_field(&g, "requests_per_day"), 55);
    assert_eq!(
        env.info_i64("quota_cache_misses") - misses,
        1,
        "the GET after INVALIDATE is a miss"
    );
    // Other users' entries are untouched.
    con.grant([T, P, "ned", "*"], "REQUESTS_PER_DAY 1");
    con.get([T, P, "ned", "*"]);
    assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "mia"]), 1);
    let misses = env.info_i64("quota_cache_misses");
    con.get([T, P, "ned", "*"]);
    assert_eq!(env.info_i64("quota_cache_misses"), misses);
}

// ---------------------------------------------------------------------------
// Cache coherence
// ---------------------------------------------------------------------------

#[test]
fn grant_and_revoke_write_through_the_cache() {
    let (env, mut con) = Env::start_con();
    let ids = [T, P, "nora", "gpt"];
    assert!(
        con.get(ids).is_none(),
        "nothing yet (now cached as 'no credits')"
    );
    for (amount, expected) in [("5", 5), ("6", 6)] {
        con.grant(ids, ["REQUESTS_PER_DAY", amount]);
        let misses = env.info_i64("quota_cache_misses");
        let hits = env.info_i64("quota_cache_hits") + env.info_i64("quota_cache_stale_hits");
        let g = con.get(ids).expect("the grant is visible at once");
        assert_eq!(int_field(&g, "requests_per_day"), expected);
        assert_eq!(
            env.info_i64("quota_cache_misses"),
            misses,
            "the GET right after GRANT went to PostgreSQL"
        );
        assert_eq!(
            env.info_i64("quota_cache_hits") + env.info_i64("quota_cache_stale_hits") - hits,
            1
        );
    }
    assert_eq!(con.revoke(ids), 1);
    let misses = env.info_i64("quota_cache_misses");
    assert!(con.get(ids).is_none(), "the revoke is visible at once");
    assert_eq!(env.info_i64("quota_cache_misses"), misses);
}

#[test]
fn an_update_made_with_sql_becomes_visible_through_notify() {
    // A long TTL: only NOTIFY can make the change visible within the 5 s below.
    let env = Env::start_with(&[("cache-ttl-ms", "600000"), ("negative-ttl-ms", "600000")]);
    let mut con = env.con();
    let ids = [T, P, "olga", "*"];
    let before = env.info_i64("quota_notify_received");
    con.grant(ids, "REQUESTS_PER_DAY 1");
    // This node's own NOTIFY for the grant marks the entry stale, and the refresh that
    // follows could pick up the UPDATE below by itself: let both happen first.
    env.wait_notified_after(before);
    con.get(ids);
    env.settle();
    assert_eq!(
        int_field(&con.get(ids).expect("row"), "requests_per_day"),
        1
    );
    let received = env.info_i64("quota_notify_received");

    env.sql("UPDATE {t} SET additional_requests_per_day = 77 WHERE user_id = 'olga'");
    let (ok, last) = poll_get(&mut con, ids, Duration::from_secs(5), |r| {
        r.as_ref().map(|m| field_i64(m, "requests_per_day")) == Some(77)
    });
    assert!(ok, "the SQL UPDATE was not visible within 5 s: {last:?}");
    assert!(env.info_i64("quota_notify_received") > received);

    // An INSERT for a user cached as "no credits", and a DELETE.
    let pam = [T, P, "pam", "gpt"];
    assert!(con.get(pam).is_none());
    env.sql(
        "INSERT INTO {t} (tenant, project, user_id, bundle_id, additional_tokens_per_day) \
         VALUES ('acme', 'chat', 'pam', 'gpt', 12)",
    );
    let (ok, last) = poll_get(&mut con, pam, Duration::from_secs(5), |r| r.is_some());
    assert!(ok, "the SQL INSERT was not visible within 5 s: {last:?}");
    assert_eq!(int_field(&last.expect("row"), "tokens_per_day"), 12);
    env.sql("DELETE FROM {t} WHERE user_id = 'pam'");
    let (ok, last) = poll_get(&mut con, pam, Duration::from_secs(5), |r| r.is_none());
    assert!(ok, "the SQL DELETE was not visible within 5 s: {last:?}");
}

// ---------------------------------------------------------------------------
// Ids, protocols, MULTI and scripts
// ---------------------------------------------------------------------------

#[test]
fn unicode_and_quotes_in_ids_round_trip_unchanged() {
    let (env, mut con) = Env::start_con();
    let tenant = "tén'ant \"q\" \\ 100%";
    let project = "プロジェクト; DROP TABLE x; --";
    let user = "{org1}üser 😀 'o''k' \t x";
    let bundle = "b:1:\"*\" \u{2028} é";
    let long = "é".repeat(127) + "x"; // 255 bytes
    let notes = "notes with 'quotes', \"double\", \\ and ünïcødé 🎉\nsecond line";
    let purchase = "pay'\"1 ✓";
    let ids = [tenant, project, user, bundle];
    let r = con.grant(
        ids,
        [
            "REQUESTS_PER_DAY",
            "3",
            "NOTES",
            notes,
            "PURCHASE",
            purchase,
        ],
    );
    assert_eq!(str_field(&r, "tenant"), tenant);
    assert_eq!(str_field(&r, "project"), project);
    assert_eq!(str_field(&r, "user_id"), user);
    assert_eq!(str_field(&r, "bundle_id"), bundle);
    assert_eq!(str_field(&r, "purchase_notes"), notes);
    assert_eq!(str_field(&r, "purchase_id"), purchase);

    let g = con.get(ids).expect("GET by the same ids");
    assert_eq!(str_field(&g, "bundle_id"), bundle);
    assert_eq!(str_field(&g, "user_id"), user);
    let l = con.list([tenant, project, user], false);
    assert_eq!(
        l.keys().cloned().collect::<Vec<_>>(),
        vec![bundle.to_string()]
    );

    // Stored byte for byte.
    let stored = env.sql(
        "SELECT encode(convert_to(tenant, 'UTF8'), 'hex') || '|' || \
         encode(convert_to(project, 'UTF8'), 'hex') || '|' || \
         encode(convert_to(user_id, 'UTF8'), 'hex') || '|' || \
         encode(convert_to(bundle_id, 'UTF8'), 'hex') || '|' || \
         encode(convert_to(purchase_notes, 'UTF8'), 'hex') || '|' || \
         encode(convert_to(purchase_id, 'UTF8'), 'hex') FROM {t}",
    );
    assert_eq!(
        stored,
        [tenant, project, user, bundle, notes, purchase]
            .iter()
            .map(|s| hex(s))
            .collect::<Vec<_>>()
            .join("|")
    );

    // Ids that look alike never meet; the longest id works.
    assert!(con.get([tenant, project, user, "b:1:\"*\""]).is_none());
    let r = con.grant([&long, &long, &long, &long], "TOKENS_PER_HOUR 1");
    assert_eq!(str_field(&r, "user_id"), long);
    let g = con.get([&long, &long, &long, &long]).expect("255-byte ids");
    assert_eq!(str_field(&g, "bundle_id"), long);
    assert_eq!(con.revoke(ids), 1);
    assert!(con.get(ids).is_none());
}

#[test]
fn resp3_clients_get_real_maps() {
    let env = Env::start();
    let mut con = env.server.client_resp3();
    let acc = [T, P, "quinn", "*"];
    let grant = with_account(
        "QUOTA.GRANT",
        acc,
        &["REQUESTS_PER_DAY", "2", "AMOUNT", "10"],
    );
    let r = query(&mut con, &grant).expect("GRANT");
    let Value::Map(pairs) = &r else {
        panic!("RESP3 GRANT reply is not a map: {r:?}");
    };
    assert_eq!(pairs.len(), RECORD_FIELDS.len() + 1);
    let m = to_map(r.clone());
    assert_eq!(int_field(&m, "requests_per_day"), 2);
    assert_eq!(str_field(&m, "purchase_amount_usd"), "10.00");
    assert!(matches!(m["created_at"], Value::Int(_)));
    assert!(matches!(m["expires_at"], Value::Nil));

    let g = query(&mut con, &["QUOTA.GET", T, P, "quinn", "x"]).expect("GET");
    assert!(
        matches!(g, Value::Map(_)),
        "RESP3 GET reply is not a map: {g:?}"
    );
    let none = query(&mut con, &["QUOTA.GET", T, P, "nobody", "x"]).expect("GET");
    assert_eq!(none, Value::Nil);

    let l = query(&mut con, &["QUOTA.LIST", T, P, "quinn", "ALL"]).expect("LIST");
    let Value::Map(entries) = l else {
        panic!("RESP3 LIST reply is not a map: {l:?}");
    };
    assert_eq!(entries.len(), 1);
    assert!(
        matches!(entries[0].1, Value::Map(_)),
        "LIST values are not maps: {entries:?}"
    );

    // RESP2 gets flat field/value arrays.
    let mut con2 = env.con();
    let g2 = query(&mut con2, &["QUOTA.GET", T, P, "quinn", "x"]).expect("GET");
    let Value::Array(items) = g2 else {
        panic!("RESP2 GET reply is not an array: {g2:?}");
    };
    assert_eq!(items.len(), 2 * (RECORD_FIELDS.len() + GET_EXTRA.len()));
}

/// Asserts that a reply is an error saying the command cannot run here.
fn assert_cannot_block(what: &str, v: &Value) {
    match v {
        Value::ServerError(e) => {
            let text = format!("{} {}", e.code(), e.details().unwrap_or(""));
            assert!(
                text.contains("cannot run inside MULTI"),
                "{what}: unclear error {text:?}"
            );
        }
        other => panic!("{what}: expected an error, got {other:?}"),
    }
}

#[test]
fn writes_and_listings_inside_multi_scripts_and_functions_are_refused_and_change_nothing() {
    let (env, mut con) = Env::start_con();
    con.grant([T, P, "rita", "exp"], "REQUESTS_PER_DAY 1 EXPIRES_IN 1");
    con.grant([T, P, "rita", "gpt"], "REQUESTS_PER_DAY 1");
    // An expired row, so that a CLEANUP that ran would change something.
    let (ok, _) = poll_get(
        &mut con,
        [T, P, "rita", "exp"],
        Duration::from_secs(5),
        |r| r.is_none(),
    );
    assert!(ok, "row did not expire");
    assert!(wait_until(Duration::from_secs(5), || {
        env.sql("SELECT count(*) FROM {t} WHERE expires_at <= now()") == "1"
    }));
    let snap = env.snapshot();

    let commands: [&[&str]; 4] = [
        &["QUOTA.GRANT", T, P, "rita", "gpt", "REQUESTS_PER_DAY", "9"],
        &["QUOTA.REVOKE", T, P, "rita", "gpt"],
        &["QUOTA.LIST", T, P, "rita"],
        &["QUOTA.CLEANUP"],
    ];
    for c in commands {
        assert_eq!(raw_reply(&mut con, &["MULTI"]), Value::Okay);
        let queued = raw_reply(&mut con, c);
        assert_eq!(queued, Value::SimpleString("QUEUED".into()), "{c:?}");
        let exec = to_array(raw_reply(&mut con, &["EXEC"]));
        assert_eq!(exec.len(), 1);
        assert_cannot_block(&format!("{c:?} in MULTI"), &exec[0]);

        let mut eval = vec!["EVAL", "return redis.call(unpack(ARGV))", "0"];
        eval.extend_from_slice(c);
        // Scripts: Redis itself refuses them (`noscript`), before the module runs.
        let text = must_fail(&format!("{c:?} in EVAL"), query(&mut con, &eval));
        assert!(
            text.contains("not allowed from script"),
            "{c:?} in EVAL: {text}"
        );
        let pcall = ["EVAL", "return redis.pcall(unpack(ARGV))", "0"];
        let mut args = pcall.to_vec();
        args.extend_from_slice(c);
        match raw_reply(&mut con, &args) {
            Value::ServerError(e) => assert!(
                e.details()
                    .unwrap_or("")
                    .contains("not allowed from script"),
                "{c:?} in EVAL pcall: {e:?}"
            ),
            other => panic!("{c:?} in EVAL pcall: expected an error, got {other:?}"),
        }
    }
    // Functions (Redis 7+).
    let lib = "#!lua name=quota_test\nredis.register_function('q', function(keys, args) \
               return redis.call(unpack(args)) end)";
    query(&mut con, &["FUNCTION", "LOAD", lib]).expect("FUNCTION LOAD");
    for c in commands {
        let mut args = vec!["FCALL", "q", "0"];
        args.extend_from_slice(c);
        let e = must_fail(&format!("{c:?} in FCALL"), query(&mut con, &args));
        assert!(e.contains("not allowed from script"), "{c:?} in FCALL: {e}");
    }
    assert_eq!(env.snapshot(), snap, "a refused command changed PostgreSQL");
    let g = con.get([T, P, "rita", "gpt"]).expect("row");
    assert_eq!(int_field(&g, "requests_per_day"), 1);
    ping(&mut con);
}

#[test]
fn get_inside_multi_on_an_uncached_user_answers_tryagain_then_works_outside() {
    let (env, mut con) = Env::start_con();
    let ids = [T, P, "sam", "gpt"];
    let received = env.info_i64("quota_notify_received");
    con.grant(ids, "REQUESTS_PER_DAY 4");
    // This node's own NOTIFY marks the entry stale: let it arrive now rather than mid-test.
    env.wait_notified_after(received);
    // Cached: GET inside MULTI answers from the cache.
    assert_eq!(raw_reply(&mut con, &["MULTI"]), Value::Okay);
    raw_reply(&mut con, &["QUOTA.GET", T, P, "sam", "gpt"]);
    let exec = to_array(raw_reply(&mut con, &["EXEC"]));
    let m = to_map(exec.into_iter().next().expect("one reply"));
    assert_eq!(int_field(&m, "requests_per_day"), 4);

    // Uncached: TRYAGAIN. (No refresh may be in flight: one landing after INVALIDATE would
    // cache the user again.)
    env.settle();
    assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "sam"]), 1);
    assert_eq!(raw_reply(&mut con, &["MULTI"]), Value::Okay);
    raw_reply(&mut con, &["QUOTA.GET", T, P, "sam", "gpt"]);
    let exec = to_array(raw_reply(&mut con, &["EXEC"]));
    match &exec[0] {
        Value::ServerError(e) => assert_eq!(e.code(), "TRYAGAIN", "{e:?}"),
        other => panic!("GET in MULTI on an uncached user: expected TRYAGAIN, got {other:?}"),
    }
    let g = con.get(ids).expect("GET outside MULTI");
    assert_eq!(int_field(&g, "requests_per_day"), 4);

    // The same in a script.
    env.settle();
    assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "sam"]), 1);
    let v = raw_reply(
        &mut con,
        &[
            "EVAL",
            "return redis.pcall('QUOTA.GET', ARGV[1], ARGV[2], ARGV[3], ARGV[4])",
            "0",
            T,
            P,
            "sam",
            "gpt",
        ],
    );
    match &v {
        Value::ServerError(e) => assert_eq!(e.code(), "TRYAGAIN", "{e:?}"),
        other => panic!("GET in EVAL on an uncached user: expected TRYAGAIN, got {other:?}"),
    }
    let g = con.get(ids).expect("GET outside the script");
    assert_eq!(int_field(&g, "requests_per_day"), 4);
}

// ---------------------------------------------------------------------------
// Bad input
// ---------------------------------------------------------------------------

/// What the error of a command with too few or too many arguments says.
const ARITY: &str = "wrong number of arguments";

/// Options of `QUOTA.GRANT acme chat u b` that are refused, and the name their error carries.
const BAD_GRANT_OPTIONS: [(&str, &str); 23] = [
    // Missing values.
    ("REQUESTS_PER_DAY", "REQUESTS_PER_DAY"),
    ("NOTES", "NOTES"),
    // Unknown and repeated options.
    ("FOO 1", "FOO"),
    ("REQUESTS_PER_DAY 1 requests_per_day 2", "REQUESTS_PER_DAY"),
    ("ADD ADD", "ADD"),
    ("PURCHASE x PURCHASE y", "PURCHASE"),
    ("EXPIRES_IN 10 EXPIRES_IN 20", "EXPIRES_IN"),
    // Numbers.
    ("REQUESTS_PER_DAY -1", "REQUESTS_PER_DAY"),
    ("TOKENS_PER_DAY abc", "TOKENS_PER_DAY"),
    ("TOKENS_PER_MONTH 1.5", "TOKENS_PER_MONTH"),
    ("TOKENS_PER_HOUR 9223372036854775808", "TOKENS_PER_HOUR"),
    ("TOKENS_PER_HOUR 99999999999999999999999", "TOKENS_PER_HOUR"),
    ("REQUESTS_PER_MONTH 2147483648", "REQUESTS_PER_MONTH"),
    ("EXPIRES_IN 0", "EXPIRES_IN"),
    ("EXPIRES_IN -5", "EXPIRES_IN"),
    ("EXPIRES_IN 9223372036854775807", "EXPIRES_IN"),
    ("EXPIRES_AT 0", "EXPIRES_AT"),
    ("EXPIRES_AT 253402300800", "EXPIRES_AT"),
    ("AMOUNT 1.234", "AMOUNT"),
    ("AMOUNT -1", "AMOUNT"),
    ("AMOUNT 100000000", "AMOUNT"),
    ("AMOUNT 1e3", "AMOUNT"),
    ("AMOUNT 1.", "AMOUNT"),
];

/// A command's words as bytes, split on single spaces.
fn byte_words(command: &str) -> Vec<Vec<u8>> {
    command.split(' ').map(|w| w.as_bytes().to_vec()).collect()
}

/// The arguments as a test message shows them: long ones cut to their first 20 bytes.
fn shown(args: &[Vec<u8>]) -> String {
    let words: Vec<String> = args
        .iter()
        .map(|a| {
            let s = String::from_utf8_lossy(a);
            if s.len() > 40 {
                format!("{}...({} bytes)", &s[..20], a.len())
            } else {
                s.into_owned()
            }
        })
        .collect();
    format!("{words:?}")
}

/// Sends a malformed command: it must get an `ERR` naming `names` (and the command, for an
/// arity error), leave the connection usable and run no PostgreSQL query (`queries` is the
/// counter before).
fn assert_refused_before_postgres(
    env: &Env,
    con: &mut redis::Connection,
    args: &[Vec<u8>],
    names: &str,
    queries: i64,
) {
    let shown = shown(args);
    let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
    let e = must_fail(&shown, bcmd(&refs).query::<Value>(con));
    assert!(e.starts_with("ERR "), "{shown}: not an ERR reply: {e}");
    assert!(
        e.contains(names),
        "{shown}: error {e:?} does not name {names:?}"
    );
    if names == ARITY {
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        assert!(e.to_ascii_lowercase().contains(&name), "{shown}: {e}");
    }
    ping(con);
    assert_eq!(
        env.info_i64("quota_pg_queries"),
        queries,
        "{shown} was refused but still went to PostgreSQL"
    );
}

#[test]
fn malformed_commands_get_an_error_naming_the_argument_and_change_nothing() {
    let (env, mut con) = Env::start_con();
    con.grant([T, P, "u", "b"], "REQUESTS_PER_DAY 1 PURCHASE p0");
    let snap = env.snapshot();
    let grants = env.info_i64("quota_grants");
    // Every refused command is refused before any PostgreSQL work: the query counter of the
    // worker pool stays put (checked after each one).
    let queries = env.info_i64("quota_pg_queries");

    let past = (now_s() - 10).to_string();
    let future = (now_s() + 3600).to_string();
    let long_id = vec![b'a'; 256];
    let long_purchase = vec![b'p'; 256];
    let long_notes = vec![b'n'; 4097];
    let bad_utf8: &[u8] = &[0xff, 0xfe, b'x'];
    let nul: &[u8] = b"a\0b";

    // Whole commands, and the name their error must carry.
    let mut cases: Vec<(Vec<Vec<u8>>, &str)> = [
        // Missing arguments.
        ("QUOTA.GRANT acme chat u", ARITY),
        ("QUOTA.GET acme chat u", ARITY),
        ("QUOTA.REVOKE acme", ARITY),
        ("QUOTA.LIST acme chat", ARITY),
        ("QUOTA.INVALIDATE acme chat", ARITY),
        ("QUOTA.CLEANUP now", ARITY),
        ("QUOTA.GET acme chat u b extra", ARITY),
        // Unknown options.
        ("QUOTA.LIST acme chat u EVERYTHING", "EVERYTHING"),
    ]
    .into_iter()
    .map(|(command, names)| (byte_words(command), names))
    .collect();

    // QUOTA.GRANT acme chat u b with these option words.
    let grant = |options: &[&[u8]]| -> Vec<Vec<u8>> {
        let head = byte_words("QUOTA.GRANT acme chat u b");
        head.into_iter()
            .chain(options.iter().map(|a| a.to_vec()))
            .collect()
    };
    let expires_at_past = format!("EXPIRES_AT {past}");
    let both_expiries = [
        format!("EXPIRES_AT {future} EXPIRES_IN 60"),
        format!("EXPIRES_IN 60 EXPIRES_AT {future}"),
    ];
    let dated = [
        (expires_at_past.as_str(), "EXPIRES_AT"),
        (&both_expiries[0], "EXPIRES_"),
        (&both_expiries[1], "EXPIRES_"),
    ];
    for (options, names) in BAD_GRANT_OPTIONS.into_iter().chain(dated) {
        cases.push((
            byte_words(&format!("QUOTA.GRANT acme chat u b {options}")),
            names,
        ));
    }
    // Values that are not words: empty, with a space, NUL, not UTF-8, too long.
    cases.extend([
        (grant(&[b"MAX_CONCURRENT", b" 1"]), "MAX_CONCURRENT"),
        (grant(&[b"TOTAL_REQUESTS", b""]), "TOTAL_REQUESTS"),
        (grant(&[b"PURCHASE", b""]), "PURCHASE"),
        (grant(&[b"PURCHASE", &long_purchase]), "PURCHASE"),
        (grant(&[b"PURCHASE", nul]), "PURCHASE"),
        (grant(&[b"PURCHASE", bad_utf8]), "PURCHASE"),
        (grant(&[b"NOTES", &long_notes]), "NOTES"),
        (grant(&[b"NOTES", nul]), "NOTES"),
        (grant(&[b"NOTES", bad_utf8]), "NOTES"),
    ]);
    // Bad ids, for every command that takes them and every position.
    for cmd in [
        "QUOTA.GRANT",
        "QUOTA.GET",
        "QUOTA.REVOKE",
        "QUOTA.LIST",
        "QUOTA.INVALIDATE",
    ] {
        let has_bundle = !matches!(cmd, "QUOTA.LIST" | "QUOTA.INVALIDATE");
        let ids = |t: &[u8], p: &[u8], u: &[u8], b: &[u8]| -> Vec<Vec<u8>> {
            let ids = [cmd.as_bytes(), t, p, u, b];
            ids[..4 + usize::from(has_bundle)]
                .iter()
                .map(|a| a.to_vec())
                .collect()
        };
        for bad in [&long_id[..], b"", bad_utf8, nul] {
            cases.push((ids(bad, b"chat", b"u", b"b"), "tenant"));
            cases.push((ids(b"acme", bad, b"u", b"b"), "project"));
            cases.push((ids(b"acme", b"chat", bad, b"b"), "user"));
            if has_bundle {
                cases.push((ids(b"acme", b"chat", b"u", bad), "bundle"));
            }
        }
        cases.push((ids(b"acme", b"chat", b"a}b", b"b"), "user"));
    }

    assert!(cases.len() > 100, "{} cases", cases.len());
    for (args, names) in &cases {
        assert_refused_before_postgres(&env, &mut con, args, names, queries);
    }
    assert_eq!(env.snapshot(), snap, "a refused command changed PostgreSQL");
    assert_eq!(env.info_i64("quota_grants"), grants);
    // Still fully working.
    let r = con.grant([T, P, "u", "b"], "REQUESTS_PER_DAY 2");
    assert_eq!(int_field(&r, "requests_per_day"), 2);
}

// ---------------------------------------------------------------------------
// Secrets, configuration, INFO
// ---------------------------------------------------------------------------

const SECRET: &str = "S3cretPW";

/// The shared URL with a password added (trust auth ignores it).
fn url_with_password(url: &str, password: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .unwrap_or_else(|| panic!("the PostgreSQL URL is not a URL: {url}"));
    let (userinfo, host) = rest
        .split_once('@')
        .unwrap_or_else(|| panic!("the PostgreSQL URL has no user: {url}"));
    let user = userinfo.split(':').next().unwrap_or("postgres");
    format!("{scheme}://{user}:{password}@{host}")
}

/// The same URL on another port, database or user.
fn url_variant(url: &str, port: Option<u16>, db: Option<&str>, user: Option<&str>) -> String {
    let (scheme, rest) = url.split_once("://").expect("url");
    let (userinfo, hostpart) = rest.split_once('@').expect("url user");
    let (hostport, dbname) = hostpart.split_once('/').unwrap_or((hostpart, "postgres"));
    let (host, p) = hostport.rsplit_once(':').expect("url port");
    let (u, pw) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    format!(
        "{scheme}://{}:{pw}@{host}:{}/{}",
        user.unwrap_or(u),
        port.map_or(p.to_string(), |p| p.to_string()),
        db.unwrap_or(dbname)
    )
}

fn secret_server() -> (RedisServer, String, String) {
    let schema = unique_schema();
    let url = url_with_password(&PgServer::shared(), SECRET);
    let server = RedisServer::builder().pg(&url, &schema, "1000").start();
    (server, url, schema)
}

#[test]
fn the_pg_url_password_never_appears_in_info_errors_or_the_log() {
    let (server, url, _schema) = secret_server();
    let mut con = server.client();
    let mut seen: Vec<String> = Vec::new();

    // It works with the password in the URL.
    let r = con.grant([T, P, "tom", "*"], "REQUESTS_PER_DAY 1");
    assert_eq!(int_field(&r, "requests_per_day"), 1);
    // CONFIG GET returns it: it is the sensitive setting itself.
    let cfg = to_map(query(&mut con, &["CONFIG", "GET", "quota.pg-url"]).expect("CONFIG GET"));
    assert_eq!(
        cfg.get("quota.pg-url").and_then(value_to_string),
        Some(url.clone())
    );

    // Errors that involve the connection: unreachable server, unknown role, unknown database,
    // an unparsable URL, each with the password in it.
    let free = free_port();
    let variants = [
        url_variant(&url, Some(free), None, None),
        url_variant(&url, None, None, Some("no_such_role")),
        url_variant(&url, None, Some("no_such_db"), None),
        format!("postgresql://postgres:{SECRET}@127.0.0.1:notaport/postgres"),
        format!("host=127.0.0.1 port={free} user=postgres password={SECRET} dbname=postgres"),
    ];
    for v in &variants {
        if v.contains("notaport") {
            // An unparsable URL is refused by CONFIG SET itself, without quoting it.
            let e = query(&mut con, &["CONFIG", "SET", "quota.pg-url", v])
                .expect_err("CONFIG SET of an unparsable pg-url must fail");
            seen.push(error_text(&e));
            continue;
        }
        query(&mut con, &["CONFIG", "SET", "quota.pg-url", v]).expect("CONFIG SET quota.pg-url");
        for c in [
            &["QUOTA.GRANT", T, P, "tom", "*", "REQUESTS_PER_DAY", "2"][..],
            &["QUOTA.GET", T, P, "uncached", "*"],
            &["QUOTA.LIST", T, P, "tom"],
            &["QUOTA.REVOKE", T, P, "tom", "*"],
            &["QUOTA.CLEANUP"],
        ] {
            seen.push(must_fail(
                &format!("{c:?} with pg-url {v:?}"),
                query(&mut con, c),
            ));
        }
        let acc = [T, P, "uncached2", "*"];
        let admit = query_map(
            &mut con,
            &with_account("QUOTA.ADMIT", acc, &["REQUESTS_PER_DAY", "5"]),
        );
        seen.push(format!("{admit:?}"));
        seen.push(
            redis::cmd("INFO")
                .arg("everything")
                .query::<String>(&mut con)
                .expect("INFO"),
        );
    }
    // Parse errors and other error paths.
    for c in [
        &["QUOTA.GRANT", T, P, "tom", "*", "BOGUS", SECRET][..],
        &["QUOTA.GRANT", T, P, "tom", "*", "AMOUNT", SECRET],
        &["CONFIG", "SET", "quota.pool-size", "2"],
    ] {
        if let Err(e) = query(&mut con, c) {
            seen.push(error_text(&e));
        }
    }
    for section in ["quota", "all", "everything", "modules", "default"] {
        seen.push(
            redis::cmd("INFO")
                .arg(section)
                .query::<String>(&mut con)
                .expect("INFO"),
        );
    }
    seen.push(redis::cmd("INFO").query::<String>(&mut con).expect("INFO"));
    // Back to the working URL (with its password): still fine, nothing leaked meanwhile.
    query(&mut con, &["CONFIG", "SET", "quota.pg-url", &url]).expect("CONFIG SET");
    let ok = wait_until(Duration::from_secs(10), || {
        query(
            &mut con,
            &["QUOTA.GRANT", T, P, "tom", "*", "REQUESTS_PER_DAY", "3"],
        )
        .is_ok()
    });
    assert!(ok, "GRANT does not work again after restoring pg-url");
    seen.push(
        redis::cmd("INFO")
            .arg("everything")
            .query::<String>(&mut con)
            .expect("INFO"),
    );

    for text in &seen {
        assert!(!text.contains(SECRET), "the password leaked: {text}");
    }
    // Something meaningful was said about the failures.
    assert!(
        seen.iter().any(|t| t.contains("PostgreSQL")),
        "no error mentioned PostgreSQL: {seen:?}"
    );
    let log = std::fs::read_to_string(server.dir().join("redis.log")).expect("redis.log");
    assert!(
        !log.contains(SECRET),
        "the password is in the Redis log:\n{log}"
    );
    let out = std::fs::read_to_string(server.dir().join("stdout.log")).unwrap_or_default();
    assert!(
        !out.contains(SECRET),
        "the password is in the server output:\n{out}"
    );
}

#[test]
fn module_list_does_not_show_the_pg_url_password() {
    // MODULE LIST (Redis >= 7) shows the arguments the module was loaded with.
    let (server, _url, _schema) = secret_server();
    let mut con = server.client();
    let v = query(&mut con, &["MODULE", "LIST"]).expect("MODULE LIST");
    let text = format!("{v:?}");
    assert!(
        !text.contains(SECRET),
        "MODULE LIST shows the pg-url password given as a module argument: {text}"
    );
}

#[test]
fn config_set_changes_take_effect() {
    let (env, mut con) = Env::start_con();
    let ids = [T, P, "uma", "*"];
    con.grant(ids, "REQUESTS_PER_DAY 1");
    con.get(ids);

    // cache-ttl-ms 0: an entry loaded under it is stale at once, so every GET is a stale
    // hit that starts a refresh.
    set_and_read_back(&mut con, "quota.cache-ttl-ms", "0");
    env.settle();
    assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "uma"]), 1);
    con.get(ids); // a miss: loaded under TTL 0
    let stale = env.info_i64("quota_cache_stale_hits");
    let hits = env.info_i64("quota_cache_hits");
    let queries = env.info_i64("quota_pg_queries");
    for _ in 0..3 {
        // Let the previous refresh land so that the entry is cached (stale) again.
        env.settle();
        let g = con.get(ids).expect("row");
        assert_eq!(int_field(&g, "requests_per_day"), 1);
    }
    env.settle();
    assert_eq!(
        env.info_i64("quota_cache_stale_hits") - stale,
        3,
        "with cache-ttl-ms 0 every GET should be a stale hit"
    );
    assert_eq!(
        env.info_i64("quota_cache_hits"),
        hits,
        "a fresh hit with cache-ttl-ms 0"
    );
    assert!(
        env.info_i64("quota_pg_queries") - queries >= 3,
        "stale GETs did not refresh from PostgreSQL"
    );

    // Back to a long TTL: after a reload, GETs are fresh hits.
    query(&mut con, &["CONFIG", "SET", "quota.cache-ttl-ms", "600000"]).expect("CONFIG SET");
    env.settle();
    assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, "uma"]), 1);
    con.get(ids);
    let hits = env.info_i64("quota_cache_hits");
    let stale = env.info_i64("quota_cache_stale_hits");
    con.get(ids);
    con.get(ids);
    assert_eq!(env.info_i64("quota_cache_hits") - hits, 2);
    assert_eq!(env.info_i64("quota_cache_stale_hits"), stale);

    // negative-ttl-ms 0 does the same for users without credits.
    query(&mut con, &["CONFIG", "SET", "quota.negative-ttl-ms", "0"]).expect("CONFIG SET");
    assert!(con.get([T, P, "nobody", "*"]).is_none()); // a miss
    env.settle();
    let stale = env.info_i64("quota_cache_stale_hits");
    assert!(con.get([T, P, "nobody", "*"]).is_none());
    assert_eq!(env.info_i64("quota_cache_stale_hits") - stale, 1);
    env.settle();

    // cache-max-entries 1: caching a second user evicts the first.
    query(&mut con, &["CONFIG", "SET", "quota.cache-max-entries", "1"]).expect("CONFIG SET");
    let evictions = env.info_i64("quota_cache_evictions");
    for u in ["v1", "v2", "v3"] {
        con.get([T, P, u, "*"]);
    }
    assert!(
        env.info_i64("quota_cache_entries") <= 1,
        "{:?}",
        env.server.info("quota")
    );
    assert!(env.info_i64("quota_cache_evictions") - evictions >= 2);

    // notify off / on.
    query(&mut con, &["CONFIG", "SET", "quota.notify", "no"]).expect("CONFIG SET");
    env.wait_notify("off");
    query(&mut con, &["CONFIG", "SET", "quota.notify", "yes"]).expect("CONFIG SET");
    env.wait_notify("listening");

    // pg-timeout-ms is read back; bad values and load-time options are refused.
    set_and_read_back(&mut con, "quota.pg-timeout-ms", "1500");
    for (name, value) in [
        ("quota.cache-ttl-ms", "-1"),
        ("quota.cache-ttl-ms", "abc"),
        ("quota.script-miss", "sometimes"),
        ("quota.pool-size", "8"),
        ("quota.queue-max", "5"),
    ] {
        assert!(
            query(&mut con, &["CONFIG", "SET", name, value]).is_err(),
            "CONFIG SET {name} {value} was accepted"
        );
    }
    let r = con.grant(ids, "REQUESTS_PER_DAY 2");
    assert_eq!(int_field(&r, "requests_per_day"), 2);

    // A schema name the module cannot use is refused by CONFIG SET itself, rather than
    // accepted and then failing every command.
    let refused = query(&mut con, &["CONFIG", "SET", "quota.schema", "Bad-Name!"]);
    let after = query(
        &mut con,
        &["QUOTA.GRANT", T, P, "uma", "*", "REQUESTS_PER_DAY", "3"],
    );
    assert!(
        refused.is_err(),
        "CONFIG SET quota.schema Bad-Name! was accepted (GRANT afterwards: {after:?})"
    );
    let after = to_map(after.expect("GRANT after a refused CONFIG SET"));
    assert_eq!(int_field(&after, "requests_per_day"), 3);
}

#[test]
fn info_quota_has_every_documented_field() {
    let (env, mut con) = Env::start_con();
    con.grant([T, P, "wes", "*"], "REQUESTS_PER_DAY 1");
    let info = env.server.info("quota");
    for f in INFO_FIELDS {
        let v = info
            .get(f)
            .unwrap_or_else(|| panic!("INFO quota lacks {f}: {info:?}"));
        if f == "quota_notify_state" {
            assert!(
                ["off", "connecting", "listening", "disconnected"].contains(&v.as_str()),
                "{f}:{v}"
            );
        } else {
            assert!(
                v.parse::<i64>().is_ok_and(|n| n >= 0),
                "{f}:{v} is not a count"
            );
        }
    }
    assert_eq!(info["quota_notify_state"], "listening");
    assert!(info["quota_grants"].parse::<i64>().expect("int") >= 1);
    assert!(info["quota_pg_queries"].parse::<i64>().expect("int") >= 1);
    assert_eq!(info["quota_pool_size"], "4");
    assert_eq!(info["quota_queue_max"], "10000");
    // Also part of plain INFO and INFO everything.
    let all = env.server.info("everything");
    assert!(all.contains_key("quota_cache_entries"));
}

#[test]
fn a_burst_of_cold_users_shares_queries_and_each_gets_its_own_rows() {
    // 300 users with distinct credits, none cached; 30 clients ask for all of them at once
    // (a blocked client waits for its own load, so the burst comes from many clients). Loads
    // queued behind each other are served by one query per batch, and every user must still
    // get exactly its own row (or nil).
    let env = Env::start_with(&[("notify", "no"), ("cache-ttl-ms", "600000")]);
    let mut con = env.con();
    let users: Vec<String> = (0..300).map(|i| format!("burst{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        if i % 3 != 0 {
            let n = (i + 1).to_string();
            con.grant([T, P, u, "*"], ["REQUESTS_PER_DAY", &n]);
            // The grant wrote its rows through to the cache: drop them again.
            assert_eq!(int_reply(&mut con, &["QUOTA.INVALIDATE", T, P, u]), 1);
        }
    }
    let before = info_i64(&env.server, "quota_pg_queries");
    let clients = 30;
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(clients));
    let threads: Vec<_> = (0..clients)
        .map(|c| {
            let mut con = env.con();
            let barrier = barrier.clone();
            let mine: Vec<(usize, String)> = users
                .iter()
                .enumerate()
                .filter(|(i, _)| i % clients == c)
                .map(|(i, u)| (i, u.clone()))
                .collect();
            std::thread::spawn(move || {
                barrier.wait();
                mine.into_iter()
                    .map(|(i, u)| (i, query(&mut con, &["QUOTA.GET", T, P, &u, "web"])))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut seen = 0;
    for thread in threads {
        for (i, reply) in thread.join().expect("client thread") {
            seen += 1;
            let reply = reply.unwrap_or_else(|e| panic!("GET {}: {e}", users[i]));
            if i % 3 == 0 {
                assert_eq!(reply, Value::Nil, "{} has no credits", users[i]);
            } else {
                let m = to_map(reply);
                assert_eq!(str_field(&m, "user_id"), users[i]);
                assert_eq!(int_field(&m, "requests_per_day"), i as i64 + 1);
            }
        }
    }
    assert_eq!(seen, users.len());
    let queries = info_i64(&env.server, "quota_pg_queries") - before;
    eprintln!(
        "{queries} queries for {} cold users from {clients} clients",
        users.len()
    );
    assert!(
        queries < users.len() as i64 * 3 / 4,
        "{queries} queries for {} cold users: loads were not batched",
        users.len()
    );
}
