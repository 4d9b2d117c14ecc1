//! Client-side statement timeouts: a statement still running when its deadline passes is
//! cancelled with a PostgreSQL cancel request, and the connection it ran on is not reused.
//!
//! Why client-side: a transaction pooler (PgBouncer in transaction mode) hands each
//! transaction a server connection of its own, so a session's `SET statement_timeout` bounds
//! nothing. Write transactions bound themselves with `SET LOCAL`; single-statement reads, which
//! run in no transaction of their own, are bounded here instead of paying three more round trips
//! for `BEGIN`, `SET LOCAL` and `COMMIT`.
//!
//! Owns one thread per pool that sleeps until the earliest deadline it knows of (and waits
//! untimed while nothing is armed), woken about once per timeout while reads run. Arming and
//! disarming take one short lock each (about a microsecond together, against a read's few
//! hundred). Must not run
//! statements or touch connections beyond sending the cancel request.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::{CancelToken, NoTls};

use super::tls::MakeRustls;

/// How to cancel what one connection is running.
#[derive(Clone)]
pub(crate) struct Canceller {
    pub token: CancelToken,
    /// The TLS the connection uses (a cancel request goes the same way).
    pub tls: Option<MakeRustls>,
    /// Set once a cancel was sent: a late cancel could hit the connection's next statement,
    /// so the pool drops it instead of lending it again.
    pub fired: Arc<AtomicBool>,
}

impl Canceller {
    fn cancel(&self) {
        let _ = match &self.tls {
            Some(tls) => self.token.cancel_query(tls.clone()),
            None => self.token.cancel_query(NoTls),
        };
    }
}

struct Armed {
    id: u64,
    deadline: Instant,
    canceller: Arc<Canceller>,
}

#[derive(Default)]
struct State {
    armed: Vec<Armed>,
    next_id: u64,
    stop: bool,
    /// When the thread wakes by itself (`None`: it waits to be woken).
    wakes_at: Option<Instant>,
}

#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

/// The timer thread of one pool. Dropping it stops the thread.
pub(crate) struct Watchdog {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// While alive, the statement it guards is cancelled at the deadline; dropping it disarms.
pub(crate) struct Guard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Watchdog {
    /// Starts the timer thread (it sleeps until something is armed).
    pub(crate) fn start() -> std::io::Result<Watchdog> {
        let shared = Arc::new(Shared::default());
        let inner = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("quota-pg-timer".into())
            .spawn(move || run(&inner))?;
        Ok(Watchdog {
            shared,
            thread: Some(thread),
        })
    }

    /// Cancels through `canceller` if the guard is still alive after `timeout`.
    pub(crate) fn arm(&self, timeout: Duration, canceller: &Arc<Canceller>) -> Guard<'_> {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        let id = state.next_id;
        state.next_id = state.next_id.wrapping_add(1);
        let deadline = Instant::now() + timeout;
        // The thread needs waking only if it would sleep past this deadline; with one timeout
        // for all, deadlines only move forward, so that is about once per timeout.
        let wake = state.wakes_at.is_none_or(|at| deadline < at);
        state.armed.push(Armed {
            id,
            deadline,
            canceller: Arc::clone(canceller),
        });
        drop(state);
        if wake {
            self.shared.wake.notify_one();
        }
        Guard {
            shared: &self.shared,
            id,
        }
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = state.armed.iter().position(|a| a.id == self.id) {
            state.armed.swap_remove(i);
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Ok(mut state) = self.shared.state.lock() {
            state.stop = true;
        }
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(shared: &Shared) {
    let mut state = shared.state.lock().unwrap_or_else(|p| p.into_inner());
    loop {
        if state.stop {
            return;
        }
        let now = Instant::now();
        let Some(earliest) = state.armed.iter().map(|a| a.deadline).min() else {
            state.wakes_at = None;
            state = shared.wake.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        };
        if earliest > now {
            state.wakes_at = Some(earliest);
            state = shared
                .wake
                .wait_timeout(state, earliest - now)
                .map(|(s, _)| s)
                .unwrap_or_else(|p| p.into_inner().0);
            continue;
        }
        let (due, kept): (Vec<Armed>, Vec<Armed>) =
            state.armed.drain(..).partition(|a| a.deadline <= now);
        state.armed = kept;
        for armed in due {
            armed.canceller.fired.store(true, Ordering::Release);
            // A cancel request opens a connection of its own, which may take up to the
            // connect timeout: never on this thread.
            let canceller = armed.canceller;
            let _ = std::thread::Builder::new()
                .name("quota-pg-cancel".into())
                .spawn(move || canceller.cancel());
        }
    }
}
