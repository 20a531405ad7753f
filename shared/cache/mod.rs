//! The answer cache: key, stored entry format, and the two tiers that hold entries.
//!
//! [`CacheKey`] says *where* an answer lives, [`Entry`] *what* is stored there.
//! [`Cache`] reads through a small in-process tier ([`L1`]) to Redis
//! ([`RedisCache`]), which degrades to "always miss" while Redis is unreachable;
//! then (and when Redis answers but has lost an entry: restarted empty, a
//! promoted replica) the answers this process kept in L1 are served for their
//! own freshness and grace.
//! Both binaries use these, so an entry warmed by the scheduler is exactly what
//! the proxy would have stored. Whether an entry is fresh is [`crate::freshness`]'s call.

mod entry;
mod key;
mod l1;
mod redis;

use std::sync::Arc;
use std::time::Duration;

pub use self::entry::{Entry, EntryError, EntryHeader, ServedHeaders};
pub use self::key::CacheKey;
pub use self::l1::L1;
pub use self::redis::{Fetched, LockOutcome, RedisCache};

use crate::clock::now_ms;
#[cfg(doc)]
use crate::config::Config;
use crate::config::{CacheConfig, RedisConfig};
use crate::metrics::Metrics;

/// Version of the key scheme and the entry format. Bump it on any incompatible
/// change to either: old entries then simply become misses and expire.
pub const VERSION: u8 = 3;

/// L1 in front of Redis.
pub struct Cache {
    l1: Option<L1>,
    redis: RedisCache,
    metrics: Arc<Metrics>,
    /// Entries stay in Redis at least this long after creation: the largest
    /// tier `min_ttl`, so cheaper tiers find the older answers they accept.
    min_retention_ms: i64,
}

impl Cache {
    /// Builds both tiers from their sections (`with_l1: false` for processes
    /// that only write, like the scheduler). Entries stay in Redis at least
    /// `min_retention` after creation (see [`Config::min_retention`]).
    pub fn new(
        cache: &CacheConfig,
        redis: &RedisConfig,
        min_retention: Duration,
        metrics: Arc<Metrics>,
        with_l1: bool,
    ) -> Result<Cache, crate::redis_conn::RedisConnError> {
        let l1 = (with_l1 && cache.l1_max_bytes > 0 && !cache.l1_ttl.is_zero())
            .then(|| L1::new(cache.l1_max_bytes, cache.l1_ttl));
        Ok(Cache {
            l1,
            redis: RedisCache::new(redis, metrics.clone())?,
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
        match self.redis.fetch(key).await {
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
        let entry = self.redis.get(key).await?;
        if let Some(l1) = &self.l1 {
            l1.offer(key, &Arc::new(entry.clone()), now_ms());
        }
        Some(entry)
    }

    /// Stores `entry` in both tiers; Redis keeps it until its stale window
    /// ends, or as long as the longest tier `min_ttl` if that is later, L1
    /// until its stale window ends (or the byte bound pushes it out): a Redis
    /// that did not take it costs no second computation while L1 keeps it.
    /// False when Redis did not take it.
    pub async fn put(&self, key: &CacheKey, entry: Arc<Entry>, now_ms: i64) -> bool {
        let until = entry.header.stale_until_ms.max(
            entry
                .header
                .created_ms
                .saturating_add(self.min_retention_ms),
        );
        let keep = Duration::from_millis((until - now_ms).max(1) as u64);
        let stored = self.redis.put(key, &entry, keep).await;
        if let Some(l1) = &self.l1 {
            l1.insert(key.clone(), entry);
        }
        stored
    }

    pub fn redis(&self) -> &RedisCache {
        &self.redis
    }
}
