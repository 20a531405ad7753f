//! The answer cache: key, stored entry format, and the tiers that hold entries.
//!
//! [`CacheKey`] says *where* an answer lives, [`Entry`] *what* is stored there.
//! With `[redis]`, [`Cache`] reads through a small in-process tier ([`L1`]) to
//! Redis ([`RedisCache`]), which degrades to "always miss" while Redis is
//! unreachable; then (and when Redis answers but has lost an entry: restarted
//! empty, a promoted replica) the answers this process kept in L1 are served
//! for their own freshness and grace. Without `[redis]` (one host) the shared
//! tier is [`MemoryStore`] in this process, bounded by bytes, and there is no
//! L1 in front of it (it is in process already).
//! Both binaries use these, so an entry warmed by the scheduler is exactly what
//! the proxy would have stored. Whether an entry is fresh is [`crate::freshness`]'s call.

mod entry;
mod key;
mod l1;
mod memory;
mod redis;

use std::sync::Arc;
use std::time::Duration;

pub use self::entry::{Entry, EntryError, EntryHeader, ServedHeaders};
pub use self::key::CacheKey;
pub use self::l1::L1;
pub use self::memory::{MemoryLock, MemoryStore};
pub use self::redis::{Fetched, LockOutcome, RedisCache};

use crate::clock::now_ms;
#[cfg(doc)]
use crate::config::Config;
use crate::config::{CacheConfig, RedisConfig};
use crate::metrics::Metrics;

/// What an in-process store keeps until a deadline of its own (Unix ms).
trait Deadline {
    fn until_ms(&self) -> i64;
}

/// moka's expiry for values that leave at their own [`Deadline`] (L1 and the
/// memory store).
struct AtDeadline;

impl<V: Deadline> moka::Expiry<CacheKey, V> for AtDeadline {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &V,
        _at: std::time::Instant,
    ) -> Option<Duration> {
        Some(left(value))
    }

    fn expire_after_update(
        &self,
        _key: &CacheKey,
        value: &V,
        _at: std::time::Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        Some(left(value))
    }
}

fn left(value: &impl Deadline) -> Duration {
    let ms = value.until_ms().saturating_sub(now_ms());
    Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// Version of the key scheme and the entry format. Bump it on any incompatible
/// change to either: old entries then simply become misses and expire.
pub const VERSION: u8 = 3;

/// Where answers are shared: Redis (several processes), or this process's memory.
enum Shared {
    Redis(RedisCache),
    Memory(MemoryStore),
}

/// L1 in front of Redis, or the process's memory alone.
pub struct Cache {
    l1: Option<L1>,
    shared: Shared,
    metrics: Arc<Metrics>,
    /// Entries stay in Redis at least this long after creation: the largest
    /// tier `min_ttl`, so cheaper tiers find the older answers they accept.
    min_retention_ms: i64,
}

impl Cache {
    /// Builds the tiers from their sections (`with_l1: false` for processes
    /// that only write, like the scheduler): Redis behind L1 with `[redis]`,
    /// else answers in this process's memory (`cache.memory_max_bytes`).
    /// Entries stay at least `min_retention` after creation (see
    /// [`Config::min_retention`]).
    pub fn new(
        cache: &CacheConfig,
        redis: Option<&RedisConfig>,
        min_retention: Duration,
        metrics: Arc<Metrics>,
        with_l1: bool,
    ) -> Result<Cache, crate::redis_conn::RedisConnError> {
        let Some(redis) = redis else {
            return Ok(Cache {
                l1: None,
                shared: Shared::Memory(MemoryStore::with_retention(
                    cache.memory_max_bytes,
                    min_retention,
                )),
                metrics,
                min_retention_ms: i64::try_from(min_retention.as_millis()).unwrap_or(i64::MAX),
            });
        };
        let l1 = (with_l1 && cache.l1_max_bytes > 0 && !cache.l1_ttl.is_zero())
            .then(|| L1::new(cache.l1_max_bytes, cache.l1_ttl));
        Ok(Cache {
            l1,
            shared: Shared::Redis(RedisCache::new(redis, metrics.clone())?),
            metrics,
            min_retention_ms: i64::try_from(min_retention.as_millis()).unwrap_or(i64::MAX),
        })
    }

    /// The entry under `key`: a fresh one from L1, else whatever Redis holds;
    /// when Redis is unreachable or has none, the one L1 kept (any age within
    /// its grace: the caller judges it).
    pub async fn get(&self, key: &CacheKey, now_ms: i64) -> Option<Arc<Entry>> {
        if let Some(l1) = &self.l1
            && let Some(entry) = l1.get(key, now_ms)
        {
            self.metrics.l1_hits.inc();
            return Some(entry);
        }
        let redis = match &self.shared {
            Shared::Redis(redis) => redis,
            Shared::Memory(memory) => return memory.get(key),
        };
        match redis.fetch(key).await {
            Fetched::Found(entry) => {
                if let Some(l1) = &self.l1 {
                    l1.offer(key, &entry, now_ms);
                }
                Some(entry)
            }
            Fetched::Missing | Fetched::Unavailable => {
                let kept = self.l1.as_ref()?.kept(key, now_ms)?;
                self.metrics.l1_fallbacks.inc();
                Some(kept)
            }
        }
    }

    /// The entry other processes see (Redis, not L1); a fresh one replaces
    /// this process's L1 copy, so an answer another process refreshed is
    /// served here at once.
    pub async fn shared(&self, key: &CacheKey) -> Option<Entry> {
        let redis = match &self.shared {
            Shared::Redis(redis) => redis,
            Shared::Memory(memory) => return memory.get(key).map(Arc::unwrap_or_clone),
        };
        let entry = redis.get(key).await?;
        if let Some(l1) = &self.l1 {
            l1.offer(key, &Arc::new(entry.clone()), now_ms());
        }
        Some(entry)
    }

    /// Stores `entry` in both tiers; Redis keeps it until its stale window
    /// ends, or as long as the longest tier `min_ttl` if that is later, L1
    /// until its stale window ends (or the byte bound pushes it out): a Redis
    /// that did not take it costs no second computation while L1 keeps it.
    /// False when Redis did not take it. Without Redis, the process's memory
    /// keeps it as long (false when it alone is larger than the bound).
    pub async fn put(&self, key: &CacheKey, entry: Arc<Entry>, now_ms: i64) -> bool {
        let redis = match &self.shared {
            Shared::Redis(redis) => redis,
            Shared::Memory(memory) => {
                let stored = memory.keep(key, entry);
                self.metrics
                    .memory_answers_bytes
                    .set(i64::try_from(memory.weighted_bytes()).unwrap_or(i64::MAX));
                return stored;
            }
        };
        let until = entry.header.stale_until_ms.max(
            entry
                .header
                .created_ms
                .saturating_add(self.min_retention_ms),
        );
        let keep = Duration::from_millis((until - now_ms).max(1) as u64);
        let stored = redis.put(key, &entry, keep).await;
        if let Some(l1) = &self.l1 {
            l1.insert(key.clone(), entry);
        }
        stored
    }

    /// Redis, unless answers live in this process's memory (no `[redis]`).
    pub fn redis(&self) -> Option<&RedisCache> {
        match &self.shared {
            Shared::Redis(redis) => Some(redis),
            Shared::Memory(_) => None,
        }
    }

    /// The process's memory store, when there is no Redis.
    pub fn memory(&self) -> Option<&MemoryStore> {
        match &self.shared {
            Shared::Redis(_) => None,
            Shared::Memory(memory) => Some(memory),
        }
    }
}
