//! `dashcache-scheduler`: warms the cache from schedules in the config.
//!
//! For now it validates the config (`check`), like `nginx -t`; the warm-up
//! jobs build on the same catalog, key and entry code as the proxy.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use dashcache::telemetry::{self, LogFormat};

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
    /// Validate the config (and its SQL templates) and exit non-zero on error.
    Check,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let config = dashcache::config::Config::load(&cli.config)?;
    match cli.command {
        Command::Check => {
            let catalog = dashcache::catalog::Catalog::load(&config)?;
            println!(
                "{}: ok ({} queries)",
                cli.config.display(),
                catalog.iter().count()
            );
        }
    }
    Ok(())
}
