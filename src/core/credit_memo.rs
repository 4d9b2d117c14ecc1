//! A speed trick: the credit an account used, remembered on the account key (`CreditMemo`), so
//! that the next admission of the same (user, bundle) skips the credits cache: its lock, its
//! hash lookup and the lines of the user's rows, none of them in the CPU's caches when users
//! come and go.
//!
//! What it buys (`make bench` shapes, each build against the same build without it, rounds
//! interleaved; slower-without ratios, 2026-12-06): the one-rate `ADMIT POLICY` 1.10, 1.02 and
//! 1.16 in three sessions, the 4-limit `ADMIT POLICY` 1.14, 1.22 and 1.11. It costs 32 bytes
//! on every account key and the rule that a memo is only used while the cache's epoch has not
//! moved (any cache change retires every memo). Without it, `commands::admit` would ask the
//! cache every time (`runtime::gather`), as it does when a memo is absent or stale: removing
//! it is deleting this file, the `memo` slot of `ffi::account_type` and its uses in
//! `commands::admit`.

use super::credit::{BalanceKind, CreditSource, Replenishment, RowBalance};
use crate::core::policy::{Additional, LIMIT_FIELDS};
use crate::core::varint;
use crate::core::Millis;

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

#[cfg(test)]
mod tests;
