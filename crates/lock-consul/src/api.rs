//! The HTTP transport: the only module that touches consulrs (and rustify
//! and reqwest under it), so replacing that unmaintained crate is a change
//! to this one file.
//!
//! What we take from consulrs is its request definitions and response
//! types; what we do not take, and why:
//!
//! - `consulrs::api::exec_with_result` runs every request through a
//!   middleware that re-encodes the path (a key segment `a%2Fb` would reach
//!   Consul as `a%252Fb`), `unwrap`s on header values, and turns every
//!   non-2xx answer into an error without its headers — but a blocking query
//!   on a key that does not exist answers 404 *with* the `X-Consul-Index` we
//!   need to keep blocking. So we let consulrs/rustify build the
//!   `http::Request` (its path encoding is right: one level), add the `/v1`
//!   base, the token and the query flags ourselves, and send it with our own
//!   `reqwest` client, which has connect and request timeouts (consulrs's
//!   has none).
//! - `/v1/txn`, which consulrs lacks, is built here by hand.
//! - `ConsulClientSettings` derives `Debug` with the token in it, and its
//!   builder silently reads `CONSUL_HTTP_TOKEN` and friends from the
//!   environment; we never construct it.

use std::time::Duration;

use consulrs::api::kv::common::KVPair;
use consulrs::api::kv::requests::ReadKeyRequest;
use consulrs::api::session::common::SessionEntry;
use consulrs::api::session::requests::{
    CreateSessionRequest, DeleteSessionRequest, ReadSessionRequest, RenewSessionRequest,
};
use consulrs::api::session::responses::CreateSessionResponse;
use lock_core::{BoxError, Error, Result};
use reqwest::header::{HeaderMap, HeaderValue};
use rustify::Endpoint;
use serde::Deserialize;

use crate::BACKEND;
use crate::config::{ConsulConfig, SessionBehavior};

/// The flags `consul lock` (Consul's `api/lock.go`, `LockFlagValue`) puts on
/// its lock entries; it refuses to wait on an entry with other flags.
pub(crate) const LOCK_FLAG_VALUE: u64 = 0x2ddc_cbc0_58a5_0c18;

/// Consul's limit of operations in one transaction.
pub(crate) const MAX_TXN_OPS: usize = 64;

/// A KV entry as Consul returns it.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    pub(crate) session: Option<String>,
    pub(crate) modify_index: u64,
    pub(crate) value: Option<Vec<u8>>,
}

impl Entry {
    fn from_pair(pair: KVPair) -> Result<Self, Failure> {
        let value = match pair.value {
            Some(v) => Some(
                TryInto::<Vec<u8>>::try_into(v)
                    .map_err(|e| Failure::Decode(format!("entry value is not base64: {e}")))?,
            ),
            None => None,
        };
        Ok(Entry {
            session: pair.session.filter(|s| !s.is_empty()),
            modify_index: pair.modify_index,
            value,
        })
    }
}

/// Why a request did not give the answer we wanted.
#[derive(Debug)]
pub(crate) enum Failure {
    /// No answer: connection refused or broken, or a timeout.
    Transport(reqwest::Error),
    /// 403: the token is unknown or lacks a permission.
    Auth(String),
    /// 404.
    NotFound,
    /// 5xx: no leader, an election, a server shutting down.
    Unavailable(u16, String),
    /// Any other status.
    Unexpected(u16, String),
    /// An answer we could not read.
    Decode(String),
}

impl Failure {
    /// Whether the request may have been applied although we got no answer.
    pub(crate) fn outcome_unknown(&self) -> bool {
        matches!(self, Failure::Transport(_) | Failure::Unavailable(..))
    }

    /// The distlock error for this failure while doing `context`.
    pub(crate) fn into_error(self, context: &str) -> Error {
        match self {
            Failure::Transport(e) => Error::connection(BACKEND, context, e),
            Failure::Unavailable(code, body) => Error::connection(
                BACKEND,
                context,
                BoxError::from(format!("HTTP {code}: {}", trim(&body))),
            ),
            Failure::Auth(body) => Error::auth(
                BACKEND,
                context,
                BoxError::from(format!("HTTP 403: {}", trim(&body))),
            ),
            Failure::NotFound => Error::backend(BACKEND, context, "HTTP 404: not found"),
            Failure::Unexpected(code, body) => Error::backend(
                BACKEND,
                context,
                BoxError::from(format!("HTTP {code}: {}", trim(&body))),
            ),
            Failure::Decode(msg) => Error::backend(BACKEND, context, msg),
        }
    }
}

fn trim(body: &str) -> String {
    let t: String = body.trim().chars().take(200).collect();
    if t.is_empty() { "(no body)".into() } else { t }
}

/// One KV operation of a transaction.
#[derive(Clone, Debug)]
pub(crate) enum TxnOp {
    /// Take the lock of `key` for `session` and write `value` with the
    /// `consul lock` flags.
    Lock {
        key: String,
        value: Vec<u8>,
        session: String,
    },
    /// Delete `key` if its ModifyIndex is still `index`.
    DeleteCas { key: String, index: u64 },
    /// Fail unless `key` exists with ModifyIndex `index`.
    CheckIndex { key: String, index: u64 },
}

impl TxnOp {
    fn to_json(&self) -> serde_json::Value {
        let kv = match self {
            TxnOp::Lock {
                key,
                value,
                session,
            } => serde_json::json!({
                "Verb": "lock", "Key": key, "Value": base64(value),
                "Flags": LOCK_FLAG_VALUE, "Session": session,
            }),
            TxnOp::DeleteCas { key, index } => {
                serde_json::json!({ "Verb": "delete-cas", "Key": key, "Index": index })
            }
            TxnOp::CheckIndex { key, index } => {
                serde_json::json!({ "Verb": "check-index", "Key": key, "Index": index })
            }
        };
        serde_json::json!({ "KV": kv })
    }
}

/// What a transaction did.
#[derive(Debug)]
pub(crate) enum TxnOutcome {
    /// Every operation succeeded; the entries the operations returned (a
    /// delete returns none).
    Committed(Vec<Option<Entry>>),
    /// Nothing was applied; the failed operations with Consul's reason.
    RolledBack(Vec<(usize, String)>),
}

#[derive(Deserialize)]
struct TxnResponse {
    #[serde(rename = "Results")]
    results: Option<Vec<TxnResult>>,
    #[serde(rename = "Errors")]
    errors: Option<Vec<TxnError>>,
}

#[derive(Deserialize)]
struct TxnResult {
    #[serde(rename = "KV")]
    kv: Option<KVPair>,
}

#[derive(Deserialize)]
struct TxnError {
    #[serde(rename = "OpIndex")]
    op_index: usize,
    #[serde(rename = "What")]
    what: String,
}

/// A Consul HTTP API client with timeouts, an optional token and TLS.
pub(crate) struct Api {
    http: reqwest::Client,
    /// `http(s)://host:port/v1`
    base: String,
    token: Option<HeaderValue>,
    request_timeout: Duration,
}

impl std::fmt::Debug for Api {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Api")
            .field("base", &self.base)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .finish_non_exhaustive()
    }
}

impl Api {
    /// A client for `cfg` (reads the CA file; sends nothing).
    pub(crate) fn new(cfg: &ConsulConfig) -> Result<Self> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .connect_timeout(cfg.connect_timeout)
            .tcp_nodelay(true)
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(path) = &cfg.ca_file {
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(
                    BACKEND,
                    format!("cannot read ca_file {}: {e}", path.display()),
                )
            })?;
            if !pem.windows(27).any(|w| w == b"-----BEGIN CERTIFICATE-----") {
                return Err(Error::config(
                    BACKEND,
                    format!("ca_file {} holds no PEM certificate", path.display()),
                ));
            }
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                Error::config(
                    BACKEND,
                    format!("ca_file {} is not a valid certificate: {e}", path.display()),
                )
            })?;
            builder = builder.add_root_certificate(cert);
        }
        if let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) {
            let read = |p: &std::path::Path| {
                std::fs::read(p).map_err(|e| {
                    Error::config(BACKEND, format!("cannot read {}: {e}", p.display()))
                })
            };
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| {
                Error::config(
                    BACKEND,
                    format!(
                        "cert_file {} and key_file {} are not a usable certificate and key: {e}",
                        cert.display(),
                        key.display()
                    ),
                )
            })?;
            builder = builder.identity(identity);
        }
        let http = builder
            .build()
            .map_err(|e| Error::config(BACKEND, format!("cannot set up the HTTP client: {e}")))?;
        let token = match &cfg.token {
            Some(t) => {
                let mut v = HeaderValue::from_str(t.expose()).map_err(|_| {
                    Error::config(BACKEND, "the ACL token is not a valid header value")
                })?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(Api {
            http,
            base: format!("{}/v1", cfg.base_url()),
            token,
            request_timeout: cfg.request_timeout,
        })
    }

    /// Turns a consulrs endpoint into a request of our client.
    fn prepare<E: Endpoint>(&self, endpoint: &E) -> Result<reqwest::Request, Failure> {
        let req = endpoint
            .request(&self.base)
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))?;
        reqwest::Request::try_from(req)
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))
    }

    async fn send(
        &self,
        mut req: reqwest::Request,
        timeout: Duration,
    ) -> Result<(u16, HeaderMap, Vec<u8>), Failure> {
        if let Some(t) = &self.token {
            req.headers_mut().insert("X-Consul-Token", t.clone());
        }
        *req.timeout_mut() = Some(timeout);
        let resp = self.http.execute(req).await.map_err(Failure::Transport)?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.map_err(Failure::Transport)?.to_vec();
        Ok((status, headers, body))
    }

    fn check(status: u16, body: &[u8]) -> Result<(), Failure> {
        let text = || String::from_utf8_lossy(body).into_owned();
        match status {
            200..=299 => Ok(()),
            403 => Err(Failure::Auth(text())),
            404 => Err(Failure::NotFound),
            500..=599 => Err(Failure::Unavailable(status, text())),
            _ => Err(Failure::Unexpected(status, text())),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, Failure> {
        serde_json::from_slice(body)
            .map_err(|e| Failure::Decode(format!("unexpected answer from Consul: {e}")))
    }

    /// Creates a session with no health checks (only the TTL can invalidate
    /// it) and returns its id.
    pub(crate) async fn create_session(
        &self,
        name: &str,
        ttl: Duration,
        lock_delay: Duration,
        behavior: SessionBehavior,
    ) -> Result<String, Failure> {
        let endpoint = CreateSessionRequest::builder()
            .name(name)
            .ttl(format!("{}ms", ttl.as_millis()))
            .lock_delay(format!("{}ms", lock_delay.as_millis()))
            .behavior(behavior.as_str())
            // No checks at all: by default a session is tied to the node's
            // serf health check and can be invalidated before its TTL, which
            // would break our validity deadlines.
            .node_checks(Vec::<String>::new())
            .build()
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))?;
        let req = self.prepare(&endpoint)?;
        let (status, _, body) = self.send(req, self.request_timeout).await?;
        Self::check(status, &body)?;
        let created: CreateSessionResponse = Self::decode(&body)?;
        Ok(created.id)
    }

    /// Renews a session; `Ok(false)` if the server does not know it.
    ///
    /// A new leader may answer before it has applied its whole log, so
    /// "not found" from a renewal is only a hint: confirm it with
    /// [`Api::session_gone`].
    pub(crate) async fn renew_session(&self, id: &str) -> Result<bool, Failure> {
        let endpoint = RenewSessionRequest::builder()
            .uuid(id)
            .build()
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))?;
        let req = self.prepare(&endpoint)?;
        let (status, _, body) = self.send(req, self.request_timeout).await?;
        match Self::check(status, &body) {
            Ok(()) => Ok(true),
            Err(Failure::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Destroys a session (Consul then releases or deletes its entries).
    pub(crate) async fn destroy_session(&self, id: &str) -> Result<(), Failure> {
        let endpoint = DeleteSessionRequest::builder()
            .uuid(id)
            .build()
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))?;
        let req = self.prepare(&endpoint)?;
        let (status, _, body) = self.send(req, self.request_timeout).await?;
        Self::check(status, &body)
    }

    /// Whether Consul knows session `id`: `(exists, X-Consul-Index)`. With
    /// `block`, a blocking query on the sessions table.
    pub(crate) async fn session_exists(
        &self,
        id: &str,
        consistent: bool,
        block: Option<(u64, Duration)>,
    ) -> Result<(bool, u64), Failure> {
        let endpoint = ReadSessionRequest::builder()
            .uuid(id)
            .build()
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))?;
        let mut req = self.prepare(&endpoint)?;
        if consistent {
            req.url_mut()
                .query_pairs_mut()
                .append_key_only("consistent");
        }
        let timeout = self.add_blocking(&mut req, block);
        let (status, headers, body) = self.send(req, timeout).await?;
        let index = consul_index(&headers);
        Self::check(status, &body)?;
        let sessions: Option<Vec<SessionEntry>> = Self::decode(&body)?;
        Ok((sessions.is_some_and(|s| !s.is_empty()), index))
    }

    /// Whether the session is certainly gone: a consistent read (the leader
    /// confirms its leadership and has applied its log) finds no such
    /// session. Any error counts as "not certain".
    pub(crate) async fn session_gone(&self, id: &str) -> bool {
        matches!(self.session_exists(id, true, None).await, Ok((false, _)))
    }

    /// Adds `index` and `wait` to a request; returns its timeout.
    fn add_blocking(&self, req: &mut reqwest::Request, block: Option<(u64, Duration)>) -> Duration {
        let mut timeout = self.request_timeout;
        if let Some((index, wait)) = block {
            let mut q = req.url_mut().query_pairs_mut();
            q.append_pair("index", &index.to_string());
            q.append_pair("wait", &format!("{}ms", wait.as_millis()));
            // Consul adds up to wait/16 of jitter.
            timeout += wait + wait / 16;
        }
        timeout
    }

    /// Reads one entry: `(entry or None if missing, X-Consul-Index)`.
    ///
    /// `consistent` asks the leader to confirm its leadership first (no
    /// stale answers during an election). `block = Some((index, wait))` makes
    /// it a blocking query that returns when the entry changes after
    /// `index`, or after `wait`.
    pub(crate) async fn read(
        &self,
        key: &str,
        consistent: bool,
        block: Option<(u64, Duration)>,
    ) -> Result<(Option<Entry>, u64), Failure> {
        let endpoint = ReadKeyRequest::builder()
            .key(key)
            .build()
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))?;
        let mut req = self.prepare(&endpoint)?;
        if consistent {
            req.url_mut()
                .query_pairs_mut()
                .append_key_only("consistent");
        }
        let timeout = self.add_blocking(&mut req, block);
        let (status, headers, body) = self.send(req, timeout).await?;
        let index = consul_index(&headers);
        match Self::check(status, &body) {
            Ok(()) => {
                let mut pairs: Vec<KVPair> = Self::decode(&body)?;
                let entry = match pairs.pop() {
                    Some(p) => Some(Entry::from_pair(p)?),
                    None => None,
                };
                Ok((entry, index))
            }
            Err(Failure::NotFound) => Ok((None, index)),
            Err(e) => Err(e),
        }
    }

    /// Runs up to [`MAX_TXN_OPS`] operations atomically.
    pub(crate) async fn txn(&self, ops: &[TxnOp], consistent: bool) -> Result<TxnOutcome, Failure> {
        let body = serde_json::Value::Array(ops.iter().map(TxnOp::to_json).collect()).to_string();
        let mut url = reqwest::Url::parse(&format!("{}/txn", self.base))
            .map_err(|e| Failure::Decode(format!("cannot build the request: {e}")))?;
        if consistent {
            url.query_pairs_mut().append_key_only("consistent");
        }
        let mut req = reqwest::Request::new(reqwest::Method::PUT, url);
        *req.body_mut() = Some(body.into());
        let (status, _, body) = self.send(req, self.request_timeout).await?;
        if status == 409 {
            let resp: TxnResponse = Self::decode(&body)?;
            let errors = resp
                .errors
                .unwrap_or_default()
                .into_iter()
                .map(|e| (e.op_index, e.what))
                .collect();
            return Ok(TxnOutcome::RolledBack(errors));
        }
        Self::check(status, &body)?;
        let resp: TxnResponse = Self::decode(&body)?;
        let mut entries = Vec::new();
        for r in resp.results.unwrap_or_default() {
            entries.push(match r.kv {
                Some(pair) => Some(Entry::from_pair(pair)?),
                None => None,
            });
        }
        Ok(TxnOutcome::Committed(entries))
    }
}

fn consul_index(headers: &HeaderMap) -> u64 {
    headers
        .get("X-Consul-Index")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Standard base64 with padding (the form Consul's JSON API uses).
pub(crate) fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let idx = (n >> (18 - 6 * i)) & 0x3F;
                out.push(char::from(ALPHABET[idx as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"hello"), "aGVsbG8=");
    }

    #[test]
    fn lock_flags_are_consul_locks() {
        assert_eq!(LOCK_FLAG_VALUE, 3_304_740_253_564_472_344);
    }
}
