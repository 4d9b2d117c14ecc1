//! A speed trick: runs of reply values known when the module loads (an admitted reply's fixed
//! fields and values, `COMPACT` and in full) encoded by Redis once, at load, and copied into
//! each reply in one write instead of one write per value.
//!
//! Why: every value a module replies is one trip through Redis's reply path (the module API
//! call, `prepareClientToWrite`, the copy into the client's buffer), about the cost of the
//! value itself; an admitted `COMPACT` reply has ten values where `CL.THROTTLE` has five, and
//! seven of them are the same on every admission that holds no lease (`1`, `-1`, `""`, `""`,
//! `0`, the credit's source, who paid, `-1`). With two runs it is written in five writes.
//!
//! How: Redis offers no way to write raw protocol, but `RedisModule_ReplyWithCallReply`
//! copies a call reply's whole protocol, and a call reply's protocol is everything the called
//! command wrote. So at load the module calls its own internal command (`QUOTA.REPLYRUN
//! <index>`, `commands::words::reply_run`) through `RedisModule_Call`; the command writes the
//! run's values one by one, at top level, and Redis keeps them as one call reply. Each call
//! reply is checked byte for byte (`RedisModule_CallReplyProto`) against the run's encoding
//! computed here; one that differs (another Redis keeping only the first value, say) is
//! dropped and that run is written value by value: the same bytes, the slower way. The call
//! replies are never parsed (`RedisModule_CallReplyType` and the like would read them as
//! their first value only), only copied. A run holds integers and bulk strings, the same in
//! RESP2 and RESP3.
//!
//! What it buys (2026-12-07, Redis 7.0, each build against the same build without it, two
//! servers, rounds interleaved, server CPU per command): 1.06 on the one-rate
//! `ADMIT POLICY .. COMPACT` and 1.045 on the 4-limit one (whose lease id is still three
//! writes: a bulk string); perf put the reply at 10% of the one-rate admission's server time
//! before and 3.6% after. The full (map) reply of the inline `ADMIT`: 1.10 (own time 1.15). It costs an internal command (refused outside the load: a client calling it would get several
//! replies to one command), the check at load, and a rule: a run is written only where every
//! one of its values is the one the reply needs (`commands::replies::reply_compact`). Runs are
//! encoded only when the words are (`ffi::words`; with `ECHO` renamed away everything is
//! written the plain way). Removing it is deleting this file, `QUOTA.REPLYRUN`, and writing
//! the values of `reply_compact` one by one.

use std::ffi::CStr;
use std::os::raw::c_longlong;
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use redis_module::raw;

use super::words::{self, Word};

/// A value of a run.
#[derive(Clone, Copy)]
pub(crate) enum Part {
    Int(i64),
    Word(&'static Word),
}

/// A run of reply values known at load. Declare one with `run!`.
pub(crate) struct Run {
    /// Its values, in reply order.
    pub(crate) parts: &'static [Part],
    /// Its encoding, null when it has none (then it is written value by value). Written
    /// only on the main thread (load and unload).
    pub(crate) encoded: AtomicPtr<raw::RedisModuleCallReply>,
}

/// `run![Part, ...]`: a `Run` of those values, not encoded yet.
macro_rules! run {
    ($($part:expr),* $(,)?) => {
        $crate::ffi::runs::Run {
            parts: &[$($part),*],
            encoded: std::sync::atomic::AtomicPtr::new(std::ptr::null_mut()),
        }
    };
}
pub(crate) use run;

impl Run {
    /// Its encoding, null when it has none.
    pub(super) fn encoded(&self) -> *mut raw::RedisModuleCallReply {
        self.encoded.load(Ordering::Acquire)
    }

    /// The protocol its values make, the same in RESP2 and RESP3.
    fn encoding(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for part in self.parts {
            match part {
                Part::Int(v) => out.extend_from_slice(format!(":{v}\r\n").as_bytes()),
                Part::Word(w) => out.extend_from_slice(&words::bulk_encoding(w.text())),
            }
        }
        out
    }
}

/// Set only while `prepare` runs (module load, main thread: no client command runs then).
static ENCODING: AtomicBool = AtomicBool::new(false);

/// Whether the runs are being encoded: the internal command writes a run only then.
pub(crate) fn encoding() -> bool {
    ENCODING.load(Ordering::Acquire)
}

/// Encodes `runs` (module load, main thread) by calling `command <index>` for each, the
/// module's internal command that writes run `index` of the same list with `Reply::run_each`;
/// returns how many could not be encoded (they are written value by value).
pub(crate) fn prepare(
    ctx: *mut raw::RedisModuleCtx,
    command: &CStr,
    runs: &[&'static Run],
) -> usize {
    let Some(call) = (unsafe { raw::RedisModule_Call }) else {
        return runs.len();
    };
    ENCODING.store(true, Ordering::Release);
    let mut failed = 0;
    for (index, run) in runs.iter().enumerate() {
        let encoded = unsafe { call(ctx, command.as_ptr(), c"l".as_ptr(), index as c_longlong) };
        if encoded.is_null() || !words::proto_is(encoded, &run.encoding()) {
            words::free_reply(encoded);
            failed += 1;
            continue;
        }
        words::free_reply(run.encoded.swap(encoded, Ordering::AcqRel));
    }
    ENCODING.store(false, Ordering::Release);
    failed
}

/// Frees the encodings of `runs` (module unload, main thread): they are written value by
/// value from then on.
pub(crate) fn release(runs: &[&'static Run]) {
    for run in runs {
        words::free_reply(run.encoded.swap(ptr::null_mut(), Ordering::AcqRel));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static YES: Word = Word::new("yes");
    static EMPTY: Word = Word::new("");
    static MIXED: Run = run![
        Part::Int(1),
        Part::Int(-1),
        Part::Word(&EMPTY),
        Part::Word(&YES),
        Part::Int(0)
    ];

    #[test]
    fn a_run_is_checked_against_its_values_one_after_another() {
        assert_eq!(
            MIXED.encoding(),
            b":1\r\n:-1\r\n$0\r\n\r\n$3\r\nyes\r\n:0\r\n"
        );
        assert!(MIXED.encoded().is_null());
        assert!(!encoding());
    }
}
