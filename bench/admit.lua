-- bench/admit.lua: the admission a Redis user would write instead of QUOTA.ADMIT, with plain
-- string counters, a ZSET of leases and credits kept in a Redis hash. `make bench` compares
-- QUOTA.ADMIT against it (EVALSHA); it is the same decision as
--   QUOTA.ADMIT <t> <p> <user> '*' REQUESTS_PER_DAY a REQUESTS_PER_MONTH b TOKENS_PER_DAY c
--               MAX_CONCURRENT d LEASE_TTL ttl
-- for a user whose credits are in the hash `credits:<user>` (fields requests_per_day,
-- requests_per_month, tokens_per_day, max_concurrent; a missing field adds nothing).
--
--   EVALSHA <sha> 1 <user> <requests_per_day> <requests_per_month> <tokens_per_day>
--           <max_concurrent> <lease_ttl_s>
--   (a limit of -1 is unlimited)
--
-- State per user: rq:d:<user>:<day> and rq:m:<user>:<month> (INCR + EXPIRE on each admit, the
-- usual idiom; skipping EXPIRE when INCR returned > 1 is ~10% faster),
-- tok:d:<user>:<day> (committed tokens, read with GET; a commit script would INCRBY it),
-- lease:<user> (ZSET lease id -> expiry in ms; expired members pruned on every call).
-- Reply: {allowed, reason, retry_after, lease, used_replenishment, remaining_requests,
--         remaining_tokens}.
-- Keys are derived from KEYS[1] (fine on a standalone server; a cluster would need a hash tag).

local user = KEYS[1]
local t = redis.call('TIME')
local sec = tonumber(t[1])
local now_ms = sec * 1000 + math.floor(tonumber(t[2]) / 1000)

-- UTC day and month indexes (days since the epoch; months since year 0).
local day = math.floor(sec / 86400)
local z = day + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local mday = doy - math.floor((153 * mp + 2) / 5) + 1
local m = mp < 10 and mp + 3 or mp - 9
local y = yoe + era * 400
if m <= 2 then y = y + 1 end
local month = y * 12 + m - 1

-- Effective limits: base (ARGV) + credits (hash); nil = unlimited.
local credits = redis.call('HMGET', 'credits:' .. user,
    'requests_per_day', 'requests_per_month', 'tokens_per_day', 'max_concurrent')
local base, limit = {}, {}
for i = 1, 4 do
    local b = tonumber(ARGV[i])
    if b ~= nil and b >= 0 then
        base[i] = b
        local add = tonumber(credits[i])
        limit[i] = add and b + add or b
    end
end
local lease_ttl_ms = (tonumber(ARGV[5]) or 300) * 1000

local kday = 'rq:d:' .. user .. ':' .. day
local kmonth = 'rq:m:' .. user .. ':' .. month
local ktok = 'tok:d:' .. user .. ':' .. day
local klease = 'lease:' .. user

local used = redis.call('MGET', kday, kmonth, ktok)
local rday = tonumber(used[1]) or 0
local rmonth = tonumber(used[2]) or 0
local tday = tonumber(used[3]) or 0
redis.call('ZREMRANGEBYSCORE', klease, '-inf', now_ms)
local inflight = redis.call('ZCARD', klease)

local day_end = (day + 1) * 86400
local function month_end()
    local dim = ({31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31})[m]
    if m == 2 and ((y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0) then dim = 29 end
    return (day - mday + 1 + dim) * 86400
end

local function violations(l)
    local v, wait = {}, 0
    if l[1] and rday >= l[1] then v[#v + 1] = 'requests_per_day'; wait = math.max(wait, day_end - sec) end
    if l[2] and rmonth >= l[2] then v[#v + 1] = 'requests_per_month'; wait = math.max(wait, month_end() - sec) end
    if l[3] and tday >= l[3] then v[#v + 1] = 'tokens_per_day'; wait = math.max(wait, day_end - sec) end
    if #v == 0 and l[4] and inflight >= l[4] then
        v[1] = 'concurrency'
        local first = redis.call('ZRANGE', klease, 0, 0, 'WITHSCORES')
        wait = math.max(1, math.ceil(((tonumber(first[2]) or now_ms) - now_ms) / 1000))
    end
    return v, wait
end

local function remaining(rd, rm, td)
    local r, tk = -1, -1
    if limit[1] then r = limit[1] - rd end
    if limit[2] and (r < 0 or limit[2] - rm < r) then r = limit[2] - rm end
    if limit[3] then tk = limit[3] - td end
    return math.max(r, -1), math.max(tk, -1)
end

local v, wait = violations(limit)
if #v > 0 then
    local r, tk = remaining(rday, rmonth, tday)
    return {0, table.concat(v, '|'), wait, false, 0, r, tk}
end
local used_replenishment = #violations(base) > 0 and 1 or 0

rday = redis.call('INCR', kday)
redis.call('EXPIRE', kday, day_end - sec + 3600)
rmonth = redis.call('INCR', kmonth)
redis.call('EXPIRE', kmonth, month_end() - sec + 3600)

local lease = false
if limit[4] then
    lease = day .. ':' .. rday
    redis.call('ZADD', klease, now_ms + lease_ttl_ms, lease)
    redis.call('PEXPIRE', klease, lease_ttl_ms)
end
local r, tk = remaining(rday, rmonth, tday)
return {1, '', -1, lease, used_replenishment, r, tk}
