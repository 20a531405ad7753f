//! `dashcache-scheduler` against real ClickHouse, Redis and control stores:
//! warmed answers are proxy HITs, cron jobs fire and are recorded, reloads,
//! several schedulers, popularity, PostgreSQL history.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use dashcache::store::Store;

use crate::harness::{Proxy, ProxyOptions, Relay, TempDir, config_text, redis_url, shared_prefix};

/// A test config: the shipped one with a fresh key prefix and its own store;
/// `warmup` replaces the shipped `[[warmup]]` jobs when given.
struct Setup {
    dir: TempDir,
    prefix: String,
    store_url: String,
    /// ClickHouse for the jobs (default: the test server).
    clickhouse_url: Option<String>,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = TempDir::new(name);
        let store_url = format!("sqlite://{}/control.db", dir.0.display());
        Setup {
            dir,
            prefix: shared_prefix(),
            store_url,
            clickhouse_url: None,
        }
    }

    fn path(&self) -> PathBuf {
        self.dir.0.join("config.toml")
    }

    /// Writes the config; `warmup`, when given, is TOML replacing the shipped jobs.
    fn write(&self, warmup: Option<&str>) {
        let mut options = ProxyOptions {
            key_prefix: Some(self.prefix.clone()),
            ..ProxyOptions::default()
        };
        if let Some(url) = &self.clickhouse_url {
            options.clickhouse_url = url.clone();
        }
        let mut config: toml::Table = config_text(&options, &self.dir.0).parse().expect("toml");
        let store = config
            .entry("store")
            .or_insert_with(|| toml::Value::Table(Default::default()));
        store
            .as_table_mut()
            .expect("table")
            .insert("url".into(), self.store_url.clone().into());
        let scheduler = config["scheduler"].as_table_mut().expect("[scheduler]");
        scheduler.insert("lease_ttl".into(), "5s".into());
        scheduler.insert("shutdown_grace".into(), "5s".into());
        let mut text = match warmup {
            Some(_) => {
                config.remove("warmup");
                toml::to_string(&config).expect("serializes")
            }
            None => toml::to_string(&config).expect("serializes"),
        };
        if let Some(warmup) = warmup {
            text.push('\n');
            text.push_str(warmup);
        }
        // Write to a temporary file and rename, as editors do.
        let tmp = self.dir.0.join("config.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.path()).expect("rename config");
    }

    fn command(&self, args: &[&str]) -> Output {
        scheduler_command(&self.path())
            .args(args)
            .output()
            .expect("run dashcache-scheduler")
    }

    fn serve(&self, log: &str) -> Scheduler {
        let log_path = self.dir.0.join(log);
        let child = scheduler_command(&self.path())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log_path).expect("log"))
            .spawn()
            .expect("spawn dashcache-scheduler serve");
        Scheduler { child, log_path }
    }

    async fn store(&self) -> Store {
        Store::connect(&self.store_url).await.expect("store")
    }
}

fn scheduler_command(config: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_dashcache-scheduler"));
    command
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .env_remove("DASHCACHE_REDIS_URL")
        .env_remove("DASHCACHE_CLICKHOUSE_URL")
        .env_remove("DASHCACHE_STORE_URL");
    command
}

struct Scheduler {
    child: Child,
    log_path: PathBuf,
}

impl Scheduler {
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// SIGTERM, then waits for a clean exit.
    fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().expect("wait")
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// (job, scheduled, outcome, warmed, skipped, failed) of every recorded run.
async fn runs(store: &Store) -> Vec<(String, Option<i64>, String, i64, i64, i64)> {
    sqlx::query_as(
        "SELECT job, scheduled, outcome, keys_warmed, keys_skipped, keys_failed \
         FROM warmup_runs ORDER BY started_ms",
    )
    .fetch_all(store.pool())
    .await
    .expect("history")
}

/// Polls `cond` over the history until it holds (or fails after a minute).
async fn wait_for_runs(
    store: &Store,
    what: &str,
    cond: impl Fn(&[(String, Option<i64>, String, i64, i64, i64)]) -> bool,
    log: impl Fn() -> String,
) {
    for _ in 0..600 {
        if cond(&runs(store).await) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "timed out waiting for {what}; history: {:?}\nlog:\n{}",
        runs(store).await,
        log()
    );
}

fn every_second(name: &str) -> String {
    format!(
        "[[warmup]]\nname = \"{name}\"\ncron = \"* * * * * *\"\nquery = \"active_users\"\n\
         tenants = [\"acme\"]\nmatrix = {{ window = [\"hour\"] }}\n"
    )
}

#[tokio::test]
async fn warmed_combinations_are_hits_and_the_proxy_never_asks_clickhouse() {
    let setup = Setup::new("sched-warm");
    setup.write(None);
    let proxy = Proxy::start_with(ProxyOptions {
        key_prefix: Some(setup.prefix.clone()),
        ..ProxyOptions::default()
    })
    .await;
    let mut keys = BTreeMap::new();
    let mut checked = 0;
    for job in ["morning-revenue", "morning-top-countries", "active-users"] {
        // Each job's answers are checked right after its run: active_users
        // lives 30 s, which checking every job's answers first could outlast
        // on a slow machine.
        let out = setup.command(&["run", job]);
        assert!(out.status.success(), "run {job}: {}", text(&out));
        // What the job warms, as the scheduler itself lists it.
        let out = setup.command(&["targets", job]);
        assert!(out.status.success(), "targets {job}: {}", text(&out));
        let listed = String::from_utf8_lossy(&out.stdout).to_string();
        for line in listed.lines() {
            let (tenant, path) = line.split_once('\t').expect("tenant, tab, path");
            assert_ne!(tenant, "-", "the demo catalog is per tenant");
            let tenant = tenant.to_owned();
            let describe = format!("{path} (tenant {tenant})");
            let key = keys
                .entry(tenant.clone())
                .or_insert_with(|| proxy.add_key("enterprise", &tenant))
                .clone();
            let auth = format!("Bearer {key}");
            // A new key reaches the proxy within auth.reload_interval.
            let mut reply = proxy
                .get_with(path, &[("authorization", auth.as_str())])
                .await;
            for _ in 0..100 {
                if reply.status != 401 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                reply = proxy
                    .get_with(path, &[("authorization", auth.as_str())])
                    .await;
            }
            assert_eq!(reply.status, 200, "{describe}: {}", reply.text());
            assert_eq!(reply.cache(), "HIT", "{describe}");
            checked += 1;
        }
    }
    // 3 tenants × (36 revenue + 3 top_countries + 2 active_users).
    assert_eq!(checked, 3 * (36 + 3 + 2));
    assert_eq!(
        proxy.metric("dashcache_clickhouse_queries_total").await,
        0.0
    );

    // Everything is still fresh: a second run skips it all, and says so.
    let out = setup.command(&["run", "morning-revenue"]);
    assert!(out.status.success(), "{}", text(&out));
    let store = setup.store().await;
    let history = runs(&store).await;
    let last = history.last().expect("runs");
    assert_eq!(
        (last.0.as_str(), last.2.as_str(), last.3, last.4, last.5),
        ("morning-revenue", "ok", 0, 108, 0)
    );
    assert_eq!(history[0].3, 108, "{history:?}");

    let out = setup.command(&["history", "--job", "morning-revenue", "--limit", "1"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("morning-revenue"),
        "{}",
        text(&out)
    );
    assert_eq!(table.lines().count(), 2, "{table}");
}

#[tokio::test]
async fn a_run_with_failing_keys_exits_non_zero_and_is_recorded() {
    let setup = Setup::new("sched-fail");
    // 1 row per granularity=minute bucket would be fine; a tiny result limit is not.
    setup.write(Some(
        "[[warmup]]\nname = \"too-big\"\ncron = \"0 6 * * *\"\nquery = \"revenue\"\n\
         tenants = [\"acme\"]\nparams = [{ from = \"today-1d\", to = \"today\", granularity = \"hour\" }]\n\
         settings = { max_result_rows = 1 }\n",
    ));
    let out = setup.command(&["run", "too-big"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("failed 1"),
        "{}",
        text(&out)
    );
    let history = runs(&setup.store().await).await;
    assert_eq!(history.len(), 1);
    assert_eq!((history[0].2.as_str(), history[0].5), ("failed", 1));
}

#[tokio::test]
async fn cron_fires_reloads_apply_good_edits_and_keep_the_schedule_on_bad_ones() {
    let setup = Setup::new("sched-cron");
    setup.write(Some(&every_second("tick")));
    // Migrate first: the scheduler process then finds the schema in place.
    let store = setup.store().await;
    let mut scheduler = setup.serve("scheduler.log");
    let log = || scheduler_log(&setup);
    wait_for_runs(
        &store,
        "two runs of `tick`",
        |r| r.iter().filter(|r| r.0 == "tick" && r.2 == "ok").count() >= 2,
        log,
    )
    .await;
    // Scheduled on whole seconds, one row each.
    let ticks: Vec<i64> = runs(&store)
        .await
        .iter()
        .filter(|r| r.0 == "tick")
        .filter_map(|r| r.1)
        .collect();
    assert!(ticks.iter().all(|t| t % 1000 == 0), "{ticks:?}");
    assert_eq!(ticks.iter().collect::<HashSet<_>>().len(), ticks.len());

    // A valid edit: `tock` replaces `tick`, without a restart.
    setup.write(Some(&every_second("tock")));
    wait_for_runs(
        &store,
        "two runs of `tock`",
        |r| r.iter().filter(|r| r.0 == "tock").count() >= 2,
        log,
    )
    .await;
    let ticks_after_edit = runs(&store).await.iter().filter(|r| r.0 == "tick").count();

    // An invalid edit: rejected with file, line and reason; `tock` keeps firing.
    setup.write(Some(
        &every_second("tock").replace("* * * * * *", "61 * * * * *"),
    ));
    for _ in 0..300 {
        if scheduler.log().contains("config rejected") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rejected = scheduler.log();
    let line = rejected
        .lines()
        .find(|l| l.contains("config rejected"))
        .unwrap_or_else(|| panic!("no rejection logged:\n{rejected}"));
    assert!(line.contains("config.toml"), "{line}");
    assert!(line.contains("line "), "{line}");
    assert!(
        line.contains("warmup `tock`: cron `61 * * * * *`"),
        "{line}"
    );
    let tocks = runs(&store).await.iter().filter(|r| r.0 == "tock").count();
    wait_for_runs(
        &store,
        "`tock` to keep firing",
        |r| r.iter().filter(|r| r.0 == "tock").count() >= tocks + 2,
        log,
    )
    .await;
    assert_eq!(
        runs(&store).await.iter().filter(|r| r.0 == "tick").count(),
        ticks_after_edit,
        "the old job must stop after the valid edit"
    );

    // SIGTERM: a clean exit, and no run left as `running`.
    assert!(scheduler.terminate().success(), "{}", scheduler.log());
    let history = runs(&store).await;
    assert!(history.iter().all(|r| r.2 != "running"), "{history:?}");
}

fn scheduler_log(setup: &Setup) -> String {
    std::fs::read_dir(&setup.dir.0)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
                .collect::<Vec<_>>()
                .join("\n----\n")
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn two_schedulers_run_each_scheduled_time_once() {
    let setup = Setup::new("sched-two");
    setup.write(Some(&every_second("shared")));
    let store = setup.store().await;
    let _a = setup.serve("a.log");
    let _b = setup.serve("b.log");
    wait_for_runs(
        &store,
        "five scheduled runs",
        |r| r.iter().filter(|r| r.0 == "shared").count() >= 5,
        || scheduler_log(&setup),
    )
    .await;
    let scheduled: Vec<i64> = runs(&store).await.iter().filter_map(|r| r.1).collect();
    let distinct: HashSet<i64> = scheduled.iter().copied().collect();
    assert_eq!(distinct.len(), scheduled.len(), "{scheduled:?}");
}

#[tokio::test]
async fn popular_keys_are_counted_in_redis_and_warmed_by_the_popular_job() {
    let setup = Setup::new("sched-popular");
    setup.write(Some(
        "[[warmup]]\nname = \"popular\"\ncron = \"0 * * * *\"\npopular = { top = 2, hours = 2 }\n",
    ));
    // Demand as the proxy counts it: dashboards asking for answers.
    let proxy = Proxy::start_with(ProxyOptions {
        key_prefix: Some(setup.prefix.clone()),
        set: vec![("popularity", "flush_interval", "100ms".into())],
        ..ProxyOptions::default()
    })
    .await;
    let globex = proxy.add_key("enterprise", "globex");
    let ask = |window: &'static str| format!("/v1/query/active_users?window={window}");
    for _ in 0..3 {
        assert_eq!(proxy.get(&ask("day")).await.status, 200);
    }
    assert_eq!(
        proxy
            .get_with(&ask("hour"), &[("x-api-key", &globex)])
            .await
            .status,
        200
    );
    for _ in 0..2 {
        assert_eq!(proxy.get(&ask("hour")).await.status, 200);
    }
    // Flushed to Redis in the background: wait (bounded) for all six counts.
    let hour = dashcache::popularity::hour_key(&setup.prefix, chrono::Utc::now());
    let client = redis::Client::open(redis_url()).expect("redis");
    let mut counting = redis::aio::ConnectionManager::new(client)
        .await
        .expect("redis");
    for _ in 0..200 {
        let counts: Vec<(String, f64)> = redis::cmd("ZRANGE")
            .arg(&hour)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query_async(&mut counting)
            .await
            .expect("zrange");
        if counts.iter().map(|(_, n)| n).sum::<f64>() >= 6.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(proxy);

    let client = redis::Client::open(redis_url()).expect("redis");
    let mut conn = redis::aio::ConnectionManager::new(client)
        .await
        .expect("redis");
    let top = dashcache::popularity::top(&mut conn, &setup.prefix, 2, 2, chrono::Utc::now())
        .await
        .expect("top");
    let summary: Vec<(Option<String>, String, u64)> = top
        .iter()
        .map(|(d, n)| (d.tenant.clone(), d.params.clone(), *n))
        .collect();
    assert_eq!(
        summary,
        vec![
            (Some("acme".into()), "window=day".into(), 3),
            (Some("acme".into()), "window=hour".into(), 2),
        ]
    );

    let out = setup.command(&["run", "popular"]);
    assert!(out.status.success(), "{}", text(&out));
    let history = runs(&setup.store().await).await;
    assert_eq!(
        (history[0].2.as_str(), history[0].3),
        ("ok", 2),
        "{history:?}"
    );
}

#[tokio::test]
async fn history_works_on_postgresql() {
    let url = match std::env::var("DASHCACHE_TEST_POSTGRES_URL") {
        Ok(url) => url,
        Err(_) => {
            eprintln!(
                "history_works_on_postgresql: DASHCACHE_TEST_POSTGRES_URL is not set \
                 (scripts/test sets it after `scripts/services up postgres`); not run"
            );
            return;
        }
    };
    let setup = Setup {
        store_url: url.clone(),
        ..Setup::new("sched-pg")
    };
    let job = format!("pg-{}", setup.prefix.replace(['-', ':'], ""));
    setup.write(Some(
        &every_second(&job).replace("* * * * * *", "0 6 * * *"),
    ));
    let out = setup.command(&["run", &job]);
    assert!(out.status.success(), "{}", text(&out));
    let out = setup.command(&["history", "--job", &job]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(table.lines().count(), 2, "{table}");
    assert!(table.contains(&job) && table.contains(" ok "), "{table}");
}

/// The error column of every run of `job`, in order.
async fn errors(store: &Store, job: &str) -> Vec<(String, Option<String>)> {
    sqlx::query_as("SELECT outcome, error FROM warmup_runs WHERE job = $1 ORDER BY started_ms")
        .bind(job)
        .fetch_all(store.pool())
        .await
        .expect("history")
}

async fn redis() -> redis::aio::ConnectionManager {
    let client = redis::Client::open(redis_url()).expect("redis");
    redis::aio::ConnectionManager::new(client)
        .await
        .expect("redis connection")
}

async fn lease_exists(redis: &mut redis::aio::ConnectionManager, prefix: &str, job: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:warmup:{{{job}}}:lease"))
        .query_async(redis)
        .await
        .expect("EXISTS");
    n == 1
}

#[tokio::test]
async fn a_run_still_going_at_the_shutdown_deadline_is_cut_and_later_fires_are_overlaps() {
    // ClickHouse's answers wait in the relay: the first run never ends by itself.
    let relay = Relay::start().await;
    relay.hold();
    let mut setup = Setup::new("sched-cut");
    setup.clickhouse_url = Some(relay.url());
    setup.write(Some(&every_second("slow")));
    let store = setup.store().await;
    let mut scheduler = setup.serve("scheduler.log");
    let log = || scheduler_log(&setup);
    // One run holds the job's lease; the next scheduled times find it taken.
    wait_for_runs(
        &store,
        "a running run and an overlapping one",
        |r| {
            r.iter().any(|r| r.0 == "slow" && r.2 == "running")
                && r.iter().any(|r| r.0 == "slow" && r.2 == "overlap")
        },
        log,
    )
    .await;
    // SIGTERM: no new runs; the running one gets `shutdown_grace` (5 s), then is cut.
    let status = scheduler.terminate();
    assert!(status.success(), "{status:?}; log:\n{}", scheduler.log());
    let rows = errors(&store, "slow").await;
    let cut: Vec<_> = rows.iter().filter(|r| r.0 == "interrupted").collect();
    assert_eq!(cut.len(), 1, "{rows:?}");
    assert_eq!(
        cut[0].1.as_deref(),
        Some("cut at shutdown after 0 of 1 keys"),
        "{rows:?}"
    );
    assert!(
        rows.iter()
            .all(|r| r.0 == "interrupted" || r.0 == "overlap"),
        "no run is left `running`: {rows:?}"
    );
    let overlap = rows.iter().find(|r| r.0 == "overlap").expect("an overlap");
    assert!(
        overlap
            .1
            .as_deref()
            .is_some_and(|e| e.starts_with("still running on ")),
        "{overlap:?}"
    );
    // The cut run gave its lease back.
    assert!(!lease_exists(&mut redis().await, &setup.prefix, "slow").await);
    assert!(
        scheduler
            .log()
            .contains("shutdown grace over: cutting running jobs"),
        "{}",
        scheduler.log()
    );
}

// Multi-threaded: the relay keeps relaying while a `run` below blocks this thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_whose_holder_died_blocks_the_job_until_it_expires_then_the_job_runs() {
    let relay = Relay::start().await;
    relay.hold();
    let mut setup = Setup::new("sched-lease");
    setup.clickhouse_url = Some(relay.url());
    // Never fires by itself: runs are started by hand below.
    setup.write(Some(
        "[[warmup]]\nname = \"stuck\"\ncron = \"0 6 1 1 *\"\nquery = \"active_users\"\n\
         tenants = [\"acme\"]\nmatrix = { window = [\"hour\"] }\n",
    ));
    let store = setup.store().await;
    let mut holder = scheduler_command(&setup.path())
        .args(["run", "stuck"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn dashcache-scheduler run");
    wait_for_runs(
        &store,
        "the holder's run",
        |r| r.iter().any(|r| r.0 == "stuck" && r.2 == "running"),
        String::new,
    )
    .await;
    // The holder dies without giving its lease back (no renewal either).
    holder.kill().expect("kill");
    holder.wait().expect("wait");
    let mut redis = redis().await;
    assert!(lease_exists(&mut redis, &setup.prefix, "stuck").await);

    // While the dead holder's lease lasts, the job does not run twice.
    let out = setup.command(&["run", "stuck"]);
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stuck: overlap"),
        "{}",
        text(&out)
    );
    let rows = errors(&store, "stuck").await;
    assert_eq!(
        rows.last().map(|r| r.0.as_str()),
        Some("overlap"),
        "{rows:?}"
    );

    // The lease expires after its TTL (5 s) without renewals; then it runs.
    relay.release();
    let mut expired = false;
    for _ in 0..300 {
        if !lease_exists(&mut redis, &setup.prefix, "stuck").await {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(expired, "the dead holder's lease never expired");
    let out = setup.command(&["run", "stuck"]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("stuck: ok (warmed 1"),
        "{}",
        text(&out)
    );
}
