//! The schema: validating its configured name, substituting that name into the SQL scripts, and
//! deploying `sql/deploy-control-plane.sql` under an advisory lock.
//!
//! Owns the only place where text is spliced into SQL (the schema name, after validation). Must
//! not hold its own copy of the DDL: `sql/` is the single source, shared with `psql -f`.

use postgres::types::Type;
use postgres::Client;

use super::error::StoreError;

/// The schema name written in the SQL scripts; every occurrence is replaced by the configured one.
pub(crate) const PLACEHOLDER: &str = "control_plane";

/// The deploy script, as shipped.
pub(crate) const DEPLOY_SQL: &str = include_str!("../../sql/deploy-control-plane.sql");

/// The drop script, as shipped (used by tests; operators run it with psql).
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) const DROP_SQL: &str = include_str!("../../sql/drop-control-plane.sql");

/// Longest schema name: the NOTIFY channel `<schema>_quota_changed` must fit PostgreSQL's
/// 63-byte identifier limit, or every write would fail in the trigger.
pub(crate) const MAX_SCHEMA_LEN: usize = 63 - CHANNEL_SUFFIX.len();

const CHANNEL_SUFFIX: &str = "_quota_changed";

/// Advisory lock classes (first key of the two-key form; the second is a hash of the schema, so
/// different schemas in one database do not wait for each other).
const DEPLOY_LOCK_CLASS: i32 = 0x5251_0001;
pub(crate) const CLEANUP_LOCK_CLASS: i32 = 0x5251_0002;

/// Deploy runs DDL and may wait for a lock behind another node's deploy: it gets at least this
/// long, whatever `quota.pg-timeout-ms` says.
const DEPLOY_MIN_TIMEOUT_MS: u64 = 10_000;

/// Checks a schema name: 1 to 49 characters of `a-z`, `0-9`, `_`, not starting with a digit,
/// and not `pg_...` (reserved by PostgreSQL). This is what makes splicing it into SQL safe.
pub(crate) fn validate_schema(name: &str) -> Result<(), StoreError> {
    let mut bytes = name.bytes();
    let first_ok = bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_');
    let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if !first_ok || !rest_ok || name.len() > MAX_SCHEMA_LEN || name.starts_with("pg_") {
        return Err(StoreError::BadConfig(format!(
            "quota.schema must be 1 to {MAX_SCHEMA_LEN} characters of a-z, 0-9 and _, \
             not starting with a digit or pg_"
        )));
    }
    Ok(())
}

/// The SQL text with the configured schema in place of the placeholder. `schema` must have
/// passed [`validate_schema`].
pub(crate) fn substitute(sql: &str, schema: &str) -> String {
    sql.replace(PLACEHOLDER, schema)
}

/// The NOTIFY channel of a schema.
pub(crate) fn channel(schema: &str) -> String {
    format!("{schema}{CHANNEL_SUFFIX}")
}

/// The second advisory-lock key for a schema: FNV-1a of its name, as an `int4`.
pub(crate) fn schema_lock_key(schema: &str) -> i32 {
    let hash = schema.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    // Same bits, as PostgreSQL's signed int4.
    hash as i32
}

/// Applies the deploy script in one transaction, after taking the deploy lock for the schema.
pub(crate) fn deploy(client: &mut Client, schema: &str, timeout_ms: u64) -> Result<(), StoreError> {
    validate_schema(schema)?;
    let sql = substitute(DEPLOY_SQL, schema);
    let ms = timeout_ms.clamp(DEPLOY_MIN_TIMEOUT_MS, super::pool::MAX_TIMEOUT_MS);
    let pg = |e: postgres::Error| StoreError::from_pg(&e);
    let mut tx = client.transaction().map_err(pg)?;
    tx.batch_execute(&format!(
        "SET LOCAL statement_timeout = {ms}; SET LOCAL lock_timeout = {ms}"
    ))
    .map_err(pg)?;
    let key = schema_lock_key(schema);
    tx.query_typed(
        "SELECT pg_advisory_xact_lock($1, $2)",
        &[(&DEPLOY_LOCK_CLASS, Type::INT4), (&key, Type::INT4)],
    )
    .map_err(pg)?;
    tx.batch_execute(&sql).map_err(pg)?;
    tx.commit().map_err(pg)
}

/// Asserts that every statement of a set names `wanted` (the substituted schema's table) and
/// that no placeholder is left in any.
#[cfg(test)]
pub(crate) fn assert_substituted(statements: &[&String], wanted: &str) {
    for text in statements {
        assert!(text.contains(wanted), "{text}");
        assert!(!text.contains(PLACEHOLDER), "{text}");
    }
}

/// Builds the statement set `$set` for the schema `billing`, asserts with
/// [`assert_substituted`] that each named statement names `$wanted`, and gives the set.
#[cfg(test)]
macro_rules! substituted {
    ($set:ident, $wanted:expr, [$($statement:ident),+ $(,)?]) => {{
        let sql = $set::new("billing");
        $crate::store::schema::assert_substituted(&[$(&sql.$statement),+], $wanted);
        sql
    }};
}
#[cfg(test)]
pub(crate) use substituted;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in [
            "control_plane",
            "_x",
            "a",
            "quota_2",
            &"a".repeat(MAX_SCHEMA_LEN),
        ] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        let too_long = "a".repeat(MAX_SCHEMA_LEN + 1);
        for bad in [
            "", "1a", "A", "a-b", "a b", "a\"b", "ä", "pg_x", "a;drop", &too_long,
        ] {
            let err = validate_schema(bad).unwrap_err();
            assert!(
                err.to_string().starts_with("ERR quota.schema must be"),
                "{bad}"
            );
        }
        assert_eq!(MAX_SCHEMA_LEN, 49);
        assert_eq!(channel(&"a".repeat(MAX_SCHEMA_LEN)).len(), 63);
    }

    #[test]
    fn substitution_replaces_every_occurrence() {
        let sql = substitute(DEPLOY_SQL, "billing");
        assert!(!sql.contains(PLACEHOLDER));
        assert!(sql.contains("CREATE SCHEMA IF NOT EXISTS \"billing\";"));
        assert!(sql.contains("'billing_quota_changed'"));
        assert!(sql.contains("\"billing\".user_quota_replenishment_event"));
        // Substituting a name that contains the placeholder is single-pass.
        let again = substitute(DEPLOY_SQL, "control_plane_2");
        assert!(again.contains("'control_plane_2_quota_changed'"));
        assert!(!again.contains("control_plane_2_2"));
        assert_eq!(
            substitute(DROP_SQL, "billing").lines().last(),
            Some("DROP SCHEMA IF EXISTS \"billing\" CASCADE;")
        );
    }

    #[test]
    fn deploy_script_has_no_transaction_control() {
        // The module wraps it in its own transaction; a COMMIT inside would drop the lock early.
        for line in DEPLOY_SQL.lines().map(|l| l.trim().to_ascii_uppercase()) {
            assert!(
                !line.starts_with("BEGIN;") && !line.starts_with("COMMIT"),
                "{line}"
            );
        }
    }

    #[test]
    fn lock_keys_differ_by_schema_and_are_stable() {
        assert_ne!(schema_lock_key("a"), schema_lock_key("b"));
        assert_eq!(
            schema_lock_key("control_plane"),
            schema_lock_key("control_plane")
        );
        // FNV-1a("a") = 0xe40c292c
        assert_eq!(schema_lock_key("a"), 0xe40c_292c_u32 as i32);
    }
}
