//! The NOTIFY listener's lifecycle and state: (re)started from the configuration, it keeps
//! the caches in step with changes other nodes write to PostgreSQL.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use super::alerts::conditions;
use super::cache::{cache, policies};
use super::{config, stats, worker};
use crate::core::cache::{Cache, CacheValue};
use crate::core::ids::{policy_key, user_key};
use crate::store::listener::{Entry, Listener, ListenerEvent};

/// NOTIFY listener state, for `INFO quota`.
pub(crate) static NOTIFY_STATE: AtomicU8 = AtomicU8::new(NOTIFY_OFF);
pub(crate) const NOTIFY_OFF: u8 = 0;
pub(crate) const NOTIFY_CONNECTING: u8 = 1;
pub(crate) const NOTIFY_LISTENING: u8 = 2;
pub(crate) const NOTIFY_DISCONNECTED: u8 = 3;

/// The state's name for `INFO quota`.
pub(crate) fn notify_state_name() -> &'static str {
    match NOTIFY_STATE.load(Ordering::Relaxed) {
        NOTIFY_CONNECTING => "connecting",
        NOTIFY_LISTENING => "listening",
        NOTIFY_DISCONNECTED => "disconnected",
        _ => "off",
    }
}

static LISTENER: Mutex<Option<Listener>> = Mutex::new(None);

/// (Re)starts the NOTIFY listener from the configuration, or stops it when `quota.notify` is
/// off or no `quota.pg-url` is set. It connects with `quota.listen-url`, or `quota.pg-url`
/// when that is empty, with the same password sources. The old listener is stopped on a
/// thread of its own so the caller (the Redis main thread) never waits for it.
pub(crate) fn restart_listener() {
    let old = LISTENER.lock().ok().and_then(|mut l| l.take());
    if let Some(old) = old {
        let _ = std::thread::Builder::new()
            .name("quota-listener-stop".into())
            .spawn(move || old.stop());
    }
    let pool_url = config::text(&config::PG_URL);
    let url = match config::text(&config::LISTEN_URL) {
        listen if listen.is_empty() => pool_url.clone(),
        listen => listen,
    };
    if !config::flag(&config::NOTIFY) || pool_url.is_empty() {
        NOTIFY_STATE.store(NOTIFY_OFF, Ordering::Relaxed);
        conditions::NOTIFY_LOST.recovered(|| "the listener is off (quota.notify no)".into());
        return;
    }
    NOTIFY_STATE.store(NOTIFY_CONNECTING, Ordering::Relaxed);
    let schema = config::text(&config::SCHEMA);
    let timeout = config::int(&config::PG_TIMEOUT_MS).max(1) as u64;
    let on_event = Box::new(|event: ListenerEvent| match event {
        ListenerEvent::Changed {
            entry,
            tenant,
            project,
            id,
            own,
        } => match entry {
            Entry::User => heard(&mut cache(), &user_key(&tenant, &project, &id), own),
            Entry::Policy => heard(&mut policies(), &policy_key(&tenant, &project, &id), own),
        },
        ListenerEvent::Connected => {
            // Notifications may have been missed while disconnected: forget everything.
            NOTIFY_STATE.store(NOTIFY_LISTENING, Ordering::Relaxed);
            let credits = drop_all(&mut cache());
            // PostgreSQL is reachable (again): it may not hold the schema (first start, a
            // restored or replaced server).
            worker::redeploy();
            let named = drop_all(&mut policies());
            conditions::NOTIFY_LOST.recovered(|| {
                format!(
                    "listening again; dropped the cache ({credits} users' credits and {named} \
                     policies), since changes may have been missed"
                )
            });
        }
        ListenerEvent::Disconnected(reason) => {
            stats::NOTIFY_RECONNECTS.incr();
            NOTIFY_STATE.store(NOTIFY_DISCONNECTED, Ordering::Relaxed);
            conditions::NOTIFY_LOST.failed(|| {
                format!(
                    "{reason}; reconnecting with backoff (0.1 s doubling to 5 s, jittered); the \
                     cache is dropped once it is back"
                )
            });
        }
    });
    match Listener::spawn(url, config::credentials(), schema, timeout, on_event) {
        Ok(listener) => {
            if let Ok(mut slot) = LISTENER.lock() {
                *slot = Some(listener);
            }
        }
        Err(e) => {
            NOTIFY_STATE.store(NOTIFY_DISCONNECTED, Ordering::Relaxed);
            conditions::NOTIFY_LOST.failed(|| format!("cannot start the listener: {e}"));
        }
    }
}

/// Drops every entry of `cache`; how many there were.
fn drop_all<W, V: CacheValue>(cache: &mut Cache<W, V>) -> usize {
    let entries = cache.len();
    cache.clear();
    entries
}

/// A change to the entry `key` was heard. When this node wrote it, it already refreshed its
/// entry: marking it stale settles any race between concurrent writes without making anyone
/// wait. Otherwise the entry is dropped.
fn heard<W, V: CacheValue>(cache: &mut Cache<W, V>, key: &[u8], own: bool) {
    stats::NOTIFY_RECEIVED.incr();
    if own {
        cache.mark_stale(key);
    } else {
        cache.invalidate(key);
    }
}

/// Stops the listener and waits for it (module unload and shutdown only).
pub(crate) fn stop_listener() {
    let old = LISTENER.lock().ok().and_then(|mut l| l.take());
    if let Some(old) = old {
        old.stop();
    }
    NOTIFY_STATE.store(NOTIFY_OFF, Ordering::Relaxed);
}
