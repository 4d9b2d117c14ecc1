//! The byte encoding of effects: a version byte, a flag byte, `at`, then the change and the
//! parts as varints. `encode` writes it; `decode` reads it back strictly (any bytes give an
//! `Effect` or an `EffectError`, never a panic, and only what `encode` writes is `Ok`, so
//! every effect has exactly one encoding).

use super::{Change, Effect, EffectError, EncodedEffect, LeaseRef, NewLease, TermsChange};
use crate::core::account::{LeaseId, MAX_COST};
use crate::core::credit::PerKind;
use crate::core::ledger::{
    Acknowledgement, BalanceChange, BalanceTerms, Hold, HourDelta, MAX_DECODED_HOURS,
};
use crate::core::rate::Rates;
use crate::core::varint::{take_u64, unzigzag, write_u64, zigzag, VarintError};

/// The encoding version (the first byte).
pub(super) const VERSION: u8 = 1;
/// The first byte of a rebase, which comes alone: `at` and the new sequence follow.
pub(super) const VERSION_REBASE: u8 = 2;
/// The first version's layout followed by the smooth rates' state after the change
/// (`Rates::encode`): only an effect that changed a rate has it, so the others keep the
/// first version's bytes.
pub(super) const VERSION_RATES: u8 = 3;
/// The first version's layout with the costs (`COST`): a count carries its cost right after
/// `at`, and a balance hold the requests it paid as a number rather than a 0/1 flag. Only an
/// effect that counts a cost other than 1 or holds more than one paid request has it, so the
/// others keep their older bytes (and a count of an older effect costs 1).
pub(super) const VERSION_COSTS: u8 = 4;
/// The rates' version's layout with the costs, as `VERSION_COSTS` adds them.
pub(super) const VERSION_COSTS_RATES: u8 = 5;

/// Flag bits (the second byte).
pub(super) const PRUNE: u8 = 1;
pub(super) const KIND_SHIFT: u8 = 1;
pub(super) const KIND_MASK: u8 = 0b110;
pub(super) const KIND_COUNT: u8 = 1;
pub(super) const KIND_COMMIT: u8 = 2;
pub(super) const KIND_RELEASE: u8 = 3;
pub(super) const LIFETIME: u8 = 1 << 3;
pub(super) const WITH_LEASE: u8 = 1 << 4;
/// A change to this account as a balance holder follows (`BalanceChange`).
pub(super) const BALANCE: u8 = 1 << 5;
/// The account's balance terms are set or cleared.
pub(super) const TERMS: u8 = 1 << 6;
/// A flush acknowledgement (alone, or with a prune).
pub(super) const ACK: u8 = 1 << 7;
#[cfg(test)]
pub(super) const KNOWN: u8 = PRUNE | KIND_MASK | LIFETIME | WITH_LEASE | BALANCE | TERMS | ACK;

/// Balance change operations (a bit set).
pub(super) const OP_HOLD: u8 = 1;
pub(super) const OP_SETTLE: u8 = 2;

/// Lease id tags.
pub(super) const ID_SHORT: u8 = 0;
pub(super) const ID_NAMED: u8 = 1;

impl<'a> Effect<'a> {
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
            Some(Change::Count {
                lifetime, lease, ..
            }) => {
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
        let costs = self.has_costs();
        w.push(match (self.rates, costs) {
            (None, false) => VERSION,
            (Some(_), false) => VERSION_RATES,
            (None, true) => VERSION_COSTS,
            (Some(_), true) => VERSION_COSTS_RATES,
        });
        w.push(flags);
        put_i64(&mut w, self.at);
        match &self.change {
            None => {}
            Some(Change::Count { cost, lease, .. }) => {
                if costs {
                    put_u64(&mut w, u64::from(*cost));
                }
                if let Some(l) = lease {
                    put_id(&mut w, l.id);
                    put_i64(&mut w, l.expires_at);
                    put_u64(&mut w, l.reserved);
                }
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
                match costs {
                    true => put_u64(&mut w, u64::from(h.paid_requests)),
                    false => w.push(u8::from(h.paid_requests != 0)),
                }
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
                    put_u64(&mut w, floor.requests);
                    put_u64(&mut w, floor.tokens);
                }
            }
            put_u64(&mut w, ack.hours.len() as u64);
            for h in &ack.hours {
                for v in h.fields() {
                    put_i64(&mut w, v);
                }
            }
        }
        if let Some(rates) = &self.rates {
            rates.encode(|b| w.push(b));
        }
        w
    }

    /// Whether only the costs' versions can say it: a count of a cost other than 1, or a hold
    /// that paid more than one request.
    fn has_costs(&self) -> bool {
        let count = matches!(self.change, Some(Change::Count { cost, .. }) if cost != 1);
        let hold = self
            .balance
            .and_then(|b| b.hold)
            .is_some_and(|h| h.paid_requests > 1);
        count || hold
    }

    /// Decodes what `encode` wrote; `Err` for anything else (never a panic).
    pub(crate) fn decode(bytes: &'a [u8]) -> Result<Self, EffectError> {
        let mut r = Reader { buf: bytes };
        let version = r.byte()?;
        let (with_rates, costs) = match version {
            VERSION => (false, false),
            VERSION_RATES => (true, false),
            VERSION_COSTS => (false, true),
            VERSION_COSTS_RATES => (true, true),
            VERSION_REBASE => {
                let (at, seq) = (r.i64()?, r.u64()?);
                if !r.buf.is_empty() {
                    return Err(EffectError::Trailing);
                }
                return Ok(Effect::rebased(at, seq));
            }
            _ => return Err(EffectError::Version),
        };
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
                let cost = match costs {
                    true => r.cost()?,
                    false => 1,
                };
                let lease = if with_lease {
                    Some(NewLease {
                        id: r.id()?,
                        expires_at: r.i64()?,
                        reserved: r.u64()?,
                    })
                } else {
                    None
                };
                Some(Change::Count {
                    lifetime,
                    cost,
                    lease,
                })
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
        let balance = (flags & BALANCE != 0)
            .then(|| r.balance(costs))
            .transpose()?;
        let terms = (flags & TERMS != 0).then(|| r.terms()).transpose()?;
        let ack = (flags & ACK != 0).then(|| r.ack()).transpose()?;
        let rates = match with_rates {
            true => Some(Rates::decode(&mut r.buf).map_err(|e| match e {
                "truncated" => EffectError::Truncated,
                _ => EffectError::Number,
            })?),
            false => None,
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
        // The costs' versions only for what needs them (one encoding per effect).
        if costs != effect.has_costs() {
            return Err(EffectError::Version);
        }
        Ok(effect)
    }
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

/// Reads an effect's parts from the front of `buf`, strictly: only what the encoder writes.
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

    /// A cost (of a count, or the requests a hold paid): at most `MAX_COST`.
    fn cost(&mut self) -> Result<u32, EffectError> {
        u32::try_from(self.u64()?)
            .ok()
            .filter(|c| *c <= MAX_COST)
            .ok_or(EffectError::Number)
    }

    /// A change to a balance holder (`costs`: a hold's paid requests are a number, else a
    /// flag).
    fn balance(&mut self, costs: bool) -> Result<BalanceChange, EffectError> {
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
                paid_requests: match costs {
                    true => self.cost()?,
                    false => u32::from(self.flag()?),
                },
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
            Some(PerKind {
                requests: self.u64()?,
                tokens: self.u64()?,
            })
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
                debits: PerKind {
                    requests: self.i64()?,
                    tokens: self.i64()?,
                },
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
