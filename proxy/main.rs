//! `dashcache-proxy`: parses the command line and runs the HTTP server.
//!
//! Everything else lives in the server modules below and in the library.

mod app;
mod query;
mod reply;
mod routes;
mod server;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use dashcache::telemetry::{self, LogFormat};

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
    /// Validate the config (and its SQL templates) and exit.
    Check,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let config = dashcache::config::Config::load(&cli.config)?;
    if let Some(Command::Check) = cli.command {
        let catalog = dashcache::catalog::Catalog::load(&config)?;
        println!(
            "{}: ok ({} queries)",
            cli.config.display(),
            catalog.iter().count()
        );
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the runtime")?;
    runtime.block_on(async {
        let app = app::App::new(config).context("invalid configuration")?;
        server::run(app, cli.listen).await
    })
}
