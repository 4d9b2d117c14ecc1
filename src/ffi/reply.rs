//! Writing replies straight through the module API: no intermediate `RedisValue` tree, no
//! allocation per field. Maps become RESP3 maps, or flat field/value arrays under RESP2.

use std::ffi::CString;
use std::os::raw::c_long;

use redis_module::raw;

use super::runs::{Part, Run};
use super::words::Word;

/// A reply writer bound to one command context (main thread, GIL held).
#[derive(Clone, Copy)]
pub(crate) struct Reply {
    ctx: *mut raw::RedisModuleCtx,
}

impl Reply {
    /// Wraps a context pointer handed to us by Redis.
    pub(crate) fn new(ctx: *mut raw::RedisModuleCtx) -> Reply {
        Reply { ctx }
    }

    /// Starts a map of `pairs` field/value pairs.
    pub(crate) fn map(self, pairs: usize) -> Self {
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithMap {
                f(self.ctx, pairs as c_long);
            }
        }
        self
    }

    /// Starts an array of `len` items.
    pub(crate) fn array(self, len: usize) -> Self {
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithArray {
                f(self.ctx, len as c_long);
            }
        }
        self
    }

    /// A bulk string.
    pub(crate) fn str(self, s: &str) -> Self {
        self.bytes(s.as_bytes())
    }

    /// A bulk string from bytes.
    pub(crate) fn bytes(self, b: &[u8]) -> Self {
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithStringBuffer {
                f(self.ctx, b.as_ptr().cast(), b.len());
            }
        }
        self
    }

    /// An integer.
    pub(crate) fn int(self, v: i64) -> Self {
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithLongLong {
                f(self.ctx, v);
            }
        }
        self
    }

    /// An unsigned count, clamped into the integer range.
    pub(crate) fn uint(self, v: u64) -> Self {
        self.int(i64::try_from(v).unwrap_or(i64::MAX))
    }

    /// Nil.
    pub(crate) fn null(self) -> Self {
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithNull {
                f(self.ctx);
            }
        }
        self
    }

    /// A string or nil.
    pub(crate) fn opt_str(self, s: Option<&str>) -> Self {
        match s {
            Some(s) => self.str(s),
            None => self.null(),
        }
    }

    /// An integer or nil.
    pub(crate) fn opt_int(self, v: Option<i64>) -> Self {
        match v {
            Some(v) => self.int(v),
            None => self.null(),
        }
    }

    /// A field name followed by its value written by `value`.
    pub(crate) fn field(self, name: &str, value: impl FnOnce(Self) -> Self) -> Self {
        value(self.str(name))
    }

    /// A bulk string known at load (see `Word`): one copy of its encoding.
    pub(crate) fn word(self, word: &Word) -> Self {
        let encoded = word.encoded();
        if encoded.is_null() {
            return self.str(word.text());
        }
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithCallReply {
                f(self.ctx, encoded);
            }
        }
        self
    }

    /// A run of values known at load (see `Run`): one copy of its encoding.
    pub(crate) fn run(self, run: &Run) -> Self {
        let encoded = run.encoded();
        if encoded.is_null() {
            return self.run_each(run);
        }
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithCallReply {
                f(self.ctx, encoded);
            }
        }
        self
    }

    /// A run's values one by one (a run without its encoding, and `QUOTA.REPLYRUN`).
    pub(crate) fn run_each(mut self, run: &Run) -> Self {
        for part in run.parts {
            self = match part {
                Part::Int(v) => self.int(*v),
                Part::Word(w) => self.word(w),
            };
        }
        self
    }

    /// A field named by a `Word`, followed by its value written by `value`.
    pub(crate) fn pair(self, name: &Word, value: impl FnOnce(Self) -> Self) -> Self {
        value(self.word(name))
    }

    /// A simple status string (`+OK`).
    pub(crate) fn status(self, s: &str) -> Self {
        if let Ok(c) = CString::new(s) {
            unsafe {
                if let Some(f) = raw::RedisModule_ReplyWithSimpleString {
                    f(self.ctx, c.as_ptr());
                }
            }
        }
        self
    }

    /// An error. `text` starts with its code (`ERR`, `BUSY`, `TRYAGAIN`, ...); line breaks and
    /// NUL bytes are replaced so the reply stays one well-formed line.
    pub(crate) fn error(self, text: &str) -> Self {
        let clean: String = text
            .chars()
            .map(|c| {
                if c == '\r' || c == '\n' || c == '\0' {
                    ' '
                } else {
                    c
                }
            })
            .collect();
        if let Ok(c) = CString::new(clean) {
            unsafe {
                if let Some(f) = raw::RedisModule_ReplyWithError {
                    f(self.ctx, c.as_ptr());
                }
            }
        }
        self
    }
}
