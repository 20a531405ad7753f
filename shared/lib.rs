//! dashcache: the library both binaries share.
//!
//! It owns everything that is not HTTP serving or scheduling: the config file,
//! the query catalog and parameter validation, SQL rendering, the cache key and
//! entry format, the Redis cache, the ClickHouse client, miss coalescing and
//! metrics. The proxy (`proxy/`) and the scheduler (`scheduler/`) are thin
//! layers on top, so that a warmed entry is byte-for-byte what the proxy would
//! have stored.

pub mod admission;
pub mod backoff;
pub mod cache;
pub mod catalog;
pub mod check;
pub mod clickhouse;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod cors;
pub mod direct;
pub mod encoding;
pub mod engine;
pub(crate) mod exception;
pub mod fill;
pub mod format;
pub mod freshness;
pub mod holdback;
pub mod lock;
pub mod metrics;
pub mod outcome;
pub mod params;
pub mod popularity;
pub mod redis_conn;
pub mod service;
pub(crate) mod sql;
pub mod store;
pub mod telemetry;
pub mod timeexpr;
pub mod tls;
pub(crate) mod upstream;
pub mod warmup;
