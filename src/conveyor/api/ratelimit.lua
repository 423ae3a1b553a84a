-- One request against a caller's budget, by GCRA; conveyor.api.ratelimit.gcra is the
-- same arithmetic. Redis's own clock (TIME) is used, so API processes whose clocks
-- disagree still share one budget.
--
-- KEYS[1]  the caller's theoretical arrival time (TAT), microseconds of Redis's clock
-- ARGV[1]  the emission interval: microseconds one request costs (window / count)
-- ARGV[2]  the burst: how many requests fit at once after a quiet spell
--
-- Returns {allowed (1 or 0), remaining, reset, retry_after}: requests left right now,
-- microseconds until the whole burst is back, microseconds until one is allowed (0 if
-- allowed).

-- Before Redis 5 a script calling TIME must ask for its effects to be replicated.
if redis.replicate_commands then
  redis.replicate_commands()
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local interval = tonumber(ARGV[1])
local capacity = interval * tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then
  tat = now
end
local next_tat = tat + interval
local allowed_at = next_tat - capacity
if allowed_at > now then
  return {0, 0, tat - now, allowed_at - now}
end
-- Kept only while it says more than "a full burst is available".
redis.call('SET', KEYS[1], string.format('%d', next_tat), 'PX', math.ceil((next_tat - now) / 1000))
return {1, math.floor((capacity - (next_tat - now)) / interval), next_tat - now, 0}
