//! PostgreSQL outages: each test runs its own PostgreSQL (`PgServer::start_private`) and stops,
//! pauses or starts it under a running Redis with the module.
//!
//! What a user would notice: cached credits keep being served and applied, uncached users are
//! admitted on the base policy without waiting longer than `quota.pg-timeout-ms`, writes fail
//! with a clear error within that time, and everything comes back (writes, NOTIFY) without
//! restarting Redis, including when PostgreSQL was down when Redis started.
mod common;

use std::time::{Duration, Instant};

use common::*;

const T: &str = "acme";
const P: &str = "chat";
/// `quota.pg-timeout-ms` for these tests.
const TIMEOUT_MS: u64 = 1000;

/// The longest a command may take while PostgreSQL is unreachable: the timeout plus 1 s.
fn limit() -> Duration {
    Duration::from_millis(TIMEOUT_MS + 1000)
}

fn start_redis(pg: &PgServer, schema: &str) -> RedisServer {
    let url = pg.url();
    let timeout = TIMEOUT_MS.to_string();
    RedisServer::builder()
        .pg(&url, schema, &timeout)
        .module_args(&[
            // Long TTLs: what the tests see changing comes from NOTIFY or writes, not expiry.
            ("cache-ttl-ms", "600000"),
            ("negative-ttl-ms", "600000"),
        ])
        .start()
}

fn wait_notify(server: &RedisServer, state: &str, timeout: Duration) {
    let ok = wait_until(timeout, || info_str(server, "quota_notify_state") == state);
    assert!(
        ok,
        "quota_notify_state did not become {state} within {timeout:?}: {}",
        info_str(server, "quota_notify_state")
    );
}

/// Runs a command and returns its outcome and how long it took.
fn timed(con: &mut redis::Connection, args: &[&str]) -> (redis::RedisResult<Value>, Duration) {
    let t0 = Instant::now();
    let r = query(con, args);
    (r, t0.elapsed())
}

fn grant_args<'a>(user: &'a str, rpd: &'a str) -> Vec<&'a str> {
    vec!["QUOTA.GRANT", T, P, user, "*", "REQUESTS_PER_DAY", rpd]
}

/// Grants `user` a '*' credit of `rpd` requests a day, repeated every 100 ms until it succeeds
/// (PostgreSQL just came back): fails the test when `within` passes first.
fn grant_once_back(con: &mut redis::Connection, user: &str, rpd: &str, within: Duration) {
    let t0 = Instant::now();
    let r = loop {
        let r = query(con, &grant_args(user, rpd));
        if r.is_ok() || t0.elapsed() >= within {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let took = t0.elapsed();
    let r =
        to_map(r.unwrap_or_else(|e| {
            panic!("GRANT still fails {took:?} after PostgreSQL came back: {e}")
        }));
    assert_eq!(field_i64(&r, "requests_per_day").to_string(), rpd);
}

/// `QUOTA.ADMIT T P <user> gpt REQUESTS_PER_DAY <base_rpd>`.
fn admit(con: &mut redis::Connection, user: &str, base_rpd: &str) -> Admit {
    con.admit(
        [T, P, user, "gpt"],
        Opts::new().limit("REQUESTS_PER_DAY", base_rpd),
    )
}

/// [`admit`] for a user whose credits PostgreSQL cannot give: answered within [`limit`].
fn admit_in_time(con: &mut redis::Connection, user: &str, what: &str) -> Admit {
    let t0 = Instant::now();
    let a = con
        .try_admit([T, P, user, "gpt"], "REQUESTS_PER_DAY 1")
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let took = t0.elapsed();
    assert!(took < limit(), "{what} took {took:?} (limit {:?})", limit());
    a
}

/// The additional requests per day `QUOTA.GET` serves for `user`, None for nil.
fn credit(con: &mut redis::Connection, user: &str) -> Option<i64> {
    con.get([T, P, user, "gpt"])
        .map(|g| field_i64(&g, "requests_per_day"))
}

fn ping(con: &mut redis::Connection) {
    let pong: String = redis::cmd("PING").query(con).expect("PING");
    assert_eq!(pong, "PONG");
}

fn rows_for(pg: &PgServer, schema: &str, user: &str) -> String {
    pg.psql(&format!(
        "SELECT count(*) FROM {schema}.user_quota_replenishment WHERE user_id = '{user}'"
    ))
}

/// Asserts an error reply that mentions PostgreSQL, received within [`limit`].
fn assert_pg_error(what: &str, r: redis::RedisResult<Value>, took: Duration) {
    let text = must_fail(&format!("{what} while PostgreSQL is down"), r);
    assert!(
        text.contains("PostgreSQL"),
        "{what}: the error does not say PostgreSQL is the problem: {text}"
    );
    assert!(took < limit(), "{what} took {took:?} (limit {:?})", limit());
}

/// Redis on a private PostgreSQL, its listener up, alice granted 5 requests a day (and cached
/// by the write-through): what the outages start from.
fn alice_cached() -> (PgServer, String, RedisServer, redis::Connection) {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = start_redis(&pg, &schema);
    // The listener's first connect clears the cache: let it happen before caching anything.
    wait_notify(&server, "listening", Duration::from_secs(15));
    let mut con = server.client();
    query(&mut con, &grant_args("alice", "5")).expect("GRANT alice");
    assert_eq!(credit(&mut con, "alice"), Some(5), "alice is cached");
    (pg, schema, server, con)
}

/// Once PostgreSQL is back, the listener reconnects by itself and NOTIFY works again: alice's
/// credit (`was`) changed by SQL to `now` is served within 5 s, and `user` (uncached) gets
/// its credits again.
fn assert_notify_works(
    server: &RedisServer,
    pg: &PgServer,
    schema: &str,
    was: i64,
    now: i64,
    user: &str,
) {
    wait_notify(server, "listening", Duration::from_secs(15));
    let mut con = server.client();
    assert_eq!(credit(&mut con, "alice"), Some(was));
    let received = info_i64(server, "quota_notify_received");
    pg.psql(&format!(
        "UPDATE {schema}.user_quota_replenishment SET additional_requests_per_day = {now} \
         WHERE user_id = 'alice'"
    ));
    let ok = wait_until(Duration::from_secs(5), || {
        credit(&mut con, "alice") == Some(now)
    });
    assert!(ok, "the SQL UPDATE was not seen through NOTIFY within 5 s");
    assert!(info_i64(server, "quota_notify_received") > received);
    assert_eq!(admit(&mut con, user, "1").credit, "global");
}

#[test]
fn cached_users_are_served_while_postgres_is_stopped_and_it_recovers_without_a_redis_restart() {
    let (pg, schema, server, mut con) = alice_cached();

    pg.stop();

    // Cached user: GET and ADMIT keep working, credits still applied.
    let t0 = Instant::now();
    assert_eq!(credit(&mut con, "alice"), Some(5), "alice still served");
    let a = admit(&mut con, "alice", "1");
    assert!(a.allowed);
    assert_eq!(a.credit, "global");
    let a = admit(&mut con, "alice", "1");
    assert!(a.allowed, "credits not applied: {a:?}");
    assert!(a.used_credit());
    assert_eq!(a.credit, "global");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "cached commands waited on PostgreSQL: {:?}",
        t0.elapsed()
    );

    // Uncached user: decided on the base policy, within the timeout.
    let unavailable = info_i64(&server, "quota_admits_unavailable");
    let a = admit_in_time(&mut con, "bob", "ADMIT for an uncached user");
    assert!(a.allowed);
    assert_eq!(a.credit, "unavailable");
    assert!(!a.used_credit());
    // The base policy alone decides: the second request is over REQUESTS_PER_DAY 1.
    let a = admit_in_time(&mut con, "bob", "second ADMIT bob");
    assert!(!a.allowed);
    assert_eq!(a.reason, "requests_per_day");
    assert!(info_i64(&server, "quota_admits_unavailable") - unavailable >= 2);

    // Writes and listings fail with a clear error within the timeout.
    let (r, took) = timed(&mut con, &grant_args("carol", "9"));
    assert_pg_error("GRANT carol", r, took);
    let (r, took) = timed(&mut con, &["QUOTA.REVOKE", T, P, "alice", "*"]);
    assert_pg_error("REVOKE alice", r, took);
    let (r, took) = timed(&mut con, &["QUOTA.LIST", T, P, "alice"]);
    assert_pg_error("LIST alice", r, took);
    let (r, took) = timed(&mut con, &["QUOTA.CLEANUP"]);
    assert_pg_error("CLEANUP", r, took);
    let (r, took) = timed(&mut con, &["QUOTA.GET", T, P, "dora", "gpt"]);
    assert_pg_error("GET for an uncached user", r, took);
    ping(&mut con);
    assert!(info_i64(&server, "quota_pg_errors") > 0);
    wait_notify(&server, "disconnected", Duration::from_secs(15));
    // Still served after all that (the failed REVOKE changed nothing here either).
    assert_eq!(credit(&mut con, "alice"), Some(5), "alice still served");

    // PostgreSQL is back on the same port; Redis is not restarted.
    pg.start();
    // Checkouts fail fast for about a second after the last failed connection attempt, so
    // allow a short window (each refused attempt never reaches PostgreSQL).
    grant_once_back(&mut con, "erin", "3", Duration::from_secs(5));
    // The failed grant left nothing behind.
    assert_eq!(rows_for(&pg, &schema, "carol"), "0");
    assert_eq!(credit(&mut con, "carol"), None);
    assert_eq!(rows_for(&pg, &schema, "alice"), "1");

    // The listener reconnects by itself, and NOTIFY works again.
    assert_notify_works(&server, &pg, &schema, 5, 42, "erin");
    assert!(info_i64(&server, "quota_notify_reconnects") >= 1);
}

#[test]
fn uncached_admits_and_writes_answer_within_the_timeout_when_postgres_hangs() {
    let (pg, _schema, server, mut con) = alice_cached();

    // SIGSTOP: connections hang, nothing answers.
    pg.pause();

    let a = admit_in_time(&mut con, "bob", "ADMIT bob with PostgreSQL hanging");
    assert!(a.allowed);
    assert_eq!(a.credit, "unavailable");

    let (r, took) = timed(&mut con, &grant_args("carol", "9"));
    assert_pg_error("GRANT carol with PostgreSQL hanging", r, took);

    // Other clients are not held up meanwhile: a cached user is answered at once.
    let t0 = Instant::now();
    assert_eq!(credit(&mut con, "alice"), Some(5), "alice still served");
    let a = admit(&mut con, "alice", "0");
    assert!(a.allowed);
    assert_eq!(a.credit, "global");
    assert!(
        t0.elapsed() < Duration::from_millis(500),
        "cached commands waited on a hanging PostgreSQL: {:?}",
        t0.elapsed()
    );
    ping(&mut con);
    // The hang was noticed: by a client's wait running out (pg_timeouts) or, when the pool's own
    // timeout of the same length fired first on a busy machine, by the worker (pg_errors).
    assert!(
        info_i64(&server, "quota_pg_timeouts") + info_i64(&server, "quota_pg_errors") >= 1,
        "neither a timeout nor a PostgreSQL error was counted"
    );

    pg.resume();
    // Once it answers again, writes work (connections stuck meanwhile may need their own
    // timeout to give up first).
    grant_once_back(&mut con, "dave", "2", Duration::from_secs(10));
    assert_eq!(credit(&mut con, "dave"), Some(2));
}

#[test]
fn the_module_serves_when_postgres_is_down_at_start_and_deploys_once_it_is_up() {
    let pg = PgServer::start_private();
    pg.stop();
    let schema = unique_schema();
    let server = start_redis(&pg, &schema);
    let mut con = server.client();
    ping(&mut con);

    // Admission works on the base policy alone.
    let a = admit_in_time(&mut con, "alice", "ADMIT with PostgreSQL down");
    assert!(a.allowed);
    assert_eq!(a.credit, "unavailable");
    let (r, took) = timed(&mut con, &grant_args("alice", "5"));
    assert_pg_error("GRANT with PostgreSQL down at start", r, took);

    // PostgreSQL comes up: the schema is deployed and grants are served, no Redis restart.
    pg.start();
    grant_once_back(&mut con, "alice", "5", Duration::from_secs(15));
    assert_eq!(
        pg.psql(&format!(
            "SELECT to_regclass('{schema}.user_quota_replenishment') IS NOT NULL, \
             to_regclass('{schema}.user_quota_replenishment_event') IS NOT NULL"
        )),
        "t|t"
    );
    assert_eq!(rows_for(&pg, &schema, "alice"), "1");
    assert_eq!(credit(&mut con, "alice"), Some(5), "the grant is served");

    // The listener gets there too, and NOTIFY works.
    assert_notify_works(&server, &pg, &schema, 5, 8, "alice");
}

/// Whether both tables of `schema` exist.
fn schema_deployed(pg: &PgServer, schema: &str) -> bool {
    pg.try_psql(&format!(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = '{schema}' \
         AND table_name IN ('user_quota_replenishment', 'user_quota_replenishment_event')"
    ))
    .is_ok_and(|n| n == "2")
}

#[test]
fn the_schema_is_deployed_at_load_and_again_when_postgres_comes_back_without_it() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let started = Instant::now();
    let server = start_redis(&pg, &schema);
    // No command sent: the module deploys on its own as soon as it reaches PostgreSQL.
    assert!(
        wait_until(Duration::from_secs(5), || schema_deployed(&pg, &schema)),
        "no schema {schema} 5 s after the module loaded"
    );
    eprintln!("schema deployed {:?} after start", started.elapsed());

    // PostgreSQL comes back without the schema (a restored or replaced server).
    pg.psql(&format!("DROP SCHEMA {schema} CASCADE"));
    pg.stop();
    wait_notify(&server, "disconnected", Duration::from_secs(15));
    pg.start();
    let back = Instant::now();
    assert!(
        wait_until(Duration::from_secs(15), || schema_deployed(&pg, &schema)),
        "the schema was not deployed again after PostgreSQL came back"
    );
    eprintln!(
        "schema deployed again {:?} after PostgreSQL started",
        back.elapsed()
    );

    // Another schema: deployed at once too.
    let other = unique_schema();
    let mut con = server.client();
    query(&mut con, &["CONFIG", "SET", "quota.schema", &other]).expect("CONFIG SET");
    assert!(
        wait_until(Duration::from_secs(5), || schema_deployed(&pg, &other)),
        "no schema {other} after CONFIG SET quota.schema"
    );
}

/// The lines `quota:` wrote to the server log after its first `skip` bytes.
fn quota_lines(server: &RedisServer, skip: usize) -> Vec<String> {
    let log = server.log();
    log.get(skip..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("quota: "))
        .map(str::to_owned)
        .collect()
}

/// The line that said a problem (`what`, as its condition names it) started and the one that
/// said it ended, each the only one of its kind, at warning level (`#`), the start first.
fn started_and_ended(lines: &[String], what: &str) -> (String, String) {
    let of = format!("quota: {what}");
    let ends = |l: &str| l.contains(&of) && l.contains(": over after ");
    let find = |pick: &dyn Fn(&str) -> bool| -> (usize, String) {
        let found: Vec<(usize, &String)> =
            lines.iter().enumerate().filter(|(_, l)| pick(l)).collect();
        assert_eq!(found.len(), 1, "{what}: {found:?} in\n{}", lines.join("\n"));
        let (at, line) = found[0];
        assert!(line.contains(" # "), "not at warning level: {line}");
        (at, line.clone())
    };
    let (start_at, start) = find(&|l| l.contains(&of) && !ends(l));
    let (end_at, end) = find(&|l| ends(l));
    assert!(start_at < end_at, "{what}: ended before it started");
    (start, end)
}

#[test]
fn an_outage_is_logged_in_a_handful_of_lines_an_operator_can_act_on_without_the_password() {
    const SECRET: &str = "Outage-Pw-7781";
    let pg = PgServer::start_private();
    let url = pg.password_role("quota_ops", SECRET);
    let with_password = url.replace("quota_ops@", &format!("quota_ops:{SECRET}@"));
    let schema = unique_schema();
    let timeout = TIMEOUT_MS.to_string();
    let server = RedisServer::builder()
        .pg(&with_password, &schema, &timeout)
        .module_args(&[
            ("cache-ttl-ms", "600000"),
            ("negative-ttl-ms", "600000"),
            ("flush-interval", "1"),
        ])
        .start();
    wait_notify(&server, "listening", Duration::from_secs(15));
    let mut con = server.client();
    query(&mut con, &grant_args("alice", "1000")).expect("GRANT alice");
    assert!(admit(&mut con, "alice", "1").allowed);
    wait_ledger_flushed(&server, Duration::from_secs(10));
    let skip = server.log().len();
    let flush_errors = info_i64(&server, "quota_ledger_flush_errors");

    pg.stop();
    let down = Instant::now();
    // 300 commands that need PostgreSQL, paced over a few seconds, while the cached alice's
    // usage waits for flushes that fail every second.
    for i in 0..100 {
        let cold = format!("cold{i}");
        let a = admit_in_time(&mut con, &cold, "ADMIT of a cold user");
        assert_eq!(a.credit, "unavailable");
        let (r, took) = timed(&mut con, &grant_args(&cold, "5"));
        assert_pg_error("GRANT", r, took);
        let (r, took) = timed(&mut con, &["QUOTA.LIST", T, P, &cold]);
        assert_pg_error("LIST", r, took);
        assert!(admit(&mut con, "alice", "1000").allowed);
        std::thread::sleep(Duration::from_millis(30));
    }
    wait_notify(&server, "disconnected", Duration::from_secs(15));
    assert!(
        wait_until(Duration::from_secs(10), || info_i64(
            &server,
            "quota_ledger_flush_errors"
        ) > flush_errors),
        "no ledger flush failed while PostgreSQL was down"
    );
    eprintln!("PostgreSQL down for {:?}", down.elapsed());

    pg.start();
    grant_once_back(&mut con, "erin", "3", Duration::from_secs(10));
    wait_notify(&server, "listening", Duration::from_secs(15));
    wait_ledger_flushed(&server, Duration::from_secs(15));
    // The schema deploy that follows the listener's return, and its notice.
    assert!(
        wait_until(Duration::from_secs(10), || quota_lines(&server, skip)
            .iter()
            .any(|l| l.contains("deployed"))),
        "no notice of the schema deployed again"
    );

    let lines = quota_lines(&server, skip);
    let all_lines = server.log().get(skip..).unwrap_or_default().lines().count();
    eprintln!("{}", lines.join("\n"));
    assert!(
        all_lines < 20,
        "{all_lines} lines for one outage:\n{}",
        lines.join("\n")
    );
    // Each problem: one line when it started, one when it ended (with how long it lasted
    // and what it cost); the outage lasted less than a minute, so no summary between.
    let (started, ended) = started_and_ended(&lines, "PostgreSQL unreachable");
    assert!(started.contains("error connecting"), "{started}");
    assert!(ended.contains("PostgreSQL answers again"), "{ended}");
    let (lost, listening) = started_and_ended(&lines, "NOTIFY listener disconnected");
    assert!(lost.contains("reconnecting with backoff"), "{lost}");
    assert!(listening.contains("listening again"), "{listening}");
    assert!(listening.contains("dropped the cache ("), "{listening}");
    let (failing, flushed) = started_and_ended(&lines, "usage ledger flushes failing");
    assert!(failing.contains("accounts wait to be flushed"), "{failing}");
    assert!(flushed.contains("flushes succeed again"), "{flushed}");
    let log = server.log();
    assert!(!log.contains(SECRET), "the password is in the log");
}

#[test]
fn a_deploy_refused_for_want_of_privileges_is_logged_once_and_the_module_carries_on() {
    const SECRET: &str = "Deploy-Pw-4412";
    let pg = PgServer::start_private();
    let schema = unique_schema();
    // Deployed by its owner: the module's role may use the tables, not redefine them.
    let sql = std::fs::read_to_string(repo_root().join("sql").join("deploy-control-plane.sql"))
        .expect("sql/deploy-control-plane.sql")
        .replace("control_plane", &schema);
    pg.psql(&sql);
    let url = pg.password_role("quota_user", SECRET);
    pg.psql(&format!(
        "GRANT USAGE ON SCHEMA {schema} TO quota_user; \
         GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO quota_user; \
         GRANT USAGE ON ALL SEQUENCES IN SCHEMA {schema} TO quota_user"
    ));
    let with_password = url.replace("quota_user@", &format!("quota_user:{SECRET}@"));
    let timeout = TIMEOUT_MS.to_string();
    let server = RedisServer::builder()
        .pg(&with_password, &schema, &timeout)
        .start();
    // Deployed at load and again when the listener connects: refused both times.
    wait_notify(&server, "listening", Duration::from_secs(15));
    let mut con = server.client();
    grant_once_back(&mut con, "alice", "5", Duration::from_secs(10));
    assert_eq!(credit(&mut con, "alice"), Some(5), "the module carries on");
    assert!(wait_until(Duration::from_secs(5), || server
        .log()
        .contains("quota: schema deploy failing")));
    let log = server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("quota: schema deploy failing"))
        .collect();
    assert_eq!(lines.len(), 1, "{lines:#?}");
    let line = lines[0];
    assert!(line.contains(" # "), "not at warning level: {line}");
    assert!(
        line.contains(&format!("schema {schema}: PostgreSQL error: "))
            && line.contains("carrying on with the tables that are there"),
        "{line}"
    );
    assert!(
        !log.contains(" deployed (sql/"),
        "a refused deploy said it deployed"
    );
    assert!(!log.contains(SECRET), "the password is in the log");
}
