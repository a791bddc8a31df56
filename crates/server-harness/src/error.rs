//! The harness's error type.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong while finding, installing, starting or controlling a server.
///
/// Messages are written for a person reading a failed test: they name the binary, the
/// environment variable that overrides it and the command that installs it, or they carry
/// the last lines of the server's log.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A server binary was not found anywhere the harness looks.
    #[error(
        "the `{binary}` binary was not found (looked in: {searched}). \
         Run `cargo xtask install` (installs every test server), \
         or set {env_var} to the path of {what}"
    )]
    BinaryNotFound {
        /// The binary's name, e.g. `redis-server`.
        binary: &'static str,
        /// The environment variable that overrides the lookup, e.g. `DISTLOCK_REDIS_SERVER`.
        env_var: &'static str,
        /// What the variable must point at (a file or a folder).
        what: &'static str,
        /// The places searched, joined for display.
        searched: String,
    },

    /// An override environment variable is set but points at nothing usable.
    #[error(
        "{env_var} is set to `{}`, which is not {what}. \
         Fix or unset {env_var}, or run `cargo xtask install` and unset it",
        path.display()
    )]
    BadOverride {
        /// The environment variable, e.g. `DISTLOCK_ETCD`.
        env_var: &'static str,
        /// Its value.
        path: PathBuf,
        /// What it should have pointed at.
        what: &'static str,
    },

    /// An I/O operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A server did not answer its protocol probe before the deadline.
    #[error("{server} did not become ready within {timeout:?}; last lines of its log:\n{log_tail}")]
    StartTimeout {
        /// Which server (kind and folder).
        server: String,
        /// How long the harness waited.
        timeout: Duration,
        /// The end of the server's log.
        log_tail: String,
    },

    /// A server process exited while the harness waited for it.
    #[error("{server} exited during start-up ({status}); last lines of its log:\n{log_tail}")]
    Exited {
        /// Which server (kind and folder).
        server: String,
        /// The exit status as text.
        status: String,
        /// The end of the server's log.
        log_tail: String,
    },

    /// A helper command (initdb, etcdctl, apt-get, ...) failed.
    #[error("`{command}` failed ({status}):\n{output}")]
    Command {
        /// The command line.
        command: String,
        /// The exit status as text.
        status: String,
        /// Its standard output and error, trimmed.
        output: String,
    },

    /// Generating a test certificate failed.
    #[error("generating test certificates failed: {0}")]
    Certificate(String),

    /// No free loopback port could be reserved.
    #[error("no free loopback port found after {attempts} attempts")]
    NoFreePort {
        /// How many ports were tried.
        attempts: u32,
    },

    /// The operation needs a running server, but it is stopped.
    #[error("{0} is not running")]
    NotRunning(String),

    /// A server answered something the harness did not expect.
    #[error("unexpected answer from {server}: {detail}")]
    Protocol {
        /// Which server.
        server: String,
        /// What was wrong.
        detail: String,
    },

    /// Installing the servers failed or is impossible here.
    #[error("install failed: {0}")]
    Install(String),

    /// A caller passed an argument the harness cannot use.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// The harness's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to `std::io::Result`s.
pub(crate) trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(context(), e))
    }
}
