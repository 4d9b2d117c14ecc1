//! redis-quota: a Redis module that keeps per-user quota credits ("replenishments") next to the
//! data they guard and admits requests against a base policy plus those credits atomically.
//!
//! This file only wires things together: the data type, the commands and their ACL category,
//! the configuration, `INFO quota`, and start/stop of the worker pool and NOTIFY listener.
//! The logic lives in `core` (pure), `commands` (Redis shells), `store` (Postgres) and `worker`.

// Command shells pass the `RedisModuleCtx` pointer Redis hands us to the API functions, as the
// redis-module crate itself does; they never dereference it themselves.
#![allow(clippy::not_unsafe_ptr_arg_deref)]

pub mod commands;
pub mod config;
pub mod core;
pub mod glue;
pub mod state;
pub mod stats;
pub mod store;
pub mod worker;

#[cfg(not(test))]
mod module {
    use std::ffi::CString;
    use std::os::raw::c_int;
    use std::time::Duration;

    use redis_module::configuration::ConfigurationFlags;
    use redis_module::{raw, redis_module, Context, InfoContext, RedisResult, RedisString, Status};
    use redis_module_macros::info_command_handler;

    use crate::commands::*;
    use crate::config::{self, on_change, ScriptMiss};
    use crate::glue::account_type::ACCOUNT_TYPE;
    use crate::{state, stats, worker};

    type Entry =
        extern "C" fn(*mut raw::RedisModuleCtx, *mut *mut raw::RedisModuleString, c_int) -> c_int;

    /// Every command: name, entry point, flags, first key, last key, key step.
    /// The key is the user id (argument 3) for everything that touches a user, so Redis Cluster
    /// routes all of one user's commands to the node holding that user's slot.
    const COMMANDS: &[(&str, Entry, &str, c_int, c_int, c_int)] = &[
        ("quota.grant", cmd_grant, "write deny-oom", 3, 3, 1),
        ("quota.get", cmd_get, "readonly fast", 3, 3, 1),
        ("quota.revoke", cmd_revoke, "write", 3, 3, 1),
        ("quota.list", cmd_list, "readonly", 3, 3, 1),
        ("quota.cleanup", cmd_cleanup, "write", 0, 0, 0),
        ("quota.invalidate", cmd_invalidate, "write fast", 3, 3, 1),
        ("quota.admit", cmd_admit, "write deny-oom fast", 3, 3, 1),
        ("quota.commit", cmd_commit, "write deny-oom fast", 3, 3, 1),
        ("quota.release", cmd_release, "write fast", 3, 3, 1),
        ("quota.usage", cmd_usage, "readonly fast", 3, 3, 1),
        ("quota.reset", cmd_reset, "write", 3, 3, 1),
        ("quota.setstate", cmd_setstate, "write", 1, 1, 1),
    ];

    /// `QUOTA.POLICY` is a container: each subcommand has its own flags, so `GET` and `LIST`
    /// run on replicas while `SET` and `DEL` are writes. None takes a key: a policy belongs to
    /// a (tenant, project), not to a user's slot.
    const POLICY_SUBCOMMANDS: &[(&str, &str)] = &[
        ("set", "write deny-oom"),
        ("get", "readonly fast"),
        ("del", "write"),
        ("list", "readonly"),
        ("invalidate", "write fast"),
    ];

    fn register_policy_command(ctx: &Context, category: Option<&std::ffi::CStr>) -> Status {
        let parent_name = c"quota.policy";
        let created = unsafe {
            raw::RedisModule_CreateCommand.map_or(raw::Status::Err as c_int, |f| {
                f(ctx.ctx, parent_name.as_ptr(), None, c"".as_ptr(), 0, 0, 0)
            })
        };
        let parent = unsafe {
            raw::RedisModule_GetCommand
                .map_or(std::ptr::null_mut(), |f| f(ctx.ctx, parent_name.as_ptr()))
        };
        if created != raw::Status::Ok as c_int || parent.is_null() {
            ctx.log_warning("quota: cannot create command quota.policy");
            return Status::Err;
        }
        for (name, flags) in POLICY_SUBCOMMANDS {
            let (Ok(cname), Ok(cflags)) = (CString::new(*name), CString::new(*flags)) else {
                return Status::Err;
            };
            let created = unsafe {
                raw::RedisModule_CreateSubcommand.map_or(raw::Status::Err as c_int, |f| {
                    f(
                        parent,
                        cname.as_ptr(),
                        Some(cmd_policy),
                        cflags.as_ptr(),
                        0,
                        0,
                        0,
                    )
                })
            };
            if created != raw::Status::Ok as c_int {
                ctx.log_warning(&format!("quota: cannot create command quota.policy|{name}"));
                return Status::Err;
            }
            if let (Some(category), Ok(full)) =
                (category, CString::new(format!("quota.policy|{name}")))
            {
                set_category(ctx, &full, category);
            }
        }
        Status::Ok
    }

    /// Puts a command in an ACL category (Redis >= 7.2).
    fn set_category(ctx: &Context, command: &std::ffi::CStr, category: &std::ffi::CStr) {
        unsafe {
            if let (Some(get), Some(set)) = (
                raw::RedisModule_GetCommand,
                raw::RedisModule_SetCommandACLCategories,
            ) {
                let command = get(ctx.ctx, command.as_ptr());
                if !command.is_null() {
                    set(command, category.as_ptr());
                }
            }
        }
    }

    fn register_commands(ctx: &Context) -> Status {
        let category = c"quota";
        let has_categories = unsafe { raw::RedisModule_AddACLCategory }.is_some();
        if has_categories {
            unsafe {
                if let Some(add) = raw::RedisModule_AddACLCategory {
                    add(ctx.ctx, category.as_ptr());
                }
            }
        }
        for (name, entry, flags, first, last, step) in COMMANDS {
            let (Ok(cname), Ok(cflags)) = (CString::new(*name), CString::new(*flags)) else {
                return Status::Err;
            };
            let created = unsafe {
                raw::RedisModule_CreateCommand.map_or(raw::Status::Err as c_int, |f| {
                    f(
                        ctx.ctx,
                        cname.as_ptr(),
                        Some(*entry),
                        cflags.as_ptr(),
                        *first,
                        *last,
                        *step,
                    )
                })
            };
            if created != raw::Status::Ok as c_int {
                ctx.log_warning(&format!("quota: cannot create command {name}"));
                return Status::Err;
            }
            // Redis >= 7.2: put every command in the `quota` ACL category.
            if has_categories {
                set_category(ctx, &cname, category);
            }
        }
        register_policy_command(ctx, has_categories.then_some(category))
    }

    extern "C" fn on_shutdown(
        _ctx: *mut raw::RedisModuleCtx,
        _event: raw::RedisModuleEvent,
        _sub: u64,
        _data: *mut std::os::raw::c_void,
    ) {
        shutdown();
    }

    fn shutdown() {
        worker::stop(Duration::from_millis(500));
        state::stop_listener();
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
                    worker::submit_or_busy(worker::Job::Cleanup { client: None });
                }
                schedule_cleanup(ctx);
            },
            (),
        );
    }

    /// Masks the password in the `pg-url` module argument in place: Redis keeps the load
    /// arguments and shows them in `MODULE LIST`. The configuration has already read them.
    fn mask_pg_url_argument(args: &[RedisString]) {
        let mut iter = args.iter();
        while let Some(arg) = iter.next() {
            if !arg.as_slice().eq_ignore_ascii_case(b"pg-url") {
                continue;
            }
            let Some(value) = iter.next() else { break };
            let spans = config::secret_spans(value.as_slice());
            let mut len = 0usize;
            let ptr = unsafe {
                raw::RedisModule_StringPtrLen.map_or(std::ptr::null(), |f| f(value.inner, &mut len))
            };
            if ptr.is_null() {
                continue;
            }
            for span in spans {
                if span.end <= len {
                    // The argument's bytes are a plain sds owned by Redis; same length, masked.
                    unsafe {
                        std::ptr::write_bytes((ptr as *mut u8).add(span.start), b'*', span.len())
                    };
                }
            }
        }
    }

    fn init(ctx: &Context, args: &[RedisString]) -> Status {
        mask_pg_url_argument(args);
        if register_commands(ctx) == Status::Err {
            return Status::Err;
        }
        let threads = config::int(&config::POOL_SIZE).clamp(1, 1024) as usize;
        let queue = config::int(&config::QUEUE_MAX).max(1) as usize;
        state::cache().set_config(state::cache_config());
        state::policies().set_config(state::cache_config());
        if let Err(e) = worker::start(threads, queue) {
            ctx.log_warning(&format!("quota: cannot start worker threads: {e}"));
            return Status::Err;
        }
        state::restart_listener();
        schedule_cleanup(ctx);
        crate::glue::propagation::subscribe(ctx.ctx);
        unsafe {
            if let Some(subscribe) = raw::RedisModule_SubscribeToServerEvent {
                let event = raw::RedisModuleEvent {
                    id: raw::REDISMODULE_EVENT_SHUTDOWN,
                    dataver: 1,
                };
                subscribe(ctx.ctx, event, Some(on_shutdown));
            }
        }
        Status::Ok
    }

    fn deinit(_ctx: &Context) -> Status {
        shutdown();
        Status::Ok
    }

    #[info_command_handler]
    fn info(ctx: &InfoContext, _for_crash_report: bool) -> RedisResult<()> {
        let (cache_entries, cache_stats, flights) = {
            let cache = state::cache();
            (cache.len() as u64, cache.stats(), cache.flights() as u64)
        };
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
            .field("queue_depth", int(worker::queue_depth() as u64))?
            .field("queue_max", config::int(&config::QUEUE_MAX))?
            .field("queue_busy_rejections", int(stats::BUSY_REJECTIONS.get()))?
            .field("pool_size", config::int(&config::POOL_SIZE))?
            .field("pool_connections", i64::from(connections))?
            .field("pool_idle", i64::from(idle))?
            .field("notify_state", state::notify_state_name().to_string())?
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
            .build_section()?
            .build_info()?;
        Ok(())
    }

    redis_module! {
        name: "quota",
        version: 1,
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
                ["cleanup-interval", &config::CLEANUP_INTERVAL, config::DEFAULT_CLEANUP_INTERVAL, 0, 31_536_000, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
                ["lease-ttl", &config::LEASE_TTL, config::DEFAULT_LEASE_TTL, 1, config::MAX_LEASE_TTL, ConfigurationFlags::DEFAULT, Some(Box::new(on_change::<i64, _>))],
            ],
            string: [
                ["pg-url", &config::PG_URL, "", ConfigurationFlags::SENSITIVE, Some(Box::new(on_change::<RedisString, _>))],
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
