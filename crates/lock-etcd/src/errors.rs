//! Mapping etcd-client's errors into distlock's one [`Error`] type.
//!
//! The distinction that matters to callers is whether trying again may help:
//! an unreachable or leaderless cluster is [`Error::Connection`] (retryable),
//! refused credentials are [`Error::Auth`], a malformed endpoint is
//! [`Error::Config`]. etcd reports a wrong password as `InvalidArgument`
//! with the text "authentication failed", so the message is inspected too.

use std::future::Future;
use std::time::Duration;

use etcd_client::Error as EtcdError;
use lock_core::Error;

use crate::BACKEND;

/// gRPC status codes (numbers, so that we need not depend on tonic).
#[allow(dead_code)]
mod code {
    pub(super) const CANCELLED: i32 = 1;
    pub(super) const UNKNOWN: i32 = 2;
    pub(super) const INVALID_ARGUMENT: i32 = 3;
    pub(super) const DEADLINE_EXCEEDED: i32 = 4;
    pub(super) const NOT_FOUND: i32 = 5;
    pub(super) const PERMISSION_DENIED: i32 = 7;
    pub(super) const RESOURCE_EXHAUSTED: i32 = 8;
    pub(super) const ABORTED: i32 = 10;
    pub(super) const INTERNAL: i32 = 13;
    pub(super) const UNAVAILABLE: i32 = 14;
    pub(super) const UNAUTHENTICATED: i32 = 16;
}

/// Whether `e` says that the lease is gone ("requested lease not found").
pub(crate) fn is_lease_not_found(e: &EtcdError) -> bool {
    matches!(e, EtcdError::GRpcStatus(s) if i32::from(s.code()) == code::NOT_FOUND && s.message().contains("lease not found"))
}

/// Maps an etcd-client error, with what we were doing.
pub(crate) fn map(context: &str, e: EtcdError) -> Error {
    match &e {
        EtcdError::GRpcStatus(s) => {
            let msg = s.message();
            match i32::from(s.code()) {
                code::UNAUTHENTICATED | code::PERMISSION_DENIED => Error::auth(BACKEND, context, e),
                code::INVALID_ARGUMENT
                    if msg.contains("authentication failed")
                        || msg.contains("invalid auth token")
                        || msg.contains("user name is empty")
                        || msg.contains("authentication is not enabled") =>
                {
                    Error::auth(BACKEND, context, e)
                }
                code::UNAVAILABLE
                | code::DEADLINE_EXCEEDED
                | code::CANCELLED
                | code::ABORTED
                | code::RESOURCE_EXHAUSTED => Error::connection(BACKEND, context, e),
                // tonic reports transport failures (connection refused,
                // reset, TLS handshake) as Unknown/Internal with a source.
                code::UNKNOWN | code::INTERNAL
                    if msg.contains("transport")
                        || msg.contains("connect")
                        || msg.contains("broken pipe")
                        || msg.contains("h2 protocol") =>
                {
                    Error::connection(BACKEND, context, e)
                }
                code::UNKNOWN
                    if msg.contains("leader changed")
                        || msg.contains("no leader")
                        || msg.contains("timed out")
                        || msg.contains("too many requests") =>
                {
                    Error::connection(BACKEND, context, e)
                }
                _ => Error::backend(BACKEND, context, e),
            }
        }
        EtcdError::TransportError(_)
        | EtcdError::IoError(_)
        | EtcdError::WatchError(_)
        | EtcdError::LeaseKeepAliveError(_) => Error::connection(BACKEND, context, e),
        EtcdError::InvalidArgs(_) | EtcdError::InvalidUri(_) | EtcdError::EndpointError(_) => {
            Error::config(BACKEND, format!("{context}: {e}"))
        }
        _ => Error::backend(BACKEND, context, e),
    }
}

/// The error for a request that did not answer within the timeout.
pub(crate) fn timed_out(context: &str, after: Duration) -> Error {
    Error::connection(
        BACKEND,
        context,
        format!("no answer within {after:?} (request_timeout)"),
    )
}

/// Runs one request with a timeout, mapping errors.
///
/// etcd-client's balanced channel waits for ever for a reachable endpoint,
/// so every call is bounded here rather than trusting the transport.
pub(crate) async fn call<T>(
    context: &str,
    timeout: Duration,
    fut: impl Future<Output = Result<T, EtcdError>>,
) -> lock_core::Result<T> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map(context, e)),
        Err(_) => Err(timed_out(context, timeout)),
    }
}

/// Whether the request surely never reached a server (no connection could
/// be made), so sending it again cannot apply it twice.
pub(crate) fn not_sent(e: &EtcdError) -> bool {
    match e {
        EtcdError::GRpcStatus(s) => {
            i32::from(s.code()) == code::UNAVAILABLE && s.message().contains("connect error")
        }
        EtcdError::TransportError(_) => true,
        _ => false,
    }
}

/// Sends a transaction, retrying within `timeout` while no connection can
/// be made.
///
/// etcd-client balances requests over all endpoints; after a member dies,
/// requests routed to it fail with a connect error until the balancer stops
/// picking it. Such a request never reached a server, so it is sent again
/// (the balancer then usually picks a live member). `Err(None)` means the
/// timeout passed.
pub(crate) async fn txn_raw(
    client: &etcd_client::Client,
    timeout: Duration,
    txn: etcd_client::Txn,
) -> Result<etcd_client::TxnResponse, Option<EtcdError>> {
    let until = tokio::time::Instant::now() + timeout;
    let mut attempt = 0u32;
    loop {
        let mut kv = client.kv_client();
        match tokio::time::timeout_at(until, kv.txn(txn.clone())).await {
            Ok(Ok(r)) => return Ok(r),
            Ok(Err(e)) if not_sent(&e) && attempt < 20 => {
                attempt += 1;
                let pause = Duration::from_millis(5 * u64::from(attempt.min(10)));
                if tokio::time::Instant::now() + pause >= until {
                    return Err(Some(e));
                }
                tokio::time::sleep(pause).await;
            }
            Ok(Err(e)) => return Err(Some(e)),
            Err(_) => return Err(None),
        }
    }
}

/// [`txn_raw`] with errors mapped.
pub(crate) async fn txn(
    context: &str,
    client: &etcd_client::Client,
    timeout: Duration,
    t: etcd_client::Txn,
) -> lock_core::Result<etcd_client::TxnResponse> {
    txn_raw(client, timeout, t).await.map_err(|e| match e {
        Some(e) => map(context, e),
        None => timed_out(context, timeout),
    })
}
