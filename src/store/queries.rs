//! The statements behind cache loads, `QUOTA.GRANT`, `REVOKE`, `LIST` and `CLEANUP`, the
//! transactions around them, and the event payloads they record. A row's columns, read and
//! written, are `rows`.
//!
//! Owns all application SQL. Every value goes in as a typed parameter (one round trip per
//! statement); the schema name, already validated, is the only text spliced in. Money goes in
//! and out as decimal text, timestamps as integer Unix seconds: never a float. Must not decide
//! what a grant writes (that is `GrantRequest::apply` in the core) nor open connections.

use std::collections::BTreeSet;

use postgres::types::Type;
use postgres::{GenericClient, Transaction};
use serde_json::{Map, Value};

use super::error::{CleanupOutcome, GrantOutcome, RevokeOutcome, StoreError};
use super::rows::{to_replenishment, ColumnValues, Param, COLUMNS, COL_LAST};
use super::schema::{schema_lock_key, substitute, CLEANUP_LOCK_CLASS};
use crate::core::credit::{BalanceKind, GrantRequest, GrantValues, Replenishment};
use crate::core::ids::UserId;
use crate::core::policy::{LimitField, LIMIT_FIELDS};
use crate::core::Millis;

/// The replenishment table, with the schema placeholder.
const TABLE: &str = "\"control_plane\".user_quota_replenishment";
/// The event table, with the schema placeholder.
const EVENTS: &str = "\"control_plane\".user_quota_replenishment_event";

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
        written.insert(kind.column().to_owned(), values.balances.get(kind).into());
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
        if let Some(given) = req.balances.get(kind) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credit::Cents;
    use crate::store::schema::substituted;

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
