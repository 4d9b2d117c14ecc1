//! Reads over a whole project rather than one user: the live credits of every user, a page at a
//! time (`QUOTA.FIND`), and the users who used the most over a range of hours in the usage
//! ledger (`QUOTA.TOP`).
//!
//! Pages are keyset pages: each starts strictly after the last row of the one before, in an
//! order an index gives (`user_quota_replenishment_find_idx`, `..._find_expiry_idx`), never at an
//! offset, so a row that stays live while a client pages is read exactly once whatever is
//! granted, revoked or expires meanwhile, and a page costs the same however deep it is. Ids sort
//! in byte order (`COLLATE "C"`), whatever the database's collation. Must not encode cursors
//! (the command does) nor decide anything.

use postgres::types::{ToSql, Type};
use postgres::{GenericClient, Row};

use super::error::StoreError;
use super::rows::{to_replenishment, COLUMNS};
use super::schema::substitute;
use crate::core::credit::Replenishment;

/// The replenishment table, with the schema placeholder.
const TABLE: &str = "\"control_plane\".user_quota_replenishment";
/// The usage ledger, with the schema placeholder.
const USAGE: &str = "\"control_plane\".quota_usage_hourly";

/// The exact expiry in microseconds since the epoch (on every PostgreSQL version: before 14
/// `extract` answers a float, exact for the microseconds of one minute but not of an epoch).
const EXPIRY_MICROS: &str = "floor(extract(epoch FROM expires_at))::bigint * 1000000 \
    + extract(microseconds FROM expires_at)::bigint % 1000000";

/// Where a page of `QUOTA.FIND` starts: strictly after this row in the listing's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FindAfter {
    /// The row's exact expiry (microseconds since the epoch) when the listing is by expiry.
    pub expires_us: Option<i64>,
    pub user: String,
    pub bundle: String,
}

/// One page of `QUOTA.FIND` to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FindQuery {
    pub tenant: String,
    pub project: String,
    /// `EXPIRES_WITHIN`: only rows that expire within this many seconds of the database's
    /// clock, soonest first; `None`: every live row, by user and bundle.
    pub within_s: Option<i64>,
    /// `None` for the first page.
    pub after: Option<FindAfter>,
    /// Rows in the page.
    pub count: u32,
}

/// A live credit row with the user it belongs to.
#[derive(Debug, Clone)]
pub(crate) struct FoundCredit {
    pub user: String,
    pub row: Replenishment,
    /// The exact expiry (microseconds since the epoch), for the next page's start.
    pub expires_us: Option<i64>,
}

/// A page of `QUOTA.FIND`: its rows and, when more follow, where the next page starts.
#[derive(Debug, Clone)]
pub(crate) struct FindPage {
    pub rows: Vec<FoundCredit>,
    pub next: Option<FindAfter>,
}

/// One user of `QUOTA.TOP`: the totals over the hours asked, every bundle added up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopUser {
    pub user: String,
    pub requests: i64,
    pub tokens: i64,
}

/// What `QUOTA.TOP` ranks by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TopBy {
    Requests,
    Tokens,
}

/// One `QUOTA.TOP` to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TopQuery {
    pub tenant: String,
    pub project: String,
    pub by: TopBy,
    /// The hours `from <= hour < to`, Unix seconds.
    pub from: i64,
    pub to: i64,
    pub count: u32,
}

/// The project statements, with the configured schema substituted once.
pub(crate) struct ProjectStatements {
    pub(super) find_first: String,
    pub(super) find_after: String,
    pub(super) expiring_first: String,
    pub(super) expiring_after: String,
    pub(super) top_requests: String,
    pub(super) top_tokens: String,
}

/// A sum of `BIGINT`s held to the type's range (`sum` answers a `numeric`).
fn sum(column: &str) -> String {
    format!("LEAST(GREATEST(sum({column}), -9223372036854775808), 9223372036854775807)::bigint")
}

impl ProjectStatements {
    /// Builds the statements for `schema` (already validated).
    pub(crate) fn new(schema: &str) -> ProjectStatements {
        let s = |sql: String| substitute(&sql, schema);
        let select = format!("SELECT {COLUMNS}, user_id, {EXPIRY_MICROS} FROM {TABLE}");
        let project = "tenant = $1 AND project = $2 AND active";
        let by_user = "ORDER BY user_id COLLATE \"C\", bundle_id COLLATE \"C\"";
        let by_expiry = "ORDER BY expires_at, user_id COLLATE \"C\", bundle_id COLLATE \"C\"";
        let live = "(expires_at IS NULL OR expires_at > now())";
        let expiring = "expires_at IS NOT NULL AND expires_at > now() \
                        AND expires_at <= now() + $3::bigint * interval '1 second'";
        let top = |by: &str| {
            s(format!(
                "SELECT user_id, {} AS requests, {} AS tokens FROM {USAGE} \
                 WHERE tenant = $1 AND project = $2 \
                 AND hour >= to_timestamp($3::bigint) AND hour < to_timestamp($4::bigint) \
                 GROUP BY user_id ORDER BY {by} DESC, user_id COLLATE \"C\" LIMIT $5",
                sum("requests"),
                sum("tokens"),
            ))
        };
        ProjectStatements {
            find_first: s(format!(
                "{select} WHERE {project} AND {live} {by_user} LIMIT $3"
            )),
            find_after: s(format!(
                "{select} WHERE {project} AND {live} \
                 AND (user_id COLLATE \"C\", bundle_id COLLATE \"C\") > ($3::text, $4::text) \
                 {by_user} LIMIT $5"
            )),
            expiring_first: s(format!(
                "{select} WHERE {project} AND {expiring} {by_expiry} LIMIT $4"
            )),
            // The start as seconds and microseconds: each is exact through `to_timestamp`'s
            // float and `interval * float` (an epoch in microseconds would not be).
            expiring_after: s(format!(
                "{select} WHERE {project} AND {expiring} \
                 AND (expires_at, user_id COLLATE \"C\", bundle_id COLLATE \"C\") > \
                 (to_timestamp($4::bigint) + $5::bigint * interval '1 microsecond', \
                 $6::text, $7::text) {by_expiry} LIMIT $8"
            )),
            top_requests: top("requests"),
            top_tokens: top("tokens"),
        }
    }
}

fn pg(err: postgres::Error) -> StoreError {
    StoreError::from_pg(&err)
}

/// A found row: the record columns, then the user and the exact expiry.
fn to_found(row: &Row) -> Result<FoundCredit, StoreError> {
    let at = row
        .len()
        .checked_sub(2)
        .ok_or_else(|| StoreError::Query("a found row without its user".into()))?;
    let user: String = row.try_get(at).map_err(pg)?;
    let expires_us: Option<i64> = row.try_get(at + 1).map_err(pg)?;
    Ok(FoundCredit {
        user,
        row: to_replenishment(row)?,
        expires_us,
    })
}

/// `QUOTA.FIND`: one page of the project's live rows (see the module doc). Reads one row
/// more than the page holds, to know whether another page follows.
pub(crate) fn find(
    client: &mut impl GenericClient,
    sql: &ProjectStatements,
    q: &FindQuery,
) -> Result<FindPage, StoreError> {
    let limit = i64::from(q.count) + 1;
    let (tenant, project) = (&q.tenant, &q.project);
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> =
        vec![(tenant, Type::TEXT), (project, Type::TEXT)];
    let seconds;
    let micros;
    let text = match (&q.within_s, &q.after) {
        (None, None) => &sql.find_first,
        (None, Some(after)) => {
            params.push((&after.user, Type::TEXT));
            params.push((&after.bundle, Type::TEXT));
            &sql.find_after
        }
        (Some(within), None) => {
            params.push((within, Type::INT8));
            &sql.expiring_first
        }
        (Some(within), Some(after)) => {
            let at = after.expires_us.ok_or_else(|| {
                StoreError::Query("a page by expiry must start after an expiry".into())
            })?;
            seconds = at.div_euclid(1_000_000);
            micros = at.rem_euclid(1_000_000);
            params.push((within, Type::INT8));
            params.push((&seconds, Type::INT8));
            params.push((&micros, Type::INT8));
            params.push((&after.user, Type::TEXT));
            params.push((&after.bundle, Type::TEXT));
            &sql.expiring_after
        }
    };
    params.push((&limit, Type::INT8));
    let rows = client.query_typed(text, &params).map_err(pg)?;
    let mut found = rows.iter().map(to_found).collect::<Result<Vec<_>, _>>()?;
    let more = found.len() > q.count as usize;
    found.truncate(q.count as usize);
    let next = match found.last() {
        Some(last) if more => Some(FindAfter {
            expires_us: q.within_s.and(last.expires_us),
            user: last.user.clone(),
            bundle: last.row.bundle_id.to_string(),
        }),
        _ => None,
    };
    Ok(FindPage { rows: found, next })
}

/// `QUOTA.TOP`: the `count` users with the most requests (or tokens) in the hours
/// `from <= hour < to`, most first, ties by user id (byte order).
pub(crate) fn top(
    client: &mut impl GenericClient,
    sql: &ProjectStatements,
    q: &TopQuery,
) -> Result<Vec<TopUser>, StoreError> {
    let text = match q.by {
        TopBy::Requests => &sql.top_requests,
        TopBy::Tokens => &sql.top_tokens,
    };
    let limit = i64::from(q.count);
    let rows = client
        .query_typed(
            text,
            &[
                (&q.tenant, Type::TEXT),
                (&q.project, Type::TEXT),
                (&q.from, Type::INT8),
                (&q.to, Type::INT8),
                (&limit, Type::INT8),
            ],
        )
        .map_err(pg)?;
    rows.iter()
        .map(|row| {
            Ok(TopUser {
                user: row.try_get(0).map_err(pg)?,
                requests: row.try_get(1).map_err(pg)?,
                tokens: row.try_get(2).map_err(pg)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::schema::substituted;

    #[test]
    fn statements_are_substituted_and_numbered() {
        let sql = substituted!(
            ProjectStatements,
            "\"billing\".",
            [
                find_first,
                find_after,
                expiring_first,
                expiring_after,
                top_requests,
                top_tokens
            ]
        );
        assert!(sql.find_first.ends_with("LIMIT $3"));
        assert!(sql.find_after.ends_with("LIMIT $5"));
        assert!(sql.expiring_first.ends_with("LIMIT $4"));
        assert!(sql.expiring_after.ends_with("LIMIT $8"));
        assert!(sql
            .top_tokens
            .contains("ORDER BY tokens DESC, user_id COLLATE \"C\""));
    }
}
