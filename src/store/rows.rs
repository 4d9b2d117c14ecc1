//! A row of the replenishment table, both ways: the columns every row-returning statement
//! selects and the mapping of such a row into a `Replenishment` (through `RowSource`, so the
//! mapping is tested without a server), and the values of a grant typed for the columns they
//! are written to (`INT` or `BIGINT`, per limit).
//!
//! Owns the column order and types. Must not hold statements nor run them (`queries` and
//! `project` do), and reads no row by position outside `to_replenishment`.

use postgres::types::{ToSql, Type};
use postgres::Row;

use super::error::StoreError;
use crate::core::credit::{GrantValues, PerKind, Replenishment, RowBalance};
use crate::core::policy::{Additional, LimitField, LIMIT_FIELDS};

/// A statement parameter and its type.
pub(crate) type Param<'a> = (&'a (dyn ToSql + Sync), Type);

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
/// The last column of [`COLUMNS`]: a statement's own columns follow it.
pub(crate) const COL_LAST: usize = COL_BALANCE + 6;

/// Whether a limit is stored in an `INT` column (else `BIGINT`).
fn is_int_column(field: LimitField) -> bool {
    field.column_max() == i64::from(i32::MAX)
}

/// The values of a grant, typed for their columns (parameters $5 onwards of `write_grant`).
pub(crate) struct ColumnValues {
    ints: [Option<i32>; LIMIT_FIELDS],
    bigints: [Option<i64>; LIMIT_FIELDS],
    expires_at: Option<i64>,
    purchase_id: Option<String>,
    amount: Option<String>,
    notes: Option<String>,
    balances: PerKind<Option<i64>>,
    new_balance_life: bool,
}

impl ColumnValues {
    /// Refuses an amount its column cannot hold (replace mode takes amounts as given).
    pub(crate) fn new(values: &GrantValues) -> Result<ColumnValues, StoreError> {
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

    pub(crate) fn params(&self) -> Vec<Param<'_>> {
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
        params.push((&self.balances.requests, Type::INT8));
        params.push((&self.balances.tokens, Type::INT8));
        params.push((&self.new_balance_life, Type::BOOL));
        params
    }
}

static NULL_INT: Option<i32> = None;
static NULL_BIGINT: Option<i64> = None;

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
    let granted = PerKind {
        requests: row.bigint(COL_BALANCE)?,
        tokens: row.bigint(COL_BALANCE + 1)?,
    };
    if granted == PerKind::default() {
        return Ok(None);
    }
    let num = |idx: usize| row.bigint(idx).map(|v| v.unwrap_or(0));
    Ok(Some(Box::new(RowBalance {
        granted,
        used: PerKind {
            requests: num(COL_BALANCE + 2)?,
            tokens: num(COL_BALANCE + 3)?,
        },
        base: PerKind {
            requests: num(COL_BALANCE + 4)?,
            tokens: num(COL_BALANCE + 5)?,
        },
        ledger_seq: num(COL_BALANCE + 6)?.max(0) as u64,
    })))
}

fn pg(err: postgres::Error) -> StoreError {
    StoreError::from_pg(&err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::credit::{BalanceKind, Cents, GrantRequest};

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
            (
                PerKind {
                    requests: None,
                    tokens: Some(1000)
                },
                PerKind {
                    requests: 70,
                    tokens: 90
                },
                PerKind {
                    requests: 0,
                    tokens: 40
                },
                77
            )
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
}
