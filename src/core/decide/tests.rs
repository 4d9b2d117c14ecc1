//! Unit tests of the balance rules: who pays, the offer, the terms, the charge of an
//! admission, and the settlement of a commit (overdraft) or a release (refund), with leases
//! that expire and a `'*'` balance shared by several bundles.

use super::*;
use crate::core::account::{Did, Verdict};
use crate::core::ledger::{Acknowledgement, Unacknowledged};

const T0: Millis = 1_795_000_000_000;
const TTL: Millis = 60_000;
const KEY_A: &[u8] = b"q:{t\x00p\x00u}\x00a";
const KEY_B: &[u8] = b"q:{t\x00p\x00u}\x00b";

fn per<T>(requests: T, tokens: T) -> PerKind<T> {
    PerKind { requests, tokens }
}

fn policy(fields: &[(LimitField, u64)]) -> EffectivePolicy {
    EffectivePolicy::of(fields)
}

fn balance(requests: Option<i64>, tokens: Option<i64>) -> RowBalance {
    RowBalance {
        granted: per(requests, tokens),
        used: per(0, 0),
        base: per(0, 0),
        ledger_seq: 0,
    }
}

fn request(lease: Option<&str>) -> AdmitRequest<'_> {
    AdmitRequest {
        lease,
        lease_ttl_ms: TTL,
        reserve: None,
        peek: false,
        cost: 1,
        balance: None,
    }
}

fn ids() -> impl FnMut() -> u64 {
    let mut next = 0;
    move || {
        next += 1;
        next
    }
}

/// Admits on `account` with a balance `b` of the row that applies to `bundle`.
#[allow(clippy::too_many_arguments)]
fn admit_with(
    account: &mut Account,
    key: &[u8],
    bundle: &str,
    p: &EffectivePolicy,
    req: AdmitRequest<'_>,
    b: Option<RowTerms>,
    star: Option<&Account>,
    now: Millis,
) -> Admitted {
    let inputs = AdmitInputs {
        key,
        bundle,
        policy: p,
        request: req,
        balance: b,
        sent: None,
        verbose: false,
        listened: true,
    };
    let (admitted, _) = admit(account, &inputs, star, now, ids());
    admitted.unwrap()
}

fn own(b: RowBalance) -> Option<RowTerms> {
    Some(RowTerms {
        balance: b,
        global: false,
    })
}

fn global(b: RowBalance) -> Option<RowTerms> {
    Some(RowTerms {
        balance: b,
        global: true,
    })
}

#[test]
fn the_star_account_pays_for_bundles_without_a_row_of_their_own() {
    assert_eq!(payer("a", false), Payer::Itself);
    assert_eq!(payer("a", true), Payer::Star);
    assert_eq!(payer(ANY_BUNDLE, true), Payer::Itself);
    assert_eq!(payer(ANY_BUNDLE, false), Payer::Itself);
    assert_eq!(payer_by_terms(None, "a"), None);
}

#[test]
fn the_windows_pay_while_they_allow_and_nothing_is_charged() {
    let p = policy(&[(LimitField::RequestsPerDay, 2)]);
    let mut acc = Account::default();
    let b = own(balance(Some(5), None));
    let a = admit_with(&mut acc, KEY_A, "a", &p, request(None), b, None, T0);
    assert!(a.decision.allowed() && !a.decision.paid_by_balance());
    assert_eq!(a.star_change, None);
    assert_eq!(
        offer(&balance(Some(5), None), Some(&acc), None, T0).left,
        per(Some(5), None)
    );
}

#[test]
fn the_balance_pays_once_the_window_is_spent_and_is_debited_one_request() {
    let p = policy(&[(LimitField::RequestsPerDay, 1)]);
    let mut acc = Account::default();
    let b = balance(Some(2), None);
    let first = admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    assert!(!first.decision.paid_by_balance());
    let second = admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    assert!(second.decision.allowed() && second.decision.paid_by_balance());
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(Some(1), None));
    admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    let spent = admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    assert!(!spent.decision.allowed());
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(Some(0), None));
}

#[test]
fn a_shared_star_balance_is_charged_on_the_star_account_not_the_bundle() {
    let p = policy(&[(LimitField::RequestsPerDay, 0)]);
    let b = balance(Some(2), None);
    let mut star = Account::default();
    let mut bundle_a = Account::default();
    let a = admit_with(
        &mut bundle_a,
        KEY_A,
        "a",
        &p,
        request(None),
        global(b),
        Some(&star),
        T0,
    );
    assert!(a.decision.paid_by_balance());
    let change = a.star_change.unwrap();
    assert_eq!(change.debits, per(1, 0));
    assert!(bundle_a
        .ledger()
        .and_then(|l| l.terms)
        .is_some_and(|t| t.global));
    assert_eq!(
        offer(&b, Some(&bundle_a), None, T0).left,
        per(Some(2), None)
    );
    charge(&mut star, change, T0);
    // Another bundle sees what the first one spent.
    let mut bundle_b = Account::default();
    let other = admit_with(
        &mut bundle_b,
        KEY_B,
        "b",
        &p,
        request(None),
        global(b),
        Some(&star),
        T0,
    );
    charge(&mut star, other.star_change.unwrap(), T0);
    assert_eq!(offer(&b, Some(&star), None, T0).left, per(Some(0), None));
    let spent = admit_with(
        &mut bundle_b,
        KEY_B,
        "b",
        &p,
        request(None),
        global(b),
        Some(&star),
        T0,
    );
    assert!(!spent.decision.allowed());
    assert_eq!(spent.decision.reason(), "requests_per_day|balance");
}

#[test]
fn terms_name_the_token_limits_only_for_a_token_balance() {
    let p = policy(&[(LimitField::TokensPerDay, 100)]);
    let tokens = terms_for(&balance(None, Some(10)), true, &p);
    assert!(tokens.global);
    assert_eq!(tokens.token_limits, [u64::MAX, 100, u64::MAX]);
    let requests = terms_for(&balance(Some(10), None), false, &p);
    assert_eq!(requests.token_limits, [u64::MAX; 3]);
}

#[test]
fn an_admission_denied_or_not_counted_charges_nothing() {
    let mut d = AdmitDecision {
        verdict: Verdict::Windows,
        violations: 0,
        retry_after: 0,
        retry_after_ms: 0,
        lease: None,
        lease_expires_at: 0,
        reserved: 0,
        used_replenishment: false,
        remaining_requests: 0,
        remaining_tokens: 0,
        did: Did::default(),
        cost: 1,
        held_tokens: 0,
    };
    d.did.set(Did::CHANGE, true);
    d.did.set(Did::COUNT, true);
    assert_eq!(admission_charge(&d, KEY_A, None, T0, TTL), None);
    d.did.set(Did::DEBIT, true);
    d.did.set(Did::COUNT, false);
    assert_eq!(admission_charge(&d, KEY_A, None, T0, TTL), None);
    d.did.set(Did::COUNT, true);
    let change = admission_charge(&d, KEY_A, None, T0, TTL).unwrap();
    assert_eq!((change.debits, change.hold), (per(1, 0), None));
}

#[test]
fn a_paid_lease_is_held_with_its_tag_and_expiry() {
    let p = policy(&[(LimitField::RequestsPerDay, 0)]);
    let mut acc = Account::default();
    let b = own(balance(Some(3), None));
    let a = admit_with(&mut acc, KEY_A, "a", &p, request(Some("L1")), b, None, T0);
    assert!(a.decision.paid_by_balance());
    let hold = acc
        .ledger()
        .and_then(|l| l.hold(hold_tag(KEY_A, "L1"), T0))
        .copied();
    let hold = hold.unwrap();
    assert_eq!(hold.expires_at, T0 + TTL);
    assert_eq!(hold.paid_requests, 1);
}

#[test]
fn a_commit_beyond_the_token_window_overdraws_the_balance() {
    let p = policy(&[(LimitField::TokensPerDay, 10)]);
    let mut acc = Account::default();
    let b = balance(None, Some(5));
    admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    let payer = payer_by_terms(Some(&acc), "a");
    assert_eq!(payer, Some(Payer::Itself));
    let (outcome, propagate) = commit(&mut acc, KEY_A, 25, None, payer, T0);
    assert_eq!(outcome.unwrap().balance_debit, 15);
    assert!(matches!(propagate, Propagate::Effect(_)));
    // 15 debited from a balance of 5: the balance is 10 below zero.
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(None, Some(-10)));
    // Tokens already beyond the limit are debited in full.
    let (outcome, _) = commit(&mut acc, KEY_A, 3, None, payer, T0);
    assert_eq!(outcome.unwrap().balance_debit, 3);
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(None, Some(-13)));
}

#[test]
fn a_commit_within_the_window_debits_nothing_and_settles_the_hold() {
    let p = policy(&[
        (LimitField::TokensPerDay, 10),
        (LimitField::RequestsPerDay, 0),
    ]);
    let mut acc = Account::default();
    let b = balance(Some(1), Some(5));
    admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        request(Some("L")),
        own(b),
        None,
        T0,
    );
    let tag = hold_tag(KEY_A, "L");
    assert!(acc.ledger().and_then(|l| l.hold(tag, T0)).is_some());
    let change = settlement(
        Some(&acc),
        KEY_A,
        Some("L"),
        Settle::Commit { debit: 0 },
        T0,
    );
    assert_eq!(
        change.map(|c| (c.debits, c.settle)),
        Some((per(0, 0), Some(tag)))
    );
    let payer = payer_by_terms(Some(&acc), "a");
    commit(&mut acc, KEY_A, 4, Some("L"), payer, T0).0.unwrap();
    assert!(acc.ledger().and_then(|l| l.hold(tag, T0)).is_none());
}

#[test]
fn a_duplicate_commit_settles_nothing() {
    let p = policy(&[(LimitField::TokensPerDay, 1)]);
    let mut acc = Account::default();
    let b = balance(None, Some(100));
    admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        request(Some("L")),
        own(b),
        None,
        T0,
    );
    let payer = payer_by_terms(Some(&acc), "a");
    commit(&mut acc, KEY_A, 5, Some("L"), payer, T0).0.unwrap();
    let left = offer(&b, Some(&acc), None, T0).left;
    let (again, propagate) = commit(&mut acc, KEY_A, 5, Some("L"), payer, T0);
    assert!(again.unwrap().duplicate);
    assert!(matches!(propagate, Propagate::Nothing));
    assert_eq!(offer(&b, Some(&acc), None, T0).left, left);
}

#[test]
fn a_release_refunds_the_request_the_balance_paid() {
    let p = policy(&[(LimitField::RequestsPerDay, 0)]);
    let mut acc = Account::default();
    let b = balance(Some(1), None);
    admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        request(Some("L")),
        own(b),
        None,
        T0,
    );
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(Some(0), None));
    let payer = payer_by_terms(Some(&acc), "a");
    let (released, _) = release(&mut acc, KEY_A, "L", payer, T0 + 1);
    assert!(released);
    assert_eq!(offer(&b, Some(&acc), None, T0 + 1).left, per(Some(1), None));
    // Released twice: the lease is gone, nothing more is refunded.
    let (again, _) = release(&mut acc, KEY_A, "L", payer, T0 + 2);
    assert!(!again);
    assert_eq!(offer(&b, Some(&acc), None, T0 + 2).left, per(Some(1), None));
}

#[test]
fn a_release_of_a_lease_the_windows_paid_refunds_nothing_to_the_balance() {
    let p = policy(&[(LimitField::RequestsPerDay, 5)]);
    let b = balance(Some(1), None);
    let mut acc = Account::default();
    admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        request(Some("L")),
        own(b),
        None,
        T0,
    );
    assert_eq!(
        settlement(Some(&acc), KEY_A, Some("L"), Settle::Release, T0),
        None
    );
    let payer = payer_by_terms(Some(&acc), "a");
    assert!(release(&mut acc, KEY_A, "L", payer, T0).0);
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(Some(1), None));
}

#[test]
fn a_refund_after_a_flush_snapshot_lowers_the_debits_below_the_floor() {
    let p = policy(&[(LimitField::RequestsPerDay, 0)]);
    let mut acc = Account::default();
    let b = balance(Some(3), None);
    admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        request(Some("L")),
        own(b),
        None,
        T0,
    );
    // The flush took the debit to PostgreSQL: the row now says 1 used, and the floor too.
    let ack = Acknowledgement {
        hours: acc.unflushed_hours(),
        next_seq: acc.batch_seq() + 1,
        floor: Some(per(1, 0)),
    };
    acc.acknowledge(&ack);
    let flushed = RowBalance {
        used: per(1, 0),
        ..b
    };
    assert_eq!(
        offer(&flushed, Some(&acc), None, T0).left,
        per(Some(2), None)
    );
    let payer = payer_by_terms(Some(&acc), "a");
    assert!(release(&mut acc, KEY_A, "L", payer, T0).0);
    // The refund is unflushed (-1) until the next flush: the request is available again.
    assert_eq!(
        offer(&flushed, Some(&acc), None, T0).left,
        per(Some(3), None)
    );
}

#[test]
fn an_expired_lease_no_longer_holds_tokens_and_settles_nothing() {
    let p = policy(&[(LimitField::TokensPerDay, 0)]);
    let mut acc = Account::default();
    let b = balance(None, Some(50));
    let req = AdmitRequest {
        reserve: Some(20),
        ..request(Some("L"))
    };
    let a = admit_with(&mut acc, KEY_A, "a", &p, req, own(b), None, T0);
    assert!(a.decision.allowed());
    assert_eq!(a.decision.held_tokens, 20);
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(None, Some(30)));
    let later = T0 + TTL + 1;
    assert_eq!(offer(&b, Some(&acc), None, later).left, per(None, Some(50)));
    let how = Settle::Commit { debit: 0 };
    assert_eq!(settlement(Some(&acc), KEY_A, Some("L"), how, later), None);
    let payer = payer_by_terms(Some(&acc), "a");
    assert!(!release(&mut acc, KEY_A, "L", payer, later).0);
}

#[test]
fn a_star_release_refunds_the_star_account() {
    let p = policy(&[(LimitField::RequestsPerDay, 0)]);
    let b = balance(Some(1), None);
    let mut star = Account::default();
    let mut acc = Account::default();
    let a = admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        request(Some("L")),
        global(b),
        Some(&star),
        T0,
    );
    charge(&mut star, a.star_change.unwrap(), T0);
    assert_eq!(offer(&b, Some(&star), None, T0).left, per(Some(0), None));
    let payer = payer_by_terms(Some(&acc), "a");
    assert_eq!(payer, Some(Payer::Star));
    // The bundle's own release refunds nothing to itself...
    assert!(release(&mut acc, KEY_A, "L", payer, T0).0);
    // ...the shell settles the star account.
    let change = settlement(Some(&star), KEY_A, Some("L"), Settle::Release, T0).unwrap();
    assert_eq!(change.debits, per(-1, 0));
    charge(&mut star, change, T0);
    assert_eq!(offer(&b, Some(&star), None, T0).left, per(Some(1), None));
}

#[test]
fn a_row_read_between_the_flush_commit_and_its_acknowledgement_counts_its_batch_once() {
    let p = policy(&[(LimitField::RequestsPerDay, 0)]);
    let mut acc = Account::default();
    let b = balance(Some(10), None);
    for _ in 0..3 {
        admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    }
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(Some(7), None));
    // The flush sends the batch (3 debits) and PostgreSQL commits it: a row read now says 3
    // used and was last debited by that batch's sequence, which is not acknowledged yet.
    let seq = acc.batch_seq();
    let sent_hours = acc.unflushed_hours();
    let sent = Unacknowledged::of(seq, &sent_hours);
    assert_eq!(sent.debits, per(3, 0));
    let committed = RowBalance {
        used: per(3, 0),
        ledger_seq: seq,
        ..b
    };
    assert!(counts_unacknowledged(&committed, Some(&acc)));
    // The master that sent it knows the batch: exact.
    assert_eq!(
        offer(&committed, Some(&acc), Some(sent), T0).left,
        per(Some(7), None)
    );
    // A node that does not (a replica, a restarted master) counts the floor (0 here).
    assert_eq!(
        offer(&committed, Some(&acc), None, T0).left,
        per(Some(7), None)
    );
    // A batch of another sequence tells nothing about this one.
    let other = Unacknowledged {
        seq: seq - 1,
        ..sent
    };
    assert_eq!(
        offer(&committed, Some(&acc), Some(other), T0).left,
        per(Some(7), None)
    );
    // One more admission while the batch is in flight: still counted once.
    admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        request(None),
        own(committed),
        None,
        T0,
    );
    assert_eq!(
        offer(&committed, Some(&acc), Some(sent), T0).left,
        per(Some(6), None)
    );
    // A row read before the commit does not count the batch: nothing to take off.
    let before = RowBalance {
        ledger_seq: seq - 5,
        ..b
    };
    assert!(!counts_unacknowledged(&before, Some(&acc)));
    assert_eq!(
        offer(&before, Some(&acc), Some(sent), T0).left,
        per(Some(6), None)
    );
    // The acknowledgement takes the batch off and sets the floor: both rows agree again.
    acc.acknowledge(&Acknowledgement {
        hours: sent_hours,
        next_seq: seq + 1,
        floor: Some(per(3, 0)),
    });
    assert!(!counts_unacknowledged(&committed, Some(&acc)));
    for row in [committed, before] {
        assert_eq!(offer(&row, Some(&acc), None, T0).left, per(Some(6), None));
    }
}

#[test]
fn without_the_batch_a_row_that_counts_it_is_taken_at_the_floor() {
    let p = policy(&[(LimitField::RequestsPerDay, 0)]);
    let mut acc = Account::default();
    let b = balance(Some(10), None);
    admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    let first = acc.batch_seq();
    acc.acknowledge(&Acknowledgement {
        hours: acc.unflushed_hours(),
        next_seq: first + 1,
        floor: Some(per(4, 0)),
    });
    // PostgreSQL counted 4 after the acknowledged batch (3 from before it); 2 more are sent and
    // committed, not acknowledged.
    for _ in 0..2 {
        admit_with(&mut acc, KEY_A, "a", &p, request(None), own(b), None, T0);
    }
    let row = RowBalance {
        used: per(6, 0),
        ledger_seq: acc.batch_seq(),
        ..b
    };
    // 10 - 4 flushed - 2 unflushed, not 10 - 6 - 2.
    assert_eq!(offer(&row, Some(&acc), None, T0).left, per(Some(4), None));
    // A holder that never had a batch acknowledged here (floor 0) while the row holds debits
    // of before: at most what it counts unflushed is counted twice.
    let mut fresh = Account::default();
    for _ in 0..2 {
        admit_with(&mut fresh, KEY_A, "a", &p, request(None), own(b), None, T0);
    }
    let older = RowBalance {
        used: per(7, 0),
        ledger_seq: fresh.batch_seq(),
        ..b
    };
    assert_eq!(
        offer(&older, Some(&fresh), None, T0).left,
        per(Some(3), None)
    );
    // A renamed holder's sequence is another name's: the row's is not comparable.
    acc.mark_renamed();
    assert!(!counts_unacknowledged(&row, Some(&acc)));
}

/// A request of cost n that a requests balance pays is debited n (all of it, whatever the
/// windows had left), a balance with less than n left is spent, and a release refunds exactly
/// n: on the account's own balance, and on the user's `'*'` account, whose hold says n (in
/// its state and in the effect a replica applies).
#[test]
fn a_balance_pays_a_whole_cost_and_a_release_refunds_it() {
    let p = policy(&[(LimitField::RequestsPerDay, 2)]);
    let b = balance(Some(5), None);
    let costly = |cost, lease| AdmitRequest {
        cost,
        ..request(lease)
    };
    let mut acc = Account::default();
    let a = admit_with(
        &mut acc,
        KEY_A,
        "a",
        &p,
        costly(3, Some("L")),
        own(b),
        None,
        T0,
    );
    assert!(a.decision.allowed() && a.decision.paid_by_balance());
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(Some(2), None));
    let spent = admit_with(&mut acc, KEY_A, "a", &p, costly(3, None), own(b), None, T0);
    assert_eq!(spent.decision.reason(), "requests_per_day|balance");
    let payer = payer_by_terms(Some(&acc), "a");
    assert!(release(&mut acc, KEY_A, "L", payer, T0).0);
    assert_eq!(offer(&b, Some(&acc), None, T0).left, per(Some(5), None));

    let mut star = Account::default();
    let mut replica = Account::default();
    let ship = |propagate: Propagate, replica: &mut Account| match propagate {
        Propagate::Effect(bytes) => Effect::decode(&bytes).unwrap().apply(replica).unwrap(),
        _ => panic!("no effect"),
    };
    let mut acc = Account::default();
    let req = costly(4, Some("M"));
    let a = admit_with(&mut acc, KEY_B, "b", &p, req, global(b), Some(&star), T0);
    assert_eq!(a.star_change.map(|c| c.debits), Some(per(4, 0)));
    ship(charge(&mut star, a.star_change.unwrap(), T0), &mut replica);
    assert_eq!(replica, star);
    assert_eq!(Account::decode(&star.encode()), Ok(star.clone()));
    assert_eq!(offer(&b, Some(&star), None, T0).left, per(Some(1), None));
    let payer = payer_by_terms(Some(&acc), "b");
    assert!(release(&mut acc, KEY_B, "M", payer, T0).0);
    let change = settlement(Some(&star), KEY_B, Some("M"), Settle::Release, T0).unwrap();
    assert_eq!(change.debits, per(-4, 0));
    ship(charge(&mut star, change, T0), &mut replica);
    assert_eq!(replica, star);
    assert_eq!(offer(&b, Some(&star), None, T0).left, per(Some(5), None));
}

/// An admission nobody listens to (no replica, no AOF) encodes no effect: it is only counted;
/// the account changes the same.
#[test]
fn an_admission_nobody_listens_to_is_counted_not_encoded() {
    let p = policy(&[(LimitField::RequestsPerDay, 5)]);
    let (mut heard, mut quiet) = (Account::default(), Account::default());
    for (acc, listened) in [(&mut heard, true), (&mut quiet, false)] {
        let inputs = AdmitInputs {
            key: KEY_A,
            bundle: "a",
            policy: &p,
            request: request(Some("L")),
            balance: None,
            sent: None,
            verbose: false,
            listened,
        };
        let (admitted, propagate) = admit(acc, &inputs, None, T0, ids());
        assert!(admitted.unwrap().decision.allowed());
        match (listened, propagate) {
            (true, Propagate::Effect(_)) | (false, Propagate::Counted) => {}
            (_, _) => panic!("listened {listened}: the wrong propagation"),
        }
    }
    assert_eq!(heard, quiet);
}
