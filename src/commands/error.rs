//! Why a command failed (`CommandError`) and the shared error texts, each written once.
//! Handlers return `Result<(), CommandError>`; `super::run` (and the resumed halves) reply an
//! error once. Parse, store, account and wrong-type errors carry their own wire text (their
//! `Display`); arity errors use Redis's own wording.

use crate::core::account::AccountError;
use crate::core::effect::EffectError;
use crate::ffi::account_type::WrongType;
use crate::ffi::ctx::Ctx;
use crate::parse::ParseError;
use crate::runtime::config;
use crate::runtime::jobs::{Done, StoreError};

/// Why a command failed; `reply` writes its wire text.
pub(crate) enum CommandError {
    Parse(ParseError),
    WrongType(WrongType),
    Store(StoreError),
    Account(AccountError),
    Effect(EffectError),
    /// A fixed text (one of the constants here or a command family's own).
    Text(&'static str),
    /// A text composed for this call.
    Owned(String),
    /// The command waits on PostgreSQL and this client cannot be blocked.
    CannotWait,
}

/// `From` for each error that carries its own wire text.
macro_rules! from_errors {
    ($($error:ty => $variant:ident),* $(,)?) => {
        $(impl From<$error> for CommandError {
            fn from(e: $error) -> Self {
                CommandError::$variant(e)
            }
        })*
    };
}

from_errors! {
    ParseError => Parse,
    WrongType => WrongType,
    StoreError => Store,
    AccountError => Account,
    EffectError => Effect,
    String => Owned,
}

impl CommandError {
    /// The error for a job that did not produce an outcome.
    pub(super) fn undone(done: &Done) -> CommandError {
        CommandError::Text(match done {
            Done::Busy => "BUSY the redis-quota job queue is full (quota.queue-max): retry later",
            _ => "ERR redis-quota is shutting down: request dropped",
        })
    }

    /// Replies this error to the command `args` (the one reply of the call).
    #[cold]
    pub(super) fn reply(self, ctx: Ctx, args: &[&[u8]]) {
        let text = match self {
            CommandError::Parse(ParseError::Arity) => format!(
                "ERR wrong number of arguments for '{}' command",
                name(args).to_ascii_lowercase()
            ),
            CommandError::Parse(e) => e.to_string(),
            CommandError::WrongType(e) => e.to_string(),
            CommandError::Store(e) => e.to_string(),
            CommandError::Account(e) => e.to_string(),
            CommandError::Effect(e) => e.to_string(),
            CommandError::Text(text) => {
                ctx.reply().error(text);
                return;
            }
            CommandError::Owned(text) => text,
            CommandError::CannotWait => format!(
                "ERR {} waits on PostgreSQL and cannot run inside MULTI, a script or a function",
                name(args)
            ),
        };
        ctx.reply().error(&text);
    }
}

/// Redis refused to block the client.
pub(super) const CANNOT_BLOCK: &str = "ERR cannot block this client";

/// A user's credits are loading and the command cannot wait (ADMIT under `script-miss error`).
pub(super) const CREDITS_LOADING: &str =
    "TRYAGAIN credits for this user are loading from PostgreSQL: retry shortly";

/// A user's credits are loading and `QUOTA.GET` cannot wait (MULTI, scripts).
pub(super) const CREDITS_LOADING_NO_WAIT: &str = "TRYAGAIN credits for this user are loading from PostgreSQL: retry outside MULTI/scripts or shortly";

/// The command name as Redis dispatched it, upper-cased.
pub(super) fn name(args: &[&[u8]]) -> String {
    args.first()
        .map(|n| String::from_utf8_lossy(n).to_ascii_uppercase())
        .unwrap_or_default()
}

/// The error for a blocked client whose wait on Postgres ran out.
pub(super) fn timed_out() -> CommandError {
    CommandError::Owned(format!(
        "ERR PostgreSQL did not answer within {} ms (quota.pg-timeout-ms); the outcome of a \
         write is unknown: retry it (a PURCHASE id makes a retried grant safe)",
        config::int(&config::PG_TIMEOUT_MS)
    ))
}
