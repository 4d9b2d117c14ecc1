//! Store tests against a real PostgreSQL, run only when `QUOTA_TEST_PG_URL` is set (each test
//! prints that it skipped otherwise). Every test works in a schema of its own and drops it.
//!
//! Test-only; must not be compiled into the module.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres::types::Type;
use postgres::{Client, NoTls};

use super::listener::{Entry, Listener, ListenerEvent};
use super::schema::{substitute, DROP_SQL};
use super::*;
use crate::core::credit::Cents;
use crate::core::policy::LimitField;
use crate::core::policy::LimitField::*;

static NEXT: AtomicU32 = AtomicU32::new(0);

fn pg_url(test: &str) -> Option<String> {
    match std::env::var("QUOTA_TEST_PG_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            eprintln!("{test}: skipped (QUOTA_TEST_PG_URL is not set)");
            None
        }
    }
}

/// The test's fixture, or returns from the test (skipped) when no PostgreSQL is configured.
macro_rules! fixture {
    ($name:literal) => {
        match Fixture::new($name) {
            Some(fx) => fx,
            None => return,
        }
    };
}

/// An event row: bundle, type, purchase id, payload.
type Event = (String, String, Option<String>, serde_json::Value);

/// A deployed store in a fresh schema, dropped again when the fixture goes.
struct Fixture {
    store: Arc<Store>,
    url: String,
    schema: String,
}

impl Fixture {
    fn new(test: &str) -> Option<Fixture> {
        let url = pg_url(test)?;
        let schema = format!(
            "qt_{}_{}_{}",
            test.chars().take(20).collect::<String>(),
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let store = Store::new(&StoreConfig {
            url: url.clone(),
            credentials: Default::default(),
            schema: schema.clone(),
            timeout_ms: 2000,
            pool_size: 8,
        })
        .expect("store");
        store.deploy().expect("deploy");
        Some(Fixture {
            store: Arc::new(store),
            url,
            schema,
        })
    }

    fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("direct connection")
    }

    /// The user's events of one type.
    fn events_of(&self, user: &UserId, kind: &str) -> Vec<Event> {
        let mut events = self.events(user);
        events.retain(|e| e.1 == kind);
        events
    }

    fn events(&self, user: &UserId) -> Vec<Event> {
        let sql = substitute(
            "SELECT bundle_id, event_type, purchase_id, payload::text \
             FROM \"control_plane\".user_quota_replenishment_event \
             WHERE tenant = $1 AND project = $2 AND user_id = $3 ORDER BY id",
            &self.schema,
        );
        self.client()
            .query(&sql, &[&user.tenant, &user.project, &user.user])
            .expect("events")
            .iter()
            .map(|r| {
                let payload: String = r.get(3);
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    serde_json::from_str(&payload).expect("json"),
                )
            })
            .collect()
    }

    fn exec(&self, sql: &str) {
        self.client()
            .batch_execute(&substitute(sql, &self.schema))
            .expect("exec");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Ok(mut c) = Client::connect(&self.url, NoTls) {
            let _ = c.batch_execute(&substitute(DROP_SQL, &self.schema));
        }
    }
}

fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Grants `req` to (USER, bundle) and returns the stored record.
fn record_of(fx: &Fixture, bundle: &str, req: &GrantRequest, now: Millis) -> Replenishment {
    let out = fx.store.grant(&USER, bundle, req, now).expect("grant");
    out.record.expect("a record")
}

const USER: UserId<'static> = UserId {
    tenant: "acme",
    project: "chat",
    user: "alice",
};

fn req(amounts: &[(LimitField, i64)]) -> GrantRequest {
    let mut r = GrantRequest::default();
    for (f, v) in amounts {
        r.amounts[*f as usize] = Some(*v);
    }
    r
}

#[test]
fn deploy_is_idempotent_and_concurrent_safe() {
    let fx = fixture!("deploy");
    fx.store.deploy().expect("second deploy");
    fx.store.deploy().expect("third deploy");
    // Several nodes deploying a fresh schema at once.
    let schema = format!("{}_c", fx.schema);
    let barrier = Arc::new(Barrier::new(4));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (url, schema, barrier) = (fx.url.clone(), schema.clone(), Arc::clone(&barrier));
            thread::spawn(move || {
                let store = Store::new(&StoreConfig {
                    url,
                    credentials: Default::default(),
                    schema,
                    timeout_ms: 2000,
                    pool_size: 1,
                })?;
                barrier.wait();
                store.deploy()
            })
        })
        .collect();
    for h in handles {
        h.join().expect("thread").expect("concurrent deploy");
    }
    fx.client()
        .batch_execute(&substitute(DROP_SQL, &schema))
        .expect("drop");
}

#[test]
fn grant_replaces_and_round_trips_every_field() {
    let fx = fixture!("grant_replace");
    let now = now_ms();
    let mut r = req(&[
        (RequestsPerDay, 50),
        (TotalRequests, i64::from(i32::MAX)),
        (TokensPerMonth, i64::MAX),
        (MaxConcurrent, 3),
        (RequestsPerSecond, 20),
        (TokensPerMinute, 90_000),
    ]);
    r.expiry = Some(now / 1000 + 3600);
    r.expiry_given = true;
    r.purchase_id = Some("pi_1".into());
    r.amount = Cents::parse("10.5");
    r.notes = Some("first 'grant' — ünïcode \"quoted\"".into());
    let out = fx.store.grant(&USER, "b1", &r, now).expect("grant");
    assert!(!out.duplicate);
    let rec = out.record.expect("record");
    assert_eq!(&*rec.bundle_id, "b1");
    // requests per day, per month, total; tokens per hour, day, month; concurrent.
    let max = i64::from(i32::MAX);
    let amounts = [50, -1, max, -1, -1, i64::MAX, 3, 20, -1, 90_000].map(|v| (v >= 0).then_some(v));
    assert_eq!(rec.additional.to_options(), amounts);
    assert_eq!(rec.expires_at, Some(now / 1000 + 3600));
    assert_eq!(rec.purchase_id.as_deref(), Some("pi_1"));
    assert_eq!(rec.purchase_amount_usd.as_deref(), Some("10.50"));
    assert_eq!(rec.purchase_notes.as_deref(), r.notes.as_deref());
    assert!(rec.active);
    assert!(
        (rec.created_at - now / 1000).abs() <= 5,
        "{} vs {}",
        rec.created_at,
        now
    );
    assert_eq!(out.live_rows, vec![rec.clone()]);
    assert_eq!(fx.store.load_user(&USER).expect("load"), vec![rec.clone()]);

    // Replace: absent amounts become NULL, expiry never, row stays one row.
    let r2 = req(&[(TokensPerDay, 7)]);
    let out2 = fx.store.grant(&USER, "b1", &r2, now).expect("grant 2");
    let rec2 = out2.record.expect("record 2");
    assert_eq!(rec2.additional.get(RequestsPerDay), None);
    assert_eq!(rec2.additional.get(TokensPerDay), Some(7));
    assert_eq!(rec2.expires_at, None);
    assert_eq!(rec2.purchase_id, None);
    assert_eq!(rec2.purchase_amount_usd, None);
    assert_eq!(rec2.created_at, rec.created_at);
    assert!(rec2.updated_at >= rec.updated_at);
    assert_eq!(out2.live_rows.len(), 1);

    let events = fx.events(&USER);
    assert_eq!(events.len(), 2);
    assert_eq!(events[0].1, "grant");
    assert_eq!(events[0].2.as_deref(), Some("pi_1"));
    assert_eq!(events[0].3["values"]["purchase_amount_usd"], "10.50");
    assert_eq!(events[0].3["values"]["additional_requests_per_day"], 50);
    assert_eq!(events[1].2, None);
}

#[test]
fn money_is_exact() {
    let fx = fixture!("money");
    for (bundle, text, stored) in [
        ("a", "10.50", "10.50"),
        ("b", "0.07", "0.07"),
        ("c", "99999999.99", "99999999.99"),
        ("d", "3", "3.00"),
    ] {
        let r = GrantRequest {
            amount: Cents::parse(text),
            ..Default::default()
        };
        let rec = fx
            .store
            .grant(&USER, bundle, &r, now_ms())
            .expect("grant")
            .record
            .expect("rec");
        assert_eq!(rec.purchase_amount_usd.as_deref(), Some(stored));
    }
    // ADD sums exactly, and refuses to pass the column's maximum.
    let mut add = GrantRequest {
        add: true,
        ..Default::default()
    };
    add.amount = Cents::parse("0.10");
    let rec = record_of(&fx, "b", &add, now_ms());
    assert_eq!(rec.purchase_amount_usd.as_deref(), Some("0.17"));
    let err = fx
        .store
        .grant(&USER, "c", &add, now_ms())
        .expect_err("overflow");
    assert_eq!(
        err.to_string(),
        "ERR ADD would take AMOUNT above 99999999.99"
    );
}

#[test]
fn add_tops_up_live_rows_and_restarts_dead_ones() {
    let fx = fixture!("grant_add");
    let now = now_ms();
    let mut add = req(&[(RequestsPerDay, 5), (TokensPerHour, 100)]);
    add.add = true;

    // Missing row: from zero, expiry never.
    let rec = record_of(&fx, "new", &add, now);
    assert_eq!(rec.additional.get(RequestsPerDay), Some(5));
    assert_eq!(rec.additional.get(TokensPerHour), Some(100));
    assert_eq!(rec.expires_at, None);

    // Live row: amounts add, expiry kept, absent amounts kept.
    let mut base = req(&[(RequestsPerDay, 10), (MaxConcurrent, 2)]);
    base.expiry = Some(now / 1000 + 600);
    base.expiry_given = true;
    fx.store.grant(&USER, "live", &base, now).expect("base");
    let rec = record_of(&fx, "live", &add, now);
    assert_eq!(rec.additional.get(RequestsPerDay), Some(15));
    assert_eq!(rec.additional.get(TokensPerHour), Some(100));
    assert_eq!(rec.additional.get(MaxConcurrent), Some(2));
    assert_eq!(rec.expires_at, Some(now / 1000 + 600));

    // Expired row: from zero, expiry never unless given.
    let mut old = req(&[(RequestsPerDay, 10)]);
    old.expiry = Some(now / 1000 - 10);
    old.expiry_given = true;
    fx.store.grant(&USER, "expired", &old, now).expect("old");
    let rec = record_of(&fx, "expired", &add, now);
    assert_eq!(rec.additional.get(RequestsPerDay), Some(5));
    assert_eq!(rec.expires_at, None);
    assert!(rec.active);

    // Revoked row: from zero.
    fx.store.grant(&USER, "revoked", &base, now).expect("base");
    assert!(fx.store.revoke(&USER, "revoked").expect("revoke").revoked);
    let rec = record_of(&fx, "revoked", &add, now);
    assert_eq!(rec.additional.get(RequestsPerDay), Some(5));
    assert_eq!(rec.additional.get(MaxConcurrent), None);
    assert!(rec.active);

    let kinds: Vec<String> = fx.events(&USER).into_iter().map(|e| e.1).collect();
    assert_eq!(
        kinds,
        ["topup", "grant", "topup", "grant", "topup", "grant", "revoke", "topup"]
    );

    // Overflow: a clear error and nothing written (no placeholder row left behind).
    let mut huge = req(&[(RequestsPerDay, i64::from(i32::MAX))]);
    huge.add = true;
    let err = fx
        .store
        .grant(&USER, "live", &huge, now)
        .expect_err("overflow");
    assert!(matches!(err, StoreError::Invalid(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "ERR ADD would take REQUESTS_PER_DAY above 2147483647"
    );
    let too_big = req(&[(MaxConcurrent, i64::from(i32::MAX) + 1)]);
    let err = fx
        .store
        .grant(&USER, "fresh", &too_big, now)
        .expect_err("too big");
    assert_eq!(
        err.to_string(),
        "ERR MAX_CONCURRENT must be at most 2147483647"
    );
    assert!(fx
        .store
        .list(&USER, true)
        .expect("list")
        .iter()
        .all(|r| &*r.bundle_id != "fresh"));
}

#[test]
fn duplicate_purchase_ids_apply_once() {
    let fx = fixture!("dup_seq");
    let now = now_ms();
    let mut r = req(&[(RequestsPerDay, 50)]);
    r.add = true;
    r.purchase_id = Some("pi_42".into());
    r.amount = Cents::parse("5");
    let first = fx.store.grant(&USER, "b", &r, now).expect("first");
    assert!(!first.duplicate);
    let again = fx.store.grant(&USER, "b", &r, now).expect("again");
    assert!(again.duplicate);
    assert_eq!(again.record, first.record);
    assert_eq!(again.live_rows, first.live_rows);

    // Same purchase id, another bundle of the same tenant+project: duplicate, no row created.
    let other = fx.store.grant(&USER, "other", &r, now).expect("other");
    assert!(other.duplicate);
    assert_eq!(other.record, None);
    assert_eq!(other.live_rows.len(), 1);
    // Another user of the same tenant+project: still a duplicate.
    let bob = UserId {
        user: "bob",
        ..USER
    };
    assert!(fx.store.grant(&bob, "b", &r, now).expect("bob").duplicate);
    // Another project: a different purchase scope.
    let elsewhere = UserId {
        project: "other",
        ..USER
    };
    assert!(
        !fx.store
            .grant(&elsewhere, "b", &r, now)
            .expect("elsewhere")
            .duplicate
    );

    // A duplicate of a row that was revoked since reports the row as it is.
    fx.store.revoke(&USER, "b").expect("revoke");
    let dup = fx.store.grant(&USER, "b", &r, now).expect("dup");
    assert!(dup.duplicate);
    assert_eq!(dup.record.map(|rec| rec.active), Some(false));
    assert!(dup.live_rows.is_empty());

    let events = fx.events(&USER);
    assert_eq!(
        events
            .iter()
            .filter(|e| e.2.as_deref() == Some("pi_42"))
            .count(),
        1
    );
}

#[test]
fn concurrent_duplicate_purchase_ids_apply_once() {
    let fx = fixture!("dup_conc");
    let now = now_ms();
    for (round, bundles) in [(0, ["b"; 8]), (1, ["b", "c", "d", "e", "f", "g", "h", "i"])] {
        let barrier = Arc::new(Barrier::new(bundles.len()));
        let handles: Vec<_> = bundles
            .iter()
            .map(|bundle| {
                let (store, barrier, bundle) = (
                    Arc::clone(&fx.store),
                    Arc::clone(&barrier),
                    bundle.to_string(),
                );
                thread::spawn(move || {
                    let mut r = req(&[(TokensPerDay, 1000)]);
                    r.add = true;
                    r.purchase_id = Some(format!("pi_conc_{round}"));
                    barrier.wait();
                    store.grant(&USER, &bundle, &r, now)
                })
            })
            .collect();
        let outcomes: Vec<GrantOutcome> = handles
            .into_iter()
            .map(|h| h.join().expect("thread").expect("grant"))
            .collect();
        assert_eq!(
            outcomes.iter().filter(|o| !o.duplicate).count(),
            1,
            "round {round}"
        );
    }
    let rows = fx.store.load_user(&USER).expect("load");
    // Round 0 applied once to "b"; round 1 applied once to one bundle (maybe "b" again).
    let total: i64 = rows
        .iter()
        .filter_map(|r| r.additional.get(TokensPerDay))
        .sum();
    assert_eq!(total, 2000, "{rows:?}");
    // Losers of round 1 left no placeholder rows behind.
    assert!(rows.len() <= 2);
    assert_eq!(fx.store.list(&USER, true).expect("all").len(), rows.len());
}

#[test]
fn revoke_list_and_order() {
    let fx = fixture!("revoke_list");
    let now = now_ms();
    let r = req(&[(RequestsPerDay, 1)]);
    let mut expired = r.clone();
    expired.expiry = Some(now / 1000 - 1);
    expired.expiry_given = true;
    for bundle in ["z", "*", "B", "a", "é"] {
        fx.store.grant(&USER, bundle, &r, now).expect("grant");
    }
    fx.store
        .grant(&USER, "old", &expired, now)
        .expect("expired grant");

    let out = fx.store.revoke(&USER, "a").expect("revoke");
    assert!(out.revoked);
    let bundles = |rows: &[Replenishment]| {
        rows.iter()
            .map(|r| r.bundle_id.to_string())
            .collect::<Vec<_>>()
    };
    // Byte order; the expired row is still active (the cache needs it to know it expired).
    assert_eq!(bundles(&out.live_rows), ["*", "B", "old", "z", "é"]);
    assert!(!fx.store.revoke(&USER, "a").expect("again").revoked);
    assert!(!fx.store.revoke(&USER, "missing").expect("missing").revoked);

    assert_eq!(
        bundles(&fx.store.list(&USER, false).expect("list")),
        ["*", "B", "z", "é"]
    );
    let all = fx.store.list(&USER, true).expect("list all");
    assert_eq!(bundles(&all), ["*", "B", "a", "old", "z", "é"]);
    assert!(!all.iter().find(|r| &*r.bundle_id == "a").expect("a").active);
    assert_eq!(
        bundles(&fx.store.load_user(&USER).expect("load")),
        ["*", "B", "old", "z", "é"]
    );
    assert!(fx
        .store
        .list(
            &UserId {
                user: "nobody",
                ..USER
            },
            true
        )
        .expect("empty")
        .is_empty());

    let revokes = fx.events_of(&USER, "revoke");
    assert_eq!(revokes.len(), 1);
    assert_eq!(revokes[0].0, "a");
    assert_eq!(revokes[0].3["values"]["additional_requests_per_day"], 1);
}

#[test]
fn ids_with_quotes_and_unicode_are_unchanged() {
    let fx = fixture!("ids");
    let user = UserId {
        tenant: "t'; DROP TABLE x; --",
        project: "p\"q\\r",
        user: "üser 🦀 {tag}",
    };
    let bundle = "bündle '\"*";
    let rec = fx
        .store
        .grant(&user, bundle, &req(&[(TokensPerHour, 1)]), now_ms())
        .expect("grant")
        .record
        .expect("record");
    assert_eq!(&*rec.bundle_id, bundle);
    assert_eq!(
        &*fx.store.load_user(&user).expect("load")[0].bundle_id,
        bundle
    );
    let events = fx.events(&user);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, bundle);
    assert!(fx.store.revoke(&user, bundle).expect("revoke").revoked);
}

#[test]
fn cleanup_expires_rows_once_with_events() {
    let fx = fixture!("cleanup");
    let now = now_ms();
    let mut soon = req(&[(RequestsPerDay, 1)]);
    soon.expiry = Some(now / 1000 - 5);
    soon.expiry_given = true;
    soon.purchase_id = Some("pi_c".into());
    soon.amount = Cents::parse("1.25");
    let bob = UserId {
        user: "bob",
        ..USER
    };
    fx.store.grant(&USER, "a", &soon, now).expect("grant");
    soon.purchase_id = None;
    fx.store.grant(&USER, "b", &soon, now).expect("grant");
    fx.store.grant(&bob, "a", &soon, now).expect("grant");
    let mut later = soon.clone();
    later.expiry = Some(now / 1000 + 3600);
    fx.store.grant(&bob, "b", &later, now).expect("grant");
    fx.store.grant(&bob, "c", &req(&[]), now).expect("grant");

    let out = fx.store.cleanup(now).expect("cleanup");
    assert!(!out.skipped);
    assert_eq!(out.deactivated, 3);
    assert_eq!(
        out.users,
        vec![
            ("acme".to_owned(), "chat".to_owned(), "alice".to_owned()),
            ("acme".to_owned(), "chat".to_owned(), "bob".to_owned()),
        ]
    );
    assert!(fx.store.load_user(&USER).expect("load").is_empty());
    assert_eq!(fx.store.load_user(&bob).expect("load bob").len(), 2);
    let expires = fx.events_of(&USER, "expire");
    assert_eq!(expires.len(), 2);
    assert_eq!(expires[0].3["values"]["purchase_id"], "pi_c");
    assert_eq!(expires[0].3["values"]["purchase_amount_usd"], "1.25");
    assert_eq!(expires[0].2, None);
    assert_eq!(fx.store.cleanup(now).expect("again").deactivated, 0);

    // While another node holds the cleanup lock, cleanup is skipped.
    let mut other = fx.client();
    let mut tx = other.transaction().expect("tx");
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[
            &schema::CLEANUP_LOCK_CLASS,
            &schema::schema_lock_key(&fx.schema),
        ],
    )
    .expect("lock");
    let skipped = fx.store.cleanup(now + 7_200_000).expect("skipped");
    assert!(skipped.skipped);
    assert_eq!(skipped.deactivated, 0);
    tx.rollback().expect("rollback");
    assert_eq!(
        fx.store
            .cleanup(now + 7_200_000)
            .expect("later")
            .deactivated,
        1
    );
}

#[test]
fn lock_waits_time_out_and_outages_are_unavailable() {
    let fx = fixture!("errors");
    let fast = Store::new(&StoreConfig {
        url: fx.url.clone(),
        credentials: Default::default(),
        schema: fx.schema.clone(),
        timeout_ms: 300,
        pool_size: 1,
    })
    .expect("store");
    fast.grant(&USER, "b", &req(&[]), now_ms()).expect("grant");
    let mut other = fx.client();
    let mut tx = other.transaction().expect("tx");
    tx.batch_execute(&substitute(
        "SELECT 1 FROM \"control_plane\".user_quota_replenishment FOR UPDATE",
        &fx.schema,
    ))
    .expect("lock");
    let started = Instant::now();
    let err = fast
        .grant(&USER, "b", &req(&[]), now_ms())
        .expect_err("lock timeout");
    assert_eq!(err, StoreError::Timeout);
    assert!(started.elapsed() < Duration::from_secs(2));
    tx.rollback().expect("rollback");
    // The connection is still usable afterwards.
    fast.grant(&USER, "b", &req(&[]), now_ms())
        .expect("grant after timeout");

    // A read is bounded the same way, in a read-only transaction of its own: the server ends
    // it (no cancel request), and the connection is lent again.
    let mut tx = other.transaction().expect("tx");
    tx.batch_execute(&substitute(
        "LOCK TABLE \"control_plane\".user_quota_replenishment IN ACCESS EXCLUSIVE MODE",
        &fx.schema,
    ))
    .expect("lock");
    let started = Instant::now();
    let err = fast.load_user(&USER).expect_err("timed out");
    assert_eq!(err, StoreError::Timeout);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1500),
        "{took:?}"
    );
    assert_eq!(fast.pool_state().0, 1, "the connection was dropped");
    tx.rollback().expect("rollback");
    assert_eq!(
        fast.load_user(&USER).expect("read after the timeout").len(),
        1
    );
    assert_eq!(fast.pool_state().0, 1, "a second connection was opened");

    // Nothing listens on port 1.
    let down = Store::new(&StoreConfig {
        url: "host=127.0.0.1 port=1 user=u password=hunter2 dbname=x".into(),
        credentials: Default::default(),
        schema: "s".into(),
        timeout_ms: 300,
        pool_size: 1,
    })
    .expect("store");
    let started = Instant::now();
    let err = down.load_user(&USER).expect_err("down");
    assert!(err.is_unavailable(), "{err:?}");
    let text = err.to_string();
    assert!(text.starts_with("ERR PostgreSQL unavailable: "), "{text}");
    assert!(!text.contains("hunter2"));
    assert!(started.elapsed() < Duration::from_secs(2));
    // While connecting keeps failing, the next callers do not each wait the timeout.
    let started = Instant::now();
    assert_eq!(down.load_user(&USER).expect_err("still down"), err);
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );

    // A server error is a Query error with the server's message.
    fx.exec("DROP TABLE \"control_plane\".user_quota_replenishment CASCADE");
    let err = fx.store.load_user(&USER).expect_err("no table");
    assert!(
        matches!(&err, StoreError::Query(m) if m.contains("does not exist")),
        "{err:?}"
    );
}

#[test]
fn event_table_is_append_only() {
    let fx = fixture!("append_only");
    fx.store
        .grant(&USER, "b", &req(&[]), now_ms())
        .expect("grant");
    let mut c = fx.client();
    for sql in [
        "UPDATE \"control_plane\".user_quota_replenishment_event SET event_type = 'grant'",
        "DELETE FROM \"control_plane\".user_quota_replenishment_event",
        "TRUNCATE \"control_plane\".user_quota_replenishment_event",
    ] {
        let err = c
            .batch_execute(&substitute(sql, &fx.schema))
            .expect_err(sql);
        assert!(err.to_string().contains("db error"), "{err}");
    }
    assert_eq!(fx.events(&USER).len(), 1);
}

#[test]
fn listener_reports_changes_and_reconnects() {
    let fx = fixture!("listener");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let listener = Listener::spawn(
        fx.url.clone(),
        Default::default(),
        fx.schema.clone(),
        1000,
        Box::new(move |e| sink.lock().expect("lock").push(e)),
    )
    .expect("spawn");
    let wait_for = |pred: &dyn Fn(&[ListenerEvent]) -> bool| {
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(10) {
            if pred(&seen.lock().expect("lock")) {
                return true;
            }
            thread::sleep(Duration::from_millis(20));
        }
        false
    };
    assert!(
        wait_for(&|e| e.contains(&ListenerEvent::Connected)),
        "never connected"
    );
    let user = UserId {
        user: "ü\"ser",
        ..USER
    };
    fx.store
        .grant(&user, "b", &req(&[]), now_ms())
        .expect("grant");
    let changed = ListenerEvent::Changed {
        entry: Entry::User,
        tenant: "acme".into(),
        project: "chat".into(),
        id: "ü\"ser".into(),
        own: true,
    };
    assert!(
        wait_for(&|e| e.contains(&changed)),
        "no change seen: {:?}",
        seen.lock()
    );
    // A rolled-back duplicate sends nothing; count the changes so far.
    let times_seen = |event: &ListenerEvent| {
        seen.lock()
            .expect("lock")
            .iter()
            .filter(|e| *e == event)
            .count()
    };
    let before = times_seen(&changed);

    // Kill the listener's backend: it reports the loss and listens again.
    fx.client()
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'redis-quota-listener' AND pid <> pg_backend_pid()",
        )
        .expect("terminate");
    assert!(
        wait_for(&|e| e
            .iter()
            .any(|x| matches!(x, ListenerEvent::Disconnected(_)))),
        "loss not reported: {:?}",
        seen.lock()
    );
    assert!(
        wait_for(&|e| e.iter().filter(|x| **x == ListenerEvent::Connected).count() >= 2),
        "no reconnect: {:?}",
        seen.lock()
    );
    let mut r = req(&[]);
    r.purchase_id = Some("pi_l".into());
    fx.store.grant(&user, "b", &r, now_ms()).expect("grant");
    assert!(
        fx.store
            .grant(&user, "b", &r, now_ms())
            .expect("dup")
            .duplicate
    );
    assert!(wait_for(
        &|e| e.iter().filter(|x| **x == changed).count() > before
    ));
    thread::sleep(Duration::from_millis(500));
    let after = times_seen(&changed);
    assert_eq!(after, before + 1, "{:?}", seen.lock());

    let started = Instant::now();
    listener.stop();
    assert!(started.elapsed() < Duration::from_millis(600));
}

/// What the pooler-safe timeouts cost (run by hand: `cargo test --release --lib
/// measure_timeout_costs -- --ignored --nocapture`): a cache load of one user bare on a
/// connection, against the same load through `Store::load_user` (checkout, a read-only
/// transaction opened with the timeouts, the read, COMMIT); and the statement that opens every
/// transaction, against a whole grant. Rounds alternate, so the load of a shared machine falls
/// on both sides; medians of 7.
#[test]
#[ignore]
fn measure_timeout_costs() {
    let fx = fixture!("costs");
    let mut client = fx.client();
    let micros =
        |started: Instant, n: u32| started.elapsed().as_nanos() as f64 / f64::from(n) / 1000.0;
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };

    let sql = queries::Statements::new(&fx.schema);
    let setup = tx_setup(2000);
    let (mut bare, mut bounded, mut empty, mut opened, mut grants) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..7 {
        let started = Instant::now();
        for _ in 0..500 {
            queries::active_rows(&mut client, &sql, &USER).expect("read");
        }
        bare.push(micros(started, 500));
        let started = Instant::now();
        for _ in 0..500 {
            fx.store.load_user(&USER).expect("read");
        }
        bounded.push(micros(started, 500));
        let started = Instant::now();
        for _ in 0..300 {
            client
                .transaction()
                .expect("begin")
                .commit()
                .expect("commit");
        }
        empty.push(micros(started, 300));
        let started = Instant::now();
        for _ in 0..300 {
            let mut tx = client.transaction().expect("begin");
            tx.batch_execute(&setup).expect("setup");
            tx.commit().expect("commit");
        }
        opened.push(micros(started, 300));
        let started = Instant::now();
        for i in 0..100 {
            let user = UserId {
                user: &format!("w{round}_{i}"),
                ..USER
            };
            fx.store
                .grant(&user, "b", &req(&[(RequestsPerDay, 5)]), now_ms())
                .expect("grant");
        }
        grants.push(micros(started, 100));
    }
    println!(
        "a cache load of one user: {:.1} µs bare, {:.1} µs through the store (bounded)",
        median(bare),
        median(bounded)
    );
    println!(
        "BEGIN + COMMIT {:.1} µs, with the setup statement {:.1} µs; a whole grant {:.1} µs",
        median(empty),
        median(opened),
        median(grants)
    );
}

/// A statement parameter and its type.
type Param<'a> = (&'a (dyn postgres::types::ToSql + Sync), Type);

/// The plan of `sql` with `params` (`EXPLAIN`, bound like the module binds them).
fn plan_of(fx: &Fixture, sql: &str, params: &[Param<'_>]) -> String {
    let rows = fx
        .client()
        .query_typed(&format!("EXPLAIN {sql}"), params)
        .unwrap_or_else(|e| panic!("EXPLAIN {sql}: {e}"));
    rows.iter()
        .map(|r| r.get::<_, String>(0))
        .collect::<Vec<_>>()
        .join("\n")
}

/// QUOTA.FIND and QUOTA.TOP read their own indexes (which a redeploy adds to an older schema),
/// among other projects' rows, revoked rows and hours out of range: FIND in the index's order
/// (no sort, so a page reads COUNT + 1 rows however deep it is), TOP only the hours asked;
/// never a sequential scan.
#[test]
fn project_reads_use_their_indexes() {
    let fx = fixture!("project_explain");
    // A schema deployed before these indexes existed gets them in place from the next deploy.
    fx.exec(
        "DROP INDEX \"control_plane\".user_quota_replenishment_find_idx; \
         DROP INDEX \"control_plane\".user_quota_replenishment_find_expiry_idx; \
         DROP INDEX \"control_plane\".quota_usage_hourly_project_hour_idx;",
    );
    fx.store.deploy().expect("redeploy");
    fx.exec(
        "INSERT INTO \"control_plane\".user_quota_replenishment \
             (tenant, project, user_id, bundle_id, expires_at, active) \
         SELECT 't' || (i % 5), 'p' || (i % 4), 'user' || i, b, \
             CASE WHEN i % 2 = 0 THEN now() + i * interval '1 minute' END, i % 7 <> 0 \
         FROM generate_series(1, 20000) i, unnest(ARRAY['*', 'web']) b; \
         INSERT INTO \"control_plane\".quota_usage_hourly \
             (tenant, project, user_id, bundle_id, hour, requests, tokens) \
         SELECT 't' || (i % 5), 'p' || (i % 4), 'user' || (i % 3000), 'web', \
             to_timestamp(3600 * (490000 + h)), i % 17, i % 101 \
         FROM generate_series(1, 8000) i, generate_series(0, 23) h ON CONFLICT DO NOTHING; \
         ANALYZE \"control_plane\".user_quota_replenishment; \
         ANALYZE \"control_plane\".quota_usage_hourly;",
    );
    let sql = project::ProjectStatements::new(&fx.schema);
    let (t, p, user, bundle) = ("t1", "p1", "user5001", "*");
    let (limit, far, near, count) = (101_i64, 100_000_000_i64, 3_600_i64, 10_i64);
    let (secs, micros) = (now_ms() / 1000, 0_i64);
    let (from, to) = (3600 * 490_006_i64, 3600 * 490_012_i64);
    let (text, int) = (Type::TEXT, Type::INT8);
    // What, the statement, its parameters, the index it must read, whether in its order.
    type Case<'a> = (&'a str, &'a String, Vec<Param<'a>>, &'a str, bool);
    let cases: Vec<Case<'_>> = vec![
        (
            "FIND",
            &sql.find_first,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_idx",
            true,
        ),
        (
            "FIND CURSOR",
            &sql.find_after,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&user, text.clone()),
                (&bundle, text.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_idx",
            true,
        ),
        (
            "FIND EXPIRES_WITHIN",
            &sql.expiring_first,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&far, int.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_expiry_idx",
            true,
        ),
        (
            "FIND EXPIRES_WITHIN CURSOR",
            &sql.expiring_after,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&far, int.clone()),
                (&secs, int.clone()),
                (&micros, int.clone()),
                (&user, text.clone()),
                (&bundle, text.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_expiry_idx",
            true,
        ),
        // A near horizon holds few rows: reading them all from the index and sorting is fine.
        (
            "FIND EXPIRES_WITHIN 3600",
            &sql.expiring_first,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&near, int.clone()),
                (&limit, int.clone()),
            ],
            "user_quota_replenishment_find_expiry_idx",
            false,
        ),
        (
            "TOP REQUESTS",
            &sql.top_requests,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&from, int.clone()),
                (&to, int.clone()),
                (&count, int.clone()),
            ],
            "quota_usage_hourly_project_hour_idx",
            false,
        ),
        (
            "TOP TOKENS",
            &sql.top_tokens,
            vec![
                (&t, text.clone()),
                (&p, text.clone()),
                (&from, int.clone()),
                (&to, int.clone()),
                (&count, int.clone()),
            ],
            "quota_usage_hourly_project_hour_idx",
            false,
        ),
    ];
    for (what, statement, params, index, ordered) in cases {
        let plan = plan_of(&fx, statement, &params);
        eprintln!("{what}:\n{plan}\n");
        assert!(
            plan.contains(index),
            "{what} does not read {index}:\n{plan}"
        );
        assert!(!plan.contains("Seq Scan"), "{what}:\n{plan}");
        if ordered {
            assert!(
                !plan.contains("Sort"),
                "{what} sorts instead of reading in order:\n{plan}"
            );
        }
    }
}

mod ledger;
