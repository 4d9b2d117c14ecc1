//! Process-wide state of the module: the shared caches and their epochs, the job types and
//! the worker pool, the NOTIFY listener, the clock, the configuration, the `INFO` counters and
//! fields, and the start and stop of all of it (`lifecycle`: timers, hooks, load arguments).
//! It runs Postgres work through `store` and answers blocked clients through `ffi`; it never
//! names a command.

pub(crate) mod alerts;
pub(crate) mod cache;
pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod gather;
pub(crate) mod health;
pub(crate) mod info;
pub(crate) mod jobs;
pub(crate) mod ledger;
pub(crate) mod lifecycle;
pub(crate) mod memory;
pub(crate) mod notify;
pub(crate) mod policy_memo;
pub(crate) mod stats;
pub(crate) mod worker;

use cache::{cache, policies};
use notify::restart_listener;

/// Follows account values through the keyspace (see `ledger`) and watches the settings that
/// matter to the module (see `memory`): subscribed once, at load.
pub(crate) fn install_key_hooks(ctx: crate::ffi::ctx::Ctx) {
    crate::ffi::key_events::install(
        ctx,
        crate::ffi::key_events::Hooks {
            key: ledger::moves::on_key_event,
            unlinked: ledger::moves::on_unlinked,
            swapped: ledger::moves::on_swapdb,
            flushing: ledger::moves::on_flushdb,
            configured: |ctx, names| {
                if memory::concerns(names) {
                    watch_memory(ctx);
                }
            },
        },
    );
}

/// Reads Redis's memory settings again and gives both caches their new byte budget.
pub(crate) fn watch_memory(ctx: crate::ffi::ctx::Ctx) {
    memory::refresh(ctx);
    apply_cache_config();
}

/// Gives both caches their tunables from the configuration.
fn apply_cache_config() {
    cache().set_config(cache::cache_config());
    policies().set_config(cache::cache_config());
}

/// Applies a changed option (the name with or without the `quota.` prefix).
pub(crate) fn reconfigure(name: &str) {
    if !worker::is_running() {
        return; // still loading: `init` applies everything once.
    }
    match name.trim_start_matches("quota.") {
        "pg-url" | "pg-password" | "pg-passfile" | "schema" => {
            // Another database or schema: nothing cached so far is known to hold there.
            worker::rebuild_backend();
            cache().clear();
            policies().clear();
            restart_listener();
            worker::deploy_soon();
        }
        "pg-timeout-ms" => {
            worker::rebuild_backend();
            restart_listener();
        }
        "notify" | "listen-url" => restart_listener(),
        "cache-ttl-ms" | "negative-ttl-ms" | "cache-max-entries" | "cache-max-memory" => {
            apply_cache_config();
        }
        "auto-deploy" => {
            worker::rebuild_backend();
            worker::deploy_soon();
        }
        _ => {}
    }
}
