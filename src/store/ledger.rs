//! The usage ledger in PostgreSQL: applying flush batches exactly once and reading the hourly
//! rows back (`QUOTA.HISTORY`).
//!
//! A flush is one transaction over many accounts: the per-account sequence in
//! `quota_ledger_batch` is advanced only for batches above it (the others were applied before
//! and are skipped whole), the applied batches are added to `quota_usage_hourly`, and their
//! balance debits to the `*_balance_used` columns of the credit rows with the same identity.
//! Must not decide what a batch holds (the core does) nor open connections.

use std::collections::HashMap;

use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Transaction};

use super::error::StoreError;
use super::schema::substitute;
use crate::core::credit::PerKind;
use crate::core::ids::{AccountId, OwnedAccount, UserId};
use crate::core::ledger::{claim, hours_text, parse_hours_text, Claim, HourDelta, LastBatch};

/// Most rows `QUOTA.HISTORY` returns (a leap year of hours).
pub(crate) const HISTORY_MAX_ROWS: i64 = 8784;

/// One account's batch: its identity, sequence and unflushed hours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AccountBatch {
    pub account: OwnedAccount,
    pub seq: u64,
    /// The batch's revision: when the master snapshotted it (ms). A replica that takes over
    /// sends the same sequence with a later revision (see `core::ledger::claim`).
    pub rev: u64,
    pub hours: Vec<HourDelta>,
}

/// What PostgreSQL did with one account's batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchOutcome {
    /// False when a batch with this sequence or a later one was applied before (skipped).
    pub applied: bool,
    /// The batch revised one applied before with the same sequence (a replica that took
    /// over): only the difference was added.
    pub revised: bool,
    /// The sequence the account's next batch must use.
    pub next_seq: u64,
    /// The credit row's used totals after the batch, when the batch debited one.
    pub floor: Option<PerKind<u64>>,
}

/// One hourly row as `QUOTA.HISTORY` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HourRow {
    /// Unix seconds of the hour's start.
    pub hour: i64,
    pub requests: i64,
    pub tokens: i64,
    pub requests_debited: i64,
    pub tokens_debited: i64,
}

/// The ledger statements, with the configured schema substituted once.
pub(crate) struct LedgerStatements {
    reserve: String,
    lock: String,
    record: String,
    add_hours: String,
    add_used: String,
    history: String,
}

const IDS: &str = "$1::text[], $2::text[], $3::text[], $4::text[]";
const MATCH: &str = "r.tenant = x.t AND r.project = x.p AND r.user_id = x.u AND r.bundle_id = x.b";

impl LedgerStatements {
    /// Builds the statements for `schema` (already validated).
    pub(crate) fn new(schema: &str) -> LedgerStatements {
        let s = |sql: String| substitute(&sql, schema);
        LedgerStatements {
            reserve: s(format!(
                "INSERT INTO \"control_plane\".quota_ledger_batch \
                 (tenant, project, user_id, bundle_id, last_seq) \
                 SELECT t, p, u, b, -1 FROM unnest({IDS}) AS x(t, p, u, b) \
                 ON CONFLICT (tenant, project, user_id, bundle_id) DO NOTHING"
            )),
            lock: s(format!(
                "SELECT x.i, r.last_seq, r.last_rev, r.last_hours \
                 FROM unnest({IDS}) WITH ORDINALITY AS x(t, p, u, b, i) \
                 JOIN \"control_plane\".quota_ledger_batch r ON {MATCH} \
                 ORDER BY x.i FOR UPDATE OF r"
            )),
            record: s(format!(
                "UPDATE \"control_plane\".quota_ledger_batch r SET last_seq = x.s, \
                 last_rev = x.v, last_hours = x.h, updated_at = now() \
                 FROM unnest({IDS}, $5::bigint[], $6::bigint[], $7::text[]) \
                 AS x(t, p, u, b, s, v, h) WHERE {MATCH}"
            )),
            add_hours: s(format!(
                "INSERT INTO \"control_plane\".quota_usage_hourly AS r \
                 (tenant, project, user_id, bundle_id, hour, requests, tokens, \
                  requests_debited, tokens_debited) \
                 SELECT t, p, u, b, to_timestamp(h * 3600), q, k, dq, dk \
                 FROM unnest({IDS}, $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], \
                      $9::bigint[]) AS x(t, p, u, b, h, q, k, dq, dk) \
                 ON CONFLICT (tenant, project, user_id, bundle_id, hour) DO UPDATE SET \
                 requests = {}, tokens = {}, requests_debited = {}, tokens_debited = {}, \
                 updated_at = now()",
                saturated("r.requests", "EXCLUDED.requests"),
                saturated("r.tokens", "EXCLUDED.tokens"),
                saturated("r.requests_debited", "EXCLUDED.requests_debited"),
                saturated("r.tokens_debited", "EXCLUDED.tokens_debited"),
            )),
            add_used: s(format!(
                "UPDATE \"control_plane\".user_quota_replenishment r SET \
                 requests_balance_used = {}, tokens_balance_used = {}, \
                 balance_seq = GREATEST(r.balance_seq, x.s) \
                 FROM unnest({IDS}, $5::bigint[], $6::bigint[], $7::bigint[]) \
                 AS x(t, p, u, b, dq, dk, s) \
                 WHERE {MATCH} \
                 RETURNING r.tenant, r.project, r.user_id, r.bundle_id, \
                 r.requests_balance_used, r.tokens_balance_used",
                saturated("r.requests_balance_used", "x.dq"),
                saturated("r.tokens_balance_used", "x.dk"),
            )),
            history: s(
                "SELECT floor(extract(epoch FROM hour))::bigint, requests, tokens, \
                 requests_debited, tokens_debited FROM \"control_plane\".quota_usage_hourly \
                 WHERE tenant = $1 AND project = $2 AND user_id = $3 AND bundle_id = $4 \
                 AND hour >= to_timestamp($5::bigint) AND hour < to_timestamp($6::bigint) \
                 ORDER BY hour LIMIT $7"
                    .to_owned(),
            ),
        }
    }
}

/// `a + b` for two `BIGINT`s, held to the type's range instead of failing: the usage of one
/// account (every amount is bounded at the command, see `core::ledger::MAX_TOKENS`) can only
/// get there in absurd cases, and a sum that failed would fail the account's batch forever.
fn saturated(a: &str, b: &str) -> String {
    format!(
        "LEAST(GREATEST({a}::numeric + {b}, -9223372036854775808), 9223372036854775807)::bigint"
    )
}

fn pg(err: postgres::Error) -> StoreError {
    StoreError::from_pg(&err)
}

/// The four identity columns (tenant, project, user, bundle) of a batched statement, one
/// element per account.
type IdColumns<'a> = [Vec<&'a str>; 4];

/// Appends one account's identity to `columns`.
fn push_ids<'a>(columns: &mut IdColumns<'a>, account: &'a OwnedAccount) {
    let [tenant, project, user, bundle] = columns;
    tenant.push(&account.user.tenant);
    project.push(&account.user.project);
    user.push(&account.user.user);
    bundle.push(&account.bundle);
}

/// The array parameters of a batched statement: the identity columns as text arrays ($1..$4),
/// then each of `ints` as a bigint array ($5...).
fn array_params<'a>(
    ids: &'a IdColumns<'_>,
    ints: &'a [Vec<i64>],
) -> Vec<(&'a (dyn ToSql + Sync), Type)> {
    let ids = ids
        .iter()
        .map(|c| (c as &(dyn ToSql + Sync), Type::TEXT_ARRAY));
    let ints = ints
        .iter()
        .map(|c| (c as &(dyn ToSql + Sync), Type::INT8_ARRAY));
    ids.chain(ints).collect()
}

/// The account a row's first four columns (tenant, project, user, bundle) name.
fn identity(row: &postgres::Row) -> Result<AccountId<'_>, StoreError> {
    Ok(AccountId {
        user: UserId {
            tenant: row.try_get(0).map_err(pg)?,
            project: row.try_get(1).map_err(pg)?,
            user: row.try_get(2).map_err(pg)?,
        },
        bundle: row.try_get(3).map_err(pg)?,
    })
}

/// Applies `batches` (one per account, identities distinct) in one transaction; returns what
/// happened to each, in order. Nothing is applied when it fails. Each account's row in
/// `quota_ledger_batch` is locked and `core::ledger::claim` decides what of its batch to add.
pub(crate) fn flush(
    mut tx: Transaction<'_>,
    sql: &LedgerStatements,
    batches: &[AccountBatch],
) -> Result<Vec<BatchOutcome>, StoreError> {
    let mut out: Vec<BatchOutcome> = batches
        .iter()
        .map(|b| BatchOutcome {
            applied: false,
            revised: false,
            next_seq: b.seq.saturating_add(1),
            floor: None,
        })
        .collect();
    if batches.is_empty() {
        return Ok(out);
    }
    let position: HashMap<AccountId<'_>, usize> = batches
        .iter()
        .enumerate()
        .map(|(i, b)| (b.account.id(), i))
        .collect();
    let mut ids = IdColumns::default();
    for b in batches {
        push_ids(&mut ids, &b.account);
    }
    let id_params = array_params(&ids, &[]);
    tx.query_typed(&sql.reserve, &id_params).map_err(pg)?;
    let mut last: Vec<Option<LastBatch>> = vec![None; batches.len()];
    for row in tx.query_typed(&sql.lock, &id_params).map_err(pg)? {
        let i: i64 = row.try_get(0).map_err(pg)?;
        let seq: i64 = row.try_get(1).map_err(pg)?;
        let rev: i64 = row.try_get(2).map_err(pg)?;
        let text: &str = row.try_get(3).map_err(pg)?;
        let hours = parse_hours_text(text).ok_or_else(|| {
            StoreError::Query(
                "a stored ledger batch (quota_ledger_batch.last_hours) is unreadable".into(),
            )
        })?;
        let slot = usize::try_from(i - 1).ok().and_then(|i| last.get_mut(i));
        if let (Some(slot), Ok(seq), Ok(rev)) = (slot, u64::try_from(seq), u64::try_from(rev)) {
            *slot = Some(LastBatch { seq, rev, hours });
        }
    }
    let mut applied: Vec<Vec<HourDelta>> = vec![Vec::new(); batches.len()];
    let mut record = IdColumns::default();
    // The sequence and revision of each recorded batch, then its hours as text.
    let (mut ints, mut texts): ([Vec<i64>; 2], Vec<String>) = Default::default();
    for (i, batch) in batches.iter().enumerate() {
        let (Some(o), Some(prior)) = (out.get_mut(i), last.get(i)) else {
            continue;
        };
        match claim(prior.as_ref(), batch.seq, batch.rev, &batch.hours) {
            Claim::Apply(hours) => {
                o.applied = true;
                o.revised = prior.as_ref().is_some_and(|l| l.seq == batch.seq);
                if let Some(slot) = applied.get_mut(i) {
                    *slot = hours;
                }
                push_ids(&mut record, &batch.account);
                ints[0].push(i64::try_from(batch.seq).unwrap_or(i64::MAX));
                ints[1].push(i64::try_from(batch.rev).unwrap_or(i64::MAX));
                texts.push(hours_text(&batch.hours));
            }
            Claim::Skip => {
                // The next sequence goes beyond the one stored.
                let stored = prior.as_ref().map_or(0, |l| l.seq);
                o.next_seq = o.next_seq.max(stored.saturating_add(1));
            }
        }
    }
    if !texts.is_empty() {
        let mut params = array_params(&record, &ints);
        params.push((&texts, Type::TEXT_ARRAY));
        tx.query_typed(&sql.record, &params).map_err(pg)?;
    }
    add_hours(&mut tx, sql, batches, &applied)?;
    add_used(&mut tx, sql, batches, &applied, &mut out, &position)?;
    tx.commit().map_err(pg)?;
    Ok(out)
}

/// Adds what each batch applies to the hourly rows.
fn add_hours(
    tx: &mut postgres::Transaction<'_>,
    sql: &LedgerStatements,
    batches: &[AccountBatch],
    applied: &[Vec<HourDelta>],
) -> Result<(), StoreError> {
    let mut ids = IdColumns::default();
    let mut cols: [Vec<i64>; 5] = Default::default();
    for (batch, hours) in batches.iter().zip(applied) {
        for h in hours.iter().filter(|h| !h.is_zero()) {
            push_ids(&mut ids, &batch.account);
            let values = [
                h.hour,
                h.requests,
                h.tokens,
                h.debits.requests,
                h.debits.tokens,
            ];
            for (column, v) in cols.iter_mut().zip(values) {
                column.push(v);
            }
        }
    }
    if ids[0].is_empty() {
        return Ok(());
    }
    tx.query_typed(&sql.add_hours, &array_params(&ids, &cols))
        .map_err(pg)?;
    Ok(())
}

/// Adds the applied batches' balance debits to their credit rows and reads the new totals.
/// A batch that carried debits reads the totals even when it adds nothing (skipped: applied by
/// a write whose answer was lost; or revised with nothing more to debit): its acknowledgement
/// takes its debits off the account, so the floor must move past them, or a credit row cached
/// before that write would count them nowhere.
fn add_used(
    tx: &mut postgres::Transaction<'_>,
    sql: &LedgerStatements,
    batches: &[AccountBatch],
    applied: &[Vec<HourDelta>],
    out: &mut [BatchOutcome],
    position: &HashMap<AccountId<'_>, usize>,
) -> Result<(), StoreError> {
    let mut ids = IdColumns::default();
    // Requests debited, tokens debited, the batch's sequence.
    let mut debits: [Vec<i64>; 3] = Default::default();
    let debited = |hours: &[HourDelta]| {
        hours.iter().fold(PerKind::<i64>::default(), |sum, h| {
            sum.zip_with(h.debits, i64::saturating_add)
        })
    };
    let none = PerKind::default();
    for ((batch, hours), o) in batches.iter().zip(applied).zip(out.iter()) {
        let sum = if o.applied { debited(hours) } else { none };
        // A batch revised or skipped whole may add nothing and still have debited the row.
        if sum == none && debited(&batch.hours) == none {
            continue;
        }
        push_ids(&mut ids, &batch.account);
        debits[0].push(sum.requests);
        debits[1].push(sum.tokens);
        debits[2].push(i64::try_from(batch.seq).unwrap_or(i64::MAX));
    }
    if ids[0].is_empty() {
        return Ok(());
    }
    let rows = tx
        .query_typed(&sql.add_used, &array_params(&ids, &debits))
        .map_err(pg)?;
    for row in &rows {
        let used_requests: i64 = row.try_get(4).map_err(pg)?;
        let used_tokens: i64 = row.try_get(5).map_err(pg)?;
        if let Some(o) = position.get(&identity(row)?).and_then(|i| out.get_mut(*i)) {
            o.floor = Some(PerKind {
                requests: used_requests.max(0) as u64,
                tokens: used_tokens.max(0) as u64,
            });
        }
    }
    Ok(())
}

/// `QUOTA.HISTORY`: the account's hourly rows with `from <= hour < to` (Unix seconds), oldest
/// first, at most `HISTORY_MAX_ROWS`.
pub(crate) fn history(
    client: &mut impl GenericClient,
    sql: &LedgerStatements,
    account: &AccountId<'_>,
    from: i64,
    to: i64,
) -> Result<Vec<HourRow>, StoreError> {
    let AccountId { user, bundle: b } = account;
    let (t, p, u) = (user.tenant, user.project, user.user);
    let rows = client
        .query_typed(
            &sql.history,
            &[
                (&t, Type::TEXT),
                (&p, Type::TEXT),
                (&u, Type::TEXT),
                (&b, Type::TEXT),
                (&from, Type::INT8),
                (&to, Type::INT8),
                (&HISTORY_MAX_ROWS, Type::INT8),
            ],
        )
        .map_err(pg)?;
    rows.iter()
        .map(|row| {
            Ok(HourRow {
                hour: row.try_get(0).map_err(pg)?,
                requests: row.try_get(1).map_err(pg)?,
                tokens: row.try_get(2).map_err(pg)?,
                requests_debited: row.try_get(3).map_err(pg)?,
                tokens_debited: row.try_get(4).map_err(pg)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::substituted;

    #[test]
    fn statements_are_substituted() {
        let sql = substituted!(
            LedgerStatements,
            "\"billing\".",
            [reserve, lock, record, add_hours, add_used, history]
        );
        assert!(sql.add_hours.contains("$9::bigint[]"));
        assert!(!sql.add_hours.contains("$10"));
    }
}
