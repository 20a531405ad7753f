//! [`MemoryStore`] as an [`AnswerStore`]: answers and computation locks of one
//! process, for a single host without Redis and for the fill's in-process tests.
//!
//! The store itself (bounds, retention, the locks table) is
//! [`crate::cache::MemoryStore`]; this module only adapts it to the fill's
//! interfaces. A lock of a store that is not shared always goes to this
//! process, so two fills of one key here run once (the coalescer already
//! makes it so for readers of one process).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;

use super::{AnswerStore, HeldLock, LockOutcome};
use crate::cache::{CacheKey, Entry, MemoryLock};

pub use crate::cache::MemoryStore;

impl AnswerStore for MemoryStore {
    fn shared(&self, key: &CacheKey) -> BoxFuture<'_, Option<Entry>> {
        let found = self.get(key).map(|e| (*e).clone());
        Box::pin(async move { found })
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>, _now_ms: i64) -> BoxFuture<'_, bool> {
        let stored = self.keep(key, entry);
        Box::pin(async move { stored })
    }

    fn lock(&self, key: &CacheKey, ttl: Duration) -> BoxFuture<'_, LockOutcome> {
        let outcome = match self.try_lock(key, ttl) {
            Some(guard) => LockOutcome::Acquired(Box::new(guard)),
            None => LockOutcome::Held,
        };
        Box::pin(async move { outcome })
    }

    fn is_locked(&self, key: &CacheKey) -> BoxFuture<'_, Option<bool>> {
        let held = self.lock_held(key);
        Box::pin(async move { Some(held) })
    }
}

impl HeldLock for MemoryLock {
    fn release(self: Box<Self>) -> BoxFuture<'static, ()> {
        drop(self);
        Box::pin(async {})
    }
}
