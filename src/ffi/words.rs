//! A speed trick: reply words (field names and fixed values) encoded by Redis once, at load,
//! and copied into each reply in one write.
//!
//! What it buys (`make bench` shapes, each build against the same build without it, rounds
//! interleaved; slower-without ratios, 2026-12-06): `QUOTA.GET` (a record of 27 named fields)
//! 1.07 in one session and 1.17-1.23 in the next (the command's own time, one pipelining
//! client); the `COMPACT` admissions write no words and do not move. It costs a load-order
//! rule (the words are encoded through `ECHO` in `RedisModule_OnLoad`, and released on
//! unload) and a fallback: a word without its encoding (`ECHO` renamed away) is written the
//! plain way, the same bytes. Removing it is deleting this file and writing `Word`s as
//! strings in `Reply::word`.

use std::ptr;
use std::sync::atomic::{AtomicPtr, Ordering};

use redis_module::raw;

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
    pub(crate) fn text(&self) -> &'static str {
        self.text
    }

    /// Its encoding, null when it has none (then it is written as a plain bulk string).
    pub(super) fn encoded(&self) -> *mut raw::RedisModuleCallReply {
        self.encoded.load(Ordering::Acquire)
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
    proto_is(reply, &bulk_encoding(text))
}

/// The reply's protocol is exactly `expected`. Reads the protocol as Redis keeps it, without
/// parsing the reply.
pub(super) fn proto_is(reply: *mut raw::RedisModuleCallReply, expected: &[u8]) -> bool {
    let Some(proto) = (unsafe { raw::RedisModule_CallReplyProto }) else {
        return false;
    };
    let mut len = 0usize;
    let p = unsafe { proto(reply, &mut len) };
    if p.is_null() {
        return false;
    }
    let got = unsafe { std::slice::from_raw_parts(p.cast::<u8>(), len) };
    got == expected
}

/// `$<len>\r\n<text>\r\n`.
pub(super) fn bulk_encoding(text: &str) -> Vec<u8> {
    let mut out = format!("${}\r\n", text.len()).into_bytes();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(b"\r\n");
    out
}

pub(super) fn free_reply(reply: *mut raw::RedisModuleCallReply) {
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
