//! The in-process tier: the hottest answers, bounded by bytes, short-lived.
//!
//! A hit here costs no network round trip. Entries live at most the configured
//! TTL and are only served while fresh by their own header, so L1 never serves
//! an answer Redis would call stale; stale serving goes through Redis.

use std::sync::Arc;
use std::time::Duration;

use super::{CacheKey, Entry};

/// Bookkeeping bytes counted per entry besides its body.
const ENTRY_OVERHEAD: usize = 256;

pub struct L1 {
    entries: moka::sync::Cache<CacheKey, Arc<Entry>>,
}

impl L1 {
    pub fn new(max_bytes: u64, ttl: Duration) -> L1 {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, entry: &Arc<Entry>| {
                u32::try_from(entry.body.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .time_to_live(ttl)
            .build();
        L1 { entries }
    }

    /// A fresh entry under `key`, if L1 has one.
    pub fn get(&self, key: &CacheKey, now_ms: i64) -> Option<Arc<Entry>> {
        self.entries
            .get(key)
            .filter(|entry| now_ms < entry.header.fresh_until_ms)
    }

    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.entries.insert(key, entry);
    }
}
