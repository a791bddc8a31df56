//! The README's example, kept compiling and running.

use lock_core::{LockClient, LockOptions, Wait, memory::MemoryBackend};
use std::time::Duration;

#[tokio::main]
async fn main() -> lock_core::Result<()> {
    // Or a Redis, etcd, Consul or PostgreSQL backend: the API is the same.
    let locks = LockClient::new(MemoryBackend::new());

    let opts = LockOptions::new()
        .ttl(Duration::from_secs(30)) // lease length, renewed while held
        .wait(Wait::For(Duration::from_secs(5))); // give up after 5 s

    let guard = locks.lock_with("order-42", &opts).await?;
    tokio::select! {
        reason = guard.lost() => eprintln!("lock lost ({reason}); stopping"),
        _ = process_order(42, guard.fencing_token()) => {}
    }
    guard.release().await?; // Ok(()) = we still held it
    Ok(())
}

async fn process_order(_id: u32, _fencing: lock_core::FencingToken) {}
