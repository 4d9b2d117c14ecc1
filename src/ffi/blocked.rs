//! Blocked clients: a command's owned request waits on the main thread while a worker works.
//!
//! A command that must wait on Postgres blocks only its own client with `Blocked::block`,
//! handing over its parsed request, owned (a `Resumable`). The request stays on the main
//! thread, in a table keyed by Redis's blocked-client handle; the worker gets only the
//! `Blocked` handle and gives the outcome back with `Blocked::finish`. Redis then calls
//! `on_reply` on the main thread, with the client's own context, and the request's
//! `Resumable::resume` finishes the command with the outcome: the second half of the command,
//! beside its first half, with nothing parsed again and nothing looked up by name. If the
//! outcome does not come in time, `Resumable::timed_out` answers instead, with the same
//! request. A `Blocked` dropped unfinished (shutdown, a full queue, a bug) finishes itself
//! with `Outcome::dropped()`; a client that disconnected meanwhile has its request dropped
//! when Redis frees the outcome.
//!
//! Every blocked client is unblocked exactly once, by construction: the blocked-client handle
//! sits in one atomic slot shared by the worker's `Blocked` and a timer of the module's own,
//! and whichever takes it out first calls `RedisModule_UnblockClient` (the other finds the slot
//! empty). Redis's own block timeout is not used (the client blocks with none): on Redis 7.0, a
//! client unblocked by its worker just before Redis found its timeout expired got no reply at
//! all (`moduleBlockedClientTimedOut` returns early for an unblocked client, then
//! `unblockClient` drops the client's pending reply), and a pipelining client then read every
//! later reply as the answer to an earlier command. Both ways of ending the wait now go
//! through `on_reply`.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::Arc;

use redis_module::raw;

use std::marker::PhantomData;

use super::ctx::Ctx;

/// What a worker hands back to a blocked client.
pub(crate) trait Outcome: Send + Sized + 'static {
    /// The outcome of a client finished without one (shutdown, a full queue, a bug).
    fn dropped() -> Self;
}

/// A blocked command's parsed request, owned, and how the command finishes.
pub(crate) trait Resumable: Sized + 'static {
    /// What the worker hands back.
    type Outcome: Outcome;
    /// Finishes the command with its outcome (main thread, the client's own context).
    /// `args` are the command's arguments, for the wording of an error reply only.
    fn resume(self, ctx: Ctx, args: &[&[u8]], outcome: Self::Outcome);
    /// Answers a client whose wait ran out.
    fn timed_out(self, ctx: Ctx, args: &[&[u8]]);
}

/// A blocked client's request and the timer that ends its wait if the worker does not.
struct Waiting {
    request: Box<dyn Any>,
    timer: raw::RedisModuleTimerID,
}

thread_local! {
    /// The requests of the blocked clients, by blocked-client handle. Only the main thread
    /// (commands, reply, timeout and free callbacks) touches it.
    static WAITING: RefCell<HashMap<usize, Waiting>> = RefCell::new(HashMap::new());
}

/// Stops a wait's timer once the wait is over (main thread), and frees the timer's share of
/// the slot. Without this, the timer of a client its worker answered would stay armed until
/// `pg-timeout-ms` + 250 ms with its slot (about 90 bytes a client: 20,000 cold loads a second
/// would keep 2 MB armed) and then go off for nothing. A timer that already went off is gone:
/// nothing to stop.
fn stop_timer(ctx: *mut raw::RedisModuleCtx, timer: raw::RedisModuleTimerID) {
    let Some(stop) = (unsafe { raw::RedisModule_StopTimer }) else {
        return;
    };
    if ctx.is_null() {
        // (Never seen: Redis 7.0 and 8.2 give these callbacks a context.) The timer then goes
        // off later, finds the slot empty and frees its share itself.
        return;
    }
    let mut data: *mut c_void = ptr::null_mut();
    if unsafe { stop(ctx, timer, &mut data) } == raw::REDISMODULE_OK as c_int && !data.is_null() {
        // SAFETY: the timer's data is the `Arc<Slot>` share `Blocked::block` gave it; the
        // timer was stopped before it ran, so nothing else takes that share back.
        drop(unsafe { Arc::from_raw(data.cast_const().cast::<Slot>()) });
    }
}

/// Takes the request of the blocked client `handle`, if it is still waiting, and stops its
/// timer.
fn take_request<R: Resumable>(ctx: *mut raw::RedisModuleCtx, handle: usize) -> Option<R> {
    let waiting = WAITING.with(|w| w.borrow_mut().remove(&handle))?;
    stop_timer(ctx, waiting.timer);
    waiting.request.downcast::<R>().ok().map(|r| *r)
}

/// Clients blocked so far (for `INFO quota`: a cold miss on a PostgreSQL known to be down
/// must not block).
static BLOCKED_TOTAL: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Clients blocked since the module loaded.
pub(crate) fn blocked_total() -> u64 {
    BLOCKED_TOTAL.load(Ordering::Relaxed)
}

/// How a wait ended.
enum Ending<O> {
    /// The worker's outcome (taken by `on_reply`).
    Outcome(Option<O>),
    /// The module's timer went off first.
    TimedOut,
}

/// What travels back to the main thread as the blocked client's private data.
struct Finished<O> {
    /// The blocked-client handle, to drop its request if the client has gone.
    handle: usize,
    ending: Ending<O>,
}

/// The blocked-client handle, shared by the worker's `Blocked` and the module's timer until
/// one of them takes it out to unblock the client (the only two ways the wait ends).
struct Slot(AtomicPtr<raw::RedisModuleBlockedClient>);

impl Slot {
    /// Takes the handle out: `Some` for exactly one caller, ever.
    fn take(&self) -> Option<*mut raw::RedisModuleBlockedClient> {
        let bc = self.0.swap(ptr::null_mut(), Ordering::AcqRel);
        (!bc.is_null()).then_some(bc)
    }
}

// The handle is only passed to `RedisModule_UnblockClient` (thread safe), once.
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

/// Unblocks `bc` (taken from its slot) with how the wait ended.
fn unblock<O>(bc: *mut raw::RedisModuleBlockedClient, ending: Ending<O>) {
    let finished = Finished {
        handle: bc as usize,
        ending,
    };
    let data = Box::into_raw(Box::new(finished)).cast::<c_void>();
    unsafe {
        if let Some(f) = raw::RedisModule_UnblockClient {
            f(bc, data);
        }
    }
}

/// A client blocked until a worker finishes its job with an outcome `O`.
pub(crate) struct Blocked<O: Outcome> {
    slot: Arc<Slot>,
    outcome: PhantomData<fn(O)>,
}

impl<O: Outcome> Blocked<O> {
    /// Blocks the calling client, keeping `request` until the outcome finishes it, or after
    /// `timeout_ms` the module's timer; `None` if Redis refused (the request is dropped).
    pub(crate) fn block<R: Resumable<Outcome = O>>(
        ctx: Ctx,
        timeout_ms: i64,
        request: R,
    ) -> Option<Blocked<O>> {
        let (block, create_timer) =
            unsafe { (raw::RedisModule_BlockClient?, raw::RedisModule_CreateTimer?) };
        // No timeout of Redis's own (0): the timer below ends the wait (see the header).
        let bc = unsafe {
            block(
                ctx.raw(),
                Some(on_reply::<R>),
                None,
                Some(free_outcome::<O>),
                0,
            )
        };
        if bc.is_null() {
            return None;
        }
        BLOCKED_TOTAL.fetch_add(1, Ordering::Relaxed);
        let slot = Arc::new(Slot(AtomicPtr::new(bc)));
        let timer_slot = Arc::into_raw(Arc::clone(&slot)).cast_mut().cast::<c_void>();
        let period = timeout_ms.clamp(1, i64::from(i32::MAX));
        let timer = unsafe { create_timer(ctx.raw(), period, Some(expire::<O>), timer_slot) };
        let waiting = Waiting {
            request: Box::new(request),
            timer,
        };
        WAITING.with(|w| w.borrow_mut().insert(bc as usize, waiting));
        Some(Blocked {
            slot,
            outcome: PhantomData,
        })
    }

    /// Hands the outcome to the main thread, which replies from `on_reply` (unless the wait
    /// ran out first: the outcome is then dropped).
    pub(crate) fn finish(self, done: O) {
        if let Some(bc) = self.slot.take() {
            unblock(bc, Ending::Outcome(Some(done)));
        }
    }
}

impl<O: Outcome> Drop for Blocked<O> {
    fn drop(&mut self) {
        if let Some(bc) = self.slot.take() {
            unblock(bc, Ending::Outcome(Some(O::dropped())));
        }
    }
}

/// The module's timer for one blocked client (main thread): ends the wait unless the worker
/// did.
extern "C" fn expire<O: Outcome>(_ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    let slot = unsafe { Arc::from_raw(data.cast_const().cast::<Slot>()) };
    if let Some(bc) = slot.take() {
        unblock::<O>(bc, Ending::TimedOut);
    }
}

/// The blocked-client handle of a reply or timeout callback's context.
fn handle_of(ctx: *mut raw::RedisModuleCtx) -> usize {
    unsafe { raw::RedisModule_GetBlockedClientHandle.map_or(0, |f| f(ctx) as usize) }
}

/// The reply of a blocked client whose request is not in the table (never expected).
const LOST: &str = "ERR internal error in redis-quota: the blocked request was lost";

/// A command's arguments (on the stack for any usual command).
pub(crate) type Args<'a> = smallvec::SmallVec<[&'a [u8]; 24]>;

/// Decodes a command's arguments into byte slices that live as long as the call.
///
/// # Safety
/// `argv` must point to `argc` valid Redis strings for the duration of the returned borrow.
pub(crate) unsafe fn args<'a>(argv: *mut *mut raw::RedisModuleString, argc: c_int) -> Args<'a> {
    let mut out = Args::new();
    unsafe { args_into(&mut out, argv, argc) };
    out
}

/// `args` into a buffer the caller holds (a command's entry point: no copy of the buffer).
///
/// # Safety
/// As `args`.
pub(crate) unsafe fn args_into<'a>(
    out: &mut Args<'a>,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) {
    let n = usize::try_from(argc).unwrap_or(0);
    out.reserve(n);
    let Some(ptr_len) = (unsafe { raw::RedisModule_StringPtrLen }) else {
        return;
    };
    for i in 0..n {
        let s = unsafe { *argv.add(i) };
        let mut len = 0usize;
        let p = unsafe { ptr_len(s, &mut len) };
        if p.is_null() {
            out.push(&[][..]);
        } else {
            out.push(unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) });
        }
    }
}

/// Runs a command body, turning a panic into an error reply.
pub(crate) fn guard(ctx: Ctx, body: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_err() {
        redis_module::logging::log_warning("quota: internal error in a command (panic caught)");
        ctx.reply()
            .error("ERR internal error in redis-quota (see the server log)");
    }
}

/// Declares a raw command entry point that decodes the arguments and runs `$handler` (a
/// `fn(Ctx, &[&[u8]])` or closure) inside `guard`.
#[cfg(not(test))]
macro_rules! entry {
    ($entry:ident, $handler:expr) => {
        /// Raw entry point registered with Redis.
        extern "C" fn $entry(
            ctx: *mut redis_module::raw::RedisModuleCtx,
            argv: *mut *mut redis_module::raw::RedisModuleString,
            argc: std::os::raw::c_int,
        ) -> std::os::raw::c_int {
            let mut args = $crate::ffi::blocked::Args::new();
            unsafe { $crate::ffi::blocked::args_into(&mut args, argv, argc) };
            let ctx = $crate::ffi::ctx::Ctx::from_raw(ctx);
            $crate::ffi::blocked::guard(ctx, || ($handler)(ctx, &args));
            redis_module::raw::Status::Ok as std::os::raw::c_int
        }
    };
}
#[cfg(not(test))]
pub(crate) use entry;

extern "C" fn on_reply<R: Resumable>(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    let finished = unsafe {
        match raw::RedisModule_GetBlockedClientPrivateData {
            Some(f) => f(ctx).cast::<Finished<R::Outcome>>(),
            None => ptr::null_mut(),
        }
    };
    // The outcome is taken; the emptied box is freed by `free_outcome`.
    let ending = match unsafe { finished.as_mut() }.map(|f| &mut f.ending) {
        Some(Ending::TimedOut) => None,
        Some(Ending::Outcome(outcome)) => Some(outcome.take().unwrap_or_else(R::Outcome::dropped)),
        None => Some(R::Outcome::dropped()),
    };
    let request = take_request::<R>(ctx, handle_of(ctx));
    let args = unsafe { args(argv, argc) };
    let ctx = Ctx::from_raw(ctx);
    match (request, ending) {
        (Some(request), Some(outcome)) => guard(ctx, || request.resume(ctx, &args, outcome)),
        (Some(request), None) => guard(ctx, || request.timed_out(ctx, &args)),
        (None, _) => {
            ctx.reply().error(LOST);
        }
    }
    raw::Status::Ok as c_int
}

extern "C" fn free_outcome<O: Outcome>(ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    let finished = unsafe { Box::from_raw(data.cast::<Finished<O>>()) };
    // Still there only when the client went away before its reply: nothing will resume it.
    if let Some(waiting) = WAITING.with(|w| w.borrow_mut().remove(&finished.handle)) {
        stop_timer(ctx, waiting.timer);
    }
}
