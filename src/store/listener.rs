//! The LISTEN/NOTIFY listener: one dedicated thread with its own connection (not from the pool)
//! that turns the triggers' notifications into "this user's cached credits are stale" events.
//!
//! Owns the listener thread, its reconnect loop and the parsing of notification payloads. Must
//! not touch the cache or Redis: it only calls the callback it was given, from its own thread,
//! and the callback decides what to do. Messages it reports never contain the URL or password.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use postgres::fallible_iterator::FallibleIterator;
use serde::Deserialize;

use super::backoff::Backoff;
use super::error::{describe, is_own_origin};
use super::passfile::Credentials;
use super::pool::{
    apply_credentials, bounded_timeout, connection_config, scrub, secret_of, Target,
};
use super::schema::{channel, validate_schema};

/// How long one wait for notifications lasts; also the longest the thread goes without looking
/// at the stop signal (except while connecting, which is bounded by the timeout).
const TICK: Duration = Duration::from_millis(250);
/// Without traffic, the connection is checked this often so that a dead server is noticed.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(5);
/// First and largest wait between reconnect attempts (before jitter).
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// A connection that lasted this long resets the backoff (a flapping one does not).
const STABLE_AFTER: Duration = Duration::from_secs(5);
/// The `application_name` of the listener connection.
const APPLICATION_NAME: &str = "redis-quota-listener";

/// What the listener reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ListenerEvent {
    /// A user's credits or a named policy changed (committed elsewhere or here).
    Changed {
        entry: Entry,
        tenant: String,
        project: String,
        /// The user id or the policy name.
        id: String,
        /// Written by this process (a write this node made and already wrote through to its
        /// cache): the payload carries this process's origin id.
        own: bool,
    },
    /// Listening (again). Notifications may have been missed while disconnected, so the owner
    /// should treat every cached entry as stale.
    Connected,
    /// The connection failed or was lost; the listener keeps retrying with backoff. Reported
    /// when a connection is lost, and on failed attempts only when the reason changes.
    Disconnected(String),
}

/// The running listener thread. Dropping it (or `stop`) signals the thread and joins it.
pub(crate) struct Listener {
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// The receiving side of the callback; must not block for long (it runs on the listener thread).
type Callback = Box<dyn Fn(ListenerEvent) + Send + 'static>;

impl Listener {
    /// Starts the thread: connect with `url` (TLS as its `sslmode` says), `LISTEN
    /// "<schema>_quota_changed"`, report events
    /// to `on_event`, reconnect on failure. Fails only if the schema name is invalid or the
    /// thread cannot be spawned; connection problems are reported as `Disconnected` events.
    pub(crate) fn spawn(
        url: String,
        credentials: Credentials,
        schema: String,
        timeout_ms: u64,
        on_event: Callback,
    ) -> std::io::Result<Listener> {
        validate_schema(&schema)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(1);
        let thread = thread::Builder::new()
            .name("quota-listener".into())
            .spawn(move || run(&url, &credentials, &schema, timeout_ms, &on_event, &stop_rx))?;
        Ok(Listener {
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// Stops the thread and waits for it (at most about one tick, or one connect timeout if it
    /// is connecting).
    pub(crate) fn stop(self) {
        drop(self);
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Disconnecting the channel is the stop signal.
        self.stop.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Whether the owner asked the thread to end.
fn stopped(stop: &Receiver<()>) -> bool {
    !matches!(stop.try_recv(), Err(TryRecvError::Empty))
}

/// Sleeps up to `d`, returning early (true) when stopped.
fn sleep_or_stop(stop: &Receiver<()>, d: Duration) -> bool {
    !matches!(stop.recv_timeout(d), Err(RecvTimeoutError::Timeout))
}

/// Calls the owner's callback; a panic in it must not kill the listener.
fn emit(on_event: &Callback, event: ListenerEvent) {
    let _ = catch_unwind(AssertUnwindSafe(|| on_event(event)));
}

/// What changed: a replenishment row of a user, or a named policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    User,
    Policy,
}

/// The notification payload written by the triggers (`user_id` for credits, `policy` for
/// named policies; `origin` the writer's origin id, when a node wrote it).
#[derive(Deserialize)]
struct Payload {
    tenant: String,
    project: String,
    user_id: Option<String>,
    policy: Option<String>,
    origin: Option<String>,
}

/// Parses a trigger payload (`{"tenant":..,"project":..,"user_id":..,"bundle_id":..,"op":..}`
/// for credits, `{"tenant":..,"project":..,"policy":..,"op":..}` for named policies); `None`
/// for anything else (a foreign `NOTIFY` on the channel).
pub(crate) fn parse_payload(text: &str) -> Option<ListenerEvent> {
    let p: Payload = serde_json::from_str(text).ok()?;
    let (entry, id) = match (p.user_id, p.policy) {
        (Some(user), None) => (Entry::User, user),
        (None, Some(name)) => (Entry::Policy, name),
        _ => return None,
    };
    Some(ListenerEvent::Changed {
        entry,
        tenant: p.tenant,
        project: p.project,
        id,
        own: is_own_origin(p.origin.as_deref()),
    })
}

/// How a session ended.
enum SessionEnd {
    /// The owner asked to stop.
    Stopped,
    /// Never connected (or never listened).
    Failed(String),
    /// Was listening, then lost the connection after this long.
    Lost(String, Duration),
}

fn run(
    url: &str,
    credentials: &Credentials,
    schema: &str,
    timeout_ms: u64,
    on_event: &Callback,
    stop: &Receiver<()>,
) {
    let target = match connection_config(url, timeout_ms, APPLICATION_NAME) {
        Ok(target) => target,
        Err(err) => {
            // Retrying cannot fix the URL: report once and wait for the stop signal.
            emit(on_event, ListenerEvent::Disconnected(err.to_string()));
            let _ = stop.recv();
            return;
        }
    };
    let mut secret = secret_of(&target.config);
    let channel = channel(schema);
    let check_timeout = bounded_timeout(timeout_ms).clamp(TICK, HEALTH_CHECK_EVERY);
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    let mut last_reported: Option<String> = None;
    loop {
        if stopped(stop) {
            return;
        }
        // The password is looked up at every attempt, so a rotated password file applies. One
        // that cannot be used is reported by the pool's owner; without it, connecting fails
        // with PostgreSQL's own reason.
        if secret.is_none() {
            let mut probe = target.config.clone();
            let _ = apply_credentials(&mut probe, credentials);
            secret = secret_of(&probe);
        }
        let reason = match session(
            &target,
            credentials,
            &channel,
            check_timeout,
            on_event,
            stop,
        ) {
            SessionEnd::Stopped => return,
            SessionEnd::Failed(reason) => {
                let reason = scrub(reason, secret.as_deref());
                if last_reported.as_deref() != Some(reason.as_str()) {
                    emit(on_event, ListenerEvent::Disconnected(reason.clone()));
                }
                reason
            }
            SessionEnd::Lost(reason, lasted) => {
                let reason = scrub(reason, secret.as_deref());
                if lasted >= STABLE_AFTER {
                    backoff.reset();
                }
                emit(on_event, ListenerEvent::Disconnected(reason.clone()));
                reason
            }
        };
        last_reported = Some(reason);
        if sleep_or_stop(stop, backoff.next_wait()) {
            return;
        }
    }
}

/// One connection: connect, LISTEN, report notifications until the connection fails or the
/// owner stops the listener.
fn session(
    target: &Target,
    credentials: &Credentials,
    channel: &str,
    check_timeout: Duration,
    on_event: &Callback,
    stop: &Receiver<()>,
) -> SessionEnd {
    let mut client = match target.connect(credentials) {
        Ok(client) => client,
        Err(reason) => return SessionEnd::Failed(reason),
    };
    // The channel is `<validated schema>_quota_changed`: safe to quote as an identifier.
    if let Err(e) = client.batch_execute(&format!("LISTEN \"{channel}\"")) {
        return SessionEnd::Failed(describe(&e));
    }
    let connected_at = Instant::now();
    emit(on_event, ListenerEvent::Connected);
    let mut last_heard = Instant::now();
    loop {
        if stopped(stop) {
            return SessionEnd::Stopped;
        }
        let next = client.notifications().timeout_iter(TICK).next();
        match next {
            Ok(Some(note)) => {
                last_heard = Instant::now();
                if let Some(event) = parse_payload(note.payload()) {
                    emit(on_event, event);
                }
            }
            Ok(None) => {
                // Either nothing arrived within the tick or the server went away.
                if client.is_closed() {
                    return SessionEnd::Lost("connection closed".into(), connected_at.elapsed());
                }
                if last_heard.elapsed() >= HEALTH_CHECK_EVERY {
                    if let Err(e) = client.is_valid(check_timeout) {
                        return SessionEnd::Lost(describe(&e), connected_at.elapsed());
                    }
                    last_heard = Instant::now();
                }
            }
            Err(e) => return SessionEnd::Lost(describe(&e), connected_at.elapsed()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn payloads_parse_into_changes() {
        let text = r#"{"tenant" : "t", "project" : "p\"q", "user_id" : "ü", "bundle_id" : "*", "op" : "UPDATE"}"#;
        assert_eq!(
            parse_payload(text),
            Some(ListenerEvent::Changed {
                entry: Entry::User,
                tenant: "t".into(),
                project: "p\"q".into(),
                id: "ü".into(),
                own: false,
            })
        );
        assert_eq!(
            parse_payload(r#"{"tenant":"t","project":"p","policy":"pro","op":"DELETE"}"#),
            Some(ListenerEvent::Changed {
                entry: Entry::Policy,
                tenant: "t".into(),
                project: "p".into(),
                id: "pro".into(),
                own: false,
            })
        );
        assert_eq!(parse_payload("hello"), None);
        assert_eq!(parse_payload(r#"{"tenant":"t"}"#), None);
        assert_eq!(parse_payload(""), None);
    }

    #[test]
    fn own_writes_are_told_by_their_origin() {
        let own = format!(
            r#"{{"tenant":"t","project":"p","user_id":"u","origin":"{}"}}"#,
            crate::store::error::origin()
        );
        let other = r#"{"tenant":"t","project":"p","user_id":"u","origin":"0123456789abcdef"}"#;
        let sql = r#"{"tenant":"t","project":"p","user_id":"u","origin":null}"#;
        let is_own = |text: &str| {
            matches!(
                parse_payload(text),
                Some(ListenerEvent::Changed { own: true, .. })
            )
        };
        assert!(is_own(&own));
        assert!(!is_own(other));
        assert!(!is_own(sql));
        assert_eq!(crate::store::error::origin().len(), 16);
    }

    #[test]
    fn invalid_schema_is_refused() {
        let r = Listener::spawn(
            "host=h".into(),
            Credentials::default(),
            "Bad".into(),
            100,
            Box::new(|_| {}),
        );
        assert!(r.is_err());
    }

    /// A listener on `url` (schema `s`) whose events are recorded.
    fn recording(url: &str, timeout_ms: u64) -> (Listener, Arc<Mutex<Vec<ListenerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&seen);
        let listener = Listener::spawn(
            url.into(),
            Credentials::default(),
            "s".into(),
            timeout_ms,
            Box::new(move |e| sink.lock().unwrap().push(e)),
        )
        .unwrap();
        (listener, seen)
    }

    #[test]
    fn bad_url_reports_once_and_stops_promptly() {
        let (listener, seen) = recording("postgres://u:hunter2@[::1", 100);
        let started = Instant::now();
        while seen.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(5) {
            thread::sleep(Duration::from_millis(10));
        }
        let stop_started = Instant::now();
        listener.stop();
        assert!(stop_started.elapsed() < Duration::from_secs(1));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        match &seen[0] {
            ListenerEvent::Disconnected(reason) => assert!(!reason.contains("hunter2"), "{reason}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn unreachable_server_is_reported_and_stop_is_prompt() {
        // Port 1 on localhost refuses at once.
        let (listener, seen) = recording("host=127.0.0.1 port=1 user=u password=hunter2", 200);
        thread::sleep(Duration::from_millis(800));
        let stop_started = Instant::now();
        listener.stop();
        assert!(stop_started.elapsed() < Duration::from_millis(600));
        let seen = seen.lock().unwrap();
        // Several attempts failed for the same reason: reported once.
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(
            matches!(&seen[0], ListenerEvent::Disconnected(r) if r.contains("error connecting")),
            "{seen:?}"
        );
    }
}
