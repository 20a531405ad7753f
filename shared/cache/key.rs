//! Cache keys: a versioned hash of everything that determines an answer.
//!
//! The key hashes the query name, the tenant, the response format and what
//! identifies the answer within the query: for catalog queries, the
//! templates' fingerprint and the request as asked, relative times kept
//! relative (see `QueryDef::cache_key`), so an operator's SQL edit starts a
//! new key and a dashboard polling `now-7d` keeps one.
//! The hash sits in a Redis Cluster hash tag (`{…}`), so keys derived from it
//! (locks, markers) live in the same slot.

use std::fmt;

use sha2::{Digest, Sha256};

use super::VERSION;
use crate::format::Format;

/// Where one answer lives in Redis: `<prefix>:v<VERSION>:<query>:{<hash>}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    pub fn new(
        prefix: &str,
        query: &str,
        tenant: Option<&str>,
        format: Format,
        identity: &str,
    ) -> CacheKey {
        let mut hash = Sha256::new();
        for part in [
            &[VERSION][..],
            query.as_bytes(),
            tenant.unwrap_or("").as_bytes(),
            format.name().as_bytes(),
            identity.as_bytes(),
        ] {
            hash.update((part.len() as u64).to_le_bytes());
            hash.update(part);
        }
        let digest = hash.finalize();
        CacheKey(format!(
            "{prefix}:v{VERSION}:{query}:{{{}}}",
            hex::encode(&digest[..16])
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_input_changes_the_key() {
        let base = CacheKey::new("dc", "q", Some("acme"), Format::Json, "SELECT 1");
        assert_eq!(
            base,
            CacheKey::new("dc", "q", Some("acme"), Format::Json, "SELECT 1")
        );
        for other in [
            CacheKey::new("dc", "q2", Some("acme"), Format::Json, "SELECT 1"),
            CacheKey::new("dc", "q", Some("globex"), Format::Json, "SELECT 1"),
            CacheKey::new("dc", "q", None, Format::Json, "SELECT 1"),
            CacheKey::new("dc", "q", Some("acme"), Format::Csv, "SELECT 1"),
            CacheKey::new("dc", "q", Some("acme"), Format::Json, "SELECT 2"),
        ] {
            assert_ne!(base, other);
        }
        assert!(base.as_str().starts_with(&format!("dc:v{VERSION}:q:{{")));
        assert!(base.as_str().ends_with('}'));
    }

    #[test]
    fn parts_cannot_run_into_each_other() {
        assert_ne!(
            CacheKey::new("dc", "q", Some("ab"), Format::Json, "c"),
            CacheKey::new("dc", "q", Some("a"), Format::Json, "bc"),
        );
    }
}
