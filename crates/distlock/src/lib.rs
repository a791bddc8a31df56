//! # distlock: distributed locks with one API over several stores
//!
//! This facade picks a backend by cargo feature and by URL scheme, and
//! re-exports [`lock_core`]'s API. Each backend lives in its own crate; turn on
//! only the ones you use.
//!
//! | scheme | feature | backend |
//! |---|---|---|
//! | `memory://` | always | [`lock_core::memory::MemoryBackend`], this process only |
//! | `redis://`, `rediss://` | `redis` | `lock_redis`, one Redis server |
//! | `redlock://`, `redlocks://` | `redis` | `lock_redis`, Redlock over independent masters |
//! | `etcd://`, `etcds://` | `etcd` | `lock_etcd` |
//! | `consul://`, `consuls://`, `consul+http://`, `consul+https://` | `consul` | `lock_consul` |
//! | `postgres://`, `postgresql://` | `postgres` | `lock_postgres` (lease mode, or `distlock_mode=advisory`) |
//!
//! Each backend crate documents its URL's parameters; an unknown parameter
//! is an error. A scheme whose feature is off is an [`Error::Config`] that
//! names the feature.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> distlock::Result<()> {
//! let locks = distlock::connect("memory://").await?;
//! let guard = locks.lock("order-42").await?;
//! println!("fencing token {}", guard.fencing_token());
//! guard.release().await?;
//!
//! let err = distlock::connect("carrier-pigeon://coop").await.unwrap_err();
//! assert!(matches!(err, distlock::Error::Config { .. }));
//! # Ok(()) }
//! ```
//!
//! The `distlock` binary runs a command under a lock on any of these stores;
//! see `distlock --help`.

use std::sync::Arc;

pub use lock_core::*;

#[cfg(feature = "consul")]
pub use lock_consul as consul;
#[cfg(feature = "etcd")]
pub use lock_etcd as etcd;
#[cfg(feature = "postgres")]
pub use lock_postgres as postgres;
#[cfg(feature = "redis")]
pub use lock_redis as redis;

/// Opens the backend that `url` names.
pub async fn backend(url: &str) -> Result<Arc<dyn Backend>> {
    let scheme = url
        .split_once("://")
        .map(|(s, _)| s.to_ascii_lowercase())
        .ok_or_else(|| {
            Error::config(
                "distlock",
                "a lock store URL looks like scheme://..., e.g. redis://host:6379",
            )
        })?;
    match scheme.as_str() {
        "memory" => {
            if url.len() > "memory://".len() {
                return Err(Error::config(
                    "memory",
                    "memory:// takes no host or parameters",
                ));
            }
            Ok(Arc::new(memory::MemoryBackend::new()))
        }
        #[cfg(feature = "redis")]
        "redis" | "rediss" | "redlock" | "redlocks" => {
            Ok(Arc::new(lock_redis::RedisBackend::connect_url(url).await?))
        }
        #[cfg(feature = "etcd")]
        "etcd" | "etcds" => Ok(Arc::new(lock_etcd::EtcdBackend::connect_url(url).await?)),
        #[cfg(feature = "consul")]
        "consul" | "consuls" | "consul+http" | "consul+https" => Ok(Arc::new(
            lock_consul::ConsulBackend::connect_url(url).await?,
        )),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(
            lock_postgres::PostgresBackend::connect_url(url).await?,
        )),
        other => Err(Error::config("distlock", missing_feature(other))),
    }
}

/// Opens the backend that `url` names and wraps it in a [`LockClient`].
pub async fn connect(url: &str) -> Result<LockClient> {
    Ok(LockClient::from_arc(backend(url).await?))
}

fn missing_feature(scheme: &str) -> String {
    let feature = match scheme {
        "redis" | "rediss" | "redlock" | "redlocks" => Some("redis"),
        "etcd" | "etcds" => Some("etcd"),
        "consul" | "consuls" | "consul+http" | "consul+https" => Some("consul"),
        "postgres" | "postgresql" => Some("postgres"),
        _ => None,
    };
    match feature {
        Some(f) => {
            format!("{scheme}:// needs distlock's `{f}` feature, which is off in this build")
        }
        None => format!(
            "unknown scheme {scheme:?}: use memory, redis, rediss, redlock, redlocks, etcd, etcds, \
             consul, consuls, postgres or postgresql"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bad_urls_are_config_errors() {
        for url in ["", "redis", "nope://x", "memory://host"] {
            let err = backend(url).await.err();
            assert!(matches!(err, Some(Error::Config { .. })), "{url}: {err:?}");
        }
        assert!(missing_feature("etcds").contains("`etcd` feature"));
    }
}
