//! The one error type of distlock.
//!
//! Every backend maps its own failures into [`Error`], keeping the store's
//! error as the [`source`](std::error::Error::source) and adding the context a
//! person needs to act on it (which backend, which operation). There are no
//! backend-specific variants: code that handles errors works the same for every
//! store. Contention is *not* an error: `try_lock` returns `Ok(None)`.

use std::time::Duration;

/// A boxed error from a backend's client library, kept as the source.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// `Result` with distlock's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong when taking, keeping or giving back a lock.
///
/// Messages never contain passwords or owner tokens.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The lock name breaks the [key rules](crate::Key).
    #[error("invalid lock key {key:?}: {reason}")]
    InvalidKey {
        /// The rejected key (cut to 64 characters).
        key: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// A TTL, wait limit or other option is out of range or inconsistent.
    #[error("invalid lock options: {reason}")]
    InvalidOptions {
        /// What is wrong, with the accepted range.
        reason: String,
    },

    /// Waiting for the lock took longer than allowed.
    #[error("timed out after {waited:?} waiting for lock {key:?}")]
    Timeout {
        /// The lock that stayed busy.
        key: String,
        /// How long we waited.
        waited: Duration,
    },

    /// The lease is gone: it expired, was released, or another owner holds the
    /// lock now. Nothing was changed on the server.
    #[error("lock {key:?} is no longer held by us: {reason}")]
    LockLost {
        /// The lock we had.
        key: String,
        /// Why we know it is lost.
        reason: crate::LossReason,
    },

    /// The backend cannot do what was asked (for example fair mode).
    #[error("{backend} does not support {what}")]
    Unsupported {
        /// The backend's name.
        backend: &'static str,
        /// The missing feature.
        what: String,
    },

    /// A configuration value or URL is invalid.
    #[error("invalid {backend} configuration: {message}")]
    Config {
        /// The backend (or `"distlock"` for shared settings).
        backend: &'static str,
        /// What is wrong.
        message: String,
    },

    /// The store could not be reached, or the connection broke. Retryable.
    #[error("{backend}: cannot reach the server while {context}")]
    Connection {
        /// The backend's name.
        backend: &'static str,
        /// What we were doing.
        context: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },

    /// The store refused our credentials or permissions.
    #[error("{backend}: authentication or permission denied while {context}")]
    Auth {
        /// The backend's name.
        backend: &'static str,
        /// What we were doing.
        context: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },

    /// The store answered with an error we did not expect.
    #[error("{backend}: server error while {context}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// What we were doing.
        context: String,
        /// The client library's error.
        #[source]
        source: BoxError,
    },
}

impl Error {
    /// Whether trying the same operation again later may succeed.
    ///
    /// True for connection failures and wait timeouts; false for bad input,
    /// lost leases, missing features, configuration, credentials and
    /// unexpected server answers.
    ///
    /// ```
    /// use lock_core::Error;
    /// let e = Error::Timeout { key: "k".into(), waited: std::time::Duration::from_secs(1) };
    /// assert!(e.is_retryable());
    /// ```
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Connection { .. } | Error::Timeout { .. })
    }

    /// A connection error with context, for backend implementors.
    pub fn connection(
        backend: &'static str,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Connection {
            backend,
            context: context.into(),
            source: source.into(),
        }
    }

    /// An unexpected server answer with context, for backend implementors.
    pub fn backend(
        backend: &'static str,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            backend,
            context: context.into(),
            source: source.into(),
        }
    }

    /// An authentication failure with context, for backend implementors.
    pub fn auth(
        backend: &'static str,
        context: impl Into<String>,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Auth {
            backend,
            context: context.into(),
            source: source.into(),
        }
    }

    /// A configuration error, for backend implementors.
    pub fn config(backend: &'static str, message: impl Into<String>) -> Self {
        Error::Config {
            backend,
            message: message.into(),
        }
    }

    /// An invalid-options error.
    pub fn invalid_options(reason: impl Into<String>) -> Self {
        Error::InvalidOptions {
            reason: reason.into(),
        }
    }
}
