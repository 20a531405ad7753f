//! `dashcache-proxy`: parses the command line and runs the HTTP server.
//!
//! Everything else lives in the server modules below and in the library.

mod ahead;
mod auth;
mod chhttp;
mod cors;
mod error;
mod handlers;
mod history;
mod keycmd;
mod openapi;
mod prepared;
mod reply;
mod route;
mod routes;
mod server;
mod sqlcmd;
mod state;
mod warmup;
mod web;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dashcache::telemetry::{self, LogFormat};

/// mimalloc: the request path allocates small, short-lived buffers; glibc's
/// malloc was a fifth of the proxy's CPU under load (BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Tasks a busy worker thread polls between looks for new socket events
/// (tokio's default: 61). Under load each look then finds more ready
/// connections at once: at 512 connections on 2 cores, p99 15 → 11 ms and
/// 3–5 % less CPU per hit (BENCHMARKS.md, issue 18). An idle worker looks at
/// once, so light load sees no difference; timers fire at most a few
/// milliseconds late while every core is busy.
const EVENT_INTERVAL: u32 = 400;

#[derive(Parser)]
#[command(
    version,
    about = "Caching, coalescing proxy between dashboards and ClickHouse"
)]
struct Cli {
    /// Config file.
    #[arg(long, short, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Listen address (overrides `proxy.listen`).
    #[arg(long)]
    listen: Option<SocketAddr>,
    #[arg(long, global = true, value_enum, default_value_t)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the config (queries, SQL templates, tiers, warm-up jobs) and
    /// exit; on error, every problem on stderr (file, line, reason) and exit 1.
    Check,
    /// Manage API keys.
    #[command(subcommand)]
    Keys(keycmd::KeysCommand),
    /// Run SQL statements (one per argument, answers as TSV) on the embedded
    /// engine's data path, writable: loads data for `engine = "embedded"`.
    /// Not while a proxy serves that data path.
    Sql {
        #[arg(required = true)]
        statements: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let code = outcome(cli);
    // With the embedded engine loaded, end without its static destructors
    // (they can race its threads); otherwise return as usual.
    if code != ExitCode::SUCCESS {
        dashcache::engine::chdb::exit(1);
    }
    dashcache::engine::chdb::exit(0)
}

fn outcome(cli: Cli) -> ExitCode {
    // Start-up errors are one line naming the file, the setting and the fix
    // (a config that fails the check: one such line per problem).
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            match err.downcast_ref::<dashcache::check::Rejected>() {
                Some(rejected) => {
                    for diagnostic in &rejected.diagnostics {
                        eprintln!("dashcache-proxy: error: {diagnostic}");
                    }
                }
                None => eprintln!(
                    "dashcache-proxy: error: {}",
                    telemetry::one_line(err.as_ref())
                ),
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        // The same check, and the same diagnostics, as `dashcache-scheduler check`.
        Some(Command::Check) => Ok(match dashcache::check::load(&cli.config) {
            Ok(checked) => {
                println!(
                    "{}: ok ({} queries)",
                    cli.config.display(),
                    checked.catalog.iter().count()
                );
                println!("{}", dashcache::check::mode(&checked.config));
                ExitCode::SUCCESS
            }
            Err(rejected) => {
                eprintln!("{rejected}");
                ExitCode::FAILURE
            }
        }),
        Some(Command::Keys(command)) => {
            let config = dashcache::config::Config::load(&cli.config)?;
            let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
            runtime.block_on(keycmd::run(&config, command))?;
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Sql { statements }) => {
            let config = dashcache::config::Config::load(&cli.config)?;
            sqlcmd::run(&config.clickhouse, &statements)?;
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let checked = dashcache::check::load(&cli.config)?;
            let mut runtime = tokio::runtime::Builder::new_multi_thread();
            runtime.enable_all().event_interval(EVENT_INTERVAL);
            if checked.config.proxy.worker_threads > 0 {
                runtime.worker_threads(checked.config.proxy.worker_threads);
            }
            let runtime = runtime.build().context("starting the runtime")?;
            let served = runtime.block_on(async {
                let app = state::App::new(checked).await?;
                server::run(app.clone(), cli.listen).await?;
                if let Some(warmup) = &app.warmup {
                    warmup.stop(app.config.scheduler.shutdown_grace).await;
                }
                anyhow::Ok(())
            });
            // Engine queries still on blocking threads get a bounded wait;
            // the embedded engine's connections are left to the process's end.
            dashcache::engine::chdb::process_ending();
            runtime.shutdown_timeout(std::time::Duration::from_secs(10));
            served?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
