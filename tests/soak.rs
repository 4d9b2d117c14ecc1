//! Load: many clients mixing `ADMIT` (with `MAX_CONCURRENT` and `RESERVE`), `COMMIT`,
//! `RELEASE`, `GRANT ... ADD` and `GET` over many users with PostgreSQL live. Afterwards the
//! usage Redis reports is exactly what the clients did, no account was admitted over its
//! limit, no call hung, the credits cache stayed within `quota.cache-max-entries`, and once
//! the last flush is acknowledged the usage ledger in PostgreSQL holds exactly what was
//! admitted minus released and committed, account by account (flushed every
//! `FLUSH_INTERVAL` seconds during the load).
//!
//! `soak_short` runs in `make test`; `soak_long` (60 s, 100 clients, 10,000 users) in
//! `make soak` (`cargo test --release --test soak -- --ignored --nocapture`).
mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;

/// Base policy of every admit: 5 requests a day; every user also holds a `'*'` credit of
/// 5 more, so no account may ever count more than 10 requests in a day.
const BASE_REQUESTS: u64 = 5;
const CREDIT_REQUESTS: u64 = 5;
const BUNDLES: usize = 2;
/// No call may take longer than this (a read timeout turns a hang into a failure).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// `quota.flush-interval` of the soak server: several flushes happen during the load.
const FLUSH_INTERVAL: &str = "2";

/// What one client did to one account.
#[derive(Debug, Default, Clone, Copy)]
struct Did {
    allowed: u64,
    released: u64,
    committed: u64,
}

/// One client's tally.
#[derive(Debug, Default)]
struct Tally {
    ops: u64,
    allowed: u64,
    denied_requests: u64,
    denied_concurrency: u64,
    commits: u64,
    releases: u64,
    grants: u64,
    gets: u64,
    unavailable: u64,
    hung: u64,
    problems: Vec<String>,
    accounts: HashMap<(usize, usize), Did>,
}

impl Tally {
    fn problem(&mut self, text: String) {
        if self.problems.len() < 10 {
            self.problems.push(text);
        }
    }

    /// Records a failed call: a hang or an error reply.
    fn failed(&mut self, what: &str, e: &redis::RedisError) {
        if e.is_timeout() {
            self.hung += 1;
        }
        self.problem(format!("{what}: {}", error_text(e)));
    }
}

fn user(i: usize) -> String {
    format!("u{i}")
}

fn bundle(b: usize) -> String {
    format!("b{b}")
}

/// Settles a held lease: commits some tokens (3 times in 4) or releases it.
fn settle(
    con: &mut redis::Connection,
    rng: &mut Rng,
    t: &mut Tally,
    (u, b, lease): (usize, usize, String),
) {
    let (us, bs) = (user(u), bundle(b));
    t.ops += 1;
    if rng.below_u64(4) < 3 {
        let tokens = rng.below_u64(1000);
        let tokens_s = tokens.to_string();
        let args = [
            "QUOTA.COMMIT",
            "soak",
            "p",
            &us,
            &bs,
            &tokens_s,
            "LEASE",
            &lease,
        ];
        match query(con, &args) {
            Ok(v) => {
                let m = to_map(v);
                if (
                    field_i64(&m, "tokens"),
                    field_i64(&m, "duplicate"),
                    field_i64(&m, "lease_held"),
                ) != (tokens as i64, 0, 1)
                {
                    t.problem(format!("{args:?} -> {m:?}"));
                }
                t.commits += 1;
                t.accounts.entry((u, b)).or_default().committed += field_i64(&m, "tokens") as u64;
            }
            Err(e) => t.failed("COMMIT", &e),
        }
    } else {
        match query(con, &["QUOTA.RELEASE", "soak", "p", &us, &bs, &lease]) {
            Ok(Value::Int(1)) => {
                t.releases += 1;
                t.accounts.entry((u, b)).or_default().released += 1;
            }
            Ok(other) => t.problem(format!("RELEASE of a held lease replied {other:?}")),
            Err(e) => t.failed("RELEASE", &e),
        }
    }
}

/// One client: random operations until `deadline`.
fn client_loop(mut con: redis::Connection, seed: u64, users: usize, deadline: Instant) -> Tally {
    let mut rng = Rng(seed);
    let mut t = Tally::default();
    let mut held: Vec<(usize, usize, String)> = Vec::new();
    let base = BASE_REQUESTS.to_string();
    while Instant::now() < deadline {
        let u = rng.below_u64(users as u64) as usize;
        let b = rng.below_u64(BUNDLES as u64) as usize;
        let (us, bs) = (user(u), bundle(b));
        let roll = rng.below_u64(100);
        t.ops += 1;
        if roll < 2 {
            // A top-up adds tokens only: the request limit stays checkable.
            let n = (1 + rng.below_u64(1000)).to_string();
            let args = with_account(
                "QUOTA.GRANT",
                ["soak", "p", &us, "*"],
                &["TOKENS_PER_DAY", &n, "ADD"],
            );
            match query(&mut con, &args) {
                Ok(v) => {
                    let m = to_map(v);
                    if field_i64(&m, "requests_per_day") != CREDIT_REQUESTS as i64 {
                        t.problem(format!("{args:?} -> {m:?}"));
                    }
                    t.grants += 1;
                }
                Err(e) => t.failed("GRANT", &e),
            }
        } else if roll < 12 {
            match query(&mut con, &["QUOTA.GET", "soak", "p", &us, &bs]) {
                Ok(v) => {
                    let m = to_map(v);
                    if field_i64(&m, "requests_per_day") != CREDIT_REQUESTS as i64
                        || field_str(&m, "bundle_id").as_deref() != Some("*")
                    {
                        t.problem(format!("GET {us} {bs} -> {m:?}"));
                    }
                    t.gets += 1;
                }
                Err(e) => t.failed("GET", &e),
            }
        } else {
            let reserve = (1 + rng.below_u64(500)).to_string();
            let args = with_account(
                "QUOTA.ADMIT",
                ["soak", "p", &us, &bs],
                &[
                    "REQUESTS_PER_DAY",
                    &base,
                    "TOKENS_PER_DAY",
                    "100000000",
                    "MAX_CONCURRENT",
                    "3",
                    "RESERVE",
                    &reserve,
                ],
            );
            match query(&mut con, &args) {
                Ok(v) => {
                    let m = to_map(v);
                    let source = field_str(&m, "credit").unwrap_or_default();
                    if source != "global" {
                        t.unavailable += 1;
                        t.problem(format!("{us} {bs}: credits not applied: {m:?}"));
                    }
                    if field_i64(&m, "allowed") == 1 {
                        t.allowed += 1;
                        t.accounts.entry((u, b)).or_default().allowed += 1;
                        match field_str(&m, "lease") {
                            Some(lease) => held.push((u, b, lease)),
                            None => t.problem(format!("admitted without a lease: {m:?}")),
                        }
                    } else {
                        match field_str(&m, "reason").as_deref() {
                            Some("requests_per_day") => t.denied_requests += 1,
                            Some("concurrency") => t.denied_concurrency += 1,
                            _ => t.problem(format!("unexpected denial: {m:?}")),
                        }
                    }
                }
                Err(e) => t.failed("ADMIT", &e),
            }
            if held.len() > 2 {
                let lease = held.remove(rng.below_u64(held.len() as u64) as usize);
                settle(&mut con, &mut rng, &mut t, lease);
            }
        }
    }
    for lease in std::mem::take(&mut held) {
        settle(&mut con, &mut rng, &mut t, lease);
    }
    t
}

/// Largest values seen by the sampler.
#[derive(Debug, Default)]
struct Peaks {
    samples: u64,
    cache_entries: i64,
    used_memory: i64,
    rss: i64,
}

fn info_field(info: &HashMap<String, String>, field: &str) -> i64 {
    info.get(field)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no integer {field} in INFO"))
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Runs `clients` clients for `duration` over `users` users (each with `BUNDLES` accounts)
/// and checks what the server reports against what the clients did.
fn soak(duration: Duration, clients: usize, users: usize) {
    // The daily request window must not roll over during the run.
    let to_midnight = 86_400 - unix_now() % 86_400;
    if to_midnight < duration.as_secs() + 60 {
        eprintln!("soak: waiting {to_midnight} s for the UTC day to roll over first");
        thread::sleep(Duration::from_secs(to_midnight + 1));
    }
    let pg = PgServer::shared();
    let schema = unique_schema();
    let cache_max = (users / 5).clamp(100, 2000);
    // A generous PostgreSQL timeout: this test is about accounting under load, and a busy
    // shared machine must not turn into credits decided as `unavailable`. A hang still fails
    // (every call has a read timeout).
    let server = RedisServer::builder()
        .pg(&pg, &schema, "10000")
        .module_args(&[
            ("cache-max-entries", &cache_max.to_string()),
            ("flush-interval", FLUSH_INTERVAL),
        ])
        .start();
    let mut con = server.client();

    // Every user: a '*' credit of CREDIT_REQUESTS requests a day. The first through the
    // module (it deploys the schema), the rest in one SQL statement.
    query_map(
        &mut con,
        &[
            "QUOTA.GRANT",
            "soak",
            "p",
            &user(0),
            "*",
            "REQUESTS_PER_DAY",
            &CREDIT_REQUESTS.to_string(),
        ],
    );
    psql(
        &pg,
        &format!(
            "INSERT INTO {schema}.user_quota_replenishment \
             (tenant, project, user_id, bundle_id, additional_requests_per_day) \
             SELECT 'soak', 'p', 'u' || g, '*', {CREDIT_REQUESTS} \
             FROM generate_series(1, {}) g",
            users - 1
        ),
    );

    let seed = random_u64();
    eprintln!("soak: {clients} clients, {users} users, {duration:?}, cache-max-entries {cache_max}, seed {seed}");
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let stop = Arc::clone(&stop);
        let mut c = server.client();
        c.set_read_timeout(Some(CALL_TIMEOUT)).expect("timeout");
        thread::spawn(move || {
            let mut p = Peaks::default();
            // Bounded: at most one sample per 100 ms for duration + a margin.
            for _ in 0..100_000 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let text: String = redis::cmd("INFO")
                    .arg("everything")
                    .query(&mut c)
                    .expect("INFO during the soak");
                let info = parse_info(&text);
                p.samples += 1;
                p.cache_entries = p
                    .cache_entries
                    .max(info_field(&info, "quota_cache_entries"));
                p.used_memory = p.used_memory.max(info_field(&info, "used_memory"));
                p.rss = p.rss.max(info_field(&info, "used_memory_rss"));
                thread::sleep(Duration::from_millis(100));
            }
            p
        })
    };

    let started = Instant::now();
    let deadline = started + duration;
    let handles: Vec<_> = (0..clients)
        .map(|i| {
            let c = server.client();
            c.set_read_timeout(Some(CALL_TIMEOUT)).expect("timeout");
            let s = seed
                .wrapping_add(i as u64)
                .wrapping_mul(0x2545_F491_4F6C_DD1D);
            thread::spawn(move || client_loop(c, s, users, deadline))
        })
        .collect();
    let tallies: Vec<Tally> = handles
        .into_iter()
        .map(|h| h.join().expect("client thread panicked"))
        .collect();
    let elapsed = started.elapsed();
    stop.store(true, Ordering::SeqCst);
    let peaks = sampler.join().expect("sampler");

    // Merge what every client did.
    let mut total = Tally::default();
    let mut problems = Vec::new();
    for t in tallies {
        total.ops += t.ops;
        total.allowed += t.allowed;
        total.denied_requests += t.denied_requests;
        total.denied_concurrency += t.denied_concurrency;
        total.commits += t.commits;
        total.releases += t.releases;
        total.grants += t.grants;
        total.gets += t.gets;
        total.unavailable += t.unavailable;
        total.hung += t.hung;
        problems.extend(t.problems);
        for (k, d) in t.accounts {
            let e = total.accounts.entry(k).or_default();
            e.allowed += d.allowed;
            e.released += d.released;
            e.committed += d.committed;
        }
    }
    let quota = server.info("quota");
    let memory = server.info("memory");
    eprintln!(
        "soak: {} ops in {elapsed:.1?} = {:.0} ops/s; admits allowed {}, denied {} \
         (requests_per_day {}, concurrency {}); commits {}, releases {}, grants {}, gets {}; \
         accounts touched {}",
        total.ops,
        total.ops as f64 / elapsed.as_secs_f64(),
        total.allowed,
        total.denied_requests + total.denied_concurrency,
        total.denied_requests,
        total.denied_concurrency,
        total.commits,
        total.releases,
        total.grants,
        total.gets,
        total.accounts.len(),
    );
    eprintln!(
        "soak: cache entries max {} (limit {cache_max}), evictions {}, misses {}, hits {}, \
         stale hits {}; pg queries {}, pg errors {}, pg latency avg {} us max {} us, \
         timeouts {}, busy {}; used_memory max {} ({} samples), rss max {}, peak {}",
        peaks.cache_entries,
        quota["quota_cache_evictions"],
        quota["quota_cache_misses"],
        quota["quota_cache_hits"],
        quota["quota_cache_stale_hits"],
        quota["quota_pg_queries"],
        quota["quota_pg_errors"],
        quota["quota_pg_latency_avg_us"],
        quota["quota_pg_latency_max_us"],
        quota["quota_pg_timeouts"],
        quota["quota_queue_busy_rejections"],
        peaks.used_memory,
        peaks.samples,
        peaks.rss,
        memory["used_memory_peak_human"],
    );

    assert_eq!(
        total.hung, 0,
        "{} calls hung (no reply in {CALL_TIMEOUT:?})",
        total.hung
    );
    assert!(
        problems.is_empty(),
        "{} problems during the soak (seed {seed}), e.g.:\n{}",
        problems.len(),
        problems
            .iter()
            .take(20)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(total.allowed > 0 && total.commits > 0 && total.releases > 0 && total.grants > 0);

    // The server's counters match what the clients saw.
    assert_eq!(
        (
            info_field(&quota, "quota_admits_allowed") as u64,
            info_field(&quota, "quota_admits_denied") as u64
        ),
        (
            total.allowed,
            total.denied_requests + total.denied_concurrency
        ),
        "INFO quota admits differ from the replies"
    );

    // Usage: exactly what was done, and never over the limit.
    let limit = BASE_REQUESTS + CREDIT_REQUESTS;
    let mut accounts: Vec<((usize, usize), Did)> =
        total.accounts.iter().map(|(k, d)| (*k, *d)).collect();
    accounts.sort_by_key(|(k, _)| *k);
    let mut sum_committed = 0u64;
    let mut sum_tok_day = 0i64;
    let mut over = Vec::new();
    let mut wrong = Vec::new();
    for chunk in accounts.chunks(500) {
        let mut pipe = redis::pipe();
        for ((u, b), _) in chunk {
            pipe.cmd("QUOTA.USAGE")
                .arg("soak")
                .arg("p")
                .arg(user(*u))
                .arg(bundle(*b));
        }
        let replies: Vec<Value> = pipe.query(&mut con).expect("USAGE pipeline");
        for (((u, b), did), reply) in chunk.iter().zip(replies) {
            let m = to_map(reply);
            let requests_per_day = field_i64(&m, "requests_per_day");
            let tokens_per_day = field_i64(&m, "tokens_per_day");
            sum_committed += did.committed;
            sum_tok_day += tokens_per_day;
            let net = did.allowed as i64 - did.released as i64;
            if net > limit as i64 || requests_per_day > limit as i64 {
                over.push(format!(
                    "u{u} b{b}: {did:?}, requests_per_day {requests_per_day}"
                ));
            }
            if requests_per_day != net
                || tokens_per_day != did.committed as i64
                || field_i64(&m, "in_flight") != 0
                || field_i64(&m, "reserved") != 0
            {
                wrong.push(format!("u{u} b{b}: did {did:?}, usage {m:?}"));
            }
        }
    }
    assert_no_accounts(&over, &format!("admitted over the limit of {limit}"));
    assert_eq!(
        sum_tok_day, sum_committed as i64,
        "sum of tokens_per_day differs from the tokens committed"
    );
    assert_no_accounts(&wrong, "whose usage differs from what was done, e.g.");
    check_ledger(&server, &pg, &schema, &accounts);

    // The cache stayed bounded, and the bound was actually reached.
    assert!(
        peaks.cache_entries <= cache_max as i64,
        "cache entries reached {} (quota.cache-max-entries {cache_max})",
        peaks.cache_entries
    );
    assert!(
        info_field(&quota, "quota_cache_entries") <= cache_max as i64,
        "{quota:?}"
    );
    assert!(
        info_field(&quota, "quota_cache_evictions") > 0,
        "no eviction: the cache bound was never exercised"
    );
    let mut ping = server.client();
    assert_eq!(
        query(&mut ping, &["PING"]).ok(),
        Some(Value::SimpleString("PONG".into()))
    );
}

#[test]
fn soak_short() {
    soak(Duration::from_secs(8), 20, 1_000);
}

#[ignore = "60 s load test: `make soak`"]
#[test]
fn soak_long() {
    soak(Duration::from_secs(60), 100, 10_000);
}

/// After the last flush: the ledger in PostgreSQL holds, for every account, exactly the
/// requests admitted minus released and the tokens committed (the clients' tally, which the
/// caller already found equal to `QUOTA.USAGE`), no balance debit (no account has a balance),
/// and no row for an account nobody touched.
fn check_ledger(server: &RedisServer, pg: &str, schema: &str, accounts: &[((usize, usize), Did)]) {
    let before = LedgerInfo::of(server);
    wait_ledger_flushed(server, Duration::from_secs(60));
    let after = LedgerInfo::of(server);
    let mut ledger = ledger_sums(pg, schema);
    let mut wrong = Vec::new();
    let mut total = (LedgerSums::default(), LedgerSums::default());
    for ((u, b), did) in accounts {
        let got = ledger.remove(&(user(*u), bundle(*b))).unwrap_or_default();
        let want = LedgerSums {
            requests: did.allowed as i64 - did.released as i64,
            tokens: did.committed as i64,
            ..LedgerSums::default()
        };
        total.0.add(&got);
        total.1.add(&want);
        if got != want {
            wrong.push(format!("u{u} b{b}: did {did:?}, ledger {got:?}"));
        }
    }
    eprintln!(
        "soak: ledger {:?} (expected {:?}); flushes {}, failed {}, batches {}, skipped {}, \
         {} accounts pending at the end of the load, last snapshot {} us",
        total.0,
        total.1,
        after.flushes,
        after.flush_errors,
        after.batches,
        after.batches_skipped,
        before.pending,
        info_i64(server, "quota_ledger_last_snapshot_us"),
    );
    assert_no_accounts(&wrong, "whose ledger differs from what was done, e.g.");
    let strays: Vec<String> = ledger
        .iter()
        .map(|(k, v)| format!("{k:?}: {v:?}"))
        .collect();
    assert_no_accounts(&strays, "in the ledger that no client touched");
    assert_eq!(total.0, total.1);
    assert!(after.flushes >= 2, "fewer than 2 flushes: {after:?}");
    assert_eq!(after.flush_errors, 0, "{after:?}");
}

/// Fails with how many `accounts` there are and the first ten of them.
fn assert_no_accounts(accounts: &[String], what: &str) {
    assert!(
        accounts.is_empty(),
        "{} accounts {what}: {:?}",
        accounts.len(),
        &accounts[..accounts.len().min(10)]
    );
}
