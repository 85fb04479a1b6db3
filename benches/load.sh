#!/usr/bin/env bash
# Load benchmark (issue 9): tokengate side by side with nginx and the bare upstream, in one run.
#
#   bash benches/load.sh            # full run: 5 interleaved repetitions, 10 s each (~12 min)
#   bash benches/load.sh --quick    # smoke run: 1 repetition, 3 s each, 5k req/s only (~1 min)
#   bash benches/load.sh --profile tg-full --only-profile   # perf profile of one system under wrk load
#   bash benches/load.sh --systems "tg-full tg-fwdauth" --reps 1 --duration 2 --rates ""
#                                   # smoke run of forward-auth beside proxy mode, closed loop only
#   bash benches/load.sh --systems "nginx haproxy tg-full" --reps 1 --duration 3 --rates ""
#                                   # smoke run of the three proxies, closed loop only
#   options: --reps N  --duration S  --rates "5000 15000" (empty: no open loop, no oha)
#            --conns N (connections of wrk and oha; default 50)
#            --cores N (CPU cores per system under test, default 1: the last N cores; nginx gets N
#            workers, HAProxy N threads, tokengate N runtime threads (it sizes its runtime from the
#            cores it may run on); the load generator and upstream get the cores left, or core 0
#            shared with the systems when N leaves none, which the summary flags)
#            --keep (keep the work dir)  --systems "LIST" (measure only these of the systems below)
#            --profile "SYSTEM..." (after the measurements, one more closed-loop run of each SYSTEM under
#            `perf record -e cpu-clock`, software sampling: this machine has no hardware counters;
#            prints the top symbols; perf.data is kept in the work dir with --keep)
#            --only-profile (skip the measurements)
#            --bin BIN (measure this tokengate binary as tg-full/tg-noauth instead of building the
#            working tree; with --candidate, an A/B of two saved builds without a rebuild)
#            --candidate BIN (also measure another tokengate build, e.g. an optimisation being
#            tried, as system `cand-full`: full pipeline, same store and token as tg-full, its own
#            audit file; before/after side by side in one run)
#            --workers N (tg-full, tg-noauth, tg-fwdauth get `server.workers = N`: N single-threaded
#            runtimes, one SO_REUSEPORT socket each; default: the key is not written, one shared
#            runtime)  --cand-workers N (the same for cand-full only: with `--candidate` set to the
#            same binary as the one measured, an A/B of the two runtime models in one run)
#
# What it does:
#   1. installs what is missing: nginx and wrk (Debian packages), oha (crates.io, `cargo install`);
#   2. builds release: the tokengate binary and the fast upstream (examples/bench_upstream.rs);
#   3. starts, on 127.0.0.1 only:
#        upstream      the backend every proxy forwards to          (core 0, with the load generator)
#        direct        a second upstream, measured without a proxy   (core 1)
#        nginx         plain reverse proxy: 1 worker, upstream keepalive, access_log off (core 1)
#        nginx-log     the same nginx writing a JSON access log line per request to a file, as it
#                      happens (no buffer): what tokengate's audit line costs, nginx's way (core 1)
#        haproxy       plain reverse proxy (Debian's HAProxy): 1 thread, HTTP keep-alive both
#                      sides, idle upstream connections reused (`http-reuse always`), no log (core 1)
#        tg-full       tokengate, full pipeline: valid token, rules, rate limit (never triggers),
#                      audit to a file                                            (core 1)
#        tg-noauth     tokengate, same config but the benchmarked rule is `public = true`
#                      (no authentication, authorisation or rate limit; still audited) (core 1)
#        tg-fwdauth    tokengate in forward-auth mode (docs/forward-auth.md): the load generator
#                      plays a trusted front proxy (127.0.0.1 in `server.trusted_proxies`) asking
#                      `/_tokengate/auth` with `X-Original-URI` = the benchmarked path and the
#                      token; same rules, store and token as tg-full; nothing is forwarded, so its
#                      req/s are decisions per second                                   (core 1)
#      Every system under test is pinned to core 1 (`taskset -c 1`), the load generator to core 0;
#      with --cores N, to the last N cores (N workers/threads each), the load generator to the rest.
#   4. closed loop, throughput: wrk, 1 thread, N connections (default 50), per system, in rotating
#      order, R repetitions (default 5);
#   5. open loop, latency: oha at fixed rates (default 5k and 15k req/s) with `--latency-correction`
#      (constant arrival rate; latency counted from when a request should have been sent, as wrk2
#      does: Debian ships no wrk2), same rotation;
#   6. prints per system: req/s, p50/p99/p99.9 (medians over repetitions, with min..max), the CPU
#      time the system under test used per request, and the ratios tokengate/nginx,
#      tokengate/direct and full/no-auth.
# Every request must be answered 200: any other status fails the run (so a rate limit or an auth
# failure can never pass for speed). Figures are noisy on a shared 2-core machine: compare the
# ratios of one run, not absolute numbers across runs. Method and results: docs/performance.md.
set -euo pipefail

REPS=5
DURATION=10
CONNS=50
RATES="5000 15000"
KEEP=0
QUICK=0
PROFILE=""
ONLY_PROFILE=0
CANDIDATE=""
BASE_BIN=""
ONLY_SYSTEMS=""
CORES=1
TG_SERVER_EXTRA=""
CAND_SERVER_EXTRA=""
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) QUICK=1; REPS=1; DURATION=3; RATES="5000" ;;
        --reps) REPS="$2"; shift ;;
        --duration) DURATION="$2"; shift ;;
        --conns) CONNS="$2"; shift ;;
        --rates) RATES="$2"; shift ;;
        --keep) KEEP=1 ;;
        --profile) PROFILE="$2"; shift ;;
        --only-profile) ONLY_PROFILE=1 ;;
        --candidate) CANDIDATE="$(realpath "$2")"; shift ;;
        --bin) BASE_BIN="$(realpath "$2")"; shift ;;
        --systems) ONLY_SYSTEMS="$2"; shift ;;
        --cores) CORES="$2"; shift ;;
        --workers) TG_SERVER_EXTRA="workers = $2"; shift ;;
        --cand-workers) CAND_SERVER_EXTRA="workers = $2"; shift ;;
        -h|--help) sed -n '2,64p' "$0"; exit 0 ;;
        *) echo "load.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PROG=load.sh
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"
if [ "$(nproc --all)" -lt 2 ]; then
    echo "load.sh: needs 2 cores (proxy on core 1, load generator on core 0)" >&2
    exit 1
fi
NPROC="$(nproc --all)"
case "$CORES" in ''|*[!0-9]*|0) echo "load.sh: --cores needs a positive number" >&2; exit 64 ;; esac
if [ "$CORES" -ge "$NPROC" ]; then
    # Nothing left for the load generator: it shares core 0 with the systems (noted in the summary).
    CORES="$NPROC"
    SUT_CPUS="0-$((NPROC - 1))"
    LOAD_CPUS="0"
    SHARED_NOTE="load generator and upstream SHARE core 0 with the systems under test"
else
    SUT_CPUS="$((NPROC - CORES))-$((NPROC - 1))"
    LOAD_CPUS="0-$((NPROC - CORES - 1))"
    # "1" rather than "1-1" (taskset takes both; the summary reads better).
    [ "$CORES" = 1 ] && SUT_CPUS="$((NPROC - 1))"
    [ "$((NPROC - CORES))" = 1 ] && LOAD_CPUS="0"
    SHARED_NOTE="load generator and upstream on cores $LOAD_CPUS"
fi
LOADGEN="taskset -c $LOAD_CPUS"
SUT="taskset -c $SUT_CPUS"
BENCH_PATH="/apps/billing/items"

# ---------------------------------------------------------------- tools
apt_need nginx:nginx haproxy:haproxy wrk:wrk python3:python3 curl:curl
if [ -n "$PROFILE" ]; then apt_need perf:linux-perf; fi
OHA="$(command -v oha || true)"
if [ -z "$OHA" ] && [ -x "$HOME/.cargo/bin/oha" ]; then OHA="$HOME/.cargo/bin/oha"; fi
if [ -z "$OHA" ] && [ -n "$RATES" ]; then
    log "installing oha (cargo install oha --locked; a few minutes, once)"
    cargo install oha --locked --quiet
    OHA="$HOME/.cargo/bin/oha"
fi

build_bins

# ---------------------------------------------------------------- processes
start_work load

start_upstream upstream "$LOAD_CPUS"
start_upstream direct "$SUT_CPUS"
UP_PORT="$PORT_upstream"
DIRECT_PORT="$PORT_direct"

# nginx: plain reverse proxy, one worker, upstream keepalive, no access log; `nginx-log` is the
# same with a JSON access log line per request written to a file as it happens (no `buffer=`),
# the closest nginx comes to tokengate's audit line.
start_nginx() { # name port access_log_directive
    local dir="$WORK/$1"
    mkdir -p "$dir/logs" "$dir/tmp"
    cat >"$dir/nginx.conf" <<EOF
worker_processes $CORES;
daemon off;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 4096; multi_accept on; }
http {
    log_format audit escape=json '{"time":"\$time_iso8601","request_id":"\$request_id",'
        '"client_ip":"\$remote_addr","method":"\$request_method","path":"\$uri",'
        '"status":\$status,"bytes":\$body_bytes_sent,"duration":\$request_time,'
        '"upstream":"\$upstream_addr","user_agent":"\$http_user_agent"}';
    $3
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    keepalive_requests 1000000;
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 128;
        keepalive_requests 1000000;
    }
    server {
        listen 127.0.0.1:$2;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    $SUT nginx -p "$dir" -c "$dir/nginx.conf" &
    PIDS+=($!)
}
NGINX_PORT="$(free_port)"
start_nginx nginx "$NGINX_PORT" "access_log off;"
PID_nginx=$!
NGINX_LOG_PORT="$(free_port)"
start_nginx nginx-log "$NGINX_LOG_PORT" "access_log $WORK/nginx-log/logs/access.log audit;"
PID_nginx_log=$!

# HAProxy: plain reverse proxy on the same upstream, one thread per core, keep-alive on both
# sides, idle upstream connections shared between client connections (as nginx's `keepalive`),
# no log. One process (threads), so its CPU time is the process's.
HAPROXY_PORT="$(free_port)"
mkdir -p "$WORK/haproxy"
# HAProxy needs two descriptors per connection and will not start if it cannot have them.
HAPROXY_MAXCONN=$(( ($(ulimit -n) - 100) / 2 ))
[ "$HAPROXY_MAXCONN" -gt 20000 ] && HAPROXY_MAXCONN=20000
cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread $CORES
    maxconn $HAPROXY_MAXCONN
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always
frontend bench
    bind 127.0.0.1:$HAPROXY_PORT
    default_backend upstream
backend upstream
    server up 127.0.0.1:$UP_PORT pool-max-conn 128
EOF
$SUT haproxy -db -f "$WORK/haproxy/haproxy.cfg" 2>"$WORK/haproxy/stderr.log" &
PIDS+=($!)
PID_haproxy=$!

# tokengate: full pipeline and no-auth mode (same config, the benchmarked rule made public).
tg_config() { # name public(true|false) [extra server keys] -> writes $WORK/name/tokengate.toml, prints its path
    local name="$1" public="$2" server_extra="${3:-}" dir="$WORK/$1"
    mkdir -p "$dir"
    local rule='permission = "apps:read"'
    [ "$public" = true ] && rule='public = true'
    cat >"$dir/tokengate.toml" <<EOF
[server]
listen = "127.0.0.1:$(free_port)"
# The load generator is one client address holding --conns connections.
max_connections_per_ip = $((CONNS > 512 ? CONNS : 512))
$server_extra
[admin]
listen = "127.0.0.1:$(free_port)"
[store]
path = "tokengate.db"
[audit]
path = "audit.log"
[rate_limit]
# Far above what the benchmark sends: the check runs on every request and never refuses.
requests_per_second = 100000000
burst = 100000000

[[routes]]
name = "api"
prefix = "/"
upstream = "http://127.0.0.1:$UP_PORT"

[[routes.rules]]
methods = ["GET", "HEAD"]
path = "/apps/{app}/**"
$rule

[[routes.rules]]
methods = ["POST"]
path = "/apps/{app}/deploy"
permission = "apps:deploy"

[[routes.rules]]
methods = ["GET"]
path = "/health"
public = true
EOF
    echo "$dir/tokengate.toml"
}
FULL_CFG="$(tg_config tg-full false "$TG_SERVER_EXTRA")"
NOAUTH_CFG="$(tg_config tg-noauth true "$TG_SERVER_EXTRA")"
# Builds since the store-faults change create the store only with `store init`; older builds
# (measured with --bin) create it on first use and do not know the command.
"$TG" --config "$FULL_CFG" store init >/dev/null 2>&1 || true
"$TG" --config "$FULL_CFG" account create bench >/dev/null
# The token lives only in this shell variable (and the load generators' argv); the store and
# audit log hold its hash and prefix; the work dir is deleted at exit.
TOKEN="$("$TG" --config "$FULL_CFG" token create --account bench --name load --permission apps:read --expires 30d 2>/dev/null | head -n 1)"
AUTH="Authorization: Bearer $TOKEN"
for cfg in "$FULL_CFG" "$NOAUTH_CFG"; do
    (cd "$(dirname "$cfg")" && exec $SUT "$TG" --config "$cfg" serve 2>"$(dirname "$cfg")/stderr.log") &
    PIDS+=($!)
done
PID_tg_full="${PIDS[-2]}"
PID_tg_noauth="${PIDS[-1]}"
port_of() { sed -n 's/^listen = "127.0.0.1:\([0-9]*\)"$/\1/p' "$1" | head -n 1; }
FULL_PORT="$(port_of "$FULL_CFG")"
NOAUTH_PORT="$(port_of "$NOAUTH_CFG")"

# Forward-auth mode: its own process on the same store (same token), the load generator trusted.
FWD_CFG="$(tg_config tg-fwdauth false "trusted_proxies = [\"127.0.0.1/32\"]
$TG_SERVER_EXTRA")"
printf '\n[forward_auth]\n' >>"$FWD_CFG"
sed -i "s|^path = \"tokengate.db\"|path = \"$(dirname "$FULL_CFG")/tokengate.db\"|" "$FWD_CFG"
(cd "$(dirname "$FWD_CFG")" && exec $SUT "$TG" --config "$FWD_CFG" serve 2>"$(dirname "$FWD_CFG")/stderr.log") &
PIDS+=($!)
PID_tg_fwdauth=$!
FWD_PORT="$(port_of "$FWD_CFG")"
FWD_HEADER="X-Original-URI: $BENCH_PATH"

SYSTEMS="direct nginx nginx-log haproxy tg-full tg-noauth tg-fwdauth"
if [ -n "$CANDIDATE" ]; then
    # Same store (so the same token works; SQLite in WAL mode serves both), own ports and audit.
    CAND_CFG="$(tg_config cand-full false "$CAND_SERVER_EXTRA")"
    sed -i "s|^path = \"tokengate.db\"|path = \"$(dirname "$FULL_CFG")/tokengate.db\"|" "$CAND_CFG"
    (cd "$(dirname "$CAND_CFG")" && exec $SUT "$CANDIDATE" --config "$CAND_CFG" serve 2>"$(dirname "$CAND_CFG")/stderr.log") &
    PIDS+=($!)
    PID_cand_full=$!
    CAND_PORT="$(port_of "$CAND_CFG")"
    SYSTEMS="$SYSTEMS cand-full"
fi
url_of() {
    case "$1" in
        direct) echo "http://127.0.0.1:$DIRECT_PORT$BENCH_PATH" ;;
        nginx) echo "http://127.0.0.1:$NGINX_PORT$BENCH_PATH" ;;
        nginx-log) echo "http://127.0.0.1:$NGINX_LOG_PORT$BENCH_PATH" ;;
        haproxy) echo "http://127.0.0.1:$HAPROXY_PORT$BENCH_PATH" ;;
        tg-full) echo "http://127.0.0.1:$FULL_PORT$BENCH_PATH" ;;
        tg-noauth) echo "http://127.0.0.1:$NOAUTH_PORT$BENCH_PATH" ;;
        cand-full) echo "http://127.0.0.1:$CAND_PORT$BENCH_PATH" ;;
        tg-fwdauth) echo "http://127.0.0.1:$FWD_PORT/_tokengate/auth" ;;
    esac
}
# The request headers of a system: the token everywhere; tg-fwdauth also gets the description a
# front proxy sends (nginx's dialect).
hdrs_of() {
    HDRS=(-H "$AUTH")
    if [ "$1" = tg-fwdauth ]; then HDRS+=(-H "$FWD_HEADER"); fi
}
pid_of() {
    case "$1" in
        direct) echo "$PID_direct" ;;
        nginx) echo "$PID_nginx" ;;
        nginx-log) echo "$PID_nginx_log" ;;
        haproxy) echo "$PID_haproxy" ;;
        tg-full) echo "$PID_tg_full" ;;
        tg-noauth) echo "$PID_tg_noauth" ;;
        cand-full) echo "$PID_cand_full" ;;
        tg-fwdauth) echo "$PID_tg_fwdauth" ;;
    esac
}
# Only the systems measured must answer (a saved older build may not know every system's config,
# e.g. `[forward_auth]` before issue 17).
if [ -n "$ONLY_SYSTEMS" ]; then
    for s in $ONLY_SYSTEMS; do
        case " $SYSTEMS " in *" $s "*) ;; *) echo "load.sh: unknown system $s (of: $SYSTEMS)" >&2; exit 64 ;; esac
    done
    SYSTEMS="$ONLY_SYSTEMS"
fi
# Every proxy gets the same header, so the request bytes are identical everywhere.
for s in $SYSTEMS; do
    if [ "$s" = tg-fwdauth ]; then
        wait_http "http://127.0.0.1:$FWD_PORT$BENCH_PATH" "$AUTH"
        curl -fsS -o /dev/null -H "$AUTH" -H "$FWD_HEADER" "$(url_of tg-fwdauth)" \
            || { echo "load.sh: tg-fwdauth did not allow the benchmarked request" >&2; exit 1; }
    else
        wait_http "$(url_of "$s")" "$AUTH"
    fi
done
curl -fsS -o /dev/null -w '' "$(url_of tg-full)" 2>/dev/null && { echo "load.sh: tg-full answered without a token" >&2; exit 1; }

# CPU time (user + system, clock ticks) of a process and its children's threads (nginx worker).
cpu_ticks() {
    local pid="$1" total=0 p
    for p in "$pid" $(pgrep -P "$pid" || true); do
        if [ -r "/proc/$p/stat" ]; then
            total=$((total + $(awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$p/stat")))
        fi
    done
    echo "$total"
}
TICKS="$(getconf CLK_TCK)"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"

rotate() { # rep -> systems in an order that moves by one each repetition
    local n="$1" arr=($SYSTEMS) i out=()
    for i in "${!arr[@]}"; do out+=("${arr[$(((i + n) % ${#arr[@]}))]}"); done
    echo "${out[@]}"
}

busy_note() {
    if pgrep -x rustc >/dev/null || pgrep -x cc1 >/dev/null; then echo "busy"; else echo "quiet"; fi
}

run_wrk() { # system rep
    local s="$1" rep="$2" pid out c0 c1
    pid="$(pid_of "$s")"
    c0="$(cpu_ticks "$pid")"
    hdrs_of "$s"
    out="$($LOADGEN wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${HDRS[@]}" "$(url_of "$s")")"
    c1="$(cpu_ticks "$pid")"
    echo "$out" >"$WORK/wrk-$s-$rep.txt"
    if echo "$out" | grep -q 'Non-2xx'; then
        echo "load.sh: $s answered non-2xx under load:" >&2
        echo "$out" >&2
        exit 1
    fi
    python3 - "$s" "$rep" "$((c1 - c0))" "$TICKS" "$(busy_note)" "$WORK/wrk-$s-$rep.txt" >>"$RESULTS" <<'PY'
import re, sys
s, rep, ticks, hz, busy = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
out = open(sys.argv[6]).read()
def dur(v):
    m = re.match(r"([\d.]+)(us|ms|s)", v)
    return float(m.group(1)) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[m.group(2)]
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
reqs = int(re.search(r"(\d+) requests in", out).group(1))
p = {k: dur(v) for k, v in re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
cpu_us = ticks / hz * 1e6 / max(reqs, 1)
print(f"closed\t{s}\t{rep}\t{rps:.0f}\t{p.get('50', 0):.3f}\t{p.get('99', 0):.3f}\t\t{cpu_us:.1f}\t{busy}")
PY
}

run_oha() { # system rate rep
    local s="$1" rate="$2" rep="$3" pid json c0 c1
    pid="$(pid_of "$s")"
    c0="$(cpu_ticks "$pid")"
    json="$WORK/oha-$s-$rate-$rep.json"
    hdrs_of "$s"
    $LOADGEN "$OHA" --no-tui --output-format json -z "${DURATION}s" -q "$rate" --latency-correction \
        -c "$CONNS" "${HDRS[@]}" "$(url_of "$s")" >"$json"
    c1="$(cpu_ticks "$pid")"
    python3 - "$s" "$rate" "$rep" "$json" "$((c1 - c0))" "$TICKS" "$(busy_note)" >>"$RESULTS" <<'PY'
import json, sys
s, rate, rep, path, ticks, hz, busy = sys.argv[1:8]
d = json.load(open(path))
codes = d.get("statusCodeDistribution", {})
bad = {k: v for k, v in codes.items() if k != "200"}
# Requests still in flight when the duration ends are cut off by oha itself; anything else fails.
errors = {k: v for k, v in d.get("errorDistribution", {}).items() if k != "aborted due to deadline"}
if bad or errors:
    sys.exit(f"load.sh: {s} at {rate}/s: statuses {codes}, errors {errors}")
n = sum(codes.values())
lp = d["latencyPercentiles"]
cpu_us = int(ticks) / int(hz) * 1e6 / max(n, 1)
print(f"open{rate}\t{s}\t{rep}\t{d['summary']['requestsPerSec']:.0f}\t{lp['p50']*1e3:.3f}\t{lp['p99']*1e3:.3f}\t{lp['p99.9']*1e3:.3f}\t{cpu_us:.1f}\t{busy}")
PY
}

log "load average: $(cut -d' ' -f1-3 /proc/loadavg); other builds: $(busy_note)"
log "warm-up"
for s in $SYSTEMS; do
    hdrs_of "$s"
    $LOADGEN wrk -t1 -c"$CONNS" -d"$([ "$QUICK" = 1 ] && echo 1 || echo 3)s" "${HDRS[@]}" "$(url_of "$s")" >/dev/null
done

if [ "$ONLY_PROFILE" = 1 ]; then REPS=0; RATES=""; fi
for rep in $(seq 1 "$REPS"); do
    for s in $(rotate "$rep"); do
        log "closed loop  rep $rep/$REPS  $s"
        run_wrk "$s" "$rep"
    done
done
for rate in $RATES; do
    for rep in $(seq 1 "$REPS"); do
        for s in $(rotate "$rep"); do
            log "open loop ${rate}/s  rep $rep/$REPS  $s"
            run_oha "$s" "$rate" "$rep"
        done
    done
done

if [ -n "$PROFILE" ]; then
  for P in $PROFILE; do
    log "profile: $P under wrk, ${DURATION}s, perf record -e cpu-clock"
    # nginx does its work in its worker, a child of the master.
    PROF_PIDS="$(echo "$(pid_of "$P")" $(pgrep -P "$(pid_of "$P")" || true) | tr ' ' ',')"
    perf record -q -e cpu-clock -F 999 --call-graph dwarf,16384 -o "$WORK/perf-$P.data" -p "$PROF_PIDS" \
        -- sleep "$DURATION" 2>/dev/null &
    PERF_PID=$!
    sleep 0.2
    hdrs_of "$P"
    $LOADGEN wrk -t1 -c"$CONNS" -d"$((DURATION - 1))s" "${HDRS[@]}" "$(url_of "$P")" >"$WORK/wrk-profile-$P.txt"
    wait "$PERF_PID" || true
    echo "## profile of $P: $(grep Requests/sec "$WORK/wrk-profile-$P.txt")"
    echo "## share by thread and object"
    perf report -i "$WORK/perf-$P.data" --stdio --no-children --sort comm,dso -g none 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | head -12 || true
    echo "## self time by symbol (top 40)"
    perf report -i "$WORK/perf-$P.data" --stdio --no-children --sort dso,symbol -g none --percent-limit 0.4 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | cut -c1-150 | head -40 || true
    echo "## inclusive time by symbol (top 60)"
    perf report -i "$WORK/perf-$P.data" --stdio --children --sort symbol -g none --percent-limit 2 2>/dev/null \
        | grep -v '^#' | grep -v '^$' | grep -v '(inlined)' | cut -c1-150 | head -60 || true
  done
    [ "$ONLY_PROFILE" = 1 ] && exit 0
fi

# The full pipeline really ran: one audit line per request on tg-full, none refused.
kill -TERM "$PID_tg_full" "$PID_tg_noauth" "$PID_tg_fwdauth" ${PID_cand_full:-} 2>/dev/null || true
wait "$PID_tg_full" "$PID_tg_noauth" "$PID_tg_fwdauth" ${PID_cand_full:-} 2>/dev/null || true
FULL_LINES="$(grep -c '"kind":"request"' "$WORK/tg-full/audit.log" || true)"
# Allowed besides "ok": the one request sent without a token at start-up (to prove tg-full
# checks), and requests oha abandons when a run's duration ends (client_closed, 499).
FULL_DENIED="$(grep '"kind":"request"' "$WORK/tg-full/audit.log" | grep -v '"reason":"ok"' \
    | grep -v '"reason":"missing_token"' | grep -vc '"reason":"client_closed"' || true)"
# tg-fwdauth: every decision allowed (ok), each one a forward-auth line.
FWD_LINES="$(grep -c '"mode":"forward_auth"' "$WORK/tg-fwdauth/audit.log" || true)"
FWD_DENIED="$(grep '"mode":"forward_auth"' "$WORK/tg-fwdauth/audit.log" | grep -v '"reason":"ok"' \
    | grep -vc '"reason":"client_closed"' || true)"
NOAUTH_TOKEN_LINES="$(grep '"kind":"request"' "$WORK/tg-noauth/audit.log" | grep -c '"auth_type":"api_token"' || true)"

RUNTIMES="tokengate runtime: ${TG_SERVER_EXTRA:-one shared}${CANDIDATE:+, cand-full: ${CAND_SERVER_EXTRA:-one shared}}"
python3 - "$RESULTS" "$REPS" "$DURATION" "$CONNS" "$FULL_LINES" "$FULL_DENIED" "$NOAUTH_TOKEN_LINES" "$FWD_LINES" "$FWD_DENIED" "$SUT_CPUS" "$SHARED_NOTE; $RUNTIMES" <<'PY'
import statistics as st, sys, collections
path, reps, dur, conns, lines, denied, noauth_tok, fwd_lines, fwd_denied, sut_cpus, shared = sys.argv[1:12]
rows = [l.rstrip("\n").split("\t") for l in open(path) if l.strip()]
by = collections.defaultdict(list)
for mode, s, rep, rps, p50, p99, p999, cpu, busy in rows:
    by[(mode, s)].append(dict(rps=float(rps), p50=float(p50), p99=float(p99),
                              p999=float(p999) if p999 else None, cpu=float(cpu), busy=busy))
systems = ["direct", "nginx", "nginx-log", "haproxy", "tg-full", "tg-noauth", "tg-fwdauth", "cand-full"]
modes = sorted({m for m, _ in by}, key=lambda m: (m != "closed", len(m), m))
def med(xs):
    xs = [x for x in xs if x is not None]
    return st.median(xs) if xs else None
def fmt(xs, unit="", prec=0):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    return f"{st.median(xs):.{prec}f}{unit} ({min(xs):.{prec}f}..{max(xs):.{prec}f})"
print(f"\n# tokengate load benchmark: {reps} repetition(s) x {dur} s, {conns} connections, systems on cores {sut_cpus}, {shared}")
busy = sum(r["busy"] == "busy" for v in by.values() for r in v)
print(f"# runs with other builds (rustc/cc1) active on the machine: {busy} of {len(rows)}: figures are noisy, compare ratios")
for mode in modes:
    title = "closed loop (wrk): throughput" if mode == "closed" else f"open loop (oha -q {mode[4:]} --latency-correction): latency"
    print(f"\n## {title}; median (min..max) over repetitions; latencies in ms")
    print(f"{'system':<10} {'req/s':>22} {'p50':>22} {'p99':>22} {'p99.9':>22} {'CPU us/req':>18}")
    for s in systems:
        v = by.get((mode, s), [])
        if not v:
            continue
        # An open-loop run that could not keep its rate measured a queue, not the system.
        sat = ""
        if mode != "closed" and med([r["rps"] for r in v]) < 0.97 * float(mode[4:]):
            sat = "  SATURATED (rate not reached: latency is queueing)"
        print(f"{s:<10} {fmt([r['rps'] for r in v]):>22} {fmt([r['p50'] for r in v], prec=3):>22} "
              f"{fmt([r['p99'] for r in v], prec=3):>22} {fmt([r['p999'] for r in v], prec=3):>22} "
              f"{fmt([r['cpu'] for r in v], prec=1):>18}{sat}")
def ratio(mode, key, a, b):
    x = med([r[key] for r in by.get((mode, a), [])])
    y = med([r[key] for r in by.get((mode, b), [])])
    return x / y if x and y else None
print("\n## ratios (of medians)")
def line(label, r, target=None, higher_better=True):
    if r is None:
        return
    ok = ""
    if target is not None:
        ok = "  MET" if (r >= target if higher_better else r <= target) else "  missed"
        ok += f" (target {'>=' if higher_better else '<='} {target})"
    print(f"{label:<50} {r:6.3f}{ok}")
line("throughput tg-full / nginx", ratio("closed", "rps", "tg-full", "nginx"), 1.15)
line("throughput tg-full / haproxy", ratio("closed", "rps", "tg-full", "haproxy"))
line("throughput haproxy / nginx", ratio("closed", "rps", "haproxy", "nginx"))
line("throughput tg-full / direct", ratio("closed", "rps", "tg-full", "direct"))
line("throughput tg-full / tg-noauth", ratio("closed", "rps", "tg-full", "tg-noauth"), 0.95)
line("CPU per request tg-full / nginx", ratio("closed", "cpu", "tg-full", "nginx"), None)
line("throughput tg-full / nginx-log", ratio("closed", "rps", "tg-full", "nginx-log"))
line("CPU per request tg-full / nginx-log", ratio("closed", "cpu", "tg-full", "nginx-log"), None)
line("CPU per request tg-full / haproxy", ratio("closed", "cpu", "tg-full", "haproxy"), None)
line("CPU per request tg-full / tg-noauth", ratio("closed", "cpu", "tg-full", "tg-noauth"), None)
line("throughput cand-full / tg-full (candidate build)", ratio("closed", "rps", "cand-full", "tg-full"))
line("throughput cand-full / nginx", ratio("closed", "rps", "cand-full", "nginx"), 1.15)
line("CPU per request cand-full / tg-full", ratio("closed", "cpu", "cand-full", "tg-full"))
line("decisions/s tg-fwdauth / proxied req/s tg-full", ratio("closed", "rps", "tg-fwdauth", "tg-full"))
line("CPU per decision tg-fwdauth / per request tg-full", ratio("closed", "cpu", "tg-fwdauth", "tg-full"))
for mode in modes:
    if mode == "closed":
        continue
    line(f"{mode[4:]}/s p50 tg-full / nginx", ratio(mode, "p50", "tg-full", "nginx"), 1.0, False)
    line(f"{mode[4:]}/s p99 tg-full / nginx", ratio(mode, "p99", "tg-full", "nginx"), 1.0, False)
    line(f"{mode[4:]}/s p50 tg-full / tg-noauth", ratio(mode, "p50", "tg-full", "tg-noauth"))
print(f"\n# tg-full audit log: {lines} request lines, {denied} not allowed; tg-noauth lines with a token: {noauth_tok}")
print(f"# tg-fwdauth audit log: {fwd_lines} forward-auth decisions, {fwd_denied} not allowed")
PY
case " $SYSTEMS " in *" nginx-log "*)
    echo "# nginx-log access log: $(wc -l <"$WORK/nginx-log/logs/access.log" 2>/dev/null || echo 0) lines" ;;
esac
if [ "$FWD_DENIED" != 0 ]; then
    echo "load.sh: tg-fwdauth refused $FWD_DENIED decisions: the figures are not valid" >&2
    exit 1
fi
if [ "$FULL_DENIED" != 0 ]; then
    echo "load.sh: tg-full refused $FULL_DENIED requests: the figures are not valid" >&2
    exit 1
fi
