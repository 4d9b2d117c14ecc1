-- A rate limiter as a Lua script: one QUOTA.ADMIT call, the user's purchased or
-- granted credits included.
--
--   EVAL <this script> 1 <user> <tenant> <project> <bundle> <requests_per_day>
--
-- KEYS[1] is the user id: QUOTA.* commands declare the user as their key, so
-- declaring it here lets Redis Cluster route the script to the node that holds
-- that user's counters.
--
-- Returns {allowed, retry_after}: allowed is 1 or 0; retry_after is the number of
-- seconds until the violated window resets (-1 when allowed).
--
-- Inside a script a user whose credits are not cached yet is not blocked: the
-- module decides on the base policy alone (credit "pending") and loads
-- the credits in the background, so the next call sees them.

local user = KEYS[1]
local tenant, project, bundle, rpd = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

-- COMPACT: a flat array read by position, the same in RESP2 and RESP3:
-- {allowed, retry_after, remaining_requests, remaining_tokens, lease, reason,
--  reserved, credit}.
local r = redis.call('QUOTA.ADMIT', tenant, project, user, bundle,
                     'REQUESTS_PER_DAY', rpd, 'COMPACT')

return {r[1], r[2]}
