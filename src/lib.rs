//! redis-quota: a Redis module that keeps per-user quota credits ("replenishments") next to the
//! data they guard and admits requests against a base policy plus those credits atomically.
//!
//! This file only wires things together: the data type, the commands (their metadata lives in
//! `ffi::command_info`), the configuration and its change routing, `INFO quota`, and start/stop
//! of the worker pool and NOTIFY listener. Imports go one way only:
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
pub(crate) mod runtime;
pub(crate) mod store;

#[cfg(not(test))]
mod module {
    use std::time::Duration;

    use redis_module::configuration::ConfigurationFlags;
    use redis_module::{raw, redis_module, Context, InfoContext, RedisResult, RedisString, Status};
    use redis_module_macros::info_command_handler;

    use crate::commands::{self, admit, credits, leases, policies, project, replication, usage};
    use redis_module::configuration::ConfigurationContext;

    use crate::ffi::account_type::ACCOUNT_TYPE;
    use crate::ffi::blocked::entry;
    use crate::ffi::command_info::{self as info, CommandSpec, Entry};
    use crate::runtime::config::{self, ScriptMiss};
    use crate::runtime::{self, cache, jobs, ledger, notify, stats, worker};

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

    extern "C" fn on_shutdown(
        ctx: *mut raw::RedisModuleCtx,
        _event: raw::RedisModuleEvent,
        _sub: u64,
        _data: *mut std::os::raw::c_void,
    ) {
        // The last flush of the usage ledger, while the pool still runs.
        ledger::flush_and_wait(crate::ffi::ctx::Ctx::from_raw(ctx));
        shutdown();
    }

    fn shutdown() {
        worker::stop(Duration::from_millis(500));
        notify::stop_listener();
    }

    fn schedule_cleanup(ctx: &Context) {
        let interval = config::int(&config::CLEANUP_INTERVAL);
        // When off, look again in a minute in case it is switched on.
        let period = if interval > 0 { interval as u64 } else { 60 };
        ctx.create_timer(
            Duration::from_secs(period),
            |ctx: &Context, ()| {
                let flags = ctx.get_flags();
                if config::int(&config::CLEANUP_INTERVAL) > 0
                    && flags.contains(redis_module::ContextFlags::MASTER)
                {
                    worker::submit_or_busy(jobs::Job::Cleanup { client: None });
                }
                schedule_cleanup(ctx);
            },
            (),
        );
    }

    /// Checks the load arguments and keeps passwords and text Redis could not write back out of
    /// Redis's copy of them, which `MODULE LIST` shows and `CONFIG REWRITE` writes back,
    /// unquoted, as the `loadmodule` line (see `config::plan_load_args`): an unknown argument
    /// fails the load with a warning naming it (never its value), a password in `pg-url` or
    /// `listen-url` becomes `quota.pg-password` (which `CONFIG REWRITE` writes as a line of its
    /// own), and a URL in the key=value form or with a space or quote becomes the same settings
    /// as a URL, so a rewritten redis.conf loads and logs in the same way.
    fn secure_load_args(ctx: &Context, args: &[RedisString]) -> Status {
        let raw: Vec<&[u8]> = args.iter().map(RedisString::as_slice).collect();
        let plan = match config::plan_load_args(&raw, &config::text(&config::PG_PASSWORD)) {
            Ok(plan) => plan,
            Err(why) => {
                ctx.log_warning(&format!("quota: {why}; the module is not loaded"));
                return Status::Err;
            }
        };
        if let Some(password) = plan.password {
            config::set_text(&config::PG_PASSWORD, password);
        }
        // Only Redis's copy changes: the setting keeps the value as given (`CONFIG GET` shows
        // it, as it shows `masterauth`); the next start reads the same settings from the copy.
        for (index, text, option) in plan.rewrites {
            let Some(arg) = args.get(index) else {
                continue;
            };
            if !crate::ffi::load_args::replace(ctx.ctx, arg, text.as_bytes()) {
                ctx.log_warning(&format!(
                    "quota: cannot rewrite the {option} module argument: give it as a \
                     quota.{option} line in redis.conf instead"
                ));
                return Status::Err;
            }
        }
        Status::Ok
    }

    /// The ledger's timer: every 100 ms (see `runtime::ledger::tick`).
    fn schedule_ledger(ctx: &Context) {
        ctx.create_timer(
            Duration::from_millis(100),
            |ctx: &Context, ()| {
                let raw_ctx = crate::ffi::ctx::Ctx::from_raw(ctx.ctx);
                ledger::tick(raw_ctx, runtime::clock::now_ms(), false);
                schedule_ledger(ctx);
            },
            (),
        );
    }

    /// Every second, deploys the schema in the background while it is not known to be there
    /// (`quota.auto-deploy`): at load, and once PostgreSQL can be reached.
    fn schedule_deploy(ctx: &Context) {
        ctx.create_timer(
            Duration::from_secs(1),
            |ctx: &Context, ()| {
                worker::deploy_soon();
                schedule_deploy(ctx);
            },
            (),
        );
    }

    fn init(ctx: &Context, args: &[RedisString]) -> Status {
        if secure_load_args(ctx, args) == Status::Err {
            return Status::Err;
        }
        // A value that cannot be read fails its load (RESTORE: "Bad data format") instead of
        // taking the server down: `rdb_load` checks every read.
        if let Some(set_options) = unsafe { raw::RedisModule_SetModuleOptions } {
            unsafe {
                set_options(
                    ctx.ctx,
                    raw::REDISMODULE_OPTIONS_HANDLE_IO_ERRORS as std::os::raw::c_int,
                )
            };
        }
        if register_commands(ctx) == Status::Err {
            return Status::Err;
        }
        let threads = config::int(&config::POOL_SIZE).clamp(1, 1024) as usize;
        let queue = config::int(&config::QUEUE_MAX).max(1) as usize;
        cache::cache().set_config(cache::cache_config());
        cache::policies().set_config(cache::cache_config());
        if let Err(e) = worker::start(threads, queue) {
            ctx.log_warning(&format!("quota: cannot start worker threads: {e}"));
            return Status::Err;
        }
        notify::restart_listener();
        worker::deploy_soon();
        schedule_cleanup(ctx);
        schedule_deploy(ctx);
        schedule_ledger(ctx);
        runtime::install_key_hooks(crate::ffi::ctx::Ctx::from_raw(ctx.ctx));
        runtime::watch_memory(crate::ffi::ctx::Ctx::from_raw(ctx.ctx));
        crate::ffi::secret_filter::register(
            crate::ffi::ctx::Ctx::from_raw(ctx.ctx),
            config::hide_secret,
        );
        unsafe {
            if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
                let event = raw::RedisModuleEvent {
                    id: raw::REDISMODULE_EVENT_SHUTDOWN,
                    dataver: 1,
                };
                subscribe(ctx.ctx, event, Some(on_shutdown));
            }
        }
        // Last: nothing after it can fail the load and leave the encodings behind.
        let unencoded = crate::ffi::reply::prepare(ctx.ctx, crate::commands::words::all());
        if unencoded > 0 {
            ctx.log_notice(&format!(
                "quota: {unencoded} reply words are written the slow way (is ECHO renamed?)"
            ));
        }
        Status::Ok
    }

    fn deinit(_ctx: &Context) -> Status {
        shutdown();
        crate::ffi::reply::release(crate::commands::words::all());
        Status::Ok
    }

    #[info_command_handler]
    fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
        let (cache_entries, cache_stats, flights, credit_bytes) = {
            let cache = cache::cache();
            let bytes = cache.bytes();
            (
                cache.len() as u64,
                cache.stats(),
                cache.flights() as u64,
                bytes,
            )
        };
        // One lock at a time (the two caches' locks are never held together).
        let cache_bytes = (credit_bytes + cache::policies().bytes()) as u64;
        let (connections, idle) = worker::pool_state();
        let queries = stats::PG_QUERIES.get();
        let avg_us = stats::PG_LATENCY_US_TOTAL
            .get()
            .checked_div(queries)
            .unwrap_or(0);
        let max_us = stats::PG_LATENCY_US_MAX.load(std::sync::atomic::Ordering::Relaxed);
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        ctx.builder()
            .add_section("stats")
            .field("cache_entries", int(cache_entries))?
            .field("cache_max_entries", config::int(&config::CACHE_MAX_ENTRIES))?
            .field("cache_bytes", int(cache_bytes))?
            .field(
                "cache_max_bytes",
                int(u64::try_from(runtime::memory::cache_budget()).unwrap_or(u64::MAX)),
            )?
            .field(
                "cache_hits",
                int(cache_stats
                    .hits
                    .saturating_add(stats::CACHE_MEMO_HITS.get())),
            )?
            .field("cache_misses", int(cache_stats.misses))?
            .field("cache_stale_hits", int(cache_stats.stale_hits))?
            .field("cache_evictions", int(cache_stats.evictions))?
            .field("loads_in_flight", int(flights))?
            .field("pg_queries", int(queries))?
            .field("pg_errors", int(stats::PG_ERRORS.get()))?
            .field("pg_latency_avg_us", int(avg_us))?
            .field("pg_latency_max_us", int(max_us))?
            .field("pg_timeouts", int(stats::TIMEOUTS.get()))?
            .field(
                "pg_down",
                i64::from(runtime::health::is_down(runtime::clock::now_ms())),
            )?
            .field("queue_depth", int(worker::queue_depth() as u64))?
            .field("clients_blocked", int(crate::ffi::blocked::blocked_total()))?
            .field("queue_max", config::int(&config::QUEUE_MAX))?
            .field("queue_busy_rejections", int(stats::BUSY_REJECTIONS.get()))?
            .field("pool_size", config::int(&config::POOL_SIZE))?
            .field("pool_connections", i64::from(connections))?
            .field("pool_idle", i64::from(idle))?
            .field("notify_state", notify::notify_state_name().to_string())?
            .field("notify_received", int(stats::NOTIFY_RECEIVED.get()))?
            .field("notify_reconnects", int(stats::NOTIFY_RECONNECTS.get()))?
            .field("admits_allowed", int(stats::ADMITS_ALLOWED.get()))?
            .field("admits_denied", int(stats::ADMITS_DENIED.get()))?
            .field("admits_pending", int(stats::ADMITS_PENDING.get()))?
            .field("admits_unavailable", int(stats::ADMITS_UNAVAILABLE.get()))?
            .field("grants", int(stats::GRANTS.get()))?
            .field("grants_duplicate", int(stats::GRANTS_DUPLICATE.get()))?
            .field("revokes", int(stats::REVOKES.get()))?
            .field("cleanups", int(stats::CLEANUPS.get()))?
            .field("admits_balance", int(stats::ADMITS_BALANCE.get()))?
            .field("ledger_accounts_pending", int(ledger::tracked() as u64))?
            .field("ledger_flushes", int(stats::LEDGER_FLUSHES.get()))?
            .field("ledger_flush_errors", int(stats::LEDGER_FLUSH_ERRORS.get()))?
            .field("ledger_batches", int(stats::LEDGER_BATCHES.get()))?
            .field(
                "ledger_batches_skipped",
                int(stats::LEDGER_BATCHES_SKIPPED.get()),
            )?
            .field(
                "ledger_batches_revised",
                int(stats::LEDGER_BATCHES_REVISED.get()),
            )?
            .field(
                "ledger_last_snapshot_us",
                int(stats::LEDGER_SNAPSHOT_US.load(std::sync::atomic::Ordering::Relaxed)),
            )?
            .field(
                "ledger_last_snapshot_accounts",
                int(stats::LEDGER_SNAPSHOT_ACCOUNTS.load(std::sync::atomic::Ordering::Relaxed)),
            )?
            .field(
                "ledger_last_snapshot_longest_tick_us",
                int(stats::LEDGER_SNAPSHOT_LONGEST_US.load(std::sync::atomic::Ordering::Relaxed)),
            )?
            .field(
                "ledger_flush_waiting_ms",
                int(ledger::waiting_ms(runtime::clock::now_ms())),
            )?
            .build_section()?
            .build_info()?;
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
