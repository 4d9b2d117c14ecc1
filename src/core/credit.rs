//! Replenishments (credits) and the rules around them: which one applies to a bundle, what a
//! grant or a top-up turns a row into, and money as exact cents.

use std::fmt;

use super::ids::ANY_BUNDLE;
use super::policy::{Additional, LimitField, LIMIT_FIELDS};
use super::varint;
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

/// At most how long an account may use its remembered credit before asking the cache again
/// (which also keeps the cache entry's least-recently-used time current). A memo never outlives
/// the cache entry's freshness either (`quota.cache-ttl-ms`, 10 s by default), so this only
/// matters with a longer TTL: users who send a request every few seconds keep using their memo
/// instead of searching the cache (a lock and several lines not in the CPU's caches) each time.
pub(crate) const MEMO_MAX_MS: Millis = 10_000;

/// The credit an account's admissions use, remembered next to the account's usage so the next
/// admission of the same (user, bundle) need not look the user up in the credits cache.
///
/// It holds what `select_credit` chose (amounts, source and the row's balance: its granted,
/// used and base per kind, as the row had them), which account key it was chosen
/// for, the cache epoch it was read at and until when it holds: no later than the cache entry
/// stays fresh, the next expiry among the user's rows and `MEMO_MAX_MS` after it was read. Any
/// change to the cache moves the epoch on and so retires every memo. A memo read through
/// another key name (the value was renamed: another user or bundle) is ignored.
///
/// 32 bytes, kept inline next to every account: the amounts that add something (above zero;
/// one at zero or below adds nothing, exactly as an absent one) are kept as varints in
/// `MEMO_AMOUNT_BYTES` bytes, the balance after them. A credit whose amounts need more is not
/// remembered (`new` gives none): its admissions look it up in the cache each time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CreditMemo {
    /// Until when it holds, in whole seconds since the epoch (rounded down: a memo never holds
    /// past its time, and lives at most `MEMO_MAX_MS`).
    until_s: u32,
    /// `account_tag` of the account key the credit was chosen for.
    account: u32,
    /// The low 32 bits of the cache epoch: a memo lives at most `MEMO_MAX_MS`, far less than
    /// 2^32 cache changes take, so it cannot meet the same low bits of another epoch.
    epoch: u32,
    /// Bit `i` set: field `i` of `LimitField::ALL` adds an amount, the next varint in
    /// `amounts`; the source in the bits from `MEMO_SOURCE_SHIFT` (never 0, so that the memo
    /// and `Option` of it are 32 bytes); `MEMO_BALANCE`.
    present: std::num::NonZeroU16,
    amounts: [u8; MEMO_AMOUNT_BYTES],
}

/// Bytes of varints a memo keeps its amounts in: three amounts up to 2^35 (34 billion) each,
/// or more smaller ones.
const MEMO_AMOUNT_BYTES: usize = 18;

/// A 32-bit hash of an account key name, so that a memo knows which account it belongs to
/// without keeping the name (which may be long). Two names sharing a tag would also need a
/// `RENAME` from one to the other within `MEMO_MAX_MS` for a memo to be misapplied.
fn account_tag(key: &[u8]) -> u32 {
    const SEEDS: [u64; 4] = [
        0x243f_6a88_85a3_08d3,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    let h = ahash::RandomState::with_seeds(SEEDS[0], SEEDS[1], SEEDS[2], SEEDS[3]).hash_one(key);
    (h ^ (h >> 32)) as u32
}

impl CreditMemo {
    /// Remembers `chosen` (what `select_credit` picked from `rows` at `now` for the account
    /// whose key is `account`, as amounts and source), read from a fresh cache entry at
    /// `epoch` that stays fresh until `fresh_until`. None when the amounts do not fit a memo.
    pub(crate) fn new(
        account: &[u8],
        chosen: (Option<Additional>, CreditSource),
        balance: Option<&RowBalance>,
        rows: &[Replenishment],
        epoch: u64,
        fresh_until: Millis,
        now: Millis,
    ) -> Option<CreditMemo> {
        let mut present = 0u16;
        let mut amounts = [0u8; MEMO_AMOUNT_BYTES];
        let mut at = 0;
        if let Some(add) = chosen.0 {
            for (bit, v) in add.to_options().into_iter().enumerate() {
                let Some(v) = v.filter(|v| *v > 0) else {
                    continue;
                };
                put_varint(&mut amounts, &mut at, v as u64)?;
                present |= 1 << bit;
            }
        }
        if let Some(b) = balance {
            // A mask of the kinds it has, then each kind's granted, used and base.
            present |= MEMO_BALANCE;
            let mask = BalanceKind::ALL.iter().fold(0u8, |m, k| {
                m | (u8::from(b.granted.get(*k).is_some()) << (*k as u8))
            });
            put_varint(&mut amounts, &mut at, u64::from(mask))?;
            for k in BalanceKind::ALL {
                let Some(granted) = b.granted.get(k) else {
                    continue;
                };
                for v in [granted, b.used.get(k), b.base.get(k)] {
                    put_varint(&mut amounts, &mut at, varint::zigzag(v))?;
                }
            }
        }
        let until = rows
            .iter()
            .filter_map(|r| r.expires_at)
            .map(|at| at.saturating_mul(1000))
            .filter(|at| *at > now)
            .fold(
                fresh_until.min(now.saturating_add(MEMO_MAX_MS)),
                Millis::min,
            );
        // Past 2106 (u32 seconds) nothing is remembered.
        let until_s = u32::try_from(until.div_euclid(1000)).ok()?;
        Some(CreditMemo {
            until_s,
            account: account_tag(account),
            epoch: epoch as u32,
            present: std::num::NonZeroU16::new(
                present | (source_bits(chosen.1) << MEMO_SOURCE_SHIFT),
            )?,
            amounts,
        })
    }

    /// The remembered credit (amounts, source and the row's balance), if it was chosen for
    /// the account whose key is `account` and still holds at `now` with the cache at `epoch`.
    /// A clock set back (by more than `until` is ahead of it) retires it too.
    #[inline]
    pub(crate) fn get(&self, account: &[u8], epoch: u64, now: Millis) -> Option<Remembered> {
        let until = Millis::from(self.until_s) * 1000;
        if self.epoch != epoch as u32
            || now >= until
            || now.saturating_add(MEMO_MAX_MS) < until
            || self.account != account_tag(account)
        {
            return None;
        }
        let mut bytes = &self.amounts[..];
        let present = self.present.get();
        let source = source_from_bits(present >> MEMO_SOURCE_SHIFT)?;
        let additional = match source {
            CreditSource::Bundle | CreditSource::Global => {
                let mut amounts = [None; LIMIT_FIELDS];
                for (bit, out) in amounts.iter_mut().enumerate() {
                    if present & (1 << bit) != 0 {
                        *out = Some(next_varint(&mut bytes) as i64);
                    }
                }
                Some(Additional::from_options(amounts))
            }
            _ => None,
        };
        let balance = (present & MEMO_BALANCE != 0).then(|| {
            let mask = next_varint(&mut bytes);
            let mut b = RowBalance::default();
            for k in BalanceKind::ALL {
                if mask & (1 << (k as u8)) == 0 {
                    continue;
                }
                let mut next = || varint::unzigzag(next_varint(&mut bytes));
                let (granted, used, base) = (next(), next(), next());
                *b.granted.get_mut(k) = Some(granted);
                *b.used.get_mut(k) = used;
                *b.base.get_mut(k) = base;
            }
            b
        });
        Some((additional, source, balance))
    }
}

/// What a memo gives back: the amounts, the source and the balance of the credit chosen.
pub(crate) type Remembered = (Option<Additional>, CreditSource, Option<RowBalance>);

/// The bit of `CreditMemo::present` that says a balance follows the amounts (`LimitField`s
/// take the bits below it).
const MEMO_BALANCE: u16 = 1 << 15;
/// Where `CreditMemo::present` keeps the source (3 bits, below `MEMO_BALANCE`).
const MEMO_SOURCE_SHIFT: u16 = 12;
const _: () = assert!(LIMIT_FIELDS <= MEMO_SOURCE_SHIFT as usize);

/// A source as the 3 bits a memo keeps (never 0).
fn source_bits(source: CreditSource) -> u16 {
    match source {
        CreditSource::Bundle => 1,
        CreditSource::Global => 2,
        CreditSource::None => 3,
        CreditSource::Pending => 4,
        CreditSource::Unavailable => 5,
    }
}

/// The source a memo's 3 bits name (none for bits no memo writes).
fn source_from_bits(bits: u16) -> Option<CreditSource> {
    match bits & 0b111 {
        1 => Some(CreditSource::Bundle),
        2 => Some(CreditSource::Global),
        3 => Some(CreditSource::None),
        4 => Some(CreditSource::Pending),
        5 => Some(CreditSource::Unavailable),
        _ => None,
    }
}

/// Appends `v` as a varint to `buf` at `*at`; `None` when it does not fit.
fn put_varint(buf: &mut [u8], at: &mut usize, v: u64) -> Option<()> {
    let (bytes, n) = varint::encode_u64(v);
    let end = *at + n;
    buf.get_mut(*at..end)?.copy_from_slice(bytes.get(..n)?);
    *at = end;
    Some(())
}

/// The next varint of `bytes` (0 past the end: a memo only reads what it wrote).
#[inline]
fn next_varint(bytes: &mut &[u8]) -> u64 {
    varint::take_u64(bytes).map_or(0, |(v, _)| v)
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
mod tests;
