//! `dashcache-scheduler`: warms the cache from schedules in the config.
//!
//! Owns only the command line: `serve` (run the schedule), `run JOB` (one
//! job now), `targets JOB` (what it would warm), `check` (validate like
//! `nginx -t`) and `history`. The schedule, reloads and signals are
//! `daemon`'s; jobs, runs, leases and history are the library's
//! (`dashcache::warmup`, shared with a proxy that runs the jobs itself), as is
//! everything about keys, entries and ClickHouse.

mod daemon;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use dashcache::check::{Checked, Rejected};
use dashcache::metrics::Metrics;
use dashcache::store::Store;
use dashcache::telemetry::{self, LogFormat};
use dashcache::warmup::runner::{self, Parts};
use dashcache::warmup::{history, jobs};
use tokio_util::sync::CancellationToken;

/// mimalloc: the request path allocates small, short-lived buffers; glibc's
/// malloc was a fifth of the proxy's CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(version, about = "Cache warm-up scheduler for dashcache")]
struct Cli {
    /// Config file.
    #[arg(long, short, global = true, default_value = "config.toml")]
    config: PathBuf,
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the warm-up schedule until SIGTERM (SIGHUP or a file change reloads).
    Serve,
    /// Run one job now; exit non-zero if it failed or any key failed.
    Run { job: String },
    /// Print what a job would warm now, one answer a line: the tenant (`-`
    /// for queries that are not per tenant), a tab, the proxy path that
    /// asks for it (`popular` jobs depend on demand and list nothing).
    Targets { job: String },
    /// Validate the config (queries, SQL templates, tiers, warm-up jobs); on
    /// error, every problem on stderr (file, line, reason) and exit 1.
    Check,
    /// Print the run history, newest first.
    History {
        #[arg(long)]
        job: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: i64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("error: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            match err.downcast_ref::<Rejected>() {
                Some(rejected) => {
                    for diagnostic in &rejected.diagnostics {
                        eprintln!("dashcache-scheduler: error: {diagnostic}");
                    }
                }
                None => eprintln!(
                    "dashcache-scheduler: error: {}",
                    telemetry::one_line(err.as_ref())
                ),
            }
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let checked = match (dashcache::check::load(&cli.config), &cli.command) {
        // The same check, and the same diagnostics, as `dashcache-proxy check`.
        (Err(rejected), Command::Check) => {
            eprintln!("{rejected}");
            return Ok(ExitCode::FAILURE);
        }
        (checked, _) => checked?,
    };
    let Checked {
        config,
        catalog,
        warmups,
    } = checked;
    let jobs = jobs::compile(warmups);
    match cli.command {
        Command::Check => {
            println!(
                "{}: ok ({} queries, {} warm-up jobs)",
                cli.config.display(),
                catalog.iter().count(),
                jobs.len()
            );
            println!("{}", dashcache::check::mode(&config));
            Ok(ExitCode::SUCCESS)
        }
        Command::Targets { job } => {
            let Some(job) = jobs.iter().find(|j| j.name == job) else {
                let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
                anyhow::bail!("no warm-up job `{job}`; jobs: {}", names.join(", "));
            };
            let clock = dashcache::params::Clock {
                now: chrono::Utc::now(),
                now_step: config.cache.now_step,
            };
            let (targets, problems) = job.targets(&config.cache.key_prefix, &clock);
            for target in targets {
                println!(
                    "{}\t{}",
                    target.tenant.as_deref().unwrap_or("-"),
                    target.path()
                );
            }
            for problem in &problems {
                eprintln!("{problem}");
            }
            Ok(if problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::History { job, limit } => {
            let store = Store::from_config(&config).await?;
            let runs = history::list(&store, job.as_deref(), limit).await?;
            print!("{}", history::table(&runs));
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { job } => {
            let store = Store::from_config(&config).await?;
            let metrics = Arc::new(Metrics::new());
            let parts = Parts::own(&config, store, metrics)?;
            let runner = runner::Runner::new(config, catalog, jobs, parts)?;
            let Some(job) = runner.job(&job) else {
                let names: Vec<&str> = runner.jobs.iter().map(|j| j.name.as_str()).collect();
                anyhow::bail!("no warm-up job `{job}`; jobs: {}", names.join(", "));
            };
            let stop = CancellationToken::new();
            let cut = stop.clone();
            tokio::spawn(async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    cut.cancel();
                }
            });
            let report = runner.run(job, None, stop).await;
            let c = report.counts;
            println!(
                "{}: {} (warmed {}, still fresh {}, failed {}, {} bytes){}",
                job.name,
                report.outcome.as_str(),
                c.warmed,
                c.skipped,
                c.failed,
                c.bytes,
                report.error.map(|e| format!(": {e}")).unwrap_or_default()
            );
            Ok(if report.outcome.succeeded() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Serve => {
            let store = Store::from_config(&config).await?;
            let metrics = Arc::new(Metrics::new());
            let runner = {
                let parts = Parts::own(&config, store.clone(), metrics.clone())?;
                runner::Runner::new(config, catalog, jobs, parts)?
            };
            daemon::serve(cli.config, runner, store, metrics).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
