//! sqlx errors mapped into distlock's one error type.
//!
//! The SQLSTATE decides: class 28 (invalid authorization) and 42501
//! (insufficient privilege) are [`Error::Auth`]; class 08 (connection),
//! 57P0x (shutdown, starting up), 53xxx (too many connections, out of
//! resources), 57014 (our `statement_timeout`) and serialization failures
//! are retryable [`Error::Connection`]s; the rest is [`Error::Backend`].
//! sqlx's messages never contain the password.

use lock_core::Error;

use crate::BACKEND;

/// Whether a sqlx error means the connection (not the statement) failed.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    classify(e) == Kind::Connection
}

#[derive(PartialEq, Eq)]
enum Kind {
    Connection,
    Auth,
    Config,
    Backend,
}

fn classify(e: &sqlx::Error) -> Kind {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Kind::Connection,
        sqlx::Error::Tls(_) => Kind::Auth,
        sqlx::Error::Configuration(_) => Kind::Config,
        sqlx::Error::Database(db) => {
            let code = db.code();
            let code = code.as_deref().unwrap_or("");
            if code.starts_with("28") || code == "42501" {
                Kind::Auth
            } else if code.starts_with("08")
                || code.starts_with("57P")
                || code.starts_with("53")
                || code == "57014"
                || code == "40001"
                || code == "40P01"
            {
                Kind::Connection
            } else {
                Kind::Backend
            }
        }
        _ => Kind::Backend,
    }
}

/// Maps a sqlx error, with what we were doing.
pub(crate) fn pg_error(e: sqlx::Error, context: impl Into<String>) -> Error {
    let context = context.into();
    match classify(&e) {
        Kind::Connection => Error::connection(BACKEND, context, e),
        Kind::Auth => Error::auth(BACKEND, context, e),
        Kind::Config => Error::config(BACKEND, format!("{context}: {e}")),
        Kind::Backend => Error::backend(BACKEND, context, e),
    }
}

/// A statement that did not answer within the request timeout.
pub(crate) fn timed_out(context: impl Into<String>, after: std::time::Duration) -> Error {
    Error::connection(
        BACKEND,
        context,
        format!("no answer within the request timeout of {after:?}"),
    )
}
