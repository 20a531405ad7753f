#!/usr/bin/env python3
"""Fires N requests for one URL path at once, spread over one or more servers.

    stampede.py N PATH HOST:PORT [HOST:PORT ...] [--header "Name: value"]

Opens all N connections first (round-robin over the servers), then releases every
request at the same instant and reads each answer to the end (`Connection: close`).
Prints `STAMPEDE n=N ok=K p50_ms=.. p99_ms=.. max_ms=.. x_cache=MISS:1,COALESCED:511`.
"""
import asyncio
import sys
import time


async def main():
    args = sys.argv[1:]
    header = None
    if "--header" in args:
        i = args.index("--header")
        header = args[i + 1] or None
        del args[i:i + 2]
    n, path, servers = int(args[0]), args[1], args[2:]
    go = asyncio.Event()
    ready = [0]

    async def one(i):
        host, port = servers[i % len(servers)].rsplit(":", 1)
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 10)
        finally:
            ready[0] += 1
        request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        if header:
            request += header + "\r\n"
        request = (request + "\r\n").encode()
        await go.wait()
        start = time.perf_counter()
        try:
            writer.write(request)
            await writer.drain()
            data = await asyncio.wait_for(reader.read(-1), 60)
        finally:
            writer.close()
        elapsed = time.perf_counter() - start
        head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        status = int(head[0].split(b" ", 2)[1]) if head and head[0] else 0
        cache = "-"
        for line in head[1:]:
            if line.lower().startswith(b"x-cache:"):
                cache = line.split(b":", 1)[1].strip().decode()
        return status, cache, elapsed

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    # every connection established (or failed) before the requests are released; at most 15 s
    for _ in range(1500):
        if ready[0] >= n:
            break
        await asyncio.sleep(0.01)
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException) and r[0] == 200]
    times = sorted(r[2] * 1000 for r in ok) or [0.0]
    pct = lambda p: times[min(len(times) - 1, int(round(p / 100 * (len(times) - 1))))]
    caches = {}
    for r in results:
        key = type(r).__name__ if isinstance(r, BaseException) else f"{r[0]}/{r[1]}"
        caches[key] = caches.get(key, 0) + 1
    summary = ",".join(f"{k}:{v}" for k, v in sorted(caches.items()))
    print(f"STAMPEDE n={n} ok={len(ok)} p50_ms={pct(50):.1f} p99_ms={pct(99):.1f} "
          f"max_ms={times[-1]:.1f} x_cache={summary}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
