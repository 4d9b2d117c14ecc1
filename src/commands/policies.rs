//! `QUOTA.POLICY SET|GET|DEL|LIST|INVALIDATE`: named base policies for `QUOTA.ADMIT ... POLICY`;
//! `QUOTA.POLICY HELP` lists them.
//!
//! Writes and listings go to PostgreSQL on a worker (only the caller is blocked); the worker
//! writes the committed policy through to this node's policy cache, and the reply replicates
//! `QUOTA.POLICY INVALIDATE` so replicas drop their copy at once (other nodes hear NOTIFY).
//! `GET` answers from the policy cache and waits only on a miss, like `QUOTA.GET`.

use super::credits::on_worker;
use super::error::{CommandError, CANNOT_BLOCK};
use super::Waiting;
use crate::core::ids::{OwnedPolicy, PolicyId};
use crate::core::policy::{LimitField, Limits};
use crate::ffi::ctx::Ctx;
use crate::ffi::reply::Reply;
use crate::parse;
use crate::runtime::cache;
use crate::runtime::clock;
use crate::runtime::gather::{gather, Gathered, Needs, PolicyFound, WaitMode};
use crate::runtime::jobs::{Done, Job};
use parse::PolicyArgs;

/// Writes one policy: its identity and the ten limits (nil = unlimited).
fn record(r: Reply, id: &PolicyId<'_>, limits: &Limits) -> Reply {
    let r = r.map(3 + LimitField::ALL.len());
    let r = r.field("tenant", |r| r.str(id.tenant));
    let r = r.field("project", |r| r.str(id.project));
    let mut r = r.field("policy", |r| r.str(id.name));
    for field in LimitField::ALL {
        let v = limits.get(field);
        r = r.field(field.name(), |r| match v {
            Some(v) => r.uint(v),
            None => r.null(),
        });
    }
    r
}

/// `QUOTA.POLICY ...`.
pub(crate) fn policy(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    match parse::policy(args)? {
        PolicyArgs::Set(id, limits) => {
            let policy = OwnedPolicy::from_id(&id);
            on_worker(ctx, PolicyWait::Set(policy.clone()), |client| {
                Job::PolicySet {
                    policy,
                    limits: Box::new(limits),
                    client,
                }
            })
        }
        PolicyArgs::Del(id) => {
            let policy = OwnedPolicy::from_id(&id);
            on_worker(ctx, PolicyWait::Del(policy.clone()), |client| {
                Job::PolicyDel { policy, client }
            })
        }
        PolicyArgs::List(tenant, project) => {
            let (tenant, project) = (tenant.to_owned(), project.to_owned());
            let request = PolicyWait::List(tenant.clone(), project.clone());
            on_worker(ctx, request, |client| Job::PolicyList {
                tenant,
                project,
                client,
            })
        }
        PolicyArgs::Get(id) => get(ctx, &id),
        PolicyArgs::Invalidate(id) => {
            let dropped = cache::policies().invalidate(&id.key());
            ctx.replicate_verbatim();
            ctx.reply().int(i64::from(dropped));
            Ok(())
        }
    }
}

/// `QUOTA.POLICY HELP`'s first line, as Redis's own container commands write it.
const HELP_HEAD: &str = "QUOTA.POLICY <subcommand> [<arg> [value] [opt] ...]. Subcommands are:";

/// `QUOTA.POLICY HELP`'s other lines: each subcommand's syntax, then what it does, indented
/// (the layout of `CONFIG HELP`, which ends with `HELP` too).
const HELP_LINES: &[&str] = &[
    "SET <tenant> <project> <name> [REQUESTS_PER_DAY <n>] [REQUESTS_PER_MONTH <n>] \
     [TOTAL_REQUESTS <n>] [TOKENS_PER_HOUR <n>] [TOKENS_PER_DAY <n>] [TOKENS_PER_MONTH <n>] \
     [MAX_CONCURRENT <n>]",
    "    Create or replace the named base policy of (tenant, project) in PostgreSQL; a limit",
    "    not given is unlimited. Replies the policy.",
    "GET <tenant> <project> <name>",
    "    Return the named policy from this node's cache (loaded on a miss), or nil.",
    "DEL <tenant> <project> <name>",
    "    Delete the named policy: 1 if it existed, else 0.",
    "LIST <tenant> <project>",
    "    Return every policy of (tenant, project) from PostgreSQL, by name.",
    "INVALIDATE <tenant> <project> <name>",
    "    Drop the policy from this node's cache (and its replicas'): 1 if it was cached.",
    "HELP",
    "    Print this help.",
];

/// `QUOTA.POLICY HELP`: an array of status lines, as `CONFIG HELP` and `OBJECT HELP` reply.
pub(crate) fn help(ctx: Ctx, _args: &[&[u8]]) -> Result<(), CommandError> {
    let mut r = ctx.reply().array(1 + HELP_LINES.len()).status(HELP_HEAD);
    for line in HELP_LINES {
        r = r.status(line);
    }
    Ok(())
}

/// `QUOTA.POLICY GET`: from the policy cache; on a miss, wait for one load.
fn get(ctx: Ctx, id: &PolicyId<'_>) -> Result<(), CommandError> {
    let needs = Needs {
        policy: Some(*id),
        credits: None,
    };
    let request = |_| PolicyWait::Get(OwnedPolicy::from_id(id));
    match gather(ctx, needs, WaitMode::Block, clock::now_ms(), request) {
        Gathered::Ready(PolicyFound::Limits(limits), _) => reply_found(ctx, id, Some(&limits)),
        Gathered::Ready(PolicyFound::NoSuchPolicy, _) => reply_found(ctx, id, None),
        Gathered::Ready(PolicyFound::Unavailable, _) => return Err(unavailable(id.name).into()),
        Gathered::Ready(_, _) => return Err(loading(id.name).into()),
        Gathered::Waiting => {}
        Gathered::CannotBlock => return Err(CommandError::Text(CANNOT_BLOCK)),
    }
    Ok(())
}

fn reply_found(ctx: Ctx, id: &PolicyId<'_>, found: Option<&Limits>) {
    match found {
        Some(limits) => {
            record(ctx.reply(), id, limits);
        }
        None => {
            ctx.reply().null();
        }
    }
}

/// The answer when a policy is not cached and PostgreSQL cannot be reached.
pub(crate) fn unavailable(name: &str) -> String {
    format!(
        "ERR policy '{}' is not cached and PostgreSQL is unavailable: retry shortly",
        parse::shown(name.as_bytes())
    )
}

/// The answer where a client cannot wait for a policy load (MULTI, scripts).
pub(crate) fn loading(name: &str) -> String {
    format!(
        "TRYAGAIN policy '{}' is loading from PostgreSQL: retry shortly",
        parse::shown(name.as_bytes())
    )
}

/// The answer for a policy name that does not exist.
pub(crate) fn unknown(name: &str) -> String {
    format!("ERR unknown policy '{}'", parse::shown(name.as_bytes()))
}

/// Replicates `QUOTA.POLICY INVALIDATE <t> <p> <name>` so replicas drop their copy.
fn replicate_invalidate(ctx: Ctx, id: &PolicyId<'_>) {
    ctx.replicate(
        c"QUOTA.POLICY",
        &[
            b"INVALIDATE",
            id.tenant.as_bytes(),
            id.project.as_bytes(),
            id.name.as_bytes(),
        ],
    );
}

/// A `QUOTA.POLICY` waiting on PostgreSQL: the policy it reads or writes, or the (tenant,
/// project) it lists.
enum PolicyWait {
    Get(OwnedPolicy),
    Set(OwnedPolicy),
    Del(OwnedPolicy),
    List(String, String),
}

impl Waiting for PolicyWait {
    fn resumed(self, ctx: Ctx, done: Done) -> Result<(), CommandError> {
        match (self, done) {
            (PolicyWait::Set(policy), Done::PolicySet(stored)) => {
                let id = policy.id();
                let stored = stored?;
                replicate_invalidate(ctx, &id);
                record(ctx.reply(), &id, &stored.limits);
            }
            (PolicyWait::Del(policy), Done::PolicyDel(deleted)) => {
                let deleted = deleted?;
                replicate_invalidate(ctx, &policy.id());
                ctx.reply().int(i64::from(deleted));
            }
            (PolicyWait::List(tenant, project), Done::PolicyList(records)) => {
                let records = records?;
                let mut r = ctx.reply().map(records.len());
                for stored in &records {
                    let id = PolicyId {
                        tenant: &tenant,
                        project: &project,
                        name: &stored.name,
                    };
                    r = record(r.str(&stored.name), &id, &stored.limits);
                }
            }
            (PolicyWait::Get(policy), Done::Loaded(loaded)) => match loaded.policy {
                Some(Ok(found)) => reply_found(ctx, &policy.id(), found.as_ref()),
                Some(Err(e)) if e.is_unavailable() => return Err(unavailable(&policy.name).into()),
                Some(Err(e)) => return Err(e.into()),
                None => return Err(CommandError::undone(&Done::Dropped)),
            },
            (_, other) => return Err(CommandError::undone(&other)),
        }
        Ok(())
    }

    /// A `GET` only reads: the policy is unavailable. A write's outcome is unknown.
    fn expired(self, _ctx: Ctx) -> Result<(), CommandError> {
        match self {
            PolicyWait::Get(policy) => Err(unavailable(&policy.name).into()),
            _ => Err(super::error::timed_out()),
        }
    }
}
