//! Replenishments (credits) and the rules around them: which one applies to a bundle, what a
//! grant or a top-up turns a row into, and money as exact cents.

use std::fmt;

use super::ids::ANY_BUNDLE;
use super::policy::{Additional, LimitField, LIMIT_FIELDS};
use super::Millis;

/// One stored replenishment row of a user (the identity of the user is known from context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Replenishment {
    // Text fields are boxed `str`s rather than `String`s: every cached user holds these rows,
    // and 8 bytes less per field keep one row in a smaller allocation class.
    pub bundle_id: Box<str>,
    pub additional: Additional,
    /// Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
    pub purchase_id: Option<Box<str>>,
    /// Exact decimal text with two places, e.g. `"10.00"`.
    pub purchase_amount_usd: Option<Box<str>>,
    pub purchase_notes: Option<Box<str>>,
    pub active: bool,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds.
    pub updated_at: i64,
    /// The prepaid balances, boxed: most rows have none and pay 8 bytes for it.
    pub balance: Option<Box<RowBalance>>,
}

/// The prepaid balances of a credit row (`REQUESTS_BALANCE`, `TOKENS_BALANCE`) and the debits
/// flushed against them, as stored in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RowBalance {
    /// Granted in the row's current life, per kind; `None` = no balance of that kind.
    pub granted: PerKind<Option<i64>>,
    /// Every debit ever flushed against the row, per kind (only grows).
    pub used: PerKind<i64>,
    /// `used` when the current life began.
    pub base: PerKind<i64>,
    /// The sequence of the last flush batch that debited the row when it was read (0: none,
    /// or not known): tells whether `used` already counts a batch its holder has sent and
    /// not had acknowledged yet (see `ledger::counted_twice`).
    pub ledger_seq: u64,
}

/// One value per kind of balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct PerKind<T> {
    pub requests: T,
    pub tokens: T,
}

impl<T: Copy> PerKind<T> {
    /// The value of kind `kind`.
    pub(crate) fn get(&self, kind: BalanceKind) -> T {
        match kind {
            BalanceKind::Requests => self.requests,
            BalanceKind::Tokens => self.tokens,
        }
    }
}

impl<T> PerKind<T> {
    /// The value of kind `kind`, to change it.
    pub(crate) fn get_mut(&mut self, kind: BalanceKind) -> &mut T {
        match kind {
            BalanceKind::Requests => &mut self.requests,
            BalanceKind::Tokens => &mut self.tokens,
        }
    }

    /// `f` of each value, kind by kind.
    pub(crate) fn map<U>(self, mut f: impl FnMut(T) -> U) -> PerKind<U> {
        PerKind {
            requests: f(self.requests),
            tokens: f(self.tokens),
        }
    }

    /// `f` of this value and `other`'s, kind by kind (e.g. `a.zip_with(b, i64::saturating_add)`).
    pub(crate) fn zip_with<U, V>(
        self,
        other: PerKind<U>,
        mut f: impl FnMut(T, U) -> V,
    ) -> PerKind<V> {
        PerKind {
            requests: f(self.requests, other.requests),
            tokens: f(self.tokens, other.tokens),
        }
    }
}

/// The two kinds of balance. The discriminants are the kinds' order (and bit positions) in
/// the encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BalanceKind {
    Requests = 0,
    Tokens = 1,
}

impl BalanceKind {
    /// Both kinds, in encoding order.
    pub(crate) const ALL: [BalanceKind; 2] = [BalanceKind::Requests, BalanceKind::Tokens];

    /// The command option keyword.
    pub(crate) fn keyword(self) -> &'static str {
        match self {
            BalanceKind::Requests => "REQUESTS_BALANCE",
            BalanceKind::Tokens => "TOKENS_BALANCE",
        }
    }

    /// The column (and record field) of the granted amount.
    pub(crate) const fn column(self) -> &'static str {
        match self {
            BalanceKind::Requests => "requests_balance",
            BalanceKind::Tokens => "tokens_balance",
        }
    }
}

impl RowBalance {
    /// What is left of kind `kind` after every debit: the granted amount minus the debits of
    /// the current life, counting as flushed the larger of what this row says (less `twice`,
    /// what it counts that is also in `unflushed`) and `floor` (the used total the flushing
    /// node last saw committed), minus `unflushed`. `None` without a balance of that kind. May
    /// be negative (see the README's overdraw rule).
    pub(crate) fn left(
        &self,
        kind: BalanceKind,
        floor: u64,
        unflushed: i64,
        twice: i64,
    ) -> Option<i64> {
        let granted = self.granted.get(kind)?;
        let used = self
            .used
            .get(kind)
            .saturating_sub(twice)
            .max(i64::try_from(floor).unwrap_or(i64::MAX));
        let spent = used.saturating_sub(self.base.get(kind)).max(0);
        Some(granted.saturating_sub(spent).saturating_sub(unflushed))
    }

    /// What was granted of kind `kind` in the row's current life; `None` without that balance.
    pub(crate) fn grant(&self, kind: BalanceKind) -> Option<i64> {
        self.granted.get(kind)
    }

    /// Whether the row has a balance of kind `kind`.
    pub(crate) fn has(&self, kind: BalanceKind) -> bool {
        self.grant(kind).is_some()
    }

    /// The flushed debits of the current life (`used - base`), per kind.
    pub(crate) fn debited(&self, kind: BalanceKind) -> i64 {
        self.used
            .get(kind)
            .saturating_sub(self.base.get(kind))
            .max(0)
    }
}

impl Replenishment {
    /// Active and not expired at `now`.
    pub(crate) fn is_live(&self, now: Millis) -> bool {
        self.active
            && self
                .expires_at
                .is_none_or(|at| at.saturating_mul(1000) > now)
    }
}

/// Where the credits of an admission came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CreditSource {
    /// The row of the requested bundle.
    Bundle,
    /// The `'*'` row.
    Global,
    /// The user has no live credits.
    None,
    /// Not cached yet; decided on the base policy while they load.
    Pending,
    /// PostgreSQL could not be reached; decided on the base policy.
    Unavailable,
}

impl CreditSource {
    /// The `retry_after` of a denial decided on these credits, given the one the base policy
    /// alone gives. While the user's credits are still loading (`Pending`), the next call is
    /// decided on them and may admit, so the wait is at most [`PENDING_RETRY_AFTER_S`], even
    /// where the base policy alone would never reset (-1).
    pub(crate) fn denial_retry_after(self, decided: i64) -> i64 {
        match self {
            CreditSource::Pending if decided >= 0 => decided.min(PENDING_RETRY_AFTER_S),
            CreditSource::Pending => PENDING_RETRY_AFTER_S,
            _ => decided,
        }
    }

    /// `denial_retry_after` in ms (`retry_after_ms`).
    pub(crate) fn denial_retry_after_ms(self, decided: i64) -> i64 {
        let most = PENDING_RETRY_AFTER_S * 1000;
        match self {
            CreditSource::Pending if decided >= 0 => decided.min(most),
            CreditSource::Pending => most,
            _ => decided,
        }
    }
}

/// The longest `retry_after` of a denial decided while the user's credits load (a load takes
/// milliseconds; a slow PostgreSQL answers within `quota.pg-timeout-ms` or is `unavailable`).
pub(crate) const PENDING_RETRY_AFTER_S: i64 = 1;

/// The row that applies to `bundle` at `now`: the live row of that bundle, else the live `'*'`
/// row, else none. One row applies, never two combined.
pub(crate) fn select_credit<'a>(
    rows: &'a [Replenishment],
    bundle: &str,
    now: Millis,
) -> Option<(&'a Replenishment, CreditSource)> {
    let live = |id: &str| rows.iter().find(|r| &*r.bundle_id == id && r.is_live(now));
    if let Some(row) = live(bundle) {
        let source = if bundle == ANY_BUNDLE {
            CreditSource::Global
        } else {
            CreditSource::Bundle
        };
        return Some((row, source));
    }
    live(ANY_BUNDLE).map(|row| (row, CreditSource::Global))
}

/// Money in whole cents; parsed from and printed as a decimal string, never a float.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Cents(pub i64);

/// The largest amount `NUMERIC(10,2)` holds: 99,999,999.99.
pub(crate) const MAX_CENTS: i64 = 9_999_999_999;

impl Cents {
    /// Parses `"10"`, `"10.5"` or `"10.50"` (non-negative, at most two decimals).
    pub(crate) fn parse(text: &str) -> Option<Cents> {
        let (whole, frac) = match text.split_once('.') {
            Some((w, f)) => (w, f),
            None => (text, ""),
        };
        if whole.is_empty()
            || whole.len() > 8
            || frac.len() > 2
            || (text.contains('.') && frac.is_empty())
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !frac.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let whole: i64 = whole.parse().ok()?;
        let mut frac_cents: i64 = if frac.is_empty() {
            0
        } else {
            frac.parse().ok()?
        };
        if frac.len() == 1 {
            frac_cents *= 10;
        }
        Some(Cents(whole * 100 + frac_cents))
    }

    /// Adds, refusing amounts the column cannot hold.
    pub(crate) fn checked_add(self, other: Cents) -> Option<Cents> {
        self.0
            .checked_add(other.0)
            .filter(|c| *c <= MAX_CENTS)
            .map(Cents)
    }
}

impl fmt::Display for Cents {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:02}", self.0 / 100, self.0 % 100)
    }
}

/// A parsed `QUOTA.GRANT` (without the identity).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct GrantRequest {
    pub amounts: [Option<i64>; LIMIT_FIELDS],
    pub expiry: Option<i64>,
    pub expiry_given: bool,
    pub purchase_id: Option<String>,
    pub amount: Option<Cents>,
    pub notes: Option<String>,
    pub add: bool,
    /// `REQUESTS_BALANCE`, `TOKENS_BALANCE`.
    pub balances: PerKind<Option<i64>>,
}

/// The values a grant writes into the row (it is always active afterwards).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct GrantValues {
    pub additional: Additional,
    pub expires_at: Option<i64>,
    pub purchase_id: Option<String>,
    pub purchase_amount: Option<Cents>,
    pub purchase_notes: Option<String>,
    /// The balances granted in the row's life after the grant.
    pub balances: PerKind<Option<i64>>,
    /// A new life of the balance begins (replace, or `ADD` to a missing, revoked or expired
    /// row): what was debited before no longer counts against it.
    pub new_balance_life: bool,
}

/// Why a grant cannot be applied; `Display` is the wire error text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum GrantError {
    Overflow(LimitField),
    BalanceOverflow(BalanceKind),
    AmountOverflow,
}

impl fmt::Display for GrantError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GrantError::Overflow(field) => write!(
                f,
                "ERR ADD would take {} above {}",
                field.keyword(),
                field.column_max()
            ),
            GrantError::BalanceOverflow(kind) => {
                write!(
                    f,
                    "ERR ADD would take {} above {}",
                    kind.keyword(),
                    i64::MAX
                )
            }
            GrantError::AmountOverflow => {
                f.write_str("ERR ADD would take AMOUNT above 99999999.99")
            }
        }
    }
}

impl GrantRequest {
    /// What the row becomes. Replace mode: the given amounts (absent = NULL), the given expiry
    /// (absent = never), the given purchase fields. `ADD`: given amounts are added to the current
    /// live row's (absent ones kept), the expiry is kept unless given, the amount of money adds up;
    /// a missing, revoked or expired row is topped up from zero with expiry never unless given.
    pub(crate) fn apply(
        &self,
        current: Option<&Replenishment>,
        now: Millis,
    ) -> Result<GrantValues, GrantError> {
        if !self.add {
            return Ok(GrantValues {
                additional: Additional::from_options(self.amounts),
                expires_at: self.expiry,
                purchase_id: self.purchase_id.clone(),
                purchase_amount: self.amount,
                purchase_notes: self.notes.clone(),
                balances: self.balances,
                new_balance_life: true,
            });
        }
        let base = current.filter(|row| row.is_live(now));
        let mut additional = base.map(|r| r.additional).unwrap_or_default();
        for field in LimitField::ALL {
            if let Some(given) = self.amounts[field as usize] {
                let sum = additional
                    .get(field)
                    .unwrap_or(0)
                    .max(0)
                    .checked_add(given)
                    .filter(|v| *v <= field.column_max())
                    .ok_or(GrantError::Overflow(field))?;
                additional.set(field, Some(sum));
            }
        }
        let mut balances = base
            .and_then(|r| r.balance.as_ref())
            .map_or(PerKind::default(), |b| b.granted);
        for kind in BalanceKind::ALL {
            if let Some(given) = self.balances.get(kind) {
                let sum = balances
                    .get(kind)
                    .unwrap_or(0)
                    .max(0)
                    .checked_add(given)
                    .ok_or(GrantError::BalanceOverflow(kind))?;
                *balances.get_mut(kind) = Some(sum);
            }
        }
        let expires_at = if self.expiry_given {
            self.expiry
        } else {
            base.and_then(|r| r.expires_at)
        };
        let current_amount = base
            .and_then(|r| r.purchase_amount_usd.as_deref())
            .and_then(Cents::parse);
        let purchase_amount = match (current_amount, self.amount) {
            (Some(a), Some(b)) => Some(a.checked_add(b).ok_or(GrantError::AmountOverflow)?),
            (a, b) => b.or(a),
        };
        Ok(GrantValues {
            additional,
            expires_at,
            purchase_id: self
                .purchase_id
                .clone()
                .or_else(|| base.and_then(|r| r.purchase_id.as_deref().map(str::to_owned))),
            purchase_amount,
            purchase_notes: self
                .notes
                .clone()
                .or_else(|| base.and_then(|r| r.purchase_notes.as_deref().map(str::to_owned))),
            balances,
            new_balance_life: base.is_none(),
        })
    }
}

#[cfg(test)]
impl Replenishment {
    /// A row of `bundle` that adds `rpd` requests per day and nothing else (unit tests).
    pub(crate) fn with_requests_per_day(
        bundle: &str,
        rpd: i64,
        expires_at: Option<i64>,
        active: bool,
    ) -> Replenishment {
        let mut additional = Additional::default();
        additional.set(LimitField::RequestsPerDay, Some(rpd));
        Replenishment {
            bundle_id: bundle.into(),
            additional,
            expires_at,
            purchase_id: None,
            purchase_amount_usd: None,
            purchase_notes: None,
            active,
            created_at: 0,
            updated_at: 0,
            balance: None,
        }
    }
}

#[cfg(test)]
mod tests;
