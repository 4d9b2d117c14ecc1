//! The decide step of the account commands: from the gathered inputs and the account, the
//! decision, the change to the balance's holder and the effect to propagate.
//!
//! The balance rules live here and nowhere else: who pays (`payer`), what a balance offers an
//! admission (`offer`), the terms its commits debit on (`terms_for`), what an admission charges
//! (`admission_charge`), and what a COMMIT or a RELEASE settles (`settlement`: the overdraft
//! of tokens beyond the windows, the refund of a request the balance paid, the lease's hold
//! dropped). Pure: the shell opens the keys, applies what comes back and replies.

#[cfg(test)]
mod tests;

use super::account::{
    Account, AccountError, AdmitDecision, AdmitRequest, BalanceOffer, CommitOutcome, Usage,
};
use super::credit::{BalanceKind, PerKind, RowBalance};
use super::effect::{rates_change, Effect, EncodedEffect, TermsChange};
use super::ids::ANY_BUNDLE;
use super::ledger::{balance_left, hold_tag, BalanceChange, BalanceTerms, Hold, Unacknowledged};
use super::policy::{EffectivePolicy, LimitField};
use super::Millis;

/// What a change to an account propagates to replicas and the AOF.
// The effect stays inline (a stack buffer): an admission allocates nothing to replicate.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Propagate {
    /// Nothing changed.
    Nothing,
    /// `QUOTA.APPLY <key> <effect>`.
    Effect(EncodedEffect),
    /// The whole state (a fallback when the change has no effect form).
    State,
    /// The command as called (it is itself an effect).
    Verbatim,
    /// A change nobody receives (no replica, no AOF: `AdmitInputs::listened`): only counted,
    /// for the RDB save rules, as `Verbatim` is, with no effect encoded.
    Counted,
}

impl Propagate {
    /// The effect, encoded; `Nothing` for none.
    pub(crate) fn effect(effect: Option<Effect<'_>>) -> Propagate {
        effect.map_or(Propagate::Nothing, |e| Propagate::Effect(e.encode()))
    }
}

/// Who holds the balance an account draws on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Payer {
    /// The account itself: its own row's balance, or the `'*'` row's for the `'*'` account.
    Itself,
    /// The user's `'*'` account: a `'*'` row's balance, shared by every bundle without a row.
    Star,
}

/// Who holds the balance of the row that applies to `bundle` (`global`: the `'*'` row).
pub(crate) fn payer(bundle: &str, global: bool) -> Payer {
    if global && bundle != ANY_BUNDLE {
        Payer::Star
    } else {
        Payer::Itself
    }
}

/// Who holds the balance an account's terms name, if it has terms.
pub(crate) fn payer_by_terms(account: Option<&Account>, bundle: &str) -> Option<Payer> {
    let terms = account.and_then(Account::terms)?;
    Some(payer(bundle, terms.global))
}

/// What balance `b` has left for an admission at `now`, given its holder's state (none: the
/// holder's key does not exist yet) and the holder's batch the flush has `sent` and not
/// acknowledged yet.
pub(crate) fn offer(
    b: &RowBalance,
    holder: Option<&Account>,
    sent: Option<Unacknowledged>,
    now: Millis,
) -> BalanceOffer {
    let twice = counted_twice(b, holder, sent);
    BalanceOffer {
        left: balance_left(b, holder.and_then(Account::ledger), twice, now),
    }
}

/// Whether balance row `b`, as read from PostgreSQL, may already count debits its holder
/// still counts unflushed: the row was last debited by the batch the holder is sending now
/// (its sequence) or a later one, so PostgreSQL applied it and this node has not taken it off
/// the holder's ledger yet. Such a row is not remembered on an account (see `CreditMemo`).
pub(crate) fn counts_unacknowledged(b: &RowBalance, holder: Option<&Account>) -> bool {
    let Some(holder) = holder else {
        return false;
    };
    let seq = holder.batch_seq();
    b.ledger_seq != 0
        && seq != 0
        && b.ledger_seq >= seq
        && !holder.is_renamed()
        && holder.has_unflushed()
}

/// What balance row `b`'s used totals count that its holder's ledger still counts unflushed
/// (see `counts_unacknowledged`): the debits of the batch the flush `sent`, when it still
/// knows it (on the master that sent it: exact); otherwise (a replica, or a master restarted
/// or promoted since it was sent) what the row counts beyond the holder's floor (PostgreSQL's
/// total when the holder's previous batch was acknowledged), at most what the holder counts
/// unflushed.
pub(crate) fn counted_twice(
    b: &RowBalance,
    holder: Option<&Account>,
    sent: Option<Unacknowledged>,
) -> PerKind<i64> {
    if !counts_unacknowledged(b, holder) {
        return PerKind::default();
    }
    let seq = holder.map_or(0, Account::batch_seq);
    if let Some(sent) = sent.filter(|s| s.seq == seq) {
        return sent.debits;
    }
    // Never more than the holder counts unflushed: whatever the floor says, the row cannot
    // count twice more than that.
    let ledger = holder.and_then(Account::ledger);
    let floor = ledger.map_or(PerKind::default(), |l| l.floor);
    let beyond = |kind: BalanceKind, floor: u64| {
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        let unflushed = ledger.map_or(0, |l| l.unflushed(kind)).max(0);
        b.used.get(kind).saturating_sub(floor).clamp(0, unflushed)
    };
    PerKind {
        requests: beyond(BalanceKind::Requests, floor.requests),
        tokens: beyond(BalanceKind::Tokens, floor.tokens),
    }
}

/// The terms an account's commits debit a balance on: the holder, and the effective token
/// limits beyond which tokens are debited (none without a token balance).
pub(crate) fn terms_for(b: &RowBalance, global: bool, policy: &EffectivePolicy) -> BalanceTerms {
    let has_tokens = b.has(BalanceKind::Tokens);
    let limit = |f: LimitField| match has_tokens {
        true => policy.limits.get(f).unwrap_or(u64::MAX),
        false => u64::MAX,
    };
    BalanceTerms {
        global,
        token_limits: [
            limit(LimitField::TokensPerHour),
            limit(LimitField::TokensPerDay),
            limit(LimitField::TokensPerMonth),
        ],
    }
}

/// What an admission changes on its balance holder: the request's cost debited when the
/// balance paid for it, and a hold for its lease (the tokens held, and the requests paid, so a
/// release refunds them). `key` is the admitted account's key, `lease` the id the caller chose.
pub(crate) fn admission_charge(
    d: &AdmitDecision,
    key: &[u8],
    lease: Option<&str>,
    now: Millis,
    lease_ttl_ms: Millis,
) -> Option<BalanceChange> {
    if !d.counted() || !(d.debits_request() || d.held_tokens > 0) {
        return None;
    }
    let mut buf = [0u8; 16];
    let paid = if d.debits_request() { d.cost } else { 0 };
    let hold = d.lease.as_ref().map(|id| Hold {
        tag: hold_tag(key, lease.unwrap_or_else(|| id.as_text(&mut buf))),
        expires_at: now.saturating_add(lease_ttl_ms.max(1)),
        tokens: d.held_tokens,
        paid_requests: paid,
    });
    Some(BalanceChange {
        debits: PerKind {
            requests: i64::from(paid),
            tokens: 0,
        },
        hold,
        settle: None,
    })
}

/// How a lease ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// A commit; `debit` tokens went beyond the token windows (the balance pays them, even
    /// below zero: the overdraft rule).
    Commit { debit: u64 },
    /// A release: the requests the balance paid for the admission are refunded.
    Release,
}

/// What a commit or release of lease `lease` (or none) on account `key` owes the balance's
/// holder (`holder`, none when its key does not exist): the tokens debited, the refund, and
/// the lease's hold settled while it is live.
pub(crate) fn settlement(
    holder: Option<&Account>,
    key: &[u8],
    lease: Option<&str>,
    how: Settle,
    now: Millis,
) -> Option<BalanceChange> {
    let hold = lease.and_then(|l| {
        let tag = hold_tag(key, l);
        holder
            .and_then(Account::ledger)
            .and_then(|led| led.hold(tag, now).copied())
    });
    let (refund, debit) = match how {
        Settle::Commit { debit } => (0, debit),
        Settle::Release => (hold.map_or(0, |h| h.paid_requests), 0),
    };
    let change = BalanceChange {
        debits: PerKind {
            requests: -i64::from(refund),
            tokens: i64::try_from(debit).unwrap_or(i64::MAX),
        },
        hold: None,
        settle: hold.map(|h| h.tag),
    };
    (!change.is_empty()).then_some(change)
}

/// Applies `change` to the account holding the balance for another: the effect it propagates.
pub(crate) fn charge(holder: &mut Account, change: BalanceChange, now: Millis) -> Propagate {
    holder.apply_balance(now, &change);
    Propagate::effect(Some(Effect {
        balance: Some(change),
        ..Effect::empty(now)
    }))
}

/// The balance of the credit row that applies to an admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RowTerms {
    pub balance: RowBalance,
    /// It is the `'*'` row's.
    pub global: bool,
}

/// What an admission decides on, besides the account.
pub(crate) struct AdmitInputs<'a> {
    /// The account's key (hold tags name it).
    pub key: &'a [u8],
    pub bundle: &'a str,
    pub policy: &'a EffectivePolicy,
    /// The request; its balance offer is filled in here.
    pub request: AdmitRequest<'a>,
    pub balance: Option<RowTerms>,
    /// The batch of the balance's holder the flush sent and has not acknowledged yet.
    pub sent: Option<Unacknowledged>,
    /// Reply with a usage snapshot.
    pub verbose: bool,
    /// Someone receives this node's changes (a replica, the AOF): the effect is encoded for
    /// them. Without, a change is only counted (`Propagate::Counted`).
    pub listened: bool,
}

/// What an admission decided.
pub(crate) struct Admitted {
    pub decision: AdmitDecision,
    /// The usage after it (`VERBOSE`).
    pub usage: Option<Usage>,
    /// What the user's `'*'` account owes when it holds the balance (the shell applies it
    /// there with `charge`); the account's own balance is changed here.
    pub star_change: Option<BalanceChange>,
}

/// Decides an admission on `account` (`star`: the user's `'*'` account when it holds the
/// balance): the decision, and what to propagate for this account.
pub(crate) fn admit(
    account: &mut Account,
    inputs: &AdmitInputs<'_>,
    star: Option<&Account>,
    now: Millis,
    new_id: impl FnMut() -> u64,
) -> (Result<Admitted, AccountError>, Propagate) {
    let payer = inputs.balance.map(|b| payer(inputs.bundle, b.global));
    let mut request = inputs.request;
    request.balance = match (inputs.balance, payer) {
        (Some(b), Some(Payer::Itself)) => Some(offer(&b.balance, Some(account), inputs.sent, now)),
        (Some(b), Some(Payer::Star)) => Some(offer(&b.balance, star, inputs.sent, now)),
        _ => None,
    };
    let terms = inputs
        .balance
        .map(|b| terms_for(&b.balance, b.global, inputs.policy));
    let itself = payer == Some(Payer::Itself);
    let before = (account.leases().len(), account.settled().len());
    let decision = match account.admit(inputs.policy, &request, now, new_id) {
        Ok(decision) => decision,
        // Deciding may have pruned before it failed.
        Err(e) => {
            let pruned = before != (account.leases().len(), account.settled().len());
            return (Err(e), Propagate::effect(Effect::pruned(now, pruned)));
        }
    };
    let usage = inputs.verbose.then(|| account.usage(now));
    let terms_changed = !request.peek && account.set_terms(terms);
    let change = admission_charge(
        &decision,
        inputs.key,
        request.lease,
        now,
        request.lease_ttl_ms,
    );
    if let (Some(change), true) = (&change, itself) {
        account.apply_balance(now, change);
    }
    let mut effect =
        Effect::admitted(now, &decision, account).unwrap_or_else(|| Effect::empty(now));
    if terms_changed {
        effect.terms = Some(TermsChange::to(terms));
    }
    if itself {
        effect.balance = change;
    }
    let propagate = match effect.is_empty() {
        false if inputs.listened => Propagate::Effect(effect.encode()),
        false => Propagate::Counted,
        true if decision.changed() => Propagate::State,
        true => Propagate::Nothing,
    };
    let star_change = change.filter(|_| payer == Some(Payer::Star));
    let admitted = Admitted {
        decision,
        usage,
        star_change,
    };
    (Ok(admitted), propagate)
}

/// Decides a commit of `tokens` (and lease `lease`) on account `key`; `payer` is who holds
/// the balance its terms name. The account's own balance is settled here; the `'*'` account's
/// (`Payer::Star`) by the shell with `settlement` and `charge`.
pub(crate) fn commit(
    account: &mut Account,
    key: &[u8],
    tokens: u64,
    lease: Option<&str>,
    payer: Option<Payer>,
    now: Millis,
) -> (Result<CommitOutcome, AccountError>, Propagate) {
    let pruned = account.prune(now);
    let rates = account.rates().copied();
    match account.commit(tokens, lease, now) {
        Ok(outcome) => {
            let rates = rates_change(rates, account);
            let mut effect = Effect::committed(now, pruned, tokens, lease, &outcome, rates);
            if payer == Some(Payer::Itself) && !outcome.duplicate {
                let how = Settle::Commit {
                    debit: outcome.balance_debit,
                };
                if let Some(change) = settlement(Some(account), key, lease, how, now) {
                    account.apply_balance(now, &change);
                    effect.get_or_insert_with(|| Effect::empty(now)).balance = Some(change);
                }
            }
            (Ok(outcome), Propagate::effect(effect))
        }
        // Refused (too many remembered ids): only the prune, if any, changed the state.
        Err(e) => (Err(e), Propagate::effect(Effect::pruned(now, pruned))),
    }
}

/// Decides a release of lease `lease` on account `key`: whether it was held, and what to
/// propagate. A request the account's own balance paid is refunded here; the `'*'` account's
/// (`Payer::Star`) by the shell with `settlement` and `charge`.
pub(crate) fn release(
    account: &mut Account,
    key: &[u8],
    lease: &str,
    payer: Option<Payer>,
    now: Millis,
) -> (bool, Propagate) {
    let pruned = account.prune(now);
    let rates = account.rates().copied();
    let released = account.release(lease, now);
    let rates = rates_change(rates, account);
    let mut effect = Effect::released(now, pruned, lease, released, rates);
    if payer == Some(Payer::Itself) && released {
        if let Some(change) = settlement(Some(account), key, Some(lease), Settle::Release, now) {
            account.apply_balance(now, &change);
            effect.get_or_insert_with(|| Effect::empty(now)).balance = Some(change);
        }
    }
    (released, Propagate::effect(effect))
}
