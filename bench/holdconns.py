#!/usr/bin/env python3
"""Holds N idle HTTP/1.1 keep-alive connections open against HOST:PORT.

    holdconns.py HOST PORT N MAX_HOLD_S [HEADER_LINE]

Opens N connections (256 connecting at a time), sends one `GET /healthz` on each and
reads the answer, so every connection is a real keep-alive connection the server is
holding. Prints `READY opened=N failed=F` and then holds them, idle, until SIGUSR1
or SIGTERM or MAX_HOLD_S passes. It then sends one more request on every connection
and prints `HELD ok=K of N` (how many were still open and served), and exits.
Loopback only; everything is bounded by timeouts.
"""
import asyncio
import signal
import sys


async def exchange(reader, writer, request):
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    if length:
        await reader.readexactly(length)
    return status


async def main():
    host, port, n, max_hold = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    header = sys.argv[5] if len(sys.argv) > 5 and sys.argv[5] else None
    request = f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if header:
        request += header + "\r\n"
    request = (request + "\r\n").encode()

    gate = asyncio.Semaphore(256)
    conns = []

    async def open_one():
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                if await asyncio.wait_for(exchange(reader, writer, request), 10) == 200:
                    conns.append((reader, writer))
                    return True
                writer.close()
            except Exception:
                pass
            return False

    results = await asyncio.gather(*(open_one() for _ in range(n)))
    print(f"READY opened={sum(results)} failed={n - sum(results)}", flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await asyncio.wait_for(stop.wait(), max_hold)
    except asyncio.TimeoutError:
        pass

    async def check(conn):
        async with gate:
            try:
                return await asyncio.wait_for(exchange(conn[0], conn[1], request), 10) == 200
            except Exception:
                return False

    ok = await asyncio.gather(*(check(c) for c in conns))
    print(f"HELD ok={sum(ok)} of {n}", flush=True)
    for _, writer in conns:
        writer.close()


if __name__ == "__main__":
    asyncio.run(main())
