//! `QUOTA.ADMIT`, `COMMIT`, `RELEASE`, `USAGE`, `RESET` and the internal `QUOTA.APPLY` and
//! `QUOTA.SETSTATE`.
//!
//! Admission is one atomic step on the main thread: find the user's credits (remembered on the
//! account key while the cache has not changed, else the cache), merge them into the caller's
//! base policy, decide on the account key, store the new state and replicate what changed as
//! `QUOTA.APPLY <key> <effect>` (replicas and the AOF apply it and never re-run a decision).
//! On a cache miss the client is blocked while a worker loads the rows, and the same function
//! decides once they arrive (`admit_resumed`) or once the wait ran out (`admit_timed_out`,
//! base policy, `replenishment unavailable`).

use super::error::{CommandError, CANNOT_BLOCK, CREDITS_LOADING};
use super::parse::OwnedAdmit;
use super::{parse, policies, words, Waiting};
use crate::core::account::{Account, AdmitDecision, AdmitRequest, BalanceOffer, Usage};
use crate::core::cache::{Lookup, UserCredits};
use crate::core::credit::{
    select_credit, BalanceKind, CreditMemo, CreditSource, Remembered, Replenishment, RowBalance,
};
use crate::core::effect::{Change, Effect, EncodedEffect};
use crate::core::ids::{AccountId, KeyBuf, PolicyId, ANY_BUNDLE};
use crate::core::ledger::{balance_left, hold_tag, BalanceChange, BalanceTerms, Hold};
use crate::core::policy::{Additional, CachedPolicy, EffectivePolicy, LimitField, Limits};
use crate::core::Millis;
use crate::ffi::account_type::AccountKey;
use crate::ffi::blocked::Blocked;
use crate::ffi::ctx::Ctx;
use crate::ffi::propagation;
use crate::ffi::reply::{Reply, Word};
use crate::runtime::cache::{self, PolicyWaiter};
use crate::runtime::clock;
use crate::runtime::config::{self, ScriptMiss};
use crate::runtime::jobs::{CreditWaiter, Done, OwnedUser, StoreError};
use crate::runtime::ledger;
use crate::runtime::stats;
use crate::runtime::worker;

/// Keyspace events (module class) on the account key, documented in the README.
const EVENT_ADMIT: &std::ffi::CStr = c"quota.admit";
const EVENT_COMMIT: &std::ffi::CStr = c"quota.commit";
const EVENT_RELEASE: &std::ffi::CStr = c"quota.release";
const EVENT_RESET: &std::ffi::CStr = c"quota.reset";
const EVENT_SETSTATE: &std::ffi::CStr = c"quota.setstate";

/// Where the credits for this decision come from.
enum Credits {
    /// The cache; on a miss the client waits for the load (a fresh command).
    Cache,
    /// The cache; on a miss the decision goes on without them (`pending`) and the load runs
    /// for the next call: the command waited once already (for its policy).
    CacheNoWait,
    /// A worker loaded them (or failed to).
    Loaded(Result<UserCredits, StoreError>),
    /// The wait for PostgreSQL ran out (or the load was dropped at shutdown).
    Unavailable,
}

/// The credit that applies, as the amounts it adds and where it came from.
fn pick(rows: &[Replenishment], bundle: &str, now: Millis) -> (Option<Additional>, CreditSource) {
    match select_credit(rows, bundle, now) {
        Some((row, source)) => (Some(row.additional), source),
        None => (None, CreditSource::None),
    }
}

/// `QUOTA.ADMIT`.
pub(crate) fn admit(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let parsed = parse::admit(args, config::MAX_LEASE_TTL)?;
    // Opened first: the account's value loads (a cache miss) while the policy is looked up.
    let opened = Opened::open(ctx, &parsed)?;
    let now = clock::command_now_ms(ctx);
    let base = match parsed.policy {
        None => parsed.base,
        Some(name) => match named_policy(ctx, &parsed, name, PolicyWait::IfMissing, now)? {
            Some(found) => overlaid(&parsed, name, found)?,
            None => return Ok(()), // blocked on the policy: the reply comes later
        },
    };
    admit_with(ctx, &parsed, base, Credits::Cache, now, opened)
}

/// An admission's account key, opened: its name, the length of the user-key prefix of the
/// name, and the key.
struct Opened {
    name: KeyBuf,
    user_len: usize,
    key: AccountKey,
}

impl Opened {
    fn open(ctx: Ctx, parsed: &parse::AdmitArgs<'_>) -> Result<Opened, CommandError> {
        let (name, user_len) = parsed.account.key();
        let key = AccountKey::open(ctx, &name)?;
        Ok(Opened {
            name,
            user_len,
            key,
        })
    }
}

/// An `ADMIT` waiting on PostgreSQL: its request, owned, and its base policy when that was
/// known before it blocked (it then waited on its user's credits alone).
struct AdmitWait {
    request: OwnedAdmit,
    base: Option<Limits>,
}

impl Waiting for AdmitWait {
    fn resumed(self, ctx: Ctx, done: Done) -> Result<(), CommandError> {
        let parsed = self.request.args();
        let name = parsed.policy.unwrap_or_default();
        let now = clock::now_ms();
        let (base, credits) = match (self.base, done) {
            (Some(base), Done::Loaded { credits, .. }) => (base, Credits::Loaded(credits)),
            (Some(base), Done::Dropped) => (base, Credits::Unavailable),
            // Waited on the policy, then (not cached either) on the credits.
            (
                None,
                Done::Loaded {
                    credits,
                    policy: Some(found),
                },
            ) => (overlaid(&parsed, name, found)?, Credits::Loaded(credits)),
            // Waited on the policy; the credits were cached meanwhile (or now load for later).
            (None, Done::Policy(found)) => {
                let found = found.map_err(|e| policy_failed(name, e))?;
                (overlaid(&parsed, name, found)?, Credits::CacheNoWait)
            }
            (_, other) => return Err(CommandError::undone(&other)),
        };
        let opened = Opened::open(ctx, &parsed)?;
        admit_with(ctx, &parsed, base, credits, now, opened)
    }

    /// PostgreSQL is too slow: decide on the base policy rather than fail the request (when
    /// the named policy itself was not in, only a cached copy can stand in for it).
    fn expired(self, ctx: Ctx) -> Result<(), CommandError> {
        let parsed = self.request.args();
        let now = clock::now_ms();
        let base = match (self.base, parsed.policy) {
            (Some(base), _) => base,
            (None, None) => parsed.base,
            (None, Some(name)) => match named_policy(ctx, &parsed, name, PolicyWait::Never, now)? {
                Some(found) => overlaid(&parsed, name, found)?,
                None => return Err(policies::unavailable(name).into()),
            },
        };
        let opened = Opened::open(ctx, &parsed)?;
        admit_with(ctx, &parsed, base, Credits::Unavailable, now, opened)
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

/// The named policy with the inline limits over it field by field.
fn overlaid(
    parsed: &parse::AdmitArgs<'_>,
    name: &str,
    found: CachedPolicy,
) -> Result<Limits, CommandError> {
    match found {
        Some(limits) => Ok(limits.overlaid_with(&parsed.base)),
        None => Err(policies::unknown(name).into()),
    }
}

/// Decides with the credits `credits` points to; blocks the client when they must be loaded
/// first (`Credits::Cache` on a miss), keeping `base` with its request.
#[inline]
fn admit_with(
    ctx: Ctx,
    parsed: &parse::AdmitArgs<'_>,
    base: Limits,
    credits: Credits,
    now: Millis,
    opened: Opened,
) -> Result<(), CommandError> {
    let Opened {
        name: key,
        user_len,
        key: mut account_key,
    } = opened;
    let user_key = key.get(..user_len).unwrap_or(&key);
    let mut memo = None;
    let mut balance = None;
    let (additional, source) = match credits {
        // The credit this account used a moment ago, if the cache has not changed since.
        Credits::Cache | Credits::CacheNoWait
            if let Some((additional, source, remembered_balance)) =
                remembered(&mut account_key, &key, now) =>
        {
            balance = remembered_balance;
            (additional, source)
        }
        Credits::Cache | Credits::CacheNoWait => {
            let wait = matches!(credits, Credits::Cache);
            let mut cache = cache::cache();
            let epoch = cache.epoch();
            let (found, load) = match cache.find(user_key, now) {
                Lookup::Fresh(rows, fresh_until) => {
                    let found = pick(rows, parsed.account.bundle, now);
                    balance = balance_of(rows, parsed.account.bundle, now);
                    let b = balance.as_ref();
                    memo = CreditMemo::new(&key, found, b, rows, epoch, fresh_until, now);
                    (Ok(Some(found)), None)
                }
                Lookup::Stale { rows, refresh } => {
                    balance = balance_of(rows, parsed.account.bundle, now);
                    (Ok(Some(pick(rows, parsed.account.bundle, now))), refresh)
                }
                Lookup::Unavailable => (Ok(Some((None, CreditSource::Unavailable))), None),
                Lookup::Miss { load } if !wait => (Ok(Some((None, CreditSource::Pending))), load),
                Lookup::Miss { load } if ctx.can_block() => {
                    let request = AdmitWait {
                        request: parsed.kept(),
                        base: Some(base),
                    };
                    let waited = match Blocked::block(ctx, config::block_timeout_ms(), request) {
                        Some(client) => {
                            if let Err(waiter) =
                                cache.add_waiter(user_key, CreditWaiter::new(client))
                            {
                                waiter.client.finish(Done::Dropped);
                            }
                            Ok(None)
                        }
                        None => Err(CommandError::Text(CANNOT_BLOCK)),
                    };
                    (waited, load)
                }
                Lookup::Miss { load } => match config::script_miss() {
                    ScriptMiss::base => (Ok(Some((None, CreditSource::Pending))), load),
                    ScriptMiss::error => (Err(CommandError::Text(CREDITS_LOADING)), load),
                },
            };
            drop(cache);
            if let Some(flight) = load {
                worker::submit_load(user_key, &parsed.account.user, flight);
            }
            match found? {
                Some(found) => found,
                None => return Ok(()), // blocked: the reply comes later
            }
        }
        Credits::Loaded(Ok(rows)) => {
            balance = balance_of(&rows, parsed.account.bundle, now);
            pick(&rows, parsed.account.bundle, now)
        }
        Credits::Loaded(Err(_)) | Credits::Unavailable => (None, CreditSource::Unavailable),
    };
    decide(
        ctx,
        parsed,
        &key,
        base,
        &mut account_key,
        (additional, source, memo, balance),
        now,
    )
}

/// The balance of the credit row that applies, if it has one.
fn balance_of(rows: &[Replenishment], bundle: &str, now: Millis) -> Option<RowBalance> {
    select_credit(rows, bundle, now).and_then(|(row, _)| row.balance.as_deref().copied())
}

/// Whether a policy lookup may wait for a load.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PolicyWait {
    /// On a miss, block the client until the policy (and, chained after it, the user's
    /// credits) is loaded; where it cannot wait (MULTI, scripts) answer `TRYAGAIN`.
    IfMissing,
    /// Only what is cached (the wait ran out already).
    Never,
}

/// Looks the named policy up in the policy cache: `Ok(None)` when the client now waits for
/// its load (`PolicyWait::IfMissing`) or it is not cached (`PolicyWait::Never`).
fn named_policy(
    ctx: Ctx,
    parsed: &parse::AdmitArgs<'_>,
    name: &str,
    wait: PolicyWait,
    now: Millis,
) -> Result<Option<CachedPolicy>, CommandError> {
    let id = PolicyId {
        tenant: parsed.account.user.tenant,
        project: parsed.account.user.project,
        name,
    };
    if let Some(found) = cache::remembered_policy(&id, now) {
        return Ok(Some(found));
    }
    let key = id.key();
    let mut cache = cache::policies();
    let epoch = cache.epoch();
    let (found, load) = match cache.find(&key, now) {
        Lookup::Fresh(found, fresh_until) => {
            cache::remember_policy(&id, *found, epoch, fresh_until, now);
            (Ok(Some(*found)), None)
        }
        Lookup::Stale { rows, refresh } => (Ok(Some(*rows)), refresh),
        Lookup::Unavailable => (Err(policies::unavailable(name).into()), None),
        Lookup::Miss { load } if wait == PolicyWait::Never => (Ok(None), load),
        Lookup::Miss { load } if ctx.can_block() => {
            let (key_buf, user_len) = parsed.account.key();
            let user_key = key_buf.get(..user_len).unwrap_or(&key_buf);
            let request = AdmitWait {
                request: parsed.kept(),
                base: None,
            };
            let waited = match Blocked::block(ctx, config::block_timeout_ms(), request) {
                Some(client) => {
                    let then = Some((
                        Box::from(user_key),
                        OwnedUser::from_id(&parsed.account.user),
                    ));
                    if let Err(waiter) = cache.add_waiter(&key, PolicyWaiter { client, then }) {
                        waiter.client.finish(Done::Dropped);
                    }
                    Ok(None)
                }
                None => Err(CommandError::Text(CANNOT_BLOCK)),
            };
            (waited, load)
        }
        // In MULTI or a script: the caller retries.
        Lookup::Miss { load } => (Err(policies::loading(name).into()), load),
    };
    drop(cache);
    if let Some(flight) = load {
        worker::submit_policy_load(&id, flight);
    }
    found
}

/// The credit remembered on the account, if it was chosen for this key and still holds
/// (counted as a cache hit).
fn remembered(account_key: &mut AccountKey, key: &[u8], now: Millis) -> Option<Remembered> {
    let found = account_key.memo()?.get(key, cache::cache_epoch(), now)?;
    stats::CACHE_MEMO_HITS.incr();
    Some(found)
}

/// Decides on account `key` (`parsed.account`'s key) and replies.
fn decide(
    ctx: Ctx,
    parsed: &parse::AdmitArgs<'_>,
    key: &[u8],
    base: Limits,
    account_key: &mut AccountKey,
    (additional, source, memo, balance): (
        Option<Additional>,
        CreditSource,
        Option<CreditMemo>,
        Option<RowBalance>,
    ),
    now: Millis,
) -> Result<(), CommandError> {
    account_key.prefetch_ledger();
    let policy = EffectivePolicy::merge(base, additional.as_ref());
    let lease_ttl = parsed
        .lease_ttl
        .unwrap_or_else(|| config::int(&config::LEASE_TTL).max(1));
    let lease_ttl_ms = lease_ttl.saturating_mul(1000);
    let mut request = AdmitRequest {
        lease: parsed.lease,
        lease_ttl_ms,
        reserve: parsed.reserve,
        peek: parsed.peek,
        balance: None,
    };
    // A balance: who holds it, what it has left, and the terms commits will debit it on.
    let global = source == CreditSource::Global;
    let terms = balance.map(|b| terms_for(&b, global, &policy));
    let mut holder = match balance {
        Some(_) => Some(Holder::open(ctx, &parsed.account, global)?),
        None => None,
    };
    if let (Some(b), Some(Holder::Other(h))) = (balance, holder.as_mut()) {
        request.balance = Some(offer(&b, h.get().map(|a| &*a), now));
    }
    let is_self = matches!(holder, Some(Holder::This));
    let decided = update(ctx, account_key, |account| {
        let before = (account.leases().len(), account.settled().len());
        if let (Some(b), true) = (balance, is_self) {
            request.balance = Some(offer(&b, Some(account), now));
        }
        match account.admit(&policy, &request, now, clock::new_lease_id) {
            Ok(decision) => {
                let usage = parsed.verbose.then(|| account.usage(now));
                let terms_changed = !parsed.peek && account.set_terms(terms);
                let change = balance_change(&decision, key, parsed.lease, now, lease_ttl_ms);
                if let (Some(change), true) = (&change, is_self) {
                    account.apply_balance(now, change);
                }
                let mut effect =
                    Effect::admitted(now, &decision, account).unwrap_or_else(|| Effect::empty(now));
                if terms_changed {
                    effect.terms = Some(terms);
                }
                if is_self {
                    effect.balance = change;
                }
                let propagate = match effect.is_empty() {
                    false => encoded(effect),
                    true if decision.changed => Propagate::State,
                    true => Propagate::Nothing,
                };
                (Ok((decision, usage, change)), propagate)
            }
            // Deciding may have pruned before it failed.
            Err(e) => {
                let pruned = before != (account.leases().len(), account.settled().len());
                (
                    Err(e),
                    Effect::pruned(now, pruned).map_or(Propagate::Nothing, encoded),
                )
            }
        }
    });
    let (mut decision, usage, change) = decided?;
    if let (Some(change), Some(Holder::Other(h))) = (change, holder.as_mut()) {
        charge(ctx, h, now, change);
    }
    if !decision.allowed {
        decision.retry_after = source.denial_retry_after(decision.retry_after);
    }
    if let Some(memo) = memo {
        account_key.set_memo(memo);
    }
    if decision.allowed {
        stats::ADMITS_ALLOWED.incr();
        if decision.paid_by_balance {
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
    if decision.changed {
        account_key.notify(EVENT_ADMIT);
    }
    if parsed.compact {
        reply_compact(ctx, &decision, source);
    } else {
        reply_decision(ctx, &decision, source, &policy, usage.as_ref());
    }
    Ok(())
}

/// Where the balance an account draws on is held: the account itself (its own row's balance,
/// or the `'*'` row's for the `'*'` account), or the user's `'*'` account.
enum Holder {
    This,
    Other(AccountKey),
}

impl Holder {
    fn open(ctx: Ctx, account: &AccountId<'_>, global: bool) -> Result<Holder, CommandError> {
        if !global || account.bundle == ANY_BUNDLE {
            return Ok(Holder::This);
        }
        let star = AccountId {
            user: account.user,
            bundle: ANY_BUNDLE,
        };
        Ok(Holder::Other(AccountKey::open(ctx, &star.key().0)?))
    }
}

/// What the balance `b` has left for an admission at `now`, given its holder's state.
fn offer(b: &RowBalance, holder: Option<&Account>, now: Millis) -> BalanceOffer {
    BalanceOffer {
        left: balance_left(b, holder.and_then(|a| a.ledger()), now),
    }
}

/// The terms an account's commits debit a balance on: the holder, and the effective token
/// limits beyond which tokens are debited (none without a token balance).
fn terms_for(b: &RowBalance, global: bool, policy: &EffectivePolicy) -> BalanceTerms {
    let limit = |f: LimitField| match b.granted[BalanceKind::Tokens as usize] {
        Some(_) => policy.limits.get(f).unwrap_or(u64::MAX),
        None => u64::MAX,
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

/// What an admission changes on its balance holder: one request debited when the balance paid
/// for it, and a hold for its lease (the tokens held, and whether the request was paid, so a
/// release refunds it).
fn balance_change(
    d: &AdmitDecision,
    key: &[u8],
    lease: Option<&str>,
    now: Millis,
    lease_ttl_ms: Millis,
) -> Option<BalanceChange> {
    if !d.counted || !(d.debit_request || d.held_tokens > 0) {
        return None;
    }
    let mut buf = [0u8; 16];
    let hold = d.lease.as_ref().map(|id| Hold {
        tag: hold_tag(key, lease.unwrap_or_else(|| id.as_text(&mut buf))),
        expires_at: now.saturating_add(lease_ttl_ms.max(1)),
        tokens: d.held_tokens,
        paid_request: d.debit_request,
    });
    Some(BalanceChange {
        debits: [i64::from(d.debit_request), 0],
        hold,
        settle: None,
    })
}

/// Applies `change` to another account holding the balance and propagates it.
fn charge(ctx: Ctx, holder: &mut AccountKey, now: Millis, change: BalanceChange) {
    update(ctx, holder, |h| {
        h.apply_balance(now, &change);
        let effect = Effect {
            balance: Some(change),
            ..Effect::empty(now)
        };
        ((), encoded(effect))
    });
    track(ctx, holder);
}

/// What a commit or release of lease `lease` (or none) owes the holder: `debit` tokens, the
/// refund of a request the balance paid (a release), and the lease's hold settled.
fn settlement(
    holder: Option<&Account>,
    key: &[u8],
    lease: Option<&str>,
    debit: u64,
    release: bool,
    now: Millis,
) -> Option<BalanceChange> {
    let hold = lease.and_then(|l| {
        let tag = hold_tag(key, l);
        holder
            .and_then(|a| a.ledger())
            .and_then(|led| led.hold(tag, now).copied())
    });
    let refund = release && hold.is_some_and(|h| h.paid_request);
    let change = BalanceChange {
        debits: [-i64::from(refund), i64::try_from(debit).unwrap_or(i64::MAX)],
        hold: None,
        settle: hold.map(|h| h.tag),
    };
    (!change.is_empty()).then_some(change)
}

/// The `COMPACT` reply: a flat array read by position, the same under RESP2 and RESP3:
/// `[allowed, retry_after, remaining_requests, remaining_tokens, lease, reason, reserved,
/// replenishment]`, with `lease` and `reason` as "" when there is none.
fn reply_compact(ctx: Ctx, d: &AdmitDecision, source: CreditSource) {
    let mut buf = [0u8; 16];
    let lease = d.lease.as_ref().map_or("", |id| id.as_text(&mut buf));
    let r = ctx
        .reply()
        .array(9)
        .int(i64::from(d.allowed))
        .int(d.retry_after)
        .int(d.remaining_requests)
        .int(d.remaining_tokens)
        .str(lease);
    reason(r, d)
        .uint(d.reserved)
        .word(words::source(source))
        .word(paid_by(d));
}

/// Who paid an admitted request: `windows` (the policy and window credits), `balance` (a
/// window would have denied), or `""` when denied.
fn paid_by(d: &AdmitDecision) -> &'static Word {
    match (d.allowed, d.paid_by_balance) {
        (false, _) => &words::EMPTY,
        (true, false) => &words::WINDOWS,
        (true, true) => &words::BALANCE,
    }
}

/// The decision's `reason`: the empty word when it admits.
fn reason(r: Reply, d: &AdmitDecision) -> Reply {
    match d.reason() {
        text if text.is_empty() => r.word(&words::EMPTY),
        text => r.str(&text),
    }
}

fn reply_decision(
    ctx: Ctx,
    d: &AdmitDecision,
    source: CreditSource,
    policy: &EffectivePolicy,
    usage: Option<&Usage>,
) {
    let r = ctx.reply().map(10 + if usage.is_some() { 3 } else { 0 });
    let r = r.pair(&words::ALLOWED, |r| r.int(i64::from(d.allowed)));
    let r = r.pair(&words::REASON, |r| reason(r, d));
    let r = r.pair(&words::RETRY_AFTER, |r| r.int(d.retry_after));
    let mut buf = [0u8; 16];
    let r = r.pair(&words::LEASE, |r| {
        r.opt_str(d.lease.as_ref().map(|id| id.as_text(&mut buf)))
    });
    let r = r.pair(&words::RESERVED, |r| r.uint(d.reserved));
    let r = r.pair(&words::USED_CREDIT, |r| {
        r.int(i64::from(d.used_replenishment))
    });
    let r = r.pair(&words::CREDIT, |r| r.word(words::source(source)));
    let r = r.pair(&words::REMAINING_REQUESTS, |r| r.int(d.remaining_requests));
    let r = r.pair(&words::REMAINING_TOKENS, |r| r.int(d.remaining_tokens));
    let r = r.pair(&words::PAID_BY, |r| r.word(paid_by(d)));
    if let Some(u) = usage {
        let mut r = r.word(&words::LIMITS).map(LimitField::ALL.len());
        for field in LimitField::ALL {
            let limit = policy.limits.get(field);
            r = r.pair(words::limit(field), |r| match limit {
                Some(l) => r.uint(l),
                None => r.int(-1),
            });
        }
        let r = usage_map(r.word(&words::USAGE), u, false);
        let r = r.word(&words::RESETS).map(3);
        let r = r.pair(&words::HOUR_RESET, |r| r.int(u.hour_reset));
        let r = r.pair(&words::DAY_RESET, |r| r.int(u.day_reset));
        r.pair(&words::MONTH_RESET, |r| r.int(u.month_reset));
    }
}

/// Writes a usage snapshot (with the window resets when `resets`).
fn usage_map(r: Reply, u: &Usage, resets: bool) -> Reply {
    let r = r.map(8 + if resets { 3 } else { 0 });
    use LimitField::*;
    let r = r.pair(words::limit(RequestsPerDay), |r| r.uint(u.requests_per_day));
    let r = r.pair(words::limit(RequestsPerMonth), |r| {
        r.uint(u.requests_per_month)
    });
    let r = r.pair(words::limit(TotalRequests), |r| r.uint(u.total_requests));
    let r = r.pair(words::limit(TokensPerHour), |r| r.uint(u.tokens_per_hour));
    let r = r.pair(words::limit(TokensPerDay), |r| r.uint(u.tokens_per_day));
    let r = r.pair(words::limit(TokensPerMonth), |r| r.uint(u.tokens_per_month));
    let r = r.pair(&words::IN_FLIGHT, |r| r.uint(u.in_flight));
    let r = r.pair(&words::RESERVED, |r| r.uint(u.reserved));
    if !resets {
        return r;
    }
    let r = r.pair(&words::HOUR_RESET, |r| r.int(u.hour_reset));
    let r = r.pair(&words::DAY_RESET, |r| r.int(u.day_reset));
    r.pair(&words::MONTH_RESET, |r| r.int(u.month_reset))
}

/// What a change to an account propagates.
// The effect stays inline (a stack buffer): an admission allocates nothing to replicate.
#[allow(clippy::large_enum_variant)]
enum Propagate {
    /// Nothing changed.
    Nothing,
    /// `QUOTA.APPLY <key> <effect>`.
    Effect(EncodedEffect),
    /// The whole state (a fallback when the change has no effect form).
    State,
    /// The command as called (it is itself an effect).
    Verbatim,
}

/// Runs `change` on the account (a new, empty one when the key does not exist); when it
/// changed something, stores the result (setting the key's expiry from it, deleting the key
/// when nothing is left) and propagates it, which also counts it as a change for RDB saves.
fn update<T>(
    ctx: Ctx,
    account_key: &mut AccountKey,
    change: impl FnOnce(&mut Account) -> (T, Propagate),
) -> T {
    // One look at the key: a missing account is built here and stored only if it changed.
    let mut fresh = None;
    let account = match account_key.get() {
        Some(account) => account,
        None => fresh.insert(Account::default()),
    };
    let (out, propagate) = change(account);
    if matches!(propagate, Propagate::Nothing) {
        return out;
    }
    match fresh {
        None => account_key.touch(),
        Some(fresh) => account_key.put(fresh),
    }
    match propagate {
        Propagate::Nothing => {}
        Propagate::Effect(effect) => propagation::effect(ctx, account_key, &effect),
        Propagate::State => propagation::state(ctx, account_key),
        Propagate::Verbatim => ctx.replicate_verbatim(),
    }
    track(ctx, account_key);
    out
}

/// Puts the account on the ledger's list of accounts to flush, once it has unflushed usage.
#[inline]
fn track(ctx: Ctx, account_key: &mut AccountKey) {
    if account_key.needs_tracking() {
        ledger::track(ctx.db(), account_key.name_bytes());
        account_key.set_tracked();
    }
}

/// `QUOTA.COMMIT`: records used tokens and settles the lease; tokens beyond the token windows
/// are debited from the balance the account's last admission found (its terms).
pub(crate) fn commit(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let parsed = parse::commit(args)?;
    let (key, _) = parsed.account.key();
    let now = clock::command_now_ms(ctx);
    let mut account_key = AccountKey::open(ctx, &key)?;
    let mut holder = holder_by_terms(ctx, &mut account_key, &parsed.account)?;
    let is_self = matches!(holder, Some(Holder::This));
    // What the commit owes the balance's holder, whichever key holds it.
    let owed = |holder: Option<&Account>, debit: u64| {
        settlement(holder, &key, parsed.lease, debit, false, now)
    };
    let outcome = update(ctx, &mut account_key, |account| {
        let pruned = account.prune(now);
        match account.commit(parsed.tokens, parsed.lease, now) {
            Ok(outcome) => {
                let mut effect =
                    Effect::committed(now, pruned, parsed.tokens, parsed.lease, &outcome);
                if is_self && !outcome.duplicate {
                    if let Some(change) = owed(Some(account), outcome.balance_debit) {
                        account.apply_balance(now, &change);
                        effect.get_or_insert_with(|| Effect::empty(now)).balance = Some(change);
                    }
                }
                (Ok(outcome), effect.map_or(Propagate::Nothing, encoded))
            }
            // Refused (too many remembered ids): only the prune, if any, changed the state.
            Err(e) => (
                Err(e),
                Effect::pruned(now, pruned).map_or(Propagate::Nothing, encoded),
            ),
        }
    });
    let outcome = outcome?;
    if let (false, Some(Holder::Other(h))) = (outcome.duplicate, holder.as_mut()) {
        if let Some(change) = owed(h.get().map(|a| &*a), outcome.balance_debit) {
            charge(ctx, h, now, change);
        }
    }
    let recorded = if outcome.duplicate { 0 } else { parsed.tokens };
    if !outcome.duplicate {
        account_key.notify(EVENT_COMMIT);
    }
    let r = ctx.reply().map(3);
    let r = r.field("tokens", |r| r.uint(recorded));
    let r = r.field("duplicate", |r| r.int(i64::from(outcome.duplicate)));
    r.field("lease_held", |r| r.int(i64::from(outcome.lease_held)));
    Ok(())
}

/// The holder of the balance an account's terms name, if it has terms.
fn holder_by_terms(
    ctx: Ctx,
    account_key: &mut AccountKey,
    account: &AccountId<'_>,
) -> Result<Option<Holder>, CommandError> {
    match account_key.get().and_then(|a| a.terms()) {
        Some(terms) => Ok(Some(Holder::open(ctx, account, terms.global)?)),
        None => Ok(None),
    }
}

/// `QUOTA.RELEASE`: undoes an admission held by a lease (and refunds a request its balance
/// paid for).
pub(crate) fn release(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let (account, lease) = parse::release(args)?;
    let (key, _) = account.key();
    let now = clock::command_now_ms(ctx);
    let mut account_key = AccountKey::open(ctx, &key)?;
    let mut holder = holder_by_terms(ctx, &mut account_key, &account)?;
    let is_self = matches!(holder, Some(Holder::This));
    let released = update(ctx, &mut account_key, |account| {
        let pruned = account.prune(now);
        let released = account.release(lease, now);
        let mut effect = Effect::released(now, pruned, lease, released);
        if is_self && released {
            if let Some(change) = settlement(Some(account), &key, Some(lease), 0, true, now) {
                account.apply_balance(now, &change);
                effect.get_or_insert_with(|| Effect::empty(now)).balance = Some(change);
            }
        }
        (released, effect.map_or(Propagate::Nothing, encoded))
    });
    if let (true, Some(Holder::Other(h))) = (released, holder.as_mut()) {
        if let Some(change) = settlement(h.get().map(|a| &*a), &key, Some(lease), 0, true, now) {
            charge(ctx, h, now, change);
        }
    }
    if released {
        account_key.notify(EVENT_RELEASE);
    }
    ctx.reply().int(i64::from(released));
    Ok(())
}

/// `QUOTA.USAGE`: a read-only snapshot.
pub(crate) fn usage(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let account = parse::account_only(args)?;
    let (key, _) = account.key();
    let mut account_key = AccountKey::open_read(ctx, &key)?;
    let now = clock::command_now_ms(ctx);
    let usage = match account_key.get() {
        Some(account) => account.usage(now),
        None => Account::default().usage(now),
    };
    usage_map(ctx.reply(), &usage, true);
    Ok(())
}

/// `QUOTA.RESET`: forgets the account's counters, leases and reservations.
pub(crate) fn reset(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let account = parse::account_only(args)?;
    let (key, _) = account.key();
    let mut account_key = AccountKey::open(ctx, &key)?;
    // Usage not flushed to the ledger yet happened all the same: it stays to be billed (and
    // with it the key, until the flush has it); everything else goes.
    let existed = match account_key.get() {
        Some(account) => {
            let forgot = account.reset();
            account_key.touch();
            forgot
        }
        None => false,
    };
    if existed {
        account_key.notify(EVENT_RESET);
    }
    drop(account_key);
    if existed {
        ctx.replicate_verbatim();
    }
    ctx.reply().int(i64::from(existed));
    Ok(())
}

/// Propagates `effect` in its encoded form.
fn encoded(effect: Effect<'_>) -> Propagate {
    Propagate::Effect(effect.encode())
}

/// Refuses `name` unless this call comes from the master link or the AOF.
fn internal(ctx: Ctx, name: &str) -> Result<(), CommandError> {
    if !ctx.called_by_master_or_aof() {
        return Err(CommandError::Owned(format!(
            "ERR {name} is internal: it is only accepted from a master or the AOF"
        )));
    }
    Ok(())
}

/// `QUOTA.APPLY <key> <effect>`: applies a replicated or AOF effect. Refused from clients.
pub(crate) fn apply(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    internal(ctx, "QUOTA.APPLY")?;
    let [_, key, effect] = args else {
        return Err(parse::ParseError::Arity.into());
    };
    let effect = Effect::decode(effect)?;
    let mut account_key = AccountKey::open(ctx, key)?;
    let applied = update(ctx, &mut account_key, |account| {
        match effect.apply(account) {
            Ok(()) => (Ok(()), Propagate::Verbatim),
            Err(e) => (Err(e), Propagate::Nothing),
        }
    });
    // A replica (or an AOF load) tells its listeners what the master's command did.
    let event = match (&applied, &effect.change) {
        (Ok(()), Some(Change::Count { .. })) => Some(EVENT_ADMIT),
        (Ok(()), Some(Change::Commit { .. })) => Some(EVENT_COMMIT),
        (Ok(()), Some(Change::Release { .. })) => Some(EVENT_RELEASE),
        _ => None,
    };
    if let Some(event) = event {
        account_key.notify(event);
    }
    applied?;
    ctx.reply().status("OK");
    Ok(())
}

/// `QUOTA.SETSTATE <key> <state>`: applies a replicated or AOF state. Refused from clients.
pub(crate) fn setstate(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    internal(ctx, "QUOTA.SETSTATE")?;
    let [_, key, state] = args else {
        return Err(parse::ParseError::Arity.into());
    };
    let account = match Account::decode(state) {
        Ok(account) => account,
        Err(bad) => {
            return Err(CommandError::Owned(format!(
                "ERR state must be an account state encoded by redis-quota ({bad})"
            )));
        }
    };
    let mut account_key = AccountKey::open(ctx, key)?;
    account_key.put(account);
    track(ctx, &mut account_key);
    account_key.notify(EVENT_SETSTATE);
    ctx.replicate_verbatim();
    ctx.reply().status("OK");
    Ok(())
}
