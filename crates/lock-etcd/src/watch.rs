//! One watch stream per client, shared by every waiter.
//!
//! A waiter in the etcd lock queue waits for the deletion of the key just
//! before its own. Opening one gRPC stream per waiter would cost a stream per
//! waiter on the server; etcd lets one stream carry many watches, told apart
//! by a watch id, so one task owns the stream and multiplexes it. We choose
//! the watch ids ourselves (etcd ≥ 3.4 accepts client-chosen ids), which
//! avoids matching "created" answers to requests by arrival order.
//!
//! Every waiter's watch starts at the revision right after the read that
//! told it whom to wait for, so a deletion that happens between that read
//! and the watch's creation is still delivered. Whatever goes wrong with a
//! watch (the stream breaks, the server cancels it, the start revision was
//! compacted) fires it, and the waiter re-reads: a spurious wake-up costs one
//! read, a missed one would cost liveness.
//!
//! The same stream also carries the prefix watches behind
//! [`Backend::subscribe`](lock_core::Backend::subscribe), which feed a
//! [`WakeHub`].

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    EventType, WatchClient, WatchOptions, WatchRequestSender, WatchResponse, WatchResponseStream,
};
use lock_core::{Key, WakeHub};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until};
use tracing::{debug, warn};

/// Handle to the client's watch task.
#[derive(Debug)]
pub(crate) struct Watches {
    tx: mpsc::UnboundedSender<Cmd>,
    next_id: AtomicI64,
}

enum Cmd {
    Once {
        id: i64,
        key: Vec<u8>,
        from_rev: i64,
        fire: oneshot::Sender<()>,
    },
    Hub {
        prefix: Vec<u8>,
        key: Key,
        hub: Arc<WakeHub>,
        ready: oneshot::Sender<()>,
    },
    Cancel(i64),
}

/// A one-shot watch: [`OnceWatch::fired`] completes at the first event on
/// the key, or when the watch breaks. Dropping it cancels the watch.
#[derive(Debug)]
pub(crate) struct OnceWatch {
    id: i64,
    rx: oneshot::Receiver<()>,
    tx: mpsc::UnboundedSender<Cmd>,
}

impl OnceWatch {
    /// Completes when something happened to the key (or the watch broke).
    pub(crate) async fn fired(&mut self) {
        let _ = (&mut self.rx).await;
    }
}

impl Drop for OnceWatch {
    fn drop(&mut self) {
        let _ = self.tx.send(Cmd::Cancel(self.id));
    }
}

impl Watches {
    /// Starts the watch task (the stream itself opens on first use).
    pub(crate) fn start(client: WatchClient, timeout: Duration) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            client,
            timeout,
            stream: None,
            once: HashMap::new(),
            hubs: HashMap::new(),
            reopen_at: None,
            failures: 0,
        };
        tokio::spawn(task.run(rx));
        Watches {
            tx,
            next_id: AtomicI64::new(1),
        }
    }

    /// Watches `key` for any change from revision `from_rev` on.
    pub(crate) fn once(&self, key: Vec<u8>, from_rev: i64) -> OnceWatch {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (fire, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Once {
            id,
            key,
            from_rev,
            fire,
        });
        OnceWatch {
            id,
            rx,
            tx: self.tx.clone(),
        }
    }

    /// Makes sure deletions under `prefix` notify `key` in `hub`; completes
    /// once the watch is established (or after `timeout`).
    pub(crate) async fn hub(
        &self,
        prefix: Vec<u8>,
        key: Key,
        hub: Arc<WakeHub>,
        timeout: Duration,
    ) {
        let (ready, rx) = oneshot::channel();
        let _ = self.tx.send(Cmd::Hub {
            prefix,
            key,
            hub,
            ready,
        });
        let _ = tokio::time::timeout(timeout, rx).await;
    }
}

struct OnceEntry {
    key: Vec<u8>,
    from_rev: i64,
    fire: oneshot::Sender<()>,
}

struct HubEntry {
    id: i64,
    prefix: Vec<u8>,
    hub: Arc<WakeHub>,
    /// Next revision to watch from after a reconnect.
    from_rev: i64,
    created: bool,
    ready: Vec<oneshot::Sender<()>>,
}

struct Task {
    client: WatchClient,
    timeout: Duration,
    stream: Option<(WatchRequestSender, WatchResponseStream)>,
    once: HashMap<i64, OnceEntry>,
    hubs: HashMap<Key, HubEntry>,
    reopen_at: Option<Instant>,
    failures: u32,
}

/// Ids for hub watches: from 2^48 up, so they never clash with waiter ids
/// (which count up from 1 per client). Negative ids are avoided: etcd
/// answers a failed create with watch id -1.
static HUB_IDS: AtomicI64 = AtomicI64::new(1 << 48);

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Cmd>) {
        let mut gc = tokio::time::interval(Duration::from_secs(1));
        loop {
            let reopen = self.reopen_at;
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.command(cmd).await,
                    None => return,
                },
                msg = next_message(&mut self.stream) => match msg {
                    Ok(Some(resp)) => self.response(resp).await,
                    Ok(None) => self.broken("the server closed the watch stream").await,
                    Err(e) => self.broken(&e.to_string()).await,
                },
                _ = sleep_until(reopen.unwrap_or_else(Instant::now)), if reopen.is_some() => {
                    self.reopen_at = None;
                    self.resubscribe().await;
                }
                _ = gc.tick() => self.collect_hubs().await,
            }
        }
    }

    async fn command(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Once {
                id,
                key,
                from_rev,
                fire,
            } => {
                self.once.insert(
                    id,
                    OnceEntry {
                        key: key.clone(),
                        from_rev,
                        fire,
                    },
                );
                let opts = WatchOptions::new()
                    .with_start_revision(from_rev)
                    .with_watch_id(id);
                self.send_watch(key, opts).await;
            }
            Cmd::Hub {
                prefix,
                key,
                hub,
                ready,
            } => {
                if let Some(entry) = self.hubs.get_mut(&key) {
                    if entry.created {
                        let _ = ready.send(());
                    } else {
                        entry.ready.push(ready);
                    }
                    return;
                }
                let id = HUB_IDS.fetch_add(1, Ordering::Relaxed);
                self.hubs.insert(
                    key.clone(),
                    HubEntry {
                        id,
                        prefix: prefix.clone(),
                        hub,
                        from_rev: 0,
                        created: false,
                        ready: vec![ready],
                    },
                );
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_filters([etcd_client::WatchFilterType::NoPut])
                    .with_watch_id(id);
                self.send_watch(prefix, opts).await;
            }
            Cmd::Cancel(id) => {
                if self.once.remove(&id).is_some()
                    && let Some((tx, _)) = &mut self.stream
                {
                    let _ = tx.cancel(id).await;
                }
            }
        }
    }

    /// Sends a watch request, opening the stream if needed. While the
    /// stream is down the watch stays registered and is sent when it
    /// reopens (from its start revision, so nothing is missed); `false`
    /// means it was not sent now.
    async fn send_watch(&mut self, key: Vec<u8>, opts: WatchOptions) -> bool {
        if self.stream.is_none() && self.reopen_at.is_some() {
            return false;
        }
        if let Some((tx, _)) = &mut self.stream {
            if tx.watch(key, Some(opts)).await.is_ok() {
                return true;
            }
            self.broken("could not send a watch request").await;
            return false;
        }
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.watch(key, Some(opts))).await {
            Ok(Ok(stream)) => {
                debug!("watch stream opened");
                self.stream = Some(stream.split());
                self.failures = 0;
                true
            }
            Ok(Err(e)) => {
                self.broken(&e.to_string()).await;
                false
            }
            Err(_) => {
                self.broken("opening the watch stream timed out").await;
                false
            }
        }
    }

    async fn response(&mut self, resp: WatchResponse) {
        let id = resp.watch_id();
        let ended = resp.canceled() || resp.compact_revision() != 0;
        if self.once.contains_key(&id) {
            if ended || !resp.events().is_empty() {
                if let Some(entry) = self.once.remove(&id) {
                    let _ = entry.fire.send(());
                }
                if !resp.canceled()
                    && let Some((tx, _)) = &mut self.stream
                {
                    let _ = tx.cancel(id).await;
                }
            }
            return;
        }
        let Some((key, entry)) = self.hubs.iter_mut().find(|(_, e)| e.id == id) else {
            return;
        };
        if resp.created() {
            entry.created = true;
            for r in entry.ready.drain(..) {
                let _ = r.send(());
            }
        }
        if let Some(h) = resp.header() {
            entry.from_rev = h.revision() + 1;
        }
        if resp
            .events()
            .iter()
            .any(|e| e.event_type() == EventType::Delete)
        {
            entry.hub.notify(key);
        }
        if ended {
            // Compacted or cancelled by the server: re-create from now and
            // let the waiters look, since we may have missed a deletion.
            entry.hub.notify(key);
            entry.from_rev = 0;
            let (prefix, id) = (entry.prefix.clone(), entry.id);
            let opts = WatchOptions::new()
                .with_prefix()
                .with_filters([etcd_client::WatchFilterType::NoPut])
                .with_watch_id(id);
            self.send_watch(prefix, opts).await;
        }
    }

    /// The stream broke (or could not be opened): keep every watch and send
    /// them all again on a new stream after a short pause. Waiters' watches
    /// restart from their own start revision, so no deletion is lost; hubs
    /// are told, since their subscribers re-check anyway.
    async fn broken(&mut self, why: &str) {
        if self.stream.take().is_some() {
            warn!(
                error = why,
                "etcd watch stream broke; re-creating the watches"
            );
        } else {
            debug!(error = why, "opening the etcd watch stream failed");
        }
        for (key, entry) in &mut self.hubs {
            entry.created = false;
            entry.hub.notify(key);
        }
        self.failures = self.failures.saturating_add(1);
        let pause = Duration::from_millis(20 * u64::from(self.failures.min(25)));
        self.reopen_at = Some(Instant::now() + pause);
    }

    /// Sends every registered watch on a new stream.
    async fn resubscribe(&mut self) {
        let mut requests: Vec<(Vec<u8>, WatchOptions)> = self
            .once
            .iter()
            .map(|(id, e)| {
                (
                    e.key.clone(),
                    WatchOptions::new()
                        .with_start_revision(e.from_rev)
                        .with_watch_id(*id),
                )
            })
            .collect();
        requests.extend(self.hubs.values().map(|e| {
            (
                e.prefix.clone(),
                WatchOptions::new()
                    .with_prefix()
                    .with_filters([etcd_client::WatchFilterType::NoPut])
                    .with_start_revision(e.from_rev)
                    .with_watch_id(e.id),
            )
        }));
        for (key, opts) in requests {
            if !self.send_watch(key, opts).await {
                return;
            }
        }
    }

    /// Cancels hub watches nobody subscribes to any more.
    async fn collect_hubs(&mut self) {
        let gone: Vec<Key> = self
            .hubs
            .iter()
            .filter(|(k, e)| !e.hub.is_watched(k))
            .map(|(k, _)| k.clone())
            .collect();
        for key in gone {
            if let Some(entry) = self.hubs.remove(&key)
                && let Some((tx, _)) = &mut self.stream
            {
                let _ = tx.cancel(entry.id).await;
            }
        }
    }
}

async fn next_message(
    stream: &mut Option<(WatchRequestSender, WatchResponseStream)>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match stream {
        Some((_, rx)) => rx.message().await,
        None => std::future::pending().await,
    }
}
