//! What an account key keeps and where it goes: usage follows the key through `RENAME`, `COPY`,
//! `MOVE` and `SWAPDB` as with any Redis value, while a remembered credit never applies to
//! another user's (or bundle's) account; and `COMMIT` idempotency by time, beyond any count
//! of other commits, with its documented bound.
mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;

const ALICE: [&str; 4] = ["acme", "chat", "alice", "pro"];
const BOB: [&str; 4] = ["acme", "chat", "bob", "pro"];
/// The base policy of every admission here: one request a day, the rest from credits.
const BASE: &[&str] = &["REQUESTS_PER_DAY", "1"];

/// Keeps a test away from the end of an hour (and so of a day or month), where its counters
/// would start again.
fn away_from_window_end() {
    let s = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let left = 3600 - s % 3600;
    if left < 15 {
        std::thread::sleep(Duration::from_secs(left + 1));
    }
}

/// A server on the shared PostgreSQL without the NOTIFY listener (its first connect empties the
/// credits cache, which would retire remembered credits in the middle of a test); alice has
/// +1000 requests a day on every bundle.
fn server() -> RedisServer {
    away_from_window_end();
    let server = test_server_with(&unique_schema(), &[("notify", "no")]);
    let mut con = server.client();
    let everywhere = ["acme", "chat", "alice", "*"];
    query_map(
        &mut con,
        &with_account("QUOTA.GRANT", everywhere, &["REQUESTS_PER_DAY", "1000"]),
    );
    server
}

/// Admits alice twice: the second uses her credit, which her key now remembers.
fn alice_uses_her_credit(con: &mut redis::Connection) {
    let first = con.admit(ALICE, BASE);
    assert!(!first.used_credit(), "{first:?}");
    let second = con.admit(ALICE, BASE);
    assert!(second.allowed, "{second:?}");
    assert!(second.used_credit(), "{second:?}");
}

/// No credits apply: beyond the one base request the account is denied, never admitted on
/// another account's credit.
fn assert_no_credit(m: &Admit) {
    assert!(!m.allowed, "admitted on another user's credit: {m:?}");
    assert!(!m.used_credit(), "{m:?}");
    assert_eq!(m.credit, "none", "{m:?}");
}

/// A server where alice used her credit, then `command` (`RENAME` or `COPY`) from her key to
/// bob's.
fn alice_used_then(command: &str) -> (RedisServer, redis::Connection) {
    let server = server();
    let mut con = server.client();
    alice_uses_her_credit(&mut con);
    between(&mut con, command, ALICE, BOB);
    (server, con)
}

/// `RENAME` or `COPY` from one account's key to another's.
fn between(con: &mut redis::Connection, command: &str, from: [&str; 4], to: [&str; 4]) {
    query(con, &[command, &account_key(from), &account_key(to)])
        .unwrap_or_else(|e| panic!("{command}: {e}"));
}

#[test]
fn rename_moves_usage_but_never_the_remembered_credit() {
    let (_server, mut con) = alice_used_then("RENAME");
    // Bob's key holds alice's two requests now; his own policy and (no) credits decide.
    let m = con.admit(BOB, BASE);
    assert_no_credit(&m);
    assert_eq!(con.usage(BOB).requests_per_day, 2);
    // Alice starts from nothing, still with her credit.
    assert_eq!(con.usage(ALICE).requests_per_day, 0);
    alice_uses_her_credit(&mut con);
    // Another bundle of the same user without a credit of its own is another account too.
    let bare = ["acme", "chat", "carol", "pro"];
    query_map(
        &mut con,
        &with_account("QUOTA.GRANT", bare, &["REQUESTS_PER_DAY", "1000"]),
    );
    con.admit(bare, BASE);
    let m = con.admit(bare, BASE);
    assert!(m.used_credit(), "{m:?}");
    let other_bundle = ["acme", "chat", "carol", "free"];
    between(&mut con, "RENAME", bare, other_bundle);
    let m = con.admit(other_bundle, BASE);
    assert_no_credit(&m);
}

#[test]
fn copy_gives_the_copy_its_own_credits() {
    let (_server, mut con) = alice_used_then("COPY");
    assert_eq!(con.usage(BOB), con.usage(ALICE));
    assert_no_credit(&con.admit(BOB, BASE));
    // The original keeps counting, on alice's credit.
    let m = con.admit(ALICE, BASE);
    assert!(m.used_credit(), "{m:?}");
    assert_eq!(con.usage(ALICE).requests_per_day, 3);
    assert_eq!(con.usage(BOB).requests_per_day, 2);
}

fn select(con: &mut redis::Connection, db: &str) {
    query(con, &["SELECT", db]).expect("SELECT");
}

#[test]
fn move_and_swapdb_take_the_usage_along_with_the_same_credits() {
    let server = server();
    let mut con = server.client();
    alice_uses_her_credit(&mut con);
    query(&mut con, &["MOVE", &account_key(ALICE), "1"]).expect("MOVE");
    assert_eq!(con.usage(ALICE).requests_per_day, 0);
    select(&mut con, "1");
    assert_eq!(con.usage(ALICE).requests_per_day, 2);
    // Same key name, same user: alice's credit still applies there.
    let m = con.admit(ALICE, BASE);
    assert!(m.used_credit(), "{m:?}");
    // Swap the databases: the account (3 requests) is back in db 0.
    query(&mut con, &["SWAPDB", "0", "1"]).expect("SWAPDB");
    assert_eq!(con.usage(ALICE).requests_per_day, 0);
    select(&mut con, "0");
    assert_eq!(con.usage(ALICE).requests_per_day, 3);
    let m = con.admit(ALICE, BASE);
    assert!(m.used_credit(), "{m:?}");
    // Bob is never admitted on alice's credit.
    assert!(con.admit(BOB, BASE).allowed);
    assert_no_credit(&con.admit(BOB, BASE));
}

fn tokens_per_day(con: &mut redis::Connection, acc: [&str; 4]) -> i64 {
    con.usage(acc).tokens_per_day
}

/// 66 leases committed, then the first again: recognised as a repeat (not only the last 64).
#[test]
fn a_repeated_commit_counts_once_after_many_other_commits() {
    away_from_window_end();
    let server = RedisServer::start(&[]);
    let mut con = server.client();
    let leases: Vec<String> = (0..66)
        .map(|_| {
            let m = con.admit(BOB, "MAX_CONCURRENT 100");
            m.lease.clone().expect("a lease")
        })
        .collect();
    for lease in &leases {
        let m = con.commit(BOB, 10, Some(lease));
        assert_eq!(m.tokens, 10, "{m:?}");
    }
    let again = con.commit(BOB, 10, Some(&leases[0]));
    assert!(again.duplicate, "{again:?}");
    assert_eq!(again.tokens, 0, "{again:?}");
    assert_eq!(tokens_per_day(&mut con, BOB), 660);
}

/// At the bound (4096 committed leases still in their time), another lease's commit is refused
/// with an error and records nothing; repeats of the remembered ones are still recognised.
#[test]
fn at_the_bound_a_commit_is_refused_rather_than_counted_twice() {
    away_from_window_end();
    let server = RedisServer::start(&[]);
    let mut con = server.client();
    let mut pipe = redis::pipe();
    for i in 0..4096 {
        pipe.add_command(cmd(&with_account(
            "QUOTA.COMMIT",
            BOB,
            &["1", "LEASE", &format!("job-{i}")],
        )));
    }
    let replies: Vec<Value> = pipe.query(&mut con).expect("4096 commits");
    assert_eq!(replies.len(), 4096);
    assert_eq!(tokens_per_day(&mut con, BOB), 4096);
    let err = query_err(
        &mut con,
        &with_account("QUOTA.COMMIT", BOB, &["1", "LEASE", "job-4096"]),
    );
    assert!(err.starts_with("ERR this account remembers 4096"), "{err}");
    assert_eq!(
        tokens_per_day(&mut con, BOB),
        4096,
        "a refused commit records nothing"
    );
    for i in [0, 4095] {
        let m = con.commit(BOB, 1, Some(&format!("job-{i}")));
        assert!(m.duplicate, "{m:?}");
    }
    // A commit without a lease has nothing to remember and records.
    con.commit(BOB, 1, None);
    assert_eq!(tokens_per_day(&mut con, BOB), 4097);
}
