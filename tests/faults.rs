//! Faults: a stalled PostgreSQL (SIGSTOP, a row lock held by another session), Redis
//! `SHUTDOWN` while clients wait on PostgreSQL, and Redis killed with SIGKILL under
//! `appendfsync always`. (PostgreSQL stopped and started is tests/pg_outage.rs; graceful
//! RDB/AOF restarts are tests/persistence.rs.)
//!
//! Every test has a PostgreSQL of its own (`PgServer::start_private`), so pausing it never
//! disturbs another test; a drop guard always resumes it.
mod common;

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// `quota.pg-timeout-ms` of the stall tests.
const PG_TIMEOUT_MS: u64 = 1000;
/// The most a client may wait on a stalled PostgreSQL: the timeout plus one second.
const ANSWER_WITHIN: Duration = Duration::from_millis(PG_TIMEOUT_MS + 1000);
/// The most a command that never needs PostgreSQL may take while it is stalled: a quarter of
/// the timeout. Waiting on the stalled PostgreSQL anywhere on Redis's main thread would cost at
/// least the whole timeout; anything below is the scheduler of a loaded 2-core test machine
/// (4 test threads, each with servers), not the module. Speed itself is `make bench`'s.
const FAST: Duration = Duration::from_millis(PG_TIMEOUT_MS / 4);

/// Resumes a paused PostgreSQL when dropped, whatever happened in between.
struct ResumeOnDrop<'a>(&'a PgServer);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// A connection with a bounded read timeout, so that a hung reply fails the test instead of
/// hanging it.
fn client(server: &RedisServer, read_timeout: Duration) -> redis::Connection {
    let con = server.client();
    con.set_read_timeout(Some(read_timeout))
        .expect("set_read_timeout");
    con
}

/// The text of a server error reply, or `None` when the error is not a reply (I/O, timeout,
/// closed connection).
fn server_error(e: &redis::RedisError) -> Option<String> {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        None
    } else {
        Some(error_text(e))
    }
}

/// Runs `f`, returning its result and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let started = Instant::now();
    let out = f();
    (out, started.elapsed())
}

fn owned(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

fn query_owned(con: &mut redis::Connection, args: &[String]) -> redis::RedisResult<Value> {
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    query(con, &refs)
}

/// A module server on `pg` with these extra module arguments.
fn server_on(pg: &PgServer, schema: &str, extra: &[(&str, &str)]) -> RedisServer {
    RedisServer::builder()
        .module_args(&[("pg-url", &pg.url()), ("schema", schema)])
        .module_args(extra)
        .start()
}

/// Gives these threads real-time priority (`chrt -f -p 10`; needs root, ignored otherwise),
/// so that on a busy shared machine the latency samples measure the server, not the wait for
/// a CPU behind other jobs. A main thread that waits on PostgreSQL still shows the whole wait.
fn raise_priority(tids: &[String]) {
    for tid in tids {
        let _ = Command::new("chrt")
            .args(["-f", "-p", "10", tid])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The calling thread's id.
fn own_tid() -> Option<String> {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// What the background sampler saw while PostgreSQL was stalled.
struct Samples {
    count: usize,
    max_ping: Duration,
    max_admit: Duration,
    /// Admissions of the cached user that were not admitted on its cached credit.
    bad_admits: Vec<String>,
}

/// Every 50 ms: `PING` on one connection and an `ADMIT` of a cached user on another, timing
/// each, until `stop` is set (at most 600 rounds).
fn start_sampler(
    server: &RedisServer,
    admit: Vec<String>,
    stop: Arc<AtomicBool>,
) -> thread::JoinHandle<Samples> {
    let mut ping_con = client(server, Duration::from_secs(10));
    let mut admit_con = client(server, Duration::from_secs(10));
    thread::spawn(move || {
        raise_priority(&own_tid().into_iter().collect::<Vec<_>>());
        let mut s = Samples {
            count: 0,
            max_ping: Duration::ZERO,
            max_admit: Duration::ZERO,
            bad_admits: Vec::new(),
        };
        for _ in 0..600 {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let (pong, took) = timed(|| query(&mut ping_con, &["PING"]));
            assert!(pong.is_ok(), "PING failed during the stall: {pong:?}");
            s.max_ping = s.max_ping.max(took);
            let (reply, took) = timed(|| query_owned(&mut admit_con, &admit));
            s.max_admit = s.max_admit.max(took);
            match reply.ok().and_then(try_to_map) {
                Some(m)
                    if field_i64(&m, "allowed") == 1
                        && field_str(&m, "credit").as_deref() == Some("global") => {}
                other => s.bad_admits.push(format!("{other:?}")),
            }
            s.count += 1;
            thread::sleep(Duration::from_millis(50));
        }
        s
    })
}

impl Samples {
    /// What a user of a cached account notices during the stall: nothing. Enough samples, every
    /// cached ADMIT admitted on its credit, PING and ADMIT well under `FAST`.
    fn assert_redis_stayed_fast(&self) {
        assert!(
            self.count >= 20,
            "only {} samples during the stall",
            self.count
        );
        assert!(
            self.bad_admits.is_empty(),
            "the cached user was not admitted on its cached credit during the stall: {:?}",
            self.bad_admits
        );
        assert!(
            self.max_ping < FAST,
            "PING took up to {:?} during the stall ({} samples)",
            self.max_ping,
            self.count
        );
        assert!(
            self.max_admit < FAST,
            "a cached ADMIT took up to {:?} during the stall ({} samples)",
            self.max_admit,
            self.count
        );
    }
}

/// Asserts that an ADMIT reply admitted, with this `credit`: `global` (on the cached
/// credit) or `unavailable` (on the base policy alone, PostgreSQL not answering).
fn assert_admitted(m: &Map, credit: &str) {
    assert_eq!(field_i64(m, "allowed"), 1, "{m:?}");
    assert_eq!(field_str(m, "credit").as_deref(), Some(credit), "{m:?}");
}

/// What one flooding client got.
struct Outcome {
    kind: &'static str,
    took: Duration,
    reply: Result<Value, String>,
}

/// `n` clients at once, each on a user of its own: the first `writes` send a GRANT, the others
/// alternately a cold GET and a cold ADMIT. What each got, and how long it took.
fn flood(server: &RedisServer, n: usize, writes: usize) -> Vec<Outcome> {
    let barrier = Arc::new(Barrier::new(n));
    let handles: Vec<_> = (0..n)
        .map(|i| {
            let mut c = client(server, Duration::from_secs(10));
            let barrier = Arc::clone(&barrier);
            let (kind, args) = match (i < writes, i % 2) {
                (true, _) => (
                    "GRANT",
                    format!("QUOTA.GRANT t p flood-{i} * TOKENS_PER_DAY 7"),
                ),
                (false, 0) => ("GET", format!("QUOTA.GET t p flood-{i} b")),
                (false, _) => (
                    "ADMIT",
                    format!("QUOTA.ADMIT t p flood-{i} b REQUESTS_PER_DAY 3"),
                ),
            };
            thread::spawn(move || {
                barrier.wait();
                let (reply, took) = timed(|| query_owned(&mut c, &args.to_args()));
                let reply = reply.map_err(|e| {
                    server_error(&e)
                        .unwrap_or_else(|| format!("NO REPLY (connection/timeout): {e}"))
                });
                Outcome { kind, took, reply }
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().expect("flood thread"))
        .collect()
}

/// Checks one flooding client's outcome: in time, and BUSY, an error naming PostgreSQL (GET,
/// GRANT) or an admission on the base policy (ADMIT). Whether it was BUSY.
fn check_flooded(o: &Outcome) -> bool {
    assert!(
        o.took <= ANSWER_WITHIN,
        "a flooding {} took {:?}: {:?}",
        o.kind,
        o.took,
        o.reply
    );
    match (&o.reply, o.kind) {
        (Err(e), _) if e.starts_with("BUSY") => return true,
        (Err(e), "GET" | "GRANT") => assert!(
            e.starts_with("ERR") && e.contains("PostgreSQL"),
            "{}: unclear error {e:?}",
            o.kind
        ),
        (Ok(v), "ADMIT") => assert_admitted(&to_map(v.clone()), "unavailable"),
        (other, kind) => panic!("flooding {kind}: unexpected {other:?}"),
    }
    false
}

/// Sends `command` until it succeeds, for at most `within`; every failure meanwhile must be a
/// server reply (not a hang or a dropped connection).
fn until_it_succeeds(con: &mut redis::Connection, command: &str, within: Duration) -> Map {
    let deadline = Instant::now() + within;
    loop {
        match query_owned(con, &command.to_args()) {
            Ok(v) => return to_map(v),
            Err(e) if Instant::now() < deadline => {
                assert!(server_error(&e).is_some(), "no reply to {command}: {e}");
                thread::sleep(Duration::from_millis(100));
            }
            Err(e) => panic!("{command} still failing after {within:?}: {e}"),
        }
    }
}

#[test]
fn stalled_postgres_answers_every_client_in_time_while_redis_stays_fast() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = server_on(
        &pg,
        &schema,
        &[
            ("pg-timeout-ms", "1000"),
            ("queue-max", "8"),
            ("pool-size", "2"),
        ],
    );
    let mut con = client(&server, Duration::from_secs(10));

    // A user whose credits are cached (write-through) before the stall; base 0: admitted only
    // thanks to the cached credit.
    con.grant(["t", "p", "warm", "*"], "REQUESTS_PER_DAY 1000");
    let warm_admit = "QUOTA.ADMIT t p warm b REQUESTS_PER_DAY 0".to_args();
    assert_admitted(
        &to_map(query_owned(&mut con, &warm_admit).expect("warm ADMIT")),
        "global",
    );

    // The Redis main thread (its tid is the pid); the module's threads keep their priority.
    if let Some(pid) = server.pid() {
        raise_priority(&[pid.to_string()]);
    }
    let _resume = ResumeOnDrop(&pg);
    pg.pause();
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = start_sampler(&server, warm_admit, Arc::clone(&stop));

    // A cold ADMIT is decided on the base policy once the wait runs out.
    let cold = "QUOTA.ADMIT t p cold-admit b REQUESTS_PER_DAY 3".to_args();
    let (reply, took) = timed(|| query_owned(&mut con, &cold));
    let m = to_map(reply.expect("cold ADMIT during the stall"));
    assert!(took <= ANSWER_WITHIN, "cold ADMIT took {took:?}");
    assert_admitted(&m, "unavailable");
    let left = field_i64(&m, "remaining_requests");
    assert_eq!(left, 2, "base policy only: {m:?}");

    // A cold GET and a GRANT fail with an error naming PostgreSQL, in time.
    for args in [
        "QUOTA.GET t p cold-get b",
        "QUOTA.GRANT t p cold-grant * REQUESTS_PER_DAY 1",
    ] {
        let (reply, took) = timed(|| query_owned(&mut con, &args.to_args()));
        let err = match reply {
            Ok(v) => panic!("{args:?} succeeded during the stall: {v:?}"),
            Err(e) => server_error(&e).unwrap_or_else(|| panic!("{args:?}: no reply: {e}")),
        };
        assert!(took <= ANSWER_WITHIN, "{args:?} took {took:?}");
        assert!(
            err.starts_with("ERR") && err.contains("PostgreSQL"),
            "{args:?}: unclear error {err:?}"
        );
    }

    // Flood: more writes than the pool (2) and the queue (8) hold, all at once, mixed with cold
    // reads. Writes are one job each, so at most 10 of them can be taken; cold loads queued
    // together may be taken by a free worker as one batch, so they only add capacity.
    let busy_before = info_i64(&server, "quota_queue_busy_rejections");
    let (n, writes) = (36, 24);
    let outcomes = flood(&server, n, writes);
    let depth = info_i64(&server, "quota_queue_depth");
    let busy_after = info_i64(&server, "quota_queue_busy_rejections");
    stop.store(true, Ordering::SeqCst);
    let samples = sampler.join().expect("sampler thread");

    let busy = outcomes.iter().filter(|o| check_flooded(o)).count();
    let busy_grant =
        |o: &&Outcome| o.kind == "GRANT" && o.reply.as_ref().is_err_and(|e| e.starts_with("BUSY"));
    let busy_writes = outcomes.iter().filter(busy_grant).count();
    // At most queue-max jobs wait and pool-size run; every other write is refused at once.
    assert!(
        busy_writes >= writes - 8 - 2,
        "only {busy_writes} of {writes} flooding writes got BUSY (queue-max 8, pool-size 2)"
    );
    assert!(
        busy_after - busy_before >= busy as i64,
        "INFO quota_queue_busy_rejections grew by {} for {busy} BUSY replies",
        busy_after - busy_before
    );
    assert!(depth <= 8, "queue depth {depth} above queue-max 8");
    samples.assert_redis_stayed_fast();
    eprintln!(
        "stall: {} samples, max PING {:?}, max cached ADMIT {:?}, {busy}/{n} BUSY",
        samples.count, samples.max_ping, samples.max_admit
    );

    // PostgreSQL back: a GRANT succeeds again (within 20 s, while stuck jobs drain).
    pg.resume();
    let after = "QUOTA.GRANT t p after * REQUESTS_PER_DAY 2";
    let granted = until_it_succeeds(&mut con, after, Duration::from_secs(20));
    assert_eq!(field_i64(&granted, "requests_per_day"), 2);
    assert_eq!(field_i64(&granted, "duplicate"), 0);
    let admit = "QUOTA.ADMIT t p after b REQUESTS_PER_DAY 0".to_args();
    assert_admitted(
        &to_map(query_owned(&mut con, &admit).expect("ADMIT")),
        "global",
    );
    let m = query_map(&mut con, &["QUOTA.GET", "t", "p", "after", "b"]);
    assert_eq!(field_i64(&m, "requests_per_day"), 2);
    assert_eq!(
        pg.psql(&format!(
            "SELECT additional_requests_per_day FROM {schema}.user_quota_replenishment \
             WHERE user_id = 'after'"
        )),
        "2"
    );
    let drained = || info_i64(&server, "quota_queue_depth") == 0;
    assert!(
        wait_until(Duration::from_secs(10), drained),
        "the job queue did not drain after PostgreSQL resumed"
    );
    // Hundreds of BUSY replies, and the log says it twice: when the queue filled up (with what
    // was refused) and when it had drained, at warning level.
    let log = server.log();
    let full: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("quota: job queue full"))
        .collect();
    assert_eq!(full.len(), 2, "{full:#?}");
    assert!(
        full[0].contains(" # ") && full[0].contains(" refused") && !full[0].contains("over after"),
        "{}",
        full[0]
    );
    assert!(
        full[1].contains(" # ")
            && full[1].contains("over after")
            && (full[1].contains("queued again") || full[1].contains("queue drained")),
        "{}",
        full[1]
    );
}

/// A psql session in the background holding `FOR UPDATE` on the rows of `user_id` for 10 s.
struct RowLocker {
    child: Child,
}

impl RowLocker {
    fn start(pg: &PgServer, schema: &str, user_id: &str) -> RowLocker {
        let script = format!(
            "\"$0\" -X -q -v ON_ERROR_STOP=1 -d \"$1\" <<'EOF'\n\
             BEGIN;\n\
             SELECT 1 FROM {schema}.user_quota_replenishment WHERE user_id = '{user_id}' FOR UPDATE;\n\
             SELECT pg_sleep(10);\n\
             COMMIT;\n\
             EOF\n"
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(psql_binary())
            .arg(pg.url())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn psql");
        let locker = RowLocker { child };
        let held = wait_until(Duration::from_secs(10), || {
            pg.psql(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE query LIKE '%pg_sleep(10)%' AND state = 'active' \
                 AND pid <> pg_backend_pid()",
            ) == "1"
        });
        assert!(held, "the background psql did not take the row lock");
        locker
    }

    /// Ends the locking session (its transaction rolls back) and reaps psql.
    fn release(mut self, pg: &PgServer) {
        pg.psql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE query LIKE '%pg_sleep(10)%' AND pid <> pg_backend_pid()",
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RowLocker {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A PostgreSQL of its own, a module server on it (`pg-timeout-ms` 1000) and a client, after
/// a grant of `requests_per_day` to user `user` (schema deployed, a pooled connection open).
fn granted_on_own_postgres(
    user: &str,
    requests_per_day: &str,
) -> (PgServer, String, RedisServer, redis::Connection) {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = server_on(&pg, &schema, &[("pg-timeout-ms", "1000")]);
    let mut con = client(&server, Duration::from_secs(10));
    let grant = [
        "QUOTA.GRANT",
        "t",
        "p",
        user,
        "*",
        "REQUESTS_PER_DAY",
        requests_per_day,
    ];
    query_map(&mut con, &grant);
    (pg, schema, server, con)
}

#[test]
fn row_lock_held_elsewhere_makes_writes_fail_in_time_and_change_nothing() {
    let (pg, schema, _server, mut con) = granted_on_own_postgres("locked", "5");

    let locker = RowLocker::start(&pg, &schema, "locked");
    let writes: [&[&str]; 3] = [
        &[
            "QUOTA.GRANT",
            "t",
            "p",
            "locked",
            "*",
            "TOKENS_PER_DAY",
            "5",
            "ADD",
        ],
        &[
            "QUOTA.GRANT",
            "t",
            "p",
            "locked",
            "*",
            "REQUESTS_PER_DAY",
            "9",
        ],
        &["QUOTA.REVOKE", "t", "p", "locked", "*"],
    ];
    for args in writes {
        let (reply, took) = timed(|| query(&mut con, args));
        let err = match reply {
            Ok(v) => panic!("{args:?} succeeded while the row is locked: {v:?}"),
            Err(e) => server_error(&e).unwrap_or_else(|| panic!("{args:?}: no reply: {e}")),
        };
        assert!(took <= ANSWER_WITHIN, "{args:?} took {took:?}");
        assert!(
            err.starts_with("ERR")
                && err.contains("PostgreSQL")
                && err.to_lowercase().contains("timeout"),
            "{args:?}: unclear error {err:?}"
        );
        // The cached credits keep serving meanwhile.
        let (m, took) = timed(|| {
            query_map(
                &mut con,
                &[
                    "QUOTA.ADMIT",
                    "t",
                    "p",
                    "locked",
                    "b",
                    "REQUESTS_PER_DAY",
                    "0",
                ],
            )
        });
        assert!(
            took < Duration::from_millis(50),
            "cached ADMIT took {took:?}"
        );
        assert_eq!(field_str(&m, "credit").as_deref(), Some("global"));
    }
    locker.release(&pg);

    // None of the refused writes reached the row.
    let row = pg.psql(&format!(
        "SELECT additional_requests_per_day, coalesce(additional_tokens_per_day::text, 'null'), active \
         FROM {schema}.user_quota_replenishment WHERE user_id = 'locked'"
    ));
    assert_eq!(
        row, "5|null|t",
        "a write that failed on the lock changed the row"
    );
    // And once the lock is gone, the same top-up applies exactly once.
    let m = con.grant(["t", "p", "locked", "*"], "TOKENS_PER_DAY 5 ADD");
    assert_eq!(field_i64(&m, "tokens_per_day"), 5);
    assert_eq!(field_i64(&m, "requests_per_day"), 5);
}

#[test]
fn shutdown_while_clients_wait_on_a_stalled_postgres_never_hangs() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    // A long timeout, so the clients are still waiting when SHUTDOWN comes.
    let mut server = server_on(
        &pg,
        &schema,
        &[("pg-timeout-ms", "30000"), ("pool-size", "2")],
    );
    let mut con = client(&server, Duration::from_secs(10));
    con.grant(["t", "p", "warm", "*"], "REQUESTS_PER_DAY 1");
    assert!(
        wait_until(Duration::from_secs(10), || server
            .info("quota")
            .get("quota_notify_state")
            .map(String::as_str)
            == Some("listening")),
        "the NOTIFY listener did not connect"
    );

    let _resume = ResumeOnDrop(&pg);
    pg.pause();
    let n = 6;
    let mut handles = Vec::new();
    let shutdown_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::new(std::sync::Mutex::new(None));
    for i in 0..n {
        let mut c = client(&server, Duration::from_secs(15));
        let user = format!("blocked-{i}");
        let shutdown_at = Arc::clone(&shutdown_at);
        handles.push(thread::spawn(move || {
            let args = match i % 3 {
                0 => owned(&["QUOTA.GET", "t", "p", &user, "b"]),
                1 => owned(&["QUOTA.GRANT", "t", "p", &user, "*", "TOKENS_PER_DAY", "1"]),
                _ => owned(&["QUOTA.ADMIT", "t", "p", &user, "b", "REQUESTS_PER_DAY", "1"]),
            };
            let reply = query_owned(&mut c, &args);
            let done = Instant::now();
            let since_shutdown = shutdown_at
                .lock()
                .ok()
                .and_then(|s| *s)
                .map(|at| done.saturating_duration_since(at));
            (args, reply, since_shutdown)
        }));
    }
    assert!(
        wait_until(Duration::from_secs(10), || server
            .info("clients")
            .get("blocked_clients")
            .and_then(|v| v.parse::<usize>().ok())
            == Some(n)),
        "the {n} clients did not all block on PostgreSQL"
    );

    *shutdown_at.lock().expect("lock") = Some(Instant::now());
    let started = Instant::now();
    let mut admin = client(&server, Duration::from_secs(10));
    match query(&mut admin, &["SHUTDOWN", "NOSAVE"]) {
        Ok(v) => panic!("SHUTDOWN NOSAVE replied {v:?}"),
        Err(e) => assert!(
            server_error(&e).is_none(),
            "SHUTDOWN NOSAVE refused: {}",
            error_text(&e)
        ),
    }
    let exited = wait_until(Duration::from_secs(5), || !server.is_alive());
    let exit_took = started.elapsed();

    for h in handles {
        let (args, reply, since) = h.join().expect("blocked client thread");
        let since = since.unwrap_or_else(|| {
            panic!("{args:?} was answered before SHUTDOWN (the wait is 30 s): {reply:?}")
        });
        assert!(
            since <= Duration::from_secs(5),
            "{args:?} got its reply or EOF {since:?} after SHUTDOWN: {reply:?}"
        );
        if let Err(e) = &reply {
            assert!(
                !e.is_timeout(),
                "{args:?} hung: no reply and no EOF after SHUTDOWN"
            );
        }
    }
    assert!(
        exited,
        "redis-server still running {exit_took:?} after SHUTDOWN NOSAVE (a module thread keeps it alive?)\n{}",
        server.log()
    );
    let log = server.log();
    assert!(
        !log.contains("panic"),
        "the server log mentions a panic:\n{log}"
    );
}

/// Builds usage on one account: 3 admits committed (40 tokens each), one lease left open.
/// Returns the first committed lease and the open lease.
fn build_usage(con: &mut redis::Connection, ids: [&str; 4]) -> (String, String) {
    let mut committed = Vec::new();
    for _ in 0..3 {
        let m = con.admit(ids, "REQUESTS_PER_DAY 2 RESERVE 50");
        assert!(m.allowed, "{m:?}");
        assert_eq!(con.commit(ids, 40, Some(&m.lease())).tokens, 40);
        committed.push(m.lease());
    }
    let m = con.admit(ids, "REQUESTS_PER_DAY 2 RESERVE 50");
    assert!(m.allowed, "{m:?}");
    let u = con.usage(ids);
    assert_eq!(
        (
            u.requests_per_day,
            u.tokens_per_day,
            u.in_flight,
            u.reserved
        ),
        (4, 120, 1, 50),
        "{u:?}"
    );
    (committed.swap_remove(0), m.lease())
}

/// After a restart: usage as before, COMMIT idempotency kept, and the credits come back from
/// PostgreSQL into the empty cache and apply.
fn check_after_restart(
    server: &RedisServer,
    ids: [&str; 4],
    before: &Usage,
    committed: &str,
    open: &str,
) {
    let mut con = client(server, Duration::from_secs(10));
    assert_eq!(&con.usage(ids), before, "usage changed across the restart");
    let c = con.commit(ids, 40, Some(committed));
    assert_eq!(
        (c.duplicate, c.tokens),
        (true, 0),
        "a commit repeated after the restart counted again: {c:?}"
    );
    let c = con.commit(ids, 30, Some(open));
    assert_eq!(
        (c.tokens, c.duplicate, c.lease_held),
        (30, false, true),
        "the lease open before the restart: {c:?}"
    );

    let misses = info_i64(server, "quota_cache_misses");
    // Base 2 is used up (4 requests): each admit now needs the credit (+5) from PostgreSQL.
    let m = con.admit(ids, "REQUESTS_PER_DAY 2");
    assert!(m.allowed, "{m:?}");
    assert_eq!(m.credit, "global");
    assert!(m.used_credit(), "{m:?}");
    assert!(
        info_i64(server, "quota_cache_misses") > misses,
        "the first admit after the restart was not a cache miss"
    );
}

#[test]
fn sigkill_under_appendfsync_always_keeps_usage_and_the_cache_refills() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let mut server = RedisServer::builder()
        .module_args(&[("pg-url", &pg.url()), ("schema", &schema)])
        .conf("appendonly yes")
        .conf("appendfsync always")
        .start();
    let ids = ["t", "p", "crash", "b"];
    let mut con = client(&server, Duration::from_secs(10));
    con.grant(["t", "p", "crash", "*"], "REQUESTS_PER_DAY 5");
    let (committed, open) = build_usage(&mut con, ids);
    let before = con.usage(ids);
    drop(con);

    server.kill9();
    server.restart();
    check_after_restart(&server, ids, &before, &committed, &open);

    // Requests: 4 before, 1 after the restart; the limit is 2 + 5 = 7.
    let mut con = client(&server, Duration::from_secs(10));
    for _ in 0..2 {
        let m = con.admit(ids, "REQUESTS_PER_DAY 2");
        assert!(m.allowed, "{m:?}");
    }
    let m = con.admit(ids, "REQUESTS_PER_DAY 2");
    assert!(!m.allowed, "{m:?}");
    assert_eq!(m.reason, "requests_per_day");

    // And once more, killed right after the last write.
    let before = con.usage(ids);
    assert_eq!((before.requests_per_day, before.tokens_per_day), (7, 150));
    drop(con);
    server.kill9();
    server.restart();
    let mut con = client(&server, Duration::from_secs(10));
    assert_eq!(con.usage(ids), before);
}

#[test]
fn a_timed_out_grant_with_a_purchase_id_retried_is_applied_once() {
    // The schema deployed and a pooled connection open before the stall.
    let (pg, schema, _server, mut con) = granted_on_own_postgres("warm", "1");
    let topup = [
        "QUOTA.GRANT",
        "t",
        "p",
        "buyer",
        "*",
        "REQUESTS_PER_DAY",
        "100",
        "ADD",
        "PURCHASE",
        "order-1",
    ];

    let _resume = ResumeOnDrop(&pg);
    pg.pause();
    let err = query(&mut con, &topup).expect_err("a GRANT during the stall must not succeed");
    let text = server_error(&err).unwrap_or_else(|| panic!("no reply: {err}"));
    assert!(text.contains("outcome of a write is unknown"), "{text}");
    pg.resume();

    // The caller retries the same write, as the reply says, until it gets an answer.
    let mut reply = Err(err);
    assert!(
        wait_until(Duration::from_secs(10), || {
            reply = query(&mut con, &topup);
            reply.is_ok()
        }),
        "the retried GRANT kept failing: {reply:?}"
    );
    let m = to_map(reply.expect("retried GRANT"));
    assert_eq!(field_i64(&m, "requests_per_day"), 100, "{m:?}");
    eprintln!(
        "retried GRANT: duplicate {} (1 = the timed-out one had committed)",
        field_i64(&m, "duplicate")
    );
    // Once more: nothing changes.
    let again = query_map(&mut con, &topup);
    assert_eq!(field_i64(&again, "duplicate"), 1);
    assert_eq!(field_i64(&again, "requests_per_day"), 100);
    assert_eq!(
        pg.psql(&format!(
            "SELECT additional_requests_per_day, \
             (SELECT count(*) FROM {schema}.user_quota_replenishment_event \
              WHERE purchase_id = 'order-1') \
             FROM {schema}.user_quota_replenishment WHERE user_id = 'buyer'"
        )),
        "100|1",
        "the top-up was applied more than once"
    );
}
