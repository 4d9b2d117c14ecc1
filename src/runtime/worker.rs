//! The job queue and the pool threads that run every Postgres call.
//!
//! The main thread submits jobs with `submit` (never blocking: a full queue hands the job back
//! and the caller answers `BUSY`). A fixed set of threads takes jobs from a bounded crossbeam
//! channel, runs them against the current `Store`, updates the cache (write-through, single
//! flight completion) and hands outcomes to blocked clients with `Blocked::finish`. Workers
//! never decide admission and never touch keys: the main thread does, in the reply callback.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender, TrySendError};

use super::alerts::{self, conditions};
use super::cache;
use super::clock;
use super::config;
use super::health;
use super::jobs::{Done, FlushOutcome, Job, KeyBatch, LoadJob, Waiter};
use super::stats;
use crate::core::cache::UserCredits;
use crate::core::credit::{GrantRequest, Replenishment};
use crate::core::ids::{account_of_key, user_key, OwnedAccount, OwnedPolicy, OwnedUser, UserId};
use crate::core::policy::{CachedPolicy, Limits, PolicyRecord};
use crate::core::Millis;
use crate::store::backoff::Backoff;
use crate::store::{
    AccountBatch, BatchOutcome, CleanupOutcome, GrantOutcome, RevokeOutcome, Store, StoreConfig,
    StoreError,
};

/// Most user loads one query serves (a burst of cold users shares round trips).
const LOAD_BATCH: usize = 64;

/// Queues the loads a gather started; if the queue is full their flights are dropped and
/// their waiters answered `BUSY`.
pub(crate) fn submit_load(job: LoadJob) {
    let Err(Job::Load(job)) = submit(Job::Load(Box::new(job))) else {
        return;
    };
    // Not run: if it was the probe of a PostgreSQL taken as down, the next miss probes.
    health::not_probed();
    if let Some((policy, flight)) = &job.policy {
        for waiter in cache::policies().abort_flight(&policy.id().key(), *flight) {
            waiter.abort(Done::Busy);
        }
    }
    if let Some(load) = &job.credits {
        for waiter in cache::cache().abort_flight(&load.key, load.flight) {
            waiter.abort(Done::Busy);
        }
    }
}

/// Queues a job that answers a blocked client; answers it `BUSY` when the queue is full.
pub(crate) fn submit_or_busy(job: Job) {
    if let Err(job) = submit(job) {
        if let Some(client) = job.into_client() {
            client.finish(Done::Busy);
        }
    }
}

/// The store in use and whether the schema has been deployed through it.
struct Backend {
    store: Store,
    deployed: AtomicBool,
    /// Held while deploying, so that a background deploy and a command's never both run.
    deploying: Mutex<()>,
}

/// A `Job::Deploy` is queued and not started yet.
static DEPLOY_QUEUED: AtomicBool = AtomicBool::new(false);

/// First and largest wait between two background deploys that found PostgreSQL unreachable
/// (before jitter: see `DeployRetry`).
const DEPLOY_RETRY_MIN: Duration = Duration::from_secs(1);
const DEPLOY_RETRY_MAX: Duration = Duration::from_secs(8);

/// When the background deploy may be tried again. A fleet started while PostgreSQL was down
/// retries on jittered waits (1 s doubling to 8 s, each drawn from the upper half of its
/// step), so the nodes do not all deploy in the same second once it is back: each deploy takes
/// the deploy lock and waits behind the others'.
struct DeployRetry {
    backoff: Backoff,
    not_before: Option<Instant>,
}

static DEPLOY_RETRY: Mutex<Option<DeployRetry>> = Mutex::new(None);

fn with_deploy_retry<T>(f: impl FnOnce(&mut DeployRetry) -> T) -> T {
    let mut slot = DEPLOY_RETRY.lock().unwrap_or_else(|p| p.into_inner());
    let retry = slot.get_or_insert_with(|| DeployRetry {
        backoff: Backoff::new(DEPLOY_RETRY_MIN, DEPLOY_RETRY_MAX),
        not_before: None,
    });
    f(retry)
}

/// Queues a deploy of the schema unless `quota.auto-deploy` is off, no store is configured, it
/// is known to be deployed, a deploy is already queued, or the last one found PostgreSQL
/// unreachable and its retry wait is not over. Never blocks: called at load, after the
/// listener (re)connects, after a change of `quota.pg-url` or `quota.schema`, and every second
/// while the schema is not known to be there.
pub(crate) fn deploy_soon() {
    let wanted = config::flag(&config::AUTO_DEPLOY)
        && backend().is_some_and(|b| !b.deployed.load(Ordering::Acquire))
        && with_deploy_retry(|r| r.not_before.is_none_or(|at| Instant::now() >= at));
    if wanted && !DEPLOY_QUEUED.swap(true, Ordering::AcqRel) && submit(Job::Deploy).is_err() {
        DEPLOY_QUEUED.store(false, Ordering::Release);
    }
}

/// Deploys at the next `deploy_soon`, whatever the last attempt found (a new store, or
/// PostgreSQL known to be back).
fn deploy_retry_reset() {
    with_deploy_retry(|r| {
        r.backoff.reset();
        r.not_before = None;
    });
}

/// PostgreSQL is reachable again after an outage: it may have lost the schema (a restored
/// backup, a replacement server), so deploy again.
pub(crate) fn redeploy() {
    if let Some(backend) = backend() {
        backend.deployed.store(false, Ordering::Release);
    }
    deploy_retry_reset();
    deploy_soon();
}

static BACKEND: RwLock<Option<Arc<Backend>>> = RwLock::new(None);
static SENDER: OnceLock<Sender<Job>> = OnceLock::new();
static THREADS: Mutex<Vec<JoinHandle<()>>> = Mutex::new(Vec::new());
static STOPPING: AtomicBool = AtomicBool::new(false);

/// Whether the pool has been started.
pub(crate) fn is_running() -> bool {
    SENDER.get().is_some() && !STOPPING.load(Ordering::Relaxed)
}

/// Starts `threads` workers over a queue of `queue_max` jobs, and builds the store.
pub(crate) fn start(threads: usize, queue_max: usize) -> std::io::Result<()> {
    rebuild_backend();
    let (tx, rx) = bounded::<Job>(queue_max.max(1));
    let mut handles = Vec::with_capacity(threads);
    for i in 0..threads.max(1) {
        let rx = rx.clone();
        handles.push(
            std::thread::Builder::new()
                .name(format!("quota-worker-{i}"))
                .spawn(move || run(rx))?,
        );
    }
    let _ = SENDER.set(tx);
    if let Ok(mut slot) = THREADS.lock() {
        slot.extend(handles);
    }
    Ok(())
}

/// Stops the workers: queued jobs are answered with `Done::Dropped`; waits up to `wait` for
/// the threads (one stuck in a Postgres call is left to finish on its own).
pub(crate) fn stop(wait: Duration) {
    STOPPING.store(true, Ordering::Relaxed);
    for waiter in cache::cache().take_all_waiters() {
        waiter.abort(Done::Dropped);
    }
    for waiter in cache::policies().take_all_waiters() {
        waiter.abort(Done::Dropped);
    }
    let deadline = Instant::now() + wait;
    let handles = THREADS
        .lock()
        .map(|mut t| std::mem::take(&mut *t))
        .unwrap_or_default();
    for handle in handles {
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if handle.is_finished() {
            let _ = handle.join();
        }
    }
}

/// Queues a job without blocking; gives it back when the queue is full or stopped.
pub(crate) fn submit(job: Job) -> Result<(), Job> {
    if STOPPING.load(Ordering::Relaxed) {
        return Err(job);
    }
    let Some(tx) = SENDER.get() else {
        return Err(job);
    };
    match tx.try_send(job) {
        Ok(()) => {
            // Over once the queue has drained to half: a queue that stays about full (each
            // job that finishes lets one more in) is one problem, not a line per free slot.
            if conditions::QUEUE_FULL.is_active() && drained(tx.len(), tx.capacity()) {
                conditions::QUEUE_FULL
                    .recovered(|| format!("jobs are queued again ({} waiting)", tx.len()));
            }
            Ok(())
        }
        Err(TrySendError::Full(job)) => {
            stats::BUSY_REJECTIONS.incr();
            conditions::QUEUE_FULL.failed(|| format!("{} refused", refused(&job)));
            Err(job)
        }
        Err(TrySendError::Disconnected(job)) => {
            stats::BUSY_REJECTIONS.incr();
            Err(job)
        }
    }
}

/// Whether a queue that was full has drained enough to call it over: to half its capacity.
fn drained(len: usize, capacity: Option<usize>) -> bool {
    capacity.is_none_or(|cap| len <= cap / 2)
}

/// What a refused job means for its caller, for the log.
fn refused(job: &Job) -> &'static str {
    match job {
        Job::Load(_) => "a cache load (its clients got BUSY)",
        Job::Flush { .. } => "a usage ledger flush (it is sent again at the next round)",
        Job::Deploy => "a schema deploy (tried again in a second)",
        Job::Cleanup { client: None } => "the periodic cleanup (it runs at the next interval)",
        Job::Grant { .. }
        | Job::Revoke { .. }
        | Job::List { .. }
        | Job::Cleanup { .. }
        | Job::PolicySet { .. }
        | Job::PolicyDel { .. }
        | Job::PolicyList { .. }
        | Job::History { .. }
        | Job::Find { .. }
        | Job::Top { .. } => "a command (it got BUSY)",
    }
}

/// Jobs waiting in the queue.
pub(crate) fn queue_depth() -> usize {
    SENDER.get().map_or(0, Sender::len)
}

/// Postgres connections open and idle, if a store is configured.
pub(crate) fn pool_state() -> (u32, u32) {
    backend().map_or((0, 0), |b| b.store.pool_state())
}

/// Rebuilds the store from the configuration (never touches the network).
pub(crate) fn rebuild_backend() {
    let cfg = StoreConfig {
        url: config::text(&config::PG_URL),
        credentials: config::credentials(),
        schema: config::text(&config::SCHEMA),
        timeout_ms: config::int(&config::PG_TIMEOUT_MS).max(1) as u64,
        pool_size: config::int(&config::POOL_SIZE).clamp(1, 1024) as u32,
    };
    let backend = match Store::new(&cfg) {
        Ok(store) => {
            if let Some(warning) = store.credentials_warning() {
                alerts::warning(&format!("quota: {warning}"));
            }
            Some(Arc::new(Backend {
                store,
                deployed: AtomicBool::new(false),
                deploying: Mutex::new(()),
            }))
        }
        Err(StoreError::NotConfigured) => None,
        Err(e) => {
            alerts::warning(&format!("quota: store not configured: {e}"));
            None
        }
    };
    health::set_configured(backend.is_some());
    deploy_retry_reset();
    let old = match BACKEND.write() {
        Ok(mut slot) => std::mem::replace(&mut *slot, backend),
        Err(_) => None,
    };
    // Closing the old pool's connections may wait on the network: not on the caller's thread.
    if let Some(old) = old {
        let _ = std::thread::Builder::new()
            .name("quota-store-drop".into())
            .spawn(move || drop(old));
    }
}

fn backend() -> Option<Arc<Backend>> {
    BACKEND.read().ok().and_then(|b| b.clone())
}

/// The store to use for one job, with the schema deployed first when `quota.auto-deploy` is on.
fn ready_store() -> Result<Arc<Backend>, StoreError> {
    let backend = backend().ok_or(StoreError::NotConfigured)?;
    if config::flag(&config::AUTO_DEPLOY) && !backend.deployed.load(Ordering::Acquire) {
        deploy_once(&backend)?;
    }
    Ok(backend)
}

/// Deploys the schema through `backend` unless that happened while waiting for the lock.
fn deploy_once(backend: &Backend) -> Result<(), StoreError> {
    let _deploying = backend.deploying.lock().unwrap_or_else(|p| p.into_inner());
    if backend.deployed.load(Ordering::Acquire) {
        return Ok(());
    }
    let started = Instant::now();
    let result = backend.store.deploy();
    let took = started.elapsed();
    stats::record_query(took.as_micros() as u64, result.is_err());
    let schema = || config::text(&config::SCHEMA);
    match result {
        Ok(()) => {
            backend.deployed.store(true, Ordering::Release);
            let done = || {
                format!(
                    "schema {} deployed (sql/deploy-control-plane.sql) in {} ms",
                    schema(),
                    took.as_millis()
                )
            };
            // One line per deploy: the end of the failures, or a notice.
            if conditions::SCHEMA_DEPLOY.is_active() {
                conditions::SCHEMA_DEPLOY.recovered(done);
            } else {
                alerts::notice(&format!("quota: {}", done()));
            }
        }
        Err(e) if e.is_unavailable() => return Err(e),
        Err(e) => {
            // Not a reachability problem (e.g. no CREATE privilege on an existing schema):
            // say so and carry on with what is there, until the next deploy (the listener's
            // next reconnect, or a change of the settings).
            conditions::SCHEMA_DEPLOY.failed(|| {
                format!(
                    "schema {}: {} (carrying on with the tables that are there)",
                    schema(),
                    alerts::reason(&e)
                )
            });
            backend.deployed.store(true, Ordering::Release);
        }
    }
    Ok(())
}

/// Runs `f` against the store, timing it for `INFO quota`.
fn with_store<T>(f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, StoreError> {
    let backend = ready_store().inspect_err(reachability)?;
    let started = Instant::now();
    let result = f(&backend.store);
    stats::record_query(started.elapsed().as_micros() as u64, result.is_err());
    match &result {
        Ok(_) => {
            health::answered();
            conditions::PG_UNREACHABLE.recovered(|| "PostgreSQL answers again".into());
        }
        Err(e) => reachability(e),
    }
    result
}

/// Settles `health` after a failed use of the store: PostgreSQL could not be reached, did not
/// answer in time or cannot be connected to with these settings: taken as down (logged,
/// rate-limited: see `alerts`). It refused a query: it is up, and a probe that got the refusal
/// is over. Either way a probe always ends, so that PostgreSQL is never taken as down for good.
fn reachability(e: &StoreError) {
    match e {
        StoreError::NotConfigured => {}
        StoreError::Unavailable(_) | StoreError::Timeout => {
            health::failed(clock::now_ms());
            conditions::PG_UNREACHABLE.failed(|| alerts::reason(e));
        }
        StoreError::BadConfig(_) => health::failed(clock::now_ms()),
        StoreError::Query(_) => health::answered(),
        StoreError::Invalid(_) => health::not_probed(),
    }
}

fn run(rx: Receiver<Job>) {
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(job) => {
                // A queue that was full may drain with nothing new submitted.
                if conditions::QUEUE_FULL.is_active() && drained(rx.len(), rx.capacity()) {
                    conditions::QUEUE_FULL
                        .recovered(|| format!("the queue drained ({} waiting)", rx.len()));
                }
                if STOPPING.load(Ordering::Relaxed) {
                    drop(job); // answers its client with `Done::Dropped`
                    continue;
                }
                let (loads, other) = gather_loads(job, &rx);
                if !loads.is_empty() {
                    execute_loads(loads);
                }
                if let Some(job) = other {
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| execute(job)));
                    if outcome.is_err() {
                        conditions::WORKER_PANIC.failed(|| {
                            "its client was answered with an error (a bug: please report it)".into()
                        });
                    } else {
                        conditions::WORKER_PANIC.recovered(|| "jobs complete again".into());
                    }
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                if STOPPING.load(Ordering::Relaxed) {
                    // Answer whatever is still queued, then leave.
                    while let Ok(job) = rx.try_recv() {
                        drop(job);
                    }
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Takes the loads waiting right behind `first` (up to `LOAD_BATCH`), stopping at the first
/// job of another kind, which is handed back to run after them.
fn gather_loads(first: Job, rx: &Receiver<Job>) -> (Vec<LoadJob>, Option<Job>) {
    let Job::Load(load) = first else {
        return (Vec::new(), Some(first));
    };
    let mut loads = vec![*load];
    while loads.len() < LOAD_BATCH {
        match rx.try_recv() {
            Ok(Job::Load(load)) => loads.push(*load),
            Ok(other) => return (loads, Some(other)),
            Err(_) => break,
        }
    }
    (loads, None)
}

/// The clients that waited on one user's load, with what the load found.
type Answered = (Vec<Waiter>, Result<UserCredits, StoreError>);

/// Loads the policies of `loads`, then their users in one query, and completes every flight,
/// so every waiter is answered whatever the store did.
fn execute_loads(jobs: Vec<LoadJob>) {
    let mut loads = Vec::with_capacity(jobs.len());
    for job in jobs {
        if let Some((policy, flight)) = &job.policy {
            let load = || execute_policy_load(policy, *flight);
            // A panic leaves the flight's clients to their timeout.
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(load));
        }
        loads.extend(job.credits);
    }
    if loads.is_empty() {
        return;
    }
    let fetched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        with_store(|store| match loads.as_slice() {
            [one] => store.load_user(&one.user.id()).map(|rows| vec![rows]),
            many => {
                let users: Vec<UserId<'_>> = many.iter().map(|l| l.user.id()).collect();
                store.load_users(&users)
            }
        })
    }))
    .unwrap_or_else(|_| {
        health::not_probed();
        Err(StoreError::Query("internal error while loading".into()))
    });
    let mut results: Vec<Result<UserCredits, StoreError>> = match fetched {
        Ok(rows) => rows.into_iter().map(|r| Ok(Arc::from(r))).collect(),
        Err(e) => loads.iter().map(|_| Err(e.clone())).collect(),
    };
    results.resize_with(loads.len(), || {
        Err(StoreError::Query("no answer for this user".into()))
    });
    let now = clock::now_ms();
    let answered: Vec<Answered> = {
        let mut cache = cache::cache();
        loads
            .iter()
            .zip(results)
            .map(|(load, result)| {
                let outcome = result.as_ref().map(Arc::clone).map_err(|_| ());
                (cache.complete(&load.key, load.flight, outcome, now), result)
            })
            .collect()
    };
    for (waiters, result) in answered {
        for waiter in waiters {
            waiter.credits_loaded(result.clone());
        }
    }
}

fn execute(job: Job) {
    match job {
        Job::Load(load) => execute_loads(vec![*load]),
        Job::Deploy => {
            DEPLOY_QUEUED.store(false, Ordering::Release);
            // Unreachable: tried again by a later `deploy_soon`, after a jittered wait.
            match ready_store() {
                Ok(_) => deploy_retry_reset(),
                Err(e) => {
                    reachability(&e);
                    with_deploy_retry(|r| {
                        r.not_before = Some(Instant::now() + r.backoff.next_wait());
                    });
                }
            }
        }
        Job::Grant {
            user,
            bundle,
            request,
            now,
            client,
        } => client.finish(Done::Grant(grant(&user, &bundle, &request, now))),
        Job::Revoke {
            user,
            bundle,
            client,
        } => client.finish(Done::Revoke(revoke(&user, &bundle))),
        Job::List { user, all, client } => {
            client.finish(Done::List(with_store(|s| s.list(&user.id(), all))));
        }
        Job::Cleanup { client } => {
            let outcome = cleanup();
            if let Some(client) = client {
                client.finish(Done::Cleanup(outcome));
            }
        }
        Job::PolicySet {
            policy,
            limits,
            client,
        } => client.finish(Done::PolicySet(set_policy(&policy, &limits))),
        Job::PolicyDel { policy, client } => {
            client.finish(Done::PolicyDel(delete_policy(&policy)));
        }
        Job::Flush { batches, done } => done(flush(&batches)),
        Job::History {
            account,
            from,
            to,
            client,
        } => {
            let id = account.id();
            client.finish(Done::History(with_store(|s| s.history(&id, from, to))));
        }
        Job::PolicyList {
            tenant,
            project,
            client,
        } => client.finish(Done::PolicyList(with_store(|s| {
            s.list_policies(&tenant, &project)
        }))),
        Job::Find { query, client } => {
            client.finish(Done::Find(with_store(|s| s.find(&query))));
        }
        Job::Top { query, client } => client.finish(Done::Top(with_store(|s| s.top(&query)))),
    }
}

/// `QUOTA.GRANT` in the store: counted, and unless it was a duplicate the user's live rows are
/// written through to the cache.
fn grant(
    user: &OwnedUser,
    bundle: &str,
    request: &GrantRequest,
    now: Millis,
) -> Result<GrantOutcome, StoreError> {
    with_store(|s| s.grant(&user.id(), bundle, request, now)).inspect(|o| {
        stats::GRANTS.incr();
        if o.duplicate {
            stats::GRANTS_DUPLICATE.incr();
        } else {
            write_through(user, o.live_rows.clone());
        }
    })
}

/// `QUOTA.REVOKE` in the store: counted when it revoked, the user's live rows written through.
fn revoke(user: &OwnedUser, bundle: &str) -> Result<RevokeOutcome, StoreError> {
    with_store(|s| s.revoke(&user.id(), bundle)).inspect(|o| {
        if o.revoked {
            stats::REVOKES.incr();
        }
        write_through(user, o.live_rows.clone());
    })
}

/// Expires what is due in the store (see `Store::cleanup`) and drops the cached credits of
/// every user it touched.
fn cleanup() -> Result<CleanupOutcome, StoreError> {
    with_store(|s| s.cleanup(clock::now_ms())).inspect(|o| {
        stats::CLEANUPS.incr();
        let mut cache = cache::cache();
        for (tenant, project, user) in &o.users {
            cache.invalidate(&user_key(tenant, project, user));
        }
    })
}

/// `QUOTA.POLICY SET` in the store, the new limits written through to the policy cache.
fn set_policy(policy: &OwnedPolicy, limits: &Limits) -> Result<PolicyRecord, StoreError> {
    with_store(|s| s.set_policy(&policy.id(), limits))
        .inspect(|record| write_through_policy(policy, Some(record.limits)))
}

/// `QUOTA.POLICY DEL` in the store; the policy cache then knows it is gone.
fn delete_policy(policy: &OwnedPolicy) -> Result<bool, StoreError> {
    with_store(|s| s.delete_policy(&policy.id())).inspect(|_| write_through_policy(policy, None))
}

/// Most accounts one flush transaction writes.
const FLUSH_CHUNK: usize = 1000;

/// Writes one flush of the ledger, `FLUSH_CHUNK` accounts per transaction: what happened to
/// each account's batch, `Err` for those not written (nothing of a failed transaction is
/// applied), `None` for a key that names no account. When PostgreSQL refuses a transaction
/// (rather than being unreachable), its batches are written again in halves until the refused
/// ones stand alone: one account's bad batch never keeps the others from being written.
pub(crate) fn flush(batches: &[KeyBatch]) -> Vec<FlushOutcome> {
    let mut out = Vec::with_capacity(batches.len());
    for chunk in batches.chunks(FLUSH_CHUNK) {
        let parsed: Vec<Option<AccountBatch>> = chunk
            .iter()
            .map(|b| {
                account_of_key(&b.key).map(|account| AccountBatch {
                    account,
                    seq: b.seq,
                    rev: b.rev,
                    hours: b.hours.clone(),
                })
            })
            .collect();
        let accounts: Vec<AccountBatch> = parsed.iter().flatten().cloned().collect();
        let mut written = flush_isolating(&accounts).into_iter();
        out.extend(
            parsed
                .iter()
                .map(|p| p.as_ref().and_then(|_| written.next())),
        );
    }
    out
}

/// Writes `accounts` in one transaction; if PostgreSQL refuses it, in two halves, and so on
/// down to single accounts. One outcome per account, in order.
fn flush_isolating(accounts: &[AccountBatch]) -> Vec<Result<BatchOutcome, StoreError>> {
    if accounts.is_empty() {
        return Vec::new();
    }
    match with_store(|s| s.flush_ledger(accounts)) {
        Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
        Err(e) if e.is_unavailable() || accounts.len() == 1 => {
            if accounts.len() == 1 && !e.is_unavailable() {
                let OwnedAccount { user, bundle: b } = &accounts[0].account;
                let (t, p, u) = (&user.tenant, &user.project, &user.user);
                conditions::LEDGER_BATCH.failed(|| {
                    format!(
                        "account {t}/{p}/{u}/{b}: {} (it is retried alone at every flush; the \
                         other accounts are written)",
                        alerts::reason(&e)
                    )
                });
            }
            accounts.iter().map(|_| Err(e.clone())).collect()
        }
        Err(_) => {
            let (left, right) = accounts.split_at(accounts.len() / 2);
            let mut out = flush_isolating(left);
            out.extend(flush_isolating(right));
            out
        }
    }
}

/// Loads a policy, completes its flight, and hands each waiter what it found.
fn execute_policy_load(policy: &OwnedPolicy, flight: u64) {
    let id = policy.id();
    let result: Result<CachedPolicy, StoreError> =
        with_store(|s| s.load_policy(&id)).map(|found| found.map(|r| r.limits));
    let now = clock::now_ms();
    let waiters =
        cache::policies().complete(&id.key(), flight, result.clone().map_err(|_| ()), now);
    for waiter in waiters {
        waiter.policy_loaded(result.clone());
    }
}

/// Write-through of a committed policy change into this node's policy cache.
fn write_through_policy(policy: &OwnedPolicy, value: CachedPolicy) {
    cache::policies().put(&policy.id().key(), value, clock::now_ms());
}

fn write_through(user: &OwnedUser, rows: Vec<Replenishment>) {
    cache::cache().put(&user.id().key(), Arc::from(rows), clock::now_ms());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_is_over_once_drained_to_half() {
        assert!(!drained(8, Some(8)));
        assert!(!drained(5, Some(8)));
        assert!(drained(4, Some(8)));
        assert!(drained(0, Some(1)));
        assert!(!drained(1, Some(1)));
        assert!(drained(3, None));
    }
}
