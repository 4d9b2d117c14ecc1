//! Whether effects need to be propagated at all.
//!
//! Redis itself drops propagated commands when there is no AOF and no replication backlog
//! (no replica attached now or recently). Building our `QUOTA.SETSTATE` payload costs a fifth
//! of an admission, so we skip it in that same case. Any event after which someone may be
//! listening — a fork (replica sync, BGSAVE, AOF rewrite), a replica coming or going, a role
//! change, the end of loading — switches propagation on for good, and a cheap re-check of
//! `INFO replication` and the AOF flag every 100 ms catches anything else. Once on, it stays on.

use std::os::raw::c_int;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use redis_module::raw;

use crate::core::Millis;

static ALWAYS: AtomicBool = AtomicBool::new(false);
static LAST_CHECK_MS: AtomicI64 = AtomicI64::new(i64::MIN);
const RECHECK_MS: i64 = 100;

/// Whether effects must be replicated now (main thread).
pub fn needed(ctx: *mut raw::RedisModuleCtx, now: Millis) -> bool {
    if ALWAYS.load(Ordering::Relaxed) {
        return true;
    }
    if now.saturating_sub(LAST_CHECK_MS.load(Ordering::Relaxed)) < RECHECK_MS {
        return false;
    }
    LAST_CHECK_MS.store(now, Ordering::Relaxed);
    if someone_listens(ctx) {
        ALWAYS.store(true, Ordering::Relaxed);
        return true;
    }
    false
}

/// Switches propagation on for good.
pub fn switch_on() {
    ALWAYS.store(true, Ordering::Relaxed);
}

fn someone_listens(ctx: *mut raw::RedisModuleCtx) -> bool {
    let flags = unsafe { raw::RedisModule_GetContextFlags.map_or(0, |f| f(ctx)) };
    let aof_or_replica =
        (raw::REDISMODULE_CTX_FLAGS_AOF | raw::REDISMODULE_CTX_FLAGS_SLAVE) as c_int;
    if flags & aof_or_replica != 0 {
        return true;
    }
    unsafe {
        let (Some(get), Some(field), Some(free)) = (
            raw::RedisModule_GetServerInfo,
            raw::RedisModule_ServerInfoGetFieldSigned,
            raw::RedisModule_FreeServerInfo,
        ) else {
            return true;
        };
        let info = get(ctx, c"replication".as_ptr());
        if info.is_null() {
            return true;
        }
        let mut err: c_int = 0;
        let backlog = field(info, c"repl_backlog_active".as_ptr(), &mut err);
        let backlog_unknown = err != 0;
        let replicas = field(info, c"connected_slaves".as_ptr(), &mut err);
        free(ctx, info);
        backlog_unknown || err != 0 || backlog != 0 || replicas != 0
    }
}

extern "C" fn on_event(
    _ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    _sub: u64,
    _data: *mut std::os::raw::c_void,
) {
    switch_on();
}

/// Subscribes to the server events after which someone may be listening.
pub fn subscribe(ctx: *mut raw::RedisModuleCtx) {
    let events = [
        raw::REDISMODULE_EVENT_FORK_CHILD,
        raw::REDISMODULE_EVENT_REPLICA_CHANGE,
        raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED,
        raw::REDISMODULE_EVENT_LOADING,
    ];
    for id in events {
        unsafe {
            if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
                subscribe(
                    ctx,
                    raw::RedisModuleEvent { id, dataver: 1 },
                    Some(on_event),
                );
            }
        }
    }
}
