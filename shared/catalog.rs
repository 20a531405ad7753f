//! The query catalog: the named queries dashboards may ask for.
//!
//! Owns compiling `[query.*]` config tables into [`QueryDef`]s (templates loaded
//! and checked against the declared parameters, range rules checked against
//! parameter types) and binding a request's raw parameters to a [`Bound`] set,
//! with every problem reported at once. Single-parameter parsing lives in
//! [`crate::params`]; SQL rendering in [`crate::sql`].

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cache::CacheKey;
use crate::config::{Config, ConfigError, MaxSpan, ParamType, QueryConfig};
use crate::format::Format;
use crate::params::{Bound, Clock, ParamDef, Problem, RawParam, Value};
use crate::sql::Template;
pub use crate::timeexpr::TimeRange;

/// How far `now` is rounded down by default (`cache.now_step`).
pub const NOW_STEP: Duration = Duration::from_secs(60);

/// Parameter names the proxy itself reads; queries cannot declare them.
pub const RESERVED_PARAMS: [&str; 2] = ["format", TENANT];

pub use crate::params::TENANT;

/// All queries of a config, by name.
#[derive(Debug, Default)]
pub struct Catalog {
    queries: BTreeMap<String, Arc<QueryDef>>,
    exports: BTreeMap<String, Arc<QueryDef>>,
}

/// One named query, ready to bind requests.
#[derive(Debug)]
pub struct QueryDef {
    pub name: String,
    pub description: Option<String>,
    pub ttl: Duration,
    /// How long past `ttl` a stale answer may be served.
    pub grace: Duration,
    /// Declared parameters, sorted by name.
    pub params: Vec<ParamDef>,
    pub range: Option<RangeRule>,
    /// Whether the SQL uses `{tenant}`: answers then differ per tenant, and
    /// the tenant is part of the cache key.
    pub tenant_scoped: bool,
    templates: Templates,
    /// The rounding of `now` (`cache.now_step`).
    pub now_step: Duration,
    /// Hash of every template's text: part of each cache key, so an
    /// operator's SQL edit starts new keys instead of serving the old SQL's answers.
    fingerprint: String,
}

/// A validated request as it was asked: relative times kept relative, so it
/// can be resolved again whenever its answer is (re)computed.
#[derive(Debug, Clone)]
pub struct Asked {
    pub query: Arc<QueryDef>,
    /// The canonical asked parameters (see [`Bound::asked_query`]).
    pub params: Vec<(String, String)>,
    pub tenant: Option<String>,
}

/// A request resolved at one instant: the SQL to run and the range it reads.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub sql: String,
    pub range: Option<TimeRange>,
}

impl Asked {
    pub fn new(query: &Arc<QueryDef>, bound: &Bound, tenant: Option<&str>) -> Asked {
        let asked = bound.asked_query();
        Asked {
            query: query.clone(),
            params: form_urlencoded::parse(asked.as_bytes())
                .map(|(n, v)| (n.into_owned(), v.into_owned()))
                .collect(),
            tenant: tenant.map(str::to_owned),
        }
    }

    /// Binds and renders the request at `now`, exactly as a request arriving
    /// then would be. A range that has grown too wide since (`from=2026-01-01&to=now`)
    /// fails here like it would for that request.
    pub fn resolve(&self, now: chrono::DateTime<chrono::Utc>) -> Result<Resolved, String> {
        let raw: Vec<RawParam> = self
            .params
            .iter()
            .map(|(n, v)| (n.as_str().into(), v.as_str().into()))
            .collect();
        let clock = self.query.clock(now);
        let bound = self
            .query
            .bind(&raw, &clock, self.tenant.as_deref())
            .map_err(|problems| {
                problems
                    .iter()
                    .map(|p| format!("{}: {}", p.loc[1], p.msg))
                    .collect::<Vec<_>>()
                    .join("; ")
            })?;
        Ok(Resolved {
            sql: self.query.render(&bound)?,
            range: self.query.range_of(&bound),
        })
    }
}

#[derive(Debug)]
enum Templates {
    One(Template),
    /// One template per value of an enum parameter.
    ByParam {
        param: String,
        by_value: BTreeMap<String, Template>,
    },
}

/// The time range a query reads, and how wide it may be.
#[derive(Debug)]
pub struct RangeRule {
    pub from: String,
    pub to: String,
    pub granularity: Option<String>,
    max_span: BTreeMap<String, Duration>,
    default_span: Option<Duration>,
}

impl RangeRule {
    /// The widest range allowed for a granularity value (or the one limit).
    pub fn max_span(&self, granularity: Option<&str>) -> Option<Duration> {
        granularity
            .and_then(|g| self.max_span.get(g).copied())
            .or(self.default_span)
    }
}

impl Catalog {
    /// Compiles every `[query.*]` table of `config`, reading SQL files relative to it.
    pub fn load(config: &Config) -> Result<Catalog, ConfigError> {
        if !(1..=2).contains(&config.clickhouse.readonly) {
            return Err(config.invalid("clickhouse.readonly must be 1 or 2"));
        }
        let mut queries = BTreeMap::new();
        for (name, query) in &config.queries {
            let def = QueryDef::compile(name, query, config)
                .map_err(|msg| config.invalid(format!("query `{name}`: {msg}")))?;
            queries.insert(name.clone(), Arc::new(def));
        }
        let mut exports = BTreeMap::new();
        for (name, export) in &config.exports {
            let def = QueryDef::compile(name, export, config)
                .map_err(|msg| config.invalid(format!("export `{name}`: {msg}")))?;
            exports.insert(name.clone(), Arc::new(def));
        }
        Ok(Catalog { queries, exports })
    }

    /// A streamed export by name (`[export.<name>]`).
    pub fn export(&self, name: &str) -> Option<&Arc<QueryDef>> {
        self.exports.get(name)
    }

    pub fn exports(&self) -> impl Iterator<Item = &Arc<QueryDef>> {
        self.exports.values()
    }

    pub fn get(&self, name: &str) -> Option<&Arc<QueryDef>> {
        self.queries.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<QueryDef>> {
        self.queries.values()
    }
}

impl QueryDef {
    fn compile(name: &str, config: &QueryConfig, file: &Config) -> Result<QueryDef, String> {
        let base_dir = file.base_dir();
        let mut params = Vec::new();
        for (param_name, param) in &config.params {
            if RESERVED_PARAMS.contains(&param_name.as_str()) {
                return Err(format!("parameter `{param_name}` is reserved"));
            }
            params.push(
                ParamDef::compile(param_name, param)
                    .map_err(|msg| format!("parameter `{param_name}`: {msg}"))?,
            );
        }
        let find = |name: &str| params.iter().find(|p| p.name == name);

        let templates = load_templates(&config.sql, base_dir, &find)?;
        let mut declared: HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
        declared.insert(TENANT);
        let tenant_scoped = templates
            .all()
            .iter()
            .any(|t| t.placeholders().any(|p| p == TENANT));
        for template in templates.all() {
            if let Some(unknown) = template.placeholders().find(|p| !declared.contains(p)) {
                return Err(format!(
                    "SQL `{}` uses {{{unknown}}}, which is not a declared parameter",
                    config.sql
                ));
            }
        }

        let range = match &config.range {
            None => None,
            Some(range) => {
                for bound in [&range.from, &range.to] {
                    match find(bound) {
                        Some(p) if p.kind == ParamType::Time && !p.list => {
                            if !p.required && p.default.is_none() {
                                return Err(format!(
                                    "range bound `{bound}` must be required or have a default"
                                ));
                            }
                        }
                        _ => return Err(format!("range bound `{bound}` must be a time parameter")),
                    }
                }
                if let Some(g) = &range.granularity
                    && !find(g).is_some_and(|p| p.kind == ParamType::Enum && !p.list)
                {
                    return Err(format!("range granularity `{g}` must be an enum parameter"));
                }
                let (max_span, default_span) = match &range.max_span {
                    MaxSpan::One(span) => (BTreeMap::new(), Some(*span)),
                    MaxSpan::ByGranularity(spans) => {
                        let Some(g) = range.granularity.as_deref().and_then(find) else {
                            return Err("a max_span per granularity needs `granularity`".into());
                        };
                        if let Some(missing) = g.values.iter().find(|v| !spans.contains_key(*v)) {
                            return Err(format!(
                                "max_span has no limit for granularity `{missing}`"
                            ));
                        }
                        let spans = spans.iter().map(|(k, v)| (k.clone(), **v)).collect();
                        (spans, None)
                    }
                };
                Some(RangeRule {
                    from: range.from.clone(),
                    to: range.to.clone(),
                    granularity: range.granularity.clone(),
                    max_span,
                    default_span,
                })
            }
        };

        let mut hash = Sha256::new();
        for template in templates.all() {
            template.hash_into(&mut hash);
        }
        let fingerprint = hex::encode(&hash.finalize()[..16]);
        Ok(QueryDef {
            fingerprint,
            now_step: file.cache.now_step,
            name: name.to_owned(),
            description: config.description.clone(),
            ttl: config.ttl.unwrap_or(file.cache.default_ttl),
            grace: config.grace.unwrap_or(file.cache.default_grace),
            params,
            range,
            tenant_scoped,
            templates,
        })
    }

    /// Validates raw URL parameters (without `format`) and binds them:
    /// defaults applied, relative times resolved, the caller's tenant bound
    /// for tenant-scoped queries. Reports every problem.
    pub fn bind(
        &self,
        raw: &[RawParam<'_>],
        clock: &Clock,
        tenant: Option<&str>,
    ) -> Result<Bound, Vec<Problem>> {
        let mut problems = Vec::new();
        let mut given: Vec<Option<&str>> = vec![None; self.params.len()];
        for (name, value) in raw {
            match self.params.iter().position(|p| p.name == *name) {
                None => problems.push(Problem::query(
                    name,
                    "extra_forbidden",
                    format!(
                        "unknown parameter; `{}` takes: {}",
                        self.name,
                        self.param_names()
                    ),
                )),
                Some(i) if given[i].is_some() => problems.push(Problem::query(
                    name,
                    "duplicate_parameter",
                    "given more than once; send a list as one comma-separated value",
                )),
                Some(i) => given[i] = Some(value),
            }
        }

        let mut bound = Bound::default();
        for (param, raw) in self.params.iter().zip(given) {
            // An empty value (`country=`) is what dashboards send for "no selection".
            let raw = raw.filter(|v| !v.is_empty()).or(param.default.as_deref());
            let value = match raw {
                Some(raw) => match param.parse(raw, clock) {
                    Ok(value) => {
                        bound.push_relative(&param.name, value, param.relative_form(raw));
                        continue;
                    }
                    Err(problem) => {
                        problems.push(problem);
                        continue;
                    }
                },
                None if param.required => {
                    problems.push(Problem::query(&param.name, "missing", "field required"));
                    continue;
                }
                None => param.absent(),
            };
            bound.push(&param.name, value);
        }

        if let Some(range) = &self.range
            && let Some(problem) = check_range(range, &bound)
        {
            problems.push(problem);
        }
        if self.tenant_scoped {
            match tenant {
                Some(tenant) => bound.push(TENANT, Value::Str(tenant.to_owned())),
                None => problems.push(Problem::query(
                    TENANT,
                    "missing",
                    "this query is per tenant: call it with an API key bound to a tenant",
                )),
            }
        }
        if problems.is_empty() {
            Ok(bound)
        } else {
            Err(problems)
        }
    }

    /// The clock a request arriving at `now` is bound against.
    pub fn clock(&self, now: chrono::DateTime<chrono::Utc>) -> Clock {
        Clock {
            now,
            now_step: self.now_step,
        }
    }

    /// The cache key of a bound request's answer: the query, its templates,
    /// the tenant (for per-tenant queries), the format and the request as
    /// asked — so a relative range (`from=now-7d`) keeps one key, whose
    /// answer is refreshed, instead of a new key every minute.
    pub fn cache_key(
        &self,
        prefix: &str,
        tenant: Option<&str>,
        format: Format,
        bound: &Bound,
    ) -> CacheKey {
        let identity = format!("{}\n{}", self.fingerprint, bound.asked_query());
        CacheKey::new(
            prefix,
            &self.name,
            self.key_tenant(tenant),
            format,
            &identity,
        )
    }

    /// The absolute range a bound request reads, if the query has a range rule.
    pub fn range_of(&self, bound: &Bound) -> Option<TimeRange> {
        let range = self.range.as_ref()?;
        match (bound.get(&range.from), bound.get(&range.to)) {
            (Some(Value::Time(from)), Some(Value::Time(to))) => Some(TimeRange {
                from: *from,
                to: *to,
            }),
            _ => None,
        }
    }

    /// The tenant part of this query's cache keys.
    pub fn key_tenant<'a>(&self, tenant: Option<&'a str>) -> Option<&'a str> {
        if self.tenant_scoped { tenant } else { None }
    }

    /// Renders the SQL for a bound parameter set.
    pub fn render(&self, bound: &Bound) -> Result<String, String> {
        match &self.templates {
            Templates::One(template) => template.render(bound).map_err(|e| e.to_string()),
            Templates::ByParam { param, by_value } => {
                let Some(Value::Str(value)) = bound.get(param) else {
                    return Err(format!("template selector `{param}` is not bound"));
                };
                by_value
                    .get(value)
                    .ok_or_else(|| format!("no template for {param}={value}"))?
                    .render(bound)
                    .map_err(|e| e.to_string())
            }
        }
    }

    fn param_names(&self) -> String {
        let names: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        if names.is_empty() {
            "no parameters".into()
        } else {
            names.join(", ")
        }
    }
}

impl Templates {
    fn all(&self) -> Vec<&Template> {
        match self {
            Templates::One(t) => vec![t],
            Templates::ByParam { by_value, .. } => by_value.values().collect(),
        }
    }
}

/// Loads `sql` (a path that may name one enum parameter, `{granularity}`).
fn load_templates<'a>(
    sql: &str,
    base_dir: &Path,
    find: &dyn Fn(&str) -> Option<&'a ParamDef>,
) -> Result<Templates, String> {
    let read = |path: &str| -> Result<Template, String> {
        let full = base_dir.join(path);
        let text = std::fs::read_to_string(&full)
            .map_err(|e| format!("cannot read SQL `{}`: {e}", full.display()))?;
        Template::parse(&text).map_err(|e| format!("SQL `{}`: {e}", full.display()))
    };
    let path = Template::parse(sql).map_err(|e| format!("sql path `{sql}`: {e}"))?;
    let selectors: Vec<&str> = path.placeholders().collect();
    match selectors.as_slice() {
        [] => Ok(Templates::One(read(sql)?)),
        [param] => {
            let def = find(param)
                .filter(|p| p.kind == ParamType::Enum && !p.list)
                .ok_or_else(|| {
                    format!("sql path names `{param}`, which is not an enum parameter")
                })?;
            let mut by_value = BTreeMap::new();
            for value in &def.values {
                // Render the path without quotes: values of an enum are operator-written.
                let file = sql.replace(&format!("{{{param}}}"), value);
                by_value.insert(value.clone(), read(&file)?);
            }
            Ok(Templates::ByParam {
                param: (*param).to_owned(),
                by_value,
            })
        }
        _ => Err(format!("sql path `{sql}` may name one parameter at most")),
    }
}

fn check_range(range: &RangeRule, bound: &Bound) -> Option<Problem> {
    let (Some(Value::Time(from)), Some(Value::Time(to))) =
        (bound.get(&range.from), bound.get(&range.to))
    else {
        return None; // a bound is missing or malformed: already reported
    };
    if to <= from {
        return Some(Problem::query(
            &range.to,
            "range_empty",
            format!(
                "must be after `{}` (the range is [{}, {}))",
                range.from, range.from, range.to
            ),
        ));
    }
    let granularity = match range.granularity.as_deref().map(|g| bound.get(g)) {
        Some(Some(Value::Str(g))) => Some(g.as_str()),
        Some(_) => return None, // granularity malformed: already reported
        None => None,
    };
    let max = range.max_span(granularity)?;
    let span = Duration::from_secs((to - from) as u64);
    if span <= max {
        return None;
    }
    let limit = days(max);
    let asked = days(span);
    let msg = match granularity {
        Some(g) => format!(
            "range of {asked} is too wide for {}={g}: at most {limit}",
            range.granularity.as_deref().unwrap_or("granularity")
        ),
        None => format!("range of {asked} is too wide: at most {limit}"),
    };
    Some(Problem::query(&range.to, "range_too_wide", msg))
}

/// A span as operators think of ranges: in days.
fn days(span: Duration) -> String {
    let secs = span.as_secs();
    match secs % 86_400 {
        0 if secs == 86_400 => "1 day".into(),
        0 => format!("{} days", secs / 86_400),
        _ => format!("{:.2} days", secs as f64 / 86_400.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn catalog() -> (Catalog, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        for g in ["hour", "day"] {
            std::fs::write(
                dir.0.join(format!("q_{g}.sql")),
                format!("SELECT '{g}', {{from}}, {{to}}, {{country}}"),
            )
            .unwrap();
        }
        let text = r#"
            [query.q]
            sql = "q_{granularity}.sql"
            ttl = "1m"
            [query.q.params.from]
            type = "time"
            required = true
            [query.q.params.to]
            type = "time"
            required = true
            [query.q.params.granularity]
            type = "enum"
            values = ["hour", "day"]
            default = "day"
            [query.q.params.country]
            type = "string"
            pattern = "[A-Z]{2}"
            list = true
            [query.q.range]
            from = "from"
            to = "to"
            granularity = "granularity"
            max_span = { hour = "31d", day = "400d" }
        "#;
        let config = Config::parse(text, &dir.0.join("config.toml")).unwrap();
        (Catalog::load(&config).unwrap(), dir)
    }

    fn bind(query: &str) -> Result<Bound, Vec<Problem>> {
        let (catalog, _dir) = catalog();
        let raw: Vec<_> = form_urlencoded::parse(query.as_bytes()).collect();
        let clock = Clock {
            now: Utc.with_ymd_and_hms(2024, 3, 15, 10, 17, 42).unwrap(),
            now_step: NOW_STEP,
        };
        catalog.get("q").unwrap().bind(&raw, &clock, None)
    }

    fn kinds(problems: Vec<Problem>) -> Vec<(String, &'static str)> {
        problems
            .into_iter()
            .map(|p| (p.loc[1].clone(), p.kind))
            .collect()
    }

    #[test]
    fn binds_defaults_and_renders_the_granularity_template() {
        let (catalog, _dir) = catalog();
        let bound = bind("from=2024-01-01&to=2024-02-01&country=FR,DE").unwrap();
        assert_eq!(bound.get("granularity"), Some(&Value::Str("day".into())));
        let sql = catalog.get("q").unwrap().render(&bound).unwrap();
        assert_eq!(
            sql,
            "SELECT 'day', toDateTime(1704067200), toDateTime(1706745600), ['DE','FR']"
        );
    }

    #[test]
    fn reports_every_problem_at_once() {
        let problems = bind("to=not-a-date&granularity=week&extra=1&country=us").unwrap_err();
        let mut got = kinds(problems);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("country".into(), "string_pattern_mismatch"),
                ("extra".into(), "extra_forbidden"),
                ("from".into(), "missing"),
                ("granularity".into(), "enum"),
                ("to".into(), "datetime_parsing"),
            ]
        );
    }

    #[test]
    fn ranges_are_limited_per_granularity() {
        let problems = bind("from=2022-01-01&to=2024-01-01&granularity=hour").unwrap_err();
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].kind, "range_too_wide");
        assert!(
            problems[0].msg.contains("at most 31 days"),
            "{}",
            problems[0].msg
        );
        assert!(problems[0].msg.contains("730 days"), "{}", problems[0].msg);
        assert!(bind("from=2024-01-01&to=2024-01-31&granularity=hour").is_ok());
        assert_eq!(
            kinds(bind("from=now&to=now-1d").unwrap_err()),
            vec![("to".into(), "range_empty")]
        );
    }

    #[test]
    fn repeated_parameters_are_refused() {
        let problems = bind("from=2024-01-01&to=2024-01-02&country=DE&country=FR").unwrap_err();
        assert_eq!(
            kinds(problems),
            vec![("country".into(), "duplicate_parameter")]
        );
    }

    #[test]
    fn templates_may_only_use_declared_parameters() {
        let dir = tempdir::Dir::new();
        std::fs::write(dir.0.join("q.sql"), "SELECT {nope}").unwrap();
        let config = Config::parse("[query.q]\nsql = \"q.sql\"\n", &dir.0.join("c.toml")).unwrap();
        let err = Catalog::load(&config).unwrap_err().to_string();
        assert!(err.contains("{nope}"), "{err}");
    }

    /// A throwaway directory for template files, removed on drop.
    mod tempdir {
        pub struct Dir(pub std::path::PathBuf);
        impl Dir {
            pub fn new() -> Dir {
                use std::sync::atomic::{AtomicU32, Ordering};
                static N: AtomicU32 = AtomicU32::new(0);
                let path = std::env::temp_dir().join(format!(
                    "dashcache-catalog-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir_all(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }
}
