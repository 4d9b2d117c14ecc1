//! `QUOTA.ADMIT ... COST n` against real servers on the shared PostgreSQL:
//!
//! * a cost of n counts n in a per-day window and in a request rate, `PEEK COST n` tells
//!   whether n fits without counting, and a cost that can never fit says so (`retry_after` -1);
//! * a requests balance pays a whole cost (`requests_balance_left` drops by n), and the hourly
//!   ledger in PostgreSQL holds n per admission (`requests`, `requests_debited`);
//! * `QUOTA.RELEASE` gives back what the lease's admission took: its cost in the window, the
//!   rate and the ledger, and what its own or the `'*'` balance paid;
//! * `COST 0` is a free probe: admitted past spent request limits, it never counts nor takes a
//!   slot (no key is even created);
//! * a replica ends with the master's state, byte for byte;
//! * a lease's cost survives `DUMP`/`RESTORE` and a restart from the RDB.
//!
//! Rates per minute keep these tests free of timing: nothing they assert drains in a minute.
mod common;

use std::time::Duration;

use common::*;

const T: &str = "acme";
const P: &str = "chat";

fn acc(user: &str) -> [&str; 4] {
    [T, P, user, "web"]
}

#[test]
fn a_cost_counts_n_in_a_day_window_and_a_rate_and_peek_tells_whether_it_fits() {
    let (_schema, _server, mut con) = test_server_con();
    let day = "REQUESTS_PER_DAY 10";
    let a = con.admit(acc("d"), format!("{day} COST 4"));
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.remaining_requests, 6);
    assert_eq!(con.usage(acc("d")).requests_per_day, 4);
    // PEEK tells whether 6, then 7, would fit, and counts nothing.
    assert!(con.admit(acc("d"), format!("{day} COST 6 PEEK")).allowed);
    let peek = con.admit(acc("d"), format!("{day} COST 7 PEEK"));
    assert_eq!(peek.reason, "requests_per_day", "{peek:?}");
    assert_eq!(con.usage(acc("d")).requests_per_day, 4);
    let denied = con.admit(acc("d"), format!("{day} COST 7 COMPACT"));
    assert_eq!(denied.reason, "requests_per_day");
    assert!(denied.retry_after > 0, "until the day ends: {denied:?}");
    let a = con.admit(acc("d"), format!("{day} COST 6"));
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.remaining_requests, 0);
    let u = con.usage(acc("d"));
    assert_eq!((u.requests_per_day, u.total_requests), (10, 10));
    // More than the limit never fits.
    let never = con.admit(acc("n"), format!("{day} COST 11"));
    assert_eq!(never.reason, "requests_per_day");
    assert_eq!((never.retry_after, never.retry_after_ms), (-1, -1));

    // A request rate: a cost of 6 takes 6 of a burst of 10 (one back every 6 s).
    let rpm = "REQUESTS_PER_MINUTE 10";
    let a = con.admit(acc("r"), format!("{rpm} COST 6"));
    assert!(a.allowed, "{a:?}");
    assert_eq!(a.remaining_requests, 4);
    // One request drains every 6 s.
    assert!((5..=6).contains(&con.usage(acc("r")).rates[1]));
    // 6 more wait for 2 more to come back: at most 12 s.
    let denied = con.admit(acc("r"), format!("{rpm} COST 6"));
    assert_eq!(denied.reason, "requests_per_minute", "{denied:?}");
    assert!((1..=12_000).contains(&denied.retry_after_ms), "{denied:?}");
    assert!(con.admit(acc("r"), format!("{rpm} COST 4")).allowed);
    // More than the burst never fits.
    let never = con.admit(acc("rn"), format!("{rpm} COST 11"));
    assert_eq!((never.retry_after, never.retry_after_ms), (-1, -1));
    assert_eq!(
        query_i64(&mut con, &["EXISTS", &account_key(acc("rn"))]),
        0,
        "a denial stores nothing"
    );
}

#[test]
fn a_balance_pays_a_whole_cost_and_the_ledger_counts_n_per_admission() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    // Windows pay: 4 admissions of 5.
    for _ in 0..4 {
        let a = con.admit(acc("win"), "REQUESTS_PER_DAY 100 COST 5");
        assert_eq!(a.paid_by, "windows", "{a:?}");
    }
    // A balance of 10 beyond a window of 0: 3 + 3 + 3 paid, then 3 more find 1 left.
    con.grant(acc("bal"), "REQUESTS_BALANCE 10");
    let left = |con: &mut redis::Connection| {
        field_i64(
            &con.get(acc("bal")).expect("a record"),
            "requests_balance_left",
        )
    };
    for expected in [7, 4, 1] {
        let a = con.admit(acc("bal"), "REQUESTS_PER_DAY 0 COST 3");
        assert_eq!(a.paid_by, "balance", "{a:?}");
        assert_eq!(left(&mut con), expected);
    }
    let spent = con.admit(acc("bal"), "REQUESTS_PER_DAY 0 COST 3");
    assert_eq!(spent.reason, "requests_per_day|balance", "{spent:?}");
    assert_eq!(left(&mut con), 1);
    assert_eq!(
        con.admit(acc("bal"), "REQUESTS_PER_DAY 0 COST 1").paid_by,
        "balance"
    );
    assert_eq!(left(&mut con), 0);
    // A free probe needs no balance.
    assert!(con.admit(acc("bal"), "REQUESTS_PER_DAY 0 COST 0").allowed);
    env.flushed();
    assert_eq!(env.ledger("win", "requests"), 20);
    assert_eq!(env.ledger("bal", "requests"), 10);
    assert_eq!(env.ledger("bal", "requests_debited"), 10);
    // What PostgreSQL holds is what the balance says is left.
    assert_eq!(left(&mut con), 0);
    let history =
        query(&mut con, &with_account("QUOTA.HISTORY", acc("win"), &[])).expect("HISTORY");
    let rows = to_array(history);
    let requests: i64 = rows
        .into_iter()
        .map(|r| field_i64(&to_map(r), "requests"))
        .sum();
    assert_eq!(requests, 20);
}

#[test]
fn a_release_gives_back_what_its_admission_took() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    let opts = "REQUESTS_PER_DAY 10 REQUESTS_PER_MINUTE 10";
    con.admit(acc("rel"), format!("{opts} COST 1"));
    let a = con.admit(acc("rel"), format!("{opts} COST 8 LEASE l"));
    assert!(a.allowed, "{a:?}");
    let u = con.usage(acc("rel"));
    assert_eq!((u.requests_per_day, u.in_flight), (9, 1));
    // One request drains every 6 s.
    assert!((8..=9).contains(&u.rates[1]), "{u:?}");
    assert!(!con.admit(acc("rel"), format!("{opts} COST 2")).allowed);
    assert_eq!(con.release(acc("rel"), "l"), 1);
    let u = con.usage(acc("rel"));
    assert_eq!((u.requests_per_day, u.total_requests), (1, 1));
    assert!(u.rates[1] <= 1, "{u:?}");
    assert_eq!(u.in_flight, 0);
    // Released twice: nothing more.
    assert_eq!(con.release(acc("rel"), "l"), 0);
    assert!(con.admit(acc("rel"), format!("{opts} COST 8")).allowed);

    // A lease its own balance paid for.
    con.grant(acc("own"), "REQUESTS_BALANCE 5");
    let a = con.admit(acc("own"), "REQUESTS_PER_DAY 0 COST 4 LEASE b");
    assert_eq!(a.paid_by, "balance");
    let left = |con: &mut redis::Connection, acc| {
        field_i64(&con.get(acc).expect("a record"), "requests_balance_left")
    };
    assert_eq!(left(&mut con, acc("own")), 1);
    assert_eq!(con.release(acc("own"), "b"), 1);
    assert_eq!(left(&mut con, acc("own")), 5);

    // A lease the user's '*' balance paid for (held on the '*' account).
    con.grant([T, P, "star", "*"], "REQUESTS_BALANCE 5");
    let a = con.admit(acc("star"), "REQUESTS_PER_DAY 0 COST 4 LEASE s");
    assert_eq!(a.paid_by, "balance");
    assert_eq!(left(&mut con, acc("star")), 1);
    assert_eq!(con.release(acc("star"), "s"), 1);
    assert_eq!(left(&mut con, acc("star")), 5);

    env.flushed();
    assert_eq!(env.ledger("rel", "requests"), 9, "1 + 8 released + 8");
    assert_eq!(env.ledger("own", "requests"), 0);
    assert_eq!(env.ledger("own", "requests_debited"), 0);
    assert_eq!(env.ledger("star", "requests_debited"), 0);
}

#[test]
fn a_free_probe_never_counts_nor_takes_a_slot() {
    let (_schema, _server, mut con) = test_server_con();
    // A fresh user: admitted, and no key is created.
    let probe = con.admit(acc("p"), "REQUESTS_PER_DAY 0 REQUESTS_PER_MINUTE 0 COST 0");
    assert!(probe.allowed, "{probe:?}");
    assert_eq!(query_i64(&mut con, &["EXISTS", &account_key(acc("p"))]), 0);
    // Every request limit spent and the one slot held.
    let opts = "REQUESTS_PER_DAY 1 TOTAL_REQUESTS 1 REQUESTS_PER_MINUTE 1 MAX_CONCURRENT 1";
    let first = con.admit(acc("q"), opts);
    assert!(first.allowed && first.lease.is_some(), "{first:?}");
    let key = account_key(acc("q"));
    let before = query(&mut con, &["DUMP", &key]).expect("DUMP");
    for _ in 0..3 {
        let probe = con.admit(acc("q"), format!("{opts} COST 0"));
        assert!(probe.allowed, "{probe:?}");
        assert_eq!((probe.lease, probe.remaining_requests), (None, 0));
    }
    assert_eq!(query(&mut con, &["DUMP", &key]).expect("DUMP"), before);
    let u = con.usage(acc("q"));
    assert_eq!(
        (u.requests_per_day, u.total_requests, u.in_flight),
        (1, 1, 1)
    );
    // A probe that asks for a lease needs a slot.
    let leased = con.admit(acc("q"), format!("{opts} COST 0 LEASE probe"));
    assert_eq!(leased.reason, "concurrency", "{leased:?}");
    // A real request is still denied.
    let real = con.admit(acc("q"), opts);
    assert!(!real.allowed, "{real:?}");
}

/// Module arguments: no ledger flush during the test (its acknowledgement would change the
/// state between two `DUMP`s).
fn builder(schema: &str) -> RedisBuilder {
    let url = PgServer::shared();
    RedisServer::builder().module_args(&[
        ("pg-url", url.as_str()),
        ("schema", schema),
        ("pg-timeout-ms", "2000"),
        ("flush-interval", "3600"),
    ])
}

fn dump(con: &mut redis::Connection, acc: [&str; 4]) -> Value {
    query(con, &["DUMP", &account_key(acc)]).expect("DUMP")
}

#[test]
fn a_replica_ends_with_the_masters_state() {
    let schema = unique_schema();
    let master = builder(&schema).conf("repl-diskless-sync-delay 0").start();
    let replica = builder(&schema).replica_of(&master).start();
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    let (mut m, mut r) = (master.client(), replica.client());
    let opts = "REQUESTS_PER_DAY 100 REQUESTS_PER_MINUTE 50";
    m.admit(acc("a"), format!("{opts} COST 3"));
    m.admit(acc("a"), format!("{opts} COST 7 LEASE kept"));
    m.admit(acc("a"), format!("{opts} COST 5 LEASE gone"));
    assert_eq!(m.release(acc("a"), "gone"), 1);
    m.admit(acc("a"), format!("{opts} COST 0 LEASE free"));
    m.admit(acc("a"), format!("{opts} COST 0"));
    // Balances, the bundle's own and the user's '*' one.
    m.grant(acc("b"), "REQUESTS_BALANCE 20");
    m.grant([T, P, "b", "*"], "REQUESTS_BALANCE 20");
    m.admit(acc("b"), "REQUESTS_PER_DAY 0 COST 4 LEASE x");
    m.admit([T, P, "b", "mobile"], "REQUESTS_PER_DAY 0 COST 6 LEASE y");
    m.admit([T, P, "b", "mobile"], "REQUESTS_PER_DAY 0 COST 2 LEASE z");
    assert_eq!(m.release([T, P, "b", "mobile"], "z"), 1);
    assert_eq!(query_i64(&mut m, &["WAIT", "1", "1000"]), 1);
    for account in [acc("a"), acc("b"), [T, P, "b", "mobile"], [T, P, "b", "*"]] {
        assert_eq!(
            dump(&mut m, account),
            dump(&mut r, account),
            "{account:?}: the replica's state is the master's"
        );
    }
    let u = r.usage(acc("a"));
    assert_eq!((u.requests_per_day, u.in_flight), (10, 2));
    assert_eq!(r.usage([T, P, "b", "mobile"]).requests_per_day, 6);
    // The replica, promoted, gives back a replicated lease's cost.
    query(&mut r, &["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    assert_eq!(r.release(acc("a"), "kept"), 1);
    assert_eq!(r.usage(acc("a")).requests_per_day, 3);
}

#[test]
fn a_leases_cost_survives_dump_restore_and_a_restart() {
    let schema = unique_schema();
    let mut server = builder(&schema).conf("save 3600 1").start();
    let mut con = server.client();
    con.admit(acc("src"), "REQUESTS_PER_DAY 100 COST 6 LEASE l");
    con.admit(acc("src"), "REQUESTS_PER_DAY 100 COST 2 LEASE m");
    let Value::BulkString(payload) = dump(&mut con, acc("src")) else {
        panic!("DUMP replied no payload");
    };
    let copy = account_key(acc("copy"));
    redis::cmd("RESTORE")
        .arg(&copy)
        .arg(0)
        .arg(payload)
        .query::<Value>(&mut con)
        .expect("RESTORE");
    assert_eq!(con.usage(acc("copy")).requests_per_day, 8);
    assert_eq!(con.release(acc("copy"), "l"), 1);
    assert_eq!(con.usage(acc("copy")).requests_per_day, 2);
    // A restart from the RDB keeps each lease's cost.
    query(&mut con, &["SAVE"]).expect("SAVE");
    drop(con);
    server.restart();
    let mut con = server.client();
    assert_eq!(con.usage(acc("src")).requests_per_day, 8);
    assert_eq!(con.release(acc("src"), "m"), 1);
    assert_eq!(con.usage(acc("src")).requests_per_day, 6);
    assert_eq!(con.release(acc("copy"), "m"), 1);
    assert_eq!(con.usage(acc("copy")).requests_per_day, 0);
}
