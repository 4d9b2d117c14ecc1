//! The reply writers of the account and credit commands: one writer per reply shape (an
//! admission, in full or `COMPACT`; a usage snapshot; a credit record).

use super::words;
use crate::core::account::{AdmitDecision, Usage};
use crate::core::credit::{BalanceKind, CreditSource, Replenishment};
use crate::core::ids::AccountId;
use crate::core::policy::{EffectivePolicy, LimitField};
use crate::ffi::ctx::Ctx;
use crate::ffi::reply::Reply;
use crate::ffi::words::Word;

/// The `COMPACT` reply: a flat array read by position, the same under RESP2 and RESP3:
/// `[allowed, retry_after, remaining_requests, remaining_tokens, lease, reason, reserved,
/// credit, paid_by, retry_after_ms]`, with `lease` and `reason` as "" when there is none
/// (`retry_after_ms` came last, so the positions before it did not move).
pub(super) fn reply_compact(ctx: Ctx, d: &AdmitDecision, source: CreditSource) {
    let mut buf = [0u8; 16];
    let lease = d.lease.as_ref().map(|id| id.as_text(&mut buf));
    let r = ctx.reply().array(10);
    // An admission with no reason, nothing reserved and no wait (the common reply): its fixed
    // values in two runs (`ffi::runs`), the same bytes in fewer writes.
    if admitted_plainly(d) {
        let r = r
            .run(&words::ADMITTED_HEAD)
            .int(d.remaining_requests)
            .int(d.remaining_tokens);
        let r = match lease {
            Some(lease) => r.str(lease),
            None => r,
        };
        r.run(words::admitted_tail(
            source,
            d.paid_by_balance(),
            lease.is_some(),
        ));
        return;
    }
    let r = r
        .int(i64::from(d.allowed()))
        .int(d.retry_after)
        .int(d.remaining_requests)
        .int(d.remaining_tokens)
        .str(lease.unwrap_or(""));
    reason(r, d)
        .uint(d.reserved)
        .word(words::source(source))
        .word(paid_by(d))
        .int(d.retry_after_ms);
}

/// Who paid an admitted request: `windows` (the policy and window credits), `balance` (a
/// window would have denied), or `""` when denied.
fn paid_by(d: &AdmitDecision) -> &'static Word {
    match (d.allowed(), d.paid_by_balance()) {
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

pub(super) fn reply_decision(
    ctx: Ctx,
    d: &AdmitDecision,
    source: CreditSource,
    policy: &EffectivePolicy,
    usage: Option<&Usage>,
) {
    let r = ctx.reply().map(11 + if usage.is_some() { 3 } else { 0 });
    let mut buf = [0u8; 16];
    let lease = d.lease.as_ref().map(|id| id.as_text(&mut buf));
    // An admission with no reason, nothing reserved and no wait: its fixed fields and values
    // in runs (`ffi::runs`), the same bytes in 8 to 10 writes instead of 23 to 25.
    let r = if admitted_plainly(d) {
        r.run(&words::ADMITTED_MAP_HEAD)
            .opt_str(lease)
            .run(words::admitted_map_middle(source, d.used_replenishment))
            .int(d.remaining_requests)
            .word(&words::REMAINING_TOKENS)
            .int(d.remaining_tokens)
            .run(words::paid_by_run(d.paid_by_balance()))
    } else {
        decision_fields(r, d, source, lease)
    };
    if let Some(u) = usage {
        verbose_fields(r, policy, u);
    }
}

/// Whether a decision admits with no reason, nothing reserved and no wait (the common reply,
/// whose fixed values the runs hold).
fn admitted_plainly(d: &AdmitDecision) -> bool {
    let no_wait = d.retry_after == words::NO_WAIT && d.retry_after_ms == words::NO_WAIT;
    d.allowed() && d.violations == 0 && d.reserved == 0 && no_wait
}

/// The fields of a decision, one by one.
fn decision_fields(
    r: Reply,
    d: &AdmitDecision,
    source: CreditSource,
    lease: Option<&str>,
) -> Reply {
    let r = r.pair(&words::ALLOWED, |r| r.int(i64::from(d.allowed())));
    let r = r.pair(&words::REASON, |r| reason(r, d));
    let r = r.pair(&words::RETRY_AFTER, |r| r.int(d.retry_after));
    let r = r.pair(&words::RETRY_AFTER_MS, |r| r.int(d.retry_after_ms));
    let r = r.pair(&words::LEASE, |r| r.opt_str(lease));
    let r = r.pair(&words::RESERVED, |r| r.uint(d.reserved));
    let r = r.pair(&words::USED_CREDIT, |r| {
        r.int(i64::from(d.used_replenishment))
    });
    let r = r.pair(&words::CREDIT, |r| r.word(words::source(source)));
    let r = r.pair(&words::REMAINING_REQUESTS, |r| r.int(d.remaining_requests));
    let r = r.pair(&words::REMAINING_TOKENS, |r| r.int(d.remaining_tokens));
    r.pair(&words::PAID_BY, |r| r.word(paid_by(d)))
}

/// A `VERBOSE` decision's `limits`, `usage` and `resets`.
fn verbose_fields(r: Reply, policy: &EffectivePolicy, u: &Usage) {
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

/// Writes a usage snapshot (with the window resets when `resets`).
pub(super) fn usage_map(r: Reply, u: &Usage, resets: bool) -> Reply {
    let r = r.map(8 + LimitField::RATES.len() + if resets { 3 } else { 0 });
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
    let mut r = r.pair(&words::RESERVED, |r| r.uint(u.reserved));
    for (field, used) in LimitField::RATES.into_iter().zip(u.rates) {
        r = r.pair(words::limit(field), |r| r.uint(used));
    }
    if !resets {
        return r;
    }
    let r = r.pair(&words::HOUR_RESET, |r| r.int(u.hour_reset));
    let r = r.pair(&words::DAY_RESET, |r| r.int(u.day_reset));
    r.pair(&words::MONTH_RESET, |r| r.int(u.month_reset))
}

/// Writes one record: the identity, every column, timestamps as Unix seconds, money as text;
/// `extra` more pairs are left for the caller. A missing row writes nil columns. The one
/// writer of a credit record: `GET`, `LIST`, `GRANT` and `FIND` reply through it.
pub(super) fn record(
    r: Reply,
    account: &AccountId<'_>,
    row: Option<&Replenishment>,
    extra: usize,
) -> Reply {
    let r = r.map(15 + LimitField::ALL.len() + extra);
    let r = r.pair(&words::TENANT, |r| r.str(account.user.tenant));
    let r = r.pair(&words::PROJECT, |r| r.str(account.user.project));
    let r = r.pair(&words::USER_ID, |r| r.str(account.user.user));
    let mut r = r.pair(&words::BUNDLE_ID, |r| {
        r.str(row.map_or(account.bundle, |x| &*x.bundle_id))
    });
    for field in LimitField::ALL {
        let v = row.and_then(|x| x.additional.get(field));
        r = r.pair(words::limit(field), |r| r.opt_int(v));
    }
    let r = r.pair(&words::EXPIRES_AT, |r| {
        r.opt_int(row.and_then(|x| x.expires_at))
    });
    let r = r.pair(&words::PURCHASE_ID, |r| {
        r.opt_str(row.and_then(|x| x.purchase_id.as_deref()))
    });
    let r = r.pair(&words::PURCHASE_AMOUNT_USD, |r| {
        r.opt_str(row.and_then(|x| x.purchase_amount_usd.as_deref()))
    });
    let r = r.pair(&words::PURCHASE_NOTES, |r| {
        r.opt_str(row.and_then(|x| x.purchase_notes.as_deref()))
    });
    let r = r.pair(&words::ACTIVE, |r| {
        r.opt_int(row.map(|x| i64::from(x.active)))
    });
    let r = r.pair(&words::CREATED_AT, |r| r.opt_int(row.map(|x| x.created_at)));
    let mut r = r.pair(&words::UPDATED_AT, |r| r.opt_int(row.map(|x| x.updated_at)));
    let balance = row.and_then(|x| x.balance.as_deref());
    for kind in BalanceKind::ALL {
        let granted = balance.and_then(|b| b.grant(kind));
        r = r.pair(words::balance(kind).granted, |r| r.opt_int(granted));
    }
    for kind in BalanceKind::ALL {
        let debited = balance.and_then(|b| b.grant(kind).map(|_| b.debited(kind)));
        r = r.pair(words::balance(kind).debited, |r| r.opt_int(debited));
    }
    r
}
