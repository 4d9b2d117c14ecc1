//! What Redis tells the module about keys besides the module's own commands: a key renamed,
//! moved, restored, copied over, evicted or deleted (keyspace events), an account value leaving
//! the keyspace (the type's `unlink2`, called before Redis frees or moves it), and databases
//! swapped or flushed (server events), with the settings Redis changed (`CONFIG SET`).
//!
//! `install` subscribes once, at load, with the runtime's handlers (`Hooks`); nothing here
//! decides what an event means. Every callback runs on the main thread and never unwinds into
//! Redis.

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

use redis_module::raw;

use super::ctx::Ctx;
use crate::core::account::Account;

/// A keyspace event the runtime acts on, for one key of the event's database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyEvent {
    /// `RENAME`'s source: the value lives on under the name of the `RenamedTo` that follows.
    RenamedFrom,
    /// `RENAME`'s target: the value now there came from the `RenamedFrom` before.
    RenamedTo,
    /// `MOVE`'s source (in its database), then its target (in the other).
    MovedFrom,
    MovedTo,
    /// `RESTORE` (also `MIGRATE`'s target) put a value under this name.
    Restored,
    /// `COPY` put a copy under this name.
    CopiedTo,
    /// The key was evicted (`maxmemory`).
    Evicted,
    /// The key was deleted (`DEL`, `UNLINK`, `MIGRATE`'s source).
    Deleted,
}

impl KeyEvent {
    fn of(name: &[u8]) -> Option<KeyEvent> {
        Some(match name {
            b"rename_from" => KeyEvent::RenamedFrom,
            b"rename_to" => KeyEvent::RenamedTo,
            b"move_from" => KeyEvent::MovedFrom,
            b"move_to" => KeyEvent::MovedTo,
            b"restore" => KeyEvent::Restored,
            b"copy_to" => KeyEvent::CopiedTo,
            b"evicted" => KeyEvent::Evicted,
            b"del" => KeyEvent::Deleted,
            _ => return None,
        })
    }
}

/// The runtime's handlers.
pub(crate) struct Hooks {
    /// A key event, with the event's database selected in the context.
    pub key: fn(Ctx, KeyEvent, &[u8]),
    /// An account value leaves the keyspace under (database, name): deleted, evicted,
    /// overwritten, or renamed or moved away (the events that follow tell which).
    pub unlinked: fn(i32, &[u8], &Account),
    /// Two databases swapped their contents.
    pub swapped: fn(Ctx, i32, i32),
    /// A database (or every one: -1) is about to be flushed.
    pub flushing: fn(Ctx, i32),
    /// Redis settings were changed by `CONFIG SET` (their names).
    pub configured: fn(Ctx, &[&str]),
}

static HOOKS: OnceLock<Hooks> = OnceLock::new();

/// Installs the handlers and subscribes to what they need; only the first call counts.
pub(crate) fn install(ctx: Ctx, hooks: Hooks) {
    if HOOKS.set(hooks).is_err() {
        return;
    }
    unsafe {
        if let Some(subscribe) = raw::RedisModule_SubscribeToKeyspaceEvents {
            subscribe(
                ctx.raw(),
                raw::REDISMODULE_NOTIFY_GENERIC | raw::REDISMODULE_NOTIFY_EVICTED,
                Some(on_keyspace_event),
            );
        }
        if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
            for id in [
                raw::REDISMODULE_EVENT_SWAPDB,
                raw::REDISMODULE_EVENT_FLUSHDB,
                raw::REDISMODULE_EVENT_CONFIG,
            ] {
                let event = raw::RedisModuleEvent { id, dataver: 1 };
                subscribe(ctx.raw(), event, Some(on_server_event));
            }
        }
    }
}

/// Called by the account type's `unlink2` with the value leaving the keyspace.
pub(crate) fn unlinked(db: i32, name: &[u8], account: &Account) {
    if let Some(hooks) = HOOKS.get() {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (hooks.unlinked)(db, name, account)
        }));
    }
}

/// The bytes of a Redis string (empty for a null one).
///
/// # Safety
/// `s` must be null or a valid Redis string that outlives the returned slice.
pub(crate) unsafe fn string_bytes<'a>(s: *const raw::RedisModuleString) -> &'a [u8] {
    if s.is_null() {
        return &[];
    }
    let mut len = 0usize;
    let Some(ptr_len) = (unsafe { raw::RedisModule_StringPtrLen }) else {
        return &[];
    };
    let p = unsafe { ptr_len(s, &mut len) };
    if p.is_null() {
        &[]
    } else {
        unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) }
    }
}

extern "C" fn on_keyspace_event(
    ctx: *mut raw::RedisModuleCtx,
    _kind: c_int,
    event: *const c_char,
    key: *mut raw::RedisModuleString,
) -> c_int {
    if event.is_null() || key.is_null() {
        return 0;
    }
    let Some(event) = KeyEvent::of(unsafe { CStr::from_ptr(event) }.to_bytes()) else {
        return 0;
    };
    let Some(hooks) = HOOKS.get() else {
        return 0;
    };
    let name = unsafe { string_bytes(key) };
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        (hooks.key)(Ctx::from_raw(ctx), event, name)
    }));
    0
}

extern "C" fn on_server_event(
    ctx: *mut raw::RedisModuleCtx,
    event: raw::RedisModuleEvent,
    subevent: u64,
    data: *mut c_void,
) {
    let Some(hooks) = HOOKS.get() else {
        return;
    };
    if data.is_null() {
        return;
    }
    let ctx = Ctx::from_raw(ctx);
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match event.id {
        raw::REDISMODULE_EVENT_SWAPDB => {
            let info = unsafe { &*data.cast::<raw::RedisModuleSwapDbInfo>() };
            (hooks.swapped)(ctx, info.dbnum_first, info.dbnum_second);
        }
        raw::REDISMODULE_EVENT_FLUSHDB if subevent == raw::REDISMODULE_SUBEVENT_FLUSHDB_START => {
            let info = unsafe { &*data.cast::<raw::RedisModuleFlushInfo>() };
            (hooks.flushing)(ctx, info.dbnum);
        }
        raw::REDISMODULE_EVENT_CONFIG if subevent == raw::REDISMODULE_SUBEVENT_CONFIG_CHANGE => {
            let change = unsafe { &*data.cast::<raw::RedisModuleConfigChange>() };
            let n = usize::try_from(change.num_changes).unwrap_or(0);
            let names: Vec<&str> = (0..n)
                .filter_map(|i| {
                    let p = unsafe { *change.config_names.add(i) };
                    (!p.is_null())
                        .then(|| unsafe { CStr::from_ptr(p) }.to_str().ok())
                        .flatten()
                })
                .collect();
            (hooks.configured)(ctx, &names);
        }
        _ => {}
    }));
}

/// A Redis setting's value (`CONFIG GET <name>`), if Redis answers it.
pub(crate) fn server_setting(ctx: Ctx, name: &CStr) -> Option<String> {
    unsafe {
        let call = raw::RedisModule_Call?;
        let reply = call(
            ctx.raw(),
            c"CONFIG".as_ptr(),
            c"cc".as_ptr(),
            c"GET".as_ptr(),
            name.as_ptr(),
        );
        if reply.is_null() {
            return None;
        }
        let value = (|| {
            let element = raw::RedisModule_CallReplyArrayElement?;
            let value = element(reply, 1);
            if value.is_null() {
                return None;
            }
            let mut len = 0usize;
            let p = raw::RedisModule_CallReplyStringPtr?(value, &mut len);
            (!p.is_null()).then(|| {
                String::from_utf8_lossy(std::slice::from_raw_parts(p.cast::<u8>(), len))
                    .into_owned()
            })
        })();
        if let Some(free) = raw::RedisModule_FreeCallReply {
            free(reply);
        }
        value
    }
}
