//! Warm-up jobs: what both `dashcache-scheduler` and a proxy that runs the
//! jobs itself (`[scheduler] in_proxy`, the default without `[redis]`) need.
//!
//! `jobs` turns checked `[[warmup]]` entries into runnable jobs (schedules,
//! cache keys), `runner` runs one job once (slot, lease, keys, fills, history,
//! metrics) with the [`runner::Parts`] of the process running it, `lease`
//! keeps slots and leases (in Redis, or in this process without it), `history`
//! is the `warmup_runs` table, and `schedule` fires jobs on their schedules
//! inside a process that does other things. Reloads, signals and the
//! scheduler's own `/metrics` stay in `scheduler/` (its daemon).

pub mod history;
pub mod jobs;
pub mod lease;
pub mod runner;
pub mod schedule;
