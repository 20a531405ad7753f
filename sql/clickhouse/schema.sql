-- dashcache demo schema: raw events plus hourly/daily pre-aggregates kept up to date by
-- materialized views. ClickHouse 18.16-compatible (and valid on current releases); idempotent.
-- scripts/demo-data splits this file at ';' (so none inside statements) and sends one statement per request.
-- Read the aggregates with sumMerge(revenue), countMerge(events), uniqMerge(users)
-- from demo.events_hourly (bucket `hour`) and demo.events_daily (bucket `day`).

CREATE DATABASE IF NOT EXISTS demo;

CREATE TABLE IF NOT EXISTS demo.events
(
    ts        DateTime,
    tenant_id String,
    user_id   UInt64,
    country   String,   -- ISO-3166 alpha-2
    plan      String,   -- free / pro / enterprise
    event     String,   -- page_view / click / signup / purchase
    revenue   Float64   -- > 0 only for purchase
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(ts)
ORDER BY (tenant_id, ts);

CREATE TABLE IF NOT EXISTS demo.events_hourly
(
    hour      DateTime,
    tenant_id String,
    country   String,
    plan      String,
    revenue   AggregateFunction(sum, Float64),
    events    AggregateFunction(count),
    users     AggregateFunction(uniq, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (tenant_id, hour, country, plan);

CREATE TABLE IF NOT EXISTS demo.events_daily
(
    day       Date,
    tenant_id String,
    country   String,
    plan      String,
    revenue   AggregateFunction(sum, Float64),
    events    AggregateFunction(count),
    users     AggregateFunction(uniq, UInt64)
)
ENGINE = AggregatingMergeTree
PARTITION BY toYYYYMM(day)
ORDER BY (tenant_id, day, country, plan);

-- The views only move data; queries read the target tables above.
CREATE MATERIALIZED VIEW IF NOT EXISTS demo.events_hourly_mv TO demo.events_hourly AS
SELECT
    toStartOfHour(ts)    AS hour,
    tenant_id,
    country,
    plan,
    sumState(revenue)    AS revenue,
    countState()         AS events,
    uniqState(user_id)   AS users
FROM demo.events
GROUP BY tenant_id, hour, country, plan;

CREATE MATERIALIZED VIEW IF NOT EXISTS demo.events_daily_mv TO demo.events_daily AS
SELECT
    toDate(ts)           AS day,
    tenant_id,
    country,
    plan,
    sumState(revenue)    AS revenue,
    countState()         AS events,
    uniqState(user_id)   AS users
FROM demo.events
GROUP BY tenant_id, day, country, plan;
