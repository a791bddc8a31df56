//! The one `LISTEN` connection per client (lease mode).
//!
//! Every release sends `pg_notify('distlock:<schema.table>', <stored key>)`
//! from the releasing statement; PostgreSQL delivers it when that statement
//! commits. One channel per table (not one per key) means a waiter never
//! has to issue `LISTEN` before it can wait: the listener is subscribed once,
//! and waiting on a new key costs no round trip. The price is that every
//! client listening on the table sees every release (a few dozen bytes
//! each); the [`WakeHub`] drops those nobody here waits for.
//!
//! Notifications sent while the listener is disconnected are lost, so after
//! every reconnect it wakes every waiter ([`WakeHub::notify_all`]) to
//! re-check. Waiters also re-check at the holder's expiry and every
//! `recheck_interval`, which bounds the damage of anything missed.

use std::sync::Arc;
use std::time::Duration;

use lock_core::{Backoff, CancellationToken, Key, WakeHub};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPoolOptions};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::backend::PostgresBackend;

/// Handle to the listener task, which runs until the backend is dropped.
/// `listening` tells whether it is subscribed right now.
#[derive(Clone, Debug)]
pub(crate) struct Listener {
    pub(crate) listening: watch::Receiver<bool>,
}

struct Task {
    opts: PgConnectOptions,
    connect_timeout: Duration,
    channel: String,
    prefix: String,
    hub: Arc<WakeHub>,
    ready: watch::Sender<bool>,
    shutdown: CancellationToken,
}

impl Listener {
    /// Starts the listener task (it runs until the backend is dropped).
    pub(crate) fn start(backend: &PostgresBackend) -> Self {
        let inner = &backend.inner;
        let (tx, rx) = watch::channel(false);
        let task = Task {
            opts: inner.config.connect_options(),
            connect_timeout: inner.config.connect_timeout,
            channel: inner.sql.channel.clone(),
            prefix: inner.config.prefix.clone(),
            hub: Arc::clone(&inner.hub),
            ready: tx,
            shutdown: inner.shutdown.clone(),
        };
        tokio::spawn(task.run());
        Listener { listening: rx }
    }
}

impl Task {
    async fn run(self) {
        // A pool of one, only so that sqlx's listener can reconnect itself.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(crate::backend::pool_attempt(self.connect_timeout))
            .idle_timeout(None)
            .max_lifetime(None)
            .test_before_acquire(false)
            .connect_lazy_with(self.opts.clone());
        let mut backoff = Backoff::default();
        loop {
            let connect = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen(&self.channel).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                r = connect => match r {
                    Ok(l) => l,
                    Err(e) => {
                        let pause = backoff.next_delay();
                        warn!(error = %e, retry_in = ?pause, "LISTEN connection failed");
                        tokio::select! {
                            _ = self.shutdown.cancelled() => return,
                            _ = tokio::time::sleep(pause) => continue,
                        }
                    }
                }
            };
            backoff = Backoff::default();
            info!(channel = %self.channel, "listening for releases");
            self.ready.send_replace(true);
            // Anything released while we were not listening went unheard.
            self.hub.notify_all();
            loop {
                let next = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    n = listener.try_recv() => n,
                };
                match next {
                    Ok(Some(n)) => self.dispatch(n.payload()),
                    Ok(None) => {
                        // sqlx reconnected and re-subscribed already; what
                        // was sent in between is lost.
                        debug!("LISTEN connection was lost and re-established");
                        self.hub.notify_all();
                    }
                    Err(e) => {
                        self.ready.send_replace(false);
                        warn!(error = %e, "LISTEN connection lost; reconnecting");
                        self.hub.notify_all();
                        break;
                    }
                }
            }
        }
    }

    fn dispatch(&self, stored: &str) {
        let Some(name) = stored.strip_prefix(self.prefix.as_str()) else {
            return;
        };
        if let Ok(key) = Key::new(name) {
            self.hub.notify(&key);
        }
    }
}
