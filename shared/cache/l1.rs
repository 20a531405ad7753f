//! The in-process tier: answers this process read or computed, bounded by bytes.
//!
//! Two uses of the same entries. On the hot path ([`L1::get`]) an entry is
//! served without a network round trip while it is fresh by its own header and
//! at most the configured TTL (`cache.l1_ttl`) after it was put here, so an
//! answer another process refreshed in Redis is seen within that TTL; stale
//! serving goes through Redis. As a fallback ([`L1::kept`]) every entry is
//! kept until its own grace ends (or the byte bound pushes it out), for when
//! Redis cannot give it: Redis down, or back but empty. Then the answer this
//! process last saw stays servable for its own freshness and grace, and a
//! computed answer that Redis did not take serves the whole outage.
//! Which of its entries are fresh or stale is [`crate::freshness`]'s call.

use std::sync::Arc;
use std::time::Duration;

use super::{CacheKey, Entry};
use crate::clock::now_ms;

/// Bookkeeping bytes counted per entry besides its body.
const ENTRY_OVERHEAD: usize = 256;

/// An entry and when this process put it here.
#[derive(Clone)]
struct Kept {
    entry: Arc<Entry>,
    at_ms: i64,
}

/// Entries leave when their stale window ends.
impl super::Deadline for Kept {
    fn until_ms(&self) -> i64 {
        self.entry.header.stale_until_ms
    }
}

pub struct L1 {
    entries: moka::sync::Cache<CacheKey, Kept>,
    ttl_ms: i64,
}

impl L1 {
    pub fn new(max_bytes: u64, ttl: Duration) -> L1 {
        let entries = moka::sync::Cache::builder()
            .max_capacity(max_bytes)
            .weigher(|_key: &CacheKey, kept: &Kept| {
                u32::try_from(kept.entry.body.len() + ENTRY_OVERHEAD).unwrap_or(u32::MAX)
            })
            .expire_after(super::AtDeadline)
            .build();
        L1 {
            entries,
            ttl_ms: i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX),
        }
    }

    /// The hot path: an entry fresh by its header, put here within the TTL.
    pub fn get(&self, key: &CacheKey, now_ms: i64) -> Option<Arc<Entry>> {
        let kept = self.entries.get(key)?;
        (now_ms < kept.entry.header.fresh_until_ms
            && now_ms < kept.at_ms.saturating_add(self.ttl_ms))
        .then_some(kept.entry)
    }

    /// The fallback: the entry under `key` whatever its age, until its grace ends.
    pub fn kept(&self, key: &CacheKey, now_ms: i64) -> Option<Arc<Entry>> {
        let kept = self.entries.get(key)?;
        (now_ms < kept.entry.header.stale_until_ms).then_some(kept.entry)
    }

    /// Keeps `entry` (its TTL on the hot path starts now).
    pub fn insert(&self, key: CacheKey, entry: Arc<Entry>) {
        self.entries.insert(
            key,
            Kept {
                entry,
                at_ms: now_ms(),
            },
        );
    }

    /// Keeps `entry`, read from Redis, unless a copy at least as new is kept
    /// (no churn for a stale entry read again and again); a fresh one always
    /// goes in, so the hot path serves it for the next TTL.
    pub fn offer(&self, key: &CacheKey, entry: &Arc<Entry>, now_ms: i64) {
        if now_ms < entry.header.fresh_until_ms {
            self.insert(key.clone(), entry.clone());
            return;
        }
        let newer = self
            .entries
            .get(key)
            .is_some_and(|kept| kept.entry.header.created_ms >= entry.header.created_ms);
        if !newer {
            self.insert(key.clone(), entry.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::EntryHeader;
    use crate::format::Format;
    use bytes::Bytes;

    fn entry(created_ms: i64, fresh_ms: i64, stale_ms: i64) -> Arc<Entry> {
        Arc::new(Entry {
            header: EntryHeader {
                created_ms,
                fresh_until_ms: created_ms + fresh_ms,
                stale_until_ms: created_ms + stale_ms,
                compute_ms: 1,
                etag: "\"e\"".into(),
                content_type: "text/csv".into(),
                encoding: "identity".into(),
                range: None,
                headers: Vec::new(),
            },
            body: Bytes::from_static(b"a\n"),
            identity: Default::default(),
            read_once: Default::default(),
            served: Default::default(),
        })
    }

    #[test]
    fn the_hot_path_serves_fresh_entries_within_the_ttl_the_fallback_until_grace_ends() {
        let l1 = L1::new(1 << 20, Duration::from_secs(2));
        let key = CacheKey::new("t", "q", None, Format::Csv, "k");
        let now = now_ms();
        l1.insert(key.clone(), entry(now, 60_000, 3_600_000));
        // (The put time is read by `insert`, at or before this reading.)
        let put = now_ms();
        assert!(l1.get(&key, now).is_some());
        // Past the L1 TTL but fresh: not on the hot path (Redis may have a newer one)...
        assert!(l1.get(&key, put + 2_000).is_none());
        // ...but kept for when Redis cannot answer, through freshness and grace.
        assert!(l1.kept(&key, now + 2_000).is_some());
        assert!(l1.kept(&key, now + 3_599_999).is_some());
        assert!(l1.kept(&key, now + 3_600_000).is_none());
        // Past its own freshness, never on the hot path.
        let stale = CacheKey::new("t", "q", None, Format::Csv, "s");
        l1.insert(stale.clone(), entry(now - 120_000, 60_000, 3_600_000));
        assert!(l1.get(&stale, now).is_none());
        assert!(l1.kept(&stale, now).is_some());
    }

    #[test]
    fn an_older_copy_offered_does_not_replace_a_newer_one() {
        let l1 = L1::new(1 << 20, Duration::from_secs(2));
        let key = CacheKey::new("t", "q", None, Format::Csv, "k");
        let now = now_ms();
        l1.insert(key.clone(), entry(now - 10_000, 5_000, 3_600_000));
        l1.offer(&key, &entry(now - 20_000, 5_000, 3_600_000), now);
        let kept = l1.kept(&key, now).expect("kept");
        assert_eq!(kept.header.created_ms, now - 10_000);
    }
}
