//! Pipelines of cold misses (users whose credits are not cached): every command gets exactly
//! one reply, in order, whatever PostgreSQL does meanwhile; and a miss never blocks its client
//! on a PostgreSQL that is not configured or known to be down (a blocked client costs Redis a
//! copy of the rest of its pipeline, so blocking every miss of a long pipeline is quadratic).
mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

/// `n` admissions of new users, `tag` making the ids unique, each followed by an `ECHO` of
/// its number when `echo`.
fn cold_misses(tag: &str, from: usize, n: usize, echo: bool) -> Vec<Vec<Vec<u8>>> {
    let mut cmds = Vec::with_capacity(n * 2);
    for i in from..from + n {
        let user = format!("{tag}-{i}");
        cmds.push(bytes(&[
            "QUOTA.ADMIT",
            "acme",
            "chat",
            &user,
            "web",
            "COMPACT",
        ]));
        if echo {
            cmds.push(bytes(&["ECHO", &i.to_string()]));
        }
    }
    cmds
}

/// Checks a pipeline's replies: each admission a 10-element `COMPACT` reply (allowed), each
/// `ECHO` its own number. Returns how many admissions found credits loaded from PostgreSQL
/// (`none` or a source) rather than `unavailable`.
fn check(replies: &[Result<Reply, String>], from: usize, echo: bool) -> usize {
    let step = if echo { 2 } else { 1 };
    let mut loaded = 0;
    for (k, chunk) in replies.chunks(step).enumerate() {
        let i = from + k;
        let admit = chunk[0]
            .as_ref()
            .unwrap_or_else(|e| panic!("admission {i}: {e}"));
        let Reply::Array(items) = admit else {
            panic!("admission {i}: not a COMPACT reply: {admit:?}");
        };
        assert_eq!(items.len(), 10, "admission {i}: {items:?}");
        assert_eq!(items[0], Reply::Int(1), "admission {i}: {items:?}");
        if items[7].text() != "unavailable" {
            loaded += 1;
        }
        if echo {
            let e = chunk[1]
                .as_ref()
                .unwrap_or_else(|e| panic!("echo {i}: {e}"));
            assert_eq!(e.text(), i.to_string(), "the reply after admission {i}");
        }
    }
    loaded
}

/// Without `quota.pg-url` there is nothing to wait for: a long pipeline of cold misses is
/// decided at once (`credit unavailable`) and no client is ever blocked.
#[test]
fn cold_misses_never_block_without_postgresql() {
    let server = RedisServer::start(&[]);
    let mut raw = Raw::connect(server.port(), false);
    let n = 20_000;
    let replies = raw.pipeline(&cold_misses("nopg", 0, n, false));
    assert_eq!(check(&replies, 0, false), 0);
    assert_eq!(info_i64(&server, "quota_clients_blocked"), 0);
}

/// PostgreSQL stopped: after the first misses find it down, the others are decided at once;
/// a second later one load probes it, and once it is back misses load from it again.
#[test]
fn cold_misses_do_not_wait_on_a_postgresql_known_to_be_down() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = RedisServer::builder()
        .module_args(&[
            ("pg-url", &pg.url()),
            ("schema", &schema),
            ("pg-timeout-ms", "500"),
        ])
        .start();
    pg.stop();
    let mut raw = Raw::connect(server.port(), false);
    let replies = raw.pipeline(&cold_misses("down", 0, 20_000, true));
    assert_eq!(check(&replies, 0, true), 0);
    let blocked = info_i64(&server, "quota_clients_blocked");
    assert!(
        blocked <= 5,
        "{blocked} clients blocked on a PostgreSQL known to be down"
    );
    assert_eq!(info_i64(&server, "quota_pg_down"), 1);
    pg.start();
    let back = wait_until(Duration::from_secs(20), || {
        let replies = raw.pipeline(&cold_misses("back", 0, 10, false));
        check(&replies, 0, false) == 10
    });
    assert!(back, "misses never loaded from PostgreSQL again");
    assert_eq!(info_i64(&server, "quota_pg_down"), 0);
}

/// At least 100,000 pipelined cold misses from four clients while PostgreSQL stalls and resumes
/// every few hundred milliseconds (a wait may end by its timer and its load at the same
/// moment): each admission gets its one reply and each `ECHO` after it its own, so nothing is
/// lost or misordered. The clients go on past their 25 batches until some misses have loaded
/// from PostgreSQL (at most a minute): when each probe of a PostgreSQL taken as down happens to
/// meet a stall, a fast run can answer every miss without it, and the scenario must mix both.
#[test]
fn heavy_no_reply_is_lost_or_misordered_while_postgresql_stalls() {
    let pg = PgServer::start_private();
    let schema = unique_schema();
    let server = RedisServer::builder()
        .module_args(&[
            ("pg-url", &pg.url()),
            ("schema", &schema),
            ("pg-timeout-ms", "5000"),
            ("flush-interval", "3600"),
        ])
        .start();
    // The schema first (deployed and written with a timeout a loaded machine can meet): the
    // misses must be able to load. Then the scenario's 50 ms waits: short enough that waits
    // on a paused PostgreSQL end by the timer, long enough that a loaded machine still loads
    // while it runs.
    let mut con = server.client();
    con.grant(["acme", "chat", "seed", "*"], ["REQUESTS_PER_DAY", "1"]);
    query(&mut con, &["CONFIG", "SET", "quota.pg-timeout-ms", "50"]).expect("CONFIG SET");
    let done = AtomicBool::new(false);
    let loaded = AtomicUsize::new(0);
    let sent = AtomicUsize::new(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    std::thread::scope(|scope| {
        // Stalls and resumes PostgreSQL (its processes as they are at each step: backends
        // come and go) until the clients are done.
        scope.spawn(|| {
            let mut rng = 0x2545_f491_u64;
            while !done.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                pg.pause();
                std::thread::sleep(Duration::from_millis(150 + rng % 250));
                pg.resume();
                std::thread::sleep(Duration::from_millis(50 + (rng >> 8) % 200));
            }
        });
        let clients: Vec<_> = (0..4)
            .map(|c| {
                let port = server.port();
                let (loaded, sent) = (&loaded, &sent);
                scope.spawn(move || {
                    let mut raw = Raw::connect(port, c % 2 == 1);
                    let mut batch = 0;
                    while batch < 25
                        || (loaded.load(Ordering::Relaxed) == 0
                            && std::time::Instant::now() < deadline)
                    {
                        let from = batch * 1000;
                        let cmds = cold_misses(&format!("c{c}"), from, 1000, true);
                        let n = check(&raw.pipeline(&cmds), from, true);
                        loaded.fetch_add(n, Ordering::Relaxed);
                        sent.fetch_add(1000, Ordering::Relaxed);
                        batch += 1;
                    }
                })
            })
            .collect();
        for client in clients {
            client.join().unwrap();
        }
        done.store(true, Ordering::Relaxed);
    });
    pg.resume();
    let loaded = loaded.into_inner();
    eprintln!(
        "{} cold misses: {loaded} loaded from PostgreSQL, {} clients blocked, {} waits ran out",
        sent.into_inner(),
        info_i64(&server, "quota_clients_blocked"),
        info_i64(&server, "quota_pg_timeouts")
    );
    assert!(loaded > 0, "PostgreSQL was never used while it was up");
}
