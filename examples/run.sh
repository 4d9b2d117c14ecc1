#!/usr/bin/env bash
# Runs every example and checks it passes.
#
#   bash examples/run.sh              starts its own PostgreSQL + redis-server
#   REDIS_URL=redis://127.0.0.1:6379 bash examples/run.sh
#                                     uses that Redis (the module must be loaded)
#
# Without REDIS_URL: a throwaway PostgreSQL (scripts/pg.sh; or QUOTA_PG_URL when
# set) and a redis-server on a free loopback port with the module
# (QUOTA_MODULE, default target/release/libredis_quota.so, built when missing)
# and a fresh schema; both are removed on exit.
#
# The Python examples run in .tools/venv (created with redis-py when missing),
# each twice: over RESP2 and over RESP3 (redis-py `?protocol=` URL parameter).
# One PASS/FAIL line per run; the last line is `N passed, M failed` (a setup
# failure prints `0 passed, 1 failed`); the exit status is non-zero when any failed. EXAMPLES_VERBOSE=1 shows every output
# (otherwise only a failing example's).
#
# Knobs: REDIS_SERVER (default redis-server), REDIS_CLI (default redis-cli),
# PYTHON (default .tools/venv/bin/python), EXAMPLE_TIMEOUT (default 180 s).
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

# A setup failure still ends with the summary line, counted as one failure.
die() {
    echo "examples/run.sh: $*" >&2
    echo "0 passed, 1 failed"
    exit 1
}

tmp="$(mktemp -d /tmp/redis-quota-examples.XXXXXX)" || die "mktemp failed"
chmod 755 "$tmp"
redis_pid=""
started_pg=0

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    if [ -n "$redis_pid" ]; then
        kill "$redis_pid" 2>/dev/null
        wait "$redis_pid" 2>/dev/null
    fi
    if [ "$started_pg" -eq 1 ]; then
        bash scripts/pg.sh destroy "$tmp/pg" >/dev/null 2>&1
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

redis_cli="${REDIS_CLI:-$(command -v redis-cli || true)}"
[ -n "$redis_cli" ] || die "redis-cli not found (scripts/deps.sh installs it)"
export REDIS_CLI="$redis_cli"

# ---- Redis with the module -----------------------------------------------------
start_redis() {
    local server module pg_url schema port conf
    server="${REDIS_SERVER:-redis-server}"
    command -v "$server" >/dev/null 2>&1 || die "$server not found (scripts/deps.sh installs it)"
    module="${QUOTA_MODULE:-$root/target/release/libredis_quota.so}"
    if [ ! -f "$module" ]; then
        echo "building the module (cargo build --release)"
        cargo build --release || die "cargo build --release failed"
    fi
    [ -f "$module" ] || die "$module not found"

    if [ -n "${QUOTA_PG_URL:-}" ]; then
        pg_url="$QUOTA_PG_URL"
    else
        started_pg=1 # before starting it: an interrupt from here on must destroy it
        pg_url="$(bash scripts/pg.sh start "$tmp/pg" </dev/null | tail -n 1)" ||
            die "PostgreSQL did not start"
    fi
    schema="examples_$(date +%s)_$$"

    mkdir -p "$tmp/redis"
    for _ in 1 2 3 4 5; do
        port="$(free_port)"
        conf="$tmp/redis/redis.conf"
        # The config file (not the command line) carries the PostgreSQL URL.
        cat >"$conf" <<EOF
port $port
bind 127.0.0.1
dir "$tmp/redis"
logfile "$tmp/redis/redis.log"
save ""
appendonly no
loadmodule "$module" pg-url "$pg_url" schema "$schema"
EOF
        chmod 600 "$conf"
        (cd "$tmp/redis" && exec "$server" "$conf" </dev/null >>"$tmp/redis/redis.log" 2>&1) &
        redis_pid=$!
        for _ in $(seq 1 200); do
            if "$redis_cli" -h 127.0.0.1 -p "$port" ping 2>/dev/null </dev/null | grep -q PONG; then
                REDIS_URL="redis://127.0.0.1:$port/0"
                echo "redis-server $("$server" --version | awk '{print $3}') on 127.0.0.1:$port, schema $schema"
                return 0
            fi
            kill -0 "$redis_pid" 2>/dev/null || break
            sleep 0.05
        done
        kill "$redis_pid" 2>/dev/null
        wait "$redis_pid" 2>/dev/null
        redis_pid=""
        # Lost the port to someone else? Try another one; anything else is fatal.
        grep -qi 'address already in use' "$tmp/redis/redis.log" || break
    done
    tail -n 30 "$tmp/redis/redis.log" >&2
    die "redis-server did not start"
}

if [ -n "${REDIS_URL:-}" ]; then
    echo "using REDIS_URL=$REDIS_URL"
else
    start_redis
fi
export REDIS_URL
"$redis_cli" -u "$REDIS_URL" COMMAND INFO quota.admit </dev/null | grep -qi 'quota.admit' ||
    die "$REDIS_URL has no QUOTA.ADMIT: is the module loaded?"

# ---- Python --------------------------------------------------------------------
python="${PYTHON:-$root/.tools/venv/bin/python}"
if [ ! -x "$python" ]; then
    echo "creating .tools/venv with redis-py"
    python3 -m venv "$root/.tools/venv" </dev/null || die "python3 -m venv failed"
    python="$root/.tools/venv/bin/python"
fi
if ! "$python" -c 'import redis' 2>/dev/null; then
    "$python" -m pip install --quiet --disable-pip-version-check redis </dev/null ||
        die "pip install redis failed"
fi

# ---- the examples ------------------------------------------------------------------
passed=0
failed=0
n=0

run() { # label env-url command...
    local label="$1" url="$2" log rc
    shift 2
    n=$((n + 1))
    log="$tmp/example-$n.log"
    REDIS_URL="$url" timeout "${EXAMPLE_TIMEOUT:-180}" "$@" </dev/null >"$log" 2>&1
    rc=$?
    if [ "$rc" -eq 0 ]; then
        [ "${EXAMPLES_VERBOSE:-0}" = 1 ] && sed 's/^/    /' "$log"
        echo "PASS  $label"
        passed=$((passed + 1))
    else
        sed 's/^/    /' "$log"
        [ "$rc" -eq 124 ] && echo "    (timed out)"
        echo "FAIL  $label (exit $rc)"
        failed=$((failed + 1))
    fi
}

with_protocol() { # url protocol
    case "$1" in
        *\?*) echo "$1&protocol=$2" ;;
        *) echo "$1?protocol=$2" ;;
    esac
}

shopt -s nullglob
for ex in examples/python/*.py; do
    case "$(basename "$ex")" in _*) continue ;; esac
    for proto in 2 3; do
        run "${ex#examples/} (RESP$proto)" "$(with_protocol "$REDIS_URL" "$proto")" "$python" "$ex"
    done
done
for ex in examples/lua/*.sh; do
    run "${ex#examples/}" "$REDIS_URL" bash "$ex"
done
shopt -u nullglob

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
