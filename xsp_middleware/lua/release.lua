-- Undo one reservation (the response did not complete with a 2xx): give back its spend, its
-- impression and its day's spend, and take its time out of the user's logs.
-- KEYS as reserve.lua. ARGV[1] campaign id, ARGV[2] cost in units (a non-negative integer
-- string), ARGV[3] reservation time ms, ARGV[4] '1' if it counted an impression, ARGV[5] its
-- day start ms ('0': no daily budget), ARGV[6] the logs it wrote (reserve.lua's reply),
-- ARGV[7] (optional) the counter to add one to instead of 'n:released' ('' for none): a
-- cluster's compensation counts the user's denial reason there.
local cost = tonumber(ARGV[2])
local function give_back(field)
  local value = tonumber(redis.call('HGET', KEYS[2], field) or '0')
  -- Never below zero: the campaign's state may have been reset in between.
  if value >= cost then redis.call('HINCRBY', KEYS[2], field, '-' .. ARGV[2]) end
end
if cost > 0 then
  give_back('spent')
  if ARGV[5] ~= '0' then give_back('day:' .. ARGV[5]) end
  -- A reservation that took the last of the budget flipped the campaign to exhausted; giving
  -- it back makes the campaign active again when the budget that ran out ('lx') can pay once
  -- more. Otherwise a released last impression (or, on a cluster, a compensation) would leave
  -- budget unspent for good. The marker goes too, so the exhaustion that really ends the
  -- budget fires the hook again.
  if redis.call('HGET', KEYS[1], 'status') == 'exhausted' then
    local ran_out = tonumber(redis.call('HGET', KEYS[2], 'lx') or '')
    local spent = tonumber(redis.call('HGET', KEYS[2], 'spent') or '0')
    if ran_out and ran_out - spent >= cost then
      redis.call('HSET', KEYS[1], 'status', 'active')
      redis.call('HDEL', KEYS[2], 'lx')
    end
  end
end
if ARGV[4] == '1' then
  local count = tonumber(redis.call('HGET', KEYS[2], 'impressions') or '0')
  if count > 0 then redis.call('HINCRBY', KEYS[2], 'impressions', -1) end
end
local counter = ARGV[7] or 'n:released'
if counter ~= '' then redis.call('HINCRBY', KEYS[2], counter, 1) end
if KEYS[3] then
  local at, logs = tonumber(ARGV[3]), tonumber(ARGV[6])
  if logs % 2 == 1 then xsp_user_unrecord(KEYS[3], ARGV[1], at) end
  if logs >= 2 then xsp_user_unrecord(KEYS[3], '*', at) end
end
return 1
