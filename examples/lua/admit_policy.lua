-- A rate limiter over a named policy: the tier ("free", "pro", ...) is defined once
-- with QUOTA.POLICY SET, and the script only names it.
--
--   EVAL <this script> 1 <user> <tenant> <project> <bundle> <policy>
--
-- Returns {allowed, retry_after, remaining_requests, lease}, read by position
-- from the COMPACT reply (the same under RESP2 and RESP3).
--
-- A script cannot wait for PostgreSQL: if the policy is not cached on this node
-- yet, QUOTA.ADMIT raises TRYAGAIN (and loads it in the background). The error
-- is passed on so the caller retries; it never decides without the policy.

local user = KEYS[1]
local tenant, project, bundle, policy = ARGV[1], ARGV[2], ARGV[3], ARGV[4]

local r = redis.call('QUOTA.ADMIT', tenant, project, user, bundle,
                     'POLICY', policy, 'COMPACT')

-- r[1] allowed, r[2] retry_after, r[3] remaining_requests, r[4] remaining_tokens,
-- r[5] lease ("" when none), r[6] reason, r[7] reserved, r[8] credit
return {r[1], r[2], r[3], r[5]}
