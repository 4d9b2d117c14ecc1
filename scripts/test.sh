#!/usr/bin/env bash
# `make test`: every test of redis-quota.
#
#   1. system packages (scripts/deps.sh) and Redis 8 (scripts/redis8.sh)
#   2. cargo build --release                       -> target/release/libredis_quota.so
#   3. one throwaway PostgreSQL for the whole run  -> QUOTA_TEST_PG_URL, plus for
#      tests/pg_modes.rs a TLS-only one (scripts/pg.sh start-tls) -> QUOTA_TEST_TLS_PG_URL,
#      QUOTA_TEST_TLS_DIR, and a PgBouncer in transaction mode in front of the first
#      (scripts/pgbouncer.sh) -> QUOTA_TEST_BOUNCER_URL
#   4. unit tests: cargo test --release --lib (the store tests use that PostgreSQL)
#   5. the integration suite (tests/*.rs) twice: on Redis 7.0 (Debian's redis-server)
#      and on Redis 8.2 (.tools/redis8/redis-server)  -> QUOTA_TEST_REDIS
#   6. the examples (examples/run.sh: examples/python/*.py with redis-py in
#      .tools/venv, examples/lua/*.sh), on Redis 7.0 and on Redis 8.2
#
# Knobs: REDIS7=<binary> (default: redis-server on PATH), REDIS8=<binary>
# (default: fetched), KEEP_TEST_DIR=1 keeps the servers' directories,
# QUOTA_TEST_THREADS (default 4).
#
# The last line printed is `total: N passed, M failed` (tests of all stages); the
# exit status is non-zero when any stage failed.
set -uo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

section() { printf '\n==================== %s ====================\n' "$*"; }
# A setup step that fails ends the run: summary line counts it as one failure.
die() {
    echo "make test: $*" >&2
    stages+=("FAIL  $*")
    total_fail=$((total_fail + 1))
    finish 1
}

declare -a stages=()
failed=0
total_pass=0
total_fail=0

record() { # name rc passed failed
    local name="$1" rc="$2" p="${3:-0}" f="${4:-0}"
    total_pass=$((total_pass + p))
    total_fail=$((total_fail + f))
    if [ "$rc" -eq 0 ]; then
        stages+=("PASS  $name  ($p passed, $f failed)")
    else
        stages+=("FAIL  $name  ($p passed, $f failed, exit $rc)")
        failed=1
        # A stage that failed without a counted failing test still counts as one failure.
        if [ "$f" -eq 0 ]; then
            total_fail=$((total_fail + 1))
        fi
    fi
}

finish() { # exit-status
    local s line
    section "summary"
    for s in "${stages[@]}"; do
        echo "$s"
    done
    line="total: $total_pass passed, $total_fail failed"
    if [ -n "${QUOTA_TEST_SUMMARY:-}" ]; then
        echo "$line" >"$QUOTA_TEST_SUMMARY"
    fi
    echo "$line"
    exit "$1"
}

# ---- 1. packages -----------------------------------------------------------
section "system packages"
scripts/deps.sh || die "installing system packages failed"

section "Redis 8"
REDIS8="${REDIS8:-$(scripts/redis8.sh)}" || die "fetching Redis 8 failed"
REDIS7="${REDIS7:-$(command -v redis-server || true)}"
[ -n "$REDIS7" ] || die "redis-server not found"
# Absolute, but symlinks kept: Debian's redis-server is a link to redis-check-rdb,
# which acts on the name it was started as.
REDIS7="$(realpath -s "$REDIS7")"
REDIS8="$(realpath -s "$REDIS8")"
echo "Redis 7: $REDIS7 ($("$REDIS7" --version))"
echo "Redis 8: $REDIS8 ($("$REDIS8" --version))"

# ---- 2. build ----------------------------------------------------------------
section "cargo build --release"
cargo build --release || die "cargo build --release failed"
module="$root/target/release/libredis_quota.so"
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
    module="$(cd "$root" && readlink -f "$CARGO_TARGET_DIR")/release/libredis_quota.so"
fi
[ -f "$module" ] || die "$module was not built"
export QUOTA_TEST_MODULE="$module"

# ---- scratch directory for every server of this run -----------------------------
tmp="$(mktemp -d /tmp/redis-quota-test.XXXXXX)"
chmod 755 "$tmp"
export QUOTA_TEST_TMPDIR="$tmp"

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    local d p cwd
    # Throwaway PostgreSQL servers (the shared one and any a killed test left behind).
    [ -d "$tmp/pgbouncer" ] && scripts/pgbouncer.sh destroy "$tmp/pgbouncer" >/dev/null 2>&1
    for d in "$tmp"/pg "$tmp"/pg-*; do
        [ -d "$d" ] && scripts/pg.sh destroy "$d" >/dev/null 2>&1
    done
    # Any process still running in one of our directories (e.g. a redis-server whose
    # test was killed by a timeout).
    for p in /proc/[0-9]*; do
        cwd="$(readlink "$p/cwd" 2>/dev/null)" || continue
        case "$cwd" in
            "$tmp" | "$tmp"/*) kill -9 "${p#/proc/}" 2>/dev/null ;;
        esac
    done
    if [ "${KEEP_TEST_DIR:-0}" = 1 ]; then
        echo "test directories kept in $tmp" >&2
    else
        rm -rf "$tmp"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

count_cargo_test() { # log -> "passed failed"
    awk '/^test result:/ {
            for (i = 1; i <= NF; i++) {
                if ($(i) ~ /^passed;?$/) p += $(i-1);
                if ($(i) ~ /^failed;?$/) f += $(i-1);
            }
         }
         END { printf "%d %d\n", p, f }' "$1"
}

count_nextest() { # log -> "passed failed"
    awk '/^ *Summary \[/ {
            for (i = 1; i <= NF; i++) {
                w = $(i); gsub(/[,;]/, "", w);
                if (w == "passed") p += $(i-1);
                if (w == "failed") f += $(i-1);
                if (w == "timed" && $(i+1) ~ /^out/) f += $(i-1);
            }
         }
         END { printf "%d %d\n", p, f }' "$1"
}

# ---- 3. PostgreSQL (the store unit tests use it too) ----------------------------
section "throwaway PostgreSQL"
QUOTA_TEST_PG_URL="$(scripts/pg.sh start "$tmp/pg")" || die "PostgreSQL did not start"
export QUOTA_TEST_PG_URL
echo "QUOTA_TEST_PG_URL=$QUOTA_TEST_PG_URL"

section "TLS PostgreSQL and PgBouncer (tests/pg_modes.rs)"
QUOTA_TEST_TLS_PG_URL="$(scripts/pg.sh start-tls "$tmp/pg-tls")" || die "the TLS PostgreSQL did not start"
export QUOTA_TEST_TLS_PG_URL QUOTA_TEST_TLS_DIR="$tmp/pg-tls/tls"
echo "QUOTA_TEST_TLS_PG_URL=$QUOTA_TEST_TLS_PG_URL"
pg_port="$(cat "$tmp/pg/port")"
QUOTA_TEST_BOUNCER_URL="$(scripts/pgbouncer.sh start "$tmp/pgbouncer" "$pg_port")" ||
    die "PgBouncer did not start"
export QUOTA_TEST_BOUNCER_URL
echo "QUOTA_TEST_BOUNCER_URL=${QUOTA_TEST_BOUNCER_URL/:*@/:(password)@}"

# ---- 4. unit tests ------------------------------------------------------------
section "unit tests (cargo test --release --lib)"
log="$tmp/unit.log"
cargo test --release --lib 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
read -r p f < <(count_cargo_test "$log")
record "unit tests" "$rc" "$p" "$f"

# ---- 5. integration tests, twice -------------------------------------------------
threads="${QUOTA_TEST_THREADS:-4}"
have_nextest=0
if cargo nextest --version >/dev/null 2>&1; then
    have_nextest=1
fi
have_integration=0
if compgen -G "tests/*.rs" >/dev/null; then
    have_integration=1
fi

run_integration() { # label binary
    local label="$1" bin="$2" log="$tmp/integration-$1.log" rc p f
    section "integration tests on Redis $label ($("$bin" --version | awk '{print $3}'))"
    if [ "$have_integration" -eq 0 ]; then
        echo "no tests/*.rs: skipped"
        return
    fi
    if [ "$have_nextest" -eq 1 ]; then
        QUOTA_TEST_REDIS="$bin" cargo nextest run --release --test '*' --no-fail-fast \
            --config-file "$root/scripts/nextest.toml" --profile ci \
            --test-threads "$threads" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        read -r p f < <(count_nextest "$log")
    else
        QUOTA_TEST_REDIS="$bin" cargo test --release --test '*' --no-fail-fast \
            -- --test-threads "$threads" 2>&1 | tee "$log"
        rc=${PIPESTATUS[0]}
        read -r p f < <(count_cargo_test "$log")
    fi
    record "integration tests on Redis $label" "$rc" "$p" "$f"
}

run_integration 7 "$REDIS7"
run_integration 8 "$REDIS8"

# ---- 6. examples ------------------------------------------------------------------
# examples/run.sh (owned with the examples) starts a redis-server with the module on
# the PostgreSQL given in QUOTA_PG_URL, runs examples/python/*.py (RESP2 and RESP3,
# redis-py in .tools/venv) and examples/lua/*.sh, and ends with `N passed, M failed`.
count_plain() { # log -> "passed failed" from the last `N passed, M failed` line
    awk '/^[0-9]+ passed, [0-9]+ failed/ { p = $1; f = $3 } END { printf "%d %d\n", p, f }' "$1"
}

run_examples() { # label binary
    local label="$1" bin="$2" log="$tmp/examples-$1.log" rc p f
    section "examples on Redis $label (examples/run.sh)"
    env -u REDIS_URL QUOTA_PG_URL="$QUOTA_TEST_PG_URL" QUOTA_MODULE="$module" REDIS_SERVER="$bin" \
        bash examples/run.sh </dev/null 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    read -r p f < <(count_plain "$log")
    record "examples on Redis $label" "$rc" "$p" "$f"
}

if [ -f examples/run.sh ]; then
    run_examples 7 "$REDIS7"
    run_examples 8 "$REDIS8"
else
    section "examples"
    echo "no examples/run.sh: skipped"
fi

# ---- summary ------------------------------------------------------------------------
finish "$failed"
