//! The `quota-acc` data type: one Redis key per account holding its `core::account::Account`.
//!
//! It persists with RDB (the encoded state as one string), rewrites into the AOF as
//! `QUOTA.SETSTATE <key> <state>`, reports `MEMORY USAGE`, and supports `COPY`. `AccountKey`
//! opens a key of this type for a command on the main thread.
//!
//! Loading (an RDB file, a replica's sync, `RESTORE`) never trusts the bytes: the module
//! handles IO errors (`REDISMODULE_OPTIONS_HANDLE_IO_ERRORS`, set at load by `ffi::lifecycle`),
//! and a value that cannot be read or decoded, or breaks an account invariant, is logged with
//! its key name and the reason and refused, so Redis fails that load ("Bad data format" for
//! `RESTORE`).

use std::os::raw::{c_int, c_void};
use std::ptr;

use redis_module::native_types::RedisType;
use redis_module::raw;

use super::ctx::Ctx;
use super::prefetch::{prefetch, LeaseLine};

use crate::core::account::{Account, Retention};
use crate::core::credit_memo::CreditMemo;

/// The registered data type.
pub(crate) static ACCOUNT_TYPE: RedisType = RedisType::new(
    "quota-acc",
    ENCODING_VERSION,
    raw::RedisModuleTypeMethods {
        version: raw::REDISMODULE_TYPE_METHOD_VERSION as u64,
        rdb_load: Some(rdb_load),
        rdb_save: Some(rdb_save),
        aof_rewrite: Some(aof_rewrite),
        mem_usage: Some(mem_usage),
        digest: None,
        free: Some(free),
        aux_load: None,
        aux_save: None,
        aux_save2: None,
        aux_save_triggers: 0,
        free_effort: None,
        unlink: None,
        copy: Some(copy),
        defrag: None,
        copy2: None,
        free_effort2: None,
        mem_usage2: None,
        unlink2: Some(unlink),
    },
);

const ENCODING_VERSION: i32 = 1;

/// Why a key could not be used; `Display` is the wire error text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct WrongType;

impl std::fmt::Display for WrongType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WRONGTYPE Operation against a key holding the wrong kind of value")
    }
}

/// What a key of this type holds: the account, the expiry last set on the key (so an admission
/// need not ask Redis for it every time), where the account's next lease goes (so an admission
/// can start loading that line at once) and the credit its admissions use (so they need not
/// look the user up in the cache every time). Only the account is persisted and replicated;
/// the others are rebuilt when missing. Two 4-byte fields keep it at 128 bytes.
struct Stored {
    account: Account,
    /// The absolute expiry last set on the key, in whole seconds (an account's retention is
    /// rounded up to the second), or `EXPIRY_UNKNOWN`, or `NO_EXPIRY`.
    expiry_s: u32,
    /// Where the account's next lease goes, to prefetch (see `prefetch`).
    lease_line: LeaseLine,
    memo: Option<CreditMemo>,
}

/// `expiry_s` not known (after a load, or a retention past what 32-bit seconds hold): ask Redis.
const EXPIRY_UNKNOWN: u32 = 0;
/// `expiry_s` of a key without expiry.
const NO_EXPIRY: u32 = u32::MAX;

impl Stored {
    fn boxed(account: Account) -> *mut c_void {
        Box::into_raw(Box::new(Stored {
            account,
            expiry_s: EXPIRY_UNKNOWN,
            lease_line: LeaseLine::UNKNOWN,
            memo: None,
        }))
        .cast()
    }

    /// Records where the next lease goes, after a change.
    fn note_lease_line(&mut self) {
        let here = std::ptr::from_ref(self).cast::<u8>();
        self.lease_line = LeaseLine::of(here, self.account.lease_tail_address());
    }

    /// The line `note_lease_line` recorded, to prefetch.
    fn lease_line_address(&self) -> Option<*const u8> {
        self.lease_line
            .address(std::ptr::from_ref(self).cast::<u8>())
    }
}

/// `at` (ms since the epoch) rounded up to whole seconds, as `expiry_s` keeps it; `None` when
/// it does not fit (the key's expiry is then set to the millisecond and not remembered).
fn expiry_seconds(at: i64) -> Option<u32> {
    u32::try_from(at.max(0).saturating_add(999) / 1000)
        .ok()
        .filter(|s| *s != EXPIRY_UNKNOWN && *s != NO_EXPIRY)
}

/// An account key opened for reading and writing by one command.
pub(crate) struct AccountKey {
    ctx: *mut raw::RedisModuleCtx,
    name: *mut raw::RedisModuleString,
    key: *mut raw::RedisModuleKey,
}

impl AccountKey {
    /// Opens the key `name` for reading and writing; refuses keys of other types.
    pub(crate) fn open(ctx: Ctx, name: &[u8]) -> Result<AccountKey, WrongType> {
        Self::open_mode(
            ctx,
            name,
            (raw::REDISMODULE_READ | raw::REDISMODULE_WRITE) as c_int,
        )
    }

    /// Opens the key `name` for reading only.
    pub(crate) fn open_read(ctx: Ctx, name: &[u8]) -> Result<AccountKey, WrongType> {
        Self::open_mode(ctx, name, raw::REDISMODULE_READ as c_int)
    }

    fn open_mode(ctx: Ctx, name: &[u8], mode: c_int) -> Result<AccountKey, WrongType> {
        let ctx = ctx.raw();
        unsafe {
            let create = raw::RedisModule_CreateString.ok_or(WrongType)?;
            let open = raw::RedisModule_OpenKey.ok_or(WrongType)?;
            let name = create(ctx, name.as_ptr().cast(), name.len());
            let key = open(ctx, name, mode).cast::<raw::RedisModuleKey>();
            let opened = AccountKey { ctx, name, key };
            let kind = raw::RedisModule_KeyType.map_or(0, |f| f(key));
            if kind == raw::REDISMODULE_KEYTYPE_EMPTY as c_int {
                return Ok(opened);
            }
            let ours = *ACCOUNT_TYPE.raw_type.borrow();
            let is_ours = kind == raw::REDISMODULE_KEYTYPE_MODULE as c_int
                && raw::RedisModule_ModuleTypeGetType.is_some_and(|f| f(key) == ours);
            if is_ours {
                // Start loading the value (a cache miss) while the caller does other work.
                let value = raw::RedisModule_ModuleTypeGetValue.map_or(ptr::null_mut(), |f| f(key));
                if !value.is_null() {
                    let at = value.cast::<u8>().cast_const();
                    prefetch(Some(at));
                    prefetch(Some(at.wrapping_add(64)));
                }
                Ok(opened)
            } else {
                Err(WrongType)
            }
        }
    }

    /// The stored state, if the key exists.
    pub(crate) fn get(&mut self) -> Option<&mut Account> {
        self.stored().map(|s| &mut s.account)
    }

    fn stored(&mut self) -> Option<&mut Stored> {
        unsafe {
            let value = raw::RedisModule_ModuleTypeGetValue?(self.key).cast::<Stored>();
            value.as_mut()
        }
    }

    /// Stores `account` (replacing any value) and sets the key's expiry from it; an account
    /// with nothing left to keep is not stored (any old value is deleted).
    pub(crate) fn put(&mut self, account: Account) {
        if account.retention() == Retention::Nothing {
            self.delete();
            return;
        }
        unsafe {
            if let Some(set) = raw::RedisModule_ModuleTypeSetValue {
                set(
                    self.key,
                    *ACCOUNT_TYPE.raw_type.borrow(),
                    Stored::boxed(account),
                );
            }
        }
        self.touch();
    }

    /// Re-derives the key's expiry after the stored state changed in place, deleting the key
    /// when nothing is left to keep.
    pub(crate) fn touch(&mut self) {
        let key = self.key;
        let Some(stored) = self.stored() else {
            return;
        };
        let retention = stored.account.retention();
        let at = match retention {
            Retention::Nothing => {
                self.delete();
                return;
            }
            Retention::Forever => None,
            Retention::Until(at) => Some(at),
        };
        stored.note_lease_line();
        // Kept to the second: the key lives at most a second longer than it must, and the
        // expiry changes at most once a second however often its leases move it.
        let (wanted, at) = match at {
            None => (NO_EXPIRY, None),
            Some(at) => match expiry_seconds(at) {
                Some(s) => (s, Some(i64::from(s) * 1000)),
                None => (EXPIRY_UNKNOWN, Some(at)),
            },
        };
        if stored.expiry_s == wanted && wanted != EXPIRY_UNKNOWN {
            return;
        }
        stored.expiry_s = wanted;
        unsafe {
            let current = raw::RedisModule_GetAbsExpire.map_or(-1, |f| f(key));
            match at {
                Some(at) if at != current => {
                    if let Some(f) = raw::RedisModule_SetAbsExpire {
                        f(key, at);
                    }
                }
                None if current != -1 => {
                    if let Some(f) = raw::RedisModule_SetExpire {
                        f(key, raw::REDISMODULE_NO_EXPIRE as i64);
                    }
                }
                _ => {}
            }
        }
    }

    /// Emits the keyspace event `event` on this key, in the module class (`d` in
    /// `notify-keyspace-events`, included in `A`): `__keyspace@<db>__:<key>` and
    /// `__keyevent@<db>__:<event>`, each when enabled.
    pub(crate) fn notify(&self, event: &std::ffi::CStr) {
        unsafe {
            if let Some(f) = raw::RedisModule_NotifyKeyspaceEvent {
                f(
                    self.ctx,
                    raw::REDISMODULE_NOTIFY_MODULE,
                    event.as_ptr(),
                    self.name,
                );
            }
        }
    }

    /// Deletes the key; true if it existed.
    pub(crate) fn delete(&mut self) -> bool {
        unsafe {
            let existed = raw::RedisModule_KeyType.map_or(0, |f| f(self.key))
                != raw::REDISMODULE_KEYTYPE_EMPTY as c_int;
            if existed {
                if let Some(f) = raw::RedisModule_DeleteKey {
                    f(self.key);
                }
            }
            existed
        }
    }

    /// The credit remembered by the last admission on this account, if any.
    pub(crate) fn memo(&mut self) -> Option<CreditMemo> {
        let stored = self.stored()?;
        // The memo is read first on an admission: start loading the account's lease part too
        // (a cache miss that would otherwise wait until the decision).
        prefetch(stored.account.extra_address());
        // And the line its next lease goes to, without waiting for the lease part to say where.
        prefetch(stored.lease_line_address());
        stored.memo
    }

    /// Starts loading the account's ledger part, which a balance holder's admission reads (the
    /// lease part and the next lease's line are on their way since `memo`).
    #[inline]
    pub(crate) fn prefetch_ledger(&mut self) {
        if let Some(stored) = self.stored() {
            prefetch(stored.account.ledger_address());
        }
    }

    /// Remembers the credit for the next admissions (nothing when the key does not exist).
    pub(crate) fn set_memo(&mut self, memo: CreditMemo) {
        if let Some(stored) = self.stored() {
            stored.memo = Some(memo);
        }
    }

    /// Whether the account has unflushed usage and is not on the ledger's list yet.
    pub(crate) fn needs_tracking(&mut self) -> bool {
        self.stored()
            .is_some_and(|s| !s.account.is_tracked() && s.account.has_unflushed())
    }

    /// Records that the key is on the ledger's list (`tracked` false: taken off it).
    pub(crate) fn set_tracked(&mut self) {
        self.set_tracking(true);
    }

    /// Sets whether the key is on the ledger's list.
    pub(crate) fn set_tracking(&mut self, tracked: bool) {
        if let Some(stored) = self.stored() {
            stored.account.set_tracked(tracked);
        }
    }

    /// The key name's bytes.
    pub(crate) fn name_bytes(&self) -> &[u8] {
        let mut len = 0usize;
        unsafe {
            let Some(ptr_len) = raw::RedisModule_StringPtrLen else {
                return &[];
            };
            let p = ptr_len(self.name, &mut len);
            if p.is_null() {
                &[]
            } else {
                std::slice::from_raw_parts(p.cast::<u8>(), len)
            }
        }
    }

    /// The key name as a Redis string (for replication).
    pub(crate) fn name(&self) -> *mut raw::RedisModuleString {
        self.name
    }
}

impl Drop for AccountKey {
    fn drop(&mut self) {
        unsafe {
            if let Some(f) = raw::RedisModule_CloseKey {
                f(self.key);
            }
            if let Some(f) = raw::RedisModule_FreeString {
                f(self.ctx, self.name);
            }
        }
    }
}

/// Calls `f` with the name and account of every key of this type in the selected database
/// (`RedisModule_Scan`); the key is marked as on the ledger's list where `f` returns true, and
/// as off it elsewhere.
pub(crate) fn scan_accounts(ctx: Ctx, mut f: impl FnMut(&[u8], &Account) -> bool) {
    type Visit<'a> = &'a mut dyn FnMut(&[u8], &Account) -> bool;
    unsafe extern "C" fn visit(
        _ctx: *mut raw::RedisModuleCtx,
        name: *mut raw::RedisModuleString,
        key: *mut raw::RedisModuleKey,
        privdata: *mut c_void,
    ) {
        unsafe {
            if key.is_null() || name.is_null() {
                return;
            }
            let ours = *ACCOUNT_TYPE.raw_type.borrow();
            let kind = raw::RedisModule_KeyType.map_or(0, |f| f(key));
            if kind != raw::REDISMODULE_KEYTYPE_MODULE as c_int
                || raw::RedisModule_ModuleTypeGetType.is_none_or(|f| f(key) != ours)
            {
                return;
            }
            let Some(stored) =
                raw::RedisModule_ModuleTypeGetValue.and_then(|g| g(key).cast::<Stored>().as_mut())
            else {
                return;
            };
            let mut len = 0usize;
            let Some(ptr_len) = raw::RedisModule_StringPtrLen else {
                return;
            };
            let p = ptr_len(name, &mut len);
            if p.is_null() {
                return;
            }
            let bytes = std::slice::from_raw_parts(p.cast::<u8>(), len);
            let f = &mut *privdata.cast::<Visit<'_>>();
            let listed = f(bytes, &stored.account);
            stored.account.set_tracked(listed);
        }
    }
    let mut f: Visit<'_> = &mut f;
    unsafe {
        let (Some(create), Some(scan), Some(destroy)) = (
            raw::RedisModule_ScanCursorCreate,
            raw::RedisModule_Scan,
            raw::RedisModule_ScanCursorDestroy,
        ) else {
            return;
        };
        let cursor = create();
        let data = (&mut f as *mut Visit<'_>).cast::<c_void>();
        while scan(ctx.raw(), cursor, Some(visit), data) != 0 {}
        destroy(cursor);
    }
}

unsafe extern "C" fn rdb_load(rdb: *mut raw::RedisModuleIO, encver: c_int) -> *mut c_void {
    if encver != ENCODING_VERSION {
        log_refused(rdb, &format!("unknown encoding version {encver}"));
        return ptr::null_mut();
    }
    // Decoding never panics (its property tests say so); if it did, a panic must not unwind
    // into Redis.
    let decode = |bytes: &[u8]| std::panic::catch_unwind(|| Account::decode(bytes));
    let decoded = unsafe { with_loaded_string(rdb, decode) };
    match decoded {
        Some(Ok(Ok(account))) => Stored::boxed(account),
        Some(Ok(Err(bad))) => {
            log_refused(rdb, &bad.to_string());
            ptr::null_mut()
        }
        Some(Err(_)) => {
            log_refused(rdb, "the decoder panicked");
            ptr::null_mut()
        }
        None => {
            log_refused(rdb, "short read or read error");
            ptr::null_mut()
        }
    }
}

/// Loads the one string a value is saved as and hands it to `f`; `None` when the read failed.
unsafe fn with_loaded_string<T>(
    rdb: *mut raw::RedisModuleIO,
    f: impl FnOnce(&[u8]) -> T,
) -> Option<T> {
    let load = raw::RedisModule_LoadStringBuffer?;
    let mut len = 0usize;
    let buf = unsafe { load(rdb, &mut len) };
    let failed = raw::RedisModule_IsIOError.is_none_or(|is_error| unsafe { is_error(rdb) } != 0);
    if buf.is_null() {
        return None;
    }
    let out = (!failed).then(|| f(unsafe { std::slice::from_raw_parts(buf.cast::<u8>(), len) }));
    if let Some(free) = raw::RedisModule_Free {
        unsafe { free(buf.cast()) };
    }
    out
}

/// Logs why the value of the key being loaded is refused, naming the key.
fn log_refused(rdb: *mut raw::RedisModuleIO, reason: &str) {
    let mut len = 0usize;
    let name = unsafe {
        match (
            raw::RedisModule_GetKeyNameFromIO,
            raw::RedisModule_StringPtrLen,
        ) {
            (Some(key_name), Some(ptr_len)) => {
                let key = key_name(rdb);
                let ptr = if key.is_null() {
                    ptr::null()
                } else {
                    ptr_len(key, &mut len)
                };
                if ptr.is_null() {
                    &[][..]
                } else {
                    std::slice::from_raw_parts(ptr.cast::<u8>(), len)
                }
            }
            _ => &[][..],
        }
    };
    let name = String::from_utf8_lossy(name);
    let line = format!(
        "refusing the quota-acc value of key '{}': {}",
        name.escape_debug(),
        reason.escape_debug()
    );
    let Ok(line) = std::ffi::CString::new(line) else {
        return;
    };
    unsafe {
        if let Some(log) = raw::RedisModule_LogIOError {
            log(rdb, c"warning".as_ptr(), c"%s".as_ptr(), line.as_ptr());
        }
    }
}

unsafe extern "C" fn rdb_save(rdb: *mut raw::RedisModuleIO, value: *mut c_void) {
    if let Some(stored) = unsafe { value.cast::<Stored>().as_ref() } {
        raw::save_slice(rdb, &stored.account.encode());
    }
}

unsafe extern "C" fn aof_rewrite(
    aof: *mut raw::RedisModuleIO,
    key: *mut raw::RedisModuleString,
    value: *mut c_void,
) {
    let Some(stored) = (unsafe { value.cast::<Stored>().as_ref() }) else {
        return;
    };
    let state = stored.account.encode();
    unsafe {
        if let Some(emit) = raw::RedisModule_EmitAOF {
            emit(
                aof,
                c"QUOTA.SETSTATE".as_ptr(),
                c"sb".as_ptr(),
                key,
                state.as_ptr().cast::<std::os::raw::c_char>(),
                state.len(),
            );
        }
    }
}

unsafe extern "C" fn mem_usage(value: *const c_void) -> usize {
    match unsafe { value.cast::<Stored>().as_ref() } {
        Some(stored) => std::mem::size_of::<Stored>() + stored.account.heap_size(),
        None => 0,
    }
}

unsafe extern "C" fn free(value: *mut c_void) {
    if !value.is_null() {
        drop(unsafe { Box::from_raw(value.cast::<Stored>()) });
    }
}

unsafe extern "C" fn copy(
    _from: *mut raw::RedisModuleString,
    _to: *mut raw::RedisModuleString,
    value: *const c_void,
) -> *mut c_void {
    match unsafe { value.cast::<Stored>().as_ref() } {
        // The copy owes the ledger nothing: the source's unflushed usage stays the source's.
        Some(stored) => Stored::boxed(stored.account.copied()),
        None => ptr::null_mut(),
    }
}

/// `unlink2`: an account value leaves the keyspace (deleted, evicted, overwritten, renamed or
/// moved away). Only a value with usage not flushed yet matters to the ledger; the others cost
/// one check.
unsafe extern "C" fn unlink(ctx: *mut raw::RedisModuleKeyOptCtx, value: *const c_void) {
    let Some(stored) = (unsafe { value.cast::<Stored>().as_ref() }) else {
        return;
    };
    if !stored.account.has_unflushed() || ctx.is_null() {
        return;
    }
    let (Some(name_of), Some(db_of)) = (unsafe {
        (
            raw::RedisModule_GetKeyNameFromOptCtx,
            raw::RedisModule_GetDbIdFromOptCtx,
        )
    }) else {
        return;
    };
    let (name, db) = unsafe { (name_of(ctx), db_of(ctx)) };
    let name = unsafe { super::key_events::string_bytes(name) };
    super::key_events::unlinked(db, name, &stored.account);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::account::{Lease, LeaseId};

    #[test]
    fn the_expiry_is_kept_in_whole_seconds_rounded_up() {
        assert_eq!(expiry_seconds(1_000), Some(1));
        assert_eq!(expiry_seconds(1_001), Some(2));
        assert_eq!(expiry_seconds(1_999), Some(2));
        assert_eq!(expiry_seconds(1_764_547_200_123), Some(1_764_547_201));
        // 0 and u32::MAX are the two markers; what does not fit is set to the millisecond.
        assert_eq!(expiry_seconds(0), None);
        assert_eq!(expiry_seconds(-5), None);
        assert_eq!(
            expiry_seconds((i64::from(u32::MAX) - 1) * 1000),
            Some(u32::MAX - 1)
        );
        assert_eq!(expiry_seconds(i64::from(u32::MAX) * 1000), None);
        assert_eq!(expiry_seconds(i64::MAX), None);
    }

    #[test]
    fn the_lease_line_points_at_the_line_the_next_lease_goes_to() {
        let mut stored = Box::new(Stored {
            account: Account::default(),
            expiry_s: EXPIRY_UNKNOWN,
            lease_line: LeaseLine::UNKNOWN,
            memo: None,
        });
        stored.note_lease_line();
        assert_eq!(stored.lease_line_address(), None, "no lease part, no line");
        for n in 0..40u64 {
            stored.account.push_lease(Lease {
                id: LeaseId::Short(n + 1),
                expires_at: 1_000 + i64::try_from(n).unwrap(),
                reserved: 0,
                day: 0,
                cost: 1,
            });
            stored.note_lease_line();
            let tail = stored.account.lease_tail_address().unwrap() as usize;
            let line = stored.lease_line_address().unwrap() as usize;
            assert_eq!(line, tail & !63, "after {} leases", n + 1);
        }
    }

    /// Every account key holds one `Stored`: the 128-byte jemalloc size class (the account's
    /// counters, its expiry, its lease line and its credit memo; leases and settled ids live apart, only in
    /// the accounts that hold some) keeps an account key under the 320 bytes of Redis memory
    /// it may cost.
    #[test]
    fn an_account_fits_in_128_bytes() {
        assert_eq!(std::mem::size_of::<Account>(), 88);
        assert_eq!(std::mem::size_of::<Option<CreditMemo>>(), 32);
        assert!(
            std::mem::size_of::<Stored>() <= 128,
            "{}",
            std::mem::size_of::<Stored>()
        );
    }
}
