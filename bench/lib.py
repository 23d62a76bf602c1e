#!/usr/bin/env python3
"""Helpers for bench/run.sh (stdlib only).

    lib.py cpu PID...              utime+stime (clock ticks) summed over PIDs and all descendants
    lib.py mem PID...              {"rss_kb","hwm_kb","pids"} summed over PIDs and all descendants
    lib.py tree PID...             the PIDs and all their descendants, space separated
    lib.py parse TOOL FILE k=v...  parse wrk|h2load|oha output into one JSON line (extra k=v added)
    lib.py report RESULTS.jsonl META.json   markdown report on stdout
    lib.py busy                    names of known CPU hogs (compilers) running right now, or ""
"""

import json
import os
import re
import statistics
import sys

CLK_TCK = os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- /proc helpers

def _children_map():
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: split after the last ')'
        try:
            ppid = int(s[s.rindex(")") + 2:].split()[1])
        except (ValueError, IndexError):  # the process exited while we read it
            continue
        kids.setdefault(ppid, []).append(int(d))
    return kids


def tree(pids):
    kids = _children_map()
    out, todo = [], [int(p) for p in pids]
    while todo:
        p = todo.pop()
        if p in out or not os.path.exists(f"/proc/{p}"):
            continue
        out.append(p)
        todo.extend(kids.get(p, []))
    return sorted(out)


def cpu_ticks(pids):
    total = 0
    for p in tree(pids):
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
        except OSError:
            continue
        try:
            rest = s[s.rindex(")") + 2:].split()
            # fields 14 and 15 of stat = index 11, 12 after the comm
            total += int(rest[11]) + int(rest[12])
        except (ValueError, IndexError):
            continue
    return total


def mem(pids):
    rss = hwm = 0
    ps = tree(pids)
    for p in ps:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1])
                    elif line.startswith("VmHWM:"):
                        hwm += int(line.split()[1])
        except OSError:
            pass
    return {"rss_kb": rss, "hwm_kb": hwm, "pids": ps}


def sysmark(root):
    """'STAT OURS' in clock ticks: user+nice+system of the whole machine (/proc/stat), and
    utime+stime of ROOT and its live descendants plus ROOT's reaped children (cutime+cstime).
    The difference of the deltas between two marks is CPU used by processes that are not
    part of the benchmark (e.g. a compiler running at the same time)."""
    with open("/proc/stat") as f:
        cpu = f.readline().split()
    stat = int(cpu[1]) + int(cpu[2]) + int(cpu[3])
    ours = cpu_ticks([root])
    try:
        with open(f"/proc/{root}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        ours += int(rest[13]) + int(rest[14])
    except (OSError, ValueError, IndexError):
        pass
    return stat, ours


def busy():
    hogs = {"rustc", "cc1", "cc1plus", "ld", "cargo", "clippy-driver", "go", "javac", "node"}
    found = set()
    me = os.getpid()
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) == me:
            continue
        try:
            with open(f"/proc/{d}/comm") as f:
                c = f.read().strip()
        except OSError:
            continue
        if c in hogs:
            found.add(c)
    return " ".join(sorted(found))


# ----------------------------------------------------------------------------- parsers

def parse_wrk(text):
    m = re.search(r"^BENCHJSON (\{.*\})$", text, re.M)
    if not m:
        raise ValueError("no BENCHJSON line in wrk output")
    j = json.loads(m.group(1))
    dur = j["duration_us"] / 1e6
    errors = j["err_connect"] + j["err_read"] + j["err_write"] + j["err_status"] + j["err_timeout"]
    ok = j["requests"] - j["err_status"]
    return {
        "duration_s": dur,
        "requests": j["requests"],
        "ok": ok,
        "errors": errors,
        "err_detail": {k[4:]: v for k, v in j.items() if k.startswith("err_") and v},
        "rps": ok / dur if dur else 0.0,
        "mbps": j["bytes"] / dur / 1e6 if dur else 0.0,
        "p50_ms": j["lat_p50_us"] / 1000,
        "p99_ms": j["lat_p99_us"] / 1000,
        "p999_ms": j["lat_p999_us"] / 1000,
    }


def parse_h2load(text):
    m = re.search(r"finished in ([\d.]+)(m?s),", text)
    if not m:
        raise ValueError("no 'finished in' line in h2load output")
    dur = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    r = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                  r"(\d+) errored, (\d+) timeout", text)
    total, started, done, ok, failed, errored, timeout = map(int, r.groups())
    s = re.search(r"status codes: (\d+) 2xx", text)
    ok2xx = int(s.group(1)) if s else ok
    ok = min(ok, ok2xx)
    return {
        "duration_s": dur,
        "requests": done,
        "ok": ok,
        "errors": failed + errored + timeout + (done - ok),
        "rps": ok / dur if dur else 0.0,
    }


def parse_oha(text):
    start = text.find("{")
    j = json.loads(text[start:])
    s = j["summary"]
    lp = j.get("latencyPercentiles", {})
    codes = j.get("statusCodeDistribution", {}) or {}
    ok = sum(v for k, v in codes.items() if str(k).startswith("2"))
    total = sum(codes.values())
    # requests still in flight when -z expires are reported as "aborted due to deadline":
    # an artefact of stopping, not a failure of the target
    errd = {k: v for k, v in (j.get("errorDistribution") or {}).items() if "deadline" not in k}
    errs = sum(errd.values())
    dur = s.get("total") or 0.0

    def ms(key):
        v = lp.get(key)
        return v * 1000 if v is not None else None

    return {
        "duration_s": dur,
        "requests": total,
        "ok": ok,
        "errors": errs + (total - ok),
        "err_detail": errd,
        "rps": ok / dur if dur else 0.0,
        "p50_ms": ms("p50"),
        "p99_ms": ms("p99"),
        "p999_ms": ms("p99.9"),
    }


PARSERS = {"wrk": parse_wrk, "h2load": parse_h2load, "oha": parse_oha}


def cmd_parse(tool, path, kvs):
    with open(path, errors="replace") as f:
        text = f.read()
    rec = {}
    for kv in kvs:
        k, v = kv.split("=", 1)
        try:
            v = int(v)
        except ValueError:
            try:
                v = float(v)
            except ValueError:
                pass
        rec[k] = v
    try:
        rec.update(PARSERS[tool](text))
    except Exception as e:  # keep the run going; the report shows the gap
        rec["parse_error"] = f"{type(e).__name__}: {e}"
        sys.stderr.write(f"bench: could not parse {tool} output {path}: {e}\n")
    if "cpu0" in rec and "cpu1" in rec:
        rec["cpu_s"] = (rec["cpu1"] - rec["cpu0"]) / CLK_TCK
    if isinstance(rec.get("up0"), int) and isinstance(rec.get("up1"), int):
        # minus the connection of the second stub_status query itself
        rec["upstream_conns"] = rec["up1"] - rec["up0"] - 1
    try:
        (s0, o0), (s1, o1) = (map(int, str(rec.pop(k)).split(":")) for k in ("mark0", "mark1"))
    except (KeyError, ValueError):
        s0 = None
    if s0 is not None:
        bg = max(0, (s1 - s0) - (o1 - o0)) / CLK_TCK
        rec["bg_cpu_s"] = bg
        dur = rec.get("duration_s") or 0
        rec["bg_cores"] = round(bg / dur, 3) if dur else None
        # "busy": something outside the benchmark used > 10% of a core during the run
        rec["busy"] = (f"{rec['bg_cores']:.2f} cores of other load ({rec.get('hogs') or 'unknown'})"
                       if rec["bg_cores"] and rec["bg_cores"] > 0.10 else "")
    print(json.dumps(rec, sort_keys=True))
    # progress line for the terminal
    if "parse_error" not in rec:
        what = f"{rec['mbps']:,.0f} MB/s" if rec.get("workload") == "big" else f"{rec.get('rps', 0):,.0f} req/s"
        if rec.get("workload") == "rate":
            what += f", p50/p99/p99.9 {rec.get('p50_ms') or 0:.2f}/{rec.get('p99_ms') or 0:.2f}/{rec.get('p999_ms') or 0:.2f} ms"
        extra = f", {rec['errors']} errors" if rec.get("errors") else ""
        if rec.get("upstream_conns") is not None:
            extra += f", {rec['upstream_conns']:,} upstream conns"
        busy = f"  [{rec['busy']}]" if rec.get("busy") else ""
        sys.stderr.write(f"  r{rec.get('round')} {rec.get('workload', ''):<6} {rec.get('target', ''):<9} {what}, "
                         f"proxy CPU {rec.get('cpu_s', 0):.2f}s{extra}{busy}\n")


# ----------------------------------------------------------------------------- report

TARGET_ORDER = ["direct", "haproxy", "nginx", "lameduck", "ld-base", "ld-log", "ld-trace1", "ld-trace100"]
# lameduck with the access log on, spans sampled at 1 % and at 100 % (to a collector).
VARIANTS = {
    "ld-base": "another build (LAMEDUCK_BASE_BIN), default flags",
    "ld-log": "access log on (JSON, to /dev/null)",
    "ld-trace1": "spans sampled at 1 %, OTLP to a collector",
    "ld-trace100": "spans sampled at 100 %, OTLP to a collector",
}
PEERS = ("haproxy", "nginx")

WORKLOADS = {
    "h1": "(a) HTTP/1.1 keep-alive, 32 conns",
    "close": "(b) HTTP/1.1 new connection per request",
    "h2": "(c) HTTP/2 h2c, 16 conns x 32 streams",
    "big": "(d) 1 MiB responses",
    "tcp": "(e) TCP passthrough (HTTP/1.1 keep-alive through it)",
    "rate": "(g) fixed rate",
    "tls_h1": "(h) HTTPS keep-alive, 32 conns",
    "tls_close": "(i) HTTPS new TLS connection per request",
    "tls_h2": "(j) h2 over TLS (ALPN), 16 conns x 32 streams",
}


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt_num(v, kind):
    if v is None:
        return "–"
    if kind == "rps":
        return f"{v/1000:,.1f}k" if v >= 10000 else f"{v:,.0f}"
    if kind == "mbps":
        return f"{v:,.0f}"
    if kind == "ms":
        return f"{v:.3f}" if v < 1 else f"{v:.2f}"
    if kind == "cpu":
        return f"{v:.3f}"
    if kind == "mib":
        return f"{v:.1f}"
    if kind == "kib":
        return f"{v:.2f}"
    if kind == "int":
        return f"{v:,.0f}"
    if kind == "conns":
        return f"{v:,.1f}" if v >= 1 else f"{v:.3f}"
    return str(v)


def load(path):
    recs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                recs.append(json.loads(line))
    return recs


def build_rows(recs, meta):
    """rows: list of (label, kind, better, {target: value}, note)"""
    runs = [r for r in recs if r.get("kind") == "run"]
    targets = [t for t in TARGET_ORDER if t in meta["targets"]]
    rows = []

    def per_target(workload, fn):
        out = {}
        for t in targets:
            rs = [r for r in runs if r["target"] == t and r["workload"] == workload and "parse_error" not in r]
            # runs disturbed by other load on the machine count only if there is no clean one
            clean = [r for r in rs if not r.get("busy")]
            out[t] = med([fn(r) for r in (clean or rs)])
        return out

    def cpu_per_100k(r):
        if r.get("cpu_s") is None or not r.get("ok"):
            return None
        return r["cpu_s"] / r["ok"] * 100000

    def cpu_per_gb(r):
        if r.get("cpu_s") is None or not r.get("mbps"):
            return None
        return r["cpu_s"] / (r["mbps"] * r["duration_s"] / 1000)

    wl = meta["workloads"]
    if "h1" in wl:
        rows.append(("(a) HTTP/1.1 keep-alive, req/s", "rps", "high", per_target("h1", lambda r: r["rps"])))
    if "close" in wl:
        rows.append(("(b) HTTP/1.1 conn per request, req/s", "rps", "high", per_target("close", lambda r: r["rps"])))
    if "h2" in wl:
        rows.append(("(c) HTTP/2 h2c 16x32 streams, req/s", "rps", "high", per_target("h2", lambda r: r["rps"])))
    if "big" in wl:
        rows.append(("(d) 1 MiB bodies, MB/s", "mbps", "high", per_target("big", lambda r: r["mbps"])))
    if "tcp" in wl:
        rows.append(("(e) TCP passthrough, req/s", "rps", "high", per_target("tcp", lambda r: r["rps"])))
    if "rate" in wl:
        q = meta.get("rate", "?")
        rows.append((f"(g) latency p50 @ {q} req/s, ms", "ms", "low", per_target("rate", lambda r: r.get("p50_ms"))))
        rows.append((f"(g) latency p99 @ {q} req/s, ms", "ms", "low", per_target("rate", lambda r: r.get("p99_ms"))))
        rows.append((f"(g) latency p99.9 @ {q} req/s, ms", "ms", "low", per_target("rate", lambda r: r.get("p999_ms"))))
    if "tls_h1" in wl:
        rows.append(("(h) HTTPS keep-alive, req/s", "rps", "high", per_target("tls_h1", lambda r: r["rps"])))
    if "tls_close" in wl:
        rows.append(("(i) HTTPS conn (handshake) per request, req/s", "rps", "high", per_target("tls_close", lambda r: r["rps"])))
    if "tls_h2" in wl:
        rows.append(("(j) h2 over TLS 16x32 streams, req/s", "rps", "high", per_target("tls_h2", lambda r: r["rps"])))
    for w, label in (("h1", "(a)"), ("close", "(b)"), ("h2", "(c)"), ("tcp", "(e)"), ("rate", "(g)"),
                     ("tls_h1", "(h)"), ("tls_close", "(i), = per 100k handshakes"), ("tls_h2", "(j)")):
        if w in wl:
            rows.append((f"CPU s per 100k req, {label}", "cpu", "low", per_target(w, cpu_per_100k)))
    if "big" in wl:
        rows.append(("CPU s per GB, (d)", "cpu", "low", per_target("big", cpu_per_gb)))

    def conns_per_1k(r):
        if r.get("upstream_conns") is None or not r.get("requests"):
            return None
        return r["upstream_conns"] / r["requests"] * 1000

    for w, label in (("h1", "(a)"), ("close", "(b)"), ("h2", "(c)"), ("rate", "(g)")):
        if w in wl:
            rows.append((f"upstream conns opened per 1k req, {label}", "conns", "low", per_target(w, conns_per_1k)))

    mems = [r for r in recs if r.get("kind") == "mem"]

    def memrow(phase, key):
        out = {}
        for t in targets:
            vals = [r[key] / 1024 for r in mems if r["target"] == t and r["phase"] == phase]
            out[t] = max(vals) if vals else None
        return out

    rows.append(("idle RSS (after start + 1 request), MiB", "mib", "low", memrow("idle", "rss_kb")))
    if any(r["phase"] == "peak" for r in mems):
        rows.append(("peak RSS (VmHWM after load rounds), MiB", "mib", "low", memrow("peak", "hwm_kb")))
    idles = [r for r in recs if r.get("kind") == "idle"]
    if idles:
        out, held = {}, {}
        for t in targets:
            rs = [r for r in idles if r["target"] == t and r.get("per_conn_kb") is not None]
            out[t] = med([r["per_conn_kb"] for r in rs])
            held[t] = med([r.get("still_open") for r in rs])
        n = meta.get("idle_conns", 10000)
        rows.append((f"(f) RSS per idle conn ({n:,} open), KiB", "kib", "low", out))
        rows.append((f"(f) idle conns still open at measurement", "int", "high", held))
    return targets, rows


def ratio(v, ref):
    if v is None or ref in (None, 0):
        return None
    return v / ref


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}×"


def cmd_report(results_path, meta_path):
    recs = load(results_path)
    with open(meta_path) as f:
        meta = json.load(f)
    targets, rows = build_rows(recs, meta)
    out = []
    w = out.append
    quick = " — QUICK run (smoke-test settings, not for quoting)" if meta.get("quick") else ""
    w(f"## lameduck benchmark{quick}")
    w("")
    w(f"{meta['date']} · {meta['rounds']} round(s) × {meta['duration']}s per run · medians over rounds "
      f"(undisturbed ones) · target order rotated every round")
    w("")
    w("| figure | " + " | ".join(targets) + " |")
    w("|---|" + "---:|" * len(targets))
    for label, kind, better, vals, *_ in rows:
        w(f"| {label} | " + " | ".join(fmt_num(vals.get(t), kind) for t in targets) + " |")
    w("")

    variants = [t for t in VARIANTS if t in targets]
    if variants and "lameduck" in targets:
        w("### Cost of per-request observability (HTTP/1.1 keep-alive)")
        w("")
        w("Ratio to `lameduck` with the access log off and no span export, measured in the same "
          "rounds (interleaved). Throughput: below 1.00× is slower; CPU per request: above 1.00× is more.")
        w("")
        w("| variant | (a) req/s | ratio | CPU s per 100k req | ratio |")
        w("|---|---:|---:|---:|---:|")
        rps = next((v for label, _, _, v, *_ in rows if label.startswith("(a)")), {})
        cpu = next((v for label, _, _, v, *_ in rows if label == "CPU s per 100k req, (a)"), {})
        w(f"| lameduck (both off) | {fmt_num(rps.get('lameduck'), 'rps')} | 1.00× "
          f"| {fmt_num(cpu.get('lameduck'), 'cpu')} | 1.00× |")
        for t in variants:
            w(f"| {t}: {VARIANTS[t]} | {fmt_num(rps.get(t), 'rps')} "
              f"| {fmt_ratio(ratio(rps.get(t), rps.get('lameduck')))} "
              f"| {fmt_num(cpu.get(t), 'cpu')} | {fmt_ratio(ratio(cpu.get(t), cpu.get('lameduck')))} |")
        w("")

    peers = [t for t in PEERS if t in targets]
    show = [t for t in targets if t != "direct" and t not in VARIANTS]
    if peers or "direct" in targets:
        w("Ratios: **vs best peer** = value ÷ the better of HAProxy/nginx for that figure "
          "(higher is better for throughput rows, lower is better for latency/CPU/RSS rows); "
          "**vs direct** = value ÷ the upstream measured without a proxy.")
        w("")
        heads = []
        for t in show:
            if peers:
                heads.append(f"{t} vs best peer")
            if "direct" in targets:
                heads.append(f"{t} vs direct")
        w("| figure | " + " | ".join(heads) + " |")
        w("|---|" + "---:|" * len(heads))
        for label, kind, better, vals, *_ in rows:
            if kind in ("int", "conns"):
                continue
            pv = [vals.get(p) for p in peers if vals.get(p) is not None]
            best = (max(pv) if better == "high" else min(pv)) if pv else None
            cells = []
            for t in show:
                if peers:
                    cells.append(fmt_ratio(ratio(vals.get(t), best)))
                if "direct" in targets:
                    cells.append(fmt_ratio(ratio(vals.get(t), vals.get("direct"))))
            w(f"| {label} | " + " | ".join(cells) + " |")
        w("")

    drains = [r for r in recs if r.get("kind") == "drain"]
    if drains:
        desc = {
            "ready": "--drain-delay 2s, no connections; /ready polled in a tight loop",
            "tcp-1": "--mode tcp, 1 idle connection, client closes it {hold} s after SIGTERM",
            "http-1": "1 idle keep-alive connection",
            "http-10k": "{n:,} idle keep-alive connections",
            "tcp-10k": "--mode tcp, {n:,} idle connections, client closes them {hold} s after SIGTERM",
        }

        def ms(v):
            return "–" if v is None else (f"{v:.2f} ms" if v < 100 else f"{v:,.0f} ms")

        w("### lameduck drain timings")
        w("")
        w("Drain runs other than `ready` use `--drain-delay 0s --drain-timeout 30s --metrics-linger 0s`.")
        w("")
        w("| scenario | SIGTERM → /ready 503 | SIGTERM → last conn closed by lameduck | last conn closed → exit "
          "| SIGTERM → exit | closed by lameduck / by client | outcome (exit code) |")
        w("|---|---:|---:|---:|---:|---:|---|")
        for d in drains:
            sc = d["scenario"]
            what = desc.get(sc, "").format(n=d.get("n") or 0, hold=meta.get("drain_hold", 1))
            if d.get("error") and not d.get("figures"):
                w(f"| {sc}: {what} | error: {d['error']} | | | | | |")
                continue
            ready = ms(d.get("sigterm_to_ready_503_ms")) if sc == "ready" else ""
            if sc == "ready" and d.get("log_sigterm_to_draining_ms") is not None:
                ready += f" (log: {ms(d['log_sigterm_to_draining_ms'])})"
            closed = (f"{d.get('closed_by_proxy', 0):,} / {d.get('closed_by_client', 0):,}"
                      if "closed_by_proxy" in d else "")
            outc = f"{d.get('outcome') or '?'} ({d.get('exit_code')})"
            w(f"| {sc}: {what} | {ready} | {ms(d.get('sigterm_to_last_proxy_close_ms')) if sc != 'ready' else ''} "
              f"| {ms(d.get('last_close_to_exit_ms')) if sc != 'ready' else ''} | {ms(d.get('sigterm_to_exit_ms'))} "
              f"| {closed} | {outc} |")
        w("")

    # problems worth surfacing
    notes = []
    for r in recs:
        if r.get("kind") == "run":
            if r.get("parse_error"):
                notes.append(f"round {r['round']} {r['workload']} {r['target']}: no result ({r['parse_error']})")
            elif r.get("errors"):
                notes.append(f"round {r['round']} {r['workload']} {r['target']}: {r['errors']} errors "
                             f"{json.dumps(r.get('err_detail', {}))} of {r.get('requests')} requests")
        if r.get("kind") == "idle" and r.get("failed"):
            notes.append(f"idle {r['target']}: {r['failed']} of {r['n']} connections failed to open")
        if r.get("kind") == "drain" and r.get("error"):
            notes.append(f"drain {r['scenario']}: {r['error']}")
        if r.get("kind") == "drain" and r.get("limited_by_nofile"):
            notes.append(f"drain {r['scenario']}: ran with {r['n']:,} connections, not more: --mode tcp needs "
                         f"2 fds per connection and RLIMIT_NOFILE is {r['limited_by_nofile']:,} here")
        if r.get("kind") == "drain" and r.get("failed"):
            notes.append(f"drain {r['scenario']}: {r['failed']} of {r['n']} connections failed to open "
                         f"(the scenario ran with {r.get('opened')})")
        if r.get("kind") == "note":
            notes.append(r["text"])
    runs = [r for r in recs if r.get("kind") == "run"]
    discarded = [r for r in recs if r.get("kind") == "discarded"]
    if discarded:
        notes.append(f"{len(discarded)} load run(s) were disturbed by other load on the machine and run "
                     f"again; the re-run is what counts.")
    busy_runs = [r for r in runs if r.get("busy")]
    if busy_runs:
        notes.append("Runs disturbed by other load are left out of the medians wherever the same "
                     "target/workload has an undisturbed run in another round.")
        hogs = sorted({h for r in busy_runs for h in str(r.get("hogs") or "").split()})
        worst = max(r.get("bg_cores") or 0 for r in busy_runs)
        notes.append(f"{len(busy_runs)} of {len(runs)} load runs had other load on the machine (> 0.1 core, "
                     f"up to {worst:.2f} cores; seen: {', '.join(hogs) or 'unknown'}): those numbers are "
                     f"depressed/noisy. Per-run figures are in results.jsonl (bg_cores).")
    if notes:
        w("### Notes from this run")
        w("")
        for n in notes[:40]:
            w(f"- {n}")
        if len(notes) > 40:
            w(f"- … {len(notes) - 40} more in results.jsonl")
        w("")

    w("### Setup of this run")
    w("")
    for k in ("machine", "kernel", "versions", "pinning", "peer headers", "lameduck"):
        if meta.get(k):
            w(f"- **{k}**: {meta[k]}")
    w("")
    print("\n".join(out))


def main(argv):
    if len(argv) < 2:
        print(__doc__)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "cpu":
        print(cpu_ticks(args))
    elif cmd == "mem":
        print(json.dumps(mem(args)))
    elif cmd == "tree":
        print(" ".join(map(str, tree(args))))
    elif cmd == "parse":
        cmd_parse(args[0], args[1], args[2:])
    elif cmd == "report":
        cmd_report(args[0], args[1])
    elif cmd == "busy":
        print(busy())
    elif cmd == "sysmark":
        print("%d:%d" % sysmark(int(args[0])))
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
