//! The whole suite against the in-memory reference backend.

use std::sync::Arc;

use conformance::Factory;
use lock_core::Backend;
use lock_core::memory::MemoryBackend;

struct Memory(MemoryBackend);

#[lock_core::async_trait]
impl Factory for Memory {
    async fn backend(&self) -> lock_core::Result<Arc<dyn Backend>> {
        Ok(Arc::new(self.0.clone()))
    }
}

async fn factory() -> Memory {
    Memory(MemoryBackend::new())
}

conformance::suite!(factory);
