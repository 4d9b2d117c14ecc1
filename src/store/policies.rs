//! The statements behind named policies (`QUOTA.POLICY` and the policy-cache loads): the
//! `quota_policy` table and its audit rows in the event table.
//!
//! Owns the policy SQL only. Every value goes in as a typed parameter; the schema name, already
//! validated, is the only text spliced in. Must not know the cache or Redis.

use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Row, Transaction};
use serde_json::{Map, Value};

use super::error::StoreError;
use super::schema::substitute;
use crate::core::ids::PolicyId;
use crate::core::policy::{LimitField, Limits, PolicyRecord, LIMIT_FIELDS};

/// The policy table, with the schema placeholder.
const TABLE: &str = "\"control_plane\".quota_policy";
/// The event table, with the schema placeholder.
const EVENTS: &str = "\"control_plane\".user_quota_replenishment_event";

/// The policy columns every row-returning statement selects: the name, the ten limits in
/// `LimitField::ALL` order, then the timestamps.
fn columns() -> String {
    let limits: Vec<&str> = LimitField::ALL.iter().map(|f| f.name()).collect();
    format!(
        "policy_name, {}, floor(extract(epoch FROM created_at))::bigint, \
         floor(extract(epoch FROM updated_at))::bigint",
        limits.join(", ")
    )
}

/// Every policy statement, with the configured schema substituted once.
pub(crate) struct PolicyStatements {
    get: String,
    upsert: String,
    delete: String,
    list: String,
    insert_event: String,
}

impl PolicyStatements {
    /// Builds the statements for `schema` (already validated).
    pub(crate) fn new(schema: &str) -> PolicyStatements {
        let s = |sql: String| substitute(&sql, schema);
        let cols = columns();
        let names: Vec<&str> = LimitField::ALL.iter().map(|f| f.name()).collect();
        let values: Vec<String> = (0..LIMIT_FIELDS).map(|i| format!("${}", i + 4)).collect();
        let updates: Vec<String> = names
            .iter()
            .map(|n| format!("{n} = EXCLUDED.{n}"))
            .collect();
        PolicyStatements {
            get: s(format!(
                "SELECT {cols} FROM {TABLE} WHERE tenant = $1 AND project = $2 AND policy_name = $3"
            )),
            upsert: s(format!(
                "INSERT INTO {TABLE} AS p (tenant, project, policy_name, {}) VALUES ($1, $2, $3, {}) \
                 ON CONFLICT (tenant, project, policy_name) DO UPDATE SET {} RETURNING {cols}",
                names.join(", "),
                values.join(", "),
                updates.join(", "),
            )),
            delete: s(format!(
                "DELETE FROM {TABLE} WHERE tenant = $1 AND project = $2 AND policy_name = $3 \
                 RETURNING {cols}"
            )),
            list: s(format!(
                "SELECT {cols} FROM {TABLE} WHERE tenant = $1 AND project = $2 \
                 ORDER BY policy_name COLLATE \"C\""
            )),
            insert_event: s(format!(
                "INSERT INTO {EVENTS} (tenant, project, user_id, bundle_id, event_type, payload) \
                 VALUES ($1, $2, '*', '*', $3, $4::text::jsonb)"
            )),
        }
    }
}

type Param<'a> = (&'a (dyn ToSql + Sync), Type);

fn pg(err: postgres::Error) -> StoreError {
    StoreError::from_pg(&err)
}

fn identity<'a>(id: &'a PolicyId<'a>) -> Vec<Param<'a>> {
    vec![
        (&id.tenant, Type::TEXT),
        (&id.project, Type::TEXT),
        (&id.name, Type::TEXT),
    ]
}

fn to_record(row: &Row) -> Result<PolicyRecord, StoreError> {
    let name: String = row.try_get(0).map_err(pg)?;
    let mut limits = Limits::default();
    for (i, field) in LimitField::ALL.into_iter().enumerate() {
        let v: Option<i64> = row.try_get(i + 1).map_err(pg)?;
        // A negative limit written by hand in SQL is refused by the column check; treat any
        // that slipped through as zero rather than unlimited.
        limits.set(field, v.map(|v| v.max(0) as u64));
    }
    Ok(PolicyRecord {
        name,
        limits,
        created_at: row.try_get(LIMIT_FIELDS + 1).map_err(pg)?,
        updated_at: row.try_get(LIMIT_FIELDS + 2).map_err(pg)?,
    })
}

/// The audit payload: the policy name and the limits it holds now (or held, when deleted).
fn payload(record: &PolicyRecord) -> String {
    let mut limits = Map::new();
    for field in LimitField::ALL {
        let v = record.limits.get(field).map_or(Value::Null, Value::from);
        limits.insert(field.name().to_owned(), v);
    }
    let mut out = Map::new();
    out.insert("policy".into(), Value::from(record.name.as_str()));
    out.insert("limits".into(), Value::Object(limits));
    Value::Object(out).to_string()
}

/// Appends the audit row of a policy change (`policy_set` or `policy_delete`).
fn record_event(
    client: &mut impl GenericClient,
    sql: &PolicyStatements,
    id: &PolicyId,
    event_type: &str,
    record: &PolicyRecord,
) -> Result<(), StoreError> {
    let text = payload(record);
    client
        .query_typed(
            &sql.insert_event,
            &[
                (&id.tenant, Type::TEXT),
                (&id.project, Type::TEXT),
                (&event_type, Type::TEXT),
                (&text, Type::TEXT),
            ],
        )
        .map_err(pg)?;
    Ok(())
}

/// One policy, or `None` when there is none by that name.
pub(crate) fn get(
    client: &mut impl GenericClient,
    sql: &PolicyStatements,
    id: &PolicyId,
) -> Result<Option<PolicyRecord>, StoreError> {
    client
        .query_typed_opt(&sql.get, &identity(id))
        .map_err(pg)?
        .map(|row| to_record(&row))
        .transpose()
}

/// Creates or replaces a policy and records a `policy_set` event, in `tx` (committed here).
pub(crate) fn set(
    mut tx: Transaction<'_>,
    sql: &PolicyStatements,
    id: &PolicyId,
    limits: &Limits,
) -> Result<PolicyRecord, StoreError> {
    let values: Vec<Option<i64>> = LimitField::ALL
        .iter()
        .map(|f| limits.get(*f).map(|v| i64::try_from(v).unwrap_or(i64::MAX)))
        .collect();
    let mut params = identity(id);
    for v in &values {
        params.push((v, Type::INT8));
    }
    let record = tx
        .query_typed_opt(&sql.upsert, &params)
        .map_err(pg)?
        .ok_or_else(|| StoreError::Query("the policy row was not written".into()))
        .and_then(|row| to_record(&row))?;
    record_event(&mut tx, sql, id, "policy_set", &record)?;
    tx.commit().map_err(pg)?;
    Ok(record)
}

/// Deletes a policy (recording a `policy_delete` event); whether it existed.
pub(crate) fn delete(
    mut tx: Transaction<'_>,
    sql: &PolicyStatements,
    id: &PolicyId,
) -> Result<bool, StoreError> {
    let deleted = tx
        .query_typed_opt(&sql.delete, &identity(id))
        .map_err(pg)?
        .map(|row| to_record(&row))
        .transpose()?;
    if let Some(record) = &deleted {
        record_event(&mut tx, sql, id, "policy_delete", record)?;
    }
    tx.commit().map_err(pg)?;
    Ok(deleted.is_some())
}

/// Every policy of (tenant, project), by name.
pub(crate) fn list(
    client: &mut impl GenericClient,
    sql: &PolicyStatements,
    tenant: &str,
    project: &str,
) -> Result<Vec<PolicyRecord>, StoreError> {
    let rows = client
        .query_typed(&sql.list, &[(&tenant, Type::TEXT), (&project, Type::TEXT)])
        .map_err(pg)?;
    rows.iter().map(to_record).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::substituted;

    #[test]
    fn statements_are_substituted() {
        let sql = substituted!(
            PolicyStatements,
            "\"billing\".",
            [get, upsert, delete, list, insert_event]
        );
        assert!(sql.upsert.contains("$13"));
        assert!(!sql.upsert.contains("$14"));
    }

    #[test]
    fn payload_names_the_policy_and_its_limits() {
        let mut limits = Limits::default();
        limits.set(LimitField::RequestsPerDay, Some(5));
        let record = PolicyRecord {
            name: "pro".into(),
            limits,
            created_at: 1,
            updated_at: 2,
        };
        let v: Value = serde_json::from_str(&payload(&record)).unwrap();
        assert_eq!(v["policy"], "pro");
        assert_eq!(v["limits"]["requests_per_day"], 5);
        assert!(v["limits"]["max_concurrent"].is_null());
    }
}
