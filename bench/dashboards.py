#!/usr/bin/env python3
"""Simulated analytics dashboards against one dashcache proxy (scenario 8 of scripts/bench).

    dashboards.py --port PORT --keys FILE --ttl SECONDS [--dashboards N] [--seconds S]
                  [--conns C] [--seed N] [--now-step SECONDS] --report OUT.md
                  [-- SCHEDULER-COMMAND...]

N dashboards (default 36) of 12 panels each. Every dashboard is a copy of one of a few
templates (the panel sets below) and belongs to one tenant; FILE has one `TENANT KEY`
line per tenant, and dashboard i is tenant i mod T, template (i div T) mod templates,
so several dashboards share every panel set and distinct answers << requests.

All dashboards load all their panels at the same instant (the cold start), then each
refreshes all of its panels every 30-60 s (its own interval, drawn once, each refresh
jittered by +-10 %) until S seconds (default 240) have passed. A dashboard talks to the
proxy as a browser does over HTTP/1.1: C keep-alive connections (default 6), panels
queued on them, `Accept-Encoding: gzip`; a stale keep-alive connection is reopened and
the request sent again once (as browsers do), anything else that is not a complete 200
with a JSON body is a failed request.

The SCHEDULER-COMMAND after `--` (e.g. `dashcache-scheduler run popular --config F`) is
run at every UTC minute boundary after the cold start, one run at a time, like a
scheduler whose job fires every minute; its last output line (`popular: ok (warmed N,
still fresh M, failed F, B bytes)`) says how many ClickHouse queries it ran.

The proxy's /metrics is read before, after the cold start, at every minute boundary and
at the end (ClickHouse queries, early refreshes, refresh failures). Writes markdown to
OUT.md (phase table, per-minute table, the keys that were not HITs, failures) and prints
one line `DASHBOARDS key=value ...` with the numbers scripts/bench puts in its summary.
"""
import argparse
import asyncio
import gzip
import json
import os
import random
import re
import signal
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timezone

# ------------------------------------------------------------------------------------------
# the panels

# Time ranges as dashboards offer them: (name, from, to, span in seconds at most).
RANGES = {
    "1h": ("now-1h", "now", 3600),
    "24h": ("now-24h", "now", 86400),
    "7d": ("now-7d", "now", 7 * 86400),
    "30d": ("now-30d", "now", 30 * 86400),
    "today": ("today", "now", 86400),
    "yesterday": ("yesterday", "today", 86400),
    "month": ("start_of_month", "now", 31 * 86400),
}
# The catalog's range rules (config.toml): revenue's max span per granularity, top_countries'.
MAX_SPAN = {"minute": 86400, "hour": 31 * 86400, "day": 400 * 86400, "month": 1826 * 86400}
TOP_COUNTRIES_MAX_SPAN = 400 * 86400


def revenue(rng, granularity, country=None, plan=None):
    f, t, _ = RANGES[rng]
    path = f"/v1/query/revenue?from={f}&to={t}&granularity={granularity}"
    if country:
        path += f"&country={country}"
    if plan:
        path += f"&plan={plan}"
    return path


def top_countries(rng, limit):
    f, t, _ = RANGES[rng]
    return f"/v1/query/top_countries?from={f}&to={t}&limit={limit}"


def active_users(window):
    return f"/v1/query/active_users?window={window}"


# A few dashboard templates of 12 panels; every dashboard is a copy of one.
TEMPLATES = {
    "live": [
        revenue("1h", "minute"),
        revenue("1h", "minute", country="US"),
        revenue("1h", "minute", country="DE"),
        revenue("1h", "minute", plan="enterprise"),
        revenue("24h", "minute"),  # exactly revenue's 1-day limit for minutes
        revenue("24h", "hour"),
        revenue("today", "hour"),
        revenue("yesterday", "hour"),
        top_countries("1h", 5),
        top_countries("today", 10),
        active_users("hour"),
        active_users("day"),
    ],
    "daily": [
        revenue("24h", "hour"),
        revenue("24h", "hour", country="US"),
        revenue("24h", "hour", country="FR,GB"),
        revenue("24h", "hour", plan="enterprise,pro"),
        revenue("today", "hour"),
        revenue("yesterday", "hour"),
        revenue("7d", "day"),
        revenue("1h", "minute"),
        top_countries("24h", 10),
        top_countries("yesterday", 10),
        active_users("hour"),
        active_users("day"),
    ],
    "weekly": [
        revenue("7d", "day"),
        revenue("7d", "day", country="US"),
        revenue("7d", "day", country="DE"),
        revenue("7d", "day", plan="enterprise"),
        revenue("7d", "hour"),
        revenue("30d", "day"),
        revenue("today", "hour"),
        revenue("yesterday", "hour"),
        revenue("month", "day"),
        top_countries("7d", 5),
        top_countries("30d", 10),
        active_users("day"),
    ],
    "monthly": [
        revenue("30d", "day"),
        revenue("30d", "day", country="US"),
        revenue("30d", "day", country="DE,FR,GB"),
        revenue("30d", "day", plan="free"),
        revenue("30d", "hour"),  # 30 days of hours: under the 31-day limit
        revenue("30d", "month"),
        revenue("month", "day"),
        revenue("month", "hour"),
        revenue("7d", "day"),
        top_countries("30d", 10),
        top_countries("month", 20),
        active_users("day"),
    ],
    "exec": [
        revenue("month", "day"),
        revenue("month", "month"),
        revenue("yesterday", "hour"),
        revenue("yesterday", "hour", country="US"),
        revenue("today", "hour"),
        revenue("today", "minute"),
        revenue("30d", "day", country="US"),
        revenue("24h", "hour", plan="enterprise"),
        top_countries("month", 5),
        top_countries("yesterday", 5),
        active_users("hour"),
        active_users("day"),
    ],
}


def check_templates():
    """Every panel within the catalog's range rules (the proxy would answer 422)."""
    spans = {f"from={f}&to={t}": span for f, t, span in RANGES.values()}
    for name, panels in TEMPLATES.items():
        assert len(panels) == 12, f"template {name} has {len(panels)} panels"
        assert len(set(panels)) == 12, f"template {name} repeats a panel"
        for p in panels:
            span = next((s for r, s in spans.items() if r in p), None)
            if "/revenue?" in p:
                g = re.search(r"granularity=(\w+)", p).group(1)
                assert span <= MAX_SPAN[g], f"{p}: wider than revenue's {g} limit"
            elif "/top_countries?" in p:
                assert span <= TOP_COUNTRIES_MAX_SPAN, p


# ------------------------------------------------------------------------------------------
# HTTP/1.1 over asyncio streams


class StaleConnection(Exception):
    """A reused keep-alive connection was closed before any byte of the answer."""


class Conn:
    def __init__(self, host, port):
        self.host, self.port = host, port
        self.reader = self.writer = None
        self.used = False

    async def open(self):
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port), 10)
        self.used = False

    def close(self):
        if self.writer:
            self.writer.close()
        self.reader = self.writer = None

    async def get(self, path, headers):
        """One GET: (status, headers (lower-case names), body bytes as sent)."""
        if self.writer is None:
            await self.open()
        reused = self.used
        self.used = True
        request = f"GET {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        for name, value in headers:
            request += f"{name}: {value}\r\n"
        self.writer.write((request + "\r\n").encode())
        try:
            await self.writer.drain()
            line = await self.reader.readline()
        except (ConnectionError, asyncio.IncompleteReadError) as err:
            if reused:
                raise StaleConnection() from err
            raise
        if not line:
            if reused:
                raise StaleConnection()
            raise ConnectionError("connection closed before the status line")
        parts = line.split(b" ", 2)
        status = int(parts[1])
        head = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionError("connection closed in the headers")
            name, _, value = line.decode("latin-1").partition(":")
            head[name.strip().lower()] = value.strip()
        body = b""
        if head.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size_line = await self.reader.readline()
                if not size_line:
                    raise ConnectionError("chunked body cut (no final chunk)")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        elif "content-length" in head:
            body = await self.reader.readexactly(int(head["content-length"]))
        elif status not in (204, 304):
            body = await self.reader.read(-1)
            self.close()
        if head.get("connection", "").lower() == "close":
            self.close()
        return status, head, body


# ------------------------------------------------------------------------------------------
# the run


class Run:
    def __init__(self, args, keys):
        self.args = args
        self.keys = keys  # [(tenant, key)]
        self.results = []  # dicts, one per request
        self.t0 = None
        self.cold_end = None
        self.first_loads_left = args.dashboards
        self.cold_done = asyncio.Event()
        self.samples = []  # (time, {metric: value})
        self.sched_runs = []  # dicts
        self.failures = []

    # --- metrics

    async def metrics(self):
        conn = Conn("127.0.0.1", self.args.port)
        try:
            status, _, body = await asyncio.wait_for(conn.get("/metrics", []), 10)
        finally:
            conn.close()
        values = defaultdict(float)
        for line in body.decode().splitlines():
            if not line or line[0] == "#":
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                values[name] += float(value)
            except ValueError:
                continue
            m = re.match(r'dashcache_cache_requests_total\{result="(\w+)"\}', name_labels)
            if m:
                values["cache." + m.group(1)] += float(value)
        return values

    async def server_selects(self):
        """ClickHouse's own count of SELECTs (system.events): every client of the server."""
        host, port = self.args.clickhouse.split("//", 1)[-1].rstrip("/").rsplit(":", 1)
        conn = Conn(host, int(port))
        sql = "SELECT%20value%20FROM%20system.events%20WHERE%20event%20%3D%20%27SelectQuery%27"
        try:
            status, _, body = await asyncio.wait_for(conn.get(f"/?query={sql}", []), 10)
        finally:
            conn.close()
        return float(body.strip() or 0) if status == 200 else float("nan")

    async def sample(self, label):
        try:
            values = await self.metrics()
            if self.args.clickhouse:
                values["server.selects"] = await self.server_selects()
        except Exception as err:  # a missing sample shows as a gap, not a crash
            print(f"dashboards: /metrics failed at {label}: {err!r}", file=sys.stderr)
            return
        self.samples.append((time.time(), label, values))

    # --- one dashboard

    async def dashboard(self, i):
        args = self.args
        rnd = random.Random(args.seed * 1000 + i)
        tenant, key = self.keys[i % len(self.keys)]
        names = list(TEMPLATES)
        template = names[(i // len(self.keys)) % len(names)]
        panels = TEMPLATES[template]
        headers = [("Authorization", f"Bearer {key}"), ("Accept-Encoding", "gzip"),
                   ("User-Agent", f"dashboards.py/{i}")]
        pool = asyncio.Queue()
        for _ in range(args.conns):
            pool.put_nowait(Conn("127.0.0.1", args.port))
        interval = rnd.uniform(30, 60)
        end = self.t0 + args.seconds
        load = 0
        at = self.t0
        try:
            while True:
                phase = "cold" if load == 0 else "steady"
                await asyncio.gather(*(self.panel(pool, headers, p, tenant, template, i, phase)
                                       for p in panels))
                if load == 0:
                    self.first_loads_left -= 1
                    if self.first_loads_left == 0:
                        self.cold_end = time.time()
                        self.cold_done.set()
                load += 1
                at += interval * rnd.uniform(0.9, 1.1)
                if at >= end:
                    break
                await asyncio.sleep(max(0.0, at - time.time()))
        finally:
            while not pool.empty():
                pool.get_nowait().close()

    async def panel(self, pool, headers, path, tenant, template, dash, phase):
        conn = await pool.get()
        started = time.time()
        r = {"t": started, "phase": phase, "tenant": tenant, "path": path, "dash": dash,
             "template": template, "status": 0, "cache": "-", "age": None, "range": None,
             "reconnects": 0, "error": None}
        try:
            for attempt in (1, 2):
                try:
                    status, head, body = await asyncio.wait_for(conn.get(path, headers), 60)
                    break
                except StaleConnection:
                    conn.close()
                    r["reconnects"] += 1
                    if attempt == 2:
                        raise
            r["status"] = status
            r["cache"] = head.get("x-cache", "-")
            if "age" in head:
                r["age"] = int(head["age"])
            r["range"] = head.get("x-time-range")
            if status == 200:
                data = gzip.decompress(body) if head.get("content-encoding") == "gzip" else body
                doc = json.loads(data)
                if "data" not in doc or "rows" not in doc:
                    raise ValueError("a 200 JSON body without data/rows")
                r["rows"] = doc["rows"]
            else:
                r["error"] = body[:300].decode("utf-8", "replace")
        except Exception as err:
            conn.close()
            r["error"] = f"{type(err).__name__}: {err}"[:300]
            if r["status"] == 200:
                r["status"] = -1  # a 200 whose body did not arrive whole or did not parse
        finally:
            pool.put_nowait(conn)
        r["ms"] = (time.time() - started) * 1000
        self.results.append(r)

    # --- the scheduler, every minute

    async def scheduler(self, command):
        await self.cold_done.wait()
        end = self.t0 + self.args.seconds
        while True:
            boundary = (int(time.time()) // 60 + 1) * 60
            if boundary >= end:
                return
            await asyncio.sleep(boundary - time.time())
            started = time.time()
            env = dict(os.environ, RUST_LOG=os.environ.get("BENCH_SCHED_RUST_LOG", "warn"))
            proc = await asyncio.create_subprocess_exec(
                *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
            self.sched_proc = proc
            out, _ = await proc.communicate()
            self.sched_proc = None
            text = out.decode("utf-8", "replace").strip()
            last = text.splitlines()[-1] if text else ""
            m = re.search(r"warmed (\d+), still fresh (\d+), failed (\d+)", last)
            run = {"t": started, "secs": time.time() - started, "rc": proc.returncode,
                   "warmed": int(m.group(1)) if m else 0, "fresh": int(m.group(2)) if m else 0,
                   "failed": int(m.group(3)) if m else 0, "line": last}
            self.sched_runs.append(run)
            print(f"dashboards: scheduler run at {hhmmss(started)}: {last}", file=sys.stderr)
            if proc.returncode != 0 or not m:
                print(text[-2000:], file=sys.stderr)

    async def minute_samples(self):
        end = self.t0 + self.args.seconds
        while True:
            boundary = (int(time.time()) // 60 + 1) * 60
            if boundary >= end:
                return
            await asyncio.sleep(boundary - time.time())
            await self.sample(f"minute {hhmm(boundary)}")

    async def main(self, command):
        self.sched_proc = None
        await self.sample("start")
        self.t0 = time.time()
        dashboards = [asyncio.create_task(self.dashboard(i)) for i in range(self.args.dashboards)]
        helpers = [asyncio.create_task(self.minute_samples())]
        if command:
            helpers.append(asyncio.create_task(self.scheduler(command)))
        await self.cold_done.wait()
        await self.sample("cold end")
        await asyncio.gather(*dashboards)
        self.t_end = time.time()
        await asyncio.gather(*helpers)
        await asyncio.sleep(1)  # background refreshes the last requests started
        await self.sample("end")


def hhmm(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M")


def hhmmss(t):
    return datetime.fromtimestamp(t, timezone.utc).strftime("%H:%M:%S")


def pct(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def parse_iso(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc).timestamp()


def sample_at(samples, label):
    for _, l, v in samples:
        if l == label:
            return v
    return None


# ------------------------------------------------------------------------------------------
# the report


def report(run, out_path):
    args = run.args
    ttl = args.ttl
    res = run.results
    ok = lambda r: r["status"] == 200
    distinct = {(r["tenant"], r["path"]) for r in res}
    ttl_min = ttl / 60
    s_start, s_cold, s_end = (sample_at(run.samples, l) for l in ("start", "cold end", "end"))
    chq = lambda a, b: int(b["dashcache_clickhouse_queries_total"] - a["dashcache_clickhouse_queries_total"]) \
        if a is not None and b is not None else None
    sched_warmed = sum(s["warmed"] for s in run.sched_runs)
    sched_failed_runs = sum(1 for s in run.sched_runs if s["rc"] != 0)
    cold_secs = run.cold_end - run.t0
    steady_secs = run.t_end - run.cold_end
    sched_label = " ".join([os.path.basename(run.command[0])] + run.command[1:3]) if run.command else ""
    out = {}
    lines = []
    w = lines.append

    def phase_row(name, rs, ch, minutes, rates=True):
        n = len(rs)
        caches = Counter(r["cache"] for r in rs if ok(r))
        failed = Counter(r["status"] for r in rs if not ok(r))
        hits = caches.get("HIT", 0)
        hitp = 100 * hits / n if n else 0
        lat = [r["ms"] for r in rs if ok(r)]
        old = sum(1 for r in rs if ok(r) and r["age"] is not None and r["age"] > ttl)
        fail_text = ", ".join(f"{k}: {v}" for k, v in sorted(failed.items())) or "0"
        per_min = ch / minutes if rates and ch is not None and minutes > 0 else None
        w(f"| {name} | {n} | {fail_text} | {hitp:.2f} | {hits} / {caches.get('STALE', 0)} / "
          f"{caches.get('MISS', 0)} / {caches.get('COALESCED', 0)} | {pct(lat, 50):.1f} | "
          f"{pct(lat, 99):.1f} | {ch if ch is not None else 'n/a'} | "
          f"{f'{per_min:.1f}' if per_min is not None else '—'} | "
          f"{f'{len(distinct) / ttl_min:.1f}' if rates else '—'} | {old} |")
        ages = [r["age"] for r in rs if ok(r) and r["age"] is not None]
        return {"requests": n, "failed": sum(failed.values()), "hit": hitp, "old": old,
                "max_age": max(ages) if ages else 0,
                "p50": pct(lat, 50), "p99": pct(lat, 99), "chq": ch, "chq_min": per_min,
                "stale": caches.get("STALE", 0), "miss": caches.get("MISS", 0),
                "coalesced": caches.get("COALESCED", 0)}

    cold = [r for r in res if r["phase"] == "cold"]
    steady = [r for r in res if r["phase"] == "steady"]
    ch_cold = chq(s_start, s_cold)
    ch_steady_proxy = chq(s_cold, s_end)
    ch_steady = ch_steady_proxy + sched_warmed if ch_steady_proxy is not None else None
    w(f"{args.dashboards} dashboards x 12 panels ({len(TEMPLATES)} templates: {', '.join(TEMPLATES)}; "
      f"{len(run.keys)} tenants: {', '.join(t for t, _ in run.keys)}, one enterprise key each), "
      f"{args.conns} keep-alive connections per dashboard, refresh every 30-60 s (+-10 % jitter) "
      f"for {args.seconds:.0f} s; ttl {ttl:.0f} s for every query; "
      + (f"`{sched_label}` at every minute boundary after the cold start ({len(run.sched_runs)} runs, "
         f"{sched_warmed} keys computed, {sched_failed_runs} failed runs). " if run.command
         else "no scheduler (the proxy's own refreshes only). ")
      + f"{len(distinct)} distinct answers (tenant x panel) for {len(res)} requests.")
    w("")
    w("| phase | requests | failed (status: count) | HIT % | HIT / STALE / MISS / COALESCED | "
      "p50 ms | p99 ms | ClickHouse queries | per minute | distinct keys / ttl-min | Age > ttl |")
    w("|---|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    out["cold"] = phase_row(f"cold start ({cold_secs:.1f} s)", cold, ch_cold, cold_secs / 60, rates=False)
    out["steady"] = phase_row(f"steady state ({steady_secs:.0f} s)", steady, ch_steady, steady_secs / 60)
    w("")
    w(f"ClickHouse queries: the proxy's `dashcache_clickhouse_queries_total` (cold start: {ch_cold}; "
      f"steady state: {ch_steady_proxy}) plus the keys the scheduler's runs computed ({sched_warmed}). "
      f"Per minute of the steady state: {out['steady']['chq_min'] or 0:.1f}, against distinct keys / ttl-minutes "
      f"= {len(distinct)} / {ttl_min:g} = {len(distinct) / ttl_min:.1f}.")
    out["distinct"] = len(distinct)
    out["target_min"] = len(distinct) / ttl_min

    # X-Time-Range: relative answers really move, and cover the range as of at most ttl + now_step ago
    lags, moved, range_keys, over = [], 0, 0, 0
    ranges = defaultdict(set)
    for r in res:
        if ok(r) and r["range"] and "to=now" in r["path"]:
            to = parse_iso(r["range"].split("/")[1])
            lag = r["t"] - to
            lags.append(lag)
            if lag > ttl + args.now_step + 1:
                over += 1
            ranges[(r["tenant"], r["path"])].add(r["range"])
    range_keys = len(ranges)
    moved = sum(1 for v in ranges.values() if len(v) > 1)
    w(f"X-Time-Range of the `to=now` panels: {len(lags)} answers, end of range at most "
      f"{max(lags) if lags else 0:.0f} s behind the request (bound: ttl + now_step = {ttl + args.now_step:.0f} s; "
      f"{over} over it); {moved} of {range_keys} such keys were answered with more than one range "
      f"(the key stays, the range moves).")
    out["range_over"] = over

    # per minute
    w("")
    w("Per UTC minute (requests by the minute they started; proxy CH queries: delta of its counter between the "
      "minute samples; scheduler: its run at the start of the minute; server SELECTs: ClickHouse's own "
      "`SelectQuery` counter, every client of the server, including health checks):")
    w("")
    w("| minute | requests | HIT | STALE | MISS | COALESCED | failed | Age > ttl | proxy CH queries | "
      "early refreshes | scheduler (computed / still fresh) | server SELECTs | p99 ms |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    by_min = defaultdict(list)
    for r in res:
        by_min[int(r["t"] // 60)].append(r)
    marks = sorted((t, v) for t, _, v in run.samples)
    for m in sorted(by_min):
        rs = by_min[m]
        c = Counter(r["cache"] for r in rs if ok(r))
        # counter deltas between the samples bracketing this minute
        lo = [v for t, v in marks if t <= m * 60 + 1] or [marks[0][1]]
        hi = [v for t, v in marks if t >= (m + 1) * 60 - 1] or [marks[-1][1]]
        dq = int(hi[0]["dashcache_clickhouse_queries_total"] - lo[-1]["dashcache_clickhouse_queries_total"])
        de = int(hi[0].get("dashcache_early_refreshes_total", 0) - lo[-1].get("dashcache_early_refreshes_total", 0))
        ds = hi[0].get("server.selects", float("nan")) - lo[-1].get("server.selects", float("nan"))
        ds = "—" if ds != ds else int(ds)
        sr = [s for s in run.sched_runs if int(s["t"] // 60) == m]
        sched = ", ".join(f"{s['warmed']} / {s['fresh']} in {s['secs']:.1f} s"
                          + (f" ({s['failed']} failed)" if s["failed"] else "") for s in sr) or "—"
        old = sum(1 for r in rs if ok(r) and r["age"] is not None and r["age"] > ttl)
        w(f"| {hhmm(m * 60)} | {len(rs)} | {c.get('HIT', 0)} | {c.get('STALE', 0)} | {c.get('MISS', 0)} | "
          f"{c.get('COALESCED', 0)} | {sum(1 for r in rs if not ok(r))} | {old} | {dq} | {de} | {sched} | {ds} | "
          f"{pct([r['ms'] for r in rs if ok(r)], 99):.1f} |")

    # the steady state's answers that were not HITs
    not_hit = defaultdict(list)
    for r in steady:
        if ok(r) and r["cache"] != "HIT":
            not_hit[(r["tenant"], r["path"])].append(r)
    if not_hit:
        w("")
        w(f"Steady-state answers that were not HITs, by key ({len(not_hit)} keys; the 15 with most):")
        w("")
        w("| tenant | panel | answers (x-cache @ UTC time, Age s) |")
        w("|---|---|---|")
        for (tenant, path), rs in sorted(not_hit.items(), key=lambda kv: -len(kv[1]))[:15]:
            w(f"| {tenant} | `{path}` | " + ", ".join(
                f"{r['cache']} @ {hhmmss(r['t'])}" + (f" Age {r['age']}" if r["age"] is not None else "")
                for r in rs[:6]) + (" …" if len(rs) > 6 else "") + " |")
    failed = [r for r in res if not ok(r)]
    if failed:
        w("")
        w(f"Failed requests ({len(failed)}; the first 10):")
        w("")
        for r in failed[:10]:
            w(f"- {hhmmss(r['t'])} {r['phase']} {r['tenant']} `{r['path']}`: status {r['status']}: "
              f"{(r['error'] or '').replace('|', '/')}")
    reconnects = sum(r["reconnects"] for r in res)
    if reconnects:
        w("")
        w(f"{reconnects} requests found their keep-alive connection closed and were sent again on a new one.")
    with open(out_path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--keys", required=True, help="file of `TENANT KEY` lines")
    ap.add_argument("--ttl", type=float, required=True, help="the queries' ttl in seconds")
    ap.add_argument("--now-step", type=float, default=60)
    ap.add_argument("--dashboards", type=int, default=36)
    ap.add_argument("--seconds", type=float, default=240)
    ap.add_argument("--conns", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--report", required=True)
    ap.add_argument("--clickhouse", default="", help="ClickHouse HTTP URL: its SelectQuery counter is sampled too")
    argv = sys.argv[1:]
    command = []
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    args = ap.parse_args(argv)
    check_templates()
    keys = []
    with open(args.keys) as f:
        for line in f:
            if line.strip():
                tenant, key = line.split()
                keys.append((tenant, key))
    if not keys:
        sys.exit("dashboards: no keys")

    run = Run(args, keys)
    run.command = command

    async def go():
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await run.main(command)
        finally:
            if getattr(run, "sched_proc", None) and run.sched_proc.returncode is None:
                run.sched_proc.terminate()
                await run.sched_proc.wait()

    try:
        asyncio.run(go())
    except asyncio.CancelledError:
        sys.exit("dashboards: stopped")
    out = report(run, args.report)
    c, s = out["cold"], out["steady"]
    print(f"DASHBOARDS requests={len(run.results)} distinct={out['distinct']} "
          f"cold_requests={c['requests']} cold_failed={c['failed']} cold_hit={c['hit']:.2f} cold_p99_ms={c['p99']:.1f} "
          f"cold_chq={c['chq']} steady_requests={s['requests']} steady_failed={s['failed']} "
          f"steady_hit={s['hit']:.2f} steady_stale={s['stale']} steady_miss={s['miss']} "
          f"steady_p50_ms={s['p50']:.1f} steady_p99_ms={s['p99']:.1f} steady_chq_min={s['chq_min'] or 0:.1f} "
          f"target_chq_min={out['target_min']:.1f} steady_old={s['old']} steady_max_age={s['max_age']} cold_old={c['old']} "
          f"range_over={out['range_over']} sched_runs={len(run.sched_runs)}", flush=True)


if __name__ == "__main__":
    main()
