#!/usr/bin/env bash
# bench/ledger_load.sh: what the usage ledger costs PostgreSQL at a given number of active
# accounts, for the README's connection sizing.
#
#   1. builds the module (cargo build --release), starts a throwaway PostgreSQL with
#      pg_stat_statements and a redis-server with the module (quota.flush-interval as given,
#      10 s by default; caches kept for an hour so that cache loads do not mix in)
#   2. creates ACCOUNTS accounts (users u0..u<N-1>, bundle gpt) with one QUOTA.ADMIT each and
#      waits for their first flush
#   3. for MEASURE seconds, admits every account once every PASS seconds (redis-cli --pipe of
#      one ADMIT per account), so every account has new usage in every flush round
#   4. prints, per second over the measured window: rows written to quota_usage_hourly
#      (inserted + updated, pg_stat_user_tables) and to quota_ledger_batch, transactions
#      committed (pg_stat_database xact_commit), statements (pg_stat_statements calls, all and
#      by statement), and the flush's own figures from INFO quota
#
# Environment (all optional):
#   ACCOUNTS=100000   active accounts
#   MEASURE=60        seconds measured
#   PASS=5            seconds between two admissions of one account
#   FLUSH_INTERVAL=10 quota.flush-interval
#   BENCH_NO_BUILD=1  skip cargo build
#   REDIS_SERVER=redis-server
# The report is also copied to bench/out/ledger-load.txt (gitignored).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

ACCOUNTS="${ACCOUNTS:-100000}"
MEASURE="${MEASURE:-60}"
PASS="${PASS:-5}"
FLUSH_INTERVAL="${FLUSH_INTERVAL:-10}"
REDIS_SERVER="${REDIS_SERVER:-redis-server}"
module="$root/target/release/libredis_quota.so"
schema=ledger_bench

log() { printf '[ledger-load %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v redis-cli >/dev/null 2>&1 || die "redis-cli missing: scripts/deps.sh"
if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    cargo build --release --quiet </dev/null
fi
[ -f "$module" ] || die "$module is missing (cargo build --release)"

work="$(mktemp -d /tmp/quota-ledger-load.XXXXXX)"
chmod 755 "$work"
redis_pid=""
cleanup() {
    local rc=$?
    if [ -n "$redis_pid" ] && kill -0 "$redis_pid" 2>/dev/null; then
        redis-cli -p "$port" SHUTDOWN NOSAVE >/dev/null 2>&1 </dev/null || true
        for _ in $(seq 1 50); do kill -0 "$redis_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$redis_pid" 2>/dev/null || true
    fi
    bash "$root/scripts/pg.sh" destroy "$work/pg" >/dev/null 2>&1 </dev/null || true
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# --- PostgreSQL with pg_stat_statements ---------------------------------------------------
log "starting a throwaway PostgreSQL with pg_stat_statements"
pg_url="$(bash scripts/pg.sh start "$work/pg" </dev/null | tail -n1)"
psql_bin="$(find /usr/lib/postgresql -path '*/bin/psql' | sort -V | tail -n1)"
[ -n "$psql_bin" ] || psql_bin=psql
sql() { "$psql_bin" -X -q -At -v ON_ERROR_STOP=1 -d "$pg_url" -c "$1" </dev/null; }
sql "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'" >/dev/null
bash scripts/pg.sh stop "$work/pg" </dev/null >/dev/null
bash scripts/pg.sh start "$work/pg" </dev/null >/dev/null
sql "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" >/dev/null

# --- Redis with the module ----------------------------------------------------------------
port="$(free_port)"
cp "$module" "$work/libredis_quota.so"
cat >"$work/redis.conf" <<EOF
port $port
bind 127.0.0.1
dir "$work"
save ""
appendonly no
loadmodule "$work/libredis_quota.so" pg-url "$pg_url" schema $schema flush-interval $FLUSH_INTERVAL cache-ttl-ms 3600000 negative-ttl-ms 3600000
EOF
chmod 600 "$work/redis.conf"
"$REDIS_SERVER" "$work/redis.conf" >"$work/redis.log" 2>&1 </dev/null &
redis_pid=$!
cli() { redis-cli -p "$port" "$@" </dev/null; }
for _ in $(seq 1 100); do
    [ "$(cli PING 2>/dev/null)" = PONG ] && break
    sleep 0.1
done
[ "$(cli PING 2>/dev/null)" = PONG ] || die "redis-server did not start: $(tail -5 "$work/redis.log")"
info() { cli INFO quota | tr -d '\r' | awk -F: -v k="quota_$1" '$1 == k { print $2 }'; }
for _ in $(seq 1 100); do
    [ "$(info notify_state)" = listening ] && break
    sleep 0.1
done

# One ADMIT per account, as raw RESP for redis-cli --pipe.
log "writing $ACCOUNTS ADMITs"
# admits.resp: all of them, in order; part.K: every 16th, for the first pass (below).
python3 - "$ACCOUNTS" "$work" <<'EOF'
import sys
n, work = int(sys.argv[1]), sys.argv[2]
def admit(i):
    words = [b"QUOTA.ADMIT", b"acme", b"chat", b"u%d" % i, b"gpt", b"REQUESTS_PER_DAY", b"100000000"]
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
cmds = [admit(i) for i in range(n)]
open(work + "/admits.resp", "wb").write(b"".join(cmds))
for k in range(16):
    open("%s/part.%d" % (work, k), "wb").write(b"".join(cmds[k::16]))
EOF
pass() {
    local out
    out="$(redis-cli -p "$port" --pipe <"$work/admits.resp" 2>&1)" || die "redis-cli --pipe: $out"
    case "$out" in *"errors: 0"*) ;; *) die "ADMITs failed: $out" ;; esac
}

# A cold user's ADMIT waits for its load (its client is blocked meanwhile), so the first pass
# goes over 16 connections at once, whose loads share queries.
log "creating $ACCOUNTS accounts (each user's first ADMIT loads it from PostgreSQL)"
pipes=()
for k in $(seq 0 15); do
    redis-cli -p "$port" --pipe <"$work/part.$k" >"$work/part.$k.out" 2>&1 &
    pipes+=($!)
done
wait "${pipes[@]}"
if grep -q 'errors: [1-9]' "$work"/part.*.out; then
    die "first ADMITs failed: $(cat "$work"/part.*.out)"
fi
# Then the first rounds write every account's first batch.
for _ in $(seq 1 $((FLUSH_INTERVAL * 10 + 600))); do
    [ "$(info ledger_accounts_pending)" = 0 ] && break
    sleep 0.1
done
[ "$(info ledger_accounts_pending)" = 0 ] || die "the first flush did not finish"

snapshot() {
    sql "SELECT
        (SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()),
        (SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables
            WHERE schemaname = '$schema' AND relname = 'quota_usage_hourly'),
        (SELECT coalesce(sum(n_tup_ins + n_tup_upd), 0) FROM pg_stat_user_tables
            WHERE schemaname = '$schema' AND relname = 'quota_ledger_batch'),
        (SELECT coalesce(sum(calls), 0) FROM pg_stat_statements
            WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())),
        (SELECT round(coalesce(sum(total_exec_time), 0)) FROM pg_stat_statements
            WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database()))" |
        tr '|' ' '
}
sql "SELECT pg_stat_statements_reset()" >/dev/null
sleep 0.5
read -r x0 h0 b0 s0 e0 < <(snapshot)
flushes0="$(info ledger_flushes)"
log "measuring for $MEASURE s: every account admitted every $PASS s"
start=$(date +%s.%N)
admits=0
while :; do
    t0=$(date +%s.%N)
    pass
    admits=$((admits + ACCOUNTS))
    now=$(date +%s.%N)
    elapsed=$(awk -v a="$start" -v b="$now" 'BEGIN { print b - a }')
    if awk -v e="$elapsed" -v m="$MEASURE" -v p="$PASS" 'BEGIN { exit !(e + p > m) }'; then
        break
    fi
    awk -v a="$t0" -v b="$now" -v p="$PASS" 'BEGIN { s = p - (b - a); if (s > 0) system("sleep " s) }'
done
rest=$(awk -v a="$start" -v b="$(date +%s.%N)" -v m="$MEASURE" 'BEGIN { s = m - (b - a); print (s > 0 ? s : 0) }')
sleep "$rest"
read -r x1 h1 b1 s1 e1 < <(snapshot)
end=$(date +%s.%N)
seconds=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
flushes1="$(info ledger_flushes)"

per_s() { awk -v d="$1" -v s="$seconds" 'BEGIN { printf "%.0f", d / s }'; }
mkdir -p bench/out
{
    echo "ledger load: $ACCOUNTS active accounts, each admitted every $PASS s, quota.flush-interval $FLUSH_INTERVAL s, $seconds s measured"
    echo "  $(redis-server --version | awk '{print $1, $2, $3}'), PostgreSQL $(sql 'SHOW server_version'), $(nproc) cores"
    echo "  admissions sent:                   $(per_s "$admits")/s"
    echo "  quota_usage_hourly rows written:   $(per_s $((h1 - h0)))/s (inserted or updated)"
    echo "  quota_ledger_batch rows written:   $(per_s $((b1 - b0)))/s"
    echo "  transactions committed:            $(per_s $((x1 - x0)))/s (pg_stat_database, all of the database)"
    echo "  statements:                        $(per_s $((s1 - s0)))/s (pg_stat_statements, all)"
    echo "  statement execution time:          $(per_s $((e1 - e0))) ms/s (server connections busy on average: $(awk -v d=$((e1 - e0)) -v s="$seconds" 'BEGIN { printf "%.2f", d / s / 1000 }'))"
    echo "  ledger flushes (INFO, slices):     $(per_s $((flushes1 - flushes0)))/s"
    echo "  last round: $(info ledger_last_snapshot_accounts) accounts snapshotted in $(info ledger_last_snapshot_us) us of main thread, longest tick $(info ledger_last_snapshot_longest_tick_us) us"
    echo "  statements by kind (calls/s, rows/s, mean ms):"
    sql "SELECT rpad(left(regexp_replace(query, '\s+', ' ', 'g'), 70), 72) || lpad(round(calls / $seconds)::text, 7) || lpad(round(rows / $seconds)::text, 9) || lpad(round(mean_exec_time::numeric, 2)::text, 9)
         FROM pg_stat_statements
         WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
           AND calls > 0
         ORDER BY calls DESC, query LIMIT 12" | sed 's/^/    /'
} | tee bench/out/ledger-load.txt
