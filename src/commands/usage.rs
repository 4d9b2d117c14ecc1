//! `QUOTA.USAGE` and `QUOTA.RESET`: read an account's usage, and forget it.

use super::error::CommandError;
use super::replication::EVENT_RESET;
use super::replies::usage_map;
use crate::core::account::Account;
use crate::ffi::account_type::AccountKey;
use crate::ffi::ctx::Ctx;
use crate::parse;
use crate::runtime::clock;

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
