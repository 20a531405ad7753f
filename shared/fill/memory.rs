//! An [`AnswerStore`] in process memory: answers bounded by bytes, kept until
//! their stale window ends, and computation locks that expire after their TTL.
//!
//! For one process alone (a single host without Redis) and for the fill's
//! in-process tests. It shares nothing with other processes, so "once across
//! processes" means once in this process. It does not own the in-process L1
//! in front of Redis (`crate::cache::l1`), which keeps only fresh answers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
use tokio::time::Instant;

use super::{AnswerStore, HeldLock, LockOutcome};
use crate::cache::{CacheKey, Entry};
use crate::clock::now_ms;

/// Answers and locks of one process.
pub struct MemoryStore {
    entries: moka::sync::Cache<CacheKey, Arc<Entry>>,
    locks: Arc<Mutex<HashMap<CacheKey, (u64, Instant)>>>,
    tokens: AtomicU64,
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of answer bodies.
    pub fn new(max_bytes: u64) -> MemoryStore {
        MemoryStore {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, entry: &Arc<Entry>| {
                    u32::try_from(entry.body.len()).unwrap_or(u32::MAX)
                })
                .build(),
            locks: Arc::default(),
            tokens: AtomicU64::new(1),
        }
    }

    /// The stored answer under `key`, if its stale window has not ended.
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let entry = self.entries.get(key)?;
        if now_ms() < entry.header.stale_until_ms {
            Some(entry)
        } else {
            self.entries.invalidate(key);
            None
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AnswerStore for MemoryStore {
    fn shared(&self, key: &CacheKey) -> BoxFuture<'_, Option<Entry>> {
        let found = self.get(key).map(|e| (*e).clone());
        Box::pin(async move { found })
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>, _now_ms: i64) -> BoxFuture<'_, bool> {
        self.entries.insert(key.clone(), entry);
        Box::pin(async { true })
    }

    fn lock(&self, key: &CacheKey, ttl: Duration) -> BoxFuture<'_, LockOutcome> {
        let now = Instant::now();
        let mut locks = locked(&self.locks);
        let outcome = match locks.get(key) {
            Some(&(_, until)) if until > now => LockOutcome::Held,
            _ => {
                let token = self.tokens.fetch_add(1, Ordering::Relaxed);
                locks.insert(key.clone(), (token, now + ttl));
                LockOutcome::Acquired(Box::new(MemoryLock {
                    locks: self.locks.clone(),
                    key: key.clone(),
                    token,
                }))
            }
        };
        Box::pin(async move { outcome })
    }

    fn is_locked(&self, key: &CacheKey) -> BoxFuture<'_, Option<bool>> {
        let now = Instant::now();
        let held = locked(&self.locks)
            .get(key)
            .is_some_and(|&(_, until)| until > now);
        Box::pin(async move { Some(held) })
    }
}

/// A lock of a [`MemoryStore`], released on drop. (Held locks do not need
/// renewing here: the holder is this process, and the guard goes with it.)
struct MemoryLock {
    locks: Arc<Mutex<HashMap<CacheKey, (u64, Instant)>>>,
    key: CacheKey,
    token: u64,
}

impl Drop for MemoryLock {
    fn drop(&mut self) {
        let mut locks = locked(&self.locks);
        if locks.get(&self.key).is_some_and(|&(t, _)| t == self.token) {
            locks.remove(&self.key);
        }
    }
}

impl HeldLock for MemoryLock {
    fn release(self: Box<Self>) -> BoxFuture<'static, ()> {
        drop(self);
        Box::pin(async {})
    }
}
