#!/usr/bin/env bash
# Runs examples/lua/admit.lua with redis-cli and checks what it returns.
#
#   REDIS_URL=redis://127.0.0.1:6379 bash examples/lua/run.sh
#
# 1. A user without credits and a base policy of 2 requests a day: calls 1 and 2
#    are allowed, call 3 is denied with a retry_after until UTC midnight.
# 2. A user with a +1 request/day credit that is not cached yet (as on a node that
#    never saw this user): inside a script the module does not block, it decides on
#    the base policy ("pending") and loads the credit in the background; once it is
#    loaded, the script sees 2 + 1 requests a day.
# 3. examples/lua/admit_policy.lua: a named policy ("free": 2 requests a day, at
#    most 5 in flight) defined once; the script names it and reads the COMPACT
#    reply by position. A policy not cached yet answers TRYAGAIN inside a script.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
url="${REDIS_URL:-redis://127.0.0.1:6379}"
cli() { "${REDIS_CLI:-redis-cli}" -u "$url" "$@" </dev/null; }

fail() { echo "FAIL: $*" >&2; exit 1; }

tenant=acme project=chat-app bundle=assistant
run_id="$(date +%s)-$$-$RANDOM"

# The NOTIFY listener's first connect empties the credits cache: let that happen before
# anything is cached (a user dropped mid-run would be decided "pending" again).
for _ in $(seq 150); do
    cli INFO quota | grep -q '^quota_notify_state:listening' && break
    sleep 0.1
done

# Load the script once, call it by SHA (what an application would do).
sha="$(cli SCRIPT LOAD "$(cat "$here/admit.lua")")"
[[ "$sha" =~ ^[0-9a-f]{40}$ ]] || fail "SCRIPT LOAD replied: $sha"

# admit USER RPD -> prints "allowed retry_after"
admit() {
    cli EVALSHA "$sha" 1 "$1" "$tenant" "$project" "$bundle" "$2" | tr '\n' ' '
}

# --- 1. base policy: 2 requests a day --------------------------------------------
user="lua-$run_id"
for i in 1 2; do
    read -r allowed retry <<<"$(admit "$user" 2)"
    if [ "$allowed" != 1 ] || [ "$retry" != -1 ]; then
        fail "call $i: expected allowed, got '$allowed $retry'"
    fi
    echo "call $i: allowed"
done
# Call 1 was a cache miss, decided on the base policy while the user's (absent) credits
# loaded in the background; a GET outside a script waits for that load, so call 3 is
# decided on what PostgreSQL holds, not "pending" (which would say retry_after 1).
[ "$(cli QUOTA.GET "$tenant" "$project" "$user" "$bundle")" = "" ] || fail "$user has credits"
read -r allowed retry <<<"$(admit "$user" 2)"
now="$(date +%s)"
to_midnight=$((86400 - now % 86400))
[ "$allowed" = 0 ] || fail "call 3: expected denied, got '$allowed $retry'"
[[ "$retry" =~ ^[0-9]+$ ]] || fail "call 3: retry_after '$retry' is not a number of seconds"
if [ "$retry" -eq 0 ] || [ $((retry - to_midnight)) -gt 2 ] || [ $((to_midnight - retry)) -gt 2 ]; then
    fail "call 3: retry_after $retry, expected about $to_midnight (UTC midnight)"
fi
echo "call 3: denied, retry after $retry s"

# --- 2. credits that are not cached yet --------------------------------------------
user="lua-credit-$run_id"
cli QUOTA.GRANT "$tenant" "$project" "$user" '*' REQUESTS_PER_DAY 1 >/dev/null
cli QUOTA.INVALIDATE "$tenant" "$project" "$user" >/dev/null   # drop the cached credits

# Which credit a script would see right now, without counting a request.
credit() {
    cli EVAL "
        local r = redis.call('QUOTA.ADMIT', ARGV[1], ARGV[2], KEYS[1], ARGV[3], 'PEEK')
        for i = 1, #r, 2 do if r[i] == 'credit' then return r[i + 1] end end" \
        1 "$user" "$tenant" "$project" "$bundle"
}
first="$(credit)"
[ "$first" = pending ] || fail "expected credit pending on a cold user, got '$first'"
echo "cold user: credit $first (base policy, credits loading in the background)"
for _ in $(seq 1 100); do
    [ "$(credit)" = global ] && break
    sleep 0.05
done
[ "$(credit)" = global ] || fail "the credit was never loaded"

for i in 1 2 3; do
    read -r allowed retry <<<"$(admit "$user" 2)"
    [ "$allowed" = 1 ] || fail "call $i with the credit: expected allowed, got '$allowed $retry'"
done
read -r allowed retry <<<"$(admit "$user" 2)"
[ "$allowed" = 0 ] || fail "call 4 with the credit: expected denied, got '$allowed $retry'"
echo "with the +1 credit loaded: 3 calls allowed, the 4th denied"

# --- 3. a named policy ----------------------------------------------------------------
policy_project="policy-$run_id"
cli QUOTA.POLICY SET "$tenant" "$policy_project" free REQUESTS_PER_DAY 2 MAX_CONCURRENT 5 >/dev/null
psha="$(cli SCRIPT LOAD "$(cat "$here/admit_policy.lua")")"
padmit() {
    cli EVALSHA "$psha" 1 "$1" "$tenant" "$policy_project" "$bundle" free 2>&1 | tr '\n' ' '
}
user="lua-policy-$run_id"
for i in 1 2; do
    read -r allowed retry remaining lease <<<"$(padmit "$user")"
    [ "$allowed" = 1 ] || fail "policy call $i: expected allowed, got '$allowed $retry'"
    [ "$remaining" = $((2 - i)) ] || fail "policy call $i: remaining_requests '$remaining'"
    [ -n "$lease" ] || fail "policy call $i: MAX_CONCURRENT takes a lease, got none"
done
read -r allowed retry _ <<<"$(padmit "$user")"
[ "$allowed" = 0 ] || fail "policy call 3: expected denied, got '$allowed $retry'"
echo "policy free: 2 calls allowed (each with a lease), the 3rd denied"
echo ok
