//! The usage ledger is the bill: what an account was acknowledged reaches PostgreSQL exactly
//! once, whatever one account does, however long PostgreSQL is gone, and wherever the key
//! goes (RENAME, MOVE, SWAPDB, eviction), with FLUSHALL the one documented loss.
mod common;

use std::time::Duration;

use common::*;

const T: &str = "acme";
const P: &str = "chat";

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Admits `n` requests on each of `users` (pipelined).
fn admit_each(con: &mut redis::Connection, users: &[String], n: usize) {
    let mut pipe = redis::pipe();
    for u in users {
        for _ in 0..n {
            pipe.cmd("QUOTA.ADMIT").arg(&[T, P, u, "web", "COMPACT"]);
        }
    }
    let replies: Vec<Vec<Value>> = pipe.query(con).unwrap();
    for r in replies {
        assert!(matches!(r[0], Value::Int(1)), "{r:?}");
    }
}

/// An amount that could overflow a ledger column is refused at the command, and a sum at
/// the column's limit saturates instead of failing the batch (and every batch sent with it).
#[test]
fn no_amount_can_make_a_flush_fail() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    let eve = [T, P, "eve", "web"];
    let err = query_err(
        &mut con,
        &["QUOTA.COMMIT", T, P, "eve", "web", "9223372036854775807"],
    );
    assert_eq!(err, "ERR tokens must be between 0 and 1000000000000");
    let err = query_err(
        &mut con,
        &[
            "QUOTA.ADMIT",
            T,
            P,
            "eve",
            "web",
            "RESERVE",
            "1000000000001",
        ],
    );
    assert_eq!(err, "ERR RESERVE must be between 0 and 1000000000000");
    con.commit(eve, 1_000_000_000_000, None);
    env.flushed();
    // The hour's row is already at the column's limit (by years of usage, or by hand).
    env.sql_i64(&format!(
        "WITH u AS (UPDATE {{h}} SET tokens = {} WHERE user_id = 'eve' RETURNING 1) \
         SELECT count(*) FROM u",
        i64::MAX - 10
    ));
    con.commit(eve, 1_000_000_000_000, None);
    let others: Vec<String> = (0..50).map(|i| format!("user{i}")).collect();
    admit_each(&mut con, &others, 3);
    env.flushed();
    assert_eq!(env.ledger("eve", "tokens"), i64::MAX);
    for u in &others {
        assert_eq!(env.ledger(u, "requests"), 3, "{u}");
    }
    assert_eq!(info_i64(&env.server, "quota_ledger_flush_errors"), 0);
}

/// PostgreSQL refuses one account's batch (here a trigger does): the others of its slice are
/// written all the same, the refused one is logged (a few lines, not one per flush) and
/// written once PostgreSQL takes it.
#[test]
fn one_refused_batch_never_holds_back_the_others() {
    let (env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
    let s = &env.schema;
    // The module deploys its schema in the background as it starts.
    let deployed = wait_until(Duration::from_secs(10), || {
        psql(
            &env.pg,
            &format!("SELECT to_regclass('{s}.quota_usage_hourly') IS NOT NULL"),
        ) == "t"
    });
    assert!(deployed);
    psql(
        &env.pg,
        &format!(
            "CREATE FUNCTION {s}.refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
             IF NEW.user_id = 'mallory' THEN RAISE EXCEPTION 'refused for the test'; END IF; \
             RETURN NEW; END $$; \
             CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON {s}.quota_usage_hourly \
             FOR EACH ROW EXECUTE FUNCTION {s}.refuse();"
        ),
    );
    let mut users: Vec<String> = (0..50).map(|i| format!("user{i}")).collect();
    users.insert(17, "mallory".into());
    admit_each(&mut con, &users, 3);
    // Several flush rounds go by with mallory's batch refused each time.
    let others_in = wait_until(Duration::from_secs(20), || {
        env.sql_i64("SELECT coalesce(sum(requests), 0) FROM {h} WHERE user_id <> 'mallory'") == 150
    });
    assert!(others_in, "the other accounts were not written");
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(env.ledger("mallory", "requests"), 0);
    assert_eq!(info_i64(&env.server, "quota_ledger_accounts_pending"), 1);
    let log = env.server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ledger batch refused"))
        .collect();
    assert!(
        !lines.is_empty() && lines.len() <= 2,
        "one line when it starts: {lines:?}"
    );
    assert!(lines[0].contains("acme/chat/mallory/web"), "{}", lines[0]);
    assert!(lines[0].contains("refused for the test"), "{}", lines[0]);
    psql(
        &env.pg,
        &format!("DROP TRIGGER refuse ON {s}.quota_usage_hourly"),
    );
    env.flushed();
    assert_eq!(env.ledger("mallory", "requests"), 3);
    let total = env.sql_i64("SELECT sum(requests) FROM {h}");
    assert_eq!(total, 153, "nothing counted twice");
}

/// A week-long PostgreSQL outage leaves an account with 168 older unflushed hours and usage
/// in the current hour (an older build kept them as 169 hours). Such a state loads from a
/// `RESTORE`, through `DEBUG RELOAD`, a restart and a replica's full sync, and its usage
/// reaches PostgreSQL summed, never dropped, in a batch PostgreSQL reads back.
#[test]
fn a_week_long_outage_never_keeps_a_node_from_restarting() {
    let (mut env, mut con) = TestEnv::start_con(&[("flush-interval", "3600")]);
    let probe = [T, P, "probe", "web"];
    con.admit(probe, "");
    let dump: Vec<u8> = redis::cmd("DUMP")
        .arg(account_key(probe))
        .query(&mut con)
        .unwrap();
    let frame = Dump::split(&dump);
    let hour = now_ms() / 3_600_000;
    let hours: Vec<(i64, i64, i64)> = (hour - 168..=hour).map(|h| (h, 2, 5)).collect();
    assert_eq!(hours.len(), 169);
    let state = state::with_hours(hour, ((now_ms() - 1000) as u64) << 20, &hours);
    let eve = [T, P, "eve", "web"];
    let key = account_key(eve);
    let payload = frame.frame(&state, state.len());
    redis::cmd("RESTORE")
        .arg(&key)
        .arg(0)
        .arg(payload)
        .query::<()>(&mut con)
        .expect("the state of a week-long outage loads");
    query(&mut con, &["DEBUG", "RELOAD"]).expect("DEBUG RELOAD");
    let _: () = redis::cmd("SAVE").query(&mut con).unwrap();
    env.server.restart();
    let mut con = env.con();
    let exists: i64 = redis::cmd("EXISTS").arg(&key).query(&mut con).unwrap();
    assert_eq!(exists, 1, "the account came back with the node");
    let replica = RedisServer::builder()
        .pg(&env.pg, &env.schema, "2000")
        .replica_of(&env.server)
        .start();
    replica.wait_replica_synced(&env.server, Duration::from_secs(30));
    let exists: i64 = redis::cmd("EXISTS")
        .arg(&key)
        .query(&mut replica.client())
        .unwrap();
    // What each node holds, to tell a key the replica never got from one it takes as expired.
    let keys = |con: &mut redis::Connection| -> Vec<(String, i64)> {
        let names: Vec<String> = redis::cmd("KEYS").arg("*").query(con).unwrap_or_default();
        let ttl = |k: &String, con: &mut redis::Connection| {
            redis::cmd("PTTL").arg(k).query(con).unwrap_or(-3)
        };
        names.iter().map(|k| (k.clone(), ttl(k, con))).collect()
    };
    assert_eq!(
        exists,
        1,
        "the replica synced it; master holds {:?}, replica holds {:?}",
        keys(&mut con),
        keys(&mut replica.client())
    );
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "1"]).unwrap();
    let billed = wait_until(Duration::from_secs(20), || {
        env.ledger("eve", "requests") > 0
    });
    assert!(billed, "the restarted node never flushed the account");
    env.flushed();
    assert_eq!(env.ledger("eve", "requests"), 2 * 169);
    assert_eq!(env.ledger("eve", "tokens"), 5 * 169);
    let rows = env.sql_i64("SELECT count(*) FROM {h} WHERE user_id = 'eve'");
    assert!(rows <= 168, "{rows} hourly rows");
    let stored = psql(
        &env.pg,
        &format!(
            "SELECT array_length(string_to_array(last_hours, ','), 1) FROM {}.quota_ledger_batch \
             WHERE user_id = 'eve'",
            env.schema
        ),
    );
    assert!(
        stored.trim().parse::<usize>().unwrap() <= 168 * 5,
        "{stored}"
    );
    // The account goes on: its next batches go through.
    con.admit(eve, "");
    env.flushed();
    assert_eq!(env.ledger("eve", "requests"), 2 * 169 + 1);
    assert_eq!(info_i64(&env.server, "quota_ledger_flush_errors"), 0);
}

/// `RENAME` while the account's batch is being written (PostgreSQL stalled): the answer goes
/// to the value under its new name, so the usage is billed once. Run enough times to catch a
/// 1-in-1,000 interleaving of the rename with the flush's answer.
#[test]
fn heavy_rename_while_a_flush_is_in_flight_bills_once() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = RedisServer::builder()
        .module_args(&[
            ("pg-url", &pg.url()),
            ("schema", &schema),
            ("pg-timeout-ms", "20000"),
            ("flush-interval", "1"),
        ])
        .start();
    let mut con = server.client();
    let rounds = 30;
    for round in 0..rounds {
        let (alice, bob) = (format!("alice{round}"), format!("bob{round}"));
        let from = [T, P, alice.as_str(), "web"];
        let to = [T, P, bob.as_str(), "web"];
        for _ in 0..5 {
            con.admit(from, "");
        }
        con.commit(from, 50, None);
        if round % 2 == 0 {
            // Half the rounds stall PostgreSQL until the flush waits on it.
            pg.pause();
            let waited = wait_until(Duration::from_secs(10), || {
                info_i64(&server, "quota_ledger_flush_waiting_ms") > 0
            });
            query(&mut con, &["RENAME", &account_key(from), &account_key(to)]).unwrap();
            pg.resume();
            assert!(waited, "the flush never waited on the stalled PostgreSQL");
        } else {
            // The others rename at a random moment around the flush.
            std::thread::sleep(Duration::from_millis(random_u64() % 1200));
            query(&mut con, &["RENAME", &account_key(from), &account_key(to)]).unwrap();
        }
    }
    wait_ledger_flushed(&server, Duration::from_secs(60));
    let sums = ledger_sums_by_user(&pg.url(), &schema);
    for round in 0..rounds {
        let get = |u: String| sums.get(&u).copied().unwrap_or_default();
        let (a, b) = (get(format!("alice{round}")), get(format!("bob{round}")));
        assert_eq!(
            (a.requests + b.requests, a.tokens + b.tokens),
            (5, 50),
            "round {round}: alice {a:?}, bob {b:?}"
        );
    }
}

/// `RENAME` onto an account flushed before: the moved usage starts a sequence of the new
/// name's and is billed, on the master, after a restart from the AOF, and on a replica that
/// takes over.
#[test]
fn rename_onto_a_flushed_account_loses_nothing() {
    for how in ["master", "aof", "replica"] {
        let (mut env, mut con) = TestEnv::start_con(&[("flush-interval", "1")]);
        let replica = (how == "replica").then(|| {
            let r = RedisServer::builder()
                .pg(&env.pg, &env.schema, "2000")
                .module_arg("flush-interval", "1")
                .replica_of(&env.server)
                .start();
            r.wait_replica_synced(&env.server, Duration::from_secs(30));
            r
        });
        if how == "aof" {
            let _: () = redis::cmd("CONFIG")
                .arg(&["SET", "appendonly", "yes", "appendfsync", "always"])
                .query(&mut con)
                .unwrap();
            // And at the restart.
            env.server.append_conf("appendonly yes");
            env.server.append_conf("appendfsync always");
            std::thread::sleep(Duration::from_millis(500));
        }
        let (alice, bob) = ([T, P, "alice", "web"], [T, P, "bob", "web"]);
        con.admit(alice, "");
        con.admit(bob, "");
        env.flushed();
        query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "3600"]).unwrap();
        for _ in 0..7 {
            con.admit(alice, "");
        }
        query(
            &mut con,
            &["RENAME", &account_key(alice), &account_key(bob)],
        )
        .unwrap();
        let server = match (how, replica) {
            ("aof", _) => {
                env.server.kill9();
                env.server.restart();
                &env.server
            }
            (_, Some(r)) => {
                r.wait_replica_synced(&env.server, Duration::from_secs(30));
                env.server.kill9();
                query(&mut r.client(), &["REPLICAOF", "NO", "ONE"]).unwrap();
                // The promoted node flushes what it holds.
                wait_until(Duration::from_secs(20), || {
                    env.ledger("bob", "requests") == 8
                });
                wait_ledger_flushed(&r, Duration::from_secs(30));
                assert_eq!(
                    (
                        env.ledger("alice", "requests"),
                        env.ledger("bob", "requests")
                    ),
                    (1, 8),
                    "{how}"
                );
                continue;
            }
            _ => &env.server,
        };
        query(
            &mut server.client(),
            &["CONFIG", "SET", "quota.flush-interval", "1"],
        )
        .unwrap();
        // A restarted node lists its accounts at its first tick: wait for the bill itself.
        wait_until(Duration::from_secs(20), || {
            env.ledger("bob", "requests") == 8
        });
        wait_ledger_flushed(server, Duration::from_secs(30));
        assert_eq!(
            (
                env.ledger("alice", "requests"),
                env.ledger("bob", "requests")
            ),
            (1, 8),
            "{how}"
        );
    }
}

/// `MOVE` and `SWAPDB` while batches are owed (PostgreSQL stopped): the answers follow the
/// keys into their new databases; and `FLUSHALL` drops only the usage not sent yet.
#[test]
fn move_and_swapdb_keep_the_ledger_exact_and_flushall_is_the_documented_loss() {
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
    let (carol, dan) = ([T, P, "carol", "web"], [T, P, "dan", "web"]);
    for _ in 0..3 {
        con.admit(carol, "");
        con.admit(dan, "");
    }
    pg.stop();
    wait_until(Duration::from_secs(10), || {
        info_i64(&server, "quota_ledger_flush_errors") > 0
    });
    query(&mut con, &["MOVE", &account_key(carol), "3"]).unwrap();
    query(&mut con, &["SWAPDB", "0", "5"]).unwrap();
    pg.start();
    wait_ledger_flushed(&server, Duration::from_secs(30));
    let sums = ledger_sums_by_user(&pg.url(), &schema);
    assert_eq!(sums["carol"].requests, 3);
    assert_eq!(sums["dan"].requests, 3);
    // Usage after the moves is counted on the keys where they are now.
    query(&mut con, &["SELECT", "5"]).unwrap();
    con.admit(dan, "");
    wait_ledger_flushed(&server, Duration::from_secs(30));
    assert_eq!(ledger_sums_by_user(&pg.url(), &schema)["dan"].requests, 4);
    // FLUSHALL: what was not sent yet is gone (documented); nothing breaks after it.
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "3600"]).unwrap();
    con.admit(dan, "");
    query(&mut con, &["FLUSHALL"]).unwrap();
    con.admit(dan, "");
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "1"]).unwrap();
    wait_ledger_flushed(&server, Duration::from_secs(30));
    assert_eq!(ledger_sums_by_user(&pg.url(), &schema)["dan"].requests, 5);
}

/// Under `maxmemory` with an eviction policy that takes account keys, the caches stay within
/// their byte budget, the policy is warned about, and every acknowledged admission of an
/// evicted account still reaches the ledger.
#[test]
fn heavy_evicted_accounts_are_still_billed() {
    let schema = unique_schema();
    let server = RedisServer::builder()
        .pg(&PgServer::shared(), &schema, "2000")
        .module_arg("flush-interval", "3600")
        .conf("maxmemory 24mb")
        .conf("maxmemory-policy noeviction")
        .start();
    let mut con = server.client();
    let warned = |server: &RedisServer| server.log().contains("maxmemory-policy is allkeys-lru");
    assert!(
        !server.log().contains("maxmemory-policy is"),
        "noeviction is safe"
    );
    query(
        &mut con,
        &["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"],
    )
    .unwrap();
    assert!(wait_until(Duration::from_secs(5), || warned(&server)));
    // 120,000 new users, 1,000 a transaction (a transaction decides at once: its credits load
    // in the background), until the node has evicted a good share of them.
    let mut allowed = 0i64;
    let mut refused = 0i64;
    for batch in 0..120 {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for i in 0..1000 {
            let user = format!("u{batch}x{i}");
            pipe.cmd("QUOTA.ADMIT")
                .arg(&[T, P, &user, "web", "COMPACT"]);
        }
        match pipe.query::<Vec<Vec<Value>>>(&mut con) {
            Ok(replies) => {
                allowed += replies
                    .iter()
                    .filter(|r| matches!(r[0], Value::Int(1)))
                    .count() as i64
            }
            // Out of memory (nothing evictable left): nothing of the transaction happened.
            Err(e) => {
                assert!(e.to_string().contains("OOM"), "{e}");
                refused += 1;
            }
        }
    }
    let evicted = info_i64_in(&server, "stats", "evicted_keys");
    eprintln!("{allowed} admitted, {refused} transactions refused (OOM), {evicted} keys evicted");
    assert!(evicted > 10_000, "{evicted} keys evicted");
    let cache = info_i64(&server, "quota_cache_bytes");
    let budget = info_i64(&server, "quota_cache_max_bytes");
    assert_eq!(budget, 24 * 1024 * 1024 / 10);
    assert!(
        cache <= budget,
        "{cache} bytes of cache over the budget {budget}"
    );
    query(&mut con, &["CONFIG", "SET", "quota.flush-interval", "1"]).unwrap();
    // No command here needed PostgreSQL: the schema may still be on its way (`None`).
    let billed = || {
        try_sql_i64(
            &PgServer::shared(),
            &schema,
            "SELECT coalesce(sum(requests), 0) FROM {h}",
        )
    };
    let all_in = wait_until(Duration::from_secs(90), || billed() == Some(allowed));
    assert!(
        all_in,
        "{:?} of {allowed} acknowledged admissions billed ({evicted} keys evicted, {refused} batches refused)",
        billed()
    );
}
