//! Command shells: parse the arguments (`crate::parse`), call the core, write the effects and
//! the reply.
//!
//! Every command that reads the caches goes gather (`runtime::gather`) -> decide (`core`) ->
//! apply -> reply. `admit` holds ADMIT; `leases` COMMIT and RELEASE; `usage` USAGE and RESET;
//! `replication` the apply step (`update`) and the internal APPLY and SETSTATE; `replies` the
//! reply writers; `credits` the commands over PostgreSQL-backed credits (GRANT, GET, REVOKE,
//! LIST, CLEANUP, INVALIDATE, HISTORY); `policies` QUOTA.POLICY; `project` the reads over a
//! whole project (FIND, with its cursor in `parse::cursor`, and TOP). Every entry point runs inside
//! `ffi::blocked::guard`, so a panic becomes an error reply instead of aborting Redis.

pub(crate) mod admit;
pub(crate) mod credits;
mod error;
pub(crate) mod leases;
pub(crate) mod policies;
pub(crate) mod project;
pub(crate) mod replication;
mod replies;
pub(crate) mod usage;
pub(crate) mod words;

use crate::ffi::blocked::Resumable;
use crate::ffi::ctx::Ctx;
use crate::runtime::jobs::Done;
use crate::runtime::stats;
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

/// The second half of a command that waited on a worker: the command's parsed request,
/// owned, finishing with what the worker found. Every `Waiting` is a `Resumable`, so
/// `Blocked::block` registers it with the blocked client and nothing is looked up by name.
pub(crate) trait Waiting: Sized + 'static {
    /// Finishes the command with the worker's outcome.
    fn resumed(self, ctx: Ctx, done: Done) -> Result<(), CommandError>;

    /// Answers when the wait on PostgreSQL ran out (by default the timeout error: the outcome
    /// of a write is unknown).
    fn expired(self, _ctx: Ctx) -> Result<(), CommandError> {
        Err(error::timed_out())
    }
}

impl<W: Waiting> Resumable for W {
    type Outcome = Done;

    fn resume(self, ctx: Ctx, args: &[&[u8]], done: Done) {
        run(ctx, args, |ctx, _| self.resumed(ctx, done));
    }

    fn timed_out(self, ctx: Ctx, args: &[&[u8]]) {
        stats::TIMEOUTS.incr();
        // PostgreSQL did not answer in time: the next misses answer at once (see `health`).
        crate::runtime::health::failed(crate::runtime::clock::now_ms());
        run(ctx, args, |ctx, _| self.expired(ctx));
    }
}
