//! Credits against a real PostgreSQL: a grant that replaces or tops up a row (every field round
//! trips, money is exact, overflow is refused), purchase ids applied once even when granted at
//! the same time, revoke and list in byte order, ids with quotes and unicode, and the cleanup of
//! expired rows with its events and its lock.

use std::sync::{Arc, Barrier};
use std::thread;

use super::*;

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
