//! Configuration: a typed builder and a URL form.
//!
//! Both produce the same [`EtcdConfig`]. The URL form exists so that a lock
//! store can be chosen by one string in a config file or environment
//! variable; the builder exists so that programs can set every field with
//! types (durations, paths) instead of strings. Unknown URL parameters are
//! rejected rather than ignored: a misspelt `conect_timeout` silently falling
//! back to the default is the kind of mistake that surfaces only in an
//! outage.
//!
//! Passwords never leave this module in readable form: `Debug` and `Display`
//! print `***` instead.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use lock_core::{Error, Result};

use crate::BACKEND;

/// The namespace used when none is given: every lock lives under
/// `distlock/`.
pub const DEFAULT_PREFIX: &str = "distlock/";

/// How to reach etcd and where the locks live.
///
/// Build it with [`EtcdConfig::builder`] or parse a URL with
/// [`EtcdConfig::from_url`] (also `"...".parse()`):
///
/// ```
/// use std::time::Duration;
/// use lock_etcd::EtcdConfig;
///
/// let a = EtcdConfig::from_url("etcd://app:s3cret@10.0.0.1:2379,10.0.0.2:2379?prefix=locks/&connect_timeout=2s")?;
/// let b = EtcdConfig::builder()
///     .endpoint("10.0.0.1:2379")
///     .endpoint("10.0.0.2:2379")
///     .user("app", "s3cret")
///     .prefix("locks/")
///     .connect_timeout(Duration::from_secs(2))
///     .build()?;
/// assert_eq!(a, b);
/// assert!(!format!("{a:?}").contains("s3cret"));
/// # Ok::<(), lock_core::Error>(())
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    pub(crate) endpoints: Vec<String>,
    pub(crate) tls: Option<TlsConfig>,
    pub(crate) user: Option<(String, String)>,
    pub(crate) prefix: String,
    pub(crate) connect_timeout: Duration,
    pub(crate) request_timeout: Duration,
    pub(crate) recheck_interval: Duration,
}

/// TLS settings (`etcds://`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct TlsConfig {
    pub(crate) ca_file: Option<PathBuf>,
    pub(crate) cert_file: Option<PathBuf>,
    pub(crate) key_file: Option<PathBuf>,
    pub(crate) domain: Option<String>,
}

impl EtcdConfig {
    /// A builder with the defaults: no endpoint yet, plain HTTP/2, no
    /// authentication, prefix [`DEFAULT_PREFIX`], connect and request
    /// timeouts of 5 s, fallback re-check every 5 s.
    pub fn builder() -> EtcdConfigBuilder {
        EtcdConfigBuilder::default()
    }

    /// Parses a URL; see the [crate docs](crate#url) for the format.
    pub fn from_url(url: &str) -> Result<Self> {
        parse_url(url)
    }

    /// The endpoints (`host:port`).
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// The namespace prefix put in front of every lock's etcd key.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The user name, if authentication is on (the password is never
    /// exposed).
    pub fn user_name(&self) -> Option<&str> {
        self.user.as_ref().map(|(u, _)| u.as_str())
    }

    /// Timeout for establishing a connection.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }

    /// Timeout for each request.
    pub fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// How often a waiter re-checks its position if no watch event arrives.
    pub fn recheck_interval(&self) -> Duration {
        self.recheck_interval
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        self.endpoints
            .iter()
            .map(|e| format!("{scheme}://{e}"))
            .collect()
    }
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("user", &self.user.as_ref().map(|(u, _)| (u, "***")))
            .field("prefix", &self.prefix)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("recheck_interval", &self.recheck_interval)
            .finish()
    }
}

/// The URL form, with the password replaced by `***`.
impl fmt::Display for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls.is_some() { "etcds" } else { "etcd" };
        write!(f, "{scheme}://")?;
        if let Some((user, _)) = &self.user {
            write!(f, "{}:***@", encode(user))?;
        }
        write!(f, "{}", self.endpoints.join(","))?;
        write!(f, "?prefix={}", encode(&self.prefix))?;
        write!(
            f,
            "&connect_timeout={}&request_timeout={}&recheck_interval={}",
            humantime::format_duration(self.connect_timeout),
            humantime::format_duration(self.request_timeout),
            humantime::format_duration(self.recheck_interval),
        )?;
        if let Some(tls) = &self.tls {
            for (name, path) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ] {
                if let Some(p) = path {
                    write!(f, "&{name}={}", encode(&p.display().to_string()))?;
                }
            }
            if let Some(d) = &tls.domain {
                write!(f, "&domain={}", encode(d))?;
            }
        }
        Ok(())
    }
}

impl FromStr for EtcdConfig {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        parse_url(s)
    }
}

/// Builds an [`EtcdConfig`]; [`build`](Self::build) checks it.
#[derive(Clone)]
pub struct EtcdConfigBuilder {
    cfg: EtcdConfig,
}

impl Default for EtcdConfigBuilder {
    fn default() -> Self {
        EtcdConfigBuilder {
            cfg: EtcdConfig {
                endpoints: Vec::new(),
                tls: None,
                user: None,
                prefix: DEFAULT_PREFIX.to_string(),
                connect_timeout: Duration::from_secs(5),
                request_timeout: Duration::from_secs(5),
                recheck_interval: Duration::from_secs(5),
            },
        }
    }
}

impl fmt::Debug for EtcdConfigBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("EtcdConfigBuilder").field(&self.cfg).finish()
    }
}

impl EtcdConfigBuilder {
    /// Adds an endpoint, `host:port` (IPv6 as `[::1]:2379`).
    pub fn endpoint(mut self, host_port: impl Into<String>) -> Self {
        self.cfg.endpoints.push(host_port.into());
        self
    }

    /// Authenticates as `user` with `password`.
    pub fn user(mut self, user: impl Into<String>, password: impl Into<String>) -> Self {
        self.cfg.user = Some((user.into(), password.into()));
        self
    }

    /// Turns TLS on. No system or bundled root certificates are loaded, so
    /// give the CA that signed the server's certificate with
    /// [`ca_file`](Self::ca_file).
    pub fn tls(mut self, on: bool) -> Self {
        self.cfg.tls = if on {
            Some(self.cfg.tls.take().unwrap_or_default())
        } else {
            None
        };
        self
    }

    /// The CA certificate (PEM) that signed the server's certificate. Turns
    /// TLS on.
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.tls.get_or_insert_with(TlsConfig::default).ca_file = Some(path.into());
        self
    }

    /// A client certificate and key (PEM) for mutual TLS. Turns TLS on.
    pub fn client_cert(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        let tls = self.cfg.tls.get_or_insert_with(TlsConfig::default);
        tls.cert_file = Some(cert.into());
        tls.key_file = Some(key.into());
        self
    }

    /// The name to verify the server's certificate against, when it differs
    /// from the endpoint's host. Turns TLS on.
    pub fn domain(mut self, name: impl Into<String>) -> Self {
        self.cfg.tls.get_or_insert_with(TlsConfig::default).domain = Some(name.into());
        self
    }

    /// The namespace put in front of every lock's etcd key (default
    /// [`DEFAULT_PREFIX`]). Use `""` to meet `etcdctl lock NAME` on the
    /// distlock key `NAME`.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.cfg.prefix = prefix.into();
        self
    }

    /// Timeout for establishing a connection (default 5 s).
    pub fn connect_timeout(mut self, t: Duration) -> Self {
        self.cfg.connect_timeout = t;
        self
    }

    /// Timeout for each request (default 5 s).
    pub fn request_timeout(mut self, t: Duration) -> Self {
        self.cfg.request_timeout = t;
        self
    }

    /// How often a waiter re-checks its queue position when no watch event
    /// arrives (default 5 s): the fallback for a lost notification.
    pub fn recheck_interval(mut self, t: Duration) -> Self {
        self.cfg.recheck_interval = t;
        self
    }

    /// Checks and returns the configuration.
    pub fn build(self) -> Result<EtcdConfig> {
        let cfg = self.cfg;
        if cfg.endpoints.is_empty() {
            return Err(Error::config(BACKEND, "at least one endpoint is required"));
        }
        for e in &cfg.endpoints {
            check_endpoint(e)?;
        }
        for (name, d) in [
            ("connect_timeout", cfg.connect_timeout),
            ("request_timeout", cfg.request_timeout),
            ("recheck_interval", cfg.recheck_interval),
        ] {
            if d.is_zero() {
                return Err(Error::config(BACKEND, format!("{name} must be positive")));
            }
        }
        if cfg.prefix.chars().any(char::is_control) {
            return Err(Error::config(
                BACKEND,
                "the prefix must not contain control characters",
            ));
        }
        if let Some((user, _)) = &cfg.user
            && user.is_empty()
        {
            return Err(Error::config(BACKEND, "the user name must not be empty"));
        }
        if let Some(tls) = &cfg.tls
            && tls.cert_file.is_some() != tls.key_file.is_some()
        {
            return Err(Error::config(
                BACKEND,
                "cert_file and key_file must be given together",
            ));
        }
        Ok(cfg)
    }
}

fn check_endpoint(e: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::config(BACKEND, format!("endpoint {e:?}: {why}")));
    let (host, port) = if let Some(rest) = e.strip_prefix('[') {
        match rest.split_once("]:") {
            Some((h, p)) => (h, p),
            None => return bad("expected [ipv6]:port"),
        }
    } else {
        match e.rsplit_once(':') {
            Some((h, p)) => (h, p),
            None => return bad("expected host:port"),
        }
    };
    if host.is_empty()
        || host
            .chars()
            .any(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':')))
    {
        return bad("invalid host");
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => bad("invalid port (1-65535)"),
    }
}

fn parse_url(url: &str) -> Result<EtcdConfig> {
    let bad = |why: String| Error::config(BACKEND, why);
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| bad("expected a URL like etcd://host:2379".into()))?;
    let tls = match scheme {
        "etcd" => false,
        "etcds" => true,
        other => {
            return Err(bad(format!(
                "unknown scheme {other:?} (expected etcd:// or etcds://)"
            )));
        }
    };
    let (authority_path, query) = match rest.split_once('?') {
        Some((a, q)) => (a, Some(q)),
        None => (rest, None),
    };
    if authority_path.contains('#') || query.is_some_and(|q| q.contains('#')) {
        return Err(bad("a URL fragment (#...) is not allowed".into()));
    }
    let authority = match authority_path.split_once('/') {
        Some((a, "")) => a,
        Some(_) => {
            return Err(bad(
                "the URL has no path; set the namespace with ?prefix=".into()
            ));
        }
        None => authority_path,
    };
    let mut b = EtcdConfig::builder().tls(tls);
    let hosts = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => {
            let (user, pass) = userinfo.split_once(':').unwrap_or((userinfo, ""));
            b = b.user(decode(user)?, decode(pass)?);
            hosts
        }
        None => authority,
    };
    if hosts.is_empty() {
        return Err(bad("the URL names no host".into()));
    }
    for h in hosts.split(',') {
        b = b.endpoint(h);
    }
    for (k, v) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
        let dur = |v: &str| {
            humantime::parse_duration(v).map_err(|e| {
                bad(format!(
                    "{k}: {v:?} is not a duration like 5s or 500ms ({e})"
                ))
            })
        };
        b = match &*k {
            "prefix" => b.prefix(v.into_owned()),
            "connect_timeout" => b.connect_timeout(dur(&v)?),
            "request_timeout" => b.request_timeout(dur(&v)?),
            "recheck_interval" => b.recheck_interval(dur(&v)?),
            "ca_file" | "cert_file" | "key_file" | "domain" if !tls => {
                return Err(bad(format!("{k} needs the etcds:// scheme")));
            }
            "ca_file" => b.ca_file(v.into_owned()),
            "cert_file" => {
                let tls = b.cfg.tls.get_or_insert_with(TlsConfig::default);
                tls.cert_file = Some(v.into_owned().into());
                b
            }
            "key_file" => {
                let tls = b.cfg.tls.get_or_insert_with(TlsConfig::default);
                tls.key_file = Some(v.into_owned().into());
                b
            }
            "domain" => b.domain(v.into_owned()),
            other => {
                return Err(bad(format!(
                    "unknown URL parameter {other:?} (known: prefix, connect_timeout, \
                     request_timeout, recheck_interval, ca_file, cert_file, key_file, domain)"
                )));
            }
        };
    }
    b.build()
}

/// Percent-decodes user info.
fn decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| Error::config(BACKEND, "bad percent-encoding in the user info"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| Error::config(BACKEND, "the user info is not UTF-8"))
}

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_full_url() {
        let c = EtcdConfig::from_url(
            "etcds://u%40x:p%3Aw@a:1,[::1]:2?prefix=&ca_file=/tmp/ca.pem&request_timeout=250ms&recheck_interval=1s",
        )
        .unwrap();
        assert_eq!(c.endpoints, vec!["a:1".to_string(), "[::1]:2".to_string()]);
        assert_eq!(c.user, Some(("u@x".into(), "p:w".into())));
        assert_eq!(c.prefix, "");
        assert_eq!(c.request_timeout, Duration::from_millis(250));
        assert_eq!(c.recheck_interval, Duration::from_secs(1));
        assert_eq!(
            c.tls.as_ref().unwrap().ca_file,
            Some(PathBuf::from("/tmp/ca.pem"))
        );
        assert_eq!(c.urls(), vec!["https://a:1", "https://[::1]:2"]);
        // Display round-trips (minus the password).
        let shown = c.to_string();
        assert!(
            !shown.contains("p:w") && !shown.contains("p%3Aw"),
            "{shown}"
        );
        let back = EtcdConfig::from_url(&shown).unwrap();
        assert_eq!(back.endpoints, c.endpoints);
        assert_eq!(back.tls, c.tls);
    }

    #[test]
    fn defaults() {
        let c: EtcdConfig = "etcd://127.0.0.1:2379".parse().unwrap();
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        assert!(!c.is_tls());
        assert_eq!(c.connect_timeout, Duration::from_secs(5));
        assert_eq!(c.urls(), vec!["http://127.0.0.1:2379"]);
    }

    #[test]
    fn rejects_bad_urls() {
        for bad in [
            "",
            "http://h:1",
            "etcd://",
            "etcd://h",
            "etcd://h:0",
            "etcd://h:99999",
            "etcd://h:1/path",
            "etcd://h:1?bogus=1",
            "etcd://h:1?connect_timeout=soon",
            "etcd://h:1?connect_timeout=0s",
            "etcd://h:1?ca_file=/x",
            "etcd://h:1#frag",
            "etcd://:pw@h:1",
            "etcd://u:%zz@h:1",
            "etcd://h:1,",
            "etcd://h%20x:1",
            "etcds://h:1?cert_file=/c",
        ] {
            let err = EtcdConfig::from_url(bad).unwrap_err();
            assert!(matches!(err, Error::Config { .. }), "{bad}: {err:?}");
        }
    }

    #[test]
    fn secrets_are_hidden() {
        let c = EtcdConfig::from_url("etcd://root:hunter2@h:1").unwrap();
        for s in [
            format!("{c:?}"),
            c.to_string(),
            format!("{:?}", EtcdConfig::builder().user("a", "hunter2")),
        ] {
            assert!(!s.contains("hunter2"), "{s}");
        }
        let err = EtcdConfig::from_url("etcd://root:hunter2@h:1?x=1").unwrap_err();
        assert!(!err.to_string().contains("hunter2"));
    }
}
