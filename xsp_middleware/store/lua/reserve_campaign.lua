-- Redis Cluster: the campaign's half of a reservation, on the campaign's shard. It runs
-- concurrently with reserve_user.lua on the user's shard; the app releases whichever half
-- passed when the other denies.
-- KEYS[1] campaign config hash, KEYS[2] campaign state hash.
-- ARGV[1..19] as reserve.lua (the user arguments are unused here), and ARGV[20] the campaign
-- caps the user's half was given; when they differ from the stored ones the app must retry
-- with these (reason 10), like a time zone change (reason 9). Absent for anonymous requests
-- ('*' when extras follow).
-- Extras as reserve.lua's (KEYS[3] the pending set, KEYS[4] the pending details, ARGV[21..25]),
-- and ARGV[26] the user hash the user's half holds the pending entry in ('' none).
-- Reply: as reserve.lua's; the user's fields (remaining impressions, logs) are -1 and 0, and
-- element 10 holds the time zone (reason 9), the caps (reason 10), the bid ceiling (reason
-- 12) or the pending reservation's id; element 12 the stored leasing flag.
local extras = ARGV[21]
local c = xsp_config(KEYS[1], 2, extras)
local tz = c.tz or 'UTC'
local leasing = c.leasing
if tz ~= ARGV[11] then return {0, 9, 0, 0, -1, 0, 0, 0, 0, tz, 1, leasing} end
if ARGV[20] and ARGV[20] ~= '*' and (c.caps or '') ~= ARGV[20] then
  return {0, 10, 0, 0, -1, 0, 0, 0, 0, c.caps or '', 1, leasing}
end

local now, hold, pend, replayed = xsp_reserve_start(c, KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[17])
if replayed then return {0, 13, 0, 0, -1, now, 0, 0, 0, '', 1, leasing} end
local k, reason = xsp_campaign_start(KEYS[2], c, ARGV[16], now, ARGV[12])
if reason == 12 then return {0, 12, k.cost, 0, -1, k.now, 0, 0, 0, c.max_cost, 1, leasing} end
reason = reason or xsp_campaign_budget(KEYS[1], KEYS[2], c, k, ARGV[15])
if reason then return xsp_deny(KEYS[2], reason, k, -1, 1, leasing) end
if not hold then
  xsp_campaign_commit(KEYS[2], k, ARGV[18])
  return {1, 0, k.cost, k.remaining - k.cost, -1, k.now, 0, k.day_start, 0, '', 1, leasing}
end
xsp_campaign_commit(KEYS[2], k, '0')  -- the beacon counts the impression
pend.hold(KEYS[1], KEYS[2], KEYS[3], KEYS[4], c, k, ARGV[25], hold, ARGV[26])
return {1, 0, k.cost, k.remaining - k.cost, -1, k.now, 0, k.day_start, 0, ARGV[25], 1, leasing}
