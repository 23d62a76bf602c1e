#!/usr/bin/env python3
"""bench/http1_peers.py — the rows of tests/http1_cases.json against lameduck, HAProxy and nginx.

    python3 bench/http1_peers.py [--lameduck PATH] [--only lameduck,haproxy,nginx] [--cases FILE]

Starts the strict h11 app (tests/strict_app/strict_app.py), then HAProxy (`mode http`, keep-alive
and `http-reuse always` to the app), nginx (`proxy_pass` with `proxy_http_version 1.1` and an
upstream `keepalive` pool) and lameduck in front of it, all on 127.0.0.1 with free ports. Sends
every row's bytes to each proxy on one connection (2 s for the first response, 250 ms for more),
then a canary `GET` on a fresh connection, and prints a markdown table to stdout:

    refused     the proxy answered 4xx, the app got nothing
    normalised  the app got it, but framing or headers differ from what the client sent
                (the note says how: -X removed, +X added, ~X changed, body re-framed)
    forwarded   the app got it as sent (apart from the forwarding headers a proxy adds)
    5xx / closed / no answer   the proxy's other outcomes (the app got nothing complete)

and ✓ (SAFE) / ✗: the app received exactly as many requests as the client got non-error
responses, none with both Content-Length and Transfer-Encoding, the app's parser rejected
nothing, and the canary got its own response.

lameduck: --lameduck PATH, else target/release/lameduck, else target/debug/lameduck, else
`cargo build` first. HAProxy and nginx come from the Debian packages (apt-get install haproxy
nginx-light when missing and root). Every process started here is killed by PID at exit.
"""

import argparse
import atexit
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_WAIT = 2.0
MORE_WAIT = 0.25
ADDED_BY_PROXIES = {"x-forwarded-for", "x-forwarded-proto", "x-request-id", "x-real-ip", "via", "forwarded"}
HOP_BY_HOP = {"connection", "keep-alive", "te", "trailer", "upgrade", "proxy-connection"}

PROCS = []


def log(msg):
    print(f"[http1_peers] {msg}", file=sys.stderr, flush=True)


def cleanup():
    for p in reversed(PROCS):
        if p.poll() is None:
            try:
                p.terminate()
                p.wait(timeout=3)
            except Exception:
                p.kill()
                p.wait()


atexit.register(cleanup)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.05)
    return False


def start(cmd, **kw):
    p = subprocess.Popen(cmd, **kw)
    PROCS.append(p)
    return p


def ensure_tools(only):
    pkgs = []
    if "haproxy" in only and not (shutil.which("haproxy") or os.path.exists("/usr/sbin/haproxy")):
        pkgs.append("haproxy")
    if "nginx" in only and not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        pkgs.append("nginx-light")
    if pkgs:
        if os.getuid() != 0:
            sys.exit(f"missing {pkgs}; install them (apt-get install {' '.join(pkgs)})")
        log(f"installing {pkgs}")
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, stdout=subprocess.DEVNULL)
    try:
        import h11  # noqa: F401
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "h11==0.16.0"], check=True)


def tool(name):
    return shutil.which(name) or f"/usr/sbin/{name}"


def lameduck_bin(arg):
    if arg:
        return arg
    for p in ("target/release/lameduck", "target/debug/lameduck"):
        if os.path.exists(os.path.join(REPO, p)):
            return os.path.join(REPO, p)
    log("building lameduck (cargo build)")
    subprocess.run(["cargo", "build", "--bin", "lameduck"], cwd=REPO, check=True)
    return os.path.join(REPO, "target/debug/lameduck")


# ----------------------------------------------------------------------------- the app

class App:
    def __init__(self, tmp):
        self.log = os.path.join(tmp, "app.jsonl")
        p = start([sys.executable, os.path.join(REPO, "tests/strict_app/strict_app.py"), "0", self.log,
                   "--exit-on-stdin-eof"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.port = int(p.stdout.readline())

    def records(self):
        try:
            with open(self.log) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []


# ----------------------------------------------------------------------------- the proxies

def start_haproxy(tmp, app_port):
    port = free_port()
    cfg = os.path.join(tmp, "haproxy.cfg")
    with open(cfg, "w") as f:
        f.write(f"""global
    nbthread 1
defaults
    mode http
    timeout connect 2s
    timeout client 10s
    timeout server 10s
    timeout http-request 5s
    timeout http-keep-alive 10s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    option forwardfor
    default_backend be
backend be
    http-reuse always
    server app 127.0.0.1:{app_port}
""")
    start([tool("haproxy"), "-db", "-f", cfg], stdout=open(os.path.join(tmp, "haproxy.log"), "w"),
          stderr=subprocess.STDOUT)
    if not wait_port(port):
        sys.exit("haproxy did not start: " + open(os.path.join(tmp, "haproxy.log")).read())
    return port


def start_nginx(tmp, app_port):
    port = free_port()
    d = os.path.join(tmp, "nginx")
    os.makedirs(d, exist_ok=True)
    os.chmod(tmp, 0o755)
    cfg = os.path.join(d, "nginx.conf")
    with open(cfg, "w") as f:
        f.write(f"""daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream app {{
        server 127.0.0.1:{app_port};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
""")
    start([tool("nginx"), "-p", d, "-c", cfg, "-e", os.path.join(d, "error.log")],
          stdout=subprocess.DEVNULL, stderr=open(os.path.join(d, "stderr.log"), "w"))
    if not wait_port(port):
        sys.exit("nginx did not start: " + open(os.path.join(d, "stderr.log")).read())
    return port


def start_lameduck(tmp, app_port, binary):
    port, admin = free_port(), free_port()
    start([binary, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
           "--upstream", f"127.0.0.1:{app_port}", "--log-format", "json", "--metrics-linger", "0s"],
          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "lameduck.log"), "w"))
    end = time.time() + 15
    while time.time() < end:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin}/ready", timeout=1) as r:
                if r.status == 200:
                    return port
        except Exception:
            time.sleep(0.05)
    sys.exit("lameduck did not become ready: " + open(os.path.join(tmp, "lameduck.log")).read()[-2000:])


# ----------------------------------------------------------------------------- the client

def parse_responses(buf, eof):
    """Complete final responses at the front of buf: (list of (status, headers, body), rest, garbage)."""
    import h11
    out = []
    conn = h11.Connection(h11.CLIENT)
    # h11 wants to have sent a request first; pretend one GET per response (HEAD-less).
    pending = buf
    while pending:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
        conn.send(h11.EndOfMessage())
        conn.receive_data(pending)
        if eof:
            conn.receive_data(b"")
        status, headers, body = None, [], b""
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    return out, pending, b""
                if isinstance(ev, h11.InformationalResponse):
                    continue
                if isinstance(ev, h11.Response):
                    status, headers = ev.status_code, [(n.decode("latin-1").lower(), v.decode("latin-1"))
                                                       for n, v in ev.headers]
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                    break
        except h11.RemoteProtocolError:
            return out, b"", pending
        out.append((status, dict(headers), body))
        used = len(pending) - len(conn.trailing_data[0])
        pending = conn.trailing_data[0]
        if used <= 0:
            break
    return out, b"", b""


def exchange(port, data):
    """Sends data on one connection; (responses, closed, garbage)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=FIRST_WAIT)
    buf, closed, responses = b"", False, []
    try:
        s.sendall(data)
    except OSError:
        closed = True
    deadline = time.time() + FIRST_WAIT
    while not closed:
        wait = deadline - time.time()
        if wait <= 0:
            break
        s.settimeout(wait)
        try:
            chunk = s.recv(65536)
        except socket.timeout:
            break
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        buf += chunk
        got, buf2, garbage = parse_responses(buf, False)
        if got:
            responses += got
            buf = buf2
            deadline = time.time() + MORE_WAIT
        if garbage:
            break
    got, buf, garbage = parse_responses(buf, closed)
    responses += got
    s.close()
    return responses, closed, garbage or buf


# ----------------------------------------------------------------------------- classification

def latin1(s):
    return s.encode("latin-1")


def reference(data):
    """The first request of the row's bytes as h11 parses them directly, or None."""
    import h11
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    req, body = None, b""
    try:
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                return None
            if isinstance(ev, h11.Request):
                req = ev
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
    except h11.RemoteProtocolError:
        return None
    headers = [(n.decode("latin-1").lower(), v.decode("latin-1")) for n, v in req.headers.raw_items()]
    return {"headers": headers, "body": body}


def diff(ref, rec):
    """How the app's request differs from what the client sent (forwarding headers ignored)."""
    app_headers = [(n.lower(), v) for n, v in rec["headers"]]
    notes = []
    ref_names = {n for n, _ in ref["headers"]}
    app_names = {n for n, _ in app_headers}
    for n in sorted(ref_names - app_names):
        notes.append(f"-{n}")
    for n in sorted(app_names - ref_names - ADDED_BY_PROXIES):
        notes.append(f"+{n}")
    for n in sorted(ref_names & app_names - ADDED_BY_PROXIES - {"host"}):
        if [v for k, v in ref["headers"] if k == n] != [v for k, v in app_headers if k == n]:
            notes.append(f"~{n}")
    body = base64.b64decode(rec["body_b64"])
    if body != ref["body"]:
        notes.append("~body")
    return notes


def classify(row, data, responses, closed, garbage, recs, canary_ok):
    complete = [r for r in recs if "parse_error" not in r and not r["target"].startswith("/canary")]
    rejected = [r for r in recs if "parse_error" in r and not r.get("truncated")]
    row_reqs = [r for r in complete if not r["target"].startswith("/bad-response/")]
    ok = [r for r in responses if r[0] is not None and r[0] < 400]
    statuses = [r[0] for r in responses]
    safe = (len(row_reqs) == len(ok) and not any(r["cl_and_te"] for r in complete)
            and not rejected and canary_ok and not garbage)
    why = []
    if len(row_reqs) != len(ok):
        why.append(f"app got {len(row_reqs)}, client {len(ok)} ok")
    if any(r["cl_and_te"] for r in complete):
        why.append("CL+TE at app")
    if rejected:
        why.append("app parser rejected: " + rejected[0]["parse_error"][:40])
    if not canary_ok:
        why.append("canary got a wrong response")
    if garbage:
        why.append("non-HTTP bytes to client")
    if row["lameduck"] == "bad_gateway":
        # The app's response is the broken part: what matters is that the client is not handed
        # bytes framed two ways and that the broken app connection is not reused (canary).
        if statuses:
            cls = f"{statuses[0]}" + (" (passed on, re-framed)" if statuses[0] < 400 else "")
        else:
            cls = "raw bytes passed on (HTTP/0.9)" if garbage else ("closed" if closed else "no answer")
        safe = canary_ok and not rejected
        why = [w for w in why if w.startswith("canary") or w.startswith("app parser")]
        return cls, safe, why
    elif not complete:
        if statuses and 400 <= statuses[0] < 500:
            cls = f"refused {statuses[0]}"
        elif statuses and statuses[0] >= 500:
            cls = f"{statuses[0]}"
        elif statuses:
            cls = f"{statuses[0]} without app"
        else:
            cls = "closed" if closed else "no answer"
    else:
        ref = reference(data)
        if ref is None:
            cls = "normalised (client bytes invalid for h11)"
        else:
            notes = diff(ref, complete[0])
            cls = "forwarded" if not notes else "normalised: " + " ".join(notes)
        if len(row_reqs) > 1:
            cls += f" ({len(row_reqs)} reqs)"
    return cls, safe, why


def canary(port, tag):
    target = f"/canary?{tag}"
    responses, _, _ = exchange(port, f"GET {target} HTTP/1.1\r\nHost: app\r\n\r\n".encode())
    if not responses:
        return False
    st, hs, body = responses[0]
    return st == 200 and hs.get("x-app-target") == target and body == f"ok {hs.get('x-app-seq')}".encode()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lameduck")
    ap.add_argument("--only", default="lameduck,haproxy,nginx")
    ap.add_argument("--cases", default=os.path.join(REPO, "tests/http1_cases.json"))
    args = ap.parse_args()
    only = args.only.split(",")
    ensure_tools(only)
    rows = json.load(open(args.cases))["rows"]
    tmp = tempfile.mkdtemp(prefix="http1-peers-")
    atexit.register(shutil.rmtree, tmp, True)
    app = App(tmp)
    ports = {}
    if "lameduck" in only:
        ports["lameduck"] = start_lameduck(tmp, app.port, lameduck_bin(args.lameduck))
    if "haproxy" in only:
        ports["haproxy"] = start_haproxy(tmp, app.port)
    if "nginx" in only:
        ports["nginx"] = start_nginx(tmp, app.port)
    results = {}
    for row in rows:
        data = latin1(row["bytes"])
        for name, port in ports.items():
            before = len(app.records())
            responses, closed, garbage = exchange(port, data)
            c_ok = canary(port, f"{row['name']}-{name}")
            time.sleep(0.03)
            recs = app.records()[before:]
            results[(row["name"], name)] = classify(row, data, responses, closed, garbage, recs, c_ok)
    versions = []
    if "haproxy" in ports:
        versions.append(subprocess.run([tool("haproxy"), "-v"], capture_output=True, text=True).stdout.split("\n")[0])
    if "nginx" in ports:
        versions.append(subprocess.run([tool("nginx"), "-v"], capture_output=True, text=True).stderr.strip())
    print("Rows of `tests/http1_cases.json`, each on one connection to the proxy, the strict h11 app behind it.")
    print("✓ = SAFE (app requests == client's non-error responses, no CL+TE at the app, no app parse error, "
          "canary on a fresh connection got its own response). " + "; ".join(versions))
    print()
    print("| row | RFC | policy | " + " | ".join(ports) + " |")
    print("|---|---|---|" + "---|" * len(ports))
    unsafe = 0
    for row in rows:
        cells = []
        for name in ports:
            cls, safe, why = results[(row["name"], name)]
            unsafe += not safe
            cells.append(f"{cls} {'✓' if safe else '✗ ' + '; '.join(why)}")
        print(f"| {row['name']} | {row['rfc']} | {row['lameduck']} | " + " | ".join(cells) + " |")
    print()
    print(f"{unsafe} unsafe cell(s).")


if __name__ == "__main__":
    main()
