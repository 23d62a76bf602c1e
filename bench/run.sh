#!/usr/bin/env bash
# bench/run.sh — lameduck vs HAProxy vs nginx vs the upstream directly, on one machine.
#
#   bench/run.sh                          full run (3 rounds x 10 s per run, ~15 min)
#   QUICK=1 bench/run.sh                  smoke test (1 round x 3 s, ~3 min)
#   TARGETS="direct haproxy nginx" ...    subset of targets (lameduck is then not built)
#
# Knobs (environment):
#   ROUNDS=3 DURATION=10      rounds and seconds per load run (QUICK=1: 1 and 3)
#   TARGETS="direct haproxy nginx lameduck"   (+ ld-log ld-trace1 ld-trace100: lameduck with
#                             the access log on / spans sampled at 1 % and 100 % to a real
#                             OpenTelemetry Collector; h1 workload only, reported as ratios to
#                             `lameduck` with both off)
#                             (+ ld-base: another lameduck binary, LAMEDUCK_BASE_BIN, default
#                             flags, h1 only: an A/B of two builds in the same rounds)
#   WORKLOADS="h1 close h2 big tcp rate idle drain tls_h1 tls_close tls_h2"
#                             (a b c d e g f + lameduck drain timings + TLS (h) (i) (j); the
#                             TLS ones run against haproxy, nginx and lameduck, all terminating
#                             TLS with the same ECDSA P-256 certificate; not against direct)
#   RATE=5000                 fixed request rate of the latency workload (g)
#   IDLE_CONNS=10000          connections of the idle-RSS workload (f) and the 10k drain runs
#   BIG_CONNS=8               wrk connections of the 1 MiB workload (d)
#   PROXY_CPU=0 UPSTREAM_CPU=1 CLIENT_CPU=1 DIRECT_CLIENT_CPU=0   taskset layout (see BENCHMARKS.md)
#   BASE_PORT=18000           ports BASE_PORT..BASE_PORT+35 on 127.0.0.1
#   LAMEDUCK_BIN=target/release/lameduck   BUILD=1 (cargo build --release first; 0 = use as is)
#   INSTALL=1                 apt-get/cargo install missing tools (0 = fail instead)
#   BUSY_RETRIES=ROUNDS*2     re-runs allowed (in total) for runs disturbed by other CPU load
#   RESULTS_DIR=bench/results KEEP_TMP=0 (1 = keep the temp dir with configs and raw outputs)
#
# Every process this script starts is tracked by PID and killed (whole process tree) on exit,
# error or Ctrl-C. Every load run is bounded by its own duration plus a `timeout` guard.
# All traffic goes to 127.0.0.1 only.
set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$BENCH_DIR")

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-1}; DURATION=${DURATION:-3}
else
    ROUNDS=${ROUNDS:-3}; DURATION=${DURATION:-10}
fi
TARGETS=${TARGETS:-direct haproxy nginx lameduck}
WORKLOADS=${WORKLOADS:-h1 close h2 big tcp rate idle drain tls_h1 tls_close tls_h2}
RATE=${RATE:-5000}
IDLE_CONNS=${IDLE_CONNS:-10000}
BIG_CONNS=${BIG_CONNS:-8}
PROXY_CPU=${PROXY_CPU:-0}
UPSTREAM_CPU=${UPSTREAM_CPU:-1}
CLIENT_CPU=${CLIENT_CPU:-1}
DIRECT_CLIENT_CPU=${DIRECT_CLIENT_CPU:-0}
BASE_PORT=${BASE_PORT:-18000}
LAMEDUCK_BIN=${LAMEDUCK_BIN:-$REPO_DIR/target/release/lameduck}
BUILD=${BUILD:-1}
INSTALL=${INSTALL:-1}
RESULTS_DIR=${RESULTS_DIR:-$BENCH_DIR/results}
KEEP_TMP=${KEEP_TMP:-0}
PEER_HEADERS=${PEER_HEADERS:-1}   # 1 = HAProxy and nginx add the headers lameduck adds (XFF, XFP, request id)
RETRY_BUDGET=${BUSY_RETRIES:-$((ROUNDS * 2))}   # re-runs allowed for runs disturbed by other load
PAUSE=${PAUSE:-0.5}   # seconds between load runs (lets the previous run's sockets settle)

PY=python3
LIB="$PY $BENCH_DIR/lib.py"

exec 9>&2   # the terminal's stderr, for log lines even from traps that fire inside a redirection
log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&9; }
die() { log "error: $*"; exit 1; }
has() { [[ " $1 " == *" $2 "* ]]; }

for v in ROUNDS DURATION RATE IDLE_CONNS BIG_CONNS BASE_PORT; do
    [[ ${!v} =~ ^[0-9]+$ && ${!v} -gt 0 ]] || die "$v must be a positive integer (got '${!v}')"
done
for t in $TARGETS; do
    case $t in direct|haproxy|nginx|lameduck|ld-log|ld-trace1|ld-trace100|ld-base) ;;
    *) die "unknown target '$t' (direct haproxy nginx lameduck ld-log ld-trace1 ld-trace100 ld-base)";; esac
done
for w in $WORKLOADS; do
    case $w in h1|close|h2|big|tcp|rate|idle|drain|tls_h1|tls_close|tls_h2) ;; *) die "unknown workload '$w' (h1 close h2 big tcp rate idle drain tls_h1 tls_close tls_h2)";; esac
done

# ------------------------------------------------------------------ process tracking & cleanup
PIDS=()        # every background process started by this script
TMP=""

tree_of() {    # a PID and all its descendants, children first
    local p=$1 c
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null || true); do tree_of "$c"; done
    echo "$p"
}

kill_tree() {  # kill_tree PID... : TERM (twice: lameduck's 2nd signal = immediate exit), then KILL
    local all=() p i
    for p in "$@"; do
        [[ -n $p ]] && kill -0 "$p" 2>/dev/null || continue
        all+=($(tree_of "$p"))
    done
    ((${#all[@]})) || return 0
    kill -TERM "${all[@]}" 2>/dev/null || true
    sleep 0.2
    kill -TERM "${all[@]}" 2>/dev/null || true
    for i in $(seq 30); do
        local alive=0
        for p in "${all[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
        ((alive)) || break
        sleep 0.1
    done
    kill -KILL "${all[@]}" 2>/dev/null || true
    for p in "$@"; do wait "$p" 2>/dev/null || true; done
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if ((${#PIDS[@]})); then kill_tree "${PIDS[@]}"; fi
    if [[ -n $TMP && -d $TMP ]]; then
        if [[ $KEEP_TMP == 1 || $rc != 0 ]]; then log "temp dir kept: $TMP"; else rm -rf "$TMP"; fi
    fi
    exit "$rc"
}
trap cleanup EXIT
set -E
trap 'log "error: line $LINENO: \`$BASH_COMMAND\` failed (exit $?)"' ERR
trap 'log "interrupted"; exit 130' INT
trap 'log "terminated"; exit 143' TERM

# Start a background process and remember it. Sets BG_PID.
start_bg() {
    "$@" &
    BG_PID=$!
    PIDS+=("$BG_PID")
}

# Run a bounded command "in the foreground" but through `wait`, so Ctrl-C is handled at once.
run_fg() {
    local rc=0
    "$@" &
    local p=$!
    PIDS+=("$p")
    wait "$p" || rc=$?
    forget_pid "$p"
    return "$rc"
}

forget_pid() {  # drop PIDs (exact matches) from PIDS
    local keep=() q p drop
    for q in ${PIDS[@]+"${PIDS[@]}"}; do
        drop=0
        for p in "$@"; do [[ $q == "$p" ]] && drop=1; done
        if ((!drop)); then keep+=("$q"); fi
    done
    PIDS=(${keep[@]+"${keep[@]}"})
}

wait_port() {  # wait_port PORT [SECONDS] : until something accepts on 127.0.0.1:PORT
    local port=$1 secs=${2:-10} i
    for ((i = 0; i < secs * 20; i++)); do
        if (exec 3<>/dev/tcp/127.0.0.1/"$port") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    return 1
}

port_busy() { (exec 3<>/dev/tcp/127.0.0.1/"$1") 2>/dev/null; }

# ------------------------------------------------------------------ tools
ensure_tools() {
    local pkgs=()
    command -v haproxy >/dev/null || pkgs+=(haproxy)
    command -v nginx >/dev/null || pkgs+=(nginx-light)
    command -v wrk >/dev/null || pkgs+=(wrk)
    command -v h2load >/dev/null || pkgs+=(nghttp2-client)
    command -v python3 >/dev/null || pkgs+=(python3)
    command -v taskset >/dev/null || pkgs+=(util-linux)
    command -v curl >/dev/null || pkgs+=(curl)
    command -v openssl >/dev/null || pkgs+=(openssl)
    # nginx's TCP proxy is the dynamic `stream` module; nginx-light does not ship it, this
    # small package does (it is what nginx-full pulls in for stream).
    [[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]] || pkgs+=(libnginx-mod-stream)
    if ((${#pkgs[@]})); then
        [[ $INSTALL == 1 ]] || die "missing: ${pkgs[*]} (INSTALL=0)"
        log "installing: ${pkgs[*]}"
        apt-get update -qq >&2 || true
        if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}" >&2; then
            # retry without the optional stream module so the rest can run
            local req=() pkg
            for pkg in "${pkgs[@]}"; do [[ $pkg == libnginx-mod-stream ]] || req+=("$pkg"); done
            if ((${#req[@]})); then
                DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${req[@]}" >&2 || die "apt-get install failed"
            fi
        fi
    fi
    # oha (fixed-rate latency): cached in bench/.tools so a second run reuses it
    OHA=""
    if has "$WORKLOADS" rate; then
        if [[ -x $BENCH_DIR/.tools/bin/oha ]]; then
            OHA=$BENCH_DIR/.tools/bin/oha
        elif command -v oha >/dev/null; then
            OHA=$(command -v oha)
        else
            [[ $INSTALL == 1 ]] || die "oha missing (INSTALL=0)"
            command -v cargo >/dev/null || die "oha missing and no cargo to install it"
            log "installing oha into bench/.tools (cargo install, takes a few minutes once)"
            cargo install oha --locked --root "$BENCH_DIR/.tools" >&2 || die "cargo install oha failed"
            OHA=$BENCH_DIR/.tools/bin/oha
        fi
    fi
    if [[ -f /usr/lib/nginx/modules/ngx_stream_module.so ]]; then NGINX_STREAM=1; else NGINX_STREAM=0; fi
}

# Any lameduck target (the plain one or an observability variant).
any_lameduck() { [[ " $TARGETS " == *" lameduck "* || " $TARGETS " == *" ld-"* ]]; }
any_trace() { [[ " $TARGETS " == *" ld-trace"* ]]; }

ensure_lameduck() {
    any_lameduck || return 0
    if [[ $BUILD == 1 ]]; then
        log "cargo build --release (no-op when up to date)"
        (cd "$REPO_DIR" && cargo build --release --quiet) >&2 || die "cargo build --release failed"
    fi
    [[ -x $LAMEDUCK_BIN ]] || die "no lameduck binary at $LAMEDUCK_BIN"
}

# ------------------------------------------------------------------ ports, configs, processes
UP_H1=$BASE_PORT;            UP_H2=$((BASE_PORT + 1))
HA_H1=$((BASE_PORT + 10));   HA_H2=$((BASE_PORT + 11));   HA_TCP=$((BASE_PORT + 12))
NG_H1=$((BASE_PORT + 20));   NG_H2=$((BASE_PORT + 21));   NG_TCP=$((BASE_PORT + 22))
LD_HTTP=$((BASE_PORT + 30)); LD_ADMIN=$((BASE_PORT + 31)); LD_TCP=$((BASE_PORT + 32)); LD_TCP_ADMIN=$((BASE_PORT + 33))
# Observability variants of lameduck (HTTP port, admin port) and the collector they export to.
declare -A VAR_HTTP=([ld-log]=$((BASE_PORT + 40)) [ld-trace1]=$((BASE_PORT + 42)) [ld-trace100]=$((BASE_PORT + 44)) [ld-base]=$((BASE_PORT + 47)))
declare -A VAR_ADMIN=([ld-log]=$((BASE_PORT + 41)) [ld-trace1]=$((BASE_PORT + 43)) [ld-trace100]=$((BASE_PORT + 45)) [ld-base]=$((BASE_PORT + 48)))
LAMEDUCK_BASE_BIN=${LAMEDUCK_BASE_BIN:-}
OTELCOL_PORT=$((BASE_PORT + 46))
# TLS: one port each, h2 and http/1.1 by ALPN.
HA_TLS=$((BASE_PORT + 13));  NG_TLS=$((BASE_PORT + 23));  LD_TLS=$((BASE_PORT + 34)); LD_TLS_ADMIN=$((BASE_PORT + 35))
has_tls() { has "$WORKLOADS" tls_h1 || has "$WORKLOADS" tls_close || has "$WORKLOADS" tls_h2; }

# One certificate for every target (ECDSA P-256, what cert-manager issues by default), so the
# TLS rows compare the proxies, not the keys. The clients (wrk, h2load) do not verify it.
make_tls_cert() {
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$TMP/tls.ext"
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout "$TMP/tls.key" \
        -out "$TMP/tls.crt" -days 2 -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
        >/dev/null 2>&1 || die "openssl could not make the benchmark certificate"
    cat "$TMP/tls.crt" "$TMP/tls.key" >"$TMP/tls.pem"   # HAProxy wants both in one file
}

render() {  # render TEMPLATE OUT
    local stream_load="" stream_block="" note="not available: TCP workload skipped for nginx"
    if ((NGINX_STREAM)); then
        stream_load="load_module /usr/lib/nginx/modules/ngx_stream_module.so;"
        stream_block="stream {
    # TCP passthrough (nginx stream module): one upstream connection per client connection.
    server {
        listen 127.0.0.1:$NG_TCP backlog=4096;
        proxy_pass 127.0.0.1:$UP_H1;
    }
}"
        note="loaded"
    fi
    local s
    s=$(<"$1")
    s=${s//@TMP@/$TMP}
    s=${s//@UPSTREAM_PORT@/$UP_H1}
    s=${s//@UPSTREAM_H2_PORT@/$UP_H2}
    s=${s//@HAPROXY_H1_PORT@/$HA_H1}
    s=${s//@HAPROXY_H2_PORT@/$HA_H2}
    s=${s//@HAPROXY_TCP_PORT@/$HA_TCP}
    s=${s//@NGINX_H1_PORT@/$NG_H1}
    s=${s//@NGINX_H2_PORT@/$NG_H2}
    s=${s//@NGINX_TCP_PORT@/$NG_TCP}
    s=${s//@HAPROXY_TLS_PORT@/$HA_TLS}
    s=${s//@NGINX_TLS_PORT@/$NG_TLS}
    s=${s//@PROXY_CPU@/$PROXY_CPU}
    s=${s//@NOFILE@/$NOFILE}
    s=${s//@LOAD_STREAM@/$stream_load}
    s=${s//@STREAM_BLOCK@/$stream_block}
    s=${s//@STREAM_NOTE@/$note}
    local haproxy_headers="" nginx_headers=""
    if [[ $PEER_HEADERS == 1 ]]; then
        haproxy_headers="    option forwardfor
    http-request set-header X-Forwarded-Proto http if !{ req.hdr(x-forwarded-proto) -m found }
    unique-id-format %{+X}o%pid-%rt
    unique-id-header X-Request-Id
    http-response set-header X-Request-Id %[unique-id]"
        nginx_headers="            proxy_set_header X-Forwarded-For \$proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto \$scheme;
            proxy_set_header X-Request-Id \$request_id;
            add_header X-Request-Id \$request_id always;"
    fi
    s=${s//@HAPROXY_HEADERS@/$haproxy_headers}
    s=${s//@NGINX_HEADERS@/$nginx_headers}
    printf '%s\n' "$s" >"$2"
}

declare -A TPID=()      # target -> main pid (for lameduck: the HTTP-mode process)
LD_TCP_PID=""
LD_TLS_PID=""

start_upstream() {
    render "$BENCH_DIR/nginx-upstream.conf.tmpl" "$TMP/nginx-upstream.conf"
    start_bg taskset -c "$UPSTREAM_CPU" nginx -p "$TMP" -c "$TMP/nginx-upstream.conf" -e "$TMP/nginx-upstream.err"
    TPID[direct]=$BG_PID
    wait_port "$UP_H1" && wait_port "$UP_H2" || die "upstream nginx did not start: $(cat "$TMP/nginx-upstream.err")"
}

start_target() {
    case $1 in
    direct) ;;
    haproxy)
        render "$BENCH_DIR/haproxy.cfg.tmpl" "$TMP/haproxy.cfg"
        start_bg taskset -c "$PROXY_CPU" haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/haproxy.log" 2>&1
        TPID[haproxy]=$BG_PID
        wait_port "$HA_H1" && wait_port "$HA_H2" && wait_port "$HA_TCP" && wait_port "$HA_TLS" || die "haproxy did not start: $(cat "$TMP/haproxy.log")"
        ;;
    nginx)
        render "$BENCH_DIR/nginx-proxy.conf.tmpl" "$TMP/nginx-proxy.conf"
        start_bg taskset -c "$PROXY_CPU" nginx -p "$TMP" -c "$TMP/nginx-proxy.conf" -e "$TMP/nginx-proxy.err"
        TPID[nginx]=$BG_PID
        wait_port "$NG_H1" && wait_port "$NG_H2" && wait_port "$NG_TLS" || die "nginx proxy did not start: $(cat "$TMP/nginx-proxy.err")"
        if ((NGINX_STREAM)); then wait_port "$NG_TCP" || die "nginx stream did not start"; fi
        ;;
    lameduck)
        # Pinned to one core like the others: lameduck sizes its runtime from the CPU
        # affinity mask, so this runs on one thread (like nbthread 1 / 1 nginx worker).
        # --max-connections above the idle test's connection count (default 10000).
        local common=(--upstream "127.0.0.1:$UP_H1" --log-level warn --max-connections $((IDLE_CONNS + 1000)))
        start_bg taskset -c "$PROXY_CPU" "$LAMEDUCK_BIN" --listen "127.0.0.1:$LD_HTTP" \
            --admin-listen "127.0.0.1:$LD_ADMIN" "${common[@]}" 2>"$TMP/lameduck-http.log"
        TPID[lameduck]=$BG_PID
        if has "$WORKLOADS" tcp; then
            start_bg taskset -c "$PROXY_CPU" "$LAMEDUCK_BIN" --listen "127.0.0.1:$LD_TCP" \
                --admin-listen "127.0.0.1:$LD_TCP_ADMIN" --mode tcp "${common[@]}" 2>"$TMP/lameduck-tcp.log"
            LD_TCP_PID=$BG_PID
            wait_port "$LD_TCP" || die "lameduck --mode tcp did not start: $(cat "$TMP/lameduck-tcp.log")"
        fi
        if has_tls; then
            # A third process, like --mode tcp: TLS is per listener.
            start_bg taskset -c "$PROXY_CPU" "$LAMEDUCK_BIN" --listen "127.0.0.1:$LD_TLS" \
                --admin-listen "127.0.0.1:$LD_TLS_ADMIN" --tls-cert "$TMP/tls.crt" --tls-key "$TMP/tls.key" \
                "${common[@]}" 2>"$TMP/lameduck-tls.log"
            LD_TLS_PID=$BG_PID
            wait_port "$LD_TLS" || die "lameduck --tls-cert did not start: $(cat "$TMP/lameduck-tls.log")"
        fi
        wait_port "$LD_HTTP" || die "lameduck did not start: $(cat "$TMP/lameduck-http.log")"
        ;;
    ld-*)
        local extra=() bin=$LAMEDUCK_BIN
        case $1 in
        ld-base) bin=$TMP/lameduck-base ;;
        # To /dev/null: the cost of making, queueing, formatting and writing each line,
        # without a disk in the figure (a container's stdout pipe would cost more).
        ld-log) extra=(--access-log json --access-log-file /dev/null) ;;
        ld-trace1) extra=(--otlp-endpoint "http://127.0.0.1:$OTELCOL_PORT" --trace-sample-ratio 0.01) ;;
        ld-trace100) extra=(--otlp-endpoint "http://127.0.0.1:$OTELCOL_PORT" --trace-sample-ratio 1) ;;
        esac
        start_bg taskset -c "$PROXY_CPU" "$bin" --listen "127.0.0.1:${VAR_HTTP[$1]}" \
            --admin-listen "127.0.0.1:${VAR_ADMIN[$1]}" --upstream "127.0.0.1:$UP_H1" --log-level warn \
            "${extra[@]}" 2>"$TMP/$1.log"
        TPID[$1]=$BG_PID
        wait_port "${VAR_HTTP[$1]}" || die "$1 did not start: $(cat "$TMP/$1.log")"
        ;;
    esac
}

# The OpenTelemetry Collector the ld-trace* variants export to: OTLP receiver, file exporter
# to /dev/null, on the upstream's CPU (it is part of the environment, like the upstream).
start_collector() {
    any_trace || return 0
    local bin
    bin=${OTELCOL_BIN:-$(bash "$REPO_DIR/scripts/otelcol-build.sh")} || die "cannot build the collector"
    cat >"$TMP/otelcol.yaml" <<YAML
receivers:
  otlp:
    protocols:
      http:
        endpoint: 127.0.0.1:$OTELCOL_PORT
exporters:
  file:
    path: /dev/null
service:
  telemetry:
    metrics:
      level: none
  pipelines:
    traces:
      receivers: [otlp]
      exporters: [file]
YAML
    start_bg taskset -c "$UPSTREAM_CPU" "$bin" --config "$TMP/otelcol.yaml" >"$TMP/otelcol.log" 2>&1
    COLLECTOR_PID=$BG_PID
    wait_port "$OTELCOL_PORT" 20 || die "the collector did not start: $(tail -5 "$TMP/otelcol.log")"
}

stop_target() {
    case $1 in
    direct) kill_tree "${TPID[direct]}"; forget_pid "${TPID[direct]}" ;;
    lameduck) kill_tree "${TPID[lameduck]}" $LD_TCP_PID $LD_TLS_PID; forget_pid "${TPID[lameduck]}" $LD_TCP_PID $LD_TLS_PID; LD_TCP_PID=""; LD_TLS_PID="" ;;
    ld-*) kill_tree "${TPID[$1]}"; forget_pid "${TPID[$1]}" ;;
    *) kill_tree "${TPID[$1]}"; forget_pid "${TPID[$1]}" ;;
    esac
}

h1_port() { case $1 in direct) echo "$UP_H1";; haproxy) echo "$HA_H1";; nginx) echo "$NG_H1";; lameduck) echo "$LD_HTTP";; ld-*) echo "${VAR_HTTP[$1]}";; esac; }
h2_port() { case $1 in direct) echo "$UP_H2";; haproxy) echo "$HA_H2";; nginx) echo "$NG_H2";; lameduck) echo "$LD_HTTP";; ld-*) echo "${VAR_HTTP[$1]}";; esac; }
tcp_port() {
    case $1 in
    direct) echo "$UP_H1";; haproxy) echo "$HA_TCP";; lameduck) echo "$LD_TCP";;
    nginx) ((NGINX_STREAM)) && echo "$NG_TCP" || echo "";;
    esac
}
tls_port() { case $1 in haproxy) echo "$HA_TLS";; nginx) echo "$NG_TLS";; lameduck) echo "$LD_TLS";; *) echo "";; esac; }
cpu_pids() {   # processes whose CPU/RSS count for TARGET in WORKLOAD
    if [[ $1 == lameduck && $2 == tcp ]]; then echo "$LD_TCP_PID";
    elif [[ $1 == lameduck && $2 == tls_* ]]; then echo "$LD_TLS_PID";
    else echo "${TPID[$1]}"; fi
}
client_cpu() { [[ $1 == direct ]] && echo "$DIRECT_CLIENT_CPU" || echo "$CLIENT_CPU"; }

warm_up() {    # one request of each kind so lazily initialised state exists before "idle RSS"
    local t=$1
    curl -fsS -o /dev/null "http://127.0.0.1:$(h1_port "$t")/" || die "warm-up request to $t failed"
    curl -fsS -o /dev/null --http2-prior-knowledge "http://127.0.0.1:$(h2_port "$t")/" 2>/dev/null ||
        log "warning: h2c warm-up request to $t failed"
}

# Connections the upstream nginx has accepted so far (stub_status "accepts"; the query's own
# connection included).
upstream_accepts() {
    curl -fsS "http://127.0.0.1:$UP_H1/_stub" 2>/dev/null | awk 'NR == 3 {print $1}' || echo ""
}

# ------------------------------------------------------------------ one load run
run_one() {   # run_one ROUND WORKLOAD TARGET [IS_RETRY]
    local round=$1 w=$2 t=$3 port tool url ccpu pids out hogs mark0 mark1 cpu0 cpu1 up0 up1
    local guard=$((DURATION + 30))
    case $w in
    h2) port=$(h2_port "$t") ;;
    tcp) port=$(tcp_port "$t") ;;
    tls_*) port=$(tls_port "$t") ;;
    *) port=$(h1_port "$t") ;;
    esac
    if [[ -z $port ]]; then
        return 0
    fi
    # The observability variants are measured on HTTP/1.1 keep-alive only.
    if [[ $t == ld-* && $w != h1 ]]; then
        return 0
    fi
    url="http://127.0.0.1:$port/"
    [[ $w == tls_* ]] && url="https://127.0.0.1:$port/"
    ccpu=$(client_cpu "$t")
    pids=$(cpu_pids "$t" "$w")
    out="$TMP/out-r$round-$w-$t.txt"
    hogs=$($LIB busy || true)
    mark0=$($LIB sysmark $$ || true)
    cpu0=$($LIB cpu $pids || true)
    up0=$(upstream_accepts)
    case $w in
    h1 | tcp)
        tool=wrk
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" wrk -t1 -c32 -d"${DURATION}s" -s "$BENCH_DIR/report.lua" "$url" >"$out" 2>&1 || true ;;
    close)
        tool=wrk
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" wrk -t1 -c32 -d"${DURATION}s" -H 'Connection: close' -s "$BENCH_DIR/report.lua" "$url" >"$out" 2>&1 || true ;;
    big)
        tool=wrk
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" wrk -t1 -c"$BIG_CONNS" -d"${DURATION}s" -s "$BENCH_DIR/report.lua" "${url}1m" >"$out" 2>&1 || true ;;
    h2)
        tool=h2load
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" h2load -c16 -m32 -t1 -D "$DURATION" "$url" >"$out" 2>&1 || true ;;
    tls_h1)   # (h) HTTPS keep-alive: wrk offers no ALPN, so HTTP/1.1 everywhere
        tool=wrk
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" wrk -t1 -c32 -d"${DURATION}s" -s "$BENCH_DIR/report.lua" "$url" >"$out" 2>&1 || true ;;
    tls_close)   # (i) a new TLS connection (a full handshake, or wrk's resumption) per request
        tool=wrk
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" wrk -t1 -c32 -d"${DURATION}s" -H 'Connection: close' -s "$BENCH_DIR/report.lua" "$url" >"$out" 2>&1 || true ;;
    tls_h2)   # (j) h2 over TLS, chosen by ALPN
        tool=h2load
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" h2load -c16 -m32 -t1 -D "$DURATION" "$url" >"$out" 2>&1 || true ;;
    rate)
        tool=oha
        # -q = fixed rate; --latency-correction = measure from the scheduled send time
        # (no coordinated omission); -c 50 = oha's default connection count, stated explicitly.
        run_fg timeout -k 5 "$guard" taskset -c "$ccpu" "$OHA" --no-tui --output-format json -q "$RATE" \
            --latency-correction -c 50 -z "${DURATION}s" "$url" >"$out" 2>"$out.err" || true ;;
    esac
    cpu1=$($LIB cpu $pids || true)
    up1=$(upstream_accepts)
    mark1=$($LIB sysmark $$ || true)
    hogs+=" $($LIB busy || true)"
    local rec
    rec=$($LIB parse "$tool" "$out" kind=run round="$round" workload="$w" target="$t" \
        cpu0="$cpu0" cpu1="$cpu1" up0="$up0" up1="$up1" mark0="$mark0" mark1="$mark1" hogs="$(echo $hogs | tr ' ' '\n' | sort -u | xargs)" \
        client_cpu="$ccpu") || { log "could not record $w/$t (round $round)"; return 0; }
    sleep "$PAUSE"
    # Something else loaded the machine during the run (e.g. a compiler): run it once more
    # (within a global budget) and keep the second result. The first one stays in the raw
    # results as "discarded".
    if [[ $rec == *'"busy": "'[0-9]* && ${4:-0} == 0 && $RETRY_BUDGET -gt 0 ]]; then
        RETRY_BUDGET=$((RETRY_BUDGET - 1))
        echo "${rec/\"kind\": \"run\"/\"kind\": \"discarded\"}" >>"$RESULTS"
        log "    other load during that run: running it again"
        sleep 2
        run_one "$round" "$w" "$t" 1
        return 0
    fi
    echo "$rec" >>"$RESULTS"
}

# ------------------------------------------------------------------ main
main() {
    [[ $(id -u) == 0 ]] || log "warning: not root; apt-get installs will fail if anything is missing"
    ensure_tools
    ensure_lameduck
    # Call the interpreter itself, not a version-manager shim (pyenv's shims are scripts that
    # can fail transiently while something else runs `pyenv rehash`).
    PY=$(python3 -c 'import sys; print(sys.executable)')
    LIB="$PY $BENCH_DIR/lib.py"

    local ncpu
    ncpu=$(nproc)
    if ((ncpu < 2)); then
        log "warning: 1 CPU: everything shares CPU 0"
        PROXY_CPU=0 UPSTREAM_CPU=0 CLIENT_CPU=0 DIRECT_CLIENT_CPU=0
    fi

    # 10k idle connections need ~10k fds in the proxy and in the client: raise the soft limit.
    ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
    NOFILE=$(ulimit -n)
    [[ $NOFILE == unlimited ]] && NOFILE=1048576
    if has "$WORKLOADS" idle || has "$WORKLOADS" drain; then
        if ((NOFILE < IDLE_CONNS + 500)); then
            log "warning: RLIMIT_NOFILE is $NOFILE: lowering IDLE_CONNS $IDLE_CONNS -> $((NOFILE - 500))"
            IDLE_CONNS=$((NOFILE - 500))
        fi
    fi
    if ((NOFILE > 65536)); then NOFILE=65536; fi

    for p in $UP_H1 $UP_H2 $HA_H1 $HA_H2 $HA_TCP $HA_TLS $NG_H1 $NG_H2 $NG_TCP $NG_TLS $LD_HTTP $LD_ADMIN $LD_TCP $LD_TCP_ADMIN \
        $LD_TLS $LD_TLS_ADMIN "${VAR_HTTP[@]}" "${VAR_ADMIN[@]}" $OTELCOL_PORT; do
        port_busy "$p" && die "port $p is in use (set BASE_PORT=...)"
    done

    TMP=$(mktemp -d /tmp/lameduck-bench.XXXXXX)
    chmod 755 "$TMP"   # nginx workers run as an unprivileged user and must read www/1m
    # Run a private copy: a `cargo build` during the run must not swap the binary under us.
    LAMEDUCK_DESC=""
    if any_lameduck; then
        LAMEDUCK_DESC="$LAMEDUCK_BIN (built $(date -r "$LAMEDUCK_BIN" '+%F %T'), sha256 $(sha256sum "$LAMEDUCK_BIN" | cut -c1-12); repo HEAD $(cd "$REPO_DIR" && git rev-parse --short HEAD 2>/dev/null || echo 'none')$(cd "$REPO_DIR" && git diff --quiet HEAD -- src Cargo.toml Cargo.lock 2>/dev/null || echo ' + uncommitted changes in src'))"
        cp "$LAMEDUCK_BIN" "$TMP/lameduck"
        LAMEDUCK_BIN=$TMP/lameduck
        if has "$TARGETS" ld-base; then
            [[ -x $LAMEDUCK_BASE_BIN ]] || die "ld-base needs LAMEDUCK_BASE_BIN (another lameduck binary)"
            LAMEDUCK_DESC+="; ld-base: $LAMEDUCK_BASE_BIN (sha256 $(sha256sum "$LAMEDUCK_BASE_BIN" | cut -c1-12))"
            cp "$LAMEDUCK_BASE_BIN" "$TMP/lameduck-base"
        fi
    fi
    mkdir -p "$TMP/www" "$RESULTS_DIR"
    head -c 1048576 /dev/urandom >"$TMP/www/1m"
    chmod 644 "$TMP/www/1m"
    make_tls_cert   # the HAProxy and nginx configs name it whatever the workloads
    RESULTS="$TMP/results.jsonl"
    : >"$RESULTS"

    local t w r i
    local tlist=($TARGETS)
    log "targets: ${tlist[*]} | workloads: $WORKLOADS | rounds: $ROUNDS x ${DURATION}s | tmp: $TMP"
    log "pinning: proxy -> CPU $PROXY_CPU, upstream -> CPU $UPSTREAM_CPU, client -> CPU $CLIENT_CPU (direct: CPU $DIRECT_CLIENT_CPU)"
    ((NGINX_STREAM)) || $PY -c 'import json,sys; print(json.dumps({"kind":"note","text":sys.argv[1]}))' \
        "nginx stream module not available: TCP workload (e) skipped for nginx" >>"$RESULTS"

    start_upstream
    start_collector
    for t in "${tlist[@]}"; do start_target "$t"; done
    for t in "${tlist[@]}"; do
        warm_up "$t"
        sleep 0.2
        echo "{\"kind\":\"mem\",\"phase\":\"idle\",\"target\":\"$t\",$($LIB mem $(cpu_pids "$t" h1) | sed 's/^{//')" >>"$RESULTS"
    done

    local loadw=()
    for w in h1 close h2 big tcp rate tls_h1 tls_close tls_h2; do
        if has "$WORKLOADS" "$w"; then loadw+=("$w"); fi
    done
    if ((${#loadw[@]})); then
        for ((r = 1; r <= ROUNDS; r++)); do
            # round-robin: each round starts with a different target
            local order=()
            for ((i = 0; i < ${#tlist[@]}; i++)); do order+=("${tlist[$(((i + r - 1) % ${#tlist[@]}))]}"); done
            log "round $r/$ROUNDS, order: ${order[*]}"
            for w in "${loadw[@]}"; do
                for t in "${order[@]}"; do
                    run_one "$r" "$w" "$t"
                done
            done
        done
        for t in "${tlist[@]}"; do
            echo "{\"kind\":\"mem\",\"phase\":\"peak\",\"target\":\"$t\",$($LIB mem $(cpu_pids "$t" h1) | sed 's/^{//')" >>"$RESULTS"
        done
        if has "$TARGETS" lameduck && [[ -n $LD_TCP_PID ]]; then
            local m
            m=$($LIB mem "$LD_TCP_PID")
            $PY -c 'import json,sys; m=json.loads(sys.argv[1]); print(json.dumps({"kind":"note","text":"lameduck --mode tcp process (a separate process, not in the table): peak RSS %.1f MiB" % (m["hwm_kb"]/1024)}))' "$m" >>"$RESULTS"
        fi
    fi

    if has "$WORKLOADS" idle; then
        log "(f) $IDLE_CONNS idle keep-alive connections per target (each target restarted fresh first)"
        for t in "${tlist[@]}"; do
            if [[ $t == direct ]]; then stop_target direct; start_upstream; else stop_target "$t"; start_target "$t"; fi
            warm_up "$t"
            sleep 0.5
            run_fg timeout -k 5 150 taskset -c "$(client_cpu "$t")" $PY "$BENCH_DIR/idle_conns.py" \
                --port "$(h1_port "$t")" --n "$IDLE_CONNS" --pids "$(cpu_pids "$t" h1)" --target "$t" \
                >>"$RESULTS" || log "idle test for $t failed"
        done
    fi

    if has "$WORKLOADS" drain && has "$TARGETS" lameduck; then
        log "drain timings (lameduck)"
        stop_target lameduck
        for t in haproxy nginx; do
            if has "$TARGETS" "$t"; then stop_target "$t"; fi
        done
        local scen="ready,tcp-1,http-1,http-10k,tcp-10k"
        run_fg timeout -k 5 400 taskset -c "$CLIENT_CPU" $PY "$BENCH_DIR/drain_probe.py" --bin "$LAMEDUCK_BIN" \
            --upstream "127.0.0.1:$UP_H1" --cpu "$PROXY_CPU" --n "$IDLE_CONNS" --hold 1 --scenarios "$scen" --tmp "$TMP" \
            >>"$RESULTS" 2>"$TMP/drain.err" || log "drain probe failed: $(tail -3 "$TMP/drain.err")"
    fi

    # ------------------------------------------------------------------ report
    local versions
    versions="HAProxy $(haproxy -v 2>&1 | awk 'NR == 1 {print $3}'), nginx $(nginx -v 2>&1 | sed 's|.*/||'), $( (wrk -v 2>&1 || true) | awk 'NR == 1 {print $1, $2}'), $(h2load --version 2>&1 | awk 'NR == 1 {print $1, $2}')"
    if [[ -n $OHA ]]; then versions+=", $($OHA --version 2>&1 | awk 'NR == 1')"; fi
    $PY - "$TMP/meta.json" <<EOF
import json, sys
json.dump({
    "date": "$(date -u '+%F %H:%M UTC')",
    "quick": "$QUICK" == "1",
    "rounds": $ROUNDS, "duration": $DURATION, "rate": $RATE, "idle_conns": $IDLE_CONNS, "drain_hold": 1,
    "targets": "$TARGETS".split(), "workloads": "$WORKLOADS".split(),
    "machine": "$(nproc) CPUs, $(lscpu | sed -n 's/^Model name: *//p'), $(awk '/MemTotal/{printf "%.0f", $2/1048576}' /proc/meminfo) GiB RAM",
    "kernel": "$(uname -sr)",
    "versions": "$versions",
    "pinning": "proxy under test -> CPU $PROXY_CPU (alone); upstream nginx -> CPU $UPSTREAM_CPU; load generator -> CPU $CLIENT_CPU (shares with the upstream); for direct the load generator gets CPU $DIRECT_CLIENT_CPU",
    "lameduck": "$LAMEDUCK_DESC",
    "peer headers": "HAProxy and nginx add X-Forwarded-For, X-Forwarded-Proto and a request id (to the app and back), as lameduck does" if "$PEER_HEADERS" == "1" else "off (PEER_HEADERS=0): HAProxy and nginx add no headers; lameduck still adds its own",
}, open(sys.argv[1], "w"), indent=1)
EOF
    local stamp
    stamp=$(date -u +%Y%m%dT%H%M%SZ)
    $LIB report "$RESULTS" "$TMP/meta.json" >"$RESULTS_DIR/latest.md"
    cp "$RESULTS" "$RESULTS_DIR/results-$stamp.jsonl"
    cp "$RESULTS" "$RESULTS_DIR/latest.jsonl"
    cp "$TMP/meta.json" "$RESULTS_DIR/latest.meta.json"   # lib.py report latest.jsonl latest.meta.json
    cp "$RESULTS_DIR/latest.md" "$RESULTS_DIR/report-$stamp.md"
    echo
    cat "$RESULTS_DIR/latest.md"
    log "written: $RESULTS_DIR/latest.md (raw: $RESULTS_DIR/latest.jsonl)"
}

main "$@"
