-- Reserve one impression: check status, caps and budget, and write the impression and its
-- spend, all in one atomic step (no check-then-act).
-- KEYS[1] campaign config hash, KEYS[2] campaign state hash, KEYS[3] user hash (absent when
-- the request is anonymous: no caps apply).
-- ARGV[1] campaign id (the user hash field)    ARGV[2] request cost in units ('' = campaign's)
-- ARGV[3] fallback cost   ARGV[4] fallback budget   ARGV[5] fallback caps spec
-- ARGV[6] fallback status   ARGV[7] now override in ms ('' = TIME)   ARGV[8] '1' to count
-- an impression ('0': spend only)
-- Reply: {reserved 1/0, reason, cost, remaining budget, remaining impressions (-1: no caps),
--         reservation time ms}; reasons: 0 ok, 1 frequency_capped, 2 budget_exhausted,
--         3 campaign_paused.
local cfg = redis.call('HMGET', KEYS[1], 'status', 'budget', 'cost', 'caps')
local budget_s = cfg[2] or ARGV[4]
local cost_s = ARGV[2]
if cost_s == '' then cost_s = cfg[3] or ARGV[3] end
local cost, budget = tonumber(cost_s), tonumber(budget_s)
local status = cfg[1] or ARGV[6]
if status == 'paused' then return {0, 3, cost, 0, -1, 0} end

local spent = tonumber(redis.call('HGET', KEYS[2], 'spent') or '0')
local now = xsp_now_ms(ARGV[7])
local remaining = -1
local caps, lifetime, times
if KEYS[3] then
  caps = xsp_parse_caps(cfg[4] or ARGV[5])
  lifetime, times = xsp_read_log(redis.call('HGET', KEYS[3], ARGV[1]))
  local left = xsp_check_caps(caps, lifetime, times, now)
  if left == -1 then return {0, 1, cost, budget - spent, 0, now} end
  if left then remaining = left end
end

if status == 'exhausted' or spent + cost > budget then
  return {0, 2, cost, budget - spent, remaining, now}
end
if cost > 0 then redis.call('HINCRBY', KEYS[2], 'spent', cost_s) end
if ARGV[8] == '1' then redis.call('HINCRBY', KEYS[2], 'impressions', 1) end

if KEYS[3] and #caps > 0 then
  local kept, ttl = xsp_record(caps, times, now)
  redis.call('HSET', KEYS[3], ARGV[1], xsp_write_log(lifetime + 1, kept))
  xsp_keep_alive(KEYS[3], ttl)
end
return {1, 0, cost, budget - spent - cost, remaining, now}
