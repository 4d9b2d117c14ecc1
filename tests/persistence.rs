//! Usage survives restarts (AOF, RDB, AOF rewrite, SIGKILL under every persistence setup) and
//! replicates to a replica, as effects (`QUOTA.APPLY`: what a command changed, a few dozen
//! bytes whatever the account holds), never as `QUOTA.ADMIT` replayed. Every change counts as
//! a change for the RDB save rules, with or without an AOF or a replica.
//!
//! Every test runs its own redis-server(s) with the module on the shared PostgreSQL, one
//! schema per test.
mod common;

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use common::*;

/// Accounts the workload touches.
const DAILY: [&str; 4] = ["acme", "chat", "alice", "daily"];
const TOKENS: [&str; 4] = ["acme", "chat", "alice", "tokens"];
const LIFETIME: [&str; 4] = ["acme", "chat", "bob", "lifetime"];
const ACCOUNTS: [[&str; 4]; 3] = [DAILY, TOKENS, LIFETIME];

/// Admissions the workload makes on `DAILY`.
const DAILY_ADMITS: i64 = 5;
/// The lease left open by the workload (200 tokens reserved on `TOKENS`).
const OPEN_LEASE: &str = "lease-open";
/// The lease the workload commits (80 tokens).
const DONE_LEASE: &str = "lease-done";

// ---------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------

/// Keeps a test away from an hour boundary (day and month boundaries are hour boundaries):
/// a window ending between "before" and "after" would change the counters compared.
fn avoid_window_edge() {
    let left = (now_s().div_euclid(3600) + 1) * 3600 - now_s();
    if left < 30 {
        thread::sleep(Duration::from_secs((left + 1) as u64));
    }
}

/// A builder for Redis with the module on the shared PostgreSQL and `schema`.
fn builder(schema: &str) -> RedisBuilder {
    let url = PgServer::shared();
    RedisServer::builder().pg(&url, schema, "2000")
}

fn start(conf: &[&str]) -> RedisServer {
    avoid_window_edge();
    let mut b = builder(&unique_schema());
    for line in conf {
        b = b.conf(line);
    }
    b.start()
}

/// Admits, reserves, commits, leaves a lease open: the state every test expects to keep.
fn workload(con: &mut redis::Connection) {
    for _ in 0..DAILY_ADMITS {
        let m = con.admit(DAILY, "REQUESTS_PER_DAY 100");
        assert!(m.allowed, "{m:?}");
    }
    let tok = Opts::words("TOKENS_PER_DAY 1000");
    let m = con.admit(TOKENS, tok.clone().reserve(200).lease(OPEN_LEASE));
    assert_eq!(m.reserved, 200, "{m:?}");
    let m = con.admit(TOKENS, tok.reserve(100).lease(DONE_LEASE));
    assert_eq!(m.reserved, 100, "{m:?}");
    let c = con.commit(TOKENS, 80, Some(DONE_LEASE));
    assert!(c.lease_held, "{c:?}");
    con.commit(TOKENS, 15, None);
    for _ in 0..3 {
        assert!(con.admit(LIFETIME, "TOTAL_REQUESTS 10").allowed);
    }
}

/// USAGE of every account.
fn snapshot(con: &mut redis::Connection) -> Vec<Usage> {
    ACCOUNTS.iter().map(|acc| con.usage(*acc)).collect()
}

/// `QUOTA.ADMIT acc` from a Lua script (propagated as the script's effects), which must succeed.
fn eval_admit(con: &mut redis::Connection, acc: [&str; 4]) {
    let script = redis::cmd("EVAL")
        .arg("return redis.call('QUOTA.ADMIT', unpack(ARGV))")
        .arg(0)
        .arg(&acc[..])
        .query::<Value>(con);
    assert!(script.is_ok(), "EVAL: {script:?}");
}

/// Restarts `server` (`con` closed first) and asserts every account's QUOTA.USAGE is still
/// `before`; a connection to the restarted server.
fn restart_keeps(
    server: &mut RedisServer,
    con: redis::Connection,
    before: &[Usage],
    what: &str,
) -> redis::Connection {
    drop(con);
    server.restart();
    let mut con = server.client();
    assert_eq!(snapshot(&mut con), before, "QUOTA.USAGE after {what}");
    con
}

/// What the workload left, checked field by field (so a broken snapshot cannot pass).
fn assert_workload_state(snap: &[Usage]) {
    let [daily, tokens, lifetime] = snap else {
        panic!("three accounts expected: {snap:?}");
    };
    assert_eq!(daily.requests_per_day, DAILY_ADMITS, "{daily:?}");
    assert_eq!(daily.total_requests, DAILY_ADMITS, "{daily:?}");
    assert_eq!(tokens.requests_per_day, 2, "{tokens:?}");
    assert_eq!(tokens.tokens_per_day, 95, "{tokens:?}");
    assert_eq!(tokens.tokens_per_hour, 95, "{tokens:?}");
    assert_eq!(tokens.in_flight, 1, "{tokens:?}");
    assert_eq!(tokens.reserved, 200, "{tokens:?}");
    assert_eq!(lifetime.total_requests, 3, "{lifetime:?}");
}

/// After a restart or on a promoted replica: the open lease is still held, the committed one
/// is still settled, key expiries are kept, and admission continues from the same counts.
fn assert_continues(con: &mut redis::Connection) {
    let key = account_key(DAILY);
    // The key gets its expiry back once its usage reached the ledger (the first flush after a
    // start or a promotion runs at once).
    wait_until(Duration::from_secs(20), || {
        query_i64(con, &["PTTL", &key]) > 0
    });
    let pttl = query_i64(con, &["PTTL", &key]);
    assert!(pttl > 0, "{key} lost its TTL: PTTL {pttl}");
    assert_eq!(
        query_i64(con, &["PTTL", &account_key(LIFETIME)]),
        -1,
        "a lifetime account never expires"
    );
    let again = con.commit(TOKENS, 80, Some(DONE_LEASE));
    assert!(
        again.duplicate,
        "the settled lease was forgotten: {again:?}"
    );
    let m = con.admit(TOKENS, ["TOKENS_PER_DAY", "1000", "LEASE", OPEN_LEASE]);
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.reserved, 200, "the open lease is held: {m:?}");
    assert_eq!(con.usage(TOKENS).requests_per_day, 2, "re-admit counted");
    let c = con.commit(TOKENS, 150, Some(OPEN_LEASE));
    assert!(c.lease_held, "{c:?}");
    let u = con.usage(TOKENS);
    assert_eq!(u.tokens_per_day, 245);
    assert_eq!(u.reserved, 0);
    // DAILY holds DAILY_ADMITS: a limit of DAILY_ADMITS + 1 admits exactly one more.
    let limit = (DAILY_ADMITS + 1).to_string();
    assert!(con.admit(DAILY, ["REQUESTS_PER_DAY", &limit]).allowed);
    let m = con.admit(DAILY, ["REQUESTS_PER_DAY", &limit]);
    assert!(!m.allowed, "counts restarted from zero: {m:?}");
    let m = con.admit(LIFETIME, "TOTAL_REQUESTS 4");
    assert!(m.allowed, "{m:?}");
    assert!(!con.admit(LIFETIME, "TOTAL_REQUESTS 4").allowed);
}

/// Every file of the AOF (Redis 7: `appendonlydir/`; older layouts: `appendonly.aof`), as
/// (file name, lossy text).
fn aof_files(dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let aof_dir = dir.join("appendonlydir");
    if let Ok(rd) = fs::read_dir(&aof_dir) {
        for e in rd.flatten() {
            let bytes = fs::read(e.path()).unwrap_or_default();
            out.push((
                e.file_name().to_string_lossy().into_owned(),
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    if let Ok(bytes) = fs::read(dir.join("appendonly.aof")) {
        out.push((
            "appendonly.aof".to_string(),
            String::from_utf8_lossy(&bytes).into_owned(),
        ));
    }
    out.sort();
    out
}

/// The text of the current AOF base file (the rewrite's output), named by the manifest.
fn aof_base(dir: &Path) -> String {
    let aof_dir = dir.join("appendonlydir");
    let manifest = fs::read_dir(&aof_dir)
        .unwrap_or_else(|e| panic!("{}: {e}", aof_dir.display()))
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".manifest"))
        .map(|e| fs::read_to_string(e.path()).expect("read the AOF manifest"))
        .expect("no AOF manifest");
    let name = manifest
        .lines()
        .find(|l| {
            l.split_whitespace()
                .collect::<Vec<_>>()
                .ends_with(&["type", "b"])
        })
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("no base file in the manifest:\n{manifest}"));
    let bytes = fs::read(aof_dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    String::from_utf8_lossy(&bytes).into_owned()
}

fn count_ci(haystack: &str, needle: &str) -> usize {
    haystack
        .to_ascii_uppercase()
        .matches(&needle.to_ascii_uppercase())
        .count()
}

/// Changes since the last RDB save: what the save rules count.
fn changes(server: &RedisServer) -> i64 {
    info_i64_in(server, "persistence", "rdb_changes_since_last_save")
}

/// Waits until a background save has written every change to dump.rdb.
fn wait_snapshot(server: &RedisServer) {
    let saved = wait_until(Duration::from_secs(30), || {
        let p = server.info("persistence");
        p.get("rdb_changes_since_last_save").map(String::as_str) == Some("0")
            && p.get("rdb_bgsave_in_progress").map(String::as_str) == Some("0")
    });
    assert!(saved, "no snapshot: {:?}", server.info("persistence"));
    assert_eq!(
        info_str_in(server, "persistence", "rdb_last_bgsave_status"),
        "ok"
    );
}

/// Runs one command and returns how many bytes it added to the AOF (`appendfsync always`:
/// written before the reply).
fn aof_bytes(server: &RedisServer, con: &mut redis::Connection, args: &[&str]) -> i64 {
    let size = || info_i64_in(server, "persistence", "aof_current_size");
    let before = size();
    query(con, args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
    size() - before
}

/// What an account key holds, byte for byte (`DUMP`: the encoded state), and its expiry
/// (`PEXPIRETIME`).
fn account_state(con: &mut redis::Connection, acc: [&str; 4]) -> (Value, i64) {
    let key = account_key(acc);
    let dump = query(con, &["DUMP", &key]).unwrap_or_else(|e| panic!("DUMP {key}: {e}"));
    (dump, query_i64(con, &["PEXPIRETIME", &key]))
}

fn wait_aof_rewrite_done(server: &RedisServer) {
    let done = wait_until(Duration::from_secs(30), || {
        let p = server.info("persistence");
        p.get("aof_rewrite_in_progress").map(String::as_str) == Some("0")
            && p.get("aof_rewrite_scheduled").map(String::as_str) == Some("0")
    });
    assert!(done, "BGREWRITEAOF did not finish in 30 s");
    assert_eq!(
        info_str_in(server, "persistence", "aof_last_bgrewrite_status"),
        "ok"
    );
}

// ---------------------------------------------------------------------------
// Restarts
// ---------------------------------------------------------------------------

#[test]
fn usage_survives_a_restart_with_aof() {
    let mut server = start(&["appendonly yes", "appendfsync always"]);
    let mut con = server.client();
    workload(&mut con);
    let before = snapshot(&mut con);
    assert_workload_state(&before);
    let mut con = restart_keeps(&mut server, con, &before, "an AOF restart");
    assert_continues(&mut con);
}

/// A node with no AOF and no replica counts a change without propagating it (see
/// `ffi/quiet.rs`); once the AOF is turned on, every change goes to it as its effect: the
/// AOF never holds a `QUOTA.ADMIT` (which a load would decide again, with its own clock), and
/// a restart from it gives back what was counted.
#[test]
fn an_aof_turned_on_at_runtime_gets_effects_never_admissions() {
    let mut server = start(&[]);
    let mut con = server.client();
    let changes =
        |server: &RedisServer| info_i64_in(server, "persistence", "rdb_changes_since_last_save");
    let before = changes(&server);
    for _ in 0..3 {
        assert!(con.admit(DAILY, "REQUESTS_PER_DAY 100").allowed);
    }
    // Nothing listened, and the save rules still saw three changes.
    assert!(
        changes(&server) >= before + 3,
        "the admissions count as changes"
    );
    query(
        &mut con,
        &[
            "CONFIG",
            "SET",
            "appendonly",
            "yes",
            "appendfsync",
            "always",
        ],
    )
    .expect("CONFIG SET appendonly yes");
    wait_aof_rewrite_done(&server);
    for _ in 0..2 {
        assert!(con.admit(DAILY, "REQUESTS_PER_DAY 100").allowed);
    }
    let files = aof_files(server.dir());
    let text: String = files.iter().map(|(_, t)| t.as_str()).collect();
    assert!(
        text.contains("QUOTA.APPLY"),
        "the AOF has the effects: {files:?}"
    );
    assert!(
        !text.contains("QUOTA.ADMIT"),
        "the AOF must never hold an admission: {files:?}"
    );
    server.append_conf("appendonly yes");
    drop(con);
    server.restart();
    let mut con = server.client();
    assert_eq!(
        con.usage(DAILY).requests_per_day,
        5,
        "restarted from the AOF"
    );
}

#[test]
fn usage_survives_a_restart_with_rdb() {
    let mut server = start(&[]);
    let mut con = server.client();
    workload(&mut con);
    let before = snapshot(&mut con);
    assert_workload_state(&before);
    query(&mut con, &["SAVE"]).expect("SAVE");
    let mut con = restart_keeps(&mut server, con, &before, "SAVE and restart");
    assert!(
        aof_files(server.dir()).is_empty(),
        "no AOF expected: the state must come from dump.rdb"
    );

    // With a save point, SHUTDOWN itself writes the RDB.
    query(&mut con, &["CONFIG", "SET", "save", "3600 1"]).expect("CONFIG SET save");
    assert_continues(&mut con);
    let before = snapshot(&mut con);
    restart_keeps(&mut server, con, &before, "a saving SHUTDOWN");
}

#[test]
fn usage_survives_an_aof_rewrite() {
    let mut server = start(&["appendonly yes", "aof-use-rdb-preamble no"]);
    let mut con = server.client();
    wait_aof_rewrite_done(&server);
    workload(&mut con);
    let before = snapshot(&mut con);
    assert_workload_state(&before);
    query(&mut con, &["BGREWRITEAOF"]).expect("BGREWRITEAOF");
    wait_aof_rewrite_done(&server);
    let base = aof_base(server.dir());
    assert_eq!(
        count_ci(&base, "QUOTA.SETSTATE"),
        ACCOUNTS.len(),
        "the rewrite writes one QUOTA.SETSTATE per account:\n{base}"
    );
    for acc in ACCOUNTS {
        assert!(
            base.contains(&account_key(acc)),
            "{} not in the rewrite",
            account_key(acc)
        );
    }
    let mut con = restart_keeps(&mut server, con, &before, "rewrite and restart");
    assert_continues(&mut con);
}

/// The workload, then `durable` (waits until the setup has the changes on disk), SIGKILL and
/// a restart: exact counts, open leases, reservations and settled ids are all back.
fn sigkill_keeps_exact_counts(conf: &[&str], durable: impl FnOnce(&RedisServer)) {
    let mut server = start(conf);
    let mut con = server.client();
    workload(&mut con);
    let before = snapshot(&mut con);
    assert_workload_state(&before);
    drop(con);
    durable(&server);
    server.kill9();
    server.restart();
    let mut con = server.client();
    assert_eq!(snapshot(&mut con), before, "QUOTA.USAGE after SIGKILL");
    assert_continues(&mut con);
}

#[test]
fn usage_survives_sigkill_with_rdb_save_rules() {
    // The save rule takes the snapshot on its own: every change counted.
    sigkill_keeps_exact_counts(&["save 1 1"], wait_snapshot);
}

#[test]
fn usage_survives_sigkill_with_appendfsync_everysec() {
    // everysec may leave acknowledged writes in Redis's AOF buffer for up to 2 s (while a
    // background fsync runs); a SIGKILL loses those, never what was written (the kernel keeps
    // it). The test tolerates that window by waiting until the buffer is empty, then expects
    // every count.
    sigkill_keeps_exact_counts(&["appendonly yes", "appendfsync everysec"], |server| {
        let written = wait_until(Duration::from_secs(10), || {
            info_i64_in(server, "persistence", "aof_buffer_length") == 0
        });
        assert!(written, "the AOF buffer was not written within 10 s");
    });
}

#[test]
fn usage_survives_sigkill_with_appendfsync_always() {
    // Written before the reply: nothing to wait for.
    sigkill_keeps_exact_counts(&["appendonly yes", "appendfsync always"], |_| {});
}

#[test]
fn usage_counts_as_a_change_on_an_rdb_only_node() {
    // No AOF, no replica, a save rule that cannot fire during the admissions.
    let mut server = start(&["save 3600 1"]);
    assert_eq!(info_str_in(&server, "persistence", "aof_enabled"), "0");
    assert_eq!(info_str_in(&server, "replication", "connected_slaves"), "0");
    let mut con = server.client();
    let before = changes(&server);
    for _ in 0..50 {
        assert!(con.admit(DAILY, "REQUESTS_PER_DAY 100").allowed);
    }
    con.commit(TOKENS, 15, None);
    let counted = changes(&server) - before;
    assert!(
        counted >= 51,
        "50 admissions and a commit counted as {counted} changes"
    );
    // A release, a reset, and the pruning of an expired lease count too.
    let leased: [&str; 4] = ["acme", "chat", "carol", "leased"];
    assert!(con.admit(leased, "LEASE r1").allowed);
    let before = changes(&server);
    assert_eq!(con.release(leased, "r1"), 1);
    assert_eq!(changes(&server) - before, 1, "a release is a change");
    con.commit(leased, 5, None);
    let before = changes(&server);
    assert_eq!(con.reset(leased), 1);
    assert_eq!(changes(&server) - before, 1, "a reset is a change");
    assert!(con.admit(leased, "LEASE r2 LEASE_TTL 1").allowed);
    thread::sleep(Duration::from_millis(1300));
    let before = changes(&server);
    // A denied admission that finds the expired lease drops it: that changes the state.
    assert!(
        !con.admit(leased, "REQUESTS_PER_DAY 0 MAX_CONCURRENT 1")
            .allowed
    );
    assert_eq!(
        changes(&server) - before,
        1,
        "pruning an expired lease is a change"
    );
    // With `save 2 1` a snapshot follows.
    query(&mut con, &["CONFIG", "SET", "save", "2 1"]).expect("CONFIG SET save");
    wait_snapshot(&server);
    drop(con);
    server.kill9();
    server.restart();
    let mut con = server.client();
    assert_eq!(con.usage(DAILY).requests_per_day, 50);
    assert_eq!(con.usage(TOKENS).tokens_per_day, 15);
}

#[test]
fn the_aof_records_effects_never_the_commands() {
    let server = start(&["appendonly yes", "appendfsync always"]);
    let mut con = server.client();
    workload(&mut con);
    let m = con.admit(DAILY, "LEASE to-release");
    assert!(m.allowed);
    assert_eq!(
        query_i64(
            &mut con,
            &with_account("QUOTA.RELEASE", DAILY, &["to-release"])
        ),
        1
    );
    eval_admit(&mut con, DAILY);
    let files = aof_files(server.dir());
    assert!(
        !files.is_empty(),
        "no AOF files in {}",
        server.dir().display()
    );
    let all: String = files.iter().map(|(_, text)| text.as_str()).collect();
    // 15 state changes, one QUOTA.APPLY each: the workload's 5 + 2 admits, 2 commits and
    // 3 admits, then an admit, a release and an admit from a script.
    let effects = count_ci(&all, "QUOTA.APPLY");
    assert_eq!(effects, 15, "QUOTA.APPLY in the AOF:\n{all}");
    for command in [
        "QUOTA.ADMIT",
        "QUOTA.COMMIT",
        "QUOTA.RELEASE",
        "QUOTA.SETSTATE",
    ] {
        assert_eq!(count_ci(&all, command), 0, "{command} in the AOF:\n{all}");
    }
}

// ---------------------------------------------------------------------------
// Replication
// ---------------------------------------------------------------------------

fn assert_same_usage(master: &RedisServer, replica: &RedisServer, accounts: &[[&str; 4]]) {
    replica.wait_replica_synced(master, Duration::from_secs(30));
    let mut m = master.client();
    let mut r = replica.client();
    for acc in accounts {
        assert_eq!(
            r.usage(*acc),
            m.usage(*acc),
            "QUOTA.USAGE {acc:?} on the replica vs the master"
        );
        assert_eq!(
            account_state(&mut r, *acc),
            account_state(&mut m, *acc),
            "the state and expiry of {acc:?} on the replica vs the master"
        );
    }
}

#[test]
fn a_replica_follows_the_master_and_takes_over() {
    avoid_window_edge();
    let schema = unique_schema();
    let master = builder(&schema).start();
    let mut mc = master.client();
    // Before the replica exists: reaches it by full sync (RDB).
    workload(&mut mc);
    let replica = builder(&schema).replica_of(&master).start();
    assert_same_usage(&master, &replica, &ACCOUNTS);

    // After: reaches it as a stream of state changes.
    let more = ["acme", "chat", "carol", "main"];
    for _ in 0..4 {
        mc.admit(more, "MAX_CONCURRENT 10 RESERVE 5");
    }
    let lease = mc.admit(more, "LEASE rel").lease();
    assert_eq!(
        query_i64(&mut mc, &with_account("QUOTA.RELEASE", more, &[&lease])),
        1
    );
    mc.commit(more, 42, None);
    eval_admit(&mut mc, more);
    let mut p = redis::pipe();
    p.atomic()
        .add_command(cmd(&with_account("QUOTA.ADMIT", more, &[])))
        .add_command(cmd(&with_account("QUOTA.ADMIT", more, &[])));
    let _: Vec<Value> = p.query(&mut mc).expect("MULTI/EXEC");

    // A cold user: the first admit blocks on a PostgreSQL load, then decides.
    let cold = ["acme", "chat", "dave", "main"];
    query_map(
        &mut mc,
        &with_account(
            "QUOTA.GRANT",
            ["acme", "chat", "dave", "*"],
            &["REQUESTS_PER_DAY", "3"],
        ),
    );
    query(&mut mc, &["QUOTA.INVALIDATE", "acme", "chat", "dave"]).expect("INVALIDATE");
    let misses = |s: &RedisServer| -> i64 {
        info_str_in(s, "quota", "quota_cache_misses")
            .parse()
            .expect("quota_cache_misses")
    };
    let before = misses(&master);
    for i in 0..2 {
        let m = mc.admit(cold, "REQUESTS_PER_DAY 0");
        assert!(m.allowed, "cold admit {i}: {m:?}");
        assert_eq!(m.credit, "global");
    }
    assert!(
        misses(&master) > before,
        "the first admit was not a cache miss"
    );

    let everyone = [DAILY, TOKENS, LIFETIME, more, cold];
    assert_same_usage(&master, &replica, &everyone);
    let mut rc = replica.client();
    assert_eq!(rc.usage(more).requests_per_day, 7);
    assert_eq!(rc.usage(more).in_flight, 4);
    assert_eq!(rc.usage(more).tokens_per_day, 42);
    assert_eq!(
        rc.usage(cold).requests_per_day,
        2,
        "the cold user's admits reached the replica"
    );
    let key = account_key(cold);
    // Once the master's flush acknowledgement reached it (within quota.flush-interval).
    wait_until(Duration::from_secs(30), || {
        query_i64(&mut rc, &["PTTL", &key]) > 0
    });
    let pttl = query_i64(&mut rc, &["PTTL", &key]);
    assert!(pttl > 0, "{key} on the replica: PTTL {pttl}");
    let kind = query(&mut rc, &["TYPE", &key]).expect("TYPE");
    assert_eq!(value_to_string(&kind).as_deref(), Some("quota-acc"));

    // The replica refuses writes.
    for (name, opts) in [
        ("QUOTA.ADMIT", vec!["REQUESTS_PER_DAY", "100"]),
        ("QUOTA.COMMIT", vec!["5"]),
        ("QUOTA.RELEASE", vec![OPEN_LEASE]),
        ("QUOTA.RESET", vec![]),
    ] {
        let err = query_err(&mut rc, &with_account(name, DAILY, &opts));
        assert!(err.starts_with("READONLY"), "{name} on a replica: {err}");
    }
    assert_same_usage(&master, &replica, &everyone);

    // Promoted, it continues from the same usage.
    query(&mut rc, &["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    assert_continues(&mut rc);
    let m = rc.admit(cold, "REQUESTS_PER_DAY 0");
    assert!(m.allowed, "3rd of 3 credits: {m:?}");
    assert_eq!(m.credit, "global");
    assert!(!rc.admit(cold, "REQUESTS_PER_DAY 0").allowed);
}

#[test]
fn usage_survives_sigkill_of_the_master_on_its_replica() {
    avoid_window_edge();
    let schema = unique_schema();
    let mut master = builder(&schema).start();
    // The replica keeps its own AOF of what it applied.
    let mut replica = builder(&schema)
        .replica_of(&master)
        .conf("appendonly yes")
        .conf("appendfsync always")
        .start();
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    wait_aof_rewrite_done(&replica);
    let mut mc = master.client();
    workload(&mut mc);
    let before = snapshot(&mut mc);
    assert_workload_state(&before);
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    drop(mc);
    master.kill9();
    let mut rc = replica.client();
    assert_eq!(snapshot(&mut rc), before, "on the replica, the master dead");
    drop(rc);
    replica.kill9();
    replica.restart();
    let mut rc = replica.client();
    assert_eq!(
        snapshot(&mut rc),
        before,
        "on the replica restarted from its own AOF"
    );
    query(&mut rc, &["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    assert_continues(&mut rc);
}

#[test]
fn one_command_writes_little_to_the_aof_whatever_the_leases_held() {
    avoid_window_edge();
    let schema = unique_schema();
    let master = builder(&schema)
        .conf("appendonly yes")
        .conf("appendfsync always")
        .start();
    let replica = builder(&schema).replica_of(&master).start();
    let mut con = master.client();
    let big = ["acme", "chat", "erin", "big"];
    let one = ["acme", "chat", "erin", "one"];
    // 128-byte lease ids, the longest allowed.
    let id = |i: usize| format!("{i:0>128}");
    fn take(lease: &str) -> [&str; 8] {
        let ttl = ["LEASE_TTL", "3600", "LEASE", lease];
        [
            "MAX_CONCURRENT",
            "5000",
            "RESERVE",
            "1",
            ttl[0],
            ttl[1],
            ttl[2],
            ttl[3],
        ]
    }
    let mut p = redis::pipe();
    for i in 0..4095 {
        p.add_command(cmd(&with_account("QUOTA.ADMIT", big, &take(&id(i)))))
            .ignore();
    }
    p.add_command(cmd(&with_account("QUOTA.ADMIT", one, &take(&id(0)))))
        .ignore();
    p.query::<()>(&mut con).expect("4,096 admissions");
    assert_eq!(con.usage(big).in_flight, 4095);

    // The same three commands on an account with 4,095 leases and on one with a single lease.
    let mut written = Vec::new();
    for (acc, last) in [(big, 4095), (one, 1)] {
        let (first, last) = (id(0), id(last));
        written.push([
            aof_bytes(
                &master,
                &mut con,
                &with_account("QUOTA.ADMIT", acc, &take(&last)),
            ),
            aof_bytes(
                &master,
                &mut con,
                &with_account("QUOTA.COMMIT", acc, &["1", "LEASE", &first]),
            ),
            aof_bytes(
                &master,
                &mut con,
                &with_account("QUOTA.RELEASE", acc, &[&last]),
            ),
        ]);
    }
    eprintln!(
        "AOF bytes (admit, commit, release): 4,095 leases {:?}, one lease {:?}",
        written[0], written[1]
    );
    let [big_bytes, one_bytes] = [written[0], written[1]];
    for (what, (b, o)) in ["admit", "commit", "release"]
        .iter()
        .zip(big_bytes.iter().zip(one_bytes.iter()))
    {
        assert!(*b > 0 && *b < 1024, "one {what} wrote {b} bytes to the AOF");
        assert!(
            (b - o).abs() <= 16,
            "one {what} wrote {b} bytes with 4,095 leases, {o} with one"
        );
    }
    let u = con.usage(big);
    assert_eq!(u.in_flight, 4094, "{u:?}");
    assert_eq!(u.tokens_per_day, 1, "{u:?}");
    let again = con.commit(big, 1, Some(&id(0)));
    assert!(again.duplicate, "{again:?}");
    assert_same_usage(&master, &replica, &[big, one]);
}

#[test]
fn pruning_expired_leases_counts_and_replicates() {
    avoid_window_edge();
    let schema = unique_schema();
    let master = builder(&schema).start();
    let replica = builder(&schema).replica_of(&master).start();
    let mut con = master.client();
    let acc = ["acme", "chat", "frank", "main"];
    let limit = ["REQUESTS_PER_DAY", "100"];
    assert!(
        con.admit(acc, [limit[0], limit[1], "LEASE", "done"])
            .allowed
    );
    con.commit(acc, 5, Some("done"));
    // Commands that decide nothing new, but drop the leases that expired meanwhile.
    let repeated_commit = with_account("QUOTA.COMMIT", acc, &["5", "LEASE", "done"]);
    let unknown_release = with_account("QUOTA.RELEASE", acc, &["never-taken"]);
    let denied_admit = with_account("QUOTA.ADMIT", acc, &["REQUESTS_PER_DAY", "1"]);
    for step in [repeated_commit, unknown_release, denied_admit] {
        for _ in 0..3 {
            let short = [limit[0], limit[1], "MAX_CONCURRENT", "10", "LEASE_TTL", "1"];
            assert!(con.admit(acc, short).allowed);
        }
        thread::sleep(Duration::from_millis(1300));
        assert_same_usage(&master, &replica, &[acc]);
        let (held, _) = account_state(&mut con, acc);
        let before = changes(&master);
        let reply = query(&mut con, &step).unwrap_or_else(|e| panic!("{step:?}: {e}"));
        assert!(
            changes(&master) > before,
            "{step:?} ({reply:?}) dropped expired leases: a change"
        );
        let (pruned, _) = account_state(&mut con, acc);
        assert_ne!(pruned, held, "{step:?} dropped nothing");
        assert_same_usage(&master, &replica, &[acc]);
    }
}

#[test]
fn a_replica_and_the_aof_hold_the_masters_exact_state_after_a_random_workload() {
    avoid_window_edge();
    let schema = unique_schema();
    let mut master = builder(&schema)
        .conf("appendonly yes")
        .conf("appendfsync always")
        .start();
    let replica = builder(&schema).replica_of(&master).start();
    let mut con = master.client();
    let accounts = [
        ["acme", "chat", "gina", "a"],
        ["acme", "chat", "gina", "b"],
        ["acme", "chat", "hank", "a"],
    ];
    let seed = random_u64() | 1;
    eprintln!("seed {seed}");
    let mut rng = seed;
    let mut next = move |n: usize| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % n as u64) as usize
    };
    let mut leases: Vec<String> = vec!["never-taken".into()];
    for step in 0..400 {
        let acc = accounts[next(accounts.len())];
        let lease = leases[next(leases.len())].clone();
        let tokens = next(50) as i64;
        let reserve = next(300).to_string();
        match next(8) {
            0..=3 => {
                let mut opts = vec!["REQUESTS_PER_DAY", "60", "TOKENS_PER_DAY", "2000"];
                let extra: [&[&str]; 6] = [
                    &["MAX_CONCURRENT", "6"],
                    &["RESERVE", &reserve],
                    &["LEASE_TTL", "1"],
                    &["TOTAL_REQUESTS", "500"],
                    &["LEASE", &lease],
                    &["PEEK"],
                ];
                for (i, e) in extra.iter().enumerate() {
                    if next(if i == 5 { 10 } else { 3 }) == 0 {
                        opts.extend_from_slice(e);
                    }
                }
                let m = con.admit(acc, &opts);
                if let Some(l) = m.lease.clone() {
                    leases.push(l);
                }
            }
            4 | 5 => {
                let named = (next(3) != 0).then_some(lease.as_str());
                con.commit(acc, tokens, named);
            }
            6 => {
                query(&mut con, &with_account("QUOTA.RELEASE", acc, &[&lease]))
                    .unwrap_or_else(|e| panic!("step {step}: {e}"));
            }
            _ => thread::sleep(Duration::from_millis(if next(4) == 0 { 400 } else { 5 })),
        }
    }
    assert_same_usage(&master, &replica, &accounts);
    let states: Vec<_> = accounts
        .iter()
        .map(|acc| account_state(&mut con, *acc))
        .collect();
    drop(con);
    master.kill9();
    master.restart();
    let mut con = master.client();
    for (acc, state) in accounts.iter().zip(&states) {
        assert_eq!(
            &account_state(&mut con, *acc),
            state,
            "{acc:?} replayed from the AOF (seed {seed})"
        );
    }
}
