//! Process-wide state of the module: the shared caches and their epochs, the job types and
//! the worker pool, the NOTIFY listener, the clock, the configuration and `INFO` counters.
//! It runs Postgres work through `store` and answers blocked clients through `ffi`; it never
//! names a command.

pub(crate) mod cache;
pub(crate) mod clock;
pub(crate) mod config;
mod flush_list;
pub(crate) mod jobs;
pub(crate) mod ledger;
pub(crate) mod notify;
pub(crate) mod stats;
pub(crate) mod worker;

use cache::{cache, cache_config, policies};
use notify::restart_listener;

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
        "cache-ttl-ms" | "negative-ttl-ms" | "cache-max-entries" => {
            cache().set_config(cache_config());
            policies().set_config(cache_config());
        }
        "auto-deploy" => {
            worker::rebuild_backend();
            worker::deploy_soon();
        }
        _ => {}
    }
}
