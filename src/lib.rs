//! redis-quota: a Redis module that keeps per-user quota credits ("replenishments") next to the
//! data they guard and admits requests against a base policy plus those credits atomically.
//!
//! This file only registers: the data type, the commands (their metadata lives in
//! `ffi::command_info`), the configuration and its change routing, the `INFO quota` handler
//! (its fields are built by `runtime::info`), and `init`/`deinit`, which start and stop the
//! rest through `runtime::lifecycle`. Imports go one way only:
//! `lib -> commands -> {core, runtime, ffi}`, `runtime -> {store, core, ffi}`, `ffi -> core`
//! (see `scripts/check-layers.py`). The logic lives in `core` (pure), `commands` (Redis
//! shells), `runtime` (process-wide state, worker pool), `store` (Postgres) and `ffi` (the raw
//! Redis API).

// Unit-test builds compile the Redis registration below out, and with it every entry point,
// so what only the commands reach would look dead there; the module build checks dead code.
#![cfg_attr(test, allow(dead_code))]

pub(crate) mod commands;
pub(crate) mod core;
pub(crate) mod ffi;
pub(crate) mod parse;
pub(crate) mod runtime;
pub(crate) mod store;

#[cfg(not(test))]
mod module {
    use redis_module::configuration::{ConfigurationContext, ConfigurationFlags};
    use redis_module::{redis_module, Context, InfoContext, RedisResult, RedisString, Status};
    use redis_module_macros::info_command_handler;

    use crate::commands::{
        self, admit, credits, leases, policies, project, replication, usage, words,
    };
    use crate::ffi::account_type::ACCOUNT_TYPE;
    use crate::ffi::blocked::entry;
    use crate::ffi::command_info::{self as info, CommandSpec, Entry};
    use crate::ffi::ctx::Ctx;
    use crate::runtime::config::{self, ScriptMiss};
    use crate::runtime::info::InfoValue;
    use crate::runtime::{self, lifecycle};

    /// Declares each raw entry point (it runs its handler through `commands::run`, which
    /// replies the handler's error once) and `COMMANDS`, every command with its entry point.
    macro_rules! commands {
        ($($spec:ident: $entry:ident => $handler:path),* $(,)?) => {
            $(entry!($entry, |ctx, args| commands::run(ctx, args, $handler));)*
            const COMMANDS: &[(&CommandSpec, Entry)] = &[$((&info::$spec, $entry)),*];
        };
    }

    // `ffi::command_info` holds what Redis is told about each command (flags, key spec, ACL
    // categories, docs, tips). The key is the user id (argument 3) for everything that touches
    // a user, so Redis Cluster routes all of one user's commands to the node holding its slot.
    commands! {
        GRANT: cmd_grant => credits::grant,
        GET: cmd_get => credits::get,
        REVOKE: cmd_revoke => credits::revoke,
        LIST: cmd_list => credits::list,
        CLEANUP: cmd_cleanup => credits::cleanup,
        HISTORY: cmd_history => credits::history,
        INVALIDATE: cmd_invalidate => credits::invalidate,
        ADMIT: cmd_admit => admit::admit,
        COMMIT: cmd_commit => leases::commit,
        RELEASE: cmd_release => leases::release,
        USAGE: cmd_usage => usage::usage,
        RESET: cmd_reset => usage::reset,
        SETSTATE: cmd_setstate => replication::setstate,
        APPLY: cmd_apply => replication::apply,
        FIND: cmd_find => project::find,
        TOP: cmd_top => project::top,
        REPLYRUN: cmd_replyrun => words::reply_run,
    }
    entry!(cmd_policy, |ctx, args| commands::run(
        ctx,
        args,
        policies::policy
    ));

    entry!(cmd_policy_help, |ctx, args| commands::run(
        ctx,
        args,
        policies::help
    ));

    /// `QUOTA.POLICY`'s subcommands (one entry point parses which one it is; `HELP` has its
    /// own). Redis answers an unknown one with `ERR unknown subcommand '...'. Try QUOTA.POLICY
    /// HELP.`
    const POLICY_SUBCOMMANDS: &[(&CommandSpec, Entry)] = &[
        (&info::POLICY_SET, cmd_policy),
        (&info::POLICY_GET, cmd_policy),
        (&info::POLICY_DEL, cmd_policy),
        (&info::POLICY_LIST, cmd_policy),
        (&info::POLICY_INVALIDATE, cmd_policy),
        (&info::POLICY_HELP, cmd_policy_help),
    ];

    fn register_commands(ctx: &Context) -> Status {
        info::add_category(ctx.ctx);
        if !info::has_acl_categories() {
            ctx.log_notice(
                "quota: this Redis has no module ACL categories (Redis < 7.2): the QUOTA.* \
                 commands are in no ACL category; name them one by one in ACL rules",
            );
        }
        for (spec, entry) in COMMANDS {
            if let Err(e) = info::register(ctx.ctx, spec, *entry) {
                ctx.log_warning(&format!(
                    "quota: cannot register command {}: {e:?}",
                    spec.name.to_string_lossy()
                ));
                return Status::Err;
            }
        }
        if let Err(e) = info::register_container(ctx.ctx, info::POLICY, POLICY_SUBCOMMANDS) {
            ctx.log_warning(&format!(
                "quota: cannot register command quota.policy: {e:?}"
            ));
            return Status::Err;
        }
        Status::Ok
    }

    /// Called by Redis after any `quota.*` option changed. `G` is the option's value type,
    /// which the registration below names.
    #[allow(clippy::extra_unused_type_parameters)]
    fn on_change<G, T>(_ctx: &ConfigurationContext, name: &str, _value: &'static T) {
        runtime::reconfigure(name);
    }

    fn init(ctx: &Context, args: &[RedisString]) -> Status {
        let raw = Ctx::from_raw(ctx.ctx);
        if let Err(line) = lifecycle::secure_load_args(raw, args) {
            ctx.log_warning(&line);
            return Status::Err;
        }
        crate::ffi::lifecycle::handle_io_errors(raw);
        if register_commands(ctx) == Status::Err {
            return Status::Err;
        }
        if let Err(line) = lifecycle::start(raw) {
            ctx.log_warning(&line);
            return Status::Err;
        }
        // Last: nothing after it can fail the load and leave the encodings behind.
        let unencoded = crate::ffi::words::prepare(ctx.ctx, words::all());
        if unencoded > 0 {
            ctx.log_notice(&format!(
                "quota: {unencoded} reply words are written the slow way (is ECHO renamed?)"
            ));
        } else {
            // The runs only where the words are (see `ffi::runs`).
            let runs = crate::ffi::runs::prepare(ctx.ctx, words::REPLY_RUN, &words::runs());
            if runs > 0 {
                ctx.log_notice(&format!(
                    "quota: {runs} reply runs are written the slow way (QUOTA.REPLYRUN failed)"
                ));
            }
        }
        Status::Ok
    }

    fn deinit(_ctx: &Context) -> Status {
        lifecycle::stop();
        crate::ffi::runs::release(&words::runs());
        crate::ffi::words::release(words::all());
        Status::Ok
    }

    /// `INFO quota`: one section, its fields built by `runtime::info`.
    #[info_command_handler]
    fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
        let mut section = ctx.builder().add_section(runtime::info::SECTION);
        for (name, value) in runtime::info::stats() {
            section = match value {
                InfoValue::Int(v) => section.field(name, v)?,
                InfoValue::Text(v) => section.field(name, v)?,
            };
        }
        section.build_section()?.build_info()?;
        Ok(())
    }

    redis_module! {
        name: "quota",
        // Cargo.toml's version, encoded as major * 10000 + minor * 100 + patch.
        version: info::MODULE_VERSION,
        allocator: (redis_module::alloc::RedisAlloc, redis_module::alloc::RedisAlloc),
        data_types: [ACCOUNT_TYPE],
        init: init,
        deinit: deinit,
        configurations: [
            i64: [
                ["pool-size", &config::POOL_SIZE, config::DEFAULT_POOL_SIZE, 1, 1024, ConfigurationFlags::IMMUTABLE, Some(Box::new(on_change::<i64, _>))],
                ["pg-timeout-ms", &config::PG_TIMEOUT_MS, config::DEFAULT_PG_TIMEOUT_MS, 10, 600_000, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
                ["queue-max", &config::QUEUE_MAX, config::DEFAULT_QUEUE_MAX, 1, 10_000_000, ConfigurationFlags::IMMUTABLE, Some(Box::new(on_change::<i64, _>))],
                ["cache-ttl-ms", &config::CACHE_TTL_MS, config::DEFAULT_CACHE_TTL_MS, 0, 86_400_000, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
                ["negative-ttl-ms", &config::NEGATIVE_TTL_MS, config::DEFAULT_NEGATIVE_TTL_MS, 0, 86_400_000, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
                ["cache-max-entries", &config::CACHE_MAX_ENTRIES, config::DEFAULT_CACHE_MAX_ENTRIES, 1, 1_000_000_000, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
                ["cache-max-memory", &config::CACHE_MAX_MEMORY, 0, 0, i64::MAX, ConfigurationFlags::MEMORY, Some(Box::new(on_change::<i64, _>))],
                ["cleanup-interval", &config::CLEANUP_INTERVAL, config::DEFAULT_CLEANUP_INTERVAL, 0, 31_536_000, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
                ["flush-interval", &config::FLUSH_INTERVAL, config::DEFAULT_FLUSH_INTERVAL, 1, 3600, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
                ["lease-ttl", &config::LEASE_TTL, config::DEFAULT_LEASE_TTL, 1, config::MAX_LEASE_TTL, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
            ],
            string: [
                ["pg-url", &config::PG_URL, "", ConfigurationFlags::SENSITIVE, Some(Box::new(on_change::<RedisString, _>))],
                ["listen-url", &config::LISTEN_URL, "", ConfigurationFlags::SENSITIVE, Some(Box::new(on_change::<RedisString, _>))],
                ["pg-password", &config::PG_PASSWORD, "", ConfigurationFlags::SENSITIVE, Some(Box::new(on_change::<RedisString, _>))],
                ["pg-passfile", &config::PG_PASSFILE, "", ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<RedisString, _>))],
                ["schema", &config::SCHEMA, config::DEFAULT_SCHEMA, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<RedisString, _>))],
            ],
            bool: [
                ["auto-deploy", &config::AUTO_DEPLOY, true, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<bool, _>))],
                ["notify", &config::NOTIFY, true, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<bool, _>))],
            ],
            enum: [
                ["script-miss", &config::SCRIPT_MISS, ScriptMiss::base, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<ScriptMiss, _>))],
            ],
            module_args_as_configuration: true,
        ]
    }
}
