//! The command context: a Copy handle on the `RedisModuleCtx` Redis hands a command, with the
//! few things a command does through it (reply, read its flags, block, replicate). Commands
//! hold a `Ctx` and never the raw pointer, so they need no `unsafe` of their own.

use std::ffi::CStr;
use std::os::raw::c_int;

use redis_module::raw;

use super::reply::Reply;

/// The context of one command call (main thread, GIL held).
#[derive(Clone, Copy)]
pub(crate) struct Ctx {
    raw: *mut raw::RedisModuleCtx,
}

impl Ctx {
    /// The wall-clock time Redis took when the command being run started, in milliseconds, on
    /// Redis 7.2 and later (`RedisModule_CachedMicroseconds`): the time Redis itself uses for
    /// that command's key expiry, read without a system call. A script or a `MULTI` sees one
    /// time, as Redis's own expiry does. `None` before 7.2. Only at the start of a command: a
    /// blocked client's reply runs later than its command and reads the clock itself.
    #[inline]
    pub(crate) fn command_time_ms(self) -> Option<i64> {
        let cached = unsafe { raw::RedisModule_CachedMicroseconds }?;
        Some(unsafe { cached() } / 1000)
    }

    /// Wraps the context pointer Redis passed to an entry point or callback.
    #[inline]
    pub(crate) fn from_raw(raw: *mut raw::RedisModuleCtx) -> Ctx {
        Ctx { raw }
    }

    /// The raw pointer, for the other wrappers of this floor.
    #[inline]
    pub(crate) fn raw(self) -> *mut raw::RedisModuleCtx {
        self.raw
    }

    /// A reply writer for this call.
    #[inline]
    pub(crate) fn reply(self) -> Reply {
        Reply::new(self.raw)
    }

    /// The context flags of this call.
    #[inline]
    fn flags(self) -> c_int {
        unsafe { raw::RedisModule_GetContextFlags.map_or(0, |f| f(self.raw)) }
    }

    /// Whether this client may be blocked (not inside MULTI, a script or a function).
    #[inline]
    pub(crate) fn can_block(self) -> bool {
        self.flags() & raw::REDISMODULE_CTX_FLAGS_DENY_BLOCKING as c_int == 0
    }

    /// Whether this call comes from the master link or an AOF load.
    #[inline]
    pub(crate) fn called_by_master_or_aof(self) -> bool {
        let allowed =
            (raw::REDISMODULE_CTX_FLAGS_REPLICATED | raw::REDISMODULE_CTX_FLAGS_LOADING) as c_int;
        self.flags() & allowed != 0
    }

    /// Whether the AOF is on (or being turned on), or Redis is loading.
    #[inline]
    pub(crate) fn aof_or_loading(self) -> bool {
        let flags = (raw::REDISMODULE_CTX_FLAGS_AOF | raw::REDISMODULE_CTX_FLAGS_LOADING) as c_int;
        self.flags() & flags != 0
    }

    /// Propagates the command as it was called to replicas and the AOF.
    pub(crate) fn replicate_verbatim(self) {
        unsafe {
            if let Some(f) = raw::RedisModule_ReplicateVerbatim {
                f(self.raw);
            }
        }
    }

    /// Propagates `<command> <args...>` (one to four byte-string arguments) to replicas and
    /// the AOF; more than four is a bug and propagates nothing.
    pub(crate) fn replicate(self, command: &CStr, args: &[&[u8]]) {
        const FORMATS: [&CStr; 4] = [c"b", c"bb", c"bbb", c"bbbb"];
        let Some(format) = args.len().checked_sub(1).and_then(|i| FORMATS.get(i)) else {
            return;
        };
        let arg = |i: usize| {
            args.get(i)
                .map_or((c"".as_ptr(), 0), |a| (a.as_ptr().cast(), a.len()))
        };
        let [(a, al), (b, bl), (c, cl), (d, dl)] = [arg(0), arg(1), arg(2), arg(3)];
        // Redis reads as many (pointer, length) pairs as the format names and ignores the rest.
        unsafe {
            if let Some(f) = raw::RedisModule_Replicate {
                f(
                    self.raw,
                    command.as_ptr(),
                    format.as_ptr(),
                    a,
                    al,
                    b,
                    bl,
                    c,
                    cl,
                    d,
                    dl,
                );
            }
        }
    }

    /// The database the context has selected.
    pub(crate) fn db(self) -> i32 {
        unsafe { raw::RedisModule_GetSelectedDb.map_or(0, |f| f(self.raw())) }
    }

    /// Selects database `db`; false if Redis refused (no such database).
    pub(crate) fn select_db(self, db: i32) -> bool {
        unsafe {
            raw::RedisModule_SelectDb
                .is_some_and(|f| f(self.raw(), db) == raw::REDISMODULE_OK as i32)
        }
    }

    /// Whether this node is a master (not a replica), loading or not.
    pub(crate) fn is_master_role(self) -> bool {
        self.flags() & raw::REDISMODULE_CTX_FLAGS_MASTER as c_int != 0
    }

    /// Whether this node is a master (not a replica), and not loading.
    pub(crate) fn is_master(self) -> bool {
        let flags = self.flags();
        flags & raw::REDISMODULE_CTX_FLAGS_MASTER as c_int != 0
            && flags & raw::REDISMODULE_CTX_FLAGS_LOADING as c_int == 0
    }
}
