//! The work a command hands to the pool (`Job`) and what comes back to its blocked client
//! (`Done`), and the `Waiter` a gather leaves in the caches' flights (answered once, when the
//! last load it waits on lands). The ids a job carries are `core::ids`' owned ones.

use std::sync::{Arc, Mutex};

use crate::core::cache::UserCredits;
use crate::core::credit::{GrantRequest, Replenishment};
use crate::core::ids::{OwnedAccount, OwnedPolicy, OwnedUser};
use crate::core::policy::{CachedPolicy, Limits, PolicyRecord};
use crate::core::Millis;
use crate::ffi::blocked::{Blocked, Outcome};
pub(crate) use crate::store::StoreError;
use crate::store::{BatchOutcome, CleanupOutcome, GrantOutcome, HourRow, RevokeOutcome};
pub(crate) use crate::store::{FindAfter, FindPage, FindQuery, TopBy, TopQuery, TopUser};

/// Where a flush's outcomes go (called on the pool thread).
pub(crate) type FlushDone = Box<dyn FnOnce(Vec<FlushOutcome>) + Send>;

/// What became of one account's batch: `None` when its key's name is no account key's (a
/// value renamed to another name), so nothing was written.
pub(crate) type FlushOutcome = Option<Result<BatchOutcome, StoreError>>;

/// One account's batch as the main thread snapshots it: the key's name (parsed into the
/// account's ids on the pool thread), its sequence, revision and unflushed hours.
#[derive(Debug, Clone)]
pub(crate) struct KeyBatch {
    pub key: Box<[u8]>,
    pub seq: u64,
    pub rev: u64,
    pub hours: Vec<crate::core::ledger::HourDelta>,
}

/// What a worker hands back to a blocked client. It travels boxed (as the blocked client's
/// private data), so the size of its variants does not matter.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Done {
    /// What the loads a command waited on brought (see `gather`).
    Loaded(Loaded),
    Grant(Result<GrantOutcome, StoreError>),
    Revoke(Result<RevokeOutcome, StoreError>),
    List(Result<Vec<Replenishment>, StoreError>),
    Cleanup(Result<CleanupOutcome, StoreError>),
    PolicySet(Result<PolicyRecord, StoreError>),
    PolicyDel(Result<bool, StoreError>),
    PolicyList(Result<Vec<PolicyRecord>, StoreError>),
    History(Result<Vec<HourRow>, StoreError>),
    /// A page of `QUOTA.FIND`.
    Find(Result<FindPage, StoreError>),
    /// `QUOTA.TOP`'s users, most first.
    Top(Result<Vec<TopUser>, StoreError>),
    /// The job queue was full.
    Busy,
    /// The job was dropped unfinished (shutdown).
    Dropped,
}

impl Outcome for Done {
    fn dropped() -> Done {
        Done::Dropped
    }
}

/// A client waiting on one or two loads (a policy's, a user's credits): answered once, when
/// the last lands, with what each brought; or at once when one is dropped.
#[derive(Clone)]
pub(crate) struct Waiter(Arc<Mutex<Join>>);

struct Join {
    client: Option<Blocked<Done>>,
    /// Loads not landed yet.
    pending: u8,
    loaded: Loaded,
}

impl Waiter {
    pub(crate) fn new(client: Blocked<Done>, policy: bool, credits: bool) -> Waiter {
        Waiter(Arc::new(Mutex::new(Join {
            client: Some(client),
            pending: u8::from(policy) + u8::from(credits),
            loaded: Loaded::default(),
        })))
    }

    /// Records what one load brought; answers the client when it was the last.
    fn landed(self, put: impl FnOnce(&mut Loaded)) {
        let mut join = self.0.lock().unwrap_or_else(|p| p.into_inner());
        put(&mut join.loaded);
        join.pending = join.pending.saturating_sub(1);
        if join.pending == 0 {
            if let Some(client) = join.client.take() {
                let loaded = std::mem::take(&mut join.loaded);
                drop(join);
                client.finish(Done::Loaded(loaded));
            }
        }
    }

    /// The named policy's load landed.
    pub(crate) fn policy_loaded(self, found: Result<CachedPolicy, StoreError>) {
        self.landed(|l| l.policy = Some(found));
    }

    /// The user's credits' load landed.
    pub(crate) fn credits_loaded(self, rows: Result<UserCredits, StoreError>) {
        self.landed(|l| l.credits = Some(rows));
    }

    /// A load will not land (the queue was full, shutdown): answers the client `done` now,
    /// unless it was answered already.
    pub(crate) fn abort(self, done: Done) {
        let client = self
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .client
            .take();
        if let Some(client) = client {
            client.finish(done);
        }
    }
}

/// What the loads a waiting command asked for brought: the named policy's, the user's
/// credits', each when it waited on it.
#[derive(Default)]
pub(crate) struct Loaded {
    pub policy: Option<Result<CachedPolicy, StoreError>>,
    pub credits: Option<Result<UserCredits, StoreError>>,
}

/// Load what one gather found missing or stale, together: a named policy (with its flight in
/// the policy cache), a user's rows, or both; each flight's waiters are answered.
#[derive(Default)]
pub(crate) struct LoadJob {
    pub(crate) policy: Option<(OwnedPolicy, u64)>,
    pub(crate) credits: Option<CreditLoad>,
}

/// A user's rows to load into the credits cache, for its flight `flight`.
pub(crate) struct CreditLoad {
    pub(crate) key: Box<[u8]>,
    pub(crate) user: OwnedUser,
    pub(crate) flight: u64,
}

/// One unit of Postgres work.
pub(crate) enum Job {
    /// Load a named policy and a user's rows into the caches and answer the flights' waiters.
    Load(Box<LoadJob>),
    Grant {
        user: OwnedUser,
        bundle: String,
        request: Box<GrantRequest>,
        now: Millis,
        client: Blocked<Done>,
    },
    Revoke {
        user: OwnedUser,
        bundle: String,
        client: Blocked<Done>,
    },
    List {
        user: OwnedUser,
        all: bool,
        client: Blocked<Done>,
    },
    /// Deactivate expired rows; `client` is `None` for the periodic run.
    Cleanup { client: Option<Blocked<Done>> },
    /// Deploy the schema if it is not known to be there (`quota.auto-deploy`).
    Deploy,
    PolicySet {
        policy: OwnedPolicy,
        limits: Box<Limits>,
        client: Blocked<Done>,
    },
    PolicyDel {
        policy: OwnedPolicy,
        client: Blocked<Done>,
    },
    PolicyList {
        tenant: String,
        project: String,
        client: Blocked<Done>,
    },
    /// Write one flush of the usage ledger (see `runtime::ledger`), then hand what became of
    /// each batch to `done`.
    Flush {
        batches: Vec<KeyBatch>,
        done: FlushDone,
    },
    /// `QUOTA.HISTORY`: an account's hourly ledger rows.
    History {
        account: OwnedAccount,
        from: i64,
        to: i64,
        client: Blocked<Done>,
    },
    /// `QUOTA.FIND`: one page of a project's live credits.
    Find {
        query: Box<FindQuery>,
        client: Blocked<Done>,
    },
    /// `QUOTA.TOP`: a project's heaviest users in the ledger.
    Top {
        query: Box<TopQuery>,
        client: Blocked<Done>,
    },
}

impl Job {
    /// The blocked client this job answers, if any (to answer it `BUSY` when not queued).
    pub(crate) fn into_client(self) -> Option<Blocked<Done>> {
        match self {
            Job::Load(_) | Job::Deploy | Job::Flush { .. } => None,
            Job::History { client, .. } | Job::Find { client, .. } | Job::Top { client, .. } => {
                Some(client)
            }
            Job::Grant { client, .. }
            | Job::Revoke { client, .. }
            | Job::List { client, .. }
            | Job::PolicySet { client, .. }
            | Job::PolicyDel { client, .. }
            | Job::PolicyList { client, .. } => Some(client),
            Job::Cleanup { client } => client,
        }
    }
}
