//! Warm-up jobs run by the proxy itself: `[scheduler] in_proxy`, on by
//! default when there is no `[redis]` (a single host has no other process
//! to share warmed answers with, so the proxy warms its own memory).
//!
//! Owns starting the jobs' schedules (`dashcache::warmup::schedule`) with the
//! proxy's own cache, ClickHouse client, coalescer, admission, popularity
//! counts, metrics and control store, and stopping them at shutdown (a run in
//! progress is recorded as interrupted). What a run does is
//! `dashcache::warmup::runner`'s; the proxy never imports the scheduler binary.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dashcache::catalog::Catalog;
use dashcache::check::Warmup;
use dashcache::config::Config;
use dashcache::warmup::jobs;
use dashcache::warmup::runner::{Parts, Runner, RunnerError};
use dashcache::warmup::schedule;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// The jobs' schedules, running.
pub struct InProxy {
    stop: CancellationToken,
    tasks: Mutex<JoinSet<()>>,
}

impl InProxy {
    /// Starts the `[[warmup]]` jobs if this config has the proxy run them
    /// (and has some); `None` otherwise.
    pub fn start(
        config: &Config,
        catalog: &Catalog,
        warmups: Vec<Warmup>,
        parts: Parts,
    ) -> Result<Option<InProxy>, RunnerError> {
        if !config.scheduler.runs_in_proxy(config.redis.is_some()) || warmups.is_empty() {
            return Ok(None);
        }
        let jobs = jobs::compile(warmups);
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        tracing::info!(jobs = ?names, "warm-up jobs run in this proxy");
        let runner = Arc::new(Runner::new(config.clone(), catalog.clone(), jobs, parts)?);
        let stop = CancellationToken::new();
        let tasks = schedule::spawn(runner, stop.clone());
        Ok(Some(InProxy {
            stop,
            tasks: Mutex::new(tasks),
        }))
    }

    /// Stops the schedules; runs in progress get `grace` to record how far
    /// they came.
    pub async fn stop(&self, grace: Duration) {
        self.stop.cancel();
        let mut tasks =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        let ended =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if ended.is_err() {
            tracing::warn!("warm-up runs did not end within {grace:?}; cut");
        }
    }
}
