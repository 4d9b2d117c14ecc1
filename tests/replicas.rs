//! Master + replica, both with the module on the shared PostgreSQL and the same schema:
//!
//! * a `QUOTA.GRANT`/`QUOTA.REVOKE` on the master is visible to `QUOTA.GET` on the replica on
//!   the first try after `WAIT 1 1000`, although the replica had the user cached (with and
//!   without NOTIFY on the replica: the replicated invalidation alone must do it);
//! * usage written by admits, commits and releases on the master (warm and cold users)
//!   reaches the replica: `QUOTA.USAGE` is the same on both after `WAIT`;
//! * a promoted replica (`REPLICAOF NO ONE`) continues admitting with no usage lost.
mod common;

use std::time::Duration;

use common::*;

const T: &str = "acme";
const P: &str = "chat";

/// A master and a synced replica, both with the module; `replica_extra` are more module
/// arguments for the replica.
fn start_pair(schema: &str, replica_extra: &[(&str, &str)]) -> (RedisServer, RedisServer) {
    test_master_and_replica(schema, replica_extra)
}

/// `WAIT 1 1000` on `con`: the number of replicas that acknowledged this client's writes.
fn wait_one(con: &mut redis::Connection) -> i64 {
    let v = query(con, &["WAIT", "1", "1000"]).expect("WAIT");
    value_i64(&v).expect("WAIT integer")
}

/// `QUOTA.GET` -> the additional requests per day of the applicable record, None for nil.
fn credit(con: &mut redis::Connection, user: &str, bundle: &str) -> Option<i64> {
    match query(con, &["QUOTA.GET", T, P, user, bundle]).expect("QUOTA.GET") {
        Value::Nil => None,
        v => Some(field_i64(&to_map(v), "additional_requests_per_day")),
    }
}

fn grant(con: &mut redis::Connection, user: &str, bundle: &str, extra: &[&str]) {
    let mut args = vec!["QUOTA.GRANT", T, P, user, bundle];
    args.extend_from_slice(extra);
    query_map(con, &args);
}

/// Grants, top-ups and revokes on the master are what `QUOTA.GET` on the replica returns on the
/// first try after `WAIT`, although the replica had the old value cached.
fn grant_and_revoke_reach_the_replica(notify: bool) {
    let schema = unique_schema();
    let replica_extra: &[(&str, &str)] = if notify { &[] } else { &[("notify", "no")] };
    let (master, replica) = start_pair(&schema, replica_extra);
    let mut m = master.client();
    let mut r = replica.client();

    // With NOTIFY on, the replica also hears of every change from PostgreSQL, some time later;
    // before checking that something is served from its cache, let those arrive (else a late
    // notification may drop the entry just loaded).
    let notify_settled = |changes: i64| {
        if notify {
            let ok = wait_until(Duration::from_secs(10), || {
                info_i64(&replica, "quota_notify_received") >= changes
            });
            assert!(ok, "the replica did not receive {changes} notifications");
        }
    };
    if notify {
        let ok = wait_until(Duration::from_secs(10), || {
            replica
                .info("quota")
                .get("quota_notify_state")
                .map(String::as_str)
                == Some("listening")
        });
        assert!(ok, "the replica's NOTIFY listener is not listening");
    } else {
        assert_eq!(
            replica
                .info("quota")
                .get("quota_notify_state")
                .map(String::as_str),
            Some("off")
        );
    }

    // alice: a credit of 3, cached on the replica.
    grant(&mut m, "alice", "*", &["REQUESTS_PER_DAY", "3"]);
    assert_eq!(wait_one(&mut m), 1, "WAIT after GRANT");
    notify_settled(1);
    assert_eq!(credit(&mut r, "alice", "b"), Some(3), "replica: first GET");
    let hits = info_i64(&replica, "quota_cache_hits");
    assert_eq!(credit(&mut r, "alice", "b"), Some(3), "replica: cached GET");
    assert_eq!(
        info_i64(&replica, "quota_cache_hits"),
        hits + 1,
        "the replica serves alice from its cache"
    );

    // Replaced on the master: the replica's first GET after WAIT has the new value.
    grant(&mut m, "alice", "*", &["REQUESTS_PER_DAY", "7"]);
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(
        credit(&mut r, "alice", "b"),
        Some(7),
        "replica after GRANT 7"
    );

    // Topped up.
    grant(&mut m, "alice", "*", &["REQUESTS_PER_DAY", "5", "ADD"]);
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(
        credit(&mut r, "alice", "b"),
        Some(12),
        "replica after GRANT ADD 5"
    );

    // A bundle's own row takes precedence over '*'.
    assert_eq!(credit(&mut r, "alice", "pro"), Some(12));
    grant(&mut m, "alice", "pro", &["REQUESTS_PER_DAY", "40"]);
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(
        credit(&mut r, "alice", "pro"),
        Some(40),
        "replica after bundle GRANT"
    );
    assert_eq!(credit(&mut r, "alice", "b"), Some(12));

    // Revoked on the master: gone on the replica.
    let v = query(&mut m, &["QUOTA.REVOKE", T, P, "alice", "*"]).expect("REVOKE");
    assert_eq!(value_i64(&v), Some(1));
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(
        credit(&mut r, "alice", "b"),
        None,
        "replica after REVOKE '*'"
    );
    assert_eq!(credit(&mut r, "alice", "pro"), Some(40));
    let v = query(&mut m, &["QUOTA.REVOKE", T, P, "alice", "pro"]).expect("REVOKE");
    assert_eq!(value_i64(&v), Some(1));
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(
        credit(&mut r, "alice", "pro"),
        None,
        "replica after REVOKE pro"
    );

    // bob: cached on the replica as having no credit, then granted on the master.
    notify_settled(6);
    assert_eq!(credit(&mut r, "bob", "b"), None);
    let hits = info_i64(&replica, "quota_cache_hits");
    assert_eq!(credit(&mut r, "bob", "b"), None);
    assert_eq!(
        info_i64(&replica, "quota_cache_hits"),
        hits + 1,
        "the replica caches bob as having no credit"
    );
    grant(&mut m, "bob", "*", &["REQUESTS_PER_DAY", "5"]);
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(
        credit(&mut r, "bob", "b"),
        Some(5),
        "replica after GRANT to an uncredited user"
    );

    // An admission on the master uses it, and the replica's view of bob is unchanged.
    let a = query_map(
        &mut m,
        &["QUOTA.ADMIT", T, P, "bob", "b", "REQUESTS_PER_DAY", "0"],
    );
    assert_eq!(field_i64(&a, "allowed"), 1);
    assert_eq!(field_i64(&a, "remaining_requests"), 4);
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(credit(&mut r, "bob", "b"), Some(5));
    assert_eq!(field_i64(&usage(&mut r, [T, P, "bob", "b"]), "req_day"), 1);
}

#[test]
fn grant_and_revoke_reach_the_replica_at_once() {
    grant_and_revoke_reach_the_replica(true);
}

#[test]
fn grant_and_revoke_reach_the_replica_without_notify() {
    grant_and_revoke_reach_the_replica(false);
}

/// Admits, commits and releases on the master (warm and cold users) reach the replica:
/// `QUOTA.USAGE` is the same on both after `WAIT`.
#[test]
fn usage_reaches_the_replica() {
    let schema = unique_schema();
    let (master, replica) = start_pair(&schema, &[]);
    let mut m = master.client();
    let mut r = replica.client();

    // Warm users: a credit granted (and so cached) on the master before their admissions.
    for u in ["warm-1", "warm-2"] {
        grant(
            &mut m,
            u,
            "*",
            &["REQUESTS_PER_DAY", "2", "TOKENS_PER_DAY", "500"],
        );
    }
    // Cold users: never seen by the master; their first admit waits for PostgreSQL.
    let users = ["warm-1", "warm-2", "cold-1", "cold-2", "cold-3"];
    let limits = [
        "REQUESTS_PER_DAY",
        "3",
        "TOKENS_PER_DAY",
        "1000",
        "MAX_CONCURRENT",
        "3",
    ];
    let cold_before = info_i64(&master, "quota_cache_misses");

    for (k, u) in users.iter().enumerate() {
        // 1. An admit (MAX_CONCURRENT: it takes a lease, left to expire); checked on the
        //    replica at once (the cold users' is decided after their credits were loaded).
        let mut args = vec!["QUOTA.ADMIT", T, P, u, "b"];
        args.extend_from_slice(&limits);
        let a = query_map(&mut m, &args);
        assert_eq!(field_i64(&a, "allowed"), 1, "{u}: {a:?}");
        assert_eq!(wait_one(&mut m), 1);
        let on_master = usage(&mut m, [T, P, u, "b"]);
        assert_eq!(field_i64(&on_master, "req_day"), 1);
        assert_eq!(
            usage(&mut r, [T, P, u, "b"]),
            on_master,
            "{u}: USAGE after the first admit"
        );

        // 2. A lease with a reservation, committed.
        let lease = format!("lease-{k}-a");
        let mut args = vec!["QUOTA.ADMIT", T, P, u, "b"];
        args.extend_from_slice(&limits);
        args.extend_from_slice(&["LEASE", &lease, "RESERVE", "300"]);
        let a = query_map(&mut m, &args);
        assert_eq!(field_i64(&a, "allowed"), 1, "{u}: {a:?}");
        assert_eq!(field_i64(&a, "reserved"), 300);
        assert_eq!(wait_one(&mut m), 1);
        let on_master = usage(&mut m, [T, P, u, "b"]);
        assert_eq!(field_i64(&on_master, "in_flight"), 2);
        assert_eq!(field_i64(&on_master, "reserved"), 300);
        assert_eq!(
            usage(&mut r, [T, P, u, "b"]),
            on_master,
            "{u}: USAGE with a lease held"
        );

        let c = query_map(
            &mut m,
            &["QUOTA.COMMIT", T, P, u, "b", "120", "LEASE", &lease],
        );
        assert_eq!(field_i64(&c, "recorded"), 120, "{u}: {c:?}");

        // 3. A lease released (the request is refunded).
        let lease2 = format!("lease-{k}-b");
        let mut args = vec!["QUOTA.ADMIT", T, P, u, "b"];
        args.extend_from_slice(&limits);
        args.extend_from_slice(&["LEASE", &lease2, "RESERVE", "50"]);
        let a = query_map(&mut m, &args);
        assert_eq!(field_i64(&a, "allowed"), 1, "{u}: {a:?}");
        let v = query(&mut m, &["QUOTA.RELEASE", T, P, u, "b", &lease2]).expect("RELEASE");
        assert_eq!(value_i64(&v), Some(1));

        // 4. Another bundle of the same user.
        let a = query_map(
            &mut m,
            &["QUOTA.ADMIT", T, P, u, "other", "TOKENS_PER_HOUR", "10"],
        );
        assert_eq!(field_i64(&a, "allowed"), 1);
        let c = query_map(&mut m, &["QUOTA.COMMIT", T, P, u, "other", "7"]);
        assert_eq!(field_i64(&c, "recorded"), 7, "{u}: {c:?}");

        assert_eq!(wait_one(&mut m), 1);
        let on_master = usage(&mut m, [T, P, u, "b"]);
        assert_eq!(field_i64(&on_master, "req_day"), 2, "{u}: {on_master:?}");
        assert_eq!(field_i64(&on_master, "tok_day"), 120);
        assert_eq!(field_i64(&on_master, "in_flight"), 1);
        assert_eq!(field_i64(&on_master, "reserved"), 0);
        assert_eq!(
            usage(&mut r, [T, P, u, "b"]),
            on_master,
            "{u}: USAGE after commit and release"
        );
        let on_master = usage(&mut m, [T, P, u, "other"]);
        assert_eq!(field_i64(&on_master, "tok_hour"), 7);
        assert_eq!(
            usage(&mut r, [T, P, u, "other"]),
            on_master,
            "{u}: USAGE of bundle other"
        );
    }
    assert!(
        info_i64(&master, "quota_cache_misses") >= cold_before + 3,
        "the cold users were not loaded on demand"
    );

    // Denials change nothing, on either side.
    let mut args = vec!["QUOTA.ADMIT", T, P, "cold-1", "b"];
    args.extend_from_slice(&limits);
    let a = query_map(&mut m, &args);
    assert_eq!(field_i64(&a, "allowed"), 1, "cold-1's third request: {a:?}");
    let a = query_map(&mut m, &args);
    assert_eq!(field_i64(&a, "allowed"), 0, "cold-1 is at its limit: {a:?}");
    assert_eq!(field_str(&a, "reason").as_deref(), Some("requests_per_day"));
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(
        usage(&mut r, [T, P, "cold-1", "b"]),
        usage(&mut m, [T, P, "cold-1", "b"])
    );

    // RESET on the master clears the replica's copy too.
    let v = query(&mut m, &["QUOTA.RESET", T, P, "warm-1", "b"]).expect("RESET");
    assert_eq!(value_i64(&v), Some(1));
    assert_eq!(wait_one(&mut m), 1);
    let on_replica = usage(&mut r, [T, P, "warm-1", "b"]);
    assert_eq!(field_i64(&on_replica, "req_day"), 0, "{on_replica:?}");
    assert_eq!(on_replica, usage(&mut m, [T, P, "warm-1", "b"]));

    // The same keys on both sides.
    let dbsize = |c: &mut redis::Connection| value_i64(&query(c, &["DBSIZE"]).unwrap()).unwrap();
    assert_eq!(dbsize(&mut r), dbsize(&mut m));

    // The replica refuses admissions, and no client may run QUOTA.SETSTATE.
    let err = query_err(
        &mut r,
        &["QUOTA.ADMIT", T, P, "cold-2", "b", "REQUESTS_PER_DAY", "3"],
    );
    assert!(err.starts_with("READONLY"), "ADMIT on the replica: {err}");
    let key = to_array(query(&mut m, &["KEYS", "q:*"]).unwrap())
        .first()
        .and_then(value_to_string)
        .expect("an account key");
    let err = query_err(&mut m, &["QUOTA.SETSTATE", &key, "garbage"]);
    assert!(err.contains("internal"), "SETSTATE from a client: {err}");
}

/// The replica is promoted after the master dies: admissions continue with the usage the master
/// had recorded.
#[test]
fn promoted_replica_continues_with_the_same_usage() {
    let schema = unique_schema();
    let (mut master, replica) = start_pair(&schema, &[]);
    let mut m = master.client();
    let mut r = replica.client();

    // dave: no credit, 10 per day; erin: a '*' credit of 2 on top of the same base.
    grant(&mut m, "erin", "*", &["REQUESTS_PER_DAY", "2"]);
    let admit = |con: &mut redis::Connection, u: &str| -> i64 {
        let a = query_map(
            con,
            &[
                "QUOTA.ADMIT",
                T,
                P,
                u,
                "b",
                "REQUESTS_PER_DAY",
                "10",
                "TOKENS_PER_DAY",
                "1000",
            ],
        );
        field_i64(&a, "allowed")
    };
    for u in ["dave", "erin"] {
        let allowed: i64 = (0..6).map(|_| admit(&mut m, u)).sum();
        assert_eq!(allowed, 6, "{u} on the master");
    }
    let c = query_map(&mut m, &["QUOTA.COMMIT", T, P, "dave", "b", "400"]);
    assert_eq!(field_i64(&c, "recorded"), 400);
    assert_eq!(wait_one(&mut m), 1);
    let dave_on_master = usage(&mut m, [T, P, "dave", "b"]);
    let erin_on_master = usage(&mut m, [T, P, "erin", "b"]);
    assert_eq!(field_i64(&dave_on_master, "req_day"), 6);
    assert_eq!(field_i64(&dave_on_master, "tok_day"), 400);

    // The master dies; the replica is promoted.
    master.kill9();
    let v = query(&mut r, &["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    assert_eq!(value_to_string(&v).as_deref(), Some("OK"));
    assert_eq!(usage(&mut r, [T, P, "dave", "b"]), dave_on_master);
    assert_eq!(usage(&mut r, [T, P, "erin", "b"]), erin_on_master);

    // Exactly 4 more for dave (10 per day), 6 more for erin (10 + 2).
    let dave: Vec<i64> = (0..6).map(|_| admit(&mut r, "dave")).collect();
    assert_eq!(dave, vec![1, 1, 1, 1, 0, 0], "dave on the promoted replica");
    let erin: Vec<i64> = (0..7).map(|_| admit(&mut r, "erin")).collect();
    assert_eq!(
        erin,
        vec![1, 1, 1, 1, 1, 1, 0],
        "erin on the promoted replica"
    );
    let u = usage(&mut r, [T, P, "dave", "b"]);
    assert_eq!(field_i64(&u, "req_day"), 10);
    assert_eq!(field_i64(&u, "tok_day"), 400);

    // Tokens carried over too: 400 of 1000 used on the master, 600 more here fill the day.
    let c = query_map(&mut r, &["QUOTA.COMMIT", T, P, "dave", "b", "600"]);
    assert_eq!(field_i64(&c, "recorded"), 600);
    let a = query_map(
        &mut r,
        &["QUOTA.ADMIT", T, P, "dave", "b", "TOKENS_PER_DAY", "1000"],
    );
    assert_eq!(
        field_i64(&a, "allowed"),
        0,
        "dave's 1000 tokens are used: {a:?}"
    );
    assert_eq!(field_str(&a, "reason").as_deref(), Some("tokens_per_day"));
}
