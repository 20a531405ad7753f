//! `dashcache-proxy sql`: statements run on the embedded engine's data path.
//!
//! Owns loading data into `[clickhouse] engine = "embedded"` (the schema, the
//! demo data: `scripts/demo-data --embedded`): a writable connection, which
//! the serving proxy never opens (its connections are read-only). The engine
//! serves one process per data path, so this runs while no proxy serves it.
//! It does not own what the statements are.

use std::io::Write as _;

use dashcache::config::{ClickHouseConfig, Engine};
use dashcache::engine::chdb::{Chdb, ChdbError, HOW_TO_GET};

/// Why the statements did not run.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(
        "`sql` runs on the embedded engine: set [clickhouse] engine = \"embedded\" and data_path"
    )]
    NotEmbedded,
    #[error("clickhouse.library is not set (nor DASHCACHE_CHDB_LIB): {HOW_TO_GET}")]
    NoLibrary,
    #[error("cannot create {path}: {source}")]
    DataPath {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("statement {index}: {source}")]
    Statement { index: usize, source: ChdbError },
    #[error(transparent)]
    Engine(#[from] ChdbError),
    #[error("writing the answer: {0}")]
    Output(#[from] std::io::Error),
}

/// Runs `statements` in order on one writable connection; each answer (TSV)
/// goes to stdout.
pub fn run(config: &ClickHouseConfig, statements: &[String]) -> Result<(), SqlError> {
    let (Engine::Embedded, Some(data_path)) = (config.engine, &config.data_path) else {
        return Err(SqlError::NotEmbedded);
    };
    let library = config.library.as_ref().ok_or(SqlError::NoLibrary)?;
    std::fs::create_dir_all(data_path).map_err(|source| SqlError::DataPath {
        path: data_path.clone(),
        source,
    })?;
    let chdb = Chdb::load(library)?;
    let mut connection = chdb.connect(&[format!("--path={}", data_path.display())])?;
    let result = write_answers(&mut connection, statements);
    // Left open: the process ends right after (`chdb::exit`).
    dashcache::engine::chdb::process_ending();
    drop(connection);
    result
}

fn write_answers(
    connection: &mut dashcache::engine::chdb::Connection,
    statements: &[String],
) -> Result<(), SqlError> {
    let mut out = std::io::stdout().lock();
    for (index, statement) in statements.iter().enumerate() {
        let answer = connection
            .query(statement, "TSV")
            .map_err(|source| SqlError::Statement {
                index: index + 1,
                source,
            })?;
        out.write_all(&answer)?;
    }
    out.flush()?;
    Ok(())
}
