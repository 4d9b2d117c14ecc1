#!/usr/bin/env bash
# `make run`: redis-server in the foreground with the module loaded.
#
#   PORT=6379            Redis port (127.0.0.1 only)
#   QUOTA_PG_URL=...     PostgreSQL to use; when unset a throwaway one is started
#                        in .run/pg (data kept between runs; `make clean` drops it)
#   QUOTA_ARGS='...'     more module arguments, e.g. QUOTA_ARGS='cache-ttl-ms 5000 lease-ttl 60'
#   REDIS_SERVER=...     redis-server binary (default: redis-server on PATH)
#   REDIS_ARGS='...'     more redis-server arguments, e.g. REDIS_ARGS='--appendonly yes'
# Expects `cargo build --release` to have run (the Makefile does it).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

module="$root/target/release/libredis_quota.so"
[ -f "$module" ] || { echo "make run: $module is missing: run cargo build --release" >&2; exit 1; }
redis="${REDIS_SERVER:-redis-server}"
command -v "$redis" >/dev/null 2>&1 || { echo "make run: $redis not found (scripts/deps.sh installs it)" >&2; exit 1; }
port="${PORT:-6379}"
run="$root/.run"

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "make run: port $port is already in use; pick another one: make run PORT=6380" >&2
    exit 1
fi

mkdir -p "$run/redis"
started_pg=0
# shellcheck disable=SC2317 # called from the EXIT trap
stop_pg() {
    if [ "$started_pg" -eq 1 ]; then
        echo "make run: stopping the throwaway PostgreSQL (.run/pg)" >&2
        scripts/pg.sh stop "$run/pg" || true
    fi
}
trap stop_pg EXIT
trap 'exit 130' INT TERM

if [ -n "${QUOTA_PG_URL:-}" ]; then
    pg_url="$QUOTA_PG_URL"
    pg_shown="$(printf '%s' "$pg_url" | sed -E 's#://([^:@/]*):[^@/]*@#://\1:***@#')"
else
    echo "make run: starting a throwaway PostgreSQL in .run/pg" >&2
    pg_url="$(scripts/pg.sh start "$run/pg")"
    started_pg=1
    pg_shown="$pg_url (throwaway, .run/pg)"
fi

# The URL is sensitive: it goes into a private config file (not the command
# line, which `ps` shows) as a `quota.pg-url` directive (not a loadmodule
# argument, which MODULE LIST shows).
conf="$run/redis/redis.conf"
quote() { # redis.conf double-quoted string
    local s="${1//\\/\\\\}"
    s="${s//\"/\\\"}"
    printf '"%s"' "$s"
}
{
    echo "# written by scripts/run.sh (make run)"
    echo "port $port"
    echo "bind 127.0.0.1"
    echo "dir $(quote "$run/redis")"
    echo "save \"\""
    echo "appendonly no"
    printf 'loadmodule %s %s\n' "$(quote "$module")" "${QUOTA_ARGS:-}"
    printf 'quota.pg-url %s\n' "$(quote "$pg_url")"
} >"$conf.tmp"
chmod 600 "$conf.tmp"
mv -f "$conf.tmp" "$conf"

cat <<EOF

  redis-quota: redis-server on 127.0.0.1:$port with the module
    module     $module
    PostgreSQL $pg_shown
    config     $conf

  In another terminal:
    redis-cli -p $port QUOTA.GRANT acme chat alice '*' REQUESTS_PER_DAY 100
    redis-cli -p $port QUOTA.GET acme chat alice '*'
    redis-cli -p $port QUOTA.ADMIT acme chat alice '*' REQUESTS_PER_DAY 10
    redis-cli -p $port INFO quota

  Stop with Ctrl-C.

EOF

# Foreground, not exec: the EXIT trap stops PostgreSQL afterwards.
# shellcheck disable=SC2086 # REDIS_ARGS is a list of words on purpose
"$redis" "$conf" ${REDIS_ARGS:-} </dev/null || rc=$?
exit "${rc:-0}"
