//! One config check: `dashcache-proxy check`, `dashcache-scheduler check` and
//! both start-ups say the same about the same bad file — every problem, each
//! with the file, the line of the offending key and the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::harness::{TempDir, root};

/// The shipped config with `replace`ments and `extra` appended, beside a link
/// to the shipped SQL templates.
fn write_config(dir: &TempDir, replace: &[(&str, &str)], extra: &str) -> (PathBuf, String) {
    let mut text = std::fs::read_to_string(root().join("config.toml")).expect("read config");
    for (from, to) in replace {
        assert_eq!(
            text.matches(from).count(),
            1,
            "`{from}` is not once in config.toml"
        );
        text = text.replacen(from, to, 1);
    }
    text.push('\n');
    text.push_str(extra);
    let sql = dir.0.join("sql");
    if !sql.exists() {
        std::os::unix::fs::symlink(root().join("sql"), &sql).expect("link sql/");
    }
    let path = dir.0.join("config.toml");
    std::fs::write(&path, &text).expect("write config");
    (path, text)
}

/// The 1-based line of the one line of `text` that contains `needle`.
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

fn run(binary: &str, config: &Path, args: &[&str]) -> Output {
    Command::new(binary)
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("DASHCACHE_REDIS_URL")
        .env_remove("DASHCACHE_CLICKHOUSE_URL")
        .env_remove("DASHCACHE_STORE_URL")
        .env_remove("RUST_LOG")
        .output()
        .expect("run")
}

const PROXY: &str = env!("CARGO_BIN_EXE_dashcache-proxy");
const SCHEDULER: &str = env!("CARGO_BIN_EXE_dashcache-scheduler");

/// Runs both `check`s on `config`: both must fail with the same stderr and
/// print nothing else; both start-ups must fail with those lines, each
/// prefixed with the binary's name. Returns the diagnostic lines.
fn both_reject(config: &Path) -> Vec<String> {
    let proxy = run(PROXY, config, &["check"]);
    let scheduler = run(SCHEDULER, config, &["check"]);
    let stderr = |out: &Output| String::from_utf8_lossy(&out.stderr).into_owned();
    for (name, out) in [("proxy", &proxy), ("scheduler", &scheduler)] {
        assert_eq!(out.status.code(), Some(1), "{name} check: {}", stderr(out));
        assert!(out.stdout.is_empty(), "{name} check printed to stdout");
    }
    assert_eq!(
        stderr(&proxy),
        stderr(&scheduler),
        "the two checks disagree about {}",
        config.display()
    );
    let diagnostics: Vec<String> = stderr(&proxy).lines().map(str::to_owned).collect();

    // Starting either binary on the file: the same problems, one line each.
    // (The proxy stops before it binds; the scheduler before it schedules.)
    for (binary, args, prefix) in [
        (
            PROXY,
            &["--listen", "127.0.0.1:1"][..],
            "dashcache-proxy: error: ",
        ),
        (SCHEDULER, &["serve"][..], "dashcache-scheduler: error: "),
    ] {
        let out = run(binary, config, args);
        assert_eq!(out.status.code(), Some(1), "{prefix}{}", stderr(&out));
        let lines: Vec<String> = stderr(&out)
            .lines()
            .map(|l| {
                l.strip_prefix(prefix)
                    .unwrap_or_else(|| panic!("not `{prefix}…`: {l}"))
                    .to_owned()
            })
            .collect();
        assert_eq!(lines, diagnostics, "start-up of {binary}");
    }
    diagnostics
}

#[test]
fn both_checks_accept_the_shipped_config() {
    let dir = TempDir::new("check-ok");
    let (config, _) = write_config(&dir, &[], "");
    let proxy = run(PROXY, &config, &["check"]);
    let scheduler = run(SCHEDULER, &config, &["check"]);
    // The first line; the second says how it runs (`mode: …`).
    let stdout = |out: &Output| {
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut lines = text.lines();
        let first = lines.next().unwrap_or("").to_owned();
        assert!(
            lines
                .next()
                .is_some_and(|l| l.starts_with("mode: servers: ")),
            "{text}"
        );
        first
    };
    assert!(proxy.status.success(), "{:?}", proxy);
    assert!(scheduler.status.success(), "{:?}", scheduler);
    // `FILE: ok (N queries)`, and the scheduler adds its jobs.
    let proxy = stdout(&proxy);
    let scheduler = stdout(&scheduler);
    let queries = proxy
        .strip_prefix(&format!("{}: ok (", config.display()))
        .and_then(|rest| rest.strip_suffix(" queries)"))
        .unwrap_or_else(|| panic!("{proxy}"));
    assert!(
        scheduler.starts_with(&format!("{}: ok ({queries} queries, ", config.display()))
            && scheduler.ends_with(" warm-up jobs)"),
        "{scheduler}"
    );
}

#[test]
fn both_checks_report_every_problem_of_a_bad_config_alike() {
    let dir = TempDir::new("check-bad");
    let (config, text) = write_config(
        &dir,
        &[
            ("request_log_sample = 0.01", "request_log_sample = 2.0"),
            ("readonly = 1 ", "readonly = 3 "),
            (
                "# cluster_nodes = [\"redis://10.0.0.21:6379\", \"redis://10.0.0.22:6379\", \"redis://10.0.0.23:6379\"]",
                "cluster_nodes = [\"redis://10.0.0.21:6379\"]",
            ),
            (
                "# sentinel_master = \"dashcache\"",
                "sentinel_master = \"dashcache\"",
            ),
            // A bad tier: no burst, and a query that does not exist.
            ("burst = 20", "burst = 0"),
            (
                "queries = [\"revenue\", \"top_countries\"]",
                "queries = [\"revenue\", \"top_countrys\"]",
            ),
            // A parameter whose default is out of its own range: the query
            // is reported once, not again by the job that warms it.
            ("max = 100\ndefault = 10", "max = 100\ndefault = 1000"),
        ],
        // Bad warm-up jobs: a cron minute of 61, an unknown query, a
        // per-tenant query without tenants.
        "[[warmup]]\nname = \"bad-cron\"\ncron = \"61 6 * * *\"\nquery = \"active_users\"\ntenants = [\"acme\"]\n\n\
         [[warmup]]\nname = \"typo\"\ncron = \"0 6 * * *\"\nquery = \"revenu\"\n\n\
         [[warmup]]\nname = \"no-tenants\"\ncron = \"0 6 * * *\"\nquery = \"revenue\"\n",
    );
    let path = config.display().to_string();
    let at =
        |needle: &str, reason: &str| format!("{path}: line {}: {reason}", line_of(&text, needle));
    let expected = [
        at(
            "request_log_sample = 2.0",
            "proxy.request_log_sample = 2 must be between 0.0 and 1.0",
        ),
        at("readonly = 3", "clickhouse.readonly must be 1 or 2"),
        at(
            "cluster_nodes = [",
            "[redis]: cluster_nodes and sentinel_* are exclusive: pick one topology",
        ),
        at(
            "burst = 0",
            "tier `free`: requests_per_minute and burst must be at least 1",
        ),
        at(
            "\"top_countrys\"",
            "tier `free`: allows unknown query `top_countrys`",
        ),
        at(
            "default = 1000",
            "query `top_countries`: parameter `limit`: default `1000` must be at most 100",
        ),
        at(
            "cron = \"61 6 * * *\"",
            "warmup `bad-cron`: cron `61 6 * * *`: ",
        ),
        at(
            "query = \"revenu\"",
            "warmup `typo`: unknown query `revenu`; known: active_users, revenue, top_countries",
        ),
        format!(
            "{path}: line {}: warmup `no-tenants`: query `revenue` is per tenant: list the `tenants` to warm it for",
            text.lines().count() - 3
        ),
    ];
    let diagnostics = both_reject(&config);
    assert_eq!(
        diagnostics.len(),
        expected.len(),
        "{}",
        diagnostics.join("\n")
    );
    for (got, want) in diagnostics.iter().zip(&expected) {
        // The cron parser's own words follow the prefix.
        assert!(
            got == want || (want.ends_with(": ") && got.starts_with(want.as_str())),
            "got\n  {got}\nwanted\n  {want}\nall:\n{}",
            diagnostics.join("\n")
        );
    }
}

#[test]
fn both_checks_name_a_key_that_does_not_belong_where_it_is() {
    let dir = TempDir::new("check-shape");
    // `pattern` belongs to strings, not ints.
    let (config, text) = write_config(
        &dir,
        &[(
            "min = 1\nmax = 100",
            "min = 1\npattern = \"[0-9]+\"\nmax = 100",
        )],
        "",
    );
    let diagnostics = both_reject(&config);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let want = format!(
        "{}: line {}: unknown field `pattern`, expected one of ",
        config.display(),
        line_of(&text, "pattern = \"[0-9]+\"")
    );
    assert!(diagnostics[0].starts_with(&want), "{}", diagnostics[0]);

    // A misspelt key of a warm-up job.
    let (config, text) = write_config(
        &dir,
        &[],
        "[[warmup]]\nname = \"spelling\"\ncron = \"0 6 * * *\"\nquery = \"revenue\"\ntennants = [\"acme\"]\n",
    );
    let diagnostics = both_reject(&config);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:?}");
    let want = format!(
        "{}: line {}: unknown field `tennants`, expected one of ",
        config.display(),
        line_of(&text, "tennants")
    );
    assert!(diagnostics[0].starts_with(&want), "{}", diagnostics[0]);
}
