//! Integration tests against real ClickHouse and Redis (started by `scripts/services up`).
//!
//! One test crate with modules, so the suite links once. Every test starts its
//! own proxy process with its own cache key prefix, so tests do not share cache
//! state; fault tests start dedicated servers so others keep theirs.

mod harness;

mod browser;
mod check;
mod chhttp;
mod coalescing;
mod compat;
mod cors;
mod dashboards;
mod embedded;
mod export;
mod faults;
mod freshness;
mod http;
mod locks;
mod modern;
mod outage;
mod query;
mod scale;
mod scheduler;
mod secrets;
mod service;
mod single;
mod startup;
mod tenancy;
mod tls;
