//! Effects: what one command changed in an account, in a form that a replica or an AOF replay
//! applies without deciding anything.
//!
//! The master decides (`Account::admit`, `commit`, `release`) and describes the change as an
//! `Effect`: the master's clock reading `at`, whether expired leases were pruned at `at`, and
//! at most one change (a request counted with the lease it took, a commit, a release). Its
//! encoding is a few dozen bytes whatever the account holds, so replicating one command costs
//! the same with 4,096 leases as with none. `apply` replays it on the same prior state with no
//! policy, no credits and no clock of its own, and ends with exactly the master's state. The
//! decoder is strict: any bytes give `Ok` or `Err`, and only what `encode` writes is `Ok`
//! (`codec` holds the bytes: `encode`, `decode` and their versions).
//! This file knows nothing of Redis: the shell sends the bytes as `QUOTA.APPLY <key> <effect>`.

use std::fmt;

use smallvec::SmallVec;

use super::account::{Account, AdmitDecision, CommitOutcome, Lease, LeaseId};
use super::ledger::{Acknowledgement, BalanceChange, BalanceTerms};
use super::rate::Rates;
use super::window::Window;
use super::Millis;

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
    /// One admitted request counted in the day, month and total of `at`, `cost` times (at
    /// most `MAX_COST`); `lifetime` when a lifetime limit applies to the account; the lease
    /// the request took, if any (it gives the cost back when released).
    Count {
        lifetime: bool,
        cost: u32,
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
        if !decision.changed() {
            return None;
        }
        let change = decision.counted().then(|| Change::Count {
            lifetime: account.lifetime,
            cost: decision.cost,
            // The lease the admission took: read from the decision, not looked up again.
            lease: decision.lease.as_ref().map(|id| NewLease {
                id: LeaseRef::of(id),
                expires_at: decision.lease_expires_at,
                reserved: decision.reserved,
            }),
        });
        Some(Effect {
            at,
            prune: decision.pruned(),
            change,
            rates: decision
                .rates_changed()
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
            Some(Change::Count {
                lifetime,
                cost,
                lease,
            }) => {
                if *lifetime {
                    account.lifetime = true;
                }
                account.count_request(self.at, hour, day, month, u64::from(*cost));
                if let Some(l) = lease {
                    account.push_lease(Lease {
                        id: l.id.to_id(),
                        expires_at: l.expires_at,
                        reserved: l.reserved,
                        day: i32::try_from(day).unwrap_or(i32::MAX),
                        cost: *cost,
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
                released.map(|_| ()).ok_or(EffectError::NotHeld)?;
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

mod codec;

#[cfg(test)]
mod tests;
