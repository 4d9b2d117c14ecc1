#!/usr/bin/env bash
# bench/run.sh (`make bench`): throughput and memory of redis-quota against plain Redis, in ONE
# redis-server and one run, so the ratios are measured under the same (noisy) conditions.
#
#   1. builds the module (cargo build --release), starts a throwaway PostgreSQL and a redis-server
#      with the module on a free loopback port (both removed on exit)
#   2. grants a credit to every benchmark user (u000000000000 .. u<USERS-1>, bundle '*'), mirrors
#      the credits into Redis hashes for the Lua script, and warms the credits cache with QUOTA.GET
#   3. redis-benchmark -P 16 -c 50 -r USERS, ROUNDS interleaved rounds of:
#        INCR counter:__rand_int__
#        CL.THROTTLE from redis-cell 0.2.2 (built by bench/redis-cell.sh into .tools/)
#        CL.THROTTLE from redis-cell 0.5.0, loaded into the same server as CL.THROTTLE050
#          (bench/redis-cell.sh 0.5.0 builds ../shared/peers/redis-cell-0.5.0.tar.gz with its
#          module name and command renamed, so the two versions share the server and rounds)
#        HMGET of 11 fields: a plain command with ADMIT's 13 arguments
#        QUOTA.ADMIT inline (day/month requests, day tokens, MAX_CONCURRENT) -> vs HMGET
#        QUOTA.ADMIT POLICY bench COMPACT (the same limits as a named policy: 4 limits)
#                                                  -> vs CL.THROTTLE 0.2.2 and 0.5.0, vs INCR
#        QUOTA.ADMIT POLICY rate COMPACT (a policy of one REQUESTS_PER_SECOND limit: redis-cell's
#          own ground, one rate each)                -> vs CL.THROTTLE 0.2.2 and 0.5.0
#        QUOTA.GET on cached users                                        -> vs HGETALL
#        HGETALL of an 18-field hash (the bar's baseline: the record's size when it was set)
#        HGETALL of a 24-field hash (a reply the shape of today's QUOTA.GET, info)
#      and, unpipelined, INCR and ADMIT POLICY for their p50/p99 latency: one client
#      (bench/latency.c, built with cc) sends the two alternately, so both see the same moments
#      of a shared machine.
#      BENCH_EXTRA=1 adds the older rows: EVALSHA bench/admit.lua, ADMIT without a lease, GET.
#   4. prints the throughputs (median and best of the rounds) and the ratios with PASS/FAIL
#      (bench/README.md says how to read them); beside each ratio, the same ratio from the
#      server's CPU time per command (/proc/<pid>/schedstat: time on a CPU only, so the moments
#      another tenant holds the core do not count; on a shared machine it varies far less)
#   5. memory: bytes per cached user (with one credit; with no credits) and per account key
#   6. cold misses: ADMITs of new users in ONE long pipeline on one connection, with PostgreSQL
#      up, down and not configured (linear time: no miss blocks its client without PostgreSQL)
#
# Environment (all optional):
#   BENCH_USERS=10000     users in the benchmark (redis-benchmark -r)
#   BENCH_SECONDS=4       target duration of each redis-benchmark run
#   BENCH_ROUNDS=5        interleaved rounds (ratios use the median of the per-round ratios)
#   BENCH_MEM_USERS=100000  users/accounts created for the memory figures
#   BENCH_COLD_USERS=100000  new users in the one-pipeline cold-miss rows (PostgreSQL down, none)
#   BENCH_COLD_UP_USERS=10000  the same with PostgreSQL up (one load round trip per miss)
#   BENCH_NO_BUILD=1      skip cargo build
#   BENCH_MODULE=path.so  bench this build of the module instead (e.g. another worktree's, to
#                         compare two builds; run each with the same settings)
#   BENCH_STRICT=1        exit 1 when a bar is missed (default: report PASS/FAIL, exit 0)
#   BENCH_COMPARE=old.so  head to head: a second redis-server runs this other build of the module
#                         (same PostgreSQL, its own schema); every round runs each command on
#                         both servers back to back, and the report ends with each ratio of
#                         both builds and their change (rows the other build cannot run are
#                         left out). Latency, memory per key and cold misses: this build only.
#   REDIS_SERVER=redis-server
# The printed report is also copied to bench/out/last-run.txt (gitignored).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

USERS="${BENCH_USERS:-10000}"
SECONDS_PER_RUN="${BENCH_SECONDS:-4}"
ROUNDS="${BENCH_ROUNDS:-5}"
MEM_USERS="${BENCH_MEM_USERS:-100000}"
COLD_N="${BENCH_COLD_USERS:-100000}"
COLD_UP="${BENCH_COLD_UP_USERS:-10000}"
REDIS_SERVER="${REDIS_SERVER:-redis-server}"
module="${BENCH_MODULE:-$root/target/release/libredis_quota.so}"
PIPE=16
CLIENTS=50
LOADERS=8 # parallel connections for grants and cold loads (each waits on Postgres)
LEASE_TTL=1

# Bars (issue 12; the one-rate bar: issue 22).
BAR_POLICY_CELL=1.0
BAR_RATE_CELL=1.2
BAR_POLICY_INCR=0.45
BAR_ADMIT_HMGET=0.8
BAR_BALANCE_WINDOWS=0.9
BAR_GET_HGETALL=1.1
# Issue 23: 10 x the ~430 ADMIT/s a long pipeline of new users ran at while quadratic.
BAR_COLD=4300
BAR_P99=1.2
BAR_ACCOUNT_BYTES=320
BAR_USER_BYTES=256
LAT_N="${BENCH_LATENCY_N:-50000}"

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --- dependencies ------------------------------------------------------------------------
apt_install() {
    [ "$(id -u)" -eq 0 ] || die "missing $*: install it (apt-get install -y $*)"
    log "installing $*"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" </dev/null >/dev/null 2>&1 || {
        DEBIAN_FRONTEND=noninteractive apt-get update -q </dev/null >/dev/null 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" </dev/null >/dev/null
    }
}
command -v "$REDIS_SERVER" >/dev/null 2>&1 || apt_install redis-server
command -v redis-benchmark >/dev/null 2>&1 || apt_install redis-tools
command -v redis-cli >/dev/null 2>&1 || apt_install redis-tools
command -v awk >/dev/null 2>&1 || apt_install gawk
command -v cc >/dev/null 2>&1 || apt_install gcc libc6-dev

if [ "${BENCH_NO_BUILD:-0}" != 1 ]; then
    log "cargo build --release"
    cargo build --release --quiet </dev/null
fi
[ -f "$module" ] || die "$module is missing (cargo build --release)"

log "redis-cell 0.2.2 and 0.5.0 (the CL.THROTTLE peers)"
cell_lib="$(bash "$root/bench/redis-cell.sh")" || die "cannot build redis-cell (bench/redis-cell.sh)"
cell5_lib="$(bash "$root/bench/redis-cell.sh" 0.5.0)" || die "cannot build redis-cell 0.5.0 (bench/redis-cell.sh 0.5.0)"
log "the side-by-side latency client (bench/latency.c)"
mkdir -p "$root/.tools"
latency_bin="$root/.tools/latency"
cc -O2 -o "$latency_bin" "$root/bench/latency.c" || die "cannot build bench/latency.c"

# --- throwaway servers -------------------------------------------------------------------
work="$(mktemp -d /tmp/quota-bench.XXXXXX)"
compare="${BENCH_COMPARE:-}"
[ -z "$compare" ] || [ -f "$compare" ] || die "BENCH_COMPARE=$compare does not exist"
# Server 0 runs this build; server 1 (BENCH_COMPARE only) the other one.
servers=(0)
[ -z "$compare" ] || servers+=(1)
ports=()
pids=()
port=""
redis_pid=""
cleanup() {
    local rc=$? i
    for i in "${!pids[@]}"; do
        kill -0 "${pids[$i]}" 2>/dev/null || continue
        redis-cli -p "${ports[$i]}" SHUTDOWN NOSAVE >/dev/null 2>&1 </dev/null || true
        for _ in $(seq 1 50); do kill -0 "${pids[$i]}" 2>/dev/null || break; sleep 0.1; done
        kill -9 "${pids[$i]}" 2>/dev/null || true
    done
    bash "$root/scripts/pg.sh" destroy "$work/pg" >/dev/null 2>&1 </dev/null || true
    rm -rf "$work"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()' 2>/dev/null && return
    local p
    for _ in $(seq 1 200); do
        p=$((20000 + RANDOM % 30000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
    done
    die "no free port"
}

log "starting a throwaway PostgreSQL"
pg_url="$(bash "$root/scripts/pg.sh" start "$work/pg" </dev/null | tail -n1)"
# use_server I: the commands below go to server I.
use_server() {
    port="${ports[$1]}"
    redis_pid="${pids[$1]}"
}
cli() { redis-cli -p "$port" "$@" </dev/null; }

# start_server I MODULE SCHEMA: a redis-server with MODULE (its schema in PostgreSQL) and both
# redis-cell versions, on a free loopback port; then use_server I.
start_server() {
    local i="$1" so="$2" schema="$3" d="$work/redis$1"
    mkdir -p "$d"
    ports[$i]="$(free_port)"
    # A private copy: a concurrent cargo build cannot replace the binary under the server.
    cp "$so" "$d/libredis_quota.so"
    # The URL goes in a private config file, not on the command line.
    cat >"$d/redis.conf" <<EOF
port ${ports[$i]}
bind 127.0.0.1
dir "$d"
save ""
appendonly no
loadmodule "$d/libredis_quota.so" pg-url "$pg_url" schema $schema cache-ttl-ms 3600000 negative-ttl-ms 3600000 lease-ttl $LEASE_TTL
loadmodule "$cell_lib"
loadmodule "$cell5_lib"
EOF
    chmod 600 "$d/redis.conf"
    "$REDIS_SERVER" "$d/redis.conf" >"$d/redis.log" 2>&1 </dev/null &
    pids[$i]=$!
    use_server "$i"
    for _ in $(seq 1 100); do
        [ "$(cli PING 2>/dev/null || true)" = PONG ] && break
        kill -0 "$redis_pid" 2>/dev/null || { tail -n 30 "$d/redis.log" >&2; die "redis-server exited"; }
        sleep 0.1
    done
    [ "$(cli PING 2>/dev/null || true)" = PONG ] || die "redis-server did not answer on port $port"
    log "redis-server $("$REDIS_SERVER" --version | awk '{print $3}') with $so on 127.0.0.1:$port"
    cli CONFIG SET quota.cache-ttl-ms 3600000 >/dev/null
    cli CONFIG SET quota.negative-ttl-ms 3600000 >/dev/null
    cli CONFIG SET quota.lease-ttl "$LEASE_TTL" >/dev/null
    # Warm-ups push tens of thousands of cold users through the job queue at once; give each
    # load time to wait its turn (a real deployment warms gradually).
    cli CONFIG SET quota.pg-timeout-ms 120000 >/dev/null
    # Nothing else may run in the background of the measurements.
    cli CONFIG SET quota.cleanup-interval 0 >/dev/null
}
[ -z "$compare" ] || start_server 1 "$compare" bench_q_compare
start_server 0 "$module" bench_q

# --- helpers -----------------------------------------------------------------------------
info_field() { # info_field SECTION FIELD
    cli INFO "$1" | tr -d '\r' | awk -F: -v k="$2" '$1 == k { print $2 }'
}
quota_stat() { info_field quota "quota_$1"; }
used_memory() { info_field memory used_memory; }

# measure UNIT CMD...: runs CMD; sets units to how many UNIT it added (entries: credits cache
# entries, keys: keys in the keyspace) and bytes to the used_memory it added per unit.
measure() {
    local unit="$1" count=(cli DBSIZE) n0 m0 n1 m1
    shift
    [ "$unit" = entries ] && count=(quota_stat cache_entries)
    n0="$("${count[@]}")"
    m0="$(used_memory)"
    "$@"
    n1="$("${count[@]}")"
    m1="$(used_memory)"
    units=$((n1 - n0))
    bytes=$(((m1 - m0) / (units > 0 ? units : 1)))
}

# gen PREFIX FROM TO WORD... : the commands WORD... with @U@ = PREFIX%012d for FROM <= i < TO.
gen() {
    local prefix="$1" from="$2" to="$3"
    shift 3
    awk -v prefix="$prefix" -v from="$from" -v to="$to" -v words="$*" '
        BEGIN {
            n = split(words, w, " ")
            for (j = 1; j <= n; j++) {
                at[j] = index(w[j], "@U@")
                if (at[j]) { pre[j] = substr(w[j], 1, at[j] - 1); post[j] = substr(w[j], at[j] + 3) }
            }
            for (i = from; i < to; i++) {
                u = sprintf("%s%012d", prefix, i)
                printf "*%d\r\n", n
                for (j = 1; j <= n; j++) {
                    a = at[j] ? pre[j] u post[j] : w[j]
                    printf "$%d\r\n%s\r\n", length(a), a
                }
            }
        }'
}

# pipe_all PARALLEL PREFIX FROM TO WORD... : send the commands over PARALLEL connections
# (redis-cli --pipe), fail if any reply is an error.
pipe_all() {
    local par="$1" prefix="$2" from="$3" to="$4"
    shift 4
    local total=$((to - from)) chunk i a b pids=() failed=0
    chunk=$(((total + par - 1) / par))
    for ((i = 0; i < par; i++)); do
        a=$((from + i * chunk))
        b=$((a + chunk))
        [ "$b" -le "$to" ] || b="$to"
        [ "$a" -lt "$b" ] || continue
        gen "$prefix" "$a" "$b" "$@" | redis-cli -p "$port" --pipe --pipe-timeout 120 >"$work/pipe.$i.out" 2>&1 &
        pids+=($!)
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || failed=1
    done
    for ((i = 0; i < par; i++)); do
        [ -f "$work/pipe.$i.out" ] || continue
        if ! grep -q 'errors: 0,' "$work/pipe.$i.out"; then
            failed=1
            cat "$work/pipe.$i.out" >&2
        fi
        rm -f "$work/pipe.$i.out"
    done
    [ "$failed" -eq 0 ] || die "pipelined $1 ... failed"
}

# Waits (bounded) until the NOTIFY echoes of our own grants have arrived, so they cannot
# invalidate entries after the warm-up.
settle_notify() {
    local last=-1 now i
    for i in $(seq 1 100); do
        now="$(quota_stat notify_received)"
        [ "$now" = "$last" ] && [ "$i" -gt 3 ] && return 0
        last="$now"
        sleep 0.3
    done
}

# bench NAME N COMMAND... : one redis-benchmark run; prints requests/s.
bench_once() {
    local n="$1"
    shift
    redis-benchmark -h 127.0.0.1 -p "$port" -P "$PIPE" -c "$CLIENTS" -n "$n" -r "$USERS" --csv "$@" </dev/null 2>/dev/null |
        awk -F'","' 'NR == 2 { gsub(/"/, "", $2); print $2 }'
}

# server_p99 COMMAND : the command's p99 in microseconds from INFO latencystats ("-" without).
server_p99() {
    cli INFO latencystats | tr -d '\r' |
        awk -F'[:,=]' -v c="latency_percentiles_usec_$1" '$1 == c { for (i = 2; i < NF; i++) if ($i == "p99") v = $(i + 1) } END { print (v == "" ? "-" : v) }'
}

# latency_pair N COMMAND_A... -- COMMAND_B... : one client sends A and B alternately, N of
# each, unpipelined; prints "p50_a p99_a p50_b p99_b" in ms (see bench/latency.c).
latency_pair() {
    local n="$1"
    shift
    "$latency_bin" 127.0.0.1 "$port" "$n" "$USERS" "$@" </dev/null
}

# server_cpu_ns : nanoseconds the redis-server has spent on a CPU so far (0 where there is no
# /proc schedstat).
server_cpu_ns() { awk '{ print $1 }' "/proc/$redis_pid/schedstat" 2>/dev/null || echo 0; }

fmt_rps() { awk -v x="$1" 'BEGIN { printf "%.0f", x }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.3f", a / b; else print "nan" }'; }
median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
best() { printf '%s\n' "$@" | sort -g | tail -n1; }
verdict() { # verdict VALUE OP BAR
    awk -v v="$1" -v op="$2" -v bar="$3" 'BEGIN { ok = (op == ">=") ? (v >= bar) : (v <= bar); print ok ? "PASS" : "FAIL" }'
}

# --- warm-up -----------------------------------------------------------------------------
admit_policy=(REQUESTS_PER_DAY 100000000 REQUESTS_PER_MONTH 1000000000 TOKENS_PER_DAY 1000000000)

t0=$(date +%s)
declare -A pos_entries pos_bytes no_rate
# setup_server I: the users, credits, hashes, scripts and policies of the runs, on server I.
setup_server() {
    use_server "$1"
    log "granting a credit to $USERS users (Postgres, $LOADERS connections)"
    pipe_all "$LOADERS" "" 0 "$USERS" QUOTA.GRANT acme chat u@U@ '*' REQUESTS_PER_DAY 1000000 TOKENS_PER_DAY 1000000000
    settle_notify
    log "granted in $(($(date +%s) - t0)) s"
    # Grants write through to the cache; drop those entries so the warm-up below measures a
    # clean load of USERS cached users with one credit each.
    pipe_all 1 "" 0 "$USERS" QUOTA.INVALIDATE acme chat u@U@
    log "warming the credits cache: QUOTA.GET on $USERS users"
    measure entries pipe_all "$LOADERS" "" 0 "$USERS" QUOTA.GET acme chat u@U@ '*'
    pos_entries[$1]=$units
    pos_bytes[$1]=$bytes
    sample="$(cli QUOTA.GET acme chat u000000000007 '*' | tr '\n' ' ')"
    case "$sample" in
        *requests_per_day\ 1000000*) ;;
        *) die "QUOTA.GET did not return the granted credit: $sample" ;;
    esac

    log "loading the Lua script, its credit hashes and $USERS string keys"
    pipe_all 1 "" 0 "$USERS" HSET credits:u@U@ requests_per_day 1000000 tokens_per_day 1000000000
    pipe_all 1 "" 0 "$USERS" SET key:@U@ vvvvvvvvvvvvvvvv
    # A hash with the 18 fields of a QUOTA.GET record: HGETALL has a reply of the same shape, so
    # QUOTA.GET/HGETALL shows the module's own cost apart from the size of its reply.
    pipe_all 1 "" 0 "$USERS" HSET rec:@U@ tenant acme project chat user_id u@U@ bundle_id '*' \
        requests_per_day 1000000 requests_per_month - total_requests - \
        tokens_per_hour - tokens_per_day 1000000000 tokens_per_month - \
        max_concurrent - expires_at - purchase_id - purchase_amount_usd - purchase_notes - \
        active 1 created_at 1795841254 updated_at 1795841254
    # The same record with the six balance fields QUOTA.GET has had since prepaid balances: the
    # reply of today's QUOTA.GET, field for field (the bar above keeps the 18-field baseline).
    pipe_all 1 "" 0 "$USERS" HSET rec24:@U@ tenant acme project chat user_id u@U@ bundle_id '*' \
        requests_per_day 1000000 requests_per_month - total_requests - \
        tokens_per_hour - tokens_per_day 1000000000 tokens_per_month - \
        max_concurrent - expires_at - purchase_id - purchase_amount_usd - purchase_notes - \
        active 1 created_at 1795841254 updated_at 1795841254 requests_balance - tokens_balance - \
        requests_balance_debited - tokens_balance_debited - requests_balance_left - \
        tokens_balance_left -
    # Balance users: a '*' credit with prepaid requests only. Their admissions below ask for
    # REQUESTS_PER_DAY 0, so the balance pays every one.
    log "granting a request balance to $USERS balance users"
    pipe_all "$LOADERS" "" 0 "$USERS" QUOTA.GRANT acme chat b@U@ '*' REQUESTS_BALANCE 1000000000000
    settle_notify
    pipe_all "$LOADERS" "" 0 "$USERS" QUOTA.GET acme chat b@U@ '*'
    bal_check="$(cli QUOTA.ADMIT acme chat b000000000001 '*' REQUESTS_PER_DAY 0 COMPACT | sed -n 9p)"
    [ "$bal_check" = balance ] || die "QUOTA.ADMIT on a balance user was not paid by the balance: $bal_check"
    sha="$(cli SCRIPT LOAD "$(cat "$root/bench/admit.lua")")"
    [ "${#sha}" -eq 40 ] || die "SCRIPT LOAD failed: $sha"
    lua_check="$(cli EVALSHA "$sha" 1 u000000000001 100000000 1000000000 1000000000 1000000 "$LEASE_TTL" | head -n1)"
    [ "$lua_check" = 1 ] || die "admit.lua did not admit: $lua_check"
    admit_check="$(cli QUOTA.ADMIT acme chat u000000000001 '*' "${admit_policy[@]}" MAX_CONCURRENT 1000000 | sed -n 2p)"
    [ "$admit_check" = 1 ] || die "QUOTA.ADMIT did not admit: $admit_check"
    # The same limits as a named policy (written through to this node's policy cache).
    cli QUOTA.POLICY SET acme chat bench "${admit_policy[@]}" MAX_CONCURRENT 1000000 >/dev/null
    policy_check="$(cli QUOTA.ADMIT acme chat u000000000001 '*' POLICY bench COMPACT | head -n1)"
    [ "$policy_check" = 1 ] || die "QUOTA.ADMIT POLICY did not admit: $policy_check"
    # One smooth rate, as CL.THROTTLE below has (a burst of 1000000, 1000000 a second).
    cli QUOTA.POLICY SET acme chat rate REQUESTS_PER_SECOND 1000000 >/dev/null
    rate_check="$(cli QUOTA.ADMIT acme chat u000000000001 r POLICY rate COMPACT | head -n1)"
    if [ "$rate_check" != 1 ]; then
        # An older build (BENCH_COMPARE) may not have rates: its rate row is left out.
        [ "$1" != 0 ] || die "QUOTA.ADMIT POLICY rate did not admit: $rate_check"
        log "server $1 has no rates (QUOTA.ADMIT POLICY rate: $rate_check): its 1-rate row is left out"
        no_rate[$1]=1
    fi
    cell_check="$(cli CL.THROTTLE cell:u000000000001 1000000 1000000 1 1 | head -n1)"
    [ "$cell_check" = 0 ] || die "CL.THROTTLE did not allow: $cell_check"
    cell5_check="$(cli CL.THROTTLE050 cell5:u000000000001 1000000 1000000 1 1 | head -n1)"
    [ "$cell5_check" = 0 ] || die "CL.THROTTLE050 (redis-cell 0.5.0) did not allow: $cell5_check"
}
for s in "${servers[@]}"; do setup_server "$s"; done
use_server 0

# --- throughput --------------------------------------------------------------------------
# Each ratio's two commands run back to back in every round (ADMIT POLICY between the two
# CL.THROTTLE versions).
names=(INCR CELL HMGET ADMIT POLICY CELL5 RATE QGET HGETALL HGETALL24 BALANCE WINDOWS)
if [ "${BENCH_EXTRA:-0}" = 1 ]; then names+=(LUA ADMIT_NOLEASE GET); fi
declare -A label cmd n_of
label[INCR]="INCR counter:__rand_int__"
label[CELL]="CL.THROTTLE (redis-cell 0.2.2)"
label[CELL5]="CL.THROTTLE (redis-cell 0.5.0)"
label[POLICY]="QUOTA.ADMIT POLICY .. COMPACT"
label[RATE]="QUOTA.ADMIT POLICY (1 rate)"
label[ADMIT]="QUOTA.ADMIT inline (13 args)"
label[ADMIT_NOLEASE]="QUOTA.ADMIT (no lease)"
label[LUA]="EVALSHA admit.lua"
label[GET]="GET key:__rand_int__"
label[QGET]="QUOTA.GET (cached)"
label[HGETALL]="HGETALL rec:__rand_int__ (18 f.)"
label[HGETALL24]="HGETALL rec24:__rand_int__ (24 f.)"
label[HMGET]="HMGET rec:__rand_int__ (13 args)"
label[BALANCE]="QUOTA.ADMIT paid by a balance"
label[WINDOWS]="QUOTA.ADMIT paid by its windows"
cmd[INCR]="INCR counter:__rand_int__"
cmd[ADMIT]="QUOTA.ADMIT acme chat u__rand_int__ * ${admit_policy[*]} MAX_CONCURRENT 1000000"
cmd[POLICY]="QUOTA.ADMIT acme chat u__rand_int__ * POLICY bench COMPACT"
# Its own account keys (bundle r; the user's cached '*' credit applies, adding no rate).
cmd[RATE]="QUOTA.ADMIT acme chat u__rand_int__ r POLICY rate COMPACT"
cmd[CELL]="CL.THROTTLE cell:u__rand_int__ 1000000 1000000 1 1"
# The same call to 0.5.0 (renamed to share the server), on keys of its own.
cmd[CELL5]="CL.THROTTLE050 cell5:u__rand_int__ 1000000 1000000 1 1"
cmd[ADMIT_NOLEASE]="QUOTA.ADMIT acme chat u__rand_int__ * ${admit_policy[*]}"
cmd[LUA]="EVALSHA $sha 1 u__rand_int__ 100000000 1000000000 1000000000 1000000 $LEASE_TTL"
cmd[GET]="GET key:__rand_int__"
cmd[QGET]="QUOTA.GET acme chat u__rand_int__ *"
cmd[HGETALL]="HGETALL rec:__rand_int__"
cmd[HGETALL24]="HGETALL rec24:__rand_int__"
# The same command shape; the first is paid by the user's balance (a window of 0), the second
# by its windows (a user with a window credit and no balance).
cmd[BALANCE]="QUOTA.ADMIT acme chat b__rand_int__ * REQUESTS_PER_DAY 0 COMPACT"
cmd[WINDOWS]="QUOTA.ADMIT acme chat u__rand_int__ * REQUESTS_PER_DAY 1000000000 COMPACT"
# 13 arguments like the ADMIT above, 11 values back: Redis's own cost of a command that size.
cmd[HMGET]="HMGET rec:__rand_int__ tenant project user_id bundle_id requests_per_day requests_per_month tokens_per_day expires_at active created_at updated_at"

run() { # run NAME N
    local words
    read -r -a words <<<"${cmd[$1]}"
    bench_once "$2" "${words[@]}"
}

log "calibrating run sizes (~${SECONDS_PER_RUN} s per run)"
for name in "${names[@]}"; do
    case "$name" in INCR | GET) probe=400000 ;; *) probe=100000 ;; esac
    rps="$(run "$name" "$probe")"
    [ -n "$rps" ] || die "redis-benchmark failed for ${label[$name]}"
    n_of[$name]="$(awk -v r="$rps" -v s="$SECONDS_PER_RUN" 'BEGIN { n = int(r * s / 10000) * 10000; if (n < 50000) n = 50000; if (n > 20000000) n = 20000000; print n }')"
    log "  ${label[$name]}: ~$(fmt_rps "$rps")/s -> -n ${n_of[$name]}"
done

declare -A results cpu lat50 lat99 srv99
hits0="$(quota_stat cache_hits)"
misses0="$(quota_stat cache_misses)"
stale0="$(quota_stat cache_stale_hits)"
allowed0="$(quota_stat admits_allowed)"
denied0="$(quota_stat admits_denied)"
for ((r = 1; r <= ROUNDS; r++)); do
    for name in "${names[@]}"; do
        # Head to head: the same command on the other build's server right after.
        for s in "${servers[@]}"; do
            [ "$name" = RATE ] && [ -n "${no_rate[$s]:-}" ] && continue
            use_server "$s"
            k="$name"
            [ "$s" = 0 ] || k="$name@$s"
            c0="$(server_cpu_ns)"
            rps="$(run "$name" "${n_of[$name]}")"
            c1="$(server_cpu_ns)"
            [ -n "$rps" ] || die "redis-benchmark failed for ${label[$name]} (server $s)"
            results[$k]="${results[$k]:-} $rps"
            # The server's CPU per command (ns): what the command costs, whoever else ran meanwhile.
            cpu[$k]="${cpu[$k]:-} $(((c1 - c0) / n_of[$name]))"
            tag=""
            [ "$s" = 0 ] || tag=" (BENCH_COMPARE)"
            log "round $r/$ROUNDS ${label[$name]}$tag: $(fmt_rps "$rps")/s, $(((c1 - c0) / n_of[$name])) ns of server CPU each"
        done
    done
    use_server 0
    read -r -a incr_words <<<"${cmd[INCR]}"
    read -r -a policy_words <<<"${cmd[POLICY]}"
    cli CONFIG RESETSTAT >/dev/null
    read -r i50 i99 q50 q99 <<<"$(latency_pair "$LAT_N" "${incr_words[@]}" -- "${policy_words[@]}")"
    [ -n "$q99" ] || die "the latency client failed"
    # The same calls as Redis timed them inside the server (latency-tracking, Redis >= 7).
    srv99[INCR]="${srv99[INCR]:-} $(server_p99 incr)"
    srv99[POLICY]="${srv99[POLICY]:-} $(server_p99 quota.admit)"
    lat50[INCR]="${lat50[INCR]:-} $i50"
    lat99[INCR]="${lat99[INCR]:-} $i99"
    lat50[POLICY]="${lat50[POLICY]:-} $q50"
    lat99[POLICY]="${lat99[POLICY]:-} $q99"
    log "round $r/$ROUNDS unpipelined ${label[INCR]}: p50 $i50 ms, p99 $i99 ms; ${label[POLICY]}: p50 $q50 ms, p99 $q99 ms"
done
hits1="$(quota_stat cache_hits)"
misses1="$(quota_stat cache_misses)"
stale1="$(quota_stat cache_stale_hits)"
allowed1="$(quota_stat admits_allowed)"
denied1="$(quota_stat admits_denied)"

# A sample of admissions after the runs: each should still be allowed.
sample_allowed=0
for i in $(seq 0 499 "$((USERS - 1))"); do
    u="$(printf 'u%012d' "$i")"
    a="$(cli QUOTA.ADMIT acme chat "$u" '*' "${admit_policy[@]}" MAX_CONCURRENT 1000000 | sed -n 2p)"
    [ "$a" = 1 ] && sample_allowed=$((sample_allowed + 1))
done
sample_total=$(((USERS - 1) / 499 + 1))
lua_after="$(cli EVALSHA "$sha" 1 u000000000042 100000000 1000000000 1000000000 1000000 "$LEASE_TTL" | head -n1)"
usage_sample="$(cli QUOTA.USAGE acme chat u000000000042 '*' | paste -sd' ' -)"

# --- memory ------------------------------------------------------------------------------
log "memory: QUOTA.GET on $MEM_USERS users without credits (negative cache entries)"
measure entries pipe_all "$LOADERS" n 0 "$MEM_USERS" QUOTA.GET acme chat @U@ '*'
neg_entries=$units
neg_bytes=$bytes
log "memory: done ($neg_entries entries)"

log "memory: QUOTA.ADMIT REQUESTS_PER_DAY 10 on $MEM_USERS accounts (no lease)"
measure keys pipe_all 1 n 0 "$MEM_USERS" QUOTA.ADMIT acme chat @U@ '*' REQUESTS_PER_DAY 10
acc_keys=$units
acc_bytes=$bytes
log "memory: done ($acc_keys keys)"
# The ledger: the next flush snapshot covers at least the MEM_USERS accounts just admitted.
log "ledger: waiting for a flush snapshot over the $MEM_USERS new accounts"
snap_us=""
snap_tick_us=""
snap_accounts=0
for _ in $(seq 1 300); do
    snap_accounts="$(quota_stat ledger_last_snapshot_accounts)"
    if [ "${snap_accounts:-0}" -ge "$MEM_USERS" ]; then
        snap_us="$(quota_stat ledger_last_snapshot_us)"
        snap_tick_us="$(quota_stat ledger_last_snapshot_longest_tick_us)"
        break
    fi
    sleep 0.1
done
# Account key: q:{<user>}: then tenant, project, user and bundle as <length>:<bytes>.
account_key() { printf 'q:{%s}:4:acme4:chat%d:%s1:*' "$1" "${#1}" "$1"; }
acc_key="$(account_key n000000000000)"
acc_usage="$(cli MEMORY USAGE "$acc_key")"
lease_key="$(account_key u000000000042)"
if [ "$(cli EXISTS "$acc_key")" != 1 ] || [ "$(cli EXISTS "$lease_key")" != 1 ]; then
    die "account keys not found ($acc_key, $lease_key)"
fi
cli QUOTA.ADMIT acme chat u000000000042 '*' MAX_CONCURRENT 10 LEASE_TTL 600 >/dev/null
lease_usage="$(cli MEMORY USAGE "$lease_key")"

# --- cold misses in one long pipeline ---------------------------------------------------------
# One connection pipelines ADMITs for users never seen (issue 23: a 1M-command pipeline of new
# users used to run at ~430/s, quadratic, every miss blocking its client). PostgreSQL up: each
# miss waits for its load (a round trip each; linear, but bound by PostgreSQL's latency).
# PostgreSQL down (a pg-url nothing listens on) and no pg-url at all: misses never block.
cold_rate() { # PREFIX N : ADMITs of N new users in one pipeline; prints ADMITs/s
    local start end
    start="$(date +%s%N)"
    pipe_all 1 "$1" 0 "$2" QUOTA.ADMIT acme cold @U@ web REQUESTS_PER_DAY 10
    end="$(date +%s%N)"
    awk -v n="$2" -v ns="$((end - start))" 'BEGIN { printf "%d", n / (ns / 1e9) }'
}
log "cold misses: $COLD_UP new users in one pipeline, PostgreSQL up"
cli CONFIG SET quota.pg-timeout-ms 2000 >/dev/null
cold_up="$(cold_rate cu "$COLD_UP")"
log "cold misses: $COLD_N new users in one pipeline, PostgreSQL down"
cli CONFIG SET quota.pg-url "postgresql://bench@127.0.0.1:1/none" >/dev/null
# The first miss finds PostgreSQL unreachable (its client waits up to pg-timeout-ms); from
# then on PostgreSQL is known to be down, which is what the row measures.
cli QUOTA.ADMIT acme cold first-miss web REQUESTS_PER_DAY 10 >/dev/null
cold_down="$(cold_rate cd "$COLD_N")"
log "cold misses: $COLD_N new users in one pipeline, no pg-url"
cli CONFIG SET quota.pg-url "" >/dev/null
cold_none="$(cold_rate cn "$COLD_N")"
log "cold misses: $cold_up/s up, $cold_down/s down, $cold_none/s without PostgreSQL"

# --- report ------------------------------------------------------------------------------
# row_ratio A B: value (median of the per-round throughput ratios A/B), per (those ratios) and
# cvalue (the median ratio of B's server CPU per command to A's), from results and cpu.
row_ratio() {
    local as bs ca cb cper i
    read -r -a as <<<"${results[$1]}"
    read -r -a bs <<<"${results[$2]}"
    read -r -a ca <<<"${cpu[$1]}"
    read -r -a cb <<<"${cpu[$2]}"
    per=()
    for i in "${!as[@]}"; do per+=("$(ratio "${as[$i]}" "${bs[$i]}")"); done
    value="$(awk -v x="$(median "${per[@]}")" 'BEGIN { printf "%.3f", x }')"
    cper=()
    for i in "${!ca[@]}"; do cper+=("$(ratio "${cb[$i]}" "${ca[$i]}")"); done
    cvalue="$(awk -v x="$(median "${cper[@]}")" 'BEGIN { printf "%.3f", x }')"
}
change() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%+.1f%%", (a / b - 1) * 100; else print "nan" }'; }
mkdir -p "$root/bench/out"
{
    echo
    echo "redis-quota benchmark  $(date -u '+%Y-%m-%d %H:%M:%S UTC')  $(nproc) cores  redis $("$REDIS_SERVER" --version | awk '{print $3}' | sed 's/v=//')"
    echo "redis-benchmark -P $PIPE -c $CLIENTS -r $USERS, ~${SECONDS_PER_RUN} s per run, $ROUNDS interleaved rounds"
    echo "QUOTA.ADMIT policy: ${admit_policy[*]} [MAX_CONCURRENT 1000000]; every user has a '*' credit"
    echo "(REQUESTS_PER_DAY 1000000 TOKENS_PER_DAY 1000000000); quota.lease-ttl $LEASE_TTL s (admit.lua: the same TTL)"
    echo "so each admitted request's lease expires after 1 s and the lease lists stay short."
    echo
    printf '%-32s %12s %12s %9s   %s\n' "command" "median/s" "best/s" "cpu ns" "runs/s"
    for name in "${names[@]}"; do
        read -r -a xs <<<"${results[$name]}"
        read -r -a cs <<<"${cpu[$name]}"
        runs=""
        for x in "${xs[@]}"; do runs="$runs $(fmt_rps "$x")"; done
        printf '%-32s %12s %12s %9s  %s\n' "${label[$name]}" "$(fmt_rps "$(median "${xs[@]}")")" "$(fmt_rps "$(best "${xs[@]}")")" "$(fmt_rps "$(median "${cs[@]}")")" "$runs"
    done
    echo "(cpu ns: the server's CPU time per command, median of the rounds)"
    echo
    echo "ratios (median of the per-round ratios; each round runs every command back to back;"
    echo "cpu: the same ratio from the server's CPU per command, B's over A's, median of the rounds)"
    printf '%-38s %8s %8s  %-7s  %6s  %s\n' "ratio" "value" "bar" "verdict" "cpu" "(per round)"
    rows=("ADMIT POLICY+COMPACT/CL.THROTTLE:POLICY:CELL:>=:$BAR_POLICY_CELL"
        "ADMIT POLICY+COMPACT/CL.THROTTLE 0.5:POLICY:CELL5:>=:$BAR_POLICY_CELL"
        "ADMIT 1-rate POLICY/CL.THROTTLE:RATE:CELL:-:-"
        "ADMIT 1-rate POLICY/CL.THROTTLE 0.5:RATE:CELL5:>=:$BAR_RATE_CELL"
        "ADMIT POLICY+COMPACT/INCR:POLICY:INCR:>=:$BAR_POLICY_INCR"
        "ADMIT inline/HMGET(13 args):ADMIT:HMGET:>=:$BAR_ADMIT_HMGET"
        "QUOTA.GET/HGETALL(18 fields):QGET:HGETALL:>=:$BAR_GET_HGETALL"
        "ADMIT balance-paid/windows-paid:BALANCE:WINDOWS:>=:$BAR_BALANCE_WINDOWS"
        "QUOTA.GET/HGETALL(24, same shape):QGET:HGETALL24:-:-"
        "ADMIT inline/INCR:ADMIT:INCR:-:-"
        "CL.THROTTLE/INCR:CELL:INCR:-:-"
        "CL.THROTTLE 0.5/INCR:CELL5:INCR:-:-"
        "CL.THROTTLE 0.5/CL.THROTTLE 0.2.2:CELL5:CELL:-:-"
        "HMGET(13 args)/INCR:HMGET:INCR:-:-")
    if [ "${BENCH_EXTRA:-0}" = 1 ]; then
        rows+=("ADMIT inline/Lua:ADMIT:LUA:-:-" "ADMIT(no lease)/INCR:ADMIT_NOLEASE:INCR:-:-"
            "QUOTA.GET/GET:QGET:GET:-:-")
    fi
    for row in "${rows[@]}"; do
        IFS=: read -r title a b op bar <<<"$row"
        row_ratio "$a" "$b"
        if [ "$op" = - ]; then
            printf '%-38s %8s %8s  %-7s  %6s  (%s)\n' "$title" "$value" "" "info" "$cvalue" "${per[*]}"
        else
            printf '%-38s %8s %8s  %-7s  %6s  (%s)\n' "$title" "$value" "$op $bar" "$(verdict "$value" "$op" "$bar")" "$cvalue" "${per[*]}"
        fi
    done
    echo
    echo "unpipelined latency (one client sending the two commands alternately, $LAT_N of each a round; median over the rounds, ms)"
    read -r -a i50 <<<"${lat50[INCR]}"
    read -r -a i99 <<<"${lat99[INCR]}"
    read -r -a q50 <<<"${lat50[POLICY]}"
    read -r -a q99 <<<"${lat99[POLICY]}"
    printf '  %-32s p50 %6s  p99 %6s   (p99 per round: %s)\n' "${label[INCR]}" "$(median "${i50[@]}")" "$(median "${i99[@]}")" "${i99[*]}"
    printf '  %-32s p50 %6s  p99 %6s   (p99 per round: %s)\n' "${label[POLICY]}" "$(median "${q50[@]}")" "$(median "${q99[@]}")" "${q99[*]}"
    per=()
    for i in "${!i99[@]}"; do per+=("$(ratio "${q99[$i]}" "${i99[$i]}")"); done
    value="$(awk -v x="$(median "${per[@]}")" 'BEGIN { printf "%.3f", x }')"
    printf '  %-32s %8s  bar <= %s: %s  (%s)\n' "p99 ADMIT POLICY / p99 INCR" "$value" "$BAR_P99" "$(verdict "$value" "<=" "$BAR_P99")" "${per[*]}"
    echo "  inside the server (INFO latencystats p99 of the same calls, us per round): INCR${srv99[INCR]}, ADMIT POLICY${srv99[POLICY]}"
    echo
    echo "checks during the runs: credits cache hits +$((hits1 - hits0)), misses +$((misses1 - misses0)), stale hits +$((stale1 - stale0));"
    echo "  admits allowed +$((allowed1 - allowed0)), denied +$((denied1 - denied0)); sampled afterwards: $sample_allowed/$sample_total allowed"
    echo "  (admit.lua afterwards: allowed=$lua_after)"
    echo "  QUOTA.USAGE u000000000042 after the runs: $usage_sample"
    echo
    echo "memory (INFO memory used_memory deltas)"
    printf '  %-52s %8s bytes  (%s entries)  bar <= %s: %s\n' "per cached user with one credit (QUOTA.GET warm-up)" "${pos_bytes[0]}" "${pos_entries[0]}" "$BAR_USER_BYTES" "$(verdict "${pos_bytes[0]}" "<=" "$BAR_USER_BYTES")"
    printf '  %-52s %8s bytes  (%s entries)\n' "per cached user without credits (negative entry)" "$neg_bytes" "$neg_entries"
    printf '  %-52s %8s us  (%s accounts)\n' "ledger: main-thread time of one flush snapshot" "${snap_us:-none}" "$snap_accounts"
    printf '  %-52s %8s us  (in slices of 1000 accounts, ~5 ms a tick)\n' "ledger: the snapshot's longest single tick" "${snap_tick_us:-none}"
    printf '  %-52s %8s bytes  (%s keys)  bar <= %s: %s\n' "per account key (QUOTA.ADMIT REQUESTS_PER_DAY 10)" "$acc_bytes" "$acc_keys" "$BAR_ACCOUNT_BYTES" "$(verdict "$acc_bytes" "<=" "$BAR_ACCOUNT_BYTES")"
    printf '  %-52s %8s bytes\n' "MEMORY USAGE of one such account key" "$acc_usage"
    printf '  %-52s %8s bytes\n' "MEMORY USAGE of a benchmark account + 1 live lease" "$lease_usage"
    echo "  (the benchmark account held ~10-20 leases during the runs; its vectors keep that capacity)"
    echo
    echo "cold misses: QUOTA.ADMIT of new users, all in ONE pipeline on one connection (redis-cli --pipe)"
    printf '  %-52s %8s /s  bar >= %s: %s\n' "$COLD_N users, PostgreSQL down (nothing on its port)" "$cold_down" "$BAR_COLD" "$(verdict "$cold_down" ">=" "$BAR_COLD")"
    printf '  %-52s %8s /s  bar >= %s: %s\n' "$COLD_N users, no pg-url" "$cold_none" "$BAR_COLD" "$(verdict "$cold_none" ">=" "$BAR_COLD")"
    printf '  %-52s %8s /s  (info: one load round trip per miss)\n' "$COLD_UP users, PostgreSQL up" "$cold_up"
    if [ -n "$compare" ]; then
        echo
        echo "head to head: this build ($module) against BENCH_COMPARE ($compare),"
        echo "each command on both servers back to back in every round; change: this build's ratio against the other's"
        printf '%-38s %8s %8s %8s   %6s %6s %8s\n' "ratio" "this" "other" "change" "cpu" "other" "change"
        for row in "${rows[@]}"; do
            IFS=: read -r title a b _ _ <<<"$row"
            [ -n "${results[$a@1]:-}" ] && [ -n "${results[$b@1]:-}" ] || continue
            row_ratio "$a" "$b"
            this="$value" this_cpu="$cvalue"
            row_ratio "$a@1" "$b@1"
            printf '%-38s %8s %8s %8s   %6s %6s %8s\n' "$title" "$this" "$value" "$(change "$this" "$value")" "$this_cpu" "$cvalue" "$(change "$this_cpu" "$cvalue")"
        done
        printf '%-38s %8s %8s %8s   (bytes; lower is better)\n' "memory per cached user with one credit" "${pos_bytes[0]}" "${pos_bytes[1]}" "$(change "${pos_bytes[0]}" "${pos_bytes[1]}")"
    fi
} | tee "$root/bench/out/last-run.txt"
log "total $(($(date +%s) - t0)) s"
fails="$(grep -c 'FAIL' "$root/bench/out/last-run.txt" || true)"
if [ "${BENCH_STRICT:-0}" = 1 ] && [ "$fails" -gt 0 ]; then
    log "$fails bar(s) missed (BENCH_STRICT=1)"
    exit 1
fi
