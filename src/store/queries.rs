//! The statements behind cache loads, `QUOTA.GRANT`, `REVOKE`, `LIST` and `CLEANUP`, the
//! transactions around them, and the mapping of a row into a `Replenishment`.
//!
//! Owns all application SQL. Every value goes in as a typed parameter (one round trip per
//! statement); the schema name, already validated, is the only text spliced in. Money goes in
//! and out as decimal text, timestamps as integer Unix seconds: never a float. Must not decide
//! what a grant writes (that is `GrantRequest::apply` in the core) nor open connections.

use std::collections::BTreeSet;

use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Row, Transaction};
use serde_json::{Map, Value};

use super::error::{CleanupOutcome, GrantOutcome, RevokeOutcome, StoreError};
use super::schema::{schema_lock_key, substitute, CLEANUP_LOCK_CLASS};
use crate::core::credit::{BalanceKind, GrantRequest, GrantValues, Replenishment, RowBalance};
use crate::core::ids::UserId;
use crate::core::policy::{Additional, LimitField, LIMIT_FIELDS};
use crate::core::Millis;

/// The replenishment table, with the schema placeholder.
const TABLE: &str = "\"control_plane\".user_quota_replenishment";
/// The event table, with the schema placeholder.
const EVENTS: &str = "\"control_plane\".user_quota_replenishment_event";

/// The columns every row-returning statement selects, in the order [`to_replenishment`] reads
/// them: the bundle, the ten amounts in `LimitField::ALL` order, then the rest.
pub(crate) const COLUMNS: &str = "bundle_id, \
    additional_requests_per_day, additional_requests_per_month, additional_total_requests, \
    additional_tokens_per_hour, additional_tokens_per_day, additional_tokens_per_month, \
    additional_max_concurrent, \
    additional_requests_per_second, additional_requests_per_minute, additional_tokens_per_minute, \
    floor(extract(epoch FROM expires_at))::bigint, purchase_id, purchase_amount_usd::text, \
    purchase_notes, active, \
    floor(extract(epoch FROM created_at))::bigint, floor(extract(epoch FROM updated_at))::bigint, \
    requests_balance, tokens_balance, requests_balance_used, tokens_balance_used, \
    requests_balance_base, tokens_balance_base, balance_seq";

const COL_BUNDLE: usize = 0;
const COL_FIRST_LIMIT: usize = 1;
const COL_EXPIRES_AT: usize = COL_FIRST_LIMIT + LIMIT_FIELDS;
const COL_PURCHASE_ID: usize = COL_EXPIRES_AT + 1;
const COL_AMOUNT: usize = COL_PURCHASE_ID + 1;
const COL_NOTES: usize = COL_AMOUNT + 1;
const COL_ACTIVE: usize = COL_NOTES + 1;
const COL_CREATED_AT: usize = COL_ACTIVE + 1;
const COL_UPDATED_AT: usize = COL_CREATED_AT + 1;
/// Granted (2), used (2), base (2), each in `BalanceKind` order, then the sequence of the last
/// flush batch that debited the row.
const COL_BALANCE: usize = COL_UPDATED_AT + 1;
const COL_LAST: usize = COL_BALANCE + 6;

/// The identity predicate: parameters $1..$3 (user) and $4 (bundle).
const WHERE_ROW: &str = "tenant = $1 AND project = $2 AND user_id = $3 AND bundle_id = $4";
/// The user predicate: parameters $1..$3.
const WHERE_USER: &str = "tenant = $1 AND project = $2 AND user_id = $3";
/// Byte order of bundle ids, whatever the database collation (same order as Rust's `str`).
const BY_BUNDLE: &str = "ORDER BY bundle_id COLLATE \"C\"";

/// Every statement, with the configured schema substituted once.
pub(crate) struct Statements {
    active_rows: String,
    active_rows_many: String,
    active_rows_and_bundle: String,
    list_live: String,
    list_all: String,
    insert_placeholder: String,
    lock_row: String,
    write_grant: String,
    insert_event: String,
    revoke: String,
    cleanup: String,
}

impl Statements {
    /// Builds the statements for `schema` (already validated).
    pub(crate) fn new(schema: &str) -> Statements {
        let s = |sql: String| substitute(&sql, schema);
        let sets: Vec<String> = LimitField::ALL
            .iter()
            .enumerate()
            .map(|(i, f)| format!("{} = ${}", f.column(), i + 5))
            .collect();
        let next = 5 + LIMIT_FIELDS;
        Statements {
            active_rows: s(format!(
                "SELECT {COLUMNS} FROM {TABLE} WHERE {WHERE_USER} AND active {BY_BUNDLE}"
            )),
            // Several users at once: their position in the request comes back last.
            active_rows_many: s(format!(
                "SELECT {COLUMNS}, u.i FROM unnest($1::text[], $2::text[], $3::text[]) \
                 WITH ORDINALITY AS u(tenant, project, user_id, i) \
                 JOIN {TABLE} t ON t.tenant = u.tenant AND t.project = u.project \
                 AND t.user_id = u.user_id WHERE t.active ORDER BY u.i, t.bundle_id COLLATE \"C\""
            )),
            active_rows_and_bundle: s(format!(
                "SELECT {COLUMNS} FROM {TABLE} WHERE {WHERE_USER} AND (active OR bundle_id = $4) \
                 {BY_BUNDLE}"
            )),
            list_live: s(format!(
                "SELECT {COLUMNS} FROM {TABLE} WHERE {WHERE_USER} AND active \
                 AND (expires_at IS NULL OR expires_at > now()) {BY_BUNDLE}"
            )),
            list_all: s(format!("SELECT {COLUMNS} FROM {TABLE} WHERE {WHERE_USER} {BY_BUNDLE}")),
            insert_placeholder: s(format!(
                "INSERT INTO {TABLE} (tenant, project, user_id, bundle_id, active) \
                 VALUES ($1, $2, $3, $4, false) ON CONFLICT DO NOTHING"
            )),
            lock_row: s(format!("SELECT {COLUMNS} FROM {TABLE} WHERE {WHERE_ROW} FOR UPDATE")),
            write_grant: s(format!(
                "UPDATE {TABLE} SET {}, expires_at = to_timestamp(${}::bigint), purchase_id = ${}, \
                 purchase_amount_usd = ${}::text::numeric, purchase_notes = ${}, active = true, \
                 requests_balance = ${}, tokens_balance = ${}, \
                 requests_balance_base = CASE WHEN ${} THEN requests_balance_used \
                     ELSE requests_balance_base END, \
                 tokens_balance_base = CASE WHEN ${} THEN tokens_balance_used \
                     ELSE tokens_balance_base END \
                 WHERE {WHERE_ROW} RETURNING {COLUMNS}",
                sets.join(", "),
                next,
                next + 1,
                next + 2,
                next + 3,
                next + 4,
                next + 5,
                next + 6,
                next + 6,
            )),
            insert_event: s(format!(
                "INSERT INTO {EVENTS} \
                 (tenant, project, user_id, bundle_id, event_type, payload, purchase_id) \
                 VALUES ($1, $2, $3, $4, $5, $6::text::jsonb, $7) \
                 ON CONFLICT (tenant, project, purchase_id) WHERE purchase_id IS NOT NULL \
                 DO NOTHING RETURNING id"
            )),
            revoke: s(format!(
                "UPDATE {TABLE} SET active = false WHERE {WHERE_ROW} AND active RETURNING {COLUMNS}"
            )),
            // Rows a concurrent grant holds are skipped (the next run gets them) rather than
            // waited for; the UPDATE re-checks the condition on the row it locked.
            cleanup: s(format!(
                "WITH due AS ( \
                     SELECT tenant, project, user_id, bundle_id FROM {TABLE} \
                     WHERE active AND expires_at <= to_timestamp($1::bigint / 1000.0) \
                     FOR UPDATE SKIP LOCKED \
                 ), expired AS ( \
                     UPDATE {TABLE} AS r SET active = false FROM due \
                     WHERE r.tenant = due.tenant AND r.project = due.project \
                       AND r.user_id = due.user_id AND r.bundle_id = due.bundle_id \
                       AND r.active AND r.expires_at <= to_timestamp($1::bigint / 1000.0) \
                     RETURNING r.tenant, r.project, r.user_id, r.bundle_id, r.expires_at, \
                               r.purchase_id, r.purchase_amount_usd \
                 ), logged AS ( \
                     INSERT INTO {EVENTS} (tenant, project, user_id, bundle_id, event_type, payload) \
                     SELECT tenant, project, user_id, bundle_id, 'expire', jsonb_build_object( \
                         'values', jsonb_build_object( \
                             'expires_at', floor(extract(epoch FROM expires_at))::bigint, \
                             'purchase_id', purchase_id, \
                             'purchase_amount_usd', purchase_amount_usd::text)) \
                     FROM expired \
                 ) \
                 SELECT tenant, project, user_id FROM expired"
            )),
        }
    }
}

type Param<'a> = (&'a (dyn ToSql + Sync), Type);

/// The parameters $1..$4 for (user, bundle), or $1..$3 for the user alone.
fn identity<'a>(user: &'a UserId<'a>, bundle: Option<&'a &'a str>) -> Vec<Param<'a>> {
    let mut params: Vec<Param<'a>> = vec![
        (&user.tenant, Type::TEXT),
        (&user.project, Type::TEXT),
        (&user.user, Type::TEXT),
    ];
    if let Some(bundle) = bundle {
        params.push((bundle, Type::TEXT));
    }
    params
}

fn pg(err: postgres::Error) -> StoreError {
    StoreError::from_pg(&err)
}

/// Every active row of the user (expired ones included), by bundle id.
pub(crate) fn active_rows(
    client: &mut impl GenericClient,
    sql: &Statements,
    user: &UserId,
) -> Result<Vec<Replenishment>, StoreError> {
    let rows = client
        .query_typed(&sql.active_rows, &identity(user, None))
        .map_err(pg)?;
    rows.iter().map(to_replenishment).collect()
}

/// The active rows of several users in one round trip, in the order of `users`.
pub(crate) fn active_rows_many(
    client: &mut impl GenericClient,
    sql: &Statements,
    users: &[UserId],
) -> Result<Vec<Vec<Replenishment>>, StoreError> {
    let tenants: Vec<&str> = users.iter().map(|u| u.tenant).collect();
    let projects: Vec<&str> = users.iter().map(|u| u.project).collect();
    let ids: Vec<&str> = users.iter().map(|u| u.user).collect();
    let params: [Param<'_>; 3] = [
        (&tenants, Type::TEXT_ARRAY),
        (&projects, Type::TEXT_ARRAY),
        (&ids, Type::TEXT_ARRAY),
    ];
    let rows = client
        .query_typed(&sql.active_rows_many, &params)
        .map_err(pg)?;
    let mut out: Vec<Vec<Replenishment>> = users.iter().map(|_| Vec::new()).collect();
    for row in &rows {
        let position: i64 = row.try_get(COL_LAST + 1).map_err(pg)?;
        let slot = usize::try_from(position - 1)
            .ok()
            .and_then(|i| out.get_mut(i))
            .ok_or_else(|| StoreError::Query("row for an unknown user".into()))?;
        slot.push(to_replenishment(row)?);
    }
    Ok(out)
}

/// `QUOTA.LIST`: the live rows (by the database clock), or every row with `all`.
pub(crate) fn list(
    client: &mut impl GenericClient,
    sql: &Statements,
    user: &UserId,
    all: bool,
) -> Result<Vec<Replenishment>, StoreError> {
    let text = if all { &sql.list_all } else { &sql.list_live };
    let rows = client
        .query_typed(text, &identity(user, None))
        .map_err(pg)?;
    rows.iter().map(to_replenishment).collect()
}

/// How a grant transaction ended.
// Returned once per grant (never on a hot path): the outcome stays inline.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Granted {
    Done(GrantOutcome),
    /// The purchase id was already recorded: everything was rolled back; the caller reads the
    /// row as it stands with [`duplicate_outcome`].
    Duplicate,
}

/// `QUOTA.GRANT` in `tx` (committed here unless the purchase id is a duplicate); see
/// `Store::grant`.
pub(crate) fn grant(
    mut tx: Transaction<'_>,
    sql: &Statements,
    user: &UserId,
    bundle: &str,
    req: &GrantRequest,
    now: Millis,
) -> Result<Granted, StoreError> {
    let key = identity(user, Some(&bundle));
    // Make sure a row exists to lock (a concurrent grant of a new row waits here for the other).
    tx.query_typed(&sql.insert_placeholder, &key).map_err(pg)?;
    let current = tx
        .query_typed_opt(&sql.lock_row, &key)
        .map_err(pg)?
        .map(|row| to_replenishment(&row))
        .transpose()?;
    let values = req
        .apply(current.as_ref(), now)
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    let column_values = ColumnValues::new(&values)?;
    let mut params = key.clone();
    params.extend(column_values.params());
    let written = tx
        .query_typed_opt(&sql.write_grant, &params)
        .map_err(pg)?
        .ok_or_else(|| StoreError::Query("the replenishment row vanished during the grant".into()))
        .and_then(|row| to_replenishment(&row))?;

    let event_type = if req.add { "topup" } else { "grant" };
    let payload = grant_payload(&values, req).to_string();
    let mut event = key.clone();
    event.push((&event_type, Type::TEXT));
    event.push((&payload, Type::TEXT));
    event.push((&req.purchase_id, Type::TEXT));
    let recorded = tx.query_typed_opt(&sql.insert_event, &event).map_err(pg)?;
    if recorded.is_none() {
        // The purchase id is already recorded for this (tenant, project): undo everything.
        tx.rollback().map_err(pg)?;
        return Ok(Granted::Duplicate);
    }
    let live_rows = active_rows(&mut tx, sql, user)?;
    tx.commit().map_err(pg)?;
    Ok(Granted::Done(GrantOutcome {
        record: Some(written),
        duplicate: false,
        live_rows,
    }))
}

/// What a grant whose purchase id was a duplicate replies: the row as it stands.
pub(crate) fn duplicate_outcome(
    client: &mut impl GenericClient,
    sql: &Statements,
    user: &UserId,
    bundle: &str,
) -> Result<GrantOutcome, StoreError> {
    let key = identity(user, Some(&bundle));
    let rows = client
        .query_typed(&sql.active_rows_and_bundle, &key)
        .map_err(pg)?;
    let rows = rows
        .iter()
        .map(to_replenishment)
        .collect::<Result<Vec<_>, _>>()?;
    let record = rows.iter().find(|r| &*r.bundle_id == bundle).cloned();
    let live_rows = rows.into_iter().filter(|r| r.active).collect();
    Ok(GrantOutcome {
        record,
        duplicate: true,
        live_rows,
    })
}

/// `QUOTA.REVOKE` in `tx`, committed here; see `Store::revoke`.
pub(crate) fn revoke(
    mut tx: Transaction<'_>,
    sql: &Statements,
    user: &UserId,
    bundle: &str,
) -> Result<RevokeOutcome, StoreError> {
    let key = identity(user, Some(&bundle));
    let revoked = tx
        .query_typed_opt(&sql.revoke, &key)
        .map_err(pg)?
        .map(|row| to_replenishment(&row))
        .transpose()?;
    if let Some(row) = &revoked {
        let payload = Value::Object(
            [("values".to_owned(), row_values(row))]
                .into_iter()
                .collect::<Map<_, _>>(),
        )
        .to_string();
        let no_purchase: Option<&str> = None;
        let mut event = key.clone();
        event.push((&"revoke", Type::TEXT));
        event.push((&payload, Type::TEXT));
        event.push((&no_purchase, Type::TEXT));
        tx.query_typed(&sql.insert_event, &event).map_err(pg)?;
    }
    let live_rows = active_rows(&mut tx, sql, user)?;
    tx.commit().map_err(pg)?;
    Ok(RevokeOutcome {
        revoked: revoked.is_some(),
        live_rows,
    })
}

/// `QUOTA.CLEANUP` in `tx`, committed here, if no other node is running it (a lock held to the
/// end of the transaction, so a pooler cannot leave it behind); see `Store::cleanup`.
pub(crate) fn cleanup(
    mut tx: Transaction<'_>,
    sql: &Statements,
    schema: &str,
    now: Millis,
) -> Result<CleanupOutcome, StoreError> {
    let key = schema_lock_key(schema);
    let locked: bool = tx
        .query_typed_one(
            "SELECT pg_try_advisory_xact_lock($1, $2)",
            &[(&CLEANUP_LOCK_CLASS, Type::INT4), (&key, Type::INT4)],
        )
        .and_then(|row| row.try_get(0))
        .map_err(pg)?;
    if !locked {
        tx.rollback().map_err(pg)?;
        return Ok(CleanupOutcome {
            deactivated: 0,
            users: Vec::new(),
            skipped: true,
        });
    }
    let rows = tx
        .query_typed(&sql.cleanup, &[(&now, Type::INT8)])
        .map_err(pg)?;
    let mut users = BTreeSet::new();
    for row in &rows {
        let text = |idx: usize| row.try_get::<_, String>(idx).map_err(pg);
        users.insert((text(0)?, text(1)?, text(2)?));
    }
    tx.commit().map_err(pg)?;
    Ok(CleanupOutcome {
        deactivated: rows.len() as u64,
        users: users.into_iter().collect(),
        skipped: false,
    })
}

/// Whether a limit is stored in an `INT` column (else `BIGINT`).
fn is_int_column(field: LimitField) -> bool {
    field.column_max() == i64::from(i32::MAX)
}

/// The values of a grant, typed for their columns (parameters $5 onwards of `write_grant`).
struct ColumnValues {
    ints: [Option<i32>; LIMIT_FIELDS],
    bigints: [Option<i64>; LIMIT_FIELDS],
    expires_at: Option<i64>,
    purchase_id: Option<String>,
    amount: Option<String>,
    notes: Option<String>,
    balances: [Option<i64>; 2],
    new_balance_life: bool,
}

impl ColumnValues {
    /// Refuses an amount its column cannot hold (replace mode takes amounts as given).
    fn new(values: &GrantValues) -> Result<ColumnValues, StoreError> {
        let mut ints = [None; LIMIT_FIELDS];
        let mut bigints = [None; LIMIT_FIELDS];
        for (i, field) in LimitField::ALL.into_iter().enumerate() {
            let Some(value) = values.additional.get(field) else {
                continue;
            };
            if is_int_column(field) {
                let narrow = i32::try_from(value).map_err(|_| {
                    StoreError::Invalid(format!(
                        "ERR {} must be at most {}",
                        field.keyword(),
                        field.column_max()
                    ))
                })?;
                if let Some(slot) = ints.get_mut(i) {
                    *slot = Some(narrow);
                }
            } else if let Some(slot) = bigints.get_mut(i) {
                *slot = Some(value);
            }
        }
        Ok(ColumnValues {
            ints,
            bigints,
            expires_at: values.expires_at,
            purchase_id: values.purchase_id.clone(),
            amount: values.purchase_amount.map(|c| c.to_string()),
            notes: values.purchase_notes.clone(),
            balances: values.balances,
            new_balance_life: values.new_balance_life,
        })
    }

    fn params(&self) -> Vec<Param<'_>> {
        let mut params: Vec<Param<'_>> = Vec::with_capacity(LIMIT_FIELDS + 4);
        for (i, field) in LimitField::ALL.into_iter().enumerate() {
            let param: Param<'_> = if is_int_column(field) {
                match self.ints.get(i) {
                    Some(v) => (v, Type::INT4),
                    None => (&NULL_INT, Type::INT4),
                }
            } else {
                match self.bigints.get(i) {
                    Some(v) => (v, Type::INT8),
                    None => (&NULL_BIGINT, Type::INT8),
                }
            };
            params.push(param);
        }
        params.push((&self.expires_at, Type::INT8));
        params.push((&self.purchase_id, Type::TEXT));
        params.push((&self.amount, Type::TEXT));
        params.push((&self.notes, Type::TEXT));
        params.push((&self.balances[0], Type::INT8));
        params.push((&self.balances[1], Type::INT8));
        params.push((&self.new_balance_life, Type::BOOL));
        params
    }
}

static NULL_INT: Option<i32> = None;
static NULL_BIGINT: Option<i64> = None;

/// The event payload of a grant or top-up: the values written and what the request asked.
fn grant_payload(values: &GrantValues, req: &GrantRequest) -> Value {
    let mut written = Map::new();
    for field in LimitField::ALL {
        written.insert(
            field.column().to_owned(),
            values.additional.get(field).into(),
        );
    }
    written.insert("expires_at".into(), values.expires_at.into());
    written.insert("purchase_id".into(), values.purchase_id.clone().into());
    written.insert(
        "purchase_amount_usd".into(),
        values.purchase_amount.map(|c| c.to_string()).into(),
    );
    written.insert(
        "purchase_notes".into(),
        values.purchase_notes.clone().into(),
    );
    for kind in BalanceKind::ALL {
        written.insert(
            kind.column().to_owned(),
            values.balances[kind as usize].into(),
        );
    }

    let mut asked = Map::new();
    asked.insert("add".into(), req.add.into());
    for field in LimitField::ALL {
        if let Some(amount) = req.amounts.get(field as usize).copied().flatten() {
            asked.insert(field.name().to_owned(), amount.into());
        }
    }
    if req.expiry_given {
        asked.insert("expires_at".into(), req.expiry.into());
    }
    if let Some(amount) = req.amount {
        asked.insert("amount".into(), amount.to_string().into());
    }
    for kind in BalanceKind::ALL {
        if let Some(given) = req.balances[kind as usize] {
            asked.insert(kind.column().to_owned(), given.into());
        }
    }

    let mut payload = Map::new();
    payload.insert("values".into(), Value::Object(written));
    payload.insert("request".into(), Value::Object(asked));
    Value::Object(payload)
}

/// A stored row's values as JSON (for the revoke event).
fn row_values(row: &Replenishment) -> Value {
    let mut values = Map::new();
    for field in LimitField::ALL {
        values.insert(field.column().to_owned(), row.additional.get(field).into());
    }
    values.insert("expires_at".into(), row.expires_at.into());
    values.insert("purchase_id".into(), row.purchase_id.as_deref().into());
    values.insert(
        "purchase_amount_usd".into(),
        row.purchase_amount_usd.as_deref().into(),
    );
    values.insert(
        "purchase_notes".into(),
        row.purchase_notes.as_deref().into(),
    );
    Value::Object(values)
}

/// Typed access to one result row by column position; errors instead of panicking.
pub(crate) trait RowSource {
    /// A `text`/`varchar` column.
    fn text(&self, idx: usize) -> Result<Option<String>, StoreError>;
    /// An `int4` column.
    fn int(&self, idx: usize) -> Result<Option<i32>, StoreError>;
    /// An `int8` column.
    fn bigint(&self, idx: usize) -> Result<Option<i64>, StoreError>;
    /// A `bool` column.
    fn boolean(&self, idx: usize) -> Result<Option<bool>, StoreError>;
}

impl RowSource for Row {
    fn text(&self, idx: usize) -> Result<Option<String>, StoreError> {
        self.try_get(idx).map_err(pg)
    }
    fn int(&self, idx: usize) -> Result<Option<i32>, StoreError> {
        self.try_get(idx).map_err(pg)
    }
    fn bigint(&self, idx: usize) -> Result<Option<i64>, StoreError> {
        self.try_get(idx).map_err(pg)
    }
    fn boolean(&self, idx: usize) -> Result<Option<bool>, StoreError> {
        self.try_get(idx).map_err(pg)
    }
}

fn required<T>(value: Option<T>, column: &str) -> Result<T, StoreError> {
    value.ok_or_else(|| StoreError::Query(format!("unexpected NULL in column {column}")))
}

/// Maps a row selected with [`COLUMNS`] into a `Replenishment` (`INT` amounts widened).
pub(crate) fn to_replenishment(row: &impl RowSource) -> Result<Replenishment, StoreError> {
    let mut additional = Additional::default();
    for (i, field) in LimitField::ALL.into_iter().enumerate() {
        let idx = COL_FIRST_LIMIT + i;
        let value = if is_int_column(field) {
            row.int(idx)?.map(i64::from)
        } else {
            row.bigint(idx)?
        };
        additional.set(field, value);
    }
    Ok(Replenishment {
        bundle_id: required(row.text(COL_BUNDLE)?, "bundle_id")?.into(),
        additional,
        expires_at: row.bigint(COL_EXPIRES_AT)?,
        purchase_id: row.text(COL_PURCHASE_ID)?.map(Into::into),
        purchase_amount_usd: row.text(COL_AMOUNT)?.map(Into::into),
        purchase_notes: row.text(COL_NOTES)?.map(Into::into),
        active: required(row.boolean(COL_ACTIVE)?, "active")?,
        created_at: required(row.bigint(COL_CREATED_AT)?, "created_at")?,
        updated_at: required(row.bigint(COL_UPDATED_AT)?, "updated_at")?,
        balance: row_balance(row)?,
    })
}

/// The balance columns; `None` when the row has no balance of either kind.
fn row_balance(row: &impl RowSource) -> Result<Option<Box<RowBalance>>, StoreError> {
    let granted = [row.bigint(COL_BALANCE)?, row.bigint(COL_BALANCE + 1)?];
    if granted.iter().all(Option::is_none) {
        return Ok(None);
    }
    let num = |idx: usize| row.bigint(idx).map(|v| v.unwrap_or(0));
    Ok(Some(Box::new(RowBalance {
        granted,
        used: [num(COL_BALANCE + 2)?, num(COL_BALANCE + 3)?],
        base: [num(COL_BALANCE + 4)?, num(COL_BALANCE + 5)?],
        ledger_seq: num(COL_BALANCE + 6)?.max(0) as u64,
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credit::Cents;
    use crate::store::schema::substituted;

    #[derive(Clone)]
    enum Cell {
        Null,
        Text(&'static str),
        Int(i32),
        Big(i64),
        Bool(bool),
    }

    struct FakeRow(Vec<Cell>);

    fn wrong(idx: usize) -> StoreError {
        StoreError::Query(format!("wrong type in column {idx}"))
    }

    impl FakeRow {
        /// Column `idx`: NULL, or the value `pick` finds in a cell of the right type.
        fn cell<T>(
            &self,
            idx: usize,
            pick: fn(&Cell) -> Option<T>,
        ) -> Result<Option<T>, StoreError> {
            match self.0.get(idx) {
                Some(Cell::Null) => Ok(None),
                Some(cell) => pick(cell).map(Some).ok_or_else(|| wrong(idx)),
                None => Err(wrong(idx)),
            }
        }
    }

    impl RowSource for FakeRow {
        fn text(&self, idx: usize) -> Result<Option<String>, StoreError> {
            self.cell(idx, |c| match c {
                Cell::Text(t) => Some((*t).to_owned()),
                _ => None,
            })
        }
        fn int(&self, idx: usize) -> Result<Option<i32>, StoreError> {
            self.cell(idx, |c| if let Cell::Int(v) = c { Some(*v) } else { None })
        }
        fn bigint(&self, idx: usize) -> Result<Option<i64>, StoreError> {
            self.cell(idx, |c| if let Cell::Big(v) = c { Some(*v) } else { None })
        }
        fn boolean(&self, idx: usize) -> Result<Option<bool>, StoreError> {
            self.cell(idx, |c| {
                if let Cell::Bool(v) = c {
                    Some(*v)
                } else {
                    None
                }
            })
        }
    }

    fn sample() -> FakeRow {
        FakeRow(vec![
            Cell::Text("b'\"ü"),
            Cell::Int(50),
            Cell::Null,
            Cell::Int(i32::MAX),
            Cell::Big(i64::MAX),
            Cell::Null,
            Cell::Big(7),
            Cell::Int(3),
            Cell::Int(20),
            Cell::Null,
            Cell::Big(90_000),
            Cell::Big(1_700_000_000),
            Cell::Text("pi_1"),
            Cell::Text("10.50"),
            Cell::Null,
            Cell::Bool(true),
            Cell::Big(1),
            Cell::Big(2),
            Cell::Null,
            Cell::Big(1000),
            Cell::Big(70),
            Cell::Big(90),
            Cell::Big(0),
            Cell::Big(40),
            Cell::Big(77),
        ])
    }

    #[test]
    fn column_list_follows_the_limit_field_order() {
        let names: Vec<&str> = COLUMNS.split(',').map(str::trim).collect();
        assert_eq!(names.len(), COL_LAST + 1);
        assert_eq!(names[COL_BALANCE], "requests_balance");
        assert_eq!(names[COL_LAST - 1], "tokens_balance_base");
        assert_eq!(names[COL_LAST], "balance_seq");
        assert_eq!(names[COL_BUNDLE], "bundle_id");
        for (i, field) in LimitField::ALL.into_iter().enumerate() {
            assert_eq!(names[COL_FIRST_LIMIT + i], field.column());
        }
        assert!(names[COL_EXPIRES_AT].contains("expires_at"));
        assert_eq!(names[COL_AMOUNT], "purchase_amount_usd::text");
        assert_eq!(names[COL_ACTIVE], "active");
        assert!(names[COL_UPDATED_AT].contains("updated_at"));
    }

    #[test]
    fn rows_map_into_replenishments() {
        let r = to_replenishment(&sample()).unwrap();
        assert_eq!(&*r.bundle_id, "b'\"ü");
        // requests per day, per month, total; tokens per hour, day, month; concurrent.
        let max = i64::from(i32::MAX);
        let amounts = [
            Some(50),
            None,
            Some(max),
            Some(i64::MAX),
            None,
            Some(7),
            Some(3),
            Some(20),
            None,
            Some(90_000),
        ];
        assert_eq!(r.additional.to_options(), amounts);
        assert_eq!(r.expires_at, Some(1_700_000_000));
        assert_eq!(r.purchase_id.as_deref(), Some("pi_1"));
        assert_eq!(r.purchase_amount_usd.as_deref(), Some("10.50"));
        assert_eq!(r.purchase_notes, None);
        assert!(r.active);
        assert_eq!((r.created_at, r.updated_at), (1, 2));
        let b = r.balance.as_deref().unwrap();
        assert_eq!(
            (b.granted, b.used, b.base, b.ledger_seq),
            ([None, Some(1000)], [70, 90], [0, 40], 77)
        );
        assert_eq!(b.left(BalanceKind::Tokens, 0, 0, 0), Some(950));
    }

    #[test]
    fn bad_rows_are_errors_not_panics() {
        let mut row = sample();
        row.0[COL_ACTIVE] = Cell::Null;
        assert_eq!(
            to_replenishment(&row).unwrap_err(),
            StoreError::Query("unexpected NULL in column active".into())
        );
        let mut row = sample();
        row.0[COL_FIRST_LIMIT] = Cell::Big(1);
        assert!(to_replenishment(&row).is_err());
        let short = FakeRow(sample().0[..5].to_vec());
        assert!(to_replenishment(&short).is_err());
    }

    #[test]
    fn statements_are_substituted_and_numbered() {
        let sql = substituted!(
            Statements,
            "\"billing\".user_quota_replenishment",
            [
                active_rows,
                active_rows_and_bundle,
                list_live,
                list_all,
                insert_placeholder,
                lock_row,
                write_grant,
                insert_event,
                revoke,
                cleanup,
            ]
        );
        assert!(sql
            .write_grant
            .contains("additional_requests_per_day = $5,"));
        assert!(sql.write_grant.contains("additional_max_concurrent = $11,"));
        assert!(sql
            .write_grant
            .contains("additional_tokens_per_minute = $14,"));
        assert!(sql.write_grant.contains("to_timestamp($15::bigint)"));
        assert!(sql
            .write_grant
            .contains("purchase_amount_usd = $17::text::numeric"));
        assert!(sql.write_grant.contains("purchase_notes = $18,"));
        assert!(sql.list_all.ends_with("ORDER BY bundle_id COLLATE \"C\""));
    }

    #[test]
    fn grant_values_are_typed_for_their_columns() {
        let mut req = GrantRequest::default();
        req.amounts[LimitField::TokensPerDay as usize] = Some(i64::MAX);
        req.amounts[LimitField::MaxConcurrent as usize] = Some(4);
        req.amount = Some(Cents(1050));
        let values = req.apply(None, 0).unwrap();
        let cols = ColumnValues::new(&values).unwrap();
        assert_eq!(cols.ints[LimitField::MaxConcurrent as usize], Some(4));
        assert_eq!(
            cols.bigints[LimitField::TokensPerDay as usize],
            Some(i64::MAX)
        );
        assert_eq!(cols.amount.as_deref(), Some("10.50"));
        let params = cols.params();
        assert_eq!(params.len(), LIMIT_FIELDS + 7);
        assert_eq!(params[LimitField::RequestsPerDay as usize].1, Type::INT4);
        assert_eq!(params[LimitField::TokensPerHour as usize].1, Type::INT8);

        req.amounts[LimitField::RequestsPerDay as usize] = Some(i64::from(i32::MAX) + 1);
        let values = req.apply(None, 0).unwrap();
        assert_eq!(
            ColumnValues::new(&values).err().map(|e| e.to_string()),
            Some("ERR REQUESTS_PER_DAY must be at most 2147483647".to_owned())
        );
    }

    #[test]
    fn grant_payload_records_values_and_request() {
        let mut req = GrantRequest {
            add: true,
            amount: Some(Cents(250)),
            purchase_id: Some("pi_\"x".into()),
            ..Default::default()
        };
        req.amounts[LimitField::RequestsPerDay as usize] = Some(5);
        let values = req.apply(None, 0).unwrap();
        let payload = grant_payload(&values, &req);
        assert_eq!(payload["values"]["additional_requests_per_day"], 5);
        assert_eq!(payload["values"]["additional_tokens_per_day"], Value::Null);
        assert_eq!(payload["values"]["purchase_amount_usd"], "2.50");
        assert_eq!(payload["values"]["purchase_id"], "pi_\"x");
        assert_eq!(payload["request"]["add"], true);
        assert_eq!(payload["request"]["requests_per_day"], 5);
        assert_eq!(payload["request"]["amount"], "2.50");
        assert!(payload["request"].get("expires_at").is_none());
    }
}
