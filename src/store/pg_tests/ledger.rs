//! The ledger flush against a real PostgreSQL: sums that saturate, stored batches that still
//! read, and the floor a batch's acknowledgement carries.

use super::*;
use crate::core::credit::PerKind;
use crate::core::ids::OwnedAccount;
use crate::core::ledger::HourDelta;

/// The account ("t", "chat", `user`, "web") the batches below write.
fn account(user: &str) -> AccountId<'_> {
    AccountId {
        user: UserId {
            tenant: "t",
            project: "chat",
            user,
        },
        bundle: "web",
    }
}

/// One account's batch of `hours` (hour index, requests, tokens) with `seq` and `rev`.
fn batch(user: &str, seq: u64, rev: u64, hours: &[(i64, i64, i64)]) -> AccountBatch {
    AccountBatch {
        account: OwnedAccount::from_id(&account(user)),
        seq,
        rev,
        hours: hours
            .iter()
            .map(|&(hour, requests, tokens)| HourDelta {
                hour,
                requests,
                tokens,
                debits: PerKind::default(),
            })
            .collect(),
    }
}

/// A sum past a column's 64-bit limit saturates instead of failing the batch (a failing sum
/// would fail the batch, and every batch sent with it, at every flush).
#[test]
fn ledger_sums_saturate_at_the_column_limit() {
    let fx = fixture!("ledger_saturate");
    let hour = 490_000;
    let huge = i64::MAX - 5;
    let first = fx
        .store
        .flush_ledger(&[batch("eve", 1, 1, &[(hour, 1, huge)])])
        .expect("first flush");
    assert!(first[0].applied);
    let second = fx
        .store
        .flush_ledger(&[
            batch("eve", 2, 2, &[(hour, 1, 100)]),
            batch("bob", 1, 2, &[(hour, 1, 7)]),
        ])
        .expect("a sum past the limit saturates");
    assert!(second.iter().all(|o| o.applied));
    let rows = fx
        .store
        .history(&account("eve"), 0, 253_402_300_800)
        .unwrap();
    assert_eq!((rows[0].requests, rows[0].tokens), (2, i64::MAX));
    let bob = fx
        .store
        .history(&account("bob"), 0, 253_402_300_800)
        .unwrap();
    assert_eq!((bob[0].requests, bob[0].tokens), (1, 7));
}

/// An older build could record a batch of 169 hours; it still reads, so the account's next
/// batches (and the others written with them) go through.
#[test]
fn a_stored_batch_of_169_hours_still_reads() {
    let fx = fixture!("ledger_169");
    let hours: Vec<(i64, i64, i64)> = (0..169).map(|i| (480_000 + i, 1, 2)).collect();
    fx.store
        .flush_ledger(&[batch("eve", 1, 1, &hours)])
        .expect("first flush");
    let stored: String = fx
        .client()
        .query_one(
            &substitute(
                "SELECT last_hours FROM \"control_plane\".quota_ledger_batch WHERE user_id = 'eve'",
                &fx.schema,
            ),
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(stored.split(',').count(), 169 * 5);
    // The same sequence again (a replica that took over, a later revision): the stored batch
    // must be read to take the difference.
    let out = fx
        .store
        .flush_ledger(&[
            batch("eve", 1, 2, &[(480_168, 3, 2)]),
            batch("bob", 1, 2, &[(480_000, 1, 1)]),
        ])
        .expect("the stored batch reads");
    assert!(out[0].applied && out[0].revised && out[1].applied);
}

/// Each flush that debits a credit row stamps it with the batch's sequence (so a node that
/// reads the row knows which of its batches it counts), and a batch sent again after its
/// answer was lost is skipped yet still reports the row's totals: its acknowledgement takes the
/// debits off the account, so the floor must move past them.
#[test]
fn a_batch_stamps_its_row_and_a_resent_one_still_reports_the_totals() {
    let fx = fixture!("ledger_floor");
    fx.exec(
        "INSERT INTO \"control_plane\".user_quota_replenishment \
         (tenant, project, user_id, bundle_id, active, requests_balance) \
         VALUES ('t', 'chat', 'eve', 'web', true, 10)",
    );
    let seq_of = || -> i64 {
        fx.client()
            .query_one(
                &substitute(
                    "SELECT balance_seq FROM \"control_plane\".user_quota_replenishment \
                     WHERE user_id = 'eve'",
                    &fx.schema,
                ),
                &[],
            )
            .unwrap()
            .get(0)
    };
    assert_eq!(seq_of(), 0);
    let mut debiting = batch("eve", 7, 1, &[(480_000, 2, 0)]);
    debiting.hours[0].debits = PerKind {
        requests: 2,
        tokens: 0,
    };
    let first = fx.store.flush_ledger(&[debiting.clone()]).unwrap();
    assert!(first[0].applied);
    assert_eq!(
        first[0].floor,
        Some(PerKind {
            requests: 2,
            tokens: 0
        })
    );
    assert_eq!(seq_of(), 7);
    // Sent again (its answer was lost): skipped, nothing added, the totals reported.
    let again = fx.store.flush_ledger(&[debiting]).unwrap();
    assert!(!again[0].applied);
    assert_eq!(
        again[0].floor,
        Some(PerKind {
            requests: 2,
            tokens: 0
        })
    );
    // A batch without debits leaves the row alone.
    let plain = fx
        .store
        .flush_ledger(&[batch("eve", 8, 2, &[(480_000, 1, 0)])]);
    assert_eq!(plain.unwrap()[0].floor, None);
    assert_eq!(seq_of(), 7);
    // The row, as a cache load reads it, carries the stamp.
    let rows = fx
        .store
        .load_user(&UserId {
            tenant: "t",
            project: "chat",
            user: "eve",
        })
        .unwrap();
    let balance = rows[0].balance.as_deref().unwrap();
    let used = PerKind {
        requests: 2,
        tokens: 0,
    };
    assert_eq!((balance.used, balance.ledger_seq), (used, 7));
}
