//! Unit tests of an admission's cost (`COST n`): n counted in every request window, rate and
//! the ledger, refunded by a release, denied with a wait for n (or none when n never fits),
//! paid in full by a requests balance; a free probe (cost 0); the lease's cost in the encoding.

use super::codec::{ENCODING_VERSION_COSTS, ENCODING_VERSION_LEDGER};
use super::*;
use crate::core::policy::EffectivePolicy;
use crate::core::window::seconds_until;

const T0: Millis = 1_795_000_000_000;

fn policy(fields: &[(LimitField, u64)]) -> EffectivePolicy {
    EffectivePolicy::of(fields)
}

/// A request of `cost`, with lease `lease` if given.
fn costing(cost: u32, lease: Option<&str>) -> AdmitRequest<'_> {
    AdmitRequest {
        lease,
        lease_ttl_ms: 60_000,
        reserve: None,
        peek: false,
        cost,
        balance: None,
    }
}

fn admit(
    acc: &mut Account,
    p: &EffectivePolicy,
    req: &AdmitRequest<'_>,
    now: Millis,
) -> AdmitDecision {
    acc.admit(p, req, now, || 42).unwrap()
}

/// The requests the account has not flushed to the ledger yet.
fn unflushed_requests(acc: &Account) -> i64 {
    acc.unflushed_hours().iter().map(|h| h.requests).sum()
}

#[test]
fn a_cost_counts_n_in_the_day_month_total_and_ledger() {
    let p = policy(&[
        (LimitField::RequestsPerDay, 10),
        (LimitField::RequestsPerMonth, 100),
        (LimitField::TotalRequests, 1000),
    ]);
    let mut acc = Account::default();
    let d = admit(&mut acc, &p, &costing(4, None), T0);
    assert!(d.allowed() && d.counted());
    assert_eq!(d.remaining_requests, 6);
    let u = acc.usage(T0);
    assert_eq!(
        (u.requests_per_day, u.requests_per_month, u.total_requests),
        (4, 4, 4)
    );
    assert_eq!(unflushed_requests(&acc), 4);
    assert!(admit(&mut acc, &p, &costing(4, None), T0).allowed());
    // 8 of 10 used: 4 more do not fit, 2 do.
    let d = admit(&mut acc, &p, &costing(4, None), T0);
    assert!(!d.allowed());
    assert_eq!(d.reason(), "requests_per_day");
    assert_eq!(d.remaining_requests, 2);
    assert_eq!(d.retry_after, seconds_until(T0, Window::Day.end(T0)));
    assert_eq!(acc.usage(T0).requests_per_day, 8, "a denial counts nothing");
    let d = admit(&mut acc, &p, &costing(2, None), T0);
    assert!(d.allowed());
    assert_eq!(d.remaining_requests, 0);
    assert_eq!(unflushed_requests(&acc), 10);
    // Tomorrow the day is empty again: 4 fit.
    assert!(admit(&mut acc, &p, &costing(4, None), Window::Day.end(T0)).allowed());
}

#[test]
fn a_cost_above_a_request_limit_never_fits_and_waiting_never_helps() {
    for field in [LimitField::RequestsPerDay, LimitField::TotalRequests] {
        let p = policy(&[(field, 3)]);
        let mut acc = Account::default();
        let d = admit(&mut acc, &p, &costing(4, None), T0);
        assert_eq!(d.reason(), field.name());
        assert_eq!((d.retry_after, d.retry_after_ms), (-1, -1), "{field:?}");
        assert_eq!(acc, Account::default());
        // The limit itself fits.
        assert!(admit(&mut acc, &p, &costing(3, None), T0).allowed());
    }
}

#[test]
fn a_cost_needs_that_many_requests_of_a_rate_and_waits_for_them() {
    let p = policy(&[(LimitField::RequestsPerSecond, 10)]);
    let mut acc = Account::default();
    let d = admit(&mut acc, &p, &costing(6, None), T0);
    assert!(d.allowed());
    assert_eq!(d.remaining_requests, 4);
    assert_eq!(acc.usage(T0).rates, [6, 0, 0]);
    // 4 left: 6 more wait until 2 more are back (one every 100 ms).
    let d = admit(&mut acc, &p, &costing(6, None), T0);
    assert_eq!(d.reason(), "requests_per_second");
    assert_eq!((d.retry_after, d.retry_after_ms), (1, 200));
    assert!(!admit(&mut acc, &p, &costing(6, None), T0 + 199).allowed());
    assert!(admit(&mut acc, &p, &costing(6, None), T0 + 200).allowed());
    // More than the burst never fits, however long one waits.
    let d = admit(&mut Account::default(), &p, &costing(11, None), T0);
    assert_eq!(d.reason(), "requests_per_second");
    assert_eq!((d.retry_after, d.retry_after_ms), (-1, -1));
    // A rate per minute: the wait is for the cost, not for one request.
    let p = policy(&[(LimitField::RequestsPerMinute, 60)]);
    let mut acc = Account::default();
    assert!(admit(&mut acc, &p, &costing(60, None), T0).allowed());
    let d = admit(&mut acc, &p, &costing(5, None), T0);
    assert_eq!((d.retry_after, d.retry_after_ms), (5, 5_000));
}

#[test]
fn a_release_gives_back_the_cost_in_the_windows_rates_and_ledger() {
    let p = policy(&[
        (LimitField::RequestsPerDay, 10),
        (LimitField::RequestsPerSecond, 10),
        (LimitField::TokensPerMinute, 1_000),
    ]);
    let mut acc = Account::default();
    admit(&mut acc, &p, &costing(1, None), T0);
    let req = AdmitRequest {
        reserve: Some(100),
        ..costing(7, Some("L"))
    };
    assert!(admit(&mut acc, &p, &req, T0).allowed());
    assert_eq!(acc.leases().front().map(|l| l.cost), Some(7));
    let u = acc.usage(T0);
    assert_eq!((u.requests_per_day, u.rates), (8, [8, 0, 100]));
    assert!(!admit(&mut acc, &p, &costing(3, None), T0).allowed());
    assert!(acc.release("L", T0));
    let u = acc.usage(T0);
    assert_eq!((u.requests_per_day, u.total_requests), (1, 1));
    assert_eq!(u.rates, [1, 0, 0]);
    assert_eq!(unflushed_requests(&acc), 1);
    // What the release gave back is there to admit again.
    assert!(admit(&mut acc, &p, &costing(9, None), T0).allowed());
}

#[test]
fn a_free_probe_counts_nothing_and_takes_no_slot_unless_it_asks_for_a_lease() {
    let p = policy(&[
        (LimitField::RequestsPerDay, 1),
        (LimitField::TotalRequests, 1),
        (LimitField::RequestsPerSecond, 1),
        (LimitField::MaxConcurrent, 1),
    ]);
    let mut acc = Account::default();
    assert!(admit(&mut acc, &p, &costing(1, None), T0).allowed());
    // Every request limit and the one slot are taken: a real request is denied...
    let d = admit(&mut acc, &p, &costing(1, None), T0);
    assert_eq!(
        d.reason(),
        "requests_per_day|total_requests|requests_per_second"
    );
    // ...a free probe is admitted, and changes nothing.
    let before = acc.clone();
    let d = admit(&mut acc, &p, &costing(0, None), T0);
    assert!(d.allowed() && !d.changed() && !d.counted() && d.lease.is_none());
    assert_eq!(d.remaining_requests, 0);
    assert_eq!(acc, before);
    // Asking for a lease takes a slot like any admission: none is free now.
    let d = admit(&mut acc, &p, &costing(0, Some("probe")), T0);
    assert_eq!(d.reason(), "concurrency");
    // Once the slot frees, the probe's lease counts no request, and its release refunds none.
    let later = T0 + 60_000;
    let d = admit(&mut acc, &p, &costing(0, Some("probe")), later);
    assert!(d.allowed() && d.counted() && d.lease.is_some());
    assert_eq!(acc.usage(later).total_requests, 1);
    assert!(acc.release("probe", later));
    assert_eq!(acc.usage(later).total_requests, 1);
    // Token limits still apply to a free probe.
    let tokens = policy(&[(LimitField::TokensPerDay, 0)]);
    let d = admit(&mut Account::default(), &tokens, &costing(0, None), T0);
    assert_eq!(d.reason(), "tokens_per_day");
    // A limit of 0 and a rate of 0 deny every request but a free one.
    let zero = policy(&[
        (LimitField::RequestsPerDay, 0),
        (LimitField::RequestsPerMinute, 0),
    ]);
    assert!(admit(&mut Account::default(), &zero, &costing(0, None), T0).allowed());
}

#[test]
fn a_requests_balance_pays_the_whole_cost_or_is_spent() {
    let p = policy(&[(LimitField::RequestsPerDay, 2)]);
    let with_balance = |cost, left| AdmitRequest {
        balance: Some(BalanceOffer {
            left: crate::core::credit::PerKind {
                requests: Some(left),
                tokens: None,
            },
        }),
        ..costing(cost, None)
    };
    let mut acc = Account::default();
    // The window takes 2, not 3: the balance pays all 3.
    let d = admit(&mut acc, &p, &with_balance(3, 3), T0);
    assert!(d.allowed() && d.paid_by_balance() && d.debits_request());
    assert_eq!(d.cost, 3);
    assert_eq!(acc.usage(T0).requests_per_day, 3);
    // 2 left on the balance: a cost of 3 finds it spent, a cost of 2 is paid.
    let d = admit(&mut acc, &p, &with_balance(3, 2), T0);
    assert_eq!(d.reason(), "requests_per_day|balance");
    assert!(admit(&mut acc, &p, &with_balance(2, 2), T0).paid_by_balance());
    // A free probe needs no balance.
    let d = admit(&mut acc, &p, &with_balance(0, 0), T0);
    assert!(d.allowed() && !d.paid_by_balance());
}

#[test]
fn a_leases_cost_is_encoded_and_older_states_cost_one() {
    let p = policy(&[(LimitField::MaxConcurrent, 10)]);
    let mut acc = Account::default();
    admit(&mut acc, &p, &costing(1, Some("one")), T0);
    // Every lease costs 1: the older encoding, byte for byte.
    assert_eq!(acc.encode()[0], ENCODING_VERSION_LEDGER);
    let old = acc.encode();
    admit(&mut acc, &p, &costing(3, Some("three")), T0);
    admit(&mut acc, &p, &costing(0, Some("free")), T0);
    let bytes = acc.encode();
    assert_eq!(bytes[0], ENCODING_VERSION_COSTS);
    let mut decoded = Account::decode(&bytes).unwrap();
    assert_eq!(decoded, acc);
    let costs: Vec<u32> = decoded.leases().iter().map(|l| l.cost).collect();
    assert_eq!(costs, [1, 3, 0]);
    // A decoded lease refunds its own cost.
    assert!(decoded.release("three", T0));
    assert_eq!(decoded.usage(T0).total_requests, 1);
    // An older state's lease costs 1.
    let mut older = Account::decode(&old).unwrap();
    assert_eq!(older.leases().front().map(|l| l.cost), Some(1));
    assert!(older.release("one", T0));
    assert_eq!(older.usage(T0).total_requests, 0);
    for cut in 0..bytes.len() {
        assert!(Account::decode(&bytes[..cut]).is_err(), "cut at {cut}");
    }
    // A cost beyond the bound is refused, in memory and in an encoding.
    let mut big = acc.clone();
    if let Some(extra) = big.extra.as_deref_mut() {
        extra.leases[2].cost = MAX_COST + 1;
    }
    assert_eq!(big.check(), Err(BadState("lease cost out of range")));
    assert_eq!(
        Account::decode(&big.encode()),
        Err(BadState("lease cost out of range"))
    );
    if let Some(extra) = big.extra.as_deref_mut() {
        extra.leases[2].cost = MAX_COST;
    }
    assert_eq!(Account::decode(&big.encode()), Ok(big));
}

/// `acc`'s encoding with its first lease's month moved by `by` (the month is not kept in
/// memory: it follows from the day, and only an encoding can disagree).
fn with_first_lease_month(acc: &Account, by: i64) -> Vec<u8> {
    use crate::core::varint::{take_u64, unzigzag, write_u64, zigzag};
    let bytes = acc.encode();
    let lease = acc.leases().front().expect("a lease");
    let mut buf = [0u8; 16];
    let id = lease.id.as_text(&mut buf).as_bytes();
    let at = bytes
        .windows(id.len())
        .position(|w| w == id)
        .expect("the lease id in the encoding");
    // After the id: its expiry, reservation and day, then the month.
    let mut rest = &bytes[at + id.len()..];
    for _ in 0..3 {
        take_u64(&mut rest).expect("a varint");
    }
    let month_at = bytes.len() - rest.len();
    let month = unzigzag(take_u64(&mut rest).expect("the month").0);
    assert_eq!(month, lease.month());
    let mut out = bytes[..month_at].to_vec();
    write_u64(zigzag(month + by), |b| out.push(b));
    out.extend_from_slice(rest);
    out
}

#[test]
fn a_leases_month_follows_from_its_day_and_an_encoding_that_disagrees_is_refused() {
    let p = policy(&[(LimitField::MaxConcurrent, 2)]);
    let mut acc = Account::default();
    admit(&mut acc, &p, &costing(2, Some("month-lease")), T0);
    let lease = acc.leases().front().cloned().unwrap();
    assert_eq!(lease.month(), Window::Month.index(T0));
    assert_eq!(std::mem::size_of::<Lease>(), 40);
    assert_eq!(
        Account::decode(&with_first_lease_month(&acc, 1)),
        Err(BadState("lease month is not the month of its day"))
    );
    assert_eq!(Account::decode(&with_first_lease_month(&acc, 0)), Ok(acc));
}
