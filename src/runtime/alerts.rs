//! Log lines an operator can act on, for problems that come and go (PostgreSQL unreachable,
//! ledger flushes failing, the job queue full...): one warning when a problem starts, a summary
//! at most once a minute while it lasts, and one line when it ends. However often the problem
//! is hit, the log gets a handful of lines, never a storm.
//!
//! Callable from any thread. The details given must never hold a password (the store's errors
//! do not).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often a problem that lasts is summarised.
const SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// A problem that is either going on or not.
pub(crate) struct Condition {
    /// What the problem is, as the log says it ("PostgreSQL unreachable").
    what: &'static str,
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
        let line = self.with_state(|s| s.failed(Instant::now(), detail));
        self.log(line);
    }

    /// The problem is over (if it was going on): logs how long it lasted.
    pub(crate) fn recovered(&self, detail: impl FnOnce() -> String) {
        let line = self.with_state(|s| s.recovered(Instant::now(), detail));
        self.log(line);
    }

    fn with_state<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut state)
    }

    fn log(&self, line: Option<Line>) {
        let Some(line) = line else {
            return;
        };
        let what = self.what;
        let text = match line {
            Line::Started(detail) => format!("quota: {what}: {detail}"),
            Line::Continues {
                seconds,
                failures,
                detail,
            } => format!(
                "quota: {what} for {seconds} s ({failures} failures since the last line): {detail}"
            ),
            Line::Ended {
                seconds,
                failures,
                detail,
            } => format!(
                "quota: no longer {what}, after {seconds} s and {failures} failures: {detail}"
            ),
        };
        redis_module::logging::log_warning(text);
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
}
