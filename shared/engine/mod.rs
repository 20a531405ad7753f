//! Query engines other than a ClickHouse server reached over HTTP.
//!
//! Owns [`chdb`]: ClickHouse's engine as an in-process library, loaded at run
//! time (the 26.x compatibility suite runs the catalog on it), and
//! [`embedded`]: that engine serving queries through a bounded pool of
//! blocking connections with streaming and cancellation. It does not own the
//! HTTP client of real servers (`crate::clickhouse`) nor choosing between
//! engines.

pub mod chdb;
pub mod embedded;
