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
        rest = s[s.rindex(")") + 2:].split()
        ppid = int(rest[1])
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
        rest = s[s.rindex(")") + 2:].split()
        # fields 14 and 15 of stat = index 11, 12 after the comm
        total += int(rest[11]) + int(rest[12])
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
    errs = sum((j.get("errorDistribution") or {}).values())
    dur = s.get("total") or 0.0

    def ms(key):
        v = lp.get(key)
        return v * 1000 if v is not None else None

    return {
        "duration_s": dur,
        "requests": total,
        "ok": ok,
        "errors": errs + (total - ok),
        "err_detail": j.get("errorDistribution") or {},
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
    print(json.dumps(rec, sort_keys=True))


# ----------------------------------------------------------------------------- report

TARGET_ORDER = ["direct", "haproxy", "nginx", "lameduck"]
PEERS = ("haproxy", "nginx")

WORKLOADS = {
    "h1": "(a) HTTP/1.1 keep-alive, 32 conns",
    "close": "(b) HTTP/1.1 new connection per request",
    "h2": "(c) HTTP/2 h2c, 16 conns x 32 streams",
    "big": "(d) 1 MiB responses",
    "tcp": "(e) TCP passthrough (HTTP/1.1 keep-alive through it)",
    "rate": "(g) fixed rate",
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
            vals = [fn(r) for r in runs if r["target"] == t and r["workload"] == workload
                    and "parse_error" not in r]
            out[t] = med(vals)
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
    for w, label in (("h1", "(a)"), ("close", "(b)"), ("h2", "(c)"), ("tcp", "(e)"), ("rate", "(g)")):
        if w in wl:
            rows.append((f"CPU s per 100k req, {label}", "cpu", "low", per_target(w, cpu_per_100k)))
    if "big" in wl:
        rows.append(("CPU s per GB, (d)", "cpu", "low", per_target("big", cpu_per_gb)))

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
    quick = " — QUICK run (1 round, short)" if meta.get("quick") else ""
    w(f"## lameduck benchmark{quick}")
    w("")
    w(f"{meta['date']} · {meta['rounds']} round(s) × {meta['duration']}s per run · medians over rounds · "
      f"targets in round-robin order per round")
    w("")
    w("| figure | " + " | ".join(targets) + " |")
    w("|---|" + "---:|" * len(targets))
    for label, kind, better, vals, *_ in rows:
        w(f"| {label} | " + " | ".join(fmt_num(vals.get(t), kind) for t in targets) + " |")
    w("")

    peers = [t for t in PEERS if t in targets]
    show = [t for t in targets if t != "direct"]
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
            if kind == "int":
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
        w("### lameduck drain timings")
        w("")
        w("| scenario | figure | value |")
        w("|---|---|---:|")
        for d in drains:
            for k, label in d.get("figures", []):
                v = d.get(k)
                if v is None:
                    cell = "–"
                elif isinstance(v, float):
                    cell = f"{v:.2f} ms" if k.endswith("_ms") else f"{v:.2f}"
                else:
                    cell = str(v)
                w(f"| {d['scenario']} | {label} | {cell} |")
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
        if r.get("kind") == "note":
            notes.append(r["text"])
    runs = [r for r in recs if r.get("kind") == "run"]
    busy_runs = [r for r in runs if r.get("busy")]
    if busy_runs:
        hogs = sorted({h for r in busy_runs for h in str(r["busy"]).split()})
        notes.append(f"{len(busy_runs)} of {len(runs)} load runs started while other CPU-heavy processes "
                     f"were running ({', '.join(hogs)}): those numbers are depressed/noisy.")
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
    for k in ("machine", "kernel", "versions", "pinning", "lameduck"):
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
    else:
        print(__doc__)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
