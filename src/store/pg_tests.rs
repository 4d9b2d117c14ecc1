//! Store tests against a real PostgreSQL, run only when `QUOTA_TEST_PG_URL` is set (each test
//! prints that it skipped otherwise). Every test works in a schema of its own and drops it.
//!
//! This file holds the fixture and the helpers the themed files below share (they declare
//! `use super::*;` and take a store with `fixture!`), and the store as a whole: a deploy that is
//! idempotent and safe when concurrent, lock waits that time out, outages that are reported
//! unavailable, and an append-only event table. The themes: `credits` (grant, top-up, revoke,
//! list, cleanup), `ledger` (the usage flush), `listener` (NOTIFY), `costs` (timeouts measured,
//! the plans of the project reads).
//!
//! Test-only; must not be compiled into the module.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use postgres::{Client, NoTls};

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

mod costs;
mod credits;
mod ledger;
mod listener;
