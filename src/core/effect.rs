//! Effects: what one command changed in an account, in a form that a replica or an AOF replay
//! applies without deciding anything.
//!
//! The master decides (`Account::admit`, `commit`, `release`) and describes the change as an
//! `Effect`: the master's clock reading `at`, whether expired leases were pruned at `at`, and
//! at most one change (a request counted with the lease it took, a commit, a release). Its
//! encoding is a few dozen bytes whatever the account holds, so replicating one command costs
//! the same with 4,096 leases as with none. `apply` replays it on the same prior state with no
//! policy, no credits and no clock of its own, and ends with exactly the master's state. The
//! decoder is strict: any bytes give `Ok` or `Err`, and only what `encode` writes is `Ok`.
//! This file knows nothing of Redis: the shell sends the bytes as `QUOTA.APPLY <key> <effect>`.

use std::fmt;

use smallvec::SmallVec;

use super::account::{Account, AdmitDecision, CommitOutcome, Lease, LeaseId};
use super::credit::PerKind;
use super::ledger::{
    Acknowledgement, BalanceChange, BalanceTerms, Hold, HourDelta, MAX_DECODED_HOURS,
};
use super::rate::Rates;
use super::varint::{take_u64, unzigzag, write_u64, zigzag, VarintError};
use super::window::Window;
use super::Millis;

/// The encoding version (the first byte).
const VERSION: u8 = 1;
/// The first byte of a rebase, which comes alone: `at` and the new sequence follow.
const VERSION_REBASE: u8 = 2;
/// The first version's layout followed by the smooth rates' state after the change
/// (`Rates::encode`): only an effect that changed a rate has it, so the others keep the
/// first version's bytes.
const VERSION_RATES: u8 = 3;

/// Flag bits (the second byte).
const PRUNE: u8 = 1;
const KIND_SHIFT: u8 = 1;
const KIND_MASK: u8 = 0b110;
const KIND_COUNT: u8 = 1;
const KIND_COMMIT: u8 = 2;
const KIND_RELEASE: u8 = 3;
const LIFETIME: u8 = 1 << 3;
const WITH_LEASE: u8 = 1 << 4;
/// A change to this account as a balance holder follows (`BalanceChange`).
const BALANCE: u8 = 1 << 5;
/// The account's balance terms are set or cleared.
const TERMS: u8 = 1 << 6;
/// A flush acknowledgement (alone, or with a prune).
const ACK: u8 = 1 << 7;
#[cfg(test)]
const KNOWN: u8 = PRUNE | KIND_MASK | LIFETIME | WITH_LEASE | BALANCE | TERMS | ACK;

/// Balance change operations (a bit set).
const OP_HOLD: u8 = 1;
const OP_SETTLE: u8 = 2;

/// Lease id tags.
const ID_SHORT: u8 = 0;
const ID_NAMED: u8 = 1;

/// An encoded effect: on the stack unless a lease id is unusually long (an admission's effect
/// is about 25 bytes, and 96 hold one with a 64-byte lease id). Kept small, as it is moved
/// around on every admission.
pub(crate) type EncodedEffect = SmallVec<[u8; 96]>;

/// A lease id as an effect carries it, borrowed so that neither encoding nor decoding allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseRef<'a> {
    /// A generated id (16 lower-case hex digits), as its number.
    Short(u64),
    /// Any other id, as its text.
    Named(&'a str),
}

impl<'a> LeaseRef<'a> {
    /// The id for the text a caller gave (the same rule as `LeaseId::parse`).
    pub(crate) fn parse(text: &'a str) -> LeaseRef<'a> {
        match LeaseId::short_form(text) {
            Some(n) => LeaseRef::Short(n),
            None => LeaseRef::Named(text),
        }
    }

    /// The id of a stored lease.
    pub(crate) fn of(id: &'a LeaseId) -> LeaseRef<'a> {
        match id {
            LeaseId::Short(n) => LeaseRef::Short(*n),
            LeaseId::Named(text) => LeaseRef::Named(text),
        }
    }

    fn to_id(self) -> LeaseId {
        match self {
            LeaseRef::Short(n) => LeaseId::Short(n),
            LeaseRef::Named(text) => LeaseId::Named(text.into()),
        }
    }
}

/// A lease taken by an admission (it was counted in the windows of the effect's `at`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NewLease<'a> {
    pub id: LeaseRef<'a>,
    pub expires_at: Millis,
    pub reserved: u64,
}

/// The one change a command made besides pruning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Change<'a> {
    /// One admitted request counted in the day, month and total of `at`; `lifetime` when a
    /// lifetime limit applies to the account; the lease the request took, if any.
    Count {
        lifetime: bool,
        lease: Option<NewLease<'a>>,
    },
    /// A commit: `tokens` recorded in the hour, day and month of `at`, and the lease (if one
    /// was named) settled: dropped if held, its id remembered until the given instant.
    Commit {
        tokens: u64,
        settled: Option<(LeaseRef<'a>, Millis)>,
    },
    /// A release: the held lease dropped and its request refunded in its own windows.
    Release { lease: LeaseRef<'a> },
}

/// A change to an account's balance terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TermsChange {
    Set(BalanceTerms),
    Clear,
}

impl TermsChange {
    /// The change that leaves the account with `terms`.
    pub(crate) fn to(terms: Option<BalanceTerms>) -> TermsChange {
        terms.map_or(TermsChange::Clear, TermsChange::Set)
    }

    /// The terms the account has after it.
    pub(crate) fn terms(self) -> Option<BalanceTerms> {
        match self {
            TermsChange::Set(terms) => Some(terms),
            TermsChange::Clear => None,
        }
    }
}

/// What one command changed in one account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Effect<'a> {
    /// The master's clock when it decided (ms since the epoch).
    pub at: Millis,
    /// Expired leases and settled ids were dropped at `at` before the change.
    pub prune: bool,
    pub change: Option<Change<'a>>,
    /// A change to the account as the holder of a balance (after `change`).
    pub balance: Option<BalanceChange>,
    /// The account's balance terms set or cleared.
    pub terms: Option<TermsChange>,
    /// A flush of the account's ledger acknowledged.
    pub ack: Option<Acknowledgement>,
    /// The account's sequence started anew from this one under its present name, after a
    /// rename (`Account::rebase`). Comes alone.
    pub rebase: Option<u64>,
    /// The smooth rates' state the change left (empty: none left), as the master computed it
    /// with its clock and the policy: a replica sets it rather than deciding it.
    pub rates: Option<Rates>,
}

/// Why bytes are not an effect, or an effect does not fit the state; `Display` is the wire
/// error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EffectError {
    Truncated,
    Version,
    Flags,
    Number,
    LeaseId,
    Trailing,
    Empty,
    NotHeld,
}

impl fmt::Display for EffectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self {
            EffectError::Truncated => "truncated",
            EffectError::Version => "unknown version",
            EffectError::Flags => "invalid flags",
            EffectError::Number => "invalid number",
            EffectError::LeaseId => "invalid lease id",
            EffectError::Trailing => "trailing bytes",
            EffectError::Empty => "changes nothing",
            EffectError::NotHeld => "the lease it releases is not held here",
        };
        write!(f, "ERR QUOTA.APPLY: invalid effect ({why})")
    }
}

impl std::error::Error for EffectError {}

impl<'a> Effect<'a> {
    /// An effect at `at` that changes nothing yet (the fields are filled in by the caller).
    pub(crate) fn empty(at: Millis) -> Self {
        Effect {
            at,
            prune: false,
            change: None,
            balance: None,
            terms: None,
            ack: None,
            rebase: None,
            rates: None,
        }
    }

    /// Whether it changes nothing.
    pub(crate) fn is_empty(&self) -> bool {
        !self.prune
            && self.change.is_none()
            && self.balance.is_none()
            && self.terms.is_none()
            && self.ack.is_none()
            && self.rebase.is_none()
            && self.rates.is_none()
    }

    /// A renamed account's sequence started anew from `seq`, decided at `at`.
    pub(crate) fn rebased(at: Millis, seq: u64) -> Self {
        Effect {
            rebase: Some(seq),
            ..Effect::empty(at)
        }
    }

    /// What `Account::admit` changed, read from its decision (and the account's lifetime mark
    /// after it); none when nothing changed.
    pub(crate) fn admitted(
        at: Millis,
        decision: &'a AdmitDecision,
        account: &Account,
    ) -> Option<Self> {
        if !decision.changed {
            return None;
        }
        let change = decision.counted.then(|| Change::Count {
            lifetime: account.lifetime,
            // The lease the admission took: read from the decision, not looked up again.
            lease: decision.lease.as_ref().map(|id| NewLease {
                id: LeaseRef::of(id),
                expires_at: decision.lease_expires_at,
                reserved: decision.reserved,
            }),
        });
        Some(Effect {
            at,
            prune: decision.pruned,
            change,
            rates: decision
                .rates_changed
                .then(|| account.rates().copied().unwrap_or_default()),
            ..Effect::empty(at)
        })
    }

    /// Only a prune at `at`, when it dropped something (`pruned`).
    pub(crate) fn pruned(at: Millis, pruned: bool) -> Option<Self> {
        pruned.then_some(Effect {
            prune: true,
            ..Effect::empty(at)
        })
    }

    /// What `Account::commit` changed after a prune at `at` (`pruned`: it dropped something);
    /// none when nothing changed.
    /// `rates`: the rates' state after it, when it changed (`rates_change`).
    pub(crate) fn committed(
        at: Millis,
        pruned: bool,
        tokens: u64,
        lease: Option<&'a str>,
        outcome: &CommitOutcome,
        rates: Option<Rates>,
    ) -> Option<Self> {
        let change = (!outcome.duplicate).then(|| Change::Commit {
            tokens,
            settled: lease.map(LeaseRef::parse).zip(outcome.settled_until),
        });
        (pruned || change.is_some() || rates.is_some()).then_some(Effect {
            prune: pruned,
            change,
            rates,
            ..Effect::empty(at)
        })
    }

    /// What `Account::release` changed after a prune at `at`; none when nothing changed.
    /// `rates`: the rates' state after it, when it changed (`rates_change`).
    pub(crate) fn released(
        at: Millis,
        pruned: bool,
        lease: &'a str,
        released: bool,
        rates: Option<Rates>,
    ) -> Option<Self> {
        let change = released.then(|| Change::Release {
            lease: LeaseRef::parse(lease),
        });
        (pruned || change.is_some() || rates.is_some()).then_some(Effect {
            prune: pruned,
            change,
            rates,
            ..Effect::empty(at)
        })
    }

    /// The compact encoding (see the module header).
    pub(crate) fn encode(&self) -> EncodedEffect {
        let mut w = EncodedEffect::new();
        if let Some(seq) = self.rebase {
            w.push(VERSION_REBASE);
            put_i64(&mut w, self.at);
            put_u64(&mut w, seq);
            return w;
        }
        let mut flags = if self.prune { PRUNE } else { 0 };
        match &self.change {
            None => {}
            Some(Change::Count { lifetime, lease }) => {
                flags |= KIND_COUNT << KIND_SHIFT;
                if *lifetime {
                    flags |= LIFETIME;
                }
                if lease.is_some() {
                    flags |= WITH_LEASE;
                }
            }
            Some(Change::Commit { settled, .. }) => {
                flags |= KIND_COMMIT << KIND_SHIFT;
                if settled.is_some() {
                    flags |= WITH_LEASE;
                }
            }
            Some(Change::Release { .. }) => flags |= KIND_RELEASE << KIND_SHIFT,
        }
        if self.balance.is_some() {
            flags |= BALANCE;
        }
        if self.terms.is_some() {
            flags |= TERMS;
        }
        if self.ack.is_some() {
            flags |= ACK;
        }
        w.push(match self.rates {
            Some(_) => VERSION_RATES,
            None => VERSION,
        });
        w.push(flags);
        put_i64(&mut w, self.at);
        match &self.change {
            None | Some(Change::Count { lease: None, .. }) => {}
            Some(Change::Count { lease: Some(l), .. }) => {
                put_id(&mut w, l.id);
                put_i64(&mut w, l.expires_at);
                put_u64(&mut w, l.reserved);
            }
            Some(Change::Commit { tokens, settled }) => {
                put_u64(&mut w, *tokens);
                if let Some((id, until)) = settled {
                    put_id(&mut w, *id);
                    put_i64(&mut w, *until);
                }
            }
            Some(Change::Release { lease }) => put_id(&mut w, *lease),
        }
        if let Some(b) = &self.balance {
            put_i64(&mut w, b.debits.requests);
            put_i64(&mut w, b.debits.tokens);
            let ops = if b.hold.is_some() { OP_HOLD } else { 0 }
                | if b.settle.is_some() { OP_SETTLE } else { 0 };
            w.push(ops);
            if let Some(h) = &b.hold {
                put_u64(&mut w, h.tag);
                put_i64(&mut w, h.expires_at);
                put_u64(&mut w, h.tokens);
                w.push(u8::from(h.paid_request));
            }
            if let Some(tag) = b.settle {
                put_u64(&mut w, tag);
            }
        }
        match &self.terms {
            None => {}
            Some(TermsChange::Clear) => w.push(0),
            Some(TermsChange::Set(t)) => {
                w.push(1 + u8::from(t.global));
                for limit in t.token_limits {
                    put_u64(&mut w, limit);
                }
            }
        }
        if let Some(ack) = &self.ack {
            put_u64(&mut w, ack.next_seq);
            match ack.floor {
                None => w.push(0),
                Some(floor) => {
                    w.push(1);
                    put_u64(&mut w, floor[0]);
                    put_u64(&mut w, floor[1]);
                }
            }
            put_u64(&mut w, ack.hours.len() as u64);
            for h in &ack.hours {
                for v in [h.hour, h.requests, h.tokens, h.debits[0], h.debits[1]] {
                    put_i64(&mut w, v);
                }
            }
        }
        if let Some(rates) = &self.rates {
            rates.encode(|b| w.push(b));
        }
        w
    }

    /// Decodes what `encode` wrote; `Err` for anything else (never a panic).
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, EffectError> {
        let mut r = Reader { buf: bytes };
        let version = r.byte()?;
        match version {
            VERSION | VERSION_RATES => {}
            VERSION_REBASE => {
                let (at, seq) = (r.i64()?, r.u64()?);
                if !r.buf.is_empty() {
                    return Err(EffectError::Trailing);
                }
                return Ok(Effect::rebased(at, seq));
            }
            _ => return Err(EffectError::Version),
        }
        // Every one of the eight flag bits has a meaning (`KNOWN` is all of them); what does
        // not combine is refused below.
        let flags = r.byte()?;
        let kind = (flags & KIND_MASK) >> KIND_SHIFT;
        let with_lease = flags & WITH_LEASE != 0;
        let lifetime = flags & LIFETIME != 0;
        let lease_allowed = matches!(kind, KIND_COUNT | KIND_COMMIT);
        if (lifetime && kind != KIND_COUNT) || (with_lease && !lease_allowed) {
            return Err(EffectError::Flags);
        }
        // An acknowledgement comes alone (with a prune at most).
        if flags & ACK != 0 && (kind != 0 || flags & (BALANCE | TERMS) != 0) {
            return Err(EffectError::Flags);
        }
        let at = r.i64()?;
        let change = match kind {
            KIND_COUNT => {
                let lease = if with_lease {
                    Some(NewLease {
                        id: r.id()?,
                        expires_at: r.i64()?,
                        reserved: r.u64()?,
                    })
                } else {
                    None
                };
                Some(Change::Count { lifetime, lease })
            }
            KIND_COMMIT => {
                let tokens = r.u64()?;
                let settled = if with_lease {
                    Some((r.id()?, r.i64()?))
                } else {
                    None
                };
                Some(Change::Commit { tokens, settled })
            }
            KIND_RELEASE => Some(Change::Release { lease: r.id()? }),
            _ => None,
        };
        let balance = (flags & BALANCE != 0).then(|| r.balance()).transpose()?;
        let terms = (flags & TERMS != 0).then(|| r.terms()).transpose()?;
        let ack = (flags & ACK != 0).then(|| r.ack()).transpose()?;
        let rates = match version {
            VERSION_RATES => Some(Rates::decode(&mut r.buf).map_err(|e| match e {
                "truncated" => EffectError::Truncated,
                _ => EffectError::Number,
            })?),
            _ => None,
        };
        if !r.buf.is_empty() {
            return Err(EffectError::Trailing);
        }
        let effect = Effect {
            at,
            prune: flags & PRUNE != 0,
            change,
            balance,
            terms,
            ack,
            rebase: None,
            rates,
        };
        if effect.is_empty() {
            return Err(EffectError::Empty);
        }
        Ok(effect)
    }

    /// Applies the effect to the state it was made from. `Err` (before any change) only when
    /// the state is not that one: a release of a lease that is not held.
    pub(crate) fn apply(&self, account: &mut Account) -> Result<(), EffectError> {
        if let Some(seq) = self.rebase {
            account.rebase(seq);
            return Ok(());
        }
        if let Some(Change::Release { lease }) = &self.change {
            let id = lease.to_id();
            if !account.leases().iter().any(|l| l.id == id) {
                return Err(EffectError::NotHeld);
            }
        }
        if self.prune {
            account.prune(self.at);
        }
        let (hour, day, month) = (
            Window::Hour.index(self.at),
            Window::Day.index(self.at),
            Window::Month.index(self.at),
        );
        match &self.change {
            None => {}
            Some(Change::Count { lifetime, lease }) => {
                if *lifetime {
                    account.lifetime = true;
                }
                account.count_request(self.at, hour, day, month);
                if let Some(l) = lease {
                    account.push_lease(Lease {
                        id: l.id.to_id(),
                        expires_at: l.expires_at,
                        reserved: l.reserved,
                        day: i32::try_from(day).unwrap_or(i32::MAX),
                        month: i32::try_from(month).unwrap_or(i32::MAX),
                    });
                }
            }
            Some(Change::Commit { tokens, settled }) => {
                if let Some((id, until)) = settled {
                    account.settle(id.to_id(), *until);
                }
                account.count_tokens(*tokens, self.at, hour, day, month);
            }
            Some(Change::Release { lease }) => {
                let released = account.unadmit(&lease.to_id(), self.at);
                released.then_some(()).ok_or(EffectError::NotHeld)?;
            }
        }
        if let Some(change) = self.terms {
            account.set_terms(change.terms());
        }
        if let Some(change) = &self.balance {
            account.apply_balance(self.at, change);
        }
        if let Some(ack) = &self.ack {
            account.acknowledge(ack);
        }
        if let Some(rates) = self.rates {
            account.set_rates(Some(rates));
        }
        Ok(())
    }
}

/// The rates' state of `account` when it differs from `before` (what an effect carries: an
/// empty `Rates` when none is left), else none.
pub(crate) fn rates_change(before: Option<Rates>, account: &Account) -> Option<Rates> {
    let after = account.rates().copied();
    (after != before).then(|| after.unwrap_or_default())
}

/// Appends `v` as a varint (straight into `w`: an array handed back and read again as wider
/// words would stall on store forwarding, on every admission).
#[inline]
fn put_u64(w: &mut EncodedEffect, v: u64) {
    write_u64(v, |b| w.push(b));
}

fn put_i64(w: &mut EncodedEffect, v: i64) {
    put_u64(w, zigzag(v));
}

fn put_id(w: &mut EncodedEffect, id: LeaseRef<'_>) {
    match id {
        LeaseRef::Short(n) => {
            w.push(ID_SHORT);
            put_u64(w, n);
        }
        LeaseRef::Named(text) => {
            w.push(ID_NAMED);
            put_u64(w, text.len() as u64);
            w.extend_from_slice(text.as_bytes());
        }
    }
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, EffectError> {
        let (first, rest) = self.buf.split_first().ok_or(EffectError::Truncated)?;
        self.buf = rest;
        Ok(*first)
    }

    /// A varint in its shortest form (so that every effect has exactly one encoding).
    fn u64(&mut self) -> Result<u64, EffectError> {
        match take_u64(&mut self.buf) {
            Ok((v, true)) => Ok(v),
            Err(VarintError::Truncated) => Err(EffectError::Truncated),
            Ok((_, false)) | Err(VarintError::TooLarge | VarintError::TooLong) => {
                Err(EffectError::Number)
            }
        }
    }

    fn i64(&mut self) -> Result<i64, EffectError> {
        self.u64().map(unzigzag)
    }

    fn flag(&mut self) -> Result<bool, EffectError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(EffectError::Flags),
        }
    }

    fn balance(&mut self) -> Result<BalanceChange, EffectError> {
        let debits = PerKind {
            requests: self.i64()?,
            tokens: self.i64()?,
        };
        let ops = self.byte()?;
        if ops & !(OP_HOLD | OP_SETTLE) != 0 {
            return Err(EffectError::Flags);
        }
        let hold = if ops & OP_HOLD != 0 {
            Some(Hold {
                tag: self.u64()?,
                expires_at: self.i64()?,
                tokens: self.u64()?,
                paid_request: self.flag()?,
            })
        } else {
            None
        };
        let settle = (ops & OP_SETTLE != 0).then(|| self.u64()).transpose()?;
        if hold.is_some_and(|h| !(1..=crate::core::window::LAST_MS).contains(&h.expires_at)) {
            return Err(EffectError::Number);
        }
        Ok(BalanceChange {
            debits,
            hold,
            settle,
        })
    }

    fn terms(&mut self) -> Result<TermsChange, EffectError> {
        match self.byte()? {
            0 => Ok(TermsChange::Clear),
            t @ (1 | 2) => Ok(TermsChange::Set(BalanceTerms {
                global: t == 2,
                token_limits: [self.u64()?, self.u64()?, self.u64()?],
            })),
            _ => Err(EffectError::Flags),
        }
    }

    fn ack(&mut self) -> Result<Acknowledgement, EffectError> {
        let next_seq = self.u64()?;
        let floor = if self.flag()? {
            Some([self.u64()?, self.u64()?])
        } else {
            None
        };
        let n = usize::try_from(self.u64()?)
            .ok()
            .filter(|n| *n <= MAX_DECODED_HOURS)
            .ok_or(EffectError::Number)?;
        let mut hours = Vec::with_capacity(n);
        for _ in 0..n {
            let hour = self.i64()?;
            if !(0..=crate::core::window::Window::Hour.last_index()).contains(&hour) {
                return Err(EffectError::Number);
            }
            hours.push(HourDelta {
                hour,
                requests: self.i64()?,
                tokens: self.i64()?,
                debits: [self.i64()?, self.i64()?],
            });
        }
        Ok(Acknowledgement {
            hours,
            next_seq,
            floor,
        })
    }

    fn id(&mut self) -> Result<LeaseRef<'a>, EffectError> {
        match self.byte()? {
            ID_SHORT => Ok(LeaseRef::Short(self.u64()?)),
            ID_NAMED => {
                let len = usize::try_from(self.u64()?).map_err(|_| EffectError::Truncated)?;
                if len == 0 {
                    return Err(EffectError::LeaseId);
                }
                if len > self.buf.len() {
                    return Err(EffectError::Truncated);
                }
                let (text, rest) = self.buf.split_at(len);
                self.buf = rest;
                let text = std::str::from_utf8(text).map_err(|_| EffectError::LeaseId)?;
                // A generated id's text is carried as its number, never as text.
                if LeaseId::short_form(text).is_some() {
                    return Err(EffectError::LeaseId);
                }
                Ok(LeaseRef::Named(text))
            }
            _ => Err(EffectError::LeaseId),
        }
    }
}

#[cfg(test)]
mod tests;
