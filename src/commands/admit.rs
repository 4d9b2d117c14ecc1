//! `QUOTA.ADMIT`: one atomic step on the main thread, in four parts.
//!
//! 1. gather: the named policy, if any, and the user's credits (`runtime::gather`), unless
//!    the account key remembers the credit it used while the cache has not changed
//!    (`CreditMemo`). On a miss the client waits once, for one load, and `AdmitWait` resumes
//!    here with what it brought (or, when the wait ran out, decides on the base policy with
//!    `replenishment unavailable`);
//! 2. decide: `core::decide::admit` (the limits, who pays, what the balance is charged);
//! 3. apply: store the account, propagate `QUOTA.APPLY <key> <effect>` (replicas and the AOF
//!    apply it and never re-run a decision), charge the `'*'` account when it pays;
//! 4. reply (`replies`).

use super::error::{CommandError, CANNOT_BLOCK, CREDITS_LOADING};
use super::replication::{charge, open_star, update, EVENT_ADMIT, EVENT_DENIED};
use super::{policies, replies, Waiting};
use crate::core::account::AdmitRequest;
use crate::core::credit::{select_credit, CreditSource, Replenishment};
use crate::core::credit_memo::{CreditMemo, Remembered};
use crate::core::decide::{self, AdmitInputs, Admitted, Payer, RowTerms};
use crate::core::ids::{KeyBuf, PolicyId};
use crate::core::policy::{EffectivePolicy, Limits};
use crate::core::Millis;
use crate::ffi::account_type::AccountKey;
use crate::ffi::ctx::Ctx;
use crate::parse::{self, AdmitArgs, OwnedAdmit};
use crate::runtime::config::{self, ScriptMiss};
use crate::runtime::gather::{gather, CreditsFound, Gathered, Needs, PolicyFound, WaitMode};
use crate::runtime::jobs::{Done, StoreError};
use crate::runtime::{cache, clock, ledger, stats};

/// `QUOTA.ADMIT`.
pub(crate) fn admit(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let parsed = parse::admit(args, config::MAX_LEASE_TTL)?;
    let now = clock::command_now_ms(ctx);
    let (policy, credits) = (PolicyFound::NotAsked, CreditsFound::NotAsked);
    gather_and_decide(ctx, &parsed, WaitMode::Block, policy, credits, now)
}

/// Opens the account, gathers what `policy` and `credits` do not say yet (waiting as `mode`
/// allows: then the reply comes later) and decides: the one path of a first call, a resumed
/// wait and an expired one.
fn gather_and_decide(
    ctx: Ctx,
    parsed: &AdmitArgs<'_>,
    mode: WaitMode,
    policy: PolicyFound,
    credits: CreditsFound,
    now: Millis,
) -> Result<(), CommandError> {
    // Opened first: the account's value loads (a cache miss) while the policy is looked up.
    let mut opened = Opened::open(ctx, parsed)?;
    match inputs(ctx, parsed, &mut opened, mode, policy, credits, now)? {
        Some(inputs) => decide(ctx, parsed, opened, inputs, now),
        None => Ok(()),
    }
}

/// An admission's account key, opened: its name, the length of the user-key prefix of the
/// name, and the key.
struct Opened {
    name: KeyBuf,
    user_len: usize,
    key: AccountKey,
}

impl Opened {
    fn open(ctx: Ctx, parsed: &AdmitArgs<'_>) -> Result<Opened, CommandError> {
        let (name, user_len) = parsed.account.key();
        let key = AccountKey::open(ctx, &name)?;
        Ok(Opened {
            name,
            user_len,
            key,
        })
    }

    /// The user's key (the credits cache's key): the prefix of the account key's name.
    fn user_key(&self) -> &[u8] {
        self.name.get(..self.user_len).unwrap_or(&self.name)
    }
}

/// What an admission decides on, gathered.
struct Inputs {
    /// The base policy: the named one with the inline limits over it, or the inline limits.
    base: Limits,
    /// The credit that applies, with where it came from and its row's balance.
    credit: Remembered,
    /// The credit to remember on the account key, read from a fresh cache entry.
    memo: Option<CreditMemo>,
}

/// Gathers an admission's inputs; `policy` and `credits` are what is known already (after a
/// wait), `NotAsked` for what the caches must tell. `None` when the client now waits.
fn inputs(
    ctx: Ctx,
    parsed: &AdmitArgs<'_>,
    opened: &mut Opened,
    mode: WaitMode,
    mut policy: PolicyFound,
    mut credits: CreditsFound,
    now: Millis,
) -> Result<Option<Inputs>, CommandError> {
    let name = parsed.policy.unwrap_or_default();
    let named = parsed.policy.map(|name| PolicyId {
        tenant: parsed.account.user.tenant,
        project: parsed.account.user.project,
        name,
    });
    // The credit this account used a moment ago, if the cache has not changed since.
    let mut remembered = None;
    if matches!(credits, CreditsFound::NotAsked) {
        remembered = opened
            .key
            .memo()
            .and_then(|memo| memo.get(&opened.name, cache::cache_epoch(), now));
        if remembered.is_some() {
            stats::CACHE_MEMO_HITS.incr();
        }
    }
    let needs = Needs {
        policy: named.filter(|_| policy == PolicyFound::NotAsked),
        credits: (remembered.is_none() && matches!(credits, CreditsFound::NotAsked))
            .then(|| (opened.user_key(), parsed.account.user)),
    };
    if needs.policy.is_some() || needs.credits.is_some() {
        let request = |found: Option<Limits>| AdmitWait {
            request: parsed.kept(),
            policy: found,
        };
        match gather(ctx, needs, mode, now, request) {
            Gathered::Ready(p, c) => {
                if needs.policy.is_some() {
                    policy = p;
                }
                if needs.credits.is_some() {
                    credits = c;
                }
            }
            Gathered::Waiting => return Ok(None),
            Gathered::CannotBlock => return Err(CommandError::Text(CANNOT_BLOCK)),
        }
    }
    let base = match (policy, parsed.policy) {
        (_, None) | (PolicyFound::NotAsked, _) => parsed.base,
        (PolicyFound::Limits(limits), _) => limits.overlaid_with(&parsed.base),
        (PolicyFound::NoSuchPolicy, _) => return Err(policies::unknown(name).into()),
        // In MULTI or a script: the caller retries.
        (PolicyFound::Missing, _) if mode == WaitMode::Block => {
            return Err(policies::loading(name).into());
        }
        (PolicyFound::Missing | PolicyFound::Unavailable, _) => {
            return Err(policies::unavailable(name).into());
        }
    };
    let bundle = parsed.account.bundle;
    let mut memo = None;
    let credit = match (remembered, credits) {
        (Some(remembered), _) => remembered,
        (
            None,
            CreditsFound::Fresh {
                rows,
                epoch,
                fresh_until,
            },
        ) => {
            let (additional, source, balance) = pick(&rows, bundle, now);
            let (found, b) = ((additional, source), balance.as_ref());
            memo = CreditMemo::new(&opened.name, found, b, &rows, epoch, fresh_until, now);
            (additional, source, balance)
        }
        (None, CreditsFound::Stale(rows)) => pick(&rows, bundle, now),
        (None, CreditsFound::Unavailable) => (None, CreditSource::Unavailable, None),
        (None, CreditsFound::Missing) if mode == WaitMode::Block => match config::script_miss() {
            ScriptMiss::base => (None, CreditSource::Pending, None),
            ScriptMiss::error => return Err(CommandError::Text(CREDITS_LOADING)),
        },
        (None, CreditsFound::Missing | CreditsFound::NotAsked) => {
            (None, CreditSource::Pending, None)
        }
    };
    Ok(Some(Inputs { base, credit, memo }))
}

/// The credit that applies among `rows`: the amounts it adds, where it came from and the
/// balance of its row.
fn pick(rows: &[Replenishment], bundle: &str, now: Millis) -> Remembered {
    match select_credit(rows, bundle, now) {
        Some((row, source)) => (
            Some(row.additional),
            source,
            row.balance.as_deref().copied(),
        ),
        None => (None, CreditSource::None, None),
    }
}

/// An `ADMIT` waiting on PostgreSQL: its request, owned, and its named policy's limits when
/// they were found before it blocked (it then waited on its user's credits alone).
struct AdmitWait {
    request: OwnedAdmit,
    policy: Option<Limits>,
}

impl AdmitWait {
    /// The policy known before the wait (`NotAsked`: the caches tell).
    fn known_policy(&self) -> PolicyFound {
        self.policy
            .map_or(PolicyFound::NotAsked, PolicyFound::Limits)
    }
}

impl Waiting for AdmitWait {
    fn resumed(self, ctx: Ctx, done: Done) -> Result<(), CommandError> {
        let parsed = self.request.args();
        let now = clock::now_ms();
        let name = parsed.policy.unwrap_or_default();
        let base_known = parsed.policy.is_none() || self.policy.is_some();
        let (policy, credits) = match done {
            Done::Loaded(loaded) => {
                let policy = match loaded.policy {
                    Some(Ok(found)) => found.map_or(PolicyFound::NoSuchPolicy, PolicyFound::Limits),
                    Some(Err(e)) => return Err(policy_failed(name, e)),
                    None => self.known_policy(),
                };
                let credits = match loaded.credits {
                    Some(Ok(rows)) => CreditsFound::Stale(rows),
                    Some(Err(_)) => CreditsFound::Unavailable,
                    // Waited on the policy; the credits come from the cache (or load for later).
                    None => CreditsFound::NotAsked,
                };
                (policy, credits)
            }
            Done::Dropped if base_known => (self.known_policy(), CreditsFound::Unavailable),
            other => return Err(CommandError::undone(&other)),
        };
        gather_and_decide(ctx, &parsed, WaitMode::Never, policy, credits, now)
    }

    /// PostgreSQL is too slow: decide on the base policy rather than fail the request (when
    /// the named policy itself was not in, only a cached copy can stand in for it).
    fn expired(self, ctx: Ctx) -> Result<(), CommandError> {
        let parsed = self.request.args();
        let (policy, credits) = (self.known_policy(), CreditsFound::Unavailable);
        gather_and_decide(
            ctx,
            &parsed,
            WaitMode::Never,
            policy,
            credits,
            clock::now_ms(),
        )
    }
}

/// The error for a named policy whose load failed.
fn policy_failed(name: &str, e: StoreError) -> CommandError {
    if e.is_unavailable() {
        policies::unavailable(name).into()
    } else {
        e.into()
    }
}

/// Decides on the opened account, applies the decision and replies.
fn decide(
    ctx: Ctx,
    parsed: &AdmitArgs<'_>,
    opened: Opened,
    inputs: Inputs,
    now: Millis,
) -> Result<(), CommandError> {
    let Opened {
        name: key,
        key: mut account_key,
        ..
    } = opened;
    account_key.prefetch_ledger();
    let (additional, source, balance) = inputs.credit;
    let policy = EffectivePolicy::merge(inputs.base, additional.as_ref());
    let lease_ttl = parsed
        .lease_ttl
        .unwrap_or_else(|| config::int(&config::LEASE_TTL).max(1));
    let global = source == CreditSource::Global;
    let balance = balance.map(|balance| RowTerms { balance, global });
    let mut star = match balance {
        Some(b) if decide::payer(parsed.account.bundle, b.global) == Payer::Star => {
            Some(open_star(ctx, &parsed.account)?)
        }
        _ => None,
    };
    // Whether the row read from PostgreSQL may count a batch of its holder's that the flush
    // has not acknowledged yet, and that batch; such a row is not remembered on the account (a
    // memo does not keep what tells).
    let unacknowledged = balance.is_some_and(|b| {
        let holder = match star.as_mut() {
            Some(star) => star.get(),
            None => account_key.get(),
        };
        decide::counts_unacknowledged(&b.balance, holder.map(|a| &*a))
    });
    let sent = match (&star, unacknowledged) {
        (_, false) => None,
        (Some(star), true) => ledger::unacknowledged(ctx.db(), star.name_bytes()),
        (None, true) => ledger::unacknowledged(ctx.db(), &key),
    };
    let request = AdmitRequest {
        lease: parsed.lease,
        lease_ttl_ms: lease_ttl.saturating_mul(1000),
        reserve: parsed.reserve,
        peek: parsed.peek,
        cost: parsed.cost,
        balance: None,
    };
    let holder = star.as_mut().and_then(|s| s.get()).map(|a| &*a);
    let Admitted {
        mut decision,
        usage,
        star_change,
    } = update(ctx, &mut account_key, |account, listened| {
        let admission = AdmitInputs {
            key: &key,
            bundle: parsed.account.bundle,
            policy: &policy,
            request,
            balance,
            sent,
            verbose: parsed.verbose,
            listened,
        };
        decide::admit(account, &admission, holder, now, clock::new_lease_id)
    })?;
    if let (Some(change), Some(star)) = (star_change, star.as_mut()) {
        charge(ctx, star, now, change);
    }
    if !decision.allowed() {
        decision.retry_after = source.denial_retry_after(decision.retry_after);
        decision.retry_after_ms = source.denial_retry_after_ms(decision.retry_after_ms);
    }
    if let Some(memo) = inputs.memo.filter(|_| !unacknowledged) {
        account_key.set_memo(memo);
    }
    count(&decision, source);
    if decision.changed() {
        account_key.notify(EVENT_ADMIT);
    }
    // Every denial, on the node that decided it (a denial changes nothing, so nothing is
    // propagated and replicas stay silent): the hook for "user hit their limit" notices.
    if !decision.allowed() {
        account_key.notify(EVENT_DENIED);
    }
    if parsed.compact {
        replies::reply_compact(ctx, &decision, source);
    } else {
        replies::reply_decision(ctx, &decision, source, &policy, usage.as_ref());
    }
    Ok(())
}

/// Counts the admission for `INFO quota`.
fn count(decision: &crate::core::account::AdmitDecision, source: CreditSource) {
    if decision.allowed() {
        stats::ADMITS_ALLOWED.incr();
        if decision.paid_by_balance() {
            stats::ADMITS_BALANCE.incr();
        }
    } else {
        stats::ADMITS_DENIED.incr();
    }
    match source {
        CreditSource::Pending => stats::ADMITS_PENDING.incr(),
        CreditSource::Unavailable => stats::ADMITS_UNAVAILABLE.incr(),
        _ => {}
    }
}
