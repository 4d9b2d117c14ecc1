//! Admission end to end: `QUOTA.ADMIT`, `COMMIT`, `RELEASE`, `USAGE`, `RESET` against a real
//! redis-server with the module, on the shared PostgreSQL (one schema and one server per test).
//!
//! Covers exactness under concurrent clients, credits merged into the base policy, reply
//! fields, leases and reservations, the account key (type, TTL, WRONGTYPE), and admission from
//! Lua scripts and `MULTI` on warm and cold users.
mod common;

use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

/// Asserts counters of `QUOTA.USAGE` on `acc`, naming the fields:
/// `assert_usage!(con, acc, requests_per_day: 1, in_flight: 0)`; the message shows the whole reply.
macro_rules! assert_usage {
    ($con:expr, $acc:expr, $($field:ident: $want:expr),+ $(,)?) => {{
        let u = $con.usage($acc);
        assert_eq!(($(u.$field,)+), ($($want,)+), "{u:?}");
    }};
}

const THREADS: usize = 20;
const PER_THREAD: usize = 25;
/// The account most tests use.
const ALICE: [&str; 4] = ["acme", "chat", "alice", "main"];

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month) of a day number.
fn year_month(days: i64) -> (i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m)
}

fn next_hour(t: i64) -> i64 {
    (t.div_euclid(3600) + 1) * 3600
}

fn next_midnight(t: i64) -> i64 {
    (t.div_euclid(86_400) + 1) * 86_400
}

fn next_month(t: i64) -> i64 {
    let (y, m) = year_month(t.div_euclid(86_400));
    let (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    days_from_civil(y, m, 1) * 86_400
}

/// Keeps a test away from an hour boundary (day and month boundaries are hour boundaries):
/// counters of a window that ends mid-test would read as zero and break exact assertions.
fn avoid_window_edge() {
    let left = next_hour(now_s()) - now_s();
    if left < 20 {
        thread::sleep(Duration::from_secs((left + 1) as u64));
    }
}

/// A server with the module on the shared PostgreSQL and a fresh schema, its NOTIFY listener
/// up (its first connect drops the whole cache, which would make warm users cold again).
fn server() -> RedisServer {
    server_with(&unique_schema(), &[])
}

/// [`server`] and a connection to it.
fn server_and_client() -> (RedisServer, redis::Connection) {
    let server = server();
    let con = server.client();
    (server, con)
}

/// [`server`] on a given schema, with more module arguments.
fn server_with(schema: &str, extra: &[(&str, &str)]) -> RedisServer {
    avoid_window_edge();
    let server = test_server_with(schema, extra);
    let ok = wait_until(Duration::from_secs(20), || {
        server
            .info("quota")
            .get("quota_notify_state")
            .is_some_and(|s| s == "listening")
    });
    assert!(
        ok,
        "quota_notify_state never became listening: {:?}",
        server.info("quota")
    );
    server
}

fn keys(con: &mut redis::Connection, pattern: &str) -> Vec<String> {
    to_array(query(con, &["KEYS", pattern]).expect("KEYS"))
        .iter()
        .filter_map(value_to_string)
        .collect()
}

/// The three resets are the next UTC hour, midnight and month.
fn assert_resets(resets: [i64; 3]) {
    let t = now_s();
    // A window boundary cannot pass mid-test (avoid_window_edge), so these are exact.
    let want = [next_hour(t), next_midnight(t), next_month(t)];
    assert_eq!(resets, want, "hour, day and month resets");
}

/// `THREADS` clients send `PER_THREAD` identical admissions each, all starting together;
/// returns every reply.
fn hammer(server: &RedisServer, acc: [&'static str; 4], opts: &str) -> Vec<Admit> {
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|_| {
            let mut con = server.client();
            let barrier = Arc::clone(&barrier);
            let opts = opts.to_string();
            thread::spawn(move || {
                barrier.wait();
                (0..PER_THREAD)
                    .map(|_| con.admit(acc, &opts))
                    .collect::<Vec<Admit>>()
            })
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().expect("client thread panicked"))
        .collect()
}

fn eval_admit(
    con: &mut redis::Connection,
    acc: [&str; 4],
    opts: &str,
) -> redis::RedisResult<Value> {
    let mut c = redis::cmd("EVAL");
    c.arg("return redis.call('QUOTA.ADMIT', unpack(ARGV))")
        .arg(0);
    for a in acc.iter().copied().chain(opts.split_whitespace()) {
        c.arg(a);
    }
    c.query(con)
}

fn multi_admit(
    con: &mut redis::Connection,
    acc: [&str; 4],
    opts: &str,
) -> redis::RedisResult<Vec<Value>> {
    let words: Vec<&str> = opts.split_whitespace().collect();
    let mut p = redis::pipe();
    p.atomic();
    p.add_command(cmd(&with_account("QUOTA.ADMIT", acc, &words)));
    p.add_command(cmd(&with_account("QUOTA.USAGE", acc, &[])));
    p.query(con)
}

/// Unsigned LEB128, as the account state encoding uses.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

// ---------------------------------------------------------------------------
// Exactness under concurrency
// ---------------------------------------------------------------------------

#[test]
fn concurrent_admits_never_exceed_requests_per_day() {
    let server = server();
    let acc = ["acme", "chat", "alice", "main"];
    let replies = hammer(&server, acc, "REQUESTS_PER_DAY 100");
    assert_eq!(replies.len(), THREADS * PER_THREAD);
    let admitted = replies.iter().filter(|m| m.allowed).count();
    assert_eq!(admitted, 100, "exactly the limit must be admitted");
    for m in replies.iter().filter(|m| !m.allowed) {
        assert_eq!(m.reason, "requests_per_day");
    }
    let mut con = server.client();
    assert_usage!(con, acc, requests_per_day: 100, requests_per_month: 100, total_requests: 100);
}

#[test]
fn concurrent_admits_never_exceed_max_concurrent() {
    let server = server();
    let acc = ["acme", "chat", "alice", "main"];
    let replies = hammer(&server, acc, "MAX_CONCURRENT 5");
    let admitted: Vec<&Admit> = replies.iter().filter(|m| m.allowed).collect();
    assert_eq!(admitted.len(), 5, "exactly MAX_CONCURRENT leases");
    let leases: HashSet<String> = admitted.iter().map(|m| m.lease()).collect();
    assert_eq!(leases.len(), 5, "each admitted request holds its own lease");
    for m in replies.iter().filter(|m| !m.allowed) {
        assert_eq!(m.reason, "concurrency", "{m:?}");
        assert!(m.lease.is_none(), "a denied request holds no lease: {m:?}");
    }
    let mut con = server.client();
    assert_usage!(con, acc, in_flight: 5, requests_per_day: 5, total_requests: 5);
}

#[test]
fn concurrent_reservations_never_exceed_tokens_per_day() {
    let server = server();
    let acc = ["acme", "chat", "alice", "main"];
    let replies = hammer(&server, acc, "TOKENS_PER_DAY 1000 RESERVE 300");
    let mut reserved: Vec<i64> = replies
        .iter()
        .filter(|m| m.allowed)
        .map(|m| m.reserved)
        .collect();
    reserved.sort_unstable();
    assert_eq!(
        reserved,
        vec![100, 300, 300, 300],
        "reservations fill the window exactly, the last one capped"
    );
    for m in replies.iter().filter(|m| !m.allowed) {
        assert_eq!(m.reason, "tokens_per_day", "{m:?}");
        assert_eq!(m.reserved, 0);
    }
    let mut con = server.client();
    assert_usage!(con, acc, reserved: 1000, in_flight: 4, tokens_per_day: 0);
}

// ---------------------------------------------------------------------------
// Credits merged into the base policy
// ---------------------------------------------------------------------------

#[test]
fn global_credits_add_to_the_base_policy() {
    let server = server();
    let mut con = server.client();
    let acc = ["acme", "chat", "alice", "any-bundle"];
    con.grant(["acme", "chat", "alice", "*"], "REQUESTS_PER_DAY 5");
    for i in 1..=7i64 {
        let m = con.admit(acc, "REQUESTS_PER_DAY 2");
        assert!(m.allowed, "admit {i} of 7: {m:?}");
        assert_eq!(m.credit, "global");
        assert_eq!(
            m.used_credit(),
            i >= 3,
            "admit {i}: only requests beyond the base 2 use the credits: {m:?}"
        );
        assert_eq!(m.remaining_requests, 7 - i, "{m:?}");
    }
    let m = con.admit(acc, "REQUESTS_PER_DAY 2");
    assert!(
        !m.allowed,
        "base 2 + credits 5 = 7: the 8th is denied: {m:?}"
    );
    assert_eq!(m.reason, "requests_per_day");
    assert_eq!(m.credit, "global");
    assert!(!m.used_credit());
    assert_eq!(m.remaining_requests, 0);
    assert_usage!(con, acc, requests_per_day: 7);
}

#[test]
fn bundle_credits_apply_alone_and_no_credits_say_none() {
    let server = server();
    let mut con = server.client();
    // bob: a '*' row and a 'pro' row; 'pro' uses its own row only (never both combined).
    con.grant(["acme", "chat", "bob", "*"], "REQUESTS_PER_DAY 5");
    con.grant(["acme", "chat", "bob", "pro"], "REQUESTS_PER_DAY 1");
    let pro = ["acme", "chat", "bob", "pro"];
    let m = con.admit(pro, "REQUESTS_PER_DAY 0");
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.credit, "bundle");
    assert!(m.used_credit());
    let m = con.admit(pro, "REQUESTS_PER_DAY 0");
    assert!(!m.allowed, "the bundle row replaces the '*' row: {m:?}");
    assert_eq!(m.credit, "bundle");
    // Another bundle of bob falls back to '*'.
    let m = con.admit(["acme", "chat", "bob", "free"], "REQUESTS_PER_DAY 0");
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.credit, "global");
    // carol has no credits at all.
    let carol = ["acme", "chat", "carol", "pro"];
    let m = con.admit(carol, "REQUESTS_PER_DAY 1");
    assert!(m.allowed);
    assert_eq!(m.credit, "none");
    assert!(!m.used_credit());
    let m = con.admit(carol, "REQUESTS_PER_DAY 1");
    assert!(!m.allowed);
    assert_eq!(m.credit, "none");
}

/// An account's admissions reuse the credit its last admission used (no cache lookup) while
/// the cache is unchanged: every change of the user's credits must show on the very next
/// admission all the same: grant, top-up, revoke, a row expiring, an invalidation. NOTIFY is
/// off so that nothing but the write-through itself can make the change visible.
#[test]
fn every_credit_change_shows_on_the_next_admission() {
    avoid_window_edge();
    let server = test_server_with(
        &unique_schema(),
        &[("cache-ttl-ms", "3600000"), ("notify", "no")],
    );
    let mut con = server.client();
    let acc = ["acme", "chat", "memo", "pro"];
    let star = ["acme", "chat", "memo", "*"];
    let stat = |name: &str| -> i64 {
        server
            .info("quota")
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(-1)
    };
    // A real admission (stores the account key, which is where the credit is remembered);
    // its source of credits.
    let mut used = 0i64;
    let mut real = |con: &mut redis::Connection| {
        let m = con.admit(acc, "REQUESTS_PER_DAY 1000000");
        assert!(m.allowed, "{m:?}");
        used += 1;
        (used, m.credit)
    };
    // What is left under a base of 10000 (PEEK: counts nothing), and the source.
    let left = |con: &mut redis::Connection| {
        let m = con.admit(acc, "REQUESTS_PER_DAY 10000 PEEK");
        (m.remaining_requests, m.credit)
    };
    let (_, src) = real(&mut con);
    assert_eq!(src, "none");
    let hits0 = stat("quota_cache_hits");
    let mut n = 0;
    for _ in 0..5 {
        n = real(&mut con).0;
    }
    assert!(
        stat("quota_cache_hits") >= hits0 + 5,
        "admissions with the remembered credit count as cache hits"
    );
    assert_eq!(left(&mut con), (10000 - n, "none".into()));

    con.grant(star, "REQUESTS_PER_DAY 10");
    let (n, src) = real(&mut con);
    assert_eq!(src, "global", "a grant shows at once");
    assert_eq!(left(&mut con), (10010 - n, "global".into()));
    con.grant(star, "REQUESTS_PER_DAY 5 ADD");
    assert_eq!(
        left(&mut con),
        (10015 - n, "global".into()),
        "a top-up shows at once"
    );
    real(&mut con);
    con.grant(acc, "REQUESTS_PER_DAY 100");
    let (n, src) = real(&mut con);
    assert_eq!(src, "bundle", "a bundle row replaces '*' at once");
    assert_eq!(left(&mut con), (10100 - n, "bundle".into()));
    assert_eq!(con.revoke(acc), 1);
    let (n, src) = real(&mut con);
    assert_eq!(src, "global", "a revoke shows at once");
    assert_eq!(left(&mut con), (10015 - n, "global".into()));

    // A row that expires: the first admission after its expiry falls back to '*'.
    let expires_s = now_s() + 2;
    con.grant(
        acc,
        [
            "REQUESTS_PER_DAY",
            "100",
            "EXPIRES_AT",
            &expires_s.to_string(),
        ],
    );
    assert_eq!(real(&mut con).1, "bundle");
    loop {
        let (_, src) = real(&mut con);
        let past = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
            >= expires_s * 1000;
        if past {
            // Decided after the expiry instant (the reply came later still).
            break;
        }
        assert_eq!(src, "bundle", "the row has not expired yet");
        thread::sleep(Duration::from_millis(40));
    }
    let (n, src) = real(&mut con);
    assert_eq!(src, "global", "the expired bundle row still applied");
    assert_eq!(left(&mut con), (10015 - n, "global".into()));

    // Dropped by hand: the next admission looks the user up again.
    let misses0 = stat("quota_cache_misses");
    query(&mut con, &["QUOTA.INVALIDATE", "acme", "chat", "memo"]).expect("QUOTA.INVALIDATE");
    assert_eq!(real(&mut con).1, "global");
    assert_eq!(
        stat("quota_cache_misses"),
        misses0 + 1,
        "an invalidated user is looked up again"
    );
}

/// The same for a change written elsewhere (SQL): NOTIFY makes the next admissions of a warm
/// account see it, however long the cache TTL.
#[test]
fn an_sql_update_reaches_a_warm_account_through_notify() {
    let schema = unique_schema();
    let server = server_with(&schema, &[("cache-ttl-ms", "3600000")]);
    let mut con = server.client();
    let acc = ["acme", "chat", "sqlmemo", "pro"];
    con.grant(["acme", "chat", "sqlmemo", "*"], "REQUESTS_PER_DAY 10");
    let left = |con: &mut redis::Connection| {
        let m = con.admit(acc, "REQUESTS_PER_DAY 1000");
        assert!(m.allowed, "{m:?}");
        m.remaining_requests
    };
    // Let the NOTIFY echo of the grant itself pass, then warm the account.
    thread::sleep(Duration::from_millis(500));
    let mut n = 0;
    for _ in 0..20 {
        n += 1;
        assert_eq!(left(&mut con), 1010 - n);
    }
    let t = format!("{schema}.user_quota_replenishment");
    psql(
        &PgServer::shared(),
        &format!(
            "UPDATE {t} SET additional_requests_per_day = 500 \
             WHERE user_id = 'sqlmemo' AND bundle_id = '*'"
        ),
    );
    let ok = wait_until(Duration::from_secs(5), || {
        n += 1;
        left(&mut con) == 1500 - n
    });
    assert!(ok, "the SQL UPDATE never showed");
}

// ---------------------------------------------------------------------------
// Reply fields
// ---------------------------------------------------------------------------

/// Asserts that a denial's `retry_after` runs until `until` (Unix seconds), give or take 2 s.
fn assert_retry_until(m: &Admit, until: i64, what: &str) {
    let want = until - now_s();
    let got = m.retry_after;
    assert!(
        (got - want).abs() <= 2,
        "retry_after {got}, {what} in {want}: {m:?}"
    );
}

#[test]
fn denial_reasons_join_and_retry_after_follows_the_windows() {
    let server = server();
    let mut con = server.client();
    let u = |b| ["acme", "chat", "alice", b];

    // Day and lifetime together: joined, and a lifetime limit never resets.
    let both = "REQUESTS_PER_DAY 1 TOTAL_REQUESTS 1";
    assert!(con.admit(u("both"), both).allowed);
    let m = con.admit(u("both"), both);
    assert!(!m.allowed);
    assert_eq!(m.reason, "requests_per_day|total_requests");
    assert_eq!(m.retry_after, -1, "{m:?}");

    let total = "TOTAL_REQUESTS 1";
    assert!(con.admit(u("total"), total).allowed);
    let m = con.admit(u("total"), total);
    assert_eq!(m.reason, "total_requests");
    assert_eq!(m.retry_after, -1);

    let day = "REQUESTS_PER_DAY 1";
    let m = con.admit(u("day"), day);
    assert!(m.allowed);
    assert_eq!(m.reason, "");
    assert_eq!(m.retry_after, -1, "allowed: no retry_after");
    let m = con.admit(u("day"), day);
    assert_eq!(m.reason, "requests_per_day");
    assert_retry_until(&m, next_midnight(now_s()), "the next UTC midnight");

    let month = "REQUESTS_PER_MONTH 1";
    con.admit(u("month"), month);
    let m = con.admit(u("month"), month);
    assert_eq!(m.reason, "requests_per_month");
    assert_retry_until(&m, next_month(now_s()), "the next month");

    // Tokens: committed tokens fill the hour.
    con.commit(u("tokens"), 10, None);
    let m = con.admit(u("tokens"), "TOKENS_PER_HOUR 10 TOKENS_PER_DAY 10");
    assert_eq!(m.reason, "tokens_per_hour|tokens_per_day");
    // Waits for every violated window: the day's.
    assert_retry_until(&m, next_midnight(now_s()), "the next UTC midnight");

    // Concurrency: until the first lease expires.
    let conc = "MAX_CONCURRENT 1 LEASE_TTL 100";
    assert!(con.admit(u("conc"), conc).allowed);
    let m = con.admit(u("conc"), conc);
    assert_eq!(m.reason, "concurrency");
    let got = m.retry_after;
    assert!(
        (98..=100).contains(&got),
        "retry_after {got}, lease expires in 100 s"
    );

    // No slot at all: no wait helps.
    let m = con.admit(u("none"), "MAX_CONCURRENT 0");
    assert_eq!(m.reason, "concurrency");
    assert_eq!(m.retry_after, -1, "{m:?}");

    // A window violation hides concurrency.
    let m = con.admit(u("conc"), "MAX_CONCURRENT 1 REQUESTS_PER_DAY 1");
    assert_eq!(m.reason, "requests_per_day");
}

#[test]
fn remaining_requests_and_tokens_are_the_smallest_left() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let policy = "REQUESTS_PER_DAY 10 REQUESTS_PER_MONTH 5 TOKENS_PER_HOUR 500 TOKENS_PER_DAY 1000";
    let m = con.admit(acc, policy);
    assert_eq!(m.remaining_requests, 4, "month 5 - 1: {m:?}");
    assert_eq!(m.remaining_tokens, 500, "{m:?}");
    con.commit(acc, 100, None);
    let m = con.admit(acc, policy);
    assert_eq!(m.remaining_requests, 3);
    assert_eq!(m.remaining_tokens, 400);
    let m = con.admit(acc, Opts::words(policy).reserve(50));
    assert_eq!(m.reserved, 50);
    assert_eq!(m.remaining_requests, 2);
    assert_eq!(m.remaining_tokens, 350, "reserved tokens count: {m:?}");
    let m = con.admit(acc, "");
    assert!(m.allowed);
    assert_eq!(m.remaining_requests, -1, "unlimited: {m:?}");
    assert_eq!(m.remaining_tokens, -1);
    assert!(m.lease.is_none(), "no lease asked for: {m:?}");
    assert_eq!(m.reserved, 0);
}

#[test]
fn peek_changes_nothing() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let policy = "REQUESTS_PER_DAY 2 MAX_CONCURRENT 1 RESERVE 5";
    let peek = format!("{policy} PEEK");

    let m = con.admit(acc, &peek);
    assert!(m.allowed, "{m:?}");
    assert!(m.lease.is_none(), "a peek takes no lease: {m:?}");
    assert_eq!(m.reserved, 0);
    assert_eq!(
        keys(&mut con, "q:*"),
        Vec::<String>::new(),
        "a peek creates no key"
    );
    assert_eq!(query_i64(&mut con, &["EXISTS", &account_key(acc)]), 0);

    let first = con.admit(acc, policy);
    assert!(first.allowed);
    let before = con.usage(acc);
    let m = con.admit(acc, &peek);
    assert!(!m.allowed, "the slot is taken: {m:?}");
    assert_eq!(m.reason, "concurrency");
    assert_eq!(con.usage(acc), before);
    con.release(acc, &first.lease());
    let before = con.usage(acc);
    for _ in 0..3 {
        assert!(con.admit(acc, &peek).allowed);
    }
    assert_eq!(con.usage(acc), before, "peeks count nothing");
}

#[test]
fn verbose_adds_limits_usage_and_resets() {
    let server = server();
    let mut con = server.client();
    let mut con3 = server.client_resp3();
    con.grant(["acme", "chat", "alice", "*"], "REQUESTS_PER_DAY 5");
    let acc = ["acme", "chat", "alice", "main"];
    let plain = con.admit(acc, "REQUESTS_PER_DAY 2 TOKENS_PER_DAY 100");
    assert!(
        !plain.map.contains_key("limits"),
        "VERBOSE not given: {plain:?}"
    );
    assert!(!plain.map.contains_key("usage") && !plain.map.contains_key("resets"));

    // The plain admit above counted 1; each verbose one counts another.
    for (requests_per_day, resp3, c) in [(2, false, &mut con), (3, true, &mut con3)] {
        let opts = ["REQUESTS_PER_DAY", "2", "TOKENS_PER_DAY", "100", "VERBOSE"];
        let raw = query(c, &with_account("QUOTA.ADMIT", acc, &opts)).expect("ADMIT VERBOSE");
        // The reply must be exactly one well-formed reply: the next command gets its own.
        let pong = query(c, &["PING"]);
        assert!(
            matches!(&pong, Ok(v) if value_to_string(v).as_deref() == Some("PONG")),
            "PING after ADMIT VERBOSE (resp3 {resp3}) got {pong:?}: the VERBOSE reply left \
             extra elements on the connection; reply was {raw:?}"
        );
        if resp3 {
            assert!(
                matches!(raw, Value::Map(_)),
                "RESP3 reply is a map: {raw:?}"
            );
        }
        let m = Admit::parse(raw);
        assert!(m.allowed);
        let limits = m.limits.as_ref().expect("VERBOSE has limits");
        assert_eq!(
            field_i64(limits, "requests_per_day"),
            7,
            "base 2 + credits 5"
        );
        assert_eq!(field_i64(limits, "tokens_per_day"), 100);
        for unlimited in [
            "requests_per_month",
            "total_requests",
            "tokens_per_hour",
            "tokens_per_month",
            "max_concurrent",
        ] {
            assert_eq!(field_i64(limits, unlimited), -1, "{unlimited}: {limits:?}");
        }
        let u = m.usage.expect("VERBOSE has usage");
        assert_eq!(
            (u.requests_per_day, u.tokens_per_day, u.in_flight),
            (requests_per_day, 0, 0),
            "{u:?}"
        );
        let raw_usage = field_map(&m.map, "usage");
        for f in COUNTERS {
            assert!(raw_usage.contains_key(f), "usage lacks {f}: {raw_usage:?}");
        }
        let resets = m.resets.as_ref().expect("VERBOSE has resets");
        assert_resets(["hour_reset", "day_reset", "month_reset"].map(|f| field_i64(resets, f)));
    }
}

// ---------------------------------------------------------------------------
// Leases, commits, releases
// ---------------------------------------------------------------------------

#[test]
fn a_held_lease_admits_again_without_counting_twice() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let opts = "MAX_CONCURRENT 1 LEASE job-42 RESERVE 30";
    let a = con.admit(acc, opts);
    let b = con.admit(acc, opts);
    assert!(a.allowed && b.allowed, "{a:?} / {b:?}");
    assert_eq!(a.lease(), "job-42");
    assert_eq!(b.lease(), "job-42");
    assert_eq!(b.reserved, 30);
    assert_usage!(con, acc, requests_per_day: 1, total_requests: 1, in_flight: 1, reserved: 30);
    // Another lease id is a new request and meets the concurrency limit.
    let c = con.admit(acc, "MAX_CONCURRENT 1 LEASE job-43");
    assert_eq!(c.reason, "concurrency");
}

#[test]
fn commit_settles_the_lease_once() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let m = con.admit(acc, "TOKENS_PER_DAY 1000 RESERVE 300");
    assert_eq!(m.reserved, 300);
    let lease = m.lease();
    assert_usage!(con, acc, reserved: 300, in_flight: 1);

    let c = con.commit(acc, 120, Some(&lease));
    assert_eq!(c.tokens, 120, "{c:?}");
    assert!(!c.duplicate);
    assert!(c.lease_held);
    assert_usage!(con, acc, reserved: 0, in_flight: 0, tokens_per_hour: 120, tokens_per_day: 120, tokens_per_month: 120);

    let again = con.commit(acc, 120, Some(&lease));
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.tokens, 0);
    assert_usage!(con, acc, tokens_per_day: 120, tokens_per_month: 120);

    let plain = con.commit(acc, 50, None);
    assert_eq!(plain.tokens, 50);
    assert!(!plain.duplicate);
    assert!(!plain.lease_held);
    assert_usage!(con, acc, tokens_per_hour: 170, tokens_per_day: 170);

    // A second plain commit counts again: only leases make commits idempotent.
    con.commit(acc, 50, None);
    assert_usage!(con, acc, tokens_per_day: 220, requests_per_day: 1);
    let m = con.admit(acc, "TOKENS_PER_DAY 1000");
    assert_eq!(m.remaining_tokens, 780);
}

#[test]
fn release_refunds_the_request_and_frees_the_slot() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let opts = "MAX_CONCURRENT 1 REQUESTS_PER_DAY 10 RESERVE 10";
    let a = con.admit(acc, opts);
    assert!(a.allowed);
    let lease = a.lease();
    assert_usage!(con, acc, requests_per_day: 1, total_requests: 1, in_flight: 1, reserved: 10);
    assert!(!con.admit(acc, opts).allowed, "slot taken");
    assert_eq!(con.release(acc, &lease), 1);
    assert_usage!(con, acc, requests_per_day: 0, requests_per_month: 0, total_requests: 0, in_flight: 0, reserved: 0);
    assert_eq!(con.release(acc, &lease), 0, "second release");
    assert_eq!(con.release(acc, "never-held"), 0);
    let b = con.admit(acc, opts);
    assert!(b.allowed, "the slot is free again: {b:?}");
    assert_eq!(b.remaining_requests, 9);
}

#[test]
fn an_expired_lease_frees_its_slot() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let opts = "MAX_CONCURRENT 1 LEASE_TTL 1 RESERVE 7";
    let a = con.admit(acc, opts);
    assert!(a.allowed);
    let m = con.admit(acc, opts);
    assert_eq!(m.reason, "concurrency");
    assert_eq!(m.retry_after, 1);
    let freed = wait_until(Duration::from_secs(3), || con.usage(acc).in_flight == 0);
    assert!(freed, "lease with LEASE_TTL 1 still in flight after 3 s");
    assert_usage!(con, acc, reserved: 0, requests_per_day: 1);
    let b = con.admit(acc, opts);
    assert!(b.allowed, "{b:?}");
    assert_ne!(a.lease(), b.lease());
    // The expired lease is gone: releasing it refunds nothing.
    assert_eq!(con.release(acc, &a.lease()), 0);
    assert_usage!(con, acc, requests_per_day: 2);
}

#[test]
fn reset_clears_counters_leases_and_reservations() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let opts = "MAX_CONCURRENT 1 TOKENS_PER_DAY 100 RESERVE 40";
    assert!(con.admit(acc, opts).allowed);
    con.commit(acc, 30, None);
    assert_eq!(con.reset(acc), 1);
    let u = con.usage(acc);
    assert_eq!(u.counters(), [0; 8], "{COUNTERS:?} after RESET: {u:?}");
    // The usage it forgot is still owed to the ledger: the key stays until the flush.
    let key = account_key(acc);
    assert_eq!(query_i64(&mut con, &["EXISTS", &key]), 1);
    assert_eq!(query_i64(&mut con, &["PTTL", &key]), -1);
    let m = con.admit(acc, opts);
    assert!(m.allowed, "slot and tokens free after RESET: {m:?}");
    assert_eq!(m.reserved, 40);
    assert_eq!(con.reset(acc), 1);
    assert_eq!(con.reset(acc), 0);
}

#[test]
fn usage_of_an_unknown_account_is_zero() {
    let server = server();
    let mut con = server.client();
    let acc = ["acme", "chat", "nobody", "main"];
    let u = con.usage(acc);
    assert_eq!(u.counters(), [0; 8], "{COUNTERS:?}: {u:?}");
    assert_resets([u.hour_reset, u.day_reset, u.month_reset]);
    assert_eq!(
        keys(&mut con, "q:*"),
        Vec::<String>::new(),
        "USAGE creates nothing"
    );
}

// ---------------------------------------------------------------------------
// The account key
// ---------------------------------------------------------------------------

#[test]
fn the_account_key_has_its_type_and_a_ttl() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    assert!(con.admit(acc, "REQUESTS_PER_DAY 5").allowed);
    let key = account_key(acc);
    assert_eq!(
        keys(&mut con, "q:*"),
        vec![key.clone()],
        "the documented key name"
    );
    assert_eq!(query_string(&mut con, &["TYPE", &key]), "quota-acc");
    // Until its usage reached the ledger the key does not expire; then it ends with its window.
    assert_eq!(query_i64(&mut con, &["PTTL", &key]), -1);
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "quota.flush-interval", "1"])
        .query(&mut con)
        .unwrap();
    assert!(wait_until(Duration::from_secs(20), || {
        query_i64(&mut con, &["PTTL", &key]) > 0
    }));
    let pttl = query_i64(&mut con, &["PTTL", &key]);
    let month_left_ms = (next_month(now_s()) - now_s() + 1) * 1000;
    assert!(
        pttl > 0 && pttl <= month_left_ms,
        "PTTL {pttl} ms, end of month in {month_left_ms} ms"
    );
    let mem = query_i64(&mut con, &["MEMORY", "USAGE", &key]);
    assert!(
        mem > 0 && mem <= 512,
        "MEMORY USAGE {mem} (the bar: 512 bytes per account)"
    );
    // Leases are part of the value and are counted.
    let busy = ["acme", "chat", "alice", "busy"];
    for _ in 0..50 {
        con.admit(busy, "MAX_CONCURRENT 100 RESERVE 1");
    }
    let busy_mem = query_i64(&mut con, &["MEMORY", "USAGE", &account_key(busy)]);
    assert!(
        busy_mem > mem + 50 * 16,
        "MEMORY USAGE with 50 leases {busy_mem}, without {mem}"
    );

    // Tokens only (hour/day/month windows): still a TTL.
    let tok = ["acme", "chat", "alice", "tokens"];
    con.commit(tok, 10, None);
    assert!(wait_until(Duration::from_secs(20), || {
        query_i64(&mut con, &["PTTL", &account_key(tok)]) > 0
    }));
    let pttl = query_i64(&mut con, &["PTTL", &account_key(tok)]);
    assert!(
        pttl > 0 && pttl <= month_left_ms,
        "PTTL {pttl} after COMMIT"
    );

    // A lifetime limit keeps the count for good.
    let life = ["acme", "chat", "alice", "lifetime"];
    con.admit(life, "TOTAL_REQUESTS 5");
    assert_eq!(query_i64(&mut con, &["PTTL", &account_key(life)]), -1);
}

#[test]
fn an_account_emptied_by_release_or_a_zero_commit_does_not_stay_forever() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let a = con.admit(acc, "LEASE only");
    assert_eq!(con.release(acc, &a.lease()), 1);
    let pttl = query_i64(&mut con, &["PTTL", &account_key(acc)]);
    assert!(
        pttl == -2 || pttl > 0,
        "after RELEASE refunded everything the key must be gone or expiring, PTTL {pttl}"
    );
    let zero = ["acme", "chat", "alice", "zero"];
    con.commit(zero, 0, None);
    let pttl = query_i64(&mut con, &["PTTL", &account_key(zero)]);
    assert!(
        pttl == -2 || pttl > 0,
        "COMMIT 0 on a new account must not leave a key without TTL, PTTL {pttl}"
    );
}

#[test]
fn a_foreign_value_at_the_account_key_is_wrongtype() {
    let (_server, mut con) = server_and_client();
    let acc = ALICE;
    let key = account_key(acc);
    query(&mut con, &["SET", &key, "not-an-account"]).expect("SET");
    for (name, opts) in [
        ("QUOTA.ADMIT", vec!["REQUESTS_PER_DAY", "5"]),
        ("QUOTA.COMMIT", vec!["10"]),
        ("QUOTA.RELEASE", vec!["lease"]),
        ("QUOTA.USAGE", vec![]),
        ("QUOTA.RESET", vec![]),
    ] {
        let err = query_err(&mut con, &with_account(name, acc, &opts));
        assert!(err.starts_with("WRONGTYPE"), "{name}: {err}");
    }
    assert_eq!(query_string(&mut con, &["GET", &key]), "not-an-account");
}

#[test]
fn internal_commands_are_refused_from_clients() {
    let server = server();
    let mut con = server.client();
    let key = account_key(["acme", "chat", "alice", "main"]);
    // A well-formed state (version 1, five empty counters, total_requests 5, no leases) and a
    // well-formed effect (version 1, one request counted at 0 ms): a refusal must come from
    // where the command was sent, not from its payload.
    let mut state = vec![1u8, 0];
    for _ in 0..10 {
        varint(&mut state, 0);
    }
    varint(&mut state, 5);
    varint(&mut state, 0);
    varint(&mut state, 0);
    let state = String::from_utf8(state).expect("ascii state");
    let effect = String::from_utf8(vec![1, 2, 0]).expect("ascii effect");
    for (command, payload) in [("QUOTA.SETSTATE", &state), ("QUOTA.APPLY", &effect)] {
        let err = query_err(&mut con, &[command, &key, payload]);
        assert!(err.starts_with("ERR") && err.contains("internal"), "{err}");
        let script = redis::cmd("EVAL")
            .arg(format!("return redis.call('{command}', KEYS[1], ARGV[1])"))
            .arg(1)
            .arg(&key)
            .arg(payload)
            .query::<Value>(&mut con);
        assert!(script.is_err(), "{command} from a script: {script:?}");
        let mut p = redis::pipe();
        p.atomic().cmd(command).arg(&key).arg(payload);
        let multi = p.query::<Value>(&mut con);
        assert!(multi.is_err(), "{command} inside MULTI: {multi:?}");
        assert_eq!(
            query_i64(&mut con, &["EXISTS", &key]),
            0,
            "nothing was stored"
        );
    }
}

// ---------------------------------------------------------------------------
// Scripts, MULTI, warm and cold users
// ---------------------------------------------------------------------------

#[test]
fn admit_from_eval_and_multi_on_a_warm_user() {
    let server = server();
    let mut con = server.client();
    con.grant(["acme", "chat", "alice", "*"], "REQUESTS_PER_DAY 5");
    let acc = ["acme", "chat", "alice", "main"];
    let v = eval_admit(&mut con, acc, "REQUESTS_PER_DAY 0").expect("EVAL");
    assert!(
        matches!(v, Value::Array(_)),
        "EVAL returns the flat array: {v:?}"
    );
    let m = Admit::parse(v);
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.credit, "global");
    assert!(m.used_credit());
    assert_eq!(m.remaining_requests, 4);
    assert!(m.lease.is_none(), "{m:?}");

    let out = multi_admit(&mut con, acc, "REQUESTS_PER_DAY 0").expect("MULTI/EXEC");
    assert_eq!(out.len(), 2, "{out:?}");
    let m = Admit::parse(out[0].clone());
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.credit, "global");
    let u = Usage::from_map(to_map(out[1].clone()));
    assert_eq!(u.requests_per_day, 2, "{u:?}");
}

#[test]
fn admit_from_eval_and_multi_on_a_cold_user_decides_on_the_base_policy() {
    let server = server();
    let mut con = server.client();
    let acc = ["acme", "chat", "bob", "main"];
    con.grant(["acme", "chat", "bob", "*"], "REQUESTS_PER_DAY 5");
    con.invalidate([acc[0], acc[1], acc[2]]);

    let m = Admit::parse(eval_admit(&mut con, acc, "REQUESTS_PER_DAY 1").expect("EVAL"));
    assert!(m.allowed, "base policy allows one: {m:?}");
    assert_eq!(m.credit, "pending");
    assert!(!m.used_credit());
    assert_eq!(m.remaining_requests, 0, "base policy only: {m:?}");

    // The miss started a background load: scripts soon see the credits.
    let mut last = None;
    let loaded = wait_until(Duration::from_secs(10), || {
        let m = Admit::parse(eval_admit(&mut con, acc, "REQUESTS_PER_DAY 1 PEEK").expect("EVAL"));
        last.insert(m).credit == "global"
    });
    assert!(loaded, "credits never loaded after a script miss: {last:?}");
    let last = last.expect("one EVAL ran");
    assert!(last.allowed);
    assert_eq!(last.remaining_requests, 5);
    let m = con.admit(acc, "REQUESTS_PER_DAY 1");
    assert!(m.allowed);
    assert_eq!(m.credit, "global");
    assert!(m.used_credit());

    // MULTI on another cold user: denied on the base policy, pending.
    let carol = ["acme", "chat", "carol", "main"];
    con.grant(["acme", "chat", "carol", "*"], "REQUESTS_PER_DAY 3");
    con.invalidate([carol[0], carol[1], carol[2]]);
    let out = multi_admit(&mut con, carol, "REQUESTS_PER_DAY 0").expect("MULTI/EXEC");
    let m = Admit::parse(out[0].clone());
    assert!(!m.allowed, "base policy 0 denies: {m:?}");
    assert_eq!(m.reason, "requests_per_day");
    assert_eq!(m.credit, "pending");
    // Not midnight: the credits loading now may admit the very next call.
    let wait = m.retry_after;
    assert!(
        (0..=2).contains(&wait),
        "retry_after {wait} while credits load"
    );
    let u = Usage::from_map(to_map(out[1].clone()));
    assert_eq!(u.requests_per_day, 0, "{u:?}");
    let mut last = None;
    let loaded = wait_until(Duration::from_secs(10), || {
        let out = multi_admit(&mut con, carol, "REQUESTS_PER_DAY 0 PEEK").expect("MULTI");
        last.insert(Admit::parse(out[0].clone())).credit == "global"
    });
    assert!(loaded, "credits never loaded after a MULTI miss: {last:?}");
    let m = con.admit(carol, "REQUESTS_PER_DAY 0");
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.credit, "global");
}

#[test]
fn script_miss_error_replies_tryagain_to_a_cold_user() {
    let server = server();
    let mut con = server.client();
    query(&mut con, &["CONFIG", "SET", "quota.script-miss", "error"]).expect("CONFIG SET");
    let acc = ["acme", "chat", "dave", "main"];
    con.grant(["acme", "chat", "dave", "*"], "REQUESTS_PER_DAY 5");
    con.invalidate([acc[0], acc[1], acc[2]]);

    let err = eval_admit(&mut con, acc, "REQUESTS_PER_DAY 0").expect_err("TRYAGAIN");
    let text = error_text(&err);
    assert!(text.starts_with("TRYAGAIN"), "{text}");
    assert_usage!(con, acc, requests_per_day: 0);

    // Retrying shortly succeeds: the miss started the load.
    let mut last: redis::RedisResult<Value> = Err(err);
    let ok = wait_until(Duration::from_secs(10), || {
        last = eval_admit(&mut con, acc, "REQUESTS_PER_DAY 0");
        last.is_ok()
    });
    assert!(ok, "still failing: {last:?}");
    let m = Admit::parse(last.expect("EVAL"));
    assert!(m.allowed);
    assert_eq!(m.credit, "global");

    // MULTI on a cold user: TRYAGAIN too, and nothing counted.
    let erin = ["acme", "chat", "erin", "main"];
    con.grant(["acme", "chat", "erin", "*"], "REQUESTS_PER_DAY 5");
    con.invalidate([erin[0], erin[1], erin[2]]);
    let err = multi_admit(&mut con, erin, "REQUESTS_PER_DAY 0").expect_err("TRYAGAIN");
    assert!(error_text(&err).contains("TRYAGAIN"), "{err:?}");
    assert_usage!(con, erin, requests_per_day: 0);
}

#[test]
fn a_cold_user_outside_scripts_waits_for_the_credits() {
    let server = server();
    let mut con = server.client();
    let acc = ["acme", "chat", "frank", "main"];
    con.grant(["acme", "chat", "frank", "*"], "REQUESTS_PER_DAY 5");
    con.invalidate([acc[0], acc[1], acc[2]]);
    let misses = |s: &RedisServer| -> i64 {
        s.info("quota")
            .get("quota_cache_misses")
            .and_then(|v| v.parse().ok())
            .expect("quota_cache_misses")
    };
    let before = misses(&server);
    let started = Instant::now();
    let m = con.admit(acc, "REQUESTS_PER_DAY 0");
    let took = started.elapsed();
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.credit, "global");
    assert!(m.used_credit());
    assert!(misses(&server) > before, "the admit was not a cache miss");
    assert!(took < Duration::from_millis(2250), "blocked {took:?}");
}

#[test]
fn generated_lease_ids_are_unique() {
    let server = server();
    let mut con = server.client();
    let mut p = redis::pipe();
    let bundles = ["b0", "b1", "b2", "b3"];
    for i in 0..1000 {
        p.add_command(cmd(&with_account(
            "QUOTA.ADMIT",
            ["acme", "chat", "alice", bundles[i % 4]],
            &["MAX_CONCURRENT", "1000"],
        )));
    }
    let replies: Vec<Value> = p.query(&mut con).expect("pipeline");
    assert_eq!(replies.len(), 1000);
    let leases: HashSet<String> = replies
        .into_iter()
        .map(|v| {
            let m = Admit::parse(v);
            assert!(m.allowed, "{m:?}");
            m.lease()
        })
        .collect();
    assert_eq!(leases.len(), 1000, "generated lease ids repeat");
}
