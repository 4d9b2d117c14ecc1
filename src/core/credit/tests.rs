//! Unit tests of credit selection, grants and balances.

use super::*;

/// A row of `bundle` adding `rpd` requests per day.
fn row(bundle: &str, rpd: i64, expires_at: Option<i64>, active: bool) -> Replenishment {
    Replenishment::with_requests_per_day(bundle, rpd, expires_at, active)
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
