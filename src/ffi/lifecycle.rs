//! The module's life with Redis outside commands and keys: the module options set at load,
//! one-shot timers on the main thread, and the shutdown event.
//!
//! Nothing here decides what a timer or the shutdown does: the runtime hands its functions in.
//! Every callback runs on the main thread, with the context Redis passes it.

use std::os::raw::{c_int, c_void};
use std::sync::OnceLock;
use std::time::Duration;

use redis_module::{raw, Context};

use super::ctx::Ctx;

/// Asks Redis to fail the load of a value that cannot be read (RESTORE: "Bad data format")
/// instead of taking the server down: the account type's `rdb_load` checks every read.
pub(crate) fn handle_io_errors(ctx: Ctx) {
    if let Some(set_options) = unsafe { raw::RedisModule_SetModuleOptions } {
        unsafe {
            set_options(
                ctx.raw(),
                raw::REDISMODULE_OPTIONS_HANDLE_IO_ERRORS as c_int,
            )
        };
    }
}

/// Runs `callback` once, `period` from now, on the main thread. A timer that runs again arms
/// itself anew from its callback.
pub(crate) fn after(ctx: Ctx, period: Duration, callback: fn(Ctx)) {
    Context::new(ctx.raw()).create_timer(
        period,
        move |ctx: &Context, ()| callback(Ctx::from_raw(ctx.ctx)),
        (),
    );
}

static SHUTDOWN: OnceLock<fn(Ctx)> = OnceLock::new();

/// Runs `hook` when Redis shuts down (before it exits, with the server still whole); only the
/// first call counts.
pub(crate) fn on_shutdown(ctx: Ctx, hook: fn(Ctx)) {
    // Always the same function: a second load in this process keeps the first.
    let _ = SHUTDOWN.set(hook);
    unsafe {
        if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
            let event = raw::RedisModuleEvent {
                id: raw::REDISMODULE_EVENT_SHUTDOWN,
                dataver: 1,
            };
            subscribe(ctx.raw(), event, Some(shutting_down));
        }
    }
}

extern "C" fn shutting_down(
    ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    _sub: u64,
    _data: *mut c_void,
) {
    if let Some(hook) = SHUTDOWN.get() {
        hook(Ctx::from_raw(ctx));
    }
}
