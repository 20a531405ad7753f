-- The control store's first schema. Portable across SQLite and PostgreSQL:
-- ids are TEXT made by dashcache, times are BIGINT Unix milliseconds.

-- Scheduler run history: one row per job run.
CREATE TABLE IF NOT EXISTS warmup_runs (
    id          TEXT PRIMARY KEY,
    job         TEXT NOT NULL,
    host        TEXT NOT NULL,
    scheduled   BIGINT,
    started_ms  BIGINT NOT NULL,
    ended_ms    BIGINT,
    outcome     TEXT NOT NULL,
    keys_warmed BIGINT NOT NULL DEFAULT 0,
    keys_skipped BIGINT NOT NULL DEFAULT 0,
    keys_failed BIGINT NOT NULL DEFAULT 0,
    bytes       BIGINT NOT NULL DEFAULT 0,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS warmup_runs_job ON warmup_runs (job, started_ms);

-- API keys: only a SHA-256 of each key is stored.
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    key_hash    TEXT NOT NULL UNIQUE,
    tier        TEXT NOT NULL,
    tenant      TEXT NOT NULL,
    label       TEXT,
    created_ms  BIGINT NOT NULL,
    expires_ms  BIGINT,
    revoked_ms  BIGINT
);
