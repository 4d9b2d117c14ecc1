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
/// After `WAIT` (one replica acknowledges), `user`'s credit on bundle as the replica reads it.
fn replicated_credit(
    m: &mut redis::Connection,
    r: &mut redis::Connection,
    user: &str,
    bundle: &str,
) -> Option<i64> {
    assert_eq!(wait_one(m), 1, "WAIT");
    credit(r, user, bundle)
}

/// `user`'s credit on bundle `b` read twice on the replica: `want` both times, the second
/// from the replica's cache (`None`: cached as having no credit).
fn assert_replica_caches(
    replica: &RedisServer,
    r: &mut redis::Connection,
    user: &str,
    want: Option<i64>,
) {
    assert_eq!(credit(r, user, "b"), want, "replica: first GET of {user}");
    let hits = info_i64(replica, "quota_cache_hits");
    assert_eq!(credit(r, user, "b"), want, "replica: cached GET of {user}");
    assert_eq!(
        info_i64(replica, "quota_cache_hits"),
        hits + 1,
        "the replica serves {user} ({want:?}) from its cache"
    );
}

fn credit(con: &mut redis::Connection, user: &str, bundle: &str) -> Option<i64> {
    con.get([T, P, user, bundle])
        .map(|r| field_i64(&r, "requests_per_day"))
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
    m.grant([T, P, "alice", "*"], "REQUESTS_PER_DAY 3");
    assert_eq!(wait_one(&mut m), 1, "WAIT after GRANT");
    notify_settled(1);
    assert_replica_caches(&replica, &mut r, "alice", Some(3));

    // Replaced on the master, then topped up: the replica's first GET after WAIT has the new
    // value.
    for (opts, want) in [("REQUESTS_PER_DAY 7", 7), ("REQUESTS_PER_DAY 5 ADD", 12)] {
        m.grant([T, P, "alice", "*"], opts);
        assert_eq!(
            replicated_credit(&mut m, &mut r, "alice", "b"),
            Some(want),
            "replica after GRANT {opts}"
        );
    }

    // A bundle's own row takes precedence over '*'.
    assert_eq!(credit(&mut r, "alice", "pro"), Some(12));
    m.grant([T, P, "alice", "pro"], "REQUESTS_PER_DAY 40");
    assert_eq!(
        replicated_credit(&mut m, &mut r, "alice", "pro"),
        Some(40),
        "replica after bundle GRANT"
    );
    assert_eq!(credit(&mut r, "alice", "b"), Some(12));

    // Revoked on the master: gone on the replica; the pro credit stays until its own revoke.
    for (bundle, read_on, pro_left) in [("*", "b", Some(40)), ("pro", "pro", None)] {
        assert_eq!(m.revoke([T, P, "alice", bundle]), 1, "REVOKE {bundle}");
        assert_eq!(
            replicated_credit(&mut m, &mut r, "alice", read_on),
            None,
            "replica after REVOKE {bundle}"
        );
        assert_eq!(credit(&mut r, "alice", "pro"), pro_left);
    }

    // bob: cached on the replica as having no credit, then granted on the master.
    notify_settled(6);
    assert_replica_caches(&replica, &mut r, "bob", None);
    m.grant([T, P, "bob", "*"], "REQUESTS_PER_DAY 5");
    assert_eq!(
        replicated_credit(&mut m, &mut r, "bob", "b"),
        Some(5),
        "replica after GRANT to an uncredited user"
    );

    // An admission on the master uses it, and the replica's view of bob is unchanged.
    let a = m.admit([T, P, "bob", "b"], "REQUESTS_PER_DAY 0");
    assert!(a.allowed);
    assert_eq!(a.remaining_requests, 4);
    assert_eq!(wait_one(&mut m), 1);
    assert_eq!(credit(&mut r, "bob", "b"), Some(5));
    assert_eq!(r.usage([T, P, "bob", "b"]).requests_per_day, 1);
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
        m.grant([T, P, u, "*"], "REQUESTS_PER_DAY 2 TOKENS_PER_DAY 500");
    }
    // Cold users: never seen by the master; their first admit waits for PostgreSQL.
    let users = ["warm-1", "warm-2", "cold-1", "cold-2", "cold-3"];
    let limits = Opts::words("REQUESTS_PER_DAY 3 TOKENS_PER_DAY 1000 MAX_CONCURRENT 3");
    let cold_before = info_i64(&master, "quota_cache_misses");
    // After `WAIT`, USAGE of the account is the same on both sides; returns it.
    let mut same_on_replica = |m: &mut redis::Connection, acc: [&str; 4], when: &str| {
        assert_eq!(wait_one(m), 1);
        let on_master = m.usage(acc);
        assert_eq!(r.usage(acc), on_master, "{acc:?}: USAGE {when}");
        on_master
    };

    for (k, u) in users.iter().enumerate() {
        let acc = [T, P, u, "b"];
        // 1. An admit (MAX_CONCURRENT: it takes a lease, left to expire); checked on the
        //    replica at once (the cold users' is decided after their credits were loaded).
        let a = m.admit(acc, &limits);
        assert!(a.allowed, "{u}: {a:?}");
        let on_master = same_on_replica(&mut m, acc, "after the first admit");
        assert_eq!(on_master.requests_per_day, 1);

        // 2. A lease with a reservation, committed.
        let lease = format!("lease-{k}-a");
        let a = m.admit(acc, limits.clone().lease(&lease).reserve(300));
        assert!(a.allowed, "{u}: {a:?}");
        assert_eq!(a.reserved, 300);
        let on_master = same_on_replica(&mut m, acc, "with a lease held");
        assert_eq!((on_master.in_flight, on_master.reserved), (2, 300));
        let c = m.commit(acc, 120, Some(&lease));
        assert_eq!(c.tokens, 120, "{u}: {c:?}");

        // 3. A lease released (the request is refunded).
        let lease2 = format!("lease-{k}-b");
        let a = m.admit(acc, limits.clone().lease(&lease2).reserve(50));
        assert!(a.allowed, "{u}: {a:?}");
        assert_eq!(m.release(acc, &lease2), 1);

        // 4. Another bundle of the same user.
        let other = [T, P, u, "other"];
        assert!(m.admit(other, "TOKENS_PER_HOUR 10").allowed);
        let c = m.commit(other, 7, None);
        assert_eq!(c.tokens, 7, "{u}: {c:?}");

        let on_master = same_on_replica(&mut m, acc, "after commit and release");
        let got = (
            on_master.requests_per_day,
            on_master.tokens_per_day,
            on_master.in_flight,
        );
        assert_eq!(got, (2, 120, 1), "{u}: {on_master:?}");
        assert_eq!(on_master.reserved, 0);
        let on_master = same_on_replica(&mut m, other, "of bundle other");
        assert_eq!(on_master.tokens_per_hour, 7);
    }
    assert!(
        info_i64(&master, "quota_cache_misses") >= cold_before + 3,
        "the cold users were not loaded on demand"
    );

    // Denials change nothing, on either side.
    let cold1 = [T, P, "cold-1", "b"];
    let a = m.admit(cold1, &limits);
    assert!(a.allowed, "cold-1's third request: {a:?}");
    let a = m.admit(cold1, &limits);
    assert!(!a.allowed, "cold-1 is at its limit: {a:?}");
    assert_eq!(a.reason, "requests_per_day");
    same_on_replica(&mut m, cold1, "after a denial");

    // RESET on the master clears the replica's copy too.
    let warm1 = [T, P, "warm-1", "b"];
    assert_eq!(m.reset(warm1), 1);
    let on_replica = same_on_replica(&mut m, warm1, "after RESET");
    assert_eq!(on_replica.requests_per_day, 0, "{on_replica:?}");

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
    m.grant([T, P, "erin", "*"], "REQUESTS_PER_DAY 2");
    let admit = |con: &mut redis::Connection, u: &str| -> i64 {
        i64::from(
            con.admit([T, P, u, "b"], "REQUESTS_PER_DAY 10 TOKENS_PER_DAY 1000")
                .allowed,
        )
    };
    for u in ["dave", "erin"] {
        let allowed: i64 = (0..6).map(|_| admit(&mut m, u)).sum();
        assert_eq!(allowed, 6, "{u} on the master");
    }
    let c = m.commit([T, P, "dave", "b"], 400, None);
    assert_eq!(c.tokens, 400);
    assert_eq!(wait_one(&mut m), 1);
    let dave_on_master = m.usage([T, P, "dave", "b"]);
    let erin_on_master = m.usage([T, P, "erin", "b"]);
    assert_eq!(dave_on_master.requests_per_day, 6);
    assert_eq!(dave_on_master.tokens_per_day, 400);

    // The master dies; the replica is promoted.
    master.kill9();
    let v = query(&mut r, &["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    assert_eq!(value_to_string(&v).as_deref(), Some("OK"));
    assert_eq!(r.usage([T, P, "dave", "b"]), dave_on_master);
    assert_eq!(r.usage([T, P, "erin", "b"]), erin_on_master);

    // Exactly 4 more for dave (10 per day), 6 more for erin (10 + 2).
    let dave: Vec<i64> = (0..6).map(|_| admit(&mut r, "dave")).collect();
    assert_eq!(dave, vec![1, 1, 1, 1, 0, 0], "dave on the promoted replica");
    let erin: Vec<i64> = (0..7).map(|_| admit(&mut r, "erin")).collect();
    assert_eq!(
        erin,
        vec![1, 1, 1, 1, 1, 1, 0],
        "erin on the promoted replica"
    );
    let u = r.usage([T, P, "dave", "b"]);
    assert_eq!(u.requests_per_day, 10);
    assert_eq!(u.tokens_per_day, 400);

    // Tokens carried over too: 400 of 1000 used on the master, 600 more here fill the day.
    let c = r.commit([T, P, "dave", "b"], 600, None);
    assert_eq!(c.tokens, 600);
    let a = r.admit([T, P, "dave", "b"], "TOKENS_PER_DAY 1000");
    assert!(!a.allowed, "dave's 1000 tokens are used: {a:?}");
    assert_eq!(a.reason, "tokens_per_day");
}

/// A master no replica listened to counts its changes without propagating them (see
/// `ffi/quiet.rs`). A replica that attaches later must still get every change as its effect:
/// its `QUOTA.ADMIT` never runs (it would decide again with its own clock and cache), and both
/// nodes count the same before and after it attached.
#[test]
fn a_replica_attaching_to_a_quiet_master_gets_effects_never_admissions() {
    let schema = unique_schema();
    let url = PgServer::shared();
    let args = [
        ("pg-url", url.as_str()),
        ("schema", schema.as_str()),
        ("pg-timeout-ms", "2000"),
    ];
    let master = RedisServer::builder()
        .module_args(&args)
        .conf("repl-diskless-sync-delay 0")
        .start();
    let mut m = master.client();
    let acc = [T, P, "quiet", "web"];
    for _ in 0..3 {
        assert!(m.admit(acc, "REQUESTS_PER_DAY 100").allowed);
    }
    let replica = RedisServer::builder()
        .module_args(&args)
        .replica_of(&master)
        .start();
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    let mut r = replica.client();
    assert_eq!(
        r.usage(acc).requests_per_day,
        3,
        "the full sync carried the state"
    );
    for _ in 0..2 {
        assert!(m.admit(acc, "REQUESTS_PER_DAY 100").allowed);
    }
    assert_eq!(wait_one(&mut m), 1, "WAIT");
    assert_eq!(r.usage(acc).requests_per_day, 5);
    assert_eq!(m.usage(acc).requests_per_day, 5);
    let stats = replica.info("commandstats");
    assert!(
        !stats.contains_key("cmdstat_quota.admit"),
        "the replica ran an admission: {stats:?}"
    );
    assert!(
        stats.contains_key("cmdstat_quota.apply"),
        "the replica got no effect: {stats:?}"
    );
}
