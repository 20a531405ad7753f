//! Warm-up jobs, runnable: schedules and the keys a run warms.
//!
//! Owns turning a checked `[[warmup]]` entry (`crate::check::Warmup`:
//! every rule — cron, time zone, query, tenants, parameter sets that bind —
//! is the library's, so `dashcache-proxy check` says the same) into a
//! [`WarmupJob`]: its cron schedule in a time zone that is followed across
//! daylight-saving changes, and its parameter sets turned into the exact
//! cache keys the proxy would use for the same requests.
//!
//! It does not run anything: executing jobs, leases, run history and reloads
//! are [`super::runner`], [`super::lease`], [`super::history`] and
//! [`crate::daemon`]; demand counting is `crate::popularity`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use chrono_tz::Tz;
use croner::Cron;

use crate::cache::CacheKey;
use crate::catalog::{Asked, QueryDef, ResolveError, TimeRange};
use crate::check::warmup::{SetProblem, Warmup, WarmupKind};
use crate::format::Format;
use crate::params::Clock;

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expr: String,
    pub tz: Tz,
    cron: Cron,
}

impl Schedule {
    /// Parses a 5-field (minute first) or 6-field (seconds first)
    /// expression, by the rules `crate::check` applies to the config.
    /// (Jobs are built from checked entries; this is for the tests below.)
    #[cfg(test)]
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, crate::check::warmup::WarmupError> {
        use crate::check::warmup;
        Ok(Schedule {
            tz: warmup::time_zone(tz)?,
            cron: warmup::cron(expr)?,
            expr: expr.to_owned(),
        })
    }

    /// The first fire time strictly after `after`, computed in local time of
    /// the zone (so 06:30 stays 06:30 local across DST changes).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let after = after.trunc_subsecs(0);
        self.cron
            .find_next_occurrence(&after.with_timezone(&self.tz), false)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }
}

/// A checked warm-up job, ready to run.
#[derive(Debug, Clone)]
pub struct WarmupJob {
    pub name: String,
    pub schedule: Schedule,
    pub kind: WarmupKind,
    pub concurrency: usize,
    pub jitter: Duration,
    pub refresh_ahead: Duration,
    /// ClickHouse settings added to this job's queries.
    pub settings: Vec<(String, String)>,
}

/// One answer to warm: which query, for whom, with what, under which key.
#[derive(Debug, Clone)]
pub struct Target {
    pub query: Arc<QueryDef>,
    pub tenant: Option<String>,
    pub format: Format,
    /// The parameters as a URL would carry them (without `format`).
    pub raw: Vec<(String, String)>,
    pub sql: String,
    /// The range `sql` reads, and for a relative request, the request as
    /// asked (refreshes resolve it again; see `FillJob`).
    pub range: Option<TimeRange>,
    pub asked: Option<Arc<Asked>>,
    pub key: CacheKey,
}

impl Target {
    /// Binds `raw` exactly as the proxy binds a request, renders and keys it.
    pub fn new(
        query: &Arc<QueryDef>,
        prefix: &str,
        tenant: Option<&str>,
        format: Format,
        raw: &[(String, String)],
        clock: &Clock,
    ) -> Result<Target, ResolveError> {
        let bound = query.bind_pairs(raw, clock, tenant)?;
        let sql = query.render(&bound)?;
        let key = query.cache_key(prefix, tenant, format, &bound);
        Ok(Target {
            query: query.clone(),
            tenant: tenant.map(str::to_owned),
            format,
            raw: raw.to_vec(),
            sql,
            range: query.range_of(&bound),
            asked: bound
                .is_relative()
                .then(|| Arc::new(Asked::new(query, &bound, tenant))),
            key,
        })
    }

    /// The path and tenant, for messages.
    pub fn describe(&self) -> String {
        match &self.tenant {
            Some(tenant) => format!("{} (tenant {tenant})", self.path()),
            None => self.path(),
        }
    }

    /// The proxy path that asks for this answer (`/v1/query/…?…`).
    pub fn path(&self) -> String {
        let mut query = form_urlencoded::Serializer::new(String::new());
        for (name, value) in &self.raw {
            query.append_pair(name, value);
        }
        if self.format != Format::Json {
            query.append_pair("format", self.format.name());
        }
        format!("/v1/query/{}?{}", self.query.name, query.finish())
    }
}

impl WarmupJob {
    /// The runnable job of an entry `crate::check` passed.
    pub fn new(warmup: Warmup) -> WarmupJob {
        WarmupJob {
            name: warmup.name,
            schedule: Schedule {
                expr: warmup.expr,
                tz: warmup.tz,
                cron: warmup.cron,
            },
            kind: warmup.kind,
            concurrency: warmup.concurrency,
            jitter: warmup.jitter,
            refresh_ahead: warmup.refresh_ahead,
            settings: warmup.settings,
        }
    }

    /// The distinct answers a `Query` job warms at `clock` (empty for `Popular`),
    /// and every set that does not bind (the check bound them all when the
    /// config was loaded; a relative range can grow too wide since).
    pub fn targets(&self, prefix: &str, clock: &Clock) -> (Vec<Target>, Vec<SetProblem>) {
        let mut targets = Vec::new();
        let mut problems = Vec::new();
        let WarmupKind::Query {
            query,
            tenants,
            formats,
            sets,
        } = &self.kind
        else {
            return (targets, problems);
        };
        let mut seen = HashSet::new();
        for tenant in tenants {
            for format in formats {
                for set in sets {
                    match Target::new(query, prefix, tenant.as_deref(), *format, set, clock) {
                        Ok(t) => {
                            if seen.insert(t.key.clone()) {
                                targets.push(t);
                            }
                        }
                        Err(error) => problems.push(SetProblem {
                            tenant: tenant.clone(),
                            set: set.clone(),
                            error,
                        }),
                    }
                }
            }
        }
        (targets, problems)
    }
}

/// The runnable jobs of a checked config, in file order.
pub fn compile(warmups: Vec<Warmup>) -> Vec<WarmupJob> {
    warmups.into_iter().map(WarmupJob::new).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn berlin_0630() -> Schedule {
        Schedule::parse("30 6 * * *", "Europe/Berlin").unwrap()
    }

    #[test]
    fn berlin_0630_stays_0630_local_across_both_dst_changes() {
        let s = berlin_0630();
        // Spring forward: Sunday 2026-03-29 02:00 CET → 03:00 CEST.
        let before = s
            .next_after(Utc.with_ymd_and_hms(2026, 3, 28, 0, 0, 0).unwrap())
            .unwrap();
        assert_eq!(before, Utc.with_ymd_and_hms(2026, 3, 28, 5, 30, 0).unwrap());
        let after = s.next_after(before).unwrap();
        assert_eq!(after, Utc.with_ymd_and_hms(2026, 3, 29, 4, 30, 0).unwrap());
        let next = s.next_after(after).unwrap();
        assert_eq!(next, Utc.with_ymd_and_hms(2026, 3, 30, 4, 30, 0).unwrap());
        // Fall back: Sunday 2026-10-25 03:00 CEST → 02:00 CET.
        let before = s
            .next_after(Utc.with_ymd_and_hms(2026, 10, 24, 0, 0, 0).unwrap())
            .unwrap();
        assert_eq!(
            before,
            Utc.with_ymd_and_hms(2026, 10, 24, 4, 30, 0).unwrap()
        );
        let after = s.next_after(before).unwrap();
        assert_eq!(after, Utc.with_ymd_and_hms(2026, 10, 25, 5, 30, 0).unwrap());
        for t in [before, after, next] {
            let local = t.with_timezone(&s.tz);
            assert_eq!(local.format("%H:%M:%S").to_string(), "06:30:00", "{t}");
        }
    }

    #[test]
    fn five_and_six_field_expressions() {
        let t0 = Utc.with_ymd_and_hms(2026, 11, 2, 10, 0, 0).unwrap(); // a Monday
        let s = Schedule::parse("30 6 * * Mon-Fri", "UTC").unwrap();
        assert_eq!(
            s.next_after(t0).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 3, 6, 30, 0).unwrap()
        );
        let s = Schedule::parse("*/5 * * * * *", "UTC").unwrap();
        assert_eq!(
            s.next_after(t0).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 2, 10, 0, 5).unwrap()
        );
        assert!(Schedule::parse("30 6 * *", "UTC").is_err());
        assert!(Schedule::parse("61 6 * * *", "UTC").is_err());
        assert!(Schedule::parse("30 6 * * *", "Mars/Olympus").is_err());
    }
}
