-- Undo one reservation (the response did not complete with a 2xx): give back its spend and
-- its impression, and take its time out of the user's log.
-- KEYS as reserve.lua. ARGV[1] campaign id, ARGV[2] cost in units (a non-negative integer
-- string), ARGV[3] reservation time ms, ARGV[4] '1' if it counted an impression.
local cost = tonumber(ARGV[2])
if cost > 0 then
  local spent = tonumber(redis.call('HGET', KEYS[2], 'spent') or '0')
  -- Never below zero: the campaign's state may have been reset in between.
  if spent >= cost then redis.call('HINCRBY', KEYS[2], 'spent', '-' .. ARGV[2]) end
end
if ARGV[4] == '1' then
  local count = tonumber(redis.call('HGET', KEYS[2], 'impressions') or '0')
  if count > 0 then redis.call('HINCRBY', KEYS[2], 'impressions', -1) end
end
if KEYS[3] then
  local raw = redis.call('HGET', KEYS[3], ARGV[1])
  if raw then
    local lifetime, times = xsp_read_log(raw)
    local at = tonumber(ARGV[3])
    for j = #times, 1, -1 do
      if times[j] == at then
        table.remove(times, j)
        break
      end
    end
    if lifetime > 0 then lifetime = lifetime - 1 end
    if lifetime == 0 and #times == 0 then
      redis.call('HDEL', KEYS[3], ARGV[1])
    else
      redis.call('HSET', KEYS[3], ARGV[1], xsp_write_log(lifetime, times))
    end
  end
end
return 1
