//! The answer cache: key, stored entry format, and the Redis store.
//!
//! [`CacheKey`] says *where* an answer lives, [`Entry`] *what* is stored there,
//! [`RedisCache`] reads and writes entries and degrades to "always miss" while
//! Redis is unreachable. Both binaries use these, so an entry warmed by the
//! scheduler is exactly what the proxy would have stored.

mod entry;
mod key;
mod redis;

pub use self::entry::{Entry, EntryError, EntryHeader};
pub use self::key::CacheKey;
pub use self::redis::RedisCache;

/// Version of the key scheme and the entry format. Bump it on any incompatible
/// change to either: old entries then simply become misses and expire.
pub const VERSION: u8 = 1;
