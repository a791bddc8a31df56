//! Configuration: a typed builder and a `postgres://` URL.
//!
//! The URL is the usual libpq form plus our own `distlock_*` parameters, so
//! one string configures both the connection and the lock table. Parsing is
//! strict: a parameter we do not know is an error rather than silently
//! ignored (sqlx would only log it), because a misspelt `sslmode` must not
//! quietly downgrade to a plain-text connection.
//!
//! The password is kept in a [`Secret`] whose `Debug` prints `***`, and
//! [`PostgresConfig`]'s `Debug` and [`PostgresConfig::redacted_url`] never
//! show it.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lock_core::{Error, Result};
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use url::Url;

use crate::BACKEND;

/// Which locking primitive the backend uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Mode {
    /// A lease table (default): key, owner, fencing token and expiry in a
    /// row; expiry decided by the database clock; leases survive restarts;
    /// waiters woken by `LISTEN/NOTIFY`.
    #[default]
    Lease,
    /// Session-level advisory locks, one dedicated connection per held lock;
    /// waiters queue in PostgreSQL's lock manager (fair and fast handoff).
    Advisory,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Lease => "lease",
            Mode::Advisory => "advisory",
        })
    }
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "lease" => Ok(Mode::Lease),
            "advisory" => Ok(Mode::Advisory),
            other => Err(Error::config(
                BACKEND,
                format!("distlock_mode must be `lease` or `advisory`, not {other:?}"),
            )),
        }
    }
}

/// TLS mode, as libpq's `sslmode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SslMode {
    /// No TLS.
    Disable,
    /// Plain first, TLS if the server insists.
    Allow,
    /// TLS if the server offers it, else plain (libpq's default). Not
    /// protected against an active attacker.
    #[default]
    Prefer,
    /// TLS, without checking the certificate (unless a root certificate is
    /// given, then as `verify-ca`).
    Require,
    /// TLS, certificate signed by a trusted CA.
    VerifyCa,
    /// TLS, trusted certificate whose name matches the host.
    VerifyFull,
}

impl FromStr for SslMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(Error::config(
                    BACKEND,
                    format!(
                        "sslmode must be one of disable, allow, prefer, require, verify-ca, verify-full, not {other:?}"
                    ),
                ));
            }
        })
    }
}

impl SslMode {
    fn to_sqlx(self) -> PgSslMode {
        match self {
            SslMode::Disable => PgSslMode::Disable,
            SslMode::Allow => PgSslMode::Allow,
            SslMode::Prefer => PgSslMode::Prefer,
            SslMode::Require => PgSslMode::Require,
            SslMode::VerifyCa => PgSslMode::VerifyCa,
            SslMode::VerifyFull => PgSslMode::VerifyFull,
        }
    }
}

/// A password that never shows up in `Debug` output.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret.
    pub fn new(secret: impl Into<String>) -> Self {
        Secret(secret.into())
    }

    /// The secret itself (for handing to the driver).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A validated `schema.table` name for the lease table.
///
/// Both parts are lower-case SQL identifiers (`[a-z_][a-z0-9_]*`, at most
/// 40 bytes each) so they never need quoting, derived names (`<table>_fencing`,
/// `<table>_fences`) stay under PostgreSQL's 63-byte limit, and the name can
/// be pasted into SQL safely.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TableName {
    schema: String,
    table: String,
}

impl TableName {
    /// Checks and builds `schema.table`.
    pub fn new(schema: &str, table: &str) -> Result<Self> {
        for (what, part) in [("schema", schema), ("table", table)] {
            let ok = !part.is_empty()
                && part.len() <= 40
                && part
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                && !part.as_bytes()[0].is_ascii_digit();
            if !ok {
                return Err(Error::config(
                    BACKEND,
                    format!(
                        "the {what} name {part:?} must be 1 to 40 characters of a-z, 0-9 and _, not starting with a digit"
                    ),
                ));
            }
        }
        Ok(TableName {
            schema: schema.to_string(),
            table: table.to_string(),
        })
    }

    /// The schema.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The table.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// `schema.table`.
    pub fn qualified(&self) -> String {
        format!("{}.{}", self.schema, self.table)
    }

    /// The fencing sequence, `schema.table_fencing`.
    pub fn sequence(&self) -> String {
        format!("{}.{}_fencing", self.schema, self.table)
    }

    /// The table of the fencing helper, `schema.table_fences`.
    pub fn fences(&self) -> String {
        format!("{}.{}_fences", self.schema, self.table)
    }
}

impl Default for TableName {
    fn default() -> Self {
        TableName {
            schema: "public".into(),
            table: "distlock_leases".into(),
        }
    }
}

impl FromStr for TableName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.split_once('.') {
            Some((schema, table)) => TableName::new(schema, table),
            None => TableName::new("public", s),
        }
    }
}

impl fmt::Display for TableName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.schema, self.table)
    }
}

/// Everything the PostgreSQL backend needs: where the server is, how to log
/// in, and how to lock.
///
/// Build it with [`PostgresConfig::builder`] or parse a URL with
/// [`PostgresConfig::from_url`] (see the [crate docs](crate) for the URL
/// format). `Debug` never shows the password.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PostgresConfig {
    /// Host name or IP address. Default `localhost`.
    pub host: String,
    /// Port. Default 5432.
    pub port: u16,
    /// User name. Default `postgres`.
    pub user: String,
    /// Password, if the server asks for one (SCRAM-SHA-256 or MD5).
    pub password: Option<Secret>,
    /// Database. Default: the user name.
    pub database: Option<String>,
    /// TLS mode. Default [`SslMode::Prefer`].
    pub ssl_mode: SslMode,
    /// CA certificate file (PEM) for `verify-ca`/`verify-full`.
    pub ssl_root_cert: Option<PathBuf>,
    /// Client certificate file (PEM).
    pub ssl_cert: Option<PathBuf>,
    /// Client key file (PEM).
    pub ssl_key: Option<PathBuf>,
    /// `application_name` shown in `pg_stat_activity`. Default `distlock`.
    pub application_name: String,
    /// Lease table or advisory locks. Default [`Mode::Lease`].
    pub mode: Mode,
    /// Lease table (and, derived from it, the fencing sequence). Default
    /// `public.distlock_leases`. Advisory mode uses only the sequence.
    pub table: TableName,
    /// Create the table and sequence when missing. Default on.
    pub create_schema: bool,
    /// Prefix put before every key (a namespace). Default empty.
    pub prefix: String,
    /// Connections in the shared pool (acquire, release, extend, inspect).
    /// Default 8.
    pub pool_size: u32,
    /// Advisory mode: connections for held and waited-for locks (one each).
    /// Default 64.
    pub advisory_pool_size: u32,
    /// How long to wait for a connection. Default 5 s.
    pub connect_timeout: Duration,
    /// How long one statement may take (also sent as `statement_timeout`,
    /// so the server gives up too). Default 5 s.
    pub request_timeout: Duration,
    /// How often a waiter re-checks a busy key without a notification.
    /// Default 2 s.
    pub recheck_interval: Duration,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            host: "localhost".into(),
            port: 5432,
            user: "postgres".into(),
            password: None,
            database: None,
            ssl_mode: SslMode::Prefer,
            ssl_root_cert: None,
            ssl_cert: None,
            ssl_key: None,
            application_name: "distlock".into(),
            mode: Mode::Lease,
            table: TableName::default(),
            create_schema: true,
            prefix: String::new(),
            pool_size: 8,
            advisory_pool_size: 64,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(5),
            recheck_interval: Duration::from_secs(2),
        }
    }
}

/// The libpq parameters we accept in a URL (others are rejected).
pub const LIBPQ_PARAMS: &[&str] = &[
    "sslmode",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "application_name",
    "connect_timeout",
];

/// Our own URL parameters.
pub const DISTLOCK_PARAMS: &[&str] = &[
    "distlock_mode",
    "distlock_table",
    "distlock_prefix",
    "distlock_create",
    "distlock_pool_size",
    "distlock_advisory_pool_size",
    "distlock_connect_timeout",
    "distlock_request_timeout",
    "distlock_recheck_interval",
];

fn duration(name: &str, v: &str) -> Result<Duration> {
    let d = humantime::parse_duration(v).map_err(|e| {
        Error::config(
            BACKEND,
            format!("{name} must be a duration such as 500ms or 5s, not {v:?}: {e}"),
        )
    })?;
    if d.is_zero() {
        return Err(Error::config(BACKEND, format!("{name} must be positive")));
    }
    Ok(d)
}

fn number(name: &str, v: &str) -> Result<u32> {
    match v.parse::<u32>() {
        Ok(n) if (1..=10_000).contains(&n) => Ok(n),
        _ => Err(Error::config(
            BACKEND,
            format!("{name} must be a number from 1 to 10000, not {v:?}"),
        )),
    }
}

fn boolean(name: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(Error::config(
            BACKEND,
            format!("{name} must be true or false, not {v:?}"),
        )),
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        if let Some(b) = escaped {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl PostgresConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> PostgresConfigBuilder {
        PostgresConfigBuilder {
            config: PostgresConfig::default(),
        }
    }

    /// Parses `postgres://user:password@host:port/database?param=value&...`
    /// (`postgresql://` works too). See the [crate docs](crate) for every
    /// parameter. Unknown parameters are an [`Error::Config`]; the error
    /// text never contains the password.
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = Url::parse(url).map_err(|e| {
            // The url crate's messages never echo the input, so no secret
            // leaks through them.
            Error::config(BACKEND, format!("not a valid URL: {e}"))
        })?;
        if !matches!(parsed.scheme(), "postgres" | "postgresql") {
            return Err(Error::config(
                BACKEND,
                format!(
                    "the URL scheme must be postgres:// or postgresql://, not {}://",
                    parsed.scheme()
                ),
            ));
        }
        let mut c = PostgresConfig::default();
        match parsed.host_str() {
            Some(h) if !h.is_empty() => {
                c.host = h.trim_start_matches('[').trim_end_matches(']').to_string()
            }
            _ => {
                return Err(Error::config(
                    BACKEND,
                    "the URL needs a host (Unix sockets are not supported)",
                ));
            }
        }
        if let Some(port) = parsed.port() {
            c.port = port;
        }
        if !parsed.username().is_empty() {
            c.user = percent_decode(parsed.username());
        }
        if let Some(pw) = parsed.password() {
            c.password = Some(Secret::new(percent_decode(pw)));
        }
        let db = parsed.path().trim_start_matches('/');
        if !db.is_empty() {
            c.database = Some(percent_decode(db));
        }
        if parsed.fragment().is_some() {
            return Err(Error::config(BACKEND, "the URL must not have a #fragment"));
        }
        let mut seen = std::collections::HashSet::new();
        for (k, v) in parsed.query_pairs() {
            let (k, v) = (k.into_owned(), v.into_owned());
            if !seen.insert(k.clone()) {
                return Err(Error::config(
                    BACKEND,
                    format!("the URL parameter {k} is given twice"),
                ));
            }
            match k.as_str() {
                "sslmode" => c.ssl_mode = v.parse()?,
                "sslrootcert" => c.ssl_root_cert = Some(PathBuf::from(v)),
                "sslcert" => c.ssl_cert = Some(PathBuf::from(v)),
                "sslkey" => c.ssl_key = Some(PathBuf::from(v)),
                "application_name" => c.application_name = v,
                "connect_timeout" => {
                    // libpq: whole seconds.
                    let secs = number("connect_timeout", &v)?;
                    c.connect_timeout = Duration::from_secs(u64::from(secs));
                }
                "distlock_mode" => c.mode = v.parse()?,
                "distlock_table" => c.table = v.parse()?,
                "distlock_prefix" => c.prefix = v,
                "distlock_create" => c.create_schema = boolean(&k, &v)?,
                "distlock_pool_size" => c.pool_size = number(&k, &v)?,
                "distlock_advisory_pool_size" => c.advisory_pool_size = number(&k, &v)?,
                "distlock_connect_timeout" => c.connect_timeout = duration(&k, &v)?,
                "distlock_request_timeout" => c.request_timeout = duration(&k, &v)?,
                "distlock_recheck_interval" => c.recheck_interval = duration(&k, &v)?,
                "password" => {
                    return Err(Error::config(
                        BACKEND,
                        "put the password in the URL's user-info part (user:password@host), not in a parameter",
                    ));
                }
                other => {
                    return Err(Error::config(
                        BACKEND,
                        format!(
                            "unknown URL parameter {other:?}; accepted libpq parameters: {}; distlock parameters: {}",
                            LIBPQ_PARAMS.join(", "),
                            DISTLOCK_PARAMS.join(", ")
                        ),
                    ));
                }
            }
        }
        c.validate()?;
        Ok(c)
    }

    /// Checks the values that a builder can set out of range.
    pub fn validate(&self) -> Result<()> {
        if self.host.is_empty() {
            return Err(Error::config(BACKEND, "the host must not be empty"));
        }
        if self.prefix.len() > 256 || self.prefix.chars().any(char::is_control) {
            return Err(Error::config(
                BACKEND,
                "the key prefix must be at most 256 bytes without control characters",
            ));
        }
        for (name, n) in [
            ("pool_size", self.pool_size),
            ("advisory_pool_size", self.advisory_pool_size),
        ] {
            if n == 0 {
                return Err(Error::config(BACKEND, format!("{name} must be at least 1")));
            }
        }
        for (name, d) in [
            ("connect_timeout", self.connect_timeout),
            ("request_timeout", self.request_timeout),
            ("recheck_interval", self.recheck_interval),
        ] {
            if d.is_zero() {
                return Err(Error::config(BACKEND, format!("{name} must be positive")));
            }
        }
        Ok(())
    }

    /// The URL without the password, for logs and error messages.
    pub fn redacted_url(&self) -> String {
        let pw = if self.password.is_some() { ":***" } else { "" };
        format!(
            "postgres://{}{pw}@{}:{}/{}?sslmode={}&distlock_mode={}&distlock_table={}",
            self.user,
            self.host,
            self.port,
            self.database.as_deref().unwrap_or(&self.user),
            match self.ssl_mode {
                SslMode::Disable => "disable",
                SslMode::Allow => "allow",
                SslMode::Prefer => "prefer",
                SslMode::Require => "require",
                SslMode::VerifyCa => "verify-ca",
                SslMode::VerifyFull => "verify-full",
            },
            self.mode,
            self.table,
        )
    }

    /// The driver's connection options. Every field is set here, so the
    /// `PG*` environment variables only fill in what this config leaves
    /// open (the password and TLS files, as libpq would).
    pub(crate) fn connect_options(&self) -> PgConnectOptions {
        self.connect_options_with(Some(self.request_timeout))
    }

    /// [`connect_options`](Self::connect_options) with a given
    /// `statement_timeout` (`None`: none, for connections that wait for
    /// advisory locks and are bounded by our own deadline instead).
    pub(crate) fn connect_options_with(
        &self,
        statement_timeout: Option<Duration>,
    ) -> PgConnectOptions {
        let mut o = PgConnectOptions::new_without_pgpass()
            .host(&self.host)
            .port(self.port)
            .username(&self.user)
            .database(self.database.as_deref().unwrap_or(&self.user))
            .ssl_mode(self.ssl_mode.to_sqlx())
            .application_name(&self.application_name)
            // Each statement runs once per connection: caching them costs
            // memory on the server and saves nothing measurable here.
            .statement_cache_capacity(32);
        if let Some(pw) = &self.password {
            o = o.password(pw.expose());
        }
        if let Some(p) = &self.ssl_root_cert {
            o = o.ssl_root_cert(p);
        }
        if let Some(p) = &self.ssl_cert {
            o = o.ssl_client_cert(p);
        }
        if let Some(p) = &self.ssl_key {
            o = o.ssl_client_key(p);
        }
        let statement_timeout = match statement_timeout {
            Some(d) => format!("{}ms", d.as_millis().max(1)),
            None => "0".to_string(),
        };
        o.options([
            // Fencing tokens must never be handed out from a sequence
            // value whose WAL record was not flushed: insist on synchronous
            // commit whatever the server or role default is.
            ("synchronous_commit", "on"),
            ("statement_timeout", statement_timeout.as_str()),
            ("idle_in_transaction_session_timeout", "60000"),
        ])
    }
}

/// Builds a [`PostgresConfig`] step by step.
///
/// ```
/// use std::time::Duration;
/// use lock_postgres::{Mode, PostgresConfig};
/// let config = PostgresConfig::builder()
///     .host("db.internal")
///     .user("app")
///     .password("s3cret")
///     .database("app")
///     .mode(Mode::Advisory)
///     .prefix("billing/")
///     .request_timeout(Duration::from_secs(2))
///     .build()?;
/// assert!(!format!("{config:?}").contains("s3cret"));
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct PostgresConfigBuilder {
    config: PostgresConfig,
}

impl PostgresConfigBuilder {
    /// Sets the host.
    pub fn host(mut self, host: impl Into<String>) -> Self {
        self.config.host = host.into();
        self
    }
    /// Sets the port.
    pub fn port(mut self, port: u16) -> Self {
        self.config.port = port;
        self
    }
    /// Sets the user.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.config.user = user.into();
        self
    }
    /// Sets the password.
    pub fn password(mut self, password: impl Into<String>) -> Self {
        self.config.password = Some(Secret::new(password));
        self
    }
    /// Sets the database.
    pub fn database(mut self, database: impl Into<String>) -> Self {
        self.config.database = Some(database.into());
        self
    }
    /// Sets the TLS mode.
    pub fn ssl_mode(mut self, mode: SslMode) -> Self {
        self.config.ssl_mode = mode;
        self
    }
    /// Sets the CA certificate file.
    pub fn ssl_root_cert(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.ssl_root_cert = Some(path.into());
        self
    }
    /// Sets the client certificate and key files.
    pub fn ssl_client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.config.ssl_cert = Some(cert.into());
        self.config.ssl_key = Some(key.into());
        self
    }
    /// Sets the application name.
    pub fn application_name(mut self, name: impl Into<String>) -> Self {
        self.config.application_name = name.into();
        self
    }
    /// Sets the mode.
    pub fn mode(mut self, mode: Mode) -> Self {
        self.config.mode = mode;
        self
    }
    /// Sets the lease table.
    pub fn table(mut self, table: TableName) -> Self {
        self.config.table = table;
        self
    }
    /// Whether to create the table and sequence when missing.
    pub fn create_schema(mut self, on: bool) -> Self {
        self.config.create_schema = on;
        self
    }
    /// Sets the key prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.config.prefix = prefix.into();
        self
    }
    /// Sets the shared pool's size.
    pub fn pool_size(mut self, n: u32) -> Self {
        self.config.pool_size = n;
        self
    }
    /// Sets the advisory-mode connection limit.
    pub fn advisory_pool_size(mut self, n: u32) -> Self {
        self.config.advisory_pool_size = n;
        self
    }
    /// Sets the connect timeout.
    pub fn connect_timeout(mut self, d: Duration) -> Self {
        self.config.connect_timeout = d;
        self
    }
    /// Sets the per-statement timeout.
    pub fn request_timeout(mut self, d: Duration) -> Self {
        self.config.request_timeout = d;
        self
    }
    /// Sets the fallback re-check interval.
    pub fn recheck_interval(mut self, d: Duration) -> Self {
        self.config.recheck_interval = d;
        self
    }
    /// Checks and returns the config.
    pub fn build(self) -> Result<PostgresConfig> {
        self.config.validate()?;
        Ok(self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_full_url() {
        let c = PostgresConfig::from_url(
            "postgres://app:p%40ss@db:6543/locks?sslmode=verify-full&sslrootcert=/ca.pem&distlock_mode=advisory&distlock_table=locks.leases&distlock_prefix=a/b&distlock_request_timeout=250ms&connect_timeout=3",
        )
        .unwrap();
        assert_eq!(c.host, "db");
        assert_eq!(c.port, 6543);
        assert_eq!(c.user, "app");
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("p@ss"));
        assert_eq!(c.database.as_deref(), Some("locks"));
        assert_eq!(c.ssl_mode, SslMode::VerifyFull);
        assert_eq!(c.mode, Mode::Advisory);
        assert_eq!(c.table.qualified(), "locks.leases");
        assert_eq!(c.prefix, "a/b");
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(c.connect_timeout, Duration::from_secs(3));
    }

    #[test]
    fn rejects_bad_urls_without_echoing_the_password() {
        for bad in [
            "postgres://u:hunter2@h/db?sslmod=require",
            "postgres://u:hunter2@h/db?distlock_mode=fast",
            "postgres://u:hunter2@h/db?distlock_table=Bad-Name",
            "postgres://u:hunter2@h/db?distlock_pool_size=0",
            "postgres://u:hunter2@h/db?sslmode=require&sslmode=disable",
            "postgres://u:hunter2@h/db?password=hunter2",
            "mysql://u:hunter2@h/db",
            "postgres://u:hunter2@:5432/db",
            "not a url hunter2",
            "postgres://u:hunter2@h:99999/db",
        ] {
            let err = PostgresConfig::from_url(bad).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
            assert!(!err.to_string().contains("hunter2"), "{err}");
            assert!(!format!("{err:?}").contains("hunter2"), "{err:?}");
        }
    }

    #[test]
    fn debug_and_redacted_url_hide_the_password() {
        let c = PostgresConfig::from_url("postgres://u:hunter2@h/db").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!format!("{c:#?}").contains("hunter2"));
        assert!(!c.redacted_url().contains("hunter2"));
        assert!(c.redacted_url().contains(":***@"));
    }

    #[test]
    fn table_names() {
        assert!("public.ok_1".parse::<TableName>().is_ok());
        assert_eq!("t".parse::<TableName>().unwrap().qualified(), "public.t");
        for bad in [
            "",
            "a.",
            ".b",
            "a.b.c",
            "A.b",
            "a;drop.b",
            "1a.b",
            &"x".repeat(41),
        ] {
            assert!(bad.parse::<TableName>().is_err(), "{bad}");
        }
    }
}
