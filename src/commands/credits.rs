//! `QUOTA.GRANT`, `GET`, `REVOKE`, `LIST`, `CLEANUP`, `INVALIDATE`: the credits commands.
//!
//! Writes and listings always go to PostgreSQL on a worker (the client is blocked, nothing
//! else waits); `GET` answers from the cache and only waits on a miss. Writes refresh this
//! node's cache from the committed rows (in the worker) and replicate `QUOTA.INVALIDATE` so
//! replicas drop their entry at once.

use super::error::{CommandError, CANNOT_BLOCK, CANNOT_REREAD, CREDITS_LOADING_NO_WAIT};
use super::parse;
use crate::core::cache::Lookup;
use crate::core::credit::{select_credit, Replenishment};
use crate::core::policy::LimitField;
use crate::core::Millis;
use crate::ffi::blocked::Blocked;
use crate::ffi::ctx::Ctx;
use crate::ffi::reply::Reply;
use crate::runtime::config;
use crate::runtime::jobs::{Done, Job, OwnedUser, StoreError};
use crate::runtime::worker;
use crate::runtime::{cache, clock};

/// Writes one record: the identity, every column, timestamps as Unix seconds, money as text;
/// `extra` more pairs are left for the caller. A missing row writes nil columns.
fn record(r: Reply, ids: [&str; 4], row: Option<&Replenishment>, extra: usize) -> Reply {
    let r = r.map(11 + LimitField::ALL.len() + extra);
    let r = r.field("tenant", |r| r.str(ids[0]));
    let r = r.field("project", |r| r.str(ids[1]));
    let r = r.field("user_id", |r| r.str(ids[2]));
    let mut r = r.field("bundle_id", |r| {
        r.str(row.map_or(ids[3], |x| &*x.bundle_id))
    });
    for field in LimitField::ALL {
        let v = row.and_then(|x| x.additional.get(field));
        r = r.field(field.column(), |r| r.opt_int(v));
    }
    let r = r.field("expires_at", |r| r.opt_int(row.and_then(|x| x.expires_at)));
    let r = r.field("purchase_id", |r| {
        r.opt_str(row.and_then(|x| x.purchase_id.as_deref()))
    });
    let r = r.field("purchase_amount_usd", |r| {
        r.opt_str(row.and_then(|x| x.purchase_amount_usd.as_deref()))
    });
    let r = r.field("purchase_notes", |r| {
        r.opt_str(row.and_then(|x| x.purchase_notes.as_deref()))
    });
    let r = r.field("active", |r| r.opt_int(row.map(|x| i64::from(x.active))));
    let r = r.field("created_at", |r| r.opt_int(row.map(|x| x.created_at)));
    r.field("updated_at", |r| r.opt_int(row.map(|x| x.updated_at)))
}

/// Replies the record that applies to `bundle` among `rows`, or nil.
fn reply_applicable(ctx: Ctx, ids: [&str; 4], rows: &[Replenishment], now: Millis) {
    match select_credit(rows, ids[3], now) {
        Some((row, _)) => {
            record(ctx.reply(), ids, Some(row), 0);
        }
        None => {
            ctx.reply().null();
        }
    }
}

/// Blocks the client and queues the job `make` builds for it; the reply comes from `resume`.
/// Where the client cannot wait (MULTI, scripts) it gets a clear error instead.
pub(super) fn on_worker(
    ctx: Ctx,
    make: impl FnOnce(Blocked<Done>) -> Job,
) -> Result<(), CommandError> {
    if !ctx.can_block() {
        return Err(CommandError::CannotWait);
    }
    match Blocked::block(ctx, config::block_timeout_ms()) {
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
    on_worker(ctx, |client| Job::Grant {
        user: OwnedUser::from_id(&parsed.account.user),
        bundle: parsed.account.bundle.to_owned(),
        request: Box::new(parsed.request),
        now,
        client,
    })
}

/// `QUOTA.REVOKE`: soft delete on a worker.
pub(crate) fn revoke(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let account = parse::account_only(args)?;
    on_worker(ctx, |client| Job::Revoke {
        user: OwnedUser::from_id(&account.user),
        bundle: account.bundle.to_owned(),
        client,
    })
}

/// `QUOTA.LIST`: read from Postgres on a worker.
pub(crate) fn list(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let (user, all) = parse::list(args)?;
    on_worker(ctx, |client| Job::List {
        user: OwnedUser::from_id(&user),
        all,
        client,
    })
}

/// `QUOTA.CLEANUP`: deactivate expired rows on a worker.
pub(crate) fn cleanup(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    if args.len() != 1 {
        return Err(parse::ParseError::Arity.into());
    }
    on_worker(ctx, |client| Job::Cleanup {
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

/// `QUOTA.GET`: the applicable record from the cache; on a miss, wait for one load.
pub(crate) fn get(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let account = parse::account_only(args)?;
    let ids = [
        account.user.tenant,
        account.user.project,
        account.user.user,
        account.bundle,
    ];
    let user_key = account.user.key();
    let now = clock::now_ms();
    let mut cache = cache::cache();
    let (answered, load) = match cache.lookup(&user_key, now) {
        Lookup::Fresh(rows, _) => {
            reply_applicable(ctx, ids, rows, now);
            return Ok(());
        }
        Lookup::Stale { rows, refresh } => {
            reply_applicable(ctx, ids, rows, now);
            (Ok(()), refresh)
        }
        Lookup::Unavailable => {
            // Without a URL there is nothing to retry: the same error as the other commands.
            let text = if config::text(&config::PG_URL).is_empty() {
                StoreError::NotConfigured.to_string()
            } else {
                "ERR PostgreSQL unavailable and this user's credits are not cached: retry shortly"
                    .to_owned()
            };
            return Err(text.into());
        }
        Lookup::Miss { load } => {
            let waited = if ctx.can_block() {
                match Blocked::block(ctx, config::block_timeout_ms()) {
                    Some(client) => {
                        if let Err(client) = cache.add_waiter(&user_key, client) {
                            client.finish(Done::Dropped);
                        }
                        Ok(())
                    }
                    None => Err(CommandError::Text(CANNOT_BLOCK)),
                }
            } else {
                Err(CommandError::Text(CREDITS_LOADING_NO_WAIT))
            };
            (waited, load)
        }
    };
    drop(cache);
    if let Some(flight) = load {
        worker::submit_load(&user_key, &account.user, flight);
    }
    answered
}

/// `QUOTA.GET` after its load finished.
pub(crate) fn get_resumed(ctx: Ctx, args: &[&[u8]], done: &Done) -> Result<(), CommandError> {
    let account = parse::account_only(args)?;
    let ids = [
        account.user.tenant,
        account.user.project,
        account.user.user,
        account.bundle,
    ];
    match done {
        Done::Loaded(Ok(rows)) => {
            reply_applicable(ctx, ids, rows, clock::now_ms());
            Ok(())
        }
        Done::Loaded(Err(e)) => Err(e.clone().into()),
        other => Err(CommandError::undone(other)),
    }
}

/// Replicates `QUOTA.INVALIDATE <t> <p> <u>` so replicas drop the user's entry.
fn replicate_invalidate(ctx: Ctx, ids: [&str; 4]) {
    let [t, p, u, _] = ids;
    ctx.replicate(
        c"QUOTA.INVALIDATE",
        &[t.as_bytes(), p.as_bytes(), u.as_bytes()],
    );
}

/// Replies GRANT, REVOKE, LIST and CLEANUP once their worker is done.
pub(crate) fn resume(ctx: Ctx, args: &[&[u8]], done: &Done) -> Result<(), CommandError> {
    match done {
        Done::Grant(Ok(outcome)) => {
            // Only the identity is needed here (an EXPIRES_AT may have passed meanwhile).
            let Ok(account) = parse::account_only(args.get(..5).unwrap_or(args)) else {
                return Err(CommandError::Text(CANNOT_REREAD));
            };
            let u = account.user;
            let ids = [u.tenant, u.project, u.user, account.bundle];
            if !outcome.duplicate {
                replicate_invalidate(ctx, ids);
            }
            record(ctx.reply(), ids, outcome.record.as_ref(), 1)
                .field("duplicate", |r| r.int(i64::from(outcome.duplicate)));
        }
        Done::Revoke(Ok(outcome)) => {
            if let Ok(account) = parse::account_only(args) {
                let u = account.user;
                replicate_invalidate(ctx, [u.tenant, u.project, u.user, account.bundle]);
            }
            ctx.reply().int(i64::from(outcome.revoked));
        }
        Done::List(Ok(rows)) => {
            let Ok((user, _)) = parse::list(args) else {
                return Err(CommandError::Text(CANNOT_REREAD));
            };
            let mut r = ctx.reply().map(rows.len());
            for row in rows {
                let ids = [user.tenant, user.project, user.user, &*row.bundle_id];
                r = record(r.str(&row.bundle_id), ids, Some(row), 0);
            }
        }
        Done::Cleanup(Ok(outcome)) => {
            ctx.reply().uint(outcome.deactivated);
        }
        Done::Grant(Err(e)) | Done::Revoke(Err(e)) | Done::List(Err(e)) | Done::Cleanup(Err(e)) => {
            return Err(e.clone().into());
        }
        Done::Loaded(_)
        | Done::Policy(_)
        | Done::PolicySet(_)
        | Done::PolicyDel(_)
        | Done::PolicyList(_)
        | Done::Busy
        | Done::Dropped => return Err(CommandError::undone(done)),
    }
    Ok(())
}
