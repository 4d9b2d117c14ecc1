//! The error replies the command families share, each wire text written once. Parse errors
//! carry their own text (`ParseError`'s `Display`); arity errors use Redis's own wording.

use super::parse::ParseError;
use crate::ffi::ctx::Ctx;
use crate::runtime::config;
use crate::runtime::jobs::Done;

/// Redis refused to block the client.
pub(super) const CANNOT_BLOCK: &str = "ERR cannot block this client";

/// A user's credits are loading and the command cannot wait (ADMIT under `script-miss error`).
pub(super) const CREDITS_LOADING: &str =
    "TRYAGAIN credits for this user are loading from PostgreSQL: retry shortly";

/// A user's credits are loading and `QUOTA.GET` cannot wait (MULTI, scripts).
pub(super) const CREDITS_LOADING_NO_WAIT: &str = "TRYAGAIN credits for this user are loading from PostgreSQL: retry outside MULTI/scripts or shortly";

/// A resumed command's arguments no longer parse.
pub(super) const CANNOT_REREAD: &str = "ERR internal: cannot re-read the command";

/// The command name as Redis dispatched it, upper-cased.
pub(super) fn name(args: &[&[u8]]) -> String {
    args.first()
        .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
        .unwrap_or_default()
}

/// Replies a parse error; arity errors use Redis's own wording.
pub(super) fn fail(ctx: Ctx, args: &[&[u8]], err: ParseError) {
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

/// Replies the error for a job that did not produce an outcome.
pub(super) fn reply_undone(ctx: Ctx, done: &Done) {
    let text = match done {
        Done::Busy => "BUSY the redis-quota job queue is full (quota.queue-max): retry later",
        _ => "ERR redis-quota is shutting down: request dropped",
    };
    ctx.reply().error(text);
}

/// The error for commands that must wait on Postgres where blocking is not allowed.
pub(super) fn reply_cannot_block(ctx: Ctx, args: &[&[u8]]) {
    let text = format!(
        "ERR {} waits on PostgreSQL and cannot run inside MULTI, a script or a function",
        name(args)
    );
    ctx.reply().error(&text);
}

/// The error for a blocked client whose wait on Postgres ran out.
pub(super) fn reply_timed_out(ctx: Ctx) {
    let text = format!(
        "ERR PostgreSQL did not answer within {} ms (quota.pg-timeout-ms); the outcome of a \
         write is unknown: retry it (a PURCHASE id makes a retried grant safe)",
        config::int(&config::PG_TIMEOUT_MS)
    );
    ctx.reply().error(&text);
}
