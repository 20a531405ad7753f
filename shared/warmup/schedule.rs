//! Warm-up jobs on their schedules inside a process that does other things
//! (the proxy): one task per job waits for the job's next fire time in its
//! zone, waits out its jitter, and runs it, until stopped.
//!
//! Owns only *when*: what a run does is [`super::runner`]'s. The scheduler
//! binary has its own daemon (reloads, signals, a graceful stop); a proxy's
//! config does not change while it runs, so this is all it needs. Waits are
//! at most a minute long and the next fire time is taken from the wall clock
//! again after each, so a clock step (NTP, suspend) delays a run by at most that.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::runner::Runner;

/// The longest single wait before the wall clock is read again.
const RECHECK: Duration = Duration::from_secs(60);

/// Starts one task per job of `runner`; they end when `stop` is cancelled
/// (a run in progress is cut as `Interrupted`).
pub fn spawn(runner: Arc<Runner>, stop: CancellationToken) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for index in 0..runner.jobs.len() {
        let runner = runner.clone();
        let stop = stop.clone();
        tasks.spawn(async move { every_fire(&runner, index, &stop).await });
    }
    tasks
}

async fn every_fire(runner: &Runner, index: usize, stop: &CancellationToken) {
    let job = &runner.jobs[index];
    loop {
        let Some(at) = job.schedule.next_after(Utc::now()) else {
            tracing::warn!(job = %job.name, "the schedule has no next fire time; the job stops");
            return;
        };
        // Until the fire time (whole seconds: never early).
        while let Ok(left) = (at - Utc::now()).to_std() {
            if left.is_zero() {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(left.min(RECHECK)) => {}
                _ = stop.cancelled() => return,
            }
        }
        if !job.jitter.is_zero() {
            let jitter = job.jitter.mul_f64(rand::random::<f64>());
            tokio::select! {
                _ = tokio::time::sleep(jitter) => {}
                _ = stop.cancelled() => return,
            }
        }
        runner
            .run(job, Some(at.timestamp_millis()), stop.child_token())
            .await;
        if stop.is_cancelled() {
            return;
        }
    }
}
