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
//! with `Outcome::dropped()`, so every blocked client gets exactly one reply; a client that
//! disconnected meanwhile has its request dropped when Redis frees the outcome.

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::os::raw::{c_int, c_void};
use std::ptr;

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

thread_local! {
    /// The requests of the blocked clients, by blocked-client handle. Only the main thread
    /// (commands, reply, timeout and free callbacks) touches it.
    static WAITING: RefCell<HashMap<usize, Box<dyn Any>>> = RefCell::new(HashMap::new());
}

/// Takes the request of the blocked client `handle`, if it is still waiting.
fn take_request<R: Resumable>(handle: usize) -> Option<R> {
    let request = WAITING.with(|w| w.borrow_mut().remove(&handle))?;
    request.downcast::<R>().ok().map(|r| *r)
}

/// What travels back to the main thread as the blocked client's private data.
struct Finished<O> {
    /// The blocked-client handle, to drop its request if the client has gone.
    handle: usize,
    outcome: Option<O>,
}

/// A client blocked until a worker finishes its job with an outcome `O`.
pub(crate) struct Blocked<O: Outcome> {
    bc: *mut raw::RedisModuleBlockedClient,
    outcome: PhantomData<fn(O)>,
}

// The handle is only passed to `RedisModule_UnblockClient`, which is thread safe.
unsafe impl<O: Outcome> Send for Blocked<O> {}

impl<O: Outcome> Blocked<O> {
    /// Blocks the calling client for at most `timeout_ms`, keeping `request` until the outcome
    /// (or the timeout) finishes it; `None` if Redis refused (the request is dropped).
    pub(crate) fn block<R: Resumable<Outcome = O>>(
        ctx: Ctx,
        timeout_ms: i64,
        request: R,
    ) -> Option<Blocked<O>> {
        let bc = unsafe {
            let f = raw::RedisModule_BlockClient?;
            f(
                ctx.raw(),
                Some(on_reply::<R>),
                Some(on_timeout::<R>),
                Some(free_outcome::<O>),
                timeout_ms.max(1),
            )
        };
        if bc.is_null() {
            return None;
        }
        WAITING.with(|w| w.borrow_mut().insert(bc as usize, Box::new(request)));
        Some(Blocked {
            bc,
            outcome: PhantomData,
        })
    }

    /// Hands the outcome to the main thread, which replies from `on_reply`.
    pub(crate) fn finish(mut self, done: O) {
        self.unblock(done);
    }

    fn unblock(&mut self, done: O) {
        let bc = std::mem::replace(&mut self.bc, ptr::null_mut());
        if bc.is_null() {
            return;
        }
        let finished = Finished {
            handle: bc as usize,
            outcome: Some(done),
        };
        let data = Box::into_raw(Box::new(finished)).cast::<c_void>();
        unsafe {
            if let Some(f) = raw::RedisModule_UnblockClient {
                f(bc, data);
            }
        }
    }
}

impl<O: Outcome> Drop for Blocked<O> {
    fn drop(&mut self) {
        self.unblock(O::dropped());
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
    let outcome = unsafe { finished.as_mut() }
        .and_then(|f| f.outcome.take())
        .unwrap_or_else(R::Outcome::dropped);
    let request = take_request::<R>(handle_of(ctx));
    let args = unsafe { args(argv, argc) };
    let ctx = Ctx::from_raw(ctx);
    match request {
        Some(request) => guard(ctx, || request.resume(ctx, &args, outcome)),
        None => {
            ctx.reply().error(LOST);
        }
    }
    raw::Status::Ok as c_int
}

extern "C" fn on_timeout<R: Resumable>(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    let request = take_request::<R>(handle_of(ctx));
    let args = unsafe { args(argv, argc) };
    let ctx = Ctx::from_raw(ctx);
    match request {
        Some(request) => guard(ctx, || request.timed_out(ctx, &args)),
        None => {
            ctx.reply().error(LOST);
        }
    }
    raw::Status::Ok as c_int
}

extern "C" fn free_outcome<O: Outcome>(_ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if data.is_null() {
        return;
    }
    let finished = unsafe { Box::from_raw(data.cast::<Finished<O>>()) };
    // Still there only when the client went away before its reply: nothing will resume it.
    WAITING.with(|w| w.borrow_mut().remove(&finished.handle));
}
