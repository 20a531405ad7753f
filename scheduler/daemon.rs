//! The long-running scheduler: fires jobs on their cron schedule, reloads, stops gracefully.
//!
//! Owns the schedule. Jobs are one-shot jobs of tokio-cron-scheduler at the
//! next fire time, computed by [`dashcache::warmup::jobs::Schedule`] in the job's
//! time zone (so daylight-saving changes are followed: tokio-cron-scheduler's
//! own time zone support fixes the UTC offset when a job is created); each
//! fire schedules the next one. A reload (SIGHUP, or the config file
//! changing) validates the new config completely before replacing the
//! schedule; a bad edit is logged with file, line and reason and the running
//! schedule stays. SIGTERM stops firing, lets running jobs finish for
//! `scheduler.shutdown_grace`, then cuts them (the history says so).
//! What one run does is [`dashcache::warmup::runner`]'s.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use dashcache::check::Checked;
use dashcache::metrics::{Metrics, ResultLabels};
use dashcache::service;
use dashcache::store::Store;
use dashcache::warmup::jobs;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_cron_scheduler::{Job, JobScheduler, JobSchedulerError};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use dashcache::warmup::runner::{Parts, Runner, RunnerError};

/// Why the scheduler could not start serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("starting the job scheduler: {0}")]
    Scheduler(#[source] JobSchedulerError),
    #[error("metrics listener on {addr}: {source}")]
    Metrics {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("watching {}: {source}", dir.display())]
    Watch { dir: PathBuf, source: notify::Error },
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

enum Event {
    Fire {
        job: String,
        at: DateTime<Utc>,
        generation: u64,
    },
    Reload(&'static str),
}

struct Daemon {
    path: PathBuf,
    store: Store,
    metrics: Arc<Metrics>,
    runner: Arc<Runner>,
    generation: u64,
    scheduler: JobScheduler,
    pending: HashMap<String, Uuid>,
    events: mpsc::Sender<Event>,
}

/// Runs the scheduler until SIGTERM or SIGINT.
pub async fn serve(
    path: PathBuf,
    runner: Runner,
    store: Store,
    metrics: Arc<Metrics>,
) -> Result<(), DaemonError> {
    let (events, mut rx) = mpsc::channel(64);
    let scheduler = JobScheduler::new().await.map_err(DaemonError::Scheduler)?;
    scheduler.start().await.map_err(DaemonError::Scheduler)?;
    if let Some(addr) = runner.config.scheduler.metrics_listen {
        serve_metrics(addr, metrics.clone()).await?;
    }
    let grace = runner.config.scheduler.shutdown_grace;
    let _watcher = if runner.config.scheduler.watch {
        Some(watch(&path, events.clone())?)
    } else {
        None
    };
    let mut daemon = Daemon {
        path,
        store,
        metrics,
        runner: Arc::new(runner),
        generation: 0,
        scheduler,
        pending: HashMap::new(),
        events,
    };
    daemon.schedule_all().await;
    tracing::info!(jobs = daemon.runner.jobs.len(), "scheduler started");
    // Signal handlers before READY=1: a SIGHUP sent right after it must reload,
    // not end the process (its default action).
    let mut hangup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;
    let mut terminate = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut interrupt = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    // systemd (Type=notify): the schedule is installed; no-op outside systemd.
    service::ready(&format!(
        "{} warm-up jobs scheduled",
        daemon.runner.jobs.len()
    ));

    let mut running = JoinSet::new();
    let stop = CancellationToken::new();
    loop {
        tokio::select! {
            Some(event) = rx.recv() => match event {
                Event::Reload(why) => daemon.reload(why).await,
                Event::Fire { job, at, generation } if generation == daemon.generation => {
                    daemon.fire(&job, at, &mut running, &stop).await;
                }
                Event::Fire { .. } => {}
            },
            _ = hangup.recv() => daemon.reload("SIGHUP").await,
            Some(_) = running.join_next(), if !running.is_empty() => {}
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }

    service::stopping();
    tracing::info!(
        running = running.len(),
        "stopping: no new runs; waiting for running ones"
    );
    let _ = daemon.scheduler.shutdown().await;
    let finished = tokio::time::timeout(grace, async {
        while running.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        tracing::warn!(
            running = running.len(),
            "shutdown grace over: cutting running jobs"
        );
        stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), async {
            while running.join_next().await.is_some() {}
        })
        .await;
    }
    tracing::info!("scheduler stopped");
    Ok(())
}

impl Daemon {
    /// Schedules the next fire of every job of the current config.
    async fn schedule_all(&mut self) {
        let names: Vec<String> = self.runner.jobs.iter().map(|j| j.name.clone()).collect();
        let now = Utc::now();
        for name in names {
            self.schedule_next(&name, now).await;
        }
    }

    /// Adds a one-shot job for `name`'s first fire time after `after`.
    async fn schedule_next(&mut self, name: &str, after: DateTime<Utc>) {
        let Some(job) = self.runner.job(name) else {
            return;
        };
        let Some(at) = job.schedule.next_after(after) else {
            tracing::warn!(job = name, cron = %job.schedule.expr, "the schedule never fires again");
            return;
        };
        let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        let (events, job_name, generation) =
            (self.events.clone(), name.to_owned(), self.generation);
        let one_shot =
            Job::new_one_shot_at_instant_async(std::time::Instant::now() + wait, move |_, _| {
                let (events, job) = (events.clone(), job_name.clone());
                Box::pin(async move {
                    let _ = events
                        .send(Event::Fire {
                            job,
                            at,
                            generation,
                        })
                        .await;
                })
            });
        let added = match one_shot {
            Ok(one_shot) => self.scheduler.add(one_shot).await,
            Err(err) => Err(err),
        };
        match added {
            Ok(id) => {
                tracing::debug!(job = name, next = %at, "scheduled");
                self.pending.insert(name.to_owned(), id);
            }
            Err(err) => tracing::error!(job = name, error = %err, "cannot schedule the job"),
        }
    }

    async fn fire(
        &mut self,
        name: &str,
        at: DateTime<Utc>,
        running: &mut JoinSet<()>,
        stop: &CancellationToken,
    ) {
        self.pending.remove(name);
        let runner = self.runner.clone();
        let stop = stop.clone();
        let job_name = name.to_owned();
        running.spawn(async move {
            let Some(job) = runner.job(&job_name) else {
                return;
            };
            // tokio-cron-scheduler fires on whole seconds: never start early.
            if let Ok(early) = (at - Utc::now()).to_std() {
                tokio::time::sleep(early).await;
            }
            if !job.jitter.is_zero() {
                let jitter = job.jitter.mul_f64(rand::random::<f64>());
                tokio::select! {
                    _ = tokio::time::sleep(jitter) => {}
                    _ = stop.cancelled() => return,
                }
            }
            runner.run(job, Some(at.timestamp_millis()), stop).await;
        });
        self.schedule_next(name, at).await;
    }

    /// Loads, validates and swaps in the config; keeps the old schedule on any error.
    async fn reload(&mut self, why: &str) {
        service::reloading();
        let result = dashcache::check::load(&self.path)
            .map_err(ReloadError::Rejected)
            .and_then(|checked| {
                let Checked {
                    config,
                    catalog,
                    warmups,
                } = checked;
                Parts::own(&config, self.store.clone(), self.metrics.clone())
                    .and_then(|parts| Runner::new(config, catalog, jobs::compile(warmups), parts))
                    .map_err(ReloadError::Redis)
            });
        match result {
            Ok(runner) => {
                for (_, id) in self.pending.drain() {
                    let _ = self.scheduler.remove(&id).await;
                }
                self.generation += 1;
                self.runner = Arc::new(runner);
                self.schedule_all().await;
                self.metrics
                    .warmup
                    .reloads
                    .get_or_create(&ResultLabels { result: "ok" })
                    .inc();
                tracing::info!(
                    trigger = why,
                    jobs = self.runner.jobs.len(),
                    "config reloaded"
                );
                service::reloaded(&format!(
                    "{} warm-up jobs scheduled (reloaded)",
                    self.runner.jobs.len()
                ));
            }
            Err(err) => {
                self.metrics
                    .warmup
                    .reloads
                    .get_or_create(&ResultLabels { result: "rejected" })
                    .inc();
                // One line per problem, as `dashcache-scheduler check` lists them.
                match &err {
                    ReloadError::Rejected(rejected) => {
                        for diagnostic in &rejected.diagnostics {
                            tracing::error!(
                                trigger = why,
                                "config rejected, the running schedule stays: {diagnostic}"
                            );
                        }
                    }
                    ReloadError::Redis(err) => tracing::error!(
                        trigger = why,
                        "config rejected, the running schedule stays: {err}"
                    ),
                }
                service::reloaded("config rejected; the previous schedule keeps running");
            }
        }
    }
}

/// Why a reload kept the running schedule.
enum ReloadError {
    Rejected(dashcache::check::Rejected),
    Redis(RunnerError),
}

/// Sends a reload when the config file changes. Watches its directory:
/// editors replace files by renaming, which a watch on the file would miss.
fn watch(
    path: &Path,
    events: mpsc::Sender<Event>,
) -> Result<notify::RecommendedWatcher, DaemonError> {
    use notify::Watcher;
    let file = path.file_name().map(|f| f.to_owned());
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let watching = |source| DaemonError::Watch {
        dir: dir.clone(),
        source,
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event
            && !event.kind.is_access()
            && event.paths.iter().any(|p| p.file_name() == file.as_deref())
        {
            let _ = tx.send(());
        }
    })
    .map_err(watching)?;
    watcher
        .watch(&dir, notify::RecursiveMode::NonRecursive)
        .map_err(watching)?;
    tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // An edit is often several events (truncate, write, rename): settle first.
            tokio::time::sleep(Duration::from_millis(300)).await;
            while rx.try_recv().is_ok() {}
            if events.send(Event::Reload("file change")).await.is_err() {
                return;
            }
        }
    });
    Ok(watcher)
}

/// Serves `GET /metrics` (any path, really) as Prometheus text.
async fn serve_metrics(
    addr: std::net::SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<(), DaemonError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Metrics { addr, source })?;
    tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                continue;
            };
            let metrics = metrics.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 2048];
                let _ = socket.read(&mut buf).await;
                let body = metrics.render();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain; version=0.0.4; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
            });
        }
    });
    Ok(())
}
