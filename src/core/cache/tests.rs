//! Unit tests of the cache: lookups, flights, eviction and the epoch.

use super::*;
use crate::core::policy::Additional;

fn cfg(max: usize) -> CacheConfig {
    CacheConfig {
        ttl_ms: 1000,
        negative_ttl_ms: 100,
        max_entries: max,
        max_bytes: usize::MAX,
        retry_ms: 500,
    }
}

fn rows(bundle: &str) -> UserCredits {
    Arc::from(vec![Replenishment {
        bundle_id: bundle.into(),
        additional: Additional::default(),
        expires_at: None,
        purchase_id: None,
        purchase_amount_usd: None,
        purchase_notes: None,
        active: true,
        created_at: 0,
        updated_at: 0,
        balance: None,
    }])
}

fn bundle_of(l: Lookup<'_>) -> Option<String> {
    match l {
        Lookup::Fresh(r, _) | Lookup::Stale { rows: r, .. } => {
            r.first().map(|r| r.bundle_id.to_string())
        }
        _ => None,
    }
}

/// Loads, refreshes and evictions keep the epoch; writes, invalidations and a stale mark
/// move it on (see the field).
/// A cache of 10 entries with one miss on `key` at time 0, and the flight it started.
fn missed(key: &[u8]) -> (Cache<u32>, u64) {
    missed_in(10, key)
}

/// A cache of `max` entries with one miss on `key` at time 0, and the flight it started.
fn missed_in(max: usize, key: &[u8]) -> (Cache<u32>, u64) {
    let mut c: Cache<u32> = Cache::new(cfg(max));
    let Lookup::Miss { load: Some(f) } = c.lookup(key, 0) else {
        panic!("a first lookup must start a load")
    };
    (c, f)
}

#[test]
fn the_epoch_moves_only_when_rows_may_have_changed_early() {
    let mut c: Cache<u32> = Cache::new(cfg(2));
    let e0 = c.epoch();
    for (i, key) in [&b"a"[..], b"b", b"c", b"d"].into_iter().enumerate() {
        let Lookup::Miss { load: Some(f) } = c.lookup(key, i as Millis) else {
            panic!()
        };
        c.complete(key, f, Ok(rows("*")), i as Millis);
    }
    assert!(c.stats().evictions >= 2);
    // A refresh of a stale entry, and a failed one.
    let Lookup::Stale {
        refresh: Some(f), ..
    } = c.lookup(b"d", 5_000)
    else {
        panic!()
    };
    c.complete(b"d", f, Ok(rows("x")), 5_000);
    let Lookup::Stale {
        refresh: Some(f), ..
    } = c.lookup(b"d", 9_000)
    else {
        panic!()
    };
    c.complete(b"d", f, Err(()), 9_000);
    assert_eq!(
        c.epoch(),
        e0,
        "loads, refreshes and evictions keep the epoch"
    );
    let mut last = c.epoch();
    let mut moved = |c: &Cache<u32>, what: &str| {
        assert!(c.epoch() > last, "{what} must move the epoch on");
        last = c.epoch();
    };
    c.put(b"d", rows("y"), 9_100);
    moved(&c, "put");
    c.mark_stale(b"d");
    moved(&c, "mark_stale");
    c.invalidate(b"d");
    moved(&c, "invalidate");
    c.clear();
    moved(&c, "clear");
}

#[test]
fn miss_loads_once_and_answers_every_waiter() {
    let (mut c, f) = missed(b"u");
    c.add_waiter(b"u", 1).unwrap();
    assert!(matches!(c.lookup(b"u", 1), Lookup::Miss { load: None }));
    c.add_waiter(b"u", 2).unwrap();
    assert_eq!(c.flights(), 1);
    assert_eq!(c.complete(b"u", f, Ok(rows("*")), 5), vec![1, 2]);
    assert_eq!(c.flights(), 0);
    assert_eq!(bundle_of(c.lookup(b"u", 6)), Some("*".into()));
    assert_eq!(c.stats().hits, 1);
    assert_eq!(c.stats().misses, 2);
}

#[test]
fn stale_entries_are_served_while_one_refresh_runs() {
    let mut c: Cache<u32> = Cache::new(cfg(10));
    c.put(b"u", rows("a"), 0);
    let Lookup::Stale {
        refresh: Some(f), ..
    } = c.lookup(b"u", 1000)
    else {
        panic!()
    };
    assert!(matches!(
        c.lookup(b"u", 1001),
        Lookup::Stale { refresh: None, .. }
    ));
    // The refresh fails: rows are kept, no new refresh until retry_ms has passed.
    assert!(c.complete(b"u", f, Err(()), 1002).is_empty());
    assert!(matches!(
        c.lookup(b"u", 1100),
        Lookup::Stale { refresh: None, .. }
    ));
    assert!(matches!(
        c.lookup(b"u", 1502),
        Lookup::Stale {
            refresh: Some(_),
            ..
        }
    ));
}

#[test]
fn negative_entries_use_the_negative_ttl() {
    let (mut c, f) = missed(b"u");
    c.complete(b"u", f, Ok(Arc::from(vec![])), 0);
    assert!(matches!(c.lookup(b"u", 99), Lookup::Fresh(r, _) if r.is_empty()));
    assert!(matches!(c.lookup(b"u", 100), Lookup::Stale { .. }));
}

#[test]
fn failed_first_load_makes_the_user_unavailable_for_a_while() {
    let (mut c, f) = missed(b"u");
    c.add_waiter(b"u", 7).unwrap();
    assert_eq!(c.complete(b"u", f, Err(()), 10), vec![7]);
    assert!(matches!(c.lookup(b"u", 11), Lookup::Unavailable));
    assert!(matches!(
        c.lookup(b"u", 510),
        Lookup::Miss { load: Some(_) }
    ));
}

#[test]
fn write_through_beats_an_older_load_in_flight() {
    let (mut c, f) = missed(b"u");
    c.put(b"u", rows("new"), 1);
    c.complete(b"u", f, Ok(rows("old")), 2);
    assert_eq!(bundle_of(c.lookup(b"u", 3)), Some("new".into()));
}

#[test]
fn a_load_that_raced_with_an_invalidation_answers_its_waiters_but_is_not_cached() {
    let (mut c, f) = missed(b"u");
    c.add_waiter(b"u", 1).unwrap();
    assert!(c.invalidate(b"u"));
    assert_eq!(c.complete(b"u", f, Ok(rows("x")), 2), vec![1]);
    // Its rows may predate the change: the next lookup loads again.
    assert!(matches!(c.lookup(b"u", 3), Lookup::Miss { load: Some(_) }));
    assert!(!c.invalidate(b"none"));
}

#[test]
fn a_load_that_raced_with_a_clear_or_a_stale_mark_is_kept_stale() {
    let (mut c, f) = missed(b"u");
    c.clear();
    c.complete(b"u", f, Ok(rows("x")), 2);
    assert_eq!(bundle_of(c.lookup(b"u", 3)), Some("x".into()));
    assert!(matches!(c.lookup(b"u", 3), Lookup::Stale { .. }));
}

#[test]
fn bounded_size_evicts_but_never_a_user_with_waiters() {
    let (mut c, f) = missed_in(3, b"loading");
    c.add_waiter(b"loading", 9).unwrap();
    for i in 0..50u32 {
        c.put(format!("u{i}").as_bytes(), rows("*"), i64::from(i) + 1);
        assert!(c.len() <= 3);
    }
    assert!(c.stats().evictions >= 47);
    assert_eq!(
        c.complete(b"loading", f, Ok(Arc::from(vec![])), 100),
        vec![9]
    );
    c.set_config(cfg(1));
    assert_eq!(c.len(), 1);
}

/// A byte bound evicts like the entry bound, and the byte count is always what the
/// entries take, whatever the mix of loads, writes, invalidations and evictions.
#[test]
fn a_byte_bound_holds_and_the_count_stays_exact() {
    let mut config = cfg(1_000_000);
    let one = {
        let mut c: Cache<u32> = Cache::new(config);
        c.put(b"u0", rows("*"), 0);
        c.bytes()
    };
    config.max_bytes = 20 * one;
    let mut c: Cache<u32> = Cache::new(config);
    let mut rng = crate::core::test_rng(11);
    for step in 0..20_000u32 {
        let key = format!("user-{}", rng(200));
        let now = i64::from(step);
        match rng(5) {
            0 => c.put(key.as_bytes(), rows("*"), now),
            1 => {
                c.invalidate(key.as_bytes());
            }
            2 => {
                if let Lookup::Miss { load: Some(f) }
                | Lookup::Stale {
                    refresh: Some(f), ..
                } = c.lookup(key.as_bytes(), now)
                {
                    let outcome = if rng(4) == 0 { Err(()) } else { Ok(rows("b")) };
                    c.complete(key.as_bytes(), f, outcome, now);
                }
            }
            3 => {
                let long = key.repeat(8);
                c.put(long.as_bytes(), Arc::from(vec![]), now);
            }
            _ => {
                // A load that starts here ends at once (an entry loading is never evicted).
                if let Lookup::Miss { load: Some(f) }
                | Lookup::Stale {
                    refresh: Some(f), ..
                } = c.lookup(key.as_bytes(), now)
                {
                    c.complete(key.as_bytes(), f, Ok(Arc::from(vec![])), now);
                }
            }
        }
        let counted: usize = c.map.iter().map(|(k, e)| Cache::cost(k, e)).sum();
        assert_eq!(c.bytes(), counted, "step {step}");
        assert!(
            c.bytes() <= config.max_bytes + one,
            "step {step}: {}",
            c.bytes()
        );
    }
    assert!(c.stats().evictions > 100);
    c.clear();
    assert_eq!(
        c.bytes(),
        c.map.iter().map(|(k, e)| Cache::cost(k, e)).sum::<usize>()
    );
}

#[test]
fn abort_returns_waiters_and_forgets_the_entry() {
    let (mut c, f) = missed_in(3, b"u");
    c.add_waiter(b"u", 1).unwrap();
    assert_eq!(c.abort_flight(b"u", f), vec![1]);
    assert_eq!(c.flights(), 0);
    assert_eq!(c.len(), 0);
    assert_eq!(c.add_waiter(b"u", 2), Err(2));
}

#[test]
fn clear_keeps_loads_in_flight() {
    let mut c: Cache<u32> = Cache::new(cfg(10));
    c.put(b"a", rows("*"), 0);
    let Lookup::Miss { load: Some(f) } = c.lookup(b"b", 0) else {
        panic!()
    };
    c.add_waiter(b"b", 1).unwrap();
    c.clear();
    assert_eq!(c.len(), 1);
    assert_eq!(c.complete(b"b", f, Ok(rows("*")), 1), vec![1]);
}
