//! The usage ledger under faults: PostgreSQL stalled (SIGSTOP) while flushes are due, a
//! cluster failover while admissions go on, and a master lost between its flush's commit in
//! PostgreSQL and the replicated acknowledgement.
//!
//! What a user would notice: admissions keep being answered, and at the end the hourly ledger
//! in PostgreSQL holds exactly what the clients were told was admitted, released and
//! committed (every acknowledged change once, nothing twice), balance debits included.
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const T: &str = "acme";
const P: &str = "chat";
/// The users the load runs on (enough that no account reaches the bound of 4096 committed
/// lease ids it remembers); every fourth one pays every request and token from its `'*'`
/// balance.
const USERS: usize = 48;
const BUNDLE: &str = "b";
/// Tokens each admission reserves; commits never exceed the reservation (exact debits).
const RESERVE: u64 = 50;
/// Load threads.
const WORKERS: usize = 4;

fn user(u: usize) -> String {
    format!("u{u}")
}

/// Whether user `u` pays from a balance.
fn paid(u: usize) -> bool {
    u.is_multiple_of(4)
}

fn account(u: &str) -> [&str; 4] {
    [T, P, u, BUNDLE]
}

/// What the clients were told, for one user.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Told {
    admitted: i64,
    released: i64,
    committed: i64,
}

impl Told {
    fn add(&mut self, o: &Told) {
        self.admitted += o.admitted;
        self.released += o.released;
        self.committed += o.committed;
    }

    /// What the ledger must hold for this user (`paid`: the balance paid everything).
    fn expected(&self, paid: bool) -> LedgerSums {
        let requests = self.admitted - self.released;
        LedgerSums {
            requests,
            tokens: self.committed,
            requests_debited: if paid { requests } else { 0 },
            tokens_debited: if paid { self.committed } else { 0 },
        }
    }
}

/// What one load thread did.
#[derive(Debug)]
struct Load {
    told: Vec<Told>,
    calls: u64,
    slowest: Duration,
    redirects: u64,
}

impl Default for Load {
    fn default() -> Load {
        Load {
            told: vec![Told::default(); USERS],
            calls: 0,
            slowest: Duration::ZERO,
            redirects: 0,
        }
    }
}

impl Load {
    /// Adds what another thread or phase did.
    fn add(&mut self, o: &Load) {
        for (t, more) in self.told.iter_mut().zip(&o.told) {
            t.add(more);
        }
        self.calls += o.calls;
        self.slowest = self.slowest.max(o.slowest);
        self.redirects += o.redirects;
    }

    /// Accounts with usage: each user's account, and the `'*'` account of a paying user.
    fn accounts(&self) -> i64 {
        let touched = |u: &usize| self.told[*u].admitted > 0;
        let users = (0..USERS).filter(touched).count();
        let purses = (0..USERS).filter(|u| paid(*u)).filter(touched).count();
        (users + purses) as i64
    }
}

/// A connection that follows `MOVED` (the command was not run there, so it is sent again to
/// the node named) and waits out `TRYAGAIN`/`CLUSTERDOWN`; any other error fails the test,
/// since its outcome would be unknown.
struct Routed {
    con: redis::Connection,
}

impl Routed {
    fn new(url: &str) -> Routed {
        let con = redis::Client::open(url)
            .expect("url")
            .get_connection_with_timeout(Duration::from_secs(5))
            .expect("connect");
        con.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("read timeout");
        Routed { con }
    }

    fn call(&mut self, args: &[String], load: &mut Load) -> Value {
        let started = Instant::now();
        for _ in 0..200 {
            let mut c = redis::cmd(&args[0]);
            for a in &args[1..] {
                c.arg(a.as_str());
            }
            match c.query::<Value>(&mut self.con) {
                Ok(v) => {
                    load.calls += 1;
                    load.slowest = load.slowest.max(started.elapsed());
                    return v;
                }
                Err(e) => {
                    let text = error_text(&e);
                    if let Some(addr) = text
                        .strip_prefix("MOVED ")
                        .and_then(|r| r.split(' ').nth(1))
                    {
                        *self = Routed::new(&format!("redis://{addr}/"));
                        load.redirects += 1;
                    } else if text.starts_with("TRYAGAIN") || text.starts_with("CLUSTERDOWN") {
                        thread::sleep(Duration::from_millis(50));
                    } else {
                        panic!("{args:?}: {text}");
                    }
                }
            }
        }
        panic!("{args:?}: still redirected after 200 tries");
    }
}

fn words(acc: [&str; 4], name: &str, opts: impl ToArgs) -> Vec<String> {
    let mut args = vec![name.to_string()];
    args.extend(acc.iter().map(|s| s.to_string()));
    args.extend(opts.to_args());
    args
}

/// One admission with a lease, then a release (1 in 4) or a commit of at most what it
/// reserved; records what the replies said.
fn one_cycle(con: &mut Routed, rng: &mut Rng, lease: &str, load: &mut Load) {
    let u = rng.below(USERS);
    let name = user(u);
    let acc = account(&name);
    let base = if paid(u) {
        "REQUESTS_PER_DAY 0 TOKENS_PER_DAY 0"
    } else {
        "REQUESTS_PER_DAY 1000000000"
    };
    let opts = Opts::words(base).lease(lease).reserve(RESERVE as i64);
    let a = Admit::parse(con.call(&words(acc, "QUOTA.ADMIT", opts), load));
    assert!(a.allowed, "{a:?}");
    let payer = if paid(u) { "balance" } else { "windows" };
    assert_eq!(a.paid_by, payer, "{a:?}");
    load.told[u].admitted += 1;
    if rng.chance(25) {
        let r = con.call(&words(acc, "QUOTA.RELEASE", [lease]), load);
        assert_eq!(value_i64(&r), Some(1), "RELEASE of a held lease: {r:?}");
        load.told[u].released += 1;
    } else {
        let tokens = rng.below_u64(RESERVE + 1).min(a.reserved as u64);
        let opts = Opts::words(tokens.to_string()).lease(lease);
        let c = Commit::from_map(to_map(con.call(&words(acc, "QUOTA.COMMIT", opts), load)));
        assert_eq!((c.tokens, c.duplicate), (tokens as i64, false), "{c:?}");
        load.told[u].committed += c.tokens;
    }
}

/// Runs `WORKERS` load threads against `url` until `stop` is set, calling `during` meanwhile
/// on this thread; returns what all of them did.
fn load_while(url: &str, stop: &AtomicBool, during: impl FnOnce()) -> Load {
    let seed = random_u64();
    eprintln!("load seed {seed}");
    thread::scope(|s| {
        let handles: Vec<_> = (0..WORKERS)
            .map(|w| {
                s.spawn(move || {
                    let mut con = Routed::new(url);
                    let mut rng = Rng(seed.wrapping_add(w as u64));
                    let mut load = Load::default();
                    for i in 0.. {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        one_cycle(&mut con, &mut rng, &format!("w{w}-{seed}-{i}"), &mut load);
                    }
                    load
                })
            })
            .collect();
        during();
        stop.store(true, Ordering::SeqCst);
        let mut total = Load::default();
        for h in handles {
            total.add(&h.join().expect("a load thread failed"));
        }
        total
    })
}

/// The ledger in PostgreSQL equals what the clients were told, user by user, exactly.
fn assert_ledger_is(url: &str, schema: &str, load: &Load) {
    let sums = ledger_sums_by_user(url, schema);
    for (u, t) in load.told.iter().enumerate() {
        let got = sums.get(&user(u)).copied().unwrap_or_default();
        assert_eq!(got, t.expected(paid(u)), "ledger of u{u} (told {t:?})");
    }
    assert_eq!(sums.len(), USERS, "{sums:?}");
}

/// `QUOTA.USAGE` agrees with what the clients were told (the day and the hour windows hold
/// everything when the run stays within one UTC hour, which `same_hour` tells).
fn assert_usage_is(server: &RedisServer, load: &Load, same_hour: bool) {
    let mut con = server.client();
    for (u, t) in load.told.iter().enumerate() {
        let usage = con.usage(account(&user(u)));
        assert_eq!((usage.in_flight, usage.reserved), (0, 0), "{usage:?}");
        if same_hour {
            assert_eq!(usage.requests_per_day, t.admitted - t.released, "u{u}");
            assert_eq!(usage.tokens_per_hour, t.committed, "u{u}");
        }
    }
}

/// The hour index now.
fn hour_now() -> i64 {
    now_s() / 3600
}

/// Grants every paying user a `'*'` balance that lasts the whole test.
fn grant_balances(con: &mut redis::Connection) {
    for u in (0..USERS).filter(|u| paid(*u)) {
        con.grant(
            [T, P, &user(u), "*"],
            "REQUESTS_BALANCE 1000000 TOKENS_BALANCE 1000000000",
        );
    }
}

/// A private PostgreSQL (the tests stop it) and a server flushing every second on a schema of
/// its own, with `pg_timeout_ms`.
fn private_pg_and_server(pg_timeout_ms: &str) -> (PgServer, String, RedisServer) {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = RedisServer::builder()
        .pg(&pg.url(), &schema, pg_timeout_ms)
        .module_args(&[("flush-interval", "1")])
        .start();
    // The listener's first connection clears the cache: let it happen before the scenario
    // (a cold user while PostgreSQL is paused would wait for its credits).
    server.wait_notify_state("listening", Duration::from_secs(30));
    (pg, schema, server)
}

/// PostgreSQL SIGSTOPped for several flush intervals while clients admit, commit and release:
/// admissions keep being answered quickly, the changes wait in the accounts, and after SIGCONT
/// the ledger holds every change exactly once.
#[test]
fn a_stalled_postgresql_during_flushes_loses_and_doubles_nothing() {
    let (pg, schema, server) = private_pg_and_server("500");
    let url = server.url();
    let mut con = server.client();
    grant_balances(&mut con);
    let hour = hour_now();

    // Before the stall: load with PostgreSQL up, flushed.
    let stop = AtomicBool::new(false);
    let before = load_while(&url, &stop, || thread::sleep(Duration::from_secs(2)));
    let mut told = before;
    wait_ledger_flushed(&server, Duration::from_secs(20));
    assert_ledger_is(&pg.url(), &schema, &told);
    let healthy = LedgerInfo::of(&server);

    // The stall: four flush intervals of load.
    pg.pause();
    let stop = AtomicBool::new(false);
    let mut during = LedgerInfo::default();
    let stalled = load_while(&url, &stop, || {
        thread::sleep(Duration::from_secs(4));
        during = LedgerInfo::of(&server);
    });
    let at_end_of_stall = LedgerInfo::of(&server);
    pg.resume();
    eprintln!(
        "stall: {} calls, slowest {:?}; ledger before {healthy:?}, during {during:?}, \
         end {at_end_of_stall:?}",
        stalled.calls, stalled.slowest
    );
    assert!(stalled.calls > 100, "{stalled:?}");
    assert!(
        stalled.slowest < Duration::from_millis(500),
        "an admission waited {:?} while PostgreSQL was stalled",
        stalled.slowest
    );
    told.add(&stalled);
    // Nothing reached PostgreSQL; every account waits with its changes.
    assert_eq!(
        at_end_of_stall.flushes, healthy.flushes,
        "{at_end_of_stall:?}"
    );
    assert_eq!(
        at_end_of_stall.pending,
        stalled.accounts(),
        "{at_end_of_stall:?}"
    );

    // After SIGCONT: everything once, and the counters show the recovery.
    wait_ledger_flushed(&server, Duration::from_secs(30));
    let after = LedgerInfo::of(&server);
    eprintln!("after: {after:?}");
    assert!(after.flushes > at_end_of_stall.flushes, "{after:?}");
    assert_ledger_is(&pg.url(), &schema, &told);
    assert_usage_is(&server, &told, hour_now() == hour);
    // A stalled PostgreSQL does not answer at all (not even its own statement timeout): the
    // flush waiting on it shows in INFO for as long as the stall lasts, and nothing else waits.
    assert!(
        at_end_of_stall.waiting_ms >= 2000,
        "the flush waiting on the stalled PostgreSQL does not show: {at_end_of_stall:?}"
    );
    assert_eq!(after.waiting_ms, 0, "{after:?}");
}

/// A cluster master with a replica, `CLUSTER FAILOVER` while clients keep admitting: the
/// master flushes every second until shortly before the failover (its last flush is
/// acknowledged, then its interval is raised so that none is in flight when it hands over:
/// see the next test for that case), the usage admitted after it is only in the replicated
/// state, and the promoted replica flushes it. The coordinated failover loses no write the
/// old master acknowledged, so the ledger must hold exactly what the clients were told.
#[test]
fn a_cluster_failover_during_flushes_keeps_the_ledger_exact() {
    let schema = unique_schema();
    let pg = PgServer::shared();
    let builder = RedisServer::builder()
        .pg(&pg, &schema, "2000")
        .module_args(&[("flush-interval", "1")]);
    let cluster = RedisCluster::start(1, builder.clone());
    let old = &cluster.nodes[0];
    let new = cluster.add_replica(0, builder);
    let mut con = old.client();
    grant_balances(&mut con);
    let hour = hour_now();

    let stop = AtomicBool::new(false);
    let mut at_failover = LedgerInfo::default();
    let load = load_while(&old.url(), &stop, || {
        // Flushes on the old master while the load runs.
        let first = LedgerInfo::of(old).flushes;
        assert!(
            wait_until(Duration::from_secs(20), || LedgerInfo::of(old).flushes
                >= first + 2),
            "the old master did not flush"
        );
        quiesce_flushes(old);
        thread::sleep(Duration::from_millis(500));
        at_failover = LedgerInfo::of(old);
        let _: Value = query(&mut new.client(), &["CLUSTER", "FAILOVER"]).expect("FAILOVER");
        assert!(
            wait_until(Duration::from_secs(30), || role(&new) == "master"
                && role(old) == "slave"),
            "the failover did not complete"
        );
        // The new master flushes while the load goes on there.
        let first = LedgerInfo::of(&new).flushes;
        assert!(
            wait_until(Duration::from_secs(20), || LedgerInfo::of(&new).flushes
                >= first + 2),
            "the new master did not flush"
        );
    });
    eprintln!(
        "failover: {} calls, {} redirects, slowest {:?}; old master at the failover \
         {at_failover:?}",
        load.calls, load.redirects, load.slowest
    );
    assert!(load.redirects >= WORKERS as u64, "{load:?}");
    assert!(at_failover.pending > 0, "{at_failover:?}");
    wait_ledger_flushed(&new, Duration::from_secs(20));
    let after = LedgerInfo::of(&new);
    eprintln!("new master: {after:?}");
    assert_eq!(after.batches_skipped, 0, "{after:?}");
    assert_ledger_is(&pg, &schema, &load);
    assert_usage_is(&new, &load, hour_now() == hour);
}

/// Raises `quota.flush-interval` on `node` and waits until no flush is in flight there (its
/// flush counters stay the same for a second).
fn quiesce_flushes(node: &RedisServer) {
    let _: Value = query(
        &mut node.client(),
        &["CONFIG", "SET", "quota.flush-interval", "3600"],
    )
    .expect("CONFIG SET");
    let done = |i: LedgerInfo| i.flushes + i.flush_errors;
    let mut last = done(LedgerInfo::of(node));
    let steady = wait_until(Duration::from_secs(20), || {
        thread::sleep(Duration::from_secs(1));
        let now = done(LedgerInfo::of(node));
        std::mem::replace(&mut last, now) == now
    });
    assert!(steady, "flushes went on after the interval was raised");
}

/// The master's flush of batch N commits in PostgreSQL, but the master is lost before its
/// acknowledgement is replicated (its main thread is held by `DEBUG SLEEP`, then it is
/// killed); meanwhile more usage was admitted, replicated and confirmed by `WAIT 1`. The
/// promoted replica sends its batch N again: it must not count batch N twice, and must not
/// lose the usage confirmed by `WAIT` after batch N was taken.
#[test]
fn a_master_lost_after_its_flush_committed_loses_no_replicated_usage() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let builder = RedisServer::builder()
        .pg(&pg.url(), &schema, "30000")
        .module_args(&[("flush-interval", "1")]);
    let mut master = builder.clone().start();
    let replica = builder.replica_of(&master).start();
    replica.wait_replica_synced(&master, Duration::from_secs(30));
    master.wait_notify_state("listening", Duration::from_secs(30));
    let mut m = master.client();
    let a = account("dave");
    let admit = |con: &mut redis::Connection, n: usize| {
        for _ in 0..n {
            assert!(con.admit(a, "").allowed);
        }
    };
    admit(&mut m, 5);
    wait_ledger_flushed(&master, Duration::from_secs(20));
    let snapshot_accounts = || info_i64(&master, "quota_ledger_last_snapshot_accounts");
    assert!(wait_until(Duration::from_secs(5), || snapshot_accounts() == 0));

    // Batch N (3 requests) is taken and sent while PostgreSQL is stopped: it waits there.
    pg.pause();
    admit(&mut m, 3);
    assert!(
        wait_until(Duration::from_secs(5), || snapshot_accounts() == 1),
        "no flush was taken"
    );
    // 4 more, after batch N was taken; the replica has them.
    admit(&mut m, 4);
    assert_eq!(query_i64(&mut m, &["WAIT", "1", "5000"]), 1);
    assert_eq!(replica.client().usage(a).requests_per_day, 12);

    // The master's main thread stops; PostgreSQL commits batch N; the master dies unacked.
    let port = master.port();
    let sleeper = thread::spawn(move || {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|c| c.get_connection())
            .expect("connect");
        let _ = query(&mut c, &["DEBUG", "SLEEP", "10"]);
    });
    thread::sleep(Duration::from_millis(300));
    pg.resume();
    let ledger = || {
        sql_i64(
            &pg.url(),
            &schema,
            "SELECT coalesce(sum(requests), 0) FROM {h}",
        )
    };
    assert!(
        wait_until(Duration::from_secs(10), || ledger() == 8),
        "batch N did not commit: {}",
        ledger()
    );
    master.kill9();
    let _ = sleeper.join();

    // The replica takes over and flushes what it holds.
    let mut r = replica.client();
    let _: Value = query(&mut r, &["REPLICAOF", "NO", "ONE"]).expect("REPLICAOF NO ONE");
    wait_ledger_flushed(&replica, Duration::from_secs(20));
    eprintln!("promoted replica: {:?}", LedgerInfo::of(&replica));
    assert_eq!(r.usage(a).requests_per_day, 12);
    assert_eq!(
        ledger(),
        12,
        "the ledger lost usage that was replicated (WAIT 1) after the lost master's last \
         batch was taken"
    );
}

/// A release that cancels, within the same hour, an admission whose flush is being written:
/// the flush carries the admission (and its balance debit) to PostgreSQL, and the release's
/// refund must follow in a later flush. The flush is held in a stalled PostgreSQL so that the
/// release lands between the snapshot and the acknowledgement every time.
#[test]
fn a_release_between_a_flush_and_its_acknowledgement_is_refunded() {
    let (pg, schema, server) = private_pg_and_server("30000");
    let mut con = server.client();
    con.grant([T, P, "erin", "*"], "REQUESTS_BALANCE 10");
    let a = account("erin");
    assert!(con.admit(a, "REQUESTS_PER_DAY 0").allowed);
    wait_ledger_flushed(&server, Duration::from_secs(20));
    let snapshot_accounts = || info_i64(&server, "quota_ledger_last_snapshot_accounts");
    assert!(wait_until(Duration::from_secs(5), || snapshot_accounts() == 0));

    pg.pause();
    let r = con.admit(a, "REQUESTS_PER_DAY 0 LEASE l1");
    assert_eq!((r.allowed, r.paid_by.as_str()), (true, "balance"));
    // The flush of the account and of the purse is taken and waits in PostgreSQL.
    assert!(
        wait_until(Duration::from_secs(5), || snapshot_accounts() == 2),
        "no flush was taken"
    );
    assert_eq!(con.release(a, "l1"), 1);
    pg.resume();
    wait_ledger_flushed(&server, Duration::from_secs(20));
    std::thread::sleep(Duration::from_millis(2500));
    wait_ledger_flushed(&server, Duration::from_secs(20));

    assert_eq!(con.usage(a).requests_per_day, 1);
    let sums = ledger_sums_by_user(&pg.url(), &schema);
    let erin = sums.get("erin").copied().unwrap_or_default();
    assert_eq!(
        (erin.requests, erin.requests_debited),
        (1, 1),
        "ledger {erin:?}: the released request was billed"
    );
    // The refund lowered the debits in PostgreSQL: this node's cached copy of the row catches
    // up through NOTIFY; until then what is left reads the lower figure (never the higher).
    let mut record = con.get(a).expect("a record");
    let caught_up = wait_until(Duration::from_secs(10), || {
        record = con.get(a).expect("a record");
        field_i64(&record, "requests_balance_left") == 9
    });
    assert!(caught_up, "requests_balance_left is not 9: {record:?}");
}
