# Shared by benches/load.sh and benches/idle.sh (sourced, not run). Expects ROOT, TARGET_DIR,
# BASE_BIN and KEEP set; `PROG` names the script in messages.

log() { printf '== %s\n' "$*" >&2; }

# Installs the Debian packages named, those whose command is missing (`apt_need cmd[:package] ...`).
apt_need() {
    local need=() t cmd pkg
    for t in "$@"; do
        cmd="${t%%:*}"
        pkg="${t#*:}"
        command -v "$cmd" >/dev/null || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]} (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq "${need[@]}" >/dev/null
    fi
}

# Sets TG (the tokengate binary measured: BASE_BIN when given, else a release build of the working
# tree) and UPSTREAM_BIN (examples/bench_upstream.rs, built when missing).
build_bins() {
    UPSTREAM_BIN="$TARGET_DIR/release/examples/bench_upstream"
    if [ -n "$BASE_BIN" ]; then
        # A given build (e.g. the previous commit's) instead of the working tree.
        TG="$BASE_BIN"
        [ -x "$UPSTREAM_BIN" ] || cargo build --release --quiet --example bench_upstream
    else
        log "building release (tokengate, bench_upstream)"
        cargo build --release --quiet --bin tokengate --example bench_upstream
        TG="$TARGET_DIR/release/tokengate"
    fi
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to 10 s for `url` to answer 200 (`wait_http url [header]`).
wait_http() {
    local i
    for i in $(seq 1 100); do
        if curl -fsS -o /dev/null ${2:+-H "$2"} "$1" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    echo "$PROG: $1 did not answer 200" >&2
    return 1
}

# Makes the work dir WORK (`/tmp/tokengate-NAME.XXXXXX`) and the list PIDS of the processes started
# in it; on exit they are stopped and the dir is removed (kept with KEEP=1).
start_work() {
    WORK="$(mktemp -d "/tmp/tokengate-$1.XXXXXX")"
    PIDS=()
    trap cleanup EXIT
    trap 'exit 130' INT TERM
}

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if [ "$KEEP" = 1 ]; then
        echo "work dir kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}

# Starts the benchmark upstream (UPSTREAM_BIN) on `core`: sets PID_<name> and PORT_<name>.
start_upstream() { # name core
    local name="$1" core="$2" out="$WORK/$1.out" i
    : >"$out"
    taskset -c "$core" "$UPSTREAM_BIN" 127.0.0.1:0 >"$out" 2>&1 &
    PIDS+=($!)
    eval "PID_$name=$!"
    for i in $(seq 1 100); do
        if grep -q '^listening on ' "$out"; then break; fi
        sleep 0.05
    done
    eval "PORT_$name=$(sed -n 's/^listening on 127.0.0.1:\([0-9]*\)$/\1/p' "$out")"
}
