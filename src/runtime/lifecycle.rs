//! Start and stop of the module's process-wide machinery, which `lib.rs` calls from `init`
//! and `deinit`: the load arguments checked and cleaned, the caches configured, the worker
//! pool and NOTIFY listener started, the timers armed (cleanup, the ledger, the schema deploy),
//! the key, memory and shutdown hooks installed once; and all of it stopped again.
//!
//! Errors come back as the log line to write (`lib.rs` logs it with the load's context and
//! fails the load). Nothing here names a command.

use std::time::Duration;

use redis_module::RedisString;

use super::{clock, config, jobs, ledger, notify, worker};
use crate::ffi::ctx::Ctx;
use crate::ffi::lifecycle::{after, on_shutdown};

/// Checks the load arguments and keeps passwords and text Redis could not write back out of
/// Redis's copy of them, which `MODULE LIST` shows and `CONFIG REWRITE` writes back,
/// unquoted, as the `loadmodule` line (see `config::plan_load_args`): an unknown argument
/// fails the load with a warning naming it (never its value), a password in `pg-url` or
/// `listen-url` becomes `quota.pg-password` (which `CONFIG REWRITE` writes as a line of its
/// own), and a URL in the key=value form or with a space or quote becomes the same settings
/// as a URL, so a rewritten redis.conf loads and logs in the same way.
pub(crate) fn secure_load_args(ctx: Ctx, args: &[RedisString]) -> Result<(), String> {
    let raw: Vec<&[u8]> = args.iter().map(RedisString::as_slice).collect();
    let plan = config::plan_load_args(&raw, &config::text(&config::PG_PASSWORD))
        .map_err(|why| format!("quota: {why}; the module is not loaded"))?;
    if let Some(password) = plan.password {
        config::set_text(&config::PG_PASSWORD, password);
    }
    // Only Redis's copy changes: the setting keeps the value as given (`CONFIG GET` shows
    // it, as it shows `masterauth`); the next start reads the same settings from the copy.
    for (index, text, option) in plan.rewrites {
        let Some(arg) = args.get(index) else {
            continue;
        };
        if !crate::ffi::load_args::replace(ctx.raw(), arg, text.as_bytes()) {
            return Err(format!(
                "quota: cannot rewrite the {option} module argument: give it as a \
                 quota.{option} line in redis.conf instead"
            ));
        }
    }
    Ok(())
}

/// Starts everything once the commands are registered: the caches get their settings, the
/// worker pool and the NOTIFY listener start, the schema deploy is queued, the timers are
/// armed, and the hooks are installed (keyspace and server events, the memory settings, the
/// filter that hides secrets, the shutdown event), each subscribed once, here.
pub(crate) fn start(ctx: Ctx) -> Result<(), String> {
    let threads = config::int(&config::POOL_SIZE).clamp(1, 1024) as usize;
    let queue = config::int(&config::QUEUE_MAX).max(1) as usize;
    super::apply_cache_config();
    worker::start(threads, queue)
        .map_err(|e| format!("quota: cannot start worker threads: {e}"))?;
    notify::restart_listener();
    worker::deploy_soon();
    schedule_cleanup(ctx);
    schedule_deploy(ctx);
    schedule_ledger(ctx);
    super::install_key_hooks(ctx);
    super::watch_memory(ctx);
    let filtered = crate::ffi::secret_filter::register(ctx, config::hide_secret);
    crate::ffi::quiet::watch(ctx, filtered);
    on_shutdown(ctx, shutting_down);
    Ok(())
}

/// Stops the worker pool (waiting a little for the jobs under way) and the NOTIFY listener.
pub(crate) fn stop() {
    worker::stop(Duration::from_millis(500));
    notify::stop_listener();
}

/// Redis is shutting down: the last flush of the usage ledger, while the pool still runs.
fn shutting_down(ctx: Ctx) {
    ledger::flush_and_wait(ctx);
    stop();
}

/// The cleanup of expired credits, every `quota.cleanup-interval` seconds on a master.
fn schedule_cleanup(ctx: Ctx) {
    let interval = config::int(&config::CLEANUP_INTERVAL);
    // When off, look again in a minute in case it is switched on.
    let period = if interval > 0 { interval as u64 } else { 60 };
    after(ctx, Duration::from_secs(period), |ctx| {
        if config::int(&config::CLEANUP_INTERVAL) > 0 && ctx.is_master_role() {
            worker::submit_or_busy(jobs::Job::Cleanup { client: None });
        }
        schedule_cleanup(ctx);
    });
}

/// The ledger's timer: every 100 ms (see `ledger::tick`).
fn schedule_ledger(ctx: Ctx) {
    after(ctx, Duration::from_millis(100), |ctx| {
        ledger::tick(ctx, clock::now_ms(), false);
        schedule_ledger(ctx);
    });
}

/// Every second, deploys the schema in the background while it is not known to be there
/// (`quota.auto-deploy`): at load, and once PostgreSQL can be reached.
fn schedule_deploy(ctx: Ctx) {
    after(ctx, Duration::from_secs(1), |ctx| {
        worker::deploy_soon();
        schedule_deploy(ctx);
    });
}
