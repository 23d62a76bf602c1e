#!/usr/bin/env python3
"""Drain timings of lameduck (bench/run.sh, after the load rounds).

Starts its own lameduck instances (so it can timestamp the process exit through a pidfd) in
front of the benchmark upstream, and prints one JSON line per scenario:

  ready    SIGTERM -> first 503 from GET /ready, polled in a tight loop (a new connection per
           poll, ~0.1-0.3 ms per poll, so that is the resolution). Also the same interval read
           from lameduck's own log ("state changed" state=draining timestamp - wall clock at
           kill). Flags: --drain-delay 2s --drain-timeout 10s.
  tcp-1    --mode tcp, one client connection idle through the proxy; SIGTERM; the client closes
           it HOLD s later (a known time); figure = process exit - that close.
  http-1   --mode http, one idle keep-alive connection (one request done); SIGTERM; lameduck
           may close it itself (graceful shutdown of idle connections), else the client closes
           it HOLD s later; figure = process exit - the moment the last connection closed
           (EOF seen by the client, or the client's close).
  http-10k the same with N (default 10,000) idle keep-alive connections.
  tcp-10k  --mode tcp with N idle connections, all closed by the client HOLD s after SIGTERM.

All drain runs use --drain-delay 0s --drain-timeout 30s --metrics-linger 0s (so the exit is
not held back by the lame-duck window or the /metrics linger: what is left is the machinery).
Everything is bounded: each scenario gives up after ~40 s and kills its lameduck.
"""

import argparse
import asyncio
import datetime
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from idle_conns import open_idle, raise_nofile  # noqa: E402


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def http_get(port, path, timeout=1.0):
    """Minimal HTTP/1.1 GET on a fresh connection -> status (or None on connection error)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return int(data.split(b" ", 2)[1]) if data else None
    except (OSError, ValueError, IndexError):
        return None


class Lameduck:
    def __init__(self, a, mode, extra, name):
        self.port, self.admin = free_port(), free_port()
        self.log_path = os.path.join(a.tmp, f"drain-{name}.log")
        cmd = []
        if a.cpu:
            cmd += ["taskset", "-c", a.cpu]
        cmd += [a.bin, "--listen", f"127.0.0.1:{self.port}", "--admin-listen", f"127.0.0.1:{self.admin}",
                "--upstream", a.upstream, "--mode", mode, "--log-level", "info",
                "--max-connections", str(a.n + 1000)] + extra
        self.cmd = cmd
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.log)
        self.pidfd = os.pidfd_open(self.proc.pid)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"lameduck exited with {self.proc.returncode} at start-up: {self.tail()}")
            if http_get(self.admin, "/ready", 0.5) == 200:
                return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"lameduck /ready never answered 200: {self.tail()}")

    def tail(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-400:].strip()
        except OSError:
            return ""

    def wait_exit(self, timeout):
        """Block until the process exits; returns the monotonic time of the exit (pidfd readable)."""
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        if not p.poll(timeout * 1000):
            return None
        t = time.monotonic()
        self.proc.wait()
        return t

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.pidfd)
        self.log.close()

    def log_events(self):
        ev = []
        try:
            with open(self.log_path, errors="replace") as f:
                for line in f:
                    try:
                        ev.append(json.loads(line))
                    except ValueError:
                        pass
        except OSError:
            pass
        return ev

    def summary(self):
        for e in self.log_events():
            if e.get("message") == "drain complete":
                return e
        return {}


def parse_ts(s):
    try:
        return datetime.datetime.fromisoformat(str(s).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def scenario_ready(a):
    ld = Lameduck(a, "http", ["--drain-delay", "2s", "--drain-timeout", "10s", "--metrics-linger", "0s"], "ready")
    rec = {"kind": "drain", "scenario": "ready"}
    try:
        wall = time.time()
        t0 = time.monotonic()
        os.kill(ld.proc.pid, signal.SIGTERM)
        polls, t1, last = 0, None, None
        while time.monotonic() - t0 < 5:
            last = http_get(ld.admin, "/ready", 0.5)
            polls += 1
            if last == 503:
                t1 = time.monotonic()
                break
        rec["polls"] = polls
        rec["sigterm_to_ready_503_ms"] = (t1 - t0) * 1000 if t1 else None
        if t1 is None:
            rec["error"] = f"/ready never answered 503 within 5 s (last: {last})"
        te = ld.wait_exit(15)
        rec["sigterm_to_exit_ms"] = (te - t0) * 1000 if te else None
        rec["exit_code"] = ld.proc.returncode if te else None
        for e in ld.log_events():
            if e.get("message") == "state changed" and e.get("state") == "draining":
                ts = parse_ts(e.get("timestamp"))
                if ts:
                    rec["log_sigterm_to_draining_ms"] = (ts - wall) * 1000
                break
        s = ld.summary()
        rec["outcome"] = s.get("outcome")
    finally:
        ld.kill()
    rec["figures"] = [
        ("sigterm_to_ready_503_ms", "SIGTERM → /ready answers 503 (tight poll)"),
        ("log_sigterm_to_draining_ms", "SIGTERM → `state changed: draining` log timestamp"),
        ("polls", "/ready polls until 503"),
        ("sigterm_to_exit_ms", "SIGTERM → exit (--drain-delay 2s, no connections)"),
        ("exit_code", "exit code"),
    ]
    return rec


async def _held(a, mode, n, name):
    ld = Lameduck(a, mode, ["--drain-delay", "0s", "--drain-timeout", "30s", "--metrics-linger", "0s"], name)
    rec = {"kind": "drain", "scenario": name, "n": n, "mode": mode}
    loop = asyncio.get_running_loop()
    exited = loop.create_future()
    loop.add_reader(ld.pidfd, lambda: exited.done() or exited.set_result(loop.time()))
    try:
        conns, failed = await open_idle("127.0.0.1", ld.port, n, a.concurrency)
        rec["opened"], rec["failed"] = len(conns), failed
        await asyncio.sleep(0.5)
        rec["open_before_sigterm"] = sum(1 for c in conns if c.open)
        t0 = loop.time()
        os.kill(ld.proc.pid, signal.SIGTERM)
        # hold; stop early if the proxy closes all of them itself
        while loop.time() - t0 < a.hold and any(c.open for c in conns):
            await asyncio.sleep(0.005)
        by_peer = sum(1 for c in conns if not c.open)
        for c in conns:
            c.close()
        t_client_closed = loop.time()
        rec["closed_by_proxy"] = by_peer
        rec["closed_by_client"] = len(conns) - by_peer
        try:
            t_exit = await asyncio.wait_for(exited, 35)
        except asyncio.TimeoutError:
            t_exit = None
            rec["error"] = "lameduck did not exit within 35 s of the last close"
        loop.remove_reader(ld.pidfd)
        ld.proc.wait(5) if t_exit else None
        closes = [c.closed_at for c in conns if c.closed_at is not None]
        t_last = max(closes) if closes else t_client_closed
        if t_exit:
            rec["last_close_to_exit_ms"] = (t_exit - t_last) * 1000
            rec["sigterm_to_exit_ms"] = (t_exit - t0) * 1000
            rec["exit_code"] = ld.proc.returncode
        if by_peer:
            peer = [c.closed_at for c in conns if c.closed_by_peer and c.closed_at is not None]
            if peer:
                rec["sigterm_to_last_proxy_close_ms"] = (max(peer) - t0) * 1000
        s = ld.summary()
        rec["outcome"] = s.get("outcome")
        rec["graceful"], rec["forced"] = s.get("connections_graceful"), s.get("connections_forced")
    finally:
        try:
            loop.remove_reader(ld.pidfd)
        except Exception:
            pass
        ld.kill()
    who = "client closes them" if rec.get("closed_by_client") else "lameduck closes them"
    rec["figures"] = [
        ("last_close_to_exit_ms", f"last connection closed → process exit ({who})"),
        ("sigterm_to_last_proxy_close_ms", "SIGTERM → last connection closed by lameduck"),
        ("sigterm_to_exit_ms", "SIGTERM → exit"),
        ("closed_by_proxy", f"of {n:,} open: closed by lameduck"),
        ("closed_by_client", f"of {n:,} open: closed by the client ({a.hold:g} s after SIGTERM)"),
        ("outcome", "drain outcome (log)"),
        ("exit_code", "exit code"),
    ]
    return rec


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bin", required=True)
    p.add_argument("--upstream", required=True, help="host:port of the benchmark upstream")
    p.add_argument("--cpu", default="", help="taskset CPU list for lameduck")
    p.add_argument("--n", type=int, default=10000, help="connections for the *-10k scenarios")
    p.add_argument("--hold", type=float, default=1.0, help="seconds after SIGTERM before the client closes")
    p.add_argument("--concurrency", type=int, default=200)
    p.add_argument("--scenarios", default="ready,tcp-1,http-1,http-10k,tcp-10k")
    p.add_argument("--tmp", default="/tmp")
    a = p.parse_args()
    nofile = raise_nofile()
    # --mode tcp holds two fds per client connection (client side + upstream side) in one
    # process, which inherits this RLIMIT_NOFILE: stay below it rather than fail some connects.
    n_tcp = min(a.n, (nofile - 200) // 2)
    for sc in a.scenarios.split(","):
        try:
            if sc == "ready":
                rec = scenario_ready(a)
            elif sc in ("tcp-1", "http-1"):
                rec = asyncio.run(asyncio.wait_for(_held(a, sc.split("-")[0], 1, sc), 60))
            elif sc == "http-10k":
                rec = asyncio.run(asyncio.wait_for(_held(a, "http", a.n, sc), 90))
            elif sc == "tcp-10k":
                rec = asyncio.run(asyncio.wait_for(_held(a, "tcp", n_tcp, sc), 90))
                if n_tcp < a.n:
                    rec["limited_by_nofile"] = nofile
            else:
                rec = {"kind": "drain", "scenario": sc, "error": "unknown scenario"}
        except Exception as e:  # report and carry on with the next scenario
            rec = {"kind": "drain", "scenario": sc, "error": f"{type(e).__name__}: {e}", "figures": []}
        print(json.dumps(rec, sort_keys=True), flush=True)


if __name__ == "__main__":
    main()
