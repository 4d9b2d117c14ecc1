//! Command shells: parse the arguments, call the core, write the effects and the reply.
//!
//! `credits` holds the commands over PostgreSQL-backed credits (GRANT, GET, REVOKE, LIST,
//! CLEANUP, INVALIDATE); `admission` the usage commands over account keys (ADMIT, COMMIT,
//! RELEASE, USAGE, RESET and the internal APPLY and SETSTATE). Every entry point runs inside `guard`, so a
//! panic becomes an error reply instead of aborting Redis.

pub mod admission;
pub mod credits;
pub mod parse;
pub mod policies;

use std::os::raw::c_int;

use redis_module::raw;

use crate::config;
use crate::glue::reply::Reply;
use crate::stats;
use crate::worker::Done;
use parse::ParseError;

/// Runs a command body, turning a panic into an error reply.
pub fn guard(ctx: *mut raw::RedisModuleCtx, body: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
        redis_module::logging::log_warning("quota: internal error in a command (panic caught)");
        Reply::new(ctx).error("ERR internal error in redis-quota (see the server log)");
    }
}

/// The command name as Redis dispatched it, upper-cased.
fn name(args: &[&[u8]]) -> String {
    args.first()
        .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
        .unwrap_or_default()
}

/// Replies a parse error; arity errors use Redis's own wording.
fn fail(ctx: *mut raw::RedisModuleCtx, args: &[&[u8]], err: ParseError) {
    match err {
        ParseError::Arity => {
            let text = format!(
                "ERR wrong number of arguments for '{}' command",
                name(args).to_ascii_lowercase()
            );
            Reply::new(ctx).error(&text);
        }
        other => {
            Reply::new(ctx).error(&other.to_string());
        }
    }
}

/// Whether this client may be blocked (not inside MULTI, a script or a function).
fn can_block(ctx: *mut raw::RedisModuleCtx) -> bool {
    let flags = unsafe { raw::RedisModule_GetContextFlags.map_or(0, |f| f(ctx)) };
    flags & raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING as c_int == 0
}

/// The context flags of this call.
fn flags(ctx: *mut raw::RedisModuleCtx) -> c_int {
    unsafe { raw::RedisModule_GetContextFlags.map_or(0, |f| f(ctx)) }
}

/// How long a client waits on Postgres before its timeout callback answers.
fn block_timeout_ms() -> i64 {
    config::int(&config::PG_TIMEOUT_MS).max(1) + 250
}

/// Replies the error for a job that did not produce an outcome.
fn reply_undone(ctx: *mut raw::RedisModuleCtx, done: &Done) {
    let text = match done {
        Done::Busy => "BUSY the redis-quota job queue is full (quota.queue-max): retry later",
        _ => "ERR redis-quota is shutting down: request dropped",
    };
    Reply::new(ctx).error(text);
}

/// The error for commands that must wait on Postgres where blocking is not allowed.
fn reply_cannot_block(ctx: *mut raw::RedisModuleCtx, args: &[&[u8]]) {
    let text = format!(
        "ERR {} waits on PostgreSQL and cannot run inside MULTI, a script or a function",
        name(args)
    );
    Reply::new(ctx).error(&text);
}

/// Called on the main thread when a worker finished the job a blocked client waits on.
pub fn resume(ctx: *mut raw::RedisModuleCtx, args: &[&[u8]], done: &Done) {
    match name(args).as_str() {
        "QUOTA.ADMIT" => admission::admit_resumed(ctx, args, done),
        "QUOTA.GET" => credits::get_resumed(ctx, args, done),
        "QUOTA.POLICY" => policies::resume(ctx, args, done),
        _ => credits::resume(ctx, args, done),
    }
}

/// Called on the main thread when a blocked client's wait ran out.
pub fn timed_out(ctx: *mut raw::RedisModuleCtx, args: &[&[u8]]) {
    stats::TIMEOUTS.incr();
    if name(args) == "QUOTA.ADMIT" {
        // Postgres is too slow: decide on the base policy rather than fail the request.
        admission::admit_timed_out(ctx, args);
        return;
    }
    if name(args) == "QUOTA.POLICY" && policies::timed_out(ctx, args) {
        return;
    }
    let text = format!(
        "ERR PostgreSQL did not answer within {} ms (quota.pg-timeout-ms); the outcome of a \
         write is unknown: retry it (a PURCHASE id makes a retried grant safe)",
        config::int(&config::PG_TIMEOUT_MS)
    );
    Reply::new(ctx).error(&text);
}

/// Declares a raw command entry point that decodes the arguments and runs `$handler`.
macro_rules! entry {
    ($entry:ident, $handler:path) => {
        /// Raw entry point registered with Redis.
        pub extern "C" fn $entry(
            ctx: *mut redis_module::raw::RedisModuleCtx,
            argv: *mut *mut redis_module::raw::RedisModuleString,
            argc: std::os::raw::c_int,
        ) -> std::os::raw::c_int {
            let args = unsafe { crate::glue::blocked::args(argv, argc) };
            crate::commands::guard(ctx, || $handler(ctx, &args));
            redis_module::raw::Status::Ok as std::os::raw::c_int
        }
    };
}

entry!(cmd_grant, credits::grant);
entry!(cmd_get, credits::get);
entry!(cmd_revoke, credits::revoke);
entry!(cmd_list, credits::list);
entry!(cmd_cleanup, credits::cleanup);
entry!(cmd_invalidate, credits::invalidate);
entry!(cmd_admit, admission::admit);
entry!(cmd_commit, admission::commit);
entry!(cmd_release, admission::release);
entry!(cmd_usage, admission::usage);
entry!(cmd_reset, admission::reset);
entry!(cmd_setstate, admission::setstate);
entry!(cmd_apply, admission::apply);
entry!(cmd_policy, policies::policy);
