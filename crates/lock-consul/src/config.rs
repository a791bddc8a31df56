//! Configuration: a typed builder and a URL form, checked before anything is
//! sent (consulrs panics on some bad input, so nothing unchecked reaches it).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lock_core::{Error, Result};
use url::Url;

use crate::BACKEND;

/// What Consul does with our lock entries when our session is invalidated
/// (the client died or was cut off for longer than the session TTL).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum SessionBehavior {
    /// The entries stay, unlocked (Consul's default, and what `consul lock`
    /// uses).
    #[default]
    Release,
    /// The entries are deleted, so no empty lock entries are left behind.
    Delete,
}

impl SessionBehavior {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            SessionBehavior::Release => "release",
            SessionBehavior::Delete => "delete",
        }
    }
}

impl FromStr for SessionBehavior {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "release" => Ok(SessionBehavior::Release),
            "delete" => Ok(SessionBehavior::Delete),
            _ => Err(Error::config(
                BACKEND,
                format!("behavior must be release or delete, not {s:?}"),
            )),
        }
    }
}

/// A secret string: never shown by `Debug` or `Display`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// The Consul backend's settings.
///
/// Build it with [`ConsulConfig::builder`] or parse a URL with
/// [`ConsulConfig::from_url`] (or `str::parse`). `Debug` and `Display` never
/// show the ACL token.
///
/// ```
/// use std::time::Duration;
/// use lock_consul::ConsulConfig;
///
/// let cfg = ConsulConfig::builder()
///     .address("127.0.0.1:8500")
///     .token("s3cr3t-token")
///     .prefix("myapp/locks")
///     .session_ttl(Duration::from_secs(15))
///     .build()?;
/// assert!(!format!("{cfg:?}").contains("s3cr3t"));
///
/// let same: ConsulConfig =
///     "consul://127.0.0.1:8500?token=s3cr3t-token&prefix=myapp/locks&session_ttl=15s".parse()?;
/// assert_eq!(cfg, same);
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConsulConfig {
    pub(crate) tls: bool,
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) token: Option<Secret>,
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) prefix: String,
    pub(crate) session_ttl: Duration,
    pub(crate) session_ttl_min: Duration,
    pub(crate) lock_delay: Duration,
    pub(crate) behavior: SessionBehavior,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) wait: Duration,
}

/// Consul's default HTTP API port.
pub const DEFAULT_PORT: u16 = 8500;
/// The default key prefix.
pub const DEFAULT_PREFIX: &str = "distlock";
/// The default session TTL. Locks need a TTL of at least twice the session
/// TTL, so this makes the default lock TTL of
/// [`LockOptions`](lock_core::LockOptions) (30 s) the shortest one.
pub const DEFAULT_SESSION_TTL: Duration = Duration::from_secs(15);
/// The default of the agents' shortest session TTL (their
/// `session_ttl_min`, which is 10 s unless configured).
pub const DEFAULT_SESSION_TTL_MIN: Duration = Duration::from_secs(10);
/// The default lock-delay: Consul's own default.
pub const DEFAULT_LOCK_DELAY: Duration = Duration::from_secs(15);
/// Consul caps the lock-delay at one minute.
pub const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
/// Consul's maximum session TTL.
pub const MAX_SESSION_TTL: Duration = Duration::from_secs(86_400);

impl Default for ConsulConfig {
    fn default() -> Self {
        ConsulConfig {
            tls: false,
            host: "127.0.0.1".into(),
            port: DEFAULT_PORT,
            token: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            prefix: DEFAULT_PREFIX.into(),
            session_ttl: DEFAULT_SESSION_TTL,
            session_ttl_min: DEFAULT_SESSION_TTL_MIN,
            lock_delay: DEFAULT_LOCK_DELAY,
            behavior: SessionBehavior::Release,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(5),
            wait: Duration::from_secs(30),
        }
    }
}

impl ConsulConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> ConsulConfigBuilder {
        ConsulConfigBuilder {
            cfg: ConsulConfig::default(),
            address: None,
        }
    }

    /// Parses the URL form; see the [crate docs](crate#url) for every
    /// parameter.
    pub fn from_url(url: &str) -> Result<Self> {
        // Never echo the URL: it may carry the token.
        let parsed = Url::parse(url)
            .map_err(|e| Error::config(BACKEND, format!("not a valid URL ({e})")))?;
        let tls = match parsed.scheme() {
            "consul" | "consul+http" => false,
            "consuls" | "consul+https" => true,
            other => {
                return Err(Error::config(
                    BACKEND,
                    format!(
                        "unknown URL scheme {other:?} (use consul://, consul+http://, consuls:// or consul+https://)"
                    ),
                ));
            }
        };
        if !parsed.username().is_empty() || parsed.password().is_some() {
            return Err(Error::config(
                BACKEND,
                "user information in the URL is not supported; pass the ACL token as ?token=",
            ));
        }
        if !(parsed.path().is_empty() || parsed.path() == "/") {
            return Err(Error::config(
                BACKEND,
                "the URL must not have a path; use ?prefix= for the key prefix",
            ));
        }
        if parsed.fragment().is_some() {
            return Err(Error::config(BACKEND, "the URL must not have a #fragment"));
        }
        let host = match parsed.host() {
            Some(url::Host::Domain(d)) => d.to_string(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return Err(Error::config(BACKEND, "the URL has no host")),
        };
        let mut b = ConsulConfig::builder();
        b.cfg.tls = tls;
        b.cfg.host = host;
        b.cfg.port = parsed.port().unwrap_or(DEFAULT_PORT);
        let mut seen: Vec<String> = Vec::new();
        for (name, value) in parsed.query_pairs() {
            if seen.iter().any(|s| *s == name) {
                return Err(Error::config(
                    BACKEND,
                    format!("query parameter {name:?} is given twice"),
                ));
            }
            seen.push(name.to_string());
            b = b.set(&name, &value)?;
        }
        b.build()
    }

    /// The HTTP API base URL, such as `https://127.0.0.1:8501`.
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.port)
    }

    /// The key prefix (no leading or trailing `/`; may be empty).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The session TTL.
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }

    /// The shortest session TTL the agents accept (their `session_ttl_min`).
    pub fn session_ttl_min(&self) -> Duration {
        self.session_ttl_min
    }

    /// The shortest lock TTL: twice the session TTL (see the crate docs).
    pub fn min_lock_ttl(&self) -> Duration {
        self.session_ttl * 2
    }

    /// The session lock-delay.
    pub fn lock_delay(&self) -> Duration {
        self.lock_delay
    }

    /// What Consul does with our entries when our session is invalidated.
    pub fn behavior(&self) -> SessionBehavior {
        self.behavior
    }

    /// Whether an ACL token is set (the token itself is never shown).
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The Consul key of the lock entry for `key`: `<prefix>/<escaped key>/.lock`
    /// (the layout of `consul lock <prefix>/<key>`).
    pub fn entry_key(&self, key: &lock_core::Key) -> String {
        if self.prefix.is_empty() {
            format!("{}/.lock", key.escaped())
        } else {
            format!("{}/{}/.lock", self.prefix, key.escaped())
        }
    }
}

impl FromStr for ConsulConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ConsulConfig::from_url(s)
    }
}

/// The URL form, with the token shown as `***`.
impl fmt::Display for ConsulConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "consuls" } else { "consul" };
        let d = |t: Duration| humantime::format_duration(t).to_string();
        let mut q = url::form_urlencoded::Serializer::new(String::new());
        q.append_pair("prefix", &self.prefix);
        if self.token.is_some() {
            q.append_pair("token", "***");
        }
        for (name, path) in [
            ("ca_file", &self.ca_file),
            ("cert_file", &self.cert_file),
            ("key_file", &self.key_file),
        ] {
            if let Some(p) = path {
                q.append_pair(name, &p.display().to_string());
            }
        }
        q.append_pair("session_ttl", &d(self.session_ttl))
            .append_pair("session_ttl_min", &d(self.session_ttl_min))
            .append_pair("lock_delay", &d(self.lock_delay))
            .append_pair("behavior", self.behavior.as_str())
            .append_pair("connect_timeout", &d(self.connect_timeout))
            .append_pair("request_timeout", &d(self.request_timeout))
            .append_pair("wait", &d(self.wait));
        write!(f, "{scheme}://{}:{}?{}", self.host, self.port, q.finish())
    }
}

/// Builds a [`ConsulConfig`]; [`build`](Self::build) checks every value.
#[derive(Clone, Debug)]
pub struct ConsulConfigBuilder {
    cfg: ConsulConfig,
    address: Option<String>,
}

impl ConsulConfigBuilder {
    /// The agent's HTTP address: `host:port`, `host` (port 8500), or an
    /// `http://` / `https://` URL without a path.
    pub fn address(mut self, address: impl Into<String>) -> Self {
        self.address = Some(address.into());
        self
    }

    /// Uses HTTPS (implied by an `https://` address).
    pub fn tls(mut self, on: bool) -> Self {
        self.cfg.tls = on;
        self
    }

    /// The ACL token, sent as `X-Consul-Token`. Never shown anywhere.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.cfg.token = Some(Secret(token.into()));
        self
    }

    /// A PEM file with the CA certificate(s) to trust (in addition to the
    /// built-in roots). Implies TLS.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.ca_file = Some(path.into());
        self.cfg.tls = true;
        self
    }

    /// A client certificate (PEM) for agents that verify clients
    /// (`verify_incoming`); needs [`key_file`](Self::key_file). Implies TLS.
    pub fn cert_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.cert_file = Some(path.into());
        self.cfg.tls = true;
        self
    }

    /// The client certificate's private key (PEM, PKCS#8 or RSA).
    pub fn key_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.key_file = Some(path.into());
        self.cfg.tls = true;
        self
    }

    /// The key prefix (default `distlock`); `""` puts lock entries at the
    /// root. Segments of `A–Z a–z 0–9 - _ . ~` separated by `/`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.cfg.prefix = prefix.into();
        self
    }

    /// The session TTL (default 15 s). A crashed client's locks stay taken
    /// for up to twice this, plus the lock-delay; locks need a TTL of at
    /// least twice this.
    pub fn session_ttl(mut self, ttl: Duration) -> Self {
        self.cfg.session_ttl = ttl;
        self
    }

    /// The shortest session TTL the agents accept: their `session_ttl_min`
    /// setting (Consul's default, and ours, is 10 s).
    pub fn session_ttl_min(mut self, ttl: Duration) -> Self {
        self.cfg.session_ttl_min = ttl;
        self
    }

    /// The session lock-delay (default 15 s, at most 60 s; 0 turns it off).
    pub fn lock_delay(mut self, delay: Duration) -> Self {
        self.cfg.lock_delay = delay;
        self
    }

    /// What happens to our entries when our session is invalidated.
    pub fn behavior(mut self, behavior: SessionBehavior) -> Self {
        self.cfg.behavior = behavior;
        self
    }

    /// How long to wait for a TCP (and TLS) connection (default 2 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.cfg.connect_timeout = t;
        self
    }

    /// How long to wait for any answer except blocking queries (default 5 s).
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.cfg.request_timeout = t;
        self
    }

    /// How long one blocking query waits on the server (default 30 s).
    pub fn wait(mut self, t: Duration) -> Self {
        self.cfg.wait = t;
        self
    }

    /// Sets one option from its URL form.
    fn set(mut self, name: &str, value: &str) -> Result<Self> {
        let dur = |v: &str| {
            humantime::parse_duration(v).map_err(|e| {
                Error::config(BACKEND, format!("{name}: {v:?} is not a duration ({e})"))
            })
        };
        match name {
            // Never echo the token's value.
            "token" => self = self.token(value),
            "ca_file" => self = self.ca_file(value),
            "cert_file" => self = self.cert_file(value),
            "key_file" => self = self.key_file(value),
            "prefix" => self = self.prefix(value),
            "session_ttl" => self = self.session_ttl(dur(value)?),
            "session_ttl_min" => self = self.session_ttl_min(dur(value)?),
            "lock_delay" => self = self.lock_delay(dur(value)?),
            "behavior" => self = self.behavior(value.parse()?),
            "connect_timeout" => self = self.connect_timeout(dur(value)?),
            "request_timeout" => self = self.request_timeout(dur(value)?),
            "wait" => self = self.wait(dur(value)?),
            _ => {
                return Err(Error::config(
                    BACKEND,
                    format!(
                        "unknown query parameter {name:?} (known: token, ca_file, cert_file, key_file, prefix, session_ttl, \
                         session_ttl_min, lock_delay, behavior, connect_timeout, request_timeout, wait)"
                    ),
                ));
            }
        }
        Ok(self)
    }

    /// Checks every value and returns the configuration.
    pub fn build(mut self) -> Result<ConsulConfig> {
        if let Some(address) = self.address.take() {
            let (tls, host, port) = parse_address(&address)?;
            self.cfg.tls |= tls;
            self.cfg.host = host;
            self.cfg.port = port;
        }
        let c = self.cfg;
        let bad = |m: String| Err(Error::config(BACKEND, m));
        if let Some(t) = &c.token {
            // A header value must be visible ASCII (consulrs would panic on
            // anything else). Do not show the token in the message.
            if t.0.is_empty() || !t.0.bytes().all(|b| b.is_ascii_graphic()) {
                return bad(
                    "the ACL token must be non-empty visible ASCII (no spaces or control characters)"
                        .into(),
                );
            }
        }
        if c.cert_file.is_some() != c.key_file.is_some() {
            return bad("cert_file and key_file go together".into());
        }
        check_prefix(&c.prefix)?;
        if c.session_ttl_min.is_zero() || c.session_ttl_min > MAX_SESSION_TTL {
            return bad(format!(
                "session_ttl_min must be between 1ms and 24h, not {}",
                humantime::format_duration(c.session_ttl_min)
            ));
        }
        if c.session_ttl < c.session_ttl_min || c.session_ttl * 2 > MAX_SESSION_TTL {
            return bad(format!(
                "session_ttl must be between session_ttl_min ({}) and 12h, not {}",
                humantime::format_duration(c.session_ttl_min),
                humantime::format_duration(c.session_ttl)
            ));
        }
        if c.lock_delay > MAX_LOCK_DELAY {
            return bad(format!(
                "lock_delay must be at most 60s (Consul's cap), not {}",
                humantime::format_duration(c.lock_delay)
            ));
        }
        for (name, d) in [
            ("connect_timeout", c.connect_timeout),
            ("request_timeout", c.request_timeout),
        ] {
            if d.is_zero() || d > Duration::from_secs(600) {
                return bad(format!("{name} must be between 1ms and 10m"));
            }
        }
        if c.wait < Duration::from_secs(1) || c.wait > Duration::from_secs(600) {
            return bad("wait must be between 1s and 10m (Consul's limit)".into());
        }
        Ok(c)
    }
}

fn parse_address(address: &str) -> Result<(bool, String, u16)> {
    let with_scheme = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    let u = Url::parse(&with_scheme)
        .map_err(|e| Error::config(BACKEND, format!("invalid address ({e})")))?;
    let tls = match u.scheme() {
        "http" => false,
        "https" => true,
        s => {
            return Err(Error::config(
                BACKEND,
                format!("address scheme must be http or https, not {s:?}"),
            ));
        }
    };
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Error::config(
            BACKEND,
            "user information in the address is not supported; use token()",
        ));
    }
    if !(u.path().is_empty() || u.path() == "/") || u.query().is_some() || u.fragment().is_some() {
        return Err(Error::config(
            BACKEND,
            "the address must be host:port or a URL without path or query",
        ));
    }
    let host = match u.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
        None => return Err(Error::config(BACKEND, "the address has no host")),
    };
    let port = u.port().unwrap_or(if tls && address.contains("://") {
        443
    } else {
        DEFAULT_PORT
    });
    Ok((tls, host, port))
}

fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    let ok = prefix.len() <= 256
        && prefix.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~'))
        });
    if ok {
        Ok(())
    } else {
        Err(Error::config(
            BACKEND,
            format!(
                "prefix {prefix:?} must be up to 256 bytes of `/`-separated segments of A-Z a-z 0-9 - _ . ~ \
                 (no empty, `.` or `..` segments, no leading or trailing `/`)"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_url_round_trip() {
        let c: ConsulConfig = "consul://localhost".parse().unwrap();
        assert_eq!(c.base_url(), "http://localhost:8500");
        assert_eq!(c.prefix(), "distlock");
        assert_eq!(c.session_ttl(), DEFAULT_SESSION_TTL);
        let back: ConsulConfig = c.to_string().parse().unwrap();
        assert_eq!(back, c);
        let s: ConsulConfig = "consuls://h:8501?ca_file=/x/my%20ca%26.pem&behavior=delete&lock_delay=0s&session_ttl_min=1s&session_ttl=2s&prefix="
            .parse()
            .unwrap();
        assert_eq!(s.base_url(), "https://h:8501");
        assert_eq!(s.behavior(), SessionBehavior::Delete);
        assert_eq!(s.lock_delay(), Duration::ZERO);
        assert_eq!(s.prefix(), "");
        assert_eq!(
            s.ca_file.as_deref(),
            Some(std::path::Path::new("/x/my ca&.pem"))
        );
        let back: ConsulConfig = s.to_string().parse().unwrap();
        assert_eq!(back, s);
        let k = lock_core::Key::new("a/b").unwrap();
        assert_eq!(s.entry_key(&k), "a%2Fb/.lock");
        assert_eq!(c.entry_key(&k), "distlock/a%2Fb/.lock");
    }

    #[test]
    fn rejects_bad_urls_without_echoing_the_token() {
        for bad in [
            "http://h:8500",
            "consul://",
            "consul://h?colour=red",
            "consul://h?token=abc&token=abc",
            "consul://user:pw@h",
            "consul://h/some/path",
            "consul://h?session_ttl=ten",
            "consul://h?session_ttl=5s",
            "consul://h?session_ttl_min=1s&session_ttl=100000s",
            "consul://h?min_ttl=1s",
            "consul://h?lock_delay=2m",
            "consul://h?prefix=/a",
            "consul://h?prefix=a//b",
            "consul://h?prefix=a/../b",
            "consul://h?prefix=a%20b",
            "consul://h?behavior=keep",
            "consul://h?token=has%20space-SECRETVALUE",
            "consul://h?wait=0s",
            "consul://h?cert_file=/c.pem",
            "consul://h:99999",
        ] {
            let err = bad.parse::<ConsulConfig>().unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err}");
            let text = format!("{err} {err:?}");
            assert!(!text.contains("SECRETVALUE"), "{text}");
            assert!(!text.contains("pw"), "{text}");
        }
    }

    #[test]
    fn token_is_never_shown() {
        let c: ConsulConfig = "consul://h?token=TOPSECRET-1".parse().unwrap();
        assert!(c.has_token());
        assert!(!format!("{c:?}").contains("TOPSECRET"));
        assert!(!c.to_string().contains("TOPSECRET"));
        let b = ConsulConfig::builder().token("TOPSECRET-2");
        assert!(!format!("{b:?}").contains("TOPSECRET"));
    }

    #[test]
    fn builder_addresses() {
        let c = ConsulConfig::builder()
            .address("https://consul.example:8501")
            .build()
            .unwrap();
        assert_eq!(c.base_url(), "https://consul.example:8501");
        let c = ConsulConfig::builder().address("10.0.0.1").build().unwrap();
        assert_eq!(c.base_url(), "http://10.0.0.1:8500");
        for bad in ["ftp://h", "h:notaport", "http://h/x", "http://u:p@h"] {
            assert!(
                ConsulConfig::builder().address(bad).build().is_err(),
                "{bad}"
            );
        }
    }
}
