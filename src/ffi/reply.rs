//! Writing replies straight through the module API: no intermediate `RedisValue` tree, no
//! allocation per field. Maps become RESP3 maps, or flat field/value arrays under RESP2.

use std::ffi::CString;
use std::os::raw::c_long;
use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use redis_module::raw;

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
        let encoded = word.encoded.load(Ordering::Acquire);
        if encoded.is_null() {
            return self.str(word.text);
        }
        unsafe {
            if let Some(f) = raw::RedisModule_ReplyWithCallReply {
                f(self.ctx, encoded);
            }
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

/// A reply string known when the module loads: a field name or a fixed value.
///
/// A bulk string costs Redis three writes to the client's buffer (the length header, the
/// bytes, the CRLF), each through its full checks; a `QUOTA.GET` record has 24 field names.
/// `prepare` has Redis encode each word once at load (`ECHO <word>` through
/// `RedisModule_Call`), and `Reply::word` copies that encoding in one write
/// (`RedisModule_ReplyWithCallReply`). A bulk string is the same in RESP2 and RESP3. A word
/// that is not encoded (before `prepare`, after `release`, or when `ECHO` is renamed away)
/// is written as a plain bulk string: same bytes, the slower way.
pub(crate) struct Word {
    text: &'static str,
    /// Written only on the main thread (load and unload), read on the main thread.
    encoded: AtomicPtr<raw::RedisModuleCallReply>,
}

impl Word {
    /// A word not encoded yet.
    pub(crate) const fn new(text: &'static str) -> Word {
        Word {
            text,
            encoded: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// The text.
    #[cfg(test)]
    pub(crate) fn text(&self) -> &'static str {
        self.text
    }
}

/// Encodes `words` (module load, main thread); returns how many could not be (their replies
/// stay plain bulk strings).
pub(crate) fn prepare(
    ctx: *mut raw::RedisModuleCtx,
    words: impl IntoIterator<Item = &'static Word>,
) -> usize {
    let Some(call) = (unsafe { raw::RedisModule_Call }) else {
        return words.into_iter().count();
    };
    let mut failed = 0;
    for word in words {
        let encoded = unsafe {
            call(
                ctx,
                c"ECHO".as_ptr(),
                c"b".as_ptr(),
                word.text.as_ptr(),
                word.text.len(),
            )
        };
        if encoded.is_null() || !is_bulk(encoded, word.text) {
            free_reply(encoded);
            failed += 1;
            continue;
        }
        free_reply(word.encoded.swap(encoded, Ordering::AcqRel));
    }
    failed
}

/// Frees the encodings of `words` (module unload, main thread): they reply as plain bulk
/// strings from then on.
pub(crate) fn release(words: impl IntoIterator<Item = &'static Word>) {
    for word in words {
        free_reply(word.encoded.swap(ptr::null_mut(), Ordering::AcqRel));
    }
}

/// The reply's encoding is exactly the bulk string `text` (what `Reply::word` copies in its
/// place), in RESP2 and RESP3 alike.
fn is_bulk(reply: *mut raw::RedisModuleCallReply, text: &str) -> bool {
    let Some(proto) = (unsafe { raw::RedisModule_CallReplyProto }) else {
        return false;
    };
    let mut len = 0usize;
    let p = unsafe { proto(reply, &mut len) };
    if p.is_null() {
        return false;
    }
    let got = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
    got == bulk_encoding(text).as_slice()
}

/// `$<len>\r\n<text>\r\n`.
fn bulk_encoding(text: &str) -> Vec<u8> {
    let mut out = format!("${}\r\n", text.len()).into_bytes();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

fn free_reply(reply: *mut raw::RedisModuleCallReply) {
    if reply.is_null() {
        return;
    }
    unsafe {
        if let Some(f) = raw::RedisModule_FreeCallReply {
            f(reply);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_word_is_checked_against_its_bulk_string() {
        assert_eq!(bulk_encoding("allowed"), b"$7\r\nallowed\r\n");
        assert_eq!(bulk_encoding(""), b"$0\r\n\r\n");
        let long = "additional_requests_per_month";
        assert_eq!(
            bulk_encoding(long),
            format!("$29\r\n{long}\r\n").into_bytes()
        );
    }
}
