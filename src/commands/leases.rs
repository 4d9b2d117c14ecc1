//! `QUOTA.COMMIT` and `QUOTA.RELEASE`: how an admitted request ends.
//!
//! Nothing to gather: a lease settles against the balance its admission's terms name (stored
//! on the account). The core decides (`core::decide::{commit, release}`, with the settlement
//! rules); this shell opens the account and, when the user's `'*'` account holds the balance,
//! that one too, applies, propagates and replies.

use super::error::CommandError;
use super::replication::{charge, open_star, update, EVENT_COMMIT, EVENT_RELEASE};
use crate::core::decide::{self, Payer, Settle};
use crate::core::ids::AccountId;
use crate::ffi::account_type::AccountKey;
use crate::ffi::ctx::Ctx;
use crate::parse;
use crate::runtime::clock;

/// Who holds the balance the account's terms name, and the `'*'` account's key when it is
/// that one.
fn payer(
    ctx: Ctx,
    account_key: &mut AccountKey,
    account: &AccountId<'_>,
) -> Result<(Option<Payer>, Option<AccountKey>), CommandError> {
    let payer = decide::payer_by_terms(account_key.get().map(|a| &*a), account.bundle);
    let star = match payer {
        Some(Payer::Star) => Some(open_star(ctx, account)?),
        _ => None,
    };
    Ok((payer, star))
}

/// `QUOTA.COMMIT`: records used tokens and settles the lease; tokens beyond the token windows
/// are debited from the balance the account's last admission found (its terms).
pub(crate) fn commit(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let parsed = parse::commit(args)?;
    let (key, _) = parsed.account.key();
    let now = clock::command_now_ms(ctx);
    let mut account_key = AccountKey::open(ctx, &key)?;
    let (payer, mut star) = payer(ctx, &mut account_key, &parsed.account)?;
    let outcome = update(ctx, &mut account_key, |account, _| {
        decide::commit(account, &key, parsed.tokens, parsed.lease, payer, now)
    })?;
    if let (false, Some(star)) = (outcome.duplicate, star.as_mut()) {
        let how = Settle::Commit {
            debit: outcome.balance_debit,
        };
        let holder = star.get().map(|a| &*a);
        if let Some(change) = decide::settlement(holder, &key, parsed.lease, how, now) {
            charge(ctx, star, now, change);
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

/// `QUOTA.RELEASE`: undoes an admission held by a lease (and refunds a request its balance
/// paid for).
pub(crate) fn release(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let (account, lease) = parse::release(args)?;
    let (key, _) = account.key();
    let now = clock::command_now_ms(ctx);
    let mut account_key = AccountKey::open(ctx, &key)?;
    let (payer, mut star) = payer(ctx, &mut account_key, &account)?;
    let released = update(ctx, &mut account_key, |account, _| {
        decide::release(account, &key, lease, payer, now)
    });
    if let (true, Some(star)) = (released, star.as_mut()) {
        let holder = star.get().map(|a| &*a);
        if let Some(change) = decide::settlement(holder, &key, Some(lease), Settle::Release, now) {
            charge(ctx, star, now, change);
        }
    }
    if released {
        account_key.notify(EVENT_RELEASE);
    }
    ctx.reply().int(i64::from(released));
    Ok(())
}
