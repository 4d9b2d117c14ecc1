//! Log lines an operator can act on, for problems that come and go (PostgreSQL unreachable,
//! ledger flushes failing, the job queue full...): one warning when a problem starts, a summary
//! at most once a minute while it lasts, and one line when it ends. However often the problem
//! is hit, the log gets a handful of lines, never a storm.
//!
//! Callable from any thread. The details given must never hold a password (the store's errors
//! do not).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a problem that lasts is summarised.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// A problem that is either going on or not.
pub(crate) struct Condition {
    /// What the problem is, as the log says it ("PostgreSQL unreachable").
    what: &'static str,
    /// Whether the problem is going on: `recovered` is called on every success (a command's
    /// query, a queued job), so when nothing is wrong it costs one load, not a lock.
    active: AtomicBool,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// When the problem started; `None` when it is not going on.
    since: Option<Instant>,
    /// Failures since it started, and since the last line.
    failures: u64,
    unreported: u64,
    last_line: Option<Instant>,
    last_detail: String,
}

/// What a report leads to: a line to log, or nothing.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    Started(String),
    Continues {
        seconds: u64,
        failures: u64,
        detail: String,
    },
    Ended {
        seconds: u64,
        failures: u64,
        detail: String,
    },
}

impl Condition {
    pub(crate) const fn new(what: &'static str) -> Condition {
        Condition {
            what,
            active: AtomicBool::new(false),
            state: Mutex::new(State {
                since: None,
                failures: 0,
                unreported: 0,
                last_line: None,
                last_detail: String::new(),
            }),
        }
    }

    /// The problem happened (again): logs it when it starts, and a summary at most once a
    /// minute while it lasts. `detail` is only built when a line is written.
    pub(crate) fn failed(&self, detail: impl FnOnce() -> String) {
        let line = self.with_state(|s| {
            self.active.store(true, Ordering::Release);
            s.failed(Instant::now(), detail)
        });
        self.log(line);
    }

    /// The problem is over (if it was going on): logs how long it lasted. Cheap when it was
    /// not going on.
    pub(crate) fn recovered(&self, detail: impl FnOnce() -> String) {
        if !self.is_active() {
            return;
        }
        let line = self.with_state(|s| {
            self.active.store(false, Ordering::Release);
            s.recovered(Instant::now(), detail)
        });
        self.log(line);
    }

    /// Whether the problem is going on (it failed and has not recovered since).
    pub(crate) fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    fn log(&self, line: Option<Line>) {
        if let Some(line) = line {
            warning(&render(self.what, line));
        }
    }
}

/// An error's text for a log line: its wire text without the `ERR ` the client sees.
pub(crate) fn reason(e: &impl std::fmt::Display) -> String {
    let text = e.to_string();
    match text.strip_prefix("ERR ") {
        Some(rest) => rest.to_owned(),
        None => text,
    }
}

/// Logs a line at warning level, from any thread.
pub(crate) fn warning(text: &str) {
    log(redis_module::logging::RedisLogLevel::Warning, text);
}

/// Logs a line at notice level, from any thread.
pub(crate) fn notice(text: &str) {
    log(redis_module::logging::RedisLogLevel::Notice, text);
}

/// `redis_module::logging` hands the text to `RedisModule_Log` as its printf format (a `%` in
/// an id or a server message would read arguments that are not there), panics on a NUL byte
/// and outside Redis (unit tests): none of that may happen here.
fn log(level: redis_module::logging::RedisLogLevel, text: &str) {
    if cfg!(test) {
        return;
    }
    redis_module::logging::log(level, escape(text));
}

/// The text as a printf format that prints it, NUL bytes shown as `\0`.
fn escape(text: &str) -> String {
    text.replace('%', "%%").replace('\0', "\\0")
}

/// The log line, as it reads.
fn render(what: &str, line: Line) -> String {
    match line {
        Line::Started(detail) => format!("quota: {what}: {detail}"),
        Line::Continues {
            seconds,
            failures,
            detail,
        } => format!(
            "quota: {what}: still, for {seconds} s now ({failures} failures since the last \
                 line): {detail}"
        ),
        Line::Ended {
            seconds,
            failures,
            detail,
        } => format!("quota: {what}: over after {seconds} s and {failures} failures: {detail}"),
    }
}

impl State {
    fn failed(&mut self, now: Instant, detail: impl FnOnce() -> String) -> Option<Line> {
        self.failures += 1;
        self.unreported += 1;
        let Some(since) = self.since else {
            self.since = Some(now);
            self.last_line = Some(now);
            self.unreported = 0;
            self.failures = 1;
            self.last_detail = detail();
            return Some(Line::Started(self.last_detail.clone()));
        };
        let due = self
            .last_line
            .is_none_or(|at| now.duration_since(at) >= SUMMARY_EVERY);
        if !due {
            return None;
        }
        self.last_line = Some(now);
        let failures = std::mem::take(&mut self.unreported);
        self.last_detail = detail();
        Some(Line::Continues {
            seconds: now.duration_since(since).as_secs(),
            failures,
            detail: self.last_detail.clone(),
        })
    }

    fn recovered(&mut self, now: Instant, detail: impl FnOnce() -> String) -> Option<Line> {
        let since = self.since.take()?;
        let failures = std::mem::take(&mut self.failures);
        self.unreported = 0;
        self.last_line = None;
        Some(Line::Ended {
            seconds: now.duration_since(since).as_secs(),
            failures,
            detail: detail(),
        })
    }
}

/// The problems the module reports.
pub(crate) mod conditions {
    use crate::runtime::alerts::Condition;

    /// The pool cannot reach PostgreSQL.
    pub(crate) static PG_UNREACHABLE: Condition = Condition::new("PostgreSQL unreachable");
    /// Flushes of the usage ledger fail (PostgreSQL down, or refusing the batches).
    pub(crate) static LEDGER_FLUSH: Condition =
        Condition::new("usage ledger flushes failing (the usage waits in the accounts)");
    /// One account's ledger batch is refused on its own; it is retried alone.
    pub(crate) static LEDGER_BATCH: Condition =
        Condition::new("an account's usage ledger batch refused by PostgreSQL");
    /// The job queue is full: commands that need PostgreSQL get `BUSY`.
    pub(crate) static QUEUE_FULL: Condition =
        Condition::new("job queue full (quota.queue-max): commands that need PostgreSQL get BUSY");
    /// The NOTIFY listener has no connection: changes made elsewhere reach this node's caches
    /// only as their entries expire. Once it listens again, the caches are dropped.
    pub(crate) static NOTIFY_LOST: Condition = Condition::new(
        "NOTIFY listener disconnected (changes made elsewhere reach this node's cache only as \
         entries expire)",
    );
    /// The schema deploy was refused (not for PostgreSQL being unreachable).
    pub(crate) static SCHEMA_DEPLOY: Condition = Condition::new("schema deploy failing");
    /// A job panicked on a worker thread (a bug; the worker goes on).
    pub(crate) static WORKER_PANIC: Condition = Condition::new("worker jobs panicking");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_problem_logs_once_when_it_starts_a_summary_a_minute_and_once_when_it_ends() {
        let mut s = State::default();
        let t0 = Instant::now();
        assert_eq!(
            s.failed(t0, || "refused".into()),
            Some(Line::Started("refused".into()))
        );
        // 300 failures within a minute: nothing more.
        for i in 1..=300u64 {
            let at = t0 + Duration::from_millis(i * 100);
            assert_eq!(s.failed(at, || unreachable!()), None);
        }
        let later = t0 + Duration::from_secs(61);
        assert_eq!(
            s.failed(later, || "still refused".into()),
            Some(Line::Continues {
                seconds: 61,
                failures: 301,
                detail: "still refused".into()
            })
        );
        assert_eq!(
            s.failed(later + Duration::from_secs(1), || unreachable!()),
            None
        );
        let end = later + Duration::from_secs(5);
        assert_eq!(
            s.recovered(end, || "back".into()),
            Some(Line::Ended {
                seconds: 66,
                failures: 303,
                detail: "back".into()
            })
        );
        // Recovered when it was not going on: nothing.
        assert_eq!(s.recovered(end, || unreachable!()), None);
        // A new problem starts a new line.
        assert_eq!(
            s.failed(end, || "again".into()),
            Some(Line::Started("again".into()))
        );
    }

    #[test]
    fn lines_read_as_the_readme_says() {
        let what = "PostgreSQL unreachable";
        assert_eq!(
            render(what, Line::Started("error connecting to server".into())),
            "quota: PostgreSQL unreachable: error connecting to server"
        );
        assert_eq!(
            render(
                what,
                Line::Continues {
                    seconds: 61,
                    failures: 300,
                    detail: "still refused".into()
                }
            ),
            "quota: PostgreSQL unreachable: still, for 61 s now (300 failures since the last \
             line): still refused"
        );
        assert_eq!(
            render(
                what,
                Line::Ended {
                    seconds: 66,
                    failures: 303,
                    detail: "PostgreSQL answers again".into()
                }
            ),
            "quota: PostgreSQL unreachable: over after 66 s and 303 failures: PostgreSQL \
             answers again"
        );
    }

    #[test]
    fn a_reason_is_the_error_without_its_err() {
        assert_eq!(
            reason(&"ERR PostgreSQL unavailable: refused"),
            "PostgreSQL unavailable: refused"
        );
        assert_eq!(reason(&"BUSY queue full"), "BUSY queue full");
    }

    #[test]
    fn log_text_is_a_format_that_prints_it() {
        assert_eq!(escape("user 100%s\0x"), "user 100%%s\\0x");
    }

    #[test]
    fn recovered_costs_nothing_when_nothing_went_wrong() {
        static C: Condition = Condition::new("test condition");
        assert!(!C.is_active());
        C.recovered(|| unreachable!("nothing to end"));
        C.failed(|| "down".into());
        assert!(C.is_active());
        C.recovered(|| "up".into());
        assert!(!C.is_active());
    }
}
