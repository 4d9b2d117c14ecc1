//! Speed trick: a change nobody can receive is counted, not propagated.
//!
//! **What it buys.** A command's change travels as its effect through
//! `RedisModule_Replicate`, which on every call looks the command up by name (an `sds` copy,
//! a split and a hash lookup) and builds its arguments (an array and string objects): uprobes
//! on jemalloc count ten fewer mallocs per admission without it (30 to 20). On a node with no replica and no AOF, Redis drops
//! the result at once. There, `RedisModule_ReplicateVerbatim` does the one thing that must
//! still happen, counting the change for the RDB save rules (Redis's dirty counter), at no
//! other cost: about a tenth of the server's CPU per one-rate `QUOTA.ADMIT` on Redis 7.0
//! (`make bench`; README, "Speed tricks").
//!
//! **Why it is safe.** `ReplicateVerbatim` would send the command as it was called (an
//! admission that a replica or the AOF would decide again with its own clock), so it is used
//! only while nothing can receive it: this node is a master, its AOF is off (checked on every
//! call), it has no replication backlog and no replica (checked once, after loading), and no
//! replica has asked to sync since (the module's command filter sees every `SYNC` and `PSYNC`
//! before Redis runs it, so before Redis creates the backlog the replica will read from).
//! A role change (`REPLICAOF`, a failover) ends it too. Once ended it stays ended until the
//! next start: a backlog outlives its replicas, and a replica may come back to it.
//!
//! **What it costs.** The filter compares the name of every command of at most four arguments
//! with `SYNC` and `PSYNC`; each change reads the context flags once (the AOF check) and two
//! thread-local cells of the main thread. The account commands ask once, before they decide
//! (`commands::replication::update`), so an admission nobody receives does not even encode
//! its effect (`AdmitInputs::listened`, `Propagate::Counted`).
//!
//! **How to remove it.** Make `nobody_listens` return false (or delete this file and its
//! callers: `commands::replication::update` and the filter's call to `command_seen`).

use std::cell::Cell;
use std::ffi::CStr;
use std::os::raw::{c_int, c_void};

use redis_module::raw;

use super::ctx::Ctx;

/// Whether it can still be used: false before the first check, and for good after a sign of
/// a listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Not checked yet (the module has just loaded, or the node is still loading).
    Unknown,
    /// Checked: a master with no backlog and no replica, and nothing since.
    Quiet,
    /// A replica, a backlog, a sync or a role change was seen: always propagate.
    Listened,
}

thread_local! {
    // The main thread's: commands, the filter and server events all run there.
    static STATE: Cell<State> = const { Cell::new(State::Unknown) };
    // Whether the filter and the role-change event are in place (without them, never quiet).
    static WATCHING: Cell<bool> = const { Cell::new(false) };
}

/// Subscribes to role changes; with `filter_registered` (the command filter calls
/// `command_seen`), the trick may be used from the first check on.
pub(crate) fn watch(ctx: Ctx, filter_registered: bool) {
    let subscribed = unsafe {
        raw::RedisModule_SubscribeToServerEvent.is_some_and(|subscribe| {
            let event = raw::RedisModuleEvent {
                id: raw::REDISMODULE_EVENT_REPLICATION_ROLE_CHANGED,
                dataver: 1,
            };
            subscribe(ctx.raw(), event, Some(role_changed)) == raw::REDISMODULE_OK as c_int
        })
    };
    WATCHING.with(|w| w.set(subscribed && filter_registered));
}

extern "C" fn role_changed(
    _ctx: *mut raw::RedisModuleCtx,
    _event: raw::RedisModuleEvent,
    _sub: u64,
    _data: *mut c_void,
) {
    listened();
}

fn listened() {
    STATE.with(|s| s.set(State::Listened));
}

/// Called by the command filter with a command's name and argument count (name included):
/// a replica's `SYNC` or `PSYNC` ends the quiet before Redis runs it.
#[inline]
pub(crate) fn command_seen<'a>(argc: c_int, name: impl FnOnce() -> &'a [u8]) {
    // SYNC has no argument, PSYNC two; leave room for what a later Redis may add.
    if !(1..=5).contains(&argc) || STATE.with(Cell::get) == State::Listened {
        return;
    }
    let name = name();
    if name.len() >= 4 && name.len() <= 5 && name.eq_ignore_ascii_case(b"sync")
        || name.eq_ignore_ascii_case(b"psync")
    {
        listened();
    }
}

/// Whether a change made now by a command can reach no replica and no AOF.
#[inline]
pub(crate) fn nobody_listens(ctx: Ctx) -> bool {
    let state = match STATE.with(Cell::get) {
        State::Listened => return false,
        State::Quiet => State::Quiet,
        State::Unknown => first_check(ctx),
    };
    state == State::Quiet && !ctx.aof_or_loading()
}

/// The first look, once loading is over: a master with no backlog and no replica is quiet.
fn first_check(ctx: Ctx) -> State {
    if !WATCHING.with(Cell::get) || ctx.aof_or_loading() {
        return State::Unknown;
    }
    let state = if ctx.is_master() && replication_idle(ctx) {
        State::Quiet
    } else {
        State::Listened
    };
    STATE.with(|s| s.set(state));
    state
}

/// Whether `INFO replication` says there is no backlog and no connected replica (false when
/// it cannot be read).
fn replication_idle(ctx: Ctx) -> bool {
    unsafe {
        let (Some(get), Some(field), Some(free)) = (
            raw::RedisModule_GetServerInfo,
            raw::RedisModule_ServerInfoGetFieldSigned,
            raw::RedisModule_FreeServerInfo,
        ) else {
            return false;
        };
        let info = get(ctx.raw(), c"replication".as_ptr());
        if info.is_null() {
            return false;
        }
        let zero = |name: &CStr| {
            let mut err: c_int = 0;
            let v = field(info, name.as_ptr(), &mut err);
            err == 0 && v == 0
        };
        let idle = zero(c"repl_backlog_active") && zero(c"connected_slaves");
        free(ctx.raw(), info);
        idle
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sync_ends_the_quiet_for_good_and_other_commands_do_not() {
        STATE.with(|s| s.set(State::Quiet));
        command_seen(2, || b"INCR");
        command_seen(3, || b"SET");
        command_seen(0, || b"SYNC");
        assert_eq!(STATE.with(Cell::get), State::Quiet);
        command_seen(3, || b"pSync");
        assert_eq!(STATE.with(Cell::get), State::Listened);
        STATE.with(|s| s.set(State::Quiet));
        command_seen(1, || b"sync");
        assert_eq!(STATE.with(Cell::get), State::Listened);
        // Nothing brings it back but a restart.
        command_seen(2, || b"GET");
        assert_eq!(STATE.with(Cell::get), State::Listened);
    }
}
