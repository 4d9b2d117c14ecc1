//! Blocked clients with reply and timeout callbacks.
//!
//! A command that must wait on Postgres blocks only its own client with `Blocked::block`. The
//! worker that did the waiting hands the outcome back with `Blocked::finish`; Redis then calls
//! `on_reply` on the main thread, with the client's own context, and the outcome's
//! `Resumable::resume` finishes the command there through the same code as the fast path. If
//! the outcome does not come in time, `Resumable::timed_out` answers instead. A `Blocked` that
//! is dropped unfinished (shutdown, a full queue, a bug) finishes itself with
//! `Resumable::dropped`, so every blocked client gets exactly one reply.

use std::os::raw::{c_int, c_void};
use std::ptr;

use redis_module::raw;

use std::marker::PhantomData;

use super::ctx::Ctx;

/// The outcome a blocked client waits for, and how the command finishes with it on the main
/// thread.
pub(crate) trait Resumable: Send + Sized + 'static {
    /// The outcome of a client finished without one (shutdown, a full queue, a bug).
    fn dropped() -> Self;
    /// Finishes the command with its outcome (main thread, the client's own context).
    fn resume(ctx: Ctx, args: &[&[u8]], outcome: &Self);
    /// Answers a client whose wait ran out.
    fn timed_out(ctx: Ctx, args: &[&[u8]]);
}

/// A client blocked until a worker finishes its job with an outcome `T`.
pub(crate) struct Blocked<T: Resumable> {
    bc: *mut raw::RedisModuleBlockedClient,
    outcome: PhantomData<fn(T)>,
}

// The handle is only passed to `RedisModule_UnblockClient`, which is thread safe.
unsafe impl<T: Resumable> Send for Blocked<T> {}

impl<T: Resumable> Blocked<T> {
    /// Blocks the calling client for at most `timeout_ms`; `None` if Redis refused.
    pub(crate) fn block(ctx: Ctx, timeout_ms: i64) -> Option<Blocked<T>> {
        let bc = unsafe {
            let f = raw::RedisModule_BlockClient?;
            f(
                ctx.raw(),
                Some(on_reply::<T>),
                Some(on_timeout::<T>),
                Some(free_outcome::<T>),
                timeout_ms.max(1),
            )
        };
        if bc.is_null() {
            None
        } else {
            Some(Blocked {
                bc,
                outcome: PhantomData,
            })
        }
    }

    /// Hands the outcome to the main thread, which replies from `on_reply`.
    pub(crate) fn finish(mut self, done: T) {
        self.unblock(done);
    }

    fn unblock(&mut self, done: T) {
        let bc = std::mem::replace(&mut self.bc, ptr::null_mut());
        if bc.is_null() {
            return;
        }
        let data = Box::into_raw(Box::new(done)).cast::<c_void>();
        unsafe {
            if let Some(f) = raw::RedisModule_UnblockClient {
                f(bc, data);
            }
        }
    }
}

impl<T: Resumable> Drop for Blocked<T> {
    fn drop(&mut self) {
        self.unblock(T::dropped());
    }
}

/// A command's arguments (on the stack for any usual command).
pub(crate) type Args<'a> = smallvec::SmallVec<[&'a [u8]; 24]>;

/// Decodes a command's arguments into byte slices that live as long as the call.
///
/// # Safety
/// `argv` must point to `argc` valid Redis strings for the duration of the returned borrow.
pub(crate) unsafe fn args<'a>(argv: *mut *mut raw::RedisModuleString, argc: c_int) -> Args<'a> {
    let n = usize::try_from(argc).unwrap_or(0);
    let mut out = Args::with_capacity(n);
    let Some(ptr_len) = (unsafe { raw::RedisModule_StringPtrLen }) else {
        return out;
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
    out
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
            let args = unsafe { $crate::ffi::blocked::args(argv, argc) };
            let ctx = $crate::ffi::ctx::Ctx::from_raw(ctx);
            $crate::ffi::blocked::guard(ctx, || ($handler)(ctx, &args));
            redis_module::raw::Status::Ok as std::os::raw::c_int
        }
    };
}
#[cfg(not(test))]
pub(crate) use entry;

extern "C" fn on_reply<T: Resumable>(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    let done = unsafe {
        match raw::RedisModule_GetBlockedClientPrivateData {
            Some(f) => f(ctx).cast::<T>(),
            None => ptr::null_mut(),
        }
    };
    let args = unsafe { args(argv, argc) };
    let ctx = Ctx::from_raw(ctx);
    match unsafe { done.as_ref() } {
        Some(done) => guard(ctx, || T::resume(ctx, &args, done)),
        None => {
            let dropped = T::dropped();
            guard(ctx, || T::resume(ctx, &args, &dropped));
        }
    }
    raw::Status::Ok as c_int
}

extern "C" fn on_timeout<T: Resumable>(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    let args = unsafe { args(argv, argc) };
    let ctx = Ctx::from_raw(ctx);
    guard(ctx, || T::timed_out(ctx, &args));
    raw::Status::Ok as c_int
}

extern "C" fn free_outcome<T: Resumable>(_ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if !data.is_null() {
        drop(unsafe { Box::from_raw(data.cast::<T>()) });
    }
}
