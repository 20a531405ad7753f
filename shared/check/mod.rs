//! Checking a config file: every rule, once, for both binaries.
//!
//! Owns deciding whether a config can be used and saying why not: the file's
//! shape (read by [`crate::config`]), value ranges of `[proxy]` and
//! `[clickhouse]`, the listener's TLS files (`[proxy.tls]`, read and built
//! by [`crate::tls`]) and ClickHouse's `ca`, the `[redis]` topology, the catalog (compiled by
//! [`crate::catalog`]), the tier rules that need only config data (rates of
//! at least 1, allowed queries and exports that exist) and the rules of
//! `[scheduler]` and `[[warmup]]` ([`warmup`]), and `[clickhouse_http]`
//! (`chhttp.rs`). Every problem is a
//! [`Diagnostic`] — file, line of the offending key, reason — and all of them
//! are reported at once, sorted by line. `dashcache-proxy check`,
//! `dashcache-scheduler check`, both start-ups and the scheduler's reload go
//! through [`load`], so they say the same about the same file.
//!
//! It builds nothing that runs: the proxy compiles its tiers, the scheduler
//! its jobs, from a [`Checked`] config (which carries the compiled catalog
//! and the parsed warm-up entries, so nothing is parsed twice).

mod chhttp;
pub mod warmup;

use std::fmt;
use std::path::Path;

use crate::catalog::Catalog;
use crate::config::{Config, ConfigError, Diagnostic};
use crate::cors::{OriginPattern, is_header_name};
use crate::redis_conn::Topology;

pub use warmup::Warmup;

/// A config that passed every check, with what the checks compiled.
#[derive(Debug)]
pub struct Checked {
    pub config: Config,
    pub catalog: Catalog,
    /// The `[[warmup]]` entries, parsed, in file order.
    pub warmups: Vec<Warmup>,
}

/// A config that cannot be used: every reason, one diagnostic a line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct Rejected {
    pub diagnostics: Vec<Diagnostic>,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, diagnostic) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

impl From<ConfigError> for Rejected {
    fn from(err: ConfigError) -> Rejected {
        let diagnostic = match err {
            ConfigError::Read { path, source } => Diagnostic {
                file: path,
                line: None,
                reason: format!("cannot read: {source}"),
            },
            ConfigError::Parse(diagnostic) => diagnostic,
        };
        Rejected {
            diagnostics: vec![diagnostic],
        }
    }
}

/// Reads `path` (with the environment's overrides) and checks it.
pub fn load(path: &Path) -> Result<Checked, Rejected> {
    compile(Config::load(path)?)
}

/// Checks a parsed config; on success it comes back with its catalog and
/// warm-up entries.
pub fn compile(config: Config) -> Result<Checked, Rejected> {
    let (catalog, warmups, diagnostics) = run(&config);
    if diagnostics.is_empty() {
        Ok(Checked {
            config,
            catalog,
            warmups,
        })
    } else {
        Err(Rejected { diagnostics })
    }
}

/// How a checked config runs, in one line for `check`: where answers, locks,
/// rate limits and request counts are shared (Redis, or this process's
/// memory without `[redis]`) and which ClickHouse computes them. No secrets.
pub fn mode(config: &Config) -> String {
    let clickhouse = match config.clickhouse.engine {
        crate::config::Engine::Embedded => format!(
            "ClickHouse's engine in process (data_path {})",
            config
                .clickhouse
                .data_path
                .as_deref()
                .map_or_else(|| "-".to_owned(), |p| p.display().to_string())
        ),
        crate::config::Engine::Server if config.clickhouse.replicas.is_empty() => {
            "a ClickHouse server".to_owned()
        }
        crate::config::Engine::Server => {
            format!("{} ClickHouse replicas", config.clickhouse.replicas.len())
        }
    };
    let warmup = match (
        config.warmup.is_empty(),
        config.scheduler.runs_in_proxy(config.redis.is_some()),
        config.redis.is_some(),
    ) {
        (true, _, _) => "no warm-up jobs",
        (false, true, _) => "warm-up jobs run by dashcache-proxy itself",
        (false, false, true) => "warm-up jobs run by dashcache-scheduler",
        (false, false, false) => {
            "warm-up jobs not run ([scheduler] in_proxy = false, and dashcache-scheduler needs [redis])"
        }
    };
    match &config.redis {
        None => format!(
            "mode: single host (no [redis]): answers (up to {} bytes), computation locks, rate limits and request counts in this process's memory; answers computed by {clickhouse}; {warmup}",
            config.cache.memory_max_bytes
        ),
        Some(redis) => {
            let topology = match Topology::of(redis) {
                Ok(Topology::Cluster) => "a Redis Cluster",
                Ok(Topology::Sentinel) => "Redis found through Sentinel",
                Ok(Topology::Single) | Err(_) => "a Redis server",
            };
            format!(
                "mode: servers: answers, computation locks, rate limits and request counts shared through {topology}; answers computed by {clickhouse}; {warmup}"
            )
        }
    }
}

/// Every problem of a parsed config (empty: it is usable).
pub fn validate(config: &Config) -> Vec<Diagnostic> {
    run(config).2
}

fn run(config: &Config) -> (Catalog, Vec<Warmup>, Vec<Diagnostic>) {
    let mut diagnostics = Vec::new();
    let sample = config.proxy.request_log_sample;
    if !(0.0..=1.0).contains(&sample) {
        diagnostics.push(config.diagnostic(
            &["proxy", "request_log_sample"],
            format!("proxy.request_log_sample = {sample} must be between 0.0 and 1.0"),
        ));
    }
    let workers = config.proxy.worker_threads;
    if workers > 1024 {
        diagnostics.push(config.diagnostic(
            &["proxy", "worker_threads"],
            format!("proxy.worker_threads = {workers} must be at most 1024 (0: one per core)"),
        ));
    }
    let early = config.cache.early_refresh;
    if !(0.0..=1.0).contains(&early) {
        diagnostics.push(config.diagnostic(
            &["cache", "early_refresh"],
            format!("cache.early_refresh = {early} must be between 0.0 and 1.0"),
        ));
    }
    if config.coalesce.backoff_max < config.coalesce.backoff {
        diagnostics.push(config.diagnostic(
            &["coalesce", "backoff_max"],
            format!(
                "coalesce.backoff_max ({:?}) must not be shorter than coalesce.backoff ({:?})",
                config.coalesce.backoff_max, config.coalesce.backoff
            ),
        ));
    }
    if config.clickhouse.max_in_flight == 0 {
        diagnostics.push(config.diagnostic(
            &["clickhouse", "max_in_flight"],
            "clickhouse.max_in_flight must be at least 1",
        ));
    }
    if config.clickhouse.engine == crate::config::Engine::Embedded {
        let ch = &config.clickhouse;
        if ch.data_path.is_none() {
            diagnostics.push(config.diagnostic(
                &["clickhouse", "engine"],
                "clickhouse.engine = \"embedded\" needs clickhouse.data_path (a directory for its data)",
            ));
        }
        if ch.library.is_none() {
            diagnostics.push(config.diagnostic(
                &["clickhouse", "engine"],
                format!(
                    "clickhouse.engine = \"embedded\" needs clickhouse.library (or DASHCACHE_CHDB_LIB): {}",
                    crate::engine::chdb::HOW_TO_GET
                ),
            ));
        }
        if !ch.replicas.is_empty() || !ch.export_replicas.is_empty() {
            diagnostics.push(config.diagnostic(
                &["clickhouse", "replicas"],
                "the embedded engine has no replicas: remove clickhouse.replicas and export_replicas",
            ));
        }
        if !(1..=256).contains(&ch.connections) {
            diagnostics.push(config.diagnostic(
                &["clickhouse", "connections"],
                "clickhouse.connections must be 1 to 256",
            ));
        }
    }
    if !(1..=2).contains(&config.clickhouse.readonly) {
        diagnostics.push(config.diagnostic(
            &["clickhouse", "readonly"],
            "clickhouse.readonly must be 1 or 2",
        ));
    }
    if let Some(tls) = &config.proxy.tls
        && let Err(err) = crate::tls::check(tls)
    {
        let setting = err.file().map_or("tls", |file| file.setting());
        diagnostics.push(config.diagnostic(
            &["proxy", "tls", setting],
            format!("proxy.tls.{setting}: {err}"),
        ));
    }
    if (config.clickhouse.uses_tls() || config.clickhouse.ca.is_some())
        && let Err(err) = crate::tls::client_config(config.clickhouse.ca.as_deref())
    {
        diagnostics.push(config.diagnostic(&["clickhouse", "ca"], format!("clickhouse.ca: {err}")));
    }
    if let Some(redis) = &config.redis {
        if let Some(ca) = &redis.ca {
            let problem = if redis.sentinel_master.is_some() {
                Some("redis.ca is not supported with Sentinel (rediss:// there uses the system's trust store)".to_owned())
            } else {
                crate::tls::read_ca(ca)
                    .err()
                    .map(|err| format!("redis.ca: {err}"))
            };
            if let Some(problem) = problem {
                diagnostics.push(config.diagnostic(&["redis", "ca"], problem));
            }
        }
        if let Err(err) = Topology::of(redis) {
            diagnostics
                .push(config.diagnostic(&["redis", err.key(redis)], format!("[redis]: {err}")));
        }
    } else if config.cache.memory_max_bytes == 0 {
        diagnostics.push(config.diagnostic(
            &["cache", "memory_max_bytes"],
            "cache.memory_max_bytes: without [redis] answers are kept in process memory; it must be above 0".to_owned(),
        ));
    }
    let (catalog, errors) = Catalog::compile_partial(config);
    diagnostics.extend(
        errors
            .iter()
            .map(|err| config.diagnostic(&err.path(), err.to_string())),
    );
    diagnostics.extend(tiers(config));
    diagnostics.extend(cors(config));
    diagnostics.extend(chhttp::check(config));
    let (warmups, problems) = warmup::check(config, &catalog);
    diagnostics.extend(problems);
    // File order; problems of the file as a whole first.
    diagnostics.sort_by_key(|d| d.line.unwrap_or(0));
    (catalog, warmups, diagnostics)
}

/// `[cors]`: origins that are origins (or `https://*.example.com`), header
/// names that are tokens, no `*` with credentials.
fn cors(config: &Config) -> Vec<Diagnostic> {
    let cors = &config.cors;
    let mut diagnostics = Vec::new();
    for (index, origin) in cors.allowed_origins.iter().enumerate() {
        let at = ["cors", "allowed_origins", &index.to_string()];
        match OriginPattern::parse(origin) {
            Err(err) => diagnostics.push(config.diagnostic(&at, format!("cors.allowed_origins: {err}"))),
            Ok(OriginPattern::Any) if cors.allow_credentials => diagnostics.push(config.diagnostic(
                &at,
                "cors.allowed_origins: `*` cannot be combined with allow_credentials = true (any site could act with a visitor's cookies); list the origins",
            )),
            Ok(_) => {}
        }
    }
    for key in ["allowed_headers", "exposed_headers"] {
        let names = if key == "allowed_headers" {
            &cors.allowed_headers
        } else {
            &cors.exposed_headers
        };
        for (index, name) in names.iter().enumerate() {
            if !is_header_name(name) {
                diagnostics.push(config.diagnostic(
                    &["cors", key, &index.to_string()],
                    format!("cors.{key}: `{name}` is not a header name"),
                ));
            }
        }
    }
    if cors.max_age > std::time::Duration::from_secs(86_400) {
        diagnostics.push(config.diagnostic(
            &["cors", "max_age"],
            "cors.max_age must be at most 24h (browsers cap it lower: Chromium at 2h)",
        ));
    }
    diagnostics
}

/// `[tier.*]`: what a tier may do must make sense and name what exists.
fn tiers(config: &Config) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    for (name, tier) in &config.tiers {
        let mut problem = |path: &[&str], reason: String| {
            let mut full = vec!["tier", name.as_str()];
            full.extend_from_slice(path);
            diagnostics.push(config.diagnostic(&full, format!("tier `{name}`: {reason}")));
        };
        if tier.requests_per_minute == 0 || tier.burst == 0 {
            let key = if tier.requests_per_minute == 0 {
                "requests_per_minute"
            } else {
                "burst"
            };
            problem(
                &[key],
                "requests_per_minute and burst must be at least 1".into(),
            );
        }
        for (index, query) in tier.queries.iter().enumerate() {
            if query != "*" && !config.queries.contains_key(query) {
                problem(
                    &["queries", &index.to_string()],
                    format!("allows unknown query `{query}`"),
                );
            }
        }
        for (index, export) in tier.exports.iter().enumerate() {
            if export != "*" && !config.exports.contains_key(export) {
                problem(
                    &["exports", &index.to_string()],
                    format!("allows unknown export `{export}`"),
                );
            }
        }
    }
    diagnostics
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn the_mode_says_where_answers_and_warm_ups_live() {
        let parse = |text: &str| Config::parse(text, Path::new("c.toml")).unwrap();
        let job = "[[warmup]]\nname = \"a\"\ncron = \"* * * * *\"\nquery = \"q\"\n";
        let single = mode(&parse(job));
        assert!(
            single.starts_with("mode: single host (no [redis])"),
            "{single}"
        );
        assert!(
            single.ends_with("warm-up jobs run by dashcache-proxy itself"),
            "{single}"
        );
        let servers = mode(&parse(&format!("[redis]\n{job}")));
        assert!(servers.starts_with("mode: servers: "), "{servers}");
        assert!(servers.ends_with("run by dashcache-scheduler"), "{servers}");
        let off = mode(&parse(&format!("[scheduler]\nin_proxy = false\n{job}")));
        assert!(off.ends_with("needs [redis])"), "{off}");
        let in_proxy = mode(&parse(&format!(
            "[redis]\n[scheduler]\nin_proxy = true\n{job}"
        )));
        assert!(
            in_proxy.ends_with("run by dashcache-proxy itself"),
            "{in_proxy}"
        );
        assert!(mode(&parse("")).ends_with("no warm-up jobs"));
    }

    /// The shipped config with `extra` appended, written beside its SQL.
    struct Shipped {
        dir: PathBuf,
    }

    impl Shipped {
        fn with(extra: &str, replace: &[(&str, &str)]) -> (Shipped, PathBuf) {
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let mut text = std::fs::read_to_string(root.join("config.toml")).unwrap();
            for (from, to) in replace {
                assert!(text.contains(from), "{from} is not in config.toml");
                text = text.replace(from, to);
            }
            text.push('\n');
            text.push_str(extra);
            // SQL paths are relative to the config: point them at the repository's.
            let text = text.replace("sql = \"sql/", &format!("sql = \"{}/sql/", root.display()));
            let dir = std::env::temp_dir().join(format!(
                "dashcache-check-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join("config.toml");
            std::fs::write(&path, text).unwrap();
            (Shipped { dir }, path)
        }
    }

    impl Drop for Shipped {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// The (line, reason) of every diagnostic, and the text checked.
    fn reasons(extra: &str, replace: &[(&str, &str)]) -> (Vec<(Option<usize>, String)>, String) {
        let (_dir, path) = Shipped::with(extra, replace);
        let text = std::fs::read_to_string(&path).unwrap();
        let got = match load(&path) {
            Ok(_) => Vec::new(),
            Err(rejected) => {
                for d in &rejected.diagnostics {
                    assert_eq!(d.file, path, "{d}");
                }
                rejected
                    .diagnostics
                    .into_iter()
                    .map(|d| (d.line, d.reason))
                    .collect()
            }
        };
        (got, text)
    }

    /// The 1-based line of the one line of `text` containing `needle`.
    fn line_of(text: &str, needle: &str) -> usize {
        let found: Vec<usize> = text
            .lines()
            .enumerate()
            .filter(|(_, l)| l.contains(needle))
            .map(|(i, _)| i + 1)
            .collect();
        assert_eq!(found.len(), 1, "`{needle}` is on lines {found:?}");
        found[0]
    }

    #[test]
    fn the_shipped_config_passes() {
        let (_dir, path) = Shipped::with("", &[]);
        let checked = load(&path).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(checked.catalog.iter().count(), checked.config.queries.len());
        assert_eq!(checked.warmups.len(), checked.config.warmup.len());
        assert!(!checked.warmups.is_empty());
    }

    #[test]
    fn the_embedded_engine_needs_a_data_path_and_no_replicas() {
        let (got, text) = reasons(
            "",
            &[(
                "readonly = 1 ",
                "engine = 'embedded'\nconnections = 0\nreadonly = 1 ",
            )],
        );
        let line = line_of(&text, "engine = 'embedded'");
        assert!(
            got.iter()
                .any(|(l, r)| *l == Some(line) && r.contains("needs clickhouse.data_path")),
            "{got:#?}"
        );
        let line = line_of(&text, "connections = 0");
        assert!(
            got.iter()
                .any(|(l, r)| *l == Some(line) && r.contains("1 to 256")),
            "{got:#?}"
        );
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let (got, text) = reasons(
            "[[warmup]]\nname = \"bad-cron\"\ncron = \"61 6 * * *\"\nquery = \"active_users\"\ntenants = [\"acme\"]\n\n\
             [[warmup]]\nname = \"nope\"\ncron = \"0 6 * * *\"\nquery = \"nope\"\n",
            &[
                ("request_log_sample = 0.01", "request_log_sample = 2.0"),
                ("readonly = 1 ", "readonly = 3 "),
                ("burst = 20", "burst = 0"),
                (
                    "queries = [\"revenue\", \"top_countries\"]",
                    "queries = [\"revenue\", \"top_countrys\"]",
                ),
                (
                    "# cluster_nodes = [\"redis://10.0.0.21:6379\", \"redis://10.0.0.22:6379\", \"redis://10.0.0.23:6379\"]",
                    "cluster_nodes = [\"redis://10.0.0.21:6379\"]",
                ),
                (
                    "# sentinel_master = \"dashcache\"",
                    "sentinel_master = \"dashcache\"",
                ),
                ("backoff_max = \"30s\"", "backoff_max = \"500ms\""),
            ],
        );
        let has = |needle: &str, reason: &str| {
            let line = line_of(&text, needle);
            assert!(
                got.iter()
                    .any(|(l, r)| *l == Some(line) && r.contains(reason)),
                "no `{reason}` at line {line} in {got:#?}"
            );
        };
        has(
            "request_log_sample = 2.0",
            "proxy.request_log_sample = 2 must be between 0.0 and 1.0",
        );
        has("readonly = 3", "clickhouse.readonly must be 1 or 2");
        has(
            "cluster_nodes = [",
            "[redis]: cluster_nodes and sentinel_* are exclusive",
        );
        has(
            "burst = 0",
            "tier `free`: requests_per_minute and burst must be at least 1",
        );
        has(
            "\"top_countrys\"",
            "tier `free`: allows unknown query `top_countrys`",
        );
        has(
            "cron = \"61 6 * * *\"",
            "warmup `bad-cron`: cron `61 6 * * *`: ",
        );
        has(
            "query = \"nope\"",
            "warmup `nope`: unknown query `nope`; known: ",
        );
        has(
            "backoff_max = \"500ms\"",
            "coalesce.backoff_max (500ms) must not be shorter than coalesce.backoff (1s)",
        );
        assert_eq!(got.len(), 8, "{got:#?}");
        let lines: Vec<usize> = got.iter().filter_map(|(l, _)| *l).collect();
        assert!(lines.windows(2).all(|w| w[0] <= w[1]), "{got:#?}");
    }

    #[test]
    fn cors_origins_and_headers_are_checked_with_their_lines() {
        let (got, text) = reasons(
            "",
            &[
                (
                    "allowed_origins = [\"http://127.0.0.1:8081\", \"http://localhost:8081\"]",
                    "allowed_origins = [\n  \"https://ok.example.com\",\n  \"dash.example.com\",\n  \"https://a.*.example.com\",\n  \"https://x.example.com/app\",\n  \"*\",\n]",
                ),
                (
                    "allowed_headers = []",
                    "allowed_headers = [\"X-Dashboard\", \"Bad Header\"]",
                ),
                ("allow_credentials = false", "allow_credentials = true"),
                ("max_age = \"2h\"", "max_age = \"2d\""),
            ],
        );
        let has = |needle: &str, reason: &str| {
            let line = line_of(&text, needle);
            assert!(
                got.iter()
                    .any(|(l, r)| *l == Some(line) && r.contains(reason)),
                "no `{reason}` at line {line} in {got:#?}"
            );
        };
        has("\"dash.example.com\"", "`dash.example.com` has no scheme");
        has(
            "\"https://a.*.example.com\"",
            "a wildcard may only stand for subdomains",
        );
        has("\"https://x.example.com/app\"", "without a path");
        has("  \"*\",", "`*` cannot be combined with allow_credentials");
        has(
            "Bad Header",
            "cors.allowed_headers: `Bad Header` is not a header name",
        );
        has("max_age = \"2d\"", "cors.max_age must be at most 24h");
        assert_eq!(got.len(), 6, "{got:#?}");
    }

    #[test]
    fn unusable_tls_files_and_credential_parameters_are_reported_at_their_lines() {
        let (got, text) = reasons(
            "[query.leaky]\nsql = \"sql/queries/revenue_day.sql\"\n[query.leaky.params.api_key]\ntype = \"string\"\n",
            &[
                (
                    "request_log_sample = 0.01",
                    "request_log_sample = 0.01\ntls = { cert = \"missing/cert.pem\", key = \"missing/key.pem\" }",
                ),
                (
                    "user = \"default\"",
                    "user = \"default\"\nca = \"missing/clickhouse-ca.pem\"",
                ),
            ],
        );
        let ca = line_of(&text, "ca = \"missing/clickhouse-ca.pem\"");
        assert!(
            got.iter().any(|(line, reason)| *line == Some(ca)
                && reason.starts_with("clickhouse.ca: CA bundle ")
                && reason.contains("cannot read")),
            "{got:#?}"
        );
        let tls = line_of(&text, "tls = { cert");
        assert!(
            got.iter().any(|(line, reason)| *line == Some(tls)
                && reason.starts_with("proxy.tls.cert: certificate chain ")
                && reason.contains("missing/cert.pem: cannot read")),
            "{got:#?}"
        );
        let param = line_of(&text, "[query.leaky.params.api_key]");
        assert!(
            got.iter().any(|(line, reason)| *line == Some(param)
                && reason.contains("parameter `api_key` is reserved")),
            "{got:#?}"
        );
    }

    #[test]
    fn a_broken_query_is_reported_once_not_again_by_the_jobs_warming_it() {
        let (got, _) = reasons(
            "",
            &[(
                "[query.active_users.params.window]\ntype = \"enum\"\nvalues = [\"hour\", \"day\"]\ndefault = \"hour\"",
                "[query.active_users.params.window]\ntype = \"enum\"\nvalues = [\"hour\", \"day\"]\ndefault = \"week\"",
            )],
        );
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].1.starts_with(
                "query `active_users`: parameter `window`: default `week` must be one of"
            ),
            "{got:#?}"
        );
    }

    #[test]
    fn warmup_entries_are_checked_with_file_line_and_reason() {
        let cases = [
            (
                "cron = \"61 6 * * *\"\nquery = \"active_users\"\ntenants = [\"acme\"]",
                2,
                "cron `61 6 * * *`",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"nope\"",
                3,
                "unknown query `nope`",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"revenue\"\ntenants = [\"acme\"]\nparams = [{ from = \"today-7d\", to = \"tomorrow\" }]",
                5,
                "invalid parameter: parameter set {from=today-7d, to=tomorrow} tenant acme: to: is not a date",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"revenue\"",
                0,
                "is per tenant: list the `tenants`",
            ),
            (
                "cron = \"30 6 * * *\"\ntimezone = \"Europe/Nowhere\"\nquery = \"active_users\"",
                3,
                "unknown time zone `Europe/Nowhere`",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"active_users\"\ntenants = [\"acme\"]\npopular = { top = 1, hours = 1 }",
                5,
                "not both",
            ),
            (
                "cron = \"30 6 * * *\"\nquery = \"active_users\"\ntenants = [\"acme\"]\n[warmup.matrix]\nwindow = []",
                5,
                "matrix.window lists no values",
            ),
        ];
        let (_dir, path) = Shipped::with("", &[]);
        let base = std::fs::read_to_string(&path).unwrap();
        // The line of the `[[warmup]]` header appended below.
        let header = base.lines().count() + 2;
        for (body, offset, reason) in cases {
            let text = format!("{base}\n[[warmup]]\nname = \"bad\"\n{body}\n");
            std::fs::write(&path, &text).unwrap();
            let rejected = load(&path).map(|_| ()).unwrap_err();
            assert_eq!(rejected.diagnostics.len(), 1, "{rejected}");
            let d = &rejected.diagnostics[0];
            assert!(d.reason.starts_with("warmup `bad`: "), "{d}");
            assert!(d.reason.contains(reason), "{d}");
            // The line of the offending key (or of the entry when it is not written).
            assert_eq!(d.line, Some(header + offset), "{body}: {d}");
        }
    }

    #[test]
    fn problems_of_the_file_itself_are_diagnostics_too() {
        let missing = Path::new("/nonexistent/dashcache.toml");
        let rejected = load(missing).map(|_| ()).unwrap_err();
        assert_eq!(rejected.diagnostics.len(), 1);
        assert!(
            rejected
                .to_string()
                .starts_with("/nonexistent/dashcache.toml: cannot read: "),
            "{rejected}"
        );
        let (got, text) = reasons(
            "",
            &[("retry_after = \"1s\"", "retry_after = \"1s\"\nttl = 5")],
        );
        assert_eq!(got.len(), 1, "{got:#?}");
        assert_eq!(got[0].0, Some(line_of(&text, "ttl = 5")), "{got:#?}");
        assert!(got[0].1.starts_with("unknown field `ttl`"), "{got:#?}");
    }
}
