//! One Redis server: its reconnecting command connection, script calls with
//! a deadline, and the mapping of redis-rs errors into distlock's [`Error`].

use std::sync::Once;
use std::time::Duration;

use lock_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{
    Client, ConnectionAddr, ErrorKind, IntoConnectionInfo, RedisConnectionInfo, RedisError, Script,
    ScriptInvocation, ServerErrorKind, TlsCertificates, Value,
};
use tracing::debug;

use crate::BACKEND;
use crate::config::{NodeAddr, RedisConfig};

/// A connection to one Redis server.
#[derive(Clone)]
pub(crate) struct Node {
    pub(crate) addr: NodeAddr,
    pub(crate) client: Client,
    conn: ConnectionManager,
    response_timeout: Duration,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node").field("addr", &self.addr).finish()
    }
}

/// rustls needs a process-wide crypto provider before the first TLS
/// handshake, and redis-rs does not pick one. Installing ring here (once,
/// and only if the application has not installed its own) keeps `rediss://`
/// working without any set-up by the user.
pub(crate) fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        if rustls::crypto::CryptoProvider::get_default().is_none() {
            // Losing the race against another installer is fine: some
            // provider is then in place.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
    });
}

/// The redis-rs client for one server of `cfg`.
pub(crate) fn client_for(cfg: &RedisConfig, addr: &NodeAddr) -> Result<Client> {
    let conn_addr = if cfg.tls {
        install_crypto_provider();
        ConnectionAddr::TcpTls {
            host: addr.host.clone(),
            port: addr.port,
            insecure: false,
            tls_params: None,
        }
    } else {
        ConnectionAddr::Tcp(addr.host.clone(), addr.port)
    };
    let mut settings = RedisConnectionInfo::default().set_db(cfg.db);
    if let Some(user) = &cfg.username {
        settings = settings.set_username(user);
    }
    if let Some(pw) = &cfg.password {
        settings = settings.set_password(pw);
    }
    let info = conn_addr
        .into_connection_info()
        .map_err(|e| Error::config(BACKEND, format!("server {addr}: {e}")))?
        .set_redis_settings(settings);
    let client = match &cfg.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(
                    BACKEND,
                    format!("cannot read ca_file {}: {e}", path.display()),
                )
            })?;
            Client::build_with_tls(
                info,
                TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
        }
        None => Client::open(info),
    };
    client.map_err(|e| Error::config(BACKEND, format!("server {addr}: {e}")))
}

impl Node {
    /// A lazily connecting manager; [`Node::ping`] makes the first
    /// connection.
    pub(crate) fn new(cfg: &RedisConfig, addr: &NodeAddr) -> Result<Self> {
        let client = client_for(cfg, addr)?;
        // Few, short reconnect retries: a command waits for at most this
        // many attempts, and the next command starts a new round anyway.
        let manager_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.connect_timeout))
            .set_response_timeout(Some(cfg.response_timeout))
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager_cfg)
            .map_err(|e| map_err(e, addr, "creating the connection"))?;
        Ok(Node {
            addr: addr.clone(),
            client,
            conn,
            response_timeout: cfg.response_timeout,
        })
    }

    /// Connects (if not yet) and checks that the server answers.
    pub(crate) async fn ping(&self, limit: Duration) -> Result<()> {
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("PING");
        match tokio::time::timeout(limit, cmd.query_async::<String>(&mut conn)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(map_err(e, &self.addr, "connecting")),
            Err(_) => Err(timeout_err(&self.addr, "connecting", limit)),
        }
    }

    /// Runs one script, loading it on NOSCRIPT, within `limit` (the response
    /// timeout covers each request; `limit` covers the whole call).
    pub(crate) async fn eval(
        &self,
        inv: &ScriptInvocation<'_>,
        limit: Option<Duration>,
        what: &str,
    ) -> Result<Value> {
        let mut conn = self.conn.clone();
        let call = inv.invoke_async::<Value>(&mut conn);
        let limit = limit.unwrap_or(self.response_timeout * 3);
        match tokio::time::timeout(limit, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(map_err(e, &self.addr, what)),
            Err(_) => Err(timeout_err(&self.addr, what, limit)),
        }
    }

    /// Runs many script calls in one pipeline (one round trip), loading the
    /// scripts and retrying once if the server did not know one of them.
    /// The answers come back in order; an error fails the whole batch.
    pub(crate) async fn eval_many(
        &self,
        script: &Script,
        invs: &[ScriptInvocation<'_>],
        limit: Option<Duration>,
        what: &str,
    ) -> Result<Vec<Value>> {
        let limit = limit.unwrap_or(self.response_timeout * 3);
        let run = async {
            let mut conn = self.conn.clone();
            let mut pipe = redis::pipe();
            for inv in invs {
                pipe.invoke_script(inv);
            }
            match pipe.query_async::<Vec<Value>>(&mut conn).await {
                Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                    debug!(server = %self.addr, "scripts not loaded; loading them");
                    script.load_async(&mut conn).await?;
                    pipe.query_async::<Vec<Value>>(&mut conn).await
                }
                other => other,
            }
        };
        match tokio::time::timeout(limit, run).await {
            Ok(Ok(v)) if v.len() == invs.len() => Ok(v),
            Ok(Ok(v)) => Err(Error::backend(
                BACKEND,
                format!("{what} on {}", self.addr),
                format!("expected {} answers, got {}", invs.len(), v.len()),
            )),
            Ok(Err(e)) => Err(map_err(e, &self.addr, what)),
            Err(_) => Err(timeout_err(&self.addr, what, limit)),
        }
    }
}

fn timeout_err(addr: &NodeAddr, what: &str, limit: Duration) -> Error {
    Error::connection(
        BACKEND,
        format!("{what} on {addr}"),
        format!("no answer within {}", humantime::format_duration(limit)),
    )
}

/// Maps a redis-rs error: credentials and permissions are [`Error::Auth`];
/// I/O, timeouts and transient server states (loading, failover, cluster
/// reconfiguration) are retryable [`Error::Connection`]s; a bad client
/// setting is [`Error::Config`]; anything else is [`Error::Backend`].
pub(crate) fn map_err(e: RedisError, addr: &NodeAddr, what: &str) -> Error {
    let context = format!("{what} on {addr}");
    let code = e.code().unwrap_or_default();
    if matches!(code, "WRONGPASS" | "NOAUTH" | "NOPERM")
        || matches!(
            e.kind(),
            ErrorKind::AuthenticationFailed | ErrorKind::Server(ServerErrorKind::NoPerm)
        )
    {
        return Error::auth(BACKEND, context, e);
    }
    match e.kind() {
        ErrorKind::Io
        | ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::MasterDown
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::ReadOnly,
        ) => Error::connection(BACKEND, context, e),
        ErrorKind::InvalidClientConfig => Error::config(BACKEND, format!("{context}: {e}")),
        _ if e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() => {
            Error::connection(BACKEND, context, e)
        }
        _ => Error::backend(BACKEND, context, e),
    }
}
