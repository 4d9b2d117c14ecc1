//! `QUOTA.FIND` and `QUOTA.TOP`: reads over a whole project (every user of a tenant's
//! project), from PostgreSQL on a worker while the client waits, like `QUOTA.LIST`.
//!
//! `FIND` pages through the project's live credits with a cursor (`cursor.rs`), each row
//! written by the credits' record writer; `TOP` ranks the project's users by what the usage
//! ledger holds over a range of hours. Neither reads or changes any key or cache; their
//! declared key is the tenant (see `ffi::command_info`), so key permissions and cluster
//! routing apply to it.

use super::credits::on_worker;
use super::replies::record;
use super::{CommandError, Waiting};
use crate::core::ids::{AccountId, UserId};
use crate::ffi::ctx::Ctx;
use crate::parse::{self, cursor};
use crate::runtime::config;
use crate::runtime::jobs::{Done, Job};

/// `QUOTA.FIND <t> <p> [EXPIRES_WITHIN s] [COUNT n] [CURSOR c]`.
pub(crate) fn find(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let query = parse::find(args)?;
    let wait = ProjectWait::Find {
        tenant: query.tenant.clone(),
        project: query.project.clone(),
    };
    on_worker(ctx, wait, |client| Job::Find {
        query: Box::new(query),
        client,
    })
}

/// `QUOTA.TOP <t> <p> REQUESTS|TOKENS FROM unix-s TO unix-s [COUNT n]`.
pub(crate) fn top(ctx: Ctx, args: &[&[u8]]) -> Result<(), CommandError> {
    let query = parse::top(args)?;
    on_worker(ctx, ProjectWait::Top, |client| Job::Top {
        query: Box::new(query),
        client,
    })
}

/// A project read waiting on PostgreSQL: `FIND` keeps the ids its cursor is tied to.
enum ProjectWait {
    Find { tenant: String, project: String },
    Top,
}

impl Waiting for ProjectWait {
    fn resumed(self, ctx: Ctx, done: Done) -> Result<(), CommandError> {
        match (self, done) {
            (ProjectWait::Find { tenant, project }, Done::Find(page)) => {
                let page = page?;
                let next = page.next.as_ref().map_or_else(
                    || cursor::START.to_owned(),
                    |after| cursor::encode(&tenant, &project, after),
                );
                let mut r = ctx.reply().array(2).str(&next).array(page.rows.len());
                for found in &page.rows {
                    let account = AccountId {
                        user: UserId {
                            tenant: &tenant,
                            project: &project,
                            user: &found.user,
                        },
                        bundle: &found.row.bundle_id,
                    };
                    r = record(r, &account, Some(&found.row), 0);
                }
            }
            (ProjectWait::Top, Done::Top(users)) => {
                let users = users?;
                let mut r = ctx.reply().array(users.len());
                for user in &users {
                    let m = r.map(3).field("user_id", |m| m.str(&user.user));
                    let m = m.field("requests", |m| m.int(user.requests));
                    r = m.field("tokens", |m| m.int(user.tokens));
                }
            }
            (_, other) => return Err(CommandError::undone(&other)),
        }
        Ok(())
    }

    /// Only reads: nothing changed, and asking again is safe.
    fn expired(self, _ctx: Ctx) -> Result<(), CommandError> {
        Err(CommandError::Owned(format!(
            "ERR PostgreSQL did not answer within {} ms (quota.pg-timeout-ms): retry shortly",
            config::int(&config::PG_TIMEOUT_MS)
        )))
    }
}
