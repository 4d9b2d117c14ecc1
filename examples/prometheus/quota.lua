#!lua flags=no-writes,allow-stale
-- redis-quota's INFO quota as Prometheus metrics, through prometheus-redis-exporter:
--
--   prometheus-redis-exporter --redis.addr redis://127.0.0.1:6379 \
--       --script examples/prometheus/quota.lua
--
-- The exporter runs this script with EVAL at every scrape and turns each name/value pair it
-- returns into redis_script_values{key="<name>"} <value> (see README.md beside it). Every
-- numeric quota_* field of INFO quota is returned as it is. The one field that is a word,
-- quota_notify_state, becomes one 0/1 field per state (quota_notify_state_listening 1, the
-- others 0), because a value the exporter cannot read as a number would drop every metric of
-- the script. The values are strings, as the exporter expects.
--
-- The flags line: the script writes nothing, so it runs on a replica, on a stale replica and
-- when Redis is over maxmemory (Redis 7.0+).

local info = redis.call('INFO', 'quota')
local out = {}
local states = { 'off', 'connecting', 'listening', 'disconnected' }
for name, value in string.gmatch(info, '(quota_[%w_]+):([^\r\n]*)') do
    if tonumber(value) ~= nil then
        out[#out + 1] = name
        out[#out + 1] = value
    elseif name == 'quota_notify_state' then
        for _, state in ipairs(states) do
            out[#out + 1] = 'quota_notify_state_' .. state
            out[#out + 1] = (state == value) and '1' or '0'
        end
    end
end
return out
