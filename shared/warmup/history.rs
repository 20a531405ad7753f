//! Run history in the control store (`warmup_runs`), and printing it.
//!
//! Owns writing one row per run (inserted as `running` when the run starts,
//! completed when it ends, so a run cut by a crash still shows) and reading
//! rows back for `dashcache-scheduler history`. Connecting and migrating the
//! store is [`crate::store`]'s job.

use crate::store::{Store, StoreError};
use chrono::{TimeZone, Utc};

/// Counts of one run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub warmed: i64,
    pub skipped: i64,
    pub failed: i64,
    pub bytes: i64,
}

/// One row of `warmup_runs`.
#[derive(Debug, Clone)]
pub struct Run {
    pub id: String,
    pub job: String,
    pub host: String,
    pub scheduled: Option<i64>,
    pub started_ms: i64,
    pub ended_ms: Option<i64>,
    pub outcome: String,
    pub counts: Counts,
    pub error: Option<String>,
}

/// Records that a run started; returns its id.
pub async fn start(
    store: &Store,
    job: &str,
    host: &str,
    scheduled: Option<i64>,
    started_ms: i64,
) -> Result<String, StoreError> {
    let id = uuid::Uuid::new_v4().to_string();
    sqlx::query(
        "INSERT INTO warmup_runs (id, job, host, scheduled, started_ms, outcome) \
         VALUES ($1, $2, $3, $4, $5, 'running')",
    )
    .bind(&id)
    .bind(job)
    .bind(host)
    .bind(scheduled)
    .bind(started_ms)
    .execute(store.pool())
    .await?;
    Ok(id)
}

/// Records how a run ended.
pub async fn finish(
    store: &Store,
    id: &str,
    ended_ms: i64,
    outcome: &str,
    counts: Counts,
    error: Option<&str>,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE warmup_runs SET ended_ms = $1, outcome = $2, keys_warmed = $3, \
         keys_skipped = $4, keys_failed = $5, bytes = $6, error = $7 WHERE id = $8",
    )
    .bind(ended_ms)
    .bind(outcome)
    .bind(counts.warmed)
    .bind(counts.skipped)
    .bind(counts.failed)
    .bind(counts.bytes)
    .bind(error)
    .bind(id)
    .execute(store.pool())
    .await?;
    Ok(())
}

type Row = (
    String,
    String,
    String,
    Option<i64>,
    i64,
    Option<i64>,
    String,
    i64,
    i64,
    i64,
    i64,
    Option<String>,
);

/// The latest `limit` runs, newest first, of one job or all.
pub async fn list(store: &Store, job: Option<&str>, limit: i64) -> Result<Vec<Run>, StoreError> {
    let rows: Vec<Row> = match job {
        Some(job) => {
            sqlx::query_as(
                "SELECT id, job, host, scheduled, started_ms, ended_ms, outcome, \
                 keys_warmed, keys_skipped, keys_failed, bytes, error \
                 FROM warmup_runs WHERE job = $1 ORDER BY started_ms DESC, id LIMIT $2",
            )
            .bind(job)
            .bind(limit)
            .fetch_all(store.pool())
            .await?
        }
        None => {
            sqlx::query_as(
                "SELECT id, job, host, scheduled, started_ms, ended_ms, outcome, \
                 keys_warmed, keys_skipped, keys_failed, bytes, error \
                 FROM warmup_runs ORDER BY started_ms DESC, id LIMIT $1",
            )
            .bind(limit)
            .fetch_all(store.pool())
            .await?
        }
    };
    Ok(rows
        .into_iter()
        .map(|r| Run {
            id: r.0,
            job: r.1,
            host: r.2,
            scheduled: r.3,
            started_ms: r.4,
            ended_ms: r.5,
            outcome: r.6,
            counts: Counts {
                warmed: r.7,
                skipped: r.8,
                failed: r.9,
                bytes: r.10,
            },
            error: r.11,
        })
        .collect())
}

fn time(ms: i64) -> String {
    Utc.timestamp_millis_opt(ms)
        .single()
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// The runs as an aligned text table (times in UTC).
pub fn table(runs: &[Run]) -> String {
    let header = [
        "RUN",
        "JOB",
        "HOST",
        "SCHEDULED",
        "STARTED",
        "SECS",
        "OUTCOME",
        "WARMED",
        "SKIPPED",
        "FAILED",
        "BYTES",
        "ERROR",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|h| h.to_string()).collect()];
    for run in runs {
        rows.push(vec![
            run.id.chars().take(8).collect(),
            run.job.clone(),
            run.host.clone(),
            run.scheduled.map(time).unwrap_or_else(|| "manual".into()),
            time(run.started_ms),
            run.ended_ms
                .map(|e| format!("{:.1}", (e - run.started_ms) as f64 / 1000.0))
                .unwrap_or_else(|| "-".into()),
            run.outcome.clone(),
            run.counts.warmed.to_string(),
            run.counts.skipped.to_string(),
            run.counts.failed.to_string(),
            run.counts.bytes.to_string(),
            run.error.clone().unwrap_or_default().replace('\n', " "),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    out
}
