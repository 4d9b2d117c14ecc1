//! Command shells: parse the arguments, call the core, write the effects and the reply.
//!
//! `credits` holds the commands over PostgreSQL-backed credits (GRANT, GET, REVOKE, LIST,
//! CLEANUP, INVALIDATE); `admission` the usage commands over account keys (ADMIT, COMMIT,
//! RELEASE, USAGE, RESET and the internal APPLY and SETSTATE). Every entry point runs inside
//! `ffi::blocked::guard`, so a panic becomes an error reply instead of aborting Redis.

pub(crate) mod admission;
pub(crate) mod credits;
mod error;
pub(crate) mod parse;
pub(crate) mod policies;

use crate::ffi::blocked::Resumable;
use crate::ffi::ctx::Ctx;
use crate::runtime::jobs::Done;
use crate::runtime::stats;
use error::name;
pub(crate) use error::CommandError;

/// Runs a command handler and replies its error, if any: the one error reply of the call.
#[inline(always)]
pub(crate) fn run(
    ctx: Ctx,
    args: &[&[u8]],
    handler: impl FnOnce(Ctx, &[&[u8]]) -> Result<(), CommandError>,
) {
    if let Err(e) = handler(ctx, args) {
        e.reply(ctx, args);
    }
}

impl Resumable for Done {
    fn dropped() -> Done {
        Done::Dropped
    }

    /// Called on the main thread when a worker finished the job a blocked client waits on.
    fn resume(ctx: Ctx, args: &[&[u8]], done: &Done) {
        run(ctx, args, |ctx, args| match name(args).as_str() {
            "QUOTA.ADMIT" => admission::admit_resumed(ctx, args, done),
            "QUOTA.GET" => credits::get_resumed(ctx, args, done),
            "QUOTA.POLICY" => policies::resume(ctx, args, done),
            _ => credits::resume(ctx, args, done),
        });
    }

    /// Called on the main thread when a blocked client's wait ran out.
    fn timed_out(ctx: Ctx, args: &[&[u8]]) {
        run(ctx, args, timed_out);
    }
}

/// Answers a blocked client whose wait ran out.
fn timed_out(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    stats::TIMEOUTS.incr();
    if name(args) == "QUOTA.ADMIT" {
        // Postgres is too slow: decide on the base policy rather than fail the request.
        return admission::admit_timed_out(ctx, args);
    }
    if name(args) == "QUOTA.POLICY" {
        if let Some(e) = policies::timed_out(args) {
            return Err(e);
        }
    }
    Err(error::timed_out())
}
