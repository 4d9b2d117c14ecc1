//! Unit tests of the account: admission, leases, commits, releases, the ledger and the codec.

use super::codec::ENCODING_VERSION;
use super::*;
use crate::core::policy::{Additional, EffectivePolicy, Limits};
use crate::core::window::{days_from_civil, seconds_until, LAST_MS};
use proptest::prelude::*;

const T0: Millis = 1_795_000_000_000; // 2026-11-18T...

fn policy(fields: &[(LimitField, u64)]) -> EffectivePolicy {
    EffectivePolicy::of(fields)
}

fn plain() -> AdmitRequest<'static> {
    AdmitRequest {
        lease: None,
        lease_ttl_ms: 300_000,
        reserve: None,
        peek: false,
        cost: 1,
        balance: None,
    }
}

fn admit(
    acc: &mut Account,
    p: &EffectivePolicy,
    req: &AdmitRequest<'_>,
    now: Millis,
) -> AdmitDecision {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    acc.admit(p, req, now, || {
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1
    })
    .unwrap()
}

#[test]
fn requests_per_day_admits_exactly_the_limit_then_resets_at_midnight() {
    let p = policy(&[(LimitField::RequestsPerDay, 3)]);
    let mut acc = Account::default();
    for i in 0..3 {
        let d = admit(&mut acc, &p, &plain(), T0);
        assert!(d.allowed());
        assert_eq!(d.remaining_requests, 2 - i);
    }
    let d = admit(&mut acc, &p, &plain(), T0);
    assert!(!d.allowed());
    assert_eq!(d.reason(), "requests_per_day");
    assert_eq!(d.retry_after, seconds_until(T0, Window::Day.end(T0)));
    assert!(!d.changed());
    let tomorrow = Window::Day.end(T0);
    assert!(admit(&mut acc, &p, &plain(), tomorrow).allowed());
}

#[test]
fn several_violations_join_and_total_never_resets() {
    let p = policy(&[
        (LimitField::RequestsPerDay, 1),
        (LimitField::TotalRequests, 1),
    ]);
    let mut acc = Account::default();
    assert!(admit(&mut acc, &p, &plain(), T0).allowed());
    let d = admit(&mut acc, &p, &plain(), T0);
    assert_eq!(d.reason(), "requests_per_day|total_requests");
    assert_eq!(d.retry_after, -1);
    assert!(acc.lifetime);
    assert_eq!(acc.retention(), Retention::Forever);
}

#[test]
fn credits_raise_the_limit_and_mark_used_replenishment() {
    let mut base = Limits::default();
    base.set(LimitField::RequestsPerDay, Some(1));
    let mut add = Additional::default();
    add.set(LimitField::RequestsPerDay, Some(1));
    let p = EffectivePolicy::merge(base, Some(&add));
    let mut acc = Account::default();
    let first = admit(&mut acc, &p, &plain(), T0);
    assert!(first.allowed() && !first.used_replenishment);
    let second = admit(&mut acc, &p, &plain(), T0);
    assert!(second.allowed() && second.used_replenishment);
    assert!(!admit(&mut acc, &p, &plain(), T0).allowed());
}

#[test]
fn concurrency_counts_live_leases_and_checks_only_without_window_violations() {
    let p = policy(&[(LimitField::MaxConcurrent, 2)]);
    let mut acc = Account::default();
    let a = admit(&mut acc, &p, &plain(), T0);
    let b = admit(&mut acc, &p, &plain(), T0);
    assert!(a.allowed() && b.allowed() && a.lease.is_some() && a.lease != b.lease);
    let c = admit(&mut acc, &p, &plain(), T0);
    assert_eq!(c.reason(), "concurrency");
    assert_eq!(c.retry_after, 300);
    // A lease expires: the slot frees.
    assert!(admit(&mut acc, &p, &plain(), T0 + 300_000).allowed());
    // No slot at all: waiting never helps.
    let none = admit(
        &mut Account::default(),
        &policy(&[(LimitField::MaxConcurrent, 0)]),
        &plain(),
        T0,
    );
    assert_eq!(
        (none.reason().as_ref(), none.retry_after),
        ("concurrency", -1)
    );
    let p2 = policy(&[
        (LimitField::MaxConcurrent, 0),
        (LimitField::RequestsPerDay, 0),
    ]);
    assert_eq!(
        admit(&mut acc, &p2, &plain(), T0).reason(),
        "requests_per_day"
    );
}

#[test]
fn readmitting_a_held_lease_counts_nothing() {
    let p = policy(&[
        (LimitField::MaxConcurrent, 1),
        (LimitField::RequestsPerDay, 10),
    ]);
    let mut acc = Account::default();
    let req = AdmitRequest {
        lease: Some("L1"),
        ..plain()
    };
    let a = admit(&mut acc, &p, &req, T0);
    let b = admit(&mut acc, &p, &req, T0);
    assert!(a.allowed() && b.allowed());
    assert_eq!(b.lease, Some(LeaseId::parse("L1")));
    assert!(!b.changed());
    assert_eq!(acc.usage(T0).requests_per_day, 1);
    assert_eq!(acc.usage(T0).in_flight, 1);
}

#[test]
fn reservations_cap_at_what_is_left_and_settle_on_commit() {
    let p = policy(&[
        (LimitField::TokensPerDay, 1000),
        (LimitField::TokensPerHour, 600),
    ]);
    let mut acc = Account::default();
    let r = AdmitRequest {
        reserve: Some(500),
        ..plain()
    };
    let a = admit(&mut acc, &p, &r, T0);
    assert_eq!(a.reserved, 500);
    assert_eq!(a.remaining_tokens, 100);
    let b = admit(&mut acc, &p, &r, T0);
    assert_eq!(b.reserved, 100);
    let c = admit(&mut acc, &p, &r, T0);
    assert_eq!(c.reason(), "tokens_per_hour");
    let lease = a.lease.unwrap();
    let mut buf = [0u8; 16];
    let lease = lease.as_text(&mut buf).to_owned();
    assert_eq!(lease.len(), 16);
    let out = acc.commit(200, Some(&lease), T0).unwrap();
    assert!(out.lease_held && !out.duplicate);
    assert_eq!(acc.usage(T0).tokens_per_day, 200);
    assert_eq!(acc.usage(T0).reserved, 100);
    assert!(acc.commit(200, Some(&lease), T0).unwrap().duplicate);
    assert_eq!(acc.usage(T0).tokens_per_day, 200);
}

#[test]
fn release_refunds_the_request_only_in_its_own_windows() {
    let p = policy(&[(LimitField::RequestsPerDay, 5)]);
    let mut acc = Account::default();
    let r = AdmitRequest {
        lease: Some("x"),
        ..plain()
    };
    admit(&mut acc, &p, &r, T0);
    assert_eq!(acc.usage(T0).requests_per_day, 1);
    assert!(acc.release("x", T0));
    assert!(!acc.release("x", T0));
    assert_eq!(acc.usage(T0).requests_per_day, 0);
    assert_eq!(acc.req_total, 0);
    admit(
        &mut acc,
        &p,
        &AdmitRequest {
            lease_ttl_ms: 3 * 86_400_000,
            ..r
        },
        T0,
    );
    let next_day = Window::Day.end(T0) + 10;
    admit(&mut acc, &p, &plain(), next_day);
    assert!(acc.release("x", next_day));
    assert_eq!(acc.usage(next_day).requests_per_day, 1);
}

#[test]
fn expired_leases_never_count_even_before_they_are_pruned() {
    let mut acc = Account::default();
    let short = AdmitRequest {
        lease_ttl_ms: 1000,
        ..plain()
    };
    // Concurrency: two slots taken, both expired 1 ms ago (within PRUNE_DELAY_MS).
    let p = policy(&[(LimitField::MaxConcurrent, 2)]);
    assert!(admit(&mut acc, &p, &short, T0).allowed());
    assert!(admit(&mut acc, &p, &short, T0).allowed());
    assert!(!admit(&mut acc, &p, &short, T0 + 999).allowed());
    assert!(admit(&mut acc, &p, &short, T0 + 1001).allowed());
    // Reservations: an expired one no longer holds tokens.
    let mut acc = Account::default();
    let p = policy(&[(LimitField::TokensPerDay, 100)]);
    let reserve = AdmitRequest {
        reserve: Some(100),
        ..short
    };
    assert_eq!(admit(&mut acc, &p, &reserve, T0).reserved, 100);
    assert!(!admit(&mut acc, &p, &reserve, T0 + 999).allowed());
    let d = admit(&mut acc, &p, &reserve, T0 + 1001);
    assert!(d.allowed());
    assert_eq!(d.reserved, 100);
    // Without any of that at stake, expired leases go within PRUNE_DELAY_MS.
    let mut acc = Account::default();
    let p = policy(&[(LimitField::MaxConcurrent, 1000)]);
    for _ in 0..10 {
        admit(&mut acc, &p, &short, T0);
    }
    admit(&mut acc, &p, &short, T0 + 1000);
    assert_eq!(acc.usage(T0 + 1000).in_flight, 1);
    admit(&mut acc, &p, &short, T0 + 1000 + PRUNE_DELAY_MS);
    assert_eq!(acc.leases().len(), 2, "the 10 expired leases are pruned");
}

/// Deciding with expired leases pruned late gives exactly the decisions that pruning them
/// at once gives, whatever the sequence of admissions, commits and releases.
#[test]
fn late_pruning_decides_exactly_as_eager_pruning() {
    let mut next = crate::core::test_rng(0x2545_F491_4F6C_DD1Du64);
    for case in 0..300 {
        let mut base = Limits::default();
        let mut add = Additional::default();
        for field in LimitField::ALL {
            if next(3) == 0 {
                base.set(field, Some(next(8)));
                if next(2) == 0 {
                    add.set(field, Some(next(4) as i64));
                }
            }
        }
        let p = EffectivePolicy::merge(base, Some(&add));
        let mut lazy = Account::default();
        let mut eager = Account::default();
        let mut now = T0 + next(86_400_000) as Millis;
        let mut ids: Vec<String> = Vec::new();
        for step in 0..200 {
            now += next(700) as Millis;
            let named = ids.get(next(ids.len() as u64 + 3) as usize).cloned();
            match next(6) {
                0..=2 => {
                    let req = AdmitRequest {
                        lease: named.as_deref().filter(|_| next(2) == 0),
                        lease_ttl_ms: 1 + next(1500) as Millis,
                        reserve: (next(2) == 0).then(|| next(6)),
                        peek: next(8) == 0,
                        // Mostly 1; now and then a free probe or a larger cost.
                        cost: [1, 1, 0, 2, 5][next(5) as usize],
                        balance: None,
                    };
                    eager.prune(now);
                    let mut id_a = 1000 * (case + 1) + step;
                    let mut id_b = id_a;
                    let a = lazy.admit(&p, &req, now, || {
                        id_a += 1;
                        id_a
                    });
                    let b = eager.admit(&p, &req, now, || {
                        id_b += 1;
                        id_b
                    });
                    let (mut a, mut b) = (a.unwrap(), b.unwrap());
                    for d in [&mut a, &mut b] {
                        d.did.set(Did::CHANGE, false);
                        d.did.set(Did::PRUNE, false);
                    }
                    assert_eq!(a, b, "case {case} step {step}");
                    if let Some(LeaseId::Short(n)) = &a.lease {
                        ids.push(format!("{n:016x}"));
                    }
                }
                3 => {
                    let tokens = next(5);
                    assert_eq!(
                        lazy.commit(tokens, named.as_deref(), now),
                        eager.commit(tokens, named.as_deref(), now),
                        "case {case} step {step}"
                    );
                }
                4 => {
                    if let Some(id) = &named {
                        assert_eq!(lazy.release(id, now), eager.release(id, now));
                    }
                }
                _ => {
                    assert_eq!(lazy.usage(now), eager.usage(now), "case {case} step {step}");
                    for acc in [&lazy, &eager] {
                        let sum = acc.leases().iter().map(|l| l.reserved).sum::<u64>();
                        assert_eq!(acc.reserved(), sum);
                        let front = acc.leases().front().map_or(0, |l| l.expires_at);
                        assert_eq!(acc.first_expiry(), front);
                        assert_eq!(acc.check(), Ok(()));
                    }
                }
            }
        }
    }
}

/// The optional part is one cache line plus the ledger and rates pointers (which an admission
/// without a balance or a rate does not touch: its hour's usage is inline): an admission with
/// a lease touches it and appends. The account with its memo and expiry stays within 128
/// bytes (`ffi::account_type`).
#[test]
fn the_lease_part_is_one_cache_line() {
    assert_eq!(std::mem::size_of::<Extra>(), 80);
    assert_eq!(std::mem::size_of::<Account>(), 88);
}

#[test]
fn lease_memory_is_given_back_after_a_burst() {
    let p = policy(&[(LimitField::MaxConcurrent, 1000)]);
    let mut acc = Account::default();
    let short = AdmitRequest {
        lease_ttl_ms: 1000,
        ..plain()
    };
    for _ in 0..500 {
        admit(&mut acc, &p, &short, T0);
    }
    assert!(acc.leases().capacity() >= 500);
    admit(&mut acc, &p, &short, T0 + 2000);
    assert_eq!(acc.leases().len(), 1);
    assert!(acc.leases().capacity() <= 16, "{}", acc.leases().capacity());
}

#[test]
fn peek_changes_nothing() {
    let p = policy(&[
        (LimitField::RequestsPerDay, 1),
        (LimitField::MaxConcurrent, 1),
    ]);
    let mut acc = Account::default();
    let d = admit(
        &mut acc,
        &p,
        &AdmitRequest {
            peek: true,
            ..plain()
        },
        T0,
    );
    assert!(d.allowed() && d.lease.is_none());
    assert_eq!(acc, Account::default());
}

/// Acknowledges everything unflushed, as a flush does.
fn flushed(acc: &mut Account) {
    let ack = crate::core::ledger::Acknowledgement {
        hours: acc.unflushed_hours(),
        next_seq: acc.batch_seq() + 1,
        floor: None,
    };
    acc.acknowledge(&ack);
}

#[test]
fn expiry_follows_the_longest_live_window() {
    let p = policy(&[(LimitField::RequestsPerDay, 5)]);
    let mut acc = Account::default();
    assert_eq!(acc.retention(), Retention::Nothing);
    admit(&mut acc, &p, &plain(), T0);
    // Unflushed usage keeps the key until the ledger has it.
    assert_eq!(acc.retention(), Retention::Forever);
    flushed(&mut acc);
    assert_eq!(acc.retention(), Retention::Until(Window::Month.end(T0)));
    assert!(acc.ledger().is_none(), "an idle ledger part is given back");
    let mut tokens = Account::default();
    tokens.commit(5, None, T0).unwrap();
    flushed(&mut tokens);
    assert_eq!(tokens.retention(), Retention::Until(Window::Month.end(T0)));
    // A released admission leaves nothing to keep.
    let mut released = Account::default();
    let r = AdmitRequest {
        lease: Some("x"),
        ..plain()
    };
    admit(&mut released, &p, &r, T0);
    assert!(released.release("x", T0));
    assert_eq!(released.retention(), Retention::Nothing);
    assert!(Window::Month.end(T0) > days_from_civil(2026, 11, 1) * 86_400_000);
}

#[test]
fn encoding_round_trips_and_rejects_garbage() {
    let p = policy(&[
        (LimitField::MaxConcurrent, 5),
        (LimitField::TokensPerDay, 100),
    ]);
    let mut acc = Account::default();
    admit(
        &mut acc,
        &p,
        &AdmitRequest {
            reserve: Some(7),
            lease: Some("é-lease"),
            ..plain()
        },
        T0,
    );
    admit(&mut acc, &p, &plain(), T0);
    acc.commit(3, Some("other"), T0).unwrap();
    let bytes = acc.encode();
    assert_eq!(Account::decode(&bytes), Ok(acc.clone()));
    for cut in 0..bytes.len() {
        assert!(Account::decode(&bytes[..cut]).is_err());
    }
    let mut extra = bytes.clone();
    extra.push(0);
    assert!(Account::decode(&extra).is_err());
    assert!(Account::decode(&[9, 9, 9]).is_err());
}

fn leased(id: &str, ttl_ms: Millis) -> AdmitRequest<'_> {
    AdmitRequest {
        lease: Some(id),
        lease_ttl_ms: ttl_ms,
        ..plain()
    }
}

/// A repeated commit counts once for as long as its id is kept, however many other leases
/// were committed since (not only the last 64).
#[test]
fn a_repeated_commit_counts_once_whatever_was_committed_since() {
    let p = policy(&[(LimitField::MaxConcurrent, 100)]);
    let mut acc = Account::default();
    let ids: Vec<String> = (0..66).map(|i| format!("lease-{i}")).collect();
    for id in &ids {
        admit(&mut acc, &p, &leased(id, 300_000), T0);
    }
    for id in &ids {
        let out = acc.commit(10, Some(id), T0 + 1).unwrap();
        assert!(out.lease_held && !out.duplicate);
    }
    assert_eq!(acc.usage(T0 + 1).tokens_per_day, 660);
    // The first lease again, within its time: nothing recorded.
    let again = acc.commit(10, Some(&ids[0]), T0 + 2).unwrap();
    assert!(again.duplicate);
    assert_eq!(acc.usage(T0 + 2).tokens_per_day, 660);
    // A settled id is kept until its lease would have expired (300 s here)...
    assert!(
        acc.commit(10, Some(&ids[0]), T0 + 299_999)
            .unwrap()
            .duplicate
    );
    // ...and then forgotten: the same id is a new commit.
    assert!(
        !acc.commit(10, Some(&ids[0]), T0 + 300_000)
            .unwrap()
            .duplicate
    );
    // An id that was never held is kept SETTLED_MIN_MS.
    assert!(!acc.commit(1, Some("loose"), T0).unwrap().duplicate);
    assert!(
        acc.commit(1, Some("loose"), T0 + SETTLED_MIN_MS - 1)
            .unwrap()
            .duplicate
    );
    acc.check().unwrap();
}

/// At `MAX_SETTLED` ids still in their time, a commit of another lease is refused and
/// changes nothing; repeats of kept ids are still recognised; once ids expire, commits go
/// through again.
#[test]
fn at_the_settled_bound_a_new_commit_is_refused_never_counted_twice() {
    let mut acc = Account::default();
    for i in 0..MAX_SETTLED {
        let at = T0 + (i as Millis) * 10;
        let out = acc.commit(1, Some(&format!("c{i}")), at).unwrap();
        assert!(!out.duplicate);
    }
    let now = T0 + 50_000;
    let before = acc.clone();
    let refused = acc.commit(1, Some("one-more"), now);
    // The first id is forgotten at T0 + 60 s: 10 s from now.
    assert_eq!(
        refused,
        Err(AccountError::TooManySettled { retry_after: 10 })
    );
    assert_eq!(acc, before, "a refused commit records nothing");
    assert!(refused.unwrap_err().to_string().starts_with("ERR "));
    for i in [0, MAX_SETTLED / 2, MAX_SETTLED - 1] {
        assert!(
            acc.commit(1, Some(&format!("c{i}")), now)
                .unwrap()
                .duplicate
        );
    }
    // Commits without a lease need no id and always record.
    assert!(!acc.commit(5, None, now).unwrap().duplicate);
    let later = T0 + SETTLED_MIN_MS;
    assert!(!acc.commit(1, Some("one-more"), later).unwrap().duplicate);
    assert!(acc.commit(1, Some("one-more"), later).unwrap().duplicate);
    acc.check().unwrap();
    // The memory bound the README gives: 24 bytes an id, plus the text of a named one.
    assert_eq!(std::mem::size_of::<(LeaseId, Millis)>(), 24);
}

/// A state that was written by an older build (64 settled ids at most) still decodes.
#[test]
fn a_state_with_64_settled_ids_still_decodes() {
    let mut acc = Account::default();
    for i in 0..64 {
        acc.commit(1, Some(&format!("{i:016x}")), T0).unwrap();
    }
    assert_eq!(Account::decode(&acc.encode()), Ok(acc));
}

fn sample() -> Account {
    let p = policy(&[
        (LimitField::MaxConcurrent, 5),
        (LimitField::TokensPerDay, 100),
    ]);
    let mut acc = Account::default();
    admit(&mut acc, &p, &leased("aa", 1000), T0);
    admit(&mut acc, &p, &leased("ab", 2000), T0);
    acc.commit(3, Some("done"), T0).unwrap();
    acc
}

/// Each broken invariant, encoded as `encode` would write it, is refused with its reason.
#[test]
fn decode_refuses_states_that_break_an_invariant() {
    let refused = |edit: &dyn Fn(&mut Extra)| {
        let mut acc = sample();
        edit(acc.extra.as_deref_mut().unwrap());
        Account::decode(&acc.encode()).map(|_| ()).unwrap_err().0
    };
    // Counter windows are kept as `u32`: an encoding can still name any `i64`.
    let window_refused = |counter: Counter, window: i64| {
        let mut counters = Counter::ALL.map(|c| sample().counter(c));
        counters[counter as usize].0 = window;
        Account::decode(&sample().encode_with(counters))
            .map(|_| ())
            .unwrap_err()
            .0
    };
    assert_eq!(Account::decode(&sample().encode()), Ok(sample()));
    assert_eq!(
        refused(&|a| a.leases[1].id = LeaseId::parse("aa")),
        "lease id held twice"
    );
    assert_eq!(
        refused(&|a| a.leases.swap(0, 1)),
        "leases out of expiry order"
    );
    assert_eq!(
        window_refused(Counter::TokDay, i64::MAX),
        "counter window out of range"
    );
    assert_eq!(
        window_refused(Counter::ReqMonth, -1),
        "counter window out of range"
    );
    assert_eq!(
        refused(&|a| a.leases[0].day = i32::MAX),
        "lease day out of range"
    );
    assert_eq!(
        refused(&|a| a.leases[1].expires_at = LAST_MS + 1),
        "lease expiry out of range"
    );
    assert_eq!(
        refused(&|a| a.leases[0].day += 2),
        "lease expires before the day it was counted in"
    );
    assert_eq!(
        refused(&|a| a.leases[0].id = LeaseId::Named("x".repeat(129).into())),
        "lease id length out of range"
    );
    assert_eq!(
        refused(&|a| {
            let settled = a.settled.as_deref_mut().unwrap();
            settled.push(settled[0].clone());
        }),
        "lease id settled twice"
    );
    assert_eq!(
        refused(&|a| a.settled.as_deref_mut().unwrap()[0].1 = 0),
        "settled lease time out of range"
    );
    assert_eq!(
        window_refused(Counter::TokHour, Window::Hour.last_index() + 1),
        "counter window out of range"
    );
    // The last window of each length still fits.
    let mut counters = Counter::ALL.map(|c| sample().counter(c));
    counters[Counter::TokHour as usize] = (Window::Hour.last_index(), 3);
    let last = Account::decode(&sample().encode_with(counters)).unwrap();
    assert_eq!(
        last.counter(Counter::TokHour),
        (Window::Hour.last_index(), 3)
    );
    // The kept sums are checked too (they are derived on decode, so only `check` sees them).
    let mut acc = sample();
    acc.extra.as_deref_mut().unwrap().reserved_sum += 1;
    assert!(acc.check().is_err());
    let mut acc = sample();
    acc.extra.as_deref_mut().unwrap().first_expiry = 0;
    assert!(acc.check().is_err());
    let mut acc = sample();
    acc.extra.as_deref_mut().unwrap().last_expiry += 1;
    assert!(acc.check().is_err());
    let mut acc = sample();
    acc.extra.as_deref_mut().unwrap().settled = Some(Box::default());
    assert!(acc.check().is_err());
    // An empty optional part is never kept (equal states are equal values).
    let acc = Account {
        extra: Some(Box::default()),
        ..Account::default()
    };
    assert_eq!(acc.check(), Err(BadState("an empty lease part is kept")));
}

/// Runs every operation on a decoded state: none may panic, and the state stays valid.
fn exercise(mut acc: Account, now: Millis) -> Result<(), TestCaseError> {
    let p = policy(&[
        (LimitField::MaxConcurrent, 10),
        (LimitField::TokensPerDay, 1000),
        (LimitField::RequestsPerMonth, 50),
        (LimitField::RequestsPerSecond, 3),
        (LimitField::TokensPerMinute, 2000),
    ]);
    let _ = acc.retention();
    let _ = acc.usage(now);
    // Generated ids are random 64-bit numbers: these two are not in the state yet.
    let fresh = |n: u64| {
        (0..)
            .map(|k| n + k)
            .find(|id| acc.leases().iter().all(|l| l.id != LeaseId::Short(*id)))
    };
    let (first, second) = (fresh(1 << 40), fresh(1 << 41));
    let _ = acc.admit(&p, &leased("x", 5000), now, || first.unwrap_or(0));
    let costly = AdmitRequest { cost: 3, ..plain() };
    let _ = acc.admit(&p, &costly, now, || second.unwrap_or(0));
    let _ = acc.commit(3, Some("x"), now);
    let _ = acc.release("0000010000000000", now);
    let _ = acc.retention();
    prop_assert_eq!(acc.check(), Ok(()));
    Ok(())
}

/// A valid state built by a random sequence of admissions, commits and releases.
fn built(ops: &[(u8, u16, u16)]) -> Account {
    // Half of the states have the smooth rates' state too (encoding 4).
    let p = match ops.first().is_some_and(|o| o.0 & 0x80 != 0) {
        true => policy(&[
            (LimitField::MaxConcurrent, 1000),
            (LimitField::RequestsPerSecond, 20),
            (LimitField::TokensPerMinute, 30_000),
        ]),
        false => policy(&[(LimitField::MaxConcurrent, 1000)]),
    };
    // Half of them admit costs other than 1 too (encoding 5).
    let costs = ops.first().is_some_and(|o| o.0 & 0x40 != 0);
    let cost = |n: u16| if costs { u32::from(n % 4) } else { 1 };
    let mut acc = Account::default();
    let mut now = T0;
    for (i, &(kind, a, b)) in ops.iter().enumerate() {
        now += Millis::from(a) * 10;
        let id = format!("id{}", b % 8);
        match kind % 4 {
            0 => {
                let req = AdmitRequest {
                    reserve: Some(u64::from(b)),
                    cost: cost(a),
                    ..leased(&id, 1 + Millis::from(b) * 100)
                };
                let _ = acc.admit(&p, &req, now, || i as u64);
            }
            1 => {
                let req = AdmitRequest {
                    cost: cost(b),
                    ..plain()
                };
                let _ = acc.admit(&p, &req, now, || i as u64);
            }
            2 => {
                let _ = acc.commit(u64::from(a), Some(&id), now);
            }
            _ => {
                acc.release(&id, now);
            }
        }
    }
    acc
}

/// Cases per decoder property: 2000, or `PROPTEST_CASES` (`make fuzz` runs many more).
fn decode_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(decode_cases()))]

    /// Any bytes decode to a valid account or to an error, never a panic; what decodes
    /// encodes back to itself and survives every operation.
    #[test]
    fn any_bytes_decode_to_a_valid_account_or_an_error(
        version in 0u8..4,
        mut bytes in proptest::collection::vec(any::<u8>(), 0..300),
    ) {
        match version {
            1 => bytes.insert(0, ENCODING_VERSION),
            2 => bytes.insert(0, super::codec::ENCODING_VERSION_RATES),
            3 => bytes.insert(0, super::codec::ENCODING_VERSION_COSTS),
            _ => {}
        }
        if let Ok(acc) = Account::decode(&bytes) {
            prop_assert_eq!(acc.check(), Ok(()));
            prop_assert_eq!(Account::decode(&acc.encode()), Ok(acc.clone()));
            exercise(acc, T0)?;
        }
    }

    /// The same for mutations of valid encodings (bytes set, inserted, removed, bits
    /// flipped), which keep most of the structure and so reach the invariant checks.
    #[test]
    fn mutated_valid_states_decode_to_a_valid_account_or_an_error(
        ops in proptest::collection::vec((any::<u8>(), any::<u16>(), any::<u16>()), 0..40),
        edits in proptest::collection::vec((any::<u8>(), any::<usize>(), any::<u8>()), 1..6),
    ) {
        let acc = built(&ops);
        prop_assert_eq!(acc.check(), Ok(()));
        let mut bytes = acc.encode();
        prop_assert_eq!(Account::decode(&bytes), Ok(acc));
        for (kind, at, value) in edits {
            let at = at % (bytes.len() + 1);
            match kind % 4 {
                0 if at < bytes.len() => bytes[at] = value,
                1 => bytes.insert(at, value),
                2 if at < bytes.len() => {
                    bytes.remove(at);
                }
                _ if at < bytes.len() => bytes[at] ^= 1 << (value % 8),
                _ => {}
            }
        }
        if let Ok(acc) = Account::decode(&bytes) {
            prop_assert_eq!(acc.check(), Ok(()));
            prop_assert_eq!(Account::decode(&acc.encode()), Ok(acc.clone()));
            exercise(acc, T0 + 1000)?;
        }
    }
}
