//! The rules of `[scheduler]` and `[[warmup]]` entries, and the entries parsed.
//!
//! Owns what makes a warm-up job valid: its name, its cron expression
//! (croner; 5 fields, or 6 with seconds first) and time zone (chrono-tz),
//! concurrency, ClickHouse settings, what it warms (a catalog query with its
//! tenants, formats and parameter sets — explicit sets times the matrix — or
//! `popular` keys), that every set binds now for every tenant exactly as a
//! request would, and the key count limit. A valid entry comes out as a
//! [`Warmup`] with defaults applied and every value parsed, which the
//! scheduler turns into its runnable job.
//!
//! It does not schedule or run anything (next fire times, leases, keys of a
//! run: the scheduler), and it reads no file (lines come from the config).

use std::collections::{BTreeMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use chrono_tz::Tz;
use croner::Cron;

use crate::catalog::{Catalog, QueryDef, ResolveError};
use crate::config::{Config, DefaultValue, Diagnostic, WarmupConfig};
use crate::format::Format;
use crate::params::Clock;

/// Most keys one job may warm per run: a guard against runaway products.
pub const MAX_KEYS_PER_JOB: usize = 10_000;

/// One parameter set of a job, as URL-style name/value pairs.
pub type ParamSet = Vec<(String, String)>;

/// A valid `[[warmup]]` entry: defaults applied, every value parsed.
#[derive(Debug, Clone)]
pub struct Warmup {
    pub name: String,
    /// The cron expression as written, and parsed.
    pub expr: String,
    pub cron: Cron,
    /// The job's time zone (its own, or `scheduler.timezone`).
    pub tz: Tz,
    pub kind: WarmupKind,
    pub concurrency: usize,
    pub jitter: Duration,
    pub refresh_ahead: Duration,
    /// ClickHouse settings of the job's queries (`[scheduler]`'s, then its own).
    pub settings: Vec<(String, String)>,
}

/// What a job warms.
#[derive(Debug, Clone)]
pub enum WarmupKind {
    /// Configured parameter sets of one query.
    Query {
        query: Arc<QueryDef>,
        /// `[None]` for a query that is not tenant-scoped and lists no tenants.
        tenants: Vec<Option<String>>,
        formats: Vec<Format>,
        sets: Vec<ParamSet>,
    },
    /// The top `top` keys of the last `hours` hours of recorded demand.
    Popular { top: usize, hours: u32 },
}

/// What is wrong with a `[[warmup]]` entry. Each variant knows the key it
/// is about ([`WarmupError::key`]), so its line can be found.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error("a job with this name exists already")]
    DuplicateName,
    #[error("names must be non-empty, without spaces")]
    BadName,
    /// The entry's zone, or `scheduler.timezone` for an entry without one.
    #[error("unknown time zone `{0}`")]
    UnknownZone(String),
    #[error(
        "cron `{expr}` has {fields} fields: write 5 (minute hour day month weekday) or 6 (seconds first)"
    )]
    CronFields { expr: String, fields: usize },
    #[error("cron `{expr}`: {source}")]
    Cron {
        expr: String,
        source: croner::errors::CronError,
    },
    #[error("concurrency must be at least 1")]
    Concurrency,
    #[error(transparent)]
    Setting(#[from] SettingError),
    #[error("a job warms either a `query` or `popular` keys, not both")]
    QueryAndPopular,
    #[error("needs a `query` (or `popular`)")]
    NothingToWarm,
    #[error("popular.top must be within 1..={MAX_KEYS_PER_JOB}")]
    PopularTop,
    #[error("popular.hours must be within 1..=744")]
    PopularHours,
    #[error("a popular job takes no params, matrix or tenants")]
    PopularWithSets,
    #[error("unknown query `{name}`; known: {}", known.join(", "))]
    UnknownQuery { name: String, known: Vec<String> },
    /// The query is configured but does not compile: reported at the
    /// query, so not again for each job warming it.
    #[error("query `{0}` does not compile")]
    BrokenQuery(String),
    #[error("query `{0}` is per tenant: list the `tenants` to warm it for")]
    TenantsMissing(String),
    #[error("unknown format `{0}`; use json, csv or ndjson")]
    UnknownFormat(String),
    #[error("matrix.{0} lists no values")]
    EmptyMatrix(String),
    #[error("`{0}` is both in matrix and in an explicit parameter set")]
    MatrixAndSet(String),
    #[error("the matrix makes more than {MAX_KEYS_PER_JOB} parameter sets")]
    TooManySets,
    /// Sets that do not bind now: the first one, and how many more.
    #[error(
        "invalid parameter: {first}{}",
        match more { 0 => String::new(), n => format!(" (and {n} more)") }
    )]
    Params { first: SetProblem, more: usize },
    #[error("{0} keys per run; at most {MAX_KEYS_PER_JOB}")]
    TooManyKeys(usize),
}

impl WarmupError {
    /// The key of the entry to point at.
    pub fn key(&self) -> &'static str {
        match self {
            WarmupError::DuplicateName | WarmupError::BadName | WarmupError::NothingToWarm => {
                "name"
            }
            WarmupError::UnknownZone(_) => "timezone",
            WarmupError::CronFields { .. } | WarmupError::Cron { .. } => "cron",
            WarmupError::Concurrency => "concurrency",
            WarmupError::Setting(_) => "settings",
            WarmupError::QueryAndPopular
            | WarmupError::PopularTop
            | WarmupError::PopularHours
            | WarmupError::PopularWithSets => "popular",
            WarmupError::UnknownQuery { .. } | WarmupError::BrokenQuery(_) => "query",
            WarmupError::TenantsMissing(_) => "tenants",
            WarmupError::UnknownFormat(_) => "formats",
            WarmupError::EmptyMatrix(_)
            | WarmupError::MatrixAndSet(_)
            | WarmupError::TooManySets
            | WarmupError::TooManyKeys(_) => "matrix",
            WarmupError::Params { .. } => "params",
        }
    }
}

/// A ClickHouse setting a job may not carry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SettingError {
    #[error("`{0}` is not a ClickHouse setting name")]
    BadName(String),
    #[error("`readonly` is set by [clickhouse] for every query")]
    Readonly,
}

/// A parameter set that does not bind (or render) for a tenant.
#[derive(Debug, Clone, thiserror::Error)]
#[error("parameter set {{{}}}{}: {error}",
    set.iter().map(|(n, v)| format!("{n}={v}")).collect::<Vec<_>>().join(", "),
    tenant.as_ref().map(|t| format!(" tenant {t}")).unwrap_or_default())]
pub struct SetProblem {
    pub tenant: Option<String>,
    pub set: ParamSet,
    pub error: ResolveError,
}

/// Checks `[scheduler]` and every `[[warmup]]` entry of `config` against
/// `catalog`: the valid entries, and a diagnostic for every problem.
pub fn check(config: &Config, catalog: &Catalog) -> (Vec<Warmup>, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let defaults = &config.scheduler;
    if Tz::from_str(&defaults.timezone).is_err() {
        diagnostics.push(config.diagnostic(
            &["scheduler", "timezone"],
            format!(
                "scheduler.timezone: unknown time zone `{}`",
                defaults.timezone
            ),
        ));
    }
    if defaults.concurrency == 0 {
        diagnostics.push(config.diagnostic(
            &["scheduler", "concurrency"],
            "scheduler.concurrency must be at least 1",
        ));
    }
    if let Err(err) = settings(&defaults.settings) {
        diagnostics.push(config.diagnostic(
            &["scheduler", "settings"],
            format!("scheduler.settings: {err}"),
        ));
    }
    if defaults.lease_ttl < Duration::from_secs(1) {
        diagnostics.push(config.diagnostic(
            &["scheduler", "lease_ttl"],
            "scheduler.lease_ttl must be at least 1s",
        ));
    }

    let mut warmups = Vec::new();
    let mut names = HashSet::new();
    for (index, entry) in config.warmup.iter().enumerate() {
        let result = if !names.insert(entry.name.as_str()) {
            Err(WarmupError::DuplicateName)
        } else if entry.name.is_empty() || entry.name.contains(char::is_whitespace) {
            Err(WarmupError::BadName)
        } else {
            parse(entry, config, catalog)
        };
        match result {
            Ok(warmup) => warmups.push(warmup),
            Err(WarmupError::BrokenQuery(_)) => {}
            Err(err) => diagnostics.push(config.diagnostic(
                &["warmup", &index.to_string(), err.key()],
                format!("warmup `{}`: {err}", entry.name),
            )),
        }
    }
    (warmups, diagnostics)
}

/// Parses a cron expression as the scheduler runs it: 5 fields (minute
/// first) or 6 (seconds first).
pub fn cron(expr: &str) -> Result<Cron, WarmupError> {
    let fields = expr.split_whitespace().count();
    if fields != 5 && fields != 6 {
        return Err(WarmupError::CronFields {
            expr: expr.to_owned(),
            fields,
        });
    }
    Cron::from_str(expr).map_err(|source| WarmupError::Cron {
        expr: expr.to_owned(),
        source,
    })
}

/// Parses an IANA time zone name.
pub fn time_zone(name: &str) -> Result<Tz, WarmupError> {
    Tz::from_str(name).map_err(|_| WarmupError::UnknownZone(name.to_owned()))
}

/// Parses one entry (its name already checked).
fn parse(entry: &WarmupConfig, config: &Config, catalog: &Catalog) -> Result<Warmup, WarmupError> {
    let defaults = &config.scheduler;
    let tz = time_zone(entry.timezone.as_deref().unwrap_or(&defaults.timezone))?;
    let cron = cron(&entry.cron)?;
    let concurrency = entry.concurrency.unwrap_or(defaults.concurrency);
    if concurrency == 0 {
        return Err(WarmupError::Concurrency);
    }
    let mut job_settings = defaults.settings.clone();
    job_settings.extend(entry.settings.clone());
    let settings = settings(&job_settings)?;

    let kind = match (&entry.popular, &entry.query) {
        (Some(_), Some(_)) => return Err(WarmupError::QueryAndPopular),
        (None, None) => return Err(WarmupError::NothingToWarm),
        (Some(popular), None) => {
            if popular.top == 0 || popular.top > MAX_KEYS_PER_JOB {
                return Err(WarmupError::PopularTop);
            }
            if !(1..=24 * 31).contains(&popular.hours) {
                return Err(WarmupError::PopularHours);
            }
            if !entry.params.is_empty() || !entry.matrix.is_empty() || !entry.tenants.is_empty() {
                return Err(WarmupError::PopularWithSets);
            }
            WarmupKind::Popular {
                top: popular.top,
                hours: popular.hours,
            }
        }
        (None, Some(name)) => query_kind(entry, name, config, catalog)?,
    };
    if let WarmupKind::Query {
        query,
        tenants,
        formats,
        sets,
    } = &kind
    {
        check_sets(query, tenants, formats, sets, config)?;
    }
    Ok(Warmup {
        name: entry.name.clone(),
        expr: entry.cron.clone(),
        cron,
        tz,
        kind,
        concurrency,
        jitter: entry.jitter.unwrap_or(defaults.jitter),
        refresh_ahead: entry.refresh_ahead.unwrap_or(defaults.refresh_ahead),
        settings,
    })
}

fn query_kind(
    entry: &WarmupConfig,
    name: &str,
    config: &Config,
    catalog: &Catalog,
) -> Result<WarmupKind, WarmupError> {
    let Some(query) = catalog.get(name) else {
        if config.queries.contains_key(name) {
            return Err(WarmupError::BrokenQuery(name.to_owned()));
        }
        return Err(WarmupError::UnknownQuery {
            name: name.to_owned(),
            known: config.queries.keys().cloned().collect(),
        });
    };
    if query.tenant_scoped && entry.tenants.is_empty() {
        return Err(WarmupError::TenantsMissing(name.to_owned()));
    }
    let tenants = if entry.tenants.is_empty() {
        vec![None]
    } else {
        entry.tenants.iter().cloned().map(Some).collect()
    };
    let mut formats = Vec::new();
    for f in &entry.formats {
        formats.push(Format::from_param(f).ok_or_else(|| WarmupError::UnknownFormat(f.clone()))?);
    }
    if formats.is_empty() {
        formats.push(Format::Json);
    }
    Ok(WarmupKind::Query {
        query: query.clone(),
        tenants,
        formats,
        sets: expand(&entry.params, &entry.matrix)?,
    })
}

/// Every set must bind now, as a request would, for every tenant; and the
/// distinct answers of a run must stay within [`MAX_KEYS_PER_JOB`].
fn check_sets(
    query: &Arc<QueryDef>,
    tenants: &[Option<String>],
    formats: &[Format],
    sets: &[ParamSet],
    config: &Config,
) -> Result<(), WarmupError> {
    let clock = Clock {
        now: Utc::now(),
        now_step: config.cache.now_step,
    };
    let mut problems = Vec::new();
    let mut keys = HashSet::new();
    for tenant in tenants {
        for format in formats {
            for set in sets {
                let bound = query
                    .bind_pairs(set, &clock, tenant.as_deref())
                    .map_err(ResolveError::from)
                    .and_then(|bound| Ok(query.render(&bound).map(|_| bound)?));
                match bound {
                    Ok(bound) => {
                        keys.insert(query.cache_key(
                            &config.cache.key_prefix,
                            tenant.as_deref(),
                            *format,
                            &bound,
                        ));
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
    let more = problems.len().saturating_sub(1);
    if let Some(first) = problems.into_iter().next() {
        return Err(WarmupError::Params { first, more });
    }
    if keys.len() > MAX_KEYS_PER_JOB {
        return Err(WarmupError::TooManyKeys(keys.len()));
    }
    Ok(())
}

/// Every explicit set (one empty set if there are none) combined with every
/// combination of the matrix's value lists.
pub fn expand(
    params: &[BTreeMap<String, DefaultValue>],
    matrix: &BTreeMap<String, Vec<DefaultValue>>,
) -> Result<Vec<ParamSet>, WarmupError> {
    let mut sets: Vec<ParamSet> = if params.is_empty() {
        vec![Vec::new()]
    } else {
        params
            .iter()
            .map(|set| set.iter().map(|(n, v)| (n.clone(), v.as_text())).collect())
            .collect()
    };
    for (name, values) in matrix {
        if values.is_empty() {
            return Err(WarmupError::EmptyMatrix(name.clone()));
        }
        if sets.iter().any(|set| set.iter().any(|(n, _)| n == name)) {
            return Err(WarmupError::MatrixAndSet(name.clone()));
        }
        if sets.len().saturating_mul(values.len()) > MAX_KEYS_PER_JOB {
            return Err(WarmupError::TooManySets);
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
pub fn settings(
    map: &BTreeMap<String, DefaultValue>,
) -> Result<Vec<(String, String)>, SettingError> {
    let mut out = Vec::new();
    for (name, value) in map {
        let valid = name.starts_with(|c: char| c.is_ascii_lowercase())
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !valid {
            return Err(SettingError::BadName(name.clone()));
        }
        if name == "readonly" {
            return Err(SettingError::Readonly);
        }
        out.push((name.clone(), value.as_text()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn cron_takes_five_or_six_fields_and_zones_are_iana_names() {
        assert!(cron("30 6 * * Mon-Fri").is_ok());
        assert!(cron("*/5 * * * * *").is_ok());
        assert!(matches!(
            cron("30 6 * *"),
            Err(WarmupError::CronFields { fields: 4, .. })
        ));
        let err = cron("61 6 * * *").unwrap_err();
        assert_eq!(err.key(), "cron");
        assert!(err.to_string().starts_with("cron `61 6 * * *`: "), "{err}");
        assert!(time_zone("Europe/Berlin").is_ok());
        let err = time_zone("Mars/Olympus").unwrap_err();
        assert_eq!(err.to_string(), "unknown time zone `Mars/Olympus`");
        assert_eq!(err.key(), "timezone");
    }

    #[test]
    fn settings_names_are_checked() {
        let map: BTreeMap<String, DefaultValue> =
            toml::from_str("max_threads = 2\npriority = 'low'").unwrap();
        assert_eq!(
            settings(&map).unwrap(),
            vec![
                ("max_threads".into(), "2".into()),
                ("priority".into(), "low".into())
            ]
        );
        let map: BTreeMap<String, DefaultValue> = toml::from_str("readonly = 0").unwrap();
        assert!(matches!(settings(&map), Err(SettingError::Readonly)));
        let map: BTreeMap<String, DefaultValue> = toml::from_str("'Max-Threads' = 1").unwrap();
        assert!(matches!(settings(&map), Err(SettingError::BadName(_))));
    }
}
