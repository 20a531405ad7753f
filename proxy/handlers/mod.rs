//! Request handlers, one module per API surface: they read [`crate::state`]
//! and answer; routing and per-request accounting are [`crate::routes`].

pub mod export;
pub mod health;
pub mod query;
pub mod status;
