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
# The Node examples (examples/node, clients from its package-lock.json) run on that
# server and on a 3-master Redis Cluster started next to it (QUOTA_CLUSTER_NODES,
# host:port,...; with REDIS_URL given, only when QUOTA_CLUSTER_NODES is given too).
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
redis_pids=()
started_pg=0

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    local pid
    for pid in "${redis_pids[@]}"; do
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    done
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

# A free port at most 55535 whose cluster bus port (+10000) is free too.
free_cluster_port() {
    python3 -c '
import random, socket
def free(p):
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p)); return True
    except OSError:
        return False
    finally:
        s.close()
while True:
    p = random.randint(20000, 55535)
    if free(p) and free(p + 10000):
        print(p); break'
}

redis_cli="${REDIS_CLI:-$(command -v redis-cli || true)}"
[ -n "$redis_cli" ] || die "redis-cli not found (scripts/deps.sh installs it)"
export REDIS_CLI="$redis_cli"

# ---- Redis with the module -----------------------------------------------------
start_redis() {
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

    if ! launch_server "$tmp/redis"; then
        die "redis-server did not start"
    fi
    REDIS_URL="redis://127.0.0.1:$launched_port/0"
    redis_pids+=("$launched_pid")
    echo "redis-server $("$server" --version | awk '{print $3}') on 127.0.0.1:$launched_port, schema $schema"
}

# launch_server DIR [config lines...]: a redis-server with the module in DIR on a free
# loopback port; sets launched_port and launched_pid. Uses server, module, pg_url, schema.
launch_server() {
    local dir="$1" conf port pid line pick=free_port
    shift
    case " $* " in *"cluster-enabled yes"*) pick=free_cluster_port ;; esac
    mkdir -p "$dir"
    conf="$dir/redis.conf"
    for _ in 1 2 3 4 5; do
        port="$($pick)"
        # The config file (not the command line) carries the PostgreSQL URL.
        {
            echo "port $port"
            echo "bind 127.0.0.1"
            echo "dir \"$dir\""
            echo "logfile \"$dir/redis.log\""
            echo 'save ""'
            echo "appendonly no"
            echo "loadmodule \"$module\" pg-url \"$pg_url\" schema \"$schema\""
            for line in "$@"; do echo "$line"; done
        } >"$conf"
        chmod 600 "$conf"
        (cd "$dir" && exec "$server" "$conf" </dev/null >>"$dir/redis.log" 2>&1) &
        pid=$!
        for _ in $(seq 1 200); do
            if "$redis_cli" -h 127.0.0.1 -p "$port" ping 2>/dev/null </dev/null | grep -q PONG; then
                launched_port="$port"
                launched_pid="$pid"
                return 0
            fi
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.05
        done
        kill "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
        # Lost the port to someone else? Try another one; anything else is fatal.
        grep -qi 'address already in use' "$dir/redis.log" || break
    done
    tail -n 30 "$dir/redis.log" >&2
    return 1
}

# start_cluster: three masters with the module on the same PostgreSQL and schema, slots
# spread by redis-cli --cluster create; sets QUOTA_CLUSTER_NODES (host:port,...).
start_cluster() {
    local i nodes=() addrs=""
    for i in 1 2 3; do
        launch_server "$tmp/cluster-$i" "cluster-enabled yes" "cluster-config-file nodes.conf" \
            "cluster-node-timeout 5000" || die "cluster node $i did not start"
        redis_pids+=("$launched_pid")
        nodes+=("127.0.0.1:$launched_port")
    done
    "$redis_cli" --cluster create "${nodes[@]}" --cluster-yes </dev/null >"$tmp/cluster-create.log" 2>&1 ||
        { cat "$tmp/cluster-create.log" >&2; die "redis-cli --cluster create failed"; }
    for _ in $(seq 1 200); do
        local ok=0 n
        for n in "${nodes[@]}"; do
            "$redis_cli" -h "${n%:*}" -p "${n#*:}" CLUSTER INFO </dev/null 2>/dev/null |
                grep -q 'cluster_state:ok' && ok=$((ok + 1))
        done
        if [ "$ok" -eq 3 ]; then
            addrs="$(IFS=,; echo "${nodes[*]}")"
            QUOTA_CLUSTER_NODES="$addrs"
            echo "Redis Cluster of 3 masters: $addrs"
            return 0
        fi
        sleep 0.1
    done
    die "the cluster did not reach cluster_state:ok"
}

QUOTA_CLUSTER_NODES="${QUOTA_CLUSTER_NODES:-}"
if [ -n "${REDIS_URL:-}" ]; then
    echo "using REDIS_URL=$REDIS_URL${QUOTA_CLUSTER_NODES:+ and QUOTA_CLUSTER_NODES=$QUOTA_CLUSTER_NODES}"
else
    start_redis
    start_cluster
fi
export QUOTA_CLUSTER_NODES
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
# Node: node-redis and ioredis from examples/node/package-lock.json (npm ci when missing).
if [ ! -d examples/node/node_modules ] || [ examples/node/package-lock.json -nt examples/node/node_modules ]; then
    echo "installing the Node clients (npm ci in examples/node)"
    (cd examples/node && npm ci --no-audit --no-fund --loglevel=error </dev/null) ||
        die "npm ci in examples/node failed"
fi
for ex in examples/node/*.mjs; do
    case "$(basename "$ex")" in common.mjs) continue ;; esac
    run "${ex#examples/}" "$REDIS_URL" node "$ex"
done
shopt -u nullglob

echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ] && [ "$passed" -gt 0 ]
