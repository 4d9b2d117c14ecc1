//! Rewriting a module load argument in place: Redis keeps the `loadmodule` arguments for
//! `MODULE LIST` and `CONFIG REWRITE`, so a password in them must be cut out of Redis's own copy.
//!
//! The API gives no way to replace a kept argument, so this shortens the string object's `sds`
//! buffer in place: the text is overwritten and the length in the `sds` header lowered (never
//! raised, so the allocation always fits). The header layout (`sds.h`: a flags byte before the
//! text whose low 3 bits give the header type, and the length field before it) has been the same
//! since Redis 3.2; it is checked against the length Redis reports before anything is written.
//! A longer text is written as the current length's worth in place plus the rest appended with
//! `RedisModule_StringAppendBuffer`, which Redis allows on a string referenced once: during
//! `OnLoad` the references are Redis's own (the load queue or the `MODULE LOAD` command) and
//! the one `redis-module` took for the `&[RedisString]` handed to `init`, so that one is given
//! back for the append and taken again after it. With any other reference the append is
//! refused and nothing changes.

use redis_module::{raw, RedisString};

/// Replaces the argument's text with `text`, of any length. Returns false (and changes nothing
/// that Redis would show differently) when the argument cannot be changed this way.
pub(crate) fn replace(ctx: *mut raw::RedisModuleCtx, arg: &RedisString, text: &[u8]) -> bool {
    let mut len = 0usize;
    let ptr = unsafe {
        raw::RedisModule_StringPtrLen.map_or(std::ptr::null(), |f| f(arg.inner, &mut len))
    };
    if ptr.is_null() {
        return false;
    }
    if text.len() <= len {
        return shorten(arg, text);
    }
    let (Some(append), Some(free), Some(retain)) = (unsafe {
        (
            raw::RedisModule_StringAppendBuffer,
            raw::RedisModule_FreeString,
            raw::RedisModule_RetainString,
        )
    }) else {
        return false;
    };
    let (head, tail) = text.split_at(len);
    if !shorten(arg, head) {
        return false;
    }
    // SAFETY: `arg` holds one reference and Redis another (the argument outlives `OnLoad`), so
    // giving ours back leaves the string alive; it is taken again right after. Redis copies
    // `tail`. A string with more references refuses the append and stays as it was.
    let status = unsafe {
        free(std::ptr::null_mut(), arg.inner);
        let status = append(ctx, arg.inner, tail.as_ptr().cast(), tail.len());
        retain(std::ptr::null_mut(), arg.inner);
        status
    };
    status == raw::REDISMODULE_OK as std::os::raw::c_int
}

/// Replaces the argument's text with `text`, which must not be longer. Returns false (and
/// changes nothing) when the argument is not a plain `sds` string this code understands.
pub(crate) fn shorten(arg: &RedisString, text: &[u8]) -> bool {
    let mut len = 0usize;
    let ptr = unsafe {
        raw::RedisModule_StringPtrLen.map_or(std::ptr::null(), |f| f(arg.inner, &mut len))
    } as *mut u8;
    if ptr.is_null() || text.len() > len || header_len(ptr) != Some(len) {
        return false;
    }
    // SAFETY: `ptr` is the text of an sds of `len` bytes (checked above against its header);
    // `text.len() <= len`, and the terminator fits in the sds (it always has one spare byte).
    unsafe {
        std::ptr::copy_nonoverlapping(text.as_ptr(), ptr, text.len());
        *ptr.add(text.len()) = 0;
        set_header_len(ptr, text.len());
    }
    true
}

const SDS_TYPE_MASK: u8 = 7;

/// The length stored in the sds header before `s`, if the header type is a known one.
fn header_len(s: *mut u8) -> Option<usize> {
    // SAFETY: every sds has its flags byte right before the text, and the length field before
    // that, of the size the type says.
    unsafe {
        let flags = *s.sub(1);
        match flags & SDS_TYPE_MASK {
            0 => Some(usize::from(flags >> 3)),
            1 => Some(usize::from(*s.sub(3))),
            2 => Some(usize::from(
                std::ptr::read_unaligned(s.sub(5) as *const u16),
            )),
            3 => usize::try_from(std::ptr::read_unaligned(s.sub(9) as *const u32)).ok(),
            4 => usize::try_from(std::ptr::read_unaligned(s.sub(17) as *const u64)).ok(),
            _ => None,
        }
    }
}

/// Stores `len` (not above the current length) in the sds header before `s`.
///
/// # Safety
/// `s` must be the text of an sds whose header `header_len` read.
unsafe fn set_header_len(s: *mut u8, len: usize) {
    let flags = *s.sub(1);
    match flags & SDS_TYPE_MASK {
        0 => *s.sub(1) = ((len as u8) << 3) | (flags & SDS_TYPE_MASK),
        1 => *s.sub(3) = len as u8,
        2 => std::ptr::write_unaligned(s.sub(5) as *mut u16, len as u16),
        3 => std::ptr::write_unaligned(s.sub(9) as *mut u32, len as u32),
        _ => std::ptr::write_unaligned(s.sub(17) as *mut u64, len as u64),
    }
}
