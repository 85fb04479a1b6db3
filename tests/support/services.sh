#!/usr/bin/env bash
# Throw-away PostgreSQL and Redis on loopback for the test suite (issue 10).
#
#   eval "$(bash tests/support/services.sh start)"   # starts both, prints the export lines
#   bash tests/support/services.sh stop              # stops them (reads TOKENGATE_TEST_SERVICES_DIR)
#
# Needs Debian's `postgresql` and `redis-server` packages. The cluster lives in a temp dir on a
# free port, owned by the `postgres` user when run as root (initdb refuses root), with fsync off:
# it holds test data only. Tests read TOKENGATE_TEST_PG_URL / TOKENGATE_TEST_REDIS_URL; each test
# creates its own database, so one server serves every test binary.
set -euo pipefail

say() { echo "services.sh: $*" >&2; }

# A port below the kernel's ephemeral range (net.ipv4.ip_local_port_range), so that outgoing
# connections of a busy machine cannot be holding it, and not listening now. A start that still
# fails to bind is retried on another port (see start_pg / start_redis).
free_port() {
    local lo p
    lo=$(awk '{print $1}' /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
    [ "$lo" -gt 12000 ] 2>/dev/null || lo=32768
    for _ in $(seq 1 200); do
        p=$((10000 + RANDOM % (lo - 10000)))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    say "no free port found"
    return 1
}

pg_bindir() {
    local d
    d=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then
        echo "$d"
    elif command -v initdb >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    else
        return 1
    fi
}

# Runs a command as the postgres user when we are root, else as ourselves.
as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

start() {
    local bin dir pgport rport
    bin=$(pg_bindir) || { say "PostgreSQL not found: apt-get install -y postgresql"; exit 1; }
    command -v redis-server >/dev/null || { say "redis-server not found: apt-get install -y redis-server"; exit 1; }
    dir=$(mktemp -d /tmp/tokengate-services.XXXXXX)
    chmod 755 "$dir"
    mkdir "$dir/pg" "$dir/run"
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$dir/pg" "$dir/run"
    fi
    as_pg "$bin/initdb" -D "$dir/pg" -U postgres -A trust -E UTF8 --no-sync >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; say "initdb failed"; exit 1; }
    local try
    for try in 1 2 3 4 5; do
        pgport=$(free_port)
        if as_pg "$bin/pg_ctl" -D "$dir/pg" -l "$dir/run/postgres.log" -w -t 30 \
            -o "-p $pgport -k $dir/run -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=500" \
            start >/dev/null; then
            break
        fi
        say "PostgreSQL did not start on port $pgport (try $try of 5)"
        if [ "$try" = 5 ]; then
            cat "$dir/run/postgres.log" >&2
            say "PostgreSQL did not start"
            exit 1
        fi
    done
    for try in 1 2 3 4 5; do
        rport=$(free_port)
        rm -f "$dir/redis.pid"
        if redis-server --port "$rport" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
            --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir"; then
            for _ in $(seq 1 50); do
                redis-cli -p "$rport" ping >/dev/null 2>&1 && break
                sleep 0.1
            done
            redis-cli -p "$rport" ping >/dev/null 2>&1 && break
        fi
        say "redis-server did not answer on port $rport (try $try of 5)"
        [ -f "$dir/redis.pid" ] && kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
        if [ "$try" = 5 ]; then
            cat "$dir/redis.log" >&2
            say "redis-server does not answer"
            exit 1
        fi
    done
    say "PostgreSQL on 127.0.0.1:$pgport, Redis on 127.0.0.1:$rport ($dir)"
    echo "export TOKENGATE_TEST_PG_URL='postgres://postgres@127.0.0.1:$pgport/postgres'"
    echo "export TOKENGATE_TEST_REDIS_URL='redis://127.0.0.1:$rport/'"
    echo "export TOKENGATE_TEST_SERVICES_DIR='$dir'"
}

stop() {
    local dir=${TOKENGATE_TEST_SERVICES_DIR:-}
    [ -n "$dir" ] && [ -d "$dir" ] || return 0
    local bin
    bin=$(pg_bindir) || true
    if [ -n "${bin:-}" ] && [ -f "$dir/pg/postmaster.pid" ]; then
        as_pg "$bin/pg_ctl" -D "$dir/pg" -m immediate stop >/dev/null 2>&1 || true
    fi
    if [ -f "$dir/redis.pid" ]; then
        kill "$(cat "$dir/redis.pid")" 2>/dev/null || true
    fi
    rm -rf "$dir"
}

case "${1:-start}" in
    start) start ;;
    stop) stop ;;
    *) say "usage: services.sh start|stop"; exit 64 ;;
esac
