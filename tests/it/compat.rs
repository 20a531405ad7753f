//! ClickHouse 26.x compatibility: the shipped catalog on a current engine.
//!
//! The other modules run against Debian's ClickHouse 18.16, the only server
//! that installs here. This one runs the same SQL on ClickHouse 26.7 through
//! chDB (the engine as an in-process library, `dashcache::engine::chdb`, fetched
//! by `scripts/chdb`; `scripts/test` exports its path as `DASHCACHE_CHDB_LIB`):
//! `sql/clickhouse/schema.sql` as shipped, deterministic sample data generated
//! in SQL, then every query and export of the shipped `config.toml`, bound and
//! rendered by dashcache's own catalog, run under the settings the proxy sends
//! (`clickhouse::query_settings`, plus a tier's export limits), in every format
//! the route serves. Each answer is parsed and its numbers compared with an
//! independent aggregate over the raw `demo.events` table (the rollups and
//! materialized views are what is being tested), and checked to pass the
//! proxy's exception detector as a clean body.
//!
//! Without the library (it could not be fetched) the tests say so and skip.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use dashcache::catalog::QueryDef;
use dashcache::check::Checked;
use dashcache::clickhouse::{exception_start, query_settings};
use dashcache::engine::chdb::{Chdb, ChdbError, Connection};
use dashcache::engine::embedded::{Embedded, EmbeddedAnswer};
use dashcache::format::Format;
use dashcache::params::RawParam;

use crate::harness::{TempDir, root};

/// The chDB release `scripts/chdb` pins.
const PINNED: &str = "26.7.3-stable.1";

/// The tenant every request is made for.
const TENANT: &str = "acme";

/// Where the library is: `DASHCACHE_CHDB_LIB`, else `scripts/chdb`'s cache.
pub fn library() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("DASHCACHE_CHDB_LIB").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let cached = root().join(".cache/chdb").join(PINNED).join("libchdb.so");
    cached.is_file().then_some(cached)
}

/// The engine with the demo schema and sample data, shared by this module's
/// tests (chDB serves one data path per process).
struct Engine {
    chdb: Arc<Chdb>,
    /// The library and data path (for the embedded engine's tests).
    library: PathBuf,
    data: PathBuf,
    /// `--path=` of every connection.
    path_arg: String,
    _dir: TempDir,
}

impl Engine {
    /// A connection with `settings` applied in order (as a request's URL
    /// settings are), `readonly` last so that it does not forbid the others.
    fn connect(&self, settings: &[(&str, String)]) -> Connection {
        let mut args = vec![self.path_arg.clone()];
        let (readonly, others): (Vec<_>, Vec<_>) =
            settings.iter().partition(|(name, _)| *name == "readonly");
        for (name, value) in others.iter().chain(&readonly) {
            args.push(format!("--{name}={value}"));
        }
        self.chdb
            .connect(&args)
            .unwrap_or_else(|e| panic!("chDB connect {args:?}: {e}"))
    }
}

/// The shared engine, or `None` (after saying why) without the library.
fn engine() -> Option<MutexGuard<'static, Engine>> {
    static ENGINE: OnceLock<Option<Mutex<Engine>>> = OnceLock::new();
    let engine = ENGINE.get_or_init(|| {
        let Some(path) = library() else {
            eprintln!(
                "SKIPPED compat::: no chDB library (scripts/chdb could not fetch @chdb/lib-linux-x64-gnu@{PINNED}; set DASHCACHE_CHDB_LIB or run scripts/chdb)"
            );
            return None;
        };
        let chdb = Chdb::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let dir = TempDir::new("chdb");
        let engine = Engine {
            chdb,
            library: path.clone(),
            data: dir.0.join("data"),
            path_arg: format!("--path={}", dir.0.join("data").display()),
            _dir: dir,
        };
        let mut writer = engine.connect(&[]);
        for statement in schema_statements() {
            run(&mut writer, &statement, "Null");
        }
        run(&mut writer, SAMPLE_DATA, "Null");
        run(&mut writer, RECENT_DATA, "Null");
        Some(Mutex::new(engine))
    });
    engine
        .as_ref()
        .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
}

fn run(connection: &mut Connection, sql: &str, format: &str) -> Vec<u8> {
    connection
        .query(sql, format)
        .unwrap_or_else(|e| panic!("{e}\nin:\n{sql}"))
}

/// `schema.sql`'s statements (comments dropped, split at `;`).
fn schema_statements() -> Vec<String> {
    let text = std::fs::read_to_string(root().join("sql/clickhouse/schema.sql")).expect("schema");
    let code: String = text
        .lines()
        .map(|line| line.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// 300,000 events over 90 days from 2026-01-01 (UTC), three tenants; the same
/// rows on every run. Purchases carry whole cents.
const SAMPLE_DATA: &str = "INSERT INTO demo.events
SELECT
    toDateTime(1767225600) + (number * 7919) % (90 * 86400) AS ts,
    ['acme', 'globex', 'initech'][number % 3 + 1] AS tenant_id,
    (number * 31) % 4000 AS user_id,
    ['US', 'DE', 'FR', 'GB', 'JP', 'BR'][intDiv(number, 7) % 6 + 1] AS country,
    ['free', 'pro', 'enterprise'][intDiv(number, 5) % 3 + 1] AS plan,
    ['page_view', 'click', 'signup', 'purchase'][number % 4 + 1] AS event,
    if(number % 4 = 3, (number % 10000) / 100 + 0.99, 0) AS revenue
FROM numbers(300000)";

/// 20,000 events of the tenant in the two hours up to now (for `active_users`).
const RECENT_DATA: &str = "INSERT INTO demo.events
SELECT
    now() - (number * 13) % 7200 AS ts,
    'acme' AS tenant_id,
    (number * 17) % 1500 AS user_id,
    ['US', 'DE'][number % 2 + 1] AS country,
    'pro' AS plan,
    ['click', 'purchase'][number % 2 + 1] AS event,
    if(number % 2 = 1, 9.99, 0) AS revenue
FROM numbers(20000)";

/// One request of the catalog and the independent aggregate it must equal.
struct Case {
    name: &'static str,
    export: bool,
    /// The request's parameters, as a dashboard sends them.
    params: &'static str,
    /// The same answer computed from `demo.events` directly (not from the
    /// rollups), columns in the template's order; `{since}` is replaced by
    /// the answer's own `since` (the current hour/day as the query saw it).
    expected: &'static str,
    /// Rows may come in any order (exports have no ORDER BY).
    unordered: bool,
}

/// Every query and export of the shipped catalog, every template of each.
const CASES: &[Case] = &[
    Case {
        name: "revenue",
        export: false,
        params: "granularity=minute&from=2026-01-10T00:00:00Z&to=2026-01-11T00:00:00Z",
        expected: "SELECT toStartOfMinute(ts) AS t, round(sum(revenue), 2), count(), uniqExact(user_id)
            FROM demo.events WHERE tenant_id = 'acme'
              AND ts >= toDateTime(1768003200) AND ts < toDateTime(1768089600)
            GROUP BY t ORDER BY t",
        unordered: false,
    },
    Case {
        name: "revenue",
        export: false,
        params: "granularity=hour&from=2026-01-05&to=2026-01-12&plan=pro",
        expected: "SELECT toStartOfHour(ts) AS t, round(sum(revenue), 2), count(), uniqExact(user_id)
            FROM demo.events WHERE tenant_id = 'acme' AND plan = 'pro'
              AND toStartOfHour(ts) >= toDateTime(1767571200) AND toStartOfHour(ts) < toDateTime(1768176000)
            GROUP BY t ORDER BY t",
        unordered: false,
    },
    Case {
        name: "revenue",
        export: false,
        params: "granularity=day&from=2026-01-01&to=2026-02-15&country=US,DE",
        expected: "SELECT toDateTime(toDate(ts)) AS t, round(sum(revenue), 2), count(), uniqExact(user_id)
            FROM demo.events WHERE tenant_id = 'acme' AND country IN ('US', 'DE')
              AND t >= toDateTime(1767225600) AND t < toDateTime(1771113600)
            GROUP BY t ORDER BY t",
        unordered: false,
    },
    Case {
        name: "revenue",
        export: false,
        params: "granularity=month&from=2026-01-01&to=2026-04-01",
        expected: "SELECT toDateTime(toStartOfMonth(ts)) AS t, round(sum(revenue), 2), count(), uniqExact(user_id)
            FROM demo.events WHERE tenant_id = 'acme'
              AND toDateTime(toDate(ts)) >= toDateTime(1767225600) AND toDateTime(toDate(ts)) < toDateTime(1775001600)
            GROUP BY t ORDER BY t",
        unordered: false,
    },
    Case {
        name: "top_countries",
        export: false,
        params: "from=2026-01-01&to=2026-03-01&limit=3&offset=1",
        expected: "SELECT country, round(sum(revenue), 2) AS r, count(), uniqExact(user_id)
            FROM demo.events WHERE tenant_id = 'acme'
              AND toDateTime(toDate(ts)) >= toDateTime(1767225600) AND toDateTime(toDate(ts)) < toDateTime(1772323200)
            GROUP BY country ORDER BY r DESC, country LIMIT 3 OFFSET 1",
        unordered: false,
    },
    Case {
        name: "active_users",
        export: false,
        params: "window=hour",
        expected: "SELECT uniqExact(user_id), count(), toDateTime('{since}')
            FROM demo.events WHERE tenant_id = 'acme' AND ts >= toDateTime('{since}')",
        unordered: false,
    },
    Case {
        name: "active_users",
        export: false,
        params: "window=day",
        expected: "SELECT uniqExact(user_id), count(), toDateTime('{since}')
            FROM demo.events WHERE tenant_id = 'acme' AND ts >= toDateTime('{since}')",
        unordered: false,
    },
    Case {
        name: "events",
        export: true,
        params: "from=2026-02-01&to=2026-02-04&country=US,FR&event=purchase,click",
        expected: "SELECT ts, user_id, country, plan, event, revenue
            FROM demo.events WHERE tenant_id = 'acme'
              AND ts >= toDateTime(1769904000) AND ts < toDateTime(1770163200)
              AND country IN ('US', 'FR') AND event IN ('purchase', 'click')",
        unordered: true,
    },
];

/// An answer as rows of cells, whatever its format.
#[derive(Debug)]
struct Table {
    names: Vec<String>,
    rows: Vec<Vec<Cell>>,
}

/// One value: JSON keeps whether a number came as a number.
#[derive(Debug, Clone, PartialEq)]
enum Cell {
    Number(f64),
    Text(String),
}

impl Cell {
    fn from_text(text: &str) -> Cell {
        match text.parse::<f64>() {
            Ok(n)
                if text
                    .bytes()
                    .all(|b| b.is_ascii_digit() || b"-.e+".contains(&b)) =>
            {
                Cell::Number(n)
            }
            _ => Cell::Text(text.to_owned()),
        }
    }

    /// Equal as money to the cent and counts exactly (sums of whole cents
    /// may round to neighbouring cents when added in another order).
    fn matches(&self, other: &Cell) -> bool {
        match (self, other) {
            (Cell::Number(a), Cell::Number(b)) => (a - b).abs() <= 0.010_000_1,
            (a, b) => a == b,
        }
    }

    fn sort_key(&self) -> String {
        match self {
            Cell::Number(n) => format!("{n:020.2}"),
            Cell::Text(t) => t.clone(),
        }
    }
}

/// Parses `body` of `format` into a table; `Err` says what is malformed.
fn parse(body: &[u8], format: Format) -> Result<Table, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("not UTF-8: {e}"))?;
    let json_cell = |value: &serde_json::Value| -> Result<Cell, String> {
        match value {
            serde_json::Value::Number(n) => n
                .as_f64()
                .map(Cell::Number)
                .ok_or_else(|| format!("odd number {n}")),
            serde_json::Value::String(s) if s.parse::<u64>().is_ok() => Err(format!(
                "a quoted 64-bit integer {s:?} (output_format_json_quote_64bit_integers=0 not honoured)"
            )),
            serde_json::Value::String(s) => Ok(Cell::Text(s.clone())),
            other => Err(format!("unexpected JSON value {other}")),
        }
    };
    match format {
        Format::Json => {
            let doc: serde_json::Value =
                serde_json::from_str(text).map_err(|e| format!("JSON: {e}"))?;
            let names: Vec<String> = doc["meta"]
                .as_array()
                .ok_or("JSON without meta")?
                .iter()
                .map(|m| m["name"].as_str().unwrap_or_default().to_owned())
                .collect();
            let data = doc["data"].as_array().ok_or("JSON without data")?;
            if doc["rows"].as_u64() != Some(data.len() as u64) {
                return Err(format!("rows {} but {} in data", doc["rows"], data.len()));
            }
            let rows = data
                .iter()
                .map(|row| names.iter().map(|n| json_cell(&row[n])).collect())
                .collect::<Result<_, String>>()?;
            Ok(Table { names, rows })
        }
        Format::Ndjson => {
            let mut names = Vec::new();
            let mut rows = Vec::new();
            for line in text.lines() {
                let row: serde_json::Map<String, serde_json::Value> =
                    serde_json::from_str(line).map_err(|e| format!("NDJSON line {line:?}: {e}"))?;
                if names.is_empty() {
                    // serde_json's map sorts keys: take the line's order.
                    names = row.keys().cloned().collect();
                    names.sort_by_key(|n| line.find(&format!("\"{n}\":")));
                }
                rows.push(
                    names
                        .iter()
                        .map(|n| json_cell(row.get(n).unwrap_or(&serde_json::Value::Null)))
                        .collect::<Result<_, String>>()?,
                );
            }
            Ok(Table { names, rows })
        }
        Format::Csv | Format::Tsv => {
            let split = |line: &str| -> Vec<String> {
                if format == Format::Csv {
                    line.split(',')
                        .map(|c| c.trim_matches('"').to_owned())
                        .collect()
                } else {
                    line.split('\t').map(str::to_owned).collect()
                }
            };
            let mut lines = text.lines();
            let names = split(lines.next().ok_or("no header line")?);
            let rows = lines
                .map(|line| split(line).iter().map(|c| Cell::from_text(c)).collect())
                .collect();
            Ok(Table { names, rows })
        }
    }
}

/// The request bound and rendered by dashcache's catalog.
fn render(def: &QueryDef, params: &str) -> Result<String, String> {
    let raw: Vec<RawParam> = form_urlencoded::parse(params.as_bytes()).collect();
    let clock = def.clock(chrono::Utc::now());
    let bound = def
        .bind(&raw, &clock, Some(TENANT))
        .map_err(|problems| format!("{}?{params}: does not bind: {problems:?}", def.name))?;
    def.render(&bound)
        .map_err(|e| format!("{}?{params}: {e}", def.name))
}

/// Runs every case of the `checked` catalog on the engine and compares each
/// answer with its independent aggregate; the first difference is the error.
/// Returns how many answers were checked.
fn check_catalog(engine: &Engine, checked: &Checked) -> Result<usize, String> {
    let config = &checked.config;
    let settings = query_settings(&config.clickhouse);
    let tier = config
        .tiers
        .get("pro")
        .ok_or("no tier `pro` in the config")?;
    let mut export_settings = settings.clone();
    for (name, value) in [
        ("max_result_rows", tier.export_max_rows.to_string()),
        ("max_result_bytes", tier.export_max_bytes.to_string()),
        (
            "max_execution_time",
            tier.export_max_duration.as_secs().max(1).to_string(),
        ),
    ] {
        export_settings.retain(|(n, _)| *n != name);
        export_settings.push((name, value));
    }
    let mut queries = engine.connect(&settings);
    let mut exports = engine.connect(&export_settings);
    let mut plain = engine.connect(&[]);

    // Every query and export of the catalog has a case, and every template is run.
    let catalog = &checked.catalog;
    let names = |export: bool| -> Vec<&str> {
        let mut names: Vec<&str> = CASES
            .iter()
            .filter(|c| c.export == export)
            .map(|c| c.name)
            .collect();
        names.dedup();
        names.sort_unstable();
        names.dedup();
        names
    };
    let catalog_queries: Vec<&str> = catalog.iter().map(|q| q.name.as_str()).collect();
    let catalog_exports: Vec<&str> = catalog.exports().map(|q| q.name.as_str()).collect();
    if names(false) != catalog_queries || names(true) != catalog_exports {
        return Err(format!(
            "the cases cover queries {:?} and exports {:?}; the catalog has {catalog_queries:?} and {catalog_exports:?}",
            names(false),
            names(true)
        ));
    }

    let mut checked_answers = 0;
    let mut rendered = std::collections::BTreeSet::new();
    for case in CASES {
        let (def, connection, formats): (_, &mut Connection, &[Format]) = if case.export {
            (catalog.export(case.name), &mut exports, &Format::LINES)
        } else {
            (catalog.get(case.name), &mut queries, &Format::ALL)
        };
        let def = def.ok_or_else(|| format!("no {} in the catalog", case.name))?;
        let sql = render(def, case.params)?;
        rendered.insert(sql.clone());
        for &format in formats {
            let what = format!("{}?{} as {}", case.name, case.params, format.name());
            let body = connection
                .query(&sql, format.clickhouse())
                .map_err(|e| format!("{what}: ClickHouse 26.x refused it: {e}\n{sql}"))?;
            if let Some(at) = exception_start(&body, None, format) {
                return Err(format!(
                    "{what}: the exception detector flags a clean answer at byte {at}"
                ));
            }
            let answer = parse(&body, format).map_err(|e| format!("{what}: {e}"))?;
            let mut expected_sql = case.expected.to_owned();
            if let Some(at) = answer.names.iter().position(|n| n == "since") {
                let Some(Cell::Text(since)) = answer.rows.first().map(|r| r[at].clone()) else {
                    return Err(format!("{what}: no `since`"));
                };
                expected_sql = expected_sql.replace("{since}", &since);
            }
            let expected = plain
                .query(&expected_sql, "TSVWithNames")
                .map_err(|e| format!("{what}: the independent aggregate failed: {e}"))?;
            let expected = parse(&expected, Format::Tsv)?;
            compare(&what, answer, expected, case.unordered)?;
            checked_answers += 1;
        }
    }
    // One case per template: the enum-selected templates all ran.
    if rendered.len() != CASES.len() {
        return Err("two cases rendered the same SQL".into());
    }
    Ok(checked_answers)
}

fn compare(what: &str, answer: Table, expected: Table, unordered: bool) -> Result<(), String> {
    if expected.rows.is_empty() {
        return Err(format!("{what}: the sample data gives no rows to compare"));
    }
    if answer.names.len() != expected.names.len() {
        return Err(format!(
            "{what}: columns {:?}, expected {} columns",
            answer.names,
            expected.names.len()
        ));
    }
    let (mut got, mut want) = (answer.rows, expected.rows);
    if unordered {
        let key = |row: &Vec<Cell>| row.iter().map(Cell::sort_key).collect::<Vec<_>>();
        got.sort_by_key(key);
        want.sort_by_key(key);
    }
    if got.len() != want.len() {
        return Err(format!(
            "{what}: {} rows, the raw table gives {}",
            got.len(),
            want.len()
        ));
    }
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        if g.len() != w.len() || g.iter().zip(w).any(|(a, b)| !a.matches(b)) {
            return Err(format!(
                "{what}: row {i} is {g:?}, the raw table gives {w:?}"
            ));
        }
    }
    Ok(())
}

fn shipped() -> Checked {
    dashcache::check::load(&root().join("config.toml")).unwrap_or_else(|r| panic!("{r:?}"))
}

#[test]
fn every_catalog_query_and_export_gives_the_raw_tables_numbers_on_26x() {
    let Some(engine) = engine() else { return };
    let version = engine.chdb.version();
    assert!(version.starts_with("26."), "chDB {version}");
    let answers = check_catalog(&engine, &shipped()).unwrap_or_else(|e| panic!("{e}"));
    // 7 query requests in 4 formats, 1 export in its 3 line formats.
    assert_eq!(answers, 7 * 4 + 3);
}

/// A copy of the shipped config whose `file` template is replaced by `sql`.
fn with_template(dir: &Path, file: &str, sql: &str) -> Checked {
    let queries = dir.join("sql/queries");
    std::fs::create_dir_all(&queries).expect("dir");
    for entry in std::fs::read_dir(root().join("sql/queries")).expect("sql/queries") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), queries.join(entry.file_name())).expect("copy");
    }
    std::fs::write(queries.join(file), sql).expect("write template");
    std::fs::copy(root().join("config.toml"), dir.join("config.toml")).expect("copy config");
    dashcache::check::load(&dir.join("config.toml")).unwrap_or_else(|r| panic!("{r:?}"))
}

#[test]
fn a_template_that_only_old_servers_run_fails_the_suite() {
    let Some(engine) = engine() else { return };
    let dir = TempDir::new("chdb-broken");
    let shipped =
        std::fs::read_to_string(root().join("sql/queries/revenue_minute.sql")).expect("template");
    // runningDifference ran on 18.16; since 24.x it is refused without
    // allow_deprecated_error_prone_window_functions (which readonly=1 cannot set).
    let old = shipped.replace(
        "count() AS events",
        "count() + runningDifference(0) AS events",
    );
    assert_ne!(old, shipped, "the template changed; update this test");
    let err = check_catalog(&engine, &with_template(&dir.0, "revenue_minute.sql", &old))
        .expect_err("a template 26.x refuses must fail the suite");
    assert!(err.contains("revenue?granularity=minute"), "{err}");
    assert!(err.contains("Code: 721"), "{err}");

    // A template that runs but answers other numbers fails it too.
    let wrong = shipped.replace("count() AS events", "count() + 1 AS events");
    let err = check_catalog(
        &engine,
        &with_template(&dir.0, "revenue_minute.sql", &wrong),
    )
    .expect_err("other numbers must fail the suite");
    assert!(err.contains("the raw table gives"), "{err}");
}

#[test]
fn the_proxys_settings_under_a_readonly_user_on_26x() {
    let Some(engine) = engine() else { return };
    let settings = query_settings(&shipped().config.clickhouse);
    let clause = |readonly: &str| -> String {
        let list: Vec<String> = settings
            .iter()
            .map(|(n, v)| {
                let v = if *n == "readonly" {
                    readonly
                } else {
                    v.as_str()
                };
                if v.parse::<u64>().is_ok() {
                    format!("{n} = {v}")
                } else {
                    format!("{n} = '{v}'")
                }
            })
            .collect();
        format!(
            "SELECT count() FROM demo.events SETTINGS {}",
            list.join(", ")
        )
    };
    let code = |result: Result<Vec<u8>, ChdbError>| result.err().and_then(|e| e.code());

    // A user whose profile says readonly=1: the proxy's limits change settings: 164.
    let mut readonly1 = engine.connect(&[("readonly", "1".into())]);
    assert_eq!(code(readonly1.query(&clause("1"), "TSV")), Some(164));
    // ... though the same readonly value alone is accepted.
    assert!(
        readonly1
            .query("SELECT 1 SETTINGS readonly = 1", "TSV")
            .is_ok()
    );
    // readonly=2: every setting may change except readonly itself, so
    // dashcache's `readonly = 2` works and its default 1 does not.
    let mut readonly2 = engine.connect(&[("readonly", "2".into())]);
    assert!(readonly2.query(&clause("2"), "TSV").is_ok());
    assert_eq!(code(readonly2.query(&clause("1"), "TSV")), Some(164));
    // And readonly holds: writes are refused with 164 on the proxy's settings.
    let mut proxy = engine.connect(&settings);
    assert_eq!(
        code(proxy.query("INSERT INTO demo.events (ts) VALUES (now())", "Null")),
        Some(164)
    );
}

#[test]
fn every_warmup_jobs_settings_are_accepted_on_26x() {
    let Some(engine) = engine() else { return };
    let checked = shipped();
    assert!(
        !checked.warmups.is_empty(),
        "the shipped config has warm-up jobs"
    );
    for warmup in &checked.warmups {
        // The scheduler's client: the proxy's settings, then the job's (as URL
        // parameters of one request, so applied before readonly is).
        let mut settings = query_settings(&checked.config.clickhouse);
        for (name, value) in &warmup.settings {
            settings.retain(|(n, _)| n != name);
            settings.push((name.as_str(), value.clone()));
        }
        let mut connection = engine.connect(&settings);
        let applied = run(
            &mut connection,
            &format!(
                "SELECT {}",
                warmup
                    .settings
                    .iter()
                    .map(|(n, _)| format!("getSetting('{n}')"))
                    .chain(["1".to_owned()])
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            "TSV",
        );
        let applied = String::from_utf8_lossy(&applied);
        for (name, value) in &warmup.settings {
            assert!(
                applied.split('\t').any(|v| v.trim() == value),
                "{}: {name}={value} not applied: {applied}",
                warmup.name
            );
        }
    }
}

/// The embedded engine on this module's data path: library and data path.
fn embedded_paths() -> Option<(PathBuf, PathBuf)> {
    let engine = engine()?;
    Some((engine.library.clone(), engine.data.clone()))
}

const WAIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Reads `answer` to its end: (chunks, bytes).
async fn drain(answer: &mut EmbeddedAnswer) -> Result<(usize, Vec<u8>), ChdbError> {
    let mut chunks = 0;
    let mut body = Vec::new();
    while let Some(chunk) = answer.next().await? {
        chunks += 1;
        body.extend_from_slice(&chunk);
    }
    Ok((chunks, body))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_engine_streams_answers_in_chunks_under_per_query_settings() {
    let Some((library, data)) = embedded_paths() else {
        return;
    };
    let embedded = Embedded::open(&library, &data, 2).expect("open");
    let settings = |rows: &str| {
        vec![
            ("readonly".to_owned(), "1".to_owned()),
            ("max_result_rows".to_owned(), rows.to_owned()),
            ("result_overflow_mode".to_owned(), "throw".to_owned()),
        ]
    };
    // Two million rows arrive in several chunks, all of them.
    let mut answer = embedded.query(
        "SELECT number, toString(number) AS s FROM numbers(2000000)",
        "TSV",
        "q-stream",
        settings("0"),
    );
    let (chunks, body) = tokio::time::timeout(WAIT, drain(&mut answer))
        .await
        .expect("within the bound")
        .expect("the answer");
    assert!(chunks > 1, "{chunks} chunk(s)");
    assert_eq!(body.iter().filter(|&&b| b == b'\n').count(), 2_000_000);
    // The demo table is there, and the numbers match a plain connection's.
    let mut answer = embedded.query(
        "SELECT count(), round(sum(revenue), 2) FROM demo.events",
        "TSV",
        "q-demo",
        settings("0"),
    );
    let (_, body) = drain(&mut answer).await.expect("answer");
    let expected = run(
        &mut engine().expect("engine").connect(&[]),
        "SELECT count(), round(sum(revenue), 2) FROM demo.events",
        "TSV",
    );
    assert_eq!(body, expected);
    // The query's own limit applies (396), and the next query has its own.
    let mut answer = embedded.query(
        "SELECT number FROM numbers(10)",
        "TSV",
        "q-limit",
        settings("5"),
    );
    assert_eq!(
        drain(&mut answer).await.err().and_then(|e| e.code()),
        Some(396)
    );
    let mut answer = embedded.query(
        "SELECT number FROM numbers(10)",
        "TSV",
        "q-ok",
        settings("0"),
    );
    assert_eq!(drain(&mut answer).await.expect("answer").1.len(), 20);
    // Connections are read-only (readonly=2: settings may change), and
    // writes are refused.
    let mut answer = embedded.query(
        "SELECT getSetting('readonly')",
        "TSV",
        "q-ro",
        settings("0"),
    );
    assert_eq!(drain(&mut answer).await.expect("answer").1, b"2\n");
    let mut answer = embedded.query(
        "INSERT INTO demo.events (ts) VALUES (now())",
        "TSV",
        "q-write",
        settings("0"),
    );
    let refused = drain(&mut answer).await.expect_err("a write");
    assert!(refused.code().is_some(), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_or_killed_embedded_answer_stops_the_query_and_frees_its_connection() {
    let Some((library, data)) = embedded_paths() else {
        return;
    };
    // One connection: the next query can only run once the first let go of it.
    let embedded = Embedded::open(&library, &data, 1).expect("open");
    let endless = "SELECT number, toString(number) AS s FROM system.numbers";
    let limit = vec![("max_execution_time".to_owned(), "600".to_owned())];
    for stop in ["drop", "kill"] {
        let mut answer = embedded.query(endless, "TSV", "q-endless", limit.clone());
        let first = tokio::time::timeout(WAIT, answer.next())
            .await
            .expect("a first chunk within the bound")
            .expect("no error");
        assert!(first.is_some_and(|c| !c.is_empty()));
        if stop == "kill" {
            embedded.kill("q-endless");
            // The reader learns the answer did not end cleanly (or it ended).
            let rest = tokio::time::timeout(WAIT, async {
                while let Ok(Some(_)) = answer.next().await {}
            })
            .await;
            assert!(rest.is_ok(), "a killed query kept streaming");
        }
        drop(answer);
        let mut next = embedded.query("SELECT 42", "TSV", "q-next", Vec::new());
        let (_, body) = tokio::time::timeout(WAIT, drain(&mut next))
            .await
            .unwrap_or_else(|_| panic!("after {stop}, the connection was never freed"))
            .expect("answer");
        assert_eq!(body, b"42\n");
    }
    assert_eq!(embedded.queries_started(), 4);
}
