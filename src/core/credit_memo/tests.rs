//! Unit tests of the credit memo.

use super::*;
use crate::core::credit::{select_credit, PerKind};
use crate::core::policy::LimitField;

/// A row of `bundle` adding `rpd` requests per day.
fn row(bundle: &str, rpd: i64, expires_at: Option<i64>, active: bool) -> Replenishment {
    Replenishment::with_requests_per_day(bundle, rpd, expires_at, active)
}

const NOW: Millis = 1_000_000_000;
const KEY: &[u8] = b"q:{alice}:1:t1:p5:alice1:b";

fn per<T>(requests: T, tokens: T) -> PerKind<T> {
    PerKind { requests, tokens }
}

fn chosen(rows: &[Replenishment], bundle: &str, now: Millis) -> (Option<Additional>, CreditSource) {
    match select_credit(rows, bundle, now) {
        Some((r, src)) => (Some(r.additional), src),
        None => (None, CreditSource::None),
    }
}

/// The memo of what `chosen` picks from `rows` for bundle `bundle` at `at` (epoch 1, no
/// balance), from a cache entry fresh until `fresh_until`.
fn memo_of(rows: &[Replenishment], bundle: &str, at: Millis, fresh_until: Millis) -> CreditMemo {
    CreditMemo::new(
        KEY,
        chosen(rows, bundle, at),
        None,
        rows,
        1,
        fresh_until,
        at,
    )
    .unwrap()
}

#[test]
fn memo_gives_back_what_was_chosen_while_the_epoch_and_time_hold() {
    let mut rows = vec![row("*", 7, None, true), row("b", 9, None, true)];
    rows[1].additional.set(LimitField::TokensPerMonth, Some(-3));
    let picked = chosen(&rows, "b", NOW);
    let memo = CreditMemo::new(KEY, picked, None, &rows, 5, NOW + 60_000, NOW).unwrap();
    let (add, src, _) = memo.get(KEY, 5, NOW + 10).unwrap();
    assert_eq!(src, CreditSource::Bundle);
    let add = add.unwrap();
    assert_eq!(add.get(LimitField::RequestsPerDay), Some(9));
    assert_eq!(add.get(LimitField::TokensPerDay), None);
    // A negative amount adds nothing, as it did from the row itself.
    let base = crate::core::policy::Limits::all(Some(100));
    assert_eq!(
        crate::core::policy::EffectivePolicy::merge(base, Some(&add)),
        crate::core::policy::EffectivePolicy::merge(base, picked.0.as_ref())
    );
    // Another cache epoch, or past the horizon: ask the cache again.
    assert!(memo.get(KEY, 6, NOW + 10).is_none());
    assert!(memo.get(KEY, 5, NOW + MEMO_MAX_MS).is_none());
    assert!(memo.get(KEY, 5, NOW + MEMO_MAX_MS - 1).is_some());
    // The clock set back by a minute: ask the cache again.
    assert!(memo.get(KEY, 5, NOW - 60_000).is_none());
    // No credit is remembered too.
    let none = CreditMemo::new(
        KEY,
        (None, CreditSource::None),
        None,
        &[],
        5,
        NOW + 60_000,
        NOW,
    )
    .unwrap();
    assert_eq!(
        none.get(KEY, 5, NOW),
        Some((None, CreditSource::None, None))
    );
}

/// Every amount that adds something comes back exactly (up to `i64::MAX`); a credit whose
/// amounts do not fit the memo's bytes is not remembered at all.
#[test]
fn memo_keeps_amounts_exactly_or_not_at_all() {
    let mut add = Additional::default();
    add.set(LimitField::RequestsPerDay, Some(1));
    add.set(LimitField::TokensPerDay, Some(1_000_000_000));
    add.set(LimitField::MaxConcurrent, Some(34_000_000_000));
    add.set(LimitField::TokensPerHour, Some(0));
    let chosen = (Some(add), CreditSource::Global);
    let memo = CreditMemo::new(KEY, chosen, None, &[], 1, NOW + 60_000, NOW).unwrap();
    let (back, src, _) = memo.get(KEY, 1, NOW).unwrap();
    assert_eq!(src, CreditSource::Global);
    let back = back.unwrap();
    for field in LimitField::ALL {
        let expected = add.get(field).filter(|v| *v > 0);
        assert_eq!(back.get(field), expected, "{field:?}");
    }
    // Two of the largest amounts: 18 varint bytes.
    let mut big = Additional::default();
    big.set(LimitField::TokensPerMonth, Some(i64::MAX));
    big.set(LimitField::TotalRequests, Some(i64::MAX));
    let memo = CreditMemo::new(
        KEY,
        (Some(big), CreditSource::Bundle),
        None,
        &[],
        1,
        NOW + 1000,
        NOW,
    );
    let back = memo.unwrap().get(KEY, 1, NOW).unwrap().0.unwrap();
    assert_eq!(back.get(LimitField::TokensPerMonth), Some(i64::MAX));
    assert_eq!(back.get(LimitField::TotalRequests), Some(i64::MAX));
    // Three are too many.
    big.set(LimitField::RequestsPerMonth, Some(i64::MAX));
    let chosen = (Some(big), CreditSource::Bundle);
    assert_eq!(
        CreditMemo::new(KEY, chosen, None, &[], 1, NOW + 1000, NOW),
        None
    );
    assert_eq!(std::mem::size_of::<Option<CreditMemo>>(), 32);
}

/// A balance comes back exactly (negative and largest values too), with the amounts; one
/// that does not fit beside them leaves the credit unremembered.
#[test]
fn memo_keeps_the_balance_of_the_row_exactly_or_not_at_all() {
    let mut add = Additional::default();
    add.set(LimitField::RequestsPerDay, Some(5));
    let chosen = (Some(add), CreditSource::Global);
    let cases = [
        RowBalance {
            granted: per(Some(1_000_000_000_000), None),
            used: per(17, 0),
            base: per(3, 0),
            ledger_seq: 0,
        },
        RowBalance {
            granted: per(None, Some(-4)),
            used: per(0, 9),
            base: per(0, 0),
            ledger_seq: 0,
        },
        RowBalance {
            granted: per(Some(1), Some(2)),
            used: per(-1, 300),
            base: per(0, 299),
            ledger_seq: 0,
        },
    ];
    for b in cases {
        let memo = CreditMemo::new(KEY, chosen, Some(&b), &[], 1, NOW + 60_000, NOW).unwrap();
        let (back, src, balance) = memo.get(KEY, 1, NOW).unwrap();
        assert_eq!((back, src), (Some(add), CreditSource::Global));
        assert_eq!(balance, Some(b));
    }
    let huge = RowBalance {
        granted: per(Some(i64::MAX), Some(i64::MIN)),
        used: per(i64::MAX, 0),
        base: per(0, 0),
        ledger_seq: 0,
    };
    assert_eq!(
        CreditMemo::new(KEY, chosen, Some(&huge), &[], 1, NOW + 60_000, NOW),
        None
    );
    let none = CreditMemo::new(KEY, chosen, None, &[], 1, NOW + 60_000, NOW).unwrap();
    assert_eq!(none.get(KEY, 1, NOW).unwrap().2, None);
}

/// A memo read through another account key (the value was renamed to another user's or
/// bundle's key) is not used: the credit belongs to the account it was chosen for.
#[test]
fn memo_applies_only_to_the_account_it_was_chosen_for() {
    let rows = vec![row("b", 9, None, true)];
    let memo = memo_of(&rows, "b", NOW, NOW + 60_000);
    assert!(memo.get(KEY, 1, NOW).is_some());
    assert!(memo.get(b"q:{bob}:1:t1:p3:bob1:b", 1, NOW).is_none());
    assert!(memo.get(b"q:{alice}:1:t1:p5:alice1:c", 1, NOW).is_none());
}

#[test]
fn memo_ends_when_the_entry_goes_stale_or_a_row_expires() {
    let rows = vec![row("*", 7, None, true)];
    let memo = memo_of(&rows, "b", NOW, NOW + 300);
    assert!(
        memo.get(KEY, 1, NOW).is_none(),
        "held to the second before: nothing"
    );
    let t = NOW + 500;
    let memo = memo_of(&rows, "b", t, t + 800);
    assert!(memo.get(KEY, 1, NOW + 999).is_some());
    assert!(memo.get(KEY, 1, NOW + 1000).is_none());
    // Read 400 ms before the bundle row expires: from then on the '*' row applies.
    let rows = vec![
        row("*", 7, None, true),
        row("b", 9, Some(NOW / 1000 + 1), true),
    ];
    let t0 = NOW + 600;
    let memo = memo_of(&rows, "b", t0, t0 + 60_000);
    assert_eq!(memo.get(KEY, 1, NOW + 999).unwrap().1, CreditSource::Bundle);
    assert!(memo.get(KEY, 1, NOW + 1000).is_none());
    assert_eq!(chosen(&rows, "b", NOW + 1000).1, CreditSource::Global);
    // Rows that expired already do not shorten it.
    let rows = vec![
        row("*", 7, None, true),
        row("b", 9, Some(NOW / 1000 - 5), true),
    ];
    let memo = memo_of(&rows, "b", NOW, NOW + 60_000);
    assert!(memo.get(KEY, 1, NOW + MEMO_MAX_MS - 1).is_some());
}
