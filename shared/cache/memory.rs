//! Answers and computation locks in process memory: the shared tier of a
//! process that has no Redis (the single-host mode), and the store of the
//! fill's in-process tests.
//!
//! Entries are bounded by bytes (body as stored, header, key and a fixed
//! overhead) and leave when their retention ends: their stale window, or the
//! longest tier `min_ttl` after creation if that is later, exactly as long as
//! Redis would keep them. Locks expire after their TTL and are released when
//! their guard is dropped. Nothing here is shared with other processes, so
//! "once across processes" means once in this process.
//!
//! It does not own the L1 in front of Redis ([`super::L1`]: a short-lived
//! copy of what Redis holds) nor what is fresh or stale ([`crate::freshness`]);
//! the fill's `AnswerStore` view of it lives in `crate::fill::memory`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use super::{CacheKey, Entry};
use crate::clock::now_ms;

/// Bookkeeping bytes counted per entry besides its body, header and key.
const ENTRY_OVERHEAD: usize = 256;

/// An entry and the Unix ms its retention ends.
#[derive(Clone)]
struct Held {
    entry: Arc<Entry>,
    until_ms: i64,
}

/// Entries leave when their retention ends.
impl super::Deadline for Held {
    fn until_ms(&self) -> i64 {
        self.until_ms
    }
}

/// The locks table: per key, the holder's token and when the lock expires.
type Locks = Arc<Mutex<HashMap<CacheKey, (u64, tokio::time::Instant)>>>;

/// Answers and locks of one process.
pub struct MemoryStore {
    entries: moka::sync::Cache<CacheKey, Held>,
    max_bytes: u64,
    min_retention_ms: i64,
    locks: Locks,
    tokens: AtomicU64,
}

impl MemoryStore {
    /// A store holding at most `max_bytes` of answers, each until its stale
    /// window ends.
    pub fn new(max_bytes: u64) -> MemoryStore {
        MemoryStore::with_retention(max_bytes, Duration::ZERO)
    }

    /// Like [`MemoryStore::new`], keeping each answer at least `min_retention`
    /// after its creation (the longest tier `min_ttl`).
    pub fn with_retention(max_bytes: u64, min_retention: Duration) -> MemoryStore {
        MemoryStore {
            entries: moka::sync::Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|key: &CacheKey, held: &Held| {
                    u32::try_from(weight(key, &held.entry)).unwrap_or(u32::MAX)
                })
                .expire_after(super::AtDeadline)
                .build(),
            max_bytes,
            min_retention_ms: i64::try_from(min_retention.as_millis()).unwrap_or(i64::MAX),
            locks: Arc::default(),
            tokens: AtomicU64::new(1),
        }
    }

    /// The stored answer under `key`, until its retention ends (any age: the
    /// caller judges its freshness).
    pub fn get(&self, key: &CacheKey) -> Option<Arc<Entry>> {
        let held = self.entries.get(key)?;
        (now_ms() < held.until_ms).then_some(held.entry)
    }

    /// Keeps `entry` under `key`; false when it was not kept: larger than the
    /// bound alone, its retention already ended, or, the store being full,
    /// judged less worth keeping than what it holds (moka's TinyLFU admission).
    pub fn keep(&self, key: &CacheKey, entry: Arc<Entry>) -> bool {
        let until_ms = entry.header.stale_until_ms.max(
            entry
                .header
                .created_ms
                .saturating_add(self.min_retention_ms),
        );
        if weight(key, &entry) as u64 > self.max_bytes || until_ms <= now_ms() {
            self.entries.invalidate(key);
            return false;
        }
        self.entries.insert(key.clone(), Held { entry, until_ms });
        // Evict now rather than on some later call, so the bound holds at
        // every moment a reader could look (puts are computations: rare).
        self.entries.run_pending_tasks();
        self.entries.contains_key(key)
    }

    /// Bytes the kept answers weigh (what `max_bytes` bounds).
    pub fn weighted_bytes(&self) -> u64 {
        self.entries.weighted_size()
    }

    /// The most bytes it keeps.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Takes `key`'s computation lock for `ttl`: the guard, or `None` while
    /// it is held (and not expired).
    pub fn try_lock(&self, key: &CacheKey, ttl: Duration) -> Option<MemoryLock> {
        let now = tokio::time::Instant::now();
        let mut locks = locked(&self.locks);
        if locks.get(key).is_some_and(|&(_, until)| until > now) {
            return None;
        }
        let token = self.tokens.fetch_add(1, Ordering::Relaxed);
        locks.insert(key.clone(), (token, now + ttl));
        Some(MemoryLock {
            locks: self.locks.clone(),
            key: key.clone(),
            token,
        })
    }

    /// Whether `key`'s computation lock is held.
    pub fn lock_held(&self, key: &CacheKey) -> bool {
        let now = tokio::time::Instant::now();
        locked(&self.locks)
            .get(key)
            .is_some_and(|&(_, until)| until > now)
    }
}

fn weight(key: &CacheKey, entry: &Entry) -> usize {
    let header = &entry.header;
    let headers: usize = header.headers.iter().map(|(n, v)| n.len() + v.len()).sum();
    entry.body.len()
        + key.as_str().len()
        + header.etag.len()
        + header.content_type.len()
        + headers
        + ENTRY_OVERHEAD
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A held lock of a [`MemoryStore`], released on drop. (Held locks need no
/// renewing here: the holder is this process, and the guard goes with it.)
pub struct MemoryLock {
    locks: Locks,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::EntryHeader;
    use crate::format::Format;
    use bytes::Bytes;

    fn entry(body: usize, stale_ms: i64) -> Arc<Entry> {
        let now = now_ms();
        Arc::new(Entry {
            header: EntryHeader {
                created_ms: now,
                fresh_until_ms: now + 1_000,
                stale_until_ms: now + stale_ms,
                compute_ms: 1,
                etag: "\"e\"".into(),
                content_type: "text/csv".into(),
                encoding: "identity".into(),
                range: None,
                headers: Vec::new(),
            },
            body: Bytes::from(vec![b'x'; body]),
            identity: Default::default(),
            read_once: Default::default(),
            served: Default::default(),
        })
    }

    #[test]
    fn the_byte_bound_holds_and_an_answer_larger_than_it_is_not_kept() {
        let store = MemoryStore::new(64 << 10);
        let mut kept = 0;
        for i in 0..100 {
            let key = CacheKey::new("t", "q", None, Format::Csv, &i.to_string());
            // Until it is full every answer is kept; then some are, some not.
            if store.keep(&key, entry(4 << 10, 60_000)) {
                kept += 1;
                assert!(store.get(&key).is_some());
            } else {
                assert!(store.get(&key).is_none());
            }
            assert!(store.weighted_bytes() <= store.max_bytes());
        }
        assert!((10..100).contains(&kept), "{kept}");
        let big = CacheKey::new("t", "q", None, Format::Csv, "big");
        assert!(!store.keep(&big, entry(65 << 10, 60_000)));
        assert!(store.get(&big).is_none());
    }

    #[test]
    fn answers_are_kept_through_grace_or_min_retention_then_leave() {
        let store = MemoryStore::with_retention(1 << 20, Duration::from_secs(3600));
        let key = CacheKey::new("t", "q", None, Format::Csv, "k");
        // Past its grace already, but a tier's min_ttl still wants it.
        let mut old = (*entry(10, 60_000)).clone();
        old.header.stale_until_ms = now_ms() - 1;
        assert!(store.keep(&key, Arc::new(old.clone())));
        assert!(store.get(&key).is_some());
        let plain = MemoryStore::new(1 << 20);
        assert!(!plain.keep(&key, Arc::new(old)));
        assert!(plain.get(&key).is_none());
    }

    #[tokio::test]
    async fn a_lock_is_held_until_its_guard_drops() {
        let store = MemoryStore::new(1 << 20);
        let key = CacheKey::new("t", "q", None, Format::Csv, "k");
        let guard = store.try_lock(&key, Duration::from_secs(10)).expect("free");
        assert!(store.lock_held(&key));
        assert!(store.try_lock(&key, Duration::from_secs(10)).is_none());
        drop(guard);
        assert!(!store.lock_held(&key));
        assert!(store.try_lock(&key, Duration::from_secs(10)).is_some());
    }
}
