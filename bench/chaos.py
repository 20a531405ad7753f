#!/usr/bin/env python3
"""A repeatable fault run against two dashcache proxies under load (scripts/chaos).

    chaos.py --proxy BIN --config config.toml --ch1 HOST:PORT --ch2 HOST:PORT
             --services scripts/services --ch2-ports HTTP,TCP --workdir DIR
             [--seconds 10] [--after 5] [--conns 32] [--keys 100] [--ttl 15]
             [--report OUT.md]

Everything on loopback. Starts its own Redis (append-only file in DIR, so a stop
and restart keeps the data and a restart "empty" is a deliberate wipe), two TCP
relays in front of the two ClickHouse servers (pass, cut or delay), and two
proxies (A, B) sharing Redis and a key prefix, configured from the shipped
config with one extra query (`chaos`, ttl --ttl seconds, grace 1 h, a cheap
scan of demo.events per key) and a tier without rate limits. It warms --keys
keys, then runs phases of load (--conns keep-alive connections, round-robin over
the live proxies, Zipf s=1 over the warmed keys, 1 % of requests for keys never
seen before), each --seconds of fault plus --after seconds after it ends:

  steady            no fault (the baseline)
  redis_stop        Redis stopped (SIGTERM, its data kept), then started again
  redis_empty       Redis killed, its data wiped, started again empty
  replica_stop      the second ClickHouse stopped (scripts/services down), then up
  clickhouse_down   both relays cut (connections refused), then restored
  clickhouse_slow   both relays delay every answer chunk (10x the query's normal time)
  proxy_kill        B SIGKILLed (restarted after the phase)
  proxy_term_export B SIGTERMed while it streams an export (restarted after the phase)

A request that cannot connect to a proxy is sent to the other one (what a load
balancer does with a refused connection); one cut after it was sent is a failure.
Per phase: requests, failures by status, p50/p99 and their ratio to the steady
phase, ClickHouse queries sent (both proxies' attempts that reached a server),
keys that needed one (warmed keys requested x ceil(phase / ttl), + 1 per key
when Redis came back empty, + the new keys), STALE answers, the most
computations in flight at ClickHouse seen in one proxy. Stops everything it
started, on any exit.
"""
import argparse
import asyncio
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

# ------------------------------------------------------------------------------------------
# helpers


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, p):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


class Conn:
    """One keep-alive HTTP/1.1 connection (bodies read whole, chunked or not)."""

    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None

    async def open(self):
        self.reader, self.writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", self.port), 5)

    def close(self):
        if self.writer:
            self.writer.close()
        self.reader = self.writer = None

    async def get(self, path, headers):
        fresh = self.writer is None
        if fresh:
            await self.open()
        request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        for name, value in headers:
            request += f"{name}: {value}\r\n"
        self.writer.write((request + "\r\n").encode())
        await self.writer.drain()
        line = await self.reader.readline()
        if not line:
            raise EOFError("closed before the status line" if fresh else "stale")
        status = int(line.split(b" ", 2)[1])
        head = {}
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n"):
                break
            if not line:
                raise ConnectionError("closed in the headers")
            name, _, value = line.decode("latin-1").partition(":")
            head[name.strip().lower()] = value.strip()
        body = b""
        if head.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await self.reader.readline()
                if not size_line:
                    raise ConnectionError("chunked body cut")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                body = (await self.reader.readexactly(size + 2))[:-2]
        elif "content-length" in head:
            body = await self.reader.readexactly(int(head["content-length"]))
        if head.get("connection", "").lower() == "close":
            self.close()
        if status != 200:
            # An error's JSON `type` goes with its status in the report.
            try:
                head["x-error-type"] = json.loads(body)["type"]
            except (ValueError, KeyError, TypeError):
                pass
        return status, head


async def fetch(port, path, headers=(), timeout=10):
    conn = Conn(port)
    try:
        return await asyncio.wait_for(conn.get(path, list(headers)), timeout)
    finally:
        conn.close()


async def metrics_text(port):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    return data.decode("utf-8", "replace")


def metric(text, series):
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ------------------------------------------------------------------------------------------
# relays in front of ClickHouse

# In the chaos query's SQL (and no other): how the relays count the queries sent.
QUERY_MARK = b"1000003"


class Relay:
    def __init__(self, target):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self.delay = 0.0
        self.server = None
        self.tasks = set()
        self.queries = 0  # chaos queries that reached this ClickHouse

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", self.port)

    async def cut(self):
        if self.server:
            self.server.close()
            self.server = None
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def handle(self, reader, writer):
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            self.tasks.discard(task)
            return

        async def pipe(src, dst, delayed):
            try:
                while True:
                    data = await src.read(65536)
                    if not data:
                        break
                    if not delayed:
                        self.queries += data.count(QUERY_MARK)
                    if delayed and self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                try:
                    dst.close()
                except Exception:
                    pass

        try:
            await asyncio.gather(pipe(reader, up_writer, False), pipe(up_reader, writer, True))
        except asyncio.CancelledError:
            pass
        finally:
            self.tasks.discard(task)


# ------------------------------------------------------------------------------------------
# the processes


class Processes:
    def __init__(self, args):
        self.args = args
        self.dir = args.workdir
        self.redis = None
        self.redis_port = free_port()
        self.redis_dir = os.path.join(self.dir, "redis")
        self.proxies = {}  # name -> (Popen, port)
        self.ports = {"A": free_port(), "B": free_port()}
        self.config = os.path.join(self.dir, "config.toml")

    def start_redis(self):
        os.makedirs(self.redis_dir, exist_ok=True)
        self.redis = subprocess.Popen(
            ["redis-server", "--port", str(self.redis_port), "--bind", "127.0.0.1",
             "--dir", self.redis_dir, "--save", "", "--appendonly", "yes",
             "--appendfsync", "everysec"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", self.redis_port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop_redis(self, sig=signal.SIGTERM):
        if self.redis and self.redis.poll() is None:
            self.redis.send_signal(sig)
            try:
                self.redis.wait(10)
            except subprocess.TimeoutExpired:
                self.redis.kill()
                self.redis.wait()
        self.redis = None

    def wipe_redis(self):
        shutil.rmtree(self.redis_dir, ignore_errors=True)

    def write_config(self, relays, max_in_flight):
        root = os.path.dirname(os.path.abspath(self.args.config))
        text = open(self.args.config).read()
        urls = [f"http://127.0.0.1:{r.port}" for r in relays]
        text = text.replace(
            'url = "http://127.0.0.1:8123"',
            f'url = "{urls[0]}"\nreplicas = [{{ url = "{urls[0]}" }}, {{ url = "{urls[1]}" }}]', 1)
        text = re.sub(r"^max_in_flight = \d+", f"max_in_flight = {max_in_flight}", text, count=1,
                      flags=re.M)
        text = re.sub(r'^health_interval = "[^"]*"', 'health_interval = "500ms"', text, count=1,
                      flags=re.M)
        text = text.replace('url = "redis://127.0.0.1:6379"',
                            f'url = "redis://127.0.0.1:{self.redis_port}"', 1)
        text = text.replace('key_prefix = "dashcache"', f'key_prefix = "chaos{os.getpid()}"', 1)
        text = re.sub(r'url = "sqlite://[^"]*"', f'url = "sqlite://{self.dir}/control.db"', text,
                      count=1)
        text = text.replace('sql = "sql/', f'sql = "{root}/sql/')
        sql = os.path.join(self.dir, "chaos.sql")
        with open(sql, "w") as f:
            f.write("SELECT count() AS events, uniq(user_id) AS users FROM demo.events "
                    "WHERE user_id % 1000003 = {n}\n")
        text += f"""
[tier.chaos]
requests_per_minute = 100000000
burst = 10000000
max_concurrent_misses = 256
miss_queue = 4096
miss_queue_wait = "10s"
queries = ["*"]
exports = ["*"]
export_max_rows = 0
export_max_bytes = 0

[query.chaos]
sql = "{sql}"
ttl = "{self.args.ttl}s"
grace = "1h"

[query.chaos.params.n]
type = "int"
min = 0
max = 1000000
"""
        with open(self.config, "w") as f:
            f.write(text)

    def add_key(self):
        out = subprocess.run(
            [self.args.proxy, "--config", self.config, "keys", "add", "--tier", "chaos",
             "--tenant", "acme", "--label", "chaos"], capture_output=True, text=True, check=True)
        return out.stdout.strip()

    def start_proxy(self, name):
        port = self.ports[name]
        log = open(os.path.join(self.dir, f"proxy-{name}.log"), "a")
        env = dict(os.environ, RUST_LOG="warn")
        for var in ("DASHCACHE_REDIS_URL", "DASHCACHE_CLICKHOUSE_URL", "DASHCACHE_STORE_URL"):
            env.pop(var, None)
        proc = subprocess.Popen([self.args.proxy, "--config", self.config, "--listen",
                                 f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=log,
                                env=env)
        self.proxies[name] = (proc, port)
        for _ in range(400):
            try:
                with socket.create_connection(("127.0.0.1", port), 0.2) as s:
                    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    if b" 200 " in s.recv(100):
                        return
            except OSError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RuntimeError(f"proxy {name} did not start; see {self.dir}/proxy-{name}.log")

    def live(self, name):
        proc = self.proxies.get(name, (None, 0))[0]
        return proc is not None and proc.poll() is None

    def signal_proxy(self, name, sig):
        proc, _ = self.proxies[name]
        if proc.poll() is None:
            proc.send_signal(sig)

    def replica(self, action):
        http, tcp = self.args.ch2_ports.split(",")
        env = dict(os.environ, DASHCACHE_CH_HTTP_PORT=http, DASHCACHE_CH_TCP_PORT=tcp)
        return subprocess.Popen([self.args.services, action, "clickhouse"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop_all(self):
        for proc, _ in self.proxies.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.stop_redis(signal.SIGKILL)


# ------------------------------------------------------------------------------------------
# load


class Load:
    def __init__(self, procs, key, keys):
        self.procs = procs
        self.headers = [("Authorization", f"Bearer {key}"), ("Accept-Encoding", "gzip")]
        self.keys = keys
        weights = [1 / (i + 1) for i in range(keys)]
        total = sum(weights)
        self.cdf = []
        acc = 0.0
        for w in weights:
            acc += w / total
            self.cdf.append(acc)
        self.next_new = keys + 1000
        self.results = None
        self.running = False
        self.rr = 0

    def path(self, rng):
        if rng.random() < 0.01:
            self.next_new += 1
            return self.next_new, True
        r = rng.random()
        lo, hi = 0, len(self.cdf) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if self.cdf[mid] < r:
                lo = mid + 1
            else:
                hi = mid
        return lo, False

    def targets(self):
        names = [n for n in ("A", "B") if self.procs.live(n)]
        self.rr += 1
        if self.rr % 2 and len(names) > 1:
            names.reverse()
        return names

    async def client(self, i):
        rng = random.Random(i)
        conns = {}
        while self.running:
            n, new = self.path(rng)
            path = f"/v1/query/chaos?n={n}"
            start = time.perf_counter()
            outcome, resent, tried = None, False, set()
            for _ in range(3):
                names = [m for m in self.targets() if m not in tried] or ["A"]
                name = names[0]
                conn = conns.setdefault(name, Conn(self.procs.ports[name]))
                reused = conn.writer is not None
                try:
                    status, head = await asyncio.wait_for(conn.get(path, self.headers), 60)
                    if status != 200 and "x-error-type" in head:
                        status = f"{status} {head['x-error-type']}"
                    outcome = (status, head.get("x-cache", "-"))
                    break
                except ConnectionRefusedError:
                    # Never sent: a load balancer sends it to the other proxy.
                    conn.close()
                    tried.add(name)
                    outcome = ("refused", "-")
                except (EOFError, ConnectionResetError, BrokenPipeError) as err:
                    conn.close()
                    outcome = ("cut", "-")
                    if reused and not resent and not isinstance(err, asyncio.IncompleteReadError):
                        # A keep-alive connection that died before any byte of the
                        # answer (closed idle, or its process killed): sent again
                        # once, as browsers and load balancers do; counted.
                        resent = True
                        continue
                    break
                except (OSError, asyncio.TimeoutError, ValueError):
                    conn.close()
                    outcome = ("cut", "-")
                    break
            ms = (time.perf_counter() - start) * 1000
            if self.results is not None:
                self.results.append((outcome[0], outcome[1], ms, n, new, resent))
            if outcome[0] != 200:
                await asyncio.sleep(0.01)
        for conn in conns.values():
            conn.close()


# ------------------------------------------------------------------------------------------
# the run


async def sample_in_flight(procs, stop, seen):
    while not stop.is_set():
        for name in ("A", "B"):
            if procs.live(name):
                try:
                    text = await metrics_text(procs.ports[name])
                    seen[0] = max(seen[0], metric(text, "dashcache_clickhouse_in_flight"))
                except (OSError, asyncio.TimeoutError):
                    pass
        await asyncio.sleep(0.1)


def sent(relays):
    return sum(r.queries for r in relays)


async def export_during_term(procs, key):
    """Streams an export from B, SIGTERMs B after its first bytes, reads to the end."""
    port = procs.ports["B"]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    path = "/v1/export/events?from=today-3d&to=today&format=ndjson"
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                 "Connection: close\r\n\r\n".encode())
    await writer.drain()
    received, signalled, last = 0, False, b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 60)
            if not data:
                break
            received += len(data)
            last = (last + data)[-4096:]
            if not signalled and received > 1_000_000:
                procs.signal_proxy("B", signal.SIGTERM)
                signalled = True
                await asyncio.sleep(0.2)  # read slowly for a moment: the drain must wait for us
    except (OSError, asyncio.TimeoutError) as err:
        return {"bytes": received, "complete": False, "error": str(err)}
    finally:
        writer.close()
    complete = last.endswith(b"0\r\n\r\n") and b'"error"' not in last
    return {"bytes": received, "complete": complete, "error": ""}


async def run(args):
    procs = Processes(args)
    relays = [Relay(args.ch1), Relay(args.ch2)]
    report = []
    try:
        for r in relays:
            await r.start()
        procs.start_redis()
        procs.write_config(relays, args.max_in_flight)
        key = procs.add_key()
        procs.start_proxy("A")
        procs.start_proxy("B")
        headers = [("Authorization", f"Bearer {key}")]

        # warm every key (and time one computation: the slow phase's delay is 9x more)
        computes = []
        for n in range(args.keys):
            start = time.perf_counter()
            status, head = await fetch(procs.ports["A"], f"/v1/query/chaos?n={n}", headers, 60)
            if status != 200:
                raise RuntimeError(f"warming key {n}: HTTP {status}")
            if head.get("x-cache") == "MISS":
                computes.append(time.perf_counter() - start)
        compute_s = pct(computes, 50)
        load = Load(procs, key, args.keys)
        load.running = True
        clients = [asyncio.create_task(load.client(i)) for i in range(args.conns)]
        await asyncio.sleep(1)

        phases = ["steady", "redis_stop", "redis_empty", "replica_stop", "clickhouse_down",
                  "clickhouse_slow", "proxy_kill", "proxy_term_export"]
        if args.phases:
            phases = ["steady"] + [p for p in args.phases.split(",") if p != "steady"]
        steady = None
        for phase in phases:
            note = ""
            before = sent(relays)
            load.results = []
            stop, seen = asyncio.Event(), [0.0]
            sampler = asyncio.create_task(sample_in_flight(procs, stop, seen))
            t0 = time.perf_counter()
            export = None
            # Blocking steps run in a thread: the relays and the load share this loop.
            if phase == "redis_stop":
                await asyncio.to_thread(procs.stop_redis, signal.SIGTERM)
            elif phase == "redis_empty":
                await asyncio.to_thread(procs.stop_redis, signal.SIGKILL)
                procs.wipe_redis()
            elif phase == "replica_stop":
                await asyncio.to_thread(lambda: procs.replica("down").wait())
            elif phase == "clickhouse_down":
                for r in relays:
                    await r.cut()
            elif phase == "clickhouse_slow":
                for r in relays:
                    r.delay = 9 * compute_s
                note = f"every answer chunk delayed {9 * compute_s * 1000:.0f} ms (query p50 {compute_s * 1000:.0f} ms)"
            elif phase == "proxy_kill":
                procs.signal_proxy("B", signal.SIGKILL)
            elif phase == "proxy_term_export":
                export = asyncio.create_task(export_during_term(procs, key))
            await asyncio.sleep(args.seconds)
            # the fault ends
            if phase in ("redis_stop", "redis_empty"):
                await asyncio.to_thread(procs.start_redis)
            elif phase == "replica_stop":
                # Until it answers again (its start-up is part of this phase).
                await asyncio.to_thread(lambda: procs.replica("up").wait())
            elif phase == "clickhouse_down":
                for r in relays:
                    await r.start()
            elif phase == "clickhouse_slow":
                for r in relays:
                    r.delay = 0.0
            await asyncio.sleep(args.after)
            if export is not None:
                result = await export
                proc = procs.proxies["B"][0]
                try:
                    code = await asyncio.to_thread(proc.wait, 40)
                except subprocess.TimeoutExpired:
                    code = "still running"
                note = (f"export {result['bytes']:,} bytes, complete: {result['complete']}, "
                        f"B exited {code}{' ' + result['error'] if result['error'] else ''}")
            elapsed = time.perf_counter() - t0
            stop.set()
            await sampler
            results, load.results = load.results, None
            queries = sent(relays) - before
            if phase in ("proxy_kill", "proxy_term_export"):
                await asyncio.to_thread(procs.start_proxy, "B")
            row = summarize(phase, results, queries, elapsed, args, seen[0], note)
            if phase == "steady":
                steady = row
            row["p50_x"] = row["p50"] / steady["p50"] if steady and steady["p50"] else 0
            row["p99_x"] = row["p99"] / steady["p99"] if steady and steady["p99"] else 0
            report.append(row)
            print(f"CHAOS {phase} " + " ".join(f"{k}={v}" for k, v in row.items()
                                                if k not in ("phase", "note")), flush=True)
        load.running = False
        await asyncio.gather(*clients)
    finally:
        procs.stop_all()
        if args.ch2_ports:
            # a stopped replica must come back even if the run failed
            procs.replica("up").wait()
        for r in relays:
            await r.cut()
    write_report(report, args)


def summarize(phase, results, queries, elapsed, args, in_flight, note):
    # Latency of the warmed keys' requests (99 % of the load): the new keys'
    # misses are ClickHouse's latency, counted in queries and failures.
    ok = [r for r in results if r[0] == 200 and not r[4]]
    failures = {}
    for r in results:
        if r[0] != 200:
            kind = f"{r[0]}{' new key' if r[4] else ''}"
            failures[kind] = failures.get(kind, 0) + 1
    ms = [r[2] for r in ok]
    warm = {r[3] for r in results if not r[4]}
    new = {r[3] for r in results if r[4]}
    needed = len(warm) * math.ceil(elapsed / args.ttl) + len(new)
    if phase == "redis_empty":
        needed += len(warm)
    return {
        "phase": phase,
        "requests": len(results),
        "failed": sum(failures.values()),
        "failed_cached": sum(1 for r in results if r[0] != 200 and not r[4]),
        "by_status": ",".join(f"{k}:{v}" for k, v in sorted(failures.items())) or "-",
        "p50": round(pct(ms, 50), 2),
        "p99": round(pct(ms, 99), 2),
        "queries": int(queries),
        "needed": needed,
        "stale": sum(1 for r in results if r[1] == "STALE"),
        "resent": sum(1 for r in results if r[5]),
        "in_flight_max": int(in_flight),
        "new_keys": len(new),
        "seconds": round(elapsed, 1),
        "note": note,
    }


def write_report(rows, args):
    out = []
    w = out.append
    w(f"| fault ({args.seconds} s + {args.after} s after) | requests | failed: cached keys / all (by status) | p50 ms (x steady) "
      f"| p99 ms (x steady) | ClickHouse queries sent / keys needing one | STALE | max in flight (limit {args.max_in_flight}) | resent | new keys |")
    w("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w(f"| {r['phase']} | {r['requests']:,} | {r['failed_cached']} / {r['failed']} ({r['by_status']}) | "
          f"{r['p50']} ({r['p50_x']:.2f}) | {r['p99']} ({r['p99_x']:.2f}) | "
          f"{r['queries']} / {r['needed']} | {r['stale']:,} | {r['in_flight_max']} | {r['resent']} | {r['new_keys']} |")
    notes = [f"- {r['phase']}: {r['note']}" for r in rows if r["note"]]
    if notes:
        w("")
        out.extend(notes)
    text = "\n".join(out) + "\n"
    print(text)
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--proxy", required=True)
    p.add_argument("--config", required=True)
    p.add_argument("--ch1", required=True)
    p.add_argument("--ch2", required=True)
    p.add_argument("--ch2-ports", required=True)
    p.add_argument("--services", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--seconds", type=float, default=10)
    p.add_argument("--after", type=float, default=5)
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--keys", type=int, default=100)
    p.add_argument("--ttl", type=int, default=15)
    p.add_argument("--max-in-flight", type=int, default=8)
    p.add_argument("--phases", default="")
    p.add_argument("--report", default="")
    args = p.parse_args()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: [t.cancel() for t in asyncio.all_tasks(loop)])
    try:
        loop.run_until_complete(run(args))
    except asyncio.CancelledError:
        sys.exit(130)


if __name__ == "__main__":
    main()
