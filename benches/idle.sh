#!/usr/bin/env bash
# Memory per idle connection (issue 18): nginx, HAProxy and tokengate side by side, each holding
# N idle client connections (default 10,000).
#
#   bash benches/idle.sh                      # all three, 10,000 connections (~1 min + build)
#   bash benches/idle.sh --conns 2000 --systems "tokengate"
#   bash benches/idle.sh --bin /tmp/tg-before --candidate /tmp/tg-after
#                                             # two saved tokengate builds side by side
#   options: --conns N  --systems "LIST" (of: nginx haproxy tokengate cand)  --bin BIN
#            --candidate BIN (another tokengate build, measured as system `cand`)  --keep
#
# What it does:
#   1. installs what is missing (nginx, haproxy, python3, curl: Debian packages) and builds release
#      (tokengate, examples/bench_upstream.rs) unless --bin is given;
#   2. raises the open-files limit to the hard limit (the client and every server inherit it);
#   3. starts the upstream (core 0) and each system under test (core 1), all on 127.0.0.1, all
#      forwarding `GET /idle/x` to the same upstream: nginx (1 worker, upstream keepalive),
#      HAProxy (1 thread, `http-reuse always`), tokengate (the path is a `public = true` rule:
#      no token; canonicalised, audited to a file and forwarded). Every timeout that would close an
#      idle connection is set to 600 s, every connection limit above N;
#   4. for each system in turn, a Python client (core 0) opens N connections and holds them:
#        base     RSS after a warm-up (100 requests on 10 connections, closed again)
#        opened   N connections accepted (the server holds N more file descriptors) and silent
#        served   one `GET /idle/x` answered on each, the connections then idle in keep-alive
#        closed   all closed again (what the process keeps)
#      RSS is `VmRSS` of the process (nginx: master + worker), read from /proc after the count
#      has settled; per connection = (RSS - base) / N. Kernel socket buffers are not in RSS
#      (they are the same for every system).
# The figures of one run are comparable with each other; RSS is not affected by the other builds
# on the machine. Method and results: docs/performance.md ("Idle connections").
set -euo pipefail

CONNS=10000
ONLY=""
BASE_BIN=""
CANDIDATE=""
KEEP=0
while [ $# -gt 0 ]; do
    case "$1" in
        --conns) CONNS="$2"; shift ;;
        --systems) ONLY="$2"; shift ;;
        --bin) BASE_BIN="$(realpath "$2")"; shift ;;
        --candidate) CANDIDATE="$(realpath "$2")"; shift ;;
        --keep) KEEP=1 ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "idle.sh: unknown option $1 (see --help)" >&2; exit 64 ;;
    esac
    shift
done

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PROG=idle.sh
# shellcheck source=benches/common.sh
. "$ROOT/benches/common.sh"

apt_need nginx:nginx haproxy:haproxy python3:python3 curl:curl
build_bins

ulimit -n "$(ulimit -Hn)"
NOFILE="$(ulimit -n)"
if [ "$NOFILE" -lt $((CONNS + 500)) ]; then
    echo "idle.sh: the open-files limit ($NOFILE) is too low for $CONNS connections" >&2
    exit 1
fi

start_work idle
start_upstream upstream 0
UP_PORT="$PORT_upstream"
MAXCONN=$((CONNS + 200))

# nginx: one worker, the upstream kept alive, no log, idle timeouts out of the way.
NGINX_PORT="$(free_port)"
mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
worker_rlimit_nofile $NOFILE;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
events { worker_connections $((NOFILE - 100)); multi_accept on; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/tmp/body;
    proxy_temp_path $WORK/nginx/tmp/proxy;
    fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
    uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
    scgi_temp_path $WORK/nginx/tmp/scgi;
    client_header_timeout 600s;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    upstream backend {
        server 127.0.0.1:$UP_PORT;
        keepalive 128;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT backlog=$MAXCONN;
        location / {
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF

# HAProxy: one thread, keep-alive both sides, idle upstream connections shared, no log.
HAPROXY_PORT="$(free_port)"
mkdir -p "$WORK/haproxy"
cat >"$WORK/haproxy/haproxy.cfg" <<EOF
global
    nbthread 1
    maxconn $MAXCONN
    # It counts two descriptors per connection and refuses to start when the hard limit is lower;
    # idle client connections need one each.
    no strict-limits
defaults
    mode http
    maxconn $MAXCONN
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout http-request 600s
    timeout http-keep-alive 600s
    option http-keep-alive
    http-reuse always
frontend idle
    bind 127.0.0.1:$HAPROXY_PORT
    backlog $MAXCONN
    default_backend upstream
backend upstream
    server up 127.0.0.1:$UP_PORT pool-max-conn 128
EOF

# tokengate: `/idle/**` public (no token), audited, forwarded; limits and timeouts out of the way.
tg_config() { # name -> writes $WORK/name/tokengate.toml, prints its port
    local dir="$WORK/$1" port
    port="$(free_port)"
    mkdir -p "$dir"
    cat >"$dir/tokengate.toml" <<EOF
[server]
listen = "127.0.0.1:$port"
max_connections = $MAXCONN
max_connections_per_ip = $MAXCONN
header_read_timeout = "600s"
h2_idle_timeout = "600s"
[admin]
listen = "127.0.0.1:$(free_port)"
[store]
path = "tokengate.db"
[audit]
path = "audit.log"

[[routes]]
name = "idle"
prefix = "/"
upstream = "http://127.0.0.1:$UP_PORT"

[[routes.rules]]
methods = ["GET"]
path = "/idle/**"
public = true
EOF
    echo "$port"
}

start_system() { # name -> sets PID_<name>, PORT_<name>
    local name="$1" port
    case "$name" in
        nginx)
            taskset -c 1 nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" &
            port="$NGINX_PORT" ;;
        haproxy)
            taskset -c 1 haproxy -db -f "$WORK/haproxy/haproxy.cfg" 2>"$WORK/haproxy/stderr.log" &
            port="$HAPROXY_PORT" ;;
        tokengate|cand)
            local bin="$TG"
            [ "$name" = cand ] && bin="$CANDIDATE"
            port="$(tg_config "$name")"
            "$bin" --config "$WORK/$name/tokengate.toml" store init >/dev/null 2>&1 || true
            (cd "$WORK/$name" && exec taskset -c 1 "$bin" --config tokengate.toml serve 2>stderr.log) &
            ;;
    esac
    PIDS+=($!)
    eval "PID_$name=$!"
    eval "PORT_$name=$port"
    wait_http "http://127.0.0.1:$port/idle/x"
}

SYSTEMS="nginx haproxy tokengate"
[ -n "$CANDIDATE" ] && SYSTEMS="$SYSTEMS cand"
[ -n "$ONLY" ] && SYSTEMS="$ONLY"
RESULTS="$WORK/results.tsv"
: >"$RESULTS"
log "load average: $(cut -d' ' -f1-3 /proc/loadavg); $CONNS connections per system; open files limit $NOFILE"
for s in $SYSTEMS; do
    log "$s: starting"
    start_system "$s"
    pid="$(eval echo "\$PID_$s")"
    port="$(eval echo "\$PORT_$s")"
    log "$s: opening $CONNS idle connections"
    taskset -c 0 python3 - "$s" "$pid" "$port" "$CONNS" >>"$RESULTS" <<'PY'
import os, socket, sys, time

name, pid, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
REQ = b"GET /idle/x HTTP/1.1\r\nHost: idle\r\n\r\n"

def pids():
    # nginx: the master and its worker(s); the others: one process.
    out = [pid]
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                pass
    return out

def rss_kib():
    total = 0
    for p in pids():
        with open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total

def fds():
    return sum(len(os.listdir(f"/proc/{p}/fd")) for p in pids())

def settled():
    # RSS once it stops moving (allocators return or touch pages lazily).
    last = rss_kib()
    for _ in range(20):
        time.sleep(0.25)
        now = rss_kib()
        if abs(now - last) < 64:
            return now
        last = now
    return last

def read_response(s):
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            sys.exit(f"idle.sh: {name} closed a connection")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        sys.exit(f"idle.sh: {name} answered {head[:40]!r}")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        k, _, v = line.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v)
    while len(rest) < length:
        rest += s.recv(4096)

def connect():
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

# Warm-up: the upstream pool, the caches, the allocator's first arenas.
warm = [connect() for _ in range(10)]
for _ in range(10):
    for s in warm:
        s.sendall(REQ)
        read_response(s)
for s in warm:
    s.close()
time.sleep(1)
fd0 = fds()
base = settled()

conns = []
for i in range(n):
    conns.append(connect())
deadline = time.time() + 60
# Accepted (not waiting in the listen queue): the server holds N more descriptors, give or take
# the few idle upstream connections a proxy may close meanwhile.
while fds() < fd0 + n - 64:
    if time.time() > deadline:
        sys.exit(f"idle.sh: {name} accepted only {fds() - fd0} of {n} connections")
    time.sleep(0.1)
opened = settled()

# 100 requests in flight at a time: each proxy's upstream connections stay near its pool size.
for i in range(0, n, 100):
    batch = conns[i:i + 100]
    for s in batch:
        s.sendall(REQ)
    for s in batch:
        read_response(s)
served = settled()

def peer_closed(s):
    s.setblocking(False)
    try:
        return s.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)

gone = sum(peer_closed(s) for s in conns)
if gone:
    sys.exit(f"idle.sh: {name} closed {gone} connections while they idled")

for s in conns:
    s.close()
time.sleep(2)
closed = settled()
print(f"{name}\t{n}\t{base}\t{opened}\t{served}\t{closed}")
PY
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
done

python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("\n# memory per idle connection (RSS delta / connections), one process on one core")
print(f"{'system':<10} {'conns':>6} {'base MiB':>9} {'opened: KiB/conn':>17} {'served: KiB/conn':>17} {'closed: MiB kept':>17}")
for name, n, base, opened, served, closed in rows:
    n, base, opened, served, closed = int(n), int(base), int(opened), int(served), int(closed)
    print(f"{name:<10} {n:>6} {base/1024:>9.1f} {(opened-base)/n:>17.2f} {(served-base)/n:>17.2f} {(closed-base)/1024:>17.1f}")
PY
