//! Wake-ups: one dedicated pub/sub connection per server per client.
//!
//! Why a dedicated connection: a subscribed RESP2 connection can do nothing
//! else, and the command connection must stay free of anything slow (its
//! requests time out after `response_timeout`, and a late answer would hold
//! up every request queued behind it). One subscriber task per server owns
//! its connection, subscribes a key's channel when the first waiter of this
//! client needs it (and answers only once the server confirmed, so no
//! release can slip between "subscribed" and "tried"), drops channels
//! nobody waits on any more, pings to notice a dead link, and reconnects
//! with backoff. After a reconnect it wakes every waiter, because releases
//! published while it was away are lost.
//!
//! A release publishes the id of the first fair waiter, if any. Plain
//! waiters of the key are woken through the client's [`WakeHub`]; a fair
//! waiter only when its own id is published, so a release wakes one fair
//! waiter, not all of them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use futures::StreamExt;
use lock_core::{Backoff, Key, WakeHub};
use redis::{Client, Value};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::{MissedTickBehavior, interval, sleep, timeout};
use tracing::{debug, warn};

use crate::config::NodeAddr;

/// How often channels nobody waits on are unsubscribed.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How often an idle subscriber connection is pinged.
const PING_EVERY: Duration = Duration::from_secs(5);

/// The waiters of one client, shared by its subscriber tasks.
#[derive(Debug, Default)]
pub(crate) struct Wakeups {
    pub(crate) hub: Arc<WakeHub>,
    fair: Mutex<HashMap<String, Arc<Notify>>>,
}

impl Wakeups {
    fn fair(&self) -> MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        // Single inserts and removes: a poisoned map is still consistent.
        self.fair.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a fair waiter; it is woken when its id is published.
    pub(crate) fn add_fair(&self, id: &str) -> Arc<Notify> {
        let n = Arc::new(Notify::new());
        self.fair().insert(id.to_string(), Arc::clone(&n));
        n
    }

    pub(crate) fn remove_fair(&self, id: &str) {
        self.fair().remove(id);
    }

    fn dispatch(&self, key: &Key, payload: &[u8]) {
        self.hub.notify(key);
        if payload.is_empty() {
            return;
        }
        if let Ok(id) = std::str::from_utf8(payload)
            && let Some(n) = self.fair().get(id)
        {
            n.notify_one();
        }
    }

    fn wake_all(&self) {
        self.hub.notify_all();
        for n in self.fair().values() {
            n.notify_one();
        }
    }
}

struct Ensure {
    channel: String,
    key: Key,
    ack: oneshot::Sender<bool>,
}

/// Handle to one server's subscriber task; the task ends when this is
/// dropped.
#[derive(Debug)]
pub(crate) struct Subscriber {
    tx: mpsc::UnboundedSender<Ensure>,
}

impl Subscriber {
    pub(crate) fn spawn(
        client: Client,
        addr: NodeAddr,
        wakeups: Weak<Wakeups>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Task {
            client,
            addr,
            wakeups,
            connect_timeout,
            response_timeout,
            wanted: HashMap::new(),
        };
        tokio::spawn(task.run(rx));
        Subscriber { tx }
    }

    /// Makes sure `channel` is subscribed. `true` once the server confirmed;
    /// `false` if the server is unreachable now (the task subscribes when it
    /// reconnects, and wakes every waiter then).
    pub(crate) async fn ensure(&self, channel: &str, key: &Key, limit: Duration) -> bool {
        let (ack, rx) = oneshot::channel();
        let cmd = Ensure {
            channel: channel.to_string(),
            key: key.clone(),
            ack,
        };
        if self.tx.send(cmd).is_err() {
            return false;
        }
        matches!(timeout(limit, rx).await, Ok(Ok(true)))
    }
}

struct Task {
    client: Client,
    addr: NodeAddr,
    wakeups: Weak<Wakeups>,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Channel name → key, for every channel we want subscribed.
    wanted: HashMap<String, Key>,
}

enum Next {
    Reconnect,
    Stop,
}

impl Task {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Ensure>) {
        let mut backoff = Backoff::default();
        let mut reconnected = false;
        loop {
            // Requests that arrive while connecting are answered once the
            // subscriptions are in place (or the attempt failed).
            let mut pending = Vec::new();
            let client = self.client.clone();
            let limit = self.connect_timeout;
            let connect = async move { timeout(limit, client.get_async_pubsub()).await };
            tokio::pin!(connect);
            let conn = loop {
                tokio::select! {
                    c = &mut connect => break c,
                    cmd = rx.recv() => match cmd {
                        Some(Ensure { channel, key, ack }) => {
                            self.wanted.insert(channel, key);
                            pending.push(ack);
                        }
                        None => return,
                    },
                }
            };
            let mut subscribed = false;
            let mut halves = None;
            match conn {
                Ok(Ok(pubsub)) => {
                    let (mut sink, stream) = pubsub.split();
                    subscribed = self.wanted.is_empty() || {
                        let chans: Vec<&String> = self.wanted.keys().collect();
                        matches!(
                            timeout(self.response_timeout, sink.subscribe(chans)).await,
                            Ok(Ok(()))
                        )
                    };
                    halves = Some((sink, stream));
                }
                Ok(Err(e)) => {
                    debug!(server = %self.addr, error = %e, "pub/sub connect failed");
                }
                Err(_) => debug!(server = %self.addr, "pub/sub connect timed out"),
            }
            for ack in pending {
                let _ = ack.send(subscribed);
            }
            let (mut sink, mut stream) = match halves {
                Some(h) if subscribed => h,
                _ => {
                    let pause = backoff.next_delay().max(Duration::from_millis(50));
                    if self.idle(&mut rx, pause).await {
                        return;
                    }
                    continue;
                }
            };
            backoff = Backoff::default();
            if reconnected {
                // Releases published while we were away are lost.
                debug!(server = %self.addr, "pub/sub reconnected; waking every waiter");
                match self.wakeups.upgrade() {
                    Some(w) => w.wake_all(),
                    None => return,
                }
            }
            reconnected = true;
            let mut sweep = interval(SWEEP_EVERY);
            let mut ping = interval(PING_EVERY);
            sweep.set_missed_tick_behavior(MissedTickBehavior::Delay);
            ping.set_missed_tick_behavior(MissedTickBehavior::Delay);
            let next = loop {
                tokio::select! {
                    cmd = rx.recv() => {
                        let Some(cmd) = cmd else { break Next::Stop };
                        if self.wanted.contains_key(&cmd.channel) {
                            let _ = cmd.ack.send(true);
                            continue;
                        }
                        let ok = matches!(
                            timeout(self.response_timeout, sink.subscribe(&cmd.channel)).await,
                            Ok(Ok(()))
                        );
                        self.remember(cmd, ok);
                        if !ok {
                            break Next::Reconnect;
                        }
                    }
                    msg = stream.next() => {
                        let Some(msg) = msg else { break Next::Reconnect };
                        let Some(w) = self.wakeups.upgrade() else { break Next::Stop };
                        if let Some(key) = self.wanted.get(msg.get_channel_name()) {
                            w.dispatch(key, msg.get_payload_bytes());
                        }
                    }
                    _ = sweep.tick() => {
                        let Some(w) = self.wakeups.upgrade() else { break Next::Stop };
                        let unused: Vec<String> = self
                            .wanted
                            .iter()
                            .filter(|(_, key)| !w.hub.is_watched(key))
                            .map(|(ch, _)| ch.clone())
                            .collect();
                        if unused.is_empty() {
                            continue;
                        }
                        for ch in &unused {
                            self.wanted.remove(ch);
                        }
                        if !matches!(
                            timeout(self.response_timeout, sink.unsubscribe(&unused)).await,
                            Ok(Ok(()))
                        ) {
                            break Next::Reconnect;
                        }
                    }
                    _ = ping.tick() => {
                        if !matches!(
                            timeout(self.response_timeout, sink.ping::<Value>()).await,
                            Ok(Ok(_))
                        ) {
                            break Next::Reconnect;
                        }
                    }
                }
            };
            match next {
                Next::Stop => return,
                Next::Reconnect => {
                    warn!(server = %self.addr, "pub/sub connection lost; reconnecting");
                }
            }
        }
    }

    fn remember(&mut self, cmd: Ensure, subscribed: bool) {
        self.wanted.insert(cmd.channel, cmd.key);
        let _ = cmd.ack.send(subscribed);
    }

    /// Sleeps `pause` while answering requests (not connected). `true`: the
    /// backend is gone.
    async fn idle(&mut self, rx: &mut mpsc::UnboundedReceiver<Ensure>, pause: Duration) -> bool {
        let wait = sleep(pause);
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => return false,
                cmd = rx.recv() => match cmd {
                    Some(cmd) => self.remember(cmd, false),
                    None => return true,
                },
            }
        }
    }
}
