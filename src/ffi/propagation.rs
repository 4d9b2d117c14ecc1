//! How account changes reach replicas and the AOF.
//!
//! Every change is propagated, whoever listens: Redis counts a module command as a change (its
//! dirty counter, which the RDB save rules and `rdb_changes_since_last_save` read) only when it
//! calls `RedisModule_Replicate` or `RedisModule_ReplicateVerbatim`, so skipping propagation
//! when no AOF and no replica listen would leave an RDB-only node with nothing to save. When
//! nobody listens, Redis drops what we propagate at once; a command's change then goes through
//! the cheaper `ReplicateVerbatim` (see `quiet`, a speed trick), never anywhere else.
//!
//! A change travels as its effect, `QUOTA.APPLY <key> <effect>` (see `core::effect`): a few
//! dozen bytes whatever the account holds. The whole state (`QUOTA.SETSTATE <key> <state>`)
//! is only a fallback; the AOF rewrite writes it too (see `account_type`).

use std::ffi::CStr;
use std::os::raw::c_char;

use redis_module::raw;

use super::account_type::AccountKey;
use super::ctx::Ctx;

/// Propagates `QUOTA.APPLY <key> <effect>`.
pub(crate) fn effect(ctx: Ctx, key: &AccountKey, effect: &[u8]) {
    key_and_bytes(ctx, c"QUOTA.APPLY", key.name(), effect);
}

/// Propagates the account's whole state as `QUOTA.SETSTATE <key> <state>`, or `DEL <key>` when
/// the key is gone.
pub(crate) fn state(ctx: Ctx, key: &mut AccountKey) {
    let name = key.name();
    match key.get().map(|account| account.encode()) {
        Some(state) => key_and_bytes(ctx, c"QUOTA.SETSTATE", name, &state),
        None => unsafe {
            if let Some(f) = raw::RedisModule_Replicate {
                f(ctx.raw(), c"DEL".as_ptr(), c"s".as_ptr(), name);
            }
        },
    }
}

/// Propagates `<command> <key> <bytes>`.
fn key_and_bytes(ctx: Ctx, command: &CStr, key: *mut raw::RedisModuleString, bytes: &[u8]) {
    let Some(replicate) = (unsafe { raw::RedisModule_Replicate }) else {
        return;
    };
    let (ptr, len) = (bytes.as_ptr().cast::<c_char>(), bytes.len());
    unsafe { replicate(ctx.raw(), command.as_ptr(), c"sb".as_ptr(), key, ptr, len) };
}
