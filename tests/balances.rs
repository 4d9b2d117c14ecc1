//! Prepaid balances and the usage ledger, against a real `redis-server` with the module and
//! the shared PostgreSQL (one schema per test).
//!
//! What a user would notice: a balance pays exactly what it holds under concurrency, top-ups
//! count once per purchase id, the hourly ledger in PostgreSQL equals what was admitted and
//! committed, `QUOTA.HISTORY` shows it, and a `kill -9` loses at most one flush interval while
//! never counting anything twice.
mod common;

use std::time::Duration;

use common::*;

const T: &str = "acme";
const P: &str = "chat";

fn left(con: &mut redis::Connection, acc: [&str; 4], field: &str) -> i64 {
    field_i64(&con.get(acc).expect("a record"), field)
}

/// 20 clients admit (with leases), reserve, commit and release at once against a balance of
/// 300 requests and 5,000 tokens beyond windows of 0: exactly 300 requests are paid, what was
/// committed is debited exactly, nothing goes below zero, and then the reason says `balance`.
#[test]
fn burn_down_is_exact_under_concurrency() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    let acc = [T, P, "alice", "web"];
    con.grant(
        [T, P, "alice", "*"],
        ["REQUESTS_BALANCE", "300", "TOKENS_BALANCE", "5000"],
    );
    let workers: Vec<_> = (0..20)
        .map(|w| {
            let url = env.server.url();
            std::thread::spawn(move || {
                let mut con = redis::Client::open(url).unwrap().get_connection().unwrap();
                let (mut admitted, mut released, mut committed) = (0i64, 0i64, 0i64);
                for i in 0.. {
                    let lease = format!("w{w}-{i}");
                    let r = con.admit(
                        acc,
                        [
                            "REQUESTS_PER_DAY",
                            "0",
                            "TOKENS_PER_DAY",
                            "0",
                            "LEASE",
                            &lease,
                            "RESERVE",
                            "20",
                        ],
                    );
                    if !r.allowed {
                        assert!(r.reason.contains("balance"), "{r:?}");
                        break;
                    }
                    assert_eq!(r.paid_by, "balance");
                    admitted += 1;
                    if i % 5 == 4 {
                        assert_eq!(con.release(acc, &lease), 1);
                        released += 1;
                    } else {
                        // Never more than reserved: the balance cannot be overdrawn.
                        let used = r.reserved.min(7);
                        con.commit(acc, used, Some(&lease));
                        committed += used;
                    }
                }
                (admitted, released, committed)
            })
        })
        .collect();
    let (mut admitted, mut released, mut committed) = (0, 0, 0);
    for w in workers {
        let (a, r, c) = w.join().unwrap();
        admitted += a;
        released += r;
        committed += c;
    }
    // Requests: 300 paid, the released ones refunded and spent again.
    assert_eq!(
        admitted - released,
        300,
        "admitted {admitted}, released {released}"
    );
    let record = con.get([T, P, "alice", "web"]).unwrap();
    assert_eq!(field_i64(&record, "requests_balance_left"), 0);
    assert_eq!(
        field_i64(&record, "tokens_balance_left"),
        5000 - committed,
        "committed {committed}"
    );
    assert!(committed <= 5000);
    // The ledger: every paid request and committed token, once.
    env.flushed();
    assert_eq!(env.ledger("alice", "requests"), 300);
    assert_eq!(env.ledger("alice", "tokens"), committed);
    assert_eq!(env.ledger("alice", "requests_debited"), 300);
    assert_eq!(env.ledger("alice", "tokens_debited"), committed);
    assert_eq!(
        env.sql_i64(
            "SELECT requests_balance_used - requests_balance_base FROM {t} \
             WHERE user_id = 'alice' AND bundle_id = '*'"
        ),
        300
    );
    // After the flush the balance still reads the same (debits now counted as flushed).
    assert_eq!(left(&mut con, acc, "requests_balance_left"), 0);
    assert_eq!(left(&mut con, acc, "tokens_balance_left"), 5000 - committed);
}

/// A credit row read from PostgreSQL after a flush committed the balance's debits, but before
/// the node acknowledged the batch (the next 100 ms tick), counts those debits once: the
/// balance left never dips by the batch in flight. Each round debits 5 requests and then
/// reloads the row (`QUOTA.INVALIDATE` + `QUOTA.GET`) until the batch is acknowledged; the
/// rounds go on until a reload landed in that window three times.
#[test]
fn a_row_reloaded_while_its_flush_is_unacknowledged_counts_it_once() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    let acc = [T, P, "alice", "*"];
    con.grant(acc, ["REQUESTS_BALANCE", "1000"]);
    let (mut debited, mut windows) = (0i64, 0);
    for _round in 0..40 {
        if windows >= 3 {
            break;
        }
        let acked = info_i64(&env.server, "quota_ledger_batches");
        for _ in 0..5 {
            let r = con.admit(acc, ["REQUESTS_PER_DAY", "0"]);
            assert_eq!(r.paid_by, "balance", "{r:?}");
        }
        debited += 5;
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            con.invalidate([T, P, "alice"]);
            let record = con.get(acc).expect("a record");
            let now_acked = info_i64(&env.server, "quota_ledger_batches");
            assert_eq!(
                field_i64(&record, "requests_balance_left"),
                1000 - debited,
                "{record:?}"
            );
            // The row counts the batch and the node had not acknowledged it after the read.
            if field_i64(&record, "requests_balance_debited") == debited && now_acked == acked {
                windows += 1;
            }
            if now_acked > acked {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no flush in 10 s");
        }
    }
    assert!(
        windows >= 1,
        "no reload landed between a commit and its acknowledgement"
    );
    env.flushed();
    assert_eq!(env.ledger("alice", "requests_debited"), debited);
    assert_eq!(left(&mut con, acc, "requests_balance_left"), 1000 - debited);
}

/// A top-up with a purchase id counts once, however often it is retried; windows pay first.
#[test]
fn top_ups_count_once_and_windows_pay_first() {
    let (_env, mut con) = TestEnv::start_con(&[]);
    let acc = [T, P, "bob", "web"];
    con.grant(acc, ["REQUESTS_BALANCE", "2"]);
    for _ in 0..3 {
        let r = con.grant(acc, ["REQUESTS_BALANCE", "5", "ADD", "PURCHASE", "order-1"]);
        assert_eq!(field_i64(&r, "requests_balance"), 7);
    }
    // Two requests a day from the policy, then seven from the balance, then denied.
    let mut paid = Vec::new();
    for _ in 0..10 {
        let r = query(
            &mut con,
            &with_account("QUOTA.ADMIT", acc, &["REQUESTS_PER_DAY", "2", "COMPACT"]),
        )
        .unwrap();
        let items = to_array(r);
        assert_eq!(items.len(), 10);
        paid.push(value_to_string(&items[8]).unwrap());
    }
    let expected: Vec<&str> = ["windows"; 2]
        .into_iter()
        .chain(["balance"; 7])
        .chain([""])
        .collect();
    assert_eq!(paid, expected);
    assert_eq!(left(&mut con, acc, "requests_balance_left"), 0);
    let r = con.admit(acc, ["REQUESTS_PER_DAY", "2"]);
    assert_eq!(r.reason, "requests_per_day|balance");
    // Another top-up pays again.
    con.grant(acc, ["REQUESTS_BALANCE", "1", "ADD", "PURCHASE", "order-2"]);
    assert!(con.admit(acc, ["REQUESTS_PER_DAY", "2"]).allowed);
}

/// `QUOTA.HISTORY` reads the hourly rows the flush wrote.
#[test]
fn history_shows_the_hourly_rows() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    let acc = [T, P, "carol", "web"];
    for _ in 0..4 {
        con.admit(acc, "");
    }
    con.commit(acc, 123, None);
    env.flushed();
    let rows = to_array(query(&mut con, &with_account("QUOTA.HISTORY", acc, &[])).unwrap());
    assert_eq!(rows.len(), 1);
    let row = to_map(rows[0].clone());
    assert_eq!(field_i64(&row, "requests"), 4);
    assert_eq!(field_i64(&row, "tokens"), 123);
    assert_eq!(field_i64(&row, "hour") % 3600, 0);
    let later = (now_s() + 7200).to_string();
    let none = query(
        &mut con,
        &with_account("QUOTA.HISTORY", acc, &["FROM", &later]),
    )
    .unwrap();
    assert!(to_array(none).is_empty());
}

/// `QUOTA.RESET` forgets the counters and leases, but the usage it forgets happened: it is
/// still flushed to the ledger, and the key goes once the ledger has it.
#[test]
fn a_reset_still_bills_the_usage_it_forgets() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "3600")]);
    let acc = [T, P, "dave", "web"];
    for _ in 0..3 {
        assert!(con.admit(acc, "LEASE_TTL 60 MAX_CONCURRENT 10").allowed);
    }
    con.commit(acc, 40, None);
    assert_eq!(con.reset(acc), 1);
    let usage = con.usage(acc);
    assert_eq!(
        (
            usage.requests_per_day,
            usage.tokens_per_day,
            usage.in_flight
        ),
        (0, 0, 0)
    );
    let key = account_key(acc);
    assert_eq!(
        query_i64(&mut con, &["EXISTS", &key]),
        1,
        "kept until flushed"
    );
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "1"]).unwrap();
    env.flushed();
    assert_eq!(env.ledger("dave", "requests"), 3);
    assert_eq!(env.ledger("dave", "tokens"), 40);
    assert!(
        wait_until(Duration::from_secs(5), || query_i64(
            &mut con,
            &["EXISTS", &key]
        ) == 0),
        "the reset key stays after its usage was flushed"
    );
    // A reset of an account with nothing owed deletes it at once.
    assert!(con.admit(acc, "").allowed);
    env.flushed();
    assert_eq!(con.reset(acc), 1);
    assert_eq!(query_i64(&mut con, &["EXISTS", &key]), 0);
    assert_eq!(con.reset(acc), 0);
}

/// Usage not flushed yet follows its value: to the new name after `RENAME`, and back after a
/// `DUMP`, `DEL` and `RESTORE` (a migration); a `COPY` owes the ledger nothing (the source
/// still does), so nothing is billed twice or to an account that did not use it.
#[test]
fn unflushed_usage_follows_rename_and_restore_and_is_not_copied() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "3600")]);
    let (from, to, copy, moved) = (
        [T, P, "erin", "web"],
        [T, P, "frank", "web"],
        [T, P, "grace", "web"],
        [T, P, "heidi", "web"],
    );
    for _ in 0..3 {
        assert!(con.admit(from, "").allowed);
    }
    let (from_key, to_key) = (account_key(from), account_key(to));
    query(&mut con, &["RENAME", &from_key, &to_key]).unwrap();
    query(&mut con, &["COPY", &to_key, &account_key(copy)]).unwrap();
    for _ in 0..2 {
        assert!(con.admit(moved, "").allowed);
    }
    let moved_key = account_key(moved);
    let dump: Vec<u8> = redis::cmd("DUMP").arg(&moved_key).query(&mut con).unwrap();
    query(&mut con, &["DEL", &moved_key]).unwrap();
    redis::cmd("RESTORE")
        .arg(&moved_key)
        .arg(0)
        .arg(dump)
        .query::<()>(&mut con)
        .unwrap();
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "1"]).unwrap();
    env.flushed();
    let billed: Vec<i64> = ["erin", "frank", "grace", "heidi"]
        .iter()
        .map(|u| env.ledger(u, "requests"))
        .collect();
    assert_eq!(billed, [0, 3, 0, 2], "erin, frank, grace, heidi");
}

/// A key renamed away and back within one interval is listed under its name twice: it is
/// still billed once, and what it does after the flush is billed exactly too.
#[test]
fn a_key_renamed_away_and_back_is_billed_once() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "3600")]);
    // The node's first tick rebuilds the list from the keyspace (which lists each key once):
    // what this test lists comes after it.
    std::thread::sleep(Duration::from_millis(500));
    let (acc, other) = ([T, P, "ivan", "web"], [T, P, "judy", "web"]);
    for _ in 0..4 {
        assert!(con.admit(acc, "").allowed);
    }
    let (key, other_key) = (account_key(acc), account_key(other));
    query(&mut con, &["RENAME", &key, &other_key]).unwrap();
    query(&mut con, &["RENAME", &other_key, &key]).unwrap();
    assert!(con.admit(acc, "").allowed);
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "1"]).unwrap();
    env.flushed();
    assert_eq!(
        (
            env.ledger("ivan", "requests"),
            env.ledger("judy", "requests")
        ),
        (5, 0)
    );
    for _ in 0..2 {
        assert!(con.admit(acc, "").allowed);
    }
    env.flushed();
    assert_eq!(
        (
            env.ledger("ivan", "requests"),
            env.ledger("judy", "requests")
        ),
        (7, 0)
    );
}

/// `kill -9` between flushes: what was flushed stays, nothing is counted twice, the loss is
/// at most what happened since the last flush, and the balance is right after the restart
/// (AOF `everysec`, as the README recommends).
#[test]
fn kill_9_loses_at_most_one_interval_and_never_counts_twice() {
    let (mut env, mut con) = TestEnv::start_con(&[("flush-interval", "2")]);
    let _: () = redis::cmd("CONFIG")
        .arg(&["SET", "appendonly", "yes", "appendfsync", "always"])
        .query(&mut con)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let acc = [T, P, "dave", "web"];
    con.grant(acc, ["REQUESTS_BALANCE", "1000"]);
    for _ in 0..50 {
        con.admit(acc, ["REQUESTS_PER_DAY", "0"]);
    }
    env.flushed();
    assert_eq!(env.ledger("dave", "requests"), 50);
    for _ in 0..30 {
        con.admit(acc, ["REQUESTS_PER_DAY", "0"]);
    }
    env.server.kill9();
    env.server.restart();
    let mut con = env.con();
    // The restarted master flushes what the AOF had and was not flushed: nothing twice.
    wait_until(Duration::from_secs(20), || {
        env.ledger("dave", "requests") >= 80
    });
    env.flushed();
    let requests = env.ledger("dave", "requests");
    // Lost at most what came after the last flush (the 30), never counted twice.
    assert!((50..=80).contains(&requests), "{requests}");
    let debited = env.ledger("dave", "requests_debited");
    assert_eq!(debited, requests);
    // The balance after the restart is what PostgreSQL has billed.
    assert_eq!(left(&mut con, acc, "requests_balance_left"), 1000 - debited);
    // A restart replaying the same AOF again counts nothing more.
    env.server.kill9();
    env.server.restart();
    let mut con = env.con();
    env.flushed();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(env.ledger("dave", "requests"), requests);
    assert_eq!(left(&mut con, acc, "requests_balance_left"), 1000 - debited);
}

/// PostgreSQL stopped during flushes: the changes wait, then arrive once.
#[test]
fn a_stopped_postgresql_delays_the_ledger_and_loses_nothing() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = RedisServer::builder()
        .module_args(&[
            ("pg-url", &pg.url()),
            ("schema", &schema),
            ("pg-timeout-ms", "500"),
            ("flush-interval", "1"),
        ])
        .start();
    let mut con = server.client();
    let acc = [T, P, "erin", "web"];
    con.admit(acc, "");
    wait_ledger_flushed(&server, Duration::from_secs(20));
    pg.stop();
    for _ in 0..9 {
        con.admit(acc, "");
    }
    con.commit(acc, 40, None);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(info_i64(&server, "quota_ledger_accounts_pending"), 1);
    assert!(info_i64(&server, "quota_ledger_flush_errors") > 0);
    pg.start();
    wait_ledger_flushed(&server, Duration::from_secs(30));
    let sum = |c: &str| -> i64 {
        sql_i64(
            &pg.url(),
            &schema,
            &format!("SELECT coalesce(sum({c}), 0) FROM {{h}} WHERE user_id = 'erin'"),
        )
    };
    assert_eq!(sum("requests"), 10);
    assert_eq!(sum("tokens"), 40);
}

/// The deploy upgrades today's tables in place: rows granted before keep their values and
/// gain the balance columns.
#[test]
fn the_schema_upgrades_in_place() {
    let pg = PgServer::shared();
    let schema = unique_schema();
    let old = "CREATE SCHEMA {s}; CREATE TABLE {s}.user_quota_replenishment ( \
        tenant VARCHAR(255) NOT NULL, project VARCHAR(255) NOT NULL, \
        user_id VARCHAR(255) NOT NULL, bundle_id VARCHAR(255) NOT NULL, \
        additional_requests_per_day INT NULL, additional_requests_per_month INT NULL, \
        additional_total_requests INT NULL, additional_max_concurrent INT NULL, \
        additional_tokens_per_hour BIGINT NULL, additional_tokens_per_day BIGINT NULL, \
        additional_tokens_per_month BIGINT NULL, expires_at TIMESTAMPTZ NULL, \
        purchase_id VARCHAR(255) NULL, purchase_amount_usd NUMERIC(10,2) NULL, \
        purchase_notes TEXT NULL, active BOOLEAN NOT NULL DEFAULT TRUE, \
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(), updated_at TIMESTAMPTZ NOT NULL DEFAULT now(), \
        PRIMARY KEY (tenant, project, user_id, bundle_id)); \
        INSERT INTO {s}.user_quota_replenishment (tenant, project, user_id, bundle_id, \
        additional_requests_per_day) VALUES ('acme', 'chat', 'frank', '*', 5);"
        .replace("{s}", &schema);
    psql(&pg, &old);
    let server = test_server(&schema);
    let mut con = server.client();
    let acc = [T, P, "frank", "web"];
    assert!(wait_until(Duration::from_secs(20), || {
        query(&mut con, &with_account("QUOTA.GET", acc, &[]))
            .ok()
            .and_then(try_to_map)
            .is_some_and(|m| field_is_nil(&m, "requests_balance"))
    }));
    let r = con.grant([T, P, "frank", "*"], ["TOKENS_BALANCE", "10", "ADD"]);
    assert_eq!(field_i64(&r, "requests_per_day"), 5);
    assert_eq!(field_i64(&r, "tokens_balance"), 10);
    assert_eq!(left(&mut con, acc, "tokens_balance_left"), 10);
}
