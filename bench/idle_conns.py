#!/usr/bin/env python3
"""Open N keep-alive connections, send one request on each, then hold them idle.

Used two ways:
  * as a script by bench/run.sh (workload f): measures the RSS of the given PIDs (and their
    descendants) before opening and after all connections are open and idle, prints one JSON
    line and closes everything:
        idle_conns.py --port P --n 10000 --pids "123 456" [--target NAME]
  * as a module by bench/drain_probe.py (open_idle / IdleConn), to hold 10k connections through
    a drain and timestamp when each one is closed.

Stdlib only (asyncio). Needs RLIMIT_NOFILE > N: it raises its soft limit to the hard limit.
Bounded in time: --timeout (default 120 s) for the whole script.
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lib  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: lameduck-bench-idle\r\n\r\n"


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class IdleConn(asyncio.Protocol):
    """One connection: sends REQUEST, waits for one complete response, then sits idle.

    closed_at is the loop time at which the peer closed (EOF/reset) or we closed it."""

    def __init__(self, loop, request=True):
        self.loop = loop
        self.request = request
        self.transport = None
        self.buf = b""
        self.responded = loop.create_future()
        self.closed_at = None
        self.closed_by_peer = False
        self.status = None

    def connection_made(self, transport):
        self.transport = transport
        if self.request:
            transport.write(REQUEST)
        else:
            self.responded.set_result(0)

    def data_received(self, data):
        if self.responded.done():
            return
        self.buf += data
        head_end = self.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = self.buf[:head_end].decode("latin-1")
        lines = head.split("\r\n")
        try:
            self.status = int(lines[0].split()[1])
        except (IndexError, ValueError):
            self.status = -1
        clen = 0
        for line in lines[1:]:
            k, _, v = line.partition(":")
            if k.strip().lower() == "content-length":
                clen = int(v.strip())
        if len(self.buf) - head_end - 4 >= clen:
            self.buf = b""
            self.responded.set_result(self.status)

    def eof_received(self):
        self._closed(True)
        return False

    def connection_lost(self, exc):
        self._closed(self.closed_at is None)

    def _closed(self, by_peer):
        if self.closed_at is None:
            self.closed_at = self.loop.time()
            self.closed_by_peer = by_peer
        if not self.responded.done():
            self.responded.set_exception(ConnectionError("closed before the response"))

    @property
    def open(self):
        return self.closed_at is None

    def close(self):
        if self.transport is not None and self.closed_at is None:
            self.closed_at = self.loop.time()
            self.closed_by_peer = False
            self.transport.close()


async def open_idle(host, port, n, concurrency=200, retries=3, request=True):
    """Open n connections (at most `concurrency` handshakes+first requests in flight).
    Returns (conns, failures). With request=False no request is sent (raw TCP idle)."""
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(concurrency)
    conns, failures = [], 0

    async def one():
        nonlocal failures
        async with sem:
            for attempt in range(retries):
                try:
                    proto = IdleConn(loop, request)
                    await asyncio.wait_for(loop.create_connection(lambda: proto, host, port), 10)
                    await asyncio.wait_for(proto.responded, 10)
                    conns.append(proto)
                    return
                except (OSError, asyncio.TimeoutError, ConnectionError):
                    try:
                        if proto.transport is not None:
                            proto.transport.abort()
                    except Exception:
                        pass
                    await asyncio.sleep(0.05 * (attempt + 1))
            failures += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return conns, failures


async def main_async(a):
    pids = a.pids.split()
    before = lib.mem(pids)
    t0 = time.monotonic()
    conns, failures = await open_idle(a.host, a.port, a.n, a.concurrency)
    open_s = time.monotonic() - t0
    await asyncio.sleep(a.settle)
    after = lib.mem(pids)
    still = sum(1 for c in conns if c.open)
    non2xx = sum(1 for c in conns if c.status is None or not 200 <= c.status < 300)
    for c in conns:
        c.close()
    await asyncio.sleep(0.2)
    delta = after["rss_kb"] - before["rss_kb"]
    rec = {
        "kind": "idle",
        "target": a.target,
        "n": a.n,
        "opened": len(conns),
        "failed": failures,
        "non2xx": non2xx,
        "still_open": still,
        "open_s": round(open_s, 3),
        "rss_before_kb": before["rss_kb"],
        "rss_after_kb": after["rss_kb"],
        "hwm_after_kb": after["hwm_kb"],
        "per_conn_kb": (delta / still) if still else None,
        "pids": after["pids"],
    }
    print(json.dumps(rec, sort_keys=True))
    per = f"{rec['per_conn_kb']:.2f} KiB/conn" if rec["per_conn_kb"] is not None else "n/a"
    print(f"  (f) {a.target:<9} {still}/{a.n} open after {open_s:.1f}s, RSS {before['rss_kb']/1024:.1f} -> "
          f"{after['rss_kb']/1024:.1f} MiB, {per}", file=sys.stderr)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--n", type=int, default=10000)
    p.add_argument("--pids", default="", help="PIDs whose RSS (with descendants) is measured")
    p.add_argument("--target", default="?")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--settle", type=float, default=1.0, help="seconds idle before the 2nd RSS sample")
    p.add_argument("--timeout", type=float, default=120.0)
    a = p.parse_args()
    limit = raise_nofile()
    if limit < a.n + 100:
        sys.exit(f"idle_conns: RLIMIT_NOFILE {limit} too low for {a.n} connections")
    try:
        asyncio.run(asyncio.wait_for(main_async(a), a.timeout))
    except asyncio.TimeoutError:
        sys.exit(f"idle_conns: gave up after {a.timeout}s")


if __name__ == "__main__":
    main()
