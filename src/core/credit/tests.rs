//! Unit tests of credit selection, grants, balances and the credit memo.

use super::*;

fn row(bundle: &str, rpd: i64, expires_at: Option<i64>, active: bool) -> Replenishment {
    let mut additional = Additional::default();
    additional.set(LimitField::RequestsPerDay, Some(rpd));
    Replenishment {
        bundle_id: bundle.into(),
        additional,
        expires_at,
        purchase_id: None,
        purchase_amount_usd: None,
        purchase_notes: None,
        active,
        created_at: 0,
        updated_at: 0,
        balance: None,
    }
}

const NOW: Millis = 1_000_000_000;
const KEY: &[u8] = b"q:{alice}:1:t1:p5:alice1:b";

fn per<T>(requests: T, tokens: T) -> PerKind<T> {
    PerKind { requests, tokens }
}

#[test]
fn a_denial_while_credits_load_says_retry_in_a_second() {
    use CreditSource::*;
    assert_eq!(Pending.denial_retry_after(36_400), 1);
    assert_eq!(Pending.denial_retry_after(-1), 1);
    assert_eq!(Pending.denial_retry_after(0), 0);
    for settled in [Bundle, Global, None, Unavailable] {
        assert_eq!(settled.denial_retry_after(36_400), 36_400);
        assert_eq!(settled.denial_retry_after(-1), -1);
    }
}

#[test]
fn bundle_row_wins_over_global() {
    let rows = vec![row("*", 1, None, true), row("b", 2, None, true)];
    let (r, src) = select_credit(&rows, "b", NOW).unwrap();
    assert_eq!((&*r.bundle_id, src), ("b", CreditSource::Bundle));
    let (r, src) = select_credit(&rows, "other", NOW).unwrap();
    assert_eq!((&*r.bundle_id, src), ("*", CreditSource::Global));
}

#[test]
fn expired_or_revoked_bundle_row_falls_back_to_global() {
    let expired = vec![row("*", 1, None, true), row("b", 2, Some(NOW / 1000), true)];
    assert_eq!(
        select_credit(&expired, "b", NOW)
            .unwrap()
            .0
            .bundle_id
            .as_ref(),
        "*"
    );
    let revoked = vec![row("*", 1, None, true), row("b", 2, None, false)];
    assert_eq!(
        select_credit(&revoked, "b", NOW)
            .unwrap()
            .0
            .bundle_id
            .as_ref(),
        "*"
    );
    let none = vec![row("b", 2, Some(NOW / 1000 + 1), false)];
    assert!(select_credit(&none, "b", NOW).is_none());
    let live = vec![row("b", 2, Some(NOW / 1000 + 1), true)];
    assert!(select_credit(&live, "b", NOW).is_some());
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

#[test]
fn cents_parse_and_print_exactly() {
    assert_eq!(Cents::parse("10").unwrap().to_string(), "10.00");
    assert_eq!(Cents::parse("10.5").unwrap().to_string(), "10.50");
    assert_eq!(Cents::parse("0.07").unwrap(), Cents(7));
    assert_eq!(Cents::parse("99999999.99"), Some(Cents(MAX_CENTS)));
    for bad in [
        "",
        ".5",
        "1.",
        "1.234",
        "-1",
        "1e3",
        "123456789",
        "1,5",
        " 1",
    ] {
        assert_eq!(Cents::parse(bad), None, "{bad}");
    }
    assert!(Cents(MAX_CENTS).checked_add(Cents(1)).is_none());
}

#[test]
fn replace_sets_absent_fields_to_null() {
    let mut req = GrantRequest::default();
    req.amounts[LimitField::TokensPerDay as usize] = Some(5);
    let current = row("*", 7, Some(99), true);
    let v = req.apply(Some(&current), NOW).unwrap();
    assert_eq!(v.additional.get(LimitField::RequestsPerDay), None);
    assert_eq!(v.additional.get(LimitField::TokensPerDay), Some(5));
    assert_eq!(v.expires_at, None);
}

#[test]
fn add_tops_up_a_live_row_and_restarts_a_dead_one() {
    let mut req = GrantRequest {
        add: true,
        ..Default::default()
    };
    req.amounts[LimitField::RequestsPerDay as usize] = Some(5);
    req.amount = Some(Cents(250));
    let mut live = row("*", 7, Some(NOW / 1000 + 100), true);
    live.purchase_amount_usd = Some("1.00".into());
    let v = req.apply(Some(&live), NOW).unwrap();
    assert_eq!(v.additional.get(LimitField::RequestsPerDay), Some(12));
    assert_eq!(v.expires_at, Some(NOW / 1000 + 100));
    assert_eq!(v.purchase_amount, Some(Cents(350)));

    let dead = row("*", 7, Some(NOW / 1000 - 1), true);
    let v = req.apply(Some(&dead), NOW).unwrap();
    assert_eq!(v.additional.get(LimitField::RequestsPerDay), Some(5));
    assert_eq!(v.expires_at, None);
    assert_eq!(v.purchase_amount, Some(Cents(250)));

    let v = req.apply(None, NOW).unwrap();
    assert_eq!(v.additional.get(LimitField::RequestsPerDay), Some(5));
}

#[test]
fn balances_follow_the_grant_rules_and_a_new_life_forgets_old_debits() {
    let mut req = GrantRequest {
        add: true,
        ..Default::default()
    };
    req.balances = per(Some(10), None);
    let mut live = row("*", 1, None, true);
    live.balance = Some(Box::new(RowBalance {
        granted: per(Some(5), Some(100)),
        used: per(7, 0),
        base: per(4, 0),
        ledger_seq: 0,
    }));
    let v = req.apply(Some(&live), NOW).unwrap();
    assert_eq!(v.balances, per(Some(15), Some(100)));
    assert!(!v.new_balance_life, "a top-up keeps the debits of the life");
    let dead = row("*", 1, Some(NOW / 1000 - 1), true);
    let v = req.apply(Some(&dead), NOW).unwrap();
    assert_eq!(
        (v.balances, v.new_balance_life),
        (per(Some(10), None), true)
    );
    let replace = GrantRequest {
        balances: per(None, Some(3)),
        ..Default::default()
    };
    let v = replace.apply(Some(&live), NOW).unwrap();
    assert_eq!((v.balances, v.new_balance_life), (per(None, Some(3)), true));
    // Left: granted - (max(used, floor) - base) - unflushed.
    let b = live.balance.as_deref().unwrap();
    assert_eq!(b.left(BalanceKind::Requests, 0, 0, 0), Some(2));
    assert_eq!(b.left(BalanceKind::Requests, 9, 1, 0), Some(-1));
    assert_eq!(b.left(BalanceKind::Tokens, 0, 30, 0), Some(70));
    let none = RowBalance::default();
    assert_eq!(none.left(BalanceKind::Tokens, 0, 0, 0), None);
    req.balances = per(Some(i64::MAX), None);
    assert_eq!(
        req.apply(Some(&live), NOW).unwrap_err(),
        GrantError::BalanceOverflow(BalanceKind::Requests)
    );
}

#[test]
fn add_refuses_to_overflow_an_int_column() {
    let mut req = GrantRequest {
        add: true,
        ..Default::default()
    };
    req.amounts[LimitField::RequestsPerDay as usize] = Some(i64::from(i32::MAX));
    let live = row("*", 1, None, true);
    assert_eq!(
        req.apply(Some(&live), NOW).unwrap_err(),
        GrantError::Overflow(LimitField::RequestsPerDay)
    );
}
