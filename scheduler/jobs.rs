//! Warm-up jobs: the `[scheduler]` section and `[[warmup]]` entries compiled.
//!
//! Owns their validation (with messages naming the file, the
//! line of the offending entry and the reason), cron schedules in a time zone
//! that is followed across daylight-saving changes, and turning a job's
//! parameter sets (explicit lists and cartesian products, relative dates) into
//! the exact cache keys the proxy would use for the same requests.
//!
//! Their raw shape is `dashcache::config`'s. It does not run anything:
//! executing jobs, leases, run history and reloads are [`crate::runner`],
//! [`crate::lease`], [`crate::history`] and [`crate::daemon`]; demand
//! counting is `dashcache::popularity`.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use chrono_tz::Tz;
use croner::Cron;

use dashcache::cache::CacheKey;
use dashcache::catalog::{Asked, Catalog, QueryDef, TimeRange};
use dashcache::config::{Config, ConfigError, DefaultValue, WarmupConfig};
use dashcache::format::Format;
use dashcache::params::{Clock, RawParam};

/// Most keys one job may warm per run: a guard against runaway products.
pub const MAX_KEYS_PER_JOB: usize = 10_000;

/// A cron expression in a time zone.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub expr: String,
    pub tz: Tz,
    cron: Cron,
}

impl Schedule {
    /// Parses a 5-field (minute first) or 6-field (seconds first) expression.
    pub fn parse(expr: &str, tz: &str) -> Result<Schedule, String> {
        let tz = Tz::from_str(tz).map_err(|_| format!("unknown time zone `{tz}`"))?;
        let fields = expr.split_whitespace().count();
        if fields != 5 && fields != 6 {
            return Err(format!(
                "cron `{expr}` has {fields} fields: write 5 (minute hour day month weekday) or 6 (seconds first)"
            ));
        }
        let cron = Cron::from_str(expr).map_err(|e| format!("cron `{expr}`: {e}"))?;
        Ok(Schedule {
            expr: expr.to_owned(),
            tz,
            cron,
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

/// What a job warms.
#[derive(Debug, Clone)]
pub enum JobKind {
    /// Configured parameter sets of one query.
    Query {
        query: Arc<QueryDef>,
        /// `[None]` for a query that is not tenant-scoped and lists no tenants.
        tenants: Vec<Option<String>>,
        formats: Vec<Format>,
        /// Each set as URL-style name/value pairs.
        sets: Vec<Vec<(String, String)>>,
    },
    /// The top `top` keys of the last `hours` hours of recorded demand.
    Popular { top: usize, hours: u32 },
}

/// A validated warm-up job.
#[derive(Debug, Clone)]
pub struct WarmupJob {
    pub name: String,
    pub schedule: Schedule,
    pub kind: JobKind,
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
    ) -> Result<Target, String> {
        let params: Vec<RawParam> = raw
            .iter()
            .map(|(n, v)| (n.as_str().into(), v.as_str().into()))
            .collect();
        let bound = query.bind(&params, clock, tenant).map_err(|problems| {
            problems
                .iter()
                .map(|p| format!("{}: {}", p.loc[1], p.msg))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let sql = query.render(&bound).map_err(|e| e.to_string())?;
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
    /// The distinct answers a `Query` job warms at `clock` (empty for `Popular`),
    /// and a message for every set that does not bind.
    pub fn targets(&self, prefix: &str, clock: &Clock) -> (Vec<Target>, Vec<String>) {
        let mut targets = Vec::new();
        let mut problems = Vec::new();
        let JobKind::Query {
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
                        Err(msg) => problems.push(describe_set(tenant.as_deref(), set, &msg)),
                    }
                }
            }
        }
        (targets, problems)
    }
}

fn describe_set(tenant: Option<&str>, set: &[(String, String)], msg: &str) -> String {
    let params: Vec<String> = set.iter().map(|(n, v)| format!("{n}={v}")).collect();
    let tenant = tenant.map(|t| format!(" tenant {t}")).unwrap_or_default();
    format!("parameter set {{{}}}{tenant}: {msg}", params.join(", "))
}

/// Validates the `[scheduler]` section and every `[[warmup]]` entry of
/// `config` against `catalog`. Reports every problem, each with the line of
/// the offending entry (found in the config file's text) and the reason.
pub fn load(config: &Config, catalog: &Catalog) -> Result<Vec<WarmupJob>, ConfigError> {
    let text = std::fs::read_to_string(&config.path).unwrap_or_default();
    let mut errors = Vec::new();
    let defaults = &config.scheduler;
    if Tz::from_str(&defaults.timezone).is_err() {
        errors.push(format!(
            "{}scheduler.timezone: unknown time zone `{}`",
            line_prefix(section_line(&text, "[scheduler]")),
            defaults.timezone
        ));
    }
    if defaults.concurrency == 0 {
        errors.push("scheduler.concurrency must be at least 1".into());
    }
    if let Err(msg) = settings(&defaults.settings) {
        errors.push(format!("scheduler.settings: {msg}"));
    }
    if defaults.lease_ttl < Duration::from_secs(1) {
        errors.push("scheduler.lease_ttl must be at least 1s".into());
    }

    let mut jobs = Vec::new();
    let mut names = HashSet::new();
    for (index, entry) in config.warmup.iter().enumerate() {
        let fail = |field: &str, msg: String| {
            format!(
                "{}warmup `{}`: {msg}",
                line_prefix(entry_line(&text, index, field)),
                entry.name
            )
        };
        if !names.insert(entry.name.as_str()) {
            errors.push(fail("name", "a job with this name exists already".into()));
            continue;
        }
        if entry.name.is_empty() || entry.name.contains(char::is_whitespace) {
            errors.push(fail(
                "name",
                "names must be non-empty, without spaces".into(),
            ));
            continue;
        }
        match compile(entry, config, catalog) {
            Ok(job) => jobs.push(job),
            Err((field, msg)) => errors.push(fail(field, msg)),
        }
    }
    if errors.is_empty() {
        Ok(jobs)
    } else {
        Err(config.invalid(errors.join("\n")))
    }
}

/// Compiles one entry; on error, the field to point at and the reason.
fn compile(
    entry: &WarmupConfig,
    config: &Config,
    catalog: &Catalog,
) -> Result<WarmupJob, (&'static str, String)> {
    let defaults = &config.scheduler;
    let tz = entry.timezone.as_deref().unwrap_or(&defaults.timezone);
    let schedule = Schedule::parse(&entry.cron, tz).map_err(|msg| {
        let field = if msg.starts_with("unknown time zone") {
            "timezone"
        } else {
            "cron"
        };
        (field, msg)
    })?;
    let concurrency = entry.concurrency.unwrap_or(defaults.concurrency);
    if concurrency == 0 {
        return Err(("concurrency", "concurrency must be at least 1".into()));
    }
    let mut job_settings = defaults.settings.clone();
    job_settings.extend(entry.settings.clone());
    let settings = settings(&job_settings).map_err(|msg| ("settings", msg))?;

    let kind = match (&entry.popular, &entry.query) {
        (Some(_), Some(_)) => {
            return Err((
                "popular",
                "a job warms either a `query` or `popular` keys, not both".into(),
            ));
        }
        (None, None) => return Err(("name", "needs a `query` (or `popular`)".into())),
        (Some(popular), None) => {
            if popular.top == 0 || popular.top > MAX_KEYS_PER_JOB {
                return Err((
                    "popular",
                    format!("popular.top must be within 1..={MAX_KEYS_PER_JOB}"),
                ));
            }
            if !(1..=24 * 31).contains(&popular.hours) {
                return Err(("popular", "popular.hours must be within 1..=744".into()));
            }
            if !entry.params.is_empty() || !entry.matrix.is_empty() || !entry.tenants.is_empty() {
                return Err((
                    "popular",
                    "a popular job takes no params, matrix or tenants".into(),
                ));
            }
            JobKind::Popular {
                top: popular.top,
                hours: popular.hours,
            }
        }
        (None, Some(name)) => query_kind(entry, name, catalog, config)?,
    };
    let job = WarmupJob {
        name: entry.name.clone(),
        schedule,
        kind,
        concurrency,
        jitter: entry.jitter.unwrap_or(defaults.jitter),
        refresh_ahead: entry.refresh_ahead.unwrap_or(defaults.refresh_ahead),
        settings,
    };
    // Every set must bind now, as a request would, for every tenant.
    let clock = Clock {
        now: Utc::now(),
        now_step: config.cache.now_step,
    };
    let (targets, problems) = job.targets(&config.cache.key_prefix, &clock);
    if let Some(problem) = problems.first() {
        let more = match problems.len() {
            1 => String::new(),
            n => format!(" (and {} more)", n - 1),
        };
        return Err(("params", format!("invalid parameter: {problem}{more}")));
    }
    if targets.len() > MAX_KEYS_PER_JOB {
        return Err((
            "matrix",
            format!("{} keys per run; at most {MAX_KEYS_PER_JOB}", targets.len()),
        ));
    }
    Ok(job)
}

fn query_kind(
    entry: &WarmupConfig,
    name: &str,
    catalog: &Catalog,
    config: &Config,
) -> Result<JobKind, (&'static str, String)> {
    let Some(query) = catalog.get(name) else {
        let known: Vec<&str> = config.queries.keys().map(String::as_str).collect();
        return Err((
            "query",
            format!("unknown query `{name}`; known: {}", known.join(", ")),
        ));
    };
    if query.tenant_scoped && entry.tenants.is_empty() {
        return Err((
            "tenants",
            format!("query `{name}` is per tenant: list the `tenants` to warm it for"),
        ));
    }
    let tenants = if entry.tenants.is_empty() {
        vec![None]
    } else {
        entry.tenants.iter().cloned().map(Some).collect()
    };
    let mut formats = Vec::new();
    for f in &entry.formats {
        formats.push(Format::from_param(f).ok_or_else(|| {
            (
                "formats",
                format!("unknown format `{f}`; use json, csv or ndjson"),
            )
        })?);
    }
    if formats.is_empty() {
        formats.push(Format::Json);
    }
    let sets = expand(&entry.params, &entry.matrix).map_err(|msg| ("matrix", msg))?;
    Ok(JobKind::Query {
        query: query.clone(),
        tenants,
        formats,
        sets,
    })
}

/// Every explicit set (one empty set if there are none) combined with every
/// combination of the matrix's value lists.
pub fn expand(
    params: &[BTreeMap<String, DefaultValue>],
    matrix: &BTreeMap<String, Vec<DefaultValue>>,
) -> Result<Vec<Vec<(String, String)>>, String> {
    let mut sets: Vec<Vec<(String, String)>> = if params.is_empty() {
        vec![Vec::new()]
    } else {
        params
            .iter()
            .map(|set| set.iter().map(|(n, v)| (n.clone(), v.as_text())).collect())
            .collect()
    };
    for (name, values) in matrix {
        if values.is_empty() {
            return Err(format!("matrix.{name} lists no values"));
        }
        if sets.iter().any(|set| set.iter().any(|(n, _)| n == name)) {
            return Err(format!(
                "`{name}` is both in matrix and in an explicit parameter set"
            ));
        }
        if sets.len().saturating_mul(values.len()) > MAX_KEYS_PER_JOB {
            return Err(format!(
                "the matrix makes more than {MAX_KEYS_PER_JOB} parameter sets"
            ));
        }
        sets = sets
            .iter()
            .flat_map(|set| {
                values.iter().map(move |v| {
                    let mut set = set.clone();
                    set.push((name.clone(), v.as_text()));
                    set
                })
            })
            .collect();
    }
    Ok(sets)
}

/// ClickHouse settings as name/value text, names checked.
fn settings(map: &BTreeMap<String, DefaultValue>) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (name, value) in map {
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(format!("`{name}` is not a ClickHouse setting name"));
        }
        if name == "readonly" {
            return Err("`readonly` is set by [clickhouse] for every query".into());
        }
        out.push((name.clone(), value.as_text()));
    }
    Ok(out)
}

fn line_prefix(line: Option<usize>) -> String {
    line.map(|n| format!("line {n}: ")).unwrap_or_default()
}

/// The 1-based line of a `[section]` header.
fn section_line(text: &str, header: &str) -> Option<usize> {
    text.lines().position(|l| l.trim() == header).map(|i| i + 1)
}

/// The 1-based line of `field` in the `index`-th `[[warmup]]` entry of
/// `text` (its header line if the field is not written there).
fn entry_line(text: &str, index: usize, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let header = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.trim() == "[[warmup]]")
        .nth(index)?
        .0;
    let mut in_sub_table = false;
    for (i, line) in lines.iter().enumerate().skip(header + 1) {
        let line = line.trim();
        if line.starts_with('[') {
            // `[warmup.matrix]` and the like still belong to this entry.
            if line.starts_with("[warmup.") {
                in_sub_table = true;
                if line
                    .trim_start_matches('[')
                    .starts_with(&format!("warmup.{field}"))
                {
                    return Some(i + 1);
                }
                continue;
            }
            break;
        }
        let key = line
            .split(['=', ' ', '.'])
            .next()
            .unwrap_or("")
            .trim_matches('"');
        if !in_sub_table && key == field {
            return Some(i + 1);
        }
    }
    Some(header + 1)
}

/// Checks `path` the way the scheduler would load it: config, catalog, jobs.
pub fn check(path: &Path) -> Result<(Config, Catalog, Vec<WarmupJob>), ConfigError> {
    let config = Config::load(path)?;
    let catalog = Catalog::load(&config)?;
    let jobs = load(&config, &catalog)?;
    Ok((config, catalog, jobs))
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

    #[test]
    fn matrix_is_a_cartesian_product_of_each_explicit_set() {
        let params: Vec<BTreeMap<String, DefaultValue>> =
            toml::from_str::<BTreeMap<String, Vec<BTreeMap<String, DefaultValue>>>>(
                "p = [{ from = \"today-7d\" }, { from = \"today-30d\" }]",
            )
            .unwrap()
            .remove("p")
            .unwrap();
        let matrix: BTreeMap<String, Vec<DefaultValue>> =
            toml::from_str("country = [\"DE\", \"FR\", \"US\"]\nlimit = [5, 10]").unwrap();
        let sets = expand(&params, &matrix).unwrap();
        assert_eq!(sets.len(), 2 * 3 * 2);
        assert!(sets.contains(&vec![
            ("from".into(), "today-30d".into()),
            ("country".into(), "US".into()),
            ("limit".into(), "10".into()),
        ]));
        assert_eq!(expand(&[], &BTreeMap::new()).unwrap(), vec![Vec::new()]);
    }

    fn shipped_with(extra: &str) -> Result<Vec<WarmupJob>, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let shipped = std::fs::read_to_string(root.join("config.toml")).unwrap();
        let dir = std::env::temp_dir().join(format!(
            "dashcache-warmup-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        // SQL paths are relative to the config: keep the file beside them.
        let text = format!("{shipped}\n{extra}")
            .replace("sql = \"sql/", &format!("sql = \"{}/sql/", root.display()));
        let path = dir.join("config.toml");
        std::fs::write(&path, &text).unwrap();
        let result = check(&path)
            .map(|(_, _, jobs)| jobs)
            .map_err(|e| e.to_string());
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[test]
    fn the_shipped_config_validates() {
        let jobs = shipped_with("").unwrap();
        assert!(jobs.iter().any(|j| matches!(j.kind, JobKind::Query { .. })));
        assert!(
            jobs.iter()
                .any(|j| matches!(j.kind, JobKind::Popular { .. }))
        );
    }

    #[test]
    fn bad_entries_are_rejected_with_file_line_and_reason() {
        let cases = [
            (
                "cron = \"61 6 * * *\"\nquery = \"active_users\"",
                "cron",
                "cron `61 6 * * *`",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"nope\"",
                "query",
                "unknown query `nope`",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"revenue\"\ntenants = [\"acme\"]\nparams = [{ from = \"today-7d\", to = \"tomorrow\" }]",
                "params",
                "invalid parameter",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"revenue\"",
                "tenants",
                "is per tenant: list the `tenants`",
            ),
            (
                "cron = \"30 6 * * *\"\ntimezone = \"Europe/Nowhere\"\nquery = \"active_users\"",
                "timezone",
                "unknown time zone",
            ),
        ];
        for (body, field, reason) in cases {
            let err = shipped_with(&format!("[[warmup]]\nname = \"bad\"\n{body}\n")).unwrap_err();
            assert!(err.contains("config.toml"), "{err}");
            assert!(err.contains("warmup `bad`"), "{err}");
            assert!(err.contains(reason), "{err}");
            let line = err
                .split("line ")
                .nth(1)
                .and_then(|rest| rest.split(':').next())
                .and_then(|n| n.parse::<usize>().ok())
                .unwrap_or_else(|| panic!("no line in {err}"));
            assert!(line > 1, "{err}");
            let _ = field;
        }
    }

    #[test]
    fn the_line_points_at_the_offending_field_of_the_entry() {
        let text = "[scheduler]\n\n[[warmup]]\nname = \"a\"\ncron = \"x\"\n\n[[warmup]]\nname = \"b\"\nquery = \"q\"\ncron = \"y\"\n[warmup.matrix]\ncountry = [\"DE\"]\n";
        assert_eq!(entry_line(text, 0, "cron"), Some(5));
        assert_eq!(entry_line(text, 1, "cron"), Some(10));
        assert_eq!(entry_line(text, 1, "matrix"), Some(11));
        assert_eq!(entry_line(text, 1, "tenants"), Some(7));
    }
}
