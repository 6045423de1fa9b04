-- Undo one reservation (the response did not complete with a 2xx): give back its spend, its
-- impression and its day's spend, and take its time out of the user's logs.
-- KEYS as reserve.lua. ARGV[1] campaign id, ARGV[2] cost in units (a non-negative integer
-- string), ARGV[3] reservation time ms, ARGV[4] '1' if it counted an impression, ARGV[5] its
-- day start ms ('0': no daily budget), ARGV[6] the logs it wrote (reserve.lua's reply),
-- ARGV[7] (optional) the counter to add one to instead of 'n:released' ('' for none): a
-- cluster's compensation counts the user's denial reason there.
if tonumber(ARGV[2]) > 0 then
  xsp_give_back(KEYS[2], ARGV[2], ARGV[5])
  xsp_reactivate(KEYS[1], KEYS[2], tonumber(ARGV[2]))
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
