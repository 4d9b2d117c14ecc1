//! Smooth rates (`REQUESTS_PER_SECOND`, `REQUESTS_PER_MINUTE`, `TOKENS_PER_MINUTE`) against real
//! servers on the shared PostgreSQL:
//!
//! * smoothness: a full burst, and half a period later about half of it back;
//! * `retry_after_ms`: sleeping it is enough to be admitted (within 50 ms), in the map and in
//!   `COMPACT` (its last element), and `retry_after` is it in whole seconds rounded up;
//! * credits add to a rate (`QUOTA.GRANT`, shown in the record under the limit's name), and
//!   named policies hold rates (`QUOTA.POLICY SET`, `ADMIT ... POLICY`);
//! * tokens per minute: a reservation counts at once, the commit settles it;
//! * `QUOTA.USAGE` and `VERBOSE` show each rate under its limit name;
//! * a replica holds the master's state byte for byte (effects carry the master's result), and
//!   a restart from the RDB or from the AOF keeps it.
//!
//! Rates per second keep these tests fast; per minute where a restart must fit in the wait.
mod common;

use std::thread;
use std::time::Duration;

use common::*;

const T: &str = "acme";
const P: &str = "chat";

fn acc(user: &str) -> [&str; 4] {
    [T, P, user, "b"]
}

/// How many of `n` admissions in a row are allowed.
fn burst(con: &mut redis::Connection, user: &str, opts: &str, n: usize) -> usize {
    (0..n)
        .filter(|_| con.admit(acc(user), opts).allowed)
        .count()
}

#[test]
fn a_burst_then_half_a_period_later_about_half_is_back() {
    let (_schema, _server, mut con) = test_server_con();
    let opts = "REQUESTS_PER_SECOND 20";
    assert_eq!(burst(&mut con, "u", opts, 25), 20);
    let denied = con.admit(acc("u"), opts);
    assert!(!denied.allowed);
    assert_eq!(denied.reason, "requests_per_second");
    thread::sleep(Duration::from_millis(500));
    // 10 are back after 500 ms; the machine may be slow, never fast.
    let back = burst(&mut con, "u", opts, 20);
    assert!((9..=16).contains(&back), "{back} back after half a second");
}

#[test]
fn sleeping_retry_after_ms_is_enough() {
    let (_schema, _server, mut con) = test_server_con();
    let opts = "REQUESTS_PER_SECOND 4";
    assert_eq!(burst(&mut con, "u", opts, 4), 4);
    for compact in [false, true] {
        let opts = if compact {
            format!("{opts} COMPACT")
        } else {
            opts.to_string()
        };
        let denied = con.admit(acc("u"), opts.as_str());
        assert!(!denied.allowed, "{denied:?}");
        assert_eq!(denied.reason, "requests_per_second");
        // One is back every 250 ms.
        assert!((1..=250).contains(&denied.retry_after_ms), "{denied:?}");
        assert_eq!(denied.retry_after, 1, "whole seconds, rounded up");
        thread::sleep(Duration::from_millis(denied.retry_after_ms as u64));
        let again = con.admit(acc("u"), opts.as_str());
        assert!(again.allowed, "admitted after retry_after_ms: {again:?}");
        assert_eq!(again.retry_after_ms, -1);
    }
    // A rate of 0 never admits.
    let never = con.admit(acc("z"), "REQUESTS_PER_MINUTE 0");
    assert_eq!((never.retry_after, never.retry_after_ms), (-1, -1));
}

#[test]
fn credits_add_to_rates_and_policies_hold_them() {
    let (_schema, _server, mut con) = test_server_con();
    let rec = con.grant(acc("c"), "REQUESTS_PER_SECOND 3 TOKENS_PER_MINUTE 500");
    assert_eq!(field_i64(&rec, "requests_per_second"), 3);
    assert_eq!(field_i64(&rec, "tokens_per_minute"), 500);
    assert!(field_is_nil(&rec, "requests_per_minute"), "{rec:?}");
    let got = con.get(acc("c")).expect("the record");
    assert_eq!(field_i64(&got, "requests_per_second"), 3);

    // 2 from the base + 3 from the credit; the last three only thanks to the credit.
    let opts = "REQUESTS_PER_MINUTE 100 REQUESTS_PER_SECOND 2";
    let used: Vec<bool> = (0..5)
        .map(|_| con.admit(acc("c"), Opts::words(opts).verbose()))
        .map(|a| {
            assert!(a.allowed, "{a:?}");
            a.used_credit()
        })
        .collect();
    assert_eq!(used, [false, false, true, true, true]);
    let denied = con.admit(acc("c"), Opts::words(opts).verbose());
    assert_eq!(denied.reason, "requests_per_second");
    let limits = denied.limits.expect("VERBOSE limits");
    assert_eq!(field_i64(&limits, "requests_per_second"), 5);
    assert_eq!(field_i64(&limits, "requests_per_minute"), 100);
    assert_eq!(
        field_i64(&limits, "tokens_per_minute"),
        -1,
        "no base: no credit"
    );
    let usage = denied.usage.expect("VERBOSE usage");
    assert_eq!(usage.rates[1], 5, "{usage:?}");

    // A named policy with a rate.
    let stored = con.policy_set([T, P], "rps", "REQUESTS_PER_SECOND 3 TOKENS_PER_MINUTE 50");
    assert_eq!(field_i64(&stored, "requests_per_second"), 3);
    assert!(field_is_nil(&stored, "requests_per_minute"), "{stored:?}");
    let got = con.policy_get([T, P], "rps").expect("the policy");
    assert_eq!(field_i64(&got, "tokens_per_minute"), 50);
    let opts = Opts::new().policy("rps").compact();
    assert_eq!(
        (0..5)
            .filter(|_| con.admit(acc("p"), opts.clone()).allowed)
            .count(),
        3
    );
    let denied = con.admit(acc("p"), opts);
    assert_eq!(denied.reason, "requests_per_second");
    assert!(denied.retry_after_ms > 0, "{denied:?}");
}

#[test]
fn tokens_per_minute_counts_a_reservation_at_once_and_the_commit_settles_it() {
    let (_schema, _server, mut con) = test_server_con();
    // One token back a second: slow enough for a loaded machine.
    let tpm = Opts::words("TOKENS_PER_MINUTE 60");
    let a = con.admit(acc("t"), tpm.clone().reserve(40).lease("a"));
    assert_eq!((a.reserved, a.remaining_tokens), (40, 20), "{a:?}");
    let b = con.admit(acc("t"), tpm.clone().reserve(40).lease("b"));
    assert!(b.allowed);
    // What is left (one more if a second went by).
    assert!((20..=21).contains(&b.reserved), "{b:?}");
    let denied = con.admit(acc("t"), tpm.clone());
    if !denied.allowed {
        assert_eq!(denied.reason, "tokens_per_minute", "{denied:?}");
        assert!((1..=1000).contains(&denied.retry_after_ms), "{denied:?}");
    }
    // "a" used 10 of its 40: 30 come back.
    con.commit(acc("t"), 10, Some("a"));
    let used = con.usage(acc("t")).rates[2];
    assert!((25..=31).contains(&used), "{used}");
    // "b" is released: its reservation comes back too.
    assert_eq!(con.release(acc("t"), "b"), 1);
    let used = con.usage(acc("t")).rates[2];
    assert!(used <= 11, "{used}");
    let again = con.admit(acc("t"), tpm.reserve(45));
    assert_eq!(again.reserved, 45, "{again:?}");
}

/// Module arguments: no ledger flush during the test (its acknowledgement would change the
/// state between two `DUMP`s).
fn args(schema: &str) -> Vec<(&'static str, String)> {
    vec![
        ("pg-url", PgServer::shared()),
        ("schema", schema.to_string()),
        ("pg-timeout-ms", "2000".to_string()),
        ("flush-interval", "3600".to_string()),
    ]
}

fn builder(schema: &str) -> RedisBuilder {
    let args = args(schema);
    let refs: Vec<(&str, &str)> = args.iter().map(|(k, v)| (*k, v.as_str())).collect();
    RedisServer::builder().module_args(&refs)
}

fn dump(con: &mut redis::Connection, user: &str) -> redis::Value {
    query(con, &["DUMP", &account_key(acc(user))]).expect("DUMP")
}

#[test]
fn a_replica_holds_the_masters_rates_and_a_restart_keeps_them() {
    let schema = unique_schema();
    let master = builder(&schema).conf("repl-diskless-sync-delay 0").start();
    let replica = builder(&schema).replica_of(&master).start();
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    let (mut m, mut r) = (master.client(), replica.client());
    let opts = "REQUESTS_PER_MINUTE 5 TOKENS_PER_MINUTE 1000";
    assert_eq!(burst(&mut m, "r", opts, 5), 5);
    m.admit(acc("l"), Opts::words(opts).reserve(300).lease("x"));
    m.commit(acc("l"), 100, Some("x"));
    m.admit(acc("l"), Opts::words(opts).reserve(200).lease("y"));
    assert_eq!(m.release(acc("l"), "y"), 1);
    assert_eq!(query_i64(&mut m, &["WAIT", "1", "1000"]), 1);
    for user in ["r", "l"] {
        assert_eq!(
            dump(&mut m, user),
            dump(&mut r, user),
            "{user}: the replica's state is the master's"
        );
    }
    // One request is back every 12 s.
    assert_eq!(r.usage(acc("r")).rates[1], 5);

    for conf in [&[][..], &["appendonly yes", "appendfsync always"][..]] {
        let mut b = builder(&schema);
        for line in conf {
            b = b.conf(line);
        }
        let mut server = b.start();
        let mut con = server.client();
        // The lease's admission is the first of the five requests a minute.
        let leased = con.admit(acc("s"), Opts::words(opts).reserve(300).lease("x"));
        assert_eq!(leased.reserved, 300, "{leased:?}");
        assert_eq!(burst(&mut con, "s", opts, 5), 4);
        let before = dump(&mut con, "s");
        if conf.is_empty() {
            query(&mut con, &["SAVE"]).expect("SAVE");
        }
        drop(con);
        server.restart();
        let mut con = server.client();
        assert_eq!(
            before,
            dump(&mut con, "s"),
            "{conf:?}: the state survives the restart"
        );
        let denied = con.admit(acc("s"), opts);
        assert_eq!(denied.reason, "requests_per_minute", "{conf:?}: {denied:?}");
        assert!(con.usage(acc("s")).rates[2] > 0);
    }
}
