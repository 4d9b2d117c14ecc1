//! Blocked clients with reply and timeout callbacks.
//!
//! A command that must wait on Postgres blocks only its own client with `Blocked::block`. The
//! worker that did the waiting hands the outcome back with `Blocked::finish`; Redis then calls
//! `on_reply` on the main thread, with the client's own context, and the command finishes there
//! through the same code as the fast path. If the outcome does not come in time, `on_timeout`
//! answers instead. A `Blocked` that is dropped unfinished (shutdown, a full queue, a bug)
//! finishes itself with `Done::Dropped`, so every blocked client gets exactly one reply.

use std::os::raw::{c_int, c_void};
use std::ptr;

use redis_module::raw;

use crate::worker::Done;

/// A client blocked until a worker finishes its job.
pub struct Blocked {
    bc: *mut raw::RedisModuleBlockedClient,
}

// The handle is only passed to `RedisModule_UnblockClient`, which is thread safe.
unsafe impl Send for Blocked {}

impl Blocked {
    /// Blocks the calling client for at most `timeout_ms`; `None` if Redis refused.
    pub fn block(ctx: *mut raw::RedisModuleCtx, timeout_ms: i64) -> Option<Blocked> {
        let bc = unsafe {
            let f = raw::RedisModule_BlockClient?;
            f(
                ctx,
                Some(on_reply),
                Some(on_timeout),
                Some(free_done),
                timeout_ms.max(1),
            )
        };
        if bc.is_null() {
            None
        } else {
            Some(Blocked { bc })
        }
    }

    /// Hands the outcome to the main thread, which replies from `on_reply`.
    pub fn finish(mut self, done: Done) {
        self.unblock(done);
    }

    fn unblock(&mut self, done: Done) {
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

impl Drop for Blocked {
    fn drop(&mut self) {
        self.unblock(Done::Dropped);
    }
}

/// A command's arguments (on the stack for any usual command).
pub type Args<'a> = smallvec::SmallVec<[&'a [u8]; 24]>;

/// Decodes a command's arguments into byte slices that live as long as the call.
///
/// # Safety
/// `argv` must point to `argc` valid Redis strings for the duration of the returned borrow.
pub unsafe fn args<'a>(argv: *mut *mut raw::RedisModuleString, argc: c_int) -> Args<'a> {
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

extern "C" fn on_reply(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    let done = unsafe {
        match raw::RedisModule_GetBlockedClientPrivateData {
            Some(f) => f(ctx).cast::<Done>(),
            None => ptr::null_mut(),
        }
    };
    let args = unsafe { args(argv, argc) };
    let done = unsafe { done.as_ref() }.unwrap_or(&Done::Dropped);
    crate::commands::guard(ctx, || crate::commands::resume(ctx, &args, done));
    raw::Status::Ok as c_int
}

extern "C" fn on_timeout(
    ctx: *mut raw::RedisModuleCtx,
    argv: *mut *mut raw::RedisModuleString,
    argc: c_int,
) -> c_int {
    let args = unsafe { args(argv, argc) };
    crate::commands::guard(ctx, || crate::commands::timed_out(ctx, &args));
    raw::Status::Ok as c_int
}

extern "C" fn free_done(_ctx: *mut raw::RedisModuleCtx, data: *mut c_void) {
    if !data.is_null() {
        drop(unsafe { Box::from_raw(data.cast::<Done>()) });
    }
}
