//! The module's command filter. It shows `quiet` each replica's `SYNC` and `PSYNC` (see there)
//! and keeps passwords out of the slow log: it replaces the value of
//! `CONFIG SET quota.pg-password ...` (and of a `quota.pg-url` holding a password) with a
//! placeholder before Redis runs and records the command; the setting's `set` callback swaps
//! the real value back in. Which settings are secret, and what stands in for them, is the
//! caller's (`runtime::config::hide_secret`, handed over at registration). Redis redacts its own sensitive settings
//! there (`masterauth`), but not a module's (seen on 7.0.15 and 8.2.3).
//!
//! The filter sees every command, so it returns after two length checks for anything that is
//! not `CONFIG SET`; it never fails a command, and on any surprise leaves it as it is.

use std::os::raw::c_int;
use std::sync::OnceLock;

use redis_module::raw;

use super::ctx::Ctx;

/// Given a setting's name and value, the placeholder to show instead, if it is a secret.
pub(crate) type Hide = fn(name: &[u8], value: &[u8]) -> Option<String>;

static HIDE: OnceLock<Hide> = OnceLock::new();

/// Registers the filter (once, at load), replacing the values `hide` hides; false if Redis
/// refused it.
pub(crate) fn register(ctx: Ctx, hide: Hide) -> bool {
    // Always the same function: a second load in this process keeps the first.
    let _ = HIDE.set(hide);
    unsafe {
        raw::RedisModule_RegisterCommandFilter
            .is_some_and(|register| !register(ctx.raw(), Some(filter), 0).is_null())
    }
}

/// The bytes of argument `pos` (empty when absent).
unsafe fn arg<'a>(fctx: *mut raw::RedisModuleCommandFilterCtx, pos: c_int) -> &'a [u8] {
    let (Some(get), Some(ptr_len)) = (
        raw::RedisModule_CommandFilterArgGet,
        raw::RedisModule_StringPtrLen,
    ) else {
        return &[];
    };
    let s = get(fctx, pos);
    if s.is_null() {
        return &[];
    }
    let mut len = 0usize;
    let ptr = ptr_len(s, &mut len);
    if ptr.is_null() {
        return &[];
    }
    std::slice::from_raw_parts(ptr.cast::<u8>(), len)
}

extern "C" fn filter(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    let _ = std::panic::catch_unwind(|| unsafe { redact(fctx) });
}

unsafe fn redact(fctx: *mut raw::RedisModuleCommandFilterCtx) {
    let Some(count) = raw::RedisModule_CommandFilterArgsCount else {
        return;
    };
    let argc = count(fctx);
    super::quiet::command_seen(argc, || arg(fctx, 0));
    if argc < 4
        || !arg(fctx, 0).eq_ignore_ascii_case(b"config")
        || !arg(fctx, 1).eq_ignore_ascii_case(b"set")
    {
        return;
    }
    let Some(hide) = HIDE.get() else {
        return;
    };
    let mut pos = 2;
    while pos + 1 < argc {
        if let Some(placeholder) = hide(arg(fctx, pos), arg(fctx, pos + 1)) {
            replace_arg(fctx, pos + 1, &placeholder);
        }
        pos += 2;
    }
}

/// Replaces argument `pos` with `text` (leaves it where Redis cannot make the string).
unsafe fn replace_arg(fctx: *mut raw::RedisModuleCommandFilterCtx, pos: c_int, text: &str) {
    let (Some(replace), Some(create)) = (
        raw::RedisModule_CommandFilterArgReplace,
        raw::RedisModule_CreateString,
    ) else {
        return;
    };
    // A string without a context: the filter hands its ownership to Redis.
    let s = create(std::ptr::null_mut(), text.as_ptr().cast(), text.len());
    if !s.is_null() {
        replace(fctx, pos, s);
    }
}
