//! The query catalog: the named queries dashboards may ask for.
//!
//! Owns compiling `[query.*]` config tables into [`QueryDef`]s (templates loaded
//! and checked against the declared parameters, range rules checked against
//! parameter types) and binding a request's raw parameters to a [`Bound`] set,
//! with every problem reported at once. Single-parameter parsing lives in
//! [`crate::params`]; SQL rendering in [`crate::sql`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::cache::CacheKey;
use crate::config::{Config, MaxSpan, ParamType, QueryConfig, RangeConfig};
use crate::format::Format;
use crate::params::{Bound, Clock, ParamDef, ParamError, Problem, RawParam, Value};
use crate::sql::{Template, TemplateError, UnboundPlaceholder};
pub use crate::timeexpr::TimeRange;

/// How far `now` is rounded down by default (`cache.now_step`).
pub const NOW_STEP: Duration = Duration::from_secs(60);

/// Parameter names the proxy itself reads; queries cannot declare them.
pub const RESERVED_PARAMS: [&str; 2] = ["format", TENANT];

/// Names under which clients put credentials in URLs. API keys go in headers
/// only (URLs end up in logs, browser history and `Referer`): the proxy
/// refuses a request carrying one of these (compared ignoring case), and
/// queries cannot declare them.
pub const CREDENTIAL_PARAMS: [&str; 7] = [
    "api_key",
    "apikey",
    "api-key",
    "key",
    "token",
    "access_token",
    "x-api-key",
];

/// Whether a query-string name is one of [`CREDENTIAL_PARAMS`].
pub fn is_credential_param(name: &str) -> bool {
    CREDENTIAL_PARAMS
        .iter()
        .any(|credential| credential.eq_ignore_ascii_case(name))
}

pub use crate::params::TENANT;

/// What is wrong with one `[query.*]` or `[export.*]` table.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("parameter `{0}` is reserved")]
    Reserved(String),
    #[error("parameter `{name}`: {source}")]
    Param { name: String, source: ParamError },
    #[error("cannot read SQL `{}`: {source}", path.display())]
    ReadSql {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("SQL `{}`: {source}", path.display())]
    Sql {
        path: PathBuf,
        source: TemplateError,
    },
    #[error("sql path `{sql}`: {source}")]
    SqlPath { sql: String, source: TemplateError },
    #[error("sql path names `{param}`, which is not an enum parameter")]
    SelectorNotEnum { param: String },
    #[error("sql path `{sql}` may name one parameter at most")]
    TooManySelectors { sql: String },
    #[error("SQL `{sql}` uses {{{placeholder}}}, which is not a declared parameter")]
    Undeclared { sql: String, placeholder: String },
    /// `range.from` or `range.to` (`key`) names an optional time parameter.
    #[error("range bound `{param}` must be required or have a default")]
    RangeBoundOptional { key: &'static str, param: String },
    #[error("range bound `{param}` must be a time parameter")]
    RangeBoundNotTime { key: &'static str, param: String },
    #[error("range granularity `{0}` must be an enum parameter")]
    GranularityNotEnum(String),
    #[error("a max_span per granularity needs `granularity`")]
    SpansWithoutGranularity,
    #[error("max_span has no limit for granularity `{0}`")]
    MissingSpan(String),
}

impl QueryError {
    /// The keys below the query's table that the problem is about.
    pub fn keys(&self) -> Vec<&str> {
        match self {
            QueryError::Reserved(name) => vec!["params", name],
            QueryError::Param { name, source } => {
                let mut keys = vec!["params", name.as_str()];
                keys.extend(source.key());
                keys
            }
            QueryError::ReadSql { .. }
            | QueryError::Sql { .. }
            | QueryError::SqlPath { .. }
            | QueryError::SelectorNotEnum { .. }
            | QueryError::TooManySelectors { .. }
            | QueryError::Undeclared { .. } => vec!["sql"],
            QueryError::RangeBoundOptional { key, .. }
            | QueryError::RangeBoundNotTime { key, .. } => {
                vec!["range", key]
            }
            QueryError::GranularityNotEnum(_) => vec!["range", "granularity"],
            QueryError::SpansWithoutGranularity | QueryError::MissingSpan(_) => {
                vec!["range", "max_span"]
            }
        }
    }
}

/// Which part of the catalog a table belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `[query.<name>]`
    Query,
    /// `[export.<name>]`
    Export,
}

impl Section {
    /// The table's name in the config file.
    pub fn table(self) -> &'static str {
        match self {
            Section::Query => "query",
            Section::Export => "export",
        }
    }
}

/// One problem of a catalog: which query (or export), and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{} `{name}`: {error}", section.table())]
pub struct CatalogError {
    pub section: Section,
    pub name: String,
    pub error: QueryError,
}

impl CatalogError {
    /// The key path in the config file the problem is about.
    pub fn path(&self) -> Vec<&str> {
        let mut path = vec![self.section.table(), self.name.as_str()];
        path.extend(self.error.keys());
        path
    }
}

/// A bound set that does not bind: every problem, as `param: message; …`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{}", describe(.0))]
pub struct BindError(pub Vec<Problem>);

fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(|p| format!("{}: {}", p.loc[1], p.msg))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a bound set did not render (the catalog checks templates when it
/// compiles, so these mean a bug, not a bad request).
#[derive(Debug, Clone, thiserror::Error)]
pub enum RenderError {
    #[error("template selector `{0}` is not bound")]
    SelectorUnbound(String),
    #[error("no template for {param}={value}")]
    NoTemplate { param: String, value: String },
    #[error(transparent)]
    Unbound(#[from] UnboundPlaceholder),
}

/// Why a request as asked no longer resolves.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    Render(#[from] RenderError),
}

/// All queries of a config, by name (cheap to clone: the queries are shared).
#[derive(Debug, Default, Clone)]
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
    pub fn resolve(&self, now: chrono::DateTime<chrono::Utc>) -> Result<Resolved, ResolveError> {
        let clock = self.query.clock(now);
        let bound = self
            .query
            .bind_pairs(&self.params, &clock, self.tenant.as_deref())?;
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
    /// Compiles every `[query.*]` and `[export.*]` table of `config`, reading
    /// SQL files relative to it; every problem of every table is reported.
    pub fn compile(config: &Config) -> Result<Catalog, Vec<CatalogError>> {
        let (catalog, errors) = Catalog::compile_partial(config);
        if errors.is_empty() {
            Ok(catalog)
        } else {
            Err(errors)
        }
    }

    /// Like [`Catalog::compile`], but also the tables that compile: checks
    /// of what refers to queries can go on past a broken one.
    pub fn compile_partial(config: &Config) -> (Catalog, Vec<CatalogError>) {
        let mut errors = Vec::new();
        let mut compile_all = |section: Section, tables: &BTreeMap<String, QueryConfig>| {
            let mut defs = BTreeMap::new();
            for (name, table) in tables {
                match QueryDef::compile(name, table, config) {
                    Ok(def) => {
                        defs.insert(name.clone(), Arc::new(def));
                    }
                    Err(problems) => {
                        errors.extend(problems.into_iter().map(|error| CatalogError {
                            section,
                            name: name.clone(),
                            error,
                        }));
                    }
                }
            }
            defs
        };
        let queries = compile_all(Section::Query, &config.queries);
        let exports = compile_all(Section::Export, &config.exports);
        (Catalog { queries, exports }, errors)
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
    /// Compiles one table: every problem of its parameters, or else every
    /// problem of its templates and range rule (which refer to the parameters).
    fn compile(
        name: &str,
        config: &QueryConfig,
        file: &Config,
    ) -> Result<QueryDef, Vec<QueryError>> {
        let base_dir = file.base_dir();
        let mut errors = Vec::new();
        let mut params = Vec::new();
        for (param_name, param) in &config.params {
            if RESERVED_PARAMS.contains(&param_name.as_str()) || is_credential_param(param_name) {
                errors.push(QueryError::Reserved(param_name.clone()));
                continue;
            }
            match ParamDef::compile(param_name, param) {
                Ok(def) => params.push(def),
                Err(source) => errors.push(QueryError::Param {
                    name: param_name.clone(),
                    source,
                }),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let find = |name: &str| params.iter().find(|p| p.name == name);

        let templates = load_templates(&config.sql, base_dir, &find);
        let range = config
            .range
            .as_ref()
            .map(|range| range_rule(range, &find))
            .transpose();
        let (templates, range) = match (templates, range) {
            (Ok(templates), Ok(range)) => (templates, range),
            (templates, range) => {
                errors.extend(templates.err());
                errors.extend(range.err());
                return Err(errors);
            }
        };
        let mut declared: HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
        declared.insert(TENANT);
        let tenant_scoped = templates
            .all()
            .iter()
            .any(|t| t.placeholders().any(|p| p == TENANT));
        let undeclared: BTreeSet<&str> = templates
            .all()
            .into_iter()
            .flat_map(|t| t.placeholders())
            .filter(|p| !declared.contains(p))
            .collect();
        if !undeclared.is_empty() {
            return Err(undeclared
                .into_iter()
                .map(|placeholder| QueryError::Undeclared {
                    sql: config.sql.clone(),
                    placeholder: placeholder.to_owned(),
                })
                .collect());
        }

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

    /// [`QueryDef::bind`] for name/value pairs, as warm-up sets and requests
    /// kept as asked hold them.
    pub fn bind_pairs(
        &self,
        pairs: &[(String, String)],
        clock: &Clock,
        tenant: Option<&str>,
    ) -> Result<Bound, BindError> {
        let raw: Vec<RawParam> = pairs
            .iter()
            .map(|(n, v)| (n.as_str().into(), v.as_str().into()))
            .collect();
        self.bind(&raw, clock, tenant).map_err(BindError)
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
    pub fn render(&self, bound: &Bound) -> Result<String, RenderError> {
        let template = match &self.templates {
            Templates::One(template) => template,
            Templates::ByParam { param, by_value } => {
                let Some(Value::Str(value)) = bound.get(param) else {
                    return Err(RenderError::SelectorUnbound(param.clone()));
                };
                by_value.get(value).ok_or_else(|| RenderError::NoTemplate {
                    param: param.clone(),
                    value: value.clone(),
                })?
            }
        };
        Ok(template.render(bound)?)
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
) -> Result<Templates, QueryError> {
    let read = |path: &str| -> Result<Template, QueryError> {
        let full = base_dir.join(path);
        let text = match std::fs::read_to_string(&full) {
            Ok(text) => text,
            Err(source) => return Err(QueryError::ReadSql { path: full, source }),
        };
        Template::parse(&text).map_err(|source| QueryError::Sql { path: full, source })
    };
    let path = Template::parse(sql).map_err(|source| QueryError::SqlPath {
        sql: sql.to_owned(),
        source,
    })?;
    let selectors: Vec<&str> = path.placeholders().collect();
    match selectors.as_slice() {
        [] => Ok(Templates::One(read(sql)?)),
        [param] => {
            let def = find(param)
                .filter(|p| p.kind == ParamType::Enum && !p.list)
                .ok_or_else(|| QueryError::SelectorNotEnum {
                    param: (*param).to_owned(),
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
        _ => Err(QueryError::TooManySelectors {
            sql: sql.to_owned(),
        }),
    }
}

/// Checks `[query.<name>.range]` against the declared parameters.
fn range_rule<'a>(
    range: &RangeConfig,
    find: &dyn Fn(&str) -> Option<&'a ParamDef>,
) -> Result<RangeRule, QueryError> {
    for (key, bound) in [("from", &range.from), ("to", &range.to)] {
        match find(bound) {
            Some(p) if p.kind == ParamType::Time && !p.list => {
                if !p.required && p.default.is_none() {
                    return Err(QueryError::RangeBoundOptional {
                        key,
                        param: bound.clone(),
                    });
                }
            }
            _ => {
                return Err(QueryError::RangeBoundNotTime {
                    key,
                    param: bound.clone(),
                });
            }
        }
    }
    if let Some(g) = &range.granularity
        && !find(g).is_some_and(|p| p.kind == ParamType::Enum && !p.list)
    {
        return Err(QueryError::GranularityNotEnum(g.clone()));
    }
    let (max_span, default_span) = match &range.max_span {
        MaxSpan::One(span) => (BTreeMap::new(), Some(*span)),
        MaxSpan::ByGranularity(spans) => {
            let Some(g) = range.granularity.as_deref().and_then(find) else {
                return Err(QueryError::SpansWithoutGranularity);
            };
            if let Some(missing) = g.values.iter().find(|v| !spans.contains_key(*v)) {
                return Err(QueryError::MissingSpan(missing.clone()));
            }
            let spans = spans.iter().map(|(k, v)| (k.clone(), **v)).collect();
            (spans, None)
        }
    };
    Ok(RangeRule {
        from: range.from.clone(),
        to: range.to.clone(),
        granularity: range.granularity.clone(),
        max_span,
        default_span,
    })
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
        (Catalog::compile(&config).unwrap(), dir)
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
        let errors = Catalog::compile(&config).unwrap_err();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].path(), ["query", "q", "sql"]);
        let err = errors[0].to_string();
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
