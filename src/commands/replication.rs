//! The apply step of the account commands, and the internal commands replicas and the AOF
//! apply: `QUOTA.APPLY <key> <effect>` and `QUOTA.SETSTATE <key> <state>`.
//!
//! A command changes an account through `update` alone: it stores the result (a new key only
//! when something changed), propagates what the core said changed (`Propagate`), which also
//! counts it as a change for RDB saves, and puts the account on the ledger's list to flush.

use super::error::CommandError;
use crate::core::account::Account;
use crate::core::decide::{self, Propagate};
use crate::core::effect::{Change, Effect};
use crate::core::ids::{AccountId, ANY_BUNDLE};
use crate::core::ledger::BalanceChange;
use crate::core::Millis;
use crate::ffi::account_type::AccountKey;
use crate::ffi::ctx::Ctx;
use crate::ffi::{propagation, quiet};
use crate::parse;
use crate::runtime::ledger;

/// Keyspace events (module class) on the account key, documented in the README.
pub(super) const EVENT_ADMIT: &std::ffi::CStr = c"quota.admit";
pub(super) const EVENT_DENIED: &std::ffi::CStr = c"quota.denied";
pub(super) const EVENT_COMMIT: &std::ffi::CStr = c"quota.commit";
pub(super) const EVENT_RELEASE: &std::ffi::CStr = c"quota.release";
pub(super) const EVENT_RESET: &std::ffi::CStr = c"quota.reset";
const EVENT_SETSTATE: &std::ffi::CStr = c"quota.setstate";

/// Runs `change` on the account (a new, empty one when the key does not exist), telling it
/// whether anyone receives this node's changes (a replica, the AOF: see `quiet`; without, an
/// effect is only counted, and a change may skip encoding it); when it changed something,
/// stores the result (setting the key's expiry from it, deleting the key when nothing is
/// left) and propagates it, which also counts it as a change for RDB saves.
pub(super) fn update<T>(
    ctx: Ctx,
    account_key: &mut AccountKey,
    change: impl FnOnce(&mut Account, bool) -> (T, Propagate),
) -> T {
    let listened = !quiet::nobody_listens(ctx);
    // One look at the key: a missing account is built here and stored only if it changed.
    let mut fresh = None;
    let account = match account_key.get() {
        Some(account) => account,
        None => fresh.insert(Account::default()),
    };
    let (out, propagate) = change(account, listened);
    if matches!(propagate, Propagate::Nothing) {
        return out;
    }
    match fresh {
        None => account_key.touch(),
        Some(fresh) => account_key.put(fresh),
    }
    match propagate {
        Propagate::Nothing => {}
        Propagate::Effect(effect) if listened => propagation::effect(ctx, account_key, &effect),
        Propagate::State => propagation::state(ctx, account_key),
        // An effect nobody receives is counted only (the cheaper call: see `quiet`).
        Propagate::Effect(_) | Propagate::Verbatim | Propagate::Counted => {
            ctx.replicate_verbatim();
        }
    }
    track(ctx, account_key);
    out
}

/// Puts the account on the ledger's list of accounts to flush, once it has unflushed usage.
#[inline]
pub(super) fn track(ctx: Ctx, account_key: &mut AccountKey) {
    if account_key.needs_tracking() {
        ledger::track(ctx.db(), account_key.name_bytes());
        account_key.set_tracked();
    }
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
    let applied = update(ctx, &mut account_key, |account, _| {
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

/// Opens the user's `'*'` account, the holder of a `'*'` row's balance (`Payer::Star`).
pub(super) fn open_star(ctx: Ctx, account: &AccountId<'_>) -> Result<AccountKey, CommandError> {
    let star = AccountId {
        user: account.user,
        bundle: ANY_BUNDLE,
    };
    Ok(AccountKey::open(ctx, &star.key().0)?)
}

/// Applies `change` to the `'*'` account holding the balance for another and propagates it.
pub(super) fn charge(ctx: Ctx, star: &mut AccountKey, now: Millis, change: BalanceChange) {
    update(ctx, star, |holder, _| {
        ((), decide::charge(holder, change, now))
    });
    track(ctx, star);
}
