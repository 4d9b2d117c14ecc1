//! What Redis knows about each `QUOTA.*` command besides its entry point: flags, the key spec,
//! ACL categories, and the `COMMAND DOCS` metadata (summary, since, complexity, arity, argument
//! specs, tips). It owns the whole table and its registration through the raw API
//! (`RedisModule_CreateCommand`, `SetCommandInfo`, `SetCommandACLCategories`); it does not know
//! what a command does. `lib.rs` pairs each spec with its entry point.
//!
//! Version support: `SetCommandInfo` (docs, key specs, tips) exists from Redis 7.0;
//! `AddACLCategory` and `SetCommandACLCategories` only from 7.2. On 7.0 the commands are in no
//! ACL category at all (neither `@quota` nor `@read`/`@write`/...): ACL rules must name them
//! one by one. The function pointers are looked up at load, so a missing one is skipped.

// Registration runs only in the loaded module (`lib.rs` is not compiled into unit tests).
#![cfg_attr(test, allow(dead_code))]

use std::ffi::CStr;
use std::os::raw::c_int;
use std::ptr;

use redis_module::raw;

/// The ACL category every command joins where the server supports module categories.
pub(crate) const CATEGORY: &CStr = c"quota";

/// The module's version, Cargo.toml's `version` (`major.minor.patch`): the one place it is
/// written. `COMMAND DOCS` shows it as every command's `since` (the module's first release is
/// the release of the reply format every command has now).
const VERSION_TEXT: &str = env!("CARGO_PKG_VERSION");

/// The `since` of every command: the module's version, as text.
const SINCE: &CStr =
    match CStr::from_bytes_with_nul(concat!(env!("CARGO_PKG_VERSION"), "\0").as_bytes()) {
        Ok(since) => since,
        Err(_) => panic!("the package version holds a NUL"),
    };

/// `MODULE LIST`'s `ver`: major * 10000 + minor * 100 + patch of the module's version, as
/// Redis's own modules encode theirs (1.0.0 is 10000). Checked at compile time.
pub(crate) const MODULE_VERSION: i32 = encode_version(VERSION_TEXT);

/// `"1.2.3"` as 10203; anything else (a pre-release suffix, a part above 99) fails the build.
const fn encode_version(text: &str) -> i32 {
    let bytes = text.as_bytes();
    let mut parts = [0i32; 3];
    let (mut part, mut digits, mut i) = (0, 0, 0);
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'.' {
            assert!(
                digits > 0 && part < 2,
                "the version must be major.minor.patch"
            );
            part += 1;
            digits = 0;
        } else {
            assert!(b.is_ascii_digit(), "the version must be major.minor.patch");
            parts[part] = parts[part] * 10 + (b - b'0') as i32;
            digits += 1;
            assert!(
                parts[part] <= 99,
                "each part of the version must be at most 99"
            );
        }
        i += 1;
    }
    assert!(
        digits > 0 && part == 2,
        "the version must be major.minor.patch"
    );
    parts[0] * 10000 + parts[1] * 100 + parts[2]
}

/// What a command does with its declared key (the user id), as key-spec flags.
#[derive(Clone, Copy)]
pub(crate) enum KeyAccess {
    /// Reads the user's data and returns it (`RO ACCESS`).
    Read,
    /// Reads and updates the user's data (`RW ACCESS UPDATE`).
    ReadUpdate,
    /// Updates the user's data without returning it (`RW UPDATE`).
    Update,
    /// Removes some of the user's data (`RW DELETE`).
    Delete,
    /// Replaces the whole value of the key (`OW UPDATE`).
    Overwrite,
}

impl KeyAccess {
    fn flags(self) -> u64 {
        let f = match self {
            KeyAccess::Read => raw::REDISMODULE_CMD_KEY_RO | raw::REDISMODULE_CMD_KEY_ACCESS,
            KeyAccess::ReadUpdate => {
                raw::REDISMODULE_CMD_KEY_RW
                    | raw::REDISMODULE_CMD_KEY_ACCESS
                    | raw::REDISMODULE_CMD_KEY_UPDATE
            }
            KeyAccess::Update => raw::REDISMODULE_CMD_KEY_RW | raw::REDISMODULE_CMD_KEY_UPDATE,
            KeyAccess::Delete => raw::REDISMODULE_CMD_KEY_RW | raw::REDISMODULE_CMD_KEY_DELETE,
            KeyAccess::Overwrite => raw::REDISMODULE_CMD_KEY_OW | raw::REDISMODULE_CMD_KEY_UPDATE,
        };
        u64::from(f)
    }
}

/// The type of one argument in `COMMAND DOCS`.
#[derive(Clone, Copy)]
enum ArgType {
    String,
    Integer,
    UnixTime,
    /// The declared key (key spec 0).
    Key,
    /// A bare keyword (`PEEK`).
    Token,
    /// Exactly one of the sub-arguments.
    OneOf(&'static [Arg]),
}

/// One argument of a command, as `COMMAND DOCS` shows it.
#[derive(Clone, Copy)]
pub(crate) struct Arg {
    name: &'static CStr,
    kind: ArgType,
    token: Option<&'static CStr>,
    optional: bool,
}

const fn arg(name: &'static CStr, kind: ArgType) -> Arg {
    Arg {
        name,
        kind,
        token: None,
        optional: false,
    }
}

/// `[TOKEN value]`.
const fn option(token: &'static CStr, name: &'static CStr, kind: ArgType) -> Arg {
    Arg {
        name,
        kind,
        token: Some(token),
        optional: true,
    }
}

/// `TOKEN value`, required.
const fn keyed(token: &'static CStr, name: &'static CStr, kind: ArgType) -> Arg {
    Arg {
        name,
        kind,
        token: Some(token),
        optional: false,
    }
}

/// `TOKEN`, one of a `OneOf`'s choices.
const fn choice(token: &'static CStr, name: &'static CStr) -> Arg {
    Arg {
        name,
        kind: ArgType::Token,
        token: Some(token),
        optional: false,
    }
}

/// `[TOKEN]`.
const fn flag(token: &'static CStr, name: &'static CStr) -> Arg {
    Arg {
        name,
        kind: ArgType::Token,
        token: Some(token),
        optional: true,
    }
}

/// Everything Redis is told about one command.
pub(crate) struct CommandSpec {
    /// The command name as registered.
    pub(crate) name: &'static CStr,
    /// `RedisModule_CreateCommand` flags.
    flags: &'static CStr,
    /// The declared key: argument position and what the command does with it.
    key: Option<(c_int, KeyAccess)>,
    /// Standard ACL categories (Redis >= 7.2), `quota` added.
    acl: &'static CStr,
    summary: &'static CStr,
    complexity: &'static CStr,
    /// Command tips (`request_policy:...`), if any.
    tips: Option<&'static CStr>,
    /// Redis arity: positive = exact, negative = at least.
    arity: c_int,
    /// The arguments, in groups that are written one after the other.
    args: &'static [&'static [Arg]],
}

const TENANT: Arg = arg(c"tenant", ArgType::String);
const PROJECT: Arg = arg(c"project", ArgType::String);
const USER: Arg = arg(c"user", ArgType::Key);
const BUNDLE: Arg = arg(c"bundle", ArgType::String);

const LIMITS: [Arg; 10] = [
    option(c"REQUESTS_PER_DAY", c"requests_per_day", ArgType::Integer),
    option(
        c"REQUESTS_PER_MONTH",
        c"requests_per_month",
        ArgType::Integer,
    ),
    option(c"TOTAL_REQUESTS", c"total_requests", ArgType::Integer),
    option(c"TOKENS_PER_HOUR", c"tokens_per_hour", ArgType::Integer),
    option(c"TOKENS_PER_DAY", c"tokens_per_day", ArgType::Integer),
    option(c"TOKENS_PER_MONTH", c"tokens_per_month", ArgType::Integer),
    option(c"MAX_CONCURRENT", c"max_concurrent", ArgType::Integer),
    option(
        c"REQUESTS_PER_SECOND",
        c"requests_per_second",
        ArgType::Integer,
    ),
    option(
        c"REQUESTS_PER_MINUTE",
        c"requests_per_minute",
        ArgType::Integer,
    ),
    option(c"TOKENS_PER_MINUTE", c"tokens_per_minute", ArgType::Integer),
];

const EXPIRY: [Arg; 2] = [
    option(c"EXPIRES_AT", c"expires_at", ArgType::UnixTime),
    option(c"EXPIRES_IN", c"expires_in", ArgType::Integer),
];

const GRANT_OPTIONS: [Arg; 7] = [
    Arg {
        name: c"expiry",
        kind: ArgType::OneOf(&EXPIRY),
        token: None,
        optional: true,
    },
    option(c"PURCHASE", c"purchase_id", ArgType::String),
    option(c"AMOUNT", c"amount_usd", ArgType::String),
    option(c"NOTES", c"notes", ArgType::String),
    flag(c"ADD", c"add"),
    option(c"REQUESTS_BALANCE", c"requests_balance", ArgType::Integer),
    option(c"TOKENS_BALANCE", c"tokens_balance", ArgType::Integer),
];

const ADMIT_OPTIONS: [Arg; 8] = [
    option(c"LEASE", c"lease", ArgType::String),
    option(c"LEASE_TTL", c"lease_ttl", ArgType::Integer),
    option(c"RESERVE", c"reserve", ArgType::Integer),
    flag(c"PEEK", c"peek"),
    flag(c"VERBOSE", c"verbose"),
    option(c"POLICY", c"policy", ArgType::String),
    flag(c"COMPACT", c"compact"),
    option(c"COST", c"cost", ArgType::Integer),
];

const ACCOUNT_ARGS: [Arg; 4] = [TENANT, PROJECT, USER, BUNDLE];

const LIST_ARGS: [Arg; 4] = [TENANT, PROJECT, USER, flag(c"ALL", c"all")];
const USER_ARGS: [Arg; 3] = [TENANT, PROJECT, USER];
const HISTORY_ARGS: [Arg; 2] = [
    option(c"FROM", c"from", ArgType::UnixTime),
    option(c"TO", c"to", ArgType::UnixTime),
];
const COMMIT_ARGS: [Arg; 2] = [
    arg(c"tokens", ArgType::Integer),
    option(c"LEASE", c"lease", ArgType::String),
];
const RELEASE_ARGS: [Arg; 1] = [arg(c"lease", ArgType::String)];
const REPLYRUN_ARGS: [Arg; 1] = [arg(c"index", ArgType::Integer)];
const SETSTATE_ARGS: [Arg; 2] = [arg(c"key", ArgType::Key), arg(c"state", ArgType::String)];
const APPLY_ARGS: [Arg; 2] = [arg(c"key", ArgType::Key), arg(c"effect", ArgType::String)];
/// A policy's tenant is the declared key of the policy subcommands that read or change it.
const POLICY_TENANT: Arg = arg(c"tenant", ArgType::Key);
const POLICY_ID_ARGS: [Arg; 3] = [POLICY_TENANT, PROJECT, arg(c"name", ArgType::String)];
const POLICY_LIST_ARGS: [Arg; 2] = [POLICY_TENANT, PROJECT];
/// The tenant as the declared key of the reads over a whole project (`FIND`, `TOP`): key
/// permissions bound them to their tenant and a cluster client routes them by it.
const PROJECT_TENANT: Arg = arg(c"tenant", ArgType::Key);
const FIND_ARGS: [Arg; 5] = [
    PROJECT_TENANT,
    PROJECT,
    option(c"EXPIRES_WITHIN", c"expires_within", ArgType::Integer),
    option(c"COUNT", c"count", ArgType::Integer),
    option(c"CURSOR", c"cursor", ArgType::String),
];
const RANKINGS: [Arg; 2] = [
    choice(c"REQUESTS", c"requests"),
    choice(c"TOKENS", c"tokens"),
];
const TOP_ARGS: [Arg; 6] = [
    PROJECT_TENANT,
    PROJECT,
    Arg {
        name: c"ranking",
        kind: ArgType::OneOf(&RANKINGS),
        token: None,
        optional: false,
    },
    keyed(c"FROM", c"from", ArgType::UnixTime),
    keyed(c"TO", c"to", ArgType::UnixTime),
    option(c"COUNT", c"count", ArgType::Integer),
];
/// `QUOTA.POLICY INVALIDATE` drops this node's copy: no key (any node, whatever its slots).
const POLICY_INVALIDATE_ARGS: [Arg; 3] = [TENANT, PROJECT, arg(c"name", ArgType::String)];

/// A command's spec without its docs (`about` adds them): name, `CreateCommand` flags, the
/// declared key, ACL categories, arity and argument groups. Complexity defaults to O(1).
const fn spec(
    name: &'static CStr,
    flags: &'static CStr,
    key: Option<(c_int, KeyAccess)>,
    acl: &'static CStr,
    arity: c_int,
    args: &'static [&'static [Arg]],
) -> CommandSpec {
    CommandSpec {
        name,
        flags,
        key,
        acl,
        summary: c"",
        complexity: c"O(1)",
        tips: None,
        arity,
        args,
    }
}

impl CommandSpec {
    /// The `COMMAND DOCS` summary.
    const fn about(self, summary: &'static CStr) -> CommandSpec {
        CommandSpec { summary, ..self }
    }

    /// The `COMMAND DOCS` complexity, where it is not O(1).
    const fn cost(self, complexity: &'static CStr) -> CommandSpec {
        CommandSpec { complexity, ..self }
    }
}

use KeyAccess::{Delete, Overwrite, Read, ReadUpdate, Update};

/// The user id (argument 3) is the declared key of everything that touches a user. Commands
/// that always wait on PostgreSQL carry `deny-script`: a script cannot wait, so Redis refuses
/// them there before the module runs (inside MULTI the module refuses them).
#[rustfmt::skip]
mod table {
    use super::*;

    pub(crate) static GRANT: CommandSpec = spec(c"quota.grant", c"write deny-oom deny-script", Some((3, Update)), c"write slow", -5, &[&ACCOUNT_ARGS, &LIMITS, &GRANT_OPTIONS])
        .about(c"Grants or tops up a user's credit for a bundle (or '*') in PostgreSQL").cost(c"O(1) plus one PostgreSQL round trip");
    pub(crate) static GET: CommandSpec = spec(c"quota.get", c"readonly fast", Some((3, Read)), c"read fast", 5, &[&ACCOUNT_ARGS])
        .about(c"Returns the credit record that applies to a user's bundle")
        .cost(c"O(N) where N is the user's number of credits; loads them on a cache miss");
    pub(crate) static REVOKE: CommandSpec = spec(c"quota.revoke", c"write deny-script", Some((3, Delete)), c"write slow", 5, &[&ACCOUNT_ARGS])
        .about(c"Revokes a user's credit for a bundle (soft delete in PostgreSQL)").cost(c"O(1) plus one PostgreSQL round trip");
    pub(crate) static LIST: CommandSpec = spec(c"quota.list", c"readonly deny-script", Some((3, Read)), c"read slow", -4, &[&LIST_ARGS])
        .about(c"Lists a user's credits from PostgreSQL")
        .cost(c"O(N) where N is the user's number of credits, plus one PostgreSQL round trip");
    pub(crate) static HISTORY: CommandSpec = spec(c"quota.history", c"readonly deny-script", Some((3, Read)), c"read slow", -5, &[&ACCOUNT_ARGS, &HISTORY_ARGS])
        .about(c"Lists an account's hourly usage and balance debits from PostgreSQL")
        .cost(c"O(N) where N is the number of hours, plus one PostgreSQL round trip");
    // CLEANUP does the whole job from any one node (PostgreSQL is shared; the other nodes hear
    // of the rows it deactivates by NOTIFY): no key, no tips, so a cluster client sends it to
    // any master. It sits with Redis's own keyspace-wide maintenance commands (FLUSHALL).
    pub(crate) static CLEANUP: CommandSpec = spec(c"quota.cleanup", c"write deny-script", None, c"keyspace write slow dangerous", 1, &[])
        .about(c"Deactivates every expired credit and replies how many").cost(c"O(N) where N is the number of expired credits");
    pub(crate) static INVALIDATE: CommandSpec = spec(c"quota.invalidate", c"write fast", Some((3, Delete)), c"write fast", 4, &[&USER_ARGS])
        .about(c"Drops a user's cached credits here and on replicas");
    pub(crate) static ADMIT: CommandSpec = spec(c"quota.admit", c"write deny-oom fast", Some((3, ReadUpdate)), c"write fast", -5, &[&ACCOUNT_ARGS, &LIMITS, &ADMIT_OPTIONS])
        .about(c"Admits or denies one request against a base policy plus the user's credits")
        .cost(c"O(1) (O(N) in the account's live leases when they must be checked)");
    pub(crate) static COMMIT: CommandSpec = spec(c"quota.commit", c"write deny-oom fast", Some((3, Update)), c"write fast", -6, &[&ACCOUNT_ARGS, &COMMIT_ARGS])
        .about(c"Records the tokens a request used and settles its lease");
    pub(crate) static RELEASE: CommandSpec = spec(c"quota.release", c"write fast", Some((3, Update)), c"write fast", 6, &[&ACCOUNT_ARGS, &RELEASE_ARGS])
        .about(c"Undoes an admission held by a lease");
    pub(crate) static USAGE: CommandSpec = spec(c"quota.usage", c"readonly fast", Some((3, Read)), c"read fast", 5, &[&ACCOUNT_ARGS])
        .about(c"Returns an account's counters and window resets");
    pub(crate) static RESET: CommandSpec = spec(c"quota.reset", c"write", Some((3, Delete)), c"write slow dangerous", 5, &[&ACCOUNT_ARGS])
        .about(c"Clears an account's counters, leases and reservations");
    pub(crate) static SETSTATE: CommandSpec = spec(c"quota.setstate", c"write", Some((1, Overwrite)), c"write slow admin dangerous", 3, &[&SETSTATE_ARGS])
        .about(c"Internal: applies an account state replicated by a master or read from the AOF")
        .cost(c"O(N) where N is the size of the state");
    // FIND and TOP read PostgreSQL only, so any node could answer; their declared key is the
    // tenant (argument 1): key permissions bound them to it, and a cluster client sends them
    // to the node owning the tenant's slot, without a MOVED.
    pub(crate) static FIND: CommandSpec = spec(c"quota.find", c"readonly deny-script", Some((1, Read)), c"read slow", -3, &[&FIND_ARGS])
        .about(c"Pages through the live credits of every user of a tenant's project, optionally only those expiring soon")
        .cost(c"O(N) where N is COUNT, plus one PostgreSQL round trip (an index range scan)");
    pub(crate) static TOP: CommandSpec = spec(c"quota.top", c"readonly deny-script", Some((1, Read)), c"read slow", -8, &[&TOP_ARGS])
        .about(c"Ranks the users of a tenant's project by the requests or tokens the usage ledger holds over a range of hours")
        .cost(c"O(N) where N is the number of the project's ledger rows in the hours asked, aggregated in PostgreSQL (one round trip)");
    pub(crate) static APPLY: CommandSpec = spec(c"quota.apply", c"write", Some((1, Update)), c"write slow admin dangerous", 3, &[&APPLY_ARGS])
        .about(c"Internal: applies one change to an account, replicated by a master or read from the AOF");
    // Refused at any time but the module's own load, when the module calls it to encode its
    // reply runs (`ffi::runs`): no key, and it reads and writes nothing.
    pub(crate) static REPLYRUN: CommandSpec = spec(c"quota.replyrun", c"allow-loading allow-stale deny-script", None, c"slow admin dangerous", 2, &[&REPLYRUN_ARGS])
        .about(c"Internal: writes one of the module's fixed reply runs while the module loads");

    // `QUOTA.POLICY`'s subcommands: each has its own flags, so `GET` and `LIST` run on replicas
    // while `SET` and `DEL` are writes. Their declared key is the tenant (argument 2, counting
    // the container's name, as arity does): key permissions bound who reads and changes a
    // tenant's policies, and a cluster client routes them by it (any node could answer; the
    // others hear of a change by NOTIFY). `INVALIDATE` acts on one node's cache: no key.
    pub(crate) static POLICY_SET: CommandSpec = spec(c"set", c"write deny-oom deny-script", Some((2, Update)), c"write slow", -5, &[&POLICY_ID_ARGS, &LIMITS])
        .about(c"Creates or replaces a named base policy of a tenant's project");
    pub(crate) static POLICY_GET: CommandSpec = spec(c"get", c"readonly fast", Some((2, Read)), c"read fast", 5, &[&POLICY_ID_ARGS])
        .about(c"Returns a named base policy");
    pub(crate) static POLICY_DEL: CommandSpec = spec(c"del", c"write deny-script", Some((2, Delete)), c"write slow", 5, &[&POLICY_ID_ARGS])
        .about(c"Deletes a named base policy");
    pub(crate) static POLICY_LIST: CommandSpec = spec(c"list", c"readonly deny-script", Some((2, Read)), c"read slow", 4, &[&POLICY_LIST_ARGS])
        .about(c"Lists the named base policies of a tenant's project").cost(c"O(N) where N is the number of policies");
    pub(crate) static POLICY_INVALIDATE: CommandSpec = spec(c"invalidate", c"write fast", None, c"write fast", 5, &[&POLICY_INVALIDATE_ARGS])
        .about(c"Drops a named policy from this node's cache (the next use reloads it)");
    // `HELP` takes no key, so any node answers it, as Redis's own `CONFIG HELP` (whose flags
    // and category these are).
    pub(crate) static POLICY_HELP: CommandSpec = spec(c"help", c"allow-loading allow-stale", None, c"slow", 2, &[])
        .about(c"Shows the subcommands of QUOTA.POLICY and what each does").cost(c"O(1)");
}
pub(crate) use table::*;

/// `QUOTA.POLICY`, the container of the `POLICY_*` subcommands.
pub(crate) const POLICY: &CStr = c"quota.policy";

/// Why registration failed.
#[derive(Debug)]
pub(crate) enum RegisterError {
    /// `RedisModule_CreateCommand` refused the command.
    Create,
    /// `RedisModule_SetCommandInfo` refused the metadata.
    Info,
    /// `RedisModule_SetCommandACLCategories` refused the categories.
    Categories,
}

/// The entry point Redis calls for a command.
pub(crate) type Entry =
    extern "C" fn(*mut raw::RedisModuleCtx, *mut *mut raw::RedisModuleString, c_int) -> c_int;

/// Whether the server has module ACL categories (Redis >= 7.2).
pub(crate) fn has_acl_categories() -> bool {
    let (add, set) = unsafe {
        (
            raw::RedisModule_AddACLCategory,
            raw::RedisModule_SetCommandACLCategories,
        )
    };
    add.is_some() && set.is_some()
}

/// Adds the `quota` ACL category where the server supports it (call once, before `register`).
pub(crate) fn add_category(ctx: *mut raw::RedisModuleCtx) {
    if !has_acl_categories() {
        return;
    }
    unsafe {
        if let Some(add) = raw::RedisModule_AddACLCategory {
            add(ctx, CATEGORY.as_ptr());
        }
    }
}

/// Creates the command and sets everything the spec says that the server supports.
pub(crate) fn register(
    ctx: *mut raw::RedisModuleCtx,
    spec: &CommandSpec,
    entry: Entry,
) -> Result<(), RegisterError> {
    let (first, last, step) = match spec.key {
        Some((pos, _)) => (pos, pos, 1),
        None => (0, 0, 0),
    };
    let created = unsafe {
        raw::RedisModule_CreateCommand.map_or(raw::Status::Err as c_int, |f| {
            f(
                ctx,
                spec.name.as_ptr(),
                Some(entry),
                spec.flags.as_ptr(),
                first,
                last,
                step,
            )
        })
    };
    if created != raw::Status::Ok as c_int {
        return Err(RegisterError::Create);
    }
    describe(ctx, spec.name, spec)
}

/// Creates the container command `name` and registers each subcommand under it, with
/// everything its spec says that the server supports.
pub(crate) fn register_container(
    ctx: *mut raw::RedisModuleCtx,
    name: &CStr,
    subcommands: &[(&CommandSpec, Entry)],
) -> Result<(), RegisterError> {
    let created = unsafe {
        raw::RedisModule_CreateCommand.map_or(raw::Status::Err as c_int, |f| {
            f(ctx, name.as_ptr(), None, c"".as_ptr(), 0, 0, 0)
        })
    };
    let parent =
        unsafe { raw::RedisModule_GetCommand.map_or(ptr::null_mut(), |f| f(ctx, name.as_ptr())) };
    if created != raw::Status::Ok as c_int || parent.is_null() {
        return Err(RegisterError::Create);
    }
    for (spec, entry) in subcommands {
        let (first, last, step) = match spec.key {
            Some((pos, _)) => (pos, pos, 1),
            None => (0, 0, 0),
        };
        let created = unsafe {
            raw::RedisModule_CreateSubcommand.map_or(raw::Status::Err as c_int, |f| {
                f(
                    parent,
                    spec.name.as_ptr(),
                    Some(*entry),
                    spec.flags.as_ptr(),
                    first,
                    last,
                    step,
                )
            })
        };
        if created != raw::Status::Ok as c_int {
            return Err(RegisterError::Create);
        }
        let full = format!("{}|{}", name.to_string_lossy(), spec.name.to_string_lossy());
        let full = std::ffi::CString::new(full).map_err(|_| RegisterError::Create)?;
        describe(ctx, &full, spec)?;
    }
    Ok(())
}

/// Sets the docs, key spec and ACL categories of the registered command `name`.
fn describe(
    ctx: *mut raw::RedisModuleCtx,
    name: &CStr,
    spec: &CommandSpec,
) -> Result<(), RegisterError> {
    let command =
        unsafe { raw::RedisModule_GetCommand.map_or(ptr::null_mut(), |f| f(ctx, name.as_ptr())) };
    if command.is_null() {
        return Err(RegisterError::Create);
    }
    set_info(command, spec)?;
    if has_acl_categories() {
        let categories = format!(
            "{} {}",
            spec.acl.to_string_lossy(),
            CATEGORY.to_string_lossy()
        );
        let categories =
            std::ffi::CString::new(categories).map_err(|_| RegisterError::Categories)?;
        let rc = unsafe {
            raw::RedisModule_SetCommandACLCategories.map_or(raw::Status::Err as c_int, |f| {
                f(command, categories.as_ptr())
            })
        };
        if rc != raw::Status::Ok as c_int {
            return Err(RegisterError::Categories);
        }
    }
    Ok(())
}

static INFO_VERSION: raw::RedisModuleCommandInfoVersion = raw::RedisModuleCommandInfoVersion {
    version: 1,
    sizeof_historyentry: std::mem::size_of::<raw::RedisModuleCommandHistoryEntry>(),
    sizeof_keyspec: std::mem::size_of::<raw::RedisModuleCommandKeySpec>(),
    sizeof_arg: std::mem::size_of::<raw::RedisModuleCommandArg>(),
};

/// The raw argument array of `args`, zero-terminated; `nested` keeps sub-arrays alive.
fn raw_args<'a>(
    args: impl IntoIterator<Item = &'a Arg>,
    nested: &mut Vec<Vec<raw::RedisModuleCommandArg>>,
) -> Vec<raw::RedisModuleCommandArg> {
    let mut out: Vec<raw::RedisModuleCommandArg> = args
        .into_iter()
        .map(|a| {
            let (type_, subargs) = match a.kind {
                ArgType::String => (
                    raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_STRING,
                    None,
                ),
                ArgType::Integer => (
                    raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_INTEGER,
                    None,
                ),
                ArgType::UnixTime => (
                    raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_UNIX_TIME,
                    None,
                ),
                ArgType::Key => (
                    raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_KEY,
                    None,
                ),
                ArgType::Token => (
                    raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_PURE_TOKEN,
                    None,
                ),
                ArgType::OneOf(subs) => {
                    let mut sub = raw_args(subs, nested);
                    let p = sub.as_mut_ptr();
                    nested.push(sub);
                    (
                        raw::RedisModuleCommandArgType_REDISMODULE_ARG_TYPE_ONEOF,
                        Some(p),
                    )
                }
            };
            raw::RedisModuleCommandArg {
                name: a.name.as_ptr(),
                type_,
                key_spec_index: if matches!(a.kind, ArgType::Key) {
                    0
                } else {
                    -1
                },
                token: a.token.map_or(ptr::null(), CStr::as_ptr),
                summary: ptr::null(),
                since: ptr::null(),
                flags: if a.optional {
                    raw::REDISMODULE_CMD_ARG_OPTIONAL as c_int
                } else {
                    raw::REDISMODULE_CMD_ARG_NONE as c_int
                },
                deprecated_since: ptr::null(),
                subargs: subargs.unwrap_or(ptr::null_mut()),
                display_text: ptr::null(),
            }
        })
        .collect();
    out.push(zeroed_arg());
    out
}

fn zeroed_arg() -> raw::RedisModuleCommandArg {
    raw::RedisModuleCommandArg {
        name: ptr::null(),
        type_: 0,
        key_spec_index: 0,
        token: ptr::null(),
        summary: ptr::null(),
        since: ptr::null(),
        flags: 0,
        deprecated_since: ptr::null(),
        subargs: ptr::null_mut(),
        display_text: ptr::null(),
    }
}

fn key_spec(pos: c_int, access: KeyAccess) -> raw::RedisModuleCommandKeySpec {
    raw::RedisModuleCommandKeySpec {
        notes: ptr::null(),
        flags: access.flags(),
        begin_search_type: raw::RedisModuleKeySpecBeginSearchType_REDISMODULE_KSPEC_BS_INDEX,
        bs: raw::RedisModuleCommandKeySpec__bindgen_ty_1 {
            index: raw::RedisModuleCommandKeySpec__bindgen_ty_1__bindgen_ty_1 { pos },
        },
        find_keys_type: raw::RedisModuleKeySpecFindKeysType_REDISMODULE_KSPEC_FK_RANGE,
        fk: raw::RedisModuleCommandKeySpec__bindgen_ty_2 {
            range: raw::RedisModuleCommandKeySpec__bindgen_ty_2__bindgen_ty_1 {
                lastkey: 0,
                keystep: 1,
                limit: 0,
            },
        },
    }
}

/// The zero terminator of a key-spec array (begin_search_type 0 = invalid ends the list).
fn key_spec_end() -> raw::RedisModuleCommandKeySpec {
    raw::RedisModuleCommandKeySpec {
        notes: ptr::null(),
        flags: 0,
        begin_search_type: 0,
        bs: raw::RedisModuleCommandKeySpec__bindgen_ty_1 {
            index: raw::RedisModuleCommandKeySpec__bindgen_ty_1__bindgen_ty_1 { pos: 0 },
        },
        find_keys_type: 0,
        fk: raw::RedisModuleCommandKeySpec__bindgen_ty_2 {
            range: raw::RedisModuleCommandKeySpec__bindgen_ty_2__bindgen_ty_1 {
                lastkey: 0,
                keystep: 0,
                limit: 0,
            },
        },
    }
}

/// `RedisModule_SetCommandInfo` (Redis >= 7.0; the server copies everything it is given).
fn set_info(
    command: *mut raw::RedisModuleCommand,
    spec: &CommandSpec,
) -> Result<(), RegisterError> {
    let Some(set) = (unsafe { raw::RedisModule_SetCommandInfo }) else {
        return Ok(()); // an older server: no docs, the legacy key range stands
    };
    let mut key_specs: Vec<raw::RedisModuleCommandKeySpec> = Vec::with_capacity(2);
    if let Some((pos, access)) = spec.key {
        key_specs.push(key_spec(pos, access));
    }
    key_specs.push(key_spec_end());
    let mut nested = Vec::new();
    let mut args = raw_args(spec.args.iter().copied().flatten(), &mut nested);
    let info = raw::RedisModuleCommandInfo {
        version: &INFO_VERSION,
        summary: spec.summary.as_ptr(),
        complexity: spec.complexity.as_ptr(),
        since: SINCE.as_ptr(),
        history: ptr::null_mut(),
        tips: spec.tips.map_or(ptr::null(), CStr::as_ptr),
        arity: spec.arity,
        key_specs: if spec.key.is_some() {
            key_specs.as_mut_ptr()
        } else {
            ptr::null_mut()
        },
        args: args.as_mut_ptr(),
    };
    let rc = unsafe { set(command, &info) };
    drop(nested);
    if rc == raw::Status::Ok as c_int {
        Ok(())
    } else {
        Err(RegisterError::Info)
    }
}

#[cfg(test)]
mod tests;
