//! Wake-ups for waiters: one shared hub per client, fed by the store's push
//! mechanism.
//!
//! A waiter must be subscribed *before* it tries the key, or a release that
//! lands between the failed try and the subscription is missed. Backends keep
//! one [`WakeHub`] per client, feed it from their single push connection
//! (Redis pub/sub, PostgreSQL `LISTEN`, a Consul blocking query per key) and
//! hand out [`Subscription`]s. Many waiters on one key share one slot, so the
//! store sees one subscription per key per client, not one per waiter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::Key;

/// A per-client table of watched keys.
#[derive(Debug, Default)]
pub struct WakeHub {
    slots: Mutex<HashMap<Key, Slot>>,
}

#[derive(Debug)]
struct Slot {
    tx: watch::Sender<u64>,
    subscribers: usize,
}

impl WakeHub {
    /// An empty hub.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn slots(&self) -> MutexGuard<'_, HashMap<Key, Slot>> {
        // A panic while holding this lock cannot leave the map inconsistent
        // (every update is a single insert/remove), so poisoning is ignored.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to wake-ups of `key`. Only notifications sent after this
    /// call wake the subscription.
    pub fn subscribe(self: &Arc<Self>, key: &Key) -> Subscription {
        let mut slots = self.slots();
        let first = !slots.contains_key(key);
        let slot = slots.entry(key.clone()).or_insert_with(|| Slot {
            tx: watch::Sender::new(0),
            subscribers: 0,
        });
        slot.subscribers += 1;
        let rx = slot.tx.subscribe();
        Subscription {
            rx: Some(rx),
            hub: Some((Arc::clone(self), key.clone())),
            first,
        }
    }

    /// Wakes every subscriber of `key` (a no-op when nobody waits).
    pub fn notify(&self, key: &Key) {
        if let Some(slot) = self.slots().get(key) {
            slot.tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every subscriber of every key, for example after the push
    /// connection reconnected and notifications may have been lost.
    pub fn notify_all(&self) {
        for slot in self.slots().values() {
            slot.tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Whether anybody waits on `key`.
    pub fn is_watched(&self, key: &Key) -> bool {
        self.slots().contains_key(key)
    }

    /// The keys somebody waits on.
    pub fn watched_keys(&self) -> Vec<Key> {
        self.slots().keys().cloned().collect()
    }

    fn unsubscribe(&self, key: &Key) {
        let mut slots = self.slots();
        if let Some(slot) = slots.get_mut(key) {
            slot.subscribers -= 1;
            if slot.subscribers == 0 {
                slots.remove(key);
            }
        }
    }
}

/// Interest in wake-ups of one key; dropping it unsubscribes.
#[derive(Debug)]
pub struct Subscription {
    rx: Option<watch::Receiver<u64>>,
    hub: Option<(Arc<WakeHub>, Key)>,
    first: bool,
}

impl Subscription {
    /// A subscription that never fires, for stores without push wake-ups;
    /// waiters then rely on the bounded re-check alone.
    pub fn never() -> Self {
        Subscription {
            rx: None,
            hub: None,
            first: false,
        }
    }

    /// Whether this was the first subscription to its key in the hub (the
    /// backend may need to start listening on the store).
    pub fn is_first(&self) -> bool {
        self.first
    }

    /// Completes at the next notification after the previous call (or after
    /// subscribing).
    pub async fn changed(&mut self) {
        let alive = match &mut self.rx {
            Some(rx) => rx.changed().await.is_ok(),
            None => false,
        };
        if !alive {
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some((hub, key)) = self.hub.take() {
            hub.unsubscribe(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn notifies_only_after_subscribe_and_cleans_up() {
        let hub = WakeHub::new();
        let key = Key::new("k").unwrap();
        hub.notify(&key);
        let mut a = hub.subscribe(&key);
        let b = hub.subscribe(&key);
        assert!(a.is_first() && !b.is_first());
        let early = tokio::time::timeout(Duration::from_millis(20), a.changed()).await;
        assert!(early.is_err(), "no notification was sent after subscribing");
        hub.notify(&key);
        tokio::time::timeout(Duration::from_secs(1), a.changed())
            .await
            .unwrap();
        drop(a);
        assert!(hub.is_watched(&key));
        drop(b);
        assert!(!hub.is_watched(&key));
        assert!(hub.watched_keys().is_empty());
    }
}
