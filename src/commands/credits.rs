//! `QUOTA.GRANT`, `GET`, `REVOKE`, `LIST`, `CLEANUP`, `INVALIDATE`: the credits commands.
//!
//! Writes and listings always go to PostgreSQL on a worker (the client is blocked, nothing
//! else waits); `GET` answers from the cache and only waits on a miss. Writes refresh this
//! node's cache from the committed rows (in the worker) and replicate `QUOTA.INVALIDATE` so
//! replicas drop their entry at once.

use super::error::{CommandError, CANNOT_BLOCK, CREDITS_LOADING_NO_WAIT};
use super::replies::record;
use super::{words, Waiting};
use crate::core::credit::{select_credit, BalanceKind, PerKind, Replenishment};
use crate::core::decide;
use crate::core::ids::{AccountId, OwnedAccount, OwnedUser, UserId};
use crate::core::Millis;
use crate::ffi::account_type::AccountKey;
use crate::ffi::blocked::Blocked;
use crate::ffi::ctx::Ctx;
use crate::parse;
use crate::runtime::config;
use crate::runtime::gather::{gather, CreditsFound, Gathered, Needs, WaitMode};
use crate::runtime::jobs::{Done, Job, StoreError};
use crate::runtime::worker;
use crate::runtime::{cache, clock, ledger};

/// Replies the record that applies to `bundle` among `rows`, or nil; with what each balance
/// has left (`requests_balance_left`, `tokens_balance_left`: granted minus the debits flushed
/// and not flushed yet, minus the tokens held; nil without that balance).
fn reply_applicable(ctx: Ctx, account: &AccountId<'_>, rows: &[Replenishment], now: Millis) {
    match select_credit(rows, account.bundle, now) {
        Some((row, _)) => {
            let left = row.balance.as_deref().map_or(PerKind::default(), |b| {
                let holder = AccountId {
                    user: account.user,
                    bundle: &row.bundle_id,
                };
                let name = holder.key().0;
                let mut key = AccountKey::open_read(ctx, &name).ok();
                let holder = key.as_mut().and_then(|k| k.get()).map(|a| &*a);
                let sent = decide::counts_unacknowledged(b, holder)
                    .then(|| ledger::unacknowledged(ctx.db(), &name))
                    .flatten();
                decide::offer(b, holder, sent, now).left
            });
            let r = record(ctx.reply(), account, Some(row), 2);
            let r = r.pair(words::balance(BalanceKind::Requests).left, |r| {
                r.opt_int(left.requests)
            });
            r.pair(words::balance(BalanceKind::Tokens).left, |r| {
                r.opt_int(left.tokens)
            });
        }
        None => {
            ctx.reply().null();
        }
    }
}

/// Blocks the client with its `request` and queues the job `make` builds for it; the reply
/// comes from the request's `Waiting::resumed`. Where the client cannot wait (MULTI,
/// scripts) it gets a clear error instead.
pub(super) fn on_worker<W: Waiting>(
    ctx: Ctx,
    request: W,
    make: impl FnOnce(Blocked<Done>) -> Job,
) -> Result<(), CommandError> {
    if !ctx.can_block() {
        return Err(CommandError::CannotWait);
    }
    match Blocked::block(ctx, config::block_timeout_ms(), request) {
        Some(client) => {
            worker::submit_or_busy(make(client));
            Ok(())
        }
        None => Err(CommandError::Text(CANNOT_BLOCK)),
    }
}

/// `QUOTA.GRANT`: upsert in Postgres on a worker.
pub(crate) fn grant(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let now = clock::now_ms();
    let parsed = parse::grant(args, now)?;
    let account = OwnedAccount::from_id(&parsed.account);
    on_worker(ctx, CreditsWait::Grant(account.clone()), |client| {
        Job::Grant {
            user: account.user,
            bundle: account.bundle,
            request: Box::new(parsed.request),
            now,
            client,
        }
    })
}

/// `QUOTA.REVOKE`: soft delete on a worker.
pub(crate) fn revoke(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let account = OwnedAccount::from_id(&parse::account_only(args)?);
    on_worker(ctx, CreditsWait::Revoke(account.clone()), |client| {
        Job::Revoke {
            user: account.user,
            bundle: account.bundle,
            client,
        }
    })
}

/// `QUOTA.LIST`: read from Postgres on a worker.
pub(crate) fn list(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let (user, all) = parse::list(args)?;
    let user = OwnedUser::from_id(&user);
    on_worker(ctx, CreditsWait::List(user.clone()), |client| Job::List {
        user,
        all,
        client,
    })
}

/// `QUOTA.HISTORY`: an account's hourly ledger rows, read from Postgres on a worker.
pub(crate) fn history(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let (account, from, to) = parse::history(args)?;
    let account = OwnedAccount::from_id(&account);
    on_worker(ctx, CreditsWait::History, |client| Job::History {
        account,
        from,
        to,
        client,
    })
}

/// `QUOTA.CLEANUP`: deactivate expired rows on a worker.
pub(crate) fn cleanup(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    if args.len() != 1 {
        return Err(parse::ParseError::Arity.into());
    }
    on_worker(ctx, CreditsWait::Cleanup, |client| Job::Cleanup {
        client: Some(client),
    })
}

/// `QUOTA.INVALIDATE`: drop the user's cache entry here and on replicas.
pub(crate) fn invalidate(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let user = parse::user_only(args)?;
    let dropped = cache::cache().invalidate(&user.key());
    ctx.replicate_verbatim();
    ctx.reply().int(i64::from(dropped));
    Ok(())
}

/// `QUOTA.GET`: the applicable record from the cache; on a miss, wait for one load. The rows
/// are copied out of the cache before the reply: no lock is held across it.
pub(crate) fn get(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let account = parse::account_only(args)?;
    let user_key = account.user.key();
    let now = clock::command_now_ms(ctx);
    let needs = Needs {
        policy: None,
        credits: Some((&user_key, account.user)),
    };
    let request = |_| CreditsWait::Get(OwnedAccount::from_id(&account));
    match gather(ctx, needs, WaitMode::Block, now, request) {
        Gathered::Ready(_, found) => match found {
            CreditsFound::Fresh { rows, .. } | CreditsFound::Stale(rows) => {
                reply_applicable(ctx, &account, &rows, now)
            }
            CreditsFound::Unavailable => {
                // Without a URL there is nothing to retry: the same error as the other commands.
                let text = if config::text(&config::PG_URL).is_empty() {
                    StoreError::NotConfigured.to_string()
                } else {
                    "ERR PostgreSQL unavailable and this user's credits are not cached: retry \
                     shortly"
                        .to_owned()
                };
                return Err(text.into());
            }
            _ => return Err(CommandError::Text(CREDITS_LOADING_NO_WAIT)),
        },
        Gathered::Waiting => {}
        Gathered::CannotBlock => return Err(CommandError::Text(CANNOT_BLOCK)),
    }
    Ok(())
}

/// A credits command waiting on PostgreSQL: the account it writes or reads (`GRANT`, `REVOKE`,
/// `GET`, waiting on its user's load), the user it lists, or nothing (`HISTORY`, `CLEANUP`).
enum CreditsWait {
    Grant(OwnedAccount),
    Revoke(OwnedAccount),
    Get(OwnedAccount),
    List(OwnedUser),
    History,
    Cleanup,
}

impl Waiting for CreditsWait {
    fn resumed(self, ctx: Ctx, done: Done) -> Result<(), CommandError> {
        match (self, done) {
            (CreditsWait::Grant(account), Done::Grant(outcome)) => {
                let outcome = outcome?;
                let account = account.id();
                if !outcome.duplicate {
                    replicate_invalidate(ctx, &account.user);
                }
                record(ctx.reply(), &account, outcome.record.as_ref(), 1)
                    .field("duplicate", |r| r.int(i64::from(outcome.duplicate)));
            }
            (CreditsWait::Revoke(account), Done::Revoke(outcome)) => {
                let outcome = outcome?;
                replicate_invalidate(ctx, &account.id().user);
                ctx.reply().int(i64::from(outcome.revoked));
            }
            (CreditsWait::Get(account), Done::Loaded(loaded)) => {
                let Some(credits) = loaded.credits else {
                    return Err(CommandError::undone(&Done::Dropped));
                };
                reply_applicable(ctx, &account.id(), &credits?, clock::now_ms());
            }
            (CreditsWait::List(user), Done::List(rows)) => {
                let rows = rows?;
                let user = user.id();
                let mut r = ctx.reply().map(rows.len());
                for row in &rows {
                    let account = AccountId {
                        user,
                        bundle: &row.bundle_id,
                    };
                    r = record(r.str(&row.bundle_id), &account, Some(row), 0);
                }
            }
            (CreditsWait::History, Done::History(rows)) => {
                let rows = rows?;
                let mut r = ctx.reply().array(rows.len());
                for row in &rows {
                    let m = r.map(5);
                    let m = m.field("hour", |m| m.int(row.hour));
                    let m = m.field("requests", |m| m.int(row.requests));
                    let m = m.field("tokens", |m| m.int(row.tokens));
                    let m = m.field("requests_debited", |m| m.int(row.requests_debited));
                    r = m.field("tokens_debited", |m| m.int(row.tokens_debited));
                }
            }
            (CreditsWait::Cleanup, Done::Cleanup(outcome)) => {
                ctx.reply().uint(outcome?.deactivated);
            }
            (_, other) => return Err(CommandError::undone(&other)),
        }
        Ok(())
    }
}

/// Replicates `QUOTA.INVALIDATE <t> <p> <u>` so replicas drop the user's entry.
fn replicate_invalidate(ctx: Ctx, user: &UserId<'_>) {
    let ids = [user.tenant, user.project, user.user];
    ctx.replicate(c"QUOTA.INVALIDATE", &ids.map(str::as_bytes));
}
