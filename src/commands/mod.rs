//! Command shells: parse the arguments, call the core, write the effects and the reply.
//!
//! `credits` holds the commands over PostgreSQL-backed credits (GRANT, GET, REVOKE, LIST,
//! CLEANUP, INVALIDATE); `admission` the usage commands over account keys (ADMIT, COMMIT,
//! RELEASE, USAGE, RESET and the internal APPLY and SETSTATE). Every entry point runs inside
//! `ffi::blocked::guard`, so a panic becomes an error reply instead of aborting Redis.

pub mod admission;
pub mod credits;
pub mod parse;
pub mod policies;

use crate::ffi::blocked::Resumable;
use crate::ffi::ctx::Ctx;
use crate::runtime::config;
use crate::runtime::jobs::Done;
use crate::runtime::stats;
use parse::ParseError;

/// The command name as Redis dispatched it, upper-cased.
fn name(args: &[&[u8]]) -> String {
    args.first()
        .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
        .unwrap_or_default()
}

/// Replies a parse error; arity errors use Redis's own wording.
fn fail(ctx: Ctx, args: &[&[u8]], err: ParseError) {
    match err {
        ParseError::Arity => {
            let text = format!(
                "ERR wrong number of arguments for '{}' command",
                name(args).to_ascii_lowercase()
            );
            ctx.reply().error(&text);
        }
        other => {
            ctx.reply().error(&other.to_string());
        }
    }
}

/// How long a client waits on Postgres before its timeout callback answers.
fn block_timeout_ms() -> i64 {
    config::int(&config::PG_TIMEOUT_MS).max(1) + 250
}

/// Replies the error for a job that did not produce an outcome.
fn reply_undone(ctx: Ctx, done: &Done) {
    let text = match done {
        Done::Busy => "BUSY the redis-quota job queue is full (quota.queue-max): retry later",
        _ => "ERR redis-quota is shutting down: request dropped",
    };
    ctx.reply().error(text);
}

/// The error for commands that must wait on Postgres where blocking is not allowed.
fn reply_cannot_block(ctx: Ctx, args: &[&[u8]]) {
    let text = format!(
        "ERR {} waits on PostgreSQL and cannot run inside MULTI, a script or a function",
        name(args)
    );
    ctx.reply().error(&text);
}

impl Resumable for Done {
    fn dropped() -> Done {
        Done::Dropped
    }

    /// Called on the main thread when a worker finished the job a blocked client waits on.
    fn resume(ctx: Ctx, args: &[&[u8]], done: &Done) {
        match name(args).as_str() {
            "QUOTA.ADMIT" => admission::admit_resumed(ctx, args, done),
            "QUOTA.GET" => credits::get_resumed(ctx, args, done),
            "QUOTA.POLICY" => policies::resume(ctx, args, done),
            _ => credits::resume(ctx, args, done),
        }
    }

    /// Called on the main thread when a blocked client's wait ran out.
    fn timed_out(ctx: Ctx, args: &[&[u8]]) {
        timed_out(ctx, args);
    }
}

/// Answers a blocked client whose wait ran out.
fn timed_out(ctx: Ctx, args: &[&[u8]]) {
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
    ctx.reply().error(&text);
}
